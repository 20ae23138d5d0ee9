//! One `[programs.<name>]` section: its raw form (Supervisord's keys in TOML), validation, and expansion into
//! one [`ProcessSpec`] per `numprocs` instance with `{self}`, `{name}`, `{num}` and `{port}` substituted.
//! Two specs compare equal exactly when an update may leave the running process alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::Validator;

use crate::command::{parse_signal, split_command};
use crate::policy::{AutoRestart, Policy};
use crate::probe::{ProbeSpec, RawProbe};

/// `autorestart = true | false | "unexpected"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RawAutoRestart {
    Bool(bool),
    Word(String),
}

/// The monitor's directories a program's settings may name: its logs' default place and `{run_dir}`.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub log_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// A program as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RawProgram {
    /// The command line (split like a shell: quotes group words). `{self}` is the monitor's own executable,
    /// `{run_dir}` the monitor's run directory (for a program's own state files).
    pub command: String,
    pub numprocs: u32,
    pub numprocs_start: u32,
    /// Instance name template; default `{program}` for one instance, `{program}-{num}` for several.
    pub process_name: String,
    /// First `{port}`: instance `i` (counting from 0) gets `port_base + i`.
    pub port_base: Option<u16>,
    pub directory: String,
    pub environment: BTreeMap<String, String>,
    /// Octal, e.g. "022". Empty keeps the monitor's.
    pub umask: String,
    /// Run as this user (only when the monitor runs as root).
    pub user: String,
    /// Lower starts first (and stops last).
    pub priority: i32,
    pub autostart: bool,
    pub autorestart: RawAutoRestart,
    pub exitcodes: Vec<i32>,
    pub startsecs: u64,
    pub startretries: u32,
    pub stopsignal: String,
    pub stopwaitsecs: u64,
    pub redirect_stderr: bool,
    /// Empty: `<log_dir>/<name>.out.log`; "none" discards.
    pub stdout_logfile: String,
    pub stdout_logfile_maxbytes: u64,
    pub stdout_logfile_backups: u32,
    pub stderr_logfile: String,
    pub stderr_logfile_maxbytes: u64,
    pub stderr_logfile_backups: u32,
    /// Programs (names of `[programs.*]`) that must be ready before this one starts.
    pub depends_on: Vec<String>,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Fraction of each delay that is random, 0.0..=1.0.
    pub backoff_jitter: f64,
    /// A run at least this long forgets earlier crashes.
    pub backoff_reset_secs: u64,
    /// More than `max_restarts` restarts within `restart_window_secs` → FATAL.
    pub max_restarts: u32,
    pub restart_window_secs: u64,
    /// FATAL is retried automatically after this long; 0 waits for a human, like Supervisord.
    pub fatal_retry_secs: u64,
    pub liveness: Option<RawProbe>,
    pub readiness: Option<RawProbe>,
    /// How an update (a config change, however it is applied) restarts the running instances of a changed
    /// program: `"restart"` all at once, as Supervisord does; `"rolling"` one at a time, each once the one
    /// before runs and is ready again.
    pub update_strategy: String,
}

impl Default for RawProgram {
    fn default() -> Self {
        Self {
            command: String::new(),
            numprocs: 1,
            numprocs_start: 0,
            process_name: String::new(),
            port_base: None,
            directory: String::new(),
            environment: BTreeMap::new(),
            umask: String::new(),
            user: String::new(),
            priority: 999,
            autostart: true,
            autorestart: RawAutoRestart::Word("unexpected".into()),
            exitcodes: vec![0],
            startsecs: 1,
            startretries: 3,
            stopsignal: "TERM".into(),
            stopwaitsecs: 10,
            redirect_stderr: false,
            stdout_logfile: String::new(),
            stdout_logfile_maxbytes: 50 * 1024 * 1024,
            stdout_logfile_backups: 10,
            stderr_logfile: String::new(),
            stderr_logfile_maxbytes: 50 * 1024 * 1024,
            stderr_logfile_backups: 10,
            depends_on: Vec::new(),
            backoff_initial_ms: 1000,
            backoff_max_ms: 30_000,
            backoff_jitter: 0.2,
            backoff_reset_secs: 60,
            max_restarts: 20,
            restart_window_secs: 60,
            fatal_retry_secs: 300,
            liveness: None,
            readiness: None,
            update_strategy: "restart".into(),
        }
    }
}

