//! What `api` and `syncd` share: configuration pieces, the Redis key schema, the cached count
//! format, the refresh stream message, the Postgres pool and migrations, telemetry and shutdown.
//!
//! Nothing here knows about HTTP.

pub mod config;
pub mod counts;
pub mod db;
pub mod health;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod redis;
pub mod refresh;
pub mod shutdown;
pub mod sweeps;
pub mod sync_status;
pub mod telemetry;
pub mod tls;
