//! Command-line arguments of every subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "xcluster",
    version,
    about = "XCluster: load-aware active-active balancing, supervision and a commerce core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a balancer: the load-aware directory and the layer-4 proxy.
    Lb(RoleArgs),
    /// Run a host agent: sample load and push signed reports to the balancers.
    Agent(RoleArgs),
    /// Run the monitor: supervise this host's programs, serve the control API and dashboard.
    Monitor(RoleArgs),
    /// Run an XBuy app instance (the commerce core).
    App(RoleArgs),
    /// Run the whole local cluster: a monitor supervising balancers, an agent and app instances.
    Up(UpArgs),
    /// Control a running monitor (supervisorctl-like).
    Ctl(CtlArgs),
    /// Generate load against the cluster through the SDK, a proxy or plain round robin.
    Load(LoadArgs),
    /// Validate config files of any role (like `nginx -t`); exits 64 if any is invalid.
    CheckConfig(CheckArgs),
    /// Print a buyer token for XBuy's `buyer_key_file`: what a shop's login service hands a buyer who
    /// signed in (for scripts and tests; a service signs its own the same way).
    BuyerToken(BuyerTokenArgs),
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where `xcluster ctl` finds the monitor unless told: `configs/local.toml`'s (and the monitor's default) API.
pub const DEFAULT_MONITOR_URL: &str = "http://127.0.0.1:7300";

/// Flags every daemon role takes.
#[derive(Debug, Args)]
pub struct RoleArgs {
    /// Config file (TOML). Without it the role runs on its defaults.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set listen=127.0.0.1:7005` (repeatable; applied after the file and the
    /// XCLUSTER_<ROLE>__KEY environment variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The cluster file `xcluster up` runs unless `--config` names another: relative, as the README runs it from
/// the repository's root.
pub const DEFAULT_CLUSTER_FILE: &str = "configs/local.toml";

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// The cluster description the monitor runs.
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CLUSTER_FILE)]
    pub config: PathBuf,
    /// Override a config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Run in the background, as Supervisord does by default: returns once the monitor is ready, its log
    /// in `<run_dir>/monitor.log` (`xcluster ctl maintail`); `xcluster ctl shutdown` stops it.
    #[arg(short, long)]
    pub detach: bool,
    /// Set on the process `--detach` starts: it says nothing on stdout, where the parent has spoken.
    #[arg(long, hide = true)]
    pub detached: bool,
}

