//! The monitor's run directory: an exclusive lock (two monitors never share one) and a state file listing the
//! processes it runs (name, pid, kernel start time, launch fingerprint). A monitor started after a `kill -9` of the
//! previous one reads the file and checks each pid still is the same process (by `/proc/<pid>/stat` start
//! time, so a reused pid is never touched). A process whose program still exists with the same launch settings
//! is adopted (the supervisor watches it with a pidfd); the others are stopped cleanly before anything
//! starts — so no two copies of a program ever fight for a port, and a monitor restart costs no downtime.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// One process the monitor runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
    /// `ProcessSpec::launch_fingerprint` of what it was started with (command, directory, environment, umask,
    /// user); a program whose launch settings changed is not adopted. 0 in files written before adoption
    /// existed, which therefore never match.
    #[serde(default)]
    pub launch: u64,
    /// Its output pipes, which it holds a read end of for the monitor that adopts it (`child::take_output`);
    /// 0 in files written before it did.
    #[serde(default)]
    pub pipes: crate::child::Pipes,
    /// The restarts the monitor made of its program by itself so far (`restarts` in the status), which the
    /// monitor that adopts it counts on from; 0 in files written before it did.
    #[serde(default)]
    pub restarts: u64,
    /// Its program's `stopsignal` when it started (by name, `SIGINT`), which the monitor that stops it as a
    /// leftover sends; `None` in files written before it was kept, or naming no signal of this system.
    #[serde(default, with = "signal_name")]
    pub stopsignal: Option<Signal>,
    /// Its program's `stopwaitsecs` when it started, in milliseconds: how long a monitor that stops it as a
    /// leftover waits before SIGKILL; `None` in files written before it was kept, or holding no count of
    /// milliseconds (read as none, as a signal's unknown name is, not as an unreadable file).
    #[serde(default, deserialize_with = "signal_name::any_count")]
    pub stopwait_ms: Option<u64>,
}

/// How a process is stopped: `signal` to its group, then SIGKILL once `wait` has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopBy {
    pub signal: Signal,
    pub wait: Duration,
}

/// The most `stopwaitsecs` allows: a state file is read from disk, and a larger value there would overflow
/// the deadline.
const MAX_STOPWAIT: Duration = Duration::from_secs(3600);

impl Entry {
    /// How it is stopped as a leftover: as it was started to be stopped, and for what the file does not say
    /// (written before it kept this), as `fallback`.
    pub fn stop_by(&self, fallback: StopBy) -> StopBy {
        StopBy {
            signal: self.stopsignal.unwrap_or(fallback.signal),
            wait: (self.stopwait_ms)
                .map_or(fallback.wait, Duration::from_millis)
                .min(MAX_STOPWAIT),
        }
    }
}

/// `Entry::stopsignal` as the signal's name, as the config names it and a reader of the file knows it. A
/// name this system does not know, or a value of another type, reads as none (the fallback), not as an
/// unreadable file, which would leave every leftover running beside its new copy.
mod signal_name {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(sig: &Option<Signal>, s: S) -> Result<S::Ok, S::Error> {
        sig.map(Signal::as_str).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Signal>, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Ok(value.as_str().and_then(|n| n.parse().ok()))
    }

    /// A count (`Entry::stopwait_ms`), none for any other value, as a signal's unknown name is.
    pub fn any_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(serde_json::Value::deserialize(d)?.as_u64())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    monitor_pid: u32,
    /// The kernel's boot id when written (empty in files written before it was kept): a pid and start time
    /// identify a process within one boot only, and a run directory on disk outlives a reboot, after which
    /// an unrelated process can have both (a boot that runs the same services in the same order).
    #[serde(default)]
    boot_id: String,
    processes: Vec<Entry>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty if unreadable; read once (it is saved with every
/// pid change).
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Why the run directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create run_dir {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("another monitor holds {path} (its lock is taken); stop it first or use another run_dir")]
    Locked { path: PathBuf },
    #[error(
        "run_dir {path} is {why}: another user could plant a state file naming processes for the monitor \
         to kill; give it a directory of its own (mode 700)"
    )]
    Unsafe { path: PathBuf, why: String },
}

