//! crosswire's server: WebSocket pub/sub on bare hyper 1.x and tokio.
//!
//! The WebSocket handshake is validated by hand ([`handshake`]), frames go
//! through tungstenite, and topic fan-out is done here: one encoded frame per
//! publish, shared by every subscriber, each with a bounded queue so a slow
//! reader never holds anyone else up.
//!
//! Two ways to use it:
//! - implement [`Hooks`] (crossws style: `upgrade`, `open`, `message`,
//!   `close`, `error`) and drive [`Peer`]s yourself, as the `seed` and `echo`
//!   examples do;
//! - run [`PubSub`], the typed protocol v1 of `crosswire-shared` that the
//!   `crosswire-server` binary and the `crosswire-client` browser library speak.
//!
//! ```no_run
//! use crosswire_server::{Config, PubSub, Server};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::default();
//! let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
//! println!("listening on {}", server.local_addr());
//! let handle = server.handle();
//! handle.publish(&"news".parse().unwrap(), &serde_json::json!({"headline": "hello"}))?;
//! server.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```

pub mod auth;
mod config;
mod connection;
pub mod handshake;
mod hooks;
mod limits;
mod listener;
mod origin;
mod outbox;
mod peer;
mod pubsub;
mod routes;
mod shutdown;
mod statics;
mod topics;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use crosswire_shared::{PresenceEntry, RawValue, Topic};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use config::{Args, Config, ConfigError};
pub use crosswire_shared as protocol;
pub use hooks::{CloseDetails, Hooks, Message, PeerError, UpgradeRequest};
pub use outbox::SendError;
pub use peer::Peer;
pub use pubsub::{PubSub, Session};
pub use routes::text_response;
pub use shutdown::shutdown_signal;
pub use topics::{Subscription, TopicError};

use outbox::Outbox;
use peer::PeerCore;
use shutdown::ShutdownController;
use topics::{Payload, Topics};

/// The HTTP response type hooks answer a refused upgrade with.
pub type HttpResponse = http::Response<http_body_util::Full<Bytes>>;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a [`ServerHandle::publish`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The data could not be encoded as JSON.
    #[error("cannot encode the data as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The topic would have been created past the topic cap.
    #[error(transparent)]
    Topic(#[from] TopicError),
}

/// A server not yet listening: a [`Config`] and the [`Hooks`] to run.
#[derive(Debug)]
pub struct Server<H> {
    config: Config,
    hooks: H,
}

impl<H: Hooks> Server<H> {
    /// A server running `hooks` with `config`.
    pub fn new(config: Config, hooks: H) -> Self {
        Self { config, hooks }
    }

    /// Binds the listening socket and starts accepting connections.
    pub async fn bind(self) -> Result<RunningServer, ServerError> {
        self.config.validate()?;
        limits::raise_open_file_limit(self.config.max_connections);
        let addr = self.config.addr;
        let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        let shutdown = ShutdownController::new();
        let state = Arc::new(ServerState {
            topics: Topics::new(self.config.topic_limits()),
            peers: Mutex::new(HashMap::new()),
            limit: Arc::new(Semaphore::new(self.config.max_connections)),
            per_ip: limits::IpLimiter::new(&self.config),
            origins: origin::OriginPolicy::new(&self.config),
            refusals: Arc::new(Semaphore::new(listener::MAX_REFUSALS_IN_FLIGHT)),
            shutdown: shutdown.handles(),
            queue_budget: outbox::QueueBudget::new(self.config.max_total_queue_bytes),
            config: self.config,
        });
        let accept = listener::Listener { listener, state: Arc::clone(&state), hooks: Arc::new(self.hooks) };
        state.shutdown.spawn(accept.run());
        state.shutdown.spawn(sweep(Arc::clone(&state)));
        tracing::info!(addr = %local_addr, path = %state.config.path, "crosswire listening");
        Ok(RunningServer { local_addr, handle: ServerHandle { state }, shutdown })
    }
}

/// Expires topic history in the background, so topics nobody touches again
/// are still forgotten.
async fn sweep(state: Arc<ServerState>) {
    let every = (state.config.history_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => { state.topics.sweep(); }
            _ = state.shutdown.cancelled() => return,
        }
    }
}

/// A listening server.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    handle: ServerHandle,
    shutdown: ShutdownController,
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to publish and inspect peers from outside the hooks.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Stops accepting, closes every peer with 1001 and waits for them to
    /// finish, at most `shutdown_grace`; then ends whatever still runs. When
    /// it returns, no task of this server's is left running.
    pub async fn shutdown(self) {
        let grace = self.handle.state.config.shutdown_grace;
        let peers = self.handle.state.peer_count();
        tracing::info!(peers, "shutting down");
        let drained = self.shutdown.drain(grace).await;
        match (drained.aborted, self.handle.state.peer_count()) {
            (0, _) => tracing::info!(peers, "shutdown complete: every connection closed"),
            (aborted, left) => tracing::warn!(
                ?grace,
                aborted,
                peers_cut = left,
                "shutdown grace period over: ended the tasks still running, their peers without a close handshake"
            ),
        }
    }
}

