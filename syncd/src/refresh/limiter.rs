//! One MAX rate limit for the whole fleet, kept in Redis: GCRA with reservations.
//!
//! Each call reserves the next free slot on the Redis server's clock (so replicas' clocks do
//! not matter) and sleeps until it; the slot's Redis time is the moment the call is made, which
//! fences its answer. A caller may reserve only a little ahead, so nobody hoards the future:
//! manual refreshes may queue two seconds ahead and hold lazy refreshes and sweeps off; lazy
//! refreshes queue half a second ahead and hold sweeps off; sweeps take 10 ms of slots at a
//! time, starting at most two slots ahead, only while nothing more urgent waits anywhere in the
//! fleet. A 429 pauses everyone.
//!
//! Every wait ends: at the caller's stop (shutdown, a sweep handed back), or with
//! `Unavailable` when Redis cannot be reached for `REDIS_DEADLINE`.

use std::collections::VecDeque;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use shared::keys;
use shared::redis::run_script;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// How late a call may reach MAX after its slot and still count as in it: the late-wake
/// tolerance below plus network jitter between this process and MAX. Slots are spaced so that
/// `rps` slots never fit in one second plus this: `(1 s + JITTER_BUDGET) / (rps - 1)`, so at
/// most `rps` calls arrive at MAX in any one-second window (at 30 rps, a slot every 36.2 ms:
/// 27.6 calls a second planned).
pub const JITTER_BUDGET: Duration = Duration::from_millis(50);

/// How late after its reserved slot a call may still go out; later, it gives the slot up and
/// takes a new one (part of `JITTER_BUDGET`).
const LATE_TOLERANCE: Duration = Duration::from_millis(20);

/// How far ahead manual refreshes may reserve.
const MANUAL_HORIZON: Duration = Duration::from_secs(2);
/// How far ahead lazy refreshes may reserve: a manual refresh waits at most this behind them.
const LAZY_HORIZON: Duration = Duration::from_millis(500);

/// A sweep takes this much of the schedule per trip to Redis (at least one slot). One trip per
/// slot capped a replica at one call per round trip: about 350 calls a second on a loaded
/// 2-core machine. At 30 rps this is one slot; at 900 rps, nine.
const SWEEP_CHUNK: Duration = Duration::from_millis(10);

/// How long a wait for Redis may last before the caller is told the limiter is unavailable
/// (and can hand its work back) instead of waiting forever.
pub const REDIS_DEADLINE: Duration = Duration::from_secs(10);

/// Stored moments further ahead than these are insane (a Redis clock that stepped back, a
/// failover to a node whose clock is behind): no reservation reaches past the horizon, and no
/// pause is longer than the longest 429 pause.
const SANE_TAT_AHEAD: Duration = Duration::from_secs(10);
const SANE_PAUSE_AHEAD: Duration = Duration::from_secs(120);

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: tat, pause, urgent, manual. ARGV[1]: slot interval µs, ARGV[2]: horizon µs,
-- ARGV[3]: 2 manual, 1 lazy, 0 sweep, ARGV[4]: consecutive slots wanted, ARGV[5]: sane tat
-- ahead µs, ARGV[6]: sane pause ahead µs.
-- Returns {n, now, reset}: n >= 0: reserved, the first slot is n µs after now (server µs);
-- n < 0: not reserved, ask again after -n µs. reset: 1 if a stored moment was insane and reset.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local reset = 0
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
if pause > now + tonumber(ARGV[6]) then
  redis.call('DEL', KEYS[2]); pause = 0; reset = 1
end
if now < pause then return {-(pause - now), now, reset} end
-- No key here carries a TTL: each holds a moment (µs on this clock), and a moment in the past
-- means nothing, so the keys never need to expire and a volatile-* eviction policy never
-- takes them (which would let a burst through, or end a 429 pause early).
local hold = string.format('%d', now + math.max(interval * 4, 20000))
-- A hold is at most four slots ahead: one further ahead is insane (a clock step, a failover).
local sane_hold = now + math.max(interval * 4, 20000) + 1000000
for _, key in ipairs({KEYS[3], KEYS[4]}) do
  if tonumber(redis.call('GET', key) or '0') > sane_hold then
    redis.call('DEL', key); reset = 1
  end
end
local level = ARGV[3]
if level == '2' then
  redis.call('SET', KEYS[4], hold)
  redis.call('SET', KEYS[3], hold)
elseif tonumber(redis.call('GET', KEYS[4]) or '0') > now then
  -- A manual refresh waits somewhere in the fleet: everything else holds off a few slots.
  return {-interval, now, reset}
