//! The limit on open descriptors (`RLIMIT_NOFILE`). Every connection costs a descriptor, two through the
//! proxy, and the soft limit a process starts with is often 1024: systemd's default for services
//! (`LimitNOFILE=1024:524288`, a low soft limit for programs that still use `select`, and a high hard one
//! for those that raise their own) and most login shells'. Under it a balancer configured for 20,000 proxied
//! connections met EMFILE after about 500, and its accept loop backed off while clients waited. So each role
//! raises its soft limit to the hard one as it starts ([`raise`]), as Go's runtime and HAProxy do, and warns
//! when what its config may hold needs more than that ([`check`]), at start and at each reload.
//!
//! The programs a monitor starts get the soft limit the monitor was started with ([`restore_inherited`]), as
//! Go's runtime gives the processes it starts: a program built on `select` fails on a descriptor above 1024,
//! and one that closes every descriptor up to its limit as it starts took seconds over a million of them.

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit this process was started with, once [`raise`] raised it (0: not raised).
static INHERITED_SOFT: AtomicU64 = AtomicU64::new(0);

use tracing::{info, warn};

/// Descriptors a role holds besides its connections: listeners, log files, the config watcher, eventfds,
/// pipes, a database, health-check sockets.
pub const BASE_DESCRIPTORS: u64 = 256;

/// The soft and hard limits now (`None`: unreadable).
fn get() -> Option<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fills one rlimit on the stack.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0).then_some((l.rlim_cur, l.rlim_max))
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: reads one rlimit from the stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises the soft limit to the hard one, and logs it when it moves. Best effort: a failure is logged and the
/// limit stays as it was.
pub fn raise() {
    let Some((soft, hard)) = get() else {
        return;
    };
    if soft >= hard {
        return;
    }
    match set(hard, hard) {
        Ok(()) => {
            INHERITED_SOFT.store(soft, Ordering::Relaxed);
            info!(
                from = soft,
                to = hard,
                "raised the open-descriptor limit (RLIMIT_NOFILE) to its hard limit"
            )
        }
        Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-descriptor limit (RLIMIT_NOFILE)"),
    }
}

/// Puts the soft limit back to the one this process was started with, if [`raise`] raised it: for a child
/// between its fork and its exec. Makes only async-signal-safe calls (`getrlimit`, `setrlimit`) and
/// allocates nothing; best effort.
pub fn restore_inherited() {
    let soft = INHERITED_SOFT.load(Ordering::Relaxed);
    if soft == 0 {
        return;
    }
    if let Some((_, hard)) = get() {
        let _ = set(soft, hard);
    }
}

/// The soft limit, when it is below `needed` descriptors.
pub fn short_of(needed: u64) -> Option<u64> {
    let (limit, _) = get()?;
    (needed > limit).then_some(limit)
}

/// Warns when `needed` descriptors (what the config lets the role hold at once: its connections, and
/// [`BASE_DESCRIPTORS`]) are more than the limit allows, saying what runs out and how to raise it. Once per
/// distinct need, so a reload that changes nothing says nothing again.
pub fn check(role: &str, needed: u64) {
    static WARNED_FOR: AtomicU64 = AtomicU64::new(0);
    let Some(limit) = short_of(needed) else {
        WARNED_FOR.store(0, Ordering::Relaxed);
        return;
    };
    if WARNED_FOR.swap(needed, Ordering::Relaxed) == needed {
        return;
    }
    warn!(
        role,
        limit,
        needed,
        "the open-descriptor limit (RLIMIT_NOFILE) is below what this config may hold at once (its \
         max_connections): connections past the limit fail with EMFILE; raise the hard limit (systemd \
         LimitNOFILE=, ulimit -Hn, /etc/security/limits.conf) or lower max_connections"
    );
}

/// Writes `process_open_fds` and `process_max_fds` at each scrape (a [`crate::telemetry::Collector`]), under the
/// names Prometheus's own client libraries give them, so an alert on their ratio warns before EMFILE instead
/// of after, and dashboards made for other services read ours. A figure that cannot be read is left out.
pub fn collect(out: &mut crate::telemetry::Exposition) {
    use crate::metrics::{PROCESS_MAX_FDS, PROCESS_OPEN_FDS};
    use crate::telemetry::Kind;
    // Counting the entries opens the directory, one descriptor more than the process holds otherwise: close
    // enough for a ratio against thousands.
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.family(PROCESS_OPEN_FDS, Kind::Gauge);
        out.sample(PROCESS_OPEN_FDS, &[], dir.count() as f64);
    }
    if let Some((soft, _)) = get() {
        out.family(PROCESS_MAX_FDS, Kind::Gauge);
        out.sample(PROCESS_MAX_FDS, &[], soft as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (soft, hard) = get().unwrap();
        assert!(hard > 64, "a hard limit of {hard} leaves nothing to raise");
        set(64, hard).unwrap();
        raise();
        assert_eq!(get().unwrap(), (hard, hard));
        set(soft, hard).unwrap();
    }
}
