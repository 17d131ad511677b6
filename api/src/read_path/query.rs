//! The `GET /chats/all` query: the legacy service's parameters, defaults and clamps, parsed at
//! the edge into the read model's `ListQuery`.

use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::ApiError;
pub use crate::read_model::query::{search_words, ListQuery, SortColumn, SortOrder};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 100;
const MAX_SEARCH_WORDS: usize = 16;
const MAX_SEARCH_WORD_CHARS: usize = 200;

/// Query of `GET /chats/all`, as the legacy service took it.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size: absent, empty, zero or negative means 50; more than 100 means 100
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// Rows to skip; negative means 0
    #[param(value_type = Option<i64>)]
    pub offset: Option<String>,
    /// One of id, name, url, max_chat_id, participants_count, department, source, created_at,
    /// updated_at; anything else means name
    pub sort_by: Option<String>,
    /// asc or desc; anything else means asc
    pub sort_order: Option<String>,
    /// Words that must all occur, case-insensitively, in name, department, max_chat_id or
    /// source. Every character that is not a letter or a digit separates words (`ИВТ-21` is
    /// `ИВТ` and `21`; `%` and `_` are never wildcards); a search with no words filters nothing
    pub search: Option<String>,
    /// false: serve the counts stored in Postgres (`participants_source: database`) and
    /// enqueue no refresh; absent or true: the cached counts, refreshed when stale
    #[param(value_type = Option<bool>)]
    pub use_cached_participants: Option<String>,
}

/// Query of `GET /chats/{id}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChatParams {
    /// false: serve the count stored in Postgres (`participants_source: database`) and
    /// enqueue no refresh; absent or true: the cached count, refreshed when stale
    #[param(value_type = Option<bool>)]
    pub use_cached_participants: Option<String>,
}

/// Where a read takes its participant counts from: the seed's `use_cached_participants` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CountSource {
    /// Redis' count when it has a fresh one, else the stored one; stale counts are enqueued.
    #[default]
    Cached,
    /// The count stored in Postgres (as the read model holds it); nothing is enqueued.
    Stored,
}

impl CountSource {
    /// Parses `use_cached_participants`: absent or empty is `Cached`; true/false, 1/0,
    /// yes/no or on/off otherwise; anything else is 400.
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value.map(str::trim) {
            None | Some("") => Ok(Self::Cached),
            Some(text) => match shared::config::parse_bool(text) {
                Ok(true) => Ok(Self::Cached),
                Ok(false) => Ok(Self::Stored),
                Err(_) => Err(ApiError::BadRequest(
                    "use_cached_participants must be true or false".to_owned(),
                )),
            },
        }
    }
}

fn parse_number(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer"))),
    }
}

impl ListQuery {
    /// Applies the legacy defaults and clamps to a raw query.
    pub fn parse(params: &ListParams) -> Result<Self, ApiError> {
        let limit = match parse_number("limit", params.limit.as_deref())? {
            Some(n) if n > MAX_LIMIT => MAX_LIMIT,
            Some(n) if n > 0 => n,
            _ => DEFAULT_LIMIT,
        };
        let offset = parse_number("offset", params.offset.as_deref())?
            .unwrap_or(0)
            .max(0);
        let sort = params
            .sort_by
            .as_deref()
            .and_then(|text| SortColumn::parse(text.trim()))
            .unwrap_or(SortColumn::Name);
        let order = match params.sort_order.as_deref().map(str::trim) {
            Some(text) if text.eq_ignore_ascii_case("desc") => SortOrder::Desc,
            _ => SortOrder::Asc,
        };
        let words = search_words(params.search.as_deref().unwrap_or_default());
        if words.len() > MAX_SEARCH_WORDS {
            return Err(ApiError::BadRequest(format!(
                "search may have at most {MAX_SEARCH_WORDS} words"
            )));
        }
        if words
            .iter()
            .any(|word| word.chars().count() > MAX_SEARCH_WORD_CHARS)
        {
            return Err(ApiError::BadRequest(format!(
                "search words may be at most {MAX_SEARCH_WORD_CHARS} characters long"
            )));
        }
        Ok(ListQuery {
            limit,
            offset,
            sort,
            order,
            words,
        })
    }

    /// Pages of this size the matches fill; at least 1, even when nothing matches.
    pub fn total_pages(&self, total: i64) -> i64 {
        ((total + self.limit - 1) / self.limit).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(limit: Option<&str>, offset: Option<&str>) -> ListParams {
        ListParams {
            limit: limit.map(str::to_owned),
            offset: offset.map(str::to_owned),
            ..ListParams::default()
        }
    }

    #[test]
    fn limit_follows_the_legacy_clamps() {
        for (given, expected) in [
            (None, 50),
            (Some(""), 50),
            (Some("0"), 50),
            (Some("-3"), 50),
            (Some("20"), 20),
            (Some("100"), 100),
            (Some("1000"), 100),
        ] {
            assert_eq!(
                ListQuery::parse(&params(given, None)).unwrap().limit,
                expected,
                "{given:?}"
            );
        }
        assert!(matches!(
            ListQuery::parse(&params(Some("ten"), None)),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn offset_is_never_negative() {
        assert_eq!(
            ListQuery::parse(&params(None, Some("-10"))).unwrap().offset,
            0
        );
        assert_eq!(
            ListQuery::parse(&params(None, Some("30"))).unwrap().offset,
            30
        );
        assert!(matches!(
            ListQuery::parse(&params(None, Some("1.5"))),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn sort_falls_back_to_name_ascending() {
        let query = ListQuery::parse(&ListParams {
            sort_by: Some("password".into()),
            sort_order: Some("sideways".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(
            (query.sort, query.order),
            (SortColumn::Name, SortOrder::Asc)
        );
        let query = ListQuery::parse(&ListParams {
            sort_by: Some("created_at".into()),
            sort_order: Some("DESC".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(
            (query.sort, query.order),
            (SortColumn::CreatedAt, SortOrder::Desc)
        );
    }

    #[test]
    fn only_whitelisted_columns_sort() {
        assert_eq!(
            SortColumn::parse("participants_count"),
            Some(SortColumn::ParticipantsCount)
        );
        assert_eq!(SortColumn::parse("name; drop table chats"), None);
        assert_eq!(SortColumn::parse("university_id"), None);
        for column in SortColumn::ALL {
            assert_eq!(SortColumn::ALL[column.index()], column);
        }
    }

    #[test]
    fn search_splits_as_the_legacy_did() {
        let query = ListQuery::parse(&ListParams {
            search: Some("  Math\t2024 ИВТ-21 100% \\ \n".into()),
            ..ListParams::default()
        })
        .unwrap();
        assert_eq!(query.words, vec!["Math", "2024", "ИВТ", "21", "100"]);
    }

    #[test]
    fn use_cached_participants_defaults_to_the_cache() {
        for (given, expected) in [
            (None, CountSource::Cached),
            (Some(""), CountSource::Cached),
            (Some("true"), CountSource::Cached),
            (Some("FALSE"), CountSource::Stored),
            (Some("0"), CountSource::Stored),
        ] {
            assert_eq!(CountSource::parse(given).unwrap(), expected, "{given:?}");
        }
        assert!(CountSource::parse(Some("maybe")).is_err());
    }

    #[test]
    fn an_empty_result_still_has_one_page() {
        let query = ListQuery::parse(&ListParams::default()).unwrap();
        assert_eq!(query.total_pages(0), 1);
        assert_eq!(query.total_pages(50), 1);
        assert_eq!(query.total_pages(51), 2);
    }
}
