//! The retry budget of one request type: gRPC's retry throttling, so that retries stop adding load when most
//! attempts fail.
//!
//! Without it every [`crate::Client::send_idempotent`] made up to `request_attempts` attempts whatever the
//! state of the instances: when all of them answer 503 (overloaded, or their store is down) each client
//! multiplied its load on them by `request_attempts` just when they could least take it, and kept doing so
//! until they recovered (a retry storm). A failed attempt costs a token, an attempt that got an answer
//! worth keeping gives back `token_ratio` of one, and a retry is made only while more than half of
//! `max_tokens` are left. So retries go on while fewer than about one attempt in eleven fails (with the
//! default ratio), a burst of failures is retried until half the bucket is spent, and a lasting failure is
//! retried no more (then about `token_ratio` of the successes, as they come back). The first attempt of a call is never
//! held back, and connect failovers are not counted (nothing was sent: they cost the instance nothing).
//!
//! **Invariant**: one atomic per type, updated with compare-and-swap; no lock, no allocation per request.

use std::sync::atomic::{AtomicU32, Ordering};

/// Tokens are kept in thousandths, as gRPC does, so a `token_ratio` of 0.1 is exact.
const MILLI: u32 = 1_000;

/// The default bucket: gRPC's documented ratio (0.1 back per success), with room to retry a burst of 49
/// failures. A bucket of 10 (gRPC's example) retried only four: an instance dying under a client with a
/// few dozen requests in flight there would have failed most of them, where a retry on another instance
/// was safe and cheap.
pub(crate) const DEFAULT_MAX_TOKENS: u32 = 100;
pub(crate) const DEFAULT_TOKEN_RATIO: f64 = 0.1;

/// One request type's retry tokens.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    milli_tokens: AtomicU32,
    max_milli: u32,
    ratio_milli: u32,
}

impl RetryBudget {
    /// A full bucket of `max_tokens`, given back `token_ratio` per success (both validated by the builder:
    /// `max_tokens` in 1..=1000, `token_ratio` above 0 and at most `max_tokens`).
    pub(crate) fn new(max_tokens: u32, token_ratio: f64) -> Self {
        let max_milli = max_tokens.saturating_mul(MILLI);
        let ratio_milli = (token_ratio * f64::from(MILLI))
            .round()
            .clamp(1.0, f64::from(max_milli)) as u32;
        Self {
            milli_tokens: AtomicU32::new(max_milli),
            max_milli,
            ratio_milli,
        }
    }

    /// An attempt failed in a way worth retrying: spends a token, and says whether a retry may follow (more
    /// than half the bucket left after it).
    pub(crate) fn failed(&self) -> bool {
        let prev = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(MILLI))
            })
            .unwrap_or_else(|t| t);
        prev.saturating_sub(MILLI) > self.max_milli / 2
    }

    /// An attempt got an answer that stands: gives back `token_ratio` of a token, up to the bucket's size.
    pub(crate) fn succeeded(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(self.ratio_milli).min(self.max_milli))
            });
    }

    /// Whether a retry may be made now (for [`crate::TypeState`]).
    pub(crate) fn allows_retries(&self) -> bool {
        self.milli_tokens.load(Ordering::Relaxed) > self.max_milli / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// gRPC's own example: 4 tokens, 1.6 back per success, threshold 2.
    #[test]
    fn spends_on_failures_and_refills_on_successes() {
        let b = RetryBudget::new(4, 1.6);
        assert!(b.failed(), "3 left");
        b.succeeded();
        assert_eq!(
            b.milli_tokens.load(Ordering::Relaxed),
            4_000,
            "never above the bucket"
        );
        assert!(b.failed(), "3 left");
        assert!(!b.failed(), "2 left: at the threshold, no retry");
        assert!(!b.allows_retries());
        assert!(!b.failed() && !b.failed() && !b.failed(), "never below zero");
        assert_eq!(b.milli_tokens.load(Ordering::Relaxed), 0);
        b.succeeded();
        b.succeeded();
        assert!(b.allows_retries(), "3.2 left after two successes");
    }

    /// With the defaults, 49 failures in a row are retried and the 50th is not; 501 successes bring retries
    /// back: in the long run they are bounded by a tenth of the successes.
    #[test]
    fn the_default_allows_a_tenth_of_the_successes() {
        let b = RetryBudget::new(DEFAULT_MAX_TOKENS, DEFAULT_TOKEN_RATIO);
        let allowed = (0..1000).filter(|_| b.failed()).count();
        assert_eq!(allowed, 49, "retries while more than 50 of 100 tokens are left");
        for _ in 0..500 {
            b.succeeded();
        }
        assert!(!b.allows_retries(), "exactly 50 left: not above half");
        b.succeeded();
        assert!(b.allows_retries());
    }
}
