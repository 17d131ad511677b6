//! The Postgres pool and the embedded migrations.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseArgs;

/// Every migration in `migrations/`, embedded in the binary, each with its current text's
/// checksum. `api migrate` runs them through [`rollback_safe`], which is what databases record.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Migrations whose text was rewritten after databases had applied them, without changing what
/// those databases hold: (version, SHA-384 of the text it first landed with). Every database
/// records that first checksum, whichever release applied it, so that any release, older or
/// newer than the rewrite, finds the checksum it expects (`rollback_safe`). A second rewrite
/// of the same migration keeps the first text's checksum here.
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

/// `set` as `api migrate` runs it, so that a rollback starts (SPEC §2):
/// - migrations the database holds and `set` does not (a newer release applied them) are not
///   an error: each release only adds, so the older one runs on the newer schema;
/// - each rewritten migration carries the checksum of its first text (`REWRITTEN_MIGRATIONS`),
///   which is what it records when it applies it and expects where it was applied, so neither
///   a release from before the rewrite nor one after it finds a checksum it does not know.
pub async fn rollback_safe(set: &Migrator) -> Result<Migrator, MigrateError> {
    let migrations = set
        .iter()
        .map(|migration| match first_checksum(migration.version) {
            Some(first) => Migration {
                checksum: Cow::Owned(first),
                ..migration.clone()
            },
            None => migration.clone(),
        })
        .collect();
    let mut migrator = Migrator::new(Resolved(migrations)).await?;
    migrator.set_ignore_missing(true);
    Ok(migrator)
}

/// The checksum of a rewritten migration's first text, or `None` for one never rewritten.
fn first_checksum(version: i64) -> Option<Vec<u8>> {
    let (_, hex) = REWRITTEN_MIGRATIONS.iter().find(|(v, _)| *v == version)?;
    Some(
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("REWRITTEN_MIGRATIONS is hex"))
            .collect(),
    )
}

/// Migrations already resolved (a set with some checksums replaced), as a source for
/// `Migrator::new`.
#[derive(Debug)]
struct Resolved(Vec<Migration>);

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl<'s> MigrationSource<'s> for Resolved {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

/// Records the first text's checksum of each rewritten migration that a database applied
/// with a later text (releases before this one recorded the text they ran, and repaired older
/// databases to it), so that the database again holds what every release expects (see
/// `rollback_safe`). `set` is as embedded, with its current texts. Returns how many rows it
/// changed.
pub async fn record_first_checksums(pool: &PgPool, set: &Migrator) -> Result<u64, sqlx::Error> {
    let table: Option<String> = sqlx::query_scalar("select to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(0);
    }
    let mut repaired = 0;
    for (version, first) in REWRITTEN_MIGRATIONS {
        let Some(current) = set.iter().find(|m| m.version == *version) else {
            continue;
        };
        repaired += sqlx::query(
            "update _sqlx_migrations set checksum = decode($3, 'hex') where version = $2 and checksum = $1",
        )
        .bind(current.checksum.as_ref())
        .bind(version)
        .bind(first)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(repaired)
}

/// The versions the database records as applied that `set` does not know: a newer release's
/// migrations (after a rollback), or none.
pub async fn unknown_versions(pool: &PgPool, set: &Migrator) -> Result<Vec<i64>, sqlx::Error> {
    let known: Vec<i64> = set.iter().map(|m| m.version).collect();
    sqlx::query_scalar(
        "select version from _sqlx_migrations where not (version = any($1)) order by version",
    )
    .bind(&known)
    .fetch_all(pool)
    .await
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
