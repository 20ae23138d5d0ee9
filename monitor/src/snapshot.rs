//! Builds the status snapshot from the supervisor's processes.

use crate::status::{ProcStatus, Snapshot};
use crate::supervisor::Supervisor;

pub(crate) fn build(sup: &Supervisor) -> Snapshot {
    let programs = sup
        .order
        .iter()
        .filter_map(|name| sup.procs.get(name).map(|p| (name, p)))
        .map(|(name, p)| {
            let exit = p.m.last_exit;
            let stdout_log = p.spec.stdout.path.clone();
            let stderr_log = p.spec.stderr.path.clone();
            ProcStatus {
                name: name.clone(),
                group: p.spec.group.clone(),
                state: p.shown_state(),
                pid: (p.pid != 0).then_some(p.pid),
                started_unix_ms: p.started_unix_ms,
                uptime_ms: None,
                restarts: p.m.restart_count,
                exit_code: exit.and_then(|e| e.code),
                exit_signal: exit.and_then(|e| e.signal),
                exit_expected: Supervisor::exit_expected(p),
                ready: Supervisor::is_ready(p),
                liveness: p.liveness.clone(),
                readiness: p.readiness.clone(),
                fatal_reason: p.m.fatal_reason.map(str::to_string),
                fatal_message: p.m.fatal_message(p.spawn_error.as_deref()),
                spawn_error: p.spawn_error.clone(),
                waiting_for: if p.wanted {
                    sup.waiting_for(name)
                } else if p.held.is_some() {
                    sup.stopping_dependents(name)
                } else {
                    Vec::new()
                },
                command: p.spec.argv.clone(),
                update_pending: p.replacement.is_some() && p.m.state.has_process(),
                change_waiting: (sup.pending.as_ref())
                    .is_some_and(|plan| plan.changed.contains(name) || plan.removed.contains(name)),
                stdout_log,
                stderr_log,
                stderr_redirected: p.spec.redirect_stderr,
                outputs: p.outputs.clone(),
            }
        })
        .collect();
    Snapshot {
        programs,
        shutting_down: false,
        roll: sup.roll.as_ref().map(|r| r.status.clone()),
        past_rolls: sup.past_rolls.clone(),
        pending: sup.pending.clone(),
        groups: sup.cfg.groups.clone(),
    }
}
