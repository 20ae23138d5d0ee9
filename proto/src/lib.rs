//! Wire types shared by every XCluster role and the SDK. No I/O lives here: only data, encoding and
//! validation, so every side of a protocol agrees on it by construction.

/// The version of the wire protocol these types describe.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod stats;
