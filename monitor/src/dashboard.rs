//! The dashboard: one self-contained HTML page (inline CSS and JS, no framework, nothing fetched from elsewhere)
//! that reads `/v1/status`, `/v1/cluster` and the `/v1/events` stream, with start/stop/restart buttons that send
//! the token a person typed in.

use http::{Response, StatusCode};
use xcluster_runtime::http::{Body, with_type};

const PAGE: &str = include_str!("dashboard.html");

/// The page with the current status, cluster view and recent events embedded, so it renders complete at once.
pub(crate) fn page(initial: &serde_json::Value) -> Response<Body> {
    // `</` must not appear inside the script element.
    let data = initial.to_string().replace("</", "<\\/");
    with_type(
        StatusCode::OK,
        "text/html; charset=utf-8",
        PAGE.replace("/*INITIAL*/", &data),
    )
}
