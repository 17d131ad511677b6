//! Keeping the read model in step with Postgres: a full load at start-up, then the changed ids
//! that the triggers notify (gathered for a moment and reloaded from one snapshot, each moved
//! row placed in the text orders after the row Postgres puts before it), a heartbeat on the
//! listening connection while idle, and a periodic reconciliation of row versions and of each
//! text order's digest that heals whatever a lost notification, a reconnect or a race missed.
//!
//! Postgres going away never empties the model: reads go on from what was loaded, the model's
//! age grows (it is exported), and the loop reconnects with backoff and reconciles. No await
//! waits for Postgres unboundedly: connecting, every heartbeat and every load have deadlines,
//! and while a load or reload runs the listening connection keeps proving that Postgres
//! answers, so a silent partition (packets dropped, no reset) ends the session within seconds.
//! The task itself is supervised (`supervise`): a panic restarts it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

mod batch;
mod primary;
mod supervise;

pub use supervise::run;

use super::postgres::{self, CHANGES_CHANNEL};
use super::query::SortColumn;
use super::search::Lowercase;
use super::{Applied, Delta, LoadBuffer, Model, ReadModel, TextOrder};
use crate::metrics::Metrics;

/// An idle listener proves its connection (and so the model's currency) this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest a heartbeat may wait for its answer: with `HEARTBEAT`, a silent partition is
/// noticed within 11 s, idle or busy.
const PING_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a connection may take to open (the TCP and TLS handshakes and the start-up).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a full load waits for its next row: a stalled connection fails the load.
const ROW_DEADLINE: Duration = Duration::from_secs(25);
/// More changed ids than this in one batch are cheaper to take with a full load.
const MAX_BATCH_IDS: usize = 50_000;
/// When more than one chat in this many moves in a text column, its whole order is re-read
/// rather than each row placed (one index descent per row against one ordered scan).
const WHOLE_ORDER_SHARE: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the sync task needs: where Postgres is, and how long its work may take.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// `DATABASE_URL`, with the requests' statement timeout and server-side TCP keepalives.
    pub connect: PgConnectOptions,
    /// `READ_MODEL_RECONCILE_INTERVAL`.
    pub reconcile_every: Duration,
    /// `READ_MODEL_LOAD_TIMEOUT`: the statement timeout of a full load, and its deadline.
    pub load_timeout: Duration,
}

impl SyncSettings {
    /// The settings for `database`: the connection as the services' pools make it, plus TCP
    /// keepalives on the server's side (sqlx sets none on the client's socket; the deadlines
    /// here stand for them), so that Postgres ends the backend of a vanished api, and the
    /// snapshot a load holds, within about 25 s.
    pub fn new(
        database: &shared::config::DatabaseArgs,
        reconcile_every: Duration,
        load_timeout: Duration,
    ) -> Result<Self, shared::db::DatabaseSetupError> {
        let connect = shared::db::service_options(database)?.options([
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
        ]);
        Ok(Self {
            connect,
            reconcile_every,
            load_timeout,
        })
    }

    /// A pool of this session's own: the listening connection and one for loads. A session
    /// that fails drops it whole, with any connection stuck on a silent socket.
    fn session_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .min_connections(0)
            .acquire_timeout(CONNECT_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(self.connect.clone())
    }
}

/// Keeps `model` current until `cancel` fires, reconnecting after every failure. Returns an
/// error only when the database cannot be followed at all (`primary::Unusable`) before the
/// first load: the api then exits, naming the setting.
async fn follow(
    model: Arc<ReadModel>,
    settings: SyncSettings,
    metrics: Metrics,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let pool = settings.session_pool();
        let syncer = Syncer {
            model: &model,
            pool: &pool,
            metrics: &metrics,
            load_timeout: settings.load_timeout,
        };
        let result = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            result = syncer.session(settings.reconcile_every, &mut failing) => result,
        };
        drop(pool);
        let Err(error) = result else { continue };
        metrics.read_model_failures.inc();
        let unusable = error.downcast_ref::<primary::Unusable>().is_some();
        if unusable && !model.is_loaded() {
            return Err(error);
        }
        if !failing {
            failing = true;
            if model.is_loaded() {
                tracing::warn!(
                    error = format!("{error:#}"),
                    chats = model.n_chats(),
                    "read model lost postgres; serving the chats loaded last until it returns"
                );
            } else {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "read model cannot load from postgres; reads wait for it up to the request timeout, then answer 503"
                );
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Waits for `work` at most `limit`.
async fn within<T>(
    limit: Duration,
    what: &'static str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "{what}: postgres did not answer within {} s",
            limit.as_secs()
        ),
    }
}

