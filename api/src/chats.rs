//! Reading `chats` (with each chat's sync state) from Postgres: the one place their SQL lives.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::auth::Scope;

/// The text every search word is matched against. It must stay identical to the expression of
/// `chats_search_trgm_idx` (migrations/20261122000004_create_list_indexes.sql) for the index to
/// serve it. A word never contains a space, so it matches this text exactly when it matches one
/// of the four columns, which is the legacy semantics.
const SEARCH_DOCUMENT: &str = "(coalesce(name, '') || ' ' || coalesce(department, '') || ' ' \
     || coalesce(max_chat_id, '') || ' ' || coalesce(source, ''))";

const CHAT_COLUMNS: &str = "id, name, url, max_chat_id, external_chat_id, participants_count, \
     university_id, department, source, created_at, updated_at";

/// The sortable columns of the legacy whitelist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Parses a `sort_by` value; anything off the whitelist is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "id" => SortColumn::Id,
            "name" => SortColumn::Name,
            "url" => SortColumn::Url,
            "max_chat_id" => SortColumn::MaxChatId,
            "participants_count" => SortColumn::ParticipantsCount,
            "department" => SortColumn::Department,
            "source" => SortColumn::Source,
            "created_at" => SortColumn::CreatedAt,
            "updated_at" => SortColumn::UpdatedAt,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortOrder {
    Asc,
    Desc,
}

impl SortOrder {
    fn keyword(self) -> &'static str {
        match self {
            SortOrder::Asc => "asc",
            SortOrder::Desc => "desc",
        }
    }
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

/// One chat row with its sync state.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ChatRow {
    pub id: i32,
    pub name: String,
    pub url: String,
    pub max_chat_id: Option<String>,
    pub external_chat_id: Option<String>,
    pub participants_count: Option<i32>,
    pub university_id: Option<i32>,
    pub department: Option<String>,
    pub source: String,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// When MAX was last asked for the count that Postgres holds; `None` if never.
    pub participants_updated_at: Option<DateTime<Utc>>,
    /// `active`, or why syncd stopped asking MAX about this chat; `None` if never synced.
    pub sync_status: Option<String>,
}

/// The page and the total as one row per chat; a lone all-null row carries the total of an
/// empty page.
#[derive(sqlx::FromRow)]
struct PageRow {
    total: Option<i64>,
    #[sqlx(flatten)]
    chat: OptionalChat,
}

#[derive(sqlx::FromRow)]
struct OptionalChat {
    id: Option<i32>,
    name: Option<String>,
    url: Option<String>,
    max_chat_id: Option<String>,
    external_chat_id: Option<String>,
    participants_count: Option<i32>,
    university_id: Option<i32>,
    department: Option<String>,
    source: Option<String>,
    created_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    participants_updated_at: Option<DateTime<Utc>>,
    sync_status: Option<String>,
}

impl OptionalChat {
    fn into_row(self) -> Option<ChatRow> {
        Some(ChatRow {
            id: self.id?,
            name: self.name?,
            url: self.url?,
            max_chat_id: self.max_chat_id,
            external_chat_id: self.external_chat_id,
            participants_count: self.participants_count,
            university_id: self.university_id,
            department: self.department,
            source: self.source?,
            created_at: self.created_at,
            updated_at: self.updated_at,
            participants_updated_at: self.participants_updated_at,
            sync_status: self.sync_status,
        })
    }
}

