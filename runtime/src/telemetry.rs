//! Process-wide telemetry: the `tracing` subscriber (with a live-reloadable filter) and the Prometheus
//! recorder behind the `metrics` facade. Only entry points call `init`; libraries just emit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::logwriter::{NonBlocking, QUEUE_LINES};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
static COLLECTORS: Mutex<BTreeMap<&'static str, Collector>> = Mutex::new(BTreeMap::new());
static PRUNERS: Mutex<BTreeMap<&'static str, Pruner>> = Mutex::new(BTreeMap::new());
static FILTER: OnceLock<reload::Handle<EnvFilter, tracing_subscriber::Registry>> = OnceLock::new();
/// Each metric's `# HELP` text, for the families collectors write ([`Exposition::family`]).
static HELP: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Lets a repeated log line through at most once per period, so a misconfiguration that recurs at every
/// request shows in the log without a line per request (count every occurrence with a metric): `due` is true
/// at the first call and then once `every_ms` has passed since the last time it was.
#[derive(Debug, Default)]
pub struct Throttle {
    /// When it last let a line through, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub fn due(&self, now_ms: u64, every_ms: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last.load(Relaxed);
        (last == 0 || now_ms.saturating_sub(last - 1) >= every_ms)
            && self
                .last
                .compare_exchange(last, now_ms.saturating_add(1), Relaxed, Relaxed)
                .is_ok()
    }
}

/// Installs the tracing subscriber (stderr, through [`crate::logwriter`]: call [`crate::logwriter::flush`]
/// before exiting) and the Prometheus recorder. `RUST_LOG`, when set, wins over
/// `default_filter`. Safe to call more than once; later calls do nothing.
pub fn init(default_filter: &str, format: LogFormat) {
    if FILTER.get().is_none() {
        let filter = std::env::var("RUST_LOG")
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .or_else(|| EnvFilter::try_new(default_filter).ok())
            .unwrap_or_else(|| EnvFilter::new("info"));
        let (layer, handle) = reload::Layer::new(filter);
        let registry = tracing_subscriber::registry().with(layer);
        // Lines go through a writer thread, so a stalled stderr never stalls the threads that log.
        let writer = match NonBlocking::start(std::io::stderr(), QUEUE_LINES) {
            Some(w) => {
                w.install_global();
                BoxMakeWriter::new(w)
            }
            None => BoxMakeWriter::new(std::io::stderr),
        };
        let ok = match format {
            LogFormat::Text => registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(writer)
                        // No colour codes in a file or a pipe (the monitor captures programs' output).
                        .with_ansi(std::io::stderr().is_terminal())
                        .with_target(false),
                )
                .try_init()
                .is_ok(),
            LogFormat::Json => registry
                .with(tracing_subscriber::fmt::layer().json().with_writer(writer))
                .try_init()
                .is_ok(),
        };
        if ok {
            let _ = FILTER.set(handle);
        }
    }
    prometheus();
}

/// Replaces the log filter at run time (the `log.level` key reloads live). `RUST_LOG` keeps precedence.
pub fn set_filter(filter: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    let new = EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    match FILTER.get() {
        Some(h) => h.reload(new).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Checks a log filter without applying it (for config validation).
pub fn check_filter(filter: &str) -> Result<(), String> {
    // A bare word is a target to `EnvFilter` ("verbose" would log the target `verbose` only, and nothing of
    // ours); here it must be a level, and a target is written `target=level`.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains(['=', '[']) && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown level {d:?} in {filter:?}: use off, error, warn, info, debug or trace, or \
                 TARGET=LEVEL (info,xcluster_lb=debug)"
            ));
        }
    }
    EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| format!("invalid log filter {filter:?}: {e}"))
}

/// The Prometheus handle, installing the recorder on first use. If another recorder is already installed
/// (a test binary), a detached recorder is used so rendering still works.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| match with_buckets().install_recorder() {
        Ok(h) => h,
        Err(_) => with_buckets().build_recorder().handle(),
    })
}

/// Gives each metric of `names` (name, doc comment: a [`crate::metric_names`] list) its `# HELP` line, for the
/// recorder's series and the collectors' alike. Call once the process's metrics start, before any scrape.
pub fn describe(names: &[(&'static str, &'static str)]) {
    prometheus();
    let mut help = HELP.lock().unwrap_or_else(|e| e.into_inner());
    for (name, doc) in names {
        let text = help_text(doc);
        // This recorder keeps one description per name, whatever the kind.
        metrics::describe_counter!(*name, text.clone());
        help.insert(name, text);
    }
}

/// A doc comment as one line of help: its lines joined, and intra-doc links shown as plain code.
fn help_text(doc: &str) -> String {
    let words: Vec<&str> = doc.split_whitespace().collect();
    words.join(" ").replace("[`", "`").replace("`]", "`")
}

