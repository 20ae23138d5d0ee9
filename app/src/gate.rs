//! The sold-out gate: a local, short-lived memory of SKUs the store just reported sold out, so a flood of
//! flash-sale attempts on a sold-out item costs a map lookup instead of a store transaction. It may only
//! reject early: an entry expires after `sold_out_gate_ms`, after which the store (the authority) is asked
//! again, so stock returned by an expiry or a restock in another process becomes sellable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// SKU → when its sold-out mark stops being trusted.
#[derive(Debug, Default)]
pub struct SoldOutGate {
    marks: ArcSwap<HashMap<String, Instant>>,
    /// Counts the clears: a mark from an attempt that asked the store before the latest clear is dropped.
    clears: AtomicU64,
}

impl SoldOutGate {
    /// Whether `sku` was sold out a moment ago (a snapshot read, no lock).
    pub fn is_sold_out(&self, sku: &str) -> bool {
        self.marks
            .load()
            .get(sku)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// What to pass to [`Self::mark`]: read before the store is asked.
    pub fn generation(&self) -> u64 {
        self.clears.load(Ordering::Acquire)
    }

    /// Remembers that the store said `sku` is sold out, in an answer asked for at `generation`. An answer
    /// from before a clear (a restock committed while the attempt was in the store) is old news: marked, it
    /// refused the restocked SKU for up to the mark's `ttl`.
    pub fn mark(&self, sku: &str, ttl: Duration, generation: u64) {
        if ttl.is_zero() {
            return;
        }
        let until = Instant::now() + ttl;
        self.marks.rcu(|m| {
            // Checked in the update itself: a clear that lands before this update commits either changed
            // the generation already, or changes the map, which makes `rcu` run this again.
            if self.generation() != generation {
                return Arc::clone(m);
            }
            let now = Instant::now();
            let mut next: HashMap<String, Instant> = m
                .iter()
                .filter(|(_, t)| **t > now)
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            // Bounded: a gate is for a few hot SKUs, never a copy of the catalog.
            if next.len() < 1024 {
                next.insert(sku.to_string(), until);
            }
            Arc::new(next)
        });
    }

    /// Forgets a mark (a restock in this process, once committed), and any mark on its way from an attempt
    /// that asked the store before.
    pub fn clear(&self, sku: &str) {
        self.clears.fetch_add(1, Ordering::AcqRel);
        self.marks.rcu(|m| {
            let mut next = HashMap::clone(m);
            next.remove(sku);
            Arc::new(next)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_expire_and_clear() {
        let g = SoldOutGate::default();
        assert!(!g.is_sold_out("a"));
        g.mark("a", Duration::from_secs(60), g.generation());
        assert!(g.is_sold_out("a"));
        g.clear("a");
        assert!(!g.is_sold_out("a"));
        let (ttl, marked) = (Duration::from_millis(200), Instant::now());
        g.mark("b", ttl, g.generation());
        // Marked (unless this thread was preempted past the mark's whole life), then expires on its own.
        assert!(g.is_sold_out("b") || marked.elapsed() >= ttl, "marked");
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.is_sold_out("b") {
            assert!(Instant::now() < deadline, "the mark never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
        g.mark("c", Duration::ZERO, g.generation());
        assert!(!g.is_sold_out("c"));
    }

    /// An attempt that asked the store before a restock's clear comes back sold out after it: its mark would
    /// refuse the restocked SKU, so it is dropped.
    #[test]
    fn a_mark_asked_for_before_a_clear_is_dropped() {
        let g = SoldOutGate::default();
        let asked = g.generation();
        g.clear("a");
        g.mark("a", Duration::from_secs(60), asked);
        assert!(!g.is_sold_out("a"), "an answer older than the restock marked it");
        g.mark("a", Duration::from_secs(60), g.generation());
        assert!(g.is_sold_out("a"), "an answer after it marks");
    }
}
