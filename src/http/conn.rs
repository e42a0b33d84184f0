//! One client connection: plain single checks answered by a keep-alive loop of our own,
//! everything else by hyper.
//!
//! A single check is almost all of permd's traffic, and on two shared cores hyper's
//! per-request work (a `HeaderMap`, a `Request`, the service call, a `Response` and its
//! encoding) costs more than the check itself. So a connection starts here: each request
//! head is parsed in place (httparse, the parser hyper uses), and a plain
//! `GET /v1/check?…` is answered by [`App::check_plain`], the same function hyper's fast path
//! calls, with the bytes hyper would write. At the first request this loop does not
//! handle (any other route or method, a body, `Connection` other than `keep-alive`,
//! HTTP/1.0, a query the fast path declines, a parse error), the connection is handed to
//! hyper for good, with the bytes already read replayed in front of the socket: from then
//! on hyper and the router decide everything, errors included, as before.
//!
//! What hyper would do and this loop does too: pipelined requests are answered in order
//! (one write for all that arrived together), a request head must be complete within
//! `header_timeout` of when the server started waiting for it (an idle keep-alive
//! connection included), and a graceful shutdown closes an idle connection at once and lets
//! a request being received finish.

use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::fast::PlainAnswer;
use super::Api;

/// A request head longer than this without its end goes to hyper, which has the limits
/// and the error answers for it.
const MAX_PLAIN_HEAD: usize = 8 * 1024;

/// Most headers in a plain request; more goes to hyper (whose limit is 100).
const MAX_PLAIN_HEADERS: usize = 32;

/// Serves one connection until the client closes it, it times out, or `shutdown`.
pub(super) async fn serve_connection(
    stream: TcpStream,
    api: Api,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut plain = PlainLoop {
        stream,
        read: BytesMut::with_capacity(4096),
        write: Vec::with_capacity(1024),
    };
    match plain.run(&api, header_timeout, &shutdown).await {
        Ok(Next::Close) => return,
        Ok(Next::Hyper) => {}
        Err(error) => {
            tracing::debug!(%error, "connection ended with an error");
            return;
        }
    }
    let io = Replay {
        prefix: plain.read.freeze(),
        stream: plain.stream,
    };
    // Each answer is written as one flat buffer (head and body copied together, a few
    // dozen bytes) rather than queued as separate buffers for a vectored write: 19 %
    // more single checks per second in the `compare` suite (benches/README.md).
    let connection = http1::Builder::new()
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(api));
    let mut connection = pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Where a connection goes when the loop is done with it.
enum Next {
    Close,
    Hyper,
}

/// The loop's state: the socket and its two buffers.
struct PlainLoop {
    stream: TcpStream,
    /// Bytes received and not yet answered (at most part of one request head once the
    /// complete ones are answered).
    read: BytesMut,
    /// Answers not yet written.
    write: Vec<u8>,
}

impl PlainLoop {
    async fn run(
        &mut self,
        api: &Api,
        header_timeout: Duration,
        shutdown: &CancellationToken,
    ) -> io::Result<Next> {
        // One timer and one shutdown waiter for the whole connection: the timer is set to
        // the earliest time the head being waited for could be late, and only re-armed when
        // it fires early, so a request costs a clock read rather than a timer insertion.
        let mut waiting_since = Instant::now();
        let timer = tokio::time::sleep(header_timeout);
        let mut timer = pin!(timer);
        let mut cancelled = pin!(shutdown.cancelled());
        loop {
            let mut answered = false;
            let handled = loop {
                match plain_head(&self.read) {
                    Head::Plain(request) => {
                        let Some(answer) = api.app().check_plain(request.query, request.auth)
                        else {
                            break false;
                        };
                        write_answer(&mut self.write, answer);
                        self.read.advance(request.len);
                        answered = true;
                    }
                    Head::Partial => break true,
                    Head::Other => break false,
                }
            };
            if !self.write.is_empty() {
                self.stream.write_all(&self.write).await?;
                self.write.clear();
            }
            if !handled || self.read.len() > MAX_PLAIN_HEAD {
                return Ok(Next::Hyper);
            }
            if self.read.is_empty() && shutdown.is_cancelled() {
                // Even a client whose next request is already here is done.
                return Ok(Next::Close);
            }
            if answered {
                waiting_since = Instant::now();
            }
            if self.read.capacity() - self.read.len() < 1024 {
                self.read.reserve(4096);
            }
            tokio::select! {
                biased;
                read = self.stream.read_buf(&mut self.read) => {
                    if read? == 0 {
                        // The client is done. Half a head goes to hyper, which decides what
                        // an incomplete request is owed.
                        return Ok(if self.read.is_empty() { Next::Close } else { Next::Hyper });
                    }
                }
                () = &mut cancelled, if self.read.is_empty() => return Ok(Next::Close),
                () = timer.as_mut() => {
                    let due = waiting_since + header_timeout;
                    if Instant::now() >= due {
                        tracing::debug!("request head not received in time");
                        return Ok(Next::Close);
                    }
                    timer.as_mut().reset(due.into());
                }
            }
        }
    }
}

/// What the start of the read buffer holds.
enum Head<'a> {
    /// A complete plain `GET /v1/check?…` head.
    Plain(PlainRequest<'a>),
    /// The start of a head.
    Partial,
    /// Anything else: hyper's.
    Other,
}

/// A plain single check: its query, its credentials, and the length of its head.
struct PlainRequest<'a> {
    query: &'a str,
    auth: Option<&'a [u8]>,
    len: usize,
}

/// Classifies the request at the start of `buf`.
fn plain_head(buf: &[u8]) -> Head<'_> {
    if buf.is_empty() {
        return Head::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_PLAIN_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    if request.method != Some("GET") || request.version != Some(1) {
        return Head::Other;
    }
    let Some(query) = request
        .path
        .and_then(|path| path.strip_prefix("/v1/check?"))
        .filter(|query| query.bytes().all(plain_query_byte))
    else {
        return Head::Other;
    };
    let mut auth = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("authorization") {
            auth = auth.or(Some(header.value));
        } else if name.eq_ignore_ascii_case("connection") {
            if !header.value.eq_ignore_ascii_case(b"keep-alive") {
                return Head::Other;
            }
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Head::Other;
        }
    }
    Head::Plain(PlainRequest { query, auth, len })
}

/// The bytes a plain query may hold: those of RFC 3986's query production (percent
/// escapes included), all of which hyper's URI parser takes as they are. Anything else goes
/// to hyper, which decides whether it is a URI at all.
fn plain_query_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@/?".contains(&byte)
}

/// Appends the response hyper writes for `answer`: the same head, in the same order.
fn write_answer(out: &mut Vec<u8>, answer: PlainAnswer) {
    let mut body = String::with_capacity(48);
    answer.write_body(&mut body);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    with_http_date(|date| out.extend_from_slice(date));
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// Calls `f` with the current time as an HTTP date, formatted once a second per thread
/// (as hyper caches it).
fn with_http_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            *date = (second, httpdate::fmt_http_date(now));
        }
        f(date.1.as_bytes())
    })
}

/// The socket with the bytes the loop read in front of it, for hyper.
struct Replay {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
