//! The directory's HTTP API: `POST /v1/reports`, `GET /v1/servers?type=T[&watch=V[&wait_ms=N]]`, `GET /v1/pick?type=T`,
//! `POST /v1/servers/{id}/drain|undrain` and `POST /v1/servers/{id}/weight/{50%|7}` (bearer token) and
//! `GET /v1/status`. Every refusal is a JSON error
//! from `runtime::http::error` with a 4xx status; nothing here panics on input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_proto::directory::{InstanceState, ServerAction, WeightSet};
use xcluster_proto::report::{self, AGENT_HEADER, MAX_REPORT_BYTES, ReportError, SIGNATURE_HEADER};
use xcluster_runtime::http::{
    Body, BodyError, Handler, authorize, error, json, method_not_allowed, percent_decode_path, query_pairs,
    read_body, with_type,
};

use super::{Directory, QueryError, SetWeightError};
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
            match status_only(req.uri().query()) {
                Ok(false) => {}
                Ok(true) => return json(StatusCode::OK, &super::peers::state_answer(&dir)),
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_query", &m),
            }
            let mut status = dir.status();
            status.proxy = crate::proxy::metrics::status(&xcluster_runtime::telemetry::render_metrics());
            // Drained by its address, or as the instance an agent reports there.
            let by_instance = (status.instances.iter())
                .filter(|i| i.state == Some(InstanceState::Drained))
                .map(|i| &i.addr);
            let drained: Vec<&String> = status.drained.iter().chain(by_instance).collect();
            for b in &mut status.proxy.backends {
                b.drained = drained.contains(&&b.addr);
                b.weight_set = status.weights.get(&b.addr).cloned();
                let set = b.weight_set.as_deref().and_then(|w| w.parse::<WeightSet>().ok());
                b.effective_weight = b.weight.map(|w| match (b.drained, set) {
                    (true, _) => 0,
                    (false, Some(set)) => u64::from(set.apply(u32::try_from(w).unwrap_or(u32::MAX))),
                    (false, None) => w,
                });
            }
            json(StatusCode::OK, &status)
        }
        ("/v1/reports", _) => method_not_allowed(&method, &path, "POST"),
        ("/v1/servers" | "/v1/pick" | "/v1/status", _) => method_not_allowed(&method, &path, "GET"),
        _ => match server_action(&path) {
            Some(_) if method != Method::POST => method_not_allowed(&method, &path, "POST"),
            Some(Err((code, why))) => error(StatusCode::BAD_REQUEST, code, &why),
            Some(Ok(_)) if dir.starting() => {
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "starting",
                    "this balancer is starting: it takes its peers' drains and weights first; retry in a moment",
                );
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::header::HeaderValue::from_static("1"),
                );
                r
            }
            Some(Ok((id, action))) => {
                let answer = match action {
                    ServerAction::Drain(on) => drain(&dir, &req, &id, on),
                    ServerAction::Weight(set) => weight(&dir, &req, &id, set),
                };
                // Answered once the state file (if any) has the change: a call that was answered outlives a
                // `kill -9` of every balancer.
                if answer.status() == StatusCode::OK {
                    dir.save_state().await;
                }
                answer
            }
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            ),
        },
    }
}

