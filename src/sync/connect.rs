//! Opening the sync connection. permd opens the socket itself rather than through
//! tokio-postgres's `Config::connect`, so that the COPY tap (`tap.rs`) can sit on it, and
//! hands it to tokio-postgres, which runs the protocol over it. It follows what
//! `Config::connect` does: each host in turn (its `hostaddr` if given), each address of a
//! host name, the connect timeout, `TCP_NODELAY`, keepalives, the TCP user timeout, and
//! `target_session_attrs` (a host that is not what it asks for is skipped, so a URL naming
//! a primary and its standbys reaches the primary), and `load_balance_hosts=random` (hosts,
//! and the addresses of each host name, in a random order at each connect). TLS
//! (`tls.rs`) is negotiated under the tap, so the tap reads the plaintext.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{
    ChannelBinding, Host, LoadBalanceHosts, SslMode, SslNegotiation, TargetSessionAttrs,
};
use tokio_postgres::{Client, Config, Connection, SimpleQueryMessage};
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use super::conninfo::{self, Libpq, Recovery};
use super::environment;
use super::tap::{Tap, Tapped};
use super::tls::{self, Tls};
use super::{error_chain, Error};

/// A socket to Postgres: TCP or Unix, or TLS over TCP (boxed: a TLS session's state is
/// large, and the socket moves into the connection).
pub(crate) type Socket = Either<Either<TcpStream, UnixStream>, Box<TlsStream<TcpStream>>>;

/// The sync connection: tokio-postgres's, over our tapped socket.
pub(crate) type SyncConnection = Connection<Tapped<Socket>, tls::BoundStream<Tapped<Socket>>>;

/// Reads the database URL as the sync connection does: as one key=value string with its
/// service's parameters (`conninfo::read`), its TLS options (`tls.rs`, which reads the
/// files they name) and the rest, which tokio-postgres reads. Refuses what it could never
/// connect with, with the reason.
pub(crate) fn config(url: &str) -> Result<(Config, Settings), Error> {
    let url = conninfo::resolve(url, &environment::process)?;
    let (rest, options) = tls::split_with(&url, &environment::process)?;
    let tls = options.load()?;
    let (rest, libpq) = conninfo::take(&rest, &conninfo::OPTIONS);
    let mut config = rest
        .parse::<Config>()
        .map_err(|error| Error::Url(error_chain(&error)))?;
    environment::fill(&mut config, &environment::process)?;
    let libpq = conninfo::apply(&mut config, libpq, &environment::process)?;
    // permd negotiates TLS itself, below the tap; tokio-postgres must not ask again.
    config.ssl_mode(SslMode::Disable);
    Ok((config, Settings { tls, libpq }))
}

/// What a connection needs beside tokio-postgres's `Config`: how to speak TLS, and libpq's
/// settings that `Config` does not hold.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) tls: Tls,
    pub(crate) libpq: Libpq,
}

