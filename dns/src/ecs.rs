//! EDNS Client Subnet (RFC 7871): reading the option strictly, and the
//! scope an answer is echoed with.
//!
//! # Scope rules
//!
//! The scope prefix tells a resolver for how large a network around the
//! client it may reuse an answer. cellgate sets it from what decided the
//! answer:
//!
//! * an answer that does not depend on where the client is (the `latency`
//!   and `failover` policies without residency rules, SOA, NS, NODATA,
//!   NXDOMAIN, errors): scope 0, valid for everyone;
//! * an answer that depends on the client's location (`geo`, or residency
//!   rules): the prefix length of the largest network around the query's
//!   address (as given) that the CIDR table and the geo database answer
//!   alike, found or not found. It may be longer than the query's source
//!   prefix (RFC 7871 7.2.1 allows that, and the resolver then sends more
//!   bits), and it is never shorter than the data allows: a /24 the data
//!   splits into /25s gets /25;
//! * `weighted`: at least the /24 (IPv4) or /56 (IPv6) that seeds the
//!   choice;
//! * a source prefix of 0 (the client asks not to be located by it): 0.
//!
//! An IPv4-mapped IPv6 address is located as IPv4 but keeps an IPv6 scope
//! (96 + the IPv4 prefix), since the option's family is IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an option is refused (the query gets FORMERR; the option is never
/// echoed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EcsError {
    #[error("shorter than its fixed fields")]
    Short,
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("source prefix {0} is longer than the address")]
    SourcePrefix(u8),
    #[error("a query must carry scope prefix 0, not {0}")]
    Scope(u8),
    #[error("{got} address octets for a source prefix that needs {want}")]
    AddressLength { got: usize, want: usize },
    #[error("address bits set beyond the source prefix")]
    AddressBits,
    #[error("the option appears more than once")]
    Repeated,
}

/// A Client Subnet option that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSubnet {
    /// The address as sent, padded with zero bits (an IPv4 address for
    /// family 1, IPv6 for family 2, IPv4-mapped ones included).
    pub addr: IpAddr,
    pub source_prefix: u8,
    pub scope_prefix: u8,
}

