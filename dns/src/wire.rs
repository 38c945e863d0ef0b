//! The DNS wire format, as much as an authoritative server needs: a strict
//! reader of queries and a writer of responses, with no allocation.
//!
//! The reader walks the whole message once and keeps what answering needs
//! (the question as it was sent, the OPT record's fields and its Client
//! Subnet option, a TSIG record's names) and refuses anything malformed:
//! labels or records running past the end, compression pointers in the
//! question, a second OPT or an OPT outside the additional section or not
//! owned by the root, a TSIG that is not the last record, trailing bytes.
//!
//! The writer builds a response section by section and keeps it within a
//! size: see [`Response::finish`]. Owner names point back at the question
//! (RFC 1035 compression), so answers keep the client's case.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::ecs::{ClientSubnet, EcsError};

pub const HEADER_LEN: usize = 12;

/// Record types this server reads or writes.
pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const SOA: u16 = 6;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    pub const TSIG: u16 = 250;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
}

pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;
const EDNS_SUBNET: u16 = 8;

/// Response codes, extended ones included (12 bits).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const NOTAUTH: u16 = 9;
    pub const BADVERS: u16 = 16;
    /// In a TSIG record's error field only.
    pub const BADKEY: u16 = 17;

    pub fn name(rcode: u16) -> &'static str {
        match rcode {
            NOERROR => "NOERROR",
            FORMERR => "FORMERR",
            SERVFAIL => "SERVFAIL",
            NXDOMAIN => "NXDOMAIN",
            NOTIMP => "NOTIMP",
            REFUSED => "REFUSED",
            NOTAUTH => "NOTAUTH",
            BADVERS => "BADVERS",
            _ => "other",
        }
    }
}

/// The name of a query type for metrics (a fixed set, so labels stay few).
pub fn qtype_name(qtype: u16) -> &'static str {
    match qtype {
        rtype::A => "A",
        rtype::NS => "NS",
        rtype::SOA => "SOA",
        rtype::AAAA => "AAAA",
        rtype::ANY => "ANY",
        rtype::AXFR => "AXFR",
        rtype::IXFR => "IXFR",
        15 => "MX",
        16 => "TXT",
        33 => "SRV",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        257 => "CAA",
        _ => "other",
    }
}

const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const CD: u16 = 0x0010;
/// The DO bit of the OPT record's flags (RFC 3225).
pub const DO: u16 = 0x8000;

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    fn read(b: &[u8]) -> Option<Self> {
        let w = |i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
        Some(Self {
            id: w(0)?,
            flags: w(2)?,
            qdcount: w(4)?,
            ancount: w(6)?,
            nscount: w(8)?,
            arcount: w(10)?,
        })
    }
    pub fn is_response(&self) -> bool {
        self.flags & QR != 0
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
}

/// The most labels a 255-byte name can have.
const MAX_LABELS: usize = 127;

/// The question of a query, as sent.
#[derive(Clone, Copy, Debug)]
pub struct Question<'a> {
    /// Name, type and class as they were on the wire (copied into the
    /// response).
    pub wire: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    /// Where each label starts in `wire`.
    label_at: [u8; MAX_LABELS],
    labels: u8,
}

/// A question name as lower-case text without the trailing dot, for
/// lookups: `App.Example.TEST.` is `app.example.test`. Bytes that no
/// configured name can hold (anything but letters, digits, `-` and `_`)
/// are written `#`, so such names exist nowhere but still fall inside
/// their zone. The root is the empty string.
#[derive(Clone, Copy)]
pub struct LowerName {
    buf: [u8; 255],
    len: u8,
    /// Where each label starts in `buf`.
    label_at: [u8; MAX_LABELS],
    labels: u8,
}

impl std::fmt::Debug for LowerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LowerName {
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
    pub fn labels(&self) -> usize {
        usize::from(self.labels)
    }
    /// The name without its first `skip` labels.
    pub fn suffix(&self, skip: usize) -> &str {
        if skip >= self.labels() {
            return "";
        }
        let at = usize::from(self.label_at[skip]);
        self.as_str().get(at..).unwrap_or("")
    }
}

