//! The embedded engine: every topic's seq, epoch and history in this
//! process, under sharded std mutexes, and delivery straight into this
//! node's fan-out from inside the same critical section.
//!
//! That critical section is what makes the guarantees of [`Engine`] hold
//! here without a network: the seq assignment, the history append and the
//! delivery happen under one topic lock, so the node sees each topic's
//! messages in seq order, and a [`Engine::read`] (which takes the same lock)
//! sees exactly the messages delivered before it. No lock of this module is
//! held across an `.await`: nothing here awaits.
//!
//! Memory is bounded whatever clients do: at most `max_topics` topics exist
//! (an idle one, held by no subscriber, is forgotten to make room for a new
//! one, the longest-idle first; only when none is idle is a new topic
//! refused), and at most
//! `history_bytes` of history is retained server-wide (the oldest retained
//! messages go first). History is kept only for topics whose epoch someone
//! was told: publishing to a topic nobody ever subscribed to retains
//! nothing, since nobody could ask for it. Evicting history never makes a
//! gap silent: a `since` it no longer reaches reads as incomplete.
//!
//! Making room costs O(1), whatever the table holds: the idle topics are
//! kept in an engine-wide [`IdleList`], oldest first, so the longest-idle
//! one is its front, and a refusal (none idle) is one look at it. A publish
//! to an existing topic takes no lock but its shard's (see `idle.rs`).
//!
//! Lock order: a shard, then the idle list. The list's lock is a leaf:
//! nothing is locked while it is held. No path holds one shard lock while
//! asking for another but [`MemoryEngine::evict_history`], which takes them
//! all in index order (and not the list's).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Duration,
};

use ahash::RandomState;
use crosswire_shared::{PresenceEntry, Since, Topic};
use tokio::time::Instant;

use crate::config::ServerConfig;

use super::{
    idle::{IdleList, Slot},
    Delivery, Engine, EngineError, History, MessageText, Node, Pending, Publication, ReadLimit,
};

const SHARDS: usize = 32;

/// Fronts of the idle list one eviction looks at, at most: the ones it finds
/// touched since they were listed go to the back (at most
/// [`SECOND_CHANCES`]), or changed under it by another thread (skipped).
/// Bounds the work of one eviction whatever was published meanwhile.
const EVICTION_TRIES: usize = 64;
const SECOND_CHANCES: usize = 8;

/// What bounds the engine.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimits {
    /// Messages one topic retains (0: no history).
    pub history_size: usize,
    /// How long a message is retained.
    pub history_ttl: Duration,
    /// Topics that may exist at once.
    pub max_topics: usize,
    /// Bytes of history retained at once, over all topics.
    pub history_bytes: usize,
}

impl MemoryLimits {
    /// The limits `config` sets (`history_size`, `history_ttl`, `max_topics`,
    /// `history_memory_bytes`).
    pub fn from_config(config: &ServerConfig) -> Self {
        Self {
            history_size: config.history_size,
            history_ttl: config.history_ttl,
            max_topics: config.max_topics,
            history_bytes: config.history_memory_bytes,
        }
    }
}

type Shard = HashMap<Topic, TopicState, RandomState>;

/// Topics, their seqs and their history, in this process.
pub struct MemoryEngine {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    limits: MemoryLimits,
    node: OnceLock<Node>,
    /// Topics that exist; changed only under a shard lock, with the insert
    /// or removal it counts.
    count: AtomicUsize,
    /// Bytes of retained history.
    retained: AtomicUsize,
    /// Held by the one eviction round under way.
    evicting: Mutex<()>,
    /// The topics nobody holds, longest-idle first. A topic is listed
    /// exactly while its `holders` is 0, and listed or unlisted only under
    /// its shard's lock: whoever holds that lock may trust its [`Slot`].
    idle: Mutex<IdleList>,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine").field("limits", &self.limits).finish_non_exhaustive()
    }
}

