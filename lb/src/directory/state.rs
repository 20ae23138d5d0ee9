//! The balancer's state file (`[directory] state_file`, HAProxy's server-state-file): the drains and
//! run-time weights operators set, written on every change and read at start, so they survive a restart of
//! every balancer at once (a rolling restart keeps them without it: a starting balancer takes its peers').
//!
//! The format is JSON, versioned:
//! `{"version": 1, "changed_unix_ms": 1700000000000, "drained": ["h/a"], "weights": {"h/b": "25%"}}`.
//! A write replaces the file atomically (a temp file beside it, fsync, rename, fsync of the directory), so
//! a crash leaves the old file or the new one, never half of one. Reading never trusts the content: the
//! file is bounded ([`MAX_BYTES`]); one that is not JSON of a known version is refused whole and set aside
//! as `<file>.bad` (kept for a person to look at; the next write starts a new file); in one that is, each
//! entry is checked as the API checks it (an id as `/v1/servers/{id}/drain` takes it, a weight as
//! `/weight/{value}` does) and an invalid one is skipped with a warning while the rest apply, because
//! refusing every drain for one bad line would send clients back to every drained instance.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xcluster_proto::directory::WeightSet;

use super::MAX_DRAINED;

/// The format written, and the only one read.
pub const VERSION: u64 = 1;

/// The largest file read. [`MAX_DRAINED`] drains and as many weights, each of a 128-byte id, take under
/// 3 MiB; anything larger was not written by a balancer.
pub const MAX_BYTES: u64 = 4 << 20;

/// Invalid entries named in the warning at most; the rest are counted.
const SHOWN_SKIPPED: usize = 5;

/// The run-time state a balancer keeps: in its file, and as a peer's `/v1/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeState {
    /// When an operator's call last changed it (Unix ms; 0: never): the newest state wins at start.
    pub changed_unix_ms: u64,
    pub drained: BTreeSet<String>,
    pub weights: BTreeMap<String, WeightSet>,
}

impl RuntimeState {
    pub fn is_empty(&self) -> bool {
        self.drained.is_empty() && self.weights.is_empty()
    }
}

/// The file as written.
#[derive(Serialize)]
struct Written<'a> {
    version: u64,
    changed_unix_ms: u64,
    drained: &'a BTreeSet<String>,
    weights: BTreeMap<&'a str, String>,
}

/// The file as read: each entry a JSON value of its own, so one of the wrong type is skipped alone.
/// Unknown fields are ignored, so a later version 1 writer may add some.
#[derive(Deserialize)]
struct Read1 {
    version: Option<u64>,
    #[serde(default)]
    changed_unix_ms: Option<serde_json::Value>,
    #[serde(default)]
    drained: Vec<serde_json::Value>,
    #[serde(default)]
    weights: serde_json::Map<String, serde_json::Value>,
}

/// The file's bytes for `state`.
pub fn encode(state: &RuntimeState) -> Vec<u8> {
    let written = Written {
        version: VERSION,
        changed_unix_ms: state.changed_unix_ms,
        drained: &state.drained,
        weights: (state.weights.iter())
            .map(|(id, w)| (id.as_str(), w.to_string()))
            .collect(),
    };
    // Serialising strings and numbers cannot fail; an empty file would be refused at the next start.
    let mut out = serde_json::to_vec_pretty(&written).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parses a state file's bytes: the state, and each skipped entry with why. `Err` refuses the whole file.
/// A change time in the future (`now_unix_ms`) is taken as now, so a bad clock cannot make this state win
/// over every later one.
pub fn parse(bytes: &[u8], now_unix_ms: u64) -> Result<(RuntimeState, Vec<String>), String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a state file: {e}"))?;
    // (serde would also read a struct from an array, by position.)
    if !value.is_object() {
        return Err("not a state file: not a JSON object".into());
    }
    let raw: Read1 = serde_json::from_value(value).map_err(|e| format!("not a state file: {e}"))?;
    match raw.version {
        Some(VERSION) => {}
        Some(v) => return Err(format!("version {v}, this balancer reads version {VERSION}")),
        None => return Err("no \"version\"".into()),
    }
    let mut skipped = Vec::new();
    let mut state = RuntimeState::default();
    match raw.changed_unix_ms {
        None => {}
        Some(v) => match v.as_u64() {
            Some(ms) => state.changed_unix_ms = ms.min(now_unix_ms),
            None => skipped.push(format!("changed_unix_ms: {v} is not a number of milliseconds")),
        },
    }
    for (i, v) in raw.drained.into_iter().enumerate() {
        match v {
            serde_json::Value::String(id) if super::valid_server_id(&id) => {
                if state.drained.len() >= MAX_DRAINED {
                    skipped.push(format!("drained[{i}]: beyond {MAX_DRAINED} drains"));
                } else {
                    state.drained.insert(id);
                }
            }
            v => skipped.push(format!("drained[{i}]: {}", bad_id(&v))),
        }
    }
    for (id, v) in raw.weights {
        let key = format!("weights[{}]", xcluster_proto::report::shown(&id));
        if !super::valid_server_id(&id) {
            skipped.push(format!("{key}: {}", bad_id(&serde_json::Value::String(id))));
            continue;
        }
        let set = match &v {
            serde_json::Value::String(s) => s.parse::<WeightSet>(),
            v => Err(format!("{v}: a weight is a string, \"50%\" or \"7\"")),
        };
        match set {
            // `100%` is what clearing a weight leaves: no entry.
            Ok(set) if set.is_neutral() => {}
            Ok(_) if state.weights.len() >= MAX_DRAINED => {
                skipped.push(format!("{key}: beyond {MAX_DRAINED} weights"))
            }
            Ok(set) => {
                state.weights.insert(id, set);
            }
            Err(why) => skipped.push(format!("{key}: {why}")),
        }
    }
    Ok((state, skipped))
}

