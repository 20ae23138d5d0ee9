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

    // A restart of web while db is not ready waits for db, as its start did: before, web came straight back
    // without it.
    std::fs::remove_file(&ready).unwrap();
    eventually(T, "db to turn unready", || {
        (m.prog("db")["ready"] == false).then_some(())
    });
    std::fs::remove_file(&web_trapped).unwrap();
    let o = m.ctl(&["--wait-secs", "1", "restart", "web"]);
    assert_says(&o, 1, "web: ERROR (still STOPPED, waiting for db after 1 s)");
    std::fs::write(&ready, "").unwrap();
    m.wait_state("web", "RUNNING", T);
    std::fs::remove_file(&order).unwrap(); // the restart's stop of web wrote its line

    // Shutdown: web (the dependent) is stopped, and gone, before db gets its signal.
    eventually(T, "web to set its TERM trap", || {
        web_trapped.exists().then_some(())
    });
    let mut m = m;
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.proc.wait_exit(T), Some(0));
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "web\ndb\n");
}

/// A command probe runs as its program does: as its `user` (`nobody` when the test runs as root), with its
/// `environment`, in its `directory`. It ran as the monitor, in the monitor's environment and directory, so
/// it checked what the program could not see, and could do what the program could not.
#[test]
fn a_command_probe_runs_as_its_program() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The program's user may have to enter it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap();
    let user = if me.uid.is_root() {
        nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("a nobody user")
    } else {
        me
    };
    let m = Mon::start(&format!(
        r#"
[programs.svc]
command = "sleep 300"
startsecs = 0
user = "{name}"
directory = "{dir}"
environment = {{ PROBE_SEES = "the program's" }}
[programs.svc.readiness]
command = "sh -c 'test \"$(id -u)\" = {uid} && test \"$PROBE_SEES\" = \"the program'\\''s\" && test \"$(pwd)\" = {dir}'"
period_ms = 100
"#,
        name = user.name,
        uid = user.uid,
        dir = dir.path().display(),
    ));
    m.wait_state("svc", "RUNNING", T);
    eventually(T, "the probe to pass as the program", || {
        (m.prog("svc")["ready"] == true).then_some(())
    });
}

/// A group's dependent waits while a member is on its way up, and for one to be ready; a member that gave up
/// (FATAL) does not hold it once another is ready. Waiting for every member, one app that could not bind its
/// port kept the local cluster's agent STOPPED for good, and every client's list empty.
#[test]
fn a_member_that_gave_up_does_not_hold_its_groups_dependents() {
    let m = Mon::start(
        r#"
[programs.app]
command = "/bin/sh -c '[ {num} = 1 ] && exit 1; exec sleep 300'"
numprocs = 2
startsecs = 1
startretries = 1
[programs.agent]
command = "sleep 301"
startsecs = 0
depends_on = ["app"]
"#,
    );
    m.wait_state("app-1", "FATAL", T);
    let agent = m.wait_state("agent", "RUNNING", T);
    assert_eq!(agent["waiting_for"], serde_json::json!([]), "{agent}");
    assert_eq!(m.state("app-0"), "RUNNING");
    // The dependent started only once app-1 had given up: while it retried, it was on its way up.
    let events = m.events();
    let at = |program: &str, to: &str| {
        events
            .iter()
            .position(|e| e["kind"] == "state" && e["program"] == program && e["to"] == to)
            .unwrap_or_else(|| panic!("no {program} {to} in {events:?}"))
    };
    assert!(at("app-1", "FATAL") < at("agent", "STARTING"), "{events:?}");
}

/// As in Supervisord, `priority` orders stops too: higher numbers stop first, and the next only once they
/// have exited, for `stop all` and for the shutdown; one priority stops together.
#[test]
fn priority_orders_stop_all_and_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let order = dir.path().join("order");
    let program = |name: &str, priority: u32| {
        let d = dir.path().display();
        format!(
            r#"
[programs.{name}]
command = "/bin/sh -c 'trap \"echo {name}-term >> {order}; sleep 0.2; echo {name}-exit >> {order}; exit 0\" TERM; touch {d}/{name}.trapped; while :; do sleep 0.05; done'"
startsecs = 0
priority = {priority}
"#,
            order = order.display()
        )
    };
    let m = Mon::start(&(program("first", 1) + &program("last", 900)));
    let trapped = |m: &Mon| {
        for name in ["first", "last"] {
            let mark = dir.path().join(format!("{name}.trapped"));
            eventually(T, "the TERM traps set", || mark.exists().then_some(()));
            m.wait_state(name, "RUNNING", T);
        }
        for name in ["first", "last"] {
            std::fs::remove_file(dir.path().join(format!("{name}.trapped"))).unwrap();
        }
    };
    trapped(&m);
    let want = "last-term\nlast-exit\nfirst-term\nfirst-exit\n";
    m.ctl_ok(&["stop", "all"]);
    assert_eq!(std::fs::read_to_string(&order).unwrap(), want);

    std::fs::remove_file(&order).unwrap();
    m.ctl_ok(&["start", "all"]);
    trapped(&m);
    let mut m = m;
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.proc.wait_exit(T), Some(0));
    assert_eq!(std::fs::read_to_string(&order).unwrap(), want);
}