/// The sync connection's settings where the URL (and libpq's environment) leave them at
/// their defaults: `application_name` `permd`, a 5 s connect timeout, and keepalive probes
/// after 10 s idle (libpq leaves that to the system, whose 2 h would leave a dead server
/// unnoticed between polls). A URL's `keepalives_idle` or `keepalives=0` is kept; until
/// session 34 both were overridden.
pub(crate) fn daemon_defaults(config: &mut Config) {
    if config.get_application_name().is_none() {
        config.application_name("permd");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_keepalives_idle() == Config::new().get_keepalives_idle() {
        config.keepalives_idle(Duration::from_secs(10));
    }
}

/// The statements the sync connection runs first: `own`, permd's own settings for the
/// session (plain `SET`s), and the overrides of what the database or the role set for
/// every session (`ALTER DATABASE … SET`, `ALTER ROLE … SET`, `postgresql.conf`) for the
/// application's sake that would break permd's own work.
/// - `default_transaction_isolation = 'read committed'`: with SERIALIZABLE the default, a
///   standby refused every statement ("cannot use serializable mode in a hot standby"),
///   and on a primary every poll was a SERIALIZABLE transaction whose predicate locks
///   could fail the application's SERIALIZABLE writers. A poll is one statement, the same
///   snapshot either way, and a load asks for REPEATABLE READ itself.
/// - no `statement_timeout`, as `pg_dump` sets it, nor `transaction_timeout` (Postgres
///   17): a timeout sized for the application's queries cancelled a full load of a large
///   set at every try (13 s at 50M tuples; benches/README.md, "load"); nor
///   `idle_session_timeout` (Postgres 14), which would end a connection that waits for
///   notifications longer than it between polls; nor `idle_in_transaction_session_timeout`
///   (Postgres 9.6), which ended a full load's session between its statements (the rows
///   of its last COPY still being taken in, then the commit: at a database's 1 ms it never
///   loaded), and `verify`'s between its reads. permd keeps its own deadlines (the query
///   timeout for every other statement, the stall bound for a load, `lock_timeout`).
/// - `row_security = off`, as `pg_dump` sets it: row-level security on permd's tables
///   whose policies would hide rows from permd's role then makes Postgres refuse the read
///   (`query would be affected by row-level security policy …`) rather than return part
///   of the set, which the daemon would have mirrored (every hidden grant denied, every
///   hidden change skipped) and `verify`, its digest filtered alike, found equal.
///
/// `own` and the settings every server has first, as plain `SET`s in one batch, which
/// take no snapshot (a standby would refuse one in that batch's transaction, whose
/// isolation is fixed as it starts) and no time a timeout could cut; then, through
/// `pg_settings`, whose rows a server too old for a setting lacks, the others, with no
/// statement timeout left.
/// Statements rather than server options sent with the connection (`options`), which
/// PgBouncer refuses for a parameter it is not configured to track or ignore. A setting
/// the URL's `options` or `PGOPTIONS` names is the operator's choice for permd and is kept.
pub(crate) fn first_statements(config: &Config, own: &str) -> Vec<String> {
    const EVERY_SERVER: [(&str, &str); 4] = [
        ("default_transaction_isolation", "'read committed'"),
        ("statement_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
        ("row_security", "off"),
    ];
    const NEWER_TIMEOUTS: [&str; 2] = ["transaction_timeout", "idle_session_timeout"];
    let kept = |name: &str| names_setting(config.get_options(), name);
    let set: Vec<String> = std::iter::once(own.to_owned())
        .chain(
            EVERY_SERVER
                .into_iter()
                .filter(|(name, _)| !kept(name))
                .map(|(name, value)| format!("SET {name} = {value}")),
        )
        .collect();
    let lifted: Vec<String> = NEWER_TIMEOUTS
        .into_iter()
        .filter(|name| !kept(name))
        .map(|name| format!("'{name}'"))
        .collect();
    let mut statements = vec![set.join("; ")];
    if !lifted.is_empty() {
        statements.push(format!(
            "SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN ({})",
            lifted.join(", ")
        ));
    }
    statements
}

/// Names the server session a statement runs in: its process, and when its server
/// started (two servers may each have a process of that number). Before any of permd's
/// settings, so in a transaction of its own that sets what it needs: READ COMMITTED (a
/// standby refuses every snapshot of a database's SERIALIZABLE default) and no statement
/// timeout, neither lasting beyond it.
pub(crate) const WHICH_SESSION: &str = "BEGIN ISOLATION LEVEL READ COMMITTED; \
     SET LOCAL statement_timeout = 0; \
     SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())::text; COMMIT";

/// How long a second connection's [`WHICH_SESSION`] is waited for at most. Where a
/// session pooler has one server session for permd (PgBouncer's `pool_size = 1`), the
/// second waits for the first's to be free, which it never is while the first is open:
/// it is given up after this, the question left open.
pub(crate) const SECOND_SESSION_WAIT: Duration = Duration::from_secs(2);

/// Refuses a pooler in transaction or statement mode before any of permd's settings can
/// stay behind in a server session: `first` is the server session (process, server's
/// start: [`WHICH_SESSION`]) of a connection that is still open, `second` that of another
/// connection's statement run after the first's. Two connections open at once have two
/// server sessions, except through a pooler that runs each transaction in whichever
/// session is free (PgBouncer hands out the one freed last, the first's).
pub(crate) fn two_sessions(first: (&str, &str), second: (&str, &str)) -> Result<(), Error> {
    if first == second {
        return Err(Error::Pooled(format!(
            "two of permd's connections, open at once, ran in one server session (process {})",
            first.0
        )));
    }
    Ok(())
}

/// Refuses a pooler that hands out its idle server sessions in turn (PgBouncer's
/// `server_round_robin = 1`), which may give a second connection another session than the
/// first's, so that [`two_sessions`] cannot tell: `first` and `again` are one
/// connection's server session ([`WHICH_SESSION`]) before and after the second
/// connection's; a connection to Postgres, or through a pooler in session mode, keeps
/// its session. (Two idle sessions handed out in turn give the first connection its own
/// back: that case is left to the sync connection's watch, `Applier::same_backend`.)
pub(crate) fn one_session(first: (&str, &str), again: (&str, &str)) -> Result<(), Error> {
    if first != again {
        return Err(Error::Pooled(format!(
            "one of permd's connections ran its statements in two server sessions (process \
             {}, then {})",
            first.0, again.0
        )));
    }
    Ok(())
}

/// `client`'s server session ([`WHICH_SESSION`], in the simple protocol: nothing
/// prepared stays behind).
pub(crate) async fn which_session(client: &Client) -> Result<(String, String), Error> {
    let rows = client.simple_query(WHICH_SESSION).await?;
    let row = rows.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let field = |i: usize| row.and_then(|row| row.get(i)).map(str::to_owned);
    match (field(0), field(1)) {
        (Some(process), Some(started)) => Ok((process, started)),
        _ => Err(Error::Protocol(
            "the session's process was not returned".into(),
        )),
    }
}

/// The pooler check for the sync connection, `client`, whose first statement this is,
/// unless its server session's process is the one the connection's start named
/// (`announced`, from its BackendKeyData: `Tap::announced_process`). Postgres names the
/// session's own process there; a pooler, which may hand each transaction another
/// session, names a number of its own (PgBouncer's is random). So where the two agree,
/// permd speaks to Postgres itself, or through something that passes its bytes on (a
/// TCP proxy, a pooler in session mode that hands on the session's own key), and no
/// second connection is opened. Else a second connection is opened as `client`'s was;
/// once it is up, `client` is asked its server session again ([`one_session`]), and the
/// second connection its own right after, then closed ([`second_session`],
/// [`two_sessions`]): through a transaction pooler the session `client` has just freed
/// is the one handed out next (PgBouncer's most recently freed), unless another client
/// takes it within that one round trip. (Until session 77 the second connection was
/// opened after `client`'s first question, and asked within its start-up's time of it,
/// which was enough for a client of the pool's own to take the freed session, so that the
/// second got another and the check passed: a test's own client did so once.) Where
/// they cannot tell, the sync connection's own watch goes on (`Applier::same_backend`),
/// which also catches a transaction pooler that names the process of the session it
/// happened to use first. Returns `client`'s process.
pub(crate) async fn alone_in_its_session(
    client: &Client,
    announced: Option<i32>,
    config: &Config,
    settings: &Settings,
    wait: Duration,
) -> Result<i32, Error> {
    let first = which_session(client).await?;
    let process = first
        .0
        .parse()
        .map_err(|_| Error::Protocol(format!("a process named {:?}", first.0)))?;
    if announced == Some(process) {
        tracing::debug!(
            process,
            "the server session is the process the connection's start named: no pooler \
             check needed"
        );
        return Ok(process);
    }
    let mut config = config.clone();
    config.application_name(second_name(config.get_application_name()));
    let mut again = None;
    let second = async {
        let (other, connection) = connect(&config, settings, &Tap::default()).await?;
        let running = tokio::spawn(connection);
        again = Some(which_session(client).await);
        let second = which_session(&other).await;
        drop(other);
        let _ = running.await;
        second
    };
    let second = second_session(second, wait).await;
    // Asked here where the second connection never came up.
    let again = match again {
        Some(again) => again?,
        None => which_session(client).await?,
    };
    one_session((&first.0, &first.1), (&again.0, &again.1))?;
    if let Some(second) = second {
        two_sessions((&again.0, &again.1), (&second.0, &second.1))?;
    }
    Ok(process)
}

/// The second connection's `application_name`: the first's (`name`), told apart, so that
/// whoever counts permd's sessions by name (in `pg_stat_activity`, while its backend
/// exits) does not count it.
pub(crate) fn second_name(name: Option<&str>) -> String {
    format!("{} (pooler check)", name.unwrap_or("permd"))
}

/// The `application_name` of the connection a reload beside the polls loads on: the sync
/// connection's (`name`), told apart.
pub(crate) fn reload_name(name: Option<&str>) -> String {
    format!("{} (reload)", name.unwrap_or("permd"))
}

/// The `application_name` of the connection that waits for a busy slot, and holds it
/// once taken (`sync::busy`): the sync connection's (`name`), told apart.
pub(crate) fn slot_name(name: Option<&str>) -> String {
    format!("{} (busy slot)", name.unwrap_or("permd"))
}

/// What `second` (a second connection's [`WHICH_SESSION`]) answers within `wait` (at
/// most [`SECOND_SESSION_WAIT`]), for [`two_sessions`]. Where it answers nothing (the
/// connection failed, or waited longer: a session pooler with one server session for
/// permd, a server at its connection limit) nothing is known: `None`, and the log says so.
pub(crate) async fn second_session<E: std::fmt::Display>(
    second: impl Future<Output = Result<(String, String), E>>,
    wait: Duration,
) -> Option<(String, String)> {
    const UNTOLD: &str =
        "could not tell whether a pooler in transaction mode stands between permd and postgres";
    let wait = wait.min(SECOND_SESSION_WAIT);
    match tokio::time::timeout(wait, second).await {
        Ok(Ok(second)) => return Some(second),
        Ok(Err(error)) => tracing::info!(%error, "{UNTOLD}: a second connection failed"),
        Err(_) => tracing::info!(
            "{UNTOLD}: a second connection waited {wait:?} for a server session (a pool in \
             session mode with one for permd?)"
        ),
    }
    None
}

/// Whether server options (`-c name=value`, `-cname=value`, `--name=value`, as Postgres
/// reads them: `-` in a name is `_`, any case) set the setting `name`.
pub(crate) fn names_setting(options: Option<&str>, name: &str) -> bool {
    let mut words = options.unwrap_or_default().split_whitespace();
    let mut named = Vec::new();
    while let Some(word) = words.next() {
        let setting = match word {
            "-c" => words.next(),
            _ => word.strip_prefix("--").or_else(|| word.strip_prefix("-c")),
        };
        if let Some((setting, _value)) = setting.and_then(|s| s.split_once('=')) {
            named.push(setting.to_ascii_lowercase().replace('-', "_"));
        }
    }
    named.iter().any(|setting| setting == name)
}

/// The server options the URL itself (or its service) gives (`options=`), without libpq's
/// environment: for the one-off commands, whose sqlx reads `PGOPTIONS` itself.
pub(crate) fn own_options(url: &str) -> Option<String> {
    let url = conninfo::resolve(url, &environment::process).ok()?;
    let (rest, _) = tls::split_with(&url, &|_| None).ok()?;
    let (rest, _) = conninfo::take(&rest, &conninfo::OPTIONS);
    rest.parse::<Config>()
        .ok()?
        .get_options()
        .map(str::to_owned)
}

/// Connects to the first of `config`'s hosts that answers and suits its
/// `target_session_attrs`, over TLS as `settings` ask, with `tap` on the socket.
/// `prefer-standby` goes over the hosts twice, as libpq: for a standby, then for any.
pub(crate) async fn connect(
    config: &Config,
    settings: &Settings,
    tap: &Tap,
) -> Result<(Client, SyncConnection), Error> {
    let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
    let mut order: Vec<usize> = (0..hosts).collect();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        shuffle(&mut order);
    }
    let passes = match settings.libpq.recovery {
        Some(Recovery::PreferStandby) => vec![Some(Recovery::Standby), None],
        wanted => vec![wanted],
    };
    let mut last = None;
    for wanted in passes {
        for &i in &order {
            let attempt = match socket(config, settings, i).await {
                Some(Ok(socket)) => {
                    let config = with_password(config, &settings.libpq, i);
                    let tapped = tap.on(socket).requiring(settings.libpq.require_auth);
                    handshake(&config, tapped, wanted).await
                }
                Some(Err(e)) => Err(e),
                None => continue,
            };
            match attempt {
                Ok(connected) => return Ok(connected),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or_else(no_host))
}

/// `config` with the password for its `i`th server, read from the password file now if
/// the URL gives none (`environment::password`), so that a rotated one is used.
fn with_password<'c>(config: &'c Config, libpq: &Libpq, i: usize) -> std::borrow::Cow<'c, Config> {
    let passfile = libpq.passfile.as_deref();
    match environment::password(config, passfile, i, &environment::process) {
        Some(password) if config.get_password().is_none() => {
            let mut config = config.clone();
            config.password(password);
            std::borrow::Cow::Owned(config)
        }
        _ => std::borrow::Cow::Borrowed(config),
    }
}

/// A socket to `config`'s one server, as `settings` ask, for the relay of the one-off
/// commands (`relay.rs`), which run the protocol themselves.
pub(crate) async fn open(config: &Config, settings: &Settings) -> Result<Socket, Error> {
    socket(config, settings, 0)
        .await
        .unwrap_or_else(|| Err(no_host()))
}

fn no_host() -> Error {
    Error::Connect(io::Error::new(
        io::ErrorKind::InvalidInput,
        "the database URL names no host",
    ))
}

/// The port of `config`'s `i`th server: its own, else the one port given, else 5432.
pub(super) fn port(config: &Config, i: usize) -> u16 {
    let ports = config.get_ports();
    ports
        .get(i)
        .or_else(|| ports.first())
        .copied()
        .unwrap_or(5432)
}

/// A socket to `config`'s `i`th host (its `hostaddr` if given), over TLS as `settings`
/// ask, and, over a Unix socket, to a server that runs as `requirepeer` says; `None` if
/// the URL names neither.
async fn socket(config: &Config, settings: &Settings, i: usize) -> Option<Result<Socket, Error>> {
    let port = port(config, i);
    let tls = &settings.tls;
    // The certificate names the host; its address only when no host name is given.
    let socket = match (config.get_hostaddrs().get(i), config.get_hosts().get(i)) {
        (Some(addr), Some(Host::Tcp(host))) => {
            let addr = addr.to_string();
            secured(tls, host, || tcp(&addr, port, config)).await
        }
        (Some(addr), _) => {
            let addr = addr.to_string();
            secured(tls, &addr, || tcp(&addr, port, config)).await
        }
        (None, Some(Host::Tcp(host))) => secured(tls, host, || tcp(host, port, config)).await,
        // A Unix socket never uses TLS, as in libpq.
        (None, Some(Host::Unix(dir))) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            match timed(config, UnixStream::connect(path)).await {
                Ok(unix) => match &settings.libpq.requirepeer {
                    Some(user) => runs_as(&unix, user).map(|()| unix),
                    None => Ok(unix),
                },
                Err(error) => Err(error),
            }
            .map(|unix| Either::Left(Either::Right(unix)))
            .map_err(Error::Connect)
        }
        (None, None) => return None,
    };
    Some(socket)
}

