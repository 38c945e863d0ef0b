//! The upgrade conversation between the running (old) process and its
//! successor (new), as two small state machines whose states are types.
//!
//! ```text
//! new: Handoff::receive ──► Inherited { sockets, Predecessor } ──ready()──► Released
//!        (bind, wait for the old         (serve on the sockets,              (old stops accepting,
//!         one, validate, accept)          publish the first table)            drains, exits)
//!
//! old: Handoff::send ──► Offered ──wait_ready()──► Successor ──release(grace)──► (drain, exit)
//!        (connect,          (keep serving         (stop accepting
//!         offer, accepted)   meanwhile)             first)
//! ```
//!
//! Every step has a deadline from [`Timeouts`]. Every failure on the old
//! side (new process not there, rejected the sockets, died, not ready in
//! time) is an `Err` *and* leaves the old process serving: it has only
//! shared duplicates of its sockets, never given them up.

use std::{
    fmt,
    io::ErrorKind,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::fs::{FileTypeExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::net::{UnixListener, UnixStream};

use crate::{
    socket::{inspect, Socket},
    wire::{read_frame, write_frame, Declared, Message, ReadError},
    Error, ProtocolError, SocketSet,
};

/// Where a hand-off was when it stopped; every error says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// New: bound the upgrade socket, waiting for the old process.
    Listening,
    /// New: the old process connected; receiving and checking its sockets.
    ReceivingOffer,
    /// New: told the old process it is ready; waiting for it to let go.
    AwaitingRelease,
    /// Old: connecting to the new process's upgrade socket.
    Connecting,
    /// Old: sending the sockets.
    Offering,
    /// Old: waiting for the new process to check the sockets.
    AwaitingAcceptance,
    /// Old: serving while the new process starts up.
    AwaitingReady,
    /// Old: telling the new process it has stopped accepting.
    Releasing,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Listening => "waiting for the old process to connect",
            Self::ReceivingOffer => "receiving the old process's sockets",
            Self::AwaitingRelease => "waiting for the old process to stop accepting",
            Self::Connecting => "connecting to the new process",
            Self::Offering => "sending the sockets to the new process",
            Self::AwaitingAcceptance => "waiting for the new process to accept the sockets",
            Self::AwaitingReady => "waiting for the new process to be ready",
            Self::Releasing => "telling the new process that this one stopped accepting",
        })
    }
}

/// Deadlines of the hand-off steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// New: how long to wait for the old process to connect after binding
    /// the upgrade socket (the operator sends SIGQUIT in that time).
    /// Default 30 s.
    pub accept: Duration,
    /// Old: how long to keep trying to connect to the upgrade socket (the
    /// new process may still be starting). Default 5 s.
    pub connect: Duration,
    /// Both: one message and its answer (offer → accepted, ready →
    /// released). Default 5 s.
    pub exchange: Duration,
    /// Old: how long the new process may take, after accepting the
    /// sockets, to report ready (its first routing table published).
    /// Default 60 s; make it longer than the first probe round.
    pub ready: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            accept: Duration::from_secs(30),
            connect: Duration::from_secs(5),
            exchange: Duration::from_secs(5),
            ready: Duration::from_secs(60),
        }
    }
}

/// The upgrade socket and the deadlines: what both processes agree on.
#[derive(Clone, Debug)]
pub struct Handoff {
    path: PathBuf,
    timeouts: Timeouts,
}

impl Handoff {
    /// The conventional upgrade socket of a systemd-managed node
    /// (`RuntimeDirectory=cellgate`).
    pub const DEFAULT_PATH: &'static str = "/run/cellgate/upgrade.sock";

    /// The upgrade socket both processes use unless told otherwise:
    /// `$CELLGATE_UPGRADE_SOCKET`, else `upgrade.sock` in systemd's
    /// `$RUNTIME_DIRECTORY` (`RuntimeDirectory=cellgate`), else
    /// [`Handoff::DEFAULT_PATH`].
    pub fn default_path() -> PathBuf {
        Self::path_from(
            std::env::var_os("CELLGATE_UPGRADE_SOCKET"),
            std::env::var_os("RUNTIME_DIRECTORY"),
        )
    }

