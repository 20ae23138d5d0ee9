//! A listener's own `max_connections` (HAProxy's per-frontend `maxconn`), beside the proxy-wide one: a
//! place is taken before `accept`, as the proxy-wide permit is, so a client over the limit waits in the
//! kernel's queue (it is not accepted and closed), and one busy listener cannot take every proxy-wide permit
//! from the others.
//!
//! Every connection of a listener is counted, limited or not, so the limit can be set, raised or lowered by
//! a reload at any time (lowered below the connections open, it lets no new one in until enough have
//! ended); the count outlives in-place changes of its listener. A connection's place is given back by its
//! `conn::Active`, which knows its listener: no word per connection for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit};

/// Connections open on one listener, against its limit.
#[derive(Debug, Default)]
pub struct ConnLimit {
    open: AtomicU32,
    /// 0: no limit of its own.
    max: AtomicU32,
    /// Woken when a place frees or the limit rises: the tokio accept loops wait on it. An io_uring worker
    /// looks again when one of its connections ends, and on its tick.
    freed: Notify,
}

impl ConnLimit {
    /// Sets the limit (0: none), waking those waiting if it rose.
    pub fn set_max(&self, max: u32) {
        let before = self.max.swap(max, Ordering::SeqCst);
        if max == 0 || (before != 0 && max > before) {
            self.freed.notify_waiters();
        }
    }

    /// A place, if one is free (always, without a limit).
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        let max = self.max.load(Ordering::SeqCst);
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (max == 0 || open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Place(Some(self.clone())))
    }

    /// A place, once one is free.
    pub async fn take(self: &Arc<Self>) -> Place {
        loop {
            // Registered before looking, so a place freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(place) = self.try_take() {
                return place;
            }
            freed.await;
        }
    }

    /// A connection whose place was kept ([`Place::keep`]) has ended. Only a limited listener can have
    /// an accept waiting (`notify_waiters` takes a lock: not once per connection of every listener). All
    /// in one order (SeqCst) with `try_take` and `set_max`: a take that found the listener full under a
    /// new limit came after that limit's store and before this decrement, so this load sees the limit.
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        if self.max.load(Ordering::SeqCst) != 0 {
            self.freed.notify_waiters();
        }
    }
}

/// A place taken for a connection about to be accepted; given back if it drops before [`Place::keep`].
#[derive(Debug)]
pub struct Place(Option<Arc<ConnLimit>>);

impl Place {
    /// The connection is accepted: it stays counted until its end calls [`ConnLimit::release`].
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            l.release();
        }
    }
}

/// What an accept takes before it is submitted: a permit of the proxy-wide `max_connections`, and a place
/// on its listener.
#[derive(Debug)]
pub struct Permit {
    pub all: OwnedSemaphorePermit,
    pub place: Place,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn places_are_taken_up_to_the_limit_and_given_back() {
        let l = Arc::new(ConnLimit::default());
        let free = l.try_take().unwrap();
        l.try_take().unwrap().keep();
        // Set while two are open (one kept by its connection): full.
        l.set_max(2);
        assert!(l.try_take().is_none());
        drop(free);
        let c = l.try_take().unwrap();
        // Lowered below what is open: nothing until enough have ended.
        l.set_max(1);
        l.release();
        assert!(l.try_take().is_none());
        drop(c);
        assert!(l.try_take().is_some());
    }

    #[tokio::test]
    async fn a_waiting_take_wakes_when_a_place_frees_or_the_limit_rises() {
        let l = Arc::new(ConnLimit::default());
        l.set_max(1);
        let held = l.try_take().unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.take().await.keep() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let took = tokio::time::timeout(Duration::from_secs(10), waiter).await;
        took.unwrap().unwrap();
        // Full again (the waiter kept its place), then the limit rises.
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.take().await.keep() }
        });
        tokio::task::yield_now().await;
        l.set_max(2);
        let took = tokio::time::timeout(Duration::from_secs(10), waiter).await;
        took.unwrap().unwrap();
        assert!(l.try_take().is_none(), "two kept: full at 2");
    }
}
