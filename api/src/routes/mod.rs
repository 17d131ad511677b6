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
    let router = Router::new()
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
        .method_not_allowed_fallback(method_not_allowed);
    let router = if cfg!(debug_assertions) && state.settings.debug_panic_route {
        router.route("/debug/panic", get(debug_panic))
    } else {
        router
    };
    // The panic is caught inside `observe`, so that it is answered, counted and logged like
    // any other request, with the request's id and span.
    router
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Marks a response as the answer to a handler that panicked.
#[derive(Clone, Copy)]
struct Panicked;

/// The generic 500 of a panic. The panic itself is logged by the hook `install_panic_hook`
/// sets, inside the request's span, and counted by `observe`.
fn panicked(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let mut response = ApiError::Internal(anyhow::anyhow!("handler panicked")).generic_response();
    response.extensions_mut().insert(Panicked);
    response
}

/// A route that panics, for the tests of the above: debug builds only, under
/// `API_DEBUG_PANIC_ROUTE`.
async fn debug_panic() -> Response {
    panic!("a panic asked for by /debug/panic");
}

/// Logs a panic once, as an error line of the current span (a request's carries its request
/// id and route), instead of the default hook's plain stderr text; a panic outside any span
/// (a test's assertion, start-up) goes to the previous hook as before.
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if tracing::Span::current().is_none() {
                previous(info);
                return;
            }
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let location = info
                .location()
                .map(|at| format!("{}:{}", at.file(), at.line()))
                .unwrap_or_default();
            tracing::error!(panic.message = %message, panic.location = %location, "handler panicked");
        }));
    });
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

const REQUEST_ID: &str = "x-request-id";

/// The caller's `x-request-id` when it is a sane token (at most 64 of `[A-Za-z0-9._-]`), else a
/// new UUID: an id a log search can trust, whatever a client sends.
fn request_id(request: &Request) -> String {
    request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
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
    let method_label: &'static str = match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    // The request's span continues the caller's trace when it sent a `traceparent`; the trace
    // then goes on through the refresh stream into syncd's MAX call. Every log line of the
    // request carries the span's request id and trace id.
    let request_id = request_id(&request);
    let incoming = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let span = tracing::info_span!("http.request", otel.kind = "server", http.method = %method,
        http.route = %route, request_id = %request_id, trace_id = tracing::field::Empty);
    if let Some(traceparent) = &incoming {
        shared::telemetry::set_remote_parent(&span, traceparent);
    }
    // The exported trace's id when tracing is on; else the caller's, so logs still join up.
    let trace_id = span
        .in_scope(shared::telemetry::current_traceparent)
        .or(incoming)
        .and_then(|traceparent| traceparent.split('-').nth(1).map(str::to_owned));
    if let Some(trace_id) = &trace_id {
        span.record("trace_id", trace_id.as_str());
    }
    async move {
        let handled = next.run(request);
        let mut response = match tokio::time::timeout(state.settings.request_timeout, handled).await {
            Ok(response) => response,
            Err(_) => ApiError::Timeout.into_response(),
        };
        if let Ok(value) = axum::http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        let elapsed = started.elapsed();
        let status = response.status();
        let panicked = response.extensions().get::<Panicked>().is_some();
        if panicked {
            state
                .metrics
                .http_panics
                .with_label_values(&[route.as_str()])
                .inc();
        }
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
        if panicked {
            // Logged already, once, by the panic hook in this span.
        } else if status.is_server_error() {
            tracing::warn!(http.route = %route, http.method = %method, http.status = status.as_u16(),
                duration_ms = elapsed.as_millis() as u64, "request failed");
        } else {
            tracing::debug!(http.route = %route, http.method = %method, http.status = status.as_u16(),
                duration_ms = elapsed.as_millis() as u64, "request served");
        }
        response
    }
    .instrument(span)
    .await
}
