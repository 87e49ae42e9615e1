//! One peer's connection after the upgrade: its read loop, which feeds the
//! hooks, and its write loop, which drains the peer's outbound queue into the
//! socket in batches, keeps the heartbeat, and drops a peer whose socket
//! stops taking bytes.
//!
//! A socket that takes no byte for the write timeout fails its write with
//! `TimedOut` (the standalone listener wraps every connection in
//! [`WriteTimeout`], and the upgraded socket keeps it; behind a foreign
//! listener the upgraded socket is wrapped here): the peer is dropped,
//! whether or not its queue ever filled.
//!
//! Every close the server decides on ends the same way: the close frame
//! (written as long as the socket keeps taking bytes), then a lingering close. The server shuts its
//! side and reads what the client still sends until the client closes too,
//! for a bounded time. Dropping a socket with unread input makes the kernel
//! answer with a reset, and a reset can overtake the close frame: the client
//! would see 1006 instead of 1009 or 1013.
//!
//! The two directions are split. tungstenite reads (fragments, UTF-8, size
//! limits, protocol errors) on the read half; the write loop writes the
//! queued frames, already encoded once per message ([`Frame`]), straight to
//! the write half with one `writev` per batch: no per-peer framing, no copy
//! into a write buffer. tungstenite's own replies (pongs, the echo of the
//! peer's close) are caught by [`ReadSide`] and handed to the write loop,
//! which sends them in order with the rest.

use std::{
    collections::VecDeque,
    future::poll_fn,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use crosswire_shared::close_code;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf},
    sync::Notify,
    time::{timeout, Instant},
};
use tokio_tungstenite::{
    tungstenite::{
        self,
        error::{CapacityError, Error as WsError},
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
    },
    WebSocketStream,
};

use crate::{
    frame::Frame,
    hooks::{CloseDetails, Hooks, PeerError},
    message::Message,
    outbox::{Outbox, OutboxReceiver, Queued, IDLE_CAPACITY},
    peer::Peer,
    shutdown::ShutdownHandles,
    state::ServerState,
    write_timeout::WriteTimeout,
};

type Io = WriteTimeout<TokioIo<Upgraded>>;
type Socket = WebSocketStream<ReadSide>;
type Sink = WriteHalf<Io>;

/// How many queued frames the write loop takes at a time: under load, one
/// syscall carries many frames.
const WRITE_BATCH: usize = 64;

/// The most slices one `writev` is given (well under every `IOV_MAX`).
const MAX_IOV: usize = 64;

/// Batches up to this many frames use a small slice array.
const FEW_IOV: usize = 4;

/// tungstenite's side of the socket: it reads from the read half, and what
/// it writes (only its automatic replies: pongs and the close echo, since
/// every other frame goes through the write loop) is kept for the write loop
/// to send, so nothing else ever writes to the socket and the frames cannot
/// interleave.
struct ReadSide {
    io: ReadHalf<Io>,
    replies: Arc<Replies>,
}

/// tungstenite's replies, waiting for the write loop.
#[derive(Default)]
struct Replies {
    state: Mutex<RepliesState>,
    notify: Notify,
}

#[derive(Default)]
struct RepliesState {
    /// Complete frames, as tungstenite encoded them; empty (unallocated) while idle.
    bytes: Vec<u8>,
    /// tungstenite has written its echo of the peer's close (into `bytes`,
    /// or already taken): the echo is the server's close frame, and nothing
    /// may follow it. Set under the same lock as the echo's bytes arrive, so
    /// the write loop never takes the echo without seeing it is one.
    peer_closed: bool,
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, RepliesState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The replies written so far, as one frame sequence for the batch, while
    /// the connection is open; `Err` once the peer's close is in, leaving the
    /// echo for the write loop's close.
    fn take_unless_closed(&self) -> Result<Option<Frame>, ()> {
        let mut st = self.lock();
        if st.peer_closed {
            return Err(());
        }
        let bytes = std::mem::take(&mut st.bytes);
        Ok((!bytes.is_empty()).then(|| Frame::from_wire(Bytes::from(bytes))))
    }

    fn peer_closed(&self) -> bool {
        self.lock().peer_closed
    }

