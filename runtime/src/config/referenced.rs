//! Files a config names whose content is part of it: a key file, a token file. A role's `validate` reads them
//! with [`read`], which notes each for the load in progress, so the load's [`super::Sources`] hold their
//! content too: the watcher watches their directories, and a change to one alone (a rotated key) is a change
//! to the config, applied as an edit of the main file is. Before, only SIGHUP applied it.
//!
//! A thread-local note, not an argument: `RoleConfig::validate` takes the raw config alone, and a load runs
//! it synchronously on the calling thread ([`during`]).

use std::cell::RefCell;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use super::{ConfigError, read_bounded};

/// A file read and what it held (`None`: it could not be read).
pub(crate) type Read = (PathBuf, Option<Held>);

/// A fingerprint of a file's bytes, and whether they were only white space (a file being rewritten in place:
/// `echo new > token` truncates it first).
pub(crate) type Held = (u64, bool);

thread_local! {
    static NOTED: RefCell<Option<Vec<Read>>> = const { RefCell::new(None) };
}

/// Reads the file at `path` that a config names (bounded as a config file is), noting it for the load in
/// progress, if any.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = read_bounded(path);
    NOTED.with(|n| {
        if let Some(noted) = n.borrow_mut().as_mut() {
            // Absolute, as the watcher's event paths are.
            noted.push((super::absolute(path), bytes.as_deref().ok().map(held)));
        }
    });
    bytes
}

/// Runs `f` (a role's `validate`), returning what it gave and the files it read with [`read`].
pub(crate) fn during<T>(f: impl FnOnce() -> T) -> (T, Vec<Read>) {
    /// Puts the outer load's notes (none, mostly) back when dropped, also when `f` panics.
    struct Restore(Option<Vec<Read>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let outer = self.0.take();
            NOTED.with(|n| *n.borrow_mut() = outer);
        }
    }
    let _restore = Restore(NOTED.with(|n| n.borrow_mut().replace(Vec::new())));
    let out = f();
    let noted = NOTED.with(|n| n.borrow_mut().take()).unwrap_or_default();
    (out, noted)
}

/// What the file at `path` holds now, as [`read`] notes it.
pub(crate) fn now(path: &Path) -> Option<Held> {
    read_bounded(path).ok().as_deref().map(held)
}

fn held(bytes: &[u8]) -> Held {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    (h.finish(), super::sources::blank(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_noted_only_during_a_load_and_with_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k1").unwrap();
        // Outside a load: read, noted nowhere.
        assert_eq!(read(&key).unwrap(), b"k1");
        let missing = dir.path().join("missing");
        let ((), noted) = during(|| {
            read(&key).unwrap();
            assert!(read(&missing).is_err());
        });
        assert_eq!(noted, vec![(key.clone(), now(&key)), (missing.clone(), None)]);
        assert!(now(&key).is_some());
        std::fs::write(&key, "k2").unwrap();
        assert_ne!(noted[0].1, now(&key));
        // A load's notes end with it.
        let ((), later) = during(|| {});
        assert!(later.is_empty());
        // A validation that panics leaves the load around it its own notes.
        let ((), outer) = during(|| {
            read(&key).unwrap();
            let inner = std::panic::catch_unwind(|| during(|| read(&missing).map(drop)));
            assert!(inner.is_ok());
            let panicked = std::panic::catch_unwind(|| {
                during(|| {
                    let _ = read(&missing);
                    panic!("a validate that panics");
                })
            });
            assert!(panicked.is_err());
        });
        assert_eq!(outer, vec![(key.clone(), now(&key))]);
    }
}
