//! The `syncd` binary's library. `run` is the daemon (tests call it as `main` does); `sweep`
//! and `refresh` are the one-shot commands.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod config;
pub mod events;
pub mod heartbeat;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod refresh;
pub mod report;
pub mod store;
pub mod stream;
pub mod sweep;
pub mod token;

use crate::config::{RefreshArgs, RunArgs, SweepArgs, SyncArgs};
use crate::events::settings::UpdatesMode;
use crate::metrics::Metrics;
use crate::refresh::limiter::{Limiter, Urgency};
use crate::refresh::{Outcome, Refresher, RefresherParts};
use crate::sweep::{Progress, Sweeper};
use crate::token::TokenState;
use shared::sweeps::SweepKind;

/// The pieces every command builds from `SyncArgs`.
struct Parts {
    db: sqlx::PgPool,
    redis: fred::prelude::Client,
    metrics: Metrics,
    refresher: Refresher,
}

fn max_client(args: &SyncArgs) -> anyhow::Result<refresh::max::MaxClient> {
    refresh::max::MaxClient::new(
        &args.max_api_url,
        args.max_api_token.clone(),
        args.participants_max_api_timeout,
    )
}

async fn build(args: &SyncArgs) -> anyhow::Result<Parts> {
    let metrics = Metrics::new();
    let db = shared::db::pool(&args.database)?;
    let redis = shared::redis::connect(&args.redis)?;
    let token = TokenState::new(metrics.clone());
    let max = max_client(args)?;
    let refresher = Refresher::new(RefresherParts {
        max,
        limiter: Limiter::new(redis.clone(), args.max_api_rps),
        redis: redis.clone(),
        db: db.clone(),
        metrics: metrics.clone(),
        token,
        cache_ttl: args.freshness.participants_cache_ttl,
        retries: args.participants_max_retries,
        batch_size: args.participants_batch_size as usize,
    });
    Ok(Parts {
        db,
        redis,
        metrics,
        refresher,
    })
}

/// A consumer name unique to this process.
fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "syncd".to_owned());
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{host}-{}-{suffix}", std::process::id())
}

/// Runs the daemon until `shutdown` resolves: stream consumer, sweeps, heartbeat, and
/// `/metrics` + `/health` on `listener`. On shutdown it stops taking work, gives in-flight work
/// `shutdown_grace` to finish, hands back what is left (unacknowledged entries, released
/// sweeps), and returns.
pub async fn run(
    args: RunArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let parts = build(&args.sync).await?;
    let webhook = bind_webhook(&args).await?;
    let name = args
        .consumer_name
        .clone()
        .unwrap_or_else(default_consumer_name);
    // Blocking reads wait up to a second on the server; give them room beyond that. One
    // connection per lane, so that neither lane's blocking read holds the other up.
    let reader_args = shared::config::RedisArgs {
        redis_timeout: args.sync.redis.redis_timeout + Duration::from_secs(2),
        ..args.sync.redis.clone()
    };
    let lanes = stream::Lane::both(
        shared::redis::connect(&reader_args)?,
        shared::redis::connect(&reader_args)?,
    );
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let address = listener
        .local_addr()
        .context("listener has no local address")?;
    let liveness = http::Liveness::default();
    let http_state = http::HttpState {
        metrics: parts.metrics.clone(),
        token: parts.refresher.token().clone(),
        db: parts.db.clone(),
        redis: parts.redis.clone(),
        consumer: name.clone(),
        liveness: liveness.clone(),
    };
    let http_cancel = cancel.clone();
    tracker.spawn(async move {
        let served = axum::serve(listener, http::router(http_state))
            .with_graceful_shutdown(async move { http_cancel.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(error = %error, "syncd http server failed");
        }
    });
    tracker.spawn({
        let redis = parts.redis.clone();
        let cancel = cancel.clone();
        async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = shared::redis::check_eviction_policy(&redis) => {}
            }
        }
    });
    tracker.spawn(heartbeat::run_heartbeat(
        parts.redis.clone(),
        name.clone(),
        parts.refresher.token().clone(),
        cancel.clone(),
    ));
    let consumer = stream::Consumer {
        name: name.clone(),
        redis: parts.redis.clone(),
        db: parts.db.clone(),
        refresher: parts.refresher.clone(),
        metrics: parts.metrics.clone(),
        claim_idle: args.claim_idle,
        max_deliveries: args.max_deliveries,
        due_age: args.sync.freshness.due_age(),
        inactive_recheck: args.sync.participants_inactive_recheck,
        cache_ttl: args.sync.freshness.participants_cache_ttl,
        liveness,
    };
    tracker.spawn(consumer.run(lanes, cancel.clone()));
    let sweeper = Sweeper {
        db: parts.db.clone(),
        redis: parts.redis.clone(),
        refresher: parts.refresher.clone(),
        metrics: parts.metrics.clone(),
        owner: name.clone(),
        stale_threshold: args.sync.freshness.participants_stale_threshold,
        due_age: args.sync.freshness.due_age(),
        inactive_recheck: args.sync.participants_inactive_recheck,
        schedules: args.schedule.schedules().map_err(anyhow::Error::msg)?,
        rps: args.sync.max_api_rps,
    };
    tracker.spawn(sweeper.run_scheduler(args.participants_enable_background_sync, cancel.clone()));
    spawn_events(&args, &parts, &name, webhook, &tracker, &cancel)?;
    tracker.close();
    tracing::info!(%address, consumer = %name, rps = args.sync.max_api_rps,
        background_sync = args.participants_enable_background_sync, "syncd running");

    shutdown.await;
    tracing::info!("stopping: no new work is taken, and no new MAX call or retry starts");
    // Calls in flight finish (within the MAX timeout) and their results are written; what was
    // not asked stays pending for another replica, and sweeps are handed back.
    parts.refresher.stop();
    cancel.cancel();
    if tokio::time::timeout(args.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = args.shutdown_grace.as_secs(),
            "in-flight work outlasted the grace period; what it held stays pending for another replica"
        );
    }
    // Closing waits for connections in use; a dead Postgres must not hold the exit.
    let _ = tokio::time::timeout(Duration::from_millis(500), parts.db.close()).await;
    tracing::info!("syncd stopped");
    Ok(())
}

