//! What resolvers in the wild rely on, checked with real clients on real
//! sockets: every reply parsed strictly (hickory-proto's decoder must use
//! every byte), and kdig where a user would use it.

mod support;

use cellgate_routing::OperatorState;
use cellgate_testkit::mmdb::GeoNet;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{rdata::opt::EdnsCode, RData, RecordType},
};
use support::*;

/// Every buffer size from 512 to 4096, A and AAAA, with and without EDNS,
/// against an answer of 40 records: a reply is either the whole answer or
/// a header with TC, the question and (when asked with EDNS) the OPT
/// record, with no partial record and no trailing byte.
#[tokio::test]
async fn truncated_udp_answers_are_well_formed_at_every_buffer_size() {
    let f = fixture().await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = vec![0u8; 65535];
    let full_size = |qtype| if qtype == RecordType::A { 40 * 16 } else { 40 * 28 };
    for qtype in [RecordType::A, RecordType::AAAA] {
        let sizes = std::iter::once(None).chain((512..=4096u16).map(Some));
        let (mut whole, mut truncated) = (0, 0);
        for size in sizes {
            let mut q = Ask::new("big.example.test.", qtype);
            q.edns = size;
            socket.send_to(&q.bytes(), f.server.udp).await.expect("send");
            let n = tokio::time::timeout(std::time::Duration::from_secs(3), socket.recv(&mut buf))
                .await
                .expect("no answer")
                .expect("recv");
            let m = strict(&buf[..n]);
            // The server caps at its own 1232; no EDNS means 512.
            let limit = size.map_or(512, |s| usize::from(s.min(1232)));
            assert!(n <= limit, "{qtype} @{size:?}: {n} bytes");
            assert_eq!(m.queries.len(), 1, "{qtype} @{size:?}: the question");
            assert_eq!(
                m.edns.is_some(),
                size.is_some(),
                "{qtype} @{size:?}: OPT iff asked with EDNS"
            );
            if m.metadata.truncation {
                truncated += 1;
                assert!(
                    m.answers.is_empty() && m.authorities.is_empty() && m.additionals.is_empty(),
                    "{qtype} @{size:?}: a truncated reply carries no records"
                );
                assert!(
                    limit < 12 + 40 + full_size(qtype),
                    "{qtype} @{size:?}: TC although it fits"
                );
            } else {
                whole += 1;
                assert_eq!(m.answers.len(), 40, "{qtype} @{size:?}: all or nothing");
            }
        }
        assert!(
            truncated > 0 && whole > 0,
            "{qtype}: {truncated} truncated, {whole} whole"
        );
    }
    // What kdig makes of it: no "malformed" anywhere.
    let out = kdig(f.server.udp, &["+ignore", "+noedns", "big.example.test", "A"]).await;
    assert!(out.contains("TC") && !out.contains("malformed"), "{out}");
    let out = kdig(f.server.udp, &["+ignore", "+bufsize=600", "big.example.test", "AAAA"]).await;
    assert!(out.contains("TC") && !out.contains("malformed"), "{out}");
    // kdig retries over TCP by itself and gets everything.
    let out = kdig(f.server.udp, &["+noedns", "+short", "big.example.test", "A"]).await;
    let addresses = out.lines().filter(|l| l.parse::<std::net::Ipv4Addr>().is_ok()).count();
    assert_eq!(addresses, 40, "{out}");
    assert!(out.contains("retrying over TCP"), "{out}");
}

