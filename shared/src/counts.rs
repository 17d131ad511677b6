//! Cached participant counts in Redis: the value format, the fenced write, and the page read.
//!
//! A count is stored as `"<count>:<unix ms when MAX was asked>"` in the bucket hash of
//! `keys::count_location`. A write only lands when it was asked later than what is stored,
//! so a slow or replayed result never overwrites a newer one. Expiry is per bucket (refreshed
//! by every write) and per value (a reader treats a value older than the TTL as absent).

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;

use crate::keys;
use crate::redis::run_script;

/// One chat's cached count and the moment MAX was asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedCount {
    pub count: i32,
    pub updated_at: DateTime<Utc>,
}

impl CachedCount {
    pub fn encode(&self) -> String {
        format!("{}:{}", self.count, self.updated_at.timestamp_millis())
    }

    pub fn decode(text: &str) -> Option<Self> {
        let (count, millis) = text.split_once(':')?;
        let updated_at = Utc.timestamp_millis_opt(millis.parse().ok()?).single()?;
        Some(Self {
            count: count.parse().ok()?,
            updated_at,
        })
    }

    /// Whether this value is older than the cache TTL and must be treated as absent.
    pub fn is_expired(&self, now: DateTime<Utc>, ttl: Duration) -> bool {
        age(now, self.updated_at) > ttl
    }
}

/// How long ago `then` was; zero when `then` is in the future (clock skew between hosts).
pub fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (now - then).to_std().unwrap_or(Duration::ZERO)
}

static WRITE_FENCED: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS[1]: a count bucket. ARGV[1]: bucket TTL in ms; then pairs of field, "count:ms".
-- A time ahead of this server's clock (a writer whose clock runs fast) is stored as the
-- server's now, so it cannot fence out the correct answers that follow.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local written = 0
for i = 2, #ARGV, 2 do
  local count, new_ms = string.match(ARGV[i + 1], '^(-?%d+):(%d+)$')
  new_ms = tonumber(new_ms)
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local current_ms = current and tonumber(string.match(current, ':(%d+)$'))
  if new_ms and new_ms > now_ms then
    new_ms = now_ms
  end
  if new_ms and (not current_ms or current_ms < new_ms) then
    redis.call('HSET', KEYS[1], ARGV[i], count .. ':' .. string.format('%d', new_ms))
    written = written + 1
  end
end
if written > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return written
"#,
    )
});

/// Writes counts, each only if it is newer than the stored one. One script call per bucket,
/// sent as one pipeline. Returns how many values were written.
pub async fn write_fenced(
    client: &Client,
    entries: &[(i32, CachedCount)],
    ttl: Duration,
) -> Result<u64, fred::error::Error> {
    let mut by_bucket: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (chat_id, cached) in entries {
        let (key, field) = keys::count_location(*chat_id);
        let args = by_bucket.entry(key).or_default();
        args.push(field);
        args.push(cached.encode());
    }
    let ttl_ms = ttl.as_millis().max(1).to_string();
    let mut written = 0;
    for (key, pairs) in by_bucket {
        let mut args = Vec::with_capacity(pairs.len() + 1);
        args.push(ttl_ms.clone());
        args.extend(pairs);
        let n: u64 = run_script(client, &WRITE_FENCED, vec![key], args).await?;
        written += n;
    }
    Ok(written)
}

static READ_PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: count buckets. ARGV: for each bucket, how many fields, then those fields.
-- Returns every value in that order, nil where a field is absent.
local out = {}
local at = 1
for i = 1, #KEYS do
  local n = tonumber(ARGV[at])
  local values = redis.call('HMGET', KEYS[i], unpack(ARGV, at + 1, at + n))
  for j = 1, n do
    out[#out + 1] = values[j]
  end
  at = at + n + 1
end
return out
"#,
    )
});

