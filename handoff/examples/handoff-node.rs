//! A minimal node wired the way `cellgate run` is meant to be: it serves a
//! TCP listener (`http`: answers `pid N` and closes) and a UDP socket
//! (`dns-udp`: answers `pid N: <datagram>`), starts with `--upgrade` by
//! taking them over from the running node, and on SIGQUIT hands them to
//! its successor. The tests of `dist/cellgate-upgrade` drive it.
//!
//! ```text
//! handoff-node check --config FILE
//! handoff-node run --config FILE [--upgrade]
//! ```
//!
//! FILE has lines `http ADDR`, `dns-udp ADDR` and `grace DURATION_MS`; a
//! line `invalid` makes `check` and `run` fail; a line
//! `crash-after-takeover` makes `run --upgrade` exit with status 3 right
//! after it received the sockets (a successor that dies before ready). The upgrade socket is
//! `Handoff::default_path()` (`$CELLGATE_UPGRADE_SOCKET`, ...).

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use cellgate_handoff::{notify, Error, Handoff, SocketName, SocketSet, State};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, UdpSocket},
    signal::unix::{signal, SignalKind},
    sync::watch,
    task::JoinSet,
};

struct Config {
    http: SocketAddr,
    dns: SocketAddr,
    grace: Duration,
    crash_after_takeover: bool,
}

fn load(path: &PathBuf) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut c = Config {
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        dns: SocketAddr::from(([127, 0, 0, 1], 0)),
        grace: Duration::from_secs(1),
        crash_after_takeover: false,
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || format!("{}: bad line `{line}`", path.display());
        match line.split_once(' ') {
            Some(("http", a)) => c.http = a.parse().map_err(|_| bad())?,
            Some(("dns-udp", a)) => c.dns = a.parse().map_err(|_| bad())?,
            Some(("grace", ms)) => c.grace = Duration::from_millis(ms.parse().map_err(|_| bad())?),
            None if line == "crash-after-takeover" => c.crash_after_takeover = true,
            _ => return Err(bad()),
        }
    }
    Ok(c)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match args.iter().position(|a| a == "--config") {
        Some(i) if i + 1 < args.len() => PathBuf::from(&args[i + 1]),
        _ => {
            eprintln!("usage: handoff-node (check|run) --config FILE [--upgrade]");
            return ExitCode::from(2);
        }
    };
    let config = match load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match args.first().map(String::as_str) {
        Some("check") => ExitCode::SUCCESS,
        Some("run") => {
            let upgrade = args.iter().any(|a| a == "--upgrade");
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config, upgrade)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("handoff-node {}: {e}", std::process::id());
                    ExitCode::FAILURE
                }
            }
        }
        _ => ExitCode::from(2),
    }
}

