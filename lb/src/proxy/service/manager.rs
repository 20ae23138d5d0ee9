//! The manager: the worker threads, the set of running listeners, reloads and the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{Error, ListenerState, LiveListener, Shared};
use crate::proxy::config::{ListenerConfig, ProxyConfig, RuntimeMode};
use crate::proxy::handover;
use crate::proxy::health::{CheckStreaks, Holds};
use crate::proxy::listener::Close;
use crate::proxy::metrics::{
    BUFFER_WAITS_TOTAL, LISTENER_BIND_FAILURES_TOTAL, LISTENER_UNBOUND, RECEIVE_PAUSES_TOTAL, Retired,
    SPLICED_BYTES_TOTAL, WORKERS,
};
use crate::proxy::pick::BackendPicker;

/// A worker thread: a tokio runtime, or an io_uring event loop.
enum Engine {
    Tokio {
        handle: tokio::runtime::Handle,
        finish: CancellationToken,
    },
    Uring(crate::proxy::uring::Remote),
}

struct Worker {
    engine: Engine,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Ends the thread; connections still open on it are closed.
    fn finish(&self) {
        match &self.engine {
            Engine::Tokio { finish, .. } => finish.cancel(),
            Engine::Uring(r) => r.send(crate::proxy::uring::Msg::Finish),
        }
    }
}

fn spawn_worker(name: String, mut builder: tokio::runtime::Builder) -> std::io::Result<Worker> {
    let rt = builder.enable_all().build()?;
    let handle = rt.handle().clone();
    let finish = CancellationToken::new();
    let f = finish.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        rt.block_on(f.cancelled());
        rt.shutdown_timeout(Duration::from_millis(100));
    })?;
    Ok(Worker {
        engine: Engine::Tokio { handle, finish },
        thread,
    })
}

/// Starts the workers; returns them with the runtime they run (`io_uring` falls back to `per_core`).
fn spawn_workers(cfg: &ProxyConfig, shared: &Arc<Shared>) -> std::io::Result<(Vec<Worker>, RuntimeMode)> {
    if cfg.runtime == RuntimeMode::IoUring {
        let mut workers = Vec::new();
        for i in 0..cfg.workers {
            match crate::proxy::uring::spawn(i, shared.clone(), cfg.io_uring_buffers) {
                Ok((remote, thread)) => workers.push(Worker {
                    engine: Engine::Uring(remote),
                    thread,
                }),
                Err(e) => {
                    warn!(error = %e, "io_uring is not available here; the proxy runs the per_core runtime");
                    for w in &workers {
                        w.finish();
                    }
                    let mode = RuntimeMode::PerCore;
                    return Ok((spawn_tokio_workers(cfg.workers, mode)?, mode));
                }
            }
        }
        return Ok((workers, RuntimeMode::IoUring));
    }
    Ok((spawn_tokio_workers(cfg.workers, cfg.runtime)?, cfg.runtime))
}

fn spawn_tokio_workers(workers: usize, mode: RuntimeMode) -> std::io::Result<Vec<Worker>> {
    match mode {
        RuntimeMode::PerCore | RuntimeMode::IoUring => (0..workers)
            .map(|i| {
                spawn_worker(
                    format!("lb-proxy-{i}"),
                    tokio::runtime::Builder::new_current_thread(),
                )
            })
            .collect(),
        RuntimeMode::Shared => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers).thread_name("lb-proxy");
            Ok(vec![spawn_worker("lb-proxy-main".into(), b)?])
        }
    }
}

struct Running {
    id: u64,
    /// Fixed for its life: a change of address is a new listener. The rest of its settings are in `state`.
    listen: SocketAddr,
    state: LiveListener,
    /// `Some` once it closes (the tokio accept loops watch it).
    close: watch::Sender<Option<Close>>,
    /// Its sockets' inodes, to tell them from another process's on the same address.
    inodes: Vec<u64>,
}

/// The running proxy. `shutdown()` stops accepting; `drained()` waits until established connections end
/// (or the stop token given to [`start`] fires) and the worker threads are gone.
#[derive(Debug)]
pub struct ProxyHandle {
    drain: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting on every listener; established connections carry on.
    pub fn shutdown(&self) {
        self.drain.cancel();
    }

    /// Waits for the drain to complete. Call after [`ProxyHandle::shutdown`] or after the drain token fired.
    pub async fn drained(self) {
        let _ = self.task.await;
    }
}

