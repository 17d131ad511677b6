//! One MAX rate limit for the whole fleet, kept in Redis: GCRA with reservations.
//!
//! Each call reserves the next free slot (slots are `1 / (rps * RATE_SAFETY)` apart on the Redis
//! server's clock, so replicas' clocks do not matter) and sleeps until it. A caller may reserve
//! only a little ahead, so sweeps never hoard the future: urgent callers (lazy and manual
//! refreshes) may queue up to two seconds ahead; sweeps take 10 ms of slots at a time, starting
//! at most two slots ahead, and only while no urgent work waits anywhere in the fleet. A 429
//! pauses everyone.

use std::collections::VecDeque;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use shared::keys;
use shared::redis::run_script;
use tokio::sync::Mutex;

/// Slots are spaced for 97% of the configured rate, so that network jitter between the
/// reservation and MAX's arrival clock cannot push any one-second window over the limit
/// (about 30 ms of tolerance at any rate).
pub const RATE_SAFETY: f64 = 0.97;

/// How late after its reserved slot a call may still go out. Later than this, it could pass
/// MAX in the same second as the calls reserved after it (the 97% spacing leaves about 30 ms of
/// slack per second; 10 ms wasted a slot in ~1.5% of calls on an idle 2-core machine, 20 ms in
/// none measurable).
const LATE_TOLERANCE: Duration = Duration::from_millis(20);

/// How far ahead urgent work may reserve.
const URGENT_HORIZON: Duration = Duration::from_secs(2);

/// A sweep takes this much of the schedule per trip to Redis (at least one slot). One trip per
/// slot capped a replica at one call per round trip: about 350 calls a second on a loaded
/// 2-core machine. At 30 rps this is one slot; at 900 rps, nine.
const SWEEP_CHUNK: Duration = Duration::from_millis(10);

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: tat, pause, urgent. ARGV[1]: slot interval µs, ARGV[2]: horizon µs, ARGV[3]: 1 if urgent,
-- ARGV[4]: consecutive slots wanted.
-- Returns >= 0: reserved, the first slot is this many µs away; < 0: not reserved, ask again after -n µs.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < pause then return -(pause - now) end
-- No key here carries a TTL: each holds a moment (µs on this clock), and a moment in the past
-- means nothing, so the keys never need to expire and a volatile-* eviction policy never
-- takes them (which would let a burst through, or end a 429 pause early).
if ARGV[3] == '1' then
  -- Urgent work is waiting: sweeps hold off for the next few slots. Longer would starve
  -- sweeps behind a trickle of urgent calls that uses a sliver of the budget.
  redis.call('SET', KEYS[3], string.format('%d', now + math.max(interval * 4, 20000)))
elseif tonumber(redis.call('GET', KEYS[3]) or '0') > now then
  return -interval
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(tat, now)
local wait = start - now
local horizon = tonumber(ARGV[2])
if wait > horizon then return -math.max(wait - horizon, 1000) end
local after = start + interval * tonumber(ARGV[4])
redis.call('SET', KEYS[1], string.format('%d', after))
return wait
"#,
    )
});

static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS[1]: pause. ARGV[1]: pause length µs. Extends the pause, never shortens it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_us = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < until_us then
  redis.call('SET', KEYS[1], string.format('%d', until_us))
end
return 1
"#,
    )
});

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Urgency {
    /// Lazy and manual refreshes: served first.
    Urgent,
    /// Sweeps: use what urgent work leaves.
    Sweep,
}

pub struct Limiter {
    client: Client,
    interval_us: u64,
    urgent_gate: Mutex<()>,
    /// Slots this process reserved for sweeps and has not handed out yet.
    sweep_slots: Mutex<VecDeque<Instant>>,
    sweep_chunk: u32,
}

impl Limiter {
    pub fn new(client: Client, rps: f64) -> Self {
        let interval_us = (1_000_000.0 / (rps * RATE_SAFETY)).ceil().max(1.0) as u64;
        Self {
            client,
            interval_us,
            urgent_gate: Mutex::new(()),
            sweep_slots: Mutex::new(VecDeque::new()),
            sweep_chunk: (SWEEP_CHUNK.as_micros() as u64 / interval_us).clamp(1, 64) as u32,
        }
    }

    /// Waits until this process may make one MAX call. Returns how long it waited. While Redis
    /// is unreachable nobody can know the fleet's rate, so this waits for Redis too.
    pub async fn acquire(&self, urgency: Urgency) -> Duration {
        let started = Instant::now();
        loop {
            let slot = match urgency {
                Urgency::Urgent => {
                    // One task per process asks Redis at a time; the rest queue here.
                    let _turn = self.urgent_gate.lock().await;
                    let wait = self
                        .reserve(URGENT_HORIZON.as_micros() as u64, "1", 1)
                        .await;
                    Instant::now() + wait
                }
                Urgency::Sweep => {
                    let mut slots = self.sweep_slots.lock().await;
                    while slots.front().is_some_and(|s| s.elapsed() > LATE_TOLERANCE) {
                        slots.pop_front();
                    }
                    if slots.is_empty() {
                        let wait = self
                            .reserve(self.interval_us * 2, "0", self.sweep_chunk)
                            .await;
                        let first = Instant::now() + wait;
                        let interval = Duration::from_micros(self.interval_us);
                        slots.extend((0..self.sweep_chunk).map(|i| first + interval * i));
                    }
                    slots.pop_front().unwrap_or_else(Instant::now)
                }
            };
            tokio::time::sleep_until(slot.into()).await;
            // A call that wakes well after its slot (a starved runtime, a throttled CPU) would
            // crowd the calls after it into the same second at MAX: give the slot up and take
            // a new one.
            let late = slot.elapsed();
            if late <= LATE_TOLERANCE {
                return started.elapsed();
            }
            tracing::debug!(
                late_ms = late.as_millis() as u64,
                "woke late for a MAX slot; taking a new one"
            );
        }
    }

    /// Reserves `count` consecutive slots within `horizon` µs; returns how far away the first is.
    async fn reserve(&self, horizon: u64, urgent_flag: &str, count: u32) -> Duration {
        let mut backoff = Duration::from_millis(50);
        loop {
            let reply: Result<i64, _> = run_script(
                &self.client,
                &ACQUIRE,
                vec![
                    keys::LIMITER_TAT.to_owned(),
                    keys::LIMITER_PAUSE.to_owned(),
                    keys::LIMITER_URGENT.to_owned(),
                ],
                vec![
                    self.interval_us.to_string(),
                    horizon.to_string(),
                    urgent_flag.to_owned(),
                    count.to_string(),
                ],
            )
            .await;
            match reply {
                Ok(wait) if wait >= 0 => return Duration::from_micros(wait as u64),
                Ok(retry) => tokio::time::sleep(Duration::from_micros(retry.unsigned_abs())).await,
                Err(error) => {
                    tracing::warn!(error = %error, "rate limiter unreachable; holding MAX calls");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Holds every replica off MAX for `length` (after a 429; MAX sends no Retry-After).
    pub async fn pause(&self, length: Duration) {
        let result: Result<i64, _> = run_script(
            &self.client,
            &PAUSE,
            vec![keys::LIMITER_PAUSE.to_owned()],
            vec![(length.as_micros() as u64).to_string()],
        )
        .await;
        if let Err(error) = result {
            tracing::warn!(error = %error, "could not record the fleet-wide pause");
        }
    }
}
