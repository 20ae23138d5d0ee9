#![allow(clippy::unwrap_used)]
use xcluster_runtime::Validator;

use super::*;

fn parse(text: &str) -> Result<ProxyConfig, Vec<String>> {
    let raw: ProxySection = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut v = Validator::new();
    let cfg = raw.validate(&mut v);
    v.finish(cfg)
        .map_err(|issues| issues.iter().map(|i| i.to_string()).collect())
}

#[test]
fn a_reload_names_the_keys_it_cannot_apply() {
    let running = parse("workers = 2").unwrap();
    assert!(
        running
            .restart_pending(&parse("workers = 2\nidle_timeout_ms = 5").unwrap())
            .is_empty()
    );
    let new = parse("workers = 3\nbacklog = 16\nconnect_timeout_ms = 5").unwrap();
    assert_eq!(running.restart_pending(&new), ["proxy.workers", "proxy.backlog"]);
}

#[test]
fn defaults_validate() {
    let cfg = parse("").unwrap();
    assert!(cfg.listeners.is_empty());
    assert!(cfg.workers >= 1);
    assert_eq!(cfg.forwarding, Forwarding::Auto);
    assert_eq!(cfg.timeouts.connect_attempts, 3);
    assert_eq!(cfg.timeouts.check_interval, Some(Duration::from_secs(2)));
}

#[test]
fn health_checks_are_off_at_0_and_refused_below_100_ms() {
    let cfg = parse("check_interval_ms = 0\n").unwrap();
    assert_eq!(cfg.timeouts.check_interval, None);
    let errs = parse("check_interval_ms = 50\n").unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("check_interval_ms"),
        "{errs:#?}"
    );
}

#[test]
fn check_streaks_default_to_haproxys_and_are_at_least_1() {
    let t = parse("").unwrap().timeouts;
    assert_eq!((t.check_fall, t.check_rise), (3, 2));
    let t = parse("check_fall = 1\ncheck_rise = 5\n").unwrap().timeouts;
    assert_eq!((t.check_fall, t.check_rise), (1, 5));
    let errs = parse("check_fall = 0\ncheck_rise = 101\n").unwrap_err();
    assert!(
        errs.len() == 2 && errs[0].contains("check_fall") && errs[1].contains("check_rise"),
        "{errs:#?}"
    );
}

#[test]
fn balance_is_random_least_connections_or_source() {
    assert_eq!(parse("").unwrap().balance, Balance::Random);
    let cfg = parse("balance = \"least_connections\"\n").unwrap();
    assert_eq!(cfg.balance, Balance::LeastConnections);
    assert_eq!(parse("balance = \"source\"\n").unwrap().balance, Balance::Source);
    assert_eq!(
        parse("balance = \"round_robin\"\n").unwrap().balance,
        Balance::RoundRobin
    );
    let errs = parse("balance = \"leastconn\"\n").unwrap_err();
    assert!(errs.len() == 1 && errs[0].contains("balance"), "{errs:#?}");
}

#[test]
fn a_type_may_have_its_own_balance_if_backends_serve_it() {
    let pools = "[[backends]]\naddr = \"127.0.0.1:1\"\nrequest_types = [\"ws\", \"web\"]\n";
    let cfg = parse(&format!(
        "balance = \"round_robin\"\n[balance_by_type]\nws = \"least_connections\"\n{pools}"
    ))
    .unwrap();
    assert_eq!(
        (cfg.balance_for("ws"), cfg.balance_for("web")),
        (Balance::LeastConnections, Balance::RoundRobin)
    );
    for (bad, key) in [
        ("ws = \"leastconn\"", "proxy.balance_by_type.ws"),
        ("api = \"source\"", "proxy.balance_by_type.api"),
        ("\"a b\" = \"source\"", "proxy.balance_by_type.a b"),
    ] {
        let errs = parse(&format!("[balance_by_type]\n{bad}\n{pools}")).unwrap_err();
        assert!(errs.iter().all(|e| e.contains(key)), "{bad}: {errs:#?}");
    }
}