impl UpArgs {
    pub fn into_role_args(self) -> RoleArgs {
        RoleArgs {
            config: Some(self.config),
            set: self.set,
            print_config: self.print_config,
            log_format: self.log_format,
        }
    }
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    // `global`: an option may come before or after the verb (`ctl stop --no-wait app`), as users type it.
    /// The monitor's API.
    #[arg(
        long,
        global = true,
        env = "XCLUSTER_MONITOR_URL",
        default_value = DEFAULT_MONITOR_URL
    )]
    pub url: String,
    /// Bearer token for mutating calls.
    #[arg(long, global = true, env = "XCLUSTER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the monitor to answer.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Return as soon as the monitor has taken a start, stop, restart or shutdown, instead of waiting for the
    /// program to be running and ready (or stopped; for a shutdown, the monitor gone).
    #[arg(long, global = true)]
    pub no_wait: bool,
    /// Longest a start, stop, restart or shutdown waits for its programs before it fails (1 to 3600).
    // Checked here, before anything is sent: an out-of-range value used to fail only after the monitor had
    // acted (0: an instant "still STOPPING"; u64::MAX: a panic adding it to the clock). The bound is the
    // monitor's own for a roll's wait.
    #[arg(
        long,
        global = true,
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=xcluster_monitor::roll::MAX_WAIT_SECS)
    )]
    pub wait_secs: u64,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// Show programs (all, one, or a group with `group:*`).
    Status { names: Vec<String> },
    // The verbs that act on programs need a name (a name, `group:*`, or `all`): a usage error, exit 2 as for
    // any other missing argument (as supervisorctl's `start` without one), not a refused action.
    /// Start programs.
    Start {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop programs.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Restart programs.
    Restart {
        #[arg(required = true)]
        names: Vec<String>,
        /// One at a time: each program is restarted only once the one before runs and is ready again, so
        /// a group never has more than one down; stops at the first that does not come back (or is not
        /// ready within --wait-secs). The monitor drives it: an interrupted ctl leaves it going.
        #[arg(long)]
        rolling: bool,
    },
    /// Send a signal (e.g. HUP to reload a program's config) to programs.
    Signal {
        /// By name (`HUP`, `SIGHUP`, `hup`) or number; checked here, so a misspelt one is a usage error (2)
        /// before anything is asked.
        #[arg(value_parser = signal_name)]
        signal: String,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The monitor's pid, or with names each program's pid, one per line (0: no process; exit 3 then).
    Pid { names: Vec<String> },
    /// Empty programs' log files (stdout and stderr) and remove their rotated backups.
    Clear {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The monitor's version.
    Version,
    /// Show the tail of a program's log.
    Tail {
        name: String,
        /// Which stream, as supervisorctl's `tail NAME stderr` (the same as --stream).
        #[arg(value_parser = ["stdout", "stderr"], conflicts_with = "stream")]
        channel: Option<String>,
        /// Keep following the log.
        #[arg(short, long)]
        follow: bool,
        /// Which stream.
        #[arg(long, default_value = "stdout", value_parser = ["stdout", "stderr"])]
        stream: String,
        /// Bytes to show.
        #[arg(long, default_value_t = 1600)]
        bytes: u64,
    },
    /// Show the tail of the monitor's own log (supervisorctl's `maintail`): its file when the monitor runs
    /// detached (`xcluster up --detach` writes `<run_dir>/monitor.log`).
    Maintail {
        /// Keep following the log.
        #[arg(short, long)]
        follow: bool,
        /// Bytes to show.
        #[arg(long, default_value_t = 1600)]
        bytes: u64,
    },
    /// Show each balancer the monitor watches: its instances (load, weight per type) and its L4 proxy's
    /// listeners and backends.
    Cluster,
    /// Drain instances on every balancer the monitor watches: their directory weight goes to 0, so new
    /// clients and L4 proxy connections go elsewhere, while established ones run on. An L4 proxy backend
    /// of `[[proxy.backends]]` is named by its address (`127.0.0.1:8001`), as HAProxy's `set server state
    /// drain`. Needs the monitor's token (`--token`), which the monitor passes on to every balancer, so they
    /// share it as their `[admin] token` (as `xcluster up` sets them); kept until `undrain`: a balancer that
    /// restarts takes it from its peers.
    Drain {
        /// Instance ids (`host-a/app-1`) or proxy backend addresses (`127.0.0.1:8001`).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Undo `drain` on every balancer the monitor watches.
    Undrain {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Set a server's weight on every balancer the monitor watches, as HAProxy's `set server weight`: `10%`
    /// gives an instance that share of the weight its load gives it (a canary), or a proxy backend that
    /// share of its configured `weight`; a plain number (`7`) replaces a proxy backend's configured weight;
    /// `100%` undoes it. Established connections are not touched. Needs the monitor's token, as `drain`;
    /// kept across reloads and taken by a balancer that restarts from its peers.
    Weight {
        /// `0%` to `1000%`, or for a proxy backend `0` to `1000000`.
        weight: xcluster_proto::directory::WeightSet,
        /// Instance ids (`host-a/app-1`) or proxy backend addresses (`127.0.0.1:8001`).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Show what a reload would change (added / changed / removed programs).
    Reread,
    /// List every program of the running set and of the saved config: in use or only available (in the
    /// file, not yet added by `update`), autostart, priority, and the change `update` would apply.
    Avail,
    /// Apply the reloaded config, touching only what changed. With names (`update web`, `update app:*`),
    /// apply only those programs' changes (supervisorctl's `update GROUP`; `add` and `remove` apply one kind
    /// of change): needs `auto_update = false`, where the other changes stay pending.
    Update {
        /// Programs whose changes to apply (a name, `group:*`, or `all`); none: every change.
        names: Vec<String>,
        /// Restart the changed programs that run one at a time, each only once the one before runs and is
        /// ready with its new settings (as restart --rolling); added and removed programs apply at once.
        #[arg(long)]
        rolling: bool,
    },
    /// Add programs new in the saved config, starting those with `autostart` (supervisorctl's `add`), leaving
    /// every other change pending; refused when none of them is new. Needs `auto_update = false`, as `update
    /// NAME`.
    Add {
        /// Programs to add (a name, `group:*`, or `all`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop and drop programs gone from the saved config (supervisorctl's `remove`), leaving every other
    /// change pending; refused when none of them is gone from the file. Needs `auto_update = false`.
    Remove {
        /// Programs to remove (a name, `group:*`, or `all`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop every program and the monitor; answers once the monitor is gone (its port and run directory
    /// free for the next `up`), within --wait-secs, or at once with --no-wait.
    Shutdown,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Via {
    Sdk,
    Proxy,
    Rr,
}

impl Via {
    /// The targets of `xcluster up`'s local cluster for this mode.
    pub fn default_targets(self) -> &'static str {
        match self {
            Via::Sdk => "127.0.0.1:7000,127.0.0.1:7001",
            Via::Proxy => {
                "browse=127.0.0.1:7400,order=127.0.0.1:7401,seckill=127.0.0.1:7402,pay=127.0.0.1:7403"
            }
            Via::Rr => "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103",
        }
    }
}

impl LoadArgs {
    /// `--targets`, or the mode's default.
    pub fn targets(&self) -> &str {
        self.targets.as_deref().unwrap_or(self.via.default_targets())
    }
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// How requests find a backend: the SDK (targets are balancers), an L4 proxy (target is the proxy), or
    /// plain round robin over fixed backends.
    #[arg(long, value_enum, default_value_t = Via::Sdk)]
    pub via: Via,
    /// Comma-separated `ip:port` or `host:port` (resolved as the SDK resolves balancers): balancers' APIs
    /// (sdk; default 127.0.0.1:7000,127.0.0.1:7001), the proxy's listeners (proxy: `TYPE=ADDR` per request
    /// type, and one plain `ADDR` for the types not named; default `xcluster up`'s, browse=127.0.0.1:7400,
    /// order=:7401, seckill=:7402, pay=:7403), or the backends (rr; default the local apps
    /// 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103).
    #[arg(long)]
    pub targets: Option<String>,
    /// Request mix by ratio, e.g. `browse=70,order=20,seckill=5,pay=5`.
    #[arg(long, default_value = "browse=70,order=20,seckill=5,pay=5")]
    pub mix: String,
    /// Open loop at this many requests per second (latency measured from each request's intended start,
    /// which corrects for coordinated omission).
    #[arg(long, conflicts_with = "workers")]
    pub rate: Option<u32>,
    /// Closed loop with this many workers (the default mode, with 8 workers).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Run for at most this many seconds.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Timeout of one whole request, connect included (through the SDK, retries too: its client deadline).
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Open loop: most requests outstanding at once (later ones wait, and their wait counts as latency).
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also report requests, errors and backend shares (of all requests and of each type) per interval of
    /// this many milliseconds (a timeline; 0 keeps none), to watch the split change during one run.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Write the id of every order the app acknowledged (2xx to `order` or `seckill`) to this file, one per
    /// line, so a check after the run can look each one up. Created before the run: one that cannot be
    /// written exits 64 with nothing sent.
    #[arg(long)]
    pub orders_out: Option<std::path::PathBuf>,
    /// Leave the orders the run placed and did not pay as they are. By default the run cancels them at its
    /// end (at most 65,536 of each kind it keeps: to pay, to settle, flash-sale; in about 10 s at most), so
    /// their stock is not held for the app's `reservation_ttl_ms` (15 minutes) after a test.
    #[arg(long)]
    pub keep_orders: bool,
    /// XBuy's admin token, sent with every request: with `buyer_key_file` set, the app takes buyer calls
    /// only with a buyer token or this one, which acts for any buyer.
    #[arg(long, env = "XCLUSTER_APP_TOKEN", hide_env_values = true)]
    pub app_token: Option<String>,
    /// XBuy's `buyer_key_file`: each buyer call (order, seckill, pay, and the clean-up's cancels) carries a
    /// token for its own buyer, minted here for a minute at a time as a shop's login would, in place of
    /// --app-token (which browsing still carries). A load run then needs no admin token.
    #[arg(long, value_name = "FILE")]
    pub buyer_key_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuyerTokenArgs {
    /// The key file XBuy's `buyer_key_file` names.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// The buyer the token names.
    #[arg(long)]
    pub user: String,
    /// How long the token is good for. XBuy refuses one that lives longer than its
    /// `buyer_token_max_life_secs` (7 days unless set).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=xcluster_app::config::MAX_BUYER_TOKEN_LIFE_SECS))]
    pub ttl_secs: u64,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Config files; each names its role with `role = "..."`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// A signal `ctl signal` can send, as the monitor reads it (`command::parse_signal`).
fn signal_name(s: &str) -> Result<String, String> {
    match xcluster_monitor::command::parse_signal(s) {
        Some(_) => Ok(s.to_string()),
        None => Err(format!(
            "unknown signal {s:?} (a name such as HUP, USR1, TERM, or a number)"
        )),
    }
}
