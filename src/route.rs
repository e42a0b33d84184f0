//! `permd route`: one address in front of the daemons of a sharded set (`--shard i/n`),
//! sending each request to the daemon of its subject's shard.
//!
//! Every request but a batch is about one subject and goes to its shard's daemon as it
//! came, whose answer comes back as it went (status and body), so the API and its errors
//! are the daemons', decided there. A batch is split by shard, the parts sent at once, and
//! their results put back in the batch's order. A request whose subject cannot be read
//! (missing, malformed) goes to shard 0, which answers the error a daemon answers.
//!
//! A shard may have several daemons: requests go to each in turn, and to the next when one
//! does not answer (the API is all reads, so a request may be sent again). Daemons may be
//! `https://`, or `unix:PATH` on the router's host (`connect`); the router may serve HTTPS
//! itself.
//!
//! The router holds nothing and asks no database: it hashes, forwards and merges. With
//! `--shards-file` it reads the file again on SIGHUP and switches to the set it lists once
//! every shard of that set has a ready daemon (a reshard without a restart); each request
//! is routed by one set from start to end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::{
    Answering, ApiError, Histogram, Served, ServerCerts, ServerLimits, SocketFile, Token,
};
use crate::shard::Shard;

mod coalesce;
mod connect;

/// How the router runs.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The daemons' base URLs (`http://host:port`), those of shard `i` at `i`: one, or
    /// several separated by `|` that mirror the same shard (requests go to each in turn,
    /// and to the next when one does not answer).
    pub shards: Vec<String>,
    /// Where `shards` was read from, one shard a line (`read_shards_file`): read again on
    /// SIGHUP.
    pub shards_file: Option<PathBuf>,
    /// Required from clients on every route but `/livez` and `/readyz`, and presented to
    /// the daemons (give them the same token).
    pub token: Option<Token>,
    /// Longest wait for a daemon's answer.
    pub request_timeout: Duration,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Most checks in one batch, as a daemon's `--max-batch`: a batch is refused whole
    /// before it is split by shard, as one daemon of the whole set refuses it.
    pub max_batch: usize,
    /// For `https://` daemons: the CAs to trust (PEM), instead of the system's.
    pub ca: Option<std::path::PathBuf>,
}

/// Everything `permd route` runs with.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Where to serve.
    pub listen: SocketAddr,
    /// A Unix socket to serve on too (plain HTTP), if any.
    pub unix_socket: Option<crate::config::UnixSocket>,
    /// How to route.
    pub config: RouteConfig,
    /// Connection limits.
    pub limits: ServerLimits,
    /// HTTPS: the certificate and key to serve with.
    pub tls: Option<Arc<ServerCerts>>,
    /// Bound on graceful shutdown.
    pub shutdown_timeout: Duration,
}

/// The set the router routes to: each shard's daemons, in shard order.
struct Set {
    groups: Vec<Group>,
}

/// A shard's daemons: one, or several that mirror the same shard.
struct Group {
    shard: Shard,
    daemons: Vec<Arc<Daemon>>,
    /// The daemon the next request tries first: each in turn.
    next: AtomicUsize,
    /// Single checks waiting to go to the shard together (`coalesce`).
    waiting: coalesce::Waiting,
}

/// One daemon: where it listens, and what the router sent it.
struct Daemon {
    /// `http://host:port` (or `https://`), without a trailing slash, or `unix:PATH`.
    base: String,
    /// Where its requests go: `base`, or for `unix:PATH` its `unix://` form
    /// ([`connect::origin`]).
    origin: String,
    forwarded: AtomicU64,
    failed: AtomicU64,
    /// How long its answers took, from the request sent to the answer's head.
    answers: Histogram,
    /// Failures since its last answer: how long it rests.
    failures_in_row: AtomicU32,
    /// Until when (nanoseconds after `born`) it rests after a failure: tried after the
    /// shard's other daemons, not before, so that a daemon down or hung costs a request
    /// its wait only once in a while rather than at every turn.
    resting_until: AtomicU64,
    born: Instant,
}

/// How long a daemon that failed rests: doubled at each failure in a row, from the first
/// to the last.
const REST_FIRST: Duration = Duration::from_millis(100);
const REST_MAX: Duration = Duration::from_secs(10);

/// How long a survey of the daemons answers `/readyz` after it ended.
const SURVEY_REUSE: Duration = Duration::from_millis(100);

/// A survey of the daemons of `set`, and when it ended.
struct Surveyed {
    set: Arc<Set>,
    ended: Instant,
    ready: bool,
    shards: Vec<Value>,
}

