//! The endpoints about the api itself: `/metrics`, and `/openapi.json` generated from the
//! handlers' annotations.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "participants api", description = "Read-only chat listing with fresh MAX participant counts; a drop-in replacement of the chat-service's GET /chats/all."),
    paths(
        super::chats::list_chats,
        super::chats::get_chat,
        super::chats::refresh_participants,
        super::admin::schedule_full_update,
        super::admin::list_sweeps,
        super::admin::validate_participants,
        super::health::health,
        super::health::health_detailed,
        super::health::health_redis,
        super::health::health_ready,
        metrics,
        openapi_json,
    ),
    modifiers(&BearerAuth),
    tags((name = "chats"), (name = "admin"), (name = "health"), (name = "meta"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let age = state
                .reads
                .model
                .age()
                .map_or(-1.0, |age| age.as_secs_f64());
            state.metrics.read_model_age.set(age);
            state.metrics.render()
        },
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 description of this api", content_type = "application/json")))]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
