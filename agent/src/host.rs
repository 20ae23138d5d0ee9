//! Host and process sampling from /proc: CPU utilisation from /proc/stat deltas, memory from
//! /proc/meminfo, the load average, the core count, and a process's CPU (from /proc/PID/stat deltas) and
//! resident memory (/proc/PID/status). Reads are small and bounded; a missing or odd file gives zeroes,
//! never a panic.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use xcluster_proto::report::HostLoad;

/// Kernel clock ticks per second for /proc times (USER_HZ: 100 on every Linux ABI in use).
const TICKS_PER_SEC: f64 = 100.0;

/// Reads at most 64 KiB of a /proc file.
fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// CPU times from the first line of /proc/stat: (busy, total) in ticks, and the number of `cpuN` lines.
pub fn parse_stat(text: &str) -> Option<(u64, u64, u32)> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let cores = lines
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    Some((total.saturating_sub(idle), total, cores.max(1)))
}

/// Memory in use, 0..=1, from /proc/meminfo (1 - MemAvailable/MemTotal).
pub fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    (total > 0.0).then(|| (1.0 - avail / total).clamp(0.0, 1.0))
}

/// utime + stime of a process in ticks, from /proc/PID/stat (the command may contain spaces and parens).
pub fn parse_pid_stat(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory in bytes from /proc/PID/status (`VmRSS: N kB`).
pub fn parse_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The fewest CPU ticks per core a host CPU figure is measured over (0.1 s at 100 Hz): over fewer, the
/// figure before stands. The first report comes a few milliseconds after the agent's first sample, and
/// over one or two ticks in all its CPU read 0, 0.5 or 1 more or less at random.
const MIN_TICKS_PER_CORE: u64 = 10;

/// How long after its first sample the agent makes its first CPU figure: over `MIN_TICKS_PER_CORE` ticks,
/// with room for the ticks' granularity.
pub const FIRST_FIGURE_AFTER: std::time::Duration = std::time::Duration::from_millis(150);

/// Samples the host; keeps the previous CPU counters so each sample is a delta.
#[derive(Debug, Default)]
pub struct HostSampler {
    prev: Option<(u64, u64)>,
    /// The last CPU figure, which stands while too few ticks have passed for a new one.
    cpu: f64,
    procs: BTreeMap<u32, (u64, Instant)>,
    /// The container this agent runs in, looked for at the first sample (`Some(None)`: none).
    container: Option<Option<Container>>,
}

impl HostSampler {
    /// Host CPU, memory, load and cores now: within the container's limits when this agent runs in a
    /// container with limits and one of `instance_pids` (the instances' processes) runs in it too. The first
    /// CPU figure is since boot.
    pub fn sample(&mut self, instance_pids: &[u32]) -> HostLoad {
        let (busy, total, cores) = read_small(Path::new("/proc/stat"))
            .and_then(|t| parse_stat(&t))
            .unwrap_or((0, 0, 1));
        let mut cpu = self.cpu_figure(busy, total, cores);
        let mut mem = read_small(Path::new("/proc/meminfo"))
            .and_then(|t| parse_meminfo(&t))
            .unwrap_or(0.0);
        let mut cores = cores;
        let container = self
            .container
            .get_or_insert_with(|| Container::find(Path::new(CGROUP_ROOT)));
        if let Some(c) = container
            && beside_us(instance_pids)
        {
            let within = c.sample(Instant::now());
            cores = within.cores.map_or(cores, |n| n.min(cores));
            cpu = within.cpu.unwrap_or(cpu);
            mem = within.mem.unwrap_or(mem);
        }
        let load1 = read_small(Path::new("/proc/loadavg"))
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .filter(|l| l.is_finite() && *l >= 0.0)
            .unwrap_or(0.0);
        HostLoad {
            cpu,
            mem,
            load1,
            cores: cores.min(4096),
        }
    }

    /// The host's CPU use, 0..=1, from its busy and total ticks now: since the counters last moved the
    /// figure, once at least [`MIN_TICKS_PER_CORE`] per core have passed (the first: since boot).
    fn cpu_figure(&mut self, busy: u64, total: u64, cores: u32) -> f64 {
        let (db, dt) = match self.prev {
            Some((pb, pt)) => (busy.saturating_sub(pb), total.saturating_sub(pt)),
            None => (busy, total),
        };
        if self.prev.is_some() && dt < MIN_TICKS_PER_CORE * u64::from(cores) {
            return self.cpu;
        }
        self.prev = Some((busy, total));
        if dt > 0 {
            self.cpu = (db as f64 / dt as f64).clamp(0.0, 1.0);
        }
        self.cpu
    }

    /// A process's CPU use in cores since the previous call for that pid, and its RSS in bytes.
    pub fn process(&mut self, pid: u32) -> Option<(f64, u64)> {
        let base = Path::new("/proc").join(pid.to_string());
        let ticks = parse_pid_stat(&read_small(&base.join("stat"))?)?;
        let rss = read_small(&base.join("status"))
            .and_then(|t| parse_rss(&t))
            .unwrap_or(0);
        let now = Instant::now();
        let cpu = match self.procs.insert(pid, (ticks, now)) {
            Some((prev, at)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    ticks.saturating_sub(prev) as f64 / TICKS_PER_SEC / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        Some((cpu, rss))
    }

    /// Forgets pids no longer watched (bounds the map).
    pub fn retain_pids(&mut self, live: &[u32]) {
        self.procs.retain(|p, _| live.contains(p));
    }
}

/// Where a container's own cgroup (v2) is, seen from inside it.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup (v2) of the container this agent runs in, whose limits hold for the programs beside it: a
/// container held to 1 CPU and 2 GiB on a 64-core host reported 64 cores and the host's CPU and memory, idle
/// while it was throttled, and got the weight of a whole idle host. Only in a cgroup namespace of its own
/// (`/proc/self/cgroup` is `0::/`, as in a container): on a host, the agent's cgroup is its own service's,
/// whose limits say nothing of the programs it reports, and the host's figures stand.
#[derive(Debug)]
struct Container {
    root: std::path::PathBuf,
    /// `cpu.stat`'s `usage_usec` and when it was read, for the next figure's delta.
    prev: Option<(u64, Instant)>,
    cpu: Option<f64>,
}

/// A container's figures, where its limits set them.
#[derive(Debug, Default, PartialEq)]
struct Within {
    cores: Option<u32>,
    cpu: Option<f64>,
    mem: Option<f64>,
}

impl Container {
    /// The container's cgroup at `root`, if this process is in a container with cgroup v2.
    fn find(root: &Path) -> Option<Self> {
        let own = read_small(Path::new("/proc/self/cgroup"))?;
        (own.trim() == "0::/" && root.join("cgroup.controllers").exists()).then(|| Self::at(root))
    }

    fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            prev: None,
            cpu: None,
        }
    }

    fn sample(&mut self, now: Instant) -> Within {
        let read = |name: &str| read_small(&self.root.join(name));
        let quota = read("cpu.max").and_then(|t| parse_cpu_max(&t));
        let usage = read("cpu.stat").and_then(|t| parse_usage_usec(&t));
        if let (Some(cpus), Some(usage)) = (quota, usage) {
            // Use of the quota, over at least the host figure's tenth of a second.
            match self.prev {
                Some((before, at)) if now.duration_since(at).as_micros() >= 100_000 => {
                    let wall = now.duration_since(at).as_micros() as f64;
                    self.cpu = Some((usage.saturating_sub(before) as f64 / (wall * cpus)).clamp(0.0, 1.0));
                    self.prev = Some((usage, now));
                }
                Some(_) => {}
                None => self.prev = Some((usage, now)),
            }
        }
        // The CPUs it may run on (its cpuset, `sched_getaffinity`), at most its quota rounded up: std reads
        // both, from this process's cgroup, which is the container's.
        let cores = std::thread::available_parallelism()
            .ok()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let mem = parse_memory(
            read("memory.current").as_deref(),
            read("memory.max").as_deref(),
            read("memory.stat").as_deref(),
        );
        Within {
            cores,
            cpu: quota.and(self.cpu),
            mem,
        }
    }
}

/// Whether one of `pids` runs in this process's cgroup (`0::/`, seen from inside our cgroup namespace), so
/// the container's limits are theirs. An agent in a container of its own (a Kubernetes sidecar) sees its
/// own limits there, which say nothing of the instances', and would have reported them as theirs; with no
/// instance process to look at (no `pid_file`) the host's figures stand.
fn beside_us(pids: &[u32]) -> bool {
    (pids.iter())
        .any(|p| read_small(Path::new(&format!("/proc/{p}/cgroup"))).is_some_and(|t| t.trim() == "0::/"))
}

/// The CPUs `cpu.max` allows (`"150000 100000"`: 1.5); `None` without a quota (`"max 100000"`).
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut f = text.split_whitespace();
    let quota: f64 = f.next()?.parse().ok()?;
    let period: f64 = f.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0)
        .then(|| quota / period)
        .filter(|c| c.is_finite())
}

