//! The control API (HTTP/JSON on the monitor's `listen` address): status, start/stop/restart/signal, log tail and
//! follow, avail, reread, update (all or named programs), shutdown, the event stream, the cluster view and the
//! dashboard page. Reads are open; every POST needs `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use xcluster_runtime::config::ConfigSource;
use xcluster_runtime::http::{
    Body, Handler, authorize, error, json, method_not_allowed, percent_decode_path, query_pairs, read_body,
    with_type,
};
use xcluster_runtime::reload::{Cause, Reloader};

use xcluster_proto::directory::{ServerAction, WeightSet};

use crate::config::Config;
use crate::events::Bus;
use crate::status::{Command, CommandError, Only, Reply, Request as CmdRequest, Snapshot};
use crate::supervisor::unix_ms;

/// Largest request body (a signal name).
const MAX_BODY: usize = 4096;
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a command waits, to be taken by the supervisor and answered, in all: under `ctl`'s
/// `--timeout-secs` (10 by default), so that `ctl` reads the `504 command_timeout` of a command taken and not
/// answered (exit 1: it may have been carried out) instead of timing out itself (exit 69: try again). Each of
/// the two waits had 10 s of its own.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(8);

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct Api {
    pub commands: mpsc::Sender<CmdRequest>,
    pub status: watch::Receiver<Arc<Snapshot>>,
    pub config: watch::Receiver<Arc<Config>>,
    pub bus: Bus,
    pub source: ConfigSource,
    /// The raw config the monitor started with: `reread` and `update` keep its restart keys, as a reload does.
    pub started: Arc<crate::config::RawConfig>,
    pub reloader: Reloader,
    pub drain: CancellationToken,
    pub started_unix_ms: u64,
    pub cluster_views: Arc<crate::cluster::ViewCache>,
}

/// Events a dashboard page shows, so what it is served with and asks to be replayed.
const PAGE_EVENTS: usize = 200;

/// The method a known path takes (each takes one), for the 405 of a path asked with another.
fn allowed(segs: &[&str]) -> Option<&'static str> {
    match segs {
        [""]
        | ["v1", "status" | "cluster" | "events" | "log" | "avail"]
        | ["v1", "events", "recent"]
        | ["v1", "programs", _, "log"] => Some("GET"),
        ["v1", "reread" | "update" | "shutdown"]
        | [
            "v1",
            "programs",
            _,
            "start" | "stop" | "restart" | "clear" | "signal",
        ] => Some("POST"),
        ["v1", "cluster", "servers", id @ .., "drain" | "undrain"] if !id.is_empty() => Some("POST"),
        ["v1", "cluster", "servers", id @ .., "weight", _] if !id.is_empty() => Some("POST"),
        _ => None,
    }
}

