//! Prometheus metrics of the `api` process. Names follow the seeds (`participants_*`).

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_errors: IntCounter,
    pub cache_available: IntGauge,
    /// 0 under `DISABLE_REDIS` (the kill switch), so that an alert tells it from an outage.
    pub cache_enabled: IntGauge,
    pub fallback_usage: IntCounter,
    pub stale_served: IntCounter,
    pub data_freshness: Histogram,
    pub refresh_enqueued: IntCounterVec,
    pub refresh_waits: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_panics: IntCounterVec,
    pub costly_searches: IntCounterVec,
    pub read_model_age: Gauge,
    pub read_model_chats: IntGauge,
    pub read_model_rows: IntCounterVec,
    pub read_model_failures: IntCounter,
    pub health_checks: IntCounter,
    pub read_model_order_loads: IntCounterVec,
    pub read_model_order_repairs: IntCounter,
    pub read_model_order_checks: IntCounterVec,
    pub cache_local_pages: IntCounter,
    pub cache_local_flushes: IntCounterVec,
    pub cache_tracking: IntGauge,
    pub read_model_full_loads: IntCounter,
    pub read_model_sync_restarts: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = shared::metrics::registry();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric name is valid");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registers once");
            c
        };
        let cache_hits = counter(
            "participants_cache_hits_total",
            "Counts served from the Redis cache",
        );
        let cache_misses = counter(
            "participants_cache_misses_total",
            "Counts looked up in Redis and not found there (absent or past the cache TTL)",
        );
        let cache_errors = counter(
            "participants_cache_errors_total",
            "Redis commands that failed or timed out",
        );
        let fallback_usage = counter(
            "participants_fallback_usage_total",
            "Requests whose counts came from Postgres because Redis was unavailable",
        );
        let stale_served = counter(
            "participants_stale_served_total",
            "Counts served older than PARTICIPANTS_STALE_THRESHOLD, or never refreshed",
        );
        let cache_available = IntGauge::new(
            "participants_cache_available",
            "1 while the api uses Redis, 0 while it serves from Postgres alone",
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(cache_available.clone()))
            .expect("metric registers once");
        let cache_enabled = IntGauge::new(
            "participants_cache_enabled",
            "0 while DISABLE_REDIS keeps the api off Redis on purpose, 1 otherwise",
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(cache_enabled.clone()))
            .expect("metric registers once");
        cache_enabled.set(1);
        shared::metrics::register_build_info(
            &registry,
            "api",
            env!("CARGO_PKG_VERSION"),
            option_env!("PARTICIPANTS_GIT_SHA"),
        );
        let data_freshness = Histogram::with_opts(
            HistogramOpts::new(
                "participants_data_freshness_seconds",
                "Age of each served count (now minus when MAX was asked)",
            )
            .buckets(vec![
                60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0, 604800.0,
            ]),
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(data_freshness.clone()))
            .expect("metric registers once");
        let refresh_enqueued = IntCounterVec::new(
            Opts::new(
                "participants_refresh_enqueued_total",
                "Refresh requests added to the refresh streams, by priority",
            ),
            &["priority"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(refresh_enqueued.clone()))
            .expect("metric registers once");
        let refresh_waits = IntCounterVec::new(
            Opts::new(
                "participants_refresh_waits_total",
                "Refresh-and-wait requests by outcome: updated (answered in time), unavailable (answered in time: MAX gave no count), queued (not in time), or busy (answered at once: PARTICIPANTS_REFRESH_MAX_WAITERS were waiting)",
            ),
            &["outcome"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(refresh_waits.clone()))
            .expect("metric registers once");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "participants_http_requests_total",
                "HTTP requests to the api by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(http_requests.clone()))
            .expect("metric registers once");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "participants_http_request_duration_seconds",
                "HTTP request latency of the api by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("metric registers once");
        let http_panics = IntCounterVec::new(
            Opts::new(
                "http_panics_total",
                "Requests whose handler panicked, by route (each answered 500 and logged once with its request id)",
            ),
            &["route"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(http_panics.clone()))
            .expect("metric registers once");
        let costly_searches = IntCounterVec::new(
            Opts::new(
                "participants_costly_searches_total",
                "Searches that may compare more than 20,000 chats, by outcome: served, rate_limited (429, API_COSTLY_SEARCHES_PER_USER_PER_MINUTE) or over_budget (422, API_SEARCH_SCAN_BUDGET_MB; cheap searches past it too)",
            ),
            &["outcome"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(costly_searches.clone()))
            .expect("metric registers once");
        for outcome in ["served", "rate_limited", "over_budget"] {
            costly_searches.with_label_values(&[outcome]);
        }
        let read_model_age = Gauge::new(
            "participants_read_model_age_seconds",
            "Seconds since the in-memory chats were last known to match Postgres (-1 before the first load)",
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(read_model_age.clone()))
            .expect("metric registers once");
        read_model_age.set(-1.0);
        let read_model_chats = IntGauge::new(
            "participants_read_model_chats",
            "Chats held in the api's in-memory read model",
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(read_model_chats.clone()))
            .expect("metric registers once");
        let read_model_rows = IntCounterVec::new(
            Opts::new(
                "participants_read_model_rows_loaded_total",
                "Chat rows loaded into the read model, by why: full_load, notified, reconciled",
            ),
            &["reason"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(read_model_rows.clone()))
            .expect("metric registers once");
        for reason in ["full_load", "notified", "reconciled"] {
            read_model_rows.with_label_values(&[reason]);
        }
        let read_model_failures = counter(
            "participants_read_model_sync_failures_total",
            "Times the read model lost or could not reach Postgres (it keeps serving what it holds)",
        );
        let health_checks = counter(
            "participants_api_health_checks_total",
            "Dependency checks /health/detailed ran (its answer is reused for a second, so at most about one a second)",
        );
        let read_model_order_loads = IntCounterVec::new(
            Opts::new(
                "participants_read_model_order_loads_total",
                "Text sort orders brought up to date after a change, by how: placed (each moved row after the row Postgres puts before it) or whole (the column's whole order re-read)",
            ),
            &["how"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(read_model_order_loads.clone()))
            .expect("metric registers once");
        for how in ["placed", "whole"] {
            read_model_order_loads.with_label_values(&[how]);
        }
        let read_model_order_checks = IntCounterVec::new(
            Opts::new(
                "participants_read_model_order_checks_total",
                "Reconciliation rounds by what became of the text orders' comparison with Postgres: compared, skipped (a row differed, so the orders wait for a round in which every row agrees) or failed (a digest statement failed)",
            ),
            &["outcome"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(read_model_order_checks.clone()))
            .expect("metric registers once");
        for outcome in ["compared", "skipped", "failed"] {
            read_model_order_checks.with_label_values(&[outcome]);
        }
        let read_model_order_repairs = counter(
            "participants_read_model_order_repairs_total",
            "Text sort orders that reconciliation found out of step with Postgres and re-read",
        );
        let cache_local_pages = counter(
            "participants_cache_local_pages_total",
            "Pages whose counts all came from the api's memory (Redis client tracking), without a Redis command",
        );
        let cache_local_flushes = IntCounterVec::new(
            Opts::new(
                "participants_cache_local_flushes_total",
                "Times the counts held in memory were all dropped, by reason (connection, flush, lagged, heartbeat, circuit)",
            ),
            &["reason"],
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(cache_local_flushes.clone()))
            .expect("metric registers once");
        let cache_tracking = IntGauge::new(
            "participants_cache_tracking",
            "1 while Redis client tracking keeps the counts held in memory exact (pages may need no Redis command)",
        )
        .expect("metric name is valid");
        registry
            .register(Box::new(cache_tracking.clone()))
            .expect("metric registers once");
        let read_model_full_loads = counter(
            "participants_read_model_full_loads_total",
            "Full loads of the read model: at start-up, after TRUNCATE, after a bulk change of more than 50,000 chats (one per statement), or a large reconciliation",
        );
        let read_model_sync_restarts = counter(
            "participants_read_model_sync_restarts_total",
            "Times the read model's sync task panicked or ended and was restarted (the model keeps serving and ages meanwhile)",
        );
        for priority in ["lazy", "manual"] {
            refresh_enqueued.with_label_values(&[priority]);
        }
        for outcome in ["updated", "unavailable", "queued", "busy"] {
            refresh_waits.with_label_values(&[outcome]);
        }
        Self {
            registry,
            cache_hits,
            cache_misses,
            cache_errors,
            cache_available,
            cache_enabled,
            fallback_usage,
            stale_served,
            data_freshness,
            refresh_enqueued,
            refresh_waits,
            http_requests,
            http_duration,
            http_panics,
            costly_searches,
            read_model_age,
            read_model_chats,
            read_model_rows,
            read_model_failures,
            health_checks,
            read_model_order_loads,
            read_model_order_repairs,
            read_model_order_checks,
            cache_local_pages,
            cache_local_flushes,
            cache_tracking,
            read_model_full_loads,
            read_model_sync_restarts,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        shared::metrics::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
