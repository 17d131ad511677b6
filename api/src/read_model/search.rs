//! Search words against the chats' lowered search texts: a byte-trigram index for words that
//! have a selective trigram, a scan otherwise, and a small cache of recent words' matches.
//!
//! Postgres' `ilike` on a multibyte database lowers both sides with `lower()` and then matches
//! bytes. The documents are lowered by Postgres when they are loaded, and a word is lowered
//! with the database's own character map (`Lowercase`), so a word matches here exactly when
//! `document ilike '%word%'` (with `%`, `_` and `\` escaped) is true there.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use memchr::memmem;
use parking_lot::Mutex;

/// A trigram that occurs in more than this share of the chats is not indexed: its posting list
/// would cost more memory than it saves work, and a word made only of such trigrams is common
/// anyway, so a scan finds it about as fast.
const MAX_INDEXED_SHARE: usize = 5; // one in five
/// Bytes of recent words' match sets kept (about 200 common words' bitmaps at 150,000 chats).
const CACHE_BYTES: usize = 4 << 20;

/// The database's lowercase map: only the characters `lower()` changes.
#[derive(Debug, Default)]
pub struct Lowercase {
    changed: HashMap<char, Box<str>>,
}

impl Lowercase {
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let changed = pairs
            .into_iter()
            .filter_map(|(from, to)| {
                let mut chars = from.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Some((c, to.into_boxed_str())),
                    _ => None,
                }
            })
            .collect();
        Self { changed }
    }

    pub fn lower(&self, word: &str) -> String {
        let mut out = String::with_capacity(word.len());
        for c in word.chars() {
            match self.changed.get(&c) {
                Some(lowered) => out.push_str(lowered),
                None => out.push(c),
            }
        }
        out
    }
}

pub(super) fn trigram(window: &[u8]) -> u32 {
    (u32::from(window[0]) << 16) | (u32::from(window[1]) << 8) | u32::from(window[2])
}

/// The distinct byte trigrams of a text, sorted.
pub(super) fn trigrams(text: &[u8]) -> Vec<u32> {
    let mut grams: Vec<u32> = text.windows(3).map(trigram).collect();
    grams.sort_unstable();
    grams.dedup();
    grams
}

/// Posting lists (slots, ascending) of the selective trigrams of every live document.
#[derive(Debug, Default)]
pub struct TrigramIndex {
    pub(super) postings: HashMap<u32, Vec<u32>>,
    /// Trigrams too common to index; fixed between full builds.
    pub(super) common: std::collections::HashSet<u32>,
}

impl TrigramIndex {
    /// Builds the index over `documents` (slot, text); `n_live` is the number of chats.
    pub fn build<'a>(
        documents: impl Iterator<Item = (u32, &'a str)> + Clone,
        n_live: usize,
    ) -> Self {
        let mut frequency: HashMap<u32, usize> = HashMap::new();
        for (_, text) in documents.clone() {
            for gram in trigrams(text.as_bytes()) {
                *frequency.entry(gram).or_default() += 1;
            }
        }
        let limit = (n_live / MAX_INDEXED_SHARE).max(64);
        let mut postings: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut common = std::collections::HashSet::new();
        for (gram, n) in &frequency {
            if *n > limit {
                common.insert(*gram);
            } else {
                postings.insert(*gram, Vec::with_capacity(*n));
            }
        }
        drop(frequency);
        for (slot, text) in documents {
            for gram in trigrams(text.as_bytes()) {
                if let Some(list) = postings.get_mut(&gram) {
                    list.push(slot);
                }
            }
        }
        // Slots arrive in ascending order, so every list is sorted already.
        Self { postings, common }
    }

    /// Slots held in all posting lists, and how many trigrams are indexed.
    pub fn size(&self) -> (usize, usize) {
        (
            self.postings.values().map(Vec::len).sum(),
            self.postings.len(),
        )
    }

    /// At most how many documents a lowered word's candidates hold (the shortest posting list of
    /// its selective trigrams); `None` when no trigram of it is indexed and it must be scanned.
    pub fn candidate_bound(&self, word: &[u8]) -> Option<usize> {
        if word.len() < 3 {
            return None;
        }
        trigrams(word)
            .into_iter()
            .filter(|gram| !self.common.contains(gram))
            .map(|gram| self.postings.get(&gram).map_or(0, Vec::len))
            .min()
    }

