//! `bench soak --profile month`: a month of a deployment's life compressed into `--minutes` of
//! wall time, against the real binaries, under the soak's load (readers, a manual refresh every
//! 250 ms). The calendar is compressed so that the run is 30 days: `PARTICIPANTS_INACTIVE_RECHECK`
//! (a week) passes about four times. The freshness settings and the sweep schedules are
//! compressed `--scale` times, as in the `faults` profile: a count must stay fresh for real.
//!
//! The population: 3% of the chats gone for good (each answers 404, 403, or status `removed` or
//! `left`), 2% the bot is not in yet (403 until they join, between a fifth and seven tenths of
//! the run), and three batches of new chats inserted into Postgres during the run, each joined a
//! quarter to three quarters of a recheck period after it arrives. On a script: a Postgres
//! outage and a MAX outage (every call 5xx), each longer than the redelivery budget
//! (`SYNCD_CLAIM_IDLE` × `SYNCD_MAX_DELIVERIES`); a phase of HTML pages and chats without a count
//! instead of chats; two lazy backlogs of thousands of entries with the manual refreshes in
//! them; both replicas restarted under their names. Then the soak measures what an operator
//! would ask: are the active chats' counts right, was an accepted refresh lost, what was
//! dead-lettered and why, how many MAX calls, and what syncd logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use maxsim::{Presence, SimConfig};
use shared::refresh::{Priority, RefreshRequest};

use super::{
    pending_after_drain, Deployment, Options, Timing, CLAIM_IDLE, LATENCY_MS, MAX_DELIVERIES, RPS,
};
use crate::drill::{self, block};

const MONTH: Duration = Duration::from_secs(30 * 86_400);
const WEEK: Duration = Duration::from_secs(7 * 86_400);
const GONE_PERMILLE: u32 = 30;
const NOT_JOINED_PERMILLE: u32 = 20;
/// Each batch of new chats, per mille of the chats at the start.
const NEW_CHATS_PERMILLE: i32 = 10;
/// How much longer than the redelivery budget each outage lasts.
const OUTAGE_MARGIN: Duration = Duration::from_secs(20);
/// Lazy entries per chat in a backlog.
const BACKLOG_PER_CHAT: usize = 5;
/// How long a backlog may take to drain before its phase moves on.
const BACKLOG_WAIT: Duration = Duration::from_secs(60);
const CONVERGE_BOUND: Duration = Duration::from_secs(120);
const DRAIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Phase {
    NewChats,
    PostgresOutage,
    MaxOutage,
    NotAChat,
    /// A lazy backlog; the replica, if any, restarted a few seconds into it.
    LazyBacklog(Option<usize>),
    ReplicaRestarted(usize),
}

/// When each phase starts, as a share of the run.
const SCRIPT: [(f64, Phase); 9] = [
    (0.04, Phase::NewChats),
    (0.08, Phase::PostgresOutage),
    (0.22, Phase::LazyBacklog(Some(0))),
    (0.32, Phase::NewChats),
    (0.36, Phase::MaxOutage),
    (0.50, Phase::NotAChat),
    (0.58, Phase::ReplicaRestarted(1)),
    (0.62, Phase::NewChats),
    (0.66, Phase::LazyBacklog(None)),
];

/// What the chats were at MAX when they came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Active,
    Gone,
    /// Not joined at the start, or new during the run: the bot joins them during the run.
    Joining,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Active => "active throughout",
            Kind::Gone => "gone for good",
            Kind::Joining => "joined during the run",
        }
    }
}

