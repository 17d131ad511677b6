//! syncd's Postgres: which chats to refresh, the fenced batched writes of results, and the
//! sweep bookkeeping. The one place syncd's SQL lives.

use chrono::{DateTime, Utc};
use shared::sweeps::{self, StartedBy, SweepKind, SweepRecord, SweepState, RECORD_COLUMNS};
use shared::sync_status::SyncStatus;
use sqlx::{PgPool, Postgres, Transaction};

/// A chat as syncd sees it before asking MAX.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Target {
    pub chat_id: i32,
    pub max_chat_id: Option<String>,
    pub participants_count: Option<i32>,
    pub participants_updated_at: Option<DateTime<Utc>>,
    pub sync_status: Option<SyncStatus>,
    pub checked_at: Option<DateTime<Utc>>,
    /// Failed answers in a row (0 after a count).
    pub consecutive_failures: i32,
    /// Why the last answer gave no count (`None` after a count).
    pub last_error: Option<String>,
    /// The trace of the request that asked for this refresh, if any (not a column).
    #[sqlx(skip)]
    pub traceparent: Option<String>,
}

impl Target {
    /// Whether the chat last gave a count: its answers are evidence about the setup (a chat
    /// gone before, or never refreshed, is not).
    pub fn known_active(&self) -> bool {
        self.sync_status == Some(SyncStatus::Active) && self.participants_updated_at.is_some()
    }

    /// Failures in a row that are the chat's own. Only those are recorded: outages (of
    /// Postgres, Redis, or MAX for every chat) and faults of the setup never are.
    pub fn own_failures(&self) -> i32 {
        if self.sync_status == Some(SyncStatus::Active) {
            self.consecutive_failures
        } else {
            0
        }
    }

    /// False for a chat MAX said the bot cannot see, until `recheck_before` has passed.
    pub fn is_due(&self, recheck_before: DateTime<Utc>) -> bool {
        match &self.sync_status {
            None | Some(SyncStatus::Active) => true,
            Some(_) => self.checked_at.is_none_or(|at| at < recheck_before),
        }
    }

    /// Until when an active chat whose answers keep failing is left alone (see
    /// `FAILURE_BACKOFF_SQL`), so a few bad chats cannot take the budget of every read and
    /// every stale sweep.
    pub fn backing_off_until(&self) -> Option<DateTime<Utc>> {
        if self.consecutive_failures <= 0 || self.sync_status != Some(SyncStatus::Active) {
            return None;
        }
        let checked_at = self.checked_at?;
        let exponent = (self.consecutive_failures - 1).clamp(0, 16) as u32;
        let backoff = (FAILURE_BACKOFF_BASE * 2u32.pow(exponent)).min(FAILURE_BACKOFF_CAP);
        Some(checked_at + chrono::Duration::from_std(backoff).unwrap_or_default())
    }
}

/// The first wait after a failed answer; it doubles with each failure in a row.
pub const FAILURE_BACKOFF_BASE: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest wait between attempts at a chat that keeps failing.
pub const FAILURE_BACKOFF_CAP: std::time::Duration = std::time::Duration::from_secs(3600);

/// `Target::backing_off_until` in SQL, for the stale sweep's query (`p` is chat_participants).
const FAILURE_BACKOFF_SQL: &str = "(p.checked_at + least(interval '60 seconds' \
     * power(2, least(greatest(p.consecutive_failures, 1) - 1, 16)), interval '3600 seconds'))";

const TARGET_COLUMNS: &str = "c.id as chat_id, c.max_chat_id, p.participants_count, \
     p.participants_updated_at, p.sync_status, p.checked_at, \
     coalesce(p.consecutive_failures, 0) as consecutive_failures, p.last_error";

/// One chat as `syncd inspect` shows it: the legacy row's fields and syncd's view of it.
pub struct InspectRow {
    pub name: String,
    pub legacy_count: Option<i32>,
    pub updated_at: Option<DateTime<Utc>>,
    pub target: Target,
}

