//! The HTTP surface: routes, and the middleware every request passes through.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;

pub mod admin;
pub mod chats;
pub mod health;
pub mod meta;

/// Every route of the api.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/chats/all", get(chats::list_chats))
        .route("/chats/{id}", get(chats::get_chat))
        .route(
            "/chats/{id}/refresh-participants",
            post(chats::refresh_participants),
        )
        .route(
            "/admin/participants/full-update",
            post(admin::schedule_full_update),
        )
        .route("/admin/participants/sweeps", get(admin::list_sweeps))
        .route(
            "/admin/participants/validate",
            get(admin::validate_participants),
        )
        .route("/health", get(health::health))
        .route("/health/detailed", get(health::health_detailed))
        .route("/health/redis", get(health::health_redis))
        .route("/health/ready", get(health::health_ready))
        .route("/metrics", get(meta::metrics))
        .route("/openapi.json", get(meta::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Times each request out, records its metrics, and logs it once.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();
    // A metric label must not take whatever a client sends: a random method per request
    // would make a new series each time, unauthenticated.
    let method_label = match method.as_str() {
        known @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => known,
        _ => "other",
    };
    // The request's span continues the caller's trace when it sent a `traceparent`; the trace
    // then goes on through the refresh stream into syncd's MAX call.
    let span = tracing::info_span!("http.request", otel.kind = "server", http.method = %method, http.route = %route);
    if let Some(traceparent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        shared::telemetry::set_remote_parent(&span, traceparent);
    }
    let handled = next.run(request).instrument(span);
    let response = match tokio::time::timeout(state.settings.request_timeout, handled).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    let elapsed = started.elapsed();
    let status = response.status();
    state
        .metrics
        .http_requests
        .with_label_values(&[route.as_str(), method_label, status.as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    if status.is_server_error() {
        tracing::warn!(http.route = %route, http.method = %method, http.status = status.as_u16(),
            duration_ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::debug!(http.route = %route, http.method = %method, http.status = status.as_u16(),
            duration_ms = elapsed.as_millis() as u64, "request served");
    }
    response
}
