//! `GET /chats/all`, `GET /chats/{id}` and `POST /chats/{id}/refresh-participants`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::refresh::Priority;
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::chats::{self, ChatRow, ListQuery, SortColumn, SortOrder};
use crate::error::{ApiError, ErrorBody};
use crate::participants::{enrich, ChatView, Freshness};
use crate::state::AppState;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 100;
const MAX_SEARCH_WORDS: usize = 16;
const MAX_SEARCH_WORD_CHARS: usize = 200;

/// Query of `GET /chats/all`, as the legacy service took it.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size: absent, empty, zero or negative means 50; more than 100 means 100
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// Rows to skip; negative means 0
    #[param(value_type = Option<i64>)]
    pub offset: Option<String>,
    /// One of id, name, url, max_chat_id, participants_count, department, source, created_at,
    /// updated_at; anything else means name
    pub sort_by: Option<String>,
    /// asc or desc; anything else means asc
    pub sort_order: Option<String>,
    /// Words that must all occur, case-insensitively, in name, department, max_chat_id or source
    pub search: Option<String>,
}

/// One page of chats.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatPage {
    pub data: Vec<ChatView>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
    /// At least 1, even when there are no chats
    pub total_pages: i64,
}

fn parse_number(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer"))),
    }
}

/// Applies the legacy defaults and clamps to a raw query.
pub fn parse_list_query(params: &ListParams) -> Result<ListQuery, ApiError> {
    let limit = match parse_number("limit", params.limit.as_deref())? {
        Some(n) if n > MAX_LIMIT => MAX_LIMIT,
        Some(n) if n > 0 => n,
        _ => DEFAULT_LIMIT,
    };
    let offset = parse_number("offset", params.offset.as_deref())?
        .unwrap_or(0)
        .max(0);
    let sort = params
        .sort_by
        .as_deref()
        .and_then(|text| SortColumn::parse(text.trim()))
        .unwrap_or(SortColumn::Name);
    let order = match params.sort_order.as_deref().map(str::trim) {
        Some(text) if text.eq_ignore_ascii_case("desc") => SortOrder::Desc,
        _ => SortOrder::Asc,
    };
    let words: Vec<String> = params
        .search
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if words.len() > MAX_SEARCH_WORDS {
        return Err(ApiError::BadRequest(format!(
            "search may have at most {MAX_SEARCH_WORDS} words"
        )));
    }
    if words
        .iter()
        .any(|word| word.chars().count() > MAX_SEARCH_WORD_CHARS)
    {
        return Err(ApiError::BadRequest(format!(
            "search words may be at most {MAX_SEARCH_WORD_CHARS} characters long"
        )));
    }
    Ok(ListQuery {
        limit,
        offset,
        sort,
        order,
        words,
    })
}

/// Turns rows into the response shape: counts from Redis when it has them, from Postgres
/// otherwise, and stale ones enqueued in the background.
async fn present(state: &AppState, rows: Vec<ChatRow>) -> Vec<ChatView> {
    let settings = &state.settings;
    let use_redis = settings.integration_enabled && state.cache.is_enabled();
    let cached = if use_redis && !rows.is_empty() {
        let ids: Vec<i32> = rows.iter().map(|row| row.id).collect();
        match state.cache.read_counts(&ids).await {
            Ok(found) => Some(found),
            Err(_) => {
                state.metrics.fallback_usage.inc();
                None
            }
        }
    } else {
        None
    };
    let freshness = Freshness {
        lazy_update: settings.freshness.lazy_update && use_redis && state.cache.is_available(),
        ..settings.freshness
    };
    let enriched = enrich(rows, cached.as_ref(), Utc::now(), freshness);
    let metrics = &state.metrics;
    metrics.cache_hits.inc_by(enriched.hits);
    metrics.cache_misses.inc_by(enriched.misses);
    metrics.stale_served.inc_by(enriched.stale);
    for age in &enriched.ages {
        metrics.data_freshness.observe(*age);
    }
    if !enriched.to_refresh.is_empty() {
        let cache = state.cache.clone();
        let ttl = settings.refresh_dedup_ttl;
        let ids = enriched.to_refresh;
        let traceparent = shared::telemetry::current_traceparent();
        tokio::spawn(async move {
            // A failure trips the circuit and is counted there; the next read enqueues again.
            let _ = cache
                .enqueue(Priority::Lazy, &ids, ttl, traceparent.as_deref())
                .await;
        });
    }
    enriched.chats
}

/// List chats, page by page, with fresh participant counts.
#[utoipa::path(
    get, path = "/chats/all", tag = "chats",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of chats", body = ChatPage),
        (status = 400, description = "limit or offset is not an integer", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or wrongly signed token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable; retry after the Retry-After header", body = ErrorBody),
    )
)]
pub async fn list_chats(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ChatPage>, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = parse_list_query(&params)?;
    let (rows, total) = chats::list(&state.db, principal.scope, &query).await?;
    let data = present(&state, rows).await;
    let total_pages = ((total + query.limit - 1) / query.limit).max(1);
    Ok(Json(ChatPage {
        data,
        total,
        limit: query.limit,
        offset: query.offset,
        total_pages,
    }))
}

/// Parses a path id: 400 when it is not a number, `None` when no chat can have it.
fn parse_chat_id(text: &str) -> Result<Option<i32>, ApiError> {
    let id: i64 = text
        .trim()
        .parse()
        .map_err(|_| ApiError::BadRequest("chat id must be an integer".to_owned()))?;
    Ok(i32::try_from(id).ok())
}

