//! How MAX calls are paced after failures, apart from the calls themselves: the circuit breaker
//! over streaks of passing failures, the fleet-wide pause after 429s, and the retry backoff.
//!
//! State only, on tokio's clock, so tests run it on paused time. The refresher applies what it
//! decides (sleeps, pauses the fleet's limiter) and logs each `Event` it reports: every event
//! is a transition, so the logs get one line per change, never one per call. Whether the token
//! works, and the one probe a minute while it does not, is `status::TokenState`'s.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// First retry delay; doubles per attempt, then full jitter is applied.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// The fleet-wide pause after a 429; doubles while 429s continue.
const PAUSE_BASE: Duration = Duration::from_secs(1);
const PAUSE_CAP: Duration = Duration::from_secs(30);
/// After this many passing failures in a row the breaker opens for `BREAKER_OPEN`.
const BREAKER_THRESHOLD: u32 = 20;
const BREAKER_OPEN: Duration = Duration::from_secs(10);

/// A change worth one log line (and a metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first passing failure after a success.
    StreakStarted,
    /// The streak reached the threshold: no calls for `open`.
    BreakerOpened { failures: u32, open: Duration },
    /// The breaker's time ran out: calls resume, and one more streak opens it again.
    BreakerHalfOpen,
    /// A success ended a streak of `failed` passing failures.
    Recovered { failed: u32 },
    /// A 429 after the last pause ran its course: the fleet pauses for this long.
    Paused(Duration),
}

/// Before a call: whether the breaker lets it through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Call now.
    Closed,
    /// The breaker's open time just ran out: call now, and log it.
    HalfOpened,
    /// Open: wait this long, then call.
    Open(Duration),
}

#[derive(Default)]
pub struct CallPolicy {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Passing failures (5xx, timeouts, connection errors) since the last success.
    streak: u32,
    /// How many pauses in a row; the next one lasts `PAUSE_BASE * 2^level`.
    pause_level: u32,
    /// Until when this replica's last pause of the fleet runs: a 429 to a call sent before
    /// then (in flight, or on a slot reserved earlier) is the same burst, and does not
    /// lengthen the pause; only a 429 after a pause has run its course doubles the next.
    paused_until: Option<Instant>,
    breaker_open_until: Option<Instant>,
}

impl CallPolicy {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asked before each call.
    pub fn gate(&self) -> Gate {
        let mut state = self.state();
        let now = Instant::now();
        match state.breaker_open_until {
            Some(until) if until > now => Gate::Open(until - now),
            Some(_) => {
                state.breaker_open_until = None;
                state.streak = 0;
                Gate::HalfOpened
            }
            None => Gate::Closed,
        }
    }

    /// MAX gave an answer that is not a passing failure.
    pub fn on_success(&self) -> Option<Event> {
        let mut state = self.state();
        state.pause_level = 0;
        let failed = std::mem::take(&mut state.streak);
        (failed > 0).then_some(Event::Recovered { failed })
    }

    /// A passing failure (5xx, timeout, connection error).
    pub fn on_transient(&self) -> Option<Event> {
        let mut state = self.state();
        state.streak += 1;
        match state.streak {
            1 => Some(Event::StreakStarted),
            BREAKER_THRESHOLD => {
                state.breaker_open_until = Some(Instant::now() + BREAKER_OPEN);
                Some(Event::BreakerOpened {
                    failures: BREAKER_THRESHOLD,
                    open: BREAKER_OPEN,
                })
            }
            _ => None,
        }
    }

    /// A 429 to a call sent at `sent_at`: `Paused` when the fleet must pause (the first 429 of
    /// a burst), nothing when a pause already answers it.
    pub fn on_rate_limited(&self, sent_at: Instant) -> Option<Event> {
        let mut state = self.state();
        if state.paused_until.is_some_and(|until| sent_at < until) {
            return None;
        }
        let level = state.pause_level.min(5);
        state.pause_level += 1;
        let pause = (PAUSE_BASE * 2u32.pow(level)).min(PAUSE_CAP);
        state.paused_until = Some(Instant::now() + pause);
        Some(Event::Paused(pause))
    }

