//! The proxy service: worker threads, the set of running listeners, live reload, and drain.
//!
//! A manager task on the lb's main runtime owns the listener set. Connections never run there: they run on
//! the worker runtimes, either one current-thread runtime per core with its own SO_REUSEPORT socket per
//! listener (`per_core`: a connection's two sockets stay on one thread, no cross-thread wakeups), or one
//! multi-thread runtime sharing one socket per listener (`shared`). Removing a listener only stops its
//! accept loops; its established connections are separate tasks and run on until they end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::config::{Forwarding, ListenerConfig, ProxyConfig, RuntimeMode, Timeouts};
use super::metrics::{BackendMetrics, LISTENER_BIND_FAILURES_TOTAL, ListenerMetrics};
use super::pick::BackendPicker;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("proxy listener {name:?} cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start proxy worker threads: {0}")]
    Workers(std::io::Error),
}

/// What every connection reads; fields that reload live are snapshots.
#[derive(Debug)]
pub struct Shared {
    pub picker: Arc<dyn BackendPicker>,
    pub timeouts: ArcSwap<Timeouts>,
    pub forwarding: Forwarding,
    backends: ArcSwap<HashMap<SocketAddr, Arc<BackendMetrics>>>,
    pub permits: Arc<Semaphore>,
    pub tracker: TaskTracker,
    /// Fires when established connections must be abandoned (end of the drain grace period).
    pub stop: CancellationToken,
}

impl Shared {
    /// Metric handles of `addr`, cached for configured backends.
    pub fn backend_metrics(&self, addr: SocketAddr) -> Arc<BackendMetrics> {
        self.backends
            .load()
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| Arc::new(BackendMetrics::new(addr)))
    }
}

#[cfg(test)]
impl Shared {
    pub fn for_tests(cfg: &ProxyConfig) -> Self {
        Self {
            picker: Arc::new(super::pick::StaticPicker::new(cfg)),
            timeouts: ArcSwap::from_pointee(cfg.timeouts.clone()),
            forwarding: cfg.forwarding,
            backends: ArcSwap::from_pointee(HashMap::new()),
            permits: Arc::new(Semaphore::new(1)),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }
}

/// One listener as its accept loops and connections see it.
#[derive(Debug)]
pub struct ListenerState {
    pub cfg: ListenerConfig,
    pub metrics: ListenerMetrics,
}

struct Worker {
    handle: tokio::runtime::Handle,
    finish: CancellationToken,
    thread: std::thread::JoinHandle<()>,
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
        handle,
        finish,
        thread,
    })
}

fn spawn_workers(cfg: &ProxyConfig) -> std::io::Result<Vec<Worker>> {
    match cfg.runtime {
        RuntimeMode::PerCore => (0..cfg.workers)
            .map(|i| {
                spawn_worker(
                    format!("lb-proxy-{i}"),
                    tokio::runtime::Builder::new_current_thread(),
                )
            })
            .collect(),
        RuntimeMode::Shared => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(cfg.workers).thread_name("lb-proxy");
            Ok(vec![spawn_worker("lb-proxy-main".into(), b)?])
        }
    }
}

struct Running {
    cfg: ListenerConfig,
    cancel: CancellationToken,
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
    backlog: i32,
    keepalive: Option<Duration>,
    started: ProxyConfig,
}

/// Starts the workers and the listeners of the current config, and follows config reloads.
/// `drain` stops accepting; `stop` abandons established connections.
pub fn start(
    mut config: watch::Receiver<Arc<crate::Config>>,
    picker: Arc<dyn BackendPicker>,
    drain: &CancellationToken,
    stop: CancellationToken,
) -> Result<ProxyHandle, Error> {
    let cfg = config.borrow_and_update().proxy.clone();
    let workers = spawn_workers(&cfg).map_err(Error::Workers)?;
    let shared = Arc::new(Shared {
        picker,
        timeouts: ArcSwap::from_pointee(cfg.timeouts.clone()),
        forwarding: cfg.forwarding,
        backends: ArcSwap::from_pointee(HashMap::new()),
        permits: Arc::new(Semaphore::new(cfg.max_connections)),
        tracker: TaskTracker::new(),
        stop,
    });
    let mut m = Manager {
        shared,
        workers,
        running: Vec::new(),
        backlog: cfg.backlog,
        keepalive: cfg.keepalive,
        started: cfg.clone(),
    };
    m.apply_live(&cfg);
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
        runtime = ?cfg.runtime,
        forwarding = ?cfg.forwarding,
        "proxy started"
    );
    let drain = drain.child_token();
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
                    let new = config.borrow_and_update().proxy.clone();
                    m.reload(&new);
                }
            }
        }
        m.drain().await;
    });
    Ok(ProxyHandle { drain, task })
}

