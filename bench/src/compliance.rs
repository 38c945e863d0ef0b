//! `cellgate-bench compliance`: the DNS behaviours ISC's `genreport` does
//! not test, checked against any number of servers side by side with raw
//! queries over loopback: truncation at every buffer size, in-zone name
//! servers and glue, Client Subnet validation and echo, the DO bit, the
//! advertised payload size, zone transfers, TSIG with an unknown key,
//! FORMERR with OPT, NOTIMP flags. Every reply is parsed strictly
//! (hickory-proto's decoder must use every byte). Prints a Markdown table.
//!
//! The zone each server serves must hold `app.<zone>` (A), `big.<zone>`
//! (40 A and 40 AAAA records), `ns1.<zone>` (an in-zone name server with an
//! address) and no `nope.<zone>`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::opt::{EdnsCode, EdnsOption},
        Name, RData, RecordType,
    },
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

const WAIT: Duration = Duration::from_secs(2);

/// One server under test.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
}

impl std::str::FromStr for Server {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = s.split_once('=').ok_or("expected NAME=IP:PORT")?;
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: only loopback servers are tested"));
        }
        Ok(Self {
            name: name.into(),
            addr,
        })
    }
}

fn strict(bytes: &[u8]) -> anyhow::Result<Message> {
    let mut d = BinDecoder::new(bytes);
    let m = Message::read(&mut d).context("malformed reply")?;
    if !d.is_empty() {
        bail!("{} trailing bytes after the last record", d.len());
    }
    Ok(m)
}

async fn udp(server: SocketAddr, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(msg, server).await?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(WAIT, s.recv(&mut buf))
        .await
        .context("no reply")??;
    buf.truncate(n);
    Ok(buf)
}

async fn tcp(server: SocketAddr, msg: &[u8]) -> anyhow::Result<Vec<u8>> {
    let io = async {
        let mut s = TcpStream::connect(server).await?;
        let mut framed = u16::try_from(msg.len())?.to_be_bytes().to_vec();
        framed.extend_from_slice(msg);
        s.write_all(&framed).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await?;
        anyhow::Ok(buf)
    };
    tokio::time::timeout(WAIT, io).await.context("no reply")?
}

struct Q {
    name: String,
    qtype: RecordType,
    edns: Option<u16>,
    dnssec_ok: bool,
    ecs: Option<Vec<u8>>,
}

impl Q {
    fn new(name: &str, qtype: RecordType) -> Self {
        Self {
            name: name.into(),
            qtype,
            edns: Some(1232),
            dnssec_ok: false,
            ecs: None,
        }
    }
    fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(&self.name)?, self.qtype));
        if let Some(size) = self.edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(self.dnssec_ok);
            if let Some(ecs) = &self.ecs {
                e.options_mut().insert(EdnsOption::Unknown(8, ecs.clone()));
            }
            m.set_edns(e);
        }
        Ok(m.to_vec()?)
    }
}

fn has_ecs(m: &Message) -> bool {
    m.edns.as_ref().is_some_and(|e| e.option(EdnsCode::Subnet).is_some())
}

/// What one check found on one server.
enum Found {
    Ok(String),
    NotApplicable(String),
    Fail(String),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (mark, note) = match self {
            Found::Ok(n) => ("ok", n),
            Found::NotApplicable(n) => ("n/a", n),
            Found::Fail(n) => ("**FAIL**", n),
        };
        if note.is_empty() {
            f.write_str(mark)
        } else {
            write!(f, "{mark}: {note}")
        }
    }
}

fn found(r: anyhow::Result<Found>) -> Found {
    r.unwrap_or_else(|e| Found::Fail(format!("{e:#}")))
}

