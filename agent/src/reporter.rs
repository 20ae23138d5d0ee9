//! The report loop: samples every instance's stats every `sample_ms`, and pushes a signed report to every
//! balancer every `interval_ms`, or at once when a figure jumps (an instance turning ready or unready, its
//! queue doubling, its error rate leaping). Each push runs in its own task under a timeout, so a dead
//! balancer never delays the others or the next report.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use xcluster_proto::report::{
    self, AGENT_HEADER, InstanceLoad, LoadReport, MAX_REPORT_BYTES, Refusal, SIGNATURE_HEADER,
};
use xcluster_proto::stats::{InstanceStats, MAX_STATS_BYTES};

use crate::config::{Config, InstanceConfig};
use crate::host::{self, HostSampler};
use crate::metrics;
use xcluster_runtime::client;

/// Least time between two early (jump) reports, so a flapping instance cannot flood the balancers.
const MIN_EARLY_GAP: Duration = Duration::from_millis(50);

/// Whether an instance's figures changed enough since the last report to send a new one at once.
pub fn jumped(prev: &InstanceLoad, cur: &InstanceLoad) -> bool {
    let held = |i: &InstanceLoad| u64::from(i.in_flight) + u64::from(i.queued);
    let (p, c) = (held(prev), held(cur));
    prev.ready != cur.ready || (c >= 2 * p && c >= p + 4) || cur.error_rate - prev.error_rate >= 0.2
}

/// Whether any instance jumped, appeared or disappeared.
pub fn any_jump(prev: &[InstanceLoad], cur: &[InstanceLoad]) -> bool {
    prev.len() != cur.len() || prev.iter().zip(cur).any(|(p, c)| p.id != c.id || jumped(p, c))
}

/// Turns an instance's stats document into the instance part of a report.
pub fn to_load(inst: &InstanceConfig, s: InstanceStats) -> InstanceLoad {
    InstanceLoad {
        id: inst.id.clone(),
        addr: inst.addr.to_string(),
        ready: s.ready,
        in_flight: s.in_flight,
        queued: s.queued,
        capacity: s.capacity,
        queue_depth: s.queue_depth,
        request_rate: s.request_rate,
        error_rate: s.error_rate,
        types: s.types,
        proc_cpu: 0.0,
        rss_bytes: 0,
    }
}

/// An instance that could not be sampled: reported, but not ready.
fn unreachable_load(inst: &InstanceConfig) -> InstanceLoad {
    InstanceLoad {
        id: inst.id.clone(),
        addr: inst.addr.to_string(),
        ..Default::default()
    }
}

async fn fetch(inst: &InstanceConfig, timeout: Duration) -> Result<InstanceLoad, String> {
    let body = client::call(
        inst.stats_addr,
        Method::GET,
        &inst.stats_path,
        &[],
        Bytes::new(),
        MAX_STATS_BYTES,
        timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let stats: InstanceStats = serde_json::from_slice(&body).map_err(|e| format!("bad stats JSON: {e}"))?;
    stats.validate().map_err(|e| e.to_string())?;
    Ok(to_load(inst, stats))
}

/// Each instance's stats fetches, one task each, so that one instance that accepts and never answers holds
/// back no report: a round waits for the fetches at most its tick, and an instance whose fetch still runs
/// is reported as it was last sampled (its fetch fails within `timeout_ms`, and it turns not ready then).
/// Waited for together, one such instance held every report of its host back by `timeout_ms`, and past the
/// balancers' `report_ttl_ms` the host's healthy instances left the lists.
#[derive(Default)]
struct Samples {
    /// Per instance, by position in the config: its fetch running now, its last sample, and whether its
    /// last fetch failed (warned once per streak).
    slots: Vec<Slot>,
}

#[derive(Default)]
struct Slot {
    running: Option<tokio::task::JoinHandle<Result<InstanceLoad, String>>>,
    last: Option<InstanceLoad>,
    failing: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(task) = &self.running {
            task.abort();
        }
    }
}

