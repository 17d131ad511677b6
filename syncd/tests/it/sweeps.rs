//! Sweeps: cron slots once across replicas, resumption, gone chats, fenced writes.

use std::time::Duration;

use chrono::Utc;
use maxsim::{ChatOverride, SimConfig};
use syncd::store::{self, FreshCount};

use crate::helpers::{eventually, World};

#[tokio::test]
async fn several_replicas_run_each_cron_slot_once_and_on_time() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(10).await;
    let flags = [
        "--participants-update-interval",
        "2s",
        "--participants-stale-threshold",
        "1s",
        "--max-api-rps",
        "200",
    ];
    let replicas = vec![
        world.replica(&flags).await,
        world.replica(&flags).await,
        world.replica(&flags).await,
    ];
    eventually(Duration::from_secs(30), "three stale slots ran", || async {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from sync_sweeps where kind = 'stale' and finished_at is not null",
        )
        .fetch_one(&world.db)
        .await
        .unwrap();
        n >= 3
    })
    .await;
    for replica in replicas {
        replica.stop().await.unwrap();
    }
    let rows: Vec<(chrono::DateTime<Utc>, chrono::DateTime<Utc>, i32)> = sqlx::query_as(
        "select slot, started_at, done from sync_sweeps where kind = 'stale' order by slot",
    )
    .fetch_all(&world.db)
    .await
    .unwrap();
    for window in rows.windows(2) {
        assert_eq!(
            (window[1].0 - window[0].0).num_milliseconds(),
            2000,
            "consecutive slots, none skipped: {rows:?}"
        );
    }
    for (slot, started_at, done) in &rows[..rows.len() - 1] {
        let delay = (*started_at - *slot).num_milliseconds();
        assert!(
            (0..1500).contains(&delay),
            "slot {slot} started {delay} ms late"
        );
        assert_eq!(*done, 10, "every chat was stale again at each slot");
    }
    // Each slot ran once: one MAX call per chat per finished slot, not one per replica.
    let finished = rows.len() as u64;
    let calls: u64 = world.sim.stats().calls_per_chat.values().sum();
    assert!(
        calls >= (finished - 1) * 10 && calls <= finished * 10,
        "{calls} calls for {finished} slots"
    );
}

#[tokio::test]
async fn slots_missed_during_downtime_run_once() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(3).await;
    // The fleet last ran a slot an hour ago and has been down since.
    let hour_ago = (Utc::now() - chrono::Duration::hours(1)).timestamp();
    let long_ago = chrono::DateTime::from_timestamp(hour_ago - hour_ago % 2, 0).unwrap();
    sqlx::query("insert into sync_sweeps (kind, slot, finished_at) values ('stale', $1, $1)")
        .bind(long_ago)
        .execute(&world.db)
        .await
        .unwrap();
    let replica = world
        .replica(&[
            "--participants-update-interval",
            "2s",
            "--participants-stale-threshold",
            "1s",
            "--max-api-rps",
            "200",
        ])
        .await;
    eventually(Duration::from_secs(20), "the missed slot ran", || async {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from sync_sweeps where kind = 'stale' and finished_at is not null",
        )
        .fetch_one(&world.db)
        .await
        .unwrap();
        n >= 2
    })
    .await;
    replica.stop().await.unwrap();
    let slots: Vec<chrono::DateTime<Utc>> =
        sqlx::query_scalar("select slot from sync_sweeps where kind = 'stale' order by slot")
            .fetch_all(&world.db)
            .await
            .unwrap();
    // Not 1,800 catch-up sweeps: the hour-old slot, then only recent ones.
    assert!(slots.len() <= 5, "{} slots", slots.len());
    assert!(Utc::now() - slots[1] < chrono::Duration::seconds(30));
}

#[tokio::test]
async fn an_interrupted_sweep_resumes_where_it_stopped() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 50,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(400).await;
    world.request_full_sweep().await;
    let mut first =
        world.replica_process(&["--max-api-rps", "100", "--participants-batch-size", "20"]);
    eventually(
        Duration::from_secs(30),
        "the first replica made progress",
        || async {
            let done: Option<i32> =
                sqlx::query_scalar("select done from sync_sweeps where kind = 'full'")
                    .fetch_one(&world.db)
                    .await
                    .unwrap();
            done.unwrap_or(0) >= 100
        },
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    // The lease (120 s) has not run out; make it as if it had, instead of waiting.
    sqlx::query("update sync_sweeps set lease_until = now() - interval '1 second'")
        .execute(&world.db)
        .await
        .unwrap();
    let second = world.replica(&["--max-api-rps", "200"]).await;
    eventually(Duration::from_secs(60), "the sweep finished", || async {
        let finished: Option<chrono::DateTime<Utc>> =
            sqlx::query_scalar("select finished_at from sync_sweeps where kind = 'full'")
                .fetch_one(&world.db)
                .await
                .unwrap();
        finished.is_some()
    })
    .await;
    second.stop().await.unwrap();
    assert_eq!(world.refreshed().await, 400);
    // Resumed, not restarted: far fewer than 2 calls per chat.
    let calls: u64 = world.sim.stats().calls_per_chat.values().sum();
    assert!(calls < 400 + 150, "{calls} calls for 400 chats");
}