/// Escapes `\`, `%` and `_` so that a search word matches literally inside `ilike`.
pub fn like_pattern(word: &str) -> String {
    let mut pattern = String::with_capacity(word.len() + 2);
    pattern.push('%');
    for c in word.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

fn push_filters(sql: &mut QueryBuilder<'_, Postgres>, scope: Scope, words: &[String]) {
    sql.push(" where true");
    if let Scope::University(university_id) = scope {
        sql.push(" and university_id = ").push_bind(university_id);
    }
    for word in words {
        sql.push(" and ")
            .push(SEARCH_DOCUMENT)
            .push(" ilike ")
            .push_bind(like_pattern(word));
    }
}

fn push_order(sql: &mut QueryBuilder<'_, Postgres>, prefix: &str, query: &ListQuery) {
    let order = query.order.keyword();
    sql.push(format_args!(
        " order by {prefix}{} {order}",
        query.sort.column()
    ));
    if query.sort != SortColumn::Id {
        sql.push(format_args!(", {prefix}id {order}"));
    }
}

/// A page of chats in `scope` and the number of chats matching the query, in one round trip.
///
/// Without search words the total comes from `chat_totals` (kept exact by triggers) instead of
/// a COUNT over the table. Rows are ordered as Postgres orders them by default (NULLs last when
/// ascending), with `id` as the tie-breaker so that pages do not overlap.
pub async fn list(
    pool: &PgPool,
    scope: Scope,
    query: &ListQuery,
) -> Result<(Vec<ChatRow>, i64), sqlx::Error> {
    if scope == Scope::Nothing {
        return Ok((Vec::new(), 0));
    }
    let mut sql = QueryBuilder::<Postgres>::new(
        "select t.total, c.*, p.participants_updated_at, p.sync_status from (select ",
    );
    if query.words.is_empty() {
        sql.push("coalesce(sum(n), 0)::bigint as total from chat_totals");
        if let Scope::University(university_id) = scope {
            sql.push(" where scope_key = ")
                .push_bind(i64::from(university_id));
        }
    } else {
        sql.push("count(*) as total from chats");
        push_filters(&mut sql, scope, &query.words);
    }
    // Deferred join: the offset is walked over the sort index alone (an index-only scan of
    // `(col, id)`), and only the page's rows are read from the table. Walking the offset over
    // whole rows cost a heap fetch per skipped row.
    sql.push(") t left join lateral (select ")
        .push(CHAT_COLUMNS)
        .push(" from chats where id in (select id from chats");
    push_filters(&mut sql, scope, &query.words);
    push_order(&mut sql, "", query);
    sql.push(" limit ").push_bind(query.limit);
    sql.push(" offset ").push_bind(query.offset);
    sql.push(")) c on true left join chat_participants p on p.chat_id = c.id");
    push_order(&mut sql, "c.", query);

    let rows: Vec<PageRow> = sql.build_query_as().fetch_all(pool).await?;
    let total = rows.first().and_then(|row| row.total).unwrap_or(0);
    let chats = rows
        .into_iter()
        .filter_map(|row| row.chat.into_row())
        .collect();
    Ok((chats, total))
}

/// One chat, if it exists and lies in `scope`.
pub async fn get(pool: &PgPool, scope: Scope, id: i32) -> Result<Option<ChatRow>, sqlx::Error> {
    let university_id = match scope {
        Scope::All => None,
        Scope::University(university_id) => Some(university_id),
        Scope::Nothing => return Ok(None),
    };
    sqlx::query_as::<_, ChatRow>(
        "select c.id, c.name, c.url, c.max_chat_id, c.external_chat_id, c.participants_count, \
                c.university_id, c.department, c.source, c.created_at, c.updated_at, \
                p.participants_updated_at, p.sync_status \
         from chats c left join chat_participants p on p.chat_id = c.id \
         where c.id = $1 and ($2::integer is null or c.university_id = $2)",
    )
    .bind(id)
    .bind(university_id)
    .fetch_optional(pool)
    .await
}

/// One sampled chat's counts as Postgres knows them.
#[derive(Debug, sqlx::FromRow)]
pub struct SyncSample {
    pub chat_id: i32,
    /// `chats.participants_count`
    pub legacy_count: Option<i32>,
    /// The latest count MAX gave syncd, and when it was asked
    pub max_count: Option<i32>,
    pub max_asked_at: Option<DateTime<Utc>>,
}

/// A random sample of chats with the counts Postgres holds for them.
pub async fn sample_sync_state(pool: &PgPool, size: i64) -> Result<Vec<SyncSample>, sqlx::Error> {
    sqlx::query_as(
        "select c.id as chat_id, c.participants_count as legacy_count, \
                p.participants_count as max_count, p.participants_updated_at as max_asked_at \
         from chats c left join chat_participants p on p.chat_id = c.id \
         order by random() limit $1",
    )
    .bind(size)
    .fetch_all(pool)
    .await
}

/// A cheap query that proves Postgres answers.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(pool).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_metacharacters_are_literals() {
        assert_eq!(like_pattern("50%"), "%50\\%%");
        assert_eq!(like_pattern("a_b"), "%a\\_b%");
        assert_eq!(like_pattern("c:\\x"), "%c:\\\\x%");
        assert_eq!(like_pattern("Чат"), "%Чат%");
    }

    #[test]
    fn only_whitelisted_columns_sort() {
        assert_eq!(
            SortColumn::parse("participants_count"),
            Some(SortColumn::ParticipantsCount)
        );
        assert_eq!(SortColumn::parse("name; drop table chats"), None);
        assert_eq!(SortColumn::parse("university_id"), None);
    }
}
