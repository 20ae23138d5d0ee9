//! `xcluster load`: the load generator built on the SDK. Drives a request mix against the app through the
//! SDK, an L4 proxy or plain round robin, either open loop at a fixed rate (latency measured from each
//! request's intended start, so a stalled server cannot hide its queue: no coordinated omission) or closed
//! loop with N workers, and reports per-type HDR percentiles, throughput, errors by kind and backend shares.
//!
//! Every run is bounded by `--duration-secs` and optionally `--requests`; every request by `--timeout-ms`.
//! SIGINT or SIGTERM ends a run early: no new request starts, those in flight finish, and the report is
//! printed as usual (so a harness can end the load when its own work is done).

mod mix;
mod report;
mod target;

use std::io::{ErrorKind, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::args::{LoadArgs, Via};
use mix::{Ctx, Mix};
use report::{Outcome, Recorder, Sample};
use target::Target;

/// Closed-loop workers when neither `--rate` nor `--workers` is given.
const DEFAULT_WORKERS: u32 = 8;
/// How often a run through the SDK samples the freshness of its lists.
const LISTS_SAMPLED_EVERY: Duration = Duration::from_millis(100);
/// The highest `--rate`, a request a microsecond: far past what one process sends.
const MAX_RATE: u32 = 1_000_000;
/// Longest run accepted, so a typo cannot start an unbounded load.
const MAX_DURATION_SECS: u64 = 24 * 3600;
/// Most acknowledged order ids kept for `--orders-out` (about 40 MB); past it the file says how many were
/// dropped, so a check never mistakes a truncated list for a complete one.
const MAX_ORDER_IDS: usize = 1_000_000;

pub fn run(args: LoadArgs) -> i32 {
    if let Err(e) = check(&args) {
        say(format_args!("{e}"));
        return 64;
    }
    // Each worker holds a connection: at a shell's soft 1024 descriptors, --workers 2000 failed half its
    // connects with EMFILE, counted as the targets' errors.
    xcluster_runtime::limits::raise();
    // An open loop (--rate) holds up to --max-in-flight requests at once, each with a connection.
    let (connections, flag) = match args.rate {
        Some(_) => (u64::from(args.max_in_flight), "--max-in-flight"),
        None => (u64::from(args.workers.unwrap_or(DEFAULT_WORKERS)), "--workers"),
    };
    if let Some(limit) =
        xcluster_runtime::limits::short_of(connections + xcluster_runtime::limits::BASE_DESCRIPTORS)
    {
        say(format_args!(
            "{flag} {connections} may need more descriptors than the limit of {limit} allows: \
             connects past it fail (EMFILE); raise it (ulimit -Hn) or lower {flag}"
        ));
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("cannot start the runtime: {e}"));
            return 70;
        }
    };
    let code = run_on(&rt, args);
    // Not a plain drop, which waits for every blocking task: a name lookup given up on (a silent resolver)
    // held the exit for glibc's retries, 10-30 s after the report or the error.
    rt.shutdown_timeout(Duration::from_millis(200));
    code
}

fn run_on(rt: &tokio::runtime::Runtime, args: LoadArgs) -> i32 {
    // Resolved before the run, as part of checking the arguments: a name that does not resolve is a bad
    // argument (64), like a malformed one.
    let targets = match rt.block_on(target::resolve(args.targets())) {
        Ok(t) => t,
        Err(e) => {
            say(format_args!("{e}"));
            return 64;
        }
    };
    // Read as XBuy reads it, before the run: a key it would refuse is a bad argument. Before `--orders-out`,
    // which is emptied when opened: a mistyped key path cost the last run's list.
    let buyer_key = (args.buyer_key_file.as_deref())
        .map(|path| crate::check::buyer_key("--buyer-key-file", path))
        .transpose();
    let buyer_key = match buyer_key {
        Ok(k) => k,
        Err(issues) => {
            say(format_args!("{}", issues.trim_end()));
            return 64;
        }
    };
    // Opened before the run, so a path that cannot be written is a bad argument: found at the end, it cost
    // the whole run's report, and the orders placed were left reserved (the clean-up was skipped too).
    let orders = match args.orders_out.as_deref().map(open_orders).transpose() {
        Ok(f) => f,
        Err(e) => {
            say(format_args!("{e}"));
            return 64;
        }
    };
    match rt.block_on(drive(args, targets, orders, buyer_key)) {
        Ok(Ran::Served) => 0,
        Ok(Ran::AllFailed) => {
            say(format_args!("every request failed"));
            EXIT_ALL_FAILED
        }
        Err(e) => {
            say(format_args!("{e}"));
            69
        }
    }
}

