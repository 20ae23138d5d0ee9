//! Spawning and signalling one process. Each program runs as the leader of its own process group, so a stop or
//! kill reaches every descendant; when the leader exits, the rest of its group is killed too, so no grandchild
//! outlives its program, nor one that left the group ([`crate::strays`]). A task per child waits on it (tokio reaps on SIGCHLD, so the exit is seen at once and
//! no zombie is left) and reports the exit to the supervisor.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid};
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

use crate::logs::{RotatingLog, copy_pipe};
use crate::policy::ExitInfo;
use crate::program::ProcessSpec;
use crate::strays::{self, Stray};

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
#[derive(Debug, Clone)]
pub struct Spawned {
    pub pid: u32,
    pub start_time: u64,
    /// The inodes of its output pipes (stderr's 0 with `redirect_stderr`), which it holds the read ends
    /// of at [`HELD_STDOUT_FD`] and [`HELD_STDERR_FD`].
    pub pipes: Pipes,
    /// Set when the supervisor sends the stop signal: the leader's exit then leaves the rest of the group
    /// time to end ([`spawn`]).
    pub stopping: Arc<StopClock>,
}

/// When a process's stop began (the supervisor sent its stop signal), for the task that sees its leader
/// exit: what is left of its group gets the rest of `stopwaitsecs` from then, not a whole `stopwaitsecs`
/// more from the leader's exit (a leader that exited just before it, beside a stray that ignored the
/// signal, kept the program STOPPING about twice as long as it says).
#[derive(Debug, Default)]
pub struct StopClock {
    /// When the stop began: milliseconds since [`clock_epoch`], plus one (0: not begun).
    began_ms: AtomicU64,
    hurried: std::sync::atomic::AtomicBool,
}

fn clock_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl StopClock {
    /// Marks the stop begun now, unless it began already (a second stop does not move its deadline).
    pub fn begin(&self) {
        let ms = clock_epoch().elapsed().as_millis() as u64 + 1;
        let _ = self
            .began_ms
            .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// When the stop began, if it has.
    pub fn began(&self) -> Option<std::time::Instant> {
        match self.began_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(clock_epoch() + Duration::from_millis(ms - 1)),
        }
    }

    /// Ends the wait for what is left of the group now (the monitor's forced shutdown): a stray that ignored
    /// the stop signal held a second Ctrl-C's 3 s kill for its program's whole `stopwaitsecs`.
    pub fn hurry(&self) {
        self.hurried.store(true, Ordering::Relaxed);
    }

    fn hurried(&self) -> bool {
        self.hurried.load(Ordering::Relaxed)
    }
}

/// How often a stopped program's group is looked at, once its leader has exited, until the rest is gone.
const GROUP_POLL: Duration = Duration::from_millis(50);

/// Identifies a child's output pipes (by inode, 0 for none), for the monitor that adopts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pipes {
    pub stdout: u64,
    pub stderr: u64,
}

