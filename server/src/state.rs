//! What one server shares between its connections: the configuration, the
//! topic registry, the peer list, the connection limits and the shutdown
//! handles. Below every layer that serves a connection, above none of them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio::sync::Semaphore;

use crate::{
    config::ServerConfig,
    engine::{Engine, MemoryEngine, MemoryLimits, RedisEngine},
    limits,
    metrics::{Levels, Metrics},
    origin,
    outbox::{Bounds, Outbox, QueueBudget},
    shutdown::ShutdownHandles,
    topics::{Memberships, Topics},
};

/// Refusals answered at once; past this a refused connection is closed
/// unanswered, so a flood of them costs neither memory nor descriptors.
pub(crate) const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// Shared state of one server.
pub(crate) struct ServerState {
    pub(crate) config: ServerConfig,
    pub(crate) topics: Arc<Topics>,
    peers: Mutex<HashMap<Arc<str>, Arc<PeerCore>>>,
    /// Connections (behind a foreign listener: WebSockets) open at once.
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) per_ip: Arc<limits::IpLimiter>,
    pub(crate) origins: origin::OriginPolicy,
    /// Permits for the tasks answering connections refused at accept time.
    pub(crate) refusals: Arc<Semaphore>,
    /// How every task of this server is spawned, so shutdown reaches it.
    pub(crate) shutdown: ShutdownHandles,
    /// Live bytes queued across every peer.
    pub(crate) queue_budget: Arc<QueueBudget>,
    pub(crate) metrics: Metrics,
}

/// What the server knows of a peer whatever its hooks' context type: the
/// part the server's peer list shares with the [`crate::Peer`] handle.
#[derive(Debug)]
pub(crate) struct PeerCore {
    pub(crate) id: Arc<str>,
    pub(crate) remote: SocketAddr,
    pub(crate) outbox: Outbox,
    /// Its index of topics, kept by [`Topics`] (membership itself is each
    /// topic's subscriber map).
    pub(crate) topics: Memberships,
    /// The authenticated user, set by the pub/sub protocol when it has one.
    pub(crate) user: OnceLock<Arc<str>>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").field("addr", &self.config.addr).finish_non_exhaustive()
    }
}

impl ServerState {
    /// The state of a server whose topics `engine` carries.
    pub(crate) fn new(
        config: ServerConfig,
        shutdown: ShutdownHandles,
        engine: Arc<dyn Engine>,
        metrics: Metrics,
    ) -> Self {
        Self {
            topics: Arc::new(Topics::new(engine, config.history_size, config.max_presence_list, config.topic_share())),
            peers: Mutex::new(HashMap::new()),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            per_ip: limits::IpLimiter::new(&config),
            origins: origin::OriginPolicy::new(
                config.addr,
                &config.allowed_origins,
                config.allow_loopback_origins,
                &config.allowed_hosts,
            ),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            shutdown,
            queue_budget: QueueBudget::new(config.max_total_queue_bytes),
            metrics,
            config,
        }
    }

    /// Whether this node should be sent new connections: not while it
    /// drains for a shutdown or restart, nor while its engine is down.
    pub(crate) fn is_ready(&self) -> bool {
        !self.shutdown.is_draining() && self.topics.engine().is_ready()
    }

    /// Every metric, in the Prometheus text format, levels read now.
    pub(crate) fn metrics_text(&self) -> String {
        self.metrics.encode(Levels {
            connections: self.peer_count(),
            topics: self.topics.len(),
            queue_bytes: self.queue_budget.reserved(),
            history_bytes: self.topics.retained_bytes(),
            deliveries: self.topics.deliveries(),
        })
    }

    /// Adds a peer under a fresh random id.
    pub(crate) fn register_peer(&self, remote: SocketAddr, outbox: Outbox) -> Arc<PeerCore> {
        let mut peers = self.peers.lock().expect("peer list lock");
        let id: Arc<str> = loop {
            // Random rather than sequential: ids are visible to other peers
            // (`from`, presence) and should not reveal connection counts.
            let id: Arc<str> = format!("{:012x}", rand::random::<u64>() >> 16).into();
            if !peers.contains_key(&id) {
                break id;
            }
        };
        let core = Arc::new(PeerCore {
            id: id.clone(),
            remote,
            outbox,
            topics: Memberships::default(),
            user: OnceLock::new(),
        });
        peers.insert(id, Arc::clone(&core));
        core
    }

    pub(crate) fn unregister_peer(&self, id: &str) {
        self.peers.lock().expect("peer list lock").remove(id);
    }

    pub(crate) fn peer(&self, id: &str) -> Option<Arc<PeerCore>> {
        self.peers.lock().expect("peer list lock").get(id).cloned()
    }

    /// Every connected peer, in no particular order.
    pub(crate) fn peer_list(&self) -> Vec<Arc<PeerCore>> {
        self.peers.lock().expect("peer list lock").values().cloned().collect()
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.lock().expect("peer list lock").len()
    }
}

/// The engine `config` asks for: Redis when it names one, else this process.
/// Its round trips are timed into `metrics`.
pub(crate) fn engine(config: &ServerConfig, metrics: &Metrics) -> Result<Arc<dyn Engine>, crate::ConfigError> {
    if let Some(url) = &config.redis {
        let engine = RedisEngine::new(url, config)
            .map_err(|e| crate::ConfigError::BadRedisUrl(format!("{url}: {e}")))?
            .timed(metrics.engine_round_trip());
        return Ok(Arc::new(engine));
    }
    Ok(Arc::new(MemoryEngine::new(MemoryLimits::from_config(config))))
}

/// How much live traffic one peer's queue may hold.
pub(crate) fn outbox_bounds(config: &ServerConfig) -> Bounds {
    Bounds { frames: config.outbound_queue, bytes: config.max_queue_bytes }
}

/// Expires topic history in the background, so topics nobody touches again
/// are still forgotten.
pub(crate) async fn sweep(state: Arc<ServerState>) {
    let every = (state.config.history_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => { state.topics.sweep(); }
            _ = state.shutdown.cancelled() => return,
        }
    }
}
