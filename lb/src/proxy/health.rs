//! Backend health: a backend whose connect fails is held out of the picks for a while, so the connections
//! after it do not each pay a refused or timed-out connect before their redispatch. Failed connects come
//! from clients' connections (passive, like HAProxy's `observe layer4` with `on-error mark-down`) and from
//! the active checks of the configured backends (`check_interval_ms`, like HAProxy's `check`; with
//! `check_http_path`, an HTTP request whose status must be 2xx or 3xx, like `option httpchk`; with
//! `check_send` and `check_expect`, bytes sent and a string the answer must hold, like `tcp-check send` and
//! `tcp-check expect string`, for services that speak no HTTP).
//!
//! The hold is 1 s after one failure and doubles with each failure in a row, up to 30 s. A client's failed
//! connect holds the backend out at once, and the first connect that succeeds, a client's or a check's, ends
//! that hold. Checks go by streaks, as HAProxy's `fall` and `rise` do ([`CheckStreaks`]): `check_fall`
//! failed checks in a row put the backend down, held out at least until the next check ends, and only
//! `check_rise` passing checks in a row bring it back, so one lost check does not take out a busy backend and
//! one lucky check does not bring back a flapping one. Once a hold runs out the backend may be picked again, and that connection is the probe: a
//! failure sends the backend out for twice as long, and the connection is redispatched as before.
//! When every backend a connection could use is held out, the holds of failed connects are ignored: trying a
//! backend that has been failing beats turning the client away. Never those of failed checks: a check may
//! look past the connect (an HTTP status, an expected answer, a side port such as Patroni's `/primary`), so
//! a backend it puts down may well accept the connect and must still get no client, as in HAProxy, where a
//! server down gets nothing and a client finding every one down is refused. Nor does a client's connect that
//! succeeds end such a hold: only `check_rise` passing checks do.
//!
//! Slow start (`slow_start_ms`, HAProxy's `slowstart`): a backend that comes back from a hold gets a share of
//! the picks that grows from nothing to its whole weight over that time ([`Holds::share`]), so a restarted
//! instance with cold caches is not handed its full load at once.
//!
//! Picks read a snapshot and allocate nothing while no backend is held; the rare writes (a failure, or the
//! first success after one) copy the map under a mutex.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xcluster_proto::proxy_header::encode_v2_local;

use super::config::Probe;

/// The hold after the first failure in a row.
const FIRST_HOLD: Duration = Duration::from_secs(1);
/// The longest hold.
const MAX_HOLD: Duration = Duration::from_secs(30);
/// A backend whose hold ended this long ago is forgotten (its next failure counts as a first one), so the
/// map does not keep every address the directory ever named.
const FORGET_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Hold {
    /// Held out of the picks until then; once a connect ended the hold, when it did (its slow start began).
    until: Instant,
    /// Connects failed in a row; 0 once a connect ended the hold with slow start on, and the entry stays
    /// until forgotten (`FORGET_AFTER` is the longest slow start).
    fails: u32,
    /// Its health checks put it down (`check_fall` in a row), not only a client's connect: a connection that
    /// has tried it does not wait to try it again.
    down: bool,
}

/// What saw a backend fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A client's connect.
    Connect,
    /// Its health checks put it down: held out at least this long, until the next check can end.
    Checks(Duration),
}

/// What saw a backend answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A client's connect.
    Connect,
    /// Its health checks brought it back (`check_rise` in a row).
    Checks,
}

impl Hold {
    fn holds(&self) -> bool {
        self.fails > 0
    }
}

/// Backends held out after failed connects, shared by every worker.
#[derive(Debug, Default)]
pub struct Holds {
    map: ArcSwap<HashMap<SocketAddr, Hold>>,
    write: Mutex<()>,
}

impl Holds {
    /// `tried` plus the backends held out now, or `None` when none is (the common case).
    pub fn exclude(&self, tried: &[SocketAddr]) -> Option<Vec<SocketAddr>> {
        self.exclude_at(tried, Instant::now())
    }

    fn exclude_at(&self, tried: &[SocketAddr], now: Instant) -> Option<Vec<SocketAddr>> {
        self.excluding(tried, |h| h.until > now)
    }

