//! Applying membership events to a chat's count: the per-(chat, user) membership register of
//! MAX_EVENTS.md §3. Pure: no I/O, no clock.
//!
//! A chat's count is a baseline (the last `GET /chats/{id}`: the count, and when it was asked)
//! plus, for each user touched since, how their membership changed: the user's earliest event
//! says what they were at the baseline (a first `user_added` means absent, a first
//! `user_removed` means present), their latest event says what they are now. So
//! `count = baseline + Σ_u (final_u − initial_u)`. The register keeps every event as a set, so
//! a duplicate is the same element and any order of arrival gives the same set, hence the
//! same count: MAX sends no event id, repeats events, and retries them out of order.
//!
//! An event at or before `asked_at − SKEW_MS` is in the baseline already and changes nothing;
//! one within `SKEW_MS` of `asked_at` may or may not be, so it is applied and the chat is
//! asked again (a settle GET) about a minute later.

use std::collections::{BTreeMap, BTreeSet};

use super::update::{Membership, Update};

/// How far apart our clock and MAX's may be (NTP on both sides).
pub const SKEW_MS: i64 = 2_000;

/// A chat's count as MAX last gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Baseline {
    pub count: i64,
    /// When the `GET /chats/{id}` was sent, Unix milliseconds.
    pub asked_at_ms: i64,
}

/// Joined or left; `Added` orders first among events of one millisecond.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    Added,
    Removed,
}

/// A baseline and the membership events since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    baseline: Baseline,
    /// Each user's events since the baseline, ordered by time.
    users: BTreeMap<i64, BTreeSet<(i64, Change)>>,
}

/// What one event did to a register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Counted.
    Applied,
    /// Counted, but too close to the baseline to know whether the baseline has it: settle.
    Ambiguous,
    /// Already in the register.
    Duplicate,
    /// Before the baseline: the baseline has it.
    Stale,
}

/// Why a register's count cannot be trusted until a reconcile GET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doubt {
    /// The count came out below zero (clamped): events are missing or the baseline is off.
    Negative,
    /// A user's events do not alternate (joined twice without leaving, or both in one
    /// millisecond): one was missed.
    Conflict,
}

/// A register's count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Never below zero.
    pub count: i64,
    /// When the count was last known exact: the latest event counted, or the baseline.
    pub exact_at_ms: i64,
    /// Some event was within `SKEW_MS` of the baseline.
    pub settle: bool,
    pub doubt: Option<Doubt>,
}

impl Register {
    pub fn new(baseline: Baseline) -> Self {
        Self {
            baseline,
            users: BTreeMap::new(),
        }
    }

    pub fn baseline(&self) -> Baseline {
        self.baseline
    }

    /// Adds one membership event.
    pub fn apply(&mut self, change: Change, event: &Membership) -> Applied {
        if event.at_ms <= self.baseline.asked_at_ms - SKEW_MS {
            return Applied::Stale;
        }
        let events = self.users.entry(event.user_id).or_default();
        if !events.insert((event.at_ms, change)) {
            return Applied::Duplicate;
        }
        if self.is_ambiguous(event.at_ms) {
            Applied::Ambiguous
        } else {
            Applied::Applied
        }
    }

    fn is_ambiguous(&self, at_ms: i64) -> bool {
        (at_ms - self.baseline.asked_at_ms).abs() <= SKEW_MS
    }

    /// The count: the baseline moved by each user's change since.
    pub fn tally(&self) -> Tally {
        let mut count = self.baseline.count;
        let mut exact_at_ms = self.baseline.asked_at_ms;
        let mut settle = false;
        let mut conflict = false;
        for events in self.users.values() {
            let (Some(&(_, first)), Some(&(last_at, last))) = (events.first(), events.last())
            else {
                continue;
            };
            let initial = i64::from(first == Change::Removed);
            let current = i64::from(last == Change::Added);
            count += current - initial;
            exact_at_ms = exact_at_ms.max(last_at);
            settle |= events.iter().any(|(at, _)| self.is_ambiguous(*at));
            conflict |= events
                .iter()
                .zip(events.iter().skip(1))
                .any(|(a, b)| a.1 == b.1 || a.0 == b.0);
        }
        let doubt = if count < 0 {
            Some(Doubt::Negative)
        } else if conflict {
            Some(Doubt::Conflict)
        } else {
            None
        };
        Tally {
            count: count.max(0),
            exact_at_ms,
            settle,
            doubt,
        }
    }
}

/// `count = baseline + Σ_u (final_u − initial_u)` over a set of events, in any order, with any
/// duplicates.
pub fn count(baseline: Baseline, events: &[(Change, Membership)]) -> Tally {
    let mut register = Register::new(baseline);
    for (change, event) in events {
        register.apply(*change, event);
    }
    register.tally()
}

