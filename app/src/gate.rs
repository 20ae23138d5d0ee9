//! The sold-out gate: a local, short-lived memory of SKUs the store just reported sold out, so a flood of
//! flash-sale attempts on a sold-out item costs a map lookup instead of a store transaction. It may only
//! reject early: an entry expires after `sold_out_gate_ms`, after which the store (the authority) is asked
//! again, so stock returned by an expiry or a restock in another process becomes sellable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// SKU → when its sold-out mark stops being trusted.
#[derive(Debug, Default)]
pub struct SoldOutGate {
    marks: ArcSwap<HashMap<String, Instant>>,
}

impl SoldOutGate {
    /// Whether `sku` was sold out a moment ago (a snapshot read, no lock).
    pub fn is_sold_out(&self, sku: &str) -> bool {
        self.marks
            .load()
            .get(sku)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers that the store said `sku` is sold out.
    pub fn mark(&self, sku: &str, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let until = Instant::now() + ttl;
        self.marks.rcu(|m| {
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

    /// Forgets a mark (a restock in this process).
    pub fn clear(&self, sku: &str) {
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
        g.mark("a", Duration::from_secs(60));
        assert!(g.is_sold_out("a"));
        g.clear("a");
        assert!(!g.is_sold_out("a"));
        g.mark("b", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!g.is_sold_out("b"));
        g.mark("c", Duration::ZERO);
        assert!(!g.is_sold_out("c"));
    }
}
