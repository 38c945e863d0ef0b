//! Answering one query, from the bytes received to the bytes to send.
//!
//! [`respond`] takes everything it needs as arguments (the routing table,
//! the zones, "now"); [`CellDns`] holds the shared state the servers pass
//! in. The decision comes first as a [`Plan`] (what the response says),
//! then it is written: this keeps the rules below in one place.
//!
//! * A malformed message gets FORMERR, with the question and an OPT record
//!   when they could be read (never the options of the query), or nothing
//!   when it is shorter than a header or is a response.
//! * A TSIG-signed query gets NOTAUTH with a TSIG error BADKEY: this server
//!   has no keys (RFC 8945 5.2.2).
//! * EDNS version above 0: BADVERS.
//! * Opcodes other than QUERY: NOTIMP, header only, RD and CD not echoed.
//! * A Client Subnet option that fails RFC 7871's checks: FORMERR.
//! * QCLASS other than IN, AXFR and IXFR, names outside every zone:
//!   REFUSED.
//! * In a zone: NXDOMAIN and NODATA with the SOA; A/AAAA of a service from
//!   `steer()`; A/AAAA of a name server; SOA and NS (with the name servers'
//!   addresses as additional data) at the apex; ANY answered with one RRset
//!   (RFC 8482).
//!
//! Every response to a query with an OPT record carries one: the server's
//! own payload size, the query's DO bit, and the query's Client Subnet
//! option (with its scope) unless the response is FORMERR or BADVERS.
//!
//! A UDP worker answers through its [`AnswerCache`] ([`Batch::respond`]):
//! a hit is copied and patched, and what answering counts (queries, answers
//! per cell, traffic, fail-open) and RRL happen for it as for a computed
//! answer ([`Accounting`] is kept with the entry); a miss is answered as
//! above and kept. TCP and [`CellDns::respond`] never use a cache.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Instant,
};

use arc_swap::ArcSwapOption;
use cellgate_config::Policy;
use cellgate_routing::{hash, steer, CellState, Client, Decision, Outcome, RouteQuery, RoutingTable, Timestamp};
use cellgate_snapshot::{
    metrics::{DNS_QTYPES, DNS_RCODES},
    Snapshot, Snapshots,
};

use crate::{
    cache::{Accounting, AnswerCache, Computed, Key, RrlClass, Steered, Validity},
    ecs::{self, ClientSubnet},
    rrl::{self, Rrl, Verdict},
    wire::{self, rcode, rtype, LowerName, OptOut, Owner, Query, Question, Read, Response, Section, Trailer},
    zones::{Host, Zone, Zones},
};

/// Prefix that keys the `weighted` policy's per-client choice, so one
/// network gets one stable answer (and resolvers can cache it for it).
pub(crate) const WEIGHTED_V4_PREFIX: u8 = 24;
pub(crate) const WEIGHTED_V6_PREFIX: u8 = 56;

/// How a message arrived; UDP responses are limited in size and by RRL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// cellgate's DNS handler: the state every query reads.
#[derive(Debug)]
pub struct CellDns {
    snapshots: Arc<Snapshots>,
    /// Zone data of one config epoch (epochs are never reused, so a reload
    /// can never be answered from an older config's zones).
    zones: ArcSwapOption<(u64, Arc<Zones>)>,
    /// RRL buckets, allocated when a config first turns RRL on.
    rrl: OnceLock<Rrl>,
    /// RRL time is this instant plus the edge clock's elapsed time, so a
    /// manual clock drives it too.
    started: Instant,
}

/// What one query is answered from.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    pub snapshot: &'a Snapshot,
    pub table: &'a RoutingTable,
    pub zones: &'a Zones,
    /// Wall-clock now, for drain deadlines and TSIG times.
    pub now: Timestamp,
    /// The rate limiter, its settings and the monotonic now (UDP only).
    pub rrl: Option<(&'a Rrl, &'a cellgate_config::Rrl, Instant)>,
}

