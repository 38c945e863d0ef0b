//! systemd readiness (`Type=notify`): `sd_notify(3)`'s protocol, one
//! datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`). Nothing happens when the variable is
//! unset, so the same binary runs under systemd, in a container, or by hand.
//!
//! During an upgrade the **new** process sends
//! `[State::MainPid(own pid), State::Ready]` once the old one has released
//! the sockets (the unit needs `NotifyAccess=all`, and the new process must
//! run inside the unit's cgroup for systemd to accept it as main PID). The
//! **old** process must not send `STOPPING=1` when it exits after an
//! upgrade: systemd would stop the whole unit, new process included.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::Error;

/// One thing to tell systemd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// `READY=1`: start-up is finished (listeners bound, first table
    /// published).
    Ready,
    /// `RELOADING=1` with `MONOTONIC_USEC=` (as `Type=notify-reload`
    /// wants): a config reload began; send [`State::Ready`] when it ends.
    Reloading,
    /// `STOPPING=1`: a shutdown began (not after an upgrade hand-off).
    Stopping,
    /// `MAINPID=`: this pid is now the service's main process.
    MainPid(u32),
    /// `STATUS=`: one line for `systemctl status`.
    Status(String),
}

impl State {
    fn write(&self, out: &mut String) {
        match self {
            Self::Ready => out.push_str("READY=1\n"),
            Self::Reloading => {
                let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
                let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
                out.push_str(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\n"));
            }
            Self::Stopping => out.push_str("STOPPING=1\n"),
            Self::MainPid(pid) => out.push_str(&format!("MAINPID={pid}\n")),
            Self::Status(s) => {
                let line: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
                out.push_str(&format!("STATUS={line}\n"));
            }
        }
    }
}

/// The datagram for `states`.
pub fn message(states: &[State]) -> String {
    let mut out = String::new();
    for s in states {
        s.write(&mut out);
    }
    out
}

/// A connection-less sender to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: String,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, `None` when it is unset or
    /// empty (not started by systemd, or `Type=` is not `notify`).
    pub fn from_env() -> Result<Option<Self>, Error> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Self::new(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `socket`: a filesystem path, or `@name` for an
    /// abstract socket (Linux).
    pub fn new(socket: &str) -> Result<Self, Error> {
        let err = |source| Error::Notify {
            socket: socket.to_string(),
            source,
        };
        let addr = if let Some(name) = socket.strip_prefix('@') {
            abstract_addr(name.as_bytes()).map_err(err)?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket).map_err(err)?
        } else {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "only absolute paths and @abstract names are supported",
            )));
        };
        Ok(Self {
            socket: socket.to_string(),
            addr,
        })
    }

    /// Sends `states` in one datagram.
    pub fn notify(&self, states: &[State]) -> Result<(), Error> {
        let err = |source| Error::Notify {
            socket: self.socket.clone(),
            source,
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.send_to_addr(message(states).as_bytes(), &self.addr).map_err(err)?;
        Ok(())
    }
}

/// Tells systemd `states` if `$NOTIFY_SOCKET` is set; `Ok(false)` when it
/// is not (nothing to do).
pub fn notify(states: &[State]) -> Result<bool, Error> {
    match Notifier::from_env()? {
        Some(n) => n.notify(states).map(|()| true),
        None => Ok(false),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("read timeout");
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_states_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let systemd = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::new(path.to_str().expect("utf-8 path")).expect("notifier");
        n.notify(&[
            State::MainPid(4242),
            State::Ready,
            State::Status("serving\non 3 sockets".into()),
        ])
        .expect("sent");
        assert_eq!(
            received(&systemd),
            "MAINPID=4242\nREADY=1\nSTATUS=serving on 3 sockets\n"
        );
        n.notify(&[State::Stopping]).expect("sent");
        assert_eq!(received(&systemd), "STOPPING=1\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("cellgate-notify-test-{}", std::process::id());
        let systemd = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name"))
            .expect("bind");
        Notifier::new(&format!("@{name}"))
            .expect("notifier")
            .notify(&[State::Reloading])
            .expect("sent");
        let got = received(&systemd);
        let usec = got
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .expect("RELOADING with a timestamp");
        assert!(usec.parse::<u64>().expect("a number") > 0, "{got}");
    }

    #[test]
    fn unusable_addresses_are_errors_and_a_missing_listener_too() {
        assert!(matches!(Notifier::new("vsock:2:1234"), Err(Error::Notify { .. })));
        let dir = tempfile::tempdir().expect("temp dir");
        let gone = dir.path().join("nobody-here.sock");
        let n = Notifier::new(gone.to_str().expect("utf-8 path")).expect("notifier");
        assert!(matches!(n.notify(&[State::Ready]), Err(Error::Notify { .. })));
    }
}
