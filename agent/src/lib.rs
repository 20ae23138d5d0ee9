//! The per-host agent: samples host and instance load and pushes signed reports to every balancer.

pub mod config;

pub use config::Config;
use xcluster_runtime::Context;
use xcluster_runtime::http::ServerLimits;

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the agent until drained.
pub async fn run(ctx: Context<Config>) -> Result<(), Error> {
    let cfg = ctx.config();
    let drain = ctx.shutdown.drain_token();
    let limits = ServerLimits {
        grace: cfg.grace,
        ..ServerLimits::default()
    };
    xcluster_runtime::admin::serve_api(
        cfg.listen,
        ctx.health.clone(),
        xcluster_runtime::admin::not_found(),
        limits,
        drain.clone(),
    )
    .await
    .map_err(|source| Error::Listen {
        addr: cfg.listen,
        source,
    })?;
    ctx.health.set_ready();
    drain.cancelled().await;
    Ok(())
}