    /// Forgets backends whose hold ended long ago (see `FORGET_AFTER`), so that picks stop looking at them.
    /// Called on the health-check task's every turn; writes only when there is one to forget.
    pub fn forget_stale(&self) {
        self.forget_stale_at(Instant::now());
    }

    /// `tried` plus the backends health checks hold down now, or `None` when none is: what a connection must
    /// never try, even when every backend it could use is held out.
    pub fn exclude_down(&self, tried: &[SocketAddr]) -> Option<Vec<SocketAddr>> {
        self.exclude_down_at(tried, Instant::now())
    }

    fn exclude_down_at(&self, tried: &[SocketAddr], now: Instant) -> Option<Vec<SocketAddr>> {
        self.excluding(tried, |h| h.holds() && h.down && h.until > now)
    }

    /// `tried` plus the backends whose hold `holding` says holds them, or `None` when none does. Holds that
    /// ran out stay in the map until forgotten: no allocation for them.
    fn excluding(&self, tried: &[SocketAddr], holding: impl Fn(&Hold) -> bool) -> Option<Vec<SocketAddr>> {
        let map = self.map.load();
        if !map.values().any(&holding) {
            return None;
        }
        let held = map.iter().filter(|(_, h)| holding(h)).map(|(a, _)| *a);
        Some(tried.iter().copied().chain(held).collect())
    }

    fn forget_stale_at(&self, now: Instant) {
        let stale = |h: &Hold| h.until + FORGET_AFTER <= now;
        if self.map.load().values().any(stale) {
            self.update(|map| map.retain(|_, h| !stale(h)));
        }
    }

    /// `addr` failed (`how`): holds it out, for longer than last time if it failed then too, and, after
    /// failed checks, until their next one can end. Returns how long, and how many connects in a row have failed.
    pub fn failed(&self, addr: SocketAddr, how: Failure) -> (Duration, u32) {
        self.failed_at(addr, how, Instant::now())
    }

    fn failed_at(&self, addr: SocketAddr, how: Failure, now: Instant) -> (Duration, u32) {
        let (at_least, checks) = match how {
            Failure::Connect => (Duration::ZERO, false),
            Failure::Checks(until_next) => (until_next, true),
        };
        self.update(|map| {
            map.retain(|_, h| h.until + FORGET_AFTER > now);
            let before = map.get(&addr).filter(|h| h.holds());
            let fails = before.map_or(0, |h| h.fails).saturating_add(1);
            let hold = FIRST_HOLD
                .saturating_mul(1 << (fails - 1).min(16))
                .min(MAX_HOLD)
                .max(at_least);
            // A client's failed connect leaves a backend its checks put down so, and its hold as long: cut
            // to the connect's 2 s, a hold of two check intervals ran out, and the next client's connect that
            // succeeded ended it, so clients went to a backend its checks had down until their next check.
            let down = checks || before.is_some_and(|h| h.down);
            let until = (now + hold).max(before.filter(|h| h.down).map_or(now, |h| h.until));
            map.insert(addr, Hold { until, fails, down });
            (until - now, fails)
        })
    }

    /// Whether health checks have put every one of `addrs` down (and none answered since); false for none.
    pub fn all_down(&self, addrs: &[SocketAddr]) -> bool {
        let map = self.map.load();
        !addrs.is_empty()
            && addrs
                .iter()
                .all(|a| map.get(a).is_some_and(|h| h.holds() && h.down))
    }

    /// Keeps `addr`'s hold going for at least `at_least` more, without counting a failure; false if it has
    /// no hold (a client's connect ended it), which is left so.
    pub fn keep(&self, addr: SocketAddr, at_least: Duration) -> bool {
        self.keep_at(addr, at_least, Instant::now())
    }

    fn keep_at(&self, addr: SocketAddr, at_least: Duration, now: Instant) -> bool {
        if !self.map.load().get(&addr).is_some_and(Hold::holds) {
            return false;
        }
        self.update(|map| match map.get_mut(&addr).filter(|h| h.holds()) {
            Some(h) => {
                h.until = h.until.max(now + at_least);
                true
            }
            None => false,
        })
    }

