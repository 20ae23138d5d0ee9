//! Runs a role as a daemon: publishes its config snapshot, starts signal handling and hot reload, hands the
//! role a [`Context`], and turns the outcome into an exit code. Only the entry point calls this.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::common::ShutdownTimes;
use crate::config::{ConfigSource, Loaded, RoleConfig};
use crate::health::{Health, Phase};
use crate::reload::Reloader;
use crate::signals::Shutdown;

/// What a running role is given.
#[derive(Debug, Clone)]
pub struct Context<C: RoleConfig> {
    /// The current config; replaced whole on every successful reload.
    pub config: watch::Receiver<Arc<C>>,
    /// Readiness, shown by `/readyz`; the role calls `set_ready()` when it can serve.
    pub health: Health,
    /// Drain and stop signals.
    pub shutdown: Shutdown,
    /// Asks for a reload and reports the outcome.
    pub reloader: Reloader,
    /// Where the config came from, so a role can re-read it itself (the monitor's `reread`).
    pub source: ConfigSource,
    /// The raw config the process started with: what the keys that need a restart hold until then. A role
    /// that re-reads its config itself does so with [`crate::config::reload`] and this, as a reload does.
    pub started: Arc<C::Raw>,
}

impl<C: RoleConfig> Context<C> {
    /// The current config snapshot.
    pub fn config(&self) -> Arc<C> {
        self.config.borrow().clone()
    }
}

/// What a role's config tells the daemon runner.
pub trait DaemonConfig: RoleConfig {
    /// What SIGTERM does: how long the daemon reports not ready before the drain, and how long the drain
    /// lets in-flight work finish.
    fn shutdown(&self) -> ShutdownTimes;
    /// The `tracing` filter from `[log] level`.
    fn log_filter(&self) -> &str;
    /// The descriptors this config lets the role hold at once: its connections' (`max_connections`), and
    /// [`crate::limits::BASE_DESCRIPTORS`] (checked against the process's limit at start and each reload).
    fn descriptors(&self) -> u64;
}

/// Exit code when a second signal forced the exit.
pub const EXIT_FORCED: i32 = 2;

/// Runs `role` until it returns or a second signal forces the end. Returns the process exit code.
pub async fn run<C, E, F, Fut>(source: ConfigSource, loaded: Loaded<C>, role: F) -> i32
where
    C: DaemonConfig,
    E: std::fmt::Display,
    F: FnOnce(Context<C>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let _ = crate::telemetry::set_filter(loaded.config.log_filter());
    crate::limits::raise();
    crate::limits::check(C::ROLE, loaded.config.descriptors());
    crate::telemetry::describe(crate::metrics::DESCRIPTIONS);
    crate::telemetry::set_collector("process", Arc::new(crate::limits::collect));
    // At 0 from the start: an alert on `rate()` or `increase()` of a counter that appears only at its first
    // event misses that event.
    for name in [
        crate::metrics::HTTP_CONNECTIONS_REJECTED_TOTAL,
        crate::metrics::HTTP_ACCEPT_ERRORS_TOTAL,
        crate::metrics::LOG_LINES_DROPPED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(crate::metrics::BUILD_INFO, "role" => C::ROLE, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    let internal = CancellationToken::new();
    tokio::spawn(crate::telemetry::upkeep(internal.clone()));
    let notifier = crate::sdnotify::Notifier::from_env();
    crate::sdnotify::spawn_watchdog(notifier.clone(), internal.clone());

    let started = Arc::new(loaded.raw.clone());
    let reload_seed = (loaded.raw.clone(), loaded.sources.clone());
    let (publish, config_rx) = watch::channel(Arc::new(loaded.config));
    let health = Health::new();
    let shutdown = Shutdown::new();
    let trigger = mpsc::channel(8);
    let trigger_tx = trigger.0.clone();
    let reloader = crate::reload::spawn::<C>(
        source.clone(),
        reload_seed,
        publish,
        trigger,
        internal.clone(),
        notifier.clone(),
    );
    tokio::spawn(tell_lifecycle(
        notifier,
        C::ROLE,
        health.clone(),
        shutdown.drain_token(),
        internal.clone(),
    ));

    // Keep the log filter in step with the config, and the descriptors it needs checked.
    let mut log_rx = config_rx.clone();
    let log_cancel = internal.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = log_cancel.cancelled() => return,
                r = log_rx.changed() => if r.is_err() { return },
            }
            let (filter, descriptors) = {
                let c = log_rx.borrow_and_update();
                (c.log_filter().to_string(), c.descriptors())
            };
            if let Err(e) = crate::telemetry::set_filter(&filter) {
                warn!(error = %e, "cannot apply log filter");
            }
            crate::limits::check(C::ROLE, descriptors);
        }
    });

    let times_rx = config_rx.clone();
    let signals = crate::signals::spawn_listener(shutdown.clone(), health.clone(), trigger_tx, move || {
        times_rx.borrow().shutdown()
    });
    if let Err(e) = signals {
        error!(error = %e, "cannot install signal handlers");
        return 1;
    }

    let ctx = Context {
        config: config_rx.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
        reloader,
        source,
        started,
    };
    let force = shutdown.force_token();
    let stop = shutdown.stop_token();
    let role_fut = role(ctx);
    tokio::pin!(role_fut);
    // After `stop` the role has a short last chance to return before we force the exit.
    let overdue = async {
        stop.cancelled().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::pin!(overdue);
    let mut code = tokio::select! {
        r = &mut role_fut => match r {
            Ok(()) => 0,
            Err(e) => { error!(role = C::ROLE, error = %e, "failed"); 1 }
        },
        _ = force.cancelled() => EXIT_FORCED,
        _ = &mut overdue => EXIT_FORCED,
    };
    // After a drain, the work the role handed to `shutdown` (its API server serving the clients queued on its
    // port and the requests in flight) ends before the process does.
    if code == 0 && shutdown.is_draining() {
        let tasks = shutdown.tasks();
        tasks.close();
        tokio::select! {
            _ = tasks.wait() => {}
            _ = force.cancelled() => code = EXIT_FORCED,
            _ = &mut overdue => code = EXIT_FORCED,
        }
    }
    match code {
        0 => info!(role = C::ROLE, "stopped"),
        EXIT_FORCED if force.is_cancelled() => warn!(role = C::ROLE, "forced exit"),
        EXIT_FORCED => warn!(
            role = C::ROLE,
            "did not stop within 5 s of the stop signal; forcing exit"
        ),
        _ => {}
    }
    internal.cancel();
    code
}

/// Tells the service manager what `/readyz` says: `READY=1` when the role marks itself ready, which every role
/// does only once its API serves (the balancer once it can route too), and `STOPPING=1` when it turns not
/// ready or its drain begins (SIGTERM, SIGINT, the monitor's `shutdown`), whichever comes first.
async fn tell_lifecycle(
    notifier: crate::sdnotify::Notifier,
    role: &'static str,
    health: Health,
    drain: CancellationToken,
    cancel: CancellationToken,
) {
    let mut phase = health.subscribe();
    loop {
        match *phase.borrow_and_update() {
            Phase::Starting => {}
            Phase::Ready => notifier.ready(&format!("{role} ready")),
            Phase::Draining => break,
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = drain.cancelled() => break,
            r = phase.changed() => if r.is_err() { return },
        }
    }
    notifier.stopping(&format!("{role} stopping"));
}
