//! One function per route. Each validates its input, waits for `at_least` if asked, and
//! answers from the store.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{identifier, is_identifier, ApiError, ApiJson, ApiPath, ApiQuery};
use super::App;
use crate::store::{Listing, Xid};

type ApiResult = Result<Json<Value>, ApiError>;

/// A read-your-writes token: the text of `permd.write_token()`, or the same number.
enum TokenRepr {
    Text(String),
    Number(u64),
}

/// Read by hand rather than `#[serde(untagged)]`, whose error for anything else names
/// the type ("did not match any variant of untagged enum TokenRepr"): this one says what
/// was sent and what a token is.
impl<'de> Deserialize<'de> for TokenRepr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Token;
        impl serde::de::Visitor<'_> for Token {
            type Value = TokenRepr;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a token from permd.write_token() (its text, or the same unsigned integer)",
                )
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<TokenRepr, E> {
                Ok(TokenRepr::Number(n))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<TokenRepr, E> {
                Ok(TokenRepr::Text(text.to_owned()))
            }
        }
        deserializer.deserialize_any(Token)
    }
}

fn parse_token(token: Option<&TokenRepr>) -> Result<Option<Xid>, ApiError> {
    match token {
        None => Ok(None),
        Some(TokenRepr::Number(n)) => Ok(Some(Xid(*n))),
        Some(TokenRepr::Text(t)) => token_of_text(t),
    }
}

/// A token given as text: none when empty, else its number.
pub(super) fn token_of_text(text: &str) -> Result<Option<Xid>, ApiError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(|n| Some(Xid(n))).map_err(|_| {
        ApiError::bad_request(format!(
            "`at_least` must be a token from permd.write_token() (an unsigned integer), got {text:?}"
        ))
    })
}

impl App {
    /// The revision a check with `token` is answered at when it need not wait: the
    /// watermark, when there is no token or its write is applied; `None` when the check
    /// must wait for it, which the router's handlers do.
    pub(super) fn revision_now(&self, token: Option<Xid>) -> Option<Xid> {
        match token {
            None => Some(self.store.watermark()),
            Some(token) => self.store.passed(token),
        }
    }
}

impl App {
    /// The revision to answer at: waits (bounded) until the token's write is applied,
    /// then asks whether the mirror may answer at all (`answerable`).
    async fn fresh(&self, at_least: Option<&TokenRepr>) -> Result<Xid, ApiError> {
        let revision = match parse_token(at_least)? {
            None => self.store.watermark(),
            Some(token) => self
                .store
                .wait_past(token, self.config.max_wait)
                .await
                .map_err(|stale| {
                    self.metrics.stale();
                    ApiError::Stale {
                        revision: stale.watermark,
                    }
                })?,
        };
        self.answerable().inspect_err(|refused| {
            self.metrics
                .unanswerable(matches!(refused, ApiError::Behind { .. }));
        })?;
        Ok(revision)
    }