    /// `addr` answered (`by`): ends its hold, and starts its slow start if `slow_start` (asked only then: this
    /// runs on every connect) gives one. True if it had a hold. A client's connect leaves a hold its checks put
    /// down while it lasts (they renew it at each check): a check may fail past the connect.
    pub fn succeeded(
        &self,
        addr: SocketAddr,
        by: Answer,
        slow_start: impl FnOnce() -> Option<Duration>,
    ) -> bool {
        if !self.map.load().get(&addr).is_some_and(Hold::holds) {
            return false;
        }
        self.succeeded_at(addr, by, slow_start(), Instant::now())
    }

    fn succeeded_at(&self, addr: SocketAddr, by: Answer, slow_start: Option<Duration>, now: Instant) -> bool {
        self.update(|map| {
            let ends = |h: &Hold| h.holds() && (by == Answer::Checks || !h.down || h.until <= now);
            if !map.get(&addr).is_some_and(ends) {
                return false;
            }
            match slow_start {
                Some(_) => map.insert(
                    addr,
                    Hold {
                        until: now,
                        fails: 0,
                        down: false,
                    },
                ),
                None => map.remove(&addr),
            };
            true
        })
    }

    /// The share of its weight `addr` gets now, below 1 while it slow-starts: from 0 as its hold ended, growing
    /// evenly over `slow_start` (the setting now, so a reload applies to slow starts under way). `None` (all of
    /// it) otherwise. Reads the snapshot; nothing to do while no backend is held or back lately.
    pub fn share(&self, addr: SocketAddr, slow_start: Option<Duration>) -> Option<f64> {
        self.share_at(addr, slow_start?, Instant::now())
    }

    fn share_at(&self, addr: SocketAddr, slow_start: Duration, now: Instant) -> Option<f64> {
        let map = self.map.load();
        if map.is_empty() {
            return None;
        }
        let h = map.get(&addr).filter(|h| !h.holds())?;
        let share = now.saturating_duration_since(h.until).as_secs_f64() / slow_start.as_secs_f64();
        (share < 1.0).then_some(share)
    }

    fn update<T>(&self, f: impl FnOnce(&mut HashMap<SocketAddr, Hold>) -> T) -> T {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = HashMap::clone(&self.map.load());
        let out = f(&mut map);
        self.map.store(Arc::new(map));
        out
    }
}

/// What one check's result does to its backend, given the checks before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Up: the check passed (ending a hold a client's failed connect began), or the backend came back.
    Up,
    /// Down: `fall` checks in a row have failed (or it was down and failed again): hold it out.
    Down,
    /// Failed, but fewer than `fall` in a row: nothing changes yet.
    Suspect,
    /// Down and passed, but fewer than `rise` in a row: keep it held out.
    Rising,
}

/// Each checked backend's streak: whether checks put it down, and how many results in a row went the other
/// way. Owned by the health-check task alone.
#[derive(Debug, Default)]
pub struct CheckStreaks(HashMap<SocketAddr, Streak>);

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    down: bool,
    /// Results in a row against `down`: failures while up, passes while down.
    against: u32,
}

impl CheckStreaks {
    /// Records one check of `addr`; `fall` and `rise` are at least 1.
    pub fn record(&mut self, addr: SocketAddr, passed: bool, fall: u32, rise: u32) -> Verdict {
        let s = self.0.entry(addr).or_default();
        if passed != s.down {
            s.against = 0;
            return if passed { Verdict::Up } else { Verdict::Down };
        }
        s.against += 1;
        let (enough, flipped, waiting) = if passed {
            (rise, Verdict::Up, Verdict::Rising)
        } else {
            (fall, Verdict::Down, Verdict::Suspect)
        };
        if s.against < enough {
            return waiting;
        }
        *s = Streak {
            down: !passed,
            against: 0,
        };
        flipped
    }

    /// Whether checks have `addr` down now.
    pub fn is_down(&self, addr: SocketAddr) -> bool {
        self.0.get(&addr).is_some_and(|s| s.down)
    }

    /// Marks `addr` up without a check: its hold ended otherwise (a client's connect succeeded).
    pub fn up(&mut self, addr: SocketAddr) {
        self.0.remove(&addr);
    }

    /// Forgets the backends `keep` refuses (no longer configured).
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        self.0.retain(|a, _| keep(a));
    }
}

