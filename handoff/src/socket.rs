//! Named listening sockets: what one process hands to the next.

use std::{
    borrow::Cow,
    fmt,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{sockopt, AddressFamily, SocketType};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The most sockets one set can hold: Linux passes at most 253 descriptors
/// in one `SCM_RIGHTS` message (`SCM_MAX_FD`), and the whole set travels in
/// one message so that it arrives whole or not at all.
pub const MAX_SOCKETS: usize = 253;

/// What a socket is for, as both processes name it: `http`, `https`,
/// `dns-udp` (`dns-udp:<n>` for the n-th UDP worker's socket after the
/// first), `dns-tcp`, `admin`, `tcp:<configured addr>`,
/// `tls:<configured addr>`. The new process looks its listeners up by
/// these names, so they follow the config, not the bound port.
///
/// 1 to 128 printable ASCII characters, no spaces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SocketName(Cow<'static, str>);

impl SocketName {
    /// The plain-HTTP proxy listener (`listeners.http`).
    pub const HTTP: Self = Self(Cow::Borrowed("http"));
    /// The HTTPS proxy listener (`listeners.https`).
    pub const HTTPS: Self = Self(Cow::Borrowed("https"));
    /// The DNS server's UDP socket (`listeners.dns`).
    pub const DNS_UDP: Self = Self(Cow::Borrowed("dns-udp"));
    /// The DNS server's TCP listener (`listeners.dns`).
    pub const DNS_TCP: Self = Self(Cow::Borrowed("dns-tcp"));
    /// The admin API listener (`listeners.admin`).
    pub const ADMIN: Self = Self(Cow::Borrowed("admin"));

    /// The UDP socket of DNS worker `n` (0-based; all of them share one
    /// port through `SO_REUSEPORT`): worker 0's is [`SocketName::DNS_UDP`],
    /// so a process with one worker names its socket as before.
    pub fn dns_udp(n: usize) -> Self {
        match n {
            0 => Self::DNS_UDP,
            n => Self(Cow::Owned(format!("dns-udp:{n}"))),
        }
    }

    /// An L4 TCP listener (`[[listeners.tcp]]`), by its configured address.
    pub fn tcp(configured: SocketAddr) -> Self {
        Self(Cow::Owned(format!("tcp:{configured}")))
    }

    /// A TLS-passthrough listener (`listeners.tls_passthrough`), by its
    /// configured address.
    pub fn tls_passthrough(configured: SocketAddr) -> Self {
        Self(Cow::Owned(format!("tls:{configured}")))
    }

    /// Any other name, checked.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > 128 {
            Some("it is longer than 128 bytes")
        } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
            Some("only printable ASCII without spaces is allowed")
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::InvalidName { name, why }),
            None => Ok(Self(Cow::Owned(name))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SocketName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl From<SocketName> for String {
    fn from(n: SocketName) -> String {
        n.0.into_owned()
    }
}

impl fmt::Display for SocketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SocketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The two kinds of socket a hand-off carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SocketKind {
    /// A bound, listening TCP socket (`std::net::TcpListener`).
    TcpListener,
    /// A bound UDP socket (`std::net::UdpSocket`).
    Udp,
}

impl fmt::Display for SocketKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TcpListener => "TCP listener",
            Self::Udp => "UDP socket",
        })
    }
}

/// What a descriptor really is, asked of the kernel: the kind and the
/// local address, or why it is neither a listening TCP socket nor a UDP
/// socket on IPv4/IPv6.
pub(crate) fn inspect(fd: BorrowedFd<'_>) -> Result<(SocketKind, SocketAddr), String> {
    let domain = sockopt::socket_domain(fd).map_err(|e| format!("not a socket ({e})"))?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return Err(format!("not an IPv4/IPv6 socket (address family {})", domain.as_raw()));
    }
    let kind = match sockopt::socket_type(fd).map_err(|e| e.to_string())? {
        SocketType::STREAM => {
            if !sockopt::socket_acceptconn(fd).map_err(|e| e.to_string())? {
                return Err("a TCP socket that is not listening".into());
            }
            SocketKind::TcpListener
        }
        SocketType::DGRAM => SocketKind::Udp,
        other => return Err(format!("socket type {} (neither stream nor datagram)", other.as_raw())),
    };
    let local = rustix::net::getsockname(fd).map_err(|e| e.to_string())?;
    let local = SocketAddr::try_from(local).map_err(|e| format!("local address: {e}"))?;
    Ok((kind, local))
}

