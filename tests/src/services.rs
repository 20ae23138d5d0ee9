//! Throwaway PostgreSQL and Redis servers for tests: data in a temporary directory, a free loopback port,
//! started as real servers and killed (with everything they spawned) when the handle drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, Spawn, eventually, free_addr};

/// A running PostgreSQL server with a `xcluster` superuser (trust auth on loopback).
#[derive(Debug)]
pub struct Postgres {
    pub addr: SocketAddr,
    /// `postgres://xcluster@127.0.0.1:PORT/xcluster`
    pub url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// A running Redis server (no persistence).
#[derive(Debug)]
pub struct Redis {
    pub addr: SocketAddr,
    /// `redis://127.0.0.1:PORT`
    pub url: String,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
}

fn pg_bin(name: &str) -> PathBuf {
    // Debian keeps the server binaries out of PATH.
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .last()
        .map(|v| v.join("bin").join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `psql` as the `xcluster` superuser to database `db` of the server at `addr`.
fn psql(addr: SocketAddr, db: &str) -> Command {
    let mut c = Command::new(pg_bin("psql"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "-U",
        "xcluster",
        "-d",
        db,
    ]);
    c
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn pg_command(tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    }
}

fn make_accessible(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

impl Postgres {
    /// Initialises a cluster in a temp dir and starts it. Panics with the server's output if it cannot.
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().expect("tempdir");
        make_accessible(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres data dir");
        }
        let out = pg_command("initdb")
            .args(["-A", "trust", "-U", "xcluster", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = free_addr();
        let program = if is_root() {
            PathBuf::from("runuser")
        } else {
            pg_bin("postgres")
        };
        let mut args: Vec<String> = Vec::new();
        if is_root() {
            args.extend(["-u", "postgres", "--"].map(String::from));
            args.push(pg_bin("postgres").display().to_string());
        }
        args.extend([
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-k".into(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "max_connections=200".into(),
        ]);
        let proc = Proc::spawn(
            "postgres",
            &program,
            Spawn {
                args,
                ..Default::default()
            },
        );
        let url = format!("postgres://xcluster@127.0.0.1:{}/postgres", addr.port());
        eventually(Duration::from_secs(30), "postgres to accept queries", || {
            let out = psql(addr, "postgres").args(["-c", "select 1"]).output().ok()?;
            out.status.success().then_some(())
        });
        let created = (psql(addr, "postgres").args(["-c", "create database xcluster"]))
            .output()
            .expect("psql");
        assert!(
            created.status.success(),
            "create database: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let url = url.replace("/postgres", "/xcluster");
        Postgres {
            addr,
            url,
            _proc: proc,
            _dir: dir,
        }
    }
}

/// A transaction held open by `psql` on a [`Postgres`], with the locks its statement took, until
/// [`HeldTx::commit`] or drop (which kills `psql`, so the server rolls it back).
#[derive(Debug)]
pub struct HeldTx {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Postgres {
    /// Begins a transaction on the `xcluster` database, runs `statement` in it (say a `SELECT ... FOR UPDATE`
    /// that makes writers of those rows wait), and returns once it has run; the transaction stays open.
    pub fn hold(&self, statement: &str) -> HeldTx {
        use std::io::{BufRead, Write};
        use std::process::Stdio;
        let mut child = psql(self.addr, "xcluster")
            .args(["-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        let mut stdin = child.stdin.take();
        let script = format!("BEGIN;\n{statement};\n\\echo held\n");
        (stdin.as_mut().unwrap().write_all(script.as_bytes())).expect("write to psql");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let held = HeldTx { child, stdin };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "held" => return held,
                Ok(_) => {}
                Err(e) => panic!("psql did not run {statement:?} within 30 s: {e}"),
            }
        }
    }
}

impl Postgres {
    /// Runs one SQL statement on the `xcluster` database and returns its output, unaligned, rows only.
    pub fn query(&self, sql: &str) -> String {
        let out = (psql(self.addr, "xcluster").args(["-q", "-A", "-t", "-c", sql]))
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl HeldTx {
    /// Commits the transaction (its locks go) and waits for `psql` to exit.
    pub fn commit(mut self) {
        use std::io::Write;
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(b"COMMIT;\n\\q\n").expect("write to psql");
        drop(stdin);
        eventually(Duration::from_secs(30), "psql to exit after its COMMIT", || {
            self.child.try_wait().expect("psql")
        });
    }
}

impl Drop for HeldTx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// Starts a Redis server with persistence off.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_addr();
        let proc = Self::spawn(addr, dir.path());
        Redis {
            addr,
            url: format!("redis://127.0.0.1:{}", addr.port()),
            proc: Some(proc),
            dir,
        }
    }

    fn spawn(addr: SocketAddr, dir: &Path) -> Proc {
        let args = [
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.display().to_string()])
        .collect();
        let proc = Proc::spawn(
            "redis",
            Path::new("redis-server"),
            Spawn {
                args,
                ..Default::default()
            },
        );
        eventually(Duration::from_secs(20), "redis to answer PING", || {
            ping(addr).then_some(())
        });
        proc
    }

    /// Kills the server (SIGKILL) and starts a fresh, empty one on the same port: a Redis restart.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            // Gone before the new one binds the port: a server still running would answer in its place.
            assert!(
                p.wait_exit(Duration::from_secs(10)).is_some(),
                "redis outlived its SIGKILL"
            );
        }
        self.proc = Some(Self::spawn(self.addr, self.dir.path()));
    }
}

impl Redis {
    /// Sends one inline command (no white space within an argument) over RESP and returns the first line of
    /// its reply (`+OK`, `:1`, `$2` before a bulk string...).
    pub fn command(&self, line: &str) -> String {
        use std::io::{BufRead, Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        s.write_all(format!("{line}\r\n").as_bytes())
            .expect("send the command");
        let mut reply = String::new();
        std::io::BufReader::new(s)
            .take(4096)
            .read_line(&mut reply)
            .expect("the reply");
        reply.trim_end().to_string()
    }

    /// Whether `key` (no white space in it) exists.
    pub fn exists(&self, key: &str) -> bool {
        match self.command(&format!("EXISTS {key}")).as_str() {
            ":1" => true,
            ":0" => false,
            other => panic!("EXISTS answered {other:?}"),
        }
    }
}

/// Sends `PING` over RESP and expects `+PONG`.
pub fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
