//! `GET /updates`: the marker, the long-poll wait, the limits, and no long polling while a
//! webhook is subscribed.

use std::time::{Duration, Instant};

use maxsim::{AdminRights, SimConfig};
use serde_json::json;

use crate::helpers::{quiet, types_of, Sim};

const CHAT: i64 = -70_000_000_000_011;

async fn admin_chat(config: SimConfig) -> Sim {
    let sim = Sim::start(config).await;
    sim.sim.set_admin(
        CHAT,
        AdminRights {
            is_admin: true,
            read_all_messages: true,
        },
    );
    sim
}

fn user_ids(updates: &serde_json::Value) -> Vec<i64> {
    updates["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"]["user_id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn without_a_marker_only_the_last_update_comes_and_a_marker_commits_the_earlier_ones() {
    let sim = admin_chat(quiet()).await;
    for user in 1..=5 {
        sim.sim.add_member(CHAT, user).unwrap();
    }
    let (status, first) = sim.get("/updates?timeout=0").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(user_ids(&first), [5], "only the newest of five");
    assert_eq!(
        types_of(first["updates"].as_array().unwrap()),
        ["user_added"]
    );
    // `marker=null` is the same as none.
    assert_eq!(
        user_ids(&sim.get("/updates?timeout=0&marker=null").await.1),
        [5]
    );

    sim.sim.add_member(CHAT, 6).unwrap();
    sim.sim.add_member(CHAT, 7).unwrap();
    let marker = first["marker"].as_i64().unwrap();
    let (_, next) = sim
        .get(&format!("/updates?timeout=0&marker={marker}&limit=1"))
        .await;
    assert_eq!(
        user_ids(&next),
        [6],
        "users 1-4 were committed by the marker, never seen"
    );
    // The same marker again repeats what the batch did not commit ...
    let (_, again) = sim
        .get(&format!("/updates?timeout=0&marker={marker}"))
        .await;
    assert_eq!(user_ids(&again), [6, 7]);
    // ... and the next marker commits what came before it.
    let (_, after) = sim
        .get(&format!("/updates?timeout=0&marker={}", next["marker"]))
        .await;
    assert_eq!(user_ids(&after), [7]);

    // Types filter, comma-separated.
    sim.sim.remove_member(CHAT, 6).unwrap();
    let marker = after["marker"].as_i64().unwrap();
    let (_, removed) = sim
        .get(&format!(
            "/updates?timeout=0&marker={marker}&types=user_removed,bot_removed"
        ))
        .await;
    assert_eq!(
        types_of(removed["updates"].as_array().unwrap()),
        ["user_removed"]
    );
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_update_arrives_and_empty_at_its_timeout() {
    let sim = admin_chat(quiet()).await;
    let started = Instant::now();
    let (_, empty) = sim.get("/updates?timeout=1&marker=1").await;
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(empty, json!({"updates": [], "marker": 1}));

    let background = sim.sim.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        background.add_member(CHAT, 1).unwrap();
    });
    let started = Instant::now();
    let (_, polled) = sim.get("/updates?timeout=30&marker=1").await;
    let waited = started.elapsed();
    assert_eq!(user_ids(&polled), [1]);
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(5)).contains(&waited),
        "{waited:?}"
    );
}

#[tokio::test]
async fn long_polling_allows_two_requests_a_second_and_refuses_bad_limits() {
    let sim = admin_chat(SimConfig {
        updates_rate_limit: 2,
        ..quiet()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(sim.get("/updates?timeout=0").await.0);
    }
    assert_eq!(statuses, [200, 200, 429]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sim.get("/updates?timeout=0&limit=0").await.0, 400);
    assert_eq!(sim.get("/updates?timeout=91").await.0, 400);
}

#[tokio::test]
async fn at_most_100_updates_come_in_one_batch() {
    let sim = admin_chat(quiet()).await;
    for user in 1..=150 {
        sim.sim.add_member(CHAT, user).unwrap();
    }
    let (_, batch) = sim.get("/updates?timeout=0&marker=1&limit=1000").await;
    assert_eq!(batch["updates"].as_array().unwrap().len(), 100);
    assert_eq!(batch["marker"], 101);
}

#[tokio::test]
async fn updates_older_than_the_retention_are_gone() {
    // 24 hours in 0.5 seconds.
    let sim = admin_chat(SimConfig {
        time_scale: 24.0 * 3600.0 * 2.0,
        ..quiet()
    })
    .await;
    sim.sim.add_member(CHAT, 1).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    sim.sim.add_member(CHAT, 2).unwrap();
    let (_, batch) = sim.get("/updates?timeout=0&marker=1").await;
    assert_eq!(user_ids(&batch), [2]);
}

#[tokio::test]
async fn long_polling_does_not_work_while_a_webhook_is_subscribed() {
    let sim = admin_chat(quiet()).await;
    let (status, _) = sim
        .post(
            "/subscriptions",
            json!({"url": "https://example.org/max/updates", "secret": "s3cret_-"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = sim.get("/updates?timeout=0").await;
    assert_eq!((status, &body["code"]), (405, &json!("method.not.allowed")));
    let (status, _) = sim
        .send(
            reqwest::Method::DELETE,
            "/subscriptions?url=https://example.org/max/updates",
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    sim.sim.add_member(CHAT, 1).unwrap();
    let (status, body) = sim.get("/updates?timeout=0").await;
    assert_eq!((status, user_ids(&body)), (200, vec![1]));
}
