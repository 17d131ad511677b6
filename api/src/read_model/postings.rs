//! Changing the search index without shifting a posting list under the write lock: a change
//! set's new lists are built beside the index's own (`TrigramIndex::plan`) and swapped in whole
//! (`TrigramIndex::install`); the lists they replace are freed after the lock.

use std::collections::HashMap;

use super::search::{trigrams, TrigramIndex};

/// New posting lists for the trigrams a change set touches, built beside the index's own while
/// readers go on, to be swapped in whole: no list is shifted in place under the write lock.
#[derive(Debug, Default)]
pub struct PostingsPlan {
    lists: Vec<(u32, Vec<u32>)>,
}

impl PostingsPlan {
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

impl TrigramIndex {
    /// Plans `changes` (slot, its document before and after; `None` where the row is absent,
    /// each slot once) without changing the index.
    pub fn plan(&self, changes: &[(u32, Option<&str>, Option<&str>)]) -> PostingsPlan {
        // Per trigram: the slots leaving its list and the slots joining it.
        let mut edits: HashMap<u32, (Vec<u32>, Vec<u32>)> = HashMap::new();
        for (slot, before, after) in changes {
            let before = before.map_or_else(Vec::new, |text| trigrams(text.as_bytes()));
            let after = after.map_or_else(Vec::new, |text| trigrams(text.as_bytes()));
            let (mut i, mut j) = (0, 0);
            while i < before.len() || j < after.len() {
                match (before.get(i), after.get(j)) {
                    (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
                    (Some(a), b) if b.is_none_or(|b| a < b) => {
                        edits.entry(*a).or_default().0.push(*slot);
                        i += 1;
                    }
                    (_, Some(b)) => {
                        if !self.common.contains(b) {
                            edits.entry(*b).or_default().1.push(*slot);
                        }
                        j += 1;
                    }
                    (_, None) => unreachable!("the loop runs while one side is left"),
                }
            }
        }
        let lists = edits
            .into_iter()
            .filter(|(gram, _)| !self.common.contains(gram))
            .map(|(gram, (mut leaving, mut joining))| {
                leaving.sort_unstable();
                joining.sort_unstable();
                let list = self.postings.get(&gram).map_or(&[][..], Vec::as_slice);
                (gram, edit_sorted(list, &leaving, &joining))
            })
            .collect();
        PostingsPlan { lists }
    }

    /// Swaps the planned lists in; returns the lists they replace, to be freed after the lock.
    pub fn install(&mut self, plan: PostingsPlan) -> Vec<Vec<u32>> {
        let mut replaced = Vec::with_capacity(plan.lists.len());
        for (gram, list) in plan.lists {
            // No list is kept empty: an indexed trigram without a list matches nothing anyway.
            let old = if list.is_empty() {
                self.postings.remove(&gram)
            } else {
                self.postings.insert(gram, list)
            };
            replaced.extend(old);
        }
        replaced
    }
}

/// `list` without `leaving`, with `joining` merged in; all three ascending.
fn edit_sorted(list: &[u32], leaving: &[u32], joining: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity((list.len() + joining.len()).saturating_sub(leaving.len()));
    let mut leaving = leaving.iter().peekable();
    let mut joining = joining.iter().copied().peekable();
    for slot in list.iter().copied() {
        while leaving.next_if(|gone| **gone < slot).is_some() {}
        if leaving.next_if(|gone| **gone == slot).is_some() {
            continue;
        }
        while let Some(new) = joining.next_if(|new| *new < slot) {
            out.push(new);
        }
        // A slot already in the list stays once.
        joining.next_if(|new| *new == slot);
        out.push(slot);
    }
    out.extend(joining);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_model::search::{matching, trigram};

    #[test]
    fn an_index_keeps_up_with_changed_documents() {
        let mut index = TrigramIndex::build([(0u32, "abc def"), (2, "abcd")].into_iter(), 2);
        let plan = index.plan(&[
            (1, None, Some("xyz abc")),
            (0, Some("abc def"), None),
            (2, Some("abcd"), Some("abce")),
        ]);
        // Planning changes nothing until the plan is installed.
        assert_eq!(index.postings[&trigram(b"def")], vec![0]);
        let replaced = index.install(plan);
        assert!(!replaced.is_empty());
        assert!(!index.postings.contains_key(&trigram(b"def")));
        assert_eq!(index.postings[&trigram(b"abc")], vec![1, 2]);
        assert_eq!(index.postings[&trigram(b"bce")], vec![2]);
        assert!(!index.postings.contains_key(&trigram(b"bcd")));
        let documents = ["", "xyz abc", "abce"];
        let found = matching(
            &index,
            "abc",
            |s| documents.get(s as usize).copied(),
            None,
            0..3,
            3,
            &super::super::search::ScanBudget::new(usize::MAX),
        )
        .unwrap();
        assert_eq!(found.slots(), vec![1, 2]);
    }

    #[test]
    fn a_sorted_edit_removes_and_merges_in_one_pass() {
        assert_eq!(
            edit_sorted(&[1, 3, 5, 7], &[3, 7], &[0, 4, 9]),
            vec![0, 1, 4, 5, 9]
        );
        assert_eq!(edit_sorted(&[], &[2], &[2]), vec![2]);
        assert_eq!(edit_sorted(&[2], &[], &[2]), vec![2]);
    }
}