async fn find_chat(state: &AppState, principal: &Principal, id: &str) -> Result<ChatRow, ApiError> {
    let Some(id) = parse_chat_id(id)? else {
        return Err(ApiError::NotFound("chat"));
    };
    chats::get(&state.db, principal.scope, id)
        .await?
        .ok_or(ApiError::NotFound("chat"))
}

/// One chat, in the same shape as in the list.
#[utoipa::path(
    get, path = "/chats/{id}", tag = "chats",
    params(("id" = i64, Path, description = "chats.id (not the MAX chat id)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat", body = ChatView),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 404, description = "No such chat in the caller's scope", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable", body = ErrorBody),
    )
)]
pub async fn get_chat(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ChatView>, ApiError> {
    let row = find_chat(&state, &principal, &id).await?;
    let mut chats = present(&state, vec![row]).await;
    Ok(Json(chats.remove(0)))
}

/// The refresh finished in time.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefreshUpdated {
    /// Always `updated`
    pub status: &'static str,
    pub chat_id: i32,
    pub participants_count: i32,
    /// When MAX was asked
    pub updated_at: DateTime<Utc>,
    /// Always `api`: the count came from the MAX API just now
    pub source: &'static str,
}

/// The refresh is enqueued and will finish after the response.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefreshQueued {
    /// Always `queued`
    pub status: &'static str,
    pub chat_id: i32,
}

/// Ask syncd to refresh a chat's count now, and wait up to PARTICIPANTS_REFRESH_WAIT for it.
#[utoipa::path(
    post, path = "/chats/{id}/refresh-participants", tag = "chats",
    params(("id" = i64, Path, description = "chats.id (not the MAX chat id)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Refreshed in time", body = RefreshUpdated),
        (status = 202, description = "Enqueued; not finished in time", body = RefreshQueued),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 404, description = "No such chat in the caller's scope", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unavailable, or the integration is disabled", body = ErrorBody),
    )
)]
pub async fn refresh_participants(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let chat = find_chat(&state, &principal, &id).await?;
    if !state.settings.integration_enabled {
        return Err(ApiError::RefreshUnavailable(
            "the participants integration is disabled",
        ));
    }
    if !state.cache.is_available() {
        return Err(ApiError::RefreshUnavailable("redis is unavailable"));
    }
    // Any outcome published from now on is at most as old as this request: it comes from a
    // MAX call made either for this request or for one already in flight for the same chat.
    let mut outcomes = state.waiters.subscribe();
    let replicated = state
        .cache
        .enqueue_manual(
            chat.id,
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
    let wait = async {
        loop {
            match outcomes.recv().await {
                Ok(outcome) if outcome.chat_id == chat.id => {
                    if let Some(count) = outcome.participants_count {
                        return Some((count, outcome.updated_at));
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    let metrics = &state.metrics.refresh_waits;
    match tokio::time::timeout(state.settings.refresh_wait, wait).await {
        Ok(Some((participants_count, updated_at))) => {
            metrics.with_label_values(&["updated"]).inc();
            Ok(Json(RefreshUpdated {
                status: "updated",
                chat_id: chat.id,
                participants_count,
                updated_at,
                source: "api",
            })
            .into_response())
        }
        _ => {
            metrics.with_label_values(&["queued"]).inc();
            Ok((
                StatusCode::ACCEPTED,
                Json(RefreshQueued {
                    status: "queued",
                    chat_id: chat.id,
                }),
            )
                .into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(limit: Option<&str>, offset: Option<&str>) -> ListParams {
        ListParams {
            limit: limit.map(str::to_owned),
            offset: offset.map(str::to_owned),
            ..ListParams::default()
        }
    }

    #[test]
    fn limit_follows_the_legacy_clamps() {
        for (given, expected) in [
            (None, 50),
            (Some(""), 50),
            (Some("0"), 50),
            (Some("-3"), 50),
            (Some("20"), 20),
            (Some("100"), 100),
            (Some("1000"), 100),
        ] {
            assert_eq!(
                parse_list_query(&params(given, None)).unwrap().limit,
                expected,
                "{given:?}"
            );
        }
        assert!(matches!(
            parse_list_query(&params(Some("ten"), None)),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn offset_is_never_negative() {
        assert_eq!(
            parse_list_query(&params(None, Some("-10"))).unwrap().offset,
            0
        );
        assert_eq!(
            parse_list_query(&params(None, Some("30"))).unwrap().offset,
            30
        );
        assert!(matches!(
            parse_list_query(&params(None, Some("1.5"))),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn sort_falls_back_to_name_ascending() {
        let query = parse_list_query(&ListParams {
            sort_by: Some("password".into()),
            sort_order: Some("sideways".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(
            (query.sort, query.order),
            (SortColumn::Name, SortOrder::Asc)
        );
        let query = parse_list_query(&ListParams {
            sort_by: Some("created_at".into()),
            sort_order: Some("DESC".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(
            (query.sort, query.order),
            (SortColumn::CreatedAt, SortOrder::Desc)
        );
    }

    #[test]
    fn search_splits_on_whitespace() {
        let query = parse_list_query(&ListParams {
            search: Some("  Math\t2024 \n".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(query.words, vec!["Math", "2024"]);
    }

    #[test]
    fn ids_outside_the_serial_range_find_nothing() {
        assert_eq!(parse_chat_id("12").unwrap(), Some(12));
        assert_eq!(parse_chat_id("99999999999").unwrap(), None);
        assert!(parse_chat_id("abc").is_err());
    }
}
