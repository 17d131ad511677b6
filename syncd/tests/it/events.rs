//! Membership events intake: the webhook receiver over a real socket, the events consumer in
//! its group, and `stream` mode on another service's stream, against a real Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use maxsim::SimConfig;
use shared::keys;
use syncd::events::intake::{Intake, Registers};
use syncd::events::register::{Baseline, ChatState, Effect, Register};
use syncd::events::settings::UpdatesMode;
use syncd::events::webhook::{self, Receiver, BODY_LIMIT};
use syncd::metrics::Metrics;
use testkit::RedisServer;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, World};

const SECRET: &str = "webhook-secret_42";
const CHAT: i64 = -70_000_000_000_001;
const ASKED_AT: i64 = 1_775_000_000_000;

fn user_added(user_id: i64, after_ms: i64) -> String {
    format!(
        r#"{{"update_type":"user_added","timestamp":{},"chat_id":{CHAT},"user":{{"user_id":{user_id},"first_name":"A","is_bot":false}},"is_channel":false}}"#,
        ASKED_AT + after_ms
    )
}

async fn client(url: &str) -> Client {
    let args = shared::config::RedisArgs {
        redis_url: url.to_owned().into(),
        redis_timeout: Duration::from_millis(250),
        disable_redis: false,
    };
    let client = shared::redis::connect(&args).unwrap();
    client.wait_for_connect().await.unwrap();
    client
}

/// A receiver on a port of its own, as `syncd run` serves it in webhook mode.
struct Webhook {
    url: String,
    metrics: Metrics,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_webhook(redis: &RedisServer) -> Webhook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let metrics = Metrics::new();
    let receiver = Receiver::new(
        client(&redis.url()).await,
        SECRET.to_owned().into(),
        metrics.clone(),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(webhook::serve(listener, receiver, cancel.clone()));
    Webhook {
        url: format!("http://{address}{}", webhook::PATH),
        metrics,
        _stop: cancel.drop_guard(),
    }
}

async fn post(url: &str, secret: Option<&str>, body: impl Into<reqwest::Body>) -> u16 {
    shared::tls::init();
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(secret) = secret {
        request = request.header("X-Max-Bot-Api-Secret", secret);
    }
    request.send().await.unwrap().status().as_u16()
}

async fn xlen(redis: &Client, stream: &str) -> i64 {
    redis.xlen(stream).await.unwrap()
}

/// Chat states kept in memory: what the wiring to the count writes will keep in Redis.
#[derive(Clone, Default)]
struct Memory {
    chats: Arc<Mutex<HashMap<i64, ChatState>>>,
    effects: Arc<Mutex<Vec<Effect>>>,
}

impl Memory {
    fn with_baseline(count: i64) -> Self {
        let memory = Self::default();
        let baseline = Baseline {
            count,
            asked_at_ms: ASKED_AT,
        };
        memory
            .chats
            .lock()
            .unwrap()
            .insert(CHAT, ChatState::Counted(Register::new(baseline)));
        memory
    }

    fn count(&self) -> Option<i64> {
        match self.chats.lock().unwrap().get(&CHAT)? {
            ChatState::Counted(register) => Some(register.tally().count),
            _ => None,
        }
    }
}

impl Registers for Memory {
    async fn load(&self, chat_id: i64) -> anyhow::Result<ChatState> {
        Ok(self
            .chats
            .lock()
            .unwrap()
            .get(&chat_id)
            .cloned()
            .unwrap_or(ChatState::Unknown))
    }

    async fn commit(
        &self,
        chat_id: i64,
        state: ChatState,
        effects: Vec<Effect>,
    ) -> anyhow::Result<()> {
        self.chats.lock().unwrap().insert(chat_id, state);
        self.effects.lock().unwrap().extend(effects);
        Ok(())
    }
}

async fn start_intake(
    redis: &RedisServer,
    stream: &str,
    mode: UpdatesMode,
    memory: &Memory,
) -> (Metrics, tokio_util::sync::DropGuard) {
    let metrics = Metrics::new();
    let intake = Intake {
        consumer: "test-consumer".to_owned(),
        redis: client(&redis.url()).await,
        reader: client(&redis.url()).await,
        stream: stream.to_owned(),
        mode,
        claim_idle: Duration::from_secs(1),
        metrics: metrics.clone(),
        registers: memory.clone(),
        not_updates: Default::default(),
    };
    let cancel = CancellationToken::new();
    tokio::spawn(intake.run(cancel.clone()));
    (metrics, cancel.drop_guard())
}

/// The value of one series on a metrics page (0 when absent).
fn series(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn webhook_refuses_a_missing_or_wrong_secret_with_401_and_stores_nothing() {
    let redis_server = RedisServer::start();
    let hook = start_webhook(&redis_server).await;
    let redis = client(&redis_server.url()).await;
    let body = user_added(1, 5_000);
    assert_eq!(post(&hook.url, None, body.clone()).await, 401);
    assert_eq!(
        post(&hook.url, Some("webhook-secret_43"), body.clone()).await,
        401
    );
    assert_eq!(post(&hook.url, Some("webhook"), body.clone()).await, 401);
    assert_eq!(post(&hook.url, Some(""), body.clone()).await, 401);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM).await, 0);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM_DEAD).await, 0);
    let page = hook.metrics.render();
    assert_eq!(
        series(
            &page,
            r#"participants_events_rejected_total{reason="unauthorized"}"#
        ),
        4.0
    );
}

