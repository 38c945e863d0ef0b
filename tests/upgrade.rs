//! `cellgate run --upgrade` + SIGQUIT under load: the new process takes
//! over every listening socket (HTTP, DNS UDP and TCP, L4, admin) with no
//! failed request, no unanswered query, and open L4 connections are not cut
//! before the old process's grace period.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate_testkit::{
    process::{Process, SERVING},
    raw::RawPolicy,
    svc, DnsClient, DnsQuery, SimCells, Topology, PATIENCE,
};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn free(udp_too: bool) -> SocketAddr {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        if !udp_too || std::net::UdpSocket::bind(a).is_ok() {
            return a;
        }
    }
}

/// Spawns `cellgate run` (with `--upgrade` when asked).
fn spawn(config: &std::path::Path, socket: &std::path::Path, upgrade: bool) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellgate"));
    cmd.args(["--log-format", "json", "run", "--access-log", "off", "--config"])
        .arg(config)
        .env("CELLGATE_UPGRADE_SOCKET", socket);
    if upgrade {
        cmd.arg("--upgrade");
    }
    Process::spawn(&mut cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_loses_nothing() {
    let cells = SimCells::three().await;
    let (http, dns, tcp, admin) = (free(false), free(true), free(false), free(false));
    let t = Topology::three(&cells)
        .dns()
        .zone("example.test")
        .with(|r| {
            r.listeners.http = Some(http.to_string());
            r.listeners.dns = Some(dns.to_string());
            r.listeners.admin = Some(admin.to_string());
            r.listeners.tcp.push(cellgate_config::raw::RawTcpListener {
                listen: tcp.to_string(),
                service: "echo".into(),
            });
            r.proxy.grace_period = Some("3s".into());
            // Two UDP workers: both sockets of the SO_REUSEPORT group are
            // handed over.
            r.dns.workers = Some(2);
        })
        .with_cell("eu", |c| c.dns = vec!["127.0.1.1".into()])
        .service("app", RawPolicy::Failover, &["eu", "us", "ap"], |s| {
            svc::hosts(s, &["app.test"]);
            s.dns_name = Some("app.example.test".into());
        })
        .service("echo", RawPolicy::Failover, &["eu", "us", "ap"], |_| {});
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, t.to_toml()).expect("config");
    let socket = dir.path().join("upgrade.sock");
    let mut old = spawn(&config, &socket, false);
    old.expect_line(&[SERVING]).await;

    // Load: HTTP on new and on kept-alive connections, DNS over UDP and TCP.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for keepalive in [true, false, true, false] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
            if !keepalive {
                b = b.pool_max_idle_per_host(0);
            }
            let c = b.build().expect("client");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 20_000 {
                n += 1;
                match c.get(format!("http://{http}/")).header("host", "app.test").send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("http failed: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    for tcp_dns in [false, true] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = DnsClient::new(dns);
            let mut q = DnsQuery::new("app.example.test.", RecordType::A);
            q.tcp = tcp_dns;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 20_000 {
                n += 1;
                // `raw` panics on a timeout: catch it as a lost query.
                let asked = tokio::spawn(async move { client.ask(&q).await }).await;
                match asked {
                    Ok(m) if !DnsClient::addresses(&m).is_empty() => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("dns failed (tcp: {tcp_dns}): {:?}", other.err());
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                q = DnsQuery::new("app.example.test.", RecordType::A);
                q.tcp = tcp_dns;
            }
        }));
    }
    // A long-lived L4 connection on the old process.
    let mut l4 = tokio::net::TcpStream::connect(tcp).await.expect("l4");
    let mut line = String::new();
    tokio::io::BufReader::new(&mut l4)
        .read_line(&mut line)
        .await
        .expect("hello");
    assert_eq!(line, "eu\n");
    let warm = async {
        while ok.load(Ordering::SeqCst) < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, warm).await.expect("load runs");

    // The upgrade: start the new process, then SIGQUIT the old one.
    let mut new = spawn(&config, &socket, true);
    let listening = async {
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, listening)
        .await
        .expect("the new process waits for the sockets");
    old.signal("QUIT");
    new.expect_line(&["dns: serving on the sockets inherited", "\"inherited\":2"])
        .await;
    new.expect_line(&[SERVING]).await;
    // The old process drains: the L4 connection still works during its
    // grace period.
    let mut buf = [0u8; 6];
    l4.write_all(b"still\n").await.expect("write");
    l4.read_exact(&mut buf)
        .await
        .expect("the L4 connection outlives the hand-off");
    assert_eq!(&buf, b"still\n");
    let before = ok.load(Ordering::SeqCst);
    let more = async {
        while ok.load(Ordering::SeqCst) < before + 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, more)
        .await
        .expect("load goes on through the new process");
    let (old_status, _) = old.wait().await;
    assert!(
        old_status.success(),
        "the old process exits cleanly after its grace: {old_status:?}"
    );
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.expect("load task");
    }
    new.kill();
    eprintln!(
        "upgrade under load: {} ok, {} failed (HTTP new and kept-alive connections, DNS over UDP and TCP)",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests or queries lost in the upgrade"
    );
}