/// How long connecting to a daemon may take. A daemon on the same network connects in
/// well under a millisecond; a host that drops packets would otherwise hold the request
/// for its whole `--request-timeout-ms`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Daemon {
    fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            origin: connect::origin(base),
            forwarded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            answers: Histogram::default(),
            failures_in_row: AtomicU32::new(0),
            resting_until: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Nanoseconds since `born`.
    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether it rests after a failure.
    fn resting(&self) -> bool {
        self.resting_until.load(Ordering::Relaxed) > self.now()
    }

    /// It did not answer: it rests, twice as long as after the failure before.
    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let in_row = self.failures_in_row.fetch_add(1, Ordering::Relaxed).min(16);
        let rest = REST_FIRST.saturating_mul(1 << in_row).min(REST_MAX);
        let until = self
            .now()
            .saturating_add(u64::try_from(rest.as_nanos()).unwrap_or(u64::MAX));
        self.resting_until.store(until, Ordering::Relaxed);
    }

    /// It answered (whatever the status), `took` after it was asked: it rests no more.
    fn answered(&self, took: Duration) {
        self.answers.record(took);
        if self.failures_in_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_row.store(0, Ordering::Relaxed);
            self.resting_until.store(0, Ordering::Relaxed);
        }
    }
}

/// The router: a cheap-clone handle.
#[derive(Clone)]
pub struct Router(Arc<Inner>);

struct Inner {
    /// Swapped whole on a reshard; a request keeps the one it started with. `ArcSwap`:
    /// every request reads it, a SIGHUP writes it, and a read takes no lock.
    set: ArcSwap<Set>,
    /// SIGHUPs that switched the set, and those that kept it (a file that could not be
    /// read, or a set not ready).
    reshards: [AtomicU64; 2],
    /// Request heads refused by the router itself (unreadable, or too large).
    refused: AtomicU64,
    /// Single checks answered from a batch they shared with others (`coalesce`).
    coalesced: AtomicU64,
    /// The last survey `/readyz` made. A tokio mutex, held across the survey: probes that
    /// come while one runs wait for it and share its answer.
    surveyed: tokio::sync::Mutex<Option<Surveyed>>,
    client: Client<connect::Connector, Body>,
    config: RouteConfig,
}

/// A request to send to a daemon.
struct Forward {
    method: Method,
    /// The path and query.
    target: String,
    content_type: Option<HeaderValue>,
    body: Bytes,
}

impl Forward {
    /// `POST /v1/check` with `body`.
    fn batch(content_type: Option<HeaderValue>, body: Bytes) -> Self {
        Self {
            method: Method::POST,
            target: "/v1/check".to_owned(),
            content_type,
            body,
        }
    }

    /// `GET target` (a path and query).
    fn get(target: String) -> Self {
        Self {
            method: Method::GET,
            target,
            content_type: None,
            body: Bytes::new(),
        }
    }

    /// `GET /v1/status`.
    fn status() -> Self {
        Self::get("/v1/status".to_owned())
    }
}

/// Why no daemon of a shard gave an answer: each one's reason, and whether every one
/// timed out.
struct Failure {
    reasons: Vec<String>,
    timed_out: bool,
}

type Answer = Response<Body>;

/// How long a connection to a daemon may wait in the pool for its next request.
const POOL_IDLE: Duration = Duration::from_secs(5);

impl Failure {
    /// A daemon that answered, with something that is not an answer.
    fn broken(reason: String) -> Self {
        Self {
            reasons: vec![reason],
            timed_out: false,
        }
    }
}

impl Router {
    /// A router over `config.shards`, which must be `http://` or `https://` URLs or
    /// `unix:PATH` (one to 65,536 shards).
    pub fn new(config: RouteConfig) -> anyhow::Result<Self> {
        let set = Set::new(&config.shards, None)?;
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.enforce_http(false);
        let tls = crate::http::client_config(config.ca.as_deref(), "--shards-ca")?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // A daemon closes a connection idle for its header timeout (10 s by default): the
        // pool lets go of one before, so that a request rarely meets one being closed.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connect::Connector(connector));
        Ok(Self(Arc::new(Inner {
            set: ArcSwap::from_pointee(set),
            reshards: [AtomicU64::new(0), AtomicU64::new(0)],
            refused: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            surveyed: tokio::sync::Mutex::new(None),
            client,
            config,
        })))
    }

    /// Whether the router takes its shards from a file, which it reads again on SIGHUP.
    pub fn reshards(&self) -> bool {
        self.0.config.shards_file.is_some()
    }

    /// Reads the shards file again and routes to the set it lists, once every shard of
    /// that set has a ready daemon that mirrors it; until then, and when the file cannot
    /// be read, to the set before. What changed, for the log, or why nothing did.
    pub async fn reshard(&self) -> anyhow::Result<String> {
        let outcome = self.switch().await;
        let counted = usize::from(outcome.is_err());
        self.0.reshards[counted].fetch_add(1, Ordering::Relaxed);
        outcome
    }

