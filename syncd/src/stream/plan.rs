//! The pure step of consuming the refresh streams: given a batch of requests and what Postgres
//! holds of their chats, which to settle without a MAX call and which to refresh. No I/O: the
//! consumer reads, plans, calls, writes and acknowledges around it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::refresh::{Priority, RefreshOutcome, RefreshRequest};

use crate::store::Target;

/// What decides a plan besides the requests.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Age at which a count is due (stale threshold less refresh-ahead): a lazy request for a
    /// younger count is already answered.
    pub due_age: Duration,
    /// How long a chat MAX said is unavailable is left alone.
    pub inactive_recheck: Duration,
}

/// The requests of one chat in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// When the oldest of them was enqueued.
    pub oldest: DateTime<Utc>,
    /// Whether any is a manual refresh (which always asks MAX).
    pub manual: bool,
}

/// A chat whose requests are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    /// What to publish to waiting requests; `None` for a chat deleted since it was asked.
    pub outcome: Option<RefreshOutcome>,
    /// The count is what Postgres holds (no MAX call): Redis is brought up to it.
    pub from_store: bool,
    /// Left alone for now (backing off, unavailable until its recheck): its dedup marker stays
    /// until it expires, so that every read does not enqueue it again.
    pub left_alone: bool,
    /// Published to refresh-and-wait requests: only a count that MAX gave after the request
    /// was made is an answer to one (a refresh since, or this batch's own call), never a
    /// count kept from before, nor a chat left alone.
    pub publish: bool,
}

