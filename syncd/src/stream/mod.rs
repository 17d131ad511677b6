//! The refresh stream consumer: one member of the `syncd` consumer group, in two lanes.
//!
//! The manual lane (`POST /chats/{id}/refresh-participants`, which a person waits for) and the
//! lazy lane each read their own stream with their own connection and call MAX at their own
//! urgency, so a person's refresh never queues behind a lazy backlog. In each lane: its own
//! pending entries first (a restarted replica with a stable name), then new entries, and every
//! few seconds entries another consumer left unacknowledged for longer than `claim_idle`
//! (XAUTOCLAIM, its cursor kept between rounds).
//!
//! An entry is acknowledged only after both writes. When a dependency fails (Postgres, Redis,
//! the limiter, MAX for every chat), the lane stops reading new entries, backs off, and
//! retries what it holds; such deliveries never count toward the dead letter. An entry is
//! dead-lettered only when it is malformed, or for its own chat's repeated failures.

pub mod plan;
pub mod redis;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use fred::prelude::*;
use shared::counts::{self, CachedCount};
use shared::keys;
use shared::refresh::{Priority, RefreshOutcome, RefreshRequest};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::refresh::limiter::Urgency;
use crate::refresh::{Outcome, Refresher, Unsettled};
use crate::store::{self, Target};
use plan::{Plan, Settled};
use redis::Entry;

/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_millis(1000);
/// The longest pause of a lane after a dependency failure (it doubles from one second).
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Consumers idle this long with nothing pending (pods long gone) are removed from the group.
const CONSUMER_FORGET: Duration = Duration::from_secs(3600);
/// How often a lane looks for such consumers.
const FORGET_EVERY: Duration = Duration::from_secs(600);

pub struct Consumer {
    pub name: String,
    pub redis: Client,
    pub db: PgPool,
    pub refresher: Refresher,
    pub metrics: Metrics,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    /// Age at which a count is due (stale threshold less refresh-ahead): a lazy request for a
    /// younger count is already answered.
    pub due_age: Duration,
    pub inactive_recheck: Duration,
    pub cache_ttl: Duration,
    /// Ticked each time a lane's loop goes round (`/health/live`).
    pub liveness: crate::http::Liveness,
}

/// One stream, read with its own connection (blocking reads never hold other commands up).
pub struct Lane {
    pub stream: &'static str,
    pub urgency: Urgency,
    pub reader: Client,
}

impl Lane {
    /// The manual and the lazy lane, each with its reader.
    pub fn both(manual_reader: Client, lazy_reader: Client) -> [Lane; 2] {
        [
            Lane {
                stream: keys::REFRESH_STREAM_MANUAL,
                urgency: Urgency::Manual,
                reader: manual_reader,
            },
            Lane {
                stream: keys::REFRESH_STREAM_LAZY,
                urgency: Urgency::Lazy,
                reader: lazy_reader,
            },
        ]
    }
}

/// What a round of a lane came to.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    /// Work done, or nothing to do.
    Done,
    /// Some entries were not done for a reason outside their chats (a dependency): back off
    /// and retry what the lane holds before reading anything new.
    Held(&'static str),
}

/// A lane's position: its own pending entries to read, the XAUTOCLAIM cursor, the backoff.
struct LaneState {
    own_pending_after: Option<String>,
    claim_cursor: String,
    last_claim: Instant,
    last_forget: Instant,
    backoff: Duration,
    /// What failed, while a streak of failures lasts (logged once at its start).
    failing: Option<String>,
}

impl LaneState {
    fn new() -> Self {
        Self {
            own_pending_after: Some("0".to_owned()),
            claim_cursor: "0-0".to_owned(),
            last_claim: Instant::now(),
            last_forget: Instant::now(),
            backoff: Duration::from_secs(1),
            failing: None,
        }
    }
}

impl Consumer {
    /// Consumes both lanes until `cancel`; each finishes (or leaves pending) the batch in hand.
    pub async fn run(self, lanes: [Lane; 2], cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            self.liveness.tick();
            match redis::ensure_groups(&self.redis).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot create the consumer group yet");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tracing::info!(consumer = %self.name, "consuming the refresh streams");
        let this = Arc::new(self);
        let tasks: Vec<_> = lanes
            .into_iter()
            .map(|lane| tokio::spawn(this.clone().run_lane(lane, cancel.clone())))
            .collect();
        for task in tasks {
            let _ = task.await;
        }
        tracing::info!(consumer = %this.name, "stream consumer stopped");
    }

