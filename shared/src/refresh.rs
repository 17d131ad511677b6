//! The refresh stream: the message `api` enqueues and `syncd` consumes, the enqueue scripts with
//! their per-chat dedup markers, and the outcome `syncd` publishes when a refresh is done.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};

use crate::keys;
use crate::redis::run_script;

/// How urgent a refresh is. Manual refreshes have their own stream, read first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// A read found the count stale or missing.
    Lazy,
    /// Someone asked for this chat through `POST /chats/{id}/refresh-participants` and waits.
    Manual,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Lazy => "lazy",
            Priority::Manual => "manual",
        }
    }

    pub fn stream(self) -> &'static str {
        match self {
            Priority::Lazy => keys::REFRESH_STREAM_LAZY,
            Priority::Manual => keys::REFRESH_STREAM_MANUAL,
        }
    }
}

/// One entry of a refresh stream. Fields are flat strings; unknown fields are ignored so that
/// a newer `api` can add some without breaking an older `syncd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRequest {
    /// `chats.id`, never the MAX id.
    pub chat_id: i32,
    pub priority: Priority,
    pub enqueued_at: DateTime<Utc>,
    /// W3C `traceparent` of the request that caused the refresh, if it was traced.
    pub traceparent: Option<String>,
}

/// Why a stream entry could not be read as a `RefreshRequest`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MalformedRequest {
    #[error("refresh entry has no `{0}` field")]
    Missing(&'static str),
    #[error("refresh entry field `{field}` has an invalid value `{value}`")]
    Invalid { field: &'static str, value: String },
}

impl RefreshRequest {
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let mut fields = vec![
            ("chat_id".to_owned(), self.chat_id.to_string()),
            ("priority".to_owned(), self.priority.as_str().to_owned()),
            (
                "enqueued_at".to_owned(),
                self.enqueued_at.timestamp_millis().to_string(),
            ),
        ];
        if let Some(traceparent) = &self.traceparent {
            fields.push(("traceparent".to_owned(), traceparent.clone()));
        }
        fields
    }

    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, MalformedRequest> {
        let get = |name: &'static str| {
            fields
                .get(name)
                .map(String::as_str)
                .ok_or(MalformedRequest::Missing(name))
        };
        let invalid = |field: &'static str, value: &str| MalformedRequest::Invalid {
            field,
            value: value.chars().take(64).collect(),
        };
        let chat_id = get("chat_id")?;
        let chat_id = chat_id.parse().map_err(|_| invalid("chat_id", chat_id))?;
        let priority = match get("priority")? {
            "lazy" => Priority::Lazy,
            "manual" => Priority::Manual,
            other => return Err(invalid("priority", other)),
        };
        let enqueued_at = get("enqueued_at")?;
        let enqueued_at = enqueued_at
            .parse::<i64>()
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .ok_or_else(|| invalid("enqueued_at", enqueued_at))?;
        Ok(Self {
            chat_id,
            priority,
            enqueued_at,
            traceparent: fields.get("traceparent").cloned(),
        })
    }
}

/// Approximate cap on each refresh stream. Entries are hints that a later sweep also covers,
/// so trimming the oldest while `syncd` is down for days loses no data.
pub const STREAM_MAX_LEN: u64 = 200_000;

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS[1]: the stream; KEYS[2..]: one dedup marker per chat.
-- ARGV[1]: marker TTL ms, ARGV[2]: stream cap, ARGV[3]: priority, ARGV[4]: enqueued_at ms,
-- ARGV[5]: traceparent or "", ARGV[6..]: chat ids in the order of KEYS[2..].
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    if ARGV[5] ~= '' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'chat_id', ARGV[i + 4],
        'priority', ARGV[3], 'enqueued_at', ARGV[4], 'traceparent', ARGV[5])
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'chat_id', ARGV[i + 4],
        'priority', ARGV[3], 'enqueued_at', ARGV[4])
    end
    added = added + 1
  end
end
return added
"#,
    )
});

/// Enqueues refreshes for the chats not already enqueued within `marker_ttl`, atomically with
/// setting their markers, in one round trip. Returns how many entries were added.
pub async fn enqueue<C>(
    client: &C,
    priority: Priority,
    chat_ids: &[i32],
    marker_ttl: Duration,
    traceparent: Option<&str>,
) -> Result<u64, fred::error::Error>
where
    C: LuaInterface + Send + Sync,
{
    if chat_ids.is_empty() {
        return Ok(0);
    }
    let marker = match priority {
        Priority::Lazy => keys::refresh_marker,
        Priority::Manual => keys::manual_refresh_marker,
    };
    let mut script_keys = Vec::with_capacity(chat_ids.len() + 1);
    script_keys.push(priority.stream().to_owned());
    script_keys.extend(chat_ids.iter().map(|id| marker(*id)));
    let mut args = vec![
        marker_ttl.as_millis().max(1).to_string(),
        STREAM_MAX_LEN.to_string(),
        priority.as_str().to_owned(),
        Utc::now().timestamp_millis().to_string(),
        traceparent.unwrap_or_default().to_owned(),
    ];
    args.extend(chat_ids.iter().map(i32::to_string));
    run_script(client, &ENQUEUE, script_keys, args).await
}

/// What `syncd` publishes on `keys::REFRESH_OUTCOMES_CHANNEL` after refreshing a chat, so a
/// waiting `POST /chats/{id}/refresh-participants` can answer at once.
///
/// The protocol of a manual refresh: the api subscribes, then `enqueue`s (which sets the
/// manual marker); syncd refreshes, deletes the marker (`keys::manual_refresh_marker`) and
/// then publishes the outcome. Deleting before publishing means a request that arrives after
/// the outcome enqueues again instead of waiting on a refresh that is already over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshOutcome {
    pub chat_id: i32,
    /// The fresh count, or `None` when MAX could not give one (see `error`).
    pub participants_count: Option<i32>,
    /// When MAX was asked.
    pub updated_at: DateTime<Utc>,
    /// A short machine-readable reason when the refresh failed, e.g. `chat_removed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_stream_fields() {
        let request = RefreshRequest {
            chat_id: 42,
            priority: Priority::Manual,
            enqueued_at: Utc.timestamp_millis_opt(1_763_772_000_000).unwrap(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        };
        let fields: HashMap<String, String> = request.to_fields().into_iter().collect();
        assert_eq!(RefreshRequest::from_fields(&fields), Ok(request));
    }

    #[test]
    fn malformed_entries_say_which_field_is_wrong() {
        let mut fields = HashMap::new();
        assert_eq!(
            RefreshRequest::from_fields(&fields),
            Err(MalformedRequest::Missing("chat_id"))
        );
        fields.insert("chat_id".into(), "x".into());
        assert!(matches!(
            RefreshRequest::from_fields(&fields),
            Err(MalformedRequest::Invalid {
                field: "chat_id",
                ..
            })
        ));
        fields.insert("chat_id".into(), "1".into());
        fields.insert("priority".into(), "urgent".into());
        assert!(matches!(
            RefreshRequest::from_fields(&fields),
            Err(MalformedRequest::Invalid {
                field: "priority",
                ..
            })
        ));
    }
}
