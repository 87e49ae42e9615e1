//! The memory engine's idle topics (held by no subscriber), oldest first:
//! what makes room at the topic cap. Listing, unlisting and finding the
//! longest-idle topic are O(1) (a doubly linked list in a slab, each topic
//! knowing its [`Slot`]), so that refusing or evicting never scans the
//! topic table.
//!
//! A publish to an idle topic does not touch this list (that would be a
//! lock per publish): the topic's own `touched` moves, and the evictor,
//! finding at the front a topic touched after it was listed, moves it to the
//! back instead (a second chance, as in the CLOCK approximation of LRU).

use crosswire_shared::Topic;
use tokio::time::Instant;

const NIL: usize = usize::MAX;

/// Where a topic sits in the list; valid until it is [removed](IdleList::remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot(usize);

struct Node {
    /// `None` while the node is free.
    topic: Option<Topic>,
    /// The topic's shard in the engine.
    shard: usize,
    /// When the topic was last touched as far as the list knows.
    since: Instant,
    prev: usize,
    /// The next node in the list, or (free) the next free node.
    next: usize,
}

/// Idle topics, in the order they were listed (or moved to the back).
pub(super) struct IdleList {
    nodes: Vec<Node>,
    head: usize,
    tail: usize,
    free: usize,
    len: usize,
}

impl Default for IdleList {
    fn default() -> Self {
        Self { nodes: Vec::new(), head: NIL, tail: NIL, free: NIL, len: 0 }
    }
}

impl IdleList {
    /// Lists `topic` (of engine shard `shard`, last touched `since`) at the back.
    pub(super) fn push_back(&mut self, topic: Topic, shard: usize, since: Instant) -> Slot {
        let node = Node { topic: Some(topic), shard, since, prev: NIL, next: NIL };
        let at = if self.free == NIL {
            self.nodes.push(node);
            self.nodes.len() - 1
        } else {
            let at = self.free;
            self.free = self.nodes[at].next;
            self.nodes[at] = node;
            at
        };
        self.link_back(at);
        self.len += 1;
        Slot(at)
    }

    /// Unlists the topic at `slot`.
    pub(super) fn remove(&mut self, slot: Slot) {
        self.unlink(slot.0);
        let node = &mut self.nodes[slot.0];
        debug_assert!(node.topic.is_some(), "a slot is removed once");
        node.topic = None;
        node.next = self.free;
        self.free = slot.0;
        self.len -= 1;
    }

    /// Moves the topic at `slot` to the back, as touched at `since`.
    pub(super) fn move_to_back(&mut self, slot: Slot, since: Instant) {
        self.unlink(slot.0);
        self.nodes[slot.0].since = since;
        self.link_back(slot.0);
    }

    /// The longest-listed topic: its slot, name, shard and listed touch.
    pub(super) fn front(&self) -> Option<(Slot, &Topic, usize, Instant)> {
        let node = self.nodes.get(self.head)?;
        Some((Slot(self.head), node.topic.as_ref()?, node.shard, node.since))
    }

    /// When the topic at `slot` was last touched as far as the list knows.
    pub(super) fn since(&self, slot: Slot) -> Instant {
        self.nodes[slot.0].since
    }

    /// Topics listed.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn link_back(&mut self, at: usize) {
        self.nodes[at].prev = self.tail;
        self.nodes[at].next = NIL;
        match self.tail {
            NIL => self.head = at,
            tail => self.nodes[tail].next = at,
        }
        self.tail = at;
    }

    fn unlink(&mut self, at: usize) {
        let (prev, next) = (self.nodes[at].prev, self.nodes[at].next);
        match prev {
            NIL => self.head = next,
            prev => self.nodes[prev].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.nodes[next].prev = prev,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn names(list: &IdleList) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = list.head;
        while at != NIL {
            out.push(list.nodes[at].topic.as_ref().unwrap().to_string());
            at = list.nodes[at].next;
        }
        out
    }

    #[test]
    fn oldest_first_removal_anywhere_and_slots_reused() {
        let mut list = IdleList::default();
        let t0 = Instant::now();
        let slots: Vec<Slot> = (0..5)
            .map(|n| list.push_back(Topic::new(&format!("t{n}")).unwrap(), n, t0 + Duration::from_secs(n as u64)))
            .collect();
        assert_eq!(names(&list), ["t0", "t1", "t2", "t3", "t4"]);
        list.remove(slots[2]);
        list.remove(slots[0]);
        list.remove(slots[4]);
        assert_eq!(names(&list), ["t1", "t3"]);
        let (slot, topic, shard, since) = list.front().unwrap();
        assert_eq!((slot, topic.as_str(), shard, since), (slots[1], "t1", 1, t0 + Duration::from_secs(1)));
        list.move_to_back(slots[1], t0 + Duration::from_secs(9));
        assert_eq!(names(&list), ["t3", "t1"]);
        assert_eq!(list.since(slots[1]), t0 + Duration::from_secs(9));
        let again = list.push_back(Topic::new("t5").unwrap(), 0, t0);
        assert!(slots.contains(&again), "a freed slot is reused: the slab never outgrows the most listed at once");
        assert_eq!(list.nodes.len(), 5);
        assert_eq!((names(&list), list.len()), (vec!["t3".to_owned(), "t1".into(), "t5".into()], 3));
        for slot in [slots[3], slots[1], again] {
            list.remove(slot);
        }
        assert!(list.front().is_none());
        assert_eq!(list.len(), 0);
    }
}