    /// `reshard`, uncounted.
    async fn switch(&self) -> anyhow::Result<String> {
        let Some(path) = &self.0.config.shards_file else {
            bail!("the shards were given by --shards, not --shards-file");
        };
        let urls = read_shards_file(path)?;
        let current = self.0.set.load_full();
        let next = Set::new(&urls, Some(&current))
            .with_context(|| format!("the shards in {}", path.display()))?;
        if next.urls() == current.urls() {
            return Ok(format!("{} lists the shards in use", path.display()));
        }
        let (ready, shards) = self.survey(&next).await;
        if !ready {
            bail!(
                "the set {} lists is not ready, so the router keeps the set before: {}",
                path.display(),
                unready(&shards)
            );
        }
        let from = current.groups.len();
        self.0.set.store(Arc::new(next));
        Ok(format!(
            "routing to the set {} lists: {} shard(s), from {from}",
            path.display(),
            urls.len()
        ))
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Body>) -> Answer {
        let path = request.uri().path().to_owned();
        let set = self.0.set.load_full();
        match (request.method(), path.as_str()) {
            // The probes answer without the token, as a daemon's do (`HEAD` too, as axum
            // answers it for a `GET` route).
            (&Method::GET | &Method::HEAD, "/livez") => {
                return json_answer(StatusCode::OK, &json!({"live": true}))
            }
            (&Method::GET | &Method::HEAD, "/readyz") => {
                let (ready, shards) = self.survey_for_probe(&set).await;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return json_answer(status, &json!({ "ready": ready, "shards": shards }));
            }
            _ => {}
        }
        if let Some(token) = &self.0.config.token {
            let authorization = request.headers().get(header::AUTHORIZATION);
            if !token.presented_in(authorization.map(HeaderValue::as_bytes)) {
                return ApiError::Unauthorized.into_response();
            }
        }
        match (request.method(), path.as_str()) {
            (&Method::GET, "/metrics") => self.metrics(&set),
            (&Method::GET, "/v1/status") => {
                let (ready, shards) = self.survey(&set).await;
                json_answer(
                    StatusCode::OK,
                    &json!({ "router": true, "ready": ready, "shards": shards }),
                )
            }
            (_, "/v1/digest") => ApiError::bad_request(
                "the digest is a shard's: ask each daemon, or run `permd verify --permd URL` \
                 against each",
            )
            .into_response(),
            (&Method::POST, "/v1/check") => self.batch(&set, request).await,
            _ => {
                if let Some(check) = coalesce::Check::of(&request) {
                    let shard = set.owner(check.subject());
                    return self.check(&set, shard, check).await;
                }
                let shard = subject_of(request.uri()).map_or(0, |subject| set.owner(&subject));
                self.pass(&set.groups[shard], request).await
            }
        }
    }

