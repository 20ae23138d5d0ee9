use super::*;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Inner {
    timeout_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Item {
    name: String,
    timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Raw {
    listen: String,
    grace_ms: u64,
    inner: Inner,
    items: Vec<Item>,
}

impl Default for Raw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:1".into(),
            grace_ms: 5,
            inner: Inner::default(),
            items: Vec::new(),
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
        // What a role checks of a parsed address, which an unparsable one fails too (its placeholder).
        v.check(listen.port() != 0, "listen", || "must name a port".into());
        for (i, item) in raw.items.iter().enumerate() {
            v.range(&format!("items[{i}].timeout_ms"), item.timeout_ms, 0, 1000);
        }
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
    // One issue per key: not also what the placeholder of the bad value fails.
    assert_eq!(
        issues.iter().filter(|i| i.starts_with("listen:")).count(),
        1,
        "{issues:#?}"
    );
}

#[test]
fn an_array_items_problem_is_named_as_the_config_writes_it() {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Listed {
        items: Vec<Inner>,
    }
    // Only the bad key goes: the list, and whatever refers to it, is still checked.
    let first = |t: toml::Table| {
        let mut issues = Vec::new();
        let kept = deserialize_collecting::<Listed>(t.clone(), &mut issues).unwrap();
        assert_eq!(kept.items.len(), t["items"].as_array().unwrap().len());
        issues[0].to_string()
    };
    // An item that is no table takes its list with it (what is left is not read on with shifted indexes).
    let mut issues = Vec::new();
    let t = toml::toml! { items = [5, { timeout_ms = 1 }, { timeout_ms = -1 }] };
    assert!(deserialize_collecting::<Listed>(t, &mut issues).is_none());
    let said: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert!(said.len() == 2 && said[0].starts_with("items[0]: "), "{said:?}");
    let bad = first(toml::toml! { items = [{ timeout_ms = 1 }, { timeout_ms = -1 }] });
    assert!(bad.starts_with("items[1].timeout_ms: "), "{bad}");
    let unknown = first(toml::toml! { items = [{ tmeout_ms = 1 }] });
    assert!(unknown.starts_with("items[0].tmeout_ms: "), "{unknown}");
    // A host name is refused as such (the message said "host:port", which it is).
    let mut v = Validator::new();
    v.addr("addr", "localhost:80");
    let said = v.finish(()).unwrap_err()[0].to_string();
    assert!(said.contains("host names are not resolved"), "{said}");
    // An IPv6 address without its brackets is told how to write it.
    let mut v = Validator::new();
    v.addr("addr", "::1:7103");
    let said = v.finish(()).unwrap_err()[0].to_string();
    assert!(
        said.contains("an IPv6 address takes brackets: [::1]:7103"),
        "{said}"
    );
}

/// A validation issue names an item of an array by its label, as `--set` and the reload log do, and says
/// which override set it, whichever way the override named the item.
#[test]
fn an_issue_names_an_item_by_its_label_and_its_override() {
    let text = "[[items]]\nname = \"a\"\n[[items]]\nname = \"b\"\ntimeout_ms = 5000\n";
    let issues = load_str(text, &[]).unwrap_err().issues();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(issues[0].starts_with("items[b].timeout_ms: "), "{issues:?}");
    let issues = load_str(text, &["items[0].timeout_ms=9000"])
        .unwrap_err()
        .issues();
    assert!(
        issues[0].starts_with("items[a].timeout_ms: ")
            && issues[0].ends_with("(set by --set items[0].timeout_ms)"),
        "{issues:?}"
    );
    let root = toml::Value::Table(toml::toml! {
        [proxy]
        listeners = [{ name = "web", listen = "a:1" }, { name = "api", listen = "b:2" }]
        peers = ["x", "y"]
    });
    let labelled = |k: &str| keys::labelled(&root, k);
    assert_eq!(
        labelled("proxy.listeners[1].listen"),
        "proxy.listeners[api].listen"
    );
    // Named by another key that names an item, as `--set` takes it.
    assert_eq!(
        labelled("proxy.listeners[b:2].listen"),
        "proxy.listeners[api].listen"
    );
    assert_eq!(labelled("proxy.listeners[web]"), "proxy.listeners[web]");
    // What does not lead through the config comes back as it is.
    for k in [
        "proxy.listeners[7].listen",
        "--set proxy.x",
        "env XCLUSTER_LB__A",
        "peers[1]",
        "a..b",
        "",
    ] {
        assert_eq!(labelled(k), k);
    }
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

    // One address in two pools is named by index, not silently by its first entry; an IPv6 one keeps its
    // brackets; an item of a plain list is replaced by its index; a list is not a table.
    let mut t = toml::toml! {
        backends = [
            { addr = "127.0.0.1:8001", weight = 1 },
            { addr = "127.0.0.1:8001", weight = 2 },
            { addr = "[::1]:8002", weight = 3 },
        ]
        peers = ["127.0.0.1:1", "127.0.0.1:2"]
    };
    let err = set_path(&mut t, "backends[127.0.0.1:8001].weight", "9").unwrap_err();
    assert!(
        err.contains("\"127.0.0.1:8001\" names 2 items of backends (at 0, 1): name one by its index"),
        "{err}"
    );
    // By its turn, as the reload log names it, or by its index.
    set_path(&mut t, "backends[127.0.0.1:8001#2].weight", "8").unwrap();
    assert_eq!(t["backends"][1]["weight"].as_integer(), Some(8));
    set_path(&mut t, "backends[1].weight", "9").unwrap();
    set_path(&mut t, "backends[[::1]:8002].weight", "7").unwrap();
    set_path(&mut t, "peers[1]", "\"127.0.0.1:9\"").unwrap();
    let want = toml::toml! {
        backends = [
            { addr = "127.0.0.1:8001", weight = 1 },
            { addr = "127.0.0.1:8001", weight = 9 },
            { addr = "[::1]:8002", weight = 7 },
        ]
        peers = ["127.0.0.1:1", "127.0.0.1:9"]
    };
    assert_eq!(t, want);
    for (key, says) in [
        (
            "backends.weight",
            "backends is a list: name an item as `--set 'backends[NAME].KEY=VALUE'`",
        ),
        ("peers", "peers is a list"),
        ("peers[5]", "no item \"5\" in peers"),
        ("backends[[::1]:8002", "invalid key"),
        ("backends[[::1]:8002]x", "invalid key"),
        ("backends[a[b].weight", "invalid key"),
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
    assert_quoted_cut(&load_str(&long, &[]).unwrap_err().to_string());
}

/// Asserts that an error quotes what it names cut (`…`), not whole.
fn assert_quoted_cut(err: &str) {
    assert!(
        err.len() < 2_000 && err.contains('…'),
        "{} bytes: {}",
        err.len(),
        &err[..300.min(err.len())]
    );
}

/// A wrong value is quoted cut, as a bad line is: a 1 MB array given for a string, or for the role, was
/// quoted whole in each failed reload's log line and status.
#[test]
fn a_wrong_value_is_quoted_cut() {
    let huge = format!("[{}\"x\"]", "\"x\", ".repeat(100_000));
    for text in [format!("listen = {huge}\n"), format!("role = {huge}\n")] {
        assert_quoted_cut(&load_str(&text, &[]).unwrap_err().to_string());
    }
}

/// A key of text holds a key per line (the first signs); a key of random bytes is one key, newline bytes
/// and all: split, its short pieces would each have been a key to try.
#[test]
fn a_key_holds_a_key_per_line_unless_it_is_binary() {
    let text = HmacKey::inline(b" new-key \r\n\nold-key\n");
    assert_eq!(
        text.each().collect::<Vec<_>>(),
        [b"new-key".as_slice(), b"old-key"]
    );
    assert_eq!(text.signing(), b"new-key");
    let random = [0x9c, 0x01, b'\n', 0xfe, 0x7f, b'\n', 0x00, 0x42];
    let binary = HmacKey::inline(&random);
    assert_eq!(binary.each().collect::<Vec<_>>(), [random.as_slice()]);
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
    // One server in two pools: its entries go by their turn, the others keep their names.
    let k = toml::toml! {
        backends = [{ addr = "127.0.0.1:1", weight = 1 }, { addr = "127.0.0.1:2", weight = 1 }]
    };
    let l = toml::toml! {
        backends = [{ addr = "127.0.0.1:1", weight = 1 }, { addr = "127.0.0.1:2", weight = 1 },
            { addr = "127.0.0.1:1", weight = 5 }]
    };
    assert_eq!(
        diff(&k, &l, |_| {}),
        "backends[127.0.0.1:1#1] added, backends[127.0.0.1:1#2] added, backends[127.0.0.1:1] removed"
    );
    // Items without a name go by position.
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

/// A role with keys that need a restart: `listen`, and one key of a section. `grace_ms` reloads live but may
/// not exceed `inner.timeout_ms`, so a reload can be valid as written and not with the running values.
#[derive(Debug, PartialEq)]
pub(crate) struct Kept {
    pub(crate) listen: String,
    pub(crate) grace_ms: u64,
    pub(crate) timeout_ms: u64,
}

impl RoleConfig for Kept {
    const ROLE: &'static str = "test";
    type Raw = Raw;
    const RESTART_KEYS: &'static [&'static str] = &["listen", "inner.timeout_ms"];
    fn validate(raw: &Raw) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        v.check(raw.grace_ms <= raw.inner.timeout_ms, "grace_ms", || {
            format!(
                "{} exceeds inner.timeout_ms ({})",
                raw.grace_ms, raw.inner.timeout_ms
            )
        });
        v.finish(Kept {
            listen: raw.listen.clone(),
            grace_ms: raw.grace_ms,
            timeout_ms: raw.inner.timeout_ms,
        })
    }
}

/// A file source of `text` (written into `dir`), without the environment.
pub(crate) fn file_source(dir: &std::path::Path, text: &str) -> ConfigSource {
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    let mut src = ConfigSource::file(&path);
    src.use_env = false;
    src
}

#[test]
fn a_reload_keeps_the_restart_keys_at_their_running_values() {
    let dir = tempfile::tempdir().unwrap();
    let src = file_source(dir.path(), "listen = \"127.0.0.1:1\"\n[inner]\ntimeout_ms = 10\n");
    let running = load::<Kept>(&src).unwrap().raw;
    let src = file_source(
        dir.path(),
        "listen = \"127.0.0.1:2\"\ngrace_ms = 7\n[inner]\ntimeout_ms = 20\n",
    );
    let loaded = reload::<Kept>(&src, &running).unwrap();
    let want = Kept {
        listen: "127.0.0.1:1".into(),
        grace_ms: 7,
        timeout_ms: 10,
    };
    assert_eq!(
        loaded.config, want,
        "the live key applies, the others keep their running values"
    );
    // What the files say, for the reload's diff and the warning naming the keys kept.
    assert_eq!(
        (loaded.raw.listen.as_str(), loaded.raw.inner.timeout_ms),
        ("127.0.0.1:2", 20)
    );

    // A key the file no longer sets is kept too, not taken back to its default.
    let src = file_source(dir.path(), "grace_ms = 0\n");
    assert_eq!(
        reload::<Kept>(&src, &running).unwrap().config,
        Kept { grace_ms: 0, ..want }
    );
    // A running value the file never set: the default stays.
    let src = file_source(dir.path(), "grace_ms = 0\n[inner]\ntimeout_ms = 5\n");
    let defaults = load::<Kept>(&file_source(dir.path(), "grace_ms = 0\n"))
        .unwrap()
        .raw;
    let kept = reload::<Kept>(&src, &defaults).unwrap().config;
    assert_eq!((kept.listen.as_str(), kept.timeout_ms), ("127.0.0.1:1", 0));
}

#[test]
fn a_reload_valid_only_with_the_new_restart_values_is_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let running = load::<Kept>(&file_source(dir.path(), "[inner]\ntimeout_ms = 10\n"))
        .unwrap()
        .raw;
    let src = file_source(dir.path(), "grace_ms = 50\n[inner]\ntimeout_ms = 100\n");
    assert!(
        load::<Kept>(&src).is_ok(),
        "valid as written (a restart takes it)"
    );
    let err = reload::<Kept>(&src, &running).unwrap_err().to_string();
    assert!(
        err.contains("inner.timeout_ms at the running values until a restart")
            && err.contains("grace_ms: 50 exceeds inner.timeout_ms (10)"),
        "{err}"
    );
}

