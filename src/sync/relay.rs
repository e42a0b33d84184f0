//! The one-off commands' way to Postgres over TCP (`migrate`, `verify`, `demo`).
//!
//! They run sqlx, which is built here without TLS: every TLS feature of sqlx's trusts the
//! system's CAs beside an `sslrootcert` file, so a URL that pins a private CA would still
//! accept any certificate a public CA signed for the host. Instead, sqlx speaks plain
//! protocol over a Unix socket in a private directory (mode 0700), and each connection to
//! that socket is carried to the server over a socket opened as the sync connection's
//! is (`connect::open`): the same `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, read
//! by the same code, with the same fallback of `prefer`. The directory is removed when the
//! relay stops (when the pool closes, or the runtime ends); one that a process killed
//! outright left behind, by the next relay of its pid namespace (`PrivateDir::sweep`).
//! With `require_auth` or `requirepeer` the relay is used over a Unix socket and without
//! TLS too: the server's side of each connection is opened as the daemon's is (its peer
//! checked) and goes through a tap (`tap.rs`) that holds the server to `require_auth`.

use std::future::Future;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding as Binding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::AbortHandle;
use tokio_postgres::config::{ChannelBinding, Host};
use tokio_postgres::Config;

use super::connect::{self, Settings};
use super::conninfo::AuthMethod;
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
    /// a Unix socket (never TLS, as in libpq) or `sslmode=disable`, with none of
    /// `require_auth`, `requirepeer` and `channel_binding=require`.
    pub(crate) fn start(
        config: Config,
        settings: Settings,
        port: u16,
    ) -> Result<Option<Relay>, Error> {
        let unix = matches!(config.get_hosts().first(), Some(Host::Unix(_)))
            && config.get_hostaddrs().is_empty();
        let checks = settings.libpq.require_auth.is_some()
            || settings.libpq.requirepeer.is_some()
            || config.get_channel_binding() == ChannelBinding::Require;
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

/// Carries one connection: a socket to the server (TLS as the URL asks), the
/// authentication run by the relay where sqlx cannot run it (`channel_binding=require`),
/// then every byte both ways until either side closes.
async fn carry(mut client: UnixStream, server: Arc<Server>, failure: Arc<Mutex<Option<String>>>) {
    let fail = |why: String| {
        // Recorded before `client` is dropped, which is when sqlx sees the failure.
        *failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
    };
    let socket = match connect::open(&server.config, &server.settings).await {
        Ok(socket) => socket,
        Err(error) => return fail(error.to_string()),
    };
    let end_point = connect::binding(&socket);
    let mut socket = Tap::default()
        .on(socket)
        .requiring(server.settings.libpq.require_auth);
    if server.config.get_channel_binding() == ChannelBinding::Require {
        let password = crate::sync::password(&server.config, &server.settings);
        let bound = authenticate_bound(&mut client, &mut socket, password, end_point).await;
        if let Err(why) = bound {
            return fail(format!("connect to postgres: {why}"));
        }
    }
    // An error here is a side closing abruptly (sqlx sees its socket close), or the
    // server refused by `require_auth`, which sqlx cannot know.
    let carried = tokio::io::copy_bidirectional(&mut client, &mut socket).await;
    if let Err(error) = carried {
        if error.kind() == io::ErrorKind::PermissionDenied {
            fail(format!("connect to postgres: {error}"));
        }
    }
}

/// Runs the start-up of sqlx's connection on `client` with the server on `server`, the
/// authentication by the relay: SCRAM-SHA-256-PLUS, bound to the TLS session by the hash
/// of the server's certificate (`end_point`, or why there is none: `connect::binding`),
/// as `channel_binding=require` asks and as sqlx cannot do. sqlx's start-up message is
/// passed on; once the server has let the relay in (its SCRAM signature checked), sqlx is
/// told it is in, and the rest of the start-up (parameters, the key, ready) reaches it as
/// the server sends it. An error the server sends instead is passed on to sqlx as it is.
async fn authenticate_bound<C, S>(
    client: &mut C,
    server: &mut S,
    password: Option<Vec<u8>>,
    end_point: Result<Vec<u8>, &str>,
) -> Result<(), String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |error: io::Error| error.to_string();
    // The start-up message: its length (counting itself), then its body.
    let length = client.read_i32().await.map_err(io)?;
    let size = usize::try_from(length)
        .ok()
        .filter(|size| (8..=10_000).contains(size))
        .ok_or_else(|| format!("a start-up message of {length} bytes from sqlx"))?;
    let mut startup = vec![0; size - 4];
    client.read_exact(&mut startup).await.map_err(io)?;
    server.write_all(&length.to_be_bytes()).await.map_err(io)?;
    server.write_all(&startup).await.map_err(io)?;
    let end_point = end_point.map_err(|why| format!("channel_binding=require, and {why}"))?;
    let Some(password) = password else {
        return Err("channel_binding=require, and no password is given for SCRAM".into());
    };
    let mut scram: Option<ScramSha256> = None;
    let mut verified = false;
    loop {
        let (tag, body) = read_message(server).await.map_err(io)?;
        let (code, data) = match (tag, body.split_first_chunk::<4>()) {
            (b'R', Some((code, data))) => (i32::from_be_bytes(*code), data),
            (b'E', _) => {
                client.write_all(&message(tag, &body)).await.map_err(io)?;
                return Ok(());
            }
            _ => {
                return Err(format!(
                    "the server sent {:?} during the authentication",
                    char::from(tag)
                ))
            }
        };
        let mut out = BytesMut::new();
        match (code, scram.as_mut()) {
            (10, None) => {
                let offered = data
                    .split(|&byte| byte == 0)
                    .any(|name| name == b"SCRAM-SHA-256-PLUS");
                if !offered {
                    return Err(
                        "channel_binding=require, and the server did not offer SCRAM-SHA-256-PLUS"
                            .into(),
                    );
                }
                let binding = Binding::tls_server_end_point(end_point.clone());
                let first = ScramSha256::new(&password, binding);
                frontend::sasl_initial_response("SCRAM-SHA-256-PLUS", first.message(), &mut out)
                    .map_err(io)?;
                scram = Some(first);
            }
            (11, Some(scram)) => {
                scram.update(data).map_err(io)?;
                frontend::sasl_response(scram.message(), &mut out).map_err(io)?;
            }
            (12, Some(scram)) => {
                scram.finish(data).map_err(io)?;
                verified = true;
            }
            (0, _) if verified => {
                client
                    .write_all(&message(b'R', &0i32.to_be_bytes()))
                    .await
                    .map_err(io)?;
                return Ok(());
            }
            (0, _) => {
                return Err("channel_binding=require, and the server let the client in \
                            without completing SCRAM authentication"
                    .into())
            }
            (code, _) => {
                let asked =
                    AuthMethod::of_request(code).map_or("another method", AuthMethod::asked);
                return Err(format!(
                    "channel_binding=require, and the server asked for {asked}"
                ));
            }
        }
        server.write_all(&out).await.map_err(io)?;
    }
}

