//! One peer's connection after the upgrade, on one task that owns the
//! socket: it reads the peer's frames and hands its messages to the hooks,
//! drains the peer's outbound queue into the socket in batches, keeps the
//! heartbeat, and drops a peer whose socket stops taking bytes.
//!
//! Reading: bytes land in a scratch buffer shared by every connection of a
//! worker thread, borrowed only inside one poll, and [`MessageReader`] turns
//! them into messages that own their payload. A connection keeps bytes of
//! its own only while a frame or message is cut by the end of a read: an
//! idle peer holds no read buffer (see `message_reader` for why not
//! tungstenite's reader).
//!
//! Writing: the write side takes everything queued at once and hands it to
//! the socket in as few `writev`s as it takes. The frames are encoded once
//! per message ([`Frame`]) and never re-framed per peer; large ones go to
//! the kernel in place, and runs of small ones are first copied side by side
//! into a per-worker cork buffer (the kernel pays per slice, and for a
//! 20-byte frame a slice costs more than the copy). Nothing is kept per
//! peer for writing but the frames taken. The connection's own frames (the
//! heartbeat's ping, pongs, the echo of the peer's close, the server's
//! close) are put in the same batches, so frames never interleave and a
//! pong goes before the backlog the peer may be slow to take.
//!
//! One task does both, and the writes do not wait for the hooks: a hook's
//! future is polled together with the write side (and the queue, the close
//! requests, the heartbeat), so a slow `message` hook does not make its own
//! peer a slow consumer. Reading pauses while a hook runs: hooks for one
//! peer run one at a time, in order.
//!
//! Reading also pauses while the peer's answers back up: once the answers
//! queued for it and not yet written reach
//! [`ANSWER_LIMIT`](crate::outbox::ANSWER_LIMIT), the connection neither
//! reads its socket nor hands what it already read to the hooks, until the
//! write side has written them below it (the write side settles them in the
//! same poll, and the loop looks again right after: no wake-up to lose). A
//! peer that asks without reading holds that much and its socket buffers,
//! not a queue as long as its asking; a peer that reads slowly is read
//! slowly; one that does not read at all is dropped by the write timeout,
//! and one paused for two heartbeats by the heartbeat. Once the write side
//! has ended, the queue is closed, so that a hook waiting for it to drain
//! (a replay's next page) ends too.
//!
//! Every step's progress is kept in plain fields (the batch and its offset,
//! the reader's state), never in a future dropped at the next event: a
//! write interrupted by a close request resumes where the socket stopped
//! taking bytes.
//!
//! A socket that takes no byte for the write timeout fails its write with
//! `TimedOut` (the standalone listener wraps every connection in
//! [`WriteTimeout`], and the upgraded socket keeps it; behind a foreign
//! listener the upgraded socket is wrapped here): the peer is dropped,
//! whether or not its queue ever filled.
//!
//! Every close the server decides on ends the same way: the close frame
//! (written as long as the socket keeps taking bytes), then a lingering
//! close. The server shuts its side and reads what the client still sends
//! until the client closes too, for a bounded time. Dropping a socket with
//! unread input makes the kernel answer with a reset, and a reset can
//! overtake the close frame: the client would see 1006 instead of 1009 or
//! 1013.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::{poll_fn, Future},
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use crosswire_shared::close_code;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{timeout, Instant},
};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tokio_util::either::Either;

use crate::{
    frame::Frame,
    hooks::{CloseDetails, Hooks, PeerError},
    message::Message,
    message_reader::{MessageReader, ReadError, Received},
    outbox::{shrink_idle, FrameReceiver, OutboxReceiver, Queued, Wake},
    peer::Peer,
    state::ServerState,
    topics::{self, PeerKey},
    write_timeout::WriteTimeout,
};

/// The upgraded socket: see [`socket`].
type Io = Either<WriteTimeout<TcpStream>, Box<WriteTimeout<TokioIo<Upgraded>>>>;

/// `writev`s one poll makes at most before it lets the reading, the
/// heartbeat and the other tasks have a turn. (The write side takes the
/// whole queue at once, so a backlog would otherwise go out in one poll.)
const WRITES_PER_POLL: usize = 16;

/// The most slices one `writev` is given (well under every `IOV_MAX`).
const MAX_IOV: usize = 64;

/// Frames up to this size (header included) are copied together into the
/// worker's cork buffer and leave as one slice; larger ones are handed to
/// `writev` in place. The kernel pays per slice (a chat room's `writev` of
/// 64 twenty-byte frames spent 16% of the server's CPU in `_copy_from_iter`),
/// and below this size one copy costs less than a slice of its own.
const CORK_FRAME: usize = 256;

/// The size of each worker's cork buffer: the most small-frame bytes one
/// `writev` carries.
const CORK_SIZE: usize = 16 * 1024;

/// How long the server waits for the peer's close reply once its own close
/// frame is out, and how long the lingering close reads before giving up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The size of each worker's scratch buffer: the most a single read takes.
const SCRATCH_SIZE: usize = 64 * 1024;

