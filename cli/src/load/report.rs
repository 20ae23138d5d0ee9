//! Recording results and reporting them: one HDR histogram of successful latencies per request type (in
//! microseconds), errors and refusals by kind, and how many requests each backend received; printed as a
//! table or JSON. A refusal is XBuy's answer that the shop said no (see [`Outcome::Refused`]): counted apart
//! from errors, since a sold-out flash sale is the shop working, not failing.
//! With an interval, also a timeline: requests, errors and backend shares per interval, so a user can watch
//! the split move while an instance slows down or recovers, within one client's lifetime.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use xcluster_sdk::{ClientState, Freshness};

/// Highest latency tracked, in microseconds (one hour); higher values are clamped.
const MAX_US: u64 = 3_600_000_000;

/// One finished request.
#[derive(Debug)]
pub struct Sample {
    /// Index of the request type in the mix.
    pub kind: usize,
    pub latency: Duration,
    /// Who served it (empty when no backend was reached).
    pub backend: String,
    pub outcome: Outcome,
    /// The answer came after the SDK retried the request on another instance (earlier attempts failed).
    pub retried: bool,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// A 2xx.
    Ok,
    /// XBuy's "no" to a valid request (402, 409, 429), by the code of its answer (`sold_out`,
    /// `insufficient_funds`, `limit_exceeded`...), or by its status (`status_409`) when the answer has none.
    Refused(String),
    /// Any other status (`status_503`), or no answer (`connect`, `timeout`, ...).
    Error(String),
}

impl Outcome {
    /// An answer's outcome: a refusal is named by XBuy's error code in `body` (`{"error":{"code":...}}`),
    /// as long as that is a short snake_case word (it becomes a report key).
    pub fn of_answer(status: u16, body: &[u8]) -> Self {
        match status {
            200..=299 => Self::Ok,
            402 | 409 | 429 => Self::Refused(error_code(body).unwrap_or_else(|| format!("status_{status}"))),
            _ => Self::Error(format!("status_{status}")),
        }
    }
}

/// The `error.code` of an XBuy error answer, if it is one.
fn error_code(body: &[u8]) -> Option<String> {
    const MAX_CODE: usize = 40;
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error")?.get("code")?.as_str()?;
    let word = |c: &str| {
        !c.is_empty() && c.len() <= MAX_CODE && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    };
    word(code).then(|| code.to_string())
}

#[derive(Debug)]
struct PerType {
    hist: Histogram<u64>,
    requests: u64,
    errors: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
    retried: u64,
    backends: BTreeMap<String, u64>,
}

/// Accumulates samples.
#[derive(Debug)]
pub struct Recorder {
    names: Vec<&'static str>,
    types: Vec<PerType>,
    /// The timeline's slot length, when one is kept.
    interval: Option<Duration>,
    /// One entry per elapsed interval (by the time a sample is recorded), grown as samples arrive.
    slots: Vec<Slot>,
}

#[derive(Debug, Default, Clone)]
struct Slot {
    requests: u64,
    errors: u64,
    /// Requests per backend, per request type (indexed as the mix): a type's split can move against the
    /// others'. The slot's all-types counts are their sum.
    by_type: Vec<BTreeMap<String, u64>>,
}

/// Most timeline slots kept (a day at one per second); `xcluster load` refuses an interval that would need
/// more, and samples finishing later (past the deadline, within a timeout) go to the last one.
pub const MAX_SLOTS: u64 = 86_400;

/// The per-backend counts of several request types added up.
fn merged<'a>(per_type: impl IntoIterator<Item = &'a BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
    let mut all = BTreeMap::new();
    for counts in per_type {
        for (b, n) in counts {
            *all.entry(b.clone()).or_default() += n;
        }
    }
    all
}

/// Counts one more request for `backend` (none when empty), allocating its key only the first time.
fn bump(counts: &mut BTreeMap<String, u64>, backend: &str) {
    if backend.is_empty() {
        return;
    }
    match counts.get_mut(backend) {
        Some(n) => *n += 1,
        None => {
            counts.insert(backend.to_string(), 1);
        }
    }
}

impl Recorder {
    pub fn new(names: Vec<&'static str>) -> Self {
        let types = names
            .iter()
            .map(|_| PerType {
                hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid"),
                requests: 0,
                errors: BTreeMap::new(),
                refused: BTreeMap::new(),
                retried: 0,
                backends: BTreeMap::new(),
            })
            .collect();
        Self {
            names,
            types,
            interval: None,
            slots: Vec::new(),
        }
    }

