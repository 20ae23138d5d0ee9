//! Request accounting for `GET /v1/stats` (the agent's contract, `xcluster_proto::stats`). The request path
//! only bumps atomics; a once-a-second sampler turns them into windowed rates and publishes a snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use xcluster_proto::stats::TypeStats;

use crate::config::REQUEST_TYPES;

/// A request's type, as an index into `REQUEST_TYPES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqType {
    Browse = 0,
    Order = 1,
    Seckill = 2,
    Pay = 3,
    Admin = 4,
}

impl ReqType {
    pub fn name(self) -> &'static str {
        REQUEST_TYPES[self as usize]
    }
}

/// Why a request was answered a retryable 503. Each reason is an `outcome` of its own in
/// `xcluster_app_requests_total`: a store that is busy (clients retry, the store needs relief), the app's own
/// admission (`capacity`) and the read-only degrade level call for other fixes than a 500 (ours, a bug or a
/// broken store), which counted them all as `server_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    StoreBusy,
    Overloaded,
    ReadOnly,
}

impl Unavailable {
    /// The error code of the answer, and its `outcome` label.
    pub const fn code(self) -> &'static str {
        match self {
            Unavailable::StoreBusy => "store_busy",
            Unavailable::Overloaded => "overloaded",
            Unavailable::ReadOnly => "read_only",
        }
    }
}

/// Marks an answer refused before any work that is no [`Unavailable`] (a buyer call without a valid token):
/// kept out of the service time the balancers weigh by, as those are.
#[derive(Debug, Clone, Copy)]
pub struct BeforeWork;

/// Every `outcome` of `xcluster_app_requests_total`, so each series is on `/metrics` at 0 from the start.
pub const OUTCOMES: [&str; 6] = [
    "ok",
    "client_error",
    "server_error",
    Unavailable::StoreBusy.code(),
    Unavailable::Overloaded.code(),
    Unavailable::ReadOnly.code(),
];

/// A finished request's `outcome`: a 5xx marked [`Unavailable`] by its reason, any other 5xx `server_error`.
pub fn outcome(status: u16, unavailable: Option<Unavailable>) -> &'static str {
    match (status, unavailable) {
        (500.., Some(why)) => why.code(),
        (500.., None) => "server_error",
        (400.., _) => "client_error",
        _ => "ok",
    }
}

#[derive(Debug, Default)]
struct TypeCounters {
    done: AtomicU64,
    errors: AtomicU64,
    /// Requests served (not refused before any work) and their time, for the service-time figure.
    served: AtomicU64,
    service_us: AtomicU64,
}

/// Cumulative (done, errors, served, service µs) of one type at the last roll.
type Totals = (u64, u64, u64, u64);

/// Live counters and the last published window.
#[derive(Debug)]
pub struct Stats {
    types: [TypeCounters; 5],
    pub in_flight: AtomicU32,
    window: ArcSwap<Window>,
    last: Mutex<(Instant, [Totals; 5])>,
}

/// Figures over the last sampling window.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub request_rate: f64,
    pub error_rate: f64,
    pub types: BTreeMap<String, TypeStats>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            types: Default::default(),
            in_flight: AtomicU32::new(0),
            window: ArcSwap::from_pointee(Window::default()),
            last: Mutex::new((Instant::now(), [(0, 0, 0, 0); 5])),
        }
    }
}