/// The locked run directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl RunDir {
    pub fn acquire(path: &Path) -> Result<Self, RunDirError> {
        let create = |source| RunDirError::Create {
            path: path.into(),
            source,
        };
        // Made 700, and an existing one must be ours and writable by no one else: the state file names the
        // processes this monitor signals at start, and the default run_dir is under the shared $TMPDIR, where
        // another user could make the directory first and plant a state file (pids for us to kill) or a
        // symlink (`state.json.tmp`, a log) to a file for us to overwrite.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(create)?;
        let meta = std::fs::metadata(path).map_err(create)?;
        let why = if meta.uid() != nix::unistd::geteuid().as_raw() {
            Some(format!("owned by uid {}, not this user", meta.uid()))
        } else if meta.mode() & 0o022 != 0 {
            Some(format!(
                "writable by group or others (mode {:o})",
                meta.mode() & 0o777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(RunDirError::Unsafe {
                path: path.into(),
                why,
            });
        }
        let file = File::create(path.join("monitor.lock")).map_err(create)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| RunDirError::Locked { path: path.into() })?;
        Ok(Self {
            path: path.into(),
            _lock: lock,
        })
    }

    fn state_path(&self) -> PathBuf {
        self.path.join("state.json")
    }

    /// Records the running processes (atomically: write then rename).
    pub fn save(&self, processes: Vec<Entry>) {
        let state = StateFile {
            monitor_pid: std::process::id(),
            boot_id: boot_id().to_string(),
            processes,
        };
        let tmp = self.path.join("state.json.tmp");
        let res = serde_json::to_vec_pretty(&state)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, self.state_path()));
        if let Err(e) = res {
            warn!(path = %self.path.display(), error = %e, "cannot write the state file");
        }
    }

    /// The processes a previous monitor left behind that are still alive (same pid *and* start time).
    pub fn leftovers(&self) -> Vec<Entry> {
        let Ok(bytes) = std::fs::read(self.state_path()) else {
            return Vec::new();
        };
        let Ok(state) = serde_json::from_slice::<StateFile>(&bytes) else {
            warn!("unreadable state file; ignoring it");
            return Vec::new();
        };
        if !state.boot_id.is_empty() && state.boot_id != boot_id() {
            info!("the state file is from an earlier boot: none of its processes runs");
            return Vec::new();
        }
        let (alive, gone): (Vec<Entry>, Vec<Entry>) = (state.processes.into_iter())
            .take(MAX_ENTRIES)
            .partition(is_same_process);
        // A leader that died while no monitor watched (this one was killed) leaves the rest of its group
        // running unsupervised (an `sh -c` wrapper's server), holding its port: ended, as the monitor ends a
        // crashed program's group. Only processes the monitor that wrote the file started (by their mark).
        let prefix = format!("{}.", state.monitor_pid);
        for e in gone.iter().filter(|e| e.pid > 0) {
            let left = crate::strays::left_in_group(e.pid, &prefix);
            if !left.is_empty() {
                let pids: Vec<i32> = left.iter().map(|s| s.pid).collect();
                warn!(program = %e.name, ?pids, "ending what a program left in its group when its leader exited while no monitor ran");
                left.iter().for_each(|s| s.signal(Signal::SIGKILL));
            }
        }
        alive
    }

    /// Stops `alive` (leftovers that are not adopted), each as it was started to be stopped
    /// ([`Entry::stop_by`], with `fallback(name)` for what its entry does not say): its stop signal to its
    /// group and its strays, then SIGKILL once its own wait has passed. A Supervisord user configures how
    /// each program stops (nginx's graceful SIGQUIT, a long drain): one SIGTERM and the longest wait of all
    /// ended those by a signal they do not stop cleanly on, and held quick ones to the slowest's wait. They
    /// stop together, so the whole takes the longest wait at most. Returns their names.
    ///
    /// `hurried` says when the monitor's stop signal has come (a Ctrl-C as it starts): each wait then ends
    /// [`HURRIED_WAIT`] on at most, so the monitor's own end, forced 5 s after that signal, does not leave a
    /// leftover behind unkilled.
    pub fn stop_leftovers(
        &self,
        alive: Vec<Entry>,
        fallback: impl Fn(&str) -> StopBy,
        hurried: impl Fn() -> bool,
    ) -> Vec<String> {
        // What a leftover started outside its group (a `setsid` daemon, carrying its leader's mark) goes
        // with it, as a program's own stop takes its strays (`end_group`): signalled by group alone, it ran
        // on unsupervised beside the new copy, holding its port. Found before any signal, while the leader
        // that carries the mark lives.
        let mut stopping: Vec<Leftover> = (alive.into_iter())
            .map(|e| {
                let by = e.stop_by(fallback(&e.name));
                let strays = crate::strays::mark_of(e.pid as u32)
                    .map(|mark| crate::strays::find(&mark, e.pid))
                    .unwrap_or_default();
                Leftover {
                    entry: e,
                    by,
                    strays,
                    ended: false,
                    killed: false,
                }
            })
            .collect();
        let began = Instant::now();
        for l in &stopping {
            let (e, sig) = (&l.entry, l.by.signal);
            info!(
                program = %e.name,
                pid = e.pid,
                signal = sig.as_str(),
                wait = ?l.by.wait,
                "stopping a process left by the previous monitor"
            );
            let _ = kill(Pid::from_raw(-e.pid), sig);
            // As a program's own stop (`Action::SignalStop`, `end_group`): a stopped process acts on its
            // signal only once continued, and strays get SIGTERM where the signal would only pause them.
            let to_strays = if crate::child::stops_the_process(sig) {
                Signal::SIGTERM
            } else {
                let _ = kill(Pid::from_raw(-e.pid), Signal::SIGCONT);
                sig
            };
            l.strays.iter().for_each(|s| s.signal(to_strays));
        }
        // They are not our children, so there is nothing to wait on: poll /proc until each is gone or past
        // its own wait, which bounds the loop.
        let mut hurry: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if hurry.is_none() && hurried() {
                hurry = Some(now + HURRIED_WAIT);
            }
            let mut waiting = false;
            for l in stopping.iter_mut().filter(|l| !l.ended) {
                if !l.lives() {
                    l.ended = true;
                } else if now >= (began + l.by.wait).min(hurry.unwrap_or(far_future(now))) {
                    warn!(
                        program = %l.entry.name,
                        pid = l.entry.pid,
                        "a leftover did not stop within its stopwaitsecs; killing its group"
                    );
                    // The group, not just the leader: it reaches what is left of it once the leader exited.
                    let _ = kill(Pid::from_raw(-l.entry.pid), Signal::SIGKILL);
                    l.strays.iter().for_each(|s| s.signal(Signal::SIGKILL));
                    (l.ended, l.killed) = (true, true);
                } else {
                    waiting = true;
                }
            }
            if !waiting {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A SIGKILL takes effect at once, but a big address space takes time to free and a process in
        // uninterruptible sleep dies when its I/O ends: the new copy must not meet the old one on its port.
        let deadline = Instant::now() + Duration::from_secs(2);
        while stopping.iter().any(|l| l.killed && l.lives()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stopping.into_iter().map(|l| l.entry.name).collect()
    }
}

/// How long a leftover is waited for once the monitor's stop signal has come ([`RunDir::stop_leftovers`]):
/// with the 2 s its SIGKILL is given, within the 5 s after which the daemon forces the monitor's exit.
const HURRIED_WAIT: Duration = Duration::from_secs(2);

/// An instant no wait reaches: `now` plus a year.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(365 * 24 * 3600)
}

