//! `bench read`: the api's read path on 150,000 chats in the legacy schema, with wrk at 64
//! connections, against pgbench running the legacy page SQL directly (the baseline, same run):
//! pages, searches, search as you type, a legacy rename under load, Postgres stopped, Redis
//! killed, start-up with the read model's load, and memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fred::prelude::*;
use shared::counts::{write_fenced, CachedCount};

use crate::stack::{sibling, JWT_SECRET};

/// The page query of `GET /chats/all` for a super_admin, default sort, no search, as the api
/// sent it to Postgres per request before the read model (its best SQL: a deferred join over
/// the sort index), as a pgbench script with a random offset in the first 10,000 rows.
const PAGE_SQL: &str = "\\set off random(0, 9950)\n\
select t.total, c.*, p.participants_updated_at, p.sync_status from (select coalesce(sum(n), 0)::bigint as total from chat_totals) t \
left join lateral (select id, name, url, max_chat_id, external_chat_id, participants_count, university_id, department, source, created_at, updated_at \
from chats where id in (select id from chats where true order by name asc, id asc limit 50 offset :off)) c on true \
left join chat_participants p on p.chat_id = c.id order by c.name asc, c.id asc;\n";

pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub requests: u64,
}

fn parse_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Some(v) = text.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(v) = text.strip_suffix("ms") {
        return v.parse().ok();
    }
    text.strip_suffix('s')
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v * 1000.0)
}

/// Runs wrk with a Lua script for `path_expr` (a Lua expression building the path).
pub fn wrk(
    port: u16,
    path_expr: &str,
    token: &str,
    seconds: u64,
    connections: u32,
    dir: &Path,
) -> anyhow::Result<WrkResult> {
    let script = dir.join("bench.lua");
    std::fs::write(
        &script,
        format!(
            "math.randomseed(42)\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n\
             request = function()\n  return wrk.format(\"GET\", {path_expr})\nend\n"
        ),
    )?;
    wrk_script(port, &script, seconds, connections)
}

