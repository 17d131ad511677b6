//! Postgres and Redis that accept only TLS, each with a certificate from a private CA: the
//! migrations, the api and syncd connect with `sslmode=verify-full` and `rediss://`, and a
//! client that cannot verify the server's certificate is refused.

use std::time::Duration;

use maxsim::SimConfig;
use sqlx::postgres::PgPoolOptions;

use crate::end_to_end::{start_api, token};
use crate::helpers::{eventually, World};

#[tokio::test]
async fn migrate_serve_and_run_against_postgres_and_redis_that_require_tls() {
    // Before the world trusts Redis's CA: a client that does not know the CA is refused.
    let pg = testkit::PgServer::start_tls();
    let unverified = format!("{}?sslmode=verify-full", pg.url());
    let refused = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .connect(&unverified)
        .await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA must not be accepted"
    );
    let plain = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{}?sslmode=disable", pg.url()))
        .await;
    assert!(plain.is_err(), "the server refuses connections in clear");
    drop(pg);

    let world = World::over_tls(SimConfig::default()).await;
    assert!(world.database_url.contains("sslmode=verify-full"));
    assert!(world.redis_url.starts_with("rediss://"));
    // `api migrate` over TLS (the world applied them once already: a second run is a no-op).
    api::migrate(&shared::config::DatabaseArgs {
        database_url: world.database_url.clone().into(),
        database_max_connections: 2,
        database_acquire_timeout: Duration::from_secs(5),
        database_statement_timeout: Duration::from_secs(30),
    })
    .await
    .expect("api migrate over TLS");
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&world.db)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");

    let ids = world.insert_chats(5).await;
    let replica = world.replica(&[]).await;
    let (api, stop_api) = start_api(&world, &[]).await;
    // A read enqueues the chats that have no count; syncd refreshes them over TLS to both.
    let page: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{api}/chats/all?limit=100"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"].as_array().map(Vec::len), Some(ids.len()));
    let world = &world;
    let expected = ids.len() as i64;
    eventually(
        Duration::from_secs(30),
        "every chat refreshed",
        || async move { world.refreshed().await == expected },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the api serves counts from Redis",
        || async move {
            let page: serde_json::Value = reqwest::Client::new()
                .get(format!("http://{api}/chats/all?limit=100"))
                .bearer_auth(token())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|chat| chat["participants_source"] == "cache")
        },
    )
    .await;
    let _ = stop_api.send(());
    replica.stop().await.unwrap();
}
