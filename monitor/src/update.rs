//! Reread and update: the plan between the running processes and a new config (added / changed / removed,
//! by comparing fully expanded specs), and applying it so that unchanged processes are not touched at all.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::events::Kind;
use crate::machine::Event;
use crate::status::{Avail, CommandError, Only, Plan, Reply};
use crate::supervisor::Supervisor;

/// How long each program of a roll an update begins by itself may take to run and be ready again.
pub const ROLL_LIMIT: Duration = Duration::from_secs(60);

impl Supervisor {
    /// What applying `cfg` would change.
    pub(crate) fn plan(&self, cfg: &Config) -> Plan {
        let mut plan = Plan::default();
        for spec in cfg.processes.iter() {
            match self.procs.get(&spec.name) {
                None => plan.added.push(spec.name.clone()),
                Some(p) if p.removing || **p.replacement.as_ref().unwrap_or(&p.spec) != *spec => {
                    plan.changed.push(spec.name.clone())
                }
                Some(_) => {}
            }
        }
        for name in &self.order {
            if !cfg.processes.iter().any(|s| s.name == *name) && !self.procs[name].removing {
                plan.removed.push(name.clone());
            }
        }
        plan
    }

    /// `ctl avail`: the file's programs in its order, then the running ones it no longer has.
    pub(crate) fn avail(&self, cfg: &Config) -> Vec<Avail> {
        let plan = self.plan(cfg);
        let pending = |name: &str| {
            let lists = [
                ("added", &plan.added),
                ("changed", &plan.changed),
                ("removed", &plan.removed),
            ];
            (lists.into_iter())
                .find(|(_, list)| list.iter().any(|n| n == name))
                .map(|(word, _)| word)
        };
        let mut out: Vec<Avail> = (cfg.processes.iter())
            .map(|s| Avail {
                name: s.name.clone(),
                group: s.group.clone(),
                in_use: self.procs.contains_key(&s.name),
                autostart: s.autostart,
                priority: s.priority,
                pending: pending(&s.name),
            })
            .collect();
        for name in &self.order {
            if out.iter().any(|a| a.name == *name) {
                continue;
            }
            let p = &self.procs[name];
            out.push(Avail {
                name: name.clone(),
                group: p.spec.group.clone(),
                in_use: true,
                autostart: p.spec.autostart,
                priority: p.spec.priority,
                pending: pending(name),
            });
        }
        out
    }

    /// Holds `cfg`'s program changes for `ctl update` (`auto_update = false`): what they are is kept for the
    /// status, and said once in the log and as an event, since nothing else shows that the file and the
    /// running programs now differ.
    pub(crate) fn hold(&mut self, cfg: &Config) {
        // The monitor's own settings apply now; only the programs' changes wait. (Only `set_config`, which an
        // update reaches, set the history's size: a changed `events_history` waited for an update that,
        // with nothing else changed, never came.)
        self.bus.set_capacity(cfg.events_history);
        let plan = self.plan(cfg);
        if plan == Plan::default() {
            self.pending = None;
            return;
        }
        if self.pending.as_ref() != Some(&plan) {
            tracing::info!(
                added = ?plan.added,
                changed = ?plan.changed,
                removed = ?plan.removed,
                "config saved with auto_update = false: its program changes wait for `xcluster ctl update`"
            );
            self.bus.publish(Kind::Pending {
                added: plan.added.clone(),
                changed: plan.changed.clone(),
                removed: plan.removed.clone(),
            });
        }
        self.pending = Some(plan);
    }

    /// Applies `cfg`: adds and starts new processes, stops and replaces changed ones, stops and drops removed
    /// ones; unchanged processes keep running with their pids. A changed program that runs and is to be
    /// rolled (`rolling`, from `update --rolling`, or its `update_strategy = "rolling"`) keeps its process
    /// with the new spec pending, and a roll restarts those one at a time (each given `rolling`, else
    /// [`ROLL_LIMIT`]); its restart takes the new spec once the old process is gone (see `kick`). A roll
    /// under way takes them on at its end. A program the roll does not reach (it stopped at one that did not
    /// come back) runs on with its old spec until its next restart. Applying the same config again, as the
    /// reloader does after `ctl update`, changes nothing.
    pub(crate) fn update(&mut self, cfg: Arc<Config>, rolling: Option<Duration>) -> Plan {
        let plan = self.plan(&cfg);
        let mut order: Vec<String> = cfg.processes.iter().map(|s| s.name.clone()).collect();
        // Programs an earlier update is removing, still stopping: not in `plan.removed` (nothing new to do),
        // but listed until gone, as `kick` finishes a removal only for what the order lists. Dropped here, one
        // stayed in the supervisor for good after a second update (a save, then `ctl update`).
        let removing = (self.order.iter())
            .filter(|n| self.procs.get(*n).is_some_and(|p| p.removing) && !order.contains(n))
            .cloned()
            .collect::<Vec<_>>();
        order.extend(removing);
        self.apply(cfg, rolling, plan, order)
    }