impl<'a> Question<'a> {
    pub fn lower_name(&self) -> LowerName {
        let mut n = LowerName {
            buf: [0; 255],
            len: 0,
            label_at: [0; MAX_LABELS],
            labels: self.labels,
        };
        let mut out = 0usize;
        for l in 0..usize::from(self.labels) {
            let at = usize::from(self.label_at[l]);
            let len = usize::from(self.wire[at]);
            if l > 0 {
                n.buf[out] = b'.';
                out += 1;
            }
            n.label_at[l] = out as u8;
            for &b in &self.wire[at + 1..at + 1 + len] {
                let b = b.to_ascii_lowercase();
                n.buf[out] = if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    b
                } else {
                    b'#'
                };
                out += 1;
            }
        }
        n.len = out as u8;
        n
    }

    /// Number of labels of the question name.
    pub fn labels(&self) -> usize {
        usize::from(self.labels)
    }

    /// Offset, in a response that copies this question right after the
    /// header, of the name without its first `skip` labels: the target of
    /// a compression pointer.
    pub fn offset_of_suffix(&self, skip: usize) -> u16 {
        let at = if skip >= self.labels() {
            self.wire.len() - 5 // the root label
        } else {
            usize::from(self.label_at[skip])
        };
        (HEADER_LEN + at) as u16
    }
}

/// What a query's OPT record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opt {
    /// The requester's UDP payload size.
    pub payload: u16,
    pub version: u8,
    /// The flags (DO is the only one defined).
    pub flags: u16,
    /// The Client Subnet option, if any (checked: see [`crate::ecs`]).
    pub ecs: Option<Result<ClientSubnet, EcsError>>,
}

impl Opt {
    pub fn dnssec_ok(&self) -> bool {
        self.flags & DO != 0
    }
}

/// A name read from the wire (decompressed), kept as wire bytes.
#[derive(Clone, Copy)]
pub struct WireNameBuf {
    buf: [u8; 255],
    len: u8,
}

impl std::fmt::Debug for WireNameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_bytes())
    }
}

impl WireNameBuf {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// What a query's TSIG record says (RFC 8945).
#[derive(Clone, Copy, Debug)]
pub struct Tsig {
    pub key: WireNameBuf,
    pub algorithm: WireNameBuf,
    pub fudge: u16,
    pub original_id: u16,
}

/// A query, read strictly.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    pub header: Header,
    /// The question, when there is exactly one.
    pub question: Option<Question<'a>>,
    pub opt: Option<Opt>,
    pub tsig: Option<Tsig>,
}

/// The outcome of reading a message.
#[derive(Clone, Copy, Debug)]
pub enum Read<'a> {
    /// Not to be answered: shorter than a header, or a response.
    Ignore,
    /// The header is fine but the rest is not: what could be read of it.
    Malformed(Query<'a>),
    Query(Query<'a>),
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    /// Skips a name that may end in a compression pointer.
    fn skip_name(&mut self) -> Option<()> {
        let mut total = 0usize;
        loop {
            let len = *self.take(1)?.first()?;
            match len {
                0 => return Some(()),
                1..=63 => {
                    total += usize::from(len) + 1;
                    if total > 254 {
                        return None;
                    }
                    self.take(usize::from(len))?;
                }
                0xc0..=0xff => {
                    self.take(1)?;
                    return Some(());
                }
                _ => return None, // reserved label types
            }
        }
    }
}

/// Reads the name at `at` in `msg`, following compression pointers, into
/// wire form without pointers. Each pointer must point before itself, and
/// what it points to must end before it, so pointers only ever go
/// backwards and reading always ends.
fn read_name(msg: &[u8], mut at: usize) -> Option<WireNameBuf> {
    let mut out = WireNameBuf { buf: [0; 255], len: 0 };
    let mut len = 0usize;
    // Everything read must lie before this (the last pointer followed).
    let mut limit = msg.len();
    loop {
        if at >= limit {
            return None;
        }
        let l = *msg.get(at)?;
        match l {
            0 => {
                out.buf[len] = 0;
                out.len = (len + 1) as u8;
                return Some(out);
            }
            1..=63 => {
                let l = usize::from(l);
                if len + l + 2 > 255 || at + l + 1 > limit {
                    return None;
                }
                let label = msg.get(at..at + l + 1)?;
                out.buf[len..len + l + 1].copy_from_slice(label);
                len += l + 1;
                at += l + 1;
            }
            0xc0..=0xff => {
                let target = (usize::from(l & 0x3f) << 8) | usize::from(*msg.get(at + 1)?);
                if target >= at {
                    return None; // forward or looping pointer
                }
                limit = at;
                at = target;
            }
            _ => return None,
        }
    }
}

/// Reads a question: labels only (a compression pointer in a query's
/// first name can only point into the header).
fn read_question<'a>(c: &mut Cursor<'a>) -> Option<Question<'a>> {
    let start = c.at;
    let mut label_at = [0u8; MAX_LABELS];
    let mut labels = 0usize;
    loop {
        let len = *c.take(1)?.first()?;
        if len == 0 {
            break;
        }
        if len > 63 || labels == MAX_LABELS {
            return None;
        }
        label_at[labels] = (c.at - 1 - start) as u8;
        labels += 1;
        c.take(usize::from(len))?;
        if c.at - start > 254 {
            return None; // 255 bytes at most, the root label included
        }
    }
    let qtype = c.u16()?;
    let qclass = c.u16()?;
    Some(Question {
        wire: &c.b[start..c.at],
        qtype,
        qclass,
        label_at,
        labels: labels as u8,
    })
}

