//! The events consumer: reads an events stream (ours in `webhook` mode, another service's in
//! `stream` mode) in the `EVENTS_GROUP` consumer group that every syncd replica joins, with
//! the refresh consumer's commands (`crate::stream::redis`): its own pending entries first,
//! then new ones, and every few seconds entries another consumer left idle (XAUTOCLAIM). Each
//! update is parsed and applied to its chat's state (`super::register::apply`); an entry is
//! acknowledged only after its chat's decision was handed to `Registers::commit`. When that
//! or Redis fails, the consumer backs off and retries what it holds before reading anything
//! new. An entry that is not an update is dead-lettered at once (it can never become one).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use shared::keys;
use tokio_util::sync::CancellationToken;

use super::register::{apply, ChatState, Effect};
use super::settings::UpdatesMode;
use super::update::{Parsed, Update};
use crate::metrics::Metrics;
use crate::stream::redis::{self as commands, Entry, Group};

/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries read at once.
const BATCH: u64 = 100;
/// The longest pause after a failure (it doubles from one second).
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The events group, and where what it cannot read goes.
pub const EVENTS: Group = Group {
    name: keys::EVENTS_GROUP,
    dead_letters: keys::EVENTS_STREAM_DEAD,
};

/// Where chats' states live and where decisions are carried out: **the seam to the count
/// writes**. The wiring to the fenced Redis and Postgres writes (and the settle, baseline and
/// reconcile GETs) implements it next; until then `NotWired` knows no baseline, so membership
/// events come to `needs_baseline` and are counted in the metrics and logged at debug.
pub trait Registers: Send + Sync + 'static {
    /// The chat's state (its baseline and the events applied since), by MAX chat id.
    fn load(&self, chat_id: i64) -> impl Future<Output = anyhow::Result<ChatState>> + Send;

    /// Keeps the chat's new state and carries out `effects`; the entries are acknowledged
    /// only after it returns `Ok`.
    fn commit(
        &self,
        chat_id: i64,
        state: ChatState,
        effects: Vec<Effect>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// No chat state yet (see `Registers`).
pub struct NotWired;

impl Registers for NotWired {
    async fn load(&self, _chat_id: i64) -> anyhow::Result<ChatState> {
        Ok(ChatState::Unknown)
    }

    async fn commit(&self, chat_id: i64, _: ChatState, effects: Vec<Effect>) -> anyhow::Result<()> {
        if !effects.is_empty() {
            tracing::debug!(
                max_chat_id = chat_id,
                ?effects,
                "events decided, not carried out yet (no wiring to the count writes)"
            );
        }
        Ok(())
    }
}

pub struct Intake<R> {
    pub consumer: String,
    /// For short commands (acks, claims, dead letters).
    pub redis: Client,
    /// For the blocking reads, on a connection of their own.
    pub reader: Client,
    pub stream: String,
    pub mode: UpdatesMode,
    pub claim_idle: Duration,
    pub metrics: Metrics,
    pub registers: R,
    /// A streak of entries that are not updates is logged once, at its start.
    pub not_updates: AtomicBool,
}

/// The consumer's position: its own pending entries to read, the XAUTOCLAIM cursor, backoff.
struct Position {
    own_pending_after: Option<String>,
    claim_cursor: String,
    last_claim: Instant,
    backoff: Duration,
    failing: Option<String>,
}

/// A top-level `user_id` that differs from `user.user_id` is logged once per process.
static DIFFERING_USER_ID_SEEN: AtomicBool = AtomicBool::new(false);

impl<R: Registers> Intake<R> {
    /// Consumes the stream until `cancel`; what is in hand is finished or left pending.
    pub async fn run(self, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            match self.ensure_group().await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(stream = %self.stream, error = %error, "cannot create the events consumer group yet");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tracing::info!(stream = %self.stream, consumer = %self.consumer, mode = self.mode.as_str(), "consuming membership events");
        let mut at = Position {
            own_pending_after: Some("0".to_owned()),
            claim_cursor: "0-0".to_owned(),
            last_claim: Instant::now(),
            backoff: Duration::from_secs(1),
            failing: None,
        };
        while !cancel.is_cancelled() {
            // A round ends within about a second (a blocking read, or Redis' command timeout),
            // and is finished rather than dropped, so that what it applied is acknowledged.
            match self.round(&mut at).await {
                Ok(()) => {
                    if let Some(was) = at.failing.take() {
                        tracing::info!(stream = %self.stream, was = %was, "membership events consumed again");
                    }
                    at.backoff = Duration::from_secs(1);
                    continue;
                }
                Err(error) if commands::is_missing_group(&error) => {
                    // Redis restarted empty or was flushed: the group goes back, from the start.
                    if self.ensure_group().await.is_ok() {
                        tracing::warn!(stream = %self.stream, "the events consumer group was missing; recreated it");
                        at.own_pending_after = Some("0".to_owned());
                        continue;
                    }
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    if at.failing.is_none() {
                        tracing::warn!(stream = %self.stream, error = %error,
                            "membership events cannot be consumed; retrying what is held, with backoff");
                    }
                    at.failing = Some(error);
                }
            }
            at.own_pending_after = Some("0".to_owned());
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(at.backoff) => {}
            }
            at.backoff = (at.backoff * 2).min(BACKOFF_CAP);
        }
        tracing::info!(stream = %self.stream, "membership events consumer stopped");
    }

    /// The group, created where missing, from the stream's start ("0": on another service's
    /// stream, what it holds is read once; events the baselines already have change nothing).
    async fn ensure_group(&self) -> anyhow::Result<()> {
        let created: Result<(), fred::error::Error> = self
            .redis
            .xgroup_create(self.stream.as_str(), EVENTS.name, "0", true)
            .await;
        match created {
            Err(error) if !error.details().starts_with("BUSYGROUP") => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// One round: own pending entries, a claim round, or new entries.
    async fn round(&self, at: &mut Position) -> anyhow::Result<()> {
        let stream = self.stream.as_str();
        if let Some(after) = at.own_pending_after.clone() {
            let entries = commands::read(
                &self.reader,
                EVENTS.name,
                &self.consumer,
                stream,
                BATCH,
                Some(&after),
                BLOCK,
            )
            .await?;
            let newest = entries
                .iter()
                .map(|e| e.id.as_str())
                .max_by(|a, b| commands::compare_ids(a, b));
            at.own_pending_after = newest.map(str::to_owned);
            return self.handle(entries).await;
        }
        let claim_every =
            (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        if at.last_claim.elapsed() >= claim_every {
            at.last_claim = Instant::now();
            let (next, claimed) = commands::autoclaim(
                &self.redis,
                EVENTS.name,
                &self.consumer,
                stream,
                self.claim_idle,
                &at.claim_cursor,
                BATCH,
            )
            .await?;
            at.claim_cursor = next;
            if !claimed.is_empty() {
                tracing::info!(
                    stream,
                    entries = claimed.len(),
                    "took over idle membership events"
                );
            }
            return self.handle(claimed).await;
        }
        let entries = commands::read(
            &self.reader,
            EVENTS.name,
            &self.consumer,
            stream,
            BATCH,
            None,
            BLOCK,
        )
        .await?;
        self.handle(entries).await
    }

    /// Parses, applies and acknowledges a batch; entries that are not updates are dead-lettered.
    async fn handle(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        // Each chat's updates in stream order; other update types need no chat.
        let mut by_chat: BTreeMap<i64, Vec<Update>> = BTreeMap::new();
        let mut handled = Vec::with_capacity(entries.len());
        for entry in &entries {
            let raw = entry
                .fields
                .get(keys::EVENTS_FIELD_UPDATE)
                .map(String::as_bytes);
            let parsed = match raw.map(Update::parse) {
                Some(Ok(parsed)) => parsed,
                Some(Err(error)) => {
                    self.dead_letter(entry, &error.to_string()).await?;
                    continue;
                }
                None => {
                    self.dead_letter(entry, "no `update` field").await?;
                    continue;
                }
            };
            self.observe(&parsed, now_ms);
            match parsed.update.chat_id() {
                Some(chat_id) => by_chat.entry(chat_id).or_default().push(parsed.update),
                None => self.count_outcome(super::register::Outcome::Ignored),
            }
            self.not_updates.store(false, Ordering::Relaxed);
            handled.push(entry.id.as_str());
        }
        for (chat_id, updates) in by_chat {
            let mut state = self.registers.load(chat_id).await?;
            let mut effects = Vec::new();
            for update in &updates {
                let (outcome, more) = apply(&mut state, update);
                tracing::debug!(max_chat_id = chat_id, ?update, outcome = outcome.as_str(), effects = ?more, "membership event applied");
                self.count_outcome(outcome);
                effects.extend(more);
            }
            self.registers.commit(chat_id, state, effects).await?;
        }
        commands::ack(&self.redis, EVENTS.name, &self.stream, handled).await?;
        Ok(())
    }

    fn observe(&self, parsed: &Parsed, now_ms: i64) {
        if self.mode == UpdatesMode::Stream {
            self.metrics
                .events_received
                .with_label_values(&["stream"])
                .inc();
        }
        let lag_ms = (now_ms - parsed.update.at_ms()).max(0);
        self.metrics
            .events_intake_lag
            .observe(lag_ms as f64 / 1000.0);
        if let Some(top) = parsed.differing_user_id {
            if !DIFFERING_USER_ID_SEEN.swap(true, Ordering::Relaxed) {
                tracing::warn!(top_level_user_id = top, update = ?parsed.update,
                    "a membership update carries a top-level user_id other than user.user_id; user.user_id is used (logged once)");
            }
        }
    }

    fn count_outcome(&self, outcome: super::register::Outcome) {
        self.metrics
            .events_applied
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    async fn dead_letter(&self, entry: &Entry, detail: &str) -> anyhow::Result<()> {
        commands::dead_letter(&self.redis, EVENTS, entry, "not_an_update", detail).await?;
        self.metrics
            .events_rejected
            .with_label_values(&["not_an_update"])
            .inc();
        if self.not_updates.swap(true, Ordering::Relaxed) {
            tracing::debug!(stream = %entry.stream, entry.id = %entry.id, detail, "another events stream entry that is not a MAX update");
        } else {
            tracing::warn!(stream = %entry.stream, entry.id = %entry.id, detail,
                "an events stream entry is not a MAX update; dead-lettered (logged once until an update arrives)");
        }
        Ok(())
    }
}