elseif level == '1' then
  redis.call('SET', KEYS[3], hold)
elseif tonumber(redis.call('GET', KEYS[3]) or '0') > now then
  return {-interval, now, reset}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now + tonumber(ARGV[5]) then tat = 0; reset = 1 end
local start = math.max(tat, now)
local wait = start - now
local horizon = tonumber(ARGV[2])
if wait > horizon then return {-math.max(wait - horizon, 1000), now, reset} end
local after = start + interval * tonumber(ARGV[4])
redis.call('SET', KEYS[1], string.format('%d', after))
return {wait, now, reset}
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Urgency {
    /// A person asked (`POST /chats/{id}/refresh-participants`, `syncd refresh`): first.
    Manual,
    /// Lazy refreshes of chats people read: before sweeps.
    Lazy,
    /// Sweeps: use what the others leave.
    Sweep,
}

impl Urgency {
    fn level(self) -> &'static str {
        match self {
            Urgency::Manual => "2",
            Urgency::Lazy => "1",
            Urgency::Sweep => "0",
        }
    }
}

/// A reserved slot: the call may go out now.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// How long the caller waited for it.
    pub waited: Duration,
    /// The slot's moment on the Redis server's clock: when the call is made, fleet-wide.
    pub at: DateTime<Utc>,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    #[error("stopped while waiting for a MAX slot")]
    Stopped,
    #[error("the rate limiter (Redis) is unreachable")]
    Unavailable,
}

/// A slot's instant on this process's clock and on Redis'.
#[derive(Clone, Copy)]
struct Reserved {
    local: Instant,
    redis_us: i64,
}

pub struct Limiter {
    client: Client,
    interval_us: u64,
    manual_gate: Mutex<()>,
    lazy_gate: Mutex<()>,
    /// Slots this process reserved for sweeps and has not handed out yet.
    sweep_slots: Mutex<VecDeque<Reserved>>,
    sweep_chunk: u32,
}

/// The spacing of slots for `rps`: `rps` of them never fit in one second plus the jitter
/// budget.
pub fn slot_interval(rps: f64) -> Duration {
    let per_window = (rps.floor() - 1.0).max(1.0);
    Duration::from_secs_f64((1.0 + JITTER_BUDGET.as_secs_f64()) / per_window)
}

impl Limiter {
    pub fn new(client: Client, rps: f64) -> Self {
        let interval_us = (slot_interval(rps).as_micros() as u64).max(1);
        Self {
            client,
            interval_us,
            manual_gate: Mutex::new(()),
            lazy_gate: Mutex::new(()),
            sweep_slots: Mutex::new(VecDeque::new()),
            sweep_chunk: (SWEEP_CHUNK.as_micros() as u64 / interval_us).clamp(1, 64) as u32,
        }
    }

