//! The refresh stream consumer: one member of the `syncd` consumer group.
//!
//! Order of work: its own pending entries first (a restarted replica with a stable name), then
//! new entries (manual before lazy), and every few seconds entries that another consumer left
//! unacknowledged for longer than `claim_idle` (XAUTOCLAIM). An entry is acknowledged only
//! after both writes; one delivered more than `max_deliveries` times goes to the dead-letter
//! stream.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::Utc;
use fred::prelude::*;
use shared::keys;
use shared::refresh::{Priority, RefreshOutcome, RefreshRequest};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::limiter::Urgency;
use crate::metrics::Metrics;
use crate::plan::{self, Plan};
use crate::refresher::{Outcome, Refresher};
use crate::store::{self, Target};

/// Streams in the order they are served.
const STREAMS: [&str; 2] = [keys::REFRESH_STREAM_MANUAL, keys::REFRESH_STREAM_LAZY];
/// Entries the dead-letter stream keeps (about: trimmed with `MAXLEN ~`).
pub const DEAD_LETTER_MAX_LEN: i64 = 10_000;
/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_millis(1000);

/// One stream entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    pub fields: HashMap<String, String>,
}

pub struct Consumer {
    pub name: String,
    /// Used for blocking reads only, so they never hold up other commands.
    pub reader: Client,
    pub redis: Client,
    pub db: PgPool,
    pub refresher: Refresher,
    pub metrics: Metrics,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    /// Age at which a count is due (stale threshold less refresh-ahead): a lazy request for a
    /// younger count is already answered.
    pub due_age: Duration,
    pub inactive_recheck: Duration,
    /// Ticked each time the loop goes round (`/health/live`).
    pub liveness: crate::http::Liveness,
}

