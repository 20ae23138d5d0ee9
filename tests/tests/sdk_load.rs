//! `xcluster load` (the real binary) against real HTTP backends in this process: it reports per-type
//! percentiles, throughput, errors by kind and each backend's share, through plain round robin and through
//! the SDK (with a scripted balancer publishing weights).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sdk_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sdk_support::{Backend, FakeBalancer, dead_addr, list};
use serde_json::Value;
use xcluster_tests::Proc;

/// Runs `xcluster load ARGS --json` to completion and returns its report.
fn load(args: &[&str]) -> Value {
    load_exiting(args, 0)
}

/// [`load`] of a run that exits with `code`.
fn load_exiting(args: &[&str], code: i32) -> Value {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    all.push("--json");
    let mut p = Proc::xcluster("load", &all);
    let exit = p.wait_exit(Duration::from_secs(60));
    assert_eq!(exit, Some(code), "xcluster load:\n{}", p.stderr());
    serde_json::from_str(&p.stdout()).unwrap_or_else(|e| panic!("bad json ({e}):\n{}", p.stdout()))
}

/// A closed-loop run of `requests` over `workers` through `via` to `targets`, with `mix`: its JSON report.
fn closed_loop(via: &str, targets: &str, mix: &str, workers: u32, requests: u32) -> Value {
    let (workers, requests) = (workers.to_string(), requests.to_string());
    load(&[
        "--via",
        via,
        "--targets",
        targets,
        "--mix",
        mix,
        "--workers",
        &workers,
        "--requests",
        &requests,
    ])
}

/// `requests` of `mix` from one worker through the SDK, the balancer at `lb`, each within `timeout_ms`: the
/// JSON report of a run that exits with `code`.
fn sdk_one_worker(lb: SocketAddr, mix: &str, requests: u32, timeout_ms: u32, code: i32) -> Value {
    let (lb, requests, timeout) = (lb.to_string(), requests.to_string(), timeout_ms.to_string());
    let args = [
        "--via",
        "sdk",
        "--targets",
        &lb,
        "--mix",
        mix,
        "--workers",
        "1",
        "--requests",
        &requests,
        "--timeout-ms",
        &timeout,
    ];
    load_exiting(&args, code)
}

fn by_type<'a>(report: &'a Value, t: &str) -> &'a Value {
    report["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["request_type"] == t)
        .unwrap_or_else(|| panic!("no {t} in {report}"))
}

fn check_percentiles(t: &Value) {
    let l = &t["latency_us"];
    let p: Vec<u64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|k| l[*k].as_u64().unwrap_or_else(|| panic!("{k} missing in {l}")))
        .collect();
    assert!(p[0] > 0, "{l}");
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "percentiles not ordered: {l}");
    assert!(t["throughput_rps"].as_f64().unwrap() > 0.0);
}

#[test]
fn round_robin_reports_percentiles_and_equal_shares() {
    let backends = [Backend::start("a"), Backend::start("b"), Backend::start("c")];
    let targets = backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let report = closed_loop("rr", &targets, "browse=3,order=1", 4, 300);
    assert_eq!(report["requests"], 300);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["refused"], 0, "{report}");
    for t in ["browse", "order"] {
        let t = by_type(&report, t);
        check_percentiles(t);
        assert!(t["requests"].as_u64().unwrap() > 0);
    }
    // Round robin: exactly a third each, and the backends agree with the report.
    for b in &backends {
        let share = &report["backends"][b.addr.to_string()];
        assert_eq!(share["requests"], 100, "{report}");
        assert_eq!(b.hits(), 100);
    }
}

