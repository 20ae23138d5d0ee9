use std::path::Path;

use super::*;

/// `key: message` of each issue found.
fn issues(v: &Validator) -> Vec<String> {
    v.issues
        .iter()
        .map(|i| format!("{}: {}", i.key, i.message))
        .collect()
}

#[test]
fn splits_like_a_shell() {
    assert_eq!(
        split_command(r#"/bin/sh -c 'echo "a b"; exit 3' x\ y "q\"z""#).unwrap(),
        vec!["/bin/sh", "-c", "echo \"a b\"; exit 3", "x y", "q\"z"]
    );
    assert!(split_command("a 'b").is_err());
}

#[test]
fn a_misspelled_placeholder_or_a_port_without_port_base_is_an_error() {
    let found_in = |command: &str, port_base: Option<u16>| {
        let raw = RawProgram {
            command: command.into(),
            port_base,
            environment: BTreeMap::from([("ADDR".into(), "127.0.0.1:{prot}".into())]),
            ..RawProgram::default()
        };
        let mut v = Validator::new();
        raw.expand("app", &dirs(Path::new("/tmp/l")), &mut v);
        issues(&v)
    };
    let found = found_in("{slef} app --name {nmae} --n {num}", Some(7101));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].starts_with("programs.app.command: unknown placeholder {slef}: did you mean {self}?"));
    assert!(found[1].contains("{nmae}: did you mean {name}?"), "{found:?}");
    assert!(
        found[2]
            .starts_with("programs.app.environment.ADDR: unknown placeholder {prot}: did you mean {port}?")
    );
    let found = found_in("sh -c 'listen {port}'", None);
    assert!(
        found
            .iter()
            .any(|i| i.contains("command: {port} needs port_base")),
        "{found:?}"
    );
    // Braces of shells and awk are left alone.
    let found = found_in(
        "sh -c 'echo ${HOME} {} {print} {x} {Port} {a b}' {program}",
        Some(7101),
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(edits("port", "prot"), 1);
    assert_eq!(edits("program", "progarm"), 1);
    assert_eq!(edits("print", "port"), 3);
}

/// `{env:NAME}` (Supervisord's `%(ENV_NAME)s`): the monitor's own variable, in one argument whatever it holds;
/// a variable it does not have, or a name no variable can have, is a config error, not text passed on.
#[test]
fn env_placeholders_take_the_monitors_environment() {
    let path = std::env::var("PATH").unwrap_or_default();
    assert!(!path.is_empty(), "the test needs a PATH");
    let expand = |command: &str, env: &str| {
        let raw = RawProgram {
            command: command.into(),
            environment: BTreeMap::from([("PATH".into(), env.into())]),
            ..RawProgram::default()
        };
        let mut v = Validator::new();
        let specs = raw.expand("app", &dirs(Path::new("/tmp/l")), &mut v);
        (specs, issues(&v))
    };
    let (specs, found) = expand("sleep {env:PATH}x {num}", "/opt/app/bin:{env:PATH}");
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(specs[0].argv[1..], [format!("{path}x"), "0".into()]);
    assert_eq!(
        specs[0].environment,
        [("PATH".into(), format!("/opt/app/bin:{path}"))]
    );
    let (_, found) = expand(
        "sleep {env:XCLUSTER_SURELY_UNSET_7f3} {env:1X} ${env:SHELL_ONLY}",
        "{env:A-B}",
    );
    assert_eq!(
        found,
        [
            "programs.app.command: {env:XCLUSTER_SURELY_UNSET_7f3}: the monitor's environment has no such variable",
            "programs.app.command: {env:1X}: an environment variable's name is letters, digits and '_'",
            "programs.app.environment.PATH: {env:A-B}: an environment variable's name is letters, digits and '_'",
        ]
    );
}

