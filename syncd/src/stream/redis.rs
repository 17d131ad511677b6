//! The refresh streams' Redis commands and the parsers of their replies: reads, delivery
//! counts, XAUTOCLAIM with its cursor, keeping in-flight entries claimed, acks, dead letters,
//! consumer clean-up, and the one XINFO parser (for the gauges and `syncd status`). Each
//! command names its consumer group, so the membership events consumer (`crate::events`)
//! reads its stream with the same commands.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use shared::keys;

/// Entries the dead-letter stream keeps (about: trimmed with `MAXLEN ~`).
pub const DEAD_LETTER_MAX_LEN: i64 = 10_000;

/// One stream entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    pub fields: HashMap<String, String>,
}

/// The streams' consumer group, created where missing ("0": entries enqueued before any syncd
/// ever ran are consumed too).
pub async fn ensure_groups(redis: &Client) -> anyhow::Result<()> {
    for stream in [
        keys::REFRESH_STREAM_MANUAL,
        keys::REFRESH_STREAM_LAZY,
        keys::REFRESH_STREAM_DEAD,
    ] {
        let created: Result<(), fred::error::Error> = redis
            .xgroup_create(stream, keys::REFRESH_GROUP, "0", true)
            .await;
        match created {
            Ok(()) => {}
            Err(error) if error.details().starts_with("BUSYGROUP") => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// XREADGROUP of up to `count` entries of `stream`: this consumer's own pending entries after
/// `after` (no blocking), or new ones (`after` is `None`, blocking up to `block`).
pub async fn read(
    reader: &Client,
    group: &str,
    consumer: &str,
    stream: &str,
    count: u64,
    after: Option<&str>,
    block: Duration,
) -> anyhow::Result<Vec<Entry>> {
    let block = after.is_none().then_some(block.as_millis() as u64);
    let reply: Value = reader
        .xreadgroup(
            group,
            consumer,
            Some(count),
            block,
            false,
            vec![stream],
            vec![after.unwrap_or(">")],
        )
        .await?;
    parse_read_reply(reply)
}

/// XAUTOCLAIM from `cursor`: entries idle longer than `idle`, and the cursor to go on from
/// ("0-0" once the whole pending list was scanned).
pub async fn autoclaim(
    redis: &Client,
    group: &str,
    consumer: &str,
    stream: &str,
    idle: Duration,
    cursor: &str,
    count: u64,
) -> anyhow::Result<(String, Vec<Entry>)> {
    let args: Vec<Value> = vec![
        stream.into(),
        group.into(),
        consumer.into(),
        (idle.as_millis() as i64).into(),
        cursor.into(),
        "COUNT".into(),
        (count as i64).into(),
    ];
    let reply: Value = redis.custom(fred::cmd!("XAUTOCLAIM"), args).await?;
    let Value::Array(mut parts) = reply else {
        return Ok(("0-0".to_owned(), Vec::new()));
    };
    if parts.len() < 2 {
        return Ok(("0-0".to_owned(), Vec::new()));
    }
    let claimed = parse_entries(stream, parts.swap_remove(1))?;
    let next = parts
        .first()
        .and_then(Value::as_string)
        .unwrap_or_else(|| "0-0".to_owned());
    Ok((next, claimed))
}

/// How often each entry was delivered (XPENDING over the entries' id range, numerically).
pub async fn delivery_counts(
    redis: &Client,
    group: &str,
    consumer: &str,
    stream: &str,
    entries: &[Entry],
) -> anyhow::Result<HashMap<String, u64>> {
    let ids = || entries.iter().map(|e| e.id.as_str());
    let (Some(first), Some(last)) = (
        ids().min_by(|a, b| compare_ids(a, b)),
        ids().max_by(|a, b| compare_ids(a, b)),
    ) else {
        return Ok(HashMap::new());
    };
    let reply: Value = redis
        .xpending(
            stream,
            group,
            (first, last, entries.len() as u64 * 2, consumer),
        )
        .await?;
    Ok(parse_pending(reply))
}

fn parse_pending(reply: Value) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    let Value::Array(rows) = reply else {
        return counts;
    };
    for row in rows {
        let Value::Array(columns) = row else { continue };
        if let (Some(id), Some(deliveries)) = (columns.first(), columns.get(3)) {
            if let (Some(id), Ok(n)) = (id.as_string(), deliveries.clone().convert::<u64>()) {
                counts.insert(id, n);
            }
        }
    }
    counts
}

/// Resets the idle time of in-flight entries (`XCLAIM ... JUSTID`, which counts no delivery);
/// entries idle for less than `min_idle` (just claimed by a peer) are left alone.
pub async fn touch(
    redis: &Client,
    group: &str,
    consumer: &str,
    stream: &str,
    ids: &[&str],
    min_idle: Duration,
) -> Result<(), fred::error::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut args: Vec<Value> = vec![
        stream.into(),
        group.into(),
        consumer.into(),
        (min_idle.as_millis() as i64).into(),
    ];
    args.extend(ids.iter().map(|id| Value::from(*id)));
    args.push("JUSTID".into());
    let _: Value = redis.custom(fred::cmd!("XCLAIM"), args).await?;
    Ok(())
}

pub async fn ack(redis: &Client, group: &str, stream: &str, ids: Vec<&str>) -> anyhow::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let n: i64 = redis.xack(stream, group, ids).await?;
    Ok(n.max(0) as u64)
}