/// Proves that the listening connection still reaches Postgres.
async fn ping(listener: &mut PgListener) -> anyhow::Result<()> {
    within(PING_DEADLINE, "heartbeat", async {
        sqlx::query("select 1")
            .execute(&mut *listener)
            .await
            .context("notification connection does not answer")
            .map(|_| ())
    })
    .await
}

/// Runs `work` (a load, reload or reconciliation on the session's other connection) within
/// `limit`, while the listening connection keeps beating: if Postgres goes silent, the work is
/// dropped within `HEARTBEAT + PING_DEADLINE`, whatever it was waiting for. Notifications
/// that arrive meanwhile are buffered by the listener, not lost.
async fn guarded<T>(
    listener: &mut PgListener,
    limit: Duration,
    what: &'static str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let watchdog = async {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            ping(listener).await?;
        }
    };
    tokio::select! {
        result = within(limit, what, work) => result,
        result = watchdog => result,
    }
}

/// A received notification, or why the connection failed.
fn notification(
    received: Result<Option<sqlx::postgres::PgNotification>, sqlx::Error>,
) -> anyhow::Result<sqlx::postgres::PgNotification> {
    received
        .context("notification connection failed")?
        .context("notification connection lost")
}

struct Syncer<'a> {
    model: &'a Arc<ReadModel>,
    pool: &'a PgPool,
    metrics: &'a Metrics,
    load_timeout: Duration,
}