/// libpq's `requirepeer`: the server at the other end of `unix` runs as `user`, by the
/// socket's peer credentials and the name `/etc/passwd` gives their uid (libpq asks the
/// system's user database, which is that file unless NSS is told otherwise).
fn runs_as(unix: &UnixStream, user: &str) -> io::Result<()> {
    let uid = unix.peer_cred()?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let name = user_name(&passwd, uid);
    if name == Some(user) {
        return Ok(());
    }
    let runs_as = name.map_or_else(|| format!("uid {uid}"), str::to_owned);
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("requirepeer={user}, and the server runs as {runs_as}"),
    ))
}

/// The name of user `uid` in `passwd` (`/etc/passwd`'s lines: `name:password:uid:…`).
fn user_name(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse() == Ok(uid)).then_some(name)
    })
}

/// What SCRAM-SHA-256-PLUS binds a connection on `socket` to (`channel_binding`): the hash
/// of the server's certificate (`tls::end_point`), or why there is none.
pub(crate) fn binding(socket: &Socket) -> Result<Vec<u8>, &'static str> {
    match socket {
        Either::Right(secure) => tls::end_point(secure).ok_or(
            "the server's certificate is signed with no hash to bind by (Ed25519, for which \
             Postgres binds none either)",
        ),
        Either::Left(_) => Err("the connection has no TLS to bind"),
    }
}

