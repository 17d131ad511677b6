//! Choosing each chat's count: the cached one when Redis has it within the TTL, the Postgres
//! one otherwise, flagged stale past `PARTICIPANTS_STALE_THRESHOLD`, and which chats to enqueue.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::counts::{age, CachedCount};
use shared::ids::MaxChatId;

use super::view::{AdministratorView, ChatView, ParticipantsSource};
use crate::read_model::ChatRecord;

/// The knobs of the choice.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    pub cache_ttl: Duration,
    pub stale_threshold: Duration,
    /// Age at which a read enqueues a refresh: the threshold less the refresh-ahead window.
    pub due_age: Duration,
    pub lazy_update: bool,
}

/// What a page needs after the choice.
#[derive(Debug, Default)]
pub struct Enriched {
    pub chats: Vec<ChatView>,
    /// Stale or missing counts of chats that can be sent to MAX.
    pub to_refresh: Vec<i32>,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    /// Age in seconds of each served count that has a timestamp.
    pub ages: Vec<f64>,
}

/// Whether syncd would ask MAX about this chat at all.
fn refreshable(row: &ChatRecord) -> bool {
    let valid_id = row
        .max_chat_id
        .as_deref()
        .is_some_and(|text| MaxChatId::parse(text).is_ok());
    let active = matches!(row.sync_status.as_deref(), None | Some("active"));
    valid_id && active
}

