//! Refresh-and-wait, for `POST /chats/{id}/refresh-participants`: admit the caller, enqueue the
//! chat on the manual lane, and wait up to `PARTICIPANTS_REFRESH_WAIT` for syncd's outcome.
//! The handler only turns what comes back into a response.

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::state::AppState;

/// How a refresh request ended for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited {
    /// MAX gave the count in time.
    Updated {
        count: i32,
        /// When MAX was asked.
        at: DateTime<Utc>,
    },
    /// MAX would not give the count (the chat is gone, closed, the bot removed...), in time.
    Unavailable {
        reason: String,
        checked_at: DateTime<Utc>,
    },
    /// Enqueued; not done in time, or every place among the waiters was taken.
    Queued,
}

impl Waited {
    /// The label of `participants_refresh_waits_total`.
    fn outcome(&self, busy: bool) -> &'static str {
        match self {
            Waited::Updated { .. } => "updated",
            Waited::Unavailable { .. } => "unavailable",
            Waited::Queued if busy => "busy",
            Waited::Queued => "queued",
        }
    }
}

/// Asks syncd to refresh `chat_id` for `user` (the token's `sub`) and waits for the outcome.
/// Errors: the integration or Redis is off or down (503), the caller is past its rate (429).
pub async fn refresh_and_wait(
    state: &AppState,
    chat_id: i32,
    user: &str,
) -> Result<Waited, ApiError> {
    if !state.settings.integration_enabled {
        return Err(ApiError::RefreshUnavailable(
            "the participants integration is disabled",
        ));
    }
    if !state.cache.is_enabled() {
        return Err(ApiError::RefreshUnavailable("redis is disabled"));
    }
    state
        .refresh_gate
        .admit(user)
        .map_err(ApiError::TooManyRequests)?;
    // Any outcome published from now on is at most as old as this request: it comes from a
    // MAX call made either for this request or for one already in flight for the same chat.
    let outcomes = state.waiters.subscribe();
    let replicated = state
        .cache
        .enqueue_manual(
            chat_id,
            state.settings.refresh_wait,
            state.settings.redis_wait_replicas,
            shared::telemetry::current_traceparent().as_deref(),
        )
        .await
        .map_err(|_| ApiError::RefreshUnavailable("redis is unavailable"))?;
    if !replicated {
        // The request is in the stream but could vanish in a failover: do not acknowledge it.
        return Err(ApiError::RefreshUnavailable(
            "redis could not replicate the request; retry",
        ));
    }
    let metrics = &state.metrics.refresh_waits;
    // The request is in the stream either way; only a place among the waiters is capped.
    let Some(_waiting) = state.refresh_gate.try_wait() else {
        metrics
            .with_label_values(&[Waited::Queued.outcome(true)])
            .inc();
        return Ok(Waited::Queued);
    };
    let waited = tokio::time::timeout(state.settings.refresh_wait, outcome_of(outcomes, chat_id))
        .await
        .ok()
        .flatten()
        .unwrap_or(Waited::Queued);
    metrics.with_label_values(&[waited.outcome(false)]).inc();
    Ok(waited)
}

/// The first outcome published for `chat_id` that says something; `None` when the channel
/// closes (the api is stopping).
async fn outcome_of(
    mut outcomes: broadcast::Receiver<shared::refresh::RefreshOutcome>,
    chat_id: i32,
) -> Option<Waited> {
    loop {
        match outcomes.recv().await {
            Ok(outcome) if outcome.chat_id == chat_id => {
                if let Some(count) = outcome.participants_count {
                    return Some(Waited::Updated {
                        count,
                        at: outcome.updated_at,
                    });
                }
                if let Some(reason) = outcome.error {
                    return Some(Waited::Unavailable {
                        reason,
                        checked_at: outcome.updated_at,
                    });
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_metric_label() {
        let at = Utc::now();
        assert_eq!(Waited::Updated { count: 1, at }.outcome(false), "updated");
        assert_eq!(
            Waited::Unavailable {
                reason: "gone".into(),
                checked_at: at
            }
            .outcome(false),
            "unavailable"
        );
        assert_eq!(Waited::Queued.outcome(false), "queued");
        assert_eq!(Waited::Queued.outcome(true), "busy");
    }

    #[tokio::test]
    async fn the_wait_takes_the_first_outcome_of_its_own_chat() {
        let (sender, receiver) = broadcast::channel(8);
        let at = Utc::now();
        let outcome =
            |chat_id, count: Option<i32>, error: Option<&str>| shared::refresh::RefreshOutcome {
                chat_id,
                participants_count: count,
                updated_at: at,
                error: error.map(str::to_owned),
            };
        sender.send(outcome(2, Some(9), None)).unwrap();
        sender.send(outcome(1, None, None)).unwrap();
        sender.send(outcome(1, None, Some("removed"))).unwrap();
        assert_eq!(
            outcome_of(receiver, 1).await,
            Some(Waited::Unavailable {
                reason: "removed".into(),
                checked_at: at
            })
        );
        drop(sender);
    }
}