/// A leftover being stopped.
#[derive(Debug)]
struct Leftover {
    entry: Entry,
    by: StopBy,
    strays: Vec<crate::strays::Stray>,
    /// Gone, or SIGKILLed once past its wait.
    ended: bool,
    killed: bool,
}

impl Leftover {
    /// Whether any of it still runs: its leader, what is left of its group (a wrapper's server still
    /// shutting down once the wrapper exited), or its strays.
    fn lives(&self) -> bool {
        is_same_process(&self.entry)
            || crate::child::group_lives(self.entry.pid)
            || self.strays.iter().any(crate::strays::Stray::lives)
    }
}

/// At most this many entries are read from a state file (a monitor runs far fewer processes).
const MAX_ENTRIES: usize = 4096;

/// Opens a pidfd for `e` and checks, after opening, that the pid is still the same process (a pid reused
/// between the check and the open would otherwise be watched by mistake). Linux ≥ 5.3.
pub fn open_pidfd(e: &Entry) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, e.pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if !is_same_process(e) {
        return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
    }
    Ok(owned)
}

/// Whether the process at `e`'s pid is the one `e` recorded (its start time): not gone, its pid not reused.
pub fn is_same_process(e: &Entry) -> bool {
    e.pid > 0 && start_time(e.pid).is_some_and(|t| t == e.start_time)
}

/// When a process started, in Unix milliseconds: its `/proc` start time is in clock ticks since boot, and
/// `/proc/stat` has the boot time. Used for the uptime of an adopted process.
pub fn started_unix_ms(start_time: u64) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(btime.saturating_mul(1000) + start_time.saturating_mul(1000) / hz)
}

/// The kernel start time of a live (non-zombie) process, field 22 of `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = proc_stat(pid)?;
    let fields: Vec<&str> = stat.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The process group of `pid` while it lives (`None`: a zombie, gone, or unreadable).