/// Where a child keeps a copy of the read end of its stdout pipe (and of its stderr pipe). The monitor reads
/// the pipes; should it die (`kill -9`), the child's own copy keeps each pipe open, so the child's writes do
/// not end it by SIGPIPE: they wait in the pipe (up to [`PIPE_BYTES`], then they block) until the next
/// monitor adopts the child and takes a copy of that read end (`pidfd_getfd`) to read the rest. High
/// numbers, out of the way of a program's own descriptors; never read by the child.
pub const HELD_STDOUT_FD: i32 = 1010;
pub const HELD_STDERR_FD: i32 = 1011;
/// The size asked for each output pipe (the kernel's default is 64 KiB): what a program may write while no
/// monitor reads, before its writes block. Best effort: a user over its pipe-pages limit keeps the default.
const PIPE_BYTES: i32 = 256 * 1024;

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
    as_program(&mut cmd, &spec.run_as())?;
    cmd.args(args)
        .env(strays::MARK_VAR, strays::mark(spawn_id))
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(false);
    // With redirect_stderr, fd 2 is the same pipe as fd 1, as `2>&1` makes it, so lines keep their order.
    let (out_read, out_write) = std::io::pipe()?;
    let err_pipe = if spec.redirect_stderr {
        cmd.stderr(out_write.try_clone()?);
        None
    } else {
        let (read, write) = std::io::pipe()?;
        cmd.stderr(write);
        Some(read)
    };
    cmd.stdout(out_write);
    let held = (out_read.as_raw_fd(), err_pipe.as_ref().map(AsRawFd::as_raw_fd));
    let pipes = Pipes {
        stdout: grow_and_identify(&out_read),
        stderr: err_pipe.as_ref().map_or(0, grow_and_identify),
    };
    // SAFETY: the closure makes only async-signal-safe system calls (close_range, dup2, getrlimit,
    // setrlimit) on values prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Descriptors the monitor inherited from whatever started it (a terminal's, an ssh session's pipe)
            // are not the program's: closed at exec, so a child cannot keep its parent's session open.
            nix::libc::syscall(
                nix::libc::SYS_close_range,
                3u32,
                u32::MAX,
                nix::libc::CLOSE_RANGE_CLOEXEC,
            );
            // The read ends the child holds for a monitor that adopts it (a copy made by dup2 is kept across
            // exec). A limit too low for these numbers only loses that.
            nix::libc::dup2(held.0, HELD_STDOUT_FD);
            if let Some(err) = held.1 {
                nix::libc::dup2(err, HELD_STDERR_FD);
            }
            // The descriptor limit the monitor was started with, not the one it raised for itself. After the
            // dup2s: a descriptor above the limit stays open, only new ones must fit under it.
            xcluster_runtime::limits::restore_inherited();
            Ok(())
        });
    }
    let out_log = RotatingLog::open(&spec.stdout)?.map(|l| Arc::new(Mutex::new(l)));
    let err_log = if spec.redirect_stderr {
        None
    } else {
        RotatingLog::open(&spec.stderr)?.map(|l| Arc::new(Mutex::new(l)))
    };
    // Made before the spawn: failing after it, they left the child running with no one waiting for it.
    let out_read = receiver(out_read.into())?;
    let err_read = err_pipe.map(|err| receiver(err.into())).transpose()?;
    let (mut child, own) = crate::reaper::spawn(&mut cmd).map_err(|e| explain(e, prog, &spec.run_as()))?;
    // The write ends held for the child go with the command, so the readers see end of file once the
    // process (and whatever inherited its output) is gone.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let start_time = crate::statefile::start_time(pid as i32).unwrap_or(0);
    tokio::spawn(copy_pipe(out_read, out_log, outputs.stdout.clone()));
    if let Some(err) = err_read {
        tokio::spawn(copy_pipe(err, err_log, outputs.stderr.clone()));
    }
    let name = spec.name.clone();
    let stopping = Arc::new(StopClock::default());
    let ending = Ending {
        stopping: stopping.clone(),
        stopwait: spec.policy.stopwait,
        stopsignal: spec.stopsignal,
        mark: Some(strays::mark(spawn_id)),
    };
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
        drop(own);
        end_group(&name, pid, &ending).await;
        let _ = exits.send(Exit { name, spawn_id, info });
    });
    Ok(Spawned {
        pid,
        start_time,
        pipes,
        stopping,
    })
}

/// How the rest of a program's processes end once its leader has exited.
#[derive(Debug, Clone)]
pub struct Ending {
    /// Set when the supervisor sends the stop signal ([`Spawned::stopping`]).
    pub stopping: Arc<StopClock>,
    pub stopwait: Duration,
    /// Sent to its strays at a stop (SIGTERM where it would only pause them).
    pub stopsignal: Signal,
    /// The mark its processes carry ([`strays::mark`]); `None`: an adopted process without one.
    pub mark: Option<String>,
}

