//! The refresh engine heals by itself: Redis restarted empty, markers that outlive their
//! refresh, replicas restarted under the same name, slow batches, clocks that run fast, late
//! answers, a rejected token mid-sweep.

use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use maxsim::{ChatOverride, SimConfig};
use shared::counts::CachedCount;
use shared::keys;
use shared::refresh::Priority;
use syncd::store::{self, Failure, FreshCount};

use crate::helpers::{eventually, Redis, World};

async fn status_of(world: &World, chat_id: i32) -> (Option<String>, Option<i32>) {
    sqlx::query_as(
        "select sync_status, participants_count from chat_participants where chat_id = $1",
    )
    .bind(chat_id)
    .fetch_optional(&world.db)
    .await
    .unwrap()
    .unwrap_or((None, None))
}

#[tokio::test]
async fn a_redis_restarted_empty_does_not_stop_the_consumer() {
    let mut world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(2).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    world.enqueue_lazy(&ids[..1]).await;
    eventually(
        Duration::from_secs(10),
        "the first chat refreshed",
        || async { world.refreshed().await == 1 },
    )
    .await;
    let Redis::Single(server) = &mut world.redis else {
        unreachable!()
    };
    server.restart();
    // The api's next enqueue recreates the stream, without the consumer group. (Like the api's
    // best-effort enqueue on the next read, it is tried again if the fresh server refuses it.)
    let client = world.redis_client().await;
    eventually(
        Duration::from_secs(5),
        "the enqueue after the restart",
        || async {
            shared::refresh::enqueue(
                &client,
                Priority::Lazy,
                &ids[1..],
                Duration::from_secs(60),
                None,
            )
            .await
            .inspect_err(|error| eprintln!("enqueue after the restart: {error}"))
            .is_ok()
        },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the chat enqueued after the empty restart refreshed",
        || async { world.refreshed().await == 2 },
    )
    .await;
    assert_eq!(world.pending(keys::REFRESH_STREAM_LAZY).await, 0);
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_settled_chat_can_be_enqueued_again_at_once() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(1).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let client = world.redis_client().await;
    let enqueue = || async {
        shared::refresh::enqueue(&client, Priority::Lazy, &ids, Duration::from_secs(60), None)
            .await
            .unwrap()
    };
    assert_eq!(enqueue().await, 1);
    eventually(Duration::from_secs(10), "refreshed", || async {
        world.refreshed().await == 1
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the dedup marker is gone",
        || async {
            let exists: i64 = client.exists(keys::refresh_marker(ids[0])).await.unwrap();
            exists == 0
        },
    )
    .await;
    // Due again (a short stale threshold): enqueued again, not 60 s later.
    assert_eq!(enqueue().await, 1);
    // The limiter's keys carry no TTL: no eviction policy can take them.
    let ttl: i64 = client.pttl(keys::LIMITER_TAT).await.unwrap();
    assert_eq!(ttl, -1, "the limiter's schedule never expires");
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_restarted_under_its_name_does_not_loop_on_its_own_failing_entries() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(2).await;
    // The other chat gives a count: MAX answers, so this one's failures are its own.
    syncd::refresh_once(world.refresh_args(&ids[1..]))
        .await
        .unwrap();
    let ids = &ids[..1];
    world.sim.override_chat(
        World::max_id(1),
        ChatOverride {
            http_status: Some(500),
            ..ChatOverride::default()
        },
    );
    let flags = [
        "--participants-enable-background-sync",
        "false",
        "--consumer-name",
        "pod-0",
        "--participants-max-retries",
        "0",
        "--max-deliveries",
        "2",
        // Long enough that only the own-pending path touches the entry in this test.
        "--claim-idle",
        "60s",
    ];
    let replica = world.replica(&flags).await;
    // A manual refresh, which always asks MAX (a lazy one is left alone while the chat's
    // own failures back it off).
    world.enqueue_manual(ids).await;
    let failures = || async {
        sqlx::query_scalar::<_, i32>(
            "select consecutive_failures from chat_participants where chat_id = $1",
        )
        .bind(ids[0])
        .fetch_optional(&world.db)
        .await
        .unwrap()
        .unwrap_or(0)
    };
    eventually(Duration::from_secs(20), "the entry failed once", || async {
        failures().await >= 1 && world.pending(keys::REFRESH_STREAM_MANUAL).await == 1
    })
    .await;
    replica.stop().await.unwrap();
    // The pod comes back under the same name, twice: its own pending entry is read once per
    // start, and dead-lettered once delivered more than twice.
    let replica = world.replica(&flags).await;
    eventually(
        Duration::from_secs(20),
        "the entry failed again",
        || async { failures().await >= 2 },
    )
    .await;
    replica.stop().await.unwrap();
    let replica = world.replica(&flags).await;
    eventually(
        Duration::from_secs(20),
        "the entry dead-lettered",
        || async { world.dead_letters().await == 1 },
    )
    .await;
    replica.stop().await.unwrap();
    // One call per start: the first delivery, the second start's; the third start finds it
    // delivered too often.
    let calls = world.max_calls(1);
    assert!(
        calls <= 3,
        "MAX was asked {calls} times for one failing entry"
    );
    assert_eq!(world.pending(keys::REFRESH_STREAM_MANUAL).await, 0);
}

#[tokio::test]
async fn a_slow_batch_keeps_its_entries_from_peers() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 1500,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(5).await;
    let flags = [
        "--participants-enable-background-sync",
        "false",
        "--claim-idle",
        "400ms",
    ];
    let replicas = [world.replica(&flags).await, world.replica(&flags).await];
    world.enqueue_lazy(&ids).await;
    eventually(Duration::from_secs(20), "every chat refreshed", || async {
        world.refreshed().await == 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for replica in replicas {
        replica.stop().await.unwrap();
    }
    let calls = world.sim.stats().calls_per_chat;
    assert!(
        calls.values().all(|n| *n == 1),
        "a peer took over entries still in flight: {calls:?}"
    );
}

#[tokio::test]
async fn a_manual_refresh_asks_max_about_a_chat_marked_unavailable() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(1).await;
    // A wrong MAX_API_URL earlier marked it forbidden, for a week.
    store::write_failures(
        &world.db,
        &[Failure {
            chat_id: ids[0],
            status: "forbidden".into(),
            error: "403".into(),
            asked_at: Utc::now(),
        }],
    )
    .await
    .unwrap();
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let client = world.redis_client().await;
    shared::refresh::enqueue(
        &client,
        Priority::Manual,
        &ids,
        Duration::from_secs(60),
        None,
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the chat is active again",
        || async { status_of(&world, ids[0]).await.0.as_deref() == Some("active") },
    )
    .await;
    assert_eq!(world.max_calls(1), 1);
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_older_success_landing_after_a_newer_gone_keeps_the_chat_gone() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(1).await;
    let now = Utc::now();
    store::write_failures(
        &world.db,
        &[Failure {
            chat_id: ids[0],
            status: "removed".into(),
            error: "removed".into(),
            asked_at: now,
        }],
    )
    .await
    .unwrap();
    store::write_counts(
        &world.db,
        &[FreshCount {
            chat_id: ids[0],
            count: 42,
            asked_at: now - chrono::Duration::seconds(5),
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        status_of(&world, ids[0]).await,
        (Some("removed".to_owned()), Some(42)),
        "the count is the last known one; the status stays what the newer answer said"
    );
}

#[tokio::test]
async fn a_replica_with_a_fast_clock_cannot_fence_out_correct_answers() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(1).await;
    let ahead = Utc::now() + chrono::Duration::hours(1);
    store::write_counts(
        &world.db,
        &[FreshCount {
            chat_id: ids[0],
            count: 5,
            asked_at: ahead,
        }],
    )
    .await
    .unwrap();
    let client = world.redis_client().await;
    let ttl = Duration::from_secs(3600);
    shared::counts::write_fenced(
        &client,
        &[(
            ids[0],
            CachedCount {
                count: 5,
                updated_at: ahead,
            },
        )],
        ttl,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A correct replica asks MAX now, after the fast one.
    let asked_at = Utc::now();
    store::write_counts(
        &world.db,
        &[FreshCount {
            chat_id: ids[0],
            count: 7,
            asked_at,
        }],
    )
    .await
    .unwrap();
    let written = shared::counts::write_fenced(
        &client,
        &[(
            ids[0],
            CachedCount {
                count: 7,
                updated_at: asked_at,
            },
        )],
        ttl,
    )
    .await
    .unwrap();
    assert_eq!(written, 1, "Redis took the newer answer");
    assert_eq!(status_of(&world, ids[0]).await.1, Some(7));
    let (key, field) = keys::count_location(ids[0]);
    let cached: Option<String> = client.hget(key, field).await.unwrap();
    let cached = CachedCount::decode(&cached.unwrap()).unwrap();
    assert_eq!(cached.count, 7);
    assert!(cached.updated_at <= Utc::now());
}

#[tokio::test]
async fn a_token_rejected_mid_sweep_does_not_advance_the_sweep() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        token_valid: false,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(30).await;
    let result = syncd::sweep_once(world.sweep_args(&["--full"]), std::future::pending()).await;
    assert!(result.is_err(), "{result:?}");
    let (position, done): (i32, i32) =
        sqlx::query_as("select position, done from sync_sweeps where kind = 'full'")
            .fetch_one(&world.db)
            .await
            .unwrap();
    assert_eq!(
        (position, done),
        (0, 0),
        "nothing was asked, so the sweep resumes from the start"
    );
}

#[tokio::test]
async fn a_chat_whose_answers_keep_failing_backs_off_instead_of_taking_every_read() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(2).await;
    // The other chat gives a count: MAX answers, so chat 1's failures are its own.
    syncd::refresh_once(world.refresh_args(&ids[1..]))
        .await
        .unwrap();
    world.sim.override_chat(
        World::max_id(1),
        ChatOverride {
            http_status: Some(500),
            ..ChatOverride::default()
        },
    );
    let replica = world
        .replica(&[
            "--participants-enable-background-sync",
            "false",
            "--participants-max-retries",
            "0",
            "--max-deliveries",
            "1",
            "--claim-idle",
            "300ms",
        ])
        .await;
    // Reads keep enqueueing the failing chat (short dedup markers: a read every 400 ms).
    let client = world.redis_client().await;
    for _ in 0..8 {
        shared::refresh::enqueue(
            &client,
            Priority::Lazy,
            &ids[..1],
            Duration::from_millis(100),
            None,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    replica.stop().await.unwrap();
    assert_eq!(
        world.max_calls(1),
        1,
        "asked once, then left alone for its backoff"
    );
    assert_eq!(world.pending(keys::REFRESH_STREAM_LAZY).await, 0);
    // The stale sweep leaves it alone too, and takes the healthy chat.
    let now = Utc::now();
    let targets = store::stale_targets(&world.db, now, now, now, 10)
        .await
        .unwrap();
    let picked: Vec<i32> = targets.iter().map(|t| t.chat_id).collect();
    assert_eq!(picked, [ids[1]]);
}

#[tokio::test]
async fn a_wrong_max_url_marks_no_chat_unavailable_and_stops_the_calls() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(60).await;
    // Every chat answers 404, as a moved API, a proxy or another bot's token would make it.
    for i in 1..=60 {
        world.sim.override_chat(
            World::max_id(i),
            ChatOverride {
                http_status: Some(404),
                ..ChatOverride::default()
            },
        );
    }
    // A refresh of one chat cannot tell a fault of the setup from a chat gone, and no chat
    // has a count to control it with yet: nothing is marked.
    let lines = syncd::refresh_once(world.refresh_args(&[1])).await.unwrap();
    assert!(lines[0].contains("failed"), "{lines:?}");
    let args = world.sweep_args(&["--full", "--participants-batch-size", "20"]);
    let result = syncd::sweep_once(args, std::future::pending()).await;
    assert!(result.is_err(), "the sweep stops: {result:?}");
    let marked: i64 =
        sqlx::query_scalar("select count(*) from chat_participants where sync_status <> 'active'")
            .fetch_one(&world.db)
            .await
            .unwrap();
    assert_eq!(
        marked, 0,
        "no chat is marked unavailable for a week, and the one marked just before is due again"
    );
    let requests = world.sim.stats().requests;
    assert!(
        requests <= 40,
        "calls stop after the first batch or two, not after all 60 chats: {requests}"
    );
    // Fixed: the sweep resumes and every chat gets its count.
    for i in 1..=60 {
        world
            .sim
            .override_chat(World::max_id(i), ChatOverride::default());
    }
    let summary = syncd::sweep_once(world.sweep_args(&["--full"]), std::future::pending())
        .await
        .unwrap();
    assert!(summary.finished);
    assert_eq!(world.refreshed().await, 60);
}