#[tokio::test]
async fn webhook_refuses_a_body_over_64_kib_with_413_and_takes_one_of_64_kib() {
    let redis_server = RedisServer::start();
    let hook = start_webhook(&redis_server).await;
    let redis = client(&redis_server.url()).await;
    // A valid update padded with spaces to exactly the limit, and one byte more.
    let update = user_added(1, 5_000);
    let at_limit = format!("{update}{}", " ".repeat(BODY_LIMIT - update.len()));
    let over = format!("{at_limit} ");
    assert_eq!(post(&hook.url, Some(SECRET), over).await, 413);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM).await, 0);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM_DEAD).await, 0);
    assert_eq!(post(&hook.url, Some(SECRET), at_limit).await, 200);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM).await, 1);
}

#[tokio::test]
async fn webhook_answers_200_once_the_raw_update_is_in_the_stream() {
    let redis_server = RedisServer::start();
    let hook = start_webhook(&redis_server).await;
    let redis = client(&redis_server.url()).await;
    let body = user_added(7, 5_000);
    assert_eq!(post(&hook.url, Some(SECRET), body.clone()).await, 200);
    let entries: Vec<(String, HashMap<String, String>)> = redis
        .xrange(keys::EVENTS_STREAM, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1[keys::EVENTS_FIELD_UPDATE], body);
    let page = hook.metrics.render();
    assert_eq!(
        series(
            &page,
            r#"participants_events_received_total{mode="webhook"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn webhook_answers_200_to_a_body_that_is_not_an_update_and_dead_letters_it() {
    let redis_server = RedisServer::start();
    let hook = start_webhook(&redis_server).await;
    let redis = client(&redis_server.url()).await;
    for body in [
        "not json",
        r#"{"hello":"world"}"#,
        r#"{"update_type":"user_added","timestamp":1}"#,
    ] {
        assert_eq!(post(&hook.url, Some(SECRET), body).await, 200, "{body}");
    }
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM).await, 0);
    let dead: Vec<(String, HashMap<String, String>)> = redis
        .xrange(keys::EVENTS_STREAM_DEAD, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(dead.len(), 3);
    assert!(dead
        .iter()
        .all(|(_, fields)| fields["reason"] == "not_an_update"));
    assert_eq!(dead[0].1[keys::EVENTS_FIELD_UPDATE], "not json");
}

#[tokio::test]
async fn webhook_answers_503_while_redis_is_down_and_a_repeated_delivery_counts_once() {
    let mut redis_server = RedisServer::start();
    let hook = start_webhook(&redis_server).await;
    let body = user_added(7, 5_000);
    redis_server.kill();
    assert_eq!(post(&hook.url, Some(SECRET), body.clone()).await, 503);
    redis_server.restart();
    // MAX retries the delivery until it gets a 200.
    let mut status = 0;
    for _ in 0..50 {
        status = post(&hook.url, Some(SECRET), body.clone()).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    let redis = client(&redis_server.url()).await;
    assert_eq!(
        xlen(&redis, keys::EVENTS_STREAM).await,
        1,
        "stored once: the 503 stored nothing"
    );
    // A 200 MAX did not see: it delivers again, and the stream holds the update twice.
    assert_eq!(post(&hook.url, Some(SECRET), body.clone()).await, 200);
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM).await, 2);
    let page = hook.metrics.render();
    assert_eq!(
        series(
            &page,
            r#"participants_events_rejected_total{reason="unavailable"}"#
        ),
        1.0
    );

    // Applied from the stream, the twice-delivered join moves the count once.
    let memory = Memory::with_baseline(10);
    let (metrics, _stop) = start_intake(
        &redis_server,
        keys::EVENTS_STREAM,
        UpdatesMode::Webhook,
        &memory,
    )
    .await;
    eventually(Duration::from_secs(10), "both entries consumed", || async {
        let page = metrics.render();
        series(
            &page,
            r#"participants_events_applied_total{outcome="duplicate"}"#,
        ) == 1.0
            && series(
                &page,
                r#"participants_events_applied_total{outcome="applied"}"#,
            ) == 1.0
    })
    .await;
    assert_eq!(memory.count(), Some(11));
    assert_eq!(
        memory.effects.lock().unwrap().as_slice(),
        [Effect::Count {
            count: 11,
            exact_at_ms: ASKED_AT + 5_000
        }]
    );
}

