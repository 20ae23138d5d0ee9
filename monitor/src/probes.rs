//! Runs a process's probes: one task per probe for the life of one spawn, reporting each result to the
//! supervisor, stopped by a cancellation token when the process exits.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::probe::ProbeSpec;
use crate::program::ProcessSpec;
use crate::supervisor::Internal;

/// Starts the probes of `spec` for spawn `spawn_id`; `None` when it has none.
pub(crate) fn start(
    spec: &ProcessSpec,
    spawn_id: u64,
    tx: &mpsc::UnboundedSender<Internal>,
) -> Option<CancellationToken> {
    if spec.liveness.is_none() && spec.readiness.is_none() {
        return None;
    }
    let cancel = CancellationToken::new();
    for (probe, liveness) in [(&spec.liveness, true), (&spec.readiness, false)] {
        if let Some(p) = probe.clone() {
            tokio::spawn(run(
                p,
                spec.name.clone(),
                spawn_id,
                liveness,
                tx.clone(),
                cancel.clone(),
            ));
        }
    }
    Some(cancel)
}

async fn run(
    probe: ProbeSpec,
    name: String,
    spawn_id: u64,
    liveness: bool,
    tx: mpsc::UnboundedSender<Internal>,
    cancel: CancellationToken,
) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(probe.initial_delay) => {}
    }
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe.check() => r,
        };
        if tx
            .send(Internal::Probe {
                name: name.clone(),
                spawn_id,
                liveness,
                result,
            })
            .is_err()
        {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(probe.period) => {}
        }
    }
}
