//! The per-host agent: samples host and instance load and pushes signed reports to every balancer.
//!
//! - [`host`]: /proc sampling (host CPU, memory, load, cores; a process's CPU and RSS).
//! - [`client`]: the bounded, timed HTTP calls (stats fetch, report push).
//! - [`reporter`]: the sample/push loop with early reports on jumps.
//!
//! Its own API: `GET /v1/report` shows the latest report built, one too large to send too (plus `/metrics`,
//! `/livez`, `/readyz`).

pub mod config;
pub mod host;
pub mod metrics;
pub mod reporter;

use std::sync::Arc;

pub use config::Config;
use http::{Method, StatusCode};
use tokio::sync::watch;
use xcluster_proto::report::LoadReport;
use xcluster_runtime::Context;
use xcluster_runtime::http::{Handler, error, json, method_not_allowed};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] xcluster_runtime::admin::ListenError),
}

/// Runs the agent until drained.
pub async fn run(ctx: Context<Config>) -> Result<(), Error> {
    xcluster_runtime::telemetry::describe(crate::metrics::DESCRIPTIONS);
    // At 0 from the start, so an alert on `increase()` sees the first unsent report, not only the second.
    for reason in reporter::UNSENT_REASONS {
        ::metrics::counter!(crate::metrics::REPORTS_UNSENT_TOTAL, "reason" => reason).increment(0);
    }
    let cfg = ctx.config();
    let drain = ctx.shutdown.drain_token();
    let limits = cfg.http.clone();
    warn_if_key_exposed(&cfg);
    if cfg.key.is_empty() {
        tracing::warn!("no key or key_file: balancers will reject every report");
    }
    let (latest_tx, latest_rx) = watch::channel(None);
    tokio::spawn(reporter::run(ctx.config.clone(), latest_tx, drain.clone()));
    xcluster_runtime::admin::serve_api(
        cfg.listen,
        ctx.health.clone(),
        handler(latest_rx),
        limits,
        &ctx.shutdown,
    )
    .await?;
    ctx.health.set_ready();
    tracing::info!(agent = %cfg.agent_id, balancers = cfg.balancers.len(), instances = cfg.instances.len(), "reporting");
    drain.cancelled().await;
    Ok(())
}

fn handler(latest: watch::Receiver<Option<LoadReport>>) -> Handler {
    Arc::new(move |req, _| {
        let report = latest.borrow().clone();
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        Box::pin(async move {
            match (path.as_str(), method) {
                ("/v1/report", Method::GET) => match report {
                    Some(r) => json(StatusCode::OK, &r),
                    None => error(StatusCode::SERVICE_UNAVAILABLE, "no_report", "no report sent yet"),
                },
                ("/v1/report", m) => method_not_allowed(&m, &path, "GET"),
                _ => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no such endpoint: {path}"),
                ),
            }
        })
    })
}

/// Warns about a short shared key, or a key file group or others can read.
fn warn_if_key_exposed(cfg: &Config) {
    cfg.key.warn("report key");
}
