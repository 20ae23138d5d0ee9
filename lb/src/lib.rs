//! The balancer: the load-aware directory and the layer-4 proxy.

pub mod config;
pub mod proxy;

pub use config::Config;
use xcluster_runtime::Context;
use xcluster_runtime::http::ServerLimits;

/// Why the lb stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The L4 proxy could not start (issue 5).
    #[error(transparent)]
    Proxy(#[from] proxy::Error),
}

/// Runs the lb until drained.
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
    // L4 proxy (issue 5): follows `ctx.config` reloads; drains with the process.
    let picker = std::sync::Arc::new(proxy::StaticPicker::new(&cfg.proxy));
    let proxy = proxy::start(ctx.config.clone(), picker, &drain, ctx.shutdown.stop_token())?;
    ctx.health.set_ready();
    drain.cancelled().await;
    proxy.shutdown();
    proxy.drained().await;
    Ok(())
}
