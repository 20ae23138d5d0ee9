//! Load reports: what an agent pushes to every balancer (`POST /v1/reports`), and how they are signed.
//!
//! The body is the JSON of a [`LoadReport`]; the header [`SIGNATURE_HEADER`] carries
//! `hmac-sha256=<hex>` over the exact body bytes with the agent's key: the cluster's shared key, or the agent's
//! own where the balancers give it one, which [`AGENT_HEADER`] names before the body is read. The timestamp and
//! sequence number are inside the signed body, so a replay or a stale report is detectable by the balancer.
//!
//! ```
//! use xcluster_proto::report::{HostLoad, LoadReport, decode, sign, verify};
//! let report = LoadReport { agent: "host-a".into(), seq: 1, boot: 1, timestamp_ms: 1_700_000_000_000,
//!     host: HostLoad { cpu: 0.25, mem: 0.5, load1: 0.8, cores: 2 }, instances: vec![] };
//! let body = serde_json::to_vec(&report).unwrap();
//! let sig = sign(b"shared-key", &body);
//! assert!(verify(b"shared-key", &body, &sig).is_ok());
//! assert_eq!(decode(&body).unwrap(), report);
//! ```

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::stats::TypeStats;

/// The HTTP header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-xcluster-signature";
/// The HTTP header naming the agent whose key signed the report: a balancer that gives that agent its own
/// key checks the signature with it. The body must report that same agent.
pub const AGENT_HEADER: &str = "x-xcluster-agent";
/// Largest report body a balancer accepts, in bytes.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Most instances one report may describe.
pub const MAX_INSTANCES: usize = 256;
/// Longest id (agent or instance) in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// What an agent or instance id may be, for messages.
pub const ID_RULE: &str = "must be 1..=128 bytes of A-Z a-z 0-9 . _ : / @ -";

/// Whether `id` may name an agent or an instance: ids reach logs, `ctl cluster`, the dashboard's HTML and
/// its embedded JSON, so control characters, markup and bidi overrides are kept out at the door.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'@' | b'-'))
}

/// What an instance's address must be, for messages.
pub const ADDR_RULE: &str =
    "must be IP:PORT with a port and an address clients can connect to (not 0.0.0.0 or ::)";

/// Whether clients can connect to `a`: a port, and not the unspecified address.
pub fn usable_addr(a: std::net::SocketAddr) -> bool {
    a.port() != 0 && !a.ip().is_unspecified()
}

/// At most 64 characters of `s`, for an error message about it.
pub fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// One agent's view of its host and the app instances on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The agent's id (usually the host name); sequence numbers are tracked per agent.
    pub agent: String,
    /// Strictly increasing per agent, across agent restarts (agents start from the wall clock in µs).
    pub seq: u64,
    /// The reporting process: its first `seq` (its start in µs). A new value is a restart, or a second
    /// agent under the same id; balancers tell the two apart by whether the old one goes on reporting. 0:
    /// unknown (an agent from before it was sent).
    #[serde(default)]
    pub boot: u64,
    /// When the report was made, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub host: HostLoad,
    pub instances: Vec<InstanceLoad>,
}

/// Host-wide figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostLoad {
    /// CPU utilisation over the last interval, 0..=1 across all cores.
    pub cpu: f64,
    /// Memory in use, 0..=1 (1 - MemAvailable/MemTotal).
    pub mem: f64,
    /// One-minute load average.
    pub load1: f64,
    /// Online cores.
    pub cores: u32,
}

/// One app instance on the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceLoad {
    /// Cluster-unique instance id (e.g. `host-a/app-1`).
    pub id: String,
    /// Where clients connect, `ip:port`.
    pub addr: String,
    pub ready: bool,
    pub in_flight: u32,
    pub queued: u32,
    pub capacity: u32,
    pub queue_depth: u64,
    pub request_rate: f64,
    pub error_rate: f64,
    /// Per request type: rate, service time, error rate.
    pub types: std::collections::BTreeMap<String, TypeStats>,
    /// The instance process's CPU use, in cores (1.0 = one full core).
    pub proc_cpu: f64,
    /// The instance process's resident memory in bytes.
    pub rss_bytes: u64,
}