async fn run(config: Config, upgrade: bool) -> Result<(), Error> {
    let pid = std::process::id();
    let handoff = Handoff::new(Handoff::default_path());
    // 1. With --upgrade, before binding anything: take over the sockets.
    let (mut inherited, predecessor) = if upgrade {
        let i = handoff.receive().await?;
        if config.crash_after_takeover {
            std::process::exit(3);
        }
        (i.sockets, Some(i.predecessor))
    } else {
        (SocketSet::new(), None)
    };
    // 2. Bind: an inherited socket where the config still names it, a new
    //    one otherwise; close the rest.
    let io = |source| Error::Socket {
        name: "bind".into(),
        source,
    };
    let http = match inherited.tcp_listener(&SocketName::HTTP, config.http)? {
        Some(l) => {
            l.set_nonblocking(true).map_err(io)?;
            TcpListener::from_std(l).map_err(io)?
        }
        None => TcpListener::bind(config.http).await.map_err(io)?,
    };
    let dns = match inherited.udp_socket(&SocketName::DNS_UDP, config.dns)? {
        Some(s) => {
            s.set_nonblocking(true).map_err(io)?;
            UdpSocket::from_std(s).map_err(io)?
        }
        None => UdpSocket::bind(config.dns).await.map_err(io)?,
    };
    for (name, addr) in inherited.close_unclaimed() {
        eprintln!("closed inherited socket {name} ({addr}): the config no longer names it");
    }
    // What the next upgrade hands over (duplicates, built while we own the
    // sockets).
    let mut mine = SocketSet::new();
    mine.insert(SocketName::HTTP, &http)?;
    mine.insert(SocketName::DNS_UDP, &dns)?;
    let (http_addr, dns_addr) = (http.local_addr().map_err(io)?, dns.local_addr().map_err(io)?);

    // 3. Serve (here the edge would also wait for its first routing table).
    let (stop, stopped) = watch::channel(false);
    let tcp = tokio::spawn(serve_tcp(http, stopped.clone()));
    let udp = tokio::spawn(serve_udp(dns, stopped));

    // 4. Ready: let the old process go, then tell systemd who we are.
    if let Some(p) = predecessor {
        match p.ready().await {
            Ok(released) => eprintln!("took over from {} (draining {:?})", released.pid, released.grace_period),
            // The old process gave up on us and keeps serving: leave.
            Err(e @ Error::Cancelled { .. }) => return Err(e),
            Err(e) => eprintln!("the old process did not confirm ({e}); serving anyway"),
        }
        let _ = notify::notify(&[State::MainPid(pid), State::Ready]);
    } else {
        let _ = notify::notify(&[State::Ready]);
    }
    println!("serving http={http_addr} dns-udp={dns_addr} pid={pid}");
    let _ = std::io::stdout().flush();

    // 5. Until SIGTERM, or a SIGQUIT whose hand-off succeeds.
    let (Ok(mut quit), Ok(mut term)) = (signal(SignalKind::quit()), signal(SignalKind::terminate())) else {
        return Err(Error::Socket {
            name: "signals".into(),
            source: std::io::Error::other("cannot install signal handlers"),
        });
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                let _ = notify::notify(&[State::Stopping]);
                break;
            }
            _ = quit.recv() => {
                let successor = match handoff.send(&mine).await {
                    Ok(offered) => offered.wait_ready().await,
                    Err(e) => Err(e),
                };
                match successor {
                    Ok(s) => {
                        // Stop accepting first, then release, then drain.
                        let _ = stop.send(true);
                        let _ = udp.await;
                        let mut conns = tcp.await.unwrap_or_default();
                        drop(mine);
                        if let Err(e) = s.release(config.grace).await {
                            eprintln!("release: {e}");
                        }
                        let _ = tokio::time::timeout(config.grace, async { while conns.join_next().await.is_some() {} }).await;
                        // No STOPPING=1: the unit goes on with the new process.
                        return Ok(());
                    }
                    Err(e) => eprintln!("upgrade failed, still serving: {e}"),
                }
            }
        }
    }
    let _ = stop.send(true);
    let _ = udp.await;
    if let Ok(mut conns) = tcp.await {
        let _ = tokio::time::timeout(config.grace, async { while conns.join_next().await.is_some() {} }).await;
    }
    Ok(())
}

/// Accepts until `stop`, returns the connections still being answered.
async fn serve_tcp(listener: TcpListener, mut stop: watch::Receiver<bool>) -> JoinSet<()> {
    let mut conns = JoinSet::new();
    let line = format!("pid {}\n", std::process::id());
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return conns,
            accepted = listener.accept() => {
                if let Ok((mut s, _)) = accepted {
                    let line = line.clone();
                    conns.spawn(async move { let _ = s.write_all(line.as_bytes()).await; });
                }
                while conns.try_join_next().is_some() {}
            }
        }
    }
}

async fn serve_udp(socket: UdpSocket, mut stop: watch::Receiver<bool>) {
    let mut buf = [0u8; 512];
    loop {
        let got = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            got = socket.recv_from(&mut buf) => got,
        };
        if let Ok((n, from)) = got {
            let mut answer = format!("pid {}: ", std::process::id()).into_bytes();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from).await;
        }
    }
}
