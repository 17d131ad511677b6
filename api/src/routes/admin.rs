//! Operator endpoints (`super_admin` only): schedule a full sweep, and check for drift.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::postgres;
use crate::state::AppState;

const DEFAULT_SAMPLE: i64 = 100;
const MAX_SAMPLE: i64 = 1000;
/// Most differing chats listed in a validation report.
const MAX_LISTED: usize = 50;

#[derive(Debug, Serialize, ToSchema)]
pub struct FullUpdateScheduled {
    /// Always `scheduled`
    pub status: &'static str,
    pub requested_at: DateTime<Utc>,
}

/// Schedule a full sweep now; a syncd replica starts it within seconds.
#[utoipa::path(
    post, path = "/admin/participants/full-update", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Scheduled", body = FullUpdateScheduled),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a super_admin", body = ErrorBody),
        (status = 503, description = "Redis is unavailable", body = ErrorBody),
    )
)]
pub async fn schedule_full_update(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<(StatusCode, Json<FullUpdateScheduled>), ApiError> {
    principal.require_super_admin()?;
    let requested_at = Utc::now();
    state
        .cache
        .request_full_sweep(requested_at)
        .await
        .map_err(|_| ApiError::RefreshUnavailable("redis is unavailable"))?;
    tracing::info!(user.id = %principal.user_id, "full sweep requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(FullUpdateScheduled {
            status: "scheduled",
            requested_at,
        }),
    ))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ValidateParams {
    /// Chats to sample, 1 to 1000 (default 100)
    #[param(value_type = Option<i64>)]
    pub sample_size: Option<String>,
}

/// One chat whose stores disagree.
#[derive(Debug, Serialize, ToSchema)]
pub struct Drift {
    pub chat_id: i32,
    /// What Redis holds, if anything
    pub redis: Option<i32>,
    /// `chats.participants_count`, what the fallback serves
    pub postgres: Option<i32>,
    /// The latest count MAX gave syncd
    pub max: Option<i32>,
    pub max_asked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationReport {
    pub sample_size: i64,
    /// Sampled chats syncd has a MAX answer for
    pub with_max_answer: usize,
    /// Sampled chats with a value in Redis (within the cache TTL)
    pub in_redis: usize,
    /// Redis holds a value different from the latest MAX answer
    pub redis_differs_from_max: usize,
    /// `chats.participants_count` differs from the latest MAX answer
    pub postgres_differs_from_max: usize,
    /// A MAX answer exists but Redis has nothing (expired or evicted)
    pub missing_in_redis: usize,
    /// Redis could not be read; Redis figures are then zero
    pub redis_available: bool,
    /// Up to 50 of the chats that differ
    pub drift: Vec<Drift>,
}

/// Compare a random sample of Redis values with Postgres and with the latest MAX answers.
#[utoipa::path(
    get, path = "/admin/participants/validate", tag = "admin",
    params(ValidateParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Drift report", body = ValidationReport),
        (status = 400, description = "sample_size is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a super_admin", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable", body = ErrorBody),
    )
)]
pub async fn validate_participants(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<ValidateParams>, QueryRejection>,
) -> Result<Json<ValidationReport>, ApiError> {
    principal.require_super_admin()?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let sample_size = match params.sample_size.as_deref().map(str::trim) {
        None | Some("") => DEFAULT_SAMPLE,
        Some(text) => text
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest("sample_size must be an integer".to_owned()))?
            .clamp(1, MAX_SAMPLE),
    };
    let sample = postgres::sample_sync_state(&state.db, sample_size).await?;
    let ids: Vec<i32> = sample.iter().map(|row| row.chat_id).collect();
    let cached = state.cache.read_counts(&ids).await.ok();
    let ttl = state.reads.freshness.cache_ttl;
    let now = Utc::now();
    let mut report = ValidationReport {
        sample_size,
        with_max_answer: 0,
        in_redis: 0,
        redis_differs_from_max: 0,
        postgres_differs_from_max: 0,
        missing_in_redis: 0,
        redis_available: cached.is_some(),
        drift: Vec::new(),
    };
    for row in sample {
        let redis = cached
            .as_ref()
            .and_then(|map| map.get(&row.chat_id))
            .filter(|value| !value.is_expired(now, ttl))
            .map(|value| value.count);
        report.in_redis += usize::from(redis.is_some());
        let Some(max) = row.max_count else { continue };
        report.with_max_answer += 1;
        let redis_differs = redis.is_some_and(|value| value != max);
        let postgres_differs = row.legacy_count != Some(max);
        report.redis_differs_from_max += usize::from(redis_differs);
        report.postgres_differs_from_max += usize::from(postgres_differs);
        report.missing_in_redis += usize::from(cached.is_some() && redis.is_none());
        if (redis_differs || postgres_differs) && report.drift.len() < MAX_LISTED {
            report.drift.push(Drift {
                chat_id: row.chat_id,
                redis,
                postgres: row.legacy_count,
                max: Some(max),
                max_asked_at: row.max_asked_at,
            });
        }
    }
    Ok(Json(report))
}
