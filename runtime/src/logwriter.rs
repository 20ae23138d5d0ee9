//! Log output that never blocks the thread that logs. Each event is formatted on its own thread, as before,
//! and handed as one line to a writer thread through a bounded queue; the writer thread writes to stderr in
//! batches. When the queue is full (stderr is read too slowly, or not at all: a paused terminal, a stuck
//! pipe) the line is dropped and counted in `xcluster_log_lines_dropped_total`, and the writer logs how
//! many were lost once it catches up. Without this, a full stderr pipe stalls every thread that logs: with
//! the proxy's connection log on, that is the proxy itself. HAProxy's UDP logging drops for the same reason.
//!
//! The queue holds lines, not bytes, so it is bounded by count: `QUEUE_LINES` lines of a few hundred bytes.

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting for the writer thread.
pub const QUEUE_LINES: usize = 16_384;

enum Out {
    Line(Vec<u8>),
    /// Write everything queued before this, then say so.
    Flush(SyncSender<()>),
}

/// The sending end of the queue: a `MakeWriter` for the fmt layer.
#[derive(Clone, Debug)]
pub struct NonBlocking {
    tx: SyncSender<Out>,
    dropped: Arc<AtomicU64>,
}

/// The process's writer, for [`flush`].
static GLOBAL: OnceLock<NonBlocking> = OnceLock::new();

impl NonBlocking {
    /// Starts the writer thread over `sink` with room for `capacity` lines; `None` if no thread can start.
    pub fn start(sink: impl Write + Send + 'static, capacity: usize) -> Option<Self> {
        let (tx, rx) = sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let seen = dropped.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(&rx, sink, &seen))
            .ok()?;
        Some(Self { tx, dropped })
    }

    /// Makes this the writer [`flush`] waits for.
    pub fn install_global(&self) {
        let _ = GLOBAL.set(self.clone());
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for every line queued so far to be written; false if that did not happen.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = sync_channel(1);
        let tx = self.tx.clone();
        // The request waits for room in a full queue on a thread of its own, so this wait stays bounded by
        // `timeout` even when stderr is stuck (at exit, that thread goes with the process).
        let queued = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                let _ = tx.send(Out::Flush(done_tx));
            });
        queued.is_ok() && done_rx.recv_timeout(timeout).is_ok()
    }
}

/// Writes every line queued so far by the process's writer, waiting at most `timeout` (at exit: the lines
/// of the last moments, such as the connection log's `shutdown` lines, would be lost otherwise).
pub fn flush(timeout: Duration) {
    if let Some(w) = GLOBAL.get() {
        w.flush(timeout);
    }
}

/// The writer thread: a line, then everything else already queued, then one flush.
fn write_lines(rx: &Receiver<Out>, sink: impl Write, dropped: &AtomicU64) {
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    let mut reported = 0;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                // A write error (stderr closed) loses the line: there is nowhere else to put it.
                Out::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Out::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.try_send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
        let now = dropped.load(Ordering::Relaxed);
        if now != reported {
            // Through the subscriber, so it has the log's format; it comes back through this queue.
            tracing::warn!(
                dropped = now - reported,
                "log lines dropped: the log output was not read fast enough"
            );
            reported = now;
        }
    }
}

/// One event's line: the fmt layer writes it whole, then drops the writer.
#[derive(Debug)]
pub struct LineWriter<'a> {
    queue: &'a NonBlocking,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.queue.tx.try_send(Out::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.queue.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::metrics::LOG_LINES_DROPPED_TOTAL).increment(1);
            }
            // The writer thread is gone (the process is ending): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for NonBlocking {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { queue: self }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc::Receiver as Gate;

    /// A sink that says when it is first written to, then takes nothing until the test opens its gate, then
    /// keeps what it is given.
    struct Gated {
        entered: SyncSender<()>,
        gate: Option<Gate<()>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(g) = self.gate.take() {
                let _ = self.entered.send(());
                let _ = g.recv();
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_lines_instead_of_blocking_and_the_rest_arrive_whole() {
        let (open, gate) = sync_channel(1);
        let (entered_tx, entered) = sync_channel(1);
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Gated {
            entered: entered_tx,
            gate: Some(gate),
            got: got.clone(),
        };
        let w = NonBlocking::start(sink, 4).unwrap();
        w.make_writer().write_all(b"line 0\n").unwrap();
        // The writer thread is now stuck writing line 0, as on a full pipe.
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        for i in 1..=50 {
            w.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        // Four wait in the queue; the rest are dropped, and no write above waited.
        assert_eq!(w.dropped(), 46);
        open.send(()).unwrap();
        assert!(w.flush(Duration::from_secs(10)));
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "line 0\nline 1\nline 2\nline 3\nline 4\n");
    }
}
