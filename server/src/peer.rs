//! A connected peer: its identity, its bounded outbound queue, and the
//! send / publish / subscribe operations hooks call on it.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use crosswire_shared::{close_code, RawValue, ServerFrame, Since, Topic};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{
    self,
    protocol::{frame::coding::CloseCode, CloseFrame},
};

use crate::{topics::Payload, Message, ServerState};

/// Why a frame could not be queued for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The peer's outbound queue was full: the peer is being closed as a slow consumer (1013).
    #[error("the peer's outbound queue is full; it is being closed as a slow consumer")]
    QueueFull,
    /// The peer's connection has ended.
    #[error("the peer's connection is closed")]
    Closed,
}

/// The sending side of one peer's connection: a bounded queue drained by its
/// write loop, plus a close signal that overtakes the queue.
///
/// Publishers never wait on it: a push takes a short lock, appends, and wakes
/// the write loop only when the queue was empty. A peer that stops reading can
/// fill its own queue but never make a publisher (or any other peer) wait.
/// (A plain `VecDeque` under a std mutex: tokio's bounded channel cost a
/// quarter of the fan-out CPU in profiles, mostly in its permit bookkeeping.)
///
/// Live traffic may fill the queue only up to `limit`; the room above it is
/// reserved for answers (`subscribed`, acks, errors) and recovery replays. A
/// replay is as long as the history, while the history must outlast a slow
/// consumer's lag to let it recover: one bound could not serve both.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: Arc<Queue>,
    close: Arc<watch::Sender<Option<CloseFrame>>>,
    limit: usize,
}

/// What the senders and the receiver of one queue share.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when the queue goes from empty to not, or the last sender goes.
    notify: tokio::sync::Notify,
    /// Live limit plus reserve: nothing is queued beyond this.
    capacity: usize,
    /// Live `Outbox` clones; the receiver ends when none is left.
    senders: AtomicUsize,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: std::collections::VecDeque<Queued>,
    /// Reserved frames (answers, replays) still queued: the live limit counts
    /// only what is queued beyond them.
    reserved: usize,
    rx_closed: bool,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Self { queue: Arc::clone(&self.queue), close: Arc::clone(&self.close), limit: self.limit }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.notify.notify_one();
        }
    }
}

/// A frame in a peer's queue, marked with the room it took.
#[derive(Debug)]
pub(crate) struct Queued {
    frame: tungstenite::Message,
    reserved: bool,
}

/// The write loop's ends of an [`Outbox`].
pub(crate) struct OutboxReceiver {
    pub(crate) frames: FrameReceiver,
    pub(crate) close: watch::Receiver<Option<CloseFrame>>,
}

/// The queue's receiving end.
pub(crate) struct FrameReceiver {
    queue: Arc<Queue>,
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        self.queue.state.lock().expect("queue lock").rx_closed = true;
    }
}

impl FrameReceiver {
    /// The next frame, waiting for one; `None` once every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<tungstenite::Message> {
        let queue = Arc::clone(&self.queue);
        loop {
            let notified = queue.notify.notified();
            if let Some(m) = self.try_recv() {
                return Some(m);
            }
            if queue.senders.load(Ordering::Acquire) == 0 {
                return None;
            }
            notified.await;
        }
    }

    /// The next frame if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<tungstenite::Message> {
        let mut st = self.queue.state.lock().expect("queue lock");
        let q = st.frames.pop_front()?;
        if q.reserved {
            st.reserved -= 1;
        }
        Some(q.frame)
    }
}

impl Outbox {
    /// A queue taking `limit` live frames, plus `reserve` more for answers and replays.
    pub(crate) fn new(limit: usize, reserve: usize) -> (Self, OutboxReceiver) {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            notify: tokio::sync::Notify::new(),
            capacity: limit + reserve,
            senders: AtomicUsize::new(1),
        });
        let (close, close_rx) = watch::channel(None);
        let rx = OutboxReceiver { frames: FrameReceiver { queue: Arc::clone(&queue) }, close: close_rx };
        (Self { queue, close: Arc::new(close), limit }, rx)
    }

    /// Queues live traffic (a publish, a hook's `send`), up to the limit.
    pub(crate) fn push(&self, frame: tungstenite::Message) -> Result<(), SendError> {
        self.enqueue(Queued { frame, reserved: false })
    }

    /// Queues an answer or a replayed message, using the reserved room too.
    pub(crate) fn push_reserved(&self, frame: tungstenite::Message) -> Result<(), SendError> {
        self.enqueue(Queued { frame, reserved: true })
    }

    fn enqueue(&self, queued: Queued) -> Result<(), SendError> {
        let mut st = self.queue.state.lock().expect("queue lock");
        if st.rx_closed {
            return Err(SendError::Closed);
        }
        let len = st.frames.len();
        let full = if queued.reserved { len >= self.queue.capacity } else { len - st.reserved >= self.limit };
        if full {
            drop(st);
            self.close(close_code::SLOW_CONSUMER, "slow consumer: outbound queue full");
            return Err(SendError::QueueFull);
        }
        if queued.reserved {
            st.reserved += 1;
        }
        st.frames.push_back(queued);
        drop(st);
        if len == 0 {
            self.queue.notify.notify_one();
        }
        Ok(())
    }

    /// Whether a close has been asked for.
    pub(crate) fn is_closing(&self) -> bool {
        self.close.borrow().is_some()
    }

    /// Asks the write loop to close the connection; the first reason wins.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        self.close.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(CloseFrame { code: CloseCode::from(code), reason: reason.to_owned().into() });
            true
        });
    }
}

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

