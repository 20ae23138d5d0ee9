//! `xcluster up` runs the local cluster of `configs/local.toml` (two balancers, three apps, one agent) under
//! the monitor, in dependency order, prints where the dashboard is, and leaves nothing behind on SIGINT.
//! Ports come from a free block (the file's fixed ports are overridden), so it runs beside other tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::time::Duration;

use monitor_common::*;
use xcluster_tests::*;

/// A base port such that `base..base+n` are all free right now. Taken below the ephemeral range, where the
/// client ends of other tests' connections (TIME_WAIT) do not crowd the ports.
fn free_block(n: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    for i in 0..200u32 {
        let base = 20_000 + ((seed / 7 + i * 997 + std::process::id()) % 12_000) as u16;
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no block of {n} free ports");
}

/// `configs/local/NAME` with each fixed port replaced by the test's own.
fn local_with_ports(name: &str, ports: &[(u16, u16)]) -> String {
    let mut text = std::fs::read_to_string(workspace_root().join("configs/local").join(name)).unwrap();
    for (from, to) in ports {
        text = text.replace(&format!("127.0.0.1:{from}\""), &format!("127.0.0.1:{to}\""));
    }
    text
}

fn role_config(dir: &tempfile::TempDir, role: &str, text: &str) -> String {
    write_file(dir.path(), &format!("{role}.toml"), text)
        .display()
        .to_string()
}

#[test]
fn up_starts_the_local_cluster_in_order_and_sigint_stops_everything() {
    let base = free_block(7);
    let (lb, app, agent, mon) = (base, base + 2, base + 5, base + 6);
    let run = tempfile::tempdir().unwrap();
    let config = workspace_root().join("configs/local.toml");
    // The roles' own configs as in configs/local/, but on this test's free ports and temp dir.
    let proxy = free_addr();
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let lb_ports = [
        (7000, lb),
        (7001, lb + 1),
        (7400, proxy.port()),
        (7401, p1),
        (7402, p2),
        (7403, p3),
    ];
    let lb_file = role_config(&run, "lb", &local_with_ports("lb.toml", &lb_ports));
    let app_file = role_config(
        &run,
        "app",
        &format!("role = \"app\"\ndb_path = \"{}/xbuy.db\"\n", run.path().display()),
    );
    let agent_file = role_config(
        &run,
        "agent",
        &local_with_ports(
            "agent.toml",
            &[
                (7000, lb),
                (7001, lb + 1),
                (7101, app),
                (7102, app + 1),
                (7103, app + 2),
            ],
        ),
    );
    let sets = [
        format!("programs.lb.command={{self}} lb --config {lb_file} --set listen=127.0.0.1:{{port}}"),
        format!("programs.app.command={{self}} app --config {app_file} --set listen=127.0.0.1:{{port}}"),
        format!(
            "programs.agent.command={{self}} agent --config {agent_file} --set listen=127.0.0.1:{{port}}"
        ),
        format!("listen=127.0.0.1:{mon}"),
        format!("run_dir={}", run.path().display()),
        format!("programs.lb.port_base={lb}"),
        format!("programs.app.port_base={app}"),
        format!("programs.agent.port_base={agent}"),
        format!("cluster.balancers=[\"127.0.0.1:{lb}\", \"127.0.0.1:{}\"]", lb + 1),
    ];
    let mut args = vec!["up".to_string(), "--config".into(), config.display().to_string()];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Proc::xcluster("up", &args);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{mon}").parse().unwrap();
    // Ready means *this* monitor answers (not another test's process on a port of the block).
    let pid = u64::from(up.pid());
    eventually(Duration::from_secs(15), "xcluster up's monitor to answer", || {
        get(addr, "/readyz").ok().filter(|r| r.status == 200)?;
        let r = get(addr, "/v1/status").ok().filter(|r| r.status == 200)?;
        (r.json()["monitor"]["pid"].as_u64() == Some(pid)).then_some(())
    });
    assert!(
        up.stdout().contains(&format!("dashboard at http://{addr}/")),
        "{}",
        up.stdout()
    );

    let m = Mon {
        proc: Proc::spawn("noop", std::path::Path::new("true"), Spawn::default()),
        addr,
        dir: std::sync::Arc::new(tempfile::tempdir().unwrap()),
        config,
    };
    let names = ["lb-0", "lb-1", "app-0", "app-1", "app-2", "agent"];
    for n in names {
        eventually(Duration::from_secs(15), &format!("{n} running and ready"), || {
            let p = m.prog(n);
            (p["state"] == "RUNNING" && p["ready"] == true).then_some(())
        });
    }
    for (i, port) in [lb, lb + 1, app, app + 1, app + 2, agent].iter().enumerate() {
        let r = get(format!("127.0.0.1:{port}").parse().unwrap(), "/readyz").unwrap();
        assert_eq!(r.status, 200, "{} on {port}", names[i]);
    }
    // The agent waited for every balancer and app to be ready.
    let events = m.events();
    let seq_of = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .filter(|e| pred(e))
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let agent_start =
        seq_of(&|e| e["kind"] == "state" && e["program"] == "agent" && e["to"] == "STARTING")[0];
    for n in ["lb-0", "lb-1", "app-0", "app-1", "app-2"] {
        let ready = seq_of(&|e| e["kind"] == "probe" && e["program"] == n && e["ok"] == true);
        assert!(
            !ready.is_empty() && ready[0] < agent_start,
            "{n} ready before the agent started: {events:?}"
        );
    }
    // The cluster works as one: the agent's reports reach both balancers, which list all three apps, and
    // the balancers' shared L4 listener forwards to an app picked by those weights.
    for b in [lb, lb + 1] {
        let b: std::net::SocketAddr = format!("127.0.0.1:{b}").parse().unwrap();
        eventually(
            Duration::from_secs(15),
            &format!("balancer {b} to list three apps"),
            || {
                let r = get(b, "/v1/servers?type=browse")
                    .ok()
                    .filter(|r| r.status == 200)?;
                (r.json()["servers"].as_array()?.len() == 3).then_some(())
            },
        );
    }
    eventually(
        Duration::from_secs(15),
        "a browse request through the L4 proxy",
        || {
            let r = get(proxy, "/v1/products?limit=1").ok()?;
            (r.status == 200).then_some(())
        },
    );
    let pids: Vec<i32> = names.iter().map(|n| m.pid(n).unwrap()).collect();

    up.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(up.wait_exit(Duration::from_secs(15)), Some(0), "{}", up.stderr());
    for p in pids {
        assert!(!alive(p), "pid {p} left behind");
    }
    assert!(
        tagged_pids(&format!("XCLUSTER_TEST_TAG={}", up.tag())).is_empty(),
        "descendants left behind"
    );
}
