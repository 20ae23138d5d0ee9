//! The monitor's run directory: an exclusive lock (two monitors never share one) and a state file listing the
//! processes it runs (name, pid, kernel start time). A monitor started after a `kill -9` of the previous one
//! reads the file, checks each pid still is the same process (by `/proc/<pid>/stat` start time, so a reused
//! pid is never signalled), and stops those process groups cleanly before it starts anything — so no two
//! copies of a program ever fight for a port.

use std::fs::File;
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
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    monitor_pid: u32,
    processes: Vec<Entry>,
}

/// Why the run directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create run_dir {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("another monitor holds {path} (its lock is taken); stop it first or use another run_dir")]
    Locked { path: PathBuf },
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
        std::fs::create_dir_all(path).map_err(create)?;
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

    /// Stops every process a previous monitor left behind: the stop signal to each group, SIGKILL after
    /// `wait`. Returns the names of the processes it stopped.
    pub fn stop_leftovers(&self, wait: Duration) -> Vec<String> {
        let Ok(bytes) = std::fs::read(self.state_path()) else {
            return Vec::new();
        };
        let Ok(state) = serde_json::from_slice::<StateFile>(&bytes) else {
            warn!("unreadable state file; ignoring it");
            return Vec::new();
        };
        let alive: Vec<Entry> = state.processes.into_iter().filter(is_same_process).collect();
        for e in &alive {
            info!(program = %e.name, pid = e.pid, "stopping a process left by the previous monitor");
            let _ = kill(Pid::from_raw(-e.pid), Signal::SIGTERM);
        }
        // They are not our children, so there is nothing to wait on: poll /proc, bounded by `wait`.
        let deadline = Instant::now() + wait;
        while alive.iter().any(is_same_process) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for e in &alive {
            // Also reaches grandchildren left in the group after the leader exited.
            let _ = kill(Pid::from_raw(-e.pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive.iter().any(is_same_process) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.save(Vec::new());
        alive.into_iter().map(|e| e.name).collect()
    }
}

fn is_same_process(e: &Entry) -> bool {
    e.pid > 0 && start_time(e.pid).is_some_and(|t| t == e.start_time)
}

/// The kernel start time of a live (non-zombie) process, field 22 of `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
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
        assert!(start_time(std::process::id() as i32).is_some());
    }
}