/// Bucket bounds of every `*_seconds` histogram: 50 µs (a connect on one host) to 10 s (a connect timeout).
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Bucket bounds of every other histogram (counts, such as orders per group commit).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// A builder whose histograms render as Prometheus histograms, not the exporter's default summaries: buckets
/// add up across balancers and app instances (a fleet-wide p99 is a `histogram_quantile` over their sum),
/// quantiles do not.
fn with_buckets() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(COUNT_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS))
        // An empty list is the only error, and neither is empty.
        .unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Renders every metric in the Prometheus text format: the recorder's, less what a pruner hides, then each
/// collector's.
pub fn render_metrics() -> String {
    let mut text = prometheus().render();
    let hides: Vec<Hide> = installed(&PRUNERS).iter().filter_map(|p| p(&text)).collect();
    if !hides.is_empty() {
        text = without(&text, |line| hides.iter().any(|hide| hide(line)));
    }
    let mut out = Exposition { text };
    let collectors = installed(&COLLECTORS);
    for collect in collectors {
        collect(&mut out);
    }
    out.text
}

/// Writes, at each scrape, series whose label sets come and go with their owner's state: a program per
/// config, an instance per report. The `metrics` facade cannot remove a series once set, so a program a
/// reload removed, or an instance the directory forgot, would otherwise stay on `/metrics` with its last value.
pub type Collector = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

/// Installs `collect` under `name`, replacing one of the same name (a role started again in one process).
pub fn set_collector(name: &'static str, collect: Collector) {
    match COLLECTORS.lock() {
        Ok(mut c) => c.insert(name, collect),
        Err(poisoned) => poisoned.into_inner().insert(name, collect),
    };
}

/// A copy of what `hooks` holds, so none runs under the lock.
fn installed<T: Clone>(hooks: &Mutex<BTreeMap<&'static str, T>>) -> Vec<T> {
    match hooks.lock() {
        Ok(h) => h.values().cloned().collect(),
        Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
    }
}

/// Leaves series of the recorder out of `/metrics` once their owner is gone, for owners whose hot path must
/// keep the facade's lock-free handles (a collector would need its own state read at each scrape): given
/// the recorder's text at a scrape, `None` when it hides nothing, else a [`Hide`] for that scrape. The
/// facade cannot remove a series, so a proxy listener a reload removed would otherwise stay there forever.
pub type Pruner = Arc<dyn Fn(&str) -> Option<Hide> + Send + Sync>;

/// Whether a sample line of the recorder's text is left out of this scrape.
pub type Hide = Box<dyn Fn(&str) -> bool>;

/// Installs `prune` under `name`, replacing one of the same name (a role started again in one process).
pub fn set_pruner(name: &'static str, prune: Pruner) {
    match PRUNERS.lock() {
        Ok(mut p) => p.insert(name, prune),
        Err(poisoned) => poisoned.into_inner().insert(name, prune),
    };
}

