//! `bench`: measured figures, printed as tables. Every run starts its own Redis, Postgres and
//! MAX simulator on loopback, so the numbers come from this machine, now.
//!
//! `bench sweep`: a full sweep against the simulator; reports the duration against the ideal
//! N / rate, the achieved MAX call rate as a share of the configured one, calls per chat and
//! 429s.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use maxsim::{SimConfig, Simulator};
use shared::config::parse_duration;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the participants service, printed as tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

mod drill;
mod fresh;
mod model;
mod read;
mod read_hostile;
mod restart;
mod shutdown;
mod soak;
mod stack;
mod sync;

#[derive(Subcommand)]
enum Bench {
    /// The api's read path on N chats with wrk, against pgbench on the same SQL
    Read {
        #[arg(long, default_value_t = 150_000)]
        chats: i32,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        connections: u32,
        /// Instead: a normal page's p99 while 8 clients send worst-case searches (16 random
        /// two-character words each), against the page alone, on a whole deployment
        #[arg(long)]
        hostile_searches: bool,
    },
    /// The read model under changes: read latency and peak memory through a full reload and a
    /// 50,000-row rename, and new rows per second visible; with --old-api, another build's
    /// figures on the same data first
    Model {
        #[arg(long, default_value_t = 150_000)]
        chats: i32,
        /// The `api` binary to measure (default: the one beside this bench binary)
        #[arg(long)]
        api: Option<std::path::PathBuf>,
        /// Another build's `api` binary to measure first, e.g. the previous release's
        #[arg(long)]
        old_api: Option<std::path::PathBuf>,
    },
    /// Reads across an api restart: pages asked for as soon as the new process answers
    /// /health, during its first load, against the same reads before the restart
    Restart {
        #[arg(long, default_value_t = 150_000)]
        chats: i32,
    },
    /// SIGTERM to a busy syncd with MAX up, MAX down and Redis down: time to exit against the
    /// grace period, and MAX calls after the signal
    Shutdown,
    /// Fault drills under load, one row each: Redis, Postgres and syncd killed, a 429 storm,
    /// a 60 s MAX outage, MAX answering in 5 s
    Drill {
        /// Drills to run, in order
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "redis,postgres,syncd,rate-limit,max-outage,max-slow"
        )]
        only: Vec<drill::Drill>,
    },
    /// Soak: the whole deployment under load for minutes while faults are injected (in a seeded
    /// random order, or a month's script), then convergence: every cached count right, nothing
    /// pending, lost or dead-lettered, the MAX rate never exceeded
    Soak {
        /// faults: random faults in a seeded order; month: a month of a deployment's life
        /// (chats gone for good, joining and new; rechecks; outages past the redelivery budget;
        /// answers that are not a chat; lazy backlogs; restarts), compressed into --minutes
        #[arg(long, value_enum, default_value = "faults")]
        profile: soak::Profile,
        #[arg(long, default_value_t = 3000)]
        chats: i32,
        /// Wall minutes of faults (of the month, with --profile month)
        #[arg(long, default_value_t = 6.0)]
        minutes: f64,
        /// How many times faster than real time the freshness settings and sweep schedules run
        /// (60: the stale threshold's hour is a minute; 1008: a week is 10 minutes)
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        scale: u64,
        #[arg(long, default_value_t = 20261203)]
        seed: u64,
    },
    /// Freshness under the MAX budget: a time-scaled simulation of this service and of the seed
    /// design side by side, with Zipf reads and churn
    Fresh {
        #[arg(long, default_value_t = 150_000)]
        chats: i32,
        /// Time runs this many times faster; the MAX budget is multiplied by it
        #[arg(long, default_value_t = 60.0)]
        scale: f64,
        /// MAX calls a second in real time (MAX_API_RPS before scaling)
        #[arg(long, default_value_t = 30.0)]
        budget_rps: f64,
        /// Chat reads an hour in real time
        #[arg(long, default_value_t = 12_000.0)]
        reads_per_hour: f64,
        /// Scaled hours to run; the first warms up
        #[arg(long, default_value_t = 3.0)]
        hours: f64,
        #[arg(long, default_value_t = 1.1)]
        zipf: f64,
        #[arg(long, default_value = "30ms", value_parser = parse_duration)]
        latency: Duration,
    },
    /// The sync path with the real binaries: full sweeps with 1 and 3 replicas, lazy refresh
    /// latency, refresh-and-wait latency
    Sync {
        #[arg(long, default_value_t = 30_000)]
        chats: i32,
        #[arg(long, default_value_t = 300.0)]
        rps: f64,
        #[arg(long, default_value = "30ms", value_parser = parse_duration)]
        latency: Duration,
        /// Uniform jitter added to the simulator's latency
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        jitter: Duration,
        /// Replica counts to sweep with, one row each
        #[arg(long, value_delimiter = ',', default_value = "1,3")]
        replicas: Vec<u32>,
        /// Samples of each latency
        #[arg(long, default_value_t = 200)]
        samples: u32,
    },
    /// A full sweep of N chats at MAX_API_RPS against the simulator with a fixed latency,
    /// in this process
    Sweep {
        #[arg(long, default_value_t = 3000)]
        chats: i32,
        #[arg(long, default_value_t = 100.0)]
        rps: f64,
        #[arg(long, default_value = "50ms", value_parser = parse_duration)]
        latency: Duration,
        #[arg(long, default_value_t = 50)]
        batch_size: u32,
        /// Runs, to show the spread; the table has one row per run
        #[arg(long, default_value_t = 1)]
        runs: u32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shared::tls::init();
    match Cli::parse().command {
        Bench::Read {
            chats,
            seconds,
            connections,
            hostile_searches: true,
        } => read_hostile::run(chats, seconds, connections).await?,
        Bench::Read {
            chats,
            seconds,
            connections,
            hostile_searches: false,
        } => read::run(chats, seconds, connections).await?,
        Bench::Model {
            chats,
            api,
            old_api,
        } => model::run(chats, api, old_api).await?,
        Bench::Restart { chats } => restart::run(chats).await?,
        Bench::Drill { only } => drill::run(&only).await?,
        Bench::Shutdown => shutdown::run().await?,
        Bench::Soak {
            profile,
            chats,
            minutes,
            scale,
            seed,
        } => {
            soak::run(soak::Options {
                profile,
                chats,
                minutes,
                scale,
                seed,
            })
            .await?
        }
        Bench::Fresh {
            chats,
            scale,
            budget_rps,
            reads_per_hour,
            hours,
            zipf,
            latency,
        } => {
            fresh::run(fresh::Options {
                chats,
                scale,
                budget_rps,
                reads_per_hour,
                hours,
                zipf,
                latency,
            })
            .await?;
        }
        Bench::Sync {
            chats,
            rps,
            latency,
            jitter,
            replicas,
            samples,
        } => {
            sync::run(sync::Options {
                chats,
                rps,
                latency,
                jitter,
                replicas,
                samples,
            })
            .await?;
        }
        Bench::Sweep {
            chats,
            rps,
            latency,
            batch_size,
            runs,
        } => {
            println!("| run | chats | MAX_API_RPS | latency | ideal N/rate | measured | ratio | achieved rate | share of rate | calls/chat | 429s | max calls in 1 s |");
            println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
            for run in 1..=runs {
                let row = sweep(chats, rps, latency, batch_size).await?;
                println!(
                    "| {run} | {chats} | {rps} | {} ms | {:.2} s | {:.2} s | {:.3}x | {:.1}/s | {:.1}% | {:.2} | {} | {} |",
                    latency.as_millis(),
                    row.ideal.as_secs_f64(),
                    row.measured.as_secs_f64(),
                    row.measured.as_secs_f64() / row.ideal.as_secs_f64(),
                    row.achieved_rate,
                    100.0 * row.achieved_rate / rps,
                    row.calls_per_chat,
                    row.rate_limited,
                    row.max_in_window,
                );
            }
        }
    }
    Ok(())
}

