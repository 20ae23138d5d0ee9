//! Runs store calls off the async workers: a semaphore bounds them to `store_threads` (so at most that many
//! SQLite connections per process wait on the write lock), and each call runs on tokio's blocking pool. It
//! also measures what the degrade breakers watch: store latency and the store error ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::store::{Store, StoreError};

/// The store executor.
#[derive(Clone)]
pub struct StoreExec {
    store: Arc<dyn Store>,
    permits: Arc<Semaphore>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for StoreExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreExec")
            .field("waiting", &self.waiting())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Counters {
    waiting: AtomicU32,
    calls: AtomicU64,
    errors: AtomicU64,
    busy_us: AtomicU64,
}

/// Store figures since the previous sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecSample {
    pub calls: u64,
    pub errors: u64,
    pub mean_us: u64,
}

impl StoreExec {
    pub fn new(store: Arc<dyn Store>, threads: usize) -> Self {
        Self {
            store,
            permits: Arc::new(Semaphore::new(threads.max(1))),
            counters: Arc::default(),
        }
    }

    /// Calls waiting for a store thread.
    pub fn waiting(&self) -> u32 {
        self.counters.waiting.load(Ordering::Relaxed)
    }

    /// Runs `f` against the store on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.counters.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = self.permits.clone().acquire_owned().await;
        self.counters.waiting.fetch_sub(1, Ordering::Relaxed);
        let permit = permit.map_err(|_| StoreError::Internal("store executor closed".into()))?;
        let store = self.store.clone();
        let counters = self.counters.clone();
        let out = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let out = f(store.as_ref());
            counters
                .busy_us
                .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
            counters.calls.fetch_add(1, Ordering::Relaxed);
            if out.is_err() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            out
        })
        .await;
        match out {
            Ok(r) => {
                if let Err(e) = &r {
                    metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "retryable" => if e.is_retryable() { "true" } else { "false" }).increment(1);
                }
                r
            }
            Err(e) => Err(StoreError::Internal(format!("store task failed: {e}"))),
        }
    }

    /// Takes (and resets) the figures since the last call.
    pub fn sample(&self) -> ExecSample {
        let calls = self.counters.calls.swap(0, Ordering::Relaxed);
        let errors = self.counters.errors.swap(0, Ordering::Relaxed);
        let busy = self.counters.busy_us.swap(0, Ordering::Relaxed);
        ExecSample {
            calls,
            errors,
            mean_us: busy.checked_div(calls).unwrap_or(0),
        }
    }
}
