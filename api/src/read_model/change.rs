//! A change set applied in two steps, so that reads never wait on it. `Model::plan` builds,
//! beside the model and while readers go on, every piece the change replaces: the rows, the
//! order of each column that moves, the posting list of each trigram whose postings change,
//! the counts by university, the id map when it must grow. `Model::install` then swaps them
//! in under the write lock, in time proportional to the number of pieces (no sorting, no list
//! shifted in place, no allocation that copies the model), and hands back what they replaced,
//! to be freed once the lock is released.

use std::cmp::Ordering;
use std::collections::HashMap;

use md5::{Digest, Md5};

use super::order::{self, Order, SlotSet};
use super::postgres::LoadedRow;
use super::postings::PostingsPlan;
use super::query::SortColumn;
use super::search::MatchSet;
use super::{compare, record_text, text_field, Entry, Model};

/// Rows changed in Postgres, loaded from one snapshot.
#[derive(Debug, Default)]
pub struct Delta {
    /// Rows that exist (new or changed).
    pub rows: Vec<LoadedRow>,
    /// Ids that were asked for and no longer exist.
    pub deleted: Vec<i32>,
    /// How the text columns the rows move take their new order, from the same snapshot.
    pub text_orders: Vec<(SortColumn, TextOrder)>,
}

/// Where Postgres puts the rows of a change set in one text column's order.
#[derive(Debug)]
pub enum TextOrder {
    /// The column's whole order, every id.
    Whole(Vec<i32>),
    /// Each moved row's id with the id of the row right before it in
    /// `order by <column>, id` (`None` when it comes first).
    Placed(Vec<(i32, Option<i32>)>),
}

/// What applying a change set did, for the sync loop's log and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rows placed last in a text order for want of a known predecessor (until the next
    /// change or reconciliation puts them right).
    pub provisional: usize,
}

/// A planned change set: every replacement piece, ready to swap in.
pub(super) struct Plan {
    /// The number of slots the model had when this was planned; installing checks it.
    n_slots_before: usize,
    /// Existing slots and what they hold next (`None`: the row was deleted).
    replaced: Vec<(u32, Option<Entry>)>,
    /// New rows, for the slots from `n_slots_before` on.
    appended: Vec<Entry>,
    ids: IdsPlan,
    n_live: usize,
    universities: Option<HashMap<i32, usize>>,
    /// Each university's slots, when any chat joined, left or changed university.
    university_slots: Option<HashMap<i32, MatchSet>>,
    /// New orders, by column index.
    orders: Vec<(usize, Order)>,
    postings: PostingsPlan,
    documents_changed: bool,
    provisional: usize,
}

/// How the id map changes: edited in place while it has room, else a grown copy swapped in
/// (growing it in place would rehash every id under the write lock).
enum IdsPlan {
    Edit {
        removed: Vec<i32>,
        added: Vec<(i32, u32)>,
    },
    Whole(HashMap<i32, u32>),
}

/// What an installed plan replaced; dropping it frees them.
#[must_use = "drop it after releasing the write lock"]
pub(super) struct Replaced {
    _entries: Vec<Entry>,
    _orders: Vec<Order>,
    _postings: Vec<Vec<u32>>,
    _ids: Option<HashMap<i32, u32>>,
    _universities: Option<HashMap<i32, usize>>,
    _university_slots: Option<HashMap<i32, MatchSet>>,
}

impl Plan {
    pub(super) fn applied(&self) -> Applied {
        Applied {
            provisional: self.provisional,
        }
    }
}

/// Each slot a change set touches, with its entry before and after.
struct Changes<'a> {
    model: &'a Model,
    n_slots_before: usize,
    /// Existing slots' next entries.
    changed: HashMap<u32, Option<&'a Entry>>,
    appended: &'a [Entry],
    /// Ids of new rows, with their slots.
    new_ids: HashMap<i32, u32>,
    deleted: SlotSet,
    any_deleted: bool,
}

