//! Postgres and Redis that accept only TLS, each with a certificate from a private CA: the
//! migrations, the api and syncd connect with `sslmode=verify-full` and `rediss://`, and a
//! client that cannot verify the server's certificate is refused.

use std::time::Duration;

use maxsim::SimConfig;
use sqlx::postgres::PgPoolOptions;

use crate::end_to_end::{start_api, token};
use crate::helpers::{eventually, World};

/// The api's first page of chats, as a super_admin.
async fn list_chats(api: std::net::SocketAddr) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{api}/chats/all?limit=100"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

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
    let page = list_chats(api).await;
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
            list_chats(api).await["data"]
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

/// The one reqwest in the tree (the MAX client's and the OTLP exporter's) speaks TLS with the
/// process's rustls provider and trusts a private CA through `SSL_CERT_FILE`.
#[tokio::test]
async fn the_http_client_of_the_max_api_and_the_exporter_verifies_https_against_the_roots() {
    shared::tls::init();
    let dir = tempfile_dir();
    let ca = testkit::TestCa::new(&dir);
    let port = testkit::free_port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(&ca.cert)
        .arg("-key")
        .arg(&ca.key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server runs");
    let url = format!("https://localhost:{port}/");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not trusted yet: the platform's roots do not hold the test's CA.
    std::env::set_var("SSL_CERT_FILE", "/nonexistent-bundle.pem");
    let untrusted = reqwest::Client::builder()
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await;
    std::env::set_var("SSL_CERT_FILE", &ca.ca);
    let mut trusted = None;
    for _ in 0..50 {
        match reqwest::Client::builder()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
        {
            Ok(response) => {
                trusted = Some(response.status());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(trusted, Some(reqwest::StatusCode::OK));
    let refusal = format!(
        "{:?}",
        untrusted.expect_err("a certificate from an unknown CA was accepted")
    );
    assert!(refusal.to_lowercase().contains("certificate"), "{refusal}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
