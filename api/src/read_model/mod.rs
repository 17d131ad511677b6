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
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};

mod admins;
mod change;
mod order;
pub mod postgres;
mod postings;
pub mod query;
pub mod search;
mod slots;
pub mod sync;

use admins::Admins;
pub use change::{Applied, Delta, TextOrder};
use order::Order;
pub use postgres::ChatRecord;
use postgres::{LoadedRow, RowVersion};
pub use search::BudgetSpent;
use search::{Lowercase, MatchCache, MatchSet, ScanBudget, TrigramIndex};
use slots::Slots;

use crate::scope::Scope;
use query::{ListQuery, SortColumn, SortOrder};

/// The read model as handlers see it: empty until the first load, then always answering.
///
/// Reads never wait on a change: a change set is planned under the read lock (readers go on)
/// and installed under the write lock by swapping the pieces it replaces, which are freed
/// after the lock is released. The lock cannot be poisoned: a panic while planning leaves the
/// model as it was, and every later read answers.
#[derive(Default)]
pub struct ReadModel {
    model: RwLock<Option<Model>>,
    /// Held by the one writer from planning to installing, so that no other change lands
    /// between them (a plan names slots by the model it was planned on).
    writer: Mutex<()>,
    /// Unix ms of the last moment the model was known to match Postgres; 0 before the first load.
    synced_at_ms: AtomicI64,
    /// Run while a change set is being planned, for tests that prove reads go on meanwhile.
    planning_hook: Mutex<Option<PlanningHook>>,
    /// Becomes true once, when the first load has finished: what reads before it wait for.
    loaded: tokio::sync::watch::Sender<bool>,
}

