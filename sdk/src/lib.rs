//! The XCluster client SDK: picks a backend per request type from the balancers' weighted server lists and
//! connects to it directly, so request data never passes through a balancer.
//!
//! - [`Client::builder`] bootstraps from any live balancer, learns the others from the lists, and keeps one
//!   list per request type fresh with the balancers' long-poll watch (failing over between balancers).
//! - [`Client::pick`] / [`Client::connect`] choose an instance by power-of-two-choices over the published
//!   weights, sharpened by local feedback (in flight, latency EWMA, errors); an instance that refuses a
//!   connection or times out is ejected at once.
//! - [`Client::send`] / [`Client::send_idempotent`] send HTTP requests with hyper to the picked instance.
//! - Every call has a whole deadline ([`ClientBuilder::deadline`], [`Client::with_deadline`]), retries
//!   included; past it the call fails with [`Error::DeadlineExceeded`].
//! - With every balancer down the client keeps serving from its last lists up to `max_staleness` and says
//!   so in [`Client::state`] (static stability).
//!
//! ```no_run
//! # async fn demo() -> Result<(), xcluster_sdk::Error> {
//! use bytes::Bytes;
//! use http_body_util::Full;
//!
//! let client = xcluster_sdk::Client::builder()
//!     .balancers(["127.0.0.1:7000", "127.0.0.1:7001"])
//!     .request_types(["browse", "order"])
//!     .build()
//!     .await?;
//! let req = http::Request::get("/v1/products").body(Full::new(Bytes::new())).unwrap();
//! let resp = client.send_idempotent("browse", req).await?;
//! println!("{} {:?}", resp.status(), client.state().is_static());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod builder;
mod client;
mod directory;
mod error;
mod fetch;
mod http;
mod picker;
mod resolve;
mod retry;

pub use builder::{ClientBuilder, DEFAULT_DEADLINE};

/// Entry points for the fuzz targets (`fuzz/`): the decoders of what balancers send, callable without a
/// network. Not part of the supported API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::fetch::{decode_list_response, decode_pick_response};
}
pub use client::{Client, ClientState, Freshness, Picked, TypeState};
pub use error::{Error, Result, Side};
pub use http::{Backend, exchange};
pub use resolve::resolve;
