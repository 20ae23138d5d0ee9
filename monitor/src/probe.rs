//! Liveness and readiness probes: an HTTP GET (2xx passes), a TCP connect, or a command (exit 0 passes), each
//! with a timeout. A probe runs in its own task for as long as its process lives and reports every result to
//! the supervisor, which decides (liveness: N failures in a row → restart; readiness: shown and used by
//! `depends_on`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xcluster_runtime::Validator;

/// A probe as written in the file: exactly one of `http`, `tcp`, `command`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RawProbe {
    /// `http://host:port/path` (plain HTTP on loopback).
    pub http: String,
    /// `host:port`.
    pub tcp: String,
    /// A command line; exit status 0 passes.
    pub command: String,
    pub period_ms: u64,
    pub timeout_ms: u64,
    pub initial_delay_ms: u64,
    /// Failures in a row that count (liveness: restart).
    pub failure_threshold: u32,
}

impl Default for RawProbe {
    fn default() -> Self {
        Self {
            http: String::new(),
            tcp: String::new(),
            command: String::new(),
            period_ms: 1000,
            timeout_ms: 1000,
            initial_delay_ms: 0,
            failure_threshold: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// Connect to `addr` (host:port) and GET `path`.
    Http {
        addr: String,
        path: String,
    },
    Tcp {
        addr: String,
    },
    Command {
        argv: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    pub period: Duration,
    pub timeout: Duration,
    pub initial_delay: Duration,
    pub failure_threshold: u32,
    /// What a command probe runs as: its program's user, environment and directory.
    pub run_as: RunAs,
}

/// The settings a program's command probe runs with, the program's own (Kubernetes runs an exec probe in
/// its container): run as root, outside the program's `environment` and `directory`, a probe of a program
/// with `user =` checked something else than the program could do, and reached what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub group: String,
    pub environment: Vec<(String, String)>,
    pub directory: Option<std::path::PathBuf>,
    pub user: Option<String>,
    pub umask: Option<u32>,
}

impl RawProbe {
    pub fn validate(&self, key: &str, v: &mut Validator) -> ProbeSpec {
        let set = [&self.http, &self.tcp, &self.command]
            .iter()
            .filter(|s| !s.is_empty())
            .count();
        if set != 1 {
            v.error(key, "set exactly one of http, tcp, command");
        }
        let kind = if !self.http.is_empty() {
            match self.http.strip_prefix("http://") {
                Some(rest) => {
                    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                    ProbeKind::Http {
                        addr: addr.to_string(),
                        path: if path.is_empty() {
                            "/".into()
                        } else {
                            path.to_string()
                        },
                    }
                }
                None => {
                    v.error(
                        format!("{key}.http"),
                        format!("expected http://host:port/path, found {:?}", self.http),
                    );
                    ProbeKind::Tcp { addr: String::new() }
                }
            }
        } else if !self.tcp.is_empty() {
            ProbeKind::Tcp {
                addr: self.tcp.clone(),
            }
        } else {
            let argv = crate::command::split_command(&self.command).unwrap_or_else(|e| {
                v.error(format!("{key}.command"), e);
                Vec::new()
            });
            ProbeKind::Command { argv }
        };
        ProbeSpec {
            kind,
            period: v.millis(&format!("{key}.period_ms"), self.period_ms, 10, 3_600_000),
            timeout: v.millis(&format!("{key}.timeout_ms"), self.timeout_ms, 10, 600_000),
            initial_delay: v.millis(
                &format!("{key}.initial_delay_ms"),
                self.initial_delay_ms,
                0,
                3_600_000,
            ),
            failure_threshold: v.range(
                &format!("{key}.failure_threshold"),
                self.failure_threshold,
                1,
                1000,
            ),
            // Its program's, once its instance is known (`program`).
            run_as: RunAs::default(),
        }
    }
}

/// Kills the process group led by a probe's command when dropped while the command runs (a timeout, or the
/// probe's task ended): the leader is not reaped yet, so its pid still names that group.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = crate::child::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl ProbeSpec {
    /// Substitutes `{port}` and friends in the probe's target.
    pub fn substituted(mut self, vars: &[(&str, String)]) -> Self {
        let sub = |s: &str| crate::program::substitute(s, vars);
        self.kind = match self.kind {
            ProbeKind::Http { addr, path } => ProbeKind::Http {
                addr: sub(&addr),
                path: sub(&path),
            },
            ProbeKind::Tcp { addr } => ProbeKind::Tcp { addr: sub(&addr) },
            ProbeKind::Command { argv } => ProbeKind::Command {
                argv: argv.iter().map(|a| sub(a)).collect(),
            },
        };
        self
    }

    /// Runs the check once; `Err` says why it failed.
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.check_inner()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }

