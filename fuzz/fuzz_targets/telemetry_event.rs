//! Any bytes a telemetry sender may post: parsing never panics, an
//! accepted event keeps its bounds, and every id the endpoint would act
//! on points at a token of the proxy's shape cut out of that very id.
//! The raw bytes are also tried as one engine id, so the id parser is
//! reached without first finding valid JSON.
//!
//!   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none telemetry_event -- -dict=telemetry_event.dict
#![no_main]

use libfuzzer_sys::fuzz_target;
use pd_proxy::owner::ROUTED_LEN;
use pd_proxy::pending::{ID_LEN, MAX_WORLD_SIZE};
use pd_proxy::telemetry::{parse_engine_id, parse_event};

fn check_engine_id(id: &str) {
    let Some(parsed) = parse_engine_id(id) else {
        return;
    };
    let token = parsed.token;
    assert!(
        token.len() == ID_LEN || token.len() == ROUTED_LEN,
        "token of {} bytes from {id:?}",
        token.len()
    );
    assert!(!token.contains('-'), "{id:?}");
    let at = id.find(token).expect("the token is part of the id");
    assert!(
        id[..at] == *"chatcmpl-" || id[..at] == *"cmpl-",
        "the token follows the prefix: {id:?}"
    );
    if id.starts_with("chatcmpl-") {
        assert_eq!(parsed.prompt, 0, "{id:?}");
    }
}

fuzz_target!(|raw: &[u8]| {
    if let Ok(text) = std::str::from_utf8(raw) {
        check_engine_id(text);
    }
    let Ok(event) = parse_event(raw) else {
        return;
    };
    assert!((1..=MAX_WORLD_SIZE).contains(&event.world_size));
    assert!(event.kv_rank < event.world_size);
    for id in &event.request_ids {
        check_engine_id(id);
    }
});
