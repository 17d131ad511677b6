//! `syncd subscribe` (the real binary) against the simulator's `/subscriptions`, the webhook
//! end to end (sim → webhook → stream → consumer), and webhook mode's subscription check.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use maxsim::{AdminRights, SimConfig, Simulator};

use crate::helpers::{eventually, World, TOKEN};

const SECRET: &str = "webhook-secret_42";
const CHAT: i64 = -70_000_000_000_001;

/// Runs `syncd subscribe <extra>` against the simulator at `sim`.
async fn subscribe(sim: SocketAddr, extra: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_syncd"))
        .arg("subscribe")
        .args(["--max-api-url", &format!("http://{sim}")])
        .args(["--max-api-token", TOKEN, "--max-webhook-secret", SECRET])
        .args(["--log-level", "warn"])
        .args(extra)
        .output()
        .await
        .expect("syncd runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn series(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn subscribe_registers_the_webhook_the_sim_then_posts_to_it_and_the_check_watches_it() {
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
            "--max-subscription-check",
            "1s",
        ])
        .await;
    let metrics_url = format!("http://{}/metrics", replica.address);
    let page = || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    eventually(Duration::from_secs(10), "the check finds none", || async {
        page()
            .await
            .contains("participants_events_subscription_ok 0")
    })
    .await;

    let url = format!("http://127.0.0.1:{port}/max/updates");
    let output = subscribe(world.sim_address, &["--url", &url]).await;
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        !text(&output).contains(SECRET),
        "the secret is never printed"
    );
    let subscriptions = world.sim.subscriptions();
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(subscriptions[0].url, url);
    let types = subscriptions[0].update_types.clone().unwrap();
    assert_eq!(types, syncd::events::MEMBERSHIP_TYPES.to_vec());

    // End to end: a join in the simulator reaches the consumer through the webhook.
    world.sim.set_admin(
        CHAT,
        AdminRights {
            is_admin: true,
            read_all_messages: true,
        },
    );
    world.sim.add_member(CHAT, 7).unwrap();
    eventually(Duration::from_secs(15), "the join consumed", || async {
        let page = page().await;
        series(
            &page,
            r#"participants_events_received_total{mode="webhook"}"#,
        ) == 1.0
            && series(
                &page,
                r#"participants_events_applied_total{outcome="needs_baseline"}"#,
            ) == 1.0
    })
    .await;
    eventually(Duration::from_secs(10), "the check finds ours", || async {
        page()
            .await
            .contains("participants_events_subscription_ok 1")
    })
    .await;

    let check = subscribe(world.sim_address, &["--check", "--url", &url]).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(text(&check).contains(&url));
    assert!(text(&check).contains("user_added,user_removed,bot_added"));

    // MAX drops the subscription (8 hours of failures): the check notices.
    let deleted = reqwest::Client::new()
        .delete(format!(
            "http://{}/subscriptions?url={url}",
            world.sim_address
        ))
        .header("Authorization", TOKEN)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    eventually(
        Duration::from_secs(10),
        "the check finds it gone",
        || async {
            page()
                .await
                .contains("participants_events_subscription_ok 0")
        },
    )
    .await;
    let check = subscribe(world.sim_address, &["--check", "--url", &url]).await;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    replica.stop().await.unwrap();
}

#[tokio::test]
async fn subscribe_refuses_to_replace_another_url_without_replace() {
    let (sim, address) = Simulator::spawn(SimConfig::default()).await;
    let theirs = "http://127.0.0.1:1/max/updates";
    let ours = "http://127.0.0.1:2/max/updates";
    let output = subscribe(address, &["--url", theirs]).await;
    assert!(output.status.success(), "{}", text(&output));

    let refused = subscribe(address, &["--url", ours]).await;
    assert!(!refused.status.success());
    assert!(text(&refused).contains("--replace"), "{}", text(&refused));
    assert!(text(&refused).contains(theirs), "{}", text(&refused));
    let urls: Vec<String> = sim.subscriptions().into_iter().map(|s| s.url).collect();
    assert_eq!(urls, vec![theirs.to_owned()], "nothing changed");
    let check = subscribe(address, &["--check", "--url", ours]).await;
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));

    let replaced = subscribe(address, &["--url", ours, "--replace"]).await;
    assert!(replaced.status.success(), "{}", text(&replaced));
    let urls: Vec<String> = sim.subscriptions().into_iter().map(|s| s.url).collect();
    assert_eq!(urls, vec![ours.to_owned()]);
    let check = subscribe(address, &["--check", "--url", ours]).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    let check = subscribe(address, &["--check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
}

#[tokio::test]
async fn subscribe_help_explains_it_and_shows_no_secret() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncd"))
        .args(["subscribe", "--help"])
        .env("MAX_WEBHOOK_SECRET", SECRET)
        .env("MAX_API_TOKEN", "t0ken-s3cret")
        .output()
        .await
        .unwrap();
    let help = text(&output);
    assert!(output.status.success(), "{help}");
    for wanted in ["--replace", "--check", "/max/updates", "MAX_WEBHOOK_SECRET"] {
        assert!(help.contains(wanted), "{wanted}: {help}");
    }
    assert!(
        !help.contains(SECRET) && !help.contains("t0ken-s3cret"),
        "{help}"
    );
}
