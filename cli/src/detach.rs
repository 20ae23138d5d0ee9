//! `xcluster up --detach`: the monitor in the background, as Supervisord runs unless told `nodaemon`. The
//! process runs its own binary again rather than forking, so the monitor starts clean, inheriting nothing of
//! this process's config load or logger; in a session of its own, so the terminal's Ctrl-C and hang-up do
//! not reach it; with stdin from /dev/null and stdout and stderr appended to `<run_dir>/monitor.log`, which
//! `GET /v1/log` (`ctl maintail`) reads. The parent returns once the monitor answers `/readyz`, or with the
//! child's own exit and this start's log lines if it ends first, or, on Ctrl-C or SIGTERM meanwhile, once
//! the monitor it passed the signal on to has ended.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::args::UpArgs;

/// How long the parent waits for the monitor to be ready (its programs may take longer to be).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How often it asks.
const POLL: Duration = Duration::from_millis(100);
/// Each `/readyz` may take this long.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of the log the parent shows when the child ends early.
const SHOWN_ON_FAILURE: u64 = 4096;

/// The SIGINT or SIGTERM that came while the parent waited (0: none).
static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn interrupted(sig: nix::libc::c_int) {
    // An atomic store is all a handler may do here (async-signal-safe).
    INTERRUPTED.store(sig, std::sync::atomic::Ordering::Relaxed);
}

/// Beyond its `[shutdown]` times, what a monitor's end may take: its programs' SIGKILL 3 s after a fast stop,
/// their exits, the API's answers (2 s) and its log's last lines (2 s).
const END_MARGIN: Duration = Duration::from_secs(10);
/// How often the parent looks whether the monitor it stopped has ended.
const END_POLL: Duration = Duration::from_millis(20);

/// When a signal came, stops the monitor started as `child` with that signal (Ctrl-C stops it fast, as it
/// stops a foreground `up`; SIGTERM drains it) and waits for it to end, at most `within`; returns the exit
/// code (128 + the signal). Returned at once, an `up` run again at once found the run directory still held
/// by the monitor that was stopping.
fn stop_if_interrupted(child: &mut Child, within: Duration, log: &Path) -> Option<i32> {
    let sig = INTERRUPTED.swap(0, std::sync::atomic::Ordering::Relaxed);
    if sig == 0 {
        return None;
    }
    let pid = child.id();
    eprintln!("xcluster up: interrupted; stopping the monitor (pid {pid}) and what it started");
    pass_on(pid, sig);
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Some(128 + sig),
            Ok(None) => {}
            Err(e) => {
                eprintln!("xcluster up: cannot tell whether the monitor (pid {pid}) has ended: {e}");
                return Some(128 + sig);
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "xcluster up: the monitor (pid {pid}) has not ended within {}s; it may still be stopping its \
                 programs: see {}",
                within.as_secs(),
                log.display()
            );
            return Some(128 + sig);
        }
        // A second Ctrl-C goes on to the monitor too, which takes it as forcing its exit, as in the
        // foreground.
        let again = INTERRUPTED.swap(0, std::sync::atomic::Ordering::Relaxed);
        if again != 0 {
            pass_on(pid, again);
        }
        std::thread::sleep(END_POLL);
    }
}

