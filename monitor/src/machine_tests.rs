//! Every transition of the state machine, one by one.

use super::*;
use crate::policy::AutoRestart;
use State::*;

fn policy() -> Policy {
    Policy {
        startsecs: Duration::from_secs(1),
        startretries: 2,
        stopwait: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        backoff_jitter: 0.0,
        backoff_reset: Duration::from_secs(60),
        max_restarts: 3,
        restart_window: Duration::from_secs(60),
        fatal_retry: Some(Duration::from_secs(30)),
        ..Policy::default()
    }
}

const CRASH: ExitInfo = ExitInfo {
    code: Some(1),
    signal: None,
};
const CLEAN: ExitInfo = ExitInfo {
    code: Some(0),
    signal: None,
};
const KILLED: ExitInfo = ExitInfo {
    code: None,
    signal: Some(9),
};

struct T {
    m: Machine,
    p: Policy,
    now: Instant,
}

impl T {
    fn new() -> Self {
        Self {
            m: Machine::new(),
            p: policy(),
            now: Instant::now(),
        }
    }
    fn ev(&mut self, ev: Event) -> Step {
        self.m.handle(ev, &self.p, self.now, 0.0)
    }
    fn timer(&mut self) -> Step {
        let g = self.m.generation();
        self.ev(Event::Timer(g))
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
    }
    fn running(&mut self) {
        self.ev(Event::Start);
        self.advance(Duration::from_secs(1));
        self.timer();
        assert_eq!(self.m.state, Running);
    }
}

#[test]
fn stopped_start_starting_spawns_and_arms_startsecs() {
    let mut t = T::new();
    let s = t.ev(Event::Start);
    assert_eq!(t.m.state, Starting);
    assert_eq!(s.transitions, vec![(Stopped, Starting)]);
    assert_eq!(
        s.actions,
        vec![
            Action::Spawn,
            Action::Timer(Duration::from_secs(1), t.m.generation())
        ]
    );
}

#[test]
fn starting_to_running_after_startsecs() {
    let mut t = T::new();
    t.ev(Event::Start);
    let s = t.timer();
    assert_eq!(s.transitions, vec![(Starting, Running)]);
    assert!(s.actions.is_empty());
}

#[test]
fn starting_exit_goes_to_backoff_with_growing_delay() {
    let mut t = T::new();
    t.ev(Event::Start);
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(s.transitions, vec![(Starting, Backoff)]);
    assert_eq!(
        s.actions,
        vec![Action::Timer(Duration::from_millis(100), t.m.generation())]
    );
    let s = t.timer();
    assert_eq!(s.transitions, vec![(Backoff, Starting)]);
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(
        s.actions,
        vec![Action::Timer(Duration::from_millis(200), t.m.generation())]
    );
}

/// `startsecs = 0`: started once spawned, so an exit before the zero timer's message is a RUNNING exit that
/// `autorestart` judges, not a failed start (a one-shot task ran four times and ended FATAL).
#[test]
fn with_startsecs_zero_an_exit_before_the_timer_is_a_running_exit() {
    let mut t = T::new();
    t.p.startsecs = Duration::ZERO;
    t.ev(Event::Start);
    let s = t.ev(Event::Exited(CLEAN));
    assert_eq!(s.transitions, vec![(Starting, Running), (Running, Exited)]);
    assert!(s.actions.is_empty());
    assert_eq!(t.m.start_failures, 0);
    // The timer that comes late changes nothing.
    assert_eq!(t.ev(Event::Timer(1)), Step::default());
    t.ev(Event::Start);
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(
        s.transitions,
        vec![(Starting, Running), (Running, Exited), (Exited, Starting)]
    );
    assert_eq!(t.m.restart_count, 1);
    // A spawn that fails is still a failed start.
    let s = t.ev(Event::SpawnFailed);
    assert_eq!(s.transitions, vec![(Starting, Backoff)]);
}

#[test]
fn spawn_failure_is_a_failed_start() {
    let mut t = T::new();
    t.ev(Event::Start);
    let s = t.ev(Event::SpawnFailed);
    assert_eq!(s.transitions, vec![(Starting, Backoff)]);
}

#[test]
fn backoff_to_fatal_after_startretries_then_automatic_retry() {
    let mut t = T::new();
    t.ev(Event::Start);
    for _ in 0..2 {
        t.ev(Event::Exited(CRASH));
        t.timer();
        assert_eq!(t.m.state, Starting);
    }
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(s.actions, vec![Action::Timer(Duration::ZERO, t.m.generation())]);
    let s = t.timer();
    assert_eq!(s.transitions, vec![(Backoff, Fatal)]);
    assert_eq!(
        s.actions,
        vec![Action::Timer(Duration::from_secs(30), t.m.generation())]
    );
    assert_eq!(t.m.fatal_reason, Some("too many start retries too quickly"));
    assert_eq!(
        t.m.fatal_message(None).as_deref(),
        Some("exited too quickly: exit status 1, gave up after 3 tries")
    );
    // A spawn error is the last try's cause: a successful spawn clears it.
    assert_eq!(
        t.m.fatal_message(Some("cannot find command \"x\"")).as_deref(),
        Some("spawn error: cannot find command \"x\", gave up after 3 tries")
    );
    let s = t.timer();
    assert_eq!(s.transitions, vec![(Fatal, Starting)]);
    assert_eq!(t.m.fatal_reason, None);
    assert_eq!(t.m.fatal_message(None), None);
}