impl Changes<'_> {
    fn n_slots(&self) -> usize {
        self.n_slots_before + self.appended.len()
    }

    /// What `slot` holds once the plan is installed.
    fn planned(&self, slot: u32) -> Option<&Entry> {
        if slot as usize >= self.n_slots_before {
            return self.appended.get(slot as usize - self.n_slots_before);
        }
        match self.changed.get(&slot) {
            Some(next) => *next,
            None => self.model.entry(slot),
        }
    }

    /// The slot of `id` once the plan is installed.
    fn slot_of(&self, id: i32) -> Option<u32> {
        let slot = self
            .model
            .by_id
            .get(&id)
            .or_else(|| self.new_ids.get(&id))
            .copied()?;
        self.planned(slot).is_some().then_some(slot)
    }

    fn appended_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (self.n_slots_before..self.n_slots()).map(|slot| slot as u32)
    }

    /// Existing slots with their entries before and after.
    fn existing(&self) -> impl Iterator<Item = (u32, &Entry, Option<&Entry>)> + '_ {
        self.changed
            .iter()
            .filter_map(|(slot, next)| self.model.entry(*slot).map(|before| (*slot, before, *next)))
    }
}

impl Model {
    /// Plans `delta` against this model without changing it (see the module docs).
    pub(super) fn plan(&self, delta: Delta) -> Plan {
        let n_slots_before = self.entries.len();
        let mut replaced: Vec<(u32, Option<Entry>)> = Vec::new();
        let mut appended: Vec<Entry> = Vec::new();
        let mut removed_ids = Vec::new();
        let mut new_ids = HashMap::new();
        for id in delta.deleted {
            if let Some(&slot) = self.by_id.get(&id) {
                replaced.push((slot, None));
                removed_ids.push(id);
            }
        }
        for row in delta.rows {
            let entry = Entry::new(row);
            match self.by_id.get(&entry.id) {
                Some(&slot) => replaced.push((slot, Some(entry))),
                None => {
                    let slot = (n_slots_before + appended.len()) as u32;
                    if new_ids.insert(entry.id, slot).is_none() {
                        appended.push(entry);
                    }
                }
            }
        }
        // Each slot once, the last word winning, as the rows would have landed one by one.
        replaced.reverse();
        let mut seen = SlotSet::new(n_slots_before);
        replaced.retain(|(slot, _)| {
            let first = !seen.contains(*slot);
            seen.insert(*slot);
            first
        });
        let n_removed = replaced.iter().filter(|(_, next)| next.is_none()).count();
        let n_live = self.n_live - n_removed + appended.len();

        let mut deleted = SlotSet::new(n_slots_before);
        for (slot, next) in &replaced {
            if next.is_none() {
                deleted.insert(*slot);
            }
        }
        let changes = Changes {
            model: self,
            n_slots_before,
            changed: replaced
                .iter()
                .map(|(slot, next)| (*slot, next.as_ref()))
                .collect(),
            appended: &appended,
            new_ids,
            deleted,
            any_deleted: n_removed > 0,
        };
        let document_changes: Vec<(u32, Option<&str>, Option<&str>)> = changes
            .existing()
            .map(|(slot, before, after)| {
                (slot, Some(before.document()), after.map(Entry::document))
            })
            .filter(|(_, before, after)| before != after)
            .chain(
                changes
                    .appended_slots()
                    .zip(&appended)
                    .map(|(slot, entry)| (slot, None, Some(entry.document()))),
            )
            .collect();
        let documents_changed = !document_changes.is_empty();
        let postings = self.index.plan(&document_changes);
        drop(document_changes);
        let universities = self.plan_universities(&changes);
        let university_slots = universities
            .as_ref()
            .map(|_| self.plan_university_slots(&changes));
        let mut orders = Vec::new();
        let mut provisional = 0;
        for column in SortColumn::ALL.into_iter().filter(|c| !c.is_text()) {
            if let Some(order) = self.plan_self_sorted(column, &changes) {
                orders.push((column.index(), order));
            }
        }
        let mut given: HashMap<usize, TextOrder> = delta
            .text_orders
            .into_iter()
            .map(|(column, order)| (column.index(), order))
            .collect();
        for column in SortColumn::ALL.into_iter().filter(|c| c.is_text()) {
            let given = given.remove(&column.index());
            if let Some((order, left_last)) = self.plan_text(column, given, &changes) {
                provisional += left_last;
                orders.push((column.index(), order));
            }
        }
        let ids = self.plan_ids(removed_ids, &changes);
        drop(changes);
        Plan {
            n_slots_before,
            replaced,
            appended,
            ids,
            n_live,
            universities,
            university_slots,
            orders,
            postings,
            documents_changed,
            provisional,
        }
    }

