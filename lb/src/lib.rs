//! The balancer: the load-aware directory and the layer-4 proxy.
//!
//! - [`directory`]: report ingestion, the server table and weights, and the client API (`/v1/servers`,
//!   `/v1/pick`, `/v1/status`, drain). [`directory::Directory::pick`] is what the L4 proxy calls.
//! - [`proxy`]: the layer-4 proxy; its listeners route by the directory's live weights unless `[proxy]`
//!   lists fixed backends for their request type (`live_picker`).

pub mod config;
pub mod directory;
mod live_picker;
pub mod metrics;
pub mod proxy;

pub use config::Config;
pub use directory::Directory;
use xcluster_runtime::Context;

/// Why the lb stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] xcluster_runtime::admin::ListenError),
    /// The L4 proxy could not start (issue 5).
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
    #[error(transparent)]
    StateFile(#[from] directory::state::ClaimError),
}

/// Runs the lb until drained.
pub async fn run(ctx: Context<Config>) -> Result<(), Error> {
    xcluster_runtime::telemetry::describe(crate::metrics::DESCRIPTIONS);
    xcluster_runtime::telemetry::describe(crate::proxy::metrics::DESCRIPTIONS);
    let cfg = ctx.config();
    let drain = ctx.shutdown.drain_token();
    let limits = cfg.http.clone();
    warn_if_key_exposed(&cfg);
    if cfg.keys.is_empty() {
        tracing::warn!("no [reports] key, key_file or agent_keys: every load report will be rejected");
    }
    let dir = Directory::new(directory::Settings::from_config(&cfg));
    dir.collect_metrics();
    // Held until this balancer ends. A lock that cannot be taken at all (a read-only directory) is a
    // warning, as a failed write is: the balancer runs, its drains in memory; only a file another balancer
    // holds stops it.
    let state_file = cfg.state_file.as_deref().map(directory::state::resolve);
    if let (Some(link), Some(file)) = (&cfg.state_file, &state_file)
        && link != file
    {
        tracing::info!(link = %link.display(), file = %file.display(), "the state file is a symlink: kept where it points");
    }
    let _claim = match state_file.as_deref().map(directory::state::claim) {
        Some(Err(e @ directory::state::ClaimError::Taken { .. })) => return Err(e.into()),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "state file not locked: another balancer given it would not be refused");
            None
        }
        Some(Ok(lock)) => Some(lock),
        None => None,
    };
    // Before the API answers: a peer starting beside this one (every balancer restarted at once) then reads
    // this file's state in our status, not an empty one.
    let lost = match state_file {
        Some(path) => restore_state_file(&dir, path).await,
        None => false,
    };
    tokio::spawn(dir.clone().run_housekeeping(drain.clone()));
    // The first balancer is this one's advertised address (validation puts it there).
    let started = (cfg.listen, cfg.balancers.first().copied().unwrap_or(cfg.listen));
    tokio::spawn(follow_config(
        ctx.config.clone(),
        dir.clone(),
        started,
        drain.clone(),
    ));
    // The API outlives the drain until the proxy has drained (as the monitor's outlives its programs), so
    // `/metrics`, `/v1/status` and `/readyz` (503) still answer while established connections finish: a
    // walk found them refused for the whole grace period, where HAProxy's stats stay up in a soft stop.
    let api_drain = tokio_util::sync::CancellationToken::new();
    let _api_stops = api_drain.clone().drop_guard();
    dir.set_starting(true);
    let (_, api) = xcluster_runtime::admin::spawn_api(
        cfg.listen,
        ctx.health.clone(),
        directory::api::handler(dir.clone()),
        limits,
        api_drain.clone(),
    )
    .await?;
    // Before it is ready: the drains set on every balancer while this one was away.
    let peers: Vec<_> = (cfg.balancers.iter().skip(1))
        .filter(|&&p| p != cfg.listen)
        .copied()
        .collect();
    // A state file refused or unreadable lost what this balancer knew: its peers, which may be restarting
    // beside it (every balancer restarted at once), are asked again for a few seconds before it goes on
    // without them, where a balancer with nothing to lose asks once.
    let patience = if lost {
        directory::peers::PATIENCE_WHEN_LOST
    } else {
        std::time::Duration::ZERO
    };
    tokio::select! {
        () = directory::peers::take_drains(&dir, &peers, patience) => {}
        () = drain.cancelled() => {}
    }
    dir.set_starting(false);
    // The state settled here (the file's, or the newer peers') is what a restart must find.
    dir.save_state().await;
    // L4 proxy (issue 5): follows `ctx.config` reloads; drains with the process.
    let picker = std::sync::Arc::new(live_picker::LivePicker::new(&cfg.proxy, dir.clone()));
    let routed = picker.directory_types(&cfg.proxy);
    if !warm_up(&dir, &routed, cfg.proxy.warmup, &drain).await {
        dir.close();
        api_drain.cancel();
        let _ = api.await;
        return Ok(());
    }
    let proxy = proxy::start(ctx.config.clone(), picker, &drain, ctx.shutdown.stop_token())?;
    let reloader = ctx.reloader.clone();
    tokio::spawn(proxy::names::watch(
        ctx.config.clone(),
        proxy::names::system_lookup,
        move || reloader.trigger(xcluster_runtime::reload::Cause::Resolve),
        drain.clone(),
    ));
    ctx.health.set_ready();
    drain.cancelled().await;
    // Pending long polls answer now, so the graceful shutdown is not held by them.
    dir.close();
    proxy.shutdown();
    proxy.drained().await;
    api_drain.cancel();
    let _ = api.await;
    Ok(())
}

