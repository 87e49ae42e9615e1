//! Server configuration: the library's [`ServerConfig`], whose `Default` is
//! the one place defaults are written, and (with the `cli` feature) the
//! command-line `Args` (flags with environment fallbacks) that the binary and
//! the examples turn into one.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crosswire_shared::TopicPattern;

/// Everything a [`crate::Server`] can be tuned with. `ServerConfig::default()` is a
/// sensible, documented starting point.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen. Default `127.0.0.1:3000`; port 0 picks a free port.
    pub addr: SocketAddr,
    /// The WebSocket path. Default `/_ws`, as in the crossws/Nitro reference.
    pub path: String,
    /// A directory served as static files at `/` (the built demo's `dist/`).
    pub static_dir: Option<PathBuf>,
    /// How often the server pings each peer and tells clients to ping; a peer
    /// silent for two intervals is closed (3008). Default 25 s.
    pub heartbeat: Duration,
    /// The largest message accepted, counted across fragments; larger ones
    /// close the connection with 1009. Default 64 KiB.
    pub max_message_size: usize,
    /// Live frames that may wait in one peer's outbound queue (queued, or
    /// taken by its write loop and not yet written); a peer whose queue
    /// overflows is closed with 1013 (slow consumer). Default 4096: a
    /// burst the publish limits allow must fit, so that only a peer that is
    /// really behind is cut. Kept below `history_size`, so that a slow
    /// consumer's lag stays recoverable. Answers and recovery replays do not
    /// count against it (they count in `max_queue_bytes`).
    pub outbound_queue: usize,
    /// Payload bytes that may wait in one peer's outbound queue (counted as
    /// `outbound_queue` counts frames), live traffic and answers together: a
    /// live push past them closes the peer with 1013 (an answer is never
    /// refused; a peer whose answers back up is not read until they drain).
    /// Default 4 MiB (Bun's backpressure
    /// limit is 16 MiB): a peer is slow when its backlog is large, not when a
    /// burst sits in its queue for a millisecond.
    pub max_queue_bytes: usize,
    /// Bytes queued across every peer, answers included; a live push that
    /// would pass it cuts its peer as a slow consumer (1013), an answer takes
    /// its credit anyway (each peer's answers are bounded by its turn: about
    /// 64 KiB and one answer). Counted per queue, so a frame queued for many
    /// peers counts for each. Default 1 GiB.
    pub max_total_queue_bytes: usize,
    /// A connection (WebSocket or plain HTTP) whose socket accepts no bytes
    /// for this long while the server has something to write is dropped,
    /// without a close frame (none could be written). Default 10 s.
    pub write_timeout: Duration,
    /// Open TCP connections at once; further ones get 503. Default 10 000.
    pub max_connections: usize,
    /// How long shutdown waits for peers to finish their close handshake. Default 5 s.
    pub shutdown_grace: Duration,
    /// How many messages each topic keeps for recovery. Default 8192; 0 disables history.
    pub history_size: usize,
    /// How long a message is kept for recovery. Default 5 minutes.
    pub history_ttl: Duration,
    /// Bytes of history retained server-wide; past them the oldest retained
    /// messages are evicted first (a `since` they no longer reach gets
    /// `recovered:false`). Default 64 MiB.
    pub history_memory_bytes: usize,
    /// Payload bytes one `history` answer carries at most (never more than
    /// the asker's queue has room for, and always at least one message); an
    /// answer that stops short says where to ask from next. Default 1 MiB.
    pub max_history_answer_bytes: usize,
    /// Topics that may exist at once, server-wide; at the cap an idle topic
    /// is forgotten to make room, and only when none is idle is a new one
    /// refused (`topic_limit`). Default 100 000.
    pub max_topics: usize,
    /// Topics one client address (IPv6: one /64; behind a trusted proxy, the
    /// client it names) may hold at once, and, with JWT, one user: the
    /// distinct topics its peers are subscribed to on this node. Past it a
    /// subscribe is refused (`topic_limit`), so that one address can never
    /// take the whole table from the others. Default 0: derived, see
    /// [`ServerConfig::topic_share`].
    pub max_topics_per_ip: usize,
    /// Entries a presence list holds at most (in peer-id order). Default 1000.
    pub max_presence_list: usize,
    /// Subscribe, unsubscribe, presence, history and refresh requests per
    /// second one peer may make, sustained, one budget for all (past them:
    /// `rate_limited`). Default 50.
    pub subscribe_rate: u32,
    /// Those requests one peer may make in a burst. Default 200: a client
    /// resubscribing its topics on reconnect fits.
    pub subscribe_burst: u32,
    /// The HS256 secret tokens are verified with; `None` (the default) turns
    /// built-in authentication off: every client may then subscribe and
    /// publish to every topic.
    pub jwt_secret: Option<String>,
    /// With a JWT secret: the topic patterns a token without a `subscribe`
    /// claim may subscribe to (and read the history and presence of). A
    /// token's own claim replaces these. Default none: a token grants only
    /// what it says.
    pub jwt_default_subscribe: Vec<TopicPattern>,
    /// With a JWT secret: the topic patterns a token without a `publish`
    /// claim may publish to; a token's own claim replaces these. Default none.
    pub jwt_default_publish: Vec<TopicPattern>,
    /// Browser origins allowed besides the server's own and loopback ones; `*` allows all.
    pub allowed_origins: Vec<String>,
    /// Topics one peer may be subscribed to at once. Default 100.
    pub max_topics_per_peer: usize,
    /// Open connections from one client address (IPv6 counted per /64);
    /// further ones get 429. Default 0: no per-address count, because a whole
    /// office or mobile carrier behind one NAT address is legitimate; the
    /// per-address connect rate and `max_connections` bound an abusive one.
    pub max_connections_per_ip: usize,
    /// Publishes per second one peer may make, sustained. Default 100.
    pub publish_rate: u32,
    /// Publishes one peer may make in a burst. Default 200.
    pub publish_burst: u32,
    /// The most bytes one read from a peer's socket takes (at most 64 KiB).
    /// Reads land in a buffer shared by the connections of a worker thread,
    /// so this costs no memory per connection; it bounds how many messages
    /// one read hands a peer's hooks at once. Default 4 KiB: small messages
    /// still arrive many to a read.
    pub read_buffer_size: usize,
    /// The most bytes one `writev` of queued frames hands the socket (at
    /// least one frame always goes; 64 slices at most). Default 256 KiB:
    /// with 4 KiB messages, 64 KiB made a send call every 9.7 deliveries and
    /// 256 KiB every 17, for 3% less server CPU per delivery and a lower p99
    /// (16 KiB, earlier, made one every four; docs/BENCHMARKS.md). Nothing is
    /// copied to gather them: this bounds a batch, not a buffer.
    pub write_buffer_size: usize,
    /// The `aud` a token must carry; `None` (the default) accepts tokens with
    /// no `aud` claim only.
    pub jwt_audience: Option<String>,
    /// Allow loopback browser origins (`http://localhost:8080`, …) even when
    /// the server does not listen on loopback. Default false: on a public
    /// server a loopback origin is any page the visitor runs locally.
    pub allow_loopback_origins: bool,
    /// `Host` values accepted besides loopback names when the server listens on
    /// loopback (the DNS-rebinding check); `*` turns the check off. When set on
    /// a server listening elsewhere, only these hosts are accepted.
    pub allowed_hosts: Vec<String>,
    /// New connections per second one client address may open, sustained
    /// (IPv6 counted per /64); over it: 429. Default 200: enough for a
    /// busy NAT address reconnecting after a restart, while one address alone
    /// cannot churn connections fast enough to matter; 0 turns it off.
    pub connect_rate_per_ip: u32,
    /// New connections one client address may open in a burst. Default 2000
    /// (a load test opening a couple of thousand connections at once).
    pub connect_burst_per_ip: u32,
    /// Reverse proxies whose `trusted_proxy_header` names the client address.
    /// Default none: forwarding headers are ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The one header trusted proxies name the client in; the other is
    /// ignored, since a client may send it itself. Default `X-Forwarded-For`.
    pub trusted_proxy_header: ProxyHeader,
    /// The Redis server that carries topics between nodes
    /// (`redis://HOST:PORT[/DB]`); `None` (the default) keeps every topic in
    /// this process, with nothing to install.
    pub redis: Option<String>,
    /// With Redis: how long a node's presence entries outlive the node. A
    /// live node renews them every third of this; a node that died stops, and
    /// its peers drop out of every presence list within this time. Default 30 s.
    pub presence_ttl: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3000),
            path: "/_ws".to_owned(),
            static_dir: None,
            heartbeat: Duration::from_secs(25),
            max_message_size: 64 * 1024,
            outbound_queue: 4096,
            max_queue_bytes: 4 * 1024 * 1024,
            max_total_queue_bytes: 1024 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(5),
            history_size: 8192,
            history_ttl: Duration::from_secs(300),
            history_memory_bytes: 64 * 1024 * 1024,
            max_history_answer_bytes: 1024 * 1024,
            max_topics: 100_000,
            max_topics_per_ip: 0,
            max_presence_list: 1000,
            subscribe_rate: 50,
            subscribe_burst: 200,
            jwt_secret: None,
            jwt_default_subscribe: Vec::new(),
            jwt_default_publish: Vec::new(),
            allowed_origins: Vec::new(),
            max_topics_per_peer: 100,
            max_connections_per_ip: 0,
            publish_rate: 100,
            publish_burst: 200,
            read_buffer_size: 4 * 1024,
            write_buffer_size: 256 * 1024,
            jwt_audience: None,
            allow_loopback_origins: false,
            allowed_hosts: Vec::new(),
            connect_rate_per_ip: 200,
            connect_burst_per_ip: 2000,
            trusted_proxies: Vec::new(),
            trusted_proxy_header: ProxyHeader::XForwardedFor,
            redis: None,
            presence_ttl: Duration::from_secs(30),
        }
    }
}

