//! The read path: a page or a chat chosen from the read model, each count taken from Redis when
//! it has a fresh one (else from the model), and stale counts enqueued for syncd in the
//! background. Handlers only parse and answer; every policy of a read lives here.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use shared::refresh::Priority;

pub mod counts;
pub mod query;
pub mod search_gate;
pub mod view;

use counts::{enrich, Freshness};
use query::{CountSource, ListQuery};
use search_gate::SearchGate;
use view::{ChatPage, ChatView};

use crate::cache::Cache;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::read_model::{ChatRecord, ReadModel, Selection};
use crate::scope::Scope;

/// What a read answers, and how old the read model behind it is.
#[derive(Debug)]
pub struct Served<T> {
    pub body: T,
    /// How long ago the model was last known to match Postgres.
    pub model_age: Duration,
}

/// Everything a read needs.
pub struct ReadPath {
    pub model: Arc<ReadModel>,
    pub cache: Arc<Cache>,
    pub metrics: Metrics,
    pub freshness: Freshness,
    /// Read counts from Redis and enqueue refreshes; false under PARTICIPANTS_INTEGRATION_DISABLED.
    pub integration_enabled: bool,
    pub refresh_dedup_ttl: Duration,
    /// How long a read before the first load waits for it (a little less than the request
    /// timeout, so that the answer is `loading`, not `timeout`).
    pub load_wait: Duration,
    /// The bounds on a search's work.
    pub searches: SearchGate,
}

impl ReadPath {
    /// Waits for the first load if it has not finished (SPEC §3: a read is never refused
    /// because the api has just started); `Loading` only when it does not finish in time.
    async fn loaded(&self) -> Result<(), ApiError> {
        if self.model.is_loaded() || self.model.wait_loaded(self.load_wait).await {
            Ok(())
        } else {
            Err(ApiError::Loading)
        }
    }

    fn model_age(&self) -> Result<Duration, ApiError> {
        self.model.age().ok_or(ApiError::Loading)
    }

    /// A page of chats in `scope`, for `caller` (the token's `sub`).
    pub async fn list(
        &self,
        scope: Scope,
        caller: &str,
        query: &ListQuery,
        counts: CountSource,
    ) -> Result<Served<ChatPage>, ApiError> {
        self.loaded().await?;
        let selection = self.select(scope, caller, query).await?;
        let model_age = self.model_age()?;
        let total = i64::try_from(selection.total).unwrap_or(i64::MAX);
        let data = self.present(selection.chats, counts).await;
        Ok(Served {
            body: ChatPage {
                data,
                total,
                limit: query.limit,
                offset: query.offset,
                total_pages: query.total_pages(total),
            },
            model_age,
        })
    }

    /// The page from the model, within the search bounds: a costly search is admitted by the
    /// caller's rate, waits for a place among the costly searches, and runs off the async
    /// workers; any search past its scan budget is refused.
    async fn select(
        &self,
        scope: Scope,
        caller: &str,
        query: &ListQuery,
    ) -> Result<Selection, ApiError> {
        let work = self
            .model
            .search_work(scope, &query.words)
            .ok_or(ApiError::Loading)?;
        let budget = self.searches.scan_budget;
        let costly = &self.metrics.costly_searches;
        let selection = if SearchGate::is_costly(work) {
            if let Err(wait) = self.searches.admit(caller) {
                costly.with_label_values(&["rate_limited"]).inc();
                return Err(ApiError::TooManySearches(wait));
            }
            let _slot = self.searches.slot().await;
            let model = self.model.clone();
            let query = query.clone();
            let selection = tokio::task::spawn_blocking(move || model.page(scope, &query, budget))
                .await
                .map_err(|e| ApiError::Internal(e.into()))?;
            if selection.as_ref().is_some_and(Result::is_ok) {
                costly.with_label_values(&["served"]).inc();
            }
            selection
        } else {
            self.model.page(scope, query, budget)
        };
        selection.ok_or(ApiError::Loading)?.map_err(|_| {
            costly.with_label_values(&["over_budget"]).inc();
            ApiError::SearchTooBroad(budget)
        })
    }

    /// One chat, if it exists and lies in `scope`.
    pub async fn find(&self, scope: Scope, id: i32) -> Result<ChatRecord, ApiError> {
        self.loaded().await?;
        self.model
            .get(scope, id)
            .ok_or(ApiError::Loading)?
            .ok_or(ApiError::NotFound("chat"))
    }

    /// One chat in the shape of the list.
    pub async fn get(
        &self,
        scope: Scope,
        id: i32,
        counts: CountSource,
    ) -> Result<Served<ChatView>, ApiError> {
        let record = self.find(scope, id).await?;
        let model_age = self.model_age()?;
        let mut chats = self.present(vec![record], counts).await;
        Ok(Served {
            body: chats.remove(0),
            model_age,
        })
    }

    /// Turns records into the response shape: counts from Redis when it has them (one round
    /// trip), from the model otherwise, and stale ones enqueued in the background. With
    /// `CountSource::Stored` Redis is not asked and nothing is enqueued.
    async fn present(&self, records: Vec<ChatRecord>, counts: CountSource) -> Vec<ChatView> {
        let use_redis =
            counts == CountSource::Cached && self.integration_enabled && self.cache.is_enabled();
        let cached = if use_redis && !records.is_empty() {
            let ids: Vec<i32> = records.iter().map(|record| record.id).collect();
            match self.cache.read_counts(&ids).await {
                Ok(found) => Some(found),
                Err(_) => {
                    self.metrics.fallback_usage.inc();
                    None
                }
            }
        } else {
            None
        };
        let freshness = Freshness {
            lazy_update: self.freshness.lazy_update && use_redis && self.cache.is_available(),
            ..self.freshness
        };
        let enriched = enrich(records, cached.as_ref(), Utc::now(), freshness);
        let metrics = &self.metrics;
        metrics.cache_hits.inc_by(enriched.hits);
        metrics.cache_misses.inc_by(enriched.misses);
        metrics.stale_served.inc_by(enriched.stale);
        for age in &enriched.ages {
            metrics.data_freshness.observe(*age);
        }
        if !enriched.to_refresh.is_empty() {
            let cache = self.cache.clone();
            let ttl = self.refresh_dedup_ttl;
            let ids = enriched.to_refresh;
            let traceparent = shared::telemetry::current_traceparent();
            tokio::spawn(async move {
                // A failure trips the circuit and is counted there; the next read enqueues again.
                let _ = cache
                    .enqueue(Priority::Lazy, &ids, ttl, traceparent.as_deref())
                    .await;
            });
        }
        enriched.chats
    }
}
