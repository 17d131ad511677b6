//! One chat's MAX call: the token and breaker gates, the fleet-wide slot, the call, what its
//! error means (retry, pause the fleet, stop, the chat's own failure or MAX's outage), and the
//! probe while calls are stopped. No call or retry starts after `Refresher::stop`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use shared::ids::MaxChatId;
use shared::sync_status::SyncStatus;
use sqlx::PgPool;
use tracing::Instrument;

use super::limiter::{NoSlot, Urgency};
use super::max::{MaxChat, MaxError};
use super::policy::{CallPolicy, Event, Gate};
use super::{Outcome, Refresher, Unsettled};
use crate::store::{self, Target};

/// Why `fetch` gave no chat.
pub(super) enum Fetch {
    /// The process is stopping; nothing was asked.
    ShuttingDown,
    /// The fleet's rate limit could not be read (Redis down); nothing was asked.
    LimiterUnavailable,
    /// The last error, and when the call that got it was made.
    Failed(MaxError, DateTime<Utc>),
}

impl Refresher {
    pub(super) async fn refresh_one(&self, target: &Target, urgency: Urgency) -> Outcome {
        let started = std::time::Instant::now();
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
                // The chat's own failure only if MAX answers other calls: seen while this
                // chat's attempts went on, or shown by a control call to a chat known active.
                // Otherwise MAX is failing for everyone: its outage.
                let outage = matches!(error, MaxError::RateLimited)
                    || (!self.answered_since(started)
                        && !self.max_answers_others(target.chat_id, urgency).await);
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
    pub(super) async fn fetch(
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
                    self.note_answered();
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
                self.note_answered();
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

    /// Whether MAX answers a control call to another chat known active now. A failed control
    /// is remembered for a few seconds, so an outage costs one control call per few seconds,
    /// not one per failing chat.
    async fn max_answers_others(&self, chat_id: i32, urgency: Urgency) -> bool {
        const OUTAGE_MEMORY: std::time::Duration = std::time::Duration::from_secs(5);
        let recent_outage = self
            .inner
            .outage_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < OUTAGE_MEMORY);
        if recent_outage || self.inner.stopping.is_cancelled() {
            return false;
        }
        let answers = matches!(
            self.control(&[chat_id], urgency).await,
            super::Control::MaxGivesChats
        );
        if !answers {
            *self
                .inner
                .outage_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        }
        answers
    }

    fn note_answered(&self) {
        *self
            .inner
            .last_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// Whether MAX answered some call of this process after `since`.
    fn answered_since(&self, since: std::time::Instant) -> bool {
        self.inner
            .last_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at > since)
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
                self.inner.metrics.max_breaker_opened.inc();
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
