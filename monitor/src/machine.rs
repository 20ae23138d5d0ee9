//! The per-process state machine: Supervisord's states and transitions, plus the backoff, restart budget and
//! FATAL cool-down of [`Policy`]. Pure: it takes events (with the time and a random number as inputs) and
//! returns the actions to perform (spawn, signal, kill, arm a timer); the supervisor performs them.
//!
//! Each state arms at most one timer; a timer carries the generation it was armed in, and a timer from an
//! earlier generation is ignored, so no cancellation is ever needed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::policy::{ExitInfo, Policy};

/// Supervisord's process states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Stopped,
    Starting,
    Running,
    Backoff,
    Stopping,
    Exited,
    Fatal,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "STOPPED",
            State::Starting => "STARTING",
            State::Running => "RUNNING",
            State::Backoff => "BACKOFF",
            State::Stopping => "STOPPING",
            State::Exited => "EXITED",
            State::Fatal => "FATAL",
        }
    }

    /// A number for the metrics gauge (the order of the enum).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Whether a process exists (or may, while a spawn is under way).
    pub fn has_process(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }
}

/// What happened to a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// `start` (by a person or autostart).
    Start,
    /// `stop` (by a person, an update or shutdown).
    Stop,
    /// `restart` (asked for: by a person, an update, or a restart of what it depends on).
    Restart,
    /// A failing liveness probe: the monitor restarts the process by itself, and counts it.
    Unhealthy,
    /// The process could not be spawned at all.
    SpawnFailed,
    /// The process exited.
    Exited(ExitInfo),
    /// The timer armed in generation `generation` fired.
    Timer(u64),
}

/// What the supervisor must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Spawn,
    /// Send the stop signal to the process group.
    SignalStop,
    /// SIGKILL the process group.
    Kill,
    /// Deliver `Event::Timer(generation)` after the delay.
    Timer(Duration, u64),
}

/// The result of one event.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    pub actions: Vec<Action>,
    pub transitions: Vec<(State, State)>,
}

