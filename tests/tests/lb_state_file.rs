//! A balancer's state file (`[directory] state_file`): the drains and run-time weights set through its API
//! survive a restart with no peer to take them from, after a SIGKILL (the file is written before the call
//! is answered) as after a SIGTERM; a corrupt file is set aside and the balancer starts anyway; a failed
//! write is counted while the call still succeeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod directory_support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use directory_support::*;
use nix::sys::signal::Signal;
use xcluster_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// The one balancer's config (no peers), keeping its state in `state`.
fn config(lb: SocketAddr, state: &Path) -> String {
    lb_config(lb, &[]).replace(
        "[directory]\n",
        &format!("[directory]\nstate_file = {:?}\n", state.display().to_string()),
    )
}

/// `(drained, weights)` of `/v1/status`.
fn runtime_state(lb: SocketAddr) -> (serde_json::Value, serde_json::Value) {
    let s = get(lb, "/v1/status").unwrap().json();
    (s["drained"].clone(), s["weights"].clone())
}

fn call(lb: SocketAddr, id: &str, verb: &str) {
    let r = set_drain(lb, id, verb);
    assert_eq!(r.status, 200, "{verb} {id}: {}", r.body);
}

fn stderr_has(p: &Proc, what: &str) {
    eventually(WAIT, &format!("the log to say {what:?}"), || {
        p.stderr().contains(what).then_some(())
    });
}

#[test]
fn drains_and_weights_survive_a_restart_without_peers() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let state = dir.path().join("lb.state.json");
    let cfg = config(lb, &state);
    let mut p = start("lb", lb, &cfg, dir.path());
    stderr_has(&p, "no state file yet");
    let (a, b) = (FakeApp::start("a"), FakeApp::start("b"));
    let instances = [("h1/a", a.addr, 0), ("h1/b", b.addr, 0)];
    let report_to = |lb| {
        let r = post_signed(lb, &report("host-1", now_ms() * 1000, now_ms(), &instances));
        assert_eq!(r.status, 200, "{}", r.body);
    };
    report_to(lb);
    call(lb, "h1/a", "drain");
    call(lb, "h1/b", "weight/25%25");

    // kill -9 right after the answers: they were on disk before they were given.
    p.signal(Signal::SIGKILL);
    assert_eq!(p.wait_exit(WAIT), Some(128 + 9));
    let mut p = start("lb", lb, &cfg, dir.path());
    // Ready, with no report yet and no peer: both came from the file.
    assert_eq!(
        runtime_state(lb),
        (serde_json::json!(["h1/a"]), serde_json::json!({"h1/b": "25%"}))
    );
    stderr_has(&p, "drains and run-time weights restored from the state file");
    // And they act: once reported, A is listed drained (a report within 5 ms of the last rebuild is
    // published a little later, with the ones that follow it).
    report_to(lb);
    eventually(WAIT, "A listed once reported", || {
        entry(&servers(lb, "browse"), "h1/a")
    });
    assert_eq!(
        entry(&servers(lb, "browse"), "h1/a").map(|e| e.1),
        Some("drained".into())
    );

    // Undone and changed, then a clean stop (SIGTERM): the next start has the latest.
    call(lb, "h1/a", "undrain");
    call(lb, "h1/b", "weight/50%25");
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(WAIT), Some(0), "{}", p.stderr());
    let mut p = start("lb", lb, &cfg, dir.path());
    assert_eq!(
        runtime_state(lb),
        (serde_json::json!([]), serde_json::json!({"h1/b": "50%"}))
    );

    // A write that fails (its temp file's place is taken) is counted; the call still takes effect.
    let tmp = dir.path().join("lb.state.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    report_to(lb);
    call(lb, "h1/a", "drain");
    let errors = || {
        let m = get(lb, "/metrics").unwrap().body;
        metric_value(&m, "xcluster_lb_state_write_errors_total", "").unwrap_or(-1.0)
    };
    assert_eq!(errors(), 1.0);
    assert_eq!(runtime_state(lb).0, serde_json::json!(["h1/a"]));
    stderr_has(&p, "cannot write the state file");
    std::fs::remove_dir(&tmp).unwrap();

    // A corrupt file: set aside, with a warning naming it, and the balancer starts without its state.
    p.signal(Signal::SIGKILL);
    assert_eq!(p.wait_exit(WAIT), Some(128 + 9));
    std::fs::write(&state, "{\"version\": 1, \"drained\": [\"h1/a\"").unwrap();
    let p = start("lb", lb, &cfg, dir.path());
    assert_eq!(runtime_state(lb), (serde_json::json!([]), serde_json::json!({})));
    stderr_has(&p, "state file refused");
    assert!(
        p.stderr().contains(&state.display().to_string()),
        "{}",
        p.stderr()
    );
    assert!(dir.path().join("lb.state.json.bad").exists());
    // The settled (empty) state was written back at start: a valid file again.
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["version"], 1, "{written}");
    assert_eq!(written["drained"], serde_json::json!([]), "{written}");
}