    async fn check_inner(&self) -> Result<(), String> {
        match &self.kind {
            ProbeKind::Tcp { addr } => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map(|_| ())
                .map_err(|e| format!("connect {addr}: {e}")),
            ProbeKind::Http { addr, path } => {
                let mut s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                // The status line is all we need; read a bounded prefix.
                let mut buf = [0u8; 64];
                let mut n = 0;
                while n < 12 {
                    let r = s.read(&mut buf[n..]).await.map_err(|e| format!("read: {e}"))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let status = head.split(' ').nth(1).unwrap_or("");
                if status.starts_with('2') {
                    Ok(())
                } else {
                    Err(format!("GET http://{addr}{path}: status {status:?}"))
                }
            }
            ProbeKind::Command { argv } => {
                let (prog, args) = argv.split_first().ok_or("empty command")?;
                let mut cmd = tokio::process::Command::new(prog);
                crate::child::as_program(&mut cmd, &self.run_as).map_err(|e| format!("run {prog}: {e}"))?;
                // A group of its own, killed whole if the probe times out: `sh -c 'curl ... | grep ...'`
                // left its curl and grep running at every timed-out period when only the shell was killed.
                cmd.args(args)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .process_group(0)
                    .kill_on_drop(true);
                // The descriptor limit the monitor was started with, as its programs get (`child::spawn`).
                // SAFETY: `restore_inherited` makes only async-signal-safe calls and allocates nothing.
                unsafe {
                    cmd.pre_exec(|| {
                        xcluster_runtime::limits::restore_inherited();
                        Ok(())
                    });
                }
                // Registered while waited for: as PID 1 the monitor reaps only children it does not wait for.
                let (mut child, _own) =
                    crate::reaper::spawn(&mut cmd).map_err(|e| format!("run {prog}: {e}"))?;
                let mut group = GroupKill(child.id());
                let status = child.wait().await.map_err(|e| format!("run {prog}: {e}"))?;
                // Reaped: its pid, and so the group's id, may be another's from now on.
                group.0 = None;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("{prog} exited with {status}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Kills the group of a probe's sleeper if the test ends with it still running (a failed assertion), so a
    /// `sleep 300` does not outlive the test.
    struct KillGroup(Option<i32>);

    impl Drop for KillGroup {
        fn drop(&mut self) {
            if let Some(g) = self.0.and_then(crate::statefile::live_group) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(g),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// A command probe that times out ends with everything it started, not only its own process.
    #[tokio::test]
    async fn a_timed_out_command_probe_ends_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let script = format!("sleep 300 & echo $! > {}; wait", pids.display());
        let probe = ProbeSpec {
            kind: ProbeKind::Command {
                argv: vec!["sh".into(), "-c".into(), script],
            },
            period: Duration::from_secs(1),
            // Long enough for a loaded machine to start the shell and have it write the pid.
            timeout: Duration::from_secs(2),
            initial_delay: Duration::ZERO,
            failure_threshold: 1,
            run_as: RunAs::default(),
        };
        let mut guard = KillGroup(None);
        // The pid file is polled for while the probe runs: its shell writes it once it has started.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (checked, sleeper) = tokio::join!(probe.check(), async {
            loop {
                let read = std::fs::read_to_string(&pids).ok();
                if let Some(pid) = read.and_then(|p| p.trim().parse::<i32>().ok()) {
                    break Some(pid);
                }
                if std::time::Instant::now() >= deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        guard.0 = sleeper;
        let e = checked.unwrap_err();
        assert!(e.starts_with("timed out"), "{e}");
        let sleeper = sleeper.expect("the probe's shell wrote its sleeper's pid");
        // Gone, or a zombie until whoever it was handed to reaps it.
        while crate::statefile::live_group(sleeper).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the probe's sleep 300 outlived it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Gone: its pid may be another's from now on.
        guard.0 = None;
    }
}
