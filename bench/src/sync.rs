//! `bench sync`: the sync path against the simulator, with the real `syncd` and `api` binaries.
//! - a full sweep of N chats with 1 and with 3 replicas sharing one limiter: the duration
//!   against the ideal N / rate, MAX calls per chat and 429s;
//! - lazy refresh latency: from a read that finds a chat stale to the fresh count being
//!   visible through the api;
//! - `POST /chats/{id}/refresh-participants` (refresh-and-wait) with MAX answering in 100 ms.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use maxsim::SimConfig;
use serde_json::Value;

use crate::stack::{ms, percentile, Stack};

pub struct Options {
    pub chats: i32,
    pub rps: f64,
    pub latency: Duration,
    /// Uniform jitter on top of the simulator's latency (network and MAX's own variance).
    pub jitter: Duration,
    pub replicas: Vec<u32>,
    pub samples: u32,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &replicas in &options.replicas {
        eprintln!(
            "bench sync: full sweep of {} chats at {} rps with {replicas} replica(s)",
            options.chats, options.rps
        );
        rows.push((replicas, sweep(&options, replicas).await?));
    }
    eprintln!("bench sync: lazy refresh and refresh-and-wait latency");
    let latency = latencies(&options).await?;

    let planned = syncd::refresh::limiter::slot_interval(options.rps);
    println!(
        "\nFull sweep: {} chats, MAX_API_RPS={}, simulator latency {} ms + up to {} ms jitter and its own \
         limit at {} rps (a 429 is a call past the limit in some one-second window at its door); \
         replicas are `syncd run` processes sharing the Redis limiter, which plans a slot every {:.2} ms \
         ({:.1} calls/s: room for {} ms of jitter)\n",
        options.chats,
        options.rps,
        options.latency.as_millis(),
        options.jitter.as_millis(),
        options.rps.floor(),
        planned.as_secs_f64() * 1000.0,
        1.0 / planned.as_secs_f64(),
        syncd::refresh::limiter::JITTER_BUDGET.as_millis(),
    );
    println!("| replicas | ideal N/rate | planned pace | measured | vs planned | target | MAX calls/chat | 429s | max calls in 1 s | result |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (replicas, row) in &rows {
        let pace = planned * options.chats as u32;
        let ratio = row.measured.as_secs_f64() / pace.as_secs_f64();
        let met =
            ratio <= 1.05 && (row.calls_per_chat - 1.0).abs() < 0.005 && row.rate_limited == 0;
        println!(
            "| {replicas} | {:.2} s | {:.2} s | {:.2} s | {ratio:.3}x | ≤1.05x planned, 1.00 calls/chat, 0 429s | {:.3} | {} | {} | {} |",
            row.ideal.as_secs_f64(),
            pace.as_secs_f64(),
            row.measured.as_secs_f64(),
            row.calls_per_chat,
            row.rate_limited,
            row.max_in_window,
            if met { "met" } else { "missed" },
        );
    }
    println!(
        "\nLatency: MAX_API_RPS=30 (the production default), one syncd, one api, {} samples each, one at a time\n",
        options.samples
    );
    println!("| what | MAX latency | p50 | p99 | max | answered | target | result |");
    println!("|---|---|---|---|---|---|---|---|");
    let lazy_p99 = percentile(&latency.lazy, 99.0);
    println!(
        "| lazy refresh: stale read to fresh count visible | {} ms | {} | {} | {} | {}/{} | p99 ≤1 s | {} |",
        options.latency.as_millis(),
        ms(percentile(&latency.lazy, 50.0)),
        ms(lazy_p99),
        ms(latency.lazy.last().copied().unwrap_or_default()),
        latency.lazy.len(),
        options.samples,
        if lazy_p99 <= Duration::from_secs(1) && latency.lazy.len() == options.samples as usize { "met" } else { "missed" },
    );
    let wait_p99 = percentile(&latency.wait, 99.0);
    println!(
        "| POST /chats/{{id}}/refresh-participants | 100 ms | {} | {} | {} | {}/{} with 200 | p99 ≤300 ms | {} |",
        ms(percentile(&latency.wait, 50.0)),
        ms(wait_p99),
        ms(latency.wait.last().copied().unwrap_or_default()),
        latency.updated,
        options.samples,
        if wait_p99 <= Duration::from_millis(300) && latency.updated == options.samples { "met" } else { "missed" },
    );
    Ok(())
}

