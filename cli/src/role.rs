//! Runs one daemon role: load and validate config, print it if asked, init telemetry, run until a signal.

use std::future::Future;

use xcluster_runtime::config::{ConfigError, ConfigSource, load};
use xcluster_runtime::telemetry::{self, LogFormat};
use xcluster_runtime::{Context, DaemonConfig};

use crate::args::{self, RoleArgs};

/// Runs role `C` as the command `name` (the role's own, or `up`), the name its errors are said under.
pub fn run<C, E, F, Fut>(name: &str, args: RoleArgs, role: F) -> i32
where
    C: DaemonConfig,
    E: std::fmt::Display,
    F: FnOnce(Context<C>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    ignore_hangups_until_handled();
    let source = ConfigSource {
        path: args.config,
        overrides: args.set,
        use_env: true,
    };
    let loaded = match load::<C>(&source) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("xcluster {name}: {e}");
            return ConfigError::EXIT_CODE;
        }
    };
    if args.print_config {
        crate::quiet_on_closed_output();
        print!("{}", loaded.effective_toml());
        return 0;
    }
    let format = match args.log_format {
        args::LogFormat::Text => LogFormat::Text,
        args::LogFormat::Json => LogFormat::Json,
    };
    telemetry::init(loaded.config.log_filter(), format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("xcluster {name}: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(xcluster_runtime::daemon::run(source, loaded, role));
    // Background tasks (watchers, lingering connections) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

/// SIGHUP asks a running role to reload, once its signal listener is in place; until then its default
/// action ended the process: a `pkill -HUP xcluster` from logrotate while a role started (reading its
/// config, resolving a backend's name) killed it. Ignored until the listener takes it over. (A program the
/// monitor starts never inherits the ignoring: the listener is in place before the first spawn.)
fn ignore_hangups_until_handled() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: sets the disposition to ignore, with no handler to run; called before any thread starts.
    let _ = unsafe { signal(Signal::SIGHUP, SigHandler::SigIgn) };
}
