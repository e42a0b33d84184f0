//! A tap on the sync connection's socket that takes a COPY's rows off the wire before
//! tokio-postgres parses them.
//!
//! Why: tokio-postgres hands out every CopyData message, one per row, as its own `Bytes`
//! through its connection task and the query's response channel. At 10M rows that per-row
//! path was about 40 % of permd's CPU during a full load, as much as building the store
//! (benches/README.md, "Full load"). The tap sits between the socket and tokio-postgres and
//! walks the backend's message frames. While it is armed it copies the payload of every
//! CopyData message into blocks for the state builder and passes every other message
//! (CopyOutResponse, CopyDone, errors, notifications) through untouched, so tokio-postgres
//! still runs the protocol (authentication, the transaction, errors) and simply sees a
//! COPY that carries no rows. Disarmed, it only passes bytes through.
//!
//! The tap also holds the server to libpq's `require_auth`: it reads the code of each
//! authentication request as it passes, and ends the stream with an error when the server
//! asks for a method the URL does not allow (or for none, where it must ask for one),
//! before tokio-postgres (or, through the one-off commands' relay, sqlx) answers it.
//!
//! The tap also keeps the process number the server names in its BackendKeyData at the
//! connection's start: Postgres names the server session's own process there, a pooler a
//! number of its own (`connect::alone_in_its_session`).
//!
//! And it keeps the last FATAL (or PANIC) error the server sent, the reason it gave for
//! ending the session: tokio-postgres hands such an error to whichever request is first
//! in its queue, and when that is a request no one waits for (the `Close` it sends when a
//! prepared statement is dropped), the reason is dropped with it and the session's next
//! request finds only "connection closed" (`applier::why_closed`).
//!
//! Invariant: the tap hands the sink every byte of the COPY's data, in order, before it
//! lets the CopyDone that ends it through; so when tokio-postgres reports the COPY done,
//! all of its data has been sent to the sink.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use super::conninfo::{AuthMethod, RequireAuth};

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 128 * 1024;
/// The COPY data goes to the sink in blocks of about this many bytes.
const BLOCK_BYTES: usize = 256 * 1024;
/// A backend message starts with a tag byte and its length (which counts itself).
const HEADER: usize = 5;

const COPY_DATA: u8 = b'd';
const COPY_DONE: u8 = b'c';
const ERROR_RESPONSE: u8 = b'E';
const AUTHENTICATION: u8 = b'R';
const BACKEND_KEY_DATA: u8 = b'K';

/// The handle that arms the tap; a cheap clone sharing one slot with the tapped socket.
#[derive(Clone, Default)]
pub(crate) struct Tap {
    /// A sink waiting for the next COPY. A mutex because the loader's task puts it there
    /// and the connection task takes it out, once per socket read: never per row.
    armed: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    /// The process named in the BackendKeyData of the socket tapped last, once it came. A
    /// mutex because the connection's task writes it and the applier reads it, each once
    /// a connection.
    announced: Arc<Mutex<Option<i32>>>,
    /// The last FATAL or PANIC error the server sent on the socket tapped last, as text
    /// ("FATAL: terminating connection due to …"). A mutex for the same reason: written
    /// once, when the server ends the session, and read once after.
    ended: Arc<Mutex<Option<String>>>,
}