/// A run in which every request failed exits 1, so a script sees it; `--via proxy` takes one target.
#[test]
fn a_run_where_every_request_fails_exits_1() {
    let dead = xcluster_tests::free_addr().to_string();
    let args = [
        "load",
        "--via",
        "proxy",
        "--targets",
        &dead,
        "--workers",
        "1",
        "--duration-secs",
        "1",
    ];
    let mut p = Proc::xcluster("load", &args);
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(1), "{}", p.stderr());
    assert!(p.stderr().contains("every request failed"), "{}", p.stderr());
    let two = format!("{dead},{dead}");
    let mut p = Proc::xcluster("load", &["load", "--via", "proxy", "--targets", &two]);
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(64), "{}", p.stderr());
}

/// A reader that has gone (`xcluster load | head`, `2>&1 | head`) does not turn the end of a run into a panic
/// (exit 101 and a backtrace note, where a script expects the run's own code): `println!` and `eprintln!`
/// panicked on the closed pipe, since the load generator keeps SIGPIPE ignored.
#[test]
fn a_run_whose_reader_has_gone_keeps_its_exit_code() {
    use std::process::{Command, Stdio};
    let backend = Backend::start("a");
    let dead = xcluster_tests::free_addr().to_string();
    let alive = backend.addr.to_string();
    // (targets, exit code, which output has no reader)
    for (targets, code, closed_stdout) in [(&alive, 0, true), (&dead, 1, true), (&dead, 1, false)] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let mut cmd = Command::new(xcluster_tests::xcluster_bin());
        cmd.args(["load", "--via", "rr", "--targets", targets, "--mix", "browse=1"])
            .args(["--workers", "1", "--requests", "20"]);
        if closed_stdout {
            cmd.stdout(Stdio::from(write));
        } else {
            cmd.stderr(Stdio::from(write));
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            (out.status.code(), stderr.contains("panicked")),
            (Some(code), false),
            "{targets}, stdout closed: {closed_stdout}: {stderr}"
        );
    }
}

/// An `--orders-out` path that cannot be written is refused before the run (64, nothing sent): found only at
/// the end, it cost the whole run's report and skipped the cancelling of the orders it had placed, which
/// then held their stock for the app's reservation time.
#[test]
fn an_orders_file_that_cannot_be_written_is_refused_before_the_run() {
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no-such-dir/orders.txt");
    let targets = backend.addr.to_string();
    let args = ["load", "--via", "rr", "--targets", &targets, "--mix", "order=1"];
    let more = ["--requests", "5", "--orders-out", out.to_str().unwrap()];
    let mut p = Proc::xcluster("load", &[&args[..], &more[..]].concat());
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(64), "{}", p.stderr());
    assert!(
        p.stderr().contains("--orders-out") && p.stderr().contains("no-such-dir"),
        "{}",
        p.stderr()
    );
    assert_eq!(backend.hits(), 0, "nothing is sent");
}

/// `--via proxy` sends each request type to its own listener (`TYPE=ADDR`, as `xcluster up` has one port per
/// type), the types not named to the plain address; a type of the mix with no listener, or an unknown one,
/// is a usage error.
#[test]
fn via_proxy_sends_each_type_to_its_listener() {
    let (browse, order, rest) = (Backend::start("b"), Backend::start("o"), Backend::start("r"));
    let targets = format!("browse={},order={},{}", browse.addr, order.addr, rest.addr);
    let report = closed_loop("proxy", &targets, "browse=2,order=1,seckill=1", 2, 60);
    assert_eq!(report["errors"], 0, "{report}");
    for (ty, b) in [("browse", &browse), ("order", &order), ("seckill", &rest)] {
        let sent = by_type(&report, ty)["requests"].as_u64().unwrap();
        assert!(sent > 0, "{report}");
        assert_eq!(b.hits(), sent, "{ty}: {report}");
    }
    for (targets, says) in [
        (format!("browse={}", browse.addr), "no listener for \"order\""),
        (
            format!("nope={},{}", browse.addr, rest.addr),
            "\"nope\" is not a request type",
        ),
        (format!("browse={0},browse={0},{0}", browse.addr), "named twice"),
        // A listener, not a balancer, that does not resolve; an IPv6 one without brackets is told how.
        (
            format!("browse={},::1:7400", browse.addr),
            "cannot resolve \"::1:7400\": not an ip:port or host:port address; an IPv6 address takes \
             brackets: [::1]:7400",
        ),
    ] {
        let args = [
            "load",
            "--via",
            "proxy",
            "--targets",
            &targets,
            "--mix",
            "browse=1,order=1",
        ];
        let mut p = Proc::xcluster("load", &args);
        assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(64), "{}", p.stderr());
        assert!(p.stderr().contains(says), "{targets}: {}", p.stderr());
    }
}

