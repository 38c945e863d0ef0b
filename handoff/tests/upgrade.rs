//! Upgrades on real sockets (loopback only): the old process hands its
//! listeners to the new one while a client keeps connecting, and keeps
//! serving whenever the new one fails.

mod support;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use cellgate_handoff::{Error, Handoff, Phase, SocketName, SocketSet, Timeouts};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// Answers every connection with `tag` and a newline until `stop`, then
/// drops the listener: it stops accepting, and the connections it already
/// accepted are still answered (a drain).
fn serve(listener: TcpListener, tag: String, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                accepted = listener.accept() => {
                    if let Ok((mut s, _)) = accepted {
                        let line = format!("{tag}\n");
                        tokio::spawn(async move { let _ = s.write_all(line.as_bytes()).await; });
                    }
                }
            }
        }
    })
}

/// One connection: who answered, or what went wrong.
async fn ask(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(|e| format!("read: {e}"))?;
        match out.strip_suffix('\n') {
            Some(tag) => Ok(tag.to_string()),
            None => Err(format!("incomplete answer {out:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer in 5 s".into()))
}

#[derive(Debug, Default)]
struct Load {
    answers: Vec<String>,
    errors: Vec<String>,
}

/// Connects in a loop (at most 5000 times) until told `done`, then 200
/// more times; tells `started` after the first answer.
fn client(addr: SocketAddr, started: oneshot::Sender<()>, done: watch::Receiver<bool>) -> JoinHandle<Load> {
    tokio::spawn(async move {
        let mut load = Load::default();
        let mut started = Some(started);
        let mut after_done = 0;
        for _ in 0..5000 {
            if *done.borrow() {
                after_done += 1;
                if after_done > 200 {
                    break;
                }
            }
            match ask(addr).await {
                Ok(tag) => load.answers.push(tag),
                Err(e) => load.errors.push(e),
            }
            if let Some(tx) = started.take() {
                let _ = tx.send(());
            }
        }
        load
    })
}

fn loopback_v6_or_v4() -> SocketAddr {
    match std::net::TcpListener::bind("[::1]:0") {
        Ok(_) => "[::1]:0".parse().expect("addr"),
        Err(_) => "127.0.0.1:0".parse().expect("addr"),
    }
}

fn local(addr: &str) -> SocketAddr {
    addr.parse().expect("addr")
}

/// The old process under load: an HTTP listener serving `old` and a DNS
/// UDP socket, both in its socket set, and a client connecting in a loop.
struct Busy {
    http: SocketAddr,
    dns_addr: SocketAddr,
    /// The old process's copy of the DNS socket, closed when it stops.
    dns: Option<UdpSocket>,
    set: SocketSet,
    stop: watch::Sender<bool>,
    serving: JoinHandle<()>,
    done: watch::Sender<bool>,
    load: JoinHandle<Load>,
}

impl Busy {
    /// Starts serving and returns once the client has its first answer.
    async fn start() -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let dns = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let (addr, dns_addr) = (http.local_addr().expect("addr"), dns.local_addr().expect("addr"));
        let mut set = SocketSet::new();
        set.insert(SocketName::HTTP, &http).expect("http");
        set.insert(SocketName::DNS_UDP, &dns).expect("dns");
        let (stop, stopped) = watch::channel(false);
        let serving = serve(http, "old".into(), stopped);
        let (started_tx, started) = oneshot::channel();
        let (done, done_rx) = watch::channel(false);
        let load = client(addr, started_tx, done_rx);
        started.await.expect("the client got a first answer");
        Self {
            http: addr,
            dns_addr,
            dns: Some(dns),
            set,
            stop,
            serving,
            done,
            load,
        }
    }

    /// Stops accepting (the new process is ready) and closes the old
    /// process's copy of the DNS socket.
    async fn stop_accepting(&mut self) {
        self.stop.send(true).expect("old serving");
        (&mut self.serving).await.expect("old accept loop ended");
        self.dns = None;
    }

    /// Tells the client to finish and returns what it saw, which must hold
    /// no refused or failed connection.
    async fn finish(self) -> Load {
        self.done.send(true).expect("client running");
        let load = self.load.await.expect("client task");
        assert!(
            load.errors.is_empty(),
            "refused or failed connections: {:?}",
            load.errors
        );
        load
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_socket_moves_to_the_new_process_and_no_connection_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock"));

    // The old process serves HTTP to a client connecting in a loop across
    // the whole hand-off; it also has a DNS UDP socket and an admin
    // listener (on ::1 where there is one).
    let mut old = Busy::start().await;
    let admin = TcpListener::bind(loopback_v6_or_v4()).await.expect("bind admin");
    let admin_addr = admin.local_addr().expect("addr");
    old.set.insert(SocketName::ADMIN, &admin).expect("admin");
    let dns_addr = old.dns_addr;

    // The new process: inherit, serve, report ready.
    let new = tokio::spawn({
        let handoff = handoff.clone();
        async move {
            let inherited = handoff.receive().await?;
            assert_eq!(inherited.predecessor.pid(), std::process::id());
            let mut sockets = inherited.sockets;
            let http = sockets
                .tcp_listener(&SocketName::HTTP, local("127.0.0.1:0"))?
                .expect("http inherited");
            let admin = sockets
                .tcp_listener(&SocketName::ADMIN, admin_addr)?
                .expect("admin inherited");
            let dns = sockets
                .udp_socket(&SocketName::DNS_UDP, dns_addr)?
                .expect("dns inherited");
            assert!(sockets.close_unclaimed().is_empty());
            for s in [&http, &admin] {
                s.set_nonblocking(true).expect("nonblocking");
            }
            dns.set_nonblocking(true).expect("nonblocking");
            let http = TcpListener::from_std(http).expect("tokio listener");
            let (keep_serving, rx) = watch::channel(false);
            let serving = serve(http, "new".into(), rx);
            let released = inherited.predecessor.ready().await?;
            Ok::<_, Error>((released, admin, dns, serving, keep_serving))
        }
    });

    // The old process, on SIGQUIT: offer, keep serving until the new one is
    // ready, stop accepting, release, drain.
    let offered = handoff.send(&old.set).await.expect("the new process took the sockets");
    let successor = offered.wait_ready().await.expect("the new process is ready");
    old.stop_accepting().await;
    drop(admin);
    successor
        .release(Duration::from_secs(3))
        .await
        .expect("the new process was told");
    let (released, admin, dns, _serving, _keep_serving) =
        new.await.expect("new process task").expect("new process hand-off");
    assert_eq!(released.grace_period, Duration::from_secs(3));
    assert_eq!(released.pid, std::process::id());
    assert!(!handoff.path().exists(), "the upgrade socket is gone");

    let load = old.finish().await;
    let old = load.answers.iter().filter(|t| *t == "old").count();
    let new = load.answers.iter().filter(|t| *t == "new").count();
    assert!(old > 0 && new >= 200, "old answered {old}, new {new}");
    assert!(
        load.answers.iter().rev().take(200).all(|t| t == "new"),
        "after the release only the new process answers"
    );

    // The other two sockets work in the new process.
    let admin = TcpListener::from_std(admin).expect("tokio listener");
    let c = TcpStream::connect(admin_addr).await.expect("connect admin");
    let (_, peer) = admin.accept().await.expect("accept on the inherited admin listener");
    assert_eq!(peer, c.local_addr().expect("addr"));
    let dns = UdpSocket::from_std(dns).expect("tokio socket");
    let q = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    q.send_to(b"query", dns_addr).await.expect("send");
    let mut buf = [0u8; 16];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), dns.recv_from(&mut buf))
        .await
        .expect("a datagram within 5 s")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&b"query"[..], q.local_addr().expect("addr")));
}

