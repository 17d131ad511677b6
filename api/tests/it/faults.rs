//! The read-path rows of the fault matrix, each with the real server stopped or killed.

use std::time::Duration;

use chrono::Utc;
use shared::counts::{write_fenced, CachedCount};

use crate::helpers::{eventually, metric, NewChat, TestApp};

async fn cache_count(app: &TestApp, chat_id: i32, count: i32) {
    let client = app.redis_client().await;
    let value = CachedCount {
        count,
        updated_at: Utc::now(),
    };
    write_fenced(&client, &[(chat_id, value)], Duration::from_secs(3600))
        .await
        .unwrap();
}

async fn first_chat(app: &TestApp) -> serde_json::Value {
    app.get_json("/chats/all").await["data"][0].clone()
}

#[tokio::test]
async fn list_falls_back_to_postgres_when_redis_is_killed_and_returns_to_the_cache() {
    let mut app = TestApp::spawn().await;
    let id = app
        .insert_chat(NewChat {
            participants_count: 10,
            ..NewChat::default()
        })
        .await;
    cache_count(&app, id, 77).await;
    let chat = first_chat(&app).await;
    assert_eq!(
        (
            chat["participants_count"].as_i64(),
            chat["participants_source"].as_str()
        ),
        (Some(77), Some("cache"))
    );

    app.redis.kill();
    for _ in 0..3 {
        let chat = first_chat(&app).await;
        assert_eq!(chat["participants_count"], 10);
        assert_eq!(chat["participants_source"], "database");
    }
    assert_eq!(app.get("/health/redis", None).await.status(), 503);
    let detailed = app.get("/health/detailed", None).await;
    assert_eq!(detailed.status(), 200);
    let detailed: serde_json::Value = detailed.json().await.unwrap();
    assert_eq!(detailed["redis"]["status"], "down");
    assert_eq!(detailed["status"], "degraded");

    // The circuit is open: further requests neither touch Redis nor wait for it.
    let before = app.metrics().await;
    for _ in 0..20 {
        assert_eq!(first_chat(&app).await["participants_source"], "database");
    }
    let after = app.metrics().await;
    assert_eq!(metric(&after, "participants_cache_available"), 0.0);
    assert_eq!(
        metric(&after, "participants_cache_errors_total"),
        metric(&before, "participants_cache_errors_total")
    );
    assert!(
        metric(&after, "participants_fallback_usage_total")
            >= metric(&before, "participants_fallback_usage_total") + 20.0
    );

    app.redis.restart();
    cache_count(&app, id, 78).await;
    let app = &app;
    eventually(Duration::from_secs(15), || async move {
        let chat = first_chat(app).await;
        chat["participants_source"] == "cache" && chat["participants_count"] == 78
    })
    .await;
    assert_eq!(app.get("/health/redis", None).await.status(), 200);
}