/// The header a trusted reverse proxy names the client's address in. Only
/// this one is read: a proxy appends to the header it sets and passes the
/// other through as the client sent it, so reading both lets a client pick
/// its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, …` (nginx's `$proxy_add_x_forwarded_for`,
    /// HAProxy's `option forwardfor`, most load balancers). The default.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ProxyHeader {
    /// The header's name, lowercase.
    pub fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }
}

impl std::fmt::Display for ProxyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ProxyHeader {
    type Err = String;

    /// `x-forwarded-for` or `forwarded`, in any case.
    fn from_str(text: &str) -> Result<Self, String> {
        [Self::XForwardedFor, Self::Forwarded]
            .into_iter()
            .find(|h| text.trim().eq_ignore_ascii_case(h.name()))
            .ok_or_else(|| format!("{text:?} is neither x-forwarded-for nor forwarded"))
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The WebSocket path did not start with `/`.
    #[error("the WebSocket path must start with '/', got {0:?}")]
    BadPath(String),
    /// A value that must be positive was zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// One message of the largest size would not fit a peer's queue.
    #[error("max_queue_bytes ({queue}) must be at least max_message_size ({message})")]
    QueueSmallerThanMessage {
        /// `max_queue_bytes`.
        queue: usize,
        /// `max_message_size`.
        message: usize,
    },
    /// The JWT secret is too short to be safe.
    #[error("the JWT secret must be at least 16 bytes long")]
    WeakSecret,
    /// An allowed origin that is not `*` nor `scheme://host[:port]`.
    #[error("allowed origin {0:?} is not `*` nor scheme://host[:port]")]
    BadOrigin(String),
    /// Default topic permissions for tokens were given without a JWT secret,
    /// where there are no tokens and every topic is open.
    #[error(
        "{0} (--{flag}) needs a JWT secret (--jwt-secret): without one every client may use every topic",
        flag = .0.replace('_', "-")
    )]
    DefaultsWithoutSecret(&'static str),
    /// A Redis address that is not a `redis://` (or `rediss://`, `redis+unix://`) URL.
    #[error("redis address {0:?} is not a redis://HOST:PORT[/DB] URL")]
    BadRedisUrl(String),
}