/// Pongs waiting for the write side at most: past them, what the peer sent
/// after the next ping waits until they are written (every ping is answered,
/// and a peer that pings without reading holds no more than this).
const MAX_PONGS: usize = 8;

thread_local! {
    /// Where reads land: one buffer per worker thread, zeroed once, borrowed
    /// only inside one synchronous poll (never across an `.await`, so a task
    /// moving to another worker cannot hold it).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

thread_local! {
    /// Where a batch's small frames are put side by side for one `writev`:
    /// borrowed like [`SCRATCH`], inside one synchronous poll only.
    static CORK: RefCell<Box<[u8]>> = RefCell::new(vec![0; CORK_SIZE].into_boxed_slice());
}

/// Runs `f` on the worker's scratch buffer.
fn with_scratch<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Polls do not nest, so it is never borrowed here; were it ever, a
        // small buffer of its own is slower but as correct.
        Err(_) => f(&mut [0; 4096]),
    })
}

/// The connection's hooks future while one runs (boxed: an idle connection
/// holds none).
type HookFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Runs a peer from its upgrade to the end of its connection; `held` (its
/// place under the connection limits) is let go when it ends.
///
/// Not an `async fn`: one of those can keep room for an argument twice (the
/// argument, then the local it is moved into: rust-lang/rust#62958), and the
/// task that waited for the upgrade kept a third copy around the whole
/// connection. The block below captures each once and uses it in place; an
/// idle peer holds this future for as long as it is connected.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<H: Hooks, G: Send + 'static>(
    state: Arc<ServerState>,
    hooks: Arc<H>,
    on_upgrade: OnUpgrade,
    peer: Peer<H::Context>,
    mut rx: OutboxReceiver,
    held: G,
) -> impl Future<Output = ()> + Send {
    // Gathered: what the peer publishes to a topic in one poll (a whole read
    // of messages) is queued for the subscribers once, as one run.
    topics::gathered(PeerKey::of(peer.id()), async move {
        let (hooks, peer) = (&*hooks, &peer);
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed after the 101");
                state.unregister_peer(peer.id());
                return;
            }
        };
        let limit = state.config.max_message_size;
        let max_read = state.config.read_buffer_size.clamp(1, SCRATCH_SIZE);
        let mut read = ReadSide::new(MessageReader::new(limit, limit), max_read);
        let mut io = socket(upgraded, state.config.write_timeout, &mut read);
        let mut write = WriteSide::new(&state);
        let heartbeat = state.config.heartbeat;
        // One timer, inline: the heartbeat's while the write side is open, then
        // (once the server's close is out) the wait for the peer's reply; the
        // two never run at once. An `Interval` would box a `Sleep` of its own,
        // and a second `Sleep` for the reply would take room in this future
        // for the whole connection.
        let timer = tokio::time::sleep_until(Instant::now() + heartbeat);
        tokio::pin!(timer);
        let mut run = Run::new(&state, hooks, peer);
        tracing::debug!(peer = %peer, remote = %peer.remote_addr(), "open");
        // The shutdown closes the peers registered when it began (see
        // `shutdown`); this one may have registered after.
        if state.shutdown.is_draining() {
            let (code, reason) = state.shutdown.kind().close_frame();
            peer.outbox().close_now(code, reason);
        }
        // Everything that runs for a while but not while the peer is idle is
        // boxed (the hooks, the close): an idle peer holds this future for as
        // long as it is connected, and its size is that of its largest step,
        // not of the step it is waiting in.
        let mut hook: Option<HookFuture<'_>> = Some(Box::pin(hooks.open(peer)));

        loop {
            // The peer's answers back up: nothing more is read or acted on
            // until they drain (see the module documentation). Only while
            // the write side takes the queue: once closing, what is read is
            // not acted on anyway, and the peer's close must be heard.
            let paused = rx.answers_full() && write.is_open();
            if hook.is_none() {
                // Between hooks: what ended the write side, then what was read,
                // one hook at a time and in order.
                if let Some(exit) = write.exit.take() {
                    if let Flow::End = Box::pin(run.on_write_exit(exit)).await {
                        break;
                    }
                }
                let next = if read.is_drained() || paused { Next::Wait } else { run.next_hook(&mut read, &mut write) };
                match next {
                    Next::Hook(h) => hook = Some(h),
                    // Nothing more can come: the server's close is out and the
                    // peer's input is past reading.
                    Next::Wait if !run.reading && run.written.is_some() => break,
                    Next::Wait => {}
                    Next::End => break,
                }
            }
            let hook_running = hook.is_some();
            let open = write.is_open();
            let reading = run.reading && !hook_running && read.is_drained() && !paused;
            if let Some(deadline) = run.deadline {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
            }
            let timed = open || (run.deadline.is_some() && !hook_running);
            let event = tokio::select! {
                biased;
                () = async { if let Some(h) = hook.as_mut() { h.await } }, if hook_running => Event::HookDone,
                () = timer.as_mut(), if timed => if open { Event::Tick } else { Event::Deadline },
                event = poll_fn(|cx| poll_io(cx, &mut io, &mut read, &mut write, &mut rx, reading, paused)) => event,
            };
            match event {
                Event::HookDone => hook = None,
                Event::CloseAsked | Event::SendersGone => write.begin_close(&mut rx, None),
                Event::Tick => {
                    let next = next_tick(timer.deadline(), Instant::now(), heartbeat);
                    timer.as_mut().reset(next);
                    // What bursts left behind goes back once per heartbeat, not
                    // after each batch, where the next burst would grow it again.
                    shrink_idle(&mut read.inbox);
                    shrink_idle(&mut write.batch.frames);
                    rx.frames.release_idle();
                    if read.last_heard.elapsed() >= heartbeat * 2 {
                        // The peer was silent for two heartbeats: close it (3008).
                        peer.outbox().close_now(close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                        write.begin_close(&mut rx, None);
                    } else {
                        write.ping_due = true;
                    }
                }
                Event::Deadline => break,
                // Handed to the hooks at the top of the loop.
                Event::Read | Event::Resumed => {}
                Event::Written(result) => {
                    write.after_batch(result, &mut rx.frames);
                    if write.exit.is_some() {
                        // Nothing more will be written: a hook waiting for the
                        // peer's answers to drain (a replay's next page) must
                        // not wait for ever, and nothing more is queued.
                        peer.outbox().close_now(close_code::GOING_AWAY, "connection closed");
                    }
                }
            }
        }

        let details = Box::pin(run.finish(&mut io, &mut write, &mut rx)).await;
        peer.leave_all();
        state.unregister_peer(peer.id());
        tracing::debug!(peer = %peer, code = details.code, reason = %details.reason, "close");
        Box::pin(hooks.close(peer, details)).await;
        if matches!(run.written.as_deref(), Some(WriterExit::Closed(_))) {
            Box::pin(linger(&mut io)).await;
        }
        drop(held);
    })
}