impl Api {
    pub fn handler(self) -> Handler {
        let api = Arc::new(self);
        Arc::new(move |req, _peer| {
            let api = api.clone();
            Box::pin(async move { api.route(req).await })
        })
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        // Route before the token check: an unknown path is a 404 and a known one asked with the wrong method a
        // 405, token or not (a 401 for a path that does not exist would send a client looking for a token that
        // cannot help). Only what would act needs the token.
        match allowed(&segs) {
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no such endpoint: {method} {path}"),
                );
            }
            Some(allow) if allow != method.as_str() => return method_not_allowed(&method, &path, allow),
            Some(_) => {}
        }
        if method == Method::POST
            && let Err(refused) = authorize(&req, &self.config.borrow().token, "token or token_file")
        {
            return refused;
        }
        match (&method, segs.as_slice()) {
            (&Method::GET, [""]) => {
                let cfg = self.config.borrow().clone();
                let cluster = self.cluster_views.get(&cfg.balancers, cfg.cluster_timeout).await;
                let (history, _) = self.bus.subscribe();
                let skip = history.len().saturating_sub(PAGE_EVENTS);
                let events: Vec<&crate::events::Event> = history.iter().skip(skip).map(|e| &**e).collect();
                let initial = json!({
                    "status": self.status_json(),
                    "cluster": &*cluster,
                    "events": events,
                    "boot": self.started_unix_ms,
                });
                crate::dashboard::page(&initial)
            }
            (&Method::GET, ["v1", "status"]) => json(StatusCode::OK, &self.status_json()),
            (&Method::GET, ["v1", "events"]) => match EventsFrom::parse(&req) {
                Ok(from) => self.events_stream(from),
                Err(resp) => resp,
            },
            (&Method::GET, ["v1", "events", "recent"]) => {
                let (history, _) = self.bus.subscribe();
                let events: Vec<&crate::events::Event> = history.iter().map(|e| &**e).collect();
                json(StatusCode::OK, &json!({ "events": events }))
            }
            (&Method::GET, ["v1", "cluster"]) => {
                let cfg = self.config.borrow().clone();
                json(
                    StatusCode::OK,
                    &*self.cluster_views.get(&cfg.balancers, cfg.cluster_timeout).await,
                )
            }
            (&Method::GET, ["v1", "log"]) => self.own_log(req.uri().query()).await,
            (&Method::GET, ["v1", "programs", name, "log"]) => match decode(name) {
                Ok(name) => self.log(&name, req.uri().query()).await,
                Err(resp) => resp,
            },
            // An instance id may hold `/` (`host/app-1`), sent as `%2F` or as it is.
            (&Method::POST, ["v1", "cluster", "servers", id @ .., verb @ ("drain" | "undrain")])
                if !id.is_empty() =>
            {
                match decode_id(id) {
                    Ok(id) => {
                        self.server_action(&id, ServerAction::Drain(*verb == "drain"))
                            .await
                    }
                    Err(()) => bad_path(&id.join("/")),
                }
            }
            (&Method::POST, ["v1", "cluster", "servers", id @ .., "weight", value]) if !id.is_empty() => {
                let set = percent_decode_path(value).map(|v| v.parse::<WeightSet>());
                match (decode_id(id), set) {
                    (Ok(id), Ok(Ok(set))) => self.server_action(&id, ServerAction::Weight(set)).await,
                    (_, Ok(Err(why))) => error(StatusCode::BAD_REQUEST, "bad_weight", &why),
                    (_, Err(_)) => bad_path(value),
                    (Err(()), _) => bad_path(&id.join("/")),
                }
            }
            // `name` may list several, comma-separated (no program name holds a comma): one command, so a
            // stop of several stops dependents first.
            (&Method::POST, ["v1", "programs", name, verb]) => {
                let names: Vec<String> = match decode(name) {
                    Ok(n) => n.split(',').map(str::to_string).collect(),
                    Err(resp) => return resp,
                };
                let cmd = match *verb {
                    "start" => Command::Start(names),
                    "stop" => Command::Stop(names),
                    "restart" => match restart_query(req.uri().query()) {
                        Ok(Some(limit)) => Command::Roll(names, limit),
                        Ok(None) => Command::Restart(names),
                        Err(resp) => return resp,
                    },
                    "clear" => Command::Clear(names),
                    "signal" => match signal_of(req).await {
                        Ok(sig) => Command::Signal(names, sig),
                        Err(resp) => return resp,
                    },
                    _ => {
                        return error(
                            StatusCode::NOT_FOUND,
                            "not_found",
                            &format!("no such action: {verb}"),
                        );
                    }
                };
                self.call(cmd).await
            }
            (&Method::GET, ["v1", "avail"]) => match self.load(false) {
                Ok(cfg) => self.call(Command::Avail(cfg)).await,
                Err(resp) => resp,
            },
            (&Method::POST, ["v1", "reread"]) => match self.load(true) {
                Ok(cfg) => self.call(Command::Plan(cfg)).await,
                Err(resp) => resp,
            },
            (&Method::POST, ["v1", "update"]) => {
                let (rolling, names, only) = match update_query(req.uri().query()) {
                    Ok(q) => q,
                    Err(resp) => return resp,
                };
                let resp = match self.load(true) {
                    Ok(cfg) => self.call(Command::Update(cfg, rolling, names, only)).await,
                    Err(resp) => resp,
                };
                // The runtime's reloader records the outcome (shown in status and metrics) and publishes the
                // new snapshot, which the supervisor applies again: a no-op after this update (a rolling one
                // leaves each changed program's new spec pending, which counts as applied), so it comes after,
                // and not at all after a refusal (a rolling update refused while a roll runs must not become
                // a plain one).
                if resp.status().is_success() {
                    self.reloader.trigger(Cause::Api);
                }
                resp
            }
            (&Method::POST, ["v1", "shutdown"]) => self.call(Command::Shutdown).await,
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {method} {path}"),
            ),
        }
    }

    /// Drains, undrains or sets the weight of instance `id` on every balancer (see
    /// `cluster::server_action`): 200 with each one's result, whatever they are.
    async fn server_action(&self, id: &str, action: ServerAction) -> Response<Body> {
        if id.is_empty() || id.len() > xcluster_proto::report::MAX_ID_BYTES {
            let msg = format!(
                "an instance id is 1 to {} bytes",
                xcluster_proto::report::MAX_ID_BYTES
            );
            return error(StatusCode::BAD_REQUEST, "bad_id", &msg);
        }
        let cfg = self.config.borrow().clone();
        if cfg.balancers.is_empty() {
            return error(
                StatusCode::CONFLICT,
                "no_balancers",
                "no balancers configured ([cluster] balancers)",
            );
        }
        let results =
            crate::cluster::server_action(&cfg.balancers, id, action, &cfg.token, cfg.cluster_timeout).await;
        self.cluster_views.forget().await;
        for r in &results {
            tracing::info!(balancer = %r.balancer, instance = id, result = r.result, "{}", r.outcome);
        }
        json(StatusCode::OK, &json!({ "results": results }))
    }

    fn status_json(&self) -> serde_json::Value {
        let snap = self.status.borrow().clone();
        let now = unix_ms();
        let mut programs = snap.programs.clone();
        for p in &mut programs {
            p.uptime_ms = p.started_unix_ms.map(|s| now.saturating_sub(s));
        }
        json!({
            "monitor": {
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_ms": now.saturating_sub(self.started_unix_ms),
                "shutting_down": snap.shutting_down,
                "event_subscribers": self.bus.subscribers(),
            },
            "reload": *self.reloader.status().borrow(),
            "programs": programs,
            "roll": snap.roll,
            "past_rolls": *snap.past_rolls,
            "pending": snap.pending,
            "groups": *snap.groups,
        })
    }

    /// Reads the config for `avail`, `reread` and `update`; with `record` (the token-guarded calls that
    /// would act on it) a rejection is recorded as a failed reload. `avail` is a read anyone may make: had
    /// it recorded, each call on a file mid-edit raised the failed-reload counter and alert, logged a
    /// warning and published an event that pushed real history out of the bus.
    #[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
    fn load(&self, record: bool) -> Result<Arc<Config>, Response<Body>> {
        xcluster_runtime::config::reload::<Config>(&self.source, &self.started)
            .map(|l| Arc::new(l.config))
            .map_err(|e| {
                if record {
                    self.reloader.rejected(&e.to_string());
                }
                let body = json!({ "error": { "code": "invalid_config", "message": e.to_string(), "issues": e.issues() } });
                json(StatusCode::BAD_REQUEST, &body)
            })
    }

    async fn call(&self, cmd: Command) -> Response<Body> {
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
        let sent = tokio::time::timeout_at(deadline, self.commands.send((cmd, tx))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the supervisor is not accepting commands",
            );
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(Reply::Results(results)))) => json(StatusCode::OK, &json!({ "results": results })),
            Ok(Ok(Ok(Reply::Plan(plan)))) => json(StatusCode::OK, &plan),
            Ok(Ok(Ok(Reply::Roll(roll)))) => json(StatusCode::OK, &json!({ "roll": roll })),
            Ok(Ok(Ok(Reply::Avail(programs)))) => json(StatusCode::OK, &json!({ "programs": programs })),
            Ok(Ok(Ok(Reply::Done))) => json(StatusCode::OK, &json!({ "ok": true })),
            Ok(Ok(Err(e))) => {
                let (status, code) = match e {
                    CommandError::Unknown(_) => (StatusCode::NOT_FOUND, "unknown_program"),
                    CommandError::NoNames => (StatusCode::BAD_REQUEST, "no_names"),
                    CommandError::ShuttingDown => (StatusCode::CONFLICT, "shutting_down"),
                    CommandError::Rolling(_) => (StatusCode::CONFLICT, "rolling"),
                    CommandError::Partial(_) => (StatusCode::CONFLICT, "partial_update"),
                };
                error(status, code, &e.to_string())
            }
            // Taken, and perhaps carried out: not a 503, which a client may send again (a second update
            // or restart).
            _ => error(
                StatusCode::GATEWAY_TIMEOUT,
                "command_timeout",
                "the supervisor took the command but did not answer in time: see `status` for its outcome",
            ),
        }
    }

    async fn log(&self, name: &str, query: Option<&str>) -> Response<Body> {
        let (q, bytes, follow) = match LogQuery::parse(query) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let stream = q.get("stream").unwrap_or("stdout");
        let snap = self.status.borrow().clone();
        let matches: Vec<_> = snap
            .programs
            .iter()
            .filter(|p| p.name == name || p.group == name)
            .collect();
        let p = match matches.as_slice() {
            [one] => *one,
            [] => {
                return error(
                    StatusCode::NOT_FOUND,
                    "unknown_program",
                    &format!("no such process: {name}"),
                );
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "ambiguous",
                    &format!("{name} is a group; name one process"),
                );
            }
        };
        let (path, live) = match stream {
            "stdout" => (&p.stdout_log, &p.outputs.stdout),
            "stderr" if p.stderr_redirected => {
                let msg = format!("{name}'s stderr goes to its stdout (redirect_stderr): tail stdout");
                return error(StatusCode::BAD_REQUEST, "no_log", &msg);
            }
            "stderr" => (&p.stderr_log, &p.outputs.stderr),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    &format!("unknown stream {other:?}"),
                );
            }
        };
        let Some(path) = path else {
            let msg = format!("{name} keeps no {stream} log ({stream}_logfile = \"none\")");
            return error(StatusCode::NOT_FOUND, "no_log", &msg);
        };
        // What the program writes from now on, as its log file gets it.
        let more = crate::logs::follow(live.subscribe());
        self.log_answer(path, bytes, follow, more).await
    }

    /// `GET /v1/log?bytes=N[&follow=1]`: the monitor's own log (supervisorctl's `maintail`), when its stderr
    /// is a file, as `xcluster up --detach` makes it; followed by reading what the file gains, since the
    /// monitor's log lines go to stderr from the log writer's thread, past any channel here.
    async fn own_log(&self, query: Option<&str>) -> Response<Body> {
        let (_, bytes, follow) = match LogQuery::parse(query) {
            Ok(q) => q,
            Err(resp) => return resp,
        };
        let Some(path) = crate::logs::own_log_file() else {
            let msg = "the monitor's log is not a file (its stderr is a terminal, a pipe or the journal): read it \
                       where the monitor was started, or start it with `xcluster up --detach`";
            return error(StatusCode::NOT_FOUND, "no_log", msg);
        };
        // What the file gains from now on, read every FOLLOW_POLL; measured before the head is read, so a
        // line written in between is shown twice rather than lost.
        let at = std::fs::metadata(&path).map_or(0, |m| m.len());
        let more = futures_util::stream::unfold((path.clone(), at), |(path, mut at)| async move {
            loop {
                tokio::time::sleep(FOLLOW_POLL).await;
                match crate::logs::read_from(&path, &mut at, FOLLOW_CHUNK).await {
                    Ok(chunk) if chunk.is_empty() => continue,
                    Ok(chunk) => return Some((Bytes::from(chunk), (path, at))),
                    Err(_) => return None,
                }
            }
        });
        self.log_answer(&path, bytes, follow, more).await
    }

    /// A log's last `bytes` (whole lines), and with `follow` what `more` yields after them, until the client
    /// goes, the monitor drains or `more` ends.
    async fn log_answer(
        &self,
        path: &std::path::Path,
        bytes: u64,
        follow: bool,
        more: impl futures_util::Stream<Item = Bytes> + Send + 'static,
    ) -> Response<Body> {
        let head = match log_head(path, bytes).await {
            Ok(Some(head)) => head,
            // Output going to a device is still on the program's live feed: followed, it is shown from now.
            Ok(None) if follow => Vec::new(),
            Ok(None) => {
                let msg = format!(
                    "{} is a device or a pipe, not a file, so it keeps nothing to tail; follow it \
                     (`xcluster ctl tail -f`) to see what is written from now on",
                    path.display()
                );
                return error(StatusCode::NOT_FOUND, "no_log", &msg);
            }
            Err(resp) => return resp,
        };
        if !follow {
            return with_type(StatusCode::OK, "text/plain; charset=utf-8", head);
        }
        let drain = self.drain.clone();
        let (tx, body) = mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut more = std::pin::pin!(more);
            if tx.send(Bytes::from(head)).await.is_err() {
                return;
            }
            loop {
                let chunk = tokio::select! {
                    _ = drain.cancelled() => return,
                    _ = tx.closed() => return,
                    next = more.next() => match next {
                        Some(chunk) => chunk,
                        None => return,
                    },
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        stream_response("text/plain; charset=utf-8", body)
    }

    /// `GET /v1/events`: the history `from` asks for, then each event as it happens. Each event's SSE id is
    /// `<monitor start, unix ms>-<seq>`, so a client that reconnects (`Last-Event-ID`) to the same monitor
    /// gets only what it missed, and one that reconnects to a restarted monitor (whose numbers start again)
    /// gets its history: by the number alone, a dashboard that outlived a restart dropped every event as
    /// one seen before.
    fn events_stream(&self, from: EventsFrom) -> Response<Body> {
        let (history, mut rx) = self.bus.subscribe();
        let after = match from.last {
            Some((boot, seq)) if boot == self.started_unix_ms => seq,
            _ => 0,
        };
        let mut history: Vec<_> = history.into_iter().filter(|e| e.seq > after).collect();
        if let Some(n) = from.history {
            history.drain(..history.len().saturating_sub(n));
        }
        let boot = self.started_unix_ms;
        let drain = self.drain.clone();
        let (tx, body) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            for ev in history {
                if tx.send(sse(boot, &ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let chunk = tokio::select! {
                    _ = drain.cancelled() => return,
                    _ = tx.closed() => return,
                    // A comment now and then lets proxies and browsers see the stream is alive.
                    _ = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
                    r = rx.recv() => match r {
                        Ok(ev) => sse(boot, &ev),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                };
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        stream_response("text/event-stream", body)
    }
}

fn sse(boot: u64, ev: &crate::events::Event) -> Bytes {
    let data = serde_json::to_string(ev).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {boot}-{}\nevent: {}\ndata: {data}\n\n",
        ev.seq,
        kind_name(ev)
    ))
}

/// Where an event stream starts: after the event a reconnecting client names (`Last-Event-ID`, as
/// `<boot>-<seq>`; anything else is ignored, as a browser's id from another server would be), and at most
/// `?history=N` events back.
struct EventsFrom {
    last: Option<(u64, u64)>,
    history: Option<usize>,
}

impl EventsFrom {
    #[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
    fn parse(req: &Request<Incoming>) -> Result<EventsFrom, Response<Body>> {
        let last = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('-'))
            .and_then(|(b, s)| Some((b.parse().ok()?, s.parse().ok()?)));
        let mut history = None;
        for (k, v) in
            query_pairs(req.uri().query()).map_err(|e| error(StatusCode::BAD_REQUEST, "bad_query", &e))?
        {
            match k.as_str() {
                "history" => {
                    history = Some(v.parse::<usize>().map_err(|_| {
                        error(
                            StatusCode::BAD_REQUEST,
                            "bad_query",
                            &format!("history must be a count of events, not {v:?}"),
                        )
                    })?)
                }
                other => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        &format!("unknown parameter {other:?} (history)"),
                    ));
                }
            }
        }
        Ok(EventsFrom { last, history })
    }
}

