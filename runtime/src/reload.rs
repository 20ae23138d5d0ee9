//! Config hot reload. The file watcher (debounced; watches the directories of the file and of its `include`
//! patterns, so editors that save by rename are seen, and a file dropped into `conf.d` too, and those of the
//! directory links on the main file's way, so a deploy swapping `current` is seen) and SIGHUP take
//! the same path: load and validate completely; on failure keep the old config, warn, and count; on success
//! publish the new snapshot, count, and log a one-line diff.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::include::IncludePattern;
use crate::config::{ConfigSource, Judged, RoleConfig, Sources, read_sources, reload_noting};
use crate::sdnotify::Notifier;

/// Editors write a file in several steps; events closer together than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(150);
/// The longest a stream of file events holds a reload back (each event starts [`DEBOUNCE`] again).
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);
/// How often an include directory that is not there is looked for.
const MISSING_RETRY: Duration = Duration::from_secs(2);
/// How long a file emptied in place is taken for one being written ([`Sources::being_rewritten`]): past it,
/// it is judged as it is. An include emptied on purpose (a template rendering a program away) held back
/// every reload until a SIGHUP, an edit of the main file's included.
const BLANK_PATIENCE: Duration = Duration::from_secs(5);
/// The most symbolic links followed on one walk of [`links_to`] (a file's way), the kernel's own limit
/// (past it, `ELOOP`): links leading into each other end there.
const MAX_LINKS: usize = 40;
/// How long a rejected config's bytes are not judged again on a file event. A verdict may hang on more
/// than the files (a user or a log directory made since, a backend's name that resolves now): the same
/// bytes saved again after it were skipped until a SIGHUP.
const REJUDGE_AFTER: Duration = Duration::from_secs(5);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    File,
    Signal,
    Api,
    /// The role found that a host name in its config resolves to new addresses.
    Resolve,
}

/// The outcome of the latest reload attempt, for `ctl`, dashboards and tests.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// Successful reloads since start.
    pub reloads: u64,
    /// Failed reloads since start.
    pub failures: u64,
    /// The error of the latest attempt, if it failed.
    pub last_error: Option<String>,
    /// When the latest attempt happened (seconds since the Unix epoch).
    pub last_attempt_unix: Option<u64>,
}

/// Handle to the reload loop.
#[derive(Debug, Clone)]
pub struct Reloader {
    trigger: mpsc::Sender<Cause>,
    status: Arc<watch::Sender<ReloadStatus>>,
    role: &'static str,
    notifier: Notifier,
}

impl Reloader {
    /// Asks for a reload; the outcome shows up in `status()`.
    pub fn trigger(&self, cause: Cause) {
        let _ = self.trigger.try_send(cause);
    }

    pub fn status(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Counts a config that a role read on its own and rejected (the monitor's `reread` and `update`), as a
    /// failed reload: logged, in `/metrics`, in `status()`, and in the service manager's status line.
    pub fn rejected(&self, error: &str) {
        warn!(role = self.role, error, "config rejected; keeping the old config");
        failed(&self.status, self.role, error);
        let role = self.role;
        (self.notifier).status(&format!(
            "{role} ready; config rejected, keeping the old config: {error}"
        ));
    }
}

/// Records a failed reload attempt.
fn failed(status: &watch::Sender<ReloadStatus>, role: &'static str, error: &str) {
    metrics::counter!(crate::metrics::CONFIG_RELOAD_FAILURES_TOTAL, "role" => role).increment(1);
    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => role).set(0.0);
    status.send_modify(|s| {
        s.failures += 1;
        s.last_error = Some(error.to_string());
        s.last_attempt_unix = unix_now();
    });
}

fn unix_now() -> Option<u64> {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .ok()
}

struct State<C: RoleConfig> {
    source: ConfigSource,
    /// The config the process started with: what keys that need a restart still hold.
    started: C::Raw,
    raw: C::Raw,
    /// What the config in force was read from, and what the last rejected attempt read (cleared by a success
    /// or by the files coming back to the config in force).
    good: Option<Sources>,
    /// With when it was judged ([`REJUDGE_AFTER`]).
    bad: Option<(Sources, Instant)>,
    /// Since when the files have been found as they are, with one emptied ([`BLANK_PATIENCE`]).
    blank_since: Option<(Instant, Sources)>,
    /// The files the config names that the last load read (key and token files), watched and compared with
    /// the config's own.
    read_files: Vec<PathBuf>,
    watcher: Option<ConfigWatcher>,
    publish: watch::Sender<Arc<C>>,
    status: Arc<watch::Sender<ReloadStatus>>,
    role_label: &'static str,
    /// Told of each attempt that reads the config (`RELOADING=1`) and of its end (`READY=1`).
    notifier: Notifier,
}

/// Starts the reload loop (and the file watcher when the config came from a file).
pub fn spawn<C: RoleConfig>(
    source: ConfigSource,
    seed: (C::Raw, Option<Sources>),
    publish: watch::Sender<Arc<C>>,
    trigger: (mpsc::Sender<Cause>, mpsc::Receiver<Cause>),
    cancel: CancellationToken,
    notifier: Notifier,
) -> Reloader {
    let (tx, mut rx) = trigger;
    let status_tx = Arc::new(watch::Sender::new(ReloadStatus::default()));
    metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "role" => C::ROLE).increment(0);
    metrics::counter!(crate::metrics::CONFIG_RELOAD_FAILURES_TOTAL, "role" => C::ROLE).increment(0);
    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
    metrics::gauge!(crate::metrics::CONFIG_RESTART_PENDING, "role" => C::ROLE).set(0.0);

    let mut watcher = (source.path.as_deref()).and_then(|p| ConfigWatcher::start(p, tx.clone()));
    let read_files = seed.1.as_ref().map(Sources::referenced_files).unwrap_or_default();
    if let (Some(w), Some(sources)) = (&mut watcher, &seed.1) {
        w.follow(sources.patterns(), &followed(sources, &read_files));
        // An edit made while the role loaded (a balancer resolving its backends' names takes seconds) had
        // no watch to see it, and a SIGHUP then is ignored: the files are compared with the seed once.
        file_event(&tx);
    }
    let mut state = State::<C> {
        source,
        started: seed.0.clone(),
        raw: seed.0,
        good: seed.1,
        bad: None,
        blank_since: None,
        read_files,
        watcher,
        publish,
        status: status_tx.clone(),
        role_label: C::ROLE,
        notifier: notifier.clone(),
    };
    tokio::spawn(async move {
        loop {
            let missing = state.watcher.as_ref().is_some_and(|w| !w.warned.is_empty());
            let recheck = state.recheck();
            let cause = tokio::select! {
                _ = cancel.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
                // An include directory that was not there is looked for again: made later, it is watched
                // from then on, and what it holds is read now (no event would tell of the files made in it
                // before the watch).
                _ = tokio::time::sleep(MISSING_RETRY), if missing => {
                    match state.watcher.as_mut().is_some_and(ConfigWatcher::retry_missing) {
                        true => Cause::File,
                        false => continue,
                    }
                }
                // A file found emptied, looked at again once [`BLANK_PATIENCE`] is over.
                _ = tokio::time::sleep_until(recheck.unwrap_or_else(Instant::now).into()), if recheck.is_some() => {
                    Cause::File
                }
            };
            let mut cause = cause;
            if cause == Cause::File {
                // Until the files have been quiet for DEBOUNCE (each event starts it again; at most
                // DEBOUNCE_MAX in all): a writer slower than one wait (a template tool's first write after
                // its `>` truncated the file) was read half-written.
                let until = tokio::time::Instant::now() + DEBOUNCE_MAX;
                loop {
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    let quiet = tokio::time::sleep(DEBOUNCE.min(left));
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        () = quiet => break,
                        more = rx.recv() => match more {
                            None => return,
                            Some(Cause::File) if tokio::time::Instant::now() < until => {}
                            Some(c) => {
                                // A signal asks for the reload now.
                                if c != Cause::File {
                                    cause = c;
                                }
                                break;
                            }
                        },
                    }
                }
            }
            while let Ok(more) = rx.try_recv() {
                if more != Cause::File {
                    cause = more;
                }
            }
            state.attempt(cause);
        }
    });
    Reloader {
        trigger: tx,
        status: status_tx,
        role: C::ROLE,
        notifier,
    }
}