    /// The last replies, and whether the peer's close (and so the echo,
    /// now or earlier) is among them, read together.
    fn take_last(&self) -> (Option<Frame>, bool) {
        let mut st = self.lock();
        let bytes = std::mem::take(&mut st.bytes);
        ((!bytes.is_empty()).then(|| Frame::from_wire(Bytes::from(bytes))), st.peer_closed)
    }
}

/// Whether `frames` (complete, unmasked frames back to back) hold a close frame.
fn holds_close(mut frames: &[u8]) -> bool {
    while frames.len() >= 2 {
        let (opcode, len7) = (frames[0] & 0x0f, frames[1] & 0x7f);
        if opcode == 0x8 {
            return true;
        }
        let (head, len) = match len7 {
            126 if frames.len() >= 4 => (4, u64::from(u16::from_be_bytes([frames[2], frames[3]]))),
            127 if frames.len() >= 10 => (10, u64::from_be_bytes(frames[2..10].try_into().expect("8 bytes"))),
            126 | 127 => return false,
            short => (2, u64::from(short)),
        };
        let Some(next) = usize::try_from(len).ok().and_then(|l| l.checked_add(head)) else { return false };
        frames = frames.get(next..).unwrap_or_default();
    }
    false
}

impl AsyncRead for ReadSide {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.replies.lock();
        st.bytes.extend_from_slice(buf);
        // tungstenite, as a server, writes a close frame only to answer the peer's.
        st.peer_closed |= holds_close(&st.bytes);
        drop(st);
        self.replies.notify.notify_one();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// How long the server waits for the peer's close reply once its own close
/// frame is out, and how long the lingering close reads before giving up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// When the peer was last heard from, as milliseconds since the connection
/// started (an atomic, so the read loop stamps and the heartbeat checks
/// without a lock).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// How the write loop ended.
enum WriterExit {
    /// It sent this close frame (or the socket refused it: the peer closed first).
    Closed(CloseFrame),
    /// The socket took no byte for the write timeout; nothing more can be sent.
    Stalled(Duration),
    /// Writing to the socket failed.
    Failed(String),
}

/// Runs a peer from the completed upgrade to the end of its connection.
pub(crate) async fn serve<H: Hooks>(
    state: Arc<ServerState>,
    hooks: Arc<H>,
    upgraded: Upgraded,
    write_timeout: Option<Duration>,
    peer: Peer<H::Context>,
    outbox_rx: OutboxReceiver,
    shutdown: ShutdownHandles,
) {
    let io = WriteTimeout::new(TokioIo::new(upgraded), write_timeout);
    let (read, sink) = tokio::io::split(io);
    let replies = Arc::new(Replies::default());
    let read = ReadSide { io: read, replies: Arc::clone(&replies) };
    let mut stream = Socket::from_raw_socket(read, Role::Server, Some(state.ws_config())).await;
    let activity = Arc::new(Activity::new());
    let writer = Writer {
        outbox: peer.outbox().clone(),
        heartbeat: state.config.heartbeat,
        write_timeout: state.config.write_timeout,
        max_batch_bytes: state.config.write_buffer_size.max(1),
        activity: Arc::clone(&activity),
        replies,
    };
    let mut writer = shutdown.spawn(writer.run(sink, outbox_rx));
    tracing::debug!(peer = %peer, remote = %peer.remote_addr(), "open");
    // Everything that runs for a while but not while the peer is idle is
    // boxed (the hooks, handling a frame, the close): an idle peer holds this
    // future for as long as it is connected, and its size is that of its
    // largest step, not of the step it is waiting in.
    Box::pin(hooks.open(&peer)).await;

    let mut run = Run::new(&state, &*hooks, &peer);
    let mut shutting_down = false;
    loop {
        let until_deadline = async {
            match run.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let flow = tokio::select! {
            next = stream.next(), if run.reading => {
                activity.touch();
                if let Some(Ok(tungstenite::Message::Close(_))) = &next {
                    // tungstenite has queued its echo of the peer's close:
                    // flushing moves it to the replies, where the write loop
                    // sends it as the server's close. (The flush then reports
                    // the connection closed, which it now is.)
                    let _ = stream.flush().await;
                }
                Box::pin(run.on_read(next)).await
            }
            exit = &mut writer, if run.writer_exit.is_none() => Box::pin(run.on_writer_exit(exit)).await,
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                let (code, reason) = shutdown.kind().close_frame();
                peer.outbox().close_now(code, reason);
                Flow::Continue
            }
            _ = until_deadline => Flow::End,
        };
        if let Flow::End = flow {
            break;
        }
    }

    let (details, sink) = Box::pin(run.finish(&mut writer)).await;
    peer.leave_all();
    state.unregister_peer(peer.id());
    tracing::debug!(peer = %peer, code = details.code, reason = %details.reason, "close");
    Box::pin(hooks.close(&peer, details)).await;
    if let Some(sink) = sink {
        Box::pin(linger(&mut stream.get_mut().io, sink)).await;
    }
}

/// Whether the connection's loop goes on.
enum Flow {
    Continue,
    End,
}

type WriterTask = tokio::task::JoinHandle<Option<(Sink, WriterExit)>>;

/// What the read side of a connection has learnt so far about how it ends.
struct Run<'a, H: Hooks> {
    state: &'a ServerState,
    hooks: &'a H,
    peer: &'a Peer<H::Context>,
    /// The peer's close frame, once it sent one.
    peer_close: Option<CloseDetails>,
    writer_exit: Option<WriterExit>,
    /// The write half, back from the write loop, for the lingering close.
    sink: Option<Sink>,
    reading: bool,
    /// Set once the server's close frame is out: how long to wait for the reply.
    deadline: Option<Instant>,
}