fn kind_name(ev: &crate::events::Event) -> &'static str {
    use crate::events::Kind;
    match ev.kind {
        Kind::State { .. } => "state",
        Kind::Probe { .. } => "probe",
        Kind::Reload { .. } => "reload",
        Kind::Update { .. } => "update",
        Kind::Pending { .. } => "pending",
        Kind::Monitor { .. } => "monitor",
    }
}

/// A streamed body fed by a channel; the producer ends when the client goes away (the receiver drops).
#[derive(Debug)]
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A log request's query: its pairs, `bytes` (1600 unless given, at most `logs::MAX_TAIL_BYTES`) and
/// `follow`.
struct LogQuery(Vec<(String, String)>);

impl LogQuery {
    #[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
    fn parse(query: Option<&str>) -> Result<(Self, u64, bool), Response<Body>> {
        let q = LogQuery(query_pairs(query).map_err(|e| error(StatusCode::BAD_REQUEST, "bad_query", &e))?);
        let bytes = match q.get("bytes").map(str::parse::<u64>) {
            None => 1600,
            Some(Ok(n)) => n.min(crate::logs::MAX_TAIL_BYTES),
            Some(Err(_)) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    "bytes must be a number",
                ));
            }
        };
        let follow = matches!(q.get("follow"), Some("1" | "true"));
        Ok((q, bytes, follow))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The tail of the log at `path` (the whole answer without `follow`, the first chunk with it), or the 500
