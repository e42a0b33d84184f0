//! `ApiError` and the extractors that turn every rejection into a JSON 4xx.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::shard::Shard;
use crate::store::Xid;

/// Every error the API answers. None leaks internals; none is a 500 for bad input.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: `message` says how.
    #[error("{message}")]
    Invalid {
        /// 400, 413, 415 or 422.
        status: StatusCode,
        /// What was wrong, for the caller.
        message: String,
    },
    /// Missing or wrong bearer token.
    #[error("unauthorized")]
    Unauthorized,
    /// No such route.
    #[error("not found")]
    NotFound,
    /// The route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `at_least` was not reached within the wait bound.
    #[error("stale")]
    Stale {
        /// The watermark when the wait gave up.
        revision: Xid,
    },
    /// The request took longer than the configured timeout.
    #[error("timeout")]
    Timeout,
    /// Too many requests in flight; retry shortly.
    #[error("overloaded")]
    Overloaded,
    /// The set has not been loaded from Postgres yet (the daemon just started, or cannot
    /// reach the database): every answer would be a denial. Retry shortly.
    #[error("loading")]
    Loading,
    /// The mirror has not caught up with Postgres for longer than `--answer-max-lag-ms`
    /// (fail closed): it could miss committed writes.
    #[error("behind")]
    Behind {
        /// Seconds since it last caught up; `None` if it has not since its load.
        lag_seconds: Option<f64>,
    },
    /// The subject belongs to another shard (`--shard`): the router sent it to the wrong
    /// daemon.
    #[error("misdirected")]
    Misdirected {
        /// Where the subject was, e.g. `subject` or `checks[3].subject`.
        field: String,
        /// The shard this daemon mirrors.
        shard: Shard,
        /// The shard the subject belongs to.
        owner: Shard,
    },
    /// permd failed to make its answer (a bug: the answer panicked or did not serialize);
    /// the daemon's log says how. Nothing else is affected.
    #[error("internal")]
    Internal,
}

impl ApiError {
    /// A 400 with this message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::Invalid {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { status, .. } => *status,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Stale { .. }
            | Self::Timeout
            | Self::Overloaded
            | Self::Loading
            | Self::Behind { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            Self::Stale { revision } => json!({
                "error": "stale",
                "message": "the requested write is not applied yet; retry",
                "revision": revision.to_string(),
            }),
            Self::Misdirected {
                field,
                shard,
                owner,
            } => json!({
                "error": "misdirected",
                "message": format!(
                    "the {field} belongs to shard {owner}; this permd mirrors shard {shard} \
                     (a subject's shard: the first 4 bytes of the MD5 of its UTF-8, \
                     big-endian, modulo the number of shards)"
                ),
                "shard": shard.to_string(),
                "owner": owner.to_string(),
            }),
            Self::Loading => json!({
                "error": "loading",
                "message": "permd has not loaded the set from Postgres yet; retry shortly \
                            (/readyz answers 200 once it has, /v1/status says why not)",
            }),
            Self::Behind { lag_seconds } => json!({
                "error": "behind",
                "message": format!(
                    "permd has not caught up with Postgres for {}, over --answer-max-lag-ms: \
                     its answer could miss committed writes; retry, or ask another daemon \
                     (/v1/status says why)",
                    lag_seconds.map_or("as long as it has run".to_owned(), |s| format!("{s:.1} s"))
                ),
                "lag_seconds": lag_seconds,
            }),
            Self::Internal => json!({
                "error": "internal",
                "message": "permd failed to make this answer (a bug; its log says how); \
                            other requests are not affected",
            }),
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::Overloaded | Self::Loading | Self::Behind { .. }) {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// `Query<T>` whose rejection is a JSON 400.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // The form decoder replaces invalid UTF-8 with U+FFFD; we refuse it instead, so a
        // garbled identifier is an error and never a silent "denied".
        if let Some(query) = parts.uri.query() {
            strict_form_utf8(query)?;
        }
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Checks that every key and value of a form-encoded query decodes to valid UTF-8
/// (`%XX` escapes decoded; a `%` without two hex digits is kept literally, as the form
/// decoder does).
pub(crate) fn strict_form_utf8(query: &str) -> Result<(), ApiError> {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = query.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i + 1..i + 3) {
            Some(&[h, l]) if bytes[i] == b'%' => {
                hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8)
            }
            _ => None,
        };
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                // '&' and '=' separate fields; they cannot split a multi-byte character,
                // so checking the whole decoded string at once is equivalent.
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    match std::str::from_utf8(&decoded) {
        Ok(_) => Ok(()),
        Err(_) => Err(ApiError::bad_request(
            "the query string is not valid UTF-8 once percent-decoded",
        )),
    }
}

/// `Path<String>` (one segment) whose rejection is a JSON 400.
pub(crate) struct ApiPath(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `Json<T>` whose rejection keeps its status (400, 413, 415, 422) with a JSON body.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    /// Decodes as axum's `Json` does, with the same answer to every bad request, but the
    /// common request (`Content-Type: application/json`, a body that decodes) is decoded by
    /// serde_json alone: `Json` tracks the path of every value it decodes, for the message
    /// of an error (serde_path_to_error), which was a fifth of a batch's CPU
    /// (benches/README.md). `Json` still judges every other content type and writes every
    /// error, from the same bytes.
    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let rejected = |e: JsonRejection| ApiError::Invalid {
            status: e.status(),
            // A body sent without a length, over the limit once read that far (one that
            // says its length is refused before it is read, by the `guard` layer).
            message: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "the body is over the limit (--body-limit)".to_owned()
            } else {
                e.body_text()
            },
        };
        let plain = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !plain {
            return Json::<T>::from_request(request, state)
                .await
                .map(|Json(value)| Self(value))
                .map_err(rejected);
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| rejected(e.into()))?;
        match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(Self(value)),
            Err(_) => Json::<T>::from_bytes(&bytes)
                .map(|Json(value)| Self(value))
                .map_err(rejected),
        }
    }
}

