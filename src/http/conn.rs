//! One client connection: plain single checks and batches answered by a keep-alive loop of
//! our own, everything else by hyper.
//!
//! A single check is almost all of permd's traffic, and on two shared cores hyper's
//! per-request work (a `HeaderMap`, a `Request`, the service call, a `Response` and its
//! encoding) costs more than the check itself. So a connection starts here: each request
//! head is parsed in place (httparse, the parser hyper uses), and a plain
//! `GET /v1/check?…` is answered by [`App::check_plain`], the same function hyper's fast path
//! calls, with the bytes hyper would write; so is a whole `POST /v1/check` sent as
//! `Content-Type: application/json` (a batch), by [`App::check_batch_plain`], which shares
//! the router's handler's code. Any other request (another route or method, another body, a
//! query or batch the loop declines, an error) is served by hyper, with the bytes
//! already read replayed in front of the socket: hyper and the router decide everything
//! about it, errors included.
//!
//! Hyper serves that one request and gives the connection back, so a client that mixes
//! batches and single checks on its connections keeps the fast loop for the checks. For
//! that the loop first gathers the whole request (`Content-Length` bodies up to 64 KiB), so
//! that hyper never leaves part of a body unread in the socket; hyper is asked to stop as
//! soon as it starts writing its answer (the head, already encoded, still says keep-alive);
//! and the connection returns with whatever hyper read past the request. A connection stays
//! with hyper for good when hyper must decide its end: HTTP/1.0, `Connection` other than
//! `keep-alive`, `Transfer-Encoding`, `Expect`, `Upgrade`, a larger body, half a head at
//! the client's end, or an answer that says `connection: close`. A head hyper would refuse
//! with an empty answer (one no parser reads, a target that is no URI, a wrong
//! `Content-Length` or `Transfer-Encoding`, too long a target or head, too many headers) the
//! loop refuses itself, with hyper's status and a JSON error that says what is wrong.
//!
//! The router (`permd route`) is served by the same loop ([`Served`]): a `GET` without a
//! body (a plain check, a status, a listing, limits, `/metrics`…) or a whole batch is
//! forwarded by the loop itself ([`Served::get_later`], [`Served::check_batch_later`]: the
//! router's own handler) and its answer written as hyper would write it; requests
//! pipelined together are forwarded at once (up to [`MAX_FORWARDED`]), so a pipeline over
//! several shards waits for the slowest of them rather than for their sum, and their
//! answers are written in order; every other request goes to hyper, one at a time, once
//! the answers before it are written; and its clients get the same refusals, with the
//! same JSON errors, as a daemon's.
//!
//! What hyper would do and this loop does too: pipelined requests are answered in order
//! (one write for all that arrived together), a request head (and a body gathered whole)
//! must arrive within `header_timeout` of when the server started waiting for it (an idle
//! keep-alive connection included), and a graceful shutdown closes an idle connection at
//! once and lets a request being received finish.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{header, Request};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, StreamExt as _};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::fast::PlainAnswer;
use super::server::Stop;
use super::Api;

/// How the loop answers a whole plain check or batch: at once (a daemon's), later (the
/// router's, forwarded), or by handing it to hyper.
enum Taken {
    Check(PlainAnswer),
    Batch(Vec<u8>),
    Later(Answering),
    Hyper,
}

impl Taken {
    /// The answer to come, or hyper's when there is none.
    fn later(later: Option<Answering>) -> Self {
        later.map_or(Self::Hyper, Self::Later)
    }
}

/// The most bytes a request head may take without its end: hyper's limit (its default
/// `max_buf_size`), past which it answers 431.
const MAX_HEAD: usize = 8192 + 4096 * 100;

/// The longest target hyper reads; a longer one it answers 414 URI Too Long.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// The longest header name hyper reads; a longer one it answers 431.
const MAX_HEADER_NAME_LEN: usize = u16::MAX as usize;

/// Most headers a plain request is parsed with room for; a head with more is parsed again
/// with room for hyper's limit.
const MAX_PLAIN_HEADERS: usize = 32;

/// Most headers hyper reads; a head with more it answers 431.
const MAX_HEADERS: usize = 100;

/// The most of an answer's head hyper wrote that is kept, to read whether it closes the
/// connection.
const MAX_ANSWER_HEAD: usize = 8 * 1024;

/// The largest request (head and body) the loop gathers whole before it lets hyper serve
/// it and takes the connection back; a larger one (a batch of more than ~1,000 checks)
/// leaves the connection with hyper for good.
const MAX_WHOLE_REQUEST: usize = 64 * 1024;

/// A connection's byte stream: a TCP socket, or TLS over one.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for S {}