#[tokio::test]
async fn redis_down_at_start_up_does_not_stop_the_api() {
    let pg = testkit::PgServer::start();
    let dead_port = testkit::free_port();
    let args = crate::helpers::serve_args(&pg, &format!("redis://127.0.0.1:{dead_port}"));
    api::migrate(&args.database).await.unwrap();
    let (address, tx, server) = crate::helpers::spawn_bare_api(args).await;
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("insert into chats (name, url, source) values ('x', 'u', 'admin_panel')")
        .execute(&db)
        .await
        .unwrap();
    let token = crate::helpers::admin_token();
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let page = loop {
        let page: serde_json::Value = http
            .get(format!("http://{address}/chats/all"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if page["total"] == 1 {
            break page;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(page["data"][0]["participants_source"], "database");
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn reads_are_served_from_memory_while_postgres_is_down_and_catch_up_when_it_returns() {
    let mut app = TestApp::spawn().await;
    let id = app.insert_chat(NewChat::default()).await;

    for crash in [false, true] {
        let before = app.get_json("/chats/all").await;
        if crash {
            app.pg.kill();
        } else {
            app.pg.stop();
        }
        // Past a heartbeat, so the model's age shows the outage.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for path in ["/chats/all".to_owned(), format!("/chats/{id}")] {
            let response = app.get(&path, Some(&app.admin())).await;
            assert_eq!(response.status(), 200, "{path} crash={crash}");
            let age: u64 = response.headers()["x-read-model-age"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                age >= 1,
                "{path}: the model's age must show the outage, got {age}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            if path == "/chats/all" {
                assert_eq!(body["data"], before["data"]);
                assert_eq!(body["total"], 1);
            } else {
                assert_eq!(body["name"], before["data"][0]["name"]);
            }
        }
        assert_eq!(app.get("/health", None).await.status(), 200);
        assert_eq!(app.get("/health/ready", None).await.status(), 200);
        let detailed = app.get("/health/detailed", None).await;
        assert_eq!(detailed.status(), 503);
        let detailed: serde_json::Value = detailed.json().await.unwrap();
        assert_eq!(detailed["database"]["status"], "down");
        assert_eq!(detailed["read_model"]["status"], "loaded");
        assert!(detailed["read_model"]["age_seconds"].as_f64().unwrap() >= 1.0);

        app.pg.start_again();
        // Written before the api has listened again: only its catch-up on reconnect can find it.
        let renamed = format!("renamed after crash={crash}");
        app.pg.psql(
            "postgres",
            &format!("update chats set name = '{renamed}' where id = {id}"),
        );
        app.settle().await;
        let page = app.get_json("/chats/all").await;
        assert_eq!(page["data"][0]["name"], renamed.as_str());
        assert_eq!(app.get("/health/detailed", None).await.status(), 200);
        let age = app.get("/chats/all", Some(&app.admin())).await.headers()["x-read-model-age"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(age == "0" || age == "1", "age after recovery: {age}");
    }
}

#[tokio::test]
async fn an_api_started_while_postgres_is_down_answers_503_until_its_first_load() {
    let mut pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let mut args = crate::helpers::serve_args(&pg, &redis.url());
    // A read waits for the load up to the request timeout, then answers 503 `loading`.
    args.request_timeout = Duration::from_secs(2);
    args.participants_refresh_wait = Duration::from_millis(100);
    api::migrate(&args.database).await.unwrap();
    pg.psql(
        "postgres",
        "insert into chats (name, url, source) values ('x', 'u', 'admin_panel')",
    );
    pg.stop();
    let (address, tx, server) = crate::helpers::spawn_bare_api(args).await;
    let token = crate::helpers::admin_token();
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let request = http
            .get(format!("http://{address}{path}"))
            .bearer_auth(&token);
        async move { request.send().await.unwrap() }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for path in ["/chats/all", "/chats/1"] {
        let response = get(path).await;
        assert_eq!(response.status(), 503, "{path}");
        assert_eq!(response.headers()["retry-after"], "5");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "loading");
    }
    assert_eq!(get("/health/ready").await.status(), 503);
    assert_eq!(get("/health").await.status(), 200);

    pg.start_again();
    let started = std::time::Instant::now();
    while get("/health/ready").await.status() != 200 {
        assert!(started.elapsed() < Duration::from_secs(20), "never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page: serde_json::Value = get("/chats/all").await.json().await.unwrap();
    assert_eq!(page["total"], 1);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn disable_redis_serves_postgres_without_touching_redis() {
    let dead_port = testkit::free_port();
    let app = TestApp::spawn_with(|args| {
        args.redis.disable_redis = true;
        args.redis.redis_url = format!("redis://127.0.0.1:{dead_port}").into();
    })
    .await;
    let id = app
        .insert_chat(NewChat {
            participants_count: 12,
            ..NewChat::default()
        })
        .await;
    let chat = first_chat(&app).await;
    assert_eq!(
        (
            chat["participants_count"].as_i64(),
            chat["participants_source"].as_str()
        ),
        (Some(12), Some("database"))
    );
    assert_eq!(chat["participants_stale"], true);
    let redis = app.get("/health/redis", None).await;
    assert_eq!(redis.status(), 503);
    assert_eq!(
        redis.json::<serde_json::Value>().await.unwrap()["status"],
        "disabled"
    );
    assert_eq!(app.get("/health/detailed", None).await.status(), 200);
    let refresh = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(refresh.status(), 503);
    let metrics = app.metrics().await;
    // The kill switch is not an outage: ParticipantsCacheDown stays quiet on this gauge.
    assert!(
        metrics
            .lines()
            .any(|line| line == "participants_cache_enabled 0"),
        "the kill switch is not exported: {metrics}"
    );
    assert_eq!(metric(&metrics, "participants_cache_available"), 0.0);
    assert_eq!(metric(&metrics, "participants_cache_errors_total"), 0.0);
    assert_eq!(
        metric(&metrics, "participants_cache_hits_total")
            + metric(&metrics, "participants_cache_misses_total"),
        0.0
    );
}

#[tokio::test]
async fn integration_disabled_serves_postgres_values_and_enqueues_nothing() {
    let app = TestApp::spawn_with(|args| args.participants_integration_disabled = true).await;
    let id = app
        .insert_chat(NewChat {
            participants_count: 12,
            ..NewChat::default()
        })
        .await;
    cache_count(&app, id, 99).await;
    for _ in 0..3 {
        let chat = first_chat(&app).await;
        assert_eq!(
            (
                chat["participants_count"].as_i64(),
                chat["participants_source"].as_str()
            ),
            (Some(12), Some("database"))
        );
        assert_eq!(chat["participants_stale"], true);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.stream_len(shared::keys::REFRESH_STREAM_LAZY).await, 0);
    let refresh = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(refresh.status(), 503);
    assert_eq!(app.stream_len(shared::keys::REFRESH_STREAM_MANUAL).await, 0);
}

/// One slow Redis command opens the read circuit; it must not turn manual refreshes into 503s
/// while Redis answers again (schemathesis once saw "redis is unavailable" with Redis up).
#[tokio::test]
async fn one_slow_redis_command_does_not_refuse_manual_refreshes_once_redis_answers() {
    let app = TestApp::spawn_with(|args| {
        args.redis.redis_timeout = Duration::from_millis(200);
        args.participants_refresh_wait = Duration::from_millis(100);
        // The page must reach Redis to meet the stall: without client tracking it always does
        // (with it, a held page sends no command at all).
        args.redis_client_tracking = false;
    })
    .await;
    let id = app
        .insert_chat(NewChat {
            participants_count: 10,
            ..NewChat::default()
        })
        .await;
    // Redis stalls for a second: the list is served from Postgres and the circuit opens.
    let port = app.redis.port();
    let stall = std::thread::spawn(move || {
        testkit::redis_cli(
            port,
            &[
                "EVAL",
                "local t = redis.call('TIME') \
                while true do \
                  local n = redis.call('TIME') \
                  if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) > 1000000 then return 1 end \
                end",
                "0",
            ],
        )
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(first_chat(&app).await["participants_source"], "database");
    assert_eq!(
        metric(&app.metrics().await, "participants_cache_available"),
        0.0
    );
    stall.join().unwrap();

    // Redis answers again at once; the probe has not looked yet, and need not have.
    let response = app
        .post(
            &format!("/chats/{id}/refresh-participants"),
            Some(&app.admin()),
        )
        .await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    // And the read path returns to the cache by itself, woken by the trip.
    let app = &app;
    eventually(Duration::from_secs(10), || async move {
        metric(&app.metrics().await, "participants_cache_available") == 1.0
    })
    .await;
}

/// Work nobody waits for any more stops: Postgres cancels a statement that outlives
/// DATABASE_STATEMENT_TIMEOUT, set on every connection of the services' pools.
#[tokio::test]
async fn postgres_cancels_a_statement_that_outlives_the_statement_timeout() {
    let pg = testkit::PgServer::start();
    let args = shared::config::DatabaseArgs {
        database_url: pg.url().into(),
        database_max_connections: 2,
        database_acquire_timeout: Duration::from_secs(5),
        database_statement_timeout: Duration::from_millis(300),
    };
    let pool = shared::db::pool(&args).unwrap();
    let shown: String = sqlx::query_scalar("show statement_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(shown, "300ms");
    let error = sqlx::query("select pg_sleep(5)")
        .execute(&pool)
        .await
        .unwrap_err();
    let code = error
        .as_database_error()
        .and_then(|e| e.code().map(|c| c.into_owned()));
    assert_eq!(code.as_deref(), Some("57014"), "{error}");
}
