//! The broker behind the local fan-out: each topic's seq and epoch, its
//! history, delivery to every node, and who is subscribed on other nodes.
//!
//! One [`Engine`] serves one server. It has two implementations here: the
//! embedded [`MemoryEngine`] (the default: one process, nothing to install)
//! and [`RedisEngine`] (`--redis`: any number of nodes sharing topics).
//! Another broker can be plugged in by implementing the trait; the server
//! relies on these guarantees, and nothing else:
//!
//! - **Total order per topic.** [`Engine::publish`] gives the message the
//!   topic's next seq (1, 2, 3, … within an epoch, never a gap, never
//!   reused), retains it, and hands it to every node's [`Node::deliver`]: on
//!   each node, a topic's deliveries arrive in seq order. A node that misses
//!   some (a dropped connection to the broker) fills the hole from
//!   [`Engine::read`] before going on, or, when the history no longer
//!   reaches, calls [`Node::reset`]: never a silent gap.
//! - **Atomic publish.** Seq assignment, history append and the notification
//!   of other nodes are one step: no node sees seq n+1 retained or delivered
//!   without seq n.
//! - **Read after subscribe is exact.** A [`Engine::read`] started after a
//!   subscriber was registered with the node returns every message up to the
//!   seq it reports; everything later reaches the node through `deliver`.
//!   The node merges the two (see `topics.rs`), which is how a `since`
//!   replays exactly the missed messages on any node.
//! - **Epochs.** A topic's epoch changes only when its history is really
//!   lost (forgotten while idle, or a broker restarted without persistence).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use crosswire_shared::{PresenceEntry, RawValue, Since, Topic};
use tokio::time::Instant;

use crate::{frame::Frame, outbox::Outbox};

mod idle;
mod memory;
mod redis;

pub use memory::{MemoryEngine, MemoryLimits};
pub use redis::RedisEngine;

/// Why the engine could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The topic would be one more than the engine may hold, and none is idle.
    #[error("the server holds as many topics as it may ({max}), none idle")]
    TopicLimit {
        /// The configured maximum.
        max: usize,
    },
    /// The broker cannot be reached (or did not answer in time).
    #[error("the message broker is unavailable: {0}")]
    Unavailable(String),
    /// The subscriber's address (or user) holds as many topics as one may:
    /// its share of the topic table (`max_topics_per_ip`). Not the broker's
    /// refusal but the node's, so that it holds whatever the engine.
    #[error("this {holder} holds as many topics as one {holder} may ({max})")]
    TopicShare {
        /// Whose share is used up.
        holder: ShareHolder,
        /// The share.
        max: usize,
    },
}

/// Who holds a share of the topic table (see [`EngineError::TopicShare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShareHolder {
    /// One client address (IPv6: one /64).
    Address,
    /// One authenticated user (the token's `sub`).
    User,
}

impl fmt::Display for ShareHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Address => "address",
            Self::User => "user",
        })
    }
}

/// The answer of an engine operation: at once (the memory engine never
/// waits, and pays for no allocation), or later (a round trip to a broker).
pub enum Pending<'a, T> {
    /// Done.
    Ready(Option<Result<T, EngineError>>),
    /// Under way.
    Later(Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>),
}

impl<T> Pending<'_, T> {
    /// Done now.
    pub fn ready(result: Result<T, EngineError>) -> Self {
        Self::Ready(Some(result))
    }
}

impl<'a, T> Pending<'a, T> {
    /// Done when `future` is.
    pub fn later(future: impl Future<Output = Result<T, EngineError>> + Send + 'a) -> Self {
        Self::Later(Box::pin(future))
    }
}

// Neither variant is pinned in place: `Ready` is moved out of, `Later` is boxed.
impl<T> Unpin for Pending<'_, T> {}

impl<T> Future for Pending<'_, T> {
    type Output = Result<T, EngineError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready(result) => Poll::Ready(result.take().expect("a Pending is polled after it is done")),
            Self::Later(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for Pending<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ready(_) => "Pending::Ready",
            Self::Later(_) => "Pending::Later",
        })
    }
}

/// A `message` frame of protocol v1, encoded once for every subscriber on
/// every node, as the complete WebSocket frame they are all sent (and kept as
/// such in history): JSON text.
#[derive(Clone)]
pub struct MessageText(Frame);

impl PartialEq for MessageText {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_wire() == other.0.as_wire()
    }
}

impl Eq for MessageText {}

