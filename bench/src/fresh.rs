//! `bench fresh`: freshness under the MAX budget, as a time-scaled simulation driving the real
//! binaries. Two deployments run side by side on the same machine, with the same chats, reads
//! and churn; they differ only in strategy:
//! - this service: counts due `PARTICIPANTS_REFRESH_AHEAD` (15 min) before they turn stale,
//!   so a read or the stale sweep refreshes a chat people look at before its count is stale;
//! - the seed design: a 1 h cache TTL, a 15-minute stale sweep and a nightly full sweep, with
//!   a lazy refresh only once a count is stale (`PARTICIPANTS_REFRESH_AHEAD=0`).
//!
//! Time is scaled by `--scale`: every duration is divided by it and the MAX budget multiplied
//! by it, so refreshes per threshold window, reads per threshold window and churn per window
//! keep their real ratios to the 150,000 chats. Reads follow a Zipf law over a fixed random
//! ranking of the chats. A served read is fresh when the count's `participants_updated_at` is
//! within `PARTICIPANTS_STALE_THRESHOLD` of the moment it was served, and exact when it equals
//! the simulator's count at that moment. The first scaled hour warms up and is not counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use maxsim::SimConfig;
use serde_json::Value;
use shared::counts::{write_fenced, CachedCount};

use crate::stack::Stack;

pub struct Options {
    pub chats: i32,
    pub scale: f64,
    pub budget_rps: f64,
    pub reads_per_hour: f64,
    pub hours: f64,
    pub zipf: f64,
    pub latency: Duration,
}

#[derive(Clone, Copy)]
enum Strategy {
    Ours,
    Seed,
}

impl Strategy {
    fn title(self) -> &'static str {
        match self {
            Strategy::Ours => "this service (refresh 15 min ahead of the threshold)",
            Strategy::Seed => {
                "seed design (1 h TTL, 15-min stale sweep, nightly full; refresh once stale)"
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    reads: u64,
    failed: u64,
    fresh: u64,
    exact: u64,
}

struct Outcome {
    tally: Tally,
    calls: u64,
    window: Duration,
    rate_limited: u64,
}

/// Cumulative Zipf weights of ranks 1..=n.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|rank| {
            total += (rank as f64).powf(-s);
            total
        })
        .collect();
    for value in &mut cdf {
        *value /= total;
    }
    cdf
}