#[test]
fn errors_are_counted_by_kind_in_open_loop() {
    let ok = Backend::start("ok");
    let busy = Backend::with_status("busy", 503);
    let dead = dead_addr();
    let targets = format!("{},{},{dead}", ok.addr, busy.addr);
    let report = load(&[
        "--via",
        "rr",
        "--targets",
        &targets,
        "--mix",
        "browse=1",
        "--rate",
        "200",
        "--requests",
        "99",
    ]);
    assert_eq!(report["requests"], 99);
    let t = by_type(&report, "browse");
    assert_eq!(t["errors"]["status_503"], 33, "{report}");
    assert_eq!(t["errors"]["connect"], 33, "{report}");
    assert_eq!(t["ok"], 33);
    check_percentiles(t);
    assert_eq!(report["backends"][busy.addr.to_string()]["requests"], 33);
    // A backend that refuses every connection shows in the shares with its failures.
    assert_eq!(report["backends"][dead.to_string()]["requests"], 33, "{report}");
}

/// Both instances take 10 ms a request. The SDK compares their latency (plus a 1 ms floor) before it follows
/// the weights, so with answers in microseconds a single scheduling stall of a millisecond or two on a busy
/// machine made it avoid the heavy instance for the rest of a short run (heavy at 5% of one type in CI).
/// A real service time keeps such noise small beside it, as it is in production.
#[test]
fn sdk_mode_follows_the_published_weights() {
    let delay = Duration::from_millis(10);
    let (heavy, light) = (
        Backend::with_delay("heavy", delay),
        Backend::with_delay("light", delay),
    );
    let lb = FakeBalancer::start(Duration::from_secs(60));
    for ty in ["browse", "order"] {
        lb.set(list(
            ty,
            1,
            &[("heavy", heavy.addr, 9000), ("light", light.addr, 1000)],
            &[lb.addr],
        ));
    }
    let report = closed_loop("sdk", &lb.addr.to_string(), "browse=1,order=1", 2, 200);
    assert_eq!(report["requests"], 200);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["refused"], 0, "{report}");
    check_percentiles(by_type(&report, "browse"));
    let heavy_share = report["backends"][heavy.addr.to_string()]["share"]
        .as_f64()
        .unwrap();
    let light_n = report["backends"][light.addr.to_string()]["requests"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        heavy_share > 0.7,
        "weights 9:1 gave the heavy instance {heavy_share}: {report}"
    );
    assert_eq!(heavy.hits() + light.hits(), 200);
    assert_eq!(light.hits(), light_n);
    assert_eq!(
        report["lists"]["static_s"], 0.0,
        "the balancer vouched throughout: {report}"
    );
}

/// A timeline interval that is too fine, or too many intervals for the run, is refused before any request
/// (exit 64, the reason on stderr).
#[test]
fn a_bad_interval_is_refused_with_a_reason() {
    for args in [
        ["--interval-ms", "50", "--duration-secs", "1"],
        ["--interval-ms", "100", "--duration-secs", "86400"],
    ] {
        let mut all = vec!["load", "--via", "rr", "--targets", "127.0.0.1:9"];
        all.extend_from_slice(&args);
        let mut p = Proc::xcluster("load", &all);
        assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(64), "{args:?}");
        assert!(p.stderr().contains("--interval-ms"), "{}", p.stderr());
    }
}

