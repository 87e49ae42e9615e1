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

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use crosswire_shared::close_code;
use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
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
    hooks::{CloseDetails, Hooks, PeerError},
    message::Message,
    outbox::{FrameReceiver, Outbox, OutboxReceiver},
    peer::Peer,
    shutdown::ShutdownHandles,
    state::ServerState,
    write_timeout::WriteTimeout,
};

type Socket = WebSocketStream<WriteTimeout<TokioIo<Upgraded>>>;
type Sink = SplitSink<Socket, tungstenite::Message>;

/// How many queued frames the write loop hands tungstenite before one flush:
/// under load, one syscall carries many frames.
const WRITE_BATCH: usize = 64;

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
    let socket = Socket::from_raw_socket(io, Role::Server, Some(state.ws_config())).await;
    let (sink, mut stream) = socket.split();
    let activity = Arc::new(Activity::new());
    let writer = Writer {
        outbox: peer.outbox().clone(),
        heartbeat: state.config.heartbeat,
        write_timeout: state.config.write_timeout,
        activity: Arc::clone(&activity),
    };
    let mut writer = shutdown.spawn(writer.run(sink, outbox_rx));
    tracing::debug!(peer = %peer, remote = %peer.remote_addr(), "open");
    hooks.open(&peer).await;

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
                run.on_read(next).await
            }
            exit = &mut writer, if run.writer_exit.is_none() => run.on_writer_exit(exit).await,
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

    let (details, sink) = run.finish(&mut writer).await;
    peer.leave_all();
    state.unregister_peer(peer.id());
    tracing::debug!(peer = %peer, code = details.code, reason = %details.reason, "close");
    hooks.close(&peer, details).await;
    if let Some(socket) = sink.and_then(|sink| stream.reunite(sink).ok()) {
        linger(socket).await;
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
                // tungstenite queues the close reply itself and sends it
                // with its next write: the handshake is complete.
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
            // which also gets tungstenite's close reply out.
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
async fn linger(mut socket: Socket) {
    let io = socket.get_mut();
    let _ = timeout(CLOSE_TIMEOUT, async {
        let _ = io.shutdown().await;
        let mut scrap = [0u8; 4096];
        while matches!(io.read(&mut scrap).await, Ok(n) if n > 0) {}
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
    activity: Arc<Activity>,
}

impl Writer {
    /// Writes queued frames until a close is asked for, then the close frame.
    /// The heartbeat, close requests and the stall check are served while a
    /// write is pending: a peer that stops reading cannot hold the loop.
    async fn run(self, mut sink: Sink, mut rx: OutboxReceiver) -> (Sink, WriterExit) {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_due = false;
        'run: loop {
            let first = if std::mem::take(&mut ping_due) {
                tungstenite::Message::Ping(Default::default())
            } else {
                tokio::select! {
                    biased;
                    _ = rx.close.changed() => break 'run,
                    frame = rx.frames.recv() => match frame {
                        Some(frame) => frame,
                        None => break 'run,
                    },
                    _ = ticker.tick() => {
                        if self.heartbeat_lost() {
                            break 'run;
                        }
                        tungstenite::Message::Ping(Default::default())
                    }
                }
            };
            let outcome = {
                let batch = write_batch(&mut sink, first, &mut rx.frames);
                tokio::pin!(batch);
                loop {
                    tokio::select! {
                        biased;
                        // A close request overtakes a batch the peer may never take.
                        _ = rx.close.changed() => break Batch::Close,
                        result = &mut batch => break match result {
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
                Batch::Written => {}
                Batch::Close => break 'run,
                Batch::Failed(error) => return (sink, WriterExit::Failed(error)),
                Batch::Stalled => return (sink, WriterExit::Stalled(self.write_timeout)),
            }
        }
        let Writer { outbox, write_timeout, .. } = self;
        drop(outbox);
        let closing = rx.close.borrow().clone();
        let (frame, flush) = match closing {
            Some(c) => (c.frame, c.flush),
            None => (CloseFrame { code: CloseCode::Normal, reason: "".into() }, true),
        };
        // Written as long as the socket keeps taking bytes: a peer that was cut
        // for being slow still gets its close frame once it reads again.
        let written = async {
            if flush {
                while let Some(queued) = rx.frames.try_recv() {
                    sink.feed(queued).await?;
                }
            }
            sink.send(tungstenite::Message::Close(Some(frame.clone()))).await
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
fn is_stall(error: &WsError) -> bool {
    matches!(error, WsError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

async fn write_batch(sink: &mut Sink, first: tungstenite::Message, frames: &mut FrameReceiver) -> Result<(), WsError> {
    sink.feed(first).await?;
    for _ in 1..WRITE_BATCH {
        match frames.try_recv() {
            Some(frame) => sink.feed(frame).await?,
            None => break,
        }
    }
    sink.flush().await
}
