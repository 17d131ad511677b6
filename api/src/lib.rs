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
pub mod migrate;
pub mod postgres;
pub mod read_model;
pub mod read_path;
pub mod refresh_gate;
pub mod refresh_wait;
pub mod routes;
pub mod scope;
pub mod serve;
pub mod state;
pub mod waiters;

use crate::config::ServeArgs;
pub use crate::migrate::{migrate, migrate_with, MIGRATE_LOCK_TIMEOUT};
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

/// How long a read before the first load waits for it: the request timeout less a margin, so
/// that a load that cannot finish is answered `loading` (with Retry-After), not `timeout`.
fn load_wait(request_timeout: Duration) -> Duration {
    request_timeout
        .saturating_sub(Duration::from_millis(500))
        .max(request_timeout / 2)
}

/// Serves the api on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let admin = match args.admin_listen_addr {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on API_ADMIN_LISTEN_ADDR {address}"))?,
        ),
        None => None,
    };
    run_with_admin(args, listener, admin, shutdown).await
}

/// `run`, with the admin listener (`/metrics`, `/health/detailed`) already bound, or none: then
/// the main listener serves those routes too.
pub async fn run_with_admin(
    args: ServeArgs,
    listener: TcpListener,
    admin: Option<TcpListener>,
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
    let cache = cache::Cache::connect(
        &args.redis,
        args.redis_wait_replicas,
        args.redis_client_tracking && !args.participants_integration_disabled,
        metrics.clone(),
    )?;
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

    // The read model loads in the background: until it has, reads wait for it (up to the
    // request timeout) and the readiness probe fails; after that, reads never wait on
    // Postgres again. Its task ends by itself only when DATABASE_URL cannot serve it at all.
    let model = ReadModel::new();
    let sync_settings = read_model::sync::SyncSettings::new(
        &shared::config::DatabaseArgs {
            database_statement_timeout: statement_timeout(&args),
            ..args.database.clone()
        },
        args.read_model_reconcile_interval,
        args.read_model_load_timeout,
    )?;
    let mut sync = tokio::spawn(read_model::sync::run(
        model.clone(),
        sync_settings,
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
        load_wait: load_wait(args.request_timeout),
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
        tokens: auth::TokenVerifier::new(&args.jwt_secret, &args.jwt_audience)
            .with_previous_secret(args.jwt_previous_secret.as_ref())
            .with_issuer(args.jwt_issuer.as_deref()),
        metrics,
        waiters,
        refresh_gate: refresh_gate.clone(),
        detailed_health: Arc::new(routes::health::DetailedHealthCache::new(
            args.health_detailed_cache,
        )),
        settings: Arc::new(Settings {
            integration_enabled,
            refresh_wait: args.participants_refresh_wait,
            redis_wait_replicas: args.redis_wait_replicas,
            request_timeout: args.request_timeout,
            read_model_max_age: args.read_model_max_age,
            debug_panic_route: args.debug_panic_route,
        }),
    };

    let address = listener
        .local_addr()
        .context("listener has no local address")?;
    tracing::info!(%address, redis = !args.redis.disable_redis, integration = integration_enabled, "api listening");

    let limits = serve::Limits {
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections as usize,
    };
    let router = routes::router(state);
    let public = serve::limit_concurrency(router.clone(), args.max_concurrent_requests as usize);
    let draining = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    match admin {
        Some(admin) => {
            let admin_address = admin
                .local_addr()
                .context("admin listener has no local address")?;
            tracing::info!(address = %admin_address, "api admin listening (/metrics, /health/detailed)");
            servers.spawn(serve::serve(
                listener,
                serve::without_admin_routes(public),
                limits,
                draining.clone(),
            ));
            // Prometheus and an operator: a few connections are plenty.
            let admin_limits = serve::Limits {
                max_connections: 64,
                ..limits
            };
            servers.spawn(serve::serve_admin(
                admin,
                router,
                admin_limits,
                draining.clone(),
            ));
        }
        None => {
            servers.spawn(serve::serve(listener, public, limits, draining.clone()));
        }
    }
    let drained = async { while servers.join_next().await.is_some() {} };
    tokio::pin!(drained);
    let mut unusable = None;
    tokio::select! {
        () = shutdown => {}
        () = &mut drained => {}
        ended = &mut sync => {
            unusable = Some(match ended {
                Ok(Err(unusable)) => unusable.context("the read model cannot follow DATABASE_URL"),
                // The supervisor returns by itself only with an error, and never panics.
                _ => anyhow::anyhow!("the read model's supervisor ended"),
            });
        }
    }
    draining.cancel();
    let result = tokio::select! {
        () = drained => Ok(()),
        () = tokio::time::sleep(DRAIN_DEADLINE) => {
            tracing::warn!(deadline_s = DRAIN_DEADLINE.as_secs(), "in-flight requests did not finish in time");
            Ok(())
        }
    };
    background.cancel();
    db.close().await;
    tracing::info!("api stopped");
    match unusable {
        Some(error) => Err(error),
        None => result,
    }
}