/// Shared state of one server: configuration, topics and the peer list.
pub(crate) struct ServerState {
    pub(crate) config: Config,
    pub(crate) topics: Topics,
    peers: Mutex<HashMap<Arc<str>, Arc<PeerCore>>>,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) per_ip: Arc<limits::IpLimiter>,
    pub(crate) origins: origin::OriginPolicy,
    /// Permits for the tasks answering connections refused at accept time.
    pub(crate) refusals: Arc<Semaphore>,
    /// How every task of this server is spawned, so shutdown reaches it.
    pub(crate) shutdown: shutdown::ShutdownHandles,
    /// Live bytes queued across every peer.
    pub(crate) queue_budget: Arc<outbox::QueueBudget>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").field("addr", &self.config.addr).finish_non_exhaustive()
    }
}

impl ServerState {
    pub(crate) fn ws_config(&self) -> WebSocketConfig {
        let limit = self.config.max_message_size;
        WebSocketConfig::default()
            .read_buffer_size(self.config.read_buffer_size)
            .write_buffer_size(self.config.write_buffer_size)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit))
    }

    /// Adds a peer under a fresh random id.
    pub(crate) fn register_peer(&self, remote: SocketAddr, outbox: Outbox, user: Option<Arc<str>>) -> Arc<PeerCore> {
        let mut peers = self.peers.lock().expect("peer list lock");
        let id: Arc<str> = loop {
            // Random rather than sequential: ids are visible to other peers
            // (`from`, presence) and should not reveal connection counts.
            let id: Arc<str> = format!("{:012x}", rand::random::<u64>() >> 16).into();
            if !peers.contains_key(&id) {
                break id;
            }
        };
        let core = Arc::new(PeerCore { id: id.clone(), remote, outbox, topics: Mutex::new(BTreeSet::new()), user });
        peers.insert(id, Arc::clone(&core));
        core
    }

    pub(crate) fn unregister_peer(&self, id: &str) {
        self.peers.lock().expect("peer list lock").remove(id);
    }

    fn peer_count(&self) -> usize {
        self.peers.lock().expect("peer list lock").len()
    }
}

/// Publishes and inspects peers from outside the hooks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    state: Arc<ServerState>,
}

/// A connected peer, as [`ServerHandle::peers`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's id.
    pub id: String,
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// The topics it is subscribed to.
    pub topics: Vec<Topic>,
    /// Whether the server has started closing it (slow consumer, shutdown, …).
    pub closing: bool,
    /// Live frames waiting in its outbound queue (answers and replays not counted).
    pub queued_frames: usize,
    /// Their payload bytes: what the `max_queue_bytes` bound applies to.
    pub queued_bytes: usize,
}

impl ServerHandle {
    /// Publishes `data` to every subscriber of `topic` as a protocol `message`
    /// frame from `"server"`; returns the seq it got.
    pub fn publish(&self, topic: &Topic, data: &impl serde::Serialize) -> Result<u64, PublishError> {
        let raw = serde_json::value::to_raw_value(data)?;
        Ok(self.publish_raw_value(topic, &raw)?)
    }

    /// Like [`publish`](Self::publish), for data that is already JSON text.
    pub fn publish_raw_value(&self, topic: &Topic, data: &RawValue) -> Result<u64, TopicError> {
        Ok(self.state.topics.publish(topic, None, Payload::Data { from: "server", data })?.seq)
    }

    /// Sends `message` verbatim to every subscriber of `topic` (no protocol
    /// framing, as crossws's `publish`); returns how many it was queued for.
    pub fn publish_message(&self, topic: &Topic, message: impl Into<Message>) -> usize {
        // A raw publish never creates a topic, so it never meets the topic cap.
        self.state.topics.publish(topic, None, Payload::Raw(message.into().0)).map_or(0, |p| p.delivered)
    }

    /// Every connected peer, in id order.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let peers = self.state.peers.lock().expect("peer list lock");
        let mut list: Vec<_> = peers
            .values()
            .map(|p| {
                let backlog = p.outbox.backlog();
                PeerInfo {
                    id: p.id.to_string(),
                    remote_addr: p.remote,
                    user: p.user.as_deref().map(str::to_owned),
                    topics: p.topics.lock().expect("topic set lock").iter().cloned().collect(),
                    closing: p.outbox.is_closing(),
                    queued_frames: backlog.frames,
                    queued_bytes: backlog.bytes,
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Who is subscribed to `topic`.
    pub fn presence(&self, topic: &Topic) -> Vec<PresenceEntry> {
        self.state.topics.presence(topic)
    }

    /// How many topics exist (with subscribers, retained history, or an
    /// epoch someone may come back to).
    pub fn topic_count(&self) -> usize {
        self.state.topics.len()
    }

    /// Live bytes queued for peers now, server-wide, as the queues reserved
    /// them (bounded by [`Config::max_total_queue_bytes`]).
    pub fn queued_bytes(&self) -> usize {
        self.state.queue_budget.reserved()
    }

    /// Bytes of history retained now, server-wide (bounded by
    /// [`Config::history_memory_bytes`]).
    pub fn history_bytes(&self) -> usize {
        self.state.topics.retained_bytes()
    }

    /// Closes a peer's connection now: what is still queued for it is dropped
    /// and the close frame goes next. False if no such peer is connected.
    pub fn disconnect(&self, peer: &str, code: u16, reason: &str) -> bool {
        let peers = self.state.peers.lock().expect("peer list lock");
        match peers.get(peer) {
            Some(entry) => {
                entry.outbox.close_now(code, reason);
                true
            }
            None => false,
        }
    }
}

impl ServerHandle {
    /// How many connections refused at accept time (503, 429) are still being
    /// answered: at most 256, each for at most a second.
    pub fn refusals_in_flight(&self) -> usize {
        listener::MAX_REFUSALS_IN_FLIGHT - self.state.refusals.available_permits()
    }
}
