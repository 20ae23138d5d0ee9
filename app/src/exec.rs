//! Runs store calls off the async workers, on tokio's blocking pool, in two lanes of `store_threads` calls
//! each: writes (so at most that many SQLite connections per process wait on the write lock) and reads.
//! Reads have their own lane because writes queue for the one write lock: with one shared bound, a burst of
//! orders held every thread while waiting for the lock, and a catalog read waited behind them (tens of
//! milliseconds for a read that takes a fraction of one). It also measures what the degrade breakers watch:
//! store latency and the store error ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::store::{Store, StoreError};

/// A bounded store call's state: waiting for a thread, running, or given up on by its caller.
const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const GIVEN_UP: u8 = 2;

/// The store executor.
#[derive(Clone)]
pub struct StoreExec {
    store: Arc<dyn Store>,
    writes: Arc<Semaphore>,
    reads: Arc<Semaphore>,
    counters: Arc<Counters>,
    /// Bound on one call, the wait for a store thread included: `None` for a store whose calls are bounded
    /// by themselves (SQLite's busy timeout on a local file).
    call_timeout: Option<Duration>,
    /// Whether a call waiting for a thread counts in [`Self::waiting`]: a request's does; a background
    /// task's ([`Self::background`]) does not.
    counted: bool,
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
            writes: Arc::new(Semaphore::new(threads.max(1))),
            reads: Arc::new(Semaphore::new(threads.max(1))),
            counters: Arc::default(),
            call_timeout: None,
            counted: true,
        }
    }

    /// Answers a call that has not finished within `limit` with a retryable [`StoreError::Busy`] (a write
    /// that began: [`StoreError::Unsettled`]; [`Self::run_to_end`] waits for that one instead). A network
    /// store needs it: a server that stops answering (hung, or its host cut off) holds a query for good
    /// when the client has no timeout of its own, and every request behind it waited with it. The call
    /// itself runs on and keeps its thread, so at most `store_threads` calls per lane are held by such a
    /// server; a write that commits after its caller was answered is a lost answer, which an idempotency key
    /// replays.
    pub fn bounded(mut self, limit: Duration) -> Self {
        self.call_timeout = Some(limit);
        self
    }

    /// The bound on a call's answer ([`Self::bounded`]), if any.
    pub fn call_bound(&self) -> Option<Duration> {
        self.call_timeout
    }

    /// The same store and lanes, with no bound: for a background call whose outcome must not be lost to a
    /// time limit (the sweeper's expiries: given up on, one that committed late left its buyers' gate counts
    /// and sold-out marks in place), and whose wait holds back no request.
    pub fn unbounded(&self) -> Self {
        Self {
            call_timeout: None,
            ..self.clone()
        }
    }

    /// The same store, lanes and bound, for a background task (the sweeper, the outbox and maintenance
    /// workers, the samplers and reconcilers): its calls waiting for a thread are not counted as waiting
    /// requests. Counted, `GET /v1/stats` reported them as `queued` requests (and as many fewer in flight),
    /// and the balancers weighed the instance as busier than its requests made it.
    pub fn background(&self) -> Self {
        Self {
            counted: false,
            ..self.clone()
        }
    }

    /// Requests' calls waiting for a store thread.
    pub fn waiting(&self) -> u32 {
        self.counters.waiting.load(Ordering::Relaxed)
    }

    /// Runs `f`, which may write, against the store on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.lane(&self.writes, true, false, f).await
    }

    /// [`Self::run`], but a write that has begun by the bound is waited for to its end: its outcome is the
    /// caller's, for the give-backs at the gates that follow it (a cancel's, a refund's), where `run`
    /// answers `Unsettled` and the outcome is lost. One still waiting for a thread at the bound is given up
    /// (`Busy`), as with `run`, so calls do not pile up behind a stuck store; counted for the breakers at the
    /// bound, as `run` counts them.
    pub async fn run_to_end<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.lane(&self.writes, true, true, f).await
    }

    /// Runs `f`, which only reads, in the read lane: it never waits behind writers queued for the lock.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.lane(&self.reads, false, false, f).await
    }

    /// Runs `f` on a thread of the lane `permits` guards; `writes`: it may write. Its state ([`QUEUED`],
    /// [`RUNNING`], [`GIVEN_UP`]) tells a call given up on by its bound whether it began: a write that began
    /// may still commit (`Unsettled`), one that had not never begins (`Busy`). `to_end`: one that began is
    /// waited for to its end instead ([`Self::run_to_end`]).
    async fn lane<T, F>(
        &self,
        permits: &Arc<Semaphore>,
        writes: bool,
        to_end: bool,
        f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let state = Arc::new(AtomicU8::new(QUEUED));
        let Some(limit) = self.call_timeout else {
            return self.call(permits, f, state).await;
        };
        let call = self.call(permits, f, state.clone());
        tokio::pin!(call);
        match tokio::time::timeout(limit, &mut call).await {
            Ok(out) => out,
            Err(_) => {
                // An error for the breakers, as a failed call is; counted here alone: the call, which runs on
                // to its end, counts nothing then (it counted once more, and its whole late time landed in a
                // later window, where it could trip the latency breaker after the store had recovered).
                let began = state.swap(GIVEN_UP, Ordering::AcqRel) == RUNNING;
                self.counters.calls.fetch_add(1, Ordering::Relaxed);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "retryable" => "true").increment(1);
                let why = format!("the store did not answer within {} ms", limit.as_millis());
                if to_end && began {
                    return call.await;
                }
                // A write that had begun runs on, and may commit after this answer.
                Err(if writes && began {
                    StoreError::Unsettled(why)
                } else {
                    StoreError::Busy(why)
                })
            }
        }
    }

    async fn call<T, F>(&self, permits: &Arc<Semaphore>, f: F, state: Arc<AtomicU8>) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        /// Counts the call as waiting until it has a thread, or is given up on while it waits.
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let waiting = self.counted.then(|| {
            self.counters.waiting.fetch_add(1, Ordering::Relaxed);
            Waiting(&self.counters.waiting)
        });
        let permit = permits.clone().acquire_owned().await;
        drop(waiting);
        let permit = permit.map_err(|_| StoreError::Internal("store executor closed".into()))?;
        let store = self.store.clone();
        let counters = self.counters.clone();
        let state_after = state.clone();
        let out = tokio::task::spawn_blocking(move || {
            // Given up on while it waited for this thread: its caller was answered, so it is not begun late.
            if (state.compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)).is_err() {
                drop(permit);
                return Err(StoreError::Busy("given up on before it began".into()));
            }
            let start = Instant::now();
            let out = f(store.as_ref());
            if state.load(Ordering::Acquire) != GIVEN_UP {
                counters
                    .busy_us
                    .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                counters.calls.fetch_add(1, Ordering::Relaxed);
                if out.is_err() {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
            out
        })
        .await;
        match out {
            Ok(r) => {
                // One given up on was counted at its bound (`lane`), and its late error is not counted again.
                if let Err(e) = &r
                    && state_after.load(Ordering::Acquire) != GIVEN_UP
                {
                    metrics::counter!(crate::metrics::STORE_ERRORS_TOTAL, "retryable" => if e.is_retryable() { "true" } else { "false" }).increment(1);
                }
                r
            }
            Err(e) => Err(StoreError::Internal(format!("store task failed: {e}"))),
        }
    }

    /// Runs the store's housekeeping ([`Store::maintain`]) on a blocking thread, outside both lanes and the
    /// breakers' figures: a checkpoint's fsync may take 100 ms, which is neither a request waiting nor a
    /// sign that the store fails.
    pub async fn maintain(&self) -> Result<(), StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.maintain())
            .await
            .unwrap_or_else(|e| Err(StoreError::Internal(format!("store task failed: {e}"))))
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

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    /// An executor with one write lane on a fresh SQLite store in `dir`.
    pub(crate) fn one_lane(dir: &std::path::Path) -> StoreExec {
        let store = crate::store::sqlite::SqliteStore::open(&dir.join("x.db"), Duration::from_secs(10), true)
            .unwrap();
        StoreExec::new(Arc::new(store), 1)
    }

    /// Takes `exec`'s one write thread with a call that blocks until the sender is used (or dropped: a test
    /// that fails first lets it go); returns once the call runs.
    async fn hold_the_write_lane(
        exec: &StoreExec,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (entered, started) = tokio::sync::oneshot::channel::<()>();
        let holder = exec.clone();
        let hold = tokio::spawn(async move {
            holder
                .run(move |_| {
                    let _ = entered.send(());
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        started.await.unwrap();
        (release, hold)
    }

    /// With a bound, `run_to_end` waits for a call that began to its end (its outcome, for the give-backs
    /// after it, where `run` answers `Unsettled`) and gives up one still waiting for a thread (`Busy`, and it
    /// never runs), so calls do not pile up behind a stuck store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_run_to_end_answers_its_outcome_and_a_queued_one_never_begins() {
        let dir = tempfile::tempdir().unwrap();
        let exec = one_lane(dir.path()).bounded(Duration::from_millis(100));
        // A store call that runs until the test lets it end, past its bound.
        let slow = || {
            let (end, ends) = std::sync::mpsc::channel::<()>();
            (end, move |_: &dyn crate::store::Store| {
                let _ = ends.recv();
                Ok(7)
            })
        };
        let (end, call) = slow();
        let errors = exec.counters.errors.load(Ordering::Relaxed);
        let to_end = tokio::spawn({
            let exec = exec.clone();
            async move { exec.run_to_end(call).await }
        });
        // Past the bound: the lane counts the call as an error there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while exec.counters.errors.load(Ordering::Relaxed) == errors {
            assert!(std::time::Instant::now() < deadline, "the bound never passed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        end.send(()).unwrap();
        assert_eq!(to_end.await.unwrap().unwrap(), 7);
        let (end, call) = slow();
        assert!(matches!(exec.run(call).await, Err(StoreError::Unsettled(_))));
        end.send(()).unwrap();
        // That call keeps the one thread until it ends: waited for with no bound.
        exec.unbounded().run(|_| Ok(())).await.unwrap();

        let (release, held) = hold_the_write_lane(&exec).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let marks = ran.clone();
        let queued = exec
            .run_to_end(move |_| {
                marks.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(matches!(queued, Err(StoreError::Busy(_))), "{queued:?}");
        release.send(()).unwrap();
        let _ = held.await.unwrap();
        // Once the held call has let the thread go (waited for with no bound), nothing queued is left.
        exec.unbounded().run(|_| Ok(())).await.unwrap();
        assert!(!ran.load(Ordering::SeqCst), "the call given up on ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_does_not_wait_behind_writes_that_hold_every_write_slot() {
        let dir = tempfile::tempdir().unwrap();
        let exec = one_lane(dir.path());
        // The one write slot is taken by a call that blocks until told to finish.
        let (release, write) = hold_the_write_lane(&exec).await;
        // A second write has to wait for that slot...
        let queued = tokio::spawn({
            let exec = exec.clone();
            async move { exec.run(|_| Ok(())).await }
        });
        // ...but a read has its own lane and answers while the write slot is still held.
        let read = tokio::time::timeout(Duration::from_secs(10), exec.read(|s| s.list_products(0, 5)))
            .await
            .expect("the read waited behind the held write")
            .unwrap();
        assert!(!read.is_empty());
        assert!(
            !queued.is_finished(),
            "the second write should still be waiting for the slot"
        );
        release.send(()).unwrap();
        write.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
    }

    /// A background task's call waiting for a thread is not a waiting request; a request's is. (On one
    /// thread: both calls have begun to wait once the test's first sleep lets them run.)
    #[tokio::test]
    async fn only_requests_count_as_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let exec = one_lane(dir.path());
        let (release, hold) = hold_the_write_lane(&exec).await;
        let until = |n: u32| {
            let exec = exec.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while exec.waiting() != n {
                    assert!(
                        Instant::now() < deadline,
                        "waiting stayed {} (not {n})",
                        exec.waiting()
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let background = tokio::spawn({
            let exec = exec.background();
            async move { exec.run(|_| Ok(())).await }
        });
        let request = tokio::spawn({
            let exec = exec.clone();
            async move { exec.run(|_| Ok(())).await }
        });
        until(1).await;
        // Both wait for the one thread; only the request is counted.
        assert!(!background.is_finished() && !request.is_finished());
        assert_eq!(exec.waiting(), 1);
        release.send(()).unwrap();
        hold.await.unwrap().unwrap();
        background.await.unwrap().unwrap();
        request.await.unwrap().unwrap();
        until(0).await;
    }
}