    /// `ctl update NAME...` (supervisorctl's `update GROUP`, `add` and `remove` in one): applies only the
    /// changes of the programs `names` pick (a name, `group:*` or `all`, among the running programs and the
    /// file's); the others stay as they run, and stay pending. Refused when `cfg` applies every saved change
    /// by itself (`auto_update = true`: the reload right after would apply the rest), and when it would
    /// leave a program whose dependency group has no program: an added program whose dependency is added
    /// but not named, or a removal of the last program of a group a remaining program depends on. With
    /// `only` (`ctl add`, `ctl remove`), only the picked programs' additions or removals apply, and none to
    /// apply is refused, as supervisorctl's `add` of a program in use is.
    pub(crate) fn update_named(
        &mut self,
        cfg: Arc<Config>,
        rolling: Option<Duration>,
        names: &[String],
        only: Option<crate::status::Only>,
    ) -> Result<Plan, CommandError> {
        if cfg.auto_update {
            // Named after the verb the user typed: an `add` refused for what `update NAME` needs is a puzzle.
            let verb = match only {
                Some(crate::status::Only::Added) => "`add NAME` adds a new program",
                Some(crate::status::Only::Removed) => "`remove NAME` drops a program gone from the file",
                None => "`update NAME` applies one program's change",
            };
            return Err(CommandError::Partial(format!(
                "auto_update = true applies every saved change; {verb} only with auto_update = false"
            )));
        }
        let mut known: Vec<(&str, &str)> = (cfg.processes.iter())
            .map(|s| (s.name.as_str(), s.group.as_str()))
            .collect();
        for name in &self.order {
            if !known.iter().any(|(n, _)| n == name) {
                known.push((name.as_str(), self.procs[name].spec.group.as_str()));
            }
        }
        // A group names what it holds in either config: one new in the file, or one that it drops.
        let mut groups = (*cfg.groups).clone();
        for (name, programs) in self.cfg.groups.iter() {
            let group = groups.entry(name.clone()).or_default();
            for p in programs {
                if !group.contains(p) {
                    group.push(p.clone());
                }
            }
        }
        let picked: Vec<String> = crate::select::resolve(&known, &groups, names)
            .map_err(|n| CommandError::Unknown(n.to_string()))?
            .into_iter()
            .map(|(i, _)| known[i].0.to_string())
            .collect();
        let mut plan = self.plan(&cfg);
        for list in [&mut plan.added, &mut plan.changed, &mut plan.removed] {
            list.retain(|n| picked.contains(n));
        }
        if let Some(only) = only {
            let (verb, why) = match only {
                Only::Added => {
                    plan.changed.clear();
                    plan.removed.clear();
                    (
                        "add",
                        "is new in the saved config (`update NAME` applies a change)",
                    )
                }
                Only::Removed => {
                    plan.added.clear();
                    plan.changed.clear();
                    (
                        "remove",
                        "is gone from the saved config (delete it from the file first)",
                    )
                }
            };
            if plan.added.is_empty() && plan.removed.is_empty() {
                return Err(CommandError::Partial(format!(
                    "nothing to {verb}: no program of {} {why}",
                    names.join(", ")
                )));
            }
            let applies = |i: usize| plan.added.iter().chain(&plan.removed).any(|n| n == known[i].0);
            let skipped = (names.iter())
                .filter(|&name| {
                    let own = crate::select::resolve(&known, &groups, std::slice::from_ref(name))
                        .unwrap_or_default();
                    !own.iter().any(|&(i, _)| applies(i))
                })
                .cloned()
                .collect();
            plan.skipped = skipped;
        }
        self.check_dependencies(&cfg, &plan)?;
        // The programs left out keep their old specs, so the order keeps every program that stays: the new
        // config's order for those it has, then the ones only the old config has (removals left pending).
        let mut kept = self.order.clone();
        kept.retain(|n| !plan.removed.contains(n));
        let mut order: Vec<String> = (cfg.processes.iter())
            .map(|s| s.name.clone())
            .filter(|n| kept.contains(n) || plan.added.contains(n))
            .collect();
        let old_only: Vec<String> = kept.into_iter().filter(|n| !order.contains(n)).collect();
        order.extend(old_only);
        let plan = self.apply(cfg, rolling, plan, order);
        // What is left waits, as a saved config's changes do (the reload that follows says so again).
        let cfg = self.cfg.clone();
        self.hold(&cfg);
        Ok(plan)
    }

