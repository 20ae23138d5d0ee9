//! Backends named by host name (`addr = "app1.internal:8001"`) are resolved when the config is validated,
//! at load and at each reload. Between reloads, this task resolves them again every `resolve_interval_ms`
//! (HAProxy's `resolvers` with `hold valid`, nginx's `resolve`), and when a name's addresses change it asks
//! for a reload, which resolves them anew, validates the whole config and applies it the one way every
//! reload is applied: new addresses become backends, gone ones retire with their connections running on.
//! Nothing happens while the answers stay the same (compared as sets, so a resolver that rotates its
//! records changes nothing), and a failed lookup keeps the addresses in force (a DNS outage is no reason to
//! drop backends).

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::config::unique;

/// The longest one lookup may take before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `config`'s backend names every `resolve_interval_ms` with `lookup`, and calls `changed` once a
/// name's addresses differ from those in force, until `cancel`.
pub async fn watch<F, Fut>(
    mut config: watch::Receiver<Arc<crate::Config>>,
    lookup: F,
    changed: impl Fn(),
    cancel: CancellationToken,
) where
    F: Fn(String) -> Fut,
    Fut: Future<Output = io::Result<Vec<SocketAddr>>>,
{
    loop {
        let cfg = config.borrow_and_update().clone();
        let every = cfg.proxy.resolve_interval.filter(|_| !cfg.proxy.names.is_empty());
        let tick = async {
            match every {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            r = config.changed() => if r.is_err() { return } else { continue },
            () = tick => {}
        }
        for (name, in_force) in &cfg.proxy.names {
            let found = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup(name.clone())).await {
                Ok(Ok(found)) if !found.is_empty() => unique(found),
                Ok(Ok(_)) => {
                    debug!(%name, "backend host name resolves to no address; keeping its addresses");
                    continue;
                }
                Ok(Err(e)) => {
                    debug!(%name, error = %e, "cannot resolve a backend host name; keeping its addresses");
                    continue;
                }
                Err(_) => {
                    debug!(%name, "resolving a backend host name timed out; keeping its addresses");
                    continue;
                }
            };
            let set = |a: &[SocketAddr]| a.iter().copied().collect::<BTreeSet<_>>();
            if set(&found) != set(in_force) {
                info!(%name, was = ?in_force, now = ?found, "backend host name resolves anew; reloading the config");
                changed();
                // The reload publishes a config with the new addresses, which this loop then follows.
                break;
            }
        }
    }
}

/// What [`watch`] looks names up with: the system's resolver, off the async workers.
pub async fn system_lookup(name: String) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host(name).await?.collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    fn config(names: &str) -> Arc<crate::Config> {
        let text = format!(
            "role = \"lb\"\nlisten = \"127.0.0.1:7000\"\n[proxy]\nresolve_interval_ms = 1000\n\
             [[proxy.listeners]]\nlisten = \"127.0.0.1:7400\"\nrequest_type = \"web\"\n\
             [[proxy.backends]]\naddr = \"{names}\"\n"
        );
        Arc::new(
            xcluster_runtime::config::load_bytes::<crate::Config>(text.as_bytes())
                .unwrap()
                .config,
        )
    }

    /// In paused time: an answer that stays the same asks for nothing, a failed lookup keeps what is in
    /// force, and a new answer asks for one reload, right after the lookup that gave it.
    #[tokio::test(start_paused = true)]
    async fn a_name_that_resolves_anew_asks_for_a_reload() {
        let cfg = config("localhost:9000");
        assert_eq!(cfg.proxy.names.len(), 1, "{:?}", cfg.proxy.names);
        let (_tx, rx) = watch::channel(cfg.clone());
        let local = SocketAddr::from(([127, 0, 0, 1], 9000));
        let other = SocketAddr::from(([127, 0, 0, 2], 9000));
        // What each lookup answers, in turn.
        let answers = Mutex::new(vec![
            Ok(vec![local]),
            Err(io::Error::other("no answer")),
            Ok(vec![local, local]),
            Ok(vec![local, other]),
        ]);
        // What the task does, in order: each lookup, and each reload it asks for.
        let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let lookup = {
            let events = events.clone();
            move |name: String| {
                assert_eq!(name, "localhost:9000");
                let _ = events.send("lookup");
                let next = answers.lock().unwrap().remove(0);
                async move { next }
            }
        };
        let changed = move || {
            let _ = events.send("reload");
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch(rx, lookup, changed, cancel.clone()));
        // Paused time runs on to the task's next look whenever the test waits.
        let mut order = Vec::new();
        while order.last() != Some(&"reload") && order.len() < 5 {
            let next = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
            order.push(next.unwrap().unwrap());
        }
        assert_eq!(order, ["lookup", "lookup", "lookup", "lookup", "reload"]);
        cancel.cancel();
        task.await.unwrap();
    }
}
