//! The topic registry and fan-out, with each topic's seq counter and the
//! bounded history that recovery replays.
//!
//! Topics are spread over shards, each a std `Mutex` over a map. A lock is
//! held only to update a topic and hand each subscriber a clone of one
//! already-encoded frame (a reference-count bump): never across an `.await`,
//! and never waiting on a peer, because queuing into a peer's [`Outbox`] is a
//! non-blocking push. Doing the seq assignment, the history append and
//! the fan-out under one lock is what gives every subscriber the topic's
//! messages in seq order, and what makes a recovery replay exact: a subscribe
//! queues the replay and joins the subscriber set in one critical section, so
//! no publish can fall between the two (lost) or land in both (duplicated).
//!
//! Memory is bounded whatever clients do: at most `max_topics` topics exist
//! (an idle one is forgotten to make room for a new one; only when none is
//! idle is a new topic refused), and at most `history_bytes` of history is
//! retained server-wide (the oldest retained messages go first). History is
//! kept only for topics whose epoch someone holds: publishing to a topic
//! nobody ever subscribed to retains nothing, since nobody could ask for it.
//! Evicting history never makes a gap silent: a `since` it no longer reaches
//! is answered `recovered:false`.

use std::{
    cmp::Reverse,
    collections::{hash_map::Entry, BTreeSet, BinaryHeap, HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use crosswire_shared::{PresenceEntry, RawValue, ServerFrame, Since, Topic};
use serde::Serialize;
use tokio::time::Instant;

use crate::{frame::Frame, limits::TokenBucket, outbox::Outbox};

const SHARDS: usize = 32;

/// Presence events one topic may send per second, and in a burst. Past them
/// the watchers get one snapshot of who is there instead of the events: a
/// peer churning a room cannot flood its watchers' queues until they are cut.
const PRESENCE_RATE: u32 = 20;
const PRESENCE_BURST: u32 = 40;

/// What bounds the registry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Messages one topic retains (0: no history).
    pub(crate) history_size: usize,
    /// How long a message is retained.
    pub(crate) history_ttl: Duration,
    /// Topics that may exist at once, server-wide.
    pub(crate) max_topics: usize,
    /// Bytes of history retained at once, server-wide.
    pub(crate) history_bytes: usize,
    /// Entries a presence list holds at most.
    pub(crate) presence_list: usize,
}

/// Why a topic could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The server holds as many topics as it may, and none of them is idle.
    #[error("the server holds as many topics as it may ({max}), none idle")]
    TopicLimit {
        /// The configured maximum.
        max: usize,
    },
}

type Shard = HashMap<Topic, TopicState>;

/// All topics of one server.
pub(crate) struct Topics {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    limits: Limits,
    /// Topics that exist, server-wide; changed only under a shard lock, with
    /// the insert or removal it counts.
    count: AtomicUsize,
    /// Bytes of retained history, server-wide.
    retained: AtomicUsize,
    /// Held by the one eviction round under way.
    evicting: Mutex<()>,
}

struct TopicState {
    /// Fixed when this state (and so its history) is created: a subscriber
    /// holding another epoch knows its position means nothing here.
    epoch: Arc<str>,
    seq: u64,
    subscribers: HashMap<Arc<str>, Subscriber>,
    history: VecDeque<Retained>,
    /// Whether a subscriber was ever told the epoch: only then can anyone
    /// ask for history, so only then is it kept.
    handed_out: bool,
    /// Last publish, subscribe or unsubscribe. An idle topic keeps its epoch
    /// and seq for the history TTL, so a subscriber that was its only one can
    /// still come back and recover what was published meanwhile.
    touched: Instant,
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
}

impl Subscriber {
    fn presence_entry(&self, id: &str) -> PresenceEntry {
        PresenceEntry { peer: id.to_owned(), user: self.user.as_deref().map(str::to_owned) }
    }
}

struct Retained {
    seq: u64,
    at: Instant,
    frame: Frame,
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

/// Who publishes: excluded from the fan-out, and acknowledged (when it asked)
/// inside the same critical section that assigns the seq.
pub(crate) struct Publisher<'a> {
    pub(crate) id: &'a str,
    pub(crate) outbox: &'a Outbox,
    pub(crate) ack: Option<u64>,
}

