//! Whether MAX calls may be made: the bot token accepted and no fault of the setup seen, the one
//! probe a minute while they are stopped, and the last MAX success and error (published by
//! `heartbeat` for the api's `/health/detailed`).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use shared::keys::status;

use crate::metrics::Metrics;
use crate::refresh::max::MaxError;

/// While the token is invalid, one call per this period checks whether it works again.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct TokenState {
    pub(crate) inner: Arc<TokenInner>,
}

pub(crate) struct TokenInner {
    valid: AtomicBool,
    /// Calls stopped for a systemic 403/404 rather than for the token.
    systemic: AtomicBool,
    next_probe_ms: AtomicI64,
    last_success_ms: AtomicI64,
    last_error: Mutex<Option<(String, i64)>>,
    metrics: Metrics,
    /// Wakes the heartbeat so that a change of validity is published at once.
    pub(crate) changed: tokio::sync::Notify,
}

impl TokenState {
    pub fn new(metrics: Metrics) -> Self {
        metrics.token_valid.set(1);
        Self {
            inner: Arc::new(TokenInner {
                valid: AtomicBool::new(true),
                systemic: AtomicBool::new(false),
                next_probe_ms: AtomicI64::new(0),
                last_success_ms: AtomicI64::new(0),
                last_error: Mutex::new(None),
                metrics,
                changed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// True while calls may be made. While the token is invalid it is true once per
    /// `TOKEN_RECHECK`, for exactly one caller, whose call is the probe.
    pub fn is_valid(&self) -> bool {
        if self.inner.valid.load(Ordering::Relaxed) {
            return true;
        }
        let now = Utc::now().timestamp_millis();
        let next = self.inner.next_probe_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .inner
                .next_probe_ms
                .compare_exchange(
                    next,
                    now + TOKEN_RECHECK.as_millis() as i64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether a probe is due (calls stopped, and the recheck period passed); takes nothing.
    pub fn probe_due(&self) -> bool {
        !self.inner.valid.load(Ordering::Relaxed)
            && Utc::now().timestamp_millis() >= self.inner.next_probe_ms.load(Ordering::Relaxed)
    }

    /// Whether the token was valid at the last answer (for reporting; no probe).
    pub fn reported_valid(&self) -> bool {
        self.inner.valid.load(Ordering::Relaxed)
    }

    /// MAX gave a chat: the token and the setup work.
    pub fn record_success(&self) {
        self.inner
            .last_success_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        let systemic = self.inner.systemic.swap(false, Ordering::Relaxed);
        if !self.inner.valid.swap(true, Ordering::Relaxed) {
            self.inner.metrics.token_valid.set(1);
            self.inner.changed.notify_one();
            if systemic {
                tracing::info!("MAX gives chats again; calls resume");
            } else {
                tracing::info!("MAX accepts the bot token again; calls resume");
            }
        }
    }

    /// MAX answered that it will not show one chat (403, 404): the token works, unless calls
    /// stopped because nearly every chat got that answer, which one more such answer does not
    /// disprove.
    pub fn record_chat_unavailable(&self) {
        if !self.inner.systemic.load(Ordering::Relaxed) {
            self.record_success();
        }
    }

    pub fn record_invalid(&self, error: &MaxError) {
        self.record_error(error);
        // Logged once per transition, not once per refused call.
        if self.stop_calls() {
            tracing::error!(
                recheck_s = TOKEN_RECHECK.as_secs(),
                "MAX rejected the bot token (MAX_API_TOKEN): all MAX calls are stopped; fix the token"
            );
        }
    }

    /// MAX answered 403 or 404 for most chats of one batch: not the chats, but the setup (a
    /// wrong MAX_API_URL, a proxy's error page, another bot's token). Calls stop as for an
    /// invalid token, with one probe a minute, and the chats are not marked unavailable.
    pub fn record_systemic(&self, kind: &str, affected: usize, asked: usize) {
        let error = format!("systemic_{kind}");
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((error, Utc::now().timestamp_millis()));
        self.inner
            .metrics
            .max_errors
            .with_label_values(&["systemic"])
            .inc();
        self.inner.systemic.store(true, Ordering::Relaxed);
        if self.stop_calls() {
            tracing::error!(
                kind,
                affected,
                asked,
                recheck_s = TOKEN_RECHECK.as_secs(),
                "MAX answered {kind} for {affected} of {asked} chats asked together: a fault of the setup (MAX_API_URL, a proxy, the token's bot), not of the chats; all MAX calls are stopped and none of these chats is marked unavailable"
            );
        }
    }

    /// Stops calls until a probe succeeds; true when they were running until now.
    fn stop_calls(&self) -> bool {
        let now = Utc::now().timestamp_millis();
        self.inner
            .next_probe_ms
            .store(now + TOKEN_RECHECK.as_millis() as i64, Ordering::Relaxed);
        let was_valid = self.inner.valid.swap(false, Ordering::Relaxed);
        if was_valid {
            self.inner.metrics.token_valid.set(0);
            self.inner.changed.notify_one();
        }
        was_valid
    }

    /// Keeps `error` as the last one (`max_last_error` in `/health/detailed`): its kind, and
    /// for an answer that is not a chat its detail too.
    pub fn record_error(&self, error: &MaxError) {
        let text = match error {
            MaxError::Unexpected { kind, detail } => {
                format!("{kind}: {}", detail.chars().take(200).collect::<String>())
            }
            other => other.kind().to_owned(),
        };
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((text, Utc::now().timestamp_millis()));
    }

    pub(crate) fn fields(&self) -> Vec<(String, String)> {
        let mut fields = vec![(
            status::MAX_TOKEN.to_owned(),
            if self.reported_valid() {
                "valid"
            } else {
                "invalid"
            }
            .to_owned(),
        )];
        let success = self.inner.last_success_ms.load(Ordering::Relaxed);
        if success > 0 {
            fields.push((status::MAX_LAST_SUCCESS_AT.to_owned(), success.to_string()));
        }
        if let Some((kind, at)) = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            fields.push((status::MAX_LAST_ERROR.to_owned(), kind));
            fields.push((status::MAX_LAST_ERROR_AT.to_owned(), at.to_string()));
        }
        fields
    }
}
