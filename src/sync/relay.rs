//! The one-off commands' way to Postgres over TCP (`migrate`, `verify`, `demo`).
//!
//! They run sqlx, which is built here without TLS: every TLS feature of sqlx's trusts the
//! system's CAs beside an `sslrootcert` file, so a URL that pins a private CA would still
//! accept any certificate a public CA signed for the host. Instead, sqlx speaks plain
//! protocol over a Unix socket in a private directory (mode 0700), and each connection to
//! that socket is carried to the server over a socket opened as the sync connection's
//! is (`connect::open`): the same `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, read
//! by the same code, with the same fallback of `prefer`. The directory is removed when the
//! relay stops (when the pool closes, or the runtime ends). With `require_auth` or
//! `requirepeer` the relay is used over a Unix socket and without TLS too: the server's
//! side of each connection is opened as the daemon's is (its peer checked) and goes
//! through a tap (`tap.rs`) that holds the server to `require_auth`.

use std::future::Future;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::{UnixListener, UnixStream};
use tokio::task::AbortHandle;
use tokio_postgres::config::Host;
use tokio_postgres::Config;

use super::connect::{self, Settings};
use super::tap::Tap;
use super::tls::Mode;
use super::Error;

/// A relay from a private Unix socket to the server a database URL names. Dropped, it
/// stops; [`Relay::until`] keeps it running until a future ends.
pub struct Relay {
    dir: PathBuf,
    /// Why a connection could not be carried: written by the connections' tasks, read
    /// once sqlx's connection has failed. Both are rare, so a plain `Mutex`.
    failure: Arc<Mutex<Option<String>>>,
    /// The accept loop's task: aborted when the relay stops.
    task: Option<AbortHandle>,
}

impl Relay {
    /// Starts relaying to `config`'s server as `settings` ask (TLS, `require_auth`,
    /// `requirepeer`; all as `sync::read_url` read them), listening as port `port` (the
    /// name sqlx gives the socket, `.s.PGSQL.<port>`). `None` where no relay is wanted:
    /// a Unix socket (never TLS, as in libpq) or `sslmode=disable`, with neither
    /// `require_auth` nor `requirepeer`.
    pub(crate) fn start(
        config: Config,
        settings: Settings,
        port: u16,
    ) -> Result<Option<Relay>, Error> {
        let unix = matches!(config.get_hosts().first(), Some(Host::Unix(_)))
            && config.get_hostaddrs().is_empty();
        let checks = settings.libpq.require_auth.is_some() || settings.libpq.requirepeer.is_some();
        if (unix || settings.tls.mode == Mode::Disable) && !checks {
            return Ok(None);
        }
        let dir = PrivateDir::create().map_err(Error::Connect)?;
        let listener =
            UnixListener::bind(dir.0.join(format!(".s.PGSQL.{port}"))).map_err(Error::Connect)?;
        let failure = Arc::new(Mutex::new(None));
        let path = dir.0.clone();
        let task = tokio::spawn(accept(
            dir,
            listener,
            Arc::new(Server { config, settings }),
            failure.clone(),
        ));
        Ok(Some(Relay {
            dir: path,
            failure,
            task: Some(task.abort_handle()),
        }))
    }

    /// The directory of the relay's socket, for sqlx's `socket` option.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the last connection the relay could not carry failed, if one did (sqlx itself
    /// only sees the socket closed).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Keeps relaying until `end` (a pool's close event), then stops.
    pub fn until(mut self, end: impl Future<Output = ()> + Send + 'static) {
        if let Some(task) = self.task.take() {
            tokio::spawn(async move {
                end.await;
                task.abort();
            });
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accepts sqlx's connections, each carried by a task of its own (which outlives the
/// listener: a connection open when the relay stops ends when either side closes it).
async fn accept(
    dir: PrivateDir,
    listener: UnixListener,
    server: Arc<Server>,
    failure: Arc<Mutex<Option<String>>>,
) {
    let _dir = dir;
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(carry(client, server.clone(), failure.clone()));
            }
            // Out of descriptors, say: sqlx's connection fails, and a later one may not.
            Err(error) => {
                tracing::warn!(%error, "the relay to postgres could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Carries one connection: a socket to the server (TLS as the URL asks), then every byte
/// both ways until either side closes.
async fn carry(mut client: UnixStream, server: Arc<Server>, failure: Arc<Mutex<Option<String>>>) {
    match connect::open(&server.config, &server.settings).await {
        Ok(socket) => {
            let mut socket = Tap::default()
                .on(socket)
                .requiring(server.settings.libpq.require_auth);
            // An error here is a side closing abruptly (sqlx sees its socket close), or
            // the server refused by `require_auth`, which sqlx cannot know.
            let carried = tokio::io::copy_bidirectional(&mut client, &mut socket).await;
            if let Err(error) = carried {
                if error.kind() == io::ErrorKind::PermissionDenied {
                    *failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("connect to postgres: {error}"));
                }
            }
        }
        Err(error) => {
            // Recorded before `client` is dropped, which is when sqlx sees the failure.
            *failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error.to_string());
        }
    }
}

/// Where the relay carries connections to, and how.
struct Server {
    config: Config,
    settings: Settings,
}

/// A directory only this user may enter (0700) under the system's temporary directory,
/// removed when dropped: whoever connects to the relay's socket gets a connection with the
/// URL's client certificate.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> io::Result<PrivateDir> {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut last = None;
        for _ in 0..8 {
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let path = std::env::temp_dir()
                .join(format!("permd-relay-{}-{random:016x}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => last = Some(error),
                Err(error) => {
                    return Err(io::Error::new(
                        error.kind(),
                        format!("create a private directory in {}: {error}", path.display()),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no directory name left to try")))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
