//! Report ingestion: the checks a report passes before it may touch the table, in order of cost: size,
//! signature (HMAC over the exact body, with the key of the agent the request names), decoding and ranges,
//! that key being the reported agent's, timestamp skew, then — under the table lock — the per-agent sequence
//! number. A rejected report changes nothing; each rejection is counted by reason.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use xcluster_proto::report::{self, LoadReport, MAX_REPORT_BYTES, ReportError};
use xcluster_runtime::config::HmacKey;

use super::Directory;
use crate::metrics;

/// Every rejection reason ([`ReportError::reason`]), in the order `ReportCounts::rejected` holds them.
pub const REASONS: [&str; 9] = [
    "missing_signature",
    "bad_signature",
    "too_large",
    "malformed",
    "skew",
    "replay",
    "conflict",
    "wrong_key",
    "foreign_instance",
];

/// A rejection reason is logged at most this often (every one is counted): a wrong key or two agents
/// under one id must show in the log, without a line per report.
const WARN_EVERY_MS: u64 = 10_000;

/// Milliseconds since the Unix epoch on this balancer's clock.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The keys reports are checked with: `[reports] key`/`key_file`, shared by every agent without a key of its
/// own, and `[reports.agent_keys]`, each agent's own. An agent with its own key can be neither spoken for with
/// the shared key nor with another agent's, so one host's key, if stolen, reports only for that host.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ReportKeys {
    pub shared: HmacKey,
    pub agents: HashMap<String, HmacKey>,
}

impl std::fmt::Debug for ReportKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys never reach a log: only which agents have their own.
        let mut agents: Vec<_> = self.agents.keys().collect();
        agents.sort();
        f.debug_struct("ReportKeys")
            .field("shared", &!self.shared.is_empty())
            .field("agents", &agents)
            .finish()
    }
}

impl ReportKeys {
    /// Only a shared key.
    pub fn shared(bytes: &[u8]) -> Self {
        Self {
            shared: HmacKey::inline(bytes),
            agents: HashMap::new(),
        }
    }

    /// Whether no report can be authenticated at all.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.agents.is_empty()
    }

    /// The agent among `agent` that has a key of its own (`None`: the shared key signs for it).
    fn owner<'a>(&self, agent: Option<&'a str>) -> Option<&'a str> {
        agent.filter(|a| self.agents.contains_key(*a))
    }

    /// Refuses an instance `report` names that is not its agent's to report: an agent with a key of its own
    /// reports only ids under its own (`host-a/...`), and only it reports those. Without it, a stolen host
    /// key could report another host's instance ids at an address of its choosing, taking them over once
    /// their own agent was silent for a moment (a restart), or at once on a balancer that had just started.
    fn check_instances(&self, report: &LoadReport) -> Result<(), ReportError> {
        let foreign = |instance: &str| ReportError::ForeignInstance {
            agent: report.agent.clone(),
            instance: instance.to_string(),
        };
        let keyed = self.agents.contains_key(&report.agent);
        for i in &report.instances {
            let owner = self.instance_owner(&i.id);
            let ok = if keyed {
                owner == Some(report.agent.as_str())
            } else {
                owner.is_none()
            };
            if !ok {
                return Err(foreign(&i.id));
            }
        }
        Ok(())
    }

    /// The agent with a key of its own whose instance `id` is: the longest such agent id that `id` starts
    /// with, followed by `/`. Agent ids may hold `/` themselves: cut at the first one, `rack1/host-a`'s
    /// instances were owned by no one, so its own reports were refused and the shared key reported them.
    fn instance_owner<'a>(&self, id: &'a str) -> Option<&'a str> {
        (id.match_indices('/').rev())
            .map(|(at, _)| &id[..at])
            .find(|agent| self.agents.contains_key(*agent))
    }

    /// The keys a report signed by `agent` (as the request names it) is checked with: its own, or the shared
    /// ones (each line of a key file is one, see [`HmacKey::each`]).
    fn for_signer(&self, agent: Option<&str>) -> &HmacKey {
        match self.owner(agent) {
            Some(a) => &self.agents[a],
            None => &self.shared,
        }
    }

    /// Every key with its name for warnings: `report key`, `report key of agent X`.
    pub fn each(&self) -> impl Iterator<Item = (String, &HmacKey)> {
        let own = self
            .agents
            .iter()
            .map(|(a, k)| (format!("report key of agent {a}"), k));
        std::iter::once(("report key".to_string(), &self.shared)).chain(own)
    }
}

