//! Poll mode (`MAX_UPDATES_MODE=poll`): the leased long poller against the simulator's
//! `GET /updates`, storing into the events stream the consumer reads, with a real Redis.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use maxsim::{AdminRights, SimConfig};
use shared::keys;

use crate::helpers::{eventually, World};

const CHAT: i64 = -70_000_000_000_001;

/// A replica's flags in poll mode, with polls of one second.
fn poll_flags(name: &str) -> Vec<String> {
    [
        "--participants-enable-background-sync",
        "false",
        "--max-updates-mode",
        "poll",
        "--max-updates-poll-timeout",
        "1s",
        "--consumer-name",
        name,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

async fn start(world: &World, name: &str) -> crate::helpers::Replica {
    let flags = poll_flags(name);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    world.replica(&flags).await
}

/// `users` join `CHAT`, where the bot is an administrator: one `user_added` each.
fn joins(world: &World, users: std::ops::Range<i64>) {
    world.sim.set_admin(
        CHAT,
        AdminRights {
            is_admin: true,
            read_all_messages: true,
        },
    );
    for user in users {
        world.sim.add_member(CHAT, user).unwrap();
    }
}

/// The user ids of the `user_added` updates in the events stream, in stream order.
async fn stored_users(redis: &Client) -> Vec<i64> {
    let entries: Vec<(String, HashMap<String, String>)> = redis
        .xrange(keys::EVENTS_STREAM, "-", "+", None)
        .await
        .unwrap_or_default();
    entries
        .iter()
        .filter_map(|(_, fields)| {
            let update: serde_json::Value =
                serde_json::from_str(fields.get(keys::EVENTS_FIELD_UPDATE)?).ok()?;
            (update["update_type"] == "user_added").then(|| update["user"]["user_id"].as_i64())?
        })
        .collect()
}

fn status_args(world: &World) -> syncd::config::StatusArgs {
    use clap::Parser;
    let argv = [
        "syncd",
        "status",
        "--database-url",
        &world.database_url,
        "--redis-url",
        &world.redis_url,
    ];
    match syncd::config::Cli::try_parse_from(argv).unwrap().command {
        syncd::config::Command::Status(args) => *args,
        _ => unreachable!(),
    }
}

async fn marker(redis: &Client) -> Option<i64> {
    redis
        .get::<Option<String>, _>(keys::EVENTS_POLL_MARKER)
        .await
        .unwrap()
        .and_then(|m| m.parse().ok())
}

async fn metrics_page(replica: &crate::helpers::Replica) -> String {
    reqwest::get(format!("http://{}/metrics", replica.address))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series on a metrics page (0 when absent).
fn series(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn poll_mode_stores_the_sims_updates_in_the_events_stream_and_they_are_consumed() {
    let world = World::new(SimConfig::default()).await;
    let redis = world.redis_client().await;
    let replica = start(&world, "poller-a").await;
    eventually(
        Duration::from_secs(10),
        "the first poll's marker",
        || async { marker(&redis).await.is_some() },
    )
    .await;
    joins(&world, 1..4);
    eventually(Duration::from_secs(15), "three joins consumed", || async {
        let page = metrics_page(&replica).await;
        series(&page, r#"participants_events_received_total{mode="poll"}"#) == 3.0
            && series(
                &page,
                r#"participants_events_applied_total{outcome="needs_baseline"}"#,
            ) == 3.0
    })
    .await;
    assert_eq!(stored_users(&redis).await, vec![1, 2, 3]);
    let info =
        syncd::stream::redis::group_info_of(&redis, keys::EVENTS_STREAM, keys::EVENTS_GROUP).await;
    assert_eq!(info.pending, Some(0), "acknowledged after handling");
    let lease: Option<String> = redis.get(keys::EVENTS_POLL_LEASE).await.unwrap();
    assert_eq!(lease.as_deref(), Some("poller-a"));
    let stats = world.sim.stats();
    assert_eq!(stats.rate_limited, 0, "within 2 requests a second");
    let status = syncd::report::status(&status_args(&world)).await.unwrap();
    assert!(status.contains("LONG POLL"), "{status}");
    assert!(status.contains("lease poller-a, marker "), "{status}");
    replica.stop().await.unwrap();
    let lease: Option<String> = redis.get(keys::EVENTS_POLL_LEASE).await.unwrap();
    assert_eq!(lease, None, "handed back on shutdown");
}

#[tokio::test]
async fn the_marker_is_persisted_only_after_the_batch_is_stored() {
    let world = World::new(SimConfig::default()).await;
    let redis = world.redis_client().await;
    let replica = start(&world, "poller-a").await;
    eventually(
        Duration::from_secs(10),
        "the first poll's marker",
        || async { marker(&redis).await.is_some() },
    )
    .await;
    let before = marker(&redis).await;
    // The events stream cannot take an XADD (a key of another type in its place).
    let _: () = redis.del(keys::EVENTS_STREAM).await.unwrap();
    let _: () = redis
        .set(keys::EVENTS_STREAM, "blocked", None, None, false)
        .await
        .unwrap();
    joins(&world, 1..3);
    let polls = world.sim.stats().updates_polls;
    eventually(
        Duration::from_secs(15),
        "the batch fetched again",
        || async { world.sim.stats().updates_polls >= polls + 3 },
    )
    .await;
    assert_eq!(
        marker(&redis).await,
        before,
        "not advanced past a batch not stored"
    );
    let _: () = redis.del(keys::EVENTS_STREAM).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the same updates stored",
        || async { stored_users(&redis).await == vec![1, 2] },
    )
    .await;
    eventually(Duration::from_secs(5), "the marker advanced", || async {
        marker(&redis).await > before
    })
    .await;
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn of_two_replicas_in_poll_mode_only_the_lease_holder_polls_and_the_other_takes_over() {
    let world = World::new(SimConfig::default()).await;
    let redis = world.redis_client().await;
    let a = start(&world, "poller-a").await;
    let b = start(&world, "poller-b").await;
    eventually(
        Duration::from_secs(10),
        "the first poll's marker",
        || async { marker(&redis).await.is_some() },
    )
    .await;
    joins(&world, 1..3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    joins(&world, 3..5);
    eventually(Duration::from_secs(10), "four joins stored", || async {
        stored_users(&redis).await.len() >= 4
    })
    .await;
    let stats = world.sim.stats();
    assert_eq!(stats.updates_max_in_flight, 1, "one poller at a time");
    assert_eq!(stats.rate_limited, 0);
    assert_eq!(stored_users(&redis).await, vec![1, 2, 3, 4], "each once");
    let holder: String = redis.get(keys::EVENTS_POLL_LEASE).await.unwrap();
    let (stopped, other) = if holder == "poller-a" {
        (a, "poller-b")
    } else {
        (b, "poller-a")
    };
    stopped.stop().await.unwrap();
    joins(&world, 5..6);
    eventually(
        Duration::from_secs(15),
        "the other replica polls",
        || async { stored_users(&redis).await == vec![1, 2, 3, 4, 5] },
    )
    .await;
    let holder: String = redis.get(keys::EVENTS_POLL_LEASE).await.unwrap();
    assert_eq!(holder, other);
    assert_eq!(world.sim.stats().updates_max_in_flight, 1);
}

#[tokio::test]
async fn a_lost_marker_and_a_gap_past_the_retention_are_reported_once() {
    let world = World::new(SimConfig::default()).await;
    let redis = world.redis_client().await;
    // A poll happened 25 hours ago, and its marker is gone.
    let long_ago = chrono::Utc::now().timestamp_millis() - 25 * 3_600_000;
    let _: () = redis
        .set(keys::EVENTS_POLL_AT, long_ago, None, None, false)
        .await
        .unwrap();
    let replica = start(&world, "poller-a").await;
    eventually(Duration::from_secs(10), "a new marker", || async {
        marker(&redis).await.is_some()
    })
    .await;
    // Polls go on (one a second); neither gap is reported again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let page = metrics_page(&replica).await;
    assert_eq!(
        series(
            &page,
            r#"participants_events_gaps_total{reason="marker_lost"}"#
        ),
        1.0
    );
    assert_eq!(
        series(
            &page,
            r#"participants_events_gaps_total{reason="retention"}"#
        ),
        1.0
    );
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn a_webhook_subscription_stops_long_polling_until_it_is_deleted() {
    let world = World::new(SimConfig::default()).await;
    let redis = world.redis_client().await;
    let http = reqwest::Client::new();
    let subscriptions = format!("http://{}/subscriptions", world.sim_address);
    let hook = "http://127.0.0.1:1/max/updates";
    let made = http
        .post(&subscriptions)
        .header("Authorization", crate::helpers::TOKEN)
        .json(&serde_json::json!({"url": hook, "update_types": ["user_added"]}))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success());
    let replica = start(&world, "poller-a").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // MAX answers 405 while the subscription exists: no poll is admitted, no marker written.
    assert_eq!(world.sim.stats().updates_polls, 0);
    assert_eq!(marker(&redis).await, None);
    let deleted = http
        .delete(format!("{subscriptions}?url={hook}"))
        .header("Authorization", crate::helpers::TOKEN)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    eventually(Duration::from_secs(15), "polling again", || async {
        marker(&redis).await.is_some()
    })
    .await;
    joins(&world, 1..2);
    eventually(Duration::from_secs(10), "the join stored", || async {
        stored_users(&redis).await == vec![1]
    })
    .await;
    replica.stop().await.unwrap();
}
