//! Config loading: TOML file → layered overrides → raw serde struct → `validate()` → typed config.
//!
//! Layering is defaults < file < environment < flags. Defaults come from the raw struct's `#[serde(default)]`;
//! the environment uses `XCLUSTER_<ROLE>__<KEY>__<SUBKEY>=value`; flags are `--set key.subkey=value`.
//!
//! Every problem is reported at once: a deserialisation error (unknown key, wrong type, negative duration)
//! is recorded with its key path, the offending key is dropped, and deserialisation is retried, so the user
//! sees the unknown key *and* the bad address *and* the negative duration in one run.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod include;
mod keys;
pub mod referenced;
mod sources;
mod validator;

use keys::set_path;
pub use keys::{changed_under, diff, flatten, keep_under};
pub use sources::{Sources, read_sources};
pub use validator::Validator;

/// `path` made absolute against the working directory (as it is, if that cannot be read): what the watcher's
/// event paths compare with, and what a path in a config means whatever directory the process later enters.
pub fn absolute(path: impl AsRef<Path>) -> PathBuf {
    let path = path.as_ref();
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Largest config file we read; anything bigger is certainly a mistake and must not exhaust memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Upper bound on how many distinct problems we collect before giving up (bounds the retry loop too).
const MAX_ISSUES: usize = 64;

/// A role's configuration: the raw, serde-facing form and the validated, typed form.
pub trait RoleConfig: Sized + Send + Sync + 'static {
    /// The role's name as used in `role = "..."`, env prefixes and metric labels.
    const ROLE: &'static str;
    /// The file-facing struct: `#[serde(default, deny_unknown_fields)]`, plain types.
    type Raw: DeserializeOwned + Serialize + Default + Clone + Send + Sync + 'static;

    /// Checks every field and converts to typed values, reporting every problem at once.
    fn validate(raw: &Self::Raw) -> Result<Self, Vec<ConfigIssue>>;

    /// Hides secrets before the raw config is printed or logged.
    fn redact(_raw: &mut Self::Raw) {}

    /// Keys (a dotted key, or a section: `http` covers `http.max_connections`) a reload does not apply: the
    /// process keeps the values it started with, and a reload that changes one warns so.
    const RESTART_KEYS: &'static [&'static str] = &[];

    /// Top-level sections whose entries other files may add through an `include = ["conf.d/*.toml"]` key
    /// ([`include`]; the monitor's `programs`). Empty: `include` is an unknown key.
    const INCLUDE_SECTIONS: &'static [&'static str] = &[];
}

/// One problem with a config, naming the key and the bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("config {origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("config {origin} is invalid:\n{}", issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    /// The process exit code for a bad config (EX_USAGE / EX_CONFIG convention used by `nginx -t` and others).
    pub const EXIT_CODE: i32 = 64;

    /// The individual problems, for tests and for the control API.
    pub fn issues(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { issues, .. } => issues.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Where a config comes from: an optional file plus overrides.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    /// `key.path=value` pairs from `--set`, applied last.
    pub overrides: Vec<String>,
    /// Whether to apply `XCLUSTER_<ROLE>__*` environment variables.
    pub use_env: bool,
}

impl ConfigSource {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            overrides: Vec::new(),
            use_env: true,
        }
    }

    fn origin(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string())
    }
}

/// A validated config together with the effective raw form it came from.
#[derive(Debug, Clone)]
pub struct Loaded<C: RoleConfig> {
    pub config: C,
    pub raw: C::Raw,
    /// What was read from the file and the files it includes (`None`: no file), so a watcher can watch those
    /// and ignore events that did not change the content.
    pub sources: Option<Sources>,
}

impl<C: RoleConfig> Loaded<C> {
    /// The effective config as TOML, secrets redacted (what `--print-config` shows).
    pub fn effective_toml(&self) -> String {
        effective_toml::<C>(&self.raw)
    }
}

