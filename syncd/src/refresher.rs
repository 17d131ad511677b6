//! Refreshing a set of chats: MAX calls (concurrent, within the fleet-wide limit, retried with
//! backoff), then both writes, fenced by the time MAX was asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;
use futures::StreamExt;
use rand::Rng;
use shared::counts::{self, CachedCount};
use shared::ids::MaxChatId;
use shared::sync_status::SyncStatus;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::call_policy::{CallPolicy, Event, Gate};
use crate::limiter::{Limiter, NoSlot, Urgency};
use crate::max::{MaxChat, MaxClient, MaxError};
use crate::metrics::Metrics;
use crate::status::TokenState;
use crate::store::{self, Failure, FreshCount, Target};

/// A refresh with at least this many answers from chats known active, or the latest
/// `SYSTEMIC_WINDOW` such answers, where this share was 403, 404 or not a chat, is a fault of
/// the setup, not of the chats: those chats are not marked, and calls stop as for an invalid
/// token. Answers of chats not known active (gone before, or never refreshed: a bot not yet
/// added) are those chats' outcome and are never evidence against the setup.
const SYSTEMIC_MIN_ASKED: usize = 10;
const SYSTEMIC_SHARE: f64 = 0.8;
const SYSTEMIC_WINDOW: usize = 50;
/// How far back marks of forbidden/not found are undone when a systemic fault is seen.
const SYSTEMIC_LOOKBACK: Duration = Duration::from_secs(120);
/// Passing failures in a row, across chats, from which on a chat's failure is MAX's outage
/// rather than the chat's: not recorded against the chat, never a reason to dead-letter.
const OUTAGE_STREAK: u32 = 5;
/// The most of a MAX answer's detail kept in `last_error`.
const ERROR_DETAIL_CHARS: usize = 300;

/// MAX would not show the chat: 403 or 404 (not a chat whose own status says it is gone).
fn is_unavailable(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Gone { status, .. } if status.is_unavailable())
}

/// An answer that, from a chat known active, speaks against the setup: 403, 404, not a chat.
fn is_bad_answer(outcome: &Outcome) -> bool {
    is_unavailable(outcome)
        || matches!(
            outcome,
            Outcome::Failed {
                reason: Unsettled::Unusable { .. },
                ..
            }
        )
}

/// What happened to one chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// MAX gave a count.
    Fresh { count: i32, asked_at: DateTime<Utc> },
    /// MAX says the bot cannot see this chat (non-active status, 403, 404) or its id is unusable.
    Gone {
        status: SyncStatus,
        asked_at: DateTime<Utc>,
    },
    /// No count and no status: see `Unsettled`.
    Failed {
        reason: Unsettled,
        asked_at: DateTime<Utc>,
    },
    /// The token is invalid: nothing was asked.
    TokenInvalid,
}

/// Why a chat got neither a count nor a status of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsettled {
    /// A passing MAX failure (the error's kind) that outlasted the retries while MAX answered
    /// other chats: the chat's own, recorded, and tried again after its backoff.
    Max(&'static str),
    /// A passing failure while MAX fails for every chat (a streak of failures across chats, or
    /// 429s): MAX's outage, not the chat's; nothing is recorded of the chat.
    Outage(&'static str),
    /// MAX answered something that is not this chat (see `MaxError::Unexpected`): the chat's
    /// own failure while MAX gives other chats.
    Unusable { kind: &'static str, detail: String },
    /// Not asked: Redis, which holds the fleet's rate limit, could not be reached.
    LimiterUnavailable,
    /// Not asked: the caller stopped the refresh (a sweep handing its work back).
    Stopped,
    /// Not asked: this process is shutting down.
    ShuttingDown,
    /// Asked, but MAX answered this (403/404's status, or `not_a_chat`) for nearly every chat
    /// known active: a fault of the setup, not the chat's, so nothing is recorded of the chat.
    Systemic(String),
}

impl Unsettled {
    /// The chat's own failure, recorded against it (the others are not the chat's fault).
    pub fn is_the_chats(&self) -> bool {
        matches!(self, Unsettled::Max(_) | Unsettled::Unusable { .. })
    }
}

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsettled::Max(kind) | Unsettled::Outage(kind) => f.write_str(kind),
            Unsettled::Unusable { kind, detail } => write!(f, "{kind}: {detail}"),
            Unsettled::LimiterUnavailable => f.write_str("limiter_unavailable"),
            Unsettled::Stopped => f.write_str("stopped"),
            Unsettled::ShuttingDown => f.write_str("shutting_down"),
            Unsettled::Systemic(status) => write!(f, "systemic_{status}"),
        }
    }
}

