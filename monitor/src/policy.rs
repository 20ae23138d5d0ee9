//! The restart policy of one program: Supervisord's `autorestart`/`exitcodes`/`startsecs`/`startretries`/
//! `stopwaitsecs`, plus what Supervisord lacks: exponential backoff with a cap and jitter, a restart budget per
//! window, and an automatic retry of FATAL after a cool-down. Pure functions; the state machine applies them.

use std::time::Duration;

/// `autorestart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRestart {
    /// `true`: restart on any exit.
    Always,
    /// `false`: never restart.
    Never,
    /// `"unexpected"`: restart unless the exit code is in `exitcodes` (a death by signal is unexpected).
    Unexpected,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub autorestart: AutoRestart,
    pub exitcodes: Vec<i32>,
    pub startsecs: Duration,
    pub startretries: u32,
    pub stopwait: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_jitter: f64,
    pub backoff_reset: Duration,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub fatal_retry: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            autorestart: AutoRestart::Unexpected,
            exitcodes: vec![0],
            startsecs: Duration::from_secs(1),
            startretries: 3,
            stopwait: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            backoff_jitter: 0.2,
            backoff_reset: Duration::from_secs(60),
            max_restarts: 20,
            restart_window: Duration::from_secs(60),
            fatal_retry: Some(Duration::from_secs(300)),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// How people read an exit, in `ctl status`, the failure of a `ctl start` and the monitor's log: `exit status 3`,
/// `killed by signal 9 (SIGKILL)`; an adopted process's exit (not our child) is `status unknown`.
impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit status {code}"),
            (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => write!(f, "killed by signal {sig} ({name})"),
                // A real-time signal has no name of its own.
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            (None, None) => f.write_str("status unknown"),
        }
    }
}

impl Policy {
    /// Whether an exit from RUNNING should be followed by a restart.
    pub fn should_restart(&self, exit: ExitInfo) -> bool {
        match self.autorestart {
            AutoRestart::Always => true,
            AutoRestart::Never => false,
            AutoRestart::Unexpected => match exit.code {
                Some(c) => !self.exitcodes.contains(&c),
                None => true,
            },
        }
    }

    /// The delay before attempt number `n` (1-based) of a streak: `initial * 2^(n-1)`, capped, with up to
    /// `jitter` of it randomised downwards by `rand01` (a number in `0..1`), so many programs crashing together
    /// do not restart in lockstep.
    pub fn backoff(&self, n: u32, rand01: f64) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        let base = self
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        let cut = base.as_secs_f64() * self.backoff_jitter * rand01.clamp(0.0, 1.0);
        base.saturating_sub(Duration::from_secs_f64(cut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exitcodes_decide_unexpected() {
        let p = Policy {
            exitcodes: vec![0, 2],
            ..Policy::default()
        };
        let code = |c| ExitInfo {
            code: Some(c),
            signal: None,
        };
        assert!(!p.should_restart(code(0)));
        assert!(!p.should_restart(code(2)));
        assert!(p.should_restart(code(1)));
        assert!(p.should_restart(ExitInfo {
            code: None,
            signal: Some(9)
        }));
        let always = Policy {
            autorestart: AutoRestart::Always,
            ..p.clone()
        };
        assert!(always.should_restart(code(0)));
        let never = Policy {
            autorestart: AutoRestart::Never,
            ..p
        };
        assert!(!never.should_restart(code(1)));
    }

    #[test]
    fn exits_read_as_words() {
        let exit = |code, signal| ExitInfo { code, signal }.to_string();
        assert_eq!(exit(Some(3), None), "exit status 3");
        assert_eq!(exit(None, Some(9)), "killed by signal 9 (SIGKILL)");
        assert_eq!(exit(None, Some(40)), "killed by signal 40");
        assert_eq!(exit(None, None), "status unknown");
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_down() {
        let p = Policy {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            backoff_jitter: 0.5,
            ..Policy::default()
        };
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 0.0), Duration::from_millis(200));
        assert_eq!(p.backoff(4, 0.0), Duration::from_millis(800));
        assert_eq!(p.backoff(5, 0.0), Duration::from_millis(1000));
        assert_eq!(p.backoff(40, 0.0), Duration::from_millis(1000));
        assert_eq!(p.backoff(5, 1.0), Duration::from_millis(500));
    }
}
