//! One sort column's order and the ways a change set builds its next one, always as a new
//! order beside the old (planned while readers go on, swapped in afterwards):
//! - `merged`: a column the model sorts itself; the changed rows sorted among themselves and
//!   merged into the rest in one pass.
//! - `placed`: a text column; each changed row placed right after the row Postgres says
//!   precedes it under the database's collation, so no string is compared here.
//! - `from_ids`: a text column's whole order as Postgres listed it.

use std::cmp::Ordering;
use std::collections::HashMap;

/// A column's live slots by `(column, id)` ascending, and each slot's place in them.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(super) struct Order {
    pub(super) slots: Vec<u32>,
    /// `position[slot]`: where the slot stands in `slots` (`u32::MAX` for a dead slot).
    pub(super) position: Vec<u32>,
}

impl Order {
    /// An order of `slots` (already in order) among `n_slots` slots.
    pub(super) fn from_slots(slots: Vec<u32>, n_slots: usize) -> Self {
        let mut position = vec![u32::MAX; n_slots];
        for (at, slot) in slots.iter().enumerate() {
            position[*slot as usize] = at as u32;
        }
        Self { slots, position }
    }
}

/// A set of slots as bits, for the one pass that filters an order.
pub(super) struct SlotSet {
    bits: Vec<u64>,
}

impl SlotSet {
    pub(super) fn new(n_slots: usize) -> Self {
        Self {
            bits: vec![0; n_slots.div_ceil(64)],
        }
    }

    pub(super) fn insert(&mut self, slot: u32) {
        let at = slot as usize / 64;
        if at >= self.bits.len() {
            self.bits.resize(at + 1, 0);
        }
        self.bits[at] |= 1 << (slot % 64);
    }

    pub(super) fn contains(&self, slot: u32) -> bool {
        self.bits
            .get(slot as usize / 64)
            .is_some_and(|word| word & (1 << (slot % 64)) != 0)
    }
}

/// `old` without the `out` slots, with `moving` (live slots, any order) merged back in by
/// `compare`, over `n_slots` slots.
pub(super) fn merged(
    old: &Order,
    out: &SlotSet,
    mut moving: Vec<u32>,
    compare: impl Fn(u32, u32) -> Ordering,
    n_slots: usize,
) -> Order {
    moving.sort_unstable_by(|a, b| compare(*a, *b));
    let mut slots = Vec::with_capacity(old.slots.len() + moving.len());
    let mut moving = moving.into_iter().peekable();
    for kept in old
        .slots
        .iter()
        .copied()
        .filter(|slot| !out.contains(*slot))
    {
        while let Some(next) = moving.next_if(|next| compare(*next, kept) == Ordering::Less) {
            slots.push(next);
        }
        slots.push(kept);
    }
    slots.extend(moving);
    Order::from_slots(slots, n_slots)
}

/// `old` without the `out` slots, with each of `placements` (slot, the slot right before it in
/// Postgres' order, `None` for the first) put after its predecessor, which is a kept slot or
/// another placed one. A placement whose predecessor is in neither goes last (with `tail`,
/// live slots the order must hold but Postgres did not place), in slot order; how many
/// placements went there is returned, so that the caller can tell the order is provisional.
pub(super) fn placed(
    old: &Order,
    out: &SlotSet,
    placements: &[(u32, Option<u32>)],
    tail: impl Iterator<Item = u32>,
    n_slots: usize,
) -> (Order, usize) {
    let mut after: HashMap<Option<u32>, u32> = HashMap::with_capacity(placements.len());
    let mut orphans = Vec::new();
    for (slot, predecessor) in placements {
        // Postgres' order is total, so no two rows share a predecessor; if they seem to, the
        // second is provisional rather than lost.
        if let Some(previous) = after.insert(*predecessor, *slot) {
            orphans.push(previous);
        }
    }
    let mut slots = Vec::with_capacity(old.slots.len() + placements.len());
    let mut placed_so_far = 0;
    let mut chain_from = |start: Option<u32>, slots: &mut Vec<u32>| {
        let mut at = start;
        while let Some(next) = after.remove(&at) {
            slots.push(next);
            placed_so_far += 1;
            at = Some(next);
        }
    };
    chain_from(None, &mut slots);
    for kept in old
        .slots
        .iter()
        .copied()
        .filter(|slot| !out.contains(*slot))
    {
        slots.push(kept);
        chain_from(Some(kept), &mut slots);
    }
    orphans.extend(after.into_values());
    let mut in_order = SlotSet::new(n_slots);
    for slot in &slots {
        in_order.insert(*slot);
    }
    let provisional = orphans.len();
    debug_assert_eq!(placed_so_far + provisional, placements.len());
    orphans.extend(tail.filter(|slot| !in_order.contains(*slot)));
    orphans.sort_unstable();
    orphans.dedup();
    slots.extend(orphans);
    (Order::from_slots(slots, n_slots), provisional)
}