/// Runs the protocol's start-up over `socket` and checks `target_session_attrs`: the
/// `Config`'s, then `recovery`.
async fn handshake(
    config: &Config,
    socket: Tapped<Socket>,
    recovery: Option<Recovery>,
) -> Result<(Client, SyncConnection), Error> {
    let encrypted = matches!(socket.inner(), Either::Right(_));
    let end_point = binding(socket.inner());
    if config.get_channel_binding() == ChannelBinding::Require {
        if let Err(why) = end_point {
            // Before tokio-postgres, which says only "server did not use channel binding".
            return Err(Error::Tls(format!("channel_binding=require, and {why}")));
        }
    }
    let (client, mut connection) = if encrypted {
        // Encrypted below the tap already: tokio-postgres "connects" TLS directly (no
        // SSLRequest), which only adds the channel binding (`tls::Bound`).
        let mut direct = config.clone();
        direct
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(SslNegotiation::Direct);
        direct
            .connect_raw(socket, tls::Bound(end_point.ok()))
            .await?
    } else {
        config.connect_raw(socket, tls::Bound(None)).await?
    };
    // Each check: what to ask, the answer that refuses the server, and why.
    let read_only = "SHOW transaction_read_only";
    let in_recovery = "SELECT pg_is_in_recovery()";
    let checks = [
        match config.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => Some((
                read_only,
                "on",
                "target_session_attrs=read-write, and the server is read only",
            )),
            TargetSessionAttrs::ReadOnly => Some((
                read_only,
                "off",
                "target_session_attrs=read-only, and the server allows writes",
            )),
            _ => None,
        },
        match recovery {
            Some(Recovery::Primary) => Some((
                in_recovery,
                "t",
                "target_session_attrs=primary, and the server is a standby",
            )),
            Some(Recovery::Standby) => Some((
                in_recovery,
                "f",
                "target_session_attrs=standby, and the server is a primary",
            )),
            _ => None,
        },
    ];
    for (sql, refusing, why) in checks.into_iter().flatten() {
        if ask(&client, &mut connection, sql).await?.as_deref() == Some(refusing) {
            return Err(Error::Connect(io::Error::new(
                io::ErrorKind::PermissionDenied,
                why,
            )));
        }
    }
    Ok((client, connection))
}

