//! TLS to Postgres, below the COPY tap.
//!
//! tokio-postgres can run TLS itself, but only over the socket it is given, so the tap
//! (`tap.rs`) would sit under the encryption and see ciphertext. permd therefore does what
//! libpq does before the start-up message itself: it sends the SSLRequest, reads the
//! server's one-byte answer and, on `S`, runs a rustls handshake over the TCP socket. The tap
//! then wraps the TLS stream, and tokio-postgres runs the protocol over it as over a plain
//! socket (`sslmode` is taken out of the URL before tokio-postgres reads it, which rejects
//! `verify-ca`, `verify-full` and `sslrootcert`).
//!
//! The options follow libpq's:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (the default) | when the server accepts it | not checked |
//! | `require` | always | not checked, unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca` | always | signed by a trusted CA |
//! | `verify-full` | always | signed by a trusted CA, and names the host |
//!
//! The trusted CAs are those of the PEM file `sslrootcert`, or the system's store when it
//! is absent or `system`. `sslcert` and `sslkey` (PEM) give a client certificate, its key
//! encrypted (PKCS#8) under `sslpassword` or not. `sslcrl` and `sslcrldir` give revocation
//! lists that the server's certificate is checked against where its chain is.
//! `sslcertmode`, `sslsni` and `ssl_min_protocol_version`/`ssl_max_protocol_version` are
//! read as libpq reads them (rustls speaks TLS 1.2 and 1.3); `sslcompression` and
//! `gssencmode=disable`/`prefer` are taken and have nothing to do (Postgres has no TLS
//! compression since 14; permd has no GSSAPI, as a libpq built without it). A Unix
//! socket never uses TLS, as in libpq. `allow` tries TLS first (libpq tries plain first):
//! either way the connection works when the server takes either.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha224, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, TlsConnect};
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::conninfo;
use super::environment::{self, Env};
use super::Error;

/// The options of a database URL that this module reads (and takes out of it).
const OPTIONS: [&str; 14] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "gssencmode",
];

/// An SSLRequest: its length (8) and the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The ALPN protocol name of Postgres (17 and later), for `sslnegotiation=direct`.
const ALPN: &[u8] = b"postgresql";

/// `sslmode`, as libpq reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Never TLS.
    Disable,
    /// TLS if the server takes it, unchecked (libpq's `allow` and `prefer`).
    Prefer,
    /// TLS or nothing; the certificate checked only when `sslrootcert` is given.
    Require,
    /// TLS or nothing; the certificate signed by a trusted CA.
    VerifyCa,
    /// TLS or nothing; the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

/// How the sync connection speaks TLS: read from the URL by [`split`], with the files it
/// names read at once (so a missing or unreadable file is an error at start, and a
/// certificate renewed on disk is read again at the next connection).
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) mode: Mode,
    /// The handshake's settings; `None` for `disable`.
    client: Option<Arc<ClientConfig>>,
    /// `sslcertmode=require`: a server that does not ask for a client certificate is refused.
    certificate_asked: bool,
    /// `sslnegotiation=direct`: the handshake at once, without an SSLRequest.
    direct: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

/// The TLS options of a database URL, as written.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `sslmode`, if given.
    pub mode: Option<String>,
    /// `sslrootcert`: a PEM file of trusted CAs, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert`: the client's certificate (PEM).
    pub cert: Option<String>,
    /// `sslkey`: the client's private key (PEM; PKCS#8 encrypted under `sslpassword`, or
    /// not encrypted).
    pub key: Option<String>,
    /// `sslpassword`: the password `sslkey` is encrypted under. Never printed.
    pub password: Option<String>,
    /// `sslcrl`: a PEM file of certificate revocation lists, checked with the server's
    /// certificate where its chain is checked.
    pub crl: Option<String>,
    /// `sslcrldir`: a directory of such files (each of its files is read).
    pub crl_dir: Option<String>,
    /// `sslcertmode`: `allow` (the default: the client certificate, if given, when the
    /// server asks), `disable` (never), `require` (the server must ask for it).
    pub cert_mode: Option<String>,
    /// `sslsni`: `1` (the default) sends the host's name in the handshake, `0` does not.
    pub sni: Option<String>,
    /// `ssl_min_protocol_version`, `ssl_max_protocol_version`: `TLSv1` to `TLSv1.3`.
    pub protocol_versions: (Option<String>, Option<String>),
    /// `sslnegotiation`: `postgres` (the default: an SSLRequest first) or `direct` (the
    /// TLS handshake at once, Postgres 17 and later).
    pub negotiation: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("password", &self.password.as_ref().map(|_| "(given)"))
            .field("crl", &self.crl)
            .field("crl_dir", &self.crl_dir)
            .field("cert_mode", &self.cert_mode)
            .field("sni", &self.sni)
            .field("protocol_versions", &self.protocol_versions)
            .field("negotiation", &self.negotiation)
            .finish()
    }
}

/// Takes the TLS options out of a database URL (`postgres://…?sslmode=…` or key=value
/// form), returning what is left of it and the options. A string that cannot be read is
/// returned whole, for tokio-postgres or sqlx to say why.
pub fn split(url: &str) -> Result<(String, TlsOptions), Error> {
    split_with(url, &|_| None)
}