/// Where a stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// `None` discards the stream.
    pub path: Option<PathBuf>,
    pub maxbytes: u64,
    pub backups: u32,
}

/// One supervised process, fully expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSpec {
    pub name: String,
    /// The `[programs.*]` key: the group that `name:*` addresses.
    pub group: String,
    pub argv: Vec<String>,
    pub directory: Option<PathBuf>,
    pub environment: Vec<(String, String)>,
    pub umask: Option<u32>,
    pub user: Option<String>,
    pub priority: i32,
    pub autostart: bool,
    pub policy: Policy,
    pub stopsignal: nix::sys::signal::Signal,
    pub redirect_stderr: bool,
    pub stdout: LogSpec,
    pub stderr: LogSpec,
    /// Group names this process waits for.
    pub depends_on: Vec<String>,
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
    /// `update_strategy = "rolling"`.
    pub rolling_update: bool,
}

impl ProcessSpec {
    /// The settings its process, and its probes' commands, run with (`child::as_program`).
    pub fn run_as(&self) -> crate::probe::RunAs {
        crate::probe::RunAs {
            name: self.name.clone(),
            group: self.group.clone(),
            environment: self.environment.clone(),
            directory: self.directory.clone(),
            user: self.user.clone(),
            umask: self.umask,
        }
    }

    /// A fingerprint of what the process was started with (command, directory, environment, umask, user): a
    /// process left by a previous monitor is adopted only if its fingerprint matches the config. A hash, so
    /// secrets in the environment never reach the state file. `DefaultHasher` is stable within one build; a
    /// mismatch after an upgrade only means the process is replaced rather than adopted.
    pub fn launch_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (
            &self.argv,
            &self.directory,
            &self.environment,
            self.umask,
            &self.user,
        )
            .hash(&mut h);
        h.finish()
    }
}

/// The placeholders a program's settings may hold.
const PLACEHOLDERS: [&str; 6] = ["self", "program", "name", "num", "port", "run_dir"];

/// Checks the `{word}`s of setting `key`'s `text`: `{port}` needs `port_base`, `{env:NAME}` a variable NAME
/// the monitor has, and a word at most two edits from a placeholder (`{prot}`, `{nmae}`) is a misspelling of
/// it, which would reach the process as it is.
/// Any other `{word}` is left alone: shell and awk use braces too (`${HOME}`, `awk '{print}'`).
fn check_placeholders(text: &str, key: &str, has_port: bool, v: &mut Validator) {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after_dollar = rest[..open].ends_with('$');
        rest = &rest[open + 1..];
        let Some(close) = rest.find('}') else { return };
        let word = &rest[..close];
        if let Some(var) = word.strip_prefix("env:").filter(|_| !after_dollar) {
            let problem = if !is_env_name(var) {
                "an environment variable's name is letters, digits and '_'"
            } else {
                match std::env::var(var) {
                    Ok(_) => continue,
                    Err(std::env::VarError::NotPresent) => "the monitor's environment has no such variable",
                    Err(std::env::VarError::NotUnicode(_)) => {
                        "its value in the monitor's environment is not UTF-8"
                    }
                }
            };
            v.error(key, format!("{{env:{var}}}: {problem}"));
            continue;
        }
        if after_dollar || word.is_empty() || !word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        if word == "port" && !has_port {
            v.error(key, "{port} needs port_base, which gives each instance its port");
        } else if let Some(near) = (!PLACEHOLDERS.contains(&word))
            .then(|| {
                PLACEHOLDERS
                    .iter()
                    .find(|p| word.len() > 2 && edits(word, p) <= 2)
            })
            .flatten()
        {
            let known = PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ");
            v.error(
                key,
                format!("unknown placeholder {{{word}}}: did you mean {{{near}}}? (known: {known})"),
            );
        }
    }
}