struct Month {
    deployment: Deployment,
    length: Duration,
    outage: Duration,
    started: Instant,
    /// `started` on the wall clock, for the times in the logs and stream ids.
    started_at: DateTime<Utc>,
    /// MAX requests the simulator had seen, sampled every second since `started`.
    timeline: Arc<Mutex<Vec<u64>>>,
    /// Every chat: `chats.id` to its MAX id and kind.
    chats: BTreeMap<i32, (i64, Kind)>,
    /// Chats inserted during the run so far.
    new_chats: i64,
    /// What happened: seconds into the run, the phase, a note.
    played: Vec<(f64, String, String)>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let length = Duration::from_secs_f64(options.minutes * 60.0);
    let timing = Timing {
        scale: options.scale,
        inactive_recheck: WEEK.mul_f64(length.as_secs_f64() / MONTH.as_secs_f64()),
    };
    let sim = SimConfig {
        removed_permille: GONE_PERMILLE,
        not_joined_permille: NOT_JOINED_PERMILLE,
        join_after_secs: Some(length.mul_f64(0.2).as_secs()),
        join_spread_secs: length.mul_f64(0.5).as_secs(),
        ..SimConfig::default()
    };
    let deployment = Deployment::start(options.chats, sim, timing).await?;
    let chats = deployment
        .max_ids
        .iter()
        .map(|(id, max_id)| {
            let kind = match deployment.stack.sim.presence_of(*max_id) {
                Presence::Active => Kind::Active,
                Presence::Gone(_) => Kind::Gone,
                Presence::NotJoined => Kind::Joining,
            };
            (*id, (*max_id, kind))
        })
        .collect();
    let mut month = Month {
        deployment,
        length,
        outage: CLAIM_IDLE * MAX_DELIVERIES + OUTAGE_MARGIN,
        started: Instant::now(),
        started_at: Utc::now(),
        timeline: Arc::new(Mutex::new(Vec::new())),
        chats,
        new_chats: 0,
        played: Vec::new(),
    };
    month.live(options.chats).await?;
    let report = month.measure().await?;
    month.print_header(&options);
    report.print();
    if !report.is_clean() {
        bail!("the month did not end cleanly (see the table)");
    }
    Ok(())
}

impl Month {
    /// Plays the script, each phase at its time (or at once after a late one), then waits out
    /// the month.
    async fn live(&mut self, chats_at_start: i32) -> anyhow::Result<()> {
        self.sample_timeline();
        for (share, phase) in SCRIPT {
            tokio::time::sleep_until((self.started + self.length.mul_f64(share)).into()).await;
            let at = self.started.elapsed().as_secs_f64();
            let title = self.title(phase);
            eprintln!("bench soak: {at:>4.0} s: {title}");
            let note = self.play(phase, chats_at_start).await?;
            self.played.push((at, title, note));
        }
        tokio::time::sleep_until((self.started + self.length).into()).await;
        eprintln!("bench soak: the month is over; waiting for convergence");
        Ok(())
    }

    fn title(&self, phase: Phase) -> String {
        let outage = self.outage.as_secs();
        match phase {
            Phase::NewChats => "new chats arrive, the bot not in them yet".to_owned(),
            Phase::PostgresOutage => format!("Postgres stopped for {outage} s"),
            Phase::MaxOutage => format!("MAX answering every call 5xx for {outage} s"),
            Phase::NotAChat => {
                "MAX answering an HTML page for 20 s, then chats without a count for 10 s"
                    .to_owned()
            }
            Phase::LazyBacklog(restart) => format!(
                "a lazy backlog of {BACKLOG_PER_CHAT} entries a chat{}",
                restart.map_or(String::new(), |i| format!(
                    ", {} restarted under its name in it",
                    self.deployment.replicas[i].0
                ))
            ),
            Phase::ReplicaRestarted(i) => format!(
                "{} SIGKILLed, restarted under its name",
                self.deployment.replicas[i].0
            ),
        }
    }

    async fn play(&mut self, phase: Phase, chats_at_start: i32) -> anyhow::Result<String> {
        let sim = self.deployment.stack.sim.clone();
        let before = sim.stats();
        match phase {
            Phase::NewChats => return self.new_chats(chats_at_start).await,
            Phase::PostgresOutage => {
                block(|| self.deployment.stack.pg.stop());
                tokio::time::sleep(self.outage).await;
                block(|| self.deployment.stack.pg.start_again());
            }
            Phase::MaxOutage => {
                sim.update(|c| c.error_rate = 1.0);
                tokio::time::sleep(self.outage).await;
                sim.update(|c| c.error_rate = 0.0);
                return Ok(format!(
                    "{} answers 5xx",
                    sim.stats().errors - before.errors
                ));
            }
            Phase::NotAChat => {
                sim.update(|c| c.not_a_chat_rate = 1.0);
                tokio::time::sleep(Duration::from_secs(20)).await;
                let health = self.health().await;
                sim.update(|c| (c.not_a_chat_rate, c.no_count_rate) = (0.0, 1.0));
                tokio::time::sleep(Duration::from_secs(10)).await;
                sim.update(|c| c.no_count_rate = 0.0);
                let answers = sim.stats().not_a_chat - before.not_a_chat;
                return Ok(format!(
                    "{answers} answers that are not a chat; /health/detailed after the HTML: {health}"
                ));
            }
            Phase::LazyBacklog(restart) => return self.lazy_backlog(restart).await,
            Phase::ReplicaRestarted(i) => {
                self.deployment.restart_replica(i).await?;
            }
        }
        Ok(String::new())
    }

