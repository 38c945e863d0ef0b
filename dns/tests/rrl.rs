//! Response rate limiting seen from the network: a flood from one loopback
//! source is limited, slips truncated replies, and leaves other sources,
//! exempt networks and TCP alone; the metrics count what was done.

mod support;

use std::{collections::HashMap, path::Path, time::Duration};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::RecordType,
};
use support::*;
use tokio::net::UdpSocket;

const RRL: &str = r#"
[dns.rrl]
responses_per_second = 5
slip = 2
# A flooding client stays limited until it pauses for 1.2 s (window + 1/rate - 1 s).
window = "2s"
# Each loopback address is its own network here, so 127.0.0.2 is "another client".
ipv4_prefix = 32
exempt = ["127.0.0.3/32"]
"#;

#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    answered: usize,
    slipped: usize,
    dropped: usize,
}

/// Sends `n` queries from `from` as fast as it can, then collects what
/// comes back: until every reply not counted as dropped by `drops` (the
/// metric) has come, or 3 s (bounded in count and time).
async fn flood(f: &Fixture, from: &str, n: u16, name: impl Fn(u16) -> String, drops: &dyn Fn() -> u64) -> Tally {
    let dropped_before = drops();
    let socket = UdpSocket::bind((from.parse::<std::net::IpAddr>().expect("ip"), 0))
        .await
        .expect("bind");
    for id in 0..n {
        let mut m = Ask::new("x.", RecordType::A).message();
        m.metadata.id = id;
        m.queries[0].name = name(id).parse().expect("name");
        socket
            .send_to(&m.to_vec().expect("encode"), f.server.udp)
            .await
            .expect("send");
    }
    let mut seen: HashMap<u16, Message> = HashMap::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while (seen.len() as u64) + (drops() - dropped_before) < u64::from(n) {
        let step = tokio::time::Instant::now() + Duration::from_millis(50);
        match tokio::time::timeout_at(step.min(deadline), socket.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                let m = strict(&buf[..len]);
                seen.insert(m.metadata.id, m);
            }
            Ok(Err(e)) => panic!("recv: {e}"),
            Err(_) if tokio::time::Instant::now() >= deadline => break,
            Err(_) => {} // look at the metric again
        }
    }
    let mut t = Tally::default();
    for m in seen.values() {
        if m.metadata.truncation {
            assert!(
                m.answers.is_empty() && m.authorities.is_empty(),
                "a slip is an empty TC reply"
            );
            assert_eq!(m.queries.len(), 1, "with its question");
            t.slipped += 1;
        } else {
            t.answered += 1;
        }
    }
    t.dropped = usize::from(n) - seen.len();
    t
}

fn rrl_counts(metrics: &str) -> (u64, u64) {
    let count = |action: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("cellgate_dns_rrl_total{{action=\"{action}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (count("slip"), count("drop"))
}

#[tokio::test]
async fn a_flood_from_one_source_is_limited_and_slips_while_others_are_answered() {
    let f = Fixture::new(&config_text(&format!("{CIDR_GEO}{RRL}")), Path::new("rrl.toml")).await;
    let metrics = f.metrics.clone();
    let drops = || rrl_counts(&metrics.render().unwrap_or_default()).1;

    // 60 queries for one name at once: a second's burst (5) is answered;
    // of the rest, every second one slips (TC) and the others are dropped.
    let t = flood(&f, "127.0.0.1", 60, |_| "app.example.test.".into(), &drops).await;
    assert!((5..=6).contains(&t.answered), "{t:?}");
    assert!(t.slipped >= 25 && t.dropped >= 25, "{t:?}");
    assert_eq!(t.answered + t.slipped + t.dropped, 60);
    let (slip, drop) = rrl_counts(&metrics.render().unwrap_or_default());
    assert_eq!(
        (slip, drop),
        (t.slipped as u64, t.dropped as u64),
        "{}",
        metrics.render().unwrap_or_default()
    );

    // Meanwhile another client gets its answers.
    let mut q = Ask::new("app.example.test.", RecordType::A);
    q.from = "127.0.0.2";
    let m = ask(&f, Proto::Udp, &q).await;
    assert!(!m.metadata.truncation && m.answers.len() == 1, "{m:?}");
    // And the flooded one still gets everything over TCP, never limited.
    for _ in 0..10 {
        let m = ask(&f, Proto::Tcp, &Ask::new("app.example.test.", RecordType::A)).await;
        assert_eq!(addrs(&m).len(), 1);
    }

    // Random names under one zone share the zone's NXDOMAIN bucket.
    let t = flood(&f, "127.0.0.4", 40, |id| format!("r{id}.example.test."), &drops).await;
    assert!((5..=6).contains(&t.answered), "{t:?}");
    // Errors (here REFUSED, outside every zone) have a bucket of their own.
    let t = flood(&f, "127.0.0.4", 20, |id| format!("r{id}.example.com."), &drops).await;
    assert!((5..=6).contains(&t.answered), "{t:?}");

    // An exempt network is never limited.
    let t = flood(&f, "127.0.0.3", 40, |_| "app.example.test.".into(), &drops).await;
    assert_eq!(
        t,
        Tally {
            answered: 40,
            slipped: 0,
            dropped: 0
        }
    );

    // Once the flood stops, the window passes and the client is answered again.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let m = ask(&f, Proto::Udp, &Ask::new("app.example.test.", RecordType::A)).await;
    assert_eq!(
        (m.metadata.response_code, m.metadata.truncation),
        (ResponseCode::NoError, false)
    );
}

#[tokio::test]
async fn without_rrl_a_flood_is_answered_in_full() {
    let f = fixture().await;
    let t = flood(&f, "127.0.0.1", 60, |_| "app.example.test.".into(), &|| 0).await;
    assert_eq!(
        t,
        Tally {
            answered: 60,
            slipped: 0,
            dropped: 0
        }
    );
}