impl<C: RoleConfig> State<C> {
    /// When to look again at files found with one emptied: once its patience is over. Every attempt either
    /// waits (the patience not over), or ends it.
    fn recheck(&self) -> Option<Instant> {
        (self.blank_since.as_ref()).map(|(since, _)| *since + BLANK_PATIENCE)
    }

    fn attempt(&mut self, cause: Cause) {
        let now = unix_now();
        // A watcher event whose content we already judged is not a new change (editors touch files). The
        // content in force again after a rejected edit (the edit undone) clears that rejection. The content is
        // the main file's and its included files': an edit to one of those alone is a change. A rejection
        // remembers what its load read ([`Judged`]).
        let before = (self.source.path.as_deref())
            .and_then(|path| read_sources::<C>(path).ok())
            .map(|s| s.with_referenced(&self.read_files));
        if cause == Cause::File
            && let Some(on_disk) = &before
        {
            // A file empty now is one being written (a `>` truncates it first): its next event brings the rest.
            // An included one too; SIGHUP and `ctl` take it as it is.
            if on_disk.being_rewritten(self.good.as_ref()) {
                // Its own patience: restarted when the files are not those found before (another file
                // emptied since, the first written), which would otherwise get what was left of it.
                let since = match &self.blank_since {
                    Some((since, found)) if found == on_disk => *since,
                    _ => self.blank_since.insert((Instant::now(), on_disk.clone())).0,
                };
                if since.elapsed() < BLANK_PATIENCE {
                    tracing::info!(
                        role = self.role_label,
                        "a config file is empty: waiting for what is written to it (SIGHUP takes it as it is)"
                    );
                    return;
                }
                info!(
                    role = self.role_label, patience = ?BLANK_PATIENCE,
                    "a config file stayed empty: judging it as it is"
                );
            }
            // Past the check: the next file found emptied waits afresh. Kept, it was taken half-written at
            // once, its patience long over.
            self.blank_since = None;
            if Some(on_disk) == self.good.as_ref() {
                // Followed again even so: a link (the main file, an included or a named one) may lead
                // elsewhere now to the same bytes (a deploy relinking `conf.d/web.toml` to a new release),
                // whose directory the next edit is made in.
                self.follow(Some(on_disk));
                if self.bad.take().is_some() {
                    info!(role = self.role_label, "config file back to the config in force");
                    metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
                    self.status.send_modify(|s| {
                        s.last_error = None;
                        s.last_attempt_unix = now;
                    });
                }
                return;
            }
            if (self.bad.as_ref()).is_some_and(|(bad, at)| bad == on_disk && at.elapsed() < REJUDGE_AFTER) {
                // Followed even so, as above: the main file's directory made again with these bytes is a new
                // one to watch.
                self.follow(Some(on_disk));
                return;
            }
        }
        // Here, not at the signal: an attempt the checks above end was no reload. A SIGHUP always gets here
        // (they apply to file events only), which `Type=notify-reload` waits for. It judges the files as they
        // are: a file found emptied before waits afresh after it.
        self.blank_since = None;
        self.notifier.reloading();
        let mut judged = Judged::default();
        let result = reload_noting::<C>(&self.source, &self.started, &mut judged);
        // A config that did not get as far as its validation read none: the files in force stay watched.
        let validated = judged.read_files.is_some();
        if let Some(read_files) = judged.read_files {
            self.read_files = read_files;
        }
        match result {
            Ok(loaded) => {
                let diff = crate::config::diff(&self.raw, &loaded.raw, C::redact);
                info!(role = self.role_label, ?cause, changes = %diff, "config reloaded");
                // Named, each reload until a restart: "config reloaded" alone read as if they applied. The
                // config published has them at their running values (`config::reload`).
                let pending = crate::config::changed_under(&self.started, &loaded.raw, C::RESTART_KEYS);
                if !pending.is_empty() {
                    warn!(
                        role = self.role_label, keys = %pending.join(", "),
                        "changed keys that need a restart; the running values stay until then"
                    );
                }
                let gauge = metrics::gauge!(crate::metrics::CONFIG_RESTART_PENDING, "role" => C::ROLE);
                gauge.set(if pending.is_empty() { 0.0 } else { 1.0 });
                self.raw = loaded.raw;
                self.follow(loaded.sources.as_ref());
                self.good = loaded.sources;
                self.bad = None;
                let _ = self.publish.send(Arc::new(loaded.config));
                metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "role" => C::ROLE).increment(1);
                metrics::gauge!(crate::metrics::CONFIG_LAST_RELOAD_OK, "role" => C::ROLE).set(1.0);
                self.status.send_modify(|s| {
                    s.reloads += 1;
                    s.last_error = None;
                    s.last_attempt_unix = now;
                });
                let status = match pending.is_empty() {
                    true => format!("{} ready; config reloaded", C::ROLE),
                    false => format!(
                        "{} ready; config reloaded, restart pending for {}",
                        C::ROLE,
                        pending.join(", ")
                    ),
                };
                self.notifier.reloaded(&status);
            }
            Err(e) => {
                warn!(role = self.role_label, ?cause, error = %e, "config reload rejected; keeping the old config");
                if self.source.path.is_some() {
                    // What the load read, which its verdict is about; compared with later events as read
                    // with the files now watched (those in force still, when it did not get as far as its
                    // validation). What was read before the load remains when the main file could not be.
                    // None when the load could not read the main file (gone for a moment): what was read
                    // before it was judged by no load, and remembered, its bytes written back were skipped.
                    let read = match judged.sources {
                        Some(read) if validated => Some(read),
                        Some(read) => Some(read.with_referenced(&self.read_files)),
                        None => None,
                    };
                    // The rejected file's patterns: an edit to a file it newly includes may be its fix. With
                    // nothing read (the main file's directory removed), those in force: the main file's
                    // directory is watched again once it is back.
                    let follow = read.as_ref().or(before.as_ref()).or(self.good.as_ref());
                    follow_in(&mut self.watcher, &self.read_files, follow);
                    self.bad = read.map(|read| (read, Instant::now()));
                }
                failed(&self.status, C::ROLE, &e.to_string());
                // The old config serves on: ready still, and the status says the new one was refused.
                self.notifier.reloaded(&format!(
                    "{} ready; config reload rejected, keeping the old config: {e}",
                    C::ROLE
                ));
            }
        }
    }

    /// Watches what `sources` (the files just read) include, and the files the config names.
    fn follow(&mut self, sources: Option<&Sources>) {
        follow_in(&mut self.watcher, &self.read_files, sources);
    }
}

/// [`State::follow`], of its fields (`sources` may be another of them).
fn follow_in(watcher: &mut Option<ConfigWatcher>, read_files: &[PathBuf], sources: Option<&Sources>) {
    if let (Some(w), Some(sources)) = (watcher, sources) {
        w.follow(sources.patterns(), &followed(sources, read_files));
    }
}

/// The files the watcher follows besides the patterns' directories: those the config names (`read_files`,
/// key and token files), and the included files that are symbolic links, edited where they lead (a
/// `conf.d/web.toml` linked to the application's own checkout), where no pattern's directory is.
fn followed(sources: &Sources, read_files: &[PathBuf]) -> Vec<PathBuf> {
    let links = (sources.included_files())
        .filter(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.file_type().is_symlink()));
    (read_files.iter().cloned())
        .chain(links.map(Path::to_path_buf))
        .collect()
}

