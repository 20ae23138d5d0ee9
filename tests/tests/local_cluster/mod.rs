//! The local cluster of `configs/local.toml` (`xcluster up`: a monitor supervising two balancers, three apps
//! and an agent) started by a test on free ports in a temp dir, with the roles' own configs from
//! `configs/local/` rewritten to those ports. Shared by `monitor_up` and `chaos`; needs `monitor_common`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::monitor_common::Mon;
use xcluster_tests::*;

/// Every program of the local cluster, as the monitor names them.
pub const PROGRAMS: [&str; 6] = ["lb-0", "lb-1", "app-0", "app-1", "app-2", "agent"];

/// `configs/local/NAME` with each fixed port replaced by the test's own.
pub fn local_with_ports(name: &str, ports: &[(u16, u16)]) -> String {
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

/// A running local cluster. Dropping it stops the monitor and everything it ran.
#[derive(Debug)]
pub struct LocalCluster {
    /// The current `xcluster up` process.
    pub up: Proc,
    /// Earlier `xcluster up` processes (killed): kept until the end, because dropping one kills every
    /// process carrying its test tag — including programs the next monitor adopted.
    pub earlier: Vec<Proc>,
    /// Accessors over the monitor's API.
    pub mon: Mon,
    pub run: std::sync::Arc<tempfile::TempDir>,
    pub balancers: [SocketAddr; 2],
    pub apps: [SocketAddr; 3],
    pub agent: SocketAddr,
    pub proxy: SocketAddr,
    /// Its `xcluster up` arguments.
    pub args: Vec<String>,
}

impl LocalCluster {
    /// Starts `xcluster up` and waits until its monitor answers (not until the programs are up).
    pub fn start() -> LocalCluster {
        // Reserved as `free_port` reserves its ports, so that neither the ports below nor another test's land in
        // the block.
        let base = free_port_block(7);
        let (lb, app, agent, mon) = (base, base + 2, base + 5, base + 6);
        let run = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let config = workspace_root().join("configs/local.toml");
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
            // Each balancer's state file in the run directory, as configs/local.toml gives it.
            format!(
                "programs.lb.command={{self}} lb --config {lb_file} --set listen=127.0.0.1:{{port}} \
                 --set directory.state_file={}/{{name}}.state.json",
                run.path().display()
            ),
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
        let addr: SocketAddr = format!("127.0.0.1:{mon}").parse().unwrap();
        let up = Self::launch(&args, addr);
        let at = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
        LocalCluster {
            up,
            earlier: Vec::new(),
            mon: Mon {
                proc: Proc::spawn("noop", std::path::Path::new("true"), Spawn::default()),
                addr,
                dir: run.clone(),
                config,
            },
            run,
            balancers: [at(lb), at(lb + 1)],
            apps: [at(app), at(app + 1), at(app + 2)],
            agent: at(agent),
            proxy,
            args,
        }
    }

    /// Starts `xcluster up ARGS` and waits until *its* monitor answers (not another test's process on a port
    /// of the block).
    fn launch(args: &[String], addr: SocketAddr) -> Proc {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let up = Proc::xcluster("up", &argv);
        let pid = u64::from(up.pid());
        eventually(Duration::from_secs(15), "xcluster up's monitor to answer", || {
            get(addr, "/readyz").ok().filter(|r| r.status == 200)?;
            let r = get(addr, "/v1/status").ok().filter(|r| r.status == 200)?;
            (r.json()["monitor"]["pid"].as_u64() == Some(pid)).then_some(())
        });
        up
    }

    /// Waits until every program is RUNNING and ready, and both balancers list all three apps.
    pub fn wait_serving(&self, timeout: Duration) {
        for n in PROGRAMS {
            eventually(timeout, &format!("{n} running and ready"), || {
                let p = self.mon.prog(n);
                (p["state"] == "RUNNING" && p["ready"] == true).then_some(())
            });
        }
        for b in self.balancers {
            eventually(timeout, &format!("balancer {b} to list three apps"), || {
                let r = get(b, "/v1/servers?type=browse")
                    .ok()
                    .filter(|r| r.status == 200)?;
                (r.json()["servers"].as_array()?.len() == 3).then_some(())
            });
        }
    }

    /// `kill -9` of the monitor, then `xcluster up` again with the same arguments; returns when the new
    /// monitor answers.
    pub fn kill_and_restart_monitor(&mut self) {
        self.up.signal(nix::sys::signal::Signal::SIGKILL);
        assert!(
            self.up.wait_exit(Duration::from_secs(10)).is_some(),
            "the monitor survived kill -9"
        );
        let next = Self::launch(&self.args, self.mon.addr);
        self.earlier.push(std::mem::replace(&mut self.up, next));
    }

    /// The address a program serves on.
    pub fn addr_of(&self, program: &str) -> SocketAddr {
        match program {
            "lb-0" => self.balancers[0],
            "lb-1" => self.balancers[1],
            "app-0" => self.apps[0],
            "app-1" => self.apps[1],
            "app-2" => self.apps[2],
            "agent" => self.agent,
            other => panic!("no program {other}"),
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // The current monitor first (it stops its programs politely), then the earlier ones' leftovers.
        let up = std::mem::replace(
            &mut self.up,
            Proc::spawn("noop", std::path::Path::new("true"), Spawn::default()),
        );
        drop(up);
        self.earlier.clear();
    }
}
