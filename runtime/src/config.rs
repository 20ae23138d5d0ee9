//! Config loading: TOML file → layered overrides → raw serde struct → `validate()` → typed config.
//!
//! Layering is defaults < file < environment < flags. Defaults come from the raw struct's `#[serde(default)]`;
//! the environment uses `XCLUSTER_<ROLE>__<KEY>__<SUBKEY>=value`; flags are `--set key.subkey=value`.
//!
//! Every problem is reported at once: a deserialisation error (unknown key, wrong type, negative duration)
//! is recorded with its key path, the offending key is dropped, and deserialisation is retried, so the user
//! sees the unknown key *and* the bad address *and* the negative duration in one run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

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
}

/// The keys of `new` that differ from `old` (changed, added or removed) and fall under one of `under`
/// ([`RoleConfig::RESTART_KEYS`]), sorted.
pub fn changed_under<T: Serialize>(old: &T, new: &T, under: &[&str]) -> Vec<String> {
    let (old, new): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        flatten(old).into_iter().collect(),
        flatten(new).into_iter().collect(),
    );
    let within = |k: &str| {
        under.iter().any(|u| {
            k.strip_prefix(u)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
        })
    };
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k) && within(k))
        .cloned()
        .collect()
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
    /// The file's bytes, so a watcher can ignore events that did not change the content.
    pub file_bytes: Option<Vec<u8>>,
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
        self.bytes.is_empty()
    }

    /// Warns about a key that works but should not be as it is: shorter than [`MIN_KEY_BYTES`] (one captured
    /// signed message lets anyone try short keys offline; a bearer token is only tried online), or kept in a
    /// file readable by group or others. `what` names it in the warning.
    pub fn warn(&self, what: &str) {
        if !self.is_empty() && self.bytes.len() < MIN_KEY_BYTES {
            tracing::warn!(
                bytes = self.bytes.len(),
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
    load_layered::<C>(bytes, source)
}

/// [`load`] of `bytes` already read from `source.path`: a pipe (`<(...)`, `/dev/stdin`) can be read once only.
pub fn load_read<C: RoleConfig>(bytes: Vec<u8>, source: &ConfigSource) -> Result<Loaded<C>, ConfigError> {
    load_layered::<C>(Some(bytes), source)
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
    load_layered::<C>(Some(bytes.to_vec()), &source)
}

fn load_layered<C: RoleConfig>(
    file_bytes: Option<Vec<u8>>,
    source: &ConfigSource,
) -> Result<Loaded<C>, ConfigError> {
    let origin = source.origin();
    let mut table = match &file_bytes {
        Some(bytes) => parse_table(bytes, &origin)?,
        None => toml::Table::new(),
    };
    let mut issues = Vec::new();

    if let Some(role) = table.remove("role") {
        match role.as_str() {
            Some(r) if r == C::ROLE => {}
            // Another role's file: its keys would all be reported unknown too; this one line says it all.
            Some(r) => {
                let issue = ConfigIssue::new(
                    "role",
                    format!(
                        "expected \"{}\", found {role}: this file is for `xcluster {r}`",
                        C::ROLE
                    ),
                );
                return Err(ConfigError::Invalid {
                    origin,
                    issues: vec![issue],
                });
            }
            None => issues.push(ConfigIssue::new(
                "role",
                format!("expected \"{}\", found {role}", C::ROLE),
            )),
        }
    }
    // The keys the environment and `--set` gave a value, and where from: an issue with one of them says so,
    // or it read as the file's fault.
    let mut overridden: Vec<(String, String)> = Vec::new();
    if source.use_env {
        let prefix = format!("XCLUSTER_{}__", C::ROLE.to_ascii_uppercase());
        let mut vars: Vec<(String, String)> =
            std::env::vars().filter(|(k, _)| k.starts_with(&prefix)).collect();
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

    let raw = deserialize_collecting::<C::Raw>(table, &mut issues);
    let config = match raw.as_ref().map(C::validate) {
        Some(Ok(c)) => Some(c),
        Some(Err(more)) => {
            issues.extend(more);
            None
        }
        None => None,
    };
    for issue in &mut issues {
        // The last to set it wins, as in the table.
        if let Some((_, by)) = overridden.iter().rev().find(|(k, _)| *k == issue.key) {
            issue.message += &format!(" (set by {by})");
        }
    }
    match (raw, config) {
        (Some(raw), Some(config)) if issues.is_empty() => Ok(Loaded {
            config,
            raw,
            file_bytes,
        }),
        _ => Err(ConfigError::Invalid { origin, issues }),
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
                            format!("{} (found {v})", first_line(&message))
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

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
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
            toml::Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn remove_path(table: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur: &mut toml::Table = table;
    for seg in parents {
        if matches!(cur.get(seg), Some(toml::Value::Array(_))) {
            // Inside an array of tables: drop the whole array rather than guess which element to keep.
            return cur.remove(seg).is_some();
        }
        match cur.get_mut(seg) {
            Some(toml::Value::Table(t)) => cur = t,
            _ => return false,
        }
    }
    cur.remove(last).is_some()
}

/// Sets `a.b.c` in the table; the value is parsed as a TOML value when it is one, else taken as a string. An
/// item of an array of tables is named as the reload log names it (see [`flatten`]): `proxy.listeners[web].listen`,
/// `proxy.backends[127.0.0.1:8001].weight`, or by index, `proxy.backends[0].weight`; it must exist.
fn set_path(table: &mut toml::Table, key: &str, raw_value: &str) -> Result<(), String> {
    let segs = key_segments(key).ok_or_else(|| {
        format!("invalid key {key:?} (expected a.b.c, with name[item] for an item of an array)")
    })?;
    let value = format!("v = {raw_value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw_value.to_string()));
    let ((last, last_item), parents) = segs.split_last().ok_or_else(|| format!("invalid key {key:?}"))?;
    if last_item.is_some() {
        return Err(format!("{key:?} names an item of {last}: name one of its keys"));
    }
    let mut cur = table;
    for (seg, item) in parents {
        cur = match item {
            None => {
                let entry = cur
                    .entry(seg.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => t,
                    _ => return Err(format!("{seg} is not a table")),
                }
            }
            Some(label) => {
                let items = match cur.get_mut(*seg) {
                    Some(toml::Value::Array(items)) => items,
                    Some(_) => return Err(format!("{seg} is not an array of tables")),
                    None => return Err(format!("no {seg} in the config to name an item of")),
                };
                let labels = item_labels(items);
                // By the label the reload log shows, else by any of the keys that may name an item (a
                // listener, labelled by its name, by its `listen` address too), else by index.
                let named = |item: &toml::Value| {
                    ITEM_KEYS
                        .iter()
                        .any(|k| item.get(k).and_then(toml::Value::as_str) == Some(*label))
                };
                let at = (labels.iter().position(|l| l == label))
                    .or_else(|| items.iter().position(named))
                    .or_else(|| label.parse::<usize>().ok().filter(|i| *i < items.len()));
                match at.and_then(|i| items.get_mut(i)) {
                    Some(toml::Value::Table(t)) => t,
                    Some(_) => return Err(format!("{seg}[{label}] is not a table")),
                    None => {
                        return Err(format!(
                            "no item {label:?} in {seg} (its items: {})",
                            labels.join(", ")
                        ));
                    }
                }
            }
        };
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// Splits `a.b[item].c` at the dots outside brackets, into each name and the item it names, if any; `None`
/// for an empty name or item, or a stray bracket. An item may hold dots (`backends[127.0.0.1:8001]`).
fn key_segments(key: &str) -> Option<Vec<(&str, Option<&str>)>> {
    let mut segs = Vec::new();
    let mut rest = key;
    loop {
        let (seg, tail) = match rest.find(['.', '[']) {
            Some(i) if rest.as_bytes()[i] == b'[' => {
                let close = rest[i..].find(']')? + i;
                let item = &rest[i + 1..close];
                if item.is_empty() || item.contains('[') {
                    return None;
                }
                segs.push((&rest[..i], Some(item)));
                match rest[close + 1..].strip_prefix('.') {
                    Some(tail) => (None, Some(tail)),
                    None if close + 1 == rest.len() => (None, None),
                    None => return None,
                }
            }
            Some(i) => (Some(&rest[..i]), Some(&rest[i + 1..])),
            None => (Some(rest), None),
        };
        if let Some(seg) = seg {
            segs.push((seg, None));
        }
        match tail {
            Some(t) => rest = t,
            None => break,
        }
    }
    let valid = |s: &str| !s.is_empty() && !s.contains(']');
    segs.iter().all(|(s, _)| valid(s)).then_some(segs)
}

/// The keys that may name an item of an array of tables, in the order [`item_labels`] tries them.
const ITEM_KEYS: [&str; 4] = ["name", "id", "addr", "listen"];

/// The names of an array's items, as [`flatten`] shows them: the first of `name`, `id`, `addr`, `listen` that
/// every item sets, each to its own value; else their indexes.
fn item_labels(items: &[toml::Value]) -> Vec<String> {
    for key in ITEM_KEYS {
        let names: Vec<&str> = items
            .iter()
            .filter_map(|v| v.get(key)?.as_str().filter(|s| !s.is_empty()))
            .collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        if names.len() == items.len() && unique.len() == items.len() {
            return names.into_iter().map(str::to_string).collect();
        }
    }
    (0..items.len()).map(|i| i.to_string()).collect()
}

/// Flattens a raw config into `key.path = value` lines, for one-line diffs on reload. An array of tables
/// flattens by the item's own name when each has one (`proxy.listeners[web].listen`, `proxy.backends[127.0.0.1:
/// 8001].weight`: the first of `name`, `id`, `addr`, `listen` that is set and unique), so removing the first
/// item reads as that item removed, not as every later one changed; other arrays by index (`peers[1]`).
pub fn flatten<T: Serialize>(raw: &T) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            // An empty array has no line: its first item then reads as added, not as the array removed
            // beside it (`deny[0] added ("192.0.2.7"), deny removed`, as a walk saw).
            toml::Value::Array(items) => {
                for (label, v) in item_labels(items).iter().zip(items) {
                    walk(&format!("{prefix}[{label}]"), v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(raw) {
        walk("", &v, &mut out);
    }
    out
}

/// Describes what changed between two raw configs in one line (`a: x -> y, b added, c removed`), at most
/// [`DIFF_PARTS`] changes and [`DIFF_VALUE_CHARS`] characters of a value, so a large reload logs a readable line.
/// Values are shown as `redact` leaves them (a role's [`RoleConfig::redact`]): a secret that changed reads
/// `key: changed (hidden)`; comparing redacted configs alone said "no changes".
pub fn diff<T: Serialize + Clone>(old: &T, new: &T, redact: impl Fn(&mut T)) -> String {
    let shown = |raw: &T| -> std::collections::BTreeMap<String, String> {
        let mut hidden = raw.clone();
        redact(&mut hidden);
        let shown: std::collections::BTreeMap<_, _> = flatten(&hidden).into_iter().collect();
        flatten(raw)
            .into_iter()
            .map(|(k, v)| {
                let v = match shown.get(&k) {
                    Some(s) if *s == v => v,
                    _ => HIDDEN.to_string(),
                };
                (k, v)
            })
            .collect()
    };
    let (raw_old, raw_new): (std::collections::BTreeMap<_, _>, std::collections::BTreeMap<_, _>) = (
        flatten(old).into_iter().collect(),
        flatten(new).into_iter().collect(),
    );
    let (old, new) = (shown(old), shown(new));
    let changed = |k: &String| raw_old.get(k) != raw_new.get(k);
    let short = |v: &str| match v.char_indices().nth(DIFF_VALUE_CHARS) {
        Some((cut, _)) => format!("{}...", &v[..cut]),
        None => v.to_string(),
    };
    // The outermost array item (`listeners[web]`) a key belongs to that is missing from `other` whole: it
    // is named once as added or removed, not key by key, nor by the items of its own arrays
    // (`backends[b].request_types[0]`). An item ends at a `]` followed by `.`, `[` or nothing, so the `]`
    // of an IPv6 label (`backends[[::1]:80]`) is not taken for one.
    let whole_item = |k: &str, other: &std::collections::BTreeMap<String, String>| {
        let bytes = k.as_bytes();
        let ends = (0..bytes.len())
            .filter(|&i| bytes[i] == b']' && matches!(bytes.get(i + 1), None | Some(b'.') | Some(b'[')));
        ends.map(|i| i + 1).filter(|&end| end < k.len()).find_map(|end| {
            let item = &k[..end];
            let inside = |o: &String| {
                o.as_str() == item || o.starts_with(&format!("{item}.")) || o.starts_with(&format!("{item}["))
            };
            (!other.keys().any(inside)).then(|| item.to_string())
        })
    };
    let mut named = std::collections::BTreeSet::new();
    let mut parts = Vec::new();
    for (k, v) in &new {
        match old.get(k) {
            None => match whole_item(k, &old) {
                Some(item) if named.insert(item.clone()) => parts.push(format!("{item} added")),
                Some(_) => {}
                None => parts.push(format!("{k} added ({})", short(v))),
            },
            Some(o) if changed(k) && (o == HIDDEN || v == HIDDEN) => {
                parts.push(format!("{k}: changed (hidden)"))
            }
            Some(o) if changed(k) => parts.push(format!("{k}: {} -> {}", short(o), short(v))),
            _ => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        match whole_item(k, &new) {
            Some(item) if named.insert(item.clone()) => parts.push(format!("{item} removed")),
            Some(_) => {}
            None => parts.push(format!("{k} removed")),
        }
    }
    if parts.is_empty() {
        return "no changes".to_string();
    }
    let more = parts.len().saturating_sub(DIFF_PARTS);
    parts.truncate(DIFF_PARTS);
    if more > 0 {
        parts.push(format!("and {more} more"));
    }
    parts.join(", ")
}

/// What a redacted value reads as in a diff.
const HIDDEN: &str = "<hidden>";

/// Changes a reload's log line names at most.
const DIFF_PARTS: usize = 12;
/// Characters of a value a reload's log line shows at most.
const DIFF_VALUE_CHARS: usize = 80;

/// Accumulates validation problems and converts fields, so `validate()` reports everything at once.
#[derive(Debug, Default)]
pub struct Validator {
    pub issues: Vec<ConfigIssue>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue::new(key, message));
    }

    /// Records an error when `ok` is false.
    pub fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.error(key, message());
        }
    }

    /// Parses a socket address such as `127.0.0.1:7000`.
    pub fn addr(&mut self, key: &str, value: &str) -> std::net::SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.error(
                key,
                format!(
                    "invalid socket address {value:?} (expected an IP address and port, e.g. 127.0.0.1:7000 or \
                     [::1]:7000; host names are not resolved)"
                ),
            );
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// A duration in milliseconds that must lie in `min..=max`.
    pub fn millis(&mut self, key: &str, value: u64, min: u64, max: u64) -> std::time::Duration {
        if value < min || value > max {
            self.error(key, format!("{value} ms is out of range ({min}..={max} ms)"));
        }
        std::time::Duration::from_millis(value.clamp(min, max))
    }

    /// An integer that must lie in `min..=max`.
    pub fn range<T: PartialOrd + fmt::Display + Copy>(&mut self, key: &str, value: T, min: T, max: T) -> T {
        if value < min || value > max {
            self.error(key, format!("{value} is out of range ({min}..={max})"));
            return if value < min { min } else { max };
        }
        value
    }

    /// A bearer token (empty: none): visible ASCII only, since a request's `Authorization` header loses
    /// surrounding spaces and cannot carry control characters, so such a token could never match.
    pub fn token(&mut self, key: &str, value: &str) {
        self.check(value.bytes().all(|b| b.is_ascii_graphic()), key, || {
            "must be visible ASCII without spaces (a request could never present it)".into()
        });
    }

    /// An HMAC key given inline as `{prefix}key` or in the file `{prefix}key_file` (at most one of them;
    /// neither gives an empty key).
    pub fn key(&mut self, prefix: &str, key: &str, key_file: &str) -> HmacKey {
        match (key.is_empty(), key_file.is_empty()) {
            (false, false) => {
                self.error(format!("{prefix}key"), "set key or key_file, not both");
                HmacKey::default()
            }
            (false, true) => HmacKey::inline(key.as_bytes()),
            (true, false) => self.key_file(&format!("{prefix}key_file"), key_file),
            (true, true) => HmacKey::default(),
        }
    }

    /// The key held in the file `path` (surrounding whitespace is not part of it), reported under `key` if it
    /// cannot be read or is empty.
    pub fn key_file(&mut self, key: &str, path: &str) -> HmacKey {
        let path = PathBuf::from(path);
        let bytes = match read_bounded(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).trim().to_string();
                if text.is_empty() {
                    self.error(key, format!("{} is empty", path.display()));
                }
                text.into_bytes()
            }
            Err(e) => {
                self.error(key, e.to_string());
                Vec::new()
            }
        };
        HmacKey {
            bytes,
            file: Some(path),
        }
    }

    /// One of the named `choices`, by its name `value`; an unknown name is an error naming them all, and gives
    /// the first choice.
    pub fn one_of<T: Copy>(&mut self, key: &str, value: &str, choices: &[(&str, T)]) -> T {
        if let Some(&(_, t)) = choices.iter().find(|(name, _)| *name == value) {
            return t;
        }
        let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
        self.error(key, format!("{value:?} is not one of {}", names.join(", ")));
        choices[0].1
    }

    /// Finishes validation: the typed value if there were no problems.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<ConfigIssue>> {
        if self.issues.is_empty() {
            Ok(value)
        } else {
            Err(self.issues)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        timeout_ms: u64,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Raw {
        listen: String,
        grace_ms: u64,
        inner: Inner,
    }

    impl Default for Raw {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:1".into(),
                grace_ms: 5,
                inner: Inner::default(),
            }
        }
    }

    #[derive(Debug)]
    struct Cfg {
        listen: std::net::SocketAddr,
    }

    impl RoleConfig for Cfg {
        const ROLE: &'static str = "test";
        type Raw = Raw;
        fn validate(raw: &Raw) -> Result<Self, Vec<ConfigIssue>> {
            let mut v = Validator::new();
            let listen = v.addr("listen", &raw.listen);
            v.finish(Cfg { listen })
        }
    }

    fn load_str(text: &str, overrides: &[&str]) -> Result<Loaded<Cfg>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let mut src = ConfigSource::file(&path);
        src.use_env = false;
        src.overrides = overrides.iter().map(|s| s.to_string()).collect();
        load::<Cfg>(&src)
    }

    #[test]
    fn reports_every_problem_at_once() {
        let err = load_str(
            "bogus = 1\nlisten = \"nope\"\ngrace_ms = -3\n[inner]\ntimeout_ms = -1\nextra = 2\n",
            &[],
        )
        .unwrap_err();
        let issues = err.issues();
        assert_eq!(issues.len(), 5, "{issues:#?}");
        assert!(
            issues.iter().any(|i| i.starts_with("bogus: unknown field")),
            "{issues:#?}"
        );
        assert!(
            issues.iter().any(|i| i.starts_with("inner.extra: unknown field")),
            "{issues:#?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.starts_with("grace_ms:") && i.contains("-3")),
            "{issues:#?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.starts_with("inner.timeout_ms:") && i.contains("-1")),
            "{issues:#?}"
        );
        assert!(
            issues
                .iter()
                .any(|i| i.starts_with("listen:") && i.contains("\"nope\"")),
            "{issues:#?}"
        );
    }

    #[test]
    fn an_array_items_problem_is_named_as_the_config_writes_it() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Listed {
            #[allow(dead_code)]
            items: Vec<Inner>,
        }
        let first = |t: toml::Table| {
            let mut issues = Vec::new();
            assert!(deserialize_collecting::<Listed>(t, &mut issues).is_none());
            issues[0].to_string()
        };
        let bad = first(toml::toml! { items = [{ timeout_ms = 1 }, { timeout_ms = -1 }] });
        assert!(bad.starts_with("items[1].timeout_ms: "), "{bad}");
        let unknown = first(toml::toml! { items = [{ tmeout_ms = 1 }] });
        assert!(unknown.starts_with("items[0].tmeout_ms: "), "{unknown}");
        // A host name is refused as such (the message said "host:port", which it is).
        let mut v = Validator::new();
        v.addr("addr", "localhost:80");
        let said = v.finish(()).unwrap_err()[0].to_string();
        assert!(said.contains("host names are not resolved"), "{said}");
    }

    #[test]
    fn overrides_layer_over_file() {
        let loaded = load_str(
            "listen = \"127.0.0.1:5\"\n",
            &["listen=127.0.0.1:9", "inner.timeout_ms=7"],
        )
        .unwrap();
        assert_eq!(loaded.config.listen.port(), 9);
        assert_eq!(loaded.raw.inner.timeout_ms, 7);
        assert_eq!(loaded.raw.grace_ms, 5, "default kept");
    }

    #[test]
    fn a_bad_override_is_named_as_the_source_of_its_issue() {
        let err = load_str(
            "listen = \"127.0.0.1:5\"\n",
            &["inner.timeout_ms=abc", "listen=nowhere"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("inner.timeout_ms: ") && err.contains("(set by --set inner.timeout_ms)"),
            "{err}"
        );
        assert!(err.contains("(set by --set listen)"), "{err}");
        // The file's own mistakes are not blamed on an override.
        let err = load_str("grace_ms = \"x\"\n", &["listen=127.0.0.1:9"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("grace_ms") && !err.contains("set by"), "{err}");
    }

    #[test]
    fn set_names_an_array_item_as_the_reload_log_does() {
        let mut t = toml::toml! {
            listeners = [{ name = "web", listen = "127.0.0.1:1" }, { name = "pay", listen = "127.0.0.1:2" }]
            backends = [{ addr = "127.0.0.1:8001", weight = 1 }, { addr = "127.0.0.1:8002", weight = 1 }]
        };
        set_path(&mut t, "listeners[pay].listen", "127.0.0.1:9").unwrap();
        set_path(&mut t, "backends[127.0.0.1:8001].weight", "0").unwrap();
        set_path(&mut t, "backends[1].backup", "true").unwrap();
        // A listener by its address, though the log names it by its name.
        set_path(&mut t, "listeners[127.0.0.1:1].name", "\"www\"").unwrap();
        let want = toml::toml! {
            listeners = [{ name = "www", listen = "127.0.0.1:1" }, { name = "pay", listen = "127.0.0.1:9" }]
            backends = [
                { addr = "127.0.0.1:8001", weight = 0 },
                { addr = "127.0.0.1:8002", weight = 1, backup = true },
            ]
        };
        assert_eq!(t, want);
        for (key, says) in [
            (
                "listeners[api].listen",
                "no item \"api\" in listeners (its items: www, pay)",
            ),
            ("listeners[2].listen", "no item \"2\" in listeners"),
            ("missing[web].listen", "no missing in the config"),
            ("listeners[www].listen[0].x", "listen is not an array of tables"),
            ("listeners[web]", "names an item of listeners"),
            ("listeners[web.listen", "invalid key"),
            ("listeners[].listen", "invalid key"),
            ("listeners[web]x", "invalid key"),
            ("a..b", "invalid key"),
        ] {
            let err = set_path(&mut t, key, "1").unwrap_err();
            assert!(err.contains(says), "{key}: {err}");
        }
        assert_eq!(t, want, "a refused key changed nothing");
    }

    #[test]
    fn a_token_no_request_could_present_is_refused() {
        let mut v = Validator::new();
        v.token("a", "");
        v.token("b", "s3cret-Token_1");
        assert!(v.finish(()).is_ok());
        for bad in [" tok ", "tok ", "a b", "t\u{0}k", "tök"] {
            let mut v = Validator::new();
            v.token("admin.token", bad);
            let issues = v.finish(()).unwrap_err();
            assert!(
                issues[0].to_string().contains("visible ASCII"),
                "{bad:?}: {issues:?}"
            );
        }
    }

    #[test]
    fn wrong_role_is_rejected() {
        let err = load_str("role = \"lb\"\n", &[]).unwrap_err();
        assert!(err.issues()[0].starts_with("role:"), "{:?}", err.issues());
        assert!(load_str("role = \"test\"\n", &[]).is_ok());
    }

    #[test]
    fn syntax_error_names_the_file() {
        let err = load_str("listen = \n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        // One long bad line is quoted cut, not whole.
        let long = format!("x = {}\n", "[".repeat(100_000));
        let err = load_str(&long, &[]).unwrap_err().to_string();
        assert!(
            err.len() < 2_000 && err.contains('…'),
            "{} bytes: {}",
            err.len(),
            &err[..300.min(err.len())]
        );
    }

    #[test]
    fn a_changed_secret_is_named_not_shown() {
        let secret = |k: &str| toml::toml! { key = k listen = "a" };
        let (old, new) = (secret("s3cret"), secret("other"));
        let hide = |t: &mut toml::Table| {
            t.insert("key".into(), toml::Value::from("<redacted>"));
        };
        let line = diff(&old, &new, hide);
        assert_eq!(line, "key: changed (hidden)");
        assert_eq!(diff(&old, &old, hide), "no changes");
    }

    #[test]
    fn changed_under_names_the_restart_keys_a_change_touches() {
        let a = Raw::default();
        let mut b = a.clone();
        b.grace_ms = 9;
        b.inner.timeout_ms = 3;
        b.listen = "127.0.0.1:2".into();
        let under = |keys: &[&str]| changed_under(&a, &b, keys);
        assert_eq!(under(&["inner", "listen"]), ["inner.timeout_ms", "listen"]);
        // A section's name covers its keys; a key's name is no prefix of another's.
        assert_eq!(under(&["inner.timeout_ms"]), ["inner.timeout_ms"]);
        assert_eq!(under(&["inne", "grace"]), Vec::<String>::new());
        assert_eq!(changed_under(&a, &a, &["inner", "listen"]), Vec::<String>::new());
    }

    #[test]
    fn diff_is_one_line() {
        let a = Raw::default();
        let mut b = a.clone();
        b.grace_ms = 9;
        assert_eq!(diff(&a, &b, |_| {}), "grace_ms: 5 -> 9");
        assert_eq!(diff(&a, &a, |_| {}), "no changes");
    }

    #[test]
    fn diff_names_the_array_item_that_changed_and_stays_short() {
        let a = toml::toml! {
            listeners = [{ name = "web", listen = "127.0.0.1:1" }, { name = "pay", listen = "127.0.0.1:2" }]
            peers = ["a"]
        };
        let b = toml::toml! {
            listeners = [{ name = "web", listen = "127.0.0.1:1" }, { name = "pay", listen = "127.0.0.1:3" }]
            peers = ["a", "b"]
        };
        assert_eq!(
            diff(&a, &b, |_| {}),
            "listeners[pay].listen: \"127.0.0.1:2\" -> \"127.0.0.1:3\", peers[1] added (\"b\")"
        );
        // The first listener removed reads as that, not as the second one renamed.
        let c = toml::toml! {
            listeners = [{ name = "pay", listen = "127.0.0.1:2" }]
            peers = ["a"]
        };
        assert_eq!(diff(&a, &c, |_| {}), "listeners[web] removed");
        assert_eq!(diff(&c, &a, |_| {}), "listeners[web] added");
        // An item added whole is named once, its own arrays with it; an array that was empty gains an item,
        // and loses it, as that alone.
        let f = toml::toml! {
            backends = [{ addr = "[::1]:80", types = ["a"] }, { addr = "127.0.0.1:1", types = [] }]
        };
        let g = toml::toml! {
            backends = [{ addr = "[::1]:80", types = ["a"] }, { addr = "127.0.0.1:1", types = ["b"] },
                { addr = "127.0.0.1:2", types = ["c", "d"] }]
        };
        assert_eq!(
            diff(&f, &g, |_| {}),
            "backends[127.0.0.1:1].types[0] added (\"b\"), backends[127.0.0.1:2] added"
        );
        assert_eq!(
            diff(&g, &f, |_| {}),
            "backends[127.0.0.1:1].types[0] removed, backends[127.0.0.1:2] removed"
        );
        let h = toml::toml! { backends = [{ addr = "127.0.0.1:1", types = [] }] };
        assert_eq!(diff(&h, &f, |_| {}), "backends[[::1]:80] added");
        // Items without a unique name go by position.
        let d = toml::toml! { backends = [{ weight = 1 }, { weight = 2 }] };
        let e = toml::toml! { backends = [{ weight = 1 }, { weight = 3 }] };
        assert_eq!(diff(&d, &e, |_| {}), "backends[1].weight: 2 -> 3");
        let many: toml::Table = (0..20)
            .map(|i| (format!("k{i:02}"), toml::Value::from("x".repeat(200))))
            .collect();
        let line = diff(&toml::Table::new(), &many, |_| {});
        assert!(line.ends_with(", and 8 more"), "{line}");
        assert!(
            line.starts_with(&format!("k00 added (\"{}...)", "x".repeat(79))),
            "{line}"
        );
        assert!(line.len() < 1200, "{}", line.len());
    }
}
