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
    /// Search words, each to be found (case-insensitively, literally) in one of the columns;
    /// made by `search_words`.
    pub words: Vec<String>,
}

/// The words of a `search` text, split as the legacy service split them: every character that
/// is not a letter or a digit separates words (the legacy replaced each one outside Russian and
/// Latin letters, digits and ё/Ё by a space before splitting on white space), so `ИВТ-21` is
/// `ИВТ` and `21`, and `%`, `_` and `\` are separators, never wildcards. Every Unicode letter
/// and digit is kept here, where the legacy's alphabet dropped other scripts' (a bug). A text
/// with no words filters nothing. The one place a search is split: the read model's search and
/// any SQL built from the words both take them from here.
pub fn search_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::search_words;

    #[test]
    fn search_words_split_on_everything_but_letters_and_digits() {
        assert_eq!(search_words("ИВТ-21"), vec!["ИВТ", "21"]);
        assert_eq!(search_words("100%"), vec!["100"]);
        assert_eq!(search_words("  Math\t2024 \n"), vec!["Math", "2024"]);
        assert_eq!(search_words("admin_panel"), vec!["admin", "panel"]);
        assert_eq!(search_words("Ёлка.ёж,Z"), vec!["Ёлка", "ёж", "Z"]);
        assert_eq!(search_words("Ελλάδα/東京٣"), vec!["Ελλάδα", "東京٣"]);
        for nothing in ["", "%", "\\", "--", "_ _", " \u{a0}"] {
            assert!(search_words(nothing).is_empty(), "{nothing:?}");
        }
    }
}
