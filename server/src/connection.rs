//! One peer's connection after the upgrade: its read loop, which feeds the
//! hooks, and its write loop, which drains the peer's outbound queue into the
//! socket in batches and keeps the heartbeat.

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
use tokio::time::{timeout, Instant};
use tokio_tungstenite::{
    tungstenite::{
        self,
        error::{CapacityError, Error as WsError},
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
    },
    WebSocketStream,
};

use crate::{
    hooks::{CloseDetails, Hooks, Message, PeerError},
    peer::{FrameReceiver, OutboxReceiver},
    shutdown::Shutdown,
    Peer, ServerState,
};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How many queued frames the write loop hands tungstenite before one flush:
/// under load, one syscall carries many frames.
const WRITE_BATCH: usize = 64;

/// How long a closing connection may take to flush its last frames and the
/// close frame, and then to receive the peer's close reply.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// When the peer was last heard from, as milliseconds since the connection
/// started; shared by the read loop (which writes it) and the heartbeat.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// How the write loop ended.
enum WriterExit {
    /// It sent (or tried to send) this close frame.
    Closed(CloseFrame),
    /// Writing to the socket failed.
    Failed(String),
}

/// Runs a peer from the completed upgrade to the end of its connection.
pub(crate) async fn serve<H: Hooks>(
    state: Arc<ServerState>,
    hooks: Arc<H>,
    upgraded: Upgraded,
    peer: Peer<H::Context>,
    outbox_rx: OutboxReceiver,
    mut shutdown: Shutdown,
) {
    let socket = Socket::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(state.ws_config())).await;
    let (sink, mut stream) = socket.split();
    let activity = Arc::new(Activity::new());
    let mut writer =
        tokio::spawn(write_loop(sink, outbox_rx, peer.outbox().clone(), state.config.heartbeat, Arc::clone(&activity)));
    tracing::debug!(peer = %peer, remote = %peer.remote_addr(), "open");
    hooks.open(&peer).await;

    let mut peer_close: Option<CloseDetails> = None;
    let mut writer_exit: Option<WriterExit> = None;
    let mut deadline: Option<Instant> = None;
    // `Shutdown::recv` returns at once after it has fired, so the branch must
    // switch itself off or the loop would spin.
    let mut shutting_down = false;
    loop {
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = stream.next() => {
                activity.touch();
                match next {
                    Some(Ok(tungstenite::Message::Text(t))) => hooks.message(&peer, Message::from(t)).await,
                    Some(Ok(tungstenite::Message::Binary(b))) => hooks.message(&peer, Message::from(b)).await,
                    Some(Ok(tungstenite::Message::Close(frame))) => {
                        // tungstenite queues the close reply itself; it goes out on the next poll.
                        peer_close.get_or_insert(match frame {
                            Some(f) => CloseDetails { code: f.code.into(), reason: f.reason.to_string() },
                            None => CloseDetails { code: 1005, reason: String::new() },
                        });
                    }
                    Some(Ok(_)) => {} // ping/pong: answered by tungstenite, counted as activity above
                    Some(Err(e)) => {
                        if let Some((error, code)) = classify(e, state.config.max_message_size) {
                            tracing::debug!(peer = %peer, %error, "connection error");
                            hooks.error(&peer, &error).await;
                            peer.outbox().close(code, &close_reason(&error));
                        }
                        if writer_exit.is_some() {
                            break;
                        }
                        // Let the write loop send the close frame before the socket goes.
                        deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
                    }
                    None => break,
                }
            }
            exit = &mut writer, if writer_exit.is_none() => {
                let exit = exit.unwrap_or_else(|e| WriterExit::Failed(e.to_string()));
                match &exit {
                    WriterExit::Failed(error) => {
                        tracing::debug!(peer = %peer, %error, "write failed");
                        writer_exit = Some(exit);
                        break;
                    }
                    WriterExit::Closed(frame) => {
                        if let Some(error) = close_error(frame, &state) {
                            hooks.error(&peer, &error).await;
                        }
                    }
                }
                writer_exit = Some(exit);
                // Wait (bounded) for the peer's close reply, then let the socket go.
                deadline.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
            }
            _ = shutdown.recv(), if !shutting_down => {
                shutting_down = true;
                peer.outbox().close(close_code::GOING_AWAY, "server shutting down");
            }
            _ = until_deadline => break,
        }
    }

    if !writer.is_finished() && writer_exit.is_none() {
        // The peer closed first, or the socket broke: stop the write loop too.
        peer.outbox().close(close_code::GOING_AWAY, "connection closed");
        if timeout(CLOSE_TIMEOUT, &mut writer).await.is_err() {
            writer.abort();
        }
    }
    let details = match (peer_close, writer_exit) {
        (Some(details), _) => details,
        (None, Some(WriterExit::Closed(f))) => CloseDetails { code: f.code.into(), reason: f.reason.to_string() },
        (None, _) => CloseDetails { code: 1006, reason: String::new() },
    };
    peer.leave_all();
    state.unregister_peer(peer.id());
    tracing::debug!(peer = %peer, code = details.code, reason = %details.reason, "close");
    hooks.close(&peer, details).await;
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

async fn write_loop(
    mut sink: SplitSink<Socket, tungstenite::Message>,
    mut rx: OutboxReceiver,
    outbox: crate::peer::Outbox,
    heartbeat: Duration,
    activity: Arc<Activity>,
) -> WriterExit {
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Dropped before closing so the queue cannot keep itself alive.
    let outbox = Some(outbox);
    loop {
        tokio::select! {
            biased;
            _ = rx.close.changed() => break,
            frame = rx.frames.recv() => {
                let Some(frame) = frame else { break };
                let batch = write_batch(&mut sink, frame, &mut rx.frames);
                tokio::select! {
                    result = batch => if let Err(e) = result { return WriterExit::Failed(e.to_string()) },
                    // A slow peer may never take the batch: a close request overtakes it.
                    _ = rx.close.changed() => break,
                }
            }
            _ = ticker.tick() => {
                if activity.silent_for() >= heartbeat * 2 {
                    if let Some(outbox) = &outbox {
                        outbox.close(close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                    }
                    break;
                }
                if let Err(e) = sink.send(tungstenite::Message::Ping(Default::default())).await {
                    return WriterExit::Failed(e.to_string());
                }
            }
        }
    }
    drop(outbox);
    let frame = rx.close.borrow().clone().unwrap_or(CloseFrame { code: CloseCode::Normal, reason: "".into() });
    // Whatever was queued before the close still goes out first, within bounds.
    let _ = timeout(CLOSE_TIMEOUT, async {
        while let Some(queued) = rx.frames.try_recv() {
            sink.feed(queued).await?;
        }
        sink.send(tungstenite::Message::Close(Some(frame.clone()))).await
    })
    .await;
    WriterExit::Closed(frame)
}

async fn write_batch(
    sink: &mut SplitSink<Socket, tungstenite::Message>,
    first: tungstenite::Message,
    frames: &mut FrameReceiver,
) -> Result<(), WsError> {
    sink.feed(first).await?;
    for _ in 1..WRITE_BATCH {
        match frames.try_recv() {
            Some(frame) => sink.feed(frame).await?,
            None => break,
        }
    }
    sink.flush().await
}