    /// Inserts a batch of chats the bot is not in yet; each joins a quarter to three quarters
    /// of a recheck period later.
    async fn new_chats(&mut self, chats_at_start: i32) -> anyhow::Result<String> {
        let n = i64::from((chats_at_start * NEW_CHATS_PERMILLE / 1000).max(1));
        let first = self.new_chats + 1;
        self.new_chats += n;
        let recheck = self.deployment.timing.inactive_recheck;
        let max_id = |g: i64| -72_000_000_000_000 - g;
        for g in first..first + n {
            let share = 0.25 + 0.5 * (g - first) as f64 / n as f64;
            let joins_in = recheck.mul_f64(share);
            self.deployment
                .stack
                .sim
                .not_joined(max_id(g), Some(joins_in));
        }
        let ids: Vec<i32> = sqlx::query_scalar(
            "insert into chats (name, url, max_chat_id, participants_count, source) \
             select 'new chat ' || g, 'https://max.ru/join/n' || g, (-72000000000000 - g)::text, 0, 'bot_registrar' \
             from generate_series($1::bigint, $2::bigint) g order by g returning id",
        )
        .bind(first)
        .bind(first + n - 1)
        .fetch_all(&self.deployment.stack.db)
        .await?;
        for (id, g) in ids.iter().zip(first..) {
            self.chats.insert(*id, (max_id(g), Kind::Joining));
        }
        Ok(format!(
            "{n} chats; they join {:.0}-{:.0} s later",
            recheck.mul_f64(0.25).as_secs_f64(),
            recheck.mul_f64(0.75).as_secs_f64()
        ))
    }

