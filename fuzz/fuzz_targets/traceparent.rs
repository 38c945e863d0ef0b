//! Any `traceparent` value a client sends: the parser reads it or refuses
//! it, never panics; what it reads writes back as the same ids.
#![no_main]

use cellgate_proxy::trace::TraceParent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(tp) = TraceParent::parse(data) {
        assert_ne!(tp.trace_id, [0; 16]);
        assert_ne!(tp.parent_id, [0; 8]);
        assert_eq!(TraceParent::parse(&tp.to_bytes()), Some(tp));
    }
});
