//! Gathering notified ids into batches: a moment's writes are reloaded together, and one bulk
//! statement (tens of thousands of notifications back to back) becomes at most one full load.

use std::collections::HashSet;

use sqlx::postgres::{PgListener, PgNotification};
use tokio::time::{Duration, Instant};

use super::{notification, MAX_BATCH_IDS};
use crate::read_model::postgres::RELOAD_ALL;

/// How long notifications are gathered after the first before the rows they name are
/// reloaded together.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// A batch holding this many ids is taken to be a bulk statement's, whose notifications come
/// back to back: it goes on gathering until they pause for `BURST_PAUSE`.
const BULK_IDS: usize = 1_000;
const BURST_PAUSE: Duration = Duration::from_millis(200);
/// Longest a batch gathers (or drains) after its first notification, so a stream of writes
/// that never pauses still gets loaded.
const BURST_MAX: Duration = Duration::from_secs(2);

/// Changed ids gathered from notifications.
#[derive(Default)]
pub(super) struct Batch {
    pub ids: HashSet<i32>,
    /// Everything must be reloaded: a TRUNCATE, or more ids than a reload is worth.
    reload_all: bool,
    /// Notifications received after the batch was full, covered by the full load.
    pub drained: usize,
}

impl Batch {
    fn add(&mut self, payload: &str) {
        if self.reload_all {
            self.drained += 1;
        } else if payload == RELOAD_ALL {
            self.reload_all = true;
            self.ids = HashSet::new();
        } else if let Ok(id) = payload.parse() {
            self.ids.insert(id);
            if self.ids.len() > MAX_BATCH_IDS {
                self.reload_all = true;
                self.ids = HashSet::new();
            }
        }
    }

    /// Whether a full load is due rather than a reload of `ids`.
    pub fn is_full(&self) -> bool {
        self.reload_all
    }

    fn is_bulk(&self) -> bool {
        self.reload_all || self.ids.len() >= BULK_IDS
    }
}

/// The batch that begins with `first`: everything notified within `BATCH_WINDOW` of it, and,
/// when that looks like a bulk statement, the rest of its burst, up to `BURST_MAX`. Once the
/// batch is full its ids are dropped and the burst is drained: the full load's snapshot is
/// opened after every notification drained, so it covers their commits. That is what keeps a
/// 150,000-row UPDATE at one full load rather than three.
pub(super) async fn gather(
    listener: &mut PgListener,
    first: PgNotification,
) -> anyhow::Result<Batch> {
    let started = Instant::now();
    let mut batch = Batch::default();
    batch.add(first.payload());
    let mut until = started + BATCH_WINDOW;
    loop {
        match tokio::time::timeout_at(until, listener.try_recv()).await {
            Ok(received) => {
                batch.add(notification(received)?.payload());
                if batch.is_bulk() {
                    let pause_ends = (Instant::now() + BURST_PAUSE).min(started + BURST_MAX);
                    until = until.max(pause_ends);
                }
            }
            Err(_) => return Ok(batch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_past_the_limit_keeps_no_ids_and_counts_what_it_drains() {
        let mut batch = Batch::default();
        for id in 0..=MAX_BATCH_IDS {
            batch.add(&id.to_string());
        }
        assert!(batch.is_full());
        assert!(batch.ids.is_empty());
        batch.add("7");
        batch.add(RELOAD_ALL);
        assert_eq!(batch.drained, 2);
    }

    #[test]
    fn a_truncate_makes_the_batch_full_and_foreign_payloads_are_ignored() {
        let mut batch = Batch::default();
        batch.add("probe");
        batch.add("12");
        assert!(!batch.is_full() && !batch.is_bulk());
        batch.add(RELOAD_ALL);
        assert!(batch.is_full() && batch.is_bulk());
    }
}
