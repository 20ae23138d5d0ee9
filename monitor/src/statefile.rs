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

    /// Stops `alive` (leftovers that are not adopted): the stop signal to each group, SIGKILL after `wait`.
    /// Returns their names.
    pub fn stop_leftovers(&self, alive: Vec<Entry>, wait: Duration) -> Vec<String> {
        // What a leftover started outside its group (a `setsid` daemon, carrying its leader's mark) goes
        // with it, as a program's own stop takes its strays (`end_group`): signalled by group alone, it ran
        // on unsupervised beside the new copy, holding its port.
        let strays: Vec<crate::strays::Stray> = (alive.iter())
            .filter_map(|e| Some(crate::strays::find(&crate::strays::mark_of(e.pid as u32)?, e.pid)))
            .flatten()
            .collect();
        for e in &alive {
            info!(program = %e.name, pid = e.pid, "stopping a process left by the previous monitor");
            let _ = kill(Pid::from_raw(-e.pid), Signal::SIGTERM);
        }
        strays.iter().for_each(|s| s.signal(Signal::SIGTERM));
        let lives = || alive.iter().any(is_same_process) || strays.iter().any(crate::strays::Stray::lives);
        // They are not our children, so there is nothing to wait on: poll /proc, bounded by `wait`.
        let deadline = Instant::now() + wait;
        while lives() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for e in &alive {
            // Also reaches grandchildren left in the group after the leader exited.
            let _ = kill(Pid::from_raw(-e.pid), Signal::SIGKILL);
        }
        strays.iter().for_each(|s| s.signal(Signal::SIGKILL));
        let deadline = Instant::now() + Duration::from_secs(2);
        while lives() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        alive.into_iter().map(|e| e.name).collect()
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

    /// The default run_dir is in the shared $TMPDIR: one another user made first (or opened to all) would let
    /// them plant the state file whose pids the monitor kills at start.
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
}