impl MessageText {
    /// The frame publishing `data` from `from` as `topic`'s message `seq`.
    pub fn encode(topic: &Topic, seq: u64, from: &str, data: &RawValue) -> Self {
        // `ServerFrame::Message`'s JSON, put together from its parts straight
        // into the WebSocket frame: the data goes from the received frame
        // verbatim, and nothing goes through serde_json. Derived, every
        // constant key was escaped byte by byte too (5% of the typed chat
        // room's instructions). A topic is only ever `[A-Za-z0-9_.:/-]`
        // (`Topic` validates it where it enters): its JSON string is the name
        // in quotes, with nothing to escape. A peer id (the usual `from`)
        // needs no escaping either; any other `from` is escaped by serde_json.
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(seq).as_bytes();
        let escaped;
        let from = if needs_no_escape(from) {
            from.as_bytes()
        } else {
            escaped = serde_json::to_string(from).expect("a string serializes");
            // Without its quotes: the parts around it have them.
            &escaped.as_bytes()[1..escaped.len() - 1]
        };
        const PARTS: [&[u8]; 5] =
            [br#"{"type":"message","topic":""#, br#"","seq":"#, br#","from":""#, br#"","data":"#, b"}"];
        let (topic, data) = (topic.as_str().as_bytes(), data.get().as_bytes());
        let len =
            PARTS.iter().map(|part| part.len()).sum::<usize>() + topic.len() + seq.len() + from.len() + data.len();
        Self(Frame::text_in_place(len, |payload| {
            payload.put(PARTS[0]);
            payload.put(topic);
            payload.put(PARTS[1]);
            payload.put(seq);
            payload.put(PARTS[2]);
            payload.put(from);
            payload.put(PARTS[3]);
            payload.put(data);
            payload.put(PARTS[4]);
        }))
    }

    /// Text a broker carried; it must be UTF-8.
    pub fn from_utf8(bytes: &[u8]) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(bytes).map(|text| Self(Frame::text(text)))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.to_text().expect("built from text")
    }

    /// Its length in bytes (the payload's, without the frame header).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty (never, for a real frame).
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The WebSocket frame, shared.
    pub(crate) fn frame(&self) -> &Frame {
        &self.0
    }
}

impl fmt::Debug for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Whether `text` is its own JSON string body: no control character, quote
/// or backslash (what serde_json escapes). A table, read once per byte of
/// every message's `from`.
fn needs_no_escape(text: &str) -> bool {
    const PLAIN: [bool; 256] = {
        let mut table = [true; 256];
        let mut b = 0;
        while b < 0x20 {
            table[b] = false;
            b += 1;
        }
        table[b'"' as usize] = false;
        table[b'\\' as usize] = false;
        table
    };
    text.bytes().all(|b| PLAIN[usize::from(b)])
}

/// Where a publisher's `ack` goes: queued by the node that delivers the
/// message to its own subscribers, in the same step, so that the publisher
/// has its ack before any later message of the topic. Opaque: an engine only
/// carries it from [`Publication`] to [`Delivery`].
#[derive(Clone)]
pub struct AckTo {
    pub(crate) outbox: Outbox,
    pub(crate) ack: u64,
    /// The publisher is subscribed to the topic on this node: its ack must
    /// take the message's place among the topic's deliveries. When it is
    /// not, order does not matter and the broker's answer may carry it.
    pub(crate) in_order: bool,
}

impl AckTo {
    /// Queues the `ack` frame: the message got `seq`.
    pub(crate) fn send(self, seq: u64) {
        let _ = self.outbox.push_reserved(ack_frame(self.ack, seq));
    }
}

/// `ServerFrame::Ack`'s JSON, put together straight into the WebSocket
/// frame: one per acked publish, where the derived serializer took a
/// `String`, a copy into the frame, and escaped every constant key byte by
/// byte.
fn ack_frame(ack: u64, seq: u64) -> Frame {
    const PARTS: [&[u8]; 3] = [br#"{"type":"ack","ack":"#, br#","seq":"#, b"}"];
    let (mut ack_digits, mut seq_digits) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (ack, seq) = (ack_digits.format(ack).as_bytes(), seq_digits.format(seq).as_bytes());
    let len = PARTS.iter().map(|part| part.len()).sum::<usize>() + ack.len() + seq.len();
    Frame::text_in_place(len, |payload| {
        payload.put(PARTS[0]);
        payload.put(ack);
        payload.put(PARTS[1]);
        payload.put(seq);
        payload.put(PARTS[2]);
    })
}

impl fmt::Debug for AckTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckTo").field("ack", &self.ack).finish_non_exhaustive()
    }
}

