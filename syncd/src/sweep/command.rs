//! `syncd sweep`: how it was started (by the schedule's CronJob, or by hand), and what it
//! reports: the sweep it ran, the one it followed, or that the slot was swept before.

use chrono::{DateTime, Timelike, Utc};
use shared::sweeps::{SweepKind, SweepRecord, SweepState};
use tokio_util::sync::CancellationToken;

use super::{Progress, Sweeper, LEASE, REQUESTS_EVERY};
use crate::store::{self, Claim};
use shared::sweeps::StartedBy;

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
    pub(super) fn of(record: &SweepRecord, how: How) -> Self {
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
