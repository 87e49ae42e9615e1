//! Server configuration: the library's [`Config`], and the command-line
//! [`Args`] (flags with environment fallbacks) that the binary and the
//! examples turn into one.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

/// Everything a [`crate::Server`] can be tuned with. `Config::default()` is a
/// sensible, documented starting point.
#[derive(Debug, Clone)]
pub struct Config {
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
    /// Frames that may wait in one peer's outbound queue; a peer whose queue
    /// overflows is closed with 1013 (slow consumer). Default 1024.
    pub outbound_queue: usize,
    /// Open TCP connections at once; further ones get 503. Default 10 000.
    pub max_connections: usize,
    /// How long shutdown waits for peers to finish their close handshake. Default 5 s.
    pub shutdown_grace: Duration,
    /// How many messages each topic keeps for recovery. Default 256; 0 disables history.
    pub history_size: usize,
    /// How long a message is kept for recovery. Default 5 minutes.
    pub history_ttl: Duration,
    /// tungstenite's read buffer per connection. Default 16 KiB: its own
    /// default of 128 KiB is eagerly allocated and costly across many idle peers.
    pub read_buffer_size: usize,
    /// How many bytes tungstenite gathers before writing to the socket. Default 16 KiB.
    pub write_buffer_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3000),
            path: "/_ws".to_owned(),
            static_dir: None,
            heartbeat: Duration::from_secs(25),
            max_message_size: 64 * 1024,
            outbound_queue: 1024,
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(5),
            history_size: 256,
            history_ttl: Duration::from_secs(300),
            read_buffer_size: 16 * 1024,
            write_buffer_size: 16 * 1024,
        }
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
    /// The outbound queue cannot hold a full history replay.
    #[error("outbound_queue ({queue}) must exceed history_size ({history}) so a recovery replay fits")]
    QueueSmallerThanHistory {
        /// The configured queue length.
        queue: usize,
        /// The configured history size.
        history: usize,
    },
}

impl Config {
    /// Checks the values that would otherwise fail later and less clearly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::BadPath(self.path.clone()));
        }
        for (name, zero) in [
            ("heartbeat", self.heartbeat.is_zero()),
            ("max_message_size", self.max_message_size == 0),
            ("outbound_queue", self.outbound_queue == 0),
            ("max_connections", self.max_connections == 0),
        ] {
            if zero {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.outbound_queue <= self.history_size {
            return Err(ConfigError::QueueSmallerThanHistory {
                queue: self.outbound_queue,
                history: self.history_size,
            });
        }
        Ok(())
    }
}

/// Command-line flags, each with an environment fallback, for the binary and
/// the examples (`#[command(flatten)]` them into a clap parser).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "CROSSWIRE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, short, env = "CROSSWIRE_PORT", default_value_t = 3000)]
    pub port: u16,
    /// The WebSocket path.
    #[arg(long, env = "CROSSWIRE_PATH", default_value = "/_ws")]
    pub path: String,
    /// Serve this directory (e.g. the demo's built `dist/`) at `/`.
    #[arg(long = "static", env = "CROSSWIRE_STATIC", value_name = "DIR")]
    pub static_dir: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "CROSSWIRE_HEARTBEAT_MS", default_value_t = 25_000)]
    pub heartbeat_ms: u64,
    /// Largest accepted message in bytes (across fragments).
    #[arg(long, env = "CROSSWIRE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Frames a peer's outbound queue holds before it is closed as a slow consumer.
    #[arg(long, env = "CROSSWIRE_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Open connections at once, server-wide.
    #[arg(long, env = "CROSSWIRE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Milliseconds shutdown waits for peers to close.
    #[arg(long, env = "CROSSWIRE_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
    /// Messages each topic keeps for recovery (0 disables).
    #[arg(long, env = "CROSSWIRE_HISTORY_SIZE", default_value_t = 256)]
    pub history_size: usize,
    /// Seconds a message is kept for recovery.
    #[arg(long, env = "CROSSWIRE_HISTORY_TTL_SECS", default_value_t = 300)]
    pub history_ttl_secs: u64,
}

impl Args {
    /// The configuration these flags describe, validated.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let config = Config {
            addr: SocketAddr::new(self.host, self.port),
            path: self.path,
            static_dir: self.static_dir,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            max_message_size: self.max_message_bytes,
            outbound_queue: self.outbound_queue,
            max_connections: self.max_connections,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            history_size: self.history_size,
            history_ttl: Duration::from_secs(self.history_ttl_secs),
            ..Config::default()
        };
        config.validate()?;
        Ok(config)
    }
}
