//! The monitor's configuration: raw serde form, validation, typed form. The per-program section lives in
//! [`crate::program`].
//!
//! Reloads live: `log.level`, `shutdown.*`, `token`/`token_file`, `cluster.*`, `events_history`,
//! `auto_update`, `logfile_maxbytes`/`logfile_backups`, and every `[programs.*]` and `[groups.*]` section (an
//! update touches only the programs whose expanded spec changed; with `auto_update = false` only on `ctl
//! update`).
//! Needs a restart: `listen`, `run_dir`, `log_dir`, `http.*`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::common::{HttpSection, LogSection, ShutdownSection, ShutdownTimes};
use xcluster_runtime::config::absolute;
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

use crate::program::{ProcessSpec, RawProgram};

/// Upper bound on the number of supervised processes (after `numprocs` expansion).
pub const MAX_PROCESSES: usize = 512;

/// `[cluster]`: where the dashboard's cluster view comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RawCluster {
    /// Balancers' API addresses (`host:port`); the dashboard shows each one's `/v1/status`.
    pub balancers: Vec<String>,
    /// Time allowed for one balancer's answer.
    pub timeout_ms: u64,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            balancers: Vec::new(),
            timeout_ms: 500,
        }
    }
}

/// `[groups.<name>]`: programs addressed together by `<name>:*` (Supervisord's `[group:<name>]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RawGroup {
    /// The `[programs.*]` it holds, by name.
    pub programs: Vec<String>,
    /// Supervisord's group `priority`: its programs start (and stop) as one, at this priority among the
    /// others', and by their own `priority` within it. None: each program at its own.
    pub priority: Option<i32>,
}

/// Most programs one `[groups.*]` section may name.
pub const MAX_GROUP_PROGRAMS: usize = 256;

/// The file-facing config (`role = "monitor"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the monitor's HTTP API and dashboard (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    /// Bearer token for mutating API calls. Empty (and no `token_file`) refuses every mutating call.
    pub token: String,
    /// A file holding the token (first line), instead of `token`.
    pub token_file: String,
    /// Where the monitor keeps its lock and state file. Empty: `$TMPDIR/xcluster-monitor-<listen port>`.
    pub run_dir: String,
    /// Default directory of program logs. Empty: `<run_dir>/logs`.
    pub log_dir: String,
    /// How many recent events are kept for `/v1/events` and the dashboard.
    pub events_history: usize,
    /// Whether a saved config's program changes apply at once (true) or wait for `xcluster ctl update`
    /// (false), as Supervisord's `reread` and `update`: `ctl reread` and `ctl status` then show what waits.
    /// The other settings reload live either way.
    pub auto_update: bool,
    /// The monitor's own log (its stderr, when a file: `xcluster up --detach`'s `monitor.log`) rotates once it
    /// holds this many bytes (0: never), as Supervisord's `logfile_maxbytes`.
    pub logfile_maxbytes: u64,
    /// Rotated copies of the monitor's own log kept (`monitor.log.1` ...), as `logfile_backups`.
    pub logfile_backups: u32,
    pub cluster: RawCluster,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
    /// `[http]`: the API server's limits (connections, header timeout and size, declared body size).
    pub http: HttpSection,
    /// The supervised programs, by name.
    pub programs: BTreeMap<String, RawProgram>,
    /// Named groups of programs, by name.
    pub groups: BTreeMap<String, RawGroup>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7300".into(),
            token: String::new(),
            token_file: String::new(),
            run_dir: String::new(),
            log_dir: String::new(),
            events_history: 256,
            auto_update: true,
            logfile_maxbytes: 50 * 1024 * 1024,
            logfile_backups: 10,
            cluster: RawCluster::default(),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
            http: HttpSection::default(),
            programs: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

