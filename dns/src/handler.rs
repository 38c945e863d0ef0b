//! The request handler: authoritative answers from the shared routing table.

use std::{net::IpAddr, sync::Arc};

use arc_swap::ArcSwapOption;
use cellgate_config::Policy;
use cellgate_routing::{hash, steer, CellState, Outcome, RouteQuery};
use cellgate_snapshot::{
    metrics::{DNS_QTYPES, DNS_RCODES},
    Snapshot, Snapshots,
};
use hickory_proto::{
    op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode},
    rr::{
        rdata::{
            opt::{ClientSubnet, EdnsCode, EdnsOption},
            A, AAAA,
        },
        DNSClass, RData, Record, RecordType,
    },
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

use crate::zones::Zones;

/// Prefix that keys the `weighted` policy's per-client choice, so one
/// network gets one stable answer (and resolvers can cache it for it).
const WEIGHTED_V4_PREFIX: u8 = 24;
const WEIGHTED_V6_PREFIX: u8 = 56;

/// cellgate's DNS `RequestHandler`.
#[derive(Debug)]
pub struct CellDns {
    snapshots: Arc<Snapshots>,
    /// Zone records of one config epoch (epochs are never reused, so a
    /// reload can never be answered from an older config's records).
    zones: ArcSwapOption<(u64, Arc<Zones>)>,
}

/// Everything a response carries.
#[derive(Debug, Default)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub edns: Option<Edns>,
}

