//! HTTPS: the server's certificate and the client CAs, read from their files at start and
//! again on SIGHUP, so that a renewed certificate or CA bundle is used without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The cryptography every TLS connection of permd's uses (HTTPS, TLS to Postgres, the
/// router's and `verify`'s clients): aws-lc-rs, rustls's own default, which offers the
/// post-quantum hybrid key exchange X25519MLKEM768 first, then the classical groups.
/// ring, used until session 54, has no post-quantum key exchange, and rustls 0.23.48
/// deprecates its provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// HTTPS's settings and the files they come from. A cheap handle to share: every
/// handshake takes the current settings.
#[derive(Debug)]
pub struct ServerCerts {
    cert: PathBuf,
    key: PathBuf,
    /// A file holding the key's password, when the key is encrypted.
    key_password: Option<PathBuf>,
    /// The CAs a client's certificate must chain to, when clients must show one.
    client_ca: Option<PathBuf>,
    provider: Arc<CryptoProvider>,
    /// An `ArcSwap`: every handshake loads the settings, a reload replaces them whole, and
    /// a handshake under way keeps the settings it started with.
    current: ArcSwap<ServerConfig>,
}

impl ServerCerts {
    /// Reads the certificate (PEM: the server's, then any intermediates) and its private
    /// key (PEM: PKCS#8, PKCS#1 or SEC1; encrypted PKCS#8 with the password in the file
    /// `key_password`), which must match; and, when clients must show a certificate, the
    /// CAs it must chain to (PEM).
    pub fn load(
        cert: &Path,
        key: &Path,
        key_password: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> anyhow::Result<Arc<Self>> {
        let provider = crypto_provider();
        let current = settings(cert, (key, key_password), client_ca, &provider)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            key_password: key_password.map(Path::to_owned),
            client_ca: client_ca.map(Path::to_owned),
            provider,
            current: ArcSwap::new(current),
        }))
    }

    /// Reads the files again (the certificate, its key and its password, the client CAs)
    /// and uses what they hold from the next handshake on; on an error the settings in use
    /// stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = settings(
            &self.cert,
            (&self.key, self.key_password.as_deref()),
            self.client_ca.as_deref(),
            &self.provider,
        )?;
        self.current.store(fresh);
        Ok(())
    }

    /// The TLS settings for the next handshake: TLS 1.2 and 1.3, HTTP/1.1 announced by
    /// ALPN, the certificate, and a client certificate required when client CAs are given.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }
}

/// The settings the files make.
fn settings(
    cert: &Path,
    key: (&Path, Option<&Path>),
    client_ca: Option<&Path>,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let certified = Arc::new(read(cert, key, provider)?);
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .context("TLS settings")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(client_roots(path)?),
                Arc::clone(provider),
            )
            .build()
            .with_context(|| format!("the client CAs {}", path.display()))?,
        ),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Certified(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One certificate for every client.
#[derive(Debug)]
struct Certified(Arc<CertifiedKey>);

impl ResolvesServerCert for Certified {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The CAs of a PEM file, for client certificates.
fn client_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    roots(path, "the client CAs")
}

/// The CAs of a PEM file (`what` names them in errors: a flag, or what they are for).
pub(crate) fn roots(path: &Path, what: &str) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("read {what} {}", path.display()))?
    {
        roots
            .add(cert.with_context(|| format!("read {what} {}", path.display()))?)
            .with_context(|| format!("{what} {}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate (PEM)", path.display());
    }
    Ok(roots)
}

/// TLS settings of a client of permd's HTTPS (`permd verify`, `permd route`): the CAs of
/// the PEM file `ca` (named `what` in errors), or the system's.
pub(crate) fn client_config(ca: Option<&Path>, what: &str) -> anyhow::Result<ClientConfig> {
    let roots = match ca {
        Some(path) => roots(path, what)?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        }
    };
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .context("TLS settings")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The pair the files hold (the key decrypted with the password its file holds, if
/// given), checked to match.
fn read(
    cert: &Path,
    (key, password): (&Path, Option<&Path>),
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("read the certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate (PEM)", cert.display());
    }
    let password = password
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("read the key's password file {}", path.display()))
        })
        .transpose()?;
    // The password is the file's first line.
    let password = password
        .as_deref()
        .map(|text| text.lines().next().unwrap_or_default());
    let key_der = std::fs::read_to_string(key)
        .map_err(|e| e.to_string())
        .and_then(|pem| crate::sync::private_key(&pem, password, "--tls-key-password-file"))
        .map_err(|why| anyhow::anyhow!("read the private key {}: {why}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| {
        format!(
            "the certificate {} and the key {}",
            cert.display(),
            key.display()
        )
    })
}
