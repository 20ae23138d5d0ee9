//! `[proxy]`'s validation: every key checked and converted at once, host names resolved.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use xcluster_runtime::Validator;
use xcluster_runtime::net::is_host_name;

use super::{
    BackendConfig, Balance, Check, Forwarding, ListenerConfig, Probe, ProxyConfig, ProxySection, RuntimeMode,
    Timeouts,
};
use crate::proxy::acl::{self, Acl, Net};
use crate::proxy::clients::Rate;
use crate::proxy::sni::{MAX_ROUTES, SniRoutes};

/// The most addresses one backend's host name may stand for.
const MAX_ADDRS_PER_NAME: usize = 64;

/// The addresses of a backend's `addr` that is not an IP address and port: a host name and port, resolved
/// now, at each load and reload (as nginx does without `resolve`): every address it has, in the resolver's
/// order, without repeats. Problems go to `v`, and none is given back then.
fn resolve(v: &mut Validator, key: &str, text: &str) -> Vec<SocketAddr> {
    let named = text
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)));
    let Some((host, port)) = named.filter(|(h, p)| *p > 0 && is_host_name(h)) else {
        v.error(
            key,
            format!(
                "{text:?} is neither an IP address and port (127.0.0.1:7000, [::1]:7000) nor a host name and \
                 port (app1.internal:7000){}",
                xcluster_proto::bracket_hint(text).unwrap_or_default()
            ),
        );
        return Vec::new();
    };
    let lookup = || -> std::io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        Ok(unique((host, port).to_socket_addrs()?.collect()))
    };
    // getaddrinfo blocks, for seconds if the DNS server does not answer: off the async workers when the
    // config is validated on one (a reload).
    let found = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(lookup)
        }
        _ => lookup(),
    };
    let mut found = match found {
        Ok(found) if !found.is_empty() => found,
        Ok(_) => {
            v.error(key, format!("{host:?} resolves to no address"));
            return Vec::new();
        }
        Err(e) => {
            v.error(key, format!("cannot resolve {host:?}: {e}"));
            return Vec::new();
        }
    };
    if found.len() > MAX_ADDRS_PER_NAME {
        v.error(
            key,
            format!(
                "{host:?} resolves to {} addresses, at most {MAX_ADDRS_PER_NAME}",
                found.len()
            ),
        );
        found.truncate(MAX_ADDRS_PER_NAME);
    }
    found
}

/// `found` in its order, without repeats.
pub fn unique(mut found: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    found.retain(|a| seen.insert(*a));
    found
}

const MAX_LISTENERS: usize = 256;
const MAX_BACKENDS: usize = 4096;

/// The entries of a listener's `allow` or `deny` at `key`, each an address or CIDR network.
fn nets(v: &mut Validator, key: &str, entries: &[String]) -> Vec<Net> {
    v.check(entries.len() <= acl::MAX_ENTRIES, key, || {
        format!("{} entries, at most {}", entries.len(), acl::MAX_ENTRIES)
    });
    entries
        .iter()
        .enumerate()
        .filter_map(|(j, e)| match Net::parse(e) {
            Ok(n) => Some(n),
            Err(msg) => {
                v.error(format!("{key}[{j}]"), msg);
                None
            }
        })
        .collect()
}

/// The most bytes of `check_send` and of `check_expect`.
const CHECK_BYTES_MAX: usize = 1024;

/// The probe of the check keys `path`, `send` and `expect` of `key` (`proxy` or a backend's): HTTP with a
/// path, send/expect with an `expect`, else the bare connect. Both, or a `send` without an `expect`, are
/// errors.
fn probe(v: &mut Validator, key: &str, path: &str, send: &str, expect: &str) -> Probe {
    check_path(v, &format!("{key}.check_http_path"), path);
    for (name, s) in [("check_send", send), ("check_expect", expect)] {
        v.check(s.len() <= CHECK_BYTES_MAX, &format!("{key}.{name}"), || {
            format!("{} bytes, at most {CHECK_BYTES_MAX}", s.len())
        });
    }
    v.check(
        send.is_empty() || !expect.is_empty(),
        &format!("{key}.check_send"),
        || "needs check_expect: what the answer must hold".into(),
    );
    v.check(
        path.is_empty() || expect.is_empty(),
        &format!("{key}.check_expect"),
        || "not with check_http_path: a check is either HTTP or send/expect".into(),
    );
    if !expect.is_empty() {
        Probe::Expect {
            send: send.as_bytes().to_vec(),
            expect: expect.as_bytes().to_vec(),
        }
    } else if !path.is_empty() {
        Probe::Http(path.to_string())
    } else {
        Probe::Connect
    }
}

