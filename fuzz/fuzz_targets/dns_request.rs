//! Any bytes a client can send: decoding and answering never panic.
#![no_main]

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use cellgate_dns::CellDns;
use cellgate_routing::{Measurements, OperatorState, RoutingTable};
use cellgate_snapshot::{Clock, Snapshots};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use libfuzzer_sys::fuzz_target;

const DEMO: &str = include_str!("../../examples/demo.toml");

fn handler() -> &'static CellDns {
    static H: OnceLock<CellDns> = OnceLock::new();
    H.get_or_init(|| {
        let config = Arc::new(cellgate_config::parse(DEMO, Path::new("examples/demo.toml")).expect("demo config"));
        let table = RoutingTable::build(config, None, &Measurements::default(), &OperatorState::default(), None, 1);
        CellDns::new(Arc::new(Snapshots::standalone(table, Clock::manual_now())))
    })
}

fuzz_target!(|data: &[u8]| {
    let src = "198.51.100.7:5353".parse().expect("addr");
    if let Ok(req) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) {
        let _ = handler().answer(&req);
    }
});
