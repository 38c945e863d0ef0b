//! Signed sticky-session tokens.
//!
//! A token names a cell and an expiry and is signed with HMAC-SHA256 under
//! the edge fleet's shared secret, bound to the service so a cookie of one
//! service cannot steer another. Cookie form:
//! `<cell id>:<expiry, unix seconds>:<base64url of the first 16 MAC bytes>`.
//! Anything that does not verify — tampered, expired, truncated, garbage —
//! is simply not a token: [`StickyKey::verify`] returns `None`, never an
//! error, and the request is routed as if it had none.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use cellgate_config::CellId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

use crate::Timestamp;

type HmacSha256 = Hmac<Sha256>;
const MAC_LEN: usize = 16;

/// The secret that signs and verifies sticky tokens.
#[derive(Clone)]
pub struct StickyKey {
    mac: HmacSha256,
}

impl fmt::Debug for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StickyKey(..)")
    }
}

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyToken {
    pub cell: CellId,
    pub expires: Timestamp,
}

impl StickyKey {
    /// Any secret length works; use at least 32 random bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            // HMAC accepts keys of any length.
            mac: <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!()),
        }
    }

    fn tag(&self, service: &str, cell: &str, expiry_secs: u64) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(b"cellgate-sticky-v1\0");
        mac.update(service.as_bytes());
        mac.update(b"\0");
        mac.update(cell.as_bytes());
        mac.update(b"\0");
        mac.update(&expiry_secs.to_be_bytes());
        mac
    }

    /// The cookie value for `cell` of `service`, valid until `expires`.
    pub fn sign(&self, service: &str, cell: &CellId, expires: Timestamp) -> String {
        let secs = expires.as_unix_secs();
        let tag = self.tag(service, cell.as_str(), secs).finalize().into_bytes();
        format!("{cell}:{secs}:{}", URL_SAFE_NO_PAD.encode(&tag[..MAC_LEN]))
    }

    /// The token in `value` if it is authentic for `service` and unexpired
    /// at `now`.
    pub fn verify(&self, service: &str, value: &str, now: Timestamp) -> Option<StickyToken> {
        let mut parts = value.splitn(3, ':');
        let cell = parts.next()?;
        let secs_str = parts.next()?;
        let mac_b64 = parts.next()?;
        if cell.is_empty() || mac_b64.len() != 22 || secs_str.len() > 12 {
            return None;
        }
        let secs: u64 = secs_str.parse().ok()?;
        // Reject non-canonical numbers ("+5", "007") so one token has one form.
        if secs.to_string() != secs_str {
            return None;
        }
        let mut tag = [0u8; MAC_LEN + 2];
        let n = URL_SAFE_NO_PAD.decode_slice(mac_b64, &mut tag).ok()?;
        if n != MAC_LEN {
            return None;
        }
        self.tag(service, cell, secs)
            .verify_truncated_left(&tag[..MAC_LEN])
            .ok()?;
        let expires = Timestamp::from_unix_millis(secs.checked_mul(1000)?);
        (now < expires).then(|| StickyToken {
            cell: CellId::new(cell),
            expires,
        })
    }
}
