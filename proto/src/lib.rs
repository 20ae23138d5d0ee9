//! Wire types shared by every XCluster role and the SDK. No I/O lives here: only data, encoding and
//! validation, so every side of a protocol agrees on it by construction.
//!
//! - [`stats`]: app → agent (`GET /v1/stats` on an app instance).
//! - [`report`]: agent → balancer (`POST /v1/reports`, HMAC-signed).
//! - [`directory`]: balancer → client and dashboard (`/v1/servers`, `/v1/pick`, `/v1/status`).
//! - [`proxy_header`]: balancer's L4 proxy → backend (PROXY protocol v2).
//! - [`buyer`]: a shop's login service → XBuy (buyer tokens, HMAC-signed).
//! - [`local_error`]: which socket errors are the local host's, not the peer's (the proxy and the SDK).

/// The version of the wire protocol these types describe.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod buyer;
pub mod directory;

/// The hint for an IPv6 address and port written without brackets (`::1:7103`), which no `SocketAddr`
/// parser takes: `; an IPv6 address takes brackets: [::1]:7103`. `None` for anything else.
///
/// ```
/// assert!(xcluster_proto::bracket_hint("::1:7103").unwrap().ends_with("[::1]:7103"));
/// assert_eq!(xcluster_proto::bracket_hint("127.0.0.1:7103"), None);
/// ```
pub fn bracket_hint(value: &str) -> Option<String> {
    let (ip, port) = value.trim().rsplit_once(':')?;
    ip.parse::<std::net::Ipv6Addr>().ok()?;
    port.parse::<u16>().ok()?;
    Some(format!("; an IPv6 address takes brackets: [{ip}]:{port}"))
}
pub mod local_error;
pub mod proxy_header;
pub mod report;
pub mod stats;