#[test]
fn programs_are_checked_against_each_other_as_written() {
    let prog = |base: u16, numprocs: u32| RawProgram {
        command: "x".into(),
        port_base: Some(base),
        numprocs,
        ..RawProgram::default()
    };
    let mut programs = BTreeMap::from([
        ("a".to_string(), prog(7101, 3)),
        ("b".to_string(), prog(7103, 1)),
        ("c".to_string(), prog(7104, 2)),
        ("d".to_string(), prog(7299, 2)),
    ]);
    // A program with problems of its own (an empty command) is still a program to depend on.
    programs.get_mut("a").unwrap().command.clear();
    programs.get_mut("c").unwrap().depends_on = vec!["a".into(), "zzz".into()];
    let mut v = Validator::new();
    let monitor: std::net::SocketAddr = "127.0.0.1:7300".parse().unwrap();
    check_programs(&programs, &crate::select::Groups::new(), monitor, &mut v);
    let found = issues(&v);
    assert_eq!(
        found,
        [
            "programs.b.port_base: ports 7103..=7103 overlap a's 7101..=7103",
            "programs.c.depends_on: unknown program or group \"zzz\"",
            "programs.d.port_base: ports 7299..=7300 take the monitor's own listen port",
        ]
    );
}

/// A process name may not be another program's name: `ctl stop api` stopped `worker`'s process named
/// `api`, while `depends_on = ["api"]` meant the program. Its own program's name is its default.
#[test]
fn a_process_name_may_not_be_another_programs() {
    let spec = |group: &str, process_name: &str, numprocs: u32| {
        let raw = RawProgram {
            command: "x".into(),
            process_name: process_name.into(),
            numprocs,
            ..RawProgram::default()
        };
        raw.expand(group, &dirs(Path::new("/tmp")), &mut Validator::new())
    };
    let mut v = Validator::new();
    let specs = [
        spec("worker", "api", 1),
        spec("api", "", 2),
        spec("solo", "solo", 1),
    ]
    .concat();
    check_set(&specs, &mut v);
    assert_eq!(
        issues(&v),
        ["programs.worker.process_name: \"api\" is the name of another program"]
    );
}

#[test]
fn stop_levels_follow_priority_and_let_dependencies_win() {
    let spec = |group: &str, priority: i32, deps: &[&str]| {
        let raw = RawProgram {
            command: "x".into(),
            priority,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            ..RawProgram::default()
        };
        raw.expand(group, &dirs(Path::new("/tmp")), &mut Validator::new())
            .remove(0)
    };
    let levels = stop_levels(
        &[
            spec("db", 100, &[]),
            spec("cache", 100, &[]),
            spec("app", 200, &["db"]),
            spec("agent", 999, &["app"]),
            // Depends on `late`, yet has the lower priority: the dependency wins.
            spec("early", 50, &["late"]),
            spec("late", 900, &[]),
        ],
        &GroupOrder::new(),
    );
    let l = |g: &str| levels[g];
    assert_eq!(l("db"), l("cache"), "one priority, one level: they stop together");
    assert!(l("agent") > l("app") && l("app") > l("db"));
    assert!(l("early") > l("late"));
    assert!(l("late") > l("app"), "by priority");
}

/// Mid-roll, a program's processes run different specs: its level is above the dependencies of each and at
/// the highest rank of any, whichever spec comes last. Taken from the last, `web`, whose new spec no longer
/// depends on `cache`, was stopped with its old process still using `cache`, stopped first.
#[test]
fn a_program_mid_roll_stops_above_every_specs_dependencies() {
    let spec = |group: &str, name: &str, priority: i32, deps: &[&str]| {
        let raw = RawProgram {
            command: "x".into(),
            priority,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            ..RawProgram::default()
        };
        let mut s = (raw.expand(group, &dirs(Path::new("/tmp")), &mut Validator::new())).remove(0);
        s.name = name.to_string();
        s
    };
    let (old, new) = (
        spec("web", "web_0", 100, &["cache"]),
        spec("web", "web_1", 100, &[]),
    );
    let cache = spec("cache", "cache", 500, &[]);
    for specs in [[&old, &new, &cache], [&new, &old, &cache]] {
        let levels = stop_levels(specs, &GroupOrder::new());
        assert!(levels["web"] > levels["cache"], "{levels:?}");
    }
    // The highest rank of any: a new priority above another program's puts it above, before it stops.
    let raised = spec("web", "web_1", 900, &[]);
    let db = spec("db", "db", 500, &[]);
    for specs in [[&old, &raised, &db], [&raised, &old, &db]] {
        let levels = stop_levels(specs, &GroupOrder::new());
        assert!(levels["web"] > levels["db"], "{levels:?}");
    }
}

