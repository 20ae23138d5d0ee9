//! What a config file's load read: the main file, the `include` patterns it names and the files they
//! matched. The reloader keeps it to tell an edit from a touch (an editor saving unchanged bytes is no new
//! reload, an edit to an included file is) and to know which directories to watch.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use super::include::{self, IncludePattern};
use super::{ConfigError, RoleConfig, parse_table, read_bounded};

/// The patterns and a fingerprint of everything a load read. Two are equal when the same bytes were read from
/// the same files.
///
/// A fingerprint, not the bytes: a config may include hundreds of files of up to a megabyte, and the
/// reloader keeps two of these (the content in force and the last one rejected). A 64-bit collision between
/// an edit and the content judged before would only make the watcher skip that edit; SIGHUP and `ctl` load
/// whatever the files hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    patterns: Vec<IncludePattern>,
    fingerprint: u64,
    /// The main file held nothing but white space ([`blank`]).
    blank: bool,
    /// The included files read, and whether each was [`blank`].
    files: std::collections::BTreeMap<PathBuf, bool>,
    /// The files the config names that its validation read (key and token files: [`super::referenced`]),
    /// with what each held.
    referenced: std::collections::BTreeMap<PathBuf, Option<super::referenced::Held>>,
}

/// Whether a main file's bytes are nothing but white space: a file being rewritten in place (a `>`
/// truncates it first), never a config a reload takes.
pub(crate) fn blank(main: &[u8]) -> bool {
    main.iter().all(u8::is_ascii_whitespace)
}

impl Sources {
    /// What a load of `main` (the main file's bytes) read before its includes.
    pub fn new(main: &[u8]) -> Self {
        Self {
            patterns: Vec::new(),
            fingerprint: hash(&(0u64, main)),
            blank: blank(main),
            files: Default::default(),
            referenced: Default::default(),
        }
    }

    /// Whether a file is being rewritten in place (a `>` truncates it first), judged against `before` (the
    /// files last read): the main file blank, or an included file or a file the config names (a key or token
    /// file) blank now that held something then. An
    /// emptied included file was taken as a file of no entries, and the monitor stopped the programs it had
    /// defined until the rest was written. One empty before (a placeholder) or new is no rewrite: judged
    /// blank, it held back every reload for as long as it stayed empty.
    pub fn being_rewritten(&self, before: Option<&Sources>) -> bool {
        self.blank
            || (self.files.iter())
                .any(|(path, blank)| *blank && before.is_some_and(|b| b.files.get(path) == Some(&false)))
            // A key or token file too: emptied, the monitor took an empty token and refused every call.
            || (self.referenced.iter()).any(|(path, now)| {
                let then = before.and_then(|b| b.referenced.get(path));
                matches!(now, Some((_, true))) && matches!(then, Some(Some((_, false))))
            })
    }

    /// The include patterns the main file names (those that parsed), in its order.
    pub fn patterns(&self) -> &[IncludePattern] {
        &self.patterns
    }

    /// An include pattern and what it expanded to: files listed, or why not (a directory not there yet,
    /// which becoming an empty one changes the config from rejected to good).
    pub(crate) fn pattern(&mut self, pattern: &IncludePattern, found: Result<&[PathBuf], &str>) {
        self.fingerprint = hash(&(self.fingerprint, &pattern.dir, &pattern.name, found));
        self.patterns.push(pattern.clone());
    }

    /// The files the config names that a load's validation read, with what each held.
    pub(crate) fn referenced(&mut self, files: Vec<super::referenced::Read>) {
        self.referenced.extend(files);
    }

    /// These sources with the files at `paths` (what the config named at the last load) as they are now:
    /// equal to that load's own when none of them, nor the config's files, changed since.
    pub fn with_referenced(mut self, paths: &[PathBuf]) -> Self {
        let now = paths.iter().map(|p| (p.clone(), super::referenced::now(p)));
        self.referenced = now.collect();
        self
    }

    /// The files the config names that its load read (absolute), whose directories the watcher watches.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        self.referenced.keys().cloned().collect()
    }

    /// The included files read (absolute).
    pub fn included_files(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(PathBuf::as_path)
    }

    /// An included file read, with its bytes (`None`: it could not be read).
    pub(crate) fn file(&mut self, path: &Path, bytes: Option<&[u8]>) {
        self.fingerprint = hash(&(self.fingerprint, path, bytes));
        self.files.insert(path.to_path_buf(), bytes.is_some_and(blank));
    }
}