struct TopicState {
    /// Fixed when this state (and so its history) is created: a subscriber
    /// holding another epoch knows its position means nothing here.
    epoch: Arc<str>,
    seq: u64,
    history: VecDeque<Retained>,
    /// Whether anyone was ever told the epoch: only then can anyone ask for
    /// history, so only then is it kept.
    handed_out: bool,
    /// Subscribers holding the topic; a held topic is never forgotten.
    holders: usize,
    /// Last publish, hold or release. An idle topic keeps its epoch and seq
    /// for the history TTL, so a subscriber that was its only one can still
    /// come back and recover what was published meanwhile.
    touched: Instant,
    /// Its place in the idle list: `Some` exactly while `holders` is 0.
    idle: Option<Slot>,
}

struct Retained {
    seq: u64,
    at: Instant,
    frame: MessageText,
}

impl TopicState {
    fn new(now: Instant) -> Self {
        Self {
            epoch: format!("{:016x}", rand::random::<u64>()).into(),
            seq: 0,
            history: VecDeque::new(),
            handed_out: false,
            holders: 0,
            touched: now,
            idle: None,
        }
    }

    /// Drops the oldest retained message, keeping the engine-wide count true.
    fn pop_oldest(&mut self, retained: &AtomicUsize) -> Option<Retained> {
        let r = self.history.pop_front()?;
        retained.fetch_sub(r.frame.len(), Ordering::Relaxed);
        Some(r)
    }