/// The validated config.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub token: String,
    /// The token file, if any (its permissions are checked at start).
    pub token_file: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    pub events_history: usize,
    /// `auto_update`: program changes apply when the file is saved, not only on `ctl update`.
    pub auto_update: bool,
    /// `logfile_maxbytes` (0: never) and `logfile_backups`: the monitor's own log's rotation.
    pub own_log: (u64, u32),
    pub balancers: Vec<SocketAddr>,
    pub cluster_timeout: Duration,
    pub log_filter: String,
    pub shutdown: ShutdownTimes,
    /// The API server's limits (`[http]`, with `[shutdown]`'s grace period).
    pub http: xcluster_runtime::http::ServerLimits,
    /// Every process after `numprocs` expansion, in start order (`program::order`, then name).
    pub processes: Arc<Vec<ProcessSpec>>,
    /// `[groups.*]`: each named group's programs ([`crate::select::Groups`]).
    pub groups: Arc<crate::select::Groups>,
    /// The programs of `[groups.*]` that set a `priority`, with it and the group's name. Apart from the
    /// programs' specs: a group's priority orders them and nothing else, so changing it, or renaming the
    /// group, restarts nothing.
    pub group_order: Arc<crate::program::GroupOrder>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token never reaches a log.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("run_dir", &self.run_dir)
            .field("processes", &self.processes.len())
            .finish_non_exhaustive()
    }
}

impl RoleConfig for Config {
    const ROLE: &'static str = "monitor";
    type Raw = RawConfig;
    const RESTART_KEYS: &'static [&'static str] = &["listen", "run_dir", "log_dir", "http"];
    // Supervisord's `[include] files = conf.d/*.conf`: one file per program (or group).
    const INCLUDE_SECTIONS: &'static [&'static str] = &["programs", "groups"];

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        raw.log.validate(&mut v);
        let shutdown = raw.shutdown.validate(&mut v);
        let http = raw.http.validate(&mut v, shutdown.grace);
        let token = if !raw.token_file.is_empty() {
            if !raw.token.is_empty() {
                v.error("token_file", "set either token or token_file, not both");
            }
            // Bounded: a token_file naming /dev/zero or a huge file must not exhaust memory (the `config`
            // fuzz target reads whatever files a config names; regression test below).
            // Noted as part of the config: a new token written to the file applies as an edit of the config.
            match xcluster_runtime::config::referenced::read(std::path::Path::new(&raw.token_file)) {
                Ok(bytes) => String::from_utf8_lossy(&bytes)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
                Err(e) => {
                    v.error("token_file", e.to_string());
                    String::new()
                }
            }
        } else {
            raw.token.clone()
        };
        let token_key = if raw.token_file.is_empty() {
            "token"
        } else {
            "token_file"
        };
        v.token(token_key, &token);
        let run_dir = if raw.run_dir.is_empty() {
            std::env::temp_dir().join(format!("xcluster-monitor-{}", listen.port()))
        } else {
            absolute(&raw.run_dir)
        };
        let log_dir = if raw.log_dir.is_empty() {
            run_dir.join("logs")
        } else {
            absolute(&raw.log_dir)
        };
        let events_history = v.range("events_history", raw.events_history, 1, 100_000);
        v.check(
            raw.logfile_maxbytes == 0 || raw.logfile_maxbytes >= 1024,
            "logfile_maxbytes",
            || "0 (no rotation) or at least 1024".into(),
        );
        let logfile_backups = v.range("logfile_backups", raw.logfile_backups, 0, 100);
        let balancers = raw
            .cluster
            .balancers
            .iter()
            .enumerate()
            .map(|(i, b)| v.addr(&format!("cluster.balancers[{i}]"), b))
            .collect();
        let cluster_timeout = v.millis("cluster.timeout_ms", raw.cluster.timeout_ms, 10, 60_000);

        let mut processes = Vec::new();
        let dirs = crate::program::Dirs {
            log_dir: log_dir.clone(),
            run_dir: run_dir.clone(),
        };
        for (name, prog) in &raw.programs {
            processes.extend(prog.expand(name, &dirs, &mut v));
        }
        let groups = check_groups(&raw.groups, &raw.programs, &processes, &mut v);
        let group_order = group_priorities(&raw.groups, &mut v);
        for p in &mut processes {
            p.depends_on = crate::program::through_groups(&p.depends_on, &groups);
        }
        crate::program::check_set(&processes, &mut v);
        check_log_files(&processes, &mut v);
        crate::program::check_programs(&raw.programs, &groups, listen, &mut v);
        if processes.len() > MAX_PROCESSES {
            v.error(
                "programs",
                format!(
                    "{} processes after numprocs expansion (max {MAX_PROCESSES})",
                    processes.len()
                ),
            );
        }
        let order = crate::program::order;
        processes.sort_by(|a, b| (order(a, &group_order), &a.name).cmp(&(order(b, &group_order), &b.name)));
        v.finish(Config {
            listen,
            token,
            token_file: (!raw.token_file.is_empty()).then(|| PathBuf::from(&raw.token_file)),
            run_dir,
            log_dir,
            events_history,
            auto_update: raw.auto_update,
            own_log: (raw.logfile_maxbytes, logfile_backups),
            balancers,
            cluster_timeout,
            log_filter: raw.log.level.clone(),
            shutdown,
            http,
            processes: Arc::new(processes),
            groups: Arc::new(groups),
            group_order: Arc::new(group_order),
        })
    }

    fn redact(raw: &mut RawConfig) {
        if !raw.token.is_empty() {
            raw.token = "<redacted>".into();
        }
        // A program's environment is where its secrets go (a database password), and the monitor cannot
        // tell which values are secret: none is shown. This also keeps them out of the reload diff in the
        // monitor's log, which `GET /v1/log` serves without a token.
        for prog in raw.programs.values_mut() {
            for value in prog.environment.values_mut() {
                *value = "<redacted>".into();
            }
        }
    }
}