/// that says why it cannot be read.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
/// A log's last `bytes`, read on the blocking pool (up to a MiB of file reads, kept off the runtime's
/// workers). `None` for a log that is not a regular file (a device, a pipe): nothing to tail, though its
/// output can still be followed.
async fn log_head(path: &std::path::Path, bytes: u64) -> Result<Option<Vec<u8>>, Response<Body>> {
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || crate::logs::tail(&p, bytes))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match read {
        Ok(head) => Ok(Some(head)),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(None),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "log_unreadable",
            &e.to_string(),
        )),
    }
}

/// How often a followed monitor log is read for what it gained, and at most how much at once.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
const FOLLOW_CHUNK: u64 = 64 * 1024;

fn stream_response(content_type: &'static str, body: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut resp = Response::new(ChannelBody(body).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    resp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: String,
}

/// The signal of a `signal` call: `?signal=HUP` or a JSON body `{"signal": "HUP"}`.
#[allow(clippy::result_large_err)]
async fn signal_of(req: Request<Incoming>) -> Result<nix::sys::signal::Signal, Response<Body>> {
    let from_query = query_pairs(req.uri().query())
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_query", &e))?
        .into_iter()
        .find(|(k, _)| k == "signal")
        .map(|(_, v)| v);
    let name = match from_query {
        Some(s) => s,
        None => {
            let bytes = read_body(req.into_body(), MAX_BODY, BODY_TIMEOUT)
                .await
                .map_err(|e| e.response())?;
            let body: SignalBody = serde_json::from_slice(&bytes).map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    &format!("expected {{\"signal\": \"HUP\"}}: {e}"),
                )
            })?;
            body.signal
        }
    };
    crate::command::parse_signal(&name).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_signal",
            &format!("unknown signal {name:?}"),
        )
    })
}