struct SweepRow {
    ideal: Duration,
    measured: Duration,
    calls_per_chat: f64,
    rate_limited: u64,
    max_in_window: usize,
}

async fn sweep(options: &Options, replicas: u32) -> anyhow::Result<SweepRow> {
    let mut stack = Stack::start(
        options.chats,
        SimConfig {
            rate_limit: options.rps.floor() as u32,
            latency_ms: options.latency.as_millis() as u64,
            latency_jitter_ms: options.jitter.as_millis() as u64,
            ..SimConfig::default()
        },
        &[],
    )
    .await?;
    let rps = options.rps.to_string();
    let env = [
        ("MAX_API_RPS", rps.as_str()),
        ("PARTICIPANTS_ENABLE_BACKGROUND_SYNC", "false"),
    ];
    let mut fleet = Vec::new();
    for _ in 0..replicas {
        fleet.push(stack.syncd(&env).await?);
    }
    // Each replica's start-up token probe is not part of the sweep.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.sim.reset_stats();
    stack.request_full_sweep().await?;
    let ideal = Duration::from_secs_f64(f64::from(options.chats) / options.rps);
    let deadline = Instant::now() + ideal * 3 + Duration::from_secs(60);
    let (started, finished) = loop {
        if let Some((started, Some(finished), _)) = stack.full_sweep().await? {
            break (started, finished);
        }
        if Instant::now() > deadline {
            bail!(
                "the full sweep did not finish in {:?}; see {}",
                ideal * 3,
                fleet[0].log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stats = stack.sim.stats();
    let calls: u64 = stats.calls_per_chat.values().sum();
    let refreshed: i64 = sqlx::query_scalar(
        "select count(*) from chat_participants where participants_updated_at is not null",
    )
    .fetch_one(&stack.db)
    .await?;
    if refreshed != i64::from(options.chats) {
        bail!("the sweep refreshed {refreshed} of {} chats", options.chats);
    }
    Ok(SweepRow {
        ideal,
        measured: (finished - started).to_std().unwrap_or_default(),
        calls_per_chat: calls as f64 / refreshed as f64,
        rate_limited: stats.rate_limited,
        max_in_window: stats.max_in_window,
    })
}

struct Latencies {
    lazy: Vec<Duration>,
    wait: Vec<Duration>,
    updated: u32,
}

fn updated_at(body: &Value) -> Option<DateTime<Utc>> {
    body.get("participants_updated_at")?.as_str()?.parse().ok()
}

async fn latencies(options: &Options) -> anyhow::Result<Latencies> {
    let mut stack = Stack::start(
        2 * options.samples as i32,
        SimConfig {
            rate_limit: 30,
            latency_ms: options.latency.as_millis() as u64,
            ..SimConfig::default()
        },
        &[],
    )
    .await?;
    let _syncd = stack
        .syncd(&[("PARTICIPANTS_ENABLE_BACKGROUND_SYNC", "false")])
        .await?;
    let api = stack.api(&[]).await?;
    let ids: Vec<i32> = sqlx::query_scalar("select id from chats order by id")
        .fetch_all(&stack.db)
        .await?;
    let (lazy_ids, wait_ids) = ids.split_at(options.samples as usize);

    let mut lazy = Vec::new();
    for id in lazy_ids {
        let url = format!("{}/chats/{id}", api.base());
        let asked = Utc::now();
        let started = Instant::now();
        let first: Value = stack
            .http
            .get(&url)
            .bearer_auth(&stack.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if first["participants_stale"] != Value::Bool(true) {
            bail!("chat {id} was not stale before its first read: {first}");
        }
        while started.elapsed() < Duration::from_secs(10) {
            let body: Value = stack
                .http
                .get(&url)
                .bearer_auth(&stack.token)
                .send()
                .await?
                .json()
                .await?;
            if updated_at(&body).is_some_and(|at| at >= asked) {
                lazy.push(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lazy.sort();

    stack.sim.update(|config| config.latency_ms = 100);
    let mut wait = Vec::new();
    let mut updated = 0;
    for id in wait_ids {
        let started = Instant::now();
        let response = stack
            .http
            .post(format!("{}/chats/{id}/refresh-participants", api.base()))
            .bearer_auth(&stack.token)
            .send()
            .await
            .context("refresh-and-wait")?;
        let status = response.status();
        let _ = response.bytes().await?;
        wait.push(started.elapsed());
        if status == 200 {
            updated += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait.sort();
    Ok(Latencies {
        lazy,
        wait,
        updated,
    })
}