/// The paths whose events are a change to the config: the main file, the files its include patterns name,
/// and those patterns' directories themselves (made, removed or renamed: what the patterns match changes).
#[derive(Debug, Clone)]
struct Relevant {
    main: PathBuf,
    /// Where `main` leads when it is a symbolic link ([`link_target`]). Events name directory entries, never
    /// what a link leads to: a Kubernetes ConfigMap's file is a link through `..data`, which an update swaps
    /// by a rename (events for `..data` only), and a link to a file elsewhere is edited there. With a link,
    /// any entry of the main file's directory and the target itself count; the content fingerprint tells
    /// an edit from the rest.
    target: Option<PathBuf>,
    /// The symbolic links on the way to the main file ([`links_to`]), and to the referenced files that are
    /// links. A deploy swapping one (Capistrano's `current -> releases/1`, renamed over by a link to
    /// `releases/2`) leads the main file into another directory with an event on the link alone: the main
    /// file's directory is watched by inode, the old release's, and the new config was not loaded until a
    /// SIGHUP. The main file a link into such a path (`/etc/xc/lb.toml -> /srv/xc/current/lb.toml`) has
    /// the swap on its target's way, which [`link_target`] resolves past: those are walked too.
    dir_links: Vec<PathBuf>,
    patterns: Vec<IncludePattern>,
    /// The files the config names that its load read (key and token files), and the included files that are
    /// links ([`followed`]), each with where it leads when it is a link (a Kubernetes Secret's file is one,
    /// swapped as a ConfigMap's is).
    referenced: Vec<(PathBuf, Option<PathBuf>)>,
    /// The watched directories that are one directory under several names (`current` and the release it
    /// leads to, both named by the config), a group each ([`same_dirs`]). inotify watches a directory once,
    /// and notify names its events by the name it was watched under last: the other names' events came
    /// under that one, and matched nothing.
    same_dirs: Vec<Vec<PathBuf>>,
}

impl Relevant {
    fn covers(&self, path: &Path) -> bool {
        self.covers_as_named(path) || (self.other_names(path).iter()).any(|p| self.covers_as_named(p))
    }

    fn covers_as_named(&self, path: &Path) -> bool {
        // The main file's directory itself removed or renamed: its watch is gone with it.
        Some(path) == self.main.parent()
            || names(&self.main, self.target.as_deref(), path)
            || self.dir_links.iter().any(|link| link == path)
            || (self.patterns.iter()).any(|p| p.names(path) || path == p.dir)
            || (self.referenced.iter()).any(|(file, target)| names(file, target.as_deref(), path))
    }

    /// `path` as named under the other names of its directory, or of itself when it is a watched
    /// directory. None, and no allocation, when no directory is watched under two names.
    fn other_names(&self, path: &Path) -> Vec<PathBuf> {
        let mut others = Vec::new();
        for group in &self.same_dirs {
            if group.iter().any(|d| d == path) {
                others.extend(group.iter().filter(|d| *d != path).cloned());
            }
            if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
                && group.iter().any(|d| d == dir)
            {
                others.extend(group.iter().filter(|d| *d != dir).map(|d| d.join(name)));
            }
        }
        others
    }
}

/// Whether an event on `path` may change `file`, which leads to `target` when it is a link: the file itself,
/// or, for a link, the target or any entry of the link's directory.
fn names(file: &Path, target: Option<&Path>, path: &Path) -> bool {
    path == file || target.is_some_and(|t| path == t || path.parent() == file.parent())
}

/// The file `main` leads to, when it is itself a symbolic link. Not when only a directory above it is one: its
/// target's directory is then the main file's own, which inotify watches once under one name, and events
/// came named by the target's path, which no include pattern of the main file's directory matched.
fn link_target(main: &Path) -> Option<PathBuf> {
    let link = std::fs::symlink_metadata(main).ok()?.file_type().is_symlink();
    if !link {
        return None;
    }
    // A link to a file not there yet (a config naming a key file about to be written) leads where its text
    // says: making that file is the fix, whose event only a watch of that directory sees.
    (std::fs::canonicalize(main).ok()).or_else(|| Some(main.parent()?.join(std::fs::read_link(main).ok()?)))
}

/// The symbolic links met on the way to `dir` (absolute), each named by where it was met: those `dir`
/// names (`/srv/xc/current` in `/srv/xc/current/conf`), then those the links lead through, named by where
/// they lead (`/srv/xc/releases/2/conf` when `current` leads to `releases/2` and `conf` is a link too).
/// Its last part is walked as the others: a file that is a link is named, and the links on the way its
/// text says (relative to the link's directory as the kernel takes it, `..` after a link included), which
/// resolving it whole ([`link_target`]) leaves unnamed. Watching each one's directory sees it swapped. At
/// most [`MAX_LINKS`] are followed, so links leading into each other end; a part not there ends nothing (a
/// link to a release not made yet is still a link).
fn links_to(dir: &Path) -> Vec<PathBuf> {
    let mut links: Vec<PathBuf> = Vec::new();
    // Where the walk is: no link in it (each part was found to be none, or was a link's target, walked in
    // turn), so a `..` after it leads to its parent, as the kernel takes it.
    let mut at = PathBuf::from(if dir.has_root() { "/" } else { "" });
    // The parts left, the next one last; `..` as itself (a path never has it as a name).
    let mut left: Vec<OsString> = Vec::new();
    push_parts(&mut left, dir);
    let mut followed = 0;
    while let Some(part) = left.pop() {
        if part == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&part);
        match std::fs::read_link(&next) {
            Ok(_) if followed == MAX_LINKS => break,
            Ok(target) => {
                followed += 1;
                if !links.contains(&next) {
                    links.push(next);
                }
                if target.has_root() {
                    at = PathBuf::from("/");
                }
                push_parts(&mut left, &target);
            }
            // Not a link, or not there.
            Err(_) => at = next,
        }
    }
    links
}

/// Puts `path`'s names and `..`s on `left`, its first last (popped first); `.` and the root say nothing.
fn push_parts(left: &mut Vec<OsString>, path: &Path) {
    left.extend(path.components().rev().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_os_string()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    }));
}

/// Which directory a path leads to (device and inode): inotify watches that, not the name.
type DirId = (u64, u64);

fn dir_id(dir: &Path) -> Option<DirId> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// The names among `dirs` that lead to one directory, a group each, for [`Relevant::same_dirs`].
fn same_dirs(dirs: &BTreeMap<PathBuf, Option<DirId>>) -> Vec<Vec<PathBuf>> {
    let mut by_id: BTreeMap<DirId, Vec<PathBuf>> = BTreeMap::new();
    for (dir, id) in dirs {
        if let Some(id) = id {
            by_id.entry(*id).or_default().push(dir.clone());
        }
    }
    by_id.into_values().filter(|names| names.len() > 1).collect()
}

/// The notify watcher over the config file's directory (so a rename-on-save, a new inode, is still seen),
/// the directories its include patterns name and those of the links on its way, none of them recursively.
/// Dropping it stops the watch.
struct ConfigWatcher {
    watcher: notify::RecommendedWatcher,
    relevant: Arc<ArcSwap<Relevant>>,
    main: PathBuf,
    /// The directories watched, the main file's among them, to unwatch those the config no longer names,
    /// each with the directory it led to when watched: one that leads to another now (a link on its way
    /// swapped) has its watch of the old one removed.
    watched: BTreeMap<PathBuf, Option<DirId>>,
    /// Include directories that could not be watched, each warned about once until it can be.
    warned: BTreeSet<PathBuf>,
}

/// Slots of the reload channel file events leave free, for SIGHUP: a burst of events (a deploy rewriting
/// several included files) filled it, the signal's `try_send` failed, and `systemctl reload` under
/// `Type=notify-reload` waited for a RELOADING=1 that never came. A file event dropped loses nothing: one
/// queued already brings the reload that reads every file.
const KEPT_FOR_SIGNALS: usize = 2;

/// Queues a file event, unless only the slots kept for signals are left.
fn file_event(tx: &mpsc::Sender<Cause>) {
    if tx.capacity() > KEPT_FOR_SIGNALS {
        let _ = tx.try_send(Cause::File);
    }
}

