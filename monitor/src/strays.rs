//! The processes a program started that left its process group: a `setsid` child, a daemon's double fork,
//! a server that daemonizes. The group signals never reach them, so they outlived their program's stop and
//! held its port when it started again, unsupervised, as under Supervisord. Now they end with the program,
//! as under systemd's default `KillMode=control-group`: at its stop they get its stop signal once its group
//! is signalled and its leader has exited, and the stop waits for them as for the group (within
//! `stopwaitsecs`, then SIGKILL); when the program exits by itself they are killed with the rest of its
//! group. Either way the monitor warns, naming them: a supervised program should run in the foreground.
//!
//! They are found by a mark each spawn sets in its environment ([`MARK_VAR`]: the monitor's pid and start
//! time, and the spawn's number, unique on the host), which the processes it starts inherit. An adopted
//! process keeps the mark of the monitor that spawned it, read from its environment at adoption. A process
//! that empties its environment (`env -i`) is not found; one read mid-exec, when its environment reads empty
//! for a moment, is read again.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use nix::sys::signal::Signal;

/// The environment variable that marks the processes of one spawn.
pub const MARK_VAR: &str = "XCLUSTER_SPAWN";

/// The most of a process's environment read when looking for the mark (a few KiB in practice).
const MAX_ENVIRON: u64 = 1 << 20;

/// The mark of spawn `spawn_id` of this monitor.
pub fn mark(spawn_id: u64) -> String {
    static MONITOR: OnceLock<(u32, u64)> = OnceLock::new();
    let (pid, start) = *MONITOR.get_or_init(|| {
        let pid = std::process::id();
        (pid, crate::statefile::start_time(pid as i32).unwrap_or(0))
    });
    format!("{pid}.{start}.{spawn_id}")
}

/// The mark in the environment of process `pid`, if it has one (an adopted leader's).
pub fn mark_of(pid: u32) -> Option<String> {
    let env = environ(pid as i32)?;
    let prefix = format!("{MARK_VAR}=");
    env.split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(prefix.as_bytes()))
        .and_then(|m| String::from_utf8(m.to_vec()).ok())
}

/// A live process with a program's mark outside its group, held by a pidfd so that no signal reaches a
/// later process given its pid.
#[derive(Debug)]
pub struct Stray {
    pub pid: i32,
    /// Its command name, for the warning.
    pub comm: String,
    fd: OwnedFd,
}

impl Stray {
    /// Holds `pid` by a pidfd if it is still what `is_it` says once the pidfd is open (the pid may have gone
    /// to another process since it was looked at).
    fn hold(pid: i32, is_it: impl Fn(i32) -> bool) -> Option<Stray> {
        let fd = pidfd(pid)?;
        is_it(pid).then(|| Stray {
            pid,
            comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_default(),
            fd,
        })
    }

    /// Sends `sig` (gone already is fine).
    pub fn signal(&self, sig: Signal) {
        // SAFETY: sends a signal through a pidfd this value owns; no memory is passed.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig as i32,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Whether it still runs: a pidfd turns readable when its process exits.
    pub fn lives(&self) -> bool {
        let mut p = nix::libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: nix::libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd on the stack, without waiting.
        let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
        n == 0
    }
}

/// How often, and how far apart, a process whose environment read empty is read again: one mid-exec (a
/// `setsid` becoming its program, a shell exec'ing its command) reads empty until the new image has its
/// stack, a moment far shorter than this; one that emptied its environment (`env -i`) costs the scan the
/// whole wait.
const EXEC_RETRIES: u32 = 3;
const EXEC_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// The live processes outside process group `pgid` whose environment carries `mark`. Blocking: it may
/// pause a few milliseconds (above).
pub fn find(mark: &str, pgid: i32) -> Vec<Stray> {
    let entry = format!("{MARK_VAR}={mark}");
    let me = std::process::id() as i32;
    let candidates = crate::statefile::pids().filter(|&pid| pid != me && outside(pid, pgid));
    marked(
        candidates,
        |pid| read_mark(pid, &entry),
        || std::thread::sleep(EXEC_PAUSE),
    )
    .into_iter()
    .filter_map(|pid| {
        Stray::hold(pid, |pid| {
            outside(pid, pgid) && read_mark(pid, &entry) == Mark::Carries
        })
    })
    .collect()
}

/// The live processes of group `pgid` whose mark begins with `prefix` (a monitor's `<pid>.`), held by pidfd:
/// what a program left in its group when its leader exited while no monitor watched. Blocking.
pub fn left_in_group(pgid: i32, prefix: &str) -> Vec<Stray> {
    let in_group = |pid: i32| crate::statefile::live_group(pid) == Some(pgid);
    let marked_so = |pid: i32| mark_of(pid as u32).is_some_and(|m| m.starts_with(prefix));
    crate::statefile::pids()
        .filter(|&pid| in_group(pid) && marked_so(pid))
        .filter_map(|pid| Stray::hold(pid, |pid| in_group(pid) && marked_so(pid)))
        .collect()
}

/// What a process's environment says of the mark looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Carries,
    Lacks,
    /// A user process whose environment reads empty: mid-exec, or emptied.
    Unread,
}