/// When the heartbeat ticks next after the tick due at `due` came at `now`:
/// what `Interval` does with `MissedTickBehavior::Delay` (a tick more than
/// 5 ms late puts the next one a whole heartbeat after it).
fn next_tick(due: Instant, now: Instant, heartbeat: Duration) -> Instant {
    if now > due + Duration::from_millis(5) {
        now + heartbeat
    } else {
        due + heartbeat
    }
}

/// What woke the connection.
enum Event {
    HookDone,
    CloseAsked,
    /// Every sender of the queue is gone, and it is empty.
    SendersGone,
    Tick,
    Deadline,
    /// The reader has something for the hooks, or the reading ended.
    Read,
    /// The peer's answers drained below the limit: reading goes on.
    Resumed,
    /// A batch was written (or its write failed) that the loop acts on:
    /// one of the close, the pongs the reading waits for, or a pause.
    Written(io::Result<()>),
}

/// One poll of the socket, both ways: the queue into the socket, then (when
/// the connection wants input) a read. `paused`: the loop found the peer's
/// answers backed up; once the write side has drained them (in this very
/// poll: it settles what it wrote), the loop is told.
fn poll_io(
    cx: &mut Context<'_>,
    io: &mut Io,
    read: &mut ReadSide,
    write: &mut WriteSide,
    rx: &mut OutboxReceiver,
    reading: bool,
    paused: bool,
) -> Poll<Event> {
    if let Poll::Ready(event) = write.poll_send(cx, io, rx) {
        return Poll::Ready(event);
    }
    if paused && !rx.answers_full() {
        return Poll::Ready(Event::Resumed);
    }
    if reading {
        if let Poll::Ready(()) = read.poll_read(cx, io) {
            return Poll::Ready(Event::Read);
        }
    }
    Poll::Pending
}

/// Whether the connection's loop goes on.
enum Flow {
    Continue,
    End,
}

/// What the connection does next between hooks.
enum Next<'a> {
    Hook(HookFuture<'a>),
    Wait,
    End,
}

/// How reading ended.
enum ReadEnd {
    /// The peer broke the protocol.
    Failed(ReadError),
    /// The socket is gone (end of stream, or an error).
    Gone,
}

/// The connection's reading: the reader's state and what it completed
/// that the hooks have not had yet.
struct ReadSide {
    reader: MessageReader,
    /// Complete messages and control frames, oldest first; empty
    /// (unallocated) while the peer is idle.
    inbox: VecDeque<Received>,
    /// Set once reading has ended; acted on once `inbox` is drained.
    end: Option<ReadEnd>,
    /// When the peer was last heard from: what the heartbeat checks.
    last_heard: Instant,
    /// The most one read takes (the configured read size).
    max_read: usize,
}

impl ReadSide {
    fn new(reader: MessageReader, max_read: usize) -> Self {
        Self { reader, inbox: VecDeque::new(), end: None, last_heard: Instant::now(), max_read }
    }

    /// Whether everything read has been handed on, and reading may go on.
    fn is_drained(&self) -> bool {
        self.inbox.is_empty() && self.end.is_none()
    }

