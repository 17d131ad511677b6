//! The api's direct Postgres queries outside the read model: the health ping and the drift
//! sample of `GET /admin/participants/validate`. (The read model's SQL is in
//! `read_model::postgres`.)

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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

/// Whether the primary answers: a server that answers but is a standby does not count (the
/// read model cannot follow it).
pub async fn primary_answers(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select not pg_is_in_recovery()")
        .fetch_one(pool)
        .await
}

/// A cheap query that proves Postgres answers.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(pool).await.map(|_| ())
}