/// The `pids` whose environment carries the mark, as `read` finds it; those `Unread` are read again up to
/// [`EXEC_RETRIES`] times, `pause` between.
fn marked(pids: impl Iterator<Item = i32>, read: impl Fn(i32) -> Mark, pause: impl Fn()) -> Vec<i32> {
    let mut found = Vec::new();
    let mut unread = Vec::new();
    for pid in pids {
        match read(pid) {
            Mark::Carries => found.push(pid),
            Mark::Unread => unread.push(pid),
            Mark::Lacks => {}
        }
    }
    for _ in 0..EXEC_RETRIES {
        if unread.is_empty() {
            break;
        }
        pause();
        unread.retain(|&pid| match read(pid) {
            Mark::Carries => {
                found.push(pid);
                false
            }
            Mark::Unread => true,
            Mark::Lacks => false,
        });
    }
    found
}

/// Whether `pid` is a live process of another group than `pgid`.
/// Group 0 is left out: the kernel's threads, whose environment reads empty for good (read again as if
/// mid-exec at every scan), and processes whose group lies outside this PID namespace, which no spawn of
/// ours can have moved to (`setsid` and `setpgid` make groups here).
fn outside(pid: i32, pgid: i32) -> bool {
    crate::statefile::live_group(pid).is_some_and(|g| g != pgid && g != 0)
}

fn read_mark(pid: i32, entry: &str) -> Mark {
    match environ(pid) {
        Some(env) if env.split(|b| *b == 0).any(|e| e == entry.as_bytes()) => Mark::Carries,
        Some(env) if env.is_empty() => Mark::Unread,
        _ => Mark::Lacks,
    }
}

/// Process `pid`'s environment as it was started, bounded (unreadable: another user's, or gone).
fn environ(pid: i32) -> Option<Vec<u8>> {
    let f = std::fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut env = Vec::new();
    f.take(MAX_ENVIRON).read_to_end(&mut env).ok()?;
    Some(env)
}

fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: the syscall just returned this fd and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kills and reaps a child when dropped, so a failed assertion leaves no `sleep 300` behind.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A child in a session of its own, with the mark, is found; the group's own members and unmarked
    /// processes are not; the pidfd signals it and sees it end.
    #[test]
    fn a_marked_process_outside_the_group_is_found_and_ended() {
        let mark = mark(u64::MAX);
        let mut stray = Reaped(
            std::process::Command::new("setsid")
                .args(["sleep", "300"])
                .env(MARK_VAR, &mark)
                .spawn()
                .unwrap(),
        );
        let _unmarked = Reaped(
            std::process::Command::new("setsid")
                .args(["sleep", "300"])
                .spawn()
                .unwrap(),
        );
        let pid = stray.0.id() as i32;
        // `setsid` execs `sleep` in place once it has its session (it is no group leader here). Waited for
        // until `sleep` runs: `setsid` is found already, and its environment reads empty while it execs, so a
        // read of the mark in that moment found none.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = find(&mark, nix::unistd::getpgrp().as_raw());
            let exec_done = found.iter().all(|s| s.comm == "sleep");
            if (!found.is_empty() && exec_done) || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(found.iter().map(|s| s.pid).collect::<Vec<_>>(), [pid]);
        assert_eq!(mark_of(pid as u32).as_deref(), Some(mark.as_str()));
        assert!(find(&mark, pid).is_empty(), "its own group is not a stray");
        let s = &found[0];
        assert!(s.lives());
        s.signal(Signal::SIGKILL);
        let _ = stray.0.wait();
        assert!(!s.lives());
    }

    /// A process whose environment reads empty (mid-exec) is read again and found once it reads; one that
    /// stays empty is given up after the retries, and one without the mark is not read again.
    #[test]
    fn an_environment_read_mid_exec_is_read_again() {
        use std::cell::RefCell;
        let reads = RefCell::new(Vec::new());
        let pauses = RefCell::new(0);
        let read = |pid: i32| {
            reads.borrow_mut().push(pid);
            let nth = reads.borrow().iter().filter(|&&p| p == pid).count();
            match (pid, nth) {
                (1, _) => Mark::Carries,
                (2, 1) => Mark::Unread,
                (2, _) => Mark::Carries,
                (3, _) => Mark::Unread,
                _ => Mark::Lacks,
            }
        };
        let found = marked([1, 2, 3, 4].into_iter(), read, || *pauses.borrow_mut() += 1);
        assert_eq!(found, [1, 2]);
        let count = |pid| reads.borrow().iter().filter(|&&p| p == pid).count();
        assert_eq!(
            (count(1), count(2), count(3), count(4)),
            (1, 2, 1 + EXEC_RETRIES as usize, 1)
        );
        assert_eq!(*pauses.borrow(), EXEC_RETRIES);
        // No group has id -1: a user process is a candidate, a kernel thread never (its group is 0).
        assert!(outside(std::process::id() as i32, -1));
        // Where the kernel's threads are in sight (not in a PID namespace of its own), kthreadd is pid 2.
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim_end() == "kthreadd") {
            assert!(!outside(2, -1));
        }
    }

    /// Group 0 is never a candidate, whatever group is asked about. Kernel threads are out of sight in a PID
    /// namespace, so the test binary runs this test again as pid 1 of a PID namespace of its own (`unshare`,
    /// with a user namespace so no privilege is needed): a user process whose group, its parent's, lies
    /// outside the namespace, so reads as 0.
    #[test]
    fn a_process_of_group_zero_is_never_outside() {
        const INSIDE: &str = "XCLUSTER_STRAYS_TEST_PID_NAMESPACE";
        if std::env::var_os(INSIDE).is_some() {
            assert_eq!(std::process::id(), 1, "pid 1 of the new namespace");
            assert_eq!(crate::statefile::live_group(1), Some(0));
            assert!(!outside(1, -1), "a process of group 0 is a candidate");
            println!("checked group 0 inside a PID namespace");
            return;
        }
        // Every process of group 0 in sight here (the kernel's threads, outside a PID namespace).
        let zero: Vec<i32> = crate::statefile::pids()
            .filter(|&pid| crate::statefile::live_group(pid) == Some(0))
            .collect();
        for &pid in &zero {
            assert!(!outside(pid, -1), "pid {pid}, of group 0, is a candidate");
        }
        let name = module_path!().split_once("::").unwrap().1.to_string()
            + "::a_process_of_group_zero_is_never_outside";
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        // `--kill-child`: the test inside ends with `unshare` if the wait below gives up on it.
        let spawned = std::process::Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--pid",
                "--kill-child",
                "--mount-proc",
            ])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (passed, unspawned) = match spawned {
            Ok(mut child) => loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break (status.success(), String::new());
                }
                if std::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the test in a PID namespace did not end within 30 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            },
            Err(e) => (false, format!("unshare: {e}")),
        };
        let stdout = std::fs::read_to_string(&out).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err).unwrap_or_default() + &unspawned;
        // The test ran inside: it passed there, or failed there. Otherwise no namespace could be made here (no
        // `unshare`, or user namespaces forbidden): said, not failed, as the host's fault, not the code's.
        if stdout.contains(&format!("test {name} ")) {
            assert!(
                passed && stdout.contains("checked group 0 inside a PID namespace"),
                "inside a PID namespace:\n{stdout}\n{stderr}"
            );
        } else {
            eprintln!(
                "no PID namespace could be made; group 0 checked on {} processes in sight only: {stderr}",
                zero.len()
            );
        }
    }
}
