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
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
};

use crosswire_shared::{PresenceEntry, ServerFrame, Since, Topic};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{
    engine::{AckTo, Delivered, Delivery, Engine, EngineError, History, Hub, Node, Pending, Publication},
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

type Shard = HashMap<Topic, TopicState>;

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
    pending: Option<Vec<(u64, WsMessage)>>,
}

impl Subscriber {
    pub(crate) fn new(outbox: Outbox, user: Option<Arc<str>>, presence: bool, memberships: Memberships) -> Self {
        Self { outbox, user, presence, memberships, pending: None }
    }

    fn presence_entry(&self, id: &str) -> PresenceEntry {
        PresenceEntry { peer: id.to_owned(), user: self.user.as_deref().map(str::to_owned) }
    }

    /// Queues a live frame, or holds it while the history is read.
    fn push(&mut self, seq: u64, frame: &WsMessage) -> bool {
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
        let frame = WsMessage::Text(frame.encode().into());
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
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            engine,
            replay_limit,
            presence_list,
            me: OnceLock::new(),
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

    pub(crate) fn deliver_raw(&self, topic: &Topic, from: Option<&str>, frame: WsMessage) -> usize {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return 0 };
        let mut delivered = 0;
        for (id, sub) in &mut state.subscribers {
            if from != Some(&**id) && sub.push(0, &frame) {
                delivered += 1;
            }
        }
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
            let _ = sub.outbox.push_reserved(WsMessage::Text(frame.encode().into()));
        }
        if let (true, Some(since)) = (recovered, since) {
            for (_, frame) in messages.iter().filter(|(s, _)| *s > since.seq && *s <= seq) {
                let _ = sub.outbox.push_reserved(frame.to_ws());
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
        let frame = WsMessage::Text(frame.encode().into());
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

    fn deliver(&self, topic: &Topic, delivery: Delivery) -> Delivered {
        let Delivery { epoch, seq, from, frame, ack } = delivery;
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            ack_now(ack, seq);
            return Delivered::Nobody;
        };
        if let Some((at, last)) = &state.position {
            let same_epoch = Arc::ptr_eq(at, &epoch) || **at == *epoch;
            if same_epoch && seq <= *last {
                return Delivered::Duplicate;
            }
            if !same_epoch || seq != *last + 1 {
                return Delivered::Gap { after: *last };
            }
        }
        state.position = Some((epoch, seq));
        // Queued before the fan-out, in the same critical section: the
        // publisher gets its ack before any message with a later seq, so a
        // seq it never sees live is always explained by an ack it already has.
        ack_now(ack, seq);
        let frame = frame.to_ws();
        let mut delivered = 0;
        for (id, sub) in &mut state.subscribers {
            if **id != *from && sub.push(seq, &frame) {
                delivered += 1;
            }
        }
        Delivered::Queued(delivered)
    }

    fn reset(&self, topic: &Topic, epoch: Arc<str>, seq: u64) {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        state.position = Some((epoch.clone(), seq));
        let frame = ServerFrame::Subscribed { topic: topic.clone(), epoch: epoch.to_string(), seq, recovered: false };
        let frame = WsMessage::Text(frame.encode().into());
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
    fn deliver(&self, topic: &Topic, delivery: Delivery) -> Delivered {
        self.0.upgrade().map_or(Delivered::Nobody, |t| t.deliver(topic, delivery))
    }

    fn deliver_raw(&self, topic: &Topic, from: &str, message: WsMessage) -> usize {
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