/// Marks one request in flight until dropped. Owned, so a handler can hand it to work that outlives it.
#[derive(Debug)]
pub struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a finished request; every 5xx counts toward the error rate (client errors do not), as the
    /// balancers weigh an instance that cannot serve, whatever the reason. `before_work`: a refusal made
    /// before any work (over capacity, read-only, an unauthorized buyer call: [`BeforeWork`]).
    pub fn record(
        &self,
        t: ReqType,
        started: Instant,
        status: u16,
        unavailable: Option<Unavailable>,
        before_work: bool,
    ) {
        let c = &self.types[t as usize];
        c.done.fetch_add(1, Ordering::Relaxed);
        // A refusal before any work answers in microseconds: averaged in, an instance refusing most orders
        // looked ten times faster than its peers to the balancers' weighting.
        let before_work =
            before_work || matches!(unavailable, Some(Unavailable::Overloaded | Unavailable::ReadOnly));
        if !before_work {
            c.served.fetch_add(1, Ordering::Relaxed);
            c.service_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if status >= 500 {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = outcome(status, unavailable);
        metrics::counter!(crate::metrics::REQUESTS_TOTAL, "type" => t.name(), "outcome" => outcome)
            .increment(1);
    }

    /// Closes a window: computes rates since the previous call and publishes them.
    pub fn roll(&self) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let mut w = Window::default();
        let (mut all, mut errs) = (0u64, 0u64);
        for (i, c) in self.types.iter().enumerate() {
            let cur = (
                c.done.load(Ordering::Relaxed),
                c.errors.load(Ordering::Relaxed),
                c.served.load(Ordering::Relaxed),
                c.service_us.load(Ordering::Relaxed),
            );
            let prev = last.1[i];
            let (d, e, served, us) = (cur.0 - prev.0, cur.1 - prev.1, cur.2 - prev.2, cur.3 - prev.3);
            last.1[i] = cur;
            all += d;
            errs += e;
            if i == ReqType::Admin as usize {
                continue;
            }
            w.types.insert(
                REQUEST_TYPES[i].to_string(),
                TypeStats {
                    rate: d as f64 / secs,
                    service_ms: if served > 0 {
                        us as f64 / served as f64 / 1000.0
                    } else {
                        0.0
                    },
                    // At most 1: a request whose error the window counts but whose `done` fell in the window
                    // before (three counters, read one by one) made it 1.2, and the agent refused the whole
                    // document: the instance turned not ready and every balancer slow-started it again.
                    error_rate: if d > 0 { e.min(d) as f64 / d as f64 } else { 0.0 },
                },
            );
        }
        w.request_rate = all as f64 / secs;
        w.error_rate = if all > 0 {
            errs.min(all) as f64 / all as f64
        } else {
            0.0
        };
        last.0 = now;
        self.window.store(Arc::new(w));
    }

    pub fn window(&self) -> Arc<Window> {
        self.window.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refusals before any work (over capacity, read-only, an unauthorized buyer call) count in the rate (and
    /// the 5xx in the errors), not in the service time: averaged in, an instance refusing most orders in microseconds looked faster than its peers.
    #[test]
    fn refusals_before_any_work_are_left_out_of_the_service_time() {
        let s = Stats::default();
        let slow = Instant::now() - std::time::Duration::from_millis(50);
        s.record(ReqType::Order, slow, 201, None, false);
        for _ in 0..9 {
            s.record(
                ReqType::Order,
                Instant::now(),
                503,
                Some(Unavailable::Overloaded),
                false,
            );
        }
        // An unauthorized buyer call: a 401, no error, no service time either.
        for _ in 0..10 {
            s.record(ReqType::Order, Instant::now(), 401, None, true);
        }
        s.roll();
        let w = s.window.load();
        let order = &w.types["order"];
        assert!(order.service_ms >= 50.0, "{}", order.service_ms);
        assert_eq!(order.error_rate, 0.45);
    }

    /// An error counted in a window after the one that counted its request leaves no rate above 1.
    #[test]
    fn an_error_counted_a_window_late_leaves_no_rate_above_one() {
        let s = Stats::default();
        let t0 = Instant::now();
        let c = &s.types[ReqType::Order as usize];
        // A failing request's `done`, then the roll, then its error with one more failing request.
        c.done.fetch_add(1, Ordering::Relaxed);
        s.roll();
        c.errors.fetch_add(1, Ordering::Relaxed);
        s.record(ReqType::Order, t0, 503, Some(Unavailable::StoreBusy), false);
        s.roll();
        let w = s.window.load();
        assert_eq!(w.types["order"].error_rate, 1.0);
        assert_eq!(w.error_rate, 1.0);
    }

    #[test]
    fn window_counts_rates_and_errors() {
        let s = Arc::new(Stats::default());
        let t0 = Instant::now();
        for _ in 0..3 {
            s.record(ReqType::Order, t0, 201, None, false);
        }
        s.record(ReqType::Order, t0, 503, Some(Unavailable::StoreBusy), false);
        s.record(ReqType::Browse, t0, 404, None, false);
        s.roll();
        let w = s.window();
        let o = &w.types["order"];
        assert!((o.error_rate - 0.25).abs() < 1e-9);
        assert_eq!(w.types["browse"].error_rate, 0.0);
        assert!((w.error_rate - 0.2).abs() < 1e-9);
        // The next window starts from zero.
        s.roll();
        assert_eq!(s.window().request_rate, 0.0);
        let g = s.enter();
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 1);
        drop(g);
        assert_eq!(s.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_retryable_503_is_counted_by_its_reason_apart_from_500() {
        assert_eq!(outcome(200, None), "ok");
        assert_eq!(outcome(201, None), "ok");
        assert_eq!(outcome(409, None), "client_error");
        assert_eq!(outcome(500, None), "server_error");
        assert_eq!(outcome(503, None), "server_error");
        for why in [
            Unavailable::StoreBusy,
            Unavailable::Overloaded,
            Unavailable::ReadOnly,
        ] {
            assert_eq!(outcome(503, Some(why)), why.code());
            assert!(OUTCOMES.contains(&why.code()), "{why:?} is not registered at 0");
        }
        for status in [200, 404, 500] {
            assert!(OUTCOMES.contains(&outcome(status, None)));
        }
    }
}