/// Runs wrk with the Lua `script` (its `request` builds each request) on 2 threads.
pub fn wrk_script(
    port: u16,
    script: &Path,
    seconds: u64,
    connections: u32,
) -> anyhow::Result<WrkResult> {
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .context("wrk runs (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut result = WrkResult {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        non_2xx: 0,
        requests: 0,
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            result.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            result.p50_ms = parse_ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("99%") {
            result.p99_ms = parse_ms(v).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = v.trim().parse().unwrap_or(0);
        } else if line.contains("requests in") {
            result.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if result.requests == 0 {
        bail!(
            "wrk measured nothing:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(result)
}

fn pgbench(
    pg: &testkit::PgServer,
    clients: u32,
    seconds: u64,
    dir: &Path,
) -> anyhow::Result<(f64, f64)> {
    let script = dir.join("page.sql");
    std::fs::write(&script, PAGE_SQL)?;
    let output = Command::new(testkit::pg_bin_dir()?.join("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg("postgres")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut tps = 0.0;
    let mut latency = 0.0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("tps = ") {
            tps = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("latency average = ") {
            latency = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        }
    }
    if tps == 0.0 {
        bail!(
            "pgbench measured nothing:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((tps, latency))
}

fn spawn_api(
    pg: &testkit::PgServer,
    redis_url: &str,
    port: u16,
    dir: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("api-{port}.log")))?;
    Ok(Command::new(sibling("api")?)
        .arg("serve")
        .args(["--listen-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", pg.url())
        .env("REDIS_URL", redis_url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("LOG_LEVEL", "info")
        // wrk sends as one caller what stands for 64 users of the admin panel; the per-caller
        // rate of costly searches would answer most of them 429 (`bench read
        // --hostile-searches` measures that bound). Latency here is the searches' own.
        .env("API_COSTLY_SEARCHES_PER_USER_PER_MINUTE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

async fn wait_for_200(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(response) = http.get(url).bearer_auth(token).send().await {
            if response.status() == 200 {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > deadline {
            bail!("{url} did not answer 200 within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `participants_cache_local_pages_total` of the api on `port` (0 before the metric existed).
async fn local_pages(http: &reqwest::Client, port: u16) -> f64 {
    let Ok(response) = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("participants_cache_local_pages_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
        })
        .unwrap_or(0)
}

/// `chats` rows as the legacy service wrote them (a group's name, a department, a source, two or
/// three administrators each, as its Excel import requires at least two), with a synced count
/// each, analysed.
pub async fn seed_chats(db: &sqlx::PgPool, chats: i32) -> anyhow::Result<()> {
    insert_in_bulk(
        db,
        "insert into chats (name, url, max_chat_id, participants_count, university_id, department, source, external_chat_id) \
         select (array['Математика','Физика','История','Информатика','Химия','Биология','Право','Экономика'])[1 + g % 8] \
                || ' ' || (2019 + g % 7) || ' группа ' || g, \
                'https://max.ru/join/' || md5(g::text), (-70000000000000 - g)::text, 5 + g % 300, 1 + g % 40, \
                (array['Мехмат','Физфак','Истфак','ВМК','Химфак','Биофак','Юрфак', null])[1 + g % 8], \
                (array['admin_panel','bot_registrar','academic_group'])[1 + g % 3], 'ext-' || g \
         from generate_series(1, $1) g",
        chats,
    )
    .await?;
    sqlx::query(
        "insert into administrators (chat_id, phone, max_id, add_user, add_admin) \
         select c.id, '+7900' || lpad((c.id * 3 + k)::text, 7, '0'), \
                case when k < 2 then (100000000 + c.id * 3 + k)::text end, true, k = 0 \
         from chats c cross join lateral generate_series(0, 1 + c.id % 2) k",
    )
    .execute(db)
    .await?;
    sqlx::query(
        "insert into chat_participants (chat_id, participants_count, participants_updated_at, sync_status, checked_at) \
         select id, participants_count, now(), 'active', now() from chats",
    )
    .execute(db)
    .await?;
    sqlx::query("vacuum analyze chats").execute(db).await?;
    sqlx::query("vacuum analyze administrators")
        .execute(db)
        .await?;
    sqlx::query("vacuum analyze chat_participants")
        .execute(db)
        .await?;
    Ok(())
}

/// Runs one `insert into chats … select … from generate_series(1, $1)` without the per-row
/// triggers (chat_totals' upsert of one row per university, the api's notify), which make a
/// 1,500,000-row insert take hours; nothing listens yet. The totals are counted once after.
pub async fn insert_in_bulk(db: &sqlx::PgPool, insert: &str, rows: i32) -> anyhow::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("set local session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    sqlx::query(insert).bind(rows).execute(&mut *tx).await?;
    sqlx::query("delete from chat_totals")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "insert into chat_totals (scope_key, n) \
         select chat_totals_key(university_id), count(*) from chats group by 1",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn run(chats: i32, seconds: u64, connections: u32) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let pg = testkit::PgServer::start();
    let mut redis = testkit::RedisServer::start();
    let db = sqlx::PgPool::connect(&pg.url()).await?;
    shared::db::MIGRATOR.run(&db).await?;
    eprintln!("bench read: loading {chats} chats");
    seed_chats(&db, chats).await?;
    // Every count fresh in Redis, as after a full sweep.
    let client = Client::new(Config::from_url(&redis.url())?, None, None, None);
    client.init().await?;
    let now = chrono::Utc::now();
    let ids: Vec<i32> = sqlx::query_scalar("select id from chats order by id")
        .fetch_all(&db)
        .await?;
    for chunk in ids.chunks(2000) {
        let entries: Vec<(i32, CachedCount)> = chunk
            .iter()
            .map(|id| {
                (
                    *id,
                    CachedCount {
                        count: 42,
                        updated_at: now,
                    },
                )
            })
            .collect();
        write_fenced(&client, &entries, Duration::from_secs(3600)).await?;
    }
    let used: String = client.info(Some(fred::types::InfoKind::Memory)).await?;
    let used_memory = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);

    let token = crate::stack::admin_token()?;
    let http = reqwest::Client::new();

    // Cold start: process start to the first 200 of a page, which waits for the read model's
    // load of every chat.
    let cold_port = testkit::free_port();
    let started = Instant::now();
    let mut cold = spawn_api(&pg, &redis.url(), cold_port, &dir)?;
    wait_for_200(
        &http,
        &format!("http://127.0.0.1:{cold_port}/chats/all"),
        &token,
        Duration::from_secs(60),
    )
    .await?;
    let cold_start = started.elapsed();
    let _ = cold.kill();
    let _ = cold.wait();

    let port = testkit::free_port();
    let mut api = spawn_api(&pg, &redis.url(), port, &dir)?;
    wait_for_200(
        &http,
        &format!("http://127.0.0.1:{port}/chats/all"),
        &token,
        Duration::from_secs(60),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_loaded = rss_kib(api.id(), "VmRSS:");
    eprintln!("bench read: api logs in {}", dir.display());

    eprintln!("bench read: pgbench baseline");
    let (pg_tps, pg_latency) = pgbench(&pg, 16, seconds, &dir)?;
    let sampler = RssSampler::start(api.id());
    eprintln!("bench read: wrk");
    let page_path = "\"/chats/all?limit=50&offset=\" .. math.random(0, 9950)";
    let local_before = local_pages(&http, port).await;
    let page = wrk(port, page_path, &token, seconds, connections, &dir)?;
    let page_local = local_pages(&http, port).await - local_before;
    eprintln!(
        "bench read: api VmRSS after pages {} KiB",
        rss_kib(api.id(), "VmRSS:")
    );
    // Names look like "Физика 2021 группа 12345": a group number is a rare word, a subject a
    // common one (1 chat in 8), a subject and a year two common ones (1 in 56 together).
    let searches = [
        ("search, one word, rare (a group number)", "\"/chats/all?limit=50&search=\" .. math.random(1, 150000)"),
        ("search, one word, common (a subject)", "\"/chats/all?limit=50&search=%D0%A4%D0%B8%D0%B7%D0%B8%D0%BA%D0%B0\""),
        ("search, two words (a subject and a year)", "\"/chats/all?limit=50&search=%D0%A4%D0%B8%D0%B7%D0%B8%D0%BA%D0%B0%20\" .. (2019 + math.random(0, 6))"),
        ("search as you type (a random chat's name, 1 to 4 words, the last one cut)", TYPING),
    ];
    let mut search_results = Vec::new();
    for (label, path) in searches {
        search_results.push((label, wrk(port, path, &token, seconds, connections, &dir)?));
        eprintln!(
            "bench read: api VmRSS after {label}: {} KiB",
            rss_kib(api.id(), "VmRSS:")
        );
    }

    eprintln!("bench read: legacy renames under load");
    let renames = renames_under_load(&db, &http, port, &token, seconds, connections, &dir).await?;
    eprintln!(
        "bench read: api VmRSS after renames {} KiB",
        rss_kib(api.id(), "VmRSS:")
    );

    eprintln!("bench read: Postgres stopped");
    let mut pg = pg;
    pg.stop();
    let pg_down = wrk(port, page_path, &token, seconds, connections, &dir)?;
    let pg_down_search = wrk(port, searches[0].1, &token, seconds, connections, &dir)?;
    pg.start_again();
    let rss_under_load = sampler.stop();
    let rss_peak = rss_kib(api.id(), "VmHWM:");

    eprintln!("bench read: Redis down");
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redis_down = wrk(port, page_path, &token, seconds, connections, &dir)?;
    let _ = api.kill();
    let _ = api.wait();

    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!("\nRead path: {chats} chats, wrk -t2 -c{connections} -d{seconds}s; baseline pgbench -c16 -j2 -T{seconds} with the legacy page SQL, same run\n");
    println!("| what | rps | p50 | p99 | non-2xx | target | result |");
    println!("|---|---|---|---|---|---|---|");
    println!("| pgbench, page SQL (baseline) | {pg_tps:.0} TPS | avg {pg_latency:.2} ms | - | - | - | - |");
    println!(
        "| GET /chats/all?limit=50, offset 0..10000 | {:.0} | {:.2} ms | {:.2} ms | {} | ≥3x baseline, p99 ≤25 ms, ≥0.8x the Redis-killed row | {:.2}x baseline, {:.2}x Redis killed, {} |",
        page.rps, page.p50_ms, page.p99_ms, page.non_2xx, page.rps / pg_tps, page.rps / redis_down.rps,
        met(page.rps >= 3.0 * pg_tps && page.p99_ms <= 25.0 && page.rps >= 0.8 * redis_down.rps)
    );
    for (label, result) in &search_results {
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {} | p99 ≤50 ms, 0 non-2xx | {} |",
            result.rps,
            result.p50_ms,
            result.p99_ms,
            result.non_2xx,
            met(result.p99_ms <= 50.0 && result.non_2xx == 0)
        );
    }
    for (label, result) in [
        ("page, Postgres stopped", &pg_down),
        ("search (rare word), Postgres stopped", &pg_down_search),
    ] {
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {} | 0 non-2xx | {} |",
            result.rps,
            result.p50_ms,
            result.p99_ms,
            result.non_2xx,
            met(result.non_2xx == 0)
        );
    }
    println!(
        "| page, Redis killed | {:.0} | {:.2} ms | {:.2} ms | {} | ≥0.8x healthy, 0 non-2xx | {:.2}x, {} |",
        redis_down.rps, redis_down.p50_ms, redis_down.p99_ms, redis_down.non_2xx, redis_down.rps / page.rps,
        met(redis_down.rps >= 0.8 * page.rps && redis_down.non_2xx == 0)
    );
    println!("\n| what | measured | target | result |");
    println!("|---|---|---|---|");
    println!(
        "| pages served from the api's memory, no Redis command (`participants_cache_local_pages_total`) | {:.0} of {} ({:.1} %) | - | - |",
        page_local,
        page.requests,
        100.0 * page_local / page.requests.max(1) as f64
    );
    println!(
        "| legacy `update chats set name = …` to served, under page load ({} renames) | p50 {:.0} ms, max {:.0} ms | ≤1 s | {} |",
        renames.len(),
        percentile(&renames, 0.5),
        percentile(&renames, 1.0),
        met(percentile(&renames, 1.0) <= 1000.0)
    );
    println!(
        "| cold start to first 200 (loads all {chats} chats) | {:.0} ms | ≤5 s | {} |",
        cold_start.as_secs_f64() * 1000.0,
        met(cold_start <= Duration::from_secs(5))
    );
    println!(
        "| api RSS after the load, idle (VmRSS) | {:.1} MB | - | - |",
        rss_loaded as f64 / 1024.0
    );
    // The 128 MB budget of the chats, plus their administrators packed (two or three a chat,
    // about 50 bytes each and one allocation a chat: some 24 MB at 150,000 chats).
    println!(
        "| api RSS under load (largest VmRSS, sampled every 100 ms through the loads above) | {:.1} MB | ≤152 MB (128 MB + 24 MB of administrators) | {} |",
        rss_under_load as f64 / 1024.0,
        met(rss_under_load <= 152 * 1024)
    );
    println!(
        "| api peak RSS since start, including the load of every chat (VmHWM) | {:.1} MB | - | - |",
        rss_peak as f64 / 1024.0
    );
    println!(
        "| Redis used_memory per cached chat | {:.1} B ({} B for {} chats, incl. Redis' own ~1 MB) | ≤100 B | {} |",
        used_memory as f64 / f64::from(chats),
        used_memory,
        chats,
        met(used_memory as f64 / f64::from(chats) <= 100.0)
    );
    Ok(())
}

/// A random chat's name as someone types it: its first 1 to 4 words, the last one cut short
/// when it is a number. Every request is a different query, so the api's cache of recent
/// words helps only as much as it would for real typing.
const TYPING: &str = "(function()\n\
  local subjects = {'%D0%9C%D0%B0%D1%82%D0%B5%D0%BC%D0%B0%D1%82%D0%B8%D0%BA%D0%B0', '%D0%A4%D0%B8%D0%B7%D0%B8%D0%BA%D0%B0', '%D0%98%D1%81%D1%82%D0%BE%D1%80%D0%B8%D1%8F', '%D0%98%D0%BD%D1%84%D0%BE%D1%80%D0%BC%D0%B0%D1%82%D0%B8%D0%BA%D0%B0', '%D0%A5%D0%B8%D0%BC%D0%B8%D1%8F', '%D0%91%D0%B8%D0%BE%D0%BB%D0%BE%D0%B3%D0%B8%D1%8F', '%D0%9F%D1%80%D0%B0%D0%B2%D0%BE', '%D0%AD%D0%BA%D0%BE%D0%BD%D0%BE%D0%BC%D0%B8%D0%BA%D0%B0'}\n\
  local g = math.random(1, 150000)\n\
  local words = {subjects[1 + g % 8], tostring(2019 + g % 7), '%D0%B3%D1%80%D1%83%D0%BF%D0%BF%D0%B0', tostring(g)}\n\
  local n = math.random(1, 4)\n\
  local typed = {}\n\
  for i = 1, n do typed[i] = words[i] end\n\
  if n == 2 or n == 4 then local w = typed[n]; typed[n] = string.sub(w, 1, math.random(1, #w)) end\n\
  return '/chats/all?limit=50&search=' .. table.concat(typed, '%20')\n\
end)()";

/// The largest resident set a process reaches while it runs, sampled every 100 ms.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut largest = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                largest = largest.max(rss_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            largest
        });
        Self { stop, thread }
    }

    /// Stops sampling; the largest VmRSS seen, in KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at]
}

/// Renames chats in Postgres, as the legacy chat-service would, while wrk loads the api with
/// pages, and measures each rename's delay until `GET /chats/{id}` serves the new name.
async fn renames_under_load(
    db: &sqlx::PgPool,
    http: &reqwest::Client,
    port: u16,
    token: &str,
    seconds: u64,
    connections: u32,
    dir: &Path,
) -> anyhow::Result<Vec<f64>> {
    let load_dir = dir.join("rename-load");
    std::fs::create_dir_all(&load_dir)?;
    let load_token = token.to_owned();
    let load = std::thread::spawn(move || {
        wrk(
            port,
            "\"/chats/all?limit=50&offset=\" .. math.random(0, 9950)",
            &load_token,
            seconds,
            connections,
            &load_dir,
        )
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut delays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds.saturating_sub(2).max(1));
    let mut round = 0;
    while Instant::now() < deadline {
        round += 1;
        let id: i32 = 1 + (round * 7919) % 150_000;
        let name = format!("Переименован {round}");
        let written = Instant::now();
        sqlx::query("update chats set name = $1 where id = $2")
            .bind(&name)
            .bind(id)
            .execute(db)
            .await?;
        loop {
            let chat: serde_json::Value = http
                .get(format!("http://127.0.0.1:{port}/chats/{id}"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            if chat["name"] == name.as_str() {
                delays.push(written.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if written.elapsed() > Duration::from_secs(30) {
                bail!("rename of chat {id} not served within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.join().expect("wrk thread")?;
    Ok(delays)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bench-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
