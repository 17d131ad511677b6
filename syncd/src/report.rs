//! `syncd status`: the fleet's state as tables, read from Redis and Postgres.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use fred::prelude::*;
use shared::keys::{self, status};
use shared::sweeps::SweepState;

use crate::config::StatusArgs;
use crate::stream::redis::{group_info, GroupInfo};

/// The pool and the connected Redis client an operator's report reads (`status`, `inspect`).
pub(crate) async fn connect(
    database: &shared::config::DatabaseArgs,
    redis: &shared::config::RedisArgs,
) -> anyhow::Result<(sqlx::PgPool, fred::clients::Client)> {
    let db = shared::db::pool(database)?;
    let redis = shared::redis::connect(redis)?;
    redis
        .wait_for_connect()
        .await
        .context("cannot reach Redis (REDIS_URL)")?;
    Ok((db, redis))
}

/// Renders the status report: the streams, the replicas and MAX, the schedules, the last
/// sweeps, and the chats by freshness.
pub async fn status(args: &StatusArgs) -> anyhow::Result<String> {
    let (db, redis) = connect(&args.database, &args.redis).await?;
    let mut out = String::new();
    write_streams(&mut out, &redis).await?;
    write_replicas(&mut out, &redis).await?;
    write_long_poll(&mut out, &redis).await?;
    write_schedules(&mut out, args)?;
    write_sweeps(&mut out, &db).await?;
    write_freshness(&mut out, &db, args).await?;
    db.close().await;
    Ok(out)
}

/// Each stream: length, pending, lag.
async fn write_streams(out: &mut String, redis: &Client) -> anyhow::Result<()> {
    writeln!(
        out,
        "STREAM                              LENGTH   PENDING  LAG"
    )?;
    for stream in [
        keys::REFRESH_STREAM_MANUAL,
        keys::REFRESH_STREAM_LAZY,
        keys::REFRESH_STREAM_DEAD,
    ] {
        let length: i64 = redis.xlen(stream).await.unwrap_or(0);
        let GroupInfo { pending, lag } = group_info(redis, stream).await;
        let name = if stream == keys::REFRESH_STREAM_DEAD {
            format!("{stream} (dead letters)")
        } else {
            stream.to_owned()
        };
        writeln!(
            out,
            "{name:<35} {length:>7}  {:>7}  {:>7}",
            show(pending),
            show(lag)
        )?;
    }
    Ok(())
}

/// Poll mode's state, when it ever ran: the lease holder, the marker, the last poll.
async fn write_long_poll(out: &mut String, redis: &Client) -> anyhow::Result<()> {
    let (holder, marker, at): (Option<String>, Option<String>, Option<i64>) = redis
        .mget(vec![
            keys::EVENTS_POLL_LEASE,
            keys::EVENTS_POLL_MARKER,
            keys::EVENTS_POLL_AT,
        ])
        .await
        .unwrap_or_default();
    if holder.is_none() && marker.is_none() && at.is_none() {
        return Ok(());
    }
    let at = at
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
    writeln!(
        out,
        "\nLONG POLL (MAX_UPDATES_MODE=poll): lease {}, marker {}, last successful poll {at}",
        holder.as_deref().unwrap_or("none"),
        marker.as_deref().unwrap_or("none")
    )?;
    Ok(())
}

/// Each replica's last heartbeat, and what MAX last said.
async fn write_replicas(out: &mut String, redis: &Client) -> anyhow::Result<()> {
    let fields: HashMap<String, String> =
        redis.hgetall(keys::SYNCD_STATUS).await.unwrap_or_default();
    let now = Utc::now();
    writeln!(out, "\nREPLICA                             LAST HEARTBEAT")?;
    let mut beats: Vec<(&String, DateTime<Utc>)> = fields
        .iter()
        .filter(|(name, _)| name.starts_with(status::HEARTBEAT_PREFIX))
        .filter_map(|(name, value)| Some((name, millis(value)?)))
        .collect();
    beats.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
    if beats.is_empty() {
        writeln!(out, "(none)")?;
    }
    for (name, at) in beats {
        let replica = name.trim_start_matches(status::HEARTBEAT_PREFIX);
        writeln!(out, "{replica:<35} {} s ago", (now - at).num_seconds())?;
    }
    writeln!(
        out,
        "\nMAX token: {}   last success: {}   last error: {} {}",
        fields
            .get(status::MAX_TOKEN)
            .map(String::as_str)
            .unwrap_or("unknown"),
        fields
            .get(status::MAX_LAST_SUCCESS_AT)
            .and_then(|v| millis(v))
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into()),
        fields
            .get(status::MAX_LAST_ERROR)
            .map(String::as_str)
            .unwrap_or("-"),
        fields
            .get(status::MAX_LAST_ERROR_AT)
            .and_then(|v| millis(v))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    )?;
    Ok(())
}

