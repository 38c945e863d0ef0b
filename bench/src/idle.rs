//! Resident memory of a proxy holding many idle keep-alive client
//! connections: each connection sends one request, reads the answer, then
//! stays open and idle.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

/// Resident set size of a process, in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))
}

fn total_rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// Sends one GET and reads one whole response (Content-Length bodies only).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> anyhow::Result<()> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before a whole response");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                bail!("response head over 64 KiB");
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("{}", head.lines().next().unwrap_or("empty response"));
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("response without content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

pub async fn run(addr: SocketAddr, host: &str, conns: usize, pids: &[u32], hold: Duration) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address");
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cellgate-bench-idle\r\n\r\n").into_bytes();
    let before = total_rss(pids)?;
    let mut open = Vec::with_capacity(conns);
    let mut errors = Vec::new();
    let mut remaining = conns;
    // 256 handshakes at a time: fast, and gentle on the accept queue.
    while remaining > 0 {
        let batch = remaining.min(256);
        remaining -= batch;
        let mut set = JoinSet::new();
        for _ in 0..batch {
            let request = request.clone();
            set.spawn(async move {
                let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
                tokio::time::timeout(Duration::from_secs(5), exchange(&mut s, &request)).await??;
                anyhow::Ok(s)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => open.push(s),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    tokio::time::sleep(hold).await;
    let during = total_rss(pids)?;
    // Are they still usable? A second request on each, which also proves the
    // proxy kept them rather than closing idle ones.
    let n_open = open.len();
    let mut alive = 0usize;
    let mut streams = open.into_iter();
    loop {
        let batch: Vec<TcpStream> = streams.by_ref().take(256).collect();
        if batch.is_empty() {
            break;
        }
        let mut set = JoinSet::new();
        for mut s in batch {
            let request = request.clone();
            set.spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), exchange(&mut s, &request))
                    .await
                    .is_ok_and(|r| r.is_ok())
            });
        }
        while let Some(r) = set.join_next().await {
            alive += usize::from(r.unwrap_or(false));
        }
    }
    let per_conn = (during.saturating_sub(before) as f64 * 1024.0) / n_open.max(1) as f64;
    println!(
        "{{\"conns_asked\": {conns}, \"conns_open\": {}, \"conns_alive_after_hold\": {alive}, \"rss_before_kib\": {before}, \"rss_idle_kib\": {during}, \"bytes_per_conn\": {per_conn:.0}, \"errors\": {}}}",
        n_open,
        errors.len()
    );
    if let Some(e) = errors.first() {
        eprintln!("idle: {} connections failed, first: {e}", errors.len());
    }
    Ok(())
}