#[tokio::test]
async fn removed_and_missing_chats_are_not_called_again() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(5).await;
    world.sim.override_chat(
        World::max_id(1),
        ChatOverride {
            http_status: Some(404),
            ..ChatOverride::default()
        },
    );
    world.sim.override_chat(
        World::max_id(2),
        ChatOverride {
            http_status: Some(403),
            ..ChatOverride::default()
        },
    );
    world.sim.override_chat(
        World::max_id(3),
        ChatOverride {
            status: Some("removed".into()),
            ..ChatOverride::default()
        },
    );
    sqlx::query("update chats set max_chat_id = 'garbage' where id = $1")
        .bind(ids[4])
        .execute(&world.db)
        .await
        .unwrap();
    // Three full sweeps of three slots (`syncd sweep --full` sweeps each slot once).
    for _ in 0..3 {
        let args = world.sweep_args(&["--full", "--participants-full-sweep-cron", "* * * * * *"]);
        let summary = syncd::sweep_once(args, std::future::pending())
            .await
            .unwrap();
        assert!(summary.finished);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let calls = world.sim.stats().calls_per_chat;
    for gone in 1..=3 {
        assert_eq!(
            calls.get(&World::max_id(gone)),
            Some(&1),
            "chat {gone} called once"
        );
    }
    // Every sweep, and once more as the control call that showed MAX gives chats when the
    // first sweep met 403/404 from chats with no count yet (a new deployment).
    assert_eq!(
        calls.get(&World::max_id(4)),
        Some(&4),
        "the active chat is called every sweep, plus one control"
    );
    assert_eq!(
        calls.get(&World::max_id(5)),
        None,
        "an unusable id is never sent"
    );
    let statuses: Vec<(i32, String)> =
        sqlx::query_as("select chat_id, sync_status from chat_participants order by chat_id")
            .fetch_all(&world.db)
            .await
            .unwrap();
    let statuses: Vec<&str> = statuses.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        statuses,
        ["not_found", "forbidden", "removed", "active", "invalid_id"]
    );
}

#[tokio::test]
async fn a_delayed_stale_write_never_overwrites_a_newer_count() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(1).await;
    let now = Utc::now();
    let newer = FreshCount {
        chat_id: ids[0],
        count: 50,
        asked_at: now,
    };
    let older = FreshCount {
        chat_id: ids[0],
        count: 49,
        asked_at: now - chrono::Duration::seconds(3),
    };
    assert_eq!(store::write_counts(&world.db, &[newer]).await.unwrap(), 1);
    assert_eq!(store::write_counts(&world.db, &[older]).await.unwrap(), 0);
    assert_eq!(
        store::write_counts(&world.db, &[newer]).await.unwrap(),
        0,
        "a replay changes nothing"
    );
    let (count, legacy): (i32, i32) = sqlx::query_as(
        "select p.participants_count, c.participants_count from chat_participants p join chats c on c.id = p.chat_id",
    )
    .fetch_one(&world.db)
    .await
    .unwrap();
    assert_eq!(
        (count, legacy),
        (50, 50),
        "the legacy column mirrors the newest count"
    );
}

#[tokio::test]
async fn a_full_sweep_refreshes_every_chat_once_and_writes_both_stores() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(120).await;
    let summary = syncd::sweep_once(
        world.sweep_args(&["--full", "--max-api-rps", "500"]),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.done, summary.failed, summary.finished),
        (120, 0, true)
    );
    let calls = world.sim.stats().calls_per_chat;
    assert_eq!(calls.len(), 120);
    assert!(calls.values().all(|n| *n == 1));
    let client = world.redis_client().await;
    let cached = shared::counts::read_many(&client, &fred::prelude::Options::default(), &ids)
        .await
        .unwrap();
    assert_eq!(cached.len(), 120);
    for (index, id) in ids.iter().enumerate() {
        let expected = world.sim.count_of(World::max_id(index as i32 + 1));
        assert_eq!(cached[id].count, expected);
    }
    let lines = syncd::refresh_once(world.refresh_args(&[ids[0], 999_999]))
        .await
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{}\t", ids[0])) && l.contains("updated")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("999999\tnot found")),
        "{lines:?}"
    );
}
