//! `xcluster check-config FILE...`: validates each file against its role's schema, like `nginx -t`.

use std::path::Path;

use xcluster_runtime::RoleConfig;
use xcluster_runtime::config::{ConfigError, ConfigSource, load_read, read_bounded, role_in};

pub fn run(files: &[std::path::PathBuf]) -> i32 {
    let mut failed = 0;
    for file in files {
        match check(file) {
            Ok(role) => println!("{}: ok (role {role})", file.display()),
            Err(msg) => {
                failed += 1;
                eprintln!("{}: {msg}", file.display());
            }
        }
    }
    if failed == 0 { 0 } else { ConfigError::EXIT_CODE }
}

/// Reads `file` once (it may be a pipe), then checks it as the role it names.
fn check(file: &Path) -> Result<&'static str, String> {
    let bytes = read_bounded(file).map_err(|e| e.to_string())?;
    let role = role_in(&bytes, &file.display().to_string()).map_err(|e| e.to_string())?;
    match role.as_deref() {
        Some(xcluster_lb::Config::ROLE) => check_as::<xcluster_lb::Config>(file, bytes),
        Some(xcluster_agent::Config::ROLE) => check_as::<xcluster_agent::Config>(file, bytes),
        Some(xcluster_monitor::Config::ROLE) => check_as::<xcluster_monitor::Config>(file, bytes),
        Some(xcluster_app::Config::ROLE) => check_as::<xcluster_app::Config>(file, bytes),
        Some(other) => Err(format!(
            "role: unknown role {other:?} (expected lb, agent, monitor or app)"
        )),
        None => Err("role: missing; add role = \"lb\" (or agent, monitor, app) at the top".into()),
    }
}

fn check_as<C: RoleConfig>(file: &Path, bytes: Vec<u8>) -> Result<&'static str, String> {
    // The file alone is checked: environment overrides would make the verdict depend on the shell.
    let source = ConfigSource {
        path: Some(file.to_path_buf()),
        overrides: Vec::new(),
        use_env: false,
    };
    load_read::<C>(bytes, &source)
        .map(|_| C::ROLE)
        .map_err(|e| e.to_string())
}

/// `xcluster buyer-token`: prints a token for `--user`, signed with the key in `--key-file` as XBuy reads
/// its `buyer_key_file` (the same reading: whitespace around the key is not part of it).
pub fn buyer_token(a: &crate::args::BuyerTokenArgs) -> i32 {
    if !xcluster_app::domain::request::valid_id(&a.user) {
        eprintln!(
            "--user {:?}: a user id is 1..=64 bytes of A-Z a-z 0-9 . _ : -",
            a.user
        );
        return ConfigError::EXIT_CODE;
    }
    let key = match buyer_key("--key-file", &a.key_file) {
        Ok(key) => key,
        Err(issues) => {
            eprint!("{issues}");
            return ConfigError::EXIT_CODE;
        }
    };
    let now = u64::try_from(xcluster_app::domain::now_ms() / 1000).unwrap_or(0);
    println!("{}", xcluster_proto::buyer::mint(&key, &a.user, now + a.ttl_secs));
    0
}

/// Reads XBuy's `buyer_key_file` at `path` (named `flag` in errors) as the app reads it: the key that signs,
/// or the issues found, one per line.
pub fn buyer_key(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    let mut v = xcluster_runtime::Validator::new();
    let key = v.key_file(flag, &path.to_string_lossy());
    // XBuy's own check of `buyer_key_file`.
    v.long_keys(flag, &key);
    match v.finish(()) {
        // The first key signs, as the agent's first report key does (`HmacKey::signing`).
        Ok(()) => Ok(key.signing().to_vec()),
        Err(issues) => Err(issues.iter().map(|i| format!("{i}\n")).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xcluster_runtime::config::{flatten, keep_restart_keys, keep_under, load};

    /// A reload keeps each role's restart keys by rendering its raw config to TOML and back
    /// (`config::keep_under`): every shipped config must survive that unchanged, and validate with the
    /// defaults' restart keys in place of its own (a reload of it in a process started on the defaults).
    fn round_trips<C: RoleConfig>(name: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        let source = ConfigSource {
            path: Some(path),
            overrides: Vec::new(),
            use_env: false,
        };
        let loaded = load::<C>(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let kept =
            keep_under(&loaded.raw, &loaded.raw, C::RESTART_KEYS).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(flatten(&kept), flatten(&loaded.raw), "{name}");
        let defaults = C::Raw::default();
        if let Err(e) = keep_restart_keys(loaded, &defaults, name) {
            panic!("{name} with the defaults' restart keys: {e}");
        }
    }

    #[test]
    fn every_role_config_keeps_its_restart_keys_through_a_reload() {
        round_trips::<xcluster_lb::Config>("lb.toml");
        round_trips::<xcluster_agent::Config>("agent.toml");
        round_trips::<xcluster_monitor::Config>("monitor.toml");
        round_trips::<xcluster_app::Config>("app.toml");
    }
}
