use std::{io, net::SocketAddr, path::PathBuf, time::Duration};

use crate::{socket::SocketKind, upgrade::Phase};

/// Everything that can go wrong building a socket set, handing it over, or
/// notifying systemd. During an upgrade, every error leaves the old process
/// serving on its own sockets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket name `{name}` is invalid: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("socket `{0}` is already in the set")]
    DuplicateName(String),
    #[error("socket `{name}` cannot be handed over: {why}")]
    Unsupported { name: String, why: String },
    #[error("a socket set holds at most {max} sockets (one SCM_RIGHTS message); `{name}` would be number {count}")]
    TooManySockets { name: String, count: usize, max: usize },
    #[error("socket `{name}` is a {actual}, not a {expected}")]
    WrongKind {
        name: String,
        expected: SocketKind,
        actual: SocketKind,
    },
    #[error("socket `{name}`: {source}")]
    Socket { name: String, source: io::Error },

    #[error("upgrade socket `{path}`: {source}")]
    UpgradeSocket { path: PathBuf, source: io::Error },
    #[error("upgrade socket `{path}`: another process is already waiting there for a hand-off")]
    UpgradeInProgress { path: PathBuf },
    #[error("{phase}: timed out after {after:?}")]
    Timeout { phase: Phase, after: Duration },
    #[error("{phase}: the other process closed the connection")]
    PeerClosed { phase: Phase },
    #[error("{phase}: {source}")]
    Io { phase: Phase, source: io::Error },
    #[error("{phase}: the other process runs as uid {peer}, this one as uid {ours}; both must run as the same user")]
    PeerUser { phase: Phase, peer: u32, ours: u32 },
    #[error("{phase}: {source}")]
    Protocol { phase: Phase, source: ProtocolError },
    #[error("the new process rejected the sockets: {reason}")]
    Rejected { reason: String },
    #[error("the new process gave up before it was ready: {reason}")]
    Aborted { reason: String },
    #[error("the old process stopped waiting and keeps serving: {reason}")]
    Cancelled { reason: String },

    #[error("systemd notify socket `{socket}`: {source}")]
    Notify { socket: String, source: io::Error },
}

/// A peer that does not speak the hand-off protocol, or lies in it. Never a
/// panic: every malformed input ends up here.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("not a cellgate hand-off message (starts with {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("protocol version {peer}, this build speaks version {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("message of {len} bytes, at most {max} allowed")]
    TooLarge { len: u32, max: u32 },
    #[error("message body is not valid: {0}")]
    Body(String),
    #[error("expected {expected}, got `{got}`")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("{count} file descriptors came with `{message}`, which carries none")]
    UnexpectedFds { message: &'static str, count: usize },
    #[error("the file descriptors were truncated by the kernel (more than the {max} expected)")]
    FdsTruncated { max: usize },
    #[error("{declared} sockets declared but {received} file descriptors received")]
    FdCount { declared: usize, received: usize },
    #[error("socket `{name}` declared as {declared} but is {actual}")]
    KindMismatch {
        name: String,
        declared: SocketKind,
        actual: String,
    },
    #[error("socket `{name}` declared bound to {declared} but bound to {actual}")]
    AddrMismatch {
        name: String,
        declared: SocketAddr,
        actual: SocketAddr,
    },
    #[error("socket set: {0}")]
    Set(String),
}