/// Reads the cached counts of a page of chats in one round trip, and values that do not parse
/// are treated as absent. On a single Redis (or Sentinel) that is one script call doing every
/// bucket's `HMGET` on the server: a page's 50 chats sit in up to 50 buckets, and one command
/// costs the api far less than 50 pipelined ones. On a Cluster the buckets live in different
/// slots, so it is one `HMGET` per bucket in a pipeline that the client splits by node.
pub async fn read_many(
    client: &Client,
    options: &Options,
    chat_ids: &[i32],
) -> Result<HashMap<i32, CachedCount>, fred::error::Error> {
    let mut by_bucket: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
    for id in chat_ids {
        by_bucket.entry(keys::bucket_of(*id)).or_default().push(*id);
    }
    if by_bucket.is_empty() {
        return Ok(HashMap::new());
    }
    if !client.is_clustered() {
        let mut bucket_keys = Vec::with_capacity(by_bucket.len());
        let mut args = Vec::with_capacity(chat_ids.len() + by_bucket.len());
        let mut order = Vec::with_capacity(chat_ids.len());
        for (bucket, ids) in &by_bucket {
            bucket_keys.push(keys::count_bucket(*bucket));
            args.push(ids.len().to_string());
            for id in ids {
                args.push(keys::count_location(*id).1);
                order.push(*id);
            }
        }
        // fred applies per-command options to scripts only through pipelines; the caller's
        // deadline bounds this call instead.
        let reply: Value = run_script(client, &READ_PAGE, bucket_keys, args).await?;
        let values: Vec<Option<String>> = match reply {
            Value::Array(_) => reply.convert()?,
            Value::Null => Vec::new(),
            other => vec![other.convert()?],
        };
        let mut found = HashMap::with_capacity(order.len());
        for (id, value) in order.into_iter().zip(values) {
            if let Some(cached) = value.as_deref().and_then(CachedCount::decode) {
                found.insert(id, cached);
            }
        }
        return Ok(found);
    }
    let pipeline = client.pipeline().with_options(options);
    for (bucket, ids) in &by_bucket {
        let fields: Vec<String> = ids.iter().map(|id| keys::count_location(*id).1).collect();
        let _: () = pipeline.hmget(keys::count_bucket(*bucket), fields).await?;
    }
    let replies: Vec<Value> = pipeline.all().await?;
    let mut found = HashMap::with_capacity(chat_ids.len());
    for ((_, ids), reply) in by_bucket.iter().zip(replies) {
        let values: Vec<Option<String>> = match reply {
            // A single-field HMGET may come back flattened.
            Value::Array(_) => reply.convert()?,
            other => vec![other.convert()?],
        };
        for (id, value) in ids.iter().zip(values) {
            if let Some(cached) = value.as_deref().and_then(CachedCount::decode) {
                found.insert(*id, cached);
            }
        }
    }
    Ok(found)
}

/// A whole count bucket as read from Redis: each chat's value at its `keys::slot_in_bucket`.
pub type Bucket = [Option<CachedCount>; keys::CHATS_PER_BUCKET as usize];

static READ_BUCKETS: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: count buckets. Returns each bucket's HGETALL (field, value, ...), in KEYS order.
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HGETALL', KEYS[i])
end
return out
"#,
    )
});

/// Reads whole count buckets in one script call (a single Redis or Sentinel, not a Cluster:
/// the buckets lie in different slots). The api keeps them in memory, so it reads every field
/// rather than a page's; a connection with client tracking on is told when any of them changes.
pub async fn read_buckets<C>(client: &C, buckets: &[i64]) -> Result<Vec<Bucket>, fred::error::Error>
where
    C: LuaInterface + Send + Sync,
{
    if buckets.is_empty() {
        return Ok(Vec::new());
    }
    let bucket_keys = buckets.iter().map(|b| keys::count_bucket(*b)).collect();
    let reply: Value = run_script(client, &READ_BUCKETS, bucket_keys, Vec::new()).await?;
    let replies = match reply {
        Value::Array(replies) => replies,
        _ => Vec::new(),
    };
    let mut out = vec![[None; keys::CHATS_PER_BUCKET as usize]; buckets.len()];
    for (bucket, reply) in out.iter_mut().zip(replies) {
        let Value::Array(pairs) = reply else { continue };
        for pair in pairs.chunks_exact(2) {
            let field = pair[0].as_str().and_then(|f| f.parse::<usize>().ok());
            let value = pair[1].as_str().and_then(|v| CachedCount::decode(&v));
            if let (Some(field), Some(value)) = (field, value) {
                if let Some(slot) = bucket.get_mut(field) {
                    *slot = Some(value);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_their_text_form() {
        let cached = CachedCount {
            count: 153,
            updated_at: Utc.timestamp_millis_opt(1_763_772_000_123).unwrap(),
        };
        assert_eq!(cached.encode(), "153:1763772000123");
        assert_eq!(CachedCount::decode("153:1763772000123"), Some(cached));
    }

    #[test]
    fn malformed_values_are_absent() {
        assert_eq!(CachedCount::decode("153"), None);
        assert_eq!(CachedCount::decode("x:1"), None);
        assert_eq!(CachedCount::decode("{\"count\":1}"), None);
    }

    #[test]
    fn a_value_expires_after_the_ttl() {
        let now = Utc.timestamp_millis_opt(10_000_000).unwrap();
        let cached = CachedCount {
            count: 1,
            updated_at: now - chrono::Duration::seconds(61),
        };
        assert!(cached.is_expired(now, Duration::from_secs(60)));
        assert!(!cached.is_expired(now, Duration::from_secs(62)));
    }
}
