//! The counts the api holds in memory (Redis client tracking): pages without a Redis command,
//! kept exact by invalidations, dropped when the invalidation channel is lost.

use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use fred::types::InfoKind;
use shared::counts::{write_fenced, CachedCount};

use crate::helpers::{eventually, metric, NewChat, TestApp};

/// Writes a count with syncd's fenced script, on a connection of the test's own.
async fn write_count(app: &TestApp, chat_id: i32, count: i32) {
    let client = app.redis_client().await;
    let value = CachedCount {
        count,
        updated_at: Utc::now(),
    };
    write_fenced(&client, &[(chat_id, value)], Duration::from_secs(3600))
        .await
        .unwrap();
}

/// The first chat's count and where it came from.
async fn first_count(app: &TestApp) -> (i64, String) {
    let chat = app.get_json("/chats/all").await["data"][0].clone();
    (
        chat["participants_count"].as_i64().unwrap(),
        chat["participants_source"].as_str().unwrap().to_owned(),
    )
}

async fn local_pages(app: &TestApp) -> f64 {
    metric(&app.metrics().await, "participants_cache_local_pages_total")
}

/// Waits until a page shows `count` from the cache and was served from the api's memory.
async fn wait_until_held(app: &TestApp, count: i64) {
    eventually(Duration::from_secs(20), || async {
        let before = local_pages(app).await;
        first_count(app).await == (count, "cache".to_owned()) && local_pages(app).await > before
    })
    .await;
}

/// Calls of every command Redis has run, but PING and INFO (the probe's, the test's own).
fn commands_but_pings(info: &str) -> u64 {
    info.lines()
        .filter(|line| line.starts_with("cmdstat_"))
        .filter(|line| !line.starts_with("cmdstat_ping:") && !line.starts_with("cmdstat_info:"))
        .filter_map(|line| {
            let calls = line.split("calls=").nth(1)?;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

async fn spawn_with_one_chat() -> (TestApp, i32) {
    // No lazy refreshes: the enqueue script would be a Redis command of its own.
    let app = TestApp::spawn_with(|args| args.participants_enable_lazy_update = false).await;
    let id = app
        .insert_chat(NewChat {
            participants_count: 10,
            ..NewChat::default()
        })
        .await;
    (app, id)
}

#[tokio::test]
async fn a_page_whose_counts_are_held_sends_no_redis_command() {
    let (app, id) = spawn_with_one_chat().await;
    write_count(&app, id, 77).await;
    wait_until_held(&app, 77).await;

    let client = app.redis_client().await;
    let before: String = client.info(Some(InfoKind::CommandStats)).await.unwrap();
    for _ in 0..20 {
        assert_eq!(first_count(&app).await, (77, "cache".to_owned()));
    }
    let after: String = client.info(Some(InfoKind::CommandStats)).await.unwrap();
    assert_eq!(
        commands_but_pings(&after),
        commands_but_pings(&before),
        "pages sent redis commands:\n{after}"
    );
}

#[tokio::test]
async fn a_count_written_by_syncd_is_served_by_the_next_page_after_its_invalidation() {
    let (app, id) = spawn_with_one_chat().await;
    write_count(&app, id, 77).await;
    wait_until_held(&app, 77).await;
    // A later MAX answer through the fenced script: the held bucket is invalidated and the
    // next page reads it again.
    write_count(&app, id, 78).await;
    wait_until_held(&app, 78).await;
    // And the empty case: a chat whose bucket was held without its value.
    let other = app
        .insert_chat(NewChat {
            name: "zz",
            participants_count: 3,
            ..NewChat::default()
        })
        .await;
    assert_eq!(keys_bucket(id), keys_bucket(other));
    write_count(&app, other, 31).await;
    eventually(Duration::from_secs(20), || async {
        let page = app
            .get_json("/chats/all?sort_by=name&sort_order=desc")
            .await;
        page["data"][0]["participants_count"] == 31
            && page["data"][0]["participants_source"] == "cache"
    })
    .await;
}

fn keys_bucket(id: i32) -> i64 {
    shared::keys::bucket_of(id)
}

#[tokio::test]
async fn flushall_drops_the_counts_held() {
    let (app, id) = spawn_with_one_chat().await;
    write_count(&app, id, 77).await;
    wait_until_held(&app, 77).await;
    let client = app.redis_client().await;
    let _: () = client.flushall(false).await.unwrap();
    eventually(Duration::from_secs(20), || async {
        first_count(&app).await == (10, "database".to_owned())
    })
    .await;
    // FLUSHALL also made Redis forget what the api's connection read: a write after it must
    // still reach the page.
    write_count(&app, id, 55).await;
    wait_until_held(&app, 55).await;
}

#[tokio::test]
async fn the_counts_held_are_dropped_when_redis_restarts_with_another_value() {
    let (mut app, id) = spawn_with_one_chat().await;
    write_count(&app, id, 77).await;
    wait_until_held(&app, 77).await;

    app.redis.kill();
    app.redis.restart();
    write_count(&app, id, 55).await;
    // From the moment Redis answers again, no page serves the value it lost.
    eventually(Duration::from_secs(30), || async {
        let served = first_count(&app).await;
        assert_ne!(served.0, 77, "a count redis no longer has was served");
        served == (55, "cache".to_owned())
    })
    .await;
    wait_until_held(&app, 55).await;

    app.redis.restart();
    eventually(Duration::from_secs(30), || async {
        let served = first_count(&app).await;
        assert_ne!(served.0, 55, "a count redis no longer has was served");
        served == (10, "database".to_owned())
            && metric(&app.metrics().await, "participants_cache_tracking") == 1.0
    })
    .await;
}
