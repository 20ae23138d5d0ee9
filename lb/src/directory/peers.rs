//! A starting balancer takes its peers' drains. `xcluster ctl drain` (and the dashboard's button) drains an
//! instance on every balancer, each keeping it in memory; a balancer restarted after that (a deploy, a
//! rolling restart, a crash) would otherwise send clients to the drained instance again until someone
//! drained it anew. HAProxy keeps such state across a reload in its server-state file; here the peers hold
//! it, which also brings a balancer that was down during an `undrain` up to date. The weights set at run time
//! (`xcluster ctl weight`) come along the same way.
//!
//! With a state file (`super::state`), the balancer starts with the file's state, and the newest state
//! wins, whole: each state carries when an operator's call last changed it (`state_changed_unix_ms`). A
//! peer that saw a later call (an undrain while this one was down) replaces the file's state; a peer with
//! an older or no state (one restarted at the same time without a file, or whose file was bad) does not
//! wipe it. States of the same time are merged (so balancers without files, all at 0, merge their peers'
//! as before). Whole rather than per entry, because an undrain leaves no entry to compare.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use xcluster_runtime::client::{self, CallError};

use super::{Directory, MAX_DRAINED};

/// How long a starting balancer waits for its peers (all at once): it is not ready meanwhile.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// What is read of a peer's answer. A peer answers `GET /v1/status?only=state` with its drains and weights
/// alone ([`state_answer`], at most [`MAX_DRAINED`] of each, ids of at most `MAX_ID_BYTES`: under 3 MB, a
/// test checks); a balancer older than that query answers its whole status, which lists every instance
/// with its weights per type (4096 instances with long ids and many types exceeded 8 MiB, and the drains
/// were skipped with a debug line), so the bound stays large for those.
const MAX_BODY: usize = 8 << 20;
/// The path asked: the run-time state only, whose size the limits bound.
pub const STATE_PATH: &str = "/v1/status?only=state";

/// A balancer's run-time state as its peers read it (`GET /v1/status?only=state`): the fields of
/// `LbStatus` of the same names, so the whole status of an older peer reads the same.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Drained {
    drained: Vec<String>,
    weights: std::collections::BTreeMap<String, String>,
    /// 0 from a peer older than this field: its state is merged only with others of no time.
    state_changed_unix_ms: u64,
}

/// This balancer's answer to `GET /v1/status?only=state`: what a starting peer takes of it, and no more
/// (at most [`MAX_DRAINED`] drains and weights; the table holds only ids a peer takes, `valid_server_id`), so
/// its size is bounded. Restored drains count to `MAX_DRAINED`, but the API's drains of known servers may
/// add to them.
pub fn state_answer(dir: &Directory) -> Drained {
    let state = dir.runtime_state();
    Drained {
        drained: state.drained.into_iter().take(MAX_DRAINED).collect(),
        weights: (state.weights.into_iter())
            .take(MAX_DRAINED)
            .map(|(id, w)| (id, w.to_string()))
            .collect(),
        state_changed_unix_ms: state.changed_unix_ms,
    }
}

/// What a starting balancer does with its peers' states, by their times (`peers`) and its own (`here`:
/// from its state file, 0 without one).
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// Its own is the newest: the peers' are left.
    Keep,
    /// The answers at these indices, added to its own (all of the same time as its own).
    Merge(Vec<usize>),
    /// The answers at these indices (the newest) in place of its own.
    Replace(Vec<usize>),
}

fn choose(here: u64, peers: &[u64]) -> Take {
    let Some(&newest) = peers.iter().max() else {
        return Take::Keep;
    };
    let of_newest = || (0..peers.len()).filter(|&i| peers[i] == newest).collect();
    match newest.cmp(&here) {
        std::cmp::Ordering::Less => Take::Keep,
        std::cmp::Ordering::Equal => Take::Merge(of_newest()),
        std::cmp::Ordering::Greater => Take::Replace(of_newest()),
    }
}

/// How long a balancer whose state file was lost (refused, unreadable) keeps asking its peers, which may be
/// starting beside it, before it goes on without their state.
pub const PATIENCE_WHEN_LOST: Duration = Duration::from_secs(5);

/// Between two rounds of asking the peers, while `patience` lasts.
const ASK_AGAIN: Duration = Duration::from_millis(250);

/// Asks every peer in `peers` for its drained instances and run-time weights and takes the newest state
/// (see the module's header). A peer that does not answer within [`TIMEOUT`] is skipped (it may be the one
/// restarting beside this one); while none has answered, they are asked again for `patience`.
pub async fn take_drains(dir: &Directory, peers: &[SocketAddr], patience: Duration) {
    let until = tokio::time::Instant::now() + patience;
    let mut answers = ask(peers).await;
    while answers.is_empty() && !peers.is_empty() && tokio::time::Instant::now() < until {
        tokio::time::sleep(ASK_AGAIN).await;
        answers = ask(peers).await;
    }
    take_newest(dir, peers, answers);
}