/// A restart's `?rolling=1[&wait_secs=N]`: one program at a time, each given N seconds (1 to `MAX_WAIT_SECS`, default
/// 60) to run and be ready again. `None`: a plain restart.
#[allow(clippy::result_large_err)]
fn rolling_of(pairs: &[(String, String)]) -> Result<Option<Duration>, Response<Body>> {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "bad_query", m);
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    match get("rolling") {
        None | Some("0" | "false") => return Ok(None),
        Some("1" | "true") => {}
        Some(_) => return Err(bad("rolling must be 1 or 0")),
    }
    match get("wait_secs").map(str::parse::<u64>) {
        None => Ok(Some(Duration::from_secs(60))),
        Some(Ok(n @ 1..=crate::roll::MAX_WAIT_SECS)) => Ok(Some(Duration::from_secs(n))),
        Some(_) => Err(bad(&format!(
            "wait_secs must be a number of seconds from 1 to {}",
            crate::roll::MAX_WAIT_SECS
        ))),
    }
}

/// A restart's query: only [`rolling_of`]'s parameters.
#[allow(clippy::result_large_err)]
fn restart_query(query: Option<&str>) -> Result<Option<Duration>, Response<Body>> {
    rolling_of(&known_params(query, "a restart", &["rolling", "wait_secs"])?)
}