impl Settled {
    fn of(target: &Target, error: Option<&str>, left_alone: bool) -> Self {
        Self {
            outcome: Some(outcome_of(target, error)),
            from_store: error.is_none(),
            left_alone,
            publish: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub wanted: BTreeMap<i32, Wanted>,
    /// Chats answered without a MAX call.
    pub settled: HashMap<i32, Settled>,
    /// Chats to ask MAX about, manual ones first, with the trace of a request that asked.
    pub to_refresh: Vec<Target>,
}

/// Plans a batch: `targets` holds the chats that still exist.
pub fn plan(
    requests: &[&RefreshRequest],
    targets: &HashMap<i32, Target>,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Plan {
    let recheck_before =
        now - chrono::Duration::from_std(policy.inactive_recheck).unwrap_or_default();
    let stale_before = now - chrono::Duration::from_std(policy.due_age).unwrap_or_default();
    let mut wanted: BTreeMap<i32, Wanted> = BTreeMap::new();
    for request in requests {
        let slot = wanted.entry(request.chat_id).or_insert(Wanted {
            oldest: request.enqueued_at,
            manual: false,
        });
        slot.oldest = slot.oldest.min(request.enqueued_at);
        slot.manual |= request.priority == Priority::Manual;
    }
    let mut settled = HashMap::new();
    let mut to_refresh = Vec::new();
    for (chat_id, Wanted { oldest, manual }) in &wanted {
        let Some(target) = targets.get(chat_id) else {
            // Deleted since it was enqueued.
            settled.insert(
                *chat_id,
                Settled {
                    outcome: None,
                    from_store: false,
                    left_alone: false,
                    publish: false,
                },
            );
            continue;
        };
        let refreshed_since = target
            .participants_updated_at
            .is_some_and(|at| at >= *oldest);
        let still_fresh = target
            .participants_updated_at
            .is_some_and(|at| at >= stale_before);
        if !manual && !target.is_due(recheck_before) {
            // A manual refresh always asks MAX: a chat marked unavailable by mistake (a wrong
            // MAX_API_URL, another bot's token) must be recoverable by a person.
            settled.insert(
                *chat_id,
                Settled::of(target, Some("chat_unavailable"), true),
            );
        } else if !manual && target.backing_off_until().is_some_and(|until| until > now) {
            // Its own answers keep failing: lazy requests are left alone until the backoff ends
            // (the stale sweep takes the chat then), instead of a MAX call on every read or
            // redelivery. Outages are not recorded against chats, so they never get here.
            settled.insert(*chat_id, Settled::of(target, Some("backing_off"), true));
        } else if refreshed_since || (!manual && still_fresh) {
            // Someone refreshed it after this was asked: no MAX call needed.
            let mut done = Settled::of(target, None, false);
            done.publish = refreshed_since;
            settled.insert(*chat_id, done);
        } else {
            let mut target = target.clone();
            target.traceparent = requests
                .iter()
                .find(|r| r.chat_id == *chat_id && r.traceparent.is_some())
                .and_then(|r| r.traceparent.clone());
            to_refresh.push(target);
        }
    }
    // A person waits for a manual refresh: its calls start first.
    to_refresh.sort_by_key(|target| !wanted[&target.chat_id].manual);
    Plan {
        wanted,
        settled,
        to_refresh,
    }
}

/// The outcome published for a chat settled without a MAX call.
fn outcome_of(target: &Target, error: Option<&str>) -> RefreshOutcome {
    RefreshOutcome {
        chat_id: target.chat_id,
        participants_count: if error.is_none() {
            target.participants_count
        } else {
            None
        },
        updated_at: target.participants_updated_at.unwrap_or_else(Utc::now),
        error: error.map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::sync_status::SyncStatus;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    const NOW: &str = "2026-12-03T12:00:00Z";

    fn policy() -> Policy {
        Policy {
            due_age: Duration::from_secs(45 * 60),
            inactive_recheck: Duration::from_secs(7 * 86_400),
        }
    }

    fn request(chat_id: i32, priority: Priority, enqueued_at: &str) -> RefreshRequest {
        RefreshRequest {
            chat_id,
            priority,
            enqueued_at: at(enqueued_at),
            traceparent: None,
        }
    }

    fn target(chat_id: i32) -> Target {
        Target {
            chat_id,
            max_chat_id: Some(format!("-7000000000{chat_id:04}")),
            participants_count: Some(10),
            participants_updated_at: Some(at("2026-12-03T10:00:00Z")),
            sync_status: Some(SyncStatus::Active),
            checked_at: Some(at("2026-12-03T10:00:00Z")),
            consecutive_failures: 0,
            last_error: None,
            traceparent: None,
        }
    }

    fn planned(requests: &[RefreshRequest], targets: Vec<Target>) -> Plan {
        let requests: Vec<&RefreshRequest> = requests.iter().collect();
        let targets = targets.into_iter().map(|t| (t.chat_id, t)).collect();
        plan(&requests, &targets, at(NOW), &policy())
    }

    fn refreshed(plan: &Plan) -> Vec<i32> {
        plan.to_refresh.iter().map(|t| t.chat_id).collect()
    }

    fn settled_as(plan: &Plan, chat_id: i32) -> Option<Option<String>> {
        plan.settled
            .get(&chat_id)
            .map(|s| s.outcome.as_ref().and_then(|o| o.error.clone()))
    }

    #[test]
    fn a_stale_chat_is_refreshed_once_however_often_it_was_asked_for() {
        let requests = [
            request(1, Priority::Lazy, "2026-12-03T11:58:00Z"),
            request(1, Priority::Lazy, "2026-12-03T11:59:00Z"),
        ];
        let plan = planned(&requests, vec![target(1)]);
        assert_eq!(refreshed(&plan), [1]);
        assert_eq!(
            plan.wanted[&1].oldest,
            at("2026-12-03T11:58:00Z"),
            "the oldest request decides what counts as refreshed since"
        );
    }

    #[test]
    fn a_deleted_chat_and_a_chat_refreshed_since_are_settled_without_a_call() {
        let mut fresh = target(2);
        fresh.participants_updated_at = Some(at("2026-12-03T11:59:30Z"));
        let requests = [
            request(1, Priority::Lazy, "2026-12-03T11:59:00Z"),
            request(2, Priority::Manual, "2026-12-03T11:59:00Z"),
        ];
        let plan = planned(&requests, vec![fresh]);
        assert!(refreshed(&plan).is_empty());
        assert_eq!(plan.settled[&1].outcome, None, "deleted");
        assert_eq!(
            settled_as(&plan, 2),
            Some(None),
            "refreshed since it was asked"
        );
    }

    #[test]
    fn a_lazy_request_for_a_count_not_yet_due_is_settled_but_a_manual_one_asks() {
        let mut young = target(1);
        young.participants_updated_at = Some(at("2026-12-03T11:30:00Z"));
        let lazy = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:59:00Z")],
            vec![young.clone()],
        );
        assert!(refreshed(&lazy).is_empty());
        let manual = planned(
            &[request(1, Priority::Manual, "2026-12-03T11:59:00Z")],
            vec![young],
        );
        assert_eq!(refreshed(&manual), [1]);
    }

    #[test]
    fn a_manual_refresh_asks_about_a_chat_marked_unavailable_and_a_lazy_one_does_not() {
        let mut gone = target(1);
        gone.sync_status = Some(SyncStatus::Forbidden);
        gone.checked_at = Some(at("2026-12-03T11:00:00Z"));
        let lazy = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:59:00Z")],
            vec![gone.clone()],
        );
        assert_eq!(settled_as(&lazy, 1), Some(Some("chat_unavailable".into())));
        let manual = planned(
            &[
                request(1, Priority::Lazy, "2026-12-03T11:59:00Z"),
                request(1, Priority::Manual, "2026-12-03T11:59:30Z"),
            ],
            vec![gone],
        );
        assert_eq!(refreshed(&manual), [1]);
    }

    #[test]
    fn a_failing_chat_backs_off_lazy_requests_but_a_manual_one_asks() {
        let mut failing = target(1);
        failing.consecutive_failures = 3; // a 4-minute backoff from its last check
        failing.checked_at = Some(at("2026-12-03T11:58:00Z"));
        let new_read = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:59:00Z")],
            vec![failing.clone()],
        );
        assert_eq!(settled_as(&new_read, 1), Some(Some("backing_off".into())));
        assert!(new_read.settled[&1].left_alone, "its dedup marker stays");
        let redelivered = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:57:00Z")],
            vec![failing.clone()],
        );
        assert_eq!(
            settled_as(&redelivered, 1),
            Some(Some("backing_off".into())),
            "the request the failure answered is not redelivered to MAX either"
        );
        let manual = planned(
            &[request(1, Priority::Manual, "2026-12-03T11:59:00Z")],
            vec![failing.clone()],
        );
        assert_eq!(refreshed(&manual), [1]);
        failing.checked_at = Some(at("2026-12-03T11:50:00Z"));
        let after_backoff = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:59:00Z")],
            vec![failing],
        );
        assert_eq!(refreshed(&after_backoff), [1]);
    }

    #[test]
    fn manual_refreshes_are_asked_first_and_fresh_counts_bring_redis_up_to_postgres() {
        let mut fresh = target(3);
        fresh.participants_updated_at = Some(at("2026-12-03T11:59:00Z"));
        let plan = planned(
            &[
                request(1, Priority::Lazy, "2026-12-03T11:59:00Z"),
                request(2, Priority::Lazy, "2026-12-03T11:59:00Z"),
                request(9, Priority::Manual, "2026-12-03T11:59:00Z"),
                request(3, Priority::Lazy, "2026-12-03T11:59:00Z"),
            ],
            vec![target(1), target(2), fresh, target(9)],
        );
        assert_eq!(refreshed(&plan), [9, 1, 2]);
        assert!(
            plan.settled[&3].from_store,
            "a count Postgres holds goes to Redis"
        );
        assert!(!plan.settled[&3].left_alone, "and its marker goes");
    }

    #[test]
    fn the_refresh_carries_the_trace_of_a_request_that_had_one() {
        let mut traced = request(1, Priority::Manual, "2026-12-03T11:59:00Z");
        traced.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let plan = planned(
            &[request(1, Priority::Lazy, "2026-12-03T11:58:00Z"), traced],
            vec![target(1)],
        );
        assert!(plan.to_refresh[0].traceparent.is_some());
    }
}
