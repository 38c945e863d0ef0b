//! The hand-off protocol on the wire: framed JSON messages over a Unix
//! stream socket, the offer carrying the descriptors as `SCM_RIGHTS`.
//!
//! ```text
//! frame   = magic "CGHO" | version u16 BE | length u32 BE | body (JSON, `length` bytes)
//! ```
//!
//! Conversation (old process = the one serving, new = started with `--upgrade`):
//!
//! ```text
//! old → new   offer     {pid, build, sockets: [{name, kind, local}]} + SCM_RIGHTS fds
//! new → old   accepted  {pid, sockets}         | rejected {reason}
//! new → old   ready     {pid}                  | aborted {reason}   | (closes: died)
//! old → new   released  {grace_period_ms}      | cancelled {reason}
//! ```

use std::{
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::{io::Interest, net::UnixStream};

use crate::{socket::SocketKind, ProtocolError, SocketName, MAX_SOCKETS};

/// The version of the hand-off protocol this build speaks. Both processes
/// must speak the same one; a mismatch is rejected before any socket is
/// used, and the old process keeps serving.
pub const PROTOCOL_VERSION: u16 = 1;

pub(crate) const MAGIC: [u8; 4] = *b"CGHO";
pub(crate) const PREAMBLE_LEN: usize = 10;
/// Far more than [`MAX_SOCKETS`] declarations need.
pub(crate) const MAX_BODY: u32 = 256 * 1024;

/// One socket as the offer declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Declared {
    pub name: SocketName,
    pub kind: SocketKind,
    pub local: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Message {
    Offer {
        pid: u32,
        /// The sender's build, for the log.
        build: String,
        sockets: Vec<Declared>,
    },
    Accepted {
        pid: u32,
        sockets: usize,
    },
    Rejected {
        reason: String,
    },
    Ready {
        pid: u32,
    },
    Aborted {
        reason: String,
    },
    Released {
        grace_period_ms: u64,
    },
    Cancelled {
        reason: String,
    },
}

impl Message {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Offer { .. } => "offer",
            Self::Accepted { .. } => "accepted",
            Self::Rejected { .. } => "rejected",
            Self::Ready { .. } => "ready",
            Self::Aborted { .. } => "aborted",
            Self::Released { .. } => "released",
            Self::Cancelled { .. } => "cancelled",
        }
    }
}

/// A whole frame, ready to send.
pub(crate) fn encode(message: &Message) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let body = serde_json::to_vec(message).unwrap_or_default();
    let mut frame = Vec::with_capacity(PREAMBLE_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Checks a preamble and returns the body length.
pub fn decode_preamble(preamble: &[u8; PREAMBLE_LEN]) -> Result<u32, ProtocolError> {
    let magic = [preamble[0], preamble[1], preamble[2], preamble[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_be_bytes([preamble[4], preamble[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let len = u32::from_be_bytes([preamble[6], preamble[7], preamble[8], preamble[9]]);
    if len > MAX_BODY {
        return Err(ProtocolError::TooLarge { len, max: MAX_BODY });
    }
    Ok(len)
}

pub(crate) fn decode_body(body: &[u8]) -> Result<Message, ProtocolError> {
    serde_json::from_slice(body).map_err(|e| ProtocolError::Body(e.to_string()))
}

/// Why reading a frame stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection (before or inside a frame).
    Closed,
    Io(std::io::Error),
    Protocol(ProtocolError),
}

/// Sends one frame, with `fds` attached to its first byte.
pub(crate) async fn write_frame(stream: &UnixStream, message: &Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let frame = encode(message);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut sent = 0;
    while sent < frame.len() {
        let n = stream
            .async_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if sent == 0 && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(std::io::Error::other("control buffer too small for the descriptors"));
                }
                rustix::net::sendmsg(
                    stream,
                    &[IoSlice::new(&frame[sent..])],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            })
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Reads exactly one frame (never past it) and every descriptor that came
/// with it, which are closed again if the frame turns out to be bad.
pub(crate) async fn read_frame(stream: &UnixStream) -> Result<(Message, Vec<OwnedFd>), ReadError> {
    let mut fds = Vec::new();
    let mut preamble = [0u8; PREAMBLE_LEN];
    read_exact(stream, &mut preamble, &mut fds).await?;
    let len = decode_preamble(&preamble).map_err(ReadError::Protocol)?;
    let mut body = vec![0u8; len as usize];
    read_exact(stream, &mut body, &mut fds).await?;
    let message = decode_body(&body).map_err(ReadError::Protocol)?;
    Ok((message, fds))
}

async fn read_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), ReadError> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut filled = 0;
    while filled < buf.len() {
        let (n, truncated) = stream
            .async_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    stream,
                    &mut [IoSliceMut::new(&mut buf[filled..])],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = m {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, msg.flags.contains(ReturnFlags::CTRUNC)))
            })
            .await
            .map_err(ReadError::Io)?;
        if truncated {
            return Err(ReadError::Protocol(ProtocolError::FdsTruncated { max: MAX_SOCKETS }));
        }
        if n == 0 {
            return Err(ReadError::Closed);
        }
        filled += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let m = Message::Offer {
            pid: 7,
            build: "0.1.0".into(),
            sockets: vec![Declared {
                name: SocketName::DNS_UDP,
                kind: SocketKind::Udp,
                local: "[::1]:53".parse().expect("addr"),
            }],
        };
        let frame = encode(&m);
        let preamble: [u8; PREAMBLE_LEN] = frame[..PREAMBLE_LEN].try_into().expect("preamble");
        let len = decode_preamble(&preamble).expect("valid preamble");
        assert_eq!(len as usize, frame.len() - PREAMBLE_LEN);
        assert_eq!(decode_body(&frame[PREAMBLE_LEN..]).expect("valid body"), m);
        let text = String::from_utf8(frame[PREAMBLE_LEN..].to_vec()).expect("utf-8");
        assert!(
            text.contains(r#""type":"offer""#) && text.contains(r#""kind":"udp""#),
            "{text}"
        );
    }

    #[test]
    fn bad_preambles_are_typed_errors() {
        let mut p = [0u8; PREAMBLE_LEN];
        p[..4].copy_from_slice(b"GET ");
        assert!(matches!(decode_preamble(&p), Err(ProtocolError::BadMagic(m)) if &m == b"GET "));
        p[..4].copy_from_slice(&MAGIC);
        p[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert!(matches!(
            decode_preamble(&p),
            Err(ProtocolError::Version { peer: 2, ours: 1 })
        ));
        p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        p[6..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_preamble(&p), Err(ProtocolError::TooLarge { .. })));
    }

    #[test]
    fn bad_bodies_are_typed_errors() {
        for body in [
            &b"{"[..],
            br#"{"type":"launch-missiles"}"#,
            br#"{"type":"ready"}"#,
            br#"{"type":"ready","pid":1,"extra":true}"#,
            br#"{"type":"offer","pid":1,"build":"x","sockets":[{"name":"","kind":"udp","local":"127.0.0.1:1"}]}"#,
            br#"{"type":"offer","pid":1,"build":"x","sockets":[{"name":"a","kind":"sctp","local":"127.0.0.1:1"}]}"#,
            &[0xff, 0xfe][..],
        ] {
            assert!(matches!(decode_body(body), Err(ProtocolError::Body(_))), "{body:?}");
        }
    }
}
