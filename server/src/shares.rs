//! Fair shares of the topic table: one client address (IPv6 per /64, as the
//! connection limits count them) and, with JWT, one user may hold at most
//! `max_topics_per_ip` topics, so that whatever one of them does, the table
//! has room for everyone else's first topics.
//!
//! What is counted is what keeps a topic in the table: the distinct topics
//! the holder's peers are subscribed to on this node. A topic fifty peers of
//! one address hold counts once for it; a topic held from two addresses
//! counts for each. A subscription takes a [`Share`] when it is made and
//! gives it back when it is dropped, whichever way it ends (unsubscribe, the
//! peer leaving, a failed subscribe, a refresh dropping the topic): nothing
//! to forget, so nothing leaks.
//!
//! It lives in the node's registry, above the engine, so it holds for any
//! engine. Taking and giving back cost one hash lookup under one of a few
//! sharded locks; the table holds an entry per holder with a subscription,
//! so it is bounded by the subscriptions that exist. Its locks are leaves:
//! nothing is locked while one is held.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use ahash::RandomState;
use crosswire_shared::Topic;

use crate::{
    engine::{EngineError, ShareHolder},
    limits::IpKey,
};

const SHARDS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Holder {
    Address(IpKey),
    User(Arc<str>),
}

/// Per holder, the topics it holds and by how many of its subscriptions.
type Shard = HashMap<Holder, HashMap<Topic, u32, RandomState>, RandomState>;