impl Consumer {
    /// Consumes until `cancel`; the batch in hand is finished (or left pending) first.
    pub async fn run(self, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            self.liveness.tick();
            match self.ensure_groups().await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot create the consumer group yet");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tracing::info!(consumer = %self.name, "consuming the refresh streams");
        self.liveness.tick();
        // This consumer's own pending entries (a restarted replica with a stable name) are read
        // once, page by page from the oldest; those that fail again stay pending and are then
        // retried, or dead-lettered, like anyone's idle entries.
        let mut own_pending: Option<[String; 2]> = Some(["0".to_owned(), "0".to_owned()]);
        let mut last_claim = Instant::now();
        let claim_every =
            (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        while !cancel.is_cancelled() {
            self.liveness.tick();
            if !self.refresher.token().reported_valid() {
                // Nothing can be refreshed: entries wait in the stream (not delivered, so they
                // do not count toward the dead letter), and once a minute one call checks
                // whether the token works again.
                self.refresher.probe_token(&self.db).await;
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let result = if let Some(after) = own_pending.as_mut() {
                match self.read_own_pending(after).await {
                    Ok(entries) if entries.is_empty() => {
                        own_pending = None;
                        Ok(())
                    }
                    Ok(entries) => self.process_own_pending(entries).await,
                    Err(error) => Err(error),
                }
            } else if last_claim.elapsed() >= claim_every {
                last_claim = Instant::now();
                self.claim_abandoned().await
            } else {
                match self.read(None).await {
                    Ok(entries) => self.process(entries).await,
                    Err(error) => Err(error),
                }
            };
            if let Err(error) = result {
                if is_missing_group(&error) {
                    // Redis restarted empty or was flushed, and the api's XADD recreated the
                    // stream without the group: recreate it, and consume from the start.
                    match self.ensure_groups().await {
                        Ok(()) => {
                            self.metrics.stream_groups_recreated.inc();
                            tracing::warn!(consumer = %self.name,
                                "the refresh streams' consumer group was missing (Redis restarted empty or was flushed); recreated it");
                            own_pending = Some(["0".to_owned(), "0".to_owned()]);
                            continue;
                        }
                        Err(error) => tracing::warn!(
                            error = format!("{error:#}"),
                            "cannot recreate the consumer group yet"
                        ),
                    }
                }
                tracing::warn!(
                    error = format!("{error:#}"),
                    "refresh stream work failed; retrying"
                );
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        tracing::info!(consumer = %self.name, "stream consumer stopped");
    }

    async fn ensure_groups(&self) -> anyhow::Result<()> {
        for stream in STREAMS.iter().chain([&keys::REFRESH_STREAM_DEAD]) {
            // "0": entries enqueued before any syncd ever ran are consumed too.
            let created: Result<(), fred::error::Error> = self
                .redis
                .xgroup_create(*stream, keys::REFRESH_GROUP, "0", true)
                .await;
            match created {
                Ok(()) => {}
                Err(error) if error.details().starts_with("BUSYGROUP") => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Reads up to a batch of this consumer's own pending entries after the ids in `after`
    /// (one per stream), and moves `after` past them.
    async fn read_own_pending(&self, after: &mut [String; 2]) -> anyhow::Result<Vec<Entry>> {
        let entries = self.read(Some(after.clone())).await?;
        for (stream, last) in STREAMS.iter().zip(after.iter_mut()) {
            if let Some(newest) = entries
                .iter()
                .filter(|e| e.stream == *stream)
                .map(|e| e.id.as_str())
                .max_by(|a, b| compare_ids(a, b))
            {
                *last = newest.to_owned();
            }
        }
        Ok(entries)
    }

    /// Own pending entries: those delivered too often go to the dead-letter stream (otherwise
    /// a replica restarted under the same name would ask MAX for them forever), the rest are
    /// processed.
    async fn process_own_pending(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let mut retry = Vec::with_capacity(entries.len());
        for stream in STREAMS {
            let of_stream: Vec<Entry> = entries
                .iter()
                .filter(|e| e.stream == stream)
                .cloned()
                .collect();
            if of_stream.is_empty() {
                continue;
            }
            let deliveries = self.delivery_counts(stream, &of_stream).await?;
            for entry in of_stream {
                if deliveries.get(&entry.id).copied().unwrap_or(1) > self.max_deliveries {
                    self.dead_letter(&entry, "too many deliveries").await?;
                } else {
                    retry.push(entry);
                }
            }
        }
        self.process(retry).await
    }

    /// Reads up to a batch: this consumer's own pending entries after `own_pending_after`, or
    /// new ones.
    async fn read(&self, own_pending_after: Option<[String; 2]>) -> anyhow::Result<Vec<Entry>> {
        let count = self.refresher.batch_size() as u64;
        let block = if own_pending_after.is_some() {
            None
        } else {
            Some(BLOCK.as_millis() as u64)
        };
        let ids: Vec<String> = match own_pending_after {
            Some(after) => after.to_vec(),
            None => vec![">".to_owned(), ">".to_owned()],
        };
        let reply: Value = self
            .reader
            .xreadgroup(
                keys::REFRESH_GROUP,
                &self.name,
                Some(count),
                block,
                false,
                STREAMS.to_vec(),
                ids,
            )
            .await?;
        let mut entries = parse_read_reply(reply)?;
        // Manual first, whatever order Redis answered in.
        entries.sort_by_key(|entry| entry.stream != keys::REFRESH_STREAM_MANUAL);
        Ok(entries)
    }

    /// Takes over entries idle for longer than `claim_idle`, from crashed consumers or from
    /// this one's own failed attempts, and dead-letters those delivered too often.
    async fn claim_abandoned(&self) -> anyhow::Result<()> {
        for stream in STREAMS {
            let args: Vec<Value> = vec![
                stream.into(),
                keys::REFRESH_GROUP.into(),
                self.name.as_str().into(),
                (self.claim_idle.as_millis() as i64).into(),
                "0-0".into(),
                "COUNT".into(),
                (self.refresher.batch_size() as i64).into(),
            ];
            let reply: Value = self.redis.custom(fred::cmd!("XAUTOCLAIM"), args).await?;
            let Value::Array(mut parts) = reply else {
                continue;
            };
            if parts.len() < 2 {
                continue;
            }
            let claimed = parse_entries(stream, parts.swap_remove(1))?;
            if claimed.is_empty() {
                continue;
            }
            let deliveries = self.delivery_counts(stream, &claimed).await?;
            let (poison, retry): (Vec<Entry>, Vec<Entry>) =
                claimed.into_iter().partition(|entry| {
                    deliveries.get(&entry.id).copied().unwrap_or(1) > self.max_deliveries
                });
            for entry in &poison {
                self.dead_letter(entry, "too many deliveries").await?;
            }
            if !retry.is_empty() {
                tracing::info!(
                    stream,
                    entries = retry.len(),
                    "took over idle refresh entries"
                );
                self.process(retry).await?;
            }
        }
        self.report_stream_gauges().await;
        Ok(())
    }

    async fn delivery_counts(
        &self,
        stream: &str,
        entries: &[Entry],
    ) -> anyhow::Result<HashMap<String, u64>> {
        let first = entries
            .iter()
            .map(|e| e.id.as_str())
            .min()
            .unwrap_or("-")
            .to_owned();
        let last = entries
            .iter()
            .map(|e| e.id.as_str())
            .max()
            .unwrap_or("+")
            .to_owned();
        let reply: Value = self
            .redis
            .xpending(
                stream,
                keys::REFRESH_GROUP,
                (first, last, entries.len() as u64 * 2, self.name.as_str()),
            )
            .await?;
        let mut counts = HashMap::new();
        if let Value::Array(rows) = reply {
            for row in rows {
                if let Value::Array(columns) = row {
                    if let (Some(id), Some(deliveries)) = (columns.first(), columns.get(3)) {
                        if let (Some(id), Ok(n)) =
                            (id.as_string(), deliveries.clone().convert::<u64>())
                        {
                            counts.insert(id, n);
                        }
                    }
                }
            }
        }
        Ok(counts)
    }

    async fn dead_letter(&self, entry: &Entry, reason: &str) -> anyhow::Result<()> {
        let mut fields: Vec<(String, String)> = entry.fields.clone().into_iter().collect();
        fields.push(("source_stream".to_owned(), entry.stream.clone()));
        fields.push(("source_id".to_owned(), entry.id.clone()));
        fields.push(("reason".to_owned(), reason.to_owned()));
        // Bounded: the newest entries are what an operator reads; the count is in the metrics.
        let _: String = self
            .redis
            .xadd(
                keys::REFRESH_STREAM_DEAD,
                false,
                ("MAXLEN", "~", DEAD_LETTER_MAX_LEN),
                "*",
                fields,
            )
            .await?;
        let _: i64 = self
            .redis
            .xack(&entry.stream, keys::REFRESH_GROUP, entry.id.as_str())
            .await?;
        self.metrics
            .stream_entries
            .with_label_values(&["dead_lettered"])
            .inc();
        tracing::warn!(stream = %entry.stream, entry.id = %entry.id, reason, "refresh entry dead-lettered");
        Ok(())
    }

    /// Refreshes the chats of a batch of entries and acknowledges what is settled.
    pub async fn process(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut requests: Vec<(Entry, RefreshRequest)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match RefreshRequest::from_fields(&entry.fields) {
                Ok(request) => requests.push((entry, request)),
                Err(error) => self.dead_letter(&entry, &error.to_string()).await?,
            }
        }
        if requests.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<i32> = requests.iter().map(|(_, r)| r.chat_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let targets: HashMap<i32, Target> = store::targets_by_id(&self.db, &ids)
            .await?
            .into_iter()
            .map(|t| (t.chat_id, t))
            .collect();

        let batch: Vec<&RefreshRequest> = requests.iter().map(|(_, r)| r).collect();
        let Plan {
            wanted,
            mut settled,
            to_refresh,
        } = plan::plan(
            &batch,
            &targets,
            Utc::now(),
            &plan::Policy {
                due_age: self.due_age,
                inactive_recheck: self.inactive_recheck,
            },
        );

        let entries: Vec<&Entry> = requests.iter().map(|(entry, _)| entry).collect();
        let outcomes = self
            .keeping_claimed(
                &entries,
                self.refresher.refresh(to_refresh, Urgency::Urgent, None),
            )
            .await?;
        for (chat_id, outcome) in &outcomes {
            match outcome {
                Outcome::Fresh { count, asked_at } => {
                    settled.insert(
                        *chat_id,
                        Some(RefreshOutcome {
                            chat_id: *chat_id,
                            participants_count: Some(*count),
                            updated_at: *asked_at,
                            error: None,
                        }),
                    );
                }
                Outcome::Gone { status, asked_at } => {
                    settled.insert(
                        *chat_id,
                        Some(RefreshOutcome {
                            chat_id: *chat_id,
                            participants_count: None,
                            updated_at: *asked_at,
                            error: Some(status.to_string()),
                        }),
                    );
                }
                Outcome::Failed { .. } | Outcome::TokenInvalid => {}
            }
        }

        // Reads weight the stale sweep; losing a few on a failure is harmless.
        let mut reads: BTreeMap<i32, i32> = BTreeMap::new();
        for (_, request) in &requests {
            if request.priority == Priority::Lazy && targets.contains_key(&request.chat_id) {
                *reads.entry(request.chat_id).or_default() += 1;
            }
        }
        let reads: Vec<(i32, i32)> = reads.into_iter().collect();
        if let Err(error) = store::record_reads(&self.db, &reads).await {
            tracing::debug!(error = %error, "could not record reads");
        }

        // Acknowledge what is settled; the rest stays pending and is retried after claim_idle.
        let mut acks: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut retried = 0u64;
        for (entry, request) in &requests {
            if settled.contains_key(&request.chat_id) {
                acks.entry(entry.stream.as_str())
                    .or_default()
                    .push(entry.id.as_str());
            } else {
                retried += 1;
            }
        }
        // A settled chat may be enqueued again as soon as it is due: its dedup markers go
        // (they share the streams' hash tag, so one DEL).
        let mut markers = Vec::new();
        for (chat_id, wanted) in &wanted {
            if settled.contains_key(chat_id) {
                markers.push(keys::refresh_marker(*chat_id));
                if wanted.manual {
                    markers.push(keys::manual_refresh_marker(*chat_id));
                }
            }
        }
        if !markers.is_empty() {
            let _: Result<i64, _> = self.redis.del(markers).await;
        }
        let mut acked = 0u64;
        for (stream, ids) in acks {
            let n: i64 = self.redis.xack(stream, keys::REFRESH_GROUP, ids).await?;
            acked += n.max(0) as u64;
        }
        for outcome in settled.into_values().flatten() {
            if let Ok(text) = serde_json::to_string(&outcome) {
                let _: Result<i64, _> = self
                    .redis
                    .publish(keys::REFRESH_OUTCOMES_CHANNEL, text)
                    .await;
            }
        }
        self.metrics
            .stream_entries
            .with_label_values(&["acked"])
            .inc_by(acked);
        self.metrics
            .stream_entries
            .with_label_values(&["retried"])
            .inc_by(retried);
        Ok(())
    }

    /// Runs `work` while keeping `entries` from going idle: a batch that waits for the rate
    /// limit, or MAX timeouts and retries, can take longer than `claim_idle`, and peers would
    /// take the entries over and ask MAX again. `XCLAIM ... JUSTID` resets an entry's idle time
    /// without counting a delivery; entries idle for less than a quarter of `claim_idle` (just
    /// claimed by a peer) are left alone.
    async fn keeping_claimed<T>(
        &self,
        entries: &[&Entry],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        let every = (self.claim_idle / 3).max(Duration::from_millis(30));
        let mut touch = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = touch.tick() => {
                    for stream in STREAMS {
                        let ids: Vec<&str> = entries
                            .iter()
                            .filter(|e| e.stream == stream)
                            .map(|e| e.id.as_str())
                            .collect();
                        if ids.is_empty() {
                            continue;
                        }
                        let mut args: Vec<Value> = vec![
                            stream.into(),
                            keys::REFRESH_GROUP.into(),
                            self.name.as_str().into(),
                            ((self.claim_idle / 4).as_millis() as i64).into(),
                        ];
                        args.extend(ids.into_iter().map(Value::from));
                        args.push("JUSTID".into());
                        let touched: Result<Value, _> =
                            self.redis.custom(fred::cmd!("XCLAIM"), args).await;
                        if let Err(error) = touched {
                            tracing::debug!(error = %error, "could not keep in-flight entries claimed");
                        }
                    }
                }
            }
        }
    }

    /// Length, pending and lag of each stream, and the dead-letter count, as gauges.
    async fn report_stream_gauges(&self) {
        for stream in STREAMS {
            if let Ok(len) = self.redis.xlen::<i64, _>(stream).await {
                self.metrics
                    .stream_length
                    .with_label_values(&[stream])
                    .set(len);
            }
            let info = group_info(&self.redis, stream).await;
            if let Some(pending) = info.pending {
                self.metrics
                    .stream_pending
                    .with_label_values(&[stream])
                    .set(pending);
            }
            if let Some(lag) = info.lag {
                self.metrics
                    .stream_lag
                    .with_label_values(&[stream])
                    .set(lag);
            }
        }
        if let Ok(len) = self.redis.xlen::<i64, _>(keys::REFRESH_STREAM_DEAD).await {
            self.metrics.dead_letters.set(len);
        }
    }
}

/// The `syncd` group's state on one stream (`None` where unknown: no group, no stream, or
/// Redis unreachable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub pending: Option<i64>,
    pub lag: Option<i64>,
}

/// Reads `XINFO GROUPS` of `stream`: the one parser of it, for the gauges and `syncd status`.
pub async fn group_info(redis: &Client, stream: &str) -> GroupInfo {
    match redis.xinfo_groups::<Value, _>(stream).await {
        Ok(reply) => parse_group_info(reply),
        Err(_) => GroupInfo::default(),
    }
}

fn parse_group_info(reply: Value) -> GroupInfo {
    let Value::Array(groups) = reply else {
        return GroupInfo::default();
    };
    for group in groups {
        let Ok(info) = group.convert::<HashMap<String, Value>>() else {
            continue;
        };
        if info.get("name").and_then(Value::as_string).as_deref() == Some(keys::REFRESH_GROUP) {
            let get = |name: &str| info.get(name).and_then(|v| v.clone().convert::<i64>().ok());
            return GroupInfo {
                pending: get("pending"),
                lag: get("lag"),
            };
        }
    }
    GroupInfo::default()
}

/// Whether `error` is Redis' NOGROUP: the stream exists, the consumer group does not.
fn is_missing_group(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<fred::error::Error>()
            .is_some_and(|e| e.details().starts_with("NOGROUP"))
            || cause.to_string().contains("NOGROUP")
    })
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a).cmp(&parse(b))
}

/// Parses an XREADGROUP reply (`[[stream, [[id, [field, value, ...]], ...]], ...]`, or nil).
fn parse_read_reply(reply: Value) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let Value::Array(streams) = reply else {
        return Ok(entries);
    };
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let list = parts.pop().unwrap_or(Value::Null);
        let name = parts.pop().and_then(|v| v.as_string()).unwrap_or_default();
        entries.extend(parse_entries(&name, list)?);
    }
    Ok(entries)
}

/// Parses a list of `[id, [field, value, ...]]`; entries deleted meanwhile (nil) are skipped.
fn parse_entries(stream: &str, list: Value) -> anyhow::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let Value::Array(items) = list else {
        return Ok(entries);
    };
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields_value = pair.pop().unwrap_or(Value::Null);
        let Some(id) = pair.pop().and_then(|v| v.as_string()) else {
            continue;
        };
        let mut fields = HashMap::new();
        if let Value::Array(flat) = fields_value {
            let mut iter = flat.into_iter();
            while let (Some(name), Some(value)) = (iter.next(), iter.next()) {
                if let (Some(name), Some(value)) = (name.as_string(), value.as_string()) {
                    fields.insert(name, value);
                }
            }
        }
        entries.push(Entry {
            stream: stream.to_owned(),
            id,
            fields,
        });
    }
    Ok(entries)
}