/// Why a report was refused. Each variant is a distinct reason counted by the balancer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("missing signature header {SIGNATURE_HEADER}")]
    MissingSignature,
    #[error("bad signature")]
    BadSignature,
    #[error("report body larger than {MAX_REPORT_BYTES} bytes")]
    TooLarge,
    #[error("malformed report: {0}")]
    Malformed(String),
    #[error("report timestamp {timestamp_ms} is outside the allowed skew of {skew_ms} ms (now {now_ms})")]
    Skew {
        timestamp_ms: u64,
        now_ms: u64,
        skew_ms: u64,
    },
    #[error("sequence number {seq} is not above the last one accepted from agent {agent:?} ({last})")]
    Replay { agent: String, seq: u64, last: u64 },
    #[error(
        "agent {agent:?} is also reported by another process (boot {live_boot}, heard {silent_ms} ms ago; this \
         one is boot {boot}): refused while that one reports. For a moment after an agent restarts this is \
         normal; if it lasts, two agents share this agent_id"
    )]
    Conflict {
        agent: String,
        boot: u64,
        live_boot: u64,
        silent_ms: u64,
    },
    #[error(
        "agent {agent:?} has its own key ([reports.agent_keys]): its reports must be signed with that key and \
         name it in {AGENT_HEADER}, and no other agent's key may sign them"
    )]
    WrongKey { agent: String },
    #[error(
        "instance id {instance:?} is not agent {agent:?}'s: an agent with its own key ([reports.agent_keys]) \
         reports only instance ids that begin with its own id and a slash (\"{agent}/\"), and no other agent \
         reports those"
    )]
    ForeignInstance { agent: String, instance: String },
}

/// A balancer's answer refusing a report, `{"error":{"code","message"}}` as every API error, plus, for a
/// replay, the last sequence number it accepted from the agent: an agent restarted after its clock stepped
/// back starts its numbers below its predecessor's, and continues above this one instead of being refused
/// until the balancer forgets its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub error: RefusalDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalDetail {
    /// [`ReportError::reason`].
    pub code: String,
    /// Before the message, which names the agent, so it is in whatever part of an answer a client keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    pub message: String,
}

impl Refusal {
    /// A refusal from its answer's body; `None` for a body that is none.
    pub fn decode(body: &[u8]) -> Option<Refusal> {
        serde_json::from_slice(body).ok()
    }

    /// The last sequence number a replay refusal names; `None` for any other refusal.
    pub fn replay_last_seq(&self) -> Option<u64> {
        (self.error.code == "replay")
            .then_some(self.error.last_seq)
            .flatten()
    }

    /// Whether it refused a second process under the agent's id ([`ReportError::Conflict`]).
    pub fn is_conflict(&self) -> bool {
        self.error.code == "conflict"
    }
}

impl ReportError {
    /// The body of the answer refusing a report for this reason.
    pub fn refusal(&self) -> Refusal {
        Refusal {
            error: RefusalDetail {
                code: self.reason().to_string(),
                last_seq: match self {
                    ReportError::Replay { last, .. } => Some(*last),
                    _ => None,
                },
                message: self.to_string(),
            },
        }
    }

    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReportError::MissingSignature => "missing_signature",
            ReportError::BadSignature => "bad_signature",
            ReportError::TooLarge => "too_large",
            ReportError::Malformed(_) => "malformed",
            ReportError::Skew { .. } => "skew",
            ReportError::Replay { .. } => "replay",
            ReportError::Conflict { .. } => "conflict",
            ReportError::WrongKey { .. } => "wrong_key",
            ReportError::ForeignInstance { .. } => "foreign_instance",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Signs `body` with `key`: the value of the signature header.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(body);
    format!("hmac-sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header value against `body` in constant time.
pub fn verify(key: &[u8], body: &[u8], header: &str) -> Result<(), ReportError> {
    let hex_sig = header
        .trim()
        .strip_prefix("hmac-sha256=")
        .ok_or(ReportError::BadSignature)?;
    let sig = hex::decode(hex_sig).map_err(|_| ReportError::BadSignature)?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| ReportError::BadSignature)?;
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| ReportError::BadSignature)
}

