//! The `api` binary's library: `run` serves the HTTP API until a shutdown future resolves.
//!
//! Tests call the same `run` as `main`, on a listener bound to port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod metrics;
pub mod postgres;
pub mod read_model;
pub mod read_path;
pub mod refresh_gate;
pub mod refresh_wait;
pub mod routes;
pub mod scope;
pub mod state;
pub mod waiters;

use crate::config::ServeArgs;
use crate::read_model::ReadModel;
use crate::read_path::counts::Freshness;
use crate::read_path::ReadPath;
use crate::state::{AppState, Settings};

/// Longest time in-flight requests get to finish after shutdown is asked for; shorter than
/// Kubernetes' default 30 s grace period.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);

/// `DATABASE_STATEMENT_TIMEOUT`, at most the request timeout (0, off, becomes the request
/// timeout too).
fn statement_timeout(args: &ServeArgs) -> Duration {
    match args.database.database_statement_timeout {
        Duration::ZERO => args.request_timeout,
        timeout => timeout.min(args.request_timeout),
    }
}

/// Serves the api on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    routes::install_panic_hook();
    let metrics = metrics::Metrics::new();
    // No statement outlives the request that waits for it (the read model's loads take about
    // a second at 150,000 chats, well within the request timeout).
    let db = shared::db::pool(&shared::config::DatabaseArgs {
        database_statement_timeout: statement_timeout(&args),
        ..args.database.clone()
    })?;
    let cache = cache::Cache::connect(&args.redis, args.redis_wait_replicas, metrics.clone())?;
    let waiters = waiters::RefreshWaiters::new();
    let background = CancellationToken::new();

    // The first requests use the cache when Redis is up, rather than find the circuit open
    // until the probe's second round (seen in the drills: the first 500 ms of manual refreshes
    // were refused with 503). A dead Redis delays start-up by this much at most.
    cache.warm_up(std::time::Duration::from_millis(500)).await;
    tokio::spawn(cache.clone().run_probe(background.clone()));
    // Say at once when Postgres cannot be reached, rather than only "api listening".
    tokio::spawn({
        let db = db.clone();
        async move {
            let check = sqlx::query("select 1").execute(&db);
            match tokio::time::timeout(Duration::from_secs(5), check).await {
                Ok(Ok(_)) => tracing::info!("postgres answers"),
                Ok(Err(error)) => tracing::error!(error = %error,
                    "postgres cannot be reached at start-up (DATABASE_URL); /health/ready answers 503 and reads wait for the first load"),
                Err(_) => tracing::error!(
                    "postgres did not answer within 5 s at start-up (DATABASE_URL); /health/ready answers 503 and reads wait for the first load"),
            }
        }
    });
    let integration_enabled = !args.participants_integration_disabled;
    if integration_enabled && !args.redis.disable_redis {
        let subscriber = shared::redis::connect_subscriber(&args.redis)?;
        tokio::spawn(waiters.clone().run_listener(subscriber, background.clone()));
    }

    // The read model loads in the background: until it has, reads answer 503 and the
    // readiness probe fails; after that, reads never wait on Postgres again.
    let model = ReadModel::new();
    tokio::spawn(read_model::sync::run(
        model.clone(),
        db.clone(),
        args.read_model_reconcile_interval,
        metrics.clone(),
        background.clone(),
    ));
    let reads = Arc::new(ReadPath {
        model,
        cache: cache.clone(),
        metrics: metrics.clone(),
        freshness: Freshness {
            cache_ttl: args.freshness.participants_cache_ttl,
            stale_threshold: args.freshness.participants_stale_threshold,
            due_age: args.freshness.due_age(),
            lazy_update: args.participants_enable_lazy_update,
        },
        integration_enabled,
        refresh_dedup_ttl: args.participants_refresh_dedup_ttl,
        searches: read_path::search_gate::SearchGate::new(
            args.costly_searches_per_user_per_minute,
            args.costly_search_concurrency as usize,
            (args.search_scan_budget_mb as usize) << 20,
        ),
    });
    let refresh_gate = Arc::new(refresh_gate::RefreshGate::new(
        args.participants_refresh_per_user_per_minute,
        args.participants_refresh_max_waiters as usize,
    ));
    tokio::spawn({
        let gate = refresh_gate.clone();
        let reads = reads.clone();
        let cancel = background.clone();
        async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(60)) => {
                        gate.forget_idle();
                        reads.searches.forget_idle();
                    }
                }
            }
        }
    });
    let state = AppState {
        db: db.clone(),
        cache,
        reads,
        tokens: auth::TokenVerifier::new(&args.jwt_secret, &args.jwt_audience),
        metrics,
        waiters,
        refresh_gate: refresh_gate.clone(),
        settings: Arc::new(Settings {
            integration_enabled,
            refresh_wait: args.participants_refresh_wait,
            redis_wait_replicas: args.redis_wait_replicas,
            request_timeout: args.request_timeout,
            debug_panic_route: args.debug_panic_route,
        }),
    };

    let address = listener
        .local_addr()
        .context("listener has no local address")?;
    tracing::info!(%address, redis = !args.redis.disable_redis, integration = integration_enabled, "api listening");

    let draining = CancellationToken::new();
    let drain_signal = draining.clone();
    let server = axum::serve(listener, routes::router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        drain_signal.cancel();
    });
    let result = tokio::select! {
        result = server => result.context("http server failed"),
        () = async { draining.cancelled().await; tokio::time::sleep(DRAIN_DEADLINE).await } => {
            tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "in-flight requests did not finish in time");
            Ok(())
        }
    };
    background.cancel();
    db.close().await;
    tracing::info!("api stopped");
    result
}

