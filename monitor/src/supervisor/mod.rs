//! The supervisor: one task that owns every process's state machine and performs its actions. Everything that
//! happens reaches it as a message — API commands, child exits (sent by each child's wait task the moment the
//! kernel reports them), timers, probe results, new config snapshots, the shutdown signals — so there is no
//! polling and no lock around the state. After each message it starts what is waiting for its dependencies,
//! publishes a status snapshot, and rewrites the state file when a pid changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::child::{self, Exit, Outputs};
use crate::config::Config;
use crate::events::{Bus, Kind};
use crate::machine::{Action, Event, Machine, State};
use crate::program::ProcessSpec;
use crate::roll::Roll;
use crate::statefile::{Entry, RunDir};
use crate::status::{ProbeStatus, Request, Snapshot};

mod commands;

/// Internal messages: timers and probe results.
#[derive(Debug)]
pub(crate) enum Internal {
    Timer {
        name: String,
        epoch: u64,
        generation: u64,
    },
    Probe {
        name: String,
        spawn_id: u64,
        liveness: bool,
        result: Result<(), String>,
    },
    KillAll,
    /// Nothing to do but look again (a rolling restart's deadline).
    Wake,
}

pub(crate) struct Proc {
    pub spec: Arc<ProcessSpec>,
    pub m: Machine,
    /// Distinguishes this entry from an earlier one of the same name (timers of a removed program).
    pub epoch: u64,
    pub pid: u32,
    pub start_time: u64,
    /// Its output pipes, as the state file records them for a monitor that adopts it.
    pub pipes: child::Pipes,
    /// Its process has been sent the stop signal (see [`child::Spawned::stopping`]).
    pub stopping: Arc<child::StopClock>,
    pub spawn_id: u64,
    pub started_unix_ms: Option<u64>,
    pub probes: Option<CancellationToken>,
    pub liveness: Option<ProbeStatus>,
    pub readiness: Option<ProbeStatus>,
    pub outputs: Outputs,
    /// Start as soon as its dependencies are ready.
    pub wanted: bool,
    /// That start finishes a restart (and counts as one).
    pub wanted_restart: bool,
    /// Removed by an update: dropped once it has no process.
    pub removing: bool,
    /// Added by an update: starts once the processes of its program the update removed are gone
    /// (Supervisord's `update` stops before it adds). Started beside them, a renamed process (`numprocs` 1 to
    /// 2: `web` out, `web-0` in on the same port) failed to bind while the old one stopped, and could reach
    /// FATAL. Other programs' removals hold nothing up: one stuck stopping would have held every addition.
    pub after_removals: bool,
    /// Changed by an update: swapped in once the old process is gone.
    pub replacement: Option<Arc<ProcessSpec>>,
    pub spawn_error: Option<String>,
    /// A stop or restart held back until the dependents the same command stops have stopped.
    pub held: Option<Hold>,
}

impl Proc {
    /// The state users see: a program whose stop is held is already stopping.
    pub fn shown_state(&self) -> State {
        if self.held.is_some() {
            State::Stopping
        } else {
            self.m.state
        }
    }
}

/// What a program waiting on its dependents' stop does once they are down. A command that stops several
/// programs stops dependents first, as the monitor's shutdown does, so none of them loses what it depends on
/// while it still runs; a restart then starts them again in dependency order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    Stop,
    Restart,
}

pub(crate) struct Supervisor {
    pub procs: BTreeMap<String, Proc>,
    /// Process names in start order.
    pub order: Vec<String>,
    pub cfg: Arc<Config>,
    pub bus: Bus,
    run_dir: RunDir,
    internal: mpsc::UnboundedSender<Internal>,
    exits: mpsc::UnboundedSender<Exit>,
    status: watch::Sender<Arc<Snapshot>>,
    next_id: u64,
    shutting_down: bool,
    saved: Vec<Entry>,
    /// The rolling restart under way, or the last one.
    pub(crate) roll: Option<Roll>,
    /// The rolls before it, oldest first (at most [`crate::roll::PAST_ROLLS`]).
    pub(crate) past_rolls: Arc<Vec<crate::roll::RollStatus>>,
    /// What a saved config would change, held for `ctl update` (`auto_update = false`); `None` when nothing
    /// waits.
    pub(crate) pending: Option<crate::status::Plan>,
    /// Each group's stop level, from the config in force ([`crate::program::stop_levels`]).
    stop_levels: std::collections::BTreeMap<String, u32>,
}

