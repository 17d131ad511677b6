//! The read model's SQL: the whole table, a set of rows, each text column's order under the
//! database's collation (whole, a digest of it, or the place of single rows in it), row
//! versions for reconciliation, and the database's lowercase map.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::TryStreamExt;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, PgConnection, Postgres, Transaction, ValueRef};

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
     c.xmin::text::bigint as chat_version, p.xmin::text::bigint as sync_version, \
     a.admin_ids, a.admin_phones, a.admin_max_ids, a.admin_add_users, a.admin_add_admins, \
     a.admin_created_at, a.admin_updated_at, a.admins_version";

/// The version of a chat's administrators (rows `ad`): the sum of a 44-bit hash of each row's
/// id and the transaction that last wrote it (`xmin`), NULL when it has none. Any insert,
/// update or delete of one changes it but for a hash collision (about one in 2^44 per change);
/// 44 bits keep the sum within a bigint for up to 2^19 administrators of one chat.
macro_rules! admins_version {
    () => {
        "sum(hashtextextended(ad.id::text || ':' || ad.xmin::text, 0) >> 20)::bigint"
    };
}

/// A chat's rows of `administrators`, as the columns of `RECORD_COLUMNS` (alias `a`): one array
/// per column in the legacy's order (`order by created_at`, ties broken by id), all NULL when
/// it has none, and their version (`admins_version!`). A legacy table's `create table if not
/// exists` guarantees nothing of its columns, so a NULL phone is read as empty and timestamps
/// without a time zone are read as the session's: one odd row must not stop every load. One descent of
/// `idx_administrators_chat_id` per chat.
const ADMINS_JOIN: &str = concat!(
    "left join lateral (select ",
    "array_agg(ad.id order by ad.created_at, ad.id) as admin_ids, ",
    "array_agg(coalesce(ad.phone, '') order by ad.created_at, ad.id) as admin_phones, ",
    "array_agg(ad.max_id order by ad.created_at, ad.id) as admin_max_ids, ",
    "array_agg(ad.add_user order by ad.created_at, ad.id) as admin_add_users, ",
    "array_agg(ad.add_admin order by ad.created_at, ad.id) as admin_add_admins, ",
    "array_agg(ad.created_at::timestamptz order by ad.created_at, ad.id) as admin_created_at, ",
    "array_agg(ad.updated_at::timestamptz order by ad.created_at, ad.id) as admin_updated_at, ",
    admins_version!(),
    " as admins_version from administrators ad where ad.chat_id = c.id) a on true"
);

/// Every chat's administrators' version (alias `a`, by `chat_id`), for reconciliation.
const ADMINS_VERSIONS_JOIN: &str = concat!(
    "left join (select ad.chat_id, ",
    admins_version!(),
    " as admins_version from administrators ad group by ad.chat_id) a on a.chat_id = c.id"
);

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
    #[sqlx(try_from = "Timestamptz")]
    pub created_at: Option<DateTime<Utc>>,
    #[sqlx(try_from = "Timestamptz")]
    pub updated_at: Option<DateTime<Utc>>,
    /// When MAX was last asked for the count that Postgres holds; `None` if never.
    #[sqlx(try_from = "Timestamptz")]
    pub participants_updated_at: Option<DateTime<Utc>>,
    /// `active`, or why syncd stopped asking MAX about this chat; `None` if never synced.
    pub sync_status: Option<String>,
    /// The chat's rows of `administrators` ordered by `created_at` (ties by id); empty when
    /// it has none. Filled from `AdminColumns` after decoding.
    #[sqlx(skip)]
    pub administrators: Vec<AdministratorRecord>,
}

/// One row of `administrators`, as the legacy service showed it with its chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdministratorRecord {
    pub id: i32,
    pub phone: String,
    pub max_id: Option<String>,
    pub add_user: Option<bool>,
    pub add_admin: Option<bool>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// A chat's administrators as `ADMINS_JOIN` aggregates them: one array per column, each in