/// See `ReadModel::set_planning_hook`.
pub type PlanningHook = Arc<dyn Fn() + Send + Sync>;

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

    /// Waits for the first load to finish, at most `limit`; whether it has.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let mut loaded = self.loaded.subscribe();
        let finished = tokio::time::timeout(limit, loaded.wait_for(|loaded| *loaded)).await;
        matches!(finished, Ok(Ok(_)))
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
        self.loaded
            .send_if_modified(|loaded| !std::mem::replace(loaded, true));
    }

    /// What the model holds, for the load's log line: chats, bytes of text (administrators'
    /// included), trigram postings.
    pub fn footprint(&self) -> Option<(usize, usize, usize)> {
        self.read(|model| {
            let text: usize = model
                .entries
                .iter()
                .flatten()
                .map(|e| e.texts.len() + e.admins.size())
                .sum();
            (model.n_live, text, model.index.size().0)
        })
    }

    /// The number of chats held; 0 before the first load.
    pub fn n_chats(&self) -> usize {
        self.read(|model| model.n_live).unwrap_or(0)
    }

    fn read<T>(&self, f: impl FnOnce(&Model) -> T) -> Option<T> {
        let guard = self.model.read();
        guard.as_ref().map(f)
    }

    /// A page of chats in `scope`, comparing at most `scan_budget` bytes of documents with the
    /// search words; `None` before the first load.
    pub fn page(
        &self,
        scope: Scope,
        query: &ListQuery,
        scan_budget: usize,
    ) -> Option<Result<Selection, BudgetSpent>> {
        self.read(|model| model.page(scope, query, &ScanBudget::new(scan_budget)))
    }

    /// At most how many documents a search of `words` in `scope` compares (0 when every word's
    /// matches are cached); `None` before the first load. Cheap: no document is read.
    pub fn search_work(&self, scope: Scope, words: &[String]) -> Option<usize> {
        self.read(|model| model.search_work(scope, words))
    }

    /// One chat if it exists and lies in `scope`; `None` inside when it does not, `None`
    /// outside before the first load.
    pub fn get(&self, scope: Scope, id: i32) -> Option<Option<ChatRecord>> {
        self.read(|model| {
            model
                .entry_of(id)
                .filter(|entry| scope.admits(entry.university_id))
                .map(Entry::record)
        })
    }

    /// Replaces the whole model (a full load). The old one is freed after the lock is
    /// released, and off the async workers when there are some (freeing a million rows takes
    /// a while).
    pub fn replace(&self, model: Model) {
        let old = {
            let _writer = self.writer.lock();
            self.model.write().replace(model)
        };
        self.mark_synced();
        free_off_the_workers(old);
    }

    /// For each text column, the ids among `rows` whose place in its order may change: new
    /// rows, and rows whose text in that column changed. Columns without any are left out.
    pub fn text_moves(&self, rows: &[LoadedRow]) -> Vec<(SortColumn, Vec<i32>)> {
        self.read(|model| model.text_moves(rows))
            .unwrap_or_default()
    }

    /// Whether the model holds every one of `anchors` (id, `chat_version`) at that version:
    /// rows placed after them then land where Postgres has them.
    pub fn holds_current(&self, anchors: &[(i32, i64)]) -> bool {
        self.read(|model| {
            anchors.iter().all(|(id, version)| {
                model
                    .entry_of(*id)
                    .is_some_and(|entry| entry.version.chat_version == *version)
            })
        })
        .unwrap_or(false)
    }

    /// Applies a set of changed rows: planned while reads go on, then swapped in. Blocking and
    /// CPU-heavy for a large set: call it from `spawn_blocking`. `None` when there is no model
    /// to apply them to. A panic while planning leaves the model as it was.
    pub fn apply(&self, delta: Delta) -> Option<Applied> {
        let _writer = self.writer.lock();
        let hook = self.planning_hook.lock().clone();
        let plan = {
            let guard = self.model.read();
            let model = guard.as_ref()?;
            if let Some(hook) = hook {
                hook();
            }
            model.plan(delta)
        };
        let applied = plan.applied();
        let replaced = self.model.write().as_mut()?.install(plan);
        drop(replaced);
        Some(applied)
    }

    /// Each text column's order as the MD5 of its ids joined by commas, as
    /// `postgres::text_order_digests` computes Postgres' own.
    pub fn text_order_digests(&self) -> Vec<(SortColumn, String)> {
        self.read(Model::text_order_digests).unwrap_or_default()
    }

    /// Runs `hook` (when `Some`) while each later change set is planned, under the read lock.
    /// Tests use it to hold a plan and prove that reads answer meanwhile, or to panic in one.
    #[doc(hidden)]
    pub fn set_planning_hook(&self, hook: Option<PlanningHook>) {
        *self.planning_hook.lock() = hook;
    }

    /// Puts a text column's order out of step with Postgres (reversed), as a lost race would;
    /// for tests of the repair.
    #[doc(hidden)]
    pub fn drift_text_order(&self, column: SortColumn) {
        let _writer = self.writer.lock();
        if let Some(model) = self.model.write().as_mut() {
            model.drift_text_order(column);
        }
    }

    /// Every chat's id and version, in id order, for reconciliation.
    pub fn versions(&self) -> Vec<(i32, RowVersion)> {
        let mut versions = self
            .read(|model| {
                model
                    .entries
                    .iter()
                    .flatten()
                    .map(|entry| (entry.id, entry.version))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        versions.sort_unstable_by_key(|(id, _)| *id);
        versions
    }
}

/// Frees `value` on the blocking pool when called on a runtime (a whole model takes long to
/// free, and the async workers serve the reads), else right here.
fn free_off_the_workers<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}

/// The text fields of a stored chat, in the order they sit in its one buffer.
#[derive(Clone, Copy)]
enum Text {
    Name,
    Url,
    MaxChatId,
    ExternalChatId,
    Department,
    Source,
    SyncStatus,
    /// The lowered search text (see `postgres::LOWERED_DOCUMENT`).
    Document,
}

const N_TEXTS: usize = 8;

/// A microsecond timestamp, or none: what Postgres' `timestamptz` holds, in 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Micros(i64);

impl Micros {
    const NONE: Micros = Micros(i64::MAX);

    fn from(at: Option<DateTime<Utc>>) -> Self {
        at.map_or(Self::NONE, |at| Micros(at.timestamp_micros()))
    }

    fn get(self) -> Option<DateTime<Utc>> {
        (self != Self::NONE)
            .then(|| DateTime::from_timestamp_micros(self.0))
            .flatten()
    }
}

/// One chat as the model keeps it: numbers inline and every text in a single allocation, about
/// a third of what a `ChatRecord` with its eight strings costs.
struct Entry {
    id: i32,
    participants_count: Option<i32>,
    university_id: Option<i32>,
    created_at: Micros,
    updated_at: Micros,
    participants_updated_at: Micros,
    version: RowVersion,
    texts: Box<str>,
    /// Where each text ends in `texts`.
    ends: [u32; N_TEXTS],
    /// Bit `i` is set when text `i` is NULL rather than empty.
    nulls: u8,
    /// Its rows of `administrators`, in the order they are shown.
    admins: Admins,
}