    async fn run_lane(self: Arc<Self>, lane: Lane, cancel: CancellationToken) {
        let mut state = LaneState::new();
        let claim_every =
            (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        while !cancel.is_cancelled() {
            self.liveness.tick();
            if !self.refresher.token().reported_valid() {
                // Nothing can be refreshed: entries wait in the stream (not delivered, so they
                // do not count toward anything), and once a minute one call checks whether
                // calls work again.
                self.refresher.probe_token(&self.db).await;
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let result = self.round(&lane, &mut state, claim_every).await;
            let trouble = match result {
                Ok(Round::Done) => None,
                Ok(Round::Held(why)) => Some(why.to_owned()),
                Err(error) if redis::is_missing_group(&error) => {
                    self.recreate_group(&mut state).await;
                    continue;
                }
                Err(error) => Some(format!("{error:#}")),
            };
            let Some(trouble) = trouble else {
                if let Some(was) = state.failing.take() {
                    tracing::info!(stream = lane.stream, was = %was, "refresh stream work resumed");
                }
                state.backoff = Duration::from_secs(1);
                continue;
            };
            if state.failing.is_none() {
                tracing::warn!(stream = lane.stream, error = %trouble,
                    "refresh stream work cannot go on; retrying what is held, with backoff, before reading anything new");
            } else {
                tracing::debug!(stream = lane.stream, error = %trouble, "refresh stream work still failing");
            }
            state.failing = Some(trouble);
            state.own_pending_after = Some("0".to_owned());
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(state.backoff) => {}
            }
            state.backoff = (state.backoff * 2).min(BACKOFF_CAP);
        }
    }

    /// One round of a lane: own pending entries, a claim round, or new entries.
    async fn round(
        &self,
        lane: &Lane,
        state: &mut LaneState,
        claim_every: Duration,
    ) -> anyhow::Result<Round> {
        let batch = self.refresher.batch_size() as u64;
        if let Some(after) = state.own_pending_after.clone() {
            let entries = redis::read(
                &lane.reader,
                redis::REFRESH.name,
                &self.name,
                lane.stream,
                batch,
                Some(&after),
                BLOCK,
            )
            .await?;
            let Some(newest) = entries
                .iter()
                .map(|e| e.id.as_str())
                .max_by(|a, b| redis::compare_ids(a, b))
            else {
                state.own_pending_after = None;
                return Ok(Round::Done);
            };
            state.own_pending_after = Some(newest.to_owned());
            let deliveries = redis::delivery_counts(
                &self.redis,
                redis::REFRESH.name,
                &self.name,
                lane.stream,
                &entries,
            )
            .await?;
            return self.process(lane, entries, &deliveries).await;
        }
        if state.last_claim.elapsed() >= claim_every {
            state.last_claim = Instant::now();
            if state.last_forget.elapsed() >= FORGET_EVERY {
                state.last_forget = Instant::now();
                self.forget_idle_consumers(lane.stream).await;
            }
            return self.claim_abandoned(lane, state).await;
        }
        let entries = redis::read(
            &lane.reader,
            redis::REFRESH.name,
            &self.name,
            lane.stream,
            batch,
            None,
            BLOCK,
        )
        .await?;
        self.process(lane, entries, &HashMap::new()).await
    }

    async fn recreate_group(&self, state: &mut LaneState) {
        // Redis restarted empty or was flushed, and the api's XADD recreated the stream without
        // the group: recreate it, and consume from the start.
        match redis::ensure_groups(&self.redis).await {
            Ok(()) => {
                self.metrics.stream_groups_recreated.inc();
                tracing::warn!(consumer = %self.name,
                    "the refresh streams' consumer group was missing (Redis restarted empty or was flushed); recreated it");
                state.own_pending_after = Some("0".to_owned());
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot recreate the consumer group yet"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Takes over entries idle for longer than `claim_idle` (from crashed consumers, or this
    /// one's own earlier attempts), going on from the last round's cursor.
    async fn claim_abandoned(&self, lane: &Lane, state: &mut LaneState) -> anyhow::Result<Round> {
        let (next, claimed) = redis::autoclaim(
            &self.redis,
            redis::REFRESH.name,
            &self.name,
            lane.stream,
            self.claim_idle,
            &state.claim_cursor,
            self.refresher.batch_size() as u64,
        )
        .await?;
        state.claim_cursor = next;
        let round = if claimed.is_empty() {
            Round::Done
        } else {
            tracing::info!(
                stream = lane.stream,
                entries = claimed.len(),
                "took over idle refresh entries"
            );
            let deliveries = redis::delivery_counts(
                &self.redis,
                redis::REFRESH.name,
                &self.name,
                lane.stream,
                &claimed,
            )
            .await?;
            self.process(lane, claimed, &deliveries).await?
        };
        self.report_stream_gauges(lane.stream).await;
        Ok(round)
    }

    async fn forget_idle_consumers(&self, stream: &str) {
        match redis::forget_idle_consumers(
            &self.redis,
            redis::REFRESH.name,
            stream,
            &self.name,
            CONSUMER_FORGET,
        )
        .await
        {
            Ok(0) => {}
            Ok(forgotten) => {
                tracing::info!(
                    stream,
                    forgotten,
                    "removed consumers of stopped replicas from the group"
                )
            }
            Err(error) => tracing::debug!(error = %error, "could not list the group's consumers"),
        }
    }

    async fn dead_letter(
        &self,
        entry: &Entry,
        reason: &'static str,
        detail: &str,
    ) -> anyhow::Result<()> {
        redis::dead_letter(&self.redis, redis::REFRESH, entry, reason, detail).await?;
        self.metrics
            .stream_entries
            .with_label_values(&["dead_lettered"])
            .inc();
        self.metrics
            .dead_lettered
            .with_label_values(&[reason])
            .inc();
        tracing::warn!(stream = %entry.stream, entry.id = %entry.id, reason, detail, "refresh entry dead-lettered");
        Ok(())
    }

    /// Refreshes the chats of a batch of entries of one lane and acknowledges what is settled.
    /// `deliveries` holds the delivery counts of entries delivered before (absent: the first).
    async fn process(
        &self,
        lane: &Lane,
        entries: Vec<Entry>,
        deliveries: &HashMap<String, u64>,
    ) -> anyhow::Result<Round> {
        if entries.is_empty() {
            return Ok(Round::Done);
        }
        let mut requests: Vec<(Entry, RefreshRequest)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match RefreshRequest::from_fields(&entry.fields) {
                Ok(request) => requests.push((entry, request)),
                Err(error) => {
                    self.dead_letter(&entry, "malformed", &error.to_string())
                        .await?
                }
            }
        }
        if requests.is_empty() {
            return Ok(Round::Done);
        }
        let mut ids: Vec<i32> = requests.iter().map(|(_, r)| r.chat_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let targets: HashMap<i32, Target> = store::targets_by_id(&self.db, &ids)
            .await?
            .into_iter()
            .map(|t| (t.chat_id, t))
            .collect();
        let requests = self
            .dead_letter_chat_failures(requests, &targets, deliveries)
            .await?;
        if requests.is_empty() {
            return Ok(Round::Done);
        }

        let batch: Vec<&RefreshRequest> = requests.iter().map(|(_, r)| r).collect();
        let Plan {
            wanted,
            mut settled,
            to_refresh,
        } = plan::plan(
            &batch,
            &targets,
            Utc::now(),
            &plan::Policy {
                due_age: self.due_age,
                inactive_recheck: self.inactive_recheck,
            },
        );
        let entries: Vec<&Entry> = requests.iter().map(|(entry, _)| entry).collect();
        let outcomes = self
            .keeping_claimed(
                lane.stream,
                &entries,
                self.refresher.refresh(to_refresh, lane.urgency, None),
            )
            .await?;
        let held = held_by(&outcomes);
        for (chat_id, outcome) in &outcomes {
            if let Some(done) = settled_by(*chat_id, outcome) {
                settled.insert(*chat_id, done);
            }
        }
        self.record_reads(&requests, &targets).await;
        self.settle(lane, &requests, &wanted, settled).await?;
        Ok(held.map_or(Round::Done, Round::Held))
    }

    /// Dead-letters the entries delivered more than `max_deliveries` times whose chats failed
    /// as often by their own answers (never for an outage); returns the rest.
    async fn dead_letter_chat_failures(
        &self,
        requests: Vec<(Entry, RefreshRequest)>,
        targets: &HashMap<i32, Target>,
        deliveries: &HashMap<String, u64>,
    ) -> anyhow::Result<Vec<(Entry, RefreshRequest)>> {
        let mut rest = Vec::with_capacity(requests.len());
        for (entry, request) in requests {
            let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
            let own_failures = targets
                .get(&request.chat_id)
                .map_or(0, |t| i64::from(t.own_failures()));
            if delivered > self.max_deliveries && own_failures >= self.max_deliveries as i64 {
                let detail = targets
                    .get(&request.chat_id)
                    .and_then(|t| t.last_error.clone())
                    .unwrap_or_default();
                self.dead_letter(&entry, "chat_failures", &detail).await?;
            } else {
                rest.push((entry, request));
            }
        }
        Ok(rest)
    }

    /// Reads weight the stale sweep; losing a few on a failure is harmless.
    async fn record_reads(
        &self,
        requests: &[(Entry, RefreshRequest)],
        targets: &HashMap<i32, Target>,
    ) {
        let mut reads: BTreeMap<i32, i32> = BTreeMap::new();
        for (_, request) in requests {
            if request.priority == Priority::Lazy && targets.contains_key(&request.chat_id) {
                *reads.entry(request.chat_id).or_default() += 1;
            }
        }
        let reads: Vec<(i32, i32)> = reads.into_iter().collect();
        if let Err(error) = store::record_reads(&self.db, &reads).await {
            tracing::debug!(error = %error, "could not record reads");
        }
    }

    /// Acknowledges the settled entries (the rest stays pending, retried after `claim_idle`),
    /// brings Redis up to what Postgres holds for chats settled from it, removes the dedup
    /// markers of chats that may be enqueued again, and publishes the outcomes.
    async fn settle(
        &self,
        lane: &Lane,
        requests: &[(Entry, RefreshRequest)],
        wanted: &BTreeMap<i32, plan::Wanted>,
        settled: HashMap<i32, Settled>,
    ) -> anyhow::Result<()> {
        // A count Postgres holds that is newer than Redis' (another replica's write whose Redis
        // half failed, an older value the cache kept): the fenced write keeps whichever is newer.
        let from_store: Vec<(i32, CachedCount)> = settled
            .values()
            .filter_map(|s| s.from_store.then_some(s.outcome.as_ref()?))
            .filter_map(|o| {
                Some((
                    o.chat_id,
                    CachedCount {
                        count: o.participants_count?,
                        updated_at: o.updated_at,
                    },
                ))
            })
            .collect();
        if !from_store.is_empty() {
            if let Err(error) = counts::write_fenced(&self.redis, &from_store, self.cache_ttl).await
            {
                tracing::debug!(error = %error, "could not bring cached counts up to Postgres'");
            }
        }
        let mut acks = Vec::new();
        let mut retried = 0u64;
        for (entry, request) in requests {
            if settled.contains_key(&request.chat_id) {
                acks.push(entry.id.as_str());
            } else {
                retried += 1;
            }
        }
        // A chat settled by an answer may be enqueued again as soon as it is due: its dedup
        // markers go (they share the streams' hash tag, so one DEL). A chat left alone (backing
        // off, unavailable until its recheck) keeps its marker until it expires, so reads do
        // not enqueue it again and again.
        let mut markers = Vec::new();
        for (chat_id, wanted) in wanted {
            if settled.get(chat_id).is_some_and(|s| !s.left_alone) {
                markers.push(keys::refresh_marker(*chat_id));
                if wanted.manual {
                    markers.push(keys::manual_refresh_marker(*chat_id));
                }
            }
        }
        if !markers.is_empty() {
            let _: Result<i64, _> = self.redis.del(markers).await;
        }
        let acked = redis::ack(&self.redis, redis::REFRESH.name, lane.stream, acks).await?;
        for outcome in settled
            .into_values()
            .filter(|s| s.publish)
            .filter_map(|s| s.outcome)
        {
            if let Ok(text) = serde_json::to_string(&outcome) {
                let _: Result<i64, _> = self
                    .redis
                    .publish(keys::REFRESH_OUTCOMES_CHANNEL, text)
                    .await;
            }
        }
        self.metrics
            .stream_entries
            .with_label_values(&["acked"])
            .inc_by(acked);
        self.metrics
            .stream_entries
            .with_label_values(&["retried"])
            .inc_by(retried);
        Ok(())
    }

    /// Runs `work` while keeping `entries` from going idle: a batch that waits for the rate
    /// limit, or MAX timeouts and retries, can take longer than `claim_idle`, and peers would
    /// take the entries over and ask MAX again. Entries idle for less than a quarter of
    /// `claim_idle` (just claimed by a peer) are left alone.
    async fn keeping_claimed<T>(
        &self,
        stream: &str,
        entries: &[&Entry],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let every = (self.claim_idle / 3).max(Duration::from_millis(30));
        let mut touch = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = touch.tick() => {
                    self.liveness.tick();
                    if let Err(error) = redis::touch(&self.redis, redis::REFRESH.name, &self.name, stream, &ids, self.claim_idle / 4).await {
                        tracing::debug!(error = %error, "could not keep in-flight entries claimed");
                    }
                }
            }
        }
    }

    /// Length, pending and lag of the lane's stream (each lane reports its own), and the
    /// dead-letter count, as gauges.
    async fn report_stream_gauges(&self, stream: &str) {
        if let Ok(len) = self.redis.xlen::<i64, _>(stream).await {
            self.metrics
                .stream_length
                .with_label_values(&[stream])
                .set(len);
        }
        let info = redis::group_info(&self.redis, stream).await;
        if let Some(pending) = info.pending {
            self.metrics
                .stream_pending
                .with_label_values(&[stream])
                .set(pending);
        }
        if let Some(lag) = info.lag {
            self.metrics
                .stream_lag
                .with_label_values(&[stream])
                .set(lag);
        }
        if let Ok(len) = self.redis.xlen::<i64, _>(keys::REFRESH_STREAM_DEAD).await {
            self.metrics.dead_letters.set(len);
        }
    }
}

/// The one translation of a refresh's outcome into what a waiting request is told: a count,
/// or the chat is unavailable (with MAX's reason). `None`: not done, the entry stays pending.
fn settled_by(chat_id: i32, outcome: &Outcome) -> Option<Settled> {
    let (participants_count, updated_at, error) = match outcome {
        Outcome::Fresh { count, asked_at } => (Some(*count), *asked_at, None),
        Outcome::Gone { status, asked_at } => (None, *asked_at, Some(status.to_string())),
        Outcome::Failed { .. } | Outcome::TokenInvalid => return None,
    };
    Some(Settled {
        outcome: Some(RefreshOutcome {
            chat_id,
            participants_count,
            updated_at,
            error,
        }),
        from_store: false,
        left_alone: false,
        publish: true,
    })
}

/// Why a batch's entries were held for a reason outside their chats, so that the lane backs
/// off: a chat not asked for a dependency (the limiter's Redis) or a stop, or MAX's outage
/// with no chat answered.
fn held_by(outcomes: &[(i32, Outcome)]) -> Option<&'static str> {
    let mut answered = false;
    let mut outage = None;
    for (_, outcome) in outcomes {
        let Outcome::Failed { reason, .. } = outcome else {
            if *outcome == Outcome::TokenInvalid {
                return Some("invalid_token");
            }
            answered = true;
            continue;
        };
        match reason {
            Unsettled::Outage(kind) => outage = Some(*kind),
            Unsettled::Unconfirmed => outage = Some("unconfirmed: no control answer from MAX"),
            Unsettled::LimiterUnavailable => {
                return Some("the rate limiter's Redis is unreachable")
            }
            Unsettled::Stopped | Unsettled::ShuttingDown => return Some("stopping"),
            Unsettled::Systemic(_) => return Some("MAX calls stopped: a fault of the setup"),
            // The chat's own failure: its entry waits for `claim_idle`, like any other.
            Unsettled::Max(_) | Unsettled::Unusable { .. } => answered = true,
        }
    }
    if answered {
        None
    } else {
        outage
    }
}