    /// The candidate slots of a lowered word: `None` when no trigram of it is indexed (the
    /// caller must scan), otherwise a superset of the matching slots, ascending.
    fn candidates(&self, word: &[u8]) -> Option<Vec<u32>> {
        if word.len() < 3 {
            return None;
        }
        let mut lists: Vec<&Vec<u32>> = Vec::new();
        for gram in trigrams(word) {
            if self.common.contains(&gram) {
                continue;
            }
            match self.postings.get(&gram) {
                Some(list) => lists.push(list),
                // A selective trigram no document has: nothing can match.
                None => return Some(Vec::new()),
            }
        }
        if lists.is_empty() {
            return None;
        }
        lists.sort_by_key(|list| list.len());
        let mut candidates = lists[0].clone();
        for list in &lists[1..] {
            if candidates.is_empty() {
                break;
            }
            candidates = intersect(&candidates, list);
        }
        Some(candidates)
    }
}

/// The common elements of two ascending lists.
pub fn intersect(a: &[u32], b: &[u32]) -> Vec<u32> {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let mut out = Vec::with_capacity(small.len());
    // Galloping through the larger list keeps a rare word against a common one cheap.
    let mut from = 0;
    for &x in small {
        match large[from..].binary_search(&x) {
            Ok(at) => {
                out.push(x);
                from += at + 1;
            }
            Err(at) => from += at,
        }
        if from >= large.len() {
            break;
        }
    }
    out
}

/// A set of slots: a sorted list while it is small, a bitmap once it covers more than one slot
/// in `DENSE_SHARE`, so that intersecting, counting and walking a common word's matches costs
/// microseconds instead of a copy of a list as long as the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchSet {
    Sparse(Vec<u32>),
    Dense { bits: Vec<u64>, len: usize },
}

const DENSE_SHARE: usize = 32;

