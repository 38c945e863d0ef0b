//! The protocol against peers that misbehave: each gets a typed error, the
//! received descriptors are closed, nothing panics.

use std::{
    net::{TcpListener, UdpSocket},
    os::fd::AsFd,
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{wire::Declared, SocketKind, SocketName};

fn handoff(dir: &tempfile::TempDir) -> Handoff {
    Handoff::new(dir.path().join("upgrade.sock"))
}

/// A hand-written old process: connects as soon as the new one listens.
async fn raw_old(h: &Handoff) -> UnixStream {
    loop {
        match UnixStream::connect(h.path()).await {
            Ok(s) => return s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

fn declared(name: SocketName, kind: SocketKind, local: std::net::SocketAddr) -> Declared {
    Declared { name, kind, local }
}

fn offer(sockets: Vec<Declared>) -> Message {
    Message::Offer {
        pid: 1,
        build: "test".into(),
        sockets,
    }
}

/// Runs `receive` against a raw old process that sends `message` with
/// `fds`, and returns the error and what the raw peer was told.
async fn receive_from_raw(message: Message, fds: &[BorrowedFd<'_>]) -> (Error, Option<Message>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let (received, answer) = tokio::join!(h.receive(), async {
        let s = raw_old(&h).await;
        write_frame(&s, &message, fds).await.expect("offer sent");
        read_frame(&s).await.ok().map(|(m, _)| m)
    });
    let err = received.expect_err("the offer must be refused");
    assert!(
        !h.path().exists(),
        "the upgrade socket file is removed after a failed hand-off"
    );
    (err, answer)
}

#[tokio::test]
async fn garbage_instead_of_an_offer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let (received, ()) = tokio::join!(h.receive(), async {
        let mut s = raw_old(&h).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("written");
    });
    assert!(
        matches!(
            received,
            Err(Error::Protocol {
                phase: Phase::ReceivingOffer,
                source: ProtocolError::BadMagic(m),
            }) if &m == b"GET "
        ),
        "{received:?}"
    );
}

#[tokio::test]
async fn fewer_descriptors_than_declared() {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    let m = offer(vec![
        declared(SocketName::HTTP, SocketKind::TcpListener, a.local_addr().expect("addr")),
        declared(
            SocketName::HTTPS,
            SocketKind::TcpListener,
            b.local_addr().expect("addr"),
        ),
    ]);
    let (err, answer) = receive_from_raw(m, &[a.as_fd()]).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::FdCount {
                    declared: 2,
                    received: 1
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        matches!(&answer, Some(Message::Rejected { reason }) if reason.contains("2 sockets declared but 1")),
        "{answer:?}"
    );
}

#[tokio::test]
async fn more_descriptors_than_declared() {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let m = offer(vec![]);
    let (err, _) = receive_from_raw(m, &[a.as_fd(), a.as_fd()]).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::FdCount {
                    declared: 0,
                    received: 2
                },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_tcp_listener_declared_as_udp() {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let m = offer(vec![declared(
        SocketName::DNS_UDP,
        SocketKind::Udp,
        a.local_addr().expect("addr"),
    )]);
    let (err, _) = receive_from_raw(m, &[a.as_fd()]).await;
    assert!(
        matches!(&err, Error::Protocol { source: ProtocolError::KindMismatch { name, .. }, .. } if name == "dns-udp"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_file_declared_as_a_socket() {
    let file = tempfile::tempfile().expect("file");
    let m = offer(vec![declared(
        SocketName::HTTP,
        SocketKind::TcpListener,
        "127.0.0.1:80".parse().expect("addr"),
    )]);
    let (err, _) = receive_from_raw(m, &[file.as_fd()]).await;
    assert!(
        matches!(&err, Error::Protocol { source: ProtocolError::KindMismatch { actual, .. }, .. } if actual.contains("not a socket")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_socket_declared_at_another_address() {
    let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let m = offer(vec![declared(
        SocketName::DNS_UDP,
        SocketKind::Udp,
        "127.0.0.1:53".parse().expect("addr"),
    )]);
    let (err, _) = receive_from_raw(m, &[u.as_fd()]).await;
    assert!(
        matches!(&err, Error::Protocol { source: ProtocolError::AddrMismatch { actual, .. }, .. } if *actual == u.local_addr().expect("addr")),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_same_name_twice() {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = a.local_addr().expect("addr");
    let m = offer(vec![
        declared(SocketName::HTTP, SocketKind::TcpListener, addr),
        declared(SocketName::HTTP, SocketKind::TcpListener, addr),
    ]);
    let (err, _) = receive_from_raw(m, &[a.as_fd(), a.as_fd()]).await;
    assert!(
        matches!(&err, Error::Protocol { source: ProtocolError::Set(why), .. } if why.contains("twice")),
        "{err:?}"
    );
}

#[tokio::test]
async fn another_protocol_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let (received, ()) = tokio::join!(h.receive(), async {
        let mut s = raw_old(&h).await;
        let mut frame = crate::wire::encode(&offer(vec![]));
        frame[4..6].copy_from_slice(&9u16.to_be_bytes());
        s.write_all(&frame).await.expect("written");
    });
    assert!(
        matches!(
            received,
            Err(Error::Protocol {
                source: ProtocolError::Version { peer: 9, ours: 1 },
                ..
            })
        ),
        "{received:?}"
    );
}

#[tokio::test]
async fn a_message_that_is_not_an_offer() {
    let (err, answer) = receive_from_raw(Message::Ready { pid: 3 }, &[]).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::Unexpected { got: "ready", .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(answer, Some(Message::Rejected { .. })), "{answer:?}");
}

#[tokio::test]
async fn the_old_process_closing_mid_frame() {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let (received, ()) = tokio::join!(h.receive(), async {
        let mut s = raw_old(&h).await;
        let frame = crate::wire::encode(&offer(vec![]));
        s.write_all(&frame[..frame.len() - 3]).await.expect("written");
    });
    assert!(
        matches!(
            received,
            Err(Error::PeerClosed {
                phase: Phase::ReceivingOffer
            })
        ),
        "{received:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_old_process_within_the_accept_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir).with_timeouts(Timeouts {
        accept: Duration::from_secs(30),
        ..Timeouts::default()
    });
    let err = h.receive().await.expect_err("nobody connects");
    assert!(
        matches!(err, Error::Timeout { phase: Phase::Listening, after } if after == Duration::from_secs(30)),
        "{err:?}"
    );
    assert!(!h.path().exists());
}

#[tokio::test(start_paused = true)]
async fn no_new_process_within_the_connect_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let err = h.send(&SocketSet::new()).await.expect_err("nobody listens");
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::Connecting,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A hand-written new process: listens, reads the offer, answers `answer`.
async fn send_to_raw(answer: Vec<u8>, with_fd: bool) -> Error {
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir);
    let listener = UnixListener::bind(h.path()).expect("bind");
    let mut set = SocketSet::new();
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
    set.insert(SocketName::HTTP, &tcp).expect("insert");
    let (sent, ()) = tokio::join!(h.send(&set), async {
        let (mut s, _) = listener.accept().await.expect("accept");
        let (m, fds) = read_frame(&s).await.expect("an offer");
        assert!(matches!(m, Message::Offer { ref sockets, .. } if sockets.len() == 1));
        assert_eq!(fds.len(), 1);
        if with_fd {
            write_frame(&s, &Message::Accepted { pid: 2, sockets: 1 }, &[tcp.as_fd()])
                .await
                .expect("written");
        } else {
            s.write_all(&answer).await.expect("written");
        }
    });
    sent.expect_err("the answer is not acceptable")
}

#[tokio::test]
async fn the_old_process_gets_garbage_back() {
    let err = send_to_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), false).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                phase: Phase::AwaitingAcceptance,
                source: ProtocolError::BadMagic(_)
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_old_process_gets_a_wrong_count_or_descriptors_back() {
    let err = send_to_raw(crate::wire::encode(&Message::Accepted { pid: 2, sockets: 3 }), false).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::Set(_),
                ..
            }
        ),
        "{err:?}"
    );
    let err = send_to_raw(Vec::new(), true).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                source: ProtocolError::UnexpectedFds { count: 1, .. },
                ..
            }
        ),
        "{err:?}"
    );
    let err = send_to_raw(crate::wire::encode(&Message::Rejected { reason: "no".into() }), false).await;
    assert!(
        matches!(err, Error::Rejected { ref reason } if reason == "no"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_upgrade_socket_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir).with_timeouts(Timeouts {
        accept: Duration::from_millis(300),
        ..Timeouts::default()
    });

    // A regular file is never removed.
    std::fs::write(h.path(), "precious").expect("write");
    assert!(matches!(h.receive().await, Err(Error::UpgradeSocket { .. })));
    assert_eq!(std::fs::read_to_string(h.path()).expect("still there"), "precious");
    std::fs::remove_file(h.path()).expect("remove");

    // A stale socket (nobody listening) is replaced; the live one is 0600.
    drop(std::os::unix::net::UnixListener::bind(h.path()).expect("bind"));
    let (received, mode) = tokio::join!(h.receive(), async {
        let s = raw_old(&h).await;
        let mode = std::fs::metadata(h.path()).expect("socket file").permissions().mode() & 0o777;
        drop(s);
        mode
    });
    assert!(matches!(received, Err(Error::PeerClosed { .. })), "{received:?}");
    assert_eq!(mode, 0o600);

    // A socket somebody listens on belongs to another upgrade.
    let _other = std::os::unix::net::UnixListener::bind(h.path()).expect("bind");
    assert!(matches!(h.receive().await, Err(Error::UpgradeInProgress { .. })));
    assert!(h.path().exists(), "another upgrade's socket is left alone");
}

#[tokio::test]
async fn a_peer_that_reads_nothing_back() {
    // The new process reads the offer and never answers: the old one gives
    // up after `exchange`, still serving.
    let dir = tempfile::tempdir().expect("temp dir");
    let h = handoff(&dir).with_timeouts(Timeouts {
        exchange: Duration::from_millis(200),
        ..Timeouts::default()
    });
    let listener = UnixListener::bind(h.path()).expect("bind");
    let empty = SocketSet::new();
    let (sent, _s) = tokio::join!(h.send(&empty), async {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        s
    });
    assert!(
        matches!(
            sent,
            Err(Error::Timeout {
                phase: Phase::AwaitingAcceptance,
                ..
            })
        ),
        "{sent:?}"
    );
}

#[test]
fn the_default_upgrade_socket() {
    let path = |explicit: Option<&str>, runtime: Option<&str>| {
        Handoff::path_from(explicit.map(Into::into), runtime.map(Into::into))
    };
    assert_eq!(
        path(Some("/tmp/u.sock"), Some("/run/cellgate")),
        Path::new("/tmp/u.sock")
    );
    assert_eq!(
        path(None, Some("/run/cellgate")),
        Path::new("/run/cellgate/upgrade.sock")
    );
    assert_eq!(path(Some(""), Some("/run/a:/run/b")), Path::new("/run/a/upgrade.sock"));
    assert_eq!(path(None, None), Path::new(Handoff::DEFAULT_PATH));
}
