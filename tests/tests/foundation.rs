//! The foundation: every shipped config validates, bad configs are rejected with every problem named,
//! admin endpoints answer, and hot reload applies valid changes and keeps the old config on invalid ones.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use xcluster_tests::*;

const ROLES: [&str; 4] = ["lb", "agent", "monitor", "app"];

#[test]
fn every_shipped_config_validates() {
    let dir = workspace_root().join("configs");
    let mut files: Vec<_> = walk(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected configs for every role and local.toml, found {files:?}"
    );
    for f in files {
        let out = Command::new(xcluster_bin())
            .arg("check-config")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} rejected:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn bad_config_exits_64_with_one_message_per_problem() {
    let dir = tempfile::tempdir().unwrap();
    for role in ROLES {
        let path = write_file(
            dir.path(),
            &format!("{role}.toml"),
            &format!(
                "role = \"{role}\"\nno_such_key = 1\nlisten = \"300.1.1.1:99999\"\n[shutdown]\ngrace_ms = -5\n"
            ),
        );
        // The daemon itself refuses to start...
        let out = Command::new(xcluster_bin())
            .arg(role)
            .arg("--config")
            .arg(&path)
            .output_within(EXIT_DEADLINE);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).collect();
        assert_eq!(
            problems.len(),
            3,
            "{role}: expected three problems, got:\n{stderr}"
        );
        assert!(stderr.contains("no_such_key: unknown field"), "{stderr}");
        assert!(
            stderr.contains("listen: invalid socket address \"300.1.1.1:99999\""),
            "{stderr}"
        );
        assert!(
            stderr.contains("shutdown.grace_ms:") && stderr.contains("-5"),
            "{stderr}"
        );
        // ...and check-config says the same, of the file or of a pipe, which can be read once only (it used
        // to read a pipe twice and pass the empty second read).
        let out = Command::new(xcluster_bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let mut child = Command::new(xcluster_bin())
            .args(["check-config", "/dev/stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, &std::fs::read(&path).unwrap()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{role}: {stderr}");
        assert!(stderr.contains("no_such_key: unknown field"), "{stderr}");
    }
}

#[test]
fn help_lists_every_subcommand_and_print_config_works() {
    let out = Command::new(xcluster_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "lb",
        "agent",
        "monitor",
        "app",
        "up",
        "ctl",
        "load",
        "check-config",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "{cmd} missing:\n{help}"
        );
    }
    let out = Command::new(xcluster_bin()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("xcluster "));
    for role in ROLES {
        let out = Command::new(xcluster_bin())
            .args([role, "--print-config", "--set", "listen=127.0.0.1:9999"])
            .env(
                format!("XCLUSTER_{}__SHUTDOWN__GRACE_MS", role.to_uppercase()),
                "1234",
            )
            .output_within(EXIT_DEADLINE);
        assert!(
            out.status.success(),
            "{role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("role = \"{role}\"")), "{text}");
        assert!(
            text.contains("listen = \"127.0.0.1:9999\""),
            "flag override missing:\n{text}"
        );
        assert!(text.contains("grace_ms = 1234"), "env override missing:\n{text}");
    }
}

