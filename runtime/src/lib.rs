//! Process plumbing shared by every XCluster role: config loading and hot reload, signals and shutdown,
//! telemetry, the HTTP server with its limits, admin endpoints, and listening sockets. Plumbing only: no
//! role logic lives here.

pub mod admin;
pub mod client;
pub mod common;
pub mod config;
pub mod daemon;
pub mod health;
pub mod http;
pub mod limits;
pub mod logwriter;
pub mod metrics;
pub mod net;
pub mod per_client;
pub mod reload;
pub mod sdnotify;
pub mod signals;
pub mod telemetry;

pub use config::{ConfigError, ConfigIssue, ConfigSource, Loaded, RoleConfig, Validator};
pub use daemon::{Context, DaemonConfig};
pub use health::Health;
pub use signals::Shutdown;
