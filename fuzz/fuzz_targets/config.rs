//! Config files of every role, as a reload reads them: bytes → TOML → raw struct → validate. The first byte
//! picks the role, so each role's validator sees the whole corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_runtime::config::{RoleConfig, load_bytes};

fn check<C: RoleConfig>(bytes: &[u8]) {
    if let Ok(loaded) = load_bytes::<C>(bytes) {
        // Rendering what `--print-config` shows must not panic either.
        let _ = loaded.effective_toml();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&role, bytes)) = data.split_first() else { return };
    match role % 4 {
        0 => check::<xcluster_lb::Config>(bytes),
        1 => check::<xcluster_agent::Config>(bytes),
        2 => check::<xcluster_monitor::Config>(bytes),
        _ => check::<xcluster_app::Config>(bytes),
    }
});
