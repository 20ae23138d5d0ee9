//! `xcluster`: the one binary. Parses arguments and hands off; every role lives in its own library crate.

mod addrs;
mod args;
mod check;
mod ctl;
mod detach;
mod load;
mod role;

use clap::Parser;
use xcluster_runtime::RoleConfig;

/// A command that prints and exits ends quietly when its reader goes away (`xcluster ctl cluster | head`), as
/// Unix tools do: Rust ignores SIGPIPE, which turns the next print into a panic. Daemons keep ignoring it, so
/// a peer that closes a socket or a pipe never kills them.
pub fn quiet_on_closed_output() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restores the default disposition, with no handler to run; called before any thread starts.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// `xcluster up`: the monitor on the cluster file, with a line saying where its dashboard is.
fn up(a: args::UpArgs) -> i32 {
    let (detach, detached) = (a.detach && !a.print_config, a.detached);
    let up_args = detach.then(|| a.clone());
    let args = a.into_role_args();
    if let Some(path) = args.config.as_ref().filter(|p| !p.exists()) {
        // The default is relative: run from anywhere else, the monitor only said it could not read it. A
        // file named with --config is just not there.
        if path == std::path::Path::new(args::DEFAULT_CLUSTER_FILE) {
            eprintln!(
                "xcluster up: {} not found: run it from the directory that holds configs/ (the repository's \
                 root), or name a cluster file with --config",
                path.display()
            );
        } else {
            eprintln!("xcluster up: {} not found", path.display());
        }
        return xcluster_runtime::config::ConfigError::EXIT_CODE;
    }
    if !args.print_config {
        let source = xcluster_runtime::config::ConfigSource {
            path: args.config.clone(),
            overrides: args.set.clone(),
            use_env: true,
        };
        // Not while another process has the port or another monitor the run directory: this one is about to
        // fail on it, and said "dashboard at" first. Both are let go at once; the monitor takes them for good.
        let loaded = xcluster_runtime::config::load::<xcluster_monitor::Config>(&source);
        let free = |l: &xcluster_runtime::config::Loaded<xcluster_monitor::Config>| {
            // As the monitor binds it (SO_REUSEADDR: a port with connections left in TIME_WAIT is free).
            xcluster_runtime::net::bind_std(&xcluster_runtime::net::ListenOptions::new(l.config.listen))
                .is_ok()
                && xcluster_monitor::statefile::RunDir::acquire(&l.config.run_dir).is_ok()
        };
        match (loaded.ok().filter(free), up_args) {
            (Some(l), Some(up)) => {
                return detach::detach(
                    &up,
                    l.config.listen,
                    &l.config.run_dir,
                    !l.config.token.is_empty(),
                    l.config.shutdown,
                );
            }
            (Some(l), None) if !detached => println!(
                "xcluster up: dashboard at http://{}/ ; Ctrl-C stops every program",
                l.config.listen
            ),
            // Not free, or not loaded: the monitor, in the foreground, says why.
            _ => {}
        }
    }
    role::run::<xcluster_monitor::Config, _, _, _>("up", args, xcluster_monitor::run)
}

fn main() {
    let cli = args::Cli::parse();
    let code = match cli.command {
        args::Command::Lb(a) => {
            role::run::<xcluster_lb::Config, _, _, _>(xcluster_lb::Config::ROLE, a, xcluster_lb::run)
        }
        args::Command::Agent(a) => {
            role::run::<xcluster_agent::Config, _, _, _>(xcluster_agent::Config::ROLE, a, xcluster_agent::run)
        }
        args::Command::Monitor(a) => role::run::<xcluster_monitor::Config, _, _, _>(
            xcluster_monitor::Config::ROLE,
            a,
            xcluster_monitor::run,
        ),
        args::Command::App(a) => {
            role::run::<xcluster_app::Config, _, _, _>(xcluster_app::Config::ROLE, a, xcluster_app::run)
        }
        args::Command::Up(a) => up(a),
        args::Command::Ctl(a) => {
            quiet_on_closed_output();
            ctl::run(a)
        }
        args::Command::Load(a) => load::run(a),
        args::Command::CheckConfig(a) => {
            quiet_on_closed_output();
            check::run(&a.files)
        }
        args::Command::BuyerToken(a) => {
            // Printed as `ctl` prints: `xcluster buyer-token ... | head -c0` panicked on the closed pipe.
            quiet_on_closed_output();
            check::buyer_token(&a)
        }
    };
    // `exit` runs no destructors: the log lines still queued are written first.
    xcluster_runtime::logwriter::flush(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
