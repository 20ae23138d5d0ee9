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
use crate::placing::Hold;
use crate::store::{Created, StoreError};

/// Most orders in one group commit.
pub const MAX_BATCH: usize = 256;

/// The answer a queued order gets.
pub type OrderOutcome = Result<Result<Created, Reject>, StoreError>;

struct Job {
    order: NewOrder,
    reply: oneshot::Sender<OrderOutcome>,
    /// A keyed flash-sale attempt's place in `Placing`, let go when the group's store call ends.
    hold: Option<Hold>,
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

    /// Queues an order and waits for its commit; `hold` is let go when its group's store call ends.
    pub async fn submit(&self, order: NewOrder, hold: Option<Hold>) -> OrderOutcome {
        let (reply, rx) = oneshot::channel();
        // Counted once it has its place, in the same poll as the send: counted before, a caller dropped while
        // it waited for a place (its client gone) was never taken off, and the instance reported that order
        // queued for good, weighted as loaded by every balancer.
        let Ok(place) = self.tx.reserve().await else {
            return Err(StoreError::Busy("order queue closed (shutting down)".into()));
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        place.send(Job { order, reply, hold });
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
        // Into the call, which may run on after it is given up on (and commit): held as long as it runs.
        let holds: Vec<Hold> = jobs.iter_mut().filter_map(|j| j.hold.take()).collect();
        let result = exec
            .run(move |s| {
                let _holds = holds;
                s.create_orders(&orders, false)
            })
            .await;
        match result {
            Ok(outcomes) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                // Nothing of the group committed, or (`Unsettled`, given up on while it ran) it may yet: every
                // caller gets the same error; a keyed order's retry replays, and an unkeyed flash-sale attempt's
                // handler answers `outcome_unknown`.
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::future::Future;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use super::*;
    use crate::domain::OrderKind;

    fn order(user: &str) -> NewOrder {
        let key = format!("{user}-key");
        crate::store::tests::order(user, Some(&key), OrderKind::Regular, "no-such-sku", 1, 60_000)
    }

    /// Polls `done` until it holds, 10 s at most.
    async fn until(done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// An order whose caller goes away while it waits for a place in the queue (its client gone) leaves no
    /// count behind: counted before it had a place, it was never taken off, and the instance reported it
    /// queued for good.
    #[tokio::test]
    async fn a_caller_gone_before_its_order_had_a_place_leaves_no_count() {
        let dir = tempfile::tempdir().unwrap();
        let exec = crate::exec::tests::one_lane(dir.path());
        // The only write lane held, so the committer waits with the first order and the next fills the queue.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let exec = exec.clone();
            async move { exec.run(move |_| Ok(held.recv().ok())).await }
        });
        let batcher = Arc::new(Batcher::spawn(exec.clone(), 1, CancellationToken::new()));
        let submit = |user: &'static str| {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(order(user), None).await })
        };
        let first = submit("a");
        until(|| exec.waiting() == 1).await;
        let second = submit("b");
        until(|| batcher.tx.capacity() == 0).await;
        // A third, polled once while the queue is full, then dropped.
        let mut third = Box::pin(batcher.submit(order("c"), None));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(third.as_mut().poll(&mut cx), Poll::Pending));
        drop(third);
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for done in [first, second] {
            let _ = done.await.unwrap();
        }
        assert_eq!(batcher.queued(), 0);
    }

    /// A keyed attempt's place in `Placing` lasts as long as its group's store call, not its caller's wait:
    /// one given up on while it ran (`Unsettled`) may still commit, and a retry a gate refuses meanwhile
    /// must find it held, not be told `sold_out`.
    #[tokio::test]
    async fn an_attempt_given_up_on_while_it_runs_stays_placing_until_its_call_ends() {
        let dir = tempfile::tempdir().unwrap();
        let exec = crate::exec::tests::one_lane(dir.path()).bounded(Duration::from_millis(300));
        // Another process holds SQLite's write lock: the group's transaction waits for it (busy timeout).
        let other = rusqlite::Connection::open(dir.path().join("x.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let batcher = Batcher::spawn(exec, 8, CancellationToken::new());
        let placing = Arc::new(crate::placing::Placing::default());
        let hold = crate::placing::Placing::hold(&placing, "a", Some("a-key"));
        let out = batcher.submit(order("a"), hold).await;
        assert!(matches!(out, Err(StoreError::Unsettled(_))), "{out:?}");
        assert!(placing.holds("a", "a-key"), "let go while its call runs on");
        other.execute_batch("ROLLBACK").unwrap();
        until(|| !placing.holds("a", "a-key")).await;
    }
}
