//! The clients waiting for a place (`queue_timeout_ms`), served in the order they came, as HAProxy serves
//! its queue.
//!
//! A client that finds every backend of its type at its `max_connections` takes a [`Ticket`] and waits to be
//! woken. A place that frees goes to the oldest client that asks for it, never to one that came later: a
//! client may take a place only while fewer clients of its type wait ahead of it than there are free places,
//! and a client that has just arrived counts every waiting one as ahead of it. Without that, whichever
//! client tried first after a connection ended took its place, so a client that had just arrived could pass
//! one that had waited for seconds, and an unlucky one waited until it timed out.
//!
//! Waking: a place that frees on a capped backend ([`Queue::freed`]) wakes the oldest client of each type;
//! a ticket that leaves the queue (served, or given up) wakes the next of its type, so several free places
//! are taken one after the other. Each waiter also retries every [`WAIT_BACKUP`], for places that come
//! without a wake (a backend back from a hold). Waiters used to poll every 10 ms instead, so a freed place
//! stayed empty for 5 ms on average: with connections of a millisecond, a queue served about 4% of what the
//! backend could take (`scripts/bench/queue`: 418 connections/s, HAProxy 10,811).
//!
//! A client that leaves while it waits (HAProxy's `CQ`) leaves the queue the next time it asks, within
//! [`WAIT_BACKUP`], and before it would take a place ([`Wait::left`]): a place that frees never goes to a
//! connection nobody is at. When a queue is long, the clients at its tail are the ones giving up; served in
//! order, each would cost a backend a connect and a close while the clients still there waited behind it.
//!
//! While nobody waits, a connection pays one relaxed load for all of this, and its end another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::access::End;
use super::config::{BackendConfig, ProxyConfig};
use super::inbound::recv;
use super::metrics::{BackendMetrics, WAITING};
use super::service::NoBackend;

/// How long a waiting client sleeps when nothing wakes it before it asks for a place again.
pub const WAIT_BACKUP: Duration = Duration::from_millis(100);

/// The waiting clients' tickets, per request type, each with how to wake it.
#[derive(Debug, Default)]
pub struct Queue {
    /// How many wait, over every type.
    waiting: AtomicUsize,
    next: AtomicU64,
    by_type: Mutex<HashMap<String, BTreeMap<u64, Waker>>>,
}

/// How a waiting client is woken.
#[derive(Debug, Clone)]
pub enum Waker {
    /// A connection task of a tokio runtime, waiting on this.
    Task(Arc<Notify>),
    /// Slot `slot` of an io_uring worker.
    Ring { door: Arc<RingDoor>, slot: u32 },
}

impl Waker {
    fn wake(&self) {
        match self {
            Waker::Task(n) => n.notify_one(),
            Waker::Ring { door, slot } => door.knock(*slot),
        }
    }
}

/// An io_uring worker's door: the slots whose turn may have come, and its eventfd to wake it.
#[derive(Debug)]
pub struct RingDoor {
    eventfd: Arc<OwnedFd>,
    slots: Mutex<Vec<u32>>,
}

impl RingDoor {
    pub fn new(eventfd: Arc<OwnedFd>) -> Self {
        Self {
            eventfd,
            slots: Mutex::default(),
        }
    }

    fn knock(&self, slot: u32) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(slot);
        poke(&self.eventfd);
    }

    /// The slots knocked for since the last call (a slot may be listed twice, or be another connection's
    /// by now: asking again is all a knock makes it do).
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.slots.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Adds one to eventfd `fd`, waking whatever reads it.
pub fn poke(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd that `fd` keeps open. A full counter (EAGAIN)
    // is impossible in practice and would still leave the reader awake.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// A waiting client's place in the [`Queue`]; dropped once it has a backend, gives up or is closed.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<Queue>,
    ty: String,
    n: u64,
}

impl Queue {
    /// A ticket for a client of request type `ty`, behind every one taken before; `waker` wakes it when its
    /// turn may have come.
    pub fn join(self: &Arc<Self>, ty: &str, waker: Waker) -> Ticket {
        let mut by_type = self.lock();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let tickets = by_type.entry(ty.to_owned()).or_default();
        tickets.insert(n, waker);
        waiting_gauge(ty, tickets.len());
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Ticket {
            queue: self.clone(),
            ty: ty.to_owned(),
            n,
        }
    }