struct Manager {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    running: Vec<Running>,
    /// Listeners of the config whose address was taken when a reload added them: retried every
    /// [`BIND_RETRY`] until they bind or a reload drops them.
    unbound: Vec<ListenerConfig>,
    next_id: u64,
    backlog: i32,
    keepalive: Option<Duration>,
    started: ProxyConfig,
    /// The listeners of the config applied last, as [`crate::proxy::metrics::LISTENER_INFO`] shows them.
    listed: Vec<ListenerConfig>,
    /// `shutdown.grace_ms`: how long a closing listener may wait for permits to serve its queue.
    grace: Duration,
}

/// The config's `[proxy]` and its `shutdown.grace_ms`, marked seen.
fn proxy_and_grace(config: &mut watch::Receiver<Arc<crate::Config>>) -> (ProxyConfig, Duration) {
    let c = config.borrow_and_update();
    (c.proxy.clone(), c.shutdown.grace)
}

/// Starts the workers and the listeners of the current config, and follows config reloads.
/// `drain` stops accepting; `stop` abandons established connections.
pub fn start(
    mut config: watch::Receiver<Arc<crate::Config>>,
    picker: Arc<dyn BackendPicker>,
    drain: &CancellationToken,
    stop: CancellationToken,
) -> Result<ProxyHandle, Error> {
    let (cfg, grace) = proxy_and_grace(&mut config);
    let shared = Arc::new(Shared {
        picker,
        timeouts: ArcSwap::from_pointee(cfg.timeouts.clone()),
        forwarding: cfg.forwarding,
        backends: ArcSwap::default(),
        places: ArcSwap::default(),
        queue: Arc::default(),
        permits: Arc::new(Semaphore::new(cfg.max_connections)),
        tracker: TaskTracker::new(),
        listeners: TaskTracker::new(),
        stop,
        holds: Holds::default(),
        retired: ArcSwap::default(),
    });
    prune_retired(&shared);
    let (workers, runtime) = spawn_workers(&cfg, &shared).map_err(Error::Workers)?;
    metrics::gauge!(WORKERS, "runtime" => runtime.name()).set(cfg.workers as f64);
    if runtime == RuntimeMode::IoUring {
        // At 0 from the start, so an alert on their rate has a series before the first event.
        for name in [BUFFER_WAITS_TOTAL, RECEIVE_PAUSES_TOTAL, SPLICED_BYTES_TOTAL] {
            metrics::counter!(name).increment(0);
        }
    }
    let mut m = Manager {
        shared,
        workers,
        running: Vec::new(),
        unbound: Vec::new(),
        next_id: 0,
        backlog: cfg.backlog,
        keepalive: cfg.keepalive,
        started: cfg.clone(),
        listed: cfg.listeners.clone(),
        grace,
    };
    m.apply_live(&cfg);
    crate::proxy::metrics::publish_listeners(&[], &cfg.listeners);
    for l in &cfg.listeners {
        if let Err(source) = m.add_listener(l) {
            m.finish_now();
            return Err(Error::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            });
        }
    }
    info!(
        listeners = cfg.listeners.len(),
        workers = cfg.workers,
        runtime = %runtime.name(),
        forwarding = %cfg.forwarding.name(),
        "proxy started"
    );
    let drain = drain.child_token();
    // Until the stop, not the drain: connections still pick backends through the grace period (retries,
    // waiters, a closing listener's queue), and a checks' hold that is not renewed ends in a few seconds.
    tokio::spawn(check_backends(m.shared.clone(), m.shared.stop.child_token()));
    let d = drain.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = d.cancelled() => break,
                r = config.changed() => {
                    if r.is_err() {
                        d.cancelled().await;
                        break;
                    }
                    let (new, grace) = proxy_and_grace(&mut config);
                    m.grace = grace;
                    m.reload(&new);
                }
                () = tokio::time::sleep(BIND_RETRY), if !m.unbound.is_empty() => m.retry_unbound(),
            }
        }
        m.drain().await;
    });
    Ok(ProxyHandle { drain, task })
}

/// Installs the pruner that leaves the series of the listeners and backends reloads removed out of
/// `/metrics` once nothing uses them ([`crate::proxy::metrics::hide_retired`]). It holds `shared` weakly: a proxy
/// gone hides nothing.
fn prune_retired(shared: &Arc<Shared>) {
    let shared = Arc::downgrade(shared);
    let prune = move |text: &str| {
        let shared = shared.upgrade()?;
        let retired = shared.retired.load();
        crate::proxy::metrics::hide_retired(text, &retired, |addr| shared.picker.routes_to(addr))
    };
    xcluster_runtime::telemetry::set_pruner("lb_proxy", Arc::new(prune));
}