#[tokio::test]
async fn the_zones_own_name_servers_resolve_and_come_as_glue() {
    let f = fixture().await;
    for proto in [Proto::Udp, Proto::Tcp] {
        let m = ask(&f, proto, &Ask::new("NS1.example.test.", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(addrs(&m), ["127.0.0.53"]);
        assert_eq!(m.answers[0].name.to_ascii(), "NS1.example.test.");
        assert_eq!(m.answers[0].ttl, 3600, "the zone's TTL");
        let m = ask(&f, proto, &Ask::new("ns1.example.test.", RecordType::AAAA)).await;
        assert_eq!(addrs(&m), ["::1"]);
        // ns2 has no IPv6 address: NODATA with the SOA.
        let m = ask(&f, proto, &Ask::new("ns2.example.test.", RecordType::AAAA)).await;
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        let m = ask(&f, proto, &Ask::new("ns1.example.test.", RecordType::MX)).await;
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
        let m = ask(&f, proto, &Ask::new("below.ns1.example.test.", RecordType::A)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // The NS RRset with the in-zone servers' addresses as additional data.
        let m = ask(&f, proto, &Ask::new("example.test.", RecordType::NS)).await;
        let targets: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(ns) => ns.0.to_ascii(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            targets,
            ["ns1.example.test.", "ns2.example.test.", "ns.elsewhere.test."]
        );
        let glue: Vec<(String, String)> = m
            .additionals
            .iter()
            .map(|r| {
                let a = match &r.data {
                    RData::A(a) => a.0.to_string(),
                    RData::AAAA(a) => a.0.to_string(),
                    other => format!("{other:?}"),
                };
                (r.name.to_ascii(), a)
            })
            .collect();
        assert_eq!(
            glue,
            [
                ("ns1.example.test.".to_string(), "127.0.0.53".to_string()),
                ("ns1.example.test.".into(), "::1".into()),
                ("ns2.example.test.".into(), "127.0.0.54".into()),
            ]
        );
    }
    // As a user checks a delegation.
    assert_eq!(
        kdig(f.server.udp, &["+short", "ns1.example.test", "A"]).await.trim(),
        "127.0.0.53"
    );
    let out = kdig(f.server.udp, &["+norec", "example.test", "NS"]).await;
    assert!(
        out.contains("ADDITIONAL SECTION") && out.contains("127.0.0.54"),
        "{out}"
    );
}

#[tokio::test]
async fn client_subnet_options_are_checked_and_never_echoed_when_invalid() {
    let f = fixture().await;
    for (what, data) in [
        (
            "more address octets than the source prefix needs",
            vec![0u8, 1, 24, 0, 203, 0, 113, 0],
        ),
        ("fewer address octets", vec![0, 1, 24, 0, 203, 0]),
        ("bits set beyond the source prefix", vec![0, 1, 23, 0, 203, 0, 113]),
        ("a non-zero scope in a query", vec![0, 1, 24, 24, 203, 0, 113]),
        ("an unknown family", vec![0, 3, 24, 0, 203, 0, 113]),
        (
            "a source prefix longer than the address",
            vec![0, 1, 33, 0, 203, 0, 113, 1, 0],
        ),
    ] {
        for proto in [Proto::Udp, Proto::Tcp] {
            let mut q = Ask::new("app.example.test.", RecordType::A);
            q.raw_ecs = Some(data.clone());
            let m = ask(&f, proto, &q).await;
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{what}");
            assert!(m.answers.is_empty(), "{what}");
            let edns = m
                .edns
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: FORMERR keeps the OPT record"));
            assert!(edns.option(EdnsCode::Subnet).is_none(), "{what}: echoed");
        }
    }
    // Twice in one query.
    let mut q = Ask::new("app.example.test.", RecordType::A).ecs("203.0.113.0", 24);
    q.raw_ecs = Some(vec![0, 1, 24, 0, 198, 51, 100]);
    assert_eq!(
        ask(&f, Proto::Udp, &q).await.metadata.response_code,
        ResponseCode::FormErr
    );
}

#[tokio::test]
async fn every_reply_to_a_query_with_client_subnet_carries_it() {
    let f = fixture().await;
    for (name, qtype, rcode) in [
        ("example.test.", RecordType::SOA, ResponseCode::NoError),
        ("example.test.", RecordType::NS, ResponseCode::NoError),
        ("app.example.test.", RecordType::MX, ResponseCode::NoError),
        ("nope.example.test.", RecordType::A, ResponseCode::NXDomain),
        ("ns1.example.test.", RecordType::A, ResponseCode::NoError),
        ("example.com.", RecordType::A, ResponseCode::Refused),
    ] {
        let m = ask_ecs(&f, name, qtype, "203.0.113.0", 24).await;
        assert_eq!(m.metadata.response_code, rcode, "{name} {qtype}");
        assert_eq!(scope(&m), Some((24, 0)), "{name} {qtype}: ECS with scope 0");
    }
    // Source prefix 0 ("do not use my address"): scope 0 even for geo.
    let m = ask_ecs(&f, "app.example.test.", RecordType::A, "0.0.0.0", 0).await;
    assert_eq!(scope(&m), Some((0, 0)));
    // IPv4-mapped IPv6: located as IPv4 (India), scoped in IPv6 terms.
    let m = ask_ecs(&f, "app.example.test.", RecordType::A, "::ffff:203.0.113.0", 120).await;
    assert_eq!(addrs(&m), ["127.0.3.1"]);
    assert_eq!(
        scope(&m),
        Some((120, 96 + 25)),
        "never an IPv4 scope for an IPv6 option"
    );
    // Weighted: at least the /24 that seeds the choice, whatever was asked.
    let m = ask_ecs(&f, "spread.example.test.", RecordType::A, "198.51.0.0", 16).await;
    assert_eq!(scope(&m), Some((16, 24)));
    let m = ask_ecs(&f, "spread.example.test.", RecordType::A, "2001:db8::", 32).await;
    assert_eq!(scope(&m), Some((32, 56)));
}

#[tokio::test]
async fn the_do_bit_is_copied_and_opt_advertises_the_servers_own_payload() {
    let f = fixture().await;
    for proto in [Proto::Udp, Proto::Tcp] {
        for (dnssec_ok, size) in [(true, 4096), (false, 4096), (true, 600), (false, 512)] {
            let mut q = Ask::new("example.test.", RecordType::SOA);
            q.dnssec_ok = dnssec_ok;
            q.edns = Some(size);
            let m = ask(&f, proto, &q).await;
            let edns = m.edns.as_ref().expect("OPT");
            assert_eq!(edns.flags().dnssec_ok, dnssec_ok, "{proto:?} DO={dnssec_ok}");
            assert_eq!(edns.max_payload(), 1232, "{proto:?} asked {size}: our own size");
            assert_eq!(edns.version(), 0);
            assert_eq!(edns.flags().z, 0, "no other flag is set");
        }
    }
}

#[tokio::test]
async fn zone_transfers_are_refused() {
    let f = fixture().await;
    for proto in [Proto::Udp, Proto::Tcp] {
        for qtype in [RecordType::AXFR, RecordType::IXFR] {
            let m = ask(&f, proto, &Ask::new("example.test.", qtype)).await;
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{proto:?} {qtype}");
            assert!(m.answers.is_empty() && !m.metadata.authoritative);
        }
    }
    let out = kdig(f.server.tcp, &["example.test", "AXFR"]).await;
    assert!(out.contains("REFUSED"), "{out}");
}

/// A query signed with a TSIG key this server does not have: NOTAUTH, and a
/// TSIG record with error BADKEY, no MAC, the key and algorithm echoed
/// (RFC 8945 5.2.2, 5.3.2).
#[tokio::test]
async fn tsig_with_an_unknown_key_gets_notauth_badkey() {
    let f = fixture().await;
    let mut msg = Ask::new("example.test.", RecordType::SOA).bytes();
    // arcount + 1, then the TSIG record.
    msg[11] += 1;
    let key = b"\x0bunknown-key\x00";
    msg.extend_from_slice(key);
    msg.extend_from_slice(&[0, 250, 0, 255, 0, 0, 0, 0]);
    let mut rdata = b"\x0bhmac-sha256\x00".to_vec();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    rdata.extend_from_slice(&now.to_be_bytes()[2..]);
    rdata.extend_from_slice(&300u16.to_be_bytes());
    rdata.extend_from_slice(&32u16.to_be_bytes());
    rdata.extend_from_slice(&[0x5a; 32]);
    rdata.extend_from_slice(&4242u16.to_be_bytes());
    rdata.extend_from_slice(&[0, 0, 0, 0]);
    msg.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    msg.extend_from_slice(&rdata);
    for proto in [Proto::Udp, Proto::Tcp] {
        let m = strict(&raw(server_addr(&f, proto), proto, "127.0.0.1", &msg).await);
        assert_eq!(m.metadata.response_code, ResponseCode::NotAuth, "{proto:?}");
        assert!(m.answers.is_empty());
        // hickory without its DNSSEC feature keeps TSIG among the additionals.
        let last = m.additionals.last().expect("a TSIG record, last");
        assert_eq!(last.name.to_ascii(), "unknown-key.");
        let RData::TSIG(tsig) = &last.data else {
            panic!("not TSIG: {last:?}")
        };
        assert_eq!(tsig.algorithm.to_name().to_ascii().trim_end_matches('.'), "hmac-sha256");
        assert!(tsig.mac.is_empty(), "unsigned");
        assert_eq!(tsig.oid, 4242);
        assert_eq!(format!("{:?}", tsig.error), "Some(BadKey)");
        assert!(m.edns.is_some(), "the OPT record too");
    }
    let out = kdig(
        f.server.udp,
        &[
            "-y",
            "hmac-sha256:unknown-key:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
            "example.test",
            "SOA",
        ],
    )
    .await;
    assert!(
        out.contains("status: BADKEY"),
        "kdig shows the TSIG error as the status: {out}"
    );
}

#[tokio::test]
async fn formerr_to_a_query_with_edns_keeps_an_opt_record() {
    let f = fixture().await;
    let good = Ask::new("app.example.test.", RecordType::A).bytes();
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    let mut two_opts = good.clone();
    two_opts[11] += 1;
    two_opts.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    let mut no_question = Message::new(4242, MessageType::Query, OpCode::Query);
    let mut e = Edns::new();
    e.set_max_payload(1232);
    no_question.set_edns(e);
    let no_question = no_question.to_vec().expect("encode");
    let mut bad_option = Ask::new("app.example.test.", RecordType::A).no_edns().bytes();
    bad_option[11] = 1;
    bad_option.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 5, 0, 8, 0, 9, 0]);
    for (what, msg) in [
        ("trailing bytes", trailing),
        ("two OPT records", two_opts),
        ("no question", no_question),
        ("an option running past its record", bad_option),
    ] {
        for proto in [Proto::Udp, Proto::Tcp] {
            let m = strict(&raw(server_addr(&f, proto), proto, "127.0.0.1", &msg).await);
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{what} {proto:?}");
            assert!(m.edns.is_some(), "{what} {proto:?}: FORMERR keeps the OPT record");
        }
    }
    // A FORMERR to a query without EDNS has none.
    let mut short = Ask::new("app.example.test.", RecordType::A).no_edns().bytes();
    short.push(0);
    let m = strict(&raw(f.server.udp, Proto::Udp, "127.0.0.1", &short).await);
    assert_eq!(
        (m.metadata.response_code, m.edns.is_some()),
        (ResponseCode::FormErr, false)
    );
}

#[tokio::test]
async fn notimp_does_not_echo_rd_or_cd_and_other_flags_are_never_echoed() {
    let f = fixture().await;
    // genreport's "opcodeflg": opcode 15 with every flag set, no question.
    let header = [0x10, 0x92, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0];
    for proto in [Proto::Udp, Proto::Tcp] {
        let reply = raw(server_addr(&f, proto), proto, "127.0.0.1", &header).await;
        let m = strict(&reply);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(m.metadata.op_code, OpCode::Unknown(15));
        assert_eq!(reply[2] & 0x07, 0, "{proto:?}: AA, TC, RD clear: {reply:02x?}");
        assert_eq!(reply[3] & 0xf0, 0, "{proto:?}: RA, Z, AD, CD clear: {reply:02x?}");
        assert!(m.queries.is_empty() && m.answers.is_empty());
    }
    // A query with Z, AD and CD: CD and RD come back, Z and AD never.
    let mut q = Ask::new("example.test.", RecordType::SOA).bytes();
    q[2] |= 0x01; // RD
    q[3] |= 0x70; // Z, AD, CD
    let reply = raw(f.server.udp, Proto::Udp, "127.0.0.1", &q).await;
    assert_eq!(reply[2] & 0x01, 0x01, "RD");
    assert_eq!(reply[3] & 0xf0, 0x10, "CD only: {:02x}", reply[3]);
}

#[tokio::test]
async fn all_cells_down_fails_open_on_the_nearest_cell() {
    let f = fixture().await;
    f.publish(&["eu", "us", "ap"], &OperatorState::default());
    for (net, prefix, want) in [
        ("203.0.113.0", 25, "127.0.3.1"),
        ("192.0.2.0", 24, "127.0.2.1"),
        ("198.51.100.0", 24, "127.0.1.1"),
    ] {
        let m = ask_ecs(&f, "app.example.test.", RecordType::A, net, prefix).await;
        assert_eq!(addrs(&m), [want], "{net}/{prefix}");
        assert_eq!(m.answers[0].ttl, 5, "degraded TTL while failing open");
    }
}

/// A GeoIP2-City database whose networks are finer than the queries.
#[tokio::test]
async fn the_scope_is_the_geo_databases_network_found_or_not() {
    let nets = [
        // 198.18.0.0/24: only its lower /25 is known (India).
        GeoNet::new("::198.18.0.0", 121, "IN", 20.59, 78.96),
        // 198.19.0.0/24: two /26s in the US and India, the rest unknown.
        GeoNet::new("::198.19.0.0", 122, "US", 37.43, -78.66),
        GeoNet::new("::198.19.0.64", 122, "IN", 20.59, 78.96),
        GeoNet::new("2001:db8:ab::", 48, "IN", 20.59, 78.96),
    ];
    check_geo_database(
        &nets,
        &[
            ("198.18.0.0", 24, "127.0.3.1", 25),   // found in a /25: longer than asked
            ("198.18.0.128", 25, "127.0.1.1", 25), // not found, in a /25: the edge's cell
            ("198.19.0.0", 24, "127.0.2.1", 26),
            ("198.19.0.64", 26, "127.0.3.1", 26),
            ("198.19.0.128", 25, "127.0.1.1", 25),
            ("2001:db8:ab::", 56, "127.0.3.1", 48), // shorter than asked: the data's /48
            ("::ffff:198.18.0.0", 120, "127.0.3.1", 96 + 25),
        ],
    )
    .await;
}

/// Names outside the zone's character set and the root: never a panic,
/// always a well-formed answer.
#[tokio::test]
async fn odd_names_get_well_formed_answers() {
    let f = fixture().await;
    for (name, rcode) in [
        (&b"\x03a.b\x07example\x04test\x00"[..], ResponseCode::NXDomain),
        (b"\x01\x00\x07example\x04test\x00", ResponseCode::NXDomain),
        (b"\x02\xff\xfe\x07EXAMPLE\x04test\x00", ResponseCode::NXDomain),
        (b"\x01*\x07example\x04test\x00", ResponseCode::NXDomain),
        (b"\x00", ResponseCode::Refused),
        (b"\x04test\x00", ResponseCode::Refused),
    ] {
        let mut m = vec![0x10, 0x92, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(name);
        m.extend_from_slice(&[0, 1, 0, 1]);
        let r = strict(&raw(f.server.udp, Proto::Udp, "127.0.0.1", &m).await);
        assert_eq!(r.metadata.response_code, rcode, "{name:?}");
        assert_eq!(r.queries.len(), 1, "{name:?}");
    }
}