/// The control for the test above: the same client loop does see refused
/// connections when a process restarts without a hand-off (close, then
/// bind again), so its "no error" is a measurement, not a tautology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_loop_sees_a_restart_without_hand_off() {
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http.local_addr().expect("addr");
    let (stop_old, stopped) = watch::channel(false);
    let old = serve(http, "old".into(), stopped);
    let (started_tx, started) = oneshot::channel();
    let (done, done_rx) = watch::channel(false);
    let load = client(addr, started_tx, done_rx);
    started.await.expect("first answer");
    stop_old.send(true).expect("old serving");
    old.await.expect("old stopped");
    // The restart takes a while (config, first probe round).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_keep, rx) = watch::channel(false);
    let _new = serve(TcpListener::bind(addr).await.expect("rebind"), "new".into(), rx);
    done.send(true).expect("client running");
    let load = load.await.expect("client task");
    assert!(
        load.errors.iter().any(|e| e.contains("connect")),
        "a restart without hand-off refuses connections: {:?}",
        &load.errors[..load.errors.len().min(3)]
    );
}

/// The old process with one HTTP listener, serving `old`.
struct Old {
    addr: SocketAddr,
    set: SocketSet,
    _stop: watch::Sender<bool>,
}

async fn old_process() -> Old {
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http.local_addr().expect("addr");
    let mut set = SocketSet::new();
    set.insert(SocketName::HTTP, &http).expect("insert");
    let (stop, rx) = watch::channel(false);
    serve(http, "old".into(), rx);
    Old { addr, set, _stop: stop }
}

/// Whether the hand-off failed because the new process went away before it
/// said it was ready.
fn died_before_ready(err: &Error) -> bool {
    matches!(
        err,
        Error::PeerClosed {
            phase: Phase::AwaitingReady
        }
    )
}

#[tokio::test]
async fn the_old_process_keeps_serving_when_the_new_one_dies_before_ready() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock"));
    let old = old_process().await;
    let new = tokio::spawn({
        let handoff = handoff.clone();
        // Dies with the sockets in hand: its descriptors and the
        // connection close.
        async move { drop(handoff.receive().await.expect("received")) }
    });
    let offered = handoff.send(&old.set).await.expect("sent");
    let err = offered.wait_ready().await.expect_err("the new process died");
    assert!(died_before_ready(&err), "{err:?}");
    new.await.expect("new process task");
    assert_eq!(ask(old.addr).await.as_deref(), Ok("old"));
}

