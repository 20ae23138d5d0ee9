//! Wire types shared by every XCluster role and the SDK. No I/O lives here: only data, encoding and
//! validation, so every side of a protocol agrees on it by construction.
//!
//! - [`stats`]: app → agent (`GET /v1/stats` on an app instance).
//! - [`report`]: agent → balancer (`POST /v1/reports`, HMAC-signed).
//! - [`directory`]: balancer → client and dashboard (`/v1/servers`, `/v1/pick`, `/v1/status`).
//! - [`proxy_header`]: balancer's L4 proxy → backend (PROXY protocol v2).

/// The version of the wire protocol these types describe.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod directory;
pub mod proxy_header;
pub mod report;
pub mod stats;