/// `text` without the sample lines `hide` picks, nor the `#` lines of a family left with no sample (a
/// family's header goes out with its first sample kept).
fn without(text: &str, hide: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    // The `#` lines of the family being read, until one of its samples is kept.
    let mut header = String::new();
    for line in text.lines() {
        if line.starts_with('#') {
            header.push_str(line);
            header.push('\n');
        } else if line.is_empty() {
            // The exporter ends each family with an empty line: one that kept nothing leaves no trace.
            if header.is_empty() {
                out.push('\n');
            }
            header.clear();
        } else if !hide(line) {
            out.push_str(&header);
            header.clear();
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The Prometheus text format, as a [`Collector`] writes it.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

impl Exposition {
    /// Begins a family: every sample of `name` must follow before the next family.
    pub fn family(&mut self, name: &str, kind: Kind) {
        if !self.text.is_empty() && !self.text.ends_with('\n') {
            self.text.push('\n');
        }
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        if let Some(help) = HELP.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            let _ = writeln!(self.text, "# HELP {name} {help}");
        }
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample of the family begun last; label values are escaped as the format asks.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        for (i, (k, v)) in labels.iter().enumerate() {
            self.text.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.text, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.text.push_str("\\\\"),
                    '"' => self.text.push_str("\\\""),
                    '\n' => self.text.push_str("\\n"),
                    c => self.text.push(c),
                }
            }
            self.text.push('"');
        }
        if !labels.is_empty() {
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// What has been written.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Runs the recorder's periodic upkeep (histogram expiry) until `cancel` fires.
pub async fn upkeep(cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => prometheus().run_upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period() {
        let t = Throttle::default();
        assert!(t.due(0, 10_000), "the first, even at the clock's start");
        assert!(!t.due(9_999, 10_000));
        assert!(t.due(10_000, 10_000));
        assert!(!t.due(10_001, 10_000));
    }

    #[test]
    fn a_log_level_must_be_a_level_or_target_equals_level() {
        for ok in [
            "info",
            "WARN",
            "info,xcluster_lb=debug",
            "xcluster_lb=trace",
            "debug,h2[conn]=off",
            "",
        ] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "info,loud", "inf"] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains("unknown level"), "{bad}: {e}");
        }
    }

    /// A described metric gets its doc comment, on one line and without link brackets, as `# HELP`, from the
    /// recorder and from a collector alike.
    #[test]
    fn a_described_metric_has_its_help_line() {
        describe(&[
            ("t_helped", " Clients waiting, see [`Queue`]:\n by `type`."),
            ("t_helped_total", " Things done."),
        ]);
        let mut out = Exposition::default();
        out.family("t_helped", Kind::Gauge);
        assert_eq!(
            out.text(),
            "# HELP t_helped Clients waiting, see `Queue`: by `type`.\n# TYPE t_helped gauge\n"
        );
        metrics::counter!("t_helped_total").increment(1);
        let text = render_metrics();
        assert!(text.contains("# HELP t_helped_total Things done.\n"), "{text}");
    }

    #[test]
    fn a_collector_writes_escaped_samples_after_the_recorder_and_can_be_replaced() {
        let mut out = Exposition::default();
        out.family("t_up", Kind::Gauge);
        out.sample("t_up", &[("program", "a\"b\\c\nd"), ("k", "v")], 1.0);
        out.sample("t_up", &[], 0.5);
        assert_eq!(
            out.text(),
            "# TYPE t_up gauge\nt_up{program=\"a\\\"b\\\\c\\nd\",k=\"v\"} 1\nt_up 0.5\n"
        );

        let write = |v: f64| -> Collector {
            Arc::new(move |out: &mut Exposition| {
                out.family("t_collected", Kind::Counter);
                out.sample("t_collected", &[], v);
            })
        };
        set_collector("t", write(1.0));
        set_collector("t", write(2.0));
        let text = render_metrics();
        assert!(
            text.contains("# TYPE t_collected counter\nt_collected 2\n"),
            "{text}"
        );
        assert!(!text.contains("t_collected 1"), "{text}");
    }

    #[test]
    fn a_family_whose_samples_are_all_hidden_leaves_no_header() {
        let text = "# HELP t_a help\n# TYPE t_a counter\nt_a{k=\"gone\"} 1\nt_a{k=\"kept\"} 2\n\n\
                    # TYPE t_b gauge\nt_b{k=\"gone\"} 3\n\n# TYPE t_c gauge\nt_c 4\n\n";
        let hide = |line: &str| line.contains("\"gone\"");
        assert_eq!(
            without(text, hide),
            "# HELP t_a help\n# TYPE t_a counter\nt_a{k=\"kept\"} 2\n\n# TYPE t_c gauge\nt_c 4\n\n"
        );
        assert_eq!(without(text, |_| false), text);
    }

    #[test]
    fn a_pruner_hides_recorder_lines_at_each_scrape() {
        // The recorder must be installed before the facade is used.
        prometheus();
        metrics::counter!("t_pruned_total", "k" => "gone").increment(1);
        metrics::counter!("t_pruned_total", "k" => "kept").increment(1);
        let before = render_metrics();
        assert!(before.contains("t_pruned_total{k=\"gone\"} 1"), "{before}");
        set_pruner(
            "t",
            Arc::new(|text: &str| {
                // Given the recorder's text: hides nothing once the series it looks for is absent.
                text.contains("t_pruned_total")
                    .then(|| Box::new(|line: &str| line.contains("k=\"gone\"")) as Hide)
            }),
        );
        let after = render_metrics();
        assert!(!after.contains("k=\"gone\""), "{after}");
        assert!(after.contains("t_pruned_total{k=\"kept\"} 1"), "{after}");
    }

    #[test]
    fn histograms_render_as_prometheus_histograms() {
        let recorder = with_buckets().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("t_connect_seconds").record(0.000_3);
            metrics::histogram!("t_batch_orders").record(3.0);
        });
        let text = handle.render();
        assert!(text.contains("# TYPE t_connect_seconds histogram"), "{text}");
        assert!(
            text.contains("t_connect_seconds_bucket{le=\"0.00025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("t_connect_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE t_batch_orders histogram"), "{text}");
        assert!(text.contains("t_batch_orders_bucket{le=\"2\"} 0"), "{text}");
        assert!(text.contains("t_batch_orders_bucket{le=\"4\"} 1"), "{text}");
    }
}