/// Reads `[directory] state_file` (on a blocking thread: it may set a bad file aside) and restores its
/// drains and run-time weights; every later change is written to it. True when the file held a state that
/// is lost (refused or unreadable).
async fn restore_state_file(dir: &Directory, path: std::path::PathBuf) -> bool {
    let at = path.clone();
    let now = directory::state::unix_ms();
    let restored = tokio::task::spawn_blocking(move || directory::state::load_logged(&at, now));
    let restored = match tokio::time::timeout(directory::STATE_FILE_WITHIN, restored).await {
        Ok(Ok(restored)) => restored,
        Ok(Err(_)) => {
            dir.keep_state_in(path);
            return true;
        }
        // Storage that does not answer held the start for ever, before the balancer was ready: it starts
        // from its peers' state, and the file, which may hold the only copy of the drains, is not written
        // over.
        Err(_) => {
            tracing::error!(
                file = %path.display(),
                within_s = directory::STATE_FILE_WITHIN.as_secs(),
                "the state file was not read in time; starting from the peers' drains and weights, and not \
                 writing the file"
            );
            return true;
        }
    };
    // A file that could not be read (permissions, an I/O error) may hold the only copy of the drains: it
    // is not written over (the first save renamed a new file onto it).
    if !restored.unreadable {
        dir.keep_state_in(path.clone());
    }
    if let Some(state) = restored.state {
        let (drains, weights) = dir.restore_state(&state);
        tracing::info!(
            file = %path.display(), drains, weights, changed_unix_ms = state.changed_unix_ms,
            "drains and run-time weights restored from the state file"
        );
    }
    restored.lost
}

/// Waits up to `within` for the directory to route `types` before the proxy opens their listeners (the
/// kernel hands a new socket of a SO_REUSEPORT group its share of clients at once, and without instances
/// it could only close them). False when the drain began meanwhile.
async fn warm_up(
    dir: &Directory,
    types: &[String],
    within: std::time::Duration,
    drain: &tokio_util::sync::CancellationToken,
) -> bool {
    if types.is_empty() || within.is_zero() {
        return true;
    }
    tokio::select! {
        warm = dir.until_routable(types, within) => {
            if warm {
                tracing::info!(?types, "directory warm: opening the proxy listeners");
            } else {
                let msg = "no instance reported for some types yet; opening the proxy listeners anyway";
                tracing::warn!(?types, ?within, "{msg}");
            }
            true
        }
        () = drain.cancelled() => false,
    }
}

/// Applies every reloaded config to the directory (types, tunables, key, peers, token reload live). `listen`
/// needs a restart: while a reloaded config names another one, the API stays where it started, and the
/// directory goes on advertising the address it started with (`started`: listen, advertised), never one
/// nothing listens on.
async fn follow_config(
    mut rx: tokio::sync::watch::Receiver<std::sync::Arc<Config>>,
    dir: Directory,
    started: (std::net::SocketAddr, std::net::SocketAddr),
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let cfg = rx.borrow_and_update().clone();
        warn_if_key_exposed(&cfg);
        let mut settings = directory::Settings::from_config(&cfg);
        if cfg.listen != started.0 {
            tracing::warn!(
                listening = %started.0, configured = %cfg.listen,
                "listen needs a restart: the API stays, and is advertised, where it started"
            );
            if let Some(own) = settings.balancers.first_mut() {
                *own = started.1.to_string();
            }
        }
        dir.reconfigure(settings);
        tracing::info!(types = ?cfg.params.types.keys().collect::<Vec<_>>(), "directory settings reloaded");
    }
}

/// Warns about a short report key, or a key file group or others can read.
fn warn_if_key_exposed(cfg: &Config) {
    for (what, key) in cfg.keys.each() {
        key.warn(&what);
    }
}
