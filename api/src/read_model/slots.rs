//! The model's rows, in chunks of a fixed size: a row keeps its slot for life, and adding one
//! never copies the others. A plain vector would move every row (and briefly hold them twice)
//! each time it outgrows its capacity, under the write lock, starting with the first insert
//! after a full load (whose vector is exactly full).

/// Slots per chunk: small enough that a new chunk costs nothing to add, large enough that the
/// chunk list stays a few hundred pointers long at millions of rows.
const CHUNK: usize = 1 << 12;

pub(super) struct Slots<T> {
    chunks: Vec<Vec<Option<T>>>,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slots<T> {
    /// Room for `n` slots in the chunk list (the chunks themselves are allocated as they fill).
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            chunks: Vec::with_capacity(n.div_ceil(CHUNK)),
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn get(&self, slot: u32) -> Option<&T> {
        let slot = slot as usize;
        self.chunks
            .get(slot / CHUNK)
            .and_then(|chunk| chunk.get(slot % CHUNK))
            .and_then(Option::as_ref)
    }

    pub(super) fn push(&mut self, value: Option<T>) {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        self.chunks
            .last_mut()
            .expect("a chunk was just made")
            .push(value);
        self.len += 1;
    }

    /// Puts `value` in an existing slot and returns what it held.
    pub(super) fn replace(&mut self, slot: u32, value: Option<T>) -> Option<T> {
        let slot = slot as usize;
        assert!(slot < self.len, "slot {slot} of {}", self.len);
        std::mem::replace(&mut self.chunks[slot / CHUNK][slot % CHUNK], value)
    }

    /// Every slot in order, live or dead.
    pub(super) fn iter(&self) -> impl Iterator<Item = Option<&T>> + Clone + '_ {
        self.chunks.iter().flatten().map(Option::as_ref)
    }

    /// The live values with their slots, in slot order.
    pub(super) fn live(&self) -> impl Iterator<Item = (u32, &T)> + Clone + '_ {
        self.iter()
            .enumerate()
            .filter_map(|(slot, value)| value.map(|value| (slot as u32, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_values_across_chunks() {
        let mut slots = Slots::with_capacity(3);
        for i in 0..(CHUNK as u32 * 2 + 5) {
            slots.push((i % 7 != 0).then_some(i));
        }
        assert_eq!(slots.len(), CHUNK * 2 + 5);
        assert_eq!(slots.get(CHUNK as u32 + 1), Some(&(CHUNK as u32 + 1)));
        assert_eq!(slots.get(7), None);
        assert_eq!(slots.get(u32::MAX), None);
        assert_eq!(slots.replace(8, None), Some(8));
        assert_eq!(slots.replace(8, Some(80)), None);
        assert_eq!(slots.get(8), Some(&80));
        let live: Vec<u32> = slots.live().map(|(slot, _)| slot).take(3).collect();
        assert_eq!(live, vec![1, 2, 3]);
    }
}
