//! TLS: certificates loaded and checked up front (PEM, key matches,
//! validity dates), served by a resolver that picks one by SNI and whose
//! set can be swapped (a reload installs new files for new handshakes
//! without a restart); their expiry as a metric; and the CA certificates
//! that h2-over-TLS cells are verified with.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use cellgate_config::{CertFiles, Config, HttpProtocol, Problem};
use cellgate_routing::CellIdx;
use cellgate_snapshot::{metrics::Gauge, Metrics, Snapshot};
use pingora::{protocols::tls::CaType, utils::tls::WrappedX509};
use rustls::{
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// One certificate with its key, checked.
#[derive(Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// The certificate file.
    pub path: PathBuf,
    /// DNS names it serves (SAN, else the subject CN), lower case;
    /// `*.example.com` for wildcards.
    pub names: Vec<String>,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl LoadedCert {
    /// `path: names; expires <date> (in N days)`, for `cellgate check`.
    pub fn describe(&self, now: SystemTime) -> String {
        let left = self.not_after - unix(now);
        format!(
            "{}: {}; expires {} (in {} days)",
            self.path.display(),
            if self.names.is_empty() {
                "no DNS names".to_owned()
            } else {
                self.names.join(", ")
            },
            rfc3339(self.not_after),
            left / 86_400
        )
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn rfc3339(unix_secs: i64) -> String {
    let t = if unix_secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_secs as u64)
    } else {
        UNIX_EPOCH
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Loads and checks a PEM certificate chain and its private key: both
/// parse, the key matches the certificate, and `now` is within its
/// validity.
pub fn load_cert(files: &CertFiles, now: SystemTime) -> Result<LoadedCert, String> {
    let (cert, key) = (&files.cert, &files.key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read `{}`: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}` is not a PEM certificate chain: {e}", cert.display()))?;
    let Some(leaf) = chain.first().cloned() else {
        return Err(format!("`{}` holds no CERTIFICATE block", cert.display()));
    };
    let (_, x509) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| format!("`{}`: the certificate does not parse: {e}", cert.display()))?;
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("`{}` holds no usable private key: {e}", key.display()))?;
    let mismatch = || {
        format!(
            "key `{}` does not match certificate `{}`",
            key.display(),
            cert.display()
        )
    };
    let certified = CertifiedKey::from_der(chain, private, &ring::default_provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => mismatch(),
        e => format!("`{}` with key `{}`: {e}", cert.display(), key.display()),
    })?;
    certified.keys_match().map_err(|_| mismatch())?;
    let validity = x509.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let now = unix(now);
    if not_after <= now {
        return Err(format!("`{}` expired on {}", cert.display(), rfc3339(not_after)));
    }
    if not_before > now {
        return Err(format!(
            "`{}` is not valid before {}",
            cert.display(),
            rfc3339(not_before)
        ));
    }
    let mut names: Vec<String> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        path: cert.clone(),
        names,
        not_after,
    })
}

/// The certificates of the `https` listener, checked; errors carry the
/// config key.
pub fn load_certs(config: &Config, now: SystemTime) -> Result<Option<Vec<LoadedCert>>, Vec<Problem>> {
    let Some(tls) = &config.listeners.https else {
        return Ok(None);
    };
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for (i, files) in tls.certs.iter().enumerate() {
        match load_cert(files, now) {
            Ok(c) => loaded.push(c),
            Err(e) => {
                let key = if tls.certs.len() == 1 {
                    "listeners.https.cert".to_owned()
                } else {
                    format!("listeners.https.certs[{i}]")
                };
                problems.push(Problem::new(key, e));
            }
        }
    }
    if problems.is_empty() {
        Ok(Some(loaded))
    } else {
        Err(problems)
    }
}

/// Certificates by the names they serve.
#[derive(Debug, Default)]
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` by `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first certificate: clients without SNI or with another name.
    default: Option<Arc<CertifiedKey>>,
    /// (certificate file, end of validity), for the expiry metric.
    expiry: Vec<(PathBuf, i64)>,
}

impl CertSet {
    fn new(certs: &[LoadedCert]) -> Self {
        let mut set = CertSet {
            default: certs.first().map(|c| c.key.clone()),
            ..Default::default()
        };
        for c in certs {
            for n in &c.names {
                // The first certificate naming a name serves it.
                match n.strip_prefix("*.") {
                    Some(suffix) => set.wildcard.entry(suffix.to_owned()),
                    None => set.exact.entry(n.clone()),
                }
                .or_insert_with(|| c.key.clone());
            }
            set.expiry.push((c.path.clone(), c.not_after));
        }
        set
    }

    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        self.exact
            .get(&name)
            .or_else(|| name.split_once('.').and_then(|(_, parent)| self.wildcard.get(parent)))
            .or(self.default.as_ref())
            .cloned()
    }
}

/// The certificate set a TLS listener serves; swapped on reload.
pub struct CertStore {
    set: ArcSwap<CertSet>,
    metrics: Metrics,
    /// `cellgate_tls_cert_expiry_seconds{cert}` of the current set.
    gauges: Mutex<Vec<(Gauge, i64)>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("set", &self.set.load()).finish()
    }
}

impl CertStore {
    /// Serves `certs`; their expiry is exported on `metrics`.
    pub fn new(certs: Vec<LoadedCert>, metrics: Metrics) -> Arc<Self> {
        let store = Arc::new(Self {
            set: ArcSwap::from_pointee(CertSet::default()),
            metrics,
            gauges: Mutex::new(Vec::new()),
        });
        store.replace(certs);
        store
    }

    /// New handshakes use `certs`; open connections keep their session.
    pub fn replace(&self, certs: Vec<LoadedCert>) {
        let set = CertSet::new(&certs);
        let gauges = set
            .expiry
            .iter()
            .map(|(path, not_after)| {
                let path = path.display().to_string();
                (
                    self.metrics
                        .gauge("cellgate_tls_cert_expiry_seconds", &[("cert", path.as_str())]),
                    *not_after,
                )
            })
            .collect();
        *self.gauges.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
        self.set.store(Arc::new(set));
        self.refresh(SystemTime::now());
    }

    /// Sets `cellgate_tls_cert_expiry_seconds` (seconds left, negative
    /// once expired) as of `now`.
    pub fn refresh(&self, now: SystemTime) {
        let now = unix(now);
        for (g, not_after) in self.gauges.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            g.set((not_after - now) as f64);
        }
    }

    /// A rustls server config that serves this store, TLS 1.2 and 1.3,
    /// offering h2 and HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.set.load().pick(hello.server_name())
    }
}

/// Reads the CA certificates of a PEM file for verifying an upstream.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}` is not a PEM certificate list: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no CERTIFICATE block", path.display()));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("`{}`: a certificate does not parse: {e}", path.display()))?;
    }
    Ok(certs)
}

/// Checks the `tls_ca` files of h2-over-TLS cells.
pub fn check_upstream_cas(config: &Config) -> Vec<Problem> {
    config
        .cells
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.http_protocol {
            HttpProtocol::H2(tls) => tls.ca.as_ref().map(|p| (i, p)),
            _ => None,
        })
        .filter_map(|(i, p)| load_ca(p).err().map(|e| Problem::new(format!("cells[{i}].tls_ca"), e)))
        .collect()
}

/// The CA lists of h2-over-TLS cells, read once per config epoch (the
/// files were checked when the config was loaded).
#[derive(Debug, Default)]
pub(crate) struct UpstreamCas(ArcSwapOption<(u64, Vec<Option<Arc<CaType>>>)>);

impl UpstreamCas {
    /// The CA list to verify `cell`'s endpoints with; `None`: the system's.
    pub fn get(&self, s: &Snapshot, cell: CellIdx) -> Option<Arc<CaType>> {
        let epoch = s.layout.epoch;
        let cached = match self.0.load_full() {
            Some(c) if c.0 == epoch => c,
            _ => {
                let cas = s
                    .layout
                    .config
                    .cells
                    .iter()
                    .map(|c| match &c.http_protocol {
                        HttpProtocol::H2(tls) => tls.ca.as_ref().and_then(|p| match load_ca(p) {
                            Ok(ders) => Some(Arc::<CaType>::from(
                                ders.into_iter()
                                    .map(|d| WrappedX509::new(d.to_vec(), pingora::utils::tls::parse_x509))
                                    .collect::<Vec<_>>(),
                            )),
                            Err(e) => {
                                tracing::warn!(cell = %c.id, error = %e, "tls_ca unreadable: verifying with the system's roots");
                                None
                            }
                        }),
                        _ => None,
                    })
                    .collect();
                let fresh = Arc::new((epoch, cas));
                self.0.store(Some(fresh.clone()));
                fresh
            }
        };
        cached.1.get(cell.0 as usize).cloned().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn cert(names: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("cert")
    }

    #[test]
    fn garbage_mismatched_and_expired_certificates_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let a = cert(&["a.test"]);
        let b = cert(&["b.test"]);
        let files = |c: &str, k: &str| CertFiles {
            cert: write(dir.path(), "c.pem", c),
            key: write(dir.path(), "k.pem", k),
        };
        let now = SystemTime::now();
        let e = load_cert(&files("not a cert", &a.signing_key.serialize_pem()), now).expect_err("garbage");
        assert!(e.contains("holds no CERTIFICATE block"), "{e}");
        let e = load_cert(&files(&a.cert.pem(), &b.signing_key.serialize_pem()), now).expect_err("mismatch");
        assert!(e.contains("does not match"), "{e}");
        let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let key = rcgen::KeyPair::generate().expect("key");
        let old = params.self_signed(&key).expect("cert");
        let e = load_cert(&files(&old.pem(), &key.serialize_pem()), now).expect_err("expired");
        assert!(e.contains("expired on 2020-01-01T00:00:00Z"), "{e}");
        let ok = load_cert(&files(&a.cert.pem(), &a.signing_key.serialize_pem()), now).expect("valid");
        assert_eq!(ok.names, ["a.test"]);
        assert!(
            ok.describe(now).contains("a.test; expires 4096-01-01T00:00:00Z (in "),
            "{}",
            ok.describe(now)
        );
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let mut loaded = Vec::new();
        for (i, names) in [vec!["a.test"], vec!["*.b.test", "b.test"]].iter().enumerate() {
            let c = cert(names);
            let files = CertFiles {
                cert: write(dir.path(), &format!("{i}.crt"), &c.cert.pem()),
                key: write(dir.path(), &format!("{i}.key"), &c.signing_key.serialize_pem()),
            };
            loaded.push(load_cert(&files, SystemTime::now()).expect("load"));
        }
        let (a, b) = (loaded[0].key.clone(), loaded[1].key.clone());
        let set = CertSet::new(&loaded);
        let is = |name: Option<&str>, want: &Arc<CertifiedKey>| {
            assert!(Arc::ptr_eq(&set.pick(name).expect("a cert"), want), "{name:?}");
        };
        is(Some("A.test"), &a);
        is(Some("b.test"), &b);
        is(Some("x.b.test"), &b);
        is(Some("x.y.b.test"), &a);
        is(Some("other.test"), &a);
        is(None, &a);
    }
}