/// With peers, the newest state wins whole: a peer that saw an undrain while this balancer was down wins
/// over its file; a peer that comes back without any state (its file lost) does not wipe this one's.
#[test]
fn the_newest_of_the_file_and_the_peers_state_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (lb1, lb2) = (free_addr(), free_addr());
    let (s1, s2) = (dir.path().join("lb1.json"), dir.path().join("lb2.json"));
    let cfg1 = config(lb1, &s1).replace("peers = []", &format!("peers = [\"{lb2}\"]"));
    let cfg2 = config(lb2, &s2).replace("peers = []", &format!("peers = [\"{lb1}\"]"));
    let mut p1 = start("lb", lb1, &cfg1, dir.path());
    let mut p2 = start("lb", lb2, &cfg2, dir.path());
    let (a, b) = (FakeApp::start("a"), FakeApp::start("b"));
    let instances = [("h1/a", a.addr, 0), ("h1/b", b.addr, 0)];
    for lb in [lb1, lb2] {
        let r = post_signed(lb, &report("host-1", now_ms() * 1000, now_ms(), &instances));
        assert_eq!(r.status, 200, "{}", r.body);
        call(lb, "h1/a", "drain");
        call(lb, "h1/b", "weight/25%25");
    }
    let stop = |p: &mut Proc| {
        p.signal(Signal::SIGTERM);
        assert_eq!(p.wait_exit(WAIT), Some(0), "{}", p.stderr());
    };
    let weight_only = (serde_json::json!([]), serde_json::json!({"h1/b": "25%"}));

    // Undrained on lb1 while lb2 is down: lb2's file still has the drain, but lb1's state is newer.
    stop(&mut p2);
    call(lb1, "h1/a", "undrain");
    p2 = start("lb", lb2, &cfg2, dir.path());
    assert_eq!(runtime_state(lb2), weight_only);
    stderr_has(&p2, "they replace them");

    // Both down; lb1 comes back without its file (lost): it has nothing, and says so with time 0. lb2,
    // starting beside it, keeps its file's state rather than take that empty one.
    stop(&mut p1);
    stop(&mut p2);
    std::fs::remove_file(&s1).unwrap();
    p1 = start("lb", lb1, &cfg1, dir.path());
    assert_eq!(runtime_state(lb1), (serde_json::json!([]), serde_json::json!({})));
    p2 = start("lb", lb2, &cfg2, dir.path());
    assert_eq!(runtime_state(lb2), weight_only);
    stderr_has(&p2, "newer than its peers': kept");
    // lb1's next start takes it back from lb2.
    stop(&mut p1);
    p1 = start("lb", lb1, &cfg1, dir.path());
    assert_eq!(runtime_state(lb1), weight_only);

    // Both down again, and lb1's file corrupt: lb1 starts first, finds no peer up, and keeps asking (for
    // a few seconds) until lb2, started after it, answers with the state lb1 lost. It used to ask once and
    // start with nothing, while lb2 kept the weight.
    stop(&mut p1);
    stop(&mut p2);
    std::fs::write(&s1, b"{ not json").unwrap();
    let path1 = write_file(dir.path(), &format!("lb-{}.toml", lb1.port()), &cfg1);
    let _p1 = Proc::xcluster("lb", &["lb", "--config", path1.to_str().unwrap()]);
    stderr_has(&_p1, "state file refused");
    let _p2 = start("lb", lb2, &cfg2, dir.path());
    wait_ready(lb1, WAIT);
    assert_eq!(runtime_state(lb1), weight_only);
}

