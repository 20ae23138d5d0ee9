//! Signal handling: SIGTERM drains, SIGINT stops fast, SIGHUP reloads, and a second SIGTERM or SIGINT while
//! draining forces the exit.

use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::common::ShutdownTimes;
use crate::health::Health;

/// The shutdown state a role watches.
#[derive(Debug, Clone)]
pub struct Shutdown {
    drain: CancellationToken,
    stop: CancellationToken,
    force: CancellationToken,
    /// Work the process waits for after the role returns from a drain (its API server finishing).
    tasks: TaskTracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs `work` as a task the process waits for, after the role has returned from a drain, before it
    /// exits (up to the stop signal and its last 5 s, as the role itself).
    pub fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(work)
    }

    pub(crate) fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Fires when the role must stop accepting new work (SIGTERM, SIGINT, or a programmatic stop).
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// Fires when in-flight work must be abandoned (SIGINT, or the grace period is over).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub(crate) fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Starts a graceful drain; `stop` fires after `grace`.
    pub fn begin_drain(&self, grace: Duration) {
        if self.drain.is_cancelled() {
            return;
        }
        self.drain.cancel();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            stop.cancel();
        });
    }

    /// Stops fast: drain and stop at once. `stop` first, so a task that wakes on `drain` on another thread
    /// already sees `stop` and does not begin a graceful drain (the proxy logged "draining" there, then
    /// "grace period over").
    pub fn stop_now(&self) {
        self.stop.cancel();
        self.drain.cancel();
    }
}

/// Sleeps until `at`; without one, at once (its `select!` branch is off then).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// A repeat of the stop signal within this window is the same request delivered twice (GNU `timeout`, systemd
/// and `kill -- -PGID` signal the process and then its group), not an operator insisting; only a later one
/// forces the exit.
pub const REPEAT_WINDOW: Duration = Duration::from_millis(250);

/// Listens for signals until the process ends. `times` is read on each SIGTERM so it reloads live.
///
/// With a `deregister` time, SIGTERM first only reports not ready, and the drain begins once that time is
/// up; a later SIGTERM (past [`REPEAT_WINDOW`]) begins it at once, and SIGINT stops at once as ever.
pub fn spawn_listener(
    shutdown: Shutdown,
    health: Health,
    reload: mpsc::Sender<crate::reload::Cause>,
    times: impl Fn() -> ShutdownTimes + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        // The first stop signal: when, and whether it was SIGINT.
        let mut first_stop: Option<(Instant, bool)> = None;
        // Whether a stop signal arriving now is a new one, not a duplicate delivery (see REPEAT_WINDOW). The
        // other signal is never a duplicate: a Ctrl-C 100 ms into a SIGTERM's drain was dropped as one, and
        // the drain ran its whole grace period.
        let mut insists = move |interrupt: bool| {
            let now = Instant::now();
            let (started, first_interrupt) = *first_stop.get_or_insert((now, interrupt));
            first_interrupt != interrupt || now.duration_since(started) >= REPEAT_WINDOW
        };
        // When the drain SIGTERM asked for begins (once deregistered), and its grace period.
        let mut deregistering: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let drain_at = deregistering.map(|(at, _)| at);
            tokio::select! {
                Some(()) = term.recv() => {
                    let insists = insists(false);
                    if shutdown.is_draining() && insists {
                        warn!("second SIGTERM while draining: forcing exit");
                        shutdown.force.cancel();
                    } else if shutdown.is_draining() || (deregistering.is_some() && !insists) {
                        info!("repeated SIGTERM within {REPEAT_WINDOW:?}: already draining");
                    } else if let Some((_, grace)) = deregistering.take() {
                        info!(?grace, "second SIGTERM while deregistering: draining now");
                        shutdown.begin_drain(grace);
                    } else {
                        let ShutdownTimes { grace, deregister } = times();
                        health.set_draining();
                        if deregister.is_zero() {
                            info!(?grace, "SIGTERM: draining");
                            shutdown.begin_drain(grace);
                        } else {
                            info!(?deregister, ?grace, "SIGTERM: not ready, serving on until deregistered");
                            deregistering = Some((tokio::time::Instant::now() + deregister, grace));
                        }
                    }
                }
                () = sleep_until(drain_at), if drain_at.is_some() => {
                    if let Some((_, grace)) = deregistering.take() {
                        info!(?grace, "deregistered: draining");
                        shutdown.begin_drain(grace);
                    }
                }
                Some(()) = int.recv() => {
                    deregistering = None;
                    if insists(true) && shutdown.is_draining() {
                        warn!("SIGINT while draining: forcing exit");
                        shutdown.force.cancel();
                    } else if shutdown.is_draining() {
                        info!("repeated SIGINT within {REPEAT_WINDOW:?}: already stopping");
                    } else {
                        info!("SIGINT: stopping");
                        health.set_draining();
                        shutdown.stop_now();
                    }
                }
                Some(()) = hup.recv() => {
                    info!("SIGHUP: reloading config");
                    let _ = reload.try_send(crate::reload::Cause::Signal);
                }
                else => return,
            }
        }
    }))
}