    /// Also keeps a timeline with one slot per `interval` (zero keeps none).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = (!interval.is_zero()).then_some(interval);
        self
    }

    /// Records a sample that finished `at` after the run started.
    pub fn record(&mut self, s: Sample, at: Duration) {
        let Some(t) = self.types.get_mut(s.kind) else {
            return;
        };
        t.requests += 1;
        if let Some(iv) = self.interval {
            let i =
                usize::try_from((at.as_nanos() / iv.as_nanos()).min(u128::from(MAX_SLOTS - 1))).unwrap_or(0);
            if self.slots.len() <= i {
                let empty = Slot {
                    by_type: vec![BTreeMap::new(); self.names.len()],
                    ..Slot::default()
                };
                self.slots.resize(i + 1, empty);
            }
            let slot = &mut self.slots[i];
            slot.requests += 1;
            slot.errors += u64::from(matches!(s.outcome, Outcome::Error(_)));
            if let Some(counts) = slot.by_type.get_mut(s.kind) {
                bump(counts, &s.backend);
            }
        }
        bump(&mut t.backends, &s.backend);
        t.retried += u64::from(s.retried);
        match s.outcome {
            Outcome::Error(kind) => *t.errors.entry(kind).or_default() += 1,
            Outcome::Refused(kind) => *t.refused.entry(kind).or_default() += 1,
            Outcome::Ok => {
                let us = u64::try_from(s.latency.as_micros())
                    .unwrap_or(MAX_US)
                    .clamp(1, MAX_US);
                t.hist.saturating_record(us);
            }
        }
    }

    /// Requests, errors and refusals over all types.
    pub fn total(&self) -> (u64, u64, u64) {
        let requests = self.types.iter().map(|t| t.requests).sum();
        let errors = self.types.iter().map(|t| t.errors.values().sum::<u64>()).sum();
        let refused = self.types.iter().map(|t| t.refused.values().sum::<u64>()).sum();
        (requests, errors, refused)
    }

    /// The final report.
    pub fn report(&self, via: &str, mode: String, elapsed: Duration) -> Report {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let shares = |m: &BTreeMap<String, u64>| -> BTreeMap<String, Share> {
            let total: u64 = m.values().sum();
            m.iter()
                .map(|(k, v)| {
                    let share = if total == 0 { 0.0 } else { *v as f64 / total as f64 };
                    (k.clone(), Share { requests: *v, share })
                })
                .collect()
        };
        let types = self
            .names
            .iter()
            .zip(&self.types)
            .map(|(name, t)| {
                let h = &t.hist;
                let ok = h.len();
                // An empty histogram answers 0 for every figure; a type with no success has none to show.
                let q = |quantile: f64| (ok > 0).then(|| h.value_at_quantile(quantile));
                TypeReport {
                    request_type: name.to_string(),
                    requests: t.requests,
                    ok,
                    throughput_rps: ok as f64 / secs,
                    latency_us: Latency {
                        p50: q(0.5),
                        p90: q(0.9),
                        p99: q(0.99),
                        p999: q(0.999),
                        max: (ok > 0).then(|| h.max()),
                        mean: (ok > 0).then(|| h.mean()),
                    },
                    errors: t.errors.clone(),
                    refused: t.refused.clone(),
                    retried: t.retried,
                    backends: shares(&t.backends),
                }
            })
            .collect::<Vec<_>>();
        let (requests, errors, refused) = self.total();
        let timeline = self
            .interval
            .map(|iv| {
                self.slots
                    .iter()
                    .enumerate()
                    .map(|(i, slot)| Interval {
                        start_s: iv.as_secs_f64() * i as f64,
                        requests: slot.requests,
                        errors: slot.errors,
                        backends: shares(&merged(&slot.by_type)),
                        types: self
                            .names
                            .iter()
                            .zip(&slot.by_type)
                            .map(|(name, counts)| (name.to_string(), shares(counts)))
                            .collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Report {
            via: via.to_string(),
            mode,
            elapsed_s: elapsed.as_secs_f64(),
            requests,
            errors,
            refused,
            retried: self.types.iter().map(|t| t.retried).sum(),
            throughput_rps: (requests - errors - refused) as f64 / secs,
            types,
            backends: shares(&merged(self.types.iter().map(|t| &t.backends))),
            timeline,
            interrupted: false,
            released: None,
            lists: None,
        }
    }
}

/// One slot of the timeline: what finished between `start_s` and the next slot's start.
#[derive(Debug, Serialize)]
pub struct Interval {
    pub start_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub backends: BTreeMap<String, Share>,
    /// The backend shares of each request type's requests in the slot.
    pub types: BTreeMap<String, BTreeMap<String, Share>>,
}

#[derive(Debug, Serialize)]
pub struct Share {
    pub requests: u64,
    pub share: f64,
}

/// Latency figures of a type's 2xx responses; each is `None` (`-` in the table, `null` in JSON) when the type
/// had none, rather than a 0 that reads as "instant".
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    pub p999: Option<u64>,
    pub max: Option<u64>,
    pub mean: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct TypeReport {
    pub request_type: String,
    pub requests: u64,
    /// 2xx responses.
    pub ok: u64,
    /// 2xx responses per second.
    pub throughput_rps: f64,
    /// Latency of 2xx responses, microseconds.
    pub latency_us: Latency,
    pub errors: BTreeMap<String, u64>,
    /// The shop's "no" (insufficient funds, sold out, over the limit), by its error code: answers, not errors.
    pub refused: BTreeMap<String, u64>,
    /// Answers (any status) that came only after the SDK retried the request on another instance: its
    /// earlier attempts failed, which `errors` does not count since the request did not.
    pub retried: u64,
    pub backends: BTreeMap<String, Share>,
}

/// Everything `xcluster load` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub via: String,
    pub mode: String,
    pub elapsed_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub refused: u64,
    /// Answers that came after a retry, over all types.
    pub retried: u64,
    /// 2xx responses per second.
    pub throughput_rps: f64,
    pub types: Vec<TypeReport>,
    pub backends: BTreeMap<String, Share>,
    /// Per interval, when `--interval-ms` asked for it (empty otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Interval>,
    /// SIGINT or SIGTERM ended the run before its duration or request count.
    pub interrupted: bool,
    /// The run's unpaid orders: cancelled after it, or kept (`--keep-orders`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub released: Option<Released>,
    /// Through the SDK, how fresh its server lists were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lists: Option<Lists>,
}

/// Through the SDK: how long it served from lists no balancer vouched for (static stability), from its
/// [`ClientState`] sampled during the run. Without it a run through a cluster whose balancers were all down
/// read like one through a healthy cluster, though its weights were frozen.
#[derive(Debug, Default, Serialize)]
pub struct Lists {
    /// Seconds of the run during which some request type's list was static or expired (sampled).
    pub static_s: f64,
    /// The oldest such list seen: seconds since a balancer last vouched for it.
    pub max_age_s: f64,
    /// Some list passed the client's `max_staleness`, so its picks failed (`stale` errors).
    pub expired: bool,
}

impl Lists {
    /// Takes one sample of the client's state, standing for the `period` since the last.
    pub fn sample(&mut self, state: &ClientState, period: Duration) {
        let mut unvouched = false;
        for t in &state.types {
            let age = match t.freshness {
                Freshness::Live => continue,
                Freshness::Static { age } => age,
                Freshness::Expired { age } => {
                    self.expired = true;
                    age
                }
            };
            unvouched = true;
            self.max_age_s = self.max_age_s.max(age.as_secs_f64());
        }
        if unvouched {
            self.static_s += period.as_secs_f64();
        }
    }
}

/// The run's clean-up: the orders it placed and did not pay, cancelled so their stock is free again.
#[derive(Debug, Default, Serialize)]
pub struct Released {
    pub cancelled: u64,
    /// Not cancelled: an error, a refusal, or no time left.
    pub failed: u64,
    /// Not remembered (more unpaid orders than the run keeps ids of); they hold their stock until the app's
    /// reservation time is up.
    pub forgotten: u64,
    /// Left as they are (`--keep-orders`): they hold their stock until paid, cancelled or expired.
    pub kept: u64,
    /// Order requests whose answer was lost (an error, a timeout, a 5xx), asked again under their keys before
    /// the cancels: the orders they placed are among those cancelled (or failed); with `--keep-orders`, not
    /// asked again, and among `kept`.
    pub asked_again: u64,
}

/// One timeline line's backend shares, and its end.
fn share_cells(out: &mut String, shares: &BTreeMap<String, Share>) {
    for (b, s) in shares {
        *out += &format!("  {b} {:>5.1}%", s.share * 100.0);
    }
    out.push('\n');
}

/// Microseconds as milliseconds, or `-` for a figure that does not exist.
fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".to_string(), |us| format!("{:.2}", us as f64 / 1000.0))
}

impl Report {
    /// The human-readable table.
    pub fn text(&self) -> String {
        let mut out = format!(
            "via {} ({}): {} requests in {:.2}s, {} errors, {} refused, {:.1} ok/s{}\n\n",
            self.via,
            self.mode,
            self.requests,
            self.elapsed_s,
            self.errors,
            self.refused,
            self.throughput_rps,
            if self.interrupted { " (interrupted)" } else { "" }
        );
        out += &format!(
            "{:<10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "type",
            "requests",
            "ok/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "errors",
            "refused"
        );
        for t in &self.types {
            let l = &t.latency_us;
            out += &format!(
                "{:<10} {:>8} {:>8.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                t.request_type,
                t.requests,
                t.throughput_rps,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                t.errors.values().sum::<u64>(),
                t.refused.values().sum::<u64>()
            );
            for (kind, n) in &t.errors {
                out += &format!("    error {kind}: {n}\n");
            }
            for (kind, n) in &t.refused {
                out += &format!("    refused {kind}: {n}\n");
            }
            if t.retried > 0 {
                out += &format!(
                    "    retried: {} (answered after an attempt on another instance failed)\n",
                    t.retried
                );
            }
        }
        if let Some(l) = self.lists.as_ref().filter(|l| l.static_s > 0.0) {
            out += &format!(
                "\nno balancer vouched for the server lists for {:.1}s of the run: the SDK served from its last \
                 lists (the oldest {:.1}s old){}\n",
                l.static_s,
                l.max_age_s,
                if l.expired {
                    ", some past max_staleness (their picks failed as stale)"
                } else {
                    ""
                }
            );
        }
        match &self.released {
            Some(r) if r.kept > 0 => {
                out += &format!(
                    "\nunpaid orders kept: {} (each holds its stock until paid, cancelled, or expired after the \
                     app's reservation_ttl_ms)\n",
                    r.kept
                );
            }
            Some(r) if r.cancelled + r.failed + r.forgotten > 0 => {
                out += &format!(
                    "\nunpaid orders cancelled after the run: {} ({} failed, {} forgotten; --keep-orders keeps them)\n",
                    r.cancelled, r.failed, r.forgotten
                );
                if r.asked_again > 0 {
                    out += &format!(
                        "order requests whose answer was lost, asked again under their keys first: {}\n",
                        r.asked_again
                    );
                }
            }
            _ => {}
        }
        out += "\nbackend share (all types):\n";
        for (b, s) in &self.backends {
            out += &format!("  {b:<28} {:>8} {:>6.1}%\n", s.requests, s.share * 100.0);
        }
        if !self.timeline.is_empty() {
            out += "\ntimeline (backend shares per interval):\n";
            for iv in &self.timeline {
                out += &format!(
                    "  {:>7.1}s {:>7} req {:>5} err ",
                    iv.start_s, iv.requests, iv.errors
                );
                share_cells(&mut out, &iv.backends);
                // Each type's own split, when there is more than one: a cheap type may make room for an
                // expensive one, which the all-types shares above would show as an imbalance.
                if iv.types.len() > 1 {
                    for (ty, shares) in iv.types.iter().filter(|(_, m)| !m.is_empty()) {
                        out += &format!("  {:>29} ", ty);
                        share_cells(&mut out, shares);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_counts_percentiles_errors_and_shares() {
        let mut r = Recorder::new(vec!["browse"]);
        for i in 1..=100u64 {
            r.record(
                Sample {
                    kind: 0,
                    latency: Duration::from_millis(i),
                    backend: if i % 4 == 0 { "b".into() } else { "a".into() },
                    outcome: match i {
                        99.. => Outcome::of_answer(503, b""),
                        ..=5 => Outcome::of_answer(409, b""),
                        _ => Outcome::Ok,
                    },
                    retried: i == 50 || i == 99,
                },
                Duration::ZERO,
            );
        }
        let rep = r.report("rr", "closed".into(), Duration::from_secs(1));
        let t = &rep.types[0];
        // A refusal is neither a success (its latency stays out of the histogram) nor an error.
        assert_eq!((t.requests, t.ok), (100, 93));
        assert_eq!(t.errors["status_503"], 2);
        assert_eq!(t.refused["status_409"], 5);
        assert_eq!((rep.errors, rep.refused), (2, 5));
        // Answers after a retry are counted whatever they were: a retry hides a failure from `errors`.
        assert_eq!((t.retried, rep.retried), (2, 2));
        assert!((rep.throughput_rps - 93.0).abs() < 1e-9);
        // The successes took 6..=98 ms.
        let p50 = t.latency_us.p50.unwrap_or_default();
        assert!((51_000..=53_000).contains(&p50), "{p50}");
        assert!(t.latency_us.max.unwrap_or_default() >= 97_000);
        assert_eq!(rep.backends["b"].requests, 25);
        assert!((rep.backends["a"].share - 0.75).abs() < 1e-9);
        let text = rep.text();
        assert!(text.contains("error status_503: 2"), "{text}");
        assert!(text.contains("refused status_409: 5"), "{text}");
        assert!(text.contains("2 errors, 5 refused, 93.0 ok/s"), "{text}");
        assert!(text.contains("retried: 2 (answered after"), "{text}");
        assert!(rep.timeline.is_empty(), "no timeline unless asked");
    }

    /// A type whose every request failed has no latency: `-` in the table and `null` in JSON, not 0.00
    /// (which reads as instant answers), while a type with successes beside it keeps its figures.
    #[test]
    fn a_type_with_no_success_shows_no_latency() {
        let mut r = Recorder::new(vec!["browse", "order"]);
        let sample = |kind: usize, outcome: Outcome| Sample {
            kind,
            latency: Duration::from_millis(3),
            backend: "a".into(),
            outcome,
            retried: false,
        };
        r.record(sample(0, Outcome::Ok), Duration::ZERO);
        for _ in 0..4 {
            r.record(sample(1, Outcome::Error("timeout".into())), Duration::ZERO);
        }
        r.record(sample(1, Outcome::of_answer(409, b"")), Duration::ZERO);
        let rep = r.report("sdk", "closed".into(), Duration::from_secs(1));
        let json = serde_json::to_value(&rep).unwrap_or_default();
        let order = &json["types"][1]["latency_us"];
        for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(order[k].is_null(), "order {k}: {order}");
        }
        assert_eq!(
            json["types"][0]["latency_us"]["p50"].as_u64().map(|us| us / 1000),
            Some(3)
        );
        let text = rep.text();
        let line = |ty: &str| {
            text.lines()
                .find(|l| l.starts_with(ty))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        // type, requests, ok/s, five latencies, errors, refused.
        assert_eq!(line("order")[3..8], ["-"; 5], "{text}");
        assert!(!text.contains("0.00 "), "{text}");
        assert_eq!(line("browse")[3..8], ["3.00"; 5], "{text}");
    }

    /// Samples of the SDK's state add up the time its lists went unvouched, and the report says so.
    #[test]
    fn unvouched_lists_are_counted_and_told() {
        let state = |freshness| ClientState {
            balancers: Vec::new(),
            types: vec![xcluster_sdk::TypeState {
                request_type: "browse".into(),
                version: 1,
                servers: 1,
                ejected: Vec::new(),
                balancer: None,
                freshness,
                retries_throttled: false,
            }],
        };
        let mut l = Lists::default();
        let tick = Duration::from_millis(100);
        l.sample(&state(Freshness::Live), tick);
        assert_eq!(l.static_s, 0.0);
        for age in [1, 2] {
            let age = Duration::from_secs(age);
            l.sample(&state(Freshness::Static { age }), tick);
        }
        assert!((l.static_s - 0.2).abs() < 1e-9 && (l.max_age_s - 2.0).abs() < 1e-9);
        assert!(!l.expired);
        let mut rep = Recorder::new(vec!["browse"]).report("sdk", "closed".into(), Duration::from_secs(1));
        rep.lists = Some(l);
        assert!(
            rep.text()
                .contains("no balancer vouched for the server lists for 0.2s"),
            "{}",
            rep.text()
        );
        assert!(!rep.text().contains("max_staleness"));
    }

    /// The run's unpaid orders are accounted for: cancelled, or kept with what that holds.
    #[test]
    fn the_report_says_what_became_of_unpaid_orders() {
        let mut rep = Recorder::new(vec!["order"]).report("sdk", "closed".into(), Duration::from_secs(1));
        assert!(!rep.text().contains("unpaid orders"), "nothing placed");
        rep.released = Some(Released {
            cancelled: 7,
            failed: 1,
            ..Default::default()
        });
        assert!(
            rep.text()
                .contains("unpaid orders cancelled after the run: 7 (1 failed, 0 forgotten")
        );
        rep.released = Some(Released {
            kept: 5,
            ..Default::default()
        });
        assert!(
            rep.text().contains("unpaid orders kept: 5 (each holds its stock"),
            "{}",
            rep.text()
        );
    }

    #[test]
    fn a_refusal_is_named_by_xbuys_error_code() {
        let refused = |status, body: &str| match Outcome::of_answer(status, body.as_bytes()) {
            Outcome::Refused(kind) => kind,
            other => panic!("{other:?}"),
        };
        let answer = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
        assert_eq!(refused(409, &answer("sold_out")), "sold_out");
        assert_eq!(refused(402, &answer("insufficient_funds")), "insufficient_funds");
        // No code, or one that is no plain word: the status.
        assert_eq!(refused(409, "not json"), "status_409");
        assert_eq!(refused(429, r#"{"error":{}}"#), "status_429");
        assert_eq!(refused(409, &answer("Sold Out<b>")), "status_409");
        assert_eq!(refused(409, &answer(&"a".repeat(41))), "status_409");
        assert!(
            matches!(Outcome::of_answer(503, answer("overloaded").as_bytes()), Outcome::Error(e) if e == "status_503")
        );
    }

    #[test]
    fn only_xbuy_refusals_are_refusals() {
        for (status, refused) in [
            (402, true),
            (409, true),
            (429, true),
            (400, false),
            (404, false),
            (503, false),
        ] {
            assert_eq!(
                matches!(Outcome::of_answer(status, b""), Outcome::Refused(_)),
                refused,
                "{status}"
            );
        }
    }

    #[test]
    fn timeline_splits_shares_by_interval() {
        let mut r = Recorder::new(vec!["browse", "order"]).with_interval(Duration::from_secs(1));
        let sample = |kind: usize, backend: &str, error: bool| Sample {
            kind,
            latency: Duration::from_millis(1),
            backend: backend.into(),
            outcome: if error {
                Outcome::Error("timeout".to_string())
            } else {
                Outcome::Ok
            },
            retried: false,
        };
        // Second 0: all browse to a, one order to b. Second 1: nothing. Second 2: a quarter to a, one error.
        for _ in 0..4 {
            r.record(sample(0, "a", false), Duration::from_millis(500));
        }
        r.record(sample(1, "b", false), Duration::from_millis(700));
        r.record(sample(0, "a", false), Duration::from_millis(2100));
        for _ in 0..3 {
            r.record(sample(0, "b", false), Duration::from_millis(2900));
        }
        r.record(sample(0, "", true), Duration::from_millis(2950));
        let rep = r.report("sdk", "open".into(), Duration::from_secs(3));
        let tl = &rep.timeline;
        assert_eq!(tl.len(), 3);
        assert_eq!((tl[0].requests, tl[1].requests, tl[2].requests), (5, 0, 5));
        assert!((tl[0].backends["a"].share - 0.8).abs() < 1e-9);
        assert!((tl[0].types["browse"]["a"].share - 1.0).abs() < 1e-9);
        assert!((tl[0].types["order"]["b"].share - 1.0).abs() < 1e-9);
        assert!(!tl[0].types["order"].contains_key("a"));
        assert!(tl[1].backends.is_empty() && tl[1].types["order"].is_empty());
        assert!((tl[2].backends["a"].share - 0.25).abs() < 1e-9);
        assert_eq!(tl[2].errors, 1);
        assert!((tl[2].start_s - 2.0).abs() < 1e-9);
        let text = rep.text();
        assert!(text.contains("timeline"));
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("order") && l.contains("b 100.0%")),
            "each type's split per interval:\n{text}"
        );
    }
}