/// A backend may be named by host name and port: it stands for every address the name resolves to (here
/// `localhost`, from the hosts file), each with the entry's settings; a name that does not resolve, or
/// is not a host name, is refused.
#[test]
fn a_backend_named_by_host_resolves_to_its_addresses() {
    let cfg =
        parse("[[backends]]\naddr = \"localhost:9000\"\nweight = 7\nrequest_types = [\"web\"]\n").unwrap();
    let local = SocketAddr::from(([127, 0, 0, 1], 9000));
    assert!(cfg.backends.iter().any(|b| b.addr == local), "{:?}", cfg.backends);
    assert!(
        cfg.backends
            .iter()
            .all(|b| b.addr.port() == 9000 && b.weight == 7 && b.request_types == ["web"])
    );
    assert!(
        cfg.timeouts
            .checks
            .iter()
            .any(|(a, c)| *a == local && c.target == local)
    );
    for (addr, why) in [
        (
            "no-such-host.invalid:9000",
            "cannot resolve \"no-such-host.invalid\"",
        ),
        ("bad host:9000", "nor a host name and port"),
        ("localhost:0", "nor a host name and port"),
        ("localhost", "nor a host name and port"),
    ] {
        let issues = parse(&format!("[[backends]]\naddr = \"{addr}\"\n")).unwrap_err();
        assert!(
            issues
                .iter()
                .any(|i| i.contains("proxy.backends[0].addr") && i.contains(why)),
            "{addr}: {issues:?}"
        );
    }
}

#[test]
fn an_address_may_be_in_several_pools_of_disjoint_types() {
    let entry = |types: &str, extra: &str| {
        format!("[[backends]]\naddr = \"127.0.0.1:9000\"\nrequest_types = [{types}]\n{extra}")
    };
    let two = |first: String, second: String| parse(&format!("{first}{second}"));
    let cfg = two(
        entry("\"a\"", "weight = 3\n"),
        entry("\"b\", \"c\"", "weight = 1\nbackup = true\n"),
    )
    .unwrap();
    assert_eq!(cfg.backends.len(), 2);
    assert_eq!(
        cfg.timeouts.checks.len(),
        1,
        "one server, one check: {:?}",
        cfg.timeouts.checks
    );
    let refused = |first: String, second: String, key: &str| {
        let errs = two(first, second).unwrap_err();
        assert!(errs.len() == 1 && errs[0].contains(key), "{errs:#?}");
    };
    // A type in both pools, or a pool of every type, would make the entries compete.
    refused(entry("\"a\"", ""), entry("\"b\", \"a\"", ""), "backends[1].addr");
    refused(entry("\"a\"", ""), entry("", ""), "backends[1].addr");
    // Every earlier entry counts, not only the first: the third overlaps the second.
    let third = parse(&format!(
        "{}{}{}",
        entry("\"a\"", ""),
        entry("\"b\"", ""),
        entry("\"b\"", "")
    ))
    .unwrap_err();
    assert!(
        third.len() == 1 && third[0].contains("backends[2].addr") && third[0].contains("backends[1]"),
        "{third:#?}"
    );
    // One server: one limit and one health check.
    refused(
        entry("\"a\"", ""),
        entry("\"b\"", "max_connections = 5\n"),
        "backends[1].max_connections",
    );
    refused(
        entry("\"a\"", ""),
        entry("\"b\"", "check = false\n"),
        "backends[1].check",
    );
    refused(
        entry("\"a\"", ""),
        entry("\"b\"", "check_http_path = \"/readyz\"\n"),
        "backends[1].check",
    );
}

#[test]
fn idle_and_fin_timeouts_are_the_proxys_unless_a_listener_has_its_own() {
    let listener = |name: &str, own: &str| {
        format!(
            "[[listeners]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{}\"\n{own}",
            7100 + name.len()
        )
    };
    let timeouts = |cfg: &ProxyConfig| -> Vec<(Option<Duration>, Option<Duration>)> {
        cfg.listeners.iter().map(|l| (l.idle, l.fin)).collect()
    };
    let ms = |n: u64| Some(Duration::from_millis(n));
    // By default: five minutes idle, and a half-closed connection keeps it.
    assert_eq!(
        timeouts(&parse(&listener("a", "")).unwrap()),
        [(ms(300_000), None)]
    );
    let cfg = parse(&format!(
        "idle_timeout_ms = 60000\nfin_timeout_ms = 1500\n{}{}{}",
        listener("a", ""),
        listener("bb", "idle_timeout_ms = 3600000\n"),
        listener("ccc", "idle_timeout_ms = 0\nfin_timeout_ms = 0\n"),
    ))
    .unwrap();
    assert_eq!(
        timeouts(&cfg),
        [(ms(60_000), ms(1500)), (ms(3_600_000), ms(1500)), (None, None)]
    );
    for bad in [
        "fin_timeout_ms = 86400001\n".to_string(),
        listener("a", "idle_timeout_ms = 86400001\n"),
    ] {
        let errs = parse(&bad).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("timeout_ms"),
            "{bad}: {errs:#?}"
        );
    }
}