/// DefaultHasher's keys are fixed, so the same input hashes alike across calls of one process, all a
/// fingerprint compared in memory needs.
fn hash(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// The including file as [`include::apply`] takes it: absolute, so a bare `monitor.toml` has a directory for
/// its patterns, and the patterns' directories compare with the watcher's event paths, which are absolute;
/// none for bytes with no file (`load_bytes`).
pub(crate) fn include_base(path: Option<&Path>) -> Option<PathBuf> {
    path.filter(|p| *p != Path::new("<bytes>")).map(super::absolute)
}

/// Reads what a load of the file at `path` would read, without validating it: the same as the [`Sources`] of
/// [`super::load`] for the same files, for content a load rejected or has not read yet. A main file that is
/// not TOML includes nothing. Errs only when the main file cannot be read.
pub fn read_sources<C: RoleConfig>(path: &Path) -> Result<Sources, ConfigError> {
    let bytes = read_bounded(path)?;
    let mut sources = Sources::new(&bytes);
    if C::INCLUDE_SECTIONS.is_empty() {
        return Ok(sources);
    }
    let Ok(mut table) = parse_table(&bytes, &path.display().to_string()) else {
        return Ok(sources);
    };
    let base = include_base(Some(path));
    include::apply(
        &mut table,
        base.as_deref(),
        C::INCLUDE_SECTIONS,
        &mut Vec::new(),
        &mut sources,
    );
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::{ConfigSource, load};

    use crate::config::tests::Included as Cfg;

    fn loaded(path: &Path) -> Sources {
        let mut source = ConfigSource::file(path);
        source.use_env = false;
        load::<Cfg>(&source).unwrap().sources.unwrap()
    }

    fn read(path: &Path) -> Sources {
        read_sources::<Cfg>(path).unwrap()
    }

    /// An included file emptied (a `>` rewriting it) is being rewritten, as an emptied main file is, so the
    /// watcher waits for the rest: taken, the programs it defined were stopped until it was written. One
    /// empty all along is not, or it held back every reload.
    #[test]
    fn an_emptied_included_file_is_being_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf.d");
        fs::create_dir(&conf_d).unwrap();
        let main = dir.path().join("main.toml");
        fs::write(&main, "include = [\"conf.d/*.toml\"]\n[programs.main]\n").unwrap();
        fs::write(conf_d.join("web.toml"), "[programs.web]\n").unwrap();
        let full = read(&main);
        assert!(!full.being_rewritten(None));
        fs::write(conf_d.join("web.toml"), " \n").unwrap();
        let emptied = read(&main);
        assert!(emptied.being_rewritten(Some(&full)));
        // Empty before too (a placeholder), or new and empty: no rewrite, or it held back every reload.
        assert!(!emptied.being_rewritten(Some(&emptied)));
        fs::write(conf_d.join("new.toml"), "").unwrap();
        assert!(!read(&main).being_rewritten(Some(&emptied)));
        // Removed, it is no file being written: what the config names changed.
        fs::remove_file(conf_d.join("web.toml")).unwrap();
        assert!(!read(&main).being_rewritten(Some(&full)));
    }

    #[test]
    fn an_included_file_changed_added_or_removed_is_a_change_and_a_rewrite_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("conf.d");
        fs::create_dir(&conf_d).unwrap();
        let main = dir.path().join("main.toml");
        let main_text = "include = [\"conf.d/*.toml\"]\n[programs.main]\n";
        fs::write(&main, main_text).unwrap();
        fs::write(conf_d.join("web.toml"), "[programs.web]\n").unwrap();
        let first = loaded(&main);
        // The reader and the load agree on the same files.
        assert_eq!(read(&main), first);
        let want = IncludePattern {
            dir: conf_d.clone(),
            name: "*.toml".into(),
        };
        assert_eq!(first.patterns(), [want]);
        // Saved unchanged, and files the pattern does not match: no change.
        fs::write(&main, main_text).unwrap();
        fs::write(conf_d.join("web.toml"), "[programs.web]\n").unwrap();
        fs::write(conf_d.join(".web.toml.swp"), "x").unwrap();
        fs::write(conf_d.join("notes.txt"), "x").unwrap();
        assert_eq!(read(&main), first);

        fs::write(conf_d.join("web.toml"), "[programs.web]\nx = 1\n").unwrap();
        let edited = read(&main);
        assert_ne!(edited, first);
        assert_eq!(loaded(&main), edited);
        // Undone: the same as before again.
        fs::write(conf_d.join("web.toml"), "[programs.web]\n").unwrap();
        assert_eq!(read(&main), first);

        fs::write(conf_d.join("api.toml"), "[programs.api]\n").unwrap();
        assert_ne!(read(&main), first);
        fs::remove_file(conf_d.join("api.toml")).unwrap();
        assert_eq!(read(&main), first);
        fs::remove_file(conf_d.join("web.toml")).unwrap();
        let empty = read(&main);
        assert_ne!(empty, first);
        // A directory gone is not an empty one: making it turns a rejected config into a good one.
        fs::remove_dir_all(&conf_d).unwrap();
        let gone = read(&main);
        assert_ne!(gone, empty);
        assert_eq!(gone.patterns(), empty.patterns());
        fs::create_dir(&conf_d).unwrap();
        assert_eq!(read(&main), empty);
    }

    #[test]
    fn a_main_file_that_is_not_toml_includes_nothing_and_one_unread_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("main.toml");
        fs::write(&main, "include = [\"conf.d/*.toml\"]\n[programs.main\n").unwrap();
        let broken = read(&main);
        assert_eq!(broken.patterns(), []);
        assert_eq!(broken, Sources::new(&fs::read(&main).unwrap()));
        assert!(read_sources::<Cfg>(&dir.path().join("missing.toml")).is_err());
    }
}