/// What a batch of queries is answered from: the snapshot, the zones and
/// the clocks, read once for all of them.
#[derive(Debug)]
pub struct Batch<'a> {
    snapshot: Arc<Snapshot>,
    zones: Arc<Zones>,
    now: Timestamp,
    rrl: Option<(&'a Rrl, Instant)>,
    transport: Transport,
}

impl Batch<'_> {
    /// Answers the message `msg` from `src` into `out`, from `cache` when
    /// it has the answer (and into it when not); false when nothing is to
    /// be sent.
    pub fn respond(&self, cache: Option<&mut AnswerCache>, msg: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
        let ctx = Ctx {
            snapshot: &self.snapshot,
            table: &self.snapshot.table,
            zones: &self.zones,
            now: self.now,
            rrl: match (self.rrl, self.snapshot.table.config.dns.rrl.as_ref()) {
                (Some((limiter, mono)), Some(settings)) => Some((limiter, settings, mono)),
                _ => None,
            },
        };
        respond_with(&ctx, cache, msg, src, self.transport, out)
    }
}

impl CellDns {
    pub fn new(snapshots: Arc<Snapshots>) -> Self {
        Self {
            snapshots,
            zones: ArcSwapOption::empty(),
            rrl: OnceLock::new(),
            started: Instant::now(),
        }
    }

    fn zones(&self, s: &Snapshot) -> Arc<Zones> {
        let epoch = s.layout.epoch;
        if let Some(z) = self.zones.load().as_ref().filter(|z| z.0 == epoch) {
            return z.1.clone();
        }
        // A new config: index it once and share.
        let z = Arc::new(Zones::new(&s.table.config));
        self.zones.store(Some(Arc::new((epoch, z.clone()))));
        z
    }

    /// What queries arriving now over `transport` are answered from.
    pub fn batch(&self, transport: Transport) -> Batch<'_> {
        let snapshot = self.snapshots.load_full();
        let zones = self.zones(&snapshot);
        let clock = self.snapshots.clock();
        let rrl = match (transport, snapshot.table.config.dns.rrl.as_ref()) {
            (Transport::Udp, Some(s)) => Some((
                self.rrl.get_or_init(|| {
                    let edge = &snapshot.edge;
                    Rrl::new(
                        s.table_size,
                        self.started,
                        edge.dns_rrl_dropped.clone(),
                        edge.dns_rrl_slipped.clone(),
                    )
                }),
                self.started + clock.elapsed(),
            )),
            _ => None,
        };
        Batch {
            now: clock.now(),
            snapshot,
            zones,
            rrl,
            transport,
        }
    }

    /// Answers the message `msg` from `src` into `out`; false when nothing
    /// is to be sent.
    pub fn respond(&self, msg: &[u8], src: SocketAddr, transport: Transport, out: &mut Vec<u8>) -> bool {
        self.batch(transport).respond(None, msg, src, out)
    }
}

/// What a response holds besides its header.
#[derive(Clone, Copy, Debug)]
enum Body<'z> {
    Empty,
    /// NXDOMAIN or NODATA: the SOA in the authority section.
    Negative(&'z Zone, usize),
    Soa(&'z Zone, usize),
    /// The NS RRset and its name servers' addresses.
    Ns(&'z Zone, usize),
    /// A name server's A or AAAA records.
    Host(&'z Zone, &'z Host, bool),
    /// A service's cells' addresses.
    Cells {
        decision: Decision,
        v4: bool,
        ttl: u32,
    },
}

/// What a response says, decided before it is written.
#[derive(Debug)]
struct Plan<'z> {
    rcode: u16,
    aa: bool,
    /// RD and CD copied (QUERY only).
    echo_rd_cd: bool,
    question: bool,
    body: Body<'z>,
    /// The Client Subnet option to echo, its scope set.
    ecs: Option<ClientSubnet>,
    /// A TSIG error record.
    tsig: bool,
    /// The question name, lower case (for RRL).
    name: Option<LowerName>,
    /// What `steer` chose, to count.
    steered: Option<Steered>,
}

impl<'z> Plan<'z> {
    fn new(q: &Query<'_>) -> Self {
        let is_query = q.header.opcode() == 0;
        Self {
            rcode: rcode::NOERROR,
            aa: false,
            echo_rd_cd: is_query,
            question: is_query && q.question.is_some(),
            body: Body::Empty,
            ecs: None,
            tsig: false,
            name: None,
            steered: None,
        }
    }
    fn error(mut self, rcode: u16) -> Self {
        self.rcode = rcode;
        self.aa = false;
        self.body = Body::Empty;
        if rcode == rcode::FORMERR || rcode == rcode::BADVERS {
            self.ecs = None; // never echo an option of a query refused as a whole
        }
        self
    }

    /// The RRL class of this response.
    fn rrl_class(&self, qtype: u16) -> rrl::Class<'_> {
        match (self.rcode, self.body, &self.name) {
            (rcode::NOERROR | rcode::NXDOMAIN, Body::Negative(zone, _), _) => rrl::Class::Negative(&zone.origin),
            (rcode::NOERROR, _, Some(name)) => rrl::Class::Answer(name.as_str(), qtype),
            _ => rrl::Class::Error,
        }
    }
}

