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
use crate::limiter::{Limiter, Urgency};
use crate::max::{MaxChat, MaxClient, MaxError};
use crate::metrics::Metrics;
use crate::status::TokenState;
use crate::store::{self, Failure, FreshCount, Target};

/// A refresh with at least this many chats asked, or the latest `SYSTEMIC_WINDOW` answers,
/// where this share was 403 or 404, is a fault of the setup, not of the chats: those chats are
/// not marked unavailable, and calls stop as for an invalid token.
const SYSTEMIC_MIN_ASKED: usize = 10;
const SYSTEMIC_SHARE: f64 = 0.8;
const SYSTEMIC_WINDOW: usize = 50;
/// How far back marks of forbidden/not found are undone when a systemic fault is seen.
const SYSTEMIC_LOOKBACK: Duration = Duration::from_secs(120);

/// MAX would not show the chat: 403 or 404 (not a chat whose own status says it is gone).
fn is_unavailable(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Gone { status, .. } if status.is_unavailable())
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
    /// A passing MAX failure (the error's kind) that outlasted the retries: the chat's own
    /// failure, recorded, and tried again after its backoff.
    Max(&'static str),
    /// Not asked: the caller stopped the refresh (a sweep handing its work back).
    Stopped,
    /// Not asked: this process is shutting down.
    ShuttingDown,
    /// Asked, but MAX answered this for nearly every chat: a fault of the setup, not the
    /// chat's, so nothing is recorded of the chat.
    Systemic(SyncStatus),
}

impl Unsettled {
    /// The chat's own failure, recorded against it (the others are not the chat's fault).
    fn is_the_chats(&self) -> bool {
        matches!(self, Unsettled::Max(_))
    }
}

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsettled::Max(kind) => f.write_str(kind),
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
                matches!(reason, Unsettled::Max(_) | Unsettled::Systemic(_))
            }
            Outcome::TokenInvalid => false,
        }
    }

    /// Whether calls stopped: the token was rejected, or MAX answered 403/404 for nearly every
    /// chat (a fault of the setup).
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
}