/// The most of an HTTP check's answer read: its status line must fit.
const STATUS_LINE_MAX: usize = 512;

/// The most of a send/expect check's answer read for its expected bytes.
const EXPECT_WINDOW: usize = 4096;

/// One health check of `addr`: a TCP connect, then with `proxy_header` a PROXY v2 `LOCAL` header (for a
/// backend that expects one on every connection, and would take the request for a bad header), then what
/// `probe` asks. The caller bounds it with the connect timeout. The error says what failed, for the log.
pub async fn check(addr: SocketAddr, proxy_header: bool, probe: &Probe) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    if proxy_header {
        s.write_all(&encode_v2_local()).await.map_err(|e| e.to_string())?;
    }
    match probe {
        Probe::Connect => Ok(()),
        Probe::Http(path) => http(&mut s, addr, path).await,
        Probe::Expect { send, expect } => {
            s.write_all(send).await.map_err(|e| e.to_string())?;
            expect_in(&mut s, expect).await
        }
    }
}

/// Reads the answer until `expect` appears in its first [`EXPECT_WINDOW`] bytes.
async fn expect_in(s: &mut TcpStream, expect: &[u8]) -> Result<(), String> {
    if expect.is_empty() {
        return Ok(());
    }
    let mut buf = vec![0u8; EXPECT_WINDOW];
    let mut n: usize = 0;
    loop {
        // Only the window the last read could have completed is searched again.
        let from = n.saturating_sub(expect.len());
        match s.read(&mut buf[n..]).await.map_err(|e| e.to_string())? {
            0 => return Err(format!("closed without {}", shown(expect))),
            m => n += m,
        }
        if buf[from..n].windows(expect.len()).any(|w| w == expect) {
            return Ok(());
        }
        if n == buf.len() {
            return Err(format!("no {} in the first {EXPECT_WINDOW} bytes", shown(expect)));
        }
    }
}

/// Bytes for the log: printable ASCII as is, the rest escaped, at most 60 characters.
fn shown(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    format!("\"{}\"", text.chars().take(60).collect::<String>())
}

/// An HTTP check: `GET path`, whose status must be 2xx or 3xx.
async fn http(s: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<(), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: xcluster-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; STATUS_LINE_MAX];
    let mut n = 0;
    loop {
        if let Some(end) = buf[..n].windows(2).position(|w| w == b"\r\n") {
            return status_passes(&buf[..end]);
        }
        if n == buf.len() {
            return Err(format!(
                "no HTTP status line in the first {STATUS_LINE_MAX} bytes"
            ));
        }
        match s.read(&mut buf[n..]).await.map_err(|e| e.to_string())? {
            0 => return Err("closed before an HTTP status line".into()),
            m => n += m,
        }
    }
}

