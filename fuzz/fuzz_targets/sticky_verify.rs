//! Any sticky cookie a client sends: verification accepts only what the
//! key signed, and never panics.
#![no_main]

use cellgate_routing::{StickyKey, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = StickyKey::new(b"fuzz-secret-0123456789abcdef");
    let value = String::from_utf8_lossy(data);
    let now = Timestamp::from_unix_millis(1_700_000_000_000);
    if let Some(tok) = key.verify("svc", &value, now) {
        // Whatever verified must be exactly what signing produces.
        assert_eq!(key.sign("svc", &tok.cell, tok.expires), value);
        assert!(now < tok.expires);
    }
});
