//! The monitor's metric names, and recording them from a status snapshot. Labels are bounded: `program` takes
//! only names from the config.

use crate::machine::State;
use crate::status::Snapshot;

/// 1 while the process is RUNNING.
pub const PROGRAM_UP: &str = "xcluster_monitor_program_up";
/// The state as a number: 0 STOPPED, 1 STARTING, 2 RUNNING, 3 BACKOFF, 4 STOPPING, 5 EXITED, 6 FATAL.
pub const PROGRAM_STATE: &str = "xcluster_monitor_program_state";
/// Restarts since the monitor started.
pub const PROGRAM_RESTARTS_TOTAL: &str = "xcluster_monitor_program_restarts_total";
/// 1 while the process passes its readiness (or is RUNNING without one).
pub const PROGRAM_READY: &str = "xcluster_monitor_program_ready";
/// Supervised processes.
pub const PROGRAMS: &str = "xcluster_monitor_programs";

pub(crate) fn record(s: &Snapshot) {
    metrics::gauge!(PROGRAMS).set(s.programs.len() as f64);
    for p in &s.programs {
        let l = [("program", p.name.clone())];
        metrics::gauge!(PROGRAM_UP, &l).set(if p.state == State::Running { 1.0 } else { 0.0 });
        metrics::gauge!(PROGRAM_STATE, &l).set(f64::from(p.state.code()));
        metrics::gauge!(PROGRAM_READY, &l).set(if p.ready { 1.0 } else { 0.0 });
        metrics::counter!(PROGRAM_RESTARTS_TOTAL, &l).absolute(p.restarts);
    }
}
