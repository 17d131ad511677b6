//! A deployment's ordinary life, which no fault injection names: chats gone for good and new
//! ones the bot is not in, coming due together; outages longer than any retry budget; answers
//! that are not chats; manual refreshes behind a lazy backlog; shutdown while MAX is down; an
//! operator re-running a sweep by hand; a limiter whose stored times went insane.

use std::time::Duration;

use fred::prelude::*;
use maxsim::{ChatOverride, SimConfig};
use shared::keys;

use crate::helpers::{eventually, World};

fn gone(status: u16) -> ChatOverride {
    ChatOverride {
        http_status: Some(status),
        ..ChatOverride::default()
    }
}

async fn refreshed_since(world: &World, ids: &[i32], since: chrono::DateTime<chrono::Utc>) -> i64 {
    sqlx::query_scalar(
        "select count(*) from chat_participants where chat_id = any($1) \
         and participants_updated_at > $2",
    )
    .bind(ids)
    .bind(since)
    .fetch_one(&world.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn gone_chats_due_for_their_recheck_and_new_chats_do_not_stop_the_fleet() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(100).await;
    // A first full sweep: every chat gives a count (known active).
    let first = syncd::sweep_once(
        world.sweep_args(&["--full", "--max-api-rps", "200"]),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(first.finished);
    // Since then 40 chats were deleted or the bot removed (404/403), marked so and now due
    // for their recheck all at once; 30 new chats arrived that the bot is not in yet.
    for i in 1..=40 {
        world
            .sim
            .override_chat(World::max_id(i), gone(if i % 2 == 0 { 404 } else { 403 }));
    }
    sqlx::query(
        "update chat_participants set sync_status = case when chat_id % 2 = 0 then 'not_found' else 'forbidden' end, \
         checked_at = now() - interval '30 days' where chat_id <= 40",
    )
    .execute(&world.db)
    .await
    .unwrap();
    let new_ids = world.insert_chats(30).await;
    for (offset, _) in new_ids.iter().enumerate() {
        world
            .sim
            .override_chat(World::max_id(101 + offset as i32), gone(403));
    }
    // The active chats' counts went stale.
    sqlx::query("update chat_participants set participants_updated_at = now() - interval '3 hours' where chat_id > 40")
        .execute(&world.db)
        .await
        .unwrap();
    let started = chrono::Utc::now();
    let summary = syncd::sweep_once(
        world.sweep_args(&[
            "--stale",
            "--max-api-rps",
            "200",
            "--participants-batch-size",
            "20",
        ]),
        std::future::pending(),
    )
    .await
    .expect("the stale sweep runs to its end: gone and new chats are their own outcome");
    assert!(summary.finished, "{summary:?}");
    assert_eq!(
        refreshed_since(&world, &ids[40..], started).await,
        60,
        "every active chat got its count"
    );
    let marked: i64 = sqlx::query_scalar(
        "select count(*) from chat_participants where sync_status in ('forbidden', 'not_found') \
         and checked_at > $1",
    )
    .bind(started)
    .fetch_one(&world.db)
    .await
    .unwrap();
    assert_eq!(
        marked, 70,
        "the gone and the new chats are marked, with their check time"
    );
}

#[tokio::test]
async fn a_postgres_outage_longer_than_the_redelivery_budget_loses_no_manual_refresh() {
    let mut world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(20).await;
    let replica = world
        .replica(&[
            "--claim-idle",
            "200ms",
            "--max-deliveries",
            "2",
            // Each query fails at once while Postgres is down, as after the pool's timeout.
            "--database-acquire-timeout",
            "300ms",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.pg.stop();
    let started = chrono::Utc::now();
    // The api accepted these while Postgres was down (it serves from its read model).
    world.enqueue_manual(&ids).await;
    // Twenty times the redelivery budget (claim idle × deliveries).
    tokio::time::sleep(Duration::from_secs(8)).await;
    world.pg.start_again();
    let db = sqlx::PgPool::connect(&world.database_url).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "every accepted refresh done",
        || async {
            let done: i64 = sqlx::query_scalar(
                "select count(*) from chat_participants where participants_updated_at > $1",
            )
            .bind(started)
            .fetch_one(&db)
            .await
            .unwrap_or(0);
            done == ids.len() as i64
        },
    )
    .await;
    assert_eq!(
        world.dead_letters().await,
        0,
        "an outage dead-letters nothing"
    );
    eventually(Duration::from_secs(10), "nothing left pending", || async {
        world.pending(keys::REFRESH_STREAM_MANUAL).await == 0
    })
    .await;
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_max_outage_dead_letters_nothing_and_the_refreshes_are_done_after_it() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    // Fewer chats than open the breaker: every redelivery meets MAX failing.
    let ids = world.insert_chats(10).await;
    let replica = world
        .replica(&[
            "--claim-idle",
            "200ms",
            "--max-deliveries",
            "2",
            "--participants-max-retries",
            "0",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    let started = chrono::Utc::now();
    world.enqueue_manual(&ids).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    world.sim.update(|config| config.error_rate = 0.0);
    eventually(
        Duration::from_secs(60),
        "every refresh done after the outage",
        || async { refreshed_since(&world, &ids, started).await == ids.len() as i64 },
    )
    .await;
    assert_eq!(
        world.dead_letters().await,
        0,
        "an outage dead-letters nothing"
    );
    let recorded: i64 = sqlx::query_scalar(
        "select coalesce(max(consecutive_failures), 0)::bigint from chat_participants",
    )
    .fetch_one(&world.db)
    .await
    .unwrap();
    assert!(
        recorded <= 1,
        "MAX's outage is not recorded against the chats (only failures before it showed): {recorded}"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_chat_whose_answer_is_never_a_chat_is_dead_lettered_for_its_own_failures() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(3).await;
    world.sim.override_chat(World::max_id(1), gone(400));
    let replica = world
        .replica(&[
            "--claim-idle",
            "200ms",
            "--max-deliveries",
            "2",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.enqueue_manual(&ids).await;
    eventually(
        Duration::from_secs(30),
        "the bad chat dead-lettered",
        || async { world.dead_letters().await == 1 },
    )
    .await;
    let entry: Vec<(String, std::collections::HashMap<String, String>)> = world
        .redis_client()
        .await
        .xrange(keys::REFRESH_STREAM_DEAD, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(entry[0].1["reason"], "chat_failures");
    assert!(entry[0].1["detail"].starts_with("bad_request"), "{entry:?}");
    assert_eq!(
        world.refreshed().await,
        2,
        "the other chats got their counts"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn answers_that_are_not_chats_are_failures_shown_in_the_status_and_stop_the_calls() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(30).await;
    syncd::sweep_once(world.sweep_args(&["--full"]), std::future::pending())
        .await
        .unwrap();
    // A changed schema (or a proxy's page that parses as nothing): 200 without a count, and
    // answers for another chat.
    for i in 1..=30 {
        world.sim.override_chat(
            World::max_id(i),
            ChatOverride {
                participants_count: Some(-1),
                ..ChatOverride::default()
            },
        );
    }
    let before: Vec<(i32, Option<i32>)> = sqlx::query_as(
        "select chat_id, participants_count from chat_participants order by chat_id",
    )
    .fetch_all(&world.db)
    .await
    .unwrap();
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let ids: Vec<i32> = (1..=30).collect();
    world.enqueue_manual(&ids).await;
    let client = world.redis_client().await;
    eventually(
        Duration::from_secs(20),
        "/health/detailed's status shows the answers were not chats",
        || async {
            let status: std::collections::HashMap<String, String> =
                client.hgetall(keys::SYNCD_STATUS).await.unwrap();
            status
                .get(keys::status::MAX_LAST_ERROR)
                .is_some_and(|e| e.contains("not_a_chat"))
                && status.get(keys::status::MAX_TOKEN).map(String::as_str) == Some("invalid")
        },
    )
    .await;
    replica.stop().await.unwrap();
    let after: Vec<(i32, Option<i32>)> = sqlx::query_as(
        "select chat_id, participants_count from chat_participants order by chat_id",
    )
    .fetch_all(&world.db)
    .await
    .unwrap();
    assert_eq!(
        before, after,
        "no count was taken from an answer that is not a chat"
    );
    assert_eq!(world.dead_letters().await, 0);
    assert_eq!(
        world.pending(keys::REFRESH_STREAM_MANUAL).await,
        30,
        "the refreshes wait for MAX to give chats again"
    );
}

#[tokio::test]
async fn a_manual_refresh_is_not_queued_behind_a_lazy_backlog() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 10,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(601).await;
    let (manual, lazy) = ids.split_last().unwrap();
    let replica = world
        .replica(&[
            "--max-api-rps",
            "20",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.enqueue_lazy(lazy).await;
    eventually(
        Duration::from_secs(20),
        "the lazy backlog is being worked",
        || async { world.refreshed().await >= 30 },
    )
    .await;
    let lazy_before = world.refreshed().await;
    world.enqueue_manual(&[*manual]).await;
    let started = chrono::Utc::now() - chrono::Duration::seconds(1);
    eventually(
        Duration::from_secs(30),
        "the manual refresh done",
        || async { refreshed_since(&world, &[*manual], started).await == 1 },
    )
    .await;
    let lazy_meanwhile = world.refreshed().await - 1 - lazy_before;
    // Sharing a batch with lazy entries, it waited for a whole batch of 50 lazy calls (2.5 s at
    // 20 rps) before it was published.
    assert!(
        lazy_meanwhile < 40,
        "{lazy_meanwhile} lazy chats were refreshed while the manual refresh waited"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn after_sigterm_no_new_max_call_or_retry_starts_while_max_is_down() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        error_rate: 1.0,
        latency_ms: 150,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(40).await;
    let replica = world
        .replica(&[
            "--participants-enable-background-sync",
            "false",
            "--participants-max-retries",
            "5",
            "--shutdown-grace",
            "3s",
        ])
        .await;
    world.enqueue_manual(&ids).await;
    eventually(Duration::from_secs(10), "MAX is being called", || async {
        world.sim.stats().requests >= 20
    })
    .await;
    let stopping = tokio::spawn(replica.stop());
    // Calls already sent reach the simulator within moments; nothing after that.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let at_signal = world.sim.stats().requests;
    stopping.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        world.sim.stats().requests,
        at_signal,
        "MAX calls or retries started after the signal"
    );
    assert_eq!(world.dead_letters().await, 0);
}

#[tokio::test]
async fn a_sweep_run_by_hand_sweeps_now_even_when_its_slot_was_swept() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(30).await;
    let args = || world.sweep_args(&["--full", "--participants-full-sweep-cron", "0 3 * * *"]);
    let first = syncd::sweep_once(args(), std::future::pending())
        .await
        .unwrap();
    let again = syncd::sweep_once(args(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(first.how, syncd::sweep::How::Ran);
    assert_eq!(again.how, syncd::sweep::How::Ran, "{again:?}");
    assert!(again.finished && again.done == 30, "{again:?}");
    let calls = world.sim.stats().calls_per_chat;
    assert!(
        calls.values().all(|n| *n == 2),
        "each chat asked once per sweep: {calls:?}"
    );
    // The CronJob's own run of the slot swept by hand: it runs the slot once, then reports
    // that it was swept.
    let scheduled = || {
        world.sweep_args(&[
            "--full",
            "--scheduled",
            "--participants-full-sweep-cron",
            "0 3 * * *",
        ])
    };
    let once = syncd::sweep_once(scheduled(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(once.how, syncd::sweep::How::Ran);
    let twice = syncd::sweep_once(scheduled(), std::future::pending())
        .await
        .unwrap();
    assert!(
        matches!(twice.how, syncd::sweep::How::AlreadySwept { .. }),
        "{twice:?}"
    );
}

#[tokio::test]
async fn a_limiter_time_far_ahead_of_the_redis_clock_is_reset_instead_of_stalling_the_fleet() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(5).await;
    // A failover to a node whose clock is an hour behind: every stored moment is an hour ahead.
    let client = world.redis_client().await;
    let time: Vec<String> = client
        .custom(fred::cmd!("TIME"), Vec::<String>::new())
        .await
        .unwrap();
    let now_us: i64 = time[0].parse::<i64>().unwrap() * 1_000_000 + time[1].parse::<i64>().unwrap();
    let ahead = (now_us + 3_600_000_000).to_string();
    let _: () = client
        .set(keys::LIMITER_TAT, ahead.as_str(), None, None, false)
        .await
        .unwrap();
    let _: () = client
        .set(keys::LIMITER_PAUSE, ahead.as_str(), None, None, false)
        .await
        .unwrap();
    let lines = tokio::time::timeout(
        Duration::from_secs(20),
        syncd::refresh_once(world.refresh_args(&ids)),
    )
    .await
    .expect("the refresh does not wait for the stored hour")
    .unwrap();
    assert!(
        lines.iter().all(|line| line.contains("updated")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_fault_of_the_setup_during_a_recheck_wave_leaves_the_gone_chats_gone() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(120).await;
    let args = |extra: &[&str]| {
        let mut flags = vec!["--max-api-rps", "200", "--participants-batch-size", "20"];
        flags.extend(extra);
        world.sweep_args(&flags)
    };
    syncd::sweep_once(args(&["--full"]), std::future::pending())
        .await
        .unwrap();
    // Chats 1..60 are gone for good and were just rechecked and marked so.
    for i in 1..=60 {
        world.sim.override_chat(World::max_id(i), gone(404));
    }
    sqlx::query(
        "update chat_participants set sync_status = 'not_found', checked_at = now(), \
         participants_updated_at = now() - interval '3 days' where chat_id <= 60",
    )
    .execute(&world.db)
    .await
    .unwrap();
    // Then a short phase of answers that are not chats: a fault of the setup.
    let not_a_chat = ChatOverride {
        participants_count: Some(-1),
        ..ChatOverride::default()
    };
    for i in 61..=80 {
        world
            .sim
            .override_chat(World::max_id(i), not_a_chat.clone());
    }
    syncd::refresh_once(world.refresh_args(&ids[60..80]))
        .await
        .unwrap();
    for i in 61..=80 {
        world
            .sim
            .override_chat(World::max_id(i), ChatOverride::default());
    }
    sqlx::query(
        "update chat_participants set participants_updated_at = now() - interval '3 hours' \
         where chat_id > 60",
    )
    .execute(&world.db)
    .await
    .unwrap();
    let started = chrono::Utc::now();
    let summary = syncd::sweep_once(args(&["--stale"]), std::future::pending())
        .await
        .expect("the gone chats were left gone: they cannot stop the fleet");
    assert!(summary.finished, "{summary:?}");
    assert_eq!(refreshed_since(&world, &ids[60..], started).await, 60);
    let gone: i64 = sqlx::query_scalar(
        "select count(*) from chat_participants where chat_id <= 60 and sync_status = 'not_found'",
    )
    .fetch_one(&world.db)
    .await
    .unwrap();
    assert_eq!(gone, 60);
}

#[tokio::test]
async fn a_max_outage_seen_by_a_quiet_replica_is_not_recorded_against_its_chat() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        error_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(1).await;
    // Retries as by default (3): more attempts in one round than any streak threshold.
    let replica = world
        .replica(&[
            "--claim-idle",
            "200ms",
            "--max-deliveries",
            "2",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.enqueue_manual(&ids).await;
    eventually(
        Duration::from_secs(20),
        "MAX asked again and again",
        || async { world.sim.stats().requests >= 12 },
    )
    .await;
    assert_eq!(world.dead_letters().await, 0);
    let failures: Option<i32> =
        sqlx::query_scalar("select consecutive_failures from chat_participants where chat_id = $1")
            .bind(ids[0])
            .fetch_optional(&world.db)
            .await
            .unwrap();
    assert_eq!(
        failures.unwrap_or(0),
        0,
        "MAX failed for everyone: not the chat's failure"
    );
    world.sim.update(|config| config.error_rate = 0.0);
    eventually(Duration::from_secs(60), "done after the outage", || async {
        world.refreshed().await == 1
    })
    .await;
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_insane_manual_hold_does_not_stall_lazy_refreshes() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(5).await;
    let client = world.redis_client().await;
    let time: Vec<String> = client
        .custom(fred::cmd!("TIME"), Vec::<String>::new())
        .await
        .unwrap();
    let now_us: i64 = time[0].parse::<i64>().unwrap() * 1_000_000 + time[1].parse::<i64>().unwrap();
    let ahead = (now_us + 3_600_000_000).to_string();
    for key in [keys::LIMITER_MANUAL, keys::LIMITER_URGENT] {
        let _: () = client
            .set(key, ahead.as_str(), None, None, false)
            .await
            .unwrap();
    }
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    world.enqueue_lazy(&ids).await;
    eventually(
        Duration::from_secs(20),
        "the lazy refreshes done",
        || async { world.refreshed().await == 5 },
    )
    .await;
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn syncd_sweep_starts_no_max_call_after_sigterm() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        error_rate: 1.0,
        latency_ms: 150,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(40).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let sweep = tokio::spawn(syncd::sweep_once(
        world.sweep_args(&["--full", "--participants-max-retries", "5"]),
        async move {
            let _ = rx.await;
        },
    ));
    eventually(Duration::from_secs(10), "MAX is being called", || async {
        world.sim.stats().requests >= 20
    })
    .await;
    let _ = tx.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_signal = world.sim.stats().requests;
    let _ = sweep.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        world.sim.stats().requests,
        at_signal,
        "MAX calls after the signal"
    );
}
