//! `syncd inspect <chat id>`: one chat's whole state, from Redis and Postgres: the cached count
//! and its time, the row and its sync state, the last MAX answer or error, and whether it is
//! queued, in flight, dead-lettered or backing off.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::Context;
use chrono::Utc;
use fred::prelude::*;
use shared::counts::CachedCount;
use shared::keys;

use crate::config::InspectArgs;
use crate::store;
use crate::stream::redis::parse_entries;

/// Stream entries read per stream when looking for the chat (the newest of the dead letters).
const SCAN_ENTRIES: u64 = 10_000;

/// Renders the chat's state as `name: value` lines.
pub async fn inspect(args: &InspectArgs) -> anyhow::Result<String> {
    let (db, redis) = crate::report::connect(&args.database, &args.redis).await?;
    let mut out = String::new();
    let id = args.chat_id;
    writeln!(out, "chat {id}")?;
    write_postgres(&mut out, &db, id).await?;
    write_cache(&mut out, &redis, id).await?;
    write_queues(&mut out, &redis, id).await?;
    db.close().await;
    Ok(out)
}

async fn write_postgres(out: &mut String, db: &sqlx::PgPool, id: i32) -> anyhow::Result<()> {
    let Some(row) = store::inspect_row(db, id)
        .await
        .context("cannot read chats (DATABASE_URL)")?
    else {
        writeln!(out, "postgres:          no such chat (chats.id {id})")?;
        return Ok(());
    };
    let time =
        |at: Option<chrono::DateTime<Utc>>| at.map_or_else(|| "-".to_owned(), |at| at.to_rfc3339());
    writeln!(out, "name:              {}", row.name)?;
    writeln!(
        out,
        "max_chat_id:       {}",
        row.target
            .max_chat_id
            .as_deref()
            .unwrap_or("- (MAX cannot be asked)")
    )?;
    writeln!(
        out,
        "legacy count:      {} (chats.participants_count; updated_at {})",
        row.legacy_count
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        time(row.updated_at)
    )?;
    let target = &row.target;
    writeln!(
        out,
        "sync status:       {}",
        target
            .sync_status
            .as_ref()
            .map_or("never refreshed (no chat_participants row)", |s| s.as_str())
    )?;
    writeln!(
        out,
        "last MAX count:    {} (asked at {})",
        target
            .participants_count
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        time(target.participants_updated_at)
    )?;
    writeln!(
        out,
        "last MAX answer:   {} at {}; {} failure(s) in a row",
        target.last_error.as_deref().unwrap_or("a count"),
        time(target.checked_at),
        target.consecutive_failures
    )?;
    let backoff = match target.backing_off_until() {
        Some(until) if until > Utc::now() => format!("yes, until {}", until.to_rfc3339()),
        _ if target
            .sync_status
            .as_ref()
            .is_some_and(|s| s.as_str() != "active") =>
        {
            "skipped: gone in MAX, re-checked PARTICIPANTS_INACTIVE_RECHECK after the last answer"
                .to_owned()
        }
        _ => "no".to_owned(),
    };
    writeln!(out, "backing off:       {backoff}")?;
    Ok(())
}

async fn write_cache(out: &mut String, redis: &Client, id: i32) -> anyhow::Result<()> {
    let (bucket, field) = keys::count_location(id);
    let cached: Option<String> = redis.hget(&bucket, &field).await?;
    let line = match cached
        .as_deref()
        .map(|text| (text, CachedCount::decode(text)))
    {
        None => "none".to_owned(),
        Some((_, Some(count))) => format!(
            "{} at {} ({} s ago)",
            count.count,
            count.updated_at.to_rfc3339(),
            (Utc::now() - count.updated_at).num_seconds()
        ),
        Some((text, None)) => format!("unreadable value {text:?}"),
    };
    writeln!(out, "cached count:      {line} (HGET {bucket} {field})")?;
    Ok(())
}

async fn write_queues(out: &mut String, redis: &Client, id: i32) -> anyhow::Result<()> {
    for (name, marker) in [
        ("lazy marker:      ", keys::refresh_marker(id)),
        ("manual marker:    ", keys::manual_refresh_marker(id)),
    ] {
        let ttl_ms: i64 = redis.pttl(&marker).await?;
        let state = if ttl_ms >= 0 {
            format!("set, {} s left (no new entry until then)", ttl_ms / 1000)
        } else {
            "none".to_owned()
        };
        writeln!(out, "{name} {state}")?;
    }
    for stream in [keys::REFRESH_STREAM_MANUAL, keys::REFRESH_STREAM_LAZY] {
        let entries = entries_of(redis, stream, id, "-", "+").await?;
        let pending = pending(redis, stream).await?;
        let lines: Vec<String> = entries
            .iter()
            .map(|entry| match pending.get(&entry.id) {
                Some((consumer, deliveries)) => format!(
                    "{} in flight at {consumer} (delivered {deliveries} time(s))",
                    entry.id
                ),
                None => format!("{} waiting", entry.id),
            })
            .collect();
        writeln!(out, "in {stream}: {}", list(&lines))?;
    }
    let dead = entries_of(redis, keys::REFRESH_STREAM_DEAD, id, "+", "-").await?;
    let lines: Vec<String> = dead
        .iter()
        .map(|entry| {
            format!(
                "{} ({})",
                entry.id,
                entry.fields.get("reason").map_or("-", String::as_str)
            )
        })
        .collect();
    writeln!(out, "dead-lettered:     {}", list(&lines))?;
    Ok(())
}

fn list(lines: &[String]) -> String {
    if lines.is_empty() {
        "none".to_owned()
    } else {
        lines.join("; ")
    }
}

/// The entries of `stream` for chat `id` among the first `SCAN_ENTRIES` from `start` (XRANGE
/// from "-", or XREVRANGE from "+" for the newest first).
async fn entries_of(
    redis: &Client,
    stream: &str,
    id: i32,
    start: &str,
    end: &str,
) -> anyhow::Result<Vec<crate::stream::redis::Entry>> {
    let command = if start == "+" { "XREVRANGE" } else { "XRANGE" };
    let reply: Value = redis
        .custom(
            fred::cmd!(command),
            vec![
                stream.to_owned(),
                start.to_owned(),
                end.to_owned(),
                "COUNT".to_owned(),
                SCAN_ENTRIES.to_string(),
            ],
        )
        .await?;
    let wanted = id.to_string();
    Ok(parse_entries(stream, reply)?
        .into_iter()
        .filter(|entry| entry.fields.get("chat_id") == Some(&wanted))
        .collect())
}

/// Entries delivered and not yet acknowledged: id → (consumer, deliveries).
async fn pending(redis: &Client, stream: &str) -> anyhow::Result<HashMap<String, (String, u64)>> {
    let reply: Result<Value, _> = redis
        .xpending(stream, keys::REFRESH_GROUP, ("-", "+", SCAN_ENTRIES))
        .await;
    let mut pending = HashMap::new();
    // No group yet (no syncd ever ran): nothing is in flight.
    let Ok(Value::Array(rows)) = reply else {
        return Ok(pending);
    };
    for row in rows {
        let Value::Array(columns) = row else { continue };
        let (Some(id), Some(consumer), Some(deliveries)) = (
            columns.first().and_then(Value::as_string),
            columns.get(1).and_then(Value::as_string),
            columns.get(3).and_then(|v| v.clone().convert::<u64>().ok()),
        ) else {
            continue;
        };
        pending.insert(id, (consumer, deliveries));
    }
    Ok(pending)
}