pub async fn inspect_row(pool: &PgPool, id: i32) -> Result<Option<InspectRow>, sqlx::Error> {
    let Some(target) = targets_by_id(pool, &[id]).await?.into_iter().next() else {
        return Ok(None);
    };
    let (name, legacy_count, updated_at): (String, Option<i32>, Option<DateTime<Utc>>) =
        sqlx::query_as("select name, participants_count, updated_at from chats where id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
    Ok(Some(InspectRow {
        name,
        legacy_count,
        updated_at,
        target,
    }))
}

pub async fn targets_by_id(pool: &PgPool, ids: &[i32]) -> Result<Vec<Target>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {TARGET_COLUMNS} from chats c left join chat_participants p on p.chat_id = c.id \
         where c.id = any($1) order by c.id"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Whether any chat ever gave a count (a new deployment has none yet).
pub async fn any_chat_has_a_count(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from chat_participants \
         where sync_status = 'active' and participants_updated_at is not null)",
    )
    .fetch_one(pool)
    .await
}

/// A chat that last gave a count, not among `excluded`, with a usable MAX id (`$1` a start on
/// the primary key, `$2` the excluded ids).
const KNOWN_ACTIVE_FROM: &str =
    "select c.id, c.max_chat_id from chat_participants p join chats c on c.id = p.chat_id \
     where p.chat_id >= $1 and p.sync_status = 'active' and not (p.chat_id = any($2)) \
       and p.participants_updated_at is not null and c.max_chat_id ~ '^-?[0-9]+$' \
     order by p.chat_id limit 1";
/// Any chat with a usable MAX id, not among `excluded`.
const ANY_FROM: &str = "select c.id, c.max_chat_id from chats c \
     where c.id >= $1 and not (c.id = any($2)) and c.max_chat_id ~ '^-?[0-9]+$' \
     order by c.id limit 1";

