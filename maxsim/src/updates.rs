//! `GET /updates`, MAX's long polling, with the marker semantics of `schema_2026_05_07` on:
//! without a marker (or `marker=null`) only the newest update comes back; a marker commits
//! (drops) every update before it. Production limits: a batch of at most 100, 2 requests a
//! second, updates kept 24 hours (scaled by `time_scale`). While a webhook subscription is
//! active, long polling does not work: 405 `method.not.allowed` (the schema lists 405 among the
//! answers of `GET /updates`; what MAX answers is undocumented).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::{admit_into, error, too_many_requests, Simulator};

/// The largest batch MAX answers, whatever `limit` asks.
const MAX_BATCH: usize = 100;

struct Queued {
    /// Its place in the queue: a marker `m` commits every update with `position < m`.
    position: u64,
    at: Instant,
    update_type: String,
    update: Value,
}

pub(crate) struct UpdateQueue {
    items: VecDeque<Queued>,
    next_position: u64,
    window: VecDeque<Instant>,
    /// Long polls being answered now.
    in_flight: usize,
    /// Wakes the long polls waiting for an update.
    pub(crate) arrived: Arc<Notify>,
}

impl Default for UpdateQueue {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            next_position: 1,
            window: VecDeque::new(),
            in_flight: 0,
            arrived: Arc::new(Notify::new()),
        }
    }
}

impl UpdateQueue {
    pub(crate) fn push(&mut self, update: Value) {
        let update_type = update["update_type"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.items.push_back(Queued {
            position: self.next_position,
            at: Instant::now(),
            update_type,
            update,
        });
        self.next_position += 1;
        self.arrived.notify_waiters();
    }

    fn drop_older_than(&mut self, retention: Duration) {
        while self
            .items
            .front()
            .is_some_and(|item| item.at.elapsed() > retention)
        {
            self.items.pop_front();
        }
    }

    /// The batch for one request, or `None` when there is nothing for it yet. A marker first
    /// commits what is before it.
    fn take(
        &mut self,
        marker: Option<u64>,
        limit: usize,
        types: Option<&[String]>,
    ) -> Option<(Vec<Value>, u64)> {
        let wanted = |item: &Queued| types.is_none_or(|types| types.contains(&item.update_type));
        match marker {
            None => {
                let last = self.items.iter().rev().find(|item| wanted(item))?;
                Some((vec![last.update.clone()], last.position + 1))
            }
            Some(marker) => {
                while self
                    .items
                    .front()
                    .is_some_and(|item| item.position < marker)
                {
                    self.items.pop_front();
                }
                let batch: Vec<&Queued> = self
                    .items
                    .iter()
                    .filter(|item| wanted(item))
                    .take(limit)
                    .collect();
                let next = batch.last()?.position + 1;
                Some((batch.iter().map(|item| item.update.clone()).collect(), next))
            }
        }
    }

    /// How many updates are queued (committed ones are gone).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.len()
    }
}

#[derive(Deserialize)]
pub(crate) struct UpdatesQuery {
    limit: Option<String>,
    timeout: Option<String>,
    marker: Option<String>,
    types: Option<String>,
}

struct Asked {
    limit: usize,
    timeout: Duration,
    marker: Option<u64>,
    types: Option<Vec<String>>,
}

fn parse(query: UpdatesQuery) -> Result<Asked, String> {
    let number = |text: Option<String>, name: &str, low: u64, high: u64, default: u64| {
        let Some(text) = text else {
            return Ok(default);
        };
        match text.parse::<u64>() {
            Ok(value) if (low..=high).contains(&value) => Ok(value),
            _ => Err(format!("{name} must be an integer in {low}..{high}")),
        }
    };
    let limit = number(query.limit, "limit", 1, 1000, 100)? as usize;
    let timeout = Duration::from_secs(number(query.timeout, "timeout", 0, 90, 30)?);
    let marker = match query.marker.as_deref() {
        None | Some("") | Some("null") => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| "marker must be an integer".to_owned())?,
        ),
    };
    let types = query.types.filter(|t| !t.is_empty()).map(|types| {
        types
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    });
    Ok(Asked {
        limit: limit.min(MAX_BATCH),
        timeout,
        marker,
        types,
    })
}

