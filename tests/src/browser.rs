//! A headless Chromium driven over the DevTools protocol, to use a page as a person does: type into it,
//! click its buttons, and read what it shows.
//!
//! The protocol runs over `--remote-debugging-pipe`: Chromium reads commands on descriptor 3 and writes
//! answers and events on descriptor 4, each a JSON message ended by a NUL byte. No port is opened.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Proc, Spawn};

/// How long one protocol command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One page open in a headless Chromium, which is stopped when this is dropped.
#[derive(Debug)]
pub struct Browser {
    commands: File,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    // Dropped after the pipes (Chromium exits when its command pipe closes), and before its profile.
    proc: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and opens `url` in a page.
    pub fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (commands_rx, commands) = pipe();
        let (messages_rx, messages_tx) = pipe();
        let proc = Proc::spawn(
            "chromium",
            Path::new("chromium"),
            Spawn {
                args: headless_args(profile.path(), &["--remote-debugging-pipe", "about:blank"]),
                fds: vec![(commands_rx, 3), (messages_tx, 4)],
                ..Default::default()
            },
        );
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(File::from(messages_rx));
            let mut buf = Vec::new();
            // Ends when Chromium exits (end of file) or the browser is dropped (send fails).
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                let Ok(msg) = serde_json::from_slice::<Value>(&buf) else {
                    break;
                };
                if tx.send(msg).is_err() {
                    break;
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            commands: File::from(commands),
            messages,
            next_id: 0,
            session: String::new(),
            proc,
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({ "url": url }));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// Sends one command (to the page, once attached) and returns its result; panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("{method}: Chromium is gone ({e}): {}", self.proc.stderr()));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.messages.recv_timeout(left).unwrap_or_else(|e| {
                panic!("{method}: no answer from Chromium ({e}): {}", self.proc.stderr())
            });
            // Events (no id) and answers to other commands are not this one's.
            if m["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(err) = m.get("error") {
                panic!("{method}: {err}");
            }
            return m["result"].clone();
        }
    }

    /// The value of a JavaScript expression in the page (a promise is awaited); panics if it throws.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is neither null, false nor undefined, and returns its value.
    pub fn wait_for(&mut self, timeout: Duration, what: &str, expr: &str) -> Value {
        crate::eventually(timeout, what, || {
            let v = self.eval(expr);
            (!(v.is_null() || v == json!(false))).then_some(v)
        })
    }

    /// Clicks the middle of the first element `selector` matches, with the mouse, as a person would: the
    /// element must be visible and the topmost thing at that point for the click to reach it.
    pub fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null;
                e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            panic!("nothing to click at {selector}");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }

    /// Types `text` into the first element `selector` matches, as keyboard input, then leaves the field
    /// (so its `change` event fires).
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector);
        self.call("Input.insertText", json!({ "text": text }));
        self.eval("document.activeElement.blur()");
    }
}

/// Chromium's arguments for a headless run with its own profile in `profile` (no sandbox: tests may run as
/// root), then `more`.
pub fn headless_args(profile: &Path, more: &[&str]) -> Vec<String> {
    let base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ];
    let profile = format!("--user-data-dir={}", profile.display());
    base.iter()
        .copied()
        .chain([profile.as_str()])
        .chain(more.iter().copied())
        .map(str::to_string)
        .collect()
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}