/// A printing command whose reader has gone (`xcluster check-config ... | head`) ends by SIGPIPE, quietly,
/// as Unix tools do, instead of panicking on the write (`buyer-token` did).
#[test]
fn printing_commands_end_quietly_when_their_reader_is_gone() {
    use std::os::unix::process::ExitStatusExt;
    let lb = workspace_root().join("configs/lb.toml");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("buyer.key");
    std::fs::write(&key, "buyer-key-0123456789\n").unwrap();
    for args in [
        vec!["check-config", lb.to_str().unwrap()],
        vec!["lb", "--print-config"],
        vec!["buyer-token", "--key-file", key.to_str().unwrap(), "--user", "u1"],
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = Command::new(xcluster_bin())
            .args(&args)
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Every role serves its admin endpoints; each metric family on `/metrics` has its `# HELP` (its doc
/// comment) before its `# TYPE`.
#[test]
fn admin_endpoints_answer_on_every_role() {
    for role in ROLES {
        let addr = free_addr();
        let p = Proc::xcluster(role, &[role, "--set", &format!("listen=\"{addr}\"")]);
        wait_ready(addr, Duration::from_secs(20));
        assert_eq!(get(addr, "/livez").unwrap().status, 200);
        let metrics = get(addr, "/metrics").unwrap();
        assert_eq!(metrics.status, 200);
        let m = &metrics.body;
        assert!(m.contains("xcluster_config_reload_failures_total"), "{m}");
        let helped: Vec<&str> = (m.lines())
            .filter_map(|l| l.strip_prefix("# HELP "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let typed: Vec<&str> = (m.lines())
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(!typed.is_empty(), "{m}");
        let missing: Vec<&&str> = typed.iter().filter(|t| !helped.contains(t)).collect();
        assert!(missing.is_empty(), "{role}: no # HELP for {missing:?}");
        drop(p);
    }
}

/// A `role` with no config file but its API address and `set` (`key=value`), ready.
fn bare(role: &str, set: &str) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let listen = format!("listen=\"{addr}\"");
    let p = Proc::xcluster(role, &[role, "--set", &listen, "--set", set]);
    wait_ready(addr, Duration::from_secs(20));
    (p, addr)
}

/// An app whose port is taken fails before it creates or seeds its database: a stray `xbuy.db` was left
/// wherever it was started.
#[test]
fn an_app_on_a_taken_port_leaves_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let db = dir.path().join("xbuy.db");
    let (listen, db_path) = (
        format!("listen=\"{addr}\""),
        format!("db_path=\"{}\"", db.display()),
    );
    let mut p = Proc::xcluster("app", &["app", "--set", &listen, "--set", &db_path]);
    let code = p.wait_exit(Duration::from_secs(20));
    assert!(code.is_some_and(|c| c != 0), "{code:?}: {}", p.stderr());
    assert!(
        p.stderr().contains(&format!("cannot listen on {addr}")),
        "{}",
        p.stderr()
    );
    assert!(!db.exists(), "{}", p.stderr());
}

/// An lb with no config file but its API address and grace period, ready.
fn bare_lb(grace_ms: u64) -> (Proc, std::net::SocketAddr) {
    bare("lb", &format!("shutdown.grace_ms={grace_ms}"))
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let (mut p, _) = bare_lb(300);
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.stderr());
    assert!(p.stderr().contains("SIGTERM: draining"), "{}", p.stderr());
}

/// With `deregister_ms`, SIGTERM first only reports not ready: `/readyz` answers 503 and the app's stats say
/// `"ready": false` (what the agent reports to the balancers), while new connections are still served. SIGINT
/// then stops it at once.
#[test]
fn sigterm_with_deregister_reports_not_ready_and_serves_on() {
    let (mut p, addr) = bare("app", "shutdown.deregister_ms=30000");
    p.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(10), "/readyz to answer 503", || {
        (get(addr, "/readyz").ok()?.status == 503).then_some(())
    });
    let stats = get(addr, "/v1/stats").unwrap();
    assert_eq!(
        (stats.status, &stats.json()["ready"]),
        (200, &serde_json::json!(false))
    );
    assert_eq!(get(addr, "/v1/products?limit=1").unwrap().status, 200);
    assert!(p.is_running(), "{}", p.stderr());
    p.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.stderr());
}

/// Once `deregister_ms` is up, the drain begins on its own.
#[test]
fn after_deregister_ms_the_drain_begins() {
    let (mut p, _) = bare("lb", "shutdown.deregister_ms=300");
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0), "{}", p.stderr());
    let log = p.stderr();
    assert!(
        log.contains("SIGTERM: not ready") && log.contains("deregistered: draining"),
        "{log}"
    );
}

/// SIGTERM while clients keep opening connections to a role's API loses none of them: each request is
/// answered (`/livez` stays 200 while draining) or its connect refused once the port is closed, never reset
/// after its handshake (the clients queued on the listener when the drain begins are served too).
#[test]
fn sigterm_under_a_stream_of_api_requests_resets_none() {
    let (mut p, addr) = bare_lb(10_000);
    let clients = Hammer::start(8, move |_| match get(addr, "/livez") {
        Ok(r) if r.status == 200 => Try::Served,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Try::Refused,
        _ => Try::Lost,
    });
    clients.wait_served(200, Duration::from_secs(20));
    p.signal(nix::sys::signal::Signal::SIGTERM);
    clients.assert_none_lost();
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.stderr());
}

