//! Any text an operator can write: validation reports problems, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cellgate_config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
