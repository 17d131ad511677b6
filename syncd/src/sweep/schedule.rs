//! The sweep schedules: cron expressions in the operators' timezone, which slot is due, and the
//! trigger that wakes the sweep loops.
//!
//! Slots are computed here, fresh from the clock each time, in the real zone (`chrono-tz`, so a
//! DST change moves them as it moves the wall clock). The trigger is a timezone-aware job on
//! `tokio-cron-scheduler`, guarded against that crate's known faults:
//! - a `_tz` job freezes the zone's UTC offset when it is created, so after a DST change it fires
//!   an hour early or late: its firing only *wakes* a loop, which then asks this module which
//!   slot is due; an early wake finds nothing new, and the loop's own timer, set to the exact
//!   next slot, is the backstop for a late one;
//! - repeated jobs can stop firing under load: the same timer (and a re-check at least every
//!   `MAX_NAP`) keeps slots coming without it;
//! - a job that runs long holds its scheduler: the job only stores a wake-up (`Notify`), and the
//!   sweep runs in the loop's own task, so a long sweep delays no other trigger;
//! - it has no notion of replicas: the slot claim in Postgres decides who runs (`store`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveTime, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use shared::sweeps::SweepKind;
use tokio::sync::Notify;
use tokio_cron_scheduler::{Job, JobScheduler};

/// Longest a schedule loop sleeps before it looks at the clock again.
pub const MAX_NAP: Duration = Duration::from_secs(30);

/// A cron expression in a timezone.
#[derive(Clone, Debug)]
pub struct Schedule {
    expression: String,
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses a cron expression of 5 fields (minute hour day month weekday) or 6 (seconds
    /// first), or one of `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`.
    pub fn parse(expression: &str, tz: Tz) -> Result<Self, String> {
        let expression = expression.trim();
        let six = to_six_fields(expression)?;
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .build()
            .parse(&six)
            .map_err(|e| format!("`{expression}` is not a cron expression ({e})"))?;
        let schedule = Self {
            expression: expression.to_owned(),
            cron,
            tz,
        };
        // A pattern that can never match (30 February) parses; refuse it here.
        if schedule.next_after(Utc::now()).is_none() {
            return Err(format!("`{expression}` never fires"));
        }
        Ok(schedule)
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The expression with its seconds field, as tokio-cron-scheduler wants it.
    fn six_fields(&self) -> String {
        to_six_fields(&self.expression).unwrap_or_else(|_| self.expression.clone())
    }

    /// The newest slot at or before `now`.
    pub fn latest(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Slots are whole seconds; croner keeps the fraction of the instant it starts from
        // when that second matches.
        let second = now.trunc_subsecs(0);
        self.cron
            .find_previous_occurrence(&second.with_timezone(&self.tz), true)
            .ok()
            .map(|at| at.with_timezone(&Utc).trunc_subsecs(0))
    }

    /// The first slot after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&now.trunc_subsecs(0).with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc).trunc_subsecs(0))
    }

    /// Time from `slot` to the slot after it: what a stale sweep of `slot` may budget for.
    pub fn period_after(&self, slot: DateTime<Utc>) -> Option<Duration> {
        (self.next_after(slot)? - slot).to_std().ok()
    }

    /// `2026-12-04 03:00:00 MSK (2026-12-04 00:00:00 UTC)`: the next run, for people.
    pub fn describe_next(&self, now: DateTime<Utc>) -> String {
        match self.next_after(now) {
            Some(next) => format!(
                "{} ({} UTC)",
                next.with_timezone(&self.tz).format("%Y-%m-%d %H:%M:%S %Z"),
                next.format("%Y-%m-%d %H:%M:%S")
            ),
            None => "never".to_owned(),
        }
    }
}

/// The slot a replica should claim now, if any: the newest slot at or before `now`, when it is
/// newer than the fleet's last recorded slot. Slots missed while no replica ran are not run
/// one by one: only the newest runs, once. A fleet with no recorded slot starts with the first
/// slot after this replica `started`.
pub fn due_slot(
    schedule: &Schedule,
    now: DateTime<Utc>,
    last_recorded: Option<DateTime<Utc>>,
    started: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let slot = schedule.latest(now)?;
    let eligible = match last_recorded {
        Some(last) => slot > last,
        None => slot >= started,
    };
    eligible.then_some(slot)
}

/// The stale and full schedules; `None` is off.
#[derive(Clone, Debug)]
pub struct Schedules {
    pub stale: Option<Schedule>,
    pub full: Option<Schedule>,
    pub tz: Tz,
}

impl Schedules {
    pub fn of(&self, kind: SweepKind) -> Option<&Schedule> {
        match kind {
            SweepKind::Stale => self.stale.as_ref(),
            SweepKind::Full => self.full.as_ref(),
        }
    }

