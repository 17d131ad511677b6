//! What keeps one caller from taking the fleet's urgent lane: a rate of manual refreshes per
//! principal (the token's `sub`), and a cap on requests waiting for their refresh at once.
//!
//! Per api replica: with N replicas a caller may get up to N times the rate through a load
//! balancer. The rate is a GCRA token bucket (the `governor` crate) that allows the whole
//! minute's quota as a burst.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct RefreshGate {
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    waiters: Arc<Semaphore>,
    clock: DefaultClock,
}

impl RefreshGate {
    /// `per_minute` 0 turns the rate off; `max_waiters` requests may wait for their refresh at
    /// once (the rest are answered 202 at once).
    pub fn new(per_minute: u32, max_waiters: usize) -> Self {
        Self {
            per_user: NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            waiters: Arc::new(Semaphore::new(max_waiters)),
            clock: DefaultClock::default(),
        }
    }

    /// Ok when `user` may ask for one more refresh now; otherwise how long until it may.
    pub fn admit(&self, user: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.per_user else {
            return Ok(());
        };
        limiter
            .check_key(&user.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// A place among the waiting requests, or `None` when they are all taken.
    pub fn try_wait(&self) -> Option<OwnedSemaphorePermit> {
        self.waiters.clone().try_acquire_owned().ok()
    }

    /// Forgets callers whose bucket is full again, so the map holds only recent callers.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.per_user {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_the_quota_and_then_a_wait() {
        let gate = RefreshGate::new(3, 10);
        for _ in 0..3 {
            assert!(gate.admit("curator-1").is_ok());
        }
        let wait = gate.admit("curator-1").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            gate.admit("curator-2").is_ok(),
            "another caller is not held back"
        );
    }

    #[test]
    fn zero_turns_the_rate_off_and_waiters_are_capped() {
        let gate = RefreshGate::new(0, 2);
        for _ in 0..100 {
            assert!(gate.admit("script").is_ok());
        }
        let first = gate.try_wait();
        let second = gate.try_wait();
        assert!(first.is_some() && second.is_some());
        assert!(gate.try_wait().is_none());
        drop(first);
        assert!(gate.try_wait().is_some());
    }
}
