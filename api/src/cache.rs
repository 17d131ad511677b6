//! The api's view of Redis: cached counts, refresh enqueueing and syncd's status, behind a
//! circuit breaker.
//!
//! When a command fails or times out the circuit opens and every read is served from
//! Postgres without touching Redis, so a dead Redis adds no latency per request. A background
//! probe PINGs Redis and closes the circuit once it answers again; a trip wakes it at once, so
//! one slow command costs a moment of reads from Postgres, not the probe's whole interval.
//! A manual refresh does not trust an open circuit: it is one request someone is waiting for,
//! so it asks Redis itself, bounded by the Redis timeout.
//!
//! With `REDIS_CLIENT_TRACKING` (on a single Redis or behind Sentinel) the counts are also held
//! in memory, kept exact by Redis' client tracking (`local`): a page whose buckets are held
//! sends no Redis command. A Redis Cluster reads every page's counts from Redis.

pub mod local;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use shared::config::RedisArgs;
use shared::counts::{self, CachedCount};
use shared::keys;
use shared::refresh::{self, Priority};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use local::{LocalCounts, Lookup};

/// How often the probe PINGs while the circuit is open.
const PROBE_INTERVAL_OPEN: Duration = Duration::from_millis(500);
/// How often the probe PINGs while the circuit is closed, to notice a dead Redis between requests.
const PROBE_INTERVAL_CLOSED: Duration = Duration::from_secs(5);

/// Redis as the api uses it. `client` is `None` under `DISABLE_REDIS`.
pub struct Cache {
    client: Option<Client>,
    /// A second connection for manual refreshes that wait for replicas; see `enqueue_manual`.
    manual: Option<Client>,
    /// The counts held in memory; `None` without tracking (off, Cluster, no Redis).
    local: Option<LocalCounts>,
    available: AtomicBool,
    /// Wakes the probe when a command trips the circuit.
    tripped: Notify,
    options: Options,
    timeout: Duration,
    metrics: Metrics,
}

/// Redis could not be used for this call.
#[derive(Debug, thiserror::Error)]
#[error("redis unavailable")]
pub struct Unavailable;

