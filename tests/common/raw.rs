//! Requests written to a socket as bytes, and the answers read back as text: for what
//! only the wire shows (heads the server refuses, pipelining, framing).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `request` on a new connection and reads until the server closes it (or
/// resets it: the answers sent before come first), with every `date:` value blanked.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A server that closes early may refuse the rest: what it answered is compared.
    let _ = stream.write_all(request).await;
    let received = read_to_close(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    text.split("\r\n")
        .map(|line| {
            if line.starts_with("date: ") {
                "date: *"
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// `answers` (as [`exchange`] returns them) with each `"revision":"N"` and each
/// `content-length` value blanked, once every answer's `content-length` is found to end
/// it where the next begins: for comparing the answers of two runs, between which the
/// daemon's watermark may have moved with other tests' writes to the same cluster.
pub fn without_revisions(answers: &str) -> String {
    let mut out = String::new();
    let mut rest = answers;
    while !rest.is_empty() {
        let (head, after) = rest.split_once("\r\n\r\n").expect("a whole answer");
        let length: usize = head
            .split("\r\n")
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|length| length.parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {rest}"));
        assert!(after.is_char_boundary(length), "{rest}");
        let (body, next) = after.split_at(length);
        assert!(
            next.is_empty() || next.starts_with("HTTP/1.1 "),
            "an answer that does not end at its content-length: {rest}"
        );
        for line in head.split("\r\n") {
            let blanked = line.starts_with("content-length: ");
            out.push_str(if blanked { "content-length: *" } else { line });
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut body = body;
        while let Some(at) = body.find("\"revision\":\"") {
            let (before, after) = body.split_at(at + "\"revision\":\"".len());
            out.push_str(before);
            out.push('*');
            body = after.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(body);
        rest = next;
    }
    out
}

/// Everything `stream` receives until it is closed; fails after 10 s.
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await;
        match read.expect("the server closes the connection within 10 s") {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// The heads hyper would refuse with an empty answer, each with the status the server
/// answers it with, words its JSON error holds, and whether it ends (a request may
/// follow it). 400: a head no parser reads (a space in
/// the URL, a control character, a space in a header's name, another HTTP version), a
/// target that is no URI (among many headers too), a `Content-Length` that is no number
/// or two that differ, a `Transfer-Encoding` that does not end in `chunked` or comes with
/// HTTP/1.0; 414: a target over 65,534 bytes; 431: more than 100 headers, a header name
/// over 65,535 bytes, or (last) a head with no end within 417,792 bytes.
pub fn refused_heads() -> Vec<(String, &'static str, &'static str, bool)> {
    let headers = |n: usize| -> String { (0..n).map(|i| format!("x-{i}: {i}\r\n")).collect() };
    let bad_request = "400 Bad Request";
    let too_large = "431 Request Header Fields Too Large";
    let malformed = [
        (
            "GET /v1/check?subject=user 1&permission=read HTTP/1.1\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "%20",
        ),
        (
            "GET /v1/check?subject=u\x01&permission=read HTTP/1.1\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "percent-encoded",
        ),
        (
            "GET /v1/check?subject=u1&permission=read HTTP/1.1\r\nx other: 1\r\n\r\n".to_owned(),
            bad_request,
            "header's name",
        ),
        // Heads httparse reads whose target is no URI: hyper's empty 400 before.
        (
            "GET /v1/check?subject=\"u1\"&permission=read HTTP/1.1\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "%22",
        ),
        (
            "GET /v1/<check>?subject=u1 HTTP/1.1\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "%3C",
        ),
        (
            "GET v1/check?subject=u1&permission=read HTTP/1.1\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "start with /",
        ),
        // More headers than a plain request is parsed with room for.
        (
            format!("GET /v1/check?subject=\"u1\"&permission=read HTTP/1.1\r\n{}\r\n", headers(40)),
            bad_request,
            "%22",
        ),
        (
            "GET /v1/check?subject=u1&permission=read HTTP/2.0\r\nhost: permd\r\n\r\n".to_owned(),
            bad_request,
            "HTTP/1.1",
        ),
        // Bodies framed in ways hyper refuses: hyper's empty 400 before.
        (
            "POST /v1/check HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 2a\r\n\r\n{}".to_owned(),
            bad_request,
            "Content-Length must be a decimal number",
        ),
        (
            "POST /v1/check HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}".to_owned(),
            bad_request,
            "the same in every Content-Length",
        ),
        (
            "POST /v1/check HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n".to_owned(),
            bad_request,
            "Transfer-Encoding must end in chunked",
        ),
        (
            "POST /v1/check HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
            bad_request,
            "HTTP/1.0 has none",
        ),
        // Too large: hyper's empty 414 and 431 before.
        (
            format!("GET /v1/check?subject=u1&pad={} HTTP/1.1\r\n\r\n", "x".repeat(65_520)),
            "414 URI Too Long",
            "longer than 65,534 bytes",
        ),
        (
            format!("GET /v1/check?subject=u1&permission=read HTTP/1.1\r\n{}\r\n", headers(101)),
            too_large,
            "more than 100 headers",
        ),
        (
            format!("GET /v1/status HTTP/1.1\r\n{}: 1\r\n\r\n", "x".repeat(65_536)),
            too_large,
            "name is longer than 65,535 bytes",
        ),
    ];
    let mut heads: Vec<_> = malformed
        .into_iter()
        .map(|(head, status, why)| (head, status, why, true))
        .collect();
    // A head that ends past hyper's limit, all of it sent at once (hyper took some of those,
    // by how its reads fell), and one that never ends: nothing after it.
    let pad = "x".repeat(420_000);
    heads.push((
        format!("GET /v1/status HTTP/1.1\r\nx-pad: {pad}\r\n\r\n"),
        too_large,
        "no end within its first 417,792 bytes",
        true,
    ));
    heads.push((
        format!("GET /v1/status HTTP/1.1\r\nx-pad: {pad}"),
        too_large,
        "no end within its first 417,792 bytes",
        false,
    ));
    heads
}

/// Sends each of [`refused_heads`] to `addr` on a connection of its own, after two
/// `check`s and before a third (when it ends): the checks are answered 200, the head with its status,
/// `connection: close` and a JSON error saying why, nothing after it, and `refusals`
/// counts one more each time.
pub async fn assert_heads_refused<F: Future<Output = u64>>(
    addr: SocketAddr,
    check: &str,
    refusals: impl Fn() -> F,
) {
    let bad_request = "400 Bad Request";
    for (head, status, why, ends) in refused_heads() {
        let after = if ends { check } else { "" };
        let request = format!("{check}{check}{head}{after}");
        let before = refusals().await;
        let text = exchange(addr, request.as_bytes()).await;
        let (before_error, answer) = text
            .split_once(&format!("HTTP/1.1 {status}\r\n"))
            .unwrap_or_else(|| panic!("no {status} for {why:?} in {text}"));
        assert_eq!(before_error.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(before_error.starts_with("HTTP/1.1 200 OK"), "{text}");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        assert!(
            head.starts_with("connection: close\r\n")
                && head.contains("content-type: application/json"),
            "{text}"
        );
        // The body is all that follows: nothing is answered after the refusal.
        let error: Value = serde_json::from_str(body).expect("a JSON body");
        let error = error["error"].as_str().expect("an error");
        let what = if status == bad_request {
            "malformed request: "
        } else {
            "request too large: "
        };
        assert!(error.starts_with(what) && error.contains(why), "{error}");
        assert_eq!(refusals().await - before, 1, "{why:?}");
    }
}