/// How often a listener whose address was taken tries to bind it again. An address is usually taken for a
/// moment (the balancer it replaces is still draining it), so the listener starts serving soon after, without
/// another reload.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Active health checks of the configured backends, every `check_interval_ms` (read again each round, so a
/// reload can change it or turn checks on or off), until `stop`.
async fn check_backends(shared: Arc<Shared>, stop: CancellationToken) {
    /// How often a disabled check looks whether a reload turned it on.
    const OFF_POLL: Duration = Duration::from_secs(1);
    let mut streaks = CheckStreaks::default();
    loop {
        let interval = shared.timeouts.load().check_interval;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval.unwrap_or(OFF_POLL)) => {}
        }
        shared.holds.forget_stale();
        if let Some(interval) = interval {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.check_all(interval, &mut streaks) => {}
            }
        }
    }
}

impl Manager {
    /// Applies what reloads without touching listeners: timeouts, backends and weights.
    fn apply_live(&mut self, cfg: &ProxyConfig) {
        self.shared.timeouts.store(Arc::new(cfg.timeouts.clone()));
        self.shared.set_backends(cfg);
        self.shared.picker.on_config(cfg);
    }

    /// Binds `cfg` on every worker and starts its accept loops.
    fn add_listener(&mut self, cfg: &ListenerConfig) -> std::io::Result<()> {
        let sockets = self
            .workers
            .iter()
            .map(|_| crate::proxy::listener::bind(cfg, self.backlog, self.keepalive))
            .collect::<std::io::Result<Vec<_>>>()?;
        let inodes: Vec<u64> = sockets.iter().filter_map(|s| handover::inode(s).ok()).collect();
        handover::advise(cfg.listen, &inodes, &cfg.name);
        let state: LiveListener = Arc::new(ArcSwap::new(ListenerState::new(cfg, None)));
        let (close, _) = watch::channel(None);
        let id = self.next_id;
        self.next_id += 1;
        for (w, socket) in self.workers.iter().zip(sockets) {
            match &w.engine {
                Engine::Tokio { handle, .. } => {
                    let fut = crate::proxy::listener::accept_loop(
                        socket,
                        state.clone(),
                        self.shared.clone(),
                        close.subscribe(),
                    );
                    handle.spawn(self.shared.listeners.track_future(fut));
                }
                Engine::Uring(r) => r.send(crate::proxy::uring::Msg::Add {
                    id,
                    socket,
                    state: state.clone(),
                }),
            }
        }
        self.running.push(Running {
            id,
            listen: cfg.listen,
            state,
            close,
            inodes,
        });
        // At 0 from the bind, so the series are there before the listener's address is ever taken (a reload
        // that moves it).
        metrics::gauge!(LISTENER_UNBOUND, "listener" => cfg.name.clone()).set(0.0);
        metrics::counter!(LISTENER_BIND_FAILURES_TOTAL, "listener" => cfg.name.clone()).increment(0);
        Ok(())
    }

