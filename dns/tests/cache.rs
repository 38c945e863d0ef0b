//! The answer cache is invisible except in speed: every reply a UDP worker
//! sends from its cache is, byte for byte, the reply a server without the
//! cache computes for the same query (ID, letter case, RD/CD, EDNS sizes,
//! DO, Client Subnet, truncation), and a new table is never answered from
//! an older one. Real sockets on loopback; two servers side by side.

mod support;

use std::{collections::HashMap, net::SocketAddr, path::Path, time::Duration};

use cellgate_config::CellId;
use cellgate_routing::{Drain, DrainMode, OperatorState, Timestamp};
use hickory_proto::{
    op::{Message, OpCode},
    rr::RecordType,
};
use support::*;
use tokio::net::UdpSocket;

/// A client that sends every query from one socket, so the kernel hands
/// them all to the same worker (and its cache).
struct Client {
    sockets: HashMap<String, UdpSocket>,
    server: SocketAddr,
}

impl Client {
    fn new(server: SocketAddr) -> Self {
        Self {
            sockets: HashMap::new(),
            server,
        }
    }

    async fn raw(&mut self, from: &str, bytes: &[u8]) -> Vec<u8> {
        if !self.sockets.contains_key(from) {
            let s = UdpSocket::bind((from.parse::<std::net::IpAddr>().expect("ip"), 0))
                .await
                .expect("bind");
            self.sockets.insert(from.to_owned(), s);
        }
        let s = &self.sockets[from];
        s.send_to(bytes, self.server).await.expect("send");
        let mut buf = vec![0u8; 65535];
        // A bound on the wait, not a measure of speed.
        let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
            .await
            .expect("an answer")
            .expect("recv");
        buf.truncate(n);
        buf
    }

    async fn ask(&mut self, q: &Ask<'_>) -> Message {
        strict(&self.raw(q.from, &q.bytes()).await)
    }
}

/// The cache's counter `result` (hit, miss, uncacheable) in `f`'s metrics.
fn cache_count(f: &Fixture, result: &str) -> u64 {
    let text = f.metrics.render().unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(&format!("cellgate_dns_cache_total{{result=\"{result}\"}}")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn cached_and_uncached() -> (Fixture, Fixture) {
    let cached = Fixture::new(&config_text(CIDR_GEO), Path::new("cached.toml")).await;
    let off = format!("{CIDR_GEO}\n[dns]\nanswer_cache = 0\n");
    let uncached = Fixture::new(&config_text(&off), Path::new("uncached.toml")).await;
    assert_eq!(uncached.config.dns.answer_cache, 0);
    (cached, uncached)
}

/// `name` with every other letter upper-cased, as a resolver using 0x20
/// would send it.
fn mixed_case(name: &str, odd: bool) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| if (i % 2 == 0) == odd { c.to_ascii_uppercase() } else { c })
        .collect()
}

/// The query's bytes with this ID and RD and CD set as asked.
fn variant(q: &Ask<'_>, id: u16, rd: bool, cd: bool) -> Vec<u8> {
    let mut m: Message = q.message();
    m.metadata.id = id;
    m.metadata.recursion_desired = rd;
    m.metadata.checking_disabled = cd;
    m.to_vec().expect("encode")
}