impl Entry {
    fn new(row: LoadedRow) -> Self {
        let LoadedRow {
            record,
            document,
            version,
        } = row;
        let texts: [Option<&str>; N_TEXTS] = [
            Some(&record.name),
            Some(&record.url),
            record.max_chat_id.as_deref(),
            record.external_chat_id.as_deref(),
            record.department.as_deref(),
            Some(&record.source),
            record.sync_status.as_deref(),
            Some(&document),
        ];
        let mut buffer = String::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        let mut ends = [0u32; N_TEXTS];
        let mut nulls = 0u8;
        for (i, text) in texts.iter().enumerate() {
            match text {
                Some(text) => buffer.push_str(text),
                None => nulls |= 1 << i,
            }
            ends[i] = u32::try_from(buffer.len()).expect("a chat's texts fit in 4 GiB");
        }
        Entry {
            id: record.id,
            participants_count: record.participants_count,
            university_id: record.university_id,
            created_at: Micros::from(record.created_at),
            updated_at: Micros::from(record.updated_at),
            participants_updated_at: Micros::from(record.participants_updated_at),
            version,
            texts: buffer.into_boxed_str(),
            ends,
            nulls,
            admins: Admins::pack(&record.administrators),
        }
    }

    fn text(&self, which: Text) -> Option<&str> {
        let i = which as usize;
        if self.nulls & (1 << i) != 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.texts[start..self.ends[i] as usize])
    }

    fn owned(&self, which: Text) -> Option<String> {
        self.text(which).map(str::to_owned)
    }

    fn document(&self) -> &str {
        self.text(Text::Document).unwrap_or_default()
    }

    fn record(&self) -> ChatRecord {
        ChatRecord {
            id: self.id,
            name: self.owned(Text::Name).unwrap_or_default(),
            url: self.owned(Text::Url).unwrap_or_default(),
            max_chat_id: self.owned(Text::MaxChatId),
            external_chat_id: self.owned(Text::ExternalChatId),
            participants_count: self.participants_count,
            university_id: self.university_id,
            department: self.owned(Text::Department),
            source: self.owned(Text::Source).unwrap_or_default(),
            created_at: self.created_at.get(),
            updated_at: self.updated_at.get(),
            participants_updated_at: self.participants_updated_at.get(),
            sync_status: self.owned(Text::SyncStatus),
            administrators: self.admins.unpack(),
        }
    }
}

/// Rows of a full load, compacted as they stream in, into the very slots the model then keeps:
/// the load never holds the rows twice, nor a doubled vector's spare half.
#[derive(Default)]
pub struct LoadBuffer {
    entries: Slots<Entry>,
}