/// Renders a raw config as TOML with secrets redacted.
pub fn effective_toml<C: RoleConfig>(raw: &C::Raw) -> String {
    let mut raw = raw.clone();
    C::redact(&mut raw);
    match toml::to_string_pretty(&raw) {
        Ok(s) => format!("role = \"{}\"\n{s}", C::ROLE),
        Err(e) => format!("# cannot render config: {e}\n"),
    }
}

/// Reads a file with a size bound.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| ConfigError::Io {
        path: path.into(),
        source,
    })?;
    let mut buf = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
    if buf.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: path.into() });
    }
    Ok(buf)
}

/// The shortest HMAC key taken without a warning.
pub const MIN_KEY_BYTES: usize = 16;

/// An HMAC key from a config (`key` inline or `key_file`; see [`Validator::key`]), and the file it was read
/// from, whose permissions are checked. Its bytes never reach a log.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HmacKey {
    pub bytes: Vec<u8>,
    pub file: Option<PathBuf>,
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKey")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl HmacKey {
    /// A key given inline.
    pub fn inline(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            file: None,
        }
    }

    /// Whether there is no key (nothing it signs or checks can be trusted).
    pub fn is_empty(&self) -> bool {
        self.each().next().is_none()
    }

    /// The keys it holds, one per line: each is accepted by a check, and the first signs ([`Self::signing`]).
    /// So a key is changed with no moment where signers and checkers disagree: the checkers take the new and
    /// the old (two lines), the signers move to the new one, then the checkers drop the old. With one key
    /// only, every report signed with the other was refused until both sides had the same.
    ///
    /// Only a key of text is split: a key of random bytes holds a newline byte one time in eight at 32 bytes,
    /// and split there, each short piece would have been a key to try online.
    pub fn each(&self) -> impl Iterator<Item = &[u8]> {
        let text = self
            .bytes
            .iter()
            .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
        let split = if text { b'\n' } else { 0 };
        (self.bytes.split(move |b| text && *b == split))
            .map(<[u8]>::trim_ascii)
            .filter(|k| !k.is_empty())
    }

    /// The key that signs: the first it holds.
    pub fn signing(&self) -> &[u8] {
        self.each().next().unwrap_or_default()
    }

    /// The length of a key it holds that is shorter than [`MIN_KEY_BYTES`], if one is.
    pub fn too_short(&self) -> Option<usize> {
        self.each().map(<[u8]>::len).find(|n| *n < MIN_KEY_BYTES)
    }

    /// Warns about a key that works but should not be as it is: shorter than [`MIN_KEY_BYTES`] (one captured
    /// signed message lets anyone try short keys offline; a bearer token is only tried online), or kept in a
    /// file readable by group or others. `what` names it in the warning.
    pub fn warn(&self, what: &str) {
        if let Some(short) = self.too_short() {
            tracing::warn!(
                bytes = short,
                "the {what} is shorter than {MIN_KEY_BYTES} bytes; use a longer random one"
            );
        }
        if let Some(path) = &self.file {
            warn_if_secret_exposed(path, what);
        }
    }
}

/// Warns when a secret file (a key, a token) can be read by group or others: it works, but it should not.
pub fn warn_if_secret_exposed(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the {what} file is readable by group or others; chmod 600 it");
    }
}