impl<'a, H: Hooks> Run<'a, H> {
    fn new(state: &'a ServerState, hooks: &'a H, peer: &'a Peer<H::Context>) -> Self {
        Self { state, hooks, peer, peer_close: None, writer_exit: None, sink: None, reading: true, deadline: None }
    }

    async fn on_read(&mut self, next: Option<Result<tungstenite::Message, WsError>>) -> Flow {
        let (hooks, peer) = (self.hooks, self.peer);
        match next {
            Some(Ok(tungstenite::Message::Text(t))) => on_message(hooks, peer, Message::from_text_frame(t)).await,
            Some(Ok(tungstenite::Message::Binary(b))) => on_message(hooks, peer, Message::Binary(b)).await,
            Some(Ok(tungstenite::Message::Close(frame))) => {
                // tungstenite has queued the close reply itself, and the
                // write loop sends it: the handshake is complete.
                self.peer_close = Some(match frame {
                    Some(f) => CloseDetails { code: f.code.into(), reason: f.reason.to_string() },
                    None => CloseDetails { code: 1005, reason: String::new() },
                });
                return Flow::End;
            }
            Some(Ok(_)) => {} // ping/pong: answered by tungstenite, counted as activity by the caller
            Some(Err(e)) => {
                // The stream is fused after an error: the rest is read raw
                // by the lingering close, once the close frame is out.
                self.reading = false;
                match classify(e, self.state.config.max_message_size) {
                    Some((error, code)) => {
                        tracing::debug!(peer = %peer, %error, "connection error");
                        hooks.error(peer, &error).await;
                        peer.outbox().close(code, &close_reason(&error));
                    }
                    None => return Flow::End,
                }
            }
            None => return Flow::End,
        }
        Flow::Continue
    }

    async fn on_writer_exit(&mut self, exit: Result<Option<(Sink, WriterExit)>, tokio::task::JoinError>) -> Flow {
        let (returned, exit) = match exit {
            Ok(Some((sink, exit))) => (Some(sink), exit),
            Ok(None) => return Flow::End, // aborted at the end of the shutdown grace
            Err(e) => (None, WriterExit::Failed(e.to_string())),
        };
        self.sink = returned;
        let flow = match &exit {
            WriterExit::Closed(frame) => {
                if u16::from(frame.code) == close_code::SLOW_CONSUMER {
                    self.state.metrics.slow_consumer_closed();
                }
                if let Some(error) = close_error(frame, self.state) {
                    self.hooks.error(self.peer, &error).await;
                }
                if self.reading {
                    self.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                    Flow::Continue
                } else {
                    Flow::End
                }
            }
            WriterExit::Stalled(after) => {
                self.state.metrics.write_timed_out();
                tracing::debug!(peer = %self.peer, ?after, "socket took no bytes; dropping the peer");
                self.hooks.error(self.peer, &PeerError::WriteTimeout(*after)).await;
                self.sink = None;
                Flow::End
            }
            WriterExit::Failed(error) => {
                tracing::debug!(peer = %self.peer, %error, "write failed");
                self.sink = None;
                Flow::End
            }
        };
        self.writer_exit = Some(exit);
        flow
    }