    fn reload(&mut self, new: &ProxyConfig) {
        let pending = self.started.restart_pending(new);
        if !pending.is_empty() {
            // Named: the list of every such key, logged whatever changed, left the operator to guess.
            warn!(
                keys = %pending.join(", "),
                "proxy: changed keys that need a restart; the running values stay until then"
            );
        }
        self.apply_live(new);
        crate::proxy::metrics::publish_listeners(&self.listed, &new.listeners);
        let mut retired = Retired::clone(&self.shared.retired.load());
        let configured = |name: &str| new.listeners.iter().any(|l| l.name == name);
        retired.listeners.retain(|name, _| !configured(name));
        for l in self.listed.iter().filter(|l| !configured(&l.name)) {
            retired.listeners.entry(l.name.clone()).or_default();
        }
        for sockets in retired.listeners.values_mut() {
            sockets.retain(|s| s.strong_count() > 0);
        }
        self.listed = new.listeners.clone();
        // By address: a listener whose address is still listed keeps its sockets and, if changed, takes its new
        // settings in place; one whose address is gone stops. Their connections are not touched.
        for r in std::mem::take(&mut self.running) {
            let Some(l) = new.listeners.iter().find(|l| l.listen == r.listen) else {
                let state = r.state.load();
                info!(listener = %state.cfg.name, addr = %r.listen, "proxy listener removed");
                if let Some(sockets) = retired.listeners.get_mut(&state.cfg.name) {
                    // Renamed in place earlier, a socket's name is its state's, not the one it was added with.
                    let open: Arc<dyn std::any::Any + Send + Sync> = r.state.clone();
                    sockets.push(Arc::downgrade(&open));
                }
                self.stop_listener(&r);
                continue;
            };
            let old = r.state.load_full();
            if old.cfg != *l {
                info!(listener = %l.name, addr = %l.listen, "proxy listener changed in place");
                r.state.store(ListenerState::new(l, Some(&old)));
            }
            self.running.push(r);
        }
        self.shared.retired.store(Arc::new(retired));
        let mut unbound = Vec::new();
        for l in &new.listeners {
            if self.running.iter().any(|r| r.listen == l.listen) {
                continue;
            }
            match self.add_listener(l) {
                Ok(()) => info!(listener = %l.name, addr = %l.listen, "proxy listener added"),
                Err(e) => {
                    metrics::counter!(LISTENER_BIND_FAILURES_TOTAL, "listener" => l.name.clone())
                        .increment(1);
                    metrics::gauge!(LISTENER_UNBOUND, "listener" => l.name.clone()).set(1.0);
                    error!(
                        listener = %l.name, addr = %l.listen, error = %e,
                        "cannot bind proxy listener; retrying every second"
                    );
                    unbound.push(l.clone());
                }
            }
        }
        for dropped in (self.unbound.iter()).filter(|o| !unbound.iter().any(|n| n.name == o.name)) {
            metrics::gauge!(LISTENER_UNBOUND, "listener" => dropped.name.clone()).set(0.0);
        }
        self.unbound = unbound;
    }

    /// Tries again to bind the listeners whose address was taken.
    fn retry_unbound(&mut self) {
        for l in std::mem::take(&mut self.unbound) {
            match self.add_listener(&l) {
                Ok(()) => info!(listener = %l.name, addr = %l.listen, "proxy listener bound at last"),
                Err(e) => {
                    debug!(listener = %l.name, addr = %l.listen, error = %e, "proxy listener still cannot bind");
                    self.unbound.push(l);
                }
            }
        }
    }

    /// Closes `r`'s sockets on every worker: at once where another process takes over their clients
    /// ([`crate::proxy::handover`]), else once the clients queued on them are accepted (see
    /// [`xcluster_runtime::net::Closing`]).
    fn stop_listener(&self, r: &Running) {
        let how = Close {
            give_up: Instant::now() + self.grace,
            hand_over: handover::possible(r.listen, &r.inodes),
        };
        if how.hand_over {
            let name = &r.state.load().cfg.name;
            let msg = "proxy listener closing: another process takes over its clients";
            info!(listener = %name, addr = %r.listen, "{msg}");
        }
        r.close.send_replace(Some(how));
        for w in &self.workers {
            if let Engine::Uring(remote) = &w.engine {
                remote.send(crate::proxy::uring::Msg::Remove {
                    id: r.id,
                    how,
                    closing: self.shared.listeners.token(),
                });
            }
        }
    }

    /// Stops accepting, waits for established connections (until `stop`), then ends the workers.
    async fn drain(mut self) {
        for r in std::mem::take(&mut self.running) {
            self.stop_listener(&r);
        }
        let (tracker, listeners) = (self.shared.tracker.clone(), self.shared.listeners.clone());
        tracker.close();
        listeners.close();
        let active = tracker.len();
        if self.shared.stop.is_cancelled() {
            // SIGINT: no grace to wait out, so neither "draining" nor "grace period over" (both were logged,
            // 6 µs apart). Ending the workers below closes what is left.
            if active > 0 {
                info!(
                    connections = active,
                    "proxy stopping: closing proxied connections"
                );
            }
        } else {
            if active > 0 {
                info!(connections = active, "proxy draining established connections");
            }
            tokio::select! {
                // The listeners first: until they are closed they may still accept queued clients.
                _ = async { listeners.wait().await; tracker.wait().await } => {}
                _ = self.shared.stop.cancelled() => {
                    // Ending the workers below closes what is left.
                    warn!(connections = tracker.len(), "grace period over: closing proxied connections");
                }
            }
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in &workers {
                w.finish();
            }
            for w in workers {
                let _ = w.thread.join();
            }
        })
        .await;
        info!("proxy drained");
    }

    /// Ends the workers without waiting (start-up failed).
    fn finish_now(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.stop_listener(&r);
        }
        for w in &self.workers {
            w.finish();
        }
    }
}
