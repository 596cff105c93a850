//! Releases results in task order as soon as the prefix is complete.

use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) struct ReorderBuffer<T> {
    /// The index of `pending[0]`: everything before it has been released.
    released: usize,
    pending: VecDeque<Option<T>>,
}

impl<T> ReorderBuffer<T> {
    pub(crate) fn new() -> Self {
        Self { released: 0, pending: VecDeque::new() }
    }

    /// How many items have been released so far.
    pub(crate) fn released(&self) -> usize {
        self.released
    }

    pub(crate) fn insert(&mut self, index: usize, item: T) {
        let slot = index.checked_sub(self.released).expect("an index is inserted once");
        if slot >= self.pending.len() {
            self.pending.resize_with(slot + 1, || None);
        }
        debug_assert!(self.pending[slot].is_none(), "index {index} inserted twice");
        self.pending[slot] = Some(item);
    }

    /// The next item in order, if it has arrived.
    pub(crate) fn pop(&mut self) -> Option<T> {
        let item = self.pending.front_mut()?.take()?;
        self.pending.pop_front();
        self.released += 1;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn releases_every_permutation_in_order(order in Just((0..50).collect::<Vec<usize>>()).prop_shuffle()) {
            let mut buffer = ReorderBuffer::new();
            let mut out = Vec::new();
            for index in order {
                buffer.insert(index, index);
                while let Some(item) = buffer.pop() {
                    out.push(item);
                }
            }
            prop_assert_eq!(out, (0..50).collect::<Vec<_>>());
            prop_assert_eq!(buffer.released(), 50);
        }
    }
}
