//! `api migrate`: the embedded migrations applied one process at a time, every lock wait
//! bounded, and safe for a rollback (a newer release's migrations in the database are kept).

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;

/// How long a migration waits for a lock by default (`MIGRATE_LOCK_TIMEOUT`).
pub const MIGRATE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts after a lock timeout before `api migrate` gives up.
const MIGRATE_ATTEMPTS: u32 = 20;
/// The advisory lock that keeps two `api migrate` apart (pods starting together).
const MIGRATE_LOCK_KEY: i64 = 0x7061_7274_6963_6970; // "particip"

/// Applies every embedded migration. Safe to run twice, on the legacy chat-service schema, and
/// on a database a newer release migrated.
pub async fn migrate(database: &shared::config::DatabaseArgs) -> anyhow::Result<()> {
    migrate_with(database, MIGRATE_LOCK_TIMEOUT).await
}

/// `migrate`, waiting at most `lock_timeout` for any lock: the legacy service's writes to
/// `chats` queue behind a migration's lock request no longer than that. A migration that times
/// out is rolled back (or, built concurrently, left to be dropped and built again) and the run
/// is tried again after a pause, so a busy moment delays the migration, not the legacy writes.
pub async fn migrate_with(
    database: &shared::config::DatabaseArgs,
    lock_timeout: Duration,
) -> anyhow::Result<()> {
    migrate_set(database, lock_timeout, &shared::db::MIGRATOR).await
}

/// `migrate_with` for a given migration set: the embedded one, or in tests an earlier
/// release's, to show that the previous release starts on the current schema.
pub async fn migrate_set(
    database: &shared::config::DatabaseArgs,
    lock_timeout: Duration,
    set: &Migrator,
) -> anyhow::Result<()> {
    let migrator = shared::db::rollback_safe(set)
        .await
        .context("cannot resolve the embedded migrations")?;
    let timeout_ms = lock_timeout.as_millis().max(1).to_string();
    let options = shared::db::connect_options(database)?.options([
        ("lock_timeout", timeout_ms.as_str()),
        // Index builds may take long; only the lock waits are bounded.
        ("statement_timeout", "0"),
    ]);
    let mut attempt = 1;
    let unknown = loop {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(
                database
                    .database_acquire_timeout
                    .max(Duration::from_secs(10)),
            )
            .connect_with(options.clone())
            .await
            .context("cannot connect to the database (MIGRATE_DATABASE_URL, else DATABASE_URL)")?;
        let result = apply(&pool, &migrator, set).await;
        // A new session per attempt: nothing (an advisory lock, a failed transaction) carries over.
        pool.close().await;
        match result {
            Ok(unknown) => break unknown,
            Err(error) if is_retryable(&error) && attempt < MIGRATE_ATTEMPTS => {
                let pause = Duration::from_secs(u64::from(attempt).min(30));
                tracing::warn!(attempt, pause_s = pause.as_secs(), lock_timeout_ms = lock_timeout.as_millis() as u64,
                    "a migration waited longer than MIGRATE_LOCK_TIMEOUT for a table in use; rolled back, trying again");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            Err(error) => return Err(error).context("migration failed"),
        }
    };
    if !unknown.is_empty() {
        tracing::info!(versions = ?unknown,
            "the database holds migrations of a newer release; kept, this release runs on them");
    }
    let applied = migrator.iter().count();
    tracing::info!(migrations = applied, "database is up to date");
    Ok(())
}

/// One attempt, on one session: waits its turn, repairs what an earlier run left, applies what
/// is pending (`migrator`, the rollback-safe form of `set`). Returns the versions only a newer
/// release knows.
async fn apply(
    pool: &sqlx::PgPool,
    migrator: &Migrator,
    set: &Migrator,
) -> anyhow::Result<Vec<i64>> {
    // One migrating process at a time, waited for without a blocking lock call: a session
    // blocked in pg_advisory_lock holds a snapshot, which a concurrent index build of the
    // other process would wait for (a deadlock).
    let mut told = false;
    while !sqlx::query_scalar::<_, bool>("select pg_try_advisory_lock($1)")
        .bind(MIGRATE_LOCK_KEY)
        .fetch_one(pool)
        .await?
    {
        if !told {
            tracing::info!("another api migrate runs; waiting for it");
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let repaired = shared::db::record_first_checksums(pool, set).await?;
    if repaired > 0 {
        tracing::info!(
            migrations = repaired,
            "recorded the first text's checksum of migrations rewritten without changing the schema"
        );
    }
    let dropped = shared::db::drop_invalid_indexes(pool).await?;
    if !dropped.is_empty() {
        tracing::warn!(indexes = ?dropped, "dropped indexes a failed concurrent build left invalid; building them again");
    }
    migrator.run(pool).await?;
    Ok(shared::db::unknown_versions(pool, migrator).await?)
}

/// Postgres gave up waiting for a lock (`lock_not_available`, 55P03) or broke a deadlock with
/// the legacy service's transactions (40P01): the migration was rolled back; try again.
fn is_retryable(error: &anyhow::Error) -> bool {
    // sqlx's MigrateError::Execute and ::ExecuteMigration name the database error as their
    // source, so the chain reaches it whether a migration or a query of ours failed.
    error.chain().any(|cause| {
        let code = cause
            .downcast_ref::<sqlx::Error>()
            .and_then(sqlx::Error::as_database_error)
            .and_then(|e| e.code());
        matches!(code.as_deref(), Some("55P03" | "40P01"))
    })
}