impl DaemonConfig for Config {
    fn shutdown(&self) -> ShutdownTimes {
        self.shutdown
    }
    fn log_filter(&self) -> &str {
        &self.log_filter
    }
    /// The API's connections, and per process its two output pipes, its log files and its pidfd.
    fn descriptors(&self) -> u64 {
        let (api, processes) = (self.http.max_connections as u64, self.processes.len() as u64);
        api + 5 * processes + xcluster_runtime::limits::BASE_DESCRIPTORS
    }
}

/// Each rotating log file is written by one stream. Two writers of a file rotate it each by its own count,
/// so one writes on in the file the other moved to a backup: `numprocs = 2` with one `stdout_logfile` lost an
/// instance's last lines off the end of the backups. (`redirect_stderr` writes stderr to the stdout log.)
/// Writers that never rotate may share a file, each appending whole chunks: `stdout_logfile_maxbytes = 0`,
/// or a device such as `/dev/stdout`, Supervisord's idiom in a container, which is never rotated.
fn check_log_files(processes: &[ProcessSpec], v: &mut Validator) {
    let mut writers: BTreeMap<&std::path::Path, (String, bool)> = BTreeMap::new();
    for s in processes {
        let streams = [("stdout", &s.stdout), ("stderr", &s.stderr)];
        for (stream, log) in streams.into_iter().take(if s.redirect_stderr { 1 } else { 2 }) {
            let Some(path) = log.path.as_deref() else {
                continue;
            };
            let rotates = log.maxbytes > 0 && !crate::logs::is_device(path);
            match writers.get(path) {
                Some((first, first_rotates)) if rotates || *first_rotates => v.error(
                    format!("programs.{}.{stream}_logfile", s.group),
                    format!(
                        "{} is also {first} log, and rotates: each stream needs a file of its own (put \
                         {{name}} in the path, or set redirect_stderr), or every writer of it \
                         {stream}_logfile_maxbytes = 0",
                        path.display()
                    ),
                ),
                Some(_) => {}
                None => {
                    writers.insert(path, (format!("{}'s {stream}", s.name), rotates));
                }
            }
        }
    }
}

