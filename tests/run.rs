//! `cellgate run` as a process: signals and exit codes. Everything else is
//! tested on edges started in-process (`cellgate-testkit`).

use std::{process::Command, time::Duration};

use cellgate_testkit::{
    process::{Process, SERVING},
    raw::RawPolicy,
    svc, SimCells, Topology, PATIENCE,
};

/// Starts `cellgate --log-format json run` on `topology` (its HTTP
/// listener on a port picked here) and waits until it serves; returns the
/// process and the address.
async fn spawn(topology: Topology, dir: &std::path::Path) -> (Process, std::net::SocketAddr) {
    // The binary binds what the config says: a port 0 listener could not be
    // found from outside, so pick one (and retry if it is taken meanwhile).
    for _ in 0..5 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let t = topology.clone().with(|r| r.listeners.http = Some(addr.to_string()));
        let path = dir.join("edge.toml");
        std::fs::write(&path, t.to_toml()).expect("write");
        let mut p = Process::spawn(
            Command::new(env!("CARGO_BIN_EXE_cellgate"))
                .args(["--log-format", "json", "run", "--config"])
                .arg(&path),
        );
        if p.wait_for(&[SERVING]).await {
            return (p, addr);
        }
        p.kill();
    }
    panic!("cellgate run did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    let cells = SimCells::three().await;
    let t = Topology::three(&cells).service("fo", RawPolicy::Failover, &["eu", "us", "ap"], |s| {
        svc::hosts(s, &["fo.test"])
    });
    let dir = tempfile::tempdir().expect("dir");
    let (child, addr) = spawn(t, dir.path()).await;
    cells.control("eu", "/latency?ms=500").await;
    let inflight = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("http://{addr}/"))
            .header("host", "fo.test")
            .send()
            .await
            .map(|r| r.status())
    });
    let at_cell = async {
        while cells.get("eu").requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(PATIENCE, at_cell)
        .await
        .expect("request reached the cell");
    child.signal("TERM");
    let (status, _) = child.wait().await;
    assert_eq!(inflight.await.expect("join").expect("response"), 200);
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_config_exits_one_with_the_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[edge]\nname = \"e\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("location"), "{out:?}");
}

/// What clients get wrong is answered, logged in the access log and kept
/// out of the error log (pingora logs some of it at ERROR by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_misbehaviour_gets_access_lines_and_no_error_lines() {
    use cellgate_testkit::wire::exchange;
    use tokio::io::AsyncWriteExt;
    let cells = SimCells::three().await;
    let t = Topology::three(&cells).service("app", RawPolicy::Geo, &["eu", "us", "ap"], |s| {
        svc::hosts(s, &["app.test"])
    });
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, addr) = spawn(t, dir.path()).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let probes: Vec<(&[u8], &str)> = vec![
        (
            b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 400",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: app.test\r\nBad Name: v\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (
            b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n",
            "HTTP/1.1 405",
        ),
        (big.as_bytes(), "HTTP/1.1 431"),
    ];
    for (probe, want) in &probes {
        let r = exchange(addr, probe).await;
        assert!(
            r.starts_with(want),
            "{:?}: {r}",
            String::from_utf8_lossy(&probe[..probe.len().min(40)])
        );
        assert!(!r.contains("Pingora"), "{r}");
    }
    // Half a head, then the client goes away.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: app").await.expect("write");
    drop(s);
    // A normal request last: its access line comes after the others'.
    let r = exchange(
        addr,
        b"GET /done HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    child.expect_line(&["/done"]).await;
    child.signal("TERM");
    let (_, lines) = child.wait().await;
    let errors: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(r#""level":"ERROR""#) || (l.contains(r#""level":"WARN""#) && l.contains("pingora")))
        .collect();
    assert!(
        errors.is_empty(),
        "client misbehaviour logged as an error:\n{errors:#?}"
    );
    let access: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "cellgate::access")
        .collect();
    for status in [400, 405, 431] {
        assert!(
            access.iter().any(|v| v["fields"]["status"] == status),
            "no access line with status {status}:\n{access:#?}"
        );
    }
    assert_eq!(
        access.iter().filter(|v| v["fields"]["status"] == 400).count(),
        5,
        "{access:#?}"
    );
}
