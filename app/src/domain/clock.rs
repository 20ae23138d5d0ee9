//! The clock reservations are timed by: when one was made, when it expires, whether a payment is too late.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::now_ms;

/// This host's wall clock, moved by how far the store's runs from it (PostgreSQL's; SQLite's is this host's).
/// With several instances on one PostgreSQL, each timed reservations by its own host's clock: one running a
/// minute ahead expired every other instance's reservations a minute early, and refused their payments as
/// late. Timed by one clock, every instance agrees, within the round trip the offset was read in.
/// Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Milliseconds since the Unix epoch by the store's clock.
    pub fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.offset_ms())
    }

    /// How far the store's clock runs ahead of this host's (behind when negative).
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Takes the store's reading `store_ms`, made between this host's readings `before_ms` and `after_ms`:
    /// taken as made halfway. A reading that took longer than [`MAX_READ_MS`] (a server busy or far away)
    /// says little of the offset and is not taken; `false` then.
    pub fn set_from(&self, before_ms: i64, store_ms: i64, after_ms: i64) -> bool {
        let took = after_ms.saturating_sub(before_ms);
        if !(0..=MAX_READ_MS).contains(&took) {
            return false;
        }
        let offset = store_ms.saturating_sub(before_ms.saturating_add(took / 2));
        self.offset_ms.store(offset, Ordering::Relaxed);
        true
    }
}

/// The longest round trip a reading of the store's clock is taken from: the error it leaves is half of it.
pub const MAX_READ_MS: i64 = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_taken_as_made_halfway_through_its_round_trip() {
        let clock = Clock::default();
        assert!(clock.set_from(1_000, 61_010, 1_020), "a store a minute ahead");
        assert_eq!(clock.offset_ms(), 60_000);
        assert!(clock.set_from(1_000, 500, 1_000), "a store behind");
        assert_eq!(clock.offset_ms(), -500);
        let shared = clock.clone();
        assert!(clock.set_from(0, 7, 0));
        assert_eq!(shared.offset_ms(), 7, "clones share the offset");
        let now = now_ms();
        assert!((now + 7..=now + 7 + 1_000).contains(&shared.now_ms()));
    }

    #[test]
    fn a_slow_or_backwards_reading_is_not_taken() {
        let clock = Clock::default();
        assert!(!clock.set_from(0, 60_000, MAX_READ_MS + 1));
        assert!(
            !clock.set_from(10, 60_000, 0),
            "this host's clock stepped back meanwhile"
        );
        assert_eq!(clock.offset_ms(), 0);
    }
}