/// One process's supervision state.
#[derive(Debug, Clone)]
pub struct Machine {
    pub state: State,
    generation: u64,
    /// Failed starts in a row (exits before `startsecs`): Supervisord's backoff counter.
    pub start_failures: u32,
    /// Crash restarts from RUNNING since the last long healthy run.
    streak: u32,
    /// When recent restarts happened, for the budget.
    restarts: VecDeque<Instant>,
    spawned_at: Option<Instant>,
    restart_after_stop: bool,
    /// That restart is the monitor's own (a failing liveness probe): it counts in `restart_count`.
    count_restart: bool,
    pub last_exit: Option<ExitInfo>,
    /// Restarts the monitor made by itself since it started: after a crash, out of BACKOFF, a FATAL retry (as
    /// systemd's `NRestarts`). A `start`, `restart` or update someone asked for is not one, so an alert on
    /// the rate of restarts (a crash loop) stays quiet through a deploy.
    pub restart_count: u64,
    /// Why the process is FATAL.
    pub fatal_reason: Option<&'static str>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Self {
        Self {
            state: State::Stopped,
            generation: 0,
            start_failures: 0,
            streak: 0,
            restarts: VecDeque::new(),
            spawned_at: None,
            restart_after_stop: false,
            last_exit: None,
            restart_count: 0,
            count_restart: false,
            fatal_reason: None,
        }
    }

    /// Whether the process is being stopped by a restart, so that it starts again once it has exited.
    pub fn restart_pending(&self) -> bool {
        self.state == State::Stopping && self.restart_after_stop
    }

    /// Why the process is FATAL, in words for whoever waits on its start (`ctl start`, a roll): what made the
    /// last try fail (`spawn_error` when it could not be spawned, else how it exited) and, when it never got
    /// past `startsecs`, how many tries it took. `fatal_reason` alone ("too many start retries too quickly")
    /// read the same for a missing binary and for a program exiting with 3. `None` unless FATAL.
    pub fn fatal_message(&self, spawn_error: Option<&str>) -> Option<String> {
        let reason = self.fatal_reason.filter(|_| self.state == State::Fatal)?;
        // Reset once a start gets past `startsecs`: a FATAL with none is the restart budget's.
        let tries = match self.start_failures {
            0 => None,
            1 => Some(", gave up after 1 try".to_string()),
            n => Some(format!(", gave up after {n} tries")),
        };
        Some(match (spawn_error, self.last_exit, tries) {
            (Some(e), _, tries) => format!("spawn error: {e}{}", tries.unwrap_or_default()),
            (None, Some(exit), Some(tries)) => format!("exited too quickly: {exit}{tries}"),
            (None, Some(exit), None) => format!("{reason}, last {exit}"),
            (None, None, _) => reason.to_string(),
        })
    }

    /// When the current process was spawned.
    pub fn spawned_at(&self) -> Option<Instant> {
        self.spawned_at.filter(|_| self.state.has_process())
    }

    /// Takes over a process a previous monitor started and that is still running: it goes straight to
    /// RUNNING (it already proved itself under that monitor). Its run time counts from now, as its real start
    /// under the old monitor is unknown to the restart policy.
    pub fn adopt(&mut self, now: Instant) -> Step {
        let mut step = Step::default();
        if self.state == State::Stopped {
            self.spawned_at = Some(now);
            self.go(State::Running, &mut step);
        }
        step
    }

    /// Applies one event.
    pub fn handle(&mut self, ev: Event, p: &Policy, now: Instant, rand01: f64) -> Step {
        let mut step = Step::default();
        match (self.state, ev) {
            (
                State::Stopped | State::Exited | State::Fatal | State::Backoff,
                Event::Start | Event::Restart,
            ) => {
                // Asked for by someone: not one of `restart_count`'s (see there).
                self.start_failures = 0;
                self.streak = 0;
                self.restarts.clear();
                self.enter_starting(p, now, &mut step);
            }
            (State::Starting, Event::Timer(g)) if g == self.generation => {
                self.start_failures = 0;
                self.go(State::Running, &mut step);
            }
            // With `startsecs = 0` a process counts as started once spawned, as in Supervisord: its exit is
            // a RUNNING one's, which `autorestart` and `exitcodes` judge. The zero timer that says so is a
            // message, and a quick process (a one-shot task) exited before it came: its clean exit was taken
            // for a failed start, so it ran again and again and ended FATAL.
            (State::Starting, Event::Exited(e)) if p.startsecs.is_zero() => {
                self.start_failures = 0;
                self.go(State::Running, &mut step);
                let rest = self.handle(Event::Exited(e), p, now, rand01);
                step.actions.extend(rest.actions);
                step.transitions.extend(rest.transitions);
            }
            (State::Starting, Event::Exited(_) | Event::SpawnFailed) => {
                if let Event::Exited(e) = ev {
                    self.last_exit = Some(e);
                }
                self.start_failures += 1;
                let delay = if self.start_failures > p.startretries {
                    Duration::ZERO // BACKOFF turns into FATAL at once
                } else {
                    p.backoff(self.start_failures, rand01)
                };
                self.go(State::Backoff, &mut step);
                step.actions.push(Action::Timer(delay, self.generation));
            }
            (State::Backoff, Event::Timer(g)) if g == self.generation => {
                if self.start_failures > p.startretries {
                    self.enter_fatal("too many start retries too quickly", p, &mut step);
                } else {
                    self.restart_count += 1;
                    self.enter_starting(p, now, &mut step);
                }
            }
            (State::Running, Event::Exited(e)) => {
                self.last_exit = Some(e);
                self.go(State::Exited, &mut step);
                if p.should_restart(e) {
                    self.after_crash(p, now, rand01, &mut step);
                }
            }
            (State::Starting | State::Running, Event::Stop | Event::Restart | Event::Unhealthy) => {
                self.restart_after_stop = ev != Event::Stop;
                self.count_restart = ev == Event::Unhealthy;
                self.go(State::Stopping, &mut step);
                step.actions.push(Action::SignalStop);
                step.actions.push(Action::Timer(p.stopwait, self.generation));
            }
            (State::Stopping, Event::Timer(g)) if g == self.generation => {
                self.generation += 1;
                step.actions.push(Action::Kill);
            }
            (State::Stopping, Event::Exited(e)) => {
                self.last_exit = Some(e);
                self.go(State::Stopped, &mut step);
                if std::mem::take(&mut self.restart_after_stop) {
                    if std::mem::take(&mut self.count_restart) {
                        // The monitor's own restart (its liveness probe failed): within the restart budget
                        // and backoff, as a crash's. Restarted at once, a probe that always fails restarted
                        // its program every few seconds for ever, never FATAL.
                        self.after_crash(p, now, rand01, &mut step);
                    } else {
                        self.start_failures = 0;
                        self.enter_starting(p, now, &mut step);
                    }
                }
            }
            (State::Backoff | State::Fatal, Event::Stop) => {
                self.go(State::Stopped, &mut step);
            }
            // A stop while a restart is still stopping the process wins: the user's latest word is "stopped".
            (State::Stopping, Event::Stop) => {
                self.restart_after_stop = false;
                self.count_restart = false;
            }
            (State::Fatal, Event::Timer(g)) if g == self.generation => {
                self.start_failures = 0;
                self.streak = 0;
                self.restarts.clear();
                self.restart_count += 1;
                self.enter_starting(p, now, &mut step);
            }
            // Anything else (a stale timer, stop while stopped, start while running) changes nothing.
            _ => {}
        }
        step
    }

    /// A process that had reached RUNNING died and should come back: at once the first time, then with
    /// growing delays while it keeps dying young; too many restarts in the window is FATAL.
    fn after_crash(&mut self, p: &Policy, now: Instant, rand01: f64, step: &mut Step) {
        let ran = self
            .spawned_at
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if ran >= p.backoff_reset {
            self.streak = 0;
        }
        while self
            .restarts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > p.restart_window)
        {
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        if self.restarts.len() > p.max_restarts as usize {
            self.enter_fatal("restart budget exhausted", p, step);
            return;
        }
        self.streak += 1;
        if self.streak == 1 {
            self.restart_count += 1;
            self.enter_starting(p, now, step);
        } else {
            // The restart is counted when the BACKOFF timer starts it.
            self.go(State::Backoff, step);
            step.actions
                .push(Action::Timer(p.backoff(self.streak - 1, rand01), self.generation));
        }
    }

    fn enter_starting(&mut self, p: &Policy, now: Instant, step: &mut Step) {
        self.fatal_reason = None;
        self.spawned_at = Some(now);
        self.go(State::Starting, step);
        step.actions.push(Action::Spawn);
        step.actions.push(Action::Timer(p.startsecs, self.generation));
    }

    fn enter_fatal(&mut self, why: &'static str, p: &Policy, step: &mut Step) {
        self.fatal_reason = Some(why);
        self.go(State::Fatal, step);
        if let Some(cool) = p.fatal_retry {
            step.actions.push(Action::Timer(cool, self.generation));
        }
    }

    fn go(&mut self, to: State, step: &mut Step) {
        step.transitions.push((self.state, to));
        self.state = to;
        self.generation += 1;
    }

    /// A start the supervisor will not make (it is shutting down): STARTING back to STOPPED, the timer armed
    /// with it stale.
    pub fn abandon_start(&mut self) -> Step {
        let mut step = Step::default();
        if self.state == State::Starting {
            self.go(State::Stopped, &mut step);
        }
        step
    }

    /// The generation of the timer the current state armed (for tests and the supervisor's bookkeeping).
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