impl ConfigWatcher {
    fn start(path: &Path, tx: mpsc::Sender<Cause>) -> Option<Self> {
        let main = crate::config::absolute(path);
        let dir = main.parent()?.to_path_buf();
        let relevant = Arc::new(ArcSwap::from_pointee(Relevant {
            main: main.clone(),
            target: None,
            dir_links: Vec::new(),
            patterns: Vec::new(),
            referenced: Vec::new(),
            same_dirs: Vec::new(),
        }));
        let judge = relevant.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // An error, or events lost to a full queue (`Rescan`): what changed is not known, so the files
            // are read again.
            let Ok(event) = res else { return file_event(&tx) };
            if event.need_rescan() {
                return file_event(&tx);
            }
            if event.kind.is_access() {
                return;
            }
            let relevant = judge.load();
            if event.paths.iter().any(|p| relevant.covers(p)) {
                file_event(&tx);
            }
        })
        .map_err(|e| warn!(error = %e, "cannot start the config watcher; SIGHUP still reloads"))
        .ok()?;
        let id = dir_id(&dir);
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; SIGHUP still reloads");
            return None;
        }
        Some(Self {
            watcher,
            relevant,
            main,
            watched: BTreeMap::from([(dir, id)]),
            warned: BTreeSet::new(),
        })
    }

    /// Tries again to watch the include directories that could not be: whether one is watched now.
    fn retry_missing(&mut self) -> bool {
        let mut found = false;
        for dir in std::mem::take(&mut self.warned) {
            let id = dir_id(&dir);
            if self.watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok() {
                info!(dir = %dir.display(), "a directory the config reads from is there now; watching it");
                self.watched.insert(dir, id);
                found = true;
            } else {
                self.warned.insert(dir);
            }
        }
        if found {
            // One made since may be a directory watched already under another name (a link to it named by
            // the config too): notify names both's events by one name from then on, and the other's matched
            // nothing until the next reload regrouped them.
            let relevant = Relevant {
                same_dirs: same_dirs(&self.watched),
                ..Relevant::clone(&self.relevant.load())
            };
            self.relevant.store(Arc::new(relevant));
        }
        found
    }

    /// Watches the directories of `patterns` (the config's includes now), of the files in `referenced` (those
    /// the config names that its load read, and the included links: [`followed`]), of the files the main
    /// file and those lead to when they are links, and of the links on the main file's way and on the linked
    /// referenced files' ([`links_to`]), and no others besides the main file's. One that is not there is
    /// skipped with one warning, and looked for again every [`MISSING_RETRY`] (and at each reload) until it
    /// is there.
    fn follow(&mut self, patterns: &[IncludePattern], referenced: &[PathBuf]) {
        let main_dir = self.main.parent().map(Path::to_path_buf);
        // Looked up again at each reload: a swap of a ConfigMap's `..data` leads it into a new directory, a
        // deploy's swap of `current` into a new release, whose own links may be others.
        let target = link_target(&self.main);
        let referenced: Vec<(PathBuf, Option<PathBuf>)> =
            (referenced.iter()).map(|f| (f.clone(), link_target(f))).collect();
        // The main file walked whole, not its directory: a link, its target's way is walked too (`current`
        // in `/etc/xc/lb.toml -> /srv/xc/current/lb.toml`). So are the referenced files that are links, a
        // Secret's or an included file's, deployed the same way.
        let mut dir_links = links_to(&self.main);
        for (file, _) in referenced.iter().filter(|(_, target)| target.is_some()) {
            for link in links_to(file) {
                if !dir_links.contains(&link) {
                    dir_links.push(link);
                }
            }
        }
        // Each with the directory it leads to, looked up before it is watched: one swapped between the two
        // is taken for swapped again at the next reload, and watched anew, never left watched behind.
        let dirs: BTreeMap<PathBuf, Option<DirId>> = (patterns.iter())
            .map(|p| p.dir.clone())
            .chain(target.as_deref().and_then(Path::parent).map(Path::to_path_buf))
            .chain(
                referenced
                    .iter()
                    .flat_map(|(f, t)| [Some(f), t.as_ref()])
                    .flatten()
                    .filter_map(|f| f.parent().map(Path::to_path_buf)),
            )
            .chain(dir_links.iter().filter_map(|l| l.parent().map(Path::to_path_buf)))
            // The main file's own, watched again too: removed and made again, it is a new directory.
            .chain(main_dir)
            .map(|dir| {
                let id = dir_id(&dir);
                (dir, id)
            })
            .collect();
        // Before the watches change, so an event of a newly watched directory is judged by its pattern.
        self.relevant.store(Arc::new(Relevant {
            main: self.main.clone(),
            target,
            dir_links,
            patterns: patterns.to_vec(),
            referenced,
            same_dirs: same_dirs(&dirs),
        }));
        for (dir, was) in &self.watched {
            // No longer named, or leading to another directory now. inotify watches the directory, not the
            // name: watched again by its name, the new one was watched besides the old, whose events still
            // came under that name, and whose removal (an old release deleted) notify took for the name's
            // and unwatched the new one with it. It may be gone already (removed with its directory).
            if dirs.get(dir).is_none_or(|now| now != was) {
                let _ = self.watcher.unwatch(dir);
            }
        }
        self.watched.clear();
        self.warned.retain(|d| dirs.contains_key(d));
        for (dir, id) in dirs {
            // Watched again each time: a directory removed and made again is a new one to the kernel, and
            // watching one already watched changes nothing.
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.warned.remove(&dir);
                    self.watched.insert(dir, id);
                }
                Err(e) => {
                    if self.warned.insert(dir.clone()) {
                        warn!(error = %e, dir = %dir.display(),
                            "cannot watch a directory the config reads from; its files apply on SIGHUP or `ctl update`");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ConfigWatcher {
        fn watched_dirs(&self) -> BTreeSet<PathBuf> {
            self.watched.keys().cloned().collect()
        }
    }

    fn pattern(dir: &str, name: &str) -> IncludePattern {
        IncludePattern {
            dir: dir.into(),
            name: name.into(),
        }
    }

    #[test]
    fn an_event_counts_for_the_main_file_and_what_the_patterns_name() {
        let relevant = Relevant {
            main: "/etc/x/monitor.toml".into(),
            target: None,
            dir_links: vec!["/etc/x/current".into()],
            patterns: vec![
                pattern("/etc/x/conf.d", "*.toml"),
                pattern("/etc/x", "extra.toml"),
            ],
            referenced: vec![
                ("/etc/keys/report.key".into(), None),
                // A Kubernetes Secret's file: a link through `..data`, swapped by a rename.
                (
                    "/run/secret/token".into(),
                    Some("/run/secret/..2026_12_07/token".into()),
                ),
            ],
            // `/etc/x/conf.d`, watched under a second name too.
            same_dirs: vec![vec!["/etc/x/conf.d".into(), "/srv/conf".into()]],
        };
        for (path, want) in [
            ("/etc/x/monitor.toml", true),
            ("/etc/x/monitor.toml.tmp", false),
            ("/etc/x/conf.d/monitor.toml", true),
            ("/etc/y/monitor.toml", false),
            ("/etc/x/conf.d/web.toml", true),
            ("/etc/x/conf.d/./web.toml", true),
            ("/etc/x/conf.d/web.toml.bak", false),
            // An editor's swap file is no program, as the load does not read it.
            ("/etc/x/conf.d/.web.toml.swp", false),
            ("/etc/x/conf.d/sub/web.toml", false),
            ("/etc/x/web.toml", false),
            ("/etc/x/extra.toml", true),
            // The directory itself made or removed: what the pattern matches changes.
            ("/etc/x/conf.d", true),
            // The main file's directory itself removed or renamed away: its watch went with it.
            ("/etc/x", true),
            ("/etc/x/conf.e", false),
            // A file the config names (a key file), and only that one of its directory.
            ("/etc/keys/report.key", true),
            ("/etc/keys/other.key", false),
            // A linked one: any entry of the link's directory, and the file it leads to.
            ("/run/secret/..data", true),
            ("/run/secret/..2026_12_07/token", true),
            ("/run/secret/..2026_12_07/other", false),
            // A link on the main file's way (swapped by a deploy), not the other entries of its directory.
            ("/etc/x/current", true),
            ("/etc/x/current.tmp", false),
            // The include directory's events named by its other name, and the directory itself so named.
            ("/srv/conf/web.toml", true),
            ("/srv/conf/web.toml.bak", false),
            ("/srv/conf", true),
            ("/srv/other/web.toml", false),
        ] {
            assert_eq!(relevant.covers(Path::new(path)), want, "{path}");
        }
    }

    /// The runtime logs that a changed key that needs a restart keeps its running value until then; what it
    /// publishes must say the same, or a role reading its config per use applies it at once (the agent's
    /// `agent_id`, read per report).
    #[tokio::test]
    async fn a_reload_publishes_the_restart_keys_at_their_running_values() {
        use crate::config::tests::{Kept, file_source};
        let dir = tempfile::tempdir().unwrap();
        let src = file_source(dir.path(), "listen = \"a\"\n[inner]\ntimeout_ms = 10\n");
        let loaded = crate::config::load::<Kept>(&src).unwrap();
        let (publish, mut config) = watch::channel(Arc::new(loaded.config));
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let seed = (loaded.raw, loaded.sources);
        let reloader = spawn::<Kept>(src, seed, publish, mpsc::channel(8), cancel, Notifier::disabled());

        file_source(
            dir.path(),
            "listen = \"b\"\ngrace_ms = 4\n[inner]\ntimeout_ms = 20\n",
        );
        reloader.trigger(Cause::Signal);
        tokio::time::timeout(Duration::from_secs(10), config.changed())
            .await
            .expect("a reload within 10 s")
            .unwrap();
        let published = config.borrow_and_update().clone();
        let want = Kept {
            listen: "a".into(),
            grace_ms: 4,
            timeout_ms: 10,
        };
        assert_eq!(*published, want);
        assert_eq!(reloader.status().borrow().reloads, 1);
    }

    /// A burst of file events leaves room for a SIGHUP.
    #[test]
    fn file_events_leave_room_for_a_signal() {
        let (tx, mut rx) = mpsc::channel(8);
        for _ in 0..100 {
            file_event(&tx);
        }
        assert_eq!(tx.capacity(), KEPT_FOR_SIGNALS);
        tx.try_send(Cause::Signal).unwrap();
        let mut got = Vec::new();
        while let Ok(c) = rx.try_recv() {
            got.push(c);
        }
        assert_eq!(got.last(), Some(&Cause::Signal));
    }

    /// The reload loop's state over a config loaded from `src`, with no watcher: a test makes its attempts
    /// one by one, as the loop makes them once its debounce has ended.
    #[allow(clippy::type_complexity)]
    fn unwatched<C: RoleConfig>(
        src: ConfigSource,
        loaded: crate::config::Loaded<C>,
    ) -> (
        State<C>,
        watch::Receiver<Arc<C>>,
        Arc<watch::Sender<ReloadStatus>>,
    ) {
        let (publish, config) = watch::channel(Arc::new(loaded.config));
        let status = Arc::new(watch::Sender::new(ReloadStatus::default()));
        let state = State::<C> {
            source: src,
            started: loaded.raw.clone(),
            raw: loaded.raw,
            read_files: (loaded.sources.as_ref())
                .map(Sources::referenced_files)
                .unwrap_or_default(),
            good: loaded.sources,
            bad: None,
            blank_since: None,
            watcher: None,
            publish,
            status: status.clone(),
            role_label: "test",
            notifier: Notifier::disabled(),
        };
        (state, config, status)
    }

    /// The config file at `main` (no environment layered on it) and its load.
    fn loaded_from<C: RoleConfig>(main: &Path) -> (ConfigSource, crate::config::Loaded<C>) {
        let mut src = ConfigSource::file(main);
        src.use_env = false;
        let loaded = crate::config::load::<C>(&src).unwrap();
        (src, loaded)
    }

    /// Writes `main` as a config whose `key_file` is the path it is given.
    fn key_namer(main: &Path) -> impl Fn(&Path) + '_ {
        move |key| std::fs::write(main, format!("key_file = \"{}\"\n", key.display())).unwrap()
    }

    /// An emptied file (one being rewritten in place) is not a config: a file event waits for what is
    /// written to it, and a SIGHUP is refused, naming why; the config in force stays either way. Taken, an
    /// empty file was every default, and a monitor stopped every program. (The attempts are made here one
    /// by one, as the loop makes them once its debounce has ended.)
    #[test]
    fn an_emptied_file_is_never_reloaded() {
        use crate::config::tests::{Kept, file_source};
        let dir = tempfile::tempdir().unwrap();
        let src = file_source(dir.path(), "listen = \"a\"\n[inner]\ntimeout_ms = 10\n");
        let loaded = crate::config::load::<Kept>(&src).unwrap();
        let (mut state, mut config, status) = unwatched(src, loaded);

        file_source(dir.path(), "");
        state.attempt(Cause::File);
        let now = status.borrow().clone();
        assert_eq!(
            (now.reloads, now.last_error),
            (0, None),
            "the empty file was no reload, nor a refusal"
        );
        assert!(!config.has_changed().unwrap());

        file_source(
            dir.path(),
            "listen = \"a\"\ngrace_ms = 4\n[inner]\ntimeout_ms = 10\n",
        );
        state.attempt(Cause::File);
        assert!(config.has_changed().unwrap());
        assert_eq!(config.borrow_and_update().grace_ms, 4);
        assert_eq!(status.borrow().reloads, 1);

        file_source(dir.path(), " \n");
        state.attempt(Cause::Signal);
        let error = status.borrow().last_error.clone().unwrap_or_default();
        assert!(error.contains("the file is empty"), "{error}");
        assert_eq!(config.borrow().grace_ms, 4, "the config in force stays");
        assert!(!config.has_changed().unwrap());
    }

    /// An included file emptied and left so (a template rendering a program away) is judged as it is once
    /// [`BLANK_PATIENCE`] is over: it held back every later reload, an edit of the main file's too, until a
    /// SIGHUP. Until then it is taken for one being written, and the loop is asked to look at it again.
    #[test]
    fn an_include_left_empty_is_judged_once_the_patience_is_over() {
        use crate::config::tests::Included;
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf.d");
        std::fs::create_dir(&conf_d).unwrap();
        std::fs::write(conf_d.join("web.toml"), "[programs.web]\n").unwrap();
        std::fs::write(conf_d.join("api.toml"), "[programs.api]\n").unwrap();
        let main = dir.path().join("main.toml");
        std::fs::write(&main, "include = [\"conf.d/*.toml\"]\n").unwrap();
        let (src, loaded) = loaded_from::<Included>(&main);
        let (mut state, mut config, status) = unwatched(src, loaded);
        assert_eq!(config.borrow_and_update().programs, ["api", "web"]);

        // The patience over (moved back here, not waited out).
        let age = |state: &mut State<Included>| {
            let (since, _) = state.blank_since.as_mut().expect("a file found emptied");
            *since = since.checked_sub(BLANK_PATIENCE).unwrap();
        };
        std::fs::write(conf_d.join("api.toml"), "").unwrap();
        state.attempt(Cause::File);
        assert_eq!(status.borrow().reloads, 0, "held while it may be being written");
        assert!(state.recheck().expect("a look again asked for") > Instant::now());
        // Written meanwhile, and another file emptied: that one has its own patience, not what was left of
        // the first's.
        std::fs::write(conf_d.join("api.toml"), "[programs.api]\n").unwrap();
        std::fs::write(conf_d.join("web.toml"), "").unwrap();
        age(&mut state);
        state.attempt(Cause::File);
        assert_eq!(status.borrow().reloads, 0, "the second file taken half-written");
        age(&mut state);
        state.attempt(Cause::File);
        assert_eq!(status.borrow().reloads, 1, "still held");
        assert_eq!(config.borrow_and_update().programs, ["api"]);
        // Another emptied later waits afresh: the first one's patience, long over, is not its own.
        std::fs::write(conf_d.join("api.toml"), "").unwrap();
        state.attempt(Cause::File);
        assert_eq!(status.borrow().reloads, 1, "taken half-written at once");
    }

    /// The main file's directory removed and made again (`rm -rf /etc/xcluster; cp -r new /etc/xcluster`) is
    /// a new directory to the kernel, and its watch went with the old one: it is watched again once it is
    /// there, as an include directory is. Before, it was watched once at start, and no edit was seen after.
    #[tokio::test]
    async fn the_main_files_directory_made_again_is_watched_again() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc");
        std::fs::create_dir(&dir).unwrap();
        let main = dir.join("monitor.toml");
        std::fs::write(&main, "").unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        watcher.follow(&[], &[]);
        std::fs::remove_dir_all(&dir).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(seen.ok().flatten(), Some(Cause::File), "no event for the removal");
        // The reload that follows reads nothing and follows the config in force, whose directory is missing.
        watcher.follow(&[], &[]);
        assert!(watcher.warned.contains(&dir), "{:?}", watcher.warned);
        std::fs::create_dir(&dir).unwrap();
        assert!(watcher.retry_missing());
        assert!(watcher.watched.contains_key(&dir));
        while rx.try_recv().is_ok() {}
        std::fs::write(&main, "a = 1\n").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            seen.ok().flatten(),
            Some(Cause::File),
            "no event from the new directory"
        );
    }

    /// A pattern whose directory lies outside the main file's is seen only through a watch of its own, so an
    /// event from it shows that `follow` watched it, as it does after a reload that names a new pattern.
    #[tokio::test]
    async fn the_watcher_follows_the_patterns_it_is_given() {
        let root = tempfile::tempdir().unwrap();
        let [main_dir, first, second] = ["main", "first", "second"].map(|d| {
            let dir = root.path().join(d);
            std::fs::create_dir(&dir).unwrap();
            dir
        });
        let main = main_dir.join("monitor.toml");
        std::fs::write(&main, "").unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        // A directory not there yet is skipped, not an error.
        let missing = pattern(root.path().join("missing").to_str().unwrap(), "*.toml");
        watcher.follow(
            &[pattern(first.to_str().unwrap(), "*.toml"), missing.clone()],
            &[],
        );
        assert_eq!(
            watcher.watched_dirs(),
            BTreeSet::from([first.clone(), main_dir.clone()])
        );
        std::fs::write(first.join("web.toml"), "").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            seen.ok().flatten(),
            Some(Cause::File),
            "no event for the first directory"
        );

        // The missing directory, made later, is watched once looked for again.
        assert!(!watcher.retry_missing(), "still missing");
        let made = root.path().join("missing");
        std::fs::create_dir(&made).unwrap();
        assert!(watcher.retry_missing());
        assert!(watcher.watched.contains_key(&made) && watcher.warned.is_empty());

        // A new config's patterns: the directory it no longer names is left. (No event is awaited here: one
        // of the write above may still be on its way, and would pass for one of this directory.)
        watcher.follow(&[pattern(second.to_str().unwrap(), "*.toml"), missing], &[]);
        assert_eq!(
            watcher.watched_dirs(),
            BTreeSet::from([second.clone(), made, main_dir])
        );
    }

    /// A main file that is a symbolic link, as Kubernetes mounts a ConfigMap's (`monitor.toml` ->
    /// `..data/monitor.toml`, `..data` -> a directory of the version): an update makes a new directory and
    /// renames a new `..data` link over the old, and no event names `monitor.toml`. The watcher saw none
    /// of them, and the new config was never loaded.
    #[tokio::test]
    async fn the_watcher_sees_a_linked_main_file_swapped_and_follows_it() {
        let root = tempfile::tempdir().unwrap();
        let mount = root.path().join("config");
        let version = |name: &str, text: &str| {
            let dir = mount.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("monitor.toml"), text).unwrap();
        };
        version("..v1", "a = 1\n");
        std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
        let main = mount.join("monitor.toml");
        std::os::unix::fs::symlink("..data/monitor.toml", &main).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        watcher.follow(&[], &[]);
        assert_eq!(
            watcher.watched_dirs(),
            BTreeSet::from([mount.join("..v1"), mount.clone()])
        );

        version("..v2", "a = 2\n");
        std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(seen.ok().flatten(), Some(Cause::File), "no event for the swap");
        // The reload that follows leads the watch to the new version's directory, where an edit of the
        // file counts (those directories' other files do not).
        watcher.follow(&[], &[]);
        assert_eq!(
            watcher.watched_dirs(),
            BTreeSet::from([mount.join("..v2"), mount.clone()])
        );
        let relevant = watcher.relevant.load();
        assert!(relevant.covers(&mount.join("..v2/monitor.toml")));
        assert!(!relevant.covers(&mount.join("..v2/other.toml")));
    }

    /// A role whose config names a key file.
    #[derive(Debug)]
    struct Keyed {
        key: Vec<u8>,
    }

    #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct KeyedRaw {
        key_file: String,
    }

    impl RoleConfig for Keyed {
        const ROLE: &'static str = "test";
        type Raw = KeyedRaw;
        fn validate(raw: &KeyedRaw) -> Result<Self, Vec<crate::config::ConfigIssue>> {
            let mut v = crate::config::Validator::new();
            let key = v.key_file("key_file", &raw.key_file);
            v.finish(Keyed { key: key.bytes })
        }
    }

    /// Waits up to 10 s for the next config published, after `what`.
    async fn reloaded(config: &mut watch::Receiver<Arc<Keyed>>, what: &str) {
        let next = tokio::time::timeout(Duration::from_secs(10), config.changed()).await;
        assert!(matches!(next, Ok(Ok(()))), "no reload of {what}");
    }

    /// A key file rewritten alone (a rotated key) is a change to the config: the watcher sees it and the
    /// reload applies it. Before, the config's own files were all that was compared and watched, and only
    /// SIGHUP applied a new key. A rejected config's key file is watched too: writing it is the fix.
    #[tokio::test]
    async fn a_key_file_changed_alone_is_a_change_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let key = keys.join("report.key");
        std::fs::write(&key, "first-key-0123456789\n").unwrap();
        let main = dir.path().join("c.toml");
        key_namer(&main)(&key);
        let (src, loaded) = loaded_from::<Keyed>(&main);
        let sources = loaded.sources.as_ref().unwrap();
        assert_eq!(sources.referenced_files(), vec![key.clone()]);
        // Unchanged, the files read now are the load's.
        let read_now = || {
            read_sources::<Keyed>(&main)
                .unwrap()
                .with_referenced(std::slice::from_ref(&key))
        };
        assert_eq!(&read_now(), sources);

        let (publish, mut config) = watch::channel(Arc::new(loaded.config));
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let seed = (loaded.raw, loaded.sources);
        let reloader = spawn::<Keyed>(src, seed, publish, mpsc::channel(8), cancel, Notifier::disabled());
        let status = reloader.status.subscribe();
        std::fs::write(&key, "second-key-0123456789\n").unwrap();
        reloaded(&mut config, "the rotated key").await;
        assert_eq!(config.borrow().key, b"second-key-0123456789");

        // Emptied (`echo new > key` truncates it first), it is a file being written: judged, an empty token
        // was taken and refused every call. What is written to it then applies.
        let full = read_now();
        std::fs::write(&key, "").unwrap();
        assert!(read_now().being_rewritten(Some(&full)));
        std::fs::write(&key, "third-key-0123456789\n").unwrap();
        reloaded(&mut config, "the rewritten key").await;
        assert_eq!(config.borrow().key, b"third-key-0123456789");
        assert_eq!(status.borrow().last_error, None);

        // Named by a rejected config and not there yet, it is watched: writing it is the fix.
        let other = keys.join("next.key");
        key_namer(&main)(&other);
        let mut refused = status.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            refused.wait_for(|s| s.last_error.is_some()),
        )
        .await
        .expect("the config naming a missing key file was not judged")
        .unwrap();
        std::fs::write(&other, "fourth-key-0123456789\n").unwrap();
        reloaded(&mut config, "the key file written").await;
        assert_eq!(config.borrow().key, b"fourth-key-0123456789");
    }

    /// A rejected config is remembered by what its load read, the files it names included: a file event
    /// with nothing changed since (an editor touching the file) is no new attempt. It was remembered with
    /// the files the config in force names, so the next event found it changed and judged it once more.
    #[test]
    fn a_rejected_config_is_judged_once() {
        let dir = tempfile::tempdir().unwrap();
        let [first, second] = ["first.key", "second.key"].map(|k| dir.path().join(k));
        std::fs::write(&first, "first-key-0123456789\n").unwrap();
        let main = dir.path().join("c.toml");
        let names = key_namer(&main);
        names(&first);
        let (src, loaded) = loaded_from::<Keyed>(&main);
        let (mut state, mut config, status) = unwatched(src, loaded);
        let failures = || status.borrow().failures;

        // Naming a key file that is not there yet.
        names(&second);
        state.attempt(Cause::File);
        assert_eq!(failures(), 1);
        state.attempt(Cause::File);
        assert_eq!(failures(), 1, "the same rejected config judged again");
        // Once the verdict is REJUDGE_AFTER old (moved back here, not waited out), the same bytes are judged
        // again: what it hung on besides the files (a user, a directory) may have been made since.
        let (_, at) = state.bad.as_mut().expect("a rejection remembered");
        *at = at.checked_sub(REJUDGE_AFTER).unwrap();
        state.attempt(Cause::File);
        assert_eq!(failures(), 2, "an old verdict taken for good");

        // Not TOML: nothing read but the main file.
        std::fs::write(&main, "key_file = \n").unwrap();
        state.attempt(Cause::File);
        state.attempt(Cause::File);
        assert_eq!(failures(), 3);

        // The fix: naming the file again, then writing it.
        names(&second);
        state.attempt(Cause::File);
        assert_eq!(failures(), 4);
        std::fs::write(&second, "second-key-0123456789\n").unwrap();
        state.attempt(Cause::File);
        assert_eq!((failures(), status.borrow().reloads), (4, 1));
        assert_eq!(config.borrow_and_update().key, b"second-key-0123456789");
    }

    /// [`Keyed`] with its key file a restart key: a reload keeps the running one, which only the second
    /// validation (with the restart keys at their running values) reads.
    #[derive(Debug)]
    struct KeptKey {
        key: Vec<u8>,
    }

    impl RoleConfig for KeptKey {
        const ROLE: &'static str = "test";
        const RESTART_KEYS: &'static [&'static str] = &["key_file"];
        type Raw = KeyedRaw;
        fn validate(raw: &KeyedRaw) -> Result<Self, Vec<crate::config::ConfigIssue>> {
            Keyed::validate(raw).map(|k| KeptKey { key: k.key })
        }
    }

    /// A key file only the second validation read (the running value of a restart key) is watched and
    /// judged by as the others: an edit of it was seen only at the next SIGHUP.
    #[test]
    fn a_file_only_the_restart_keys_validation_read_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let [running, named] = ["running.key", "named.key"].map(|k| dir.path().join(k));
        std::fs::write(&running, "first-key-0123456789\n").unwrap();
        std::fs::write(&named, "named-key-0123456789\n").unwrap();
        let main = dir.path().join("c.toml");
        let names = key_namer(&main);
        names(&running);
        let (src, loaded) = loaded_from::<KeptKey>(&main);
        let (mut state, mut config, status) = unwatched(src, loaded);
        // The file names another key file: the running one is kept until a restart.
        names(&named);
        state.attempt(Cause::File);
        assert_eq!(status.borrow().failures, 0);
        assert_eq!(config.borrow_and_update().key, b"first-key-0123456789");
        assert!(state.read_files.contains(&running), "{:?}", state.read_files);
        // The running key file rewritten: a change to the config in force.
        std::fs::write(&running, "second-key-0123456789\n").unwrap();
        state.attempt(Cause::File);
        assert_eq!(config.borrow_and_update().key, b"second-key-0123456789");
    }

    /// `dir/main.toml` including `conf.d/*.toml`, where `conf.d/web.toml` (`conf.d` made already) is a link to
    /// `target`: its source and its load.
    fn linked_include(
        dir: &Path,
        target: &Path,
    ) -> (
        ConfigSource,
        crate::config::Loaded<crate::config::tests::Included>,
    ) {
        std::os::unix::fs::symlink(target, dir.join("conf.d/web.toml")).unwrap();
        let main = dir.join("main.toml");
        std::fs::write(&main, "include = [\"conf.d/*.toml\"]\n").unwrap();
        loaded_from(&main)
    }

    /// An included file that is a symbolic link (`conf.d/web.toml` leading to the application's own
    /// checkout) is edited where it leads, a directory no pattern names: it is watched there. Before, the
    /// edit was seen only at the next SIGHUP.
    #[tokio::test]
    async fn an_included_link_is_followed_to_where_it_leads() {
        use crate::config::tests::Included;
        let dir = tempfile::tempdir().unwrap();
        let [conf_d, app] = ["conf.d", "app"].map(|d| dir.path().join(d));
        std::fs::create_dir(&conf_d).unwrap();
        std::fs::create_dir(&app).unwrap();
        std::fs::write(app.join("web.toml"), "[programs.web]\n").unwrap();
        let (src, loaded) = linked_include(dir.path(), &app.join("web.toml"));
        assert_eq!(loaded.config.programs, ["web"]);
        let (publish, mut config) = watch::channel(Arc::new(loaded.config));
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let seed = (loaded.raw, loaded.sources);
        let _reloader = spawn::<Included>(src, seed, publish, mpsc::channel(8), cancel, Notifier::disabled());

        std::fs::write(app.join("web.toml"), "[programs.web]\n[programs.api]\n").unwrap();
        let next = tokio::time::timeout(Duration::from_secs(10), config.changed()).await;
        assert!(
            matches!(next, Ok(Ok(()))),
            "the edit where the link leads was not seen"
        );
        assert_eq!(config.borrow().programs, ["api", "web"]);
    }

    /// An included link led anew to the same bytes elsewhere (a deploy's new release) is no change to the
    /// config, but the next edit is made where it leads now: the watch follows it there.
    #[test]
    fn an_included_link_led_elsewhere_is_followed_there() {
        use crate::config::tests::Included;
        let dir = tempfile::tempdir().unwrap();
        let [conf_d, first, second] = ["conf.d", "release-1", "release-2"].map(|d| {
            let d = dir.path().join(d);
            std::fs::create_dir(&d).unwrap();
            d
        });
        for release in [&first, &second] {
            std::fs::write(release.join("web.toml"), "[programs.web]\n").unwrap();
        }
        let (src, loaded) = linked_include(dir.path(), &first.join("web.toml"));
        let main = src.path.clone().unwrap();
        let (mut state, _config, status) = unwatched(src, loaded);
        let (tx, _rx) = mpsc::channel(64);
        state.watcher = ConfigWatcher::start(&main, tx);
        let good = state.good.clone();
        state.follow(good.as_ref());
        let watched = |state: &State<Included>| state.watcher.as_ref().unwrap().watched_dirs();
        assert!(watched(&state).contains(&first));

        let relinked = conf_d.join(".web.toml.new");
        std::os::unix::fs::symlink(second.join("web.toml"), &relinked).unwrap();
        std::fs::rename(&relinked, conf_d.join("web.toml")).unwrap();
        state.attempt(Cause::File);
        assert_eq!(status.borrow().reloads, 0, "the same bytes: no reload");
        let now = watched(&state);
        assert!(now.contains(&second) && !now.contains(&first), "{now:?}");
    }

    /// `links_to` names each link where the kernel meets it: those the path names as it names them, then
    /// those their targets lead through, a `..` after a link taken from where the link leads.
    #[test]
    fn the_links_on_the_way_are_named_where_they_are_met() {
        let tmp = tempfile::tempdir().unwrap();
        // Free of links itself, so the links found are the test's.
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir_all(root.join("releases/2")).unwrap();
        std::fs::create_dir_all(root.join("shared/conf")).unwrap();
        let link = |target: &Path, at: &str| std::os::unix::fs::symlink(target, root.join(at)).unwrap();
        link(Path::new("releases/2"), "current");
        link(Path::new("2"), "releases/1");
        link(&root.join("shared/conf"), "releases/2/conf");
        link(Path::new("loop-b"), "loop-a");
        link(Path::new("loop-a"), "loop-b");

        assert_eq!(links_to(&root.join("shared/conf")), Vec::<PathBuf>::new());
        assert_eq!(
            links_to(&root.join("current/conf")),
            [root.join("current"), root.join("releases/2/conf")]
        );
        // `current/..` is `releases`, where `1` is a link (`root/1`, taken by name, is nothing).
        assert_eq!(
            links_to(&root.join("current/../1")),
            [root.join("current"), root.join("releases/1")]
        );
        // A link to a release not made yet is on the way all the same.
        link(Path::new("releases/3"), "next");
        assert_eq!(links_to(&root.join("next")), [root.join("next")]);
        // A file that is a link is walked as a part: it is named, then the links its text leads through,
        // relative to its directory (`current`, which resolving the link whole would leave unnamed).
        std::fs::create_dir(root.join("etc")).unwrap();
        link(Path::new("../current/x.toml"), "etc/x.toml");
        assert_eq!(
            links_to(&root.join("etc/x.toml")),
            [root.join("etc/x.toml"), root.join("current")]
        );
        // Links leading into each other end, each named once.
        assert_eq!(
            links_to(&root.join("loop-a/conf")),
            [root.join("loop-a"), root.join("loop-b")]
        );
    }

    /// The inodes of what this process's inotify instances watch (`/proc/self/fdinfo`): whether a watch was
    /// removed, which no event tells. A directory there now is the test's own, whichever other test shares
    /// the process, and a removed one's watches went with it.
    fn watched_inodes() -> BTreeSet<u64> {
        let mut inodes = BTreeSet::new();
        for fd in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let lines = info.lines().filter(|l| l.starts_with("inotify wd:"));
            let inos = lines.filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("ino:")));
            inodes.extend(inos.filter_map(|ino| u64::from_str_radix(ino, 16).ok()));
        }
        inodes
    }

    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    /// `dir/releases/1/x.toml` and `dir/releases/2/x.toml` holding `grace_ms` 1 and 2, and `dir/current`
    /// leading to the first: a Capistrano deploy's layout. The main file, as named through the link.
    fn releases(dir: &Path) -> PathBuf {
        for n in [1, 2] {
            let release = dir.join(format!("releases/{n}"));
            std::fs::create_dir_all(&release).unwrap();
            std::fs::write(release.join("x.toml"), grace(n)).unwrap();
        }
        std::os::unix::fs::symlink("releases/1", dir.join("current")).unwrap();
        dir.join("current/x.toml")
    }

    /// A [`crate::config::tests::Kept`] config of this `grace_ms`.
    fn grace(ms: u64) -> String {
        format!("grace_ms = {ms}\n[inner]\ntimeout_ms = 10\n")
    }

    /// Waits up to 10 s for a config of `grace_ms` `ms` to be published, after `what`.
    async fn loads(config: &mut watch::Receiver<Arc<crate::config::tests::Kept>>, ms: u64, what: &str) {
        let next = tokio::time::timeout(Duration::from_secs(10), config.wait_for(|c| c.grace_ms == ms));
        assert!(matches!(next.await, Ok(Ok(_))), "{what} was not loaded");
    }

    /// Leads `dir/current` to `release` as a deploy does: a new link renamed over it.
    fn swap_current(dir: &Path, release: &str) {
        std::os::unix::fs::symlink(release, dir.join("current.tmp")).unwrap();
        std::fs::rename(dir.join("current.tmp"), dir.join("current")).unwrap();
    }

    /// A main file named through a directory link that a deploy swaps (`current -> releases/1`, then
    /// `releases/2`) is in another directory after the swap, and the only event is the link's, in its own
    /// directory: it is watched, the swap loads the new release, and the watch of the main file's directory
    /// moves to it. Before, nothing saw the swap, and the new release's config waited for a SIGHUP.
    #[tokio::test]
    async fn a_swapped_directory_link_loads_the_new_release_and_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let main = releases(dir.path());
        a_swap_loads_the_new_release(dir.path(), &main).await;
    }

    /// Runs the reload loop on `main` (in `dir`'s deploy layout, [`releases`]) and checks that an edit of the
    /// first release loads, then the swap of `current` to the second, then an edit of the second.
    async fn a_swap_loads_the_new_release(dir: &Path, main: &Path) {
        use crate::config::tests::Kept;
        let main = main.to_path_buf();
        let (src, loaded) = loaded_from::<Kept>(&main);
        let (publish, mut config) = watch::channel(Arc::new(loaded.config));
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let seed = (loaded.raw, loaded.sources);
        let _reloader = spawn::<Kept>(src, seed, publish, mpsc::channel(8), cancel, Notifier::disabled());
        assert_eq!(config.borrow().grace_ms, 1);
        // An edit seen first: the attempt queued at start is spent by then, and cannot be the one that
        // reads the new release.
        std::fs::write(dir.join("releases/1/x.toml"), grace(3)).unwrap();
        loads(&mut config, 3, "the edit of the first release").await;

        swap_current(dir, "releases/2");
        loads(&mut config, 2, "the new release").await;
        std::fs::write(dir.join("releases/2/x.toml"), grace(4)).unwrap();
        loads(&mut config, 4, "the edit of the new release").await;
    }

    /// A main file that is itself a link into such a path (`etc/x.toml -> ../current/x.toml`): the link is
    /// resolved whole to `releases/1/x.toml`, whose way names no `current`, so the links on the way its text
    /// says are watched too. Before, the swap made an event in a directory nobody watched.
    #[tokio::test]
    async fn a_main_file_linked_through_a_swapped_directory_link_loads_the_new_release() {
        let dir = tempfile::tempdir().unwrap();
        releases(dir.path());
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let main = dir.path().join("etc/x.toml");
        std::os::unix::fs::symlink("../current/x.toml", &main).unwrap();
        a_swap_loads_the_new_release(dir.path(), &main).await;
    }

    /// A referenced file that is a link into a deploy's layout (a key file, `etc/x.key -> ../current/x.key`)
    /// has the links on its way watched as the main file's are: a swap of `current` counts.
    #[test]
    fn a_linked_referenced_file_has_the_links_on_its_way_watched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        releases(&root);
        std::fs::create_dir(root.join("etc")).unwrap();
        let main = root.join("etc/x.toml");
        std::fs::write(&main, "").unwrap();
        let key = root.join("etc/x.key");
        std::os::unix::fs::symlink("../current/x.toml", &key).unwrap();
        let (tx, _rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        watcher.follow(&[], std::slice::from_ref(&key));
        assert!(
            watcher.watched_dirs().contains(&root),
            "{:?}",
            watcher.watched_dirs()
        );
        let relevant = watcher.relevant.load();
        assert!(relevant.covers(&root.join("current")), "{:?}", relevant.dir_links);
        assert!(!relevant.covers(&root.join("current.tmp")));
    }

    /// A directory that was not there, made later and watched by `retry_missing`, may be one watched
    /// under two names (a pattern's, and a link to it another pattern names): notify names its events by
    /// one of them, and those of the other name's pattern count only once the names are grouped anew.
    #[test]
    fn a_directory_made_under_two_names_counts_under_either() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let main = root.join("x.toml");
        std::fs::write(&main, "").unwrap();
        let [real, alias] = ["real", "alias"].map(|d| root.join(d));
        std::os::unix::fs::symlink("real", &alias).unwrap();
        let (tx, _rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        let patterns = [
            pattern(alias.to_str().unwrap(), "*.toml"),
            pattern(real.to_str().unwrap(), "*.key"),
        ];
        watcher.follow(&patterns, &[]);
        assert_eq!(watcher.warned, BTreeSet::from([alias.clone(), real.clone()]));

        std::fs::create_dir(&real).unwrap();
        assert!(watcher.retry_missing());
        assert!(watcher.warned.is_empty(), "{:?}", watcher.warned);
        let relevant = watcher.relevant.load();
        assert_eq!(relevant.same_dirs, [vec![alias.clone(), real.clone()]]);
        // `alias`'s pattern, an event named under either name.
        for dir in [&alias, &real] {
            assert!(relevant.covers(&dir.join("web.toml")), "{}", dir.display());
        }
    }

    /// After a swap of a directory link on the main file's way, its directory's watch is on the new
    /// release and no longer on the old one: watched again by name, the old one's stayed, its events came
    /// named as the new one's, and its removal unwatched the new one in notify. A directory watched under
    /// two names (the release named by the config too) has its events count under either.
    #[tokio::test]
    async fn the_watch_leaves_the_release_a_link_no_longer_leads_to() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(tmp.path()).unwrap();
        let main = releases(&dir);
        let [first, second] = ["releases/1", "releases/2"].map(|r| dir.join(r));
        let (tx, mut rx) = mpsc::channel(64);
        let mut watcher = ConfigWatcher::start(&main, tx).unwrap();
        watcher.follow(&[], &[]);
        assert_eq!(
            watcher.watched_dirs(),
            BTreeSet::from([dir.clone(), dir.join("current")])
        );
        assert!(watched_inodes().contains(&inode(&first)));

        swap_current(&dir, "releases/2");
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(seen.ok().flatten(), Some(Cause::File), "no event for the swap");
        watcher.follow(&[], &[]);
        let inodes = watched_inodes();
        assert!(inodes.contains(&inode(&second)), "the new release is not watched");
        assert!(
            !inodes.contains(&inode(&first)),
            "the old release is watched still"
        );

        // The new release named by the config too (a pattern in it), watched after `current`: notify names
        // its events by that name from then on.
        watcher.follow(&[pattern(second.to_str().unwrap(), "*.key")], &[]);
        while rx.try_recv().is_ok() {}
        std::fs::write(second.join("x.toml"), grace(5)).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            seen.ok().flatten(),
            Some(Cause::File),
            "no event for the main file named by the release's name"
        );
    }
}
