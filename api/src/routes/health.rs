//! Liveness and dependency health. None of these needs a token.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use shared::health::{Dependency, Overall};
use shared::keys::status;
use utoipa::ToSchema;

use crate::postgres;
use crate::state::AppState;

/// A syncd replica whose heartbeat is older than this is not counted as alive.
const HEARTBEAT_FRESH: Duration = Duration::from_secs(60);
/// Most time a health check waits for Postgres.
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`
    #[schema(value_type = String)]
    pub status: Overall,
}

/// The process is up. Touches no dependency.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The process is alive", body = Liveness)))]
pub async fn health() -> Json<Liveness> {
    Json(Liveness {
        status: Overall::Ok,
    })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DependencyStatus {
    /// up, down, or disabled
    #[schema(value_type = String)]
    pub status: Dependency,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SyncdStatus {
    /// up (a replica beat in the last minute), down, or unknown (Redis cannot tell)
    #[schema(value_type = String)]
    pub status: Dependency,
    /// Replicas whose heartbeat is fresh
    pub replicas: usize,
    /// valid, invalid, or unknown: whether MAX last accepted the bot token
    pub max_token: String,
    pub max_last_success_at: Option<DateTime<Utc>>,
    pub max_last_error_at: Option<DateTime<Utc>>,
    pub max_last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadModelStatus {
    /// loaded, or loading (reads wait for the first load up to the request timeout)
    #[schema(value_type = String)]
    pub status: Loading,
    /// Chats held in memory
    pub chats: usize,
    /// Seconds since the chats were last known to match Postgres; null before the first load
    pub age_seconds: Option<f64>,
}

/// Whether the read model has loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loading {
    Loaded,
    Loading,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetailedHealth {
    /// ok (all up), degraded (serving, something is down), or unavailable (Postgres is down)
    #[schema(value_type = String)]
    pub status: Overall,
    pub database: DependencyStatus,
    pub redis: DependencyStatus,
    pub syncd: SyncdStatus,
    /// The in-memory chats reads are served from
    pub read_model: ReadModelStatus,
}

fn read_model_status(state: &AppState) -> ReadModelStatus {
    let model = &state.reads.model;
    let age = model.age();
    ReadModelStatus {
        status: if age.is_some() {
            Loading::Loaded
        } else {
            Loading::Loading
        },
        chats: model.n_chats(),
        age_seconds: age.map(|age| age.as_secs_f64()),
    }
}

fn millis(text: Option<&String>) -> Option<DateTime<Utc>> {
    text.and_then(|t| t.parse::<i64>().ok())
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

async fn syncd_status(state: &AppState) -> SyncdStatus {
    let unknown = SyncdStatus {
        status: Dependency::Unknown,
        replicas: 0,
        max_token: "unknown".to_owned(),
        max_last_success_at: None,
        max_last_error_at: None,
        max_last_error: None,
    };
    let Ok(fields) = state.cache.syncd_status().await else {
        return unknown;
    };
    let now = Utc::now();
    let replicas = fields
        .iter()
        .filter(|(name, _)| name.starts_with(status::HEARTBEAT_PREFIX))
        .filter_map(|(_, value)| millis(Some(value)))
        .filter(|beat| shared::counts::age(now, *beat) <= HEARTBEAT_FRESH)
        .count();
    SyncdStatus {
        status: Dependency::up_if(replicas > 0),
        replicas,
        max_token: fields
            .get(status::MAX_TOKEN)
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned()),
        max_last_success_at: millis(fields.get(status::MAX_LAST_SUCCESS_AT)),
        max_last_error_at: millis(fields.get(status::MAX_LAST_ERROR_AT)),
        max_last_error: fields.get(status::MAX_LAST_ERROR).cloned(),
    }
}

/// Every dependency's state. 200 while the api can serve (even from Postgres alone), 503 while
/// Postgres is down.
#[utoipa::path(get, path = "/health/detailed", tag = "health",
    responses(
        (status = 200, description = "The api can serve", body = DetailedHealth),
        (status = 503, description = "Postgres is down", body = DetailedHealth),
    ))]
pub async fn health_detailed(
    State(state): State<AppState>,
) -> (StatusCode, Json<serde_json::Value>) {
    let arrived = Instant::now();
    // One check at a time: callers queue here, and take the answer of a check that finished
    // after they arrived, or of one younger than API_HEALTH_DETAILED_CACHE. However many
    // call, Postgres and Redis are asked about once a second at most.
    let mut last = state.detailed_health.last.lock().await;
    if let Some(answer) = last.as_ref() {
        if answer.at >= arrived || answer.at.elapsed() < state.detailed_health.ttl {
            return (answer.code, Json(answer.body.clone()));
        }
    }
    let (code, body) = check_dependencies(&state).await;
    let body = serde_json::to_value(body).unwrap_or_default();
    *last = Some(DetailedAnswer {
        at: Instant::now(),
        code,
        body: body.clone(),
    });
    (code, Json(body))
}

/// The last `/health/detailed` answer, reused for `ttl`.
pub struct DetailedHealthCache {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<DetailedAnswer>>,
}

struct DetailedAnswer {
    at: Instant,
    code: StatusCode,
    body: serde_json::Value,
}

impl DetailedHealthCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }
}

async fn check_dependencies(state: &AppState) -> (StatusCode, DetailedHealth) {
    state.metrics.health_checks.inc();
    let database_up = matches!(
        tokio::time::timeout(DATABASE_CHECK_TIMEOUT, postgres::ping(&state.db)).await,
        Ok(Ok(()))
    );
    let redis = redis_status(state).await;
    let syncd = syncd_status(state).await;
    let all_up = state.reads.model.is_loaded()
        && database_up
        && redis == Dependency::Up
        && syncd.status == Dependency::Up
        && syncd.max_token != "invalid";
    let (code, status) = match (database_up, all_up) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, Overall::Unavailable),
        (true, true) => (StatusCode::OK, Overall::Ok),
        (true, false) => (StatusCode::OK, Overall::Degraded),
    };
    (
        code,
        DetailedHealth {
            status,
            database: DependencyStatus {
                status: Dependency::up_if(database_up),
            },
            redis: DependencyStatus { status: redis },
            syncd,
            read_model: read_model_status(state),
        },
    )
}

async fn redis_status(state: &AppState) -> Dependency {
    if !state.cache.is_enabled() {
        Dependency::Disabled
    } else {
        Dependency::up_if(state.cache.ping().await)
    }
}

/// Redis' state: 200 while it answers, 503 while it is down or disabled.
#[utoipa::path(get, path = "/health/redis", tag = "health",
    responses(
        (status = 200, description = "Redis answers", body = DependencyStatus),
        (status = 503, description = "Redis is down, or disabled by DISABLE_REDIS", body = DependencyStatus),
    ))]
pub async fn health_redis(State(state): State<AppState>) -> (StatusCode, Json<DependencyStatus>) {
    let status = redis_status(&state).await;
    let code = if status == Dependency::Up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(DependencyStatus { status }))
}

/// Readiness: 200 once the chats have loaded, and from then on while Postgres is down (reads are
/// served from memory, so a Postgres outage must not pull every replica out of the load
/// balancer); 503 before the first load, and when the chats have not been in step with
/// Postgres for READ_MODEL_MAX_AGE although the primary answers: then this replica's sync is
/// stuck, not Postgres, and the replicas that follow it should serve instead.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "The api serves reads", body = ReadModelStatus),
        (status = 503, description = "The chats have not loaded yet, or have not followed the answering primary for READ_MODEL_MAX_AGE", body = ReadModelStatus),
    ))]
pub async fn health_ready(State(state): State<AppState>) -> (StatusCode, Json<ReadModelStatus>) {
    let status = read_model_status(&state);
    let max_age = state.settings.read_model_max_age;
    let ready = match state.reads.model.age() {
        None => false,
        Some(age) if max_age.is_zero() || age <= max_age => true,
        // Only a stale model needs a query: a probe every few seconds costs nothing otherwise.
        Some(_) => !matches!(
            tokio::time::timeout(DATABASE_CHECK_TIMEOUT, postgres::primary_answers(&state.db))
                .await,
            Ok(Ok(true))
        ),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detailed_health_json_is_spelled_as_before() {
        let at = Utc.timestamp_millis_opt(1_700_000_000_000).unwrap();
        let health = DetailedHealth {
            status: Overall::Degraded,
            database: DependencyStatus {
                status: Dependency::Up,
            },
            redis: DependencyStatus {
                status: Dependency::Disabled,
            },
            syncd: SyncdStatus {
                status: Dependency::Unknown,
                replicas: 0,
                max_token: "unknown".to_owned(),
                max_last_success_at: Some(at),
                max_last_error_at: None,
                max_last_error: None,
            },
            read_model: ReadModelStatus {
                status: Loading::Loading,
                chats: 0,
                age_seconds: None,
            },
        };
        assert_eq!(
            serde_json::to_string(&health).unwrap(),
            r#"{"status":"degraded","database":{"status":"up"},"redis":{"status":"disabled"},"syncd":{"status":"unknown","replicas":0,"max_token":"unknown","max_last_success_at":"2023-11-14T22:13:20Z","max_last_error_at":null,"max_last_error":null},"read_model":{"status":"loading","chats":0,"age_seconds":null}}"#
        );
        let live = Liveness {
            status: Overall::Ok,
        };
        assert_eq!(serde_json::to_string(&live).unwrap(), r#"{"status":"ok"}"#);
        let loaded = ReadModelStatus {
            status: Loading::Loaded,
            chats: 3,
            age_seconds: Some(1.5),
        };
        assert_eq!(
            serde_json::to_string(&loaded).unwrap(),
            r#"{"status":"loaded","chats":3,"age_seconds":1.5}"#
        );
    }
}