#[test]
fn fatal_without_cooldown_waits_for_start() {
    let mut t = T::new();
    t.p.fatal_retry = None;
    t.p.startretries = 0;
    t.ev(Event::Start);
    t.ev(Event::Exited(CRASH));
    let s = t.timer();
    assert_eq!(s.transitions, vec![(Backoff, Fatal)]);
    assert!(s.actions.is_empty());
    let s = t.ev(Event::Start);
    assert_eq!(s.transitions, vec![(Fatal, Starting)]);
}

#[test]
fn running_exit_expected_stays_exited() {
    let mut t = T::new();
    t.running();
    let s = t.ev(Event::Exited(CLEAN));
    assert_eq!(s.transitions, vec![(Running, Exited)]);
    assert!(s.actions.is_empty());
    assert_eq!(t.m.last_exit, Some(CLEAN));
    let s = t.ev(Event::Start);
    assert_eq!(s.transitions, vec![(Exited, Starting)]);
}

#[test]
fn running_exit_unexpected_restarts_at_once_then_backs_off() {
    let mut t = T::new();
    t.running();
    let s = t.ev(Event::Exited(KILLED));
    assert_eq!(s.transitions, vec![(Running, Exited), (Exited, Starting)]);
    assert_eq!(s.actions[0], Action::Spawn);
    t.timer();
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(s.transitions, vec![(Running, Exited), (Exited, Backoff)]);
    assert_eq!(
        s.actions,
        vec![Action::Timer(Duration::from_millis(100), t.m.generation())]
    );
    t.timer();
    assert_eq!(t.m.state, Starting);
}

#[test]
fn long_healthy_run_resets_the_backoff() {
    let mut t = T::new();
    t.running();
    t.ev(Event::Exited(CRASH));
    t.timer();
    t.advance(Duration::from_secs(61));
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(s.transitions, vec![(Running, Exited), (Exited, Starting)]);
}

#[test]
fn autorestart_modes() {
    for (mode, exit, restarts) in [
        (AutoRestart::Always, CLEAN, true),
        (AutoRestart::Never, CRASH, false),
        (AutoRestart::Unexpected, CLEAN, false),
        (AutoRestart::Unexpected, CRASH, true),
    ] {
        let mut t = T::new();
        t.p.autorestart = mode;
        t.running();
        t.ev(Event::Exited(exit));
        assert_eq!(t.m.state == Starting, restarts, "{mode:?} {exit:?}");
    }
}

#[test]
fn restart_budget_exhausted_is_fatal() {
    let mut t = T::new();
    t.p.backoff_reset = Duration::ZERO; // every run counts as healthy: only the budget stops it
    t.running();
    for _ in 0..3 {
        t.ev(Event::Exited(CRASH));
        t.timer();
        assert_eq!(t.m.state, Running);
    }
    let s = t.ev(Event::Exited(CRASH));
    assert_eq!(s.transitions, vec![(Running, Exited), (Exited, Fatal)]);
    assert_eq!(t.m.fatal_reason, Some("restart budget exhausted"));
    assert_eq!(
        t.m.fatal_message(None).as_deref(),
        Some("restart budget exhausted, last exit status 1")
    );
}

#[test]
fn stop_signals_then_kills_after_stopwait() {
    let mut t = T::new();
    t.running();
    let s = t.ev(Event::Stop);
    assert_eq!(s.transitions, vec![(Running, Stopping)]);
    assert_eq!(
        s.actions,
        vec![
            Action::SignalStop,
            Action::Timer(Duration::from_secs(5), t.m.generation())
        ]
    );
    let s = t.timer();
    assert_eq!(s.actions, vec![Action::Kill]);
    assert_eq!(t.m.state, Stopping);
    let s = t.ev(Event::Exited(KILLED));
    assert_eq!(s.transitions, vec![(Stopping, Stopped)]);
}

#[test]
fn stop_while_starting() {
    let mut t = T::new();
    t.ev(Event::Start);
    let s = t.ev(Event::Stop);
    assert_eq!(s.transitions, vec![(Starting, Stopping)]);
}

#[test]
fn stop_in_backoff_and_fatal_is_stopped() {
    let mut t = T::new();
    t.ev(Event::Start);
    t.ev(Event::Exited(CRASH));
    assert_eq!(t.ev(Event::Stop).transitions, vec![(Backoff, Stopped)]);
    let stale = t.m.generation() - 1;
    assert_eq!(
        t.ev(Event::Timer(stale)),
        Step::default(),
        "the backoff timer is stale now"
    );
    t.p.startretries = 0;
    t.ev(Event::Start);
    t.ev(Event::Exited(CRASH));
    t.timer();
    assert_eq!(t.m.state, Fatal);
    assert_eq!(t.ev(Event::Stop).transitions, vec![(Fatal, Stopped)]);
}

