//! Sweeps: the stale sweep every `PARTICIPANTS_UPDATE_INTERVAL`, the full sweep daily at
//! `PARTICIPANTS_FULL_UPDATE_HOUR` (UTC), and sweeps an operator asks for.
//!
//! Slots are plain arithmetic on UTC (no cron library, so no DST drift): a stale slot starts at
//! each multiple of the interval since the epoch, the full slot at the hour each day. A replica
//! runs a slot only after claiming its row in `sync_sweeps` (`insert ... on conflict do
//! nothing`), so each slot runs once across the fleet. Only the newest due slot is considered,
//! so slots missed during downtime run once; a fleet with no recorded run waits for the next
//! slot. The owner renews a lease as it advances; a sweep whose owner died is taken over and
//! resumes from its recorded position.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Timelike, Utc};
use indicatif::ProgressBar;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::limiter::Urgency;
use crate::metrics::Metrics;
use crate::refresher::{Outcome, Refresher};
use crate::store::{self, Sweep};

/// How long a claim holds without renewal; renewed after every page.
pub const LEASE: Duration = Duration::from_secs(120);
/// Share of one interval's rate budget a stale sweep plans for; the rest is left to lazy and
/// manual refreshes.
const STALE_BUDGET_SHARE: f64 = 0.8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SweepKind {
    Stale,
    Full,
}

impl SweepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SweepKind::Stale => "stale",
            SweepKind::Full => "full",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "stale" => Some(SweepKind::Stale),
            "full" => Some(SweepKind::Full),
            _ => None,
        }
    }
}

/// The newest stale slot at or before `now`.
pub fn stale_slot(now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    let step = interval.as_millis().max(1) as i64;
    let ms = now.timestamp_millis().div_euclid(step) * step;
    Utc.timestamp_millis_opt(ms).single().unwrap_or(now)
}