/// The first column of the first row `sql` returns, on a connection not spawned yet
/// (driven while the query runs); an error if it returns no row.
async fn ask(
    client: &Client,
    connection: &mut SyncConnection,
    sql: &str,
) -> Result<Option<String>, Error> {
    let mut query = pin!(client.simple_query(sql));
    let messages = poll_fn(|cx| {
        if let Poll::Ready(ended) = Pin::new(&mut *connection).poll(cx) {
            return Poll::Ready(Err(ended.err().map_or(Error::Closed, Error::Postgres)));
        }
        query.as_mut().poll(cx).map_err(Error::Postgres)
    })
    .await?;
    let first = messages.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
        _ => None,
    });
    first.ok_or_else(|| Error::Protocol(format!("{sql} returned no row")))
}

/// A TCP socket from `connect`, then TLS on it if `tls` asks and the server agrees. With
/// `sslmode=prefer`, a handshake that fails is followed by a plain connection, as libpq does
/// (a server whose TLS rustls cannot speak, e.g. TLS 1.1 at most, is still reached).
async fn secured<C, F>(tls: &Tls, name: &str, connect: C) -> Result<Socket, Error>
where
    C: Fn() -> F,
    F: Future<Output = io::Result<TcpStream>>,
{
    let plain = |stream| Either::Left(Either::Left(stream));
    let stream = connect().await.map_err(Error::Connect)?;
    match tls.negotiate(stream, name).await {
        Ok(Either::Left(secure)) => Ok(Either::Right(Box::new(secure))),
        Ok(Either::Right(stream)) => Ok(plain(stream)),
        Err(Error::Tls(why)) if tls.mode == tls::Mode::Prefer => {
            tracing::warn!(
                error = %why,
                "TLS with postgres failed; sslmode=prefer, so connecting in plain text"
            );
            Ok(plain(connect().await.map_err(Error::Connect)?))
        }
        Err(e) => Err(e),
    }
}

