//! Plan and install: a plan changes nothing until it is installed, and an installed plan
//! leaves every order, the index, the counts by university and the id map as a rebuild would.

use super::*;
use crate::read_model::query::SortOrder;
use crate::read_model::search::Lowercase;
use crate::read_model::tests::{ids, model, page_of, query, row};
use crate::read_model::LoadBuffer;
use crate::scope::Scope;

fn by(model: &Model, column: SortColumn) -> Vec<i32> {
    let mut q = query(column, SortOrder::Asc, &[]);
    q.limit = 1000;
    ids(&page_of(model, Scope::All, &q))
}

fn search(model: &Model, word: &str) -> Vec<i32> {
    let mut q = query(SortColumn::Id, SortOrder::Asc, &[word]);
    q.limit = 1000;
    ids(&page_of(model, Scope::All, &q))
}

#[test]
fn a_plan_changes_nothing_until_it_is_installed() {
    let mut model = model();
    let before = by(&model, SortColumn::Name);
    let plan = model.plan(Delta {
        rows: vec![
            row(5, "aa", Some(9), Some(1)),
            row(1, "zz", Some(5), Some(1)),
        ],
        deleted: vec![2],
        text_orders: vec![(
            SortColumn::Name,
            TextOrder::Placed(vec![(5, Some(4)), (1, Some(3))]),
        )],
    });
    assert_eq!(by(&model, SortColumn::Name), before);
    assert_eq!(search(&model, "zz"), Vec::<i32>::new());
    assert_eq!(model.n_live, 4);
    drop(model.install(plan));
    assert_eq!(by(&model, SortColumn::Name), vec![4, 5, 3, 1]);
    assert_eq!(search(&model, "zz"), vec![1]);
    assert_eq!(search(&model, "aa"), vec![5]);
    assert_eq!(model.n_live, 4);
    assert_eq!(by(&model, SortColumn::ParticipantsCount), vec![4, 1, 3, 5]);
}