/// Two balancers given one state file would overwrite each other's drains: the second is refused at start,
/// naming the file, also through a symlink, and the first keeps running and writing it. Once the first is
/// gone (even killed: the kernel drops its lock), the file is free again, and written through the link.
#[test]
fn a_second_balancer_given_the_same_state_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("lb.state.json");
    let (lb1, lb2) = (free_addr(), free_addr());
    let mut first = start("lb", lb1, &config(lb1, &state), dir.path());
    // The second is given the file through a symlink: the same file, so refused as well.
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink("lb.state.json", &link).unwrap();
    let cfg2 = write_file(dir.path(), "lb2.toml", &config(lb2, &link));
    let mut second = Proc::xcluster("lb2", &["lb", "--config", cfg2.to_str().unwrap()]);
    assert_eq!(second.wait_exit(WAIT), Some(1), "{}", second.stderr());
    let why = second.stderr();
    assert!(
        why.contains("another balancer keeps its state in") && why.contains(&state.display().to_string()),
        "{why}"
    );
    let a = FakeApp::start("a");
    let r = post_signed(
        lb1,
        &report("host-1", now_ms() * 1000, now_ms(), &[("h1/a", a.addr, 0)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    call(lb1, "h1/a", "drain");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["drained"], serde_json::json!(["h1/a"]), "{written}");

    first.signal(Signal::SIGKILL);
    assert_eq!(first.wait_exit(WAIT), Some(128 + 9));
    let _second = start("lb", lb2, &config(lb2, &link), dir.path());
    assert_eq!(runtime_state(lb2).0, serde_json::json!(["h1/a"]));
    // Its writes go through the link, which stays one.
    call(lb2, "h1/a", "undrain");
    assert!(
        link.is_symlink(),
        "the state file's symlink was replaced by a file"
    );
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(written["drained"], serde_json::json!([]), "{written}");
}

/// While a starting balancer asks its peers for their drains and weights (here for its 5 s of patience: its
/// file was refused, and its peer does not answer), a drain or weight call is refused (503 `starting`),
/// and taken once it is ready. Taken during the start, the call made this balancer's own state the newest,
/// and the peers' drains were not taken at all.
#[test]
fn a_drain_while_the_balancer_takes_its_peers_state_is_refused_until_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let (lb, silent_peer) = (free_addr(), free_addr());
    let state = dir.path().join("lb.state.json");
    std::fs::write(&state, "not json").unwrap();
    let cfg = config(lb, &state).replace("peers = []", &format!("peers = [\"{silent_peer}\"]"));
    assert!(cfg.contains(&silent_peer.to_string()), "{cfg}");
    let path = write_file(dir.path(), "lb.toml", &cfg);
    let p = Proc::xcluster("lb", &["lb", "--config", path.to_str().unwrap()]);
    let refused = eventually(WAIT, "the API to answer", || {
        let r = request(
            lb,
            "POST",
            "/v1/servers/h1%2Fa/drain",
            &[("authorization", &format!("Bearer {TOKEN}"))],
            None,
        )
        .ok()?;
        Some(r)
    });
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "starting", "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    wait_ready(lb, WAIT);
    let a = FakeApp::start("a");
    let r = post_signed(
        lb,
        &report("host-1", now_ms() * 1000, now_ms(), &[("h1/a", a.addr, 0)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    call(lb, "h1/a", "drain");
    assert_eq!(runtime_state(lb).0, serde_json::json!(["h1/a"]));
    drop(p);
}
