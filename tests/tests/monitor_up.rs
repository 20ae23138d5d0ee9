//! `xcluster up` runs the local cluster of `configs/local.toml` (two balancers, three apps, one agent) under
//! the monitor, in dependency order, prints where the dashboard is, and leaves nothing behind on SIGINT.
//! Ports come from a free block (the file's fixed ports are overridden), so it runs beside other tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod local_cluster;
mod monitor_common;

use std::time::Duration;

use local_cluster::LocalCluster;
use monitor_common::*;
use xcluster_tests::*;

#[test]
fn up_starts_the_local_cluster_in_order_and_sigint_stops_everything() {
    let mut c = LocalCluster::start();
    let addr = c.mon.addr;
    assert!(
        c.up.stdout().contains(&format!("dashboard at http://{addr}/")),
        "{}",
        c.up.stdout()
    );
    let m = &c.mon;
    let (lb, app, agent, proxy) = (c.balancers[0].port(), c.apps[0].port(), c.agent.port(), c.proxy);
    let names = ["lb-0", "lb-1", "app-0", "app-1", "app-2", "agent"];
    for n in names {
        eventually(Duration::from_secs(15), &format!("{n} running and ready"), || {
            let p = m.prog(n);
            (p["state"] == "RUNNING" && p["ready"] == true).then_some(())
        });
    }
    for (i, port) in [lb, lb + 1, app, app + 1, app + 2, agent].iter().enumerate() {
        let r = get(format!("127.0.0.1:{port}").parse().unwrap(), "/readyz").unwrap();
        assert_eq!(r.status, 200, "{} on {port}", names[i]);
    }
    // The agent waited for every app to be ready (not for the balancers, which wait for its reports before
    // they open their proxy ports and report ready).
    let events = m.events();
    let seq_of = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .filter(|e| pred(e))
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let agent_start =
        seq_of(&|e| e["kind"] == "state" && e["program"] == "agent" && e["to"] == "STARTING")[0];
    for n in ["app-0", "app-1", "app-2"] {
        let ready = seq_of(&|e| e["kind"] == "probe" && e["program"] == n && e["ok"] == true);
        assert!(
            !ready.is_empty() && ready[0] < agent_start,
            "{n} ready before the agent started: {events:?}"
        );
    }
    // The cluster works as one: the agent's reports reach both balancers, which list all three apps, and
    // the balancers' shared L4 listener forwards to an app picked by those weights.
    for b in [lb, lb + 1] {
        let b: std::net::SocketAddr = format!("127.0.0.1:{b}").parse().unwrap();
        eventually(
            Duration::from_secs(15),
            &format!("balancer {b} to list three apps"),
            || {
                let r = get(b, "/v1/servers?type=browse")
                    .ok()
                    .filter(|r| r.status == 200)?;
                (r.json()["servers"].as_array()?.len() == 3).then_some(())
            },
        );
    }
    eventually(
        Duration::from_secs(15),
        "a browse request through the L4 proxy",
        || {
            let r = get(proxy, "/v1/products?limit=1").ok()?;
            (r.status == 200).then_some(())
        },
    );
    // `ctl drain` drains an instance on both balancers the monitor watches (the monitor calls each), `undrain`
    // undoes it; an unknown instance and a wrong token fail with their exit codes.
    // Runs ctl with `token` and checks its exit code and that it says `what` `times` times.
    let ctl_says = |token: &str, args: &[&str], code: i32, what: &str, times: usize| {
        let o = std::process::Command::new(xcluster_bin())
            .args(["ctl", "--url", &format!("http://{addr}"), "--token", token])
            .args(args)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            (o.status.code(), out.matches(what).count()),
            (Some(code), times),
            "{args:?}: {out}"
        );
    };
    // Once per balancer.
    let ctl = |token: &str, args: &[&str], code: i32, what: &str| ctl_says(token, args, code, what, 2);
    let drained = |b: std::net::SocketAddr| {
        let st = get(b, "/v1/status").unwrap().json();
        let app = st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "local/app-1")
            .cloned();
        app.is_some_and(|i| i["state"] == "drained")
    };
    ctl(
        "xcluster-local",
        &["drain", "local/app-1"],
        0,
        "local/app-1  drained",
    );
    assert!(c.balancers.iter().all(|&b| drained(b)));
    ctl(
        "xcluster-local",
        &["undrain", "local/app-1"],
        0,
        "local/app-1  undrained",
    );
    assert!(!c.balancers.iter().any(|&b| drained(b)));
    ctl("xcluster-local", &["drain", "local/nope"], 1, "no instance");
    // `ctl weight` the same way: a share of app-1's weight on both balancers, shown in their status, and
    // 100% undoes it; a weight of its own is refused for an instance.
    let weight_set = |b: std::net::SocketAddr| {
        let st = get(b, "/v1/status").unwrap().json();
        let apps = st["instances"].as_array().unwrap().clone();
        let app = apps.into_iter().find(|i| i["id"] == "local/app-1");
        app.map(|i| i["weight_set"].clone())
    };
    ctl(
        "xcluster-local",
        &["weight", "10%", "local/app-1"],
        0,
        "local/app-1  weight 10%",
    );
    assert!(c.balancers.iter().all(|&b| weight_set(b) == Some("10%".into())));
    // Each balancer has it in its state file too (written before it answered), for a restart of both.
    for lb in ["lb-0", "lb-1"] {
        let file = c.run.path().join(format!("{lb}.state.json"));
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap_or_default()).unwrap_or_default();
        assert_eq!(state["weights"]["local/app-1"], "10%", "{lb}: {state}");
    }
    ctl(
        "xcluster-local",
        &["weight", "7", "local/app-1"],
        1,
        "set a share of it",
    );
    ctl(
        "xcluster-local",
        &["weight", "100%", "local/app-1"],
        0,
        "local/app-1  weight 100%",
    );
    assert!(
        c.balancers
            .iter()
            .all(|&b| weight_set(b) == Some(serde_json::Value::Null))
    );
    ctl_says(
        "xcluster-local",
        &["weight", "half", "local/app-1"],
        2,
        "a percentage",
        1,
    );
    ctl_says(
        "wrong",
        &["drain", "local/app-1"],
        77,
        "the monitor refused the token",
        1,
    );

    // A second `up` of the same cluster fails on the run directory's lock, without saying where "its"
    // dashboard is first.
    let argv: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let mut second = Proc::xcluster("up-again", &argv);
    let code = second.wait_exit(Duration::from_secs(15));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {}", second.stderr());
    assert!(
        second.stderr().contains("its lock is taken"),
        "{}",
        second.stderr()
    );
    assert!(!second.stdout().contains("dashboard at"), "{}", second.stdout());
    // Nor with a run directory of its own, on the port the first one has.
    let other = tempfile::tempdir().unwrap();
    let run_dir = format!("run_dir={}", other.path().display());
    let argv: Vec<&str> = argv.iter().copied().chain(["--set", &run_dir]).collect();
    let mut third = Proc::xcluster("up-elsewhere", &argv);
    let code = third.wait_exit(Duration::from_secs(15));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {}", third.stderr());
    assert!(third.stderr().contains("cannot listen on"), "{}", third.stderr());
    assert!(!third.stdout().contains("dashboard at"), "{}", third.stdout());

    let pids: Vec<i32> = names.iter().map(|n| m.pid(n).unwrap()).collect();

    c.up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        c.up.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        c.up.stderr()
    );
    for p in pids {
        assert!(!alive(p), "pid {p} left behind");
    }
    assert!(
        tagged_pids(&format!("XCLUSTER_TEST_TAG={}", c.up.tag())).is_empty(),
        "descendants left behind"
    );
}