impl Outcome {
    /// Whether a MAX call was made for the chat (not stopped before it, nor refused for the
    /// token).
    pub fn asked_max(&self) -> bool {
        match self {
            Outcome::Fresh { .. } => true,
            Outcome::Gone { status, .. } => *status != SyncStatus::InvalidId,
            Outcome::Failed { reason, .. } => {
                matches!(
                    reason,
                    Unsettled::Max(_)
                        | Unsettled::Outage(_)
                        | Unsettled::Unusable { .. }
                        | Unsettled::Systemic(_)
                )
            }
            Outcome::TokenInvalid => false,
        }
    }

    /// Whether calls stopped: the token was rejected, or MAX answered 403/404 or not a chat for
    /// nearly every chat known active (a fault of the setup).
    pub fn stopped_calls(&self) -> bool {
        matches!(
            self,
            Outcome::TokenInvalid
                | Outcome::Failed {
                    reason: Unsettled::Systemic(_),
                    ..
                }
        )
    }

    /// Whether the chat needs no further attempt for now.
    pub fn is_settled(&self) -> bool {
        matches!(self, Outcome::Fresh { .. } | Outcome::Gone { .. })
    }

    fn asked_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Outcome::Fresh { asked_at, .. }
            | Outcome::Gone { asked_at, .. }
            | Outcome::Failed { asked_at, .. } => Some(*asked_at),
            Outcome::TokenInvalid => None,
        }
    }
}

/// The answers of one refresh from chats known active (the only evidence against the setup).
#[derive(Default)]
struct Evidence {
    asked: usize,
    bad: usize,
    /// Of the bad answers, how many were not a chat (the rest 403/404).
    unusable: usize,
}

impl Evidence {
    fn note(&mut self, chunk: &[(i32, Outcome, bool)]) {
        for (_, outcome, known_active) in chunk {
            if !*known_active || !outcome.asked_max() {
                continue;
            }
            self.asked += 1;
            if is_bad_answer(outcome) {
                self.bad += 1;
                if !is_unavailable(outcome) {
                    self.unusable += 1;
                }
            }
        }
    }

    fn is_systemic(&self) -> bool {
        self.asked >= SYSTEMIC_MIN_ASKED && self.bad as f64 >= SYSTEMIC_SHARE * self.asked as f64
    }

    /// What the setup's fault looks like, for the log and `max_last_error`.
    fn kind(&self) -> &'static str {
        if self.unusable * 2 > self.bad {
            "not_a_chat"
        } else {
            "forbidden_or_not_found"
        }
    }
}

/// Why `fetch` gave no chat.
enum Fetch {
    /// The process is stopping; nothing was asked.
    ShuttingDown,
    /// The fleet's rate limit could not be read (Redis down); nothing was asked.
    LimiterUnavailable,
    /// The last error, and when the call that got it was made.
    Failed(MaxError, DateTime<Utc>),
}

#[derive(Clone)]
pub struct Refresher {
    inner: Arc<Inner>,
}

struct Inner {
    max: MaxClient,
    limiter: Limiter,
    redis: Client,
    db: PgPool,
    metrics: Metrics,
    token: TokenState,
    cache_ttl: Duration,
    retries: u32,
    batch_size: usize,
    policy: CallPolicy,
    /// Cancelled on shutdown: no MAX call or retry starts after it, and every wait ends.
    stopping: CancellationToken,
    /// The latest answers of chats known active, true where they spoke against the setup
    /// (403/404, not a chat), across calls: a wrong setup shows there even when each call asks
    /// about a chat or two.
    recent_answers: std::sync::Mutex<std::collections::VecDeque<bool>>,
    /// Whether the latest answer was not a chat (a streak is logged once, at its start).
    unusable_streak: AtomicBool,
    /// Whether some chat ever gave a count. Until one has (a new deployment), no chat is known
    /// active, and every chat's answers are evidence about the setup: a wrong MAX_API_URL on
    /// the first day must not mark every chat gone for a week.
    fleet_has_counts: AtomicBool,
}

/// Settings of a `Refresher`.
pub struct RefresherParts {
    pub max: MaxClient,
    pub limiter: Limiter,
    pub redis: Client,
    pub db: PgPool,
    pub metrics: Metrics,
    pub token: TokenState,
    pub cache_ttl: Duration,
    pub retries: u32,
    pub batch_size: usize,
}

