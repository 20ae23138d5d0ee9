//! The PROXY protocol header, either version. Arbitrary bytes must decode or be refused without reading past
//! the input, a prefix that asks for more must say how much more, and a header built from decoded addresses
//! must decode to the same addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_proto::proxy_header::{Addresses, HeaderError, decode, decode_v2, encode_v2};

fuzz_target!(|data: &[u8]| {
    if let Err(HeaderError::Incomplete { need }) = decode(data) {
        assert!(need > data.len());
    }
    if let Ok(h) = decode(data) {
        assert!(h.len <= data.len());
        if let Addresses::Proxied { src, dst } = h.addresses {
            let again = encode_v2(src, dst);
            let back = decode_v2(&again).expect("own header refused");
            assert_eq!(back.addresses, Addresses::Proxied { src, dst });
        }
    }
});