impl Tap {
    /// Sends the data of the next `COPY ... TO STDOUT` on this connection to `sink`, in
    /// blocks, instead of to tokio-postgres. Arm before sending the COPY. The tap drops
    /// `sink` at the COPY's end (CopyDone, after the last block) or failure
    /// (ErrorResponse), or with the connection.
    pub(crate) fn arm(&self, sink: mpsc::Sender<Vec<u8>>) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// Takes back a sink that no COPY has picked up (after the COPY failed to start).
    pub(crate) fn disarm(&self) {
        self.armed.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The process the server named in its BackendKeyData (the key of cancel requests)
    /// at the start of the connection tapped last: the server session's own process
    /// (`pg_backend_pid()`) where permd speaks to Postgres itself, a number of its own
    /// where a pooler answers (PgBouncer's is random). `None` before it came.
    pub(crate) fn announced_process(&self) -> Option<i32> {
        *self.announced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reason the server gave for ending the session on the socket tapped last (a
    /// FATAL or PANIC error, as "SEVERITY: message (SQLSTATE code)"), if it sent one.
    pub(crate) fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wraps the connection's socket; this handle then arms it.
    pub(crate) fn on<S>(&self, inner: S) -> Tapped<S> {
        // A new connection (another host's, after one refused): nothing named yet.
        *self.announced.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Tapped {
            inner,
            tap: self.clone(),
            buf: vec![0; READ_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            frame: Frame::Start,
            sink: None,
            require_auth: None,
            asked: false,
        }
    }
}

impl<S> Tapped<S> {
    /// The socket under the tap.
    pub(crate) fn inner(&self) -> &S {
        &self.inner
    }

    /// Holds the server to `require_auth` (libpq's), if given.
    pub(crate) fn requiring(mut self, require_auth: Option<RequireAuth>) -> Self {
        self.require_auth = require_auth;
        self
    }

    /// Checks an authentication request's `code` against `require_auth`: the first
    /// method the server asks for, or AuthenticationOk (0) if it asked for none.
    fn check(&mut self, require_auth: RequireAuth, code: i32) -> io::Result<()> {
        if code == 0 {
            // AuthenticationOk: the client is in, and no request follows.
            self.require_auth = None;
        }
        let method = match (self.asked, code) {
            (true, _) => return Ok(()),
            (false, 0) => AuthMethod::None,
            (false, _) => match AuthMethod::of_request(code) {
                Some(method) => method,
                None => return Ok(()),
            },
        };
        self.asked = true;
        if require_auth.allows(method) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{require_auth}, and the server asked for {}",
                method.asked()
            ),
        ))
    }
}

/// The error whose fields are `body` (an ErrorResponse's), as "SEVERITY: message
/// (SQLSTATE code)", and " DETAIL: detail" when it has one (a standby's conflict says
/// there what it replayed), if it ends the session (FATAL or PANIC); `None` for one that
/// fails only a statement, and for fields that cannot be read.
fn session_ended(body: &[u8]) -> Option<String> {
    let (mut severity, mut localized, mut code, mut message) = (None, None, None, None);
    let mut detail = None;
    let mut fields = body;
    // Each field: a type byte and a NUL-terminated string; a NUL type ends them.
    while let [kind @ 1..=u8::MAX, rest @ ..] = fields {
        let end = rest.iter().position(|&b| b == 0)?;
        let value = String::from_utf8_lossy(&rest[..end]);
        match kind {
            b'V' => severity = Some(value),
            b'S' => localized = Some(value),
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            b'D' => detail = Some(value),
            _ => {}
        }
        fields = &rest[end + 1..];
    }
    // `V` (never translated) is sent since Postgres 9.6; `S` may be translated.
    let severity = severity.or(localized)?;
    if severity != "FATAL" && severity != "PANIC" {
        return None;
    }
    let message = message.unwrap_or_default();
    let mut reason = match code {
        Some(code) => format!("{severity}: {message} (SQLSTATE {code})"),
        None => format!("{severity}: {message}"),
    };
    if let Some(detail) = detail {
        reason.push_str(" DETAIL: ");
        reason.push_str(&detail);
    }
    Some(reason)
}

/// Where the tap is in the backend's message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// At a message boundary.
    Start,
    /// Passing this many more bytes of a message through to tokio-postgres.
    Pass(usize),
    /// Sending this many more bytes of a CopyData payload to the sink.
    Divert(usize),
}

/// The armed tap's current COPY.
struct Sink {
    sender: PollSender<Vec<u8>>,
    block: Vec<u8>,
}

impl Sink {
    /// Sends the block unless it is empty; Pending while the builder is behind. If the
    /// receiver is gone (the builder failed, and the load with it), the data is dropped.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.block.is_empty() {
            return Poll::Ready(());
        }
        match self.sender.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK_BYTES));
                // Cannot fail after a successful reserve but for a closed receiver, which
                // means the same as below.
                let _ = self.sender.send_item(block);
            }
            Poll::Ready(Err(_)) => self.block.clear(),
        }
        Poll::Ready(())
    }
}

