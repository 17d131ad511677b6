//! The long poller (`MAX_UPDATES_MODE=poll`): one replica at a time, holding a lease in Redis
//! (`SET NX PX`, renewed before each poll), long-polls `GET /updates` for the membership types,
//! at most 2 requests a second, and adds each batch's raw updates to the events stream the
//! webhook fills (`super::intake` consumes it). Only then is the batch's marker persisted, so a
//! batch that could not be stored is asked for again with the previous marker (MAX commits
//! only what is before the marker sent, MAX_EVENTS.md §1.4).
//!
//! Without a marker MAX answers only the newest update: that is the first poll ever, and a
//! marker lost in Redis. A marker missing while the last poll's time is there (or while this
//! process persisted one), and a gap since the last successful poll longer than MAX's
//! retention, lost updates: each is logged as a warning and counted in
//! `participants_events_gaps_total{reason}`.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use shared::keys;
use shared::redis::run_script;
use tokio_util::sync::CancellationToken;

use super::MEMBERSHIP_TYPES;
use crate::metrics::Metrics;
use crate::refresh::max::{MaxClient, MaxError, UpdateBatch, WEBHOOK_ACTIVE};

/// The least time between the starts of two polls: MAX allows 2 requests a second.
pub const PACE: Duration = Duration::from_millis(510);
/// Updates asked for at once (MAX's batch cap).
pub const LIMIT: u32 = 100;
/// How often a replica without the lease tries to take it.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// The longest pause after a failure (it doubles from one second).
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Renews the lease if this replica holds it. KEYS: lease. ARGV: owner, ttl ms.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0"#,
    )
});

/// Persists a stored batch's marker and the poll's time, if this replica still holds the lease
/// (renewing it). KEYS: lease, marker, polled at. ARGV: owner, ttl ms, marker ('' for none),
/// now ms.
static PERSIST: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[4])
return 1"#,
    )
});

/// Releases the lease if this replica holds it. KEYS: lease. ARGV: owner.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"#,
    )
});

pub struct Poller {
    pub max: MaxClient,
    pub redis: Client,
    /// This replica's name, the lease's value.
    pub owner: String,
    pub metrics: Metrics,
    /// How long one poll waits for updates (`MAX_UPDATES_POLL_TIMEOUT`).
    pub timeout: Duration,
    /// The usual MAX call timeout, added to `timeout` for the request.
    pub call_timeout: Duration,
    /// `MAX_UPDATES_RETENTION`.
    pub retention: Duration,
}

/// What the poller remembers between polls.
#[derive(Default)]
struct Memory {
    holding: bool,
    /// The last marker this process persisted: sent when Redis lost it.
    persisted: Option<i64>,
    last_start: Option<Instant>,
    backoff: Option<Duration>,
    /// The kind of the failure streak under way, logged at its start.
    failing: Option<String>,
    /// A lost marker is reported once, until a marker is persisted again.
    lost_reported: bool,
    /// The last poll's time whose gap past the retention was reported.
    gap_reported_for: Option<i64>,
}

/// The marker and the last poll's time, as Redis holds them.
struct Stored {
    marker: Option<i64>,
    polled_at_ms: Option<i64>,
}

impl Poller {
    fn lease_ttl(&self) -> Duration {
        self.timeout + self.call_timeout + Duration::from_secs(5)
    }

