//! Lazy refresh enqueueing, the dedup marker, and refresh-and-wait.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use fred::types::streams::XReadResponse;
use shared::counts::{write_fenced, CachedCount};
use shared::keys;
use shared::refresh::{Priority, RefreshOutcome, RefreshRequest};

use crate::helpers::{eventually, metric, NewChat, TestApp};

async fn read_stream(app: &TestApp, stream: &str) -> Vec<RefreshRequest> {
    let client = app.redis_client().await;
    let entries: Vec<(String, HashMap<String, String>)> =
        client.xrange(stream, "-", "+", None).await.unwrap();
    entries
        .iter()
        .map(|(_, fields)| RefreshRequest::from_fields(fields).expect("entries parse"))
        .collect()
}

#[tokio::test]
async fn a_hot_stale_chat_is_enqueued_once_not_once_per_read() {
    let app = TestApp::spawn().await;
    let stale = app
        .insert_chat(NewChat {
            name: "a",
            max_chat_id: Some("-70000000000001"),
            ..NewChat::default()
        })
        .await;
    let old = app
        .insert_chat(NewChat {
            name: "b",
            max_chat_id: Some("-70000000000002"),
            ..NewChat::default()
        })
        .await;
    app.record_sync(old, 5, Utc::now() - chrono::Duration::hours(3))
        .await;
    // Never sent to MAX: no id, or one that is not a number.
    app.insert_chat(NewChat {
        name: "c",
        max_chat_id: None,
        ..NewChat::default()
    })
    .await;
    app.insert_chat(NewChat {
        name: "d",
        max_chat_id: Some("https://max.ru/x"),
        ..NewChat::default()
    })
    .await;

    let reads = (0..20).map(|_| app.get_json("/chats/all"));
    for page in futures::future::join_all(reads).await {
        assert!(page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|chat| chat["participants_stale"] == true));
    }
    let app_ref = &app;
    eventually(Duration::from_secs(5), || async move {
        app_ref.stream_len(keys::REFRESH_STREAM_LAZY).await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let requests = read_stream(&app, keys::REFRESH_STREAM_LAZY).await;
    let mut chat_ids: Vec<i32> = requests.iter().map(|r| r.chat_id).collect();
    chat_ids.sort();
    assert_eq!(chat_ids, vec![stale, old]);
    assert!(requests.iter().all(|r| r.priority == Priority::Lazy));
    // The old count is served from Postgres with its timestamp, flagged stale.
    let page = app.get_json("/chats/all").await;
    assert_eq!(page["data"][1]["participants_count"], 5);
    assert!(page["data"][1]["participants_updated_at"].is_string());
}

#[tokio::test]
async fn fresh_cached_counts_are_served_and_not_enqueued() {
    let app = TestApp::spawn().await;
    // Cached before the api serves the chat, so that no read finds it stale.
    let id = app
        .insert_chat_unsettled(NewChat {
            participants_count: 3,
            ..NewChat::default()
        })
        .await;
    let asked_at = Utc::now();
    let client = app.redis_client().await;
    write_fenced(
        &client,
        &[(
            id,
            CachedCount {
                count: 40,
                updated_at: asked_at,
            },
        )],
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    app.settle().await;
    let chat = &app.get_json("/chats/all").await["data"][0];
    assert_eq!(chat["participants_count"], 40);
    assert_eq!(chat["participants_source"], "cache");
    assert_eq!(chat["participants_stale"], false);
    let served_at: chrono::DateTime<Utc> = chat["participants_updated_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(served_at.timestamp_millis(), asked_at.timestamp_millis());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.stream_len(keys::REFRESH_STREAM_LAZY).await, 0);
}

#[tokio::test]
async fn an_older_write_never_overwrites_a_newer_cached_count() {
    let app = TestApp::spawn().await;
    let client = app.redis_client().await;
    let now = Utc::now();
    let ttl = Duration::from_secs(3600);
    let newer = CachedCount {
        count: 50,
        updated_at: now,
    };
    let older = CachedCount {
        count: 49,
        updated_at: now - chrono::Duration::seconds(5),
    };
    assert_eq!(write_fenced(&client, &[(7, newer)], ttl).await.unwrap(), 1);
    assert_eq!(
        write_fenced(&client, &[(7, older), (8, older)], ttl)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        write_fenced(&client, &[(7, newer)], ttl).await.unwrap(),
        0,
        "a replay is a no-op"
    );
    let read = shared::counts::read_many(&client, &Options::default(), &[7, 8, 9])
        .await
        .unwrap();
    assert_eq!(read.get(&7).map(|c| c.count), Some(50));
    assert_eq!(read.get(&8).map(|c| c.count), Some(49));
    assert!(!read.contains_key(&9));
}

/// Plays syncd's part: takes manual requests off the stream and announces a count for each.
async fn fake_syncd(app: &TestApp, count: i32) -> tokio::task::JoinHandle<()> {
    let client = app.redis_client().await;
    tokio::spawn(async move {
        let mut last_id = "0".to_owned();
        loop {
            let reply: Value = client
                .xread(
                    Some(1),
                    Some(1_000),
                    keys::REFRESH_STREAM_MANUAL,
                    last_id.clone(),
                )
                .await
                .unwrap();
            if reply.is_null() {
                continue;
            }
            let reply: XReadResponse<String, String, String, String> =
                reply.flatten_array_values(2).convert().unwrap();
            for (_, entries) in reply {
                for (id, fields) in entries {
                    last_id = id;
                    let request = RefreshRequest::from_fields(&fields).unwrap();
                    assert_eq!(request.priority, Priority::Manual);
                    let _: i64 = client
                        .del(keys::manual_refresh_marker(request.chat_id))
                        .await
                        .unwrap();
                    let outcome = RefreshOutcome {
                        chat_id: request.chat_id,
                        participants_count: Some(count),
                        updated_at: Utc::now(),
                        error: None,
                    };
                    let _: i64 = client
                        .publish(
                            keys::REFRESH_OUTCOMES_CHANNEL,
                            serde_json::to_string(&outcome).unwrap(),
                        )
                        .await
                        .unwrap();
                }
            }
        }
    })
}

#[tokio::test]
async fn refresh_and_wait_answers_with_the_fresh_count() {
    let app = TestApp::spawn().await;
    let id = app.insert_chat(NewChat::default()).await;
    let syncd = fake_syncd(&app, 321).await;
    // The api subscribes in the background; give it until its first answer.
    let app_ref = &app;
    eventually(Duration::from_secs(10), || async move {
        app_ref
            .post(
                &format!("/chats/{id}/refresh-participants"),
                Some(&app_ref.admin()),
            )
            .await
            .status()
            == 200
    })
    .await;
    let response = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.token("operator", None)),
        )
        .await;
    assert_eq!(response.status(), 404, "outside the scope");
    let response = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "updated");
    assert_eq!(body["chat_id"], id);
    assert_eq!(body["participants_count"], 321);
    assert_eq!(body["source"], "api");
    assert!(body["updated_at"].is_string());
    syncd.abort();
}

