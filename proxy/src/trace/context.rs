//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` header, read strictly and written. Pure: no I/O, no
//! allocation; bad input is `None`, never a panic.

use std::fmt;

/// A `traceparent` value: which trace, which span is the parent, and
/// whether the caller recorded it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span (for the next hop: this hop's span).
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

/// Length of a version-00 value: `00-` 32 hex `-` 16 hex `-` 2 hex.
pub const TRACEPARENT_LEN: usize = 55;

impl TraceParent {
    /// Parses a `traceparent` header value as the specification asks:
    /// version 00 is exactly 55 characters; a later version (01 to fe) is
    /// read for its version-00 fields and may carry more after a `-`;
    /// version ff is invalid. Every hex digit must be lowercase, the trace
    /// id and the parent id must not be all zeros.
    pub fn parse(v: &[u8]) -> Option<Self> {
        if v.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_byte(v[0], v[1])?;
        match version {
            0xff => return None,
            0 if v.len() != TRACEPARENT_LEN => return None,
            0 => {}
            _ if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' => return None,
            _ => {}
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(v[3 + 2 * i], v[4 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(v[36 + 2 * i], v[37 + 2 * i])?;
        }
        let flags = hex_byte(v[53], v[54])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The version-00 header value (flags: only `sampled` is set).
    pub fn to_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [0u8; TRACEPARENT_LEN];
        out[..3].copy_from_slice(b"00-");
        for (i, b) in self.trace_id.iter().enumerate() {
            [out[3 + 2 * i], out[4 + 2 * i]] = hex(*b);
        }
        out[35] = b'-';
        for (i, b) in self.parent_id.iter().enumerate() {
            [out[36 + 2 * i], out[37 + 2 * i]] = hex(*b);
        }
        out[52] = b'-';
        [out[53], out[54]] = hex(u8::from(self.sampled));
        out
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.to_bytes()).unwrap_or("?"))
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some(nibble(hi)? << 4 | nibble(lo)?)
}

fn hex(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specification_example() {
        let tp = TraceParent::parse(GOOD.as_bytes()).expect("valid");
        assert_eq!(tp.trace_id[..4], [0x4b, 0xf9, 0x2f, 0x35]);
        assert_eq!(tp.parent_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(tp.sampled);
        assert_eq!(&tp.to_bytes()[..], GOOD.as_bytes());
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!TraceParent::parse(unsampled.as_bytes()).expect("valid").sampled);
        // Unknown flags are read for `sampled` only, and not passed on.
        let flags = GOOD.replace("-01", "-03");
        let tp = TraceParent::parse(flags.as_bytes()).expect("valid");
        assert!(tp.sampled);
        assert!(tp.to_bytes().ends_with(b"-01"));
    }

    #[test]
    fn what_is_refused() {
        let bad = [
            "",
            "00",
            &GOOD[..54],
            &format!("{GOOD}0"),
            &format!("{GOOD}-extra"), // version 00 has nothing after the flags
            &GOOD.to_uppercase(),
            &GOOD.replace("4bf9", "4BF9"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            &GOOD.replacen("00-", "ff-", 1),
            &GOOD.replacen("00-", "0g-", 1),
            &GOOD.replace('-', "_"),
            &GOOD.replace("-01", "-1x"),
            &GOOD.replace("4736-", "473-6"),
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{0}",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceParent::parse(b.as_bytes()), None, "{b:?}");
        }
    }

    #[test]
    fn later_versions_are_read_for_their_version_00_fields() {
        let v1 = GOOD.replacen("00-", "01-", 1);
        assert!(TraceParent::parse(v1.as_bytes()).is_some());
        assert!(TraceParent::parse(format!("{v1}-what-comes-next").as_bytes()).is_some());
        assert_eq!(TraceParent::parse(format!("{v1}x").as_bytes()), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(tp) = TraceParent::parse(&v) {
                prop_assert_ne!(tp.trace_id, [0; 16]);
                prop_assert_ne!(tp.parent_id, [0; 8]);
            }
        }

        #[test]
        fn written_values_read_back(trace_id in any::<[u8; 16]>(), parent_id in any::<[u8; 8]>(), sampled in any::<bool>()) {
            let tp = TraceParent { trace_id, parent_id, sampled };
            let back = TraceParent::parse(&tp.to_bytes());
            if trace_id == [0; 16] || parent_id == [0; 8] {
                prop_assert_eq!(back, None);
            } else {
                prop_assert_eq!(back, Some(tp));
            }
        }

        #[test]
        fn one_changed_character_is_read_or_refused_never_misread(pos in 0..TRACEPARENT_LEN, c in any::<u8>()) {
            let mut v = GOOD.as_bytes().to_vec();
            v[pos] = c;
            if let Some(tp) = TraceParent::parse(&v) {
                // Whatever was read is what the bytes say: writing it back
                // gives them again (up to the flags' unknown bits and a
                // version other than 00).
                let w = tp.to_bytes();
                prop_assert_eq!(&w[3..53], &v[3..53]);
            }
        }
    }
}