impl ServerConfig {
    /// Topics one address (and one user) may hold: `max_topics_per_ip` when
    /// set, else a twentieth of `max_topics` but at least
    /// `max_topics_per_peer` (one connection may always hold all it may
    /// subscribe to); never more than `max_topics`. By default 5 000.
    pub fn topic_share(&self) -> usize {
        let share = match self.max_topics_per_ip {
            0 => (self.max_topics / 20).max(self.max_topics_per_peer),
            set => set,
        };
        share.clamp(1, self.max_topics.max(1))
    }

    /// Checks the values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::BadPath(self.path.clone()));
        }
        for (name, zero) in [
            ("heartbeat", self.heartbeat.is_zero()),
            ("max_message_size", self.max_message_size == 0),
            ("outbound_queue", self.outbound_queue == 0),
            ("write_timeout", self.write_timeout.is_zero()),
            ("max_connections", self.max_connections == 0),
            ("connect_burst_per_ip", self.connect_burst_per_ip == 0),
            ("max_topics_per_peer", self.max_topics_per_peer == 0),
            ("publish_burst", self.publish_burst == 0),
            ("subscribe_burst", self.subscribe_burst == 0),
            ("max_topics", self.max_topics == 0),
            ("max_history_answer_bytes", self.max_history_answer_bytes == 0),
            ("presence_ttl", self.presence_ttl.is_zero()),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.max_queue_bytes < self.max_message_size {
            return Err(ConfigError::QueueSmallerThanMessage {
                queue: self.max_queue_bytes,
                message: self.max_message_size,
            });
        }
        if self.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::WeakSecret);
        }
        if self.jwt_secret.is_none() {
            for (name, defaults) in [
                ("jwt_default_subscribe", &self.jwt_default_subscribe),
                ("jwt_default_publish", &self.jwt_default_publish),
            ] {
                if !defaults.is_empty() {
                    return Err(ConfigError::DefaultsWithoutSecret(name));
                }
            }
        }
        if let Some(bad) = self.allowed_origins.iter().find(|o| *o != "*" && crate::origin::Origin::parse(o).is_none())
        {
            return Err(ConfigError::BadOrigin(bad.clone()));
        }
        if let Some(url) = &self.redis {
            if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://")) {
                return Err(ConfigError::BadRedisUrl(url.clone()));
            }
        }
        Ok(())
    }
}

