//! The counts kept in the api as well as in Redis, exact by Redis' server-assisted client-side
//! caching, so that a page whose buckets are held here needs no Redis command at all.
//!
//! Two connections of their own: `data` reads whole count buckets with `CLIENT TRACKING on
//! REDIRECT <listener>`, and `listener` is subscribed to `__redis__:invalidate`, where Redis
//! publishes the name of every bucket `data` read once it changes (default mode: only buckets
//! read, each until its next invalidation). RESP2 with a redirect rather than RESP3 on one
//! connection: fred 10.1 drops RESP3's flush message (`invalidate` with a null, sent on
//! FLUSHALL/FLUSHDB), while on the pub/sub form it arrives as an invalidation of no keys.
//!
//! What is held is dropped whenever a message may have been lost: either connection closed or
//! reconnected (a Redis restart, a failover, a kill), a lagged event channel, a failed
//! heartbeat or none for a lease, or the circuit tripping. Until tracking is set up again on
//! the new connections, reads take today's round trip and fill nothing.
//!
//! The race Redis' documentation describes for two connections (an invalidation overtakes the
//! reply of a read it concerns, and the reply then fills a stale value for good) is closed as
//! it advises: a read puts a placeholder (`Pending(ticket)`) in place first, an invalidation
//! removes whatever is there, and the reply fills only its own placeholder. fred hands
//! connection events and invalidations to broadcast channels before it answers what came after
//! them on the wire, so draining those channels under the lock, before every lookup and every
//! fill, sees each event that preceded the reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::client::Invalidation;
use fred::types::config::Server;
use shared::config::RedisArgs;
use shared::counts::{Bucket, CachedCount};
use shared::keys;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long after the last answered heartbeat the held counts are still trusted: a silent
/// partition loses invalidations without closing anything, so no answer within this long
/// means none of them is served.
const LEASE: Duration = Duration::from_secs(12);
/// Pause between attempts to set tracking up while it fails.
const RETRY: Duration = Duration::from_millis(500);

enum Slot {
    /// A read of this bucket is in flight; only the read with this ticket may fill it.
    Pending(u64),
    Ready(Box<Bucket>),
}

/// The connection events a loss of the invalidation channel shows in.
struct Events {
    invalidations: Receiver<Invalidation>,
    data_reconnects: Receiver<Server>,
    data_errors: Receiver<(Error, Option<Server>)>,
    listener_reconnects: Receiver<Server>,
    listener_errors: Receiver<(Error, Option<Server>)>,
}

struct State {
    /// Tracking is on, redirected to the listener's current connection.
    tracking: bool,
    /// Bumped on every loss, so that a setup begun before one does not count after it.
    generation: u64,
    next_ticket: u64,
    buckets: HashMap<i64, Slot>,
    events: Events,
}

/// What the held counts say about a page.
pub enum Lookup {
    /// Every bucket is held: the counts found (absent chats have none in Redis either).
    Complete(HashMap<i32, CachedCount>),
    /// These buckets must be read; `ticket` fills their placeholders.
    Partial {
        found: HashMap<i32, CachedCount>,
        missing: Vec<i64>,
        ticket: u64,
    },
    /// Nothing is held or trusted now: read the page from Redis as without a local cache.
    Untracked,
}

/// Counts held in the api, kept exact by client tracking.
pub struct LocalCounts {
    data: Client,
    listener: Client,
    state: Mutex<State>,
    /// Wakes the tracking task after a loss.
    wake: Notify,
    started: Instant,
    /// Milliseconds after `started` of the last heartbeat both connections answered.
    heartbeat_ms: AtomicU64,
    timeout: Duration,
    metrics: Metrics,
}

impl LocalCounts {
    pub fn connect(args: &RedisArgs, metrics: Metrics) -> anyhow::Result<Self> {
        let data = shared::redis::connect(args)?;
        let listener = shared::redis::connect_invalidation_listener(args)?;
        Ok(Self::with_clients(
            data,
            listener,
            args.redis_timeout,
            metrics,
        ))
    }