/// the same order, all NULL when the chat has none.
#[derive(Debug, Default, sqlx::FromRow)]
pub struct AdminColumns {
    pub admin_ids: Option<Vec<i32>>,
    pub admin_phones: Option<Vec<String>>,
    pub admin_max_ids: Option<Vec<Option<String>>>,
    pub admin_add_users: Option<Vec<Option<bool>>>,
    pub admin_add_admins: Option<Vec<Option<bool>>>,
    pub admin_created_at: Option<Vec<Timestamptz>>,
    pub admin_updated_at: Option<Vec<Timestamptz>>,
}

impl AdminColumns {
    /// The rows the arrays hold. Arrays of one aggregate have one length; a shorter one
    /// (never sent) would end the list at its length.
    fn into_records(self) -> Vec<AdministratorRecord> {
        let (
            Some(ids),
            Some(phones),
            Some(max_ids),
            Some(users),
            Some(admins),
            Some(created),
            Some(updated),
        ) = (
            self.admin_ids,
            self.admin_phones,
            self.admin_max_ids,
            self.admin_add_users,
            self.admin_add_admins,
            self.admin_created_at,
            self.admin_updated_at,
        )
        else {
            return Vec::new();
        };
        ids.into_iter()
            .zip(phones)
            .zip(max_ids)
            .zip(users.into_iter().zip(admins))
            .zip(created.into_iter().zip(updated))
            .map(
                |((((id, phone), max_id), (add_user, add_admin)), (created_at, updated_at))| {
                    AdministratorRecord {
                        id,
                        phone,
                        max_id,
                        add_user,
                        add_admin,
                        created_at: created_at.0,
                        updated_at: updated_at.0,
                    }
                },
            )
            .collect()
    }
}

/// Microseconds from the Unix epoch to Postgres' (2000-01-01).
const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A nullable `timestamptz`, decoded from Postgres' own microseconds. sqlx's chrono decoding
/// panics on values chrono cannot hold (`infinity`, `-infinity`, years past +262142), and one
/// such legacy row would kill the load for good. Here every value Postgres can store decodes:
/// `infinity` becomes chrono's largest instant and `-infinity` its smallest, and a year past
/// chrono's range the instant just below the largest, so the model's order stays Postgres'
/// (`-infinity` < every date < `infinity` < NULL), except among those far years themselves.
/// What the api shows for them is `read_path::view`'s concern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamptz(pub Option<DateTime<Utc>>);

impl Timestamptz {
    /// The instant of Postgres' microseconds since 2000-01-01 (`i64::MAX` is `infinity`).
    pub fn from_postgres_micros(micros: i64) -> DateTime<Utc> {
        match micros {
            i64::MAX => DateTime::<Utc>::MAX_UTC,
            i64::MIN => DateTime::<Utc>::MIN_UTC,
            _ => micros
                .checked_add(POSTGRES_EPOCH_UNIX_MICROS)
                .and_then(DateTime::from_timestamp_micros)
                .unwrap_or_else(|| {
                    if micros > 0 {
                        DateTime::<Utc>::MAX_UTC - TimeDelta::microseconds(1)
                    } else {
                        DateTime::<Utc>::MIN_UTC + TimeDelta::microseconds(1)
                    }
                }),
        }
    }
}

impl From<Timestamptz> for Option<DateTime<Utc>> {
    fn from(value: Timestamptz) -> Self {
        value.0
    }
}

impl sqlx::Type<Postgres> for Timestamptz {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl PgHasArrayType for Timestamptz {
    fn array_type_info() -> PgTypeInfo {
        <DateTime<Utc> as PgHasArrayType>::array_type_info()
    }

    fn array_compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as PgHasArrayType>::array_compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Timestamptz {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        if value.is_null() {
            return Ok(Self(None));
        }
        let at = match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 8] = value
                    .as_bytes()?
                    .try_into()
                    .map_err(|_| "a timestamptz is not 8 bytes")?;
                Self::from_postgres_micros(i64::from_be_bytes(bytes))
            }
            // Results come in binary; text (a simple query) is handled for completeness.
            PgValueFormat::Text => match value.as_str()? {
                "infinity" => DateTime::<Utc>::MAX_UTC,
                "-infinity" => DateTime::<Utc>::MIN_UTC,
                _ => <DateTime<Utc> as Decode<Postgres>>::decode(value)?,
            },
        };
        Ok(Self(Some(at)))
    }
}

