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
    let o = m.ctl(&["status", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let o = m.ctl(&["start", "x"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("already started"), "{}", out(&o));

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
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(77), "{}", out(&o));
    assert!(out(&o).contains("refused the token"), "{}", out(&o));
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &m.addr.to_string(), "stop", "x"])
        .env_remove("XCLUSTER_TOKEN")
        .output()
        .unwrap();
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
            .output()
            .unwrap();
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
        .output()
        .unwrap();
    assert!(!out(&o).contains(TOKEN), "{}", out(&o));

    // No monitor there: a clear error and exit 69.
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &format!("http://{}", free_addr()), "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(69), "{}", out(&o));
    assert!(out(&o).contains("cannot reach the monitor"), "{}", out(&o));
}

/// supervisorctl's `pid` (the monitor's, or each program's for scripts: 0 and exit 3 for one without a
/// process) and `version`.
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
[programs.dep]
command = "sleep 300"
autostart = false
depends_on = ["x"]
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

    // A program that cannot start fails the command, with why.
    let o = m.ctl(&["start", "broken"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("broken: ERROR (spawn error"), "{}", out(&o));
    assert_eq!(m.state("broken"), "FATAL");
    // One that waits for a dependency says so when the wait runs out.
    let o = m.ctl(&["--wait-secs", "1", "start", "dep"]);
    assert_says(&o, 1, "dep: ERROR (still STOPPED, waiting for x after 1 s)");

    // --no-wait answers as soon as the monitor has taken the command.
    let o = m.ctl(&["--no-wait", "start", "x"]);
    assert_says(&o, 0, "x: starting");
    assert_eq!(m.state("x"), "STARTING");
    // A bound on the wait: a program still starting when it runs out is an error that says so.
    let o = m.ctl(&["--wait-secs", "0", "restart", "x"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("x: ERROR (still "), "{}", out(&o));
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
            "1234",
            "1",
            "4",
            "5",
            "6",
            "3",
            "7",
            "0",
            "2.0",
            "KiB",
            "5.0",
            "MiB",
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
            "2.0",
            "KiB",
            "5.0",
            "MiB",
            "0",
            "(drain)",
            "failing",
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
