//! This node's topics: who is subscribed here, and the fan-out of what the
//! [`Engine`] delivers to them. The engine owns each topic's seq, epoch and
//! history (and, for a cluster, the other nodes); this registry owns the
//! subscribers, their presence events, and the merge that makes recovery
//! exact.
//!
//! Topics are spread over shards, each a std `Mutex` over a map. A lock is
//! held only to update a topic and hand each subscriber a clone of one
//! already-encoded frame (a reference-count bump): never across an `.await`,
//! and never waiting on a peer, because queuing into a peer's [`Outbox`] is a
//! non-blocking push.
//!
//! The one invariant that makes a recovery replay exact: **a subscriber is
//! registered (as pending) before the engine is asked for the topic's
//! history, and every delivery that reaches a pending subscriber is held in
//! its buffer.** The engine guarantees that its read returns every message
//! up to the seq it reports, and that later messages are delivered after the
//! registration; so the replay (after `since`, up to that seq) followed by
//! the buffered deliveries after it is every message exactly once, in
//! order. The same holds on any node of a cluster, which is how a client
//! comes back on another node and misses nothing.

use std::{
    collections::{hash_map::Entry, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, Weak,
    },
};

use ahash::RandomState;
use crosswire_shared::{PresenceEntry, ServerFrame, Since, Topic};

use crate::{
    engine::{AckTo, Delivered, Delivery, Engine, EngineError, History, Hub, Node, Pending, Publication},
    frame::Frame,
    limits::TokenBucket,
    outbox::Outbox,
};

const SHARDS: usize = 32;

/// Presence events one topic may send per second, and in a burst. Past them
/// the watchers get one snapshot of who is there instead of the events: a
/// peer churning a room cannot flood its watchers' queues until they are cut.
const PRESENCE_RATE: u32 = 20;
const PRESENCE_BURST: u32 = 40;

/// Live deliveries one subscriber may have held while its history is read;
/// past them it is cut as a slow consumer (the read is that slow).
const PENDING_LIMIT: usize = 16_384;

type Shard = HashMap<Topic, TopicState, RandomState>;

/// This node's topics.
pub(crate) struct Topics {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    engine: Arc<dyn Engine>,
    /// Messages a subscribe replays at most (the history size).
    replay_limit: usize,
    /// Entries a presence list holds at most.
    presence_list: usize,
    /// Itself, for the tasks it spawns; set by [`Topics::start`].
    me: OnceLock<Weak<Topics>>,
    /// Messages queued for subscribers here, for `/metrics`: one relaxed add
    /// per message, whatever the subscriber count.
    deliveries: AtomicU64,
}

struct TopicState {
    subscribers: HashMap<Arc<str>, Subscriber>,
    /// The epoch and the last seq delivered here; `None` until a subscribe's
    /// read or a delivery tells.
    position: Option<(Arc<str>, u64)>,
    presence_budget: TokenBucket,
    /// Presence events were withheld: the watchers are owed a snapshot.
    presence_owed: bool,
}

/// The topics one peer is subscribed to, as an index for that peer (its
/// `topics()`, its topic count, leaving them all when it goes). Membership
/// itself is each topic's subscriber map: this index is written only here,
/// inside the same shard critical section that changes the map, so the two
/// never disagree. Lock order: shard, then this.
pub(crate) type Memberships = Arc<Mutex<BTreeSet<Topic>>>;

/// One subscriber's entry in a topic.
pub(crate) struct Subscriber {
    pub(crate) outbox: Outbox,
    pub(crate) user: Option<Arc<str>>,
    /// Whether it wants `join`/`leave` events.
    pub(crate) presence: bool,
    /// Its peer's index of topics.
    pub(crate) memberships: Memberships,
    /// While its history is being read: the live deliveries held back, to
    /// follow the replay.
    pending: Option<Vec<(u64, Frame)>>,
}

impl Subscriber {
    pub(crate) fn new(outbox: Outbox, user: Option<Arc<str>>, presence: bool, memberships: Memberships) -> Self {
        Self { outbox, user, presence, memberships, pending: None }
    }

    fn presence_entry(&self, id: &str) -> PresenceEntry {
        PresenceEntry { peer: id.to_owned(), user: self.user.as_deref().map(str::to_owned) }
    }