    /// XADDs `BACKLOG_PER_CHAT` lazy entries for every chat at once, as the api's enqueue
    /// would for reads of many pages (without its dedup markers), then waits for the consumer
    /// group to work through them.
    async fn lazy_backlog(&mut self, restart: Option<usize>) -> anyhow::Result<String> {
        let client = self.deployment.stack.redis_client().await?;
        let pipeline = client.pipeline();
        let stream = Priority::Lazy.stream();
        let mut added = 0;
        for _ in 0..BACKLOG_PER_CHAT {
            for chat_id in self.chats.keys() {
                let request = RefreshRequest {
                    chat_id: *chat_id,
                    priority: Priority::Lazy,
                    enqueued_at: Utc::now(),
                    traceparent: None,
                };
                let cap = ("MAXLEN", "~", shared::refresh::STREAM_MAX_LEN as i64);
                let _: () = pipeline
                    .xadd(stream, false, cap, "*", request.to_fields())
                    .await?;
                added += 1;
            }
        }
        let _: Vec<Value> = pipeline.all().await?;
        let queued = Instant::now();
        let mut note = format!("{added} entries");
        if let Some(i) = restart {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let name = self.deployment.restart_replica(i).await?;
            note.push_str(&format!("; {name} restarted 3 s in"));
        }
        while queued.elapsed() < BACKLOG_WAIT {
            let group = syncd::stream::redis::group_info(&client, stream).await;
            if group.pending == Some(0) && group.lag == Some(0) {
                note.push_str(&format!(
                    "; worked through in {:.0} s",
                    queued.elapsed().as_secs_f64()
                ));
                return Ok(note);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let group = syncd::stream::redis::group_info(&client, stream).await;
        note.push_str(&format!(
            "; after {} s: {} pending, {} not yet read",
            BACKLOG_WAIT.as_secs(),
            group.pending.unwrap_or(-1),
            group.lag.unwrap_or(-1)
        ));
        Ok(note)
    }

    /// Samples the simulator's request count every second until the load stops.
    fn sample_timeline(&self) {
        let sim = self.deployment.stack.sim.clone();
        let timeline = self.timeline.clone();
        let stop = self.deployment.load.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let requests = sim.stats().requests;
                timeline.lock().unwrap().push(requests);
            }
        });
    }

    /// What the api's `/health/detailed` says of syncd and MAX.
    async fn health(&self) -> String {
        let url = format!("{}/health/detailed", self.deployment.api.base());
        let body: serde_json::Value = match self.deployment.stack.http.get(url).send().await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(error) => return format!("no answer ({error})"),
        };
        format!(
            "status {}, syncd.max_last_error {}",
            body["status"], body["syncd"]["max_last_error"]
        )
    }

    /// Seconds into the run of a moment on the wall clock.
    fn seconds_in(&self, at: DateTime<Utc>) -> f64 {
        (at - self.started_at).num_milliseconds() as f64 / 1000.0
    }

    fn print_header(&self, options: &Options) {
        let timing = &self.deployment.timing;
        let joining = self.count(Kind::Joining);
        println!(
            "\nSoak, month profile: {} chats at the start and {} new during the run, 2 syncd replicas \
             (stable names) and an api, MAX_API_RPS={RPS}, MAX latency {LATENCY_MS}-{} ms\n",
            options.chats,
            self.new_chats,
            LATENCY_MS * 2,
        );
        println!(
            "30 days in {:.0} s of wall time ({:.0}x): PARTICIPANTS_INACTIVE_RECHECK {} s (a week, passing \
             {:.1} times); freshness and schedules compressed {}x (stale threshold {}, stale sweep `{}`, \
             full sweep `{}`). Population: {} gone for good ({:.1}%), {joining} joining during the run \
             (not joined at the start, and the new ones). Redelivery budget SYNCD_CLAIM_IDLE {} s x \
             SYNCD_MAX_DELIVERIES {MAX_DELIVERIES} = {} s; each outage {} s.\n",
            self.length.as_secs_f64(),
            MONTH.as_secs_f64() / self.length.as_secs_f64(),
            timing.inactive_recheck.as_secs(),
            self.length.as_secs_f64() / timing.inactive_recheck.as_secs_f64(),
            timing.scale,
            timing.setting(3600),
            timing.stale_sweep_cron(),
            timing.full_sweep_cron(),
            self.count(Kind::Gone),
            100.0 * self.count(Kind::Gone) as f64 / options.chats as f64,
            CLAIM_IDLE.as_secs(),
            (CLAIM_IDLE * MAX_DELIVERIES).as_secs(),
            self.outage.as_secs(),
        );
        println!("| at | phase | notes |");
        println!("|---|---|---|");
        for (at, title, note) in &self.played {
            println!("| {at:.0} s | {title} | {note} |");
        }
    }

    fn count(&self, kind: Kind) -> usize {
        self.chats.values().filter(|(_, k)| *k == kind).count()
    }

    fn of_kind(&self, kind: Kind) -> Vec<(i32, i64)> {
        self.chats
            .iter()
            .filter(|(_, (_, k))| *k == kind)
            .map(|(id, (max_id, _))| (*id, *max_id))
            .collect()
    }
}

/// How many times something happened, and when first and last (seconds into the run).
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    n: usize,
    first_s: f64,
    last_s: f64,
}

impl Tally {
    fn add(&mut self, at_s: f64) {
        if self.n == 0 {
            self.first_s = at_s;
        }
        self.n += 1;
        self.first_s = self.first_s.min(at_s);
        self.last_s = self.last_s.max(at_s);
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:.0}-{:.0} s)", self.n, self.first_s, self.last_s)
    }
}