    /// Each university's slots after the change: one pass over the rows, off the lock.
    fn plan_university_slots(&self, changes: &Changes<'_>) -> HashMap<i32, MatchSet> {
        let changed: HashMap<u32, Option<i32>> = changes
            .existing()
            .map(|(slot, _, after)| (slot, after.and_then(|after| after.university_id)))
            .collect();
        let mut slots: HashMap<i32, Vec<u32>> = HashMap::new();
        for (slot, entry) in self.entries.live() {
            let university = changed.get(&slot).copied().unwrap_or(entry.university_id);
            if let Some(university) = university {
                slots.entry(university).or_default().push(slot);
            }
        }
        for (slot, entry) in changes.appended_slots().zip(changes.appended) {
            if let Some(university) = entry.university_id {
                slots.entry(university).or_default().push(slot);
            }
        }
        let n_slots = changes.n_slots();
        slots
            .into_iter()
            .map(|(university, slots)| (university, MatchSet::from_sorted(slots, n_slots)))
            .collect()
    }

    fn plan_universities(&self, changes: &Changes<'_>) -> Option<HashMap<i32, usize>> {
        let moved = !changes.appended.is_empty()
            || changes.existing().any(|(_, before, after)| {
                after.is_none_or(|after| after.university_id != before.university_id)
            });
        if !moved {
            return None;
        }
        let mut counts = self.universities.clone();
        for (_, before, after) in changes.existing() {
            if let Some(university) = before.university_id {
                if let Some(n) = counts.get_mut(&university) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(&university);
                    }
                }
            }
            if let Some(university) = after.and_then(|after| after.university_id) {
                *counts.entry(university).or_default() += 1;
            }
        }
        for university in changes.appended.iter().filter_map(|e| e.university_id) {
            *counts.entry(university).or_default() += 1;
        }
        Some(counts)
    }

    /// The next order of a column this model sorts itself, when the change moves it: only the
    /// rows whose value in it changed (and new ones) are re-placed.
    fn plan_self_sorted(&self, column: SortColumn, changes: &Changes<'_>) -> Option<Order> {
        // Out of the order: deleted rows, and rows whose value in this column changed.
        let mut out = SlotSet::new(changes.n_slots());
        let mut moving: Vec<u32> = changes.appended_slots().collect();
        let mut any_out = false;
        for (slot, before, after) in changes.existing() {
            let moves = after.is_none_or(|after| compare(column, before, after) != Ordering::Equal);
            if moves {
                out.insert(slot);
                any_out = true;
                if after.is_some() {
                    moving.push(slot);
                }
            }
        }
        if moving.is_empty() && !any_out {
            return None;
        }
        let old = &self.orders[column.index()];
        let entry = |slot: u32| changes.planned(slot).expect("a moving slot is live");
        Some(order::merged(
            old,
            &out,
            moving,
            |a, b| compare(column, entry(a), entry(b)),
            changes.n_slots(),
        ))
    }

    /// The next order of a text column, from what Postgres said (`given`), when the change
    /// moves it; with how many rows went last for want of a known place.
    fn plan_text(
        &self,
        column: SortColumn,
        given: Option<TextOrder>,
        changes: &Changes<'_>,
    ) -> Option<(Order, usize)> {
        let old = &self.orders[column.index()];
        let n_slots = changes.n_slots();
        match given {
            Some(TextOrder::Whole(ids)) => {
                let live = (0..n_slots as u32)
                    .filter_map(|slot| changes.planned(slot).map(|entry| (slot, entry.id)));
                Some((
                    order::from_ids(&ids, |id| changes.slot_of(id), live, n_slots),
                    0,
                ))
            }
            Some(TextOrder::Placed(placements)) => {
                let mut out = SlotSet::new(n_slots);
                let mut slots = Vec::with_capacity(placements.len());
                for (id, predecessor) in placements {
                    let Some(slot) = changes.slot_of(id) else {
                        continue;
                    };
                    // A predecessor the model will not hold leaves the row provisional.
                    let before = predecessor.map(|id| changes.slot_of(id).unwrap_or(u32::MAX));
                    out.insert(slot);
                    slots.push((slot, before));
                }
                for (slot, _, after) in changes.existing() {
                    if after.is_none() {
                        out.insert(slot);
                    }
                }
                Some(order::placed(
                    old,
                    &out,
                    &slots,
                    changes.appended_slots(),
                    n_slots,
                ))
            }
            None if changes.any_deleted || !changes.appended.is_empty() => {
                // Without word from Postgres: the known order of the rows left, and any new
                // row last until its place arrives.
                Some(order::placed(
                    old,
                    &changes.deleted,
                    &[],
                    changes.appended_slots(),
                    n_slots,
                ))
            }
            None => None,
        }
    }

    fn plan_ids(&self, removed: Vec<i32>, changes: &Changes<'_>) -> IdsPlan {
        let added: Vec<(i32, u32)> = changes.new_ids.iter().map(|(id, s)| (*id, *s)).collect();
        if self.by_id.capacity() - self.by_id.len() >= added.len() {
            return IdsPlan::Edit { removed, added };
        }
        // A quarter to spare, so that the next batches of inserts edit in place again.
        let n = self.by_id.len() + added.len();
        let mut ids = HashMap::with_capacity(n + n / 4 + 64);
        ids.extend(self.by_id.iter().map(|(id, slot)| (*id, *slot)));
        for id in &removed {
            ids.remove(id);
        }
        ids.extend(added);
        IdsPlan::Whole(ids)
    }

    /// Swaps a plan's pieces in. Only what was planned on this very model can be installed;
    /// the writer lock of `ReadModel` makes sure of that.
    pub(super) fn install(&mut self, plan: Plan) -> Replaced {
        assert_eq!(
            self.entries.len(),
            plan.n_slots_before,
            "a plan is installed on the model it was planned on"
        );
        let mut entries = Vec::with_capacity(plan.replaced.len());
        for (slot, next) in plan.replaced {
            entries.extend(self.entries.replace(slot, next));
        }
        for entry in plan.appended {
            self.entries.push(Some(entry));
        }
        let ids = match plan.ids {
            IdsPlan::Edit { removed, added } => {
                for id in removed {
                    self.by_id.remove(&id);
                }
                self.by_id.extend(added);
                None
            }
            IdsPlan::Whole(ids) => Some(std::mem::replace(&mut self.by_id, ids)),
        };
        self.n_live = plan.n_live;
        let universities = plan
            .universities
            .map(|counts| std::mem::replace(&mut self.universities, counts));
        let university_slots = plan
            .university_slots
            .map(|slots| std::mem::replace(&mut self.university_slots, slots));
        let orders = plan
            .orders
            .into_iter()
            .map(|(at, order)| std::mem::replace(&mut self.orders[at], order))
            .collect();
        let postings = self.index.install(plan.postings);
        if plan.documents_changed {
            self.cache.clear();
        }
        Replaced {
            _entries: entries,
            _orders: orders,
            _postings: postings,
            _ids: ids,
            _universities: universities,
            _university_slots: university_slots,
        }
    }

    /// Plans and installs at once (the model's own tests; `ReadModel::apply` splits them).
    #[cfg(test)]
    pub(super) fn apply(&mut self, delta: Delta) -> super::Applied {
        let plan = self.plan(delta);
        let applied = plan.applied();
        drop(self.install(plan));
        applied
    }

    /// See `ReadModel::text_moves`.
    pub(super) fn text_moves(&self, rows: &[LoadedRow]) -> Vec<(SortColumn, Vec<i32>)> {
        SortColumn::ALL
            .into_iter()
            .filter(|column| column.is_text())
            .filter_map(|column| {
                let ids: Vec<i32> = rows
                    .iter()
                    .filter(|row| match self.entry_of(row.record.id) {
                        None => true,
                        Some(entry) => {
                            entry.text(text_field(column)) != record_text(column, &row.record)
                        }
                    })
                    .map(|row| row.record.id)
                    .collect();
                (!ids.is_empty()).then_some((column, ids))
            })
            .collect()
    }

    /// See `ReadModel::text_order_digests`.
    pub(super) fn text_order_digests(&self) -> Vec<(SortColumn, String)> {
        SortColumn::ALL
            .into_iter()
            .filter(|column| column.is_text())
            .map(|column| {
                let mut digest = Md5::new();
                let mut first = true;
                for entry in self.orders[column.index()]
                    .slots
                    .iter()
                    .filter_map(|slot| self.entry(*slot))
                {
                    if !std::mem::take(&mut first) {
                        digest.update(b",");
                    }
                    digest.update(entry.id.to_string().as_bytes());
                }
                (column, format!("{:x}", digest.finalize()))
            })
            .collect()
    }

    /// See `ReadModel::drift_text_order`.
    pub(super) fn drift_text_order(&mut self, column: SortColumn) {
        let order = &self.orders[column.index()];
        let slots: Vec<u32> = order.slots.iter().rev().copied().collect();
        self.orders[column.index()] = Order::from_slots(slots, self.entries.len());
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;
