//! `cellgate run` as a process: signals and exit codes. Everything else is
//! tested on edges started in-process (`cellgate-testkit`).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use cellgate_testkit::{raw::RawPolicy, svc, SimCells, Topology, PATIENCE};

/// Starts `cellgate run` on `topology` (its HTTP listener on a port picked
/// here) and waits until it serves; returns the child and the address.
async fn spawn(topology: Topology, dir: &std::path::Path) -> (std::process::Child, std::net::SocketAddr) {
    // The binary binds what the config says: a port 0 listener could not be
    // found from outside, so pick one (and retry if it is taken meanwhile).
    for _ in 0..5 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let t = topology.clone().with(|r| r.listeners.http = Some(addr.to_string()));
        let path = dir.join("edge.toml");
        std::fs::write(&path, t.to_toml()).expect("write");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellgate"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("edge node serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        match tokio::time::timeout(PATIENCE, rx).await {
            Ok(Ok(())) => return (child, addr),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
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
    let (mut child, addr) = spawn(t, dir.path()).await;
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
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
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