    fn path_from(explicit: Option<std::ffi::OsString>, runtime_dir: Option<std::ffi::OsString>) -> PathBuf {
        if let Some(p) = explicit.filter(|p| !p.is_empty()) {
            return p.into();
        }
        // systemd joins several RuntimeDirectory= entries with ':'.
        let first = runtime_dir
            .as_ref()
            .and_then(|d| d.to_str())
            .and_then(|d| d.split(':').next())
            .filter(|d| !d.is_empty());
        match first {
            Some(dir) => Path::new(dir).join("upgrade.sock"),
            None => PathBuf::from(Self::DEFAULT_PATH),
        }
    }

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeouts: Timeouts::default(),
        }
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The new process, first thing at start-up (before binding any
    /// listener): binds the upgrade socket (mode 0600; a stale socket file
    /// nobody listens on is replaced), waits up to `accept` for the old
    /// process, receives its sockets, checks each one with the kernel
    /// (declared count, kind and local address), and accepts them. The
    /// socket file is removed before this returns, whatever the outcome.
    ///
    /// Only a peer running as the same user is accepted.
    pub async fn receive(&self) -> Result<Inherited, Error> {
        let listener = self.listen().await?;
        let _unlink = Unlink(&self.path);
        tracing::info!(path = %self.path.display(), "upgrade: waiting for the running process to hand over its sockets");
        let stream = match tokio::time::timeout(self.timeouts.accept, listener.accept()).await {
            Err(_) => {
                return Err(Error::Timeout {
                    phase: Phase::Listening,
                    after: self.timeouts.accept,
                })
            }
            Ok(Err(source)) => {
                return Err(Error::Io {
                    phase: Phase::Listening,
                    source,
                })
            }
            Ok(Ok((stream, _))) => stream,
        };
        drop(listener);
        let phase = Phase::ReceivingOffer;
        same_user(&stream, phase)?;
        let (message, fds) = self.read(&stream, phase, self.timeouts.exchange).await?;
        let Message::Offer { pid, build, sockets } = message else {
            let got = message.name();
            self.reply(
                &stream,
                phase,
                Message::Rejected {
                    reason: format!("expected an offer, got `{got}`"),
                },
            )
            .await;
            return Err(protocol(phase, ProtocolError::Unexpected { expected: "offer", got }));
        };
        let set = match check_offer(sockets, fds) {
            Ok(set) => set,
            Err(e) => {
                self.reply(&stream, phase, Message::Rejected { reason: e.to_string() })
                    .await;
                return Err(protocol(phase, e));
            }
        };
        self.write(
            &stream,
            phase,
            &Message::Accepted {
                pid: std::process::id(),
                sockets: set.len(),
            },
        )
        .await?;
        tracing::info!(
            from_pid = pid,
            %build,
            sockets = ?set.iter().map(|s| format!("{}={}", s.name(), s.local_addr())).collect::<Vec<_>>(),
            "upgrade: sockets received"
        );
        Ok(Inherited {
            sockets: set,
            predecessor: Predecessor {
                stream,
                pid,
                build,
                handoff: self.clone(),
            },
        })
    }

    /// The old process, on SIGQUIT: connects to the new process's upgrade
    /// socket (retrying for up to `connect` while it is not there yet),
    /// sends duplicates of `sockets`, and waits for the new process to
    /// accept them. This process keeps serving on its own descriptors
    /// throughout and after any error.
    pub async fn send(&self, sockets: &SocketSet) -> Result<Offered, Error> {
        let stream = self.connect().await?;
        same_user(&stream, Phase::Offering)?;
        let declared: Vec<Declared> = sockets
            .iter()
            .map(|s| Declared {
                name: s.name().clone(),
                kind: s.kind(),
                local: s.local_addr(),
            })
            .collect();
        let count = declared.len();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(Socket::fd).collect();
        let offer = Message::Offer {
            pid: std::process::id(),
            build: env!("CARGO_PKG_VERSION").to_string(),
            sockets: declared,
        };
        let phase = Phase::Offering;
        match tokio::time::timeout(self.timeouts.exchange, write_frame(&stream, &offer, &fds)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    phase,
                    after: self.timeouts.exchange,
                })
            }
            Ok(Err(source)) => return Err(io_error(phase, source)),
            Ok(Ok(())) => {}
        }
        let phase = Phase::AwaitingAcceptance;
        match self.read_plain(&stream, phase, self.timeouts.exchange).await? {
            Message::Accepted { pid, sockets } if sockets == count => {
                tracing::info!(new_pid = pid, sockets, "upgrade: the new process has the sockets");
                Ok(Offered {
                    stream,
                    pid,
                    handoff: self.clone(),
                })
            }
            Message::Accepted { sockets, .. } => Err(protocol(
                phase,
                ProtocolError::Set(format!("{count} sockets sent but {sockets} accepted")),
            )),
            Message::Rejected { reason } => Err(Error::Rejected { reason }),
            other => Err(protocol(
                phase,
                ProtocolError::Unexpected {
                    expected: "accepted or rejected",
                    got: other.name(),
                },
            )),
        }
    }

    async fn listen(&self) -> Result<UnixListener, Error> {
        let path = &self.path;
        let err = |source| Error::UpgradeSocket {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(err(std::io::Error::new(
                    ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                )))
            }
            Ok(_) => match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await {
                // Someone listens there: another upgrade is under way.
                Ok(Ok(_)) | Err(_) => return Err(Error::UpgradeInProgress { path: path.clone() }),
                Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "upgrade: replacing a stale upgrade socket");
                    std::fs::remove_file(path).map_err(err)?;
                }
                Ok(Err(e)) => return Err(err(e)),
            },
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        Ok(listener)
    }

    async fn connect(&self) -> Result<UnixStream, Error> {
        let attempt = async {
            loop {
                match UnixStream::connect(&self.path).await {
                    Ok(s) => return Ok(s),
                    // Not listening yet (or any more): try again.
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(source) => {
                        return Err(Error::UpgradeSocket {
                            path: self.path.clone(),
                            source,
                        })
                    }
                }
            }
        };
        tokio::time::timeout(self.timeouts.connect, attempt)
            .await
            .map_err(|_| Error::Timeout {
                phase: Phase::Connecting,
                after: self.timeouts.connect,
            })?
    }

    async fn read(&self, stream: &UnixStream, phase: Phase, limit: Duration) -> Result<(Message, Vec<OwnedFd>), Error> {
        match tokio::time::timeout(limit, read_frame(stream)).await {
            Err(_) => Err(Error::Timeout { phase, after: limit }),
            Ok(Err(ReadError::Closed)) => Err(Error::PeerClosed { phase }),
            Ok(Err(ReadError::Io(source))) => Err(io_error(phase, source)),
            Ok(Err(ReadError::Protocol(e))) => Err(protocol(phase, e)),
            Ok(Ok(m)) => Ok(m),
        }
    }

    /// A message that must not carry descriptors (any that came are closed).
    async fn read_plain(&self, stream: &UnixStream, phase: Phase, limit: Duration) -> Result<Message, Error> {
        let (message, fds) = self.read(stream, phase, limit).await?;
        if !fds.is_empty() {
            return Err(protocol(
                phase,
                ProtocolError::UnexpectedFds {
                    message: message.name(),
                    count: fds.len(),
                },
            ));
        }
        Ok(message)
    }

    async fn write(&self, stream: &UnixStream, phase: Phase, message: &Message) -> Result<(), Error> {
        match tokio::time::timeout(self.timeouts.exchange, write_frame(stream, message, &[])).await {
            Err(_) => Err(Error::Timeout {
                phase,
                after: self.timeouts.exchange,
            }),
            Ok(Err(source)) => Err(io_error(phase, source)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// A last word before giving up; the error that made us give up is
    /// what matters, so a failure to say it is only logged.
    async fn reply(&self, stream: &UnixStream, phase: Phase, message: Message) {
        if let Err(e) = self.write(stream, phase, &message).await {
            tracing::debug!(error = %e, message = message.name(), "upgrade: could not tell the other process");
        }
    }
}

/// Checks every received descriptor against its declaration. Any error
/// drops (closes) every received descriptor.
fn check_offer(declared: Vec<Declared>, fds: Vec<OwnedFd>) -> Result<SocketSet, ProtocolError> {
    if declared.len() != fds.len() {
        return Err(ProtocolError::FdCount {
            declared: declared.len(),
            received: fds.len(),
        });
    }
    let mut set = SocketSet::new();
    for (d, fd) in declared.into_iter().zip(fds) {
        let (kind, local) = inspect(fd.as_fd()).map_err(|why| ProtocolError::KindMismatch {
            name: d.name.to_string(),
            declared: d.kind,
            actual: why,
        })?;
        if kind != d.kind {
            return Err(ProtocolError::KindMismatch {
                name: d.name.to_string(),
                declared: d.kind,
                actual: format!("a {kind}"),
            });
        }
        if local != d.local {
            return Err(ProtocolError::AddrMismatch {
                name: d.name.to_string(),
                declared: d.local,
                actual: local,
            });
        }
        set.push_checked(Socket::new(d.name, kind, local, fd))
            .map_err(ProtocolError::Set)?;
    }
    Ok(set)
}

fn same_user(stream: &UnixStream, phase: Phase) -> Result<(), Error> {
    let peer = stream.peer_cred().map_err(|source| Error::Io { phase, source })?.uid();
    let ours = rustix::process::getuid().as_raw();
    if peer == ours {
        Ok(())
    } else {
        Err(Error::PeerUser { phase, peer, ours })
    }
}

fn protocol(phase: Phase, source: ProtocolError) -> Error {
    Error::Protocol { phase, source }
}

/// A peer that died mid-conversation shows up as a reset or a broken pipe.
fn io_error(phase: Phase, source: std::io::Error) -> Error {
    match source.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => Error::PeerClosed { phase },
        _ => Error::Io { phase, source },
    }
}

struct Unlink<'a>(&'a Path);

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// New process: the sockets it took over and the old process, still
/// serving until [`Predecessor::ready`].
#[derive(Debug)]
pub struct Inherited {
    /// Take the listeners the config still names; bind the others.
    pub sockets: SocketSet,
    pub predecessor: Predecessor,
}

