//! What a monitor owes the processes it did not start when it runs as PID 1 (a container's entrypoint, as
//! Supervisord often is): a process whose parent exits is handed to PID 1, and when it exits it stays a
//! zombie until PID 1 waits for it. A program that forks helpers and leaves them (a shell's `cmd &`, a
//! daemon's double fork) filled the process table with zombies, one per orphan, for good.
//!
//! The monitor's own children are waited for by tokio (`Child::wait`), which needs their exit status; reaping
//! one of those here would lose it (the program's exit seen as unknown). So every child the monitor spawns
//! is registered ([`spawn`]) for as long as its waiter may need it, and the reaper peeks at each zombie
//! (`waitid(WNOWAIT)`) before it reaps: only one that is not registered is taken. Spawning and reaping hold
//! one lock, so a child that exits before its spawn has returned is registered before it can be looked at.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::wait::{Id, WaitPidFlag, waitid, waitpid};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Pids of the children the monitor spawned whose waiters may still need them.
static OWN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// How often the reaper looks even without a SIGCHLD (one that came while it was reaping is merged).
const SWEEP: Duration = Duration::from_secs(1);

/// A registered child: its pid is the reaper's to leave alone until this is dropped (after its wait).
#[derive(Debug)]
pub struct Own(u32);

impl Drop for Own {
    fn drop(&mut self) {
        own().remove(&self.0);
    }
}

fn own() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    OWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Spawns `cmd`, registered until the returned [`Own`] is dropped: drop it once the child has been waited
/// for (or handed to tokio's own reaping, as a `kill_on_drop` child's drop does).
pub fn spawn(cmd: &mut tokio::process::Command) -> std::io::Result<(tokio::process::Child, Own)> {
    let mut own = own();
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    own.insert(pid);
    Ok((child, Own(pid)))
}

/// Reaps orphans while the monitor is PID 1, on each SIGCHLD and every [`SWEEP`], until `cancel`.
pub async fn run(cancel: CancellationToken) {
    if std::process::id() != 1 {
        return;
    }
    info!("running as PID 1: orphaned processes handed to the monitor are reaped");
    let mut children = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot watch SIGCHLD; reaping orphans every second");
            None
        }
    };
    let mut sweep = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sweep.tick() => {}
            Some(()) = async { children.as_mut()?.recv().await } => {}
        }
        let n = reap_orphans();
        if n > 0 {
            metrics::counter!(crate::metrics::ORPHANS_REAPED_TOTAL).increment(n);
        }
    }
}

/// Reaps every exited child that is not registered, up to the first that is (its waiter will reap it, and
/// the next round goes on past it). Returns how many.
pub fn reap_orphans() -> u64 {
    let own = own();
    let mut reaped = 0;
    loop {
        let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let Some(pid) = waitid(Id::All, peek).ok().and_then(|s| s.pid()) else {
            return reaped;
        };
        if own.contains(&(pid.as_raw() as u32)) {
            return reaped;
        }
        if waitpid(pid, Some(WaitPidFlag::WNOHANG)).is_err() {
            return reaped;
        }
        reaped += 1;
    }
}
