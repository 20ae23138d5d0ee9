//! The end-to-end test harness: starts the real `xcluster` binary with temporary configs, waits for readiness
//! by bounded polling, and kills every process it started (and their descendants) even when a test fails.
//!
//! Every process started here carries a unique `XCLUSTER_TEST_TAG` in its environment; children inherit it,
//! so cleanup finds grandchildren that moved to their own process groups (the monitor's programs) too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub mod browser;
pub mod http;
pub mod netns;
pub mod services;

pub use http::{HttpResponse, content_length, get, request};

/// The `xcluster` binary under test: `$XCLUSTER_BIN`, or built once per test process with cargo.
pub fn xcluster_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("XCLUSTER_BIN") {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "xcluster", "--bin", "xcluster"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of xcluster failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("xcluster")
    })
    .clone()
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A free loopback port that nothing else takes while this test process lives, for a server the test starts
/// later. A port from `bind(0)` would be released until then, and any socket could land on it meanwhile: the
/// kernel hands out the same ephemeral range to `bind(0)` and to every `connect`. So the port is chosen below
/// that range, checked bindable, and reserved among the test processes running at once by a lock on a file
/// named after it (held until this process exits).
pub fn free_port() -> u16 {
    free_port_block(1)
}

/// A base port such that `base..base + n` are free loopback ports, each reserved as [`free_port`] reserves
/// one: for a program given consecutive ports (the monitor's `port_base`), which neither this process's nor
/// another test process's `free_port` hands out meanwhile.
pub fn free_port_block(n: u16) -> u16 {
    const LOW: u32 = 10_000;
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let high: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|&h| h > LOW + 1000)
        .unwrap_or(32_768);
    let dir = std::env::temp_dir().join("xcluster-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    // The port's lock, taken (it fails while another reservation holds it, this process's own included: a
    // lock belongs to the open file), once the port is bindable.
    let reserve = |port: u16| {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        // SAFETY: flock on a descriptor this function owns.
        let locked = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        (locked && TcpListener::bind(("127.0.0.1", port)).is_ok()).then_some(lock)
    };
    // A different starting point per process and per call, so concurrent tests rarely try the same ports.
    let seed = u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919);
    let span = high - LOW - u32::from(n) + 1;
    for i in 0..span {
        let base = LOW + (u32::try_from(seed % u64::from(span)).unwrap() + i) % span;
        let base = u16::try_from(base).unwrap();
        // Dropped, the locks taken of a block that is not all free are released.
        let locks: Option<Vec<_>> = (base..base + n).map(reserve).collect();
        if let Some(locks) = locks {
            HELD.lock().unwrap().extend(locks);
            return base;
        }
    }
    panic!("no {n} free ports in a row in {LOW}..{high}");
}

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn new_tag() -> String {
    // The wall clock tells this process's tags from those of an earlier test process that had the same pid.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        now.as_nanos()
    )
}

/// A running process started by a test. Dropping it stops it and every process that inherited its tag.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    tag: String,
    pub dir: tempfile::TempDir,
}