#[tokio::test]
async fn the_old_process_keeps_serving_when_the_new_one_gives_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock"));
    let old = old_process().await;
    let new = tokio::spawn({
        let handoff = handoff.clone();
        async move {
            let inherited = handoff.receive().await.expect("received");
            inherited
                .predecessor
                .abort("cell `eu-1` in service `app` is not defined")
                .await;
        }
    });
    let err = handoff
        .send(&old.set)
        .await
        .expect("sent")
        .wait_ready()
        .await
        .expect_err("the new process gave up");
    assert!(
        matches!(&err, Error::Aborted { reason } if reason.contains("eu-1")),
        "{err:?}"
    );
    assert!(err.to_string().contains("gave up before it was ready"), "{err}");
    new.await.expect("new process task");
    assert_eq!(ask(old.addr).await.as_deref(), Ok("old"));
}

#[tokio::test]
async fn a_new_process_not_ready_in_time_is_told_to_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock")).with_timeouts(Timeouts {
        ready: Duration::from_millis(200),
        ..Timeouts::default()
    });
    let old = old_process().await;
    let (gave_up, old_gave_up) = oneshot::channel::<()>();
    let new = tokio::spawn({
        let handoff = handoff.clone();
        async move {
            let inherited = handoff.receive().await.expect("received");
            // Still starting when the old process stops waiting.
            old_gave_up.await.expect("the old process gave up");
            inherited.predecessor.ready().await
        }
    });
    let err = handoff
        .send(&old.set)
        .await
        .expect("sent")
        .wait_ready()
        .await
        .expect_err("too slow");
    assert!(
        matches!(
            err,
            Error::Timeout {
                phase: Phase::AwaitingReady,
                ..
            }
        ),
        "{err:?}"
    );
    gave_up.send(()).expect("new process waiting");
    let told = new.await.expect("new process task");
    assert!(matches!(told, Err(Error::Cancelled { .. })), "{told:?}");
    assert_eq!(ask(old.addr).await.as_deref(), Ok("old"));
}

// Two real processes: the new one is the `handoff-node` example.

/// Starts `handoff-node run --upgrade` waiting on `socket`, its config
/// naming `http` and `dns` (so it takes those sockets over); with `crash`
/// it exits with status 3 as soon as it has the sockets.
fn spawn_new_process(
    dir: &std::path::Path,
    socket: &std::path::Path,
    http: SocketAddr,
    dns: SocketAddr,
    crash: bool,
) -> tokio::process::Child {
    let config = dir.join("node.conf");
    let mut text = format!("http {http}\ndns-udp {dns}\ngrace 1000\n");
    if crash {
        text.push_str("crash-after-takeover\n");
    }
    std::fs::write(&config, text).expect("node config");
    tokio::process::Command::new(support::node_binary())
        .args(["run", "--upgrade", "--config"])
        .arg(&config)
        .env("CELLGATE_UPGRADE_SOCKET", socket)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("new process started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_to_a_second_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock"));
    let mut old = Busy::start().await;
    let dns_addr = old.dns_addr;
    let mut child = spawn_new_process(dir.path(), handoff.path(), old.http, dns_addr, false);
    let child_pid = child.id().expect("child pid");
    let offered = handoff.send(&old.set).await.expect("the new process took the sockets");
    assert_eq!(offered.pid(), child_pid);
    let successor = offered.wait_ready().await.expect("the new process is ready");
    old.stop_accepting().await;
    successor.release(Duration::from_secs(1)).await.expect("released");

    let load = old.finish().await;
    let child_tag = format!("pid {child_pid}");
    assert!(load.answers.iter().any(|t| t == "old"));
    assert!(
        load.answers.iter().rev().take(200).all(|t| *t == child_tag),
        "after the release only the new process answers"
    );
    let q = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    q.send_to(b"query", dns_addr).await.expect("send");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), q.recv(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("recv");
    assert_eq!(&buf[..n], format!("{child_tag}: query").as_bytes());
    child.kill().await.expect("child stopped");
}

#[tokio::test]
async fn a_second_process_that_dies_before_ready_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handoff = Handoff::new(dir.path().join("upgrade.sock"));
    let old = old_process().await;
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut child = spawn_new_process(dir.path(), handoff.path(), old.addr, any, true);
    let offered = handoff.send(&old.set).await.expect("sent");
    let err = offered.wait_ready().await.expect_err("the new process died");
    assert!(died_before_ready(&err), "{err:?}");
    assert_eq!(child.wait().await.expect("exit status").code(), Some(3));
    for _ in 0..20 {
        assert_eq!(ask(old.addr).await.as_deref(), Ok("old"));
    }
}
