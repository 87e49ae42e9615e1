//! crosswire's server: WebSocket pub/sub on bare hyper 1.x and tokio, as a
//! standalone server or as a [`tower::Service`] mounted in any axum or hyper
//! app.
//!
//! # Layers
//!
//! As a connection meets them, from the socket up; each module imports only
//! modules listed after it (`tests/layers.rs` checks this, so there is no
//! cycle):
//!
//! 1. **listener** (standalone [`Server`] only, with `routes` and `statics`):
//!    accepts TCP connections, bounds them (`max_connections`, per-address
//!    rate and count, answering 503/429 without hyper), wraps each in the
//!    write timeout, serves them with hyper and routes `/healthz`,
//!    `/readyz`, `/metrics`, static files and the WebSocket path to
//! 2. **service** ([`WebSocketService`]): the WebSocket endpoint as a
//!    `tower::Service`, what an axum or hyper app mounts: the Origin (and,
//!    mounted, `Host`) checks, the limits not applied at accept time, the
//!    `upgrade` hook, then
//! 3. **handshake**: the RFC 6455 rules, one refusal per rule, and the
//!    accept key; once accepted,
//! 4. **connection**: one peer's task, owning its socket: reading (the
//!    client's frames, through `message_reader`, into the hooks) and writing
//!    (its bounded outbox in batches, heartbeat, close handshake).
//! 5. **pub/sub protocol** ([`PubSub`], in [`pubsub`]): protocol v1 of
//!    `crosswire-shared` as a `Hooks` implementation (frames, seq, history
//!    and recovery, presence, acks, JWT claims, per-peer limits). It is
//!    listed above the hooks because it implements them and drives peers.
//! 6. **hooks** ([`Hooks`]): `upgrade`, `open`, `message`, `close`, `error`:
//!    what an app implements.
//! 7. **peer** ([`Peer`]): the crossws peer (`id`, `send`, `publish`,
//!    `subscribe`, `unsubscribe`, `topics`, `context`, `remote_addr`,
//!    `close`); protocol v1's operations on it are crate-private, for `PubSub`.
//! 8. **state**: what connections share (configuration, topics, peer list,
//!    limits, shutdown handles).
//! 9. **topics**: this node's subscribers and the fan-out: one encoded
//!    frame per message shared by every subscriber, what a connection's poll
//!    publishes to a topic queued as one run, presence events, and the merge
//!    of a history read with live deliveries that makes recovery exact. Each
//!    subscription takes its part of its address's and user's fair share of
//!    the topic table (`shares`, just below it), whatever the engine.
//! 10. **engine** ([`Engine`]): the broker: each topic's seq, epoch and
//!     bounded history, delivery to every node, cluster presence. The
//!     embedded [`MemoryEngine`] is the default; [`RedisEngine`] (`redis` in
//!     the configuration, `--redis`) shares topics between nodes; another
//!     broker plugs in with [`Server::with_engine`].
//!
//! Below them, leaves and support modules: `limits`, `config`, `origin`,
//! the per-peer queue (`outbox`), `shutdown`, `metrics`, [`Message`], the
//! encoded WebSocket frame every queue and history shares (`frame`), the
//! HTTP responses, the write timeout, and the reader of what clients send
//! (`message_reader`).
//!
//! # Use
//!
//! Implement [`Hooks`] (crossws style) and drive [`Peer`]s yourself, as the
//! `seed` and `echo` examples do; or run [`PubSub`], the typed protocol v1
//! that the `crosswire-server` binary and the `crosswire-client` browser
//! library speak. Either runs standalone:
//!
//! ```no_run
//! use crosswire_server::{PubSub, Server, ServerConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ServerConfig::default();
//! let server = Server::new(config.clone(), PubSub::new(&config)).bind().await?;
//! println!("listening on {}", server.local_addr());
//! let handle = server.handle();
//! handle.publish_data(&"news".parse().unwrap(), &serde_json::json!({"headline": "hello"})).await?;
//! server.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await;
//! # Ok(()) }
//! ```
//!
//! or inside an app, next to its own routes (`examples/axum.rs`):
//!
//! ```ignore
//! let endpoint = Server::new(config.clone(), PubSub::new(&config)).endpoint()?;
//! let app = axum::Router::new()
//!     .route("/", get(index))
//!     .route("/_ws", any_service(endpoint.service()));
//! ```
//!
//! Mounted behind an app's own listener, the limits the standalone listener
//! applies per TCP connection (the write timeout, `max_connections`, the
//! per-address limits) apply per WebSocket instead; see [`WebSocketService`].
//!
//! # Features
//!
//! - `cli` (default): `Args`, the clap flags of the binary and examples, and
//!   [`parse_cli`], which applies their `--config` file.
//! - `fuzzing`: makes the `handshake` and `message_reader` modules public, for
//!   the fuzz targets only.

