//! The dashboard: one self-contained HTML page (inline CSS and JS, no framework, nothing fetched from elsewhere)
//! that reads `/v1/status`, `/v1/cluster` and the `/v1/events` stream, with start/stop/restart buttons that send
//! the token a person typed in.

use http::{Response, StatusCode};
use xcluster_runtime::http::{Body, with_type};

const PAGE: &str = include_str!("dashboard.html");

pub(crate) fn page() -> Response<Body> {
    with_type(StatusCode::OK, "text/html; charset=utf-8", PAGE)
}
