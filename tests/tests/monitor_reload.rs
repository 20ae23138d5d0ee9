//! Reread and update touch only what changed: unchanged programs keep their pids, a changed one is restarted,
//! a removed one stopped, an added one started; the file watcher does the same by itself; an invalid config
//! changes nothing and its error shows in the status, `ctl` and the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use monitor_common::*;
use serde_json::json;
use xcluster_tests::*;

fn programs(b_arg: &str, with_c: bool, with_d: bool) -> String {
    let mut s = String::new();
    for (name, on, arg) in [
        ("a", true, "1"),
        ("b", true, b_arg),
        ("c", with_c, "3"),
        ("d", with_d, "4"),
    ] {
        if on {
            s.push_str(&format!(
                "[programs.{name}]\ncommand = \"sleep 30{arg}\"\nstartsecs = 0\n"
            ));
        }
    }
    s
}

/// [`programs`] with `auto_update = false`: saved changes wait for `ctl update` (or `add`, `remove`).
fn off(b_arg: &str, with_c: bool, with_d: bool) -> String {
    format!("auto_update = false\n{}", programs(b_arg, with_c, with_d))
}

/// A monitor of [`off`]`("2", true, false)` with a, b and c running, and their pids.
fn started_off() -> (Mon, Vec<i32>) {
    let m = Mon::start(&off("2", true, false));
    for n in ["a", "b", "c"] {
        m.wait_state(n, "RUNNING", T);
    }
    let pids = abc_pids(&m);
    (m, pids)
}

fn abc_pids(m: &Mon) -> Vec<i32> {
    ["a", "b", "c"].iter().map(|n| m.pid(n).unwrap()).collect()
}

/// `{self}` is the binary the monitor runs as, read once: an upgrade that replaced that file (a new one
/// renamed over it, as install(1) and package managers do) made it `/path/xcluster (deleted)` at the next
/// load, so every program naming `{self}` counted as changed, and an update restarted it with a command
/// that was not there.
#[test]
fn self_stays_the_binary_after_an_upgrade_replaces_it() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("xcluster");
    std::fs::copy(xcluster_bin(), &bin).unwrap();
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let d = dir.clone();
    let programs = "[programs.s]\ncommand = \"/bin/sh -c 'exec sleep 300' {self}\"\nstartsecs = 0\n";
    let m = Mon::launch_bin(&bin, dir.clone(), None, move |addr| {
        write_file(d.path(), "monitor.toml", &config_text(addr, d.path(), programs))
    });
    let pid = m.wait_state("s", "RUNNING", T)["pid"].as_i64();
    let new = bin_dir.path().join("xcluster.new");
    std::fs::copy(xcluster_bin(), &new).unwrap();
    std::fs::rename(&new, &bin).unwrap();
    let o = m.ctl_ok(&["reread"]);
    assert!(!o.contains("s: changed"), "{o}");
    m.ctl_ok(&["update"]);
    let s = m.prog("s");
    assert_eq!(
        (s["pid"].as_i64(), &s["command"][3]),
        (pid, &json!(bin.display().to_string()))
    );
}