/// A row as loaded: the record (with its administrators), its lowered search text, and its
/// version.
#[derive(Debug)]
pub struct LoadedRow {
    pub record: ChatRecord,
    pub document: String,
    pub version: RowVersion,
}

/// A row as Postgres sends it: the administrators still in their arrays.
#[derive(Debug, sqlx::FromRow)]
struct RawRow {
    #[sqlx(flatten)]
    record: ChatRecord,
    document: String,
    #[sqlx(flatten)]
    version: RowVersion,
    #[sqlx(flatten)]
    admins: AdminColumns,
}

impl From<RawRow> for LoadedRow {
    fn from(row: RawRow) -> Self {
        let RawRow {
            mut record,
            document,
            version,
            admins,
        } = row;
        record.administrators = admins.into_records();
        LoadedRow {
            record,
            document,
            version,
        }
    }
}

/// The transaction ids that last wrote a chat's two rows, and its administrators' version.
/// Any write to one of them changes it, so equal versions mean equal rows; only equality is
/// compared, so xid wraparound is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct RowVersion {
    pub chat_version: i64,
    pub sync_version: Option<i64>,
    /// See `admins_version!`; `None` when the chat has no administrators.
    pub admins_version: Option<i64>,
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

/// Gives the load's transaction its own statement timeout (`READ_MODEL_LOAD_TIMEOUT`), in
/// place of the requests' one the connection has: a full load of a large table takes longer
/// than any request may.
pub async fn set_load_timeout(
    conn: &mut PgConnection,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("select set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis()))
        .execute(conn)
        .await
        .map(|_| ())
}

/// Every chat, streamed into `sink` so that the rows are never held twice. Each row must come
/// within `row_deadline` of the one before: a connection that goes silent fails the load.
pub async fn load_all(
    conn: &mut PgConnection,
    row_deadline: Duration,
    mut sink: impl FnMut(LoadedRow),
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "select {RECORD_COLUMNS}, {LOWERED_DOCUMENT} as document \
         from chats c left join chat_participants p on p.chat_id = c.id {ADMINS_JOIN}"
    );
    let mut rows = sqlx::query_as::<_, RawRow>(&sql).fetch(&mut *conn);
    loop {
        let next = tokio::time::timeout(row_deadline, rows.try_next())
            .await
            .map_err(|_| {
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("postgres sent no row for {} s", row_deadline.as_secs()),
                ))
            })?;
        match next? {
            Some(row) => sink(row.into()),
            None => return Ok(()),
        }
    }
}

/// The named chats that still exist.
pub async fn load_ids(conn: &mut PgConnection, ids: &[i32]) -> Result<Vec<LoadedRow>, sqlx::Error> {
    let sql = format!(
        "select {RECORD_COLUMNS}, {LOWERED_DOCUMENT} as document \
         from chats c left join chat_participants p on p.chat_id = c.id {ADMINS_JOIN} \
         where c.id = any($1)"
    );
    let rows: Vec<RawRow> = sqlx::query_as(&sql).bind(ids).fetch_all(conn).await?;
    Ok(rows.into_iter().map(LoadedRow::from).collect())
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
    let sql = format!(
        "select c.id, c.xmin::text::bigint as chat_version, p.xmin::text::bigint as sync_version, \
           a.admins_version \
         from chats c left join chat_participants p on p.chat_id = c.id \
         {ADMINS_VERSIONS_JOIN} order by c.id"
    );
    let mut rows = sqlx::query_as::<_, VersionedId>(&sql).fetch(conn);
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

/// The channel a session's start-up check notifies itself on (`sync::primary`).
pub const PROBE_CHANNEL: &str = "participants_listen_probe";

/// Whether the server is a hot standby, where LISTEN fails.
pub async fn is_standby<'c>(
    conn: impl sqlx::Executor<'c, Database = Postgres>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select pg_is_in_recovery()")
        .fetch_one(conn)
        .await
}

/// Sends `payload` on `PROBE_CHANNEL`.
pub async fn notify_probe(pool: &sqlx::PgPool, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(PROBE_CHANNEL)
        .bind(payload)
        .execute(pool)
        .await
        .map(|_| ())
}