#[test]
fn inserts_land_after_their_predecessors_in_every_text_order() {
    let mut model = model();
    // Names: a(2), a(4), b(1), c(3). New: 6 "a" (after 4), 5 "0" (first), 7 "b" after 1 and
    // 8 "b" after 7: a chain of new rows.
    let placed = TextOrder::Placed(vec![(5, None), (6, Some(4)), (7, Some(1)), (8, Some(7))]);
    let applied = model.apply(Delta {
        rows: vec![
            row(5, "0", None, None),
            row(6, "a", None, None),
            row(7, "b", None, None),
            row(8, "b", None, None),
        ],
        text_orders: vec![(SortColumn::Name, placed)],
        ..Delta::default()
    });
    assert_eq!(applied.provisional, 0);
    assert_eq!(by(&model, SortColumn::Name), vec![5, 2, 4, 6, 1, 7, 8, 3]);
    // Columns without placements keep their order and put the new rows last, provisionally.
    assert_eq!(by(&model, SortColumn::Url), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(by(&model, SortColumn::Id), vec![1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn a_predecessor_the_model_does_not_hold_leaves_the_row_last_and_says_so() {
    let mut model = model();
    let applied = model.apply(Delta {
        rows: vec![row(5, "x", None, None)],
        text_orders: vec![(SortColumn::Name, TextOrder::Placed(vec![(5, Some(99))]))],
        ..Delta::default()
    });
    assert_eq!(applied.provisional, 1);
    assert_eq!(by(&model, SortColumn::Name), vec![2, 4, 1, 3, 5]);
}

#[test]
fn a_rename_moves_the_row_and_its_search_postings() {
    let mut model = model();
    assert_eq!(search(&model, "архив"), Vec::<i32>::new());
    let mut renamed = row(2, "c архив", None, Some(2));
    renamed.version.chat_version = 2;
    model.apply(Delta {
        rows: vec![renamed],
        text_orders: vec![(SortColumn::Name, TextOrder::Placed(vec![(2, Some(3))]))],
        ..Delta::default()
    });
    assert_eq!(by(&model, SortColumn::Name), vec![4, 1, 3, 2]);
    assert_eq!(search(&model, "архив"), vec![2]);
    assert_eq!(search(&model, "-2 "), vec![2]);
}

#[test]
fn counts_by_university_follow_moves_inserts_and_deletes() {
    let mut model = model();
    model.apply(Delta {
        rows: vec![row(2, "a", None, Some(1)), row(9, "q", None, Some(3))],
        deleted: vec![3],
        ..Delta::default()
    });
    let mut expected = HashMap::new();
    expected.insert(1, 2);
    expected.insert(3, 1);
    assert_eq!(model.universities, expected);
    let page = page_of(
        &model,
        Scope::University(1),
        &query(SortColumn::Id, SortOrder::Asc, &[]),
    );
    assert_eq!((ids(&page), page.total), (vec![1, 2], 2));
    // A curator's search compares only their university's chats: the moved and new ones too.
    let searched = page_of(
        &model,
        Scope::University(1),
        &query(SortColumn::Id, SortOrder::Asc, &["admin_panel"]),
    );
    assert_eq!((ids(&searched), searched.total), (vec![1, 2], 2));
    let new_one = page_of(
        &model,
        Scope::University(3),
        &query(SortColumn::Id, SortOrder::Asc, &["admin_panel"]),
    );
    assert_eq!(ids(&new_one), vec![9]);
}

#[test]
fn the_id_map_grows_by_a_copy_swapped_in() {
    let mut model = model();
    let n = model.by_id.capacity() + 10;
    let rows: Vec<LoadedRow> = (100..100 + n as i32)
        .map(|id| row(id, "n", Some(id), None))
        .collect();
    let plan = model.plan(Delta {
        rows,
        ..Delta::default()
    });
    assert!(matches!(plan.ids, IdsPlan::Whole(_)));
    drop(model.install(plan));
    assert_eq!(model.n_live, 4 + n);
    assert_eq!(model.entry_of(100).map(|e| e.id), Some(100));
    assert_eq!(model.entry_of(1).map(|e| e.id), Some(1));
    // The next insert finds room and edits in place.
    let plan = model.plan(Delta {
        rows: vec![row(50, "m", None, None)],
        ..Delta::default()
    });
    assert!(matches!(plan.ids, IdsPlan::Edit { .. }));
}

#[test]
fn a_whole_order_from_postgres_replaces_a_drifted_one() {
    let mut model = model();
    model.drift_text_order(SortColumn::Name);
    assert_eq!(by(&model, SortColumn::Name), vec![3, 1, 4, 2]);
    let drifted = model.text_order_digests();
    model.apply(Delta {
        text_orders: vec![(SortColumn::Name, TextOrder::Whole(vec![2, 4, 1, 3]))],
        ..Delta::default()
    });
    assert_eq!(by(&model, SortColumn::Name), vec![2, 4, 1, 3]);
    let repaired = model.text_order_digests();
    assert_ne!(drifted, repaired);
    // md5('2,4,1,3'), as Postgres computes it.
    let name = repaired
        .iter()
        .find(|(column, _)| *column == SortColumn::Name)
        .map(|(_, digest)| digest.as_str());
    assert_eq!(
        name,
        Some(format!("{:x}", Md5::digest(b"2,4,1,3")).as_str())
    );
}

#[test]
fn an_empty_model_takes_its_first_rows() {
    let mut model = Model::build(LoadBuffer::default(), Vec::new(), Lowercase::default());
    model.apply(Delta {
        rows: vec![row(1, "a", Some(1), None)],
        text_orders: vec![(SortColumn::Name, TextOrder::Placed(vec![(1, None)]))],
        ..Delta::default()
    });
    assert_eq!(by(&model, SortColumn::Name), vec![1]);
    assert_eq!(by(&model, SortColumn::CreatedAt), vec![1]);
    assert_eq!(search(&model, "admin"), vec![1]);
}