/// What the month ended with.
struct Report {
    /// Chats active at MAX at the end, whose cached count is MAX's, and how long that took.
    active: usize,
    converged: usize,
    converged_after: Option<Duration>,
    /// Of those, the chats that joined during the run.
    joined: usize,
    joined_converged: usize,
    gone: usize,
    gone_marked: usize,
    /// Manual refreshes by the api's answer (0: no answer).
    manual: BTreeMap<u16, usize>,
    /// Of those answered 200 or 202.
    accepted: usize,
    /// Accepted manual refreshes never done, by the kind of chat.
    lost: BTreeMap<Kind, usize>,
    pending: i64,
    /// Dead letters by reason and the stream they came from.
    dead: BTreeMap<(String, &'static str), Tally>,
    reads: u64,
    reads_failed: u64,
    /// MAX calls by the kind of chat: (chats, calls).
    calls: BTreeMap<Kind, (usize, u64)>,
    stats: maxsim::Stats,
    /// Stretches of at least `QUIET` without a single MAX call: (from, to) seconds into the run.
    quiet: Vec<(usize, usize)>,
    /// Sweeps finished, by kind.
    sweeps: Vec<(String, i64)>,
    /// syncd's warnings and errors by (level, message), the most frequent first.
    logged: Vec<((String, String), Tally)>,
}

/// The shortest stretch without MAX calls the report lists.
const QUIET: usize = 5;

impl Month {
    async fn measure(&self) -> anyhow::Result<Report> {
        let deployment = &self.deployment;
        let sim = &deployment.stack.sim;
        let client = deployment.stack.redis_client().await?;
        let active = || {
            self.chats
                .iter()
                .filter(|(_, (max_id, _))| sim.is_active(*max_id))
                .map(|(id, (max_id, _))| (*id, *max_id))
                .collect()
        };
        // A count older than PARTICIPANTS_CACHE_TTL is one the api no longer serves.
        let cache_ttl = deployment.timing.compressed(3600);
        let convergence = deployment
            .converge(&client, active, Some(cache_ttl), CONVERGE_BOUND)
            .await?;
        let joined: Vec<i32> = convergence
            .checked
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.chats[id].1 == Kind::Joining)
            .collect();
        deployment.load.cancel();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let acknowledged = drill::acknowledged(&deployment.sent);
        let mut lost = BTreeMap::new();
        for (chat_id, _) in drill::lost_after_drain(&deployment.stack, &acknowledged, DRAIN).await?
        {
            *lost.entry(self.chats[&chat_id].1).or_default() += 1;
        }
        let mut manual = BTreeMap::new();
        for sent in deployment.sent.lock().unwrap().iter() {
            *manual.entry(sent.status).or_default() += 1;
        }
        let gone = self.of_kind(Kind::Gone);
        let quiet = quiet_stretches(&self.timeline.lock().unwrap());
        Ok(Report {
            active: convergence.checked.len(),
            converged: convergence.right.len(),
            converged_after: convergence.after,
            joined: joined.len(),
            joined_converged: joined
                .iter()
                .filter(|id| convergence.right.contains(id))
                .count(),
            gone: gone.len(),
            gone_marked: self.marked_gone(&gone).await?,
            manual,
            accepted: acknowledged.len(),
            lost,
            pending: pending_after_drain(&client, DRAIN).await,
            dead: self.dead_letters(&client).await?,
            reads: deployment.counters.reads.load(Ordering::Relaxed),
            reads_failed: deployment.counters.reads_failed.load(Ordering::Relaxed),
            calls: self.calls_by_kind(),
            stats: sim.stats(),
            quiet,
            sweeps: self.sweeps_finished().await?,
            logged: self.logged()?,
        })
    }

    /// Chats of `gone` that Postgres shows with a non-active status.
    async fn marked_gone(&self, gone: &[(i32, i64)]) -> anyhow::Result<usize> {
        let ids: Vec<i32> = gone.iter().map(|(id, _)| *id).collect();
        let marked: i64 = sqlx::query_scalar(
            "select count(*) from chat_participants where chat_id = any($1) and sync_status <> 'active'",
        )
        .bind(&ids)
        .fetch_one(&self.deployment.stack.db)
        .await?;
        Ok(marked as usize)
    }