    /// The slot a `syncd sweep` started at `now` takes: the schedule's current slot, so that it
    /// and the daemon's run of that slot are one sweep. With the schedule off: the start of the
    /// local day for a full sweep (one a day), `now` for a stale one.
    pub fn command_slot(&self, kind: SweepKind, now: DateTime<Utc>) -> DateTime<Utc> {
        if let Some(slot) = self.of(kind).and_then(|s| s.latest(now)) {
            return slot;
        }
        match kind {
            SweepKind::Stale => now,
            SweepKind::Full => start_of_day(now, self.tz),
        }
    }

    /// One line per schedule: kind, expression, zone, next run in the zone and in UTC.
    pub fn describe(&self, now: DateTime<Utc>) -> Vec<String> {
        [SweepKind::Stale, SweepKind::Full]
            .into_iter()
            .map(|kind| match self.of(kind) {
                Some(s) => format!(
                    "{:<6} {:<18} {:<16} next {}",
                    kind.as_str(),
                    format!("`{}`", s.expression()),
                    s.tz().name(),
                    s.describe_next(now)
                ),
                None => format!("{:<6} off", kind.as_str()),
            })
            .collect()
    }
}

fn start_of_day(now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let local = now.with_timezone(&tz).date_naive().and_time(NaiveTime::MIN);
    tz.from_local_datetime(&local)
        .earliest()
        .map(|at| at.with_timezone(&Utc))
        .unwrap_or(now)
}

/// `*/15 * * * *` becomes `0 */15 * * * *`; six fields stay; the `@` names become fields.
fn to_six_fields(expression: &str) -> Result<String, String> {
    let named = match expression.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => Some("0 0 0 1 1 *"),
        "@monthly" => Some("0 0 0 1 * *"),
        "@weekly" => Some("0 0 0 * * 0"),
        "@daily" | "@midnight" => Some("0 0 0 * * *"),
        "@hourly" => Some("0 0 * * * *"),
        _ => None,
    };
    if let Some(fields) = named {
        return Ok(fields.to_owned());
    }
    match expression.split_whitespace().count() {
        5 => Ok(format!("0 {expression}")),
        6 => Ok(expression.to_owned()),
        n => Err(format!(
            "`{expression}` has {n} fields; a cron expression has 5 (minute hour day month weekday) or 6 (seconds first)"
        )),
    }
}

/// The seed's `PARTICIPANTS_UPDATE_INTERVAL` as a cron expression: slots at every multiple of
/// the interval within the minute, hour or day. Only intervals that divide one of those have an
/// equivalent.
pub fn interval_to_cron(interval: Duration) -> Result<String, String> {
    let secs = interval.as_secs();
    let whole = interval.subsec_nanos() == 0 && secs > 0;
    let divides = |unit: u64, n: u64| n > 0 && n < unit && unit.is_multiple_of(n);
    match secs {
        _ if !whole => {}
        1 => return Ok("* * * * * *".to_owned()),
        s if divides(60, s) => return Ok(format!("*/{s} * * * * *")),
        60 => return Ok("0 * * * * *".to_owned()),
        s if s % 60 == 0 && divides(60, s / 60) => return Ok(format!("0 */{} * * * *", s / 60)),
        3600 => return Ok("0 0 * * * *".to_owned()),
        s if s % 3600 == 0 && divides(24, s / 3600) => {
            return Ok(format!("0 0 */{} * * *", s / 3600))
        }
        86_400 => return Ok("0 0 0 * * *".to_owned()),
        _ => {}
    }
    Err(format!(
        "PARTICIPANTS_UPDATE_INTERVAL ({interval:?}) does not divide a minute, an hour or a day, so it has no cron equivalent; set PARTICIPANTS_STALE_SWEEP_CRON instead"
    ))
}

/// The wake-ups of the schedule loops, fired by tokio-cron-scheduler.
pub struct Trigger {
    scheduler: Option<JobScheduler>,
    wakers: HashMap<SweepKind, Arc<Notify>>,
}

impl Trigger {
    /// Starts one timezone-aware cron job per schedule. If the scheduler cannot start, the
    /// loops run on their own timers alone (logged once).
    pub async fn start(schedules: &Schedules, kinds: &[SweepKind]) -> Self {
        let wakers: HashMap<SweepKind, Arc<Notify>> = kinds
            .iter()
            .map(|kind| (*kind, Arc::new(Notify::new())))
            .collect();
        // With no schedule on (background sync off), no scheduler and its ticker at all.
        let scheduler = if wakers.is_empty() {
            None
        } else {
            match Self::scheduler(schedules, &wakers).await {
                Ok(scheduler) => Some(scheduler),
                Err(error) => {
                    tracing::warn!(error = %error, "the cron scheduler did not start; sweeps run on syncd's own timers");
                    None
                }
            }
        };
        Self { scheduler, wakers }
    }

