//! Any bytes a client may send: parsing never panics, and whatever is
//! accepted gets a prefill copy that keeps the contract (one token, no
//! streaming, every other member's text as sent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pd_proxy::openai::{check_prefill_copy, Api, ClientRequest};

fuzz_target!(|raw: &[u8]| {
    for api in [Api::Chat, Api::Completions] {
        if let Ok(request) = ClientRequest::parse(api, raw) {
            let copy = request.prefill_body();
            if let Err(broken) = check_prefill_copy(raw, &copy) {
                panic!(
                    "{api:?}: {broken}\nbody: {}\ncopy: {}",
                    String::from_utf8_lossy(raw),
                    String::from_utf8_lossy(&copy)
                );
            }
        }
    }
});
