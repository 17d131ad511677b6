//! The read model's sync in a deployment's real life: every row Postgres can hold loads, reads
//! during the first load wait for it, the load has its own statement timeout, a stuck sync
//! takes the replica out of readiness, a silent partition is noticed and healed, one bulk
//! statement costs at most one full load, and a standby or a connection that loses
//! notifications stops the api with a message naming DATABASE_URL.

use std::time::Duration;

use serde_json::Value as Json;

use crate::helpers::{
    admin_token, eventually, metric, serve_args, spawn_bare_api, urlencode, TestApp,
};
use crate::proxy::Proxy;

/// A text of a few MB: Postgres holds up to 1 GB in a text.
const LONG_TEXT_BYTES: usize = 3 * 1024 * 1024;

/// Rows a legacy database may really hold: every `created_at` Postgres accepts, extreme
/// counts, a text of megabytes, and Unicode that is storable (combining marks, right-to-left,
/// emoji, noncharacters). NUL and lone surrogates are not storable in Postgres text at all.
async fn insert_odd_rows(app: &TestApp) {
    for not_storable in ["select chr(0)", "select E'\\uD800'"] {
        assert!(
            sqlx::query(not_storable).execute(&app.db).await.is_err(),
            "{not_storable} is refused by postgres"
        );
    }
    // Every text column has a btree index, whose entries hold about 2.7 KB: only an unindexed
    // column holds megabytes, as `url` did on the legacy database before the list indexes.
    sqlx::query("drop index chats_url_id_idx")
        .execute(&app.db)
        .await
        .unwrap();
    let long_url = "я".repeat(LONG_TEXT_BYTES / 2);
    sqlx::query(
        "insert into chats (name, url, source, participants_count, university_id, created_at) values \
         ('infinity', 'u', 'admin_panel', 2147483647, 2147483647, 'infinity'), \
         ('minus infinity', 'u', 'admin_panel', -2147483648, -2147483648, '-infinity'), \
         ('the last year postgres holds', 'u', 'admin_panel', 0, null, '294276-12-31 23:59:59.999999+00'), \
         ('past 9999', 'u', 'admin_panel', 1, null, '10000-01-01 00:00:00+00'), \
         ('before christ', 'u', 'admin_panel', 1, null, '4713-01-01 00:00:00+00 BC'), \
         ('e\u{301}te\u{301} עברית ‏العربية 👩‍👩‍👧 \u{FFFF}', 'u', 'bot_registrar', 3, null, '2026-01-01 00:00:00+00'), \
         ('long url', $1, 'academic_group', 4, null, null)",
    )
    .bind(&long_url)
    .execute(&app.db)
    .await
    .expect("postgres holds every one of these rows");
}

/// What the api serves for the odd rows matches Postgres: order, text, numbers; timestamps as
/// RFC 3339 a client can parse.
async fn assert_odd_rows_served(app: &TestApp) {
    let page = app
        .get_json("/chats/all?sort_by=created_at&sort_order=asc&limit=100")
        .await;
    let served: Vec<i64> = crate::helpers::ids(&page);
    let expected: Vec<i64> =
        sqlx::query_scalar("select id::bigint from chats order by created_at, id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(served, expected, "created_at order is postgres' own");
    let by_name = |name: &str| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|chat| chat["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is served"))
    };
    let infinity = by_name("infinity");
    assert_eq!(infinity["created_at"], "9999-12-31T23:59:59.999999Z");
    assert_eq!(infinity["participants_count"], 2147483647);
    assert_eq!(infinity["university_id"], 2147483647);
    let minus = by_name("minus infinity");
    assert_eq!(minus["created_at"], "0000-01-01T00:00:00Z");
    assert_eq!(minus["participants_count"], -2147483648);
    assert_eq!(
        by_name("past 9999")["created_at"],
        "9999-12-31T23:59:59.999999Z"
    );
    assert_eq!(
        by_name("before christ")["created_at"],
        "0000-01-01T00:00:00Z"
    );
    for chat in page["data"].as_array().unwrap() {
        if let Some(at) = chat["created_at"].as_str() {
            chrono::DateTime::parse_from_rfc3339(at)
                .unwrap_or_else(|e| panic!("{at} is RFC 3339: {e}"));
        }
    }
    let long = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|chat| chat["source"] == "academic_group")
        .unwrap();
    assert_eq!(long["url"].as_str().unwrap().len(), LONG_TEXT_BYTES);
    let found = app
        .get_json(&format!("/chats/all?search={}", urlencode("עברית")))
        .await;
    assert_eq!(found["total"], 1);
    assert_eq!(
        found["data"][0]["name"],
        "e\u{301}te\u{301} עברית ‏العربية 👩‍👩‍👧 \u{FFFF}"
    );
}