/// What a connection serves: the answers the loop may write itself, and the service
/// hyper calls for every other request. permd's API ([`Api`]), and the router (`permd
/// route`), whose `GET`s and batches the loop forwards (their answers come later),
/// and which takes from the loop the refusal of the heads hyper would refuse with an
/// empty answer, with a JSON error as a daemon's.
pub(crate) trait Served: Clone + Send + Sync + Unpin + 'static {
    /// A plain single check's answer, or `None` to let [`Served::call`] answer it.
    fn check_plain(&self, _query: &str, _auth: Option<&[u8]>) -> Option<PlainAnswer> {
        None
    }

    /// The answer to come to a `GET` without a body (the router's, which asks a daemon):
    /// a plain single check [`Served::check_plain`] has no answer for, or any other, or
    /// `None` to let [`Served::call`] answer it. `target` is the request's path and query.
    /// The loop awaits it with the other requests pipelined with it, and writes its answer
    /// as hyper would, in the requests' order.
    fn get_later(&self, _target: &str, _auth: Option<&[u8]>) -> Option<Answering> {
        None
    }

    /// A whole batch's JSON answer (`POST /v1/check`), or `None` to let [`Served::call`]
    /// answer it.
    fn check_batch_plain(&self, _body: &[u8], _auth: Option<&[u8]>) -> Option<Vec<u8>> {
        None
    }

    /// A whole batch's answer to come (the router's), when [`Served::check_batch_plain`]
    /// has none, or `None` to let [`Served::call`] answer it; as [`Served::get_later`].
    fn check_batch_later(&self, _body: &[u8], _auth: Option<&[u8]>) -> Option<Answering> {
        None
    }

    /// Counts a head the loop refused.
    fn refused(&self);

    /// Answers a request hyper read.
    fn call(&self, request: Request<Incoming>) -> Answering;
}

/// A [`Served::call`]'s answer to come. Boxed, so the connection can be polled without
/// being shut down (hyper wants an `Unpin` future for that); this path is not the hot one.
pub(crate) type Answering = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl Served for Api {
    #[inline]
    fn check_plain(&self, query: &str, auth: Option<&[u8]>) -> Option<PlainAnswer> {
        self.app().check_plain(query, auth)
    }

    #[inline]
    fn check_batch_plain(&self, body: &[u8], auth: Option<&[u8]>) -> Option<Vec<u8>> {
        self.app().check_batch_plain(body, auth)
    }

    fn refused(&self) {
        self.app().metrics.client_error();
    }

    fn call(&self, request: Request<Incoming>) -> Answering {
        self.app().metrics.hyper_request();
        Box::pin(tower_service::Service::call(&mut self.clone(), request))
    }
}

/// Serves one connection until the client closes it, it times out, or the server stops.
pub(super) async fn serve_connection<S: Io, F: Served>(
    stream: S,
    served: F,
    header_timeout: Duration,
    stop: &Stop,
) {
    let mut plain = PlainLoop {
        stream,
        read: BytesMut::with_capacity(4096),
        write: Vec::with_capacity(1024),
    };
    loop {
        let once = match plain.run(&served, header_timeout, stop).await {
            Ok(Next::Close) => return,
            Ok(Next::Hyper { once }) => once,
            Err(error) => {
                tracing::debug!(%error, "connection ended with an error");
                return;
            }
        };
        match serve_by_hyper(plain, once, &served, header_timeout, stop).await {
            Some(back) => plain = back,
            None => return,
        }
    }
}