    /// Waits until this process may make one MAX call, or until `stop`. While Redis is
    /// unreachable nobody can know the fleet's rate: this waits for Redis, up to
    /// `REDIS_DEADLINE`.
    pub async fn acquire(
        &self,
        urgency: Urgency,
        stop: &CancellationToken,
    ) -> Result<Slot, NoSlot> {
        let started = Instant::now();
        loop {
            let slot = match urgency {
                Urgency::Manual | Urgency::Lazy => {
                    // One task per process and urgency asks Redis at a time; the rest queue.
                    let gate = if urgency == Urgency::Manual {
                        &self.manual_gate
                    } else {
                        &self.lazy_gate
                    };
                    let _turn = tokio::select! {
                        turn = gate.lock() => turn,
                        () = stop.cancelled() => return Err(NoSlot::Stopped),
                    };
                    let horizon = if urgency == Urgency::Manual {
                        MANUAL_HORIZON
                    } else {
                        LAZY_HORIZON
                    };
                    self.reserve(horizon.as_micros() as u64, urgency, 1, stop)
                        .await?
                }
                Urgency::Sweep => {
                    let mut slots = tokio::select! {
                        slots = self.sweep_slots.lock() => slots,
                        () = stop.cancelled() => return Err(NoSlot::Stopped),
                    };
                    while slots
                        .front()
                        .is_some_and(|s| s.local.elapsed() > LATE_TOLERANCE)
                    {
                        slots.pop_front();
                    }
                    if slots.is_empty() {
                        let first = self
                            .reserve(self.interval_us * 2, urgency, self.sweep_chunk, stop)
                            .await?;
                        let interval = Duration::from_micros(self.interval_us);
                        slots.extend((0..self.sweep_chunk).map(|i| Reserved {
                            local: first.local + interval * i,
                            redis_us: first.redis_us + (self.interval_us * u64::from(i)) as i64,
                        }));
                    }
                    match slots.pop_front() {
                        Some(slot) => slot,
                        None => continue,
                    }
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(slot.local.into()) => {}
                () = stop.cancelled() => return Err(NoSlot::Stopped),
            }
            // A call that wakes well after its slot (a starved runtime, a throttled CPU) would
            // crowd the calls after it into the same second at MAX: give the slot up and take
            // a new one.
            let late = slot.local.elapsed();
            if late <= LATE_TOLERANCE {
                return Ok(Slot {
                    waited: started.elapsed(),
                    at: DateTime::from_timestamp_micros(slot.redis_us).unwrap_or_else(Utc::now),
                });
            }
            tracing::debug!(
                late_ms = late.as_millis() as u64,
                "woke late for a MAX slot; taking a new one"
            );
        }
    }

    /// Reserves `count` consecutive slots within `horizon` µs; returns the first.
    async fn reserve(
        &self,
        horizon: u64,
        urgency: Urgency,
        count: u32,
        stop: &CancellationToken,
    ) -> Result<Reserved, NoSlot> {
        let mut backoff = Duration::from_millis(50);
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let asked = Instant::now();
            let reply: Result<Vec<i64>, _> = run_script(
                &self.client,
                &ACQUIRE,
                vec![
                    keys::LIMITER_TAT.to_owned(),
                    keys::LIMITER_PAUSE.to_owned(),
                    keys::LIMITER_URGENT.to_owned(),
                    keys::LIMITER_MANUAL.to_owned(),
                ],
                vec![
                    self.interval_us.to_string(),
                    horizon.to_string(),
                    urgency.level().to_owned(),
                    count.to_string(),
                    SANE_TAT_AHEAD.as_micros().to_string(),
                    SANE_PAUSE_AHEAD.as_micros().to_string(),
                ],
            )
            .await;
            let retry_after = match reply.as_deref() {
                Ok(&[n, now, reset]) => {
                    if reset == 1 {
                        tracing::warn!(
                            "the rate limiter's stored times were far ahead of the Redis clock (a clock step, or a failover to a node whose clock differs); reset them"
                        );
                    }
                    if unreachable_since.take().is_some() {
                        tracing::info!("rate limiter reachable again");
                    }
                    if n >= 0 {
                        // The script's `now` is about half a round trip before its reply.
                        return Ok(Reserved {
                            local: asked + (asked.elapsed() / 2) + Duration::from_micros(n as u64),
                            redis_us: now + n,
                        });
                    }
                    Duration::from_micros(n.unsigned_abs())
                }
                Ok(other) => {
                    tracing::warn!(reply = ?other, "unexpected rate limiter reply");
                    backoff
                }
                Err(error) => {
                    let since = *unreachable_since.get_or_insert_with(|| {
                        tracing::warn!(error = %error, "rate limiter unreachable; holding MAX calls");
                        Instant::now()
                    });
                    if since.elapsed() >= REDIS_DEADLINE {
                        return Err(NoSlot::Unavailable);
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(retry_after) => {}
                () = stop.cancelled() => return Err(NoSlot::Stopped),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The most slots, spaced `interval` apart, that reach MAX within one second when each may
    /// arrive up to `JITTER_BUDGET` late.
    fn most_in_one_second(interval: Duration) -> u32 {
        // A one-second window at MAX catches every call whose slot lies within one second
        // plus the budget before the window's end (the earliest of them arriving late).
        let span = Duration::from_secs(1) + JITTER_BUDGET;
        (span.as_secs_f64() / interval.as_secs_f64()).floor() as u32 + 1
    }

    #[test]
    fn slots_leave_room_for_the_jitter_budget_at_every_rate() {
        for rps in [2.0, 5.0, 10.0, 30.0, 31.5, 100.0, 300.0, 900.0] {
            let interval = slot_interval(rps);
            assert!(
                most_in_one_second(interval) <= rps as u32,
                "{rps} rps: {} calls could arrive in one second",
                most_in_one_second(interval)
            );
        }
        // The old spacing (97% of the rate) let 31 in at 30 rps with a 20 ms late wake.
        let old = Duration::from_secs_f64(1.0 / (30.0 * 0.97));
        assert!(most_in_one_second(old) > 30);
    }
}
