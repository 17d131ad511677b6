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

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use indicatif::ProgressBar;
use shared::sweeps::{self, StartedBy, SweepKind, SweepRecord, SweepState};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limiter::Urgency;
use crate::metrics::Metrics;
use crate::refresher::Refresher;
use crate::schedule::{self, Schedule, Schedules, Trigger, MAX_NAP};
use crate::store::{self, Claim, Sweep};

/// How long a claim holds without renewal; renewed after every page.
pub const LEASE: Duration = Duration::from_secs(120);
/// Share of one interval's rate budget a stale sweep plans for; the rest is left to lazy and
/// manual refreshes.
const STALE_BUDGET_SHARE: f64 = 0.8;
/// The interval a stale sweep budgets for when its schedule is off (`syncd sweep --stale`).
const STALE_PERIOD_UNSCHEDULED: Duration = Duration::from_secs(900);
/// How long finished sweeps stay in `sync_sweeps` (`GET /admin/participants/sweeps` reads them).
const SWEEPS_KEPT: Duration = Duration::from_secs(30 * 86_400);
/// How often a replica looks for sweeps to take over (asked for, or orphaned).
const REQUESTS_EVERY: Duration = Duration::from_secs(2);

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

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub planned: i64,
    pub done: i64,
    pub failed: i64,
    pub finished: bool,
    pub how: How,
}

/// Who swept: this process, another one this process followed, or nobody now (the scheduled
/// slot had been swept before).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum How {
    #[default]
    Ran,
    Followed,
    /// The slot was swept before; nothing ran. The sweep that served it and when it ended.
    AlreadySwept {
        slot: DateTime<Utc>,
        finished_at: Option<DateTime<Utc>>,
    },
}

impl Summary {
    fn of(record: &SweepRecord, how: How) -> Self {
        Self {
            planned: record.planned.unwrap_or_default().into(),
            done: record.done.into(),
            failed: record.failed.into(),
            finished: record.finished_at.is_some(),
            how,
        }
    }
}

/// How `syncd sweep` was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// As the schedule's trigger: the schedule's current slot, once.
    Scheduled,
    /// By a person: a sweep now, or the running one followed.
    ByHand,
}

impl Start {
    /// `--scheduled` in a Job the CronJob made on its schedule is the schedule's trigger; in a
    /// Job made by hand from the CronJob (`kubectl create job --from=cronjob/...`, which copies
    /// the arguments) it is not. The CronJob controller names its Jobs
    /// `<cronjob>-<scheduled minute since 1970>`.
    pub fn of(scheduled: bool, job_name: Option<&str>, now: DateTime<Utc>) -> Self {
        if !scheduled {
            return Start::ByHand;
        }
        let Some(name) = job_name.filter(|n| !n.is_empty()) else {
            return Start::Scheduled;
        };
        let minute = name
            .rsplit_once('-')
            .and_then(|(_, minute)| minute.parse::<i64>().ok());
        match minute {
            // Within a day of now: a CronJob's Job, possibly started late or retried.
            Some(minute) if (now.timestamp() / 60 - minute).abs() <= 24 * 60 => Start::Scheduled,
            _ => Start::ByHand,
        }
    }
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
        while !cancel.is_cancelled() {
            if let Err(error) = self.run_due_slot(kind, &schedule, started, &cancel).await {
                tracing::warn!(
                    kind = kind.as_str(),
                    error = format!("{error:#}"),
                    "sweep scheduling failed; retrying"
                );
            }
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
        while !cancel.is_cancelled() {
            if let Err(error) = self.take_requests(&cancel).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "taking over sweeps failed; retrying"
                );
            }
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