    fn with_clients(data: Client, listener: Client, timeout: Duration, metrics: Metrics) -> Self {
        let events = Events {
            invalidations: listener.invalidation_rx(),
            data_reconnects: data.reconnect_rx(),
            data_errors: data.error_rx(),
            listener_reconnects: listener.reconnect_rx(),
            listener_errors: listener.error_rx(),
        };
        metrics.cache_tracking.set(0);
        Self {
            data,
            listener,
            state: Mutex::new(State {
                tracking: false,
                generation: 0,
                next_ticket: 0,
                buckets: HashMap::new(),
                events,
            }),
            wake: Notify::new(),
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            timeout,
            metrics,
        }
    }

    /// The connection that reads buckets (its reads are the ones tracked).
    pub fn data(&self) -> &Client {
        &self.data
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic under this lock leaves at worst a bucket too few: clearing is always safe.
        self.state.lock().unwrap_or_else(|poisoned| {
            let mut state = poisoned.into_inner();
            state.buckets.clear();
            state
        })
    }

    /// Milliseconds since `started`, never 0 (0 means no heartbeat yet).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn lease_holds(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) < LEASE.as_millis() as u64
    }

    /// Applies every invalidation and connection event fred has handed over so far.
    fn drain(&self, state: &mut State) {
        let mut flushed = None;
        loop {
            match state.events.invalidations.try_recv() {
                // FLUSHALL / FLUSHDB: one message naming no key.
                Ok(invalidation) if invalidation.keys.is_empty() => flushed = Some("flush"),
                Ok(invalidation) => invalidate(state, &invalidation),
                Err(TryRecvError::Empty) => break,
                // Tracking itself still holds: only what was missed must go.
                Err(TryRecvError::Lagged(_)) => flushed = Some("lagged"),
                Err(TryRecvError::Closed) => {
                    self.lose(state, "closed");
                    return;
                }
            }
            if flushed.is_some() {
                state.buckets.clear();
            }
        }
        if let Some(reason) = flushed {
            self.count_flush(reason);
        }
        let events = &mut state.events;
        let lost = drain_events(&mut events.data_reconnects)
            | drain_events(&mut events.data_errors)
            | drain_events(&mut events.listener_reconnects)
            | drain_events(&mut events.listener_errors);
        if lost {
            self.lose(state, "connection");
        }
    }

    /// The invalidation channel may have lost a message: drop everything, set tracking up again.
    fn lose(&self, state: &mut State, reason: &'static str) {
        state.buckets.clear();
        state.generation += 1;
        if state.tracking {
            state.tracking = false;
            self.metrics.cache_tracking.set(0);
            tracing::info!(
                reason,
                "redis client tracking lost; counts are read from redis until it is set up again"
            );
        }
        self.count_flush(reason);
        self.wake.notify_one();
    }

    fn count_flush(&self, reason: &'static str) {
        self.metrics
            .cache_local_flushes
            .with_label_values(&[reason])
            .inc();
    }

    /// Drops everything held, from outside (the circuit tripped, a heartbeat failed).
    pub fn forget(&self, reason: &'static str) {
        let mut state = self.lock();
        self.lose(&mut state, reason);
    }

    /// What is held for `chat_ids`; placeholders are set for the buckets to read.
    pub fn lookup(&self, chat_ids: &[i32]) -> Lookup {
        if !self.lease_holds() {
            return Lookup::Untracked;
        }
        let mut state = self.lock();
        self.drain(&mut state);
        if !state.tracking {
            return Lookup::Untracked;
        }
        let mut found = HashMap::with_capacity(chat_ids.len());
        let mut missing = Vec::new();
        for id in chat_ids {
            let bucket = keys::bucket_of(*id);
            match state.buckets.get(&bucket) {
                Some(Slot::Ready(held)) => {
                    if let Some(value) = held[keys::slot_in_bucket(*id)] {
                        found.insert(*id, value);
                    }
                }
                _ => {
                    if !missing.contains(&bucket) {
                        missing.push(bucket);
                    }
                }
            }
        }
        if missing.is_empty() {
            return Lookup::Complete(found);
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        for bucket in &missing {
            state.buckets.insert(*bucket, Slot::Pending(ticket));
        }
        Lookup::Partial {
            found,
            missing,
            ticket,
        }
    }

    /// Keeps what a read of `missing` returned, where its placeholders are still in place.
    pub fn fill(&self, ticket: u64, missing: &[i64], read: &[Bucket]) {
        let mut state = self.lock();
        self.drain(&mut state);
        if !state.tracking {
            return;
        }
        for (bucket, values) in missing.iter().zip(read) {
            if let Some(slot) = state.buckets.get_mut(bucket) {
                if matches!(slot, Slot::Pending(t) if *t == ticket) {
                    *slot = Slot::Ready(Box::new(*values));
                }
            }
        }
    }

    /// A read with `ticket` failed: its placeholders go.
    pub fn abandon(&self, ticket: u64, missing: &[i64]) {
        let mut state = self.lock();
        for bucket in missing {
            if matches!(state.buckets.get(bucket), Some(Slot::Pending(t)) if *t == ticket) {
                state.buckets.remove(bucket);
            }
        }
    }

    /// Whether tracking is set up (the held counts are served).
    pub fn is_tracking(&self) -> bool {
        self.lock().tracking
    }

    /// PINGs both connections; records the heartbeat when both answer in time, else drops
    /// everything held. The listener is idle, and so is `data` while every page is held: only
    /// this notices a connection that died without closing.
    pub async fn heartbeat(&self) {
        let pings = async {
            let _: Value = self.data.ping(None).await?;
            let _: Value = self.listener.ping(None).await?;
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(self.timeout * 2, pings).await {
            Ok(Ok(())) => self.heartbeat_ms.store(self.now_ms(), Ordering::Relaxed),
            _ => self.forget("heartbeat"),
        }
    }

    /// Sets tracking up, and again after every loss, until `cancel` fires. Also applies
    /// invalidations as they come while no read does.
    pub async fn run_tracking(&self, cancel: CancellationToken) {
        let mut woken = self.listener.invalidation_rx();
        let mut told = false;
        loop {
            {
                let mut state = self.lock();
                self.drain(&mut state);
            }
            if !self.is_tracking() {
                match self.enable().await {
                    Ok(()) => {
                        told = false;
                        tracing::info!("redis client tracking on; pages are served from the counts held in memory");
                    }
                    Err(error) => {
                        if !told {
                            tracing::warn!(error = %error, "cannot set redis client tracking up; pages read their counts from redis");
                            told = true;
                        }
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep(RETRY) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.wake.notified() => {}
                received = woken.recv() => {
                    if matches!(received, Err(RecvError::Closed)) {
                        woken = self.listener.invalidation_rx();
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One attempt: subscribe the listener, point `data`'s tracking at it, and mark tracking
    /// on unless a loss came in between.
    async fn enable(&self) -> Result<(), String> {
        let generation = {
            let mut state = self.lock();
            self.drain(&mut state);
            state.generation
        };
        let within = self.timeout * 4;
        let attempt = async {
            let _: () = self
                .listener
                .subscribe(keys::TRACKING_INVALIDATION_CHANNEL)
                .await?;
            let (listener_server, listener_id) = single_connection(&self.listener)?;
            let (data_server, _) = single_connection(&self.data)?;
            if listener_server != data_server {
                return Err(Error::new(
                    ErrorKind::Unknown,
                    "the two connections reached different servers",
                ));
            }
            // Off first: a redirect to the listener's previous connection may still be set.
            let _: () = self
                .data
                .client_tracking(
                    "off",
                    None,
                    Vec::<String>::new(),
                    false,
                    false,
                    false,
                    false,
                )
                .await?;
            let _: () = self
                .data
                .client_tracking(
                    "on",
                    Some(listener_id),
                    Vec::<String>::new(),
                    false,
                    false,
                    false,
                    false,
                )
                .await?;
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(within, attempt).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error.details().to_owned()),
            Err(_) => return Err("timed out".to_owned()),
        }
        let mut state = self.lock();
        self.drain(&mut state);
        if state.generation != generation {
            return Err("a connection changed while tracking was set up".to_owned());
        }
        state.tracking = true;
        self.metrics.cache_tracking.set(1);
        Ok(())
    }
}

/// Removes whatever is held for the buckets `invalidation` names: a value, or a placeholder,
/// whose read then fills nothing.
fn invalidate(state: &mut State, invalidation: &Invalidation) {
    for key in &invalidation.keys {
        if let Some(bucket) = keys::bucket_of_key(key.as_bytes()) {
            state.buckets.remove(&bucket);
        }
    }
}

/// Empties an event channel; true when it held anything (or lagged, or closed).
fn drain_events<T: Clone>(events: &mut Receiver<T>) -> bool {
    let mut any = false;
    loop {
        match events.try_recv() {
            Ok(_) | Err(TryRecvError::Lagged(_)) => any = true,
            Err(TryRecvError::Empty) => return any,
            Err(TryRecvError::Closed) => return true,
        }
    }
}

/// The one server a single-server or Sentinel client is connected to, and its connection id.
fn single_connection(client: &Client) -> Result<(Server, i64), Error> {
    let ids = client.connection_ids();
    match ids.len() {
        1 => Ok(ids.into_iter().next().expect("one entry")),
        _ => Err(Error::new(ErrorKind::Unknown, "not connected")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts over clients that never connect: only the bookkeeping runs.
    fn counts() -> LocalCounts {
        let idle = || Client::new(Config::default(), None, None, None);
        let counts =
            LocalCounts::with_clients(idle(), idle(), Duration::from_millis(250), Metrics::new());
        counts.lock().tracking = true;
        counts
            .heartbeat_ms
            .store(counts.now_ms(), Ordering::Relaxed);
        counts
    }

    fn bucket_with(chat_id: i32, count: i32) -> Bucket {
        let mut bucket = [None; keys::CHATS_PER_BUCKET as usize];
        bucket[keys::slot_in_bucket(chat_id)] = Some(CachedCount {
            count,
            updated_at: chrono::Utc::now(),
        });
        bucket
    }

    fn invalidation_of(chat_id: i32) -> Invalidation {
        Invalidation {
            keys: vec![keys::count_location(chat_id).0.into()],
            server: Server::new("127.0.0.1", 6379),
        }
    }

    #[test]
    fn a_read_fills_its_bucket_and_the_next_page_needs_no_read() {
        let counts = counts();
        let Lookup::Partial {
            missing, ticket, ..
        } = counts.lookup(&[5])
        else {
            panic!("nothing is held yet")
        };
        counts.fill(ticket, &missing, &[bucket_with(5, 42)]);
        let Lookup::Complete(found) = counts.lookup(&[5, 6]) else {
            panic!("the bucket is held")
        };
        assert_eq!(found[&5].count, 42);
        assert!(!found.contains_key(&6), "absent in Redis, absent here");
    }

    #[test]
    fn an_invalidation_that_overtakes_the_reply_leaves_nothing_filled() {
        let counts = counts();
        let Lookup::Partial {
            missing, ticket, ..
        } = counts.lookup(&[5])
        else {
            panic!("nothing is held yet")
        };
        // The bucket changes while the read is in flight; its invalidation is applied first.
        invalidate(&mut counts.lock(), &invalidation_of(5));
        counts.fill(ticket, &missing, &[bucket_with(5, 41)]);
        assert!(matches!(counts.lookup(&[5]), Lookup::Partial { .. }));
    }

    #[test]
    fn an_older_read_cannot_fill_over_a_newer_placeholder() {
        let counts = counts();
        let Lookup::Partial {
            missing: first,
            ticket: old,
            ..
        } = counts.lookup(&[5])
        else {
            panic!("nothing is held yet")
        };
        invalidate(&mut counts.lock(), &invalidation_of(5));
        let Lookup::Partial {
            missing, ticket, ..
        } = counts.lookup(&[5])
        else {
            panic!("invalidated")
        };
        counts.fill(old, &first, &[bucket_with(5, 41)]);
        counts.fill(ticket, &missing, &[bucket_with(5, 42)]);
        let Lookup::Complete(found) = counts.lookup(&[5]) else {
            panic!("the newer read filled it")
        };
        assert_eq!(found[&5].count, 42);
    }

    #[test]
    fn a_loss_drops_everything_and_serves_nothing_until_tracking_is_back() {
        let counts = counts();
        let Lookup::Partial {
            missing, ticket, ..
        } = counts.lookup(&[5])
        else {
            panic!("nothing is held yet")
        };
        counts.fill(ticket, &missing, &[bucket_with(5, 42)]);
        counts.forget("connection");
        assert!(matches!(counts.lookup(&[5]), Lookup::Untracked));
        counts.lock().tracking = true;
        assert!(matches!(counts.lookup(&[5]), Lookup::Partial { .. }));
    }

    #[test]
    fn without_a_recent_heartbeat_nothing_is_served() {
        let counts = counts();
        counts.heartbeat_ms.store(0, Ordering::Relaxed);
        assert!(matches!(counts.lookup(&[5]), Lookup::Untracked));
    }
}
