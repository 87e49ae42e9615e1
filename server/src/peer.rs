//! [`Peer`]: the crossws peer. Its identity, its outbound queue, and the
//! send / publish / subscribe operations hooks call on it; nothing of
//! protocol v1, whose operations (`subscribe` with recovery, `publish` with a
//! seq) are crate-private and used by [`crate::PubSub`] only.

use std::{net::SocketAddr, sync::Arc};

use crosswire_shared::{PresenceEntry, RawValue, ServerFrame, Since, Topic};
use tokio::time::Instant;

use crate::{
    engine::{AckTo, EngineError, History, Pending, Publication, ReadLimit},
    frame::Frame,
    message::Message,
    outbox::{Outbox, SendError},
    state::{PeerCore, ServerState},
    topics::{self, lock_index, PeerKey, SubscribeOutcome, Subscriber},
};

/// One connected WebSocket peer, as the hooks see it. Cheap to clone.
///
/// `C` is the context the `upgrade` hook attached.
pub struct Peer<C> {
    inner: Arc<PeerInner<C>>,
}

impl<C> Clone for Peer<C> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

struct PeerInner<C> {
    core: Arc<PeerCore>,
    context: C,
    state: Arc<ServerState>,
}

impl<C> std::fmt::Debug for Peer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("id", &self.inner.core.id).field("remote", &self.inner.core.remote).finish()
    }
}

impl<C> std::fmt::Display for Peer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.core.id)
    }
}

impl<C> Peer<C> {
    pub(crate) fn new(core: Arc<PeerCore>, context: C, state: Arc<ServerState>) -> Self {
        Self { inner: Arc::new(PeerInner { core, context, state }) }
    }

    /// The peer's id, unique within this server run.
    pub fn id(&self) -> &str {
        &self.inner.core.id
    }