/// Lets hyper serve the connection, the bytes the loop read first. With `once` (the length
/// of the whole request at the start of those bytes, in which nothing asks hyper to close
/// or to leave HTTP), only that request: hyper may read no further, is asked to stop as
/// soon as it starts writing the answer (whose head, encoded by then, still says
/// keep-alive), and the connection is returned with the bytes after the request. Otherwise
/// hyper serves it to the end, as it would on its own. `None` when the connection is over.
async fn serve_by_hyper<S: Io, F: Served>(
    plain: PlainLoop<S>,
    once: Option<usize>,
    served: &F,
    header_timeout: Duration,
    stop: &Stop,
) -> Option<PlainLoop<S>> {
    let written = Arc::new(AtomicBool::new(false));
    // The answers' buffer is empty here: kept for the loop's next requests.
    let PlainLoop {
        stream,
        read,
        write,
    } = plain;
    let io = Replay {
        prefix: read.freeze(),
        readable: once,
        stream,
        written: Arc::clone(&written),
        head: Vec::new(),
        head_done: false,
    };
    let service = {
        let served = served.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| served.call(request))
    };
    // Each answer is written as one flat buffer (head and body copied together, a few
    // dozen bytes) rather than queued as separate buffers for a vectored write: 19 %
    // more single checks per second in the `compare` suite (benches/README.md).
    let mut connection = http1::Builder::new()
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut cancelled = pin!(stop.wait());
    let mut stopping = false;
    let result = poll_fn(|cx| loop {
        let answering = once.is_some() && written.load(Ordering::Relaxed);
        if !stopping && (answering || cancelled.as_mut().poll(cx).is_ready()) {
            stopping = true;
            Pin::new(&mut connection).graceful_shutdown();
        }
        match connection.poll_without_shutdown(cx) {
            // The answer was started during this poll: ask hyper to stop, and poll again
            // (nothing else would wake this task).
            Poll::Pending if !stopping && once.is_some() && written.load(Ordering::Relaxed) => {}
            done => return done,
        }
    })
    .await;
    let parts = connection.into_parts();
    let mut io = parts.io.into_inner();
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
        return None;
    }
    if once.is_none() || !io.head_done || head_says_close(&io.head) {
        // Hyper decided the connection is over (or it never was to come back): close it as
        // hyper would have.
        let _ = io.stream.shutdown().await;
        return None;
    }
    // What hyper read and did not use (nothing, when it served one request), then what it
    // did not read: in the loop's own buffer when nothing else holds it, so that a request
    // hyper answers costs the loop no allocation of its own.
    let read = match io.prefix.try_into_mut() {
        Ok(rest) if parts.read_buf.is_empty() => rest,
        rest => {
            let rest = rest.map_or_else(|rest| rest, BytesMut::freeze);
            let mut read = BytesMut::with_capacity(4096.max(parts.read_buf.len() + rest.len()));
            read.extend_from_slice(&parts.read_buf);
            read.extend_from_slice(&rest);
            read
        }
    };
    Some(PlainLoop {
        stream: io.stream,
        read,
        write,
    })
}

/// Whether a response head (hyper's) says the connection closes after it.
fn head_says_close(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => response.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|b| *b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        }),
        _ => true,
    }
}

/// Where a connection goes when the loop is done with it.
enum Next {
    Close,
    /// To hyper; `once` is the length of the request at the start of the read buffer when
    /// hyper is to serve only that one.
    Hyper {
        once: Option<usize>,
    },
}

/// The loop's state: the socket and its two buffers.
struct PlainLoop<S> {
    stream: S,
    /// Bytes received and not yet answered (at most part of one request once the
    /// complete ones are answered).
    read: BytesMut,
    /// Answers not yet written.
    write: Vec<u8>,
}