/// An order from Postgres' list of ids: ids without a live slot are skipped, and live slots it
/// did not name (`live`; a row newer than that list, whose notification is on its way) go last
/// in id order until the next order arrives.
pub(super) fn from_ids(
    ids: &[i32],
    slot_of: impl Fn(i32) -> Option<u32>,
    live: impl Iterator<Item = (u32, i32)>,
    n_slots: usize,
) -> Order {
    let mut seen = SlotSet::new(n_slots);
    let mut slots = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(slot) = slot_of(*id) {
            if !seen.contains(slot) {
                seen.insert(slot);
                slots.push(slot);
            }
        }
    }
    let mut missing: Vec<(i32, u32)> = live
        .filter(|(slot, _)| !seen.contains(*slot))
        .map(|(slot, id)| (id, slot))
        .collect();
    missing.sort_unstable();
    slots.extend(missing.into_iter().map(|(_, slot)| slot));
    Order::from_slots(slots, n_slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[u32], n: usize) -> SlotSet {
        let mut set = SlotSet::new(n);
        for slot in slots {
            set.insert(*slot);
        }
        set
    }

    #[test]
    fn a_merge_re_places_moving_slots_among_the_kept_ones() {
        // Values by slot; the order is by value, then slot.
        let values = [30, 10, 20, 40, 25];
        let old = Order::from_slots(vec![1, 2, 0, 3], 4);
        let compare = |a: u32, b: u32| values[a as usize].cmp(&values[b as usize]).then(a.cmp(&b));
        // Slot 4 is new, slot 3 is removed.
        let order = merged(&old, &set(&[3, 4], 5), vec![4], compare, 5);
        assert_eq!(order.slots, vec![1, 2, 4, 0]);
        assert_eq!(order.position, vec![3, 0, 1, u32::MAX, 2]);
    }

    #[test]
    fn placements_follow_their_predecessors_in_chains() {
        let old = Order::from_slots(vec![5, 2, 7], 8);
        // 3 goes first, 1 after 2, 0 after 1 (a chain of new rows), 7 moves to the front
        // after 3, and 4 names a predecessor that is not there.
        let placements = [
            (3, None),
            (1, Some(2)),
            (0, Some(1)),
            (7, Some(3)),
            (4, Some(6)),
        ];
        let (order, provisional) = placed(&old, &set(&[7], 8), &placements, [6].into_iter(), 8);
        assert_eq!(order.slots, vec![3, 7, 5, 2, 1, 0, 4, 6]);
        assert_eq!(provisional, 1);
        assert_eq!(order.position[4], 6);
    }

    #[test]
    fn a_removal_alone_keeps_the_rest_in_order() {
        let old = Order::from_slots(vec![2, 0, 1], 3);
        let (order, provisional) = placed(&old, &set(&[0], 3), &[], std::iter::empty(), 3);
        assert_eq!((order.slots, provisional), (vec![2, 1], 0));
        assert_eq!(order.position, vec![u32::MAX, 1, 0]);
    }

    #[test]
    fn an_order_from_ids_skips_the_unknown_and_puts_the_unlisted_last() {
        let slot_of = |id: i32| (id < 10).then_some(id as u32);
        let live = [(0u32, 0), (1, 1), (2, 2), (3, 3)].into_iter();
        let order = from_ids(&[2, 11, 0, 2], slot_of, live, 4);
        assert_eq!(order.slots, vec![2, 0, 1, 3]);
    }
}