fn bad_id(v: &serde_json::Value) -> String {
    let shown = match v {
        serde_json::Value::String(s) => format!("{:?}", xcluster_proto::report::shown(s)),
        v => v.to_string().chars().take(64).collect(),
    };
    format!(
        "{shown} is no instance id ({}) nor a proxy backend's IP:PORT",
        xcluster_proto::report::ID_RULE
    )
}

/// What reading the file at start found.
#[derive(Debug)]
pub enum Loaded {
    /// No file: nothing was set yet (or the key was just turned on).
    Missing,
    /// The state, and the entries skipped (each with why).
    Read {
        state: RuntimeState,
        skipped: Vec<String>,
    },
    /// Refused whole (why), and set aside as `<file>.bad` unless that failed (then why not).
    Refused {
        why: String,
        set_aside: Result<PathBuf, String>,
    },
    /// It could not be read (permissions, a directory...): left where it is.
    Unreadable(std::io::Error),
}

/// `<file>.bad`: where a refused file is set aside.
pub fn bad_path(path: &Path) -> PathBuf {
    with_suffix(path, ".bad")
}

/// `<file>.lock`: locked (`flock`) by the balancer keeping its state in `<file>`, for as long as it runs.
pub fn lock_path(path: &Path) -> PathBuf {
    with_suffix(path, ".lock")
}

/// Why a balancer cannot keep its state in a file.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Two balancers writing one file would each overwrite the other's drains (and share one temp file).
    #[error(
        "another balancer keeps its state in {path} (it holds {lock}): give each balancer a state_file of its own"
    )]
    Taken { path: PathBuf, lock: PathBuf },
    #[error("cannot lock {lock}: {source}")]
    Lock { lock: PathBuf, source: std::io::Error },
}

/// Takes the state file at `path` for this balancer until the returned lock is dropped (at exit, or when
/// the process dies: the kernel releases it). A second balancer given the same file is refused at start.
pub fn claim(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, ClaimError> {
    let lock = lock_path(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| ClaimError::Lock {
            lock: lock.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            ClaimError::Taken {
                path: path.into(),
                lock,
            }
        } else {
            ClaimError::Lock {
                lock,
                source: errno.into(),
            }
        }
    })
}

/// How many symlinks [`resolve`] follows before it stops, as the kernel's `ELOOP` limit.
const MAX_LINKS: usize = 40;

/// The file `path` names, through symlinks of its own name: the balancer locks, reads and replaces that
/// file (its temp file beside it, so the rename stays in one directory), and the link stays a link. Written
/// through the link's name, the first write renamed a plain file over the link and left the target
/// behind, stale: an operator who links the state onto other storage expects it kept there. A link that
/// points nowhere yet names the file to create; one that loops is left as it is, and its first use fails
/// with `ELOOP`, warned of as any failed read or write.
pub fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let Ok(target) = std::fs::read_link(&p) else {
            return p;
        };
        // A relative target is relative to the link's directory; `join` keeps an absolute one as it is.
        p = p.parent().map_or_else(|| target.clone(), |dir| dir.join(&target));
    }
    path.to_path_buf()
}