    /// Sends `request` to a daemon of `group` as it came; its answer as it went.
    async fn pass(&self, group: &Group, request: Request<Body>) -> Answer {
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, self.0.config.body_limit).await {
            Ok(body) => body,
            Err(_) => return too_large(self.0.config.body_limit),
        };
        let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let forward = Forward {
            method: parts.method,
            target,
            content_type,
            body,
        };
        self.relay(group, &forward).await
    }

    /// Sends `forward` to a daemon of `group`; its answer as it went, or why there is none.
    async fn relay(&self, group: &Group, forward: &Forward) -> Answer {
        match self.send(group, forward).await {
            Ok(answer) => answer.map(Body::new),
            Err(failure) => failed(group, &failure),
        }
    }

    /// Sends one request to a daemon of `group`, each in turn, and to the next when one
    /// does not answer (every request of the API is a read: sending it again is safe), or
    /// answers 503 (not loaded yet, overloaded, behind a token): the last one's 503 is the
    /// answer when every daemon gave one. Daemons resting after a failure come after the
    /// others. A shard of one daemon is tried twice, unless the first try timed out: a
    /// connection the daemon closed as the request went out fails it without the daemon
    /// being down.
    async fn send(&self, group: &Group, forward: &Forward) -> Result<Response<Incoming>, Failure> {
        let count = group.daemons.len();
        let first = group.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<&Daemon> = (0..count)
            .map(|turn| &*group.daemons[(first + turn) % count])
            .collect();
        if count > 1 {
            // Stable: each part keeps the turns' order.
            order.sort_by_key(|daemon| daemon.resting());
        }
        let mut failure = Failure {
            reasons: Vec::new(),
            timed_out: true,
        };
        for turn in 0..count.max(2) {
            if turn >= count && failure.timed_out {
                break;
            }
            let daemon = order[turn % count];
            match self.send_to(daemon, forward).await {
                Ok(answer)
                    if answer.status() == StatusCode::SERVICE_UNAVAILABLE && turn + 1 < count =>
                {
                    tracing::debug!(shard = %group.shard, url = %daemon.base, "answered 503: the next daemon of the shard is asked");
                }
                Ok(answer) => return Ok(answer),
                Err((reason, timed_out)) => {
                    tracing::warn!(shard = %group.shard, url = %daemon.base, "{reason}");
                    failure.reasons.push(format!("{}: {reason}", daemon.base));
                    failure.timed_out &= timed_out;
                }
            }
        }
        Err(failure)
    }

    /// Sends one request to `daemon`, with the router's token; else why it did not answer,
    /// and whether it timed out.
    async fn send_to(
        &self,
        daemon: &Daemon,
        forward: &Forward,
    ) -> Result<Response<Incoming>, (String, bool)> {
        daemon.forwarded.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::builder()
            .method(forward.method.clone())
            .uri(format!("{}{}", daemon.origin, forward.target));
        if let Some(content_type) = &forward.content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(token) = &self.0.config.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.secret()));
        }
        let request = request
            .body(Body::from(forward.body.clone()))
            .map_err(|e| (e.to_string(), false))?;
        let timeout = self.0.config.request_timeout;
        let sent = Instant::now();
        let answer = match tokio::time::timeout(timeout, self.0.client.request(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err((crate::error_chain(&error), false)),
            Err(_) => Err((format!("no answer within {timeout:?}"), true)),
        };
        match &answer {
            Ok(_) => daemon.answered(sent.elapsed()),
            Err(_) => daemon.failed(),
        }
        answer
    }

    /// `POST /v1/check`: split by shard, sent at once, results put back in order.
    async fn batch(&self, set: &Set, request: Request<Body>) -> Answer {
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, self.0.config.body_limit).await {
            Ok(body) => body,
            Err(_) => return too_large(self.0.config.body_limit),
        };
        let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
        let split = set.split(&body);
        let checks = split
            .iter()
            .flatten()
            .map(|part| part.1.len())
            .sum::<usize>();
        if checks > self.0.config.max_batch {
            return crate::http::too_many_checks(checks, self.0.config.max_batch).into_response();
        }
        let (bodies, places): (Vec<String>, Vec<Vec<usize>>) = match split {
            Some(parts) if parts.iter().filter(|p| !p.1.is_empty()).count() > 1 => {
                parts.into_iter().unzip()
            }
            // One shard's checks, or a batch that cannot be read, goes whole to one daemon
            // (shard 0 for the latter), which answers it or the error.
            parts => {
                let shard = parts
                    .and_then(|parts| parts.iter().position(|p| !p.1.is_empty()))
                    .unwrap_or(0);
                return self
                    .relay(&set.groups[shard], &Forward::batch(content_type, body))
                    .await;
            }
        };
        let sends = bodies
            .into_iter()
            .enumerate()
            .filter(|(_, body)| !body.is_empty())
            .map(|(shard, body)| {
                let content_type = content_type.clone();
                let group = &set.groups[shard];
                async move {
                    let answer = self
                        .send(group, &Forward::batch(content_type, body.into()))
                        .await;
                    let answer = match answer {
                        Ok(answer) => answer,
                        Err(failure) => return (shard, Err(failed(group, &failure))),
                    };
                    let (head, body) = answer.into_parts();
                    let bytes = axum::body::to_bytes(Body::new(body), usize::MAX).await;
                    match bytes {
                        Ok(bytes) => (shard, Ok((head.status, bytes))),
                        Err(error) => {
                            let failure = Failure::broken(error.to_string());
                            (shard, Err(failed(group, &failure)))
                        }
                    }
                }
            });
        let answers = futures_util::future::join_all(sends).await;
        let mut results = vec![false; checks];
        let mut revision: Option<u64> = None;
        for (shard, answer) in answers {
            let (status, bytes) = match answer {
                Ok(answer) => answer,
                Err(failed) => return failed,
            };
            if status != StatusCode::OK {
                // The daemon's own error (stale, overloaded, ...), as it answered it.
                let mut answer = Response::new(Body::from(bytes));
                *answer.status_mut() = status;
                answer.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return answer;
            }
            let Ok(part) = serde_json::from_slice::<PartAnswer>(&bytes) else {
                let failure = Failure::broken("an answer that is not a batch's".into());
                return failed(&set.groups[shard], &failure);
            };
            let places = &places[shard];
            if part.results.len() != places.len() {
                let failure = Failure::broken(format!(
                    "{} results for {} checks",
                    part.results.len(),
                    places.len()
                ));
                return failed(&set.groups[shard], &failure);
            }
            for (&place, allowed) in places.iter().zip(part.results) {
                results[place] = allowed;
            }
            // Every daemon follows the same database: the lowest watermark is one that
            // every part was answered at or past.
            let part_revision = part.revision.parse().unwrap_or(0);
            revision = Some(revision.map_or(part_revision, |r| r.min(part_revision)));
        }
        json_answer(
            StatusCode::OK,
            &json!({ "results": results, "revision": revision.unwrap_or(0).to_string() }),
        )
    }

    /// [`Router::survey`] for `/readyz`, which anyone may ask without the token: one
    /// ended within [`SURVEY_REUSE`] (or running, waited for) is the answer, so that a
    /// flood of probes asks the daemons at most about ten times a second, where each probe
    /// asked every daemon.
    async fn survey_for_probe(&self, set: &Arc<Set>) -> (bool, Vec<Value>) {
        let mut last = self.0.surveyed.lock().await;
        if let Some(surveyed) = last
            .as_ref()
            .filter(|last| Arc::ptr_eq(&last.set, set) && last.ended.elapsed() < SURVEY_REUSE)
        {
            return (surveyed.ready, surveyed.shards.clone());
        }
        let (ready, shards) = self.survey(set).await;
        *last = Some(Surveyed {
            set: Arc::clone(set),
            ended: Instant::now(),
            ready,
            shards: shards.clone(),
        });
        (ready, shards)
    }

    /// Every daemon's `/v1/status`, asked at once: whether every shard has a daemon that
    /// is ready and no daemon mirrors another shard than the one the router sends it, and
    /// what each said.
    async fn survey(&self, set: &Set) -> (bool, Vec<Value>) {
        let groups = set.groups.iter().map(|group| async move {
            let asks = group
                .daemons
                .iter()
                .map(|daemon| self.look(group.shard, daemon));
            let daemons: Vec<(Value, bool, bool)> = futures_util::future::join_all(asks).await;
            let ready = daemons.iter().any(|(_, ready, _)| *ready);
            let misplaced = daemons.iter().any(|(_, _, misplaced)| *misplaced);
            let reports: Vec<Value> = daemons.into_iter().map(|(report, _, _)| report).collect();
            let report =
                json!({ "shard": group.shard.to_string(), "ready": ready, "daemons": reports });
            (report, ready && !misplaced)
        });
        let groups = futures_util::future::join_all(groups).await;
        let ready = groups.iter().all(|(_, ready)| *ready);
        (
            ready,
            groups.into_iter().map(|(report, _)| report).collect(),
        )
    }

    /// One daemon's `/v1/status`: the report, whether it is ready, and whether it mirrors
    /// another shard than `shard` (a list out of order).
    async fn look(&self, shard: Shard, daemon: &Daemon) -> (Value, bool, bool) {
        let mut report = json!({ "url": daemon.base });
        let status = match self.send_to(daemon, &Forward::status()).await {
            Err((reason, _)) => Err(reason),
            Ok(answer) if answer.status() != StatusCode::OK => {
                Err(format!("/v1/status answered {}", answer.status()))
            }
            Ok(answer) => {
                let bytes = axum::body::to_bytes(Body::new(answer.into_body()), usize::MAX)
                    .await
                    .unwrap_or_default();
                serde_json::from_slice::<Value>(&bytes)
                    .map_err(|_| "/v1/status answered something else than JSON".to_owned())
            }
        };
        let (ready, misplaced) = match status {
            Err(error) => {
                report["error"] = Value::String(error);
                (false, false)
            }
            Ok(status) => {
                let mirrors = status["shard"].as_str().unwrap_or("0/1").to_owned();
                let ready = status["ready"].as_bool() == Some(true);
                report["status"] = status;
                if mirrors == shard.to_string() {
                    (ready, false)
                } else {
                    report["error"] = Value::String(format!(
                        "the daemon at {} mirrors shard {mirrors}, where the router sends \
                         shard {shard}'s subjects (its place in --shards)",
                        daemon.base
                    ));
                    (false, true)
                }
            }
        };
        report["ready"] = Value::Bool(ready);
        (report, ready, misplaced)
    }

    /// `GET /metrics`: what the router forwarded, and failed to, by shard.
    fn metrics(&self, set: &Set) -> Answer {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut each = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Daemon) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for group in &set.groups {
                for daemon in &group.daemons {
                    let _ = writeln!(
                        out,
                        "{name}{{shard=\"{}\",url=\"{}\"}} {}",
                        group.shard,
                        daemon.base,
                        value(daemon)
                    );
                }
            }
        };
        each(
            "permd_route_forwarded_total",
            "counter",
            "Requests the router sent to each daemon (a batch's parts each, a request sent again to another daemon of its shard again, the status asked for /readyz).",
            &|d| d.forwarded.load(Ordering::Relaxed),
        );
        each(
            "permd_route_failed_total",
            "counter",
            "Requests to each daemon that got no answer (then sent to the next daemon of the shard, if any; else answered 502 or 504).",
            &|d| d.failed.load(Ordering::Relaxed),
        );
        each(
            "permd_route_resting",
            "gauge",
            "1 while the daemon rests after failing to answer: tried after the other daemons of its shard, for 0.1 s, doubled at each failure in a row up to 10 s.",
            &|d| u64::from(d.resting()),
        );
        let name = "permd_route_answer_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from sending a request to each daemon to its answer's head, whatever its status (a request that got no answer is not counted: permd_route_failed_total).\n\
             # TYPE {name} histogram"
        );
        for group in &set.groups {
            for daemon in &group.daemons {
                let labels = format!("shard=\"{}\",url=\"{}\"", group.shard, daemon.base);
                daemon.answers.render(&mut out, name, &labels);
            }
        }
        let _ = writeln!(
            out,
            "# HELP permd_route_shards Shards of the set the router routes to.\n\
             # TYPE permd_route_shards gauge\n\
             permd_route_shards {}",
            set.groups.len(),
        );
        if self.reshards() {
            let [switched, kept] = &self.0.reshards;
            let _ = writeln!(
                out,
                "# HELP permd_route_reshards_total SIGHUPs with --shards-file: those that switched to the set the file lists (or found it in use), and those that kept the set before (the file could not be read, or its set was not ready).\n\
                 # TYPE permd_route_reshards_total counter\n\
                 permd_route_reshards_total{{outcome=\"switched\"}} {}\n\
                 permd_route_reshards_total{{outcome=\"kept\"}} {}",
                switched.load(Ordering::Relaxed),
                kept.load(Ordering::Relaxed),
            );
        }
        let _ = writeln!(
            out,
            "# HELP permd_route_coalesced_total Single checks answered from a batch they shared with others: those that came while each daemon of their shard had two requests of checks in flight, sent together when one was answered.\n\
             # TYPE permd_route_coalesced_total counter\n\
             permd_route_coalesced_total {}",
            self.0.coalesced.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP permd_route_refused_total Request heads the router refused itself, as a daemon does: unreadable (400) or too large (414, 431), answered with a JSON error and the connection closed.\n\
             # TYPE permd_route_refused_total counter\n\
             permd_route_refused_total {}",
            self.0.refused.load(Ordering::Relaxed),
        );
        let mut answer = Response::new(Body::from(out));
        answer.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        answer
    }
}

