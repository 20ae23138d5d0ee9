//! Reread and update: the plan between the running processes and a new config (added / changed / removed,
//! by comparing fully expanded specs), and applying it so that unchanged processes are not touched at all.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::events::Kind;
use crate::machine::Event;
use crate::status::{Plan, Reply};
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

    /// Holds `cfg`'s program changes for `ctl update` (`auto_update = false`): what they are is kept for the
    /// status, and said once in the log and as an event, since nothing else shows that the file and the
    /// running programs now differ.
    pub(crate) fn hold(&mut self, cfg: &Config) {
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
        let mut plan = self.plan(&cfg);
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
                let p = self.new_proc(Arc::new(spec.clone()));
                self.procs.insert(spec.name.clone(), p);
            } else if plan.changed.contains(&spec.name) {
                let Some(p) = self.procs.get_mut(&spec.name) else {
                    continue;
                };
                let runs = p.m.state.has_process();
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
        // Start order follows the new config; processes still being removed stay at the end until gone.
        let mut order: Vec<String> = cfg.processes.iter().map(|s| s.name.clone()).collect();
        order.extend(plan.removed.iter().cloned());
        self.order = order;
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
                match self.begin_roll(&to_roll, rolling.unwrap_or(ROLL_LIMIT)) {
                    Ok(Reply::Roll(roll)) => roll,
                    _ => None,
                }
            };
        }
        plan
    }
}
