//! syncd's own HTTP surface on `SYNCD_LISTEN_ADDR`: `/metrics`, `/health` (readiness: can
//! this replica refresh counts) and `/health/live` (liveness: is the process still going round).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use serde::Serialize;
use shared::health::{Dependency, Overall};
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::token::TokenState;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub token: TokenState,
    pub db: PgPool,
    pub redis: Client,
    pub consumer: String,
    pub liveness: Liveness,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .with_state(state)
}

/// When the stream consumer's loop last went round. Every round ends within seconds, whatever
/// Redis, Postgres or MAX do (reads block for a second, failures wait a second, a batch's
/// calls are bounded by their timeouts and retries), so a loop that has not gone round for
/// `WEDGED_AFTER` is stuck: `/health/live` then fails and Kubernetes restarts the pod. An open
/// port alone says nothing of that.
#[derive(Clone)]
pub struct Liveness {
    origin: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

/// How long the consumer loop may go without a round before the process counts as wedged;
/// well beyond the slowest honest batch (50 calls waiting out 30 s pauses and their retries).
pub const WEDGED_AFTER: Duration = Duration::from_secs(300);

impl Default for Liveness {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Liveness {
    /// The loop went round.
    pub fn tick(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last round.
    pub fn since_last_round(&self) -> Duration {
        self.origin
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// 200 while the consumer loop goes round; 503 once it has not for `WEDGED_AFTER`.
async fn live(State(state): State<HttpState>) -> (StatusCode, Json<serde_json::Value>) {
    let idle = state.liveness.since_last_round();
    let wedged = idle >= WEDGED_AFTER;
    if wedged {
        tracing::error!(
            idle_s = idle.as_secs(),
            "the stream consumer has not gone round; reporting not live so the pod is restarted"
        );
    }
    (
        if wedged {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        },
        Json(serde_json::json!({
            "status": if wedged { LiveState::Wedged } else { LiveState::Ok },
            "consumer_idle_s": idle.as_secs(),
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_json_is_spelled_as_before() {
        let health = Health {
            status: Overall::Degraded,
            consumer: "syncd-1".to_owned(),
            database: Dependency::Up,
            redis: Dependency::Down,
            max_token: MaxToken::Invalid,
        };
        assert_eq!(
            serde_json::to_string(&health).unwrap(),
            r#"{"status":"degraded","consumer":"syncd-1","database":"up","redis":"down","max_token":"invalid"}"#
        );
        assert_eq!(
            serde_json::to_string(&[LiveState::Ok, LiveState::Wedged]).unwrap(),
            r#"["ok","wedged"]"#
        );
        assert_eq!(
            serde_json::to_string(&MaxToken::Valid).unwrap(),
            r#""valid""#
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stops_going_round_is_reported_after_the_bound_and_not_before() {
        let liveness = Liveness::default();
        liveness.tick();
        tokio::time::advance(WEDGED_AFTER - Duration::from_secs(1)).await;
        assert!(liveness.since_last_round() < WEDGED_AFTER);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(liveness.since_last_round() >= WEDGED_AFTER);
        liveness.tick();
        assert_eq!(liveness.since_last_round(), Duration::ZERO);
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

#[derive(Serialize)]
struct Health {
    /// ok, or degraded when a dependency is down or MAX rejects the token
    status: Overall,
    consumer: String,
    database: Dependency,
    redis: Dependency,
    max_token: MaxToken,
}

/// Whether MAX last accepted the bot token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum MaxToken {
    Valid,
    Invalid,
}

/// The stream consumer's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum LiveState {
    Ok,
    Wedged,
}

/// 200 while this replica can refresh counts; 503 (with the reason) while it cannot: Postgres
/// or Redis down, or MAX rejecting the bot token.
async fn health(State(state): State<HttpState>) -> (StatusCode, Json<Health>) {
    let timeout = Duration::from_secs(2);
    let database_up = matches!(
        tokio::time::timeout(timeout, crate::store::ping(&state.db)).await,
        Ok(Ok(_))
    );
    let redis_up = matches!(
        tokio::time::timeout(timeout, state.redis.ping::<String>(None)).await,
        Ok(Ok(_))
    );
    let token_valid = state.token.reported_valid();
    let ok = database_up && redis_up && token_valid;
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Health {
            status: if ok { Overall::Ok } else { Overall::Degraded },
            consumer: state.consumer.clone(),
            database: Dependency::up_if(database_up),
            redis: Dependency::up_if(redis_up),
            max_token: if token_valid {
                MaxToken::Valid
            } else {
                MaxToken::Invalid
            },
        }),
    )
}
