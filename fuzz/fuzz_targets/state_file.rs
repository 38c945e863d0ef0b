//! Any bytes in the operator state file: loading reports a problem or
//! yields state that writes back to an equal state; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = cellgate_admin::decode_state(data) {
        let again = cellgate_admin::decode_state(&cellgate_admin::encode_state(&state)).expect("round trip");
        assert_eq!(again.drains, state.drains);
        assert_eq!(again.weights, state.weights);
        assert_eq!(again.pins, state.pins);
    }
});
