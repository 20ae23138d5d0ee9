//! systemd's notify protocol (`sd_notify(3)`): with `NOTIFY_SOCKET` set, the daemon tells the service manager
//! when it is ready (`READY=1`, once its role calls `Health::set_ready`, i.e. once its API serves), when a
//! reload begins and ends (`RELOADING=1` with `MONOTONIC_USEC`, then `READY=1`, as `Type=notify-reload` asks),
//! when it stops (`STOPPING=1`), and that it is alive (`WATCHDOG=1` every half `WATCHDOG_USEC`).
//!
//! Every message is one non-blocking datagram: a manager that is gone or slow costs a warning (once), never
//! a stall or a panic. Without `NOTIFY_SOCKET` every call is a no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The variables the protocol reads. A supervisor hands none of them to the programs it starts: a child
/// that saw `NOTIFY_SOCKET` would speak for its supervisor (`READY=1`, `STOPPING=1`) to the service manager.
pub const ENV_VARS: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Leaves [`ENV_VARS`] out of what `cmd` starts with (a program's own settings, applied after, may still
/// set them).
pub fn keep_from(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for var in ENV_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// Longest `STATUS=` text sent: the manager shows one short line.
const STATUS_MAX: usize = 200;

/// Where the daemon is, as the service manager was told: READY after a reload only follows a RELOADING, and
/// nothing but the watchdog follows STOPPING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Starting,
    Ready,
    Reloading,
    Stopping,
}

#[derive(Debug)]
struct Inner {
    /// The socket and the manager's address; `None` without `NOTIFY_SOCKET` (or when it is unusable).
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Serialises the state transitions (and their datagrams, so they reach the manager in order).
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    told: Told,
    /// A failed send was warned about: the rest are logged at debug only.
    warned: bool,
}

/// A handle to the service manager's notify socket; cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
    /// Half of `WATCHDOG_USEC`, when the manager watches this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment: `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace), `WATCHDOG_USEC`
    /// and `WATCHDOG_PID`. The variables stay set (removing them is unsafe once threads run); the monitor
    /// leaves them out of its programs' environments instead ([`ENV_VARS`]).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::new(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// One that sends nothing (no service manager).
    pub fn disabled() -> Self {
        Self::new(None, None, None, 0)
    }

    fn new(socket: Option<&str>, watchdog_usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Self {
        let target = socket.and_then(|s| match open(s) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(socket = s, error = %e, "cannot use NOTIFY_SOCKET; the service manager will not hear from us");
                None
            }
        });
        let watchdog = target
            .as_ref()
            .and_then(|_| watchdog_period(watchdog_usec, watchdog_pid, pid));
        Self {
            inner: Arc::new(Inner {
                target,
                state: Mutex::new(State {
                    told: Told::Starting,
                    warned: false,
                }),
            }),
            watchdog,
        }
    }

    /// Whether a service manager listens.
    #[cfg(test)]
    fn is_enabled(&self) -> bool {
        self.inner.target.is_some()
    }

    /// How often the watchdog must be fed, if the manager watches this process.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The role serves: `READY=1` (once; later calls do nothing).
    pub fn ready(&self, status: &str) {
        let pid = std::process::id();
        self.transition(|t| {
            (t == Told::Starting).then(|| {
                (
                    Told::Ready,
                    format!("READY=1\nMAINPID={pid}\nSTATUS={}", line(status)),
                )
            })
        });
    }

    /// A reload begins: `RELOADING=1` with the monotonic time, as `Type=notify-reload` wants, so the manager
    /// knows it answers the signal it sent and not an older one. Only once ready: a reload during the start
    /// says nothing, and its end no `READY=1` before the role is.
    pub fn reloading(&self) {
        let usec = monotonic_usec();
        self.transition(|t| {
            (t == Told::Ready).then(|| {
                (
                    Told::Reloading,
                    format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config"),
                )
            })
        });
    }

    /// The reload begun by [`Self::reloading`] ended, applied or rejected (the old config then serves on):
    /// `READY=1` either way, with `status` saying which.
    pub fn reloaded(&self, status: &str) {
        self.transition(|t| {
            (t == Told::Reloading).then(|| (Told::Ready, format!("READY=1\nSTATUS={}", line(status))))
        });
    }

    /// Says `status` alone (`STATUS=`), for an event that is no reload, such as a config the monitor read for
    /// `reread` or `update` and refused. Only while ready: a starting, reloading or stopping role's own
    /// status stands.
    pub fn status(&self, status: &str) {
        self.transition(|t| (t == Told::Ready).then(|| (t, format!("STATUS={}", line(status)))));
    }

    /// The shutdown began: `STOPPING=1` (once).
    pub fn stopping(&self, status: &str) {
        self.transition(|t| {
            (t != Told::Stopping).then(|| (Told::Stopping, format!("STOPPING=1\nSTATUS={}", line(status))))
        });
    }

    /// Feeds the watchdog.
    pub fn watchdog(&self) {
        if let Ok(mut state) = self.inner.state.lock() {
            self.send(&mut state, "WATCHDOG=1");
        }
    }

    /// Sends the message `step` gives for the state told, and moves to its state; `None` sends nothing.
    fn transition(&self, step: impl FnOnce(Told) -> Option<(Told, String)>) {
        let Ok(mut state) = self.inner.state.lock() else {
            return;
        };
        if let Some((told, message)) = step(state.told) {
            state.told = told;
            self.send(&mut state, &message);
        }
    }

    fn send(&self, state: &mut State, message: &str) {
        let Some((socket, addr)) = &self.inner.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            if state.warned {
                debug!(error = %e, "cannot notify the service manager");
            } else {
                state.warned = true;
                warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); further failures are logged at debug");
            }
        }
    }
}

