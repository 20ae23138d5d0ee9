//! The directory's HTTP API: `POST /v1/reports`, `GET /v1/servers?type=T[&watch=V[&wait_ms=N]]`, `GET /v1/pick?type=T`,
//! `POST /v1/servers/{id}/drain|undrain` (bearer token) and `GET /v1/status`. Every refusal is a JSON error
//! from `runtime::http::error` with a 4xx status; nothing here panics on input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_proto::directory::InstanceState;
use xcluster_proto::report::{self, AGENT_HEADER, MAX_REPORT_BYTES, ReportError, SIGNATURE_HEADER};
use xcluster_runtime::http::{
    Body, BodyError, Handler, authorize, error, json, method_not_allowed, percent_decode_path, query_pairs,
    read_body, with_type,
};

use super::{Directory, QueryError};
use crate::metrics;

/// How long a report body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory's request handler.
pub fn handler(dir: Directory) -> Handler {
    Arc::new(move |req, _peer| {
        let dir = dir.clone();
        Box::pin(async move { route(dir, req).await })
    })
}

async fn route(dir: Directory, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (path.as_str(), &method) {
        ("/v1/reports", &Method::POST) => reports(dir, req).await,
        ("/v1/servers", &Method::GET) => servers(dir, req.uri().query()).await,
        ("/v1/pick", &Method::GET) => pick(&dir, req.uri().query()),
        ("/v1/status", &Method::GET) => {
            let mut status = dir.status();
            status.proxy = crate::proxy::metrics::status(&xcluster_runtime::telemetry::render_metrics());
            // Drained by its address, or as the instance an agent reports there.
            let by_instance = (status.instances.iter())
                .filter(|i| i.state == Some(InstanceState::Drained))
                .map(|i| &i.addr);
            let drained: Vec<&String> = status.drained.iter().chain(by_instance).collect();
            for b in &mut status.proxy.backends {
                b.drained = drained.contains(&&b.addr);
            }
            json(StatusCode::OK, &status)
        }
        ("/v1/reports", _) => method_not_allowed(&method, &path, "POST"),
        ("/v1/servers" | "/v1/pick" | "/v1/status", _) => method_not_allowed(&method, &path, "GET"),
        _ => match drain_target(&path) {
            Some(_) if method != Method::POST => method_not_allowed(&method, &path, "POST"),
            Some(Err(why)) => error(StatusCode::BAD_REQUEST, "bad_id", &why),
            Some(Ok((id, on))) => drain(&dir, &req, &id, on),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            ),
        },
    }
}

async fn reports(dir: Directory, req: Request<Incoming>) -> Response<Body> {
    let signature = req
        .headers()
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().unwrap_or("<not ascii>").to_string());
    let agent = req
        .headers()
        .get(AGENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match read_body(req.into_body(), MAX_REPORT_BYTES, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => {
            if matches!(e, BodyError::TooLarge { .. }) {
                // Same code as every other rejection: the reason it is counted under.
                let err = ReportError::TooLarge;
                dir.count_rejection(&err);
                return error(StatusCode::PAYLOAD_TOO_LARGE, err.reason(), &err.to_string());
            }
            return e.response();
        }
    };
    match dir.ingest(&body, signature.as_deref(), agent.as_deref()) {
        Ok(r) => json(
            StatusCode::OK,
            &serde_json::json!({"accepted": true, "agent": r.agent, "seq": r.seq}),
        ),
        Err(e) => {
            let status = match e {
                ReportError::MissingSignature | ReportError::BadSignature => StatusCode::UNAUTHORIZED,
                ReportError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ReportError::Malformed(_) | ReportError::Skew { .. } => StatusCode::BAD_REQUEST,
                ReportError::Replay { .. } | ReportError::Conflict { .. } => StatusCode::CONFLICT,
                // Signed by a key the balancer knows, but not the reported agent's.
                ReportError::WrongKey { .. } => StatusCode::FORBIDDEN,
            };
            error(status, e.reason(), &e.to_string())
        }
    }
}

