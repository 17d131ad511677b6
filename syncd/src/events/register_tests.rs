use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;

const ASKED: i64 = 1_775_000_000_000;

fn baseline(count: i64) -> Baseline {
    Baseline {
        count,
        asked_at_ms: ASKED,
    }
}

fn m(user_id: i64, after_ms: i64) -> Membership {
    Membership {
        chat_id: -1,
        user_id,
        at_ms: ASKED + after_ms,
    }
}

fn added(user_id: i64, after_ms: i64) -> (Change, Membership) {
    (Change::Added, m(user_id, after_ms))
}

fn removed(user_id: i64, after_ms: i64) -> (Change, Membership) {
    (Change::Removed, m(user_id, after_ms))
}

#[test]
fn joins_and_leaves_after_the_baseline_move_the_count() {
    let tally = count(
        baseline(10),
        &[added(1, 5_000), added(2, 6_000), removed(3, 7_000)],
    );
    assert_eq!(tally.count, 11);
    assert_eq!(tally.exact_at_ms, ASKED + 7_000);
    assert!(!tally.settle);
    assert_eq!(tally.doubt, None);
}

#[test]
fn a_user_who_joined_and_left_since_the_baseline_changes_nothing_in_any_order() {
    for events in [
        [added(1, 5_000), removed(1, 9_000)],
        [removed(1, 9_000), added(1, 5_000)],
    ] {
        assert_eq!(count(baseline(10), &events).count, 10);
    }
    // Left then came back: present at the baseline and now.
    assert_eq!(
        count(baseline(10), &[added(1, 9_000), removed(1, 5_000)]).count,
        10
    );
}

#[test]
fn events_the_baseline_has_change_nothing() {
    let mut register = Register::new(baseline(10));
    assert_eq!(
        register.apply(Change::Added, &m(1, -SKEW_MS)),
        Applied::Stale
    );
    assert_eq!(
        register.apply(Change::Removed, &m(2, -60_000)),
        Applied::Stale
    );
    assert_eq!(register.tally().count, 10);
    assert_eq!(register.tally().exact_at_ms, ASKED);
}

#[test]
fn events_near_the_baseline_are_counted_and_ask_for_a_settle() {
    let mut register = Register::new(baseline(10));
    assert_eq!(
        register.apply(Change::Added, &m(1, -SKEW_MS + 1)),
        Applied::Ambiguous
    );
    assert_eq!(
        register.apply(Change::Added, &m(2, SKEW_MS)),
        Applied::Ambiguous
    );
    assert_eq!(
        register.apply(Change::Added, &m(3, SKEW_MS + 1)),
        Applied::Applied
    );
    let tally = register.tally();
    assert_eq!(tally.count, 13);
    assert!(tally.settle);
}

#[test]
fn a_duplicate_is_recognised_and_counted_once() {
    let mut register = Register::new(baseline(3));
    assert_eq!(
        register.apply(Change::Added, &m(1, 5_000)),
        Applied::Applied
    );
    assert_eq!(
        register.apply(Change::Added, &m(1, 5_000)),
        Applied::Duplicate
    );
    assert_eq!(register.tally().count, 4);
}

#[test]
fn a_negative_count_is_clamped_and_doubted() {
    let tally = count(baseline(1), &[removed(1, 5_000), removed(2, 5_000)]);
    assert_eq!(tally.count, 0);
    assert_eq!(tally.doubt, Some(Doubt::Negative));
}

#[test]
fn events_that_do_not_alternate_are_a_conflict() {
    // Joined twice without leaving in between: a `user_removed` was missed.
    let tally = count(baseline(5), &[added(1, 5_000), added(1, 8_000)]);
    assert_eq!(tally.count, 6);
    assert_eq!(tally.doubt, Some(Doubt::Conflict));
    // Both in one millisecond: which came last is unknown.
    let tally = count(baseline(5), &[added(1, 5_000), removed(1, 5_000)]);
    assert_eq!(tally.doubt, Some(Doubt::Conflict));
}

/// A random history of joins and leaves: per user, alternating changes at increasing times,
/// some of them before or near the baseline.
fn random_history(rng: &mut StdRng) -> Vec<(Change, Membership)> {
    let mut events = Vec::new();
    for user in 0..rng.gen_range(1..12) {
        let mut present = rng.gen_bool(0.5);
        let mut at = rng.gen_range(-10_000..10_000);
        for _ in 0..rng.gen_range(1..6) {
            let change = if present {
                Change::Removed
            } else {
                Change::Added
            };
            present = !present;
            events.push((change, m(user, at)));
            at += rng.gen_range(1..5_000);
        }
    }
    events
}

#[test]
fn any_order_and_any_duplicates_give_the_same_count() {
    let mut rng = StdRng::seed_from_u64(21);
    for round in 0..500 {
        let history = random_history(&mut rng);
        let expected = count(baseline(100), &history);
        for _ in 0..20 {
            let mut delivered = history.clone();
            for _ in 0..rng.gen_range(0..history.len() + 1) {
                let again = delivered[rng.gen_range(0..delivered.len())];
                delivered.push(again);
            }
            delivered.shuffle(&mut rng);
            let got = count(baseline(100), &delivered);
            assert_eq!(got, expected, "round {round}: {delivered:?}");
        }
    }
}

