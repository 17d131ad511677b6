//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use sqlx::PgPool;

use crate::auth::TokenVerifier;
use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::read_path::ReadPath;
use crate::waiters::RefreshWaiters;

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub cache: Arc<Cache>,
    pub reads: Arc<ReadPath>,
    pub tokens: TokenVerifier,
    pub metrics: Metrics,
    pub waiters: RefreshWaiters,
    pub refresh_gate: Arc<crate::refresh_gate::RefreshGate>,
    pub settings: Arc<Settings>,
    /// The last `/health/detailed` answer, shared by its callers.
    pub detailed_health: Arc<crate::routes::health::DetailedHealthCache>,
}

impl FromRef<AppState> for TokenVerifier {
    fn from_ref(state: &AppState) -> Self {
        state.tokens.clone()
    }
}

/// The serving settings handlers read.
#[derive(Debug)]
pub struct Settings {
    /// Read counts from Redis and enqueue refreshes; false under PARTICIPANTS_INTEGRATION_DISABLED.
    pub integration_enabled: bool,
    pub refresh_wait: Duration,
    /// Replicas that must hold a manual refresh request before it is acknowledged.
    pub redis_wait_replicas: u32,
    pub request_timeout: Duration,
    /// READ_MODEL_MAX_AGE: past it (the primary answering), the replica is not ready.
    pub read_model_max_age: Duration,
    /// Serve `GET /debug/panic` (debug builds only, for the tests of panic handling).
    pub debug_panic_route: bool,
}
