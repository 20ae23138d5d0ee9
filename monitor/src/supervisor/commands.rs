//! The commands of the API and `ctl` (start, stop, restart, signal, clear), and the holds that order a stop
//! or restart of several programs, dependents first.

use super::{Hold, Proc, Supervisor};
use crate::child;
use crate::machine::{Event, State};
use crate::status::{ALREADY_STARTED, Command, CommandError, NOT_RUNNING, REMOVED, Reply};

impl Supervisor {
    pub(super) fn command(&mut self, cmd: Command) -> Result<Reply, CommandError> {
        if self.shutting_down && !matches!(cmd, Command::Plan(_) | Command::Avail(_)) {
            return Err(CommandError::ShuttingDown);
        }
        match cmd {
            Command::Start(names) => Ok(Reply::Results(self.each(
                &names,
                |p| p.shown_state() == State::Running,
                Some(ALREADY_STARTED),
                |s, name, _, alone| s.user_start(name, alone),
            )?)),
            Command::Stop(names) => Ok(Reply::Results(self.each(
                &names,
                |p| matches!(p.shown_state(), State::Stopped | State::Exited) && !p.wanted,
                Some(NOT_RUNNING),
                |s, name, picked, _| s.user_stop(name, picked),
            )?)),
            Command::Restart(names) => Ok(Reply::Results(self.each(
                &names,
                |_| false,
                None,
                |s, name, picked, _| s.user_restart(name, picked),
            )?)),
            Command::Signal(names, sig) => Ok(Reply::Results(self.each(
                &names,
                |p| !p.m.state.has_process(),
                // A signal for a program without a process was not delivered: a failure, as in supervisorctl.
                None,
                |s, name, _, _| s.user_signal(name, sig),
            )?)),
            Command::Roll(names, limit) => self.begin_roll(&names, limit, false),
            Command::Clear(names) => Ok(Reply::Results(self.each(
                &names,
                |_| false,
                None,
                |s, name, _, _| s.user_clear(name),
            )?)),
            Command::Plan(cfg) => Ok(Reply::Plan(self.plan(&cfg))),
            Command::Avail(cfg) => Ok(Reply::Avail(self.avail(&cfg))),
            Command::Update(cfg, rolling, names, _) if names.is_empty() => {
                Ok(Reply::Plan(self.update(cfg, rolling)))
            }
            Command::Update(cfg, rolling, names, only) => {
                Ok(Reply::Plan(self.update_named(cfg, rolling, &names, only)?))
            }
            Command::Shutdown => {
                self.begin_shutdown();
                Ok(Reply::Done)
            }
        }
    }

    /// The programs `names` pick (see [`crate::select::resolve`]), in start order within each name, and
    /// whether each was named on its own rather than picked by a pattern (`all`, a group).
    pub(crate) fn resolve(&self, names: &[String]) -> Result<Vec<(String, bool)>, CommandError> {
        if names.is_empty() {
            return Err(CommandError::NoNames);
        }
        let programs: Vec<(&str, &str)> = (self.order.iter())
            .map(|n| (n.as_str(), self.procs[n].spec.group.as_str()))
            .collect();
        let picked = crate::select::resolve(&programs, &self.cfg.groups, names)
            .map_err(|n| CommandError::Unknown(n.to_string()))?;
        Ok((picked.into_iter())
            .map(|(i, alone)| (self.order[i].clone(), alone))
            .collect())
    }

    /// Applies `f` to each program `names` pick, in the order they pick them, with every program picked (the
    /// holds of a stop read them, so they order it whatever the order of the names). As supervisorctl
    /// does, a program a pattern picked that is already where the command would take it (`moot`: `start all`
    /// meets one running) is left out rather than answered with an error; one named on its own always gets its
    /// answer: `f`'s refusal `already` (`already started`) then marks it [`ActionResult::already`]. `f` is
    /// told whether the program was named on its own.
    pub(super) fn each(
        &mut self,
        names: &[String],
        moot: impl Fn(&Proc) -> bool,
        already: Option<&str>,
        mut f: impl FnMut(&mut Self, &str, &[String], bool) -> (bool, String),
    ) -> Result<Vec<crate::status::ActionResult>, CommandError> {
        let (picked, alone): (Vec<String>, Vec<bool>) = (self.resolve(names)?.into_iter())
            .filter(|(name, alone)| *alone || !self.procs.get(name).is_some_and(&moot))
            .unzip();
        Ok(picked
            .iter()
            .zip(alone)
            .map(|(name, alone)| {
                let (ok, message) = f(self, name, &picked, alone);
                let state = self.procs.get(name).map_or(State::Stopped, Proc::shown_state);
                crate::status::ActionResult {
                    name: name.clone(),
                    ok,
                    state,
                    already: !ok && already == Some(message.as_str()),
                    message,
                }
            })
            .collect())
    }