/// The edit distance between two short ASCII words (insertions, deletions, substitutions, and swaps of two
/// neighbours, the commonest slip).
fn edits(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Checks the programs against each other, as written (so a program with problems of its own is still
/// checked here, and every problem is reported at once): `depends_on` names a program or a `[groups.*]`; no
/// two `port_base` ranges overlap, nor take the monitor's own port (the second program to bind would fail at
/// every start).
pub fn check_programs(
    programs: &BTreeMap<String, RawProgram>,
    groups: &crate::select::Groups,
    monitor: std::net::SocketAddr,
    v: &mut Validator,
) {
    let mut taken: Vec<(&str, u32, u32)> = Vec::new();
    for (name, p) in programs {
        let known = |d: &&String| programs.contains_key(*d) || groups.contains_key(*d);
        for d in p.depends_on.iter().filter(|d| !known(d)) {
            v.error(
                format!("programs.{name}.depends_on"),
                format!("unknown program or group {d:?}"),
            );
        }
        let Some(base) = p.port_base else { continue };
        // Saturating: this runs on configs whose numprocs failed its range check too.
        let (first, last) = (
            u32::from(base),
            u32::from(base).saturating_add(p.numprocs.max(1) - 1),
        );
        let key = format!("programs.{name}.port_base");
        if (first..=last).contains(&u32::from(monitor.port())) {
            v.error(
                &key,
                format!("ports {first}..={last} take the monitor's own listen port"),
            );
        }
        for (other, f, l) in &taken {
            if first <= *l && *f <= last {
                v.error(
                    &key,
                    format!("ports {first}..={last} overlap {other}'s {f}..={l}"),
                );
            }
        }
        taken.push((name, first, last));
    }
}

/// `depends_on` with each `[groups.*]` it names replaced by the group's programs: a program waits for, and
/// outlives, every program of the group. Each name once, in the order first named.
pub fn through_groups(depends_on: &[String], groups: &crate::select::Groups) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in depends_on {
        for p in groups.get(d).map_or(std::slice::from_ref(d), Vec::as_slice) {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    out
}

/// Substitutes `{self}`, `{program}`, `{name}`, `{num}`, `{port}`, `{run_dir}`, then `{env:NAME}` (after them,
/// so a variable's value is taken as it is).
pub fn substitute(s: &str, vars: &[(&str, String)]) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    if out.contains(ENV_PLACEHOLDER) {
        out = expand_env(&out);
    }
    out
}

/// How `{env:NAME}` begins: the monitor's own environment variable NAME, read when the config loads
/// (Supervisord's `%(ENV_NAME)s`), so `PATH = "/opt/app/bin:{env:PATH}"` extends the inherited one.
const ENV_PLACEHOLDER: &str = "{env:";

/// Whether `name` can be an environment variable's name in a placeholder: letters, digits and '_', not
/// starting with a digit.
fn is_env_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| !b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Replaces each `{env:NAME}` with NAME's value; one not set (or not UTF-8) stays as written, which the
/// config's validation has refused already ([`check_placeholders`]).
fn expand_env(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(ENV_PLACEHOLDER) {
        out.push_str(&rest[..at]);
        let tail = &rest[at + ENV_PLACEHOLDER.len()..];
        let value = (tail.find('}'))
            .filter(|&end| is_env_name(&tail[..end]))
            .and_then(|end| Some((end, std::env::var(&tail[..end]).ok()?)));
        match value {
            Some((end, value)) => {
                out.push_str(&value);
                rest = &tail[end + 1..];
            }
            None => {
                out.push_str(ENV_PLACEHOLDER);
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Longest `[programs.<name>]` name, in bytes.
pub const MAX_PROGRAM_NAME: usize = 128;
/// Longest process name (after `process_name` expansion), in bytes: room for `<program>-<num>` with the
/// longest program name, and for its default log file `<name>.out.log.<backup>` within [`MAX_FILE_NAME`].
pub const MAX_PROCESS_NAME: usize = 200;
/// Longest file name most Linux file systems take (`NAME_MAX`).
const MAX_FILE_NAME: usize = 255;

/// Whether `name` is 1 to `max` bytes of letters, digits, '-', '_', '.'.
pub(crate) fn is_name(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl RawProgram {
    /// Validates the section and expands it into its instances; problems go to `v`.
    pub fn expand(&self, program: &str, dirs: &Dirs, v: &mut Validator) -> Vec<ProcessSpec> {
        let log_dir = dirs.log_dir.as_path();
        let key = |k: &str| format!("programs.{program}.{k}");
        let errs_before = v.issues.len();
        if !is_name(program, usize::MAX) {
            v.error(
                format!("programs.{program}"),
                "program names use only letters, digits, '-', '_', '.'",
            );
        }
        if program.len() > MAX_PROGRAM_NAME {
            v.error(
                format!("programs.{program}"),
                format!("program names are at most {MAX_PROGRAM_NAME} bytes"),
            );
        }
        if program == "all" {
            v.error(
                format!("programs.{program}"),
                "\"all\" is reserved: `ctl stop all` means every program",
            );
        }
        if self.command.trim().is_empty() {
            v.error(key("command"), "a command is required");
        }
        // What `execve` cannot take would fail every spawn, so the program would loop in BACKOFF forever: a
        // config error instead. (A NUL in any value is caught with the placeholders below.)
        for name in self.environment.keys() {
            if name.is_empty() || name.contains(['=', '\0']) {
                v.error(
                    key("environment"),
                    format!("{name:?} is not a variable name (non-empty, without '=' or NUL)"),
                );
            }
        }
        for code in self.exitcodes.iter().filter(|c| !(0..=255).contains(*c)) {
            v.error(key("exitcodes"), format!("{code} is not an exit code (0..=255)"));
        }
        // Looked up now, as Supervisord does, so a misspelt user fails the config, not every start.
        if !self.user.is_empty() && matches!(nix::unistd::User::from_name(&self.user), Ok(None)) {
            v.error(key("user"), format!("no such user {:?}", self.user));
        }
        let argv_template = split_command(&self.command).unwrap_or_else(|e| {
            v.error(key("command"), e);
            Vec::new()
        });
        v.range(&key("numprocs"), self.numprocs, 1, 256);
        // `{num}` counts from it: bounded so that it cannot run past u32.
        v.range(&key("numprocs_start"), self.numprocs_start, 0, 1_000_000);
        let autorestart = match &self.autorestart {
            RawAutoRestart::Bool(true) => AutoRestart::Always,
            RawAutoRestart::Bool(false) => AutoRestart::Never,
            RawAutoRestart::Word(w) if w == "unexpected" => AutoRestart::Unexpected,
            RawAutoRestart::Word(w) if w == "true" => AutoRestart::Always,
            RawAutoRestart::Word(w) if w == "false" => AutoRestart::Never,
            RawAutoRestart::Word(w) => {
                v.error(
                    key("autorestart"),
                    format!("expected true, false or \"unexpected\", found {w:?}"),
                );
                AutoRestart::Unexpected
            }
        };
        let umask = if self.umask.is_empty() {
            None
        } else {
            match u32::from_str_radix(&self.umask, 8) {
                Ok(m) if m <= 0o777 => Some(m),
                _ => {
                    v.error(
                        key("umask"),
                        format!("expected an octal mask like \"022\", found {:?}", self.umask),
                    );
                    None
                }
            }
        };
        let stopsignal = parse_signal(&self.stopsignal).unwrap_or_else(|| {
            v.error(key("stopsignal"), format!("unknown signal {:?}", self.stopsignal));
            nix::sys::signal::Signal::SIGTERM
        });
        v.check(
            (0.0..=1.0).contains(&self.backoff_jitter),
            &key("backoff_jitter"),
            || format!("{} is out of range (0.0..=1.0)", self.backoff_jitter),
        );
        let policy = Policy {
            autorestart,
            exitcodes: self.exitcodes.clone(),
            startsecs: Duration::from_secs(v.range(&key("startsecs"), self.startsecs, 0, 3600)),
            startretries: v.range(&key("startretries"), self.startretries, 0, 1000),
            stopwait: Duration::from_secs(v.range(&key("stopwaitsecs"), self.stopwaitsecs, 0, 3600)),
            backoff_initial: v.millis(&key("backoff_initial_ms"), self.backoff_initial_ms, 1, 3_600_000),
            backoff_max: v.millis(&key("backoff_max_ms"), self.backoff_max_ms, 1, 3_600_000),
            backoff_jitter: self.backoff_jitter.clamp(0.0, 1.0),
            backoff_reset: Duration::from_secs(self.backoff_reset_secs),
            max_restarts: self.max_restarts,
            restart_window: Duration::from_secs(v.range(
                &key("restart_window_secs"),
                self.restart_window_secs,
                1,
                86_400,
            )),
            fatal_retry: (self.fatal_retry_secs > 0).then(|| Duration::from_secs(self.fatal_retry_secs)),
        };
        v.check(
            policy.backoff_initial <= policy.backoff_max,
            &key("backoff_max_ms"),
            || "must be at least backoff_initial_ms".into(),
        );
        let maxbytes_ok = |n: u64| n == 0 || n >= 1024;
        v.check(
            maxbytes_ok(self.stdout_logfile_maxbytes),
            &key("stdout_logfile_maxbytes"),
            || "0 (no rotation) or at least 1024".into(),
        );
        v.check(
            maxbytes_ok(self.stderr_logfile_maxbytes),
            &key("stderr_logfile_maxbytes"),
            || "0 (no rotation) or at least 1024".into(),
        );
        v.range(
            &key("stdout_logfile_backups"),
            self.stdout_logfile_backups,
            0,
            100,
        );
        v.range(
            &key("stderr_logfile_backups"),
            self.stderr_logfile_backups,
            0,
            100,
        );
        let rolling_update = v.one_of(
            &key("update_strategy"),
            &self.update_strategy,
            &[("restart", false), ("rolling", true)],
        );
        let liveness = self.liveness.as_ref().map(|p| p.validate(&key("liveness"), v));
        let readiness = self.readiness.as_ref().map(|p| p.validate(&key("readiness"), v));
        if self.numprocs > 1 && !self.process_name.is_empty() && !self.process_name.contains("{num}") {
            v.error(
                key("process_name"),
                "with numprocs > 1 the name must contain {num}",
            );
        }
        if let Some(base) = self.port_base
            && u64::from(base) + u64::from(self.numprocs) > 65_536
        {
            v.error(
                key("port_base"),
                format!("{base} + numprocs runs past port 65535"),
            );
        }
        let has_port = self.port_base.is_some();
        let mut texts: Vec<(String, &str)> = vec![
            (key("command"), &self.command),
            (key("directory"), &self.directory),
            (key("process_name"), &self.process_name),
            (key("stdout_logfile"), &self.stdout_logfile),
            (key("stderr_logfile"), &self.stderr_logfile),
        ];
        texts.extend(
            (self.environment.iter()).map(|(k, val)| (key(&format!("environment.{k}")), val.as_str())),
        );
        for (name, probe) in [("liveness", &self.liveness), ("readiness", &self.readiness)] {
            if let Some(p) = probe {
                for (field, text) in [("http", &p.http), ("tcp", &p.tcp), ("command", &p.command)] {
                    texts.push((key(&format!("{name}.{field}")), text));
                }
            }
        }
        for (k, text) in texts {
            if text.contains('\0') {
                v.error(k.escape_debug().to_string(), "contains a NUL byte");
                continue;
            }
            check_placeholders(text, &k, has_port, v);
        }
        if v.issues.len() > errs_before {
            return Vec::new();
        }

        let self_exe = self_exe();
        let template = if !self.process_name.is_empty() {
            self.process_name.clone()
        } else if self.numprocs > 1 {
            "{program}-{num}".into()
        } else {
            "{program}".into()
        };
        let specs: Vec<ProcessSpec> = (0..self.numprocs)
            .map(|i| {
                let num = self.numprocs_start + i;
                let mut vars = vec![
                    ("self", self_exe.to_string()),
                    ("program", program.to_string()),
                    ("num", num.to_string()),
                    ("run_dir", dirs.run_dir.display().to_string()),
                ];
                if let Some(base) = self.port_base {
                    vars.push(("port", (u32::from(base) + i).to_string()));
                }
                let name = substitute(&template, &vars);
                vars.push(("name", name.clone()));
                let sub = |s: &str| substitute(s, &vars);
                let log = |path: &str, suffix: &str, maxbytes: u64, backups: u32| LogSpec {
                    path: match path {
                        "none" => None,
                        "" => Some(log_dir.join(format!("{name}.{suffix}.log"))),
                        p => Some(PathBuf::from(sub(p))),
                    },
                    maxbytes,
                    backups,
                };
                let mut spec = ProcessSpec {
                    group: program.to_string(),
                    argv: argv_template.iter().map(|a| sub(a)).collect(),
                    directory: (!self.directory.is_empty()).then(|| PathBuf::from(sub(&self.directory))),
                    environment: self
                        .environment
                        .iter()
                        .map(|(k, val)| (k.clone(), sub(val)))
                        .collect(),
                    umask,
                    user: (!self.user.is_empty()).then(|| self.user.clone()),
                    priority: self.priority,
                    autostart: self.autostart,
                    policy: policy.clone(),
                    stopsignal,
                    redirect_stderr: self.redirect_stderr,
                    stdout: log(
                        &self.stdout_logfile,
                        "out",
                        self.stdout_logfile_maxbytes,
                        self.stdout_logfile_backups,
                    ),
                    stderr: log(
                        &self.stderr_logfile,
                        "err",
                        self.stderr_logfile_maxbytes,
                        self.stderr_logfile_backups,
                    ),
                    depends_on: self.depends_on.clone(),
                    liveness: liveness.clone().map(|p| p.substituted(&vars)),
                    readiness: readiness.clone().map(|p| p.substituted(&vars)),
                    rolling_update,
                    name,
                };
                let run_as = spec.run_as();
                for probe in [&mut spec.liveness, &mut spec.readiness].into_iter().flatten() {
                    probe.run_as = run_as.clone();
                }
                spec
            })
            .collect();
        // A log file named in the config goes where it says, in a directory that exists (as Supervisord
        // checks): a misspelt path is a config error, not a directory made somewhere. The monitor's own
        // directories are made at start, so a log in `{run_dir}` (or the log directory) is fine before the
        // first start has made them, as on a fresh machine.
        for (setting, chosen, log) in [
            (
                "stdout_logfile",
                &self.stdout_logfile,
                specs.iter().map(|s| &s.stdout).collect::<Vec<_>>(),
            ),
            (
                "stderr_logfile",
                &self.stderr_logfile,
                specs.iter().map(|s| &s.stderr).collect(),
            ),
        ] {
            if chosen.is_empty() || chosen == "none" {
                continue;
            }
            for l in log {
                let Some(path) = l.path.as_deref() else { continue };
                if let Some(dir) = path.parent()
                    && !dir.as_os_str().is_empty()
                    && dir != dirs.run_dir
                    && dir != dirs.log_dir
                    && !dir.is_dir()
                {
                    v.error(
                        key(setting),
                        format!("directory {} does not exist", dir.display()),
                    );
                    return Vec::new();
                }
                // Either would fail every open of the log, so every start.
                if path.is_dir() {
                    v.error(key(setting), format!("{} is a directory", path.display()));
                    return Vec::new();
                }
                // Room for the rotated backups' `.<n>` too.
                let backup_suffix = format!(".{}", l.backups).len();
                if path
                    .file_name()
                    .is_some_and(|f| f.len() + backup_suffix > MAX_FILE_NAME)
                {
                    v.error(
                        key(setting),
                        format!(
                            "file name of {} is longer than {MAX_FILE_NAME} bytes with its backups' suffix",
                            path.display()
                        ),
                    );
                    return Vec::new();
                }
            }
        }
        specs
    }
}

/// Programs of a `[groups.*]` that sets a `priority`, by program: that priority and the group's name.
pub type GroupOrder = BTreeMap<String, (i32, String)>;

/// Where `spec` starts among the others (lower first) and stops (lower last), as Supervisord orders them: by
/// its group's priority when that has one ([`GroupOrder`]), and by its own within the group; a program in no
/// such group is a group of its own at its own priority. At one priority, such programs come first, then each
/// group whole, by name: a program at a group's priority does not fall between two of its programs.
pub fn order<'a>(spec: &'a ProcessSpec, groups: &'a GroupOrder) -> (i32, &'a str, i32) {
    match groups.get(&spec.group) {
        Some((priority, group)) => (*priority, group, spec.priority),
        None => (spec.priority, "", spec.priority),
    }
}

/// Each group's stop level: one command (or the shutdown) stopping several programs stops those of a higher
/// level first, and each waits for the higher levels to have exited. A group is above every group it
/// `depends_on`, and otherwise at the rank of its priority ([`ProcessSpec::order`]) among those in use
/// (Supervisord: lower starts first and stops last); where the two disagree (`a` depends on `b`, yet has the
/// lower priority) the dependency wins. Levels are numbers, so the order has no cycle; groups on one level
/// stop together. A group whose processes run different specs (mid-roll, after a change) is above the
/// dependencies of each and at the highest rank of any: taken from one of them, a dependency only the
/// others had was stopped first, under them.
pub fn stop_levels<'a>(
    specs: impl IntoIterator<Item = &'a ProcessSpec>,
    order_of: &GroupOrder,
) -> BTreeMap<String, u32> {
    let specs: Vec<&ProcessSpec> = specs.into_iter().collect();
    let mut priorities: Vec<(i32, &str, i32)> = specs.iter().map(|s| order(s, order_of)).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let mut groups: BTreeMap<&str, Vec<&ProcessSpec>> = BTreeMap::new();
    for s in &specs {
        groups.entry(s.group.as_str()).or_default().push(s);
    }
    let rank = |spec: &ProcessSpec| priorities.partition_point(|p| *p < order(spec, order_of)) as u32;
    let ranks: BTreeMap<&str, u32> = (groups.iter())
        .map(|(g, specs)| (*g, specs.iter().map(|s| rank(s)).max().unwrap_or(0)))
        .collect();
    fn level<'a>(
        g: &'a str,
        groups: &BTreeMap<&'a str, Vec<&'a ProcessSpec>>,
        ranks: &BTreeMap<&str, u32>,
        done: &mut BTreeMap<&'a str, u32>,
        path: &mut Vec<&'a str>,
    ) -> u32 {
        if let Some(l) = done.get(g) {
            return *l;
        }
        let Some(specs) = groups.get(g) else { return 0 };
        if path.contains(&g) {
            return 0; // a cycle, which validation refuses
        }
        path.push(g);
        let rank = ranks.get(g).copied().unwrap_or(0);
        let above = (specs.iter().flat_map(|s| &s.depends_on))
            .map(|d| level(d, groups, ranks, done, path) + 1)
            .max()
            .unwrap_or(0);
        path.pop();
        let l = rank.max(above);
        done.insert(g, l);
        l
    }
    let mut done = BTreeMap::new();
    for g in groups.keys() {
        level(g, &groups, &ranks, &mut done, &mut Vec::new());
    }
    done.into_iter().map(|(g, l)| (g.to_string(), l)).collect()
}

/// Checks what needs every program at once: unique names, acyclic `depends_on`.
pub fn check_set(specs: &[ProcessSpec], v: &mut Validator) {
    let mut names = BTreeSet::new();
    let programs: BTreeSet<&str> = specs.iter().map(|s| s.group.as_str()).collect();
    for s in specs {
        if !names.insert(s.name.as_str()) {
            v.error(
                format!("programs.{}", s.group),
                format!("process name {:?} is used twice", s.name),
            );
        }
        // Another program's name: `ctl stop api` stopped this process, not the program `api`, while
        // `depends_on = ["api"]` meant the program, and its log was "ambiguous".
        if s.name != s.group && programs.contains(s.name.as_str()) {
            v.error(
                format!("programs.{}.process_name", s.group),
                format!("{:?} is the name of another program", s.name),
            );
        }
        // The program names' own charset: a process name is a log file name, a path segment of the API
        // (where `,` separates names and `&` must mean nothing) and a `ctl` argument (where `:` and `*`
        // select).
        if !is_name(&s.name, MAX_PROCESS_NAME) {
            v.error(
                format!("programs.{}.process_name", s.group),
                format!(
                    "{:?}: process names are 1 to {MAX_PROCESS_NAME} letters, digits, '-', '_' or '.'",
                    s.name
                ),
            );
        }
    }
    // A cycle would wait forever: depth-first search over groups.
    let deps: BTreeMap<&str, Vec<&str>> = specs
        .iter()
        .map(|s| {
            (
                s.group.as_str(),
                s.depends_on.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    fn visit<'a>(
        g: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if done.contains(g) {
            return None;
        }
        if path.contains(&g) {
            return Some(format!("{} -> {g}", path.join(" -> ")));
        }
        path.push(g);
        for d in deps.get(g).into_iter().flatten() {
            if let Some(c) = visit(d, deps, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(g);
        None
    }
    let mut done = BTreeSet::new();
    for g in deps.keys() {
        if let Some(cycle) = visit(g, &deps, &mut Vec::new(), &mut done) {
            v.error(
                format!("programs.{g}.depends_on"),
                format!("dependency cycle: {cycle}"),
            );
            break;
        }
    }
}

#[cfg(test)]
#[path = "program_tests.rs"]
mod tests;

/// The path `{self}` stands for: this binary's, read once. Read at each load, it turned into
/// `/path/xcluster (deleted)` once an upgrade replaced the file (Linux names a removed executable so), and
/// at the next reload every program whose command names `{self}` counted as changed and was restarted with
/// a command that is not there. The suffix is taken off too, for a binary replaced before the first load.
fn self_exe() -> &'static str {
    static EXE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXE.get_or_init(|| match std::env::current_exe() {
        Ok(p) => {
            let shown = p.display().to_string();
            shown
                .strip_suffix(" (deleted)")
                .map_or(shown.clone(), str::to_string)
        }
        Err(_) => "xcluster".into(),
    })
}