/// The channels the supervisor task listens on.
pub(crate) struct Inputs {
    pub commands: mpsc::Receiver<Request>,
    pub config: watch::Receiver<Arc<Config>>,
    pub drain: CancellationToken,
    pub stop: CancellationToken,
}

/// Ends a process a previous monitor left that this one cannot watch: SIGKILL to its group, then a wait (at
/// most 2 s, polling `/proc`) for its leader to be gone, so the copy started in its place does not find it
/// still holding its port. Its stop signal and `stopwaitsecs` are not waited out, as `stop_leftovers` waits
/// them out for the leftovers not adopted: no pidfd will say when it ends, and polling `/proc` for up to
/// `stopwaitsecs` here, as the supervisor starts, would hold the async runtime's thread and the start.
fn end_leftover(pid: u32) {
    let _ = child::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
    // Dead once gone, or a zombie its reaper (not this monitor: it was the old one's child) has yet to reap.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('Z')))
            .is_some_and(|zombie| !zombie)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Supervisor {
    /// Builds the supervisor and its task; the task returns once every process is stopped after shutdown.
    pub fn start(
        cfg: Arc<Config>,
        run_dir: RunDir,
        bus: Bus,
        status: watch::Sender<Arc<Snapshot>>,
        mut inputs: Inputs,
        adopt: Vec<Entry>,
    ) -> tokio::task::JoinHandle<()> {
        let (internal, mut internal_rx) = mpsc::unbounded_channel();
        let (exits, mut exits_rx) = mpsc::unbounded_channel();
        let mut sup = Supervisor {
            procs: BTreeMap::new(),
            order: Vec::new(),
            cfg: cfg.clone(),
            bus,
            run_dir,
            internal,
            exits,
            status,
            next_id: 0,
            shutting_down: false,
            saved: Vec::new(),
            roll: None,
            past_rolls: Arc::default(),
            pending: None,
            stop_levels: crate::program::stop_levels(cfg.processes.iter(), &cfg.group_order),
        };
        sup.update(cfg, None);
        sup.adopt(adopt);
        // A drain or stop that came while the monitor stopped leftovers (a Ctrl-C to `up -d` as it waits for
        // the monitor to be ready): nothing is started, and what was adopted stops. Started first, a program
        // was then left running once the daemon forced the monitor's end.
        let mut hard = inputs.stop.is_cancelled();
        if hard || inputs.drain.is_cancelled() {
            sup.begin_shutdown();
        }
        if hard {
            sup.stop_everything_now();
        }
        // The first snapshot is out before the API reports ready.
        sup.kick();
        sup.publish();
        tokio::spawn(async move {
            loop {
                sup.kick();
                sup.publish();
                if sup.shutting_down && sup.procs.values().all(|p| !p.m.state.has_process()) {
                    info!("every program stopped");
                    return;
                }
                tokio::select! {
                    Some((cmd, reply)) = inputs.commands.recv() => {
                        let r = sup.command(cmd);
                        // Published before the answer, so a client that reads the status right after it (as
                        // `ctl update` then `ctl status` does) sees what the command changed.
                        sup.kick();
                        sup.publish();
                        let _ = reply.send(r);
                    }
                    Some(exit) = exits_rx.recv() => sup.on_exit(exit),
                    Some(msg) = internal_rx.recv() => sup.on_internal(msg),
                    Ok(()) = inputs.config.changed(), if !sup.shutting_down => {
                        let cfg = inputs.config.borrow_and_update().clone();
                        if cfg.auto_update {
                            sup.update(cfg, None);
                        } else {
                            sup.hold(&cfg);
                        }
                    }
                    _ = inputs.drain.cancelled(), if !sup.shutting_down => sup.begin_shutdown(),
                    _ = inputs.stop.cancelled(), if !hard => {
                        hard = true;
                        sup.begin_shutdown();
                        sup.stop_everything_now();
                    }
                }
            }
        })
    }

    /// Takes over processes a previous monitor left running with this config's launch settings: they go to
    /// RUNNING under a pidfd watch and their probes start. One that cannot be watched is killed (its group)
    /// and started afresh, so a program is never left running unsupervised beside a new copy.
    fn adopt(&mut self, entries: Vec<Entry>) {
        let mut adopted = Vec::new();
        for e in entries {
            let Some(p) = self.procs.get_mut(&e.name) else {
                continue;
            };
            let pid = u32::try_from(e.pid).unwrap_or(0);
            self.next_id += 1;
            let spawn_id = self.next_id;
            let stopping = Arc::new(child::StopClock::default());
            let ending = child::Ending {
                stopping: stopping.clone(),
                stopwait: p.spec.policy.stopwait,
                stopsignal: p.spec.stopsignal,
                mark: None,
            };
            let fd = match crate::statefile::open_pidfd(&e) {
                Ok(fd) => fd,
                // Still there, but no pidfd for it (a kernel without `pidfd_open`, a seccomp profile that
                // refuses it, no descriptor left): it cannot be watched, so it goes, as below. Taken for
                // gone, it ran on unsupervised beside the new copy, which took its place in the state file.
                Err(err)
                    if err.raw_os_error() != Some(nix::libc::ESRCH)
                        && crate::statefile::is_same_process(&e) =>
                {
                    warn!(program = %e.name, pid, error = %err, "cannot watch a process left by the previous monitor; replacing it");
                    end_leftover(pid);
                    continue;
                }
                // Gone since it was found: nothing to take over. What it left in its group still goes (no
                // process can take a pid a group still uses as its id), but not when its pid is another
                // process's now: that one may lead a group of its own under the id.
                Err(err) => {
                    warn!(program = %e.name, pid, error = %err, "a process left by the previous monitor ended before it was taken over; starting it afresh");
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = child::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                    continue;
                }
            };
            let watched = child::take_output(&fd, &p.spec, e.pipes, &p.outputs).and_then(|()| {
                child::watch_adopted(e.name.clone(), pid, fd, spawn_id, ending, self.exits.clone())
            });
            if let Err(err) = watched {
                warn!(program = %e.name, pid, error = %err, "cannot watch a process left by the previous monitor; replacing it");
                end_leftover(pid);
                continue;
            }
            p.pid = pid;
            p.stopping = stopping;
            p.start_time = e.start_time;
            p.pipes = e.pipes;
            p.spawn_id = spawn_id;
            p.started_unix_ms = Some(crate::statefile::started_unix_ms(e.start_time).unwrap_or_else(unix_ms));
            p.wanted = false;
            p.probes = crate::probes::start(&p.spec, spawn_id, &self.internal);
            let step = p.m.adopt(Instant::now());
            // A monitor's restart is not the program's: its count of crashes goes on.
            p.m.restart_count = e.restarts;
            for (from, to) in step.transitions {
                self.bus.publish(Kind::State {
                    program: e.name.clone(),
                    from: from.name(),
                    to: to.name(),
                    pid: Some(pid),
                    exit_code: None,
                    exit_signal: None,
                });
            }
            info!(program = %e.name, pid, "adopted a process left by the previous monitor");
            adopted.push(e.name);
        }
        if !adopted.is_empty() {
            self.bus.publish(Kind::Monitor {
                detail: format!("adopted processes of a previous monitor: {}", adopted.join(", ")),
            });
        }
    }

    /// Feeds one event to a process's state machine and performs the resulting actions.
    pub fn event(&mut self, name: &str, ev: Event) {
        let Some(p) = self.procs.get_mut(name) else { return };
        let now = Instant::now();
        let mut step = p.m.handle(ev, &p.spec.policy, now, rand::random::<f64>());
        // Shutting down, nothing starts again: a BACKOFF or FATAL timer, a crash's or a failing liveness
        // probe's restart spawned a process in the middle of the shutdown (a dependency waiting for its
        // dependents to stop was one), which then had to be stopped in its turn.
        if self.shutting_down && step.actions.contains(&Action::Spawn) {
            step.actions
                .retain(|a| !matches!(a, Action::Spawn | Action::Timer(..)));
            step.transitions.extend(p.m.abandon_start().transitions);
        }
        let (pid, exit) = (p.pid, p.m.last_exit);
        for (from, to) in &step.transitions {
            let exited = matches!(to, State::Exited | State::Backoff | State::Stopped)
                && matches!(ev, Event::Exited(_));
            info!(program = name, from = from.name(), to = to.name(), "state change");
            self.bus.publish(Kind::State {
                program: name.to_string(),
                from: from.name(),
                to: to.name(),
                pid: (pid != 0).then_some(pid),
                exit_code: exit.filter(|_| exited).and_then(|e| e.code),
                exit_signal: exit.filter(|_| exited).and_then(|e| e.signal),
            });
        }
        for action in step.actions {
            self.perform(name, action);
        }
    }

    fn perform(&mut self, name: &str, action: Action) {
        let Some(p) = self.procs.get_mut(name) else { return };
        match action {
            Action::Spawn => {
                // A restart goes from the old process to the new one without passing through `kick`: a spec an
                // update left pending (a rolling update) takes effect here.
                if let Some(spec) = p.replacement.take() {
                    p.spec = spec;
                    self.restamp_stop_levels();
                }
                let Some(p) = self.procs.get_mut(name) else { return };
                self.next_id += 1;
                p.spawn_id = self.next_id;
                match child::spawn(&p.spec, &p.outputs, p.spawn_id, self.exits.clone()) {
                    Ok(s) => {
                        p.pid = s.pid;
                        p.start_time = s.start_time;
                        p.pipes = s.pipes;
                        p.stopping = s.stopping;
                        p.started_unix_ms = Some(unix_ms());
                        p.spawn_error = None;
                        p.liveness = None;
                        p.readiness = None;
                        p.probes = crate::probes::start(&p.spec, p.spawn_id, &self.internal);
                        info!(program = name, pid = s.pid, "spawned");
                    }
                    Err(e) => {
                        warn!(program = name, error = %e, "spawn failed");
                        p.spawn_error = Some(e.to_string());
                        self.event(name, Event::SpawnFailed);
                    }
                }
            }
            Action::SignalStop => {
                p.stopping.begin();
                if let Err(e) = child::signal_group(p.pid, p.spec.stopsignal) {
                    warn!(program = name, pid = p.pid, error = %e, "cannot signal");
                } else if !child::stops_the_process(p.spec.stopsignal) {
                    // As systemd does: a stopped process (SIGSTOP, Ctrl-Z) acts on its stop signal only once
                    // continued. Without this it waited for the SIGKILL after stopwaitsecs, holding what it
                    // held (an app's SQLite write lock stalled every other instance's writes all that time).
                    let _ = child::signal_group(p.pid, nix::sys::signal::Signal::SIGCONT);
                }
            }
            Action::Kill => {
                warn!(
                    program = name,
                    pid = p.pid,
                    "did not stop within stopwaitsecs; killing its process group"
                );
                let _ = child::signal_group(p.pid, nix::sys::signal::Signal::SIGKILL);
            }
            Action::Timer(delay, generation) => {
                let (name, epoch) = (name.to_string(), p.epoch);
                self.after(
                    delay,
                    Internal::Timer {
                        name,
                        epoch,
                        generation,
                    },
                );
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(p) = self.procs.get_mut(&exit.name) else {
            return;
        };
        if p.spawn_id != exit.spawn_id {
            return;
        }
        if let Some(c) = p.probes.take() {
            c.cancel();
        }
        // Asked to stop, or an exit code listed in `exitcodes`: expected. Anything else (a signal, another
        // code) is a crash an operator wants to see, as Supervisord's "(exit status N; not expected)".
        let expected = p.m.state == State::Stopping
            || exit
                .info
                .code
                .is_some_and(|c| p.spec.policy.exitcodes.contains(&c));
        // `status=exit status 3`, `status=killed by signal 9 (SIGKILL)`: as `ctl status` says it.
        let (pid, status) = (p.pid, exit.info);
        if expected {
            info!(program = %exit.name, pid, %status, "exited");
        } else {
            warn!(program = %exit.name, pid, %status, "exited, not expected");
        }
        self.event(&exit.name, Event::Exited(exit.info));
        if let Some(p) = self.procs.get_mut(&exit.name)
            && !p.m.state.has_process()
        {
            p.pid = 0;
            p.started_unix_ms = None;
        }
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Timer {
                name,
                epoch,
                generation,
            } => {
                if self.procs.get(&name).is_some_and(|p| p.epoch == epoch) {
                    self.event(&name, Event::Timer(generation));
                }
            }
            Internal::Probe {
                name,
                spawn_id,
                liveness,
                result,
            } => self.on_probe(&name, spawn_id, liveness, result),
            Internal::Wake => {}
            Internal::KillAll => {
                for p in self.procs.values().filter(|p| p.m.state.has_process()) {
                    p.stopping.hurry();
                    let _ = child::signal_group(p.pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }

    fn on_probe(&mut self, name: &str, spawn_id: u64, liveness: bool, result: Result<(), String>) {
        let Some(p) = self.procs.get_mut(name) else { return };
        if p.spawn_id != spawn_id || !p.m.state.has_process() {
            return;
        }
        let slot = if liveness {
            &mut p.liveness
        } else {
            &mut p.readiness
        };
        let failures = match (&result, slot.as_ref()) {
            (Ok(()), _) => 0,
            (Err(_), Some(prev)) => prev.failures + 1,
            (Err(_), None) => 1,
        };
        let new = ProbeStatus {
            ok: result.is_ok(),
            detail: result.err().unwrap_or_else(|| "ok".into()),
            failures,
        };
        if slot.as_ref().map(|s| s.ok) != Some(new.ok) {
            self.bus.publish(Kind::Probe {
                program: name.to_string(),
                probe: if liveness { "liveness" } else { "readiness" },
                ok: new.ok,
                detail: new.detail.clone(),
            });
        }
        *slot = Some(new);
        let threshold = p.spec.liveness.as_ref().map_or(u32::MAX, |s| s.failure_threshold);
        if liveness && failures >= threshold && p.m.state == State::Running {
            warn!(program = name, failures, "liveness probe failing; restarting");
            self.event(name, Event::Unhealthy);
        }
    }

    /// Whether `p`'s last exit was one its `exitcodes` expect: EXITED so, a one-shot task ended as it should.
    pub fn exit_expected(p: &Proc) -> bool {
        (p.m.last_exit.and_then(|e| e.code)).is_some_and(|c| p.spec.policy.exitcodes.contains(&c))
    }

    /// Whether `p` counts as ready for its dependents: not while a stop of it is held.
    pub fn is_ready(p: &Proc) -> bool {
        p.held.is_none()
            && p.m.state == State::Running
            && (p.spec.readiness.is_none() || p.readiness.as_ref().is_some_and(|r| r.ok))
    }

    /// Whether `q` has settled without being ready, or is on its way down: given up (FATAL), stopped or ended
    /// with no start pending, or stopping for good (being removed, or a stop that no restart follows). It
    /// holds no dependent of its group back once another of the group is ready: a member a reload removes,
    /// still stopping (`stopwaitsecs`), held its group's dependents back until it was gone, where the new
    /// member was ready already.
    fn settled_down(q: &Proc) -> bool {
        let going = q.removing
            || q.held == Some(Hold::Stop)
            || (q.m.state == State::Stopping && !q.m.restart_pending());
        !q.wanted && (going || matches!(q.m.state, State::Fatal | State::Stopped | State::Exited))
    }

    /// Dependency groups of `name` that are not ready yet: a member is still on its way up (starting, backing
    /// off, not yet passing its readiness probe), or none is ready. One member that gave up, or that an
    /// operator stopped, holds its group's dependents no longer once another is ready: waiting for every
    /// member, one app that could not bind its port kept the local cluster's agent from ever starting, and
    /// every client's list empty.
    /// Whether a process of program `group` an update removed is still stopping.
    fn removals_stopping(&self, group: &str) -> bool {
        (self.procs.values()).any(|p| p.removing && p.spec.group == group && p.m.state.has_process())
    }

    pub fn waiting_for(&self, name: &str) -> Vec<String> {
        let Some(p) = self.procs.get(name) else {
            return Vec::new();
        };
        p.spec
            .depends_on
            .iter()
            .filter(|g| {
                let (mut members, mut ready, mut on_its_way) = (0, false, false);
                for q in self.procs.values().filter(|q| q.spec.group == **g) {
                    members += 1;
                    if Self::is_ready(q) {
                        ready = true;
                    } else if !Self::settled_down(q) {
                        on_its_way = true;
                    }
                }
                members > 0 && (on_its_way || !ready)
            })
            .cloned()
            .collect()
    }

    /// Begins held stops whose dependents are down; moves a rolling restart on; starts pending processes
    /// whose dependencies are ready; during shutdown, stops processes nothing running depends on (reverse
    /// dependency order); finishes updates of processes whose old process is gone.
    fn kick(&mut self) {
        loop {
            let mut progressed = self.release_holds();
            progressed |= self.advance_roll();
            for name in self.order.clone() {
                let Some(p) = self.procs.get_mut(&name) else {
                    continue;
                };
                if p.m.state.has_process() {
                    continue;
                }
                if let Some(spec) = p.replacement.take() {
                    p.spec = spec;
                    progressed = true;
                    self.restamp_stop_levels();
                }
                let Some(p) = self.procs.get_mut(&name) else {
                    continue;
                };
                if p.removing {
                    if p.m.state != State::Stopped && p.m.state != State::Exited {
                        self.event(&name, Event::Stop);
                    }
                    self.procs.remove(&name);
                    self.order.retain(|n| *n != name);
                    progressed = true;
                    continue;
                }
                let (wanted, after_removals, spec) = (p.wanted, p.after_removals, p.spec.clone());
                if wanted
                    && !self.shutting_down
                    && !(after_removals && self.removals_stopping(&spec.group))
                    && self.waiting_for(&name).is_empty()
                {
                    let mut ev = Event::Start;
                    if let Some(p) = self.procs.get_mut(&name) {
                        p.wanted = false;
                        p.after_removals = false;
                        if std::mem::take(&mut p.wanted_restart) {
                            ev = Event::Restart;
                        }
                    }
                    self.event(&name, ev);
                    progressed = true;
                }
            }
            if self.shutting_down {
                progressed |= self.stop_leaves();
            }
            if !progressed {
                return;
            }
        }
    }

    /// During shutdown: stops every process that no live process depends on.
    fn stop_leaves(&mut self) -> bool {
        let mut progressed = false;
        for name in self.order.clone().into_iter().rev() {
            let Some(p) = self.procs.get(&name) else { continue };
            let state = p.m.state;
            let needed = self
                .procs
                .values()
                .any(|q| q.m.state.has_process() && self.stops_before(q, p));
            let stoppable = matches!(
                state,
                State::Starting | State::Running | State::Backoff | State::Fatal
            );
            if stoppable && !needed {
                self.event(&name, Event::Stop);
                progressed = true;
            }
        }
        progressed
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        info!("stopping every program");
        self.shutting_down = true;
        self.bus.publish(Kind::Monitor {
            detail: "shutting down".into(),
        });
        for p in self.procs.values_mut() {
            p.wanted = false;
            // `stop_leaves` orders every stop from here on.
            p.held = None;
        }
        self.stop_roll("the monitor is shutting down");
        // A restart halfway through would start its program again only to stop it.
        let restarting: Vec<String> = (self.procs.iter())
            .filter(|(_, p)| p.m.restart_pending())
            .map(|(name, _)| name.clone())
            .collect();
        for name in restarting {
            self.event(&name, Event::Stop);
        }
    }

    /// The stop signal (SIGINT, or the drain grace is over): stop everything at once, SIGKILL after 3 s.
    fn stop_everything_now(&mut self) {
        for name in self.order.clone() {
            let state = self.procs.get(&name).map(|p| p.m.state);
            if matches!(
                state,
                Some(State::Starting | State::Running | State::Backoff | State::Fatal)
            ) {
                self.event(&name, Event::Stop);
            }
        }
        self.after(Duration::from_secs(3), Internal::KillAll);
    }

    /// Sends the supervisor `msg` once `delay` is over: its timers.
    pub(crate) fn after(&self, delay: Duration, msg: Internal) {
        let tx = self.internal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(msg);
        });
    }

    pub fn new_proc(&mut self, spec: Arc<ProcessSpec>) -> Proc {
        self.next_id += 1;
        Proc {
            wanted: spec.autostart,
            spec,
            m: Machine::new(),
            epoch: self.next_id,
            pid: 0,
            start_time: 0,
            pipes: child::Pipes::default(),
            stopping: Arc::default(),
            spawn_id: 0,
            started_unix_ms: None,
            probes: None,
            liveness: None,
            readiness: None,
            outputs: Outputs::default(),
            removing: false,
            after_removals: false,
            replacement: None,
            spawn_error: None,
            held: None,
            wanted_restart: false,
        }
    }

    /// Each group's stop level from the specs that run, with the group priorities in force: a named update
    /// leaves programs of the old config running beside the new one's (a change not named, a removal left
    /// pending), and a rolled program's change waits for its restart. Taken from the new config alone, a
    /// program whose new `priority` had not applied stopped by it at shutdown.
    pub(super) fn restamp_stop_levels(&mut self) {
        let running = self.procs.values().map(|p| &*p.spec);
        self.stop_levels = crate::program::stop_levels(running, &self.cfg.group_order);
    }

    pub fn set_config(&mut self, cfg: Arc<Config>) {
        self.bus.set_capacity(cfg.events_history);
        self.stop_levels = crate::program::stop_levels(cfg.processes.iter(), &cfg.group_order);
        self.cfg = cfg;
    }

    fn publish(&mut self) {
        let snapshot = crate::snapshot::build(self);
        self.status.send_replace(Arc::new(Snapshot {
            shutting_down: self.shutting_down,
            ..snapshot
        }));
        let entries: Vec<Entry> = self
            .order
            .iter()
            .filter_map(|n| self.procs.get(n).map(|p| (n, p)))
            .filter(|(_, p)| p.pid != 0)
            .map(|(n, p)| Entry {
                name: n.clone(),
                pid: p.pid as i32,
                start_time: p.start_time,
                launch: p.spec.launch_fingerprint(),
                pipes: p.pipes,
                restarts: p.m.restart_count,
                stopsignal: Some(p.spec.stopsignal),
                stopwait_ms: Some(u64::try_from(p.spec.policy.stopwait.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        if entries != self.saved {
            self.run_dir.save(entries.clone());
            self.saved = entries;
        }
    }
}