    /// Reads until a message, a control frame or the end is complete, or
    /// the socket has nothing more now.
    fn poll_read(&mut self, cx: &mut Context<'_>, io: &mut Io) -> Poll<()> {
        while self.is_drained() {
            let max_read = self.max_read;
            ready!(with_scratch(|scratch| {
                let len = max_read.min(scratch.len());
                let mut buf = ReadBuf::new(&mut scratch[..len]);
                match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "socket error");
                        self.end = Some(ReadEnd::Gone);
                    }
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => self.end = Some(ReadEnd::Gone),
                    Poll::Ready(Ok(())) => self.received(buf.filled()),
                }
                Poll::Ready(())
            }));
        }
        Poll::Ready(())
    }

    /// Hands bytes from the socket to the reader.
    fn received(&mut self, bytes: &[u8]) {
        // Any bytes count as a sign of life, the heartbeat's pongs among them.
        self.last_heard = Instant::now();
        if let Err(e) = self.reader.read(bytes, &mut self.inbox) {
            self.end = Some(ReadEnd::Failed(e));
        }
    }
}

/// Takes the socket out of hyper's wrapper when it is the listener's own
/// stream (whose box and buffer an idle peer would otherwise hold; the
/// listener gave it its write timeout); the bytes hyper read past the
/// handshake go to `read` first. Any other listener's (a mounted service)
/// keeps hyper's wrapper, with the write timeout around it, boxed so that
/// the listener's own, the common case, is no bigger for it.
fn socket(upgraded: Upgraded, write_timeout: Duration, read: &mut ReadSide) -> Io {
    match upgraded.downcast::<TokioIo<WriteTimeout<TcpStream>>>() {
        Ok(parts) => {
            if !parts.read_buf.is_empty() {
                read.received(&parts.read_buf);
            }
            Either::Left(parts.io.into_inner())
        }
        Err(upgraded) => Either::Right(Box::new(WriteTimeout::new(TokioIo::new(upgraded), Some(write_timeout)))),
    }
}

/// How the write side ended.
enum WriterExit {
    /// It sent this close frame (or the socket refused it: the peer closed first).
    Closed(CloseFrame),
    /// The socket took no byte for the write timeout; nothing more can be sent.
    Stalled(Duration),
    /// Writing to the socket failed.
    Failed(String),
}

/// The peer's close frame, as the hooks hear of it and as echoed.
struct PeerClose {
    details: CloseDetails,
    /// The echo, until the write side takes it as the server's close.
    echo: Option<Frame>,
}

/// What the connection has learnt so far about how it ends.
struct Run<'a, H: Hooks> {
    state: &'a ServerState,
    hooks: &'a H,
    peer: &'a Peer<H::Context>,
    /// The peer's close, once it sent one (boxed, as what follows: only a
    /// closing connection has any).
    peer_close: Option<Box<PeerClose>>,
    /// How the write side ended, once the connection has acted on it.
    written: Option<Box<WriterExit>>,
    reading: bool,
    /// Set once the server's close frame is out: how long to wait for the reply.
    deadline: Option<Instant>,
}

impl<'a, H: Hooks> Run<'a, H> {
    fn new(state: &'a ServerState, hooks: &'a H, peer: &'a Peer<H::Context>) -> Self {
        Self { state, hooks, peer, peer_close: None, written: None, reading: true, deadline: None }
    }

