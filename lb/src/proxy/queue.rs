//! The clients waiting for a place (`queue_timeout_ms`), served in the order they came, as HAProxy serves
//! its queue.
//!
//! A client that finds every backend of its type at its `max_connections` takes a [`Ticket`] and tries
//! again every `QUEUE_RETRY`. A place that frees goes to the oldest client that asks for it, never to one
//! that came later: a client may take a place only while fewer clients of its type wait ahead of it than
//! there are free places, and a client that has just arrived counts every waiting one as ahead of it.
//! Without that, whichever client tried first after a connection ended took its place, so a client that
//! had just arrived could pass one that had waited for seconds, and an unlucky one waited until it timed
//! out.
//!
//! While nobody waits, a connection pays one relaxed load for all of this.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::config::{BackendConfig, ProxyConfig};
use super::metrics::{BackendMetrics, WAITING};

/// The waiting clients' tickets, per request type.
#[derive(Debug, Default)]
pub struct Queue {
    /// How many wait, over every type.
    waiting: AtomicUsize,
    next: AtomicU64,
    by_type: Mutex<HashMap<String, BTreeSet<u64>>>,
}

/// A waiting client's place in the [`Queue`]; dropped once it has a backend, gives up or is closed.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<Queue>,
    ty: String,
    n: u64,
}

impl Queue {
    /// A ticket for a client of request type `ty`, behind every one taken before.
    pub fn join(self: &Arc<Self>, ty: &str) -> Ticket {
        let mut by_type = self.lock();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        by_type.entry(ty.to_owned()).or_default().insert(n);
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(WAITING).set(waiting as f64);
        Ticket {
            queue: self.clone(),
            ty: ty.to_owned(),
            n,
        }
    }

    /// Whether a client of `ty` holding `ticket` (`None`: one that has just arrived) may take a place now,
    /// `free` being how many its type has ([`Places::free`]).
    pub fn may_take(&self, ty: &str, ticket: Option<&Ticket>, free: impl FnOnce() -> usize) -> bool {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let free = free();
        if free == usize::MAX {
            return true;
        }
        let by_type = self.lock();
        let Some(tickets) = by_type.get(ty) else {
            return true;
        };
        // Counting stops at `free`: a long queue costs its head no more than a short one.
        let ahead = match ticket {
            Some(t) => tickets.range(..t.n).take(free).count(),
            None => tickets.iter().take(free).count(),
        };
        ahead < free
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<u64>>> {
        self.by_type.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's wait for a place, in either runtime: since when it waits, and its ticket meanwhile.
#[derive(Debug, Default)]
pub struct Wait {
    pub(super) since: Option<Instant>,
    pub(super) ticket: Option<Ticket>,
}

impl Wait {
    /// Its place in the queue, while it waits.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// It has a place: it no longer holds back those behind it. (If that connect fails, it asks again as a
    /// newcomer; its wait still counts from when it began.)
    pub fn served(&mut self) {
        self.ticket = None;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut by_type = self.queue.lock();
        if let Some(tickets) = by_type.get_mut(&self.ty) {
            tickets.remove(&self.n);
            if tickets.is_empty() {
                by_type.remove(&self.ty);
            }
        }
        let waiting = self.queue.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(WAITING).set(waiting as f64);
    }
}

/// The places each request type's clients can take, from the config: the backends of the type with a
/// weight, when every one of them has a `max_connections`. A type with a backend without a cap, or with no
/// configured backend (routed by the directory), has places without end, and its clients never wait in
/// order (nor for long: such a backend is never full).
#[derive(Debug, Default)]
pub struct Places {
    by_type: HashMap<String, Option<Vec<Arc<BackendMetrics>>>>,
    /// For the types no backend names: the backends that serve every type.
    other: Option<Vec<Arc<BackendMetrics>>>,
}

impl Places {
    /// `handle` gives each configured backend's metrics, whose `open` and `max` are read live.
    pub fn new(cfg: &ProxyConfig, handle: impl Fn(&BackendConfig) -> Arc<BackendMetrics>) -> Self {
        let capped = |ty: Option<&str>| {
            let serving = cfg.backends.iter().filter(|b| {
                b.weight > 0
                    && (b.request_types.is_empty()
                        || ty.is_some_and(|t| b.request_types.iter().any(|r| r == t)))
            });
            let mut bms = Vec::new();
            for b in serving {
                if b.max_connections == 0 {
                    return None;
                }
                bms.push(handle(b));
            }
            (!bms.is_empty()).then_some(bms)
        };
        let types: BTreeSet<&str> = cfg
            .backends
            .iter()
            .flat_map(|b| b.request_types.iter().map(String::as_str))
            .collect();
        Self {
            by_type: types
                .into_iter()
                .map(|t| (t.to_owned(), capped(Some(t))))
                .collect(),
            other: capped(None),
        }
    }

    /// The places `ty` has free now (`usize::MAX`: without end).
    pub fn free(&self, ty: &str) -> usize {
        let capped = match self.by_type.get(ty) {
            Some(c) => c,
            None => &self.other,
        };
        capped.as_ref().map_or(usize::MAX, |bms| {
            bms.iter()
                .map(|b| {
                    let max = b.max.load(Ordering::Relaxed);
                    usize::try_from(max.saturating_sub(b.open.load(Ordering::Relaxed))).unwrap_or(usize::MAX)
                })
                .fold(0, usize::saturating_add)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tickets are served in order, a new client waits behind them, and a ticket given up makes room.
    #[test]
    fn a_place_goes_to_the_oldest_ticket() {
        let q = Arc::new(Queue::default());
        assert!(
            q.may_take("web", None, || 0),
            "nobody waits: free is not even asked"
        );
        let first = q.join("web");
        let second = q.join("web");
        let other = q.join("api");
        // One place: only the first may take it.
        assert!(q.may_take("web", Some(&first), || 1));
        assert!(!q.may_take("web", Some(&second), || 1));
        assert!(!q.may_take("web", None, || 1));
        // Another type's queue is its own.
        assert!(q.may_take("api", Some(&other), || 1));
        // Two places: the second may take one, a newcomer still may not.
        assert!(q.may_take("web", Some(&second), || 2));
        assert!(!q.may_take("web", None, || 2));
        assert!(q.may_take("web", None, || 3));
        assert!(q.may_take("web", None, || usize::MAX));
        drop(first);
        assert!(q.may_take("web", Some(&second), || 1));
        drop((second, other));
        assert_eq!(q.waiting.load(Ordering::Relaxed), 0);
        assert!(q.lock().is_empty());
    }
}