/// [`split`], with what the URL leaves out taken from `env` (`PGSSLMODE`, …), and then, as
/// libpq takes them, from the files of `~/.postgresql/` that exist: `root.crt`
/// (`sslrootcert`), `root.crl` (`sslcrl`), `postgresql.crt` (`sslcert`), and
/// `postgresql.key` (`sslkey`) beside a client certificate.
pub(crate) fn split_with(url: &str, env: Env<'_>) -> Result<(String, TlsOptions), Error> {
    let (rest, mut taken) = conninfo::take(url, &OPTIONS);
    for (name, variable) in environment::TLS {
        if !taken.iter().any(|(taken, _)| taken == name) {
            if let Some(value) = env(variable) {
                taken.push((name.to_owned(), value));
            }
        }
    }
    let mut options = TlsOptions::default();
    let named = |name: &str| taken.iter().any(|(taken, _)| taken == name);
    let defaults = env("HOME")
        .map(|home| std::path::PathBuf::from(home).join(".postgresql"))
        .map(|dir| {
            let found = |file: &str| {
                let path = dir.join(file);
                path.is_file().then(|| path.display().to_string())
            };
            // As libpq: a client certificate, named or found, brings the key's file
            // (found or not).
            let cert = (!named("sslcert"))
                .then(|| found("postgresql.crt"))
                .flatten();
            let key = ((cert.is_some() || named("sslcert")) && !named("sslkey"))
                .then(|| dir.join("postgresql.key").display().to_string());
            let root = (!named("sslrootcert")).then(|| found("root.crt")).flatten();
            let crl = (!named("sslcrl") && !named("sslcrldir"))
                .then(|| found("root.crl"))
                .flatten();
            [
                ("sslcert", cert),
                ("sslkey", key),
                ("sslrootcert", root),
                ("sslcrl", crl),
            ]
        });
    for (name, value) in defaults.into_iter().flatten() {
        if let Some(value) = value {
            taken.push((name.to_owned(), value));
        }
    }
    for (name, value) in taken {
        match name.as_str() {
            "sslmode" => options.mode = Some(value),
            "sslrootcert" => options.root_cert = Some(value),
            "sslcert" => options.cert = Some(value),
            "sslkey" => options.key = Some(value),
            "sslpassword" => options.password = Some(value),
            "sslcrl" => options.crl = Some(value),
            "sslcrldir" => options.crl_dir = Some(value),
            "sslcertmode" => options.cert_mode = Some(value),
            "sslsni" => options.sni = Some(value),
            "ssl_min_protocol_version" => options.protocol_versions.0 = Some(value),
            "ssl_max_protocol_version" => options.protocol_versions.1 = Some(value),
            // Postgres 14 and later have no TLS compression; libpq ignores it too.
            "sslcompression" if value == "0" || value == "1" => {}
            // No GSSAPI here, as in a libpq built without it: what would use it is refused.
            "gssencmode" if value == "disable" || value == "prefer" => {}
            "gssencmode" if value == "require" => {
                return Err(Error::Url(
                    "gssencmode=require: permd has no GSSAPI encryption; encrypt with TLS \
                     (sslmode=verify-full)"
                        .into(),
                ))
            }
            "sslnegotiation" => options.negotiation = Some(value),
            _ => {
                return Err(Error::Url(format!(
                    "{name}={value} is not a value libpq takes for {name}"
                )))
            }
        }
    }
    Ok((rest, options))
}

impl TlsOptions {
    /// Reads the options into the handshake's settings, reading the files they name.
    pub(crate) fn load(&self) -> Result<Tls, Error> {
        let mode = match self.mode.as_deref() {
            None | Some("prefer" | "allow") => Mode::Prefer,
            Some("disable") => Mode::Disable,
            Some("require") if self.root_cert.is_some() => Mode::VerifyCa,
            Some("require") => Mode::Require,
            Some("verify-ca") => Mode::VerifyCa,
            Some("verify-full") => Mode::VerifyFull,
            Some(other) => {
                return Err(Error::Url(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                )))
            }
        };
        let direct = match self.negotiation.as_deref() {
            None | Some("postgres") => false,
            // As libpq: a weaker mode could fall back to plain text with a server that
            // does not take a direct handshake.
            Some("direct") if matches!(mode, Mode::Disable | Mode::Prefer) => {
                return Err(Error::Url(
                    "sslnegotiation=direct needs sslmode=require, verify-ca or verify-full (a \
                     weaker mode could fall back to plain text)"
                        .into(),
                ))
            }
            Some("direct") => true,
            Some(other) => {
                return Err(Error::Url(format!(
                    "sslnegotiation={other} is not postgres or direct"
                )))
            }
        };
        if mode == Mode::Disable {
            return Ok(Tls {
                mode,
                client: None,
                certificate_asked: false,
                direct,
            });
        }
        let provider = crate::http::crypto_provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions()?)
            .map_err(|e| Error::Url(format!("TLS: {e}")))?;
        let (chain, pinned) = match mode {
            Mode::Disable | Mode::Prefer | Mode::Require => (None, Vec::new()),
            Mode::VerifyCa | Mode::VerifyFull => {
                let (roots, pinned) = self.roots()?;
                let chain =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .with_crls(self.crls()?)
                        .build()
                        .map_err(|e| Error::Url(format!("sslrootcert: {e}")))?;
                (Some(chain), pinned)
            }
        };
        let verifier = Arc::new(Verifier {
            provider,
            chain,
            pinned,
            full: mode == Mode::VerifyFull,
        });
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let certificate_asked = match self.cert_mode.as_deref() {
            None | Some("allow" | "disable") => false,
            Some("require") => true,
            Some(other) => {
                return Err(Error::Url(format!(
                    "sslcertmode={other} is not one of disable, allow, require"
                )))
            }
        };
        let certificate = match self.cert_mode.as_deref() {
            Some("disable") => (None, None),
            _ => (self.cert.as_ref(), self.key.as_ref()),
        };
        let mut config = match certificate {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| Error::Url(format!("sslcert={cert}: {e}")))?;
                let key_der = client_key(key, self.password.as_deref())?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| Error::Url(format!("sslcert and sslkey: {e}")))?
            }
            _ => {
                return Err(Error::Url(
                    "sslcert and sslkey go together: give both, or neither".into(),
                ))
            }
        };
        config.enable_sni = match self.sni.as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => return Err(Error::Url(format!("sslsni={other} is not 0 or 1"))),
        };
        if direct {
            // A Postgres server takes a direct handshake only with its ALPN name.
            config.alpn_protocols = vec![ALPN.to_vec()];
        }
        Ok(Tls {
            mode,
            client: Some(Arc::new(config)),
            certificate_asked,
            direct,
        })
    }

    /// The TLS versions of `ssl_min_protocol_version` to `ssl_max_protocol_version` (libpq's
    /// default: TLS 1.2 and up) that rustls speaks: 1.2 and 1.3.
    fn versions(&self) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, Error> {
        const NAMES: [&str; 4] = ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"];
        let bound = |option: &str, value: &Option<String>, default: usize| match value.as_deref() {
            None | Some("") => Ok(default),
            Some(value) => NAMES
                .iter()
                .position(|name| name.eq_ignore_ascii_case(value))
                .ok_or_else(|| {
                    Error::Url(format!(
                        "{option}={value} is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"
                    ))
                }),
        };
        let (min, max) = &self.protocol_versions;
        let (low, high) = (
            bound("ssl_min_protocol_version", min, 2)?,
            bound("ssl_max_protocol_version", max, 3)?,
        );
        if low > high {
            return Err(Error::Url(format!(
                "ssl_min_protocol_version={} is above ssl_max_protocol_version={}",
                NAMES[low], NAMES[high]
            )));
        }
        let versions: Vec<_> = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(rank, _)| (low..=high).contains(rank))
            .map(|(_, version)| version)
            .collect();
        if versions.is_empty() {
            return Err(Error::Url(format!(
                "ssl_max_protocol_version={}: permd speaks TLS 1.2 and 1.3 only",
                NAMES[high]
            )));
        }
        Ok(versions)
    }

    /// The CAs a verified certificate must chain to.
    fn roots(&self) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), Error> {
        let mut roots = RootCertStore::empty();
        let mut pinned = Vec::new();
        match self.root_cert.as_deref() {
            Some(path) if path != "system" => {
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| Error::Url(format!("sslrootcert={path}: {e}")))?
                {
                    let cert = cert.map_err(|e| Error::Url(format!("sslrootcert={path}: {e}")))?;
                    roots
                        .add(cert.clone())
                        .map_err(|e| Error::Url(format!("sslrootcert={path}: {e}")))?;
                    pinned.push(cert);
                }
                if roots.is_empty() {
                    return Err(Error::Url(format!(
                        "sslrootcert={path} holds no certificate (PEM)"
                    )));
                }
            }
            _ => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(Error::Url(format!(
                        "sslmode={} checks the server's certificate, and no sslrootcert is \
                         given nor any CA found in the system's store: give the CA's PEM file \
                         as sslrootcert=PATH",
                        self.mode.as_deref().unwrap_or("prefer")
                    )));
                }
            }
        }
        Ok((roots, pinned))
    }

    /// The revocation lists of `sslcrl` and of every file in `sslcrldir` (PEM), which the
    /// server's certificate is checked against wherever its chain is (`verify-ca`,
    /// `verify-full`, `require` with `sslrootcert`); elsewhere, as in libpq, they go
    /// unused. Once lists are given, every certificate of the chain must be covered by
    /// one of its issuer's, as OpenSSL checks them for libpq.
    fn crls(&self) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
        let mut files = Vec::new();
        if let Some(file) = &self.crl {
            files.push((format!("sslcrl={file}"), std::path::PathBuf::from(file)));
        }
        if let Some(dir) = &self.crl_dir {
            let bad = |e: std::io::Error| Error::Url(format!("sslcrldir={dir}: {e}"));
            let mut entries = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(bad)? {
                let path = entry.map_err(bad)?.path();
                if path.is_file() {
                    entries.push((format!("sslcrldir={dir}: {}", path.display()), path));
                }
            }
            entries.sort();
            files.extend(entries);
        }
        let mut crls = Vec::new();
        for (name, path) in files {
            let found = CertificateRevocationListDer::pem_file_iter(&path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| Error::Url(format!("{name}: {e}")))?;
            crls.extend(found);
        }
        // No list at all would check nothing: refused rather than left open.
        if crls.is_empty() && (self.crl.is_some() || self.crl_dir.is_some()) {
            let given: Vec<String> = [("sslcrl", &self.crl), ("sslcrldir", &self.crl_dir)]
                .into_iter()
                .filter_map(|(option, value)| Some(format!("{option}={}", value.as_ref()?)))
                .collect();
            return Err(Error::Url(format!(
                "{} holds no certificate revocation list (PEM, BEGIN X509 CRL)",
                given.join(" and ")
            )));
        }
        Ok(crls)
    }
}