impl<S: Io> PlainLoop<S> {
    async fn run<F: Served>(
        &mut self,
        served: &F,
        header_timeout: Duration,
        stop: &Stop,
    ) -> io::Result<Next> {
        // One timer and one shutdown waiter for the whole connection: the timer is set to
        // the earliest time the head being waited for could be late, and only re-armed when
        // it fires early, so a request costs a clock read rather than a timer insertion.
        let mut waiting_since = Instant::now();
        let timer = tokio::time::sleep(header_timeout);
        let mut timer = pin!(timer);
        let mut cancelled = pin!(stop.wait());
        // How much of the read buffer is known to hold no head's end: the head there is
        // read again only once bytes that may end it arrive.
        let mut partial = 0;
        // The answers to the requests forwarded (the router's), awaited together.
        let mut forwarded = Forwarded::default();
        loop {
            let mut answered = false;
            let mut malformed = false;
            let step = loop {
                // A whole plain check or batch: its length, and how it is answered.
                let (len, taken) = match plain_head(&self.read, partial) {
                    Head::Get(request) => (
                        request.len,
                        match request
                            .query
                            .and_then(|query| served.check_plain(query, request.auth))
                        {
                            Some(answer) => Taken::Check(answer),
                            None => Taken::later(served.get_later(request.target, request.auth)),
                        },
                    ),
                    Head::Batch(request) => (
                        request.len,
                        match served.check_batch_plain(request.body, request.auth) {
                            Some(answer) => Taken::Batch(answer),
                            None => {
                                Taken::later(served.check_batch_later(request.body, request.auth))
                            }
                        },
                    ),
                    Head::Partial => {
                        partial = self.read.len();
                        break Ok(None);
                    }
                    Head::Body { len } => break Ok(Some(len)),
                    Head::Other { once } => break Err(once),
                    Head::Malformed(why) => {
                        served.refused();
                        forwarded.answer(&mut self.write, |out| write_malformed(out, why));
                        malformed = true;
                        break Ok(None);
                    }
                };
                match taken {
                    Taken::Check(answer) => {
                        forwarded.answer(&mut self.write, |out| write_answer(out, answer));
                    }
                    Taken::Batch(answer) => {
                        forwarded.answer(&mut self.write, |out| write_json(out, &answer));
                    }
                    Taken::Later(later) => {
                        self.read.advance(len);
                        self.answer_later(&mut forwarded, later).await?;
                        (partial, answered) = (0, true);
                        continue;
                    }
                    // Hyper (the router) decides, and the request is whole.
                    Taken::Hyper => break Err(Some(len)),
                }
                self.read.advance(len);
                partial = 0;
                answered = true;
            };
            if forwarded.len() > 0 {
                // Only the router's connections forward: a daemon's never come here.
                self.settle(&mut forwarded).await?;
            }
            if !self.write.is_empty() {
                self.stream.write_all(&self.write).await?;
                self.write.clear();
            }
            if malformed {
                // As hyper does after an unreadable head: nothing after it can be framed.
                let _ = self.stream.shutdown().await;
                return Ok(Next::Close);
            }
            let wanted = match step {
                Err(once) => return Ok(Next::Hyper { once }),
                Ok(None) => 1024,
                Ok(Some(len)) => len - self.read.len(),
            };
            if self.read.is_empty() && stop.is_stopped() {
                // Even a client whose next request is already here is done.
                return Ok(Next::Close);
            }
            if answered {
                waiting_since = Instant::now();
            }
            if self.read.capacity() - self.read.len() < wanted {
                self.read.reserve(wanted.max(4096));
            }
            tokio::select! {
                biased;
                read = self.stream.read_buf(&mut self.read) => {
                    if read? == 0 {
                        // The client is done. Half a head goes to hyper, which decides what
                        // an incomplete request is owed.
                        return Ok(if self.read.is_empty() {
                            Next::Close
                        } else {
                            Next::Hyper { once: None }
                        });
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

    /// Answers a request with what `later` gives, once the answers before it are written:
    /// queued behind the other forwarded ones, which are awaited first when
    /// [`MAX_FORWARDED`] are.
    async fn answer_later(
        &mut self,
        forwarded: &mut Forwarded,
        later: Answering,
    ) -> io::Result<()> {
        if forwarded.len() >= MAX_FORWARDED {
            self.settle(forwarded).await?;
        }
        forwarded.push(later);
        Ok(())
    }

    /// Appends the forwarded requests' answers, and those queued behind them, to the
    /// answers to write, in order: what is ready is written while the rest is awaited.
    async fn settle(&mut self, forwarded: &mut Forwarded) -> io::Result<()> {
        let Some(queue) = &mut forwarded.0 else {
            return Ok(());
        };
        loop {
            let next = match queue.next().now_or_never() {
                Some(next) => next,
                None => {
                    if !self.write.is_empty() {
                        self.stream.write_all(&self.write).await?;
                        self.write.clear();
                    }
                    queue.next().await
                }
            };
            match next {
                Some(answer) => self.write.extend_from_slice(&answer?),
                None => return Ok(()),
            }
        }
    }
}

/// The most requests of one connection forwarded at once (the router's, pipelined): a
/// client that pipelines more has the next ones sent as the first are answered.
const MAX_FORWARDED: usize = 32;

/// An answer to write, to come.
type Encoded = Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + Send>>;

/// The answers to a connection's forwarded requests (the router's [`Served::get_later`]
/// and [`Served::check_batch_later`]), and to the requests after them, in the requests'
/// order: pipelined requests are forwarded at once, each shard's in parallel, not one
/// after the other's answer. Nothing (no allocation) on a daemon's connections.
#[derive(Default)]
struct Forwarded(Option<FuturesOrdered<Encoded>>);

impl Forwarded {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    /// Queues the answer to come from `later`, encoded as hyper would write it.
    fn push(&mut self, later: Answering) {
        let encoded = async move {
            let mut out = Vec::new();
            write_response(&mut out, later.await).await?;
            Ok(out)
        };
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(Box::pin(encoded));
    }

    /// Appends an answer the loop has now with `encode`: to `out` when no forwarded answer
    /// comes before it, else queued behind those.
    #[inline]
    fn answer(&mut self, out: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
        match &mut self.0 {
            Some(queue) if !queue.is_empty() => {
                let mut bytes = Vec::new();
                encode(&mut bytes);
                queue.push_back(Box::pin(std::future::ready(Ok(bytes))));
            }
            _ => encode(out),
        }
    }
}

/// What the start of the read buffer holds.
enum Head<'a> {
    /// A complete `GET` head, without a body, that keeps the connection: a plain
    /// `GET /v1/check?…` or another.
    Get(GetRequest<'a>),
    /// A complete `POST /v1/check` (a batch) sent as `Content-Type: application/json`,
    /// body and all.
    Batch(PlainBatch<'a>),
    /// The start of a head.
    Partial,
    /// A complete head of a request for hyper whose body (`Content-Length`) has not all
    /// arrived: the request is `len` bytes.
    Body { len: usize },
    /// A head hyper would refuse with an empty 400, 414 or 431: answered with the same
    /// status and a JSON error saying what is wrong, and the connection closed.
    Malformed(Malformed),
    /// Anything else: hyper's. `once` (the request's length) when hyper is to serve only
    /// this request (it is whole in the buffer, HTTP/1.1, and nothing in it makes hyper
    /// close the connection, leave HTTP, answer in two parts, or find the end of a body
    /// itself).
    Other { once: Option<usize> },
}

/// A `GET` without a body: its target (path and query), its query when it is a plain single
/// check, its credentials, and the length of its head.
struct GetRequest<'a> {
    target: &'a str,
    query: Option<&'a str>,
    auth: Option<&'a [u8]>,
    len: usize,
}

/// A whole batch request: its body, its credentials, and its length, head and body.
struct PlainBatch<'a> {
    body: &'a [u8],
    auth: Option<&'a [u8]>,
    len: usize,
}

/// Classifies the request at the start of `buf`, whose first `partial` bytes were found to
/// hold the start of a head only.
fn plain_head(buf: &[u8], partial: usize) -> Head<'_> {
    if buf.is_empty() {
        return Head::Partial;
    }
    // A head that trickles in is not parsed again at each read (which would cost the square
    // of its length): only once what arrived may end it, as hyper does.
    let head = if partial > 0 && !may_end_head(buf, partial) {
        Head::Partial
    } else {
        parse::<MAX_PLAIN_HEADERS>(buf)
            .or_else(|| parse::<MAX_HEADERS>(buf))
            .unwrap_or(Head::Malformed(Malformed::TooManyHeaders))
    };
    match head {
        Head::Partial if buf.len() >= MAX_HEAD => Head::Malformed(Malformed::HeadTooLong),
        head => head,
    }
}

/// Whether the bytes of `buf` past its first `seen` (and the three before them) hold an
/// empty line, which ends a head (hyper's `is_complete_fast`: CRLF or a bare LF).
fn may_end_head(buf: &[u8], seen: usize) -> bool {
    let bytes = &buf[seen.saturating_sub(3)..];
    bytes.iter().enumerate().any(|(i, &b)| {
        let rest = &bytes[i + 1..];
        (b == b'\r' && rest.starts_with(b"\n\r\n"))
            || (b == b'\n' && (rest.starts_with(b"\n") || rest.starts_with(b"\r\n")))
    })
}

/// [`plain_head`] with room for `N` headers; `None` when the head has more.
fn parse<const N: usize>(buf: &[u8]) -> Option<Head<'_>> {
    let mut headers = [httparse::EMPTY_HEADER; N];
    let mut request = httparse::Request::new(&mut headers);
    Some(match request.parse(buf) {
        // A head that ends past `MAX_HEAD` bytes is refused as one that has not ended by
        // then, however its bytes arrived: hyper's buffer can pass its limit by what one
        // read brings, so hyper alone took some of those heads (all in one read) and not
        // others.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            Head::Malformed(Malformed::HeadTooLong)
        }
        Ok(httparse::Status::Complete(len)) => classify(buf, &request, len),
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return None,
        Err(error) => Head::Malformed(Malformed::Head(error)),
    })
}

/// [`plain_head`] for a head httparse read whole: `len` bytes of `buf`. A head hyper
/// would refuse is `Malformed`, with hyper's reason, checked in hyper's order.
fn classify<'a>(buf: &'a [u8], request: &httparse::Request<'_, 'a>, len: usize) -> Head<'a> {
    let target = request.path.unwrap_or_default();
    if target.len() > MAX_URI_LEN {
        return Head::Malformed(Malformed::UriTooLong);
    }
    if len > MAX_HEADER_NAME_LEN
        && request
            .headers
            .iter()
            .any(|header| header.name.len() > MAX_HEADER_NAME_LEN)
    {
        return Head::Malformed(Malformed::HeaderNameTooLong);
    }
    let mut keeps_alive = request.version == Some(1);
    let mut auth = None;
    let mut json = None;
    let mut framing = Framing::default();
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("authorization") {
            auth = auth.or(Some(header.value));
        } else if name.eq_ignore_ascii_case("connection") {
            keeps_alive &= header.value.eq_ignore_ascii_case(b"keep-alive");
        } else if name.eq_ignore_ascii_case("content-type") {
            // Only one, and exactly JSON: any other the router judges.
            json = Some(json.is_none() && header.value.eq_ignore_ascii_case(b"application/json"));
        } else if name.eq_ignore_ascii_case("content-length") {
            framing.content_length(header.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            framing.transfer_encoding(header.value, request.version == Some(1));
            keeps_alive = false;
        } else if name.eq_ignore_ascii_case("expect") || name.eq_ignore_ascii_case("upgrade") {
            keeps_alive = false;
        }
    }
    let query = target
        .strip_prefix("/v1/check?")
        .filter(|query| query.bytes().all(plain_query_byte));
    if let (true, Some("GET"), Some(query), 0) =
        (keeps_alive, request.method, query, framing.lengths)
    {
        return Head::Get(GetRequest {
            target,
            query: Some(query),
            auth,
            len,
        });
    }
    // Hyper reads the target with `http::Uri`, which takes fewer bytes than httparse (`"`,
    // `<`, `>` in a query, a path not starting with `/`); a plain query only holds bytes
    // both read alike.
    if axum::http::Uri::try_from(target).is_err() {
        return Head::Malformed(Malformed::Target);
    }
    if let Some(malformed) = framing.malformed() {
        return Head::Malformed(malformed);
    }
    if !keeps_alive || framing.lengths > 1 {
        return Head::Other { once: None };
    }
    let Some(body) = framing.length else {
        return if request.method == Some("GET") {
            Head::Get(GetRequest {
                target,
                query: None,
                auth,
                len,
            })
        } else {
            Head::Other { once: Some(len) }
        };
    };
    match usize::try_from(body)
        .ok()
        .and_then(|body| body.checked_add(len))
    {
        Some(whole) if whole > MAX_WHOLE_REQUEST => Head::Other { once: None },
        Some(whole) if buf.len() < whole => Head::Body { len: whole },
        Some(whole)
            if request.method == Some("POST") && target == "/v1/check" && json == Some(true) =>
        {
            Head::Batch(PlainBatch {
                body: &buf[len..whole],
                auth,
                len: whole,
            })
        }
        Some(whole) => Head::Other { once: Some(whole) },
        None => Head::Other { once: None },
    }
}

