//! The L4 proxy end to end: plain TCP and TLS passthrough by SNI, with a
//! real rustls client whose TLS session ends at the cell, not the edge.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use support::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cell that speaks TLS itself: presents a certificate for `app.test` and
/// writes its id over the TLS session, then echoes.
async fn tls_cell(id: &'static str, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der())),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let _ = tls.write_all(format!("{id}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn config(cells: &[(&str, u16)], extra: &str) -> String {
    let mut t = EDGE_HEAD
        .replace(
            "[listeners]\nhttp = \"127.0.0.1:{http}\"\n",
            "[listeners]\nhttp = \"127.0.0.1:{http}\"\nadmin = \"127.0.0.1:{admin}\"\ntls_passthrough = [\"127.0.0.1:{dns}\"]\n",
        )
        .replace("grace_period = \"1s\"", "grace_period = \"1s\"\nclient_hello_timeout = \"500ms\"");
    t += "\n[admin]\ntokens = [{ name = \"t\", env = \"CELLGATE_TEST_ADMIN_TOKEN\" }]\n";
    t += extra;
    for (id, port) in cells {
        // Health is checked over TCP on the cell's own port.
        t += &format!(
            "[[cells]]\nid = \"{id}\"\nregion = \"{id}\"\nlocation = {{ lat = 50.0, lon = 8.0 }}\ncountry = \"DE\"\ntcp = [\"127.0.0.1:{port}\"]\nhealth = {{ kind = \"tcp\" }}\n"
        );
    }
    let ids: Vec<String> = cells.iter().map(|(id, _)| format!("\"{id}\"")).collect();
    t += &format!(
        "[[services]]\nname = \"tls\"\nhosts = [\"app.test\", \"*.app.test\"]\ncells = [{}]\npolicy = \"failover\"\nshard_key = \"sni\"\n",
        ids.join(", ")
    );
    t += &format!(
        "[[services]]\nname = \"echo\"\ncells = [{}]\npolicy = \"failover\"\nshard_key = \"client_addr\"\n",
        ids.join(", ")
    );
    t
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(3), r.read_line(&mut line))
        .await
        .expect("timely")
        .expect("read");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_by_sni_ends_at_the_cell_and_fails_over() {
    let cert = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).expect("cert");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let us = tls_cell("us", &cert).await;
    let ap = tls_cell("ap", &cert).await;
    // "dead" is first in failover order, but its port is closed: refused.
    let edge = Edge::start(&config(&[("dead", closed), ("us", us), ("ap", ap)], ""));

    // TLS passthrough by SNI: the client verifies the *cell's* certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.cert.der().to_vec())).expect("root");
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("app.test").expect("name"), tcp)
        .await
        .expect("TLS with the cell");
    let mut line = String::new();
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).await.expect("read");
    line.push_str(&String::from_utf8_lossy(&buf[..n]));
    assert_eq!(line, "us\n", "refused on `dead`, failed over to the next cell");
    tls.write_all(b"ping").await.expect("write");
    let n = tls.read(&mut buf).await.expect("read");
    assert_eq!(&buf[..n], b"ping");

    // A wildcard name of the same service, and an unknown one.
    let tcp = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from("x.app.test").expect("name"), tcp)
        .await;
    assert!(
        tls.is_err(),
        "the cell's certificate is for app.test only: the client must refuse it"
    );
    let tcp = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    tls = connector
        .connect(ServerName::try_from("nope.test").expect("name"), tcp)
        .await;
    assert!(tls.is_err(), "unknown SNI: closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_echo_drain_semantics_and_bad_input() {
    let (_a, a) = start_cell("eu").await;
    let (_b, b) = start_cell("us").await;
    // No shard key: a key homed on a soft-drained cell would rightly stay there.
    let mut cfg = config(&[("eu", a.tcp), ("us", b.tcp)], "").replace("shard_key = \"client_addr\"\n", "");
    let tcp_port = free_port();
    cfg += &format!("[[listeners.tcp]]\nlisten = \"127.0.0.1:{tcp_port}\"\nservice = \"echo\"\n");
    let edge = Edge::start(&cfg);
    let mut s = TcpStream::connect(addr(tcp_port)).await.expect("connect");
    assert_eq!(read_line(&mut s).await, "eu\n");
    s.write_all(b"hello\n").await.expect("write");
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"hello\n");

    // Bad input on the passthrough listener: garbage, truncated hello,
    // unknown SNI, silence. Each closes cleanly; the good connection lives.
    let mut garbage = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    let mut truncated = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    truncated
        .write_all(&[22, 3, 1, 0x02, 0x00, 1, 0, 1])
        .await
        .expect("write");
    truncated.shutdown().await.expect("shutdown");
    let silent = TcpStream::connect(addr(edge.dns)).await.expect("connect");
    for mut conn in [garbage, truncated, silent] {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(3), conn.read(&mut b))
            .await
            .expect("closed in time");
        assert!(matches!(r, Ok(0) | Err(_)), "closed without data");
    }
    s.write_all(b"still\n").await.expect("write");
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"still\n");
    let m = reqwest::get(edge.admin_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for reason in ["bad_client_hello", "truncated_client_hello", "client_hello_timeout"] {
        assert!(
            m.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted:\n{m}"
        );
    }

    // Soft drain: the open connection stays until the deadline; new ones go elsewhere.
    let drain = |body: serde_json::Value| {
        let url = edge.admin_url("/api/v1/cells/eu/drain");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&body)
                .send()
                .await
                .expect("drain");
            assert!(r.status().is_success(), "{}", r.text().await.unwrap_or_default());
        }
    };
    drain(json!({"mode": "soft", "deadline": "1500ms", "force": true})).await;
    let mut fresh = TcpStream::connect(addr(tcp_port)).await.expect("connect");
    assert_eq!(
        read_line(&mut fresh).await,
        "us\n",
        "new connections avoid a drained cell"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(b"soft!\n").await.expect("write");
    s.read_exact(&mut buf).await.expect("still open during a soft drain");
    let t0 = Instant::now();
    let mut b = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut b))
        .await
        .expect("closed at the deadline");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Hard drain of us closes its connection at once.
    let url = edge.admin_url("/api/v1/cells/us/drain");
    let r = reqwest::Client::new()
        .post(url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"mode": "hard", "force": true}))
        .send()
        .await
        .expect("drain");
    assert!(r.status().is_success());
    let r = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut b))
        .await
        .expect("closed at once");
    assert!(matches!(r, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_tells_the_cell_the_client_address() {
    // A "cell" that records the first bytes it receives.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            // Health checks connect and close; the proxied one sends the
            // header and then the payload, maybe in separate segments.
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 28 + 7 {
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if !got.is_empty() {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(got);
                }
            }
        }
    });
    let tcp_port = free_port();
    let mut cfg = config(&[("eu", port)], "");
    cfg = cfg.replace("name = \"echo\"\n", "name = \"echo\"\nproxy_protocol = true\n");
    cfg += &format!("[[listeners.tcp]]\nlisten = \"127.0.0.1:{tcp_port}\"\nservice = \"echo\"\n");
    let _edge = Edge::start(&cfg);
    let mut s = TcpStream::connect(addr(tcp_port)).await.expect("connect");
    let local = s.local_addr().expect("local");
    s.write_all(b"payload").await.expect("write");
    let got = tokio::time::timeout(Duration::from_secs(3), rx)
        .await
        .expect("in time")
        .expect("bytes");
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([got[24], got[25]]),
        local.port(),
        "the client's own port"
    );
    assert_eq!(&got[28..], b"payload");
}