impl Manager {
    /// Applies what reloads without touching listeners: timeouts, backends and weights.
    fn apply_live(&mut self, cfg: &ProxyConfig) {
        self.shared.timeouts.store(Arc::new(cfg.timeouts.clone()));
        let map = cfg
            .backends
            .iter()
            .map(|b| (b.addr, Arc::new(BackendMetrics::new(b.addr))))
            .collect();
        self.shared.backends.store(Arc::new(map));
        self.shared.picker.on_config(cfg);
    }

    /// Binds `cfg` on every worker and starts its accept loops.
    fn add_listener(&mut self, cfg: &ListenerConfig) -> std::io::Result<()> {
        let sockets = self
            .workers
            .iter()
            .map(|_| super::listener::bind(cfg, self.backlog, self.keepalive))
            .collect::<std::io::Result<Vec<_>>>()?;
        let state = Arc::new(ListenerState {
            cfg: cfg.clone(),
            metrics: ListenerMetrics::new(&cfg.name),
        });
        let cancel = CancellationToken::new();
        for (w, sock) in self.workers.iter().zip(sockets) {
            let fut = super::listener::accept_loop(sock, state.clone(), self.shared.clone(), cancel.clone());
            w.handle.spawn(fut);
        }
        self.running.push(Running {
            cfg: cfg.clone(),
            cancel,
        });
        Ok(())
    }

    fn reload(&mut self, new: &ProxyConfig) {
        let restart_only = new.workers != self.started.workers
            || new.runtime != self.started.runtime
            || new.forwarding != self.started.forwarding
            || new.max_connections != self.started.max_connections
            || new.backlog != self.started.backlog
            || new.keepalive != self.started.keepalive;
        if restart_only {
            warn!(
                "proxy: workers, runtime, forwarding, max_connections, backlog and keepalive_ms need a restart"
            );
        }
        self.apply_live(new);
        // Stop listeners that are gone or changed; their connections are not touched.
        self.running.retain(|r| {
            let keep = new.listeners.contains(&r.cfg);
            if !keep {
                info!(listener = %r.cfg.name, addr = %r.cfg.listen, "proxy listener removed");
                r.cancel.cancel();
            }
            keep
        });
        for l in &new.listeners {
            if self.running.iter().any(|r| &r.cfg == l) {
                continue;
            }
            match self.add_listener(l) {
                Ok(()) => info!(listener = %l.name, addr = %l.listen, "proxy listener added"),
                Err(e) => {
                    metrics::counter!(LISTENER_BIND_FAILURES_TOTAL, "listener" => l.name.clone())
                        .increment(1);
                    error!(listener = %l.name, addr = %l.listen, error = %e, "cannot bind proxy listener");
                }
            }
        }
    }

    /// Stops accepting, waits for established connections (until `stop`), then ends the workers.
    async fn drain(mut self) {
        for r in self.running.drain(..) {
            r.cancel.cancel();
        }
        let tracker = self.shared.tracker.clone();
        tracker.close();
        let active = tracker.len();
        if active > 0 {
            info!(connections = active, "proxy draining established connections");
        }
        tokio::select! {
            _ = tracker.wait() => {}
            _ = self.shared.stop.cancelled() => {
                warn!(connections = tracker.len(), "grace period over: closing proxied connections");
                // Connections watch `stop` and end at once; bound the wait anyway.
                let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
            }
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                w.finish.cancel();
                let _ = w.thread.join();
            }
        })
        .await;
        info!("proxy drained");
    }

    /// Ends the workers without waiting (start-up failed).
    fn finish_now(&mut self) {
        for r in self.running.drain(..) {
            r.cancel.cancel();
        }
        for w in &self.workers {
            w.finish.cancel();
        }
    }
}