/// The first chat `pick` finds from a random start on the primary key (or, past the last,
/// from the first): a random choice without a scan of the table. Its id and MAX id.
async fn pick_at_random(
    pool: &PgPool,
    pick: &str,
    excluded: &[i32],
) -> Result<Option<(i32, String)>, sqlx::Error> {
    let bounds: (Option<i32>, Option<i32>) = sqlx::query_as("select min(id), max(id) from chats")
        .fetch_one(pool)
        .await?;
    let (Some(low), Some(high)) = bounds else {
        return Ok(None);
    };
    let span = (i64::from(high) - i64::from(low) + 1).max(1);
    let from = (i64::from(low) + i64::from(rand::random::<u32>()) % span) as i32;
    for start in [from, low] {
        let found: Option<(i32, String)> = sqlx::query_as(pick)
            .bind(start)
            .bind(excluded)
            .fetch_optional(pool)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// A chat to probe MAX with while calls are stopped: one that last gave a count, picked at
/// random each time (so that one chat gone since cannot keep calls stopped). A deployment with
/// no count yet probes any chat with a usable MAX id.
pub async fn probe_chat(pool: &PgPool) -> Result<Option<String>, sqlx::Error> {
    for pick in [KNOWN_ACTIVE_FROM, ANY_FROM] {
        if let Some((_, max_id)) = pick_at_random(pool, pick, &[]).await? {
            return Ok(Some(max_id));
        }
    }
    Ok(None)
}

/// A chat to control a suspect answer with: one that last gave a count, not among `suspects`,
/// picked at random. Its id and MAX id.
pub async fn control_chat(
    pool: &PgPool,
    suspects: &[i32],
) -> Result<Option<(i32, String)>, sqlx::Error> {
    pick_at_random(pool, KNOWN_ACTIVE_FROM, suspects).await
}

/// The next page of a full sweep, in id order after `after_id`.
pub async fn targets_after(
    pool: &PgPool,
    after_id: i32,
    limit: i64,
) -> Result<Vec<Target>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {TARGET_COLUMNS} from chats c left join chat_participants p on p.chat_id = c.id \
         where c.id > $1 order by c.id limit $2"
    ))
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The chats most in need of a refresh, in two kinds interleaved, so that neither fills a page
/// alone: counts gone stale, by age weighted by how often people read them (an hour-old count
/// of a chat read 20 times outranks a two-hour-old one nobody reads), skipping chats whose
/// answers keep failing until their backoff ends; and chats without a count of their own yet
/// (new, perhaps not yet joined by the bot) or that MAX said are gone and are due for their
/// recheck. The second kind's answers are their own outcome, so a page of them never stops the
/// fleet; interleaving keeps both moving when many come due together.
pub async fn stale_targets(
    pool: &PgPool,
    now: DateTime<Utc>,
    stale_before: DateTime<Utc>,
    recheck_before: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Target>, sqlx::Error> {
    let stale: Vec<Target> = sqlx::query_as(&format!(
        "select {TARGET_COLUMNS} from chats c join chat_participants p on p.chat_id = c.id \
         where c.max_chat_id is not null \
           and p.sync_status = 'active' and p.participants_updated_at < $2 \
           and (p.consecutive_failures = 0 or p.checked_at is null or {FAILURE_BACKOFF_SQL} < $1) \
         order by extract(epoch from ($1 - p.participants_updated_at)) \
                      * (1 + ln(1 + greatest(coalesce(p.read_count, 0), 0))) desc, c.id \
         limit $3"
    ))
    .bind(now)
    .bind(stale_before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let unknown: Vec<Target> = sqlx::query_as(&format!(
        "select {TARGET_COLUMNS} from chats c left join chat_participants p on p.chat_id = c.id \
         where c.max_chat_id is not null \
           and (p.chat_id is null \
                or (p.sync_status = 'active' and p.participants_updated_at is null \
                    and (p.consecutive_failures = 0 or p.checked_at is null or {FAILURE_BACKOFF_SQL} < $1)) \
                or (p.sync_status <> 'active' and (p.checked_at is null or p.checked_at < $2))) \
         order by p.checked_at nulls first, c.id \
         limit $3"
    ))
    .bind(now)
    .bind(recheck_before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(interleave(stale, unknown, limit.max(0) as usize))
}

/// Merges two ordered lists evenly by their lengths (each keeps its order), up to `limit`.
pub fn interleave<T>(a: Vec<T>, b: Vec<T>, limit: usize) -> Vec<T> {
    let (len_a, len_b) = (a.len().max(1) as f64, b.len().max(1) as f64);
    let mut keyed: Vec<(f64, usize, T)> = a
        .into_iter()
        .enumerate()
        .map(|(i, t)| ((i as f64 + 0.5) / len_a, 0, t))
        .chain(
            b.into_iter()
                .enumerate()
                .map(|(i, t)| ((i as f64 + 0.5) / len_b, 1, t)),
        )
        .collect();
    keyed.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    keyed.into_iter().take(limit).map(|(_, _, t)| t).collect()
}

/// How many chats there are (a full sweep's plan).
pub async fn count_chats(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from chats")
        .fetch_one(pool)
        .await
}

/// Whether Postgres answers (`/health`).
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select 1").execute(pool).await.map(|_| ())
}

/// Chats by freshness bucket against `stale_threshold` (`syncd status`), in display order.
pub async fn freshness_buckets(
    pool: &PgPool,
    stale_threshold: std::time::Duration,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "select bucket, count(*) from ( \
           select case \
             when c.max_chat_id is null or p.sync_status = 'invalid_id' then '6 no usable MAX id' \
             when p.sync_status is not null and p.sync_status <> 'active' then '5 gone (' || p.sync_status || ')' \
             when p.participants_updated_at is null then '4 never refreshed' \
             when now() - p.participants_updated_at <= make_interval(secs => $1 / 4) then '0 fresh (< 1/4 threshold)' \
             when now() - p.participants_updated_at <= make_interval(secs => $1) then '1 fresh (< threshold)' \
             when now() - p.participants_updated_at <= make_interval(secs => $1 * 24) then '2 stale (< 24x threshold)' \
             else '3 stale (older)' end as bucket \
           from chats c left join chat_participants p on p.chat_id = c.id) b \
         group by bucket order by bucket",
    )
    .bind(stale_threshold.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// How many chats with a MAX id have a count older than `stale_before` or none.
pub async fn count_stale(pool: &PgPool, stale_before: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "select count(*) from chats c left join chat_participants p on p.chat_id = c.id \
         where c.max_chat_id is not null and coalesce(p.sync_status, 'active') = 'active' \
           and (p.participants_updated_at is null or p.participants_updated_at < $1)",
    )
    .bind(stale_before)
    .fetch_one(pool)
    .await
}

/// A count MAX gave, and when it was asked.
#[derive(Clone, Copy, Debug)]
pub struct FreshCount {
    pub chat_id: i32,
    pub count: i32,
    pub asked_at: DateTime<Utc>,
}

/// Writes counts in one statement, each only where it is newer than the stored one, and
/// mirrors a changed count into `chats.participants_count` (the legacy column and fallback).
/// Chats deleted meanwhile are skipped. Returns how many counts were written.
///
/// The transaction is marked as the count mirror, for the trigger
/// `zz_participants_count_mirror_keeps_updated_at` of the next release (docs/next-release/),
/// which undoes the legacy trigger's `updated_at` stamp; until it lands, the mirror moves
/// `updated_at` as it always did (README: the legacy table).
///
/// A count asked before a newer failure was recorded (a slow success landing after a `Gone`)
/// is kept as the last known count but leaves the chat's status as the failure set it. Times
/// ahead of the database's clock (a replica whose clock runs fast) are taken as the database's
/// now, so they cannot fence out the correct answers that follow.
pub async fn write_counts(pool: &PgPool, counts: &[FreshCount]) -> Result<u64, sqlx::Error> {
    if counts.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i32> = counts.iter().map(|c| c.chat_id).collect();
    let values: Vec<i32> = counts.iter().map(|c| c.count).collect();
    let asked: Vec<DateTime<Utc>> = counts.iter().map(|c| c.asked_at).collect();
    let mut tx = pool.begin().await?;
    sqlx::query("select set_config('participants.count_mirror', 'on', true)")
        .execute(&mut *tx)
        .await?;
    let written: i64 = sqlx::query_scalar(
        "with input as ( \
             select distinct on (t.chat_id) t.chat_id, t.count, least(t.asked_at, now()) as asked_at \
             from unnest($1::integer[], $2::integer[], $3::timestamptz[]) as t(chat_id, count, asked_at) \
             join chats c on c.id = t.chat_id \
             order by t.chat_id, t.asked_at desc), \
         written as ( \
             insert into chat_participants as p \
                 (chat_id, participants_count, participants_updated_at, sync_status, checked_at, last_error, consecutive_failures) \
             select chat_id, count, asked_at, 'active', asked_at, null, 0 from input \
             on conflict (chat_id) do update set \
                 participants_count = excluded.participants_count, \
                 participants_updated_at = excluded.participants_updated_at, \
                 sync_status = case when p.checked_at > excluded.checked_at then p.sync_status else 'active' end, \
                 checked_at = greatest(p.checked_at, excluded.checked_at), \
                 last_error = case when p.checked_at > excluded.checked_at then p.last_error end, \
                 consecutive_failures = case when p.checked_at > excluded.checked_at then p.consecutive_failures else 0 end \
             where p.participants_updated_at is null or p.participants_updated_at < excluded.participants_updated_at \
             returning p.chat_id, p.participants_count), \
         mirrored as ( \
             update chats c set participants_count = w.participants_count from written w \
             where c.id = w.chat_id and c.participants_count is distinct from w.participants_count) \
         select count(*) from written",
    )
    .bind(&ids)
    .bind(&values)
    .bind(&asked)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(written as u64)
}

/// Why a chat got no count.
#[derive(Clone, Debug)]
pub struct Failure {
    pub chat_id: i32,
    /// `Active` for a passing failure, else why MAX will not give a count.
    pub status: SyncStatus,
    pub error: String,
    pub asked_at: DateTime<Utc>,
}

/// When the last sweep of `kind` finished, fleet-wide (Unix seconds).
pub async fn last_finished(pool: &PgPool, kind: SweepKind) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "select extract(epoch from max(finished_at))::bigint from sync_sweeps \
         where kind = $1 and finished_at is not null",
    )
    .bind(kind.as_str())
    .fetch_one(pool)
    .await
}

