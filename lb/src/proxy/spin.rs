//! How long an io_uring worker busy-polls its ring before it sleeps (`[proxy] busy_poll_us`).
//!
//! Why: a worker that sleeps is woken by whoever completes its next operation, and on a virtual machine
//! whose idle CPU halts (no guest halt-polling) that wake-up costs the waking CPU an inter-processor
//! interrupt and a trip through the hypervisor. The io_uring worker catches up with its work fast and so
//! slept between most events: on the connection benchmark the load core sent it 0.62 wake-up interrupts per
//! connection, HAProxy's busier loop 0.04. Polling a little before sleeping takes those interrupts off the
//! CPUs that feed the worker, as the kernel's halt-polling would.
//!
//! The window adapts as halt-polling's does, so an idle or lightly loaded worker does not burn its core: a
//! sleep short enough that a longer poll would have caught its wake-up doubles the window (up to the
//! configured most); a longer sleep halves it, down to nothing.

use std::time::Duration;

/// The smallest window a growing one starts from, as a share of the most: a sleep of that order or
/// shorter is what polling saves.
const GROW_START_SHARE: u32 = 4;

/// The adaptive busy-poll window of one worker.
#[derive(Debug, Clone, Copy)]
pub struct Spin {
    max: Duration,
    window: Duration,
}

impl Spin {
    /// A window that starts at, and never exceeds, `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        Self { max, window: max }
    }

    /// The most the window may be.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How long to poll before the next sleep.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether polling is configured at all (then sleeps are timed, to adapt the window).
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// Adapts the window to a sleep of `slept` (after a poll of the current window found nothing).
    pub fn slept(&mut self, slept: Duration) {
        self.window = if slept <= self.max {
            (self.window * 2).clamp(self.max / GROW_START_SHARE, self.max)
        } else if self.window > Duration::from_micros(1) {
            self.window / 2
        } else {
            Duration::ZERO
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(40);

    #[test]
    fn long_sleeps_shrink_the_window_to_nothing_and_short_ones_grow_it_back() {
        let mut s = Spin::new(MAX);
        assert_eq!(s.window(), MAX);
        let long = Duration::from_millis(5);
        let mut seen = Vec::new();
        for _ in 0..7 {
            s.slept(long);
            seen.push(s.window().as_micros());
        }
        assert_eq!(seen, [20, 10, 5, 2, 1, 0, 0], "halved, then nothing");
        // A short sleep: polling would have caught it, so the window restarts at a quarter and doubles.
        let short = Duration::from_micros(15);
        let mut seen = Vec::new();
        for _ in 0..4 {
            s.slept(short);
            seen.push(s.window().as_micros());
        }
        assert_eq!(seen, [10, 20, 40, 40], "grown back, never past the most");
    }

    #[test]
    fn zero_never_polls() {
        let mut s = Spin::new(Duration::ZERO);
        assert!(!s.enabled());
        s.slept(Duration::ZERO);
        s.slept(Duration::from_secs(1));
        assert_eq!(s.window(), Duration::ZERO);
    }
}