#[tokio::test]
async fn stream_mode_reads_another_services_stream_in_its_own_group_and_leaves_other_groups_alone()
{
    let redis_server = RedisServer::start();
    let redis = client(&redis_server.url()).await;
    let stream = "bot-service:max-updates";
    // The other service's own consumer group has read one entry and not acknowledged it.
    let _: () = redis
        .xgroup_create(stream, "bot-service", "$", true)
        .await
        .unwrap();
    for body in [
        user_added(1, 5_000),
        "garbage".to_owned(),
        user_added(2, 6_000),
        user_added(1, 5_000),
    ] {
        let _: String = redis
            .xadd(
                stream,
                false,
                ("MAXLEN", "~", 1000),
                "*",
                vec![(keys::EVENTS_FIELD_UPDATE, body)],
            )
            .await
            .unwrap();
    }
    let theirs: Value = redis
        .xreadgroup("bot-service", "bot-1", Some(1), None, false, stream, ">")
        .await
        .unwrap();
    assert!(!matches!(theirs, Value::Null));
    let memory = Memory::with_baseline(10);
    let (metrics, _stop) = start_intake(&redis_server, stream, UpdatesMode::Stream, &memory).await;
    eventually(Duration::from_secs(10), "the stream consumed", || async {
        let info = syncd::stream::redis::group_info_of(&redis, stream, keys::EVENTS_GROUP).await;
        info.lag == Some(0) && info.pending == Some(0)
    })
    .await;
    assert_eq!(
        memory.count(),
        Some(12),
        "two joins, one of them delivered twice"
    );
    let page = metrics.render();
    assert_eq!(
        series(
            &page,
            r#"participants_events_received_total{mode="stream"}"#
        ),
        3.0
    );
    assert_eq!(
        series(
            &page,
            r#"participants_events_rejected_total{reason="not_an_update"}"#
        ),
        1.0
    );
    assert_eq!(xlen(&redis, keys::EVENTS_STREAM_DEAD).await, 1);
    // The other group is as it was: one pending entry, three never delivered.
    let info = syncd::stream::redis::group_info_of(&redis, stream, "bot-service").await;
    assert_eq!(info.pending, Some(1));
    assert_eq!(info.lag, Some(3));
    assert_eq!(xlen(&redis, stream).await, 4, "nothing trimmed or deleted");
}

#[tokio::test]
async fn syncd_run_in_webhook_mode_serves_the_receiver_on_its_own_port_and_consumes_it() {
    let world = World::new(SimConfig::default()).await;
    let port = testkit::free_port();
    let replica = world
        .replica(&[
            "--participants-enable-background-sync",
            "false",
            "--max-updates-mode",
            "webhook",
            "--max-webhook-secret",
            SECRET,
            "--webhook-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .await;
    let url = format!("http://127.0.0.1:{port}{}", webhook::PATH);
    let mut status = 0;
    for _ in 0..50 {
        match reqwest::Client::new()
            .post(&url)
            .header("X-Max-Bot-Api-Secret", SECRET)
            .body(user_added(3, 5_000))
            .send()
            .await
        {
            Ok(response) => {
                status = response.status().as_u16();
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(status, 200);
    // Never beside /metrics.
    let metrics_port = format!("http://{}{}", replica.address, webhook::PATH);
    assert_eq!(
        post(&metrics_port, Some(SECRET), user_added(3, 5_000)).await,
        404
    );
    let http = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", replica.address);
    eventually(Duration::from_secs(20), "the update consumed", || async {
        let page = http
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Not wired to the count writes yet: no chat has a baseline for events.
        series(
            &page,
            r#"participants_events_applied_total{outcome="needs_baseline"}"#,
        ) == 1.0
            && series(
                &page,
                r#"participants_events_received_total{mode="webhook"}"#,
            ) == 1.0
    })
    .await;
    let redis = world.redis_client().await;
    let info =
        syncd::stream::redis::group_info_of(&redis, keys::EVENTS_STREAM, keys::EVENTS_GROUP).await;
    assert_eq!(info.pending, Some(0), "acknowledged after handling");
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_update_a_crashed_replica_held_is_taken_over_and_applied_once() {
    let redis_server = RedisServer::start();
    let redis = client(&redis_server.url()).await;
    let stream = keys::EVENTS_STREAM;
    let _: () = redis
        .xgroup_create(stream, keys::EVENTS_GROUP, "0", true)
        .await
        .unwrap();
    let _: String = redis
        .xadd(
            stream,
            false,
            ("MAXLEN", "~", 1000),
            "*",
            vec![(keys::EVENTS_FIELD_UPDATE, user_added(4, 5_000))],
        )
        .await
        .unwrap();
    // A replica read it and died before acknowledging it.
    let held: Value = redis
        .xreadgroup(
            keys::EVENTS_GROUP,
            "crashed",
            Some(10),
            None,
            false,
            stream,
            ">",
        )
        .await
        .unwrap();
    assert!(!matches!(held, Value::Null));
    let memory = Memory::with_baseline(10);
    let (metrics, _stop) = start_intake(&redis_server, stream, UpdatesMode::Webhook, &memory).await;
    eventually(
        Duration::from_secs(10),
        "the held update taken over",
        || async {
            let info =
                syncd::stream::redis::group_info_of(&redis, stream, keys::EVENTS_GROUP).await;
            info.pending == Some(0)
        },
    )
    .await;
    assert_eq!(memory.count(), Some(11));
    let page = metrics.render();
    assert_eq!(
        series(
            &page,
            r#"participants_events_applied_total{outcome="applied"}"#
        ),
        1.0
    );
}
