//! `xcluster ctl` and the API's guard rails: clear errors with distinct exit codes, the token on mutating calls,
//! JSON output, and the server-sent event stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::io::{Read, Write};

use monitor_common::*;
use xcluster_tests::*;

#[test]
fn ctl_errors_and_tokens() {
    let m = Mon::start("[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n");
    m.wait_state("x", "RUNNING", T);

    let o = m.ctl(&["start", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("no such process or group: nope"), "{}", out(&o));
    assert_says(
        &m.ctl(&["status", "nope"]),
        4,
        "nope: ERROR (no such process or group)",
    );
    let o = m.ctl(&["start", "x"]);
    assert_says(&o, 0, "x: ERROR (already started)");

    // Without the right token, nothing changes.
    let o = std::process::Command::new(xcluster_bin())
        .args([
            "ctl",
            "--url",
            &format!("http://{}", m.addr),
            "--token",
            "wrong",
            "stop",
            "x",
        ])
        .output_within(EXIT_DEADLINE);
    assert_eq!(o.status.code(), Some(77), "{}", out(&o));
    assert!(out(&o).contains("refused the token"), "{}", out(&o));
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &m.addr.to_string(), "stop", "x"])
        .env_remove("XCLUSTER_TOKEN")
        .output_within(EXIT_DEADLINE);
    assert_eq!(o.status.code(), Some(77), "{}", out(&o));
    assert!(out(&o).contains("this needs the monitor's token"), "{}", out(&o));
    let r = request(m.addr, "POST", "/v1/programs/x/stop", &[], None).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(m.state("x"), "RUNNING");

    // A known path asked with the wrong method is a 405 naming the right one, token or not; an unknown one a
    // 404.
    for (method, path, allow) in [
        ("GET", "/v1/programs/x/stop", "POST"),
        ("GET", "/v1/cluster/servers/h%2Fa/drain", "POST"),
        ("POST", "/v1/status", "GET"),
        ("POST", "/v1/programs/x/log", "GET"),
        ("DELETE", "/v1/shutdown", "POST"),
    ] {
        let r = request(m.addr, method, path, &[], None).unwrap();
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    }
    let r = request(m.addr, "GET", "/v1/nope", &[], None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(m.state("x"), "RUNNING");

    // Pointed at something else that answers /v1/status (a balancer's API), ctl says so instead of printing
    // an empty status.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in other.incoming().flatten().take(2) {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let body = r#"{"balancer":"x","instances":[]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut s, (head + body).as_bytes());
        }
    });
    for verb in ["status", "version"] {
        let o = std::process::Command::new(xcluster_bin())
            .args(["ctl", "--url", &format!("http://{other_addr}"), verb])
            .output_within(EXIT_DEADLINE);
        assert_eq!(o.status.code(), Some(69), "{verb}: {}", out(&o));
        assert!(out(&o).contains("not as an XCluster monitor"), "{}", out(&o));
    }

    // A rolling restart's bounds are checked before anything restarts.
    for query in [
        "rolling=yes",
        "rolling=1&wait_secs=0",
        "rolling=1&wait_secs=3601",
        "rolling=1&wait_secs=x",
    ] {
        let r = m.post(&format!("/v1/programs/x/restart?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
    }
    assert!(m.status()["roll"].is_null(), "a refused roll began");

    // Options go before or after the verb.
    for args in [["--json", "status"], ["status", "--json"]] {
        let o = m.ctl(&args);
        assert!(o.status.success(), "{}", out(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v[0]["name"], "x");
    }
    let o = m.ctl(&["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v[0]["pid"].as_u64().is_some());

    // The token never shows in the effective config.
    let o = std::process::Command::new(xcluster_bin())
        .args([
            "monitor",
            "--config",
            m.config.to_str().unwrap(),
            "--print-config",
        ])
        .output_within(EXIT_DEADLINE);
    assert!(!out(&o).contains(TOKEN), "{}", out(&o));

    // No monitor there: a clear error and exit 69.
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &format!("http://{}", free_addr()), "status"])
        .output_within(EXIT_DEADLINE);
    assert_eq!(o.status.code(), Some(69), "{}", out(&o));
    assert!(out(&o).contains("cannot reach the monitor"), "{}", out(&o));

    // A monitor that takes the connection and never answers (stopped by SIGSTOP: the kernel still completes
    // the handshake) is one that did not answer in time, not "Resource temporarily unavailable (os error 11)".
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let o = std::process::Command::new(xcluster_bin())
        .args([
            "ctl",
            "--timeout-secs",
            "1",
            "--url",
            &hung_addr.to_string(),
            "status",
        ])
        .output_within(EXIT_DEADLINE);
    assert_says(
        &o,
        69,
        &format!(
            "xcluster ctl: the monitor at {hung_addr} did not answer within 1s (is it stopped or overloaded?)"
        ),
    );
    drop(hung);
}

/// `--wait-secs` is range-checked before anything is sent: `0` used to stop the program and then report it
/// "still STOPPING after 0 s", and `u64::MAX` stopped it and then panicked adding the wait to the clock.
#[test]
fn ctl_refuses_a_wait_out_of_range_before_acting() {
    let m = Mon::start("[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n");
    m.wait_state("x", "RUNNING", T);
    let pid = m.pid("x");
    for wait in ["0", "3601", "18446744073709551615"] {
        for verb in [
            &["stop", "x"][..],
            &["restart", "x"],
            &["start", "x"],
            &["restart", "--rolling", "x"],
        ] {
            let mut args = vec!["--wait-secs", wait];
            args.extend(verb);
            let o = m.ctl(&args);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", out(&o));
            assert!(out(&o).contains("--wait-secs"), "{args:?}: {}", out(&o));
            assert!(!out(&o).contains("panicked"), "{args:?}: {}", out(&o));
        }
    }
    let p = m.prog("x");
    assert_eq!((p["state"].as_str(), m.pid("x")), (Some("RUNNING"), pid), "{p}");
    assert!(m.status()["roll"].is_null(), "a refused roll began");
    // The bounds themselves are taken.
    assert_says(&m.ctl(&["--wait-secs", "3600", "stop", "x"]), 0, "x: stopped");
    assert_says(&m.ctl(&["--wait-secs", "1", "start", "x"]), 0, "x: started");
}

/// A verb that acts on programs, given none, is a usage error (exit 2, with the usage), as any other missing
/// argument of ctl and as supervisorctl's `start` alone: it exited 1, the code of a refused action.
#[test]
fn a_program_verb_without_a_name_is_a_usage_error() {
    for verb in [
        &["start"][..],
        &["stop"],
        &["restart"],
        &["restart", "--rolling"],
        &["signal", "HUP"],
        &["clear"],
    ] {
        // No monitor is needed: nothing is sent.
        let o = std::process::Command::new(xcluster_bin())
            .args(["ctl", "--url", "http://127.0.0.1:1"])
            .args(verb)
            .output_within(EXIT_DEADLINE);
        assert_eq!(o.status.code(), Some(2), "{verb:?}: {}", out(&o));
        assert!(out(&o).contains("<NAMES>..."), "{verb:?}: {}", out(&o));
    }
}

/// `tail NAME stderr` names the stream as supervisorctl's does (it was refused, exit 2: only `--stream stderr`
/// was known), and a stream that is neither is a usage error before anything is asked.
#[test]
fn tail_takes_the_stream_as_supervisorctl_does() {
    let m = Mon::start(
        "[programs.x]\ncommand = \"sh -c 'echo out; echo err >&2; exec sleep 300'\"\nstartsecs = 0\n",
    );
    let o = eventually(T, "x's stderr in its log", || {
        let o = m.ctl(&["tail", "x", "stderr"]);
        (o.status.success() && String::from_utf8_lossy(&o.stdout) == "err\n").then_some(o)
    });
    assert_says(&o, 0, "err");
    assert_says(&m.ctl(&["tail", "x", "stdout"]), 0, "out");
    let o = m.ctl(&["tail", "x", "stderr", "--stream", "stdout"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let o = m.ctl(&["tail", "x", "--stream", "both"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
}

/// The API routes before it checks the token, and decodes a path segment as a path segment.
#[test]
fn api_paths_are_routed_first_and_decoded_as_paths() {
    let m =
        Mon::start("[programs.x]\ncommand = \"/bin/sh -c 'echo from-x; exec sleep 300'\"\nstartsecs = 0\n");
    m.wait_state("x", "RUNNING", T);
    // An unknown path is a 404 with or without a token: a 401 would send the client after a token that
    // cannot help.
    let auth = format!("Bearer {TOKEN}");
    for path in [
        "/v1/nope",
        "/v1/programs/x/bogus",
        "/v1/programs/x/stop/more",
        "/nope",
    ] {
        for headers in [&[][..], &[("Authorization", auth.as_str())]] {
            let r = request(m.addr, "POST", path, headers, None).unwrap();
            assert_eq!(r.status, 404, "POST {path} {headers:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "not_found", "{path}");
        }
    }
    // A known mutating path still needs the token.
    let r = request(m.addr, "POST", "/v1/programs/x/stop", &[], None).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);

    // `&` and `=` are literal in a path: no query-string splitting picks `x` out of this name.
    eventually(T, "x's output in its log", || {
        let r = get(m.addr, "/v1/programs/x/log").ok()?;
        r.body.contains("from-x").then_some(())
    });
    for path in ["/v1/programs/zzz&x=x/log", "/v1/programs/zzz%26x%3Dx/log"] {
        let r = get(m.addr, path).unwrap();
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert!(!r.body.contains("from-x"), "{path}: {}", r.body);
    }
    let r = m.post("/v1/programs/zzz&x=x/stop");
    assert_eq!(r.status, 404, "{}", r.body);
    // `+` is a plus, not a space; a malformed escape is refused, not guessed at.
    let r = get(m.addr, "/v1/programs/x+/log").unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = get(m.addr, "/v1/programs/x%2/log").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(m.state("x"), "RUNNING");
}

/// supervisorctl's `pid` (the monitor's, or each program's for scripts: 0 and exit 3 for one without a
/// process) and `version`.
/// As supervisorctl's `status`: a name that picks nothing is said, the others are shown anyway, and the exit
/// is 4 (LSB's "status unknown"), unless a program shown is not running (3). It refused to show any and exited
/// 1, which a check script could not tell from a monitor that refused the request.
#[test]
fn status_of_an_unknown_name_shows_the_rest_and_exits_4() {
    let m = Mon::start(
        "[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n[programs.idle]\ncommand = \"sleep 300\"\nautostart = false\n",
    );
    m.wait_state("x", "RUNNING", T);
    let o = m.ctl(&["status", "x", "nope"]);
    assert_eq!(o.status.code(), Some(4), "{}", out(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "nope: ERROR (no such process or group)");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..2], ["x", "RUNNING"], "{text}");
    assert_eq!(m.ctl(&["status", "idle", "nope:*"]).status.code(), Some(3));
    // With --json the table stays valid JSON on stdout: the unknown name goes to stderr.
    let o = m.ctl(&["--json", "status", "nope", "x"]);
    assert_eq!(o.status.code(), Some(4), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["name"], "x");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope: ERROR"),
        "{}",
        out(&o)
    );
}

#[test]
fn pid_and_version_as_supervisorctl() {
    let m = Mon::start(
        "[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n[programs.idle]\ncommand = \"sleep 300\"\nautostart = false\n",
    );
    m.wait_state("x", "RUNNING", T);
    let monitor = &m.status()["monitor"];
    assert_eq!(m.ctl_ok(&["pid"]).trim(), monitor["pid"].to_string());
    assert_eq!(
        m.ctl_ok(&["version"]).trim(),
        monitor["version"].as_str().unwrap()
    );
    let x = m.pid("x").unwrap();
    assert_eq!(m.ctl_ok(&["pid", "x"]).trim(), x.to_string());
    // In start order: `idle` sorts first.
    assert_says(&m.ctl(&["pid", "all"]), 3, &format!("0\n{x}"));
    let o = m.ctl(&["--json", "pid", "x"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([{ "name": "x", "pid": x }]));
    assert_says(
        &m.ctl(&["pid", "nope"]),
        1,
        "xcluster ctl: no such process or group: nope",
    );
}

#[test]
fn start_stop_and_restart_wait_for_their_outcome_as_supervisorctl_does() {
    let m = Mon::start(
        r#"
[programs.x]
command = "sleep 300"
autostart = false
startsecs = 1
[programs.broken]
command = "/bin/sh -c 'exit 3'"
autostart = false
startsecs = 1
startretries = 0
[programs.missing]
command = "/no/such/binary"
autostart = false
startsecs = 1
startretries = 1
[programs.dep]
command = "sleep 300"
autostart = false
depends_on = ["x"]
[programs.slow]
command = "sleep 300"
autostart = false
startsecs = 60
"#,
    );
    // The answer comes once the program is running past startsecs: no polling needed after it.
    let o = m.ctl(&["start", "x"]);
    assert_says(&o, 0, "x: started");
    assert_eq!(m.state("x"), "RUNNING");
    let old = m.pid("x").unwrap();
    let o = m.ctl(&["restart", "x"]);
    assert_says(&o, 0, "x: started");
    let p = m.prog("x");
    assert_eq!(p["state"], "RUNNING", "{p}");
    assert_ne!(p["pid"].as_i64(), Some(i64::from(old)), "{p}");
    let o = m.ctl(&["--json", "stop", "x"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["results"][0]["message"], "stopped", "{v}");
    assert_eq!(m.state("x"), "STOPPED");

    // A program that cannot start fails the command, with the real cause: its last exit (it was spawned
    // fine), or the spawn error, and the tries it took. Both once read "too many start retries too quickly".
    let o = m.ctl(&["start", "broken"]);
    assert_says(
        &o,
        1,
        "broken: ERROR (exited too quickly: exit status 3, gave up after 1 try)",
    );
    assert_eq!(m.state("broken"), "FATAL");
    // The monitor's log says how it ended as ctl does, not `code=Some(3) signal=None`.
    let log = m.proc.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("program=broken") && l.contains("status=exit status 3")),
        "{log}"
    );
    let o = m.ctl(&["restart", "missing"]);
    assert_says(
        &o,
        1,
        "missing: ERROR (spawn error: cannot find command \"/no/such/binary\": No such file or directory \
         (os error 2), gave up after 2 tries)",
    );
    // One that waits for a dependency says so when the wait runs out.
    let o = m.ctl(&["--wait-secs", "1", "start", "dep"]);
    assert_says(&o, 1, "dep: ERROR (still STOPPED, waiting for x after 1 s)");

    // --no-wait answers as soon as the monitor has taken the command.
    let o = m.ctl(&["--no-wait", "start", "x"]);
    assert_says(&o, 0, "x: starting");
    assert_eq!(m.state("x"), "STARTING");
    // A bound on the wait (1 s at least: 0 is refused): a program still starting when it runs out is an
    // error that says so.
    let o = m.ctl(&["--wait-secs", "1", "start", "slow"]);
    assert_says(&o, 1, "slow: ERROR (still STARTING after 1 s)");
}

/// As supervisorctl, `start` of a running program and `stop` of a stopped one say so but succeed (they exited 1),
/// so scripts and configuration-management tools can call them idempotently; a real failure beside them still
/// fails the command.
#[test]
fn start_of_a_running_program_and_stop_of_a_stopped_one_succeed() {
    let m = Mon::start(
        r#"
[programs.x]
command = "sleep 300"
startsecs = 0
[programs.idle]
command = "sleep 300"
autostart = false
[programs.missing]
command = "/no/such/binary"
autostart = false
startretries = 0
"#,
    );
    m.wait_state("x", "RUNNING", T);
    assert_says(&m.ctl(&["start", "x"]), 0, "x: ERROR (already started)");
    assert_says(&m.ctl(&["stop", "idle"]), 0, "idle: ERROR (not running)");
    let o = m.ctl(&["--json", "start", "x"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["results"][0];
    assert_eq!(
        (&r["ok"], &r["already"], &r["message"]),
        (&false.into(), &true.into(), &"already started".into()),
        "{v}"
    );
    // The API marks it too, for other clients.
    let r = m.post("/v1/programs/idle/stop");
    assert_eq!(r.json()["results"][0]["already"], true, "{}", r.body);
    assert_eq!(m.state("x"), "RUNNING");
    assert_eq!(m.state("idle"), "STOPPED");

    // Beside one already running, a program that cannot start still fails the command.
    let o = m.ctl(&["start", "x", "missing"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).starts_with("x: ERROR (already started)\nmissing: ERROR (spawn error"),
        "{}",
        out(&o)
    );
    // Once stopped, a stop of it is idempotent too; an unknown name, or a signal nothing can receive, is not.
    assert_says(&m.ctl(&["stop", "x"]), 0, "x: stopped");
    assert_says(&m.ctl(&["stop", "x"]), 0, "x: ERROR (not running)");
    assert_says(
        &m.ctl(&["stop", "x", "idle"]),
        0,
        "x: ERROR (not running)\nidle: ERROR (not running)",
    );
    assert_refused(&m.ctl(&["stop", "x", "nope"]), "no such process or group: nope");
    assert_says(&m.ctl(&["signal", "HUP", "x"]), 1, "x: ERROR (not running)");
    assert_says(&m.ctl(&["start", "x"]), 0, "x: started");
}

/// A start of a program already starting waits for its outcome, as a start does: it answered `already
/// started` at once, exit 0, before the program had run for its `startsecs`, so a script's next step found it
/// FATAL.
#[test]
fn start_of_a_program_still_starting_waits_for_its_outcome() {
    let m = Mon::start(
        r#"
[programs.slow]
command = "sleep 300"
autostart = false
startsecs = 60
[programs.dying]
command = "/bin/sh -c 'sleep 1; exit 3'"
autostart = false
startsecs = 30
startretries = 0
"#,
    );
    assert_says(
        &m.ctl(&["--no-wait", "start", "slow", "dying"]),
        0,
        "slow: starting\ndying: starting",
    );
    let o = m.ctl(&["--wait-secs", "1", "start", "slow"]);
    assert_says(&o, 1, "slow: ERROR (still STARTING after 1 s)");
    // Whether it came while `dying` was starting or after it gave up, the start fails with why.
    let o = m.ctl(&["start", "dying"]);
    assert_says(
        &o,
        1,
        "dying: ERROR (exited too quickly: exit status 3, gave up after 1 try)",
    );
}

/// `start all` takes a program still STARTING as its own and waits for its outcome: it left it out (as
/// supervisorctl does), exit 0, with the program not yet proved and perhaps about to go FATAL. One already
/// RUNNING is still left out.
#[test]
fn start_all_waits_for_a_program_still_starting() {
    let m = Mon::start(
        r#"
[programs.up]
command = "sleep 300"
startsecs = 0
[programs.slow]
command = "sleep 300"
autostart = false
startsecs = 60
"#,
    );
    m.wait_state("up", "RUNNING", T);
    assert_says(&m.ctl(&["--no-wait", "start", "slow"]), 0, "slow: starting");
    let o = m.ctl(&["--wait-secs", "1", "start", "all"]);
    assert_says(&o, 1, "slow: ERROR (still STARTING after 1 s)");
    // Named on its own, it is `already started`, as in supervisorctl, and waited for too.
    let o = m.ctl(&["--wait-secs", "1", "start", "slow"]);
    assert_says(&o, 1, "slow: ERROR (still STARTING after 1 s)");
}

/// A stop of a program still stopping is under way, not moot: it answered `not running` while the process
/// still ran, so `ctl stop` returned before the program had stopped.
#[test]
fn stop_of_a_program_still_stopping_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // On TERM it ends only once the test says so, so it is STOPPING for as long as the test needs.
    let m = Mon::start(&format!(
        "[programs.slow]\ncommand = \"/bin/sh -c 'trap \\\"while [ ! -e {go} ]; do sleep 0.1; done; exit 0\\\" TERM; \
         while :; do sleep 0.1; done'\"\nstartsecs = 0\nstopwaitsecs = 60\n",
        go = go.display()
    ));
    m.wait_state("slow", "RUNNING", T);
    assert_says(&m.ctl(&["--no-wait", "stop", "slow"]), 0, "slow: stopping");
    m.wait_state("slow", "STOPPING", T);
    assert_says(&m.ctl(&["--no-wait", "stop", "slow"]), 0, "slow: stopping");
    // A guarded process: killed if the test fails before it ends.
    let url = format!("http://{}", m.addr);
    let mut waiting = Proc::xcluster(
        "ctl stop",
        &["ctl", "--url", &url, "--token", TOKEN, "stop", "slow"],
    );
    std::fs::write(&go, "").unwrap();
    let code = waiting.wait_exit(EXIT_DEADLINE);
    // Whether it came before or after the exit, the stop answers once the program has stopped.
    assert_eq!(code, Some(0), "{}{}", waiting.stdout(), waiting.stderr());
    assert_eq!(m.state("slow"), "STOPPED");
}

#[test]
fn events_stream_as_server_sent_events() {
    let m = Mon::start("[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n");
    m.wait_state("x", "RUNNING", T);
    let mut s = std::net::TcpStream::connect(m.addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {}\r\n\r\n", m.addr).as_bytes())
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // History first: the start of x.
    while !seen.contains("\"to\":\"RUNNING\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("event: state"), "{seen}");
    // Then live: a restart shows up as it happens.
    let r = m.post("/v1/programs/x/restart");
    assert_eq!(r.status, 200, "{}", r.body);
    while !seen.contains("\"to\":\"STOPPING\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// `ctl cluster` prints each balancer the monitor watches: its instances with load and weights, and its L4
/// proxy's listeners and backends. A balancer that does not answer shows as down, and the exit code says so.
#[test]
fn ctl_cluster_shows_balancers_and_their_proxies() {
    let up = fake_balancer();
    let down = free_addr();
    let m = Mon::start(&format!(
        "[cluster]\nbalancers = [\"{up}\", \"{down}\"]\n[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n"
    ));
    let o = m.ctl(&["cluster"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(3), "{text}");
    let row = |cells: &[&str]| {
        text.lines()
            .any(|l| l.split_whitespace().eq(cells.iter().copied()))
    };
    assert!(text.contains(&format!("{up}  up  table version 42")), "{text}");
    assert!(
        row(&[
            "app-7",
            "127.0.0.1:7101",
            "up",
            "120",
            "25.0%",
            "-",
            "-",
            "50%",
            "7500",
            "5000"
        ]),
        "{text}"
    );
    assert!(
        row(&[
            "browse",
            "127.0.0.1:7400",
            "browse",
            "2",
            "100",
            "1234",
            "1",
            "4",
            "5",
            "6",
            "16",
            "3",
            "7",
            "9",
            "17",
            "0",
            "11",
            "14",
            "2.0",
            "KiB",
            "5.0",
            "MiB",
            "10",
            "unbound"
        ]),
        "{text}"
    );
    assert!(
        row(&[
            "127.0.0.1:7101",
            "2",
            "64",
            "1233",
            "1",
            "12",
            "13",
            "15",
            "2.0",
            "KiB",
            "5.0",
            "MiB",
            "0",
            "(drain)",
            "3",
            "0",
            "failing",
            "drained",
            "backup"
        ]),
        "{text}"
    );
    assert!(text.contains(&format!("{down}  down")), "{text}");

    let o = m.ctl(&["--json", "cluster"]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["balancers"][0]["status"]["proxy"]["listeners"][0]["accepted"],
        1234
    );
    assert_eq!(v["balancers"][1]["up"], false);
}

/// `check-config` refuses programs that could never start (they used to pass, then loop in BACKOFF), naming
/// each setting.
#[test]
fn check_config_refuses_programs_no_spawn_could_start() {
    let dir = tempfile::tempdir().unwrap();
    let long = "p".repeat(300);
    let logs = dir.path().display();
    let text = format!(
        r#"role = "monitor"
[programs.env]
command = "sleep 1"
environment = {{ "A=B" = "1", "" = "2", OK = "nul\u0000here" }}
[programs.{long}]
command = "sleep 1"
[programs.logdir]
command = "sleep 1"
stdout_logfile = "{logs}"
"#
    );
    let file = write_file(dir.path(), "monitor.toml", &text);
    let o = std::process::Command::new(xcluster_bin())
        .args(["check-config", file.to_str().unwrap()])
        .output_within(EXIT_DEADLINE);
    let said = out(&o);
    assert_eq!(o.status.code(), Some(64), "{said}");
    for expected in [
        "programs.env.environment: \"A=B\" is not a variable name",
        "programs.env.environment: \"\" is not a variable name",
        "programs.env.environment.OK: contains a NUL byte",
        &format!("programs.{long}: program names are at most 128 bytes"),
        &format!("programs.logdir.stdout_logfile: {logs} is a directory"),
    ] {
        assert!(said.contains(expected), "missing {expected:?} in {said}");
    }
}

/// `ctl shutdown` answers once the monitor is gone, as `stop` answers once stopped: a program that ignores
/// SIGTERM holds the monitor for its `stopwaitsecs`, and the port is still free when ctl returns (it used
/// to answer at once, and an `xcluster up` straight after found the address in use).
#[test]
fn shutdown_answers_once_the_monitor_is_gone() {
    let m = Mon::start(
        "[programs.x]\ncommand = \"sh -c 'trap \\\"\\\" TERM; sleep 300'\"\nstartsecs = 0\nstopwaitsecs = 2\n",
    );
    m.wait_state("x", "RUNNING", T);
    let o = m.ctl(&["shutdown"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        std::net::TcpStream::connect(m.addr).is_err(),
        "the monitor still answers after `ctl shutdown` returned"
    );
}

/// A `shutdown` of a monitor already shutting down waits for it to be gone and succeeds, as for its own: it
/// exited 1 at once ("the monitor is shutting down") while the monitor still ran, so a script's `ctl shutdown`
/// after a `--no-wait` one (or a SIGTERM) could not be followed by an `xcluster up`.
#[test]
fn shutdown_of_a_monitor_already_shutting_down_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // On TERM it ends only once the test says so, so the shutdown lasts as long as the test needs.
    let mut m = Mon::start(&format!(
        "[programs.slow]\ncommand = \"/bin/sh -c 'trap \\\"while [ ! -e {go} ]; do sleep 0.1; done; exit 0\\\" TERM; \
         while :; do sleep 0.1; done'\"\nstartsecs = 0\nstopwaitsecs = 60\n",
        go = go.display()
    ));
    m.wait_state("slow", "RUNNING", T);
    assert_says(&m.ctl(&["--no-wait", "shutdown"]), 0, "Shutting down");
    m.wait_state("slow", "STOPPING", T);
    let o = m.ctl(&["--no-wait", "shutdown"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("already shutting down"), "{}", out(&o));
    // It waits as for its own shutdown: here, until its bound, since `slow` is still stopping.
    let o = m.ctl(&["--wait-secs", "1", "shutdown"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("still answers after 1s"), "{}", out(&o));
    std::fs::write(&go, "").unwrap();
    assert_eq!(m.proc.wait_exit(T), Some(0));
}

/// `[groups.site] programs = [...]` (Supervisord's `[group:site]`): `site:*` and `site` pick the instances of
/// every program it names, in start order, `site:web` one of them, for every verb; its programs keep their
/// own names; a program that `depends_on` it waits for all of them. A reload naming an unknown program in it
/// is refused, and the group in force stays.
#[test]
fn a_named_group_is_addressed_as_one() {
    let programs = |members: &str| {
        format!(
            "[programs.web]\ncommand = \"sleep 300\"\nstartsecs = 0\n\
             [programs.worker]\ncommand = \"sleep 300\"\nstartsecs = 0\nnumprocs = 2\n\
             [programs.db]\ncommand = \"sleep 300\"\nstartsecs = 0\n\
             [programs.front]\ncommand = \"sleep 300\"\nstartsecs = 0\nautostart = false\n\
             depends_on = [\"site\"]\n\
             [groups.site]\nprograms = [{members}]\n"
        )
    };
    let m = Mon::start(&programs("\"worker\", \"web\""));
    for p in ["db", "web", "worker-0", "worker-1"] {
        m.wait_state(p, "RUNNING", T);
    }
    assert_eq!(
        m.status()["groups"],
        serde_json::json!({ "site": ["worker", "web"] })
    );
    let shown = |args: &[&str]| -> Vec<String> {
        let o = m.ctl(args);
        (String::from_utf8_lossy(&o.stdout).lines())
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    assert_eq!(shown(&["status", "site:*"]), ["web", "worker-0", "worker-1"]);
    assert_eq!(shown(&["status", "site"]), ["web", "worker-0", "worker-1"]);
    assert_eq!(shown(&["status", "site:worker-1", "db"]), ["worker-1", "db"]);
    assert_says(
        &m.ctl(&["status", "site:db"]),
        4,
        "site:db: ERROR (no such process or group)",
    );

    let db = m.pid("db").unwrap();
    m.ctl_ok(&["stop", "site:*"]);
    for p in ["web", "worker-0", "worker-1"] {
        assert_eq!(m.state(p), "STOPPED", "{p}");
    }
    m.ctl_ok(&["start", "site:web"]);
    assert_eq!(m.state("web"), "RUNNING");
    assert_eq!(m.state("worker-0"), "STOPPED");
    // A program that depends on the group waits for every program of it.
    m.ctl_ok(&["--no-wait", "start", "front"]);
    eventually(T, "front to wait for the group's workers", || {
        (m.prog("front")["waiting_for"] == serde_json::json!(["worker"])).then_some(())
    });
    assert_eq!(m.state("front"), "STOPPED");
    m.ctl_ok(&["start", "site"]);
    m.wait_state("front", "RUNNING", T);
    let pids: Vec<i32> = ["web", "worker-0", "worker-1"]
        .map(|p| m.pid(p).unwrap())
        .to_vec();
    let rolled = m.ctl_ok(&["restart", "--rolling", "site:*"]);
    for (p, old) in ["web", "worker-0", "worker-1"].into_iter().zip(pids) {
        assert!(rolled.contains(p), "{rolled}");
        let new = m.pid(p).unwrap();
        assert!(new != old && m.state(p) == "RUNNING", "{p}: {old} -> {new}");
    }
    assert_eq!(m.pid("db"), Some(db), "db is not in the group");

    m.rewrite(&programs("\"web\", \"nope\""));
    let error = eventually(T, "the reload naming an unknown program to be refused", || {
        m.status()["reload"]["last_error"].as_str().map(str::to_string)
    });
    assert!(error.contains("groups.site.programs[1]"), "{error}");
    assert_eq!(shown(&["status", "site:*"]), ["web", "worker-0", "worker-1"]);
}
