//! Rolling restarts (`ctl restart --rolling`), driven by the monitor: one program at a time, the next only
//! once this one runs and is ready again, so a group serving clients never has more than one down. The roll
//! stops at the first program that does not come back (it fails, is stopped, or is not ready within the
//! roll's limit), and the ones after it keep their processes.
//!
//! The monitor drives it rather than the client, so a roll goes on when the `ctl` that began it is
//! interrupted or its connection drops, and anyone can follow it in `/v1/status` (`roll`). One roll runs at
//! a time; the last one stays in the status until the next begins.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::events::Kind;
use crate::machine::State;
use crate::status::{CommandError, Reply};
use crate::supervisor::{Internal, Proc, Supervisor};

/// Longest a command may wait for one program, in seconds: a roll's `wait_secs` (checked by the API) and
/// `xcluster ctl --wait-secs` share this bound.
pub const MAX_WAIT_SECS: u64 = 3600;

/// A roll as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RollStatus {
    /// Tells one roll from the next: the client that began a roll follows that one.
    pub id: u64,
    pub finished: bool,
    /// How long each program may take to run and be ready again.
    pub limit_secs: u64,
    pub programs: Vec<RollStep>,
}

/// Finished rolls kept after the next began (`past_rolls` in `/v1/status`): a client following one that ended
/// between two of its polls, and another began, finds its outcome there rather than losing it.
pub const PAST_ROLLS: usize = 8;

/// What a roll says of a program an update put in it whose change was no longer pending when reached.
pub const UNCHANGED: &str = "not restarted: its settings are those in force";

/// One program of a roll.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RollStep {
    pub name: String,
    pub step: Step,
    /// Put in the roll by an update, to apply its change (not by `restart --rolling`): reached with no change
    /// pending any more (reverted in the file, or applied since), it is passed over, not restarted.
    #[serde(skip)]
    pub(crate) for_update: bool,
    /// Its outcome once known: `started`, or why not.
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Waiting,
    Restarting,
    Done,
    Failed,
    /// Not restarted: the roll stopped before it.
    Skipped,
}

/// The roll under way (or the last one), with the deadline of the program restarting now.
#[derive(Debug)]
pub(crate) struct Roll {
    pub status: RollStatus,
    limit: Duration,
    deadline: Option<Instant>,
}

impl Roll {
    pub fn new(id: u64, names: Vec<String>, limit: Duration, for_update: bool) -> Self {
        let programs = (names.into_iter())
            .map(|name| RollStep {
                name,
                step: Step::Waiting,
                message: String::new(),
                for_update,
            })
            .collect();
        Self {
            status: RollStatus {
                id,
                finished: false,
                limit_secs: limit.as_secs(),
                programs,
            },
            limit,
            deadline: None,
        }
    }

    /// The index of the program restarting now, if any.
    fn current(&self) -> Option<usize> {
        self.status
            .programs
            .iter()
            .position(|s| s.step == Step::Restarting)
    }

    /// Ends the roll: at its current program with `why` (the programs after it are not restarted), or, with
    /// `None`, done. What the event log says of it.
    fn end(&mut self, why: Option<&str>) -> String {
        self.status.finished = true;
        let Some(why) = why else {
            return format!("rolling restart {} done", self.status.id);
        };
        let mut at = String::new();
        for s in &mut self.status.programs {
            match s.step {
                Step::Restarting => {
                    at = s.name.clone();
                    (s.step, s.message) = (Step::Failed, why.to_string());
                }
                Step::Waiting => {
                    (s.step, s.message) = (Step::Skipped, "not restarted: the roll stopped".into());
                }
                Step::Done | Step::Failed | Step::Skipped => {}
            }
        }
        format!("rolling restart {} stopped at {at}: {why}", self.status.id)
    }
}