    /// A start; `alone`: the program was named on its own, not picked by a pattern (`all`, a group).
    pub(super) fn user_start(&mut self, name: &str, alone: bool) -> (bool, String) {
        let Some(p) = self.procs.get_mut(name) else {
            return (false, "gone".into());
        };
        if p.removing {
            return (false, REMOVED.into());
        }
        match p.held {
            // Still running: it just stays so.
            Some(Hold::Stop) => {
                p.held = None;
                return (true, "stop cancelled".into());
            }
            // The restart starts it anyway.
            Some(Hold::Restart) => return (true, "starting once stopped".into()),
            None => {}
        }
        if p.m.state == State::Stopping {
            // Started again as soon as the stop ends, as `stop` then `start` in a script means (a restart
            // under way does that itself).
            p.wanted = !p.m.restart_pending();
            return (true, "starting once stopped".into());
        }
        if p.m.state == State::Starting && !alone {
            // Under way: `start all` takes it as its own and waits for its outcome, where leaving it out (as
            // supervisorctl does, and this did) returned with it still STARTING and its failure unsaid.
            // Named on its own it answers `already started`, as supervisorctl does (and is waited for too).
            return (true, "starting".into());
        }
        if p.m.state.has_process() {
            return (false, ALREADY_STARTED.into());
        }
        p.wanted = true;
        p.wanted_restart = false;
        (true, "starting".into())
    }

    pub(super) fn user_stop(&mut self, name: &str, picked: &[String]) -> (bool, String) {
        let dependents = self.dependents_among(name, picked);
        let Some(p) = self.procs.get_mut(name) else {
            return (false, "gone".into());
        };
        let was_wanted = std::mem::take(&mut p.wanted);
        p.wanted_restart = false;
        match p.held {
            Some(Hold::Stop) => return (true, "stopping".into()),
            Some(Hold::Restart) => {
                p.held = Some(Hold::Stop);
                return (true, "stopping (restart cancelled)".into());
            }
            None => {}
        }
        let state = p.m.state;
        if matches!(state, State::Stopped | State::Exited | State::Stopping) {
            // A restart still stopping the process would start it again: the stop cancels that start.
            if p.m.restart_pending() {
                self.event(name, Event::Stop);
                return (true, "stopping (restart cancelled)".into());
            }
            // Still on its way down: the stop is under way, not moot, so `ctl stop` waits for it to end as
            // it would have (it answered `not running` at once, while the process still ran).
            if state == State::Stopping && !was_wanted {
                return (true, "stopping".into());
            }
            return (
                was_wanted,
                if was_wanted {
                    "pending start cancelled".into()
                } else {
                    NOT_RUNNING.into()
                },
            );
        }
        if !dependents.is_empty() && state.has_process() {
            p.held = Some(Hold::Stop);
            return (true, format!("stopping after {}", dependents.join(", ")));
        }
        self.event(name, Event::Stop);
        (true, "stopping".into())
    }

    pub(crate) fn user_restart(&mut self, name: &str, picked: &[String]) -> (bool, String) {
        let dependents = self.dependents_among(name, picked);
        let after_dependencies = self.depends_on_any(name, picked);
        let Some(p) = self.procs.get_mut(name) else {
            return (false, "gone".into());
        };
        if p.removing {
            return (false, REMOVED.into());
        }
        if p.held.is_some() {
            p.held = Some(Hold::Restart);
            return (true, "restarting".into());
        }
        let running = p.m.state.has_process() && p.m.state != State::Stopping;
        if running && !dependents.is_empty() {
            p.held = Some(Hold::Restart);
            return (true, format!("restarting after {}", dependents.join(", ")));
        }
        // Restarted straight away, a program whose dependency is down (stopped, or failing its readiness
        // probe) came back without it, where `start` would have waited for it.
        let unready = !self.waiting_for(name).is_empty();
        let Some(p) = self.procs.get_mut(name) else {
            return (false, "gone".into());
        };
        if running && (after_dependencies || unready) {
            // What it depends on restarts too, or is not ready: it starts again once that is back and ready.
            p.wanted = true;
            p.wanted_restart = true;
            self.event(name, Event::Stop);
        } else if running {
            self.event(name, Event::Restart);
        } else if !p.m.restart_pending() {
            // A restart already under way starts the program itself; a wish kept beside it would start the
            // program again after some later exit.
            p.wanted = true;
        }
        (true, "restarting".into())
    }