#[test]
fn slow_start_is_off_by_default_and_at_most_5_minutes() {
    assert_eq!(parse("").unwrap().timeouts.slow_start, None);
    let t = parse("slow_start_ms = 30000\n").unwrap().timeouts;
    assert_eq!(t.slow_start, Some(Duration::from_secs(30)));
    let errs = parse("slow_start_ms = 300001\n").unwrap_err();
    assert!(errs.len() == 1 && errs[0].contains("slow_start_ms"), "{errs:#?}");
}

#[test]
fn the_queue_is_off_by_default_and_at_most_a_minute() {
    assert_eq!(parse("").unwrap().timeouts.queue, None);
    let t = parse("queue_timeout_ms = 250\n").unwrap().timeouts;
    assert_eq!(t.queue, Some(Duration::from_millis(250)));
    let errs = parse("queue_timeout_ms = 60001\n").unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("queue_timeout_ms"),
        "{errs:#?}"
    );
    let errs = parse("[[backends]]\naddr = \"127.0.0.1:1\"\nmax_connections = 10000001\n").unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("max_connections"),
        "{errs:#?}"
    );
}

#[test]
fn a_per_client_limit_is_off_at_0_and_bounded() {
    let l =
        |n: u64| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\nmax_connections_per_client = {n}\n");
    assert_eq!(
        parse(&l(0)).unwrap().listeners[0].max_connections_per_client,
        None
    );
    assert_eq!(
        parse(&l(5)).unwrap().listeners[0].max_connections_per_client,
        Some(5)
    );
    let errs = parse(&l(2_000_000)).unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("max_connections_per_client"),
        "{errs:#?}"
    );
}

#[test]
fn an_http_check_path_is_a_plain_absolute_path() {
    let backend = "[[backends]]\naddr = \"127.0.0.1:9001\"\n";
    let probe = |cfg: &ProxyConfig| cfg.timeouts.checks[0].1.probe.clone();
    let cfg = parse(&format!("check_http_path = \"/readyz\"\n{backend}")).unwrap();
    assert_eq!(probe(&cfg), Probe::Http("/readyz".into()));
    assert_eq!(probe(&parse(backend).unwrap()), Probe::Connect);
    for bad in ["readyz", "/a b", "/a\\r\\nHost: x"] {
        let errs = parse(&format!("check_http_path = \"{bad}\"\n")).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("check_http_path"),
            "{bad}: {errs:#?}"
        );
        let errs = parse(&format!("{backend}check_http_path = \"{bad}\"\n")).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("proxy.backends[0].check_http_path"),
            "{bad}: {errs:#?}"
        );
    }
}

#[test]
fn every_problem_is_reported() {
    let errs = parse(
        r#"
        runtime = "fibers"
        forwarding = "magic"
        connect_timeout_ms = 0
        busy_poll_us = 1001
        [[listeners]]
        listen = "nope"
        request_type = "bad type"
        [[backends]]
        addr = "127.0.0.1:1"
        [[backends]]
        addr = "127.0.0.1:1"
        request_types = [""]
        "#,
    )
    .unwrap_err();
    assert_eq!(errs.len(), 8, "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("proxy.busy_poll_us")), "{errs:#?}");
}

/// A message about two entries of one address names the earlier entry by its index in `proxy.backends`,
/// though an entry before it stands for no backend (it does not resolve) or for several (a host name).
#[test]
fn a_clash_between_entries_names_the_earlier_entry() {
    let errs = parse(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[listeners]]
        listen = "127.0.0.1:7101"
        request_type = "order"
        [[backends]]
        addr = "not an address"
        [[backends]]
        addr = "127.0.0.1:8002"
        request_types = ["browse"]
        max_connections = 5
        [[backends]]
        addr = "127.0.0.1:8002"
        request_types = ["order"]
        max_connections = 6
        "#,
    )
    .unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[1].contains("6 differs from proxy.backends[1] of the same address"),
        "{errs:#?}"
    );
}