/// One line on stderr, `xcluster load: ...`. Not `eprintln!`: it panics once the reader has gone (`xcluster
/// load ... 2>&1 | head`), exit 101 instead of the run's own code. SIGPIPE stays ignored here, unlike in `ctl`:
/// a backend that closes a connection during a vectored write (`writev`, which hyper uses) must cost one
/// request, not end the run.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "xcluster load: {line}");
}

/// Writes the report to stdout. A reader that has gone (`| head`) took what it wanted: not an error, and no
/// panic as from `print!`; any other failure (a full disk) is one, so a lost report is never silent.
fn print_report(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(format!("cannot write the report: {e}")),
        _ => Ok(()),
    }
}

fn check(a: &LoadArgs) -> Result<(), String> {
    let mut problems = Vec::new();
    if a.duration_secs == 0 || a.duration_secs > MAX_DURATION_SECS {
        problems.push(format!("--duration-secs must be in 1..={MAX_DURATION_SECS}"));
    }
    if a.rate == Some(0) || a.workers == Some(0) || a.requests == Some(0) {
        problems.push("--rate, --workers and --requests must be above zero".into());
    }
    // Past it the interval between two requests rounds to nothing, and the schedule never reaches its end.
    if a.rate.is_some_and(|r| r > MAX_RATE) {
        problems.push(format!("--rate must be at most {MAX_RATE}"));
    }
    if a.workers.is_some_and(|w| w > 10_000) {
        problems.push("--workers must be at most 10000".into());
    }
    if a.interval_ms != 0
        && (a.interval_ms < 100 || a.duration_secs.saturating_mul(1000) / a.interval_ms > report::MAX_SLOTS)
    {
        problems.push(format!(
            "--interval-ms must be 0 (no timeline), or at least 100 and give at most {} intervals over --duration-secs",
            report::MAX_SLOTS
        ));
    }
    if a.timeout_ms == 0 || a.max_in_flight == 0 {
        problems.push("--timeout-ms and --max-in-flight must be above zero".into());
    }
    // Only counted here; `run` resolves them (bounded) once the runtime is up.
    let targets = target::names(a.targets());
    if targets.is_empty() && problems.is_empty() {
        problems.push("--targets names no address".into());
    }
    match Mix::parse(&a.mix) {
        Ok(mix) => {
            if let Err(e) = check_labels(a, &mix) {
                problems.push(e);
            }
        }
        Err(e) => problems.push(e),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The `TYPE=` label of each `--targets` entry.
fn labels(a: &LoadArgs) -> Vec<Option<String>> {
    target::entries(a.targets())
        .into_iter()
        .map(|(l, _)| l.map(str::to_string))
        .collect()
}

/// `--targets`' `TYPE=` labels: only `--via proxy` takes them (a listener per request type, and at most one
/// entry without, for the other types), each a type of the mix named once, and every type of the mix must
/// have a listener.
fn check_labels(a: &LoadArgs, mix: &Mix) -> Result<(), String> {
    let entries = target::entries(a.targets());
    let labels: Vec<&str> = entries.iter().filter_map(|(l, _)| *l).collect();
    let bare = entries.len() - labels.len();
    if a.via != Via::Proxy {
        return match labels.first() {
            Some(l) => Err(format!(
                "--targets: {l}=... names a request type's listener, for --via proxy only"
            )),
            None => Ok(()),
        };
    }
    if bare > 1 {
        return Err(format!(
            "--via proxy takes one listener for all types, or TYPE=ADDR entries, not {bare} plain addresses"
        ));
    }
    // A type the mix does not draw may have a listener (the default targets name all four).
    let known: Vec<&str> = mix::KINDS.iter().map(|k| k.name).collect();
    for (i, l) in labels.iter().enumerate() {
        if !known.contains(l) {
            return Err(format!(
                "--targets: {l:?} is not a request type ({})",
                known.join(", ")
            ));
        }
        if labels[..i].contains(l) {
            return Err(format!("--targets: {l:?} is named twice"));
        }
    }
    // A plain address takes every type not named.
    let unserved = mix.kinds.iter().map(|k| k.name).find(|k| !labels.contains(k));
    match unserved.filter(|_| bare == 0) {
        Some(k) => Err(format!(
            "--targets names no listener for {k:?} (TYPE=ADDR, or a plain ADDR for the rest)"
        )),
        None => Ok(()),
    }
}

/// What one run shares between its request tasks.
struct Run {
    mix: Mix,
    ctx: Arc<Ctx>,
    target: Arc<Target>,
    timeout: Duration,
    tx: mpsc::Sender<Sample>,
    /// Set by SIGINT/SIGTERM: start no new request.
    stopped: Arc<AtomicBool>,
    /// Acknowledged order ids, when `--orders-out` asks for them.
    acked: Option<Arc<std::sync::Mutex<AckedOrders>>>,
}

#[derive(Debug, Default)]
struct AckedOrders {
    ids: Vec<String>,
    dropped: u64,
}

impl Run {
    /// Sends one request of type `k` and reports it; latency counts from `intended`.
    async fn one(&self, k: usize, intended: Instant) {
        // Nothing to send of the drawn type yet (no order to pay): another type of the mix takes the slot,
        // so `--requests N` sends N and the open loop keeps its rate.
        let n = self.mix.kinds.len();
        let Some((k, kind, req)) = (0..n).map(|i| (k + i) % n).find_map(|k| {
            let kind = self.mix.kinds[k];
            kind.build(&self.ctx).map(|req| (k, kind, req))
        }) else {
            // The pause keeps a closed-loop worker from spinning when nothing can be sent.
            tokio::time::sleep(Duration::from_millis(1)).await;
            return;
        };
        // A pay that fails leaves its order to cancel at the end (`Ctx::pay_failed`); an order whose answer
        // is lost is asked again then (`Ctx::lost`).
        let paying = (kind.name == "pay").then(|| {
            let buyer = req.extensions().get::<mix::BuyerOf>().cloned();
            (req.uri().path().to_string(), buyer)
        });
        let lost = mix::Lost::of(kind, &req);
        let outcome = self.target.send(kind, req, self.timeout).await;
        if let Some((path, buyer)) = paying
            && !outcome.as_ref().is_ok_and(|(resp, _)| resp.status().is_success())
        {
            self.ctx.pay_failed(&path, buyer.as_ref());
        }
        if let Some(lost) = lost
            && match &outcome {
                Ok((resp, _)) => mix::may_have_placed(resp.status(), resp.body()),
                Err((error, _)) => !mix::never_sent(error, self.target.single_attempt()),
            }
        {
            self.ctx.lost(lost);
        }
        let latency = intended.elapsed();
        let sample = match outcome {
            Ok((resp, backend)) => {
                let status = resp.status();
                if status.is_success()
                    && let Some(id) = self.ctx.observe(kind, resp.body())
                    && let Some(acked) = &self.acked
                {
                    let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                    if a.ids.len() < MAX_ORDER_IDS {
                        a.ids.push(id);
                    } else {
                        a.dropped += 1;
                    }
                }
                Sample {
                    kind: k,
                    latency,
                    backend,
                    outcome: Outcome::of_answer(status.as_u16(), resp.body()),
                    retried: resp
                        .extensions()
                        .get::<xcluster_sdk::Backend>()
                        .is_some_and(|b| b.attempts > 1),
                }
            }
            Err((kind_of_error, backend)) => Sample {
                kind: k,
                latency,
                backend,
                outcome: Outcome::Error(kind_of_error),
                retried: false,
            },
        };
        let _ = self.tx.send(sample).await;
    }
}

/// How a run went, for the exit code: scripts (`--json`) must tell a run that served nothing.
enum Ran {
    Served,
    AllFailed,
}

/// The exit code of a run in which every request failed (none answered, or none with a status).
const EXIT_ALL_FAILED: i32 = 1;

async fn drive(
    args: LoadArgs,
    targets: Vec<Vec<std::net::SocketAddr>>,
    orders: Option<std::fs::File>,
    buyer_key: Option<Vec<u8>>,
) -> Result<Ran, String> {
    let mix = Mix::parse(&args.mix)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let names: Vec<&'static str> = mix.kinds.iter().map(|k| k.name).collect();
    // SIGINT/SIGTERM end the run, and a bootstrap that has not found its targets yet.
    let stopped = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let (stopped, stop) = (stopped.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            let Ok(mut int) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            stopped.store(true, Ordering::Relaxed);
            stop.notify_waiters();
            // The run now waits for the requests in flight (up to --timeout-ms) and cancels its orders: a
            // second signal ends it at once, as it would have without these handlers.
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            say(format_args!(
                "interrupted again: exiting without the report or the clean-up"
            ));
            std::process::exit(130);
        });
    }
    let given = target::names(args.targets());
    let target = tokio::select! {
        t = Target::new(args.via, &given, targets, labels(&args), &names, timeout) => t?,
        _ = stop.notified() => return Err("interrupted while connecting to the targets".into()),
    };
    let (tx, mut rx) = mpsc::channel::<Sample>(65_536);
    let acked = args.orders_out.as_ref().map(|_| Arc::default());
    let (ctx, target) = (
        Arc::new(Ctx::with_auth(args.app_token.as_deref(), buyer_key)?),
        Arc::new(target),
    );
    let run = Arc::new(Run {
        mix,
        ctx: ctx.clone(),
        target: target.clone(),
        timeout,
        tx,
        acked: acked.clone(),
        stopped: stopped.clone(),
    });
    let via = match args.via {
        Via::Sdk => "sdk",
        Via::Proxy => "proxy",
        Via::Rr => "rr",
    };
    let mode = match (args.rate, args.workers) {
        (Some(r), _) => format!("open loop, {r} req/s"),
        (None, w) => format!("closed loop, {} workers", w.unwrap_or(DEFAULT_WORKERS)),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let limit = args.requests.unwrap_or(u64::MAX);

    let generator = {
        let run = run.clone();
        let (rate, workers, max_in_flight) = (args.rate, args.workers, args.max_in_flight);
        tokio::spawn(async move {
            match rate {
                Some(rate) => open_loop(run, rate, max_in_flight, deadline, limit).await,
                None => closed_loop(run, workers.unwrap_or(DEFAULT_WORKERS), deadline, limit).await,
            }
        })
    };
    // Only the request tasks hold senders now: the channel closes when the last one finishes.
    drop(run);

    let mut recorder = Recorder::new(names).with_interval(Duration::from_millis(args.interval_ms));
    // Through the SDK, whether a balancer vouched for its lists, sampled (`report::Lists`).
    let client = match &*target {
        Target::Sdk(c) => Some(c.clone()),
        _ => None,
    };
    let mut lists = client.as_ref().map(|_| report::Lists::default());
    let mut sample_lists = tokio::time::interval(LISTS_SAMPLED_EVERY);
    sample_lists.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let progress = std::io::stderr().is_terminal() && !args.json;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => recorder.record(s, started.elapsed()),
                None => break,
            },
            _ = sample_lists.tick(), if client.is_some() => {
                if let (Some(c), Some(l)) = (&client, &mut lists) {
                    l.sample(&c.state(), LISTS_SAMPLED_EVERY);
                }
            }
            _ = tick.tick(), if progress => {
                let (n, errors, _) = recorder.total();
                let secs = started.elapsed().as_secs_f64();
                let _ = write!(
                    std::io::stderr(),
                    "\r{via}: {secs:>6.1}s / {}s  {n:>9} requests  {errors:>7} errors  {:>9.1} req/s ",
                    args.duration_secs,
                    n as f64 / secs.max(1e-9)
                );
            }
        }
    }
    if progress {
        let _ = writeln!(std::io::stderr());
    }
    let _ = generator.await;
    // A failed write is reported once the run's report is out and its orders released: it loses the list,
    // not the rest.
    let written = match (orders, &args.orders_out, &acked) {
        (Some(file), Some(path), Some(acked)) => write_orders(file, path, acked),
        _ => Ok(()),
    };
    // Rates are over the run's schedule: the answers of requests still in flight at its end (up to
    // `--timeout-ms` later) count, but the wait for them does not lengthen the run.
    let ran_for = started.elapsed().min(Duration::from_secs(args.duration_secs));
    let mut report = recorder.report(via, mode, ran_for);
    report.interrupted = stopped.load(Ordering::Relaxed);
    report.lists = lists;
    report.released = Some(if args.keep_orders {
        let (ids, forgotten) = ctx.take_unpaid();
        // Those whose answer was lost may hold stock too: counted among the kept, not asked again.
        let lost = ctx.take_lost().len() as u64;
        report::Released {
            kept: ids.len() as u64 + forgotten + lost,
            ..Default::default()
        }
    } else {
        release_unpaid(&ctx, &target, timeout).await
    });
    if args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        print_report(&format!("{json}\n"))?;
    } else {
        print_report(&report.text())?;
    }
    written?;
    Ok(if report.requests > 0 && report.errors == report.requests {
        Ran::AllFailed
    } else {
        Ran::Served
    })
}

