//! Opening the sync connection. permd opens the socket itself rather than through
//! tokio-postgres's `Config::connect`, so that the COPY tap (`tap.rs`) can sit on it, and
//! hands it to tokio-postgres, which runs the protocol over it. It follows what
//! `Config::connect` does: each host in turn (its `hostaddr` if given), each address of a
//! host name, the connect timeout, `TCP_NODELAY`, keepalives, the TCP user timeout, and
//! `target_session_attrs` (a host that is not what it asks for is skipped, so a URL naming
//! a primary and its standbys reaches the primary), and `load_balance_hosts=random` (hosts,
//! and the addresses of each host name, in a random order at each connect).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, LoadBalanceHosts, SslMode, TargetSessionAttrs};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, Connection, NoTls, SimpleQueryMessage};
use tokio_util::either::Either;

use super::tap::{Tap, Tapped};
use super::{error_chain, Error};

/// A TCP or Unix socket to Postgres.
pub(crate) type Socket = Either<TcpStream, UnixStream>;

/// The sync connection: tokio-postgres's, over our tapped socket.
pub(crate) type SyncConnection = Connection<Tapped<Socket>, NoTlsStream>;

/// Reads the database URL as the sync connection does, and refuses what it could never
/// connect with: a string tokio-postgres cannot read, or an `sslmode` that needs TLS
/// (`require`, and `verify-ca` and `verify-full`, which tokio-postgres does not read):
/// permd speaks plain TCP to Postgres.
pub(crate) fn config(url: &str) -> Result<Config, Error> {
    let needs_tls = |mode: &str| {
        Error::Url(format!(
            "sslmode={mode} needs TLS, which permd does not speak to Postgres yet (use \
             sslmode=prefer or disable, or a TLS-terminating proxy)"
        ))
    };
    let config = url
        .parse::<Config>()
        .map_err(|error| match option(url, "sslmode") {
            Some(mode @ ("verify-ca" | "verify-full")) => needs_tls(mode),
            _ => Error::Url(error_chain(&error)),
        })?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err(needs_tls("require"));
    }
    Ok(config)
}

/// The value of option `name` in a URL's query (`?name=value&…`) or a key=value string
/// (`name=value`, `name = 'value'`), if it is there; for error messages only.
fn option<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    url.match_indices(name).find_map(|(at, _)| {
        let before = url[..at].chars().next_back();
        if before.is_some_and(|c| !matches!(c, '?' | '&' | ' ' | '\t' | '\n')) {
            return None;
        }
        let value = url[at + name.len()..]
            .trim_start()
            .strip_prefix('=')?
            .trim_start();
        let value = value.strip_prefix('\'').unwrap_or(value);
        let end = value
            .find(['&', '\'', ' ', '\t', '\n'])
            .unwrap_or(value.len());
        Some(&value[..end])
    })
}

/// Connects to the first of `config`'s hosts that answers and suits its
/// `target_session_attrs`, with `tap` on the socket.
pub(crate) async fn connect(config: &Config, tap: &Tap) -> Result<(Client, SyncConnection), Error> {
    let hosts = config.get_hosts();
    let hostaddrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let mut order: Vec<usize> = (0..hosts.len().max(hostaddrs.len())).collect();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        shuffle(&mut order);
    }
    let mut last = None;
    for i in order {
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let socket = match (hostaddrs.get(i), hosts.get(i)) {
            (Some(addr), _) => tcp(&addr.to_string(), port, config).await,
            (None, Some(Host::Tcp(host))) => tcp(host, port, config).await,
            (None, Some(Host::Unix(dir))) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                timed(config, UnixStream::connect(path))
                    .await
                    .map(Either::Right)
            }
            (None, None) => continue,
        };
        let attempt = match socket {
            Ok(socket) => handshake(config, tap, socket).await,
            Err(e) => Err(Error::Connect(e)),
        };
        match attempt {
            Ok(connected) => return Ok(connected),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::Connect(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the database URL names no host",
        ))
    }))
}

/// Runs the protocol's start-up over `socket` and checks `target_session_attrs`.
async fn handshake(
    config: &Config,
    tap: &Tap,
    socket: Socket,
) -> Result<(Client, SyncConnection), Error> {
    let (client, mut connection) = config.connect_raw(tap.on(socket), NoTls).await?;
    let wanted = config.get_target_session_attrs();
    if wanted == TargetSessionAttrs::Any {
        return Ok((client, connection));
    }
    // The connection is not spawned yet: drive it while the query runs.
    let read_only = {
        let mut query = pin!(client.simple_query("SHOW transaction_read_only"));
        let messages = poll_fn(|cx| {
            if let Poll::Ready(ended) = Pin::new(&mut connection).poll(cx) {
                return Poll::Ready(Err(ended.err().map_or(Error::Closed, Error::Postgres)));
            }
            query.as_mut().poll(cx).map_err(Error::Postgres)
        })
        .await?;
        messages.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(|value| value == "on"),
            _ => None,
        })
    };
    match (wanted, read_only) {
        (TargetSessionAttrs::ReadWrite, Some(true)) => Err(Error::Connect(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "target_session_attrs=read-write, and the server is read only",
        ))),
        (TargetSessionAttrs::ReadOnly, Some(false)) => Err(Error::Connect(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "target_session_attrs=read-only, and the server allows writes",
        ))),
        (_, None) => Err(Error::Protocol(
            "SHOW transaction_read_only returned no row".into(),
        )),
        _ => Ok((client, connection)),
    }
}

/// Each address of `host` in turn.
async fn tcp(host: &str, port: u16, config: &Config) -> io::Result<Socket> {
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
                return Ok(Either::Left(stream));
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

    fn refused(error: Error) -> io::Error {
        match error {
            Error::Connect(e) => e,
            other => panic!("not a connect error: {other}"),
        }
    }

    /// A URL the sync connection could never connect with is refused with the reason,
    /// whichever form it has.
    #[test]
    fn urls_that_need_tls_or_do_not_parse_are_refused_with_the_reason() {
        let refused = |url: &str| match config(url) {
            Err(Error::Url(why)) => why,
            Err(other) => panic!("{url}: not a URL error: {other}"),
            Ok(_) => panic!("{url}: accepted"),
        };
        for (url, mode) in [
            ("postgres://u@localhost/db?sslmode=require", "require"),
            (
                "postgres://u@localhost/db?sslmode=verify-full",
                "verify-full",
            ),
            (
                "postgres://u@localhost/db?application_name=a&sslmode=verify-ca&sslrootcert=ca.pem",
                "verify-ca",
            ),
            (
                "host=localhost dbname=db sslmode = 'verify-full'",
                "verify-full",
            ),
            ("host=localhost sslmode=require", "require"),
        ] {
            let why = refused(url);
            assert!(
                why.starts_with(&format!("sslmode={mode} needs TLS")),
                "{url}: {why}"
            );
        }
        let why = refused("postgres://u@localhost/db?sslmode=allow-maybe");
        assert!(why.contains("sslmode"), "{why}");
        let why = refused("postgres://u@localhost/db?frobnicate=1");
        assert!(why.contains("frobnicate"), "{why}");
        for url in [
            "postgres://u@localhost/db",
            "postgres://u@localhost/db?sslmode=prefer",
            "host=/run/postgresql dbname=db sslmode=disable",
        ] {
            assert!(config(url).is_ok(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let config: Config = format!("postgres://u@127.0.0.1:{port}/db")
            .parse()
            .expect("a valid URL");
        let error = connect(&config, &Tap::default()).await.err();
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
}
