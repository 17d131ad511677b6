//! The api's in-memory read model of `chats`, with each chat's sync state: what `GET /chats/all`
//! and `GET /chats/{id}` are served from, so that a page costs no SQL and reads go on while
//! Postgres is down.
//!
//! The model is loaded from one Postgres snapshot at start-up and kept current by `sync`
//! (notifications of changed ids, and a periodic reconciliation of row versions). Its answers
//! are Postgres' own:
//! - every whitelisted sort is a precomputed order of `order by <column>, id`. Text columns take
//!   their order from Postgres itself (under the database's collation); numbers and timestamps
//!   are sorted here, NULLs last, which is how Postgres orders them. Descending is the same
//!   order walked backwards, which is `order by <column> desc, id desc`.
//! - search words are matched against documents lowered by Postgres (see `search`).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;

pub mod postgres;
pub mod search;
pub mod sync;

pub use postgres::ChatRecord;
use postgres::{LoadedRow, RowVersion};
use search::{intersect, Lowercase, MatchCache, TrigramIndex};

use crate::read_path::query::{ListQuery, SortColumn, SortOrder};
use crate::scope::Scope;

/// The read model as handlers see it: empty until the first load, then always answering.
#[derive(Default)]
pub struct ReadModel {
    model: RwLock<Option<Model>>,
    /// Unix ms of the last moment the model was known to match Postgres; 0 before the first load.
    synced_at_ms: AtomicI64,
}

/// A page chosen from the model: the chats in order, and how many match in all.
#[derive(Debug)]
pub struct Selection {
    pub chats: Vec<ChatRecord>,
    pub total: usize,
}

impl ReadModel {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether the first load has finished.
    pub fn is_loaded(&self) -> bool {
        self.synced_at_ms.load(AtomicOrdering::Relaxed) > 0
    }

    /// How long ago the model was last known to match Postgres; `None` before the first load.
    pub fn age(&self) -> Option<Duration> {
        let at = self.synced_at_ms.load(AtomicOrdering::Relaxed);
        (at > 0).then(|| {
            Duration::from_millis(u64::try_from(Utc::now().timestamp_millis() - at).unwrap_or(0))
        })
    }

    /// Records that the model matches Postgres as of now.
    fn mark_synced(&self) {
        self.synced_at_ms.store(
            Utc::now().timestamp_millis().max(1),
            AtomicOrdering::Relaxed,
        );
    }

    /// The number of chats held; 0 before the first load.
    pub fn n_chats(&self) -> usize {
        self.read(|model| model.n_live).unwrap_or(0)
    }

    fn read<T>(&self, f: impl FnOnce(&Model) -> T) -> Option<T> {
        let guard = self.model.read().expect("read model lock");
        guard.as_ref().map(f)
    }

    /// A page of chats in `scope`; `None` before the first load.
    pub fn page(&self, scope: Scope, query: &ListQuery) -> Option<Selection> {
        self.read(|model| model.page(scope, query))
    }

    /// One chat if it exists and lies in `scope`; `None` inside when it does not, `None`
    /// outside before the first load.
    pub fn get(&self, scope: Scope, id: i32) -> Option<Option<ChatRecord>> {
        self.read(|model| {
            model
                .entry_of(id)
                .filter(|entry| scope.admits(entry.record.university_id))
                .map(|entry| entry.record.clone())
        })
    }

    /// Replaces the whole model (a full load).
    pub fn replace(&self, model: Model) {
        *self.model.write().expect("read model lock") = Some(model);
        self.mark_synced();
    }

    /// The text columns whose order changes if `rows` are applied (a new row changes all).
    pub fn text_columns_changed_by(&self, rows: &[LoadedRow]) -> Vec<SortColumn> {
        self.read(|model| model.text_columns_changed_by(rows))
            .unwrap_or_default()
    }

    /// Applies a set of changed rows; `None` when there is no model to apply them to.
    pub fn apply(&self, delta: Delta) -> Option<()> {
        let mut guard = self.model.write().expect("read model lock");
        guard.as_mut()?.apply(delta);
        Some(())
    }

    /// Every chat's version, for reconciliation.
    pub fn versions(&self) -> HashMap<i32, RowVersion> {
        self.read(|model| {
            model
                .entries
                .iter()
                .flatten()
                .map(|entry| (entry.record.id, entry.version))
                .collect()
        })
        .unwrap_or_default()
    }
}

struct Entry {
    record: ChatRecord,
    /// The lowered search text (see `postgres::LOWERED_DOCUMENT`).
    document: Box<str>,
    version: RowVersion,
}

