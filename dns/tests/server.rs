//! The DNS server end to end: real UDP and TCP sockets on loopback, raw
//! queries built with hickory-proto, tables swapped as the publisher would.

mod support;

use cellgate_config::CellId;
use cellgate_routing::{Drain, DrainMode, OperatorState, Timestamp};
use cellgate_testkit::mmdb::GeoNet;
use hickory_proto::{
    op::{Edns, Message, OpCode, ResponseCode},
    rr::{RData, RecordType},
};
use support::*;
use tokio::net::UdpSocket;

#[tokio::test]
async fn authoritative_semantics_over_udp_and_tcp() {
    let f = fixture().await;
    for proto in [Proto::Udp, Proto::Tcp] {
        // A answer: aa, case of the question preserved in question and answer.
        let m = ask(&f, proto, &Ask::new("ApP.ExAmple.TEST.", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && !m.metadata.recursion_available);
        assert_eq!(m.queries[0].name().to_ascii(), "ApP.ExAmple.TEST.");
        assert_eq!(m.answers[0].name.to_ascii(), "ApP.ExAmple.TEST.");
        assert_eq!(
            addrs(&m),
            ["127.0.1.1"],
            "loopback client stands at the edge (Frankfurt): eu"
        );
        assert_eq!(m.answers[0].ttl, 30);
        // AAAA.
        let m = ask(&f, proto, &Ask::new("app.example.test.", RecordType::AAAA)).await;
        assert_eq!(addrs(&m), ["2001:db8:1::1"]);
        // NODATA: the name exists, the type does not; SOA minimum as TTL.
        let m = ask(&f, proto, &Ask::new("app.example.test.", RecordType::MX)).await;
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        assert_eq!(m.authorities[0].ttl, 60);
        // An empty non-terminal is NODATA too.
        let m = ask(&f, proto, &Ask::new("deep.example.test.", RecordType::A)).await;
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        // NXDOMAIN with the SOA.
        let m = ask(&f, proto, &Ask::new("nope.example.test.", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        // Outside every zone: REFUSED, not authoritative.
        let m = ask(&f, proto, &Ask::new("example.com.", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);
        // Apex SOA and NS.
        let m = ask(&f, proto, &Ask::new("example.test.", RecordType::SOA)).await;
        match &m.answers[0].data {
            RData::SOA(s) => assert_eq!(s.serial, 7),
            other => panic!("{other:?}"),
        }
        let m = ask(&f, proto, &Ask::new("example.test.", RecordType::NS)).await;
        assert_eq!(m.answers.len(), 3);
        // ANY: one RRset (RFC 8482).
        let m = ask(&f, proto, &Ask::new("app.example.test.", RecordType::ANY)).await;
        assert_eq!(addrs(&m), ["127.0.1.1"]);
        // Not a query: NOTIMP.
        let mut notify = Ask::new("example.test.", RecordType::SOA);
        notify.op = OpCode::Notify;
        assert_eq!(
            ask(&f, proto, &notify).await.metadata.response_code,
            ResponseCode::NotImp
        );
        // Multi-value answers: the first N cells.
        let m = ask(&f, proto, &Ask::new("lat.deep.example.test.", RecordType::A)).await;
        assert_eq!(addrs(&m), ["127.0.1.1", "127.0.2.1"]);
    }
}

#[tokio::test]
async fn edns_payload_is_capped_and_large_answers_truncate_then_go_over_tcp() {
    let f = fixture().await;
    let mut q = Ask::new("big.example.test.", RecordType::A);
    let m = ask(&f, Proto::Udp, &q).await;
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    assert_eq!(m.answers.len(), 40, "fits in 1232 bytes");
    q.edns = Some(4096);
    assert_eq!(
        ask(&f, Proto::Udp, &q).await.edns.as_ref().map(|e| e.max_payload()),
        Some(1232),
        "capped"
    );
    q.edns = None; // 512 bytes without EDNS: 40 A records do not fit.
    let m = ask(&f, Proto::Udp, &q).await;
    assert!(m.metadata.truncation, "TC set");
    assert!(m.answers.len() < 40);
    let m = ask(&f, Proto::Tcp, &q).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40, "the TCP retry gets everything");
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_never_stop_the_server() {
    let f = fixture().await;
    let good = Ask::new("app.example.test.", RecordType::A).bytes();
    // Header fine, question truncated: FORMERR.
    let bad = raw(f.server.udp, Proto::Udp, "127.0.0.1", &good[..good.len() - 14]).await;
    let m = Message::from_vec(&bad).expect("decode");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Garbage of every length, then the server still answers.
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for len in 0..64usize {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        sock.send_to(&junk, f.server.udp).await.expect("send");
    }
    let m = ask(&f, Proto::Udp, &Ask::new("app.example.test.", RecordType::A)).await;
    assert_eq!(addrs(&m), ["127.0.1.1"]);
    // EDNS version 1: BADVERS.
    let mut msg = Message::from_vec(&good).expect("decode");
    let mut e = Edns::new();
    e.set_version(1);
    msg.set_edns(e);
    let m =
        Message::from_vec(&raw(f.server.udp, Proto::Udp, "127.0.0.1", &msg.to_vec().expect("enc")).await).expect("dec");
    // BADVERS and BADSIG share code 16 on the wire; the decoder names it BADSIG.
    assert_eq!(u16::from(m.metadata.response_code), u16::from(ResponseCode::BADVERS));
}

#[tokio::test]
async fn clients_get_their_nearest_healthy_cell_by_ecs_and_by_source_address_with_correct_scope() {
    let f = fixture().await;
    for (net, prefix, want, want_scope) in [
        ("198.51.100.0", 24, "127.0.1.1", 24),
        ("192.0.2.0", 24, "127.0.2.1", 24),
        // The table has only the lower /25 of this /24: the answer holds
        // for that /25, and the resolver is told to send more bits.
        ("203.0.113.0", 24, "127.0.3.1", 25),
        ("203.0.113.0", 25, "127.0.3.1", 25),
        // The upper /25 is unknown: the edge's location (eu), for that /25.
        ("203.0.113.128", 25, "127.0.1.1", 25),
        // No entry holds 192.0.0.0: edge location, for the largest network
        // around it that no entry reaches into (192.0.2.0/24 is in the /22).
        ("192.0.0.0", 16, "127.0.1.1", 23),
    ] {
        let m = ask_ecs(&f, "app.example.test.", RecordType::A, net, prefix).await;
        assert_eq!(addrs(&m), [want], "{net}/{prefix}");
        assert_eq!(scope(&m), Some((prefix, want_scope)), "{net}/{prefix}");
    }
    // The answer of a failover service does not depend on the client: scope 0.
    let m = ask_ecs(&f, "lat.deep.example.test.", RecordType::A, "203.0.113.0", 24).await;
    assert_eq!(scope(&m), Some((24, 0)));
    // By source address (loopback aliases placed in India and the US).
    for (from, want) in [
        ("127.0.0.2", "127.0.3.1"),
        ("127.0.0.3", "127.0.2.1"),
        ("127.0.0.1", "127.0.1.1"),
    ] {
        let mut q = Ask::new("app.example.test.", RecordType::A);
        q.from = from;
        let m = ask(&f, Proto::Udp, &q).await;
        assert_eq!(addrs(&m), [want], "from {from}");
        assert_eq!(scope(&m), None, "no ECS asked, none echoed");
    }
}

#[tokio::test]
async fn down_or_drained_cells_leave_answers_at_the_next_publish_and_all_down_policy_answers() {
    let f = fixture().await;
    let india = || Ask::new("app.example.test.", RecordType::A).ecs("203.0.113.0", 24);
    assert_eq!(addrs(&ask(&f, Proto::Udp, &india()).await), ["127.0.3.1"]);
    f.publish(&["ap"], &OperatorState::default());
    let m = ask(&f, Proto::Udp, &india()).await;
    assert_eq!(addrs(&m), ["127.0.1.1"], "next nearest after ap is down (Dublin)");
    let mut op = OperatorState::default();
    op.drains.insert(
        CellId::new("eu"),
        Drain {
            mode: DrainMode::Soft,
            started: Timestamp::from_unix_millis(0),
            deadline: None,
        },
    );
    f.publish(&["ap"], &op);
    assert_eq!(
        addrs(&ask(&f, Proto::Udp, &india()).await),
        ["127.0.2.1"],
        "drained eu never appears"
    );
    // Everything down: fail open (default), with the short TTL.
    f.publish(&["eu", "us", "ap"], &OperatorState::default());
    let m = ask(&f, Proto::Udp, &india()).await;
    assert_eq!(addrs(&m).len(), 1);
    assert_eq!(m.answers[0].ttl, 5, "degraded TTL while failing open");
    // all_down = "closed": SERVFAIL.
    let m = ask(&f, Proto::Udp, &Ask::new("closed.example.test.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

/// A GeoIP2-City-shaped database written with a writer crate, mapping the
/// documentation networks; no downloaded data.
#[tokio::test]
async fn geo_from_a_maxmind_database_with_its_network_as_scope() {
    let nets = [
        GeoNet::new("::198.51.100.0", 120, "IE", 53.35, -6.26),
        GeoNet::new("::192.0.2.0", 120, "US", 37.43, -78.66),
        GeoNet::new("::203.0.113.0", 120, "IN", 20.59, 78.96),
        GeoNet::new("2001:db8::", 32, "IN", 20.59, 78.96),
    ];
    check_geo_database(
        &nets,
        &[
            ("198.51.100.0", 24, "127.0.1.1", 24),
            ("192.0.2.0", 24, "127.0.2.1", 24),
            ("203.0.113.128", 25, "127.0.3.1", 24),
            ("2001:db8:ab::", 48, "127.0.3.1", 32),
        ],
    )
    .await;
}

/// TCP is served by cellgate's own loop: queries on one connection are
/// answered in order, pipelined or not, and a message that is not a query
/// (too short, or a response) is skipped without closing the connection.
#[tokio::test]
async fn tcp_answers_many_queries_per_connection_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture().await;
    let mut s = tokio::net::TcpStream::connect(f.server.tcp).await.expect("connect");
    let frame = |bytes: &[u8]| {
        let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(bytes);
        v
    };
    let mut out = Vec::new();
    out.extend(frame(&[1, 2, 3])); // shorter than a header: no answer
    for (i, name) in ["app.example.test.", "ns1.example.test.", "nope.example.test."]
        .iter()
        .enumerate()
    {
        let mut m = Ask::new(name, RecordType::A).message();
        m.metadata.id = i as u16;
        out.extend(frame(&m.to_vec().expect("encode")));
    }
    s.write_all(&out).await.expect("write");
    for (i, rcode) in [ResponseCode::NoError, ResponseCode::NoError, ResponseCode::NXDomain]
        .into_iter()
        .enumerate()
    {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.expect("length");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.expect("message");
        let m = strict(&buf);
        assert_eq!((m.metadata.id, m.metadata.response_code), (i as u16, rcode));
    }
}
