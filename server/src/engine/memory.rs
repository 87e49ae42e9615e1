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
//! one; only when none is idle is a new topic refused), and at most
//! `history_bytes` of history is retained server-wide (the oldest retained
//! messages go first). History is kept only for topics whose epoch someone
//! was told: publishing to a topic nobody ever subscribed to retains
//! nothing, since nobody could ask for it. Evicting history never makes a
//! gap silent: a `since` it no longer reaches reads as incomplete.

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

use super::{Delivery, Engine, EngineError, History, MessageText, Node, Pending, Publication, ReadLimit};

const SHARDS: usize = 32;

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
        }
    }

    fn shard_index(&self, topic: &Topic) -> usize {
        self.hasher.hash_one(topic.as_str()) as usize % SHARDS
    }

    fn shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(topic)])
    }

    /// The shard of `topic`, locked, with the topic in it: created if need
    /// be within the topic cap. At the cap, the longest-idle topic nobody
    /// holds is forgotten to make room (it loses its recoverability, never
    /// silently): one in the same shard if there is one, else one in another
    /// shard (taken with the first lock released: one lock at a time).
    fn lock_creating(&self, topic: &Topic, now: Instant) -> Result<MutexGuard<'_, Shard>, EngineError> {
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
        Err(EngineError::TopicLimit { max: self.limits.max_topics })
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

    /// Removes the shard's longest-idle topic nobody holds, and its retained
    /// bytes from the count; false if every topic is held. The topic count
    /// is the caller's to adjust.
    fn forget_longest_idle(&self, shard: &mut Shard) -> bool {
        let idle = shard.iter().filter(|(_, s)| s.holders == 0).min_by_key(|(_, s)| s.touched).map(|(t, _)| t.clone());
        let Some(idle) = idle else { return false };
        let mut gone = shard.remove(&idle).expect("just found");
        while gone.pop_oldest(&self.retained).is_some() {}
        true
    }

    /// Forgets a topic its caller found dead in the state at hand (no
    /// second lookup: this runs once per publish).
    fn forget_dead(&self, shard: &mut Shard, topic: &Topic) {
        shard.remove(topic);
        self.count.fetch_sub(1, Ordering::Relaxed);
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
        state.holders += 1;
        state.touched = now;
        Ok(())
    }

    fn release(&self, topic: &Topic) {
        let now = Instant::now();
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        state.holders = state.holders.saturating_sub(1);
        state.touched = now;
        if state.is_dead(now, &self.limits) {
            self.forget_dead(&mut shard, topic);
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
                !state.is_dead(now, &self.limits)
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