/// A consumer group and the dead-letter stream of what it cannot handle.
#[derive(Clone, Copy, Debug)]
pub struct Group {
    pub name: &'static str,
    pub dead_letters: &'static str,
}

/// The refresh streams' group.
pub const REFRESH: Group = Group {
    name: keys::REFRESH_GROUP,
    dead_letters: keys::REFRESH_STREAM_DEAD,
};

/// Moves `entry` to the group's dead-letter stream (with where it came from, why, and the
/// detail), then acknowledges it.
pub async fn dead_letter(
    redis: &Client,
    group: Group,
    entry: &Entry,
    reason: &str,
    detail: &str,
) -> anyhow::Result<()> {
    let mut fields: Vec<(String, String)> = entry.fields.clone().into_iter().collect();
    fields.push(("source_stream".to_owned(), entry.stream.clone()));
    fields.push(("source_id".to_owned(), entry.id.clone()));
    fields.push(("reason".to_owned(), reason.to_owned()));
    fields.push(("detail".to_owned(), detail.to_owned()));
    add_dead_letter(redis, group.dead_letters, fields).await?;
    ack(redis, group.name, &entry.stream, vec![entry.id.as_str()]).await?;
    Ok(())
}

/// Appends `fields` to the dead-letter stream `dead_letters`. Bounded: the newest entries are
/// what an operator reads; the count is in the metrics.
pub async fn add_dead_letter(
    redis: &Client,
    dead_letters: &str,
    fields: Vec<(String, String)>,
) -> anyhow::Result<()> {
    let _: String = redis
        .xadd(
            dead_letters,
            false,
            ("MAXLEN", "~", DEAD_LETTER_MAX_LEN),
            "*",
            fields,
        )
        .await?;
    Ok(())
}

/// Removes the group's consumers, other than `keep`, that hold no pending entry and have been
/// idle for longer than `idle` (pods that stopped: each pod has a name of its own). Returns how
/// many.
pub async fn forget_idle_consumers(
    redis: &Client,
    group: &str,
    stream: &str,
    keep: &str,
    idle: Duration,
) -> anyhow::Result<usize> {
    let reply: Value = redis.xinfo_consumers(stream, group).await?;
    let Value::Array(consumers) = reply else {
        return Ok(0);
    };
    let mut forgotten = 0;
    for consumer in consumers {
        let Ok(info) = consumer.convert::<HashMap<String, Value>>() else {
            continue;
        };
        let get = |name: &str| info.get(name).and_then(|v| v.clone().convert::<i64>().ok());
        let Some(name) = info.get("name").and_then(Value::as_string) else {
            continue;
        };
        let stale =
            get("pending") == Some(0) && get("idle").is_some_and(|ms| ms > idle.as_millis() as i64);
        if name != keep && stale {
            let _: i64 = redis
                .xgroup_delconsumer(stream, group, name.as_str())
                .await?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// The `syncd` group's state on one stream (`None` where unknown: no group, no stream, or
/// Redis unreachable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub pending: Option<i64>,
    pub lag: Option<i64>,
}

/// Reads `XINFO GROUPS` of `stream` for the refresh streams' group: the one parser of it, for
/// the gauges and `syncd status`.
pub async fn group_info(redis: &Client, stream: &str) -> GroupInfo {
    group_info_of(redis, stream, keys::REFRESH_GROUP).await
}

/// `group_info` for any group.
pub async fn group_info_of(redis: &Client, stream: &str, group: &str) -> GroupInfo {
    match redis.xinfo_groups::<Value, _>(stream).await {
        Ok(reply) => parse_group_info(reply, group),
        Err(_) => GroupInfo::default(),
    }
}

fn parse_group_info(reply: Value, group_name: &str) -> GroupInfo {
    let Value::Array(groups) = reply else {
        return GroupInfo::default();
    };
    for group in groups {
        let Ok(info) = group.convert::<HashMap<String, Value>>() else {
            continue;
        };
        if info.get("name").and_then(Value::as_string).as_deref() == Some(group_name) {
            let get = |name: &str| info.get(name).and_then(|v| v.clone().convert::<i64>().ok());
            return GroupInfo {
                pending: get("pending"),
                lag: get("lag"),
            };
        }
    }
    GroupInfo::default()
}

/// Whether `error` is Redis' NOGROUP: the stream exists, the consumer group does not.
pub fn is_missing_group(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<fred::error::Error>()
            .is_some_and(|e| e.details().starts_with("NOGROUP"))
            || cause.to_string().contains("NOGROUP")
    })
}