/// `--requests N` sends N requests even when `pay` is drawn before any order was acknowledged (here the
/// backend's answers carry no order id, so there is never one to pay): a draw with nothing to send takes
/// another type of the mix instead of a request slot.
#[test]
fn requests_are_all_sent_when_pay_has_nothing_to_pay() {
    let b = Backend::start("a");
    let addr = b.addr.to_string();
    for mode in [["--rate", "1000"], ["--workers", "2"]] {
        let report = load(&[
            "--via",
            "rr",
            "--targets",
            &addr,
            "--mix",
            "order=1,pay=20",
            mode[0],
            mode[1],
            "--requests",
            "30",
        ]);
        assert_eq!(report["requests"], 30, "{mode:?}: {report}");
    }
    assert_eq!(b.hits(), 60);
}

/// `--timeout-ms` bounds one request in SDK mode too, retries on other instances included: it is the SDK
/// client's deadline, so with every instance hanging a browse (which the SDK would try on three instances)
/// ends as `deadline` after 500 ms, not after three timeouts. With no success, the type's latencies do not
/// exist: null in JSON, not 0.
#[test]
fn sdk_mode_bounds_a_request_retries_included() {
    let stuck = [
        Backend::hanging("a"),
        Backend::hanging("b"),
        Backend::hanging("c"),
    ];
    let lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list(
        "browse",
        1,
        &[
            ("a", stuck[0].addr, 100),
            ("b", stuck[1].addr, 100),
            ("c", stuck[2].addr, 100),
        ],
        &[lb.addr],
    ));
    let report = sdk_one_worker(lb.addr, "browse=1", 1, 500, 1);
    let browse = by_type(&report, "browse");
    assert_eq!(browse["errors"]["deadline"], 1, "{report}");
    for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(browse["latency_us"][k].is_null(), "{k}: {report}");
    }
}

/// `--targets` takes `host:port` in every mode, resolved as the SDK resolves its balancers: `localhost:PORT`
/// reaches a balancer (SDK) and a backend (round robin); a name that does not resolve is a bad argument.
#[test]
fn targets_may_be_named_by_host_and_port() {
    let b = Backend::start("a");
    let lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list("browse", 1, &[("a", b.addr, 100)], &[lb.addr]));
    // The SDK asks the balancer; round robin goes to the backend itself.
    for (via, target) in [("sdk", lb.addr), ("rr", b.addr)] {
        let by_name = format!("localhost:{}", target.port());
        let report = load(&[
            "--via",
            via,
            "--targets",
            &by_name,
            "--mix",
            "browse=1",
            "--workers",
            "1",
            "--requests",
            "5",
        ]);
        assert_eq!(
            (report["requests"].as_u64(), report["errors"].as_u64()),
            (Some(5), Some(0)),
            "{via}: {report}"
        );
    }
    assert_eq!(b.hits(), 10);
    let mut p = Proc::xcluster(
        "load",
        &[
            "load",
            "--via",
            "rr",
            "--targets",
            "no-such-host.invalid:80",
            "--requests",
            "1",
        ],
    );
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(64), "{}", p.stderr());
    assert!(p.stderr().contains("no-such-host.invalid:80"), "{}", p.stderr());
}

/// The SDK's retries show in the report: an answer that came only after an attempt on another instance
/// failed (here a 503) is counted as `retried`, per type and in all. Without it a run whose failures the
/// retries hid read as a clean one, the failing instance's requests credited to the one that answered.
/// The busy instance has nearly all the weight, so the first request goes there (both unmeasured, the
/// first draw stands) and is retried on the other.
#[test]
fn answers_after_a_retry_are_counted() {
    let (busy, ok) = (Backend::with_status("busy", 503), Backend::start("ok"));
    let lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list(
        "browse",
        1,
        &[("busy", busy.addr, 10_000), ("ok", ok.addr, 1)],
        &[lb.addr],
    ));
    let report = closed_loop("sdk", &lb.addr.to_string(), "browse=1", 1, 50);
    assert_eq!(report["requests"], 50);
    assert_eq!(report["errors"], 0, "every 503 was retried: {report}");
    assert!(busy.hits() >= 1, "the first request went to the busy instance");
    assert_eq!(by_type(&report, "browse")["retried"], busy.hits(), "{report}");
    assert_eq!(report["retried"], busy.hits(), "{report}");
    assert_eq!(ok.hits(), 50);
}