/// Every holder's share of this node's topics.
#[derive(Debug, Clone)]
pub(crate) struct Shares {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Topics one holder may hold.
    max: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

/// One subscription's part of its holders' shares; given back when dropped.
#[derive(Debug)]
pub(crate) struct Share {
    inner: Arc<Inner>,
    topic: Topic,
    address: Option<IpKey>,
    user: Option<Arc<str>>,
}

impl Shares {
    /// Shares of `max` topics each (at least one).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max: max.max(1),
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            }),
        }
    }

    /// Counts a subscription to `topic` from `address` (if known) by `user`
    /// (if authenticated) against both their shares, or says whose is used
    /// up (then nothing is counted).
    pub(crate) fn take(
        &self,
        topic: &Topic,
        address: Option<IpAddr>,
        user: Option<&Arc<str>>,
    ) -> Result<Share, EngineError> {
        let mut share = Share { inner: Arc::clone(&self.inner), topic: topic.clone(), address: None, user: None };
        let refused = |holder| EngineError::TopicShare { holder, max: self.inner.max };
        if let Some(key) = address.map(IpKey::from) {
            if !self.inner.take(Holder::Address(key), topic) {
                return Err(refused(ShareHolder::Address));
            }
            share.address = Some(key);
        }
        if let Some(user) = user {
            // Refused here, `share` gives back the address's part as it drops.
            if !self.inner.take(Holder::User(Arc::clone(user)), topic) {
                return Err(refused(ShareHolder::User));
            }
            share.user = Some(Arc::clone(user));
        }
        Ok(share)
    }

    /// The distinct topics subscribed to from `ip` (its /64 for IPv6).
    pub(crate) fn held_by_address(&self, ip: IpAddr) -> usize {
        self.inner.held(&Holder::Address(IpKey::from(ip)))
    }

    /// The distinct topics subscribed to by `user`.
    pub(crate) fn held_by_user(&self, user: &str) -> usize {
        self.inner.held(&Holder::User(Arc::from(user)))
    }

    /// Holders with at least one topic (the table's size).
    #[cfg(test)]
    fn holders(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl Inner {
    fn shard(&self, holder: &Holder) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.hasher.hash_one(holder) as usize % SHARDS])
    }

    /// Counts one more subscription of `holder` to `topic`; false (nothing
    /// counted) when it is a topic more than its share.
    fn take(&self, holder: Holder, topic: &Topic) -> bool {
        let mut shard = self.shard(&holder);
        let topics = shard.entry(holder).or_default();
        if let Some(n) = topics.get_mut(topic) {
            *n += 1;
            return true;
        }
        // A holder new to the table has no topic yet, and `max` is at least
        // one: a refusal never leaves an empty entry behind.
        if topics.len() >= self.max {
            return false;
        }
        topics.insert(topic.clone(), 1);
        true
    }

    fn give_back(&self, holder: &Holder, topic: &Topic) {
        let mut shard = self.shard(holder);
        let Some(topics) = shard.get_mut(holder) else { return };
        let Some(n) = topics.get_mut(topic) else { return };
        *n -= 1;
        if *n == 0 {
            topics.remove(topic);
            if topics.is_empty() {
                shard.remove(holder);
            }
        }
    }

    fn held(&self, holder: &Holder) -> usize {
        self.shard(holder).get(holder).map_or(0, HashMap::len)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(key) = self.address {
            self.inner.give_back(&Holder::Address(key), &self.topic);
        }
        if let Some(user) = self.user.take() {
            self.inner.give_back(&Holder::User(user), &self.topic);
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Every step under the lock leaves the map consistent: keep serving.
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    #[test]
    fn an_address_holds_distinct_topics_up_to_its_share() {
        let shares = Shares::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let one = shares.take(&topic("one"), Some(a), None).unwrap();
        // Fifty subscriptions of one address to one topic count once.
        let again: Vec<Share> = (0..50).map(|_| shares.take(&topic("one"), Some(a), None).unwrap()).collect();
        let two = shares.take(&topic("two"), Some(a), None).unwrap();
        assert_eq!(shares.held_by_address(a), 2);
        assert_eq!(
            shares.take(&topic("three"), Some(a), None).err(),
            Some(EngineError::TopicShare { holder: ShareHolder::Address, max: 2 })
        );
        assert_eq!(shares.held_by_address(a), 2, "a refusal counts nothing");
        // Another address has its own share, of the same topics too.
        let _b = shares.take(&topic("one"), Some(b), None).unwrap();
        assert_eq!(shares.held_by_address(b), 1);
        drop(one);
        assert_eq!(shares.held_by_address(a), 2, "49 more subscriptions still hold it");
        drop(again);
        assert_eq!(shares.held_by_address(a), 1);
        let _three = shares.take(&topic("three"), Some(a), None).unwrap();
        drop(two);
        assert_eq!(shares.held_by_address(a), 1);
    }

    #[test]
    fn ipv6_shares_per_64() {
        let shares = Shares::new(1);
        let _a = shares.take(&topic("a"), Some("2001:db8:1:2::1".parse().unwrap()), None).unwrap();
        assert!(shares.take(&topic("b"), Some("2001:db8:1:2:ffff::9".parse().unwrap()), None).is_err());
        assert!(shares.take(&topic("b"), Some("2001:db8:1:3::1".parse().unwrap()), None).is_ok());
    }

    #[test]
    fn a_user_is_held_to_its_share_from_any_address_and_gives_all_back() {
        let shares = Shares::new(2);
        let alice: Arc<str> = "alice".into();
        let addr = |n: u8| Some(IpAddr::from([192, 0, 2, n]));
        let t1 = shares.take(&topic("t1"), addr(1), Some(&alice)).unwrap();
        let t2 = shares.take(&topic("t2"), addr(2), Some(&alice)).unwrap();
        assert_eq!(
            shares.take(&topic("t3"), addr(3), Some(&alice)).err(),
            Some(EngineError::TopicShare { holder: ShareHolder::User, max: 2 })
        );
        assert_eq!(shares.held_by_address(addr(3).unwrap()), 0, "the address's part went back with the refusal");
        assert_eq!(shares.held_by_user("alice"), 2);
        drop((t1, t2));
        assert_eq!((shares.held_by_user("alice"), shares.holders()), (0, 0), "nothing left behind");
    }
}
