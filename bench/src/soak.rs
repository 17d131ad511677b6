//! `bench soak`: the whole deployment (two `syncd` replicas with stable names, the `api`,
//! Postgres, Redis with its AOF on, the MAX simulator) under load for several minutes of wall
//! time with the freshness settings and the sweep schedules compressed `--scale` times (at the
//! default 60 a 60 s stale threshold stands for the default hour), while faults are injected one after another in a seeded random order: Redis
//! killed (restarted with its data, and emptied), Postgres restarted, a replica killed and
//! restarted under the same name, MAX 429 storms, 5xx, timeouts, and a phase of 404 for every
//! chat (a wrong `MAX_API_URL`). Then the faults stop and the soak measures convergence:
//! - every chat's count in the cache equals MAX's current count (the bound is printed);
//! - no stream entry is left pending;
//! - no manual refresh the api acknowledged (200 or 202) is lost;
//! - the most MAX calls in any one-second window, against `MAX_API_RPS`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use fred::prelude::*;
use maxsim::{ChatOverride, SimConfig};
use tokio_util::sync::CancellationToken;

use crate::drill::{self, block, xorshift, Counters};
use crate::stack::{Process, Stack};

const RPS: u32 = 100;
const LATENCY_MS: u64 = 20;
/// How long convergence may take once the faults stop before the soak says it failed.
const CONVERGE_BOUND: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    RedisKilled,
    RedisEmptied,
    PostgresRestarted,
    ReplicaRestarted,
    MaxRateLimited,
    MaxErrors,
    MaxTimeouts,
    MaxWrongUrl,
}

const FAULTS: [Fault; 8] = [
    Fault::RedisKilled,
    Fault::RedisEmptied,
    Fault::PostgresRestarted,
    Fault::ReplicaRestarted,
    Fault::MaxRateLimited,
    Fault::MaxErrors,
    Fault::MaxTimeouts,
    Fault::MaxWrongUrl,
];

impl Fault {
    fn title(self) -> &'static str {
        match self {
            Fault::RedisKilled => "Redis SIGKILLed, restarted with its data after 5 s",
            Fault::RedisEmptied => "Redis flushed, SIGKILLed, restarted empty after 3 s",
            Fault::PostgresRestarted => "Postgres stopped, started after 5 s",
            Fault::ReplicaRestarted => "a syncd replica SIGKILLed, restarted under its name",
            Fault::MaxRateLimited => "MAX 429 storm for 15 s (limit 2 rps)",
            Fault::MaxErrors => "MAX answering half the calls 5xx for 15 s",
            Fault::MaxTimeouts => "MAX hanging 30% of the calls for 15 s",
            Fault::MaxWrongUrl => "MAX answering 404 for every chat for 20 s (a wrong URL)",
        }
    }
}

pub struct Options {
    pub chats: i32,
    pub minutes: f64,
    /// Time compression of the freshness settings and the sweep schedules.
    pub scale: u64,
    pub seed: u64,
}

/// A 6-field cron expression for about every `seconds` (at least one second), rounded down to a
/// period cron can express evenly.
fn every(seconds: u64) -> String {
    const DIVISORS: [u64; 12] = [1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60];
    let fit = |n: u64| DIVISORS.iter().rev().find(|d| **d <= n.max(1)).copied();
    match seconds {
        0..60 => format!("*/{} * * * * *", fit(seconds).unwrap_or(1)),
        60..3600 => format!("0 */{} * * * *", fit(seconds / 60).unwrap_or(1)),
        _ => "0 0 * * * *".to_owned(),
    }
}

