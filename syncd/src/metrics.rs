//! Prometheus metrics of the `syncd` process. Names follow the seeds (`participants_*`).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub max_requests: IntCounterVec,
    pub max_errors: IntCounterVec,
    pub update_duration: Histogram,
    pub limiter_wait: Histogram,
    pub refreshed: IntCounter,
    pub token_valid: IntGauge,
    pub stream_entries: IntCounterVec,
    pub stream_length: IntGaugeVec,
    pub stream_pending: IntGaugeVec,
    pub stream_lag: IntGaugeVec,
    pub dead_letters: IntGauge,
    /// Entries dead-lettered, by reason (`malformed`, `chat_failures`).
    pub dead_lettered: IntCounterVec,
    /// 1 while this replica's circuit breaker holds MAX calls back.
    pub max_breaker_open: IntGauge,
    /// Times the breaker opened: the gauge is 1 for seconds at a time, between two scrapes.
    pub max_breaker_opened: IntCounter,
    /// The consumer group was missing (Redis restarted empty, or flushed) and was recreated.
    pub stream_groups_recreated: IntCounter,
    pub sweep_done: IntGaugeVec,
    pub sweep_planned: IntGaugeVec,
    pub sweeps: IntCounterVec,
    pub stale_data_count: IntGauge,
    pub full_sweep_last_finished: IntGauge,
    pub full_sweep_interval: IntGauge,
    /// Membership updates taken in, by intake mode (`webhook`: stored by the receiver;
    /// `stream`: read from another service's stream).
    pub events_received: IntCounterVec,
    /// Webhook requests and stream entries not taken, by reason.
    pub events_rejected: IntCounterVec,
    /// What each update came to in its chat's register, by outcome.
    pub events_applied: IntCounterVec,
    /// From an update's `timestamp` to its handling by the events consumer.
    pub events_intake_lag: Histogram,
    /// Long-poll gaps in which updates were lost, by reason (`marker_lost`, `retention`).
    pub events_gaps: IntCounterVec,
    /// Webhook mode: 1 while GET /subscriptions lists ours, 0 when it does not.
    pub events_subscription_ok: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric registers once");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = shared::metrics::registry();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        shared::metrics::register_build_info(
            &r,
            "syncd",
            env!("CARGO_PKG_VERSION"),
            option_env!("PARTICIPANTS_GIT_SHA"),
        );
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            register(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid metric"),
            )
        };
        Self {
            max_requests: counter_vec(
                "participants_max_api_requests_total",
                "MAX API calls, by result (ok or error)",
                &["result"],
            ),
            max_errors: counter_vec(
                "participants_max_api_errors_total",
                "Failed MAX API calls, by kind (rate_limited, timeout, server_error, invalid_token, not_found, ...)",
                &["kind"],
            ),
            update_duration: histogram(
                "participants_update_duration_seconds",
                "Duration of one MAX API call",
                vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            limiter_wait: histogram(
                "participants_limiter_wait_seconds",
                "Time a MAX call waited for the fleet-wide rate limiter",
                vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            refreshed: register(&r, IntCounter::new("participants_refreshed_total", "Counts refreshed and written").expect("valid metric")),
            token_valid: register(
                &r,
                IntGauge::new("participants_max_token_valid", "0 while MAX rejects the bot token").expect("valid metric"),
            ),
            stream_entries: counter_vec(
                "participants_stream_entries_total",
                "Refresh stream entries handled, by outcome (acked, retried, dead_lettered)",
                &["outcome"],
            ),
            stream_length: gauge_vec("participants_stream_length", "Entries in each refresh stream", &["stream"]),
            stream_pending: gauge_vec(
                "participants_stream_pending",
                "Entries delivered to a consumer and not yet acknowledged",
                &["stream"],
            ),
            stream_lag: gauge_vec(
                "participants_stream_lag",
                "Entries not yet delivered to any consumer of the group",
                &["stream"],
            ),
            max_breaker_open: register(
                &r,
                IntGauge::new(
                    "participants_max_breaker_open",
                    "1 while this replica's circuit breaker holds MAX calls back after a streak of failures",
                )
                .expect("valid metric"),
            ),
            max_breaker_opened: register(
                &r,
                IntCounter::new(
                    "participants_max_breaker_opened_total",
                    "Times this replica's circuit breaker opened after a streak of MAX failures (it stays open for seconds, then lets calls through again)",
                )
                .expect("valid metric"),
            ),
            stream_groups_recreated: register(
                &r,
                IntCounter::new(
                    "participants_stream_groups_recreated_total",
                    "Times syncd found the refresh stream's consumer group missing (Redis restarted empty or flushed) and recreated it",
                )
                .expect("valid metric"),
            ),
            dead_letters: register(
                &r,
                IntGauge::new("participants_dead_letters", "Entries in the dead-letter stream").expect("valid metric"),
            ),
            dead_lettered: counter_vec(
                "participants_dead_lettered_total",
                "Refresh entries dead-lettered, by reason (malformed, chat_failures)",
                &["reason"],
            ),
            sweep_done: gauge_vec("participants_sweep_done", "Chats done by the running or last sweep", &["kind"]),
            sweep_planned: gauge_vec("participants_sweep_planned", "Chats planned for the running or last sweep", &["kind"]),
            sweeps: counter_vec("participants_sweeps_total", "Sweeps run by this replica, by kind and result", &["kind", "result"]),
            stale_data_count: register(
                &r,
                IntGauge::new("participants_stale_data_count", "Chats whose count is older than the stale threshold or missing")
                    .expect("valid metric"),
            ),
            full_sweep_last_finished: register(
                &r,
                IntGauge::new(
                    "participants_full_sweep_last_finished_timestamp_seconds",
                    "When the fleet's last full sweep finished (Unix time, from Postgres; 0 before the first)",
                )
                .expect("valid metric"),
            ),
            full_sweep_interval: register(
                &r,
                IntGauge::new(
                    "participants_full_sweep_interval_seconds",
                    "The full sweep schedule's period (a day when the schedule is off: the CronJob's default)",
                )
                .expect("valid metric"),
            ),
            events_received: counter_vec(
                "participants_events_received_total",
                "MAX membership updates taken in, by mode (webhook: stored by the receiver; poll: stored by the long poller; stream: read from another service's stream)",
                &["mode"],
            ),
            events_rejected: counter_vec(
                "participants_events_rejected_total",
                "MAX updates not taken, by reason (unauthorized, too_large, not_an_update, unavailable: Redis could not store it, answered 503)",
                &["reason"],
            ),
            events_applied: counter_vec(
                "participants_events_applied_total",
                "MAX updates applied to their chat's membership register, by outcome (applied, ambiguous, duplicate, stale, needs_baseline, removed, no_count, ignored)",
                &["outcome"],
            ),
            events_intake_lag: histogram(
                "participants_events_intake_lag_seconds",
                "Time from a MAX update's timestamp to its handling by the events consumer",
                vec![0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 28800.0],
            ),
            events_gaps: counter_vec(
                "participants_events_gaps_total",
                "Long-poll gaps that lost MAX updates, by reason (marker_lost: the persisted marker vanished; retention: no successful poll for longer than MAX keeps updates)",
                &["reason"],
            ),
            events_subscription_ok: register(
                &r,
                IntGauge::new(
                    "participants_events_subscription_ok",
                    "Webhook mode: 1 while MAX's GET /subscriptions lists a URL ending with /max/updates for the five membership types, 0 when not (and before the first check)",
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
        .with_known_series()
    }

    /// Creates every labelled series at zero, so that dashboards and `rate()` see them before
    /// the first event (a counter that appears at 1 hides its first increase).
    fn with_known_series(self) -> Self {
        for result in ["ok", "error"] {
            self.max_requests.with_label_values(&[result]);
        }
        for kind in [
            "rate_limited",
            "timeout",
            "connection",
            "server_error",
            "invalid_token",
            "forbidden",
            "not_found",
            "not_a_chat",
            "bad_request",
            "body_too_large",
            "systemic",
        ] {
            self.max_errors.with_label_values(&[kind]);
        }
        for reason in ["malformed", "chat_failures"] {
            self.dead_lettered.with_label_values(&[reason]);
        }
        for outcome in ["acked", "retried", "dead_lettered"] {
            self.stream_entries.with_label_values(&[outcome]);
        }
        for stream in [
            shared::keys::REFRESH_STREAM_MANUAL,
            shared::keys::REFRESH_STREAM_LAZY,
        ] {
            self.stream_length.with_label_values(&[stream]);
            self.stream_pending.with_label_values(&[stream]);
            self.stream_lag.with_label_values(&[stream]);
        }
        for reason in ["marker_lost", "retention"] {
            self.events_gaps.with_label_values(&[reason]);
        }
        for mode in ["webhook", "poll", "stream"] {
            self.events_received.with_label_values(&[mode]);
        }
        for reason in ["unauthorized", "too_large", "not_an_update", "unavailable"] {
            self.events_rejected.with_label_values(&[reason]);
        }
        for outcome in crate::events::register::Outcome::ALL {
            self.events_applied.with_label_values(&[outcome.as_str()]);
        }
        for kind in ["stale", "full"] {
            self.sweep_done.with_label_values(&[kind]);
            self.sweep_planned.with_label_values(&[kind]);
            for result in ["finished", "lost", "token_invalid"] {
                self.sweeps.with_label_values(&[kind, result]);
            }
        }
        self
    }

    pub fn render(&self) -> String {
        shared::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
