//! The Postgres pool and the embedded migrations.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseArgs;

/// Every migration in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Migrations whose text was rewritten after databases had applied them, without changing what
/// those databases hold: (version, SHA-384 of the old text). `api migrate` records the new
/// checksum for a database that has the old one, instead of refusing it as modified.
/// - 20261122000004 built the list indexes in one transaction under a SHARE lock on `chats`;
///   it now only creates pg_trgm, and the indexes are built concurrently by later migrations,
///   which find them present on such a database.
pub const REWRITTEN_MIGRATIONS: &[(i64, &str)] = &[(
    20261122000004,
    "2c01389c327640d3ffceafd08eeb84de13a28d5e018b9e6e44b2b3ec8c7f49c8e0199d16e7db076a31c3c35171eeef18",
)];

/// The indexes built with CREATE INDEX CONCURRENTLY. One that failed half-way is left INVALID,
/// and `if not exists` would then skip it for good: `api migrate` drops such a one first.
pub const CONCURRENT_INDEXES: &[&str] = &[
    "chats_search_trgm_idx",
    "chats_name_id_idx",
    "chats_url_id_idx",
    "chats_max_chat_id_id_idx",
    "chats_participants_count_id_idx",
    "chats_department_id_idx",
    "chats_source_id_idx",
    "chats_created_at_id_idx",
    "chats_updated_at_id_idx",
    "chats_university_id_name_id_idx",
];

/// Records the current checksum of each rewritten migration a database applied in its old
/// text (see `REWRITTEN_MIGRATIONS`). Returns how many rows it changed.
pub async fn repair_rewritten_checksums(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let table: Option<String> = sqlx::query_scalar("select to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(0);
    }
    let mut repaired = 0;
    for (version, old) in REWRITTEN_MIGRATIONS {
        let Some(current) = MIGRATOR.iter().find(|m| m.version == *version) else {
            continue;
        };
        repaired += sqlx::query(
            "update _sqlx_migrations set checksum = $1 where version = $2 and checksum = decode($3, 'hex')",
        )
        .bind(current.checksum.as_ref())
        .bind(version)
        .bind(old)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(repaired)
}

/// Drops the indexes of `CONCURRENT_INDEXES` that a failed build left invalid, so that their
/// migration builds them again. Returns their names.
pub async fn drop_invalid_indexes(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_index i join pg_class c on c.oid = i.indexrelid \
         where not i.indisvalid and c.relname = any($1)",
    )
    .bind(CONCURRENT_INDEXES)
    .fetch_all(pool)
    .await?;
    for name in &invalid {
        // The name comes from the fixed list above, not from input.
        sqlx::query(&format!("drop index concurrently if exists {name}"))
            .execute(pool)
            .await?;
    }
    Ok(invalid)
}

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
