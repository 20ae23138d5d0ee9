//! Asynchronous order queuing. At the queued levels an order request joins an in-process queue; one
//! committer takes everything waiting (up to `MAX_BATCH`) and creates those orders in ONE store transaction
//! (one fsync for the group; each order with its stock, order row and outbox row or nothing: a savepoint per
//! order on SQLite, decisions taken under the group's locks before any write on PostgreSQL). Each caller is
//! answered only after that commit: the queue changes how many orders share a commit, never whether an
//! acknowledged order is durable. Follow-up work goes through the durable outbox (`workers`).

pub mod workers;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::{NewOrder, Reject};
use crate::exec::StoreExec;
use crate::store::{Created, StoreError};

/// Most orders in one group commit.
pub const MAX_BATCH: usize = 256;

/// The answer a queued order gets.
pub type OrderOutcome = Result<Result<Created, Reject>, StoreError>;

struct Job {
    order: NewOrder,
    reply: oneshot::Sender<OrderOutcome>,
}

/// The handle requests submit to.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicU32>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("queued", &self.queued()).finish()
    }
}

impl Batcher {
    /// Starts the committer; it stops when `cancel` fires and every sender is gone.
    pub fn spawn(exec: StoreExec, bound: usize, cancel: CancellationToken) -> Batcher {
        let (tx, rx) = mpsc::channel(bound.max(1));
        let queued = Arc::new(AtomicU32::new(0));
        tokio::spawn(commit_loop(exec, rx, queued.clone(), cancel));
        Batcher { tx, queued }
    }

    /// Orders waiting for a group commit.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues an order and waits for its commit.
    pub async fn submit(&self, order: NewOrder) -> OrderOutcome {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Job { order, reply }).await.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(StoreError::Busy("order queue closed (shutting down)".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Internal("order committer stopped".into())))
    }
}

async fn commit_loop(
    exec: StoreExec,
    mut rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicU32>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            j = rx.recv() => match j { Some(j) => j, None => return },
            _ = cancel.cancelled() => {
                rx.close();
                match rx.recv().await { Some(j) => j, None => return }
            }
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        queued.fetch_sub(jobs.len() as u32, Ordering::Relaxed);
        metrics::histogram!(crate::metrics::BATCH_SIZE).record(jobs.len() as f64);
        let orders: Vec<NewOrder> = jobs.iter().map(|j| j.order.clone()).collect();
        let result = exec.run(move |s| s.create_orders(&orders, false)).await;
        match result {
            Ok(outcomes) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                // Nothing of the group committed: every caller gets the same retryable or internal error.
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