struct SweepRow {
    ideal: Duration,
    measured: Duration,
    achieved_rate: f64,
    calls_per_chat: f64,
    rate_limited: u64,
    max_in_window: usize,
}

async fn sweep(
    chats: i32,
    rps: f64,
    latency: Duration,
    batch_size: u32,
) -> anyhow::Result<SweepRow> {
    let pg = testkit::PgServer::start();
    let redis = testkit::RedisServer::start();
    let db = sqlx::PgPool::connect(&pg.url()).await?;
    shared::db::MIGRATOR.run(&db).await?;
    sqlx::query(
        "insert into chats (name, url, max_chat_id, source) \
         select 'chat ' || g, 'u', (-70000000000000 - g)::text, 'admin_panel' from generate_series(1, $1) g",
    )
    .bind(chats)
    .execute(&db)
    .await?;
    let limit = rps.floor() as u32;
    let (simulator, address) = Simulator::spawn(SimConfig {
        rate_limit: limit,
        latency_ms: latency.as_millis() as u64,
        ..SimConfig::default()
    })
    .await;
    let args = syncd::config::Cli::try_parse_from([
        "syncd".to_owned(),
        "sweep".to_owned(),
        "--full".to_owned(),
        "--database-url".to_owned(),
        pg.url(),
        "--redis-url".to_owned(),
        redis.url(),
        "--max-api-url".to_owned(),
        format!("http://{address}"),
        "--max-api-token".to_owned(),
        "sim-token".to_owned(),
        "--max-api-rps".to_owned(),
        rps.to_string(),
        "--participants-batch-size".to_owned(),
        batch_size.to_string(),
        "--log-level".to_owned(),
        "warn".to_owned(),
    ])
    .context("sweep arguments")?;
    let syncd::config::Command::Sweep(args) = args.command else {
        unreachable!()
    };
    let started = Instant::now();
    let summary = syncd::sweep_once(*args, std::future::pending()).await?;
    let measured = started.elapsed();
    anyhow::ensure!(
        summary.finished && summary.done == i64::from(chats),
        "sweep did not finish: {summary:?}"
    );
    let stats = simulator.stats();
    let refreshed: i64 = sqlx::query_scalar(
        "select count(*) from chat_participants where participants_updated_at is not null",
    )
    .fetch_one(&db)
    .await?;
    let calls: u64 = stats.calls_per_chat.values().sum();
    Ok(SweepRow {
        ideal: Duration::from_secs_f64(f64::from(chats) / rps),
        measured,
        achieved_rate: calls as f64 / measured.as_secs_f64(),
        calls_per_chat: calls as f64 / refreshed.max(1) as f64,
        rate_limited: stats.rate_limited,
        max_in_window: stats.max_in_window,
    })
}