/// Every order the run placed and did not pay is cancelled at its end, those whose pay failed included:
/// here every pay gets a 503, and each of the orders is cancelled. A failed pay used to drop its order,
/// which then held its stock for the app's reservation time (15 minutes) after the run.
#[test]
fn orders_whose_pay_failed_are_cancelled_at_the_end() {
    // The order instance answers every request (orders and their cancels) with an order id.
    let shop = Backend::start(r#"{"id":"o-1"}"#);
    let till = Backend::with_status("till", 503);
    let lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list("order", 1, &[("shop", shop.addr, 100)], &[lb.addr]));
    lb.set(list("pay", 1, &[("till", till.addr, 100)], &[lb.addr]));
    let report = closed_loop("sdk", &lb.addr.to_string(), "order=1,pay=1", 1, 40);
    let placed = by_type(&report, "order")["ok"].as_u64().unwrap();
    let paid = by_type(&report, "pay")["ok"].as_u64().unwrap();
    assert!(placed > 0 && till.hits() > 0, "{report}");
    assert_eq!(paid, 0, "{report}");
    let released = &report["released"];
    assert_eq!(released["cancelled"], placed, "{report}");
    assert_eq!(
        (&released["failed"], &released["forgotten"]),
        (&0.into(), &0.into())
    );
    assert_eq!(shop.hits(), 2 * placed, "each order and its cancel");
}

/// An order whose answer was lost (here a 504, as XBuy's `outcome_unknown`) is asked again under its key after
/// the run, and the order that answers (a replay) is cancelled with the others: it was neither cancelled nor
/// known to the run, and held its stock for the app's reservation time. A refusal made before any work (a
/// 503 `overloaded`) is not asked again: that would place an order only to cancel it.
#[test]
fn an_order_whose_answer_was_lost_is_asked_again_and_cancelled() {
    let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen, cancels) = (keys.clone(), Arc::new(AtomicU64::new(0)));
    let cancelled = cancels.clone();
    let shop = Backend::scripted(r#"{"id":"o-1"}"#, move |head| {
        if head.contains("/cancel ") {
            cancelled.fetch_add(1, Ordering::Relaxed);
            return 200;
        }
        let key = (head.lines()).find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("idempotency-key:")
                .map(|k| k.trim().to_string())
        });
        let mut seen = seen.lock().unwrap();
        seen.push(key);
        if seen.len() == 1 { 504 } else { 201 }
    });
    // One order, and it failed: the run exits 1.
    let one_order = |addr: SocketAddr| {
        let addr = addr.to_string();
        let args = [
            "--via",
            "rr",
            "--targets",
            &addr,
            "--mix",
            "order=1",
            "--requests",
            "1",
        ];
        load_exiting(&args, 1)
    };
    let report = one_order(shop.addr);
    assert_eq!(report["errors"], 1, "{report}");
    let released = &report["released"];
    assert_eq!(
        (
            &released["asked_again"],
            &released["cancelled"],
            &released["failed"]
        ),
        (&1.into(), &1.into(), &0.into()),
        "{report}"
    );
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 2, "the order, and once asked again: {keys:?}");
    assert!(
        keys[0].is_some() && keys[0] == keys[1],
        "under its own key: {keys:?}"
    );
    assert_eq!(cancels.load(Ordering::Relaxed), 1);

    let refused = Backend::scripted(r#"{"error":{"code":"overloaded","message":"busy"}}"#, |_| 503);
    let report = one_order(refused.addr);
    assert_eq!(report["released"]["asked_again"], 0, "{report}");
    assert_eq!(refused.hits(), 1, "{report}");
}