    /// Hands on what was read, up to the next hook to run: pings are
    /// answered (by the write side), pongs were a sign of life only.
    fn next_hook(&mut self, read: &mut ReadSide, write: &mut WriteSide) -> Next<'a> {
        let (hooks, peer) = (self.hooks, self.peer);
        while let Some(received) = read.inbox.pop_front() {
            let message = match received {
                Received::Text(text) => Message::from_text_frame(text),
                Received::Binary(data) => Message::Binary(data),
                Received::Ping(payload) => {
                    if !write.pong(&payload) {
                        // Enough pongs are owed already: the rest of what was
                        // read waits until they are out.
                        read.inbox.push_front(Received::Ping(payload));
                        return Next::Wait;
                    }
                    continue;
                }
                Received::Pong => continue,
                Received::Close(frame) => {
                    self.peer_closed(frame);
                    return Next::End;
                }
            };
            // Once the server has decided to close the peer, its frames are
            // read (so the close handshake completes) but not acted on: an
            // expired token publishes nothing.
            if !peer.outbox().is_closing() {
                return Next::Hook(Box::pin(hooks.message(peer, message)));
            }
        }
        match read.end.take() {
            None => Next::Wait,
            Some(ReadEnd::Gone) => Next::End,
            Some(ReadEnd::Failed(e)) => {
                // The rest is read raw by the lingering close, once the close frame is out.
                self.reading = false;
                let (error, code) = classify(e, self.state.config.max_message_size);
                tracing::debug!(peer = %peer, %error, "connection error");
                Next::Hook(Box::pin(async move {
                    hooks.error(peer, &error).await;
                    peer.outbox().close(code, &close_reason(&error));
                }))
            }
        }
    }

    /// The peer's close: the handshake is complete once the echo is out.
    fn peer_closed(&mut self, frame: Option<CloseFrame>) {
        let (details, echo) = match frame {
            Some(f) => {
                let code = u16::from(f.code);
                (CloseDetails { code, reason: f.reason.to_string() }, Frame::close(code, &f.reason))
            }
            None => (CloseDetails { code: 1005, reason: String::new() }, Frame::close_without_code()),
        };
        self.peer_close = Some(Box::new(PeerClose { details, echo: Some(echo) }));
    }

    async fn on_write_exit(&mut self, exit: Box<WriterExit>) -> Flow {
        let flow = match &*exit {
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
                Flow::End
            }
            WriterExit::Failed(error) => {
                tracing::debug!(peer = %self.peer, %error, "write failed");
                Flow::End
            }
        };
        self.written = Some(exit);
        flow
    }

    /// Ends the write side if it still runs (the peer closed first, or its
    /// socket is gone): the echo of the peer's close, or the server's own,
    /// goes out if the socket takes it within the close timeout. Says how
    /// the connection ended.
    async fn finish(&mut self, io: &mut Io, write: &mut WriteSide, rx: &mut OutboxReceiver) -> CloseDetails {
        if self.written.is_none() {
            self.peer.outbox().close_now(close_code::GOING_AWAY, "connection closed");
            write.begin_close(rx, self.peer_close.as_mut().and_then(|p| p.echo.take()));
            if let Ok(exit) = timeout(CLOSE_TIMEOUT, write.close(io, &mut rx.frames)).await {
                self.written = Some(exit);
            }
        }
        match (self.peer_close.take(), self.written.as_deref()) {
            (Some(peer_close), _) => peer_close.details,
            (None, Some(WriterExit::Closed(f))) => CloseDetails { code: f.code.into(), reason: f.reason.to_string() },
            (None, Some(WriterExit::Stalled(_))) => CloseDetails { code: 1006, reason: "write timeout".to_owned() },
            (None, _) => CloseDetails { code: 1006, reason: String::new() },
        }
    }
}

/// The lingering close: shut the write side (the close frame is out), then
/// read and discard until the client closes too, for a bounded time.
async fn linger(io: &mut Io) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        let _ = poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await;
        poll_fn(|cx| loop {
            let more = ready!(with_scratch(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                Pin::new(&mut *io).poll_read(cx, &mut buf).map(|r| r.is_ok() && !buf.filled().is_empty())
            }));
            if !more {
                return Poll::Ready(());
            }
        })
        .await;
    })
    .await;
}

