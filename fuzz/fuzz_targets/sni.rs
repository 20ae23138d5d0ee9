//! The TLS ClientHello peek behind a listener's `sni` routing: whatever a client sends first must give a
//! name, no name, or a bounded ask for more (never past one record), without a panic or a read past the
//! input; a name is a valid lowercase host name, and bytes after the record change nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_lb::proxy::{SNI_MAX_RECORD, SniParsed, parse_sni};
use xcluster_runtime::net::is_host_name;

fuzz_target!(|data: &[u8]| {
    match parse_sni(data) {
        SniParsed::Incomplete { need } => assert!(need > data.len() && need <= SNI_MAX_RECORD),
        SniParsed::Name(name) => {
            assert!(is_host_name(&name), "{name:?}");
            assert_eq!(name, name.to_ascii_lowercase());
            let mut more = data.to_vec();
            more.extend_from_slice(b"\x16\x03\x01 after the record");
            assert_eq!(parse_sni(&more), SniParsed::Name(name));
        }
        SniParsed::NoName => {}
    }
});