impl Directory {
    /// Verifies and applies one report body, signed by `agent` (the request's [`report::AGENT_HEADER`], which
    /// older agents do not send). Counts the outcome.
    pub fn ingest(
        &self,
        body: &[u8],
        signature: Option<&str>,
        agent: Option<&str>,
    ) -> Result<LoadReport, ReportError> {
        let result = self.check_and_apply(body, signature, agent);
        match &result {
            Ok(_) => {
                self.counts().accepted.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(metrics::REPORTS_ACCEPTED_TOTAL).increment(1);
            }
            Err(e) => self.count_rejection(e),
        }
        result
    }

    /// Counts a rejection (also used by the HTTP layer for bodies it refused before reading them whole).
    pub fn count_rejection(&self, e: &ReportError) {
        let reason = e.reason();
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.counts().rejected[i].fetch_add(1, Ordering::Relaxed);
        }
        ::metrics::counter!(metrics::REPORTS_REJECTED_TOTAL, "reason" => reason).increment(1);
        let due = REASONS
            .iter()
            .position(|r| *r == reason)
            .is_some_and(|i| self.counts().warned[i].due(self.now_ms(), WARN_EVERY_MS));
        if due {
            tracing::warn!(reason, error = %e, "load report refused (this reason is logged at most every 10 s)");
        } else {
            tracing::debug!(reason, error = %e, "report rejected");
        }
    }

    fn check_and_apply(
        &self,
        body: &[u8],
        signature: Option<&str>,
        signer: Option<&str>,
    ) -> Result<LoadReport, ReportError> {
        if body.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge);
        }
        let settings = self.settings();
        let signature = signature.ok_or(ReportError::MissingSignature)?;
        let keys = settings.keys.for_signer(signer);
        // No key for it: nothing can be authenticated, so nothing is accepted.
        let mut checked = Err(ReportError::BadSignature);
        for key in keys.each() {
            checked = report::verify(key, body, signature);
            if checked.is_ok() {
                break;
            }
        }
        checked?;
        let r = report::decode(body)?;
        // The key that signed must be the reported agent's: its own if it has one, else the shared one.
        if settings.keys.owner(signer) != settings.keys.owner(Some(&r.agent)) {
            return Err(ReportError::WrongKey { agent: r.agent });
        }
        settings.keys.check_instances(&r)?;
        let now = wall_ms();
        if now.abs_diff(r.timestamp_ms) > settings.skew_ms {
            return Err(ReportError::Skew {
                timestamp_ms: r.timestamp_ms,
                now_ms: now,
                skew_ms: settings.skew_ms,
            });
        }
        let mut table = self.table();
        table.check_seq(&r, settings.max_agents, self.now_ms(), &settings.params)?;
        let (now_ms, room) = (self.now_ms(), table.room(&r, settings.max_instances));
        if room.fits < room.new {
            let left_out = room.new - room.fits;
            ::metrics::counter!(metrics::INSTANCES_LEFT_OUT_TOTAL).increment(left_out as u64);
            if table.full_warned.due(now_ms, 10_000) {
                tracing::warn!(
                    agent = %r.agent,
                    left_out,
                    max_instances = settings.max_instances,
                    "the table is full: instances new to it are left out of the lists (the agent's others are \
                     updated); raise [reports] max_instances (logged at most every 10 s)"
                );
            }
        }
        table.apply_within(&r, now_ms, &settings.params, room.fits);
        self.after_report(&table);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::SocketAddr;

    use xcluster_proto::report::{HostLoad, InstanceLoad};

    use super::*;
    use crate::directory::weights::Params;
    use crate::directory::{MAX_DRAINED, SetWeightError, Settings};
    use std::time::Duration;
    use xcluster_proto::directory::WeightSet;

    fn dir() -> Directory {
        Directory::new(Settings {
            params: Params {
                panic_threshold: 0.0,
                ..Default::default()
            },
            keys: ReportKeys::shared(b"k"),
            skew_ms: 5_000,
            max_agents: 8,
            max_instances: 16,
            balancers: vec!["127.0.0.1:7000".into()],
            admin_token: "t".into(),
            max_watches: 64,
            proxy_backends: ["127.0.0.1:8001".parse().unwrap()].into(),
        })
    }

    fn body(seq: u64, ts: u64) -> Vec<u8> {
        body_of(seq, 1, ts)
    }

    /// [`body`] from `agent`, its instance named `id`.
    fn by(agent: &str, seq: u64, ts: u64, id: &str) -> Vec<u8> {
        let mut r: LoadReport = serde_json::from_slice(&body(seq, ts)).unwrap();
        r.agent = agent.into();
        r.instances[0].id = id.into();
        serde_json::to_vec(&r).unwrap()
    }

    fn body_of(seq: u64, boot: u64, ts: u64) -> Vec<u8> {
        serde_json::to_vec(&LoadReport {
            agent: "h".into(),
            seq,
            boot,
            timestamp_ms: ts,
            host: HostLoad {
                cpu: 0.1,
                mem: 0.1,
                load1: 0.0,
                cores: 8,
            },
            instances: vec![InstanceLoad {
                id: "h/a".into(),
                addr: "127.0.0.1:9".into(),
                ready: true,
                capacity: 10,
                ..Default::default()
            }],
        })
        .unwrap()
    }

    #[test]
    fn every_rejection_is_counted_and_changes_nothing() {
        let d = dir();
        let now = wall_ms();
        let ok = body(10, now);
        let cases: Vec<(Vec<u8>, Option<String>, &str)> = vec![
            (ok.clone(), None, "missing_signature"),
            (ok.clone(), Some(report::sign(b"wrong", &ok)), "bad_signature"),
            (b"{}".to_vec(), Some(report::sign(b"k", b"{}")), "malformed"),
            (
                body(11, now - 60_000),
                Some(report::sign(b"k", &body(11, now - 60_000))),
                "skew",
            ),
            (vec![b' '; MAX_REPORT_BYTES + 1], Some("x".into()), "too_large"),
        ];
        for (b, sig, reason) in cases {
            let err = d.ingest(&b, sig.as_deref(), None).unwrap_err();
            assert_eq!(err.reason(), reason);
        }
        assert!(
            d.status().instances.is_empty(),
            "no rejected report touched the table"
        );
        d.ingest(&ok, Some(&report::sign(b"k", &ok)), None).unwrap();
        let v = d.snapshot().version;
        assert_eq!(
            d.ingest(&ok, Some(&report::sign(b"k", &ok)), None)
                .unwrap_err()
                .reason(),
            "replay"
        );
        // Another process under the same agent id, while this one reports.
        let other = body_of(1_000, 1_000, now);
        assert_eq!(
            d.ingest(&other, Some(&report::sign(b"k", &other)), None)
                .unwrap_err()
                .reason(),
            "conflict"
        );
        assert_eq!(d.snapshot().version, v);
        assert_eq!(d.servers("default").unwrap().servers.len(), 1);
        assert!(d.servers("nope").is_err());
        // Agent x's own key, speaking for h.
        let mut keys = ReportKeys::shared(b"k");
        keys.agents.insert("x".into(), HmacKey::inline(b"xk"));
        d.reconfigure(Settings {
            keys,
            ..(*d.settings()).clone()
        });
        let err = d
            .ingest(&ok, Some(&report::sign(b"xk", &ok)), Some("x"))
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_key");
        // Agent x's own key, for its own agent id, naming an instance outside its own ids.
        let mut r: LoadReport = serde_json::from_slice(&body(12, now)).unwrap();
        r.agent = "x".into();
        let foreign = serde_json::to_vec(&r).unwrap();
        let err = d
            .ingest(&foreign, Some(&report::sign(b"xk", &foreign)), Some("x"))
            .unwrap_err();
        assert_eq!(err.reason(), "foreign_instance");
        let status = d.status();
        assert_eq!(status.reports_accepted, 1);
        for r in REASONS {
            assert_eq!(status.reports_rejected[r], 1, "{r}");
        }
    }

    /// A balancer's lists say it is warming until it has applied a report, so that clients keep their
    /// entries through its empty lists then, and only then.
    #[test]
    fn lists_say_warming_until_a_report_is_applied() {
        let d = dir();
        let warming = d.servers("default").unwrap();
        assert_eq!(warming.warming, Some(true));
        // An agent with no instance (yet): the list's rows stay as they were, none.
        let mut r: LoadReport = serde_json::from_slice(&body(1, wall_ms())).unwrap();
        r.instances.clear();
        let ok = serde_json::to_vec(&r).unwrap();
        d.ingest(&ok, Some(&report::sign(b"k", &ok)), None).unwrap();
        let heard = d.servers("default").unwrap();
        assert_eq!(heard.warming, Some(false));
        assert!(heard.servers.is_empty());
        // A new version all the same, so a watch on the warming list wakes and its client learns that the
        // empty list now means no instance.
        assert_ne!(heard.version, warming.version);
    }

    /// An agent with its own key is heard only under that key: the shared key, or another agent's, cannot
    /// speak for it, nor can its key speak for an agent without one.
    #[test]
    fn an_agent_with_its_own_key_is_heard_only_under_it() {
        let d = dir();
        let mut keys = ReportKeys::shared(b"k");
        let own = HmacKey::inline(b"own");
        keys.agents.insert("h".into(), own);
        d.reconfigure(Settings {
            keys,
            ..(*d.settings()).clone()
        });
        let now = wall_ms();
        let of = |agent: &str, seq: u64| by(agent, seq, now, &format!("{agent}/a"));
        let h = of("h", 1);
        let refused = [
            // The shared key, naming no signer or the agent itself.
            (report::sign(b"k", &h), None, "wrong_key"),
            (report::sign(b"k", &h), Some("h"), "bad_signature"),
            // Its own key, but checked as the shared one.
            (report::sign(b"own", &h), None, "bad_signature"),
            (report::sign(b"own", &h), Some("g"), "bad_signature"),
        ];
        for (sig, signer, reason) in refused {
            let err = d.ingest(&h, Some(&sig), signer).unwrap_err();
            assert_eq!((err.reason(), signer), (reason, signer));
        }
        // h's key speaking for g, which has none of its own.
        let g = of("g", 1);
        let err = d
            .ingest(&g, Some(&report::sign(b"own", &g)), Some("h"))
            .unwrap_err();
        assert_eq!(err, ReportError::WrongKey { agent: "g".into() });
        assert!(d.status().instances.is_empty(), "nothing refused was applied");
        d.ingest(&h, Some(&report::sign(b"own", &h)), Some("h")).unwrap();
        // Agents without a key of their own use the shared one, named or not.
        d.ingest(&g, Some(&report::sign(b"k", &g)), Some("g")).unwrap();
        let g2 = of("g", 2);
        d.ingest(&g2, Some(&report::sign(b"k", &g2)), None).unwrap();
        assert_eq!(d.status().instances.len(), 2);
        assert_eq!(d.status().reports_rejected["wrong_key"], 2);

        // Instance ids: h reports only "h/..." ones, and nobody else reports those, under any key.
        let with_id = |agent: &str, seq: u64, id: &str| by(agent, seq, now, id);
        let refused = [
            (with_id("h", 2, "g/a"), b"own".as_slice(), "h"),
            (with_id("h", 2, "a"), b"own", "h"),
            (with_id("h", 2, "hh/a"), b"own", "h"),
            (with_id("g", 3, "h/a"), b"k", "g"),
            (with_id("g", 3, "h/b"), b"k", "g"),
        ];
        for (b, key, signer) in refused {
            let err = d
                .ingest(&b, Some(&report::sign(key, &b)), Some(signer))
                .unwrap_err();
            assert_eq!(
                err.reason(),
                "foreign_instance",
                "{}",
                String::from_utf8_lossy(&b)
            );
        }
        assert_eq!(d.status().reports_rejected["foreign_instance"], 5);
        // An agent without a key of its own names its instances as it likes, but for keyed agents' ids.
        let b = with_id("g", 3, "anything");
        d.ingest(&b, Some(&report::sign(b"k", &b)), Some("g")).unwrap();
        let b = with_id("h", 2, "h/b");
        d.ingest(&b, Some(&report::sign(b"own", &b)), Some("h")).unwrap();
    }

    /// A key file of two lines holds two keys, each accepted, so a key is changed with no report refused:
    /// balancers take the new and the old, agents move to the new (signing with their first line), then
    /// balancers drop the old. An agent's own key file alike.
    #[test]
    fn each_line_of_a_key_is_a_key_a_report_may_be_signed_with() {
        let d = dir();
        let mut keys = ReportKeys::shared(b"new-shared\nold-shared\n");
        keys.agents
            .insert("h".into(), HmacKey::inline(b"new-own\r\nold-own"));
        d.reconfigure(Settings {
            keys,
            ..(*d.settings()).clone()
        });
        let now = wall_ms();
        let report = |agent: &str, seq: u64| by(agent, seq, now, &format!("{agent}/a"));
        let mut seq = 0;
        let mut send = |agent: &str, key: &[u8]| {
            seq += 1;
            let b = report(agent, seq);
            d.ingest(&b, Some(&report::sign(key, &b)), Some(agent))
                .map(|_| ())
                .map_err(|e| e.reason())
        };
        for (agent, key) in [
            ("g", b"new-shared".as_slice()),
            ("g", b"old-shared"),
            ("h", b"new-own"),
            ("h", b"old-own"),
        ] {
            assert_eq!(
                send(agent, key),
                Ok(()),
                "{agent} with {}",
                String::from_utf8_lossy(key)
            );
        }
        for (agent, key) in [
            ("g", b"new-shared\nold-shared".as_slice()),
            ("g", b"other"),
            ("h", b"new-shared"),
        ] {
            assert_eq!(
                send(agent, key),
                Err("bad_signature"),
                "{agent} with {}",
                String::from_utf8_lossy(key)
            );
        }
        assert_eq!(HmacKey::inline(b" new \n\nold\n").signing(), b"new");
    }

    /// An agent id may hold `/`: its instances are those under the whole id, the longest keyed one that
    /// names them. Cut at the first `/`, `rack1/host-a`'s own reports were refused and the shared key
    /// reported its instances.
    #[test]
    fn an_agent_id_with_a_slash_owns_the_instances_under_it() {
        let d = dir();
        let mut keys = ReportKeys::shared(b"k");
        keys.agents.insert("rack1/host-a".into(), HmacKey::inline(b"a"));
        keys.agents.insert("rack1".into(), HmacKey::inline(b"r"));
        d.reconfigure(Settings {
            keys,
            ..(*d.settings()).clone()
        });
        let now = wall_ms();
        let report = |agent: &str, seq: u64, id: &str| by(agent, seq, now, id);
        let heard = [
            ("rack1/host-a", b"a".as_slice(), "rack1/host-a/app"),
            ("rack1", b"r", "rack1/host-b/app"),
            ("g", b"k", "rack2/host-a/app"),
        ];
        for (agent, key, id) in heard {
            let b = report(agent, 1, id);
            d.ingest(&b, Some(&report::sign(key, &b)), Some(agent))
                .unwrap_or_else(|e| panic!("{agent} reporting {id}: {e}"));
        }
        let foreign = [
            ("rack1", b"r".as_slice(), "rack1/host-a/app"),
            ("g", b"k", "rack1/host-a/app"),
            ("g", b"k", "rack1/host-c/app"),
            ("rack1/host-a", b"a", "rack1/host-b/app"),
        ];
        for (agent, key, id) in foreign {
            let b = report(agent, 2, id);
            let err = d
                .ingest(&b, Some(&report::sign(key, &b)), Some(agent))
                .unwrap_err();
            assert_eq!(err.reason(), "foreign_instance", "{agent} reporting {id}");
        }
    }

    /// Past `max_watches` a watch is answered at once, so long polls cannot take every connection.
    #[tokio::test(start_paused = true)]
    async fn watches_past_the_cap_are_answered_at_once() {
        let d = dir();
        d.reconfigure(Settings {
            max_watches: 1,
            ..(*d.settings()).clone()
        });
        let first = body(1, wall_ms());
        d.ingest(&first, Some(&report::sign(b"k", &first)), None).unwrap();
        let v = d.servers_json("default").unwrap().0;
        let held = tokio::spawn({
            let d = d.clone();
            async move { d.watch("default", v, Duration::from_secs(30)).await }
        });
        // Time is paused, so a timeout would never fire: bound the wait by turns of the scheduler instead (the
        // held watch registers within a few).
        let mut turns = 0;
        while d.inner.watching.load(Ordering::Relaxed) == 0 {
            turns += 1;
            assert!(turns < 10_000, "the first watch never registered");
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        let (version, _) = d.watch("default", v, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            (version, started.elapsed()),
            (v, Duration::ZERO),
            "answered at once"
        );
        let (version, _) = held.await.unwrap().unwrap();
        assert_eq!(version, v);
        assert_eq!(started.elapsed(), Duration::from_secs(30), "the first was held");
        assert_eq!(d.inner.watching.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn reports_in_quick_succession_are_coalesced_then_published() {
        let d = dir();
        let cancel = tokio_util::sync::CancellationToken::new();
        tokio::spawn(d.clone().run_housekeeping(cancel.clone()));
        let first = body(1, wall_ms());
        d.ingest(&first, Some(&report::sign(b"k", &first)), None).unwrap();
        assert_eq!(
            d.servers("default").unwrap().servers.len(),
            1,
            "the first report publishes at once"
        );
        let mut r: LoadReport = serde_json::from_slice(&body(2, wall_ms())).unwrap();
        r.instances.push(InstanceLoad {
            id: "h/b".into(),
            addr: "127.0.0.1:10".into(),
            ready: true,
            ..Default::default()
        });
        let second = serde_json::to_vec(&r).unwrap();
        d.ingest(&second, Some(&report::sign(b"k", &second)), None)
            .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.servers("default").unwrap().servers.len() != 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the coalesced report was never published"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        cancel.cancel();
    }

    #[test]
    fn drain_removes_an_instance_from_picks() {
        let d = dir();
        let b = body(1, wall_ms());
        d.ingest(&b, Some(&report::sign(b"k", &b)), None).unwrap();
        assert!(d.pick("default", &[]).is_some());
        assert_eq!(d.set_drained("h/a", true).as_deref(), Some("h/a"));
        assert!(d.pick("default", &[]).is_none());
        assert_eq!(d.set_drained("nope", true), None);
        assert_eq!(d.set_drained("h/a", false).as_deref(), Some("h/a"));
        assert!(d.pick("default", &[]).is_some());
    }

    #[test]
    fn a_proxy_backend_is_drained_by_its_address() {
        let d = dir();
        let b = body(1, wall_ms());
        d.ingest(&b, Some(&report::sign(b"k", &b)), None).unwrap();
        let withheld = || d.with_snapshot(|s| s.withheld.clone());
        let backend: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        // Written another way, the same address, kept as the backend's label.
        assert_eq!(
            d.set_drained("127.0.0.1:08001", true).as_deref(),
            Some("127.0.0.1:8001")
        );
        assert_eq!(withheld(), [backend]);
        assert_eq!(d.status().drained, ["127.0.0.1:8001"]);
        // The instances are not touched.
        assert!(d.pick("default", &[]).is_some());
        // An address that is no configured backend is unknown.
        assert_eq!(d.set_drained("127.0.0.1:8002", true), None);
        assert_eq!(
            d.set_drained("127.0.0.1:8001", false).as_deref(),
            Some("127.0.0.1:8001")
        );
        assert_eq!(withheld(), []);
        // A drain taken from a peer, of a backend this balancer does not have, can still be undrained.
        d.restore_drained(["10.0.0.9:1".to_string()]);
        assert_eq!(withheld(), ["10.0.0.9:1".parse::<SocketAddr>().unwrap()]);
        assert_eq!(d.set_drained("10.0.0.9:1", false).as_deref(), Some("10.0.0.9:1"));
        assert_eq!(withheld(), []);
    }

    /// Drains and run-time weights are kept to `MAX_DRAINED`: a new one of a server here takes the place of
    /// one of a server long gone (the first by name), never of one here. They grew without bound, and a
    /// restart restored only the first `MAX_DRAINED` by name, which could leave a current drain out.
    #[test]
    fn a_full_set_of_drains_gives_way_to_a_current_server_not_a_gone_one() {
        let d = dir();
        let b = body(1, wall_ms());
        d.ingest(&b, Some(&report::sign(b"k", &b)), None).unwrap();
        // A configured backend, first by name, then servers this balancer does not have.
        let ids = || {
            std::iter::once("127.0.0.1:8001".to_string())
                .chain((1..MAX_DRAINED).map(|i| format!("gone{i:05}")))
        };
        assert_eq!(d.restore_drained(ids()), MAX_DRAINED);
        assert_eq!(
            d.restore_weights(ids().map(|id| (id, "50%".to_string()))),
            MAX_DRAINED
        );
        assert_eq!(d.set_drained("h/a", true).as_deref(), Some("h/a"));
        assert_eq!(d.set_weight("h/a", "10%".parse().unwrap()).unwrap(), "h/a");
        let status = d.status();
        assert_eq!(
            (status.drained.len(), status.weights.len()),
            (MAX_DRAINED, MAX_DRAINED)
        );
        for kept in ["h/a", "127.0.0.1:8001", "gone00002"] {
            assert!(status.drained.iter().any(|id| id == kept), "{kept} drained");
            assert!(status.weights.contains_key(kept), "{kept} weighted");
        }
        assert!(!status.drained.iter().any(|id| id == "gone00001"));
        assert!(!status.weights.contains_key("gone00001"));
        // Setting one kept already drops nothing.
        d.set_drained("h/a", true).unwrap();
        assert!(d.status().drained.iter().any(|id| id == "gone00002"));
    }

    #[test]
    fn a_run_time_weight_scales_an_instance_and_replaces_a_backends() {
        let d = dir();
        let b = body(1, wall_ms());
        d.ingest(&b, Some(&report::sign(b"k", &b)), None).unwrap();
        let weight = |d: &Directory| d.status().instances[0].weights["default"];
        let full = weight(&d);
        assert!(full >= 10, "{full}");
        let set = |id: &str, w: &str| d.set_weight(id, w.parse().unwrap());
        // An instance gets a share of its load-driven weight, shown in its status and kept for peers.
        assert_eq!(set("h/a", "10%").unwrap(), "h/a");
        assert_eq!(weight(&d), full / 10);
        assert_eq!(d.status().instances[0].weight_set.as_deref(), Some("10%"));
        assert_eq!(d.status().weights["h/a"], "10%");
        // A weight of its own is for proxy backends only; an unknown id is refused.
        assert!(matches!(
            set("h/a", "7"),
            Err(SetWeightError::InstanceAbsolute(_))
        ));
        assert!(matches!(set("nope", "5%"), Err(SetWeightError::Unknown)));
        assert!(matches!(set("127.0.0.1:8002", "5"), Err(SetWeightError::Unknown)));
        // 100% clears it.
        set("h/a", "100%").unwrap();
        assert_eq!(weight(&d), full);
        assert!(d.status().weights.is_empty());
        // A backend by its address, written either way; the proxy's picker reads it from the snapshot.
        let v0 = d.with_snapshot(|s| s.backend_weights.version);
        assert_eq!(set("127.0.0.1:08001", "7").unwrap(), "127.0.0.1:8001");
        let backend: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        d.with_snapshot(|s| {
            assert!(s.backend_weights.version > v0);
            assert_eq!(s.backend_weights.by_addr[&backend], WeightSet::Absolute(7));
        });
        // Taken from a peer only where none is set here; what does not parse is skipped.
        let peer = [
            ("127.0.0.1:8001", "50%"),
            ("h/a", "20%"),
            ("h/b", "x"),
            ("", "5%"),
        ]
        .map(|(id, w)| (id.to_string(), w.to_string()));
        assert_eq!(d.restore_weights(peer), 1);
        assert_eq!(d.status().weights["127.0.0.1:8001"], "7");
        assert_eq!(weight(&d), full / 5);
    }
}
