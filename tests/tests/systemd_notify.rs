//! Every role under systemd: with `NOTIFY_SOCKET` it says `READY=1` once its API answers, `RELOADING=1` (with
//! `MONOTONIC_USEC`) and then `READY=1` around a reload, applied or rejected, `STOPPING=1` when it stops, and
//! `WATCHDOG=1` every half `WATCHDOG_USEC`; a program the monitor supervises inherits none of it. The shipped
//! unit files pass `systemd-analyze verify`, and the sysusers file makes the user they run as.

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// Report signing, to end the balancer's warm-up when the test says so.
mod directory_support;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use xcluster_runtime::sdnotify::monotonic_usec;
use xcluster_tests::{Proc, Spawn, eventually, free_addr, get, request, workspace_root, xcluster_bin};

const ROLES: [&str; 4] = ["lb", "agent", "monitor", "app"];
const T: Duration = Duration::from_secs(20);
/// The watchdog timeout the tests hand the roles: a ping every 100 ms.
const WATCHDOG_USEC: &str = "200000";

/// The service manager's end: a datagram socket bound where `NOTIFY_SOCKET` points, and every message it
/// received so far, in order.
struct Manager {
    sock: UnixDatagram,
    /// What `NOTIFY_SOCKET` says: a path, or `@name`.
    env: String,
    seen: Vec<String>,
    /// Where `next` looks from.
    cursor: usize,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn at_path() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Self::with(sock, path.display().to_string(), dir)
    }

    fn abstract_named() -> Self {
        use std::os::linux::net::SocketAddrExt;
        // Unique while the socket lives: an abstract name goes with its socket, and a pid with its process
        // (one such manager per test process).
        let name = format!("xcluster-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Self::with(sock, format!("@{name}"), tempfile::tempdir().unwrap())
    }

    fn with(sock: UnixDatagram, env: String, dir: tempfile::TempDir) -> Self {
        sock.set_nonblocking(true).unwrap();
        Self {
            sock,
            env,
            seen: Vec::new(),
            cursor: 0,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.env.clone()),
            ("WATCHDOG_USEC".into(), WATCHDOG_USEC.into()),
        ]
    }

    /// Reads what has arrived into `seen`; returns the messages new since the call.
    fn drain(&mut self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let from = self.seen.len();
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.seen[from..].to_vec()
    }

    /// Waits for the next message past the last one `next` returned (watchdog pings aside) that `want`
    /// accepts; returns it and the messages, pings aside, that came before it.
    fn next(&mut self, what: &str, want: impl Fn(&str) -> bool) -> (String, Vec<String>) {
        let at = eventually(T, what, || {
            self.drain();
            (self.cursor..self.seen.len()).find(|&i| want(&self.seen[i]))
        });
        let before = (self.seen[self.cursor..at].iter())
            .filter(|m| *m != "WATCHDOG=1")
            .cloned()
            .collect();
        self.cursor = at + 1;
        (self.seen[at].clone(), before)
    }

    /// The messages past the last one `next` returned, pings aside.
    fn since_last(&mut self) -> Vec<String> {
        self.drain();
        (self.seen[self.cursor..].iter())
            .filter(|m| *m != "WATCHDOG=1")
            .cloned()
            .collect()
    }
}

fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The role's config file: its API address, and for the monitor a run directory and `programs`.
fn config(role: &str, addr: SocketAddr, dir: &Path, extra: &str) -> String {
    let mut text = format!("role = \"{role}\"\nlisten = \"{addr}\"\n");
    if role == "monitor" {
        text.push_str(&format!(
            "token = \"t\"\nrun_dir = \"{}\"\n",
            dir.join("run").display()
        ));
    }
    text.push_str(extra);
    text
}

/// A role started with its config in a temp dir (returned, so it lives as long as the role).
fn start(role: &str, manager: &Manager, extra: &str) -> (Proc, SocketAddr, PathBuf, tempfile::TempDir) {
    let addr = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{role}.toml"));
    std::fs::write(&file, config(role, addr, dir.path(), extra)).unwrap();
    let p = Proc::spawn(
        role,
        &xcluster_bin(),
        Spawn {
            args: vec![role.into(), "--config".into(), file.display().to_string()],
            env: manager.env(),
            ..Default::default()
        },
    );
    (p, addr, file, dir)
}

/// READY=1 once the API answers `/readyz` 200, naming the role's own pid; nothing but watchdog pings before.
fn ready(role: &str, manager: &mut Manager, p: &Proc, addr: SocketAddr) {
    let (msg, before) = manager.next(&format!("{role}: READY=1"), |m| m.starts_with("READY=1"));
    // Checked as soon as the message is read: sent before the API served, it would find it refusing.
    let r = get(addr, "/readyz").unwrap_or_else(|e| panic!("{role}: READY=1 before its API answers: {e}"));
    assert_eq!(r.status, 200, "{role}: READY=1 before /readyz says ready");
    assert!(before.is_empty(), "{role}: {before:?} before READY=1");
    assert_eq!(
        field(&msg, "MAINPID"),
        Some(p.pid().to_string().as_str()),
        "{role}: {msg}"
    );
    assert!(
        field(&msg, "STATUS").is_some_and(|s| s.contains(role)),
        "{role}: {msg}"
    );
}

