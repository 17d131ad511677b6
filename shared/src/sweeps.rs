//! The sweep ledger in `sync_sweeps`: what kinds of sweep exist, how one is started (so that at
//! most one of a kind runs at a time, whoever starts it), and what the admin panel and
//! `syncd status` read of it. syncd's own bookkeeping SQL (progress, leases) is in its `store`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

/// A kind of sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepKind {
    /// The stalest and most-read chats, as many as the budget until the next slot allows.
    Stale,
    /// Every chat, in id order.
    Full,
}

impl SweepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SweepKind::Stale => "stale",
            SweepKind::Full => "full",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "stale" => Some(SweepKind::Stale),
            "full" => Some(SweepKind::Full),
            _ => None,
        }
    }

    /// The advisory lock that serialises starting a sweep of this kind.
    fn lock_key(self) -> i64 {
        // "sweeps" in ASCII, plus the kind: fixed numbers, so every release agrees.
        0x7377_6565_7073_0000
            + match self {
                SweepKind::Stale => 1,
                SweepKind::Full => 2,
            }
    }
}

impl fmt::Display for SweepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for SweepKind {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        SweepKind::parse(&text).ok_or_else(|| format!("unknown sweep kind `{text}`"))
    }
}

/// Who started a sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartedBy {
    /// syncd's cron schedule.
    Schedule,
    /// `syncd sweep` (an operator, or a Kubernetes CronJob).
    Command,
    /// `POST /admin/participants/full-update`.
    Admin,
}

impl StartedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            StartedBy::Schedule => "schedule",
            StartedBy::Command => "command",
            StartedBy::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "schedule" => Some(StartedBy::Schedule),
            "command" => Some(StartedBy::Command),
            "admin" => Some(StartedBy::Admin),
            _ => None,
        }
    }
}

/// Where a sweep stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    /// Recorded, and no replica has taken it yet (or its owner handed it back).
    Waiting,
    /// A replica holds it and renews its lease.
    Running,
    /// Its owner stopped renewing the lease; a replica resumes it within seconds.
    Orphaned,
    Finished,
    /// Its slot came while another sweep of the kind was running; that sweep served it.
    Covered,
}

/// One row of the ledger, as operators see it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct SweepRecord {
    #[sqlx(try_from = "String")]
    pub kind: SweepKind,
    /// The cron slot it serves, or the moment it was asked for.
    pub slot: DateTime<Utc>,
    #[serde(skip)]
    pub started_by: Option<String>,
    pub requested_by: Option<String>,
    pub owner: Option<String>,
    #[serde(skip)]
    pub lease_until: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The slot of the sweep that served this one (`covered`).
    pub covered_by: Option<DateTime<Utc>>,
    pub planned: Option<i32>,
    pub done: i32,
    pub failed: i32,
    pub calls: i32,
    /// The database's clock when the row was read (leases are on it).
    #[serde(skip)]
    pub read_at: DateTime<Utc>,
}

impl SweepRecord {
    pub fn state(&self) -> SweepState {
        match (
            self.finished_at,
            self.covered_by,
            &self.owner,
            self.lease_until,
        ) {
            (Some(_), Some(_), _, _) => SweepState::Covered,
            (Some(_), None, _, _) => SweepState::Finished,
            (None, _, None, _) => SweepState::Waiting,
            (None, _, Some(_), Some(lease)) if lease >= self.read_at => SweepState::Running,
            (None, _, Some(_), _) => SweepState::Orphaned,
        }
    }

    pub fn started_by(&self) -> Option<StartedBy> {
        self.started_by.as_deref().and_then(StartedBy::parse)
    }

    /// Share of the planned chats done, 0 to 1, once planned.
    pub fn progress(&self) -> Option<f64> {
        let planned = self.planned?;
        if self.state() == SweepState::Finished {
            return Some(1.0);
        }
        (planned > 0).then(|| (f64::from(self.done) / f64::from(planned)).clamp(0.0, 1.0))
    }
}

/// The columns of a `SweepRecord`, for `select`s.
pub const RECORD_COLUMNS: &str = "kind, slot, started_by, requested_by, owner, lease_until, \
     started_at, finished_at, covered_by, planned, done, failed, calls, now() as read_at";

/// Takes the lock that serialises starting sweeps of `kind`, until the transaction ends.
pub async fn lock_kind(
    tx: &mut Transaction<'_, Postgres>,
    kind: SweepKind,
) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(kind.lock_key())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The unfinished sweep of `kind`, if any (at most one exists once started through here).
pub async fn unfinished(
    tx: &mut Transaction<'_, Postgres>,
    kind: SweepKind,
) -> Result<Option<SweepRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {RECORD_COLUMNS} from sync_sweeps where kind = $1 and finished_at is null \
         order by slot limit 1"
    ))
    .bind(kind.as_str())
    .fetch_optional(&mut **tx)
    .await
}

/// What asking for a sweep did.
#[derive(Debug)]
pub enum Requested {
    /// Recorded; a syncd replica takes it within seconds.
    Recorded(SweepRecord),
    /// A sweep of this kind is already running or waiting; nothing was recorded.
    AlreadyRunning(SweepRecord),
}

/// Asks for a sweep now, unless one of the kind is already unfinished.
pub async fn request(
    pool: &PgPool,
    kind: SweepKind,
    started_by: StartedBy,
    requested_by: Option<&str>,
) -> Result<Requested, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_kind(&mut tx, kind).await?;
    if let Some(running) = unfinished(&mut tx, kind).await? {
        tx.rollback().await?;
        return Ok(Requested::AlreadyRunning(running));
    }
    let record = sqlx::query_as(&format!(
        "insert into sync_sweeps (kind, slot, started_by, requested_by) \
         values ($1, date_trunc('milliseconds', now()), $2, $3) \
         returning {RECORD_COLUMNS}"
    ))
    .bind(kind.as_str())
    .bind(started_by.as_str())
    .bind(requested_by)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Requested::Recorded(record))
}

/// The unfinished sweeps and the most recent ones, newest slot first.
pub async fn recent(pool: &PgPool, limit: i64) -> Result<Vec<SweepRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {RECORD_COLUMNS} from sync_sweeps \
         where finished_at is null \
            or slot in (select slot from sync_sweeps order by slot desc limit $1) \
         order by slot desc, kind"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The newest slot the fleet has recorded for `kind` from its schedule (or a command taking
/// the schedule's slot); sweeps asked for by an admin do not count.
pub async fn last_scheduled_slot(
    pool: &PgPool,
    kind: SweepKind,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "select max(slot) from sync_sweeps where kind = $1 \
         and coalesce(started_by, 'schedule') <> 'admin'",
    )
    .bind(kind.as_str())
    .fetch_one(pool)
    .await
}
