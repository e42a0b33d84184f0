//! The router's connections to its daemons: TCP, plain or TLS, to an `http://` or
//! `https://` daemon, and a Unix socket to a `unix:PATH` one (a daemon on the router's
//! host, served with `--unix-socket`).
//!
//! The pooled client keys its connections by a URI's scheme and host, and a host cannot
//! hold a path: a `unix:PATH` daemon's requests go to `unix://HEX`, the path in hex, which
//! [`Connector`] reads back.

use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::Uri;
use hyper::rt;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

use super::CONNECT_TIMEOUT;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a daemon's requests go: its URL, or for `unix:PATH` a `unix://` URI whose host is
/// the path in hex.
pub(super) fn origin(base: &str) -> String {
    match base.strip_prefix("unix:") {
        Some(path) => format!("unix://{}", hex::encode(path)),
        None => base.to_owned(),
    }
}

/// The socket's path in an [`origin`] of a `unix:` daemon.
fn socket_path(uri: &Uri) -> Option<PathBuf> {
    let path = hex::decode(uri.host()?).ok()?;
    Some(std::ffi::OsString::from_vec(path).into())
}

/// Connects to a daemon: over TCP (plain or TLS, by the inner connector) or its Unix
/// socket.
#[derive(Clone)]
pub(super) struct Connector(pub(super) HttpsConnector<HttpConnector>);

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if uri.scheme_str() != Some("unix") {
            let connecting = self.0.call(uri);
            return Box::pin(async move { Ok(Stream::Net(connecting.await?)) });
        }
        Box::pin(async move {
            let path = socket_path(&uri).ok_or("not a Unix socket's address")?;
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&path))
                .await
                .map_err(|_| {
                    format!(
                        "{} did not connect within {CONNECT_TIMEOUT:?}",
                        path.display()
                    )
                })?
                .map_err(|error| format!("connect to {}: {error}", path.display()))?;
            Ok(Stream::Unix(TokioIo::new(stream)))
        })
    }
}

/// A connection to a daemon. Its TLS state makes it large, as `MaybeHttpsStream` is: a
/// connection is made once and kept in the pool, so it stays unboxed.
#[allow(clippy::large_enum_variant)]
pub(super) enum Stream {
    Net(MaybeHttpsStream<TokioIo<TcpStream>>),
    Unix(TokioIo<UnixStream>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Self::Net(stream) => stream.connected(),
            Self::Unix(stream) => stream.connected(),
        }
    }
}

impl rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Net(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Net(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Net(stream) => Pin::new(stream).poll_flush(cx),
            Self::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Net(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{origin, socket_path};

    /// A `unix:` daemon's origin is a URI the client takes, whose host gives its path back,
    /// whatever bytes the path holds; an `http(s)://` daemon's is its URL.
    #[test]
    fn a_socket_path_goes_through_the_origin_unchanged() {
        for path in [
            "/run/permd/shard0.sock",
            "relative.sock",
            "/tmp/a b|c%20:7/ü.sock",
        ] {
            let uri: axum::http::Uri =
                format!("{}/v1/check?subject=u1", origin(&format!("unix:{path}")))
                    .parse()
                    .expect("a URI");
            assert_eq!(uri.scheme_str(), Some("unix"));
            assert_eq!(socket_path(&uri), Some(path.into()), "{path}");
        }
        assert_eq!(origin("https://a:1"), "https://a:1");
    }
}
