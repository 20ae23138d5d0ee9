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

use crate::machine::State;
use crate::supervisor::{Internal, Proc, Supervisor};

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

/// One program of a roll.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RollStep {
    pub name: String,
    pub step: Step,
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
    pub fn new(id: u64, names: Vec<String>, limit: Duration) -> Self {
        let programs = (names.into_iter())
            .map(|name| RollStep {
                name,
                step: Step::Waiting,
                message: String::new(),
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

    /// The program restarting now, if any.
    pub fn current(&self) -> Option<&str> {
        (self.status.programs.iter())
            .find(|s| s.step == Step::Restarting)
            .map(|s| s.name.as_str())
    }

    /// Ends the roll at its current program with `why`; the programs after it are not restarted.
    pub fn stop(&mut self, why: &str) {
        for s in &mut self.status.programs {
            match s.step {
                Step::Restarting => (s.step, s.message) = (Step::Failed, why.to_string()),
                Step::Waiting => {
                    (s.step, s.message) = (Step::Skipped, "not restarted: the roll stopped".into());
                }
                Step::Done | Step::Failed | Step::Skipped => {}
            }
        }
        self.status.finished = true;
    }
}

/// How a program restarted by a roll stands: `None` while it is on its way back.
fn outcome(p: &Proc) -> Option<Result<String, String>> {
    match p.shown_state() {
        State::Running if Supervisor::is_ready(p) => Some(Ok("started".into())),
        State::Fatal => Some(Err(match p.m.fatal_reason.or(p.spawn_error.as_deref()) {
            Some(why) => format!("spawn error: {why}"),
            None => "spawn error".into(),
        })),
        State::Exited => Some(Err("abnormal termination".into())),
        // Stopped and not about to start: someone stopped it meanwhile.
        State::Stopped if !p.wanted && !p.m.restart_pending() => Some(Err("stopped".into())),
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
    /// Moves the roll on as far as it can go now: settles the program restarting (back and ready, failed,
    /// or past its deadline), then restarts the next. Whether anything changed.
    pub(crate) fn advance_roll(&mut self) -> bool {
        let Some(mut roll) = self.roll.take() else {
            return false;
        };
        let mut progressed = false;
        while !roll.status.finished {
            if let Some(name) = roll.current().map(str::to_string) {
                let settled = match self.procs.get(&name) {
                    None => Some(Err("gone".to_string())),
                    Some(p) => outcome(p).or_else(|| {
                        (roll.deadline.is_some_and(|d| Instant::now() >= d))
                            .then(|| Err(overdue(self, p, &name, roll.limit)))
                    }),
                };
                match settled {
                    None => break,
                    Some(Ok(message)) => {
                        let s = (roll.status.programs.iter_mut()).find(|s| s.name == name);
                        if let Some(s) = s {
                            (s.step, s.message) = (Step::Done, message);
                        }
                    }
                    Some(Err(why)) => {
                        roll.stop(&why);
                        self.roll_ended(&roll, Some((&name, &why)));
                        progressed = true;
                        break;
                    }
                }
                progressed = true;
            }
            let next = (roll.status.programs.iter_mut()).find(|s| s.step == Step::Waiting);
            let Some(next) = next else {
                roll.status.finished = true;
                self.roll_ended(&roll, None);
                break;
            };
            next.step = Step::Restarting;
            let name = next.name.clone();
            let (ok, message) = self.user_restart(&name, std::slice::from_ref(&name));
            if !ok {
                roll.stop(&message);
                self.roll_ended(&roll, Some((&name, &message)));
                break;
            }
            roll.deadline = Some(Instant::now() + roll.limit);
            // Nothing else may reach the supervisor until the deadline: this wakes it then.
            let (tx, limit) = (self.internal.clone(), roll.limit);
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                let _ = tx.send(Internal::Wake);
            });
            progressed = true;
        }
        self.roll = Some(roll);
        progressed
    }

    fn roll_ended(&self, roll: &Roll, failed: Option<(&str, &str)>) {
        let detail = match failed {
            None => format!("rolling restart {} done", roll.status.id),
            Some((name, why)) => format!("rolling restart {} stopped at {name}: {why}", roll.status.id),
        };
        self.bus.publish(crate::events::Kind::Monitor { detail });
    }
}
