//! Raw sockets for tests that need exact bytes: requests no HTTP client
//! would send, answers read as they came, and a cell that records what the
//! proxy forwarded.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::PATIENCE;

/// Sends `request` on a new connection to `addr` and returns everything
/// the other side sent until it closed (bounded by [`PATIENCE`]).
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(request)
        .await
        .unwrap_or_else(|e| panic!("write to {addr}: {e}"));
    read_to_close(&mut s).await
}

/// Reads until the peer closes (EOF or reset), bounded by [`PATIENCE`].
pub async fn read_to_close(s: &mut (impl AsyncRead + Unpin)) -> String {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .unwrap_or_else(|_| panic!("the connection stayed open for {PATIENCE:?}"));
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the peer closes the connection within `bound` (reading and
/// dropping whatever it sends meanwhile).
pub async fn closes_within(s: &mut (impl AsyncRead + Unpin), bound: Duration) -> bool {
    let closed = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, closed).await.is_ok()
}

/// Reads one HTTP/1 response with a `Content-Length` (or none, for a
/// body-less status) and returns its head and body, leaving the
/// connection open.
pub async fn read_response(s: &mut (impl AsyncRead + Unpin)) -> (String, String) {
    let mut got = Vec::new();
    let one = async {
        let mut b = [0u8; 1];
        let head_end = loop {
            match s.read(&mut b).await {
                Ok(1) => got.push(b[0]),
                _ => panic!(
                    "connection closed inside a response head: {}",
                    String::from_utf8_lossy(&got)
                ),
            }
            if got.ends_with(b"\r\n\r\n") {
                break got.len();
            }
        };
        let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)
            .await
            .unwrap_or_else(|e| panic!("response body: {e}"));
        (head, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(PATIENCE, one)
        .await
        .unwrap_or_else(|_| panic!("no complete response within {PATIENCE:?}"))
}

/// A cell that records every request head (and body bytes as far as they
/// came with it) and answers each with an empty 200.
#[derive(Debug)]
pub struct RecordingCell {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for RecordingCell {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingCell {
    pub async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let rec = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // One request at a time: a head, then its body by
                        // Content-Length (the proxy forwards no other).
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                            let len = head
                                .lines()
                                .filter_map(|l| l.split_once(':'))
                                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if buf.len() < end + 4 + len {
                                break;
                            }
                            let whole = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                            buf.drain(..end + 4 + len);
                            rec.lock().unwrap_or_else(|e| e.into_inner()).push(whole);
                            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, requests, task }
    }

    /// Every request received so far, head and body as text.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