/// `usage_usec` of a `cpu.stat`.
fn parse_usage_usec(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("usage_usec "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Memory in use within `memory.max`, 0..=1, as the kernel would reclaim it: `memory.current` less the page
/// cache it can drop (`inactive_file`, as Kubernetes counts a working set); `None` without a limit.
fn parse_memory(current: Option<&str>, max: Option<&str>, stat: Option<&str>) -> Option<f64> {
    let max: f64 = max?.trim().parse().ok().filter(|m: &f64| *m > 0.0)?;
    let current: f64 = current?.trim().parse().ok()?;
    let inactive: f64 = (stat.unwrap_or_default().lines())
        .find_map(|l| l.strip_prefix("inactive_file "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0.0);
    Some(((current - inactive).max(0.0) / max).clamp(0.0, 1.0))
}

/// Reads a pid file (a decimal pid, surrounding whitespace ignored).
pub fn read_pid_file(path: &Path) -> Option<u32> {
    read_small(path)?.trim().parse().ok().filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// In a container with limits, its figures are within them: CPU as a share of its quota, memory of its
    /// `memory.max` (less the page cache the kernel can drop); without a limit, none (the host's stand).
    #[test]
    fn a_containers_figures_are_within_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cpu.max", "150000 100000\n");
        write("cpu.stat", "usage_usec 1000000\nuser_usec 1\n");
        write("memory.max", "2000\n");
        write("memory.current", "1500\n");
        write("memory.stat", "anon 900\ninactive_file 500\n");
        let mut c = Container::at(dir.path());
        let t0 = Instant::now();
        let first = c.sample(t0);
        assert_eq!((first.cpu, first.mem), (None, Some(0.5)));
        assert!(first.cores.is_some_and(|n| n >= 1));
        // 0.75 s of CPU in 1 s, of 1.5 CPUs: half the quota.
        write("cpu.stat", "usage_usec 1750000\n");
        assert_eq!(c.sample(t0 + std::time::Duration::from_secs(1)).cpu, Some(0.5));
        // No limits: no figures of its own.
        write("cpu.max", "max 100000\n");
        write("memory.max", "max\n");
        let free = c.sample(t0 + std::time::Duration::from_secs(2));
        assert_eq!((free.cpu, free.mem), (None, None));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_memory(Some("10"), Some("0"), None), None);
    }

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
        assert_eq!(parse_stat(stat), Some((150, 1000, 2)));
        assert_eq!(parse_stat("bogus"), None);
        let mem = "MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    250 kB\n";
        assert_eq!(parse_meminfo(mem), Some(0.75));
        let pid = "42 (my (odd) app) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 100 1000 10";
        assert_eq!(parse_pid_stat(pid), Some(10));
        assert_eq!(parse_rss("Name: x\nVmRSS:\t  2048 kB\n"), Some(2048 * 1024));
    }

    /// A figure is measured over at least 10 ticks a core: over fewer, the one before stands, and the ticks
    /// count toward the next.
    #[test]
    fn a_cpu_figure_needs_enough_ticks() {
        let mut s = HostSampler::default();
        // Since boot: 300 busy of 1,000.
        assert_eq!(s.cpu_figure(300, 1_000, 2), 0.3);
        // 2 ticks later, both busy: too few for 2 cores; the figure before stands.
        assert_eq!(s.cpu_figure(302, 1_002, 2), 0.3);
        // 20 ticks since the figure was made, 18 of them busy.
        assert_eq!(s.cpu_figure(318, 1_020, 2), 0.9);
    }

    #[test]
    fn samples_this_host_and_process() {
        let mut s = HostSampler::default();
        let h = s.sample(&[]);
        assert!(h.cores >= 1 && (0.0..=1.0).contains(&h.cpu) && (0.0..=1.0).contains(&h.mem));
        let (_, rss) = s.process(std::process::id()).unwrap();
        assert!(rss > 0);
    }
}
