//! cellgate hand-off: zero-downtime upgrades and systemd readiness.
//!
//! An upgrade is pingora's procedure, extended to every socket cellgate
//! owns: start `cellgate run --upgrade`, then send SIGQUIT to the running
//! process. The **new** process listens on the upgrade socket
//! ([`Handoff::receive`]); the **old** one, on SIGQUIT, connects and sends
//! its listening sockets ([`Handoff::send`]): a [`SocketSet`] of named TCP
//! listeners and UDP sockets, as a small versioned JSON header plus the file
//! descriptors in one `SCM_RIGHTS` message. The new process validates them
//! (count, kind, local address) and starts serving on them; only when it
//! reports that it is ready does the old process stop accepting, drain, and
//! exit. If the new process is rejected, dies, or does not become ready in
//! time, the old process keeps serving and gets a typed [`Error`] that says
//! why. The steps are explicit types on both sides ([`Offered`] →
//! [`Successor`] for the old process, [`Inherited`] → [`Predecessor`] →
//! [`Released`] for the new one), each step bounded by one of [`Timeouts`].
//!
//! [`notify`] tells systemd (`Type=notify`) about readiness, reloads,
//! stopping, and a new main PID; it does nothing when `$NOTIFY_SOCKET` is
//! unset.
//!
//! File descriptors travel through `rustix`'s safe `sendmsg`/`recvmsg`
//! (received descriptors arrive as `OwnedFd`, close-on-exec), so this crate,
//! like every cellgate crate, forbids `unsafe`. It knows nothing of pingora,
//! hickory, the config or the routing table: the binary decides which
//! sockets to hand over and when it is ready.

#![forbid(unsafe_code)]

mod error;
pub mod notify;
mod socket;
mod upgrade;
mod wire;

pub use error::{Error, ProtocolError};
pub use notify::{Notifier, State};
pub use socket::{Socket, SocketKind, SocketName, SocketSet, MAX_SOCKETS};
pub use upgrade::{Handoff, Inherited, Offered, Phase, Predecessor, Released, Successor, Timeouts};
pub use wire::PROTOCOL_VERSION;