/// Whether an HTTP status line (`HTTP/1.1 200 OK`) passes a health check: 2xx or 3xx.
fn status_passes(line: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match code.parse::<u16>() {
        Ok(200..=399) if version.starts_with("HTTP/") => Ok(()),
        Ok(c) if version.starts_with("HTTP/") => Err(format!("HTTP status {c}")),
        _ => Err(format!(
            "not an HTTP status line: {:?}",
            text.chars().take(60).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_failed_backend_is_held_out_until_its_hold_ends() {
        let h = Holds::default();
        let t0 = Instant::now();
        assert_eq!(h.exclude_at(&[addr(1)], t0), None);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, t0), (FIRST_HOLD, 1));
        assert_eq!(
            h.exclude_at(&[addr(1)], t0 + Duration::from_millis(999)),
            Some(vec![addr(1), addr(2)])
        );
        assert_eq!(h.exclude_at(&[addr(1)], t0 + FIRST_HOLD), None);
    }

    #[test]
    fn only_failed_checks_put_a_backend_down_and_an_answer_brings_it_back() {
        let h = Holds::default();
        let t0 = Instant::now();
        assert!(!h.all_down(&[]), "nothing tried is not all down");
        h.failed_at(addr(2), Failure::Connect, t0);
        assert!(
            !h.all_down(&[addr(2)]),
            "a client's failed connect may be a restart"
        );
        h.failed_at(addr(3), Failure::Checks(Duration::from_secs(3)), t0);
        assert!(h.all_down(&[addr(3)]));
        assert!(!h.all_down(&[addr(2), addr(3)]));
        h.failed_at(addr(3), Failure::Connect, t0);
        assert!(h.all_down(&[addr(3)]), "a client's failure leaves it down");
        h.failed_at(addr(2), Failure::Checks(Duration::from_secs(3)), t0);
        assert!(h.all_down(&[addr(2), addr(3)]));
        assert!(h.succeeded(addr(3), Answer::Checks, || Some(Duration::from_secs(1))));
        assert!(!h.all_down(&[addr(3)]), "it answered: slow-starting, not down");
        h.failed_at(addr(3), Failure::Connect, t0);
        assert!(
            !h.all_down(&[addr(3)]),
            "a new outage starts as a client's failure"
        );
    }

    /// A client's failed connect to a backend its checks hold down does not cut that hold to its own
    /// length: cut to 2 s, the hold ran out long before the next check, and the next client's connect that
    /// succeeded ended it, sending clients to a backend the checks had down.
    #[test]
    fn a_clients_failed_connect_does_not_shorten_a_checks_hold() {
        let h = Holds::default();
        let t0 = Instant::now();
        let until_next = Duration::from_secs(61);
        h.failed_at(addr(2), Failure::Checks(until_next), t0);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, t0), (until_next, 2));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(h.exclude_down_at(&[], later), Some(vec![addr(2)]));
        assert!(
            !h.succeeded_at(addr(2), Answer::Connect, None, later),
            "only checks end it"
        );
        assert!(h.all_down(&[addr(2)]));
    }

    #[test]
    fn holds_double_with_each_failure_in_a_row_and_a_success_ends_them() {
        let h = Holds::default();
        let t0 = Instant::now();
        let holds: Vec<u64> = (0..8)
            .map(|_| h.failed_at(addr(2), Failure::Connect, t0).0.as_secs())
            .collect();
        assert_eq!(holds, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(h.succeeded(addr(2), Answer::Connect, || None));
        assert!(!h.succeeded(addr(2), Answer::Connect, || unreachable!("asked only for a hold")));
        assert!(h.map.load().is_empty(), "no slow start: nothing left");
        assert_eq!(h.exclude_at(&[], t0), None);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, t0), (FIRST_HOLD, 1));
        // A failed check holds it at least until the next check.
        let next_check = Duration::from_millis(2_500);
        assert_eq!(
            h.failed_at(addr(2), Failure::Checks(next_check), t0),
            (next_check, 2)
        );
    }

    #[test]
    fn checks_put_a_backend_down_after_fall_failures_and_back_after_rise_passes() {
        use Verdict::*;
        let mut s = CheckStreaks::default();
        let mut run = |results: &str| -> Vec<Verdict> {
            results
                .chars()
                .map(|c| s.record(addr(2), c == '+', 3, 2))
                .collect()
        };
        // Two failures are suspect, a pass clears them; the third failure in a row puts it down.
        assert_eq!(run("+--+"), [Up, Suspect, Suspect, Up]);
        assert_eq!(run("---"), [Suspect, Suspect, Down]);
        // Down: failures keep it down, one pass is not enough, a failure restarts the count.
        assert_eq!(run("-+-++"), [Down, Rising, Down, Rising, Up]);
        assert_eq!(run("+-"), [Up, Suspect]);
        // Marked up otherwise (a client's connect), its streak starts over.
        assert_eq!(run("--"), [Suspect, Down]);
        s.up(addr(2));
        assert_eq!(s.record(addr(2), false, 3, 2), Suspect);
        // With 1 and 1, every result counts at once.
        assert_eq!(s.record(addr(3), false, 1, 1), Down);
        assert_eq!(s.record(addr(3), true, 1, 1), Up);
    }

    #[test]
    fn keeping_a_hold_extends_it_without_counting_a_failure() {
        let h = Holds::default();
        let t0 = Instant::now();
        assert!(!h.keep_at(addr(2), FIRST_HOLD, t0), "nothing to keep");
        assert!(h.map.load().is_empty());
        h.failed_at(addr(2), Failure::Connect, t0);
        let later = t0 + Duration::from_secs(5);
        assert!(h.keep_at(addr(2), FIRST_HOLD, later));
        assert!(h.exclude_at(&[], later + Duration::from_millis(999)).is_some());
        assert_eq!(h.exclude_at(&[], later + FIRST_HOLD), None);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, later), (2 * FIRST_HOLD, 2));
    }

    #[test]
    fn a_backend_back_from_a_hold_slow_starts() {
        let h = Holds::default();
        let t0 = Instant::now();
        let ramp = Duration::from_secs(10);
        let s = |t: Instant| h.share_at(addr(2), ramp, t);
        h.failed_at(addr(2), Failure::Connect, t0);
        assert_eq!(s(t0), None, "held out: not picked at all, no share to give");
        let back = t0 + Duration::from_secs(3);
        assert!(h.succeeded_at(addr(2), Answer::Connect, Some(ramp), back));
        assert!(
            !h.succeeded_at(addr(2), Answer::Connect, Some(ramp), back),
            "a slow start is not a hold"
        );
        assert!(!h.keep_at(addr(2), FIRST_HOLD, back), "nor is it kept as one");
        assert_eq!(h.exclude_at(&[], back), None, "it is in the picks");
        assert_eq!(s(back), Some(0.0));
        assert_eq!(s(back + Duration::from_millis(2_500)), Some(0.25));
        assert_eq!(s(back + ramp), None, "whole again");
        assert_eq!(h.share_at(addr(3), ramp, back), None);
        let longer = Duration::from_secs(20);
        assert_eq!(
            h.share_at(addr(2), longer, back + Duration::from_secs(5)),
            Some(0.25),
            "a reload changes the slow start under way"
        );
        // Forgotten as a hold is, FORGET_AFTER being the longest slow start.
        h.forget_stale_at(back + FORGET_AFTER);
        assert!(h.map.load().is_empty());
        // A failure while it slow-starts counts as a first one, and holds it again.
        h.failed_at(addr(2), Failure::Connect, back);
        h.succeeded_at(addr(2), Answer::Connect, Some(ramp), back);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, back), (FIRST_HOLD, 1));
        assert_eq!(s(back), None);
    }

    #[test]
    fn an_http_check_passes_on_2xx_and_3xx_only() {
        assert_eq!(status_passes(b"HTTP/1.1 200 OK"), Ok(()));
        assert_eq!(status_passes(b"HTTP/1.0 302 Found"), Ok(()));
        assert_eq!(
            status_passes(b"HTTP/1.1 503 Service Unavailable"),
            Err("HTTP status 503".into())
        );
        assert_eq!(status_passes(b"HTTP/1.1 404"), Err("HTTP status 404".into()));
        for bad in [
            &b"SSH-2.0-OpenSSH_9.2"[..],
            b"HTTP/1.1 2OO OK",
            b"",
            b"\xff\xfe 200",
        ] {
            let e = status_passes(bad).unwrap_err();
            assert!(e.starts_with("not an HTTP status line"), "{e}");
        }
    }

    /// A backend that wants a PROXY header on every connection (as nginx's `listen ... proxy_protocol`)
    /// closes on a check without one, and answers one that opens with a `LOCAL` header.
    #[tokio::test]
    async fn a_check_opens_with_a_local_proxy_header_when_the_backend_expects_one() {
        use tokio::net::TcpListener;
        use xcluster_proto::proxy_header::{Addresses, decode};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf).await.unwrap() {
                        0 => break,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                let local = decode(&got).is_ok_and(|h| h.addresses == Addresses::Local);
                let request = if local { &got[16..] } else { &got[..] };
                if local && request.starts_with(b"GET /readyz ") {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await
                        .unwrap();
                }
                seen.push((local, request.len()));
            }
            seen
        });
        async fn within<F: Future>(f: F) -> F::Output {
            tokio::time::timeout(Duration::from_secs(10), f).await.unwrap()
        }
        let readyz = Probe::Http("/readyz".into());
        assert_eq!(within(check(addr, true, &readyz)).await, Ok(()));
        assert_eq!(
            within(check(addr, false, &readyz)).await,
            Err("closed before an HTTP status line".into())
        );
        assert_eq!(within(check(addr, true, &Probe::Connect)).await, Ok(()));
        let seen = within(backend).await.unwrap();
        assert!(seen[0].0 && !seen[1].0 && seen[1].1 > 0, "{seen:?}");
        assert_eq!(seen[2], (true, 0), "a TCP check sends the header alone");
    }

    /// A send/expect check passes only when the answer holds the expected bytes, wherever they fall within
    /// the window and however the answer is split; a wrong answer, a close, or bytes past the window fail.
    #[tokio::test]
    async fn a_send_expect_check_passes_only_on_the_expected_answer() {
        use tokio::net::TcpListener;
        // Answers each connection with the chunks of the next script, after reading what the check sends.
        let scripts: Vec<(&[u8], Vec<Vec<u8>>)> = vec![
            (b"PING\r\n", vec![b"+PO".to_vec(), b"NG\r\n".to_vec()]),
            (b"PING\r\n", vec![b"-ERR unknown\r\n".to_vec()]),
            (b"", vec![b"220 mail ready\r\n".to_vec()]),
            (b"PING\r\n", vec![vec![b'x'; 5000], b"+PONG".to_vec()]),
            (b"PING\r\n", vec![]),
        ];
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let answers: Vec<Vec<Vec<u8>>> = scripts.iter().map(|(_, a)| a.clone()).collect();
        let backend = tokio::spawn(async move {
            let mut asked = Vec::new();
            for chunks in answers {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = vec![0u8; 64];
                let n = if chunks.first().is_some_and(|c| c.starts_with(b"220")) {
                    0 // speaks first, as an SMTP server does
                } else {
                    s.read(&mut got).await.unwrap()
                };
                asked.push(got[..n].to_vec());
                for c in chunks {
                    if s.write_all(&c).await.is_err() {
                        break;
                    }
                    s.flush().await.unwrap();
                }
            }
            asked
        });
        let probe = |send: &[u8], expect: &[u8]| Probe::Expect {
            send: send.to_vec(),
            expect: expect.to_vec(),
        };
        let within = |p: Probe| async move {
            tokio::time::timeout(Duration::from_secs(10), check(addr, false, &p))
                .await
                .unwrap()
        };
        assert_eq!(within(probe(b"PING\r\n", b"+PONG")).await, Ok(()));
        assert_eq!(
            within(probe(b"PING\r\n", b"+PONG")).await,
            Err("closed without \"+PONG\"".into())
        );
        assert_eq!(within(probe(b"", b"220 ")).await, Ok(()));
        assert_eq!(
            within(probe(b"PING\r\n", b"+PONG")).await,
            Err("no \"+PONG\" in the first 4096 bytes".into())
        );
        assert_eq!(
            within(probe(b"PING\r\n", b"\r\n")).await,
            Err("closed without \"\\r\\n\"".into())
        );
        // Bounded like the checks: a backend stuck on an accept or a read must fail the test, not hang it.
        let asked = tokio::time::timeout(Duration::from_secs(10), backend)
            .await
            .unwrap()
            .unwrap();
        let sent: Vec<&[u8]> = scripts.iter().map(|(s, _)| *s).collect();
        assert_eq!(asked, sent);
    }

    #[test]
    fn a_backend_quiet_for_long_is_forgotten() {
        let h = Holds::default();
        let t0 = Instant::now();
        h.failed_at(addr(2), Failure::Connect, t0);
        h.failed_at(addr(2), Failure::Connect, t0);
        // Its 2 s hold ends at t0 + 2 s and is forgotten FORGET_AFTER later: by the health-check task's turn,
        // or by the next failure anywhere, after which its own counts as a first again.
        let later = t0 + FORGET_AFTER + Duration::from_secs(3);
        h.forget_stale_at(later - Duration::from_secs(2));
        assert_eq!(h.map.load().len(), 1, "its hold ended less than FORGET_AFTER ago");
        assert_eq!(
            h.exclude_at(&[], later),
            None,
            "a hold that ran out holds nothing"
        );
        h.forget_stale_at(later);
        assert!(h.map.load().is_empty());
        h.failed_at(addr(2), Failure::Connect, t0);
        h.failed_at(addr(3), Failure::Connect, later);
        assert_eq!(h.map.load().len(), 1);
        assert_eq!(h.failed_at(addr(2), Failure::Connect, later), (FIRST_HOLD, 1));
    }
}