/// Decodes and validates a report body (size, JSON, ranges). Signature, skew and replay are checked by the
/// receiver, which knows the key, the clock and the last sequence numbers.
pub fn decode(body: &[u8]) -> Result<LoadReport, ReportError> {
    if body.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge);
    }
    let report: LoadReport =
        serde_json::from_slice(body).map_err(|e| ReportError::Malformed(e.to_string()))?;
    report.validate()?;
    Ok(report)
}

impl LoadReport {
    /// Checks every figure is in range.
    pub fn validate(&self) -> Result<(), ReportError> {
        let bad = |m: String| Err(ReportError::Malformed(m));
        if !valid_id(&self.agent) {
            return bad(format!("agent id {:?}: {ID_RULE}", shown(&self.agent)));
        }
        if self.instances.len() > MAX_INSTANCES {
            return bad(format!("{} instances, max {MAX_INSTANCES}", self.instances.len()));
        }
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !unit(self.host.cpu) || !unit(self.host.mem) || !nonneg(self.host.load1) {
            return bad("host cpu/mem must be in 0..=1 and load1 non-negative".into());
        }
        if self.host.cores == 0 || self.host.cores > 4096 {
            return bad(format!("host cores {} not in 1..=4096", self.host.cores));
        }
        let mut ids = std::collections::BTreeSet::new();
        for i in &self.instances {
            if !valid_id(&i.id) {
                return bad(format!("instance id {:?}: {ID_RULE}", shown(&i.id)));
            }
            if !ids.insert(i.id.as_str()) {
                return bad(format!("instance id {:?} repeated", i.id));
            }
            match i.addr.parse::<std::net::SocketAddr>() {
                Ok(a) if usable_addr(a) => {}
                _ => {
                    return bad(format!(
                        "instance {:?} has addr {:?}: {ADDR_RULE}",
                        i.id,
                        shown(&i.addr)
                    ));
                }
            }
            let rate_ok = nonneg(i.request_rate) && i.request_rate <= crate::stats::MAX_RATE;
            if !unit(i.error_rate) || !rate_ok || !nonneg(i.proc_cpu) {
                return bad(format!("instance {:?} has an out-of-range rate", i.id));
            }
            if i.types.len() > crate::stats::MAX_REQUEST_TYPES {
                return bad(format!("instance {:?} reports too many types", i.id));
            }
            for (name, t) in &i.types {
                if name.is_empty() || name.len() > 64 || !crate::stats::type_figures_ok(t) {
                    return bad(format!(
                        "instance {:?} type {name:?} has an out-of-range figure",
                        i.id
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> LoadReport {
        LoadReport {
            agent: "h".into(),
            seq: 1,
            boot: 1,
            timestamp_ms: 1,
            host: HostLoad {
                cpu: 0.1,
                mem: 0.2,
                load1: 0.3,
                cores: 2,
            },
            instances: vec![InstanceLoad {
                id: "h/app-1".into(),
                addr: "127.0.0.1:7101".into(),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn a_replay_refusal_names_the_last_number_within_what_a_client_keeps() {
        let longest = "a".repeat(MAX_ID_BYTES);
        let e = ReportError::Replay {
            agent: longest,
            seq: u64::MAX - 1,
            last: u64::MAX,
        };
        let body = serde_json::to_vec(&e.refusal()).unwrap();
        // runtime::client keeps 512 bytes of an error answer.
        assert!(body.len() <= 512, "{} bytes", body.len());
        let last = |body: &[u8]| Refusal::decode(body).and_then(|r| r.replay_last_seq());
        assert_eq!(last(&body), Some(u64::MAX));
        let other = serde_json::to_vec(&ReportError::TooLarge.refusal()).unwrap();
        assert_eq!(last(&other), None);
        assert!(!String::from_utf8(other).unwrap().contains("last_seq"));
        assert_eq!(last(b"{\"error\":"), None);
    }

    #[test]
    fn signature_roundtrip_and_tamper() {
        let body = serde_json::to_vec(&report()).unwrap();
        let sig = sign(b"k", &body);
        assert!(verify(b"k", &body, &sig).is_ok());
        assert_eq!(verify(b"other", &body, &sig), Err(ReportError::BadSignature));
        let mut tampered = body.clone();
        tampered[5] ^= 1;
        assert_eq!(verify(b"k", &tampered, &sig), Err(ReportError::BadSignature));
        assert_eq!(
            verify(b"k", &body, "hmac-sha256=zz"),
            Err(ReportError::BadSignature)
        );
        assert_eq!(verify(b"k", &body, "sha1=00"), Err(ReportError::BadSignature));
    }

    #[test]
    fn decode_rejects_bad_input() {
        assert!(matches!(decode(b"{"), Err(ReportError::Malformed(_))));
        assert_eq!(
            decode(&vec![b' '; MAX_REPORT_BYTES + 1]),
            Err(ReportError::TooLarge)
        );
        let mut r = report();
        r.host.cpu = 1.5;
        assert!(decode(&serde_json::to_vec(&r).unwrap()).is_err());
        let mut r = report();
        r.instances[0].addr = "nope".into();
        assert!(decode(&serde_json::to_vec(&r).unwrap()).is_err());
        let mut r = report();
        r.instances.push(r.instances[0].clone());
        assert!(decode(&serde_json::to_vec(&r).unwrap()).is_err(), "repeated id");
        // Addresses nobody can connect to, and ids that would carry control characters or markup.
        for addr in ["0.0.0.0:7101", "[::]:7101", "127.0.0.1:0"] {
            let mut r = report();
            r.instances[0].addr = addr.into();
            let e = decode(&serde_json::to_vec(&r).unwrap()).unwrap_err();
            assert!(e.to_string().contains("not 0.0.0.0"), "{addr}: {e}");
        }
        for id in [
            "ctrl\u{0}\n\u{1b}[31m",
            "<!--<script>",
            "a\u{202e}b",
            "",
            &"x".repeat(129),
        ] {
            let mut r = report();
            r.instances[0].id = id.into();
            assert!(decode(&serde_json::to_vec(&r).unwrap()).is_err(), "{id:?}");
            let mut r = report();
            r.agent = id.into();
            assert!(decode(&serde_json::to_vec(&r).unwrap()).is_err(), "agent {id:?}");
        }
        assert!(valid_id("host-a.example/app-1:2@x_y"));
    }

    /// Per-type figures past their bounds are refused (a rate of 1.7e308 made a balancer's smoothed
    /// service time NaN); at the bounds they are taken.
    #[test]
    fn figures_past_their_bounds_are_refused() {
        use crate::stats::{MAX_RATE, MAX_SERVICE_MS};
        let with = |rate: f64, service_ms: f64, request_rate: f64| {
            let mut r = report();
            r.instances[0].request_rate = request_rate;
            let t = TypeStats {
                rate,
                service_ms,
                error_rate: 0.0,
            };
            r.instances[0].types.insert("browse".into(), t);
            decode(&serde_json::to_vec(&r).unwrap())
        };
        assert!(with(MAX_RATE, MAX_SERVICE_MS, MAX_RATE).is_ok());
        for (rate, ms, total) in [
            (1.7e308, 1.0, 1.0),
            (MAX_RATE * 2.0, 1.0, 1.0),
            (1.0, MAX_SERVICE_MS * 2.0, 1.0),
            (1.0, 1.0, 1.7e308),
            (-1.0, 1.0, 1.0),
        ] {
            let e = with(rate, ms, total).unwrap_err();
            assert!(e.to_string().contains("out-of-range"), "{rate} {ms} {total}: {e}");
        }
    }
}