/// The longest identifier (subject, object, permission, limit name), in bytes.
pub(crate) const MAX_IDENTIFIER: usize = 1024;

/// Whether `value` is a valid identifier: at most 1,024 bytes, and not empty unless
/// `may_be_empty`. `identifier` says what is wrong when it is not.
pub(crate) fn is_identifier(value: &str, may_be_empty: bool) -> bool {
    value.len() <= MAX_IDENTIFIER && (may_be_empty || !value.is_empty())
}

/// Validates one identifier: at most 1,024 bytes, and not empty unless `may_be_empty`.
pub(crate) fn identifier<'a>(
    field: &str,
    value: &'a str,
    may_be_empty: bool,
) -> Result<&'a str, ApiError> {
    if value.is_empty() && !may_be_empty {
        return Err(ApiError::bad_request(format!(
            "`{field}` must not be empty"
        )));
    }
    if value.len() > MAX_IDENTIFIER {
        return Err(ApiError::bad_request(format!(
            "`{field}` is {} bytes long; at most {MAX_IDENTIFIER} are allowed",
            value.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde_json::Value;

    /// The shape of a batch, comparable.
    #[derive(Debug, PartialEq, Deserialize)]
    struct Batch {
        checks: Vec<Item>,
        at_least: Option<Value>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Item {
        subject: String,
        permission: String,
        #[serde(default)]
        object: String,
    }

    /// What an extractor made of a request: the value, or the status and message.
    type Outcome = Result<Batch, (StatusCode, String)>;

    fn request(content_type: Option<&str>, body: &[u8]) -> Request {
        let mut request = Request::builder().method("POST").uri("/v1/check");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request
            .body(Body::from(body.to_vec()))
            .unwrap_or_else(|e| panic!("request: {e}"))
    }

    /// `ApiJson`'s outcome and axum's `Json`'s for the same request.
    fn both(content_type: Option<&str>, body: &[u8]) -> (Outcome, Outcome) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        runtime.block_on(async {
            let ours = match ApiJson::<Batch>::from_request(request(content_type, body), &()).await
            {
                Ok(ApiJson(batch)) => Ok(batch),
                Err(ApiError::Invalid { status, message }) => Err((status, message)),
                Err(other) => panic!("unexpected {other:?}"),
            };
            let axum = Json::<Batch>::from_request(request(content_type, body), &())
                .await
                .map(|Json(batch)| batch)
                .map_err(|e| (e.status(), e.body_text()));
            (ours, axum)
        })
    }

    /// A JSON value that is often a string, sometimes not.
    fn field() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => "[a-z:*]{0,6}".prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => Just(Value::Null),
            1 => Just(serde_json::json!(["x"])),
        ]
    }

    /// A body shaped like a batch, with wrong types, missing and extra fields, and
    /// trailing bytes now and then.
    fn batch_text() -> impl Strategy<Value = Vec<u8>> {
        let item = (field(), field(), prop::option::of(field()), any::<bool>()).prop_map(
            |(subject, permission, object, drop_subject)| {
                let mut item = serde_json::Map::new();
                if !drop_subject {
                    item.insert("subject".into(), subject);
                }
                item.insert("permission".into(), permission);
                if let Some(object) = object {
                    item.insert("object".into(), object);
                }
                Value::Object(item)
            },
        );
        (
            prop::collection::vec(item, 0..4),
            prop::option::of(field()),
            prop_oneof![Just(""), Just(" "), Just("x"), Just("}"), Just("\n")],
        )
            .prop_map(|(checks, at_least, tail)| {
                let mut body = serde_json::json!({ "checks": checks });
                if let Some(at_least) = at_least {
                    body["at_least"] = at_least;
                }
                let mut text = body.to_string().into_bytes();
                text.extend_from_slice(tail.as_bytes());
                text
            })
    }

    proptest! {
        /// `ApiJson` decodes what axum's `Json` decodes and refuses the rest with the same
        /// status and message, whatever the content type.
        #[test]
        fn api_json_answers_as_axum_json_does(
            content_type in prop::option::of(prop_oneof![
                Just("application/json"),
                Just("Application/JSON"),
                Just("application/json; charset=utf-8"),
                Just("application/problem+json"),
                Just("text/plain"),
                Just("application/jsonx"),
            ]),
            body in prop_oneof![
                3 => batch_text(),
                1 => prop::collection::vec(any::<u8>(), 0..64),
            ],
        ) {
            let (ours, axum) = both(content_type, &body);
            prop_assert_eq!(ours, axum);
        }
    }

    #[test]
    fn the_comparison_sees_both_outcomes() {
        // A decoded batch and a refused one, so the property above compares both kinds.
        let (ours, axum) = both(
            Some("application/json"),
            br#"{"checks":[{"subject":"u","permission":"p"}]}"#,
        );
        assert_eq!(ours, axum);
        assert!(ours.is_ok());
        let (ours, axum) = both(Some("application/json"), br#"{"checks":[{"subject":1}]}"#);
        assert_eq!(ours, axum);
        assert!(ours.is_err_and(
            |(status, message)| status == StatusCode::UNPROCESSABLE_ENTITY
                && message.contains("checks[0].subject")
        ));
    }
}