    async fn scheduler(
        schedules: &Schedules,
        wakers: &HashMap<SweepKind, Arc<Notify>>,
    ) -> anyhow::Result<JobScheduler> {
        let scheduler = JobScheduler::new().await?;
        for (kind, waker) in wakers {
            let Some(schedule) = schedules.of(*kind) else {
                continue;
            };
            let waker = waker.clone();
            let job = Job::new_async_tz(schedule.six_fields(), schedule.tz(), move |_, _| {
                let waker = waker.clone();
                Box::pin(async move { waker.notify_one() })
            })?;
            scheduler.add(job).await?;
        }
        scheduler.start().await?;
        Ok(scheduler)
    }

    /// What wakes the loop of `kind` (a fresh one if `kind` has no job).
    pub fn waker(&self, kind: SweepKind) -> Arc<Notify> {
        self.wakers.get(&kind).cloned().unwrap_or_default()
    }

    pub async fn shutdown(mut self) {
        if let Some(scheduler) = self.scheduler.as_mut() {
            if let Err(error) = scheduler.shutdown().await {
                tracing::debug!(error = %error, "cron scheduler shutdown");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn schedule(expression: &str, tz: &str) -> Schedule {
        Schedule::parse(expression, tz.parse().unwrap()).unwrap()
    }

    #[test]
    fn the_default_full_sweep_runs_at_three_in_moscow() {
        let full = schedule("0 3 * * *", "Europe/Moscow");
        assert_eq!(
            full.next_after(at("2026-12-03T10:00:00Z")),
            Some(at("2026-12-04T00:00:00Z"))
        );
        assert_eq!(
            full.latest(at("2026-12-04T00:00:00Z")),
            Some(at("2026-12-04T00:00:00Z")),
            "a slot is due at its own instant"
        );
        assert_eq!(
            full.latest(at("2026-12-03T23:59:59Z")),
            Some(at("2026-12-03T00:00:00Z"))
        );
        assert_eq!(
            full.describe_next(at("2026-12-03T10:00:00Z")),
            "2026-12-04 03:00:00 MSK (2026-12-04 00:00:00 UTC)"
        );
    }

    #[tokio::test]
    async fn the_cron_job_wakes_its_loop_and_a_kind_without_a_job_gets_a_quiet_waker() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let schedules = Schedules {
            stale: Some(Schedule::parse("* * * * * *", tz).unwrap()),
            full: None,
            tz,
        };
        let trigger = Trigger::start(&schedules, &[SweepKind::Stale]).await;
        let stale = trigger.waker(SweepKind::Stale);
        tokio::time::timeout(Duration::from_secs(5), stale.notified())
            .await
            .expect("the every-second job fired within 5 s");
        let full = trigger.waker(SweepKind::Full);
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), full.notified())
                .await
                .is_err(),
            "nothing wakes a schedule that is off"
        );
        trigger.shutdown().await;
    }

    #[test]
    fn slots_are_whole_seconds_whatever_the_instant() {
        let every_two = schedule("*/2 * * * * *", "UTC");
        assert_eq!(
            every_two.latest(at("2026-12-03T10:00:04.250Z")),
            Some(at("2026-12-03T10:00:04Z"))
        );
        assert_eq!(
            every_two.latest(at("2026-12-03T10:00:05.999Z")),
            Some(at("2026-12-03T10:00:04Z"))
        );
        assert_eq!(
            every_two.next_after(at("2026-12-03T10:00:04.250Z")),
            Some(at("2026-12-03T10:00:06Z"))
        );
    }

    #[test]
    fn bad_expressions_and_field_counts_are_refused() {
        let tz: Tz = "UTC".parse().unwrap();
        for bad in [
            "",
            "0 3 * *",
            "61 3 * * *",
            "0 3 * * * * *",
            "0 0 30 2 *",
            "tomorrow",
        ] {
            assert!(Schedule::parse(bad, tz).is_err(), "{bad:?} accepted");
        }
        for good in [
            "*/15 * * * *",
            "0 3 * * *",
            "*/2 * * * * *",
            "@daily",
            "0 3 * * MON-FRI",
        ] {
            Schedule::parse(good, tz).unwrap();
        }
    }

    #[test]
    fn the_seed_interval_translates_to_cron_when_it_divides_a_unit() {
        let cases = [
            (1, "* * * * * *"),
            (2, "*/2 * * * * *"),
            (60, "0 * * * * *"),
            (900, "0 */15 * * * *"),
            (3600, "0 0 * * * *"),
            (7200, "0 0 */2 * * *"),
            (86_400, "0 0 0 * * *"),
        ];
        for (secs, expected) in cases {
            assert_eq!(
                interval_to_cron(Duration::from_secs(secs)).unwrap(),
                expected
            );
        }
        for secs in [7, 420, 5400, 172_800] {
            let err = interval_to_cron(Duration::from_secs(secs)).unwrap_err();
            assert!(err.contains("PARTICIPANTS_STALE_SWEEP_CRON"), "{err}");
        }
        assert!(interval_to_cron(Duration::from_millis(1500)).is_err());
    }

    /// Walks a clock minute by minute and claims each due slot the way the loops do.
    fn fired(schedule: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut last = None;
        let mut fired = Vec::new();
        let mut now = from;
        while now <= to {
            if let Some(slot) = due_slot(schedule, now, last, from) {
                fired.push(slot);
                last = Some(slot);
            }
            now += chrono::Duration::minutes(1);
        }
        fired
    }

    #[test]
    fn each_local_three_oclock_fires_once_across_both_dst_changes_in_berlin() {
        let full = schedule("0 3 * * *", "Europe/Berlin");
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        for (from, to) in [
            // Spring forward: 02:00 CET becomes 03:00 CEST on 29 March 2026.
            (at("2026-03-27T12:00:00Z"), at("2026-03-31T12:00:00Z")),
            // Fall back: 03:00 CEST becomes 02:00 CET on 25 October 2026.
            (at("2026-10-23T12:00:00Z"), at("2026-10-27T12:00:00Z")),
        ] {
            let slots = fired(&full, from, to);
            assert_eq!(slots.len(), 4, "{slots:?}");
            for slot in &slots {
                let local = slot.with_timezone(&berlin);
                assert_eq!(local.format("%H:%M:%S").to_string(), "03:00:00", "{slot}");
            }
            let days: std::collections::HashSet<_> = slots
                .iter()
                .map(|s| s.with_timezone(&berlin).date_naive())
                .collect();
            assert_eq!(days.len(), slots.len(), "one per local day");
        }
        // The UTC instants move with the offset.
        assert_eq!(
            full.latest(at("2026-03-29T12:00:00Z")),
            Some(at("2026-03-29T01:00:00Z"))
        );
        assert_eq!(
            full.latest(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-28T02:00:00Z"))
        );
        assert_eq!(
            full.latest(at("2026-10-25T12:00:00Z")),
            Some(at("2026-10-25T02:00:00Z"))
        );
    }

    #[test]
    fn an_hourly_schedule_in_a_repeated_hour_fires_each_instant_once() {
        // 02:30 happens twice in Berlin on 25 October 2026; each claim is an instant, so no
        // instant fires twice and the clock never goes back to an earlier slot.
        let half_past = schedule("30 * * * *", "Europe/Berlin");
        let slots = fired(
            &half_past,
            at("2026-10-24T22:00:00Z"),
            at("2026-10-25T04:00:00Z"),
        );
        for pair in slots.windows(2) {
            assert!(pair[1] > pair[0], "{slots:?}");
        }
        assert!(slots.len() >= 5, "{slots:?}");
    }

    #[test]
    fn missed_slots_run_once_and_a_new_fleet_waits_for_the_next() {
        let stale = schedule("*/15 * * * *", "Europe/Moscow");
        let now = at("2026-12-03T10:07:00Z");
        // Down since 06:00: four hours of slots missed, and only the newest runs.
        assert_eq!(
            due_slot(&stale, now, Some(at("2026-12-03T06:00:00Z")), now),
            Some(at("2026-12-03T10:00:00Z"))
        );
        assert_eq!(
            due_slot(&stale, now, Some(at("2026-12-03T10:00:00Z")), now),
            None
        );
        // No slot recorded ever: the 10:00 slot passed before this replica started.
        assert_eq!(due_slot(&stale, now, None, now), None);
        assert_eq!(
            due_slot(&stale, at("2026-12-03T10:15:00Z"), None, now),
            Some(at("2026-12-03T10:15:00Z"))
        );
    }

    #[test]
    fn a_command_takes_the_schedules_current_slot_or_the_local_day() {
        let tz: Tz = "Europe/Moscow".parse().unwrap();
        let now = at("2026-12-03T10:07:00Z");
        let on = Schedules {
            stale: None,
            full: Some(Schedule::parse("0 3 * * *", tz).unwrap()),
            tz,
        };
        assert_eq!(
            on.command_slot(SweepKind::Full, now),
            at("2026-12-03T00:00:00Z")
        );
        let off = Schedules {
            stale: None,
            full: None,
            tz,
        };
        assert_eq!(
            off.command_slot(SweepKind::Full, now),
            at("2026-12-02T21:00:00Z"),
            "midnight in Moscow"
        );
        assert_eq!(off.command_slot(SweepKind::Stale, now), now);
    }
}
