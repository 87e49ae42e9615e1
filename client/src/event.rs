//! What the client tells the app: connection status, topic status, messages.

use std::{
    any::{Any, TypeId},
    cell::RefCell,
    rc::Rc,
};

use crosswire_shared::{PeerId, PresenceEntry, RawValue, Since, Topic};

use crate::ClientError;

/// Milliseconds since the Unix epoch, as `Date.now()` gives them.
pub type Millis = u64;

/// The state of the connection, as the app sees it.
///
/// Not `#[non_exhaustive]`: an app that shows the status should show every
/// state, so a new one is a breaking change that fails to compile where a
/// match does not handle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Opening a connection (the first, or a retry).
    Connecting {
        /// The retry number, 0 for the first connection.
        attempt: u32,
    },
    /// Connected and greeted by the server: messages flow.
    Open {
        /// The id the server gave this connection.
        peer: PeerId,
    },
    /// The connection was lost; the next try is scheduled.
    Reconnecting {
        /// The retry number (1-based), reset after a connection stayed up.
        attempt: u32,
        /// When the next try starts (milliseconds since the Unix epoch).
        retry_at: Millis,
        /// The close code of the lost connection, if it had one.
        code: Option<u16>,
    },
    /// The server refused the credentials (HTTP 401 on the handshake, or close
    /// code 4001 with no token refresher), or the token refresher failed.
    /// With `retry_at`, the client retries (jittered, near the maximum
    /// backoff) after refreshing the token; without, only when the app calls
    /// `reconnect()`.
    Unauthorized {
        /// When the next try starts, if one is scheduled.
        retry_at: Option<Millis>,
        /// What went wrong, when known (the refresher's error, the close reason).
        reason: Option<String>,
    },
    /// The server refused this origin or client (HTTP 403 or close code 4003).
    /// Retries like [`Status::Unauthorized`].
    Forbidden {
        /// When the next try starts, if one is scheduled.
        retry_at: Option<Millis>,
    },
    /// Closed for good: by the app, or by the server with a policy close code
    /// (1008 or 4xxx). Nothing is retried until the app calls `reconnect()`.
    Closed {
        /// The close code, if any.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

impl Status {
    /// Whether messages flow.
    pub fn is_open(&self) -> bool {
        matches!(self, Status::Open { .. })
    }

    /// When the next automatic retry starts, if one is scheduled.
    pub fn retry_at(&self) -> Option<Millis> {
        match self {
            Status::Reconnecting { retry_at, .. } => Some(*retry_at),
            Status::Unauthorized { retry_at, .. } | Status::Forbidden { retry_at } => *retry_at,
            _ => None,
        }
    }

    /// A short lowercase name: `connecting`, `open`, `reconnecting`,
    /// `unauthorized`, `forbidden` or `closed`.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Connecting { .. } => "connecting",
            Status::Open { .. } => "open",
            Status::Reconnecting { .. } => "reconnecting",
            Status::Unauthorized { .. } => "unauthorized",
            Status::Forbidden { .. } => "forbidden",
            Status::Closed { .. } => "closed",
        }
    }
}

/// The state of one subscribed topic.
///
/// Not `#[non_exhaustive]`, like [`Status`]: a new state fails to compile
/// where a match does not handle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicStatus {
    /// Waiting for the connection or for the server's `subscribed`.
    Subscribing,
    /// Subscribed: messages flow.
    Live {
        /// The topic history's epoch.
        epoch: String,
        /// Whether the server replayed what this client missed while away.
        recovered: bool,
    },
    /// Subscribed again after a disconnect, but the server could not replay
    /// everything missed: messages after `missed_after` may be lost.
    Gap {
        /// The topic history's current epoch.
        epoch: String,
        /// Where this client had left off.
        missed_after: Since,
    },
    /// The server refused the subscription.
    Refused(ClientError),
}

impl TopicStatus {
    /// Whether messages flow (live, possibly after a gap).
    pub fn is_live(&self) -> bool {
        matches!(self, TopicStatus::Live { .. } | TopicStatus::Gap { .. })
    }
}

