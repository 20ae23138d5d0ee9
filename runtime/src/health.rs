//! Liveness and readiness shared between a role and its admin endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Where a daemon is in its life: `/readyz` answers 200 only in `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Ready = 1,
    Draining = 2,
}

/// A cheap, cloneable readiness flag.
#[derive(Debug, Clone)]
pub struct Health {
    phase: Arc<AtomicU8>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            phase: Arc::new(AtomicU8::new(Phase::Starting as u8)),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Marks the daemon ready, unless it is already draining (draining is final).
    pub fn set_ready(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        metrics::gauge!(crate::metrics::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }

    pub fn set_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Release);
        metrics::gauge!(crate::metrics::READY).set(0.0);
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }
}
