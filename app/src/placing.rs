//! The keyed flash-sale attempts this instance is placing: a retry under the same key that a gate refuses
//! meanwhile must not be told `sold_out`, since the attempt may still commit and its buyer then hold the
//! order (`api::orders::seckill` answers it `in_progress`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The attempts placing, by (user, idempotency key), with how many of each (a buyer's two concurrent
/// retries both go on, and the second replays the first). Touched twice per keyed attempt and once per
/// refused one, under a lock held for one map operation: far below the store call each of them makes.
#[derive(Debug, Default)]
pub struct Placing(Mutex<HashMap<(String, String), u32>>);

/// One attempt's place in [`Placing`], given up when dropped. It goes into the store call with the order
/// (`api::orders::place`, the order queue), so it lasts as long as that call: an attempt its caller gave up
/// on while it ran (`StoreError::Unsettled`, or between a PostgreSQL retry's rollback and its next try,
/// when the key's lock is free) may still commit, and stays held until the call has ended.
#[derive(Debug)]
pub struct Hold {
    placing: Arc<Placing>,
    key: (String, String),
}

impl Placing {
    /// Counts an attempt under `user`'s `key` as placing until the hold is dropped; none without a key.
    pub fn hold(placing: &Arc<Placing>, user: &str, key: Option<&str>) -> Option<Hold> {
        let key = (user.to_string(), key?.to_string());
        *placing.lock().entry(key.clone()).or_default() += 1;
        Some(Hold {
            placing: placing.clone(),
            key,
        })
    }

    /// Whether an attempt under `user`'s `key` is placing.
    pub fn holds(&self, user: &str, key: &str) -> bool {
        // Borrowed keys cannot look up a tuple of `String`s; a refused keyed attempt costs this copy.
        self.lock().contains_key(&(user.to_string(), key.to_string()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), u32>> {
        // The map stays whole across a panic elsewhere: each operation on it is one call.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.placing.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key is placing while any attempt under it holds it, for its user alone, and not without a key.
    #[test]
    fn a_key_is_placing_until_its_last_attempt_lets_go() {
        let placing = Arc::new(Placing::default());
        let first = Placing::hold(&placing, "u1", Some("k"));
        let second = Placing::hold(&placing, "u1", Some("k"));
        assert!(Placing::hold(&placing, "u1", None).is_none());
        assert!(placing.holds("u1", "k"));
        assert!(!placing.holds("u2", "k"), "another user's key of the same text");
        drop(first);
        assert!(placing.holds("u1", "k"), "the second attempt still places");
        drop(second);
        assert!(!placing.holds("u1", "k"));
        assert!(placing.lock().is_empty(), "nothing is left behind");
    }
}