/// How long a migration waits for a lock by default (`MIGRATE_LOCK_TIMEOUT`).
pub const MIGRATE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts after a lock timeout before `api migrate` gives up.
const MIGRATE_ATTEMPTS: u32 = 20;
/// The advisory lock that keeps two `api migrate` apart (pods starting together).
const MIGRATE_LOCK_KEY: i64 = 0x7061_7274_6963_6970; // "particip"

/// Applies every embedded migration. Safe to run twice and on the legacy chat-service schema.
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
    let timeout_ms = lock_timeout.as_millis().max(1).to_string();
    let options = shared::db::connect_options(database)?.options([
        ("lock_timeout", timeout_ms.as_str()),
        // Index builds may take long; only the lock waits are bounded.
        ("statement_timeout", "0"),
    ]);
    let mut attempt = 1;
    loop {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(
                database
                    .database_acquire_timeout
                    .max(Duration::from_secs(10)),
            )
            .connect_with(options.clone())
            .await
            .context("cannot connect to DATABASE_URL")?;
        let result = async {
            // One migrating process at a time, waited for without a blocking lock call: a
            // session blocked in pg_advisory_lock holds a snapshot, which a concurrent index
            // build of the other process would wait for (a deadlock).
            let mut told = false;
            while !sqlx::query_scalar::<_, bool>("select pg_try_advisory_lock($1)")
                .bind(MIGRATE_LOCK_KEY)
                .fetch_one(&pool)
                .await?
            {
                if !told {
                    tracing::info!("another api migrate runs; waiting for it");
                    told = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let repaired = shared::db::repair_rewritten_checksums(&pool).await?;
            if repaired > 0 {
                tracing::info!(
                    migrations = repaired,
                    "recorded the new text of migrations rewritten without changing the schema"
                );
            }
            let dropped = shared::db::drop_invalid_indexes(&pool).await?;
            if !dropped.is_empty() {
                tracing::warn!(indexes = ?dropped, "dropped indexes a failed concurrent build left invalid; building them again");
            }
            shared::db::MIGRATOR.run(&pool).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        // A new session per attempt: nothing (an advisory lock, a failed transaction) carries over.
        pool.close().await;
        match result {
            Ok(()) => break,
            Err(error) if is_retryable(&error) && attempt < MIGRATE_ATTEMPTS => {
                let pause = Duration::from_secs(u64::from(attempt).min(30));
                tracing::warn!(attempt, pause_s = pause.as_secs(), lock_timeout_ms = lock_timeout.as_millis() as u64,
                    "a migration waited longer than MIGRATE_LOCK_TIMEOUT for a table in use; rolled back, trying again");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            Err(error) => return Err(error).context("migration failed"),
        }
    }
    let applied = shared::db::MIGRATOR.iter().count();
    tracing::info!(migrations = applied, "database is up to date");
    Ok(())
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
