//! What keeps a search from taking the CPU: a cap on the bytes of documents one search may
//! compare (`API_SEARCH_SCAN_BUDGET_MB`, beyond it 422), and for a costly search (one that may
//! compare more than `COSTLY_DOCUMENTS` documents) a rate per caller (the token's `sub`,
//! `API_COSTLY_SEARCHES_PER_USER_PER_MINUTE`, beyond it 429) and a cap on how many run at once
//! on this replica (`API_COSTLY_SEARCH_CONCURRENCY`), each on a blocking thread, so that the
//! async workers go on serving pages.
//!
//! Cheap searches (a rare word, cached words, a curator's university) pass untouched. Per api
//! replica, like `refresh_gate`: the rate is a GCRA token bucket (the `governor` crate).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Documents a search may compare and still count as cheap: a few milliseconds of work
/// (a rare word's candidates, a curator's university of up to this many chats).
pub const COSTLY_DOCUMENTS: usize = 20_000;

pub struct SearchGate {
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    running: Arc<Semaphore>,
    /// Bytes of documents one search may compare.
    pub scan_budget: usize,
    clock: DefaultClock,
}

impl SearchGate {
    /// `per_minute` costly searches per caller (0: no rate), `concurrency` costly searches at
    /// once, `scan_budget` bytes of documents per search.
    pub fn new(per_minute: u32, concurrency: usize, scan_budget: usize) -> Self {
        Self {
            per_user: NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            running: Arc::new(Semaphore::new(concurrency.max(1))),
            scan_budget,
            clock: DefaultClock::default(),
        }
    }

    /// Whether a search that may compare `documents` documents is costly.
    pub fn is_costly(documents: usize) -> bool {
        documents > COSTLY_DOCUMENTS
    }

    /// Ok when `user` may run one more costly search now; otherwise how long until it may.
    pub fn admit(&self, user: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.per_user else {
            return Ok(());
        };
        limiter
            .check_key(&user.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// A place among the costly searches running at once, waited for (the request timeout
    /// bounds the wait).
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        self.running
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
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
    fn each_caller_gets_its_costly_searches_and_then_a_wait() {
        let gate = SearchGate::new(2, 1, 1 << 20);
        assert!(gate.admit("curator-1").is_ok() && gate.admit("curator-1").is_ok());
        assert!(gate.admit("curator-1").is_err());
        assert!(
            gate.admit("curator-2").is_ok(),
            "another caller is not held back"
        );
        let open = SearchGate::new(0, 1, 1 << 20);
        assert!((0..100).all(|_| open.admit("script").is_ok()));
        assert!(
            !SearchGate::is_costly(COSTLY_DOCUMENTS) && SearchGate::is_costly(COSTLY_DOCUMENTS + 1)
        );
    }
}
