//! What can go wrong, as the client reports it: [`ClientError`].

use crosswire_shared::{ErrorCode, InvalidTopic, Topic};

/// Everything that can go wrong between the app and a crosswire server, as the
/// client reports it: to an ack future, to a topic hook, or to the app's event
/// listeners. The client never panics on bad input from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered a request with an `error` frame.
    #[error("the server refused{}: {message} ({code})", topic.as_ref().map(|t| format!(" on {t}")).unwrap_or_default())]
    Server {
        /// The error code the server sent.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
        /// The topic of the refused request, when the server named it.
        topic: Option<Topic>,
    },
    /// A publish with `ack` got neither an `ack` nor an `error` in time.
    #[error("no acknowledgement from the server within {0} ms")]
    AckTimeout(u64),
    /// The connection dropped after a publish was sent but before the server
    /// acknowledged it: it may or may not have been delivered.
    #[error("the connection dropped before the server acknowledged the publish")]
    Disconnected,
    /// The offline queue was full, so its oldest publish was dropped unsent.
    #[error("offline queue full: dropped the oldest queued publish (to {topic})")]
    QueueOverflow {
        /// The topic of the dropped publish.
        topic: Topic,
    },
    /// The client was closed (by the app, or the provider unmounted) before
    /// the request completed.
    #[error("the crosswire client was closed")]
    Closed,
    /// The connection ended for good (a policy close, an expired token with
    /// no way to refresh it, a server speaking another protocol version):
    /// queued and new requests fail with this until the app calls `reconnect()`.
    #[error("the connection ended for good ({reason}); call reconnect() to try again")]
    Ended {
        /// The close code, if the server sent one.
        code: Option<u16>,
        /// Why.
        reason: String,
    },
    /// A request (a `history` call) got no answer in time.
    #[error("no answer from the server within {0} ms")]
    RequestTimeout(u64),
    /// The token refresher failed, or the server refused the token it gave.
    #[error("token refresh failed: {0}")]
    TokenRefresh(String),
    /// A topic name the app gave is not valid.
    #[error("invalid topic: {0}")]
    InvalidTopic(#[from] InvalidTopic),
    /// A received payload did not deserialize into the type the app asked for.
    #[error("message {seq} on {topic} does not match the expected type: {error}")]
    Payload {
        /// The topic of the message.
        topic: Topic,
        /// The message's seq.
        seq: u64,
        /// What serde said.
        error: String,
    },
    /// A payload the app published could not be serialized to JSON.
    #[error("could not serialize the payload: {0}")]
    Serialize(String),
    /// The server sent a frame this client could not read.
    #[error("unreadable frame from the server: {0}")]
    Protocol(String),
    /// Messages published while this client was away could not be recovered:
    /// the topic continues live, but some messages are missing.
    #[error("messages on {topic} after seq {after_seq} (epoch {epoch}) could not be recovered")]
    Gap {
        /// The topic.
        topic: Topic,
        /// The epoch the client had seen.
        epoch: String,
        /// The last seq the client had seen in that epoch.
        after_seq: u64,
    },
    /// The browser refused to create a WebSocket (for example a malformed URL).
    #[error("could not open a WebSocket: {0}")]
    Socket(String),
}