/// The webhook receiver's listener in webhook mode, bound before any task starts.
async fn bind_webhook(args: &RunArgs) -> anyhow::Result<Option<TcpListener>> {
    match args.events.max_updates_mode {
        UpdatesMode::Webhook => {
            let address = args.events.webhook_addr;
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on SYNCD_WEBHOOK_ADDR {address}"))?;
            Ok(Some(listener))
        }
        UpdatesMode::Off | UpdatesMode::Poll | UpdatesMode::Stream => Ok(None),
    }
}

/// The membership events intake of the mode in force: the webhook receiver and its
/// subscription check (webhook mode) or the long poller (poll mode), and the events consumer,
/// which decides each update's effects without carrying them out yet
/// (`events::intake::NotWired`).
fn spawn_events(
    args: &RunArgs,
    parts: &Parts,
    name: &str,
    webhook: Option<TcpListener>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mode = args.events.max_updates_mode;
    let stream = match mode {
        UpdatesMode::Off => return Ok(()),
        UpdatesMode::Webhook | UpdatesMode::Poll => shared::keys::EVENTS_STREAM.to_owned(),
        UpdatesMode::Stream => args
            .events
            .max_updates_stream
            .clone()
            .context("MAX_UPDATES_STREAM is required when MAX_UPDATES_MODE=stream")?,
    };
    if let Some(listener) = webhook {
        let secret = args
            .events
            .max_webhook_secret
            .clone()
            .context("MAX_WEBHOOK_SECRET is required when MAX_UPDATES_MODE=webhook")?;
        let address = listener
            .local_addr()
            .context("webhook listener has no local address")?;
        let receiver =
            events::webhook::Receiver::new(parts.redis.clone(), secret, parts.metrics.clone());
        tracker.spawn(events::webhook::serve(listener, receiver, cancel.clone()));
        tracing::info!(%address, path = events::webhook::PATH, "webhook receiver listening");
        tracker.spawn(events::subscription::watch(
            max_client(&args.sync)?,
            Limiter::new(parts.redis.clone(), args.sync.max_api_rps),
            parts.metrics.clone(),
            args.events.max_subscription_check,
            cancel.clone(),
        ));
    }
    if mode == UpdatesMode::Poll {
        let poller = events::poll::Poller {
            max: max_client(&args.sync)?,
            redis: parts.redis.clone(),
            owner: name.to_owned(),
            metrics: parts.metrics.clone(),
            timeout: args.events.max_updates_poll_timeout,
            call_timeout: args.sync.participants_max_api_timeout,
            retention: args.events.max_updates_retention,
        };
        tracker.spawn(poller.run(cancel.clone()));
    }
    let reader_args = shared::config::RedisArgs {
        redis_timeout: args.sync.redis.redis_timeout + Duration::from_secs(2),
        ..args.sync.redis.clone()
    };
    let intake = events::intake::Intake {
        consumer: name.to_owned(),
        redis: parts.redis.clone(),
        reader: shared::redis::connect(&reader_args)?,
        stream,
        mode,
        claim_idle: args.claim_idle,
        metrics: parts.metrics.clone(),
        registers: events::intake::NotWired,
        not_updates: Default::default(),
    };
    tracker.spawn(intake.run(cancel.clone()));
    Ok(())
}