#[test]
fn hot_reload_applies_valid_changes_and_keeps_old_config_on_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let base = format!("role = \"app\"\nlisten = \"{addr}\"\n[log]\nlevel = \"info\"\n");
    let path = write_file(dir.path(), "app.toml", &base);
    let mut p = Proc::xcluster("app", &["app", "--config", path.to_str().unwrap()]);
    wait_ready(addr, Duration::from_secs(20));
    let pid = p.pid();
    let counter = |name: &str| {
        let m = get(addr, "/metrics").unwrap().body;
        metric_value(&m, name, "role=\"app\"").unwrap_or(-1.0)
    };
    assert_eq!(counter("xcluster_config_reloads_total"), 0.0);

    // A valid change, saved the way editors do it: write a new file and rename it over the old one.
    let tmp = write_file(
        dir.path(),
        ".app.toml.swp",
        &base.replace("\"info\"", "\"debug\""),
    );
    std::fs::rename(&tmp, &path).unwrap();
    eventually(Duration::from_secs(10), "reload counter to reach 1", || {
        (counter("xcluster_config_reloads_total") == 1.0).then_some(())
    });
    // The log is written by its own thread, and read by another: the line may come after the counter.
    let logged = |text: &str| {
        eventually(Duration::from_secs(10), text, || {
            p.stderr().contains(text).then_some(())
        });
    };
    logged("log.level: \"info\" -> \"debug\"");

    // An invalid change: rejected, counted once, old config kept, daemon still serving.
    write_file(dir.path(), "app.toml", &format!("{base}bogus = true\n"));
    eventually(Duration::from_secs(10), "failure counter to reach 1", || {
        (counter("xcluster_config_reload_failures_total") == 1.0).then_some(())
    });
    assert_eq!(counter("xcluster_config_reloads_total"), 1.0);
    logged("config reload rejected");
    assert_eq!(get(addr, "/readyz").unwrap().status, 200);

    // SIGHUP takes the same path: still invalid, so a second failure and nothing applied.
    p.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(10), "failure counter to reach 2", || {
        (counter("xcluster_config_reload_failures_total") == 2.0).then_some(())
    });
    assert_eq!(counter("xcluster_config_reloads_total"), 1.0);
    assert_eq!(counter("xcluster_config_restart_pending"), 0.0);
    assert!(!p.stderr().contains("need a restart"), "{}", p.stderr());

    // A key that needs a restart: reloaded, and said not to apply until then, each time and on `/metrics`.
    write_file(
        dir.path(),
        "app.toml",
        &format!("{base}[http]\nmax_body_bytes = 1024\n"),
    );
    eventually(Duration::from_secs(10), "reload counter to reach 2", || {
        (counter("xcluster_config_reloads_total") == 2.0).then_some(())
    });
    logged(
        "changed keys that need a restart; the running values stay until then role=\"app\" keys=http.max_body_bytes",
    );
    assert_eq!(counter("xcluster_config_restart_pending"), 1.0);
    // Back to the value it started with: nothing waits for a restart.
    write_file(dir.path(), "app.toml", &base);
    eventually(Duration::from_secs(10), "nothing pending", || {
        (counter("xcluster_config_restart_pending") == 0.0).then_some(())
    });
    assert!(p.is_running());
    assert_eq!(p.pid(), pid, "no restart");
}

/// An lb whose L4 listener holds one established connection to an echo backend, so its drain takes as long
/// as that connection lives (up to the grace period).
fn draining_lb() -> (Proc, std::net::TcpStream, tempfile::TempDir) {
    use std::io::{Read, Write};
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in backend.incoming().take(4).flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (api, l4) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "role = \"lb\"\nlisten = \"{api}\"\n[shutdown]\ngrace_ms = 30000\n[[proxy.listeners]]\nname = \"t\"\nlisten = \"{l4}\"\nrequest_type = \"default\"\n[[proxy.backends]]\naddr = \"{backend_addr}\"\n"
    );
    let path = write_file(dir.path(), "lb.toml", &cfg);
    let p = Proc::xcluster("lb", &["lb", "--config", path.to_str().unwrap()]);
    wait_ready(api, Duration::from_secs(20));
    let mut conn = std::net::TcpStream::connect(l4).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    (p, conn, dir)
}