#[tokio::test]
async fn cached_replies_are_byte_for_byte_the_computed_ones() {
    let (cached, uncached) = cached_and_uncached().await;
    let names = [
        "app.example.test.",
        "lat.deep.example.test.",
        "big.example.test.",
        "spread.example.test.",
        "closed.example.test.",
        "nope.example.test.",
        "deep.example.test.",
        "example.test.",
        "ns1.example.test.",
        "example.com.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::ANY,
        RecordType::NS,
        RecordType::SOA,
        RecordType::MX,
    ];
    let mut shapes: Vec<Box<dyn Fn(Ask<'static>) -> Ask<'static>>> = vec![
        Box::new(|q| q),
        Box::new(|q| q.no_edns()),
        Box::new(|mut q| {
            q.edns = Some(600);
            q
        }),
        Box::new(|mut q| {
            q.dnssec_ok = true;
            q
        }),
        Box::new(|q| q.ecs("203.0.113.0", 24)),
        Box::new(|q| q.ecs("198.51.100.0", 24)),
        Box::new(|q| q.ecs("203.0.113.0", 25)),
        Box::new(|q| q.ecs("0.0.0.0", 0)),
        Box::new(|q| q.ecs("2001:db8::", 48)),
        Box::new(|q| q.ecs("::ffff:203.0.113.0", 120)),
    ];
    // Sources in India and the US by the CIDR table, and one at the edge.
    shapes.push(Box::new(|mut q| {
        q.from = "127.0.0.2";
        q
    }));
    shapes.push(Box::new(|mut q| {
        q.from = "127.0.0.3";
        q
    }));
    let mut client = Client::new(cached.server.udp);
    let mut compared = 0;
    for name in names {
        for qtype in types {
            for shape in &shapes {
                let base = shape(Ask::new(name, qtype));
                for (i, odd) in [(0u16, false), (1, true)] {
                    let spelled = if odd { mixed_case(name, true) } else { name.to_owned() };
                    let q = Ask {
                        name: &spelled,
                        ..base.clone()
                    };
                    let bytes = variant(&q, 1000 + i, i == 0, i == 1);
                    let want = raw(uncached.server.udp, Proto::Udp, q.from, &bytes).await;
                    strict(&want);
                    // The first may compute and keep it, the second is read
                    // from the cache: both must be what was computed.
                    for round in 0..2 {
                        let got = client.raw(q.from, &bytes).await;
                        assert_eq!(
                            got, want,
                            "{name} {qtype} from {} ({round}): cached reply differs",
                            q.from
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 1000);
    let (hits, misses) = (cache_count(&cached, "hit"), cache_count(&cached, "miss"));
    assert!(
        hits >= compared / 2,
        "hits {hits}, misses {misses}, compared {compared}"
    );
    assert_eq!(hits + misses, compared, "every query here may be kept");
    assert_eq!(
        cache_count(&uncached, "hit") + cache_count(&uncached, "miss"),
        0,
        "answer_cache = 0 keeps nothing"
    );
}

#[tokio::test]
async fn what_is_never_kept_is_still_answered_alike() {
    let (cached, uncached) = cached_and_uncached().await;
    let mut notify = Ask::new("example.test.", RecordType::SOA);
    notify.op = OpCode::Notify;
    let mut v1 = Ask::new("app.example.test.", RecordType::A);
    v1.edns_version = 1;
    let mut bad_ecs = Ask::new("app.example.test.", RecordType::A);
    bad_ecs.raw_ecs = Some(vec![0, 1, 24, 16, 203, 0, 113]); // scope set in a query
    let truncated = {
        let mut b = Ask::new("app.example.test.", RecordType::A).bytes();
        b.truncate(b.len() - 3);
        b
    };
    let mut client = Client::new(cached.server.udp);
    for bytes in [notify.bytes(), v1.bytes(), bad_ecs.bytes(), truncated] {
        let want = raw(uncached.server.udp, Proto::Udp, "127.0.0.1", &bytes).await;
        for _ in 0..2 {
            assert_eq!(client.raw("127.0.0.1", &bytes).await, want);
        }
    }
    assert_eq!(cache_count(&cached, "hit"), 0);
    assert_eq!(cache_count(&cached, "uncacheable"), 8);
}

#[tokio::test]
async fn a_new_table_is_never_answered_from_an_older_one() {
    let f = fixture().await;
    let mut c = Client::new(f.server.udp);
    let app = Ask::new("app.example.test.", RecordType::A);
    let soa = Ask::new("example.test.", RecordType::SOA);
    for _ in 0..3 {
        assert_eq!(addrs(&c.ask(&app).await), ["127.0.1.1"]);
        c.ask(&soa).await;
    }
    let hits = cache_count(&f, "hit");
    assert_eq!(hits, 4, "the second and third of each");

    // eu goes down: the next query no longer names it.
    f.publish(&["eu"], &OperatorState::default());
    assert_eq!(addrs(&c.ask(&app).await), ["127.0.2.1"]);
    // The SOA depends on the config only: still answered from the cache.
    c.ask(&soa).await;
    assert_eq!(cache_count(&f, "hit"), hits + 1);

    // eu is back, then drained by an operator: answered, then not.
    f.publish(&[], &OperatorState::default());
    assert_eq!(addrs(&c.ask(&app).await), ["127.0.1.1"]);
    assert_eq!(addrs(&c.ask(&app).await), ["127.0.1.1"]);
    let mut op = OperatorState::default();
    op.drains.insert(
        CellId::new("eu"),
        Drain {
            mode: DrainMode::Hard,
            started: Timestamp::from_unix_millis(0),
            deadline: None,
        },
    );
    f.publish(&[], &op);
    for _ in 0..2 {
        let m = c.ask(&app).await;
        assert_eq!(addrs(&m), ["127.0.2.1"], "a drained cell is never named");
    }
}

#[tokio::test]
async fn the_question_keeps_the_clients_letter_case_on_a_hit() {
    let f = fixture().await;
    let mut c = Client::new(f.server.udp);
    c.ask(&Ask::new("app.example.test.", RecordType::A)).await;
    let hits = cache_count(&f, "hit");
    let m = c.ask(&Ask::new("aPp.ExAmPlE.tEsT.", RecordType::A)).await;
    assert_eq!(cache_count(&f, "hit"), hits + 1, "answered from the cache");
    assert_eq!(m.queries[0].name().to_ascii(), "aPp.ExAmPlE.tEsT.");
    assert_eq!(m.answers[0].name.to_ascii(), "aPp.ExAmPlE.tEsT.");
    assert_eq!(addrs(&m), ["127.0.1.1"]);
}

#[tokio::test]
async fn every_worker_answers_and_the_server_stops_promptly() {
    let f = fixture().await;
    // Many source ports spread over both workers' sockets.
    let q = Ask::new("app.example.test.", RecordType::A);
    for _ in 0..64 {
        assert_eq!(addrs(&ask(&f, Proto::Udp, &q).await), ["127.0.1.1"]);
    }
    let Fixture { server, .. } = f;
    // A bound on the wait, not a measure of speed.
    tokio::time::timeout(std::time::Duration::from_secs(20), server.running.shutdown())
        .await
        .expect("the workers stop when asked");
}
