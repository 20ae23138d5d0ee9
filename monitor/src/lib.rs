//! The monitor: supervises the programs of a host (Supervisord's model with backoff, probes, dependencies and
//! minimal reloads), serves the control API, the event stream and the cluster dashboard.

pub mod api;
pub mod child;
pub mod cluster;
pub mod command;
pub mod config;
mod dashboard;
pub mod events;
pub mod logs;
pub mod machine;
pub mod metrics;
pub mod policy;
pub mod probe;
mod probes;
pub mod program;
mod reaper;
pub mod roll;
pub mod select;
mod snapshot;
pub mod statefile;
pub mod status;
mod strays;
mod supervisor;
mod update;

use std::sync::Arc;

pub use config::Config;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use xcluster_runtime::Context;

/// Longest the monitor waits, once its programs are stopped, for in-flight API answers to be written.
const API_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the monitor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] xcluster_runtime::admin::ListenError),
    #[error(transparent)]
    RunDir(#[from] statefile::RunDirError),
}

/// Runs the monitor until every program is stopped after a shutdown (signal or API).
pub async fn run(ctx: Context<Config>) -> Result<(), Error> {
    xcluster_runtime::telemetry::describe(crate::metrics::DESCRIPTIONS);
    let cfg = ctx.config();
    let drain = ctx.shutdown.drain_token();
    let run_dir = statefile::RunDir::acquire(&cfg.run_dir)?;
    // A previous monitor killed with -9 may have left programs running. Those still configured with the
    // same launch settings are adopted (no downtime); the rest are stopped before anything starts, so no two
    // copies of a program fight for a port. Each is stopped as it was started to be; one whose entry does
    // not say (a file written before entries did) as its program is configured now, else by SIGTERM and the
    // longest stopwaitsecs configured.
    let longest = cfg
        .processes
        .iter()
        .map(|p| p.policy.stopwait)
        .max()
        .unwrap_or_default();
    let specs = cfg.clone();
    let stop_now = ctx.shutdown.stop_token();
    let (rd, adopt, stopped) = tokio::task::spawn_blocking(move || {
        let (adopt, stop): (Vec<_>, Vec<_>) = run_dir.leftovers().into_iter().partition(|e| {
            specs
                .processes
                .iter()
                .any(|s| s.name == e.name && s.launch_fingerprint() == e.launch)
        });
        let fallback = |name: &str| match specs.processes.iter().find(|s| s.name == name) {
            Some(s) => statefile::StopBy {
                signal: s.stopsignal,
                wait: s.policy.stopwait,
            },
            None => statefile::StopBy {
                signal: nix::sys::signal::Signal::SIGTERM,
                wait: longest,
            },
        };
        let stopped = run_dir.stop_leftovers(stop, fallback, || stop_now.is_cancelled());
        (run_dir, adopt, stopped)
    })
    .await
    .map_err(|e| {
        Error::RunDir(statefile::RunDirError::Create {
            path: cfg.run_dir.clone(),
            source: std::io::Error::other(e),
        })
    })?;
    let run_dir = rd;
    if !stopped.is_empty() {
        warn!(programs = ?stopped, "stopped processes left by a previous monitor");
    }

    if let Some(path) = &cfg.token_file {
        xcluster_runtime::config::warn_if_secret_exposed(path, "token");
    }
    let bus = events::Bus::new(cfg.events_history);
    if !stopped.is_empty() {
        bus.publish(events::Kind::Monitor {
            detail: format!("stopped leftovers of a previous monitor: {}", stopped.join(", ")),
        });
    }
    let (status_tx, status_rx) = watch::channel(Arc::new(status::Snapshot::default()));
    metrics::collect_from(status_rx.clone());
    let shutting_down = status_rx.clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let api = api::Api {
        commands: cmd_tx,
        status: status_rx,
        config: ctx.config.clone(),
        bus: bus.clone(),
        source: ctx.source.clone(),
        started: ctx.started.clone(),
        reloader: ctx.reloader.clone(),
        drain: drain.clone(),
        started_unix_ms: supervisor::unix_ms(),
        cluster_views: Arc::default(),
    };
    let limits = cfg.http.clone();
    // The API stays up until the programs are stopped, so `ctl status` works during a shutdown.
    let api_stop = tokio_util::sync::CancellationToken::new();
    let (local, api_task) = xcluster_runtime::admin::spawn_api(
        cfg.listen,
        ctx.health.clone(),
        api.handler(),
        limits,
        api_stop.clone(),
    )
    .await?;
    info!(dashboard = %format!("http://{local}/"), "monitor ready");
    tokio::spawn(rotate_own_log(ctx.config.clone(), drain.clone()));
    // Until the process ends: the programs' orphans may exit during the shutdown too.
    tokio::spawn(reaper::run(ctx.shutdown.stop_token()));
    tokio::spawn(watch_reloads(
        ctx.reloader.clone(),
        ctx.config.clone(),
        bus.clone(),
        drain.clone(),
    ));

    let inputs = supervisor::Inputs {
        commands: cmd_rx,
        config: ctx.config.clone(),
        drain: drain.clone(),
        stop: ctx.shutdown.stop_token(),
    };
    let task = supervisor::Supervisor::start(cfg, run_dir, bus, status_tx, inputs, adopt);
    ctx.health.set_ready();
    tokio::spawn(not_ready_once_shutting_down(shutting_down, ctx.health.clone()));
    let _ = task.await;
    ctx.health.set_draining();
    api_stop.cancel();
    // Let the answers in flight (the `/v1/shutdown` that got us here) reach their clients before the
    // process exits; an open event stream must not hold the exit, hence the short bound.
    let _ = tokio::time::timeout(API_FLUSH, api_task).await;
    Ok(())
}

