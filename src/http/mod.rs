//! The HTTP API: `router(app)` and its handlers. Reads the store only.
//!
//! Invariant: no handler talks to Postgres. A request that must see a write
//! (`at_least`) waits on the store's watermark, bounded, and never queries the database.

mod conn;
mod error;
mod fast;
mod handlers;
mod metrics;
mod server;
mod tls;
mod unix;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

pub(crate) use conn::{Answering, Served};
pub use error::ApiError;
pub use fast::Api;
pub(crate) use handlers::{batch_token_reads, too_many_checks, valid_check_subject};
pub(crate) use metrics::{Histogram, Metrics};
pub(crate) use server::serve_all;
pub use server::{serve, serve_on, ServerLimits};
pub(crate) use tls::client_config;
pub use tls::{crypto_provider, ServerCerts};
pub use unix::SocketFile;

use crate::shard::Shard;
use crate::store::Store;
use crate::sync::Status;

/// A bearer token. Its `Debug` never shows it, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token; `None` for an empty one.
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into();
        (!token.trim().is_empty()).then(|| Self(token.trim().to_owned()))
    }

    /// The token itself, to present as `Authorization: Bearer …`.
    pub(crate) fn secret(&self) -> &str {
        &self.0
    }

    /// Whether the value of an `Authorization` header (the first one) is `Bearer` and
    /// this token.
    pub(crate) fn presented_in(&self, authorization: Option<&[u8]>) -> bool {
        authorization
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .is_some_and(|presented| self.matches(presented))
    }

    /// Compares in time independent of where the two differ.
    fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        let mut diff = expected.len() ^ candidate.len();
        for (i, byte) in expected.iter().enumerate() {
            diff |= usize::from(byte ^ candidate.get(i).copied().unwrap_or(!byte));
        }
        diff == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Limits and switches of the HTTP side.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Required as `Authorization: Bearer …` on every route but `/livez` and `/readyz`.
    pub token: Option<Token>,
    /// Most checks in one batch request.
    pub max_batch: usize,
    /// Longest wait for an `at_least` token before answering 503 stale.
    pub max_wait: Duration,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Longest time to answer any request.
    pub request_timeout: Duration,
    /// `/readyz` is 503 when the mirror has not caught up for longer than this.
    pub ready_max_lag: Duration,
    /// Read routes answer 503 `behind` when the mirror has not caught up for longer than
    /// this (`--answer-max-lag-ms`); `None`: answer from memory however far behind.
    pub answer_max_lag: Option<Duration>,
    /// Most API requests in flight at once; more are shed at once with 503 `overloaded`.
    /// Probes (`/livez`, `/readyz`) are never shed.
    pub max_in_flight: usize,
    /// Most answers made on blocking threads at once (listings that are not quick,
    /// digests, subjects' rows): each may hold tens of megabytes while it is made (a
    /// million names and their JSON). More wait for one to end, up to
    /// `request_timeout`, then are answered 503 `overloaded`.
    pub max_blocking_answers: usize,
    /// The subjects this daemon mirrors (`--shard`); requests about others are answered
    /// 421 with their owner.
    pub shard: Shard,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            token: None,
            max_batch: 10_000,
            max_wait: Duration::from_secs(1),
            body_limit: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            ready_max_lag: Duration::from_secs(10),
            answer_max_lag: None,
            max_in_flight: 1024,
            max_blocking_answers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            shard: Shard::WHOLE,
        }
    }
}

/// What every handler shares. Cloned for every request by each extractor and middleware,
/// so it is one `Arc`: a clone is one atomic increment.
#[derive(Clone)]
pub struct App(Arc<Shared>);

/// The state behind [`App`].
pub struct Shared {
    store: Store,
    status: Status,
    metrics: Metrics,
    config: HttpConfig,
    /// Admission control: API requests being served, against `max_in_flight`.
    in_flight: InFlight,
    /// Answers being made on blocking threads, against `max_blocking_answers`.
    blocking: Arc<tokio::sync::Semaphore>,
}

impl std::ops::Deref for App {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl App {
    /// The handler state over `store` and `status`.
    pub fn new(store: Store, status: Status, config: HttpConfig) -> Self {
        let in_flight = InFlight::new(config.max_in_flight);
        // At least one, and no more than a semaphore can count (it panics past that).
        let turns = (config.max_blocking_answers).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let blocking = Arc::new(tokio::sync::Semaphore::new(turns));
        Self(Arc::new(Shared {
            store,
            status,
            metrics: Metrics::default(),
            config,
            in_flight,
            blocking,
        }))
    }

    /// Refuses a request's `subject` field when it is not an identifier, or when another
    /// shard mirrors the subject.
    fn subject(&self, subject: &str) -> Result<(), ApiError> {
        error::identifier("subject", subject, false)?;
        self.owns("subject", subject)
    }

    /// Refuses a request about `subject`, named `field` in it, when another shard
    /// mirrors the subject.
    fn owns(&self, field: &str, subject: &str) -> Result<(), ApiError> {
        let shard = self.config.shard;
        if shard.owns(subject) {
            return Ok(());
        }
        self.metrics.misdirected();
        Err(ApiError::Misdirected {
            field: field.to_owned(),
            shard,
            owner: shard.owner_of(subject),
        })
    }

