//! The whole loop: api, Redis stream, syncd, the MAX simulator, and back.

use std::time::Duration;

use clap::Parser;
use maxsim::SimConfig;

use crate::helpers::{eventually, World};

const JWT_SECRET: &str = "end-to-end-secret-0123456789abcdef";

/// Starts the api against the world's Postgres and Redis, and waits until it uses Redis.
pub async fn start_api(
    world: &World,
    extra: &[&str],
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let database_url = world.database_url.clone();
    let mut argv = vec![
        "api",
        "serve",
        "--jwt-secret",
        JWT_SECRET,
        "--database-url",
        &database_url,
        "--redis-url",
        &world.redis_url,
        "--log-format",
        "text",
        "--log-level",
        "warn",
    ];
    argv.extend_from_slice(extra);
    let cli = api::config::Cli::try_parse_from(argv).unwrap();
    let api::config::Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::run(*args, listener, async move {
        let _ = rx.await;
    }));
    // Wait for the api's read model to load the chats, and its circuit to let requests use Redis.
    eventually(Duration::from_secs(30), "api is ready", || async {
        reqwest::get(format!("http://{address}/health/ready"))
            .await
            .is_ok_and(|response| response.status() == 200)
    })
    .await;
    eventually(Duration::from_secs(15), "api uses redis", || async {
        let Ok(response) = reqwest::get(format!("http://{address}/metrics")).await else {
            return false;
        };
        response.text().await.is_ok_and(|page| {
            page.lines()
                .any(|line| line == "participants_cache_available 1")
        })
    })
    .await;
    (address, tx)
}

pub fn token() -> String {
    api::auth::sign(
        &secrecy::SecretString::from(JWT_SECRET.to_owned()),
        &api::auth::Claims {
            sub: "1".into(),
            role: "super_admin".into(),
            exp: chrono::Utc::now().timestamp() + 600,
            university_id: None,
            branch_id: None,
            faculty_id: None,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_hundred_reads_of_one_stale_chat_make_exactly_one_max_call() {
    let world = World::new(SimConfig {
        latency_ms: 100,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(1).await;
    let (api, _stop_api) = start_api(&world, &[]).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let http = reqwest::Client::new();
    let url = format!("http://{api}/chats/{}", ids[0]);
    let token = token();
    let reads = (0..100).map(|_| http.get(&url).bearer_auth(&token).send());
    for response in futures::future::join_all(reads).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    let expected = world.sim.count_of(World::max_id(1));
    eventually(
        Duration::from_secs(20),
        "the read shows the fresh count",
        || async {
            let chat: serde_json::Value = http
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            chat["participants_source"] == "cache"
                && chat["participants_count"] == expected
                && chat["participants_stale"] == false
        },
    )
    .await;
    // More reads of the now-fresh chat call nothing.
    for _ in 0..20 {
        http.get(&url).bearer_auth(&token).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.max_calls(1), 1);
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn refresh_and_wait_returns_the_count_max_gave() {
    let world = World::new(SimConfig {
        latency_ms: 50,
        ..SimConfig::default()
    })
    .await;
    let ids = world.insert_chats(1).await;
    let (api, _stop_api) = start_api(&world, &[]).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let http = reqwest::Client::new();
    let url = format!("http://{api}/chats/{}/refresh-participants", ids[0]);
    let token = token();
    let expected = world.sim.count_of(World::max_id(1));
    // The first call may race the api's subscription; the count must arrive within a few tries.
    let mut body = serde_json::Value::Null;
    for _ in 0..5 {
        let response = http.post(&url).bearer_auth(&token).send().await.unwrap();
        let status = response.status();
        body = response.json().await.unwrap();
        if status == 200 {
            break;
        }
    }
    assert_eq!(body["status"], "updated", "{body}");
    assert_eq!(body["participants_count"], expected);
    assert_eq!(body["source"], "api");
    // A second manual refresh asks MAX again.
    let response = http.post(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let calls = world.max_calls(1);
    assert!(calls >= 2, "{calls}");
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn refresh_and_wait_says_when_max_found_the_chat_unavailable() {
    let world = World::new(SimConfig::default()).await;
    let ids = world.insert_chats(3).await;
    // A chat that gives a count: the deployment has counts, and a control call can be made.
    syncd::refresh_once(world.refresh_args(&ids[2..]))
        .await
        .unwrap();
    world.sim.override_chat(
        World::max_id(1),
        maxsim::ChatOverride {
            http_status: Some(404),
            ..maxsim::ChatOverride::default()
        },
    );
    world.sim.override_chat(
        World::max_id(2),
        maxsim::ChatOverride {
            status: Some("removed".into()),
            ..maxsim::ChatOverride::default()
        },
    );
    let (api, _stop_api) = start_api(&world, &[]).await;
    let replica = world
        .replica(&["--participants-enable-background-sync", "false"])
        .await;
    let http = reqwest::Client::new();
    let token = token();
    for (id, reason) in [(ids[0], "not_found"), (ids[1], "removed")] {
        let url = format!("http://{api}/chats/{id}/refresh-participants");
        // The first call may race the api's subscription.
        let mut answer = (reqwest::StatusCode::ACCEPTED, serde_json::Value::Null);
        for _ in 0..5 {
            let response = http.post(&url).bearer_auth(&token).send().await.unwrap();
            answer = (response.status(), response.json().await.unwrap());
            if answer.0 == 200 {
                break;
            }
        }
        let (status, body) = answer;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "unavailable", "{body}");
        assert_eq!(body["reason"], reason, "{body}");
        assert_eq!(body["chat_id"], id, "{body}");
        assert!(body["checked_at"].is_string(), "{body}");
    }
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn an_operator_can_start_a_full_sweep_and_read_the_status() {
    let world = World::new(SimConfig {
        rate_limit: 0,
        ..SimConfig::default()
    })
    .await;
    world.insert_chats(40).await;
    let (api, _stop_api) = start_api(&world, &[]).await;
    let replica = world.replica(&["--max-api-rps", "200"]).await;
    let response = reqwest::Client::new()
        .post(format!("http://{api}/admin/participants/full-update"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually(
        Duration::from_secs(30),
        "the requested full sweep finished",
        || async {
            let finished: i64 = sqlx::query_scalar(
                "select count(*) from sync_sweeps where kind = 'full' and finished_at is not null",
            )
            .fetch_one(&world.db)
            .await
            .unwrap();
            finished == 1
        },
    )
    .await;
    assert_eq!(world.refreshed().await, 40);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_syncd"))
        .arg("status")
        .args([
            "--database-url",
            &world.pg.url(),
            "--redis-url",
            &world.redis_url,
            "--log-level",
            "warn",
            "--participants-schedule-tz",
            "Europe/Berlin",
        ])
        .env_remove("PARTICIPANTS_FULL_SWEEP_CRON")
        .env_remove("PARTICIPANTS_STALE_SWEEP_CRON")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "{participants:refresh}:lazy",
        "dead letters",
        "REPLICA",
        "MAX token: valid",
        "full",
        "40/40",
        "100.0%",
        "admin",
        "SCHEDULE",
        "`0 3 * * *`",
        "Europe/Berlin",
        " CET (",
        " UTC)",
        "fresh (< 1/4 threshold)",
    ] {
        assert!(
            text.contains(expected),
            "`{expected}` missing from:\n{text}"
        );
    }
    replica.stop().await.unwrap();
}