/// The socket to send from and the manager's address: `@name` is Linux's abstract namespace.
fn open(socket: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None if socket.starts_with('/') => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor @name",
            ));
        }
    };
    // Close-on-exec (std sets it), so no program the monitor starts holds it.
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    Ok((sock, addr))
}

/// Half of `WATCHDOG_USEC` (as `sd_watchdog_enabled(3)` advises), at least 1 ms; none when unset, not a
/// number, zero, or meant for another process (`WATCHDOG_PID`).
fn watchdog_period(usec: Option<&str>, pid_var: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid_var
        && p.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd stamps its reload request with (public for the tests
/// that check a `RELOADING=1` stamp against it).
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration; CLOCK_MONOTONIC always exists.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

/// `STATUS=` text: one line (a newline would start another assignment), bounded.
fn line(status: &str) -> String {
    let mut out: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > STATUS_MAX {
        let mut end = STATUS_MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// Feeds the watchdog every period until `cancel`, from a task on the runtime: a runtime whose workers are
/// all wedged runs no task, so the pings stop and the manager restarts the process.
pub fn spawn_watchdog(notifier: Notifier, cancel: CancellationToken) {
    let Some(period) = notifier.watchdog_period() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        // After a stall, one ping at once, then the regular pace: no burst that would hide it.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => notifier.watchdog(),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manager's socket bound in a temp dir, and a notifier pointed at it.
    fn manager() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(path.to_str(), Some("2000000"), None, 1);
        (dir, sock, n)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn nothing_waits(sock: &UnixDatagram) {
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(sock.recv(&mut buf).is_err(), "a message was sent");
        sock.set_nonblocking(false).unwrap();
    }

    #[test]
    fn the_lifecycle_is_told_in_order_and_each_step_once() {
        let (_dir, sock, n) = manager();
        // A reload before the role is ready says nothing.
        n.reloading();
        n.reloaded("reload applied");
        nothing_waits(&sock);
        n.ready("lb ready");
        let ready = recv(&sock);
        assert!(ready.starts_with("READY=1\nMAINPID="), "{ready}");
        assert!(ready.ends_with("\nSTATUS=lb ready"), "{ready}");
        n.ready("again");
        nothing_waits(&sock);

        n.reloading();
        let reloading = recv(&sock);
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(reloading.starts_with("RELOADING=1\n") && usec > 0, "{reloading}");
        n.reloaded("reload rejected:\nbad key");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=reload rejected: bad key");

        n.stopping("draining");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=draining");
        n.stopping("again");
        n.reloading();
        n.reloaded("late");
        nothing_waits(&sock);
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn an_abstract_socket_is_reached() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("xcluster-sdnotify-test-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(Some(&format!("@{name}")), None, None, 1);
        n.stopping("bye");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn a_manager_that_is_gone_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("none").to_str(), None, None, 1);
        assert!(n.is_enabled());
        n.ready("x");
        n.watchdog();
        // A relative path is not a socket systemd hands out.
        assert!(!Notifier::new(Some("relative"), None, None, 1).is_enabled());
        assert!(!Notifier::disabled().is_enabled());
    }

    #[test]
    fn the_watchdog_period_is_half_its_timeout_and_ours_only() {
        assert_eq!(
            watchdog_period(Some("3000000"), None, 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_period(Some("3000000"), Some("7"), 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(watchdog_period(Some("3000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(None, None, 7), None);
        assert_eq!(
            watchdog_period(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
        // Without a socket there is no one to feed.
        let n = Notifier::new(None, Some("3000000"), None, 7);
        assert_eq!(n.watchdog_period(), None);
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(line("a\nb\tc"), "a b c");
        let long = "é".repeat(300);
        let l = line(&long);
        assert!(l.len() <= STATUS_MAX + '…'.len_utf8() && l.ends_with('…'), "{l}");
    }
}
