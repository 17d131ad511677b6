//! Refreshing a set of chats: MAX calls (concurrent, within the fleet-wide limit, retried with
//! backoff), the systemic verdict over the answers of chats known active, then both writes,
//! fenced by the time MAX was asked.
//!
//! `max` is the MAX client, `limiter` the fleet-wide rate, `policy` the breaker and pauses,
//! `call` one chat's call, `outcome` what each chat came to.

pub mod call;
pub mod limiter;
pub mod max;
pub mod outcome;
pub mod policy;

pub use outcome::{Outcome, Unsettled};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use futures::StreamExt;
use shared::counts::{self, CachedCount};
use shared::sync_status::SyncStatus;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::store::{self, Failure, FreshCount, Target};
use crate::token::TokenState;
use limiter::{Limiter, Urgency};
use max::MaxClient;
use outcome::{is_bad_answer, Evidence, SYSTEMIC_MIN_ASKED, SYSTEMIC_SHARE, SYSTEMIC_WINDOW};
use policy::CallPolicy;

/// The most of a MAX answer's detail kept in `last_error`.
const ERROR_DETAIL_CHARS: usize = 300;

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
    /// When MAX last answered a call of this process (a chat, or 403/404 for one): a passing
    /// failure is a chat's own only if MAX answered other calls meanwhile.
    last_answer: std::sync::Mutex<Option<std::time::Instant>>,
    /// When a control call last found MAX failing for everyone.
    outage_seen: std::sync::Mutex<Option<std::time::Instant>>,
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
                last_answer: std::sync::Mutex::new(None),
                outage_seen: std::sync::Mutex::new(None),
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
                }
                self.forget_answers();
                stopped_here = true;
            }
            let (bad, rest): (Vec<_>, Vec<_>) =
                chunk.into_iter().partition(|(_, o, _)| is_bad_answer(o));
            let rest: Vec<(i32, Outcome)> = rest.into_iter().map(|(id, o, _)| (id, o)).collect();
            self.write(&rest).await?;
            results.extend(rest);
            held.extend(bad);
        }
        let mut systemic =
            stopped_here || evidence.is_systemic() || self.recent_answers_systemic().is_some();
        // A chat known active that now answers 403/404 or not a chat: believed once MAX gives
        // another chat known active (a control call), so that the first answers of a fault of
        // the setup mark nothing.
        let suspects: Vec<i32> = held
            .iter()
            .filter(|(_, _, evidence)| *evidence)
            .map(|(id, _, _)| *id)
            .collect();
        let mut unconfirmed = false;
        if !systemic && !suspects.is_empty() {
            match self.control(&suspects, urgency).await {
                Control::MaxGivesChats => {}
                Control::MaxGivesNone => systemic = true,
                Control::Unknown => unconfirmed = true,
            }
        }
        let mut held: Vec<(i32, Outcome)> = held.into_iter().map(|(id, o, _)| (id, o)).collect();
        if systemic && !held.is_empty() {
            let kind = evidence.kind();
            self.inner.token.record_systemic(
                kind,
                evidence.bad.max(suspects.len()),
                evidence.asked.max(suspects.len()),
            );
            self.forget_answers();
            settle_as(&mut held, |_| true, || Unsettled::Systemic(kind.to_owned()));
        } else {
            if unconfirmed {
                settle_as(
                    &mut held,
                    |id| suspects.contains(&id),
                    || Unsettled::Unconfirmed,
                );
            }
            self.write(&held).await?;
        }
        results.extend(held);
        Ok(results)
    }

    /// Asks MAX about up to two chats known active other than `suspects` (picked at random):
    /// whether MAX gives chats, none, or cannot tell (no such chat, MAX failing, stopping).
    pub(super) async fn control(&self, suspects: &[i32], urgency: Urgency) -> Control {
        let mut bad = 0;
        for _ in 0..2 {
            let Ok(Some((chat_id, max_id))) = store::control_chat(&self.inner.db, suspects).await
            else {
                return Control::Unknown;
            };
            let Ok(max_id) = shared::ids::MaxChatId::parse(&max_id) else {
                return Control::Unknown;
            };
            match self.fetch(max_id, urgency).await {
                Ok((chat, _)) if chat.is_active() => return Control::MaxGivesChats,
                Ok(_)
                | Err(call::Fetch::Failed(
                    max::MaxError::ChatUnavailable(_) | max::MaxError::Unexpected { .. },
                    _,
                )) => {
                    tracing::debug!(chat.id = chat_id, "the control chat gave no count either");
                    bad += 1;
                }
                Err(_) => return Control::Unknown,
            }
        }
        if bad == 2 {
            Control::MaxGivesNone
        } else {
            Control::Unknown
        }
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
}

/// What a control call said about MAX.
pub(super) enum Control {
    MaxGivesChats,
    MaxGivesNone,
    Unknown,
}

/// Turns the outcomes of the chats `which` picks into failures of `reason`, keeping when MAX
/// was asked.
fn settle_as(
    outcomes: &mut [(i32, Outcome)],
    which: impl Fn(i32) -> bool,
    reason: impl Fn() -> Unsettled,
) {
    for (_, outcome) in outcomes.iter_mut().filter(|(id, _)| which(*id)) {
        let asked_at = outcome.asked_at().unwrap_or_else(Utc::now);
        *outcome = Outcome::Failed {
            reason: reason(),
            asked_at,
        };
    }
}