/// Command-line flags, each with an environment fallback, for the binary and
/// the examples (`#[command(flatten)]` them into a clap parser, and parse it
/// with [`crate::parse_cli`] so that `--config` applies). Their defaults are
/// [`ServerConfig::default`]'s. Behind the `cli` feature.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A TOML file setting any of these flags by its long name (`max-connections = 500`);
    /// command-line flags and environment variables override it.
    #[arg(long, env = "CROSSWIRE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "CROSSWIRE_HOST", default_value_t = d().addr.ip())]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, short, env = "CROSSWIRE_PORT", default_value_t = d().addr.port())]
    pub port: u16,
    /// The WebSocket path.
    #[arg(long, env = "CROSSWIRE_PATH", default_value_t = d().path)]
    pub path: String,
    /// Serve this directory (e.g. the demo's built `dist/`) at `/`.
    #[arg(long = "static", env = "CROSSWIRE_STATIC", value_name = "DIR")]
    pub static_dir: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "CROSSWIRE_HEARTBEAT_MS", default_value_t = ms(d().heartbeat))]
    pub heartbeat_ms: u64,
    /// Largest accepted message in bytes (across fragments).
    #[arg(long, env = "CROSSWIRE_MAX_MESSAGE_BYTES", default_value_t = d().max_message_size)]
    pub max_message_bytes: usize,
    /// Frames a peer's outbound queue holds before it is closed as a slow consumer.
    #[arg(long, env = "CROSSWIRE_OUTBOUND_QUEUE", default_value_t = d().outbound_queue)]
    pub outbound_queue: usize,
    /// Bytes a peer's outbound queue holds before it is closed as a slow consumer.
    #[arg(long, env = "CROSSWIRE_MAX_QUEUE_BYTES", default_value_t = d().max_queue_bytes)]
    pub max_queue_bytes: usize,
    /// Bytes queued across every peer before pushes cut their peer as a slow consumer.
    #[arg(long, env = "CROSSWIRE_MAX_TOTAL_QUEUE_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_total_queue_bytes: usize,
    /// Milliseconds a peer's socket may accept no bytes before it is dropped.
    #[arg(long, env = "CROSSWIRE_WRITE_TIMEOUT_MS", default_value_t = ms(d().write_timeout))]
    pub write_timeout_ms: u64,
    /// Open connections at once, server-wide.
    #[arg(long, env = "CROSSWIRE_MAX_CONNECTIONS", default_value_t = d().max_connections)]
    pub max_connections: usize,
    /// Milliseconds shutdown waits for peers to close.
    #[arg(long, env = "CROSSWIRE_SHUTDOWN_GRACE_MS", default_value_t = ms(d().shutdown_grace))]
    pub shutdown_grace_ms: u64,
    /// Messages each topic keeps for recovery (0 disables).
    #[arg(long, env = "CROSSWIRE_HISTORY_SIZE", default_value_t = d().history_size)]
    pub history_size: usize,
    /// Seconds a message is kept for recovery.
    #[arg(long, env = "CROSSWIRE_HISTORY_TTL_SECS", default_value_t = d().history_ttl.as_secs())]
    pub history_ttl_secs: u64,
    /// Bytes of history retained server-wide (the oldest go first past it).
    #[arg(long, env = "CROSSWIRE_HISTORY_MEMORY_BYTES", default_value_t = d().history_memory_bytes)]
    pub history_memory_bytes: usize,
    /// Bytes one `history` answer carries at most (the rest is paged).
    #[arg(long, env = "CROSSWIRE_MAX_HISTORY_ANSWER_BYTES", default_value_t = d().max_history_answer_bytes)]
    pub max_history_answer_bytes: usize,
    /// Topics that may exist at once, server-wide.
    #[arg(long, env = "CROSSWIRE_MAX_TOPICS", default_value_t = d().max_topics)]
    pub max_topics: usize,
    /// Topics one address (IPv6 per /64), and one JWT user, may hold at once
    /// (0: a twentieth of --max-topics, at least --max-topics-per-peer).
    #[arg(long, env = "CROSSWIRE_MAX_TOPICS_PER_IP", default_value_t = d().max_topics_per_ip)]
    pub max_topics_per_ip: usize,
    /// Entries a presence list holds at most.
    #[arg(long, env = "CROSSWIRE_MAX_PRESENCE_LIST", default_value_t = d().max_presence_list)]
    pub max_presence_list: usize,
    /// Sustained subscribe/unsubscribe/presence/history/refresh requests per second per peer.
    #[arg(long, env = "CROSSWIRE_SUBSCRIBE_RATE", default_value_t = d().subscribe_rate)]
    pub subscribe_rate: u32,
    /// Burst of subscribe/unsubscribe/presence/history/refresh requests per peer.
    #[arg(long, env = "CROSSWIRE_SUBSCRIBE_BURST", default_value_t = d().subscribe_burst)]
    pub subscribe_burst: u32,
    /// HS256 secret for JWT authentication (at least 16 bytes); unset means no auth.
    #[arg(long, env = "CROSSWIRE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A topic pattern (`chat:*`) every token without a `subscribe` claim may
    /// subscribe to (repeatable; a token's claim replaces them; default none).
    #[arg(
        long = "jwt-default-subscribe",
        env = "CROSSWIRE_JWT_DEFAULT_SUBSCRIBE",
        value_name = "PATTERN",
        value_delimiter = ',',
        value_parser = parse_pattern
    )]
    pub jwt_default_subscribe: Vec<TopicPattern>,
    /// A topic pattern every token without a `publish` claim may publish to
    /// (repeatable; a token's claim replaces them; default none).
    #[arg(
        long = "jwt-default-publish",
        env = "CROSSWIRE_JWT_DEFAULT_PUBLISH",
        value_name = "PATTERN",
        value_delimiter = ',',
        value_parser = parse_pattern
    )]
    pub jwt_default_publish: Vec<TopicPattern>,
    /// A browser origin allowed to connect besides the server's own and loopback
    /// ones (repeatable; `*` allows every origin).
    #[arg(long = "allowed-origin", env = "CROSSWIRE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Topics one peer may be subscribed to at once.
    #[arg(long, env = "CROSSWIRE_MAX_TOPICS_PER_PEER", default_value_t = d().max_topics_per_peer)]
    pub max_topics_per_peer: usize,
    /// Open connections from one client address, IPv6 per /64 (0: no limit).
    #[arg(long, env = "CROSSWIRE_MAX_CONNECTIONS_PER_IP", default_value_t = d().max_connections_per_ip)]
    pub max_connections_per_ip: usize,
    /// Sustained publishes per second per peer.
    #[arg(long, env = "CROSSWIRE_PUBLISH_RATE", default_value_t = d().publish_rate)]
    pub publish_rate: u32,
    /// Burst of publishes per peer.
    #[arg(long, env = "CROSSWIRE_PUBLISH_BURST", default_value_t = d().publish_burst)]
    pub publish_burst: u32,
    /// The most bytes one vectored write to a peer's socket carries.
    #[arg(long, env = "CROSSWIRE_WRITE_BUFFER_BYTES", default_value_t = d().write_buffer_size)]
    pub write_buffer_bytes: usize,
    /// The `aud` claim tokens must carry.
    #[arg(long, env = "CROSSWIRE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Allow loopback browser origins even when not listening on loopback.
    #[arg(long, env = "CROSSWIRE_ALLOW_LOOPBACK_ORIGINS")]
    pub allow_loopback_origins: bool,
    /// A `Host` accepted besides loopback names when listening on loopback
    /// (repeatable; `*` turns the DNS-rebinding check off).
    #[arg(long = "allowed-host", env = "CROSSWIRE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// New connections per second per client address (0: unlimited).
    #[arg(long, env = "CROSSWIRE_CONNECT_RATE_PER_IP", default_value_t = d().connect_rate_per_ip)]
    pub connect_rate_per_ip: u32,
    /// Burst of new connections per client address.
    #[arg(long, env = "CROSSWIRE_CONNECT_BURST_PER_IP", default_value_t = d().connect_burst_per_ip)]
    pub connect_burst_per_ip: u32,
    /// A reverse proxy (address or CIDR) whose --trusted-proxy-header names
    /// the client (repeatable).
    #[arg(long = "trusted-proxy", env = "CROSSWIRE_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header trusted proxies name the client in: `x-forwarded-for` or
    /// `forwarded` (the other one is ignored).
    #[arg(long, env = "CROSSWIRE_TRUSTED_PROXY_HEADER", value_name = "HEADER", default_value_t = d().trusted_proxy_header)]
    pub trusted_proxy_header: ProxyHeader,
    /// The Redis server that carries topics between nodes, as
    /// `redis://HOST:PORT[/DB]`; without it every topic lives in this process.
    #[arg(long, env = "CROSSWIRE_REDIS")]
    pub redis: Option<String>,
    /// With Redis: milliseconds a dead node's peers stay in presence lists.
    #[arg(long, env = "CROSSWIRE_PRESENCE_TTL_MS", default_value_t = ms(d().presence_ttl))]
    pub presence_ttl_ms: u64,
}

