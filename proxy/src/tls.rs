//! TLS termination: certificates loaded and checked up front, served by a
//! resolver whose certificate set can be swapped (a reload installs new
//! files for new handshakes without a restart).

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use cellgate_config::{Config, Problem};
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
}

/// Loads and checks a PEM certificate chain and its private key.
pub fn load_cert(cert: &Path, key: &Path) -> Result<LoadedCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read `{}`: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}` is not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("`{}` holds no CERTIFICATE block", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("`{}` holds no usable private key: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, &ring::default_provider())
        .map_err(|e| format!("`{}` with key `{}`: {e}", cert.display(), key.display()))?;
    certified.keys_match().map_err(|e| {
        format!(
            "key `{}` does not match certificate `{}`: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(LoadedCert {
        key: Arc::new(certified),
    })
}

/// The certificates of the `https` listener, checked; errors carry the
/// config key.
pub fn load_certs(config: &Config) -> Result<Option<Vec<LoadedCert>>, Vec<Problem>> {
    let Some(tls) = &config.listeners.https else {
        return Ok(None);
    };
    match load_cert(&tls.cert, &tls.key) {
        Ok(c) => Ok(Some(vec![c])),
        Err(e) => Err(vec![Problem::new("listeners.https.cert", e)]),
    }
}

/// The certificate set a TLS listener serves; swapped on reload.
#[derive(Debug)]
pub struct CertStore(ArcSwap<Vec<LoadedCert>>);

impl CertStore {
    pub fn new(certs: Vec<LoadedCert>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::from_pointee(certs)))
    }

    /// New handshakes use `certs`; open connections keep their session.
    pub fn replace(&self, certs: Vec<LoadedCert>) {
        self.0.store(Arc::new(certs));
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
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().first().map(|c| c.key.clone())
    }
}
