//! `bench soak`: the whole deployment (two `syncd` replicas with stable names, the `api`,
//! Postgres, Redis with its AOF on, the MAX simulator) under load for several minutes of wall
//! time with the freshness settings and the sweep schedules compressed `--scale` times (at the
//! default 60 a 60 s stale threshold stands for the default hour). Two profiles:
//!
//! `faults` (the default): faults are injected one after another in a seeded random order: Redis
//! killed (restarted with its data, and emptied), Postgres restarted, a replica killed and
//! restarted under the same name, MAX 429 storms, 5xx, timeouts, and a phase of 404 for every
//! chat (a wrong `MAX_API_URL`). Then the faults stop and the soak measures convergence:
//! - every chat's count in the cache equals MAX's current count (the bound is printed);
//! - no stream entry is left pending;
//! - no manual refresh the api acknowledged (200 or 202) is lost;
//! - the most MAX calls in any one-second window, against `MAX_API_RPS`.
//!
//! `month`: a month of a deployment's life compressed into the run (see `month`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use fred::prelude::*;
use maxsim::{ChatOverride, SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

use crate::drill::{self, block, xorshift, Counters, Sent};
use crate::stack::{Process, Stack};

mod month;

const RPS: u32 = 100;
const LATENCY_MS: u64 = 20;
/// How long convergence may take once the faults stop before the soak says it failed.
const CONVERGE_BOUND: Duration = Duration::from_secs(240);
/// How long an entry may sit unacknowledged before a peer takes it over (`SYNCD_CLAIM_IDLE`).
const CLAIM_IDLE: Duration = Duration::from_secs(5);
/// Deliveries after which syncd dead-letters an entry (`SYNCD_MAX_DELIVERIES`, its default).
const MAX_DELIVERIES: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Random faults in a seeded order, then convergence
    #[value(alias = "default")]
    Faults,
    /// A month of a deployment's life: chats gone for good, chats joining, new chats, rechecks
    /// coming due, outages longer than the redelivery budget, answers that are not a chat, a
    /// lazy backlog, replica restarts
    Month,
}

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
    pub profile: Profile,
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

/// The compressed settings of a soak.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Compression of the freshness settings and the sweep schedules.
    scale: u64,
    /// `PARTICIPANTS_INACTIVE_RECHECK`: its default week, compressed.
    inactive_recheck: Duration,
}

impl Timing {
    /// Everything compressed `scale` times.
    fn scaled(scale: u64) -> Self {
        Self {
            scale,
            inactive_recheck: Duration::from_secs((7 * 86_400 / scale).max(1)),
        }
    }

    /// `secs` of real time compressed (at least a second).
    fn compressed(&self, secs: u64) -> Duration {
        Duration::from_secs((secs / self.scale).max(1))
    }

    /// `secs` of real time compressed, as a duration setting.
    fn setting(&self, secs: u64) -> String {
        format!("{}s", self.compressed(secs).as_secs())
    }

    fn stale_sweep_cron(&self) -> String {
        every(900 / self.scale)
    }

    fn full_sweep_cron(&self) -> String {
        every(86_400 / self.scale)
    }

    /// The freshness settings the api and syncd share.
    fn freshness_env(&self) -> Vec<(String, String)> {
        vec![
            ("PARTICIPANTS_STALE_THRESHOLD".into(), self.setting(3600)),
            ("PARTICIPANTS_CACHE_TTL".into(), self.setting(3600)),
            ("PARTICIPANTS_REFRESH_AHEAD".into(), self.setting(900)),
        ]
    }