#[test]
fn a_signal_delivered_twice_at_once_still_drains_gracefully() {
    use std::io::{Read, Write};
    // GNU timeout, systemd and `kill -- -PGID` deliver SIGTERM to the process and then to its group.
    let (mut p, mut conn, _dir) = draining_lb();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(10), "the drain to start", || {
        p.stderr().contains("SIGTERM: draining").then_some(())
    });
    // Still draining, not forced out: the established connection keeps working.
    conn.write_all(b"pong").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert!(p.is_running(), "{}", p.stderr());
    drop(conn);
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "{}", p.stderr());
}

#[test]
fn a_second_signal_while_draining_forces_the_exit() {
    let (mut p, conn, _dir) = draining_lb();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(10), "the drain to start", || {
        p.stderr().contains("SIGTERM: draining").then_some(())
    });
    // The operator insists, later than a duplicate delivery would arrive.
    std::thread::sleep(xcluster_runtime_repeat_window() + Duration::from_millis(100));
    assert!(
        p.is_running(),
        "the open connection holds the drain: {}",
        p.stderr()
    );
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(2), "{}", p.stderr());
    drop(conn);
}

/// A SIGINT right after a SIGTERM is the operator's Ctrl-C, not the SIGTERM delivered again: it ends the
/// drain. It was dropped as a repeat, and the drain ran its whole grace period (30 s here).
#[test]
fn an_interrupt_right_after_a_terminate_is_no_repeat() {
    let (mut p, conn, _dir) = draining_lb();
    p.signal(nix::sys::signal::Signal::SIGTERM);
    eventually(Duration::from_secs(10), "the drain to start", || {
        p.stderr().contains("SIGTERM: draining").then_some(())
    });
    p.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(2), "{}", p.stderr());
    drop(conn);
}

/// A SIGHUP while a role starts, before it listens for signals (here while it reads its config from a FIFO
/// that has no data yet), is no reload yet and no end either: its default action killed the process.
#[test]
fn a_hangup_while_a_role_starts_does_not_end_it() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("agent.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut p = Proc::xcluster("agent", &["agent", "--config", fifo.to_str().unwrap()]);
    // A writer opens a FIFO without blocking only once its reader has: the agent is reading its config.
    let mut writer = eventually(Duration::from_secs(10), "the agent to open its config", || {
        (std::fs::OpenOptions::new().write(true))
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .ok()
    });
    p.signal(nix::sys::signal::Signal::SIGHUP);
    let api = free_addr();
    let cfg = format!("role = \"agent\"\nlisten = \"{api}\"\n");
    writer.write_all(cfg.as_bytes()).unwrap();
    drop(writer);
    wait_ready(api, Duration::from_secs(20));
    assert!(p.is_running(), "{}", p.stderr());
}

/// runtime::signals::REPEAT_WINDOW (the tests crate drives the binary and does not link the runtime).
fn xcluster_runtime_repeat_window() -> Duration {
    Duration::from_millis(250)
}

/// A variable that is not UTF-8 in the environment is no panic: someone else's is left alone, and one of
/// ours is a config issue, named. (`std::env::vars` panicked on either.)
#[test]
fn an_environment_variable_that_is_not_utf8_is_no_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let out = Command::new(xcluster_bin())
        .args(["lb", "--print-config"])
        .env("SOMEONE_ELSES", bad)
        .output_within(EXIT_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let out = Command::new(xcluster_bin())
        .args(["lb", "--print-config"])
        .env("XCLUSTER_LB__LISTEN", bad)
        .output_within(EXIT_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("env XCLUSTER_LB__LISTEN: the value is not UTF-8"),
        "{stderr}"
    );
}