impl Cache {
    /// Connects in the background; the circuit stays open until the first PING answers.
    pub fn connect(
        args: &RedisArgs,
        wait_replicas: u32,
        client_tracking: bool,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<Self>> {
        let client = if args.disable_redis {
            None
        } else {
            Some(shared::redis::connect(args)?)
        };
        let manual = if args.disable_redis || wait_replicas == 0 {
            None
        } else {
            Some(shared::redis::connect(args)?)
        };
        let local = match &client {
            Some(client) if client_tracking && client.is_clustered() => {
                tracing::info!("redis cluster: every page reads its counts from redis (client tracking is used on a single redis or sentinel only)");
                None
            }
            Some(_) if client_tracking => Some(LocalCounts::connect(args, metrics.clone())?),
            _ => None,
        };
        metrics.cache_available.set(0);
        metrics.cache_enabled.set(i64::from(!args.disable_redis));
        Ok(Arc::new(Self {
            client,
            manual,
            local,
            available: AtomicBool::new(false),
            tripped: Notify::new(),
            options: Options {
                timeout: Some(args.redis_timeout),
                fail_fast: true,
                max_attempts: Some(1),
                ..Options::default()
            },
            timeout: args.redis_timeout,
            metrics,
        }))
    }

    pub fn is_enabled(&self) -> bool {
        self.client.is_some()
    }

    /// Whether requests currently use Redis (the circuit is closed).
    pub fn is_available(&self) -> bool {
        self.client.is_some() && self.available.load(Ordering::Relaxed)
    }

    fn usable(&self) -> Option<&Client> {
        self.client.as_ref().filter(|_| self.is_available())
    }

    fn trip(&self, what: &'static str, error: &dyn std::fmt::Display) {
        self.metrics.cache_errors.inc();
        if self.available.swap(false, Ordering::Relaxed) {
            self.metrics.cache_available.set(0);
            tracing::warn!(operation = what, error = %error, "redis failed; serving from postgres until it answers again");
            self.tripped.notify_one();
        }
        if let Some(local) = &self.local {
            local.forget("circuit");
        }
    }

    /// Runs one Redis operation under the circuit and the round-trip deadline.
    async fn call<T, F>(&self, what: &'static str, operation: F) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.trip(what, &error);
                Err(Unavailable)
            }
            Err(_) => {
                self.trip(what, &"timed out");
                Err(Unavailable)
            }
        }
    }

    /// Cached counts of a page of chats: from memory when every bucket is held there, else
    /// in one round trip (reading the missing buckets whole, to hold them), or `Unavailable`.
    pub async fn read_counts(
        &self,
        chat_ids: &[i32],
    ) -> Result<HashMap<i32, CachedCount>, Unavailable> {
        let client = self.usable().ok_or(Unavailable)?;
        if let Some(local) = &self.local {
            match local.lookup(chat_ids) {
                Lookup::Complete(found) => {
                    self.metrics.cache_local_pages.inc();
                    return Ok(found);
                }
                Lookup::Partial {
                    mut found,
                    missing,
                    ticket,
                } => {
                    let read = self
                        .call("read counts", counts::read_buckets(local.data(), &missing))
                        .await;
                    let read = match read {
                        Ok(read) => read,
                        Err(error) => {
                            local.abandon(ticket, &missing);
                            return Err(error);
                        }
                    };
                    local.fill(ticket, &missing, &read);
                    for id in chat_ids {
                        let bucket = shared::keys::bucket_of(*id);
                        if let Some(at) = missing.iter().position(|b| *b == bucket) {
                            if let Some(value) = read[at][shared::keys::slot_in_bucket(*id)] {
                                found.insert(*id, value);
                            }
                        }
                    }
                    return Ok(found);
                }
                Lookup::Untracked => {}
            }
        }
        self.call(
            "read counts",
            counts::read_many(client, &self.options, chat_ids),
        )
        .await
    }

    /// Enqueues refreshes for the chats not enqueued within `marker_ttl`.
    pub async fn enqueue(
        &self,
        priority: Priority,
        chat_ids: &[i32],
        marker_ttl: Duration,
        traceparent: Option<&str>,
    ) -> Result<u64, Unavailable> {
        let client = self.usable().ok_or(Unavailable)?;
        self.enqueue_on(client, priority, chat_ids, marker_ttl, traceparent)
            .await
    }

    /// `enqueue` on `client` whatever the circuit says, under the round-trip deadline.
    async fn enqueue_on(
        &self,
        client: &Client,
        priority: Priority,
        chat_ids: &[i32],
        marker_ttl: Duration,
        traceparent: Option<&str>,
    ) -> Result<u64, Unavailable> {
        let added = self
            .call(
                "enqueue refresh",
                refresh::enqueue(client, priority, chat_ids, marker_ttl, traceparent),
            )
            .await?;
        self.metrics
            .refresh_enqueued
            .with_label_values(&[priority.as_str()])
            .inc_by(added);
        Ok(added)
    }

    /// Enqueues one manual refresh and, when `replicas` > 0, waits until that many Redis
    /// replicas hold it (`WAIT`), so that a failover cannot lose a request the api is about to
    /// acknowledge. Both run on a connection of their own: `WAIT` covers the writes of its
    /// connection and blocks it, which must not hold up the read path. Returns whether enough
    /// replicas confirmed within the Redis timeout.
    pub async fn enqueue_manual(
        &self,
        chat_id: i32,
        marker_ttl: Duration,
        replicas: u32,
        traceparent: Option<&str>,
    ) -> Result<bool, Unavailable> {
        if replicas == 0 {
            let client = self.client.as_ref().ok_or(Unavailable)?;
            self.enqueue_on(
                client,
                Priority::Manual,
                &[chat_id],
                marker_ttl,
                traceparent,
            )
            .await?;
            return Ok(true);
        }
        let client = self.manual.as_ref().ok_or(Unavailable)?;
        // The server gives up waiting after the Redis timeout; the client allows for that plus
        // a round trip.
        let wait_ms = self.timeout.as_millis().max(1) as i64;
        let options = Options {
            timeout: Some(self.timeout * 3),
            max_attempts: Some(1),
            ..Options::default()
        };
        let operation = async {
            let added = refresh::enqueue(
                client,
                Priority::Manual,
                &[chat_id],
                marker_ttl,
                traceparent,
            )
            .await?;
            let acked: i64 = client
                .with_options(&options)
                .custom(
                    fred::cmd!("WAIT", blocking: true),
                    vec![Value::from(i64::from(replicas)), Value::from(wait_ms)],
                )
                .await?;
            Ok::<_, fred::error::Error>((added, acked))
        };
        // Failures here do not open the read path's circuit: this connection is its own.
        match tokio::time::timeout(self.timeout * 4, operation).await {
            Ok(Ok((added, acked))) => {
                self.metrics
                    .refresh_enqueued
                    .with_label_values(&[Priority::Manual.as_str()])
                    .inc_by(added);
                Ok(acked >= i64::from(replicas))
            }
            Ok(Err(error)) => {
                self.metrics.cache_errors.inc();
                tracing::warn!(error = %error, "could not enqueue a manual refresh");
                Err(Unavailable)
            }
            Err(_) => {
                self.metrics.cache_errors.inc();
                tracing::warn!("enqueueing a manual refresh timed out");
                Err(Unavailable)
            }
        }
    }

    /// syncd's fleet status hash, for `/health/detailed`.
    pub async fn syncd_status(&self) -> Result<HashMap<String, String>, Unavailable> {
        let client = self.usable().ok_or(Unavailable)?;
        self.call(
            "read syncd status",
            client
                .with_options(&self.options)
                .hgetall(keys::SYNCD_STATUS),
        )
        .await
    }

    /// One PING, without the circuit: true when Redis answered in time.
    pub async fn ping(&self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        let client = client.with_options(&self.options);
        let ping = client.ping::<String>(None);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }

    /// At start-up: waits up to `within` for Redis to answer, and closes the circuit if it does.
    pub async fn warm_up(&self, within: Duration) {
        if self.client.is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.ping().await {
                self.available.store(true, Ordering::Relaxed);
                self.metrics.cache_available.set(1);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps the circuit in step with Redis until `cancel` fires.
    pub async fn run_probe(self: Arc<Self>, cancel: CancellationToken) {
        if self.client.is_none() {
            return;
        }
        if self.local.is_some() {
            let cache = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                if let Some(local) = &cache.local {
                    local.run_tracking(cancel).await;
                }
            });
        }
        let mut first = true;
        loop {
            let healthy = self.ping().await;
            if let Some(local) = &self.local {
                if healthy {
                    local.heartbeat().await;
                } else {
                    local.forget("heartbeat");
                }
            }
            let was = self.available.swap(healthy, Ordering::Relaxed);
            self.metrics.cache_available.set(i64::from(healthy));
            if first && !healthy {
                tracing::error!(
                    "redis does not answer at start-up (REDIS_URL); counts come from postgres and manual refreshes are refused until it does"
                );
            }
            first = false;
            if healthy && !was {
                tracing::info!("redis answers; serving counts from the cache");
            } else if !healthy && was {
                self.metrics.cache_errors.inc();
                tracing::warn!(
                    "redis stopped answering; serving from postgres until it answers again"
                );
            }
            let pause = if healthy {
                PROBE_INTERVAL_CLOSED
            } else {
                PROBE_INTERVAL_OPEN
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
                // A request saw a failure: look again soon rather than at the closed interval.
                () = self.tripped.notified() => {
                    tokio::time::sleep(PROBE_INTERVAL_OPEN).await;
                }
            }
        }
    }
}
