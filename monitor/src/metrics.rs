//! The monitor's metric names, and recording them from a status snapshot. Labels are bounded: `program` takes
//! only names from the config.

use std::sync::Arc;

use tokio::sync::watch;
use xcluster_runtime::telemetry::{Exposition, Kind, set_collector};

use crate::machine::State;
use crate::status::{ProcStatus, Snapshot};

xcluster_runtime::metric_names! {
    /// 1 while the process is RUNNING.
    pub const PROGRAM_UP: &str = "xcluster_monitor_program_up";
    /// The state as a number: 0 STOPPED, 1 STARTING, 2 RUNNING, 3 BACKOFF, 4 STOPPING, 5 EXITED, 6 FATAL.
    pub const PROGRAM_STATE: &str = "xcluster_monitor_program_state";
    /// Restarts the monitor made by itself since it started (a crash, BACKOFF, a FATAL retry); not those asked for.
    pub const PROGRAM_RESTARTS_TOTAL: &str = "xcluster_monitor_program_restarts_total";
    /// 1 while the process passes its readiness (or is RUNNING without one).
    pub const PROGRAM_READY: &str = "xcluster_monitor_program_ready";
    /// Supervised processes.
    pub const PROGRAMS: &str = "xcluster_monitor_programs";
    /// Orphaned processes reaped while the monitor runs as PID 1 (a container's entrypoint).
    pub const ORPHANS_REAPED_TOTAL: &str = "xcluster_monitor_orphans_reaped_total";
}

/// Installs the collector that writes these series from the latest status at each scrape, so a program a
/// reload removed leaves `/metrics` with it.
pub(crate) fn collect_from(status: watch::Receiver<Arc<Snapshot>>) {
    set_collector(
        "monitor_programs",
        Arc::new(move |out: &mut Exposition| write(&status.borrow(), out)),
    );
}

fn write(s: &Snapshot, out: &mut Exposition) {
    out.family(PROGRAMS, Kind::Gauge);
    out.sample(PROGRAMS, &[], s.programs.len() as f64);
    fn flag(on: bool) -> f64 {
        if on { 1.0 } else { 0.0 }
    }
    type Family = (&'static str, Kind, fn(&ProcStatus) -> f64);
    let families: [Family; 4] = [
        (PROGRAM_UP, Kind::Gauge, |p| flag(p.state == State::Running)),
        (PROGRAM_STATE, Kind::Gauge, |p| f64::from(p.state.code())),
        (PROGRAM_READY, Kind::Gauge, |p| flag(p.ready)),
        (PROGRAM_RESTARTS_TOTAL, Kind::Counter, |p| p.restarts as f64),
    ];
    for (name, kind, value) in families {
        out.family(name, kind);
        for p in &s.programs {
            out.sample(name, &[("program", &p.name)], value(p));
        }
    }
}
