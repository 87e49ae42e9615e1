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
//!
//! A replay is read and queued a page at a time ([`REPLAY_PAGE`] bytes of
//! retained frames, shared, not copied): the first page with the
//! `subscribed` answer, each next one once the peer's answers have drained
//! below [`crate::outbox::ANSWER_LIMIT`], read from the last seq replayed.
//! The subscriber stays pending the whole time, so the invariant holds
//! page after page: every page is a read started after the registration,
//! and the held deliveries go out after the last one. A later page that no
//! longer reaches (the history was evicted or expired meanwhile, or its
//! epoch changed) cannot complete the replay honestly: the peer is closed
//! (1013), resubscribes, and is told `recovered: false`. Hooks run one at a
//! time per peer, so a peer has one replay in flight at most, however
//! often it resubscribes.
//!
//! A connection's poll is a gathering one ([`gathered`]), as uWebSockets drains its
//! topics once per loop iteration: what it publishes to one topic, message
//! after message, is held as the topic's open [`Run`] and queued when the
//! poll ends, the whole run as one entry per subscriber (one lock, one
//! reference count, one `writev` slice) where each message was one of each.
//! Nothing observable changes but the cost, because a run is queued before
//! anything else can come after it: before any other operation on the topic
//! (a delivery from elsewhere, a subscribe, a presence event), before the
//! same poll touches another topic, and before it queues anything for
//! another peer. Every subscriber still gets exactly the messages published
//! while it was subscribed, in seq order, and a publisher's messages and
//! sends in the order it made them.

use std::{
    collections::{hash_map::Entry, BTreeSet, HashMap},
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, Weak,
    },
    task::{Context, Poll},
};

use ahash::RandomState;
use crosswire_shared::{PresenceEntry, ServerFrame, Since, Topic};

use crate::{
    engine::{AckTo, Delivered, Delivery, Engine, EngineError, History, Hub, Node, Pending, Publication, ReadLimit},
    frame::Frame,
    limits::TokenBucket,
    outbox::Outbox,
    shares::{Share, Shares},
};

const SHARDS: usize = 32;

/// Messages and wire bytes one [`Run`] holds at most; past either it is
/// queued and the next message begins another. Bounds the copy a run makes
/// and the slice a subscriber's write side is handed.
const RUN_MESSAGES: usize = 64;
const RUN_BYTES: usize = 64 * 1024;

/// Presence events one topic may send per second, and in a burst. Past them
/// the watchers get one snapshot of who is there instead of the events: a
/// peer churning a room cannot flood its watchers' queues until they are cut.
const PRESENCE_RATE: u32 = 20;
const PRESENCE_BURST: u32 = 40;

/// Live deliveries one subscriber may have held while its history is read;
/// past them it is cut as a slow consumer (the read is that slow).
const PENDING_LIMIT: usize = 16_384;

/// Bytes of retained frames a replay queues at a time (at least one
/// message; less when the peer's queue has less room).
const REPLAY_PAGE: usize = 256 * 1024;

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
    /// Each address's and user's share of the topic table.
    shares: Shares,
}

struct TopicState {
    /// Keyed by peer id with ahash, as the shards are: the sender is looked
    /// up once per delivery. The ids are the server's own random ones.
    subscribers: HashMap<Arc<str>, Subscriber, RandomState>,
    /// The epoch and the last seq delivered here; `None` until a subscribe's
    /// read or a delivery tells.
    position: Option<(Arc<str>, u64)>,
    presence_budget: TokenBucket,
    /// Presence events were withheld: the watchers are owed a snapshot.
    presence_owed: bool,
    /// What a gathering poll delivered here and has not queued yet.
    open: Option<Run>,
}

/// Messages a gathering poll delivered to one topic, one after the other, held
/// to be queued as one entry per subscriber when the poll ends (see the
/// module documentation).
struct Run {
    /// The gathering poll that holds it.
    scope: u64,
    /// The sender: every subscriber but it gets the run.
    except: Option<PeerKey>,
    /// In seq order (0 for raw messages).
    messages: Vec<(u64, Frame)>,
    /// Their wire bytes, and the payload bytes that queue bounds count.
    wire: usize,
    payload: usize,
}

/// A peer told apart by the address of its id: a subscriber map's key is
/// the peer's own id (`Arc<str>`), as is the `from` of what it publishes,
/// so comparing addresses is comparing peers, where comparing the strings
/// was a string comparison per delivery.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerKey(usize);