    /// This peer as the registry tells peers apart.
    fn key(&self) -> PeerKey {
        PeerKey::of(&self.inner.core.id)
    }

    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.core.remote
    }

    /// What the `upgrade` hook attached.
    pub fn context(&self) -> &C {
        &self.inner.context
    }

    /// Records the authenticated user, shown in presence and the peer list.
    pub(crate) fn set_user(&self, user: Arc<str>) {
        let _ = self.inner.core.user.set(user);
    }

    /// Queues a message to this peer. Never waits: a full queue closes the
    /// peer as a slow consumer and returns [`SendError::QueueFull`], after
    /// which nothing more is sent to it but its close frame.
    pub fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        topics::before_queue_to(self.key());
        self.inner.core.outbox.push(message.into().into_frame())
    }

    /// Queues a protocol frame answering the peer: counted in its queue,
    /// never refused for its size (see `outbox`).
    pub(crate) fn send_frame(&self, frame: &ServerFrame) -> Result<(), SendError> {
        self.send_json(128, |buf| serde_json::to_writer(buf, frame))
    }

    /// Queues, as [`Self::send_frame`] does, a protocol frame whose JSON
    /// `write` appends (about `capacity` bytes): serialized straight into the
    /// frame, not into a `String` first that the frame then copies.
    pub(crate) fn send_json(
        &self,
        capacity: usize,
        write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> Result<(), SendError> {
        let frame = Frame::json_with(capacity, write).expect("server frames always serialize");
        topics::before_queue_to(self.key());
        self.inner.core.outbox.push_reserved(frame)
    }

    /// Queues an answer the protocol built itself (a `history` answer): as
    /// [`Self::send_frame`], counted, never refused for its size.
    pub(crate) fn send_answer(&self, frame: Frame) -> Result<(), SendError> {
        topics::before_queue_to(self.key());
        self.inner.core.outbox.push_reserved(frame)
    }

    /// Sends `message` verbatim to every other subscriber of `topic` (crossws
    /// semantics: the sender is excluded, and need not be subscribed), on
    /// every node. Returns how many peers of this node it was queued for.
    pub fn publish(&self, topic: &Topic, message: impl Into<Message>) -> usize {
        let state = &self.inner.state;
        state.metrics.published();
        state.topics.publish_raw(topic, Some(&self.inner.core.id), message.into())
    }

    /// Publishes `data` as a protocol `message` frame from this peer to every
    /// other subscriber of `topic`: it gets the topic's next seq, which the
    /// engine's answer is, and is kept in the topic's history for recovery.
    /// With `ack`, the `ack` frame is queued to this peer by the step that
    /// delivers the message on this node, so it reaches the peer before any
    /// later message of the topic: a client can tell its own seq from a gap.
    /// `subscribed` says whether this peer is subscribed to `topic` (the
    /// caller has looked); `at` is when it was published (the caller has
    /// read the clock). Not an `async fn`: the memory engine has done it all
    /// when this returns, and a publish is one future fewer per message.
    pub(crate) fn publish_data<'a>(
        &'a self,
        topic: &'a Topic,
        subscribed: bool,
        data: &'a RawValue,
        ack: Option<u64>,
        at: Instant,
    ) -> Pending<'a, u64> {
        let core = &self.inner.core;
        let in_order = ack.is_some() && subscribed;
        let ack = ack.map(|ack| AckTo { outbox: core.outbox.clone(), ack, in_order });
        self.inner.state.topics.publish(topic, Publication { from: &core.id, data, ack, at })
    }

    /// Counts a publish the engine took (see [`Self::publish_data`]).
    pub(crate) fn note_published(&self) {
        self.inner.state.metrics.published();
    }

    fn subscriber(&self, presence: bool) -> Subscriber {
        let core = &self.inner.core;
        // Counted under the client's address (behind a trusted proxy, the
        // one it forwarded) and user: their shares of the topic table. An
        // app's listener that gives no address (0.0.0.0) leaves the user's.
        let sub = Subscriber::new(core.outbox.clone(), core.user.get().cloned(), presence, Arc::clone(&core.topics));
        let ip = core.remote.ip();
        if ip.is_unspecified() {
            sub
        } else {
            sub.counted_under(ip)
        }
    }

    /// Subscribes to `topic` for raw messages; `Ok(false)` if already
    /// subscribed. Fails when the topic would be one more than the server's
    /// topic cap allows, or than this peer's address (or user) may hold
    /// ([`EngineError::TopicShare`]).
    pub fn subscribe(&self, topic: &Topic) -> Result<bool, EngineError> {
        self.inner.state.topics.subscribe_raw(topic, &self.inner.core.id, self.subscriber(false))
    }

    /// Subscribes to `topic` as the protocol does: queues the `subscribed`
    /// frame, then (when `since` is recoverable) every missed message, all
    /// before any live message, and opts into `join`/`leave` events when
    /// `presence` is set. Subscribing again never subscribes twice; with
    /// `since` it replays again.
    pub(crate) async fn subscribe_protocol(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        presence: bool,
    ) -> Result<SubscribeOutcome, EngineError> {
        let reply = |sub: &SubscribeOutcome| {
            Some(ServerFrame::Subscribed {
                topic: topic.clone(),
                epoch: sub.epoch.to_string(),
                seq: sub.seq,
                recovered: sub.recovered,
            })
        };
        let topics = &self.inner.state.topics;
        Ok(topics.subscribe(topic, &self.inner.core.id, self.subscriber(presence), since, reply).await?.0)
    }

    /// Leaves `topic`; returns false if the peer was not subscribed.
    pub fn unsubscribe(&self, topic: &Topic) -> bool {
        self.inner.state.topics.unsubscribe(topic, &self.inner.core.id)
    }

    /// Whether the peer is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: &Topic) -> bool {
        lock_index(&self.inner.core.topics).contains(topic)
    }

    /// The topic named `name` when the peer is subscribed to it: the
    /// subscription's own [`Topic`], so that a publish to a topic of one's
    /// own takes no copy of its name.
    pub(crate) fn subscription(&self, name: &str) -> Option<Topic> {
        lock_index(&self.inner.core.topics).get(name).cloned()
    }

    /// The topics the peer is subscribed to, in name order.
    pub fn topics(&self) -> Vec<Topic> {
        lock_index(&self.inner.core.topics).iter().cloned().collect()
    }

    /// Closes the connection with `code` and `reason`, after the frames
    /// already queued; nothing sent after this call goes out.
    pub fn close(&self, code: u16, reason: &str) {
        topics::before_queue_to(self.key());
        self.inner.core.outbox.close(code, reason);
    }

    /// Leaves every topic; called once when the connection ends.
    pub(crate) fn leave_all(&self) {
        for topic in self.topics() {
            self.inner.state.topics.unsubscribe(&topic, &self.inner.core.id);
        }
    }

    /// Who is subscribed to `topic`, on every node.
    pub(crate) async fn presence(&self, topic: &Topic) -> Result<Vec<PresenceEntry>, EngineError> {
        self.inner.state.topics.presence(topic).await
    }

    /// Spawns a task that the server's shutdown waits for and ends.
    pub(crate) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.state.shutdown.spawn(task)
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.inner.core.outbox
    }

    /// A topic's retained `message` frames for a protocol `history` request
    /// (see `Topics::history`): read access only, no subscription.
    pub(crate) async fn history(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: ReadLimit,
    ) -> Result<Option<History>, EngineError> {
        self.inner.state.topics.history(topic, since, limit).await
    }
}