    /// Whether `q` is stopped before `p` when one command (or the shutdown) stops both: its stop level is
    /// higher (it depends on `p`, or has a higher `priority` number; see [`crate::program::stop_levels`]).
    pub(super) fn stops_before(&self, q: &Proc, p: &Proc) -> bool {
        let level = |x: &Proc| self.stop_levels.get(&x.spec.group).copied().unwrap_or(0);
        level(q) > level(p)
    }

    /// Programs among `among` that stop before `name` (see [`Self::stops_before`]), still have a process, and pass
    /// `also`.
    pub(super) fn dependents(
        &self,
        name: &str,
        among: &[String],
        also: impl Fn(&Proc) -> bool,
    ) -> Vec<String> {
        let Some(p) = self.procs.get(name) else {
            return Vec::new();
        };
        (among.iter())
            .filter(|n| {
                self.procs
                    .get(*n)
                    .is_some_and(|q| q.m.state.has_process() && self.stops_before(q, p) && also(q))
            })
            .cloned()
            .collect()
    }

    /// Dependents of `name` among `picked` that still run: a command stopping them all stops them before
    /// `name`.
    pub(super) fn dependents_among(&self, name: &str, picked: &[String]) -> Vec<String> {
        self.dependents(name, picked, |_| true)
    }

    /// Whether `name` depends on the group of a program among `picked`.
    pub(super) fn depends_on_any(&self, name: &str, picked: &[String]) -> bool {
        let Some(p) = self.procs.get(name) else {
            return false;
        };
        (picked.iter())
            .filter(|n| *n != name)
            .filter_map(|n| self.procs.get(n))
            .any(|q| p.spec.depends_on.contains(&q.spec.group))
    }

    /// Dependents of `name` being stopped (or held) whose process is still there: `name`'s held stop waits
    /// for them.
    pub fn stopping_dependents(&self, name: &str) -> Vec<String> {
        self.dependents(name, &self.order, |q| {
            q.held.is_some() || q.m.state == State::Stopping
        })
    }

    /// Begins each held stop or restart whose dependents are all down.
    pub(super) fn release_holds(&mut self) -> bool {
        let free: Vec<(String, Hold)> = (self.order.iter())
            .filter_map(|n| Some((n, self.procs.get(n)?.held?)))
            .filter(|(n, _)| self.stopping_dependents(n).is_empty())
            .map(|(n, hold)| (n.clone(), hold))
            .collect();
        for (name, hold) in &free {
            let Some(p) = self.procs.get_mut(name) else {
                continue;
            };
            p.held = None;
            // A liveness restart may have begun meanwhile: a held stop cancels its start, a held restart
            // leaves the start to it.
            let restarting = p.m.restart_pending();
            if *hold == Hold::Restart && !restarting {
                // Started again by `kick` once what it depends on is ready.
                p.wanted = true;
                p.wanted_restart = p.m.state.has_process();
            }
            let stoppable = matches!(
                p.m.state,
                State::Starting | State::Running | State::Backoff | State::Fatal
            );
            if stoppable || (*hold == Hold::Stop && restarting) {
                self.event(name, Event::Stop);
            }
        }
        !free.is_empty()
    }

    pub(super) fn user_signal(&mut self, name: &str, sig: nix::sys::signal::Signal) -> (bool, String) {
        let Some(p) = self.procs.get(name) else {
            return (false, "gone".into());
        };
        if p.pid == 0 || !p.m.state.has_process() {
            return (false, NOT_RUNNING.into());
        }
        match child::signal_group(p.pid, sig) {
            Ok(()) => (true, format!("sent {sig}")),
            Err(e) => (false, format!("cannot send {sig}: {e}")),
        }
    }

    pub(super) fn user_clear(&mut self, name: &str) -> (bool, String) {
        let Some(p) = self.procs.get(name) else {
            return (false, "gone".into());
        };
        // With `redirect_stderr` the stderr log is never written (nor its directory made): clearing it
        // failed the whole command when that directory did not exist.
        let logs = if p.spec.redirect_stderr {
            vec![&p.spec.stdout]
        } else {
            vec![&p.spec.stdout, &p.spec.stderr]
        };
        let paths: Vec<&std::path::Path> = logs.iter().filter_map(|l| l.path.as_deref()).collect();
        if paths.is_empty() {
            return (false, "no log file".into());
        }
        for path in paths {
            if let Err(e) = crate::logs::clear(path) {
                return (false, format!("cannot clear {}: {e}", path.display()));
            }
        }
        (true, "cleared".into())
    }
}