impl Samples {
    /// Follows a new config (`new`, after `old`): an instance it names unchanged (id, address, stats
    /// endpoint) keeps its slot, its last sample and its fetch; the others start afresh. Every slot was
    /// dropped at each new config (a log level change too), so the next round reported each instance whose
    /// fetch outlasted its tick as not ready, and every balancer slow-started it again.
    fn follow(&mut self, old: &[InstanceConfig], new: &[InstanceConfig]) {
        let mut kept: Vec<Option<Slot>> = std::mem::take(&mut self.slots).into_iter().map(Some).collect();
        self.slots = (new.iter())
            .map(|inst| {
                (old.iter().position(|o| o == inst))
                    .and_then(|i| kept.get_mut(i)?.take())
                    .unwrap_or_default()
            })
            .collect();
    }

    /// A sample of every configured instance: the fetches that end within `wait` give new ones.
    async fn round(&mut self, cfg: &Config, wait: Duration) -> Vec<InstanceLoad> {
        self.slots.resize_with(cfg.instances.len(), Slot::default);
        for (slot, inst) in self.slots.iter_mut().zip(&cfg.instances) {
            if slot.running.is_none() {
                let (inst, timeout) = (inst.clone(), cfg.timeout);
                slot.running = Some(tokio::spawn(async move { fetch(&inst, timeout).await }));
            }
        }
        let deadline = Instant::now() + wait;
        for (slot, inst) in self.slots.iter_mut().zip(&cfg.instances) {
            let Some(task) = slot.running.as_mut() else {
                continue;
            };
            let Ok(done) = tokio::time::timeout_at(deadline, task).await else {
                continue;
            };
            slot.running = None;
            let sampled = match done.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(l) => {
                    slot.failing = false;
                    l
                }
                Err(e) => {
                    ::metrics::counter!(metrics::STATS_FAILURES_TOTAL, "instance_id" => inst.id.clone())
                        .increment(1);
                    // Warn on the transition only; repeat failures go to debug.
                    if !slot.failing {
                        warn!(instance = %inst.id, error = %e, "cannot sample instance; reporting it not ready");
                    } else {
                        debug!(instance = %inst.id, error = %e, "cannot sample instance");
                    }
                    slot.failing = true;
                    unreachable_load(inst)
                }
            };
            slot.last = Some(sampled);
        }
        (self.slots.iter().zip(&cfg.instances))
            // Never sampled yet (its first fetch still runs): not ready until it answers.
            .map(|(slot, inst)| slot.last.clone().unwrap_or_else(|| unreachable_load(inst)))
            .collect()
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall clock in µs, as sequence numbers start.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// Runs the loop until `cancel` fires. The latest report is published on `latest` (for `/v1/report`).
pub async fn run(
    config: watch::Receiver<Arc<Config>>,
    latest: watch::Sender<Option<LoadReport>>,
    cancel: CancellationToken,
) {
    let mut host = HostSampler::default();
    host.sample(&[]); // Prime the CPU delta.
    // The first report's CPU figure measured over a real interval: a round's fetches often end within
    // milliseconds, too few ticks for a figure (`host::MIN_TICKS_PER_CORE`), and the first report carried
    // the average since boot (10% on a host busy at 95% since a deploy began), which a balancer that had no
    // weight for the instances took at once.
    tokio::select! {
        () = tokio::time::sleep(crate::host::FIRST_FIGURE_AFTER) => {}
        () = cancel.cancelled() => return,
    }
    // Sequence numbers start at the wall clock in µs, so they keep increasing across restarts.
    let mut seq = wall_us();
    // This process, for the balancers: a restart reads as one, a second agent under our id as a conflict.
    let boot = seq;
    let pushes = Arc::new(PushLog::default());
    let mut last_sent: Vec<InstanceLoad> = Vec::new();
    let mut samples = Samples::default();
    let mut next_due = Instant::now();
    let mut last_push = Instant::now() - Duration::from_secs(1);
    let mut reports_sent = 0u64;
    let mut counted: Option<Arc<Config>> = None;
    loop {
        let cfg = config.borrow().clone();
        if !counted.as_ref().is_some_and(|c| Arc::ptr_eq(c, &cfg)) {
            // Each instance's failures at 0 from the first config naming it, so `rate()` and the alert on
            // them see the first one.
            for inst in &cfg.instances {
                ::metrics::counter!(metrics::STATS_FAILURES_TOTAL, "instance_id" => inst.id.clone())
                    .increment(0);
            }
            let old = counted.as_ref().map_or(&[][..], |c| &c.instances[..]);
            samples.follow(old, &cfg.instances);
            counted = Some(cfg.clone());
        }
        let tick = cfg.sample.min(cfg.interval);
        let current = samples.round(&cfg, tick).await;
        let now = Instant::now();
        // The first report is not a jump: there is nothing to compare with yet.
        let jump = reports_sent > 0 && any_jump(&last_sent, &current);
        let early = now < next_due && jump && now - last_push >= MIN_EARLY_GAP;
        if now >= next_due || early {
            if jump {
                ::metrics::counter!(metrics::JUMP_REPORTS_TOTAL).increment(1);
            }
            seq = seq.max(pushes.seq_floor()) + 1;
            reports_sent += 1;
            let report = build(&cfg, &mut host, (seq, boot), current.clone());
            push_all(&cfg, &report, &pushes);
            let _ = latest.send_replace(Some(report));
            last_sent = current;
            last_push = now;
            next_due = now + cfg.interval;
        }
        let wake = (Instant::now() + tick).min(next_due);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

fn build(
    cfg: &Config,
    host: &mut HostSampler,
    (seq, boot): (u64, u64),
    mut instances: Vec<InstanceLoad>,
) -> LoadReport {
    // Each instance's process, if it names a pid file: the host figures need them first (`sample`).
    let found: Vec<Option<u32>> = (cfg.instances.iter())
        .map(|inst| inst.pid_file.as_deref().and_then(host::read_pid_file))
        .collect();
    let pids: Vec<u32> = found.iter().flatten().copied().collect();
    let h = host.sample(&pids);
    ::metrics::gauge!(metrics::HOST_CPU).set(h.cpu);
    for (load, pid) in instances.iter_mut().zip(&found) {
        if let Some((cpu, rss)) = pid.and_then(|pid| host.process(pid)) {
            load.proc_cpu = cpu;
            load.rss_bytes = rss;
        }
    }
    host.retain_pids(&pids);
    ::metrics::counter!(metrics::REPORTS_TOTAL).increment(1);
    LoadReport {
        agent: cfg.agent_id.clone(),
        seq,
        boot,
        timestamp_ms: wall_ms(),
        host: h,
        instances,
    }
}

/// Which balancers refuse or miss our reports, so a failure is logged when it starts (and every
/// [`PUSH_WARN_EVERY`] while it lasts) and its end once, not at every report.
#[derive(Debug)]
struct PushLog {
    /// When this process began reporting: for a while a balancer may still hear its predecessor.
    started: Instant,
    failing: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Instant>>,
    /// When a report not sent was last logged.
    unsent: xcluster_runtime::telemetry::Throttle,
    /// The highest sequence number a balancer has refused as not above one it accepted from this agent id:
    /// the next report is numbered above it.
    seq_floor: std::sync::atomic::AtomicU64,
    /// When a balancer's sequence number too far above ours was last logged.
    far_ahead: xcluster_runtime::telemetry::Throttle,
    /// Each balancer's pushes in flight ([`push_all`]).
    lanes: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Lane>>,
}

/// How far above the wall clock (in µs, as sequence numbers start) a balancer's last number may be for us to
/// continue above it: a day. A clock stepped back by more than that is a host to fix, and a number past it
/// is no answer of ours to follow.
const MAX_SEQ_CATCH_UP: u64 = 86_400 * 1_000_000;

const PUSH_WARN_EVERY: Duration = Duration::from_secs(30);

impl Default for PushLog {
    fn default() -> Self {
        PushLog {
            started: Instant::now(),
            failing: Default::default(),
            unsent: Default::default(),
            seq_floor: Default::default(),
            far_ahead: Default::default(),
            lanes: Default::default(),
        }
    }
}

impl PushLog {
    /// A refusal as a second agent under our id (`conflict`) in our first `grace`: the balancer heard our
    /// predecessor (a restart) too lately to take us over yet, which it does within two of its report
    /// intervals. Logged at DEBUG then: at WARN, every clean restart logged one per balancer that looked
    /// like a fault; a conflict past it (a copied config) is warned about.
    fn restarting(&self, refusal: Option<&Refusal>, grace: Duration) -> bool {
        self.started.elapsed() < grace && refusal.is_some_and(Refusal::is_conflict)
    }

    fn failed(&self, balancer: std::net::SocketAddr, error: &str) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = failing
            .get(&balancer)
            .is_none_or(|last| now.duration_since(*last) >= PUSH_WARN_EVERY);
        if due {
            failing.insert(balancer, now);
            warn!(balancer = %balancer, error, "load report not accepted (logged again every 30 s while it lasts)");
        } else {
            debug!(balancer = %balancer, error, "report push failed");
        }
    }

    /// A balancer refused report `seq` as a replay, having accepted `last` from this agent id: a run of
    /// ours before the clock stepped back, most likely, so the next report is numbered above it. Before,
    /// the balancers refused this run until they forgot the id (`forget_after_ms`), its instances out of
    /// every list. The refusal is not signed, so what it names is bounded by the wall clock (`now_us`, in
    /// µs as the numbers start), not by our own number: bounded by ours, anything answering at a
    /// balancer's address could raise it a day per report, years within an hour, which the balancers then
    /// accepted, and this agent's next run, numbered from the clock, was refused until they forgot it.
    fn replayed(&self, balancer: std::net::SocketAddr, seq: u64, last: u64, now_us: u64) {
        use std::sync::atomic::Ordering;
        if last > now_us.saturating_add(MAX_SEQ_CATCH_UP) {
            if self.far_ahead.due(wall_ms(), UNSENT_WARN_EVERY_MS) {
                error!(%balancer, seq, last, "a balancer has accepted sequence numbers from this agent id more                     than a day above ours: another agent shares the id, or this host's clock is a day behind;                     not followed (logged again every 30 s while it lasts)");
            }
            return;
        }
        if self.seq_floor.fetch_max(last, Ordering::Relaxed) < last {
            tracing::info!(%balancer, seq, last, "a balancer has accepted higher sequence numbers from this                 agent id (an earlier run, before the clock stepped back); numbering the next report above them");
        }
    }

    /// The number the next report's must be above.
    fn seq_floor(&self) -> u64 {
        self.seq_floor.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn accepted(&self, balancer: std::net::SocketAddr) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.remove(&balancer).is_some() {
            tracing::info!(balancer = %balancer, "load reports accepted again");
        }
    }
}

/// Why a report was not sent.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode the load report: {0}")]
    Json(#[from] serde_json::Error),
    /// The instances and their request types come from the apps' stats, so the config cannot bound them:
    /// the encoded report is what is checked.
    #[error(
        "the load report is {bytes} bytes, over the {MAX_REPORT_BYTES} bytes a balancer takes (MAX_REPORT_BYTES): \
         every balancer would refuse it, so it is not sent and the balancers take this host's instances out \
         when their last report expires; report fewer instances from this agent ({instances} now: split \
         [[instances]] across agents) or fewer request types per instance (up to {types} now, on {widest})"
    )]
    TooLarge {
        bytes: usize,
        instances: usize,
        types: usize,
        widest: String,
    },
}