    /// API requests being served right now.
    fn in_flight(&self) -> usize {
        self.in_flight.now()
    }
}

/// Admission control: a count of the API requests being served and its limit. The answer
/// to "full" is to shed at once, never to queue, so a counter does all a semaphore's
/// `try_acquire` would; tokio's semaphore also took its waiters' lock on every release,
/// once per check.
struct InFlight {
    limit: usize,
    now: AtomicUsize,
}

/// One admitted request: counted in flight until dropped.
struct Admitted<'a>(&'a InFlight);

impl InFlight {
    /// At most `limit` (at least one) requests at a time.
    fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            now: AtomicUsize::new(0),
        }
    }

    /// Admits one more request, or `None` when `limit` are in flight.
    fn enter(&self) -> Option<Admitted<'_>> {
        if self.now.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.now.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted(self))
    }

    /// Requests admitted and not yet done (one turned away may be counted for an instant;
    /// never more than the limit shown).
    fn now(&self) -> usize {
        self.now.load(Ordering::Relaxed).min(self.limit)
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The whole API. Tests drive it with `oneshot` without a socket.
pub fn router(app: App) -> Router {
    let api = Router::new()
        .route(
            "/v1/check",
            get(handlers::check).post(handlers::check_batch),
        )
        .route(
            "/v1/subjects/{subject}/permissions",
            get(handlers::permissions),
        )
        .route("/v1/subjects/{subject}/objects", get(handlers::objects))
        .route("/v1/subjects/{subject}/limits", get(handlers::limits))
        .route("/v1/subjects/{subject}/rows", get(handlers::rows))
        .route("/v1/check-limit", get(handlers::check_limit))
        .route("/v1/status", get(handlers::status))
        .route("/v1/digest", get(handlers::digest))
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), admit));
    Router::new()
        .route("/livez", get(handlers::livez))
        .route("/readyz", get(handlers::readyz))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(app.config.body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Admission for API routes (one layer, since each layer costs a boxed clone per request):
/// sheds requests beyond `max_in_flight` with a fast 503, so overload costs the excess
/// clients a retry instead of costing everyone latency and memory; then checks the bearer
/// token, when one is configured.
async fn admit(State(app): State<App>, request: Request, next: Next) -> Response {
    let Some(_admitted) = app.in_flight.enter() else {
        app.metrics.shed();
        return ApiError::Overloaded.into_response();
    };
    if !app.presents_token(request.headers()) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// A route the API does not have: 404, or 401 first to a request without the configured
/// token, as on every route but the probes' `GET`s (the router answers so too, before it
/// asks a daemon), so that without the token one path is not told from another.
async fn not_found(State(app): State<App>, headers: HeaderMap) -> ApiError {
    app.refused_unless_authorized(&headers, ApiError::NotFound)
}

/// A method a route does not have: 405, or 401 first as in [`not_found`].
async fn method_not_allowed(State(app): State<App>, headers: HeaderMap) -> ApiError {
    app.refused_unless_authorized(&headers, ApiError::MethodNotAllowed)
}

impl App {
    /// Whether a request with these headers passes the bearer token check (its first
    /// `Authorization` header), when one is configured.
    fn presents_token(&self, headers: &HeaderMap) -> bool {
        let authorization = headers.get(header::AUTHORIZATION);
        self.authorized(authorization.map(HeaderValue::as_bytes))
    }

    /// `refusal` for a request with the token (or when none is configured), else 401.
    fn refused_unless_authorized(&self, headers: &HeaderMap, refusal: ApiError) -> ApiError {
        if self.presents_token(headers) {
            refusal
        } else {
            ApiError::Unauthorized
        }
    }
}

/// Bounds the time of requests that carry a body (a slow sender; GET handlers never block
/// but for `at_least`, which has its own bound) and counts 4xx answers. A body whose
/// declared length is over the limit is refused with a 413 before any of it is read:
/// read, it would be refused once the limit was passed, but one that was never sent (a
/// client waiting on `Expect: 100-continue`, or a wrong length) would be waited for until
/// the request timed out.
async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let response = if request.method() == axum::http::Method::GET {
        next.run(request).await
    } else if let Some(length) = declared_length(&request).filter(|n| *n > app.config.body_limit) {
        ApiError::Invalid {
            status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the body is {length} bytes, over the limit of {} (--body-limit)",
                app.config.body_limit
            ),
        }
        .into_response()
    } else {
        match tokio::time::timeout(app.config.request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => return ApiError::Timeout.into_response(),
        }
    };
    if response.status().is_client_error() {
        app.metrics.client_error();
    }
    response
}

/// The body's length as its `Content-Length` says, if it says one that reads as a number
/// (hyper has refused any other by then).
fn declared_length(request: &Request) -> Option<usize> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn in_flight_admits_up_to_its_limit_and_frees_on_drop() {
        let in_flight = InFlight::new(2);
        let first = in_flight.enter().expect("first admitted");
        let second = in_flight.enter().expect("second admitted");
        assert!(in_flight.enter().is_none(), "a third is shed");
        assert_eq!(in_flight.now(), 2);
        drop(first);
        assert_eq!(in_flight.now(), 1);
        let third = in_flight.enter().expect("admitted once one is done");
        drop((second, third));
        assert_eq!(in_flight.now(), 0);
        // A limit of zero admits one at a time, as the semaphore did.
        let one = InFlight::new(0);
        let admitted = one.enter();
        assert!(admitted.is_some() && one.enter().is_none());
    }
}