impl ClientSubnet {
    /// Reads the option's data (RFC 7871 6): FAMILY, SOURCE PREFIX-LENGTH,
    /// SCOPE PREFIX-LENGTH (0 in queries), ADDRESS truncated to exactly the
    /// octets the source prefix needs, with no bits set beyond it.
    pub fn parse(data: &[u8]) -> Result<Self, EcsError> {
        let [f0, f1, source, scope, address @ ..] = data else {
            return Err(EcsError::Short);
        };
        let family = u16::from_be_bytes([*f0, *f1]);
        let max = match family {
            1 => 32,
            2 => 128,
            other => return Err(EcsError::Family(other)),
        };
        if *source > max {
            return Err(EcsError::SourcePrefix(*source));
        }
        if *scope != 0 {
            return Err(EcsError::Scope(*scope));
        }
        let want = usize::from(source.div_ceil(8));
        if address.len() != want {
            return Err(EcsError::AddressLength {
                got: address.len(),
                want,
            });
        }
        if let Some(&last) = address.last() {
            let used = source - 8 * (want as u8 - 1);
            if last & (0xffu8.checked_shr(u32::from(used)).unwrap_or(0)) != 0 {
                return Err(EcsError::AddressBits);
            }
        }
        let mut octets = [0u8; 16];
        octets[..want].copy_from_slice(address);
        let addr = if family == 1 {
            IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        Ok(Self {
            addr,
            source_prefix: *source,
            scope_prefix: 0,
        })
    }

    fn address_octets(&self) -> usize {
        usize::from(self.source_prefix.div_ceil(8))
    }

    /// Bytes of the option's data on the wire.
    pub fn wire_len(&self) -> usize {
        4 + self.address_octets()
    }

    /// Appends the option's data: what the query sent, with this scope.
    pub fn write(&self, out: &mut Vec<u8>) {
        let (family, octets) = match self.addr {
            IpAddr::V4(v4) => {
                let mut o = [0u8; 16];
                o[..4].copy_from_slice(&v4.octets());
                (1u16, o)
            }
            IpAddr::V6(v6) => (2u16, v6.octets()),
        };
        out.extend_from_slice(&family.to_be_bytes());
        out.push(self.source_prefix);
        out.push(self.scope_prefix);
        out.extend_from_slice(&octets[..self.address_octets()]);
    }

    pub fn with_scope(self, scope_prefix: u8) -> Self {
        Self { scope_prefix, ..self }
    }

    /// Whether the option's address is IPv4-mapped IPv6.
    pub fn is_v4_mapped(&self) -> bool {
        matches!(self.addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
    }
}

/// The scope prefix for the `weighted` policy, whose choice is seeded per
/// network of this size; in `addr`'s family (IPv4-mapped: IPv6 terms).
pub fn weighted_scope(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => crate::handler::WEIGHTED_V4_PREFIX,
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 96 + crate::handler::WEIGHTED_V4_PREFIX,
        IpAddr::V6(_) => crate::handler::WEIGHTED_V6_PREFIX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_options() {
        let s = ClientSubnet::parse(&[0, 1, 24, 0, 203, 0, 113]).expect("valid");
        assert_eq!((s.addr, s.source_prefix), ("203.0.113.0".parse().expect("ip"), 24));
        let s = ClientSubnet::parse(&[0, 1, 0, 0]).expect("/0 has no address octets");
        assert_eq!(s.addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let s = ClientSubnet::parse(&[0, 1, 25, 0, 203, 0, 113, 128]).expect("/25");
        assert_eq!(s.addr, "203.0.113.128".parse::<IpAddr>().expect("ip"));
        let s = ClientSubnet::parse(&[0, 2, 48, 0, 0x20, 0x01, 0x0d, 0xb8, 0, 0xab]).expect("v6");
        assert_eq!(s.addr, "2001:db8:ab::".parse::<IpAddr>().expect("ip"));
        let mapped = [0, 2, 120, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113];
        assert!(ClientSubnet::parse(&mapped).expect("mapped").is_v4_mapped());
        let mut out = Vec::new();
        s.with_scope(32).write(&mut out);
        assert_eq!(out, [0, 2, 48, 32, 0x20, 0x01, 0x0d, 0xb8, 0, 0xab]);
    }

    #[test]
    fn invalid_options_name_what_is_wrong() {
        for (data, err) in [
            (&[0u8, 1, 24][..], EcsError::Short),
            (&[0, 3, 24, 0, 1, 2, 3], EcsError::Family(3)),
            (&[0, 1, 33, 0, 1, 2, 3, 4, 5], EcsError::SourcePrefix(33)),
            (&[0, 1, 24, 16, 203, 0, 113], EcsError::Scope(16)),
            (
                &[0, 1, 24, 0, 203, 0, 113, 0],
                EcsError::AddressLength { got: 4, want: 3 },
            ),
            (&[0, 1, 24, 0, 203, 0], EcsError::AddressLength { got: 2, want: 3 }),
            (&[0, 1, 0, 0, 0], EcsError::AddressLength { got: 1, want: 0 }),
            (&[0, 1, 23, 0, 203, 0, 113], EcsError::AddressBits),
            (&[0, 1, 20, 0, 203, 0, 0x18], EcsError::AddressBits),
            (&[0, 2, 129, 0], EcsError::SourcePrefix(129)),
        ] {
            assert_eq!(ClientSubnet::parse(data), Err(err), "{data:?}");
        }
    }

    #[test]
    fn scope_for_weighted_is_in_the_family_of_the_option() {
        assert_eq!(weighted_scope("192.0.2.0".parse().expect("ip")), 24);
        assert_eq!(weighted_scope("::ffff:192.0.2.0".parse().expect("ip")), 120);
        assert_eq!(weighted_scope("2001:db8::".parse().expect("ip")), 56);
    }
}