/// The parsed query of `/v1/servers` and `/v1/pick`.
struct Query {
    ty: String,
    watch: Option<u64>,
    /// How long the client asks a watch to be held (`wait_ms`); the balancer's `watch_timeout_ms` caps it.
    wait: Option<Duration>,
}

fn parse_query(query: Option<&str>, allow_watch: bool) -> Result<Query, String> {
    let pairs = query_pairs(query)?;
    let (mut ty, mut watch, mut wait) = (None, None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "type" if ty.is_none() => ty = Some(v),
            "watch" if allow_watch && watch.is_none() => {
                watch = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("watch must be a version number, found {v:?}"))?,
                )
            }
            "wait_ms" if allow_watch && wait.is_none() => {
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|ms| *ms >= 1)
                    .ok_or_else(|| format!("wait_ms must be a number of milliseconds, found {v:?}"))?;
                wait = Some(Duration::from_millis(ms));
            }
            "type" | "watch" | "wait_ms" if allow_watch || k == "type" => {
                return Err(format!("{k} given twice"));
            }
            other => {
                return Err(format!(
                    "unknown query parameter {:?}",
                    other.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    let ty = ty
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "the type parameter is required (?type=NAME)".to_string())?;
    if wait.is_some() && watch.is_none() {
        return Err("wait_ms goes with watch".into());
    }
    Ok(Query { ty, watch, wait })
}

fn query_error(e: &QueryError) -> Response<Body> {
    match e {
        QueryError::UnknownType { .. } => error(StatusCode::NOT_FOUND, "unknown_type", &e.to_string()),
        QueryError::NoInstance(_) => error(StatusCode::SERVICE_UNAVAILABLE, "no_instance", &e.to_string()),
    }
}

async fn servers(dir: Directory, query: Option<&str>) -> Response<Body> {
    let q = match parse_query(query, true) {
        Ok(q) => q,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_query", &m),
    };
    let result = match q.watch {
        None => {
            ::metrics::counter!(metrics::QUERIES_TOTAL, "endpoint" => "servers").increment(1);
            dir.servers_json(&q.ty)
        }
        Some(v) => {
            ::metrics::counter!(metrics::QUERIES_TOTAL, "endpoint" => "watch").increment(1);
            let most = dir.settings().params.watch_timeout;
            let timeout = q.wait.map_or(most, |w| w.min(most));
            dir.watch(&q.ty, v, timeout).await
        }
    };
    match result {
        Ok((_, body)) => with_type(StatusCode::OK, "application/json", body),
        Err(e) => query_error(&e),
    }
}

fn pick(dir: &Directory, query: Option<&str>) -> Response<Body> {
    let q = match parse_query(query, false) {
        Ok(q) => q,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_query", &m),
    };
    ::metrics::counter!(metrics::QUERIES_TOTAL, "endpoint" => "pick").increment(1);
    match dir.pick_answer(&q.ty) {
        Ok(p) => json(StatusCode::OK, &p),
        Err(e) => query_error(&e),
    }
}

/// `/v1/servers/{id}/drain` or `/undrain` → (decoded id, drain?), or why the id cannot be one; `None` for
/// another path. Ids may contain `/` (`host/app-1`).
fn drain_target(path: &str) -> Option<Result<(String, bool), String>> {
    let rest = path.strip_prefix("/v1/servers/")?;
    let (raw, on) = if let Some(id) = rest.strip_suffix("/drain") {
        (id, true)
    } else {
        (rest.strip_suffix("/undrain")?, false)
    };
    let decoded = (raw.len() <= 3 * report::MAX_ID_BYTES)
        .then(|| percent_decode_path(raw).ok())
        .flatten()
        // A proxy backend's address may be IPv6 (`[::1]:8001`), whose brackets no id holds.
        .filter(|id| report::valid_id(id) || id.parse::<SocketAddr>().is_ok());
    Some(decoded.map(|id| (id, on)).ok_or_else(|| {
        let raw = report::shown(raw);
        format!(
            "instance id {raw:?}: {}, or a proxy backend's IP:PORT",
            report::ID_RULE
        )
    }))
}

fn drain(dir: &Directory, req: &Request<Incoming>, id: &str, on: bool) -> Response<Body> {
    if let Err(refused) = authorize(req, &dir.settings().admin_token, "[admin] token") {
        return refused;
    }
    if let Some(id) = dir.set_drained(id, on) {
        tracing::info!(instance = id, drained = on, "drain state changed");
        json(StatusCode::OK, &serde_json::json!({"id": id, "drained": on}))
    } else {
        error(
            StatusCode::NOT_FOUND,
            "unknown_instance",
            &unknown_instance(dir, id),
        )
    }
}

/// Says which ids there are: a program's name (`app-1`) is not its instance id (`local/app-1`).
fn unknown_instance(dir: &Directory, id: &str) -> String {
    const SHOWN: usize = 8;
    let ids = dir.instance_ids();
    let suffix = format!("/{id}");
    let addr = id.parse::<SocketAddr>().ok();
    // An instance is drained by its id, not by its address.
    let at_addr = addr.and_then(|a| dir.instance_at(a));
    let mut msg = if addr.is_some() {
        format!("no instance {id:?} in the table, and no [[proxy.backends]] at that address")
    } else {
        format!("no instance {id:?} in the table")
    };
    if let Some(i) = at_addr {
        msg += &format!("; the instance at that address is {i:?}");
    } else if let [only] = ids.iter().filter(|k| k.ends_with(&suffix)).collect::<Vec<_>>()[..] {
        msg += &format!("; did you mean {only:?}?");
    } else if !ids.is_empty() {
        let shown: Vec<&str> = ids.iter().take(SHOWN).map(String::as_str).collect();
        let more = ids.len().saturating_sub(SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        msg += &format!(" (known: {}{more})", shown.join(", "));
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn drain_paths() {
        assert_eq!(
            drain_target("/v1/servers/h%2Fa/drain"),
            Some(Ok(("h/a".into(), true)))
        );
        assert_eq!(
            drain_target("/v1/servers/h/a/undrain"),
            Some(Ok(("h/a".into(), false)))
        );
        assert!(matches!(drain_target("/v1/servers//drain"), Some(Err(_))));
        let long = format!("/v1/servers/{}/drain", "a".repeat(400));
        assert!(matches!(drain_target(&long), Some(Err(_))));
        assert!(
            matches!(drain_target("/v1/servers/a%3Cb/drain"), Some(Err(_))),
            "not an id's charset"
        );
        assert!(matches!(drain_target("/v1/servers/a%zz/drain"), Some(Err(_))));
        assert_eq!(drain_target("/v1/servers/x/other"), None);
        // A proxy backend's IPv6 address, brackets and all; brackets alone are no id.
        assert_eq!(
            drain_target("/v1/servers/%5B::1%5D:8001/drain"),
            Some(Ok(("[::1]:8001".into(), true)))
        );
        assert!(matches!(drain_target("/v1/servers/[x]/drain"), Some(Err(_))));
    }

    #[test]
    fn queries() {
        assert_eq!(
            parse_query(Some("type=browse&watch=5"), true).ok().unwrap().watch,
            Some(5)
        );
        assert!(parse_query(Some("type=browse&watch=5"), false).is_err());
        assert!(parse_query(Some("type=a&type=b"), true).is_err());
        assert!(parse_query(Some("watch=x&type=a"), true).is_err());
        let q = parse_query(Some("type=a&watch=3&wait_ms=1500"), true)
            .ok()
            .unwrap();
        assert_eq!(q.wait, Some(Duration::from_millis(1500)));
        for bad in [
            "type=a&wait_ms=5",
            "type=a&watch=3&wait_ms=0",
            "type=a&watch=3&wait_ms=x",
        ] {
            assert!(parse_query(Some(bad), true).is_err(), "{bad}");
        }
        assert!(parse_query(Some("type=a&watch=3&wait_ms=5"), false).is_err());
        assert!(parse_query(None, true).is_err());
        assert!(parse_query(Some("type="), true).is_err());
        assert!(parse_query(Some("bogus=1&type=a"), true).is_err());
    }
}