/// One sort column's order: live slots by `(column, id)` ascending, and each slot's place in it.
#[derive(Default)]
struct Order {
    slots: Vec<u32>,
    /// `position[slot]`: where the slot stands in `slots` (`u32::MAX` for a dead slot).
    position: Vec<u32>,
}

impl Order {
    fn reindex(&mut self, n_slots: usize) {
        self.position.clear();
        self.position.resize(n_slots, u32::MAX);
        for (at, slot) in self.slots.iter().enumerate() {
            self.position[*slot as usize] = at as u32;
        }
    }
}

/// Rows changed in Postgres, loaded from one snapshot.
#[derive(Debug, Default)]
pub struct Delta {
    /// Rows that exist (new or changed).
    pub rows: Vec<LoadedRow>,
    /// Ids that were asked for and no longer exist.
    pub deleted: Vec<i32>,
    /// Fresh orders of the text columns the rows change, from the same snapshot.
    pub text_orders: Vec<(SortColumn, Vec<i32>)>,
}

/// Orders NULLs after every value, as Postgres does in ascending order.
fn nulls_last<T: Ord>(a: &Option<T>, b: &Option<T>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// `(column, id)` order of the columns this model sorts itself (not text: see module docs).
fn compare(column: SortColumn, a: &ChatRecord, b: &ChatRecord) -> Ordering {
    let by_column = match column {
        SortColumn::Id => Ordering::Equal,
        SortColumn::ParticipantsCount => nulls_last(&a.participants_count, &b.participants_count),
        SortColumn::CreatedAt => nulls_last(&a.created_at, &b.created_at),
        SortColumn::UpdatedAt => nulls_last(&a.updated_at, &b.updated_at),
        text => unreachable!("{text:?} is ordered by Postgres"),
    };
    by_column.then(a.id.cmp(&b.id))
}

fn text_of(column: SortColumn, record: &ChatRecord) -> Option<&str> {
    match column {
        SortColumn::Name => Some(&record.name),
        SortColumn::Url => Some(&record.url),
        SortColumn::MaxChatId => record.max_chat_id.as_deref(),
        SortColumn::Department => record.department.as_deref(),
        SortColumn::Source => Some(&record.source),
        other => unreachable!("{other:?} is not a text column"),
    }
}

/// The model itself: rows in slots, an order per sort column, and the search index.
pub struct Model {
    entries: Vec<Option<Entry>>,
    by_id: HashMap<i32, u32>,
    n_live: usize,
    /// Chats per `university_id`, for the total of a scoped page without search.
    universities: HashMap<i32, usize>,
    orders: Vec<Order>,
    index: TrigramIndex,
    cache: MatchCache,
    lowercase: Lowercase,
}

impl Model {
    /// Builds a model from a full load: every row, and the order of each text column.
    pub fn build(
        rows: Vec<LoadedRow>,
        text_orders: Vec<(SortColumn, Vec<i32>)>,
        lowercase: Lowercase,
    ) -> Self {
        let mut model = Model {
            entries: Vec::with_capacity(rows.len()),
            by_id: HashMap::with_capacity(rows.len()),
            n_live: 0,
            universities: HashMap::new(),
            orders: SortColumn::ALL.iter().map(|_| Order::default()).collect(),
            index: TrigramIndex::default(),
            cache: MatchCache::default(),
            lowercase,
        };
        for row in rows {
            let slot = model.entries.len() as u32;
            model.by_id.insert(row.record.id, slot);
            model.entries.push(Some(Entry {
                record: row.record,
                document: row.document.into_boxed_str(),
                version: row.version,
            }));
        }
        model.n_live = model.by_id.len();
        let entries = &model.entries;
        model.index = TrigramIndex::build(
            entries
                .iter()
                .enumerate()
                .filter_map(|(slot, entry)| entry.as_ref().map(|e| (slot as u32, &*e.document))),
            model.n_live,
        );
        for column in SortColumn::ALL {
            if !column.is_text() {
                model.sort_column(column);
            }
        }
        for (column, ids) in text_orders {
            model.set_text_order(column, &ids);
        }
        model.count_universities();
        model
    }

    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.entries.get(slot as usize).and_then(Option::as_ref)
    }

    fn entry_of(&self, id: i32) -> Option<&Entry> {
        self.by_id.get(&id).and_then(|slot| self.entry(*slot))
    }

    fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.is_some())
            .map(|(slot, _)| slot as u32)
    }

    fn count_universities(&mut self) {
        let mut counts = HashMap::new();
        for entry in self.entries.iter().flatten() {
            if let Some(university) = entry.record.university_id {
                *counts.entry(university).or_default() += 1;
            }
        }
        self.universities = counts;
    }

    /// Sorts a column this model orders itself, from scratch.
    fn sort_column(&mut self, column: SortColumn) {
        let mut slots: Vec<u32> = self.live_slots().collect();
        let entries = &self.entries;
        let record = |slot: &u32| &entries[*slot as usize].as_ref().expect("live slot").record;
        slots.sort_unstable_by(|a, b| compare(column, record(a), record(b)));
        let order = &mut self.orders[column.index()];
        order.slots = slots;
        order.reindex(self.entries.len());
    }

    /// Sets a text column's order from Postgres' ids. Ids the model does not hold are skipped;
    /// live slots Postgres did not name (a row inserted after that snapshot, whose notification
    /// is on its way) go last until the next order arrives.
    fn set_text_order(&mut self, column: SortColumn, ids: &[i32]) {
        let mut seen = vec![false; self.entries.len()];
        let mut slots = Vec::with_capacity(self.n_live);
        for id in ids {
            if let Some(&slot) = self.by_id.get(id) {
                if !std::mem::replace(&mut seen[slot as usize], true) {
                    slots.push(slot);
                }
            }
        }
        let mut missing: Vec<u32> = self
            .live_slots()
            .filter(|slot| !seen[*slot as usize])
            .collect();
        missing.sort_unstable_by_key(|slot| {
            self.entries[*slot as usize].as_ref().map(|e| e.record.id)
        });
        slots.extend(missing);
        let order = &mut self.orders[column.index()];
        order.slots = slots;
        order.reindex(self.entries.len());
    }

    fn text_columns_changed_by(&self, rows: &[LoadedRow]) -> Vec<SortColumn> {
        SortColumn::ALL
            .into_iter()
            .filter(|column| column.is_text())
            .filter(|column| {
                rows.iter().any(|row| match self.entry_of(row.record.id) {
                    None => true,
                    Some(entry) => text_of(*column, &entry.record) != text_of(*column, &row.record),
                })
            })
            .collect()
    }

    fn apply(&mut self, delta: Delta) {
        let mut touched: Vec<u32> = Vec::new();
        let mut removed_any = false;
        let mut documents_changed = false;
        for id in delta.deleted {
            if let Some(slot) = self.by_id.remove(&id) {
                if let Some(entry) = self.entries[slot as usize].take() {
                    self.index.remove(slot, &entry.document);
                    self.n_live -= 1;
                    removed_any = true;
                    documents_changed = true;
                    touched.push(slot);
                }
            }
        }
        for row in delta.rows {
            let document = row.document.into_boxed_str();
            match self.by_id.get(&row.record.id).copied() {
                Some(slot) => {
                    let entry = self.entries[slot as usize]
                        .as_mut()
                        .expect("an id maps to a live slot");
                    if entry.document != document {
                        self.index.remove(slot, &entry.document);
                        self.index.insert(slot, &document);
                        documents_changed = true;
                    }
                    *entry = Entry {
                        record: row.record,
                        document,
                        version: row.version,
                    };
                    touched.push(slot);
                }
                None => {
                    let slot = self.entries.len() as u32;
                    self.by_id.insert(row.record.id, slot);
                    self.index.insert(slot, &document);
                    self.entries.push(Some(Entry {
                        record: row.record,
                        document,
                        version: row.version,
                    }));
                    self.n_live += 1;
                    documents_changed = true;
                    touched.push(slot);
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        touched.sort_unstable();
        touched.dedup();
        for column in SortColumn::ALL {
            if !column.is_text() {
                self.merge_into_order(column, &touched);
            }
        }
        let mut refreshed = vec![false; SortColumn::ALL.len()];
        for (column, ids) in &delta.text_orders {
            self.set_text_order(*column, ids);
            refreshed[column.index()] = true;
        }
        for column in SortColumn::ALL {
            let stale = self.orders[column.index()].position.len() != self.entries.len();
            if column.is_text() && !refreshed[column.index()] && (removed_any || stale) {
                // Without a fresh order from Postgres: keep the known order of the live rows,
                // and put any new one last until its order arrives.
                let known: Vec<i32> = self.orders[column.index()]
                    .slots
                    .iter()
                    .filter_map(|slot| self.entry(*slot).map(|entry| entry.record.id))
                    .collect();
                self.set_text_order(column, &known);
            }
        }
        self.count_universities();
        if documents_changed {
            self.cache.clear();
        }
    }

    /// Re-places `touched` slots in a self-sorted column: out of the order, sorted among
    /// themselves, and merged back in, so a small change costs one pass, not a sort.
    fn merge_into_order(&mut self, column: SortColumn, touched: &[u32]) {
        let entries = &self.entries;
        let record = |slot: u32| &entries[slot as usize].as_ref().expect("live slot").record;
        let order = &mut self.orders[column.index()];
        let kept: Vec<u32> = order
            .slots
            .iter()
            .copied()
            .filter(|slot| touched.binary_search(slot).is_err())
            .collect();
        let mut moved: Vec<u32> = touched
            .iter()
            .copied()
            .filter(|slot| entries[*slot as usize].is_some())
            .collect();
        moved.sort_unstable_by(|a, b| compare(column, record(*a), record(*b)));
        let mut merged = Vec::with_capacity(kept.len() + moved.len());
        let (mut i, mut j) = (0, 0);
        while i < kept.len() && j < moved.len() {
            if compare(column, record(kept[i]), record(moved[j])) == Ordering::Less {
                merged.push(kept[i]);
                i += 1;
            } else {
                merged.push(moved[j]);
                j += 1;
            }
        }
        merged.extend_from_slice(&kept[i..]);
        merged.extend_from_slice(&moved[j..]);
        order.slots = merged;
        order.reindex(entries.len());
    }

    /// The slots (ascending) whose document contains `word`, from the cache when it is there.
    fn matches(&self, word: &str) -> Arc<Vec<u32>> {
        let lowered = self.lowercase.lower(word);
        if let Some(found) = self.cache.get(&lowered) {
            return found;
        }
        let found = Arc::new(search::matching(
            &self.index,
            &lowered,
            |slot| self.entry(slot).map(|entry| &*entry.document),
            self.live_slots(),
        ));
        self.cache.put(lowered, found.clone());
        found
    }

    fn page(&self, scope: Scope, query: &ListQuery) -> Selection {
        if scope == Scope::Nothing {
            return Selection {
                chats: Vec::new(),
                total: 0,
            };
        }
        let order = &self.orders[query.sort.index()];
        let descending = query.order == SortOrder::Desc;
        let offset = usize::try_from(query.offset).unwrap_or(usize::MAX);
        let limit = usize::try_from(query.limit).unwrap_or(0);
        let admitted = |slot: &u32| {
            self.entry(*slot)
                .is_some_and(|entry| scope.admits(entry.record.university_id))
        };
        let (slots, total): (Vec<u32>, usize) = if query.words.is_empty() {
            let total = match scope {
                Scope::University(university) => {
                    self.universities.get(&university).copied().unwrap_or(0)
                }
                _ => self.n_live,
            };
            let walk: Box<dyn Iterator<Item = &u32>> = if descending {
                Box::new(order.slots.iter().rev())
            } else {
                Box::new(order.slots.iter())
            };
            let slots = if scope == Scope::All {
                walk.skip(offset).take(limit).copied().collect()
            } else {
                walk.filter(|slot| admitted(slot))
                    .skip(offset)
                    .take(limit)
                    .copied()
                    .collect()
            };
            (slots, total)
        } else {
            let mut matched: Option<Vec<u32>> = None;
            for word in &query.words {
                let found = self.matches(word);
                matched = Some(match matched {
                    None => found.as_ref().clone(),
                    Some(so_far) => intersect(&so_far, &found),
                });
            }
            let mut matched = matched.unwrap_or_default();
            if scope != Scope::All {
                matched.retain(|slot| admitted(slot));
            }
            let total = matched.len();
            (
                self.select(order, matched, descending, offset, limit),
                total,
            )
        };
        Selection {
            chats: slots
                .into_iter()
                .filter_map(|slot| self.entry(slot).map(|entry| entry.record.clone()))
                .collect(),
            total,
        }
    }

    /// Rows `offset..offset + limit` of `matched` in `order`: by walking the order when the
    /// matches are dense enough for that to be short, else by selecting on their positions.
    fn select(
        &self,
        order: &Order,
        matched: Vec<u32>,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> Vec<u32> {
        let end = offset.saturating_add(limit).min(matched.len());
        if offset >= end {
            return Vec::new();
        }
        let expected_walk = end.saturating_mul(self.n_live) / matched.len().max(1);
        if expected_walk < matched.len() {
            let mut member = vec![false; self.entries.len()];
            for slot in &matched {
                member[*slot as usize] = true;
            }
            let walk: Box<dyn Iterator<Item = &u32>> = if descending {
                Box::new(order.slots.iter().rev())
            } else {
                Box::new(order.slots.iter())
            };
            return walk
                .filter(|slot| member[**slot as usize])
                .skip(offset)
                .take(end - offset)
                .copied()
                .collect();
        }
        let mut keyed: Vec<(u32, u32)> = matched
            .into_iter()
            .map(|slot| {
                let at = order.position[slot as usize];
                (if descending { u32::MAX - at } else { at }, slot)
            })
            .collect();
        if end < keyed.len() {
            keyed.select_nth_unstable(end - 1);
            keyed.truncate(end);
        }
        keyed.sort_unstable();
        keyed[offset..end].iter().map(|(_, slot)| *slot).collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn row(id: i32, name: &str, count: Option<i32>, university_id: Option<i32>) -> LoadedRow {
        LoadedRow {
            record: ChatRecord {
                id,
                name: name.to_owned(),
                url: format!("https://max.ru/{id}"),
                max_chat_id: Some(format!("-{id}")),
                external_chat_id: None,
                participants_count: count,
                university_id,
                department: None,
                source: "admin_panel".to_owned(),
                created_at: Some(Utc.timestamp_opt(1_700_000_000 + i64::from(id), 0).unwrap()),
                updated_at: None,
                participants_updated_at: None,
                sync_status: None,
            },
            document: format!("{} -{id} admin_panel", name.to_lowercase()),
            version: RowVersion {
                chat_version: 1,
                sync_version: None,
            },
        }
    }

    fn query(sort: SortColumn, order: SortOrder, words: &[&str]) -> ListQuery {
        ListQuery {
            limit: 50,
            offset: 0,
            sort,
            order,
            words: words.iter().map(|w| (*w).to_owned()).collect(),
        }
    }

    fn ids(selection: &Selection) -> Vec<i32> {
        selection.chats.iter().map(|chat| chat.id).collect()
    }

    fn model() -> Model {
        let rows = vec![
            row(1, "b", Some(5), Some(1)),
            row(2, "a", None, Some(2)),
            row(3, "c", Some(5), Some(1)),
            row(4, "a", Some(1), None),
        ];
        // As Postgres would order names: a(2), a(4), b(1), c(3).
        let names = vec![2, 4, 1, 3];
        let mut model = Model::build(rows, vec![(SortColumn::Name, names)], Lowercase::default());
        for column in [
            SortColumn::Url,
            SortColumn::MaxChatId,
            SortColumn::Department,
            SortColumn::Source,
        ] {
            model.set_text_order(column, &[1, 2, 3, 4]);
        }
        model
    }

    #[test]
    fn numbers_sort_with_nulls_last_and_ids_breaking_ties() {
        let model = model();
        let asc = model.page(
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&asc), vec![4, 1, 3, 2]);
        let desc = model.page(
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Desc, &[]),
        );
        assert_eq!(ids(&desc), vec![2, 3, 1, 4]);
        assert_eq!(asc.total, 4);
    }

    #[test]
    fn text_sorts_follow_the_order_postgres_gave() {
        let model = model();
        let page = model.page(Scope::All, &query(SortColumn::Name, SortOrder::Asc, &[]));
        assert_eq!(ids(&page), vec![2, 4, 1, 3]);
        let scoped = model.page(
            Scope::University(1),
            &query(SortColumn::Name, SortOrder::Desc, &[]),
        );
        assert_eq!((ids(&scoped), scoped.total), (vec![3, 1], 2));
    }

    #[test]
    fn a_delta_moves_changed_rows_and_drops_deleted_ones() {
        let mut model = model();
        model.apply(Delta {
            rows: vec![row(1, "b", Some(0), Some(1)), row(5, "d", Some(3), Some(1))],
            deleted: vec![3],
            text_orders: vec![(SortColumn::Name, vec![2, 4, 1, 5])],
        });
        let by_count = model.page(
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&by_count), vec![1, 4, 5, 2]);
        let by_name = model.page(
            Scope::University(1),
            &query(SortColumn::Name, SortOrder::Asc, &[]),
        );
        assert_eq!((ids(&by_name), by_name.total), (vec![1, 5], 2));
        let by_url = model.page(Scope::All, &query(SortColumn::Url, SortOrder::Asc, &[]));
        assert_eq!(ids(&by_url), vec![1, 2, 4, 5]);
    }

    #[test]
    fn search_pages_are_sorted_and_counted() {
        let model = model();
        let mut q = query(SortColumn::Name, SortOrder::Asc, &["admin_panel"]);
        q.limit = 2;
        q.offset = 1;
        let page = model.page(Scope::All, &q);
        assert_eq!((ids(&page), page.total), (vec![4, 1], 4));
        let two_words = model.page(
            Scope::All,
            &query(SortColumn::Id, SortOrder::Desc, &["a", "-4"]),
        );
        assert_eq!(ids(&two_words), vec![4]);
    }
}