/// Whether `/v1/status` was asked `?only=state` (the run-time state a starting peer reads, bounded in size
/// where the whole status grows with the instances and their types). Other parameters are ignored, as they
/// were before this one.
fn status_only(query: Option<&str>) -> Result<bool, String> {
    let pairs = query_pairs(query)?;
    match pairs.iter().find(|(k, _)| k == "only") {
        None => Ok(false),
        Some((_, v)) if v == "state" => Ok(true),
        Some((_, v)) => Err(format!(
            "only={v:?}: the one part /v1/status answers alone is `state`"
        )),
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
                return json(StatusCode::PAYLOAD_TOO_LARGE, &err.refusal());
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
                // Signed by the right key, naming an instance another agent owns.
                ReportError::ForeignInstance { .. } => StatusCode::FORBIDDEN,
            };
            json(status, &e.refusal())
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

/// A 400's error code and why.
type Refusal = (&'static str, String);

/// `/v1/servers/{id}/drain`, `/undrain` or `/weight/{value}` → (decoded id, action), or the error code and
/// why not; `None` for another path. Ids may contain `/` (`host/app-1`).
fn server_action(path: &str) -> Option<Result<(String, ServerAction), Refusal>> {
    let rest = path.strip_prefix("/v1/servers/")?;
    let (raw, action) = if let Some(id) = rest.strip_suffix("/drain") {
        (id, Ok(ServerAction::Drain(true)))
    } else if let Some(id) = rest.strip_suffix("/undrain") {
        (id, Ok(ServerAction::Drain(false)))
    } else {
        let (before, value) = rest.rsplit_once('/')?;
        let id = before.strip_suffix("/weight")?;
        let set = (value.len() <= 64)
            .then(|| percent_decode_path(value).ok())
            .flatten()
            .ok_or_else(|| "a weight is `50%` (sent as `50%25`) or `7`".to_string())
            .and_then(|v| v.parse::<WeightSet>());
        (id, set.map(ServerAction::Weight))
    };
    let decoded = (raw.len() <= 3 * report::MAX_ID_BYTES)
        .then(|| percent_decode_path(raw).ok())
        .flatten();
    let Some(id) = decoded.clone().filter(|id| super::valid_server_id(id)) else {
        // The id as the user wrote it (`%`, not the `%25` it travelled as), when it decodes.
        let shown = report::shown(decoded.as_deref().unwrap_or(raw));
        let why = format!(
            "instance id {shown:?}: {}, or a proxy backend's IP:PORT",
            report::ID_RULE
        );
        return Some(Err(("bad_id", why)));
    };
    Some(action.map(|a| (id, a)).map_err(|why| ("bad_weight", why)))
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

fn weight(dir: &Directory, req: &Request<Incoming>, id: &str, set: WeightSet) -> Response<Body> {
    if let Err(refused) = authorize(req, &dir.settings().admin_token, "[admin] token") {
        return refused;
    }
    match dir.set_weight(id, set) {
        Ok(id) => {
            tracing::info!(instance = id, weight = %set, "run-time weight set");
            json(
                StatusCode::OK,
                &serde_json::json!({"id": id, "weight": set.to_string()}),
            )
        }
        Err(SetWeightError::Unknown) => error(
            StatusCode::NOT_FOUND,
            "unknown_instance",
            &unknown_instance(dir, id),
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, "bad_weight", &e.to_string()),
    }
}

/// Says which ids there are: a program's name (`app-1`) is not its instance id (`local/app-1`).
fn unknown_instance(dir: &Directory, id: &str) -> String {
    const SHOWN: usize = 8;
    // The instances, then the configured backends, which are named by their addresses.
    let backends = dir
        .settings()
        .proxy_backends
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    let ids: Vec<String> = dir.instance_ids().into_iter().chain(backends).collect();
    let suffix = format!("/{id}");
    let addr = id.parse::<SocketAddr>().ok();
    // An instance is drained by its id, not by its address.
    let at_addr = addr.and_then(|a| dir.instance_at(a));
    let mut msg = if addr.is_some() {
        format!("no instance {id:?} in the table, and no [[proxy.backends]] at that address")
    } else {
        format!(
            "no instance {id:?} in the table{}",
            xcluster_proto::bracket_hint(id).unwrap_or_default()
        )
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
    fn server_action_paths() {
        let ok = |id: &str, a: ServerAction| Some(Ok((id.to_string(), a)));
        let refused = |path: &str| matches!(server_action(path), Some(Err(_)));
        assert_eq!(
            server_action("/v1/servers/h%2Fa/drain"),
            ok("h/a", ServerAction::Drain(true))
        );
        assert_eq!(
            server_action("/v1/servers/h/a/undrain"),
            ok("h/a", ServerAction::Drain(false))
        );
        assert!(refused("/v1/servers//drain"));
        let long = format!("/v1/servers/{}/drain", "a".repeat(400));
        assert!(refused(&long));
        assert!(refused("/v1/servers/a%3Cb/drain"), "not an id's charset");
        let Some(Err((_, why))) = server_action("/v1/servers/%25/weight/10%25") else {
            panic!("a lone % is no id");
        };
        assert!(why.starts_with("instance id \"%\":"), "{why}");
        assert!(refused("/v1/servers/a%zz/drain"));
        assert_eq!(server_action("/v1/servers/x/other"), None);
        // A proxy backend's IPv6 address, brackets and all; brackets alone are no id.
        assert_eq!(
            server_action("/v1/servers/%5B::1%5D:8001/drain"),
            ok("[::1]:8001", ServerAction::Drain(true))
        );
        assert!(refused("/v1/servers/[x]/drain"));
        // Weights: a percentage (its `%` encoded) or a backend's own weight; an id may hold `/`.
        assert_eq!(
            server_action("/v1/servers/h/a/weight/25%25"),
            ok("h/a", ServerAction::Weight(WeightSet::Percent(25)))
        );
        assert_eq!(
            server_action("/v1/servers/127.0.0.1:8001/weight/7"),
            ok("127.0.0.1:8001", ServerAction::Weight(WeightSet::Absolute(7)))
        );
        for bad in ["-1", "1001%25", "x", "", "5%25%25", "%zz", "99999999"] {
            let got = server_action(&format!("/v1/servers/h/a/weight/{bad}"));
            assert!(matches!(got, Some(Err(("bad_weight", _)))), "{bad}: {got:?}");
        }
        assert_eq!(server_action("/v1/servers/h/a/weigh/5"), None);
        // What the monitor sends, read back.
        for a in [
            "drain",
            "undrain",
            "weight/0%25",
            "weight/1000%25",
            "weight/1000000",
        ] {
            let Some(Ok((id, action))) = server_action(&format!("/v1/servers/h/a/{a}")) else {
                panic!("{a}");
            };
            assert_eq!((id.as_str(), action.path().as_str()), ("h/a", a));
        }
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

    #[test]
    fn status_answers_the_state_alone_when_asked() {
        assert_eq!(status_only(None), Ok(false));
        // Other parameters are ignored, as before (a cache-buster on a dashboard's fetch).
        assert_eq!(status_only(Some("_=123")), Ok(false));
        assert_eq!(status_only(Some("only=state")), Ok(true));
        assert!(status_only(Some("only=types")).unwrap_err().contains("`state`"));
    }
}
