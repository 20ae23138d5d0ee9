//! Helpers shared by the monitor's end-to-end tests: a monitor with its own temp config, free port and run
//! directory, and small accessors over its API.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use xcluster_tests::*;

pub const TOKEN: &str = "test-token";
pub const T: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Mon {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub dir: std::sync::Arc<tempfile::TempDir>,
    pub config: PathBuf,
}

/// The config text: the header every test needs plus `programs`.
pub fn config_text(addr: SocketAddr, dir: &std::path::Path, programs: &str) -> String {
    format!(
        // `programs` comes before any table of its own, so it may begin with top-level keys.
        "role = \"monitor\"\nlisten = \"{addr}\"\ntoken = \"{TOKEN}\"\nrun_dir = \"{}\"\n{programs}\n[shutdown]\ngrace_ms = 5000\n",
        dir.join("run").display()
    )
}

impl Mon {
    pub fn start(programs: &str) -> Mon {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let d = dir.clone();
        let programs = programs.to_string();
        Self::launch(dir, None, move |addr| {
            write_file(d.path(), "monitor.toml", &config_text(addr, d.path(), &programs))
        })
    }

    /// Starts a monitor on `addr` with its run directory in `dir` (so a second one can follow the first).
    pub fn start_in(dir: std::sync::Arc<tempfile::TempDir>, addr: SocketAddr, programs: &str) -> Mon {
        let d = dir.clone();
        let programs = programs.to_string();
        Self::launch(dir, Some(addr), move |addr| {
            write_file(d.path(), "monitor.toml", &config_text(addr, d.path(), &programs))
        })
    }

    /// Starts a monitor with the config `write(addr)` writes; with `addr` `None` a free port is picked, and
    /// picked again if another test took it between the pick and the bind.
    pub fn launch(
        dir: std::sync::Arc<tempfile::TempDir>,
        addr: Option<SocketAddr>,
        write: impl Fn(SocketAddr) -> PathBuf,
    ) -> Mon {
        Self::launch_bin(&xcluster_bin(), dir, addr, write)
    }