/// A backend at port 0 (refused at every connect) or at 0.0.0.0 or :: (this host, where HAProxy would take
/// the client's own destination) is a mistake, reported with its key.
#[test]
fn a_backend_needs_a_port_and_an_address_to_connect_to() {
    let backend =
        |addr: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\n[[backends]]\naddr = \"{addr}\"\n");
    for bad in ["127.0.0.1:0", "0.0.0.0:8001", "[::]:8001", "localhost:0"] {
        let errs = parse(&backend(bad)).unwrap_err();
        assert_eq!(errs.len(), 1, "{bad}: {errs:#?}");
        assert!(errs[0].contains("proxy.backends[0].addr"), "{bad}: {errs:#?}");
    }
    for good in ["127.0.0.1:8001", "[::1]:8001", "localhost:8001"] {
        assert!(parse(&backend(good)).is_ok(), "{good}");
    }
}

#[test]
fn io_uring_takes_splice_and_refuses_odd_buffer_counts() {
    let errs =
        parse("runtime = \"io_uring\"\nforwarding = \"splice\"\nio_uring_buffers = 300\n").unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].contains("power of two"), "{errs:#?}");
    let cfg = parse("runtime = \"io_uring\"\nforwarding = \"splice\"\nio_uring_buffers = 16\n").unwrap();
    assert_eq!(
        (cfg.runtime, cfg.forwarding, cfg.io_uring_buffers),
        (RuntimeMode::IoUring, Forwarding::Splice, 16)
    );
}

#[test]
fn listener_name_defaults_to_request_type() {
    let cfg = parse(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        request_type = "browse"
        proxy_protocol = true
        "#,
    )
    .unwrap();
    assert_eq!(cfg.listeners[0].name, "browse");
    assert!(cfg.listeners[0].proxy_protocol);
}

#[test]
fn checks_send_a_proxy_header_to_backends_a_proxy_protocol_listener_routes_to() {
    let cfg = parse(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        request_type = "browse"
        proxy_protocol = true
        [[listeners]]
        listen = "127.0.0.1:7101"
        request_type = "order"
        [[backends]]
        addr = "127.0.0.1:9001"
        request_types = ["browse"]
        [[backends]]
        addr = "127.0.0.1:9002"
        request_types = ["order"]
        [[backends]]
        addr = "127.0.0.1:9003"
        "#,
    )
    .unwrap();
    let headers: Vec<(u16, bool)> = cfg
        .timeouts
        .checks
        .iter()
        .map(|(a, c)| (a.port(), c.proxy_header))
        .collect();
    assert_eq!(headers, [(9001, true), (9002, false), (9003, true)]);
}

#[test]
fn a_check_port_moves_the_check_to_a_side_port_without_a_proxy_header() {
    let cfg = parse(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        proxy_protocol = true
        [[backends]]
        addr = "127.0.0.1:5432"
        check_port = 8008
        [[backends]]
        addr = "127.0.0.1:5433"
        "#,
    )
    .unwrap();
    let checks: Vec<(u16, u16, bool)> = (cfg.timeouts.checks.iter())
        .map(|(a, c)| (a.port(), c.target.port(), c.proxy_header))
        .collect();
    assert_eq!(checks, [(5432, 8008, false), (5433, 5433, true)]);
    let errs = parse("[[backends]]\naddr = \"127.0.0.1:1\"\ncheck_port = 0\n").unwrap_err();
    assert!(errs.len() == 1 && errs[0].contains("check_port"), "{errs:#?}");
}

#[test]
fn a_backend_may_have_its_own_check_or_none() {
    let cfg = parse(
        r#"
        check_http_path = "/readyz"
        [[backends]]
        addr = "127.0.0.1:9001"
        [[backends]]
        addr = "127.0.0.1:9002"
        check_http_path = ""
        [[backends]]
        addr = "127.0.0.1:9003"
        check_http_path = "/health"
        [[backends]]
        addr = "127.0.0.1:9004"
        check = false
        "#,
    )
    .unwrap();
    let probes: Vec<(u16, &Probe)> = cfg
        .timeouts
        .checks
        .iter()
        .map(|(a, c)| (a.port(), &c.probe))
        .collect();
    let http = |p: &str| Probe::Http(p.into());
    assert_eq!(
        probes,
        [
            (9001, &http("/readyz")),
            (9002, &Probe::Connect),
            (9003, &http("/health"))
        ],
        "9004 is not checked"
    );
}