/// Reads an OPT record; `Err` still carries its fixed fields when the
/// options are malformed (a FORMERR to it keeps an OPT record).
fn read_opt(rdata: &[u8], class: u16, ttl: u32) -> Result<Opt, Opt> {
    let mut opt = Opt {
        payload: class,
        version: (ttl >> 16) as u8,
        flags: ttl as u16,
        ecs: None,
    };
    let mut c = Cursor { b: rdata, at: 0 };
    while c.at < rdata.len() {
        let (Some(code), Some(len)) = (c.u16(), c.u16()) else {
            return Err(Opt { ecs: None, ..opt });
        };
        let Some(data) = c.take(usize::from(len)) else {
            return Err(Opt { ecs: None, ..opt });
        };
        if code == EDNS_SUBNET {
            opt.ecs = Some(match opt.ecs {
                None => ClientSubnet::parse(data),
                Some(_) => Err(EcsError::Repeated),
            });
        }
    }
    Ok(opt)
}

fn read_tsig(msg: &[u8], owner_at: usize, rdata_at: usize, rdata: &[u8]) -> Option<Tsig> {
    let key = read_name(msg, owner_at)?;
    let algorithm = read_name(msg, rdata_at)?;
    let mut c = Cursor { b: rdata, at: 0 };
    let mut skip = Cursor { b: msg, at: rdata_at };
    skip.skip_name()?;
    c.take(skip.at - rdata_at)?;
    c.take(6)?; // time signed
    let fudge = c.u16()?;
    let mac = c.u16()?;
    c.take(usize::from(mac))?;
    let original_id = c.u16()?;
    c.u16()?; // error
    let other = c.u16()?;
    c.take(usize::from(other))?;
    (c.at == rdata.len()).then_some(Tsig {
        key,
        algorithm,
        fudge,
        original_id,
    })
}

/// Reads a message received by a server.
pub fn read(msg: &[u8]) -> Read<'_> {
    let Some(header) = Header::read(msg) else {
        return Read::Ignore;
    };
    if header.is_response() {
        return Read::Ignore; // never answer a response (reflection loops)
    }
    let mut q = Query {
        header,
        question: None,
        opt: None,
        tsig: None,
    };
    match read_body(msg, &mut q) {
        Some(()) => Read::Query(q),
        None => Read::Malformed(q),
    }
}