fn next(state: &mut u64) -> u64 {
    // splitmix64
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unit(state: &mut u64) -> f64 {
    (next(state) >> 11) as f64 / (1u64 << 53) as f64
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let scaled = |d: Duration| Duration::from_secs_f64(d.as_secs_f64() / options.scale);
    let threshold = scaled(Duration::from_secs(3600));
    eprintln!(
        "bench fresh: {} chats, scale 1:{}, threshold {:?}, MAX_API_RPS {}, {} reads/s, {} scaled hours",
        options.chats,
        options.scale,
        threshold,
        options.budget_rps * options.scale,
        options.reads_per_hour * options.scale / 3600.0,
        options.hours
    );
    let (ours, seed) = tokio::join!(
        simulate(&options, Strategy::Ours),
        simulate(&options, Strategy::Seed)
    );
    let rows = [(Strategy::Ours, ours?), (Strategy::Seed, seed?)];

    println!(
        "\nFreshness: {} chats, Zipf s={} reads ({} an hour), MAX budget {} rps, churn: every count moves by up to ±10 each hour; \
         time scaled 1:{} (threshold 1 h = {:.0} s, sweep every 15 min = {:.0} s); {} scaled hours, the first not counted; \
         both strategies side by side in one run\n",
        options.chats,
        options.zipf,
        options.reads_per_hour,
        options.budget_rps,
        options.scale,
        threshold.as_secs_f64(),
        scaled(Duration::from_secs(900)).as_secs_f64(),
        options.hours,
    );
    println!("| strategy | reads served | failed | fresh (within threshold) | exact (equal to MAX now) | MAX calls per hour | share of budget | 429s | target |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (strategy, outcome) in &rows {
        let reads = outcome.tally.reads.max(1) as f64;
        let scaled_hours = outcome.window.as_secs_f64() * options.scale / 3600.0;
        let per_hour = outcome.calls as f64 / scaled_hours;
        println!(
            "| {} | {} | {} | {:.2}% | {:.2}% | {:.0} | {:.0}% | {} | fresh ≥99% |",
            strategy.title(),
            outcome.tally.reads,
            outcome.tally.failed,
            100.0 * outcome.tally.fresh as f64 / reads,
            100.0 * outcome.tally.exact as f64 / reads,
            per_hour,
            100.0 * per_hour / (options.budget_rps * 3600.0),
            outcome.rate_limited,
        );
    }
    Ok(())
}

async fn simulate(options: &Options, strategy: Strategy) -> anyhow::Result<Outcome> {
    let scale = options.scale;
    let secs = |real: f64| format!("{}ms", ((real / scale) * 1000.0).round() as u64);
    let threshold = Duration::from_secs_f64(3600.0 / scale);
    let mut stack = Stack::start(
        options.chats,
        SimConfig {
            rate_limit: (options.budget_rps * scale).floor() as u32,
            latency_ms: options.latency.as_millis() as u64,
            churn_period_secs: (3600.0 / scale).round().max(1.0) as u64,
            ..SimConfig::default()
        },
        &[],
    )
    .await?;

    // The state after a while in production: every count known, fetched up to two thresholds
    // ago, correct at the time.
    let chats: Vec<(i32, String)> = sqlx::query_as("select id, max_chat_id from chats order by id")
        .fetch_all(&stack.db)
        .await?;
    let mut seed = 0x5eed_u64;
    let now = Utc::now();
    let mut ids = Vec::with_capacity(chats.len());
    let mut counts = Vec::with_capacity(chats.len());
    let mut ats = Vec::with_capacity(chats.len());
    for (id, max_id) in &chats {
        ids.push(*id);
        counts.push(stack.sim.count_of(max_id.parse()?));
        ats.push(now - chrono::Duration::from_std(threshold.mul_f64(2.0 * unit(&mut seed)))?);
    }
    sqlx::query(
        "insert into chat_participants (chat_id, participants_count, participants_updated_at, sync_status, checked_at) \
         select * , 'active', u.at from unnest($1::integer[], $2::integer[], $3::timestamptz[]) as u(id, count, at)",
    )
    .bind(&ids)
    .bind(&counts)
    .bind(&ats)
    .execute(&stack.db)
    .await?;
    sqlx::query(
        "update chats c set participants_count = p.participants_count from chat_participants p where p.chat_id = c.id",
    )
    .execute(&stack.db)
    .await?;
    sqlx::query("vacuum analyze").execute(&stack.db).await?;
    let redis = stack.redis_client().await?;
    let entries: Vec<(i32, CachedCount)> = ids
        .iter()
        .zip(counts.iter().zip(&ats))
        .map(|(id, (count, at))| {
            (
                *id,
                CachedCount {
                    count: *count,
                    updated_at: *at,
                },
            )
        })
        .collect();
    for chunk in entries.chunks(2000) {
        write_fenced(&redis, chunk, threshold).await?;
    }

    let rps = (options.budget_rps * scale).to_string();
    let ahead = match strategy {
        Strategy::Ours => secs(900.0),
        Strategy::Seed => "0s".to_owned(),
    };
    let freshness = [
        ("PARTICIPANTS_STALE_THRESHOLD", secs(3600.0)),
        ("PARTICIPANTS_CACHE_TTL", secs(3600.0)),
        ("PARTICIPANTS_REFRESH_AHEAD", ahead),
    ];
    let mut syncd_env: Vec<(&str, String)> = freshness.to_vec();
    syncd_env.extend([
        ("MAX_API_RPS", rps),
        ("PARTICIPANTS_UPDATE_INTERVAL", secs(900.0)),
    ]);
    let mut api_env: Vec<(&str, String)> = freshness.to_vec();
    api_env.push(("PARTICIPANTS_REFRESH_DEDUP_TTL", secs(60.0)));
    let syncd_env: Vec<(&str, &str)> = syncd_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let api_env: Vec<(&str, &str)> = api_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _syncd = stack.syncd(&syncd_env).await?;
    let api = stack.api(&api_env).await?;

    // A fixed random ranking: rank r is chat ids[perm[r]].
    let mut perm: Vec<usize> = (0..ids.len()).collect();
    let mut shuffle = 0xc0ffee_u64;
    for i in (1..perm.len()).rev() {
        let j = (next(&mut shuffle) % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    let cdf = Arc::new(zipf_cdf(ids.len(), options.zipf));
    let max_ids: Arc<Vec<i64>> = Arc::new(
        chats
            .iter()
            .map(|(_, m)| m.parse().unwrap_or_default())
            .collect(),
    );
    let ids = Arc::new(ids);
    let perm = Arc::new(perm);

    let rate = options.reads_per_hour * scale / 3600.0;
    let total = Duration::from_secs_f64(options.hours * 3600.0 / scale);
    let warm_up = Duration::from_secs_f64(3600.0 / scale);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut calls_at_warm_up = None;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut draw = 0x7ead_u64;
    while started.elapsed() < total {
        tick.tick().await;
        if calls_at_warm_up.is_none() && started.elapsed() >= warm_up {
            calls_at_warm_up = Some((stack.sim.stats().requests, Instant::now()));
        }
        let counting = calls_at_warm_up.is_some();
        let u = unit(&mut draw);
        let rank = cdf.partition_point(|c| *c < u).min(cdf.len() - 1);
        let index = perm[rank];
        let (id, max_id) = (ids[index], max_ids[index]);
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let http = stack.http.clone();
        let token = stack.token.clone();
        let url = format!("{}/chats/{id}", api.base());
        let sim = stack.sim.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let body: Option<Value> = match http.get(&url).bearer_auth(&token).send().await {
                Ok(response) if response.status().is_success() => response.json().await.ok(),
                _ => None,
            };
            let served = Utc::now();
            if !counting {
                return;
            }
            let mut tally = tally.lock().unwrap();
            tally.reads += 1;
            let Some(body) = body else {
                tally.failed += 1;
                return;
            };
            let at: Option<DateTime<Utc>> = body["participants_updated_at"]
                .as_str()
                .and_then(|t| t.parse().ok());
            if at.is_some_and(|at| (served - at).to_std().unwrap_or_default() <= threshold) {
                tally.fresh += 1;
            }
            if body["participants_count"].as_i64() == Some(i64::from(sim.count_of(max_id))) {
                tally.exact += 1;
            }
        });
    }
    // Let the last reads answer.
    let _ = limit.acquire_many(32).await;
    let (calls_before, since) = calls_at_warm_up.unwrap_or((0, started));
    let stats = stack.sim.stats();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    Ok(Outcome {
        tally,
        calls: stats.requests - calls_before,
        window: since.elapsed(),
        rate_limited: stats.rate_limited,
    })
}
