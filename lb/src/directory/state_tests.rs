#![allow(clippy::unwrap_used)]
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const NOW: u64 = 1_700_000_000_000;

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xcluster-lb-state-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self) -> PathBuf {
        self.0.join("lb.state.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sample() -> RuntimeState {
    RuntimeState {
        changed_unix_ms: NOW - 5,
        drained: ["h1/a".to_string(), "127.0.0.1:8001".into(), "[::1]:8002".into()].into(),
        weights: [
            ("h1/b".to_string(), WeightSet::Percent(25)),
            ("127.0.0.1:8003".into(), WeightSet::Absolute(7)),
            ("h1/c".into(), WeightSet::Percent(0)),
        ]
        .into(),
    }
}

#[test]
fn round_trip_through_the_file() {
    let dir = TempDir::new();
    let path = dir.file();
    assert!(matches!(load(&path, NOW), Loaded::Missing));
    let file = StateFile::new(path.clone());
    file.save(sample).unwrap();
    let Loaded::Read { state, skipped } = load(&path, NOW) else {
        panic!("not read");
    };
    assert_eq!(state, sample());
    assert!(skipped.is_empty(), "{skipped:?}");
    // Versioned and readable by people.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"version\": 1"), "{text}");
    assert!(text.contains("\"h1/b\": \"25%\""), "{text}");
    assert!(!tmp_path(&path).exists(), "the temp file is renamed, not left");
    // An empty state round-trips too (the file after everything was undrained).
    file.save(RuntimeState::default).unwrap();
    assert!(matches!(load(&path, NOW), Loaded::Read { state, .. } if state.is_empty()));
}

#[test]
fn a_corrupt_file_is_refused_and_set_aside() {
    for (bytes, why) in [
        (
            &b"{\"version\": 1, \"drained\": [\"h1/a\""[..],
            "not a state file",
        ),
        (b"\x00\xffgarbage", "not a state file"),
        (b"", "not a state file"),
        (b"[1, 2]", "not a state file"),
        (
            b"{\"version\": 2, \"drained\": []}",
            "version 2, this balancer reads version 1",
        ),
        (b"{\"drained\": [\"h1/a\"]}", "no \"version\""),
        (b"{\"version\": 1, \"drained\": {}}", "not a state file"),
    ] {
        let dir = TempDir::new();
        let path = dir.file();
        std::fs::write(&path, bytes).unwrap();
        match load(&path, NOW) {
            Loaded::Refused { why: got, set_aside } => {
                assert!(got.contains(why), "{got:?} for {bytes:?}");
                assert_eq!(set_aside.unwrap(), bad_path(&path));
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
        assert!(!path.exists(), "set aside, so the next write starts anew");
        assert_eq!(
            std::fs::read(bad_path(&path)).unwrap(),
            bytes,
            "kept for a person to read"
        );
        // The logged form starts without state, says it was lost, and does not panic; a second start
        // finds no file, so nothing lost.
        std::fs::write(&path, bytes).unwrap();
        let first = load_logged(&path, NOW);
        assert_eq!((first.state, first.lost), (None, true));
        let second = load_logged(&path, NOW);
        assert_eq!((second.state, second.lost), (None, false));
    }
}

#[test]
fn an_oversized_file_is_refused() {
    let dir = TempDir::new();
    let path = dir.file();
    // Valid JSON, so it is the size that refuses it: a space-padded object.
    let mut big = b"{\"version\": 1, \"drained\": [\"h1/a\"]".to_vec();
    big.resize(MAX_BYTES as usize + 1, b' ');
    big.push(b'}');
    std::fs::write(&path, &big).unwrap();
    match load(&path, NOW) {
        Loaded::Refused { why, set_aside } => {
            assert!(why.contains("larger than"), "{why}");
            assert!(set_aside.is_ok());
        }
        other => panic!("{other:?}"),
    }
    // Just under the bound it is read.
    big.truncate(MAX_BYTES as usize - 1);
    big.push(b'}');
    std::fs::write(&path, &big).unwrap();
    assert!(matches!(load(&path, NOW), Loaded::Read { .. }));
}

#[test]
fn invalid_entries_are_skipped_and_the_rest_applied() {
    let text = r#"{
        "version": 1,
        "changed_unix_ms": 1000,
        "future_field": {"ignored": true},
        "drained": ["h1/a", "a<b>", "", 7, "[::1]:8001", null],
        "weights": {"h1/b": "25%", "h1/c": "1001%", "h1/d": 5, "h1/e": "100%", "x y": "10%", "127.0.0.1:8001": "7"}
    }"#;
    let (state, skipped) = parse(text.as_bytes(), NOW).unwrap();
    assert_eq!(state.drained, ["h1/a".to_string(), "[::1]:8001".into()].into());
    assert_eq!(
        state.weights,
        [
            ("h1/b".to_string(), WeightSet::Percent(25)),
            ("127.0.0.1:8001".into(), WeightSet::Absolute(7)),
        ]
        .into(),
        "100% is no entry; bad ones are skipped"
    );
    assert_eq!(state.changed_unix_ms, 1000);
    let all = skipped.join("\n");
    for named in [
        "drained[1]",
        "drained[2]",
        "drained[3]",
        "drained[5]",
        "weights[h1/c]",
        "weights[h1/d]",
        "weights[x y]",
    ] {
        assert!(all.contains(named), "{named} not in {all}");
    }
    assert_eq!(skipped.len(), 7, "{all}");
    // A change time that is no number is skipped alone; one in the future is taken as now.
    let (state, skipped) = parse(
        br#"{"version": 1, "changed_unix_ms": "soon", "drained": ["h1/a"]}"#,
        NOW,
    )
    .unwrap();
    assert_eq!(
        (state.changed_unix_ms, state.drained.len(), skipped.len()),
        (0, 1, 1)
    );
    let (state, _) = parse(
        format!(r#"{{"version": 1, "changed_unix_ms": {}}}"#, NOW * 2).as_bytes(),
        NOW,
    )
    .unwrap();
    assert_eq!(state.changed_unix_ms, NOW);
}

#[test]
fn entries_are_bounded() {
    let drained: Vec<String> = (0..MAX_DRAINED + 3).map(|i| format!("h/i{i}")).collect();
    let text = serde_json::json!({"version": 1, "drained": drained}).to_string();
    let (state, skipped) = parse(text.as_bytes(), NOW).unwrap();
    assert_eq!((state.drained.len(), skipped.len()), (MAX_DRAINED, 3));
}

#[test]
fn a_write_replaces_the_file_whole_or_not_at_all() {
    let dir = TempDir::new();
    let path = dir.file();
    let file = StateFile::new(path.clone());
    file.save(sample).unwrap();
    let before = std::fs::metadata(&path).unwrap().ino();
    // A crash mid-write left a temp file: it is never read, and the next write takes its place.
    std::fs::write(tmp_path(&path), b"half a wri").unwrap();
    assert!(matches!(load(&path, NOW), Loaded::Read { state, .. } if state == sample()));
    let mut next = sample();
    next.drained.insert("h1/z".into());
    file.save(|| next.clone()).unwrap();
    // Replaced by a rename (a new inode), never rewritten in place, where a crash could leave half.
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), before);
    assert!(matches!(load(&path, NOW), Loaded::Read { state, .. } if state == next));
    assert!(!tmp_path(&path).exists());
    // A write that fails (its temp file cannot be created) leaves the old file as it was.
    std::fs::create_dir(tmp_path(&path)).unwrap();
    let err = file.save(RuntimeState::default).unwrap_err().to_string();
    assert!(err.contains("cannot create") && err.contains(".tmp"), "{err}");
    assert!(matches!(load(&path, NOW), Loaded::Read { state, .. } if state == next));
}

#[test]
fn an_unreadable_file_is_left_where_it_is() {
    let dir = TempDir::new();
    let path = dir.file();
    // A directory where the file should be: it cannot be read, and is not someone's bad file to move.
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(load(&path, NOW), Loaded::Unreadable(_)));
    assert!(path.is_dir());
    let restored = load_logged(&path, NOW);
    assert_eq!(
        (restored.state, restored.lost, restored.unreadable),
        (None, true, true),
        "unreadable: the balancer does not keep its state in it, so never writes over it"
    );
}

