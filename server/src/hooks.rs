//! The crossws-style lifecycle hooks a library user implements, and the types
//! they receive.

use std::{future::Future, net::SocketAddr};

use http::{HeaderMap, Method, Uri};

use crate::{message::Message, peer::Peer, response::HttpResponse};

/// What a server does at each point of a WebSocket's life, in the spirit of
/// crossws: `upgrade` (auth), `open`, `message`, `close`, `error`.
///
/// Hooks for one peer run one at a time and in order, on that peer's own task:
/// a slow `message` hook delays only its own peer. Every method but `upgrade`
/// has a default that does nothing.
///
/// ```no_run
/// use crosswire_server::{Hooks, HttpResponse, Message, Peer, Server, ServerConfig, UpgradeRequest};
///
/// struct Chat;
///
/// impl Hooks for Chat {
///     type Context = String; // the user's name, from the upgrade request
///
///     async fn upgrade(&self, req: &UpgradeRequest) -> Result<String, HttpResponse> {
///         req.query_param("name")
///             .map(str::to_owned)
///             .ok_or_else(|| crosswire_server::text_response(http::StatusCode::UNAUTHORIZED, "who are you?"))
///     }
///
///     async fn open(&self, peer: &Peer<String>) {
///         let topic = "chat".parse().unwrap();
///         peer.subscribe(&topic).expect("one topic is far below the topic cap");
///         peer.publish(&topic, format!("{} joined", peer.context()));
///     }
///
///     async fn message(&self, peer: &Peer<String>, message: Message) {
///         if let Message::Text(text) = message {
///             peer.publish(&"chat".parse().unwrap(), format!("{}: {text}", peer.context()));
///         }
///     }
/// }
///
/// # async fn run() -> Result<(), crosswire_server::ServerError> {
/// let server = Server::new(ServerConfig::default(), Chat).bind().await?;
/// server.run_until(async { tokio::signal::ctrl_c().await.ok(); }).await;
/// # Ok(()) }
/// ```
pub trait Hooks: Send + Sync + 'static {
    /// What `upgrade` attaches to the peer, available as [`Peer::context`].
    type Context: Send + Sync + 'static;

    /// Decides on a request to the WebSocket path: `Ok` accepts it with the
    /// peer's context, `Err` answers with any HTTP response instead (a 401 for
    /// a missing login, say).
    ///
    /// It runs after the Origin check and *before* the handshake rules, so a
    /// plain GET to the path learns the hook's verdict (401) rather than 426:
    /// browsers hide why a WebSocket handshake failed, and a client can probe
    /// with such a GET. A request the hook accepts still needs a valid
    /// handshake before the connection opens.
    fn upgrade(&self, request: &UpgradeRequest) -> impl Future<Output = Result<Self::Context, HttpResponse>> + Send;

    /// The connection is open; the peer can be sent to and subscribed.
    fn open(&self, peer: &Peer<Self::Context>) -> impl Future<Output = ()> + Send {
        let _ = peer;
        async {}
    }

    /// A text or binary message arrived from the peer.
    fn message(&self, peer: &Peer<Self::Context>, message: Message) -> impl Future<Output = ()> + Send {
        let _ = (peer, message);
        async {}
    }

    /// The connection ended. The peer has already left all its topics.
    fn close(&self, peer: &Peer<Self::Context>, details: CloseDetails) -> impl Future<Output = ()> + Send {
        let _ = (peer, details);
        async {}
    }

    /// The connection failed (a protocol violation, an oversize message, an
    /// I/O error); `close` follows.
    fn error(&self, peer: &Peer<Self::Context>, error: &PeerError) -> impl Future<Output = ()> + Send {
        let _ = (peer, error);
        async {}
    }
}

/// The HTTP request asking to upgrade, as the `upgrade` hook sees it.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) remote_addr: SocketAddr,
}

impl UpgradeRequest {
    /// The request method (always GET once validated).
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI, with its query.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// A header's value as text, when present and valid ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first query parameter called `name`, as written in the URI: not
    /// percent-decoded (a JWT or an id needs no decoding; decode others yourself).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.uri.query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    /// The cookie called `name`, from any `Cookie` header.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then_some(v)
            })
    }
}

/// How a connection ended, for the `close` hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseDetails {
    /// The close code, from whichever side closed first; 1006 when the
    /// connection dropped without a close frame.
    pub code: u16,
    /// The close reason (may be empty).
    pub reason: String,
}

/// Why a connection failed, for the `error` hook.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// A message exceeded the configured size limit; closed with 1009.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    MessageTooBig {
        /// The size seen so far.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The peer broke the WebSocket protocol; closed with 1002 (or 1007 for bad UTF-8).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer did not read and its outbound queue overflowed (in frames or
    /// bytes); closed with 1013.
    #[error("slow consumer: outbound queue (at most {0} frames) is full")]
    SlowConsumer(usize),
    /// The peer's socket accepted no bytes for the write timeout while the
    /// server had something to send; dropped without a close frame.
    #[error("the peer's socket accepted no bytes for {0:?}")]
    WriteTimeout(std::time::Duration),
    /// The peer was silent past the heartbeat timeout; closed with 3008.
    #[error("no traffic from the peer for {0:?}")]
    HeartbeatTimeout(std::time::Duration),
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(String),
}
