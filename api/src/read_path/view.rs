//! What a read answers: one chat as the legacy service showed it plus where its count came
//! from, and a page of them.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Serialize, Serializer};
use utoipa::ToSchema;

use crate::read_model::postgres::AdministratorRecord;

/// Where a served count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantsSource {
    Cache,
    Database,
}

/// A chat as the legacy `GET /chats/all` returned it, plus where its count came from. The
/// legacy's omissions are kept: `external_chat_id` and `university_id` are left out when NULL,
/// `department` when NULL or empty.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatView {
    pub id: i32,
    pub name: String,
    pub url: String,
    #[schema(required = true)]
    pub max_chat_id: Option<String>,
    /// Left out when NULL
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub external_chat_id: Option<String>,
    pub participants_count: i32,
    /// Left out when NULL
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub university_id: Option<i32>,
    /// Left out when NULL or empty
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1)]
    pub department: Option<String>,
    /// admin_panel, bot_registrar or academic_group
    pub source: String,
    /// The chat's administrators ordered by `created_at` (ties by id); null when it has none
    #[schema(required = true)]
    pub administrators: Option<Vec<AdministratorView>>,
    /// RFC 3339; Postgres' `infinity` is 9999-12-31T23:59:59.999999Z and `-infinity`
    /// 0000-01-01T00:00:00Z (see `rfc3339`)
    #[serde(serialize_with = "rfc3339")]
    #[schema(required = true)]
    pub created_at: Option<DateTime<Utc>>,
    /// As `created_at`
    #[serde(serialize_with = "rfc3339")]
    #[schema(required = true)]
    pub updated_at: Option<DateTime<Utc>>,
    pub participants_source: ParticipantsSource,
    /// When MAX was asked for this count; null if it never was
    #[serde(serialize_with = "rfc3339")]
    #[schema(required = true)]
    pub participants_updated_at: Option<DateTime<Utc>>,
    /// True when the count is older than the stale threshold or was never refreshed
    pub participants_stale: bool,
}

/// A row of `administrators`, as the legacy service showed it with its chat.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AdministratorView {
    pub id: i32,
    pub chat_id: i32,
    pub phone: String,
    /// The administrator's MAX id; "" when NULL
    pub max_id: String,
    /// false when NULL
    pub add_user: bool,
    /// false when NULL
    pub add_admin: bool,
    /// As the chat's `created_at`
    #[serde(serialize_with = "rfc3339")]
    #[schema(required = true)]
    pub created_at: Option<DateTime<Utc>>,
    /// As the chat's `created_at`
    #[serde(serialize_with = "rfc3339")]
    #[schema(required = true)]
    pub updated_at: Option<DateTime<Utc>>,
}

impl AdministratorView {
    /// The legacy's list: `null` (a Go nil slice) when the chat has none.
    pub fn list(chat_id: i32, records: Vec<AdministratorRecord>) -> Option<Vec<Self>> {
        (!records.is_empty()).then(|| {
            records
                .into_iter()
                .map(|a| AdministratorView {
                    id: a.id,
                    chat_id,
                    phone: a.phone,
                    max_id: a.max_id.unwrap_or_default(),
                    add_user: a.add_user.unwrap_or(false),
                    add_admin: a.add_admin.unwrap_or(false),
                    created_at: a.created_at,
                    updated_at: a.updated_at,
                })
                .collect()
        })
    }
}

/// The latest and earliest instants RFC 3339 can write (its years have four digits).
fn rfc3339_range() -> (DateTime<Utc>, DateTime<Utc>) {
    let first = NaiveDate::from_ymd_opt(0, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0));
    let last = NaiveDate::from_ymd_opt(9999, 12, 31)
        .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999));
    match (first, last) {
        (Some(first), Some(last)) => (first.and_utc(), last.and_utc()),
        _ => unreachable!("both dates exist"),
    }
}

/// A timestamp as RFC 3339, which a client can parse, whatever Postgres holds: a legacy row may
/// say `infinity`, `-infinity` (Postgres' own text for them is no date), a BC year or one past
/// 9999. Those are shown as the nearest instant RFC 3339 can write, so `infinity` is
/// 9999-12-31T23:59:59.999999Z and `-infinity` 0000-01-01T00:00:00Z, and the order of a page
/// sorted by the column still reads right.
pub fn rfc3339<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let (first, last) = rfc3339_range();
    at.map(|at| at.clamp(first, last)).serialize(serializer)
}

/// One page of chats.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatPage {
    pub data: Vec<ChatView>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
    /// At least 1, even when there are no chats
    pub total_pages: i64,
}
