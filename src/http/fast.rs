//! The service the server runs: a fast path for `GET /v1/check` in front of the router.
//!
//! A single check is almost all of permd's traffic, and its answer costs far less than
//! the routing, the two middleware layers, the query deserializer and the JSON value
//! around it. So the plain case (no `at_least`, or one whose write is applied; valid
//! input, admitted, authorized, answerable) is answered here, byte for byte as the router
//! would answer it; every other request, and every case the fast path does not handle,
//! goes to the router, which remains the one place where errors are decided.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, HttpBody};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request};
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::{BoxError, Router};
use futures_util::future::{ready, Either, Ready};

use super::error::{is_identifier, strict_form_utf8};
use super::{router, App};

/// The whole API as one service: the fast path, then the router. A cheap-clone handle
/// (one `Arc`): hyper's adapter clones it for every request.
#[derive(Clone)]
pub struct Api(Arc<Inner>);

struct Inner {
    app: App,
    router: Router,
}

impl Api {
    /// The API over `app`.
    pub fn new(app: App) -> Self {
        let router = router(app.clone());
        Self(Arc::new(Inner { app, router }))
    }

    /// The handler state.
    pub(super) fn app(&self) -> &App {
        &self.0.app
    }
}

/// What the fast path answers with, or the router when it declines.
type ApiFuture = Either<Ready<Result<Response, Infallible>>, RouteFuture<Infallible>>;

impl<B> tower_service::Service<Request<B>> for Api
where
    B: HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ApiFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ApiFuture {
        if request.method() == Method::GET && request.uri().path() == "/v1/check" {
            if let Some(response) = self
                .0
                .app
                .check_fast(request.uri().query(), request.headers())
            {
                return Either::Left(ready(Ok(response)));
            }
        }
        // The router is `Arc`s inside: the clone is what `oneshot` would do too.
        Either::Right(self.0.router.clone().call(request))
    }
}

/// The fields of a plain single check.
#[derive(Default)]
struct CheckFields<'a> {
    subject: Option<Cow<'a, str>>,
    permission: Option<Cow<'a, str>>,
    object: Option<Cow<'a, str>>,
    at_least: Option<Cow<'a, str>>,
}

impl<'a> CheckFields<'a> {
    /// The fields of `query`, or `None` when the router must decide: a field twice, a
    /// field of another name, or a name that the handler would refuse (`at_least` is
    /// read by [`App::check_plain`]).
    fn parse(query: &'a str) -> Option<Self> {
        // Almost every query has nothing to decode: its pairs are slices of it, split as
        // the form decoder splits them (on `&`, empty pairs skipped, at the first `=`).
        // Otherwise the decoder, after the strict UTF-8 check the router makes.
        let mut fields = Self::default();
        if !query.bytes().any(|b| b == b'%' || b == b'+') {
            for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                fields.take(key, Cow::Borrowed(value))?;
            }
        } else {
            strict_form_utf8(query).ok()?;
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                fields.take(&key, value)?;
            }
        }
        let valid = |value: &Option<Cow<'_, str>>, may_be_empty: bool| {
            value
                .as_ref()
                .is_some_and(|v| is_identifier(v, may_be_empty))
        };
        let object_valid = fields
            .object
            .as_ref()
            .is_none_or(|o| is_identifier(o, true));
        (valid(&fields.subject, false) && valid(&fields.permission, false) && object_valid)
            .then_some(fields)
    }

    /// Takes one pair of the query; `None` when the router must decide.
    fn take(&mut self, key: &str, value: Cow<'a, str>) -> Option<()> {
        let slot = match key {
            "subject" => &mut self.subject,
            "permission" => &mut self.permission,
            "object" => &mut self.object,
            "at_least" => &mut self.at_least,
            // A parameter the route does not know (refused): the router answers it.
            _ => return None,
        };
        slot.replace(value).is_none().then_some(())
    }
}

/// The answer to a plain single check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlainAnswer {
    allowed: bool,
    revision: u64,
}

impl PlainAnswer {
    /// The very bytes `Json(json!({"allowed", "revision"}))` writes (keys sorted), on the
    /// stack: the keep-alive loop writes them once a request.
    pub(super) fn body(self) -> AnswerBody {
        let mut bytes = [0; 64];
        let capacity = bytes.len();
        let mut rest = &mut bytes[..];
        // At most 51 bytes (`false` and a revision of 20 digits): always fits.
        let _ = std::io::Write::write_fmt(
            &mut rest,
            format_args!(
                "{{\"allowed\":{},\"revision\":\"{}\"}}",
                self.allowed, self.revision
            ),
        );
        let len = capacity - rest.len();
        AnswerBody { bytes, len }
    }
}

/// A plain answer's body, held on the stack.
pub(super) struct AnswerBody {
    bytes: [u8; 64],
    len: usize,
}

impl AnswerBody {
    /// The body's bytes.
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl App {
    /// Answers a plain `GET /v1/check` as the router would, or `None` to let the router
    /// answer (errors, shedding, `at_least` waits and authorization failures are all
    /// decided there, once; a token whose write is applied needs no wait).
    /// `authorization` is the first `Authorization` header's value.
    pub(super) fn check_plain(
        &self,
        query: &str,
        authorization: Option<&[u8]>,
    ) -> Option<PlainAnswer> {
        let started = Instant::now();
        if !self.authorized(authorization) {
            return None;
        }
        // Held while answering, so the in-flight count means the same on both paths.
        let _admitted = self.in_flight.enter()?;
        let fields = CheckFields::parse(query)?;
        let (Some(subject), Some(permission)) = (&fields.subject, &fields.permission) else {
            return None;
        };
        // A token whose write is not applied yet is waited for by the router's handler,
        // and one that is not a token refused there.
        let token = fields
            .at_least
            .as_deref()
            .map_or(Ok(None), super::handlers::token_of_text)
            .ok()?;
        let revision = self.revision_now(token)?;
        if !self.config.shard.owns(subject) || self.answerable().is_err() {
            return None;
        }
        let object = fields.object.as_deref().unwrap_or("");
        let allowed = self.store.check(subject, permission, object);
        self.metrics
            .checked(u64::from(allowed), u64::from(!allowed), started.elapsed());
        Some(PlainAnswer {
            allowed,
            revision: revision.0,
        })
    }

    /// Whether a request with this `Authorization` value (the first one) passes the bearer
    /// token check, when one is configured.
    pub(super) fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        self.config
            .token
            .as_ref()
            .is_none_or(|token| token.presented_in(authorization))
    }

    /// [`App::check_plain`] for a request hyper has parsed, as a response.
    fn check_fast(&self, query: Option<&str>, headers: &HeaderMap) -> Option<Response> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let answer = self.check_plain(query?, authorization)?;
        let body = answer.body().as_bytes().to_vec();
        let mut response = Response::new(Body::from(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Some(response)
    }
}