/// Every `reason` of `xcluster_agent_reports_unsent_total` ([`EncodeError::reason`]), so each series is on
/// `/metrics` at 0 from the start.
pub const UNSENT_REASONS: [&str; 2] = ["encode", "too_large"];

impl EncodeError {
    /// Its `reason` label in `xcluster_agent_reports_unsent_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            EncodeError::Json(_) => UNSENT_REASONS[0],
            EncodeError::TooLarge { .. } => UNSENT_REASONS[1],
        }
    }
}

/// The body a report is sent as, if a balancer can take it (at most [`MAX_REPORT_BYTES`]).
pub fn encode(report: &LoadReport) -> Result<Bytes, EncodeError> {
    let body = serde_json::to_vec(report)?;
    if body.len() > MAX_REPORT_BYTES {
        let widest = report.instances.iter().max_by_key(|i| i.types.len());
        return Err(EncodeError::TooLarge {
            bytes: body.len(),
            instances: report.instances.len(),
            types: widest.map_or(0, |i| i.types.len()),
            widest: widest.map_or_else(String::new, |i| i.id.clone()),
        });
    }
    Ok(Bytes::from(body))
}

/// Least time between two logs of a report not sent.
const UNSENT_WARN_EVERY_MS: u64 = 30_000;

/// Signs the report once and pushes it to every balancer, each in its own task with its own timeout. A
/// report no balancer would take is not sent: it is counted, and logged every 30 s while it lasts (one
/// answer 413 per balancer and report said less, at every report).
fn push_all(cfg: &Config, report: &LoadReport, log: &Arc<PushLog>) {
    let body = match encode(report) {
        Ok(b) => b,
        Err(e) => {
            ::metrics::counter!(metrics::REPORTS_UNSENT_TOTAL, "reason" => e.reason()).increment(1);
            if log.unsent.due(wall_ms(), UNSENT_WARN_EVERY_MS) {
                error!(error = %e, "load report not sent (logged again every 30 s while it lasts)");
            }
            return;
        }
    };
    let push = Arc::new(Push {
        sig: Arc::from(report::sign(cfg.key.signing(), &body)),
        body,
        // Names the signer, so a balancer that gives this agent its own key checks the signature with it.
        agent: Arc::from(report.agent.as_str()),
        seq: report.seq,
        timeout: cfg.timeout,
        // Our predecessor is taken over once it has been silent two of its intervals.
        grace: cfg.interval * 2 + Duration::from_secs(1),
    });
    for &addr in &cfg.balancers {
        // One push at a time to each balancer, the latest report waiting for the one in flight (and taking
        // the place of any other waiting). Pushed each in a task of its own, reports 50 ms apart (an early
        // one) overtook one another on a slow link or balancer, and the older was refused as a replay and
        // warned about on both sides; a silent balancer held a socket per report for `timeout_ms`.
        let mut lanes = log.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let lane = lanes.entry(addr).or_default();
        if lane.busy {
            if lane.waiting.replace(push.clone()).is_some() {
                ::metrics::counter!(metrics::REPORTS_SUPERSEDED_TOTAL).increment(1);
            }
            continue;
        }
        lane.busy = true;
        drop(lanes);
        let (log, mut push) = (log.clone(), push.clone());
        tokio::spawn(async move {
            loop {
                send(addr, &push, &log).await;
                let mut lanes = log.lanes.lock().unwrap_or_else(|e| e.into_inner());
                let lane = lanes.entry(addr).or_default();
                match lane.waiting.take() {
                    Some(next) => push = next,
                    None => {
                        lane.busy = false;
                        // A balancer no longer configured leaves no entry behind.
                        lanes.remove(&addr);
                        return;
                    }
                }
            }
        });
    }
}