impl Syncer<'_> {
    /// One connection's life: check the server, listen, catch up (full load or reconcile),
    /// then follow changes. Returns only with an error; the caller retries.
    async fn session(&self, reconcile_every: Duration, failing: &mut bool) -> anyhow::Result<()> {
        let mut listener = within(CONNECT_TIMEOUT, "connecting", async {
            PgListener::connect_with(self.pool)
                .await
                .context("cannot open the notification connection")
        })
        .await?;
        // A lost connection ends the session; the next one opens its own.
        listener.eager_reconnect(false);
        primary::check(&mut listener, self.pool).await?;
        within(PING_DEADLINE, "listening", async {
            listener
                .listen(CHANGES_CHANNEL)
                .await
                .context("cannot listen for chat changes")
        })
        .await?;
        // Listening starts before catching up, so nothing committed in between is missed.
        if self.model.is_loaded() {
            guarded(
                &mut listener,
                self.load_timeout,
                "reconciling",
                self.reconcile(),
            )
            .await?;
        } else {
            guarded(
                &mut listener,
                self.load_timeout,
                "loading",
                self.full_load(),
            )
            .await?;
        }
        if std::mem::take(failing) {
            tracing::info!(
                chats = self.model.n_chats(),
                "read model in step with postgres again"
            );
        }
        let mut next_reconcile = Instant::now() + reconcile_every;
        loop {
            match tokio::time::timeout(HEARTBEAT, listener.try_recv()).await {
                Ok(received) => {
                    let first = notification(received)?;
                    let batch = batch::gather(&mut listener, first).await?;
                    if batch.is_full() {
                        if batch.drained > 0 {
                            tracing::info!(
                                notifications = batch.drained + MAX_BATCH_IDS,
                                "a bulk change: one full load covers it"
                            );
                        }
                        guarded(
                            &mut listener,
                            self.load_timeout,
                            "loading",
                            self.full_load(),
                        )
                        .await?;
                    } else {
                        let ids: Vec<i32> = batch.ids.into_iter().collect();
                        guarded(
                            &mut listener,
                            self.load_timeout,
                            "reloading",
                            self.reload(&ids, "notified"),
                        )
                        .await?;
                    }
                }
                Err(_) => ping(&mut listener).await?,
            }
            // Every notification committed before this point has been applied.
            self.model.mark_synced();
            if Instant::now() >= next_reconcile {
                guarded(
                    &mut listener,
                    self.load_timeout,
                    "reconciling",
                    self.reconcile(),
                )
                .await?;
                next_reconcile = Instant::now() + reconcile_every;
            }
        }
    }

    /// Loads every chat from one snapshot and replaces the model. The load's statements run
    /// under `READ_MODEL_LOAD_TIMEOUT`, not the requests' statement timeout.
    async fn full_load(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut tx = postgres::snapshot(self.pool)
            .await
            .context("cannot start a load")?;
        postgres::set_load_timeout(&mut tx, self.load_timeout)
            .await
            .context("cannot set the load's statement timeout")?;
        let lowercase = Lowercase::from_pairs(
            postgres::lowercase_map(&mut tx)
                .await
                .context("cannot read the database's lowercase map")?,
        );
        let expected = postgres::count(&mut tx)
            .await
            .context("cannot count chats")?;
        let mut rows = LoadBuffer::with_capacity(usize::try_from(expected).unwrap_or(0));
        postgres::load_all(&mut tx, ROW_DEADLINE, |row| rows.push(row))
            .await
            .context("cannot load chats")?;
        let mut text_orders = Vec::new();
        for column in SortColumn::ALL.into_iter().filter(|c| c.is_text()) {
            let ids = postgres::text_order(&mut tx, column)
                .await
                .context("cannot load a sort order")?;
            text_orders.push((column, ids));
        }
        tx.commit().await.context("cannot finish a load")?;
        let n_rows = rows.len();
        let model = tokio::task::spawn_blocking(move || Model::build(rows, text_orders, lowercase))
            .await
            .context("building the read model panicked")?;
        self.model.replace(model);
        self.metrics.read_model_full_loads.inc();
        self.metrics
            .read_model_rows
            .with_label_values(&["full_load"])
            .inc_by(n_rows as u64);
        self.metrics.read_model_chats.set(n_rows as i64);
        let (_, text_bytes, postings) = self.model.footprint().unwrap_or_default();
        tracing::info!(
            chats = n_rows,
            text_bytes,
            trigram_postings = postings,
            duration_ms = started.elapsed().as_millis() as u64,
            "read model loaded"
        );
        Ok(())
    }

    /// Reloads the named chats from one snapshot, with where Postgres puts each moved row in the
    /// text orders, and applies them. A panic while applying is an error: the model is left
    /// as it was.
    async fn reload(&self, ids: &[i32], reason: &'static str) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = postgres::snapshot(self.pool)
            .await
            .context("cannot start a reload")?;
        let rows = postgres::load_ids(&mut tx, ids)
            .await
            .context("cannot reload changed chats")?;
        let found: HashSet<i32> = rows.iter().map(|row| row.record.id).collect();
        let deleted = ids
            .iter()
            .copied()
            .filter(|id| !found.contains(id))
            .collect();
        let n_chats = self.model.n_chats().max(rows.len());
        let mut text_orders = Vec::new();
        for (column, moved) in self.model.text_moves(&rows) {
            let placed = if moved.len().saturating_mul(WHOLE_ORDER_SHARE) > n_chats {
                None
            } else {
                self.place(&mut tx, column, &moved, &found).await?
            };
            let order = match placed {
                Some(placed) => placed,
                None => TextOrder::Whole(
                    postgres::text_order(&mut tx, column)
                        .await
                        .context("cannot reload a sort order")?,
                ),
            };
            let how = match order {
                TextOrder::Placed(_) => "placed",
                TextOrder::Whole(_) => "whole",
            };
            self.metrics
                .read_model_order_loads
                .with_label_values(&[how])
                .inc();
            text_orders.push((column, order));
        }
        tx.commit().await.context("cannot finish a reload")?;
        let applied = self
            .apply(Delta {
                rows,
                deleted,
                text_orders,
            })
            .await?;
        if applied.provisional > 0 {
            tracing::debug!(
                chats = applied.provisional,
                "read model placed chats last in a sort order until their place is known"
            );
        }
        self.metrics
            .read_model_rows
            .with_label_values(&[reason])
            .inc_by(ids.len() as u64);
        self.metrics
            .read_model_chats
            .set(self.model.n_chats() as i64);
        Ok(())
    }

    /// Where Postgres puts `moved` in `column`'s order, as predecessors; `None` when one of
    /// them is a row the model does not hold as it is in this snapshot (its own notification
    /// is on its way), so that placing after it could put a row in the wrong place for good.
    async fn place(
        &self,
        tx: &mut sqlx::PgConnection,
        column: SortColumn,
        moved: &[i32],
        batch: &HashSet<i32>,
    ) -> anyhow::Result<Option<TextOrder>> {
        let placed = postgres::predecessors(tx, column, moved)
            .await
            .context("cannot place changed chats in a sort order")?;
        // Rows of this batch are placed or re-read with it; the rest must be held as they are.
        let anchors: Vec<(i32, i64)> = placed
            .iter()
            .filter_map(|p| p.before.zip(p.before_version))
            .filter(|(id, _)| !batch.contains(id))
            .collect();
        if !self.model.holds_current(&anchors) {
            return Ok(None);
        }
        Ok(Some(TextOrder::Placed(
            placed.into_iter().map(|p| (p.id, p.before)).collect(),
        )))
    }

    /// Applies `delta` on the blocking pool (planning a large change is CPU work the async
    /// workers must not do); a panic in it becomes an error.
    async fn apply(&self, delta: Delta) -> anyhow::Result<Applied> {
        let model = Arc::clone(self.model);
        match tokio::task::spawn_blocking(move || model.apply(delta)).await {
            Ok(applied) => Ok(applied.unwrap_or_default()),
            Err(error) if error.is_panic() => Err(anyhow!(
                "applying changed chats to the read model panicked; the model is unchanged"
            )),
            Err(error) => Err(error).context("applying changed chats to the read model failed"),
        }
    }

    /// Compares each text column's order with Postgres' by digest, in `snapshot`, and re-reads
    /// from it a column that differs: an order can drift for good (a rename and back racing
    /// another batch), which row versions cannot show. Only called when the model holds every
    /// row of `snapshot` at its version, so a differing digest is drift, never a row that
    /// changed while the two were compared.
    async fn repair_orders(&self, snapshot: &mut PgConnection) -> anyhow::Result<()> {
        let model = Arc::clone(self.model);
        let ours = tokio::task::spawn_blocking(move || model.text_order_digests())
            .await
            .context("digesting the read model's sort orders failed")?;
        let mut differing = Vec::new();
        for (column, ours) in ours {
            match postgres::text_order_digest(snapshot, column).await {
                Ok(theirs) if theirs == ours => {}
                Ok(_) => differing.push(column),
                // Not worth failing the session over: row versions were reconciled, and the
                // next round tries again.
                Err(error) => {
                    self.metrics
                        .read_model_order_checks
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::warn!(
                        error = %error,
                        column = column.sql_name(),
                        "read model cannot compare a sort order with postgres"
                    );
                    return Ok(());
                }
            }
        }
        self.metrics
            .read_model_order_checks
            .with_label_values(&["compared"])
            .inc();
        for column in differing {
            let ids = postgres::text_order(snapshot, column)
                .await
                .context("cannot reload a sort order")?;
            self.apply(Delta {
                text_orders: vec![(column, TextOrder::Whole(ids))],
                ..Delta::default()
            })
            .await?;
            self.metrics.read_model_order_repairs.inc();
            tracing::warn!(
                column = column.sql_name(),
                "read model repaired a sort order that had drifted from postgres"
            );
        }
        Ok(())
    }

    /// Compares every row's version with Postgres and reloads the ones that differ.
    async fn reconcile(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        // Both sides in id order, walked together: Postgres' rows stream past ours, and only
        // the ids that differ (changed, new, or gone) are kept.
        let ours = self.model.versions();
        let mut at = 0;
        let mut differing = Vec::new();
        // One snapshot for the versions and the orders, under the load's statement timeout:
        // at a million chats each statement reads the whole table.
        let mut snapshot = postgres::snapshot(self.pool)
            .await
            .context("cannot start a reconciliation")?;
        postgres::set_load_timeout(&mut snapshot, self.load_timeout)
            .await
            .context("cannot set the reconciliation's statement timeout")?;
        postgres::versions(&mut snapshot, |row| {
            while at < ours.len() && ours[at].0 < row.id {
                differing.push(ours[at].0);
                at += 1;
            }
            if at < ours.len() && ours[at].0 == row.id {
                if ours[at].1 != row.version {
                    differing.push(row.id);
                }
                at += 1;
            } else {
                differing.push(row.id);
            }
        })
        .await
        .context("cannot read row versions")?;
        // What is left of ours no longer exists in Postgres.
        differing.extend(ours[at..].iter().map(|(id, _)| *id));
        if differing.is_empty() {
            // The model holds this snapshot row for row (nothing changes it meanwhile: this
            // task is its only writer), so the orders can be compared in the same snapshot.
            self.repair_orders(&mut snapshot).await?;
        } else {
            self.metrics
                .read_model_order_checks
                .with_label_values(&["skipped"])
                .inc();
        }
        snapshot
            .commit()
            .await
            .context("cannot finish a reconciliation")?;
        if !differing.is_empty() {
            // Rows moved under the comparison; their orders are compared in a later round in
            // which Postgres and the model agree row for row.
            tracing::info!(
                chats = differing.len(),
                duration_ms = started.elapsed().as_millis() as u64,
                "read model reconciliation reloads chats that changed unnoticed"
            );
            if differing.len() > MAX_BATCH_IDS {
                return self.full_load().await;
            }
            self.reload(&differing, "reconciled").await?;
        }
        self.model.mark_synced();
        Ok(())
    }
}
