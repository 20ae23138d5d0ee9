//! The layer-4 TCP proxy mode of the balancer: listeners mapped to request types forward each connection to
//! a backend chosen through [`BackendPicker`], with redispatch, timeouts, the PROXY protocol (v2 sent on, v1
//! or v2 accepted from a front balancer), live reload and graceful drain. Config lives in `[proxy]`
//! ([`config`]).

mod access;
mod acl;
mod clients;
pub mod config;
mod conn;
mod forward;
mod handover;
mod health;
mod inbound;
mod limit;
mod listener;
pub mod metrics;
pub mod names;
pub mod pick;
mod queue;
mod rate;
mod service;
mod sni;
mod spin;
mod uring;

pub use config::{ProxyConfig, ProxySection};
pub use pick::{BackendPicker, OpenCount, PickFor, StaticPicker, WeightOverrides};
pub use service::{Error, ProxyHandle, start};
/// The ClientHello peek of `sni` routing, public for its fuzz target (`fuzz/fuzz_targets/sni.rs`): it reads
/// bytes from any client.
pub use sni::{MAX_RECORD as SNI_MAX_RECORD, Parsed as SniParsed, parse as parse_sni};