    /// Queues a live frame, or holds it while the history is read. Inlined
    /// into the fan-out loop: it runs once per delivery.
    #[inline]
    fn push(&mut self, seq: u64, frame: &Frame) -> bool {
        match &mut self.pending {
            Some(held) if held.len() < PENDING_LIMIT => {
                held.push((seq, frame.clone()));
                true
            }
            Some(_) => {
                self.outbox.close_now(crosswire_shared::close_code::SLOW_CONSUMER, "slow consumer");
                false
            }
            None => self.outbox.push(frame.clone()).is_ok(),
        }
    }
}

/// What a protocol-level subscribe did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscribeOutcome {
    /// The topic history's epoch.
    pub(crate) epoch: Arc<str>,
    /// The topic's last seq when subscribing.
    pub(crate) seq: u64,
    /// Whether the `since` given was honoured and the missed messages were queued.
    pub(crate) recovered: bool,
}

impl TopicState {
    fn new() -> Self {
        Self {
            subscribers: HashMap::new(),
            position: None,
            presence_budget: TokenBucket::new(PRESENCE_RATE, PRESENCE_BURST),
            presence_owed: false,
        }
    }

    /// Queues `frame` (message `seq`, 0 for a raw one) for every subscriber
    /// but `from`; returns for how many. The sender is looked up once and
    /// then told apart by the address of its key: comparing its id with
    /// every subscriber's was a string comparison per delivery.
    fn fan_out(&mut self, from: Option<&str>, seq: u64, frame: &Frame) -> usize {
        let except = from.and_then(|from| self.subscribers.get_key_value(from)).map(|(id, _)| id.as_ptr());
        let mut delivered = 0;
        for (id, sub) in &mut self.subscribers {
            if Some(id.as_ptr()) != except && sub.push(seq, frame) {
                delivered += 1;
            }
        }
        delivered
    }

    fn watchers<'a>(&'a self, except: &'a str) -> impl Iterator<Item = &'a Subscriber> + 'a {
        self.subscribers.iter().filter(move |(id, s)| s.presence && &***id != except).map(|(_, s)| s)
    }

    /// Sends a presence event about `who` to every other subscriber here
    /// that opted in, or, past the topic's presence budget, owes them a
    /// snapshot (true: one is owed).
    fn announce(&mut self, topic: &Topic, who: PresenceEntry, joined: bool) -> bool {
        if self.watchers(&who.peer).next().is_none() {
            return false;
        }
        if !self.presence_budget.try_take() {
            self.presence_owed = true;
            return false;
        }
        if self.presence_owed {
            // The events withheld are stale: one snapshot says where things stand.
            return true;
        }
        let except = who.peer.clone();
        let frame = if joined {
            ServerFrame::Join { topic: topic.clone(), who }
        } else {
            ServerFrame::Leave { topic: topic.clone(), who }
        };
        let frame = Frame::text(frame.encode());
        for sub in self.watchers(&except) {
            let _ = sub.outbox.push(frame.clone());
        }
        false
    }

    fn local_presence(&self) -> Vec<PresenceEntry> {
        self.subscribers.iter().map(|(id, s)| s.presence_entry(id)).collect()
    }
}