/// What is being published.
pub(crate) enum Payload<'a> {
    /// A raw WebSocket message (crossws `peer.publish`): sent verbatim, no seq, no history.
    Raw(Frame),
    /// Protocol data: wrapped in a `message` frame with the next seq and retained.
    Data { from: &'a str, data: &'a RawValue },
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    /// The seq the message got (0 for raw messages).
    pub(crate) seq: u64,
    /// How many subscribers it was queued for.
    pub(crate) delivered: usize,
}

/// Borrowed twin of `ServerFrame::Message`, so the hot path serializes the
/// publisher's data straight from the received frame without copying it into
/// an owned frame first.
#[derive(Serialize)]
#[serde(tag = "type", rename = "message")]
struct MessageFrame<'a> {
    topic: &'a Topic,
    seq: u64,
    from: &'a str,
    data: &'a RawValue,
}

impl TopicState {
    fn new(now: Instant) -> Self {
        Self {
            epoch: format!("{:016x}", rand::random::<u64>()).into(),
            seq: 0,
            subscribers: HashMap::new(),
            history: VecDeque::new(),
            handed_out: false,
            touched: now,
            presence_budget: TokenBucket::new(PRESENCE_RATE, PRESENCE_BURST),
            presence_owed: false,
        }
    }

    /// Drops the oldest retained message, keeping the server-wide count true.
    fn pop_oldest(&mut self, retained: &AtomicUsize) -> Option<Retained> {
        let r = self.history.pop_front()?;
        retained.fetch_sub(r.frame.len(), Ordering::Relaxed);
        Some(r)
    }

    fn expire(&mut self, now: Instant, ttl: Duration, retained: &AtomicUsize) {
        while self.history.front().is_some_and(|r| now.duration_since(r.at) > ttl) {
            self.pop_oldest(retained);
        }
    }

    /// Whether everything after `since` is still retained in this epoch.
    fn can_recover(&self, since: &Since) -> bool {
        if *since.epoch != *self.epoch || since.seq > self.seq {
            return false;
        }
        since.seq == self.seq || self.history.front().is_some_and(|r| r.seq <= since.seq + 1)
    }

    /// Nobody is subscribed, nothing is retained, and (unless there is no
    /// history at all, so nothing to recover) it has been idle for the TTL.
    fn is_dead(&self, now: Instant, limits: &Limits) -> bool {
        self.subscribers.is_empty()
            && self.history.is_empty()
            && (limits.history_size == 0 || now.duration_since(self.touched) > limits.history_ttl)
    }

    fn watchers<'a>(&'a self, except: &'a str) -> impl Iterator<Item = &'a Subscriber> + 'a {
        self.subscribers.iter().filter(move |(id, s)| s.presence && &***id != except).map(|(_, s)| s)
    }

    /// Sends a presence event about `who` to every other subscriber that
    /// opted in, or, past the topic's presence budget, owes them a snapshot.
    fn announce(&mut self, topic: &Topic, who: &str, joined: bool, limits: &Limits) {
        if self.watchers(who).next().is_none() {
            return;
        }
        if !self.presence_budget.try_take() {
            self.presence_owed = true;
            return;
        }
        if self.presence_owed {
            // The events withheld are stale: one snapshot says where things stand.
            return self.send_snapshot(topic, limits);
        }
        let Some(entry) = self.subscribers.get_key_value(who).map(|(id, s)| s.presence_entry(id)) else { return };
        let frame = if joined {
            ServerFrame::Join { topic: topic.clone(), who: entry }
        } else {
            ServerFrame::Leave { topic: topic.clone(), who: entry }
        };
        let frame = Frame::text(frame.encode());
        for sub in self.watchers(who) {
            let _ = sub.outbox.push(frame.clone());
        }
    }

    /// Who is subscribed, in peer-id order, at most `limits.presence_list` of them.
    fn presence_list(&self, limits: &Limits) -> Vec<PresenceEntry> {
        let mut list: Vec<_> = self.subscribers.iter().map(|(id, s)| s.presence_entry(id)).collect();
        list.sort_by(|a, b| a.peer.cmp(&b.peer));
        list.truncate(limits.presence_list);
        list
    }

    fn send_snapshot(&mut self, topic: &Topic, limits: &Limits) {
        self.presence_owed = false;
        let frame = ServerFrame::Presence { topic: topic.clone(), id: None, peers: self.presence_list(limits) };
        let frame = Frame::text(frame.encode());
        for sub in self.watchers("") {
            let _ = sub.outbox.push(frame.clone());
        }
    }
}

