//! `bench drill`: faults injected under load into a whole deployment (the real `api` and
//! `syncd` binaries, Postgres, Redis with its AOF on, the MAX simulator), one row each:
//! reads that failed, refresh requests refused, acknowledged refreshes lost, recovery time.
//!
//! Load during every drill: 4 readers paging `GET /chats/all` (whose stale counts enqueue lazy
//! refreshes), and a manual `POST /chats/{id}/refresh-participants` every 250 ms, each for a
//! chat of its own that nothing else reads. An acknowledged refresh (200 or 202) is lost when,
//! after the drill and a drain of up to 90 s, its chat's count is still older than the request.
//! Recovery is the time from the end of the fault to the first manual refresh sent after it
//! that answers 200 (fresh count within PARTICIPANTS_REFRESH_WAIT), or, for the syncd drill, to
//! the first progress of the interrupted sweep.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use maxsim::SimConfig;
use tokio_util::sync::CancellationToken;

use crate::stack::{Process, Stack};

/// Chats the readers page through; the manual refresh targets sort after them.
const CHATS: i32 = 5_000;
const MANUAL_CHATS: i32 = 2_000;
/// The fleet's MAX budget in the drills, and the simulator's own limit.
const RPS: u32 = 100;
const LATENCY_MS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Drill {
    Redis,
    Postgres,
    Syncd,
    RateLimit,
    MaxOutage,
    MaxSlow,
}

impl Drill {
    fn title(self) -> &'static str {
        match self {
            Drill::Redis => "Redis SIGKILLed, restarted after 5 s (AOF everysec)",
            Drill::Postgres => "Postgres stopped (fast shutdown), started after 5 s",
            Drill::Syncd => "syncd SIGKILLed mid-sweep (2 replicas)",
            Drill::RateLimit => "a storm of MAX 429s for 15 s (MAX limit 100 to 2 rps)",
            Drill::MaxOutage => "a 60 s MAX outage (every call answered 503)",
            Drill::MaxSlow => "MAX answering in 5 s for 20 s",
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) reads_failed: AtomicU64,
}

pub(crate) struct Sent {
    pub(crate) chat_id: i32,
    pub(crate) at: DateTime<Utc>,
    pub(crate) sent: Instant,
    pub(crate) answered: Instant,
    pub(crate) status: u16,
}

struct Row {
    reads: u64,
    reads_failed: u64,
    sent: usize,
    refused: usize,
    accepted: usize,
    lost: usize,
    recovery: Option<Duration>,
    notes: String,
}

pub async fn run(drills: &[Drill]) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &drill in drills {
        eprintln!("bench drill: {}", drill.title());
        let started = Instant::now();
        let row = one(drill).await?;
        eprintln!(
            "bench drill: done in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        rows.push((drill, row));
    }
    println!(
        "\nDrills: {CHATS} chats read by 4 readers, a manual refresh every 250 ms, MAX_API_RPS={RPS}, \
         MAX latency {LATENCY_MS} ms, PARTICIPANTS_REFRESH_WAIT=2s\n"
    );
    println!("| drill | reads failed | refreshes refused (503 or error) | refreshes acknowledged | refreshes lost | recovery time | notes |");
    println!("|---|---|---|---|---|---|---|");
    for (drill, row) in rows {
        println!(
            "| {} | {} of {} | {} of {} | {} | {} | {} | {} |",
            drill.title(),
            row.reads_failed,
            row.reads,
            row.refused,
            row.sent,
            row.accepted,
            row.lost,
            row.recovery.map_or_else(
                || "not recovered".to_owned(),
                |d| format!("{:.2} s", d.as_secs_f64())
            ),
            row.notes.trim_start_matches("; "),
        );
    }
    Ok(())
}

pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Four readers paging `GET /chats/all` at random offsets among the first `chats` chats.
pub(crate) fn readers(
    stack: &Stack,
    api: &Process,
    chats: i32,
    counters: &Arc<Counters>,
    stop: &CancellationToken,
) {
    for worker in 0..4u64 {
        let http = stack.http.clone();
        let token = stack.token.clone();
        let base = api.base();
        let counters = counters.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (worker + 1);
            while !stop.is_cancelled() {
                let offset = xorshift(&mut seed) % (chats.max(51) as u64 - 50);
                let ok = match http
                    .get(format!("{base}/chats/all?limit=50&offset={offset}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let _ = response.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                counters.reads.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    counters.reads_failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
}

/// A manual refresh every 250 ms, one per chat of `targets`, each recorded in `sent`.
pub(crate) fn refreshers(
    stack: &Stack,
    api: &Process,
    targets: Vec<i32>,
    sent: &Arc<Mutex<Vec<Sent>>>,
    stop: &CancellationToken,
) {
    let http = stack.http.clone();
    let token = stack.token.clone();
    let base = api.base();
    let sent = sent.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        for chat_id in targets {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let http = http.clone();
            let token = token.clone();
            let base = base.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                let at = Utc::now();
                let started = Instant::now();
                let status = match http
                    .post(format!("{base}/chats/{chat_id}/refresh-participants"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                };
                sent.lock().unwrap().push(Sent {
                    chat_id,
                    at,
                    sent: started,
                    answered: Instant::now(),
                    status,
                });
            });
        }
    });
}

/// The first manual refresh sent after `since` that answered 200, as time since `since`.
fn recovered(sent: &Mutex<Vec<Sent>>, since: Instant) -> Option<Duration> {
    sent.lock()
        .unwrap()
        .iter()
        .filter(|s| s.sent >= since && s.status == 200)
        .map(|s| s.answered - since)
        .min()
}

async fn wait_recovered(
    sent: &Mutex<Vec<Sent>>,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    while since.elapsed() < limit {
        if let Some(recovery) = recovered(sent, since) {
            return Some(recovery);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The manual refreshes answered 200 or 202: the chat and when it was asked.
pub(crate) fn acknowledged(sent: &Mutex<Vec<Sent>>) -> Vec<(i32, DateTime<Utc>)> {
    sent.lock()
        .unwrap()
        .iter()
        .filter(|s| s.status == 200 || s.status == 202)
        .map(|s| (s.chat_id, s.at))
        .collect()
}

/// Acknowledged refreshes whose chat still has no answer as new as the request after waiting
/// up to `drain` for them: a count, or a status of the chat's own (gone, not joined yet). A
/// failure recorded against the chat is not an answer.
pub(crate) async fn lost_after_drain(
    stack: &Stack,
    acknowledged: &[(i32, DateTime<Utc>)],
    drain: Duration,
) -> anyhow::Result<Vec<(i32, DateTime<Utc>)>> {
    let started = Instant::now();
    let mut lost = acknowledged.to_vec();
    while started.elapsed() < drain {
        let ids: Vec<i32> = acknowledged.iter().map(|a| a.0).collect();
        let rows: Vec<(i32, Option<DateTime<Utc>>)> = sqlx::query_as(
            "select chat_id, greatest(participants_updated_at, \
                 case when sync_status <> 'active' then checked_at end) \
             from chat_participants where chat_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&stack.db)
        .await?;
        let fresh: std::collections::HashMap<i32, DateTime<Utc>> = rows
            .into_iter()
            .filter_map(|(id, at)| at.map(|at| (id, at)))
            .collect();
        // A call already in flight for the chat may answer for the request (the api's rule):
        // allow the MAX latency of a drill plus a second.
        let slack = chrono::Duration::milliseconds(6_000);
        lost = acknowledged
            .iter()
            .filter(|(id, at)| fresh.get(id).is_none_or(|f| *f < *at - slack))
            .copied()
            .collect();
        if lost.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(lost)
}

pub(crate) fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn one(drill: Drill) -> anyhow::Result<Row> {
    let mut stack = Stack::start(
        CHATS,
        SimConfig {
            rate_limit: RPS,
            latency_ms: LATENCY_MS,
            ..SimConfig::default()
        },
        &["--appendonly", "yes", "--appendfsync", "everysec"],
    )
    .await?;
    let targets: Vec<i32> = sqlx::query_scalar(
        "insert into chats (name, url, max_chat_id, participants_count, source) \
         select 'zz manual ' || g, 'https://max.ru/join/m' || g, (-71000000000000 - g)::text, 1, 'admin_panel' \
         from generate_series(1, $1) g returning id",
    )
    .bind(MANUAL_CHATS)
    .fetch_all(&stack.db)
    .await?;
    let rps = RPS.to_string();
    let syncd_env = |name: &'static str| {
        [
            ("MAX_API_RPS", rps.clone()),
            ("PARTICIPANTS_ENABLE_BACKGROUND_SYNC", "false".to_owned()),
            ("SYNCD_CONSUMER_NAME", name.to_owned()),
        ]
    };
    let env_a = syncd_env("syncd-a");
    let env_a: Vec<(&str, &str)> = env_a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut syncd_a = stack.syncd(&env_a).await?;
    let mut syncd_b = None;
    if drill == Drill::Syncd {
        let env_b = syncd_env("syncd-b");
        let env_b: Vec<(&str, &str)> = env_b.iter().map(|(k, v)| (*k, v.as_str())).collect();
        syncd_b = Some(stack.syncd(&env_b).await?);
    }
    let api = stack.api(&[]).await?;

    let counters = Arc::new(Counters::default());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    readers(&stack, &api, CHATS, &counters, &stop);
    refreshers(&stack, &api, targets, &sent, &stop);
    tokio::time::sleep(Duration::from_secs(5)).await;

    let mut notes = String::new();
    let recovery;
    match drill {
        Drill::Redis => {
            block(|| stack.redis.kill());
            tokio::time::sleep(Duration::from_secs(5)).await;
            block(|| stack.redis.restart());
            let since = Instant::now();
            recovery = wait_recovered(&sent, since, Duration::from_secs(60)).await;
        }
        Drill::Postgres => {
            block(|| stack.pg.stop());
            tokio::time::sleep(Duration::from_secs(5)).await;
            block(|| stack.pg.start_again());
            let since = Instant::now();
            recovery = wait_recovered(&sent, since, Duration::from_secs(60)).await;
        }
        Drill::Syncd => {
            stack.request_full_sweep().await?;
            // Kill the sweep's owner once a third of it is done.
            let owner = loop {
                let row: Option<(Option<String>, i32)> = sqlx::query_as(
                    "select owner, done from sync_sweeps where kind = 'full' and finished_at is null",
                )
                .fetch_optional(&stack.db)
                .await?;
                if let Some((Some(owner), done)) = row {
                    if done >= (CHATS + MANUAL_CHATS) / 3 {
                        break owner;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if owner == "syncd-a" {
                syncd_a.kill();
            } else if let Some(b) = syncd_b.as_mut() {
                b.kill();
            }
            let since = Instant::now();
            let done_at_kill: i32 = sqlx::query_scalar(
                "select done from sync_sweeps where kind = 'full' and finished_at is null",
            )
            .fetch_one(&stack.db)
            .await?;
            let mut resumed = None;
            while since.elapsed() < Duration::from_secs(300) {
                let row: Option<(Option<String>, i32, Option<DateTime<Utc>>)> = sqlx::query_as(
                    "select owner, done, finished_at from sync_sweeps where kind = 'full' order by started_at desc limit 1",
                )
                .fetch_optional(&stack.db)
                .await?;
                if let Some((now_owner, done, finished)) = row {
                    if resumed.is_none() && (done > done_at_kill || finished.is_some()) {
                        resumed = Some(since.elapsed());
                        notes = format!(
                            "killed {owner} at {done_at_kill} chats done; {} resumed from the recorded position",
                            now_owner.unwrap_or_default()
                        );
                    }
                    if finished.is_some() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            recovery = resumed;
            let stats = stack.sim.stats();
            let calls: u64 = stats.calls_per_chat.values().sum();
            let missing: i64 = sqlx::query_scalar(
                "select count(*) from chats c left join chat_participants p on p.chat_id = c.id \
                 where p.participants_updated_at is null",
            )
            .fetch_one(&stack.db)
            .await?;
            notes.push_str(&format!(
                "; sweep finished with {missing} chats never refreshed, {calls} MAX calls for {} chats",
                CHATS + MANUAL_CHATS
            ));
        }
        Drill::RateLimit => {
            stack.sim.update(|c| c.rate_limit = 2);
            tokio::time::sleep(Duration::from_secs(15)).await;
            stack.sim.update(|c| c.rate_limit = RPS);
            let since = Instant::now();
            recovery = wait_recovered(&sent, since, Duration::from_secs(120)).await;
            notes = format!("{} answers were 429", stack.sim.stats().rate_limited);
        }
        Drill::MaxOutage => {
            stack.sim.update(|c| c.error_rate = 1.0);
            tokio::time::sleep(Duration::from_secs(60)).await;
            stack.sim.update(|c| c.error_rate = 0.0);
            let since = Instant::now();
            recovery = wait_recovered(&sent, since, Duration::from_secs(120)).await;
            notes = format!("{} answers were 5xx", stack.sim.stats().errors);
        }
        Drill::MaxSlow => {
            stack.sim.update(|c| c.latency_ms = 5_000);
            tokio::time::sleep(Duration::from_secs(20)).await;
            stack.sim.update(|c| c.latency_ms = LATENCY_MS);
            let since = Instant::now();
            recovery = wait_recovered(&sent, since, Duration::from_secs(120)).await;
        }
    }
    // A little load after recovery, then stop and let in-flight requests answer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Drain: every acknowledged refresh must show a count no older than its request.
    let acknowledged = acknowledged(&sent);
    let lost = lost_after_drain(&stack, &acknowledged, Duration::from_secs(90))
        .await?
        .len();
    let dead: u64 = match stack.redis_client().await {
        Ok(client) => client
            .xlen(shared::keys::REFRESH_STREAM_DEAD)
            .await
            .unwrap_or(0),
        Err(_) => 0,
    };
    if dead > 0 {
        notes.push_str(&format!("; {dead} stream entries dead-lettered"));
    }
    let sent = sent.lock().unwrap();
    if sent.is_empty() {
        bail!("no manual refresh was sent");
    }
    let mut refused: std::collections::BTreeMap<u16, usize> = std::collections::BTreeMap::new();
    for s in sent.iter().filter(|s| s.status != 200 && s.status != 202) {
        *refused.entry(s.status).or_default() += 1;
    }
    if !refused.is_empty() {
        let list: Vec<String> = refused
            .iter()
            .map(|(status, n)| {
                if *status == 0 {
                    format!("{n} no answer")
                } else {
                    format!("{n} answered {status}")
                }
            })
            .collect();
        notes.push_str(&format!("; refused: {}", list.join(", ")));
    }
    Ok(Row {
        reads: counters.reads.load(Ordering::Relaxed),
        reads_failed: counters.reads_failed.load(Ordering::Relaxed),
        sent: sent.len(),
        refused: sent
            .iter()
            .filter(|s| s.status != 200 && s.status != 202)
            .count(),
        accepted: acknowledged.len(),
        lost,
        recovery,
        notes,
    })
}