/// New process: the connection to the old process, which keeps serving
/// until told this one is ready. Dropping it without calling
/// [`Predecessor::ready`] tells the old process that this one died: it
/// keeps serving and logs why.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    pid: u32,
    build: String,
    handoff: Handoff,
}

impl Predecessor {
    /// The old process's pid (as it reported it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The old process's build version.
    pub fn build(&self) -> &str {
        &self.build
    }

    /// Call once this process serves on the inherited sockets and has
    /// published its first routing table: the old process stops
    /// accepting, answers with its grace period, drains and exits.
    ///
    /// * `Ok(Released)`: the old process let go; this one is the edge now.
    /// * `Err(Error::Cancelled)`: the old process had stopped waiting (this
    ///   one was not ready within its `ready` timeout) and keeps serving:
    ///   **this process must exit**, or both serve forever.
    /// * any other `Err` (the old process vanished or did not answer in
    ///   time): it probably died; keep serving and log it.
    pub async fn ready(self) -> Result<Released, Error> {
        let phase = Phase::AwaitingRelease;
        let h = &self.handoff;
        // If the old process had already given up, it said so before
        // closing: read its answer even when this write fails.
        let wrote = h
            .write(
                &self.stream,
                phase,
                &Message::Ready {
                    pid: std::process::id(),
                },
            )
            .await;
        let answer = h.read_plain(&self.stream, phase, h.timeouts.exchange).await;
        match (answer, wrote) {
            (Ok(Message::Released { grace_period_ms }), _) => {
                let grace_period = Duration::from_millis(grace_period_ms);
                tracing::info!(
                    old_pid = self.pid,
                    ?grace_period,
                    "upgrade: the old process stopped accepting and drains"
                );
                Ok(Released {
                    pid: self.pid,
                    grace_period,
                })
            }
            (Ok(Message::Cancelled { reason }), _) => Err(Error::Cancelled { reason }),
            (Ok(other), _) => Err(protocol(
                phase,
                ProtocolError::Unexpected {
                    expected: "released or cancelled",
                    got: other.name(),
                },
            )),
            (Err(_), Err(write)) => Err(write),
            (Err(read), Ok(())) => Err(read),
        }
    }

