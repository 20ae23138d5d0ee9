//! `include = ["conf.d/*.toml"]` (Supervisord's `[include]`): programs kept in files of their own. The file
//! watcher sees an included file changed, added or removed as it sees the main file saved: with `auto_update`
//! the change applies by itself, without it the change waits for `ctl update`; a bad included file is refused
//! and the config in force stays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::path::Path;

use monitor_common::*;
use serde_json::json;
use xcluster_tests::*;

fn program(name: &str, arg: &str) -> String {
    format!("[programs.{name}]\ncommand = \"sleep 30{arg}\"\nstartsecs = 0\n")
}

/// Saves `conf_d/name` as editors do: written under a dotfile name no pattern matches, then renamed over it,
/// so the watcher never sees a half-written file.
fn save(conf_d: &Path, name: &str, text: &str) {
    let tmp = conf_d.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, conf_d.join(name)).unwrap();
}

/// A monitor whose main file includes `conf.d/*.toml`, which holds `web`; `settings` go before its programs.
fn start(settings: &str) -> (Mon, std::path::PathBuf) {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    save(&conf_d, "web.toml", &program("web", "1"));
    let main = format!(
        "{settings}include = [\"conf.d/*.toml\"]\n{}",
        program("main", "0")
    );
    let m = Mon::start_in(dir, free_addr(), &main);
    for n in ["main", "web"] {
        m.wait_state(n, "RUNNING", T);
    }
    (m, conf_d)
}

/// `name`'s status, if the monitor has such a program.
fn find(m: &Mon, name: &str) -> Option<serde_json::Value> {
    listed(&m.status(), name).cloned()
}

fn present(m: &Mon, name: &str) -> bool {
    lists(&m.status(), name)
}

/// Waits until a program the config just gained runs (`Mon::wait_state` wants it there already).
fn wait_added(m: &Mon, name: &str) {
    eventually(T, &format!("{name} added and RUNNING"), || {
        find(m, name).filter(|p| p["state"] == "RUNNING")
    });
}

/// No SIGHUP and no `ctl` here: every change below reaches the monitor through the file watcher alone.
#[test]
fn the_file_watcher_applies_an_included_files_change_and_refuses_a_bad_one() {
    let (m, conf_d) = start("");
    let main = m.pid("main").unwrap();
    let web = m.pid("web").unwrap();

    // A file dropped in: its program starts.
    save(&conf_d, "api.toml", &program("api", "2"));
    wait_added(&m, "api");
    let api = m.pid("api").unwrap();
    // A command changed: that program alone restarts, with it.
    save(&conf_d, "web.toml", &program("web", "7"));
    let web = m.wait_new_pid("web", web, T);
    assert_eq!(m.prog("web")["command"][1], "307");
    assert_eq!((m.pid("main"), m.pid("api")), (Some(main), Some(api)));

    // A bad included file: refused, the config in force stays, and the error shows.
    save(
        &conf_d,
        "bad.toml",
        "[programs.bad]\ncommand = \"sleep 1\"\nno_such_key = 1\n",
    );
    let err = eventually(T, "the included file's error in the status", || {
        m.status()["reload"]["last_error"].as_str().map(str::to_string)
    });
    assert!(err.contains("no_such_key"), "{err}");
    // Named with the file that holds it, not only the main file the error is titled with.
    let bad = conf_d.join("bad.toml");
    assert!(err.contains(&format!("(in {})", bad.display())), "{err}");
    assert!(!present(&m, "bad"));
    // Removed again: the files are those of the config in force, so the error clears and nothing restarts.
    std::fs::remove_file(conf_d.join("bad.toml")).unwrap();
    eventually(T, "the reload error cleared", || {
        m.status()["reload"]["last_error"].is_null().then_some(())
    });
    let pids = ["main", "web", "api"].map(|n| m.pid(n));
    assert_eq!(pids, [Some(main), Some(web), Some(api)]);

    // A file removed: its program goes.
    std::fs::remove_file(conf_d.join("api.toml")).unwrap();
    eventually(T, "api removed", || (!present(&m, "api")).then_some(()));
    assert_eq!((m.pid("main"), m.pid("web")), (Some(main), Some(web)));
}

/// With `auto_update = false` an included file dropped in waits for `update` as a saved main file does, as
/// Supervisord's includes do: pending in the status and `avail`, listed by `reread`. A program defined twice
/// is refused naming both files.
#[test]
fn programs_in_included_files_are_supervised_and_updated() {
    let (m, conf_d) = start("auto_update = false\n");
    save(&conf_d, "api.toml", &program("api", "2"));
    eventually(T, "the included file's change held", || {
        Some(m.status()["pending"].clone()).filter(|p| p["added"] == json!(["api"]))
    });
    assert!(!present(&m, "api"));
    let text = m.ctl_ok(&["avail"]);
    assert!(text.contains("(added: `update api` applies it)"), "{text}");
    let o = m.ctl(&["reread"]);
    assert_eq!(out(&o).trim(), "api: added", "{}", out(&o));
    let o = m.ctl(&["update"]);
    assert!(o.status.success(), "{}", out(&o));
    wait_added(&m, "api");
    eventually(T, "nothing pending", || {
        m.status()["pending"].is_null().then_some(())
    });
    // A second file defining web: refused, nothing changes.
    save(&conf_d, "web-again.toml", &program("web", "9"));
    let o = m.ctl(&["reread"]);
    assert!(!o.status.success(), "{}", out(&o));
    let text = out(&o);
    let web = conf_d.join("web.toml");
    let web_again = conf_d.join("web-again.toml");
    let both =
        |a: &Path, b: &Path| format!("programs.web: defined in {} and in {}", a.display(), b.display());
    assert!(
        text.contains(&both(&web, &web_again)) || text.contains(&both(&web_again, &web)),
        "{text}"
    );
    assert_eq!(m.prog("web")["command"][1], "301");
}

/// A reload naming an include directory that is not there is refused; the directory made afterwards (outside
/// the main file's, so no watch sees it made) is looked for again, and the program file put in it starts
/// with no SIGHUP or `ctl`. It used to wait for the next reload.
#[test]
fn an_include_directory_made_after_its_reload_was_refused_is_watched_once_it_is_there() {
    let m = Mon::start(&program("main", "0"));
    m.wait_state("main", "RUNNING", T);
    let elsewhere = tempfile::tempdir().unwrap();
    let later = elsewhere.path().join("later");
    m.rewrite(&format!(
        "include = [{:?}]\n{}",
        later.join("*.toml").to_str().unwrap(),
        program("main", "0")
    ));
    let err = eventually(T, "the reload refused for the missing directory", || {
        m.status()["reload"]["last_error"].as_str().map(str::to_string)
    });
    assert!(err.contains("later"), "{err}");
    std::fs::create_dir(&later).unwrap();
    save(&later, "api.toml", &program("api", "2"));
    wait_added(&m, "api");
    assert!(m.status()["reload"]["last_error"].is_null());
}

/// A `[groups.*]` section may live in an included file too, as Supervisord's `[group:x]` in an `[include]`d one;
/// saving it applies at once.
#[test]
fn a_group_in_an_included_file_applies_when_saved() {
    let (m, conf_d) = start("");
    save(
        &conf_d,
        "site.toml",
        "[groups.site]\nprograms = [\"web\", \"main\"]\n",
    );
    eventually(T, "the group to apply", || {
        (m.status()["groups"] == json!({ "site": ["web", "main"] })).then_some(())
    });
    let o = m.ctl(&["status", "site:*"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let names: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["main", "web"], "{}", out(&o));
}