/// Answers one message; false when nothing is to be sent (`out` is then
/// meaningless).
pub fn respond(ctx: &Ctx<'_>, msg: &[u8], src: SocketAddr, transport: Transport, out: &mut Vec<u8>) -> bool {
    respond_with(ctx, None, msg, src, transport, out)
}

/// The size limit of a response to `q`.
fn size_limit(ctx: &Ctx<'_>, q: &Query<'_>, transport: Transport) -> usize {
    let server_payload = ctx.table.config.dns.max_udp_payload;
    // A client advertising less than 512 still gets 512 (RFC 6891 6.2.5).
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => usize::from(q.opt.map_or(512, |o| o.payload.max(512).min(server_payload.max(512)))),
    }
}

/// Counts one answered query: by type and rcode, and for a steered answer
/// the answers per cell, the cells' traffic and fail-open.
fn account(ctx: &Ctx<'_>, a: &Accounting) {
    ctx.snapshot.edge.dns_query(a.qtype, a.rcode).increment(1);
    if let Some(s) = &a.steered {
        if s.fail_open {
            if let Some(m) = ctx.snapshot.service_metrics(s.service) {
                m.fail_open_dns.increment(1);
            }
        }
        let now_secs = ctx.now.as_unix_secs();
        for &c in s.cells() {
            ctx.snapshot.traffic().dns_answer(c, now_secs);
            if let Some(m) = ctx.snapshot.cell_metrics(c) {
                m.dns_answers.increment(1);
            }
        }
    }
}

