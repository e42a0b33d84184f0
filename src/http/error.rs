//! `ApiError` and the extractors that turn every rejection into a JSON 4xx.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

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
            Self::Stale { .. } | Self::Timeout | Self::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::Overloaded) {
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

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(value)| Self(value))
            .map_err(|e: JsonRejection| ApiError::Invalid {
                status: e.status(),
                message: e.body_text(),
            })
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