/// Sends signal number `sig` to the monitor `pid`.
fn pass_on(pid: u32, sig: i32) {
    if let (Ok(pid), Ok(sig)) = (i32::try_from(pid), nix::sys::signal::Signal::try_from(sig)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Ctrl-C (or a SIGTERM) while the parent waits stops the monitor it started: the monitor is in a session
/// of its own, so the signal reached only the parent, which died and left the monitor starting every program
/// without a word (and the next `up` failed on its run directory).
fn stop_on_interrupt() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(interrupted),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Starts the monitor of `args` (already checked: its config loads, its port and run directory are free) in
/// the background, with its log at `run_dir/monitor.log`, and waits until `listen` answers ready. Returns the
/// exit code of `xcluster up`. `tokened`: the monitor has a token, so `ctl shutdown` can stop it. `shutdown`:
/// its `[shutdown]` times, which bound the wait for it to end once a signal here stopped it.
pub fn detach(
    args: &UpArgs,
    listen: SocketAddr,
    run_dir: &Path,
    tokened: bool,
    shutdown: xcluster_runtime::common::ShutdownTimes,
) -> i32 {
    let log_path = run_dir.join("monitor.log");
    let log = std::fs::create_dir_all(run_dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
    });
    let (log, exe) = match (log, std::env::current_exe()) {
        (Ok(log), Ok(exe)) => (log, exe),
        (Err(e), _) => {
            eprintln!("xcluster up: cannot open {}: {e}", log_path.display());
            return 1;
        }
        (_, Err(e)) => {
            eprintln!("xcluster up: cannot find its own binary to start in the background: {e}");
            return 1;
        }
    };
    let start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let mut cmd = Command::new(exe);
    cmd.arg("up").arg("--config").arg(&args.config).arg("--detached");
    for s in &args.set {
        cmd.arg("--set").arg(s);
    }
    if matches!(args.log_format, crate::args::LogFormat::Json) {
        cmd.args(["--log-format", "json"]);
    }
    let stdout = match log.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("xcluster up: {}: {e}", log_path.display());
            return 1;
        }
    };
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(log);
    // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent's; it runs in the child
    // between fork and exec, where only such calls are allowed.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xcluster up: cannot start the monitor: {e}");
            return 1;
        }
    };
    let deadline = Instant::now() + READY_WITHIN;
    let ends_within = shutdown.deregister + shutdown.grace + END_MARGIN;
    stop_on_interrupt();
    loop {
        if let Some(code) = stop_if_interrupted(&mut child, ends_within, &log_path) {
            return code;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                eprintln!(
                    "xcluster up: the monitor ended before it was ready ({status}); the end of {}:",
                    log_path.display()
                );
                eprint!("{}", String::from_utf8_lossy(&log_since(&log_path, start)));
                // Never 0: a monitor stopped (SIGTERM, `ctl shutdown`) as it started is not running, and
                // `up -d && ...` must not go on as if it were.
                return status.code().filter(|&c| c != 0).unwrap_or(1);
            }
            Ok(None) => {}
            Err(e) => eprintln!("xcluster up: cannot tell whether the monitor runs: {e}"),
        }
        if crate::ctl::monitor_ready(listen, ASK_TIMEOUT) {
            // A signal during the check (up to a second) still stops it.
            if let Some(code) = stop_if_interrupted(&mut child, ends_within, &log_path) {
                return code;
            }
            // `ctl` goes to 127.0.0.1:7300 unless told: on another address, the commands shown say where.
            let url = if format!("http://{listen}") == crate::args::DEFAULT_MONITOR_URL {
                String::new()
            } else {
                format!(" --url http://{listen}")
            };
            // Without a token the monitor refuses every mutating call, `shutdown` too: its pid is the way.
            let stop = if tokened {
                format!("`xcluster ctl{url} --token TOKEN shutdown`")
            } else {
                format!("`kill {}`", child.id())
            };
            println!(
                "xcluster up: running in the background (pid {}); dashboard at http://{listen}/ ; log {} \
                 (`xcluster ctl{url} maintail -f`); {stop} stops every program",
                child.id(),
                log_path.display()
            );
            return 0;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "xcluster up: the monitor (pid {}) was not ready within {}s; it runs on: see {}",
                child.id(),
                READY_WITHIN.as_secs(),
                log_path.display()
            );
            return 1;
        }
        std::thread::sleep(POLL);
    }
}

/// What the log gained since `start` (this start's lines), at most [`SHOWN_ON_FAILURE`] bytes of its end.
fn log_since(path: &Path, start: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    // Read from where it is needed only: the file holds every earlier start's lines too.
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(start.max(len.saturating_sub(SHOWN_ON_FAILURE))))?;
        let mut out = Vec::new();
        f.take(SHOWN_ON_FAILURE).read_to_end(&mut out)?;
        Ok(out)
    };
    read().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Only this start's lines, and of them at most the end the parent shows.
    #[test]
    fn the_log_since_a_start_is_its_own_lines_bounded() {
        let dir = std::env::temp_dir().join(format!("xcluster-detach-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("monitor.log");
        std::fs::write(&path, "an earlier start\nthis one\nends here\n").unwrap();
        assert_eq!(log_since(&path, 17), b"this one\nends here\n");
        let long = "x".repeat(2 * SHOWN_ON_FAILURE as usize);
        std::fs::write(&path, format!("old\n{long}")).unwrap();
        assert_eq!(log_since(&path, 4).len() as u64, SHOWN_ON_FAILURE);
        assert!(log_since(&dir.join("none"), 0).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