/// [`respond`], through `cache` when given (UDP).
pub(crate) fn respond_with(
    ctx: &Ctx<'_>,
    cache: Option<&mut AnswerCache>,
    msg: &[u8],
    src: SocketAddr,
    transport: Transport,
    out: &mut Vec<u8>,
) -> bool {
    let (q, malformed) = match wire::read(msg) {
        Read::Ignore => return false,
        Read::Malformed(q) => (q, true),
        Read::Query(q) => (q, false),
    };
    let limit = size_limit(ctx, &q, transport);
    let edge = &ctx.snapshot.edge;
    let mut cache = cache.filter(|c| !c.is_off());
    let key = match &cache {
        Some(c) if !malformed => Key::of(&q, src, limit).map(|k| {
            let h = c.hash(&k);
            (k, h)
        }),
        _ => None,
    };
    if let (Some(c), Some((key, hash))) = (cache.as_deref_mut(), &key) {
        if let Some(hit) = c.get(key, *hash, ctx.snapshot) {
            edge.dns_cache_hits.increment(1);
            account(ctx, &hit.accounting);
            let mut truncated = false;
            if let Some((limiter, settings, mono)) = ctx.rrl {
                let qtype = q.question.map_or(0, |x| x.qtype);
                let name;
                let class = match hit.rrl {
                    RrlClass::Answer => {
                        name = q.question.map(|x| x.lower_name());
                        rrl::Class::Answer(name.as_ref().map_or("", |n| n.as_str()), qtype)
                    }
                    RrlClass::Negative(origin) => rrl::Class::Negative(origin),
                    RrlClass::Error => rrl::Class::Error,
                };
                match limiter.check(settings, src.ip(), class, mono) {
                    Verdict::Send => {}
                    Verdict::Drop => return false,
                    Verdict::Slip => truncated = true,
                }
            }
            if truncated {
                hit.write_slip(msg, &q, out);
            } else {
                hit.write(msg, &q, out);
            }
            return true;
        }
        edge.dns_cache_misses.increment(1);
    } else if cache.is_some() {
        edge.dns_cache_uncacheable.increment(1);
    }
    let plan = plan(ctx, &q, malformed, src);
    let qtype = q.question.map_or(0, |x| x.qtype);
    let qtype_name = if q.question.is_some() {
        wire::qtype_name(qtype)
    } else {
        "other"
    };
    let accounting = Accounting {
        qtype: DNS_QTYPES
            .iter()
            .position(|t| *t == qtype_name)
            .unwrap_or(DNS_QTYPES.len()),
        rcode: DNS_RCODES
            .iter()
            .position(|r| *r == rcode::name(plan.rcode))
            .unwrap_or(DNS_RCODES.len()),
        steered: plan.steered,
    };
    account(ctx, &accounting);
    let mut truncated = false;
    if let Some((limiter, settings, mono)) = ctx.rrl {
        match limiter.check(settings, src.ip(), plan.rrl_class(qtype), mono) {
            Verdict::Send => {}
            Verdict::Drop => return false,
            Verdict::Slip => truncated = true,
        }
    }
    let opt_at = write(ctx.table, &plan, &q, limit, truncated, ctx.now, out);
    if let (Some(c), Some((key, hash)), false) = (cache, &key, truncated) {
        let validity = if plan.steered.is_some() || plan.rcode == rcode::SERVFAIL {
            Validity::Table(ctx.table.generation)
        } else {
            Validity::Config(ctx.snapshot.layout.epoch)
        };
        let computed = Computed {
            validity,
            accounting,
            rrl: plan.rrl_class(qtype),
            opt_at,
        };
        c.insert(key, *hash, out, computed);
    }
    true
}

fn plan<'z>(ctx: &Ctx<'z>, q: &Query<'_>, malformed: bool, src: SocketAddr) -> Plan<'z> {
    let mut p = Plan::new(q);
    let is_query = q.header.opcode() == 0;
    if malformed {
        // An opcode we do not know may have another format: NOTIMP.
        return if is_query {
            p.error(rcode::FORMERR)
        } else {
            p.error(rcode::NOTIMP)
        };
    }
    if q.tsig.is_some() {
        p.tsig = true;
        return p.error(rcode::NOTAUTH);
    }
    if q.opt.is_some_and(|o| o.version > 0) {
        return p.error(rcode::BADVERS);
    }
    if !is_query {
        return p.error(rcode::NOTIMP);
    }
    let Some(question) = q.question else {
        return p.error(rcode::FORMERR); // no question, or more than one
    };
    match q.opt.and_then(|o| o.ecs) {
        Some(Err(e)) => {
            tracing::debug!(error = %e, %src, "dns: invalid client subnet option");
            return p.error(rcode::FORMERR);
        }
        Some(Ok(e)) => p.ecs = Some(e.with_scope(0)),
        None => {}
    }
    let name = question.lower_name();
    p.name = Some(name);
    match question.qtype {
        rtype::OPT | rtype::TSIG => return p.error(rcode::FORMERR),
        _ if question.qclass != wire::CLASS_IN => return p.error(rcode::REFUSED),
        rtype::AXFR | rtype::IXFR => return p.error(rcode::REFUSED),
        _ => {}
    }
    let Some((zone, skip)) = ctx.zones.find(&name) else {
        return p.error(rcode::REFUSED);
    };
    p.aa = true;
    let name_str = name.as_str();
    if !zone.names.contains(name_str) {
        p.rcode = rcode::NXDOMAIN;
        p.body = Body::Negative(zone, skip);
        return p;
    }
    let apex = skip == 0;
    let qtype = question.qtype;
    let address_query = matches!(qtype, rtype::A | rtype::AAAA | rtype::ANY);
    p.body = if let (true, Some(svc)) = (address_query, ctx.table.service_by_dns_name(name_str)) {
        match steer_answer(ctx, svc, qtype, src, &mut p.ecs) {
            Some((body, steered)) => {
                p.steered = Some(steered);
                body
            }
            None => return p.error(rcode::SERVFAIL),
        }
    } else if let (true, Some(host)) = (address_query, zone.hosts.get(name_str)) {
        let v4 = qtype == rtype::A || (qtype == rtype::ANY && !host.v4.is_empty());
        Body::Host(zone, host, v4)
    } else {
        match qtype {
            rtype::SOA | rtype::ANY if apex => Body::Soa(zone, skip),
            rtype::NS if apex => Body::Ns(zone, skip),
            _ => Body::Empty,
        }
    };
    let empty = match p.body {
        Body::Empty => true,
        Body::Host(_, h, v4) => (if v4 { h.v4.len() } else { h.v6.len() }) == 0,
        Body::Cells { decision, v4, .. } => count_addresses(ctx.table, &decision, v4) == 0,
        _ => false,
    };
    if empty {
        p.body = Body::Negative(zone, skip); // NODATA
    }
    p
}