/// The newest full slot (`hour`:00 UTC) at or before `now`.
pub fn full_slot(now: DateTime<Utc>, hour: u32) -> DateTime<Utc> {
    let today = now
        .with_hour(hour)
        .and_then(|t| t.with_minute(0))
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    if today <= now {
        today
    } else {
        today - chrono::Duration::days(1)
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
    pub update_interval: Duration,
    pub rps: f64,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub planned: i64,
    pub done: i64,
    pub failed: i64,
    pub finished: bool,
}

impl Sweeper {
    fn page_size(&self) -> i64 {
        let batch = self.refresher.batch_size() as i64;
        ((self.rps * 10.0) as i64).clamp(batch, 1000.max(batch))
    }

    fn stale_budget(&self) -> i64 {
        ((self.rps * self.update_interval.as_secs_f64() * STALE_BUDGET_SHARE) as i64).max(1)
    }

    /// Runs the scheduled and requested sweeps until `cancel`.
    pub async fn run_scheduler(
        self,
        background_sync: bool,
        full_hour: u32,
        cancel: CancellationToken,
    ) {
        let started = Utc::now();
        while !cancel.is_cancelled() {
            if let Err(error) = self
                .tick(background_sync, full_hour, started, &cancel)
                .await
            {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "sweep scheduling failed; retrying"
                );
            }
            let now = Utc::now();
            let next_stale = stale_slot(now, self.update_interval)
                + chrono::Duration::from_std(self.update_interval).unwrap_or_default();
            let until_next = (next_stale - now).to_std().unwrap_or_default();
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(until_next.min(Duration::from_secs(5)) + Duration::from_millis(5)) => {}
            }
        }
    }

    async fn tick(
        &self,
        background_sync: bool,
        full_hour: u32,
        started: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        // An operator's request through the api: the replica that takes it records the sweep.
        let requested: Result<Option<i64>, _> =
            fred::prelude::KeysInterface::getdel(&self.redis, shared::keys::FULL_SWEEP_REQUEST)
                .await;
        if let Ok(Some(_)) = requested {
            let slot = store::request_sweep(&self.db, SweepKind::Full.as_str()).await?;
            tracing::info!(%slot, "full sweep requested by an operator");
        }
        // Sweeps an operator asked for, or that a stopped replica left unfinished.
        while !cancel.is_cancelled() {
            let Some(sweep) = store::take_over_orphan(&self.db, &self.owner, LEASE).await? else {
                break;
            };
            tracing::info!(kind = %sweep.kind, slot = %sweep.slot, done = sweep.done, "resuming a sweep");
            self.run(sweep, &Progress::Log, cancel).await?;
        }
        if !background_sync {
            return Ok(());
        }
        let now = Utc::now();
        for (kind, due) in [
            (SweepKind::Full, full_slot(now, full_hour)),
            (SweepKind::Stale, stale_slot(now, self.update_interval)),
        ] {
            if cancel.is_cancelled() {
                break;
            }
            let eligible = match store::last_slot(&self.db, kind.as_str()).await? {
                Some(last) => due > last,
                None => due >= started,
            };
            if !eligible {
                continue;
            }
            if let Some(sweep) =
                store::claim_slot(&self.db, kind.as_str(), due, &self.owner, LEASE).await?
            {
                tracing::info!(kind = kind.as_str(), slot = %due, "claimed a sweep slot");
                self.run(sweep, &Progress::Log, cancel).await?;
            }
        }
        Ok(())
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
        })
    }

    /// Runs (or resumes) one claimed sweep to its end, or until `cancel`, when it is handed
    /// back for another replica to resume.
    pub async fn run(
        &self,
        mut sweep: Sweep,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Summary> {
        let kind = SweepKind::parse(&sweep.kind).unwrap_or(SweepKind::Full);
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
                SweepKind::Stale => self.stale_budget() as i32,
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
            let failed = outcomes.iter().filter(|(_, o)| !o.is_settled()).count() as i32;
            let token_invalid = outcomes.iter().any(|(_, o)| *o == Outcome::TokenInvalid);
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
                });
            }
            if token_invalid {
                // Hand it back: it resumes where it stopped once the token works.
                store::release_sweep(&self.db, &sweep, &self.owner).await?;
                self.metrics
                    .sweeps
                    .with_label_values(&[label, "token_invalid"])
                    .inc();
                anyhow::bail!(
                    "MAX rejected the bot token; the sweep stopped at {} of {planned}",
                    sweep.done
                );
            }
        }
        store::finish_sweep(&self.db, &sweep, &self.owner).await?;
        self.metrics
            .sweeps
            .with_label_values(&[label, "finished"])
            .inc();
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn stale_slots_are_multiples_of_the_interval() {
        let fifteen = Duration::from_secs(900);
        assert_eq!(
            stale_slot(at("2026-03-29T01:14:59Z"), fifteen),
            at("2026-03-29T01:00:00Z")
        );
        assert_eq!(
            stale_slot(at("2026-03-29T01:15:00Z"), fifteen),
            at("2026-03-29T01:15:00Z")
        );
        assert_eq!(
            stale_slot(at("2026-03-29T01:15:00.001Z"), fifteen),
            at("2026-03-29T01:15:00Z")
        );
    }

    #[test]
    fn the_full_slot_is_the_last_time_the_hour_struck_in_utc() {
        assert_eq!(
            full_slot(at("2026-11-22T02:59:59Z"), 3),
            at("2026-11-21T03:00:00Z")
        );
        assert_eq!(
            full_slot(at("2026-11-22T03:00:00Z"), 3),
            at("2026-11-22T03:00:00Z")
        );
        assert_eq!(
            full_slot(at("2026-11-22T23:00:00Z"), 3),
            at("2026-11-22T03:00:00Z")
        );
        // Around a European DST change nothing moves: slots are UTC.
        assert_eq!(
            full_slot(at("2026-03-29T03:30:00Z"), 3),
            at("2026-03-29T03:00:00Z")
        );
        assert_eq!(
            full_slot(at("2026-10-25T02:30:00Z"), 3),
            at("2026-10-24T03:00:00Z")
        );
    }
}