    /// Ends the write loop if it still runs, and says how the connection
    /// ended; returns the write half when a lingering close is worth it.
    async fn finish(mut self, writer: &mut WriterTask) -> (CloseDetails, Option<Sink>) {
        if self.writer_exit.is_none() {
            // The peer closed first, or its socket is gone: stop the write loop,
            // which also gets tungstenite's close reply out instead of its own.
            self.peer.outbox().close_now(close_code::GOING_AWAY, "connection closed");
            match timeout(CLOSE_TIMEOUT, &mut *writer).await {
                Ok(Ok(Some((returned, exit)))) => {
                    self.sink = Some(returned).filter(|_| matches!(exit, WriterExit::Closed(_)));
                    self.writer_exit = Some(exit);
                }
                _ => writer.abort(),
            }
        }
        let details = match (self.peer_close, &self.writer_exit) {
            (Some(details), _) => details,
            (None, Some(WriterExit::Closed(f))) => CloseDetails { code: f.code.into(), reason: f.reason.to_string() },
            (None, Some(WriterExit::Stalled(_))) => CloseDetails { code: 1006, reason: "write timeout".to_owned() },
            (None, _) => CloseDetails { code: 1006, reason: String::new() },
        };
        (details, self.sink)
    }
}

/// Hands a data message to the hooks, unless the server has already decided
/// to close the peer: from then on its frames are read (so the close
/// handshake completes) but not acted on; an expired token publishes nothing.
async fn on_message<H: Hooks>(hooks: &H, peer: &Peer<H::Context>, message: Message) {
    if !peer.outbox().is_closing() {
        hooks.message(peer, message).await;
    }
}

/// The lingering close: shut the write side (the close frame is out), then
/// read and discard until the client closes too, for a bounded time.
async fn linger(read: &mut ReadHalf<Io>, mut write: Sink) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        let _ = write.shutdown().await;
        let mut scrap = [0u8; 4096];
        while matches!(read.read(&mut scrap).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Turns a read error into what to tell the hooks and the close code to send;
/// `None` when the socket is simply gone.
fn classify(error: WsError, limit: usize) -> Option<(PeerError, u16)> {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => {
            Some((PeerError::MessageTooBig { size, limit }, close_code::MESSAGE_TOO_BIG))
        }
        WsError::Capacity(e) => Some((PeerError::Protocol(e.to_string()), close_code::MESSAGE_TOO_BIG)),
        WsError::Utf8(e) => Some((PeerError::Protocol(format!("invalid UTF-8: {e}")), 1007)),
        WsError::Protocol(e) => Some((PeerError::Protocol(e.to_string()), close_code::PROTOCOL_ERROR)),
        WsError::ConnectionClosed | WsError::AlreadyClosed => None,
        WsError::Io(e) => {
            tracing::debug!(error = %e, "socket error");
            None
        }
        other => Some((PeerError::Io(other.to_string()), close_code::INTERNAL_ERROR)),
    }
}

fn close_reason(error: &PeerError) -> String {
    match error {
        PeerError::MessageTooBig { limit, .. } => format!("message too big (limit {limit} bytes)"),
        PeerError::Protocol(_) => "protocol error".to_owned(),
        other => other.to_string(),
    }
}

/// The hook-visible error behind a close the server itself decided on.
fn close_error(frame: &CloseFrame, state: &ServerState) -> Option<PeerError> {
    match u16::from(frame.code) {
        close_code::SLOW_CONSUMER => Some(PeerError::SlowConsumer(state.config.outbound_queue)),
        close_code::HEARTBEAT_TIMEOUT => Some(PeerError::HeartbeatTimeout(state.config.heartbeat * 2)),
        _ => None,
    }
}

