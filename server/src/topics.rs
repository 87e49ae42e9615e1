//! The topic registry and fan-out, with each topic's seq counter and the
//! bounded history that recovery replays.
//!
//! Topics are spread over shards, each a std `Mutex` over a map. A lock is
//! held only to update a topic and hand each subscriber a clone of one
//! already-encoded frame (a reference-count bump): never across an `.await`,
//! and never waiting on a peer, because queuing into a peer's [`Outbox`] is a
//! non-blocking `try_send`. Doing the seq assignment, the history append and
//! the fan-out under one lock is what gives every subscriber the topic's
//! messages in seq order, and what makes a recovery replay exact: a subscribe
//! queues the replay and joins the subscriber set in one critical section, so
//! no publish can fall between the two (lost) or land in both (duplicated).

use std::{
    collections::{hash_map::Entry, HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use crosswire_shared::{PresenceEntry, RawValue, ServerFrame, Since, Topic};
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::peer::{Outbox, Subscription};

const SHARDS: usize = 32;

/// All topics of one server.
pub(crate) struct Topics {
    shards: Box<[Mutex<HashMap<Topic, TopicState>>]>,
    hasher: RandomState,
    history_size: usize,
    history_ttl: Duration,
}

struct TopicState {
    /// Fixed when this state (and so its history) is created: a subscriber
    /// holding another epoch knows its position means nothing here.
    epoch: Arc<str>,
    seq: u64,
    subscribers: HashMap<Arc<str>, Subscriber>,
    history: VecDeque<Retained>,
    /// Last publish, subscribe or unsubscribe. An idle topic keeps its epoch
    /// and seq for the history TTL, so a subscriber that was its only one can
    /// still come back and recover what was published meanwhile.
    touched: Instant,
}

/// One subscriber's entry in a topic.
pub(crate) struct Subscriber {
    pub(crate) outbox: Outbox,
    pub(crate) user: Option<Arc<str>>,
    /// Whether it wants `join`/`leave` events.
    pub(crate) presence: bool,
}

impl Subscriber {
    fn presence_entry(&self, id: &str) -> PresenceEntry {
        PresenceEntry { peer: id.to_owned(), user: self.user.as_deref().map(str::to_owned) }
    }
}

struct Retained {
    seq: u64,
    at: Instant,
    frame: WsMessage,
}

/// What is being published.
pub(crate) enum Payload<'a> {
    /// A raw WebSocket message (crossws `peer.publish`): sent verbatim, no seq, no history.
    Raw(WsMessage),
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
            touched: now,
        }
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self.history.front().is_some_and(|r| now.duration_since(r.at) > ttl) {
            self.history.pop_front();
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
    fn is_dead(&self, now: Instant, ttl: Duration, history_size: usize) -> bool {
        self.subscribers.is_empty()
            && self.history.is_empty()
            && (history_size == 0 || now.duration_since(self.touched) > ttl)
    }

    /// Sends a presence event about `who` to every other subscriber that opted in.
    fn announce(&self, topic: &Topic, who: &str, joined: bool) {
        let mut watchers = self.subscribers.iter().filter(|(id, s)| s.presence && &***id != who).peekable();
        if watchers.peek().is_none() {
            return;
        }
        let Some(entry) = self.subscribers.get_key_value(who).map(|(id, s)| s.presence_entry(id)) else { return };
        let frame = if joined {
            ServerFrame::Join { topic: topic.clone(), who: entry }
        } else {
            ServerFrame::Leave { topic: topic.clone(), who: entry }
        };
        let frame = WsMessage::Text(frame.encode().into());
        for (_, sub) in watchers {
            let _ = sub.outbox.push(frame.clone());
        }
    }
}

impl Topics {
    pub(crate) fn new(history_size: usize, history_ttl: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            history_size,
            history_ttl,
        }
    }

    fn shard(&self, topic: &Topic) -> MutexGuard<'_, HashMap<Topic, TopicState>> {
        let i = self.hasher.hash_one(topic.as_str()) as usize % SHARDS;
        // A panic while holding a shard lock would be a bug in this module; the
        // map is still consistent at every await-free step, so keep serving.
        self.shards[i].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn publish(&self, topic: &Topic, exclude: Option<&str>, payload: Payload<'_>) -> Published {
        let now = Instant::now();
        let mut shard = self.shard(topic);
        let (frame, seq, state) = match payload {
            Payload::Raw(frame) => match shard.get_mut(topic) {
                Some(state) => (frame, 0, state),
                None => return Published { seq: 0, delivered: 0 },
            },
            Payload::Data { from, data } => {
                let state = shard.entry(topic.clone()).or_insert_with(|| TopicState::new(now));
                state.touched = now;
                state.seq += 1;
                let seq = state.seq;
                let text = serde_json::to_string(&MessageFrame { topic, seq, from, data })
                    .expect("a message frame always serializes");
                let frame = WsMessage::Text(text.into());
                if self.history_size > 0 {
                    state.expire(now, self.history_ttl);
                    if state.history.len() == self.history_size {
                        state.history.pop_front();
                    }
                    state.history.push_back(Retained { seq, at: now, frame: frame.clone() });
                }
                (frame, seq, state)
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
        if state.is_dead(now, self.history_ttl, self.history_size) {
            shard.remove(topic);
        }
        Published { seq, delivered }
    }

    pub(crate) fn subscribe(
        &self,
        topic: &Topic,
        peer: &Arc<str>,
        sub: Subscriber,
        since: Option<&Since>,
        reply: impl FnOnce(&Subscription) -> Option<ServerFrame>,
    ) -> Subscription {
        let now = Instant::now();
        let mut shard = self.shard(topic);
        let state = shard.entry(topic.clone()).or_insert_with(|| TopicState::new(now));
        state.touched = now;
        state.expire(now, self.history_ttl);
        let recovered = since.is_some_and(|s| state.can_recover(s));
        let result = Subscription { epoch: state.epoch.clone(), seq: state.seq, recovered };
        if let Some(frame) = reply(&result) {
            let _ = sub.outbox.push_reserved(WsMessage::Text(frame.encode().into()));
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
                e.insert(sub);
                true
            }
        };
        if is_new {
            state.announce(topic, peer, true);
        }
        result
    }

    pub(crate) fn unsubscribe(&self, topic: &Topic, peer: &str) {
        let now = Instant::now();
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else { return };
        if state.subscribers.contains_key(peer) {
            state.announce(topic, peer, false);
            state.subscribers.remove(peer);
            state.touched = now;
        }
        if state.is_dead(now, self.history_ttl, self.history_size) {
            shard.remove(topic);
        }
    }

    /// Who is subscribed to `topic`, in peer-id order.
    pub(crate) fn presence(&self, topic: &Topic) -> Vec<PresenceEntry> {
        let shard = self.shard(topic);
        let mut list: Vec<_> = shard
            .get(topic)
            .map(|state| state.subscribers.iter().map(|(id, s)| s.presence_entry(id)).collect())
            .unwrap_or_default();
        list.sort_by(|a, b| a.peer.cmp(&b.peer));
        list
    }

    /// Drops expired history and forgets topics with neither subscribers nor
    /// history; returns how many topics remain.
    pub(crate) fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut remaining = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, state| {
                state.expire(now, self.history_ttl);
                !state.is_dead(now, self.history_ttl, self.history_size)
            });
            remaining += shard.len();
        }
        remaining
    }

    /// How many topics exist now.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    /// A topic's retained messages for a `history` request, without
    /// subscribing: the encoded `message` frames after `since` (the oldest
    /// `limit` of them), or the latest `limit` when `since` is `None`, with the
    /// topic's epoch and last seq. `Err(())` when `since` names another epoch
    /// or reaches back past what is retained. Creates nothing: an unknown
    /// topic has an empty history under the epoch `""`.
    #[allow(clippy::result_unit_err)]
    pub(crate) fn history(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: usize,
    ) -> Result<(Arc<str>, u64, Vec<WsMessage>), ()> {
        let mut shard = self.shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            return match since {
                Some(_) => Err(()),
                None => Ok((Arc::from(""), 0, Vec::new())),
            };
        };
        state.expire(Instant::now(), self.history_ttl);
        let frames = match since {
            Some(since) if !state.can_recover(since) => return Err(()),
            Some(since) => {
                state.history.iter().filter(|r| r.seq > since.seq).take(limit).map(|r| r.frame.clone()).collect()
            }
            None => {
                let skip = state.history.len().saturating_sub(limit);
                state.history.iter().skip(skip).map(|r| r.frame.clone()).collect()
            }
        };
        Ok((state.epoch.clone(), state.seq, frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    fn sub(capacity: usize) -> (Subscriber, crate::peer::OutboxReceiver) {
        let (outbox, rx) = Outbox::new(capacity, 16);
        (Subscriber { outbox, user: None, presence: false }, rx)
    }

    fn texts(rx: &mut crate::peer::OutboxReceiver) -> Vec<String> {
        let mut out = vec![];
        while let Some(m) = rx.frames.try_recv() {
            out.push(m.into_text().unwrap().to_string());
        }
        out
    }

    fn data(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    #[tokio::test]
    async fn seq_and_exclusion() {
        let topics = Topics::new(4, Duration::from_secs(60));
        let t = topic("t");
        let (a, mut arx) = sub(16);
        let (b, mut brx) = sub(16);
        topics.subscribe(&t, &"a".into(), a, None, |_| None);
        topics.subscribe(&t, &"b".into(), b, None, |_| None);
        let p = topics.publish(&t, Some("a"), Payload::Data { from: "a", data: &data(1) });
        assert_eq!(p, Published { seq: 1, delivered: 1 });
        assert!(texts(&mut arx).is_empty());
        assert_eq!(texts(&mut brx), [r#"{"type":"message","topic":"t","seq":1,"from":"a","data":1}"#]);
    }

    #[tokio::test]
    async fn recovery_window() {
        let topics = Topics::new(3, Duration::from_secs(60));
        let t = topic("t");
        for n in 1..=5 {
            topics.publish(&t, None, Payload::Data { from: "x", data: &data(n) });
        }
        let epoch = topics.subscribe(&t, &"probe".into(), sub(16).0, None, |_| None).epoch;
        let since = |seq| Since { epoch: epoch.to_string(), seq };
        // Retained: 3, 4, 5. From 2 on is recoverable, from 1 is not.
        let (s, mut rx) = sub(16);
        assert!(topics.subscribe(&t, &"p".into(), s, Some(&since(2)), |_| None).recovered);
        assert_eq!(texts(&mut rx).len(), 3);
        assert!(!topics.subscribe(&t, &"q".into(), sub(16).0, Some(&since(1)), |_| None).recovered);
        assert!(topics.subscribe(&t, &"r".into(), sub(16).0, Some(&since(5)), |_| None).recovered);
        assert!(!topics.subscribe(&t, &"s".into(), sub(16).0, Some(&since(6)), |_| None).recovered);
        let wrong = Since { epoch: "other".into(), seq: 4 };
        assert!(!topics.subscribe(&t, &"u".into(), sub(16).0, Some(&wrong), |_| None).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn history_expires_and_empty_topics_go() {
        let topics = Topics::new(8, Duration::from_secs(10));
        let t = topic("t");
        topics.publish(&t, None, Payload::Data { from: "x", data: &data(1) });
        assert_eq!(topics.len(), 1, "retained history keeps the topic");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(topics.sweep(), 0);
        let (s, _rx) = sub(4);
        let epoch = topics.subscribe(&t, &"a".into(), s, None, |_| None).epoch;
        topics.unsubscribe(&t, "a");
        // Idle but within the TTL: kept, so its only subscriber can come back to the same epoch.
        assert_eq!(topics.sweep(), 1);
        let back = Since { epoch: epoch.to_string(), seq: 0 };
        assert!(topics.subscribe(&t, &"a".into(), sub(4).0, Some(&back), |_| None).recovered);
        topics.unsubscribe(&t, "a");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(topics.sweep(), 0);
        // Raw publishes to a topic nobody is in create nothing.
        topics.publish(&t, None, Payload::Raw(WsMessage::text("x")));
        assert_eq!(topics.len(), 0);
    }

    #[tokio::test]
    async fn full_queue_is_isolated() {
        let topics = Topics::new(0, Duration::from_secs(1));
        let t = topic("t");
        let (slow, mut slow_rx) = sub(2);
        let (fast, mut fast_rx) = sub(64);
        topics.subscribe(&t, &"slow".into(), slow, None, |_| None);
        topics.subscribe(&t, &"fast".into(), fast, None, |_| None);
        for n in 0..10 {
            topics.publish(&t, None, Payload::Data { from: "x", data: &data(n) });
        }
        assert_eq!(texts(&mut fast_rx).len(), 10);
        assert_eq!(texts(&mut slow_rx).len(), 2);
        assert!(slow_rx.close.borrow().is_some(), "the slow peer is told to close");
    }
}