impl Topics {
    pub(crate) fn new(engine: Arc<dyn Engine>, replay_limit: usize, presence_list: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::new(),
            engine,
            replay_limit,
            presence_list,
            me: OnceLock::new(),
            deliveries: AtomicU64::new(0),
        }
    }

    /// Starts the engine, delivering to `this`.
    pub(crate) fn start(this: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let hub: Weak<Self> = Arc::downgrade(this);
        let _ = this.me.set(hub.clone());
        this.engine.start(Node::new(Arc::new(WeakHub(hub))), shutdown);
    }

    pub(crate) fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    fn shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one(topic.as_str()) as usize % SHARDS])
    }

    /// Publishes protocol data: the engine gives it the next seq and hands
    /// it back (on every node) through [`Hub::deliver`].
    pub(crate) fn publish<'a>(&'a self, topic: &'a Topic, publication: Publication<'a>) -> Pending<'a, u64> {
        self.engine.publish(topic, publication)
    }

    /// Sends a raw message to every subscriber of `topic` but `from`, here
    /// and on the other nodes; returns how many here.
    pub(crate) fn publish_raw(&self, topic: &Topic, from: Option<&str>, message: crate::Message) -> usize {
        self.engine.broadcast(topic, from.unwrap_or(""), &message);
        self.deliver_raw(topic, from, message.into_frame())
    }

    pub(crate) fn deliver_raw(&self, topic: &Topic, from: Option<&str>, frame: Frame) -> usize {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return 0 };
        let delivered = state.fan_out(from, 0, &frame);
        self.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Subscribes `peer` for raw messages (no epoch, no replay); false if it
    /// already was.
    pub(crate) fn subscribe_raw(&self, topic: &Topic, peer: &Arc<str>, sub: Subscriber) -> Result<bool, EngineError> {
        if lock_index(&sub.memberships).contains(topic) {
            return Ok(false);
        }
        self.engine.hold(topic)?;
        let mut shard = self.shard(topic);
        let state = shard.entry(topic.clone()).or_insert_with(TopicState::new);
        let is_new = match state.subscribers.entry(peer.clone()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(e) => {
                lock_index(&sub.memberships).insert(topic.clone());
                e.insert(sub);
                true
            }
        };
        let joined = if is_new { self.announced(state, topic, peer) } else { None };
        drop(shard);
        if !is_new {
            self.engine.release(topic);
        }
        self.after_join(topic, joined);
        Ok(is_new)
    }

    /// Subscribes `peer` as the protocol does (again, if it already is: then
    /// only its presence wish changes and `since` replays again): queues the
    /// reply `reply` makes of the outcome, then the messages after `since`
    /// when they are all retained, then the live ones. The bool says whether
    /// it was not subscribed before.
    pub(crate) async fn subscribe(
        &self,
        topic: &Topic,
        peer: &Arc<str>,
        mut sub: Subscriber,
        since: Option<&Since>,
        reply: impl FnOnce(&SubscribeOutcome) -> Option<ServerFrame>,
    ) -> Result<(SubscribeOutcome, bool), EngineError> {
        let memberships = Arc::clone(&sub.memberships);
        let is_new = !lock_index(&memberships).contains(topic);
        if is_new {
            self.engine.hold(topic)?;
        }
        sub.pending = Some(Vec::new());
        {
            let mut shard = self.shard(topic);
            let state = shard.entry(topic.clone()).or_insert_with(TopicState::new);
            match state.subscribers.entry(peer.clone()) {
                Entry::Occupied(mut e) => {
                    let existing = e.get_mut();
                    existing.presence = sub.presence;
                    existing.pending.get_or_insert_with(Vec::new);
                }
                Entry::Vacant(e) => {
                    lock_index(&memberships).insert(topic.clone());
                    e.insert(sub);
                }
            }
        }
        // Registered first, read second: see the module documentation.
        let read = self.engine.read(topic, since, self.replay_limit, true).await;
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            // Unsubscribed meanwhile: nothing to complete.
            return read.map(|h| (SubscribeOutcome { epoch: h.epoch, seq: h.seq, recovered: false }, false));
        };
        let history = match read {
            Ok(history) => history,
            Err(e) => {
                // Nothing was promised: a new subscriber goes again, one that
                // was subscribed gets its held deliveries and stays.
                if is_new {
                    if state.subscribers.remove(&**peer).is_some() {
                        lock_index(&memberships).remove(topic);
                    }
                    self.remove_if_empty(&mut shard, topic);
                    drop(shard);
                    self.engine.release(topic);
                } else if let Some(sub) = state.subscribers.get_mut(&**peer) {
                    for (_, frame) in sub.pending.take().unwrap_or_default() {
                        let _ = sub.outbox.push(frame);
                    }
                }
                return Err(e);
            }
        };
        let Some(sub) = state.subscribers.get_mut(&**peer) else {
            return Ok((SubscribeOutcome { epoch: history.epoch, seq: history.seq, recovered: false }, false));
        };
        let History { epoch, seq, complete, messages } = history;
        let recovered = since.is_some_and(|s| complete && *s.epoch == *epoch);
        let outcome = SubscribeOutcome { epoch: epoch.clone(), seq, recovered };
        if let Some(frame) = reply(&outcome) {
            let _ = sub.outbox.push_reserved(Frame::text(frame.encode()));
        }
        if let (true, Some(since)) = (recovered, since) {
            for (_, frame) in messages.iter().filter(|(s, _)| *s > since.seq && *s <= seq) {
                let _ = sub.outbox.push_reserved(frame.frame().clone());
            }
        }
        // Raw messages (seq 0) held meanwhile go out too, in their place.
        for (_, frame) in sub.pending.take().unwrap_or_default().into_iter().filter(|(s, _)| *s == 0 || *s > seq) {
            let _ = sub.outbox.push(frame);
        }
        match &mut state.position {
            Some((at, last)) if **at == *epoch => *last = (*last).max(seq),
            Some(_) => {}
            None => state.position = Some((epoch, seq)),
        }
        let joined = if is_new { self.announced(state, topic, peer) } else { None };
        drop(shard);
        self.after_join(topic, joined);
        Ok((outcome, is_new))
    }

    /// Tells local watchers that `peer` joined; its entry, and whether a
    /// snapshot is owed now.
    fn announced(&self, state: &mut TopicState, topic: &Topic, peer: &str) -> Option<(PresenceEntry, bool)> {
        let entry = state.subscribers.get_key_value(peer).map(|(id, s)| s.presence_entry(id))?;
        let snapshot = state.announce(topic, entry.clone(), true);
        Some((entry, snapshot))
    }

    /// What follows a join once the shard lock is released: the other nodes
    /// are told, and an owed snapshot is sent.
    fn after_join(&self, topic: &Topic, joined: Option<(PresenceEntry, bool)>) {
        let Some((entry, snapshot)) = joined else { return };
        self.engine.presence_changed(topic, &entry, true);
        if snapshot {
            self.send_snapshot(topic);
        }
    }

    /// Unsubscribes `peer`; false if it was not subscribed.
    pub(crate) fn unsubscribe(&self, topic: &Topic, peer: &str) -> bool {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return false };
        let Some(entry) = state.subscribers.get_key_value(peer).map(|(id, s)| s.presence_entry(id)) else {
            return false;
        };
        let snapshot = state.announce(topic, entry.clone(), false);
        let gone = state.subscribers.remove(peer).expect("just found");
        lock_index(&gone.memberships).remove(topic);
        self.remove_if_empty(&mut shard, topic);
        drop(shard);
        self.engine.release(topic);
        self.engine.presence_changed(topic, &entry, false);
        if snapshot {
            self.send_snapshot(topic);
        }
        true
    }

    fn remove_if_empty(&self, shard: &mut Shard, topic: &Topic) {
        // Without subscribers there is no watcher owed a snapshot either, and
        // a topic joined again starts from what the engine says.
        if shard.get(topic).is_some_and(|s| s.subscribers.is_empty()) {
            shard.remove(topic);
        }
    }

    /// Who is subscribed to `topic` on every node, in peer-id order, at most
    /// the presence list limit of them.
    pub(crate) async fn presence(&self, topic: &Topic) -> Result<Vec<PresenceEntry>, EngineError> {
        let remote = self.engine.remote_presence(topic).await?;
        Ok(self.merge_presence(topic, remote))
    }

    fn merge_presence(&self, topic: &Topic, mut list: Vec<PresenceEntry>) -> Vec<PresenceEntry> {
        if let Some(state) = self.shard(topic).get(topic) {
            list.extend(state.local_presence());
        }
        list.sort_by(|a, b| a.peer.cmp(&b.peer));
        list.dedup_by(|a, b| a.peer == b.peer);
        list.truncate(self.presence_list);
        list
    }

    /// Sends the watchers of `topic` who is there now, in place of the
    /// events withheld. With other nodes, their part is read first, by a
    /// task of its own (the caller may hold a peer's turn).
    fn send_snapshot(&self, topic: &Topic) {
        match self.engine.remote_presence(topic) {
            Pending::Ready(Some(Ok(remote))) => self.push_snapshot(topic, remote),
            Pending::Ready(_) => {}
            Pending::Later(_) => {
                let Some(this) = self.me.get().and_then(Weak::upgrade) else { return };
                let topic = topic.clone();
                tokio::spawn(async move {
                    // Failing, the snapshot stays owed: the next sweep tries again.
                    if let Ok(remote) = this.engine.remote_presence(&topic).await {
                        this.push_snapshot(&topic, remote);
                    }
                });
            }
        }
    }

    fn push_snapshot(&self, topic: &Topic, remote: Vec<PresenceEntry>) {
        let list = self.merge_presence(topic, remote);
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        state.presence_owed = false;
        let frame = ServerFrame::Presence { topic: topic.clone(), id: None, peers: list };
        let frame = Frame::text(frame.encode());
        for sub in state.watchers("") {
            let _ = sub.outbox.push(frame.clone());
        }
    }

    /// Sends the presence snapshots owed and lets the engine do its upkeep.
    pub(crate) fn sweep(&self) {
        let mut owed = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            for (topic, state) in shard.iter_mut() {
                if state.presence_owed && state.presence_budget.try_take() {
                    owed.push(topic.clone());
                }
            }
        }
        for topic in owed {
            self.send_snapshot(&topic);
        }
        self.engine.sweep();
    }

    /// Messages queued for this node's subscribers so far.
    pub(crate) fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Relaxed)
    }

    /// How many topics exist now.
    pub(crate) fn len(&self) -> usize {
        self.engine.topic_count()
    }

    /// Bytes of history retained now, in this process.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.engine.retained_bytes()
    }

    /// A topic's retained messages for a `history` request, without
    /// subscribing: the encoded `message` frames after `since` (the oldest
    /// `limit` of them), or the latest `limit` when `since` is `None`, with
    /// the topic's epoch and last seq. `None` when `since` names another
    /// epoch or reaches back past what is retained.
    pub(crate) async fn history(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: usize,
    ) -> Result<Option<History>, EngineError> {
        let history = self.engine.read(topic, since, limit, false).await?;
        let reaches = since.is_none_or(|s| history.complete && *s.epoch == *history.epoch);
        Ok(reaches.then_some(history))
    }

    fn deliver(&self, topic: &Topic, delivery: Delivery<'_>) -> Delivered {
        let Delivery { epoch, seq, from, frame, ack } = delivery;
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            ack_now(ack, seq);
            return Delivered::Nobody;
        };
        if let Some((at, last)) = &state.position {
            let same_epoch = Arc::ptr_eq(at, &epoch) || **at == *epoch;
            if same_epoch && seq <= *last {
                // The message went out already (a catch-up overlapping the
                // stream); an ack riding this copy has not.
                ack_now(ack, seq);
                return Delivered::Duplicate;
            }
            if !same_epoch || seq != *last + 1 {
                return Delivered::Gap { epoch: at.clone(), after: *last };
            }
        }
        state.position = Some((epoch, seq));
        // Queued before the fan-out, in the same critical section: the
        // publisher gets its ack before any message with a later seq, so a
        // seq it never sees live is always explained by an ack it already has.
        ack_now(ack, seq);
        let delivered = state.fan_out(Some(from), seq, frame.frame());
        self.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        Delivered::Queued(delivered)
    }

    fn reset(&self, topic: &Topic, epoch: Arc<str>, seq: u64) {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        state.position = Some((epoch.clone(), seq));
        let frame = ServerFrame::Subscribed { topic: topic.clone(), epoch: epoch.to_string(), seq, recovered: false };
        let frame = Frame::text(frame.encode());
        for sub in state.subscribers.values_mut() {
            match &mut sub.pending {
                // Its read will tell it where things stand; what it holds is of the old epoch.
                Some(held) => held.clear(),
                None => {
                    let _ = sub.outbox.push_reserved(frame.clone());
                }
            }
        }
    }

    fn positions(&self) -> Vec<(Topic, Arc<str>, u64)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            all.extend(shard.iter().filter_map(|(t, s)| s.position.as_ref().map(|(e, q)| (t.clone(), e.clone(), *q))));
        }
        all
    }

    fn announce_remote(&self, topic: &Topic, who: PresenceEntry, joined: bool) {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        let snapshot = state.announce(topic, who, joined);
        drop(shard);
        if snapshot {
            self.send_snapshot(topic);
        }
    }
}