/// One named socket: the descriptor, its kind and local address.
///
/// The descriptor is this process's own: dropping the `Socket` closes it,
/// which closes the socket only when no other process holds it. Never call
/// `shutdown(2)` on a handed-over listener: that acts on the socket shared
/// by both processes, not on this process's descriptor.
pub struct Socket {
    name: SocketName,
    kind: SocketKind,
    local: SocketAddr,
    fd: OwnedFd,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Socket {
    pub(crate) fn new(name: SocketName, kind: SocketKind, local: SocketAddr, fd: OwnedFd) -> Self {
        Self { name, kind, local, fd }
    }

    pub fn name(&self) -> &SocketName {
        &self.name
    }

    pub fn kind(&self) -> SocketKind {
        self.kind
    }

    /// The address the socket is bound to (with the real port when it was
    /// bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The listener, as std's type. Its blocking mode is whatever the old
    /// process left (the mode is shared by both processes): call
    /// `set_nonblocking(true)` before `tokio::net::TcpListener::from_std`.
    pub fn into_tcp_listener(self) -> Result<TcpListener, Error> {
        self.expect(SocketKind::TcpListener)?;
        Ok(TcpListener::from(self.fd))
    }

    /// The UDP socket, as std's type (see [`Socket::into_tcp_listener`]
    /// about the blocking mode).
    pub fn into_udp_socket(self) -> Result<UdpSocket, Error> {
        self.expect(SocketKind::Udp)?;
        Ok(UdpSocket::from(self.fd))
    }

    /// The bare descriptor, for a server that takes one.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn expect(&self, expected: SocketKind) -> Result<(), Error> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(Error::WrongKind {
                name: self.name.to_string(),
                expected,
                actual: self.kind,
            })
        }
    }
}

/// Named listening sockets, in insertion order, each name once.
///
/// The old process fills one from the sockets it serves on
/// ([`SocketSet::insert`] duplicates the descriptor, so it keeps serving on
/// its own); the new process gets one from [`crate::Handoff::receive`] and
/// takes the sockets its config still names ([`SocketSet::tcp_listener`],
/// [`SocketSet::udp_socket`]), binding the others itself, then closes what
/// is left ([`SocketSet::close_unclaimed`]).
#[derive(Debug, Default)]
pub struct SocketSet {
    sockets: Vec<Socket>,
}