/// `up --detach` returns once its monitor is ready, leaving it in a session of its own (the terminal's Ctrl-C
/// and hang-up do not reach it) with its log in `<run_dir>/monitor.log`, which `ctl maintail` shows and
/// follows, and which rotates at `logfile_maxbytes` keeping `logfile_backups` copies; `ctl shutdown` stops
/// it and its programs.
#[test]
fn up_detach_runs_the_monitor_in_the_background_until_shutdown() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let addr = free_addr();
    let programs = "logfile_maxbytes = 2048\nlogfile_backups = 2\n\
                    [programs.web]\ncommand = \"sleep 300\"\nstartsecs = 0\n";
    let config = write_file(
        dir.path(),
        "monitor.toml",
        &config_text(addr, dir.path(), programs),
    );
    // Tagged as the test's own: the detached monitor and its programs carry the tag, and go with `up`.
    let mut up = Proc::xcluster("up", &["up", "--config", config.to_str().unwrap(), "--detach"]);
    assert_eq!(up.wait_exit(Duration::from_secs(60)), Some(0), "{}", up.stderr());
    let said = up.stdout();
    let pid: i32 = said
        .split("running in the background (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    let log = dir.path().join("run/monitor.log");
    assert!(said.contains(&format!("log {}", log.display())), "{said}");
    let m = Mon {
        proc: Proc::spawn("noop", std::path::Path::new("true"), Spawn::default()),
        addr,
        dir: dir.clone(),
        config,
    };
    assert_eq!(m.status()["monitor"]["pid"], pid);
    let own = nix::unistd::Pid::from_raw(pid);
    assert_eq!(
        nix::unistd::getsid(Some(own)).unwrap(),
        own,
        "a session of its own"
    );
    m.wait_state("web", "RUNNING", T);

    // Its log is the file, tailed and followed by ctl.
    let o = m.ctl(&["maintail", "--bytes", "100000"]);
    assert!(o.status.success() && out(&o).contains("web"), "{}", out(&o));
    let mut follow = Proc::xcluster(
        "maintail",
        &[
            "ctl",
            "--url",
            &format!("http://{addr}"),
            "maintail",
            "-f",
            "--bytes",
            "10",
        ],
    );
    eventually(T, "maintail -f to begin", || {
        (!follow.stdout().is_empty()).then_some(())
    });
    let before = follow.stdout().len();
    let o = m.ctl(&["stop", "web"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "the stop's log lines to reach maintail -f", || {
        let now = follow.stdout();
        (now.len() > before && now[before..].contains("web")).then_some(())
    });
    follow.signal(nix::sys::signal::Signal::SIGINT);
    let _ = follow.wait_exit(T);

    // Each restart logs a few lines: the log rotates, keeps two copies and drops the older ones, and
    // maintail reads the new file. A rotation's first line says so: once the second copy has it, the
    // original file was the third and is gone.
    let backup = |i: u32| dir.path().join(format!("run/monitor.log.{i}"));
    let mut restarts = 0;
    eventually(Duration::from_secs(60), "three rotations", || {
        let second = std::fs::read_to_string(backup(2)).unwrap_or_default();
        if second.contains("the monitor's log rotated") {
            return Some(());
        }
        restarts += 1;
        let o = m.ctl(&["restart", "web"]);
        assert!(o.status.success(), "{}", out(&o));
        None
    });
    assert!(restarts < 200, "{restarts} restarts");
    assert!(!backup(3).exists(), "a third copy kept");
    let rotated = std::fs::metadata(backup(1)).unwrap().len();
    assert!(rotated >= 2048, "rotated at {rotated} bytes");
    let o = m.ctl(&["restart", "web"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "maintail to show the new file's lines", || {
        let o = m.ctl(&["maintail", "--bytes", "100000"]);
        let text = out(&o);
        (o.status.success() && text.contains("web") && (text.len() as u64) < rotated + 4096).then_some(())
    });

    let o = m.ctl(&["shutdown"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "the detached monitor to exit", || (!alive(pid)).then_some(()));
}

/// Ctrl-C while `up -d` waits for its monitor returns once that monitor has ended, so an `up` run again at
/// once finds the run directory free. It returned as soon as it had signalled the monitor, which was still
/// stopping: here, a leftover of a killed monitor that ignores its stop signal (`stopwaitsecs = 3`), which
/// keeps the new monitor from being ready. The monitor told to stop meanwhile starts nothing after it: it
/// started the program's new copy, which ignores the signal too, and its forced end left that running.
#[test]
fn ctrl_c_while_up_detach_waits_returns_once_its_monitor_has_ended() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let files = tempfile::tempdir().unwrap();
    let ready = files.path().join("ready");
    let script = write_file(
        files.path(),
        "deaf.sh",
        &format!(
            "trap '' INT TERM\ntouch {}\nwhile :; do sleep $1; done\n",
            ready.display()
        ),
    );
    // The loop's nap differs between the two configs, so the second monitor does not adopt the first's.
    let program = |nap: &str| {
        format!(
            "[programs.deaf]\ncommand = \"/bin/sh {} {nap}\"\nstopsignal = \"INT\"\nstopwaitsecs = 3\n\
             startsecs = 0\n",
            script.display()
        )
    };
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &program("0.1"));
    first.wait_state("deaf", "RUNNING", T);
    let leftover = first.pid("deaf").unwrap();
    eventually(T, "its traps set", || ready.exists().then_some(()));
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();

    let config = write_file(
        dir.path(),
        "up.toml",
        &config_text(addr, dir.path(), &program("0.2")),
    );
    let mut up = Proc::xcluster("up", &["up", "--config", config.to_str().unwrap(), "--detach"]);
    let log = dir.path().join("run/monitor.log");
    eventually(T, "the new monitor to stop the leftover", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("stopping a process left by the previous monitor")
            .then_some(())
    });
    let monitor = eventually(T, "the detached monitor's pid", || {
        tagged_pids(&format!("XCLUSTER_TEST_TAG={}", up.tag()))
            .into_iter()
            .find(|pid| {
                let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                args.split(|b| *b == 0).any(|a| a == b"--detached")
            })
    });
    up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        up.wait_exit(Duration::from_secs(30)),
        Some(130),
        "{}",
        up.stderr()
    );
    assert!(
        !alive(monitor),
        "`up -d` returned before the monitor it stopped ended: {}",
        up.stderr()
    );
    assert!(!alive(leftover), "the leftover outlived its monitor");
    let started = || tagged_pids(&format!("XCLUSTER_TEST_TAG={}", up.tag()));
    eventually(
        Duration::from_secs(5),
        "nothing the monitor started to be left",
        || started().is_empty().then_some(()),
    );
    drop(first);
}

/// A missing cluster file: the default one, from outside the repository's root, is explained (run it from
/// there); one named with --config is just not there, with no advice about configs/ (64 both).
#[test]
fn a_missing_cluster_file_is_said_as_such() {
    let elsewhere = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(xcluster_bin())
        .arg("up")
        .current_dir(elsewhere.path())
        .output_within(EXIT_DEADLINE);
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(64), "{text}");
    assert!(
        text.contains("run it from the directory that holds configs/"),
        "{text}"
    );
    let o = std::process::Command::new(xcluster_bin())
        .args(["up", "--config", "nope.toml"])
        .current_dir(elsewhere.path())
        .output_within(EXIT_DEADLINE);
    let text = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(64), "{text}");
    assert_eq!(text.trim(), "xcluster up: nope.toml not found");
}