/// The client's private key, from the PEM file `path`, decrypted with `password`
/// (`sslpassword`) as libpq does ([`private_key`]).
fn client_key(path: &str, password: Option<&str>) -> Result<PrivateKeyDer<'static>, Error> {
    let bad = |why: &dyn std::fmt::Display| Error::Url(format!("sslkey={path}: {why}"));
    let pem = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    private_key(&pem, password, "sslpassword").map_err(|why| bad(&why))
}

/// A private key from the PEM text `pem` (PKCS#8, PKCS#1 or SEC1). A key encrypted as
/// PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`: what `openssl genpkey -aes256` and `openssl
/// pkcs8 -topk8` write) is decrypted with `password`, given by `option` (named in the
/// errors); a password given for a key that is not encrypted is not used, as in libpq.
/// OpenSSL's older encryption (`Proc-Type: 4,ENCRYPTED` in the PEM) is refused with the
/// command that converts it. The client's key to Postgres and HTTPS's key are read by it.
pub(crate) fn private_key(
    pem: &str,
    password: Option<&str>,
    option: &str,
) -> Result<PrivateKeyDer<'static>, String> {
    if pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(
            "the key is encrypted the old OpenSSL way, which permd does not \
                    read: convert it to encrypted PKCS#8 (openssl pkcs8 -topk8 -v2 aes-256-cbc \
                    -in KEY -out NEW)"
                .into(),
        );
    }
    const BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
    const END: &str = "-----END ENCRYPTED PRIVATE KEY-----";
    let Some(start) = pem.find(BEGIN) else {
        return PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string());
    };
    let Some(password) = password else {
        return Err(format!(
            "the key is encrypted: give its password as {option}"
        ));
    };
    let block = pem[start..]
        .find(END)
        .map(|end| &pem[start..start + end + END.len()])
        .ok_or_else(|| format!("no {END} after its BEGIN line"))?;
    let (_, encrypted) =
        pkcs8::der::pem::decode_vec(block.as_bytes()).map_err(|e| e.to_string())?;
    let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(encrypted.as_slice())
        .map_err(|e| e.to_string())?;
    let key = info.decrypt(password).map_err(|_| {
        format!(
            "could not decrypt the key with {option} (a wrong password, or a cipher other \
             than PBES2's AES-CBC with PBKDF2 or scrypt)"
        )
    })?;
    Ok(PrivateKeyDer::Pkcs8(key.as_bytes().to_vec().into()))
}

impl Tls {
    /// Asks the server on `stream` for TLS and, if it agrees, runs the handshake (with
    /// `sslnegotiation=direct`, runs it at once); `host` is the name (or address) the
    /// certificate must hold for `verify-full`. The stream stays plain (`Right`) when the
    /// mode allows it and the server declines.
    pub(crate) async fn negotiate(
        &self,
        mut stream: TcpStream,
        host: &str,
    ) -> Result<Either<TlsStream<TcpStream>, TcpStream>, Error> {
        let Some(client) = &self.client else {
            return Ok(Either::Right(stream));
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| Error::Tls(format!("{host} is not a host name TLS can check: {e}")))?;
        if self.direct {
            let stream = self.handshake(client, name, stream).await?;
            if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
                return Err(Error::Tls(
                    "the server took the direct TLS handshake without agreeing to ALPN \
                     postgresql, as a Postgres server would (sslnegotiation=direct)"
                        .into(),
                ));
            }
            return Ok(Either::Left(stream));
        }
        stream
            .write_all(&SSL_REQUEST)
            .await
            .map_err(Error::Connect)?;
        // One byte exactly: anything the server (or a man in the middle) sent after it must
        // go to the handshake, which then fails, not be taken as the protocol.
        let answer = stream.read_u8().await.map_err(Error::Connect)?;
        match answer {
            b'S' => Ok(Either::Left(self.handshake(client, name, stream).await?)),
            b'N' if self.mode == Mode::Prefer => Ok(Either::Right(stream)),
            b'N' => Err(Error::Tls(
                "the server does not accept TLS connections, and sslmode asks for TLS (is ssl \
                 on in its postgresql.conf?)"
                    .into(),
            )),
            other => Err(Error::Protocol(format!(
                "the server answered the SSLRequest with {:?}, neither S nor N",
                char::from(other)
            ))),
        }
    }

    /// Runs the TLS handshake with the server `name` on `stream`.
    async fn handshake(
        &self,
        client: &Arc<ClientConfig>,
        name: ServerName<'static>,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, Error> {
        // For `sslcertmode=require`, this handshake's own record of whether the server
        // asked for the client's certificate.
        let (client, asked) = if self.certificate_asked {
            let asked = Arc::new(AtomicBool::new(false));
            let mut config = ClientConfig::clone(client);
            config.client_auth_cert_resolver = Arc::new(Asked {
                inner: config.client_auth_cert_resolver.clone(),
                asked: asked.clone(),
            });
            (Arc::new(config), Some(asked))
        } else {
            (client.clone(), None)
        };
        let stream = tokio_rustls::TlsConnector::from(client)
            .connect(name, stream)
            .await
            .map_err(|e| Error::Tls(format!("{}{}", crate::error_chain(&e), remedy(&e))))?;
        if asked.is_some_and(|asked| !asked.load(Ordering::Relaxed)) {
            return Err(Error::Tls(
                "the server did not ask for a client certificate, and sslcertmode=require \
                 wants it to (is ssl_ca_file set in its postgresql.conf?)"
                    .into(),
            ));
        }
        Ok(stream)
    }
}

