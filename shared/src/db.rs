//! The Postgres pool and the embedded migrations.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseArgs;

/// Every migration in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Why the database settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseSetupError {
    /// The URL itself is not repeated: it may carry a password.
    #[error("DATABASE_URL is not a valid PostgreSQL URL ({0})")]
    InvalidUrl(String),
}

/// Parses `DATABASE_URL` without connecting.
pub fn connect_options(args: &DatabaseArgs) -> Result<PgConnectOptions, DatabaseSetupError> {
    PgConnectOptions::from_str(args.database_url.expose_secret())
        .map(|options| options.application_name("participants"))
        .map_err(|e| DatabaseSetupError::InvalidUrl(redact(&e.to_string(), args)))
}

/// `connect_options` with `DATABASE_STATEMENT_TIMEOUT` set on every connection, for the
/// services' pools (not for migrations, whose index builds may take longer).
pub fn service_options(args: &DatabaseArgs) -> Result<PgConnectOptions, DatabaseSetupError> {
    let timeout_ms = args.database_statement_timeout.as_millis().to_string();
    Ok(connect_options(args)?.options([("statement_timeout", timeout_ms.as_str())]))
}

/// A pool that connects lazily, so the process starts (and answers 503) while Postgres is down
/// and recovers by itself when it returns.
pub fn pool(args: &DatabaseArgs) -> Result<PgPool, DatabaseSetupError> {
    let options = service_options(args)?;
    Ok(PgPoolOptions::new()
        .max_connections(args.database_max_connections)
        .min_connections(0)
        .acquire_timeout(args.database_acquire_timeout)
        // A broken connection fails its query and is dropped; pinging before every checkout
        // would cost a round trip per request for nothing.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

fn redact(message: &str, args: &DatabaseArgs) -> String {
    message.replace(args.database_url.expose_secret(), "<DATABASE_URL>")
}