/// Records failures in one statement, fenced by `checked_at` (at most the database's now). The
/// last count is kept.
pub async fn write_failures(pool: &PgPool, failures: &[Failure]) -> Result<(), sqlx::Error> {
    if failures.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = failures.iter().map(|f| f.chat_id).collect();
    let statuses: Vec<&str> = failures.iter().map(|f| f.status.as_str()).collect();
    let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
    let asked: Vec<DateTime<Utc>> = failures.iter().map(|f| f.asked_at).collect();
    sqlx::query(
        "insert into chat_participants as p (chat_id, sync_status, checked_at, last_error, consecutive_failures) \
         select distinct on (t.chat_id) t.chat_id, t.status, least(t.asked_at, now()), t.error, 1 \
         from unnest($1::integer[], $2::text[], $3::text[], $4::timestamptz[]) as t(chat_id, status, error, asked_at) \
         join chats c on c.id = t.chat_id \
         order by t.chat_id, t.asked_at desc \
         on conflict (chat_id) do update set \
             sync_status = excluded.sync_status, \
             checked_at = excluded.checked_at, \
             last_error = excluded.last_error, \
             consecutive_failures = p.consecutive_failures + 1 \
         where p.checked_at is null or p.checked_at < excluded.checked_at",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&errors)
    .bind(&asked)
    .execute(pool)
    .await?;
    Ok(())
}