#[cfg(feature = "cli")]
fn d() -> ServerConfig {
    ServerConfig::default()
}

#[cfg(feature = "cli")]
fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// A CIDR, or one address as its own /32 or /128.
#[cfg(feature = "cli")]
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is neither an address nor a CIDR"))
}

/// A topic pattern as the claims spell it.
#[cfg(feature = "cli")]
fn parse_pattern(text: &str) -> Result<TopicPattern, String> {
    TopicPattern::new(text.trim()).map_err(|e| format!("{text:?} is not a topic pattern: {e}"))
}

#[cfg(feature = "cli")]
impl Args {
    /// The configuration these flags describe, validated.
    pub fn into_config(self) -> Result<ServerConfig, ConfigError> {
        let config = ServerConfig {
            addr: SocketAddr::new(self.host, self.port),
            path: self.path,
            static_dir: self.static_dir,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            max_message_size: self.max_message_bytes,
            outbound_queue: self.outbound_queue,
            max_queue_bytes: self.max_queue_bytes,
            max_total_queue_bytes: self.max_total_queue_bytes,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            max_connections: self.max_connections,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            history_size: self.history_size,
            history_ttl: Duration::from_secs(self.history_ttl_secs),
            history_memory_bytes: self.history_memory_bytes,
            max_history_answer_bytes: self.max_history_answer_bytes,
            max_topics: self.max_topics,
            max_topics_per_ip: self.max_topics_per_ip,
            max_presence_list: self.max_presence_list,
            subscribe_rate: self.subscribe_rate,
            subscribe_burst: self.subscribe_burst,
            jwt_secret: self.jwt_secret,
            jwt_default_subscribe: self.jwt_default_subscribe,
            jwt_default_publish: self.jwt_default_publish,
            allowed_origins: self.allowed_origins,
            max_topics_per_peer: self.max_topics_per_peer,
            max_connections_per_ip: self.max_connections_per_ip,
            publish_rate: self.publish_rate,
            publish_burst: self.publish_burst,
            write_buffer_size: self.write_buffer_bytes,
            jwt_audience: self.jwt_audience,
            allow_loopback_origins: self.allow_loopback_origins,
            allowed_hosts: self.allowed_hosts,
            connect_rate_per_ip: self.connect_rate_per_ip,
            connect_burst_per_ip: self.connect_burst_per_ip,
            trusted_proxies: self.trusted_proxies,
            trusted_proxy_header: self.trusted_proxy_header,
            redis: self.redis,
            presence_ttl: Duration::from_millis(self.presence_ttl_ms),
            ..ServerConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}
