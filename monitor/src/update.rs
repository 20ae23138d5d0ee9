//! Reread and update: the plan between the running processes and a new config (added / changed / removed,
//! by comparing fully expanded specs), and applying it so that unchanged processes are not touched at all.

use std::sync::Arc;

use crate::config::Config;
use crate::events::Kind;
use crate::machine::Event;
use crate::status::Plan;
use crate::supervisor::Supervisor;

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

    /// Applies `cfg`: adds and starts new processes, stops and replaces changed ones, stops and drops removed
    /// ones; unchanged processes keep running with their pids.
    pub(crate) fn update(&mut self, cfg: Arc<Config>) -> Plan {
        let plan = self.plan(&cfg);
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
                let active = self
                    .procs
                    .get(&spec.name)
                    .is_some_and(|p| p.m.state.has_process() || p.wanted);
                if let Some(p) = self.procs.get_mut(&spec.name) {
                    p.removing = false;
                    p.replacement = Some(Arc::new(spec.clone()));
                    p.wanted = spec.autostart || active;
                    p.wanted_restart = false;
                    p.held = None;
                }
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
        plan
    }
}