/// What a peer (or the server) publishes with a seq.
#[derive(Debug)]
pub struct Publication<'a> {
    /// The publisher's peer id (`"server"` for the server's own), excluded
    /// from the fan-out.
    pub from: &'a str,
    /// The payload.
    pub data: &'a RawValue,
    /// Its ack, if it asked for one.
    pub ack: Option<AckTo>,
    /// When it was published: where its history entry's age starts. Read
    /// by the publisher, which reads the clock for its rate limit anyway.
    pub at: Instant,
}

/// One message of a topic as it reaches a node.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    /// The topic's epoch the seq belongs to.
    pub epoch: Arc<str>,
    /// Its seq.
    pub seq: u64,
    /// The publisher's id, excluded from the fan-out.
    pub from: &'a str,
    /// The encoded `message` frame.
    pub frame: MessageText,
    /// The publisher's ack, on the publisher's node.
    pub ack: Option<AckTo>,
}

/// What [`Node::deliver`] did with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Queued for this node's subscribers (how many).
    Queued(usize),
    /// Already delivered (a catch-up overlapping the live stream): dropped.
    Duplicate,
    /// Not the next seq the node holds for the topic (`after` is the last it
    /// delivered, in `epoch`): the engine must deliver what lies between
    /// first, from [`Engine::read`], or [`Node::reset`] the topic.
    Gap {
        /// The epoch the node holds the topic in.
        epoch: Arc<str>,
        /// The last seq delivered.
        after: u64,
    },
    /// Nobody on this node is subscribed to the topic.
    Nobody,
}

/// How much one [`Engine::read`] returns at most: of the messages asked for,
/// the oldest that fit both bounds, and always at least one (so a reader
/// paging through a topic moves on whatever the size of a message). A
/// bounded read is how a large history is answered, and carried from a
/// broker, a page at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// Messages.
    pub messages: usize,
    /// Their payload bytes (the encoded `message` frames', as [`MessageText::len`]).
    pub bytes: usize,
}

impl ReadLimit {
    /// No bound: everything retained.
    pub const ALL: Self = Self { messages: usize::MAX >> 1, bytes: usize::MAX };

    /// The first messages of `candidates` (oldest first) within the bound.
    pub fn take<T>(self, candidates: impl IntoIterator<Item = T>, len: impl Fn(&T) -> usize) -> Vec<T> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in candidates.into_iter().take(self.messages) {
            let n = len(&item);
            if !out.is_empty() && bytes.saturating_add(n) > self.bytes {
                break;
            }
            bytes = bytes.saturating_add(n);
            out.push(item);
        }
        out
    }
}

/// A topic's position and retained messages, as [`Engine::read`] returns them.
#[derive(Debug, Clone)]
pub struct History {
    /// The epoch.
    pub epoch: Arc<str>,
    /// The last seq assigned.
    pub seq: u64,
    /// Whether the messages after the `since` asked for are all here (true
    /// when no `since` was given).
    pub complete: bool,
    /// Retained messages after `since` (or the latest ones), oldest first,
    /// within the [`ReadLimit`] asked for, with their seqs. When the last
    /// one's seq is below [`seq`](Self::seq), more is retained after it
    /// (or was, when the read was made).
    pub messages: Vec<(u64, MessageText)>,
}

impl History {
    /// The seq after which the rest of the topic's retained messages follow,
    /// when this read stopped short of the topic's last seq (a bound cut it).
    pub fn next(&self) -> Option<u64> {
        let last = self.messages.last()?.0;
        (self.complete && last < self.seq).then_some(last)
    }
}

/// What a node does with what its engine hands it: implemented by the
/// topic registry, so that the engine needs nothing above it.
pub(crate) trait Hub: Send + Sync + 'static {
    fn deliver(&self, topic: &Topic, delivery: Delivery<'_>) -> Delivered;
    fn deliver_raw(&self, topic: &Topic, from: &str, message: Frame) -> usize;
    fn reset(&self, topic: &Topic, epoch: Arc<str>, seq: u64);
    fn positions(&self) -> Vec<(Topic, Arc<str>, u64)>;
    fn announce_remote(&self, topic: &Topic, who: PresenceEntry, joined: bool);
}

/// This node, as an engine sees it: where its deliveries go.
#[derive(Clone)]
pub struct Node {
    hub: Arc<dyn Hub>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

impl Node {
    pub(crate) fn new(hub: Arc<dyn Hub>) -> Self {
        Self { hub }
    }