/// A socket with a [`Tap`] on its read side; writes pass straight through.
pub(crate) struct Tapped<S> {
    inner: S,
    tap: Tap,
    /// Bytes read from the socket; `buf[start..end]` is not handled yet.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    frame: Frame,
    sink: Option<Sink>,
    /// The methods the server may authenticate by, until it says the client is in.
    require_auth: Option<RequireAuth>,
    /// Whether the server has asked for a method yet.
    asked: bool,
}

impl<S: AsyncRead + Unpin> Tapped<S> {
    /// Handles buffered bytes until `out` has some, more bytes are needed, or the sink is
    /// full. Ready(true): more bytes are needed.
    fn handle(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> io::Result<Poll<bool>> {
        loop {
            if let Some(sink) = &mut self.sink {
                if sink.block.len() >= BLOCK_BYTES && sink.poll_send(cx).is_pending() {
                    return Ok(Poll::Pending);
                }
            }
            let available = self.end - self.start;
            match self.frame {
                Frame::Start => {
                    if available < HEADER {
                        return Ok(Poll::Ready(true));
                    }
                    let header = &self.buf[self.start..self.start + HEADER];
                    let tag = header[0];
                    let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
                    let body = usize::try_from(length)
                        .ok()
                        .and_then(|length| length.checked_sub(HEADER - 1))
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("backend message {tag:?} claims length {length}"),
                            )
                        })?;
                    // (A request too short to hold its code is tokio-postgres's to refuse.)
                    if let (AUTHENTICATION, Some(require_auth), 4..) =
                        (tag, self.require_auth, body)
                    {
                        if available < HEADER + 4 {
                            return Ok(Poll::Ready(true));
                        }
                        let at = self.start + HEADER;
                        let code = [0, 1, 2, 3].map(|i| self.buf[at + i]);
                        self.check(require_auth, i32::from_be_bytes(code))?;
                    }
                    if let (BACKEND_KEY_DATA, 4..) = (tag, body) {
                        if available < HEADER + 4 {
                            return Ok(Poll::Ready(true));
                        }
                        let at = self.start + HEADER;
                        let process = [0, 1, 2, 3].map(|i| self.buf[at + i]);
                        *self.tap.announced.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(i32::from_be_bytes(process));
                    }
                    // Whole, to read its fields: an error is small, and tokio-postgres
                    // waits for all of it anyway. (One larger than the buffer is passed
                    // unread.)
                    if tag == ERROR_RESPONSE && HEADER + body <= self.buf.len() {
                        if available < HEADER + body {
                            return Ok(Poll::Ready(true));
                        }
                        let at = self.start + HEADER;
                        if let Some(ended) = session_ended(&self.buf[at..at + body]) {
                            *self.tap.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(ended);
                        }
                    }
                    match (tag, &mut self.sink) {
                        (COPY_DATA, Some(_)) => {
                            self.start += HEADER;
                            self.frame = Frame::Divert(body);
                            continue;
                        }
                        (COPY_DONE, Some(sink)) => {
                            if sink.poll_send(cx).is_pending() {
                                return Ok(Poll::Pending);
                            }
                            self.sink = None;
                        }
                        (ERROR_RESPONSE, Some(_)) => self.sink = None,
                        _ => {}
                    }
                    self.frame = Frame::Pass(HEADER + body);
                }
                Frame::Pass(0) | Frame::Divert(0) => self.frame = Frame::Start,
                Frame::Pass(left) => {
                    let n = left.min(available).min(out.remaining());
                    if n == 0 {
                        return Ok(Poll::Ready(available == 0));
                    }
                    out.put_slice(&self.buf[self.start..self.start + n]);
                    self.start += n;
                    self.frame = Frame::Pass(left - n);
                }
                Frame::Divert(left) => {
                    // The sink is there: it goes only at a message boundary. The block has
                    // room: a full one was sent at the top of the loop.
                    let Some(sink) = &mut self.sink else {
                        return Err(io::Error::other("COPY data without a sink"));
                    };
                    let n = left
                        .min(available)
                        .min(BLOCK_BYTES.saturating_sub(sink.block.len()));
                    if n == 0 {
                        return Ok(Poll::Ready(true));
                    }
                    sink.block
                        .extend_from_slice(&self.buf[self.start..self.start + n]);
                    self.start += n;
                    self.frame = Frame::Divert(left - n);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sink.is_none() {
            let armed = this
                .tap
                .armed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(sender) = armed {
                this.sink = Some(Sink {
                    sender: PollSender::new(sender),
                    block: Vec::with_capacity(BLOCK_BYTES),
                });
            }
        }
        let before = out.filled().len();
        loop {
            let wants_more = match this.handle(cx, out)? {
                Poll::Ready(wants_more) => wants_more,
                Poll::Pending if out.filled().len() > before => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            };
            if !wants_more || out.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            // Keep the unhandled tail (at most a partial header) and read behind it.
            this.buf.copy_within(this.start..this.end, 0);
            this.end -= this.start;
            this.start = 0;
            let mut read = ReadBuf::new(&mut this.buf[this.end..]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: tokio-postgres sees it as such.
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.end += read.filled().len(),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A backend stream around one COPY: the rows as CopyData, a notification among them.
    fn copy_stream(rows: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut wire = Vec::new();
        let mut passed = Vec::new();
        let mut data = Vec::new();
        let mut both = |bytes: Vec<u8>, wire: &mut Vec<u8>| {
            wire.extend_from_slice(&bytes);
            passed.extend_from_slice(&bytes);
        };
        both(message(b'H', &[1, 0, 0]), &mut wire);
        for (i, row) in rows.iter().enumerate() {
            wire.extend_from_slice(&message(COPY_DATA, row));
            data.extend_from_slice(row);
            if i == rows.len() / 2 {
                both(message(b'A', b"\0\0\0\x07permd_changes\0\0"), &mut wire);
            }
        }
        both(message(COPY_DONE, b""), &mut wire);
        both(message(b'C', b"COPY 3\0"), &mut wire);
        both(message(b'Z', b"T"), &mut wire);
        (wire, passed, data)
    }

    fn rows() -> Vec<Vec<u8>> {
        (0..300u32)
            .map(|i| {
                let len = (i as usize * 37) % 3000;
                (0..len).map(|j| (i as usize + j) as u8).collect()
            })
            .collect()
    }

    /// What tokio-postgres would read of `wire`, written in `chunk`-byte pieces into a
    /// pipe under `tap` (the tapped socket is gone when it returns).
    async fn read_through(tap: &Tap, wire: &[u8], chunk: usize) -> Vec<u8> {
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let mut tapped = tap.on(client);
        let pieces = wire.to_vec();
        let writer = tokio::spawn(async move {
            for piece in pieces.chunks(chunk) {
                server.write_all(piece).await.expect("write");
            }
        });
        let mut passed = Vec::new();
        tapped.read_to_end(&mut passed).await.expect("read");
        writer.await.expect("writer");
        passed
    }

    /// Writes `wire` in `chunk`-byte pieces into a tapped pipe armed with a sink of
    /// `depth` blocks, and returns what tokio-postgres would read and what the sink got.
    async fn run(wire: Vec<u8>, chunk: usize, depth: usize, arm: bool) -> (Vec<u8>, Vec<u8>) {
        let tap = Tap::default();
        let (sink, mut blocks) = mpsc::channel(depth);
        if arm {
            tap.arm(sink);
        } else {
            drop(sink);
        }
        let sunk = tokio::spawn(async move {
            let mut data = Vec::new();
            while let Some(block) = blocks.recv().await {
                data.extend_from_slice(&block);
            }
            data
        });
        let passed = read_through(&tap, &wire, chunk).await;
        (passed, sunk.await.expect("sink"))
    }

    #[tokio::test]
    async fn an_armed_tap_takes_the_copy_data_and_passes_the_rest() {
        let (wire, passed, data) = copy_stream(&rows());
        for (chunk, depth) in [(wire.len(), 8), (4096, 1), (7, 2), (1, 1)] {
            let (got_passed, got_data) = run(wire.clone(), chunk, depth, true).await;
            assert!(got_passed == passed, "passed through, chunk {chunk}");
            assert!(got_data == data, "diverted, chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn a_disarmed_tap_passes_everything() {
        let (wire, _, _) = copy_stream(&rows());
        let (passed, data) = run(wire.clone(), 1000, 1, false).await;
        assert!(passed == wire);
        assert!(data.is_empty());
    }

    #[tokio::test]
    async fn an_error_ends_the_copy_and_what_follows_passes() {
        let mut wire = message(b'H', &[1, 0, 0]);
        wire.extend(message(COPY_DATA, b"taken"));
        wire.extend(message(ERROR_RESPONSE, b"SERROR\0\0"));
        let after = message(COPY_DATA, b"not armed any more");
        wire.extend_from_slice(&after);
        let (passed, data) = run(wire, 3, 1, true).await;
        // The unsent block goes with the sink: the load fails on the error anyway.
        assert!(data.is_empty());
        assert!(passed.ends_with(&after));
        assert!(!passed.windows(5).any(|w| w == b"taken"));
    }

    /// The server's reason for ending the session is kept, wherever its error is split
    /// across reads, and passed on untouched; an error that fails only a statement is not.
    #[tokio::test]
    async fn the_reason_the_server_ends_the_session_is_kept() {
        let fatal = message(
            ERROR_RESPONSE,
            b"SFATAL\0VFATAL\0C25P03\0Mterminating connection due to \
              idle-in-transaction timeout\0\0",
        );
        let conflict = message(
            ERROR_RESPONSE,
            b"SFATAL\0VFATAL\0C40001\0Mterminating connection due to conflict with \
              recovery\0DUser was holding a relation lock for too long.\0\0",
        );
        let error = message(
            ERROR_RESPONSE,
            b"SERROR\0VERROR\0C42P01\0Mno such table\0\0",
        );
        for (wire, kept) in [
            (
                [message(b'Z', b"T"), fatal].concat(),
                Some(
                    "FATAL: terminating connection due to idle-in-transaction timeout \
                     (SQLSTATE 25P03)",
                ),
            ),
            (
                [message(b'Z', b"T"), conflict].concat(),
                Some(
                    "FATAL: terminating connection due to conflict with recovery (SQLSTATE \
                     40001) DETAIL: User was holding a relation lock for too long.",
                ),
            ),
            ([message(b'Z', b"T"), error].concat(), None),
        ] {
            for chunk in [wire.len(), 7, 1] {
                let tap = Tap::default();
                let passed = read_through(&tap, &wire, chunk).await;
                assert!(passed == wire, "passed through, chunk {chunk}");
                assert_eq!(tap.ended().as_deref(), kept, "chunk {chunk}");
            }
        }
        // Fields that cannot be read are not a reason, and no panic.
        assert_eq!(session_ended(b"VFATAL"), None);
        assert_eq!(
            session_ended(b"VPANIC\0Mgone\0\0").as_deref(),
            Some("PANIC: gone")
        );
    }

    #[tokio::test]
    async fn a_bad_length_is_an_error() {
        let (mut server, client) = tokio::io::duplex(1024);
        let mut tapped = Tap::default().on(client);
        server.write_all(b"Z\0\0\0\x02").await.expect("write");
        let mut out = [0u8; 16];
        let error = tapped.read(&mut out).await.expect_err("a length below 4");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_sink_whose_receiver_is_gone_drops_the_data_and_the_stream_goes_on() {
        let (wire, passed, _) = copy_stream(&rows());
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let tap = Tap::default();
        let (sink, blocks) = mpsc::channel(1);
        drop(blocks);
        tap.arm(sink);
        let mut tapped = tap.on(client);
        let writer = tokio::spawn(async move { server.write_all(&wire).await });
        let mut got = Vec::new();
        tapped.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer").expect("write");
        assert!(got == passed);
    }

    /// What a tap holding the server to `require_auth` (libpq's syntax) reads of `wire`
    /// written in `chunk`-byte pieces: all of it, or the error it ends with and what it
    /// passed before.
    async fn authenticated(wire: &[u8], chunk: usize, require_auth: &str) -> (Vec<u8>, String) {
        let (_, taken) = super::super::conninfo::take(
            &format!("require_auth={require_auth}"),
            &["require_auth"],
        );
        let mut config = tokio_postgres::Config::new();
        let libpq = super::super::conninfo::apply(&mut config, taken, &|_| None).expect("read");
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let mut tapped = Tap::default().on(client).requiring(libpq.require_auth);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(chunk) {
                if server.write_all(piece).await.is_err() {
                    break;
                }
            }
        });
        let mut passed = Vec::new();
        let mut buf = [0; 64];
        let error = loop {
            match tapped.read(&mut buf).await {
                Ok(0) => break String::new(),
                Ok(n) => passed.extend_from_slice(&buf[..n]),
                Err(error) => {
                    assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
                    break error.to_string();
                }
            }
        };
        drop(tapped);
        writer.await.expect("writer");
        (passed, error)
    }

    /// The tap reads each authentication request's code and holds the server to
    /// `require_auth`: the first method asked for, or none before AuthenticationOk. A
    /// request it refuses is not passed on, so the client never answers it.
    #[tokio::test]
    async fn the_server_is_held_to_require_auth() {
        let code = |code: i32, rest: &[u8]| {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(rest);
            message(AUTHENTICATION, &body)
        };
        let after = [
            message(b'S', b"server_version\x0015\0"),
            message(b'Z', b"I"),
        ]
        .concat();
        let scram = [
            code(10, b"SCRAM-SHA-256\0\0"),
            code(11, b"r=nonce"),
            code(12, b"v=signature"),
            code(0, b""),
            after.clone(),
        ]
        .concat();
        let cleartext = [code(3, b""), code(0, b""), after.clone()].concat();
        let trusted = [code(0, b""), after.clone()].concat();
        for chunk in [1, 3, 1000] {
            for (wire, require_auth, refused) in [
                (&scram, "scram-sha-256", None),
                (&scram, "!password,!md5", None),
                (&scram, "!none", None),
                (&cleartext, "password,scram-sha-256", None),
                (&trusted, "none", None),
                (&trusted, "!password", None),
                (&scram, "password", Some("SCRAM authentication")),
                (&scram, "!scram-sha-256", Some("SCRAM authentication")),
                (&cleartext, "!password", Some("a cleartext password")),
                (
                    &cleartext,
                    "none,scram-sha-256",
                    Some("a cleartext password"),
                ),
                (&trusted, "scram-sha-256", Some("no authentication")),
                (&trusted, "!none", Some("no authentication")),
            ] {
                let (passed, error) = authenticated(wire, chunk, require_auth).await;
                match refused {
                    None => {
                        assert!(passed == *wire, "{require_auth}, chunk {chunk}: {error}");
                    }
                    Some(asked) => {
                        assert_eq!(
                            error,
                            format!(
                                "require_auth={require_auth}, and the server asked for {asked}"
                            ),
                            "chunk {chunk}"
                        );
                        assert!(passed.is_empty(), "{require_auth}: passed {passed:?}");
                    }
                }
            }
        }
    }

    /// The process a server's BackendKeyData names is kept, in whatever pieces the start of
    /// the connection arrives, and everything passes; a new socket forgets it.
    #[tokio::test]
    async fn the_process_named_at_the_start_is_kept() {
        let mut key = 4242i32.to_be_bytes().to_vec();
        key.extend_from_slice(&[9, 8, 7, 6]);
        let wire = [
            message(AUTHENTICATION, &0i32.to_be_bytes()),
            message(b'S', b"server_version\x0015\0"),
            message(BACKEND_KEY_DATA, &key),
            message(b'Z', b"I"),
        ]
        .concat();
        for chunk in [wire.len(), 7, 3, 1] {
            let tap = Tap::default();
            assert_eq!(tap.announced_process(), None);
            let passed = read_through(&tap, &wire, chunk).await;
            assert!(passed == wire, "chunk {chunk}");
            assert_eq!(tap.announced_process(), Some(4242), "chunk {chunk}");
            let _next = tap.on(tokio::io::empty());
            assert_eq!(tap.announced_process(), None, "chunk {chunk}");
        }
    }
}
