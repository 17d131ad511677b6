//! syncd's own HTTP surface on `SYNCD_LISTEN_ADDR`: `/metrics` and `/health`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use serde::Serialize;
use sqlx::PgPool;

use crate::metrics::Metrics;
use crate::status::TokenState;

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub token: TokenState,
    pub db: PgPool,
    pub redis: Client,
    pub consumer: String,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(state)
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
    status: &'static str,
    consumer: String,
    database: &'static str,
    redis: &'static str,
    /// valid or invalid
    max_token: &'static str,
}

/// 200 while this replica can refresh counts; 503 (with the reason) while it cannot: Postgres
/// or Redis down, or MAX rejecting the bot token.
async fn health(State(state): State<HttpState>) -> (StatusCode, Json<Health>) {
    let timeout = Duration::from_secs(2);
    let database_up = matches!(
        tokio::time::timeout(timeout, sqlx::query("select 1").execute(&state.db)).await,
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
            status: if ok { "ok" } else { "degraded" },
            consumer: state.consumer.clone(),
            database: if database_up { "up" } else { "down" },
            redis: if redis_up { "up" } else { "down" },
            max_token: if token_valid { "valid" } else { "invalid" },
        }),
    )
}