/// One signed report, as pushed to each balancer.
#[derive(Debug)]
struct Push {
    body: Bytes,
    sig: Arc<str>,
    agent: Arc<str>,
    seq: u64,
    timeout: Duration,
    grace: Duration,
}

/// A balancer's pushes: whether one is in flight, and the latest report waiting for it.
#[derive(Debug, Default)]
struct Lane {
    busy: bool,
    waiting: Option<Arc<Push>>,
}

/// Pushes `push` to the balancer at `addr`, and notes how it went.
async fn send(addr: std::net::SocketAddr, push: &Push, log: &PushLog) {
    let headers = [(SIGNATURE_HEADER, &*push.sig), (AGENT_HEADER, &*push.agent)];
    let r = client::call(
        addr,
        Method::POST,
        "/v1/reports",
        &headers,
        push.body.clone(),
        16 * 1024,
        push.timeout,
    )
    .await;
    let result = if r.is_ok() { "ok" } else { "error" };
    ::metrics::counter!(metrics::PUSHES_TOTAL, "balancer" => addr.to_string(), "result" => result)
        .increment(1);
    let (seq, grace) = (push.seq, push.grace);
    match r {
        Ok(_) => log.accepted(addr),
        Err(e) => {
            // A 409's body says which: a replay names the last number accepted, a conflict may be
            // our predecessor still heard.
            let refusal = match &e {
                client::CallError::Status {
                    status: http::StatusCode::CONFLICT,
                    body,
                    ..
                } => Refusal::decode(body.as_bytes()),
                _ => None,
            };
            if let Some(last) = refusal.as_ref().and_then(Refusal::replay_last_seq) {
                log.replayed(addr, seq, last, wall_us());
            }
            if log.restarting(refusal.as_ref(), grace) {
                debug!(balancer = %addr, error = %e, "report refused while the balancer still hears our predecessor");
            } else {
                log.failed(addr, &e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conflict in the first moments of a run is our predecessor still heard (quiet); later, or another
    /// refusal, is a fault (warned).
    #[test]
    fn a_conflict_right_after_a_start_is_a_restart_not_a_fault() {
        let log = PushLog::default();
        use xcluster_proto::report::ReportError;
        // As the balancer's answer carries it.
        let refusal = |e: ReportError| Refusal::decode(&serde_json::to_vec(&e.refusal()).unwrap());
        let conflict = refusal(ReportError::Conflict {
            agent: "h".into(),
            boot: 2,
            live_boot: 1,
            silent_ms: 10,
        });
        let replay = refusal(ReportError::Replay {
            agent: "h".into(),
            seq: 1,
            last: 2,
        });
        assert!(log.restarting(conflict.as_ref(), Duration::from_secs(60)));
        assert!(!log.restarting(replay.as_ref(), Duration::from_secs(60)));
        assert!(
            !log.restarting(conflict.as_ref(), Duration::ZERO),
            "past the grace"
        );
    }

    /// A replay refusal's last number is followed up to a day above the clock, never further, and never
    /// down; and no run of refusals, each a day above the number before, takes it past that.
    #[test]
    fn a_balancers_last_number_is_followed_within_a_day_of_the_clock() {
        let log = PushLog::default();
        let b: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let now = 1_000;
        log.replayed(b, 1_000, 5_000, now);
        assert_eq!(log.seq_floor(), 5_000);
        log.replayed(b, 1_000, 3_000, now);
        assert_eq!(log.seq_floor(), 5_000, "never down");
        log.replayed(b, 1_000, now + MAX_SEQ_CATCH_UP + 1, now);
        assert_eq!(
            log.seq_floor(),
            5_000,
            "more than a day above the clock is not followed"
        );
        log.replayed(b, 1_000, now + MAX_SEQ_CATCH_UP, now);
        assert_eq!(log.seq_floor(), now + MAX_SEQ_CATCH_UP);
        // Unsigned refusals, each naming a day above the number it refused: followed no further.
        for _ in 0..100 {
            let seq = log.seq_floor() + 1;
            log.replayed(b, seq, seq + MAX_SEQ_CATCH_UP, now);
        }
        assert_eq!(log.seq_floor(), now + MAX_SEQ_CATCH_UP);
    }

    /// An instance that accepts and never answers holds back no sample of the others: a round waits at
    /// most its wait, reports the answering one, and the silent one as not ready until it answers. Waited
    /// for together, every report waited for its `timeout_ms` (here a minute).
    #[tokio::test]
    async fn a_silent_instance_holds_back_no_sample() {
        let a = answering(usize::MAX).await;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = silent.local_addr().unwrap();
        let text = format!(
            "balancers = [\"127.0.0.1:9\"]\nkey = \"0123456789abcdef\"\ntimeout_ms = 60000\n\
             [[instances]]\nid = \"h/a\"\naddr = \"{a}\"\n[[instances]]\nid = \"h/b\"\naddr = \"{b}\"\n"
        );
        let cfg = xcluster_runtime::config::load_bytes::<Config>(text.as_bytes())
            .unwrap()
            .config;
        let mut samples = Samples::default();
        let round = samples.round(&cfg, Duration::from_millis(300));
        let got = tokio::time::timeout(Duration::from_secs(10), round)
            .await
            .expect("a round ends within its wait, not the silent one's timeout");
        assert_eq!(
            got.iter().map(|l| (l.id.as_str(), l.ready)).collect::<Vec<_>>(),
            [("h/a", true), ("h/b", false)]
        );
        // Its fetch still runs: the next round does not start another, and says the same.
        assert!(samples.slots[1].running.is_some());
        let again = tokio::time::timeout(
            Duration::from_secs(10),
            samples.round(&cfg, Duration::from_millis(50)),
        )
        .await
        .unwrap();
        assert!(!again[1].ready);
        drop(silent);
    }

    /// One push at a time to each balancer, the latest report next: pushed each in a task of its own, a report
    /// made while the one before was still in flight overtook it on a slow balancer, which refused the older
    /// as a replay (and a silent balancer held a socket per report). Here the balancer answers only once
    /// told; reports 2 and 3 come while 1 is held, and 3 takes 2's place.
    #[tokio::test]
    async fn a_slow_balancer_gets_one_push_at_a_time_the_latest_next() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        // The sequence numbers received, and the most connections open at once.
        let seen = Arc::new(std::sync::Mutex::new((Vec::<u64>::new(), 0usize)));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (got, now_open) = (seen.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let at_once = now_open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let (got, now_open, mut released) = (got.clone(), now_open.clone(), released.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    // The body ends the request: the JSON's last brace (a report is one object).
                    while !req.ends_with(b"}") {
                        match c.read(&mut buf).await {
                            Ok(n @ 1..) => req.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&req);
                    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
                    let report: LoadReport = serde_json::from_str(body).unwrap();
                    {
                        let mut g = got.lock().unwrap();
                        g.0.push(report.seq);
                        g.1 = g.1.max(at_once);
                    }
                    let _ = released.wait_for(|r| *r).await;
                    now_open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                });
            }
        });
        let text = format!("balancers = [\"{addr}\"]\nkey = \"0123456789abcdef\"\ntimeout_ms = 10000\n");
        let cfg = xcluster_runtime::config::load_bytes::<Config>(text.as_bytes())
            .unwrap()
            .config;
        let log = Arc::new(PushLog::default());
        let report = |seq| LoadReport {
            agent: cfg.agent_id.clone(),
            seq,
            boot: 1,
            timestamp_ms: wall_ms(),
            host: Default::default(),
            instances: Vec::new(),
        };
        for seq in 1..=3 {
            push_all(&cfg, &report(seq), &log);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().0.is_empty() {
            assert!(Instant::now() < deadline, "the first push never came");
            tokio::task::yield_now().await;
        }
        release.send_replace(true);
        while seen.lock().unwrap().0.len() < 2 || !log.lanes.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the latest report never came");
            tokio::task::yield_now().await;
        }
        assert_eq!(*seen.lock().unwrap(), (vec![1, 3], 1));
    }

    /// An instance's stats endpoint that answers its first `answers` fetches ready at once, and those after
    /// them never, for the test's life.
    async fn answering(answers: usize) -> std::net::SocketAddr {
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = answering.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut held, mut answered) = (Vec::new(), 0);
            while let Ok((mut c, _)) = answering.accept().await {
                if answered == answers {
                    held.push(c);
                    continue;
                }
                answered += 1;
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let body = r#"{"instance":"a","ready":true,"capacity":10}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(format!("{head}{body}").as_bytes()).await;
            }
        });
        addr
    }

    /// A new config keeps the last sample of each instance it names unchanged, wherever it lists it: reset
    /// at every new config, an instance whose next fetch outlasted the round's tick was reported not ready,
    /// and slow-started again by every balancer.
    #[tokio::test]
    async fn a_new_config_keeps_the_samples_of_the_instances_it_names_unchanged() {
        // Its first fetch answered, the next never: only what was kept can be known in the round below; nor
        // does the new instance answer.
        let a = answering(1).await;
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = silent.local_addr().unwrap();
        let config = |instances: &[(&str, std::net::SocketAddr)]| {
            let listed: String = (instances.iter())
                .map(|(id, at)| format!("[[instances]]\nid = \"{id}\"\naddr = \"{at}\"\n"))
                .collect();
            let text = format!("balancers = [\"127.0.0.1:9\"]\nkey = \"0123456789abcdef\"\n{listed}");
            xcluster_runtime::config::load_bytes::<Config>(text.as_bytes())
                .unwrap()
                .config
        };
        let (before, after) = (config(&[("h/a", a)]), config(&[("h/new", b), ("h/a", a)]));
        let mut samples = Samples::default();
        samples.follow(&[], &before.instances);
        let first = samples.round(&before, Duration::from_secs(10)).await;
        assert!(first[0].ready);
        samples.follow(&before.instances, &after.instances);
        let got = samples.round(&after, Duration::from_millis(300)).await;
        assert_eq!(
            got.iter().map(|l| (l.id.as_str(), l.ready)).collect::<Vec<_>>(),
            [("h/new", false), ("h/a", true)]
        );
        drop(silent);
    }

    fn load(ready: bool, in_flight: u32, queued: u32, err: f64) -> InstanceLoad {
        InstanceLoad {
            id: "a".into(),
            ready,
            in_flight,
            queued,
            error_rate: err,
            ..Default::default()
        }
    }

    /// A report of `instances` instances with `types` request types each, ids and names of 100 bytes.
    fn wide(instances: usize, types: usize) -> LoadReport {
        let type_stats = (0..types)
            .map(|t| (format!("{t:0>100}"), xcluster_proto::stats::TypeStats::default()))
            .collect::<std::collections::BTreeMap<_, _>>();
        LoadReport {
            agent: "host-1".into(),
            instances: (0..instances)
                .map(|i| InstanceLoad {
                    id: format!("{i:0>100}"),
                    addr: "127.0.0.1:7101".into(),
                    types: type_stats.clone(),
                    ..Default::default()
                })
                .collect(),
            seq: 1,
            boot: 1,
            timestamp_ms: 1,
            host: report::HostLoad {
                cores: 4,
                ..Default::default()
            },
        }
    }

    /// A report over the balancers' limit is refused by every one of them at every send: the agent does not
    /// send it, and says what to cut, naming the limit.
    #[test]
    fn a_report_no_balancer_would_take_is_not_encoded_for_sending() {
        // Within the format's bounds (256 instances, 32 types each), and far over 256 KiB.
        let big = wide(
            xcluster_proto::report::MAX_INSTANCES,
            xcluster_proto::stats::MAX_REQUEST_TYPES,
        );
        let err = encode(&big).unwrap_err();
        assert!(
            matches!(err, EncodeError::TooLarge { instances: 256, types: 32, bytes, .. } if bytes > MAX_REPORT_BYTES),
            "{err:?}"
        );
        let message = err.to_string();
        for said in [
            "262144 bytes",
            "MAX_REPORT_BYTES",
            "fewer instances",
            "256 now",
            "fewer request types",
        ] {
            assert!(message.contains(said), "{said:?} not in {message}");
        }
        // One a balancer takes is the report's JSON, as before.
        let fits = wide(8, 8);
        let body = encode(&fits).unwrap();
        assert!(body.len() <= MAX_REPORT_BYTES);
        assert_eq!(body, serde_json::to_vec(&fits).unwrap());
    }

    #[test]
    fn jumps() {
        assert!(
            jumped(&load(true, 2, 2, 0.0), &load(false, 2, 2, 0.0)),
            "turned unready"
        );
        assert!(
            jumped(&load(false, 0, 0, 0.0), &load(true, 0, 0, 0.0)),
            "turned ready"
        );
        assert!(
            jumped(&load(true, 5, 5, 0.0), &load(true, 10, 10, 0.0)),
            "queue doubled"
        );
        assert!(
            !jumped(&load(true, 1, 0, 0.0), &load(true, 2, 0, 0.0)),
            "1 -> 2 is noise"
        );
        assert!(
            !jumped(&load(true, 5, 5, 0.0), &load(true, 8, 8, 0.0)),
            "not doubled"
        );
        assert!(
            jumped(&load(true, 0, 0, 0.0), &load(true, 0, 0, 0.3)),
            "errors leapt"
        );
        assert!(any_jump(&[], &[load(true, 0, 0, 0.0)]), "new instance");
    }
}
