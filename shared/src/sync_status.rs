//! `chat_participants.sync_status`: whether MAX gives the chat's count, and if not, why.
//!
//! Stored as text, so a status MAX adds later is kept as it came (`Other`) rather than refused.

use std::fmt;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SyncStatus {
    /// MAX gives the count.
    Active,
    /// The chat's own status in MAX: the bot was removed from it.
    Removed,
    /// The chat's own status in MAX: the bot left it.
    Left,
    /// The chat's own status in MAX: the chat is closed.
    Closed,
    /// MAX answered 403 for this chat.
    Forbidden,
    /// MAX answered 404 for this chat.
    NotFound,
    /// `chats.max_chat_id` is missing or not a number: MAX cannot be asked.
    InvalidId,
    /// A chat status MAX added after this code was written.
    Other(String),
}

impl SyncStatus {
    pub fn as_str(&self) -> &str {
        match self {
            SyncStatus::Active => "active",
            SyncStatus::Removed => "removed",
            SyncStatus::Left => "left",
            SyncStatus::Closed => "closed",
            SyncStatus::Forbidden => "forbidden",
            SyncStatus::NotFound => "not_found",
            SyncStatus::InvalidId => "invalid_id",
            SyncStatus::Other(status) => status,
        }
    }

    pub fn is_active(&self) -> bool {
        *self == SyncStatus::Active
    }

    /// MAX would not show the chat (403, 404), as opposed to a status of the chat itself: a
    /// wrong setup answers this way for every chat.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, SyncStatus::Forbidden | SyncStatus::NotFound)
    }
}

impl From<&str> for SyncStatus {
    fn from(text: &str) -> Self {
        match text {
            "active" => SyncStatus::Active,
            "removed" => SyncStatus::Removed,
            "left" => SyncStatus::Left,
            "closed" => SyncStatus::Closed,
            "forbidden" => SyncStatus::Forbidden,
            "not_found" => SyncStatus::NotFound,
            "invalid_id" => SyncStatus::InvalidId,
            other => SyncStatus::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Type<Postgres> for SyncStatus {
    fn type_info() -> PgTypeInfo {
        <&str as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <&str as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for SyncStatus {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(SyncStatus::from(<&str as Decode<Postgres>>::decode(value)?))
    }
}

impl Encode<'_, Postgres> for SyncStatus {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <&str as Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_as_itself_and_new_ones_are_kept() {
        for status in [
            SyncStatus::Active,
            SyncStatus::Removed,
            SyncStatus::Left,
            SyncStatus::Closed,
            SyncStatus::Forbidden,
            SyncStatus::NotFound,
            SyncStatus::InvalidId,
            SyncStatus::Other("archived".into()),
        ] {
            assert_eq!(SyncStatus::from(status.as_str()), status);
        }
        assert!(SyncStatus::NotFound.is_unavailable());
        assert!(!SyncStatus::Removed.is_unavailable());
    }
}
