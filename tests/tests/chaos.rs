//! Chaos over the whole local cluster (`xcluster up`) under SDK load (`xcluster load --via sdk`): in turn,
//! `kill -9` an app, `kill -9` a balancer, SIGSTOP a balancer (a hung peer, not a dead one) and resume it,
//! `kill -9` the agent, and `kill -9` the monitor and start it again (it adopts the running programs; then a
//! program it adopted is killed, to show it is supervised). After each, the program is back; at the end no
//! idempotent request failed (the SDK retried on another instance), every acknowledged order exists, nothing
//! was oversold and the app's invariant checker is clean. `scripts/chaos` runs the long, random version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod local_cluster;
mod monitor_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use local_cluster::{LocalCluster, PROGRAMS};
use monitor_common::*;
use nix::sys::signal::Signal;
use xcluster_tests::*;

const LONG: Duration = Duration::from_secs(20);

/// `kill -9` of `program`; waits until the monitor runs a new process for it that serves (`/readyz`),
/// then until it is RUNNING and ready again (so steps do not overlap). Returns the time from the kill
/// until the new process was seen, for the log.
fn kill_and_wait_back(c: &LocalCluster, program: &str) -> Duration {
    let old = c.mon.pid(program).expect("a pid");
    kill9(old);
    let killed = Instant::now();
    let new = eventually(LONG, &format!("a new {program}"), || {
        let pid = c.mon.pid(program)?;
        (pid != old && alive(pid)).then_some(pid)
    });
    let back = killed.elapsed();
    assert!(!alive(old), "{program}: the killed process is still there");
    eventually(LONG, &format!("{program} ({new}) to serve"), || {
        get(c.addr_of(program), "/readyz")
            .ok()
            .filter(|r| r.status == 200)
    });
    wait_running_ready(c, program);
    back
}

fn wait_running_ready(c: &LocalCluster, program: &str) {
    eventually(LONG, &format!("{program} running and ready"), || {
        let p = c.mon.prog(program);
        (p["state"] == "RUNNING" && p["ready"] == true).then_some(())
    });
}

fn audit(app: SocketAddr) -> serde_json::Value {
    let r = get(app, "/admin/audit").unwrap();
    assert_eq!(r.status, 200, "audit: {}", r.body);
    r.json()
}

#[test]
fn the_cluster_survives_each_component_being_killed_or_hung_under_load() {
    let mut c = LocalCluster::start();
    c.wait_serving(LONG);

    // The load: keyed orders, browsing and payments through the SDK, until SIGINT.
    let orders_file = c.run.path().join("acknowledged-orders.txt");
    let targets = format!("{},{}", c.balancers[0], c.balancers[1]);
    let mut load = Proc::xcluster(
        "load",
        &[
            "load",
            "--via",
            "sdk",
            "--targets",
            &targets,
            "--mix",
            "browse=6,order=3,pay=1",
            "--workers",
            "4",
            "--duration-secs",
            "300",
            "--timeout-ms",
            "10000",
            "--json",
            "--orders-out",
            orders_file.to_str().unwrap(),
        ],
    );
    // Orders are flowing before the first fault.
    eventually(LONG, "the first orders under load", || {
        (audit(c.apps[0])["totals"]["orders"].as_u64()? >= 10).then_some(())
    });

    let mut back = Vec::new();
    back.push(("app-1", kill_and_wait_back(&c, "app-1")));
    back.push(("lb-0", kill_and_wait_back(&c, "lb-0")));

    // A hung balancer: stopped, not dead. Held until the monitor's readiness probe sees it hang, as every
    // client does, then resumed; it must serve again without a restart.
    let lb1 = c.mon.pid("lb-1").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lb1), Signal::SIGSTOP).unwrap();
    eventually(LONG, "the monitor to see lb-1 hang", || {
        (c.mon.prog("lb-1")["ready"] == false).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lb1), Signal::SIGCONT).unwrap();
    wait_running_ready(&c, "lb-1");
    assert_eq!(
        c.mon.pid("lb-1"),
        Some(lb1),
        "a hung balancer resumes, not restarts"
    );

    back.push(("agent", kill_and_wait_back(&c, "agent")));

    // The monitor: the new one adopts every program (same pids, no restart) and supervises them.
    let pids: Vec<i32> = PROGRAMS.iter().map(|p| c.mon.pid(p).unwrap()).collect();
    let killed = Instant::now();
    c.kill_and_restart_monitor();
    back.push(("monitor", killed.elapsed()));
    for (p, pid) in PROGRAMS.iter().zip(&pids) {
        wait_running_ready(&c, p);
        assert_eq!(c.mon.pid(p), Some(*pid), "{p} adopted, not restarted");
    }
    assert!(
        c.mon
            .events()
            .iter()
            .any(|e| e["kind"] == "monitor" && e["detail"].as_str().unwrap().contains("adopted")),
        "{:?}",
        c.mon.events()
    );
    back.push(("app-2 (adopted)", kill_and_wait_back(&c, "app-2")));

    load.signal(Signal::SIGINT);
    assert_eq!(load.wait_exit(LONG), Some(0), "{}", load.stderr());
    let report: serde_json::Value = serde_json::from_str(&load.stdout()).expect("the load's JSON report");
    eprintln!("restart times: {back:?}");
    eprintln!(
        "requests: {}, errors: {}, by type: {}",
        report["requests"],
        report["errors"],
        report["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{}={} {}", t["request_type"], t["requests"], t["errors"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(report["requests"].as_u64().unwrap() > 100, "{report}");
    // Every request type here is idempotent (browse is a GET, order and pay carry keys): none may fail.
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["refused"], 0, "{report}");

    // No acknowledged order lost: each is found through the API (any app: they share the store).
    let acked = std::fs::read_to_string(&orders_file).unwrap();
    let ids: Vec<&str> = acked.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(!acked.contains("# dropped"));
    assert!(ids.len() >= 10, "{} orders acknowledged", ids.len());
    for (i, id) in ids.iter().enumerate() {
        let app = c.apps[i % 3];
        let r = get(app, &format!("/v1/orders/{id}")).unwrap();
        assert_eq!(r.status, 200, "acknowledged order {id} not found: {}", r.body);
    }
    let a = audit(c.apps[0]);
    assert_eq!(a["ok"], true, "{a}");
    let oversell = a["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ch| ch["name"] == "no_oversell")
        .unwrap()
        .clone();
    assert_eq!(oversell["violations"], 0, "{a}");
    // Each was found above (a missing one fails the test there), so the count is the one number to show.
    eprintln!("{} acknowledged orders, each found through the API", ids.len());
    // The run's unpaid orders were cancelled after it: no stock stays reserved for the reservation time.
    let released = &report["released"];
    assert!(released["cancelled"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        (&released["failed"], &released["forgotten"]),
        (&0.into(), &0.into()),
        "{report}"
    );
    assert_eq!(a["totals"]["units_reserved"], 0, "{a}");
}
