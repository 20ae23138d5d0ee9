//! What a balancer (or anything posing as one) sends the SDK: the raw HTTP answer to a server-list fetch or
//! watch and to a pick, decoded head, framing and body as the SDK does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_sdk::fuzzing::{decode_list_response, decode_pick_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(list)) = decode_list_response(data, "browse") {
        assert_eq!(list.request_type, "browse");
        assert!(list.validate().is_ok());
    }
    let _ = decode_pick_response(data);
});