    /// Refuses a named update that leaves a dependency group with no program (see [`Self::update_named`]).
    fn check_dependencies(&self, cfg: &Config, plan: &Plan) -> Result<(), CommandError> {
        let after = |name: &str| -> Option<&crate::program::ProcessSpec> {
            if plan.removed.iter().any(|n| n == name) {
                return None;
            }
            let new = || cfg.processes.iter().find(|s| s.name == name);
            if plan.added.iter().chain(&plan.changed).any(|n| n == name) {
                return new();
            }
            let p = self.procs.get(name)?;
            Some(p.replacement.as_deref().unwrap_or(&p.spec))
        };
        let names: Vec<&str> = (self.order.iter().map(String::as_str))
            .chain(plan.added.iter().map(String::as_str))
            .collect();
        let specs: Vec<&crate::program::ProcessSpec> = names.iter().filter_map(|n| after(n)).collect();
        for spec in &specs {
            for group in &spec.depends_on {
                if specs.iter().any(|s| s.group == *group) {
                    continue;
                }
                let removed =
                    (plan.removed.iter()).any(|n| self.procs.get(n).is_some_and(|p| p.spec.group == *group));
                // A valid file has no dependent of a group it removes, so the dependent's own saved change
                // (its removal, or a new `depends_on`) is what is missing: naming the group again would not do.
                let (why, missing) = if removed {
                    ("this update removes its last program", &spec.group)
                } else {
                    ("it is added in the file but not named", group)
                };
                return Err(CommandError::Partial(format!(
                    "{} depends on {group}, and {why}: name {missing}:* too",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Applies `plan`, the changes `cfg` makes (all of them, or a named update's part), with `order` the
    /// start order of the programs that stay. The order is in place before a roll begins: a roll resolves
    /// its programs through it, and a program of the file that a named update left out is not one (the
    /// monitor panicked on `update --rolling web-0` beside an added, unnamed web-2).
    fn apply(
        &mut self,
        cfg: Arc<Config>,
        rolling: Option<Duration>,
        mut plan: Plan,
        mut order: Vec<String>,
    ) -> Plan {
        self.pending = None;
        let mut to_roll = Vec::new();
        self.set_config(cfg.clone());
        for name in &plan.removed {
            if let Some(p) = self.procs.get_mut(name) {
                p.removing = true;
                p.wanted = false;
                p.held = None;
            }
            self.event(name, Event::Stop);
        }
        for spec in cfg.processes.iter() {
            if plan.added.contains(&spec.name) {
                let mut p = self.new_proc(Arc::new(spec.clone()));
                p.after_removals = true;
                self.procs.insert(spec.name.clone(), p);
            } else if plan.changed.contains(&spec.name) {
                let Some(p) = self.procs.get_mut(&spec.name) else {
                    continue;
                };
                let runs = p.m.state.has_process();
                // Back to the settings its process runs (a change left pending by a roll that stopped, or
                // not reached yet, then reverted in the file): the pending change is dropped and the process
                // left alone. It was restarted onto what it already ran. (One stopping for that change
                // starts again on these settings, as it is still wanted.)
                if runs && !p.removing && *p.spec == *spec {
                    p.replacement = None;
                    continue;
                }
                if (rolling.is_some() || spec.rolling_update) && runs && !p.removing {
                    p.replacement = Some(Arc::new(spec.clone()));
                    to_roll.push(spec.name.clone());
                    continue;
                }
                let active = runs || p.wanted;
                p.removing = false;
                p.replacement = Some(Arc::new(spec.clone()));
                p.wanted = spec.autostart || active;
                p.wanted_restart = false;
                p.held = None;
                self.event(&spec.name, Event::Stop);
            }
        }
        // Processes still being removed stay at the end until gone.
        order.extend(plan.removed.iter().cloned());
        self.order = order;
        self.restamp_stop_levels();
        if plan != Plan::default() {
            self.bus.publish(Kind::Update {
                added: plan.added.clone(),
                changed: plan.changed.clone(),
                removed: plan.removed.clone(),
            });
        }
        if !to_roll.is_empty() {
            plan.roll = if self.extend_roll(&to_roll) {
                self.roll.as_ref().map(|r| r.status.clone())
            } else {
                match self.begin_roll(&to_roll, rolling.unwrap_or(ROLL_LIMIT), true) {
                    Ok(Reply::Roll(roll)) => roll,
                    _ => None,
                }
            };
        }
        plan
    }
}