mod config;
#[cfg(feature = "cli")]
mod config_file;
mod connection;
mod engine;
mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod handshake;
#[cfg(not(feature = "fuzzing"))]
#[allow(unreachable_pub)]
mod handshake;
mod hooks;
mod limits;
mod listener;
mod message;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod message_reader;
#[cfg(not(feature = "fuzzing"))]
#[allow(unreachable_pub)]
mod message_reader;
mod metrics;
mod origin;
mod outbox;
mod peer;
pub mod pubsub;
mod response;
mod routes;
mod service;
mod shares;
mod shutdown;
mod state;
mod statics;
mod topics;
mod write_timeout;

use std::{future::Future, net::SocketAddr, sync::Arc};

use crosswire_shared::{PresenceEntry, RawValue, Topic};
use tokio::net::TcpListener;

#[cfg(feature = "cli")]
pub use config::Args;
pub use config::{ConfigError, ProxyHeader, ServerConfig};
#[cfg(feature = "cli")]
pub use config_file::{parse_cli, try_parse_cli_from, ConfigFileError};
pub use crosswire_shared as protocol;
pub use engine::{
    AckTo, Delivered, Delivery, Engine, EngineError, History, MemoryEngine, MemoryLimits, MessageText, Node, Pending,
    Publication, ReadLimit, RedisEngine, ShareHolder,
};
pub use hooks::{CloseDetails, Hooks, PeerError, UpgradeRequest};
pub use message::{Message, Utf8Bytes};
pub use outbox::SendError;
pub use peer::Peer;
pub use pubsub::{PubSub, PubSubContext};
pub use response::{text_response, HttpResponse};
pub use service::{RemoteAddr, WebSocketService};
pub use shutdown::{shutdown_signal, stop_signal, ShutdownKind};

use shutdown::ShutdownController;
use state::ServerState;

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

/// Why a [`ServerHandle::publish_data`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The data could not be encoded as JSON.
    #[error("cannot encode the data as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// The engine refused or failed it (topic cap, broker unreachable).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// A server not yet running: a [`ServerConfig`] and the [`Hooks`] to run.
/// [`bind`](Self::bind) it to a socket of its own, or make it an
/// [`endpoint`](Self::endpoint) to mount in an app.
#[derive(Debug)]
pub struct Server<H> {
    config: ServerConfig,
    hooks: H,
    engine: Option<Arc<dyn Engine>>,
}

impl<H: Hooks> Server<H> {
    /// A server running `hooks` with `config`.
    pub fn new(config: ServerConfig, hooks: H) -> Self {
        Self { config, hooks, engine: None }
    }

    /// Carries topics with `engine` instead of the one the configuration
    /// names (this process's [`MemoryEngine`], or a [`RedisEngine`] with
    /// `redis` set): for another broker.
    pub fn with_engine(mut self, engine: Arc<dyn Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The WebSocket endpoint without a listener, for an app's own router:
    /// see [`Endpoint::service`]. Must be called within a tokio runtime (it
    /// starts the history sweeper).
    pub fn endpoint(self) -> Result<Endpoint<H>, ConfigError> {
        self.config.validate()?;
        let shutdown = ShutdownController::new();
        let metrics = metrics::Metrics::new();
        let engine = match self.engine {
            Some(engine) => engine,
            None => state::engine(&self.config, &metrics)?,
        };
        let state = Arc::new(ServerState::new(self.config, shutdown.handles(), engine, metrics));
        topics::Topics::start(&state.topics, state.shutdown.token());
        state.shutdown.spawn(state::sweep(Arc::clone(&state)));
        let service = WebSocketService { state, hooks: Arc::new(self.hooks) };
        Ok(Endpoint { service, shutdown })
    }

    /// Binds the listening socket (`config.addr`) and starts accepting
    /// connections: the endpoint at `config.path`, `/healthz`, `/readyz`,
    /// `/metrics`, and the static files of `config.static_dir`.
    pub async fn bind(self) -> Result<RunningServer, ServerError> {
        self.config.validate()?;
        limits::raise_open_file_limit(self.config.max_connections);
        let addr = self.config.addr;
        let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        let Endpoint { service, shutdown } = self.endpoint()?;
        let state = Arc::clone(&service.state);
        state.shutdown.spawn(listener::Acceptor { listener, state: Arc::clone(&state), service }.run());
        tracing::info!(addr = %local_addr, path = %state.config.path, "crosswire listening");
        Ok(RunningServer { local_addr, handle: ServerHandle { state }, shutdown })
    }
}

/// The WebSocket endpoint of a server that an app serves itself: the
/// [`WebSocketService`] to mount, and the shared state behind it (topics,
/// peers, shutdown). Its tasks (peers, the history sweeper) run until
/// [`shutdown`](Self::shutdown), not merely until it is dropped: keep it (or
/// call `shutdown`) for as long as the app serves.
#[derive(Debug)]
pub struct Endpoint<H> {
    service: WebSocketService<H>,
    shutdown: ShutdownController,
}

impl<H: Hooks> Endpoint<H> {
    /// The `tower::Service` to mount at the WebSocket path, e.g. with axum's
    /// `Router::route("/_ws", any_service(endpoint.service()))`. Clones share
    /// everything.
    pub fn service(&self) -> WebSocketService<H> {
        self.service.clone()
    }

