//! The status snapshot the supervisor publishes after every change (a `watch` value, so API readers never
//! lock the supervisor), and the commands the API sends it.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::child::Outputs;
use crate::config::Config;
use crate::machine::State;

/// A probe's latest result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProbeStatus {
    pub ok: bool,
    pub detail: String,
    /// Failures in a row.
    pub failures: u32,
}

/// One process, as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcStatus {
    pub name: String,
    pub group: String,
    pub state: State,
    pub pid: Option<u32>,
    /// When the current process was spawned (ms since the Unix epoch); the API derives `uptime_ms`.
    pub started_unix_ms: Option<u64>,
    pub uptime_ms: Option<u64>,
    pub restarts: u64,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// The last exit's code is in `exitcodes`: an EXITED program ended as it should (a one-shot task), which
    /// `ctl start` answers as started rather than as an abnormal termination.
    pub exit_expected: bool,
    /// Ready for dependents: RUNNING and (no readiness probe, or it passes).
    pub ready: bool,
    pub liveness: Option<ProbeStatus>,
    pub readiness: Option<ProbeStatus>,
    pub fatal_reason: Option<String>,
    /// While FATAL, why in words: the spawn error or last exit, and the tries it took
    /// ([`crate::machine::Machine::fatal_message`]); what `ctl start` and a roll answer.
    pub fatal_message: Option<String>,
    pub spawn_error: Option<String>,
    /// Dependencies a pending start waits for.
    pub waiting_for: Vec<String>,
    pub command: Vec<String>,
    /// Its process runs with the settings of an older config: an update left the new ones pending (a
    /// rolling update the roll has not reached, or stopped before); its next start applies them.
    pub update_pending: bool,
    /// Its section changed (or went) in a saved config that waits for `ctl update` (`auto_update = false`).
    pub change_waiting: bool,
    #[serde(skip)]
    pub stdout_log: Option<PathBuf>,
    #[serde(skip)]
    pub stderr_log: Option<PathBuf>,
    /// `redirect_stderr`: its stderr is in its stdout log.
    #[serde(skip)]
    pub stderr_redirected: bool,
    #[serde(skip)]
    pub outputs: Outputs,
}

/// Everything the API reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub programs: Vec<ProcStatus>,
    pub shutting_down: bool,
    /// The rolling restart under way, or the last one.
    pub roll: Option<crate::roll::RollStatus>,
    /// The rolls before it, oldest first.
    #[serde(serialize_with = "shared")]
    pub past_rolls: Arc<Vec<crate::roll::RollStatus>>,
    /// What the config saved last would change, held for `ctl update` (`auto_update = false`).
    pub pending: Option<Plan>,
    /// `[groups.*]` of the config in force: each named group's programs (shared with it, not copied).
    #[serde(serialize_with = "shared")]
    pub groups: Arc<crate::select::Groups>,
}

fn shared<S: serde::Serializer, T: Serialize>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(v, s)
}

/// What the API can ask of the supervisor.
#[derive(Debug)]
pub enum Command {
    Start(Vec<String>),
    Stop(Vec<String>),
    Restart(Vec<String>),
    Signal(Vec<String>, nix::sys::signal::Signal),
    /// Empty the programs' log files and remove their rotated backups (supervisorctl's `clear`).
    Clear(Vec<String>),
    /// Restart the programs one at a time, each within the limit ([`crate::roll`]).
    Roll(Vec<String>, std::time::Duration),
    /// Compute the plan for a config without applying it (`reread`).
    Plan(Arc<Config>),
    /// Apply a config, touching only what changed (`update`); with a limit, the changed programs that run
    /// are restarted one at a time, as a roll with that limit does (`update --rolling`); with names
    /// (`update NAME...`), only those programs' changes, or only their additions or removals (`add`,
    /// `remove`).
    Update(
        Arc<Config>,
        Option<std::time::Duration>,
        Vec<String>,
        Option<Only>,
    ),
    /// Every program of the running set and of a config (`avail`).
    Avail(Arc<Config>),
    Shutdown,
}

/// The one kind of change a named update applies: supervisorctl's `add` (programs new in the saved config)
/// and `remove` (programs gone from it), where `update NAME` applies any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    Added,
    Removed,
}

/// One program of `ctl avail` (supervisorctl's): supervised now, only in the saved file, or both.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Avail {
    pub name: String,
    pub group: String,
    /// Supervised now; `false`: only in the saved file, until `ctl update` adds it.
    pub in_use: bool,
    /// The file's `autostart` (the running spec's for a program the file no longer has).
    pub autostart: bool,
    pub priority: i32,
    /// What `ctl update` would do to it: `added`, `changed` or `removed`; absent: nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<&'static str>,
}

/// The outcome for one process of a start/stop/restart/signal.
#[derive(Debug, Clone, Serialize)]
pub struct ActionResult {
    pub name: String,
    pub ok: bool,
    pub state: State,
    pub message: String,
    /// Not done because it was already done: a `start` of a program running ([`ALREADY_STARTED`]) or a `stop`
    /// of one stopped ([`NOT_RUNNING`]). `ok` is false, as supervisorctl answers `ERROR (already started)`, but
    /// like supervisorctl `ctl` does not fail for it, so scripts may start or stop idempotently.
    pub already: bool,
}

/// A `start`'s answer for a program that already runs (or is starting).
pub const ALREADY_STARTED: &str = "already started";
/// A `stop`'s (or `signal`'s) answer for a program without a process.
pub const NOT_RUNNING: &str = "not running";
/// A `start`'s or `restart`'s answer for a program an update removed that is still stopping (it answered
/// `starting once stopped`, and was then dropped), and what a roll says of one removed before it came back.
pub const REMOVED: &str = "removed from the config";

/// A program that came up and then exited for good (no autorestart), as
/// `ctl start` and a roll answer it: supervisorctl's words, and how it ended.
pub fn abnormal_termination(exit: Option<crate::policy::ExitInfo>) -> String {
    match exit {
        Some(e) => format!("abnormal termination: {e}"),
        None => "abnormal termination".into(),
    }
}

/// What an update changes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// The roll an `update --rolling` began over the changed programs that run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roll: Option<crate::roll::RollStatus>,
    /// Of the names an `add` or `remove` was given, those with nothing of that kind to apply (supervisorctl
    /// answers `ERROR (already active)` for each): said, not silently passed over beside the others.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// A command's answer.
#[derive(Debug)]
pub enum Reply {
    Results(Vec<ActionResult>),
    Plan(Plan),
    /// A rolling restart just begun.
    Roll(Option<crate::roll::RollStatus>),
    Avail(Vec<Avail>),
    Done,
}

/// Why a command was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("no such process or group: {0}")]
    Unknown(String),
    #[error("no process named; use a name, group:*, or all")]
    NoNames,
    #[error("the monitor is shutting down")]
    ShuttingDown,
    #[error("a rolling restart is under way ({0} restarting)")]
    Rolling(String),
    /// A named update that would leave a program without its dependency (or apply names a full reload
    /// would apply anyway).
    #[error("{0}")]
    Partial(String),
}

pub type Request = (Command, oneshot::Sender<Result<Reply, CommandError>>);