fn count_addresses(table: &RoutingTable, d: &Decision, v4: bool) -> usize {
    d.candidates()
        .iter()
        .map(|c| {
            let cell = table.cell_spec(c.cell);
            if v4 {
                cell.dns_v4.len()
            } else {
                cell.dns_v6.len()
            }
        })
        .sum()
}

fn truncate(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// Steers a service's A/AAAA/ANY query and sets the Client Subnet scope;
/// `None` when the service refuses (all down and `closed`).
fn steer_answer<'z>(
    ctx: &Ctx<'z>,
    svc: cellgate_routing::ServiceIdx,
    qtype: u16,
    src: SocketAddr,
    ecs: &mut Option<ClientSubnet>,
) -> Option<(Body<'z>, Steered)> {
    let table = ctx.table;
    let spec = table.service_spec(svc);
    // The client: the ECS network when given (source prefix 0 means "do
    // not use my address"), else the address the query came from.
    let ip = match ecs {
        Some(e) if e.source_prefix > 0 => e.addr,
        _ => src.ip(),
    };
    let (located, data_scope) = table.locate_with_scope(ip);
    let client = Client {
        addr: Some(ip),
        location: located.map(|l| l.location),
        country: located.map(|l| l.country),
    };
    let seed_ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let seed = match truncate(
        seed_ip,
        if seed_ip.is_ipv4() {
            WEIGHTED_V4_PREFIX
        } else {
            WEIGHTED_V6_PREFIX
        },
    ) {
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
    let d = steer(table, &query, ctx.now);
    if let Some(e) = ecs {
        // See the scope rules in `ecs`.
        let mut scope = 0;
        if spec.policy == Policy::Geo || !spec.residency.is_empty() {
            scope = data_scope;
        }
        if spec.policy == Policy::Weighted {
            scope = scope.max(ecs::weighted_scope(e.addr));
        }
        if e.source_prefix == 0 {
            scope = 0;
        }
        *e = e.with_scope(scope);
    }
    if d.is_empty() {
        return None;
    }
    let degraded = d.outcome != Outcome::Routed
        || d.candidates().iter().any(|c| {
            let cell = table.cell(c.cell);
            matches!(cell.state, CellState::Drained(_))
                || cell.measurement.endpoints_up < cell.measurement.endpoints_total
        });
    let ttl = if degraded { spec.dns_degraded_ttl } else { spec.dns_ttl };
    let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
    let mut steered = Steered {
        service: svc,
        fail_open: d.outcome == Outcome::FailOpen,
        cells: [cellgate_routing::CellIdx(0); Decision::CAP],
        len: 0,
    };
    for (slot, c) in steered.cells.iter_mut().zip(d.candidates()) {
        *slot = c.cell;
        steered.len += 1;
    }
    let v4 = qtype == rtype::A || (qtype == rtype::ANY && count_addresses(table, &d, true) > 0);
    Some((Body::Cells { decision: d, v4, ttl }, steered))
}

/// Writes the response `p` to `q` into `out`, keeping within `limit`
/// bytes; `truncated`: an empty TC reply (RRL's slip). Returns where the
/// OPT record starts when it is the last record.
fn write(
    table: &RoutingTable,
    p: &Plan<'_>,
    q: &Query<'_>,
    limit: usize,
    truncated: bool,
    now: Timestamp,
    out: &mut Vec<u8>,
) -> Option<usize> {
    let payload = table.config.dns.max_udp_payload;
    let mut r = Response::new(out, &q.header, p.rcode, p.aa, p.echo_rd_cd);
    let question = q.question.filter(|_| p.question);
    if let Some(question) = &question {
        r.question(question);
    }
    let mut trailer = Trailer {
        opt: q.opt.map(|o| OptOut {
            payload,
            dnssec_ok: o.dnssec_ok(),
            ecs: p.ecs,
        }),
        tsig: q.tsig.as_ref().filter(|_| p.tsig).map(|t| (t, now.as_unix_secs())),
    };
    // Long TSIG names could push even an empty reply over the limit: then
    // the TSIG record goes (what is left always fits in 512 bytes).
    if wire::HEADER_LEN + question.map_or(0, |q| q.wire.len()) + trailer.wire_len() > limit {
        trailer.tsig = None;
    }
    r.limit(limit, &trailer);
    if truncated {
        r.truncate();
    } else if let Some(question) = &question {
        write_body(table, &mut r, p.body, question);
    }
    let len = r.finish(&trailer);
    match (trailer.opt, trailer.tsig) {
        (Some(_), None) => Some(len - trailer.wire_len()),
        _ => None,
    }
}

fn write_body(table: &RoutingTable, r: &mut Response<'_>, body: Body<'_>, question: &Question<'_>) {
    let qname = Owner::At(wire::HEADER_LEN as u16);
    match body {
        Body::Empty => {}
        Body::Negative(zone, skip) => {
            let origin = question.offset_of_suffix(skip);
            r.soa(
                Section::Authority,
                Owner::At(origin),
                zone.negative_ttl,
                &zone.soa,
                origin,
            );
        }
        Body::Soa(zone, skip) => {
            let origin = question.offset_of_suffix(skip);
            r.soa(Section::Answer, qname, zone.ttl, &zone.soa, origin);
        }
        Body::Ns(zone, skip) => {
            let origin = question.offset_of_suffix(skip);
            for ns in &zone.ns {
                r.ns(qname, zone.ttl, ns, origin);
            }
            for g in &zone.glue {
                let owner = Owner::Name(&g.name, origin);
                for ip in &g.host.v4 {
                    r.a(Section::Additional, owner, zone.ttl, *ip);
                }
                for ip in &g.host.v6 {
                    r.aaaa(Section::Additional, owner, zone.ttl, *ip);
                }
            }
        }
        Body::Host(zone, host, v4) => {
            if v4 {
                for ip in &host.v4 {
                    r.a(Section::Answer, qname, zone.ttl, *ip);
                }
            } else {
                for ip in &host.v6 {
                    r.aaaa(Section::Answer, qname, zone.ttl, *ip);
                }
            }
        }
        Body::Cells { decision, v4, ttl } => {
            for c in decision.candidates() {
                let cell = table.cell_spec(c.cell);
                if v4 {
                    for ip in &cell.dns_v4 {
                        r.a(Section::Answer, qname, ttl, *ip);
                    }
                } else {
                    for ip in &cell.dns_v6 {
                        r.aaaa(Section::Answer, qname, ttl, *ip);
                    }
                }
            }
        }
    }
}