impl LoadBuffer {
    /// A buffer for `n` rows (a count taken in the load's snapshot).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            entries: Slots::with_capacity(n),
        }
    }

    pub fn push(&mut self, row: LoadedRow) {
        self.entries.push(Some(Entry::new(row)));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
/// `Micros::NONE` is the largest value, so NULL timestamps sort last, as in Postgres.
fn compare(column: SortColumn, a: &Entry, b: &Entry) -> Ordering {
    let by_column = match column {
        SortColumn::Id => Ordering::Equal,
        SortColumn::ParticipantsCount => nulls_last(&a.participants_count, &b.participants_count),
        SortColumn::CreatedAt => a.created_at.cmp(&b.created_at),
        SortColumn::UpdatedAt => a.updated_at.cmp(&b.updated_at),
        text => unreachable!("{text:?} is ordered by Postgres"),
    };
    by_column.then(a.id.cmp(&b.id))
}

fn text_field(column: SortColumn) -> Text {
    match column {
        SortColumn::Name => Text::Name,
        SortColumn::Url => Text::Url,
        SortColumn::MaxChatId => Text::MaxChatId,
        SortColumn::Department => Text::Department,
        SortColumn::Source => Text::Source,
        other => unreachable!("{other:?} is not a text column"),
    }
}

fn record_text(column: SortColumn, record: &ChatRecord) -> Option<&str> {
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
    entries: Slots<Entry>,
    by_id: HashMap<i32, u32>,
    n_live: usize,
    /// Chats per `university_id`, for the total of a scoped page without search.
    universities: HashMap<i32, usize>,
    /// Each university's slots: a curator's search compares only these documents, and a
    /// curator's page selects among them instead of walking the whole order.
    university_slots: HashMap<i32, MatchSet>,
    orders: Vec<Order>,
    index: TrigramIndex,
    cache: MatchCache,
    lowercase: Lowercase,
}

impl Model {
    /// Builds a model from a full load: every row, and the order of each text column.
    pub fn build(
        rows: LoadBuffer,
        text_orders: Vec<(SortColumn, Vec<i32>)>,
        lowercase: Lowercase,
    ) -> Self {
        let n = rows.entries.len();
        let mut model = Model {
            entries: rows.entries,
            by_id: HashMap::with_capacity(n),
            n_live: 0,
            universities: HashMap::new(),
            university_slots: HashMap::new(),
            orders: SortColumn::ALL.iter().map(|_| Order::default()).collect(),
            index: TrigramIndex::default(),
            cache: MatchCache::default(),
            lowercase,
        };
        for (slot, entry) in model.entries.live() {
            // Ids are the primary key, so each arrives once.
            model.by_id.insert(entry.id, slot);
        }
        model.n_live = model.by_id.len();
        model.index = TrigramIndex::build(
            model
                .entries
                .live()
                .map(|(slot, entry)| (slot, entry.document())),
            model.n_live,
        );
        for column in SortColumn::ALL {
            if !column.is_text() {
                model.sort_column(column);
            }
        }
        for (column, ids) in text_orders {
            model.orders[column.index()] = model.order_from_ids(&ids);
        }
        model.count_universities();
        model
    }

    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.entries.get(slot)
    }

    fn entry_of(&self, id: i32) -> Option<&Entry> {
        self.by_id.get(&id).and_then(|slot| self.entry(*slot))
    }

    fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.live().map(|(slot, _)| slot)
    }

    fn count_universities(&mut self) {
        let mut counts = HashMap::new();
        for entry in self.entries.iter().flatten() {
            if let Some(university) = entry.university_id {
                *counts.entry(university).or_default() += 1;
            }
        }
        self.universities = counts;
        self.index_universities();
    }

    /// Rebuilds each university's slot set (one pass; called wherever `universities` is).
    fn index_universities(&mut self) {
        let mut slots: HashMap<i32, Vec<u32>> = HashMap::new();
        for (slot, entry) in self.entries.iter().enumerate() {
            if let Some(university) = entry.as_ref().and_then(|entry| entry.university_id) {
                slots.entry(university).or_default().push(slot as u32);
            }
        }
        let n_slots = self.entries.len();
        self.university_slots = slots
            .into_iter()
            .map(|(university, slots)| (university, MatchSet::from_sorted(slots, n_slots)))
            .collect();
    }

    /// Sorts a column this model orders itself, from scratch.
    fn sort_column(&mut self, column: SortColumn) {
        let mut slots: Vec<u32> = self.live_slots().collect();
        let entries = &self.entries;
        let entry = |slot: &u32| entries.get(*slot).expect("live slot");
        slots.sort_unstable_by(|a, b| compare(column, entry(a), entry(b)));
        self.orders[column.index()] = Order::from_slots(slots, self.entries.len());
    }

    /// A text column's order from Postgres' ids (see `order::from_ids`).
    fn order_from_ids(&self, ids: &[i32]) -> Order {
        order::from_ids(
            ids,
            |id| self.by_id.get(&id).copied(),
            self.entries.live().map(|(slot, entry)| (slot, entry.id)),
            self.entries.len(),
        )
    }

    /// The universe a search in `scope` runs over: `None` for every chat, else the
    /// university's slots (an empty set for a university with no chats).
    fn universe(&self, scope: Scope) -> Option<std::borrow::Cow<'_, MatchSet>> {
        match scope {
            Scope::All => None,
            Scope::University(university) => Some(match self.university_slots.get(&university) {
                Some(slots) => std::borrow::Cow::Borrowed(slots),
                None => std::borrow::Cow::Owned(MatchSet::Sparse(Vec::new())),
            }),
            Scope::Nothing => Some(std::borrow::Cow::Owned(MatchSet::Sparse(Vec::new()))),
        }
    }

    /// The slots whose document contains the lowered `word`, among all chats: from the cache
    /// when it is there, else computed and cached.
    fn matches(&self, lowered: &str, budget: &ScanBudget) -> Result<Arc<MatchSet>, BudgetSpent> {
        if let Some(found) = self.cache.get(lowered) {
            return Ok(found);
        }
        let found = Arc::new(search::matching(
            &self.index,
            lowered,
            |slot| self.entry(slot).map(Entry::document),
            None,
            self.live_slots(),
            self.entries.len(),
            budget,
        )?);
        self.cache.put(lowered.to_owned(), found.clone());
        Ok(found)
    }

    /// The search words, lowered and deduplicated, with what is known of each: its cached
    /// matches, or at most how many documents it must compare (its candidates, else a scan).
    fn plan_words(&self, words: &[String]) -> Vec<(String, Result<Arc<MatchSet>, usize>)> {
        let mut lowered: Vec<String> = words
            .iter()
            .map(|word| self.lowercase.lower(word))
            .collect();
        lowered.sort();
        lowered.dedup();
        let mut plan: Vec<(String, Result<Arc<MatchSet>, usize>)> = lowered
            .into_iter()
            .map(|word| {
                let known = self.cache.get(&word).ok_or_else(|| {
                    self.index
                        .candidate_bound(word.as_bytes())
                        .unwrap_or(self.n_live)
                });
                (word, known)
            })
            .collect();
        // Cached words first (free, and they narrow the rest), then the cheapest to compute.
        plan.sort_by_key(|(_, known)| match known {
            Ok(set) => (0, set.len()),
            Err(bound) => (1, *bound),
        });
        plan
    }

    /// At most how many documents `page` compares for `words` in `scope`: each uncomputed
    /// word compares no more than its candidates, nor more than the matches so far.
    fn search_work(&self, scope: Scope, words: &[String]) -> usize {
        if words.is_empty() {
            return 0;
        }
        let mut bound = self
            .universe(scope)
            .map_or(self.n_live, |universe| universe.len());
        let mut work = 0usize;
        for (_, known) in self.plan_words(words) {
            match known {
                Ok(set) => bound = bound.min(set.len()),
                Err(candidates) => {
                    work = work.saturating_add(candidates.min(bound));
                    bound = bound.min(candidates);
                }
            }
        }
        work
    }

    /// The slots in `scope` matching every word. The cheapest word goes first and each next one
    /// compares only the matches so far; only a word computed over every chat is cached (a
    /// curator's search compares only their university's documents and caches nothing).
    fn matches_all(
        &self,
        scope: Scope,
        words: &[String],
        budget: &ScanBudget,
    ) -> Result<MatchSet, BudgetSpent> {
        let n_slots = self.entries.len();
        let universe = self.universe(scope);
        let mut current: Option<MatchSet> = universe.as_deref().cloned();
        for (word, known) in self.plan_words(words) {
            if current.as_ref().is_some_and(MatchSet::is_empty) {
                break;
            }
            let next = match (known, &current) {
                (Ok(set), None) => set.as_ref().clone(),
                (Ok(set), Some(so_far)) => so_far.intersect(&set, n_slots),
                // Narrowing saves little against a set this large; the whole word is cached.
                (Err(_), None) => self.matches(&word, budget)?.as_ref().clone(),
                (Err(_), Some(so_far)) if universe.is_none() && so_far.len() * 8 > self.n_live => {
                    so_far.intersect(self.matches(&word, budget)?.as_ref(), n_slots)
                }
                (Err(_), Some(so_far)) => search::matching(
                    &self.index,
                    &word,
                    |slot| self.entry(slot).map(Entry::document),
                    Some(so_far),
                    std::iter::empty(),
                    n_slots,
                    budget,
                )?,
            };
            current = Some(next);
        }
        Ok(current.unwrap_or_else(|| MatchSet::Sparse(Vec::new())))
    }

    fn page(
        &self,
        scope: Scope,
        query: &ListQuery,
        budget: &ScanBudget,
    ) -> Result<Selection, BudgetSpent> {
        if scope == Scope::Nothing {
            return Ok(Selection {
                chats: Vec::new(),
                total: 0,
            });
        }
        let order = &self.orders[query.sort.index()];
        let descending = query.order == SortOrder::Desc;
        let offset = usize::try_from(query.offset).unwrap_or(usize::MAX);
        let limit = usize::try_from(query.limit).unwrap_or(0);
        let (slots, total): (Vec<u32>, usize) = if query.words.is_empty() {
            match self.universe(scope) {
                None => (
                    walk(order, descending).skip(offset).take(limit).collect(),
                    self.n_live,
                ),
                Some(university) => (
                    self.select(order, &university, descending, offset, limit),
                    university.len(),
                ),
            }
        } else {
            let matched = self.matches_all(scope, &query.words, budget)?;
            (
                self.select(order, &matched, descending, offset, limit),
                matched.len(),
            )
        };
        Ok(Selection {
            chats: slots
                .into_iter()
                .filter_map(|slot| self.entry(slot).map(Entry::record))
                .collect(),
            total,
        })
    }

    /// Rows `offset..offset + limit` of `matched` in `order`: a dense set near the start by
    /// walking the order (it meets a match every few steps), any other by selecting on its
    /// positions, so that a deep page costs the set's size, never the whole order.
    fn select(
        &self,
        order: &Order,
        matched: &MatchSet,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> Vec<u32> {
        let end = offset.saturating_add(limit).min(matched.len());
        if offset >= end {
            return Vec::new();
        }
        let listed;
        let slots: &[u32] = match matched {
            MatchSet::Dense { .. } if end <= WALKED_ROWS => {
                return walk(order, descending)
                    .filter(|slot| matched.contains(*slot))
                    .skip(offset)
                    .take(end - offset)
                    .collect();
            }
            MatchSet::Dense { .. } => {
                listed = matched.slots();
                &listed
            }
            MatchSet::Sparse(slots) => slots,
        };
        let mut keyed: Vec<(u32, u32)> = slots
            .iter()
            .map(|slot| {
                let at = order.position[*slot as usize];
                (if descending { u32::MAX - at } else { at }, *slot)
            })
            .collect();
        if end < keyed.len() {
            keyed.select_nth_unstable(end - 1);
            keyed.truncate(end);
        }
        if offset > 0 {
            keyed.select_nth_unstable(offset);
        }
        let page = &mut keyed[offset..end];
        page.sort_unstable();
        page.iter().map(|(_, slot)| *slot).collect()
    }
}

