//! Spawning and signalling one process. Each program runs as the leader of its own process group, so a stop or
//! kill reaches every descendant; when the leader exits, the rest of its group is killed too, so no grandchild
//! outlives its program. A task per child waits on it (tokio reaps on SIGCHLD, so the exit is seen at once and
//! no zombie is left) and reports the exit to the supervisor.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{broadcast, mpsc};

use crate::logs::{RotatingLog, copy_pipe};
use crate::policy::ExitInfo;
use crate::program::ProcessSpec;

/// Followers of a process's output, kept across restarts so `tail -f` survives them.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub stdout: broadcast::Sender<Bytes>,
    pub stderr: broadcast::Sender<Bytes>,
}

impl Default for Outputs {
    fn default() -> Self {
        Self {
            stdout: broadcast::channel(256).0,
            stderr: broadcast::channel(256).0,
        }
    }
}

/// A child's exit, as reported to the supervisor.
#[derive(Debug)]
pub struct Exit {
    pub name: String,
    /// The spawn this exit belongs to (so a late report about an older process is recognised).
    pub spawn_id: u64,
    pub info: ExitInfo,
}

/// What a successful spawn gives back.
#[derive(Debug, Clone, Copy)]
pub struct Spawned {
    pub pid: u32,
    pub start_time: u64,
}

/// Starts the process described by `spec`; its exit is sent on `exits`.
pub fn spawn(
    spec: &ProcessSpec,
    outputs: &Outputs,
    spawn_id: u64,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<Spawned> {
    let (prog, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(spec.environment.iter().map(|(k, v)| (k, v)))
        .env("XCLUSTER_PROCESS_NAME", &spec.name)
        .env("XCLUSTER_GROUP_NAME", &spec.group)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = &spec.directory {
        cmd.current_dir(dir);
    }
    if let Some(user) = &spec.user {
        let u = nix::unistd::User::from_name(user)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("no such user {user:?}"))
            })?;
        if nix::unistd::geteuid().is_root() {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        } else if u.uid != nix::unistd::geteuid() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("cannot run as {user:?}: the monitor is not root"),
            ));
        }
    }
    if let Some(mask) = spec.umask {
        let mode = nix::sys::stat::Mode::from_bits_truncate(mask as nix::libc::mode_t);
        // SAFETY: umask(2) is async-signal-safe and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(mode);
                Ok(())
            });
        }
    }
    let out_log = RotatingLog::open(&spec.stdout)?.map(|l| Arc::new(Mutex::new(l)));
    let err_log = if spec.redirect_stderr {
        out_log.clone()
    } else {
        RotatingLog::open(&spec.stderr)?.map(|l| Arc::new(Mutex::new(l)))
    };
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let start_time = crate::statefile::start_time(pid as i32).unwrap_or(0);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_pipe(out, out_log, outputs.stdout.clone()));
    }
    if let Some(err) = child.stderr.take() {
        let followers = if spec.redirect_stderr {
            outputs.stdout.clone()
        } else {
            outputs.stderr.clone()
        };
        tokio::spawn(copy_pipe(err, err_log, followers));
    }
    let name = spec.name.clone();
    tokio::spawn(async move {
        use std::os::unix::process::ExitStatusExt;
        let info = match child.wait().await {
            Ok(st) => ExitInfo {
                code: st.code(),
                signal: st.signal(),
            },
            Err(_) => ExitInfo {
                code: None,
                signal: None,
            },
        };
        // The leader is gone; whatever is left of its group goes with it.
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
        let _ = exits.send(Exit { name, spawn_id, info });
    });
    Ok(Spawned { pid, start_time })
}

/// Sends `sig` to the whole process group led by `pid`.
pub fn signal_group(pid: u32, sig: Signal) -> nix::Result<()> {
    if pid == 0 {
        return Err(nix::errno::Errno::ESRCH);
    }
    kill(Pid::from_raw(-(pid as i32)), sig)
}

/// Watches a process this monitor did not spawn (adopted from a previous monitor after its `kill -9`): the
/// pidfd turns readable when the process exits. It is not our child, so its exit status cannot be read; the
/// exit is reported as unknown (no code, no signal), which counts as unexpected.
pub fn watch_adopted(
    name: String,
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
    spawn_id: u64,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<()> {
    // SAFETY: `pidfd` is an `OwnedFd` moved into the `AsyncFd`: it stays open and is the same fd for the
    // `AsyncFd`'s whole life.
    let fd =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        // An error here means the fd is unusable; treating it as an exit restarts the program rather than
        // leaving it unwatched.
        let _ = fd.readable().await;
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
        let info = ExitInfo {
            code: None,
            signal: None,
        };
        let _ = exits.send(Exit { name, spawn_id, info });
    });
    Ok(())
}