impl Set {
    /// The set of `shards` (one entry a shard, its daemons separated by `|`), which must
    /// be `http://` or `https://` URLs or `unix:PATH` (one to 65,536 shards). A daemon
    /// that `before` had at the same place keeps its counters.
    fn new(shards: &[String], before: Option<&Set>) -> anyhow::Result<Self> {
        let count = u32::try_from(shards.len())
            .ok()
            .filter(|n| (1..=crate::shard::MAX_SHARDS).contains(n))
            .with_context(|| {
                format!(
                    "give the daemons' URLs, one a shard in shard order (1 to {})",
                    crate::shard::MAX_SHARDS
                )
            })?;
        let mut groups = Vec::with_capacity(shards.len());
        for (index, urls) in (0..count).zip(shards) {
            let shard = Shard::new(index, count).context("a shard")?;
            let mut daemons = Vec::new();
            for url in urls.split('|') {
                let base = url.trim().trim_end_matches('/');
                match base.strip_prefix("unix:") {
                    Some("") => bail!(
                        "the URL of shard {shard}, {url:?}: give unix: and the path of the daemon's socket"
                    ),
                    Some(_) => {}
                    None => {
                        let uri: Uri = base
                            .parse()
                            .with_context(|| format!("the URL of shard {shard}, {url:?}"))?;
                        if !matches!(uri.scheme_str(), Some("http" | "https"))
                            || uri.authority().is_none()
                            || uri.path() != "/"
                        {
                            bail!("the URL of shard {shard}, {url:?}: give http://HOST:PORT, https://HOST:PORT or unix:PATH");
                        }
                    }
                }
                let kept = before
                    .and_then(|set| set.groups.iter().find(|g| g.shard == shard))
                    .and_then(|group| group.daemons.iter().find(|d| d.base == base));
                daemons.push(kept.map_or_else(|| Arc::new(Daemon::new(base)), Arc::clone));
            }
            groups.push(Group {
                shard,
                daemons,
                next: AtomicUsize::new(0),
                waiting: coalesce::Waiting::default(),
            });
        }
        Ok(Self { groups })
    }