    /// A place may have freed (a connection to a capped backend ended, or a reload raised a limit): wakes
    /// the oldest waiting client of each type.
    pub fn freed(&self) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        for tickets in self.lock().values() {
            if let Some((_, w)) = tickets.first_key_value() {
                w.wake();
            }
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
            None => tickets.len().min(free),
        };
        ahead < free
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<u64, Waker>>> {
        self.by_type.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's wait for a place, in either runtime: since when it waits, and its ticket meanwhile.
#[derive(Debug, Default)]
pub struct Wait {
    pub(super) since: Option<Instant>,
    pub(super) ticket: Option<Ticket>,
    /// Its ticket was taken by the last `keep_waiting`: it asks once more before it sleeps.
    pub(super) just_joined: bool,
}

impl Wait {
    /// Its place in the queue, while it waits.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// Whether its ticket was taken just now, so it must ask again before it sleeps: a place freed between
    /// its last ask and its ticket woke nobody.
    pub fn just_joined(&mut self) -> bool {
        std::mem::take(&mut self.just_joined)
    }

    /// It has a place: it no longer holds back those behind it. (If that connect fails, it asks again as a
    /// newcomer; its wait still counts from when it began.) How long it has waited, if it did.
    pub fn served(&mut self) -> Option<Duration> {
        self.ticket = None;
        self.waited()
    }

    /// How long it has waited for a place, if it did.
    pub fn waited(&self) -> Option<Duration> {
        self.since.map(|s| s.elapsed())
    }

    /// Whether its client, `client`, has left while it waited for a place. Asked only once it has waited,
    /// each time it asks for a place again: one `recv` per wake, never on a connection that did not wait.
    pub fn left(&self, client: BorrowedFd<'_>) -> bool {
        self.since.is_some() && gone(client)
    }

    /// How a connection that got no backend (`why`) ends: a queue timeout if it was waiting for a place.
    pub fn end(&self, why: NoBackend) -> End {
        match why {
            NoBackend::Full if self.since.is_some() => End::QueueTimeout,
            _ => End::NoBackend,
        }
    }
}

impl Drop for Ticket {
    /// Leaves the queue and wakes the next of its type: served, it may leave a second free place to it;
    /// given up, it no longer stands ahead of it.
    fn drop(&mut self) {
        let mut by_type = self.queue.lock();
        if let Some(tickets) = by_type.get_mut(&self.ty) {
            tickets.remove(&self.n);
            waiting_gauge(&self.ty, tickets.len());
            match tickets.first_key_value() {
                Some((_, next)) => next.wake(),
                None => {
                    by_type.remove(&self.ty);
                }
            }
        }
        self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the client on `fd` has gone: its socket has an error (a reset), or it closed without sending a
/// byte, so nothing can come of a connect for it. A close after some bytes stays: that may be a half-close
/// (a request, then `shutdown(SHUT_WR)`), which is forwarded, as HAProxy forwards it unless
/// `option abortonclose` is set.
pub fn gone(fd: BorrowedFd<'_>) -> bool {
    // Peeked: nothing is consumed, so the forwarding later reads the same bytes.
    match recv(fd.as_raw_fd(), &mut [0u8], libc::MSG_PEEK) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Sets how many clients of request type `ty` wait; under the queue's lock, so the last value set is the
/// length now.
fn waiting_gauge(ty: &str, n: usize) {
    metrics::gauge!(WAITING, "request_type" => ty.to_owned()).set(n as f64);
}

/// The places each request type's clients can take: the free places of the configured backends of the type
/// that a pick could take now (a weight above 0, as the config or `ctl weight` sets it, not drained, not down
/// by its checks; [`Places::free`]'s `takes`). A type with such a backend without a cap, or with no configured
/// backend (routed by the directory), has places without end, and its clients never wait in order (nor for
/// long: such a backend is never full). Counted from the config's weights alone, a drained backend's places
/// let a newcomer pass the clients waiting, and a backend given a weight at run time (`weight = 0` in the
/// file) had places no waiting client could take.
#[derive(Debug, Default)]
pub struct Places {
    by_type: HashMap<String, Vec<(SocketAddr, Arc<BackendMetrics>)>>,
    /// For the types no backend names: the backends that serve every type.
    other: Vec<(SocketAddr, Arc<BackendMetrics>)>,
}

impl Places {
    /// `handle` gives each configured backend's metrics, whose `open` and `max` are read live.
    pub fn new(cfg: &ProxyConfig, handle: impl Fn(&BackendConfig) -> Arc<BackendMetrics>) -> Self {
        // `None`: the types no backend names, which only the backends of every type serve.
        let serving = |ty: Option<&str>| {
            (cfg.backends.iter())
                .filter(|b| ty.map_or(b.request_types.is_empty(), |t| b.serves(t)))
                .map(|b| (b.addr, handle(b)))
                .collect::<Vec<_>>()
        };
        let types: BTreeSet<&str> = cfg
            .backends
            .iter()
            .flat_map(|b| b.request_types.iter().map(String::as_str))
            .collect();
        Self {
            by_type: types
                .into_iter()
                .map(|t| (t.to_owned(), serving(Some(t))))
                .collect(),
            other: serving(None),
        }
    }

    /// The places `ty` has free now (`usize::MAX`: without end) on the backends `takes` says a pick could
    /// take. With none such, without end too: the pick then finds no backend, and the client is closed at
    /// once rather than made to wait for places nobody can give.
    pub fn free(&self, ty: &str, takes: impl Fn(SocketAddr) -> bool) -> usize {
        let backends = self.by_type.get(ty).unwrap_or(&self.other);
        let mut free = None::<usize>;
        for (_, b) in backends.iter().filter(|(a, _)| takes(*a)) {
            let max = b.max.load(Ordering::Relaxed);
            if max == 0 {
                return usize::MAX;
            }
            let left =
                usize::try_from(max.saturating_sub(b.open.load(Ordering::Relaxed))).unwrap_or(usize::MAX);
            free = Some(free.unwrap_or(0).saturating_add(left));
        }
        free.unwrap_or(usize::MAX)
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
        let task = || Waker::Task(Arc::new(Notify::new()));
        let first = q.join("web", task());
        let second = q.join("web", task());
        let other = q.join("api", task());
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

    /// A freed place wakes the oldest of each type; a ticket that leaves wakes the next of its type.
    #[test]
    fn a_freed_place_wakes_the_head_and_a_leaving_ticket_the_next() {
        let q = Arc::new(Queue::default());
        let bells: Vec<Arc<Notify>> = (0..3).map(|_| Arc::new(Notify::new())).collect();
        let woken = |i: usize| {
            // A stored permit makes `notified()` ready at once; it is used up by this look.
            let n = bells[i].notified();
            futures_util::FutureExt::now_or_never(n).is_some()
        };
        q.freed();
        let first = q.join("web", Waker::Task(bells[0].clone()));
        let second = q.join("web", Waker::Task(bells[1].clone()));
        let other = q.join("api", Waker::Task(bells[2].clone()));
        assert!(!woken(0) && !woken(1) && !woken(2), "joining wakes nobody");
        q.freed();
        assert_eq!((woken(0), woken(1), woken(2)), (true, false, true));
        drop(first);
        assert_eq!((woken(0), woken(1), woken(2)), (false, true, false));
        drop((second, other));
        q.freed();
        assert_eq!((woken(0), woken(1), woken(2)), (false, false, false));
    }

    /// A ring's knocks collect the slots and wake its eventfd.
    #[test]
    fn a_ring_waiter_is_knocked_through_its_door() {
        // SAFETY: plain syscall; checked before it is wrapped.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        let door = Arc::new(RingDoor::new(fd.clone()));
        let q = Arc::new(Queue::default());
        let t = q.join(
            "web",
            Waker::Ring {
                door: door.clone(),
                slot: 7,
            },
        );
        q.freed();
        assert_eq!(door.take(), vec![7]);
        assert!(door.take().is_empty());
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from the eventfd `fd` keeps open.
        let n = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        assert_eq!((n, u64::from_ne_bytes(count)), (8, 1));
        drop(t);
    }
}
