//! Backend health: a backend whose connect fails is held out of the picks for a while, so the connections
//! after it do not each pay a refused or timed-out connect before their redispatch. Failed connects come
//! from clients' connections (passive, like HAProxy's `observe layer4` with `on-error mark-down`) and from
//! the active checks of the configured backends (`check_interval_ms`, like HAProxy's `check`).
//!
//! The hold is 1 s after one failure and doubles with each failure in a row, up to 30 s; after a failed check
//! it lasts at least until the next check ends. The first connect that succeeds, a client's or a check's,
//! ends it. Once a hold runs out the backend may be picked again, and that connection is the probe: a
//! failure sends the backend out for twice as long, and the connection is redispatched as before.
//! When every backend a connection could use is held out, the holds are ignored: trying a backend that has
//! been failing beats turning the client away.
//!
//! Picks read a snapshot and allocate nothing while no backend is held; the rare writes (a failure, or the
//! first success after one) copy the map under a mutex.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// The hold after the first failure in a row.
const FIRST_HOLD: Duration = Duration::from_secs(1);
/// The longest hold.
const MAX_HOLD: Duration = Duration::from_secs(30);
/// A backend whose hold ended this long ago is forgotten (its next failure counts as a first one), so the
/// map does not keep every address the directory ever named.
const FORGET_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    /// Connects failed in a row.
    fails: u32,
}

/// Backends held out after failed connects, shared by every worker.
#[derive(Debug, Default)]
pub struct Holds {
    map: ArcSwap<HashMap<SocketAddr, Hold>>,
    write: Mutex<()>,
}

impl Holds {
    /// `tried` plus the backends held out now, or `None` when none is (the common case).
    pub fn exclude(&self, tried: &[SocketAddr]) -> Option<Vec<SocketAddr>> {
        self.exclude_at(tried, Instant::now())
    }

    fn exclude_at(&self, tried: &[SocketAddr], now: Instant) -> Option<Vec<SocketAddr>> {
        let map = self.map.load();
        if map.is_empty() {
            return None;
        }
        let held = map.iter().filter(|(_, h)| h.until > now).map(|(a, _)| *a);
        let mut all = tried.to_vec();
        all.extend(held);
        (all.len() > tried.len()).then_some(all)
    }

    /// A connect to `addr` failed: holds it out, for longer than last time if it failed then too, and for
    /// `at_least`. Returns how long, and how many connects in a row have failed.
    pub fn failed(&self, addr: SocketAddr, at_least: Duration) -> (Duration, u32) {
        self.failed_at(addr, at_least, Instant::now())
    }

    fn failed_at(&self, addr: SocketAddr, at_least: Duration, now: Instant) -> (Duration, u32) {
        self.update(|map| {
            map.retain(|_, h| h.until + FORGET_AFTER > now);
            let fails = map.get(&addr).map_or(0, |h| h.fails).saturating_add(1);
            let hold = FIRST_HOLD
                .saturating_mul(1 << (fails - 1).min(16))
                .min(MAX_HOLD)
                .max(at_least);
            map.insert(
                addr,
                Hold {
                    until: now + hold,
                    fails,
                },
            );
            (hold, fails)
        })
    }

    /// A connect to `addr` succeeded: ends its hold. True if it had one.
    pub fn succeeded(&self, addr: SocketAddr) -> bool {
        if !self.map.load().contains_key(&addr) {
            return false;
        }
        self.update(|map| map.remove(&addr).is_some())
    }

    fn update<T>(&self, f: impl FnOnce(&mut HashMap<SocketAddr, Hold>) -> T) -> T {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = HashMap::clone(&self.map.load());
        let out = f(&mut map);
        self.map.store(Arc::new(map));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_failed_backend_is_held_out_until_its_hold_ends() {
        let h = Holds::default();
        let t0 = Instant::now();
        assert_eq!(h.exclude_at(&[addr(1)], t0), None);
        assert_eq!(h.failed_at(addr(2), Duration::ZERO, t0), (FIRST_HOLD, 1));
        assert_eq!(
            h.exclude_at(&[addr(1)], t0 + Duration::from_millis(999)),
            Some(vec![addr(1), addr(2)])
        );
        assert_eq!(h.exclude_at(&[addr(1)], t0 + FIRST_HOLD), None);
    }

    #[test]
    fn holds_double_with_each_failure_in_a_row_and_a_success_ends_them() {
        let h = Holds::default();
        let t0 = Instant::now();
        let holds: Vec<u64> = (0..8)
            .map(|_| h.failed_at(addr(2), Duration::ZERO, t0).0.as_secs())
            .collect();
        assert_eq!(holds, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(h.succeeded(addr(2)));
        assert!(!h.succeeded(addr(2)));
        assert_eq!(h.exclude_at(&[], t0), None);
        assert_eq!(h.failed_at(addr(2), Duration::ZERO, t0), (FIRST_HOLD, 1));
        // A failed check holds it at least until the next check.
        let next_check = Duration::from_millis(2_500);
        assert_eq!(h.failed_at(addr(2), next_check, t0), (next_check, 2));
    }

    #[test]
    fn a_backend_quiet_for_long_is_forgotten() {
        let h = Holds::default();
        let t0 = Instant::now();
        h.failed_at(addr(2), Duration::ZERO, t0);
        h.failed_at(addr(2), Duration::ZERO, t0);
        // Its 2 s hold ended long ago: the next failure anywhere drops it, and its own counts as a first.
        let later = t0 + FORGET_AFTER + Duration::from_secs(3);
        h.failed_at(addr(3), Duration::ZERO, later);
        assert_eq!(h.map.load().len(), 1);
        assert_eq!(h.failed_at(addr(2), Duration::ZERO, later), (FIRST_HOLD, 1));
    }
}