impl Topics {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            limits,
            count: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            evicting: Mutex::new(()),
        }
    }

    fn shard_index(&self, topic: &Topic) -> usize {
        self.hasher.hash_one(topic.as_str()) as usize % SHARDS
    }

    fn shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(topic)])
    }

    /// The shard of `topic`, locked, with the topic in it: created if need
    /// be within the topic cap. At the cap, the longest-idle topic without
    /// subscribers is forgotten to make room (it loses its recoverability,
    /// never silently): one in the same shard if there is one, else one in
    /// another shard (taken with the first lock released: one lock at a time).
    fn lock_creating(&self, topic: &Topic, now: Instant) -> Result<MutexGuard<'_, Shard>, TopicError> {
        let mut shard = self.shard(topic);
        if self.ensure(&mut shard, topic, now) {
            return Ok(shard);
        }
        drop(shard);
        if self.forget_idle_elsewhere(self.shard_index(topic)) {
            // The room made is ours unless another creation takes it first.
            let mut shard = self.shard(topic);
            if self.ensure(&mut shard, topic, now) {
                return Ok(shard);
            }
        }
        Err(TopicError::TopicLimit { max: self.limits.max_topics })
    }

    /// Makes sure `topic` is in `shard`, within the cap; false if there is no room.
    fn ensure(&self, shard: &mut Shard, topic: &Topic, now: Instant) -> bool {
        if shard.contains_key(topic) {
            return true;
        }
        let max = self.limits.max_topics;
        let room = self.count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1));
        // At the cap, an idle topic's place is handed over to the new one.
        if room.is_err() && !self.forget_longest_idle(shard) {
            return false;
        }
        shard.insert(topic.clone(), TopicState::new(now));
        true
    }

    /// Forgets one idle topic in a shard other than `except`, freeing its
    /// place under the cap; false if no shard has one.
    fn forget_idle_elsewhere(&self, except: usize) -> bool {
        for i in (1..SHARDS).map(|k| (except + k) % SHARDS) {
            if self.forget_longest_idle(&mut lock(&self.shards[i])) {
                self.count.fetch_sub(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Removes the shard's longest-idle topic without subscribers, and its
    /// retained bytes from the count; false if every topic has subscribers.
    /// The topic count is the caller's to adjust.
    fn forget_longest_idle(&self, shard: &mut Shard) -> bool {
        let Some(idle) = longest_idle(shard) else { return false };
        let mut gone = shard.remove(&idle).expect("just found");
        while gone.pop_oldest(&self.retained).is_some() {}
        true
    }

    fn remove_if_dead(&self, shard: &mut Shard, topic: &Topic, now: Instant) {
        if shard.get(topic).is_some_and(|s| s.is_dead(now, &self.limits)) {
            shard.remove(topic);
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn publish(
        &self,
        topic: &Topic,
        publisher: Option<Publisher<'_>>,
        payload: Payload<'_>,
    ) -> Result<Published, TopicError> {
        let now = Instant::now();
        let exclude = publisher.as_ref().map(|p| p.id);
        let mut shard = self.shard(topic);
        let (frame, seq, state, retained) = match payload {
            Payload::Raw(frame) => match shard.get_mut(topic) {
                Some(state) => (frame, 0, state, 0),
                None => return Ok(Published { seq: 0, delivered: 0 }),
            },
            Payload::Data { from, data } => {
                if !shard.contains_key(topic) {
                    drop(shard);
                    shard = self.lock_creating(topic, now)?;
                }
                let state = shard.get_mut(topic).expect("lock_creating leaves it there");
                state.touched = now;
                state.seq += 1;
                let seq = state.seq;
                let frame =
                    Frame::json(&MessageFrame { topic, seq, from, data }).expect("a message frame always serializes");
                let mut retained = 0;
                if self.limits.history_size > 0 && state.handed_out {
                    state.expire(now, self.limits.history_ttl, &self.retained);
                    if state.history.len() == self.limits.history_size {
                        state.pop_oldest(&self.retained);
                    }
                    retained = frame.len();
                    self.retained.fetch_add(retained, Ordering::Relaxed);
                    state.history.push_back(Retained { seq, at: now, frame: frame.clone() });
                }
                // Queued before the fan-out, under the shard lock: the publisher
                // gets its ack before any message with a later seq, so a seq it
                // never sees live is always explained by an ack it already has.
                if let Some(Publisher { outbox, ack: Some(ack), .. }) = &publisher {
                    let _ = outbox.push_reserved(Frame::text(ServerFrame::Ack { ack: *ack, seq }.encode()));
                }
                (frame, seq, state, retained)
            }
        };
        let mut delivered = 0;
        for (id, sub) in &state.subscribers {
            if exclude == Some(&**id) {
                continue;
            }
            if sub.outbox.push(frame.clone()).is_ok() {
                delivered += 1;
            }
        }
        self.remove_if_dead(&mut shard, topic, now);
        drop(shard);
        if retained > 0 && self.retained.load(Ordering::Relaxed) > self.limits.history_bytes {
            self.evict_history();
        }
        Ok(Published { seq, delivered })
    }

    /// Brings retained history back under its budget, oldest messages first
    /// across every topic, with room to spare so that the next publishes do
    /// not each pay for a round. It takes every shard lock, in index order;
    /// no other path holds one shard lock while asking for another, so this
    /// cannot deadlock. A round is rare (once per 1/16 of the budget added)
    /// and one at a time: a publisher that finds a round under way goes on.
    fn evict_history(&self) {
        let Ok(_round) = self.evicting.try_lock() else { return };
        let budget = self.limits.history_bytes;
        let target = budget - budget / 16;
        let mut shards: Vec<MutexGuard<'_, Shard>> = self.shards.iter().map(lock).collect();
        let mut fronts: BinaryHeap<Reverse<(Instant, usize, Topic)>> = BinaryHeap::new();
        for (i, shard) in shards.iter().enumerate() {
            fronts.extend(shard.iter().filter_map(|(t, s)| Some(Reverse((s.history.front()?.at, i, t.clone())))));
        }
        while self.retained.load(Ordering::Relaxed) > target {
            let Some(Reverse((_, i, topic))) = fronts.pop() else { return };
            let state = shards[i].get_mut(&topic).expect("topics stay while the locks are held");
            state.pop_oldest(&self.retained);
            if let Some(next) = state.history.front() {
                fronts.push(Reverse((next.at, i, topic)));
            }
        }
    }

    /// Subscribes `peer` (again, if it already is: then only its presence
    /// wish changes and `since` replays again); the bool says whether it was
    /// not subscribed before.
    pub(crate) fn subscribe(
        &self,
        topic: &Topic,
        peer: &Arc<str>,
        sub: Subscriber,
        since: Option<&Since>,
        history: bool,
        reply: impl FnOnce(&SubscribeOutcome) -> Option<ServerFrame>,
    ) -> Result<(SubscribeOutcome, bool), TopicError> {
        let now = Instant::now();
        let mut shard = self.lock_creating(topic, now)?;
        let state = shard.get_mut(topic).expect("lock_creating leaves it there");
        state.touched = now;
        // A raw subscriber is never told the epoch, so it costs no history.
        state.handed_out |= history;
        state.expire(now, self.limits.history_ttl, &self.retained);
        let recovered = since.is_some_and(|s| state.can_recover(s));
        let result = SubscribeOutcome { epoch: state.epoch.clone(), seq: state.seq, recovered };
        if let Some(frame) = reply(&result) {
            let _ = sub.outbox.push_reserved(Frame::text(frame.encode()));
        }
        if let (true, Some(since)) = (recovered, since) {
            for r in state.history.iter().filter(|r| r.seq > since.seq) {
                let _ = sub.outbox.push_reserved(r.frame.clone());
            }
        }
        let is_new = match state.subscribers.entry(peer.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().presence = sub.presence;
                false
            }
            Entry::Vacant(e) => {
                lock_index(&sub.memberships).insert(topic.clone());
                e.insert(sub);
                true
            }
        };
        if is_new {
            state.announce(topic, peer, true, &self.limits);
        }
        Ok((result, is_new))
    }

    /// Unsubscribes `peer`; false if it was not subscribed.
    pub(crate) fn unsubscribe(&self, topic: &Topic, peer: &str) -> bool {
        let now = Instant::now();
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return false };
        let was = state.subscribers.contains_key(peer);
        if was {
            state.announce(topic, peer, false, &self.limits);
            let gone = state.subscribers.remove(peer).expect("just checked");
            lock_index(&gone.memberships).remove(topic);
            state.touched = now;
        }
        self.remove_if_dead(&mut shard, topic, now);
        was
    }

    /// Who is subscribed to `topic`, in peer-id order, at most the presence
    /// list limit of them.
    pub(crate) fn presence(&self, topic: &Topic) -> Vec<PresenceEntry> {
        let shard = self.shard(topic);
        shard.get(topic).map(|state| state.presence_list(&self.limits)).unwrap_or_default()
    }

    /// Drops expired history, forgets topics with neither subscribers nor
    /// history, and sends the presence snapshots owed; returns how many
    /// topics remain.
    pub(crate) fn sweep(&self) -> usize {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|topic, state| {
                state.expire(now, self.limits.history_ttl, &self.retained);
                if state.presence_owed && state.presence_budget.try_take() {
                    state.send_snapshot(topic, &self.limits);
                }
                !state.is_dead(now, &self.limits)
            });
            self.count.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
        self.len()
    }

    /// How many topics exist now.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Bytes of history retained now, server-wide.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }

    /// A topic's retained messages for a `history` request, without
    /// subscribing: the encoded `message` frames after `since` (the oldest
    /// `limit` of them), or the latest `limit` when `since` is `None`, with the
    /// topic's epoch and last seq. `None` when `since` names another epoch
    /// or reaches back past what is retained. Creates nothing: an unknown
    /// topic has an empty history under the epoch `""`.
    pub(crate) fn history(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: usize,
    ) -> Option<(Arc<str>, u64, Vec<Frame>)> {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            return match since {
                Some(_) => None,
                None => Some((Arc::from(""), 0, Vec::new())),
            };
        };
        state.expire(Instant::now(), self.limits.history_ttl, &self.retained);
        let frames = match since {
            Some(since) if !state.can_recover(since) => return None,
            Some(since) => {
                state.history.iter().filter(|r| r.seq > since.seq).take(limit).map(|r| r.frame.clone()).collect()
            }
            None => {
                let skip = state.history.len().saturating_sub(limit);
                state.history.iter().skip(skip).map(|r| r.frame.clone()).collect()
            }
        };
        Some((state.epoch.clone(), state.seq, frames))
    }
}

/// The topic without subscribers that has been idle longest.
fn longest_idle(shard: &Shard) -> Option<Topic> {
    shard.iter().filter(|(_, s)| s.subscribers.is_empty()).min_by_key(|(_, s)| s.touched).map(|(t, _)| t.clone())
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
    use super::*;
    use crate::outbox::{Bounds, OutboxReceiver};

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn limits(history_size: usize) -> Limits {
        Limits {
            history_size,
            history_ttl: Duration::from_secs(60),
            max_topics: 1000,
            history_bytes: usize::MAX,
            presence_list: 1000,
        }
    }

    fn topics(history_size: usize) -> Topics {
        Topics::new(limits(history_size))
    }

    fn sub(capacity: usize) -> (Subscriber, OutboxReceiver) {
        let (outbox, rx) =
            Outbox::new(Bounds { frames: capacity, bytes: usize::MAX }, crate::outbox::QueueBudget::new(usize::MAX));
        (Subscriber { outbox, user: None, presence: false, memberships: Memberships::default() }, rx)
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

    fn publish(topics: &Topics, t: &Topic, n: u64) -> Published {
        topics.publish(t, None, Payload::Data { from: "x", data: &data(n) }).unwrap()
    }

    fn join(topics: &Topics, t: &Topic, id: &str, s: Subscriber, since: Option<&Since>) -> SubscribeOutcome {
        topics.subscribe(t, &id.into(), s, since, true, |_| None).unwrap().0
    }

    #[tokio::test]
    async fn seq_and_exclusion() {
        let topics = topics(4);
        let t = topic("t");
        let (a, mut arx) = sub(16);
        let (b, mut brx) = sub(16);
        join(&topics, &t, "a", a, None);
        join(&topics, &t, "b", b, None);
        let a_outbox = topics.shard(&t)[&t].subscribers["a"].outbox.clone();
        let publisher = Publisher { id: "a", outbox: &a_outbox, ack: Some(9) };
        let p = topics.publish(&t, Some(publisher), Payload::Data { from: "a", data: &data(1) });
        assert_eq!(p, Ok(Published { seq: 1, delivered: 1 }));
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
        let entry = |index: &Memberships| Subscriber {
            outbox: sub(4).0.outbox,
            user: None,
            presence: false,
            memberships: Arc::clone(index),
        };
        let sub_to = |t: &Topic| topics.subscribe(t, &"p".into(), entry(&index), None, false, |_| None).unwrap().1;
        assert!(sub_to(&a));
        assert!(sub_to(&b));
        assert!(!sub_to(&a), "subscribing again is not joining again");
        assert_eq!(lock_index(&index).iter().cloned().collect::<Vec<_>>(), [a.clone(), b.clone()]);
        assert!(topics.unsubscribe(&a, "p"));
        assert!(!topics.unsubscribe(&a, "p"));
        assert_eq!(lock_index(&index).iter().cloned().collect::<Vec<_>>(), [b]);
    }

    #[tokio::test]
    async fn recovery_window() {
        let topics = topics(3);
        let t = topic("t");
        let epoch = join(&topics, &t, "probe", sub(16).0, None).epoch;
        for n in 1..=5 {
            publish(&topics, &t, n);
        }
        let since = |seq| Since { epoch: epoch.to_string(), seq };
        // Retained: 3, 4, 5. From 2 on is recoverable, from 1 is not.
        let (s, mut rx) = sub(16);
        assert!(join(&topics, &t, "p", s, Some(&since(2))).recovered);
        assert_eq!(texts(&mut rx).len(), 3);
        assert!(!join(&topics, &t, "q", sub(16).0, Some(&since(1))).recovered);
        assert!(join(&topics, &t, "r", sub(16).0, Some(&since(5))).recovered);
        assert!(!join(&topics, &t, "s", sub(16).0, Some(&since(6))).recovered);
        let wrong = Since { epoch: "other".into(), seq: 4 };
        assert!(!join(&topics, &t, "u", sub(16).0, Some(&wrong)).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn history_expires_and_empty_topics_go() {
        let topics = Topics::new(Limits { history_ttl: Duration::from_secs(10), ..limits(8) });
        let t = topic("t");
        let (s, _rx) = sub(4);
        let epoch = join(&topics, &t, "a", s, None).epoch;
        publish(&topics, &t, 1);
        topics.unsubscribe(&t, "a");
        assert_eq!((topics.len(), topics.retained_bytes() > 0), (1, true), "retained history keeps the topic");
        // Idle but within the TTL: kept, so its only subscriber can come back to the same epoch.
        assert_eq!(topics.sweep(), 1);
        let back = Since { epoch: epoch.to_string(), seq: 0 };
        assert!(join(&topics, &t, "a", sub(4).0, Some(&back)).recovered);
        topics.unsubscribe(&t, "a");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(topics.sweep(), 0);
        assert_eq!(topics.retained_bytes(), 0, "expired history is no longer counted");
        // Raw publishes to a topic nobody is in create nothing.
        topics.publish(&t, None, Payload::Raw(Frame::text("x"))).unwrap();
        assert_eq!(topics.len(), 0);
    }

    #[tokio::test]
    async fn publishing_where_nobody_ever_subscribed_retains_nothing() {
        let topics = topics(8);
        for n in 0..100 {
            let p = publish(&topics, &topic(&format!("nowhere{n}")), n);
            assert_eq!(p.seq, 1);
        }
        assert_eq!(topics.retained_bytes(), 0, "nobody holds an epoch to ask for it");
    }

    #[tokio::test]
    async fn full_queue_is_isolated() {
        let topics = topics(0);
        let t = topic("t");
        let (slow, mut slow_rx) = sub(2);
        let (fast, mut fast_rx) = sub(64);
        join(&topics, &t, "slow", slow, None);
        join(&topics, &t, "fast", fast, None);
        for n in 0..10 {
            publish(&topics, &t, n);
        }
        assert_eq!(texts(&mut fast_rx).len(), 10);
        assert!(texts(&mut slow_rx).is_empty(), "a cut peer gets nothing after the refused frame, only its close");
        assert!(slow_rx.close.borrow().is_some(), "the slow peer is told to close");
    }

    #[tokio::test]
    async fn at_the_topic_cap_an_idle_topic_makes_room_and_a_busy_one_does_not() {
        // One topic per shard on average: the cap is reached quickly.
        let topics = Topics::new(Limits { max_topics: 4, ..limits(8) });
        let mut held = vec![];
        for n in 0..4 {
            let t = topic(&format!("held{n}"));
            let (s, rx) = sub(4);
            join(&topics, &t, "p", s, None);
            held.push((t, rx));
        }
        assert_eq!(topics.len(), 4);
        let fresh = topic("fresh");
        assert_eq!(
            topics.subscribe(&fresh, &"p".into(), sub(4).0, None, true, |_| None),
            Err(TopicError::TopicLimit { max: 4 }),
            "every topic has a subscriber: none may go"
        );
        assert_eq!(
            topics.publish(&fresh, None, Payload::Data { from: "x", data: &data(1) }),
            Err(TopicError::TopicLimit { max: 4 })
        );
        // Once a topic is idle, a new one in its shard takes its place.
        let (idle, _) = &held[0];
        topics.unsubscribe(idle, "p");
        let same_shard = (0..10_000)
            .map(|n| topic(&format!("new{n}")))
            .find(|t| topics.shard_index(t) == topics.shard_index(idle))
            .expect("some name hashes to that shard");
        assert!(topics.subscribe(&same_shard, &"p".into(), sub(4).0, None, true, |_| None).is_ok());
        assert_eq!(topics.len(), 4, "the cap holds");
        assert!(topics.shard(idle).get(idle).is_none(), "the idle topic was forgotten");
    }

    #[tokio::test]
    async fn history_bytes_are_bounded_server_wide_oldest_first() {
        let budget = 64 * 1024;
        let topics = Topics::new(Limits { history_bytes: budget, ..limits(100_000) });
        let (old, new) = (topic("old"), topic("new"));
        let old_epoch = join(&topics, &old, "a", sub(1 << 20).0, None).epoch;
        let new_epoch = join(&topics, &new, "a", sub(1 << 20).0, None).epoch;
        let blob = RawValue::from_string(format!("\"{}\"", "x".repeat(1000))).unwrap();
        let publish_blob = |t: &Topic| topics.publish(t, None, Payload::Data { from: "x", data: &blob }).unwrap();
        for _ in 0..50 {
            publish_blob(&old);
        }
        for _ in 0..500 {
            publish_blob(&new);
            assert!(topics.retained_bytes() <= budget, "{} > {budget}", topics.retained_bytes());
        }
        assert!(topics.retained_bytes() > budget / 2, "eviction keeps most of the budget in use");
        // The old topic's messages were the oldest: they went first.
        let since = |epoch: &Arc<str>, seq| Since { epoch: epoch.to_string(), seq };
        assert!(!join(&topics, &old, "b", sub(1 << 20).0, Some(&since(&old_epoch, 0))).recovered);
        assert!(!join(&topics, &new, "b", sub(1 << 20).0, Some(&since(&new_epoch, 0))).recovered);
        let (s, mut rx) = sub(1 << 20);
        assert!(join(&topics, &new, "c", s, Some(&since(&new_epoch, 480))).recovered, "the newest stay");
        assert_eq!(texts(&mut rx).len(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn presence_churn_is_coalesced_into_a_snapshot() {
        let topics = topics(0);
        let t = topic("room");
        let (w, mut wrx) = watcher();
        join(&topics, &t, "watcher", w, None);
        for n in 0..500 {
            let id = format!("churn{n}");
            join(&topics, &t, &id, sub(4).0, None);
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
        let topics = Topics::new(Limits { presence_list: 10, ..limits(0) });
        let t = topic("big");
        for n in 0..50 {
            join(&topics, &t, &format!("p{n:02}"), sub(4).0, None);
        }
        let list = topics.presence(&t);
        assert_eq!(list.len(), 10);
        assert_eq!(list[0].peer, "p00");
    }
}