/// Counts reads of chats (one per lazy refresh entry) to weight the stale sweep.
pub async fn record_reads(pool: &PgPool, reads: &[(i32, i32)]) -> Result<(), sqlx::Error> {
    if reads.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = reads.iter().map(|r| r.0).collect();
    let counts: Vec<i32> = reads.iter().map(|r| r.1).collect();
    sqlx::query(
        "insert into chat_participants as p (chat_id, read_count, last_read_at) \
         select t.chat_id, t.n, now() from unnest($1::integer[], $2::integer[]) as t(chat_id, n) \
         join chats c on c.id = t.chat_id \
         on conflict (chat_id) do update set read_count = p.read_count + excluded.read_count, last_read_at = now()",
    )
    .bind(&ids)
    .bind(&counts)
    .execute(pool)
    .await?;
    Ok(())
}

/// Halves every chat's read weight (after each full sweep): the weights follow what people
/// read now, with a half-life of a full-sweep period, instead of growing forever.
pub async fn decay_reads(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query(
            "update chat_participants set read_count = read_count / 2 where read_count > 0",
        )
        .execute(pool)
        .await?
        .rows_affected(),
    )
}

/// Deletes finished sweeps older than `keep`, except each kind's newest (which the schedules
/// read to find missed slots). Returns how many.
pub async fn prune_sweeps(pool: &PgPool, keep: std::time::Duration) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "delete from sync_sweeps s where finished_at < now() - make_interval(secs => $1) \
         and slot < (select max(slot) from sync_sweeps n where n.kind = s.kind)",
    )
    .bind(keep.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// One sweep's row, as its owner works on it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Sweep {
    #[sqlx(try_from = "String")]
    pub kind: SweepKind,
    pub slot: DateTime<Utc>,
    pub position: i32,
    pub planned: Option<i32>,
    pub done: i32,
    pub failed: i32,
    pub calls: i32,
}

const SWEEP_COLUMNS: &str = "kind, slot, position, planned, done, failed, calls";

/// What claiming a slot found.
#[derive(Debug)]
pub enum Claim {
    /// The slot is this process's to run (new, or resumed from an owner that stopped).
    Claimed(Sweep),
    /// Another process holds the slot, or it is done.
    Taken(SweepRecord),
    /// Another sweep of the kind was running when the slot came; the slot is recorded as served
    /// by it.
    Covered(SweepRecord),
}

/// Claims a slot of `kind`, so that it runs once across the fleet and never beside another
/// sweep of its kind: the first caller records and runs it; a later caller finds it `Taken`
/// (or takes it over when its owner's lease lapsed); a slot that comes while another sweep of
/// the kind runs is `Covered` by that sweep.
pub async fn claim_slot(
    pool: &PgPool,
    kind: SweepKind,
    slot: DateTime<Utc>,
    owner: &str,
    lease: std::time::Duration,
    started_by: StartedBy,
) -> Result<Claim, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sweeps::lock_kind(&mut tx, kind).await?;
    if let Some(existing) = sweep_record(&mut *tx, kind, slot).await? {
        let claim = match existing.state() {
            SweepState::Waiting | SweepState::Orphaned => {
                Claim::Claimed(take(&mut tx, kind, slot, owner, lease).await?)
            }
            _ => Claim::Taken(existing),
        };
        tx.commit().await?;
        return Ok(claim);
    }
    if let Some(running) = sweeps::unfinished(&mut tx, kind).await? {
        sqlx::query(
            "insert into sync_sweeps (kind, slot, started_by, started_at, finished_at, covered_by) \
             values ($1, $2, $3, now(), now(), $4)",
        )
        .bind(kind.as_str())
        .bind(slot)
        .bind(started_by.as_str())
        .bind(running.slot)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(Claim::Covered(running));
    }
    let sweep = sqlx::query_as(&format!(
        "insert into sync_sweeps (kind, slot, owner, lease_until, started_by) \
         values ($1, $2, $3, now() + make_interval(secs => $4), $5) \
         returning {SWEEP_COLUMNS}"
    ))
    .bind(kind.as_str())
    .bind(slot)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(started_by.as_str())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Claim::Claimed(sweep))
}