/// Each peer's answer, of those that answered in time.
async fn ask(peers: &[SocketAddr]) -> Vec<(SocketAddr, Drained)> {
    let asks = peers.iter().map(|&peer| async move {
        let r = client::call(
            peer,
            Method::GET,
            STATE_PATH,
            &[],
            Default::default(),
            MAX_BODY,
            TIMEOUT,
        )
        .await;
        (peer, r)
    });
    let mut answers = Vec::new();
    for (peer, answer) in futures_util::future::join_all(asks).await {
        match answer.map(|body| serde_json::from_slice::<Drained>(&body)) {
            Ok(Ok(d)) => answers.push((peer, d)),
            Ok(Err(e)) => {
                warn!(%peer, error = %e, "a peer's state is not valid JSON: its drains and run-time weights are not taken")
            }
            // Only a peer that answers its whole status can exceed it (one older than `?only=state`).
            Err(CallError::TooLarge { max, .. }) => warn!(
                %peer, limit_bytes = max,
                "a peer's status is larger than this balancer reads: its drains and run-time weights are not \
                 taken (a balancer of an older version answers its whole status; upgrade it)"
            ),
            // Normal when the cluster starts: the peers start too.
            Err(e) => debug!(%peer, error = %e, "cannot read a peer's drains"),
        }
    }
    answers
}