    fn expire(&mut self, now: Instant, ttl: Duration, retained: &AtomicUsize) {
        // Older than `ttl`: retained before `now - ttl` (one subtraction per
        // publish, then comparisons). Before there was a `now - ttl`, nothing
        // can be that old.
        let Some(cutoff) = now.checked_sub(ttl) else { return };
        while self.history.front().is_some_and(|r| r.at < cutoff) {
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

    /// Nobody holds it, nothing is retained, and (unless there is no history
    /// at all, so nothing to recover) it has been idle for the TTL.
    fn is_dead(&self, now: Instant, limits: &MemoryLimits) -> bool {
        self.holders == 0
            && self.history.is_empty()
            && (limits.history_size == 0 || now.duration_since(self.touched) > limits.history_ttl)
    }
}

impl MemoryEngine {
    /// An empty engine within `limits`.
    pub fn new(limits: MemoryLimits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::new(),
            limits,
            node: OnceLock::new(),
            count: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            evicting: Mutex::new(()),
            idle: Mutex::new(IdleList::default()),
        }
    }

    fn shard_index(&self, topic: &Topic) -> usize {
        self.hasher.hash_one(topic.as_str()) as usize % SHARDS
    }

    fn shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(topic)])
    }

    fn idle_list(&self) -> MutexGuard<'_, IdleList> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The shard of `topic`, locked, with the topic in it: created if need
    /// be within the topic cap. At the cap, the longest-idle topic nobody
    /// holds is forgotten and its place handed to the new one (it loses its
    /// recoverability, never silently); only when none is idle is the topic
    /// refused. Either costs O(1): see [`Self::forget_longest_idle`].
    fn lock_creating(&self, topic: &Topic, now: Instant) -> Result<MutexGuard<'_, Shard>, EngineError> {
        let index = self.shard_index(topic);
        let mut shard = lock(&self.shards[index]);
        if shard.contains_key(topic) {
            return Ok(shard);
        }
        let max = self.limits.max_topics;
        if self.count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_err() {
            // The idle topic may be in any shard: one shard lock at a time.
            drop(shard);
            if !self.forget_longest_idle() {
                return Err(EngineError::TopicLimit { max });
            }
            shard = lock(&self.shards[index]);
            if shard.contains_key(topic) {
                // Created meanwhile by another caller: the place made is not needed.
                self.count.fetch_sub(1, Ordering::Relaxed);
                return Ok(shard);
            }
        }
        self.insert(&mut shard, index, topic, now);
        Ok(shard)
    }

    /// Inserts `topic` as a new topic nobody holds yet (so listed idle),
    /// into `shard` (index `index`), whose place under the cap is counted.
    fn insert(&self, shard: &mut Shard, index: usize, topic: &Topic, now: Instant) {
        let mut state = TopicState::new(now);
        state.idle = Some(self.idle_list().push_back(topic.clone(), index, now));
        shard.insert(topic.clone(), state);
    }

    /// Forgets the longest-idle topic (its retained bytes leave the count),
    /// leaving its place under the cap to the caller: the topic count is
    /// not lowered. False if no topic is idle. O(1): the front of the idle
    /// list, with at most [`EVICTION_TRIES`] looks when other threads change
    /// it meanwhile or fronts were touched since they were listed.
    fn forget_longest_idle(&self) -> bool {
        let mut second_chances = 0;
        for _ in 0..EVICTION_TRIES {
            let Some((slot, topic, index)) = self.idle_list().front().map(|(s, t, i, _)| (s, t.clone(), i)) else {
                return false;
            };
            // The front is read and its shard locked one after the other
            // (the lock order is shard, then list): it may have changed
            // meanwhile, which its slot tells.
            let mut shard = lock(&self.shards[index]);
            let Some(state) = shard.get_mut(&topic) else { continue };
            if state.idle != Some(slot) {
                continue;
            }
            debug_assert_eq!(state.holders, 0, "only idle topics are listed");
            let mut idle = self.idle_list();
            if second_chances < SECOND_CHANCES && idle.since(slot) < state.touched {
                // Published to since it was listed: not the longest idle.
                idle.move_to_back(slot, state.touched);
                second_chances += 1;
                continue;
            }
            idle.remove(slot);
            drop(idle);
            let mut gone = shard.remove(&topic).expect("just found");
            while gone.pop_oldest(&self.retained).is_some() {}
            return true;
        }
        false
    }

    /// Forgets a topic its caller found dead in the state at hand (no
    /// second lookup: this runs once per publish).
    fn forget_dead(&self, shard: &mut Shard, topic: &Topic) {
        if let Some(gone) = shard.remove(topic) {
            self.unlist(&gone);
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Takes a topic being forgotten (under its shard's lock) off the idle list.
    fn unlist(&self, gone: &TopicState) {
        if let Some(slot) = gone.idle {
            self.idle_list().remove(slot);
        }
    }

    /// Topics listed as idle now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle_list().len()
    }

    fn publish_now(&self, topic: &Topic, publication: Publication<'_>) -> Result<u64, EngineError> {
        let now = publication.at;
        // One lookup when the topic exists (nearly always): `lock_creating`
        // would look it up once to make sure of it and once more to take it.
        let mut shard = self.shard(topic);
        let (seq, retained, dead) = match shard.get_mut(topic) {
            Some(state) => self.append(state, topic, now, publication),
            None => {
                drop(shard);
                shard = self.lock_creating(topic, now)?;
                let state = shard.get_mut(topic).expect("lock_creating leaves it there");
                self.append(state, topic, now, publication)
            }
        };
        if dead {
            self.forget_dead(&mut shard, topic);
        }
        drop(shard);
        if retained > 0 && self.retained.load(Ordering::Relaxed) > self.limits.history_bytes {
            self.evict_history();
        }
        Ok(seq)
    }

    /// Gives `publication` the topic's next seq, retains it, and delivers
    /// it on this node; returns the seq, the bytes retained, and whether
    /// the topic is dead after it (found in the state at hand, not by a
    /// second lookup).
    fn append(
        &self,
        state: &mut TopicState,
        topic: &Topic,
        now: Instant,
        publication: Publication<'_>,
    ) -> (u64, usize, bool) {
        state.touched = now;
        state.seq += 1;
        let seq = state.seq;
        let frame = MessageText::encode(topic, seq, publication.from, publication.data);
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
        let delivery =
            Delivery { epoch: state.epoch.clone(), seq, from: publication.from, frame, ack: publication.ack };
        // Delivered under the topic lock: the next seq cannot be delivered
        // before this one, and a read waiting for the lock sees it retained
        // and delivered, or neither.
        if let Some(node) = self.node.get() {
            node.deliver(topic, delivery);
        }
        (seq, retained, state.is_dead(now, &self.limits))
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

    fn read_now(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Result<History, EngineError> {
        let now = Instant::now();
        let mut shard = if create { self.lock_creating(topic, now)? } else { self.shard(topic) };
        let Some(state) = shard.get_mut(topic) else {
            let complete = since.is_none();
            return Ok(History { epoch: Arc::from(""), seq: 0, complete, messages: Vec::new() });
        };
        if create {
            // A subscriber is told the epoch: from now on the topic keeps history.
            state.handed_out = true;
            state.touched = now;
        }
        state.expire(now, self.limits.history_ttl, &self.retained);
        let pick = |r: &Retained| (r.seq, r.frame.clone());
        let (complete, messages) = match since {
            Some(since) if !state.can_recover(since) => (false, Vec::new()),
            Some(since) => {
                // Retained seqs are consecutive: the first after `since` is
                // found, not searched for (a page deep into a long history
                // costs its own length, not the history's).
                let skip = state.history.front().map_or(0, |r| (since.seq + 1).saturating_sub(r.seq) as usize);
                let after = state.history.iter().skip(skip).skip_while(|r| r.seq <= since.seq);
                (true, limit.take(after.map(pick), |(_, f)| f.len()))
            }
            None => {
                let skip = state.history.len().saturating_sub(limit.messages);
                (true, limit.take(state.history.iter().skip(skip).map(pick), |(_, f)| f.len()))
            }
        };
        Ok(History { epoch: state.epoch.clone(), seq: state.seq, complete, messages })
    }
}

impl Engine for MemoryEngine {
    fn start(&self, node: Node, _shutdown: tokio_util::sync::CancellationToken) {
        let _ = self.node.set(node);
    }

    fn publish<'a>(&'a self, topic: &'a Topic, publication: Publication<'a>) -> Pending<'a, u64> {
        Pending::ready(self.publish_now(topic, publication))
    }

    fn broadcast(&self, _topic: &Topic, _from: &str, _message: &crate::Message) {
        // One node: the caller has delivered it to every subscriber there is.
    }

    fn read<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Pending<'a, History> {
        Pending::ready(self.read_now(topic, since, limit, create))
    }

    fn hold(&self, topic: &Topic) -> Result<(), EngineError> {
        let now = Instant::now();
        let mut shard = self.lock_creating(topic, now)?;
        let state = shard.get_mut(topic).expect("lock_creating leaves it there");
        if let Some(slot) = state.idle.take() {
            self.idle_list().remove(slot);
        }
        state.holders += 1;
        state.touched = now;
        Ok(())
    }

    fn release(&self, topic: &Topic) {
        let now = Instant::now();
        let index = self.shard_index(topic);
        let mut shard = lock(&self.shards[index]);
        let Some(state) = shard.get_mut(topic) else { return };
        state.holders = state.holders.saturating_sub(1);
        state.touched = now;
        if state.is_dead(now, &self.limits) {
            self.forget_dead(&mut shard, topic);
        } else if state.holders == 0 && state.idle.is_none() {
            state.idle = Some(self.idle_list().push_back(topic.clone(), index, now));
        }
    }

    fn presence_changed(&self, _topic: &Topic, _who: &PresenceEntry, _joined: bool) {
        // No other node to tell.
    }

    fn remote_presence<'a>(&'a self, _topic: &'a Topic) -> Pending<'a, Vec<PresenceEntry>> {
        Pending::ready(Ok(Vec::new()))
    }

    fn is_ready(&self) -> bool {
        true
    }

    /// Drops expired history and forgets topics with neither holders nor history.
    fn sweep(&self) {
        let now = Instant::now();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let before = shard.len();
            shard.retain(|_, state| {
                state.expire(now, self.limits.history_ttl, &self.retained);
                let dead = state.is_dead(now, &self.limits);
                if dead {
                    self.unlist(state);
                }
                !dead
            });
            self.count.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn topic_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn retained_bytes(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock would be a bug in this module; the
    // map is still consistent at every await-free step, so keep serving.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use crosswire_shared::RawValue;

    use super::*;

    fn engine(max_topics: usize) -> Arc<MemoryEngine> {
        Arc::new(MemoryEngine::new(MemoryLimits {
            history_size: 8,
            history_ttl: Duration::from_secs(60),
            max_topics,
            history_bytes: usize::MAX,
        }))
    }

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn publish(engine: &MemoryEngine, topic: &Topic) -> Result<u64, EngineError> {
        let data = RawValue::from_string("1".to_owned()).unwrap();
        engine.publish_now(topic, Publication { from: "p", data: &data, ack: None, at: Instant::now() })
    }

    fn exists(engine: &MemoryEngine, topic: &Topic) -> bool {
        engine.shard(topic).contains_key(topic)
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_idle_goes_a_held_one_never_and_a_touched_one_moves_back() {
        let engine = engine(3);
        let (held, old, young) = (topic("held"), topic("old"), topic("young"));
        engine.hold(&held).unwrap();
        engine.hold(&old).unwrap();
        // Told its epoch: `old` retains what is published to it.
        engine.read_now(&old, None, ReadLimit::ALL, true).unwrap();
        engine.release(&old);
        tokio::time::advance(Duration::from_secs(1)).await;
        engine.hold(&young).unwrap();
        engine.release(&young);
        assert_eq!((engine.topic_count(), engine.idle_count()), (3, 2));
        // Published to while idle: `old` is now touched after `young`.
        tokio::time::advance(Duration::from_secs(1)).await;
        publish(&engine, &old).unwrap();
        assert!(engine.retained_bytes() > 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        engine.hold(&topic("new1")).unwrap();
        assert!(!exists(&engine, &young), "the longest idle went");
        assert!(exists(&engine, &old), "touched since it was listed: moved back, kept");
        engine.hold(&topic("new2")).unwrap();
        assert!(!exists(&engine, &old));
        assert_eq!(engine.retained_bytes(), 0, "its retained bytes left the count with it");
        assert_eq!((engine.topic_count(), engine.idle_count()), (3, 0));
        // Nothing idle: refused, and the held topic stays.
        assert_eq!(engine.hold(&topic("new3")), Err(EngineError::TopicLimit { max: 3 }));
        assert_eq!(publish(&engine, &topic("new3")), Err(EngineError::TopicLimit { max: 3 }));
        assert!(exists(&engine, &held));
        engine.release(&held);
        assert_eq!(engine.idle_count(), 1, "released: listed again");
        engine.hold(&topic("new3")).unwrap();
        assert!(!exists(&engine, &held));
        assert_eq!(engine.topic_count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_list_follows_holds_releases_and_the_sweep() {
        let engine = engine(100);
        let t = topic("t");
        engine.hold(&t).unwrap();
        engine.hold(&t).unwrap();
        assert_eq!(engine.idle_count(), 0);
        engine.release(&t);
        assert_eq!(engine.idle_count(), 0, "still held once");
        engine.release(&t);
        assert_eq!(engine.idle_count(), 1);
        engine.release(&t);
        assert_eq!(engine.idle_count(), 1, "released once too often: listed once");
        for n in 0..10 {
            publish(&engine, &topic(&format!("p{n}"))).unwrap();
        }
        assert_eq!((engine.topic_count(), engine.idle_count()), (11, 11));
        tokio::time::advance(Duration::from_secs(61)).await;
        engine.sweep();
        assert_eq!((engine.topic_count(), engine.idle_count()), (0, 0), "the sweep unlists what it forgets");
    }

    /// Making room at the cap locks the shard of the topic made and the
    /// shard of the one forgotten, and no other: with every other shard
    /// locked elsewhere, it still completes (a scan would wait forever).
    #[test]
    fn making_room_does_not_visit_the_other_shards() {
        let engine = engine(2);
        let (idle, held) = (topic("idle"), topic("held"));
        engine.hold(&held).unwrap();
        engine.hold(&idle).unwrap();
        engine.release(&idle);
        let index = |t: &Topic| engine.shard_index(t);
        let fresh = (0..).map(|n| topic(&format!("fresh{n}"))).find(|t| index(t) != index(&idle)).unwrap();
        let spared = [index(&idle), index(&fresh)];
        let others: Vec<MutexGuard<'_, Shard>> =
            (0..SHARDS).filter(|i| !spared.contains(i)).map(|i| lock(&engine.shards[i])).collect();
        let (done, made) = mpsc::channel();
        let maker = Arc::clone(&engine);
        std::thread::spawn(move || done.send(maker.hold(&fresh)).unwrap());
        let answer = made.recv_timeout(Duration::from_secs(10)).expect("made room without waiting on other shards");
        drop(others);
        assert_eq!(answer, Ok(()));
        assert!(!exists(&engine, &idle));
        assert_eq!(engine.topic_count(), 2);
    }
}