    /// Each shard's daemons, as `--shards` takes them.
    fn urls(&self) -> Vec<String> {
        self.groups
            .iter()
            .map(|g| {
                let urls: Vec<&str> = g.daemons.iter().map(|d| d.base.as_str()).collect();
                urls.join("|")
            })
            .collect()
    }

    /// The index of the group whose shard holds `subject`.
    fn owner(&self, subject: &str) -> usize {
        let count = self.groups.len() as u32;
        Shard::of(subject, count) as usize
    }

    /// A batch's parts by shard: each daemon's request body and where its checks' results
    /// go, or `None` when a daemon would refuse the batch before looking at its checks'
    /// shards (it cannot be read, or a check is invalid): a daemon sent the whole batch
    /// then says why as it would to the client, naming the check by its place in it.
    fn split(&self, body: &[u8]) -> Option<Vec<(String, Vec<usize>)>> {
        let batch: BatchRequest = serde_json::from_slice(body).ok()?;
        if !batch
            .at_least
            .is_none_or(|at_least| crate::http::batch_token_reads(at_least.get()))
        {
            return None;
        }
        let mut parts = vec![(String::new(), Vec::new()); self.groups.len()];
        for (place, check) in batch.checks.iter().enumerate() {
            let subject = crate::http::valid_check_subject(check.get())?;
            let (body, places) = &mut parts[self.owner(&subject)];
            body.push_str(if places.is_empty() {
                "{\"checks\":["
            } else {
                ","
            });
            body.push_str(check.get());
            places.push(place);
        }
        for (body, places) in &mut parts {
            if !places.is_empty() {
                body.push(']');
                if let Some(at_least) = batch.at_least {
                    body.push_str(",\"at_least\":");
                    body.push_str(at_least.get());
                }
                body.push('}');
            }
        }
        Some(parts)
    }
}

/// The answer when no daemon of `group` answered: 502, or 504 when all timed out.
fn failed(group: &Group, failure: &Failure) -> Answer {
    let (status, error) = if failure.timed_out {
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    } else {
        (StatusCode::BAD_GATEWAY, "shard unavailable")
    };
    let message = format!(
        "no daemon of shard {} answered: {}",
        group.shard,
        failure.reasons.join("; ")
    );
    json_answer(status, &json!({ "error": error, "message": message }))
}

/// The shards a file lists, one a line in shard order, as `--shards` takes each (several
/// daemons of a shard separated by `|`). Blank lines and lines that start with `#` are
/// skipped.
pub fn read_shards_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the shards file {}", path.display()))?;
    let shards: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if shards.is_empty() {
        bail!(
            "the shards file {} lists no shard: give one line a shard, in shard order",
            path.display()
        );
    }
    Ok(shards)
}

