//! What the api's logs say, read from the real binary's stderr: a dependency it cannot reach at
//! start-up is named at once, every line of a request carries its request id and trace id, and a
//! handler's panic is one counted 500 logged with its request id.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{admin_token, JWT_SECRET};

fn spawn_api(env: &[(&str, String)], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_api"))
        .arg("serve")
        .env_clear()
        .env("JWT_SECRET", JWT_SECRET)
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "debug")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("api runs")
}

/// Waits until the log holds a line with every one of `needles`, and returns that line.
fn wait_for_line(log: &Path, needles: &[&str], within: Duration) -> Option<String> {
    let started = Instant::now();
    while started.elapsed() < within {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|line| needles.iter().all(|needle| line.contains(needle)))
        {
            return Some(line.to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn postgres_and_redis_down_at_start_up_are_each_logged_at_once_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("api.log");
    let mut api = spawn_api(
        &[
            (
                "API_LISTEN_ADDR",
                format!("127.0.0.1:{}", testkit::free_port()),
            ),
            (
                "DATABASE_URL",
                format!(
                    "postgres://app:hunter2-secret@127.0.0.1:{}/chats",
                    testkit::free_port()
                ),
            ),
            (
                "REDIS_URL",
                format!("redis://:redis-secret@127.0.0.1:{}", testkit::free_port()),
            ),
        ],
        &log,
    );
    let postgres = wait_for_line(&log, &["postgres", "at start-up"], Duration::from_secs(15));
    let redis = wait_for_line(
        &log,
        &["redis does not answer at start-up"],
        Duration::from_secs(15),
    );
    let _ = api.kill();
    let _ = api.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        postgres.is_some_and(|line| line.contains("ERROR")),
        "{text}"
    );
    assert!(redis.is_some_and(|line| line.contains("ERROR")), "{text}");
    assert!(
        !text.contains("hunter2-secret") && !text.contains("redis-secret"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_request_carries_its_request_id_and_trace_id() {
    shared::tls::init();
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    api::migrate(&shared::config::DatabaseArgs {
        database_url: pg.url().into(),
        database_max_connections: 1,
        database_acquire_timeout: Duration::from_secs(10),
        database_statement_timeout: Duration::ZERO,
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("api.log");
    let address = format!("127.0.0.1:{}", testkit::free_port());
    let mut api = spawn_api(
        &[
            ("API_LISTEN_ADDR", address.clone()),
            ("DATABASE_URL", pg.url()),
            ("REDIS_URL", redis.url()),
        ],
        &log,
    );
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(response) = http
            .get(format!("http://{address}/health/ready"))
            .send()
            .await
        {
            if response.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http
        .get(format!("http://{address}/chats/all"))
        .bearer_auth(admin_token())
        .header("x-request-id", "req-abc-123")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    // A request without an id gets one, and says which.
    let generated = http
        .get(format!("http://{address}/health"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let generated = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36, "{generated}");
    let served = wait_for_line(
        &log,
        &["request served", "/chats/all", "req-abc-123", trace_id],
        Duration::from_secs(10),
    );
    let _ = api.kill();
    let _ = api.wait();
    assert!(
        served.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&generated), "the generated id is logged too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_500_counted_and_logged_once_with_its_request_id() {
    shared::tls::init();
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("api.log");
    let address = format!("127.0.0.1:{}", testkit::free_port());
    let mut api = spawn_api(
        &[
            ("API_LISTEN_ADDR", address.clone()),
            ("DATABASE_URL", pg.url()),
            ("REDIS_URL", redis.url()),
            ("API_DEBUG_PANIC_ROUTE", "true".to_owned()),
        ],
        &log,
    );
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if http
            .get(format!("http://{address}/health"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "{}", std::fs::read_to_string(&log).unwrap_or_default());
    let panicked = http
        .get(format!("http://{address}/debug/panic"))
        .header("x-request-id", "req-panic-42")
        .send()
        .await
        .unwrap();
    assert_eq!(panicked.status(), 500);
    assert_eq!(panicked.headers()["x-request-id"], "req-panic-42");
    let body: serde_json::Value = panicked.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal_error");
    assert_eq!(body["error"]["message"], "internal error");
    // The next request is served normally, and the panic was counted with its route.
    let after = http
        .get(format!("http://{address}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 200);
    let metrics = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logged = wait_for_line(
        &log,
        &["handler panicked", "req-panic-42", "/debug/panic"],
        Duration::from_secs(10),
    );
    let _ = api.kill();
    let _ = api.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.is_some(), "{text}");
    assert!(
        metrics.contains(r#"http_panics_total{route="/debug/panic"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"http_requests_total{method="GET",route="/debug/panic",status="500"} 1"#),
        "{metrics}"
    );
    let mentions = text
        .lines()
        .filter(|line| line.contains("req-panic-42"))
        .count();
    assert_eq!(mentions, 1, "the panic is logged once: {text}");
    assert!(
        !text.contains("thread '"),
        "no second, plain-text panic message: {text}"
    );
}