/// A run through the SDK says when no balancer vouched for its lists: here the only balancer dies once the
/// run has its list, the instance keeps answering from that list, and the report says for how long it was
/// served so (`lists.static_s`). Such a run used to read like one through a healthy cluster.
#[test]
fn a_run_says_when_no_balancer_vouched_for_its_lists() {
    let a = Backend::start("a");
    let mut lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr]));
    let lb_addr = lb.addr.to_string();
    let mut p = Proc::xcluster(
        "load",
        &[
            "load",
            "--via",
            "sdk",
            "--targets",
            &lb_addr,
            "--mix",
            "browse=1",
            "--workers",
            "1",
            "--duration-secs",
            "3",
            "--json",
        ],
    );
    // The bootstrap, then the watch: the run has its list.
    xcluster_tests::eventually(Duration::from_secs(10), "the run's watch", || {
        (lb.requests.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(())
    });
    lb.kill();
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(0), "{}", p.stderr());
    let report: Value = serde_json::from_str(&p.stdout()).unwrap();
    assert_eq!(report["errors"], 0, "the last list still serves: {report}");
    let lists = &report["lists"];
    assert!(lists["static_s"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert!(lists["max_age_s"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert_eq!(lists["expired"], false, "{report}");
}

/// Each closed-loop worker holds a connection: the load generator raises its soft descriptor limit to the
/// hard one, so 200 workers under a soft 128 run clean (they failed their connects past the limit with
/// EMFILE, counted as errors of the target).
#[test]
fn workers_past_the_soft_descriptor_limit_run_clean() {
    // Each answer takes 50 ms, so the 200 workers' connections are open at once.
    let backend = Backend::with_delay("a", Duration::from_millis(50));
    let script = format!(
        "ulimit -Sn 128 && exec \"$0\" load --via rr --targets {} --mix browse=1 --workers 200 \
         --requests 1000 --json",
        backend.addr
    );
    let mut p = Proc::spawn(
        "load",
        std::path::Path::new("/bin/sh"),
        xcluster_tests::Spawn {
            args: vec![
                "-c".into(),
                script,
                xcluster_tests::xcluster_bin().display().to_string(),
            ],
            ..Default::default()
        },
    );
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(0), "{}", p.stderr());
    let report: Value = serde_json::from_str(&p.stdout()).unwrap();
    assert_eq!(
        (report["requests"].as_u64(), report["errors"].as_u64()),
        (Some(1000), Some(0)),
        "{report}"
    );
}

/// A client whose every balancer came back on new addresses finds them by the name it was given, because
/// the names are resolved again while no balancer answers (it resolved them once, at its start, and the
/// lists it learned from named only the old addresses). The run's `/etc/hosts` is a file of the test's,
/// bound over the real one in a mount namespace of the run's own (`unshare -m`, private propagation), and
/// rewritten in place mid-run.
#[test]
fn balancers_back_on_new_addresses_are_found_by_name() {
    let hold = Duration::from_secs(60);
    // Both on one port, so one name and port reach either by its address.
    let (old, new) = (0..20)
        .find_map(|_| {
            let new = FakeBalancer::start_at("127.0.0.2:0", hold)?;
            let old = FakeBalancer::start_at(&format!("127.0.0.1:{}", new.addr.port()), hold)?;
            Some((old, new))
        })
        .expect("a port free on 127.0.0.1 and 127.0.0.2");
    let (mut old, a, b) = (old, Backend::start("a"), Backend::start("b"));
    old.set(list("browse", 1, &[("a", a.addr, 100)], &[old.addr]));
    new.set(list("browse", 1, &[("b", b.addr, 100)], &[new.addr]));
    let dir = tempfile::tempdir().unwrap();
    let hosts = xcluster_tests::write_file(dir.path(), "hosts", "127.0.0.1 lb.test\n");
    let name = format!("lb.test:{}", old.addr.port());
    let mut args: Vec<String> = ["-m", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""]
        .map(String::from)
        .into();
    args.push(hosts.display().to_string());
    args.push(xcluster_tests::xcluster_bin().display().to_string());
    args.extend(
        [
            "load",
            "--via",
            "sdk",
            "--targets",
            &name,
            "--mix",
            "browse=1",
            "--workers",
            "1",
            "--duration-secs",
            "60",
            "--json",
        ]
        .map(String::from),
    );
    let spawn = xcluster_tests::Spawn {
        args,
        ..Default::default()
    };
    let mut p = Proc::spawn("load", std::path::Path::new("unshare"), spawn);
    let asked = |lb: &FakeBalancer| lb.requests.load(std::sync::atomic::Ordering::Relaxed);
    // The bootstrap, then the watch, through the name's first address.
    xcluster_tests::eventually(
        Duration::from_secs(10),
        "the run's watch on the old address",
        || (asked(&old) >= 2 && a.hits.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(()),
    );
    // In place: the bind mount holds the file's inode.
    std::fs::write(&hosts, "127.0.0.2 lb.test\n").unwrap();
    old.kill();
    xcluster_tests::eventually(
        Duration::from_secs(20),
        "the new address asked, by the name",
        || (asked(&new) >= 1 && b.hits.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(()),
    );
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0), "{}", p.stderr());
    let report: Value = serde_json::from_str(&p.stdout()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    let served = |x: &Backend| {
        report["backends"][x.addr.to_string()]["requests"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(served(&a) > 0 && served(&b) > 0, "{report}");
}

/// An open loop (`--rate`) ends at its `--duration-secs` even when its targets hold every request: against
/// a backend that accepts and never answers, 10 in flight at most, each held for 5 s, the 2,000 requests of
/// a 2 s run at 1,000/s took their backlog's 1,000 s. What was not sent is said. A rate past one a
/// microsecond is refused (at 3e9/s the interval rounded to nothing and the schedule never ended).
#[test]
fn an_open_loop_ends_at_its_duration_against_a_target_that_holds_every_request() {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = hung.local_addr().unwrap().to_string();
    let args = ["load", "--via", "rr", "--targets", &target, "--mix", "browse=1"];
    let more = [
        "--rate",
        "1000",
        "--max-in-flight",
        "10",
        "--timeout-ms",
        "5000",
        "--duration-secs",
        "2",
    ];
    let mut p = Proc::xcluster("load", &[&args[..], &more[..]].concat());
    // Accepted (the backlog holds them), never answered: 10 at a time, until the run ends.
    assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(1), "{}", p.stderr());
    assert!(
        p.stderr().contains("were not sent by the end of the run"),
        "{}",
        p.stderr()
    );
    drop(hung);
    let mut p = Proc::xcluster("load", &[&args[..], &["--rate", "3000000000"][..]].concat());
    assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(64), "{}", p.stderr());
    assert!(
        p.stderr().contains("--rate must be at most 1000000"),
        "{}",
        p.stderr()
    );
}

/// The end-of-run cancels are retried on another instance when one answers 503 (draining, as during a
/// roll): they carry a key of their own, so the SDK may send them again. Sent once, each cancel that met
/// the failing instance left its order reserved for the app's reservation time.
#[test]
fn an_end_of_run_cancel_refused_by_one_instance_is_retried_on_another() {
    let cancels_refused = Arc::new(AtomicU64::new(0));
    let refused = cancels_refused.clone();
    let draining = Backend::scripted(r#"{"id":"o-1"}"#, move |head| {
        if head.contains("/cancel ") {
            refused.fetch_add(1, Ordering::Relaxed);
            503
        } else {
            200
        }
    });
    let shop = Backend::start(r#"{"id":"o-1"}"#);
    let lb = FakeBalancer::start(Duration::from_secs(60));
    let both = [("draining", draining.addr, 100), ("shop", shop.addr, 100)];
    lb.set(list("order", 1, &both, &[lb.addr]));
    let report = closed_loop("sdk", &lb.addr.to_string(), "order=1", 1, 40);
    let placed = by_type(&report, "order")["ok"].as_u64().unwrap();
    assert!(placed > 0, "{report}");
    let released = &report["released"];
    assert_eq!(released["cancelled"], placed, "{report}");
    assert_eq!(released["failed"], 0, "{report}");
    assert!(
        cancels_refused.load(Ordering::Relaxed) > 0,
        "the draining instance met some cancels"
    );
}

/// In SDK mode an instance that accepts and never answers is timed out by the exchange's own timeout, four
/// fifths of `--timeout-ms`, which ejects it: a browse that met it is retried on the other instance within
/// what is left, and the runs' next requests keep off it. With the exchange's timeout equal to the
/// request's, the deadline always cut first, which ejects nothing: every request that picked the hung
/// instance waited out `--timeout-ms` and failed as `deadline`.
#[test]
fn sdk_mode_ejects_an_instance_that_never_answers() {
    let (hung, good) = (Backend::hanging("hung"), Backend::start("ok"));
    let lb = FakeBalancer::start(Duration::from_secs(60));
    // Weighted towards the hung one, so the run meets it at once.
    let both = [("hung", hung.addr, 9000), ("good", good.addr, 1000)];
    lb.set(list("browse", 1, &both, &[lb.addr]));
    // The retry gets the fifth left after the hung exchange's timeout: 400 ms, ample on a busy machine.
    let report = sdk_one_worker(lb.addr, "browse=1", 10, 2000, 0);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(by_type(&report, "browse")["ok"], 10, "{report}");
    assert_eq!(hung.hits(), 1, "ejected after its first timeout: {report}");
}

/// An SDK-mode request that fails is counted against the instance it failed on, as in the other modes, so
/// an instance that fails every request shows in the shares (it was left out: SDK errors named none).
#[test]
fn sdk_mode_counts_a_failure_against_its_instance() {
    let hung = Backend::hanging("hung");
    let lb = FakeBalancer::start(Duration::from_secs(60));
    lb.set(list("order", 1, &[("hung", hung.addr, 100)], &[lb.addr]));
    let report = sdk_one_worker(lb.addr, "order=1", 2, 300, 1);
    assert_eq!(by_type(&report, "order")["errors"]["timeout"], 2, "{report}");
    assert_eq!(
        report["backends"][hung.addr.to_string()]["requests"],
        2,
        "{report}"
    );
}

/// Rates are over the run's schedule: a 2 s run at 100 requests/s, half of them to a target that holds each
/// until `--timeout-ms` (3 s), reports its ok/s over 2 s. Divided by the whole wait for the last answers,
/// 5 s, it said 20 ok/s for 50.
#[test]
fn an_open_loops_rate_is_over_its_schedule_not_the_wait_for_its_last_answers() {
    let ok = Backend::start("ok");
    let hung = Backend::hanging("hung");
    let targets = format!("{},{}", ok.addr, hung.addr);
    let report = load_exiting(
        &[
            "--via",
            "rr",
            "--targets",
            &targets,
            "--mix",
            "browse=1",
            "--rate",
            "100",
            "--duration-secs",
            "2",
            "--timeout-ms",
            "3000",
        ],
        0,
    );
    let browse = by_type(&report, "browse");
    // Half the requests, as many as the schedule sent (a busy machine may send a few late).
    let ok = browse["ok"].as_f64().unwrap();
    assert!(ok >= 90.0, "{report}");
    let rate = browse["throughput_rps"].as_f64().unwrap();
    assert!((rate - ok / 2.0).abs() < 0.5, "ok/s {rate} for {ok} ok: {report}");
}