/// The leader `pid` is gone; whatever is left of its group goes with it, and so do its strays (processes
/// that left the group, [`crate::strays`]). During a stop (`stopping`), not at once: a wrapper (`sh -c 'cd
/// dir && server'`, no exec) dies of the stop signal at once while the server it runs, signalled too, is
/// still shutting down cleanly, and a SIGKILL then cut that short. The rest of the group and the strays
/// (sent the stop signal now) get what is left of `stopwait` from the stop signal (when the supervisor's own
/// SIGKILL comes), and the caller
/// reports the exit once they are gone, so the program is STOPPING until then and a restart's new process
/// does not meet the old one's server on its port.
async fn end_group(name: &str, pid: u32, ending: &Ending) {
    let pgid = pid as i32;
    let began = ending.stopping.began();
    let stopping = began.is_some();
    let mut found = find_strays(ending.mark.clone(), pgid).await;
    if !found.is_empty() {
        let pids: Vec<String> = found.iter().map(|s| format!("{} ({})", s.pid, s.comm)).collect();
        warn!(
            program = %name,
            strays = %pids.join(", "),
            "the program left processes outside its process group (setsid, or a daemon's fork): they end with it; \
             a supervised program should run in the foreground"
        );
        let sig = if !stopping {
            Signal::SIGKILL
        } else if stops_the_process(ending.stopsignal) {
            Signal::SIGTERM
        } else {
            ending.stopsignal
        };
        found.iter().for_each(|s| s.signal(sig));
    }
    if let Some(began) = began {
        let deadline = tokio::time::Instant::from_std(began + ending.stopwait);
        wait_gone(&found, pgid, deadline, Some(&ending.stopping)).await;
    }
    let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
    found.iter().for_each(|s| s.signal(Signal::SIGKILL));
    // Those a stray started while it was being ended.
    if !found.is_empty() {
        let late = find_strays(ending.mark.clone(), pgid).await;
        late.iter().for_each(|s| s.signal(Signal::SIGKILL));
        found.extend(late);
    }
    // Reported once they are gone, for a while: a SIGKILL takes effect at once, but freeing a big address
    // space takes time, and a process in uninterruptible sleep dies only when its I/O ends. Reported at
    // once, a crash's restart could meet the dying server on its port and count its failure to bind.
    wait_gone(&found, pgid, tokio::time::Instant::now() + KILL_WAIT, None).await;
}