/// Each schedule's next run.
fn write_schedules(out: &mut String, args: &StatusArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let schedules = args.schedule.schedules().map_err(anyhow::Error::msg)?;
    writeln!(out, "\nSCHEDULE (next run in the zone, and in UTC)")?;
    for line in schedules.describe(now) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The last sweeps and their progress.
async fn write_sweeps(out: &mut String, db: &sqlx::PgPool) -> anyhow::Result<()> {
    writeln!(out, "\nSWEEP  SLOT                 BY        STARTED              STATE                         DONE/PLANNED    FAILED   CALLS  COVERAGE")?;
    let sweeps = shared::sweeps::recent(db, 8)
        .await
        .context("cannot read sync_sweeps (DATABASE_URL)")?;
    if sweeps.is_empty() {
        writeln!(out, "(none yet)")?;
    }
    for sweep in sweeps {
        let planned = sweep.planned.unwrap_or(0);
        let coverage = if planned > 0 {
            format!(
                "{:.1}%",
                100.0 * f64::from(sweep.done - sweep.failed) / f64::from(planned)
            )
        } else {
            "-".into()
        };
        let state = match sweep.state() {
            SweepState::Finished => format!(
                "finished {}",
                sweep
                    .finished_at
                    .unwrap_or(sweep.started_at)
                    .format("%H:%M:%S")
            ),
            SweepState::Covered => format!(
                "covered by {}",
                sweep
                    .covered_by
                    .unwrap_or(sweep.slot)
                    .format("%m-%d %H:%M:%S")
            ),
            SweepState::Running => {
                format!("running on {}", sweep.owner.as_deref().unwrap_or("-"))
            }
            SweepState::Orphaned => "orphaned (resumes soon)".to_owned(),
            SweepState::Waiting => "waiting".to_owned(),
        };
        writeln!(
            out,
            "{:<6} {:<20} {:<9} {:<20} {state:<29} {:>6}/{:<8} {:>6}  {:>6}  {coverage}",
            sweep.kind.as_str(),
            sweep.slot.format("%Y-%m-%d %H:%M:%S"),
            sweep.started_by().map_or("-", |by| by.as_str()),
            sweep.started_at.format("%Y-%m-%d %H:%M:%S"),
            sweep.done,
            planned,
            sweep.failed,
            sweep.calls,
        )?;
    }
    Ok(())
}

/// Chats by freshness against the stale threshold.
async fn write_freshness(
    out: &mut String,
    db: &sqlx::PgPool,
    args: &StatusArgs,
) -> anyhow::Result<()> {
    let stale_s = args.freshness.participants_stale_threshold.as_secs_f64();
    let freshness =
        crate::store::freshness_buckets(db, args.freshness.participants_stale_threshold).await?;
    let total: i64 = freshness.iter().map(|(_, n)| n).sum();
    writeln!(
        out,
        "\nFRESHNESS (threshold {}s)              CHATS   SHARE",
        stale_s as u64
    )?;
    for (bucket, n) in freshness {
        let share = if total > 0 {
            100.0 * n as f64 / total as f64
        } else {
            0.0
        };
        writeln!(out, "{:<38} {n:>6}  {share:>5.1}%", &bucket[2..])?;
    }
    writeln!(out, "{:<38} {total:>6}", "total")?;
    Ok(())
}

fn show(value: Option<i64>) -> String {
    value
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".to_owned())
}

fn millis(text: &str) -> Option<DateTime<Utc>> {
    text.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}