pub fn live_group(pid: i32) -> Option<i32> {
    let stat = proc_stat(pid)?;
    // State, ppid, pgrp, ...
    let mut fields = stat.split_whitespace();
    let state = fields.next()?;
    (state != "Z").then(|| fields.nth(1)?.parse().ok()).flatten()
}

/// The pids in `/proc` now (none if it cannot be read).
pub fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// `/proc/<pid>/stat` from field 3 (the state) on: the command name before it may contain spaces and
/// parentheses, so the fields start after the last ')'.
pub fn proc_stat(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_own_start_time_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunDir::acquire(dir.path()).unwrap();
        assert!(matches!(
            RunDir::acquire(dir.path()),
            Err(RunDirError::Locked { .. })
        ));
        drop(a);
        assert!(RunDir::acquire(dir.path()).is_ok());
        let t = start_time(std::process::id() as i32).unwrap();
        // This test process started a moment ago (clock ticks are 10 ms; allow an hour for slow machines).
        let started = started_unix_ms(t).unwrap();
        let now = crate::supervisor::unix_ms();
        assert!(
            started <= now + 1000 && now - started < 3_600_000,
            "{started} vs {now}"
        );
    }

    /// A state file from another boot names no live process, whatever its pids and start times match now.
    #[test]
    fn a_state_file_of_an_earlier_boot_has_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::acquire(dir.path()).unwrap();
        let me = std::process::id() as i32;
        let entry = Entry {
            name: "me".into(),
            pid: me,
            start_time: start_time(me).unwrap(),
            launch: 0,
            pipes: Default::default(),
            restarts: 0,
            stopsignal: None,
            stopwait_ms: None,
        };
        run.save(vec![entry]);
        assert_eq!(
            run.leftovers().len(),
            1,
            "this boot's entry of a live process is a leftover"
        );
        let text = std::fs::read_to_string(run.state_path()).unwrap();
        let other = text.replace(boot_id(), "00000000-0000-0000-0000-000000000000");
        assert_ne!(text, other, "the file names this boot");
        std::fs::write(run.state_path(), other).unwrap();
        assert!(
            run.leftovers().is_empty(),
            "an earlier boot's entry matched a process of this one"
        );
    }

    /// The default run_dir is in the shared $TMPDIR: one another user made first (or opened to all) would let
    /// them plant the state file whose pids the monitor kills at start.
    #[test]
    fn run_dir_of_another_user_or_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("a/run");
        drop(RunDir::acquire(&made).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&made), 0o700, "a run_dir it makes is its own");
        assert_eq!(mode(&dir.path().join("a")), 0o700);

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = RunDir::acquire(&open).unwrap_err();
        assert!(matches!(err, RunDirError::Unsafe { .. }), "{err}");
        assert!(err.to_string().contains("mode 777"), "{err}");
        assert!(!open.join("monitor.lock").exists(), "nothing is written there");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(RunDir::acquire(&open).is_ok());

        // Root can give the directory away to test the owner check; another user cannot.
        if nix::unistd::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let err = RunDir::acquire(&theirs).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }

    /// A file written before entries kept their stop reads, and stops by the fallback; one that names a
    /// signal this system does not know still reads (its leftovers must still be stopped), and a wait no
    /// config allows is cut to what one does.
    #[test]
    fn an_entry_stops_as_it_says_and_by_the_fallback_where_it_does_not() {
        let fallback = StopBy {
            signal: Signal::SIGTERM,
            wait: Duration::from_secs(7),
        };
        let old = r#"{"name": "web", "pid": 12, "start_time": 34}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!((e.stopsignal, e.stopwait_ms), (None, None));
        assert_eq!(e.stop_by(fallback), fallback);

        let own = Entry {
            stopsignal: Some(Signal::SIGINT),
            stopwait_ms: Some(1500),
            ..e
        };
        let text = serde_json::to_string(&own).unwrap();
        assert!(text.contains(r#""stopsignal":"SIGINT""#), "{text}");
        let read: Entry = serde_json::from_str(&text).unwrap();
        assert_eq!(read, own);
        let by = StopBy {
            signal: Signal::SIGINT,
            wait: Duration::from_millis(1500),
        };
        assert_eq!(read.stop_by(fallback), by);

        let odd = text
            .replace("SIGINT", "SIGNOPE")
            .replace("1500", &u64::MAX.to_string());
        let read: Entry = serde_json::from_str(&odd).unwrap();
        assert_eq!(read.stopsignal, None);
        assert_eq!(
            read.stop_by(fallback),
            StopBy {
                signal: Signal::SIGTERM,
                wait: MAX_STOPWAIT
            }
        );
        // Values of another type (a hand edit, another build's) read as none too, not as an unreadable file.
        let typed = text.replace(r#""SIGINT""#, "15").replace("1500", "-1");
        let read: Entry = serde_json::from_str(&typed).unwrap();
        assert_eq!((read.stopsignal, read.stopwait_ms), (None, None));
    }

    /// Leftovers that stop together each get their own signal and their own wait: one that ignores its
    /// signal is SIGKILLed once its wait has passed, not the longest one's, and one that ends on its own
    /// signal is not held to its wait. They all got SIGTERM and the longest wait.
    #[test]
    fn each_leftover_gets_its_own_signal_and_wait() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::acquire(&dir.path().join("run")).unwrap();
        // (name, its stop signal, its wait): each ignores SIGTERM.
        let cases = [
            ("quick", Signal::SIGTERM, Duration::from_millis(200)),
            ("slow", Signal::SIGTERM, Duration::from_millis(2500)),
            ("on-int", Signal::SIGINT, Duration::from_secs(30)),
        ];
        let mut groups = Groups(Vec::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut entries = Vec::new();
        for (name, signal, wait) in cases {
            let (entry, mut child) = deaf_to_term(dir.path(), name, signal, wait, &mut groups);
            entries.push(entry);
            let tx = tx.clone();
            // Reaped here (it is this test's child), timed as it ends.
            std::thread::spawn(move || {
                let _ = child.wait();
                let _ = tx.send((name, Instant::now()));
            });
        }
        let began = Instant::now();
        // What they all got before: SIGTERM and the longest wait.
        let fallback = |_: &str| StopBy {
            signal: Signal::SIGTERM,
            wait: Duration::from_secs(30),
        };
        let stopped = run.stop_leftovers(entries, fallback, || false);
        let took = began.elapsed();
        assert_eq!(stopped, ["quick", "slow", "on-int"]);
        let mut ended = std::collections::BTreeMap::new();
        while ended.len() < cases.len() {
            let (name, at) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a leftover left running");
            ended.insert(name, at.duration_since(began));
        }
        assert!(
            ended["quick"] >= Duration::from_millis(200) && ended["quick"] < Duration::from_millis(2000),
            "{ended:?}"
        );
        assert!(ended["slow"] >= Duration::from_millis(2500), "{ended:?}");
        assert!(ended["on-int"] < Duration::from_millis(2000), "{ended:?}");
        assert!(took < Duration::from_secs(10), "held to the 30 s wait: {took:?}");
    }

    /// Once the monitor's stop signal has come, a leftover's long wait is cut short: waited out, the daemon
    /// forced the monitor's end 5 s on and left the leftover running, never SIGKILLed.
    #[test]
    fn a_hurried_stop_cuts_every_wait_short() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::acquire(&dir.path().join("run")).unwrap();
        let mut groups = Groups(Vec::new());
        let long = Duration::from_secs(30);
        let (entry, mut child) = deaf_to_term(dir.path(), "deaf", Signal::SIGTERM, long, &mut groups);
        let fallback = |_: &str| StopBy {
            signal: Signal::SIGTERM,
            wait: long,
        };
        let began = Instant::now();
        assert_eq!(run.stop_leftovers(vec![entry], fallback, || true), ["deaf"]);
        let took = began.elapsed();
        let status = std::os::unix::process::ExitStatusExt::signal(&child.wait().unwrap());
        assert_eq!(status, Some(Signal::SIGKILL as i32), "ended otherwise");
        assert!(took < Duration::from_secs(10), "held to its 30 s wait: {took:?}");
    }

    /// A process in a group of its own that ignores SIGTERM, running once this returns, as a leftover
    /// `name` whose entry stops it with `signal` and `wait`.
    fn deaf_to_term(
        dir: &Path,
        name: &str,
        signal: Signal,
        wait: Duration,
        groups: &mut Groups,
    ) -> (Entry, std::process::Child) {
        use std::os::unix::process::CommandExt;
        let ready = dir.join(name);
        let script = format!(
            "trap '' TERM; touch {}; while :; do sleep 0.05; done",
            ready.display()
        );
        let child = std::process::Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        groups.0.push(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let entry = Entry {
            name: name.into(),
            pid,
            start_time: start_time(pid).unwrap(),
            launch: 0,
            pipes: Default::default(),
            restarts: 0,
            stopsignal: Some(signal),
            stopwait_ms: Some(wait.as_millis() as u64),
        };
        (entry, child)
    }

    /// SIGKILLs the process groups a test started, should it fail (once it passed they are gone, and their
    /// ids may be another's).
    struct Groups(Vec<i32>);

    impl Drop for Groups {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                return;
            }
            for pid in &self.0 {
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            }
        }
    }
}