    async fn sweeps_finished(&self) -> anyhow::Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "select kind, count(*) filter (where finished_at is not null) from sync_sweeps \
             group by kind order by kind",
        )
        .fetch_all(&self.deployment.stack.db)
        .await?)
    }

    fn calls_by_kind(&self) -> BTreeMap<Kind, (usize, u64)> {
        let calls = self.deployment.stack.sim.stats().calls_per_chat;
        let mut by_kind: BTreeMap<Kind, (usize, u64)> = BTreeMap::new();
        for (max_id, kind) in self.chats.values() {
            let slot = by_kind.entry(*kind).or_default();
            slot.0 += 1;
            slot.1 += calls.get(max_id).copied().unwrap_or(0);
        }
        by_kind
    }

    /// The dead-letter stream's entries by their `reason` and the stream they came from, timed
    /// by their stream ids.
    async fn dead_letters(
        &self,
        client: &Client,
    ) -> anyhow::Result<BTreeMap<(String, &'static str), Tally>> {
        let entries: Vec<(String, HashMap<String, String>)> = client
            .xrange(shared::keys::REFRESH_STREAM_DEAD, "-", "+", None)
            .await?;
        let mut by_reason: BTreeMap<(String, &'static str), Tally> = BTreeMap::new();
        for (id, fields) in entries {
            let reason = fields.get("reason").cloned().unwrap_or_default();
            let manual = Priority::Manual.stream();
            let source = if fields.get("source_stream").map(String::as_str) == Some(manual) {
                "manual"
            } else {
                "lazy"
            };
            let ms: i64 = id.split('-').next().unwrap_or("0").parse().unwrap_or(0);
            let at = DateTime::from_timestamp_millis(ms).unwrap_or(self.started_at);
            by_reason
                .entry((reason, source))
                .or_default()
                .add(self.seconds_in(at));
        }
        Ok(by_reason)
    }

    /// syncd's warnings and errors in its JSON logs (every replica, every restart), by level
    /// and message, the most frequent first.
    fn logged(&self) -> anyhow::Result<Vec<((String, String), Tally)>> {
        let mut lines: HashMap<(String, String), Tally> = HashMap::new();
        for file in std::fs::read_dir(&self.deployment.stack.dir)? {
            let path = file?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !name.starts_with("syncd-") {
                continue;
            }
            for line in std::fs::read_to_string(&path)?.lines() {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let text = |field: &str| event[field].as_str().unwrap_or_default().to_owned();
                let level = text("level");
                if level != "WARN" && level != "ERROR" {
                    continue;
                }
                let at = DateTime::parse_from_rfc3339(&text("timestamp"))
                    .map_or(self.started_at, |at| at.with_timezone(&Utc));
                lines
                    .entry((level, text("message")))
                    .or_default()
                    .add(self.seconds_in(at));
            }
        }
        let mut lines: Vec<_> = lines.into_iter().collect();
        lines.sort_by(|a, b| b.1.n.cmp(&a.1.n).then_with(|| a.0.cmp(&b.0)));
        Ok(lines)
    }
}

/// Stretches of at least `QUIET` seconds in which the sampled request count did not move.
fn quiet_stretches(timeline: &[u64]) -> Vec<(usize, usize)> {
    let mut stretches = Vec::new();
    let mut from = 0;
    for second in 1..=timeline.len() {
        if second == timeline.len() || timeline[second] != timeline[from] {
            if second - 1 - from >= QUIET {
                stretches.push((from, second - 1));
            }
            from = second;
        }
    }
    stretches
}

impl Report {
    fn is_clean(&self) -> bool {
        self.converged_after.is_some()
            && self.lost.is_empty()
            && self.pending == 0
            && self.dead.is_empty()
            && self.stats.max_in_window <= RPS as usize
    }

