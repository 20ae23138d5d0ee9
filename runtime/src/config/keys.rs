//! Config keys as paths: `--set`'s (an array item named as the reload log names it), the flattened form a
//! reload's one-line diff is built from, and which restart-only keys a reload changed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// The keys of `new` that differ from `old` (changed, added or removed) and fall under one of `under`
/// ([`RoleConfig::RESTART_KEYS`]), sorted.
pub fn changed_under<T: Serialize>(old: &T, new: &T, under: &[&str]) -> Vec<String> {
    let (old, new): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        flatten(old).into_iter().collect(),
        flatten(new).into_iter().collect(),
    );
    let within = |k: &str| {
        under.iter().any(|u| {
            k.strip_prefix(u)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
        })
    };
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k) && within(k))
        .cloned()
        .collect()
}

/// Sets `a.b.c` in the table; the value is parsed as a TOML value when it is one, else taken as a string. An
/// item of an array of tables is named as the reload log names it (see [`flatten`]): `proxy.listeners[web].listen`,
/// `proxy.backends[127.0.0.1:8001].weight`, or by index, `proxy.backends[0].weight`; it must exist. An item
/// of a list of plain values is replaced by its index: `balancers[1]=127.0.0.1:7001`.
pub(super) fn set_path(table: &mut toml::Table, key: &str, raw_value: &str) -> Result<(), String> {
    let segs = key_segments(key).ok_or_else(|| {
        format!("invalid key {key:?} (expected a.b.c, with name[item] for an item of an array)")
    })?;
    let value = format!("v = {raw_value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw_value.to_string()));
    let ((last, last_item), parents) = segs.split_last().ok_or_else(|| format!("invalid key {key:?}"))?;
    let mut cur = table;
    for (seg, item) in parents {
        cur = match item {
            None => {
                let entry = cur
                    .entry(seg.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => t,
                    toml::Value::Array(_) => return Err(a_list(seg)),
                    _ => return Err(format!("{seg} is not a table")),
                }
            }
            Some(label) => {
                let items = match cur.get_mut(*seg) {
                    Some(toml::Value::Array(items)) => items,
                    Some(_) => return Err(format!("{seg} is not an array of tables")),
                    None => return Err(format!("no {seg} in the config to name an item of")),
                };
                let labels = item_labels(items);
                let at = find_item(items, &labels, label).map_err(|e| e.say(seg, label, &labels))?;
                match items.get_mut(at) {
                    Some(toml::Value::Table(t)) => t,
                    _ => return Err(format!("{seg}[{label}] is not a table")),
                }
            }
        };
    }
    match last_item {
        None => {
            if matches!(cur.get(*last), Some(toml::Value::Array(_))) && !value.is_array() {
                return Err(a_list(last));
            }
            cur.insert(last.to_string(), value);
        }
        Some(label) => {
            let Some(toml::Value::Array(items)) = cur.get_mut(*last) else {
                return Err(format!("no list {last} in the config to name an item of"));
            };
            if items.iter().any(toml::Value::is_table) {
                return Err(format!("{key:?} names an item of {last}: name one of its keys"));
            }
            let labels = item_labels(items);
            let at = find_item(items, &labels, label).map_err(|e| e.say(last, label, &labels))?;
            items[at] = value;
        }
    }
    Ok(())
}

/// What to do when a key names a list as if it were one value or table.
fn a_list(seg: &str) -> String {
    format!(
        "{seg} is a list: name an item as `--set '{seg}[NAME].KEY=VALUE'` does (by its name, address or index), \
         which an environment variable cannot, or give the whole list"
    )
}

/// Why an item of a list could not be told.
enum NoItem {
    None,
    /// Several items are named so (one address in several pools): their indexes.
    Several(Vec<usize>),
}

impl NoItem {
    fn say(self, seg: &str, label: &str, labels: &[String]) -> String {
        match self {
            NoItem::None => format!("no item {label:?} in {seg} (its items: {})", labels.join(", ")),
            NoItem::Several(at) => {
                let at: Vec<String> = at.iter().map(usize::to_string).collect();
                format!(
                    "{label:?} names {} items of {seg} (at {}): name one by its index, as `{seg}[{}]`",
                    at.len(),
                    at.join(", "),
                    at[0]
                )
            }
        }
    }
}

/// The index of the item of `items` (labelled `labels`, see [`item_labels`]) that `label` names: by the label
/// the reload log shows, else by any of the keys that may name an item (a listener, labelled by its name,
/// by its `listen` address too), else by index.
fn find_item(items: &[toml::Value], labels: &[String], label: &str) -> Result<usize, NoItem> {
    if let Some(at) = labels.iter().position(|l| l == label) {
        return Ok(at);
    }
    let named = |item: &toml::Value| {
        ITEM_KEYS
            .iter()
            .any(|k| item.get(k).and_then(toml::Value::as_str) == Some(label))
    };
    let at: Vec<usize> = (0..items.len()).filter(|&i| named(&items[i])).collect();
    match at[..] {
        [one] => Ok(one),
        [] => (label.parse::<usize>().ok())
            .filter(|i| *i < items.len())
            .ok_or(NoItem::None),
        _ => Err(NoItem::Several(at)),
    }
}

/// `key` with each item of an array of tables in it named by its label (see [`flatten`]), as `--set` and the
/// reload log name it: `proxy.listeners[1].listen` reads `proxy.listeners[api].listen` in `root` where that
/// listener is named `api`. A key that does not lead through `root` comes back as it is.
pub(super) fn labelled(root: &toml::Value, key: &str) -> String {
    let Some(segs) = key_segments(key) else {
        return key.to_string();
    };
    let mut out = String::with_capacity(key.len());
    let mut cur = Some(root);
    for (seg, item) in segs {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
        cur = cur.and_then(|v| v.get(seg));
        let Some(label) = item else { continue };
        let found = cur.and_then(toml::Value::as_array).and_then(|items| {
            let labels = item_labels(items);
            let at = find_item(items, &labels, label).ok()?;
            Some((labels.into_iter().nth(at)?, items.get(at)?))
        });
        match found {
            Some((shown, next)) => {
                out += &format!("[{shown}]");
                cur = Some(next);
            }
            None => {
                out += &format!("[{label}]");
                cur = None;
            }
        }
    }
    out
}

/// Splits `a.b[item].c` at the dots outside brackets, into each name and the item it names, if any; `None`
/// for an empty name or item, or a stray bracket. An item may hold dots (`backends[127.0.0.1:8001]`).
fn key_segments(key: &str) -> Option<Vec<(&str, Option<&str>)>> {
    let mut segs = Vec::new();
    let mut rest = key;
    loop {
        let (seg, tail) = match rest.find(['.', '[']) {
            Some(i) if rest.as_bytes()[i] == b'[' => {
                // An item may be a bracketed IPv6 address and port (`backends[[::1]:8001]`): its own `]`
                // comes first.
                let from = match rest[i + 1..].strip_prefix('[') {
                    Some(addr) => i + 2 + addr.find(']')? + 1,
                    None => i + 1,
                };
                let close = rest[from..].find(']')? + from;
                let item = &rest[i + 1..close];
                if item.is_empty() || item.chars().skip(1).any(|c| c == '[') {
                    return None;
                }
                segs.push((&rest[..i], Some(item)));
                match rest[close + 1..].strip_prefix('.') {
                    Some(tail) => (None, Some(tail)),
                    None if close + 1 == rest.len() => (None, None),
                    None => return None,
                }
            }
            Some(i) => (Some(&rest[..i]), Some(&rest[i + 1..])),
            None => (Some(rest), None),
        };
        if let Some(seg) = seg {
            segs.push((seg, None));
        }
        match tail {
            Some(t) => rest = t,
            None => break,
        }
    }
    let valid = |s: &str| !s.is_empty() && !s.contains(']');
    segs.iter().all(|(s, _)| valid(s)).then_some(segs)
}

/// The keys that may name an item of an array of tables, in the order [`item_labels`] tries them.
const ITEM_KEYS: [&str; 4] = ["name", "id", "addr", "listen"];

/// The names of an array's items, as [`flatten`] shows them: the first of `name`, `id`, `addr`, `listen` that
/// every item sets, each to its own value; else the first that every item sets, a value several items share
/// told apart by its turn (`127.0.0.1:8001#1`, `#2`: one server in two pools), so the items of other values
/// keep their names when one repeats; else their indexes.
fn item_labels(items: &[toml::Value]) -> Vec<String> {
    let mut shared = None;
    for key in ITEM_KEYS {
        let names: Vec<&str> = items
            .iter()
            .filter_map(|v| v.get(key)?.as_str().filter(|s| !s.is_empty()))
            .collect();
        if names.len() != items.len() {
            continue;
        }
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        if unique.len() == items.len() {
            return names.into_iter().map(str::to_string).collect();
        }
        shared = shared.or(Some(names));
    }
    let Some(names) = shared else {
        return (0..items.len()).map(|i| i.to_string()).collect();
    };
    let count = |n: &str, within: &[&str]| within.iter().filter(|m| **m == n).count();
    (names.iter().enumerate())
        .map(|(i, n)| match count(n, &names) {
            1 => n.to_string(),
            _ => format!("{n}#{}", count(n, &names[..=i])),
        })
        .collect()
}

/// Flattens a raw config into `key.path = value` lines, for one-line diffs on reload. An array of tables
/// flattens by the item's own name when each has one (`proxy.listeners[web].listen`, `proxy.backends[127.0.0.1:
/// 8001].weight`: the first of `name`, `id`, `addr`, `listen` that is set and unique), so removing the first
/// item reads as that item removed, not as every later one changed; other arrays by index (`peers[1]`).
pub fn flatten<T: Serialize>(raw: &T) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            // An empty array has no line: its first item then reads as added, not as the array removed
            // beside it (`deny[0] added ("192.0.2.7"), deny removed`, as a walk saw).
            toml::Value::Array(items) => {
                for (label, v) in item_labels(items).iter().zip(items) {
                    walk(&format!("{prefix}[{label}]"), v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(raw) {
        walk("", &v, &mut out);
    }
    out
}

/// Describes what changed between two raw configs in one line (`a: x -> y, b added, c removed`), at most
/// [`DIFF_PARTS`] changes and [`DIFF_VALUE_CHARS`] characters of a value, so a large reload logs a readable line.
/// Values are shown as `redact` leaves them (a role's [`RoleConfig::redact`]): a secret that changed reads
/// `key: changed (hidden)`; comparing redacted configs alone said "no changes".
pub fn diff<T: Serialize + Clone>(old: &T, new: &T, redact: impl Fn(&mut T)) -> String {
    let shown = |raw: &T| -> std::collections::BTreeMap<String, String> {
        let mut hidden = raw.clone();
        redact(&mut hidden);
        let shown: std::collections::BTreeMap<_, _> = flatten(&hidden).into_iter().collect();
        flatten(raw)
            .into_iter()
            .map(|(k, v)| {
                let v = match shown.get(&k) {
                    Some(s) if *s == v => v,
                    _ => HIDDEN.to_string(),
                };
                (k, v)
            })
            .collect()
    };
    let (raw_old, raw_new): (std::collections::BTreeMap<_, _>, std::collections::BTreeMap<_, _>) = (
        flatten(old).into_iter().collect(),
        flatten(new).into_iter().collect(),
    );
    let (old, new) = (shown(old), shown(new));
    let changed = |k: &String| raw_old.get(k) != raw_new.get(k);
    let short = |v: &str| match v.char_indices().nth(DIFF_VALUE_CHARS) {
        Some((cut, _)) => format!("{}...", &v[..cut]),
        None => v.to_string(),
    };
    // The outermost array item (`listeners[web]`) a key belongs to that is missing from `other` whole: it
    // is named once as added or removed, not key by key, nor by the items of its own arrays
    // (`backends[b].request_types[0]`). An item ends at a `]` followed by `.`, `[` or nothing, so the `]`
    // of an IPv6 label (`backends[[::1]:80]`) is not taken for one.
    let whole_item = |k: &str, other: &std::collections::BTreeMap<String, String>| {
        let bytes = k.as_bytes();
        let ends = (0..bytes.len())
            .filter(|&i| bytes[i] == b']' && matches!(bytes.get(i + 1), None | Some(b'.') | Some(b'[')));
        ends.map(|i| i + 1).filter(|&end| end < k.len()).find_map(|end| {
            let item = &k[..end];
            let inside = |o: &String| {
                o.as_str() == item || o.starts_with(&format!("{item}.")) || o.starts_with(&format!("{item}["))
            };
            (!other.keys().any(inside)).then(|| item.to_string())
        })
    };
    let mut named = std::collections::BTreeSet::new();
    let mut parts = Vec::new();
    for (k, v) in &new {
        match old.get(k) {
            None => match whole_item(k, &old) {
                Some(item) if named.insert(item.clone()) => parts.push(format!("{item} added")),
                Some(_) => {}
                None => parts.push(format!("{k} added ({})", short(v))),
            },
            Some(o) if changed(k) && (o == HIDDEN || v == HIDDEN) => {
                parts.push(format!("{k}: changed (hidden)"))
            }
            Some(o) if changed(k) => parts.push(format!("{k}: {} -> {}", short(o), short(v))),
            _ => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        match whole_item(k, &new) {
            Some(item) if named.insert(item.clone()) => parts.push(format!("{item} removed")),
            Some(_) => {}
            None => parts.push(format!("{k} removed")),
        }
    }
    if parts.is_empty() {
        return "no changes".to_string();
    }
    let more = parts.len().saturating_sub(DIFF_PARTS);
    parts.truncate(DIFF_PARTS);
    if more > 0 {
        parts.push(format!("and {more} more"));
    }
    parts.join(", ")
}

/// What a redacted value reads as in a diff.
const HIDDEN: &str = "<hidden>";

/// Changes a reload's log line names at most.
const DIFF_PARTS: usize = 12;
/// Characters of a value a reload's log line shows at most.
const DIFF_VALUE_CHARS: usize = 80;

/// `new` with every key under one of `under` ([`RoleConfig::RESTART_KEYS`]: a dotted key or a section) put
/// back at its value in `running`, or removed where `running` has none (its default then, as at start).
pub fn keep_under<T: Serialize + serde::de::DeserializeOwned>(
    running: &T,
    new: &T,
    under: &[&str],
) -> Result<T, String> {
    let to_table = |raw: &T| match toml::Value::try_from(raw) {
        Ok(toml::Value::Table(t)) => Ok(t),
        Ok(other) => Err(format!("a config renders as a {}, not a table", other.type_str())),
        Err(e) => Err(format!("cannot render a config: {e}")),
    };
    let (running, mut kept) = (to_table(running)?, to_table(new)?);
    for key in under {
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        match super::lookup(&running, &path) {
            // The parents are tables in both (the same struct); one `new` lacks is made, to hold the value.
            Some(v) => {
                let mut into = Some(&mut kept);
                for seg in parents {
                    into = into.and_then(|t| {
                        let entry =
                            (t.entry(seg.as_str())).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        entry.as_table_mut()
                    });
                }
                let into = into.ok_or_else(|| format!("{key} is not under a table"))?;
                into.insert(last.clone(), v.clone());
            }
            None => {
                super::remove_path(&mut kept, &path);
            }
        }
    }
    toml::Value::Table(kept)
        .try_into()
        .map_err(|e| format!("cannot read a config back: {e}"))
}