#[tokio::test]
async fn every_row_postgres_can_hold_is_loaded_notified_or_at_start_up() {
    let mut app = TestApp::spawn().await;
    // Written while the api runs: the notified reload decodes them.
    insert_odd_rows(&app).await;
    eventually(Duration::from_secs(20), || async {
        app.get_json("/chats/all").await["total"] == 7
    })
    .await;
    assert_odd_rows_served(&app).await;
    // And a fresh api loads them whole.
    app.restart_api().await;
    assert_odd_rows_served(&app).await;
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "participants_read_model_sync_restarts_total"),
        0.0
    );
}

/// Starts Postgres and Redis, migrates, inserts one chat, and returns them with the api's
/// arguments, for tests that start the api themselves.
async fn servers() -> (
    testkit::PgServer,
    testkit::RedisServer,
    api::config::ServeArgs,
) {
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let args = serve_args(&pg, &redis.url());
    api::migrate(&args.database).await.unwrap();
    pg.psql(
        "postgres",
        "insert into chats (name, url, source) values ('x', 'u', 'admin_panel')",
    );
    (pg, redis, args)
}

/// A connection holding `lock table chats in access exclusive mode` until it is committed:
/// the api's first load waits for it.
async fn lock_chats(pg: &testkit::PgServer) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut lock = db.begin().await.unwrap();
    sqlx::query("lock table chats in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

#[tokio::test]
async fn a_read_during_the_first_load_waits_for_it_instead_of_being_refused() {
    let (pg, _redis, args) = servers().await;
    let lock = lock_chats(&pg).await;
    let (address, tx, server) = spawn_bare_api(args).await;
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(10), || async {
        http.get(format!("http://{address}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // The api answers /health while its load waits for the lock: a read now must wait too.
    let read = tokio::spawn({
        let request = http
            .get(format!("http://{address}/chats/all"))
            .bearer_auth(admin_token());
        async move { request.send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!read.is_finished(), "the read is answered before the load");
    lock.commit().await.unwrap();
    let response = read.await.unwrap();
    assert_eq!(response.status(), 200);
    let page: Json = response.json().await.unwrap();
    assert_eq!(page["total"], 1);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_first_load_runs_under_its_own_statement_timeout_not_the_requests() {
    let (pg, _redis, mut args) = servers().await;
    // Requests' statements get 1 s (API_REQUEST_TIMEOUT caps DATABASE_STATEMENT_TIMEOUT).
    args.request_timeout = Duration::from_secs(1);
    args.participants_refresh_wait = Duration::from_millis(100);
    let lock = lock_chats(&pg).await;
    let (address, tx, server) = spawn_bare_api(args).await;
    // The load waits for the lock longer than a request's statement may run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    lock.commit().await.unwrap();
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), || async {
        http.get(format!("http://{address}/health/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let metrics = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&metrics, "participants_read_model_sync_failures_total"),
        0.0,
        "the load was not cancelled"
    );
    assert_eq!(
        metric(&metrics, "participants_read_model_full_loads_total"),
        1.0
    );
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_replica_whose_sync_is_stuck_while_the_primary_answers_is_not_ready() {
    let app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(1);
        args.read_model_max_age = Duration::from_secs(3);
    })
    .await;
    app.insert_chat(Default::default()).await;
    // The sync's reconciliation fails from now on; Postgres itself answers.
    sqlx::query("alter table chats rename to chats_away")
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        app.get("/health/ready", None).await.status() == 503
    })
    .await;
    let metrics = app.metrics().await;
    assert!(metric(&metrics, "participants_read_model_age_seconds") >= 3.0);
    // Reads still answer, from memory, with their age.
    let response = app.get("/chats/all", Some(&app.admin())).await;
    assert_eq!(response.status(), 200);
    sqlx::query("alter table chats_away rename to chats")
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        app.get("/health/ready", None).await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn a_silent_partition_is_noticed_and_healed_by_reconnect_and_reconcile() {
    let mut proxy = None;
    let app = TestApp::spawn_with(|args| {
        // Only the reconnect's catch-up can bring the change made during the partition.
        args.read_model_reconcile_interval = Duration::from_secs(3600);
        let port: u16 = url_port(&args.database.database_url);
        let started = Proxy::start(([127, 0, 0, 1], port).into(), false);
        args.database.database_url = started.url("postgres").into();
        proxy = Some(started);
    })
    .await;
    let proxy = proxy.unwrap();
    let id = app.insert_chat(Default::default()).await;
    proxy.freeze();
    sqlx::query("update chats set name = 'renamed during the partition' where id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    // Noticed within 30 s, with no reset from the network.
    eventually(Duration::from_secs(30), || async {
        metric(
            &app.metrics().await,
            "participants_read_model_sync_failures_total",
        ) >= 1.0
    })
    .await;
    let response = app.get(&format!("/chats/{id}"), Some(&app.admin())).await;
    assert_eq!(response.status(), 200);
    let age: u64 = response.headers()["x-read-model-age"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(age >= 1, "the model's age shows the partition: {age}");
    proxy.thaw();
    eventually(Duration::from_secs(30), || async {
        app.get_json(&format!("/chats/{id}")).await["name"] == "renamed during the partition"
    })
    .await;
}

fn url_port(url: &secrecy::SecretString) -> u16 {
    use secrecy::ExposeSecret;
    let url = url.expose_secret();
    let after_host = url.rsplit_once(':').unwrap().1;
    after_host.split('/').next().unwrap().parse().unwrap()
}

/// Waits until every notification committed so far has been applied: a marker rename, notified
/// after them, is served.
async fn applied_so_far(app: &TestApp, marker_id: i32, round: u32) {
    let name = format!("marker {round}");
    sqlx::query("update chats set name = $1 where id = $2")
        .bind(&name)
        .bind(marker_id)
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(150), || async {
        app.get_json(&format!("/chats/{marker_id}")).await["name"] == name.as_str()
    })
    .await;
}

#[tokio::test]
async fn one_bulk_statement_of_110000_rows_costs_one_full_load() {
    const ROWS: i64 = 110_000;
    let mut app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    let marker = app.insert_chat(Default::default()).await;
    // The rows arrive unnotified (and without the per-university totals trigger, which makes
    // a bulk insert quadratic); a restarted api loads them.
    let mut insert = app.db.begin().await.unwrap();
    for sql in [
        "alter table chats disable trigger chat_totals_on_insert_or_delete",
        "alter table chats disable trigger participants_notify_on_chats",
        "insert into chats (name, url, source) \
         select 'bulk ' || g, 'u', 'admin_panel' from generate_series(1, 110000) g",
        "alter table chats enable trigger participants_notify_on_chats",
        "alter table chats enable trigger chat_totals_on_insert_or_delete",
    ] {
        sqlx::query(sql).execute(&mut *insert).await.unwrap();
    }
    insert.commit().await.unwrap();
    app.restart_api().await;
    let full_load_rows = |metrics: &str| {
        metric(
            metrics,
            "participants_read_model_rows_loaded_total{reason=\"full_load\"}",
        )
    };
    assert_eq!(full_load_rows(&app.metrics().await), (ROWS + 1) as f64);
    // One statement, 110,000 notifications: one full load, not two or three.
    sqlx::query("update chats set name = name || ' (архив)' where name like 'bulk %'")
        .execute(&app.db)
        .await
        .unwrap();
    applied_so_far(&app, marker, 1).await;
    let metrics = app.metrics().await;
    assert_eq!(
        full_load_rows(&metrics),
        2.0 * (ROWS + 1) as f64,
        "one full load for the statement"
    );
    let page = app.get_json("/chats/all?search=архив&limit=1").await;
    assert_eq!(page["total"], ROWS);
}

#[tokio::test]
async fn an_api_pointed_at_a_hot_standby_exits_naming_database_url() {
    let (pg, _redis, args) = servers().await;
    let standby = testkit::PgServer::start_standby(&pg);
    let mut args = args;
    args.database.database_url = standby.url().into();
    let (_address, _tx, server) = spawn_bare_api(args).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the api stops by itself")
        .unwrap();
    let error = format!("{:#}", ended.unwrap_err());
    assert!(
        error.contains("DATABASE_URL") && error.contains("standby"),
        "{error}"
    );
    assert!(error.contains("primary"), "{error}");
}

#[tokio::test]
async fn an_api_whose_connection_loses_notifications_exits_naming_database_url() {
    let (pg, _redis, mut args) = servers().await;
    // As a pooler in transaction mode does: LISTEN "works", notifications never arrive.
    let proxy = Proxy::start(([127, 0, 0, 1], pg.port()).into(), true);
    args.database.database_url = proxy.url("postgres").into();
    let (_address, _tx, server) = spawn_bare_api(args).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the api stops by itself")
        .unwrap();
    let error = format!("{:#}", ended.unwrap_err());
    assert!(
        error.contains("DATABASE_URL") && error.contains("notification"),
        "{error}"
    );
}