    /// Whether the mirror may answer: not before the first full load (an empty store
    /// would deny everything), and with `--answer-max-lag-ms`, not while it has not caught
    /// up with Postgres for longer than that. Uncounted: the fast paths ask it, then leave
    /// a refusal to the router, which counts it (`fresh`).
    pub(super) fn answerable(&self) -> Result<(), ApiError> {
        if !self.store.loaded() {
            return Err(ApiError::Loading);
        }
        if let Some(max) = self.config.answer_max_lag {
            let lag_seconds = self.status.lag_seconds();
            if lag_seconds.is_none_or(|lag| lag > max.as_secs_f64()) {
                return Err(ApiError::Behind { lag_seconds });
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckQuery {
    subject: String,
    permission: String,
    #[serde(default)]
    object: String,
    at_least: Option<TokenRepr>,
}

/// `GET /v1/check?subject=&permission=[&object=][&at_least=]`
pub(super) async fn check(State(app): State<App>, ApiQuery(q): ApiQuery<CheckQuery>) -> ApiResult {
    let started = Instant::now();
    app.subject(&q.subject)?;
    identifier("permission", &q.permission, false)?;
    identifier("object", &q.object, true)?;
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let allowed = app.store.check(&q.subject, &q.permission, &q.object);
    app.metrics
        .checked(u64::from(allowed), u64::from(!allowed), started.elapsed());
    Ok(Json(
        json!({ "allowed": allowed, "revision": revision.to_string() }),
    ))
}

/// One check of a batch. `CompactString`s: an identifier of up to 24 bytes is decoded
/// without a heap allocation, which is most of them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckItem {
    subject: CompactString,
    permission: CompactString,
    #[serde(default)]
    object: CompactString,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchRequest {
    checks: Vec<CheckItem>,
    at_least: Option<TokenRepr>,
}

impl CheckItem {
    /// Whether every identifier is one a daemon takes.
    #[inline]
    fn is_valid(&self) -> bool {
        is_identifier(&self.subject, false)
            && is_identifier(&self.permission, false)
            && is_identifier(&self.object, true)
    }
}

/// The subject of `check`, one check of a batch as its JSON, when a daemon finds nothing
/// wrong with it: it reads as one, and its identifiers are valid. A router splits a batch
/// by shard only when every check passes and its `at_least` reads
/// ([`batch_token_reads`]): otherwise a daemon answers the whole batch's error, naming
/// the check by its place in the batch the client sent (in a part, it would name its
/// place in the part).
pub(crate) fn valid_check_subject(check: &str) -> Option<CompactString> {
    let check: CheckItem = serde_json::from_str(check).ok()?;
    check.is_valid().then_some(check.subject)
}

/// Whether a batch's `at_least`, as its JSON, reads as a token's text or number. Whether
/// the text is a token is decided after the checks' shards, so a part of a split batch
/// answers it as the whole would.
pub(crate) fn batch_token_reads(at_least: &str) -> bool {
    serde_json::from_str::<TokenRepr>(at_least).is_ok()
}

/// The error a daemon answers to a batch of `checks` checks when it allows at most
/// `max_batch`.
pub(crate) fn too_many_checks(checks: usize, max_batch: usize) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("{checks} checks in one request; at most {max_batch} are allowed"),
    }
}

/// `POST /v1/check` with `{"checks":[{subject,permission,object?}],"at_least"?}`
pub(super) async fn check_batch(
    State(app): State<App>,
    ApiJson(body): ApiJson<BatchRequest>,
) -> Result<Json<BatchAnswer>, ApiError> {
    let started = Instant::now();
    if body.checks.len() > app.config.max_batch {
        return Err(too_many_checks(body.checks.len(), app.config.max_batch));
    }
    for (i, c) in body.checks.iter().enumerate() {
        let fields = [
            ("subject", &c.subject, false),
            ("permission", &c.permission, false),
            ("object", &c.object, true),
        ];
        for (field, value, may_be_empty) in fields {
            // The field's name is formatted only for the error, not for every check.
            if !is_identifier(value, may_be_empty) {
                identifier(&format!("checks[{i}].{field}"), value, may_be_empty)?;
            }
        }
    }
    // A router splits a batch by shard; one check of another's makes the batch wrong.
    if let Some(i) = app.misdirected(&body.checks) {
        app.owns(&format!("checks[{i}].subject"), &body.checks[i].subject)?;
    }
    let revision = app.fresh(body.at_least.as_ref()).await?;
    Ok(Json(app.answer_batch(&body.checks, revision, started)))
}

impl App {
    /// Answers a batch `POST /v1/check` whose whole body the keep-alive loop read (sent as
    /// `Content-Type: application/json`) with the JSON body the router would answer, or
    /// `None` to let the router answer: errors, shedding, `at_least` waits (a token whose
    /// write is applied needs none) and authorization failures are all decided there,
    /// once.
    pub(super) fn check_batch_plain(
        &self,
        body: &[u8],
        authorization: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        if !self.authorized(authorization) || body.len() > self.config.body_limit {
            return None;
        }
        // Held while answering, so the in-flight count means the same on both paths.
        let _admitted = self.in_flight.enter()?;
        // One UTF-8 check of the whole body, then serde_json's `str` reader, which checks no
        // string again: per string (two per field) it was a twelfth of a batch's CPU. A body
        // that is not UTF-8 goes to the router, whose `from_slice` writes the error.
        let batch: BatchRequest = serde_json::from_str(std::str::from_utf8(body).ok()?).ok()?;
        // A token that is not one is the router's to refuse.
        let revision = self.revision_now(parse_token(batch.at_least.as_ref()).ok()?)?;
        if self.answerable().is_err()
            || batch.checks.len() > self.config.max_batch
            || !batch.checks.iter().all(CheckItem::is_valid)
            || self.misdirected(&batch.checks).is_some()
        {
            return None;
        }
        let answer = self.answer_batch(&batch.checks, revision, started);
        serde_json::to_vec(&answer).ok()
    }

    /// The first of `checks` about a subject of another shard.
    fn misdirected(&self, checks: &[CheckItem]) -> Option<usize> {
        if self.config.shard.is_whole() {
            return None;
        }
        checks
            .iter()
            .position(|c| !self.config.shard.owns(&c.subject))
    }

    /// Runs the valid `checks` of a batch at `revision` and counts them.
    fn answer_batch(&self, checks: &[CheckItem], revision: Xid, started: Instant) -> BatchAnswer {
        let results = self.store.check_many(
            checks
                .iter()
                .map(|c| (c.subject.as_str(), c.permission.as_str(), c.object.as_str())),
        );
        let allowed = results.iter().filter(|a| **a).count() as u64;
        self.metrics
            .checked(allowed, results.len() as u64 - allowed, started.elapsed());
        BatchAnswer {
            results,
            revision: revision.to_string(),
        }
    }
}

/// The answer to a batch: `{"results":[…],"revision":"…"}`, serialized straight from the
/// results rather than through a `Value` of one node per check.
#[derive(Serialize)]
pub(super) struct BatchAnswer {
    results: Vec<bool>,
    revision: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PermissionsQuery {
    #[serde(default)]
    object: String,
    at_least: Option<TokenRepr>,
}

/// `GET /v1/subjects/{subject}/permissions[?object=]`
pub(super) async fn permissions(
    State(app): State<App>,
    ApiPath(subject): ApiPath,
    ApiQuery(q): ApiQuery<PermissionsQuery>,
) -> ApiResult {
    app.subject(&subject)?;
    identifier("object", &q.object, true)?;
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let permissions = app.store.permissions_of(&subject, &q.object);
    Ok(Json(json!({
        "subject": subject,
        "object": q.object,
        "permissions": permissions,
        "revision": revision.to_string(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ObjectsQuery {
    permission: String,
    #[serde(default)]
    after: String,
    limit: Option<String>,
    at_least: Option<TokenRepr>,
}

/// The answer of `objects`, written straight from the page's names: through a `Value`
/// (`json!`), each name was copied first (a million names: 55 to 90 ms against 16 to 25).
/// Its fields in the order `json!` wrote them.
#[derive(Serialize)]
pub(super) struct ObjectsAnswer {
    next: Option<Arc<str>>,
    objects: Vec<Arc<str>>,
    permission: String,
    revision: String,
    subject: String,
}

impl ObjectsAnswer {
    /// The answer of a listing of `subject`'s objects with `permission`: `page`, made at
    /// `revision`.
    fn new(page: Listing, permission: String, revision: Xid, subject: String) -> Self {
        Self {
            next: page.more.then(|| page.objects.last().cloned()).flatten(),
            objects: page.objects,
            permission,
            revision: revision.to_string(),
            subject,
        }
    }
}

/// `GET /v1/subjects/{subject}/objects?permission=[&limit=N][&after=OBJECT]`: sorted by
/// name, a page at a time when `limit` is given; `next` is the `after` of the next page,
/// null after the last. A listing that is not quick (`Store::quick_objects_of`: found
/// at once, or given up after some tens of microseconds) is made on a blocking thread
/// (`blocking_answer`): most pages take microseconds, but a whole list of a million
/// names, a pass over the grants of a large subject that holds few of the names, or the
/// first walk of a generation (which sorts its names) take from milliseconds to a
/// second. The hop costs ~35 us of CPU, ten times a quick page.
pub(super) async fn objects(
    State(app): State<App>,
    ApiPath(subject): ApiPath,
    ApiQuery(q): ApiQuery<ObjectsQuery>,
) -> Result<Response, ApiError> {
    app.subject(&subject)?;
    identifier("permission", &q.permission, false)?;
    identifier("after", &q.after, true)?;
    let limit = match &q.limit {
        None => usize::MAX,
        Some(text) => whole("limit", text, (1, usize::MAX))?,
    };
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let ObjectsQuery {
        permission, after, ..
    } = q;
    if let Some(page) = app
        .store
        .quick_objects_of(&subject, &permission, &after, limit)
    {
        let answer = ObjectsAnswer::new(page, permission, revision, subject);
        return Ok(Json(answer).into_response());
    }
    let store = app.store.clone();
    blocking_answer(&app, move || {
        let page = store.objects_of(&subject, &permission, &after, limit);
        ObjectsAnswer::new(page, permission, revision, subject)
    })
    .await
}

/// What `answer` makes, as a JSON response, made and written on a blocking thread: for
/// answers that may take tens of milliseconds or more (a listing, every subject's
/// digest), which would hold a worker that serves checks. Costs a hop to another thread,
/// ~35 us of CPU (benches/README.md, "Listing a subject's objects"). At most
/// `max_blocking_answers` are made at once, as each may hold tens of megabytes (a
/// thousand whole listings of a million names at once would have held tens of
/// gigabytes); one that waits longer than the request timeout for its turn is answered
/// 503 `overloaded`. A panic there, or an answer that does not serialize, is logged and
/// answered 500 `internal`.
async fn blocking_answer<T: Serialize>(
    app: &App,
    answer: impl FnOnce() -> T + Send + 'static,
) -> Result<Response, ApiError> {
    let turn = app.blocking.clone().acquire_owned();
    let Ok(Ok(turn)) = tokio::time::timeout(app.config.request_timeout, turn).await else {
        app.metrics.shed();
        return Err(ApiError::Overloaded);
    };
    let made = tokio::task::spawn_blocking(move || {
        let body = serde_json::to_vec(&answer());
        drop(turn);
        body
    })
    .await;
    let body = match made {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            tracing::error!(%error, "an answer did not serialize");
            return Err(ApiError::Internal);
        }
        Err(error) => {
            tracing::error!(%error, "making an answer failed");
            return Err(ApiError::Internal);
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `text` as a whole number from `min` to `max` (the type's largest), or a 400 that names the
/// parameter and both bounds.
fn whole<T>(name: &str, text: &str, (min, max): (T, T)) -> Result<T, ApiError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    text.trim()
        .parse()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{name}` must be a whole number from {min} to {max}, got {text:?}"
            ))
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FreshQuery {
    at_least: Option<TokenRepr>,
}

/// `GET /v1/subjects/{subject}/limits`
pub(super) async fn limits(
    State(app): State<App>,
    ApiPath(subject): ApiPath,
    ApiQuery(q): ApiQuery<FreshQuery>,
) -> ApiResult {
    app.subject(&subject)?;
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let limits = app.store.limits_of(&subject);
    Ok(Json(
        json!({ "subject": subject, "limits": limits, "revision": revision.to_string() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckLimitQuery {
    subject: String,
    limit: String,
    usage: String,
    at_least: Option<TokenRepr>,
}

/// `GET /v1/check-limit?subject=&limit=&usage=`: allowed while usage < limit. A subject
/// without that limit is not allowed (`"limit": null`): limits fail closed.
pub(super) async fn check_limit(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<CheckLimitQuery>,
) -> ApiResult {
    app.subject(&q.subject)?;
    identifier("limit", &q.limit, false)?;
    // A count of what is in use: a negative one is a caller's bug, which `usage < limit`
    // would have answered "allowed".
    let usage: i64 = whole("usage", &q.usage, (0, i64::MAX))?;
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let limit = app.store.limit(&q.subject, &q.limit);
    let allowed = limit.is_some_and(|limit| usage < limit);
    Ok(Json(
        json!({ "allowed": allowed, "limit": limit, "revision": revision.to_string() }),
    ))
}

/// `GET /v1/status`
pub(super) async fn status(State(app): State<App>) -> ApiResult {
    let report = app.status.report();
    let counts = app.store.counts();
    let revision = app.store.watermark().to_string();
    Ok(Json(json!({
        "ready": app.status.is_ready(app.config.ready_max_lag.as_secs_f64()),
        "version": env!("CARGO_PKG_VERSION"),
        "shard": app.config.shard.to_string(),
        "revision": revision,
        "watermark": revision,
        "tuples": counts.tuples,
        "subjects": counts.subjects,
        "limits": counts.limits,
        "connected": report.connected,
        "loaded": report.loaded,
        "lag_seconds": report.lag_seconds,
        "snapshot": app.store.seen().to_string(),
        "last_full_load_at": report.last_full_load_at,
        "last_full_load_ms": report.last_full_load_ms,
        "last_full_load_reason": report.last_full_load_reason,
        "reloads": report.reloads,
        "full_load_running": report.full_load_running,
        "compactions": report.compactions,
        "last_compaction_ms": report.last_compaction_ms,
        "reconnects": report.reconnects,
        "polls": report.polls,
        "following": report.following,
        "busy_polling": report.busy_polling,
        "busy_polling_started": report.busy_polling_started,
        "standby": report.standby,
        "standby_lag_seconds": report.standby_lag_seconds,
        "clock_skew_seconds": report.clock_skew_seconds,
        "changelog_bytes": report.changelog_bytes,
        "notified_changes": report.notified_changes,
        "refused_notifications": report.refused_notifications,
        "dropped_notifications": report.dropped_notifications,
        "last_error": report.last_error,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DigestQuery {
    at_least: Option<TokenRepr>,
    /// `subject`: one digest per subject instead of one for everything.
    by: Option<String>,
}

/// `GET /v1/digest[?at_least=][&by=subject]`: walks every row, so it runs on a blocking
/// thread.
pub(super) async fn digest(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<DigestQuery>,
) -> Result<Response, ApiError> {
    let by_subject = match q.by.as_deref() {
        None | Some("") => false,
        Some("subject") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`by` must be `subject`, got {other:?}"
            )))
        }
    };
    app.fresh(q.at_least.as_ref()).await?;
    // Read the revision before the digest: the state can only be newer than it.
    let revision = app.store.watermark().to_string();
    let store = app.store.clone();
    blocking_answer(&app, move || {
        if by_subject {
            let mut subjects = store.subject_digests();
            subjects.sort_unstable();
            DigestAnswer::BySubject {
                revision,
                subjects: Pairs(subjects),
            }
        } else {
            DigestAnswer::Whole {
                digest: store.digest(),
                revision,
            }
        }
    })
    .await
}

/// The answer of `digest`, its fields in alphabetical order, as `json!` wrote them.
#[derive(Serialize)]
#[serde(untagged)]
enum DigestAnswer {
    Whole { digest: String, revision: String },
    BySubject { revision: String, subjects: Pairs },
}

/// (key, value) pairs written as one JSON object, in their order (`json!` built a map of
/// them first: a string and a `Value` copied for each of millions of subjects).
struct Pairs(Vec<(String, String)>);

impl Serialize for Pairs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, value)| (key, value)))
    }
}

/// The answer of `rows`, its fields in alphabetical order, as `json!` wrote them.
#[derive(Serialize)]
struct RowsAnswer {
    limits: Vec<(String, i64)>,
    revision: String,
    subject: String,
    tuples: Vec<(String, String, Option<i64>)>,
}

/// `GET /v1/subjects/{subject}/rows`: every stored row, expired ones included (for
/// `permd verify`). Made and written on a blocking thread: a subject of a million objects
/// has a million rows, each read, named and sorted.
pub(super) async fn rows(
    State(app): State<App>,
    ApiPath(subject): ApiPath,
    ApiQuery(q): ApiQuery<FreshQuery>,
) -> Result<Response, ApiError> {
    app.subject(&subject)?;
    let revision = app.fresh(q.at_least.as_ref()).await?;
    let store = app.store.clone();
    blocking_answer(&app, move || {
        let rows = store.rows_of(&subject);
        RowsAnswer {
            limits: rows.limits,
            revision: revision.to_string(),
            subject,
            tuples: rows.tuples,
        }
    })
    .await
}

/// `GET /livez`: the process answers.
pub(super) async fn livez() -> impl IntoResponse {
    Json(json!({ "live": true }))
}

/// `GET /readyz`: 200 once loaded and recently caught up, else 503.
pub(super) async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let ready = app.status.is_ready(app.config.ready_max_lag.as_secs_f64());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "lag_seconds": app.status.lag_seconds(),
        })),
    )
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics
            .render(&app.store, &app.status, app.config.shard, app.in_flight()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::sync::Status;
    use std::time::Duration;

    /// The handler state with `max_blocking_answers` and the request timeout given.
    fn app(max_blocking_answers: usize, request_timeout: Duration) -> App {
        let config = super::super::HttpConfig {
            max_blocking_answers,
            request_timeout,
            ..Default::default()
        };
        App::new(Store::new(), Status::default(), config)
    }

    /// An answer made on a blocking thread that panics, or that does not serialize, is a
    /// 500 `internal` (it was a 503 `timeout`, which asks the caller to retry), and lets
    /// go of its turn; one that is made is a 200 with its JSON.
    #[tokio::test]
    async fn a_failed_blocking_answer_is_an_internal_error() {
        struct Unwritable;
        impl Serialize for Unwritable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("on purpose"))
            }
        }
        let app = app(1, Duration::from_secs(10));
        let panicked = blocking_answer(&app, || -> u8 { panic!("on purpose") }).await;
        assert!(matches!(panicked, Err(ApiError::Internal)), "{panicked:?}");
        let unwritable = blocking_answer(&app, || Unwritable).await;
        assert!(
            matches!(unwritable, Err(ApiError::Internal)),
            "{unwritable:?}"
        );
        let made = blocking_answer(&app, || [7]).await.expect("made");
        assert_eq!(made.status(), StatusCode::OK);
        let body = axum::body::to_bytes(made.into_body(), 64)
            .await
            .expect("body");
        assert_eq!(&body[..], b"[7]");
        assert_eq!(
            ApiError::Internal.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    /// At most `max_blocking_answers` answers are made at once: one more waits for a
    /// turn, and is answered 503 `overloaded` once the request timeout has passed; the
    /// turn, let go, serves the next.
    #[tokio::test]
    async fn answers_made_on_blocking_threads_take_turns() {
        let app = app(1, Duration::from_millis(100));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let app = app.clone();
            async move { blocking_answer(&app, move || held.recv().map_or(0, |()| 1)).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.blocking.available_permits() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first never took its turn"
            );
            tokio::task::yield_now().await;
        }
        let second = blocking_answer(&app, || 2).await;
        assert!(matches!(second, Err(ApiError::Overloaded)), "{second:?}");
        release.send(()).expect("the first waits");
        let first = first.await.expect("no panic").expect("the first is made");
        let body = axum::body::to_bytes(first.into_body(), 64)
            .await
            .expect("body");
        assert_eq!(&body[..], b"1");
        let third = blocking_answer(&app, || 3)
            .await
            .expect("the turn is free again");
        assert_eq!(third.status(), StatusCode::OK);
    }
}
