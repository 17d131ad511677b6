//! The read model's vocabulary: what a page is asked for by (the sort columns of the legacy
//! whitelist, the direction, the search words). `read_path::query` parses the legacy
//! parameters into it.

/// The sortable columns of the legacy whitelist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortColumn {
    Id,
    Name,
    Url,
    MaxChatId,
    ParticipantsCount,
    Department,
    Source,
    CreatedAt,
    UpdatedAt,
}

impl SortColumn {
    pub const ALL: [SortColumn; 9] = [
        SortColumn::Id,
        SortColumn::Name,
        SortColumn::Url,
        SortColumn::MaxChatId,
        SortColumn::ParticipantsCount,
        SortColumn::Department,
        SortColumn::Source,
        SortColumn::CreatedAt,
        SortColumn::UpdatedAt,
    ];

    /// Parses a `sort_by` value; anything off the whitelist is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|column| column.sql_name() == text)
    }

    /// The column of `chats` this sorts by.
    pub fn sql_name(self) -> &'static str {
        match self {
            SortColumn::Id => "id",
            SortColumn::Name => "name",
            SortColumn::Url => "url",
            SortColumn::MaxChatId => "max_chat_id",
            SortColumn::ParticipantsCount => "participants_count",
            SortColumn::Department => "department",
            SortColumn::Source => "source",
            SortColumn::CreatedAt => "created_at",
            SortColumn::UpdatedAt => "updated_at",
        }
    }

    /// Text columns are ordered by the database's collation, which only Postgres knows.
    pub fn is_text(self) -> bool {
        matches!(
            self,
            SortColumn::Name
                | SortColumn::Url
                | SortColumn::MaxChatId
                | SortColumn::Department
                | SortColumn::Source
        )
    }

    /// This column's place in `ALL`.
    pub fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|column| *column == self)
            .expect("every column is in ALL")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortOrder {
    Asc,
    Desc,
}

/// A validated `GET /chats/all` query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: i64,
    pub offset: i64,
    pub sort: SortColumn,
    pub order: SortOrder,
    /// Search words, each to be found (case-insensitively, literally) in one of the columns.
    pub words: Vec<String>,
}