#[test]
fn a_linked_state_file_is_written_through_its_link() {
    let dir = TempDir::new();
    let store = dir.0.join("store");
    std::fs::create_dir(&store).unwrap();
    // lb.state.json -> via.json -> store/real.json, the first link relative, the second absolute.
    let real = store.join("real.json");
    let via = dir.0.join("via.json");
    std::os::unix::fs::symlink(&real, &via).unwrap();
    std::os::unix::fs::symlink("via.json", dir.file()).unwrap();
    // The target does not exist yet: the link names the file to create.
    assert_eq!(resolve(&dir.file()), real);
    StateFile::new(resolve(&dir.file())).save(sample).unwrap();
    assert!(
        dir.file().is_symlink() && via.is_symlink(),
        "the links stay links"
    );
    let Loaded::Read { state, .. } = load(&dir.file(), NOW) else {
        panic!("not read through the link");
    };
    assert_eq!(state, sample());
    assert!(
        tmp_path(&real).parent() == Some(store.as_path()),
        "the temp file beside the target"
    );
    // A plain file and a missing one are themselves; a loop is left as it is (its use fails with ELOOP).
    assert_eq!(resolve(&real), real);
    assert_eq!(resolve(&dir.0.join("none.json")), dir.0.join("none.json"));
    let (a, b) = (dir.0.join("a"), dir.0.join("b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    assert_eq!(resolve(&a), a);
}