async fn truncation(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let (mut bad, mut tc, mut total) = (Vec::new(), 0, 0);
    for qtype in [RecordType::A, RecordType::AAAA] {
        for size in std::iter::once(None).chain((512..=4096u16).map(Some)) {
            total += 1;
            let mut q = Q::new(&format!("big.{zone}."), qtype);
            q.edns = size;
            let reply = udp(s, &q.bytes()?).await?;
            let limit = usize::from(size.unwrap_or(512));
            let problem = match strict(&reply) {
                Err(e) => Some(format!("{e:#}")),
                Ok(_) if reply.len() > limit => Some(format!("{} bytes", reply.len())),
                Ok(m) if m.edns.is_some() != size.is_some() => Some("OPT record".into()),
                Ok(m) if m.metadata.truncation => {
                    tc += 1;
                    (!m.answers.is_empty() || !m.authorities.is_empty() || !m.additionals.is_empty())
                        .then(|| format!("TC with {} answers", m.answers.len()))
                }
                Ok(m) => (m.answers.len() != 40).then(|| format!("{} answers without TC", m.answers.len())),
            };
            if let Some(p) = problem {
                bad.push(format!(
                    "{qtype} @{}: {p}",
                    size.map_or("no EDNS".into(), |s| s.to_string())
                ));
            }
        }
    }
    Ok(match bad.first() {
        None => Found::Ok(format!("{total} replies, {tc} truncated")),
        Some(first) => Found::Fail(format!("{} of {total} bad, e.g. {first}", bad.len())),
    })
}

async fn in_zone_ns(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let m = strict(&udp(s, &Q::new(&format!("ns1.{zone}."), RecordType::A).bytes()?).await?)?;
    if m.metadata.response_code != ResponseCode::NoError || m.answers.is_empty() || !m.metadata.authoritative {
        return Ok(Found::Fail(format!(
            "{} with {} answers",
            m.metadata.response_code,
            m.answers.len()
        )));
    }
    let m = strict(&udp(s, &Q::new(&format!("{zone}."), RecordType::NS).bytes()?).await?)?;
    let glue = m.additionals.iter().filter(|r| matches!(r.data, RData::A(_))).count();
    Ok(if glue > 0 {
        Found::Ok(String::new())
    } else {
        Found::Fail("no glue with the NS answer".into())
    })
}

async fn supports_ecs(s: SocketAddr, zone: &str) -> anyhow::Result<bool> {
    let mut q = Q::new(&format!("{zone}."), RecordType::SOA);
    q.ecs = Some(vec![0, 1, 24, 0, 198, 51, 100]);
    Ok(has_ecs(&strict(&udp(s, &q.bytes()?).await?)?))
}

async fn ecs_invalid(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    if !supports_ecs(s, zone).await? {
        return Ok(Found::NotApplicable("ignores ECS".into()));
    }
    let mut bad = Vec::new();
    for (what, data) in [
        ("extra octet", vec![0u8, 1, 24, 0, 203, 0, 113, 0]),
        ("missing octet", vec![0, 1, 24, 0, 203, 0]),
        ("bits beyond prefix", vec![0, 1, 23, 0, 203, 0, 113]),
        ("non-zero scope", vec![0, 1, 24, 24, 203, 0, 113]),
        ("family 3", vec![0, 3, 24, 0, 203, 0, 113]),
    ] {
        let mut q = Q::new(&format!("app.{zone}."), RecordType::A);
        q.ecs = Some(data);
        let m = strict(&udp(s, &q.bytes()?).await?)?;
        if m.metadata.response_code != ResponseCode::FormErr || has_ecs(&m) || m.edns.is_none() {
            bad.push(format!("{what}: {}", m.metadata.response_code));
        }
    }
    Ok(if bad.is_empty() {
        Found::Ok(String::new())
    } else {
        Found::Fail(bad.join(", "))
    })
}

async fn ecs_everywhere(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    if !supports_ecs(s, zone).await? {
        return Ok(Found::NotApplicable("ignores ECS".into()));
    }
    let mut missing = Vec::new();
    for (name, qtype) in [
        (format!("{zone}."), RecordType::SOA),
        (format!("{zone}."), RecordType::NS),
        (format!("app.{zone}."), RecordType::MX),
        (format!("nope.{zone}."), RecordType::A),
        (format!("app.{zone}."), RecordType::A),
    ] {
        let mut q = Q::new(&name, qtype);
        q.ecs = Some(vec![0, 1, 24, 0, 203, 0, 113]);
        if !has_ecs(&strict(&udp(s, &q.bytes()?).await?)?) {
            missing.push(format!("{name} {qtype}"));
        }
    }
    Ok(if missing.is_empty() {
        Found::Ok(String::new())
    } else {
        Found::Fail(format!("missing on {}", missing.join(", ")))
    })
}

