//! Liveness and readiness shared between a role and its admin endpoints.

use std::sync::Arc;

use tokio::sync::watch;

/// Where a daemon is in its life: `/readyz` answers 200 only in `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

/// A cheap, cloneable readiness flag. A `watch` so the daemon can tell the service manager of each change
/// (`sdnotify`) as it happens, wherever the role makes it.
#[derive(Debug, Clone)]
pub struct Health {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            phase: Arc::new(watch::Sender::new(Phase::Starting)),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Follows the phase's changes.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Marks the daemon ready, unless it is already draining (draining is final).
    pub fn set_ready(&self) {
        self.phase.send_if_modified(|p| {
            let starting = *p == Phase::Starting;
            if starting {
                *p = Phase::Ready;
            }
            starting
        });
        metrics::gauge!(crate::metrics::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }

    pub fn set_draining(&self) {
        self.phase
            .send_if_modified(|p| std::mem::replace(p, Phase::Draining) != Phase::Draining);
        metrics::gauge!(crate::metrics::READY).set(0.0);
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }
}
