//! The one error type of the HTTP layer: variants named by outcome, one status per variant,
//! JSON bodies `{"error": {"code", "message"}}`, and 5xx bodies that carry no internal detail.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// Seconds a client should wait before retrying a 503 (the `Retry-After` header).
pub const RETRY_AFTER_SECONDS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this token's role may not do this")]
    Forbidden,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Postgres cannot be reached or did not answer in time.
    #[error("database unavailable")]
    DatabaseUnavailable(#[source] sqlx::Error),
    /// Refreshes cannot be requested: Redis is down or disabled, or the integration is off.
    #[error("refresh unavailable: {0}")]
    RefreshUnavailable(&'static str),
    #[error("request timed out")]
    Timeout,
    /// More requests are in flight on this replica than API_MAX_CONCURRENT_REQUESTS.
    #[error("the api is overloaded; retry")]
    Overloaded,
    /// This caller asked for too many refreshes; the value is when it may ask again.
    #[error("too many refresh requests; retry after {} s", retry_after_secs(.0))]
    TooManyRequests(std::time::Duration),
    /// This caller ran too many costly searches; the value is when it may run one again.
    #[error("too many costly searches; retry after {} s, or search for a longer word", retry_after_secs(.0))]
    TooManySearches(std::time::Duration),
    /// A search would compare more than its scan budget (the value, in bytes) of chats.
    #[error("this search would compare more than {} MiB of chats; use fewer or longer words (3 characters or more)", .0 >> 20)]
    SearchTooBroad(usize),
    /// The read model has not loaded yet (Postgres has not answered since start-up).
    #[error("the chat list is loading; retry")]
    Loading,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `unauthorized` or `database_unavailable`
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::DatabaseUnavailable(_)
            | ApiError::RefreshUnavailable(_)
            | ApiError::Timeout
            | ApiError::Overloaded
            | ApiError::Loading => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooManyRequests(_) | ApiError::TooManySearches(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::SearchTooBroad(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::DatabaseUnavailable(_) => "database_unavailable",
            ApiError::RefreshUnavailable(_) => "refresh_unavailable",
            ApiError::Timeout => "timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::Loading => "loading",
            ApiError::Internal(_) => "internal_error",
            ApiError::TooManyRequests(_) | ApiError::TooManySearches(_) => "too_many_requests",
            ApiError::SearchTooBroad(_) => "search_too_broad",
        }
    }

    /// Query failures: the database being unreachable is a 503, anything else is a bug (500).
    pub fn from_db(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => ApiError::DatabaseUnavailable(error),
            sqlx::Error::Database(db)
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
                if matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03" | "53300")) =>
            {
                ApiError::DatabaseUnavailable(error)
            }
            _ => ApiError::Internal(error.into()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::from_db(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::DatabaseUnavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "request failed");
            }
            _ => {}
        }
        self.generic_response()
    }
}

impl ApiError {
    /// The response, without logging the cause (for a caller that logged it already).
    pub fn generic_response(self) -> Response {
        let status = self.status_code();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: a 401 names the scheme the client must use.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyRequests(wait) | ApiError::TooManySearches(wait) = &self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(wait)),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// Whole seconds to wait, rounded up (Retry-After takes no fractions), at least 1.
fn retry_after_secs(wait: &std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_do_not_leak_their_cause() {
        let error = ApiError::Internal(anyhow::anyhow!("password=hunter2 at 10.0.0.1"));
        assert_eq!(error.to_string(), "internal error");
        let error = ApiError::DatabaseUnavailable(sqlx::Error::PoolTimedOut);
        assert_eq!(error.to_string(), "database unavailable");
    }
}