/// Parses TOML text into a table (syntax only).
pub fn parse_table(text: &[u8], origin: &str) -> Result<toml::Table, ConfigError> {
    let text = std::str::from_utf8(text).map_err(|e| ConfigError::Syntax {
        origin: origin.into(),
        message: format!("not utf-8: {e}"),
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Syntax {
        origin: origin.into(),
        message: clip_lines(e.to_string().trim()),
    })
}

/// The widest line of a syntax error shown: the parser quotes the offending line whole, and one line of a
/// 200 KB file made each failed reload log 200 KB.
const ERROR_LINE_CHARS: usize = 200;

/// A value as an error quotes it, cut as [`clip_lines`] cuts: a 1 MB array given for a string was quoted
/// whole, in each failed reload's log line and in the status `ctl` shows.
pub(crate) fn quoted(value: &toml::Value) -> String {
    clip_lines(&value.to_string())
}

/// `msg` with each line cut to [`ERROR_LINE_CHARS`] characters (`…` marks a cut).
fn clip_lines(msg: &str) -> String {
    msg.lines()
        .map(|l| match l.char_indices().nth(ERROR_LINE_CHARS) {
            Some((at, _)) => format!("{}…", &l[..at]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `role = "..."` key of a config file's `bytes`, if it has one (`origin` names the file in errors).
pub fn role_in(bytes: &[u8], origin: &str) -> Result<Option<String>, ConfigError> {
    let table = parse_table(bytes, origin)?;
    Ok(table.get("role").and_then(|v| v.as_str()).map(str::to_string))
}

/// Loads, layers and validates a role's config.
pub fn load<C: RoleConfig>(source: &ConfigSource) -> Result<Loaded<C>, ConfigError> {
    let bytes = match &source.path {
        Some(path) => Some(read_bounded(path)?),
        None => None,
    };
    load_layered::<C>(bytes, source, &mut Judged::default())
}

/// What a reload read, valid or not: the content it judged. The reloader remembers a rejected config by
/// this, not by the files read again after (a fix may be written meanwhile, and would pass for judged) nor
/// before (the load may have read a newer write, and the older bytes written back passed for rejected).
#[derive(Debug, Default)]
pub struct Judged {
    /// The main file and the files it includes as a load that failed read them (`None` when it succeeded,
    /// whose [`Loaded::sources`] hold them, or could not read the main file).
    pub sources: Option<Sources>,
    /// The files the config names that its validation read ([`referenced`]); `None` when it failed before
    /// its validation, which read none then. In `sources` too, with what each held.
    pub read_files: Option<Vec<PathBuf>>,
}

/// [`load`] for a process already running on `running` (the raw config it started with): what a reload
/// publishes. `raw` is what the files say; `config` is that config with every key of
/// [`RoleConfig::RESTART_KEYS`] back at its running value, validated so. The runtime logs that such keys keep
/// their running values until a restart; a role reads its config live, per use (the agent its `agent_id`
/// per report, the app its `capacity` per request), so handed the file's values it applied them at once.
pub fn reload<C: RoleConfig>(source: &ConfigSource, running: &C::Raw) -> Result<Loaded<C>, ConfigError> {
    reload_noting(source, running, &mut Judged::default())
}

/// [`reload`], giving `judged` what it read, valid or not: the reloader watches the files a rejected config
/// names, so the fix of its key file is seen, and remembers what it rejected.
pub fn reload_noting<C: RoleConfig>(
    source: &ConfigSource,
    running: &C::Raw,
    judged: &mut Judged,
) -> Result<Loaded<C>, ConfigError> {
    // An empty file is every default, valid for every role, and what a file being rewritten in place holds
    // for a moment (`render > monitor.toml` truncates it first): taken, a monitor stopped every program and a
    // balancer closed its proxy ports. A role started without a file runs its defaults; a reload never
    // empties a config.
    let bytes = match &source.path {
        Some(path) => Some(read_bounded(path)?),
        None => None,
    };
    if let Some(bytes) = bytes.as_deref().filter(|b| sources::blank(b)) {
        judged.sources = Some(Sources::new(bytes));
        return Err(ConfigError::Invalid {
            origin: source.origin(),
            issues: vec![ConfigIssue::new(
                "",
                "the file is empty: a reload keeps the config in force (write the new file beside it and rename it over)",
            )],
        });
    }
    let loaded = load_layered::<C>(bytes, source, judged)?;
    keep_restart_keys_noting(loaded, running, &source.origin(), judged)
}

/// `loaded` with its config's restart keys at their values in `running` (see [`reload`]); `origin` names the
/// config in an error.
pub fn keep_restart_keys<C: RoleConfig>(
    loaded: Loaded<C>,
    running: &C::Raw,
    origin: &str,
) -> Result<Loaded<C>, ConfigError> {
    keep_restart_keys_noting(loaded, running, origin, &mut Judged::default())
}

/// [`keep_restart_keys`]; `judged` also gets the files its second validation read, which the reloader then
/// watches and judges a rejection by: a key file only that validation read (one a restart key's running
/// value names) was not watched, and an edit of it was seen only at the next SIGHUP.
fn keep_restart_keys_noting<C: RoleConfig>(
    mut loaded: Loaded<C>,
    running: &C::Raw,
    origin: &str,
    judged: &mut Judged,
) -> Result<Loaded<C>, ConfigError> {
    let pending = changed_under(running, &loaded.raw, C::RESTART_KEYS);
    if pending.is_empty() {
        return Ok(loaded);
    }
    // Validated again: a key that reloads live may be checked against one kept (the monitor's programs'
    // ports against its `listen`), and a typed value may derive from a kept one (a program's log path from
    // `log_dir`).
    let origin = format!(
        "{origin} (with {} at the running values until a restart)",
        pending.join(", ")
    );
    let kept = keep_under(running, &loaded.raw, C::RESTART_KEYS).map_err(|message| ConfigError::Invalid {
        origin: origin.clone(),
        issues: vec![ConfigIssue::new("", message)],
    });
    let kept = kept.inspect_err(|_| judged.sources = loaded.sources.clone())?;
    let (validated, files) = referenced::during(|| C::validate(&kept));
    if let Some(read) = judged.read_files.as_mut() {
        read.extend(files.iter().map(|(path, _)| path.clone()));
        read.sort();
        read.dedup();
    }
    if let Some(sources) = loaded.sources.as_mut() {
        sources.referenced(files);
    }
    match validated {
        Ok(config) => Ok(Loaded { config, ..loaded }),
        Err(issues) => {
            judged.sources = loaded.sources;
            Err(ConfigError::Invalid { origin, issues })
        }
    }
}

/// [`load`] of `bytes` already read from `source.path`: a pipe (`<(...)`, `/dev/stdin`) can be read once only.
pub fn load_read<C: RoleConfig>(bytes: Vec<u8>, source: &ConfigSource) -> Result<Loaded<C>, ConfigError> {
    load_layered::<C>(Some(bytes), source, &mut Judged::default())
}

/// Loads and validates a role's config from a file's bytes alone (no environment, no overrides): what a
/// reload of those bytes would do. The entry point of the `config` fuzz target; it must never panic.
pub fn load_bytes<C: RoleConfig>(bytes: &[u8]) -> Result<Loaded<C>, ConfigError> {
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: PathBuf::from("<bytes>"),
        });
    }
    let source = ConfigSource {
        path: Some(PathBuf::from("<bytes>")),
        overrides: Vec::new(),
        use_env: false,
    };
    load_layered::<C>(Some(bytes.to_vec()), &source, &mut Judged::default())
}

/// `judged` gets what it read, whether or not the config is valid ([`Judged`]).
fn load_layered<C: RoleConfig>(
    file_bytes: Option<Vec<u8>>,
    source: &ConfigSource,
    judged: &mut Judged,
) -> Result<Loaded<C>, ConfigError> {
    let origin = source.origin();
    let mut sources = Sources::new(file_bytes.as_deref().unwrap_or_default());
    let mut table = match &file_bytes {
        Some(bytes) => parse_table(bytes, &origin).inspect_err(|_| judged.sources = Some(sources.clone()))?,
        None => toml::Table::new(),
    };
    let mut issues = Vec::new();
    let mut included = Vec::new();
    if !C::INCLUDE_SECTIONS.is_empty() {
        // Before the environment and `--set`, which may then set an included entry's keys too. Bytes with no
        // file of their own (`load_bytes`) include nothing.
        let base = sources::include_base(source.path.as_deref());
        included = include::apply(
            &mut table,
            base.as_deref(),
            C::INCLUDE_SECTIONS,
            &mut issues,
            &mut sources,
        );
    }
    if let Some(role) = table.remove("role") {
        match role.as_str() {
            Some(r) if r == C::ROLE => {}
            // Another role's file: its keys would all be reported unknown too, and its includes' issues are
            // beside the point; this one line says it all.
            Some(r) => {
                let issue = ConfigIssue::new(
                    "role",
                    format!(
                        "expected \"{}\", found {}: this file is for `xcluster {r}`",
                        C::ROLE,
                        quoted(&role)
                    ),
                );
                judged.sources = file_bytes.is_some().then_some(sources);
                return Err(ConfigError::Invalid {
                    origin,
                    issues: vec![issue],
                });
            }
            None => issues.push(ConfigIssue::new(
                "role",
                format!("expected \"{}\", found {}", C::ROLE, quoted(&role)),
            )),
        }
    }
    // The keys the environment and `--set` gave a value, and where from: an issue with one of them says so,
    // or it read as the file's fault.
    let mut overridden: Vec<(String, String)> = Vec::new();
    if source.use_env {
        let prefix = format!("XCLUSTER_{}__", C::ROLE.to_ascii_uppercase());
        // `vars_os`: `vars` panics on any variable that is not UTF-8, ours or not (`FOO=$'\xff'`). One of ours
        // that is not is an issue, named.
        let mut vars: Vec<(String, String)> = Vec::new();
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str().filter(|k| k.starts_with(&prefix)) else {
                continue;
            };
            match v.into_string() {
                Ok(v) => vars.push((k.to_string(), v)),
                Err(_) => issues.push(ConfigIssue::new(format!("env {k}"), "the value is not UTF-8")),
            }
        }
        vars.sort();
        for (k, v) in vars {
            let key = k[prefix.len()..].to_ascii_lowercase().replace("__", ".");
            match set_path(&mut table, &key, &v) {
                Ok(()) => overridden.push((key, format!("environment {k}"))),
                Err(issue) => issues.push(ConfigIssue::new(format!("env {k}"), issue)),
            }
        }
    }
    for ov in &source.overrides {
        match ov.split_once('=') {
            Some((k, v)) => match set_path(&mut table, k.trim(), v) {
                Ok(()) => overridden.push((k.trim().to_string(), format!("--set {}", k.trim()))),
                Err(issue) => issues.push(ConfigIssue::new(format!("--set {k}"), issue)),
            },
            None => issues.push(ConfigIssue::new(
                "--set",
                format!("expected KEY=VALUE, found {ov:?}"),
            )),
        }
    }

    // Issues name an item of an array by its label, as `--set` and the reload log do, not by its index.
    let root = toml::Value::Table(table.clone());
    // The issues of the include itself name their files already.
    let first_own = issues.len();
    let raw = deserialize_collecting::<C::Raw>(table, &mut issues);
    // A key that did not deserialize was left to its default: what validation finds wrong with the default
    // is not the user's to read.
    let unparsed: std::collections::HashSet<String> = issues.iter().map(|i| i.key.clone()).collect();
    // The files it names (key and token files) are part of the config's content (`referenced`).
    let (validated, files) = referenced::during(|| raw.as_ref().map(C::validate));
    judged.read_files = raw
        .is_some()
        .then(|| files.iter().map(|(path, _)| path.clone()).collect());
    sources.referenced(files);
    let config = match validated {
        Some(Ok(c)) => Some(c),
        Some(Err(more)) => {
            issues.extend(more.into_iter().filter(|i| !unparsed.contains(&i.key)));
            None
        }
        None => None,
    };
    // An included entry's issue names its file: the main file the error is titled with does not hold it.
    for issue in issues.iter_mut().skip(first_own) {
        let from = included.iter().find(|(entry, _)| {
            (issue.key.strip_prefix(entry.as_str()))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        });
        if let Some((_, file)) = from {
            issue.message += &format!(" (in {file})");
        }
    }
    for (key, _) in &mut overridden {
        *key = keys::labelled(&root, key);
    }
    for issue in &mut issues {
        issue.key = keys::labelled(&root, &issue.key);
        // The last to set it wins, as in the table.
        if let Some((_, by)) = overridden.iter().rev().find(|(k, _)| *k == issue.key) {
            issue.message += &format!(" (set by {by})");
        }
    }
    match (raw, config) {
        (Some(raw), Some(config)) if issues.is_empty() => Ok(Loaded {
            config,
            raw,
            sources: file_bytes.is_some().then_some(sources),
        }),
        _ => {
            judged.sources = file_bytes.is_some().then_some(sources);
            Err(ConfigError::Invalid { origin, issues })
        }
    }
}

/// Deserialises `table` into `T`, recording each error with its key and dropping the offending key so the
/// remaining keys are still checked. Returns `None` if it could not get a value at all.
fn deserialize_collecting<T: DeserializeOwned>(
    mut table: toml::Table,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    for _ in 0..MAX_ISSUES {
        let value = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => return Some(v),
            Err(err) => {
                let mut path: Vec<String> = err.path().iter().map(|seg| seg.to_string()).collect();
                path.retain(|s| s != "?");
                let message = err.inner().to_string();
                if let Some(field) = unknown_field(&message) {
                    if path.last().map(String::as_str) != Some(field.as_str()) {
                        path.push(field);
                    }
                    let key = dotted(&path);
                    issues.push(ConfigIssue::new(key, first_line(&message)));
                } else {
                    let key = dotted(&path);
                    let shown = match lookup(&table, &path) {
                        Some(v) if !message.contains(&v.to_string()) => {
                            format!("{} (found {})", first_line(&message), quoted(v))
                        }
                        _ => first_line(&message),
                    };
                    issues.push(ConfigIssue::new(key, shown));
                }
                if path.is_empty() || !remove_path(&mut table, &path) {
                    return None;
                }
            }
        }
    }
    None
}