fn read_body<'a>(msg: &'a [u8], q: &mut Query<'a>) -> Option<()> {
    let h = q.header;
    let mut c = Cursor { b: msg, at: HEADER_LEN };
    for i in 0..h.qdcount {
        let question = read_question(&mut c)?;
        if i == 0 && h.qdcount == 1 {
            q.question = Some(question);
        }
    }
    let total = usize::from(h.ancount) + usize::from(h.nscount) + usize::from(h.arcount);
    let additional_from = usize::from(h.ancount) + usize::from(h.nscount);
    for i in 0..total {
        let owner_at = c.at;
        c.skip_name()?;
        let rtype = c.u16()?;
        let class = c.u16()?;
        let ttl = c.u32()?;
        let rdlen = c.u16()?;
        let rdata_at = c.at;
        let rdata = c.take(usize::from(rdlen))?;
        match rtype {
            rtype::OPT => {
                // Only in the additional section, only once, owned by the root.
                if i < additional_from || q.opt.is_some() || msg[owner_at] != 0 {
                    return None;
                }
                match read_opt(rdata, class, ttl) {
                    Ok(opt) => q.opt = Some(opt),
                    Err(opt) => {
                        q.opt = Some(opt);
                        return None;
                    }
                }
            }
            rtype::TSIG => {
                // Only as the very last record.
                if i + 1 != total || i < additional_from {
                    return None;
                }
                q.tsig = Some(read_tsig(msg, owner_at, rdata_at, rdata)?);
            }
            _ => {}
        }
    }
    (c.at == msg.len()).then_some(())
}

/// A name in a response: relative to a zone's origin (whose position in
/// the message a compression pointer gives), or complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    /// The labels before the origin, in wire form, without the terminator.
    InZone(Vec<u8>),
    /// A name outside the zone, complete, in wire form.
    Absolute(Vec<u8>),
}

impl Name {
    /// `name` (lower case, no trailing dot) as seen from `origin`.
    pub fn new(name: &str, origin: &str) -> Option<Self> {
        let relative = if name == origin {
            Some("")
        } else {
            name.strip_suffix(origin).and_then(|r| r.strip_suffix('.'))
        };
        let encode = |s: &str, out: &mut Vec<u8>| -> Option<()> {
            for label in s.split('.').filter(|l| !l.is_empty()) {
                let len = u8::try_from(label.len()).ok().filter(|&l| l <= 63)?;
                out.push(len);
                out.extend_from_slice(label.as_bytes());
            }
            Some(())
        };
        let mut out = Vec::new();
        match relative {
            Some(rel) => {
                encode(rel, &mut out)?;
                Some(Self::InZone(out))
            }
            None => {
                encode(name, &mut out)?;
                out.push(0);
                (out.len() <= 255).then_some(Self::Absolute(out))
            }
        }
    }
}

/// The fixed-size parts of a response that the writer must fit after the
/// records: the OPT record and a TSIG error record.
#[derive(Clone, Copy, Debug)]
pub struct Trailer<'q> {
    pub opt: Option<OptOut>,
    pub tsig: Option<(&'q Tsig, u64)>,
}

/// The OPT record of a response.
#[derive(Clone, Copy, Debug)]
pub struct OptOut {
    /// The server's own UDP payload size.
    pub payload: u16,
    /// The DO bit, copied from the query (RFC 3225).
    pub dnssec_ok: bool,
    /// The Client Subnet option to echo, its scope set.
    pub ecs: Option<ClientSubnet>,
}

impl Trailer<'_> {
    pub fn wire_len(&self) -> usize {
        let opt = self.opt.map_or(0, |o| 11 + o.ecs.map_or(0, |e| 4 + e.wire_len()));
        let tsig = self.tsig.map_or(0, |(t, _)| {
            t.key.as_bytes().len() + 10 + t.algorithm.as_bytes().len() + 16
        });
        opt + tsig
    }
}

/// A response being written into a buffer.
#[derive(Debug)]
pub struct Response<'b> {
    buf: &'b mut Vec<u8>,
    flags: u16,
    counts: [u16; 4],
    question_end: usize,
    /// Bytes the records may use (the size limit less the trailer).
    room: usize,
    rcode: u16,
    /// An answer or authority record did not fit: the response goes out
    /// truncated.
    overflow: bool,
}

/// Which section a record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Answer = 1,
    Authority = 2,
    Additional = 3,
}

/// Where a record's owner name is.
#[derive(Clone, Copy, Debug)]
pub enum Owner<'n> {
    /// At this offset in the message (a compression pointer).
    At(u16),
    /// This name, relative to the origin at that offset.
    Name(&'n Name, u16),
}