#[test]
fn a_send_expect_check_needs_its_expect_and_is_its_own() {
    let cfg = parse(
        r#"
        check_send = "PING\r\n"
        check_expect = "+PONG"
        [[backends]]
        addr = "127.0.0.1:9001"
        [[backends]]
        addr = "127.0.0.1:9002"
        check_expect = "220 "
        [[backends]]
        addr = "127.0.0.1:9003"
        check_http_path = "/readyz"
        "#,
    )
    .unwrap();
    let probes: Vec<&Probe> = cfg.timeouts.checks.iter().map(|(_, c)| &c.probe).collect();
    let expect = |send: &[u8], expect: &[u8]| Probe::Expect {
        send: send.to_vec(),
        expect: expect.to_vec(),
    };
    // A backend's own keys replace the [proxy] ones whole: 9002 sends nothing, 9003 is HTTP alone.
    assert_eq!(
        probes,
        [
            &expect(b"PING\r\n", b"+PONG"),
            &expect(b"", b"220 "),
            &Probe::Http("/readyz".into())
        ]
    );
    for (bad, key) in [
        ("check_send = \"PING\"\n", "proxy.check_send"),
        (
            "check_expect = \"+PONG\"\ncheck_http_path = \"/readyz\"\n",
            "proxy.check_expect",
        ),
        (
            "[[backends]]\naddr = \"127.0.0.1:9001\"\ncheck_send = \"x\"\n",
            "proxy.backends[0].check_send",
        ),
    ] {
        let errs = parse(bad).unwrap_err();
        assert!(errs.len() == 1 && errs[0].contains(key), "{bad}: {errs:#?}");
    }
    let long = "x".repeat(1025);
    let errs = parse(&format!("check_expect = \"{long}\"\n")).unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("proxy.check_expect"),
        "{errs:#?}"
    );
}

#[test]
fn allow_and_deny_entries_are_checked_one_by_one() {
    let listener = |rules: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\n{rules}\n");
    let cfg = parse(&listener(
        "allow = [\"10.0.0.0/8\", \"::1\"]\ndeny = [\"10.6.0.0/16\"]",
    ))
    .unwrap();
    let acl = &cfg.listeners[0].acl;
    assert_eq!((acl.allow.len(), acl.deny.len()), (2, 1));
    assert!(acl.admits("10.1.1.1".parse().unwrap()) && !acl.admits("10.6.1.1".parse().unwrap()));
    let errs = parse(&listener(
        "allow = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\ndeny = [\"nowhere\"]",
    ))
    .unwrap_err();
    assert!(
        errs.len() == 2
            && errs[0].contains("proxy.listeners[0].allow[1]")
            && errs[0].contains("below its /8 prefix")
            && errs[1].contains("proxy.listeners[0].deny[0]"),
        "{errs:#?}"
    );
}

#[test]
fn a_connection_rate_is_off_by_default_and_its_period_bounded() {
    let listener = |keys: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\n{keys}\n");
    assert_eq!(parse(&listener("")).unwrap().listeners[0].connection_rate, None);
    let cfg = parse(&listener("max_connection_rate_per_client = 20")).unwrap();
    let want = Rate {
        count: 20,
        period: Duration::from_secs(10),
    };
    assert_eq!(cfg.listeners[0].connection_rate, Some(want));
    let errs = parse(&listener(
        "max_connection_rate_per_client = 5\nconnection_rate_period_ms = 500",
    ))
    .unwrap_err();
    assert!(
        errs.len() == 1 && errs[0].contains("proxy.listeners[0].connection_rate_period_ms"),
        "{errs:#?}"
    );
}

/// Keepalive is whole seconds within the kernel's bound (1..=32767 s) or off: a value past it was accepted
/// and then failed every listener's bind with a bare "Invalid argument".
#[test]
fn keepalive_is_whole_seconds_the_kernel_takes() {
    let k = |ms: u64| format!("keepalive_ms = {ms}\n[[listeners]]\nlisten = \"127.0.0.1:7100\"\n");
    for ok in [0, 1_000, 60_000, 32_767_000] {
        assert!(parse(&k(ok)).is_ok(), "{ok}");
    }
    for bad in [500, 1_500, 32_768_000, 86_400_000] {
        let errs = parse(&k(bad)).unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("keepalive_ms")),
            "{bad}: {errs:#?}"
        );
    }
}