#[test]
fn stop_and_restart_of_several_programs_stop_dependents_first_and_start_in_dependency_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Each program writes `+name` once its TERM trap is set, then a marker its readiness probe reads, and
    // `-name` when stopped; web's stop lasts until the test creates `release`.
    let program = |name: &str, on_term: &str, deps: &str| {
        format!(
            r#"
[programs.{name}]
command = "/bin/sh -c 'trap \"{on_term}rm -f {d}/{name}.ready; echo -{name} >> {d}/order; exit 0\" TERM; echo +{name} >> {d}/order; touch {d}/{name}.ready; while :; do sleep 0.05; done'"
startsecs = 0
stopwaitsecs = 30
depends_on = [{deps}]
[programs.{name}.readiness]
command = "test -e {d}/{name}.ready"
period_ms = 50
"#
        )
    };
    let m = Mon::start(&format!(
        "{}{}{}",
        program("db", "", ""),
        program("app", "", "\"db\""),
        program(
            "web",
            &format!("while [ ! -e {d}/release ]; do sleep 0.05; done; "),
            "\"app\""
        ),
    ));
    let order = dir.path().join("order");
    let read_order = || std::fs::read_to_string(&order).unwrap_or_default();
    let ready = |name: &str| (m.prog(name)["ready"] == true).then_some(());
    eventually(T, "web ready", || ready("web"));
    assert_eq!(read_order(), "+db\n+app\n+web\n");

    // `stop all`: web gets its signal; app and db keep running, shown as stopping after their dependents.
    let o = m.ctl(&["--no-wait", "stop", "all"]);
    assert_says(
        &o,
        0,
        "app: stopping after web\ndb: stopping after app, web\nweb: stopping",
    );
    for (name, after) in [("app", "web"), ("db", "app")] {
        let p = m.prog(name);
        assert_eq!(
            (&p["state"], &p["waiting_for"][0]),
            (&"STOPPING".into(), &after.into()),
            "{p}"
        );
        assert!(alive(p["pid"].as_i64().unwrap() as i32), "{p}");
    }
    let o = m.ctl(&["status", "app"]);
    assert!(
        out(&o).contains("STOPPING") && out(&o).contains("waiting for web"),
        "{}",
        out(&o)
    );
    assert_eq!(read_order(), "+db\n+app\n+web\n");
    // The last command wins: a start of db cancels its held stop.
    let db = m.pid("db").unwrap();
    assert_says(&m.ctl(&["--no-wait", "start", "db"]), 0, "db: stop cancelled");
    assert_eq!(m.state("db"), "RUNNING");

    std::fs::write(dir.path().join("release"), "").unwrap();
    m.wait_state("app", "STOPPED", T);
    assert_eq!((m.state("db"), m.pid("db")), ("RUNNING".to_string(), Some(db)));
    assert_says(&m.ctl(&["stop", "all"]), 0, "db: stopped");
    assert_eq!(read_order(), "+db\n+app\n+web\n-web\n-app\n-db\n");

    // `start all` and `restart all`: dependents stop first, and each starts once what it depends on is ready
    // (answers come in config order, which is by name).
    let started = "app: started\ndb: started\nweb: started";
    assert_says(&m.ctl(&["start", "all"]), 0, started);
    std::fs::write(&order, "").unwrap();
    assert_says(&m.ctl(&["restart", "all"]), 0, started);
    assert_eq!(read_order(), "-web\n-app\n-db\n+db\n+app\n+web\n");
    // Asked for: `restarts` counts only those the monitor makes by itself (a crash loop's alert stays quiet).
    for name in ["db", "app", "web"] {
        assert_eq!(m.prog(name)["restarts"], 0, "{}", m.prog(name));
    }

    // A list is one command too: db waits for app (web, not named, runs on).
    std::fs::write(&order, "").unwrap();
    assert_says(&m.ctl(&["stop", "db", "app"]), 0, "db: stopped\napp: stopped");
    assert_eq!(read_order(), "-app\n-db\n");
    assert_eq!(m.state("web"), "RUNNING");
}
