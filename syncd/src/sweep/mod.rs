//! Sweeps: the stale and full sweeps on their cron schedules (`schedule`), the sweeps operators
//! ask for, and the work of one sweep, page by page.
//!
//! Each schedule has a loop of its own, so a long full sweep never holds a stale slot back. A
//! loop wakes at its next slot (or when the cron trigger fires) and claims the due slot in
//! `sync_sweeps`; the claim decides who runs, so each slot runs once across the fleet, and never
//! beside another sweep of its kind: a slot that comes while one runs is recorded as covered by
//! it. Only the newest due slot is considered, so slots missed during downtime run once; a fleet
//! with no recorded run waits for the next slot. The owner renews a lease as it advances; a
//! sweep whose owner died, or that an operator asked for, is taken over and resumes from its
//! recorded position.

pub mod command;
mod run;
pub mod schedule;

pub use command::{How, Start, Summary};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::ProgressBar;
use shared::sweeps::{self, StartedBy, SweepKind};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::refresh::Refresher;
use crate::store::{self, Claim};
use schedule::{Schedule, Schedules, Trigger, MAX_NAP};

/// How long a claim holds without renewal; renewed after every page.
pub const LEASE: Duration = Duration::from_secs(120);
/// Share of one interval's rate budget a stale sweep plans for; the rest is left to lazy and
/// manual refreshes.
const STALE_BUDGET_SHARE: f64 = 0.8;
/// The interval a stale sweep budgets for when its schedule is off (`syncd sweep --stale`).
const STALE_PERIOD_UNSCHEDULED: Duration = Duration::from_secs(900);
/// How long finished sweeps stay in `sync_sweeps` (`GET /admin/participants/sweeps` reads them).
pub(super) const SWEEPS_KEPT: Duration = Duration::from_secs(30 * 86_400);
/// How often a replica looks for sweeps to take over (asked for, or orphaned).
pub(super) const REQUESTS_EVERY: Duration = Duration::from_secs(2);

/// A loop's failures, logged once per streak: the first as a warning with its cause, the rest
/// at debug level, and the recovery once.
struct Streak {
    what: &'static str,
    kind: &'static str,
    failed: u32,
}

impl Streak {
    fn new(what: &'static str, kind: &'static str) -> Self {
        Self {
            what,
            kind,
            failed: 0,
        }
    }

    fn note(&mut self, result: anyhow::Result<()>) {
        match result {
            Ok(()) if self.failed > 0 => {
                tracing::info!(
                    kind = self.kind,
                    failed = self.failed,
                    "{} works again",
                    self.what
                );
                self.failed = 0;
            }
            Ok(()) => {}
            Err(error) => {
                if self.failed == 0 {
                    tracing::warn!(
                        kind = self.kind,
                        error = format!("{error:#}"),
                        "{} failed; retrying (logged again when it works)",
                        self.what
                    );
                } else {
                    tracing::debug!(
                        kind = self.kind,
                        error = format!("{error:#}"),
                        "{} still failing",
                        self.what
                    );
                }
                self.failed += 1;
            }
        }
    }
}

/// How a sweep reports progress: a bar on a terminal, log lines otherwise.
pub enum Progress {
    Log,
    Bar(ProgressBar),
}

pub struct Sweeper {
    pub db: PgPool,
    pub redis: fred::prelude::Client,
    pub refresher: Refresher,
    pub metrics: Metrics,
    pub owner: String,
    pub stale_threshold: Duration,
    /// Age at which a count is due for the stale sweep (threshold less refresh-ahead).
    pub due_age: Duration,
    pub inactive_recheck: Duration,
    pub schedules: Schedules,
    pub rps: f64,
}

impl Sweeper {
    fn page_size(&self) -> i64 {
        let batch = self.refresher.batch_size() as i64;
        ((self.rps * 10.0) as i64).clamp(batch, 1000.max(batch))
    }

    /// What a stale sweep of `slot` may ask: its share of the budget until the next slot.
    fn stale_budget(&self, slot: DateTime<Utc>) -> i64 {
        let period = self
            .schedules
            .stale
            .as_ref()
            .and_then(|s| s.period_after(slot))
            .unwrap_or(STALE_PERIOD_UNSCHEDULED);
        ((self.rps * period.as_secs_f64() * STALE_BUDGET_SHARE) as i64).max(1)
    }