/// Cancels the orders the run placed and did not pay, so their stock is not held for the app's reservation
/// time after the run: a few at once, each within `timeout` but at least [`CANCEL_TIMEOUT`], all within
/// [`RELEASE_WITHIN`]. Not counted in the report's requests: they are the run's clean-up, not its load.
async fn release_unpaid(ctx: &Ctx, target: &Arc<Target>, timeout: Duration) -> report::Released {
    // A run that measures how a short `--timeout-ms` fails (5 ms) must still clean up: within it, most
    // cancels failed, and a thousand reservations a run were left for the app's reservation time.
    let timeout = timeout.max(CANCEL_TIMEOUT);
    let start = Instant::now();
    // First the orders whose answer was lost, within half the time, so the cancels of those known to stand
    // keep theirs: asked again under their keys, each placed one answers with its order (a replay), cancelled
    // then with the others. One that had not been placed is placed now, and cancelled as well; a refusal says
    // none stands.
    let lost: Vec<_> = (ctx.take_lost().iter())
        .map(mix::Lost::request)
        .map(|(kind, req)| (kind, ctx.authorized(req)))
        .collect();
    let mut released = report::Released {
        asked_again: lost.len() as u64,
        ..Default::default()
    };
    let unknown = send_all(
        target,
        lost,
        timeout,
        start + RELEASE_WITHIN / 2,
        |kind, answer| match answer {
            Some((status, body)) if status.is_success() => {
                ctx.observe(kind, body);
                false
            }
            Some((status, body)) => mix::may_have_placed(status, body),
            None => true,
        },
    )
    .await;
    let (cancels, forgotten) = ctx.take_unpaid();
    released.forgotten = forgotten;
    let cancels: Vec<_> = (cancels.into_iter())
        .map(|(kind, req)| (kind, ctx.authorized(req)))
        .collect();
    let sent = cancels.len() as u64;
    released.failed = send_all(target, cancels, timeout, start + RELEASE_WITHIN, |_, answer| {
        !answer.is_some_and(|(status, _)| status.is_success())
    })
    .await;
    released.cancelled = sent - released.failed;
    // Asked again with no answer that says whether it stands, by the end: it may hold stock.
    released.failed += unknown;
    released
}