    /// The longest wait before retry `attempt` (1 for the first retry); the caller waits a
    /// random part of it (full jitter), so that retries of a batch spread out.
    pub fn retry_ceiling(attempt: u32) -> Duration {
        (BACKOFF_BASE * 2u32.pow(attempt.min(10))).min(BACKOFF_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_streak_opens_the_breaker_once_and_it_half_opens_after_its_time() {
        let policy = CallPolicy::default();
        assert_eq!(policy.on_transient(), Some(Event::StreakStarted));
        for _ in 2..BREAKER_THRESHOLD {
            assert_eq!(policy.on_transient(), None);
            assert_eq!(policy.gate(), Gate::Closed);
        }
        assert_eq!(
            policy.on_transient(),
            Some(Event::BreakerOpened {
                failures: BREAKER_THRESHOLD,
                open: BREAKER_OPEN
            })
        );
        assert_eq!(policy.gate(), Gate::Open(BREAKER_OPEN));
        // Calls that fail while it is open neither reopen it nor log again.
        assert_eq!(policy.on_transient(), None);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(policy.gate(), Gate::Open(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(policy.gate(), Gate::HalfOpened);
        assert_eq!(policy.gate(), Gate::Closed);
        // Half-open starts a new streak: it takes a whole one to open again.
        assert_eq!(policy.on_transient(), Some(Event::StreakStarted));
        for _ in 2..BREAKER_THRESHOLD {
            assert_eq!(policy.on_transient(), None);
        }
        assert!(matches!(
            policy.on_transient(),
            Some(Event::BreakerOpened { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_streak_and_says_how_long_it_was() {
        let policy = CallPolicy::default();
        assert_eq!(policy.on_success(), None);
        for _ in 0..3 {
            policy.on_transient();
        }
        assert_eq!(policy.on_success(), Some(Event::Recovered { failed: 3 }));
        assert_eq!(policy.on_success(), None);
        assert_eq!(policy.on_transient(), Some(Event::StreakStarted));
    }

    #[tokio::test(start_paused = true)]
    async fn one_burst_of_429s_pauses_once_and_pauses_double_only_after_one_ran_its_course() {
        let policy = CallPolicy::default();
        let sent = Instant::now();
        assert_eq!(
            policy.on_rate_limited(sent),
            Some(Event::Paused(Duration::from_secs(1)))
        );
        // The rest of the batch, sent before the pause, comes back 429 too: the same burst.
        for _ in 0..49 {
            assert_eq!(policy.on_rate_limited(sent), None);
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(policy.on_rate_limited(Instant::now()), None);
        // A call sent after the pause ran out, and refused again: twice as long.
        tokio::time::advance(Duration::from_millis(600)).await;
        let mut expected = Vec::new();
        let mut seen = Vec::new();
        for seconds in [2, 4, 8, 16, 30, 30] {
            let Some(Event::Paused(pause)) = policy.on_rate_limited(Instant::now()) else {
                panic!("a 429 after the pause must pause again");
            };
            seen.push(pause);
            expected.push(Duration::from_secs(seconds));
            tokio::time::advance(pause).await;
        }
        assert_eq!(seen, expected);
        // A success resets the doubling.
        policy.on_success();
        assert_eq!(
            policy.on_rate_limited(Instant::now()),
            Some(Event::Paused(Duration::from_secs(1)))
        );
    }

    #[test]
    fn retries_back_off_by_doubling_up_to_a_cap() {
        let ceilings: Vec<u64> = (1..=8)
            .map(|attempt| CallPolicy::retry_ceiling(attempt).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(CallPolicy::retry_ceiling(u32::MAX), BACKOFF_CAP);
    }
}