#[tokio::test]
async fn refresh_without_an_answer_in_time_is_queued() {
    let app =
        TestApp::spawn_with(|args| args.participants_refresh_wait = Duration::from_millis(300))
            .await;
    let id = app.insert_chat(NewChat::default()).await;
    let response = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status": "queued", "chat_id": id}));
    let requests = read_stream(&app, keys::REFRESH_STREAM_MANUAL).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].chat_id, requests[0].priority),
        (id, Priority::Manual)
    );
    for (path, status) in [
        ("/chats/abc/refresh-participants", 400),
        ("/chats/999999/refresh-participants", 404),
    ] {
        assert_eq!(
            app.post(path, Some(&app.admin())).await.status(),
            status,
            "{path}"
        );
    }
    assert_eq!(
        app.post(&format!("/chats/{id}/refresh-participants"), None)
            .await
            .status(),
        401
    );
}

/// A curator's script hammering the refresh endpoint gets its quota, then 429 with Retry-After;
/// another caller is not held back, and the stream holds only what was admitted.
#[tokio::test]
async fn one_caller_past_its_refresh_rate_gets_429_and_others_do_not() {
    let app = TestApp::spawn_with(|args| {
        args.participants_refresh_wait = Duration::from_millis(50);
        args.participants_refresh_per_user_per_minute = 3;
    })
    .await;
    let id = app.insert_chat(NewChat::default()).await;
    let path = format!("/chats/{id}/refresh-participants");
    let script = api::auth::sign(
        &secrecy::SecretString::from(crate::helpers::JWT_SECRET.to_owned()),
        &api::auth::Claims {
            sub: "curator-script".into(),
            role: "super_admin".into(),
            exp: Utc::now().timestamp() + 600,
            university_id: None,
            branch_id: None,
            faculty_id: None,
        },
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(app.post(&path, Some(&script)).await.status(), 202);
    }
    let refused = app.post(&path, Some(&script)).await;
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    // Another caller (the helpers' tokens carry sub 42) is not held back.
    assert_eq!(app.post(&path, Some(&app.admin())).await.status(), 202);
    assert_eq!(
        read_stream(&app, keys::REFRESH_STREAM_MANUAL).await.len(),
        4
    );
}

