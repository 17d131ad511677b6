//! Cron schedules against real Postgres and Redis: one sweep per slot whoever starts it, missed
//! slots once, and long sweeps that hold no other trigger back.

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use maxsim::SimConfig;

use crate::helpers::{eventually, World};

/// A daily cron expression (with seconds, in UTC) for the whole second `lead` from now.
fn daily_at(lead: Duration) -> (String, DateTime<Utc>) {
    let at = Utc::now() + chrono::Duration::from_std(lead).unwrap();
    let at = at.with_nanosecond(0).unwrap();
    (
        format!("{} {} {} * * *", at.second(), at.minute(), at.hour()),
        at,
    )
}

async fn sleep_until(at: DateTime<Utc>) {
    if let Ok(wait) = (at - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
}

/// (kind, slot, started_by, started_at, finished_at, covered_by) of every sweep, by slot.
type Row = (
    String,
    DateTime<Utc>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

async fn sweeps(world: &World) -> Vec<Row> {
    sqlx::query_as(
        "select kind, slot, started_by, started_at, finished_at, covered_by from sync_sweeps \
         order by slot, kind",
    )
    .fetch_all(&world.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_replicas_and_a_cronjob_sweep_on_the_same_slot_make_one_sweep() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(60).await;
    let (cron, slot) = daily_at(Duration::from_secs(3));
    let schedule = [
        "--participants-full-sweep-cron",
        &cron,
        "--participants-stale-sweep-cron",
        "off",
        "--participants-schedule-tz",
        "UTC",
    ];
    let mut run_flags = schedule.to_vec();
    run_flags.extend(["--max-api-rps", "100"]);
    let replicas = [
        world.replica(&run_flags).await,
        world.replica(&run_flags).await,
    ];
    let mut cronjob_flags = vec!["--full", "--scheduled", "--max-api-rps", "100"];
    cronjob_flags.extend(schedule);
    let cronjob_args = world.sweep_args(&cronjob_flags);
    let cronjob_again = world.sweep_args(&cronjob_flags);
    // A Kubernetes CronJob starts its pod a moment after the slot, like the replicas' timers.
    sleep_until(slot + chrono::Duration::milliseconds(20)).await;
    let summary = syncd::sweep_once(cronjob_args, std::future::pending())
        .await
        .unwrap();
    assert!(summary.finished, "{summary:?}");
    assert_eq!(summary.done, 60, "{summary:?}");
    for replica in replicas {
        replica.stop().await.unwrap();
    }
    // The CronJob retried (a pod restarted): the slot is swept already, nothing is asked again,
    // and the summary says so instead of reporting that sweep as its own.
    let again = syncd::sweep_once(cronjob_again, std::future::pending())
        .await
        .unwrap();
    assert!(
        matches!(again.how, syncd::sweep::How::AlreadySwept { slot: swept, .. } if swept == slot),
        "{again:?}"
    );
    assert_eq!((again.done, again.planned), (summary.done, summary.planned));
    let rows = sweeps(&world).await;
    assert_eq!(rows.len(), 1, "one sweep for the slot: {rows:?}");
    assert_eq!(rows[0].1, slot);
    let stats = world.sim.stats();
    assert_eq!(stats.calls_per_chat.len(), 60);
    assert!(
        stats.calls_per_chat.values().all(|n| *n == 1),
        "every chat asked once: {:?}",
        stats.calls_per_chat
    );
    let calls: i32 = sqlx::query_scalar("select calls from sync_sweeps")
        .fetch_one(&world.db)
        .await
        .unwrap();
    assert_eq!(calls, 60);
}

#[tokio::test]
async fn a_replica_started_after_missed_slots_runs_the_newest_once() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(20).await;
    // Every hour on the hour, UTC; the fleet last ran the slot five hours ago.
    let hour = Utc::now()
        .with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap();
    sqlx::query(
        "insert into sync_sweeps (kind, slot, started_by, finished_at) \
         values ('full', $1, 'schedule', $1)",
    )
    .bind(hour - chrono::Duration::hours(5))
    .execute(&world.db)
    .await
    .unwrap();
    let replica = world
        .replica(&[
            "--participants-full-sweep-cron",
            "0 * * * *",
            "--participants-stale-sweep-cron",
            "off",
            "--participants-schedule-tz",
            "UTC",
            "--max-api-rps",
            "200",
        ])
        .await;
    eventually(Duration::from_secs(20), "the missed slot ran", || async {
        sweeps(&world)
            .await
            .iter()
            .any(|r| r.4.is_some() && r.1 == hour)
    })
    .await;
    // Time for a second run, if there were one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    replica.stop().await.unwrap();
    let rows = sweeps(&world).await;
    let slots: Vec<DateTime<Utc>> = rows.iter().map(|r| r.1).collect();
    if Utc::now().hour() == hour.hour() {
        assert_eq!(
            slots,
            [hour - chrono::Duration::hours(5), hour],
            "the newest missed slot, once"
        );
    }
    assert!(world.sim.stats().calls_per_chat.values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_long_full_sweep_holds_no_stale_slot_back_and_stale_sweeps_never_overlap_across_replicas()
{
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(240).await;
    let (full_cron, full_slot) = daily_at(Duration::from_secs(2));
    let flags = [
        "--participants-full-sweep-cron",
        &full_cron,
        // Every two seconds; each stale sweep plans 80% of 2 s of the budget (64 chats),
        // which takes longer than 2 s while the full sweep shares the budget.
        "--participants-stale-sweep-cron",
        "*/2 * * * * *",
        "--participants-schedule-tz",
        "UTC",
        "--participants-stale-threshold",
        "2s",
        "--participants-refresh-ahead",
        "0",
        "--max-api-rps",
        "40",
    ];
    let replicas = [world.replica(&flags).await, world.replica(&flags).await];
    eventually(
        Duration::from_secs(60),
        "the full sweep finished",
        || async {
            sweeps(&world)
                .await
                .iter()
                .any(|r| r.0 == "full" && r.1 == full_slot && r.4.is_some())
        },
    )
    .await;
    // One more stale slot after it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for replica in replicas {
        replica.stop().await.unwrap();
    }
    let rows = sweeps(&world).await;
    let full = rows.iter().find(|r| r.0 == "full").unwrap();
    let (full_started, full_finished) = (full.3, full.4.unwrap());
    assert!(
        (full_finished - full_started).num_seconds() >= 3,
        "the full sweep is long enough to span stale slots: {full:?}"
    );
    let ran: Vec<&Row> = rows
        .iter()
        .filter(|r| r.0 == "stale" && r.5.is_none())
        .collect();
    assert!(
        ran.iter()
            .any(|r| r.3 > full_started && r.3 < full_finished),
        "a stale sweep started while the full one ran: {rows:?}"
    );
    assert!(
        ran.iter().any(|r| r.3 > full_finished),
        "stale slots keep coming after it: {rows:?}"
    );
    for pair in ran.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        if let Some(finished) = earlier.4 {
            assert!(
                later.3 >= finished,
                "two stale sweeps overlapped: {earlier:?} and {later:?}"
            );
        }
    }
    // The other replica's loop is free when a stale slot comes during a long stale sweep.
    assert!(
        rows.iter().any(|r| r.0 == "stale" && r.5.is_some()),
        "a stale slot that came while one ran is recorded as covered: {rows:?}"
    );
    assert_eq!(rows.iter().filter(|r| r.0 == "full").count(), 1);
}
