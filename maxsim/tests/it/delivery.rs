//! Webhook delivery: `/subscriptions`, the POSTs with the secret, MAX's retry schedule, the
//! give-up and the removal of a failing subscription, duplicates, reordering, the cap.

use std::time::{Duration, Instant};

use maxsim::{AdminRights, SimConfig};
use serde_json::json;

use crate::helpers::{quiet, Receiver, Sim};

const CHAT: i64 = -70_000_000_000_021;

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

async fn subscribe(sim: &Sim, body: serde_json::Value) -> u16 {
    sim.post("/subscriptions", body).await.0
}

#[tokio::test]
async fn subscriptions_check_the_url_and_the_secret_and_are_listed_and_deleted() {
    let sim = Sim::start(quiet()).await;
    let url = "https://participants.example.org/max/updates";
    for (body, why) in [
        (json!({"url": "http://participants.example.org/x"}), "http"),
        (
            json!({"url": "https://participants.example.org:8443/x"}),
            "a port",
        ),
        (json!({"url": url, "secret": "abcd"}), "a short secret"),
        (json!({"url": url, "secret": "with space"}), "a space"),
        (json!({"secret": "abcde"}), "no url"),
    ] {
        assert_eq!(subscribe(&sim, body).await, 400, "{why}");
    }
    let body =
        json!({"url": url, "update_types": ["user_added", "user_removed"], "secret": "Ab_9-x"});
    assert_eq!(subscribe(&sim, body).await, 200);
    let (status, listed) = sim.get("/subscriptions").await;
    assert_eq!(status, 200);
    let subscription = &listed["subscriptions"][0];
    assert_eq!(subscription["url"], url);
    assert_eq!(
        subscription["update_types"],
        json!(["user_added", "user_removed"])
    );
    assert!(subscription["time"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(subscription.get("secret").is_none(), "{listed}");
    let delete = format!("/subscriptions?url={url}");
    let (status, deleted) = sim.send(reqwest::Method::DELETE, &delete, json!({})).await;
    assert_eq!((status, &deleted["success"]), (200, &json!(true)));
    let (_, again) = sim.send(reqwest::Method::DELETE, &delete, json!({})).await;
    assert_eq!(again["success"], false);
    assert_eq!(
        sim.get("/subscriptions").await.1,
        json!({"subscriptions": []})
    );
}

#[tokio::test]
async fn each_event_is_posted_bare_with_the_secret_and_only_if_its_type_is_subscribed() {
    let sim = admin_chat(quiet()).await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    let body = json!({"url": receiver.url, "update_types": ["user_removed", "chat_title_changed"], "secret": "sim_secret-1"});
    assert_eq!(subscribe(&sim, body).await, 200);
    sim.sim.add_member(CHAT, 31).unwrap();
    sim.sim.remove_member(CHAT, 31).unwrap();
    sim.sim.rename(CHAT, "renamed");
    let received = receiver.wait_for(2, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = if receiver.received().len() > received.len() {
        receiver.received()
    } else {
        received
    };
    assert_eq!(
        received.len(),
        2,
        "user_added is not subscribed: {received:?}"
    );
    let mut types: Vec<_> = received
        .iter()
        .map(|r| r.body["update_type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    assert_eq!(types, ["chat_title_changed", "user_removed"]);
    for post in &received {
        assert_eq!(post.secret.as_deref(), Some("sim_secret-1"));
        assert_eq!(post.body["chat_id"], CHAT, "a bare Update: {}", post.body);
        assert!(post.body.get("updates").is_none());
    }
    let attempts = sim.sim.deliveries().attempts;
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.outcome == "ok" && a.retry == 0));
}

#[tokio::test]
async fn a_failing_webhook_is_retried_on_max_schedule_given_up_at_8h_and_unsubscribed() {
    // 8 hours in 4 seconds.
    let scale = 7200.0;
    let sim = admin_chat(SimConfig {
        time_scale: scale,
        webhook_timeout_secs: 3600.0,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[500], Duration::ZERO).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    let started = Instant::now();
    sim.sim.add_member(CHAT, 1).unwrap();

    // 60 s, then x2.5: retries at 60, 210, 585, 1523, 3867, 9726, 24374 s (6.77 h); the next
    // would be at 16.9 h, past 8 h, so 8 POSTs in all.
    let received = receiver.wait_for(8, Duration::from_secs(6)).await;
    let gaps: Vec<f64> = received
        .windows(2)
        .map(|pair| pair[1].at.duration_since(pair[0].at).as_secs_f64() * scale)
        .collect();
    let mut expected = 60.0;
    for (n, gap) in gaps.iter().enumerate() {
        // A real POST takes some milliseconds; at this scale 1 ms is 7.2 simulated seconds.
        assert!(
            *gap >= expected * 0.98 && *gap <= expected + 0.25 * scale,
            "retry {}: {gap} s, not {expected} s ({gaps:?})",
            n + 1
        );
        expected *= 2.5;
    }
    // The 8th POST failed at 6.77 h: the next retry would come past 8 h, so the event is given
    // up now, while the subscription still stands.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = sim.sim.deliveries();
    assert!(
        started.elapsed() < Duration::from_millis(3950),
        "still within 8 h"
    );
    assert_eq!(log.given_up.len(), 1, "{log:?}");
    assert_eq!(log.subscriptions.len(), 1);
    assert_eq!(
        log.attempts.iter().map(|a| a.retry).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert!(log.attempts.iter().all(|a| a.status == Some(500)));
    // After 8 hours of nothing but failures, MAX removes the subscription.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed())).await;
    let log = sim.sim.deliveries();
    assert_eq!(log.unsubscribed, std::slice::from_ref(&receiver.url));
    assert_eq!(receiver.received().len(), 8, "no POST after the give-up");
    assert_eq!(
        sim.get("/subscriptions").await.1,
        json!({"subscriptions": []})
    );
    // Events go to long polling again.
    sim.sim.add_member(CHAT, 2).unwrap();
    let (status, updates) = sim.get("/updates?timeout=0").await;
    assert_eq!(
        (status, &updates["updates"][0]["user"]["user_id"]),
        (200, &json!(2))
    );
}

#[tokio::test]
async fn an_answer_slower_than_the_timeout_fails_and_a_later_200_keeps_the_subscription() {
    let sim = admin_chat(SimConfig {
        webhook_timeout_secs: 0.1,
        webhook_retry_first_secs: 0.3,
        webhook_give_up_secs: 1.5,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[200], Duration::from_millis(400)).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    sim.sim.add_member(CHAT, 1).unwrap();
    receiver.wait_for(1, Duration::from_secs(2)).await;
    sim.sim.update(|c| c.webhook_timeout_secs = 2.0);
    receiver.wait_for(2, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let log = sim.sim.deliveries();
    let outcomes: Vec<_> = log.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["timeout", "ok"]);
    assert!(log.unsubscribed.is_empty(), "a 200 ends the failing streak");
    assert_eq!(log.subscriptions.len(), 1);
}

#[tokio::test]
async fn a_share_of_events_comes_twice_with_the_same_body() {
    let sim = admin_chat(SimConfig {
        duplicate_rate: 0.5,
        webhook_max_per_sec: 0,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    for user in 1..=200 {
        sim.sim.add_member(CHAT, user).unwrap();
    }
    let received = receiver.wait_for(260, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = receiver.received().len().max(received.len());
    let duplicates = received - 200;
    assert!(
        (60..=140).contains(&duplicates),
        "{duplicates} of 200 at 50%"
    );
    let log = sim.sim.deliveries();
    assert_eq!(
        log.attempts.iter().filter(|a| a.duplicate).count(),
        duplicates
    );
    let mut bodies: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.body.to_string())
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        200,
        "a duplicate is the same Update, timestamp included"
    );
}

#[tokio::test]
async fn a_share_of_events_is_held_back_and_arrives_after_later_ones() {
    let sim = admin_chat(SimConfig {
        reorder_rate: 0.3,
        reorder_max_secs: 2.0,
        webhook_max_per_sec: 0,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    let started = Instant::now();
    for user in 1..=100 {
        sim.sim.add_member(CHAT, user).unwrap();
    }
    let received = receiver.wait_for(100, Duration::from_secs(6)).await;
    let late = received
        .iter()
        .filter(|r| r.at.duration_since(started) > Duration::from_millis(400))
        .count();
    assert!((8..=45).contains(&late), "{late} of 100 held back at 30%");
    let last_users: Vec<i64> = received
        .iter()
        .rev()
        .take(5)
        .map(|r| r.body["user"]["user_id"].as_i64().unwrap())
        .collect();
    assert!(
        last_users.iter().any(|user| *user < 95),
        "an early event came among the last: {last_users:?}"
    );
}

#[tokio::test]
async fn no_more_than_the_cap_of_posts_start_in_a_second() {
    let sim = admin_chat(SimConfig {
        webhook_max_per_sec: 20,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[], Duration::ZERO).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    let started = Instant::now();
    for user in 1..=50 {
        sim.sim.add_member(CHAT, user).unwrap();
    }
    let received = receiver.wait_for(50, Duration::from_secs(6)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let times: Vec<Instant> = received.iter().map(|r| r.at).collect();
    for (n, at) in times.iter().enumerate() {
        let in_second = times[n..]
            .iter()
            .take_while(|later| later.duration_since(*at) < Duration::from_millis(950))
            .count();
        assert!(in_second <= 20, "{in_second} POSTs within a second");
    }
}

#[tokio::test]
async fn each_event_is_retried_on_its_own_schedule() {
    // One simulated minute in 16.7 ms.
    let scale = 3600.0;
    let sim = admin_chat(SimConfig {
        time_scale: scale,
        webhook_timeout_secs: 3600.0,
        ..quiet()
    })
    .await;
    let receiver = Receiver::start(&[503], Duration::ZERO).await;
    assert_eq!(subscribe(&sim, json!({"url": receiver.url})).await, 200);
    sim.sim.add_member(CHAT, 1).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    sim.sim.add_member(CHAT, 2).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let attempts = sim.sim.deliveries().attempts;
    for seq in [1, 2] {
        let times: Vec<i64> = attempts
            .iter()
            .filter(|a| a.seq == seq)
            .map(|a| a.at_ms)
            .collect();
        assert!(times.len() >= 4, "event {seq}: {times:?}");
        // Retries 60 s, 150 s, 375 s after the previous try: 16.7, 41.7, 104 ms.
        for (n, expected_ms) in [16.7, 41.7, 104.2].iter().enumerate() {
            let gap = (times[n + 1] - times[n]) as f64;
            assert!(
                gap >= expected_ms - 1.0 && gap <= expected_ms + 100.0,
                "event {seq}, retry {}: {gap} ms, not {expected_ms} ({times:?})",
                n + 1
            );
        }
    }
}