/// Takes the newest of this balancer's state and `answers` (see the module's header).
fn take_newest(dir: &Directory, peers: &[SocketAddr], mut answers: Vec<(SocketAddr, Drained)>) {
    if answers.is_empty() {
        if !peers.is_empty() {
            info!(
                "no peer answered: drains and run-time weights set before this start, if any, are known \
                 here only from the state file, if one is set (a rolling restart of the balancers keeps them)"
            );
        }
        return;
    }
    let here = dir.state_changed_unix_ms();
    // A peer's answer is outside input: a time in the future (a bad clock) is taken as now, as the file's
    // is, so it cannot outrank every later change.
    let now = super::state::unix_ms();
    for (_, d) in &mut answers {
        d.state_changed_unix_ms = d.state_changed_unix_ms.min(now);
    }
    let times: Vec<u64> = answers.iter().map(|(_, d)| d.state_changed_unix_ms).collect();
    let take = match choose(here, &times) {
        Take::Keep => {
            info!(
                changed_unix_ms = here,
                "this balancer's drains and run-time weights (its state file's) are newer than its peers': kept"
            );
            return;
        }
        Take::Merge(take) => take,
        Take::Replace(take) => {
            if !dir.runtime_state().is_empty() {
                info!(
                    changed_unix_ms = here,
                    "the peers' drains and run-time weights are newer than this balancer's state file's: \
                     they replace them"
                );
            }
            dir.clear_runtime_state();
            take
        }
    };
    for (peer, d) in take.into_iter().map(|i| &answers[i]) {
        let added = dir.restore_drained(d.drained.iter().cloned());
        if added > 0 {
            info!(%peer, added, "drained instances taken from a peer");
        }
        let added = dir.restore_weights(d.weights.clone());
        if added > 0 {
            info!(%peer, added, "run-time weights taken from a peer");
        }
        dir.restore_state(&super::state::RuntimeState {
            changed_unix_ms: d.state_changed_unix_ms,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::directory::{MAX_DRAINED, Settings};
    use xcluster_proto::report::MAX_ID_BYTES;

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

    /// An address restored in another spelling (a hand-edited state file, an older peer) is kept as the API
    /// keeps it, so an undrain in any spelling takes it off: kept as written, it still withheld its
    /// backend, and every undrain answered `drained: false` while it stayed.
    #[test]
    fn a_restored_address_is_kept_in_the_apis_spelling() {
        let d = dir();
        assert_eq!(
            d.restore_drained(["[2001:DB8::1]:80".into(), "127.0.0.1:08001".into()]),
            2
        );
        assert_eq!(d.status().drained, ["127.0.0.1:8001", "[2001:db8::1]:80"]);
        assert_eq!(
            d.set_drained("[2001:db8::1]:80", false).as_deref(),
            Some("[2001:db8::1]:80")
        );
        assert_eq!(
            d.set_drained("127.0.0.1:8001", false).as_deref(),
            Some("127.0.0.1:8001")
        );
        assert!(d.status().drained.is_empty());
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
        assert_eq!(new.state_changed_unix_ms, 0, "an older peer's state has no time");
    }

    /// The newest state wins whole; states of one time merge; without any answer a balancer keeps its own.
    #[test]
    fn the_newest_state_wins() {
        assert_eq!(choose(5, &[]), Take::Keep);
        // The file's state is newer than every peer's (one restarted without a file answers 0).
        assert_eq!(choose(5, &[0, 4]), Take::Keep);
        // A peer saw a later call (an undrain while this one was down): it replaces the file's state, and
        // an older peer's is left out.
        assert_eq!(choose(5, &[3, 9, 9]), Take::Replace(vec![1, 2]));
        // All of one time (no file here, peers without one or older than the field: all 0): merged, as
        // before there was a state file.
        assert_eq!(choose(0, &[0, 0]), Take::Merge(vec![0, 1]));
        assert_eq!(choose(7, &[7, 2]), Take::Merge(vec![0]));
    }

    /// What `take_drains` does with a chosen answer: the file's state goes when a newer peer's replaces it,
    /// and the time taken is the peer's.
    #[test]
    fn a_newer_peer_state_replaces_the_file_state() {
        let d = dir();
        let file = crate::directory::state::RuntimeState {
            changed_unix_ms: 100,
            drained: ["h/a".to_string()].into(),
            weights: [("h/b".to_string(), "50%".parse().unwrap())].into(),
        };
        assert_eq!(d.restore_state(&file), (1, 1));
        assert_eq!(d.state_changed_unix_ms(), 100);
        d.clear_runtime_state();
        let peer = crate::directory::state::RuntimeState {
            changed_unix_ms: 200,
            drained: ["h/c".to_string()].into(),
            ..Default::default()
        };
        d.restore_state(&peer);
        let s = d.status();
        assert_eq!(s.drained, ["h/c"]);
        assert!(s.weights.is_empty());
        assert_eq!(s.state_changed_unix_ms, 200);
    }

    /// The largest state the limits allow (every drain and weight a peer takes, each of the longest id, each
    /// weight of the longest form) fits in what a peer reads of it, and no more is answered than a peer takes.
    #[test]
    fn the_largest_state_fits_what_a_peer_reads() {
        let d = dir();
        let id = |i: usize| format!("{i:x>width$}", width = MAX_ID_BYTES);
        assert_eq!(d.restore_drained((0..MAX_DRAINED + 5).map(id)), MAX_DRAINED);
        let heaviest = xcluster_proto::directory::MAX_BACKEND_WEIGHT.to_string();
        let weights = (0..MAX_DRAINED + 5).map(|i| (id(i), heaviest.clone()));
        assert_eq!(d.restore_weights(weights), MAX_DRAINED);
        let answer = state_answer(&d);
        assert_eq!(
            (answer.drained.len(), answer.weights.len()),
            (MAX_DRAINED, MAX_DRAINED)
        );
        let body = serde_json::to_vec(&answer).unwrap();
        assert!(
            body.len() <= MAX_BODY,
            "{} bytes, read at most {MAX_BODY}",
            body.len()
        );
        // Read back whole.
        let read: Drained = serde_json::from_slice(&body).unwrap();
        assert_eq!(read.drained, answer.drained);
    }

    /// A peer that answers `GET <target>` with `answer(target)`, one connection at a time, until dropped.
    async fn fake_peer(answer: fn(&str) -> Vec<u8>) -> (SocketAddr, tokio_util::sync::DropGuard) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    c = listener.accept() => c.unwrap(),
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("").to_string();
                let body = answer(&target);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            }
        });
        (addr, stop.drop_guard())
    }

    /// A whole status over what a peer reads: 4096 instances with long ids and many types exceed 8 MiB.
    fn huge_status(drained: &str) -> Vec<u8> {
        let pad = "x".repeat(MAX_BODY + 1);
        format!(r#"{{"instances":[],"pad":"{pad}","drained":["{drained}"]}}"#).into_bytes()
    }

    /// A starting balancer asks its peers for their run-time state alone, whose size the limits bound: it
    /// read their whole status, and a peer with thousands of instances answered more than it reads, so
    /// their drains were skipped. A peer older than that query answers its whole status, which is still
    /// taken when it fits (and warned about when it does not).
    #[tokio::test]
    async fn a_peer_is_asked_for_its_state_alone() {
        let (new, _new) = fake_peer(|target| match target {
            // Literal: what the API answers (`api::status_only`), not whatever the asker asks.
            "/v1/status?only=state" => {
                br#"{"drained":["h1/a"],"weights":{"h1/b":"50%"},"state_changed_unix_ms":5}"#.to_vec()
            }
            _ => huge_status("h1/a"),
        })
        .await;
        let (old, _old) = fake_peer(|_| huge_status("h1/c")).await;
        let d = dir();
        take_drains(&d, &[new, old], Duration::ZERO).await;
        let s = d.status();
        assert_eq!(s.drained, ["h1/a"]);
        assert_eq!(s.weights["h1/b"], "50%");

        let (old, _old) = fake_peer(|_| br#"{"instances":[],"drained":["h1/c"]}"#.to_vec()).await;
        let d = dir();
        take_drains(&d, &[old], Duration::ZERO).await;
        assert_eq!(
            d.status().drained,
            ["h1/c"],
            "an older peer's whole status, when it fits"
        );
    }
}