/// A message received on a topic, payload still raw JSON.
#[derive(Clone)]
pub struct TopicMessage {
    /// The topic.
    pub topic: Topic,
    /// The message's sequence number within the topic's epoch.
    pub seq: u64,
    /// The publishing peer (`"server"` for server-side publishes).
    pub from: PeerId,
    /// The published JSON, verbatim.
    pub data: Rc<RawValue>,
    /// This connection's own publish, echoed locally once acknowledged (see
    /// `publish_echo`); the server never sends a publisher its own messages.
    pub local: bool,
    /// Typed decodings, shared by every listener of this message: each type
    /// is decoded once per message, not once per component.
    decoded: Rc<RefCell<Decoded>>,
}

/// A message's payload decoded into each type asked for.
type Decoded = Vec<(TypeId, Rc<dyn Any>)>;

impl std::fmt::Debug for TopicMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicMessage")
            .field("topic", &self.topic)
            .field("seq", &self.seq)
            .field("from", &self.from)
            .field("data", &self.data.get())
            .field("local", &self.local)
            .finish()
    }
}

impl PartialEq for TopicMessage {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic
            && self.seq == other.seq
            && self.from == other.from
            && self.local == other.local
            && self.data.get() == other.data.get()
    }
}

/// A message decoded into the app's type `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Received<T> {
    /// The message's seq within the topic.
    pub seq: u64,
    /// Who published it.
    pub from: PeerId,
    /// This connection's own publish, echoed locally.
    pub local: bool,
    /// The payload.
    pub data: T,
}

impl TopicMessage {
    /// A received message.
    pub fn new(topic: Topic, seq: u64, from: PeerId, data: Rc<RawValue>) -> Self {
        Self { topic, seq, from, data, local: false, decoded: Rc::default() }
    }

    /// Deserializes the payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_str(self.data.get()).map_err(|e| ClientError::Payload {
            topic: self.topic.clone(),
            seq: self.seq,
            error: e.to_string(),
        })
    }

    /// The payload decoded into `T`, shared: the first caller for a type
    /// decodes it, later callers (other components of the same message) get
    /// the same `Rc`.
    pub fn received<T: serde::de::DeserializeOwned + 'static>(&self) -> Result<Rc<Received<T>>, ClientError> {
        let id = TypeId::of::<Received<T>>();
        if let Some((_, any)) = self.decoded.borrow().iter().find(|(t, _)| *t == id) {
            if let Ok(done) = any.clone().downcast::<Received<T>>() {
                return Ok(done);
            }
        }
        let done =
            Rc::new(Received { seq: self.seq, from: self.from.clone(), local: self.local, data: self.decode::<T>()? });
        self.decoded.borrow_mut().push((id, done.clone() as Rc<dyn Any>));
        Ok(done)
    }
}

/// The answer to a `history` request: a topic's retained messages.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// The topic.
    pub topic: Topic,
    /// The topic history's epoch (empty for a topic with no history).
    pub epoch: String,
    /// The topic's last seq when the server answered.
    pub seq: u64,
    /// The messages, in seq order.
    pub messages: Vec<TopicMessage>,
}

/// Something the app may want to know; delivered to every listener.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The connection status changed.
    Status(Status),
    /// A message arrived (after de-duplication).
    Message(TopicMessage),
    /// A topic's subscription state changed.
    Topic {
        /// The topic.
        topic: Topic,
        /// Its new state.
        status: TopicStatus,
    },
    /// A topic's subscriber list changed (for topics watched with presence).
    Presence {
        /// The topic.
        topic: Topic,
        /// Who is subscribed now.
        peers: Vec<PresenceEntry>,
    },
    /// A publish with `ack` was answered.
    Ack {
        /// The ack id.
        id: u64,
        /// The seq, or why not.
        result: Result<u64, ClientError>,
    },
    /// A `history` request was answered.
    History {
        /// The request id.
        id: u64,
        /// The messages, or why not.
        result: Result<History, ClientError>,
    },
    /// Something went wrong that is not tied to an ack (a queue overflow, an
    /// unreadable frame, a refused request, an unrecoverable gap).
    Error(ClientError),
}
