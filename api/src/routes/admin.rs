//! Operator endpoints (`super_admin` only): schedule a full sweep, list the sweeps with their
//! progress, and check for drift.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::sweeps::{self, Requested, StartedBy, SweepKind, SweepRecord, SweepState};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, ErrorDetail};
use crate::postgres;
use crate::state::AppState;

const DEFAULT_SWEEPS: i64 = 20;
const MAX_SWEEPS: i64 = 200;
const DEFAULT_SAMPLE: i64 = 100;
const MAX_SAMPLE: i64 = 1000;
/// Most differing chats listed in a validation report.
const MAX_LISTED: usize = 50;

/// A count from the query: `default` when absent or empty, clamped to 1..=`max`, 400 when it is
/// not an integer.
fn count_param(value: Option<&str>, name: &str, default: i64, max: i64) -> Result<i64, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse::<i64>()
            .map(|n| n.clamp(1, max))
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer"))),
    }
}

/// One sweep, as the admin panel shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SweepView {
    /// `stale` or `full`
    #[schema(value_type = String, example = "full")]
    pub kind: SweepKind,
    /// The cron slot it serves, or the moment it was asked for
    pub slot: DateTime<Utc>,
    /// `waiting`, `running`, `orphaned` (its replica stopped; another resumes it within
    /// seconds), `finished`, or `covered` (its slot came while another sweep of its kind ran,
    /// which served it)
    #[schema(value_type = String, example = "running")]
    pub state: SweepState,
    /// `schedule`, `command` (`syncd sweep`), `admin`, or null for rows of older releases
    #[schema(value_type = Option<String>, example = "schedule")]
    pub started_by: Option<StartedBy>,
    /// The admin's user id, for a sweep an admin asked for
    pub requested_by: Option<String>,
    /// The syncd replica running it
    pub owner: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// For a covered slot: the slot of the sweep that served it
    pub covered_by: Option<DateTime<Utc>>,
    /// Chats the sweep will ask about (null until a replica starts it)
    pub planned: Option<i32>,
    /// Chats done so far
    pub done: i32,
    /// Chats that got no count (MAX errors, after retries)
    pub errors: i32,
    /// MAX calls made, one per chat asked
    pub calls: i32,
    /// Share of the planned chats done, 0 to 1 (null until planned)
    pub progress: Option<f64>,
}

impl From<SweepRecord> for SweepView {
    fn from(record: SweepRecord) -> Self {
        Self {
            kind: record.kind,
            slot: record.slot,
            state: record.state(),
            started_by: record.started_by(),
            progress: record.progress(),
            requested_by: record.requested_by,
            owner: record.owner,
            started_at: record.started_at,
            finished_at: record.finished_at,
            covered_by: record.covered_by,
            planned: record.planned,
            done: record.done,
            errors: record.failed,
            calls: record.calls,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FullUpdateScheduled {
    /// Always `scheduled`
    pub status: &'static str,
    pub requested_at: DateTime<Utc>,
    pub sweep: SweepView,
}

/// A full sweep is already running or waiting: the error, and that sweep's progress.
#[derive(Serialize, ToSchema)]
pub struct FullUpdateRunning {
    pub error: ErrorDetail,
    pub sweep: SweepView,
}

/// Schedule a full sweep now; a syncd replica starts it within seconds. While a full sweep is
/// running (scheduled or asked for), another is not added: the answer is 409 with its progress.
#[utoipa::path(
    post, path = "/admin/participants/full-update", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Scheduled", body = FullUpdateScheduled),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a super_admin", body = ErrorBody),
        (status = 409, description = "A full sweep is already running", body = FullUpdateRunning),
        (status = 503, description = "Postgres is unavailable", body = ErrorBody),
    )
)]
pub async fn schedule_full_update(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    principal.require_super_admin()?;
    let requested = sweeps::request(
        &state.db,
        SweepKind::Full,
        StartedBy::Admin,
        Some(&principal.user_id),
    )
    .await?;
    Ok(match requested {
        Requested::Recorded(sweep) => {
            tracing::info!(user.id = %principal.user_id, slot = %sweep.slot, "full sweep requested");
            (
                StatusCode::ACCEPTED,
                Json(FullUpdateScheduled {
                    status: "scheduled",
                    requested_at: sweep.slot,
                    sweep: sweep.into(),
                }),
            )
                .into_response()
        }
        Requested::AlreadyRunning(sweep) => (
            StatusCode::CONFLICT,
            Json(FullUpdateRunning {
                error: ErrorDetail {
                    code: "sweep_running",
                    message: format!(
                        "a full sweep is already {}: {} of {} chats done",
                        match sweep.state() {
                            SweepState::Waiting => "waiting to start",
                            _ => "running",
                        },
                        sweep.done,
                        sweep.planned.map_or("?".to_owned(), |p| p.to_string()),
                    ),
                },
                sweep: sweep.into(),
            }),
        )
            .into_response(),
    })
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SweepsParams {
    /// Recent sweeps to list besides the unfinished ones, 1 to 200 (default 20)
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SweepList {
    /// The unfinished sweeps and the most recent ones, newest slot first
    pub sweeps: Vec<SweepView>,
}

/// The running and recent sweeps, with their progress.
#[utoipa::path(
    get, path = "/admin/participants/sweeps", tag = "admin",
    params(SweepsParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Sweeps", body = SweepList),
        (status = 400, description = "limit is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a super_admin", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable", body = ErrorBody),
    )
)]
pub async fn list_sweeps(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<SweepsParams>, QueryRejection>,
) -> Result<Json<SweepList>, ApiError> {
    principal.require_super_admin()?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = count_param(params.limit.as_deref(), "limit", DEFAULT_SWEEPS, MAX_SWEEPS)?;
    let records = sweeps::recent(&state.db, limit).await?;
    Ok(Json(SweepList {
        sweeps: records.into_iter().map(SweepView::from).collect(),
    }))
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
    let sample_size = count_param(
        params.sample_size.as_deref(),
        "sample_size",
        DEFAULT_SAMPLE,
        MAX_SAMPLE,
    )?;
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
