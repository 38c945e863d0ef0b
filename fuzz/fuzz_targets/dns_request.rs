//! Any bytes a client can send: reading and answering never panic, the
//! response is never larger than a UDP client without EDNS accepts, and a
//! UDP worker's answer cache never changes a reply: what it sends for any
//! message (answered from an entry an earlier message left, or computed)
//! is what the server computes without it.
#![no_main]

use std::{
    cell::RefCell,
    path::Path,
    sync::{Arc, OnceLock},
};

use cellgate_dns::{AnswerCache, CellDns, Transport};
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

/// The demo without rate limiting (whose buckets would make two answers to
/// one message differ).
fn unlimited() -> &'static CellDns {
    static H: OnceLock<CellDns> = OnceLock::new();
    H.get_or_init(|| {
        let config = Arc::new(cellgate_config::parse(DEMO, Path::new("examples/demo.toml")).expect("demo config"));
        let table = RoutingTable::build(config, None, &Measurements::default(), &OperatorState::default(), None, 1);
        CellDns::new(Arc::new(Snapshots::standalone(table, Clock::manual_now())))
    })
}

thread_local! {
    /// Small, so entries are replaced as well as hit.
    static CACHE: RefCell<AnswerCache> = RefCell::new(AnswerCache::new(64));
}

fuzz_target!(|data: &[u8]| {
    let src = "198.51.100.7:5353".parse().expect("addr");
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let computed = unlimited().respond(data, src, Transport::Udp, &mut want);
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        for _ in 0..2 {
            let batch = unlimited().batch(Transport::Udp);
            let sent = batch.respond(Some(&mut cache), data, src, &mut got);
            assert_eq!(sent, computed);
            if sent {
                assert_eq!(got, want, "a cached reply differs from the computed one");
            }
        }
    });

    let src = "198.51.100.7:5353".parse().expect("addr");
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        if handler().respond(data, src, transport, &mut out) && transport == Transport::Udp {
            // A query without OPT gets at most 512 bytes; with, at most 1232.
            assert!(out.len() <= 1232, "{} bytes", out.len());
        }
    }
});