/// `syncd sweep`: the schedule's current slot of the kind, swept once across the fleet: run here,
/// or awaited when a replica (or another `syncd sweep`) already runs it; then exit.
pub async fn sweep_once(
    args: SweepArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<sweep::Summary> {
    let parts = build(&args.sync).await?;
    let kind = if args.full {
        SweepKind::Full
    } else {
        SweepKind::Stale
    };
    let owner = format!("sweep-{}", default_consumer_name());
    let sweeper = Sweeper {
        db: parts.db.clone(),
        redis: parts.redis.clone(),
        refresher: parts.refresher.clone(),
        metrics: parts.metrics.clone(),
        owner,
        stale_threshold: args.sync.freshness.participants_stale_threshold,
        due_age: args.sync.freshness.due_age(),
        inactive_recheck: args.sync.participants_inactive_recheck,
        schedules: args.schedule.schedules().map_err(anyhow::Error::msg)?,
        rps: args.sync.max_api_rps,
    };
    let progress = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{} sweep", kind.as_str()));
        Progress::Bar(bar)
    } else {
        Progress::Log
    };
    let cancel = CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        let refresher = parts.refresher.clone();
        tokio::spawn(async move {
            shutdown.await;
            // As in the daemon: no MAX call or retry starts after the signal.
            refresher.stop();
            cancel.cancel();
        })
    };
    let start = sweep::Start::of(args.scheduled, args.job_name.as_deref(), chrono::Utc::now());
    if args.scheduled && start == sweep::Start::ByHand {
        tracing::info!(
            job = args.job_name.as_deref().unwrap_or("-"),
            "this Job was not made by the CronJob's schedule (made by hand from it): sweeping now"
        );
    }
    let summary = sweeper.run_command(kind, start, &progress, &cancel).await;
    if let Progress::Bar(bar) = &progress {
        bar.finish();
    }
    watcher.abort();
    let _ = tokio::time::timeout(Duration::from_millis(500), parts.db.close()).await;
    summary
}

/// `syncd refresh`: refreshes the named chats now; returns one line per chat.
pub async fn refresh_once(args: RefreshArgs) -> anyhow::Result<Vec<String>> {
    let parts = build(&args.sync).await?;
    let targets = store::targets_by_id(&parts.db, &args.chat_ids).await?;
    let mut lines = Vec::new();
    for id in &args.chat_ids {
        if !targets.iter().any(|t| t.chat_id == *id) {
            lines.push(format!("{id}\tnot found"));
        }
    }
    let max_ids: std::collections::HashMap<i32, String> = targets
        .iter()
        .map(|t| {
            (
                t.chat_id,
                t.max_chat_id.clone().unwrap_or_else(|| "-".to_owned()),
            )
        })
        .collect();
    let outcomes = parts
        .refresher
        .refresh(targets, Urgency::Manual, None)
        .await?;
    for (chat_id, outcome) in outcomes {
        let max_id = max_ids.get(&chat_id).cloned().unwrap_or_default();
        lines.push(match outcome {
            Outcome::Fresh { count, asked_at } => format!(
                "{chat_id}\t{max_id}\tupdated\t{count}\t{}",
                asked_at.to_rfc3339()
            ),
            Outcome::Gone { status, .. } => format!("{chat_id}\t{max_id}\tunavailable\t{status}"),
            Outcome::Failed { reason, .. } => format!("{chat_id}\t{max_id}\tfailed\t{reason}"),
            Outcome::TokenInvalid => format!("{chat_id}\t{max_id}\tfailed\tinvalid_token"),
        });
    }
    parts.db.close().await;
    let _ = parts.redis;
    Ok(lines)
}