/// Chooses each row's count. `cached` is `None` when Redis was not consulted (down, disabled,
/// or the integration is off): every count then comes from Postgres.
pub fn enrich(
    rows: Vec<ChatRecord>,
    cached: Option<&HashMap<i32, CachedCount>>,
    now: DateTime<Utc>,
    freshness: Freshness,
) -> Enriched {
    let mut out = Enriched {
        chats: Vec::with_capacity(rows.len()),
        ..Enriched::default()
    };
    for row in rows {
        let hit = cached
            .and_then(|map| map.get(&row.id))
            .filter(|value| !value.is_expired(now, freshness.cache_ttl));
        match (cached.is_some(), hit.is_some()) {
            (true, true) => out.hits += 1,
            (true, false) => out.misses += 1,
            (false, _) => {}
        }
        let (count, source, updated_at) = match hit {
            Some(value) => (
                value.count,
                ParticipantsSource::Cache,
                Some(value.updated_at),
            ),
            None => (
                row.participants_count.unwrap_or(0),
                ParticipantsSource::Database,
                row.participants_updated_at,
            ),
        };
        let stale = updated_at.is_none_or(|at| age(now, at) > freshness.stale_threshold);
        if let Some(at) = updated_at {
            out.ages.push(age(now, at).as_secs_f64());
        }
        if stale {
            out.stale += 1;
        }
        let due = updated_at.is_none_or(|at| age(now, at) > freshness.due_age);
        if due && freshness.lazy_update && refreshable(&row) {
            out.to_refresh.push(row.id);
        }
        out.chats.push(ChatView {
            id: row.id,
            name: row.name,
            url: row.url,
            max_chat_id: row.max_chat_id,
            external_chat_id: row.external_chat_id,
            participants_count: count,
            university_id: row.university_id,
            department: row.department.filter(|department| !department.is_empty()),
            source: row.source,
            administrators: AdministratorView::list(row.id, row.administrators),
            created_at: row.created_at,
            updated_at: row.updated_at,
            participants_source: source,
            participants_updated_at: updated_at,
            participants_stale: stale,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        id: i32,
        max_chat_id: Option<&str>,
        count: i32,
        synced: Option<DateTime<Utc>>,
    ) -> ChatRecord {
        ChatRecord {
            id,
            name: format!("chat {id}"),
            url: String::new(),
            max_chat_id: max_chat_id.map(str::to_owned),
            external_chat_id: None,
            participants_count: Some(count),
            university_id: None,
            department: None,
            source: "admin_panel".into(),
            created_at: None,
            updated_at: None,
            participants_updated_at: synced,
            sync_status: synced.map(|_| "active".to_owned()),
            administrators: Vec::new(),
        }
    }

    fn freshness() -> Freshness {
        Freshness {
            cache_ttl: Duration::from_secs(3600),
            stale_threshold: Duration::from_secs(600),
            due_age: Duration::from_secs(450),
            lazy_update: true,
        }
    }

    #[test]
    fn a_fresh_cached_count_wins_over_postgres() {
        let now = Utc::now();
        let cached = HashMap::from([(
            1,
            CachedCount {
                count: 42,
                updated_at: now,
            },
        )]);
        let out = enrich(
            vec![row(1, Some("-5"), 7, None)],
            Some(&cached),
            now,
            freshness(),
        );
        let chat = &out.chats[0];
        assert_eq!(
            (chat.participants_count, chat.participants_source),
            (42, ParticipantsSource::Cache)
        );
        assert!(!chat.participants_stale);
        assert_eq!((out.hits, out.misses), (1, 0));
        assert!(out.to_refresh.is_empty());
    }

    #[test]
    fn a_missing_or_expired_value_falls_back_and_is_enqueued() {
        let now = Utc::now();
        let expired = CachedCount {
            count: 42,
            updated_at: now - chrono::Duration::hours(2),
        };
        let cached = HashMap::from([(1, expired)]);
        let rows = vec![row(1, Some("-5"), 7, None), row(2, Some("-6"), 8, None)];
        let out = enrich(rows, Some(&cached), now, freshness());
        assert_eq!(out.chats[0].participants_count, 7);
        assert_eq!(
            out.chats[0].participants_source,
            ParticipantsSource::Database
        );
        assert_eq!(out.chats[0].participants_updated_at, None);
        assert!(out.chats[0].participants_stale);
        assert_eq!((out.hits, out.misses), (0, 2));
        assert_eq!(out.to_refresh, vec![1, 2]);
    }

    #[test]
    fn a_stale_cached_count_is_served_flagged_and_enqueued() {
        let now = Utc::now();
        let old = CachedCount {
            count: 42,
            updated_at: now - chrono::Duration::minutes(20),
        };
        let cached = HashMap::from([(1, old)]);
        let out = enrich(
            vec![row(1, Some("-5"), 7, None)],
            Some(&cached),
            now,
            freshness(),
        );
        assert_eq!(out.chats[0].participants_count, 42);
        assert!(out.chats[0].participants_stale);
        assert_eq!(out.to_refresh, vec![1]);
    }

    #[test]
    fn chats_that_cannot_be_sent_to_max_are_not_enqueued() {
        let now = Utc::now();
        let mut removed = row(3, Some("-7"), 1, Some(now - chrono::Duration::days(1)));
        removed.sync_status = Some("removed".into());
        let rows = vec![
            row(1, None, 1, None),
            row(2, Some("not-a-number"), 1, None),
            removed,
        ];
        let out = enrich(rows, None, now, freshness());
        assert!(out.chats.iter().all(|chat| chat.participants_stale));
        assert!(out.to_refresh.is_empty());
    }

    #[test]
    fn without_lazy_update_nothing_is_enqueued() {
        let now = Utc::now();
        let out = enrich(
            vec![row(1, Some("-5"), 7, None)],
            None,
            now,
            Freshness {
                lazy_update: false,
                ..freshness()
            },
        );
        assert!(out.to_refresh.is_empty());
        assert_eq!((out.hits, out.misses), (0, 0));
    }

    #[test]
    fn an_ageing_count_is_refreshed_ahead_but_not_flagged_stale() {
        let now = Utc::now();
        // due at 450 s, stale at 600 s
        let ageing = now - chrono::Duration::seconds(500);
        let young = now - chrono::Duration::seconds(100);
        let out = enrich(
            vec![
                row(1, Some("-5"), 7, Some(ageing)),
                row(2, Some("-6"), 7, Some(young)),
            ],
            None,
            now,
            freshness(),
        );
        assert!(!out.chats[0].participants_stale);
        assert_eq!(out.stale, 0);
        assert_eq!(out.to_refresh, vec![1]);
    }
}