/// A shutdown asked through the API (`ctl shutdown`) is one as SIGTERM's is: `/readyz` says 503 from its start,
/// and the service manager hears `STOPPING=1` then, not once every program has stopped.
async fn not_ready_once_shutting_down(
    mut status: watch::Receiver<Arc<status::Snapshot>>,
    health: xcluster_runtime::Health,
) {
    if status.wait_for(|s| s.shutting_down).await.is_ok() {
        health.set_draining();
    }
}

/// Once a second, rotates the monitor's own log when it is a file that has reached `logfile_maxbytes`
/// ([`logs::rotate_own_log`]); a failure is logged once per cause, and the log keeps its file.
async fn rotate_own_log(config: watch::Receiver<Arc<Config>>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (maxbytes, backups) = config.borrow().own_log;
        match tokio::task::spawn_blocking(move || logs::rotate_own_log(maxbytes, backups)).await {
            Ok(Ok(Some(path))) => info!(file = %path.display(), backups, "the monitor's log rotated"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                let error = e.to_string();
                if last_error.as_ref() != Some(&error) {
                    warn!(%error, "cannot rotate the monitor's log");
                    last_error = Some(error);
                }
            }
            Err(_) => return,
        }
    }
}

/// Turns the reloader's outcomes into events (the error also shows in status and metrics).
async fn watch_reloads(
    reloader: xcluster_runtime::reload::Reloader,
    config: watch::Receiver<Arc<Config>>,
    bus: events::Bus,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut rx = reloader.status();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let s = rx.borrow_and_update().clone();
        let (ok, detail) = match s.last_error {
            Some(e) => (false, e),
            // With `auto_update = false` the settings apply; the programs' changes wait (a `pending` event).
            None if !config.borrow().auto_update => (
                true,
                format!(
                    "reload {} applied; program changes wait for `ctl update`",
                    s.reloads
                ),
            ),
            None => (true, format!("reload {} applied", s.reloads)),
        };
        bus.publish(events::Kind::Reload { ok, detail });
    }
}