async fn do_bit(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let mut q = Q::new(&format!("{zone}."), RecordType::SOA);
    q.dnssec_ok = true;
    let m = strict(&udp(s, &q.bytes()?).await?)?;
    Ok(match m.edns {
        Some(e) if e.flags().dnssec_ok => Found::Ok(String::new()),
        _ => Found::Fail("DO not copied".into()),
    })
}

async fn own_payload(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let mut sizes = Vec::new();
    for asked in [4000u16, 700] {
        let mut q = Q::new(&format!("{zone}."), RecordType::SOA);
        q.edns = Some(asked);
        let m = strict(&udp(s, &q.bytes()?).await?)?;
        sizes.push(m.edns.map_or(0, |e| e.max_payload()));
    }
    Ok(if sizes[0] == sizes[1] {
        Found::Ok(format!("{}", sizes[0]))
    } else {
        Found::Fail(format!("echoes the client's: {} / {}", sizes[0], sizes[1]))
    })
}

async fn transfers(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let mut got = Vec::new();
    for qtype in [RecordType::AXFR, RecordType::IXFR] {
        let m = strict(&tcp(s, &Q::new(&format!("{zone}."), qtype).bytes()?).await?)?;
        let rc = m.metadata.response_code;
        if !matches!(rc, ResponseCode::Refused | ResponseCode::NotAuth) || !m.answers.is_empty() {
            return Ok(Found::Fail(format!("{qtype}: {rc} with {} records", m.answers.len())));
        }
        got.push(format!("{qtype} {rc}"));
    }
    Ok(Found::Ok(got.join(", ")))
}

async fn tsig(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let mut msg = Q::new(&format!("{zone}."), RecordType::SOA).bytes()?;
    msg[11] += 1;
    msg.extend_from_slice(b"\x0bunknown-key\x00\x00\xfa\x00\xff\x00\x00\x00\x00");
    let mut rdata = b"\x0bhmac-sha256\x00".to_vec();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    rdata.extend_from_slice(&now.to_be_bytes()[2..]);
    rdata.extend_from_slice(&[1, 44, 0, 32]);
    rdata.extend_from_slice(&[0x5a; 32]);
    rdata.extend_from_slice(&[0x42, 0x42, 0, 0, 0, 0]);
    msg.extend_from_slice(&u16::try_from(rdata.len())?.to_be_bytes());
    msg.extend_from_slice(&rdata);
    let m = strict(&udp(s, &msg).await?)?;
    // hickory keeps TSIG among the additionals unless built with DNSSEC.
    let error = m
        .signature
        .as_deref()
        .map(|r| format!("{:?}", r.data.error))
        .or_else(|| {
            m.additionals.iter().find_map(|r| match &r.data {
                RData::TSIG(t) => Some(format!("{:?}", t.error)),
                _ => None,
            })
        });
    Ok(match (m.metadata.response_code, error.as_deref()) {
        (ResponseCode::NotAuth, Some("Some(BadKey)")) => Found::Ok(String::new()),
        (rc, e) => Found::Fail(format!("{rc}, TSIG error {}", e.unwrap_or("none"))),
    })
}

async fn formerr_opt(s: SocketAddr, zone: &str) -> anyhow::Result<Found> {
    let good = Q::new(&format!("app.{zone}."), RecordType::A).bytes()?;
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    let mut two = good.clone();
    two[11] += 1;
    two.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    let mut found = Vec::new();
    for (what, msg) in [("trailing bytes", trailing), ("two OPT", two)] {
        match udp(s, &msg).await {
            Err(_) => found.push(format!("{what}: no reply")),
            Ok(r) => {
                let m = strict(&r)?;
                let rc = m.metadata.response_code;
                if rc == ResponseCode::FormErr && m.edns.is_none() {
                    return Ok(Found::Fail(format!("{what}: FORMERR without OPT")));
                }
                found.push(format!("{what}: {rc}"));
            }
        }
    }
    Ok(Found::Ok(found.join(", ")))
}