/// Why a surveyed set is not ready: each shard without a ready daemon, and each daemon's
/// error.
fn unready(shards: &[Value]) -> String {
    let mut reasons = Vec::new();
    for shard in shards {
        let daemons = shard["daemons"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let errors: Vec<&str> = daemons.iter().filter_map(|d| d["error"].as_str()).collect();
        if shard["ready"] != Value::Bool(true) || !errors.is_empty() {
            let why = if errors.is_empty() {
                "no daemon is ready yet".to_owned()
            } else {
                errors.join("; ")
            };
            reasons.push(format!(
                "shard {}: {why}",
                shard["shard"].as_str().unwrap_or("?")
            ));
        }
    }
    reasons.join("; ")
}

/// A batch's body, its checks left whole for the shards; a field it does not name is
/// refused, as the daemon refuses it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    checks: Vec<&'a RawValue>,
    #[serde(borrow)]
    at_least: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PartAnswer {
    results: Vec<bool>,
    revision: String,
}

/// The subject a request is about: the `subject` of the query, or the segment after
/// `/v1/subjects/`.
fn subject_of(uri: &Uri) -> Option<String> {
    if let Some(rest) = uri.path().strip_prefix("/v1/subjects/") {
        let segment = rest.split('/').next()?;
        let decoded = percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()?;
        return Some(decoded.into_owned());
    }
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == "subject")
        .map(|(_, value)| value.into_owned())
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    json_body(status, Body::from(body.to_string()))
}