/// How a request says where its body ends, read as hyper reads it (RFC 9112, 6.3): the
/// `Content-Length` headers before any `Transfer-Encoding` count, each a decimal number,
/// all the same; a `Transfer-Encoding` must end in `chunked`, and HTTP/1.0 has none.
#[derive(Default)]
struct Framing {
    /// The body's length, from the first `Content-Length` that counts.
    length: Option<u64>,
    /// How many `Content-Length` headers there are.
    lengths: usize,
    /// The last `Transfer-Encoding`'s last coding is `chunked`, when there is one.
    chunked: Option<bool>,
    /// What hyper refuses, first found first.
    malformed: Option<Malformed>,
}

/// The largest body length hyper takes (its `DecodedLength`'s limit); more it answers 431.
const MAX_BODY_LEN: u64 = u64::MAX - 2;

impl Framing {
    fn content_length(&mut self, value: &[u8]) {
        self.lengths += 1;
        if self.chunked.is_some() || self.malformed.is_some() {
            return;
        }
        self.malformed = match (content_length(value), self.length) {
            (None, _) => Some(Malformed::ContentLength),
            (Some(length), Some(first)) if length != first => Some(Malformed::ContentLength),
            (Some(length), _) if length > MAX_BODY_LEN => Some(Malformed::BodyTooLong),
            (Some(length), _) => {
                self.length = Some(length);
                None
            }
        };
    }