impl<'b> Response<'b> {
    /// Starts a response to `header` in `buf` (cleared): `rcode` (extended
    /// codes go in the OPT record), `aa`, and RD and CD copied when
    /// `echo_rd_cd` (they mean something only for QUERY).
    pub fn new(buf: &'b mut Vec<u8>, header: &Header, rcode: u16, aa: bool, echo_rd_cd: bool) -> Self {
        buf.clear();
        let mut flags = QR | (header.flags & 0x7800) | (rcode & 0xf);
        if aa {
            flags |= AA;
        }
        if echo_rd_cd {
            flags |= header.flags & (RD | CD);
        }
        buf.extend_from_slice(&[0; HEADER_LEN]);
        buf[0..2].copy_from_slice(&header.id.to_be_bytes());
        Self {
            buf,
            flags,
            counts: [0; 4],
            question_end: HEADER_LEN,
            room: usize::MAX,
            rcode,
            overflow: false,
        }
    }

    /// Copies the question (only right after the header).
    pub fn question(&mut self, q: &Question<'_>) {
        debug_assert_eq!(self.buf.len(), HEADER_LEN);
        self.buf.extend_from_slice(q.wire);
        self.counts[0] = 1;
        self.question_end = self.buf.len();
    }

    /// Sets the size the message must keep to, given what `trailer` will
    /// need at the end.
    pub fn limit(&mut self, limit: usize, trailer: &Trailer<'_>) {
        self.room = limit.saturating_sub(trailer.wire_len());
    }

    fn owner(&mut self, owner: Owner<'_>) {
        match owner {
            Owner::At(at) => self.buf.extend_from_slice(&(0xc000 | at).to_be_bytes()),
            Owner::Name(name, origin) => self.name(name, origin),
        }
    }

    fn name(&mut self, name: &Name, origin: u16) {
        match name {
            Name::InZone(labels) => {
                self.buf.extend_from_slice(labels);
                self.buf.extend_from_slice(&(0xc000 | origin).to_be_bytes());
            }
            Name::Absolute(wire) => self.buf.extend_from_slice(wire),
        }
    }