impl MatchSet {
    /// From slots in ascending order, out of `n_slots`.
    pub fn from_sorted(slots: Vec<u32>, n_slots: usize) -> Self {
        if slots.len().saturating_mul(DENSE_SHARE) < n_slots {
            return MatchSet::Sparse(slots);
        }
        let mut bits = vec![0u64; n_slots.div_ceil(64)];
        for slot in &slots {
            bits[*slot as usize / 64] |= 1 << (slot % 64);
        }
        MatchSet::Dense {
            bits,
            len: slots.len(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            MatchSet::Sparse(slots) => slots.len(),
            MatchSet::Dense { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes this set holds.
    pub fn bytes(&self) -> usize {
        match self {
            MatchSet::Sparse(slots) => slots.len() * 4,
            MatchSet::Dense { bits, .. } => bits.len() * 8,
        }
    }

    pub fn contains(&self, slot: u32) -> bool {
        match self {
            MatchSet::Sparse(slots) => slots.binary_search(&slot).is_ok(),
            MatchSet::Dense { bits, .. } => bits
                .get(slot as usize / 64)
                .is_some_and(|word| word & (1 << (slot % 64)) != 0),
        }
    }

    /// The slots in ascending order.
    pub fn slots(&self) -> Vec<u32> {
        match self {
            MatchSet::Sparse(slots) => slots.clone(),
            MatchSet::Dense { bits, len } => {
                let mut out = Vec::with_capacity(*len);
                for (at, word) in bits.iter().enumerate() {
                    let mut word = *word;
                    while word != 0 {
                        out.push((at * 64) as u32 + word.trailing_zeros());
                        word &= word - 1;
                    }
                }
                out
            }
        }
    }

    /// The slots in both sets.
    pub fn intersect(&self, other: &MatchSet, n_slots: usize) -> MatchSet {
        match (self, other) {
            (MatchSet::Sparse(a), MatchSet::Sparse(b)) => MatchSet::Sparse(intersect(a, b)),
            (MatchSet::Sparse(a), dense) | (dense, MatchSet::Sparse(a)) => MatchSet::Sparse(
                a.iter()
                    .copied()
                    .filter(|slot| dense.contains(*slot))
                    .collect(),
            ),
            (MatchSet::Dense { bits: a, .. }, MatchSet::Dense { bits: b, .. }) => {
                let bits: Vec<u64> = a.iter().zip(b).map(|(x, y)| x & y).collect();
                let len = bits.iter().map(|word| word.count_ones() as usize).sum();
                let both = MatchSet::Dense { bits, len };
                if len.saturating_mul(DENSE_SHARE) < n_slots {
                    MatchSet::Sparse(both.slots())
                } else {
                    both
                }
            }
        }
    }

    /// The slots for which `keep` holds.
    pub fn filter(&self, keep: impl Fn(u32) -> bool, n_slots: usize) -> MatchSet {
        let slots: Vec<u32> = match self {
            MatchSet::Sparse(slots) => slots.iter().copied().filter(|s| keep(*s)).collect(),
            dense => dense.slots().into_iter().filter(|s| keep(*s)).collect(),
        };
        MatchSet::from_sorted(slots, n_slots)
    }
}

/// Recent words' matching slots, valid for one generation of the documents. Two generations
/// approximate least-recently-used cheaply: when the young one fills up it becomes the old one,
/// and a word found in the old one moves back to the young.
#[derive(Debug, Default)]
pub struct MatchCache {
    generations: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    young: HashMap<String, Arc<MatchSet>>,
    young_bytes: usize,
    old: HashMap<String, Arc<MatchSet>>,
}

impl Generations {
    fn insert(&mut self, word: String, slots: Arc<MatchSet>) {
        let bytes = slots.bytes() + word.len();
        if self.young_bytes + bytes > CACHE_BYTES / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += bytes;
        self.young.insert(word, slots);
    }
}

impl MatchCache {
    pub fn get(&self, word: &str) -> Option<Arc<MatchSet>> {
        let mut generations = self.generations.lock();
        if let Some(found) = generations.young.get(word) {
            return Some(found.clone());
        }
        let found = generations.old.remove(word)?;
        generations.insert(word.to_owned(), found.clone());
        Some(found)
    }

    pub fn put(&self, word: String, slots: Arc<MatchSet>) {
        let mut generations = self.generations.lock();
        generations.insert(word, slots);
    }

    pub fn clear(&self) {
        *self.generations.lock() = Generations::default();
    }
}

/// Bytes of documents one request may still compare with its search words: the cap on the
/// work one search does, whatever its words.
#[derive(Debug)]
pub struct ScanBudget {
    left: Cell<usize>,
}

/// A search needed more than its `ScanBudget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSpent;

impl ScanBudget {
    pub fn new(bytes: usize) -> Self {
        Self {
            left: Cell::new(bytes),
        }
    }

    fn spend(&self, bytes: usize) -> Result<(), BudgetSpent> {
        let left = self.left.get().checked_sub(bytes).ok_or(BudgetSpent)?;
        self.left.set(left);
        Ok(())
    }
}

/// The slots (of `n_slots`) whose document contains the lowered `word`: among `within` when
/// given (a university's chats, or the matches of the other words so far), else among
/// `all_slots`. Matches are gathered in a bitmap (n / 8 bytes), never in a list as long as the
/// table: many requests may compute a new common word at once. Every document compared is
/// paid for from `budget`.
pub fn matching<'a>(
    index: &TrigramIndex,
    word: &str,
    document: impl Fn(u32) -> Option<&'a str>,
    within: Option<&MatchSet>,
    all_slots: impl Iterator<Item = u32>,
    n_slots: usize,
    budget: &ScanBudget,
) -> Result<MatchSet, BudgetSpent> {
    let finder = memmem::Finder::new(word.as_bytes());
    let contains = |slot: u32| -> Result<bool, BudgetSpent> {
        let Some(text) = document(slot) else {
            return Ok(false);
        };
        budget.spend(text.len())?;
        Ok(finder.find(text.as_bytes()).is_some())
    };
    let mut bits = vec![0u64; n_slots.div_ceil(64)];
    let mut len = 0;
    let mut visit = |slot: u32| -> Result<(), BudgetSpent> {
        if contains(slot)? {
            bits[slot as usize / 64] |= 1 << (slot % 64);
            len += 1;
        }
        Ok(())
    };
    match (index.candidates(word.as_bytes()), within) {
        (Some(candidates), None) => candidates.into_iter().try_for_each(&mut visit)?,
        (Some(candidates), Some(within)) => candidates
            .into_iter()
            .filter(|slot| within.contains(*slot))
            .try_for_each(&mut visit)?,
        (None, Some(within)) => within.slots().into_iter().try_for_each(&mut visit)?,
        (None, None) => all_slots.into_iter().try_for_each(&mut visit)?,
    }
    let dense = MatchSet::Dense { bits, len };
    Ok(if len.saturating_mul(DENSE_SHARE) < n_slots {
        MatchSet::Sparse(dense.slots())
    } else {
        dense
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<&'static str> {
        vec![
            "физика 2021 группа 7 физфак -70000000000007 admin_panel",
            "математика 2020 группа 12 мехмат -70000000000012 bot_registrar",
            "история 2021 группа 120  -70000000000120 academic_group",
            "50% скидка   admin_panel",
        ]
    }

    fn search(word: &str) -> Vec<u32> {
        let documents = docs();
        let index = TrigramIndex::build(
            documents.iter().enumerate().map(|(i, d)| (i as u32, *d)),
            documents.len(),
        );
        matching(
            &index,
            word,
            |slot| documents.get(slot as usize).copied(),
            None,
            0..documents.len() as u32,
            documents.len(),
            &ScanBudget::new(usize::MAX),
        )
        .unwrap()
        .slots()
    }

    #[test]
    fn words_match_as_substrings_of_any_column() {
        assert_eq!(search("физ"), vec![0]);
        assert_eq!(search("группа"), vec![0, 1, 2]);
        assert_eq!(search("12"), vec![1, 2]);
        assert_eq!(search("120"), vec![2]);
        assert_eq!(search("50%"), vec![3]);
        assert_eq!(search("_panel"), vec![0, 3]);
        assert_eq!(search("химия"), Vec::<u32>::new());
        assert_eq!(search("a"), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_search_within_a_set_compares_only_its_documents_and_stops_at_its_budget() {
        let documents = docs();
        let index = TrigramIndex::build(
            documents.iter().enumerate().map(|(i, d)| (i as u32, *d)),
            documents.len(),
        );
        let document = |slot: u32| documents.get(slot as usize).copied();
        let within = MatchSet::Sparse(vec![1, 2]);
        let budget = ScanBudget::new(documents[1].len() + documents[2].len());
        let found = matching(&index, "a", document, Some(&within), 0..4, 4, &budget).unwrap();
        assert_eq!(found.slots(), vec![1, 2]);
        assert_eq!(
            matching(&index, "a", document, Some(&within), 0..4, 4, &budget),
            Err(BudgetSpent),
            "the budget is spent"
        );
        let all = ScanBudget::new(documents[0].len() * 2);
        assert_eq!(
            matching(&index, "a", document, None, 0..4, 4, &all),
            Err(BudgetSpent)
        );
        assert_eq!(index.candidate_bound("груп".as_bytes()), Some(3));
        assert_eq!(index.candidate_bound(b"zz"), None);
    }

    #[test]
    fn sets_answer_the_same_sparse_or_dense() {
        let n = 256;
        let evens: Vec<u32> = (0..n).step_by(2).collect();
        let threes: Vec<u32> = (0..n).step_by(3).collect();
        let few = vec![3, 6, 7, 200];
        let dense_evens = MatchSet::from_sorted(evens.clone(), n as usize);
        let dense_threes = MatchSet::from_sorted(threes.clone(), n as usize);
        assert!(matches!(dense_evens, MatchSet::Dense { .. }));
        let sparse_few = MatchSet::from_sorted(few.clone(), 100_000);
        assert!(matches!(sparse_few, MatchSet::Sparse(_)));
        let sixes = dense_evens.intersect(&dense_threes, n as usize);
        assert_eq!(sixes.slots(), intersect(&evens, &threes));
        assert_eq!(sixes.len(), sixes.slots().len());
        assert_eq!(
            sparse_few.intersect(&dense_evens, n as usize).slots(),
            vec![6, 200]
        );
        assert_eq!(
            dense_evens.intersect(&sparse_few, n as usize).slots(),
            vec![6, 200]
        );
        assert!(dense_evens.contains(4) && !dense_evens.contains(5) && !dense_evens.contains(9999));
        assert_eq!(
            dense_evens.filter(|s| s < 10, n as usize).slots(),
            vec![0, 2, 4, 6, 8]
        );
    }

    #[test]
    fn the_cache_keeps_what_is_used_and_forgets_the_rest() {
        let cache = MatchCache::default();
        let big = Arc::new(MatchSet::Sparse(vec![0; CACHE_BYTES / 4 / 4]));
        cache.put("hot".into(), Arc::new(MatchSet::Sparse(vec![1])));
        cache.put("a".into(), big.clone());
        cache.put("b".into(), big.clone());
        assert!(cache.get("hot").is_some());
        cache.put("c".into(), big.clone());
        assert!(
            cache.get("hot").is_some(),
            "a word in use survives a generation"
        );
        cache.put("d".into(), big.clone());
        cache.put("e".into(), big);
        assert!(cache.get("a").is_none(), "an unused word is forgotten");
        cache.clear();
        assert!(cache.get("hot").is_none());
    }

    #[test]
    fn intersection_keeps_common_elements_in_order() {
        assert_eq!(intersect(&[1, 3, 5, 7], &[2, 3, 4, 7, 9]), vec![3, 7]);
        assert_eq!(intersect(&[], &[1]), Vec::<u32>::new());
        assert_eq!(intersect(&[9], &[1, 2, 9]), vec![9]);
    }

    #[test]
    fn lowering_uses_only_the_databases_map() {
        let map = Lowercase::from_pairs(vec![("Ф".into(), "ф".into()), ("A".into(), "a".into())]);
        assert_eq!(map.lower("ФAБ"), "фaБ");
    }
}