/// An answer of `status` whose body is JSON.
fn json_body(status: StatusCode, body: Body) -> Answer {
    let mut answer = Response::new(body);
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn too_large(limit: usize) -> Answer {
    ApiError::Invalid {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is over {limit} bytes"),
    }
    .into_response()
}

/// Serves the router on `listener` (HTTPS with `tls`) and on `unix` (plain HTTP) until
/// `shutdown`, then lets in-flight requests finish (the caller bounds that wait). Each
/// connection is read by the daemon's keep-alive loop (`http::conn`), which forwards a
/// `GET` without a body or a whole JSON batch itself (`Served::get_later`,
/// `check_batch_later`, through `Router::handle`), refuses a head hyper would refuse with
/// an empty answer with the same status and the JSON error a daemon writes, and lets
/// hyper read every other request.
pub async fn serve(
    listener: TcpListener,
    unix: Option<SocketFile>,
    router: Router,
    limits: ServerLimits,
    tls: Option<Arc<ServerCerts>>,
    shutdown: CancellationToken,
) {
    crate::http::serve_all(Some(listener), unix, router, limits, tls, shutdown).await;
}

impl Router {
    /// `request` (with `auth` as its `Authorization`, and `body`) answered by
    /// [`Router::handle`], for the keep-alive loop to await.
    fn later(
        &self,
        mut request: axum::http::request::Builder,
        auth: Option<&[u8]>,
        body: Body,
    ) -> Option<Answering> {
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        Some(self.answering(request.body(body).ok()?))
    }

    /// [`Router::handle`]'s answer to `request`, to await.
    fn answering(&self, request: Request<Body>) -> Answering {
        let router = self.clone();
        Box::pin(async move { Ok(router.handle(request).await) })
    }
}

impl Served for Router {
    fn get_later(&self, target: &str, auth: Option<&[u8]>) -> Option<Answering> {
        self.later(Request::get(target), auth, Body::empty())
    }

    fn check_batch_later(&self, body: &[u8], auth: Option<&[u8]>) -> Option<Answering> {
        let request = Request::post("/v1/check").header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.later(request, auth, Body::from(Bytes::copy_from_slice(body)))
    }

    fn refused(&self) {
        self.0.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn call(&self, request: Request<Incoming>) -> Answering {
        self.answering(request.map(Body::new))
    }
}

/// `permd route`: binds the address, serves until `shutdown`, then waits at most the
/// shutdown timeout for in-flight requests.
pub async fn run(settings: RouteSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let router = Router::new(settings.config)?;
    let listener = crate::bind(settings.listen)?;
    let unix = settings
        .unix_socket
        .as_ref()
        .map(|unix| SocketFile::bind(&unix.path, unix.mode))
        .transpose()?;
    tracing::info!(
        addr = %listener.local_addr().context("read the bound address")?,
        scheme = if settings.tls.is_some() { "https" } else { "http" },
        unix_socket = unix.as_ref().map(|unix| unix.path().display().to_string()),
        shards = ?router.0.set.load().urls(),
        version = env!("CARGO_PKG_VERSION"),
        "routing"
    );
    crate::reload_on_sighup(settings.tls.clone(), Some(router.clone()));
    let served = tokio::spawn(serve(
        listener,
        unix,
        router,
        settings.limits,
        settings.tls,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    let timeout = settings.shutdown_timeout;
    if tokio::time::timeout(timeout, served).await.is_err() {
        tracing::warn!(?timeout, "requests still in flight at the shutdown timeout");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(shards: usize) -> Router {
        Router::new(RouteConfig {
            shards: (0..shards)
                .map(|i| format!("http://127.0.0.1:{}", 7700 + i))
                .collect(),
            shards_file: None,
            token: None,
            request_timeout: Duration::from_secs(1),
            body_limit: 1 << 20,
            max_batch: 10_000,
            ca: None,
        })
        .expect("a router")
    }

    #[test]
    fn the_subject_is_read_from_the_query_or_the_path() {
        let subject = |uri: &str| subject_of(&uri.parse().expect("a URI"));
        assert_eq!(
            subject("/v1/check?permission=p&subject=user%3A%C3%BC&object=o").as_deref(),
            Some("user:ü")
        );
        assert_eq!(
            subject("/v1/subjects/user%3A7/permissions?object=o").as_deref(),
            Some("user:7")
        );
        assert_eq!(subject("/v1/check?permission=p"), None);
        assert_eq!(subject("/v1/subjects/%FF/limits"), None);
    }

    #[test]
    fn a_batch_is_split_by_shard_in_order() {
        let router = router(3);
        let subjects: Vec<String> = (0..12).map(|i| format!("user:{i}")).collect();
        let checks: Vec<Value> = subjects
            .iter()
            .map(|s| json!({"subject": s, "permission": "read"}))
            .collect();
        let body = json!({"checks": checks, "at_least": "42"}).to_string();
        let set = router.0.set.load();
        let parts = set.split(body.as_bytes()).expect("readable");
        let mut seen: Vec<usize> = Vec::new();
        for (shard, (body, places)) in parts.iter().enumerate() {
            for &place in places {
                assert_eq!(set.owner(&subjects[place]), shard);
            }
            seen.extend(places.iter().copied());
            if !places.is_empty() {
                let part: Value = serde_json::from_str(body).expect("a batch");
                assert_eq!(
                    part["checks"].as_array().expect("checks").len(),
                    places.len()
                );
                assert_eq!(part["at_least"], "42");
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        assert!(set
            .split(b"{\"checks\":[{\"permission\":\"p\"}]}")
            .is_none());
        assert!(set.split(b"not json").is_none());
    }

    #[test]
    fn a_shards_file_lists_one_shard_a_line() {
        let scratch = crate::Scratch::new("shards");
        let path = scratch.join("shards");
        let read = |text: &str| {
            std::fs::write(&path, text).expect("write the file");
            read_shards_file(&path).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            read("# shard 0, two daemons\nhttp://a:1|http://a2:1\n\n  http://b:2/  \n"),
            Ok(vec![
                "http://a:1|http://a2:1".to_owned(),
                "http://b:2/".to_owned()
            ])
        );
        let empty = read("# nothing yet\n\n").expect_err("no shard");
        assert!(empty.contains("lists no shard"), "{empty}");
        std::fs::remove_file(&path).expect("remove the file");
        let missing = read_shards_file(&path).expect_err("no file");
        assert!(
            format!("{missing:#}").contains("read the shards file"),
            "{missing:#}"
        );
    }

    #[test]
    fn a_daemon_kept_at_its_place_keeps_its_counters() {
        let urls = |list: &[&str]| list.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>();
        let before = Set::new(&urls(&["http://a:1", "http://b:1"]), None).expect("a set");
        let after = Set::new(&urls(&["http://a:1/", "http://c:1"]), Some(&before)).expect("a set");
        assert!(Arc::ptr_eq(
            &before.groups[0].daemons[0],
            &after.groups[0].daemons[0]
        ));
        assert!(!Arc::ptr_eq(
            &before.groups[1].daemons[0],
            &after.groups[1].daemons[0]
        ));
        // The same URL at another shard is another daemon's place.
        let moved = Set::new(&urls(&["http://b:1", "http://a:1"]), Some(&before)).expect("a set");
        assert!(!Arc::ptr_eq(
            &before.groups[0].daemons[0],
            &moved.groups[1].daemons[0]
        ));
        let grown = Set::new(
            &urls(&["http://a:1", "http://b:1", "http://c:1"]),
            Some(&before),
        )
        .expect("a set");
        assert!(!Arc::ptr_eq(
            &before.groups[0].daemons[0],
            &grown.groups[0].daemons[0]
        ));
        assert_eq!(
            grown.urls(),
            urls(&["http://a:1", "http://b:1", "http://c:1"])
        );
    }

    #[test]
    fn only_plain_http_urls_are_taken() {
        let error = |shards: &[&str]| {
            let config = RouteConfig {
                shards: shards.iter().map(|s| (*s).to_owned()).collect(),
                shards_file: None,
                token: None,
                request_timeout: Duration::from_secs(1),
                body_limit: 1,
                max_batch: 10_000,
                ca: None,
            };
            Router::new(config)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        assert!(error(&[]).contains("give the daemons' URLs"));
        assert!(error(&["ftp://a:1"]).contains("give http://HOST:PORT"));
        assert!(error(&["http://a:1", "http://b:2/v1"]).contains("shard 1/2"));
        assert_eq!(error(&["http://a:1/", "https://b:2"]), "");
        assert_eq!(error(&["http://a:1|https://a2:1", "http://b:2"]), "");
        assert_eq!(error(&["unix:/run/a.sock|http://a2:1", "unix:b.sock"]), "");
        assert!(error(&["http://a:1", "unix:"])
            .contains("shard 1/2, \"unix:\": give unix: and the path"));
        assert!(error(&["http://a:1|b:2"]).contains("shard 0/1, \"b:2\""));
    }
}
