//! Client configuration.

use std::{fmt, future::Future, pin::Pin, rc::Rc};

use crate::BackoffConfig;

/// The future a [`TokenRefresher`] returns: the new token, or `None` to keep
/// the current one.
pub type TokenFuture = Pin<Box<dyn Future<Output = Option<String>>>>;

/// An app callback that fetches a fresh token before each reconnect (and after
/// the server refused the current one).
///
/// Two refreshers are equal only if they are the same `Rc`, so a config kept
/// in a Yew prop does not reconnect on every render.
#[derive(Clone)]
pub struct TokenRefresher(Rc<dyn Fn() -> TokenFuture>);

impl TokenRefresher {
    /// Wraps an async function returning the new token.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Option<String>> + 'static,
    {
        Self(Rc::new(move || Box::pin(f()) as TokenFuture))
    }

    /// Calls the refresher.
    pub fn refresh(&self) -> TokenFuture {
        (self.0)()
    }
}

impl PartialEq for TokenRefresher {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for TokenRefresher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenRefresher(..)")
    }
}

/// How a client connects, reconnects and keeps its connection honest.
/// `Config::default()` suits most apps.
///
/// ```
/// use crosswire_client::Config;
///
/// let config = Config { queue_capacity: 50, ..Config::default() }.with_token("secret");
/// assert_eq!(config.token.as_deref(), Some("secret"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Reconnect delays and the uptime after which they reset.
    pub backoff: BackoffConfig,
    /// How long a connection may take to open and send `welcome`, in
    /// milliseconds (default 10 000), before it counts as failed.
    pub connect_timeout_ms: u64,
    /// Overrides the ping interval the server asks for in `welcome`, in
    /// milliseconds; `Some(0)` disables the heartbeat.
    pub heartbeat_ms: Option<u64>,
    /// How long to wait for a `pong` before declaring the connection dead, in
    /// milliseconds (default 10 000).
    pub pong_timeout_ms: u64,
    /// How long a publish with `ack` waits for the answer after it was sent,
    /// in milliseconds (default 10 000). Time spent in the offline queue does
    /// not count.
    pub ack_timeout_ms: u64,
    /// How many publishes made while offline are kept (default 100); beyond
    /// that the oldest is dropped and reported.
    pub queue_capacity: usize,
    /// Do not retry while the page is hidden; retry at once when it becomes
    /// visible again or the browser goes back online (default true).
    pub pause_when_hidden: bool,
    /// A token sent as the `token` query parameter of the WebSocket URL.
    pub token: Option<String>,
    /// Called before each reconnect to get a fresh token.
    pub token_refresher: Option<TokenRefresher>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            connect_timeout_ms: 10_000,
            heartbeat_ms: None,
            pong_timeout_ms: 10_000,
            ack_timeout_ms: 10_000,
            queue_capacity: 100,
            pause_when_hidden: true,
            token: None,
            token_refresher: None,
        }
    }
}

impl Config {
    /// Sets the token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the token refresher.
    pub fn with_token_refresher(mut self, refresher: TokenRefresher) -> Self {
        self.token_refresher = Some(refresher);
        self
    }
}