    /// Hands one message of `topic` to this node's subscribers.
    pub fn deliver(&self, topic: &Topic, delivery: Delivery<'_>) -> Delivered {
        self.hub.deliver(topic, delivery)
    }

    /// Sends a raw (unsequenced) message published on another node to this
    /// node's subscribers of `topic`, except `from`.
    pub fn deliver_raw(&self, topic: &Topic, from: &str, message: crate::Message) -> usize {
        self.hub.deliver_raw(topic, from, message.into_frame())
    }

    /// The topic's history was lost (or a hole can no longer be filled): its
    /// subscribers here are told the new position (`subscribed` with
    /// `recovered: false`) and live delivery resumes after `seq`.
    pub fn reset(&self, topic: &Topic, epoch: Arc<str>, seq: u64) {
        self.hub.reset(topic, epoch, seq)
    }

    /// Where this node stands in each topic it has subscribers for: the
    /// epoch and last seq delivered. What an engine catches up from after
    /// its connection to the broker came back.
    pub fn positions(&self) -> Vec<(Topic, Arc<str>, u64)> {
        self.hub.positions()
    }

    /// A peer of another node joined (`true`) or left `topic`: this node's
    /// watchers are told.
    pub fn presence(&self, topic: &Topic, who: PresenceEntry, joined: bool) {
        self.hub.announce_remote(topic, who, joined)
    }
}

/// The broker. See the module documentation for what an implementation
/// must guarantee.
pub trait Engine: fmt::Debug + Send + Sync + 'static {
    /// Called once, before anything else: where this node's deliveries go.
    /// An engine that needs background tasks (a subscription to its broker)
    /// spawns them here, on the server's runtime; they end with `shutdown`.
    fn start(&self, node: Node, shutdown: tokio_util::sync::CancellationToken);

    /// Gives the message `topic`'s next seq, retains it, and delivers it to
    /// every node; resolves to the seq.
    fn publish<'a>(&'a self, topic: &'a Topic, publication: Publication<'a>) -> Pending<'a, u64>;

    /// Sends a raw message to `topic`'s subscribers on the other nodes (this
    /// node delivers its own): no seq, no history.
    fn broadcast(&self, topic: &Topic, from: &str, message: &crate::Message);

    /// The topic's epoch and last seq, with the retained messages after
    /// `since` (or the latest `limit.messages`), the oldest of them within
    /// `limit` (see [`ReadLimit`]). With `create`, a topic without an epoch
    /// gets one (a subscriber will hold it); without, an unknown topic reads
    /// as empty in epoch `""`.
    fn read<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Pending<'a, History>;

    /// A subscriber on this node now holds `topic`: the topic must stay (an
    /// engine bounding its topics may refuse a new one).
    fn hold(&self, topic: &Topic) -> Result<(), EngineError>;

    /// A subscriber on this node let go of `topic`.
    fn release(&self, topic: &Topic);

    /// A peer of this node joined (`true`) or left `topic`, for the other
    /// nodes' presence lists and watchers.
    fn presence_changed(&self, topic: &Topic, who: &PresenceEntry, joined: bool);

    /// Who is subscribed to `topic` on the other nodes.
    fn remote_presence<'a>(&'a self, topic: &'a Topic) -> Pending<'a, Vec<PresenceEntry>>;

    /// Whether the engine can serve now (its broker is reachable).
    fn is_ready(&self) -> bool;

    /// Periodic upkeep: expire history, forget idle topics.
    fn sweep(&self) {}

    /// Topics the engine holds (on this node, for a shared broker).
    fn topic_count(&self) -> usize;

    /// Bytes of history this process retains.
    fn retained_bytes(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use crosswire_shared::ServerFrame;

    use super::*;

    #[test]
    fn hand_written_frames_are_the_derived_json() {
        for (ack, seq) in [(0, 1), (9, 12_345), (u64::MAX, u64::MAX)] {
            let derived = ServerFrame::Ack { ack, seq }.encode();
            assert_eq!(ack_frame(ack, seq).to_text(), Ok(derived.as_str()));
        }
        let data = RawValue::from_string(r#"{"x": [1, "é\"\n"]}"#.to_owned()).unwrap();
        for (topic, from) in [("t", "0123456789ab"), ("chat:a/b_c.d-e", "server"), ("x", "we\"ird\\ \u{1} é")] {
            let topic = Topic::new(topic).unwrap();
            let derived =
                ServerFrame::Message { topic: topic.clone(), seq: 7, from: from.to_owned(), data: data.clone() };
            assert_eq!(MessageText::encode(&topic, 7, from, &data).as_str(), derived.encode());
        }
    }
}