/// Sends `requests` a few at once, each within `timeout` and all by `deadline` (none begun past it), telling
/// `answered` each one's answer (`None`: none, an error); returns how many `answered` counted (it returns
/// true, as both callers do for `None`) and how many had no answer by the deadline.
async fn send_all(
    target: &Arc<Target>,
    requests: Vec<(
        &'static mix::Kind,
        http::Request<http_body_util::Full<bytes::Bytes>>,
    )>,
    timeout: Duration,
    deadline: Instant,
    mut answered: impl FnMut(&'static mix::Kind, Option<(http::StatusCode, &[u8])>) -> bool,
) -> u64 {
    const AT_ONCE: usize = 16;
    let mut requests = requests.into_iter();
    let mut sent = tokio::task::JoinSet::new();
    let mut counted = 0;
    loop {
        // Each within what is left: one begun late is not cut off mid-way by the deadline below.
        let left = deadline.saturating_duration_since(Instant::now());
        while sent.len() < AT_ONCE && !left.is_zero() {
            let Some((kind, req)) = requests.next() else { break };
            let target = target.clone();
            sent.spawn(async move {
                let answer = target.send(kind, req, timeout.min(left)).await;
                (kind, answer.ok().map(|(resp, _)| resp))
            });
        }
        match tokio::time::timeout_at(deadline, sent.join_next()).await {
            Ok(Some(Ok((kind, resp)))) => {
                let answer = resp.as_ref().map(|r| (r.status(), r.body().as_ref()));
                counted += u64::from(answered(kind, answer));
            }
            // A send that panicked: no answer, which both callers count.
            Ok(Some(Err(_))) => counted += 1,
            Ok(None) if requests.len() == 0 => break,
            // Time is up with some not begun.
            Ok(None) => {
                counted += requests.len() as u64;
                break;
            }
            Err(_) => {
                counted += (sent.len() + requests.len()) as u64;
                sent.abort_all();
                break;
            }
        }
    }
    counted
}

/// How long the run's clean-up may take at most ([`release_unpaid`]).
const RELEASE_WITHIN: Duration = Duration::from_secs(10);
/// The least time one clean-up cancel is given, whatever `--timeout-ms` says.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates (or empties) the `--orders-out` file.
fn open_orders(path: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::File::create(path).map_err(|e| format!("--orders-out: cannot write {}: {e}", path.display()))
}

/// Writes the acknowledged order ids, one per line; a last line `# dropped N` if the cap was reached.
fn write_orders(
    mut file: std::fs::File,
    path: &std::path::Path,
    acked: &std::sync::Mutex<AckedOrders>,
) -> Result<(), String> {
    let a = acked.lock().unwrap_or_else(|p| p.into_inner());
    let mut text = String::with_capacity(a.ids.len() * 40);
    for id in &a.ids {
        text.push_str(id);
        text.push('\n');
    }
    if a.dropped > 0 {
        text.push_str(&format!("# dropped {}\n", a.dropped));
    }
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Starts request `i` at `start + i / rate`, whatever the earlier requests are doing.
async fn open_loop(run: Arc<Run>, rate: u32, max_in_flight: u32, deadline: Instant, limit: u64) {
    let permits = Arc::new(Semaphore::new(max_in_flight as usize));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut i: u64 = 0;
    while i < limit {
        let intended = start + interval.mul_f64(i as f64);
        if intended >= deadline || run.stopped.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until(intended).await;
        // Waiting for a permit delays the send, not the clock: the wait counts as latency. Never past the
        // deadline, though: a schedule the targets (or this machine) fell behind ran on for as long as its
        // backlog took, ten times the duration against a hung backend.
        let permit = match tokio::time::timeout_at(deadline, permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => break,
        };
        if Instant::now() >= deadline || run.stopped.load(Ordering::Relaxed) {
            break;
        }
        let run = run.clone();
        let k = run.mix.draw();
        tokio::spawn(async move {
            run.one(k, intended).await;
            drop(permit);
        });
        i += 1;
    }
    let planned = ((deadline - start).as_secs_f64() * f64::from(rate)) as u64;
    let unsent = planned.min(limit).saturating_sub(i);
    if unsent > 0 && !run.stopped.load(Ordering::Relaxed) {
        say(format_args!(
            "{unsent} of the {} requests planned at --rate {rate} were not sent by the end of the run: the \
             targets (or this machine) did not keep up, with --max-in-flight {max_in_flight} held",
            planned.min(limit)
        ));
    }
    // The run lasts as long as its schedule: `i` requests at `rate` take `i` intervals (or up to the
    // deadline), whatever the answers' speed; ending at the last answer made three requests at 1/s read as
    // 950 requests/s.
    if !run.stopped.load(Ordering::Relaxed) {
        tokio::time::sleep_until(deadline.min(start + interval.mul_f64(i as f64))).await;
    }
}

/// `workers` tasks, each sending its next request when the previous one is done.
async fn closed_loop(run: Arc<Run>, workers: u32, deadline: Instant, limit: u64) {
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (run, issued) = (run.clone(), issued.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline
                && !run.stopped.load(Ordering::Relaxed)
                && issued.fetch_add(1, Ordering::Relaxed) < limit
            {
                let k = run.mix.draw();
                run.one(k, Instant::now()).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