/// Orders stream ids (`<ms>-<seq>`) numerically: as strings, `T-9` sorts after `T-49`.
pub fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a).cmp(&parse(b))
}

/// Parses an XREADGROUP reply (`[[stream, [[id, [field, value, ...]], ...]], ...]`, or nil).
fn parse_read_reply(reply: Value) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let Value::Array(streams) = reply else {
        return Ok(entries);
    };
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let list = parts.pop().unwrap_or(Value::Null);
        let name = parts.pop().and_then(|v| v.as_string()).unwrap_or_default();
        entries.extend(parse_entries(&name, list)?);
    }
    Ok(entries)
}

/// Parses a list of `[id, [field, value, ...]]`; entries deleted meanwhile (nil) are skipped.
pub(crate) fn parse_entries(stream: &str, list: Value) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let Value::Array(items) = list else {
        return Ok(entries);
    };
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields_value = pair.pop().unwrap_or(Value::Null);
        let Some(id) = pair.pop().and_then(|v| v.as_string()) else {
            continue;
        };
        let mut fields = HashMap::new();
        if let Value::Array(flat) = fields_value {
            let mut iter = flat.into_iter();
            while let (Some(name), Some(value)) = (iter.next(), iter.next()) {
                if let (Some(name), Some(value)) = (name.as_string(), value.as_string()) {
                    fields.insert(name, value);
                }
            }
        }
        entries.push(Entry {
            stream: stream.to_owned(),
            id,
            fields,
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::String(text.into())
    }

    #[test]
    fn ids_order_by_number_not_by_text() {
        let mut ids = vec!["1700-49", "1700-9", "999-100", "1700-10"];
        ids.sort_by(|a, b| compare_ids(a, b));
        assert_eq!(ids, ["999-100", "1700-9", "1700-10", "1700-49"]);
        assert!("1700-9" > "1700-49", "as strings the order is wrong");
    }

    #[test]
    fn a_read_reply_becomes_entries_and_deleted_entries_are_skipped() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("chat_id"), bulk("7")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Null]),
                Value::Null,
            ]),
        ])]);
        let entries = parse_read_reply(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].stream, "s");
        assert_eq!(entries[0].fields["chat_id"], "7");
        assert!(entries[1].fields.is_empty());
        assert!(parse_read_reply(Value::Null).unwrap().is_empty());
    }

    #[test]
    fn pending_rows_give_delivery_counts() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                bulk("c"),
                Value::Integer(10),
                Value::Integer(3),
            ]),
            Value::Array(vec![bulk("2-0")]),
        ]);
        let counts = parse_pending(reply);
        assert_eq!(counts.len(), 1);
        assert_eq!(counts["1-0"], 3);
    }

    #[test]
    fn group_info_is_read_for_the_syncd_group_only() {
        let group = |name: &str, pending: i64| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Integer(pending),
                bulk("lag"),
                Value::Integer(4),
            ])
        };
        let info = parse_group_info(
            Value::Array(vec![group("other", 1), group("syncd", 2)]),
            keys::REFRESH_GROUP,
        );
        assert_eq!(
            info,
            GroupInfo {
                pending: Some(2),
                lag: Some(4)
            }
        );
        assert_eq!(
            parse_group_info(Value::Null, keys::REFRESH_GROUP),
            GroupInfo::default()
        );
    }
}