    fn syncd_env(&self, name: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("MAX_API_RPS", RPS.to_string()),
            ("SYNCD_CONSUMER_NAME", name.to_owned()),
            ("SYNCD_CLAIM_IDLE", format!("{}s", CLAIM_IDLE.as_secs())),
            ("SYNCD_MAX_DELIVERIES", MAX_DELIVERIES.to_string()),
            ("PARTICIPANTS_MAX_API_TIMEOUT", "2s".to_owned()),
            (
                "PARTICIPANTS_INACTIVE_RECHECK",
                format!("{}s", self.inactive_recheck.as_secs().max(1)),
            ),
            ("PARTICIPANTS_SCHEDULE_TZ", "UTC".to_owned()),
            // The default schedules scaled: stale every 15 minutes, full once a day.
            ("PARTICIPANTS_STALE_SWEEP_CRON", self.stale_sweep_cron()),
            ("PARTICIPANTS_FULL_SWEEP_CRON", self.full_sweep_cron()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(self.freshness_env());
        env
    }
}

fn as_env(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The deployment a soak runs against, under load: readers paging the api and a manual
/// refresh every 250 ms, cycling through the chats from the end.
struct Deployment {
    stack: Stack,
    replicas: [(&'static str, Option<Process>); 2],
    api: Process,
    timing: Timing,
    counters: Arc<Counters>,
    sent: Arc<Mutex<Vec<Sent>>>,
    load: CancellationToken,
    /// `chats.id` to MAX id, of every chat with a usable one.
    max_ids: HashMap<i32, i64>,
}

impl Deployment {
    async fn start(chats: i32, sim: SimConfig, timing: Timing) -> anyhow::Result<Self> {
        let mut stack = Stack::start(
            chats,
            SimConfig {
                // No limit of the simulator's own: the most calls in any second is then what
                // the fleet sent, measured.
                rate_limit: 0,
                latency_ms: LATENCY_MS,
                latency_jitter_ms: LATENCY_MS,
                hang_ms: 5_000,
                ..sim
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
        let mut replicas = [("syncd-a", None), ("syncd-b", None)];
        for (name, process) in &mut replicas {
            *process = Some(stack.syncd(&as_env(&timing.syncd_env(name))).await?);
        }
        let api = stack.api(&as_env(&timing.freshness_env())).await?;
        let counters = Arc::new(Counters::default());
        let sent = Arc::new(Mutex::new(Vec::new()));
        let load = CancellationToken::new();
        drill::readers(&stack, &api, chats, &counters, &load);
        let manual: Vec<i32> = (1..=chats).rev().cycle().take(100_000).collect();
        drill::refreshers(&stack, &api, manual, &sent, &load);
        Ok(Self {
            stack,
            replicas,
            api,
            timing,
            counters,
            sent,
            load,
            max_ids,
        })
    }

    /// SIGKILLs replica `which` and restarts it under its name after 2 s; returns the name.
    async fn restart_replica(&mut self, which: usize) -> anyhow::Result<&'static str> {
        let name = self.replicas[which].0;
        if let Some(mut process) = self.replicas[which].1.take() {
            process.kill();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let env = self.timing.syncd_env(name);
        self.replicas[which].1 = Some(self.stack.syncd(&as_env(&env)).await?);
        Ok(name)
    }

    /// Waits up to `bound` for every chat that `chats` lists (`chats.id`, MAX id; asked again
    /// each round, as the set may change) to have MAX's count in the cache, no older than
    /// `max_age` if given.
    async fn converge(
        &self,
        client: &Client,
        chats: impl Fn() -> Vec<(i32, i64)>,
        max_age: Option<Duration>,
        bound: Duration,
    ) -> anyhow::Result<Convergence> {
        let started = Instant::now();
        loop {
            let checked = chats();
            let right = cached_right(client, &self.stack.sim, &checked, max_age).await?;
            let done = right.len() == checked.len();
            if done || started.elapsed() >= bound {
                return Ok(Convergence {
                    checked,
                    right,
                    after: done.then(|| started.elapsed()),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The last look at the cache of a convergence wait.
struct Convergence {
    /// The chats checked (`chats.id`, MAX id).
    checked: Vec<(i32, i64)>,
    /// Those whose cached count was MAX's.
    right: HashSet<i32>,
    /// When all were, if they were within the bound.
    after: Option<Duration>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    match options.profile {
        Profile::Faults => run_faults(options).await,
        Profile::Month => month::run(options).await,
    }
}

async fn run_faults(options: Options) -> anyhow::Result<()> {
    let timing = Timing::scaled(options.scale);
    let mut deployment = Deployment::start(options.chats, SimConfig::default(), timing).await?;
    let started = Instant::now();
    let injected = inject_rounds(&mut deployment, &options).await?;
    let fault_seconds = started.elapsed();
    eprintln!("bench soak: faults over; waiting for convergence");

    // Convergence, under the same load: every chat's cached count is MAX's count.
    let client = deployment.stack.redis_client().await?;
    let every_chat: Vec<(i32, i64)> = deployment.max_ids.iter().map(|(k, v)| (*k, *v)).collect();
    let convergence = deployment
        .converge(&client, || every_chat.clone(), None, CONVERGE_BOUND)
        .await?;
    let chats = convergence.checked.len();
    let (converged, converged_after) = (convergence.right.len(), convergence.after);
    deployment.load.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged = drill::acknowledged(&deployment.sent);
    let drain = Duration::from_secs(60);
    let lost = drill::lost_after_drain(&deployment.stack, &acknowledged, drain)
        .await?
        .len();
    let pending = pending_after_drain(&client, drain).await;
    let dead: i64 = client
        .xlen(shared::keys::REFRESH_STREAM_DEAD)
        .await
        .unwrap_or(0);
    let stats = deployment.stack.sim.stats();
    let calls: u64 = stats.calls_per_chat.values().sum();
    let sent = deployment.sent.lock().unwrap();
    let reads = deployment.counters.reads.load(Ordering::Relaxed);
    let reads_failed = deployment.counters.reads_failed.load(Ordering::Relaxed);
    let scaled_hours = fault_seconds.as_secs_f64() * options.scale as f64 / 3600.0;

    println!(
        "\nSoak: {} chats, 2 syncd replicas (stable names) and an api, MAX_API_RPS={RPS}, MAX latency {LATENCY_MS}-{} ms, \
         freshness settings and schedules compressed {}x (stale threshold {}, stale sweep `{}`, full sweep `{}`), seed {}\n",
        options.chats,
        LATENCY_MS * 2,
        options.scale,
        timing.setting(3600),
        timing.stale_sweep_cron(),
        timing.full_sweep_cron(),
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
    println!("| chats whose cached count is MAX's count | {converged} of {chats} |");
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
        calls as f64 / chats as f64,
        stats.rate_limited
    );
    println!(
        "| most MAX calls in any one second | {} (MAX_API_RPS {RPS}) |",
        stats.max_in_window
    );
    if converged_after.is_none() || pending > 0 || lost > 0 || stats.max_in_window > RPS as usize {
        bail!("the soak did not converge cleanly (see the table)");
    }
    Ok(())
}

/// Rounds of every fault once, each round in a fresh seeded order, for `options.minutes`; at
/// least one round. Returns how often each fault was injected.
async fn inject_rounds(
    deployment: &mut Deployment,
    options: &Options,
) -> anyhow::Result<BTreeMap<Fault, u32>> {
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(options.minutes * 60.0);
    let mut seed = options.seed.max(1);
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(10)).await;
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
        inject(deployment, fault, &mut seed).await?;
        // Calm between faults.
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    Ok(injected)
}

async fn inject(deployment: &mut Deployment, fault: Fault, seed: &mut u64) -> anyhow::Result<()> {
    let stack = &mut deployment.stack;
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
            deployment
                .restart_replica((xorshift(seed) % 2) as usize)
                .await?;
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
            let answer = |http_status| ChatOverride {
                http_status,
                ..ChatOverride::default()
            };
            for max_id in deployment.max_ids.values() {
                stack.sim.override_chat(*max_id, answer(Some(404)));
            }
            tokio::time::sleep(Duration::from_secs(20)).await;
            for max_id in deployment.max_ids.values() {
                stack.sim.override_chat(*max_id, answer(None));
            }
        }
    }
    Ok(())
}

/// Entries pending in the refresh streams after waiting up to `drain` for none to be.
async fn pending_after_drain(client: &Client, drain: Duration) -> i64 {
    let started = Instant::now();
    loop {
        let mut pending = 0;
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
        if pending == 0 || started.elapsed() >= drain {
            return pending;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The chats of `chats` (`chats.id`, MAX id) whose count in Redis is MAX's current count, and
/// no older than `max_age` if given (none while Redis cannot be read). A count's bucket lives
/// as long as any of its 64 chats is written, so without `max_age` a count that stopped being
/// refreshed long ago, and that MAX has not changed since, passes too.
async fn cached_right(
    client: &Client,
    sim: &Simulator,
    chats: &[(i32, i64)],
    max_age: Option<Duration>,
) -> anyhow::Result<HashSet<i32>> {
    let options = fred::types::config::Options::default();
    let oldest = max_age.map(|age| chrono::Utc::now() - age);
    let mut right = HashSet::new();
    for chunk in chats.chunks(500) {
        let ids: Vec<i32> = chunk.iter().map(|(id, _)| *id).collect();
        let Ok(cached) = shared::counts::read_many(client, &options, &ids).await else {
            return Ok(HashSet::new());
        };
        right.extend(
            chunk
                .iter()
                .filter(|(id, max_id)| {
                    cached.get(id).is_some_and(|c| {
                        c.count == sim.count_of(*max_id)
                            && oldest.is_none_or(|oldest| c.updated_at >= oldest)
                    })
                })
                .map(|(id, _)| *id),
        );
    }
    Ok(right)
}
