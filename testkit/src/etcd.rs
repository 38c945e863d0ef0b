//! A real etcd for the tests: one member on free loopback ports with its
//! own data directory, which a test can stop (SIGKILL) and start again on
//! the same ports and data; and a TCP relay a test can cut to take one
//! edge off etcd while the others stay connected.

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

#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client: SocketAddr,
    peer: SocketAddr,
    tls: Option<Tls>,
}

/// PEM files for etcd with client TLS: a CA, etcd's certificate (IP SAN
/// 127.0.0.1) and a client certificate for the edges.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &std::path::Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let leaf = |names: Vec<String>, usages: Vec<Eku>| {
            let mut p = CertificateParams::new(names).expect("params");
            p.extended_key_usages = usages;
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], vec![Eku::ServerAuth, Eku::ClientAuth]);
        let (client_cert, client_key) = leaf(vec!["edge".into()], vec![Eku::ClientAuth]);
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr")
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts etcd with `https` client URLs and `--client-cert-auth`.
    pub async fn start_tls() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = Tls::generate(dir.path());
        Self::start_in(dir, Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), tls).await
    }

    async fn start_in(dir: tempfile::TempDir, tls: Option<Tls>) -> Self {
        let mut e = Etcd {
            child: None,
            dir,
            client: free_port(),
            peer: free_port(),
            tls,
        };
        e.restart().await;
        e
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// A test fleet config for this etcd (with the client certificate
    /// when it wants TLS).
    pub fn fleet(&self, prefix: &str) -> Fleet {
        let mut f = fleet(&self.url(), prefix);
        if let Some(t) = &self.tls {
            f.etcd.tls = Some(cellgate_config::EtcdTls {
                ca: t.ca.clone(),
                identity: Some(cellgate_config::ClientIdentity {
                    cert: t.client_cert.clone(),
                    key: t.client_key.clone(),
                }),
            });
        }
        f
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
        let (c, p) = (self.url(), format!("http://{}", self.peer));
        let mut cmd = Command::new(ETCD);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
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
        let store = FleetStore::new(&self.fleet("/ready/"), "probe").expect("store");
        let ready = async {
            let mut retry = tokio::time::interval(Duration::from_millis(50));
            while store.load().await.is_err() {
                retry.tick().await;
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
#[derive(Debug)]
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

impl crate::Topology {
    /// A `[fleet]` table on this etcd with test-sized timings (request
    /// timeout 1 s, lease 2 s, reports every 500 ms), the edge named `name`,
    /// the fleet cache beside the state file.
    pub fn fleet(self, etcd_url: &str, name: &str) -> Self {
        self.with(|r| {
            r.edge.name = name.into();
            r.fleet = Some(cellgate_config::raw::RawFleet {
                etcd: cellgate_config::raw::RawEtcd {
                    endpoints: vec![etcd_url.into()],
                    auth: None,
                    tls: None,
                },
                prefix: Some("/cellgate/".into()),
                connect_timeout: Some("1s".into()),
                request_timeout: Some("1s".into()),
                lease_ttl: Some("2s".into()),
                report_interval: Some("500ms".into()),
                cache_file: Some("{dir}/fleet.json".into()),
                partial_outage: None,
            })
        })
    }
}