impl PeerKey {
    pub(crate) fn of(id: &str) -> Self {
        Self(id.as_ptr() as usize)
    }
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
    /// The client address its share of the topic table is counted under.
    address: Option<IpAddr>,
    /// Its part of its address's and user's shares, given back as it drops.
    share: Option<Share>,
}

impl Subscriber {
    pub(crate) fn new(outbox: Outbox, user: Option<Arc<str>>, presence: bool, memberships: Memberships) -> Self {
        Self { outbox, user, presence, memberships, pending: None, address: None, share: None }
    }

    /// Counted under `address`'s share of the topic table (and its user's).
    pub(crate) fn counted_under(self, address: IpAddr) -> Self {
        Self { address: Some(address), ..self }
    }

    fn presence_entry(&self, id: &str) -> PresenceEntry {
        PresenceEntry { peer: id.to_owned(), user: self.user.as_deref().map(str::to_owned) }
    }

    /// Queues a run of messages, one entry for all of them, or holds each
    /// while the history is read.
    fn push_run(&mut self, run: &Run, joined: &Frame) {
        if self.pending.is_some() {
            for (seq, frame) in &run.messages {
                self.push(*seq, frame);
            }
        } else {
            let _ = self.outbox.push_run(joined.clone(), run.messages.len(), run.payload);
        }
    }