fn ack_now(ack: Option<AckTo>, seq: u64) {
    if let Some(ack) = ack {
        ack.send(seq);
    }
}

/// The registry as its engine holds it: weakly, since the registry owns
/// the engine.
struct WeakHub(Weak<Topics>);

impl Hub for WeakHub {
    fn deliver(&self, topic: &Topic, delivery: Delivery<'_>) -> Delivered {
        self.0.upgrade().map_or(Delivered::Nobody, |t| t.deliver(topic, delivery))
    }

    fn deliver_raw(&self, topic: &Topic, from: &str, message: Frame) -> usize {
        self.0.upgrade().map_or(0, |t| t.deliver_raw(topic, Some(from), message))
    }

    fn reset(&self, topic: &Topic, epoch: Arc<str>, seq: u64) {
        if let Some(t) = self.0.upgrade() {
            t.reset(topic, epoch, seq)
        }
    }

    fn positions(&self) -> Vec<(Topic, Arc<str>, u64)> {
        self.0.upgrade().map(|t| t.positions()).unwrap_or_default()
    }

    fn announce_remote(&self, topic: &Topic, who: PresenceEntry, joined: bool) {
        if let Some(t) = self.0.upgrade() {
            t.announce_remote(topic, who, joined)
        }
    }
}

pub(crate) fn lock_index(index: &Memberships) -> MutexGuard<'_, BTreeSet<Topic>> {
    // Only ever changed by one insert or remove at a time: consistent even
    // if a panic poisoned it.
    index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock would be a bug in this module; the
    // map is still consistent at every await-free step, so keep serving.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    //! The registry over the memory engine: what a subscriber receives.
    use std::time::Duration;

    use crosswire_shared::RawValue;

    use super::*;
    use crate::{
        engine::{MemoryEngine, MemoryLimits},
        outbox::{Bounds, OutboxReceiver, QueueBudget},
    };

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn limits(history_size: usize) -> MemoryLimits {
        MemoryLimits { history_size, history_ttl: Duration::from_secs(60), max_topics: 1000, history_bytes: usize::MAX }
    }

    fn topics_with(limits: MemoryLimits, presence_list: usize) -> Arc<Topics> {
        let topics = Arc::new(Topics::new(Arc::new(MemoryEngine::new(limits)), limits.history_size, presence_list));
        Topics::start(&topics, tokio_util::sync::CancellationToken::new());
        topics
    }

    fn topics(history_size: usize) -> Arc<Topics> {
        topics_with(limits(history_size), 1000)
    }

    fn sub(capacity: usize) -> (Subscriber, OutboxReceiver) {
        let (outbox, rx) = Outbox::new(Bounds { frames: capacity, bytes: usize::MAX }, QueueBudget::new(usize::MAX));
        (Subscriber::new(outbox, None, false, Memberships::default()), rx)
    }

    fn watcher() -> (Subscriber, OutboxReceiver) {
        let (mut s, rx) = sub(1 << 20);
        s.presence = true;
        (s, rx)
    }

    fn texts(rx: &mut OutboxReceiver) -> Vec<String> {
        let mut out = vec![];
        while let Some(m) = rx.frames.try_recv() {
            out.push(m.into_text().unwrap().to_string());
        }
        out
    }

    fn data(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    async fn publish(topics: &Topics, t: &Topic, n: u64) -> Result<u64, EngineError> {
        topics.publish(t, Publication { from: "x", data: &data(n), ack: None }).await
    }

    async fn join(topics: &Topics, t: &Topic, id: &str, s: Subscriber, since: Option<&Since>) -> SubscribeOutcome {
        topics.subscribe(t, &id.into(), s, since, |_| None).await.unwrap().0
    }

    #[tokio::test]
    async fn seq_ack_and_exclusion() {
        let topics = topics(4);
        let t = topic("t");
        let (a, mut arx) = sub(16);
        let a_outbox = a.outbox.clone();
        let (b, mut brx) = sub(16);
        join(&topics, &t, "a", a, None).await;
        join(&topics, &t, "b", b, None).await;
        let ack = Some(AckTo { outbox: a_outbox, ack: 9, in_order: true });
        assert_eq!(topics.publish(&t, Publication { from: "a", data: &data(1), ack }).await, Ok(1));
        assert_eq!(
            texts(&mut arx),
            [r#"{"type":"ack","ack":9,"seq":1}"#],
            "the publisher gets its ack, not its message"
        );
        assert_eq!(texts(&mut brx), [r#"{"type":"message","topic":"t","seq":1,"from":"a","data":1}"#]);
    }

    #[tokio::test]
    async fn the_peers_index_follows_the_subscriber_map() {
        let topics = topics(0);
        let (a, b) = (topic("a"), topic("b"));
        let index = Memberships::default();
        let entry = || Subscriber::new(sub(4).0.outbox, None, false, Arc::clone(&index));
        assert!(topics.subscribe_raw(&a, &"p".into(), entry()).unwrap());
        assert!(topics.subscribe_raw(&b, &"p".into(), entry()).unwrap());
        assert!(!topics.subscribe_raw(&a, &"p".into(), entry()).unwrap(), "subscribing again is not joining again");
        assert_eq!(lock_index(&index).iter().cloned().collect::<Vec<_>>(), [a.clone(), b.clone()]);
        assert!(topics.unsubscribe(&a, "p"));
        assert!(!topics.unsubscribe(&a, "p"));
        assert_eq!(lock_index(&index).iter().cloned().collect::<Vec<_>>(), [b]);
    }

    #[tokio::test]
    async fn recovery_window() {
        let topics = topics(3);
        let t = topic("t");
        let epoch = join(&topics, &t, "probe", sub(16).0, None).await.epoch;
        for n in 1..=5 {
            publish(&topics, &t, n).await.unwrap();
        }
        let since = |seq| Since { epoch: epoch.to_string(), seq };
        // Retained: 3, 4, 5. From 2 on is recoverable, from 1 is not.
        let (s, mut rx) = sub(16);
        assert!(join(&topics, &t, "p", s, Some(&since(2))).await.recovered);
        assert_eq!(texts(&mut rx).len(), 3);
        assert!(!join(&topics, &t, "q", sub(16).0, Some(&since(1))).await.recovered);
        assert!(join(&topics, &t, "r", sub(16).0, Some(&since(5))).await.recovered);
        assert!(!join(&topics, &t, "s", sub(16).0, Some(&since(6))).await.recovered);
        let wrong = Since { epoch: "other".into(), seq: 4 };
        assert!(!join(&topics, &t, "u", sub(16).0, Some(&wrong)).await.recovered);
    }

    #[tokio::test]
    async fn deliveries_while_the_history_is_read_follow_the_replay_once() {
        // What a broker's delay looks like: the registry is handed seq 2 and
        // 3 while a subscriber with `since` 0 waits for its read, which then
        // reports seq 2 (message 3 came later). The subscriber gets 1, 2
        // from the read and 3 from what was held: each once, in order.
        let topics = topics(8);
        let t = topic("t");
        let epoch = join(&topics, &t, "probe", sub(16).0, None).await.epoch;
        publish(&topics, &t, 1).await.unwrap();
        let (mut s, mut rx) = sub(16);
        s.pending = Some(Vec::new());
        topics.shard(&t).get_mut(&t).unwrap().subscribers.insert("late".into(), s);
        publish(&topics, &t, 2).await.unwrap();
        let read = topics.engine.read(&t, Some(&Since { epoch: epoch.to_string(), seq: 0 }), 8, true).await.unwrap();
        publish(&topics, &t, 3).await.unwrap();
        assert_eq!(read.seq, 2);
        // Completing by hand what `subscribe` does after its read.
        let mut shard = topics.shard(&t);
        let sub = shard.get_mut(&t).unwrap().subscribers.get_mut("late").unwrap();
        for (_, frame) in read.messages.iter().filter(|(s, _)| *s <= read.seq) {
            sub.outbox.push_reserved(frame.frame().clone()).unwrap();
        }
        for (_, frame) in sub.pending.take().unwrap().into_iter().filter(|(s, _)| *s > read.seq) {
            sub.outbox.push(frame).unwrap();
        }
        drop(shard);
        let seqs: Vec<u64> = texts(&mut rx)
            .iter()
            .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap()["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn history_expires_and_empty_topics_go() {
        let topics = topics_with(MemoryLimits { history_ttl: Duration::from_secs(10), ..limits(8) }, 1000);
        let t = topic("t");
        let (s, _rx) = sub(4);
        let epoch = join(&topics, &t, "a", s, None).await.epoch;
        publish(&topics, &t, 1).await.unwrap();
        topics.unsubscribe(&t, "a");
        assert_eq!((topics.len(), topics.retained_bytes() > 0), (1, true), "retained history keeps the topic");
        // Idle but within the TTL: kept, so its only subscriber can come back to the same epoch.
        topics.sweep();
        assert_eq!(topics.len(), 1);
        let back = Since { epoch: epoch.to_string(), seq: 0 };
        assert!(join(&topics, &t, "a", sub(4).0, Some(&back)).await.recovered);
        topics.unsubscribe(&t, "a");
        tokio::time::advance(Duration::from_secs(11)).await;
        topics.sweep();
        assert_eq!(topics.len(), 0);
        assert_eq!(topics.retained_bytes(), 0, "expired history is no longer counted");
        // Raw publishes to a topic nobody is in create nothing.
        assert_eq!(topics.publish_raw(&t, None, crate::Message::from("x")), 0);
        assert_eq!(topics.len(), 0);
    }

    #[tokio::test]
    async fn publishing_where_nobody_ever_subscribed_retains_nothing() {
        let topics = topics(8);
        for n in 0..100 {
            assert_eq!(publish(&topics, &topic(&format!("nowhere{n}")), n).await, Ok(1));
        }
        assert_eq!(topics.retained_bytes(), 0, "nobody holds an epoch to ask for it");
    }

    #[tokio::test]
    async fn full_queue_is_isolated() {
        let topics = topics(0);
        let t = topic("t");
        let (slow, mut slow_rx) = sub(2);
        let (fast, mut fast_rx) = sub(64);
        join(&topics, &t, "slow", slow, None).await;
        join(&topics, &t, "fast", fast, None).await;
        for n in 0..10 {
            publish(&topics, &t, n).await.unwrap();
        }
        assert_eq!(texts(&mut fast_rx).len(), 10);
        assert!(texts(&mut slow_rx).is_empty(), "a cut peer gets nothing after the refused frame, only its close");
        assert!(slow_rx.closing().is_some(), "the slow peer is told to close");
    }

    #[tokio::test]
    async fn at_the_topic_cap_an_idle_topic_makes_room_and_a_busy_one_does_not() {
        let topics = topics_with(MemoryLimits { max_topics: 4, ..limits(8) }, 1000);
        let mut held = vec![];
        for n in 0..4 {
            let t = topic(&format!("held{n}"));
            let (s, rx) = sub(4);
            join(&topics, &t, "p", s, None).await;
            held.push((t, rx));
        }
        assert_eq!(topics.len(), 4);
        let fresh = topic("fresh");
        assert_eq!(
            topics.subscribe(&fresh, &"p".into(), sub(4).0, None, |_| None).await.map(|_| ()),
            Err(EngineError::TopicLimit { max: 4 }),
            "every topic has a subscriber: none may go"
        );
        assert_eq!(publish(&topics, &fresh, 1).await, Err(EngineError::TopicLimit { max: 4 }));
        // Once a topic is idle, a new one takes its place.
        topics.unsubscribe(&held[0].0, "p");
        assert!(topics.subscribe(&fresh, &"p".into(), sub(4).0, None, |_| None).await.is_ok());
        assert_eq!(topics.len(), 4, "the cap holds");
    }

    #[tokio::test]
    async fn history_bytes_are_bounded_server_wide_oldest_first() {
        let budget = 64 * 1024;
        let topics = topics_with(MemoryLimits { history_bytes: budget, ..limits(100_000) }, 1000);
        let (old, new) = (topic("old"), topic("new"));
        let old_epoch = join(&topics, &old, "a", sub(1 << 20).0, None).await.epoch;
        let new_epoch = join(&topics, &new, "a", sub(1 << 20).0, None).await.epoch;
        let blob = RawValue::from_string(format!("\"{}\"", "x".repeat(1000))).unwrap();
        for _ in 0..50 {
            topics.publish(&old, Publication { from: "x", data: &blob, ack: None }).await.unwrap();
        }
        for _ in 0..500 {
            topics.publish(&new, Publication { from: "x", data: &blob, ack: None }).await.unwrap();
            assert!(topics.retained_bytes() <= budget, "{} > {budget}", topics.retained_bytes());
        }
        assert!(topics.retained_bytes() > budget / 2, "eviction keeps most of the budget in use");
        // The old topic's messages were the oldest: they went first.
        let since = |epoch: &Arc<str>, seq| Since { epoch: epoch.to_string(), seq };
        assert!(!join(&topics, &old, "b", sub(1 << 20).0, Some(&since(&old_epoch, 0))).await.recovered);
        assert!(!join(&topics, &new, "b", sub(1 << 20).0, Some(&since(&new_epoch, 0))).await.recovered);
        let (s, mut rx) = sub(1 << 20);
        assert!(join(&topics, &new, "c", s, Some(&since(&new_epoch, 480))).await.recovered, "the newest stay");
        assert_eq!(texts(&mut rx).len(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn presence_churn_is_coalesced_into_a_snapshot() {
        let topics = topics(0);
        let t = topic("room");
        let (w, mut wrx) = watcher();
        join(&topics, &t, "watcher", w, None).await;
        for n in 0..500 {
            let id = format!("churn{n}");
            join(&topics, &t, &id, sub(4).0, None).await;
            topics.unsubscribe(&t, &id);
        }
        let events = texts(&mut wrx);
        assert!(
            events.len() <= PRESENCE_BURST as usize + 1,
            "{} events reached the watcher; the budget is {PRESENCE_BURST}",
            events.len()
        );
        // Once the budget refills, the watcher is told where things stand.
        tokio::time::advance(Duration::from_secs(1)).await;
        topics.sweep();
        let snapshot = texts(&mut wrx);
        assert_eq!(snapshot, [r#"{"type":"presence","topic":"room","peers":[{"peer":"watcher"}]}"#]);
    }

    #[tokio::test]
    async fn a_presence_list_is_capped() {
        let topics = topics_with(limits(0), 10);
        let t = topic("big");
        for n in 0..50 {
            join(&topics, &t, &format!("p{n:02}"), sub(4).0, None).await;
        }
        let list = topics.presence(&t).await.unwrap();
        assert_eq!(list.len(), 10);
        assert_eq!(list[0].peer, "p00");
    }
}