/// Past PARTICIPANTS_REFRESH_MAX_WAITERS a request is still enqueued, and answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_past_the_waiter_cap_are_enqueued_and_answered_at_once() {
    let app = TestApp::spawn_with(|args| {
        args.participants_refresh_wait = Duration::from_secs(3);
        args.participants_refresh_max_waiters = 1;
    })
    .await;
    let first = app.insert_chat(NewChat::default()).await;
    let second = app.insert_chat(NewChat::default()).await;
    let token = app.admin();
    let (first_path, second_path) = (
        format!("/chats/{first}/refresh-participants"),
        format!("/chats/{second}/refresh-participants"),
    );
    let (a, b) = tokio::join!(app.post(&first_path, Some(&token)), async {
        // The first holds the only place while it waits for an answer no syncd gives.
        tokio::time::sleep(Duration::from_millis(500)).await;
        app.post(&second_path, Some(&token)).await
    });
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "participants_refresh_waits_total{outcome=\"busy\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "participants_refresh_waits_total{outcome=\"queued\"}"
        ),
        1.0
    );
    assert_eq!(
        read_stream(&app, keys::REFRESH_STREAM_MANUAL).await.len(),
        2
    );
}

#[tokio::test]
async fn use_cached_participants_false_serves_stored_counts_and_enqueues_nothing() {
    let app = TestApp::spawn().await;
    let cached = app
        .insert_chat_unsettled(NewChat {
            name: "a cached",
            max_chat_id: Some("-70000000000001"),
            participants_count: 3,
            ..NewChat::default()
        })
        .await;
    // Never refreshed: any read that may enqueue would enqueue it.
    let never = app
        .insert_chat_unsettled(NewChat {
            name: "b never refreshed",
            max_chat_id: Some("-70000000000002"),
            participants_count: 7,
            ..NewChat::default()
        })
        .await;
    write_fenced(
        &app.redis_client().await,
        &[(
            cached,
            CachedCount {
                count: 40,
                updated_at: Utc::now(),
            },
        )],
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let stored = "/chats/all?sort_by=name&use_cached_participants=false";
    let app_ref = &app;
    eventually(Duration::from_secs(10), || async move {
        app_ref.get_json(stored).await["total"] == 2
    })
    .await;
    let page = app.get_json(stored).await;
    let chats = page["data"].as_array().unwrap();
    assert_eq!(chats[0]["id"], cached);
    assert_eq!(
        chats[0]["participants_count"], 3,
        "Postgres' count, not Redis' 40"
    );
    assert_eq!(chats[1]["participants_count"], 7);
    assert!(chats
        .iter()
        .all(|chat| chat["participants_source"] == "database"));
    let one = app
        .get_json(&format!("/chats/{cached}?use_cached_participants=false"))
        .await;
    assert_eq!(
        (
            one["participants_count"].clone(),
            one["participants_source"].clone()
        ),
        (3.into(), "database".into())
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.stream_len(keys::REFRESH_STREAM_LAZY).await, 0);
    let bad = app
        .get(
            "/chats/all?use_cached_participants=maybe",
            Some(&app.admin()),
        )
        .await;
    assert_eq!(bad.status(), 400);

    // Absent (or true) is the cached read as before: Redis' count, and the stale one enqueued.
    let page = app.get_json("/chats/all?sort_by=name").await;
    assert_eq!(page["data"][0]["participants_count"], 40);
    assert_eq!(page["data"][0]["participants_source"], "cache");
    eventually(Duration::from_secs(5), || async move {
        app_ref.stream_len(keys::REFRESH_STREAM_LAZY).await == 1
    })
    .await;
    let requests = read_stream(&app, keys::REFRESH_STREAM_LAZY).await;
    assert_eq!(requests[0].chat_id, never);
}