/// How a program restarted by a roll stands: `None` while it is on its way back. One without a process
/// (FATAL, EXITED) is only marked to start by the restart (`wanted`) until `kick` starts it: meanwhile its
/// state is the old one, and was taken for the restart's outcome (a FATAL program fixed and rolled was
/// failed with its old message, and one-shot tasks were all done before any had run).
fn outcome(p: &Proc) -> Option<Result<String, String>> {
    if p.wanted {
        return None;
    }
    match p.shown_state() {
        State::Running if Supervisor::is_ready(p) => Some(Ok("started".into())),
        State::Fatal => Some(Err(p
            .m
            .fatal_message(p.spawn_error.as_deref())
            .unwrap_or_else(|| "fatal".into()))),
        // A one-shot task that ran and ended as its `exitcodes` expect came back as it should, as `ctl restart`
        // of it says; a roll of such tasks stopped at the first, as if it had failed.
        State::Exited if Supervisor::exit_expected(p) => Some(Ok(match p.m.last_exit {
            Some(e) => format!("started, then exited: {e}"),
            None => "started, then exited".into(),
        })),
        State::Exited => Some(Err(crate::status::abnormal_termination(p.m.last_exit))),
        // Stopped and not about to start: someone stopped it meanwhile.
        State::Stopped if !p.m.restart_pending() => Some(Err("stopped".into())),
        _ => None,
    }
}

/// What a program the roll gave up on is still doing.
fn overdue(sup: &Supervisor, p: &Proc, name: &str, limit: Duration) -> String {
    let waiting = sup.waiting_for(name);
    let state = p.shown_state();
    let why = match state {
        State::Running => ", not ready".to_string(),
        _ if !waiting.is_empty() => format!(", waiting for {}", waiting.join(", ")),
        _ => String::new(),
    };
    format!("still {}{why} after {} s", state.name(), limit.as_secs())
}

impl Supervisor {
    /// Refuses a second roll while one runs, naming the program it is restarting.
    pub(crate) fn refuse_while_rolling(&self) -> Result<(), CommandError> {
        match self.roll.as_ref().filter(|r| !r.status.finished) {
            Some(roll) => {
                let at = roll
                    .current()
                    .map_or("", |i| roll.status.programs[i].name.as_str());
                Err(CommandError::Rolling(at.to_string()))
            }
            None => Ok(()),
        }
    }

    /// Begins a roll of the programs `names` pick, each given `limit`: refused while another runs.
    /// `for_update`: an update's, to apply the changes it left pending ([`RollStep::for_update`]).
    pub(crate) fn begin_roll(
        &mut self,
        names: &[String],
        limit: Duration,
        for_update: bool,
    ) -> Result<Reply, CommandError> {
        self.refuse_while_rolling()?;
        let picked: Vec<String> = self.resolve(names)?.into_iter().map(|(n, _)| n).collect();
        // Numbered from 1 in each monitor's life.
        let id = self.roll.as_ref().map_or(1, |r| r.status.id + 1);
        self.bus.publish(Kind::Monitor {
            detail: format!("rolling restart {id} of {}", picked.join(", ")),
        });
        if let Some(before) = self.roll.take() {
            // A new list, rarely (a roll's start), that every status snapshot then shares.
            let keep = self.past_rolls.len().saturating_sub(PAST_ROLLS - 1);
            let mut past = self.past_rolls[keep..].to_vec();
            past.push(before.status);
            self.past_rolls = std::sync::Arc::new(past);
        }
        self.roll = Some(Roll::new(id, picked, limit, for_update));
        self.advance_roll();
        Ok(Reply::Roll(self.roll.as_ref().map(|r| r.status.clone())))
    }

    /// Adds `names` to the end of the roll under way (those not already waiting in it), for an update that
    /// arrives while it runs. Whether a roll was under way.
    pub(crate) fn extend_roll(&mut self, names: &[String]) -> bool {
        let Some(roll) = self.roll.as_mut().filter(|r| !r.status.finished) else {
            return false;
        };
        let waiting = |n: &String, r: &Roll| {
            (r.status.programs.iter()).any(|s| s.name == *n && s.step == Step::Waiting)
        };
        let added: Vec<String> = names.iter().filter(|n| !waiting(n, roll)).cloned().collect();
        for name in &added {
            roll.status.programs.push(RollStep {
                name: name.clone(),
                step: Step::Waiting,
                message: String::new(),
                for_update: true,
            });
        }
        if !added.is_empty() {
            let detail = format!(
                "rolling restart {}: {} added by an update",
                roll.status.id,
                added.join(", ")
            );
            self.bus.publish(Kind::Monitor { detail });
        }
        true
    }