    /// `syncd sweep`. Scheduled: takes the schedule's current slot of `kind` and runs it (or
    /// resumes it after a pod that stopped), follows the process that runs it, or reports that
    /// it was swept before, without sweeping. By hand: sweeps now, or follows the sweep of the
    /// kind already running. It never reports a sweep it did not run as its own.
    pub async fn run_command(
        &self,
        kind: SweepKind,
        start: Start,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Summary> {
        let now = Utc::now();
        let mut slot = match start {
            Start::Scheduled => self.schedules.command_slot(kind, now),
            Start::ByHand => now.with_nanosecond(0).unwrap_or(now),
        };
        loop {
            let watched = match store::claim_slot(
                &self.db,
                kind,
                slot,
                &self.owner,
                LEASE,
                StartedBy::Command,
            )
            .await?
            {
                Claim::Claimed(sweep) => {
                    tracing::info!(kind = kind.as_str(), %slot, ?start, "sweeping");
                    return self.run(sweep, progress, cancel).await;
                }
                Claim::Taken(record) if record.finished_at.is_some() => {
                    let served = record.covered_by.unwrap_or(record.slot);
                    let record = store::sweep_record(&self.db, kind, served)
                        .await?
                        .unwrap_or(record);
                    tracing::info!(kind = kind.as_str(), %slot, served_by = %served,
                        "this slot was already swept; nothing to run (without --scheduled, syncd sweep sweeps now)");
                    let how = How::AlreadySwept {
                        slot: served,
                        finished_at: record.finished_at,
                    };
                    return Ok(Summary::of(&record, how));
                }
                Claim::Taken(record) | Claim::Covered(record) => record,
            };
            if matches!(watched.state(), SweepState::Waiting | SweepState::Orphaned)
                && watched.slot != slot
            {
                // The sweep of the kind that serves this one is not running anywhere (handed
                // back, or its owner died): take it over and resume it here.
                slot = watched.slot;
                continue;
            }
            tracing::info!(kind = kind.as_str(), slot = %watched.slot, owner = watched.owner.as_deref().unwrap_or("-"),
                "another process runs this sweep; following it");
            match self.watch(&watched, progress, cancel).await? {
                Some(summary) => return Ok(summary),
                // Its owner stopped: claim again, which takes it over.
                None if !cancel.is_cancelled() => continue,
                None => return Ok(Summary::of(&watched, How::Followed)),
            }
        }
    }

    /// Follows a sweep another process runs until it finishes (its summary) or is orphaned
    /// (`None`).
    async fn watch(
        &self,
        sweep: &SweepRecord,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<Summary>> {
        loop {
            let Some(record) = store::sweep_record(&self.db, sweep.kind, sweep.slot).await? else {
                anyhow::bail!("the sweep of {} disappeared from sync_sweeps", sweep.slot);
            };
            if let Progress::Bar(bar) = progress {
                bar.set_length(record.planned.unwrap_or_default().max(0) as u64);
                bar.set_position(record.done.max(0) as u64);
            }
            match record.state() {
                SweepState::Finished | SweepState::Covered => {
                    return Ok(Some(Summary::of(&record, How::Followed)))
                }
                SweepState::Orphaned => return Ok(None),
                SweepState::Running | SweepState::Waiting => {}
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(None),
                () = tokio::time::sleep(REQUESTS_EVERY) => {}
            }
        }
    }

    /// Runs `work` while renewing the sweep's lease every quarter lease. A page may take far
    /// longer than usual when lazy and manual work takes the whole MAX budget (they go first);
    /// the replica is alive and the sweep is still its own.
    async fn keeping_lease<T>(
        &self,
        sweep: &Sweep,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + LEASE / 4, LEASE / 4);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = renew.tick() => {
                    // `sweep` is still the progress recorded after the last page: rewriting it
                    // changes nothing but the lease.
                    match store::advance_sweep(&self.db, sweep, &self.owner, LEASE).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(kind = %sweep.kind, "the sweep's lease went to another replica"),
                        Err(error) => tracing::warn!(error = %error, "could not renew the sweep's lease"),
                    }
                }
            }
        }
    }

    /// Releases a sweep on shutdown (at its last recorded position) for another replica.
    async fn hand_back(&self, sweep: &Sweep, planned: i64) -> anyhow::Result<Summary> {
        store::release_sweep(&self.db, sweep, &self.owner).await?;
        tracing::info!(kind = %sweep.kind, done = sweep.done, "sweep handed back for another replica to resume");
        Ok(Summary {
            planned,
            done: sweep.done.into(),
            failed: sweep.failed.into(),
            finished: false,
            how: How::Ran,
        })
    }

    /// What grows with time is trimmed after a sweep: old sweep records, and (after a full
    /// sweep) the read weights, which decay.
    async fn tidy_after(&self, kind: SweepKind) {
        if let Err(error) = store::prune_sweeps(&self.db, SWEEPS_KEPT).await {
            tracing::debug!(error = %error, "could not prune old sweep records");
        }
        if kind == SweepKind::Full {
            if let Err(error) = store::decay_reads(&self.db).await {
                tracing::warn!(error = %error, "could not decay the read weights");
            }
        }
    }

    /// Runs (or resumes) one claimed sweep to its end, or until `cancel`, when it is handed
    /// back for another replica to resume.
    pub async fn run(
        &self,
        mut sweep: Sweep,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Summary> {
        let kind = sweep.kind;
        let now = Utc::now();
        let recheck_before =
            now - chrono::Duration::from_std(self.inactive_recheck).unwrap_or_default();
        let page_size = self.page_size();
        if sweep.planned.is_none() {
            sweep.planned = Some(match kind {
                SweepKind::Full => {
                    sqlx::query_scalar::<_, i64>("select count(*) from chats")
                        .fetch_one(&self.db)
                        .await? as i32
                }
                SweepKind::Stale => self.stale_budget(sweep.slot) as i32,
            });
        }
        let planned = i64::from(sweep.planned.unwrap_or_default());
        if let Progress::Bar(bar) = progress {
            bar.set_length(planned.max(0) as u64);
            bar.set_position(sweep.done.max(0) as u64);
        }
        let label = kind.as_str();
        self.metrics
            .sweep_planned
            .with_label_values(&[label])
            .set(planned);
        let started = std::time::Instant::now();
        loop {
            if cancel.is_cancelled() {
                return self.hand_back(&sweep, planned).await;
            }
            let page = match kind {
                SweepKind::Full => {
                    store::targets_after(&self.db, sweep.position, page_size).await?
                }
                SweepKind::Stale => {
                    let left = (planned - i64::from(sweep.done)).min(page_size);
                    if left <= 0 {
                        Vec::new()
                    } else {
                        let now = Utc::now();
                        let stale_before =
                            now - chrono::Duration::from_std(self.due_age).unwrap_or_default();
                        store::stale_targets(&self.db, now, stale_before, recheck_before, left)
                            .await?
                    }
                }
            };
            let Some(last) = page.last() else { break };
            let last_id = last.chat_id;
            let page_len = page.len() as i32;
            let due: Vec<_> = page
                .into_iter()
                .filter(|t| t.is_due(recheck_before))
                .collect();
            let outcomes = self
                .keeping_lease(
                    &sweep,
                    self.refresher.refresh(due, Urgency::Sweep, Some(cancel)),
                )
                .await?;
            if cancel.is_cancelled() {
                // Part of this page was not asked: hand the sweep back at the page's start, so
                // the replica that resumes it redoes the page rather than skip chats.
                return self.hand_back(&sweep, planned).await;
            }
            let asked = outcomes.iter().filter(|(_, o)| o.asked_max()).count() as i32;
            if outcomes.iter().any(|(_, o)| o.stopped_calls()) {
                // MAX calls stopped (the token rejected, or 403/404 for nearly every chat), and
                // part of the page got no answer: hand the sweep back at the page's start (with
                // the calls made), so that it resumes there once calls work rather than skip
                // chats.
                sweep.calls += asked;
                store::release_sweep(&self.db, &sweep, &self.owner).await?;
                self.metrics
                    .sweeps
                    .with_label_values(&[label, "token_invalid"])
                    .inc();
                anyhow::bail!(
                    "MAX calls stopped (see the error before this); the sweep stopped at {} of {planned} and resumes there",
                    sweep.done
                );
            }
            let failed = outcomes.iter().filter(|(_, o)| !o.is_settled()).count() as i32;
            sweep.calls += asked;
            match kind {
                SweepKind::Full => sweep.position = last_id,
                SweepKind::Stale => sweep.position += page_len,
            }
            sweep.done += page_len;
            sweep.failed += failed;
            self.metrics
                .sweep_done
                .with_label_values(&[label])
                .set(sweep.done.into());
            match progress {
                Progress::Bar(bar) => bar.set_position(sweep.done.max(0) as u64),
                Progress::Log => tracing::info!(
                    kind = label,
                    done = sweep.done,
                    planned,
                    failed = sweep.failed,
                    "sweep progress"
                ),
            }
            if !store::advance_sweep(&self.db, &sweep, &self.owner, LEASE).await? {
                tracing::warn!(
                    kind = label,
                    "lost the sweep's lease to another replica; stopping"
                );
                self.metrics
                    .sweeps
                    .with_label_values(&[label, "lost"])
                    .inc();
                return Ok(Summary {
                    planned,
                    done: sweep.done.into(),
                    failed: sweep.failed.into(),
                    finished: false,
                    how: How::Ran,
                });
            }
        }
        store::finish_sweep(&self.db, &sweep, &self.owner).await?;
        self.metrics
            .sweeps
            .with_label_values(&[label, "finished"])
            .inc();
        self.tidy_after(kind).await;
        if let Ok(stale) = store::count_stale(
            &self.db,
            Utc::now() - chrono::Duration::from_std(self.stale_threshold).unwrap_or_default(),
        )
        .await
        {
            self.metrics.stale_data_count.set(stale);
        }
        tracing::info!(
            kind = label,
            done = sweep.done,
            failed = sweep.failed,
            duration_s = started.elapsed().as_secs_f64(),
            "sweep finished"
        );
        Ok(Summary {
            planned,
            done: sweep.done.into(),
            failed: sweep.failed.into(),
            finished: true,
            how: How::Ran,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cronjobs_own_job_is_the_schedules_trigger() {
        let now: DateTime<Utc> = "2026-12-04T00:00:30Z".parse().unwrap();
        let minute = now.timestamp() / 60;
        let own = format!("participants-full-sweep-{minute}");
        let late = format!("participants-full-sweep-{}", minute - 90);
        assert_eq!(Start::of(true, Some(&own), now), Start::Scheduled);
        assert_eq!(
            Start::of(true, Some(&late), now),
            Start::Scheduled,
            "started or retried late"
        );
        assert_eq!(Start::of(true, None, now), Start::Scheduled);
        assert_eq!(Start::of(true, Some("manual-sweep"), now), Start::ByHand);
        assert_eq!(
            Start::of(true, Some("participants-full-sweep-2"), now),
            Start::ByHand
        );
        assert_eq!(Start::of(false, Some(&own), now), Start::ByHand);
    }
}