/// Waits until the strays `found` and group `pgid` are gone, or `deadline`, or `clock` is hurried.
async fn wait_gone(found: &[Stray], pgid: i32, deadline: tokio::time::Instant, clock: Option<&StopClock>) {
    while tokio::time::Instant::now() < deadline
        && !clock.is_some_and(StopClock::hurried)
        && (found.iter().any(Stray::lives)
            || tokio::task::spawn_blocking(move || group_lives(pgid))
                .await
                .unwrap_or(false))
    {
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// How long an ended program's exit waits for the processes it SIGKILLed to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The strays of a program marked `mark` outside group `pgid`, looked for on a blocking thread (it reads
/// every process's environment).
async fn find_strays(mark: Option<String>, pgid: i32) -> Vec<Stray> {
    let Some(mark) = mark else {
        return Vec::new();
    };
    let scan = tokio::task::spawn_blocking(move || strays::find(&mark, pgid));
    match tokio::time::timeout(STRAY_SCAN_LIMIT, scan).await {
        Ok(found) => found.unwrap_or_default(),
        Err(_) => {
            // It reads every process's environment, and a process stuck in the kernel holding its memory's
            // lock (a hung NFS or FUSE mount) blocks that read: waited for, the exit was never reported.
            warn!(
                limit_secs = STRAY_SCAN_LIMIT.as_secs(),
                "the search for a program's strays did not finish; ending its group without them"
            );
            Vec::new()
        }
    }
}

/// How long an ended program's exit waits for the search for its strays.
const STRAY_SCAN_LIMIT: Duration = Duration::from_secs(5);

/// Whether a process of group `pgid` still runs. A zombie does not count: the group's orphans are reaped
/// by init, not by us, and an init that reaps them late (a container's) would hold a stop for nothing.
pub(crate) fn group_lives(pgid: i32) -> bool {
    kill(Pid::from_raw(-pgid), None).is_ok()
        && crate::statefile::pids().any(|pid| crate::statefile::live_group(pid) == Some(pgid))
}

/// Asks for a [`PIPE_BYTES`] buffer (best effort) and returns the pipe's inode.
fn grow_and_identify(read: &std::io::PipeReader) -> u64 {
    let _ = nix::fcntl::fcntl(read, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
    nix::sys::stat::fstat(read).map_or(0, |st| st.st_ino)
}

/// Takes the output of an adopted process: a copy of each read end it holds ([`HELD_STDOUT_FD`]), checked
/// to be the pipe the state file names (by inode), read on into its log and followers from where the old
/// monitor stopped. A process that holds no such pipe (started before monitors did this, or under a
/// descriptor limit below those numbers) is adopted as it is: its output is lost until its next start.
/// `Err` if a pipe it holds cannot be taken (no permission to look into it): it would block once the pipe
/// filled, so it must not be adopted.
pub fn take_output(
    pidfd: &OwnedFd,
    spec: &ProcessSpec,
    pipes: Pipes,
    outputs: &Outputs,
) -> std::io::Result<()> {
    let streams = [
        (HELD_STDOUT_FD, pipes.stdout, &spec.stdout, &outputs.stdout),
        (HELD_STDERR_FD, pipes.stderr, &spec.stderr, &outputs.stderr),
    ];
    let mut taken = Vec::new();
    for (fd, inode, log, followers) in streams.into_iter().filter(|s| s.1 != 0) {
        if let Some(read) = held_pipe(pidfd, fd, inode)? {
            taken.push((read, log, followers));
        }
    }
    for (read, log, followers) in taken {
        let log = RotatingLog::open(log)?.map(|l| Arc::new(Mutex::new(l)));
        tokio::spawn(copy_pipe(receiver(read)?, log, followers.clone()));
    }
    Ok(())
}

/// A copy of descriptor `fd` of the process behind `pidfd` (Linux ≥ 5.6), if it is the pipe `inode`:
/// `None` if it has no such descriptor, or another one at that number (never read another's descriptor).
fn held_pipe(pidfd: &OwnedFd, fd: i32, inode: u64) -> std::io::Result<Option<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd takes two descriptors and flags and returns a new descriptor or -1.
    let got = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(nix::libc::EBADF) => Ok(None),
            _ => Err(e),
        };
    }
    let got = i32::try_from(got).map_err(std::io::Error::other)?;
    // SAFETY: the syscall just returned this descriptor (close-on-exec) and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(got) };
    let st = nix::sys::stat::fstat(&owned).map_err(std::io::Error::from)?;
    let is_fifo =
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode).contains(nix::sys::stat::SFlag::S_IFIFO);
    Ok((is_fifo && st.st_ino == inode).then_some(owned))
}

/// The uid, gid and supplementary groups of `user`, looked up before the fork (the lookups read files and
/// allocate, which the forked child must not). `None` when the monitor already runs as that user.
/// Has `cmd` run as a program with the settings `ctx` runs: with its `environment` and names, in its
/// `directory`, as its `user` (with the user's supplementary groups) and with its `umask`. The program's own
/// process, and its probes' commands.
pub(crate) fn as_program(
    cmd: &mut tokio::process::Command,
    ctx: &crate::probe::RunAs,
) -> std::io::Result<()> {
    // The service manager's notify socket and watchdog are the monitor's: a program that inherited them
    // would tell systemd the monitor is ready or stopping. A program's own `environment` may still set them.
    xcluster_runtime::sdnotify::keep_from(cmd);
    cmd.envs(ctx.environment.iter().map(|(k, v)| (k, v)))
        .env("XCLUSTER_PROCESS_NAME", &ctx.name)
        .env("XCLUSTER_GROUP_NAME", &ctx.group);
    let ids = match &ctx.user {
        Some(user) => switch_to(user)?,
        None => None,
    };
    // With a user to switch to, the directory is entered as that user, after the switch (as Supervisord
    // does): std's `current_dir` enters it before `pre_exec`, as root, so a program could start in a
    // directory its user may not enter, and on a root-squashed NFS share could not start in one it may.
    let enter = match (&ctx.directory, &ids) {
        (Some(dir), Some(_)) => {
            Some(std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?)
        }
        (Some(dir), None) => {
            cmd.current_dir(dir);
            None
        }
        (None, _) => None,
    };
    let umask = (ctx.umask).map(|m| nix::sys::stat::Mode::from_bits_truncate(m as nix::libc::mode_t));
    if ids.is_none() && umask.is_none() {
        return Ok(());
    }
    // SAFETY: the closure makes only async-signal-safe system calls (setgroups, setgid, setuid, chdir, umask)
    // on values prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &ids {
                // The user's supplementary groups too (`initgroups`, as Supervisord does), then the group, then
                // the user: after setuid there is no privilege left to change the others.
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            if let Some(dir) = &enter {
                nix::unistd::chdir(dir.as_c_str())?;
            }
            if let Some(mode) = umask {
                nix::sys::stat::umask(mode);
            }
            Ok(())
        });
    }
    Ok(())
}

