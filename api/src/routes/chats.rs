//! `GET /chats/all`, `GET /chats/{id}` and `POST /chats/{id}/refresh-participants`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::read_path::query::{ChatParams, CountSource, ListParams, ListQuery};
use crate::read_path::view::{ChatPage, ChatView};
use crate::read_path::Served;
use crate::refresh_wait::{refresh_and_wait, Waited};
use crate::state::AppState;

/// Seconds since the api's in-memory chats were last known to match Postgres: near 0 normally,
/// growing while Postgres is unreachable (the chats are then served as they were).
pub const READ_MODEL_AGE_HEADER: HeaderName = HeaderName::from_static("x-read-model-age");

/// A read's body with the read model's age in a header.
fn with_model_age<T: Serialize>(served: Served<T>) -> Response {
    let seconds = served.model_age.as_secs().to_string();
    let mut response = Json(served.body).into_response();
    if let Ok(value) = HeaderValue::from_str(&seconds) {
        response.headers_mut().insert(READ_MODEL_AGE_HEADER, value);
    }
    response
}

/// List chats, page by page, with fresh participant counts.
#[utoipa::path(
    get, path = "/chats/all", tag = "chats",
    params(ListParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of chats", body = ChatPage,
            headers(("x-read-model-age" = i64, description = "Seconds since the chats were last known to match Postgres"))),
        (status = 400, description = "limit or offset is not an integer, or use_cached_participants not a boolean", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or wrongly signed token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 422, description = "search_too_broad: the search would compare more than API_SEARCH_SCAN_BUDGET_MB of chats (many short words matching nearly every chat); use fewer or longer words", body = ErrorBody),
        (status = 429, description = "This caller ran more than API_COSTLY_SEARCHES_PER_USER_PER_MINUTE costly searches (ones that may compare more than 20,000 chats: words of 1-2 characters, or of only common trigrams, not searched recently); Retry-After says when to ask again", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the caller may run a costly search again"))),
        (status = 503, description = "The chats could not load since start-up within the request timeout (Postgres does not answer; a read during a load waits for it); retry after the Retry-After header", body = ErrorBody),
    )
)]
pub async fn list_chats(
    State(state): State<AppState>,
    principal: Principal,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = ListQuery::parse(&params)?;
    let counts = CountSource::parse(params.use_cached_participants.as_deref())?;
    let page = state
        .reads
        .list(principal.scope, &principal.user_id, &query, counts)
        .await?;
    Ok(with_model_age(page))
}

/// Parses a path id: 400 when it is not a number, `None` when no chat can have it.
fn parse_chat_id(text: &str) -> Result<Option<i32>, ApiError> {
    let id: i64 = text
        .trim()
        .parse()
        .map_err(|_| ApiError::BadRequest("chat id must be an integer".to_owned()))?;
    Ok(i32::try_from(id).ok())
}

/// One chat, in the same shape as in the list.
#[utoipa::path(
    get, path = "/chats/{id}", tag = "chats",
    params(("id" = i64, Path, description = "chats.id (not the MAX chat id)"), ChatParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The chat", body = ChatView,
            headers(("x-read-model-age" = i64, description = "Seconds since the chats were last known to match Postgres"))),
        (status = 400, description = "The id is not an integer, or use_cached_participants not a boolean", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 404, description = "No such chat in the caller's scope", body = ErrorBody),
        (status = 503, description = "The chats could not load since start-up within the request timeout", body = ErrorBody),
    )
)]
pub async fn get_chat(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    query: Result<Query<ChatParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_chat_id(&id)?.ok_or(ApiError::NotFound("chat"))?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let counts = CountSource::parse(params.use_cached_participants.as_deref())?;
    let chat = state.reads.get(principal.scope, id, counts).await?;
    Ok(with_model_age(chat))
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

/// The refresh finished in time and MAX would not give the chat's count: the bot was removed
/// from it or left it, the chat is closed or gone, or its MAX id is unusable. The count served
/// stays the last known one.
#[derive(Debug, Serialize, ToSchema)]
pub struct RefreshUnavailable {
    /// Always `unavailable`
    pub status: &'static str,
    pub chat_id: i32,
    /// What MAX answered: `not_found`, `forbidden`, `removed`, `left`, `closed`, or `invalid_id`
    /// (the chat's MAX id is missing or not a number); a newer MAX status is passed on as is
    pub reason: String,
    /// When MAX was asked
    pub checked_at: DateTime<Utc>,
}

/// A refresh that finished within the wait.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RefreshDone {
    Updated(RefreshUpdated),
    Unavailable(RefreshUnavailable),
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
        (status = 200, description = "Refreshed in time: the new count, or (`status: unavailable`) why MAX gave none", body = inline(RefreshDone)),
        (status = 202, description = "Enqueued; not finished in time", body = RefreshQueued),
        (status = 400, description = "The id is not an integer", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Unknown role", body = ErrorBody),
        (status = 404, description = "No such chat in the caller's scope", body = ErrorBody),
        (status = 429, description = "This caller asked for more refreshes than PARTICIPANTS_REFRESH_PER_USER_PER_MINUTE; Retry-After says when to ask again", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the caller may ask again"))),
        (status = 503, description = "Redis is unavailable, the integration is disabled, or the chats have not loaded yet", body = ErrorBody),
    )
)]
pub async fn refresh_participants(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_chat_id(&id)?.ok_or(ApiError::NotFound("chat"))?;
    let chat = state.reads.find(principal.scope, id).await?;
    let done = match refresh_and_wait(&state, chat.id, &principal.user_id).await? {
        Waited::Updated { count, at } => RefreshDone::Updated(RefreshUpdated {
            status: "updated",
            chat_id: chat.id,
            participants_count: count,
            updated_at: at,
            source: "api",
        }),
        Waited::Unavailable { reason, checked_at } => {
            RefreshDone::Unavailable(RefreshUnavailable {
                status: "unavailable",
                chat_id: chat.id,
                reason,
                checked_at,
            })
        }
        Waited::Queued => {
            let queued = RefreshQueued {
                status: "queued",
                chat_id: chat.id,
            };
            return Ok((StatusCode::ACCEPTED, Json(queued)).into_response());
        }
    };
    Ok(Json(done).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_outside_the_serial_range_find_nothing() {
        assert_eq!(parse_chat_id("12").unwrap(), Some(12));
        assert_eq!(parse_chat_id("99999999999").unwrap(), None);
        assert!(parse_chat_id("abc").is_err());
    }
}
