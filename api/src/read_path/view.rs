//! What a read answers: one chat as the legacy service showed it plus where its count came
//! from, and a page of them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

/// Where a served count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantsSource {
    Cache,
    Database,
}

/// A chat as the legacy `GET /chats/all` returned it, plus where its count came from.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ChatView {
    pub id: i32,
    pub name: String,
    pub url: String,
    pub max_chat_id: Option<String>,
    pub external_chat_id: Option<String>,
    pub participants_count: i32,
    pub university_id: Option<i32>,
    pub department: Option<String>,
    /// admin_panel, bot_registrar or academic_group
    pub source: String,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub participants_source: ParticipantsSource,
    /// When MAX was asked for this count; null if it never was
    pub participants_updated_at: Option<DateTime<Utc>>,
    /// True when the count is older than the stale threshold or was never refreshed
    pub participants_stale: bool,
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