/// Each program in a `[groups.*]` that sets a `priority`: that priority and the group's name. A program in
/// two groups that set one is refused: its place in the start order would depend on which won. One pass over
/// the groups' names (up to 512 × 256 of them).
fn group_priorities(raw: &BTreeMap<String, RawGroup>, v: &mut Validator) -> crate::program::GroupOrder {
    let mut held: BTreeMap<&str, (i32, &str)> = BTreeMap::new();
    for (name, g) in raw {
        let Some(priority) = g.priority else { continue };
        for program in &g.programs {
            match held.get(program.as_str()) {
                // Named twice in this one: `check_groups` says so.
                Some((_, other)) if other == name => {}
                Some((_, other)) => v.error(
                    format!("groups.{name}.priority"),
                    format!(
                        "{program:?} is also in group {other:?}, which sets a priority too: a program's start \
                         order comes from one group"
                    ),
                ),
                None => {
                    held.insert(program, (priority, name));
                }
            }
        }
    }
    (held.into_iter())
        .map(|(program, (priority, group))| (program.to_string(), (priority, group.to_string())))
        .collect()
}

/// `[groups.*]`: names that select, so none may also be a program's or a process's name (`web:*` would pick
/// two different sets) or `all`; each names programs that exist, each once.
fn check_groups(
    raw: &BTreeMap<String, RawGroup>,
    programs: &BTreeMap<String, RawProgram>,
    processes: &[ProcessSpec],
    v: &mut Validator,
) -> crate::select::Groups {
    let mut groups = crate::select::Groups::new();
    if raw.len() > MAX_PROCESSES {
        v.error("groups", format!("{} groups (max {MAX_PROCESSES})", raw.len()));
        return groups;
    }
    for (name, g) in raw {
        let key = format!("groups.{name}");
        let taken = if name == "all" {
            Some("`all`, which picks every program")
        } else if programs.contains_key(name) {
            Some("a program's name")
        } else if processes.iter().any(|p| p.name == *name) {
            Some("a process's name")
        } else {
            None
        };
        if let Some(what) = taken {
            v.error(
                &key,
                format!("{name:?} is {what}: a group needs a name of its own"),
            );
        }
        if !crate::program::is_name(name, crate::program::MAX_PROGRAM_NAME) {
            v.error(
                &key,
                format!(
                    "group names are 1 to {} letters, digits, '-', '_' or '.'",
                    crate::program::MAX_PROGRAM_NAME
                ),
            );
        }
        if g.programs.is_empty() || g.programs.len() > MAX_GROUP_PROGRAMS {
            v.error(
                format!("{key}.programs"),
                format!("1 to {MAX_GROUP_PROGRAMS} programs"),
            );
        }
        for (i, p) in g.programs.iter().enumerate() {
            if !programs.contains_key(p) {
                v.error(format!("{key}.programs[{i}]"), format!("unknown program {p:?}"));
            } else if g.programs[..i].contains(p) {
                v.error(format!("{key}.programs[{i}]"), format!("{p:?} is named twice"));
            }
        }
        groups.insert(name.clone(), g.programs.clone());
    }
    groups
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `[groups.*]`: a name of its own and programs that exist, each once; a valid one is kept as written.
    #[test]
    fn groups_name_known_programs_under_a_name_of_their_own() {
        let check = |groups: &[(&str, &[&str])]| {
            let mut raw = RawConfig::default();
            for p in ["web", "worker"] {
                let prog = RawProgram {
                    command: "sleep 1000".into(),
                    numprocs: if p == "worker" { 2 } else { 1 },
                    ..RawProgram::default()
                };
                raw.programs.insert(p.into(), prog);
            }
            for (name, programs) in groups {
                let programs = programs.iter().map(|p| p.to_string()).collect();
                let group = RawGroup {
                    programs,
                    ..RawGroup::default()
                };
                raw.groups.insert(name.to_string(), group);
            }
            Config::validate(&raw).map(|c| c.groups).map_err(|issues| {
                (issues.into_iter())
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
            })
        };
        let ok = check(&[("site", &["worker", "web"])]).unwrap();
        assert_eq!(ok.get("site").unwrap(), &["worker", "web"]);
        for (groups, says) in [
            (
                &[("site", &["web", "nope"][..])][..],
                "groups.site.programs[1]: unknown program \"nope\"",
            ),
            (
                &[("site", &["web", "web"])],
                "groups.site.programs[1]: \"web\" is named twice",
            ),
            (&[("site", &[])], "groups.site.programs: 1 to 256 programs"),
            (&[("web", &["worker"])], "groups.web: \"web\" is a program's name"),
            (
                &[("worker-1", &["web"])],
                "groups.worker-1: \"worker-1\" is a process's name",
            ),
            (&[("all", &["web"])], "groups.all: \"all\" is `all`"),
            (&[("a:b", &["web"])], "groups.a:b: group names are 1 to 128"),
        ] {
            let issues = check(groups).unwrap_err();
            assert!(issues.iter().any(|i| i.starts_with(says)), "{says}: {issues:?}");
        }
        let names: Vec<String> = (0..=MAX_PROCESSES).map(|i| format!("g{i}")).collect();
        let many: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &["web"][..])).collect();
        assert_eq!(check(&many).unwrap_err(), ["groups: 513 groups (max 512)"]);
    }

    /// A group's `priority` orders its programs as one among the others, by their own within it (Supervisord's
    /// group priority), for starting and, reversed, for stopping; a program in two groups of different
    /// priorities is refused.
    #[test]
    fn a_groups_priority_orders_its_programs_as_one() {
        let config = |groups: &[(&str, &[&str], i32)]| {
            let mut raw = RawConfig::default();
            for (p, priority) in [("web", 999), ("worker", 5), ("db", 50)] {
                let prog = RawProgram {
                    command: "sleep 1000".into(),
                    priority,
                    ..RawProgram::default()
                };
                raw.programs.insert(p.into(), prog);
            }
            for (name, programs, priority) in groups {
                let group = RawGroup {
                    programs: programs.iter().map(|p| p.to_string()).collect(),
                    priority: Some(*priority),
                };
                raw.groups.insert(name.to_string(), group);
            }
            // A group without a priority holds what it likes.
            let any = RawGroup {
                programs: vec!["web".into(), "db".into()],
                priority: None,
            };
            raw.groups.insert("any".into(), any);
            Config::validate(&raw).map_err(|issues| {
                (issues.into_iter())
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
            })
        };
        let order = |c: &Config| c.processes.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(order(&config(&[]).unwrap()), ["worker", "db", "web"]);
        let c = config(&[("site", &["web", "worker"], 10)]).unwrap();
        assert_eq!(order(&c), ["worker", "web", "db"]);
        let levels = crate::program::stop_levels(c.processes.iter(), &c.group_order);
        assert!(levels["web"] < levels["db"], "db stops first: {levels:?}");
        assert!(levels["worker"] < levels["web"], "{levels:?}");
        // At a program's own priority, the group stays together: db (50) before it or after it, not between.
        let c = config(&[("site", &["web", "worker"], 50)]).unwrap();
        assert_eq!(order(&c), ["db", "worker", "web"]);
        let levels = crate::program::stop_levels(c.processes.iter(), &c.group_order);
        assert!(
            levels["db"] < levels["worker"] && levels["worker"] < levels["web"],
            "{levels:?}"
        );
        // Another group may hold a program, but only one that sets a priority.
        assert_eq!(
            config(&[("a", &["web"], 10), ("b", &["web", "db"], 10)]).unwrap_err(),
            [
                "groups.b.priority: \"web\" is also in group \"a\", which sets a priority too: a program's start \
              order comes from one group"
            ]
        );
    }

    /// Counts past their ranges are errors, not overflows (a panic in a debug or fuzz build, a wrapped port
    /// range in a release one).
    #[test]
    fn counts_past_their_ranges_are_errors_not_overflows() {
        let check = |numprocs: u32, numprocs_start: u32| {
            let mut raw = RawConfig::default();
            let prog = RawProgram {
                command: "sleep 1000".into(),
                numprocs,
                numprocs_start,
                port_base: Some(8000),
                ..RawProgram::default()
            };
            raw.programs.insert("web".into(), prog);
            (Config::validate(&raw).err().unwrap_or_default().into_iter())
                .map(|i| format!("{}: {}", i.key, i.message))
                .collect::<Vec<_>>()
        };
        let issues = check(u32::MAX, 0);
        assert!(
            issues.iter().any(|i| i.starts_with("programs.web.numprocs: ")),
            "{issues:?}"
        );
        assert!(
            issues.iter().any(|i| i.contains("runs past port 65535")),
            "{issues:?}"
        );
        let issues = check(2, u32::MAX);
        assert_eq!(
            issues,
            ["programs.web.numprocs_start: 4294967295 is out of range (0..=1000000)"]
        );
        assert!(check(2, 1_000_000).is_empty());
    }

    /// `depends_on` may name a `[groups.*]`: the program then depends on each of the group's programs (so it
    /// starts after them and stops before them); one in the group it depends on is a cycle.
    #[test]
    fn depends_on_a_group_is_on_each_of_its_programs() {
        let check = |who: &str, depends_on: &[&str]| {
            let mut raw = RawConfig::default();
            for p in ["web", "db", "cache"] {
                let prog = RawProgram {
                    command: "sleep 1000".into(),
                    ..RawProgram::default()
                };
                raw.programs.insert(p.into(), prog);
            }
            let dependent = raw.programs.get_mut(who).unwrap();
            dependent.depends_on = depends_on.iter().map(|d| d.to_string()).collect();
            let programs = vec!["db".to_string(), "cache".to_string()];
            let group = RawGroup {
                programs,
                ..RawGroup::default()
            };
            raw.groups.insert("backend".into(), group);
            Config::validate(&raw).map_err(|issues| {
                (issues.into_iter())
                    .map(|i| format!("{}: {}", i.key, i.message))
                    .collect::<Vec<_>>()
            })
        };
        let c = check("web", &["cache", "backend"]).unwrap();
        let web = c.processes.iter().find(|p| p.name == "web").unwrap();
        assert_eq!(web.depends_on, ["cache", "db"]);
        // The stop order follows: web, their dependent, stops before both.
        let levels = crate::program::stop_levels(c.processes.iter(), &c.group_order);
        assert!(
            levels["web"] > levels["db"] && levels["web"] > levels["cache"],
            "{levels:?}"
        );
        assert_eq!(
            check("web", &["nope"]).unwrap_err(),
            ["programs.web.depends_on: unknown program or group \"nope\""]
        );
        assert_eq!(
            check("db", &["backend"]).unwrap_err(),
            ["programs.db.depends_on: dependency cycle: db -> db"]
        );
    }

    /// A token_file that never ends (or is huge) used to be read whole; now it is refused with the bound.
    #[test]
    fn endless_token_file_is_refused_not_read_whole() {
        let raw = RawConfig {
            token_file: "/dev/zero".into(),
            ..RawConfig::default()
        };
        let issues = Config::validate(&raw).unwrap_err();
        assert!(
            issues
                .iter()
                .any(|i| i.key == "token_file" && i.message.contains("larger than")),
            "{issues:?}"
        );
    }

    /// A token with a space passed, and then no request could present it: every mutating call got 401.
    #[test]
    fn a_token_no_request_could_present_is_refused() {
        let raw = RawConfig {
            token: " tok ".into(),
            ..RawConfig::default()
        };
        let issues = Config::validate(&raw).unwrap_err();
        assert!(
            issues
                .iter()
                .any(|i| i.key == "token" && i.message.contains("visible ASCII")),
            "{issues:?}"
        );
    }

    /// One log file for two streams (two instances, or a program's stdout and stderr) is refused: each
    /// writer rotated it by its own count, and lines went to (and fell off) the backups.
    #[test]
    fn a_log_file_written_by_two_streams_is_refused() {
        let issues = |prog: RawProgram| {
            let mut raw = RawConfig::default();
            raw.programs.insert("web".into(), prog);
            Config::validate(&raw).err().unwrap_or_default()
        };
        let base = RawProgram {
            command: "sleep 1000".into(),
            stdout_logfile: "/tmp/xcluster-shared.log".into(),
            ..RawProgram::default()
        };
        let two = issues(RawProgram {
            numprocs: 2,
            ..base.clone()
        });
        assert_eq!(two.len(), 1, "{two:?}");
        assert_eq!(two[0].key, "programs.web.stdout_logfile");
        assert!(
            two[0].message.contains("is also web-0's stdout log"),
            "{}",
            two[0].message
        );
        let both = issues(RawProgram {
            stderr_logfile: "/tmp/xcluster-shared.log".into(),
            ..base.clone()
        });
        assert_eq!(both.len(), 1, "{both:?}");
        assert_eq!(both[0].key, "programs.web.stderr_logfile");
        // Fine: one instance, its name in the path, stderr into the stdout log, writers that never rotate
        // (maxbytes 0, or a device: Supervisord's `/dev/stdout` in a container).
        assert!(issues(base.clone()).is_empty());
        for path in ["/dev/stdout", "/dev/null"] {
            assert!(
                issues(RawProgram {
                    numprocs: 2,
                    stdout_logfile: path.into(),
                    stderr_logfile: path.into(),
                    ..base.clone()
                })
                .is_empty(),
                "{path}"
            );
        }
        assert!(
            issues(RawProgram {
                numprocs: 2,
                stdout_logfile_maxbytes: 0,
                ..base.clone()
            })
            .is_empty()
        );
        assert!(
            issues(RawProgram {
                numprocs: 2,
                stdout_logfile: "/tmp/xcluster-{name}.log".into(),
                ..base.clone()
            })
            .is_empty()
        );
        assert!(
            issues(RawProgram {
                redirect_stderr: true,
                stderr_logfile: "/tmp/xcluster-shared.log".into(),
                ..base
            })
            .is_empty()
        );
    }

    /// A security walk saw a program's `DB_PASSWORD` in `--print-config` and, after a reload changed it,
    /// in the monitor's log line `changes=programs.x.environment.DB_PASSWORD: "old" -> "new"`.
    #[test]
    fn program_environment_values_are_never_shown() {
        let raw = |password: &str| {
            let mut raw = RawConfig::default();
            let mut prog = RawProgram {
                command: "sleep 1000".into(),
                ..RawProgram::default()
            };
            prog.environment.insert("DB_PASSWORD".into(), password.into());
            raw.programs.insert("web".into(), prog);
            raw
        };
        let (old, new) = (raw("pw-old-secret"), raw("pw-new-secret"));
        let shown = xcluster_runtime::config::effective_toml::<Config>(&old);
        assert!(!shown.contains("pw-old-secret"), "{shown}");
        assert!(shown.contains("DB_PASSWORD = \"<redacted>\""), "{shown}");
        let diff = xcluster_runtime::config::diff(&old, &new, Config::redact);
        assert!(
            diff.contains("environment.DB_PASSWORD"),
            "the change is still named: {diff}"
        );
        assert!(!diff.contains("pw-"), "{diff}");
    }
}