/// How one batch write ended.
enum Batch {
    Written,
    /// A close was asked for (or the heartbeat was lost) while it was pending.
    Close,
    Stalled,
    Failed(String),
}

/// One peer's write loop and what it needs besides the socket and queue.
struct Writer {
    /// For the heartbeat's own verdict; dropped before the close so the
    /// queue cannot keep itself alive.
    outbox: Outbox,
    heartbeat: Duration,
    /// Only to say how long a stalled socket was given.
    write_timeout: Duration,
    /// The most bytes one `writev` is handed.
    max_batch_bytes: usize,
    activity: Arc<Activity>,
    replies: Arc<Replies>,
}

impl Writer {
    /// Writes queued frames until a close is asked for, then the close frame.
    /// The heartbeat, close requests and the stall check are served while a
    /// write is pending: a peer that stops reading cannot hold the loop.
    async fn run(self, mut sink: Sink, mut rx: OutboxReceiver) -> (Sink, WriterExit) {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_due = false;
        let mut batch = Pending::default();
        'run: loop {
            if !ping_due {
                tokio::select! {
                    biased;
                    _ = rx.close.changed() => break 'run,
                    _ = self.replies.notify.notified() => {}
                    more = rx.frames.ready() => if !more {
                        break 'run;
                    },
                    _ = ticker.tick() => {
                        if self.heartbeat_lost() {
                            break 'run;
                        }
                        ping_due = true;
                    }
                }
            }
            if std::mem::take(&mut ping_due) {
                batch.frames.push_back(Frame::ping().into());
            }
            // Replies first: a pong answers a ping already read, and must not
            // wait behind a backlog the peer may be slow to take.
            match self.replies.take_unless_closed() {
                Ok(Some(replies)) => batch.frames.push_back(replies.into()),
                Ok(None) => {}
                Err(()) => break 'run,
            }
            rx.frames.take(&mut batch.frames, WRITE_BATCH);
            let outcome = {
                let write = batch.write_all(&mut sink, self.max_batch_bytes);
                tokio::pin!(write);
                loop {
                    tokio::select! {
                        biased;
                        // A close request overtakes a batch the peer may never take.
                        _ = rx.close.changed() => break Batch::Close,
                        result = &mut write => break match result {
                            Ok(()) => Batch::Written,
                            Err(e) if is_stall(&e) => Batch::Stalled,
                            Err(e) => Batch::Failed(e.to_string()),
                        },
                        _ = ticker.tick() => {
                            if self.heartbeat_lost() {
                                break Batch::Close;
                            }
                            ping_due = true;
                        }
                    }
                }
            };
            match outcome {
                Batch::Written => batch.release_idle(),
                Batch::Close => break 'run,
                Batch::Failed(error) => return (sink, WriterExit::Failed(error)),
                Batch::Stalled => return (sink, WriterExit::Stalled(self.write_timeout)),
            }
        }
        let Writer { outbox, write_timeout, max_batch_bytes, replies, .. } = self;
        drop(outbox);
        let closing = rx.close.borrow().clone();
        let (frame, flush) = match closing {
            Some(c) => (c.frame, c.flush),
            None => (CloseFrame { code: CloseCode::Normal, reason: "".into() }, true),
        };
        // A frame partly written must be finished, or the stream is corrupt;
        // the rest of the batch goes only with a graceful close, and never
        // after the peer's close (the echo must be the last frame).
        let peer_closed = replies.peer_closed();
        let flush = flush && !peer_closed;
        if !flush {
            batch.keep_started();
        }
        // Written as long as the socket keeps taking bytes: a peer that was cut
        // for being slow still gets its close frame once it reads again.
        let written = async {
            if flush {
                while rx.frames.take(&mut batch.frames, WRITE_BATCH) > 0 {
                    batch.write_all(&mut sink, max_batch_bytes).await?;
                }
            }
            let (pending, echoed) = replies.take_last();
            if let Some(pending) = pending {
                batch.frames.push_back(pending.into());
            }
            // After the peer's close, tungstenite's echo (just taken, or sent
            // before) is the server's close frame: a second would break the handshake.
            if !echoed {
                batch.frames.push_back(Frame::close(u16::from(frame.code), &frame.reason).into());
            }
            batch.write_all(&mut sink, max_batch_bytes).await
        }
        .await;
        match written {
            Err(e) if is_stall(&e) => (sink, WriterExit::Stalled(write_timeout)),
            // Any other failure: the peer closed first; its close is what counts.
            _ => (sink, WriterExit::Closed(frame)),
        }
    }

    /// Whether the peer was silent for two heartbeats; if so, closes it (3008).
    fn heartbeat_lost(&self) -> bool {
        let lost = self.activity.silent_for() >= self.heartbeat * 2;
        if lost {
            self.outbox.close_now(close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
        }
        lost
    }
}