#[test]
fn a_log_file_in_a_missing_directory_is_an_error() {
    let dir = std::env::temp_dir();
    for (path, ok) in [
        (dir.join("{name}.log"), true),
        (dir.join("no-such-dir-xcluster/{name}.log"), false),
    ] {
        let raw = RawProgram {
            command: "x".into(),
            stderr_logfile: path.display().to_string(),
            ..RawProgram::default()
        };
        let mut v = Validator::new();
        let specs = raw.expand("app", &dirs(Path::new("/no/such/default/dir")), &mut v);
        assert_eq!(v.issues.is_empty(), ok, "{path:?}: {:?}", v.issues);
        assert_eq!(specs.len(), usize::from(ok));
        if !ok {
            assert_eq!(v.issues[0].key, "programs.app.stderr_logfile");
            assert!(
                v.issues[0]
                    .message
                    .ends_with("no-such-dir-xcluster does not exist")
            );
        }
    }
}

/// Settings no process could be started with used to pass, and the program then looped in BACKOFF:
/// `execve` refuses a NUL and a variable name with `=` (or none), a 300-byte name makes a log file
/// name too long, and a log "file" that is a directory cannot be opened.
#[test]
fn settings_no_spawn_could_use_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let check = |program: &str, raw: RawProgram| {
        let mut v = Validator::new();
        let specs = raw.expand(program, &dirs(dir.path()), &mut v);
        check_set(&specs, &mut v);
        issues(&v)
    };
    let env = |pairs: &[(&str, &str)]| RawProgram {
        command: "x".into(),
        environment: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..RawProgram::default()
    };
    assert_eq!(
        check(
            "app",
            env(&[("A=B", "1"), ("", "2"), ("N\0", "3"), ("OK", "v\0")])
        ),
        [
            "programs.app.environment: \"\" is not a variable name (non-empty, without '=' or NUL)",
            "programs.app.environment: \"A=B\" is not a variable name (non-empty, without '=' or NUL)",
            "programs.app.environment: \"N\\0\" is not a variable name (non-empty, without '=' or NUL)",
            "programs.app.environment.OK: contains a NUL byte",
        ]
    );
    assert!(check("app", env(&[("OK", "v"), ("_A1", "")])).is_empty());

    let x = || RawProgram {
        command: "x".into(),
        ..RawProgram::default()
    };
    let long = "a".repeat(300);
    assert_eq!(
        check(&long, x()),
        [format!("programs.{long}: program names are at most 128 bytes")]
    );
    assert!(check(&"a".repeat(128), x()).is_empty());
    // The longest program name still fits with its number.
    let several = RawProgram { numprocs: 3, ..x() };
    assert!(check(&"a".repeat(128), several).is_empty());
    for name in ["a&b", "a,b", "a:b", "a b", "{program}/1"] {
        let named = RawProgram {
            process_name: name.into(),
            ..x()
        };
        let found = check("app", named);
        assert_eq!(found.len(), 1, "{name:?}: {found:?}");
        assert!(
            found[0].starts_with("programs.app.process_name: ")
                && found[0].contains("process names are 1 to 200"),
            "{found:?}"
        );
    }

    // A log path that is an existing directory, for either stream.
    for setting in ["stdout_logfile", "stderr_logfile"] {
        let mut raw = x();
        let path = dir.path().display().to_string();
        match setting {
            "stdout_logfile" => raw.stdout_logfile = path.clone(),
            _ => raw.stderr_logfile = path.clone(),
        }
        assert_eq!(
            check("app", raw),
            [format!("programs.app.{setting}: {path} is a directory")]
        );
    }
    let raw = RawProgram {
        stdout_logfile: dir
            .path()
            .join(format!("{}{{name}}", "l".repeat(250)))
            .display()
            .to_string(),
        ..x()
    };
    let found = check("app", raw);
    assert!(
        found.len() == 1 && found[0].contains("is longer than 255 bytes"),
        "{found:?}"
    );
}

