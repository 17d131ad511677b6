//! One trace from an api request, through the refresh stream entry, into syncd's MAX call,
//! seen by a stand-in OTLP/HTTP collector that records the spans both processes export.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use maxsim::SimConfig;

use crate::end_to_end::token;
use crate::helpers::{eventually, World};

/// (service.name, trace id, span name) of every exported span.
type Spans = Arc<Mutex<Vec<(String, String, String)>>>;

async fn collect(
    State(spans): State<Spans>,
    Json(body): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    let mut seen = spans.lock().unwrap();
    for resource in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = resource["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|attribute| attribute["key"] == "service.name")
            .and_then(|attribute| attribute["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                seen.push((
                    service.clone(),
                    span["traceId"].as_str().unwrap_or_default().to_lowercase(),
                    span["name"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    Json(serde_json::json!({}))
}

fn sibling_binary(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_syncd")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built: run the whole workspace's tests (make test)",
        path.display()
    );
    path
}

fn terminate(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::test]
async fn one_trace_runs_from_the_api_request_to_the_max_call() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(1).await;

    let spans: Spans = Arc::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_url = format!("http://{}", collector.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(collector, app).await });

    shared::db::MIGRATOR.run(&world.db).await.unwrap();
    let api_port = testkit::free_port();
    let env: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", world.pg.url()),
        ("REDIS_URL", world.redis_url.clone()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url.clone()),
        ("LOG_LEVEL", "warn".to_owned()),
    ]);
    let api = Command::new(sibling_binary("api"))
        .arg("serve")
        .args(["--listen-addr", &format!("127.0.0.1:{api_port}")])
        .args(["--jwt-secret", "end-to-end-secret-0123456789abcdef"])
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let syncd = Command::new(env!("CARGO_BIN_EXE_syncd"))
        .arg("run")
        .args([
            "--listen-addr",
            "127.0.0.1:0",
            "--participants-enable-background-sync",
            "false",
        ])
        .args([
            "--max-api-url",
            &format!("http://{}", world.sim_address),
            "--max-api-token",
            crate::helpers::TOKEN,
        ])
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let http = reqwest::Client::new();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let url = format!("http://127.0.0.1:{api_port}/chats/{}", ids[0]);
    // Wait until the api uses Redis, then read the stale chat inside our trace.
    eventually(
        Duration::from_secs(20),
        "the api serves and uses redis",
        || async {
            let Ok(response) = http
                .get(format!("http://127.0.0.1:{api_port}/metrics"))
                .send()
                .await
            else {
                return false;
            };
            response.text().await.is_ok_and(|page| {
                page.lines()
                    .any(|line| line == "participants_cache_available 1")
            }) && http
                .get(format!("http://127.0.0.1:{api_port}/health/ready"))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        },
    )
    .await;
    let response = http
        .get(&url)
        .bearer_auth(token())
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    eventually(
        Duration::from_secs(20),
        "syncd refreshed the chat",
        || async { world.refreshed().await == 1 },
    )
    .await;

    // Stopping both flushes their span batches.
    tokio::task::spawn_blocking(move || {
        terminate(api);
        terminate(syncd);
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "spans of both processes arrived",
        || async {
            let seen = spans.lock().unwrap();
            let in_trace = |service: &str, name: &str| {
                seen.iter()
                    .any(|(s, t, n)| s == service && t == trace_id && n == name)
            };
            in_trace("participants-api", "http.request")
                && in_trace("participants-syncd", "refresh_chat")
                && in_trace("participants-syncd", "max.get_chat")
        },
    )
    .await;
}