    /// A handle to publish and inspect peers from outside the hooks.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { state: Arc::clone(&self.service.state) }
    }

    /// Closes every peer with 1001 and waits for them to finish, at most
    /// `shutdown_grace`; then ends whatever still runs. Call it when the app
    /// stops (its own listener is the app's to stop). From the call on, the
    /// endpoint is not ready ([`ServerHandle::is_ready`]) and refuses new
    /// WebSockets with 503.
    pub async fn shutdown(self) {
        self.stop(ShutdownKind::GoingAway).await;
    }

    /// [`shutdown`](Self::shutdown), telling the peers why: with
    /// [`ShutdownKind::Restart`] they get 1012 and reconnect at once, to
    /// another node (a rolling deploy).
    pub async fn stop(self, kind: ShutdownKind) {
        drain(&self.service.state, self.shutdown, kind).await;
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

    /// Serves until `signal` resolves, then shuts down gracefully (1001).
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Serves until `signal` resolves, then stops the way it says: what the
    /// binary does with [`stop_signal`] (SIGTERM: a restart, 1012).
    pub async fn run_until_stop(self, signal: impl Future<Output = ShutdownKind>) {
        let kind = signal.await;
        self.stop(kind).await;
    }

    /// Stops accepting, closes every peer with 1001 and waits for them to
    /// finish, at most `shutdown_grace`; then ends whatever still runs. When
    /// it returns, no task of this server's is left running.
    pub async fn shutdown(self) {
        self.stop(ShutdownKind::GoingAway).await;
    }

    /// [`shutdown`](Self::shutdown), telling the peers why: with
    /// [`ShutdownKind::Restart`] they get 1012 and reconnect at once, to
    /// another node (a rolling deploy).
    pub async fn stop(self, kind: ShutdownKind) {
        drain(&self.handle.state, self.shutdown, kind).await;
    }
}

async fn drain(state: &ServerState, shutdown: ShutdownController, kind: ShutdownKind) {
    let grace = state.config.shutdown_grace;
    let peers = state.peer_count();
    tracing::info!(peers, ?kind, "shutting down");
    // Connections do not watch the shutdown token (see `shutdown`): every
    // peer registered now is told here, after the token is cancelled, and
    // one registering later sees it cancelled when its connection starts.
    shutdown.signal(kind);
    let (code, reason) = kind.close_frame();
    for peer in state.peer_list() {
        peer.outbox.close_now(code, reason);
    }
    let drained = shutdown.drain(grace, kind).await;
    match (drained.aborted, state.peer_count()) {
        (0, _) => tracing::info!(peers, "shutdown complete: every connection closed"),
        (aborted, left) => tracing::warn!(
            ?grace,
            aborted,
            peers_cut = left,
            "shutdown grace period over: ended the tasks still running, their peers without a close handshake"
        ),
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
    /// The authenticated user, if any (recorded by [`PubSub`] when it opens the peer).
    pub user: Option<String>,
    /// The topics it is subscribed to.
    pub topics: Vec<Topic>,
    /// Whether the server has started closing it (slow consumer, shutdown, …).
    pub closing: bool,
    /// Live frames waiting in its outbound queue (answers and replays not
    /// counted): what the `outbound_queue` bound applies to.
    pub queued_frames: usize,
    /// Payload bytes waiting in its outbound queue (or taken and not yet
    /// written), live traffic and answers together: what the
    /// `max_queue_bytes` bound applies to.
    pub queued_bytes: usize,
    /// The answers' part of `queued_bytes` (`subscribed`, `pong`, acks,
    /// errors, `history`, replayed messages): past 64 KiB the server stops
    /// reading the peer until they drain.
    pub answer_bytes: usize,
}

impl ServerHandle {
    /// Sends `message` verbatim to every subscriber of `topic` (no protocol
    /// framing, as [`Peer::publish`] and crossws's `publish`); returns how
    /// many it was queued for.
    pub fn publish(&self, topic: &Topic, message: impl Into<Message>) -> usize {
        self.state.metrics.published();
        self.state.topics.publish_raw(topic, None, message.into())
    }

    /// Publishes `data` to every subscriber of `topic` as a protocol v1
    /// `message` frame from `"server"` ([`PubSub`]'s clients): it gets the
    /// topic's next seq, which is returned, and is kept for recovery.
    pub async fn publish_data(&self, topic: &Topic, data: &impl serde::Serialize) -> Result<u64, PublishError> {
        let raw = serde_json::value::to_raw_value(data)?;
        Ok(self.publish_json(topic, &raw).await?)
    }

    /// Like [`publish_data`](Self::publish_data), for data that is already JSON text.
    pub async fn publish_json(&self, topic: &Topic, data: &RawValue) -> Result<u64, EngineError> {
        let seq = self
            .state
            .topics
            .publish(topic, Publication { from: "server", data, ack: None, at: tokio::time::Instant::now() })
            .await?;
        self.state.metrics.published();
        Ok(seq)
    }

    /// Every connected peer, in id order.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut list: Vec<_> = self
            .state
            .peer_list()
            .into_iter()
            .map(|p| {
                let backlog = p.outbox.backlog();
                PeerInfo {
                    id: p.id.to_string(),
                    remote_addr: p.remote,
                    user: p.user.get().map(|u| u.to_string()),
                    topics: topics::lock_index(&p.topics).iter().cloned().collect(),
                    closing: p.outbox.is_closing(),
                    queued_frames: backlog.frames,
                    queued_bytes: backlog.bytes,
                    answer_bytes: p.outbox.answer_bytes(),
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Who is subscribed to `topic` (on every node of a cluster).
    pub async fn presence(&self, topic: &Topic) -> Result<Vec<PresenceEntry>, EngineError> {
        self.state.topics.presence(topic).await
    }

    /// How many topics the engine holds: in this process, those with
    /// subscribers, retained history, or an epoch someone may come back to;
    /// with Redis, those this node's subscribers hold.
    pub fn topic_count(&self) -> usize {
        self.state.topics.len()
    }

    /// How many distinct topics peers from `ip` hold on this node (counted
    /// per /64 for IPv6; behind a trusted proxy, under the client address
    /// it names): what [`ServerConfig::topic_share`] bounds.
    pub fn topics_held_by_ip(&self, ip: std::net::IpAddr) -> usize {
        self.state.topics.held_by_address(ip)
    }

    /// How many distinct topics peers authenticated as `user` (the token's
    /// `sub`) hold on this node: what [`ServerConfig::topic_share`] bounds.
    pub fn topics_held_by_user(&self, user: &str) -> usize {
        self.state.topics.held_by_user(user)
    }

    /// Bytes queued for peers now (live traffic and answers), server-wide,
    /// as the queues reserved them (bounded by
    /// [`ServerConfig::max_total_queue_bytes`] for live traffic; answers
    /// are never refused, so they may pass it by what each peer's answers
    /// hold: 64 KiB and one answer).
    pub fn queued_bytes(&self) -> usize {
        self.state.queue_budget.reserved()
    }

    /// Whether the engine can serve: always for the embedded one; with
    /// Redis, while the node is subscribed to it.
    pub fn engine_ready(&self) -> bool {
        self.state.topics.engine().is_ready()
    }

    /// Bytes of history retained now, server-wide (bounded by
    /// [`ServerConfig::history_memory_bytes`]).
    pub fn history_bytes(&self) -> usize {
        self.state.topics.retained_bytes()
    }

    /// Closes a peer's connection now: what is still queued for it is dropped
    /// and the close frame goes next. False if no such peer is connected.
    pub fn disconnect(&self, peer: &str, code: u16, reason: &str) -> bool {
        match self.state.peer(peer) {
            Some(entry) => {
                entry.outbox.close_now(code, reason);
                true
            }
            None => false,
        }
    }
}

impl ServerHandle {
    /// Whether this node should be sent new connections: false once it is
    /// draining (a shutdown or restart began) or while its pub/sub engine is
    /// unreachable. The standalone server answers `/readyz` with it; an app
    /// that mounts the endpoint serves it on a route of its own.
    pub fn is_ready(&self) -> bool {
        self.state.is_ready()
    }

    /// Every metric of this server in the Prometheus text format (0.0.4), as
    /// the standalone server answers `/metrics`: for an app that mounts the
    /// endpoint to serve on a route of its own, with
    /// [`METRICS_CONTENT_TYPE`](Self::METRICS_CONTENT_TYPE).
    pub fn metrics_text(&self) -> String {
        self.state.metrics_text()
    }

    /// The `Content-Type` of [`metrics_text`](Self::metrics_text).
    pub const METRICS_CONTENT_TYPE: &'static str = metrics::CONTENT_TYPE;

    /// How many connections refused at accept time (503, 429) are still being
    /// answered: at most 256, each for at most a second. Always 0 for an
    /// [`Endpoint`], whose app does its own accepting.
    pub fn refusals_in_flight(&self) -> usize {
        state::MAX_REFUSALS_IN_FLIGHT - self.state.refusals.available_permits()
    }
}
