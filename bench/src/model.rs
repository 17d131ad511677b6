//! `bench model`: how changes reach the api's read model, for this build's `api` and, with
//! `--old-api`, another build's on the same data in the same run: read latency (pages and
//! `/health`, two clients) and peak resident memory through a full reload (the notification a
//! TRUNCATE sends) and through a 50,000-row legacy rename, and new rows per second visible.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::stack::{sibling, JWT_SECRET};

/// One build's figures.
struct Figures {
    label: String,
    loaded_rss_mb: f64,
    reload: Phase,
    rename: Phase,
    inserts_per_second: f64,
    inserts_lag_ms: f64,
}

/// What the readers saw during one change, and the api's largest VmRSS meanwhile.
struct Phase {
    duration_ms: f64,
    /// How long the change's own statement took in Postgres (0 for a notification alone).
    statement_ms: f64,
    reads: usize,
    p99_ms: f64,
    max_ms: f64,
    peak_rss_mb: f64,
}

pub async fn run(chats: i32, api: Option<PathBuf>, old_api: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("bench-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let db = sqlx::PgPool::connect(&pg.url()).await?;
    shared::db::MIGRATOR.run(&db).await?;
    eprintln!("bench model: loading {chats} chats");
    crate::read::seed_chats(&db, chats).await?;
    let api = match api {
        Some(api) => api,
        None => sibling("api")?,
    };
    let mut builds = vec![(format!("new ({})", api.display()), api)];
    if let Some(old) = old_api {
        builds.insert(0, (format!("old ({})", old.display()), old));
    }
    let mut figures = Vec::new();
    for (label, binary) in builds {
        eprintln!("bench model: {label}");
        figures.push(measure(&label, &binary, &pg, &redis.url(), &db, chats, &dir).await?);
    }
    println!("\n## bench model: {chats} chats, two clients reading pages and /health\n");
    println!("| build | VmRSS loaded | full reload: p99 / worst read, peak VmRSS | rename of every third row: p99 / worst read, peak VmRSS, served after (the UPDATE itself) | new rows visible per second (lag of the last) |");
    println!("|---|---|---|---|---|");
    for f in &figures {
        println!(
            "| {} | {:.0} MB | {:.1} / {:.0} ms, {:.0} MB ({} reads in {:.0} ms) | {:.1} / {:.0} ms, {:.0} MB, {:.0} ms (UPDATE {:.0} ms; {} reads) | {:.0}/s ({:.0} ms) |",
            f.label,
            f.loaded_rss_mb,
            f.reload.p99_ms,
            f.reload.max_ms,
            f.reload.peak_rss_mb,
            f.reload.reads,
            f.reload.duration_ms,
            f.rename.p99_ms,
            f.rename.max_ms,
            f.rename.peak_rss_mb,
            f.rename.duration_ms,
            f.rename.statement_ms,
            f.rename.reads,
            f.inserts_per_second,
            f.inserts_lag_ms,
        );
    }
    println!("\nTargets (issue 19): during the rename, read p99 ≤ 20 ms and worst ≤ 100 ms; peak VmRSS within the pod limit (k8s/base/api.yaml).");
    Ok(())
}

async fn measure(
    label: &str,
    binary: &Path,
    pg: &testkit::PgServer,
    redis_url: &str,
    db: &sqlx::PgPool,
    chats: i32,
    dir: &Path,
) -> anyhow::Result<Figures> {
    let port = testkit::free_port();
    let mut api = spawn(binary, pg, redis_url, port, dir)?;
    let token = crate::stack::admin_token()?;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while !ok(&http, &format!("{base}/chats/all?limit=1"), &token).await {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("{label}: the api did not load within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = api.id();
    let loaded_rss_mb = rss_mb(pid);

    // A full reload, as a TRUNCATE's notification asks for; done once the model's age is
    // fresh again after `read_model_rows_loaded_total{reason="full_load"}` has doubled.
    let reload = phase(&http, &base, &token, pid, || async {
        sqlx::query("select pg_notify('participants_chats_changed', '*')")
            .execute(db)
            .await?;
        let target = 2.0 * f64::from(chats);
        wait_until(Duration::from_secs(300), || async {
            full_loads(&http, &base).await >= target
        })
        .await?;
        Ok(0.0)
    })
    .await?;

    // The legacy bulk rename of a third of the table.
    let rename = phase(&http, &base, &token, pid, || async {
        let before: String = sqlx::query_scalar("select name from chats where id = 3")
            .fetch_one(db)
            .await?;
        let statement = Instant::now();
        sqlx::query("update chats set name = name || ' (архив)' where id % 3 = 0")
            .execute(db)
            .await?;
        let statement_ms = statement.elapsed().as_secs_f64() * 1000.0;
        let last: i32 = sqlx::query_scalar("select max(id) from chats where id % 3 = 0")
            .fetch_one(db)
            .await?;
        let want_first = format!("{before} (архив)");
        wait_until(Duration::from_secs(300), || async {
            name_of(&http, &base, &token, 3).await.as_deref() == Some(want_first.as_str())
                && name_of(&http, &base, &token, last)
                    .await
                    .is_some_and(|name| name.ends_with(" (архив)"))
        })
        .await?;
        Ok(statement_ms)
    })
    .await?;

    // New rows at a steady pace for 10 s, then until all are served.
    let n_before = total(&http, &base, &token).await;
    let started = Instant::now();
    let pace = Duration::from_millis(10);
    let mut inserted = 0u64;
    while started.elapsed() < Duration::from_secs(10) {
        sqlx::query(
            "insert into chats (name, url, max_chat_id, source, department) \
             values ('Новый ' || $1, 'https://max.ru/new/' || $1, '-71' || $1, 'admin_panel', 'ВМК')",
        )
        .bind(inserted as i64)
        .execute(db)
        .await?;
        inserted += 1;
        tokio::time::sleep(pace).await;
    }
    let written = started.elapsed();
    wait_until(Duration::from_secs(300), || async {
        total(&http, &base, &token).await >= n_before + inserted
    })
    .await?;
    let visible = started.elapsed();
    let inserts_per_second = inserted as f64 / visible.as_secs_f64();
    let inserts_lag_ms = (visible - written).as_secs_f64() * 1000.0;
    let _ = api.kill();
    let _ = api.wait();
    Ok(Figures {
        label: label.to_owned(),
        loaded_rss_mb,
        reload,
        rename,
        inserts_per_second,
        inserts_lag_ms,
    })
}

/// Runs `change` while two clients read (one pages, one `/health`) and VmRSS is sampled.
async fn phase<F, Fut>(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    pid: u32,
    change: F,
) -> anyhow::Result<Phase>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for path in ["/chats/all?limit=50&offset=", "/health"] {
        let (http, stop, token) = (http.clone(), stop.clone(), token.to_owned());
        let url = format!("{base}{path}");
        readers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let url = if url.ends_with('=') {
                    format!("{url}{}", (round * 7919) % 9950)
                } else {
                    url.clone()
                };
                let sent = Instant::now();
                let _ = http.get(&url).bearer_auth(&token).send().await;
                samples.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            samples
        }));
    }
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_mb(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let statement_ms = change().await?;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    sampling.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for reader in readers {
        samples.extend(reader.await?);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Phase {
        duration_ms,
        statement_ms,
        reads: samples.len(),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        peak_rss_mb: sampler.join().unwrap_or(0.0),
    })
}

async fn wait_until<F, Fut>(deadline: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > deadline {
            bail!("not done within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn ok(http: &reqwest::Client, url: &str, token: &str) -> bool {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn json(http: &reqwest::Client, url: &str, token: &str) -> Option<serde_json::Value> {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

async fn name_of(http: &reqwest::Client, base: &str, token: &str, id: i32) -> Option<String> {
    let chat = json(http, &format!("{base}/chats/{id}"), token).await?;
    chat["name"].as_str().map(str::to_owned)
}

async fn total(http: &reqwest::Client, base: &str, token: &str) -> u64 {
    json(http, &format!("{base}/chats/all?limit=1"), token)
        .await
        .and_then(|page| page["total"].as_u64())
        .unwrap_or(0)
}

async fn full_loads(http: &reqwest::Client, base: &str) -> f64 {
    let Ok(response) = http.get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| {
            line.strip_prefix("participants_read_model_rows_loaded_total{reason=\"full_load\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn spawn(
    binary: &Path,
    pg: &testkit::PgServer,
    redis_url: &str,
    port: u16,
    dir: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("api-{port}.log")))?;
    Command::new(binary)
        .arg("serve")
        .args(["--listen-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", pg.url())
        .env("REDIS_URL", redis_url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}