/// How tokio-postgres sees the TLS below the tap. The stream it is handed is encrypted
/// already; told to connect TLS directly (`sslnegotiation=direct`, no SSLRequest), it calls
/// this, which only wraps the stream with the channel binding SCRAM-SHA-256-PLUS signs:
/// the hash of the server's certificate (`tls-server-end-point`, RFC 5929), which binds
/// the authentication to this TLS session, so that a man in the middle holding another
/// certificate cannot relay it.
pub(crate) struct Bound(pub(crate) Option<Vec<u8>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsConnect<S> for Bound {
    type Stream = BoundStream<S>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<BoundStream<S>, Self::Error>>;

    fn connect(self, inner: S) -> Self::Future {
        std::future::ready(Ok(BoundStream {
            inner,
            end_point: self.0,
        }))
    }
}

/// A stream with its channel binding, for tokio-postgres.
pub(crate) struct BoundStream<S> {
    inner: S,
    end_point: Option<Vec<u8>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for BoundStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BoundStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for BoundStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.end_point
            .clone()
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// The `tls-server-end-point` of a TLS session: its server certificate hashed with the hash
/// of the certificate's signature (SHA-256 for MD5 and SHA-1), as Postgres computes it.
/// `None` for a signature with no hash of its own (Ed25519), for which Postgres has no
/// binding either, or one this does not know: SCRAM then goes without the binding, unless
/// `channel_binding=require`.
pub(crate) fn end_point(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let cert = stream.get_ref().1.peer_certificates()?.first()?;
    let der = cert.as_ref();
    Some(match signature_hash(der)? {
        224 => Sha224::digest(der).to_vec(),
        256 => Sha256::digest(der).to_vec(),
        384 => Sha384::digest(der).to_vec(),
        _ => Sha512::digest(der).to_vec(),
    })
}

/// The bits of the hash a DER certificate's signature algorithm uses, MD5 and SHA-1 taken
/// as SHA-256 (RFC 5929); `None` if unknown. As Postgres (`X509_get_signature_info`): RSA
/// with PKCS #1 v1.5 padding, ECDSA, and RSASSA-PSS, whose hash is in its parameters
/// (SHA-1 where they name none).
fn signature_hash(der: &[u8]) -> Option<u16> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (0x30, certificate, _) = tlv(der)? else {
        return None;
    };
    let (_, _, after_tbs) = tlv(certificate)?;
    let (0x30, algorithm, _) = tlv(after_tbs)? else {
        return None;
    };
    let (0x06, oid, parameters) = tlv(algorithm)? else {
        return None;
    };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    match oid {
        [rsa @ .., last] if rsa == RSA => match last {
            0x04 | 0x05 | 0x0b => Some(256), // md5, sha1, sha256 WithRSAEncryption
            0x0a => pss_hash(parameters),    // RSASSA-PSS
            0x0c => Some(384),
            0x0d => Some(512),
            0x0e => Some(224),
            _ => None,
        },
        ECDSA_SHA1 => Some(256),
        [ecdsa @ .., last] if ecdsa == ECDSA_SHA2 => match last {
            0x01 => Some(224),
            0x02 => Some(256),
            0x03 => Some(384),
            0x04 => Some(512),
            _ => None,
        },
        _ => None,
    }
}

/// The bits of the hash that RSASSA-PSS `parameters` name (RFC 4055), SHA-1 (as SHA-256)
/// where they name none.
fn pss_hash(parameters: &[u8]) -> Option<u16> {
    // RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] HashAlgorithm DEFAULT sha1, ... }
    let (0x30, fields, _) = tlv(parameters)? else {
        return None;
    };
    let Some((0xa0, hash, _)) = tlv(fields) else {
        return Some(256);
    };
    let (0x30, hash, _) = tlv(hash)? else {
        return None;
    };
    let (0x06, oid, _) = tlv(hash)? else {
        return None;
    };
    const SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
    const NIST_HASH: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
    match oid {
        SHA1 => Some(256),
        [nist @ .., last] if nist == NIST_HASH => match last {
            0x01 => Some(256),
            0x02 => Some(384),
            0x03 => Some(512),
            0x04 => Some(224),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a DER certificate names the host `server_name` as libpq checks it: by its
/// subjectAltName's DNS names and IP addresses (webpki's check), or, where it has none of
/// either, by its subject's (first) common name, compared without case, a leading `*.`
/// standing for one label. Certificates made as Postgres's documentation shows
/// (`-subj "/CN=dbhost.yourdomain.com"`) name their host so.
fn names_host(der: &CertificateDer<'_>, server_name: &ServerName<'_>) -> bool {
    let by_webpki = webpki::EndEntityCert::try_from(der)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(server_name).is_ok());
    if by_webpki {
        return true;
    }
    let Some(Names {
        common_name,
        alt_names,
    }) = names(der)
    else {
        return false;
    };
    let host = match server_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => return false,
    };
    match common_name {
        Some(name) if !alt_names => common_name_matches(&name, &host),
        _ => false,
    }
}

/// libpq's match of a certificate's name with the host: without case; `*.rest` matches
/// one label followed by `.rest`.
fn common_name_matches(name: &str, host: &str) -> bool {
    if let Some(rest) = name.strip_prefix("*.") {
        let Some((label, domain)) = host.split_once('.') else {
            return false;
        };
        return !label.is_empty() && domain.eq_ignore_ascii_case(rest);
    }
    name.eq_ignore_ascii_case(host)
}

/// What a certificate names: its subject's first common name (libpq reads that one), and
/// whether its subjectAltName holds a DNS name or an IP address.
#[derive(Debug, PartialEq)]
struct Names {
    common_name: Option<String>,
    alt_names: bool,
}

/// The [`Names`] of a DER certificate, `None` if it does not parse.
fn names(der: &[u8]) -> Option<Names> {
    let (_, subject, extensions) = tbs_parts(der)?;
    let mut common_name: Option<Option<String>> = None;
    let mut rdns = subject;
    while let Some((0x31, set, after)) = tlv(rdns) {
        let mut attributes = set;
        while let Some((0x30, attribute, next)) = tlv(attributes) {
            let (0x06, oid, value) = tlv(attribute)? else {
                return None;
            };
            if oid == [0x55, 0x04, 0x03] && common_name.is_none() {
                // UTF8String, PrintableString, T61String, IA5String: bytes as libpq reads
                // them; a name holding a NUL, or in another form, matches nothing.
                let (tag, text, _) = tlv(value)?;
                common_name = Some(match tag {
                    0x0c | 0x13 | 0x14 | 0x16 if !text.contains(&0) => {
                        Some(String::from_utf8_lossy(text).into_owned())
                    }
                    _ => None,
                });
            }
            attributes = next;
        }
        rdns = after;
    }
    let mut alt_names = false;
    let mut extensions = extensions;
    while let Some((0x30, extension, next)) = tlv(extensions) {
        let (0x06, oid, fields) = tlv(extension)? else {
            return None;
        };
        if oid == [0x55, 0x1d, 0x11] {
            let (mut tag, mut value, after) = tlv(fields)?;
            if tag == 0x01 {
                (tag, value, _) = tlv(after)?; // critical
            }
            let (0x04, 0x30) = (tag, *value.first()?) else {
                return None;
            };
            let (_, mut general, _) = tlv(value)?;
            while let Some((tag, _, after)) = tlv(general) {
                alt_names |= tag == 0x82 || tag == 0x87; // dNSName, iPAddress
                general = after;
            }
        }
        extensions = next;
    }
    Some(Names {
        common_name: common_name.flatten(),
        alt_names,
    })
}

/// A DER certificate's validity, its subject and the contents of its extensions (empty
/// where it has none).
fn tbs_parts(der: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (0x30, certificate, _) = tlv(der)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(certificate)? else {
        return None;
    };
    let (tag, _, after_version) = tlv(tbs)?;
    let rest = if tag == 0xa0 { after_version } else { tbs };
    let (_, _, rest) = tlv(rest)?; // serialNumber
    let (_, _, rest) = tlv(rest)?; // signature
    let (_, _, rest) = tlv(rest)?; // issuer
    let (0x30, validity, rest) = tlv(rest)? else {
        return None;
    };
    let (0x30, subject, rest) = tlv(rest)? else {
        return None;
    };
    let (_, _, mut rest) = tlv(rest)?; // subjectPublicKeyInfo
    while let Some((tag, contents, after)) = tlv(rest) {
        if tag == 0xa3 {
            let (0x30, extensions, _) = tlv(contents)? else {
                return None;
            };
            return Some((validity, subject, extensions));
        }
        rest = after;
    }
    Some((validity, subject, &[]))
}

/// Refuses a certificate trusted as it is (`Verifier::pinned`) outside its validity, as
/// OpenSSL does.
fn within_validity(der: &[u8], now: UnixTime) -> Result<(), rustls::Error> {
    let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let (validity, _, _) = tbs_parts(der).ok_or_else(bad)?;
    let (not_before_tag, not_before, rest) = tlv(validity).ok_or_else(bad)?;
    let (not_after_tag, not_after, _) = tlv(rest).ok_or_else(bad)?;
    let not_before = seconds(not_before_tag, not_before).ok_or_else(bad)?;
    let not_after = seconds(not_after_tag, not_after).ok_or_else(bad)?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now < not_before {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > not_after {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// A DER time (UTCTime `YYMMDDHHMMSSZ`, GeneralizedTime `YYYYMMDDHHMMSSZ`) as seconds
/// since the epoch.
fn seconds(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    if !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes
            .iter()
            .fold(0usize, |len, &byte| len << 8 | usize::from(byte));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// What to do about a failed handshake, when it is the certificate or the server's key.
fn remedy(error: &std::io::Error) -> &'static str {
    let tls = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)) = tls {
        // What psql reaches and permd cannot: OpenSSL signs with such a key only by the
        // schemes rsa_pss_pss_*, which rustls does not offer.
        return " (the server found no way to finish the handshake that permd offers: one is a \
                server key of type RSASSA-PSS, OpenSSL's `-newkey rsa-pss`, which permd's TLS \
                cannot verify; an RSA or ECDSA key works)";
    }
    let certificate = tls.and_then(|tls| match tls {
        rustls::Error::InvalidCertificate(why) => Some(why),
        _ => None,
    });
    match certificate {
        Some(CertificateError::Other(other))
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            " (the server's certificate is a CA's, CA:TRUE, such as the self-signed one \
             Postgres's documentation makes: give that certificate itself as sslrootcert=PATH, \
             or give the server one its CA signed for it)"
        }
        Some(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            " (the server's certificate is not signed by a CA permd trusts: give that CA's PEM \
             file as sslrootcert=PATH)"
        }
        Some(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => {
            " (the server's certificate does not name the host in the URL: connect by a name \
             it holds, or use sslmode=verify-ca to check its CA only)"
        }
        Some(CertificateError::Revoked) => {
            " (the server's certificate is on a revocation list of sslcrl or sslcrldir: the \
             server needs a new one)"
        }
        Some(CertificateError::UnknownRevocationStatus) => {
            " (no revocation list of sslcrl or sslcrldir is from the CA that signed a \
             certificate of the server's chain: give that CA's list too)"
        }
        Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            " (the server's certificate has expired: renew it on the server; permd retries)"
        }
        _ => "",
    }
}

/// The client's certificate resolver, recording whether the server asked for one
/// (`sslcertmode=require`).
#[derive(Debug)]
struct Asked {
    inner: Arc<dyn ResolvesClientCert>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for Asked {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.inner.resolve(root_hint_subjects, schemes)
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// The check of the server's certificate, as libpq's (OpenSSL's) for each `sslmode`:
/// none for `require` and `prefer` (`chain` is `None`); for `verify-ca` and
/// `verify-full` its chain to a trusted CA (webpki's), or the certificate itself among
/// `sslrootcert`'s (`pinned`: OpenSSL trusts a self-signed certificate found there, such
/// as Postgres's documentation makes, whose `CA:TRUE` webpki refuses in a server's); and
/// for `verify-full` (`full`) the host's name ([`names_host`]). The handshake's
/// signatures are verified in every mode: the server holds the key of the certificate it
/// shows.
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
    pinned: Vec<CertificateDer<'static>>,
    full: bool,
}

impl Verifier {
    /// The host's name check of `verify-full`, once the certificate is trusted.
    fn named(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.full || names_host(end_entity, server_name) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        if self.pinned.iter().any(|pinned| pinned == end_entity) {
            within_validity(end_entity, now)?;
            return self.named(end_entity, server_name);
        }
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => self.named(end_entity, server_name),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str) -> (String, Vec<(&'static str, String)>) {
        let (rest, options) = split(url).expect("readable");
        let mut named = Vec::new();
        for (name, value) in [
            ("sslmode", options.mode),
            ("sslrootcert", options.root_cert),
            ("sslcert", options.cert),
            ("sslkey", options.key),
            ("sslpassword", options.password),
            ("sslcrl", options.crl),
            ("sslcrldir", options.crl_dir),
        ] {
            if let Some(value) = value {
                named.push((name, value));
            }
        }
        (rest, named)
    }

    #[test]
    fn the_tls_options_are_taken_out_of_either_form_and_the_rest_kept() {
        assert_eq!(
            taken("postgres://u:p%40@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fa%2Bb.pem&connect_timeout=3"),
            (
                "postgres://u:p%40@h:5/db?application_name=x&connect_timeout=3".into(),
                vec![("sslmode", "verify-full".into()), ("sslrootcert", "/tmp/a+b.pem".into())]
            )
        );
        assert_eq!(
            taken("postgresql://h/db?sslmode=require"),
            (
                "postgresql://h/db".into(),
                vec![("sslmode", "require".into())]
            )
        );
        assert_eq!(taken("postgres://h/db"), ("postgres://h/db".into(), vec![]));
        assert_eq!(
            taken(
                r"host=h sslmode = 'verify-ca' dbname='my db' sslrootcert=/a\ b.pem  password='it\'s' sslcert='/c.pem' sslkey=/k.pem sslpassword='key pw' sslcrl=/r.crl sslcrldir=/crls"
            ),
            (
                "host=h dbname='my db' password='it\\'s'".into(),
                vec![
                    ("sslmode", "verify-ca".into()),
                    ("sslrootcert", "/a b.pem".into()),
                    ("sslcert", "/c.pem".into()),
                    ("sslkey", "/k.pem".into()),
                    ("sslpassword", "key pw".into()),
                    ("sslcrl", "/r.crl".into()),
                    ("sslcrldir", "/crls".into())
                ]
            )
        );
        // The key's password is never printed.
        let (_, options) = split("postgres://h/db?sslpassword=hunter2").expect("readable");
        assert!(!format!("{options:?}").contains("hunter2"), "{options:?}");
        // Not key=value: left whole for tokio-postgres to say why.
        assert_eq!(taken("host=h sslmode"), ("host=h sslmode".into(), vec![]));
        let load = |url: &str| split(url).expect("readable").1.load();
        assert!(load("postgres://h/db?sslnegotiation=postgres").is_ok());
        let tls = load("postgres://h/db?sslnegotiation=direct&sslmode=require").expect("read");
        assert!(tls.direct);
        for (url, why) in [
            (
                "postgres://h/db?sslnegotiation=direct",
                "needs sslmode=require",
            ),
            (
                "postgres://h/db?sslnegotiation=direct&sslmode=disable",
                "needs sslmode=require",
            ),
            (
                "postgres://h/db?sslnegotiation=fast&sslmode=require",
                "not postgres or direct",
            ),
        ] {
            match load(url) {
                Err(Error::Url(said)) => assert!(said.contains(why), "{url}: {said}"),
                other => panic!("{url}: accepted: {other:?}"),
            }
        }
    }

    /// libpq's other TLS options: the protocol versions, SNI and the certificate mode are
    /// read; compression and GSSAPI encryption are taken where nothing is asked of them,
    /// and refused with the reason where something is.
    #[test]
    fn the_other_tls_options_are_read_or_refused_with_the_reason() {
        let url_refused = |url: &str| match split(url) {
            Err(Error::Url(why)) => why,
            other => panic!("{url}: accepted: {other:?}"),
        };
        assert!(split("postgres://h/db?gssencmode=disable&sslcompression=0").is_ok());
        assert!(split("host=h gssencmode=prefer sslcompression=1").is_ok());
        assert!(url_refused("postgres://h/db?gssencmode=require").contains("no GSSAPI"));
        for url in [
            "postgres://h/db?gssencmode=maybe",
            "postgres://h/db?sslcompression=2",
        ] {
            assert!(
                url_refused(url).contains("is not a value libpq takes"),
                "{url}"
            );
        }
        let options = |name: &str, value: &str| {
            let (_, options) =
                split(&format!("postgres://h/db?sslmode=require&{name}={value}")).expect("read");
            options
        };
        let versions = |min: &str, max: &str| {
            let mut given = options("ssl_min_protocol_version", min);
            given.protocol_versions.1 = Some(max.into());
            given.versions().map(|versions| {
                versions
                    .iter()
                    .map(|v| format!("{:?}", v.version))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            versions("", "").ok(),
            Some(vec!["TLSv1_2".into(), "TLSv1_3".into()])
        );
        assert_eq!(
            versions("tlsv1", "").ok(),
            Some(vec!["TLSv1_2".into(), "TLSv1_3".into()])
        );
        assert_eq!(versions("TLSv1.3", "").ok(), Some(vec!["TLSv1_3".into()]));
        assert_eq!(versions("", "TLSv1.2").ok(), Some(vec!["TLSv1_2".into()]));
        for (min, max, expected) in [
            (
                "TLSv1.3",
                "TLSv1.2",
                "is above ssl_max_protocol_version=TLSv1.2",
            ),
            ("TLSv1", "TLSv1.1", "permd speaks TLS 1.2 and 1.3 only"),
            ("SSLv3", "", "ssl_min_protocol_version=SSLv3 is not one of"),
        ] {
            match versions(min, max) {
                Err(Error::Url(why)) => assert!(why.contains(expected), "{why}"),
                other => panic!("{min}..{max}: {other:?}"),
            }
        }
        let sni = |value: &str| {
            options("sslsni", value)
                .load()
                .map(|tls| tls.client.expect("a TLS mode").enable_sni)
        };
        assert_eq!(sni("1").ok(), Some(true));
        assert_eq!(sni("0").ok(), Some(false));
        assert!(refused(&options("sslsni", "yes")).contains("sslsni=yes is not 0 or 1"));
        let asked = |mode: &str| {
            options("sslcertmode", mode)
                .load()
                .map(|tls| tls.certificate_asked)
        };
        assert_eq!(asked("allow").ok(), Some(false));
        assert_eq!(asked("require").ok(), Some(true));
        assert!(refused(&options("sslcertmode", "always")).contains("not one of disable"));
        // `disable` sends no certificate, so the files are not read.
        let mut disabled = options("sslcertmode", "disable");
        disabled.cert = Some("/nonexistent/c.pem".into());
        disabled.key = Some("/nonexistent/k.pem".into());
        assert!(disabled.load().is_ok());
    }

    /// `PGSSLMODE` and the other TLS variables fill in what the URL leaves out, and only
    /// that, then the files of `~/.postgresql/`; `PGSSLNEGOTIATION` is refused as the option
    /// is.
    #[test]
    fn the_tls_variables_fill_what_the_url_leaves_out() {
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-full".to_owned()),
            "PGSSLROOTCERT" => Some("/etc/ca.pem".to_owned()),
            "PGSSLCRL" => Some("/etc/root.crl".to_owned()),
            "PGSSLCRLDIR" => Some("/etc/crls".to_owned()),
            _ => None,
        };
        let (_, options) = split_with("postgres://h/db", &env).expect("readable");
        assert_eq!(options.mode.as_deref(), Some("verify-full"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(options.crl.as_deref(), Some("/etc/root.crl"));
        assert_eq!(options.crl_dir.as_deref(), Some("/etc/crls"));
        let (_, options) = split_with("host=h sslmode=disable", &env).expect("readable");
        assert_eq!(options.mode.as_deref(), Some("disable"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/ca.pem"));
        // Then the files of `~/.postgresql/` that exist, as libpq takes them.
        let home = crate::Scratch::new("home");
        let dir = home.join(".postgresql");
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        for file in ["root.crt", "root.crl", "postgresql.crt"] {
            std::fs::write(dir.join(file), "").expect("write a temporary file");
        }
        let in_home = |file: &str| Some(dir.join(file).display().to_string());
        let env = |name: &str| (name == "HOME").then(|| home.display().to_string());
        let (_, options) = split_with("postgres://h/db", &env).expect("readable");
        assert_eq!(
            (options.root_cert, options.crl, options.cert, options.key),
            (
                in_home("root.crt"),
                in_home("root.crl"),
                in_home("postgresql.crt"),
                // Named beside the certificate, found or not (libpq then says it is missing).
                in_home("postgresql.key")
            )
        );
        // What the URL names stays; a named certificate brings the default key too.
        let (_, options) = split_with(
            "postgres://h/db?sslrootcert=system&sslcrldir=/crls&sslcert=/c.pem",
            &env,
        )
        .expect("readable");
        assert_eq!(
            (
                options.root_cert,
                options.crl,
                options.crl_dir,
                options.cert,
                options.key
            ),
            (
                Some("system".into()),
                None,
                Some("/crls".into()),
                Some("/c.pem".into()),
                in_home("postgresql.key")
            )
        );
        std::fs::remove_dir_all(&dir).expect("remove the temporary directory");
        let (_, options) = split_with("postgres://h/db", &env).expect("readable");
        assert_eq!(options, TlsOptions::default(), "no files, no options");
        let direct = |name: &str| (name == "PGSSLNEGOTIATION").then(|| "direct".to_owned());
        let (_, options) = split_with("postgres://h/db", &direct).expect("readable");
        assert_eq!(options.negotiation.as_deref(), Some("direct"));
    }

    /// The hash of a certificate's signature, as Postgres picks it for the channel
    /// binding: certificates of rcgen's, signed by each algorithm.
    #[test]
    fn the_end_point_hash_follows_the_signature() {
        for (algorithm, bits) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Some(256)),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Some(384)),
            (&rcgen::PKCS_ED25519, None),
        ] {
            let key = rcgen::KeyPair::generate_for(algorithm).expect("a key");
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .expect("params")
                .self_signed(&key)
                .expect("a certificate");
            assert_eq!(signature_hash(cert.der()), bits, "{algorithm:?}");
        }
        assert_eq!(signature_hash(&[0x30, 0x82, 0x01]), None);
        assert_eq!(signature_hash(&[]), None);
    }

    /// The host's name as libpq reads it from a certificate: the subjectAltName's DNS
    /// names and addresses, else the subject's common name, without case, `*.` one label.
    #[test]
    fn a_certificate_names_its_host_as_libpq_reads_it() {
        let cert = |common_name: &str, alt_names: &[&str]| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let alt_names: Vec<String> = alt_names.iter().map(|name| (*name).to_owned()).collect();
            let mut params = rcgen::CertificateParams::new(alt_names).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, common_name);
            CertificateDer::from(
                params
                    .self_signed(&key)
                    .expect("a certificate")
                    .der()
                    .to_vec(),
            )
        };
        let host = |name: &str| ServerName::try_from(name.to_owned()).expect("a name");
        let only_cn = cert("db.example.com", &[]);
        assert_eq!(
            names(&only_cn),
            Some(Names {
                common_name: Some("db.example.com".into()),
                alt_names: false
            })
        );
        assert!(names_host(&only_cn, &host("db.example.com")));
        assert!(names_host(&only_cn, &host("DB.Example.COM")));
        assert!(!names_host(&only_cn, &host("other.example.com")));
        let wildcard = cert("*.example.com", &[]);
        assert!(names_host(&wildcard, &host("db.example.com")));
        assert!(!names_host(&wildcard, &host("a.db.example.com")));
        assert!(!names_host(&wildcard, &host("example.com")));
        // Where the subjectAltName names a host, the common name is not read.
        let both = cert("db.example.com", &["other.example.com"]);
        assert_eq!(names(&both).map(|names| names.alt_names), Some(true));
        assert!(names_host(&both, &host("other.example.com")));
        assert!(!names_host(&both, &host("db.example.com")));
        // Two common names: the first is read, as libpq reads it (rcgen keeps one).
        let der = |tag: u8, contents: &[u8]| {
            let mut out = vec![tag, u8::try_from(contents.len()).expect("short")];
            out.extend_from_slice(contents);
            out
        };
        let rdn = |name: &[u8]| {
            der(
                0x31,
                &der(
                    0x30,
                    &[der(0x06, &[0x55, 0x04, 0x03]), der(0x0c, name)].concat(),
                ),
            )
        };
        let subject = der(
            0x30,
            &[rdn(b"first.example.com"), rdn(b"second.example.com")].concat(),
        );
        let empty = der(0x30, &[]);
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[1]),
            empty.clone(),
            empty.clone(),
            empty.clone(),
            subject,
            empty.clone(),
        ]
        .concat();
        let two = der(0x30, &[der(0x30, &tbs), empty, der(0x03, &[0])].concat());
        assert_eq!(
            names(&two),
            Some(Names {
                common_name: Some("first.example.com".into()),
                alt_names: false
            })
        );
        let address = cert("127.0.0.1", &[]);
        assert!(names_host(&address, &host("127.0.0.1")));
        assert!(!names_host(&address, &host("127.0.0.2")));
        assert_eq!(names(b"not a certificate"), None);
    }

    /// A certificate trusted as it is is held to its validity: before it, after it.
    #[test]
    fn a_pinned_certificate_is_held_to_its_validity() {
        let cert = |from: (i32, u8, u8), to: (i32, u8, u8)| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
            params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
            params
                .self_signed(&key)
                .expect("a certificate")
                .der()
                .to_vec()
        };
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_767_225_600));
        let refused = |der: &[u8]| match within_validity(der, now) {
            Err(rustls::Error::InvalidCertificate(why)) => Some(why),
            Err(other) => panic!("{other}"),
            Ok(()) => None,
        };
        assert_eq!(refused(&cert((2025, 1, 1), (2027, 1, 1))), None);
        assert_eq!(
            refused(&cert((2020, 1, 1), (2025, 12, 31))),
            Some(CertificateError::Expired)
        );
        assert_eq!(
            refused(&cert((2026, 1, 2), (2030, 1, 1))),
            Some(CertificateError::NotValidYet)
        );
    }

    /// DER times, both forms, as seconds since the epoch.
    #[test]
    fn der_times_are_read_as_seconds() {
        assert_eq!(seconds(0x17, b"700101000000Z"), Some(0));
        assert_eq!(seconds(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(seconds(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(seconds(0x17, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(seconds(0x18, b"2026010100000Z"), None);
        assert_eq!(seconds(0x17, b"7001010000+0Z"), None);
        assert_eq!(seconds(0x17, b"700101000000"), None);
    }

    /// The hash of signatures rcgen cannot make, read from the algorithm alone (a
    /// certificate whose other parts are empty): RSASSA-PSS by the hash its parameters
    /// name, SHA-1 where they name none, and SHA-224 however it signs.
    #[test]
    fn the_end_point_hash_of_pss_and_sha224_signatures() {
        fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
            let mut out = vec![tag, u8::try_from(contents.len()).expect("short")];
            out.extend_from_slice(contents);
            out
        }
        let certificate = |oid: &[u8], parameters: &[u8]| {
            let algorithm = der(0x30, &[der(0x06, oid), parameters.to_vec()].concat());
            der(0x30, &[der(0x30, &[]), algorithm, der(0x03, &[0])].concat())
        };
        let pss = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
        let hash = |oid: &[u8]| der(0xa0, &der(0x30, &[der(0x06, oid), der(0x05, &[])].concat()));
        let nist = |last: u8| vec![0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, last];
        let salt = der(0xa2, &der(0x02, &[0x20]));
        for (parameters, bits) in [
            (der(0x30, &hash(&nist(0x01))), Some(256)),
            (
                der(0x30, &[hash(&nist(0x02)), salt.clone()].concat()),
                Some(384),
            ),
            (der(0x30, &hash(&nist(0x03))), Some(512)),
            (der(0x30, &hash(&nist(0x04))), Some(224)),
            (der(0x30, &hash(&[0x2b, 0x0e, 0x03, 0x02, 0x1a])), Some(256)),
            (der(0x30, &[]), Some(256)),
            (der(0x30, &salt), Some(256)),
            (der(0x30, &hash(&[0x2a, 0x03])), None),
            (der(0x05, &[]), None),
            (Vec::new(), None),
        ] {
            assert_eq!(
                signature_hash(&certificate(&pss, &parameters)),
                bits,
                "{parameters:02x?}"
            );
        }
        let sha224_rsa = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e];
        let sha224_ecdsa = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01];
        assert_eq!(
            signature_hash(&certificate(&sha224_rsa, &der(0x05, &[]))),
            Some(224)
        );
        assert_eq!(signature_hash(&certificate(&sha224_ecdsa, &[])), Some(224));
    }

    fn refused(options: &TlsOptions) -> String {
        match options.load() {
            Err(Error::Url(why)) => why,
            Err(other) => panic!("not a URL error: {other}"),
            Ok(tls) => panic!("accepted: {tls:?}"),
        }
    }

    #[test]
    fn modes_are_read_as_libpq_reads_them_and_bad_files_refused() {
        let mode = |mode: Option<&str>, root_cert: Option<&str>| {
            TlsOptions {
                mode: mode.map(Into::into),
                root_cert: root_cert.map(Into::into),
                ..TlsOptions::default()
            }
            .load()
            .map(|tls| tls.mode)
        };
        assert_eq!(mode(None, None).ok(), Some(Mode::Prefer));
        assert_eq!(mode(Some("allow"), None).ok(), Some(Mode::Prefer));
        assert_eq!(mode(Some("disable"), None).ok(), Some(Mode::Disable));
        assert_eq!(mode(Some("require"), None).ok(), Some(Mode::Require));
        let why = refused(&TlsOptions {
            mode: Some("sometimes".into()),
            ..TlsOptions::default()
        });
        assert!(why.contains("sslmode=sometimes is not one of"), "{why}");
        let missing = "/nonexistent/permd-ca.pem";
        for tls_mode in ["require", "verify-ca", "verify-full"] {
            let why = refused(&TlsOptions {
                mode: Some(tls_mode.into()),
                root_cert: Some(missing.into()),
                ..TlsOptions::default()
            });
            assert!(why.starts_with(&format!("sslrootcert={missing}")), "{why}");
        }
        let scratch = crate::Scratch::new("empty-pem");
        let empty = scratch.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write a temporary file");
        let why = refused(&TlsOptions {
            mode: Some("verify-full".into()),
            root_cert: Some(empty.display().to_string()),
            ..TlsOptions::default()
        });
        drop(scratch);
        assert!(why.contains("holds no certificate"), "{why}");
        let why = refused(&TlsOptions {
            mode: Some("require".into()),
            cert: Some("/c.pem".into()),
            ..TlsOptions::default()
        });
        assert!(why.contains("sslcert and sslkey go together"), "{why}");

        // An encrypted key: OpenSSL's old encryption is refused with the command that
        // converts it, PKCS#8 without `sslpassword` with what to give.
        let dir = crate::Scratch::new("keys");
        let file = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write a temporary file");
            Some(path.display().to_string())
        };
        let key = |key: Option<String>| {
            refused(&TlsOptions {
                mode: Some("require".into()),
                cert: file("client.crt", ""),
                key,
                ..TlsOptions::default()
            })
        };
        let legacy = key(file(
            "legacy.key",
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
             DEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\nAAAA\n\
             -----END RSA PRIVATE KEY-----\n",
        ));
        let sealed = key(file(
            "sealed.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        ));
        drop(dir);
        assert!(legacy.contains("openssl pkcs8 -topk8"), "{legacy}");
        assert!(
            sealed.contains("the key is encrypted: give its password as sslpassword"),
            "{sealed}"
        );
    }
}