#[test]
fn keep_under_puts_back_keys_and_sections() {
    let running = Raw {
        listen: "a".into(),
        inner: Inner { timeout_ms: 1 },
        items: vec![Item {
            name: "x".into(),
            timeout_ms: 2,
        }],
        ..Raw::default()
    };
    let new = Raw {
        listen: "b".into(),
        grace_ms: 9,
        inner: Inner { timeout_ms: 3 },
        items: Vec::new(),
    };
    let kept = keep_under(&running, &new, &["items", "inner"]).unwrap();
    assert_eq!(
        (
            kept.listen.as_str(),
            kept.grace_ms,
            kept.inner.timeout_ms,
            kept.items.len()
        ),
        ("b", 9, 1, 1)
    );
    // A key neither sets stays unset; nothing else moves.
    let kept = keep_under(&new, &new, &["nothing.here", "inner.timeout_ms"]).unwrap();
    assert_eq!(flatten(&kept), flatten(&new));
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct IncludedRaw {
    pub(crate) programs: std::collections::BTreeMap<String, toml::Table>,
}

/// A role whose `programs` other files may hold (`include`), as the monitor's.
#[derive(Debug)]
pub(crate) struct Included {
    pub(crate) programs: Vec<String>,
}

impl RoleConfig for Included {
    const ROLE: &'static str = "test";
    type Raw = IncludedRaw;
    const INCLUDE_SECTIONS: &'static [&'static str] = &["programs"];
    fn validate(raw: &IncludedRaw) -> Result<Self, Vec<ConfigIssue>> {
        Ok(Included {
            programs: raw.programs.keys().cloned().collect(),
        })
    }
}
