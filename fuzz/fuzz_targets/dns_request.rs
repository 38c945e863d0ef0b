//! Any bytes a client can send: reading and answering never panic, and the
//! response is never larger than a UDP client without EDNS accepts.
#![no_main]

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use cellgate_dns::{CellDns, Transport};
use cellgate_routing::{Measurements, OperatorState, RoutingTable};
use cellgate_snapshot::{Clock, Snapshots};
use libfuzzer_sys::fuzz_target;

const DEMO: &str = include_str!("../../examples/demo.toml");

fn handler() -> &'static CellDns {
    static H: OnceLock<CellDns> = OnceLock::new();
    H.get_or_init(|| {
        // The demo's config, with rate limiting on so its path is fuzzed too.
        let text = format!("{DEMO}\n[dns.rrl]\nresponses_per_second = 1000\n");
        let config = Arc::new(cellgate_config::parse(&text, Path::new("examples/demo.toml")).expect("demo config"));
        let table = RoutingTable::build(config, None, &Measurements::default(), &OperatorState::default(), None, 1);
        CellDns::new(Arc::new(Snapshots::standalone(table, Clock::manual_now())))
    })
}

fuzz_target!(|data: &[u8]| {
    let src = "198.51.100.7:5353".parse().expect("addr");
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        if handler().respond(data, src, transport, &mut out) && transport == Transport::Udp {
            // A query without OPT gets at most 512 bytes; with, at most 1232.
            assert!(out.len() <= 1232, "{} bytes", out.len());
        }
    }
});
