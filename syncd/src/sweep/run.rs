//! The work of one claimed sweep, page by page: plan it, take the next page, ask MAX about the
//! chats due, record progress and renew the lease, and finish (or hand it back at the page's
//! start when stopped, so that whoever resumes it skips no chat).

use std::time::Instant;

use chrono::{DateTime, Utc};
use shared::sweeps::SweepKind;
use tokio_util::sync::CancellationToken;

use super::{How, Progress, Summary, Sweeper, LEASE, SWEEPS_KEPT};
use crate::refresh::limiter::Urgency;
use crate::refresh::Outcome;
use crate::store::{self, Sweep, Target};

/// What does not change while a sweep runs.
struct Plan {
    kind: SweepKind,
    planned: i64,
    page_size: i64,
    recheck_before: DateTime<Utc>,
    label: &'static str,
}

/// What one page came to.
enum Page {
    /// Asked and recorded; the sweep goes on.
    Advanced,
    /// The sweep ended here without finishing (stopped, or its lease lost).
    Ended(Summary),
}

impl Sweeper {
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
        let plan = self.begin(&mut sweep, progress).await?;
        let started = Instant::now();
        loop {
            if cancel.is_cancelled() {
                return self.hand_back(&sweep, plan.planned).await;
            }
            let page = self.next_page(&sweep, &plan).await?;
            if page.is_empty() {
                break;
            }
            match self.sweep_page(&mut sweep, &plan, page, cancel).await? {
                Page::Advanced => self.show_progress(&sweep, &plan, progress),
                Page::Ended(summary) => return Ok(summary),
            }
        }
        self.finish(&sweep, &plan, started).await
    }

    /// Plans the sweep (once: a resumed sweep keeps its plan) and shows it.
    async fn begin(&self, sweep: &mut Sweep, progress: &Progress) -> anyhow::Result<Plan> {
        let kind = sweep.kind;
        if sweep.planned.is_none() {
            sweep.planned = Some(match kind {
                SweepKind::Full => store::count_chats(&self.db).await? as i32,
                SweepKind::Stale => self.stale_budget(sweep.slot) as i32,
            });
        }
        let planned = i64::from(sweep.planned.unwrap_or_default());
        if let Progress::Bar(bar) = progress {
            bar.set_length(planned.max(0) as u64);
            bar.set_position(sweep.done.max(0) as u64);
        }
        self.metrics
            .sweep_planned
            .with_label_values(&[kind.as_str()])
            .set(planned);
        Ok(Plan {
            kind,
            planned,
            page_size: self.page_size(),
            recheck_before: Utc::now()
                - chrono::Duration::from_std(self.inactive_recheck).unwrap_or_default(),
            label: kind.as_str(),
        })
    }

    /// The next page: in id order after the position (full), or the stalest chats within what
    /// is left of the budget (stale).
    async fn next_page(&self, sweep: &Sweep, plan: &Plan) -> anyhow::Result<Vec<Target>> {
        Ok(match plan.kind {
            SweepKind::Full => {
                store::targets_after(&self.db, sweep.position, plan.page_size).await?
            }
            SweepKind::Stale => {
                let left = (plan.planned - i64::from(sweep.done)).min(plan.page_size);
                if left <= 0 {
                    return Ok(Vec::new());
                }
                let now = Utc::now();
                let stale_before =
                    now - chrono::Duration::from_std(self.due_age).unwrap_or_default();
                store::stale_targets(&self.db, now, stale_before, plan.recheck_before, left).await?
            }
        })
    }

    /// Asks MAX about the page's due chats and records the progress.
    async fn sweep_page(
        &self,
        sweep: &mut Sweep,
        plan: &Plan,
        page: Vec<Target>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Page> {
        let last_id = page.last().map_or(sweep.position, |t| t.chat_id);
        let page_len = page.len() as i32;
        let due: Vec<_> = page
            .into_iter()
            .filter(|t| t.is_due(plan.recheck_before))
            .collect();
        let outcomes = self
            .keeping_lease(
                sweep,
                self.refresher.refresh(due, Urgency::Sweep, Some(cancel)),
            )
            .await?;
        if cancel.is_cancelled() {
            // Part of this page was not asked: hand the sweep back at the page's start, so the
            // replica that resumes it redoes the page rather than skip chats.
            return Ok(Page::Ended(self.hand_back(sweep, plan.planned).await?));
        }
        let asked = outcomes.iter().filter(|(_, o)| o.asked_max()).count() as i32;
        sweep.calls += asked;
        if outcomes.iter().any(|(_, o)| o.stopped_calls()) {
            // MAX calls stopped (the token rejected, or a fault of the setup), and part of the
            // page got no answer: hand the sweep back at the page's start (with the calls
            // made), so that it resumes there once calls work rather than skip chats.
            store::release_sweep(&self.db, sweep, &self.owner).await?;
            self.metrics
                .sweeps
                .with_label_values(&[plan.label, "token_invalid"])
                .inc();
            anyhow::bail!(
                "MAX calls stopped (see the error before this); the sweep stopped at {} of {} and resumes there",
                sweep.done,
                plan.planned
            );
        }
        let outage = !outcomes.is_empty()
            && outcomes.iter().all(
                |(_, o)| matches!(o, Outcome::Failed { reason, .. } if !reason.is_the_chats()),
            );
        if outage {
            // No chat of the page got an answer: MAX is failing for everyone or the limiter's
            // Redis is down. The page is not counted as done; the sweep resumes at its start.
            store::release_sweep(&self.db, sweep, &self.owner).await?;
            anyhow::bail!(
                "no chat of the sweep's page got an answer (MAX or Redis unavailable); the sweep stopped at {} of {} and resumes there",
                sweep.done,
                plan.planned
            );
        }
        let failed = outcomes.iter().filter(|(_, o)| !o.is_settled()).count() as i32;
        match plan.kind {
            SweepKind::Full => sweep.position = last_id,
            SweepKind::Stale => sweep.position += page_len,
        }
        sweep.done += page_len;
        sweep.failed += failed;
        if store::advance_sweep(&self.db, sweep, &self.owner, LEASE).await? {
            return Ok(Page::Advanced);
        }
        tracing::warn!(
            kind = plan.label,
            "lost the sweep's lease to another replica; stopping"
        );
        self.metrics
            .sweeps
            .with_label_values(&[plan.label, "lost"])
            .inc();
        Ok(Page::Ended(Summary {
            planned: plan.planned,
            done: sweep.done.into(),
            failed: sweep.failed.into(),
            finished: false,
            how: How::Ran,
        }))
    }

    fn show_progress(&self, sweep: &Sweep, plan: &Plan, progress: &Progress) {
        self.metrics
            .sweep_done
            .with_label_values(&[plan.label])
            .set(sweep.done.into());
        match progress {
            Progress::Bar(bar) => bar.set_position(sweep.done.max(0) as u64),
            Progress::Log => tracing::info!(
                kind = plan.label,
                done = sweep.done,
                planned = plan.planned,
                failed = sweep.failed,
                "sweep progress"
            ),
        }
    }

    /// Records the sweep finished, refreshes the stale-data gauge, and tidies what grows.
    async fn finish(
        &self,
        sweep: &Sweep,
        plan: &Plan,
        started: Instant,
    ) -> anyhow::Result<Summary> {
        store::finish_sweep(&self.db, sweep, &self.owner).await?;
        self.metrics
            .sweeps
            .with_label_values(&[plan.label, "finished"])
            .inc();
        self.tidy_after(plan.kind).await;
        let stale_before =
            Utc::now() - chrono::Duration::from_std(self.stale_threshold).unwrap_or_default();
        if let Ok(stale) = store::count_stale(&self.db, stale_before).await {
            self.metrics.stale_data_count.set(stale);
        }
        tracing::info!(
            kind = plan.label,
            done = sweep.done,
            failed = sweep.failed,
            duration_s = started.elapsed().as_secs_f64(),
            "sweep finished"
        );
        Ok(Summary {
            planned: plan.planned,
            done: sweep.done.into(),
            failed: sweep.failed.into(),
            finished: true,
            how: How::Ran,
        })
    }
}
