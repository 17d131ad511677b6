//! The read model's SQL: the whole table, a set of rows, each text column's order under the
//! database's collation (whole, a digest of it, or the place of single rows in it), row
//! versions for reconciliation, and the database's lowercase map.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::{PgConnection, Postgres, Transaction};

use super::query::SortColumn;

/// The channel the triggers of migrations/20261202000001_create_chat_change_notify.sql notify.
pub const CHANGES_CHANNEL: &str = "participants_chats_changed";
/// The payload that means "reload everything" (sent on TRUNCATE).
pub const RELOAD_ALL: &str = "*";

/// The text every search word is matched against, lowered by Postgres itself: the four columns
/// the legacy search looked at, joined by spaces. A word never contains a space, so it occurs in
/// this text exactly when it occurs in one of the columns.
const LOWERED_DOCUMENT: &str = "lower(coalesce(c.name, '') || ' ' || coalesce(c.department, '') \
     || ' ' || coalesce(c.max_chat_id, '') || ' ' || coalesce(c.source, ''))";

const RECORD_COLUMNS: &str = "c.id, c.name, c.url, c.max_chat_id, c.external_chat_id, \
     c.participants_count, c.university_id, c.department, c.source, c.created_at, c.updated_at, \
     p.participants_updated_at, p.sync_status, \
     c.xmin::text::bigint as chat_version, p.xmin::text::bigint as sync_version";

/// One chat row with its sync state, as the read model holds it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ChatRecord {
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

/// A row as loaded: the record, its lowered search text, and its version.
#[derive(Debug, sqlx::FromRow)]
pub struct LoadedRow {
    #[sqlx(flatten)]
    pub record: ChatRecord,
    pub document: String,
    #[sqlx(flatten)]
    pub version: RowVersion,
}

/// The transaction ids that last wrote a chat's two rows. Any write to either row changes it,
/// so equal versions mean equal rows; only equality is compared, so xid wraparound is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct RowVersion {
    pub chat_version: i64,
    pub sync_version: Option<i64>,
}

/// A chat's id with its version.
#[derive(Debug, sqlx::FromRow)]
pub struct VersionedId {
    pub id: i32,
    #[sqlx(flatten)]
    pub version: RowVersion,
}

/// Opens the read-only snapshot a load runs in, so that rows and orders agree.
pub async fn snapshot(pool: &sqlx::PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Every chat, streamed into `sink` so that the rows are never held twice.
pub async fn load_all(
    conn: &mut PgConnection,
    mut sink: impl FnMut(LoadedRow),
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "select {RECORD_COLUMNS}, {LOWERED_DOCUMENT} as document \
         from chats c left join chat_participants p on p.chat_id = c.id"
    );
    let mut rows = sqlx::query_as::<_, LoadedRow>(&sql).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        sink(row);
    }
    Ok(())
}

/// The named chats that still exist.
pub async fn load_ids(conn: &mut PgConnection, ids: &[i32]) -> Result<Vec<LoadedRow>, sqlx::Error> {
    let sql = format!(
        "select {RECORD_COLUMNS}, {LOWERED_DOCUMENT} as document \
         from chats c left join chat_participants p on p.chat_id = c.id where c.id = any($1)"
    );
    sqlx::query_as(&sql).bind(ids).fetch_all(conn).await
}

/// Every chat's id in the order of `order by <column>, id` under the database's collation: how
/// the model sorts text exactly as Postgres does, without comparing strings itself.
pub async fn text_order(
    conn: &mut PgConnection,
    column: SortColumn,
) -> Result<Vec<i32>, sqlx::Error> {
    let sql = format!("select id from chats order by {}, id", column.sql_name());
    sqlx::query_scalar(&sql).fetch_all(conn).await
}

/// Where Postgres puts a row in a text column's order: the row right before it.
#[derive(Debug, sqlx::FromRow)]
pub struct Predecessor {
    pub id: i32,
    /// The row right before it in `order by <column>, id`; `None` when it comes first.
    pub before: Option<i32>,
    /// That row's `chat_version`, so the caller can tell whether the model holds it as is.
    pub before_version: Option<i64>,
}

/// For each of `ids`, the row right before it in `order by <column>, id` under the database's
/// collation: how a new or renamed row is placed without re-reading the whole order. Each is
/// one descent of the `(<column>, id)` index (migrations `index_chats_<column>_id`). A row
/// comparison with a NULL is NULL, so a NULL value (which sorts last) is asked for apart:
/// before it come the NULL rows of smaller id, else the last row with a value.
pub async fn predecessors(
    conn: &mut PgConnection,
    column: SortColumn,
    ids: &[i32],
) -> Result<Vec<Predecessor>, sqlx::Error> {
    let col = column.sql_name();
    let sql = format!(
        "select n.id, b.id as before, b.xmin::text::bigint as before_version \
         from chats n left join chats b on b.id = case when n.{col} is null then coalesce( \
           (select c.id from chats c where c.{col} is null and c.id < n.id \
            order by c.{col} desc, c.id desc limit 1), \
           (select c.id from chats c where c.{col} is not null \
            order by c.{col} desc, c.id desc limit 1)) \
         else (select c.id from chats c where (c.{col}, c.id) < (n.{col}, n.id) \
            order by c.{col} desc, c.id desc limit 1) end \
         where n.id = any($1)"
    );
    sqlx::query_as(&sql).bind(ids).fetch_all(conn).await
}

/// A text column's whole order as the MD5 of its ids joined by commas (`md5('')` for an empty
/// table): reconciliation compares it with the model's own, one column per statement.
pub async fn text_order_digest(
    conn: &mut PgConnection,
    column: SortColumn,
) -> Result<String, sqlx::Error> {
    let sql = format!(
        "select coalesce(md5(string_agg(id::text, ',' order by {}, id)), md5('')) from chats",
        column.sql_name()
    );
    sqlx::query_scalar(&sql).fetch_one(conn).await
}

/// How many chats the load will stream, so its buffer is allocated once.
pub async fn count(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from chats")
        .fetch_one(conn)
        .await
}

/// Every chat's id and version in id order, streamed into `sink`, for reconciliation.
pub async fn versions(
    conn: &mut PgConnection,
    mut sink: impl FnMut(VersionedId),
) -> Result<(), sqlx::Error> {
    let mut rows = sqlx::query_as::<_, VersionedId>(
        "select c.id, c.xmin::text::bigint as chat_version, p.xmin::text::bigint as sync_version \
         from chats c left join chat_participants p on p.chat_id = c.id order by c.id",
    )
    .fetch(conn);
    while let Some(row) = rows.try_next().await? {
        sink(row);
    }
    Ok(())
}

/// Every character (below U+30000) that the database's `lower()` changes, with what it
/// becomes. The model lowers search words with this map, so a word is lowered exactly as
/// `ilike` lowers it, under the database's own ctype.
pub async fn lowercase_map(conn: &mut PgConnection) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "select chr(c), lower(chr(c)) from generate_series(1, 196607) c \
         where c not between 55296 and 57343 and lower(chr(c)) <> chr(c)",
    )
    .fetch_all(conn)
    .await
}
