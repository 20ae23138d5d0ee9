//! The typed event stream: state changes, probe results (on change), reloads and updates. Events go to live
//! subscribers (`GET /v1/events`, server-sent events) and into a bounded history that new subscribers and the
//! dashboard see first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// What happened.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    State {
        program: String,
        from: &'static str,
        to: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_signal: Option<i32>,
    },
    Probe {
        program: String,
        probe: &'static str,
        ok: bool,
        detail: String,
    },
    Reload {
        ok: bool,
        detail: String,
    },
    Update {
        added: Vec<String>,
        changed: Vec<String>,
        removed: Vec<String>,
    },
    /// A saved config's program changes, held for `ctl update` (`auto_update = false`).
    Pending {
        added: Vec<String>,
        changed: Vec<String>,
        removed: Vec<String>,
    },
    Monitor {
        detail: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: Kind,
}

#[derive(Debug)]
struct Inner {
    seq: u64,
    history: VecDeque<Arc<Event>>,
    cap: usize,
}

/// Publishes events; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Arc<Event>>,
}

impl Bus {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                seq: 0,
                history: VecDeque::new(),
                cap: cap.max(1),
            })),
            live: broadcast::channel(1024).0,
        }
    }

    pub fn set_capacity(&self, cap: usize) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.cap = cap.max(1);
        while g.history.len() > g.cap {
            g.history.pop_front();
        }
    }

    pub fn publish(&self, kind: Kind) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.seq += 1;
        let ev = Arc::new(Event {
            seq: g.seq,
            time_ms,
            kind,
        });
        if g.history.len() >= g.cap {
            g.history.pop_front();
        }
        g.history.push_back(ev.clone());
        // Sent under the lock so a subscriber that takes history + subscription together misses nothing.
        let _ = self.live.send(ev);
    }

    /// Live subscribers (open event streams, e.g. dashboards).
    pub fn subscribers(&self) -> usize {
        self.live.receiver_count()
    }

    /// The recent history and a subscription that continues right after it.
    pub fn subscribe(&self) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (g.history.iter().cloned().collect(), self.live.subscribe())
    }
}