    /// Writes one record; false when it did not fit. An answer or
    /// authority record that does not fit makes the whole response
    /// truncated (see [`Self::finish`]); additional data is just left out
    /// (RFC 2181 9).
    fn record(
        &mut self,
        section: Section,
        owner: Owner<'_>,
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Self),
    ) -> bool {
        if self.overflow {
            return false;
        }
        let start = self.buf.len();
        self.owner(owner);
        self.buf.extend_from_slice(&rtype.to_be_bytes());
        self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        rdata(self);
        let rdlen = self.buf.len() - len_at - 2;
        self.buf[len_at..len_at + 2].copy_from_slice(&(rdlen as u16).to_be_bytes());
        if self.buf.len() > self.room {
            // Never a partial record: take it back.
            self.buf.truncate(start);
            self.overflow |= section != Section::Additional;
            return false;
        }
        self.counts[section as usize] += 1;
        true
    }

    pub fn a(&mut self, section: Section, owner: Owner<'_>, ttl: u32, ip: Ipv4Addr) -> bool {
        self.record(section, owner, rtype::A, ttl, |r| r.buf.extend_from_slice(&ip.octets()))
    }

    pub fn aaaa(&mut self, section: Section, owner: Owner<'_>, ttl: u32, ip: Ipv6Addr) -> bool {
        self.record(section, owner, rtype::AAAA, ttl, |r| {
            r.buf.extend_from_slice(&ip.octets())
        })
    }

    pub fn ns(&mut self, owner: Owner<'_>, ttl: u32, target: &Name, origin: u16) -> bool {
        self.record(Section::Answer, owner, rtype::NS, ttl, |r| r.name(target, origin))
    }

    pub fn soa(&mut self, section: Section, owner: Owner<'_>, ttl: u32, soa: &Soa, origin: u16) -> bool {
        self.record(section, owner, rtype::SOA, ttl, |r| {
            r.name(&soa.mname, origin);
            r.name(&soa.rname, origin);
            for v in [soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum] {
                r.buf.extend_from_slice(&v.to_be_bytes());
            }
        })
    }

    /// Whether every answer and authority record written so far fit.
    pub fn fits(&self) -> bool {
        !self.overflow
    }

    /// Drops every record and sets TC: what is left is the header, the
    /// question and (at [`Self::finish`]) the OPT record, as NSD and Knot
    /// send when an answer does not fit.
    pub fn truncate(&mut self) {
        self.overflow = true;
        self.buf.truncate(self.question_end);
        self.counts[1..].fill(0);
        self.flags |= TC;
    }

    /// Writes the OPT and TSIG records and the header, and returns the
    /// message length. A response whose answer or authority section did
    /// not fit is sent truncated: header with TC, question, OPT.
    pub fn finish(mut self, trailer: &Trailer<'_>) -> usize {
        if self.overflow {
            self.truncate();
        }
        if let Some(o) = trailer.opt {
            let ext = ((self.rcode >> 4) & 0xff) as u32;
            let ttl = (ext << 24) | if o.dnssec_ok { u32::from(DO) } else { 0 };
            self.buf.push(0); // root
            self.buf.extend_from_slice(&rtype::OPT.to_be_bytes());
            self.buf.extend_from_slice(&o.payload.to_be_bytes());
            self.buf.extend_from_slice(&ttl.to_be_bytes());
            match o.ecs {
                Some(ecs) => {
                    let len = ecs.wire_len();
                    self.buf.extend_from_slice(&(len as u16 + 4).to_be_bytes());
                    self.buf.extend_from_slice(&EDNS_SUBNET.to_be_bytes());
                    self.buf.extend_from_slice(&(len as u16).to_be_bytes());
                    ecs.write(self.buf);
                }
                None => self.buf.extend_from_slice(&[0, 0]),
            }
            self.counts[3] += 1;
        }
        if let Some((t, now)) = trailer.tsig {
            // RFC 8945 5.3.2: unsigned, MAC empty, the error in the record.
            self.buf.extend_from_slice(t.key.as_bytes());
            self.buf.extend_from_slice(&rtype::TSIG.to_be_bytes());
            self.buf.extend_from_slice(&CLASS_ANY.to_be_bytes());
            self.buf.extend_from_slice(&0u32.to_be_bytes());
            let alg = t.algorithm.as_bytes();
            self.buf.extend_from_slice(&((alg.len() + 16) as u16).to_be_bytes());
            self.buf.extend_from_slice(alg);
            self.buf.extend_from_slice(&now.to_be_bytes()[2..]); // 48 bits
            self.buf.extend_from_slice(&t.fudge.to_be_bytes());
            self.buf.extend_from_slice(&0u16.to_be_bytes()); // MAC size
            self.buf.extend_from_slice(&t.original_id.to_be_bytes());
            self.buf.extend_from_slice(&rcode::BADKEY.to_be_bytes());
            self.buf.extend_from_slice(&0u16.to_be_bytes()); // other len
            self.counts[3] += 1;
        }
        self.buf[2..4].copy_from_slice(&self.flags.to_be_bytes());
        for (i, c) in self.counts.iter().enumerate() {
            self.buf[4 + 2 * i..6 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        self.buf.len()
    }
}

/// A zone's SOA data, names relative to its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Soa {
    pub mname: Name,
    pub rname: Name,
    pub serial: u32,
    pub refresh: u32,
    pub retry: u32,
    pub expire: u32,
    pub minimum: u32,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` (wire form) and `qtype`, ID 0x1234, RD, with
    /// `additional` records (`arcount` of them) after the question.
    pub(crate) fn query(name: &[u8], qtype: u16, additional: &[u8], arcount: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, arcount as u8];
        m.extend_from_slice(name);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(additional);
        m
    }

    const NAME: &[u8] = b"\x03App\x07Example\x04test\x00";

    /// An OPT record: `payload` size, `flags` (DO is 0x8000), `options`.
    pub(crate) fn opt(payload: u16, flags: u16, options: &[u8]) -> Vec<u8> {
        let mut o = vec![0, 0, 41];
        o.extend_from_slice(&payload.to_be_bytes());
        o.extend_from_slice(&[0, 0]);
        o.extend_from_slice(&flags.to_be_bytes());
        o.extend_from_slice(&(options.len() as u16).to_be_bytes());
        o.extend_from_slice(options);
        o
    }

    #[test]
    fn reads_a_query_with_opt_and_lower_cases_its_name() {
        let m = query(NAME, rtype::A, &opt(1232, DO, &[0, 100, 0, 0]), 1);
        let Read::Query(q) = read(&m) else { panic!("not read") };
        let question = q.question.expect("question");
        let name = question.lower_name();
        assert_eq!(name.as_str(), "app.example.test");
        assert_eq!(
            (name.suffix(1), name.suffix(2), name.suffix(3)),
            ("example.test", "test", "")
        );
        assert_eq!(question.offset_of_suffix(1), 12 + 4);
        let o = q.opt.expect("opt");
        assert_eq!((o.payload, o.version, o.dnssec_ok(), o.ecs), (1232, 0, true, None));
    }

    #[test]
    fn odd_bytes_in_labels_cannot_match_a_configured_name() {
        let m = query(b"\x03a.b\x04t\xc3st\x00", rtype::A, &[], 0);
        let Read::Query(q) = read(&m) else { panic!("not read") };
        assert_eq!(q.question.expect("q").lower_name().as_str(), "a#b.t#st");
    }

    #[test]
    fn malformed_messages_are_refused_but_keep_what_was_read() {
        let good = query(NAME, rtype::A, &opt(1232, 0, &[]), 1);
        assert!(matches!(read(&good[..11]), Read::Ignore));
        let mut response = good.clone();
        response[2] |= 0x80;
        assert!(matches!(read(&response), Read::Ignore));
        // Truncated anywhere after the header.
        for cut in HEADER_LEN..good.len() {
            assert!(matches!(read(&good[..cut]), Read::Malformed(_)), "cut at {cut}");
        }
        // Trailing bytes.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(read(&trailing), Read::Malformed(q) if q.opt.is_some()));
        // Two OPT records.
        let mut two = query(NAME, rtype::A, &opt(1232, 0, &[]), 2);
        two.extend_from_slice(&opt(1232, 0, &[]));
        assert!(matches!(read(&two), Read::Malformed(_)));
        // An OPT owned by another name than the root.
        let mut owned = opt(1232, 0, &[]);
        owned.splice(0..1, [1, b'x', 0]);
        assert!(matches!(read(&query(NAME, rtype::A, &owned, 1)), Read::Malformed(_)));
        // An option running past the record.
        assert!(matches!(
            read(&query(NAME, rtype::A, &opt(1232, 0, &[0, 8, 0, 9, 0]), 1)),
            Read::Malformed(_)
        ));
        // A compression pointer in the question.
        assert!(matches!(
            read(&query(b"\xc0\x0c", rtype::A, &[], 0)),
            Read::Malformed(_)
        ));
        // A label over 63 bytes.
        let mut long = vec![64u8];
        long.extend_from_slice(&[b'a'; 64]);
        long.push(0);
        assert!(matches!(read(&query(&long, rtype::A, &[], 0)), Read::Malformed(_)));
    }

    #[test]
    fn names_longer_than_255_bytes_are_malformed() {
        let name = |last: usize| {
            let mut n = Vec::new();
            for _ in 0..3 {
                n.push(63);
                n.extend_from_slice(&[b'a'; 63]);
            }
            n.push(last as u8);
            n.extend_from_slice(&vec![b'b'; last]);
            n.push(0);
            n
        };
        assert_eq!(name(61).len(), 255);
        let longest = query(&name(61), rtype::A, &[], 0);
        let Read::Query(q) = read(&longest) else {
            panic!("255 bytes is the most a name may have")
        };
        assert_eq!(q.question.expect("q").lower_name().as_str().len(), 253);
        assert!(matches!(read(&query(&name(62), rtype::A, &[], 0)), Read::Malformed(_)));
    }

    #[test]
    fn reads_tsig_names_through_compression_pointers() {
        // Key name "k." then TSIG with algorithm as a pointer to the key.
        let mut t = vec![1, b'k', 0];
        t.extend_from_slice(&rtype::TSIG.to_be_bytes());
        t.extend_from_slice(&CLASS_ANY.to_be_bytes());
        t.extend_from_slice(&[0; 4]);
        let mut rdata = Vec::new();
        let key_at = (HEADER_LEN + NAME.len() + 4) as u16;
        rdata.extend_from_slice(&(0xc000 | key_at).to_be_bytes());
        rdata.extend_from_slice(&[0, 0, 0x65, 0x43, 0x21, 0x00]); // time
        rdata.extend_from_slice(&300u16.to_be_bytes());
        rdata.extend_from_slice(&[0, 2, 0xaa, 0xbb]); // MAC
        rdata.extend_from_slice(&0x1234u16.to_be_bytes());
        rdata.extend_from_slice(&[0, 0, 0, 0]);
        t.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        t.extend_from_slice(&rdata);
        let m = query(NAME, rtype::A, &t, 1);
        let Read::Query(q) = read(&m) else { panic!("not read") };
        let tsig = q.tsig.expect("tsig");
        assert_eq!(tsig.key.as_bytes(), b"\x01k\x00");
        assert_eq!(tsig.algorithm.as_bytes(), b"\x01k\x00");
        assert_eq!((tsig.fudge, tsig.original_id), (300, 0x1234));
        // A TSIG that is not last.
        let mut m2 = query(NAME, rtype::A, &t, 2);
        m2.extend_from_slice(&opt(1232, 0, &[]));
        assert!(matches!(read(&m2), Read::Malformed(_)));
    }

    #[test]
    fn never_a_partial_record_and_truncation_keeps_the_question() {
        let m = query(NAME, rtype::A, &[], 0);
        let Read::Query(q) = read(&m) else { panic!("not read") };
        let question = q.question.expect("q");
        let mut buf = Vec::new();
        let mut r = Response::new(&mut buf, &q.header, rcode::NOERROR, true, true);
        r.question(&question);
        let trailer = Trailer { opt: None, tsig: None };
        r.limit(HEADER_LEN + question.wire.len() + 2 * 16 + 8, &trailer);
        assert!(r.a(Section::Answer, Owner::At(12), 30, Ipv4Addr::LOCALHOST));
        assert!(r.a(Section::Answer, Owner::At(12), 30, Ipv4Addr::LOCALHOST));
        assert!(r.fits());
        assert!(
            !r.a(Section::Additional, Owner::At(12), 30, Ipv4Addr::LOCALHOST),
            "additional data that does not fit"
        );
        assert!(r.fits(), "is left out");
        let len = r.finish(&trailer);
        assert_eq!(len, HEADER_LEN + question.wire.len() + 32);
        assert_eq!(
            &buf[2..12],
            &[0x85, 0x00, 0, 1, 0, 2, 0, 0, 0, 0],
            "aa rd, no tc, 2 answers"
        );
        let mut buf = Vec::new();
        let mut r = Response::new(&mut buf, &q.header, rcode::NOERROR, true, true);
        r.question(&question);
        r.limit(HEADER_LEN + question.wire.len() + 16 + 8, &trailer);
        assert!(r.a(Section::Answer, Owner::At(12), 30, Ipv4Addr::LOCALHOST));
        assert!(!r.a(Section::Answer, Owner::At(12), 30, Ipv4Addr::LOCALHOST));
        assert!(!r.fits());
        r.finish(&trailer);
        assert_eq!(buf.len(), HEADER_LEN + question.wire.len());
        assert_eq!(buf[2] & 0x02, 0x02, "TC");
        assert_eq!(&buf[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn names_relative_to_the_origin() {
        assert_eq!(
            Name::new("ns1.example.test", "example.test"),
            Some(Name::InZone(b"\x03ns1".to_vec()))
        );
        assert_eq!(
            Name::new("example.test", "example.test"),
            Some(Name::InZone(Vec::new()))
        );
        assert_eq!(
            Name::new("ns.other.net", "example.test"),
            Some(Name::Absolute(b"\x02ns\x05other\x03net\x00".to_vec()))
        );
        assert_eq!(
            Name::new("xexample.test", "example.test"),
            Some(Name::Absolute(b"\x08xexample\x04test\x00".to_vec()))
        );
    }
}