/// SIGHUP: RELOADING=1 stamped after the signal was sent, then READY=1 whose status `says`.
fn reload(role: &str, manager: &mut Manager, p: &Proc, says: &str) {
    let sent = monotonic_usec();
    p.signal(Signal::SIGHUP);
    let (msg, _) = manager.next(&format!("{role}: RELOADING=1"), |m| m.starts_with("RELOADING=1"));
    let stamp: u64 = field(&msg, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("{role}: no MONOTONIC_USEC in {msg:?}"))
        .parse()
        .unwrap();
    assert!(
        stamp >= sent && stamp <= monotonic_usec(),
        "{role}: stamped {stamp}, signal sent at {sent}"
    );
    let (msg, before) = manager.next(&format!("{role}: READY=1 after the reload"), |m| {
        m.starts_with("READY=1")
    });
    assert!(
        before.is_empty(),
        "{role}: {before:?} between RELOADING=1 and READY=1"
    );
    let status = field(&msg, "STATUS").unwrap_or_default();
    assert!(status.contains(says), "{role}: {msg:?} does not say {says:?}");
}

#[test]
fn every_role_tells_systemd_it_is_ready_reloading_alive_and_stopping() {
    for role in ROLES {
        let mut manager = Manager::at_path();
        // The balancer with a proxy listener and no instance: it serves its API at once but is ready only
        // after its warm-up, so a READY=1 sent when the API listens, not when the role is ready, shows. The
        // warm-up is the longest there is, and ends when the test reports an instance, however slow the start.
        let extra = match role {
            "lb" => format!(
                "[reports]\nkey = \"{}\"\n[proxy]\nwarmup_ms = 60000\n[[proxy.listeners]]\nname = \"web\"\nlisten = \"{}\"\n",
                directory_support::KEY,
                free_addr()
            ),
            _ => String::new(),
        };
        let (mut p, addr, file, _dir) = start(role, &manager, &extra);
        // The instance the test reports to the balancer: listening is all it has to do.
        let instance = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        if role == "lb" {
            eventually(T, "lb: its API to answer while it warms up", || {
                get(addr, "/livez").ok().filter(|r| r.status == 200)
            });
            assert_eq!(get(addr, "/readyz").unwrap().status, 503, "warmed up already");
            let early = manager.since_last();
            assert!(early.is_empty(), "lb: {early:?} before it is ready");
            let now = directory_support::now_ms();
            let (a, at) = ("h/a", instance.local_addr().unwrap());
            let r = directory_support::post_signed(
                addr,
                &directory_support::report("h", now * 1000, now, &[(a, at, 0)]),
            );
            assert_eq!(r.status, 200, "{}", r.body);
        }
        ready(role, &mut manager, &p, addr);

        // The watchdog: pinged repeatedly, about every 100 ms.
        let pings_at = manager.seen.len();
        eventually(T, &format!("{role}: three WATCHDOG=1"), || {
            manager.drain();
            (manager.seen[pings_at..]
                .iter()
                .filter(|m| *m == "WATCHDOG=1")
                .count()
                >= 3)
                .then_some(())
        });

        reload(role, &mut manager, &p, "reloaded");
        // A config the role refuses keeps the old one serving: ready still, and the status says why.
        let good = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{good}no_such_key = 1\n")).unwrap();
        reload(role, &mut manager, &p, "rejected");
        assert_eq!(get(addr, "/readyz").unwrap().status, 200, "{role}");

        p.signal(Signal::SIGTERM);
        let (msg, _) = manager.next(&format!("{role}: STOPPING=1"), |m| m.starts_with("STOPPING=1"));
        assert!(
            field(&msg, "STATUS").is_some_and(|s| s.contains("stopping")),
            "{role}: {msg}"
        );
        assert_eq!(p.wait_exit(T), Some(0), "{role}");
        let after = manager.since_last();
        assert!(after.is_empty(), "{role}: {after:?} after STOPPING=1");
    }
}

