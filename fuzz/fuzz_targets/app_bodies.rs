//! XBuy's request bodies (orders, flash sales, refunds, callbacks, credits, merchant updates, degrade): each
//! decoder and its checks, as the handlers run them before the store sees anything.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = xcluster_app::api::bodies::decode_and_check(data);
});