/// One backend message: its tag and body.
async fn read_message<S: AsyncRead + Unpin>(server: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let tag = server.read_u8().await?;
    let length = server.read_i32().await?;
    let size = usize::try_from(length)
        .ok()
        .filter(|size| (4..=1_000_000).contains(size))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a bad message length"))?;
    let mut body = vec![0; size - 4];
    server.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// A message of `tag` with `body`, framed.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let length = i32::try_from(body.len() + 4).unwrap_or(i32::MAX);
    let mut framed = vec![tag];
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(body);
    framed
}

/// Where the relay carries connections to, and how.
struct Server {
    config: Config,
    settings: Settings,
}

/// A directory only this user may enter (0700) under the system's temporary directory,
/// removed when dropped: whoever connects to the relay's socket gets a connection with the
/// URL's client certificate. Named `permd-relay-<pid namespace>-<pid>-<random>`, so that one
/// left by a process that could not remove it (killed with SIGKILL, or by the kernel out of
/// memory) is removed by the next one that makes its own (`PrivateDir::sweep`).
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> io::Result<PrivateDir> {
        Self::create_in(&std::env::temp_dir())
    }

    fn create_in(parent: &Path) -> io::Result<PrivateDir> {
        use std::hash::{BuildHasher as _, Hasher as _};
        let namespace = pid_namespace();
        let mut last = None;
        for _ in 0..8 {
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let path = parent.join(format!(
                "{RELAY_DIR}{}-{}-{random:016x}",
                namespace.as_deref().unwrap_or("unknown"),
                std::process::id()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = PrivateDir(path);
                    if let Some(namespace) = namespace {
                        dir.sweep(parent, &namespace);
                    }
                    return Ok(dir);
                }
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

    /// Removes the relay directories in `parent` that processes of this pid namespace
    /// (`namespace`) left behind: those whose process is gone, and which are directories
    /// of this one's owner (as this one is; not a link). Of another namespace, the pid in
    /// the name says nothing here: left alone. Best effort: what cannot be read or removed
    /// stays.
    fn sweep(&self, parent: &Path, namespace: &str) {
        use std::os::unix::fs::MetadataExt as _;
        let (Ok(own), Ok(entries)) = (
            std::fs::symlink_metadata(&self.0),
            std::fs::read_dir(parent),
        ) else {
            return;
        };
        let prefix = format!("{RELAY_DIR}{namespace}-");
        for entry in entries.map_while(Result::ok) {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|name| name.strip_prefix(&prefix))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let ours = std::fs::symlink_metadata(&path)
                .is_ok_and(|meta| meta.is_dir() && meta.uid() == own.uid());
            if ours && path != self.0 && !Path::new(&format!("/proc/{pid}")).exists() {
                let removed = std::fs::remove_dir_all(&path);
                let dir = path.display();
                tracing::debug!(%dir, ?removed, "the relay directory of a process gone");
            }
        }
    }
}

/// The start of a relay directory's name.
const RELAY_DIR: &str = "permd-relay-";

/// This process's pid namespace, as the inode number `/proc/self/ns/pid` names (`None`
/// where there is no such link to read).
fn pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let inode = link.to_str()?.strip_prefix("pid:[")?.strip_suffix(']')?;
    inode
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| inode.to_owned())
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the relay's authentication for sqlx does with what the server says first,
    /// sqlx's start-up message passed on: its result, and what sqlx received.
    async fn bound(
        server_says: &[u8],
        end_point: Result<Vec<u8>, &str>,
    ) -> (Result<(), String>, Vec<u8>) {
        let (mut sqlx, mut client) = tokio::io::duplex(4096);
        let (mut postgres, mut server) = tokio::io::duplex(4096);
        let startup = [
            &12i32.to_be_bytes()[..],
            &196_608i32.to_be_bytes(),
            b"\0\0\0\0",
        ]
        .concat();
        sqlx.write_all(&startup[..12]).await.expect("write");
        postgres.write_all(server_says).await.expect("write");
        let result =
            authenticate_bound(&mut client, &mut server, Some(b"pw".to_vec()), end_point).await;
        let mut passed = vec![0; 12];
        postgres
            .read_exact(&mut passed)
            .await
            .expect("the start-up message");
        assert_eq!(passed, startup[..12]);
        drop(client);
        let mut received = Vec::new();
        sqlx.read_to_end(&mut received).await.expect("read");
        (result, received)
    }

    /// The relay runs SCRAM-SHA-256-PLUS for sqlx or refuses, saying why: a server that
    /// does not offer it, that lets the client in without it, or that asks for another
    /// method, and a connection without TLS; a server's error is passed on to sqlx.
    #[tokio::test]
    async fn the_relay_binds_scram_or_refuses() {
        let code =
            |code: i32, rest: &[u8]| message(b'R', &[&code.to_be_bytes()[..], rest].concat());
        let hash = Ok(vec![7; 32]);
        for (server_says, refused) in [
            (
                code(10, b"SCRAM-SHA-256\0\0"),
                "the server did not offer SCRAM-SHA-256-PLUS",
            ),
            (code(0, b""), "without completing SCRAM authentication"),
            (code(3, b""), "the server asked for a cleartext password"),
            (code(5, b"salt"), "the server asked for an MD5 password"),
        ] {
            let (result, received) = bound(&server_says, hash.clone()).await;
            let why = result.expect_err("refused");
            assert!(why.contains(refused), "{why}");
            assert!(received.is_empty(), "sqlx was told {received:?}");
        }
        let error = message(b'E', b"SFATAL\0Mno such role\0\0");
        let (result, received) = bound(&error, hash).await;
        assert_eq!((result, received), (Ok(()), error));
        let (result, _) = bound(&code(10, b"SCRAM-SHA-256-PLUS\0\0"), Err("no TLS, say")).await;
        assert_eq!(
            result.expect_err("refused"),
            "channel_binding=require, and no TLS, say"
        );
    }

    /// A relay directory whose process is gone is removed when the next one is made; one
    /// of a live process, one named for another pid namespace, a file or a link of such a
    /// name, and what the link points to, stay.
    #[test]
    fn a_relay_directory_left_by_a_process_gone_is_removed_by_the_next() {
        let parent = std::env::temp_dir().join(format!(
            "permd-relay-sweep-test-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos()
        ));
        std::fs::create_dir(&parent).expect("a directory for the test");
        // Removed however the test ends.
        let parent = PrivateDir(parent);
        let parent = &parent.0;
        let namespace = pid_namespace().expect("this process's pid namespace");
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let gone = child.id();
        child.wait().expect("true ends");
        let live = std::process::id();
        let dir = |name: String| {
            let path = parent.join(name);
            std::fs::create_dir(&path).expect("a directory");
            std::fs::write(path.join(".s.PGSQL.5432"), b"").expect("a file");
            path
        };
        let left = dir(format!("{RELAY_DIR}{namespace}-{gone}-0123456789abcdef"));
        let running = dir(format!("{RELAY_DIR}{namespace}-{live}-0123456789abcdef"));
        let elsewhere = dir(format!("{RELAY_DIR}1-{gone}-0123456789abcdef"));
        let target = dir("target".to_owned());
        let link = parent.join(format!("{RELAY_DIR}{namespace}-{gone}-link"));
        std::os::unix::fs::symlink(&target, &link).expect("a link");
        let file = parent.join(format!("{RELAY_DIR}{namespace}-{gone}-file"));
        std::fs::write(&file, b"").expect("a file");

        let made = PrivateDir::create_in(parent).expect("a relay directory");
        assert!(made.0.is_dir());
        assert!(!left.exists(), "the directory of a process gone stays");
        for stays in [&running, &elsewhere, &file] {
            assert!(stays.exists(), "{} removed", stays.display());
        }
        assert!(std::fs::symlink_metadata(&link).is_ok(), "the link removed");
        assert!(
            target.join(".s.PGSQL.5432").exists(),
            "the link's target emptied"
        );
        let path = made.0.clone();
        drop(made);
        assert!(!path.exists());
    }
}