/// `query`'s parameters, when each is one `what` takes (`takes`): a misspelt one is a 400, not ignored (a
/// misspelt `name` applied every change, `rollin=1` restarted everything at once).
#[allow(clippy::result_large_err)]
fn known_params(
    query: Option<&str>,
    what: &str,
    takes: &[&str],
) -> Result<Vec<(String, String)>, Response<Body>> {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "bad_query", m);
    let pairs = query_pairs(query).map_err(|e| bad(&e))?;
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !takes.contains(&k.as_str())) {
        return Err(bad(&format!(
            "unknown parameter {k:?}: {what} takes {}",
            takes.join(", ")
        )));
    }
    Ok(pairs)
}

/// An update's roll limit (none: not rolling), the programs it names, and the one kind of change it applies.
type UpdateQuery = (Option<Duration>, Vec<String>, Option<Only>);

/// An update's query, read once: a restart's [`rolling_of`] parameters; `?name=N` (repeated, at most 32),
/// the programs a named update applies, none: every change; and `only=added|removed` (`ctl add`,
/// `ctl remove`), which needs a name. A parameter an update does not take is refused: a misspelt `name`
/// would otherwise apply every change.
#[allow(clippy::result_large_err)]
fn update_query(query: Option<&str>) -> Result<UpdateQuery, Response<Body>> {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "bad_query", m);
    let pairs = known_params(query, "an update", &["name", "only", "rolling", "wait_secs"])?;
    let rolling = rolling_of(&pairs)?;
    let mut only = None;
    for (k, v) in &pairs {
        if k == "only" {
            let this = match v.as_str() {
                "added" => Only::Added,
                "removed" => Only::Removed,
                _ => return Err(bad(&format!("only={v:?}: added or removed"))),
            };
            // Two kinds at once would silently apply only the last one named.
            if only.is_some_and(|o| o != this) {
                return Err(bad("only= once: added or removed, not both"));
            }
            only = Some(this);
        }
    }
    let names: Vec<String> = (pairs.into_iter())
        .filter(|(k, _)| k == "name")
        .map(|(_, v)| v)
        .collect();
    if only.is_some() && names.is_empty() {
        return Err(bad("only= applies to named programs: add name="));
    }
    // The query itself holds at most 32 parameters; `group:*` names many programs at once.
    let max = crate::program::MAX_PROCESS_NAME;
    if names.iter().any(|n| n.is_empty() || n.len() > max) {
        return Err(bad(&format!("a name is 1 to {max} bytes")));
    }
    Ok((rolling, names, only))
}