/// Whether a write failed because the socket took no byte for the write timeout.
fn is_stall(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::TimedOut
}

/// The frames the write loop has taken and not yet fully written. All of
/// its progress lives here, not in a future: a write interrupted by a close
/// request resumes exactly where the socket stopped taking bytes.
#[derive(Default)]
struct Pending {
    frames: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    offset: usize,
}

impl Pending {
    /// Writes every frame, a `writev` of up to [`MAX_IOV`] frames at a time.
    async fn write_all(&mut self, sink: &mut Sink, max_bytes: usize) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_all(cx, sink, max_bytes)).await?;
        sink.flush().await
    }

    fn poll_write_all(&mut self, cx: &mut Context<'_>, sink: &mut Sink, max_bytes: usize) -> Poll<io::Result<()>> {
        while !self.frames.is_empty() {
            // The slices live only for this call, so the write loop's future
            // carries no slice array while it waits; and a batch of a frame
            // or two (the usual fan-out wake-up) does not fill in 64 of them.
            let written = if self.frames.len() <= FEW_IOV {
                self.poll_writev(cx, sink, max_bytes, &mut [IoSlice::new(&[]); FEW_IOV])
            } else {
                self.poll_writev(cx, sink, max_bytes, &mut [IoSlice::new(&[]); MAX_IOV])
            };
            match written {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// One `writev` of the frames at the front, as many as fit `slices` and `max_bytes`.
    fn poll_writev<'a>(
        &'a self,
        cx: &mut Context<'_>,
        sink: &mut Sink,
        max_bytes: usize,
        slices: &mut [IoSlice<'a>],
    ) -> Poll<io::Result<usize>> {
        let mut count = 0;
        let mut bytes = 0;
        for (i, q) in self.frames.iter().enumerate().take(slices.len()) {
            let wire = &q.frame.as_wire()[if i == 0 { self.offset } else { 0 }..];
            if count > 0 && bytes + wire.len() > max_bytes {
                break;
            }
            slices[count] = IoSlice::new(wire);
            count += 1;
            bytes += wire.len();
        }
        Pin::new(&mut *sink).poll_write_vectored(cx, &slices[..count])
    }

    fn advance(&mut self, mut written: usize) {
        while let Some(front) = self.frames.front() {
            let left = front.frame.as_wire().len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            self.frames.pop_front();
        }
    }

    /// Drops the frames not yet begun, keeping one partly written.
    fn keep_started(&mut self) {
        let keep = usize::from(self.offset > 0);
        self.frames.truncate(keep);
    }

    /// An idle peer keeps no more batch capacity than its queue may keep: the
    /// two deques trade places at every batch, and one that had to start
    /// from nothing would allocate again for every batch.
    fn release_idle(&mut self) {
        if self.frames.capacity() > IDLE_CAPACITY {
            self.frames = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_found_among_tungstenites_replies() {
        let pong = |len: usize| {
            let mut f = vec![0x8a];
            match len {
                0..=125 => f.push(len as u8),
                _ => f.extend([126, (len >> 8) as u8, len as u8]),
            }
            f.extend(std::iter::repeat_n(7u8, len));
            f
        };
        let close = Frame::close(1000, "").as_wire().to_vec();
        assert!(!holds_close(&pong(125)));
        assert!(!holds_close(&[pong(0), pong(300)].concat()));
        assert!(holds_close(&close));
        assert!(holds_close(&[pong(125), pong(300), close.clone()].concat()));
        // A payload byte that looks like a close opcode is not one.
        assert!(!holds_close(&[0x8a, 0x02, 0x88, 0x00]));
        assert!(!holds_close(&[0x8a]));
    }
}
