//! Keeping the read model in step with Postgres: a full load at start-up, then the changed ids
//! that the triggers notify (gathered for a moment and reloaded from one snapshot, each moved
//! row placed in the text orders after the row Postgres puts before it), a heartbeat on the
//! listening connection while idle, and a periodic reconciliation of row versions and of each
//! text order's digest that heals whatever a lost notification, a reconnect or a race missed.
//!
//! Postgres going away never empties the model: reads go on from what was loaded, the model's
//! age grows (it is exported), and the loop reconnects with backoff and reconciles.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::postgres::{self, CHANGES_CHANNEL, RELOAD_ALL};
use super::query::SortColumn;
use super::search::Lowercase;
use super::{Applied, Delta, LoadBuffer, Model, ReadModel, TextOrder};
use crate::metrics::Metrics;

/// How long notifications are gathered before the rows they name are reloaded together.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// An idle listener proves its connection (and so the model's currency) this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// More changed ids than this in one batch are cheaper to take with a full load.
const MAX_BATCH_IDS: usize = 50_000;
/// When more than one chat in this many moves in a text column, its whole order is re-read
/// rather than each row placed (one index descent per row against one ordered scan).
const WHOLE_ORDER_SHARE: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps `model` current until `cancel` fires.
pub async fn run(
    model: Arc<ReadModel>,
    pool: PgPool,
    reconcile_every: Duration,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let syncer = Syncer {
            model: &model,
            pool: &pool,
            metrics: &metrics,
        };
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = syncer.session(reconcile_every, &mut failing) => result,
        };
        if let Err(error) = result {
            metrics.read_model_failures.inc();
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
                        "read model cannot load from postgres; reads answer 503 until it can"
                    );
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

struct Syncer<'a> {
    model: &'a Arc<ReadModel>,
    pool: &'a PgPool,
    metrics: &'a Metrics,
}

/// Changed ids gathered from notifications.
#[derive(Default)]
struct Batch {
    ids: HashSet<i32>,
    reload_all: bool,
}

impl Batch {
    fn add(&mut self, payload: &str) {
        if payload == RELOAD_ALL {
            self.reload_all = true;
        } else if let Ok(id) = payload.parse() {
            self.ids.insert(id);
        }
    }

    fn is_full(&self) -> bool {
        self.reload_all || self.ids.len() > MAX_BATCH_IDS
    }
}

impl Syncer<'_> {
    /// One connection's life: listen, catch up (full load or reconcile), then follow changes.
    /// Returns only with an error; the caller retries.
    async fn session(&self, reconcile_every: Duration, failing: &mut bool) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(self.pool)
            .await
            .context("cannot open the notification connection")?;
        listener
            .listen(CHANGES_CHANNEL)
            .await
            .context("cannot listen for chat changes")?;
        // Listening starts before catching up, so nothing committed in between is missed.
        if self.model.is_loaded() {
            self.reconcile().await?;
        } else {
            self.full_load().await?;
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
                    let first = received
                        .context("notification connection failed")?
                        .context("notification connection lost")?;
                    let mut batch = Batch::default();
                    batch.add(first.payload());
                    let gather_until = tokio::time::Instant::now() + BATCH_WINDOW;
                    while !batch.is_full() {
                        match tokio::time::timeout_at(gather_until, listener.try_recv()).await {
                            Ok(received) => batch.add(
                                received
                                    .context("notification connection failed")?
                                    .context("notification connection lost")?
                                    .payload(),
                            ),
                            Err(_) => break,
                        }
                    }
                    if batch.is_full() {
                        self.full_load().await?;
                    } else {
                        let ids: Vec<i32> = batch.ids.into_iter().collect();
                        self.reload(&ids, "notified").await?;
                    }
                }
                Err(_) => {
                    sqlx::query("select 1")
                        .execute(&mut listener)
                        .await
                        .context("notification connection does not answer")?;
                }
            }
            // Every notification committed before this point has been applied.
            self.model.mark_synced();
            if Instant::now() >= next_reconcile {
                self.reconcile().await?;
                next_reconcile = Instant::now() + reconcile_every;
            }
        }
    }

    /// Loads every chat from one snapshot and replaces the model.
    async fn full_load(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut tx = postgres::snapshot(self.pool)
            .await
            .context("cannot start a load")?;
        let lowercase = Lowercase::from_pairs(
            postgres::lowercase_map(&mut tx)
                .await
                .context("cannot read the database's lowercase map")?,
        );
        let expected = postgres::count(&mut tx)
            .await
            .context("cannot count chats")?;
        let mut rows = LoadBuffer::with_capacity(usize::try_from(expected).unwrap_or(0));
        postgres::load_all(&mut tx, |row| rows.push(row))
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

    /// Compares each text column's order with Postgres' by digest, and re-reads a column that
    /// differs: an order can drift for good (a rename and back racing another batch), which
    /// row versions cannot show.
    async fn repair_orders(&self) -> anyhow::Result<()> {
        let model = Arc::clone(self.model);
        let ours = tokio::task::spawn_blocking(move || model.text_order_digests())
            .await
            .context("digesting the read model's sort orders failed")?;
        if ours.is_empty() {
            return Ok(());
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("cannot compare sort orders")?;
        let mut differing = Vec::new();
        for (column, ours) in ours {
            match postgres::text_order_digest(&mut conn, column).await {
                Ok(theirs) if theirs == ours => {}
                Ok(_) => differing.push(column),
                // Not worth failing the session over: row versions were reconciled, and the
                // next round tries again (a very large table may outlast the statement timeout).
                Err(error) => {
                    tracing::warn!(
                        error = %error,
                        column = column.sql_name(),
                        "read model cannot compare a sort order with postgres"
                    );
                    return Ok(());
                }
            }
        }
        drop(conn);
        for column in differing {
            let mut tx = postgres::snapshot(self.pool)
                .await
                .context("cannot start a sort order repair")?;
            let ids = postgres::text_order(&mut tx, column)
                .await
                .context("cannot reload a sort order")?;
            tx.commit()
                .await
                .context("cannot finish a sort order repair")?;
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
        let mut conn = self.pool.acquire().await.context("cannot reconcile")?;
        postgres::versions(&mut conn, |row| {
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
        drop(conn);
        // What is left of ours no longer exists in Postgres.
        differing.extend(ours[at..].iter().map(|(id, _)| *id));
        if !differing.is_empty() {
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
        self.repair_orders().await?;
        self.model.mark_synced();
        Ok(())
    }
}