/// What the server knows of a peer whatever its hooks' context type: the
/// part the server's peer list shares with the [`Peer`] handle.
#[derive(Debug)]
pub(crate) struct PeerCore {
    pub(crate) id: Arc<str>,
    pub(crate) remote: SocketAddr,
    pub(crate) outbox: Outbox,
    pub(crate) topics: Mutex<BTreeSet<Topic>>,
    /// The authenticated user, shown in presence.
    pub(crate) user: Option<Arc<str>>,
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

/// What a protocol-level subscribe did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic history's epoch.
    pub epoch: Arc<str>,
    /// The topic's last seq when subscribing.
    pub seq: u64,
    /// Whether the `since` given was honoured and the missed messages were queued.
    pub recovered: bool,
}

impl<C> Peer<C> {
    pub(crate) fn new(core: Arc<PeerCore>, context: C, state: Arc<ServerState>) -> Self {
        Self { inner: Arc::new(PeerInner { core, context, state }) }
    }

    /// The peer's id, unique within this server run.
    pub fn id(&self) -> &str {
        &self.inner.core.id
    }

    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.core.remote
    }

    /// What the `upgrade` hook attached.
    pub fn context(&self) -> &C {
        &self.inner.context
    }

    /// The authenticated user id, when the connection was authenticated.
    pub fn user(&self) -> Option<&str> {
        self.inner.core.user.as_deref()
    }

    /// Queues a message to this peer. Never waits: a full queue closes the
    /// peer as a slow consumer and returns [`SendError::QueueFull`].
    pub fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.inner.core.outbox.push(message.into().0)
    }

    /// Queues a protocol frame answering the peer (it may use the room
    /// reserved above the live-traffic limit).
    pub fn send_frame(&self, frame: &ServerFrame) -> Result<(), SendError> {
        self.inner.core.outbox.push_reserved(tungstenite::Message::Text(frame.encode().into()))
    }

    /// Sends `message` verbatim to every other subscriber of `topic` (crossws
    /// semantics: the sender is excluded, and need not be subscribed). Returns
    /// how many peers it was queued for.
    pub fn publish(&self, topic: &Topic, message: impl Into<Message>) -> usize {
        self.inner.state.topics.publish(topic, Some(&self.inner.core.id), Payload::Raw(message.into().0)).delivered
    }

    /// Publishes `data` as a protocol `message` frame from this peer to every
    /// other subscriber of `topic`: it gets the topic's next seq, which is
    /// returned, and is kept in the topic's history for recovery.
    pub fn publish_data(&self, topic: &Topic, data: &RawValue) -> u64 {
        let payload = Payload::Data { from: &self.inner.core.id, data };
        self.inner.state.topics.publish(topic, Some(&self.inner.core.id), payload).seq
    }

    /// Subscribes to `topic` for raw messages; returns false if already subscribed.
    pub fn subscribe(&self, topic: &Topic) -> bool {
        self.subscribe_with(topic, None, false, |_| None).1
    }

    /// Subscribes to `topic` as the protocol does: queues the `subscribed`
    /// frame, then (when `since` is recoverable) every missed message, all
    /// before any live message, and opts into `join`/`leave` events when
    /// `presence` is set. Idempotent.
    pub fn subscribe_protocol(&self, topic: &Topic, since: Option<&Since>, presence: bool) -> Subscription {
        self.subscribe_with(topic, since, presence, |sub| {
            Some(ServerFrame::Subscribed {
                topic: topic.clone(),
                epoch: sub.epoch.to_string(),
                seq: sub.seq,
                recovered: sub.recovered,
            })
        })
        .0
    }

    fn subscribe_with(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        presence: bool,
        reply: impl FnOnce(&Subscription) -> Option<ServerFrame>,
    ) -> (Subscription, bool) {
        let sub = crate::topics::Subscriber {
            outbox: self.inner.core.outbox.clone(),
            user: self.inner.core.user.clone(),
            presence,
        };
        let result = self.inner.state.topics.subscribe(topic, &self.inner.core.id, sub, since, reply);
        let newly = self.inner.core.topics.lock().expect("topic set lock").insert(topic.clone());
        (result, newly)
    }

    /// Leaves `topic`; returns false if the peer was not subscribed.
    pub fn unsubscribe(&self, topic: &Topic) -> bool {
        let was = self.inner.core.topics.lock().expect("topic set lock").remove(topic);
        if was {
            self.inner.state.topics.unsubscribe(topic, &self.inner.core.id);
        }
        was
    }

    /// Whether the peer is subscribed to `topic`.
    pub fn is_subscribed(&self, topic: &Topic) -> bool {
        self.inner.core.topics.lock().expect("topic set lock").contains(topic)
    }

    /// The topics the peer is subscribed to, in name order.
    pub fn topics(&self) -> Vec<Topic> {
        self.inner.core.topics.lock().expect("topic set lock").iter().cloned().collect()
    }

    /// Closes the connection with `code` and `reason`, after the frames
    /// already queued.
    pub fn close(&self, code: u16, reason: &str) {
        self.inner.core.outbox.close(code, reason);
    }

    /// Leaves every topic; called once when the connection ends.
    pub(crate) fn leave_all(&self) {
        let topics = std::mem::take(&mut *self.inner.core.topics.lock().expect("topic set lock"));
        for topic in &topics {
            self.inner.state.topics.unsubscribe(topic, &self.inner.core.id);
        }
    }

    /// Who is subscribed to `topic`.
    pub fn presence(&self, topic: &Topic) -> Vec<crosswire_shared::PresenceEntry> {
        self.inner.state.topics.presence(topic)
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.inner.core.outbox
    }

    /// A topic's retained `message` frames for a protocol `history` request
    /// (see `Topics::history`): read access only, no subscription.
    pub(crate) fn history(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: usize,
    ) -> Result<(Arc<str>, u64, Vec<tungstenite::Message>), ()> {
        self.inner.state.topics.history(topic, since, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> tungstenite::Message {
        tungstenite::Message::text(n.to_string())
    }

    #[test]
    fn live_traffic_stops_at_the_limit_and_closes_the_peer() {
        let (outbox, rx) = Outbox::new(2, 3);
        assert!(outbox.push(text(1)).is_ok());
        assert!(outbox.push(text(2)).is_ok());
        assert_eq!(outbox.push(text(3)), Err(SendError::QueueFull));
        let close = rx.close.borrow().clone().expect("a slow consumer is closed");
        assert_eq!(u16::from(close.code), close_code::SLOW_CONSUMER);
    }

    #[test]
    fn reserved_frames_use_their_own_room_and_do_not_count_as_live() {
        let (outbox, mut rx) = Outbox::new(2, 3);
        for n in 0..3 {
            assert!(outbox.push_reserved(text(n)).is_ok(), "a replay of 3 fits the reserve");
        }
        // Live traffic still has its whole limit, whatever the replay holds.
        assert!(outbox.push(text(3)).is_ok());
        assert!(outbox.push(text(4)).is_ok());
        assert_eq!(outbox.push(text(5)), Err(SendError::QueueFull));
        assert_eq!(outbox.push_reserved(text(6)), Err(SendError::QueueFull), "the total is bounded too");
        let order: Vec<_> = std::iter::from_fn(|| rx.frames.try_recv()).map(|m| m.into_text().unwrap()).collect();
        assert_eq!(order, ["0", "1", "2", "3", "4"]);
        assert!(rx.close.borrow().is_some());
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_frames_and_ends_with_the_last_sender() {
        let (outbox, mut rx) = Outbox::new(4, 0);
        let second = outbox.clone();
        let reader = tokio::spawn(async move {
            let mut got = vec![];
            while let Some(m) = rx.frames.recv().await {
                got.push(m.into_text().unwrap().to_string());
            }
            got
        });
        tokio::task::yield_now().await;
        outbox.push(text(1)).unwrap();
        second.push(text(2)).unwrap();
        drop(outbox);
        tokio::task::yield_now().await;
        second.push(text(3)).unwrap();
        drop(second);
        assert_eq!(reader.await.unwrap(), ["1", "2", "3"]);
    }

    #[test]
    fn pushing_to_a_gone_receiver_says_closed() {
        let (outbox, rx) = Outbox::new(4, 4);
        drop(rx);
        assert_eq!(outbox.push(text(1)), Err(SendError::Closed));
        assert_eq!(outbox.push_reserved(text(1)), Err(SendError::Closed));
    }
}