/// An HTTP check's path: empty (the bare connect) or a path starting with `/`, at most 1024 visible ASCII
/// bytes (it goes into the request line as is).
fn check_path(v: &mut Validator, field: &str, path: &str) {
    v.check(
        path.is_empty()
            || (path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic())),
        field,
        || format!("{path:?} must be empty or a path starting with '/', at most 1024 visible ASCII bytes"),
    );
}

fn check_name(v: &mut Validator, key: &str, s: &str) {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    v.check(ok, key, || {
        format!("{s:?} must be 1..=64 characters of [A-Za-z0-9_.-]")
    });
}

impl ProxySection {
    /// Checks every key and returns the typed section; problems go to `v`.
    pub fn validate(&self, v: &mut Validator) -> ProxyConfig {
        v.check(self.listeners.len() <= MAX_LISTENERS, "proxy.listeners", || {
            format!("{} listeners, at most {MAX_LISTENERS}", self.listeners.len())
        });
        v.check(self.backends.len() <= MAX_BACKENDS, "proxy.backends", || {
            format!("{} backends, at most {MAX_BACKENDS}", self.backends.len())
        });
        // The `[proxy]` idle and fin timeouts, and each listener's own; 0 turns either off.
        let timeout = |v: &mut Validator, key: &str, ms: u64| {
            Some(v.millis(key, ms, 0, 86_400_000)).filter(|d| !d.is_zero())
        };
        let idle = timeout(v, "proxy.idle_timeout_ms", self.idle_timeout_ms);
        let fin = timeout(v, "proxy.fin_timeout_ms", self.fin_timeout_ms);
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("proxy.listeners[{i}]");
            let listen = v.addr(&format!("{key}.listen"), &l.listen);
            check_name(v, &format!("{key}.request_type"), &l.request_type);
            // Port 0 would give each per-core socket a different port.
            if listen.port() == 0 && l.listen.parse::<SocketAddr>().is_ok() {
                v.error(format!("{key}.listen"), format!("{listen} must name a port"));
            }
            let name = if l.name.is_empty() {
                l.request_type.clone()
            } else {
                check_name(v, &format!("{key}.name"), &l.name);
                l.name.clone()
            };
            if listeners.iter().any(|o| o.listen == listen) {
                v.error(
                    format!("{key}.listen"),
                    format!("{listen} is used by another listener"),
                );
            }
            if listeners.iter().any(|o| o.name == name) {
                v.error(
                    format!("{key}.name"),
                    format!("{name:?} is used by another listener"),
                );
            }
            let sni = (!l.sni.is_empty()).then(|| {
                let key = format!("{key}.sni");
                v.check(l.sni.len() <= MAX_ROUTES, &key, || {
                    format!("{} names, at most {MAX_ROUTES}", l.sni.len())
                });
                for ty in l.sni.values() {
                    check_name(v, &key, ty);
                }
                let pairs = l.sni.iter().map(|(n, t)| (n.as_str(), t.as_str()));
                SniRoutes::new(pairs).unwrap_or_else(|e| {
                    v.error(key, e);
                    SniRoutes::default()
                })
            });
            v.check(!l.sni_only || sni.is_some(), &format!("{key}.sni_only"), || {
                "needs sni: with no names listed, every client would be closed".into()
            });
            v.check(
                l.accept_proxy || l.accept_proxy_from.is_empty(),
                &format!("{key}.accept_proxy_from"),
                || "has no effect without accept_proxy = true".into(),
            );
            listeners.push(ListenerConfig {
                name,
                listen,
                request_type: l.request_type.clone(),
                proxy_protocol: l.proxy_protocol,
                accept_proxy: l.accept_proxy,
                proxy_from: nets(v, &format!("{key}.accept_proxy_from"), &l.accept_proxy_from),
                log_connections: l.log_connections,
                max_connections: v.range(&format!("{key}.max_connections"), l.max_connections, 0, 1_000_000),
                max_connections_per_client: Some(v.range(
                    &format!("{key}.max_connections_per_client"),
                    l.max_connections_per_client,
                    0,
                    1_000_000,
                ))
                .filter(|&n| n > 0),
                connection_rate: Some(Rate {
                    count: v.range(
                        &format!("{key}.max_connection_rate_per_client"),
                        l.max_connection_rate_per_client,
                        0,
                        1_000_000,
                    ),
                    period: v.millis(
                        &format!("{key}.connection_rate_period_ms"),
                        l.connection_rate_period_ms,
                        1000,
                        3_600_000,
                    ),
                })
                .filter(|r| r.count > 0),
                max_connection_rate: v.range(
                    &format!("{key}.max_connection_rate"),
                    l.max_connection_rate,
                    0,
                    10_000_000,
                ),
                acl: Acl {
                    allow: nets(v, &format!("{key}.allow"), &l.allow),
                    deny: nets(v, &format!("{key}.deny"), &l.deny),
                },
                idle: match l.idle_timeout_ms {
                    Some(ms) => timeout(v, &format!("{key}.idle_timeout_ms"), ms),
                    None => idle,
                },
                fin: match l.fin_timeout_ms {
                    Some(ms) => timeout(v, &format!("{key}.fin_timeout_ms"), ms),
                    None => fin,
                },
                sni,
                sni_only: l.sni_only,
            });
        }
        let mut backends: Vec<BackendConfig> = Vec::new();
        // The entry of `proxy.backends` each of `backends` comes from, for messages: a host name stands for
        // any number of them, so their indexes differ.
        let mut entries: Vec<usize> = Vec::new();
        let mut names: Vec<(String, Vec<SocketAddr>)> = Vec::new();
        // How each is checked: worked out here, once per (re)load, for the health-check task.
        let mut checks = Vec::new();
        let global_probe = probe(
            v,
            "proxy",
            &self.check_http_path,
            &self.check_send,
            &self.check_expect,
        );
        for (i, b) in self.backends.iter().enumerate() {
            let key = format!("proxy.backends[{i}]");
            let weight = v.range(&format!("{key}.weight"), b.weight, 0, 1_000_000);
            let max_connections = v.range(
                &format!("{key}.max_connections"),
                b.max_connections,
                0,
                10_000_000,
            );
            for t in &b.request_types {
                check_name(v, &format!("{key}.request_types"), t);
            }
            let own = b.check_http_path.is_some() || b.check_send.is_some() || b.check_expect.is_some();
            let probe = if own {
                fn text(o: &Option<String>) -> &str {
                    o.as_deref().unwrap_or("")
                }
                let (path, send, expect) = (&b.check_http_path, &b.check_send, &b.check_expect);
                probe(v, &key, text(path), text(send), text(expect))
            } else {
                global_probe.clone()
            };
            if let Some(port) = b.check_port {
                v.check(port > 0, &format!("{key}.check_port"), || {
                    "must be 1 to 65535".into()
                });
            }
            // A host name stands for every address it resolves to, each a backend with the entry's settings.
            let resolved = match b.addr.parse::<SocketAddr>() {
                Ok(addr) => vec![addr],
                Err(_) => {
                    let found = resolve(v, &format!("{key}.addr"), &b.addr);
                    if !names.iter().any(|(n, _)| *n == b.addr) {
                        names.push((b.addr.clone(), found.clone()));
                    }
                    found
                }
            };
            for addr in resolved {
                // Port 0 is refused at every connect; 0.0.0.0 or :: would reach this host, where HAProxy takes
                // them for the client's own destination: neither is a server.
                v.check(
                    xcluster_proto::report::usable_addr(addr),
                    &format!("{key}.addr"),
                    || {
                        let named = if b.addr.parse::<SocketAddr>().is_ok() {
                            String::new()
                        } else {
                            format!("{:?} resolves to {addr}: ", b.addr)
                        };
                        format!("{named}{addr} is no server to connect to: a backend needs a port and an address (not 0.0.0.0 or ::)")
                    },
                );
                let backend = BackendConfig {
                    addr,
                    weight,
                    request_types: b.request_types.clone(),
                    backup: b.backup,
                    max_connections,
                    close_on_down: b.close_on_down,
                };
                let target = SocketAddr::new(addr.ip(), b.check_port.unwrap_or(addr.port()));
                let check = b.check.then(|| Check {
                    probe: probe.clone(),
                    target,
                    // Only the service's own port expects the header; a side port (`check_port`) is another
                    // program's.
                    proxy_header: target == addr
                        && listeners
                            .iter()
                            .any(|l| l.proxy_protocol && l.types().any(|t| backend.serves(t))),
                });
                match backends
                    .iter()
                    .position(|o| o.addr == addr)
                    .map(|j| (j, entries[j]))
                {
                    None => checks.extend(check.map(|c| (addr, c))),
                    // The same server in another pool (HAProxy lists a server in several backends), with its own
                    // weight and `backup` there: one server, so one connection limit and one health check.
                    Some((j, entry)) => {
                        // Disjoint from every earlier entry of the address; the settings of the server need only
                        // match the first, which each later one matched too.
                        let other = &backends[j];
                        let overlap = (backends.iter().enumerate()).find(|(_, o)| {
                            o.addr == addr
                                && (b.request_types.is_empty()
                                    || o.request_types.is_empty()
                                    || b.request_types.iter().any(|t| o.serves(t)))
                        });
                        if let Some((k, _)) = overlap {
                            let k = entries[k];
                            v.error(
                                format!("{key}.addr"),
                                format!(
                                    "{addr} is listed in proxy.backends[{k}] too: an address may be in several \
                                     entries only with disjoint, non-empty request_types"
                                ),
                            );
                        }
                        v.check(
                            max_connections == other.max_connections,
                            &format!("{key}.max_connections"),
                            || {
                                format!(
                                    "{max_connections} differs from proxy.backends[{entry}] of the same address"
                                )
                            },
                        );
                        v.check(
                            b.close_on_down == other.close_on_down,
                            &format!("{key}.close_on_down"),
                            || format!("differs from proxy.backends[{entry}] of the same address"),
                        );
                        let earlier = checks.iter_mut().find(|(a, _)| *a == addr).map(|(_, c)| c);
                        let same = match (earlier, check) {
                            (None, None) => true,
                            (Some(e), Some(c)) => {
                                // Headers go to the server if any of its pools' listeners sends them.
                                e.proxy_header |= c.proxy_header;
                                e.probe == c.probe && e.target == c.target
                            }
                            _ => false,
                        };
                        v.check(same, &format!("{key}.check"), || {
                            format!(
                                "its checks (check, check_http_path, check_send, check_expect, check_port) differ from proxy.backends[{entry}] of \
                                 the same address"
                            )
                        });
                    }
                }
                backends.push(backend);
                entries.push(i);
            }
        }
        v.check(backends.len() <= MAX_BACKENDS, "proxy.backends", || {
            format!(
                "{} backends once host names are resolved, at most {MAX_BACKENDS}",
                backends.len()
            )
        });
        let workers = v.range("proxy.workers", self.workers, 0, 256);
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        };
        let runtime = v.one_of(
            "proxy.runtime",
            &self.runtime,
            &RuntimeMode::ALL.map(|m| (m.name(), m)),
        );
        let forwarding = v.one_of(
            "proxy.forwarding",
            &self.forwarding,
            &Forwarding::ALL.map(|f| (f.name(), f)),
        );
        let connect = v.millis("proxy.connect_timeout_ms", self.connect_timeout_ms, 1, 60_000);
        let connect_attempts = v.range("proxy.connect_attempts", self.connect_attempts, 1, 16);
        // Bounded: a closing io_uring connection waits for its pause to end.
        let retry_delay = v.millis(
            "proxy.connect_retry_delay_ms",
            self.connect_retry_delay_ms,
            0,
            1_000,
        );
        let check = v.millis("proxy.check_interval_ms", self.check_interval_ms, 0, 3_600_000);
        v.check(
            check.is_zero() || check >= Duration::from_millis(100),
            "proxy.check_interval_ms",
            || format!("{} must be 0 (off) or at least 100", check.as_millis()),
        );
        let check_fall = v.range("proxy.check_fall", self.check_fall, 1, 100);
        let check_rise = v.range("proxy.check_rise", self.check_rise, 1, 100);
        let slow_start = v.millis("proxy.slow_start_ms", self.slow_start_ms, 0, 300_000);
        let queue = v.millis("proxy.queue_timeout_ms", self.queue_timeout_ms, 0, 60_000);
        let balance_of = |v: &mut Validator, key: &str, name: &str| {
            v.one_of(
                key,
                name,
                &[
                    ("random", Balance::Random),
                    ("round_robin", Balance::RoundRobin),
                    ("least_connections", Balance::LeastConnections),
                    ("source", Balance::Source),
                ],
            )
        };
        let balance = balance_of(v, "proxy.balance", &self.balance);
        let mut balance_by_type = BTreeMap::new();
        v.check(
            self.balance_by_type.len() <= MAX_LISTENERS,
            "proxy.balance_by_type",
            || format!("{} entries, at most {MAX_LISTENERS}", self.balance_by_type.len()),
        );
        for (ty, name) in &self.balance_by_type {
            let key = format!("proxy.balance_by_type.{ty}");
            check_name(v, &key, ty);
            // A type the directory routes follows its live weights: a balance for it would do nothing.
            v.check(backends.iter().any(|b| b.serves(ty)), &key, || {
                format!("no [[proxy.backends]] serve {ty:?}; the directory's weights route it")
            });
            balance_by_type.insert(ty.clone(), balance_of(v, &key, name));
        }
        let max_connections = v.range("proxy.max_connections", self.max_connections, 1, 1_000_000);
        let backlog = v.range("proxy.backlog", self.backlog, 1, 65_535);
        let io_uring_buffers = v.range("proxy.io_uring_buffers", self.io_uring_buffers, 1, 32_768);
        v.check(
            io_uring_buffers.is_power_of_two(),
            "proxy.io_uring_buffers",
            || format!("{io_uring_buffers} must be a power of two"),
        );
        // TCP_KEEPIDLE is whole seconds, 1 to 32,767 on Linux: a value past it passed here and then failed
        // every listener's bind with a bare "Invalid argument".
        let keepalive = v.millis("proxy.keepalive_ms", self.keepalive_ms, 0, 32_767_000);
        v.check(
            self.keepalive_ms.is_multiple_of(1000),
            "proxy.keepalive_ms",
            || {
                format!(
                    "{} must be whole seconds (the kernel counts keepalive in seconds), or 0",
                    self.keepalive_ms
                )
            },
        );
        let warmup = v.millis("proxy.warmup_ms", self.warmup_ms, 0, 60_000);
        let busy_poll = v.range("proxy.busy_poll_us", self.busy_poll_us, 0, 1_000);
        ProxyConfig {
            listeners,
            backends,
            workers,
            runtime,
            forwarding,
            timeouts: Timeouts {
                connect,
                connect_attempts,
                retry_delay,
                check_interval: (!check.is_zero()).then_some(check),
                checks,
                check_fall,
                check_rise,
                slow_start: (!slow_start.is_zero()).then_some(slow_start),
                queue: (!queue.is_zero()).then_some(queue),
                busy_poll: Duration::from_micros(u64::from(busy_poll)),
            },
            max_connections,
            backlog,
            keepalive: (!keepalive.is_zero()).then_some(keepalive),
            warmup,
            // At most 32,768 after the range check.
            io_uring_buffers: u16::try_from(io_uring_buffers).unwrap_or(u16::MAX),
            balance,
            balance_by_type,
            names,
            resolve_interval: match self.resolve_interval_ms {
                0 => None,
                ms => Some(v.millis("proxy.resolve_interval_ms", ms, 1_000, 86_400_000)),
            },
        }
    }
}