    /// Tells the old process that this one gives up (it keeps serving and
    /// logs `reason`). Dropping the `Predecessor` has the same effect
    /// without a reason.
    pub async fn abort(self, reason: &str) {
        self.handoff
            .reply(
                &self.stream,
                Phase::AwaitingRelease,
                Message::Aborted {
                    reason: reason.to_string(),
                },
            )
            .await;
    }
}

/// New process: the old one stopped accepting and drains for
/// `grace_period` before it exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    pub pid: u32,
    pub grace_period: Duration,
}

/// Old process: the new one has the sockets and is starting. Keep serving
/// and call [`Offered::wait_ready`].
#[derive(Debug)]
pub struct Offered {
    stream: UnixStream,
    pid: u32,
    handoff: Handoff,
}

impl Offered {
    /// The new process's pid (as it reported it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits up to `ready` for the new process to report ready. On `Ok`,
    /// stop accepting, then call [`Successor::release`]. On `Err` (the new
    /// process aborted, died or was too slow: it is told to exit), keep
    /// serving and log the error.
    pub async fn wait_ready(self) -> Result<Successor, Error> {
        let phase = Phase::AwaitingReady;
        let h = &self.handoff;
        match h.read_plain(&self.stream, phase, h.timeouts.ready).await {
            Ok(Message::Ready { pid }) => {
                tracing::info!(new_pid = pid, "upgrade: the new process is ready");
                Ok(Successor {
                    stream: self.stream,
                    pid,
                    handoff: self.handoff,
                })
            }
            Ok(Message::Aborted { reason }) => Err(Error::Aborted { reason }),
            Ok(other) => {
                let got = other.name();
                h.reply(
                    &self.stream,
                    phase,
                    Message::Cancelled {
                        reason: format!("expected ready, got `{got}`"),
                    },
                )
                .await;
                Err(protocol(
                    phase,
                    ProtocolError::Unexpected {
                        expected: "ready or aborted",
                        got,
                    },
                ))
            }
            Err(e) => {
                if matches!(e, Error::Timeout { .. } | Error::Protocol { .. }) {
                    h.reply(&self.stream, phase, Message::Cancelled { reason: e.to_string() })
                        .await;
                }
                Err(e)
            }
        }
    }
}

/// Old process: the new one is ready. Stop accepting (drop this process's
/// listeners; never `shutdown(2)` them), then [`Successor::release`], then
/// drain.
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    pid: u32,
    handoff: Handoff,
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the new process that this one has stopped accepting and will
    /// drain for `grace_period`. An error here changes nothing for this
    /// process (it has let go already); log it.
    pub async fn release(self, grace_period: Duration) -> Result<(), Error> {
        let grace_period_ms = u64::try_from(grace_period.as_millis()).unwrap_or(u64::MAX);
        self.handoff
            .write(&self.stream, Phase::Releasing, &Message::Released { grace_period_ms })
            .await
    }
}

#[cfg(test)]
mod tests;