/// Why `fetch` gave no chat.
enum Fetch {
    /// The process is stopping; nothing was asked.
    ShuttingDown,
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
    stopping: AtomicBool,
    /// The latest answers, true where MAX would not show the chat (403/404), across calls:
    /// a wrong setup shows there even when each call asks about a chat or two.
    recent_answers: std::sync::Mutex<std::collections::VecDeque<bool>>,
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
                stopping: AtomicBool::new(false),
                recent_answers: std::sync::Mutex::new(std::collections::VecDeque::new()),
            }),
        }
    }

    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }

    pub fn token(&self) -> &TokenState {
        &self.inner.token
    }

    /// Stops starting MAX calls (shutdown); calls in flight finish.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
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
                (target.chat_id, outcome)
            })
            .buffer_unordered(inner.batch_size)
            .ready_chunks(inner.batch_size);
        // Counts and passing failures are written as they come; "this chat is unavailable"
        // waits for the end, when it is clear whether MAX said so of nearly every chat.
        let mut unavailable = Vec::new();
        let mut stopped_here = false;
        while let Some(chunk) = calls.next().await {
            self.note_answers(&chunk);
            if let Some((affected, latest)) = self.recent_answers_systemic() {
                if self.inner.token.reported_valid() {
                    // Stop the calls now, not at the end of a page of hundreds.
                    self.inner
                        .token
                        .record_systemic("forbidden_or_not_found", affected, latest);
                    self.restore_recently_marked().await;
                }
                self.forget_answers();
                stopped_here = true;
            }
            let (gone, rest): (Vec<_>, Vec<_>) =
                chunk.into_iter().partition(|(_, o)| is_unavailable(o));
            self.write(&rest).await?;
            results.extend(rest);
            unavailable.extend(gone);
        }
        let asked = results.iter().filter(|(_, o)| o.asked_max()).count() + unavailable.len();
        let systemic = stopped_here
            || (asked >= SYSTEMIC_MIN_ASKED
                && unavailable.len() as f64 >= SYSTEMIC_SHARE * asked as f64)
            || self.recent_answers_systemic().is_some();
        if systemic && !unavailable.is_empty() {
            let kind = match &unavailable[0].1 {
                Outcome::Gone { status, .. } => status.clone(),
                _ => SyncStatus::NotFound,
            };
            let was_running = self.inner.token.reported_valid();
            self.inner
                .token
                .record_systemic(kind.as_str(), unavailable.len(), asked);
            self.forget_answers();
            if was_running {
                self.restore_recently_marked().await;
            }
            for (_, outcome) in &mut unavailable {
                if let Outcome::Gone { status, asked_at } = outcome {
                    *outcome = Outcome::Failed {
                        reason: Unsettled::Systemic(status.clone()),
                        asked_at: *asked_at,
                    };
                }
            }
        } else {
            self.write(&unavailable).await?;
        }
        results.extend(unavailable);
        Ok(results)
    }

    /// Remembers the latest answers (see `Inner::recent_answers`).
    fn note_answers(&self, chunk: &[(i32, Outcome)]) {
        let mut recent = self
            .inner
            .recent_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (_, outcome) in chunk.iter().filter(|(_, o)| o.asked_max()) {
            recent.push_back(is_unavailable(outcome));
            if recent.len() > SYSTEMIC_WINDOW {
                recent.pop_front();
            }
        }
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

    /// When nearly all of the latest answers, across calls, were 403/404: how many of how
    /// many.
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
                    error: reason.to_string(),
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
            Err(Fetch::Failed(MaxError::ChatUnavailable(kind), asked_at)) => Outcome::Gone {
                status: SyncStatus::from(kind),
                asked_at,
            },
            Err(Fetch::Failed(MaxError::InvalidToken, _)) => Outcome::TokenInvalid,
            Err(Fetch::Failed(error, asked_at)) => Outcome::Failed {
                reason: Unsettled::Max(error.kind()),
                asked_at,
            },
        }
    }

    /// One chat from MAX, with retries. Returns the chat and the moment the successful call was
    /// made (the write fence), or the last error and when it happened.
    async fn fetch(
        &self,
        chat_id: MaxChatId,
        urgency: Urgency,
    ) -> Result<(MaxChat, DateTime<Utc>), Fetch> {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            if inner.stopping.load(Ordering::Relaxed) {
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
                Gate::Open(wait) => tokio::time::sleep(wait).await,
            }
            let waited = inner.limiter.acquire(urgency).await;
            inner.metrics.limiter_wait.observe(waited.as_secs_f64());
            // The token may have been rejected while this call waited for its slot.
            if !probing && !inner.token.reported_valid() {
                return Err(Fetch::Failed(MaxError::InvalidToken, Utc::now()));
            }
            let asked_at = Utc::now();
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
            match &error {
                MaxError::RateLimited => {
                    // Every call of a batch in flight may come back 429 at once: one pause
                    // answers them all.
                    if let Some(event) = inner.policy.on_rate_limited(sent_at) {
                        self.log(event);
                        if let Event::Paused(pause) = event {
                            inner.limiter.pause(pause).await;
                        }
                    }
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
                }
                MaxError::InvalidToken => {
                    inner.token.record_invalid(&error);
                    return Err(Fetch::Failed(error, asked_at));
                }
                MaxError::ChatUnavailable(_) => {
                    // MAX answered: a streak of passing failures is over.
                    if let Some(event) = inner.policy.on_success() {
                        self.log(event);
                    }
                    inner.token.record_chat_unavailable();
                    return Err(Fetch::Failed(error, asked_at));
                }
                MaxError::Unexpected(_) => {
                    if let Some(event) = inner.policy.on_success() {
                        self.log(event);
                    }
                    inner.token.record_success();
                    return Err(Fetch::Failed(error, asked_at));
                }
            }
            inner.token.record_error(&error);
            if attempt >= inner.retries {
                return Err(Fetch::Failed(error, asked_at));
            }
            attempt += 1;
            if matches!(error, MaxError::Transient(_)) {
                let ceiling = CallPolicy::retry_ceiling(attempt);
                let jitter = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
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

    /// While the token is rejected: when a probe is due, one MAX call for some chat tells
    /// whether the token works again (any answer but 401/403 `verify.token` means it does).
    pub async fn probe_token(&self, db: &PgPool) {
        let sample: Option<String> = sqlx::query_scalar(
            // A chat that last gave a count, so that its answer says whether calls work.
            "select c.max_chat_id from chats c left join chat_participants p on p.chat_id = c.id \
             where c.max_chat_id ~ '^-?[0-9]+$' \
             order by (p.sync_status = 'active' and p.participants_updated_at is not null) desc nulls last, \
                      p.participants_updated_at desc nulls last, c.id limit 1",
        )
        .fetch_optional(db)
        .await
        .ok()
        .flatten();
        let Some(max_id) = sample
            .as_deref()
            .and_then(|text| MaxChatId::parse(text).ok())
        else {
            return;
        };
        // `fetch` lets exactly one call through per recheck period.
        let _ = self.fetch(max_id, Urgency::Urgent).await;
    }
}