/// Turns a read error into what to tell the hooks and the close code to send.
fn classify(error: ReadError, limit: usize) -> (PeerError, u16) {
    match error {
        ReadError::TooBig { size, .. } => (PeerError::MessageTooBig { size, limit }, close_code::MESSAGE_TOO_BIG),
        ReadError::Utf8 { .. } => (PeerError::Protocol(error.to_string()), 1007),
        ReadError::Protocol(_) | ReadError::Header(_) => {
            (PeerError::Protocol(error.to_string()), close_code::PROTOCOL_ERROR)
        }
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

/// The server's close as the write side sends it.
struct Closing {
    /// What the server asked for (or, after the peer's close, what it would have).
    frame: CloseFrame,
    /// The frame that goes last: the server's close, or the echo of the peer's.
    last: Frame,
    /// Whether what is still queued goes out before it.
    flush: bool,
    /// Whether `last` is in the batch.
    queued: bool,
}

/// One peer's write side: the frames taken and not yet written, the
/// connection's own frames waiting for the next batch, and how it ends.
struct WriteSide {
    batch: Pending,
    ping_due: bool,
    /// Answers to pings read, for the next batch; empty (unallocated) while idle.
    pongs: Vec<Frame>,
    /// Whether the batch carries pongs: the reading may be waiting for them
    /// to be out (see [`MAX_PONGS`]), so their write is an event of its own.
    answering: bool,
    /// Set once a close was asked for (or the heartbeat was lost).
    closing: Option<Box<Closing>>,
    /// How it ended, until the connection acts on it (boxed: an open
    /// connection has none, and it is a close frame wide).
    exit: Option<Box<WriterExit>>,
    /// The most bytes one `writev` is handed.
    max_batch_bytes: usize,
    /// Only to say how long a stalled socket was given.
    write_timeout: Duration,
}

impl WriteSide {
    fn new(state: &ServerState) -> Self {
        Self {
            batch: Pending::default(),
            ping_due: false,
            pongs: Vec::new(),
            answering: false,
            closing: None,
            exit: None,
            max_batch_bytes: state.config.write_buffer_size.max(1),
            write_timeout: state.config.write_timeout,
        }
    }

    /// Whether it still takes queued traffic (no close decided, not ended).
    fn is_open(&self) -> bool {
        self.closing.is_none() && self.exit.is_none()
    }

    /// Queues the answer to a ping (none once the server's close is
    /// decided); false, queuing nothing, while [`MAX_PONGS`] are owed.
    fn pong(&mut self, payload: &Bytes) -> bool {
        if !self.is_open() {
            return true;
        }
        if self.pongs.len() >= MAX_PONGS {
            return false;
        }
        self.pongs.push(Frame::pong(payload));
        true
    }

    /// Writes the batch in flight and, while the connection is open, takes
    /// the next from the queue as soon as one is out, until the socket or
    /// the queue has nothing more now: a wake-up for queued frames costs one
    /// poll, one lock to take them and one to find the queue empty (which
    /// settles what was taken, see `outbox`). Ready
    /// with what the connection's loop must act on; pending otherwise (with
    /// the task registered for the queue's next wake-up).
    fn poll_send(&mut self, cx: &mut Context<'_>, io: &mut Io, rx: &mut OutboxReceiver) -> Poll<Event> {
        if self.exit.is_some() {
            return Poll::Pending;
        }
        // A close request overtakes the batch in flight (a verdict drops the
        // rest of it); asked at every poll, lock-free.
        if self.is_open() && rx.poll_close(cx).is_ready() {
            return Poll::Ready(Event::CloseAsked);
        }
        let mut writes = WRITES_PER_POLL;
        loop {
            if !self.batch.frames.is_empty() {
                match self.batch.poll_write_all(cx, io, self.max_batch_bytes, &mut writes) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if self.is_open() => {
                        if std::mem::take(&mut self.answering) {
                            return Poll::Ready(Event::Written(Ok(())));
                        }
                    }
                    Poll::Ready(result) => return Poll::Ready(Event::Written(result)),
                }
            }
            if !self.is_open() {
                return Poll::Pending;
            }
            self.stage_own();
            match rx.poll_take(cx, &mut self.batch.frames, usize::MAX) {
                Poll::Ready(Wake::Close) => return Poll::Ready(Event::CloseAsked),
                Poll::Ready(Wake::Frames) => {}
                // What the connection owes the peer goes out first.
                _ if !self.batch.frames.is_empty() => {}
                Poll::Ready(Wake::Ended) => return Poll::Ready(Event::SendersGone),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Puts the connection's own frames first into the next batch: the
    /// heartbeat's ping and the pongs (they answer what was already read,
    /// and must not wait behind a backlog the peer may be slow to take).
    fn stage_own(&mut self) {
        if std::mem::take(&mut self.ping_due) {
            self.batch.frames.push_back(Frame::ping().into());
        }
        if !self.pongs.is_empty() {
            self.answering = true;
            self.batch.frames.extend(self.pongs.drain(..).map(Queued::from));
            if self.pongs.capacity() > MAX_PONGS {
                self.pongs = Vec::new();
            }
        }
    }

    /// Turns to closing: `echo` is the echo of the peer's close, which then
    /// is the server's close frame (a second would break the handshake).
    fn begin_close(&mut self, rx: &mut OutboxReceiver, echo: Option<Frame>) {
        if self.exit.is_some() {
            return;
        }
        if let Some(closing) = &mut self.closing {
            // The peer closed while the server's close was on its way:
            // nothing more before it.
            if echo.is_some() && closing.flush && !closing.queued {
                closing.flush = false;
                self.batch.keep_started();
            }
            return;
        }
        let (frame, flush) = match rx.closing() {
            Some(c) => (c.frame, c.flush),
            None => (CloseFrame { code: CloseCode::Normal, reason: "".into() }, true),
        };
        // A frame partly written must be finished, or the stream is corrupt;
        // the rest of the batch goes only with a graceful close, and never
        // after the peer's close (the echo must be the last frame).
        let flush = flush && echo.is_none();
        if !flush {
            self.batch.keep_started();
        }
        self.ping_due = false;
        if echo.is_some() {
            self.pongs = Vec::new();
        } else {
            self.batch.frames.extend(self.pongs.drain(..).map(Queued::from));
        }
        let last = echo.unwrap_or_else(|| Frame::close(u16::from(frame.code), &frame.reason));
        self.closing = Some(Box::new(Closing { frame, last, flush, queued: false }));
        if self.batch.frames.is_empty() {
            self.advance_close(&mut rx.frames);
        }
    }

    /// Once a batch of the close is written: more of the queue (for a
    /// graceful close), then the close frame, then the end.
    fn advance_close(&mut self, rx: &mut FrameReceiver) {
        let Some(closing) = &mut self.closing else { return };
        if closing.flush && rx.take(&mut self.batch.frames, usize::MAX) > 0 {
            return;
        }
        if !closing.queued {
            closing.queued = true;
            self.batch.frames.push_back(closing.last.clone().into());
            return;
        }
        self.exit = Some(Box::new(WriterExit::Closed(closing.frame.clone())));
    }

    /// Acts on a batch's write: the next step, or the end.
    fn after_batch(&mut self, result: io::Result<()>, rx: &mut FrameReceiver) {
        match result {
            Ok(()) if self.closing.is_some() => self.advance_close(rx),
            Ok(()) => {}
            Err(e) => {
                self.exit = Some(Box::new(match &self.closing {
                    _ if is_stall(&e) => WriterExit::Stalled(self.write_timeout),
                    // Any other failure while closing: the peer closed first; its close is what counts.
                    Some(closing) => WriterExit::Closed(closing.frame.clone()),
                    None => WriterExit::Failed(e.to_string()),
                }));
            }
        }
        if self.exit.is_some() {
            self.batch = Pending::default();
        }
    }

    /// Writes the close through to its end (once [`begin_close`](Self::begin_close)).
    /// Written as long as the socket keeps taking bytes: a peer that was cut
    /// for being slow still gets its close frame once it reads again.
    async fn close(&mut self, io: &mut Io, rx: &mut FrameReceiver) -> Box<WriterExit> {
        loop {
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            let max = self.max_batch_bytes;
            let result = poll_fn(|cx| {
                let mut writes = WRITES_PER_POLL;
                self.batch.poll_write_all(cx, io, max, &mut writes)
            })
            .await;
            self.after_batch(result, rx);
        }
    }
}

/// Whether a write failed because the socket took no byte for the write timeout.
fn is_stall(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::TimedOut
}

/// The frames the write side has taken and not yet fully written. All of
/// its progress lives here, not in a future: a write interrupted by a close
/// request resumes exactly where the socket stopped taking bytes.
#[derive(Default)]
struct Pending {
    frames: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    offset: usize,
}

/// One slice of a `writev`: bytes in place, or a range of the cork buffer.
#[derive(Clone, Copy)]
enum Segment<'a> {
    Wire(&'a [u8]),
    Cork(usize, usize),
}

impl<'a> Segment<'a> {
    fn slice(&self, cork: &'a [u8]) -> IoSlice<'a> {
        match *self {
            Segment::Cork(start, end) => IoSlice::new(&cork[start..end]),
            Segment::Wire(wire) => IoSlice::new(wire),
        }
    }
}

impl Pending {
    /// Writes every frame, a `writev` of up to [`MAX_IOV`] slices at a time,
    /// and flushes. Each `writev` spends one of `writes`; with none left it
    /// is pending, with the task woken to come back after the others.
    fn poll_write_all<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut S,
        max_bytes: usize,
        writes: &mut usize,
    ) -> Poll<io::Result<()>> {
        while !self.frames.is_empty() {
            if *writes == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            *writes -= 1;
            match self.poll_writev(cx, sink, max_bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(sink).poll_flush(cx)
    }

    /// One `writev` of the frames at the front, as many as fit [`MAX_IOV`]
    /// slices and `max_bytes`: runs of small frames are copied into the
    /// worker's cork buffer first, and leave as one slice each.
    fn poll_writev<S: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        sink: &mut S,
        max_bytes: usize,
    ) -> Poll<io::Result<usize>> {
        let mut wires =
            self.frames.iter().enumerate().map(|(i, q)| &q.frame.as_wire()[if i == 0 { self.offset } else { 0 }..]);
        if self.frames.len() == 1 {
            // Nothing to put together.
            let wire = wires.next().unwrap_or_default();
            return Pin::new(&mut *sink).poll_write_vectored(cx, &[IoSlice::new(wire)]);
        }
        CORK.with(|cork| {
            // Polls do not nest (see `with_scratch`); were it ever borrowed,
            // each frame would go as a slice of its own.
            let mut cork = cork.try_borrow_mut();
            let cork: &mut [u8] = match &mut cork {
                Ok(buf) => buf,
                Err(_) => &mut [],
            };
            // The plan first (the copies need the buffer mutable), then the
            // slices over it.
            let mut plan = [Segment::Cork(0, 0); MAX_IOV];
            let (mut planned, mut corked, mut bytes) = (0, 0, 0);
            for wire in wires {
                if planned > 0 && bytes + wire.len() > max_bytes {
                    break;
                }
                let end = corked + wire.len();
                if wire.len() <= CORK_FRAME && end <= cork.len() {
                    match plan[..planned].last_mut() {
                        Some(Segment::Cork(_, last)) => *last = end,
                        _ if planned < MAX_IOV => {
                            plan[planned] = Segment::Cork(corked, end);
                            planned += 1;
                        }
                        _ => break,
                    }
                    cork[corked..end].copy_from_slice(wire);
                    corked = end;
                } else if planned < MAX_IOV {
                    plan[planned] = Segment::Wire(wire);
                    planned += 1;
                } else {
                    break;
                }
                bytes += wire.len();
            }
            // The slices live only for this call, so the write side's future
            // carries no slice array while it waits.
            let cork = &cork[..corked];
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            plan[..planned].iter().zip(&mut slices).for_each(|(segment, s)| *s = segment.slice(cork));
            Pin::new(&mut *sink).poll_write_vectored(cx, &slices[..planned])
        })
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
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, IoSlice},
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{Pending, CORK_FRAME, CORK_SIZE, MAX_IOV};
    use crate::{frame::Frame, PubSub, Server, ServerConfig};

    /// A socket that takes at most `per_write` bytes per call, and says
    /// "wait" every other call when `stalls`: what it took, and the slices
    /// of each call.
    struct Sink {
        per_write: usize,
        stalls: bool,
        stalled: bool,
        taken: Vec<u8>,
        calls: Vec<usize>,
    }

    impl AsyncWrite for Sink {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            assert!(slices.len() <= MAX_IOV);
            if self.stalls {
                self.stalled = !self.stalled;
                if self.stalled {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            self.calls.push(slices.len());
            let mut left = self.per_write;
            for slice in slices {
                let n = slice.len().min(left);
                self.taken.extend_from_slice(&slice[..n]);
                left -= n;
            }
            Poll::Ready(Ok(self.per_write - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Small frames are put together and large ones go in place; whatever
    /// the socket takes per call, and wherever it stops, the bytes on the
    /// wire are the frames' own, in order.
    #[tokio::test]
    async fn corked_and_in_place_frames_leave_as_the_same_bytes() {
        let sizes = [0, 1, 20, 123, CORK_FRAME - 2, CORK_FRAME - 1, CORK_FRAME, 300, 4000, 70_000];
        let mut frames: Vec<Frame> =
            sizes.iter().map(|&n| Frame::text("é".repeat(n / 2) + &"x".repeat(n % 2))).collect();
        // More small bytes than the cork holds, then a mix.
        frames.extend((0..2 * CORK_SIZE / 100).map(|i| Frame::binary(&[i as u8; 98])));
        frames.extend(sizes.iter().rev().map(|&n| Frame::binary(&vec![7; n])));
        for per_write in [1, 7, 100, 1000, 65_536, usize::MAX / 2] {
            // (A byte or a few at a time through 200 KB would take minutes.)
            let frames = if per_write < 100 { &frames[..8] } else { &frames[..] };
            let expected: Vec<u8> = frames.iter().flat_map(|f| f.as_wire().to_vec()).collect();
            for stalls in [false, true] {
                let mut sink = Sink { per_write, stalls, stalled: false, taken: Vec::new(), calls: Vec::new() };
                let mut pending = Pending::default();
                pending.frames.extend(frames.iter().cloned().map(Into::into));
                // (Three writes a poll: a budget spent resumes where it stopped.)
                std::future::poll_fn(|cx| pending.poll_write_all(cx, &mut sink, 64 * 1024, &mut 3)).await.unwrap();
                assert!(sink.taken == expected, "{per_write} bytes per write, stalls: {stalls}");
                assert!(pending.frames.is_empty() && pending.offset == 0);
            }
        }
    }

    /// A batch of small frames is one slice: the kernel is handed one
    /// buffer, not 64.
    #[tokio::test]
    async fn a_batch_of_small_frames_is_one_slice() {
        let mut sink =
            Sink { per_write: usize::MAX / 2, stalls: false, stalled: false, taken: Vec::new(), calls: Vec::new() };
        let mut pending = Pending::default();
        pending.frames.extend((0..64).map(|i| Frame::text(format!("message {i}")).into()));
        pending.frames.push_back(Frame::binary(&[1; 1000]).into());
        pending.frames.extend((0..3).map(|i| Frame::text(format!("after {i}")).into()));
        std::future::poll_fn(|cx| pending.poll_write_all(cx, &mut sink, 64 * 1024, &mut 1)).await.unwrap();
        assert_eq!(sink.calls, [3]);
    }

    /// The bytes a client sent right behind its handshake, which hyper read
    /// with it, are the connection's first input: a ping there is answered.
    #[tokio::test]
    async fn a_frame_sent_with_the_handshake_is_read() {
        let config = ServerConfig { addr: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
        let server = Server::new(config.clone(), PubSub::new(&config)).bind().await.unwrap();
        let addr = server.local_addr();
        let running = tokio::spawn(server.run_until(std::future::pending()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut bytes = format!(
            "GET /_ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes();
        // A masked ping, "hi".
        let mask = [1, 2, 3, 4];
        bytes.extend_from_slice(&[0x89, 0x80 | 2]);
        bytes.extend_from_slice(&mask);
        bytes.extend(b"hi".iter().zip(mask).map(|(b, m)| b ^ m));
        stream.write_all(&bytes).await.unwrap();

        // The server's frames (unmasked) after the 101, the pong among them.
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let pong = 'read: loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
            let mut frames = &got[end + 4..];
            while frames.len() >= 2 {
                let (len, at) = match frames[1] {
                    126 if frames.len() >= 4 => (usize::from(u16::from_be_bytes([frames[2], frames[3]])), 4),
                    126 => continue 'read,
                    len => (usize::from(len), 2),
                };
                if frames.len() < at + len {
                    continue 'read;
                }
                if frames[0] == 0x8a {
                    break 'read frames[at..at + len].to_vec();
                }
                frames = &frames[at + len..];
            }
        };
        assert_eq!(pong, b"hi");
        running.abort();
    }
}