#[test]
fn exit_codes_users_and_the_name_all_are_checked() {
    let raw = RawProgram {
        command: "x".into(),
        exitcodes: vec![0, 300, -1],
        user: "no-such-user-xcluster".into(),
        ..RawProgram::default()
    };
    let mut v = Validator::new();
    raw.expand("all", &dirs(Path::new("/tmp/l")), &mut v);
    let found = issues(&v);
    assert_eq!(
        found,
        [
            "programs.all: \"all\" is reserved: `ctl stop all` means every program",
            "programs.all.exitcodes: 300 is not an exit code (0..=255)",
            "programs.all.exitcodes: -1 is not an exit code (0..=255)",
            "programs.all.user: no such user \"no-such-user-xcluster\"",
        ]
    );
}

/// The monitor makes its run and log directories at start: a log file in either is valid before they
/// exist (a fresh machine's first `check-config` or start refused `{run_dir}/web.log`).
#[test]
fn a_log_file_in_the_monitors_own_directories_is_valid_before_they_exist() {
    let dirs = dirs(Path::new("/no/such/xcluster-logs"));
    for (path, expanded) in [
        ("{run_dir}/{name}.log", "/no/such/xcluster-logs/run/web.log"),
        (
            "/no/such/xcluster-logs/{name}.log",
            "/no/such/xcluster-logs/web.log",
        ),
    ] {
        let raw = RawProgram {
            command: "x".into(),
            stdout_logfile: path.into(),
            ..RawProgram::default()
        };
        let mut v = Validator::new();
        let specs = raw.expand("web", &dirs, &mut v);
        assert!(v.issues.is_empty(), "{path}: {:?}", v.issues);
        assert_eq!(specs[0].stdout.path.as_deref(), Some(Path::new(expanded)));
    }
}

#[test]
fn numprocs_expand_names_and_ports() {
    let raw = RawProgram {
        command: "{self} app --set listen=127.0.0.1:{port} --state {run_dir}/{name}.json".into(),
        numprocs: 3,
        port_base: Some(7101),
        ..RawProgram::default()
    };
    let mut v = Validator::new();
    let specs = raw.expand("app", &dirs(Path::new("/tmp/l")), &mut v);
    assert!(v.issues.is_empty(), "{:?}", v.issues);
    let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["app-0", "app-1", "app-2"]);
    assert_eq!(specs[2].argv[3], "listen=127.0.0.1:7103");
    assert_eq!(specs[2].argv[5], "/tmp/l/run/app-2.json");
    assert_eq!(
        specs[0].stdout.path.as_deref(),
        Some(Path::new("/tmp/l/app-0.out.log"))
    );
    // What a process was launched with decides adoption; probes or restart policy do not.
    let mut same = specs[0].clone();
    same.policy.max_restarts += 1;
    same.readiness = None;
    assert_eq!(same.launch_fingerprint(), specs[0].launch_fingerprint());
    assert_ne!(specs[0].launch_fingerprint(), specs[1].launch_fingerprint());
    let mut env = specs[0].clone();
    env.environment.push(("K".into(), "v".into()));
    assert_ne!(env.launch_fingerprint(), specs[0].launch_fingerprint());
}

#[test]
fn signals_parse() {
    assert_eq!(parse_signal("TERM"), Some(nix::sys::signal::Signal::SIGTERM));
    assert_eq!(parse_signal("sighup"), Some(nix::sys::signal::Signal::SIGHUP));
    assert_eq!(parse_signal("9"), Some(nix::sys::signal::Signal::SIGKILL));
    assert_eq!(parse_signal("NOPE"), None);
}

/// The monitor's directories for a test: logs in `log_dir`, the run directory beside them.
fn dirs(log_dir: &Path) -> crate::program::Dirs {
    crate::program::Dirs {
        log_dir: log_dir.to_path_buf(),
        run_dir: log_dir.join("run"),
    }
}
