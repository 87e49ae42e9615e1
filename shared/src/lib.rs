//! The crosswire wire protocol, version 1.
//!
//! One JSON object per WebSocket text frame, discriminated by its `"type"` field;
//! fields a receiver does not know are ignored, so either side may grow new ones.
//! The frames are plain serde types compiled for native targets and for
//! `wasm32-unknown-unknown`, so the server and the browser client agree on the
//! protocol at compile time. `docs/PROTOCOL.md` in the repository is the prose
//! specification; this crate is its executable form.
//!
//! ```
//! use crosswire_shared::{ClientFrame, Topic};
//!
//! let frame = ClientFrame::decode(r#"{"type":"publish","topic":"chat:lobby","data":{"text":"hi"},"ack":7}"#)?;
//! let ClientFrame::Publish { topic, data, ack } = frame else { unreachable!() };
//! assert_eq!(topic, Topic::new("chat:lobby")?);
//! assert_eq!(data.get(), r#"{"text":"hi"}"#);
//! assert_eq!(ack, Some(7));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod frame;
mod topic;

pub use error::{DecodeError, ErrorCode};
pub use frame::{ClientFrame, HistoryMessage, PeerId, PresenceEntry, PublishRef, ServerFrame, Since};
pub use serde_json::value::RawValue;
pub use topic::{InvalidTopic, Topic, TopicPattern, MAX_TOPIC_LEN};

/// The protocol version this crate speaks, sent by the server in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket close codes crosswire servers use, so that clients can tell a
/// reason to reconnect from a reason to stop.
pub mod close_code {
    /// The server is shutting down (RFC 6455 "going away"): reconnect with backoff.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message exceeded the server's size limit (counted across fragments).
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// This server node is restarting (RFC 6455 "service restart", a rolling
    /// deploy): other nodes are up, so reconnect at once, jittered within
    /// about a second, and recover the missed messages there.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The peer did not read fast enough and its outbound queue overflowed
    /// (RFC 6455 "try again later"): reconnect and recover the missed messages.
    pub const SLOW_CONSUMER: u16 = 1013;
    /// The peer stayed silent past the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 3008;
    /// The peer's credentials expired or were revoked: do not reconnect
    /// without new ones.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The peer is not allowed what it asked for: do not reconnect blindly.
    pub const FORBIDDEN: u16 = 4003;
}