async fn take(
    tx: &mut Transaction<'_, Postgres>,
    kind: SweepKind,
    slot: DateTime<Utc>,
    owner: &str,
    lease: std::time::Duration,
) -> Result<Sweep, sqlx::Error> {
    sqlx::query_as(&format!(
        "update sync_sweeps set owner = $3, lease_until = now() + make_interval(secs => $4) \
         where kind = $1 and slot = $2 returning {SWEEP_COLUMNS}"
    ))
    .bind(kind.as_str())
    .bind(slot)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_one(&mut **tx)
    .await
}

/// One sweep's record, to watch a sweep another process runs.
pub async fn sweep_record<'e>(
    db: impl sqlx::PgExecutor<'e>,
    kind: SweepKind,
    slot: DateTime<Utc>,
) -> Result<Option<SweepRecord>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {RECORD_COLUMNS} from sync_sweeps where kind = $1 and slot = $2"
    ))
    .bind(kind.as_str())
    .bind(slot)
    .fetch_optional(db)
    .await
}

/// Takes over one unfinished sweep that nobody holds: asked for by an operator (no owner yet)
/// or left behind by a replica that stopped renewing its lease.
pub async fn take_over_orphan(
    pool: &PgPool,
    owner: &str,
    lease: std::time::Duration,
) -> Result<Option<Sweep>, sqlx::Error> {
    sqlx::query_as(
        "update sync_sweeps s set owner = $1, lease_until = now() + make_interval(secs => $2) \
         from (select kind, slot from sync_sweeps \
               where finished_at is null and (owner is null or lease_until < now()) \
               order by slot limit 1 for update skip locked) o \
         where s.kind = o.kind and s.slot = o.slot \
         returning s.kind, s.slot, s.position, s.planned, s.done, s.failed, s.calls",
    )
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Writes a sweep's progress (`position`, `planned`, `done`, `failed`) to its row, with the
/// extra `set` and `where` clauses of the caller; `$9` is `lease` in seconds when given.
/// Returns the rows updated (0 when the row is no longer this owner's).
async fn write_progress(
    pool: &PgPool,
    sweep: &Sweep,
    owner: &str,
    extra_set: &str,
    extra_where: &str,
    lease: Option<std::time::Duration>,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "update sync_sweeps set position = $4, planned = $5, done = $6, failed = $7, calls = $8, \
         {extra_set} where kind = $1 and slot = $2 and owner = $3 {extra_where}"
    );
    let mut query = sqlx::query(&sql)
        .bind(sweep.kind.as_str())
        .bind(sweep.slot)
        .bind(owner)
        .bind(sweep.position)
        .bind(sweep.planned)
        .bind(sweep.done)
        .bind(sweep.failed)
        .bind(sweep.calls);
    if let Some(lease) = lease {
        query = query.bind(lease.as_secs_f64());
    }
    Ok(query.execute(pool).await?.rows_affected())
}

/// Records progress and renews the lease. False when the lease was lost to another replica.
pub async fn advance_sweep(
    pool: &PgPool,
    sweep: &Sweep,
    owner: &str,
    lease: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let updated = write_progress(
        pool,
        sweep,
        owner,
        "lease_until = now() + make_interval(secs => $9)",
        "and finished_at is null",
        Some(lease),
    )
    .await?;
    Ok(updated == 1)
}

pub async fn finish_sweep(pool: &PgPool, sweep: &Sweep, owner: &str) -> Result<(), sqlx::Error> {
    write_progress(
        pool,
        sweep,
        owner,
        "finished_at = now(), lease_until = null",
        "",
        None,
    )
    .await?;
    Ok(())
}

/// Gives a sweep back on shutdown so that another replica resumes it at once.
pub async fn release_sweep(pool: &PgPool, sweep: &Sweep, owner: &str) -> Result<(), sqlx::Error> {
    write_progress(
        pool,
        sweep,
        owner,
        "owner = null, lease_until = null",
        "and finished_at is null",
        None,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_lists_interleave_evenly_and_keep_their_orders() {
        let merged = interleave(vec![1, 2, 3, 4], vec![10, 20], 10);
        assert_eq!(merged, [1, 10, 2, 3, 20, 4]);
        assert_eq!(interleave(vec![1, 2], Vec::new(), 10), [1, 2]);
        assert_eq!(interleave(Vec::new(), vec![10, 20], 1), [10]);
        let page = interleave((0..100).collect(), (100..200).collect(), 50);
        assert_eq!(
            page.iter().filter(|n| **n >= 100).count(),
            25,
            "half of each"
        );
    }
}
