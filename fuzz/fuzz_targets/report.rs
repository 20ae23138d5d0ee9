//! Load reports as a balancer receives them: the signature header checked against the body, then the body
//! decoded and range-checked. Input: one byte of header length, the header, then the body. A report the
//! decoder accepts must survive a sign/verify round trip with the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xcluster_proto::report;

const KEY: &[u8] = b"fuzz-shared-key";

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let (header, body) = rest.split_at(usize::from(n).min(rest.len()));
    let header = String::from_utf8_lossy(header);
    let _ = report::verify(KEY, body, &header);
    if let Ok(r) = report::decode(body) {
        let sig = report::sign(KEY, body);
        assert!(report::verify(KEY, body, &sig).is_ok(), "own signature refused");
        assert!(report::verify(b"other-key", body, &sig).is_err(), "signature accepted with another key");
        let again = serde_json::to_vec(&r).expect("a decoded report encodes");
        assert!(report::decode(&again).is_ok(), "re-encoded report refused: {r:?}");
    }
});