    /// Ends the roll under way, if any, at its current program with `why`.
    pub(crate) fn stop_roll(&mut self, why: &str) {
        if let Some(roll) = self.roll.as_mut().filter(|r| !r.status.finished) {
            let detail = roll.end(Some(why));
            self.bus.publish(Kind::Monitor { detail });
        }
    }

    /// Moves the roll on as far as it can go now: settles the program restarting (back and ready, failed,
    /// or past its deadline), then restarts the next. Whether anything changed.
    pub(crate) fn advance_roll(&mut self) -> bool {
        let Some(mut roll) = self.roll.take() else {
            return false;
        };
        let mut progressed = false;
        let ended = loop {
            if roll.status.finished {
                break None;
            }
            if let Some(i) = roll.current() {
                let name = &roll.status.programs[i].name;
                let settled = match self.procs.get(name).filter(|p| !p.removing) {
                    // Removed from the config meanwhile: no longer the roll's to bring back, nor a failure.
                    None => Some((Step::Skipped, Ok(crate::status::REMOVED.to_string()))),
                    Some(p) => outcome(p)
                        .or_else(|| {
                            (roll.deadline.is_some_and(|d| Instant::now() >= d))
                                .then(|| Err(overdue(self, p, name, roll.limit)))
                        })
                        .map(|o| (Step::Done, o)),
                };
                match settled {
                    None => break None,
                    Some((step, Ok(message))) => {
                        let s = &mut roll.status.programs[i];
                        (s.step, s.message) = (step, message);
                    }
                    Some((_, Err(why))) => break Some(roll.end(Some(&why))),
                }
            }
            progressed = true;
            // One not ready (crash-looping, failing its probe) goes before those that serve: it is down
            // already, so restarting it costs nothing, and if it does not come back the roll stops there
            // with every serving one untouched. Taken in order, the serving ones went down one by one while
            // it was down too: two down at once, where the promise is one.
            let serving = |s: &RollStep| self.procs.get(&s.name).is_some_and(Supervisor::is_ready);
            let steps = &roll.status.programs;
            let next = (steps.iter().position(|s| s.step == Step::Waiting && !serving(s)))
                .or_else(|| steps.iter().position(|s| s.step == Step::Waiting));
            let Some(next) = next.map(|i| &mut roll.status.programs[i]) else {
                break Some(roll.end(None));
            };
            // One an update removed since the roll began is passed over: "gone" stopped the roll there, and
            // the programs after it, an update's changes among them, kept their old settings.
            if self.procs.get(&next.name).is_none_or(|p| p.removing) {
                (next.step, next.message) = (Step::Skipped, crate::status::REMOVED.into());
                continue;
            }
            // An update's step whose change is no longer pending: its process runs the settings in force.
            if next.for_update
                && self
                    .procs
                    .get(&next.name)
                    .is_some_and(|p| p.replacement.is_none())
            {
                (next.step, next.message) = (Step::Done, UNCHANGED.into());
                continue;
            }
            next.step = Step::Restarting;
            let name = next.name.clone();
            let (ok, message) = self.user_restart(&name, std::slice::from_ref(&name));
            if !ok {
                break Some(roll.end(Some(&message)));
            }
            roll.deadline = Some(Instant::now() + roll.limit);
            // Nothing else may reach the supervisor until the deadline: this wakes it then.
            self.after(roll.limit, Internal::Wake);
        };
        if let Some(detail) = ended {
            self.bus.publish(Kind::Monitor { detail });
            progressed = true;
        }
        self.roll = Some(roll);
        progressed
    }
}
