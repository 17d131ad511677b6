//! The stream consumer: rate, crashes, shutdown, dead letters, invalid tokens.

use std::time::Duration;

use fred::prelude::*;
use maxsim::SimConfig;
use shared::keys;

use crate::helpers::{eventually, World};

#[tokio::test]
async fn two_replicas_together_stay_under_the_rate_and_see_no_429() {
    let world = World::new(SimConfig {
        rate_limit: 40,
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(240).await;
    let a = world
        .replica(&[
            "--max-api-rps",
            "40",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    let b = world
        .replica(&[
            "--max-api-rps",
            "40",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    // Work for both: stream entries for one half, a full sweep for the other.
    world.enqueue_lazy(&ids[..120]).await;
    world.request_full_sweep().await;
    eventually(Duration::from_secs(60), "every chat refreshed", || async {
        world.refreshed().await == 240
    })
    .await;
    let stats = world.sim.stats();
    assert_eq!(stats.rate_limited, 0, "no 429 with the shared limiter");
    assert!(
        stats.max_in_window <= 40,
        "at most 40 calls in any second, saw {}",
        stats.max_in_window
    );
    assert_eq!(stats.calls_per_chat.len(), 240);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_killed_mid_batch_loses_no_refresh() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 400,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(150).await;
    world.enqueue_lazy(&ids).await;
    let mut doomed = world.replica_process(&[
        "--max-api-rps",
        "100",
        "--claim-idle",
        "1s",
        "--participants-enable-background-sync",
        "false",
    ]);
    eventually(
        Duration::from_secs(30),
        "the doomed replica started calling",
        || async { world.sim.stats().ok >= 20 },
    )
    .await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let refreshed_by_the_dead = world.refreshed().await;
    assert!(
        refreshed_by_the_dead < 150,
        "killed before it finished ({refreshed_by_the_dead} done)"
    );
    let survivor = world
        .replica(&[
            "--max-api-rps",
            "100",
            "--claim-idle",
            "1s",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    eventually(
        Duration::from_secs(60),
        "every enqueued chat refreshed",
        || async { world.refreshed().await == 150 },
    )
    .await;
    eventually(Duration::from_secs(30), "nothing left pending", || async {
        world.pending(keys::REFRESH_STREAM_LAZY).await == 0
    })
    .await;
    survivor.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_finishes_or_hands_back_what_is_in_flight() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(100).await;
    world.enqueue_lazy(&ids).await;
    let mut replica = world.replica_process(&[
        "--max-api-rps",
        "50",
        "--claim-idle",
        "1s",
        "--participants-enable-background-sync",
        "false",
    ]);
    eventually(
        Duration::from_secs(30),
        "the replica started calling",
        || async { world.sim.stats().ok >= 10 },
    )
    .await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &replica.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || replica.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "exit 0 on SIGTERM, got {exit:?}");
    let next = world
        .replica(&[
            "--max-api-rps",
            "100",
            "--claim-idle",
            "1s",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    eventually(
        Duration::from_secs(60),
        "every chat refreshed after the restart",
        || async { world.refreshed().await == 100 },
    )
    .await;
    next.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_entries_go_to_the_dead_letter_stream() {
    let world = World::new(SimConfig::default()).await;
    let client = world.redis_client().await;
    let _: String = client
        .xadd(
            keys::REFRESH_STREAM_LAZY,
            false,
            None::<()>,
            "*",
            vec![("chat_id", "not-a-number")],
        )
        .await
        .unwrap();
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    eventually(Duration::from_secs(20), "dead-lettered", || async {
        world.dead_letters().await == 1
    })
    .await;
    assert_eq!(world.pending(keys::REFRESH_STREAM_LAZY).await, 0);
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_entry_whose_own_chat_keeps_failing_is_dead_lettered_after_max_deliveries() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(3).await;
    // MAX answers the other chats; this one fails every time: the failures are its own.
    syncd::refresh_once(world.refresh_args(&ids[1..]))
        .await
        .unwrap();
    world.sim.override_chat(
        World::max_id(1),
        maxsim::ChatOverride {
            http_status: Some(500),
            ..maxsim::ChatOverride::default()
        },
    );
    world.enqueue_manual(&ids).await;
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
    eventually(
        Duration::from_secs(30),
        "dead-lettered after retries",
        || async { world.dead_letters().await == 1 },
    )
    .await;
    assert_eq!(world.pending(keys::REFRESH_STREAM_MANUAL).await, 0);
    // One call per delivery; the first, in a batch with the others before any chat had a
    // count to control it with, may not count as the chat's own.
    let calls = world.max_calls(1);
    assert!(
        (2..=4).contains(&calls),
        "one call per delivery, saw {calls}"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_token_stops_the_calls() {
    let world = World::new(SimConfig {
        token_valid: false,
        invalid_token_as_403: true,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(60).await;
    world.enqueue_lazy(&ids).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    eventually(Duration::from_secs(20), "the token was tried", || async {
        world.sim.stats().unauthorized >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = world.sim.stats();
    assert!(
        stats.requests <= 3,
        "calls stop after the token is rejected; saw {}",
        stats.requests
    );
    let health = reqwest::get(format!("http://{}/health", replica.address))
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["max_token"], "invalid");
    // Not ready, but alive: a rejected token must not put the pod in a restart loop.
    let live = reqwest::get(format!("http://{}/health/live", replica.address))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let metrics = reqwest::get(format!("http://{}/metrics", replica.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("participants_max_token_valid 0"),
        "{metrics}"
    );
    // Nothing was lost: the entries wait in the stream for a valid token.
    assert_eq!(world.refreshed().await, 0);
    let client = world.redis_client().await;
    let status: Option<String> = client
        .hget(keys::SYNCD_STATUS, keys::status::MAX_TOKEN)
        .await
        .unwrap();
    assert_eq!(status.as_deref(), Some("invalid"));
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_burst_of_429s_pauses_the_fleet_once_not_for_thirty_seconds() {
    // MAX allows 5 calls a second while syncd believes it may make 200: one batch of 50
    // concurrent calls comes back mostly 429, all at once.
    let world = World::new(SimConfig {
        rate_limit: 5,
        latency_ms: 100,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(50).await;
    let replica = world
        .replica(&[
            "--max-api-rps",
            "200",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.enqueue_lazy(&ids).await;
    eventually(Duration::from_secs(20), "MAX answered 429", || async {
        world.sim.stats().rate_limited >= 20
    })
    .await;
    // Let every answer of the burst arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = world.redis_client().await;
    // The pause key holds the moment the pause ends, on the Redis server's clock (µs).
    let until_us: i64 = client.get(keys::LIMITER_PAUSE).await.unwrap();
    let time: Vec<String> = client
        .custom(fred::cmd!("TIME"), Vec::<String>::new())
        .await
        .unwrap();
    let now_us = time[0].parse::<i64>().unwrap() * 1_000_000 + time[1].parse::<i64>().unwrap();
    let left_ms = (until_us - now_us) / 1000;
    // One burst is one pause of 1 s (2 s if a call sent after it also met a 429); before,
    // each of the ~45 answers doubled it, to the 30 s cap.
    assert!(
        left_ms <= 2_000,
        "the fleet is paused for {left_ms} ms more after a single burst of 429s"
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_trickle_of_manual_refreshes_does_not_starve_a_sweep() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        latency_ms: 20,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(300).await;
    let replica = world
        .replica(&[
            "--max-api-rps",
            "100",
            "--participants-enable-background-sync",
            "false",
        ])
        .await;
    world.request_full_sweep().await;
    // Five manual refreshes a second: a twentieth of the budget, but always some urgent work.
    let client = world.redis_client().await;
    let trickle = tokio::spawn(async move {
        for id in ids.iter().cycle() {
            shared::refresh::enqueue(
                &client,
                shared::refresh::Priority::Manual,
                &[*id],
                Duration::from_secs(60),
                None,
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    eventually(
        Duration::from_secs(60),
        "the full sweep finished",
        || async {
            let finished: i64 = sqlx::query_scalar(
                "select count(*) from sync_sweeps where kind = 'full' and finished_at is not null",
            )
            .fetch_one(&world.db)
            .await
            .unwrap();
            finished == 1
        },
    )
    .await;
    trickle.abort();
    replica.stop().await.unwrap();
}
