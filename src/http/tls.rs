//! HTTPS: the server's certificate, read from its files at start and again on SIGHUP, so
//! that a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// The certificate and key HTTPS serves, and the files they come from. A cheap handle to
/// share: every handshake reads the current pair.
#[derive(Debug)]
pub struct ServerCerts {
    cert: PathBuf,
    key: PathBuf,
    /// The CAs a client's certificate must chain to, when clients must show one (read at
    /// start only).
    client_ca: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
    /// An `ArcSwap`: every handshake loads the pair, a reload replaces it whole, and a
    /// handshake under way keeps the pair it started with.
    current: ArcSwap<CertifiedKey>,
}

impl ServerCerts {
    /// Reads the certificate (PEM: the server's, then any intermediates) and its private
    /// key (PEM: PKCS#8, PKCS#1 or SEC1), which must match; and, when clients must show a
    /// certificate, the CAs it must chain to (PEM).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = read(cert, key, &provider)?;
        let client_ca = client_ca.map(client_roots).transpose()?.map(Arc::new);
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca,
            provider,
            current: ArcSwap::from_pointee(current),
        }))
    }

    /// Reads the files again and serves what they hold from the next handshake on; on an
    /// error the pair in use stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = read(&self.cert, &self.key, &self.provider)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// The server's TLS settings: TLS 1.2 and 1.3, HTTP/1.1 announced by ALPN, the
    /// certificate as it is at each handshake, and a client certificate required when
    /// client CAs are given.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .context("TLS settings")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(roots) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::clone(roots),
                    Arc::clone(&self.provider),
                )
                .build()
                .context("the client CAs")?,
            ),
        };
        let mut config =
            builder.with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The CAs of a PEM file, for client certificates.
fn client_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read the client CAs {}", path.display()))?
    {
        roots
            .add(cert.with_context(|| format!("read the client CAs {}", path.display()))?)
            .with_context(|| format!("the client CAs {}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate (PEM)", path.display());
    }
    Ok(roots)
}

/// The pair the files hold, checked to match.
fn read(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read the certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate (PEM)", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read the private key {}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| {
        format!(
            "the certificate {} and the key {}",
            cert.display(),
            key.display()
        )
    })
}