#[test]
fn a_history_after_the_baseline_counts_exactly() {
    // Against a model: who is present at the baseline, then every change after it in order.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..500 {
        let n_users = rng.gen_range(1..20);
        let present: Vec<bool> = (0..n_users).map(|_| rng.gen_bool(0.5)).collect();
        let at_baseline = present.iter().filter(|p| **p).count() as i64;
        let mut now = present.clone();
        let mut events = Vec::new();
        for (user, state) in now.iter_mut().enumerate() {
            let mut at = rng.gen_range(SKEW_MS + 1..20_000);
            for _ in 0..rng.gen_range(0..4) {
                let change = if *state {
                    Change::Removed
                } else {
                    Change::Added
                };
                *state = !*state;
                events.push((change, m(user as i64, at)));
                at += rng.gen_range(1..1_000);
            }
        }
        let truth = now.iter().filter(|p| **p).count() as i64;
        events.shuffle(&mut rng);
        let tally = count(baseline(at_baseline + 3), &events);
        assert_eq!(tally.count, truth + 3);
        assert_eq!(tally.doubt, None);
        assert!(!tally.settle);
    }
}

fn counted(count: i64) -> ChatState {
    ChatState::Counted(Register::new(baseline(count)))
}

#[test]
fn an_update_applies_to_its_chat_state() {
    let mut state = counted(10);
    let (outcome, effects) = apply(&mut state, &Update::UserAdded(m(1, 5_000)));
    assert_eq!(outcome, Outcome::Applied);
    assert_eq!(
        effects,
        [Effect::Count {
            count: 11,
            exact_at_ms: ASKED + 5_000
        }]
    );
    let (outcome, effects) = apply(&mut state, &Update::UserAdded(m(1, 5_000)));
    assert_eq!((outcome, effects.len()), (Outcome::Duplicate, 0));
    let (outcome, effects) = apply(&mut state, &Update::UserRemoved(m(2, 1_000)));
    assert_eq!(outcome, Outcome::Ambiguous);
    assert!(effects.contains(&Effect::Settle), "{effects:?}");
}

#[test]
fn membership_events_of_a_chat_without_a_baseline_ask_for_one() {
    let mut state = ChatState::Unknown;
    let (outcome, effects) = apply(&mut state, &Update::UserAdded(m(1, 5_000)));
    assert_eq!(outcome, Outcome::NeedsBaseline);
    assert_eq!(effects, [Effect::NeedsBaseline]);
    assert_eq!(state, ChatState::Unknown);
}

#[test]
fn the_bot_added_asks_for_a_baseline_and_removed_marks_the_chat() {
    let mut state = counted(10);
    let (outcome, effects) = apply(
        &mut state,
        &Update::BotAdded {
            chat_id: -1,
            at_ms: ASKED + 60_000,
        },
    );
    assert_eq!(
        (outcome, effects),
        (Outcome::NeedsBaseline, vec![Effect::NeedsBaseline])
    );
    // An old bot_added the baseline already reflects.
    let (outcome, _) = apply(
        &mut state,
        &Update::BotAdded {
            chat_id: -1,
            at_ms: ASKED - 60_000,
        },
    );
    assert_eq!(outcome, Outcome::Stale);
    let removed_at = ASKED + 90_000;
    let (outcome, effects) = apply(
        &mut state,
        &Update::BotRemoved {
            chat_id: -1,
            at_ms: removed_at,
        },
    );
    assert_eq!(outcome, Outcome::Removed);
    assert_eq!(effects, [Effect::Removed { at_ms: removed_at }]);
    assert_eq!(state, ChatState::Removed { at_ms: removed_at });
    // Events from before the removal arrive late: nothing to count.
    let (outcome, _) = apply(&mut state, &Update::UserAdded(m(1, 80_000)));
    assert_eq!(outcome, Outcome::Stale);
    let (outcome, _) = apply(
        &mut state,
        &Update::BotRemoved {
            chat_id: -1,
            at_ms: removed_at,
        },
    );
    assert_eq!(outcome, Outcome::Duplicate);
}

#[test]
fn a_title_change_never_touches_a_count_and_other_types_are_ignored() {
    let mut state = counted(10);
    let before = state.clone();
    let title = Update::ChatTitleChanged {
        chat_id: -1,
        at_ms: ASKED + 5_000,
    };
    assert_eq!(apply(&mut state, &title), (Outcome::NoCount, Vec::new()));
    let other = Update::Other {
        update_type: "message_created".into(),
        at_ms: ASKED + 5_000,
    };
    assert_eq!(apply(&mut state, &other), (Outcome::Ignored, Vec::new()));
    assert_eq!(state, before);
}
