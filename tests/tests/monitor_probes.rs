//! Probes drive restarts (liveness) and ordering (readiness + `depends_on`), and shutdown stops dependents
//! before what they depend on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use monitor_common::*;
use xcluster_tests::*;

#[test]
fn a_failing_liveness_probe_restarts_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = dir.path().join("healthy");
    std::fs::write(&healthy, "").unwrap();
    let m = Mon::start(&format!(
        r#"
[programs.svc]
command = "sleep 300"
startsecs = 0
[programs.svc.liveness]
command = "test -e {}"
period_ms = 100
failure_threshold = 2
"#,
        healthy.display()
    ));
    m.wait_state("svc", "RUNNING", T);
    let pid = m.pid("svc").unwrap();
    eventually(T, "liveness passing", || {
        (m.prog("svc")["liveness"]["ok"] == true).then_some(())
    });
    assert_eq!(m.pid("svc"), Some(pid), "a passing probe restarts nothing");
    std::fs::remove_file(&healthy).unwrap();
    let events_before = m.events().len();
    eventually(T, "a liveness failure event", || {
        m.events()
            .iter()
            .any(|e| e["kind"] == "probe" && e["probe"] == "liveness" && e["ok"] == false)
            .then_some(())
    });
    // failure_threshold failures in a row: the process is restarted.
    m.wait_new_pid("svc", pid, T);
    std::fs::write(&healthy, "").unwrap();
    assert!(m.prog("svc")["restarts"].as_u64().unwrap() >= 1);
    assert!(m.events().len() > events_before);
}

#[test]
fn depends_on_waits_for_readiness_and_shutdown_stops_in_reverse_order() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("db-ready");
    let order = dir.path().join("order");
    // Written by web once its TERM trap is set: RUNNING (startsecs = 0) only means spawned, and a shell
    // signalled before its `trap` line dies without recording its turn.
    let web_trapped = dir.path().join("web-trapped");
    let m = Mon::start(&format!(
        r#"
[programs.db]
command = "/bin/sh -c 'trap \"echo db >> {order}; exit 0\" TERM; while :; do sleep 0.05; done'"
startsecs = 0
[programs.db.readiness]
command = "test -e {ready}"
period_ms = 100
[programs.web]
command = "/bin/sh -c 'trap \"echo web >> {order}; exit 0\" TERM; touch {web_trapped}; while :; do sleep 0.05; done'"
startsecs = 0
depends_on = ["db"]
"#,
        ready = ready.display(),
        order = order.display(),
        web_trapped = web_trapped.display()
    ));
    m.wait_state("db", "RUNNING", T);
    eventually(T, "db's readiness probe to fail once", || {
        (m.prog("db")["readiness"]["ok"] == false).then_some(())
    });
    let web = m.prog("web");
    assert_eq!(web["state"], "STOPPED", "web must wait for db to be ready: {web}");
    assert_eq!(web["waiting_for"][0], "db");
    assert_eq!(m.prog("db")["ready"], false);

    std::fs::write(&ready, "").unwrap();
    m.wait_state("web", "RUNNING", T);
    let events = m.events();
    let seq = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .find(|e| pred(e))
            .map(|e| e["seq"].as_u64().unwrap())
    };
    let db_ready = seq(&|e| e["kind"] == "probe" && e["program"] == "db" && e["ok"] == true).unwrap();
    let web_start = seq(&|e| e["kind"] == "state" && e["program"] == "web" && e["to"] == "STARTING").unwrap();
    assert!(
        db_ready < web_start,
        "web started before db was ready: {events:?}"
    );

    // Shutdown: web (the dependent) is stopped, and gone, before db gets its signal.
    eventually(T, "web to set its TERM trap", || {
        web_trapped.exists().then_some(())
    });
    let mut m = m;
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.proc.wait_exit(T), Some(0));
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "web\ndb\n");
}