fn truncate(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let p = u32::from(prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let p = u32::from(prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

impl CellDns {
    pub fn new(snapshots: Arc<Snapshots>) -> Self {
        Self {
            snapshots,
            zones: ArcSwapOption::empty(),
        }
    }

    fn zones(&self, s: &Snapshot) -> Arc<Zones> {
        let epoch = s.layout.epoch;
        if let Some(z) = self.zones.load().as_ref().filter(|z| z.0 == epoch) {
            return z.1.clone();
        }
        // A new config: render once and share.
        let z = Arc::new(Zones::new(&s.table.config));
        self.zones.store(Some(Arc::new((epoch, z.clone()))));
        z
    }

    /// Decides the whole answer to `req`.
    pub fn answer(&self, req: &Request) -> Answer {
        let snapshot = self.snapshots.load_full();
        let table = &snapshot.table;
        let mut a = Answer::default();
        let mut ecs: Option<ClientSubnet> = None;
        if let Some(e) = &req.edns {
            let mut out = Edns::new();
            out.set_max_payload(e.max_payload().max(512).min(table.config.dns.max_udp_payload));
            out.set_version(0);
            if e.version() > 0 {
                a.rcode = ResponseCode::BADVERS;
                a.edns = Some(out);
                return a;
            }
            if let Some(EdnsOption::Subnet(s)) = e.option(EdnsCode::Subnet) {
                ecs = Some(*s);
            }
            a.edns = Some(out);
        }
        if req.metadata.op_code != OpCode::Query {
            a.rcode = ResponseCode::NotImp;
            return a;
        }
        let queries = req.queries.queries();
        if queries.len() != 1 {
            a.rcode = ResponseCode::FormErr;
            return a;
        }
        let q = &queries[0];
        if q.query_class() != DNSClass::IN {
            a.rcode = ResponseCode::Refused;
            return a;
        }
        let mut qname = q.name().to_string();
        if qname.ends_with('.') {
            qname.pop();
        }
        let Some(index) = table.zones.find(&qname) else {
            a.rcode = ResponseCode::Refused;
            return a;
        };
        let zones = self.zones(&snapshot);
        let Some(zone) = zones.get(&index.origin) else {
            a.rcode = ResponseCode::ServFail;
            return a;
        };
        a.authoritative = true;
        let owner = q.original().name().clone();
        if !index.names.contains(&qname) {
            a.rcode = ResponseCode::NXDomain;
            a.authorities.push(zone.negative_soa.clone());
            return a;
        }
        let apex = qname == index.origin;
        let service = table.service_by_dns_name(&qname);
        let qtype = q.query_type();
        let with_owner = |r: &Record| {
            let mut r = r.clone();
            r.name = owner.clone();
            r
        };
        match (qtype, service) {
            (RecordType::A | RecordType::AAAA | RecordType::ANY, Some(svc)) => {
                self.steer(&snapshot, req, svc, qtype, &owner, ecs, &mut a);
                if a.rcode == ResponseCode::NoError && a.answers.is_empty() {
                    a.authorities.push(zone.negative_soa.clone());
                }
            }
            (RecordType::SOA, _) if apex => a.answers.push(with_owner(&zone.soa)),
            // RFC 8482: answer ANY minimally, with one RRset.
            (RecordType::ANY, None) if apex => a.answers.push(with_owner(&zone.soa)),
            (RecordType::NS, _) if apex => a.answers.extend(zone.ns.iter().map(with_owner)),
            _ => a.authorities.push(zone.negative_soa.clone()), // NODATA
        }
        a
    }

    #[allow(clippy::too_many_arguments)]
    fn steer(
        &self,
        snapshot: &Snapshot,
        req: &Request,
        svc: cellgate_routing::ServiceIdx,
        qtype: RecordType,
        owner: &hickory_proto::rr::Name,
        ecs: Option<ClientSubnet>,
        a: &mut Answer,
    ) {
        let table = &snapshot.table;
        let spec = table.service_spec(svc);
        // The client: the ECS network when given (source prefix 0 means
        // "do not use my address"), else the address the query came from.
        let (ip, source_prefix) = match &ecs {
            Some(s) if s.source_prefix() > 0 => (truncate(s.addr(), s.source_prefix()), s.source_prefix()),
            _ => {
                let ip = req.src().ip();
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let (client, located) = table.client(ip);
        let weighted_prefix = if ip.is_ipv4() {
            WEIGHTED_V4_PREFIX
        } else {
            WEIGHTED_V6_PREFIX
        };
        let seed = match truncate(ip, weighted_prefix) {
            IpAddr::V4(v4) => hash::stable_hash(&v4.octets()),
            IpAddr::V6(v6) => hash::stable_hash(&v6.octets()),
        };
        let query = RouteQuery {
            service: svc,
            client,
            shard_key: None,
            sticky_cell: None,
            seed,
            limit: spec.dns_answers,
        };
        let clock = self.snapshots.clock();
        let d = steer(table, &query, clock.now());
        // ECS scope: the prefix of what decided the answer, never longer
        // than the query's; 0 when the client's network did not matter.
        if let (Some(s), Some(edns)) = (&ecs, a.edns.as_mut()) {
            let mut scope = 0u8;
            if spec.policy == Policy::Geo || !spec.residency.is_empty() {
                scope = located.map_or(source_prefix, |l| l.prefix_len);
            }
            if spec.policy == Policy::Weighted {
                scope = scope.max(weighted_prefix);
            }
            let scope = if s.source_prefix() == 0 {
                0
            } else {
                scope.min(source_prefix)
            };
            edns.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                s.addr(),
                s.source_prefix(),
                scope,
            )));
        }
        if d.is_empty() {
            // all_down = "closed" (or nothing allowed): refuse to answer.
            a.rcode = ResponseCode::ServFail;
            return;
        }
        let degraded = d.outcome != Outcome::Routed
            || d.candidates().iter().any(|c| {
                let cell = table.cell(c.cell);
                matches!(cell.state, CellState::Drained(_))
                    || cell.measurement.endpoints_up < cell.measurement.endpoints_total
            });
        let ttl = if degraded { spec.dns_degraded_ttl } else { spec.dns_ttl };
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        if d.outcome == Outcome::FailOpen {
            if let Some(m) = snapshot.service_metrics(svc) {
                m.fail_open_dns.increment(1);
            }
        }
        let now_secs = clock.now_secs();
        for c in d.candidates() {
            snapshot.traffic().dns_answer(c.cell, now_secs);
            if let Some(m) = snapshot.cell_metrics(c.cell) {
                m.dns_answers.increment(1);
            }
            let cell = table.cell_spec(c.cell);
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                a.answers.extend(
                    cell.dns_v4
                        .iter()
                        .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip)))),
                );
            }
            if qtype == RecordType::AAAA {
                a.answers.extend(
                    cell.dns_v6
                        .iter()
                        .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*ip)))),
                );
            }
        }
    }
}

/// The index in [`DNS_RCODES`] of `rcode`.
fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::NotAuth => 6,
        ResponseCode::BADVERS => 7,
        _ => DNS_RCODES.len() - 1,
    }
}

#[async_trait::async_trait]
impl RequestHandler for CellDns {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let a = self.answer(request);
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("other", |q| <&'static str>::from(q.query_type()));
        let qi = DNS_QTYPES.iter().position(|t| *t == qtype).unwrap_or(DNS_QTYPES.len());
        let ri = rcode_index(a.rcode);
        self.snapshots.load().edge.dns_query(qi, ri).increment(1);
        let builder = MessageResponseBuilder::new(&request.queries, a.edns.as_ref());
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = a.authoritative;
        meta.response_code = a.rcode;
        let msg = builder.build(
            meta,
            a.answers.iter(),
            a.authorities.iter(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "cannot send DNS response");
                let mut metadata = Metadata::new(request.metadata.id, MessageType::Response, request.metadata.op_code);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