impl Refresher {
    pub fn new(parts: RefresherParts) -> Self {
        Self {
            inner: Arc::new(Inner {
                max: parts.max,
                limiter: parts.limiter,
                redis: parts.redis,
                db: parts.db,
                metrics: parts.metrics,
                token: parts.token,
                cache_ttl: parts.cache_ttl,
                retries: parts.retries,
                batch_size: parts.batch_size.max(1),
                policy: CallPolicy::default(),
                stopping: CancellationToken::new(),
                recent_answers: std::sync::Mutex::new(std::collections::VecDeque::new()),
                unusable_streak: AtomicBool::new(false),
                fleet_has_counts: AtomicBool::new(false),
            }),
        }
    }

    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }

    pub fn token(&self) -> &TokenState {
        &self.inner.token
    }

    /// Stops starting MAX calls and retries (shutdown) and ends every wait for one; calls in
    /// flight finish.
    pub fn stop(&self) {
        self.inner.stopping.cancel();
    }

    /// Refreshes `targets`: up to `batch_size` MAX calls in flight, results written to Redis and
    /// Postgres in batches of `batch_size`. Returns each chat's outcome, or an error when a
    /// write failed (then nothing about the failed batch may be acknowledged).
    ///
    /// Once `stop` fires no new call starts (calls in flight finish); the chats not asked get
    /// `Unsettled::Stopped`.
    pub async fn refresh(
        &self,
        targets: Vec<Target>,
        urgency: Urgency,
        stop: Option<&CancellationToken>,
    ) -> anyhow::Result<Vec<(i32, Outcome)>> {
        let inner = &self.inner;
        let everyone_is_evidence = !self.fleet_has_counts().await;
        let mut results = Vec::with_capacity(targets.len());
        let mut calls = futures::stream::iter(targets)
            .map(|target| async move {
                let outcome = if stop.is_some_and(CancellationToken::is_cancelled) {
                    Outcome::Failed {
                        reason: Unsettled::Stopped,
                        asked_at: Utc::now(),
                    }
                } else {
                    // A refresh someone asked for continues that request's trace.
                    let span = tracing::info_span!("refresh_chat", chat.id = target.chat_id, urgency = ?urgency);
                    if let Some(traceparent) = &target.traceparent {
                        shared::telemetry::set_remote_parent(&span, traceparent);
                    }
                    self.refresh_one(&target, urgency).instrument(span).await
                };
                (target.chat_id, outcome, everyone_is_evidence || target.known_active())
            })
            .buffer_unordered(inner.batch_size)
            .ready_chunks(inner.batch_size);
        // Counts and passing failures are written as they come; "this chat is unavailable"
        // and "not a chat" wait for the end, when it is clear whether MAX said so of nearly
        // every chat known active.
        let mut held = Vec::new();
        let mut evidence = Evidence::default();
        let mut stopped_here = false;
        while let Some(chunk) = calls.next().await {
            evidence.note(&chunk);
            if let Some((affected, latest)) = self.note_answers(&chunk) {
                if self.inner.token.reported_valid() {
                    // Stop the calls now, not at the end of a page of hundreds.
                    self.inner
                        .token
                        .record_systemic(evidence.kind(), affected, latest);
                    self.restore_recently_marked().await;
                }
                self.forget_answers();
                stopped_here = true;
            }
            let (bad, rest): (Vec<_>, Vec<_>) = chunk
                .into_iter()
                .map(|(chat_id, outcome, _)| (chat_id, outcome))
                .partition(|(_, o)| is_bad_answer(o));
            self.write(&rest).await?;
            results.extend(rest);
            held.extend(bad);
        }
        let systemic =
            stopped_here || evidence.is_systemic() || self.recent_answers_systemic().is_some();
        if systemic && !held.is_empty() {
            let kind = evidence.kind();
            let was_running = self.inner.token.reported_valid();
            self.inner
                .token
                .record_systemic(kind, evidence.bad, evidence.asked);
            self.forget_answers();
            if was_running {
                self.restore_recently_marked().await;
            }
            for (_, outcome) in &mut held {
                let asked_at = outcome.asked_at().unwrap_or_else(Utc::now);
                *outcome = Outcome::Failed {
                    reason: Unsettled::Systemic(kind.to_owned()),
                    asked_at,
                };
            }
        } else {
            self.write(&held).await?;
        }
        results.extend(held);
        Ok(results)
    }

    /// Whether some chat ever gave a count (asked of Postgres until one has, then remembered).
    async fn fleet_has_counts(&self) -> bool {
        if self.inner.fleet_has_counts.load(Ordering::Relaxed) {
            return true;
        }
        // Unknown (Postgres down) counts as yes: only known-active chats are evidence then.
        let has = store::any_chat_has_a_count(&self.inner.db)
            .await
            .unwrap_or(true);
        if has {
            self.inner.fleet_has_counts.store(true, Ordering::Relaxed);
        }
        has
    }

    /// Remembers the latest answers of chats known active (see `Inner::recent_answers`);
    /// returns how many of how many spoke against the setup when that is nearly all.
    fn note_answers(&self, chunk: &[(i32, Outcome, bool)]) -> Option<(usize, usize)> {
        {
            let mut recent = self
                .inner
                .recent_answers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (_, outcome, _) in chunk
                .iter()
                .filter(|(_, o, known_active)| *known_active && o.asked_max())
            {
                recent.push_back(is_bad_answer(outcome));
                if recent.len() > SYSTEMIC_WINDOW {
                    recent.pop_front();
                }
            }
        }
        self.recent_answers_systemic()
    }

    /// A systemic fault is seen only after some answers: chats marked forbidden or not found
    /// just before it was (a refresh of a chat or two, before the latest answers added up) are
    /// made due again, so that they are not skipped for `PARTICIPANTS_INACTIVE_RECHECK`.
    async fn restore_recently_marked(&self) {
        match store::restore_unavailable_since(&self.inner.db, SYSTEMIC_LOOKBACK).await {
            Ok(0) => {}
            Ok(restored) => tracing::warn!(
                restored,
                "chats marked unavailable just before the fault was seen are due again"
            ),
            Err(error) => {
                tracing::warn!(error = %error, "could not restore chats marked during the fault")
            }
        }
    }

    /// Drops the latest answers once they have stopped the calls: when calls resume, only
    /// new answers may stop them again.
    fn forget_answers(&self) {
        self.inner
            .recent_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// When nearly all of the latest answers of chats known active, across calls, spoke
    /// against the setup: how many of how many.
    fn recent_answers_systemic(&self) -> Option<(usize, usize)> {
        let recent = self
            .inner
            .recent_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let unavailable = recent.iter().filter(|u| **u).count();
        (recent.len() >= SYSTEMIC_MIN_ASKED
            && unavailable as f64 >= SYSTEMIC_SHARE * recent.len() as f64)
            .then_some((unavailable, recent.len()))
    }

    async fn write(&self, chunk: &[(i32, Outcome)]) -> anyhow::Result<()> {
        let inner = &self.inner;
        let mut fresh = Vec::new();
        let mut failures = Vec::new();
        for (chat_id, outcome) in chunk {
            match outcome {
                // Not the chat's failure: nothing was asked, the process is stopping, or MAX
                // said the same of nearly every chat.
                Outcome::Failed { reason, .. } if !reason.is_the_chats() => {}
                Outcome::Fresh { count, asked_at } => fresh.push(FreshCount {
                    chat_id: *chat_id,
                    count: *count,
                    asked_at: *asked_at,
                }),
                Outcome::Gone { status, asked_at } => failures.push(Failure {
                    chat_id: *chat_id,
                    status: status.clone(),
                    error: status.to_string(),
                    asked_at: *asked_at,
                }),
                Outcome::Failed { reason, asked_at } => failures.push(Failure {
                    chat_id: *chat_id,
                    status: SyncStatus::Active,
                    error: reason
                        .to_string()
                        .chars()
                        .take(ERROR_DETAIL_CHARS)
                        .collect(),
                    asked_at: *asked_at,
                }),
                Outcome::TokenInvalid => {}
            }
        }
        if !fresh.is_empty() {
            let entries: Vec<(i32, CachedCount)> = fresh
                .iter()
                .map(|f| {
                    (
                        f.chat_id,
                        CachedCount {
                            count: f.count,
                            updated_at: f.asked_at,
                        },
                    )
                })
                .collect();
            counts::write_fenced(&inner.redis, &entries, inner.cache_ttl)
                .await
                .map_err(|e| anyhow::anyhow!("writing counts to redis failed: {e}"))?;
            store::write_counts(&inner.db, &fresh).await?;
            inner.metrics.refreshed.inc_by(fresh.len() as u64);
        }
        store::write_failures(&inner.db, &failures).await?;
        Ok(())
    }

    async fn refresh_one(&self, target: &Target, urgency: Urgency) -> Outcome {
        let now = Utc::now();
        let Some(max_id) = target
            .max_chat_id
            .as_deref()
            .and_then(|text| MaxChatId::parse(text).ok())
        else {
            return Outcome::Gone {
                status: SyncStatus::InvalidId,
                asked_at: now,
            };
        };
        match self.fetch(max_id, urgency).await {
            Ok((chat, asked_at)) if chat.is_active() => Outcome::Fresh {
                count: chat.participants_count,
                asked_at,
            },
            Ok((chat, asked_at)) => Outcome::Gone {
                status: SyncStatus::from(chat.status.as_str()),
                asked_at,
            },
            Err(Fetch::ShuttingDown) => Outcome::Failed {
                reason: Unsettled::ShuttingDown,
                asked_at: Utc::now(),
            },
            Err(Fetch::LimiterUnavailable) => Outcome::Failed {
                reason: Unsettled::LimiterUnavailable,
                asked_at: Utc::now(),
            },
            Err(Fetch::Failed(MaxError::ChatUnavailable(kind), asked_at)) => Outcome::Gone {
                status: SyncStatus::from(kind),
                asked_at,
            },
            Err(Fetch::Failed(MaxError::InvalidToken, _)) => Outcome::TokenInvalid,
            Err(Fetch::Failed(MaxError::Unexpected { kind, detail }, asked_at)) => {
                Outcome::Failed {
                    reason: Unsettled::Unusable { kind, detail },
                    asked_at,
                }
            }
            Err(Fetch::Failed(error, asked_at)) => {
                let outage = matches!(error, MaxError::RateLimited)
                    || self.inner.policy.streak() >= OUTAGE_STREAK;
                Outcome::Failed {
                    reason: if outage {
                        Unsettled::Outage(error.kind())
                    } else {
                        Unsettled::Max(error.kind())
                    },
                    asked_at,
                }
            }
        }
    }

    /// One chat from MAX, with retries. Returns the chat and the moment the successful call was
    /// made on the fleet's clock (Redis', the write fence), or the last error and when it
    /// happened. No call or retry starts once `stop` was called, and every wait ends then.
    async fn fetch(
        &self,
        chat_id: MaxChatId,
        urgency: Urgency,
    ) -> Result<(MaxChat, DateTime<Utc>), Fetch> {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            if inner.stopping.is_cancelled() {
                return Err(Fetch::ShuttingDown);
            }
            // While the token is rejected, one call a minute (fleet member-wide) is let through
            // as a probe; every other call stops here.
            let probing = !inner.token.reported_valid();
            if probing && !inner.token.is_valid() {
                return Err(Fetch::Failed(MaxError::InvalidToken, Utc::now()));
            }
            match inner.policy.gate() {
                Gate::Closed => {}
                Gate::HalfOpened => self.log(Event::BreakerHalfOpen),
                Gate::Open(wait) => self.sleep(wait).await?,
            }
            let slot = match inner.limiter.acquire(urgency, &inner.stopping).await {
                Ok(slot) => slot,
                Err(NoSlot::Stopped) => return Err(Fetch::ShuttingDown),
                Err(NoSlot::Unavailable) => return Err(Fetch::LimiterUnavailable),
            };
            inner
                .metrics
                .limiter_wait
                .observe(slot.waited.as_secs_f64());
            // The token may have been rejected while this call waited for its slot.
            if !probing && !inner.token.reported_valid() {
                return Err(Fetch::Failed(MaxError::InvalidToken, Utc::now()));
            }
            let asked_at = slot.at;
            let sent_at = tokio::time::Instant::now();
            let span = tracing::info_span!("max.get_chat", otel.kind = "client", max.chat_id = %chat_id, attempt);
            let result = inner.max.get_chat(chat_id).instrument(span).await;
            inner
                .metrics
                .update_duration
                .observe(sent_at.elapsed().as_secs_f64());
            let error = match result {
                Ok(chat) => {
                    inner.metrics.max_requests.with_label_values(&["ok"]).inc();
                    if let Some(event) = inner.policy.on_success() {
                        self.log(event);
                    }
                    self.end_unusable_streak();
                    inner.token.record_success();
                    return Ok((chat, asked_at));
                }
                Err(error) => error,
            };
            inner
                .metrics
                .max_requests
                .with_label_values(&["error"])
                .inc();
            inner
                .metrics
                .max_errors
                .with_label_values(&[error.kind()])
                .inc();
            if !self.on_error(&error, sent_at) {
                return Err(Fetch::Failed(error, asked_at));
            }
            inner.token.record_error(&error);
            if attempt >= inner.retries || inner.stopping.is_cancelled() {
                return Err(Fetch::Failed(error, asked_at));
            }
            attempt += 1;
            if matches!(error, MaxError::Transient(_)) {
                let ceiling = CallPolicy::retry_ceiling(attempt);
                let jitter = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
                self.sleep(Duration::from_millis(jitter)).await?;
            }
        }
    }

    /// Applies what an error means to the call policy and the token; true when the call may
    /// be retried.
    fn on_error(&self, error: &MaxError, sent_at: tokio::time::Instant) -> bool {
        let inner = &self.inner;
        match error {
            MaxError::RateLimited => {
                // Every call of a batch in flight may come back 429 at once: one pause
                // answers them all.
                if let Some(event) = inner.policy.on_rate_limited(sent_at) {
                    self.log(event);
                    if let Event::Paused(pause) = event {
                        let limiter = self.clone();
                        // Recorded in the background: the retry waits for the pause anyway.
                        tokio::spawn(async move { limiter.inner.limiter.pause(pause).await });
                    }
                }
                true
            }
            MaxError::Transient(kind) => {
                if let Some(event) = inner.policy.on_transient() {
                    if event == Event::StreakStarted {
                        tracing::warn!(
                            error = *kind,
                            "MAX calls are failing; retrying with backoff"
                        );
                    } else {
                        self.log(event);
                    }
                }
                true
            }
            MaxError::InvalidToken => {
                inner.token.record_invalid(error);
                false
            }
            MaxError::ChatUnavailable(_) => {
                // MAX answered: a streak of passing failures is over.
                if let Some(event) = inner.policy.on_success() {
                    self.log(event);
                }
                inner.token.record_chat_unavailable();
                false
            }
            MaxError::Unexpected { kind, detail } => {
                // Not a chat: never a success. Logged at the start of a streak, kept as the
                // last error for `/health/detailed`; every chat getting it stops the calls.
                if !inner.unusable_streak.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = *kind,
                        detail = %detail,
                        "MAX answered something that is not a chat; counted as a failure"
                    );
                }
                inner.token.record_error(error);
                false
            }
        }
    }

    fn end_unusable_streak(&self) {
        if self.inner.unusable_streak.swap(false, Ordering::Relaxed) {
            tracing::info!("MAX answers with chats again");
        }
    }

    /// Sleeps, or ends at once with `ShuttingDown` when the process stops.
    async fn sleep(&self, length: Duration) -> Result<(), Fetch> {
        tokio::select! {
            () = tokio::time::sleep(length) => Ok(()),
            () = self.inner.stopping.cancelled() => Err(Fetch::ShuttingDown),
        }
    }

    /// One log line (and the breaker gauge) per change of the call policy.
    fn log(&self, event: Event) {
        match event {
            // Logged by the caller, which knows the error.
            Event::StreakStarted => {}
            Event::BreakerOpened { failures, open } => {
                self.inner.metrics.max_breaker_open.set(1);
                tracing::warn!(
                    failures,
                    open_s = open.as_secs(),
                    "MAX keeps failing; circuit open"
                );
            }
            Event::BreakerHalfOpen => {
                self.inner.metrics.max_breaker_open.set(0);
                tracing::info!("circuit half-open: MAX calls resume");
            }
            Event::Recovered { failed } => {
                tracing::info!(failed_calls = failed, "MAX answers again");
            }
            Event::Paused(pause) => tracing::warn!(
                pause_ms = pause.as_millis() as u64,
                "MAX answered 429; pausing the fleet"
            ),
        }
    }

    /// While calls are stopped (the token rejected, or a fault of the setup): when a probe is
    /// due, one MAX call for a chat picked afresh among those that last gave a count tells
    /// whether calls work again. Nothing is asked of Postgres until a probe is due.
    pub async fn probe_token(&self, db: &PgPool) {
        if !self.inner.token.probe_due() {
            return;
        }
        let sample = match store::probe_chat(db).await {
            Ok(sample) => sample,
            Err(error) => {
                tracing::debug!(error = %error, "no chat to probe MAX with yet");
                return;
            }
        };
        let Some(max_id) = sample
            .as_deref()
            .and_then(|text| MaxChatId::parse(text).ok())
        else {
            return;
        };
        // `fetch` lets exactly one call through per recheck period.
        let _ = self.fetch(max_id, Urgency::Manual).await;
    }
}
