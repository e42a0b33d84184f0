//! The sync connection's socket, opened here rather than by tokio-postgres's
//! `Config::connect` so that the COPY tap (`tap.rs`) can sit on it. It follows what
//! `Config::connect` does: each host in turn (its `hostaddr` if given), each address of a
//! host name, the connect timeout, `TCP_NODELAY`, keepalives and the TCP user timeout.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::Config;
use tokio_util::either::Either;

/// A TCP or Unix socket to Postgres.
pub(crate) type Socket = Either<TcpStream, UnixStream>;

/// Opens a socket to the first of `config`'s hosts that answers.
pub(crate) async fn connect(config: &Config) -> io::Result<Socket> {
    // permd speaks plain TCP to Postgres; `require` (and the stricter modes, which
    // tokio-postgres does not parse) would need TLS.
    if config.get_ssl_mode() == SslMode::Require {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "sslmode=require: permd does not speak TLS to Postgres (use sslmode=prefer or \
             disable, or a TLS-terminating proxy)",
        ));
    }
    let hosts = config.get_hosts();
    let hostaddrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(hostaddrs.len());
    if count == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the database URL names no host",
        ));
    }
    let mut last = None;
    for i in 0..count {
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let attempt = match (hostaddrs.get(i), hosts.get(i)) {
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
        match attempt {
            Ok(socket) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no host to connect to")))
}

/// Each address of `host` in turn.
async fn tcp(host: &str, port: u16, config: &Config) -> io::Result<Socket> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
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

    #[tokio::test]
    async fn sslmode_require_is_refused_with_the_reason() {
        let config: Config = "postgres://u@localhost/db?sslmode=require"
            .parse()
            .expect("a valid URL");
        let error = connect(&config).await.expect_err("no TLS");
        assert_eq!(error.kind(), io::ErrorKind::Unsupported);
        assert!(error.to_string().contains("sslmode=require"));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let config: Config = format!("postgres://u@127.0.0.1:{port}/db")
            .parse()
            .expect("a valid URL");
        let error = connect(&config).await.expect_err("nothing listens");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
