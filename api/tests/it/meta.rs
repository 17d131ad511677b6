//! Health, metrics, OpenAPI, and errors for routes that do not exist.

use crate::helpers::{metric, TestApp};

#[tokio::test]
async fn health_endpoints_need_no_token() {
    let app = TestApp::spawn().await;
    let health: serde_json::Value = app.get("/health", None).await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let redis = app.get("/health/redis", None).await;
    assert_eq!(redis.status(), 200);
    let detailed = app.get("/health/detailed", None).await;
    assert_eq!(detailed.status(), 200);
    let detailed: serde_json::Value = detailed.json().await.unwrap();
    assert_eq!(detailed["database"]["status"], "up");
    assert_eq!(detailed["redis"]["status"], "up");
    // No syncd has beaten yet.
    assert_eq!(detailed["syncd"]["status"], "down");
    assert_eq!(detailed["status"], "degraded");
}

#[tokio::test]
async fn detailed_health_reports_syncd_from_its_heartbeat() {
    use fred::prelude::*;
    let app = TestApp::spawn().await;
    let client = app.redis_client().await;
    let now = chrono::Utc::now().timestamp_millis().to_string();
    let _: () = client
        .hset(
            shared::keys::SYNCD_STATUS,
            [
                (
                    format!("{}replica-1", shared::keys::status::HEARTBEAT_PREFIX),
                    now.clone(),
                ),
                (
                    shared::keys::status::MAX_TOKEN.to_owned(),
                    "invalid".to_owned(),
                ),
                (
                    shared::keys::status::MAX_LAST_ERROR.to_owned(),
                    "invalid_token".to_owned(),
                ),
            ],
        )
        .await
        .unwrap();
    let detailed: serde_json::Value = app
        .get("/health/detailed", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detailed["syncd"]["status"], "up");
    assert_eq!(detailed["syncd"]["replicas"], 1);
    assert_eq!(detailed["syncd"]["max_token"], "invalid");
    assert_eq!(detailed["status"], "degraded");
}

#[tokio::test]
async fn metrics_expose_the_seed_names() {
    let app = TestApp::spawn().await;
    app.get_json("/chats/all").await;
    let response = app.get("/metrics", None).await;
    assert_eq!(response.status(), 200);
    let page = response.text().await.unwrap();
    for name in [
        "participants_cache_hits_total",
        "participants_cache_misses_total",
        "participants_cache_errors_total",
        "participants_fallback_usage_total",
        "participants_cache_available",
        "participants_cache_enabled",
        "participants_build_info",
        // prefixed, so that they do not mix with other services' `http_requests_total`
        "participants_http_requests_total",
        "participants_http_request_duration_seconds",
        // the process's own, as every Prometheus client exports them
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            page.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    for name in ["http_requests_total", "http_request_duration_seconds"] {
        assert!(
            !page.contains(&format!("# TYPE {name} ")),
            "unprefixed {name} would collide with other services' series"
        );
    }
    let build = page
        .lines()
        .find(|line| line.starts_with("participants_build_info{"))
        .expect("a build_info series");
    assert!(build.contains(r#"binary="api""#), "{build}");
    assert!(
        build.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(build.ends_with(" 1"), "{build}");
    assert_eq!(metric(&page, "participants_cache_enabled"), 1.0);
}

#[tokio::test]
async fn openapi_describes_every_endpoint() {
    let app = TestApp::spawn().await;
    let doc: serde_json::Value = app.get("/openapi.json", None).await.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/chats/all",
        "/chats/{id}",
        "/chats/{id}/refresh-participants",
        "/health",
        "/health/detailed",
        "/health/redis",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from /openapi.json"
        );
    }
    assert!(doc["components"]["schemas"]["ChatView"].is_object());
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = TestApp::spawn().await;
    let response = app.get("/nope", None).await;
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let response = app.http.delete(app.url("/chats/all")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // Made-up methods share one label instead of making a metric series each.
    for n in 0..5 {
        let method = reqwest::Method::from_bytes(format!("BOGUS{n}").as_bytes()).unwrap();
        let response = app
            .http
            .request(method, app.url("/chats/all"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
    }
    let metrics = app.metrics().await;
    assert!(!metrics.contains("BOGUS"), "a raw method became a label");
    assert!(metrics.contains("method=\"other\""));
}

#[tokio::test]
async fn shutdown_drains_and_returns_cleanly() {
    let mut app = TestApp::spawn().await;
    app.get_json("/chats/all").await;
    app.stop_api().await.expect("run returns Ok after shutdown");
    assert!(
        app.http.get(app.url("/health")).send().await.is_err(),
        "the listener is closed"
    );
}

/// `api health` is the container healthcheck: exit 0 while the api answers /health, 1 with the
/// reason when nothing listens (the images have no curl, and dash has no /dev/tcp). Multi-thread:
/// the child process is awaited blocking, and the api must answer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_subcommand_exits_0_for_a_live_api_and_1_for_a_dead_port() {
    let app = TestApp::spawn().await;
    let run = |address: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_api"))
            .args(["health", "--listen-addr", &address, "--timeout", "5s"])
            .env_remove("API_LISTEN_ADDR")
            .output()
            .expect("api runs")
    };
    let live = run(format!("0.0.0.0:{}", app.address.port()));
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let dead = run(format!("127.0.0.1:{}", testkit::free_port()));
    assert_eq!(dead.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dead.stderr).contains("unhealthy: cannot connect"));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .args([
            "health",
            "--listen-addr",
            &app.address.to_string(),
            "--path",
            "/no-such-page",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
}

/// `api/openapi.json` is the document the api serves at /openapi.json, checked in so that a
/// change of the contract shows in review. Regenerate it with
/// `UPDATE_OPENAPI=1 cargo test -p api --test it the_checked_in_openapi`.
#[test]
fn the_checked_in_openapi_document_matches_the_generated_one() {
    use utoipa::OpenApi;
    let generated =
        serde_json::to_string_pretty(&api::routes::meta::ApiDoc::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "api/openapi.json differs from the generated document; regenerate it with \
         UPDATE_OPENAPI=1 cargo test -p api --test it the_checked_in_openapi, and review the diff"
    );
}