    fn print(&self) {
        println!("\n| measure | result |");
        println!("|---|---|");
        println!(
            "| active chats whose cached count is MAX's, within PARTICIPANTS_CACHE_TTL | {} of {} ({}) |",
            self.converged,
            self.active,
            self.converged_after.map_or_else(
                || format!("not converged within {} s", CONVERGE_BOUND.as_secs()),
                |d| format!("converged {:.1} s after the month", d.as_secs_f64())
            )
        );
        println!(
            "| of them, chats that joined during the run | {} of {} |",
            self.joined_converged, self.joined
        );
        println!(
            "| chats gone for good shown gone in Postgres | {} of {} |",
            self.gone_marked, self.gone
        );
        println!("| manual refreshes | {} |", self.manual_refreshes());
        let lost: Vec<String> = self
            .lost
            .iter()
            .map(|(kind, n)| format!("{n} {}", kind.label()))
            .collect();
        println!(
            "| accepted (200/202) manual refreshes lost (never done) | {} of {}{} |",
            self.lost.values().sum::<usize>(),
            self.accepted,
            if lost.is_empty() {
                String::new()
            } else {
                format!(" ({})", lost.join(", "))
            }
        );
        println!("| entries dead-lettered (when) | {} |", self.dead_letters());
        println!("| stream entries left pending | {} |", self.pending);
        println!("| reads failed | {} of {} |", self.reads_failed, self.reads);
        println!("| MAX calls per chat | {} |", self.calls_per_chat());
        println!(
            "| most MAX calls in any one second | {} (MAX_API_RPS {RPS}) |",
            self.stats.max_in_window
        );
        let s = &self.stats;
        println!(
            "| MAX answers | {} chats, {} 5xx, {} 404, {} 403, {} not a chat |",
            s.ok, s.errors, s.not_found, s.denied, s.not_a_chat
        );
        let quiet: Vec<String> = self
            .quiet
            .iter()
            .map(|(a, b)| format!("{a}-{b} s"))
            .collect();
        println!(
            "| no MAX call at all for {QUIET} s or more | {} |",
            if quiet.is_empty() {
                "never".to_owned()
            } else {
                quiet.join(", ")
            }
        );
        let sweeps: Vec<String> = self
            .sweeps
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!("| sweeps finished | {} |", sweeps.join(", "));
        println!("\n| syncd warnings and errors (both replicas, every restart) | lines (first-last, s into the run) |");
        println!("|---|---|");
        for ((level, message), tally) in self.logged.iter().take(12) {
            println!("| {level} {} | {tally} |", message.replace('|', "/"));
        }
    }

    fn manual_refreshes(&self) -> String {
        let status = |code: u16| self.manual.get(&code).copied().unwrap_or(0);
        let sent: usize = self.manual.values().sum();
        let mut text = format!(
            "{sent} sent: {} answered 200 (done within PARTICIPANTS_REFRESH_WAIT), {} answered 202",
            status(200),
            status(202)
        );
        for (code, n) in &self.manual {
            match code {
                200 | 202 => {}
                0 => text.push_str(&format!(", {n} no answer")),
                code => text.push_str(&format!(", {n} answered {code}")),
            }
        }
        text
    }

    fn dead_letters(&self) -> String {
        if self.dead.is_empty() {
            return "none".to_owned();
        }
        let total: usize = self.dead.values().map(|tally| tally.n).sum();
        let reasons: Vec<String> = self
            .dead
            .iter()
            .map(|((reason, source), tally)| format!("{tally} {source}: {reason}"))
            .collect();
        format!("{total}: {}", reasons.join("; "))
    }

    fn calls_per_chat(&self) -> String {
        let (chats, calls) = self
            .calls
            .values()
            .fold((0, 0), |(c, n), (chats, calls)| (c + chats, n + calls));
        let mut text = format!(
            "{:.2} ({calls} accepted calls for {chats} chats",
            calls as f64 / chats.max(1) as f64,
        );
        for (kind, (chats, calls)) in &self.calls {
            text.push_str(&format!(
                "; {}: {:.2}",
                kind.label(),
                *calls as f64 / (*chats).max(1) as f64
            ));
        }
        text.push(')');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_stretches_are_runs_of_an_unchanged_count() {
        let timeline = [0, 5, 5, 5, 5, 5, 5, 9, 9, 12, 12, 12, 12, 12, 12, 12];
        assert_eq!(quiet_stretches(&timeline), [(1, 6), (9, 15)]);
        assert_eq!(quiet_stretches(&[1, 2, 3]), []);
        assert_eq!(quiet_stretches(&[]), []);
    }
}