    /// Polls while this replica holds the lease, until `cancel`; then hands the lease back.
    pub async fn run(self, cancel: CancellationToken) {
        tracing::info!(owner = %self.owner, timeout_s = self.timeout.as_secs(), "long polling MAX updates when this replica holds the lease");
        let mut memory = Memory::default();
        while !cancel.is_cancelled() {
            let pause = match self.round(&mut memory, &cancel).await {
                Ok(None) => Duration::ZERO,
                Ok(Some(pause)) => pause,
                Err(failure) => self.failed(&mut memory, failure),
            };
            let pace = memory
                .last_start
                .map_or(Duration::ZERO, |at| PACE.saturating_sub(at.elapsed()));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pause.max(pace)) => {}
            }
        }
        if memory.holding {
            let released: Result<i64, _> = run_script(
                &self.redis,
                &RELEASE,
                vec![keys::EVENTS_POLL_LEASE.to_owned()],
                vec![self.owner.clone()],
            )
            .await;
            if released.is_err() {
                tracing::debug!("could not release the long-poll lease; it lapses by itself");
            }
        }
        tracing::info!("long poller stopped");
    }

    /// One round: take or renew the lease, poll, store, persist. `Ok(Some(pause))` waits.
    async fn round(
        &self,
        memory: &mut Memory,
        cancel: &CancellationToken,
    ) -> Result<Option<Duration>, Failure> {
        let ttl = self.lease_ttl().as_millis() as u64;
        let held = if memory.holding {
            let renewed: i64 = run_script(
                &self.redis,
                &RENEW,
                vec![keys::EVENTS_POLL_LEASE.to_owned()],
                vec![self.owner.clone(), ttl.to_string()],
            )
            .await
            .map_err(Failure::redis)?;
            renewed == 1
        } else {
            let set: Option<String> = self
                .redis
                .set(
                    keys::EVENTS_POLL_LEASE,
                    self.owner.as_str(),
                    Some(Expiration::PX(ttl as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(Failure::redis)?;
            set.is_some()
        };
        if held != memory.holding {
            memory.holding = held;
            if held {
                tracing::info!(owner = %self.owner, "took the long-poll lease: this replica polls GET /updates");
            } else {
                tracing::warn!(owner = %self.owner, "lost the long-poll lease to another replica");
            }
        }
        if !held {
            return Ok(Some(STANDBY_RETRY));
        }
        let marker = self.marker_to_send(memory).await?;
        memory.last_start = Some(Instant::now());
        let polled = tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            polled = self.max.get_updates(marker, &MEMBERSHIP_TYPES, LIMIT, self.timeout, self.call_timeout) => polled,
        };
        let batch = polled.map_err(Failure::Max)?;
        self.store(&batch).await?;
        self.persist(memory, batch.marker, ttl).await?;
        if let Some(was) = memory.failing.take() {
            tracing::info!(was = %was, "long polling MAX updates works again");
        }
        memory.backoff = None;
        Ok(None)
    }

    /// The marker to send: Redis', else the one this process persisted; `None` only when no
    /// marker was ever persisted (or it was lost, which is reported). Reports a gap longer
    /// than the retention.
    async fn marker_to_send(&self, memory: &mut Memory) -> Result<Option<i64>, Failure> {
        let stored = self.stored().await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(at) = stored.polled_at_ms {
            let gap = Duration::from_millis((now_ms - at).max(0) as u64);
            if gap > self.retention && memory.gap_reported_for != Some(at) {
                memory.gap_reported_for = Some(at);
                self.gap("retention");
                tracing::warn!(gap_s = gap.as_secs(), retention_s = self.retention.as_secs(),
                    "no successful long poll for longer than MAX keeps updates: membership events were lost");
            }
        }
        match (stored.marker, memory.persisted) {
            (Some(marker), _) => Ok(Some(marker)),
            (None, Some(mine)) => {
                if !memory.lost_reported {
                    memory.lost_reported = true;
                    tracing::warn!(marker = mine, "the long-poll marker is missing in Redis; resuming from the one this replica persisted last");
                }
                Ok(Some(mine))
            }
            (None, None) if stored.polled_at_ms.is_some() => {
                if !memory.lost_reported {
                    memory.lost_reported = true;
                    self.gap("marker_lost");
                    tracing::warn!("the long-poll marker was lost (Redis has the last poll's time but no marker): MAX now answers only the newest update, and membership events were lost");
                }
                Ok(None)
            }
            (None, None) => {
                tracing::info!("first long poll: without a marker MAX answers only its newest update; earlier updates cannot be had");
                Ok(None)
            }
        }
    }

    fn gap(&self, reason: &str) {
        self.metrics.events_gaps.with_label_values(&[reason]).inc();
    }

    async fn stored(&self) -> Result<Stored, Failure> {
        let (marker, at): (Option<String>, Option<String>) = self
            .redis
            .mget(vec![keys::EVENTS_POLL_MARKER, keys::EVENTS_POLL_AT])
            .await
            .map_err(Failure::redis)?;
        Ok(Stored {
            marker: marker.and_then(|m| m.parse().ok()),
            polled_at_ms: at.and_then(|a| a.parse().ok()),
        })
    }

    /// Adds the batch's raw updates to the events stream, in order, in one pipeline (what a
    /// failure left stored comes again with the next poll, and changes nothing twice).
    async fn store(&self, batch: &UpdateBatch) -> Result<(), Failure> {
        if batch.updates.is_empty() {
            return Ok(());
        }
        let received_at = chrono::Utc::now().timestamp_millis().to_string();
        let pipeline = self.redis.pipeline();
        for update in &batch.updates {
            let fields = vec![
                (keys::EVENTS_FIELD_UPDATE.to_owned(), update.to_string()),
                ("received_at".to_owned(), received_at.clone()),
            ];
            let _: () = pipeline
                .xadd(
                    keys::EVENTS_STREAM,
                    false,
                    ("MAXLEN", "~", super::webhook::STREAM_MAX_LEN),
                    "*",
                    fields,
                )
                .await
                .map_err(Failure::store)?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(Failure::store)?;
        self.metrics
            .events_received
            .with_label_values(&["poll"])
            .inc_by(batch.updates.len() as u64);
        Ok(())
    }

    /// Persists the marker (once the batch is stored) with the poll's time.
    async fn persist(
        &self,
        memory: &mut Memory,
        marker: Option<i64>,
        ttl: u64,
    ) -> Result<(), Failure> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let persisted: i64 = run_script(
            &self.redis,
            &PERSIST,
            vec![
                keys::EVENTS_POLL_LEASE.to_owned(),
                keys::EVENTS_POLL_MARKER.to_owned(),
                keys::EVENTS_POLL_AT.to_owned(),
            ],
            vec![
                self.owner.clone(),
                ttl.to_string(),
                marker.map(|m| m.to_string()).unwrap_or_default(),
                now_ms.to_string(),
            ],
        )
        .await
        .map_err(Failure::store)?;
        if persisted == 1 {
            if marker.is_some() {
                memory.persisted = marker;
                memory.lost_reported = false;
            }
        } else {
            // The batch is stored; the lease's new holder asks from the previous marker, and
            // what it gets again changes nothing (duplicates are applied once).
            memory.holding = false;
            tracing::warn!(owner = %self.owner, "lost the long-poll lease during a poll; the marker is left to the new holder");
        }
        Ok(())
    }

    /// Logs the first failure of a streak (and a change of kind) and returns the pause.
    fn failed(&self, memory: &mut Memory, failure: Failure) -> Duration {
        let kind = failure.kind();
        if memory.failing.as_deref() != Some(kind.as_str()) {
            match &failure {
                Failure::Max(MaxError::Unexpected { kind, .. }) if *kind == WEBHOOK_ACTIVE => {
                    tracing::error!("MAX refuses GET /updates (405) while a webhook subscription is active: no membership events are polled. Delete the subscription (`syncd subscribe --check` shows it) or switch to MAX_UPDATES_MODE=webhook (logged once until polling works)");
                }
                Failure::Max(MaxError::InvalidToken) => {
                    tracing::error!("MAX rejects the bot token on GET /updates (logged once until polling works)");
                }
                failure => {
                    tracing::warn!(error = %failure, "long polling MAX updates failed; retrying with backoff, and the marker is not advanced (logged once until polling works)");
                }
            }
            memory.failing = Some(kind);
        } else {
            tracing::debug!(error = %failure, "long polling MAX updates failed again");
        }
        let backoff = memory
            .backoff
            .map_or(Duration::from_secs(1), |b| (b * 2).min(BACKOFF_CAP));
        memory.backoff = Some(backoff);
        backoff
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("GET /updates: {0}")]
    Max(MaxError),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("cannot store the batch in the events stream: {0}")]
    Store(String),
}

impl Failure {
    fn redis(error: fred::error::Error) -> Self {
        Self::Redis(error.to_string())
    }

    fn store(error: fred::error::Error) -> Self {
        Self::Store(error.to_string())
    }

    fn kind(&self) -> String {
        match self {
            Self::Max(error) => error.kind().to_owned(),
            Self::Redis(_) => "redis".to_owned(),
            Self::Store(_) => "store".to_owned(),
        }
    }
}