#[test]
fn reread_shows_the_plan_and_update_touches_only_what_changed() {
    // With `auto_update = false` the watcher does not apply the change itself: reread and update are
    // exercised alone.
    let (m, before) = started_off();
    m.rewrite(&off("9", false, true));
    let o = m.ctl(&["reread"]);
    assert!(o.status.success(), "{}", out(&o));
    let text = out(&o);
    assert!(
        text.contains("b: changed") && text.contains("c: removed") && text.contains("d: added"),
        "{text}"
    );
    assert!(!text.contains("a:"), "{text}");
    // Reread applies nothing.
    let after = abc_pids(&m);
    assert_eq!(before, after);

    let o = m.ctl(&["update"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_state("d", "RUNNING", T);
    let b2 = m.wait_new_pid("b", before[1], T);
    assert_eq!(m.prog("b")["command"][1], "309");
    assert_eq!(m.pid("a"), Some(before[0]), "unchanged program keeps its pid");
    eventually(T, "c removed", || (!lists(&m.status(), "c")).then_some(()));
    eventually(T, "c's process gone", || (!alive(before[2])).then_some(()));
    // Its series leave `/metrics` with it; d's are there.
    let metrics = get(m.addr, "/metrics").unwrap().body;
    let up = |name: &str| {
        metric_value(
            &metrics,
            "xcluster_monitor_program_up",
            &format!("program=\"{name}\""),
        )
    };
    assert_eq!((up("c"), up("d")), (None, Some(1.0)), "{metrics}");
    // A second update has nothing to do.
    let o = m.ctl(&["update"]);
    assert!(out(&o).contains("No config updates"), "{}", out(&o));
    assert_eq!(m.pid("b"), Some(b2));
}

/// With `auto_update = false` a saved config's program changes wait for `ctl update`, as Supervisord's: the
/// status, `ctl status` and the event stream say what waits, and `update` applies it.
#[test]
fn with_auto_update_off_a_saved_config_waits_for_update() {
    let (m, pids) = started_off();
    m.rewrite(&off("7", false, false));
    let pending = eventually(T, "the saved change held", || {
        Some(m.status()["pending"].clone()).filter(|p| p.is_object())
    });
    assert_eq!(
        (&pending["added"], &pending["changed"], &pending["removed"]),
        (&json!([]), &json!(["b"]), &json!(["c"]))
    );
    let events = get(m.addr, "/v1/events/recent").unwrap().body;
    assert!(events.contains("\"kind\":\"pending\""), "{events}");
    assert!(
        events.contains("program changes wait for `ctl update`"),
        "{events}"
    );
    assert_eq!(
        ["a", "b", "c"].map(|n| m.prog(n)["change_waiting"].clone()),
        [json!(false), json!(true), json!(true)]
    );
    let o = m.ctl(&["status"]);
    assert!(
        out(&o).contains("its saved change waits for `ctl update`"),
        "{}",
        out(&o)
    );
    assert!(
        out(&o)
            .contains("config saved but not applied (auto_update = false): added [] changed [b] removed [c]"),
        "{}",
        out(&o)
    );
    // Nothing was touched, and reread shows the same plan.
    let now = abc_pids(&m);
    assert_eq!(now, pids);
    let o = m.ctl(&["reread"]);
    assert!(
        out(&o).contains("b: changed") && out(&o).contains("c: removed"),
        "{}",
        out(&o)
    );
    // `update` applies it, and nothing waits after.
    let o = m.ctl(&["update"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_new_pid("b", pids[1], T);
    assert_eq!(m.pid("a"), Some(pids[0]));
    eventually(T, "c removed", || {
        let st = m.status();
        (!lists(&st, "c") && st["pending"].is_null()).then_some(())
    });
}

/// `ctl update NAME` applies one program's saved change and leaves the others pending (supervisorctl's
/// `update GROUP`, `add`, `remove`); `ctl avail` lists the running and the saved programs and what waits.
#[test]
fn a_named_update_applies_only_that_programs_change() {
    let (m, pids) = started_off();
    let present = |name: &str| lists(&m.status(), name);
    // b changes, c goes, d comes, and e (new) depends on f (new).
    let deps = "[programs.e]\ncommand = \"sleep 305\"\nstartsecs = 0\ndepends_on = [\"f\"]\n\
                [programs.f]\ncommand = \"sleep 306\"\nstartsecs = 0\n";
    m.rewrite(&format!("{}{deps}", off("7", false, true)));
    eventually(T, "the saved change held", || {
        Some(m.status()["pending"].clone()).filter(|p| p["added"] == json!(["d", "e", "f"]))
    });
    let o = m.ctl(&["avail"]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    for line in [
        "a  in use  auto    999\n",
        "b  in use  auto    999  (changed: `update b` applies it)",
        "d  avail   auto    999  (added: `update d` applies it)",
        "c  in use  auto    999  (removed: `update c` applies it)",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    // d alone: started; nothing else touched, and the rest still waits.
    assert_says(&m.ctl(&["update", "d"]), 0, "d: added (applied)");
    m.wait_state("d", "RUNNING", T);
    assert_eq!(abc_pids(&m), pids, "a named update touched another program");
    let pending = eventually(T, "the rest still pending", || {
        Some(m.status()["pending"].clone()).filter(|p| p["added"] == json!(["e", "f"]))
    });
    assert_eq!(
        (&pending["changed"], &pending["removed"]),
        (&json!(["b"]), &json!(["c"]))
    );
    // e without f would start without its dependency: refused, naming what to add.
    assert_refused(
        &m.ctl(&["update", "e"]),
        "e depends on f, and it is added in the file but not named: name f:* too",
    );
    assert!(!present("e"), "a refused update added e");
    let o = m.ctl(&["update", "e", "f:*"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_state("e", "RUNNING", T);
    // c's removal alone, then b's change alone.
    let o = m.ctl(&["update", "c"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "c removed", || (!present("c")).then_some(()));
    assert_eq!(m.pid("b"), Some(pids[1]));
    let o = m.ctl(&["update", "b"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_new_pid("b", pids[1], T);
    assert_eq!(m.pid("a"), Some(pids[0]));
    eventually(T, "nothing pending", || {
        m.status()["pending"].is_null().then_some(())
    });
    // An unknown name is refused; with auto_update = true a named update is refused (the reload applies all).
    let o = m.ctl(&["update", "zz"]);
    assert!(out(&o).contains("no such process or group: zz"), "{}", out(&o));
    m.rewrite(&programs("7", false, true));
    let o = eventually(T, "auto_update = true in force", || {
        let o = m.ctl(&["update", "a"]);
        out(&o).contains("auto_update = true").then_some(o)
    });
    assert!(!o.status.success(), "{}", out(&o));
    // `add` and `remove` are refused by their own names, not as an `update NAME` the user did not type.
    for verb in ["add", "remove"] {
        assert_refused(&m.ctl(&[verb, "a"]), &format!("`{verb} NAME`"));
    }
}

/// `ctl add NAME` and `ctl remove NAME` (supervisorctl's): `add` starts only a program new in the saved
/// file and `remove` drops only one gone from it; each leaves every other change pending, and one with
/// nothing of its kind to apply (an `add` of a program in use, a `remove` of one still in the file) is
/// refused and changes nothing.
#[test]
fn add_and_remove_apply_only_additions_and_removals() {
    let (m, pids) = started_off();
    // b changes, c goes, d comes.
    m.rewrite(&off("7", false, true));
    eventually(T, "the saved change held", || {
        Some(m.status()["pending"].clone()).filter(|p| p["added"] == json!(["d"]))
    });
    for (verb, name, why) in [
        (
            "add",
            "b",
            "nothing to add: no program of b is new in the saved config",
        ),
        (
            "add",
            "c",
            "nothing to add: no program of c is new in the saved config",
        ),
        (
            "remove",
            "b",
            "nothing to remove: no program of b is gone from the saved config",
        ),
        (
            "remove",
            "d",
            "nothing to remove: no program of d is gone from the saved config",
        ),
    ] {
        assert_refused(&m.ctl(&[verb, name]), why);
    }
    // `add all`: d alone, not b's change nor c's removal; b, named too, is said to have nothing to add.
    assert_says(
        &m.ctl(&["add", "all", "b"]),
        0,
        "d: added (applied)\nb: not added: nothing of it is new in the saved config",
    );
    m.wait_state("d", "RUNNING", T);
    assert_eq!(abc_pids(&m), pids, "add touched a program in use");
    // `remove all`: c alone; b still runs its old process, its change pending.
    assert_says(
        &m.ctl(&["remove", "all", "d"]),
        0,
        "c: removed (applied)\nd: not removed: it is still in the saved config",
    );
    eventually(T, "c removed", || (!lists(&m.status(), "c")).then_some(()));
    assert_eq!((m.pid("a"), m.pid("b")), (Some(pids[0]), Some(pids[1])));
    let pending = eventually(T, "b's change still pending", || {
        Some(m.status()["pending"].clone()).filter(|p| p["added"] == json!([]) || p["added"].is_null())
    });
    assert_eq!(pending["changed"], json!(["b"]), "{pending}");
}

/// A named update that removes the last program of a group another program depends on is refused, naming
/// the dependent, whose own saved change drops the dependency (it named the removed group, already named).
#[test]
fn a_named_removal_of_a_dependency_names_its_dependent() {
    let db = "[programs.db]\ncommand = \"sleep 307\"\nstartsecs = 0\n";
    let web = |deps: &str| format!("[programs.web]\ncommand = \"sleep 308\"\nstartsecs = 0\n{deps}");
    let m = Mon::start(&format!(
        "auto_update = false\n{db}{}",
        web("depends_on = [\"db\"]\n")
    ));
    m.wait_state("web", "RUNNING", T);
    m.rewrite(&format!("auto_update = false\n{}", web("")));
    eventually(T, "the removal held", || {
        (m.status()["pending"]["removed"] == json!(["db"])).then_some(())
    });
    assert_refused(
        &m.ctl(&["update", "db:*"]),
        "web depends on db, and this update removes its last program: name web:* too",
    );
    assert_eq!(m.state("db"), "RUNNING", "a refused update removed db");
    let o = m.ctl(&["update", "db:*", "web:*"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "db removed, nothing pending", || {
        let st = m.status();
        (!lists(&st, "db") && st["pending"].is_null()).then_some(())
    });
}

/// An update that removes one program and adds another starts the new one once the old one is gone
/// (Supervisord's `update` stops before it adds): started beside it, a renamed program (`numprocs` 1 to 2:
/// `web` out, `web-0` in on the same port) failed to bind while the old one stopped, and could end FATAL.
#[test]
fn an_update_starts_what_it_adds_once_what_it_removes_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let old = format!(
        "auto_update = false\n[programs.web]\ncommand = '''{}'''\nstartsecs = 0\nstopwaitsecs = 600\n",
        held_until_released(dir.path())
    );
    let m = Mon::start(&old);
    m.wait_state("web", "RUNNING", T);
    eventually(T, "web's TERM trap", || {
        let r = get(m.addr, "/v1/programs/web/log?stream=stdout&bytes=4096").ok()?;
        r.body.contains("trapped").then_some(())
    });
    let pid = m.pid("web").unwrap();
    m.rewrite("auto_update = false\n[programs.web]\ncommand = \"sleep 309\"\nnumprocs = 2\nstartsecs = 0\n");
    let o = m.ctl(&["update"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_state("web", "STOPPING", T);
    assert_eq!(
        m.state("web-0"),
        "STOPPED",
        "started beside the program it replaces"
    );
    release(dir.path(), pid);
    m.wait_state("web-0", "RUNNING", T);
    assert!(!lists(&m.status(), "web"));
}

/// A named update that rolls (`--rolling`, or `update_strategy = "rolling"`) beside an added program it
/// does not name rolls only what it names: the monitor panicked, its roll looking up the unnamed program.
#[test]
fn a_named_rolling_update_beside_an_unnamed_addition_rolls_what_it_names() {
    let web = |arg: &str, n: u32| {
        format!(
            "auto_update = false\n[programs.web]\ncommand = \"sleep 31{arg}\"\nnumprocs = {n}\nstartsecs = 0\n"
        )
    };
    let m = Mon::start(&web("0", 2));
    m.wait_state("web-0", "RUNNING", T);
    let pids: Vec<i32> = ["web-0", "web-1"].iter().map(|n| m.pid(n).unwrap()).collect();
    m.rewrite(&web("1", 3));
    eventually(T, "the saved change held", || {
        (m.status()["pending"]["added"] == json!(["web-2"])).then_some(())
    });
    let o = m.ctl(&["update", "--rolling", "web-0"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_new_pid("web-0", pids[0], T);
    m.wait_state("web-0", "RUNNING", T);
    assert_eq!(m.pid("web-1"), Some(pids[1]), "an unnamed program rolled");
    let pending = m.status()["pending"].clone();
    assert_eq!(
        (&pending["added"], &pending["changed"]),
        (&json!(["web-2"]), &json!(["web-1"]))
    );
}

#[test]
fn the_file_watcher_applies_a_change_and_an_invalid_config_changes_nothing() {
    let m = Mon::start(&programs("2", true, false));
    for n in ["a", "b", "c"] {
        m.wait_state(n, "RUNNING", T);
    }
    let a = m.pid("a").unwrap();
    let b = m.pid("b").unwrap();

    // A valid edit: only b restarts.
    m.rewrite(&programs("7", true, false));
    let b2 = m.wait_new_pid("b", b, T);
    assert_eq!(m.pid("a"), Some(a));

    // An invalid edit: nothing changes, and the error is visible everywhere.
    m.rewrite(&format!(
        "{}\n[programs.e]\ncommand = \"sleep 1\"\nno_such_key = 1\n",
        programs("8", true, false)
    ));
    let err = eventually(T, "the reload error in the status", || {
        m.status()["reload"]["last_error"].as_str().map(str::to_string)
    });
    assert!(err.contains("no_such_key"), "{err}");
    let o = m.ctl(&["status"]);
    assert!(out(&o).contains("config reload failed"), "{}", out(&o));
    let metrics = get(m.addr, "/metrics").unwrap().body;
    assert_eq!(
        metric_value(&metrics, "xcluster_config_last_reload_ok", "monitor"),
        Some(0.0),
        "{metrics}"
    );
    // A rejected update, and a rejected reread, each count as a failed reload; ctl names each problem once.
    let failures = || m.status()["reload"]["failures"].as_u64().unwrap();
    let before = failures();
    let r = m.post("/v1/update");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no_such_key"), "{}", r.body);
    eventually(T, "the update's failure counted", || {
        (failures() == before + 1).then_some(())
    });
    let o = m.ctl(&["reread"]);
    let lines = out(&o).lines().filter(|l| l.contains("no_such_key")).count();
    assert_eq!(lines, 1, "{}", out(&o));
    assert_eq!(failures(), before + 2);
    // `avail` is a read anyone may make: it shows the error, and records no failed reload nor event each
    // time (it did: a loop of them raised the failure alert and pushed real history out of the events).
    let events = m.events().len();
    for _ in 0..3 {
        let r = get(m.addr, "/v1/avail").unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("no_such_key"), "{}", r.body);
    }
    let o = m.ctl(&["reread"]);
    assert!(!o.status.success(), "{}", out(&o));
    assert_eq!(failures(), before + 3, "only the reread counted");
    assert_eq!(m.events().len(), events + 1, "only the reread's event");
    assert_eq!(m.pid("a"), Some(a));
    assert_eq!(m.pid("b"), Some(b2));
    assert_eq!(m.prog("b")["command"][1], "307");
    assert!(
        m.events()
            .iter()
            .any(|e| e["kind"] == "reload" && e["ok"] == false)
    );

    // The bad edit undone (the file as the running config was read): the error clears, nothing restarts.
    m.rewrite(&programs("7", true, false));
    eventually(T, "the reload error cleared", || {
        m.status()["reload"]["last_error"].is_null().then_some(())
    });
    let metrics = get(m.addr, "/metrics").unwrap().body;
    assert_eq!(
        metric_value(&metrics, "xcluster_config_last_reload_ok", "monitor"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!((m.pid("a"), m.pid("b")), (Some(a), Some(b2)));
}

/// With `auto_update = false`, a `[groups.*]` section new in the saved file already names its programs for
/// `ctl update`: `update site` applies the changes of its programs alone; the group is in force once updated.
#[test]
fn a_named_update_of_a_group_new_in_the_file_applies_its_programs_changes() {
    let (m, pids) = started_off();
    // b and c change; the new group holds b and the new d.
    let changed = programs("7", false, true).replace(
        "[programs.d]",
        "[programs.c]\ncommand = \"sleep 308\"\nstartsecs = 0\n[programs.d]",
    );
    m.rewrite(&format!(
        "auto_update = false\n{changed}[groups.site]\nprograms = [\"b\", \"d\"]\n"
    ));
    eventually(T, "the saved change held", || {
        Some(m.status()["pending"].clone()).filter(|p| p["changed"] == json!(["b", "c"]))
    });
    assert!(m.status()["groups"].as_object().is_some_and(|g| g.is_empty()));
    let o = m.ctl(&["update", "site"]);
    assert!(o.status.success(), "{}", out(&o));
    m.wait_new_pid("b", pids[1], T);
    m.wait_state("d", "RUNNING", T);
    assert_eq!((m.pid("a"), m.pid("c")), (Some(pids[0]), Some(pids[2])));
    let pending = m.status()["pending"].clone();
    assert_eq!(pending["changed"], json!(["c"]), "{pending}");
    assert_eq!(m.status()["groups"], json!({ "site": ["b", "d"] }));
}

/// A program an update removes stays listed while it stops, also when the config is applied again
/// meanwhile (`ctl update` right after a save, as a Supervisord user types; the reload after it applies it
/// once more), and leaves once gone. The second update dropped it from the list at once and left it in the
/// supervisor for good, never ready, so a program depending on its group waited for it for ever.
#[test]
fn a_program_being_removed_outlives_a_second_update_and_then_leaves() {
    // On SIGTERM an app process goes on until the test creates `go-PID`, with a `stopwaitsecs` far past the
    // test: it stops exactly when the test says, however slow the machine.
    let dir = tempfile::tempdir().unwrap();
    let release = |pid: i32| release(dir.path(), pid);
    let programs = |numprocs: u32| {
        format!(
            r#"
[programs.app]
command = '''{held}'''
numprocs = {numprocs}
stopwaitsecs = 3600
startsecs = 0
[programs.web]
command = "sleep 300"
startsecs = 0
depends_on = ["app"]
"#,
            held = held_until_released(dir.path())
        )
    };
    let m = Mon::start(&programs(2));
    for name in ["app-0", "app-1", "web"] {
        m.wait_state(name, "RUNNING", T);
    }
    let (app0, app1) = (m.pid("app-0").unwrap(), m.pid("app-1").unwrap());
    m.rewrite(&programs(1));
    // STOPPING until released.
    m.wait_state("app-1", "STOPPING", T);
    m.ctl_ok(&["update"]);
    assert_eq!(m.state("app-1"), "STOPPING", "listed while it stops");
    // A start or restart of it is refused: answered `starting once stopped`, it was then dropped.
    for command in ["start", "restart"] {
        let o = m.ctl(&[command, "app-1"]);
        assert_says(&o, 1, "app-1: ERROR (removed from the config)");
    }
    release(app1);
    eventually(T, "app-1 to leave once gone", || {
        (!lists(&m.status(), "app-1")).then_some(())
    });
    // `app` (one process now, under its own name) starts once `app-0`, removed too, is gone.
    assert_eq!(
        m.state("app"),
        "STOPPED",
        "started beside the processes it replaces"
    );
    release(app0);
    m.wait_state("app", "RUNNING", T);
    let o = m.ctl(&["restart", "--wait-secs", "10", "web"]);
    assert_says(&o, 0, "web: started");
    // So the monitor's own stop at the end does not wait on the processes of `app` still running.
    for p in m.status()["programs"].as_array().unwrap() {
        if p["name"].as_str().is_some_and(|n| n.starts_with("app"))
            && let Some(pid) = p["pid"].as_i64()
        {
            release(pid as i32);
        }
    }
}

/// After a named update, the programs it left out stop at shutdown by the settings they run, not by the
/// file's: here `b`'s new, lower `priority` waits for `ctl update b`, so `b` still stops before `a`. The stop
/// order was taken from the file alone, and `a` was stopped under a `b` that still needed it.
#[test]
fn a_named_update_leaves_the_others_stopping_by_the_settings_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let order = dir.path().join("order");
    let program = |name: &str, priority: u32| {
        let trapped = dir.path().join(format!("{name}-trapped"));
        format!(
            "[programs.{name}]\ncommand = \"/bin/sh -c 'trap \\\"echo {name} >> {order}; exit 0\\\" TERM; \
             touch {trapped}; while :; do sleep 0.05; done'\"\nstartsecs = 0\npriority = {priority}\n",
            order = order.display(),
            trapped = trapped.display(),
        )
    };
    let mut m = Mon::start(&format!(
        "auto_update = false\n{}{}",
        program("a", 100),
        program("b", 200)
    ));
    m.wait_state("b", "RUNNING", T);
    m.rewrite(&format!(
        "auto_update = false\n{}{}{}",
        program("a", 100),
        program("b", 50),
        program("c", 300)
    ));
    let o = m.ctl(&["reread"]);
    assert!(out(&o).contains("b: changed"), "{}", out(&o));
    m.ctl_ok(&["update", "c"]);
    m.wait_state("c", "RUNNING", T);
    for name in ["a", "b", "c"] {
        let trapped = dir.path().join(format!("{name}-trapped"));
        eventually(T, "each program to set its TERM trap", || {
            trapped.exists().then_some(())
        });
    }
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(m.proc.wait_exit(T), Some(0));
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "c\nb\na\n");
}