/// The monitor under an abstract `NOTIFY_SOCKET` (`@name`, as systemd hands out): its programs, and the
/// balancer among them, do not inherit the socket nor the watchdog (they would speak for the monitor); a
/// config `reread` refuses is told in the status line; a shutdown through the API says STOPPING=1 as SIGTERM
/// does.
#[test]
fn the_monitor_keeps_the_notify_socket_from_its_programs() {
    let mut manager = Manager::abstract_named();
    let lb = free_addr();
    let env_file = tempfile::tempdir().unwrap();
    let env_path = env_file.path().join("env");
    let probe_path = env_file.path().join("probe-env");
    let programs = format!(
        "[programs.dump]\ncommand = \"/bin/sh -c 'env > {}; exec sleep 600'\"\n\
         [programs.dump.readiness]\ncommand = \"/bin/sh -c 'env > {}'\"\n\
         [programs.lb]\ncommand = \"{{self}} lb --set listen={lb}\"\n",
        env_path.display(),
        probe_path.display()
    );
    let (p, addr, file, _dir) = start("monitor", &manager, &programs);
    ready("monitor", &mut manager, &p, addr);
    let env = eventually(T, "the program's environment", || {
        std::fs::read_to_string(&env_path)
            .ok()
            .filter(|e| e.contains("XCLUSTER_PROCESS_NAME=dump"))
    });
    // A probe command runs in the monitor's environment too.
    let probe_env = eventually(T, "the readiness probe's environment", || {
        std::fs::read_to_string(&probe_path)
            .ok()
            .filter(|e| e.contains("XCLUSTER_TEST_TAG="))
    });
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(!env.contains(&format!("{var}=")), "the program sees {var}: {env}");
        assert!(
            !probe_env.contains(&format!("{var}=")),
            "the probe sees {var}: {probe_env}"
        );
    }
    // The supervised balancer serves, and it told the monitor's manager nothing.
    eventually(T, "the supervised balancer to be ready", || {
        get(lb, "/readyz").ok().filter(|r| r.status == 200)
    });
    let others = manager.since_last();
    assert!(
        others.is_empty(),
        "a program spoke to the monitor's manager: {others:?}"
    );

    // A broken file: the watcher's reload rejects it (RELOADING=1, then READY=1 saying so), and a `reread`
    // that reads it again is refused too, which the status line tells without a reload's pair around it.
    std::fs::write(&file, "role = \"monitor\"\nlisten = 5\n").unwrap();
    let (msg, _) = manager.next("the monitor: READY=1 after the file's reload", |m| {
        m.starts_with("READY=1")
    });
    assert!(msg.contains("config reload rejected"), "{msg}");
    let auth = [("authorization", "Bearer t")];
    let r = request(addr, "POST", "/v1/reread", &auth, None).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let (msg, before) = manager.next("the monitor: STATUS= after the reread", |m| {
        m.starts_with("STATUS=")
    });
    assert!(before.is_empty(), "{before:?} before the reread's status");
    assert!(
        msg.starts_with("STATUS=monitor ready; config rejected, keeping the old config: "),
        "{msg}"
    );

    let r = request(
        addr,
        "POST",
        "/v1/shutdown",
        &[("authorization", "Bearer t")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let (msg, _) = manager.next("the monitor: STOPPING=1", |m| m.starts_with("STOPPING=1"));
    assert!(msg.contains("STATUS=monitor stopping"), "{msg}");
    let mut p = p;
    assert_eq!(p.wait_exit(T), Some(0));
}

/// Each unit in `configs/systemd/` passes `systemd-analyze verify` without a warning, run on a copy whose
/// `ExecStart` names the binary under test (`/usr/local/bin/xcluster` is not there).
#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    let units = workspace_root().join("configs/systemd");
    let dir = tempfile::tempdir().unwrap();
    let bin = xcluster_bin().display().to_string();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("/usr/local/bin/xcluster "), "{}", path.display());
        let copy = dir.path().join(path.file_name().unwrap());
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/xcluster ", &format!("{bin} ")),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .expect("systemd-analyze (scripts/install-deps installs it)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{}: {}\n{said}",
            path.display(),
            out.status
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "xcluster-agent.service",
            "xcluster-app.service",
            "xcluster-lb.service",
            "xcluster-monitor.service"
        ]
    );
}

/// `xcluster.sysusers.conf` makes the user and group every unit that names one runs as: `systemd-sysusers`
/// applied to an empty root writes them as a system account with no login shell.
#[test]
fn the_shipped_sysusers_file_makes_the_units_user() {
    let units = workspace_root().join("configs/systemd");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let out = std::process::Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(units.join("xcluster.sysusers.conf"))
        .output()
        .expect("systemd-sysusers (scripts/install-deps installs systemd)");
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let mut named = 0;
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let (db, name) = match line.split_once('=') {
                Some(("User", n)) if n != "root" => (&passwd, n),
                Some(("Group", n)) if n != "root" => (&group, n),
                _ => continue,
            };
            named += 1;
            let fields: Vec<&str> = (db.lines())
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f[0] == name)
                .unwrap_or_else(|| panic!("{}: {line} is not made by the sysusers file", path.display()));
            let id: u32 = fields[2].parse().unwrap();
            assert!(id > 0 && id < 1000, "{name}: not a system id: {id}");
            if db == &passwd {
                assert!(fields[6].ends_with("nologin"), "{name} can log in: {fields:?}");
            }
        }
    }
    // The lb, agent and app units name a user and a group each; the monitor runs as root.
    assert_eq!(named, 6, "the units' User=/Group= lines changed");
}
