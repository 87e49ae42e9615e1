//! Client configuration.

use std::{fmt, future::Future, pin::Pin, rc::Rc};

use crate::BackoffConfig;

/// The future a [`TokenRefresher`] returns: the new token, or why there is none.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>>>>;

/// An app callback that fetches a fresh token: for the first connect when
/// [`ClientConfig::token`] is `None`, before every reconnect, after the server
/// refused or expired the current token (HTTP 401, close code 4001), and
/// shortly before the current token's `exp`, to hand the server the new one
/// over the open connection.
///
/// A refresher that fails (`Err`) ends the connection with
/// [`crate::Status::Unauthorized`] carrying the error, because retrying
/// without a usable token cannot succeed; the app calls `reconnect()` when it
/// has one again.
///
/// Two refreshers are equal only if they are the same `Rc`, so a config kept
/// in a Yew prop does not reconnect on every render.
#[derive(Clone)]
pub struct TokenRefresher(Rc<dyn Fn() -> TokenFuture>);

impl TokenRefresher {
    /// Wraps an async function returning the new token or an error.
    ///
    /// ```
    /// use crosswire_client::TokenRefresher;
    ///
    /// let refresher = TokenRefresher::new(|| async {
    ///     // e.g. `fetch("/api/token")`
    ///     Ok::<_, std::io::Error>("eyJ...".to_owned())
    /// });
    /// # let _ = refresher;
    /// ```
    pub fn new<F, Fut, E>(f: F) -> Self
    where
        F: Fn() -> Fut + 'static,
        Fut: Future<Output = Result<String, E>> + 'static,
        E: fmt::Display,
    {
        Self(Rc::new(move || {
            let fut = f();
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) }) as TokenFuture
        }))
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
/// `ClientConfig::default()` suits most apps.
///
/// ```
/// use crosswire_client::ClientConfig;
///
/// let config = ClientConfig { queue_capacity: 50, ..ClientConfig::default() }.with_token("secret");
/// assert_eq!(config.token.as_deref(), Some("secret"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
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
    /// How long a publish with `ack` (or a `history` request) may take, in
    /// milliseconds, counted from the call, time spent offline in the queue
    /// included (default 15 000): its future always resolves by then.
    pub ack_timeout_ms: u64,
    /// How long to wait for a `pong` after the browser reported going offline
    /// (or back online) before treating the connection as dead, in
    /// milliseconds (default 3 000).
    pub offline_ping_timeout_ms: u64,
    /// How long before the token's expiry (its JWT `exp`, or the expiry the
    /// server confirmed) the [`TokenRefresher`] runs to hand the server a new
    /// token over the open connection, in milliseconds (default 30 000; at
    /// most half the token's lifetime).
    pub refresh_before_ms: u64,
    /// Refresh the token over the open connection before it expires (default
    /// true). Off, an expiring token ends the connection (4001) and the client
    /// reconnects at once with a new one; for servers without `refresh`.
    pub refresh_in_place: bool,
    /// How many publishes made while offline are kept (default 100); beyond
    /// that the oldest is dropped and reported.
    pub queue_capacity: usize,
    /// Do not retry while the page is hidden; retry at once when it becomes
    /// visible again or the browser goes back online (default false: a
    /// background tab keeps reconnecting, so it does not fall behind the
    /// server's history window).
    pub pause_when_hidden: bool,
    /// A token sent as the `token` query parameter of the WebSocket URL.
    pub token: Option<String>,
    /// Fetches fresh tokens; see [`TokenRefresher`] for when it runs.
    pub token_refresher: Option<TokenRefresher>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            backoff: BackoffConfig::default(),
            connect_timeout_ms: 10_000,
            heartbeat_ms: None,
            pong_timeout_ms: 10_000,
            ack_timeout_ms: 15_000,
            offline_ping_timeout_ms: 3_000,
            refresh_before_ms: 30_000,
            refresh_in_place: true,
            queue_capacity: 100,
            pause_when_hidden: false,
            token: None,
            token_refresher: None,
        }
    }
}

impl ClientConfig {
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