fn switch_to(user: &str) -> std::io::Result<Option<(Uid, Gid, Vec<Gid>)>> {
    let u = nix::unistd::User::from_name(user)
        .map_err(std::io::Error::other)?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no such user {user:?}")))?;
    if !nix::unistd::geteuid().is_root() {
        if u.uid == nix::unistd::geteuid() {
            return Ok(None);
        }
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("cannot run as {user:?}: the monitor is not root"),
        ));
    }
    let name = std::ffi::CString::new(user.as_bytes()).map_err(std::io::Error::other)?;
    let groups = nix::unistd::getgrouplist(&name, u.gid).map_err(std::io::Error::other)?;
    Ok(Some((u.uid, u.gid, groups)))
}

/// The read end of a child's output pipe, for the runtime.
fn receiver(read: OwnedFd) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(read)
}

/// A spawn error that says what could not be done: the OS says only "No such file or directory" for a
/// missing command and a missing directory alike, and "Permission denied" for a directory the user may not
/// enter and a command it may not execute alike.
fn explain(e: std::io::Error, prog: &str, ctx: &crate::probe::RunAs) -> std::io::Error {
    let what = match ctx.directory.as_deref() {
        Some(d) if !d.is_dir() => format!("cannot change to directory {}", d.display()),
        Some(d)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && ctx.user.as_deref().is_some_and(|u| !may_enter(u, d)) =>
        {
            format!(
                "cannot change to directory {} as user {:?}",
                d.display(),
                ctx.user.as_deref().unwrap_or_default()
            )
        }
        _ => match e.kind() {
            std::io::ErrorKind::NotFound => format!("cannot find command {prog:?}"),
            std::io::ErrorKind::PermissionDenied => format!("cannot execute {prog:?}"),
            _ => return e,
        },
    };
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Whether `user` may enter `dir` by its permission bits (ACLs aside): only to word a failed spawn.
fn may_enter(user: &str, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(Some(u)), Ok(meta)) = (nix::unistd::User::from_name(user), std::fs::metadata(dir)) else {
        return true;
    };
    let groups = std::ffi::CString::new(user.as_bytes())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, u.gid).ok())
        .unwrap_or_default();
    let bit = if meta.uid() == u.uid.as_raw() {
        0o100
    } else if meta.gid() == u.gid.as_raw() || groups.iter().any(|g| g.as_raw() == meta.gid()) {
        0o010
    } else {
        0o001
    };
    meta.mode() & bit != 0
}

/// Whether `sig` stops a process rather than asking it to end (a `stopsignal` of these is followed by no
/// SIGCONT, which would undo it).
pub fn stops_the_process(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
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
/// `ending` is as for a spawned process, but for its mark, read here from the process's environment.
pub fn watch_adopted(
    name: String,
    pid: u32,
    pidfd: OwnedFd,
    spawn_id: u64,
    mut ending: Ending,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<()> {
    ending.mark = strays::mark_of(pid);
    // SAFETY: `pidfd` is an `OwnedFd` moved into the `AsyncFd`: it stays open and is the same fd for the
    // `AsyncFd`'s whole life.
    let fd =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        // An error here means the fd is unusable; treating it as an exit restarts the program rather than
        // leaving it unwatched.
        let _ = fd.readable().await;
        end_group(&name, pid, &ending).await;
        let info = ExitInfo {
            code: None,
            signal: None,
        };
        let _ = exits.send(Exit { name, spawn_id, info });
    });
    Ok(())
}