/// Percent-decodes a path segment (names may arrive as `app%3A*`). A path segment is not a query string: `+`
/// is a plus and `&` or `=` are literal characters (no program name holds one, so such a name is simply
/// unknown). Malformed escapes or non-UTF-8 are a 400, never guessed at.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once per request
fn decode(segment: &str) -> Result<String, Response<Body>> {
    percent_decode_path(segment).map_err(|_| bad_path(segment))
}

/// An instance id from its path segments (it may hold `/`, sent as `%2F` or as it is).
fn decode_id(segments: &[&str]) -> Result<String, ()> {
    let parts = (segments.iter()).map(|s| percent_decode_path(s).map_err(|_| ()));
    Ok(parts.collect::<Result<Vec<_>, _>>()?.join("/"))
}

fn bad_path(segment: &str) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_path",
        &format!("bad percent-encoding in path segment {segment:?}"),
    )
}

#[cfg(test)]
mod tests {
    /// An update applies every saved change unless named: a misspelt `name` is refused, not taken as none.
    #[test]
    fn an_update_refuses_a_parameter_it_does_not_take() {
        let names = |q: &str| {
            (super::update_query(Some(q)).map(|(_, names, only)| (names, only))).map_err(|r| r.status())
        };
        assert_eq!(
            names("name=web&rolling=1&wait_secs=5&name=app%3A*"),
            Ok((vec!["web".to_string(), "app:*".to_string()], None))
        );
        assert_eq!(names(""), Ok((vec![], None)));
        assert_eq!(
            names("name=web&only=removed"),
            Ok((vec!["web".to_string()], Some(super::Only::Removed)))
        );
        assert_eq!(
            names("only=added&name=d"),
            Ok((vec!["d".to_string()], Some(super::Only::Added)))
        );
        // `only` with no name would be every program's additions: `update` says that.
        for bad in [
            "nme=web",
            "name=web&names=app",
            "rolling=1&wait=5",
            "only=added",
            "name=web&only=changed",
            "name=web&only=removed&only=added",
        ] {
            assert_eq!(names(bad), Err(http::StatusCode::BAD_REQUEST), "{bad}");
        }
        let restart = |q: &str| super::known_params(Some(q), "a restart", &["rolling", "wait_secs"]).is_ok();
        assert!(restart("rolling=1&wait_secs=5"));
        assert!(!restart("rollin=1"));
    }

    /// The runtime's path decoder, as the routes use it.
    fn d(s: &str) -> Option<String> {
        xcluster_runtime::http::percent_decode_path(s).ok()
    }

    #[test]
    fn a_path_segment_is_percent_decoded_and_nothing_else() {
        assert_eq!(d("app%3A*").as_deref(), Some("app:*"));
        assert_eq!(d("h%2Fapp%201").as_deref(), Some("h/app 1"));
        // Query-string rules do not apply: `&` does not split, `+` is no space.
        assert_eq!(d("zzz&x=echo").as_deref(), Some("zzz&x=echo"));
        assert_eq!(d("a+b").as_deref(), Some("a+b"));
        assert_eq!(d("a%2Bb").as_deref(), Some("a+b"));
        assert_eq!(d("%C3%A9").as_deref(), Some("\u{e9}"));
        for bad in ["%", "%4", "%zz", "%+1", "%-1", "%FF", "a%"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }
}