fn syncd_env(name: &str, scale: u64) -> Vec<(String, String)> {
    let scaled = |secs: u64| format!("{}s", (secs / scale).max(1));
    [
        ("MAX_API_RPS", RPS.to_string()),
        ("SYNCD_CONSUMER_NAME", name.to_owned()),
        ("SYNCD_CLAIM_IDLE", "5s".to_owned()),
        ("PARTICIPANTS_MAX_API_TIMEOUT", "2s".to_owned()),
        ("PARTICIPANTS_STALE_THRESHOLD", scaled(3600)),
        ("PARTICIPANTS_CACHE_TTL", scaled(3600)),
        ("PARTICIPANTS_REFRESH_AHEAD", scaled(900)),
        ("PARTICIPANTS_INACTIVE_RECHECK", scaled(7 * 86_400)),
        ("PARTICIPANTS_SCHEDULE_TZ", "UTC".to_owned()),
        // The default schedules scaled: stale every 15 minutes, full once a day.
        ("PARTICIPANTS_STALE_SWEEP_CRON", every(900 / scale)),
        ("PARTICIPANTS_FULL_SWEEP_CRON", every(86_400 / scale)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn start_syncd(stack: &mut Stack, name: &str, scale: u64) -> anyhow::Result<Process> {
    let env = syncd_env(name, scale);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    stack.syncd(&env).await
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut stack = Stack::start(
        options.chats,
        SimConfig {
            // No limit of the simulator's own: the most calls in any second is then what the
            // fleet sent, measured.
            rate_limit: 0,
            latency_ms: LATENCY_MS,
            latency_jitter_ms: LATENCY_MS,
            hang_ms: 5_000,
            ..SimConfig::default()
        },
        &["--appendonly", "yes", "--appendfsync", "everysec"],
    )
    .await?;
    let max_ids: HashMap<i32, i64> =
        sqlx::query_as::<_, (i32, String)>("select id, max_chat_id from chats")
            .fetch_all(&stack.db)
            .await?
            .into_iter()
            .filter_map(|(id, max)| Some((id, max.parse().ok()?)))
            .collect();
    let mut replicas = [
        (
            "syncd-a",
            Some(start_syncd(&mut stack, "syncd-a", options.scale).await?),
        ),
        (
            "syncd-b",
            Some(start_syncd(&mut stack, "syncd-b", options.scale).await?),
        ),
    ];
    let scaled = |secs: u64| format!("{}s", (secs / options.scale).max(1));
    let api_env = [
        ("PARTICIPANTS_STALE_THRESHOLD", scaled(3600)),
        ("PARTICIPANTS_CACHE_TTL", scaled(3600)),
        ("PARTICIPANTS_REFRESH_AHEAD", scaled(900)),
    ];
    let api_env: Vec<(&str, &str)> = api_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let api = stack.api(&api_env).await?;

    let counters = Arc::new(Counters::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let load = CancellationToken::new();
    drill::readers(&stack, &api, options.chats, &counters, &load);
    // Manual refreshes cycle through the chats from the end, four a second.
    let manual: Vec<i32> = (1..=options.chats).rev().cycle().take(100_000).collect();
    drill::refreshers(&stack, &api, manual, &sent, &load);

    let started = Instant::now();
    let deadline = Duration::from_secs_f64(options.minutes * 60.0);
    let mut seed = options.seed.max(1);
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Rounds of every fault once, each round in a fresh seeded order; at least one round.
    let mut round: Vec<Fault> = Vec::new();
    while started.elapsed() < deadline || !round.is_empty() || injected.is_empty() {
        if round.is_empty() {
            if started.elapsed() >= deadline {
                break;
            }
            round = FAULTS.to_vec();
            for i in (1..round.len()).rev() {
                let j = (xorshift(&mut seed) % (i as u64 + 1)) as usize;
                round.swap(i, j);
            }
        }
        let Some(fault) = round.pop() else { break };
        eprintln!(
            "bench soak: {:>4.0} s: {}",
            started.elapsed().as_secs_f64(),
            fault.title()
        );
        *injected.entry(fault).or_default() += 1;
        match fault {
            Fault::RedisKilled => {
                block(|| stack.redis.kill());
                tokio::time::sleep(Duration::from_secs(5)).await;
                block(|| stack.redis.restart());
            }
            Fault::RedisEmptied => {
                if let Ok(client) = stack.redis_client().await {
                    let _: Result<(), _> = client.flushall(false).await;
                    let _ = client.quit().await;
                }
                block(|| stack.redis.kill());
                tokio::time::sleep(Duration::from_secs(3)).await;
                block(|| stack.redis.restart());
            }
            Fault::PostgresRestarted => {
                block(|| stack.pg.stop());
                tokio::time::sleep(Duration::from_secs(5)).await;
                block(|| stack.pg.start_again());
            }
            Fault::ReplicaRestarted => {
                let which = (xorshift(&mut seed) % 2) as usize;
                let name = replicas[which].0;
                if let Some(mut process) = replicas[which].1.take() {
                    process.kill();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                replicas[which].1 = Some(start_syncd(&mut stack, name, options.scale).await?);
            }
            Fault::MaxRateLimited => {
                stack.sim.update(|c| c.rate_limit = 2);
                tokio::time::sleep(Duration::from_secs(15)).await;
                stack.sim.update(|c| c.rate_limit = 0);
            }
            Fault::MaxErrors => {
                stack.sim.update(|c| c.error_rate = 0.5);
                tokio::time::sleep(Duration::from_secs(15)).await;
                stack.sim.update(|c| c.error_rate = 0.0);
            }
            Fault::MaxTimeouts => {
                stack.sim.update(|c| c.timeout_rate = 0.3);
                tokio::time::sleep(Duration::from_secs(15)).await;
                stack.sim.update(|c| c.timeout_rate = 0.0);
            }
            Fault::MaxWrongUrl => {
                for max_id in max_ids.values() {
                    stack.sim.override_chat(
                        *max_id,
                        ChatOverride {
                            http_status: Some(404),
                            ..ChatOverride::default()
                        },
                    );
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
                for max_id in max_ids.values() {
                    stack.sim.override_chat(*max_id, ChatOverride::default());
                }
            }
        }
        // Calm between faults.
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    let faults_over = Instant::now();
    let fault_seconds = started.elapsed();
    eprintln!("bench soak: faults over; waiting for convergence");

    // Convergence, under the same load: every chat's cached count is MAX's count.
    let client = stack.redis_client().await?;
    let mut converged = 0usize;
    let mut converged_after = None;
    while faults_over.elapsed() < CONVERGE_BOUND {
        converged = cached_right(&client, &stack, &max_ids).await?;
        if converged == max_ids.len() {
            converged_after = Some(faults_over.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    load.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged = drill::acknowledged(&sent);
    let lost = drill::lost_after_drain(&stack, &acknowledged, Duration::from_secs(60)).await?;
    let mut pending = 0;
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(60) {
        pending = 0;
        for stream in [
            shared::keys::REFRESH_STREAM_MANUAL,
            shared::keys::REFRESH_STREAM_LAZY,
        ] {
            let reply: Value = client
                .xpending(stream, shared::keys::REFRESH_GROUP, ())
                .await
                .unwrap_or(Value::Null);
            if let Value::Array(parts) = reply {
                pending += parts
                    .first()
                    .and_then(|v| v.clone().convert::<i64>().ok())
                    .unwrap_or(0);
            }
        }
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dead: i64 = client
        .xlen(shared::keys::REFRESH_STREAM_DEAD)
        .await
        .unwrap_or(0);
    let stats = stack.sim.stats();
    let calls: u64 = stats.calls_per_chat.values().sum();
    let sent = sent.lock().unwrap();
    let reads = counters.reads.load(Ordering::Relaxed);
    let reads_failed = counters.reads_failed.load(Ordering::Relaxed);
    let scaled_hours = fault_seconds.as_secs_f64() * options.scale as f64 / 3600.0;

    println!(
        "\nSoak: {} chats, 2 syncd replicas (stable names) and an api, MAX_API_RPS={RPS}, MAX latency {LATENCY_MS}-{} ms, \
         freshness settings and schedules compressed {}x (stale threshold {}, stale sweep `{}`, full sweep `{}`), seed {}\n",
        options.chats,
        LATENCY_MS * 2,
        options.scale,
        scaled(3600),
        every(900 / options.scale),
        every(86_400 / options.scale),
        options.seed
    );
    println!(
        "Faults for {:.0} s of wall time ({scaled_hours:.1} h, {:.1} days scaled):\n",
        fault_seconds.as_secs_f64(),
        scaled_hours / 24.0
    );
    println!("| fault | times |");
    println!("|---|---|");
    for (fault, n) in &injected {
        println!("| {} | {n} |", fault.title());
    }
    println!("\n| measure | result |");
    println!("|---|---|");
    println!(
        "| chats whose cached count is MAX's count | {converged} of {} |",
        max_ids.len()
    );
    println!(
        "| time to converge after the last fault (bound {} s) | {} |",
        CONVERGE_BOUND.as_secs(),
        converged_after.map_or_else(
            || "not converged".to_owned(),
            |d| format!("{:.1} s", d.as_secs_f64())
        )
    );
    println!("| stream entries left pending | {pending} |");
    println!("| entries dead-lettered | {dead} |");
    println!(
        "| manual refreshes: sent, acknowledged (200/202), lost | {} sent, {} acknowledged, {lost} lost |",
        sent.len(),
        acknowledged.len(),
    );
    println!("| reads failed | {reads_failed} of {reads} |");
    println!(
        "| MAX calls per chat | {:.2} ({calls} accepted calls, {} answered 429) |",
        calls as f64 / max_ids.len() as f64,
        stats.rate_limited
    );
    println!(
        "| most MAX calls in any one second | {} (MAX_API_RPS {RPS}) |",
        stats.max_in_window
    );
    drop(api);
    if converged_after.is_none() || pending > 0 || lost > 0 || stats.max_in_window > RPS as usize {
        bail!("the soak did not converge cleanly (see the table)");
    }
    Ok(())
}

/// Chats whose count in Redis is MAX's current count.
async fn cached_right(
    client: &Client,
    stack: &Stack,
    max_ids: &HashMap<i32, i64>,
) -> anyhow::Result<usize> {
    let ids: Vec<i32> = max_ids.keys().copied().collect();
    let options = fred::types::config::Options::default();
    let mut right = 0;
    for chunk in ids.chunks(500) {
        let cached = match shared::counts::read_many(client, &options, chunk).await {
            Ok(cached) => cached,
            Err(_) => return Ok(0),
        };
        right += chunk
            .iter()
            .filter(|id| {
                cached
                    .get(id)
                    .is_some_and(|c| c.count == stack.sim.count_of(max_ids[id]))
            })
            .count();
    }
    Ok(right)
}
