//! Config hot reload. The file watcher (debounced; watches the directory so editors that save by rename are
//! seen) and SIGHUP take the same path: load and validate completely; on failure keep the old config, warn,
//! and count; on success publish the new snapshot, count, and log a one-line diff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ConfigSource, RoleConfig, load};

/// Editors write a file in several steps; events closer together than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    File,
    Signal,
    Api,
    /// The role found that a host name in its config resolves to new addresses.
    Resolve,
}

/// The outcome of the latest reload attempt, for `ctl`, dashboards and tests.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// Successful reloads since start.
    pub reloads: u64,
    /// Failed reloads since start.
    pub failures: u64,
    /// The error of the latest attempt, if it failed.
    pub last_error: Option<String>,
    /// When the latest attempt happened (seconds since the Unix epoch).
    pub last_attempt_unix: Option<u64>,
}

/// Handle to the reload loop.
#[derive(Debug, Clone)]
pub struct Reloader {
    trigger: mpsc::Sender<Cause>,
    status: Arc<watch::Sender<ReloadStatus>>,
    role: &'static str,
}

impl Reloader {
    /// Asks for a reload; the outcome shows up in `status()`.
    pub fn trigger(&self, cause: Cause) {
        let _ = self.trigger.try_send(cause);
    }

    pub fn status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Counts a config that a role read on its own and rejected (the monitor's `reread` and `update`), as a
    /// failed reload: logged, in `/metrics`, and in `status()`.
    pub fn rejected(&self, error: &str) {
        warn!(role = self.role, error, "config rejected; keeping the old config");
        failed(&self.status, self.role, error);
    }
}

/// Records a failed reload attempt.
fn failed(status: &watch::Sender<ReloadStatus>, role: &'static str, error: &str) {
    metrics::counter!(crate::metrics::CONFIG_RELOAD_FAILURES_TOTAL, "role" => role).increment(1);
    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => role).set(0.0);
    status.send_modify(|s| {
        s.failures += 1;
        s.last_error = Some(error.to_string());
        s.last_attempt_unix = unix_now();
    });
}

fn unix_now() -> Option<u64> {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .ok()
}

struct State<C: RoleConfig> {
    source: ConfigSource,
    /// The config the process started with: what keys that need a restart still hold.
    started: C::Raw,
    raw: C::Raw,
    good_bytes: Option<Vec<u8>>,
    bad_bytes: Option<Vec<u8>>,
    publish: watch::Sender<Arc<C>>,
    status: Arc<watch::Sender<ReloadStatus>>,
    role_label: &'static str,
}

/// Starts the reload loop (and the file watcher when the config came from a file).
pub fn spawn<C: RoleConfig>(
    source: ConfigSource,
    seed: (C::Raw, Option<Vec<u8>>),
    publish: watch::Sender<Arc<C>>,
    trigger: (mpsc::Sender<Cause>, mpsc::Receiver<Cause>),
    cancel: CancellationToken,
) -> Reloader {
    let (tx, mut rx) = trigger;
    let status_tx = Arc::new(watch::Sender::new(ReloadStatus::default()));
    metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "role" => C::ROLE).increment(0);
    metrics::counter!(crate::metrics::CONFIG_RELOAD_FAILURES_TOTAL, "role" => C::ROLE).increment(0);
    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
    metrics::gauge!(crate::metrics::CONFIG_RESTART_PENDING, "role" => C::ROLE).set(0.0);

    let watcher = source.path.clone().and_then(|p| start_watcher(p, tx.clone()));
    let mut state = State::<C> {
        source,
        started: seed.0.clone(),
        raw: seed.0,
        good_bytes: seed.1,
        bad_bytes: None,
        publish,
        status: status_tx.clone(),
        role_label: C::ROLE,
    };
    tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the watch
        loop {
            let cause = tokio::select! {
                _ = cancel.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            let mut cause = cause;
            if cause == Cause::File {
                tokio::time::sleep(DEBOUNCE).await;
            }
            while let Ok(more) = rx.try_recv() {
                if more != Cause::File {
                    cause = more;
                }
            }
            state.attempt(cause);
        }
    });
    Reloader {
        trigger: tx,
        status: status_tx,
        role: C::ROLE,
    }
}

impl<C: RoleConfig> State<C> {
    fn attempt(&mut self, cause: Cause) {
        let now = unix_now();
        // A watcher event whose content we already judged is not a new change (editors touch files). The
        // content in force again after a rejected edit (the edit undone) clears that rejection.
        if cause == Cause::File
            && let Some(path) = &self.source.path
            && let Ok(bytes) = crate::config::read_bounded(path)
        {
            if Some(&bytes) == self.good_bytes.as_ref() {
                if self.bad_bytes.take().is_some() {
                    info!(role = self.role_label, "config file back to the config in force");
                    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
                    self.status.send_modify(|s| {
                        s.last_error = None;
                        s.last_attempt_unix = now;
                    });
                }
                return;
            }
            if Some(&bytes) == self.bad_bytes.as_ref() {
                return;
            }
        }
        match load::<C>(&self.source) {
            Ok(loaded) => {
                let diff = crate::config::diff(&self.raw, &loaded.raw, C::redact);
                info!(role = self.role_label, ?cause, changes = %diff, "config reloaded");
                // Named, each reload until a restart: "config reloaded" alone read as if they applied.
                let pending = crate::config::changed_under(&self.started, &loaded.raw, C::RESTART_KEYS);
                if !pending.is_empty() {
                    warn!(
                        role = self.role_label, keys = %pending.join(", "),
                        "changed keys that need a restart; the running values stay until then"
                    );
                }
                let gauge = metrics::gauge!(crate::metrics::CONFIG_RESTART_PENDING, "role" => C::ROLE);
                gauge.set(if pending.is_empty() { 0.0 } else { 1.0 });
                self.raw = loaded.raw;
                self.good_bytes = loaded.file_bytes;
                self.bad_bytes = None;
                let _ = self.publish.send(Arc::new(loaded.config));
                metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "role" => C::ROLE).increment(1);
                metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
                self.status.send_modify(|s| {
                    s.reloads += 1;
                    s.last_error = None;
                    s.last_attempt_unix = now;
                });
            }
            Err(e) => {
                warn!(role = self.role_label, ?cause, error = %e, "config reload rejected; keeping the old config");
                if let Some(path) = &self.source.path {
                    self.bad_bytes = crate::config::read_bounded(path).ok();
                }
                failed(&self.status, C::ROLE, &e.to_string());
            }
        }
    }
}

/// Watches the config file's directory, so a rename-on-save (a new inode) is still seen.
fn start_watcher(path: PathBuf, tx: mpsc::Sender<Cause>) -> Option<notify::RecommendedWatcher> {
    let path = std::path::absolute(&path).unwrap_or(path);
    let dir = path.parent()?.to_path_buf();
    let name = path.file_name()?.to_os_string();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = tx.try_send(Cause::File);
        }
    })
    .map_err(|e| warn!(error = %e, "cannot start the config watcher; SIGHUP still reloads"))
    .ok()?;
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; SIGHUP still reloads");
        return None;
    }
    Some(watcher)
}