/// Bulk transfer over loopback, direct and through the edge (printed, not
/// asserted: the machine is shared and noisy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_throughput_through_the_l4_path() {
    let (_a, a) = start_cell("eu").await;
    let tcp_port = free_port();
    let mut cfg = config(&[("eu", a.tcp)], "");
    cfg += &format!("[[listeners.tcp]]\nlisten = \"127.0.0.1:{tcp_port}\"\nservice = \"echo\"\n");
    let _edge = Edge::start(&cfg);
    const MB: usize = 64;
    async fn run(port: u16) -> f64 {
        let mut s = TcpStream::connect(addr(port)).await.expect("connect");
        read_line(&mut s).await;
        let (mut r, mut w) = s.into_split();
        let chunk = vec![7u8; 256 * 1024];
        let t0 = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..(MB * 4) {
                w.write_all(&chunk).await.expect("write");
            }
            w
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        while got < MB * 1024 * 1024 {
            let n = r.read(&mut buf).await.expect("read");
            assert!(n > 0);
            got += n;
        }
        let _ = writer.await;
        (MB as f64) / t0.elapsed().as_secs_f64()
    }
    let direct = run(a.tcp).await;
    let proxied = run(tcp_port).await;
    eprintln!("L4 bulk echo over loopback, {MB} MiB each way: direct {direct:.0} MiB/s, through cellgate {proxied:.0} MiB/s ({:.2}x)", proxied / direct);
    assert!(proxied > 0.0);
}