async fn notimp(s: SocketAddr) -> anyhow::Result<Found> {
    // Opcode 15, every flag set, no question (genreport's "opcodeflg").
    let header = [0x10, 0x92, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0];
    let reply = match udp(s, &header).await {
        Ok(r) => r,
        Err(_) => return Ok(Found::NotApplicable("no reply".into())),
    };
    let m = strict(&reply)?;
    let mut echoed = Vec::new();
    for (flag, set) in [
        ("aa", m.metadata.authoritative),
        ("tc", m.metadata.truncation),
        ("rd", m.metadata.recursion_desired),
        ("ra", m.metadata.recursion_available),
        ("z", reply[3] & 0x40 != 0),
        ("ad", m.metadata.authentic_data),
        ("cd", m.metadata.checking_disabled),
    ] {
        if set {
            echoed.push(flag);
        }
    }
    Ok(match (m.metadata.response_code, echoed.is_empty()) {
        (ResponseCode::NotImp, true) => Found::Ok(String::new()),
        (rc, _) => Found::Fail(format!("{rc}, flags {}", echoed.join(","))),
    })
}

/// Runs every check on every server and prints the table.
pub async fn run(servers: &[Server], zone: &str) -> anyhow::Result<()> {
    let zone = zone.trim_end_matches('.');
    type Check = fn(SocketAddr, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Found>>>>;
    let checks: [(&str, Check); 11] = [
        (
            "truncation: 512–4096 B, A and AAAA, with and without EDNS: strict parse, all or nothing",
            |s, z| Box::pin(async move { truncation(s, &z).await }),
        ),
        ("in-zone name server: A answered, glue with NS", |s, z| {
            Box::pin(async move { in_zone_ns(s, &z).await })
        }),
        (
            "ECS invalid (RFC 7871 6, 7.1.2): FORMERR with OPT, not echoed",
            |s, z| Box::pin(async move { ecs_invalid(s, &z).await }),
        ),
        ("ECS echoed on SOA, NS, NODATA, NXDOMAIN, A (7.2.1)", |s, z| {
            Box::pin(async move { ecs_everywhere(s, &z).await })
        }),
        ("DO bit copied (RFC 3225 3)", |s, z| {
            Box::pin(async move { do_bit(s, &z).await })
        }),
        ("OPT advertises the server's own payload size", |s, z| {
            Box::pin(async move { own_payload(s, &z).await })
        }),
        ("AXFR/IXFR over TCP refused", |s, z| {
            Box::pin(async move { transfers(s, &z).await })
        }),
        ("TSIG with an unknown key: NOTAUTH, BADKEY (RFC 8945 5.2.2)", |s, z| {
            Box::pin(async move { tsig(s, &z).await })
        }),
        ("FORMERR to a query with EDNS keeps an OPT record", |s, z| {
            Box::pin(async move { formerr_opt(s, &z).await })
        }),
        ("NOTIMP (opcode 15, all flags set): no flag echoed", |s, _| {
            Box::pin(async move { notimp(s).await })
        }),
        ("still answering afterwards", |s, z| {
            Box::pin(async move {
                let m = strict(&udp(s, &Q::new(&format!("app.{z}."), RecordType::A).bytes()?).await?)?;
                Ok(if m.answers.is_empty() {
                    Found::Fail(m.metadata.response_code.to_string())
                } else {
                    Found::Ok(String::new())
                })
            })
        }),
    ];
    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
    println!("| check | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(servers.len()));
    let mut failures = 0;
    for (what, check) in checks {
        let mut row = Vec::new();
        for s in servers {
            let f = found(check(s.addr, zone.to_owned()).await);
            failures += usize::from(matches!(f, Found::Fail(_)));
            row.push(f.to_string());
        }
        println!("| {what} | {} |", row.join(" | "));
    }
    eprintln!("compliance: {failures} failed checks over {} servers", servers.len());
    Ok(())
}