/// `<file>.tmp`: where a write goes before it replaces the file (the same directory, so rename is atomic).
pub fn tmp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads the state file at `path` (blocking): bounded, parsed, and set aside if refused.
pub fn load(path: &Path, now_unix_ms: u64) -> Loaded {
    let bytes = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Unreadable(e),
        Ok(f) => {
            let mut buf = Vec::new();
            if let Err(e) = f.take(MAX_BYTES + 1).read_to_end(&mut buf) {
                return Loaded::Unreadable(e);
            }
            buf
        }
    };
    let refused = if bytes.len() as u64 > MAX_BYTES {
        Err(format!("larger than {MAX_BYTES} bytes"))
    } else {
        parse(&bytes, now_unix_ms)
    };
    match refused {
        Ok((state, skipped)) => Loaded::Read { state, skipped },
        Err(why) => {
            let bad = bad_path(path);
            let set_aside = std::fs::rename(path, &bad)
                .map(|()| bad)
                .map_err(|e| e.to_string());
            Loaded::Refused { why, set_aside }
        }
    }
}

/// [`load_logged`]'s answer: the state to restore, if any, and whether one was there but lost (the file
/// refused or unreadable), when the peers are worth waiting for.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    pub state: Option<RuntimeState>,
    pub lost: bool,
    /// The file is there and could not be read: it is left as it is, and never written over.
    pub unreadable: bool,
}

/// [`load`], with what it found logged. Never fails: a balancer starts whatever the file holds.
pub fn load_logged(path: &Path, now_unix_ms: u64) -> Restored {
    let file = path.display();
    let lost = Restored {
        state: None,
        lost: true,
        unreadable: false,
    };
    match load(path, now_unix_ms) {
        Loaded::Missing => {
            tracing::info!(
                %file,
                "no state file yet: it is written once the start has settled (with the peers' drains and \
                 weights, if any), then at every drain or weight set"
            );
            Restored {
                state: None,
                lost: false,
                unreadable: false,
            }
        }
        Loaded::Unreadable(e) => {
            tracing::warn!(
                %file, error = %e,
                "cannot read the state file: starting without its drains and run-time weights (a peer's, if \
                 one answers within a few seconds, apply); the file is left as it is and not written, so \
                 drains and weights set until a restart with a readable file are kept in memory only"
            );
            Restored {
                unreadable: true,
                ..lost
            }
        }
        Loaded::Refused { why, set_aside } => {
            let kept = match set_aside {
                Ok(bad) => format!("set aside as {}", bad.display()),
                Err(e) => format!("could not be set aside: {e}"),
            };
            tracing::warn!(
                %file, problem = %why,
                "state file refused ({kept}): starting without its drains and run-time weights (a peer's, \
                 if one answers within a few seconds, apply)"
            );
            lost
        }
        Loaded::Read { state, skipped } => {
            if !skipped.is_empty() {
                let shown: Vec<&str> = skipped.iter().take(SHOWN_SKIPPED).map(String::as_str).collect();
                tracing::warn!(
                    %file, skipped = skipped.len(), entries = %shown.join("; "),
                    "invalid entries of the state file skipped; the others apply"
                );
            }
            Restored {
                state: Some(state),
                lost: false,
                unreadable: false,
            }
        }
    }
}

/// Why a write of the state file failed: the step and the path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {step} {path}: {source}")]
pub struct WriteError {
    step: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

/// Replaces the file at `path` with `bytes` atomically and durably (blocking): written to
/// [`tmp_path`] and fsynced, renamed over `path`, then the directory fsynced so the rename itself survives
/// a power loss. A failure leaves the old file as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |step, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { step, path, source }
    };
    let tmp = tmp_path(path);
    let written = std::fs::File::create(&tmp)
        .map_err(err("create", &tmp))
        .and_then(|mut f| {
            f.write_all(bytes).map_err(err("write", &tmp))?;
            f.sync_all().map_err(err("fsync", &tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(err("rename over", path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync the directory", dir))
}

/// The state file of a running balancer: one write at a time, each of the state as it is when the write
/// begins, so the last write to finish holds the latest state.
#[derive(Debug)]
pub struct StateFile {
    pub path: PathBuf,
    writing: std::sync::Mutex<()>,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Writes the state `now` gives, read under the write lock (blocking: call from `spawn_blocking`).
    pub fn save(&self, now: impl FnOnce() -> RuntimeState) -> Result<(), WriteError> {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        write_atomic(&self.path, &encode(&now()))
    }
}

/// The wall clock in Unix ms (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
