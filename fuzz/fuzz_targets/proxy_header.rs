//! The PROXY protocol v2 header. Arbitrary bytes must decode or be refused without reading past the input;
//! a header built from decoded addresses must decode to the same addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_proto::proxy_header::{Addresses, decode_v2, encode_v2};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_v2(data) {
        assert!(h.len <= data.len());
        if let Addresses::Proxied { src, dst } = h.addresses {
            let again = encode_v2(src, dst);
            let back = decode_v2(&again).expect("own header refused");
            assert_eq!(back.addresses, Addresses::Proxied { src, dst });
        }
    }
});
