//! The Redis key schema: the only place a Redis key or channel is spelled.
//!
//! Keys that a Lua script or a multi-key command touches together share a hash tag (the part in
//! braces), so the same code runs on Redis Cluster:
//! - `{participants:refresh}` groups the refresh streams, the dead-letter stream and the
//!   per-chat dedup markers, because one script checks a marker and appends to a stream.
//! - `{participants:events}` groups the membership events stream and its dead letters (a
//!   dead letter is written beside the entry it acknowledges).
//!
//! Eviction: only the count buckets and the short-lived markers carry a TTL. With the
//! recommended `maxmemory-policy volatile-lru` Redis may evict those and never the streams or
//! coordination keys, which have no TTL.

/// Chats whose counts share one hash. Small hashes are stored as listpacks, which is what keeps
/// a cached count near 30 bytes instead of the ~120 a key of its own with a TTL costs.
/// Must stay at or under Redis' `hash-max-listpack-entries` (128 by default).
pub const CHATS_PER_BUCKET: i64 = 64;

/// The hash holding the cached counts of `chats.id` values `bucket * 64 .. bucket * 64 + 63`.
pub fn count_bucket(bucket: i64) -> String {
    format!("participants:counts:{bucket}")
}

/// Where one chat's cached count lives: its bucket key and its field inside that hash.
pub fn count_location(chat_id: i32) -> (String, String) {
    let id = i64::from(chat_id);
    let bucket = id.div_euclid(CHATS_PER_BUCKET);
    let field = id.rem_euclid(CHATS_PER_BUCKET);
    (count_bucket(bucket), field.to_string())
}

/// The bucket number a chat belongs to.
pub fn bucket_of(chat_id: i32) -> i64 {
    i64::from(chat_id).div_euclid(CHATS_PER_BUCKET)
}

/// A chat's place inside its bucket: the number its field spells, `0..CHATS_PER_BUCKET`.
pub fn slot_in_bucket(chat_id: i32) -> usize {
    i64::from(chat_id).rem_euclid(CHATS_PER_BUCKET) as usize
}

/// The bucket number of a count bucket key (`count_bucket`'s inverse); `None` for any other key.
pub fn bucket_of_key(key: &[u8]) -> Option<i64> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix("participants:counts:")?
        .parse()
        .ok()
}

/// The channel Redis publishes client-tracking invalidations on, to the connection a tracking
/// client redirects them to (Redis' own name).
pub const TRACKING_INVALIDATION_CHANNEL: &str = "__redis__:invalidate";

/// Lazy refreshes enqueued by reads of stale counts.
pub const REFRESH_STREAM_LAZY: &str = "{participants:refresh}:lazy";

/// Refreshes an operator asked for; consumers read this stream before the lazy one.
pub const REFRESH_STREAM_MANUAL: &str = "{participants:refresh}:manual";

/// Entries that failed delivery too many times, kept for an operator to inspect.
pub const REFRESH_STREAM_DEAD: &str = "{participants:refresh}:dead";

/// The consumer group every `syncd` replica joins on both refresh streams.
pub const REFRESH_GROUP: &str = "syncd";

/// Raw MAX updates the webhook receiver (`MAX_UPDATES_MODE=webhook`) accepted, one per entry
/// in the field `EVENTS_FIELD_UPDATE`, read by the `EVENTS_GROUP` consumer group. (In `stream`
/// mode the stream is another service's, named by `MAX_UPDATES_STREAM`, with the same field.)
pub const EVENTS_STREAM: &str = "{participants:events}:updates";

/// Bodies that are not MAX updates (from the webhook, or an events stream's entries), with
/// the reason, kept for an operator to inspect.
pub const EVENTS_STREAM_DEAD: &str = "{participants:events}:dead";

/// The consumer group syncd replicas share on the events stream (ours, or another service's
/// in `stream` mode, where other groups may read the same entries).
pub const EVENTS_GROUP: &str = "participants-syncd";

/// The field of an events stream entry that holds the raw Update (JSON).
pub const EVENTS_FIELD_UPDATE: &str = "update";

/// The long-poll lease (`MAX_UPDATES_MODE=poll`): the consumer name of the one replica that
/// polls `GET /updates`, set with `NX PX` and renewed while it polls.
pub const EVENTS_POLL_LEASE: &str = "{participants:events}:poll:lease";

/// The long-poll marker: the `marker` of the last batch stored in `EVENTS_STREAM`, sent with
/// the next `GET /updates`. Written only after the batch is in the stream.
pub const EVENTS_POLL_MARKER: &str = "{participants:events}:poll:marker";