pub(crate) async fn get_updates(
    State(sim): State<Simulator>,
    Query(query): Query<UpdatesQuery>,
    headers: HeaderMap,
) -> Response {
    let deadline = {
        let mut state = sim.lock();
        state.stats.requests += 1;
        if let Some(refused) = state.refuse_token(&headers) {
            return refused;
        }
        if state.delivery.has_subscriptions() {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method.not.allowed",
                "long polling does not work while a webhook subscription is active",
            );
        }
        let limit = state.config.updates_rate_limit;
        if !admit_into(&mut state.updates.window, limit) {
            state.stats.rate_limited += 1;
            return too_many_requests();
        }
        state.updates.in_flight += 1;
        state.stats.updates_polls += 1;
        state.stats.updates_max_in_flight = state
            .stats
            .updates_max_in_flight
            .max(state.updates.in_flight);
        Instant::now()
    };
    let _in_flight = InFlight(sim.clone());
    let asked = match parse(query) {
        Ok(asked) => asked,
        Err(message) => return error(StatusCode::BAD_REQUEST, "proto.payload", &message),
    };
    let deadline = deadline + asked.timeout;
    loop {
        let arrived = sim.lock().updates.arrived.clone();
        let notified = arrived.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut state = sim.lock();
            let retention = state.config.scaled(state.config.updates_retention_secs);
            state.updates.drop_older_than(retention);
            let taken = state
                .updates
                .take(asked.marker, asked.limit, asked.types.as_deref());
            if let Some((updates, marker)) = taken {
                return answer(updates, marker);
            }
            if Instant::now() >= deadline {
                let marker = asked.marker.unwrap_or(state.updates.next_position);
                return answer(Vec::new(), marker);
            }
        }
        let _ = tokio::time::timeout_at(deadline.into(), notified).await;
    }
}

/// Counts a long poll out of `in_flight` however it ends.
struct InFlight(Simulator);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.updates.in_flight = state.updates.in_flight.saturating_sub(1);
    }
}

fn answer(updates: Vec<Value>, marker: u64) -> Response {
    Json(json!({"updates": updates, "marker": marker})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue_of(types: &[&str]) -> UpdateQueue {
        let mut queue = UpdateQueue::default();
        for (n, update_type) in types.iter().enumerate() {
            queue.push(json!({"update_type": update_type, "n": n}));
        }
        queue
    }

    fn numbers(updates: &[Value]) -> Vec<u64> {
        updates.iter().map(|u| u["n"].as_u64().unwrap()).collect()
    }

    #[test]
    fn without_a_marker_only_the_newest_update_comes_and_nothing_is_committed() {
        let mut queue = queue_of(&["user_added", "user_removed", "user_added"]);
        let (updates, marker) = queue.take(None, 100, None).unwrap();
        assert_eq!((numbers(&updates), marker), (vec![2], 4));
        assert_eq!(queue.len(), 3, "a request without a marker commits nothing");
        // The marker it gave commits the two earlier ones, never delivered: the backlog is lost.
        assert_eq!(queue.take(Some(marker), 100, None), None);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_marker_commits_everything_before_it_and_pages_by_the_limit() {
        let mut queue = queue_of(&["a", "b", "c", "d", "e"]);
        let (updates, marker) = queue.take(Some(1), 2, None).unwrap();
        assert_eq!((numbers(&updates), marker), (vec![0, 1], 3));
        assert_eq!(queue.len(), 5, "nothing committed before the marker 1");
        let (updates, marker) = queue.take(Some(marker), 2, None).unwrap();
        assert_eq!((numbers(&updates), marker), (vec![2, 3], 5));
        assert_eq!(queue.len(), 3, "the marker 3 committed the first two");
        // Asking again with an old marker repeats what was not committed.
        let (updates, _) = queue.take(Some(3), 100, None).unwrap();
        assert_eq!(numbers(&updates), vec![2, 3, 4]);
    }

    #[test]
    fn types_filter_the_batch() {
        let mut queue = queue_of(&["user_added", "message_created", "user_removed"]);
        let types = vec!["user_removed".to_owned()];
        let (updates, marker) = queue.take(Some(1), 100, Some(&types)).unwrap();
        assert_eq!((numbers(&updates), marker), (vec![2], 4));
        let (updates, _) = queue.take(None, 100, Some(&types)).unwrap();
        assert_eq!(numbers(&updates), vec![2]);
    }

    #[test]
    fn limits_outside_the_schema_are_refused_and_the_batch_is_capped_at_100() {
        let query = |limit: &str, timeout: &str| UpdatesQuery {
            limit: Some(limit.to_owned()),
            timeout: Some(timeout.to_owned()),
            marker: Some("null".to_owned()),
            types: Some("user_added,user_removed".to_owned()),
        };
        let asked = parse(query("1000", "90")).unwrap();
        assert_eq!(asked.limit, 100);
        assert_eq!(asked.marker, None);
        assert_eq!(asked.types.unwrap(), vec!["user_added", "user_removed"]);
        assert!(parse(query("0", "30")).is_err());
        assert!(parse(query("1001", "30")).is_err());
        assert!(parse(query("10", "91")).is_err());
    }

    #[test]
    fn updates_past_the_retention_are_dropped() {
        let mut queue = queue_of(&["a", "b"]);
        queue.items[0].at -= Duration::from_secs(10);
        queue.drop_older_than(Duration::from_secs(5));
        assert_eq!(queue.len(), 1);
    }
}