/// What syncd knows of a chat's count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatState {
    /// No baseline: events cannot move a count yet.
    Unknown,
    /// A baseline and the events since.
    Counted(Register),
    /// The bot was removed from the chat at `at_ms`.
    Removed { at_ms: i64 },
}

/// What to do about a chat after an update; carried out by whoever keeps the chat's state
/// (`super::intake::Registers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write the count (fenced by `exact_at_ms`, like a MAX answer).
    Count { count: i64, exact_at_ms: i64 },
    /// Ask MAX for the chat again in about a minute (an event close to the baseline).
    Settle,
    /// Ask MAX for a baseline now (the bot was added, or events came for a chat without one).
    NeedsBaseline,
    /// The bot left the chat: mark it removed, stop counting and reconciling it.
    Removed { at_ms: i64 },
    /// The register doubts itself: ask MAX now and start a new register.
    Reconcile(Doubt),
}

/// What an update came to, for the metrics and the debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Ambiguous,
    Duplicate,
    Stale,
    NeedsBaseline,
    Removed,
    /// `chat_title_changed`: never a count.
    NoCount,
    /// Another update type.
    Ignored,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Applied,
        Outcome::Ambiguous,
        Outcome::Duplicate,
        Outcome::Stale,
        Outcome::NeedsBaseline,
        Outcome::Removed,
        Outcome::NoCount,
        Outcome::Ignored,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::NeedsBaseline => "needs_baseline",
            Outcome::Removed => "removed",
            Outcome::NoCount => "no_count",
            Outcome::Ignored => "ignored",
        }
    }
}

/// Applies one update to its chat's state: the one entry point of the events pipeline.
pub fn apply(state: &mut ChatState, update: &Update) -> (Outcome, Vec<Effect>) {
    match update {
        Update::UserAdded(m) => apply_membership(state, Change::Added, m),
        Update::UserRemoved(m) => apply_membership(state, Change::Removed, m),
        Update::BotAdded { at_ms, .. } => bot_added(state, *at_ms),
        Update::BotRemoved { at_ms, .. } => bot_removed(state, *at_ms),
        Update::ChatTitleChanged { .. } => (Outcome::NoCount, Vec::new()),
        Update::Other { .. } => (Outcome::Ignored, Vec::new()),
    }
}

fn apply_membership(
    state: &mut ChatState,
    change: Change,
    m: &Membership,
) -> (Outcome, Vec<Effect>) {
    let register = match state {
        ChatState::Counted(register) => register,
        // Before the removal: nothing to count any more. After it: the bot is back (its
        // bot_added is late or lost), so the chat needs a baseline.
        ChatState::Removed { at_ms } if m.at_ms <= *at_ms => return (Outcome::Stale, Vec::new()),
        ChatState::Removed { .. } | ChatState::Unknown => {
            return (Outcome::NeedsBaseline, vec![Effect::NeedsBaseline])
        }
    };
    let applied = register.apply(change, m);
    let outcome = match applied {
        Applied::Duplicate => return (Outcome::Duplicate, Vec::new()),
        Applied::Stale => return (Outcome::Stale, Vec::new()),
        Applied::Applied => Outcome::Applied,
        Applied::Ambiguous => Outcome::Ambiguous,
    };
    let tally = register.tally();
    let mut effects = vec![Effect::Count {
        count: tally.count,
        exact_at_ms: tally.exact_at_ms,
    }];
    if applied == Applied::Ambiguous {
        effects.push(Effect::Settle);
    }
    if let Some(doubt) = tally.doubt {
        effects.push(Effect::Reconcile(doubt));
    }
    (outcome, effects)
}

/// The bot counts itself in (MAX_EVENTS.md §1.5): a baseline is asked for, never a +1.
fn bot_added(state: &ChatState, at_ms: i64) -> (Outcome, Vec<Effect>) {
    let newer = match state {
        ChatState::Counted(register) => register.baseline.asked_at_ms - SKEW_MS >= at_ms,
        ChatState::Removed { at_ms: removed } => *removed > at_ms,
        ChatState::Unknown => false,
    };
    if newer {
        (Outcome::Stale, Vec::new())
    } else {
        (Outcome::NeedsBaseline, vec![Effect::NeedsBaseline])
    }
}

fn bot_removed(state: &mut ChatState, at_ms: i64) -> (Outcome, Vec<Effect>) {
    match state {
        // A baseline asked after the removal: the bot is back.
        ChatState::Counted(register) if register.baseline.asked_at_ms - SKEW_MS >= at_ms => {
            return (Outcome::Stale, Vec::new())
        }
        ChatState::Removed { at_ms: removed } if *removed >= at_ms => {
            return (Outcome::Duplicate, Vec::new())
        }
        _ => {}
    }
    *state = ChatState::Removed { at_ms };
    (Outcome::Removed, vec![Effect::Removed { at_ms }])
}

#[cfg(test)]
#[path = "register_tests.rs"]
mod tests;