    fn transfer_encoding(&mut self, value: &[u8], http_11: bool) {
        if !http_11 && self.malformed.is_none() {
            self.malformed = Some(Malformed::TransferEncoding);
        }
        // Hyper reads the value as visible ASCII text, or not at all.
        let last = std::str::from_utf8(value)
            .ok()
            .filter(|text| {
                text.bytes()
                    .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            })
            .and_then(|text| text.rsplit(',').next());
        self.chunked =
            Some(last.is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked")));
    }

    fn malformed(&self) -> Option<Malformed> {
        self.malformed.or(match self.chunked {
            Some(false) => Some(Malformed::TransferEncoding),
            _ => None,
        })
    }
}

/// A `Content-Length` value: decimal digits only, no more than a `u64` holds (hyper's
/// rule too).
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |length, digit| {
        length.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// The bytes a plain query may hold: those of RFC 3986's query production (percent
/// escapes included), all of which hyper's URI parser takes as they are. Anything else goes
/// to hyper, which decides whether it is a URI at all.
fn plain_query_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@/?".contains(&byte)
}

/// Appends the response hyper writes for `answer`: the same head, in the same order.
fn write_answer(out: &mut Vec<u8>, answer: PlainAnswer) {
    write_json(out, answer.body().as_bytes());
}

/// Appends the response hyper writes for a 200 with a JSON `body`: the same head, in the
/// same order.
fn write_json(out: &mut Vec<u8>, body: &[u8]) {
    write_json_after(out, b"HTTP/1.1 200 OK\r\n", body);
}

/// Appends a response of `start` (its status line and any headers before the body's),
/// then the JSON `body`'s headers, as hyper orders them, and `body`.
#[inline]
fn write_json_after(out: &mut Vec<u8>, start: &[u8], body: &[u8]) {
    out.extend_from_slice(start);
    out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    let _ = io::Write::write_fmt(out, format_args!("{}", body.len()));
    out.extend_from_slice(b"\r\ndate: ");
    with_http_date(|date| out.extend_from_slice(date));
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
}

/// Appends `answer` as hyper writes a response: the status line, its headers, then its
/// body's length, the date, and the body.
async fn write_response(out: &mut Vec<u8>, answer: Result<Response, Infallible>) -> io::Result<()> {
    let Ok(answer) = answer;
    let (parts, body) = answer.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(io::Error::other)?;
    let status = parts.status;
    let _ = io::Write::write_fmt(
        out,
        format_args!(
            "HTTP/1.1 {} {}\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        ),
    );
    // As hyper: the headers in their order, the body's length in place of a
    // `Content-Length` (or after them), and the date unless the answer has one. The body
    // is whole, so a `Transfer-Encoding` a relayed answer had is left out (no daemon's
    // answer has one: each is sent whole).
    let (mut length, mut date) = (false, false);
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            if !length {
                let _ =
                    io::Write::write_fmt(out, format_args!("content-length: {}\r\n", body.len()));
            }
            length = true;
            continue;
        }
        date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !length {
        let _ = io::Write::write_fmt(out, format_args!("content-length: {}\r\n", body.len()));
    }
    if !date {
        out.extend_from_slice(b"date: ");
        with_http_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Ok(())
}

/// Why a head is refused: each thing hyper refuses in a head with an empty answer.
#[derive(Clone, Copy, Debug)]
enum Malformed {
    /// httparse refuses it (as hyper's parser, the same crate with the same settings,
    /// would).
    Head(httparse::Error),
    /// httparse reads it, but not its target as a URI.
    Target,
    /// A `Content-Length` that is not a decimal number, or two that differ.
    ContentLength,
    /// A `Transfer-Encoding` in HTTP/1.0, or one that does not end in `chunked`.
    TransferEncoding,
    /// A target longer than [`MAX_URI_LEN`]: 414.
    UriTooLong,
    /// More than [`MAX_HEADERS`] headers: 431.
    TooManyHeaders,
    /// A header name longer than [`MAX_HEADER_NAME_LEN`]: 431.
    HeaderNameTooLong,
    /// [`MAX_HEAD`] bytes without the head's end: 431.
    HeadTooLong,
    /// A `Content-Length` over [`MAX_BODY_LEN`]: 431, as hyper answers it.
    BodyTooLong,
}

impl Malformed {
    /// The status line hyper answers it with, and what the error says it is.
    fn status(self) -> (&'static [u8], &'static str) {
        const TOO_LARGE: &str = "request too large";
        match self {
            Self::UriTooLong => (b"HTTP/1.1 414 URI Too Long\r\n", TOO_LARGE),
            Self::TooManyHeaders
            | Self::HeaderNameTooLong
            | Self::HeadTooLong
            | Self::BodyTooLong => (
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
                TOO_LARGE,
            ),
            Self::Head(_) | Self::Target | Self::ContentLength | Self::TransferEncoding => {
                (b"HTTP/1.1 400 Bad Request\r\n", "malformed request")
            }
        }
    }
}

/// Appends the answer to a refused head: hyper's status and head (`connection: close`),
/// with a JSON error that says what is wrong, as every other 4xx of the API has.
fn write_malformed(out: &mut Vec<u8>, malformed: Malformed) {
    let why = match malformed {
        Malformed::Head(httparse::Error::Version) => {
            "the request line is not METHOD, a space, the target, a space and HTTP/1.1 \
             (a space in the URL must be percent-encoded, as %20)"
        }
        Malformed::Head(httparse::Error::Token) => {
            "the request line holds a character HTTP does not allow there (control \
             characters and spaces in the URL must be percent-encoded)"
        }
        Malformed::Head(httparse::Error::HeaderName) => {
            "a header's name holds a character HTTP does not allow"
        }
        Malformed::Head(httparse::Error::HeaderValue) => {
            "a header's value holds a character HTTP does not allow"
        }
        Malformed::Head(httparse::Error::NewLine) => {
            "a line of the request head does not end in CRLF"
        }
        Malformed::Head(httparse::Error::Status | httparse::Error::TooManyHeaders) => {
            "the head cannot be read"
        }
        Malformed::ContentLength => {
            "Content-Length must be a decimal number, and the same in every Content-Length \
             header"
        }
        Malformed::TransferEncoding => {
            "Transfer-Encoding must end in chunked, and HTTP/1.0 has none"
        }
        Malformed::UriTooLong => "the URL is longer than 65,534 bytes",
        Malformed::TooManyHeaders => "the head has more than 100 headers",
        Malformed::HeaderNameTooLong => "a header's name is longer than 65,535 bytes",
        Malformed::HeadTooLong => "the head has no end within its first 417,792 bytes",
        Malformed::BodyTooLong => "Content-Length is larger than any body can be",
        Malformed::Target => {
            "the URL is not a URI: it must start with / and hold no \", < or > in its query \
             and no <, > or ` in its path (percent-encode them, as %22, %3C, %3E and %60)"
        }
    };
    let (status, what) = malformed.status();
    let body = serde_json::json!({ "error": format!("{what}: {why}") }).to_string();
    let start = [status, b"connection: close\r\n"].concat();
    write_json_after(out, &start, body.as_bytes());
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

/// The socket with the bytes the loop read in front of it, for hyper; it also notes when
/// hyper starts writing an answer, and keeps that answer's head.
struct Replay<S> {
    prefix: Bytes,
    /// How much hyper may read, when it is to serve one request only: that request's
    /// length (all of it in `prefix`). Past it, a read waits for ever, so hyper cannot
    /// start on a pipelined request before it is asked to stop.
    readable: Option<usize>,
    stream: S,
    /// Set at hyper's first write: the head of its answer is encoded by then.
    written: Arc<AtomicBool>,
    /// The first answer's head as written (up to its end or `MAX_ANSWER_HEAD` bytes).
    head: Vec<u8>,
    head_done: bool,
}

impl<S> Replay<S> {
    fn keep_head(&mut self, bytes: &[u8]) {
        if self.head_done {
            return;
        }
        let take = bytes.len().min(MAX_ANSWER_HEAD - self.head.len());
        // Where the end could be: from three bytes before what is new.
        let from = self.head.len().saturating_sub(3);
        self.head.extend_from_slice(&bytes[..take]);
        if let Some(end) = self.head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            self.head.truncate(from + end + 4);
            self.head_done = true;
        } else if self.head.len() == MAX_ANSWER_HEAD {
            self.head_done = true;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self {
            prefix,
            readable,
            stream,
            ..
        } = &mut *self;
        match readable {
            // Nothing wakes this read: hyper is done reading, and the loop that polls it
            // asks it to stop once it writes its answer.
            Some(left) if *left == 0 || prefix.is_empty() => return Poll::Pending,
            None if prefix.is_empty() => return Pin::new(stream).poll_read(cx, buf),
            _ => {}
        }
        let n = prefix
            .len()
            .min(buf.remaining())
            .min(readable.unwrap_or(usize::MAX));
        buf.put_slice(&prefix[..n]);
        prefix.advance(n);
        if let Some(left) = readable {
            *left -= n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.store(true, Ordering::Relaxed);
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.keep_head(&buf[..n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{head_says_close, plain_head, GetRequest, Head, Malformed};

    /// A head read a piece at a time is found whole at its last piece wherever it was cut,
    /// whatever its line ends; before, bytes that cannot end it are not parsed again.
    #[test]
    fn a_head_in_pieces_is_parsed_again_only_once_it_may_be_over() {
        for head in [
            &b"GET /v1/check?subject=u1&permission=read HTTP/1.1\r\nhost: permd\r\n\r\n"[..],
            b"GET /v1/check?subject=u1&permission=read HTTP/1.1\nhost: permd\n\n",
            b"GET /v1/check?subject=u1&permission=read HTTP/1.1\r\nhost: permd\n\r\n",
        ] {
            for cut in 1..head.len() {
                assert!(matches!(plain_head(&head[..cut], 0), Head::Partial));
                assert!(
                    matches!(
                        plain_head(head, cut),
                        Head::Get(GetRequest { query: Some(_), .. })
                    ),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(head)
                );
            }
        }
        // A space in a header's name, after the part already seen: a parse would refuse
        // it, but nothing that arrived can end the head, so it is not parsed yet.
        let start = b"GET /v1/status HTTP/1.1\r\nhost: permd\r\n";
        let more = [&start[..], b"x other: 1\r\n"].concat();
        assert!(matches!(
            plain_head(&more, 0),
            Head::Malformed(Malformed::Head(_))
        ));
        assert!(matches!(plain_head(&more, start.len()), Head::Partial));
        let whole = [&more[..], b"\r\n"].concat();
        assert!(matches!(
            plain_head(&whole, more.len()),
            Head::Malformed(Malformed::Head(_))
        ));
    }

    #[test]
    fn a_response_head_says_close_in_any_spelling_and_list() {
        let head = |connection: &str| {
            format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{connection}\r\n\r\n").into_bytes()
        };
        assert!(head_says_close(&head("connection: close")));
        assert!(head_says_close(&head("Connection: Keep-Alive, CLOSE")));
        assert!(!head_says_close(&head("connection: keep-alive")));
        assert!(!head_says_close(&head("x-close: close")));
        // A head not seen whole: hyper decided something the loop cannot read.
        assert!(head_says_close(b"HTTP/1.1 200 OK\r\ncontent-le"));
    }
}
