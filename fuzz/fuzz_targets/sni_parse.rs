//! Any bytes a client sends first on a TLS passthrough listener: the
//! ClientHello parser finds a name, asks for more, or refuses; it never
//! panics or reads out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(name)) = cellgate_proxy::sni_server_name(data) {
        assert!(!name.is_empty());
    }
});