/// How to start a process.
#[derive(Debug, Default)]
pub struct Spawn {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Stderr goes to a pipe that nobody reads (it fills, as a stuck log reader's would), not to a file.
    pub unread_stderr: bool,
    /// Descriptors the process gets at the given numbers (Chromium's `--remote-debugging-pipe` reads 3 and
    /// writes 4).
    pub fds: Vec<(std::os::fd::OwnedFd, std::os::fd::RawFd)>,
}

impl Proc {
    /// Starts `xcluster ARGS...` with stdout and stderr captured to files.
    pub fn xcluster(name: &str, args: &[&str]) -> Proc {
        Self::spawn(
            name,
            &xcluster_bin(),
            Spawn {
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    }

    /// Starts any program.
    pub fn spawn(name: &str, program: &Path, spec: Spawn) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let tag = new_tag();
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut cmd = Command::new(program);
        // Its own $TMPDIR too: a monitor without `run_dir` keeps its lock under it, and would leave one more
        // directory in the shared /tmp for every test run.
        cmd.args(&spec.args)
            .env("XCLUSTER_TEST_TAG", &tag)
            .env("TMPDIR", dir.path())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout);
        if spec.unread_stderr {
            // The read end stays open, unread, in the `Child` until it is dropped.
            cmd.stderr(Stdio::piped());
        } else {
            cmd.stderr(stderr);
        }
        // Default to the process's own temp dir, so files a role creates (an app's database) never land in the
        // source tree.
        cmd.current_dir(spec.cwd.as_deref().unwrap_or(dir.path()));
        if !spec.fds.is_empty() {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            assert!(spec.fds.len() <= 8, "at most 8 descriptors");
            let fds: Vec<_> = spec.fds.iter().map(|(fd, to)| (fd.as_raw_fd(), *to)).collect();
            // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. Each descriptor is
            // first copied above the targets, so that installing one cannot overwrite another still to come;
            // dup2 leaves the copy at its target without close-on-exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut high = [-1; 8];
                    for (h, &(fd, _)) in high.iter_mut().zip(&fds) {
                        *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                        if *h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (&h, &(_, to)) in high.iter().zip(&fds) {
                        if libc::dup2(h, to) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            tag,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code (or 128+signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                use std::os::unix::process::ExitStatusExt;
                return Some(
                    status
                        .code()
                        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                );
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// The tag every descendant of this process carries.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && matches!(child.try_wait(), Ok(None))
        {
            {
                // A polite stop first, so supervisors stop their children; then force.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        kill_tagged(&self.tag);
        if std::thread::panicking() {
            eprintln!(
                "---- {} stderr (tail) ----\n{}",
                self.name,
                tail(&self.stderr(), 4000)
            );
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// The longest a command expected to exit (a refused daemon, `--print-config`, `ctl`) may run before the test
/// fails: past any wait such a command is given itself (`ctl` waits 60 s by default).
pub const EXIT_DEADLINE: Duration = Duration::from_secs(90);

/// Running a command to its exit, bounded.
pub trait RunToExit {
    /// Runs the command to its exit, tagged as a [`Proc`]'s process is, with stdin empty and stdout and stderr
    /// captured, and returns its status and output (as [`Command::output`]). A command expected to exit that
    /// runs on instead (a daemon whose refusal regressed serves for ever) fails the test after `timeout`
    /// rather than hang it; it is killed with everything it started, on a panic too.
    fn output_within(&mut self, timeout: Duration) -> std::process::Output;
}

impl RunToExit for Command {
    fn output_within(&mut self, timeout: Duration) -> std::process::Output {
        /// Kills the child and whatever inherited its tag, however the run ends.
        struct Run {
            child: Child,
            tag: String,
        }
        impl Drop for Run {
            fn drop(&mut self) {
                // Once reaped, `kill` signals nothing: the pid may be another's.
                let _ = self.child.kill();
                let _ = self.child.wait();
                kill_tagged(&self.tag);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let tag = new_tag();
        let child = self
            .env("XCLUSTER_TEST_TAG", &tag)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.get_program()));
        let mut run = Run { child, tag };
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = run.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        drop(run);
        let (stdout, stderr) = (std::fs::read(&out).unwrap(), std::fs::read(&err).unwrap());
        let Some(status) = status else {
            panic!(
                "{:?} {:?} did not exit within {timeout:?}:\n{}{}",
                self.get_program(),
                self.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        };
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Kills (SIGKILL) every process whose environment carries `XCLUSTER_TEST_TAG=tag`, until none is left.
pub fn kill_tagged(tag: &str) {
    let needle = format!("XCLUSTER_TEST_TAG={tag}");
    for _ in 0..50 {
        let pids = tagged_pids(&needle);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of live processes (not zombies) whose environment contains `needle` (`KEY=VALUE`).
pub fn tagged_pids(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = state
                .rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false);
            if !zombie {
                out.push(pid);
            }
        }
    }
    out
}

/// Waits until `GET addr/readyz` answers 200.
pub fn wait_ready(addr: SocketAddr, timeout: Duration) {
    eventually(timeout, &format!("{addr}/readyz to answer 200"), || {
        get(addr, "/readyz").ok().filter(|r| r.status == 200).map(|_| ())
    });
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

/// Reads a counter or gauge value from Prometheus text (`name{labels} value`), summing matching series.
pub fn metric_value(metrics: &str, name: &str, label_filter: &str) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let base = series.split('{').next().unwrap_or("");
        if base == name && series.contains(label_filter) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}

/// Reads all of a stream into a string (test helper for simple protocols).
pub fn read_all(mut s: TcpStream) -> String {
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// What a client of a [`Hammer`] saw of one exchange on a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Try {
    Served,
    /// Its connect was refused: the port is closed.
    Refused,
    /// Reset in its handshake, or connected and then reset or closed before its answer: what closing a
    /// listener must never do.
    Lost,
}

/// Clients on their own threads, each running exchange after exchange (at most 5,000) until one is refused.
#[derive(Debug)]
pub struct Hammer {
    clients: Vec<std::thread::JoinHandle<Vec<Try>>>,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Hammer {
    /// Starts `threads` clients; `exchange(i)` runs a client's `i`th exchange.
    pub fn start(threads: usize, exchange: impl Fn(usize) -> Try + Send + Sync + Clone + 'static) -> Self {
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let clients = (0..threads)
            .map(|_| {
                let (served, exchange) = (served.clone(), exchange.clone());
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    for i in 0..5_000 {
                        let t = exchange(i);
                        seen.push(t);
                        match t {
                            Try::Served => {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Try::Refused => break,
                            Try::Lost => {}
                        }
                    }
                    seen
                })
            })
            .collect();
        Self { clients, served }
    }

    /// Waits until `n` exchanges have been served.
    pub fn wait_served(&self, n: usize, timeout: Duration) {
        eventually(timeout, "exchanges served", || {
            (self.served.load(Ordering::Relaxed) >= n).then_some(())
        });
    }

    /// Joins the clients (they end once refused) and asserts that none lost an exchange and every one ended
    /// refused.
    pub fn assert_none_lost(self) {
        let threads = self.clients.len();
        let seen: Vec<Try> = self.clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        let count = |t| seen.iter().filter(|s| **s == t).count();
        let (served, refused) = (count(Try::Served), count(Try::Refused));
        assert_eq!(count(Try::Lost), 0, "{served} served, {refused} refused");
        assert_eq!(refused, threads, "every client ends refused ({served} served)");
    }
}
