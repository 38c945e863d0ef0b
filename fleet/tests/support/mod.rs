//! A real etcd for the tests: one member on free loopback ports with its
//! own data directory, which a test can stop (SIGKILL) and start again on
//! the same ports and data; and a TCP relay a test can cut to take one
//! edge off etcd while the others stay connected.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use cellgate_config::{EtcdEndpoint, Fleet};
use cellgate_fleet::FleetStore;
use tokio::sync::watch;

pub const ETCD: &str = "etcd";

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client: SocketAddr,
    peer: SocketAddr,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let mut e = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            client: free_port(),
            peer: free_port(),
        };
        e.restart().await;
        e
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Kills etcd (SIGKILL, as a crash); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data, and waits until it
    /// answers.
    pub async fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log file");
        let data: PathBuf = self.dir.path().join("data");
        let (c, p) = (format!("http://{}", self.client), format!("http://{}", self.peer));
        let child = Command::new(ETCD)
            .args(["--name", "t", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("t={p}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{ETCD}` ({e}): install Debian's `etcd-server` package"));
        self.child = Some(child);
        let store = FleetStore::new(&fleet(&self.url(), "/ready/"), "probe").expect("store");
        let ready = async {
            while store.load().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), ready).await.is_err() {
            let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
            panic!("etcd did not come up within 20 s; its log:\n{log}");
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fleet config on one member, with test-sized timings: request timeout
/// 1 s, lease TTL 2 s (etcd's minimum), reports every 500 ms.
pub fn fleet(url: &str, prefix: &str) -> Fleet {
    let mut f = Fleet::new(vec![EtcdEndpoint::parse(url).expect("endpoint")]);
    f.prefix = prefix.to_owned();
    f.connect_timeout = Duration::from_secs(1);
    f.request_timeout = Duration::from_secs(1);
    f.lease_ttl = Duration::from_secs(2);
    f.report_interval = Duration::from_millis(500);
    f
}

/// A TCP relay to etcd that a test can cut (every connection closed, new
/// ones refused at once) and heal.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, cut_rx) = watch::channel(0u64);
        let is_open = open.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, open, cuts }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}
