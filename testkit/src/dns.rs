//! A DNS client over real UDP and TCP sockets, with raw access for
//! malformed-input tests.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{
        rdata::opt::{ClientSubnet, EdnsOption},
        Name, RecordType,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// One question and how to ask it.
#[derive(Clone, Debug)]
pub struct DnsQuery {
    pub name: String,
    pub qtype: RecordType,
    /// EDNS payload size; `None` sends no OPT record.
    pub edns: Option<u16>,
    /// EDNS Client Subnet: address and source prefix.
    pub ecs: Option<(IpAddr, u8)>,
    /// The local address to send from (127.0.0.x).
    pub from: IpAddr,
    pub tcp: bool,
}

impl DnsQuery {
    pub fn new(name: &str, qtype: RecordType) -> Self {
        Self {
            name: name.into(),
            qtype,
            edns: Some(1232),
            ecs: None,
            from: IpAddr::from([127, 0, 0, 1]),
            tcp: false,
        }
    }
    pub fn ecs(mut self, addr: &str, prefix: u8) -> Self {
        self.ecs = Some((addr.parse().unwrap_or_else(|_| panic!("ip {addr}")), prefix));
        self
    }
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    pub fn from(mut self, ip: &str) -> Self {
        self.from = ip.parse().unwrap_or_else(|_| panic!("ip {ip}"));
        self
    }
    pub fn no_edns(mut self) -> Self {
        self.edns = None;
        self
    }
    /// The query's wire bytes (id 4242).
    pub fn bytes(&self) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(&self.name).unwrap_or_else(|e| panic!("name {}: {e}", self.name)),
            self.qtype,
        ));
        if let Some(size) = self.edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            if let Some((a, p)) = self.ecs {
                e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(a, p, 0)));
            }
            m.set_edns(e);
        }
        m.to_vec().unwrap_or_else(|e| panic!("encode: {e}"))
    }
}

/// Asks one edge's DNS listener.
#[derive(Clone, Copy, Debug)]
pub struct DnsClient {
    pub server: SocketAddr,
}

impl DnsClient {
    pub fn new(server: SocketAddr) -> Self {
        Self { server }
    }

    /// Sends `q` and parses the answer.
    pub async fn ask(&self, q: &DnsQuery) -> Message {
        let bytes = self.raw(&q.bytes(), q.from, q.tcp).await;
        Message::from_vec(&bytes).unwrap_or_else(|e| panic!("answer does not parse: {e}"))
    }

    /// The A/AAAA addresses of an answer.
    pub fn addresses(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
                hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    /// Sends raw bytes (framed for TCP) and returns the raw answer.
    pub async fn raw(&self, bytes: &[u8], from: IpAddr, tcp: bool) -> Vec<u8> {
        let io = async {
            if tcp {
                let mut s = TcpStream::connect(self.server).await?;
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(bytes);
                s.write_all(&framed).await?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                s.read_exact(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            } else {
                let s = UdpSocket::bind(SocketAddr::new(from, 0)).await?;
                s.send_to(bytes, self.server).await?;
                let mut buf = vec![0u8; 65535];
                let n = s.recv(&mut buf).await?;
                buf.truncate(n);
                Ok(buf)
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), io).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => panic!("dns io: {e}"),
            Err(_) => panic!("no DNS answer within 5 s"),
        }
    }
}