impl SocketSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a duplicate of `socket`'s descriptor under `name`; the caller
    /// keeps its own. The kernel is asked what the socket is: only
    /// listening TCP sockets and UDP sockets on IPv4/IPv6 are accepted.
    pub fn insert(&mut self, name: SocketName, socket: &impl AsFd) -> Result<&Socket, Error> {
        let fd = socket.as_fd().try_clone_to_owned().map_err(|source| Error::Socket {
            name: name.to_string(),
            source,
        })?;
        self.insert_owned(name, fd)
    }

    /// Adds `fd` under `name`, taking ownership.
    pub fn insert_owned(&mut self, name: SocketName, fd: OwnedFd) -> Result<&Socket, Error> {
        if self.get(name.as_str()).is_some() {
            return Err(Error::DuplicateName(name.to_string()));
        }
        if self.sockets.len() >= MAX_SOCKETS {
            return Err(Error::TooManySockets {
                name: name.to_string(),
                count: self.sockets.len() + 1,
                max: MAX_SOCKETS,
            });
        }
        let (kind, local) = inspect(fd.as_fd()).map_err(|why| Error::Unsupported {
            name: name.to_string(),
            why,
        })?;
        self.sockets.push(Socket::new(name, kind, local, fd));
        Ok(self.sockets.last().expect("just pushed"))
    }

    /// Adds an already-inspected socket (the receiving side).
    pub(crate) fn push_checked(&mut self, socket: Socket) -> Result<(), String> {
        if self.get(socket.name.as_str()).is_some() {
            return Err(format!("socket `{}` is declared twice", socket.name));
        }
        self.sockets.push(socket);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Socket> {
        self.sockets.iter().find(|s| s.name.as_str() == name)
    }

    /// Removes and returns the socket called `name`.
    pub fn take(&mut self, name: &str) -> Option<Socket> {
        let i = self.sockets.iter().position(|s| s.name.as_str() == name)?;
        Some(self.sockets.remove(i))
    }

    /// Takes the TCP listener called `name` if it is bound where the config
    /// wants it: the same IP, and the same port unless `configured` asks for
    /// port 0 (any). `Ok(None)` when there is no such socket or it is bound
    /// elsewhere (the config changed: bind a new one; the old one stays in
    /// the set until [`SocketSet::close_unclaimed`]). An error when the name
    /// holds a UDP socket.
    pub fn tcp_listener(&mut self, name: &SocketName, configured: SocketAddr) -> Result<Option<TcpListener>, Error> {
        self.take_matching(name, configured, SocketKind::TcpListener)?
            .map(Socket::into_tcp_listener)
            .transpose()
    }

    /// The UDP counterpart of [`SocketSet::tcp_listener`].
    pub fn udp_socket(&mut self, name: &SocketName, configured: SocketAddr) -> Result<Option<UdpSocket>, Error> {
        self.take_matching(name, configured, SocketKind::Udp)?
            .map(Socket::into_udp_socket)
            .transpose()
    }

    fn take_matching(
        &mut self,
        name: &SocketName,
        configured: SocketAddr,
        kind: SocketKind,
    ) -> Result<Option<Socket>, Error> {
        let Some(s) = self.get(name.as_str()) else {
            return Ok(None);
        };
        s.expect(kind)?;
        let matches =
            s.local.ip() == configured.ip() && (configured.port() == 0 || s.local.port() == configured.port());
        Ok(if matches { self.take(name.as_str()) } else { None })
    }

    /// Closes every socket nobody took, and says which (to log them). A
    /// listener the new process does not serve must not stay open: the
    /// kernel would keep queueing connections nobody accepts.
    pub fn close_unclaimed(self) -> Vec<(SocketName, SocketAddr)> {
        self.sockets.into_iter().map(|s| (s.name, s.local)).collect()
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Socket> {
        self.sockets.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(
            SocketName::tcp("127.0.0.1:9000".parse().expect("test socket")).as_str(),
            "tcp:127.0.0.1:9000"
        );
        assert_eq!(
            SocketName::tls_passthrough("[::1]:443".parse().expect("test socket")).as_str(),
            "tls:[::1]:443"
        );
        assert!(matches!(SocketName::new(""), Err(Error::InvalidName { .. })));
        assert!(matches!(SocketName::new("a b"), Err(Error::InvalidName { .. })));
        assert!(matches!(
            SocketName::new("x".repeat(129)),
            Err(Error::InvalidName { .. })
        ));
        assert!(SocketName::new("dns-udp").is_ok());
        assert_eq!(SocketName::dns_udp(0), SocketName::DNS_UDP);
        assert_eq!(SocketName::dns_udp(3).as_str(), "dns-udp:3");
        assert!(SocketName::new(SocketName::dns_udp(63).as_str()).is_ok());
        let back: SocketName = serde_json::from_str("\"http\"").expect("test socket");
        assert_eq!(back, SocketName::HTTP);
        assert!(serde_json::from_str::<SocketName>("\"\\n\"").is_err());
    }

    #[test]
    fn insert_asks_the_kernel_what_a_socket_is() {
        let mut set = SocketSet::new();
        let tcp = TcpListener::bind("127.0.0.1:0").expect("test socket");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("test socket");
        assert_eq!(
            set.insert(SocketName::HTTP, &tcp).expect("test socket").kind(),
            SocketKind::TcpListener
        );
        let s = set.insert(SocketName::DNS_UDP, &udp).expect("test socket");
        assert_eq!(
            (s.kind(), s.local_addr()),
            (SocketKind::Udp, udp.local_addr().expect("test socket"))
        );
        assert!(matches!(
            set.insert(SocketName::HTTP, &tcp),
            Err(Error::DuplicateName(n)) if n == "http"
        ));
        // A connected TCP stream is not a listener.
        let stream = std::net::TcpStream::connect(tcp.local_addr().expect("test socket")).expect("test socket");
        assert!(matches!(
            set.insert(SocketName::ADMIN, &stream),
            Err(Error::Unsupported { why, .. }) if why.contains("not listening")
        ));
        // Nor is a file.
        let file = tempfile::tempfile().expect("test socket");
        assert!(matches!(
            set.insert(SocketName::ADMIN, &file),
            Err(Error::Unsupported { .. })
        ));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn the_new_process_takes_what_its_config_still_names() {
        let mut set = SocketSet::new();
        let tcp = TcpListener::bind("127.0.0.1:0").expect("test socket");
        let udp = UdpSocket::bind("127.0.0.1:0").expect("test socket");
        let port = tcp.local_addr().expect("test socket").port();
        set.insert(SocketName::HTTP, &tcp).expect("test socket");
        set.insert(SocketName::DNS_UDP, &udp).expect("test socket");
        set.insert(
            SocketName::ADMIN,
            &TcpListener::bind("127.0.0.1:0").expect("test socket"),
        )
        .expect("test socket");
        // Wrong kind under a name is a bug, said loudly.
        assert!(matches!(
            set.udp_socket(&SocketName::HTTP, "127.0.0.1:0".parse().expect("test socket")),
            Err(Error::WrongKind { .. })
        ));
        // Moved in the config: not taken, stays for close_unclaimed.
        assert!(set
            .tcp_listener(
                &SocketName::HTTP,
                format!("127.0.0.1:{}", port.wrapping_add(1))
                    .parse()
                    .expect("test socket")
            )
            .expect("test socket")
            .is_none());
        let taken = set
            .tcp_listener(
                &SocketName::HTTP,
                format!("127.0.0.1:{port}").parse().expect("test socket"),
            )
            .expect("test socket")
            .expect("test socket");
        assert_eq!(
            taken.local_addr().expect("test socket"),
            tcp.local_addr().expect("test socket")
        );
        // Port 0 in the config takes whatever port the socket has.
        assert!(set
            .udp_socket(&SocketName::DNS_UDP, "127.0.0.1:0".parse().expect("test socket"))
            .expect("test socket")
            .is_some());
        assert!(set
            .tcp_listener(&SocketName::HTTPS, "127.0.0.1:0".parse().expect("test socket"))
            .expect("test socket")
            .is_none());
        let left = set.close_unclaimed();
        assert_eq!(left.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["admin"]);
    }
}