    /// Ends the wait of a subscribe whose replay went up to `seq`: the
    /// deliveries held meanwhile that came after it are queued, raw
    /// messages (seq 0) too, in their place.
    fn flush_pending(&mut self, seq: u64) {
        for (_, frame) in self.pending.take().unwrap_or_default().into_iter().filter(|(s, _)| *s == 0 || *s > seq) {
            let _ = self.outbox.push(frame);
        }
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
            subscribers: HashMap::default(),
            position: None,
            presence_budget: TokenBucket::new(PRESENCE_RATE, PRESENCE_BURST),
            presence_owed: false,
            open: None,
        }
    }

    /// Delivers `frame` (message `seq`, 0 for a raw one) to every subscriber
    /// but `from`; returns for how many. In a gathering poll (`scope`) it joins
    /// the topic's open run, or opens one; otherwise it is queued now.
    fn deliver(&mut self, scope: Option<u64>, from: Option<&str>, seq: u64, frame: &Frame) -> usize {
        // The sender is looked up once, then told apart by its key's address.
        let except = from.and_then(|from| self.subscribers.get_key_value(from)).map(|(id, _)| PeerKey::of(id));
        self.make_way(scope);
        let Some(scope) = scope else {
            return self.fan_out(except, seq, frame);
        };
        let wire = frame.as_wire().len();
        if let Some(run) = &self.open {
            let joins = run.except == except && run.messages.len() < RUN_MESSAGES && run.wire + wire <= RUN_BYTES;
            if !joins {
                self.settle();
            }
        }
        let run = self.open.get_or_insert_with(|| Run { scope, except, messages: Vec::new(), wire: 0, payload: 0 });
        run.messages.push((seq, frame.clone()));
        run.wire += wire;
        run.payload += frame.len();
        self.subscribers.len() - usize::from(except.is_some())
    }

    /// Queues the open run unless the gathering poll `scope` holds it.
    fn make_way(&mut self, scope: Option<u64>) {
        if self.open.as_ref().is_some_and(|run| Some(run.scope) != scope) {
            self.settle();
        }
    }

    /// Queues `frame` for every subscriber but `except`; returns for how many.
    fn fan_out(&mut self, except: Option<PeerKey>, seq: u64, frame: &Frame) -> usize {
        let mut delivered = 0;
        for (id, sub) in &mut self.subscribers {
            if Some(PeerKey::of(id)) != except && sub.push(seq, frame) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Queues the open run, if any: a run of one as the frame itself, a
    /// longer one as one entry per subscriber.
    fn settle(&mut self) {
        let Some(run) = self.open.take() else { return };
        if let [(seq, frame)] = &run.messages[..] {
            self.fan_out(run.except, *seq, frame);
            return;
        }
        let joined = Frame::concat(run.messages.iter().map(|(_, frame)| frame), run.wire);
        for (id, sub) in &mut self.subscribers {
            if Some(PeerKey::of(id)) != run.except {
                sub.push_run(&run, &joined);
            }
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
    /// `topic_share`: topics one address (and one user) may hold here.
    pub(crate) fn new(engine: Arc<dyn Engine>, replay_limit: usize, presence_list: usize, topic_share: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: RandomState::new(),
            engine,
            replay_limit,
            presence_list,
            me: OnceLock::new(),
            deliveries: AtomicU64::new(0),
            shares: Shares::new(topic_share),
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

    /// The lock of `topic`'s shard, for anything but a delivery: what a
    /// gathering poll holds open (for this topic or another) is queued first.
    /// A delivery, which may join the topic's open run, takes the lock
    /// itself once [`gather::scope`] has queued any other topic's.
    fn shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        gather::settle_other(self, topic);
        let mut shard = self.lock_shard(topic);
        if let Some(state) = shard.get_mut(topic) {
            state.settle();
        }
        shard
    }

    fn lock_shard(&self, topic: &Topic) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one(topic.as_str()) as usize % SHARDS])
    }

    /// Queues `topic`'s open run if the gathering poll `scope` holds it (it
    /// may have been queued already, by whatever came next on the topic).
    fn settle_run(&self, topic: &Topic, scope: u64) {
        let mut shard = self.lock_shard(topic);
        if let Some(state) = shard.get_mut(topic) {
            if state.open.as_ref().is_some_and(|run| run.scope == scope) {
                state.settle();
            }
        }
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
        let scope = gather::scope(self, topic, from);
        let mut shard = self.lock_shard(topic);
        let Some(state) = shard.get_mut(topic) else { return 0 };
        let delivered = state.deliver(scope, from, 0, &frame);
        self.deliveries.fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Subscribes `peer` for raw messages (no epoch, no replay); false if it
    /// already was.
    pub(crate) fn subscribe_raw(
        &self,
        topic: &Topic,
        peer: &Arc<str>,
        mut sub: Subscriber,
    ) -> Result<bool, EngineError> {
        if lock_index(&sub.memberships).contains(topic) {
            return Ok(false);
        }
        self.take_share(topic, &mut sub)?;
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
    /// when they are all retained (a page at a time, as the peer's answers
    /// drain: see the module documentation), then the live ones. The bool
    /// says whether it was not subscribed before.
    pub(crate) async fn subscribe(
        &self,
        topic: &Topic,
        peer: &Arc<str>,
        mut sub: Subscriber,
        since: Option<&Since>,
        reply: impl FnOnce(&SubscribeOutcome) -> Option<ServerFrame>,
    ) -> Result<(SubscribeOutcome, bool), EngineError> {
        let memberships = Arc::clone(&sub.memberships);
        let outbox = sub.outbox.clone();
        let is_new = !lock_index(&memberships).contains(topic);
        if is_new {
            self.take_share(topic, &mut sub)?;
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
        // Without a `since` nothing is replayed: one message tells the position.
        let messages = if since.is_some() { self.replay_limit } else { 1 };
        let read = self.engine.read(topic, since, replay_page(messages, &outbox), true).await;
        // (A block: the shard lock must be seen to end before the awaits.)
        let (outcome, mut replayed) = {
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
            let replayed = match (recovered, since) {
                (true, Some(since)) => replay(sub, since.seq, seq, &messages),
                _ => seq,
            };
            if replayed >= seq {
                sub.flush_pending(seq);
            }
            match &mut state.position {
                Some((at, last)) if **at == *epoch => *last = (*last).max(seq),
                Some(_) => {}
                None => state.position = Some((epoch.clone(), seq)),
            }
            let joined = if is_new { self.announced(state, topic, peer) } else { None };
            drop(shard);
            self.after_join(topic, joined);
            (outcome, replayed)
        };
        let (epoch, seq) = (outcome.epoch.clone(), outcome.seq);
        // The rest of the replay, a page at a time as the peer takes them;
        // its live deliveries are held meanwhile.
        while replayed < seq {
            outbox.drained().await;
            let from = Since { epoch: epoch.to_string(), seq: replayed };
            let page = if outbox.is_closing() {
                None
            } else {
                self.engine.read(topic, Some(&from), replay_page(self.replay_limit, &outbox), false).await.ok()
            };
            let mut shard = self.shard(topic);
            let Some(sub) = shard.get_mut(topic).and_then(|state| state.subscribers.get_mut(&**peer)) else {
                // Unsubscribed meanwhile (the peer is gone): nothing to complete.
                return Ok((outcome, is_new));
            };
            let reaches = page.as_ref().is_some_and(|page| {
                page.complete && *page.epoch == *epoch && page.messages.first().is_some_and(|(s, _)| *s == replayed + 1)
            });
            match page {
                Some(page) if reaches => replayed = replay(sub, replayed, seq, &page.messages),
                _ => {
                    // The history no longer reaches (or cannot be read):
                    // the replay cannot be completed, and a gap would go
                    // unseen. The peer resubscribes and is told.
                    sub.pending = None;
                    sub.outbox.close_now(
                        crosswire_shared::close_code::SLOW_CONSUMER,
                        "the history was lost during the replay; subscribe again",
                    );
                    return Ok((outcome, is_new));
                }
            }
            if replayed >= seq {
                sub.flush_pending(seq);
            }
        }
        Ok((outcome, is_new))
    }

    /// Counts a new subscription against its address's and user's shares of
    /// the topic table, or refuses it. The share goes back when `sub` is
    /// dropped, however the subscription ends (or fails to begin).
    fn take_share(&self, topic: &Topic, sub: &mut Subscriber) -> Result<(), EngineError> {
        if sub.address.is_some() || sub.user.is_some() {
            sub.share = Some(self.shares.take(topic, sub.address, sub.user.as_ref())?);
        }
        Ok(())
    }

    /// The distinct topics peers from `ip` (its /64 for IPv6) hold here.
    pub(crate) fn held_by_address(&self, ip: IpAddr) -> usize {
        self.shares.held_by_address(ip)
    }

    /// The distinct topics `user`'s peers hold here.
    pub(crate) fn held_by_user(&self, user: &str) -> usize {
        self.shares.held_by_user(user)
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
        limit: ReadLimit,
    ) -> Result<Option<History>, EngineError> {
        let history = self.engine.read(topic, since, limit, false).await?;
        let reaches = since.is_none_or(|s| history.complete && *s.epoch == *history.epoch);
        Ok(reaches.then_some(history))
    }

    fn deliver(&self, topic: &Topic, delivery: Delivery<'_>) -> Delivered {
        let Delivery { epoch, seq, from, frame, ack } = delivery;
        let scope = gather::scope(self, topic, Some(from));
        let mut shard = self.lock_shard(topic);
        let Some(state) = shard.get_mut(topic) else {
            ack_now(ack, seq);
            return Delivered::Nobody;
        };
        // Another poll's run holds earlier messages the publisher may be
        // owed: they go before its ack.
        state.make_way(scope);
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
        let delivered = state.deliver(scope, Some(from), seq, frame.frame());
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

/// A replay's next read: `messages` at most, within a page and the room
/// the subscriber's queue has.
fn replay_page(messages: usize, outbox: &Outbox) -> ReadLimit {
    ReadLimit { messages, bytes: REPLAY_PAGE.min(outbox.room()) }
}

/// Queues the messages of `page` after `after` up to `last` for `sub`, as
/// answers; returns the last seq replayed (`last` once the page reaches it).
fn replay(sub: &Subscriber, after: u64, last: u64, page: &[(u64, crate::engine::MessageText)]) -> u64 {
    let mut replayed = after;
    for (seq, frame) in page.iter().filter(|(s, _)| *s > after && *s <= last) {
        let _ = sub.outbox.push_reserved(frame.frame().clone());
        replayed = *seq;
    }
    // A page that holds no message up to `last` (none retained past it) ends it.
    if page.last().is_none_or(|(s, _)| *s >= last) {
        replayed = last;
    }
    replayed
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

/// Runs `future` gathering (see the module documentation): what it publishes
/// as `owner` (a peer's id) to one topic in one poll is queued as one run
/// when the poll ends.
pub(crate) fn gathered<F: Future>(owner: PeerKey, future: F) -> Gathered<F> {
    Gathered { owner, future }
}

pin_project_lite::pin_project! {
    /// A future whose every poll gathers (see [`gathered`]). A struct, not
    /// an `async` block: a block would keep room for the future it wraps
    /// twice (rust-lang/rust#62958), and an idle peer holds this one for as
    /// long as it is connected.
    pub(crate) struct Gathered<F> {
        owner: PeerKey,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Gathered<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _poll = gather::enter(*this.owner);
        this.future.poll(cx)
    }
}

/// Queues what the gathering poll running on this thread holds open before
/// something is queued for the peer `target` (its id): unless `target` is
/// the poll's own peer, which no open run goes to, the run must reach
/// `target` first, as it would have without the gathering.
pub(crate) fn before_queue_to(target: PeerKey) {
    gather::before_queue_to(target);
}

/// The gathering poll running on each thread: whose it is, and the one topic
/// whose run it holds open (a poll touching another topic queues the run
/// first, so at most one is open). Only the registry reaches it.
mod gather {
    use std::{
        cell::RefCell,
        sync::{
            atomic::{AtomicU64, Ordering},
            Weak,
        },
    };

    use crosswire_shared::Topic;

    use super::{PeerKey, Topics};

    /// Ids of the gathering polls that opened a run: unique across threads,
    /// since a run is told apart from another poll's by it. Taken once per
    /// poll that publishes, not per poll.
    static SCOPES: AtomicU64 = AtomicU64::new(1);

    thread_local! {
        static GATHER: RefCell<Gather> = const { RefCell::new(Gather { depth: 0, owner: PeerKey(0), scope: 0, open: None }) };
    }

    struct Gather {
        /// Gathered polls running on this thread (nested: only the outermost counts).
        depth: u32,
        /// Its peer.
        owner: PeerKey,
        /// Its id once it opened a run; 0 before.
        scope: u64,
        /// The registry and topic whose run it may hold open.
        open: Option<(Weak<Topics>, Topic)>,
    }

    /// A gathering poll, for as long as it runs.
    pub(super) struct Poll(());

    pub(super) fn enter(owner: PeerKey) -> Poll {
        GATHER.with(|gather| {
            let mut gather = gather.borrow_mut();
            if gather.depth == 0 {
                gather.owner = owner;
            }
            gather.depth += 1;
        });
        Poll(())
    }

    impl Drop for Poll {
        fn drop(&mut self) {
            let open = GATHER.with(|gather| {
                let mut gather = gather.borrow_mut();
                gather.depth -= 1;
                if gather.depth > 0 {
                    return None;
                }
                let scope = std::mem::take(&mut gather.scope);
                gather.open.take().map(|open| (open, scope))
            });
            settle(open);
        }
    }

    /// The gathering poll a delivery to `topic` from `from` joins a run of:
    /// `None` outside one, or for a message not from its own peer (which
    /// may be a recipient, and must then get it in order with its answers).
    /// Either way another topic's open run is queued first, so that a
    /// poll's messages keep their order across topics.
    pub(super) fn scope(topics: &Topics, topic: &Topic, from: Option<&str>) -> Option<u64> {
        settle_other(topics, topic);
        let from = PeerKey::of(from?);
        let weak = topics.me.get()?;
        GATHER.with(|gather| {
            let mut gather = gather.try_borrow_mut().ok()?;
            if gather.depth == 0 || gather.owner != from {
                return None;
            }
            if gather.scope == 0 {
                gather.scope = SCOPES.fetch_add(1, Ordering::Relaxed);
            }
            if gather.open.is_none() {
                gather.open = Some((weak.clone(), topic.clone()));
            }
            Some(gather.scope)
        })
    }

    /// Queues the open run if it is not `topic`'s (of this registry).
    pub(super) fn settle_other(topics: &Topics, topic: &Topic) {
        let stale = GATHER.with(|gather| {
            let mut gather = gather.try_borrow_mut().ok()?;
            let (open_in, open_topic) = gather.open.as_ref()?;
            if std::ptr::eq(open_in.as_ptr(), topics) && open_topic == topic {
                return None;
            }
            let scope = gather.scope;
            gather.open.take().map(|open| (open, scope))
        });
        settle(stale);
    }

    pub(super) fn before_queue_to(target: PeerKey) {
        let stale = GATHER.with(|gather| {
            let mut gather = gather.try_borrow_mut().ok()?;
            if gather.depth == 0 || gather.owner == target {
                return None;
            }
            let scope = gather.scope;
            gather.open.take().map(|open| (open, scope))
        });
        settle(stale);
    }

    fn settle(open: Option<((Weak<Topics>, Topic), u64)>) {
        if let Some(((topics, topic), scope)) = open {
            if let Some(topics) = topics.upgrade() {
                topics.settle_run(&topic, scope);
            }
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
    use tokio::time::Instant;

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
        let engine = Arc::new(MemoryEngine::new(limits));
        let topics = Arc::new(Topics::new(engine, limits.history_size, presence_list, limits.max_topics));
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
        entries(rx).into_iter().flatten().collect()
    }

    /// The entries queued now, each as the texts of the frames it holds
    /// (more than one for a run).
    fn entries(rx: &mut OutboxReceiver) -> Vec<Vec<String>> {
        let mut out = vec![];
        while let Some(run) = rx.frames.try_recv() {
            out.push(run.split().into_iter().map(|m| m.into_text().unwrap()).collect());
        }
        out
    }

    /// `(topic, seq)` of each `message` frame among `texts`.
    fn seqs(texts: &[String]) -> Vec<(String, u64)> {
        texts
            .iter()
            .map(|t| match ServerFrame::decode(t).unwrap() {
                ServerFrame::Message { topic, seq, .. } => (topic.to_string(), seq),
                other => panic!("expected a message, got {other:?}"),
            })
            .collect()
    }

    async fn publish_from(topics: &Topics, t: &Topic, from: &str, n: u64) -> u64 {
        topics.publish(t, Publication { from, data: &data(n), ack: None, at: Instant::now() }).await.unwrap()
    }

    fn data(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    async fn publish(topics: &Topics, t: &Topic, n: u64) -> Result<u64, EngineError> {
        topics.publish(t, Publication { from: "x", data: &data(n), ack: None, at: Instant::now() }).await
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
        assert_eq!(topics.publish(&t, Publication { from: "a", data: &data(1), ack, at: Instant::now() }).await, Ok(1));
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

    async fn publish_big(topics: &Topics, t: &Topic, n: u64) -> u64 {
        let data = RawValue::from_string(format!(r#"["{}",{n}]"#, "x".repeat(100_000))).unwrap();
        topics.publish(t, Publication { from: "x", data: &data, ack: None, at: Instant::now() }).await.unwrap()
    }

    /// What the write loop does while a replay waits: takes what is queued,
    /// writes it, and comes back (which settles it); until `done`.
    async fn write_until(rx: &mut OutboxReceiver, done: impl Fn() -> bool) -> Vec<Vec<String>> {
        let mut batches = Vec::new();
        while !done() {
            let batch = texts(rx);
            if !batch.is_empty() {
                batches.push(batch);
            }
            tokio::task::yield_now().await;
        }
        batches.push(texts(rx));
        batches
    }

    /// A replay longer than a page is queued a page at a time, each once
    /// the last is taken; what is published meanwhile follows the last page.
    #[tokio::test]
    async fn a_long_replay_goes_a_page_at_a_time_and_live_messages_follow_it() {
        let topics = topics(100);
        let t = topic("t");
        let epoch = join(&topics, &t, "probe", sub(16).0, None).await.epoch;
        for n in 1..=10 {
            publish_big(&topics, &t, n).await;
        }
        let (s, mut rx) = sub(1 << 10);
        let since = Since { epoch: epoch.to_string(), seq: 0 };
        let replaying = tokio::spawn({
            let topics = Arc::clone(&topics);
            let t = t.clone();
            async move { join(&topics, &t, "p", s, Some(&since)).await }
        });
        // The first page is queued, and the replay waits for it to be taken.
        while rx.frames.try_recv().is_none() && !replaying.is_finished() {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!replaying.is_finished(), "the next page waits for the first to be written");
        let mut first = 1 + texts(&mut rx).len();
        assert!(first * 100_000 <= REPLAY_PAGE, "{first} messages in the first page");
        publish_big(&topics, &t, 11).await;
        let batches = write_until(&mut rx, || replaying.is_finished()).await;
        assert!(replaying.await.unwrap().recovered);
        let rest: Vec<String> = batches.into_iter().flatten().collect();
        first += seqs(&rest).len();
        assert_eq!(first, 11);
        let order: Vec<u64> = seqs(&rest).into_iter().map(|(_, s)| s).collect();
        assert_eq!(order, ((11 - order.len() as u64 + 1)..=11).collect::<Vec<_>>(), "in order, the live one last");
    }

    /// A later page that no longer reaches (the history moved on meanwhile)
    /// cannot complete the replay: the peer is closed, never given a gap.
    #[tokio::test]
    async fn a_replay_whose_history_is_lost_meanwhile_closes_the_peer() {
        let topics = topics(5);
        let t = topic("t");
        let epoch = join(&topics, &t, "probe", sub(16).0, None).await.epoch;
        for n in 1..=5 {
            publish_big(&topics, &t, n).await;
        }
        let (s, mut rx) = sub(1 << 10);
        let since = Since { epoch: epoch.to_string(), seq: 0 };
        let replaying = tokio::spawn({
            let topics = Arc::clone(&topics);
            let t = t.clone();
            async move { join(&topics, &t, "p", s, Some(&since)).await }
        });
        let mut taken = std::collections::VecDeque::new();
        while rx.frames.take(&mut taken, usize::MAX) == 0 {
            tokio::task::yield_now().await;
        }
        for n in 6..=10 {
            publish_big(&topics, &t, n).await;
        }
        write_until(&mut rx, || replaying.is_finished()).await;
        replaying.await.unwrap();
        assert_eq!(rx.closing().map(|c| u16::from(c.frame.code)), Some(crosswire_shared::close_code::SLOW_CONSUMER));
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
        let read = topics
            .engine
            .read(
                &t,
                Some(&Since { epoch: epoch.to_string(), seq: 0 }),
                ReadLimit { messages: 8, bytes: usize::MAX },
                true,
            )
            .await
            .unwrap();
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
            topics.publish(&old, Publication { from: "x", data: &blob, ack: None, at: Instant::now() }).await.unwrap();
        }
        for _ in 0..500 {
            topics.publish(&new, Publication { from: "x", data: &blob, ack: None, at: Instant::now() }).await.unwrap();
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

    fn at(topic: &str, seq: u64) -> (String, u64) {
        (topic.to_string(), seq)
    }

    #[tokio::test]
    async fn a_gathering_poll_queues_what_it_publishes_to_a_topic_as_one_run() {
        let topics = topics(16);
        let t = topic("t");
        let (a, mut arx) = sub(1024);
        let (b, mut brx) = sub(1024);
        join(&topics, &t, "a", a, None).await;
        join(&topics, &t, "b", b, None).await;
        let p: Arc<str> = "p".into();
        gathered(PeerKey::of(&p), async {
            for n in 1..=3 {
                publish_from(&topics, &t, &p, n).await;
            }
            topics.publish_raw(&t, Some(&p), crate::Message::text("raw"));
            assert!(entries(&mut arx).is_empty(), "held until the poll ends");
        })
        .await;
        for rx in [&mut arx, &mut brx] {
            let entries = entries(rx);
            assert_eq!(entries.len(), 1, "one entry: {entries:?}");
            assert_eq!(seqs(&entries[0][..3]), [at("t", 1), at("t", 2), at("t", 3)]);
            assert_eq!(entries[0][3], "raw");
        }
        // Outside a gathering poll, or from another peer than the poll's, a
        // message is queued at once.
        publish_from(&topics, &t, "q", 4).await;
        gathered(PeerKey::of(&p), async {
            publish_from(&topics, &t, "q", 5).await;
            assert_eq!(entries(&mut brx).len(), 2);
        })
        .await;
        assert_eq!(entries(&mut arx).len(), 2);
    }

    #[tokio::test]
    async fn a_run_keeps_the_order_across_topics_and_with_sends_to_other_peers() {
        let topics = topics(16);
        let (t1, t2) = (topic("t1"), topic("t2"));
        let a_id: Arc<str> = "a".into();
        let (a, mut arx) = sub(1024);
        let a_outbox = a.outbox.clone();
        topics.subscribe(&t1, &a_id, a, None, |_| None).await.unwrap();
        let also = Subscriber::new(a_outbox.clone(), None, false, Arc::clone(&sub(1).0.memberships));
        topics.subscribe(&t2, &a_id, also, None, |_| None).await.unwrap();
        let p: Arc<str> = "p".into();
        let early = gathered(PeerKey::of(&p), async {
            publish_from(&topics, &t1, &p, 1).await;
            publish_from(&topics, &t1, &p, 2).await;
            publish_from(&topics, &t2, &p, 3).await;
            publish_from(&topics, &t1, &p, 4).await;
            // Something for the poll's own peer: no open run goes to it.
            before_queue_to(PeerKey::of(&p));
            let early = entries(&mut arx);
            // Something for another peer: the open run goes first.
            before_queue_to(PeerKey::of(&a_id));
            a_outbox.push(Frame::text("direct")).unwrap();
            publish_from(&topics, &t1, &p, 5).await;
            early
        })
        .await;
        assert_eq!(early.len(), 2, "t1's first run, then t2's: {early:?}");
        assert_eq!(seqs(&early[0]), [at("t1", 1), at("t1", 2)]);
        assert_eq!(seqs(&early[1]), [at("t2", 1)]);
        let late = entries(&mut arx);
        assert_eq!(late.len(), 3, "{late:?}");
        assert_eq!(seqs(&late[0]), [at("t1", 3)]);
        assert_eq!(late[1], ["direct"]);
        assert_eq!(seqs(&late[2]), [at("t1", 4)]);
    }

    #[tokio::test]
    async fn whatever_changes_a_topic_queues_its_open_run_first() {
        let topics = topics(16);
        let t = topic("t");
        let (a, mut arx) = sub(1024);
        join(&topics, &t, "a", a, None).await;
        let (leaver, mut lrx) = sub(1024);
        join(&topics, &t, "leaver", leaver, None).await;
        let (late, mut late_rx) = sub(1024);
        let p: Arc<str> = "p".into();
        gathered(PeerKey::of(&p), async {
            publish_from(&topics, &t, &p, 1).await;
            // A subscriber joining now gets what follows, not the open run.
            join(&topics, &t, "late", late, None).await;
            publish_from(&topics, &t, &p, 2).await;
            // One leaving gets what was published while it was there.
            topics.unsubscribe(&t, "leaver");
            publish_from(&topics, &t, &p, 3).await;
            // A delivery from elsewhere (another peer, a node) comes after it.
            publish_from(&topics, &t, "q", 4).await;
        })
        .await;
        let a = entries(&mut arx);
        assert_eq!(a.len(), 4, "{a:?}");
        assert_eq!(seqs(&a.concat()), [at("t", 1), at("t", 2), at("t", 3), at("t", 4)]);
        assert_eq!(seqs(&texts(&mut lrx)), [at("t", 1), at("t", 2)]);
        assert_eq!(seqs(&texts(&mut late_rx)), [at("t", 2), at("t", 3), at("t", 4)]);
    }

    /// A publisher's ack comes after every earlier message of the topic it
    /// is owed, those in another poll's open run among them.
    #[tokio::test]
    async fn an_ack_comes_after_the_earlier_messages_of_another_polls_run() {
        let topics = topics(16);
        let t = topic("t");
        let a_id: Arc<str> = "a".into();
        let (a, mut arx) = sub(1024);
        let a_outbox = a.outbox.clone();
        topics.subscribe(&t, &a_id, a, None, |_| None).await.unwrap();
        let p: Arc<str> = "p".into();
        gathered(PeerKey::of(&p), async {
            publish_from(&topics, &t, &p, 1).await;
            let ack = Some(AckTo { outbox: a_outbox.clone(), ack: 9, in_order: true });
            topics.publish(&t, Publication { from: &a_id, data: &data(2), ack, at: Instant::now() }).await.unwrap();
        })
        .await;
        let texts = texts(&mut arx);
        assert_eq!(seqs(&texts[..1]), [at("t", 1)]);
        assert_eq!(texts[1], r#"{"type":"ack","ack":9,"seq":2}"#);
        assert_eq!(texts.len(), 2);
    }

    #[tokio::test]
    async fn a_run_counts_each_of_its_messages_toward_the_bounds() {
        let topics = topics(16);
        let t = topic("t");
        let (fits, mut frx) = sub(4);
        let fits_outbox = fits.outbox.clone();
        let (over, _orx) = sub(3);
        let over_outbox = over.outbox.clone();
        join(&topics, &t, "fits", fits, None).await;
        join(&topics, &t, "over", over, None).await;
        let p: Arc<str> = "p".into();
        gathered(PeerKey::of(&p), async {
            for n in 1..=4 {
                publish_from(&topics, &t, &p, n).await;
            }
        })
        .await;
        assert!(!fits_outbox.is_closing());
        assert_eq!(fits_outbox.backlog().frames, 4);
        assert!(over_outbox.is_closing(), "four messages over a bound of three: a slow consumer");
        assert_eq!(texts(&mut frx).len(), 4);
    }

    #[test]
    fn a_subscriber_reading_its_history_holds_a_runs_messages_one_by_one() {
        let (mut s, mut rx) = sub(16);
        s.pending = Some(Vec::new());
        let messages: Vec<(u64, Frame)> = (1..=3).map(|n| (n, Frame::text(n.to_string()))).collect();
        let wire = messages.iter().map(|(_, f)| f.as_wire().len()).sum();
        let run = Run { scope: 1, except: None, messages, wire, payload: 3 };
        let joined = Frame::concat(run.messages.iter().map(|(_, f)| f), run.wire);
        s.push_run(&run, &joined);
        let held = s.pending.as_ref().unwrap();
        assert_eq!(held.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(held.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(), joined.split());
        assert!(texts(&mut rx).is_empty());
        s.pending = None;
        s.push_run(&run, &joined);
        assert_eq!(entries(&mut rx), [["1", "2", "3"]]);
    }
}