#[test]
fn restart_stops_then_starts() {
    let mut t = T::new();
    t.running();
    let s = t.ev(Event::Restart);
    assert_eq!(s.transitions, vec![(Running, Stopping)]);
    let s = t.ev(Event::Exited(ExitInfo {
        code: None,
        signal: Some(15),
    }));
    assert_eq!(s.transitions, vec![(Stopping, Stopped), (Stopped, Starting)]);
    assert_eq!(t.m.restart_count, 0, "asked for: not counted");
}

#[test]
fn only_restarts_the_monitor_makes_by_itself_count() {
    let mut t = T::new();
    assert_eq!(t.ev(Event::Start).transitions, vec![(Stopped, Starting)]);
    t.running();
    t.ev(Event::Stop);
    t.ev(Event::Exited(CLEAN));
    assert_eq!(t.ev(Event::Restart).transitions, vec![(Stopped, Starting)]);
    assert_eq!(t.m.restart_count, 0);
    t.running();
    // A crash after RUNNING is restarted by the monitor: that one counts.
    t.ev(Event::Exited(ExitInfo {
        code: Some(3),
        signal: None,
    }));
    assert_eq!(t.m.state, Starting);
    assert_eq!(t.m.restart_count, 1);
    t.running();
    // So does a restart for a failing liveness probe, once the process has stopped: as a crash's, the
    // second in a row of a process that died young waits its backoff.
    assert_eq!(t.ev(Event::Unhealthy).transitions, vec![(Running, Stopping)]);
    assert_eq!(t.m.restart_count, 1);
    let s = t.ev(Event::Exited(ExitInfo {
        code: None,
        signal: Some(15),
    }));
    assert_eq!(s.transitions, vec![(Stopping, Stopped), (Stopped, Backoff)]);
    assert_eq!(t.timer().transitions, vec![(Backoff, Starting)]);
    assert_eq!(t.m.restart_count, 2);
}

/// A liveness probe that always fails restarts its program within the restart budget, with the crash
/// backoff, and then the program is FATAL: restarted at once, it went on every few seconds for ever.
#[test]
fn a_liveness_probe_that_always_fails_ends_fatal() {
    let mut t = T::new();
    t.running();
    let mut restarts = 0;
    while t.m.state != Fatal {
        assert!(restarts <= t.p.max_restarts, "restarted past the budget");
        t.ev(Event::Unhealthy);
        t.ev(Event::Exited(ExitInfo {
            code: None,
            signal: Some(15),
        }));
        if t.m.state == Backoff {
            t.timer();
        }
        if t.m.state == Starting {
            t.running();
            restarts += 1;
        }
    }
    assert_eq!(restarts, t.p.max_restarts);
    assert_eq!(t.m.fatal_reason, Some("restart budget exhausted"));
}

#[test]
fn stop_during_restart_cancels_the_start() {
    let mut t = T::new();
    t.running();
    t.ev(Event::Restart);
    assert!(t.m.restart_pending());
    assert_eq!(t.ev(Event::Stop), Step::default());
    assert!(!t.m.restart_pending());
    let s = t.ev(Event::Exited(CLEAN));
    assert_eq!(s.transitions, vec![(Stopping, Stopped)]);
    assert_eq!(t.m.state, Stopped);
    assert_eq!(t.m.restart_count, 0);
}

#[test]
fn meaningless_events_change_nothing() {
    let mut t = T::new();
    assert_eq!(t.ev(Event::Stop), Step::default());
    assert_eq!(t.ev(Event::Exited(CRASH)), Step::default());
    t.running();
    assert_eq!(t.ev(Event::Start), Step::default());
    let old = t.m.generation() - 1;
    assert_eq!(t.ev(Event::Timer(old)), Step::default());
}

#[test]
fn a_restart_through_backoff_is_counted_once() {
    let mut t = T::new();
    t.running();
    // First crash: restarted at once (one restart).
    t.ev(Event::Exited(CRASH));
    assert_eq!((t.m.state, t.m.restart_count), (Starting, 1));
    t.advance(Duration::from_secs(1));
    t.timer();
    // Second crash while young: BACKOFF, then the timer restarts it (one more, not two).
    t.ev(Event::Exited(CRASH));
    assert_eq!(t.m.state, Backoff);
    t.timer();
    assert_eq!((t.m.state, t.m.restart_count), (Starting, 2));
}

#[test]
fn an_adopted_process_is_running_and_restarts_when_it_dies() {
    let mut t = T::new();
    let s = t.m.adopt(t.now);
    assert_eq!(s.transitions, vec![(Stopped, Running)]);
    assert!(s.actions.is_empty());
    assert!(t.m.spawned_at().is_some());
    // Its exit status is unknown (not our child): that is unexpected, so it restarts.
    let s = t.ev(Event::Exited(ExitInfo {
        code: None,
        signal: None,
    }));
    assert_eq!(s.transitions, vec![(Running, Exited), (Exited, Starting)]);
    // Adopting only applies to a process the machine has not started.
    assert_eq!(t.m.adopt(t.now), Step::default());
}
