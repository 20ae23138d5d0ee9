//! A starting balancer takes its peers' drains. `xcluster ctl drain` (and the dashboard's button) drains an
//! instance on every balancer, each keeping it in memory; a balancer restarted after that (a deploy, a
//! rolling restart, a crash) would otherwise send clients to the drained instance again until someone
//! drained it anew. HAProxy keeps such state across a reload in its server-state file; here the peers hold
//! it, which also brings a balancer that was down during an `undrain` up to date. The weights set at run time
//! (`xcluster ctl weight`) come along the same way.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use tracing::{debug, info};
use xcluster_runtime::client;

use super::Directory;

/// How long a starting balancer waits for its peers (all at once): it is not ready meanwhile.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// A peer's status lists every instance; this bounds what is read of it.
const MAX_BODY: usize = 8 << 20;

/// The part of a peer's `GET /v1/status` read here.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Drained {
    drained: Vec<String>,
    weights: std::collections::BTreeMap<String, String>,
}

/// Asks every peer in `peers` for its drained instances and drains them here too. A peer that does not
/// answer within [`TIMEOUT`] is skipped (it may be the one restarting beside this one).
pub async fn take_drains(dir: &Directory, peers: &[SocketAddr]) {
    let asks = peers.iter().map(|&peer| async move {
        let r = client::call(
            peer,
            Method::GET,
            "/v1/status",
            &[],
            Default::default(),
            MAX_BODY,
            TIMEOUT,
        )
        .await;
        (
            peer,
            r.map_err(|e| e.to_string()).and_then(|body| {
                serde_json::from_slice::<Drained>(&body).map_err(|e| format!("{peer}: bad status: {e}"))
            }),
        )
    });
    let mut asked = 0;
    for (peer, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(d) => {
                asked += 1;
                let added = dir.restore_drained(d.drained);
                if added > 0 {
                    info!(%peer, added, "drained instances taken from a peer");
                }
                let added = dir.restore_weights(d.weights);
                if added > 0 {
                    info!(%peer, added, "run-time weights taken from a peer");
                }
            }
            // Normal when the cluster starts: the peers start too.
            Err(e) => debug!(%peer, error = %e, "cannot read a peer's drains"),
        }
    }
    if asked == 0 && !peers.is_empty() {
        info!(
            "no peer answered: drains and run-time weights set before this start, if any, are not known here \
             (a rolling restart of the balancers keeps them)"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::directory::{MAX_DRAINED, Settings};

    fn dir() -> Directory {
        Directory::new(Settings {
            params: Default::default(),
            keys: crate::directory::ingest::ReportKeys::shared(b"k"),
            skew_ms: 5_000,
            max_agents: 8,
            max_instances: 16,
            balancers: vec!["127.0.0.1:7000".into()],
            admin_token: "t".into(),
            max_watches: 64,
            proxy_backends: Default::default(),
        })
    }

    /// A peer's answer is outside input: empty or overlong ids are skipped, and the set is bounded.
    #[test]
    fn restored_drains_are_bounded() {
        let d = dir();
        let long = "x".repeat(xcluster_proto::report::MAX_ID_BYTES + 1);
        assert_eq!(
            d.restore_drained(["a".into(), String::new(), long, "a".into()]),
            1
        );
        assert_eq!(d.status().drained, ["a"]);
        let many = (0..MAX_DRAINED + 5).map(|i| format!("i{i}"));
        assert_eq!(d.restore_drained(many), MAX_DRAINED - 1);
        assert_eq!(d.status().drained.len(), MAX_DRAINED);
    }

    /// Only `drained` is read of a peer's status; an older peer without it has none.
    #[test]
    fn a_status_without_drains_reads_as_none() {
        let old: Drained = serde_json::from_str(r#"{"balancer":"x","instances":[]}"#).unwrap();
        assert!(old.drained.is_empty());
        let new: Drained =
            serde_json::from_str(r#"{"drained":["h/a"],"version":3,"weights":{"h/a":"10%"}}"#).unwrap();
        assert_eq!(new.drained, ["h/a"]);
        assert_eq!(new.weights["h/a"], "10%");
    }
}