    /// Runs the scheduled sweeps (when `background_sync`) and the sweeps operators ask for,
    /// until `cancel`.
    /// Keeps the gauges an alert needs to see a late full sweep: the schedule's period and when
    /// the fleet's last full sweep finished (from Postgres, so every replica reports the same).
    async fn publish_full_sweep_gauges(self: Arc<Self>, cancel: CancellationToken) {
        let now = Utc::now();
        let period = self
            .schedules
            .of(SweepKind::Full)
            .and_then(|schedule| schedule.period_after(schedule.latest(now).unwrap_or(now)))
            .unwrap_or(Duration::from_secs(86_400));
        self.metrics
            .full_sweep_interval
            .set(period.as_secs() as i64);
        loop {
            if let Ok(Some(finished)) = store::last_finished(&self.db, SweepKind::Full).await {
                self.metrics.full_sweep_last_finished.set(finished);
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }

    pub async fn run_scheduler(self, background_sync: bool, cancel: CancellationToken) {
        let this = Arc::new(self);
        let kinds: Vec<SweepKind> = if background_sync {
            [SweepKind::Stale, SweepKind::Full]
                .into_iter()
                .filter(|kind| this.schedules.of(*kind).is_some())
                .collect()
        } else {
            Vec::new()
        };
        let trigger = Trigger::start(&this.schedules, &kinds).await;
        let tasks = TaskTracker::new();
        tasks.spawn(this.clone().run_requests(cancel.clone()));
        tasks.spawn(this.clone().publish_full_sweep_gauges(cancel.clone()));
        for kind in kinds {
            let Some(schedule) = this.schedules.of(kind).cloned() else {
                continue;
            };
            for line in this.schedules.describe(Utc::now()) {
                if line.starts_with(kind.as_str()) {
                    tracing::info!(kind = kind.as_str(), schedule = %line, "sweep schedule");
                }
            }
            tasks.spawn(this.clone().run_schedule(
                kind,
                schedule,
                trigger.waker(kind),
                cancel.clone(),
            ));
        }
        tasks.close();
        tasks.wait().await;
        trigger.shutdown().await;
    }

    /// The loop of one schedule: at each slot (woken by the cron trigger, or by its own timer
    /// set to the next slot), claim the due slot and run it.
    async fn run_schedule(
        self: Arc<Self>,
        kind: SweepKind,
        schedule: Schedule,
        wake: Arc<tokio::sync::Notify>,
        cancel: CancellationToken,
    ) {
        let started = Utc::now();
        let mut failures = Streak::new("sweep scheduling", kind.as_str());
        while !cancel.is_cancelled() {
            failures.note(self.run_due_slot(kind, &schedule, started, &cancel).await);
            let now = Utc::now();
            let until_next = schedule
                .next_after(now)
                .and_then(|next| (next - now).to_std().ok())
                .unwrap_or(MAX_NAP)
                .min(MAX_NAP);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(until_next + Duration::from_millis(5)) => {}
                () = wake.notified() => {}
            }
        }
    }

    async fn run_due_slot(
        &self,
        kind: SweepKind,
        schedule: &Schedule,
        started: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        if !self.refresher.token().reported_valid() {
            // MAX calls are stopped (said once, where they stopped); the slot waits for them.
            return Ok(());
        }
        let last = sweeps::last_scheduled_slot(&self.db, kind).await?;
        let Some(slot) = schedule::due_slot(schedule, Utc::now(), last, started) else {
            return Ok(());
        };
        match store::claim_slot(
            &self.db,
            kind,
            slot,
            &self.owner,
            LEASE,
            StartedBy::Schedule,
        )
        .await?
        {
            Claim::Claimed(sweep) => {
                tracing::info!(kind = kind.as_str(), %slot, "claimed a sweep slot");
                self.run(sweep, &Progress::Log, cancel).await?;
            }
            Claim::Covered(running) => tracing::info!(
                kind = kind.as_str(), %slot, running = %running.slot,
                "a sweep of this kind is still running; it serves this slot too"
            ),
            Claim::Taken(_) => {}
        }
        Ok(())
    }

    /// Takes over the sweeps nobody runs: asked for by an admin, handed back by a replica that
    /// stopped, or left by one that died.
    async fn run_requests(self: Arc<Self>, cancel: CancellationToken) {
        let mut failures = Streak::new("taking over sweeps", "any");
        while !cancel.is_cancelled() {
            failures.note(self.take_requests(&cancel).await);
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(REQUESTS_EVERY) => {}
            }
        }
    }

    async fn take_requests(&self, cancel: &CancellationToken) -> anyhow::Result<()> {
        if !self.refresher.token().reported_valid() {
            // MAX calls are stopped: a sweep taken now would hand itself back at once.
            return Ok(());
        }
        // The Redis flag of the api before 2026-12: honoured while such an api may still run.
        let requested: Result<Option<i64>, _> =
            fred::prelude::KeysInterface::getdel(&self.redis, shared::keys::FULL_SWEEP_REQUEST)
                .await;
        if let Ok(Some(_)) = requested {
            match sweeps::request(&self.db, SweepKind::Full, StartedBy::Admin, None).await? {
                sweeps::Requested::Recorded(sweep) => {
                    tracing::info!(slot = %sweep.slot, "full sweep requested by an operator")
                }
                sweeps::Requested::AlreadyRunning(running) => {
                    tracing::info!(running = %running.slot, "full sweep requested while one runs; nothing to add")
                }
            }
        }
        while !cancel.is_cancelled() {
            let Some(sweep) = store::take_over_orphan(&self.db, &self.owner, LEASE).await? else {
                break;
            };
            tracing::info!(kind = %sweep.kind, slot = %sweep.slot, done = sweep.done, "taking over a sweep");
            self.run(sweep, &Progress::Log, cancel).await?;
        }
        Ok(())
    }
}