/// Unix ms of the last successful long poll: a marker missing while this exists was lost, and
/// a gap longer than MAX's retention since it lost updates.
pub const EVENTS_POLL_AT: &str = "{participants:events}:poll:at";

/// Marks a chat as already enqueued for a lazy refresh, so a hot stale chat is enqueued once
/// per marker lifetime and not once per read.
pub fn refresh_marker(chat_id: i32) -> String {
    format!("{{participants:refresh}}:queued:{chat_id}")
}

/// Marks a chat as already enqueued for a manual refresh.
pub fn manual_refresh_marker(chat_id: i32) -> String {
    format!("{{participants:refresh}}:manual:{chat_id}")
}

/// The rate limiter's theoretical arrival time (GCRA), in Redis server microseconds.
pub const LIMITER_TAT: &str = "{participants:limiter}:tat";

/// Until when (Redis server microseconds) the whole fleet holds off MAX after a 429.
pub const LIMITER_PAUSE: &str = "{participants:limiter}:pause";

/// Present while some replica has lazy or manual refreshes waiting: sweeps yield to them.
pub const LIMITER_URGENT: &str = "{participants:limiter}:urgent";

/// Present while some replica has manual refreshes waiting: lazy refreshes and sweeps yield to
/// them, so a person's refresh-and-wait is not queued behind a lazy backlog.
pub const LIMITER_MANUAL: &str = "{participants:limiter}:manual";

/// Set by the api's `POST /admin/participants/full-update`; the first syncd replica to take it
/// (GETDEL) records a full sweep in Postgres, which the fleet then runs once.
pub const FULL_SWEEP_REQUEST: &str = "participants:sweep:full-requested";

/// Pub/sub channel on which `syncd` announces each finished refresh (a `RefreshOutcome`).
pub const REFRESH_OUTCOMES_CHANNEL: &str = "participants:refreshed";

/// Hash in which `syncd` records fleet-wide status for `/health/detailed`: one
/// `heartbeat:<consumer>` field per replica (unix ms), and the `status::*` fields below.
pub const SYNCD_STATUS: &str = "participants:syncd:status";

/// Field names inside `SYNCD_STATUS`.
pub mod status {
    /// Prefix of each replica's heartbeat field; the value is unix ms.
    pub const HEARTBEAT_PREFIX: &str = "heartbeat:";
    /// `valid` or `invalid`: whether MAX last accepted the bot token.
    pub const MAX_TOKEN: &str = "max_token";
    /// Unix ms of the last successful MAX call.
    pub const MAX_LAST_SUCCESS_AT: &str = "max_last_success_at";
    /// Unix ms and kind of the last failed MAX call.
    pub const MAX_LAST_ERROR_AT: &str = "max_last_error_at";
    pub const MAX_LAST_ERROR: &str = "max_last_error";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_chats_share_a_bucket() {
        assert_eq!(
            count_location(0),
            ("participants:counts:0".to_owned(), "0".to_owned())
        );
        assert_eq!(
            count_location(63),
            ("participants:counts:0".to_owned(), "63".to_owned())
        );
        assert_eq!(
            count_location(64),
            ("participants:counts:1".to_owned(), "0".to_owned())
        );
        assert_eq!(
            count_location(-1),
            ("participants:counts:-1".to_owned(), "63".to_owned())
        );
    }

    #[test]
    fn a_bucket_key_names_its_bucket_and_no_other_key_does() {
        for id in [0, 63, 64, 150_000, -1] {
            let (key, field) = count_location(id);
            assert_eq!(bucket_of_key(key.as_bytes()), Some(bucket_of(id)));
            assert_eq!(field, slot_in_bucket(id).to_string());
        }
        assert_eq!(bucket_of_key(SYNCD_STATUS.as_bytes()), None);
        assert_eq!(bucket_of_key(b"participants:counts:x"), None);
    }

    #[test]
    fn refresh_keys_share_one_hash_tag() {
        for key in [
            REFRESH_STREAM_LAZY.to_owned(),
            REFRESH_STREAM_MANUAL.to_owned(),
            REFRESH_STREAM_DEAD.to_owned(),
            refresh_marker(7),
            manual_refresh_marker(7),
        ] {
            assert!(key.starts_with("{participants:refresh}"), "{key}");
        }
        for key in [
            EVENTS_STREAM,
            EVENTS_STREAM_DEAD,
            EVENTS_POLL_LEASE,
            EVENTS_POLL_MARKER,
            EVENTS_POLL_AT,
        ] {
            assert!(key.starts_with("{participants:events}"), "{key}");
        }
        for key in [LIMITER_TAT, LIMITER_PAUSE, LIMITER_URGENT] {
            assert!(key.starts_with("{participants:limiter}"), "{key}");
        }
    }
}