    /// [`Mon::launch`] of the binary at `bin`.
    pub fn launch_bin(
        bin: &std::path::Path,
        dir: std::sync::Arc<tempfile::TempDir>,
        addr: Option<SocketAddr>,
        write: impl Fn(SocketAddr) -> PathBuf,
    ) -> Mon {
        for _ in 0..5 {
            let a = addr.unwrap_or_else(free_addr);
            let config = write(a);
            let args = ["monitor", "--config", config.to_str().unwrap()];
            let spec = Spawn {
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            let mut proc = Proc::spawn("monitor", bin, spec);
            let pid = proc.pid() as u64;
            // Ready means *our* monitor answers: another test's process may hold a port we were given too.
            let ours = eventually(T, &format!("the monitor on {a} to answer"), || {
                if !proc.is_running() {
                    return Some(false);
                }
                get(a, "/readyz").ok().filter(|r| r.status == 200)?;
                let r = get(a, "/v1/status").ok().filter(|r| r.status == 200)?;
                (r.json()["monitor"]["pid"].as_u64() == Some(pid)).then_some(true)
            });
            if ours {
                return Mon {
                    proc,
                    addr: a,
                    dir,
                    config,
                };
            }
            assert!(addr.is_none(), "monitor on {a} failed: {}", proc.stderr());
        }
        panic!("no monitor could start");
    }

    pub fn rewrite(&self, programs: &str) {
        let text = config_text(self.addr, self.dir.path(), programs);
        // Write then rename, as editors do, so the watcher never sees a half-written file.
        let tmp = write_file(self.dir.path(), "monitor.toml.tmp", &text);
        std::fs::rename(tmp, &self.config).unwrap();
    }

    pub fn status(&self) -> Value {
        let r = get(self.addr, "/v1/status").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }

    pub fn prog(&self, name: &str) -> Value {
        let s = self.status();
        listed(&s, name)
            .cloned()
            .unwrap_or_else(|| panic!("no program {name} in {s}"))
    }

    pub fn state(&self, name: &str) -> String {
        self.prog(name)["state"].as_str().unwrap().to_string()
    }

    pub fn pid(&self, name: &str) -> Option<i32> {
        self.prog(name)["pid"].as_i64().map(|p| p as i32)
    }

    /// Waits until `name` is in `state`; returns its status.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("{name} to be {state}"), || {
            let p = self.prog(name);
            (p["state"] == state).then_some(p)
        })
    }

    /// Waits until `name` is RUNNING with a pid other than `old`; returns the new pid.
    pub fn wait_new_pid(&self, name: &str, old: i32, timeout: Duration) -> i32 {
        eventually(timeout, &format!("{name} to run with a new pid"), || {
            let p = self.prog(name);
            let pid = p["pid"].as_i64()? as i32;
            (p["state"] == "RUNNING" && pid != old).then_some(pid)
        })
    }

    pub fn post(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {TOKEN}");
        request(self.addr, "POST", path, &[("Authorization", &auth)], None).unwrap()
    }

    /// Runs `ctl` with `args`, asserts that it succeeded, and returns what it printed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(o.status.success(), "ctl {args:?}: {}", out(&o));
        out(&o)
    }

    /// Runs `ctl` with `args` against this monitor, bounded by [`EXIT_DEADLINE`] (past ctl's own waits).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(xcluster_bin())
            .args(["ctl", "--url", &format!("http://{}", self.addr), "--token", TOKEN])
            .args(args)
            .output_within(EXIT_DEADLINE)
    }

    pub fn events(&self) -> Vec<Value> {
        get(self.addr, "/v1/events/recent").unwrap().json()["events"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// A program's command (for a TOML literal string, `'''...'''`) that on SIGTERM goes on until the test
/// releases it ([`release`]), so with a `stopwaitsecs` far past the test its stops last exactly as long as
/// the test needs, however slow the machine. It prints `trapped` once its trap is set.
pub fn held_until_released(dir: &std::path::Path) -> String {
    format!(
        r#"/bin/sh -c 'trap "while [ ! -e {go}-$$ ]; do sleep 0.1; done; exit 0" TERM; echo trapped; while :; do sleep 0.1; done' "#,
        go = dir.join("go").display()
    )
}

/// Lets the process `pid` of a [`held_until_released`] command in `dir` end its stop.
pub fn release(dir: &std::path::Path, pid: i32) {
    std::fs::write(dir.join(format!("go-{pid}")), "").unwrap();
}

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Whether `pid` exists at all, zombie or not (a zombie means nobody reaped it).
pub fn exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Program `name` in a `/v1/status` answer, if it lists it (a removed one is no longer listed).
pub fn listed<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["programs"].as_array()?.iter().find(|p| p["name"] == name)
}

pub fn lists(status: &Value, name: &str) -> bool {
    listed(status, name).is_some()
}

pub fn kill9(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that a `ctl` run exited with `code` having printed exactly `text` (give or take the ends' blanks).
pub fn assert_says(o: &Output, code: i32, text: &str) {
    assert_eq!((o.status.code(), out(o).trim()), (Some(code), text), "{}", out(o));
}

/// Asserts that a `ctl` run failed having said `text` (among the rest).
pub fn assert_refused(o: &Output, text: &str) {
    assert!(
        !o.status.success() && out(o).contains(text),
        "{text:?} in\n{}",
        out(o)
    );
}

/// A scripted balancer: answers `GET /v1/status` with a fixed table (one instance, an L4 proxy with one
/// listener and one backend).
pub fn fake_balancer() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(100) {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let body = r#"{"version": 42, "instances": [{"id": "app-7", "addr": "127.0.0.1:7101", "state": "up",
                "report_age_ms": 120, "cpu": 0.25, "weights": {"browse": 7500, "order": 5000}, "weight_set": "50%"}],
                "proxy": {"listeners": [{"name": "browse", "addr": "127.0.0.1:7400", "request_type": "browse", "active": 2, "max_connections": 100, "accepted": 1234, "failed": 1,
                "rejected": 4, "denied": 5, "header_errors": 6, "sni_routed": 16, "retries": 3, "waiting": 7, "queued": 9, "rate_waits": 17, "accept_errors": 10, "idle_timeouts": 0, "client_errors": 11, "backend_errors": 14, "bytes_up": 2048, "bytes_down": 5242880,
                "unbound": true}],
                "backends": [{"addr": "127.0.0.1:7101", "active": 2, "max_connections": 64, "connects": 1233,
                "connect_failures": 1, "check_failures": 12, "full": 13, "closed_on_down": 15, "bytes_up": 2048, "bytes_down": 5242880, "weight": 0, "weight_set": "3", "effective_weight": 0, "failing": true, "drained": true, "backup": true}]}}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// A program run by a wrapper shell that does not exec (`sh -c 'sh server.sh; true'`), whose server takes
/// 0.5 s to shut down cleanly on TERM: the `[programs.wrap]` section, and the files the server writes, its
/// pid once up and `clean` once its shutdown finished.
pub struct WrappedServer {
    pub programs: String,
    pub up: PathBuf,
    pub clean: PathBuf,
}

impl WrappedServer {
    pub fn new(dir: &std::path::Path) -> WrappedServer {
        let (up, clean) = (dir.join("up"), dir.join("clean"));
        let server = write_file(
            dir,
            "server.sh",
            &format!(
                "trap 'sleep 0.5; echo clean > {clean}; exit 0' TERM\necho $$ > {up}\nwhile :; do sleep 0.1; done\n",
                clean = clean.display(),
                up = up.display()
            ),
        );
        let programs = format!(
            "[programs.wrap]\ncommand = \"/bin/sh -c 'sh {}; true'\"\nstartsecs = 0\nstopwaitsecs = 10\n",
            server.display()
        );
        WrappedServer { programs, up, clean }
    }

    /// The server's pid, once it is up.
    pub fn server_pid(&self) -> i32 {
        eventually(T, "the server up", || {
            std::fs::read_to_string(&self.up).ok()?.trim().parse().ok()
        })
    }

    /// Whether the server finished its clean shutdown.
    pub fn shut_down_cleanly(&self) -> bool {
        std::fs::read_to_string(&self.clean).unwrap_or_default() == "clean\n"
    }
}
