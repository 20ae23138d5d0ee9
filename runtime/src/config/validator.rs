//! `Validator`: a role's `validate()` converts each field through it and gets every problem at once.

use std::fmt;
use std::path::PathBuf;

use super::{ConfigIssue, HmacKey, MIN_KEY_BYTES};

/// Accumulates validation problems and converts fields, so `validate()` reports everything at once.
#[derive(Debug, Default)]
pub struct Validator {
    pub issues: Vec<ConfigIssue>,
    /// Keys whose value did not parse: a placeholder stands in for it (`127.0.0.1:0`), and what later checks
    /// of the key find wrong with the placeholder is not the user's to read.
    unparsed: std::collections::HashSet<String>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if !self.unparsed.contains(&key) {
            self.issues.push(ConfigIssue::new(key, message));
        }
    }

    /// Records an error when `ok` is false.
    pub fn check(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.error(key, message());
        }
    }

    /// Parses a socket address such as `127.0.0.1:7000`.
    pub fn addr(&mut self, key: &str, value: &str) -> std::net::SocketAddr {
        value.parse().unwrap_or_else(|_| {
            self.error(
                key,
                format!(
                    "invalid socket address {value:?} (expected an IP address and port, e.g. 127.0.0.1:7000 or \
                     [::1]:7000; host names are not resolved{})",
                    xcluster_proto::bracket_hint(value).unwrap_or_default()
                ),
            );
            self.unparsed.insert(key.to_string());
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// A duration in milliseconds that must lie in `min..=max`.
    pub fn millis(&mut self, key: &str, value: u64, min: u64, max: u64) -> std::time::Duration {
        if value < min || value > max {
            self.error(key, format!("{value} ms is out of range ({min}..={max} ms)"));
        }
        std::time::Duration::from_millis(value.clamp(min, max))
    }

    /// An integer that must lie in `min..=max`.
    pub fn range<T: PartialOrd + fmt::Display + Copy>(&mut self, key: &str, value: T, min: T, max: T) -> T {
        if value < min || value > max {
            self.error(key, format!("{value} is out of range ({min}..={max})"));
            return if value < min { min } else { max };
        }
        value
    }

    /// A bearer token (empty: none): visible ASCII only, since a request's `Authorization` header loses
    /// surrounding spaces and cannot carry control characters, so such a token could never match.
    pub fn token(&mut self, key: &str, value: &str) {
        self.check(value.bytes().all(|b| b.is_ascii_graphic()), key, || {
            "must be visible ASCII without spaces (a request could never present it)".into()
        });
    }

    /// An HMAC key given inline as `{prefix}key` or in the file `{prefix}key_file` (at most one of them;
    /// neither gives an empty key).
    pub fn key(&mut self, prefix: &str, key: &str, key_file: &str) -> HmacKey {
        match (key.is_empty(), key_file.is_empty()) {
            (false, false) => {
                self.error(format!("{prefix}key"), "set key or key_file, not both");
                HmacKey::default()
            }
            (false, true) => HmacKey::inline(key.as_bytes()),
            (true, false) => self.key_file(&format!("{prefix}key_file"), key_file),
            (true, true) => HmacKey::default(),
        }
    }

    /// The key held in the file `path` (surrounding whitespace is not part of it), reported under `key` if it
    /// cannot be read or is empty.
    pub fn key_file(&mut self, key: &str, path: &str) -> HmacKey {
        let path = PathBuf::from(path);
        // Noted as part of the config's content: a rotated key file alone is a change the watcher applies.
        let bytes = match super::referenced::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes).trim().to_string();
                if text.is_empty() {
                    self.error(key, format!("{} is empty", path.display()));
                }
                text.into_bytes()
            }
            Err(e) => {
                self.error(key, e.to_string());
                Vec::new()
            }
        };
        HmacKey {
            bytes,
            file: Some(path),
        }
    }

    /// Checks that each key `hmac` holds (one per line, [`HmacKey::each`]) is at least [`MIN_KEY_BYTES`]
    /// long: refused, where [`HmacKey::warn`] only warns, for a key that signs what a client presents.
    pub fn long_keys(&mut self, key: &str, hmac: &HmacKey) {
        if let Some(short) = hmac.too_short() {
            self.error(
                key,
                format!("a key of {short} bytes; each at least {MIN_KEY_BYTES}"),
            );
        }
    }

    /// One of the named `choices`, by its name `value`; an unknown name is an error naming them all, and gives
    /// the first choice.
    pub fn one_of<T: Copy>(&mut self, key: &str, value: &str, choices: &[(&str, T)]) -> T {
        if let Some(&(_, t)) = choices.iter().find(|(name, _)| *name == value) {
            return t;
        }
        let names: Vec<String> = choices.iter().map(|(name, _)| format!("{name:?}")).collect();
        self.error(key, format!("{value:?} is not one of {}", names.join(", ")));
        choices[0].1
    }

    /// Finishes validation: the typed value if there were no problems.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<ConfigIssue>> {
        if self.issues.is_empty() {
            Ok(value)
        } else {
            Err(self.issues)
        }
    }
}
