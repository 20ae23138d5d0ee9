//! The directory end to end: two real balancers, real agents and fake app instances whose load the test
//! drives. A loaded instance loses weight on both balancers, which publish the same version; a watch wakes
//! on a change; an instance whose agent stops reporting leaves the table after the TTL; a drained instance
//! gets no picks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod directory_support;

use std::time::{Duration, Instant};

use directory_support::*;
use xcluster_tests::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn load_moves_weight_on_both_balancers_and_watch_expiry_drain_behave() {
    let dir = tempfile::tempdir().unwrap();
    let (lb1, lb2) = (free_addr(), free_addr());
    let _p1 = start("lb", lb1, &lb_config(lb1, &[lb2]), dir.path());
    let _p2 = start("lb", lb2, &lb_config(lb2, &[lb1]), dir.path());
    let (app_a, app_b) = (FakeApp::start("a"), FakeApp::start("b"));
    let (ag1, ag2) = (free_addr(), free_addr());
    // Instance A's "process" is this test process, so the agent has a real pid to sample.
    let pid_file = write_file(dir.path(), "a.pid", &format!("{}\n", std::process::id()));
    let cfg1 = agent_config(ag1, "host-1", &[lb1, lb2], &[("h1/a", &app_a)]).replace(
        &format!("addr = \"{}\"\n", app_a.addr),
        &format!(
            "addr = \"{}\"\npid_file = \"{}\"\n",
            app_a.addr,
            pid_file.display()
        ),
    );
    let agent1 = start("agent", ag1, &cfg1, dir.path());
    let agent2 = start(
        "agent",
        ag2,
        &agent_config(ag2, "host-2", &[lb1, lb2], &[("h2/b", &app_b)]),
        dir.path(),
    );
    let cpu_start = proc_cpu_ticks(agent1.pid());

    // Both instances come up on both balancers, past slow start, with equal weights.
    for lb in [lb1, lb2] {
        eventually(WAIT, "both instances up with equal weights", || {
            let l = servers(lb, "browse");
            let (a, b) = (entry(&l, "h1/a")?, entry(&l, "h2/b")?);
            (a.1 == "up" && b.1 == "up" && a.0 == b.0 && a.0 > 0).then_some(())
        });
    }
    // The agent's latest report: sequence numbers start at the wall clock in µs (so they survive restarts),
    // and the instance's own process figures come from /proc/<pid>.
    let rep = eventually(WAIT, "agent report with process figures", || {
        let r = get(ag1, "/v1/report").ok().filter(|r| r.status == 200)?.json();
        (r["instances"][0]["rss_bytes"].as_u64()? > 0).then_some(r)
    });
    assert!(
        rep["seq"].as_u64().unwrap() > (now_ms() - 600_000) * 1000,
        "{rep}"
    );
    assert!(rep["host"]["cores"].as_u64().unwrap() >= 1);
    let list = servers(lb1, "browse");
    let mut balancers: Vec<String> = list["balancers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().to_string())
        .collect();
    balancers.sort();
    let mut expected = vec![lb1.to_string(), lb2.to_string()];
    expected.sort();
    assert_eq!(balancers, expected, "every server list names every balancer");

    // Load instance A's queue: its browse weight falls on both balancers, and both publish one version.
    app_a.set(|s| s.in_flight = 80);
    let (wa, wb) = eventually(
        WAIT,
        "A's weight to fall on both balancers with equal versions",
        || {
            let (l1, l2) = (servers(lb1, "browse"), servers(lb2, "browse"));
            let (a1, b1) = (entry(&l1, "h1/a")?, entry(&l1, "h2/b")?);
            let (a2, b2) = (entry(&l2, "h1/a")?, entry(&l2, "h2/b")?);
            let settled = a1.0 * 4 < b1.0 && a2.0 * 4 < b2.0;
            (settled && l1["version"] == l2["version"] && a1 == a2 && b1 == b2).then_some((a1.0, b1.0))
        },
    );
    println!("loaded instance weight {wa} vs idle {wb} on both balancers");
    // Picks follow the weights: the idle instance gets most of them.
    let mut b_picks = 0;
    for _ in 0..100 {
        let p = get(lb1, "/v1/pick?type=browse").unwrap();
        assert_eq!(p.status, 200, "{}", p.body);
        if p.json()["id"] == "h2/b" {
            b_picks += 1;
        }
    }
    assert!(b_picks >= 60, "idle instance got only {b_picks} of 100 picks");

    // A watch on the current version returns when the table changes (B turns unready). A's weight may still
    // be taking damped steps, which are changes too, so re-watch from each answer until one shows B down.
    let v = servers(lb1, "browse")["version"].as_u64().unwrap();
    let begun = watches_begun(lb1);
    let watcher = std::thread::spawn(move || {
        let mut v = v;
        let deadline = Instant::now() + WAIT;
        loop {
            let r = get(lb1, &format!("/v1/servers?type=browse&watch={v}")).unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            let l = r.json();
            let nv = l["version"].as_u64().unwrap();
            assert_ne!(nv, v, "the watch returned without a change (timeout)");
            if entry(&l, "h2/b").is_some_and(|(_, state)| state == "down") {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "no watch answer showed B down");
            v = nv;
        }
    });
    // The long poll reaches the balancer before anything changes; the answer must still be a change.
    wait_watching(lb1, begun);
    let changed_at = Instant::now();
    app_b.set(|s| s.ready = false);
    let returned_at = watcher.join().unwrap();
    println!(
        "watch returned {:?} after the app turned unready (agent sampling + early push + balancer)",
        returned_at.saturating_duration_since(changed_at)
    );
    // The unready instance was reported as a jump (at once; the watch latency above shows how soon).
    eventually(WAIT, "a jump report after an instance turned unready", || {
        let early = metric_value(
            &get(ag2, "/metrics").ok()?.body,
            "xcluster_agent_jump_reports_total",
            "",
        );
        (early.unwrap_or(0.0) >= 1.0).then_some(())
    });
    eventually(WAIT, "B down with weight 0 on both", || {
        let ok = [lb1, lb2]
            .iter()
            .all(|lb| entry(&servers(*lb, "browse"), "h2/b") == Some((0, "down".into())));
        ok.then_some(())
    });
    app_b.set(|s| s.ready = true);
    app_a.set(|s| s.in_flight = 0);
    eventually(WAIT, "both up again", || {
        let l = servers(lb1, "browse");
        (entry(&l, "h1/a")?.1 == "up" && entry(&l, "h2/b")?.1 == "up").then_some(())
    });

    // Drain B on lb1: lb1 never picks it, lb2 still does; undrain restores it.
    let path = "/v1/servers/h2%2Fb/drain";
    assert_eq!(
        request(lb1, "POST", path, &[], None).unwrap().status,
        401,
        "token required"
    );
    let r = set_drain(lb1, "h2/b", "drain");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        entry(&servers(lb1, "browse"), "h2/b"),
        Some((0, "drained".into()))
    );
    for _ in 0..50 {
        let p = get(lb1, "/v1/pick?type=browse").unwrap().json();
        assert_eq!(p["id"], "h1/a", "a drained instance was picked");
    }
    eventually(WAIT, "lb2 (not drained) still picks B", || {
        (get(lb2, "/v1/pick?type=browse").unwrap().json()["id"] == "h2/b").then_some(())
    });
    let r = set_drain(lb1, "h2/b", "undrain");
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(WAIT, "lb1 picks B again", || {
        (get(lb1, "/v1/pick?type=browse").unwrap().json()["id"] == "h2/b").then_some(())
    });

    // The agent's own cost so far (figures for the report; not asserted: timing is not a test).
    let cpu_end = proc_cpu_ticks(agent1.pid());
    println!(
        "agent: {} ticks of CPU over the test, RSS {} kB",
        cpu_end.saturating_sub(cpu_start),
        proc_rss_kb(agent1.pid())
    );

    // Agent 2 stops reporting: B leaves both tables after the TTL; A stays.
    drop(agent2);
    let stopped = Instant::now();
    for lb in [lb1, lb2] {
        eventually(WAIT, "B to leave the table", || {
            let l = servers(lb, "browse");
            (entry(&l, "h2/b").is_none() && entry(&l, "h1/a").is_some()).then_some(())
        });
    }
    println!(
        "stale instance left both tables {:?} after its agent stopped",
        stopped.elapsed()
    );
    let status = get(lb1, "/v1/status").unwrap().json();
    assert!(status["reports_accepted"].as_u64().unwrap() > 0);
    let metrics = get(lb1, "/metrics").unwrap().body;
    assert!(metric_value(&metrics, "xcluster_lb_reports_accepted_total", "").unwrap() > 0.0);
    eventually(WAIT, "weight gauge exported", || {
        let m = get(lb1, "/metrics").unwrap().body;
        metric_value(
            &m,
            "xcluster_lb_instance_weight",
            "instance_id=\"h1/a\",type=\"browse\"",
        )
        .filter(|w| *w > 0.0)
    });
    drop(agent1);
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields after the command, numeric only (state is skipped by the filter): utime and stime.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

fn proc_rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Drains outlive a balancer's restart: a balancer that starts takes the drained instances of its peers
/// before it is ready, reported or not yet, and an undrain done while it was away is taken the same way.
#[test]
fn a_restarted_balancer_takes_its_peers_drains_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (lb1, lb2) = (free_addr(), free_addr());
    let _p1 = start("lb", lb1, &lb_config(lb1, &[lb2]), dir.path());
    let mut p2 = start("lb", lb2, &lb_config(lb2, &[lb1]), dir.path());
    let (a, b) = (FakeApp::start("a"), FakeApp::start("b"));
    let instances = [("h1/a", a.addr, 0), ("h1/b", b.addr, 0)];
    let report_to = |lb| {
        let r = post_signed(lb, &report("host-1", now_ms() * 1000, now_ms(), &instances));
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let set = |lb, verb: &str| {
        let r = set_drain(lb, "h1/a", verb);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    // lb2's state of A once a report has named it there (the report's snapshot is rebuilt a moment after
    // its answer, so the list is read until it names A).
    let state_on_lb2 = || {
        eventually(WAIT, "lb2 to list h1/a", || {
            report_to(lb2);
            entry(&servers(lb2, "browse"), "h1/a").map(|e| e.1)
        })
    };
    let drained = |lb| -> Vec<String> {
        let s = get(lb, "/v1/status").unwrap().json();
        serde_json::from_value(s["drained"].clone()).unwrap()
    };
    for lb in [lb1, lb2] {
        report_to(lb);
        set(lb, "drain");
        // B at a quarter of its load-driven weight, which a restarted balancer takes as it takes drains.
        let r = set_drain(lb, "h1/b", "weight/25%25");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // A program's name is not an instance id: the answer names the one meant.
    let r = set_drain(lb1, "a", "drain");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains(r#"did you mean \"h1/a\"?"#), "{}", r.body);
    // Nor is its address, which names only a `[[proxy.backends]]` entry.
    let r = set_drain(lb1, &a.addr.to_string(), "drain");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains(r#"the instance at that address is \"h1/a\""#),
        "{}",
        r.body
    );
    // What a starting peer reads: the run-time state alone, bounded in size where the whole status is not.
    let state = get(lb1, "/v1/status?only=state").unwrap().json();
    assert_eq!(
        state,
        serde_json::json!({
            "drained": ["h1/a"],
            "weights": {"h1/b": "25%"},
            "state_changed_unix_ms": state["state_changed_unix_ms"].as_u64().unwrap(),
        })
    );
    assert_eq!(get(lb1, "/v1/status?only=types").unwrap().status, 400);
    let stop = |p: &mut Proc| {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(p.wait_exit(WAIT), Some(0), "{}", p.stderr());
    };
    stop(&mut p2);
    p2 = start("lb", lb2, &lb_config(lb2, &[lb1]), dir.path());
    // Ready, and no report yet: the drain came from lb1.
    assert_eq!(drained(lb2), ["h1/a"]);
    assert_eq!(state_on_lb2(), "drained");
    assert!(
        p2.stderr().contains("drained instances taken from a peer"),
        "{}",
        p2.stderr()
    );
    let weights = get(lb2, "/v1/status").unwrap().json()["weights"].clone();
    assert_eq!(weights, serde_json::json!({"h1/b": "25%"}));
    assert!(
        p2.stderr().contains("run-time weights taken from a peer"),
        "{}",
        p2.stderr()
    );

    // Undrained on lb1 while lb2 is away: the next lb2 starts undrained too.
    stop(&mut p2);
    set(lb1, "undrain");
    p2 = start("lb", lb2, &lb_config(lb2, &[lb1]), dir.path());
    assert!(drained(lb2).is_empty());
    assert_ne!(state_on_lb2(), "drained");
    drop(p2);
}

/// `agent_id` needs a restart (sequence numbers are per process and agent id): a reload that changes it
/// says so, and the agent goes on reporting under the id it started with, which the balancer still takes,
/// until it is restarted. It read the id from the reloaded config per report, and so changed it at once
/// while its log said it had not.
#[test]
fn an_agent_keeps_its_id_across_a_reload_until_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let _lb = start("lb", lb, &lb_config(lb, &[]), dir.path());
    let app = FakeApp::start("a");
    let ag = free_addr();
    let config = |id: &str| agent_config(ag, id, &[lb], &[("h1/a", &app)]);
    let mut agent = start("agent", ag, &config("host-1"), dir.path());
    let path = dir.path().join(format!("agent-{}.toml", ag.port()));
    let latest = || -> Option<(String, u64)> {
        let r = get(ag, "/v1/report").ok().filter(|r| r.status == 200)?.json();
        Some((r["agent"].as_str()?.to_string(), r["seq"].as_u64()?))
    };
    let accepted = || {
        get(lb, "/v1/status").unwrap().json()["reports_accepted"]
            .as_u64()
            .unwrap()
    };
    eventually(WAIT, "a report accepted from host-1", || {
        (latest()?.0 == "host-1" && accepted() > 0).then_some(())
    });

    // The id changed in the file, and a live key beside it, which shows that the reload applied.
    let edited = config("host-2").replace("interval_ms = 500", "interval_ms = 200");
    std::fs::write(&path, edited).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(WAIT, "the reload warning naming agent_id", || {
        let log = agent.stderr();
        (log.contains("changed keys that need a restart") && log.contains("agent_id")).then_some(())
    });
    let reloaded = (latest().unwrap().1, accepted());
    // Several reports later (at the new interval): all of them still from host-1, and taken.
    let (id, _) = eventually(WAIT, "five more reports after the reload", || {
        let (id, seq) = latest()?;
        (seq >= reloaded.0 + 5 && accepted() >= reloaded.1 + 5).then_some((id, seq))
    });
    assert_eq!(id, "host-1", "the running id stays until a restart");
    let metrics = get(ag, "/metrics").unwrap().body;
    assert_eq!(
        metric_value(&metrics, "xcluster_config_restart_pending", "role=\"agent\""),
        Some(1.0),
        "{metrics}"
    );

    // Restarted: the new id.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait_exit(WAIT), Some(0), "{}", agent.stderr());
    drop(agent);
    let _agent = start("agent", ag, &std::fs::read_to_string(&path).unwrap(), dir.path());
    eventually(WAIT, "a report from host-2 after the restart", || {
        (latest()?.0 == "host-2").then_some(())
    });
}