/// Each address of `host` in turn.
async fn tcp(host: &str, port: u16, config: &Config) -> io::Result<TcpStream> {
    let mut addrs: Vec<_> = tokio::net::lookup_host((host, port)).await?.collect();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        shuffle(&mut addrs);
    }
    let mut last = None;
    for addr in addrs {
        match timed(config, TcpStream::connect(addr)).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                let socket = SockRef::from(&stream);
                if let Some(timeout) = config.get_tcp_user_timeout() {
                    socket.set_tcp_user_timeout(Some(*timeout))?;
                }
                if config.get_keepalives() {
                    socket.set_tcp_keepalive(&keepalive(config))?;
                }
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

/// Puts `items` in a random order (Fisher-Yates over xorshift64, seeded by std's
/// per-instance random hasher keys: spreading connections needs no better randomness).
fn shuffle<T>(items: &mut [T]) {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut state = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = (state % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

fn keepalive(config: &Config) -> TcpKeepalive {
    let mut keepalive = TcpKeepalive::new().with_time(config.get_keepalives_idle());
    if let Some(interval) = config.get_keepalives_interval() {
        keepalive = keepalive.with_interval(interval);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        keepalive = keepalive.with_retries(retries);
    }
    keepalive
}

async fn timed<T>(
    config: &Config,
    connect: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match config.get_connect_timeout() {
        Some(timeout) => tokio::time::timeout(*timeout, connect)
            .await
            .unwrap_or_else(|_| Err(timed_out(*timeout))),
        None => connect.await,
    }
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connecting to postgres timed out after {after:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only one process of one server is one session: the same process number on a
    /// server started at another time (another server) is another.
    #[test]
    fn two_connections_in_one_server_session_are_refused() {
        let error = two_sessions(("41", "1700000000.5"), ("41", "1700000000.5"))
            .expect_err("one session")
            .to_string();
        assert!(
            error.starts_with("two of permd's connections, open at once, ran in one server session (process 41): a pooler")
                && error.contains("pool_mode=session"),
            "{error}"
        );
        two_sessions(("41", "1700000000.5"), ("42", "1700000000.5")).expect("two processes");
        two_sessions(("41", "1700000000.5"), ("41", "1700000001.5")).expect("two servers");
    }

    /// One connection keeps its server session: another process, or the same number on
    /// another server, is another session.
    #[test]
    fn one_connection_in_two_server_sessions_is_refused() {
        for again in [("42", "1700000000.5"), ("41", "1700000001.5")] {
            let error = one_session(("41", "1700000000.5"), again)
                .expect_err("two sessions")
                .to_string();
            assert!(
                error.starts_with(&format!(
                    "one of permd's connections ran its statements in two server sessions \
                     (process 41, then {}): a pooler",
                    again.0
                )) && error.contains("pool_mode=session"),
                "{error}"
            );
        }
        one_session(("41", "1700000000.5"), ("41", "1700000000.5")).expect("one session");
    }

    fn refused(error: Error) -> io::Error {
        match error {
            Error::Connect(e) => e,
            other => panic!("not a connect error: {other}"),
        }
    }

    /// A URL the sync connection could never connect with is refused with the reason,
    /// whichever form it has; one with TLS options is read.
    #[test]
    fn urls_that_do_not_parse_are_refused_with_the_reason() {
        let refused = |url: &str| match config(url) {
            Err(Error::Url(why)) => why,
            Err(other) => panic!("{url}: not a URL error: {other}"),
            Ok(_) => panic!("{url}: accepted"),
        };
        let why = refused("postgres://u@localhost/db?sslmode=allow-maybe");
        assert!(why.contains("sslmode=allow-maybe"), "{why}");
        let why = refused("host=localhost sslmode='verify-full' sslrootcert=/nonexistent/ca.pem");
        assert!(why.contains("sslrootcert=/nonexistent/ca.pem"), "{why}");
        let why = refused("postgres://u@localhost/db?frobnicate=1");
        assert!(why.contains("frobnicate"), "{why}");
        for (url, expected) in [
            (
                "postgres://u@localhost/db?target_session_attrs=readonly",
                "prefer-standby",
            ),
            (
                "postgres://u@localhost/db?service=permd-no-such-service",
                "definition of service \"permd-no-such-service\" not found",
            ),
            (
                "postgres://u@localhost/db?require_auth=scram",
                "is not one of password, md5",
            ),
            (
                "postgres://u@localhost/db?replication=database",
                "ordinary connection",
            ),
            ("postgres://u@localhost/db?client_encoding=LATIN1", "UTF8"),
            (
                "postgres://u@localhost/db?keepalives_count=many",
                "whole number",
            ),
        ] {
            let why = refused(url);
            assert!(why.contains(expected), "{url}: {why}");
        }
        for (url, mode) in [
            ("postgres://u@localhost/db", tls::Mode::Prefer),
            (
                "postgres://u@localhost/db?sslmode=require&application_name=a",
                tls::Mode::Require,
            ),
            (
                "host=/run/postgresql dbname=db sslmode=disable",
                tls::Mode::Disable,
            ),
        ] {
            let (config, settings) = config(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(settings.tls.mode, mode, "{url}");
            assert_eq!(config.get_ssl_mode(), SslMode::Disable, "{url}");
        }
    }

    /// libpq's parameters that tokio-postgres does not know are read, and the daemon's
    /// defaults fill only what the URL leaves out.
    #[test]
    fn libpq_parameters_are_read_and_the_daemon_defaults_fill_the_rest() {
        let (mut read, _) = config(
            "postgres://u@localhost/db?client_encoding=UTF8&fallback_application_name=app\
             &keepalives_count=4&krbsrvname=postgres&gsslib=gssapi&gssdelegation=0",
        )
        .expect("read");
        daemon_defaults(&mut read);
        assert_eq!(read.get_application_name(), Some("app"));
        assert_eq!(read.get_keepalives_retries(), Some(4));
        assert_eq!(read.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(read.get_connect_timeout(), Some(&Duration::from_secs(5)));
        let (mut read, _) = config(
            "host=localhost application_name=own fallback_application_name=app \
             keepalives_idle=300 connect_timeout=2 client_encoding=auto",
        )
        .expect("read");
        daemon_defaults(&mut read);
        assert_eq!(read.get_application_name(), Some("own"));
        assert_eq!(read.get_keepalives_idle(), Duration::from_secs(300));
        assert_eq!(read.get_connect_timeout(), Some(&Duration::from_secs(2)));
        let (mut read, _) = config("postgres://u@localhost/db?keepalives=0").expect("read");
        daemon_defaults(&mut read);
        assert!(!read.get_keepalives());
        assert_eq!(read.get_application_name(), Some("permd"));
    }

    /// A database's or role's timeouts and default isolation are overridden for the sync
    /// connection, and a setting the URL names is kept.
    #[test]
    fn the_sync_connection_overrides_settings_the_url_does_not_name() {
        let overrides = |url: &str| first_statements(&config(url).expect("read").0, "SET a = 1");
        let lifted = |names: &str| {
            format!("SELECT set_config(name, '0', false) FROM pg_settings WHERE name IN ({names})")
        };
        let all = [
            "SET a = 1; SET default_transaction_isolation = 'read committed'; \
             SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             SET row_security = off"
                .to_owned(),
            lifted("'transaction_timeout', 'idle_session_timeout'"),
        ];
        assert_eq!(overrides("postgres://u@localhost/db"), all);
        assert_eq!(
            overrides("postgres://u@localhost/db?options=-c%20search_path%3Dapp"),
            all
        );
        assert_eq!(
            overrides("host=localhost options='-c statement_timeout=5s -c idle_session_timeout=0'"),
            [
                "SET a = 1; SET default_transaction_isolation = 'read committed'; \
                 SET idle_in_transaction_session_timeout = 0; SET row_security = off"
                    .to_owned(),
                lifted("'transaction_timeout'")
            ]
        );
        assert_eq!(
            overrides(
                "postgres://u@localhost/db?options=--Statement-Timeout%3D5s%20\
                 -cdefault_transaction_isolation%3Dserializable%20\
                 -c%20idle_session_timeout%3D1min%20-c%20transaction_timeout%3D0%20\
                 -c%20idle_in_transaction_session_timeout%3D1min%20-c%20row_security%3Don"
            ),
            ["SET a = 1"]
        );
    }

    #[test]
    fn settings_are_named_as_postgres_reads_its_options() {
        let names = |options: &str, name: &str| names_setting(Some(options), name);
        assert!(names("-c statement_timeout=5s", "statement_timeout"));
        assert!(names("-cstatement_timeout=5s", "statement_timeout"));
        assert!(names("--Statement-Timeout=5s", "statement_timeout"));
        assert!(names("-c a=1 -c statement_timeout=0", "statement_timeout"));
        assert!(!names(
            "-c idle_in_transaction_session_timeout=5s",
            "idle_session_timeout"
        ));
        assert!(!names(
            "-c search_path=statement_timeout",
            "statement_timeout"
        ));
        assert!(!names_setting(None, "statement_timeout"));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let (config, settings) =
            config(&format!("postgres://u@127.0.0.1:{port}/db")).expect("a valid URL");
        let error = connect(&config, &settings, &Tap::default()).await.err();
        let error = refused(error.expect("nothing listens"));
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn shuffle_permutes_and_every_item_comes_first_sometimes() {
        let mut firsts = [0u32; 4];
        for _ in 0..400 {
            let mut items = [0, 1, 2, 3];
            shuffle(&mut items);
            let mut sorted = items;
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3]);
            firsts[items[0]] += 1;
        }
        // 100 expected each; below 40 has a probability of about 1e-12.
        assert!(firsts.iter().all(|&n| n >= 40), "{firsts:?}");
        let mut one = [7];
        shuffle(&mut one);
        shuffle::<u8>(&mut []);
        assert_eq!(one, [7]);
    }

    /// `/etc/passwd`'s name of a uid, for `requirepeer`.
    #[test]
    fn a_uid_is_named_as_etc_passwd_names_it() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# a comment\n\
                      postgres:x:104:110:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(user_name(passwd, 0), Some("root"));
        assert_eq!(user_name(passwd, 104), Some("postgres"));
        assert_eq!(user_name(passwd, 110), None);
        assert_eq!(user_name("", 0), None);
    }
}