/// Rows a dense set's page may reach and still be walked to in the order rather than selected.
const WALKED_ROWS: usize = 1000;

/// An order's slots, forwards or backwards.
fn walk(order: &Order, descending: bool) -> Box<dyn Iterator<Item = u32> + '_> {
    if descending {
        Box::new(order.slots.iter().rev().copied())
    } else {
        Box::new(order.slots.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    pub(super) fn row(
        id: i32,
        name: &str,
        count: Option<i32>,
        university_id: Option<i32>,
    ) -> LoadedRow {
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
                administrators: Vec::new(),
            },
            document: format!("{} -{id} admin_panel", name.to_lowercase()),
            version: RowVersion {
                chat_version: 1,
                sync_version: None,
                admins_version: None,
            },
        }
    }

    pub(super) fn query(sort: SortColumn, order: SortOrder, words: &[&str]) -> ListQuery {
        ListQuery {
            limit: 50,
            offset: 0,
            sort,
            order,
            words: words.iter().map(|w| (*w).to_owned()).collect(),
        }
    }

    pub(super) fn page_of(model: &Model, scope: Scope, query: &ListQuery) -> Selection {
        model
            .page(scope, query, &ScanBudget::new(usize::MAX))
            .expect("an unbounded search answers")
    }

    pub(super) fn ids(selection: &Selection) -> Vec<i32> {
        selection.chats.iter().map(|chat| chat.id).collect()
    }

    pub(super) fn model() -> Model {
        let rows = vec![
            row(1, "b", Some(5), Some(1)),
            row(2, "a", None, Some(2)),
            row(3, "c", Some(5), Some(1)),
            row(4, "a", Some(1), None),
        ];
        // As Postgres would order names: a(2), a(4), b(1), c(3).
        let names = vec![2, 4, 1, 3];
        let mut buffer = LoadBuffer::default();
        for row in rows {
            buffer.push(row);
        }
        let mut text_orders = vec![(SortColumn::Name, names)];
        for column in [
            SortColumn::Url,
            SortColumn::MaxChatId,
            SortColumn::Department,
            SortColumn::Source,
        ] {
            text_orders.push((column, vec![1, 2, 3, 4]));
        }
        Model::build(buffer, text_orders, Lowercase::default())
    }

    #[test]
    fn numbers_sort_with_nulls_last_and_ids_breaking_ties() {
        let model = model();
        let asc = page_of(
            &model,
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&asc), vec![4, 1, 3, 2]);
        let desc = page_of(
            &model,
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Desc, &[]),
        );
        assert_eq!(ids(&desc), vec![2, 3, 1, 4]);
        assert_eq!(asc.total, 4);
    }

    #[test]
    fn text_sorts_follow_the_order_postgres_gave() {
        let model = model();
        let page = page_of(
            &model,
            Scope::All,
            &query(SortColumn::Name, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&page), vec![2, 4, 1, 3]);
        let scoped = page_of(
            &model,
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
            text_orders: vec![(SortColumn::Name, TextOrder::Whole(vec![2, 4, 1, 5]))],
        });
        let by_count = page_of(
            &model,
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&by_count), vec![1, 4, 5, 2]);
        let by_name = page_of(
            &model,
            Scope::University(1),
            &query(SortColumn::Name, SortOrder::Asc, &[]),
        );
        assert_eq!((ids(&by_name), by_name.total), (vec![1, 5], 2));
        let by_url = page_of(
            &model,
            Scope::All,
            &query(SortColumn::Url, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&by_url), vec![1, 2, 4, 5]);
    }

    #[test]
    fn an_update_re_places_only_the_columns_it_moves() {
        let mut model = model();
        let before = page_of(
            &model,
            Scope::All,
            &query(SortColumn::CreatedAt, SortOrder::Asc, &[]),
        );
        // Chat 2 becomes the largest count; nothing else about it changes.
        let mut changed = row(2, "a", Some(100), Some(2));
        changed.version.chat_version = 2;
        model.apply(Delta {
            rows: vec![changed],
            ..Delta::default()
        });
        let by_count = page_of(
            &model,
            Scope::All,
            &query(SortColumn::ParticipantsCount, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&by_count), vec![4, 1, 3, 2]);
        let by_created = page_of(
            &model,
            Scope::All,
            &query(SortColumn::CreatedAt, SortOrder::Asc, &[]),
        );
        assert_eq!(ids(&by_created), ids(&before));
        let moved = page_of(
            &model,
            Scope::University(2),
            &query(SortColumn::Id, SortOrder::Asc, &[]),
        );
        assert_eq!((ids(&moved), moved.total), (vec![2], 1));
        let mut to_nowhere = row(2, "a", Some(100), None);
        to_nowhere.version.chat_version = 3;
        model.apply(Delta {
            rows: vec![to_nowhere],
            ..Delta::default()
        });
        let gone = page_of(
            &model,
            Scope::University(2),
            &query(SortColumn::Id, SortOrder::Asc, &[]),
        );
        assert_eq!((ids(&gone), gone.total), (vec![], 0));
    }

    #[test]
    fn a_curators_pages_and_searches_hold_only_their_university_at_any_depth() {
        let model = model();
        let mut deep = query(SortColumn::Name, SortOrder::Asc, &[]);
        deep.offset = 1;
        let scoped = page_of(&model, Scope::University(1), &deep);
        assert_eq!((ids(&scoped), scoped.total), (vec![3], 2));
        let searched = page_of(
            &model,
            Scope::University(1),
            &query(SortColumn::Id, SortOrder::Desc, &["admin_panel", "-"]),
        );
        assert_eq!((ids(&searched), searched.total), (vec![3, 1], 2));
        assert_eq!(
            model.search_work(Scope::University(1), &["zz".to_owned()]),
            2,
            "a curator's scan compares only their university's chats"
        );
        assert_eq!(model.search_work(Scope::All, &["zz".to_owned()]), 4);
        let tight = ScanBudget::new(4);
        assert!(model
            .page(
                Scope::All,
                &query(SortColumn::Id, SortOrder::Asc, &["zz"]),
                &tight
            )
            .is_err());
    }

    #[test]
    fn search_pages_are_sorted_and_counted() {
        let model = model();
        let mut q = query(SortColumn::Name, SortOrder::Asc, &["admin_panel"]);
        q.limit = 2;
        q.offset = 1;
        let page = page_of(&model, Scope::All, &q);
        assert_eq!((ids(&page), page.total), (vec![4, 1], 4));
        let two_words = page_of(
            &model,
            Scope::All,
            &query(SortColumn::Id, SortOrder::Desc, &["a", "-4"]),
        );
        assert_eq!(ids(&two_words), vec![4]);
    }
}
