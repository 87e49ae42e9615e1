//! The bounded queue of publishes made while the connection is not open.

use std::collections::VecDeque;

/// A FIFO with a capacity: pushing into a full queue evicts the oldest item and
/// hands it back, so the caller can report the drop (it is never silent).
#[derive(Debug, Clone)]
pub struct OfflineQueue<T> {
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> OfflineQueue<T> {
    /// An empty queue holding at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        Self { items: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Appends `item`; returns the oldest item if it had to be dropped to make room.
    #[must_use = "a dropped item must be reported"]
    pub fn push(&mut self, item: T) -> Option<T> {
        let dropped = if self.items.len() >= self.capacity { self.items.pop_front() } else { None };
        self.items.push_back(item);
        dropped
    }

    /// Removes and returns every item, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        self.items.drain(..).collect()
    }

    /// Removes and returns the items for which `remove` is true, oldest first.
    pub fn take_if(&mut self, mut remove: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.items.len());
        for item in self.items.drain(..) {
            if remove(&item) {
                taken.push(item);
            } else {
                kept.push_back(item);
            }
        }
        self.items = kept;
        taken
    }

    /// The items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most items the queue holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_drops_the_oldest_and_reports_it() {
        let mut q = OfflineQueue::new(3);
        assert_eq!(q.push(1), None);
        assert_eq!(q.push(2), None);
        assert_eq!(q.push(3), None);
        assert_eq!(q.push(4), Some(1));
        assert_eq!(q.push(5), Some(2));
        assert_eq!(q.len(), 3);
        assert_eq!(q.drain(), vec![3, 4, 5]);
        assert!(q.is_empty());
    }

    #[test]
    fn take_if_keeps_the_order_of_both_halves() {
        let mut q = OfflineQueue::new(10);
        for i in 1..=6 {
            assert_eq!(q.push(i), None);
        }
        assert_eq!(q.take_if(|i| i % 2 == 0), vec![2, 4, 6]);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), vec![1, 3, 5]);
    }

    #[test]
    fn capacity_is_at_least_one() {
        let mut q = OfflineQueue::new(0);
        assert_eq!(q.capacity(), 1);
        assert_eq!(q.push("a"), None);
        assert_eq!(q.push("b"), Some("a"));
    }
}