/// A key path as the config names it and as validation reports it: `proxy.backends[0].weight`, not
/// `proxy.backends.[0].weight` (how serde's path segments join with dots).
fn dotted(path: &[String]) -> String {
    let mut key = String::new();
    for seg in path {
        if !key.is_empty() && !seg.starts_with('[') {
            key.push('.');
        }
        key.push_str(seg);
    }
    key
}

/// The first line of a deserialiser's message, cut as [`clip_lines`] cuts (it may quote the value).
fn first_line(s: &str) -> String {
    clip_lines(s.lines().next().unwrap_or("").trim())
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut cur = table.get(first)?;
    for seg in rest {
        cur = match cur {
            toml::Value::Table(t) => t.get(seg)?,
            toml::Value::Array(a) => a.get(list_index(seg)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Removes what `path` (serde's segments, `[3]` for a list's item) names from `table`: only the bad key, so
/// the rest is still checked. Inside a list's item only that item's key goes (the list went whole before,
/// and with it every check of what referred to it: a listener's type then served by nothing). An item that
/// is itself wrong (`listeners = [5]`) takes its list with it: removing the item alone would shift the
/// indexes of the later items' issues off the file's.
fn remove_path(table: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    if list_index(last).is_some() {
        let Some((list, parents)) = parents.split_last() else {
            return false;
        };
        return table_at(table, parents).is_some_and(|t| t.remove(list.as_str()).is_some());
    }
    table_at(table, parents).is_some_and(|t| t.remove(last).is_some())
}

/// `[3]` → 3.
fn list_index(seg: &str) -> Option<usize> {
    seg.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The table `path` leads to, through tables and list items (`[3]` after its list's name).
fn table_at<'a>(table: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut cur = table;
    let mut segs = path.iter().peekable();
    while let Some(seg) = segs.next() {
        let item = segs.peek().and_then(|s| list_index(s));
        let next = match (cur.get_mut(seg.as_str())?, item) {
            (toml::Value::Array(items), Some(i)) => {
                segs.next();
                items.get_mut(i)?
            }
            (v, None) => v,
            _ => return None,
        };
        cur = next.as_table_mut()?;
    }
    Some(cur)
}

#[cfg(test)]
pub(crate) mod tests;
