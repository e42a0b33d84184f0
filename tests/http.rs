//! The HTTP API on its own: every route's bad inputs get a JSON 4xx, never a 5xx or a
//! panic; auth; readiness. Driven through `Api::oneshot()` (the fast path, then the router) over a store built in
//! memory (the sync side is covered by tests/sync.rs); and over sockets (`mod wire`), where
//! the server's own loop for plain checks must answer byte for byte as hyper alone does.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{send, DEADLINE};
use permd::http::{Api, App, HttpConfig, Token};
use permd::store::Store;
use permd::sync::Status;
use serde_json::{json, Value};

fn app(config: HttpConfig) -> Api {
    Api::new(app_state(config))
}

/// The handler state over a small store.
fn app_state(config: HttpConfig) -> App {
    let store = Store::from_tuples([
        ("u1", "doc:1", "read", None),
        ("u1", "", "EXPORT", None),
        ("*", "doc:pub", "read", None),
    ]);
    App::new(store, Status::default(), config)
}

fn quick() -> HttpConfig {
    HttpConfig {
        max_wait: Duration::from_millis(20),
        max_batch: 100,
        body_limit: 64 * 1024,
        ..HttpConfig::default()
    }
}

async fn get(api: &Api, uri: &str) -> (StatusCode, Value) {
    send(api, Request::get(uri).body(Body::empty()).expect("request")).await
}

async fn post(
    api: &Api,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::post(uri);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    send(api, request.body(body.into()).expect("request")).await
}

fn assert_json_error(status: StatusCode, body: &Value, expected: StatusCode, context: &str) {
    assert_eq!(status, expected, "{context}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{context}: no JSON error in {body}"
    );
}

#[tokio::test]
async fn good_requests_answer_from_the_store() {
    let r = app(quick());
    let (status, body) = get(&r, "/v1/check?subject=u1&permission=read&object=doc:1").await;
    assert_eq!(
        (status, body["allowed"].clone()),
        (StatusCode::OK, json!(true))
    );
    let (_, body) = get(&r, "/v1/check?subject=u2&permission=read&object=doc:pub").await;
    assert_eq!(body["allowed"], true);
    let (_, body) = get(&r, "/v1/check?subject=u1&permission=EXPORT").await;
    assert_eq!(body["allowed"], true);
    let (status, body) = post(
        &r,
        "/v1/check",
        Some("application/json"),
        json!({"checks": [{"subject": "u1", "permission": "read", "object": "doc:1"}, {"subject": "u1", "permission": "write"}]}).to_string(),
    )
    .await;
    assert_eq!(
        (status, body["results"].clone()),
        (StatusCode::OK, json!([true, false])),
        "{body}"
    );
    let (status, body) = get(
        &r,
        "/v1/check?subject=u1&permission=read&object=doc:1&at_least=",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "an empty token means none: {body}");
    for token in [json!(""), Value::Null] {
        let batch = json!({"checks": [{"subject": "u1", "permission": "read"}], "at_least": token});
        let (status, body) =
            post(&r, "/v1/check", Some("application/json"), batch.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{token} means no token: {body}");
    }
}

/// A listing a page at a time: each page sorted and after the one before, `next` the
/// `after` of the following page and null after the last, the pages together the whole
/// listing (the public object of `*` among them), whatever the page's size.
#[tokio::test]
async fn objects_are_listed_a_page_at_a_time() {
    let mut tuples: Vec<(String, String)> = (0..25)
        .map(|i| ("u1".to_owned(), format!("doc:{i:02}")))
        .collect();
    tuples.push(("*".to_owned(), "doc:10".to_owned()));
    tuples.push(("*".to_owned(), "doc:pub".to_owned()));
    let store = Store::from_tuples(
        tuples
            .iter()
            .map(|(s, o)| (s.as_str(), o.as_str(), "read", None)),
    );
    let r = Api::new(App::new(store, Status::default(), quick()));
    let (status, whole) = get(&r, "/v1/subjects/u1/objects?permission=read").await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let mut expected: Vec<String> = (0..25).map(|i| format!("doc:{i:02}")).collect();
    expected.push("doc:pub".to_owned());
    assert_eq!(whole["objects"], json!(expected));
    assert_eq!(whole["next"], Value::Null, "no limit: one page");
    for limit in [1, 2, 7, 25, 26, 100] {
        let mut listed: Vec<String> = Vec::new();
        let mut after = String::new();
        let mut pages = 0;
        loop {
            let (status, page) = get(
                &r,
                &format!("/v1/subjects/u1/objects?permission=read&limit={limit}&after={after}"),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            pages += 1;
            let objects: Vec<String> =
                serde_json::from_value(page["objects"].clone()).expect("a list of names");
            assert!(objects.len() <= limit, "limit {limit}: {page}");
            listed.extend(objects.iter().cloned());
            match page["next"].as_str() {
                Some(next) => {
                    assert_eq!(Some(next), objects.last().map(String::as_str), "{page}");
                    after = next.to_owned();
                }
                None => break,
            }
            assert!(pages <= expected.len(), "limit {limit}: no end");
        }
        assert_eq!(listed, expected, "limit {limit}");
        assert_eq!(
            pages,
            expected.len().div_ceil(limit).max(1),
            "limit {limit}"
        );
    }
    // `after` need not be a listed name, and past the last name the page is empty.
    let (_, page) = get(
        &r,
        "/v1/subjects/u1/objects?permission=read&limit=2&after=doc:095",
    )
    .await;
    assert_eq!(page["objects"], json!(["doc:10", "doc:11"]));
    assert_eq!(page["next"], "doc:11");
    let (_, page) = get(&r, "/v1/subjects/u1/objects?permission=read&after=doc:zzz").await;
    assert_eq!(
        (page["objects"].clone(), page["next"].clone()),
        (json!([]), Value::Null)
    );
}

#[tokio::test]
async fn every_route_rejects_bad_input_with_a_json_4xx() {
    let r = app(quick());
    let long = "x".repeat(1025);
    let bad = StatusCode::BAD_REQUEST;
    let cases: Vec<(String, StatusCode)> = vec![
        ("/v1/check?permission=read".into(), bad),
        ("/v1/check?subject=u1".into(), bad),
        ("/v1/check?subject=&permission=read".into(), bad),
        ("/v1/check?subject=u1&permission=".into(), bad),
        (format!("/v1/check?subject={long}&permission=read"), bad),
        (
            format!("/v1/check?subject=u1&permission=read&object={long}"),
            bad,
        ),
        (
            "/v1/check?subject=u1&permission=read&at_least=abc".into(),
            bad,
        ),
        (
            "/v1/check?subject=u1&permission=read&at_least=-1".into(),
            bad,
        ),
        ("/v1/check?subject=%FF%FE&permission=read".into(), bad),
        (
            "/v1/check?subject=u1&permission=read&object=%C3%28".into(),
            bad,
        ),
        ("/v1/subjects/%FF/permissions".into(), bad),
        (format!("/v1/subjects/{long}/permissions"), bad),
        (format!("/v1/subjects/u1/permissions?object={long}"), bad),
        ("/v1/subjects/u1/objects".into(), bad),
        ("/v1/subjects/u1/objects?permission=".into(), bad),
        ("/v1/subjects/%FF/objects?permission=read".into(), bad),
        (
            "/v1/subjects/u1/objects?permission=read&limit=0".into(),
            bad,
        ),
        (
            "/v1/subjects/u1/objects?permission=read&limit=-1".into(),
            bad,
        ),
        (
            "/v1/subjects/u1/objects?permission=read&limit=ten".into(),
            bad,
        ),
        (
            "/v1/subjects/u1/objects?permission=read&limit=99999999999999999999999".into(),
            bad,
        ),
        (
            format!("/v1/subjects/u1/objects?permission=read&after={long}"),
            bad,
        ),
        ("/v1/subjects/%FF/limits".into(), bad),
        ("/v1/subjects/u1/limits?at_least=x".into(), bad),
        ("/v1/check-limit?subject=u1&limit=projects".into(), bad),
        (
            "/v1/check-limit?subject=u1&limit=projects&usage=lots".into(),
            bad,
        ),
        (
            "/v1/check-limit?subject=u1&limit=projects&usage=99999999999999999999".into(),
            bad,
        ),
        (
            "/v1/check-limit?subject=u1&limit=projects&usage=-1".into(),
            bad,
        ),
        ("/v1/check-limit?subject=u1&usage=1".into(), bad),
        ("/v1/digest?at_least=nope".into(), bad),
        // A parameter the route does not know: a misspelled `at_least` must not leave a
        // check without its read-your-writes.
        (
            "/v1/check?subject=u1&permission=read&at_leats=5".into(),
            bad,
        ),
        ("/v1/check?subject=u1&permission=read&_=1".into(), bad),
        ("/v1/subjects/u1/permissions?objet=doc:1".into(), bad),
        ("/v1/subjects/u1/objects?permission=read&limt=5".into(), bad),
        ("/v1/subjects/u1/limits?at_leats=5".into(), bad),
        (
            "/v1/check-limit?subject=u1&limit=projects&usage=1&at_leats=5".into(),
            bad,
        ),
        ("/v1/digest?by=subject&at_leats=5".into(), bad),
        ("/v1/nope".into(), StatusCode::NOT_FOUND),
        ("/".into(), StatusCode::NOT_FOUND),
        ("/v1/subjects//permissions".into(), bad),
    ];
    for (uri, expected) in cases {
        let (status, body) = get(&r, &uri).await;
        assert_json_error(status, &body, expected, &uri[..uri.len().min(80)]);
    }
    // An unknown parameter is named, with those the route knows.
    let (_, body) = get(&r, "/v1/check?subject=u1&permission=read&at_leats=5").await;
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("unknown field `at_leats`") && error.contains("`at_least`"),
        "{error}"
    );
    // A number too large says the largest allowed.
    let (_, body) = get(&r, "/v1/check-limit?subject=u1&limit=seats&usage=1e3").await;
    assert_eq!(
        body["error"],
        format!(
            "`usage` must be a whole number from 0 to {}, got \"1e3\"",
            i64::MAX
        )
    );
    let too_many = "99999999999999999999999";
    let uri = format!("/v1/subjects/u1/objects?permission=read&limit={too_many}");
    let (_, body) = get(&r, &uri).await;
    assert_eq!(
        body["error"],
        format!(
            "`limit` must be a whole number from 1 to {}, got \"{too_many}\"",
            usize::MAX
        )
    );

    let (status, body) = send(
        &r,
        Request::delete("/v1/check")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_json_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "DELETE /v1/check",
    );
    let (status, body) = post(&r, "/v1/status", Some("application/json"), "{}").await;
    assert_json_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "POST /v1/status",
    );
}

#[tokio::test]
async fn batch_bodies_are_validated() {
    let r = app(quick());
    let json_type = Some("application/json");
    let too_many =
        json!({"checks": vec![json!({"subject": "u", "permission": "p"}); 101]}).to_string();
    // Deep nesting where a check is expected is refused at the first level...
    let deep_checks = format!(
        "{{\"checks\": {}{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    // ...and in an unknown field it is refused at its name, without recursion: no stack
    // overflow.
    let deep = format!(
        "{{\"checks\": [], \"pad\": {}{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let cases: Vec<(&str, Option<&str>, String, StatusCode)> = vec![
        ("bad json", json_type, "{".into(), StatusCode::BAD_REQUEST),
        (
            "not json at all",
            json_type,
            "\u{0}\u{1}".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "no content type",
            None,
            "{\"checks\": []}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "wrong content type",
            Some("text/plain"),
            "{\"checks\": []}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "missing checks",
            json_type,
            "{}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "checks not a list",
            json_type,
            "{\"checks\": 5}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing permission",
            json_type,
            "{\"checks\": [{\"subject\": \"u\"}]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "empty subject",
            json_type,
            "{\"checks\": [{\"subject\": \"\", \"permission\": \"p\"}]}".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad token",
            json_type,
            "{\"checks\": [], \"at_least\": \"soon\"}".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "negative token",
            json_type,
            "{\"checks\": [], \"at_least\": -3}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "too many checks",
            json_type,
            too_many,
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "a misspelled token",
            json_type,
            "{\"checks\": [], \"at_leats\": \"5\"}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "an unknown field in a check",
            json_type,
            "{\"checks\": [{\"subject\": \"u\", \"permission\": \"p\", \"objet\": \"o\"}]}".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "deep nesting in an unknown field",
            json_type,
            deep,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "deep nesting in checks",
            json_type,
            deep_checks,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "body over the limit",
            json_type,
            format!("{{\"checks\": [], \"pad\": \"{}\"}}", "x".repeat(70_000)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (what, content_type, body, expected) in cases {
        let (status, answer) = post(&r, "/v1/check", content_type, body).await;
        assert_json_error(status, &answer, expected, what);
        if what == "body over the limit" {
            assert_eq!(answer["error"], "the body is over the limit (--body-limit)");
        }
        if what == "a misspelled token" {
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(error.contains("unknown field `at_leats`"), "{error}");
        }
        if what == "negative token" {
            // What a token is, and no type of the daemon's own.
            let error = answer["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(
                    "at_least: invalid type: integer `-3`, expected a token from \
                     permd.write_token() (its text, or the same unsigned integer)"
                ),
                "{error}"
            );
        }
    }
    let invalid_utf8 = vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'];
    let (status, answer) = post(&r, "/v1/check", json_type, invalid_utf8).await;
    assert_json_error(status, &answer, StatusCode::BAD_REQUEST, "invalid UTF-8");
}

#[tokio::test]
async fn batch_errors_name_the_check_and_its_field() {
    let r = app(quick());
    let long = "x".repeat(1025);
    let cases = [
        (
            json!([{"subject": "u", "permission": "p"}, {"subject": "u", "permission": ""}]),
            "`checks[1].permission` must not be empty",
        ),
        (
            json!([{"subject": "", "permission": "p"}]),
            "`checks[0].subject` must not be empty",
        ),
        (
            json!([{"subject": "u", "permission": "p"}, {"subject": "u", "permission": "p"}, {"subject": "u", "permission": "p", "object": long}]),
            "`checks[2].object` is 1025 bytes long",
        ),
    ];
    for (checks, expected) in cases {
        let body = json!({ "checks": checks }).to_string();
        let (status, answer) = post(&r, "/v1/check", Some("application/json"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(expected),
            "{message:?} for {expected:?}"
        );
    }
}

/// Before the first full load the store is empty, and every answer from it would be a
/// denial: each read route answers 503 `loading` (with `Retry-After`) instead, on the fast
/// path, through the router and in the server's own loop; a token waits as ever and is
/// stale. The probes, the status and the metrics answer.
#[tokio::test]
async fn nothing_is_answered_before_the_first_load() {
    let unloaded = || App::new(Store::new(), Status::default(), quick());
    let r = Api::new(unloaded());
    let batch = json!({"checks": [{"subject": "u1", "permission": "read"}]}).to_string();
    for uri in [
        "/v1/check?subject=u1&permission=read&object=doc:1",
        "/v1/check?subject=u1&permission=EXPORT",
        "/v1/subjects/u1/permissions",
        "/v1/subjects/u1/objects?permission=read",
        "/v1/subjects/u1/limits",
        "/v1/check-limit?subject=u1&limit=seats&usage=1",
        "/v1/digest",
    ] {
        let (status, body) = get(&r, uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert_eq!(body["error"], "loading", "{uri}: {body}");
    }
    let (status, body) = post(&r, "/v1/check", Some("application/json"), batch.clone()).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("loading"))
    );
    let (status, body) = get(&r, "/v1/check?subject=u1&permission=read&at_least=1").await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("stale"))
    );
    for (uri, expected) in [
        ("/livez", StatusCode::OK),
        ("/readyz", StatusCode::SERVICE_UNAVAILABLE),
        ("/v1/status", StatusCode::OK),
    ] {
        assert_eq!(get(&r, uri).await.0, expected, "{uri}");
    }
    // Each refusal counted once, though the fast path asked first.
    let (_, metrics) = get(&r, "/metrics").await;
    let metrics = metrics.as_str().expect("text");
    assert!(metrics.contains("\npermd_loading_total 8\n"), "{metrics}");
    assert!(metrics.contains("\npermd_behind_total 0\n"), "{metrics}");
    unanswered_over_a_socket(unloaded(), "loading").await;
}

/// Over a socket, the server's own loop declines a plain check and a batch that `app`
/// may not answer, and the router's 503 `error` says when to retry.
async fn unanswered_over_a_socket(app: App, error: &str) {
    let (addr, shutdown, served) = wire::permd(app, permd::http::ServerLimits::default()).await;
    let batch = json!({"checks": [{"subject": "u1", "permission": "read"}]}).to_string();
    for request in [
        "GET /v1/check?subject=u1&permission=read HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            .to_owned(),
        format!(
            "POST /v1/check HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{batch}",
            batch.len()
        ),
    ] {
        let answer = wire::exchange(addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
        assert!(
            answer.contains(&format!("\"error\":\"{error}\"")),
            "{answer}"
        );
    }
    shutdown.cancel();
    served.await.expect("the server stops");
}

/// With `--answer-max-lag-ms`, a mirror that has not caught up for that long answers no
/// read route (503 `behind`), on the fast path and through the router, and the server's
/// own loop declines it too. (`faults.rs` shows it with Postgres stopped, then back.)
#[tokio::test]
async fn a_fail_closed_mirror_that_never_caught_up_answers_behind() {
    let config = HttpConfig {
        answer_max_lag: Some(Duration::from_secs(5)),
        ..quick()
    };
    // Loaded, and never caught up since (its status was never told).
    let r = app(config.clone());
    for uri in [
        "/v1/check?subject=u1&permission=read&object=doc:1",
        "/v1/subjects/u1/permissions",
    ] {
        let (status, body) = get(&r, uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert_eq!(body["error"], "behind", "{uri}: {body}");
        assert_eq!(body["lag_seconds"], Value::Null, "{uri}: {body}");
    }
    let (_, metrics) = get(&r, "/metrics").await;
    let metrics = metrics.as_str().expect("text");
    assert!(metrics.contains("\npermd_behind_total 2\n"), "{metrics}");
    unanswered_over_a_socket(app_state(config), "behind").await;
}

#[tokio::test]
async fn a_token_not_reached_in_time_is_a_503_stale() {
    let r = app(quick());
    let (status, body) = get(
        &r,
        "/v1/check?subject=u1&permission=read&object=doc:1&at_least=5",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "stale");
    assert_eq!(body["revision"], "0");
}

#[tokio::test]
async fn a_configured_token_is_required_except_on_probes() {
    let config = HttpConfig {
        token: Token::new("s3cret-token"),
        ..quick()
    };
    let r = app(config);
    let with = |auth: Option<&str>| {
        let mut request = Request::get("/v1/check?subject=u1&permission=read&object=doc:1");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.body(Body::empty()).expect("request")
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("Bearer s3cret-token2"),
        Some("s3cret-token"),
    ] {
        let (status, body) = send(&r, with(auth)).await;
        assert_json_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            &format!("{auth:?}"),
        );
        assert!(
            !body.to_string().contains("s3cret"),
            "the token never appears in answers"
        );
    }
    let (status, _) = send(&r, with(Some("Bearer s3cret-token"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(&r, "/metrics").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&r, "/livez").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(&r, "/readyz").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "never loaded from Postgres"
    );
    // Without the token an unknown route or method is refused as a known one is: one
    // path is not told from another; with it, 404 and 405.
    for (method, uri, with_token) in [
        ("GET", "/v1/nope", StatusCode::NOT_FOUND),
        ("DELETE", "/v1/status", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/livez", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        for (auth, expected) in [
            (None, StatusCode::UNAUTHORIZED),
            (Some("Bearer wrong"), StatusCode::UNAUTHORIZED),
            (Some("Bearer s3cret-token"), with_token),
        ] {
            let mut request = Request::builder().method(method).uri(uri);
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let (status, body) = send(&r, request.body(Body::empty()).expect("request")).await;
            assert_json_error(status, &body, expected, &format!("{method} {uri} {auth:?}"));
        }
    }
}

#[tokio::test]
async fn metrics_and_status_describe_the_daemon() {
    let r = app(quick());
    get(&r, "/v1/check?subject=u1&permission=read&object=doc:1").await;
    get(&r, "/v1/check?subject=u1&permission=write&object=doc:1").await;
    let (status, text) = get(&r, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("text");
    for needle in [
        "permd_checks_total{result=\"allowed\"} 1",
        "permd_checks_total{result=\"denied\"} 1",
        "permd_check_duration_seconds_bucket{le=\"0.0001\"}",
        "permd_check_duration_seconds_count 2",
        "permd_tuples 3",
        "permd_subjects 2",
        // u1's two grants are packed: one 2 MiB chunk.
        "permd_packed_grant_bytes 2097152",
        "permd_lag_seconds -1",
        "permd_reloads_total 0",
        "permd_full_load_running_seconds -1",
        "permd_compactions_total 0",
        "permd_reconnects_total 0",
        "permd_polls_total 0",
        "permd_names_since_load 0",
        "permd_unused_packed_bytes 0",
        "permd_unused_heap_list_bytes 0",
        "permd_subjects_written_since_load 0",
        "permd_standby_lag_seconds -1",
        "permd_clock_skew_seconds NaN",
        "permd_changelog_bytes NaN",
        concat!(
            "permd_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1"
        ),
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let (status, body) = get(&r, "/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["ready"].clone(), body["tuples"].clone()),
        (json!(false), json!(3))
    );
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["standby_lag_seconds"], json!(null));
    assert_eq!(body["clock_skew_seconds"], json!(null));
    assert_eq!(
        (
            body["compactions"].clone(),
            body["last_compaction_ms"].clone()
        ),
        (json!(0), json!(0))
    );
}

/// Percent-encodes arbitrary bytes, so any byte string can travel in a URI.
fn escape(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// The property every answer must have: no 5xx (but a legitimate 503 `stale` for a
/// well-formed token the never-loaded store cannot reach), and a JSON error on a 4xx.
fn acceptable(status: StatusCode, body: &Value) -> Result<(), String> {
    let stale = status == StatusCode::SERVICE_UNAVAILABLE && body["error"] == "stale";
    if status.is_server_error() && !stale {
        return Err(format!("{status}: {body}"));
    }
    if status.is_client_error() && !body["error"].is_string() {
        return Err(format!("{status} without a JSON error: {body}"));
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Servers on sockets: permd's (`serve`: its own loop for plain checks, hyper for the rest)
/// and hyper alone serving the same `Api`, as permd served before the loop.
mod wire {
    use std::net::SocketAddr;

    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use permd::http::{serve, Api, App, ServerLimits};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    pub use crate::common::raw::{exchange, read_to_close};

    /// permd's server over `app`: its address, its shutdown and its task.
    pub async fn permd(
        app: App,
        limits: ServerLimits,
    ) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        permd_with(app, limits, None).await
    }

    /// As [`permd`], serving HTTPS with `tls` when given.
    pub async fn permd_with(
        app: App,
        limits: ServerLimits,
        tls: Option<std::sync::Arc<permd::http::ServerCerts>>,
    ) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let listener = permd::bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            listener,
            Api::new(app),
            limits,
            tls,
            shutdown.clone(),
        ));
        (addr, shutdown, served)
    }

    /// Hyper alone serving `app`'s `Api`; stops with the runtime.
    pub async fn hyper_alone(app: App) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let api = Api::new(app);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = TowerToHyperService::new(api.clone());
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        addr
    }

    /// hyper's empty answers to a head it refuses, after which it closes.
    const BARE: [&str; 3] = [
        "HTTP/1.1 400 Bad Request\r\n",
        "HTTP/1.1 414 URI Too Long\r\n",
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
    ];
    const BARE_REST: &str = "connection: close\r\ncontent-length: 0\r\ndate: *\r\n\r\n";

    /// Whether `ours` is `theirs` (hyper alone's answers), or `theirs` up to hyper's last,
    /// empty 400, 414 or 431 followed by permd's answer to the head hyper refused: the same
    /// status and `connection: close`, with a JSON error saying why.
    pub fn same_but_malformed(ours: &str, theirs: &str) -> bool {
        if ours == theirs {
            return true;
        }
        let Some((before, status)) = theirs.strip_suffix(BARE_REST).and_then(|rest| {
            BARE.iter()
                .find_map(|status| Some((rest.strip_suffix(status)?, status)))
        }) else {
            return false;
        };
        let Some(answer) = ours
            .strip_prefix(before)
            .and_then(|answer| answer.strip_prefix(status))
        else {
            return false;
        };
        let Some((head, body)) = answer.split_once("\r\n\r\n") else {
            return false;
        };
        let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
        head.starts_with("connection: close\r\n")
            && head.contains("\r\ncontent-type: application/json\r\n")
            && json.is_some_and(|json| {
                json["error"].as_str().is_some_and(|error| {
                    error.starts_with("malformed request: ")
                        || error.starts_with("request too large: ")
                })
            })
    }

    /// The value of the counter `name` in the server's `/metrics`.
    pub async fn counter(addr: SocketAddr, name: &str) -> u64 {
        let text = exchange(
            addr,
            b"GET /metrics HTTP/1.1\r\nhost: permd\r\nconnection: close\r\n\r\n",
        )
        .await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// Waits until the server (in this process) has read every byte `client` sent: in
    /// the kernel's table of sockets, the client's send queue is empty (all of it
    /// arrived) and so is the receive queue of the connection's other end.
    pub async fn read_by_server(client: &tokio::net::TcpStream) {
        let hex = |addr: SocketAddr| match addr {
            SocketAddr::V4(v4) => format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(v4.ip().octets()),
                v4.port()
            ),
            SocketAddr::V6(_) => unreachable!("the tests listen on IPv4"),
        };
        let local = hex(client.peer_addr().expect("peer"));
        let remote = hex(client.local_addr().expect("local"));
        crate::common::wait_until("the server reads what the client sent", || {
            let (local, remote) = (local.clone(), remote.clone());
            async move {
                let table = std::fs::read_to_string("/proc/self/net/tcp").expect("sockets");
                // The queue (0: send, 1: receive) of the socket from `from` to `to` is empty.
                let empty = |from: &str, to: &str, queue: usize| {
                    table.lines().skip(1).any(|row| {
                        let fields: Vec<&str> = row.split_whitespace().collect();
                        // local address, remote address, tx_queue:rx_queue
                        fields.get(1) == Some(&from)
                            && fields.get(2) == Some(&to)
                            && fields
                                .get(4)
                                .and_then(|queues| queues.split(':').nth(queue))
                                .is_some_and(|bytes| u64::from_str_radix(bytes, 16) == Ok(0))
                    })
                };
                empty(&remote, &local, 0) && empty(&local, &remote, 1)
            }
        })
        .await;
    }

    /// Reads one answer whose body ends with `}` (every JSON answer of the API).
    pub async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !(received.ends_with(b"}") && received.windows(4).any(|w| w == b"\r\n\r\n")) {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .expect("read");
            assert!(
                n > 0,
                "closed before answering: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&received).into_owned()
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const ROUTES: [&str; 7] = [
        "/v1/check?subject={}&permission={}&object={}",
        "/v1/check?subject=u1&permission=read&at_least={}",
        "/v1/subjects/{}/permissions?object={}",
        "/v1/subjects/{}/objects?permission={}&limit={}&after={}",
        "/v1/subjects/{}/limits",
        "/v1/check-limit?subject={}&limit={}&usage={}",
        "/v1/digest?at_least={}&by={}",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("checks".to_owned()),
                        Just("subject".to_owned()),
                        Just("permission".to_owned()),
                        Just("object".to_owned()),
                        Just("at_least".to_owned()),
                        ".{0,6}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// One piece of a check's query string: a key (sometimes percent-encoded, sometimes
    /// unknown) and a value among those that take each branch of the fast path.
    fn query_pair() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("subject"),
            Just("permission"),
            Just("object"),
            Just("at_least"),
            Just("sub%6Aect"),
            Just("other"),
        ];
        let long = "x".repeat(1025);
        let value = prop_oneof![
            Just("u1".to_owned()),
            Just("u2".to_owned()),
            Just("read".to_owned()),
            Just("EXPORT".to_owned()),
            Just("doc:1".to_owned()),
            Just("doc%3Apub".to_owned()),
            Just(String::new()),
            Just("7".to_owned()),
            Just("a+b".to_owned()),
            Just("u1=read".to_owned()),
            Just("%FF".to_owned()),
            Just("%".to_owned()),
            Just(long),
            prop::collection::vec(any::<u8>(), 0..6).prop_map(|b| escape(&b)),
        ];
        (key, value, any::<bool>()).prop_map(|(k, v, bare)| {
            if bare && v.is_empty() {
                k.to_owned()
            } else {
                format!("{k}={v}")
            }
        })
    }

    /// A request head that takes every branch of the server's own loop: plain checks,
    /// and each thing that sends a connection to hyper (another method, route, version,
    /// a body, `Connection`, `Expect`, `Upgrade`, bytes hyper's URI parser may refuse).
    fn raw_request() -> impl Strategy<Value = String> {
        let method =
            prop_oneof![6 => Just("GET"), 1 => Just("HEAD"), 1 => Just("POST"), 1 => Just("get")];
        let target = prop_oneof![
            8 => Just("/v1/check?"),
            1 => Just("/v1/check"),
            1 => Just("/v1/checks?"),
            1 => Just("/v1/check/?"),
            1 => Just("http://permd/v1/check?"),
            // Targets httparse reads and hyper's URI parser refuses.
            1 => Just("v1/check?"),
            1 => Just("/v1/<check>?"),
        ];
        let odd = prop_oneof![
            Just("subject=a{b".to_owned()),
            Just("subject=\"u1\"".to_owned()),
            Just("object=doc:1|2".to_owned()),
            Just("subject=u1#frag".to_owned()),
            Just("subject=\u{e9}".to_owned()),
            Just("permission=[read]".to_owned()),
            Just("permission=re^ad".to_owned()),
            // Heads no parser reads: a space in the URL, a control character.
            Just("subject=user 1".to_owned()),
            Just("subject=u\x011".to_owned()),
            // A target hyper finds too long (414).
            Just(format!("pad={PAD}")),
        ];
        let pair = prop_oneof![8 => query_pair(), 1 => odd];
        let valid = (
            prop_oneof![
                6 => Just("u1"),
                2 => Just("u2"),
                1 => Just("u1#frag"),
                1 => Just("a{b}"),
                1 => Just("\u{e9}"),
                1 => Just("a|b^c"),
                1 => Just("\"u1\""),
            ],
            prop_oneof![Just("read"), Just("EXPORT")],
            prop_oneof![
                Just(""),
                Just("&object=doc:1"),
                Just("&object=doc%3Apub"),
                Just("&object=")
            ],
        )
            .prop_map(|(subject, permission, object)| {
                format!("subject={subject}&permission={permission}{object}")
            });
        let query = prop_oneof![
            1 => valid,
            1 => prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&")),
        ];
        let version = prop_oneof![8 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0")];
        let header = prop_oneof![
            3 => Just("authorization: Bearer sesame"),
            1 => Just("Authorization: Bearer nope"),
            1 => Just("AUTHORIZATION: Bearer sesame"),
            2 => Just("connection: keep-alive"),
            1 => Just("Connection: Keep-Alive"),
            1 => Just("connection: close"),
            1 => Just("content-length: 0"),
            1 => Just("expect: 100-continue"),
            1 => Just("upgrade: websocket"),
            3 => Just("x-other: 1"),
            1 => Just("x other: 1"),
            // Framing hyper refuses (400), or takes.
            1 => Just("content-length: 0, 0"),
            1 => Just("content-length: +0"),
            1 => Just("content-length: 00"),
            1 => Just("transfer-encoding: gzip"),
            1 => Just("transfer-encoding: chunked, gzip"),
        ];
        // More headers than a plain request is parsed with room for, and more than hyper
        // reads (431).
        let header = prop_oneof![
            21 => header.prop_map(str::to_owned),
            1 => Just(HEADERS_40.to_owned()),
            1 => Just(HEADERS_101.to_owned()),
        ];
        (
            method,
            target,
            query,
            version,
            prop::collection::vec(header, 0..3),
        )
            .prop_map(|(method, target, query, version, headers)| {
                let headers: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
                format!("{method} {target}{query} {version}\r\nhost: permd\r\n{headers}\r\n")
            })
    }

    /// Marks for the long pieces of a request, which [`expand`] writes out when it is sent:
    /// so a failing pipeline is printed short enough to read. A 65,530-byte value...
    const PAD: &str = "@PAD@";
    /// ... 40 header lines and 101 (the last without its CRLF).
    const HEADERS_40: &str = "@HEADERS40@";
    const HEADERS_101: &str = "@HEADERS101@";

    /// `request` with its marks written out.
    fn expand(request: &str) -> String {
        let many_headers = |n: usize| -> String {
            let lines: Vec<String> = (0..n).map(|i| format!("x-{i}: {i}")).collect();
            lines.join("\r\n")
        };
        request
            .replace(PAD, &"x".repeat(65_530))
            .replace(HEADERS_40, &many_headers(40))
            .replace(HEADERS_101, &many_headers(101))
    }

    /// Where two servers' answers part: the offset, and the answers around it (escaped).
    fn first_difference(ours: &str, theirs: &str) -> String {
        let at = ours
            .bytes()
            .zip(theirs.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()));
        let around = |text: &str| -> String {
            let bytes = &text.as_bytes()[at.saturating_sub(200)..text.len().min(at + 300)];
            String::from_utf8_lossy(bytes).escape_debug().to_string()
        };
        format!(
            "answers part at byte {at} (ours {} bytes, theirs {}):\nours:   {}\ntheirs: {}",
            ours.len(),
            theirs.len(),
            around(ours),
            around(theirs)
        )
    }

    /// A small request with a body: read whole by the router (a batch), or refused before
    /// it is read (wrong method, content type, route, no token).
    fn request_with_body() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            4 => Just("POST /v1/check"),
            1 => Just("POST /v1/status"),
            1 => Just("PUT /v1/check"),
            1 => Just("GET /v1/check?subject=u1&permission=read"),
        ];
        // Batches the loop answers itself, and batches it leaves to the router (a wait, a
        // bad identifier, a duplicate key, not JSON).
        let body = prop_oneof![
            4 => Just(r#"{"checks":[{"subject":"u1","permission":"read","object":"doc:1"},{"subject":"u2","permission":"read"}]}"#.to_owned()),
            1 => Just(r#" {"checks" : [ {"permission":"EXPORT","subject":"u\u0031","object":""} ], "pad": [1, {"a": null}] } "#.to_owned()),
            1 => Just(r#"{"checks":[]}"#.to_owned()),
            1 => Just(r#"{"checks":[{"subject":"u1","permission":"read"}],"at_least":"1"}"#.to_owned()),
            1 => Just(r#"{"checks":[{"subject":"","permission":"read"}]}"#.to_owned()),
            1 => Just(r#"{"checks":[],"checks":[]}"#.to_owned()),
            1 => Just("{not json".to_owned()),
            1 => Just(String::new()),
        ];
        let content_type = prop_oneof![
            6 => Just("content-type: application/json\r\n"),
            1 => Just("Content-Type: APPLICATION/JSON\r\n"),
            1 => Just("content-type: application/json; charset=utf-8\r\n"),
            1 => Just("content-type: application/json\r\ncontent-type: application/json\r\n"),
            1 => Just(""),
        ];
        (line, body, content_type).prop_map(|(line, body, content_type)| {
            format!(
                "{line} HTTP/1.1\r\nhost: permd\r\n{content_type}content-length: {}\r\n\r\n{body}",
                body.len()
            )
        })
    }

    /// A batch larger than what the server's loop gathers before letting hyper serve it
    /// (over 64 KiB: 1,500 checks), which the connection stays with hyper for.
    ///
    /// It is sent last, as nothing with a body may follow it: such a pipeline arrives in
    /// several segments, and a small body the handler does not read (a 405, a 415, a 401)
    /// that comes in two of them is drained by hyper alone only if its second part has
    /// arrived when the answer is written, or else hyper closes the connection; permd's
    /// loop gathers such a request whole first (`a_body_the_handler_leaves_unread_...`), so
    /// the two servers' answers would differ by the segments' timing alone. The large
    /// batch itself, unread (a 401), closes the connection on both: hyper never holds its
    /// whole body at once.
    fn large_batch() -> String {
        let check = r#"{"subject":"u1","permission":"read","object":"doc:1"}"#;
        let large = format!(r#"{{"checks":[{}]}}"#, vec![check; 1500].join(","));
        format!(
            "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{large}",
            large.len()
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// permd's server answers any pipeline of requests, plain checks and others mixed,
        /// byte for byte (but the date) as hyper alone serving the same API does (but that
        /// a head no parser reads has a JSON error where hyper's 400 is empty): its own
        /// loop for plain checks, the handover to hyper with the bytes already read, and the
        /// connection's return to the loop with the bytes hyper read past its request.
        /// (Where hyper alone answers otherwise on another try, permd's answers need only
        /// be one of hyper's.)
        #[test]
        fn the_servers_own_loop_answers_on_the_wire_as_hyper(
            requests in prop::collection::vec(prop_oneof![4 => raw_request(), 1 => request_with_body()], 1..5),
            large in prop::bool::weighted(0.1),
            token in any::<bool>(),
        ) {
            let config = HttpConfig {
                token: token.then(|| Token::new("sesame").expect("token")),
                max_batch: 2_000,
                body_limit: 1024 * 1024,
                ..quick()
            };
            let app = app_state(config);
            // The last request closes the connection, so each side's answers end there.
            let bytes = format!(
                "{}{}GET /livez HTTP/1.1\r\nhost: permd\r\nconnection: close\r\n\r\n",
                expand(&requests.concat()),
                if large { large_batch() } else { String::new() }
            );
            let runtime = runtime();
            let (permd, _shutdown, hyper) = runtime.block_on(async {
                let (permd, shutdown, _served) =
                    wire::permd(app.clone(), permd::http::ServerLimits::default()).await;
                (permd, shutdown, wire::hyper_alone(app).await)
            });
            let exchange = |addr| runtime.block_on(wire::exchange(addr, bytes.as_bytes()));
            let (ours, theirs) = (exchange(permd), exchange(hyper));
            prop_assert!(theirs.starts_with("HTTP/1."), "{}", theirs);
            if !wire::same_but_malformed(&ours, &theirs) {
                // Hyper alone may answer a pipeline otherwise another time, when how it
                // answers depends on how its bytes arrive: permd's answers must be one of
                // hyper's. Whether permd answers the same again tells the rest.
                let hyper_again: Vec<String> = (0..5).map(|_| exchange(hyper)).collect();
                prop_assert!(
                    hyper_again
                        .iter()
                        .any(|theirs| wire::same_but_malformed(&ours, theirs)),
                    "{}\nhyper alone the same again five times: {}; permd: {}",
                    first_difference(&ours, &theirs),
                    hyper_again.iter().all(|again| *again == theirs),
                    (0..5).all(|_| exchange(permd) == ours)
                );
            }
        }

        /// The fast path of `GET /v1/check` answers byte for byte as the router does, for
        /// any mix of fields, encodings, duplicates, bad values and credentials.
        #[test]
        fn the_fast_path_answers_as_the_router(
            pairs in prop::collection::vec(query_pair(), 0..5),
            token in any::<bool>(),
            credential in 0..3usize,
        ) {
            let config = HttpConfig {
                token: token.then(|| Token::new("sesame").expect("token")),
                ..quick()
            };
            let app = app_state(config);
            let uri = format!("/v1/check?{}", pairs.join("&"));
            let authorization = [None, Some("Bearer sesame"), Some("Bearer nope")][credential];
            let request = || {
                let mut request = Request::get(&uri);
                if let Some(value) = authorization {
                    request = request.header("authorization", value);
                }
                request.body(Body::empty()).expect("request")
            };
            let (fast, slow) = runtime().block_on(async {
                (
                    common::call(Api::new(app.clone()), request()).await,
                    common::call(permd::http::router(app), request()).await,
                )
            });
            prop_assert_eq!(
                &fast,
                &slow,
                "{}: {} vs {}",
                uri,
                String::from_utf8_lossy(&fast.2),
                String::from_utf8_lossy(&slow.2)
            );
        }

        /// Arbitrary bytes in every query parameter and path segment of every route.
        #[test]
        fn query_strings_and_path_segments(route in 0..ROUTES.len(), parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 3)) {
            let r = app(quick());
            let mut uri = String::new();
            for (n, piece) in ROUTES[route].split("{}").enumerate() {
                if n > 0 {
                    uri.push_str(&escape(&parts[(n - 1) % parts.len()]));
                }
                uri.push_str(piece);
            }
            let (status, body) = runtime().block_on(get(&r, &uri));
            prop_assert!(acceptable(status, &body).is_ok(), "{uri}: {:?}", acceptable(status, &body));
        }

        /// Arbitrary JSON documents (shaped like and unlike a batch) as batch bodies.
        #[test]
        fn json_bodies(value in json_value()) {
            let r = app(quick());
            let body = value.to_string();
            let (status, answer) = runtime().block_on(post(&r, "/v1/check", Some("application/json"), body.clone()));
            prop_assert!(acceptable(status, &answer).is_ok(), "{body}: {:?}", acceptable(status, &answer));
        }

        /// Arbitrary bytes as batch bodies.
        #[test]
        fn raw_bodies(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let r = app(quick());
            let (status, answer) = runtime().block_on(post(&r, "/v1/check", Some("application/json"), bytes));
            prop_assert!(acceptable(status, &answer).is_ok(), "{:?}", acceptable(status, &answer));
        }
    }
}

/// A burst of new connections deeper than tokio's default accept queue (128) waits in
/// permd's queue instead of having its SYNs dropped: here permd accepts nothing more (its
/// one connection slot is taken), and 400 clients still complete their handshakes at once.
/// With a queue of 128, those past it wait out SYN retransmissions (1 s, 3 s, 7 s…) until
/// the deadline fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_waits_in_the_accept_queue() {
    let limits = permd::http::ServerLimits {
        max_connections: 1,
        header_timeout: Duration::from_secs(600),
    };
    let (addr, _shutdown, _served) = wire::permd(app_state(quick()), limits).await;
    let held = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let burst: Vec<_> = (0..400)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                DEADLINE,
                tokio::net::TcpStream::connect(addr),
            ))
        })
        .collect();
    for connecting in burst {
        let connected = connecting.await.expect("task");
        assert!(
            connected.is_ok_and(|c| c.is_ok()),
            "a connection of the burst did not complete its handshake (the kernel caps the \
             queue at net.core.somaxconn: {})",
            std::fs::read_to_string("/proc/sys/net/core/somaxconn")
                .unwrap_or_default()
                .trim()
        );
    }
    drop(held);
}

/// A keep-alive connection that sent a plain check and then nothing is closed once the
/// header timeout has passed (as hyper closes an idle one), and not before.
#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let limits = permd::http::ServerLimits {
        header_timeout: timeout,
        ..Default::default()
    };
    let (addr, _shutdown, _served) = wire::permd(app_state(quick()), limits).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    for _ in 0..3 {
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n",
        )
        .await
        .expect("write");
        let answer = wire::read_answer(&mut stream).await;
        assert!(
            answer.ends_with(r#"{"allowed":true,"revision":"0"}"#),
            "{answer}"
        );
    }
    let idle = std::time::Instant::now();
    let rest = wire::read_to_close(&mut stream).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        idle.elapsed() >= timeout,
        "closed after {:?}",
        idle.elapsed()
    );
}

/// A body declared over the limit is refused at once with a 413 that says the limit,
/// before any of it is read: a client waiting on `Expect: 100-continue` is not asked for
/// it, nor is it waited for until the request times out. One of the limit's length is
/// read and answered.
#[tokio::test]
async fn a_body_declared_over_the_limit_is_refused_before_it_is_sent() {
    let config = HttpConfig {
        request_timeout: Duration::from_secs(600),
        ..quick()
    };
    let (addr, _shutdown, _served) = wire::permd(app_state(config), Default::default()).await;
    let head = |length: usize| {
        format!(
            "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\n\
             expect: 100-continue\r\ncontent-length: {length}\r\n\r\n"
        )
    };
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let over = quick().body_limit + 1;
    tokio::io::AsyncWriteExt::write_all(&mut stream, head(over).as_bytes())
        .await
        .expect("write");
    let answer = wire::read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.ends_with(&format!(
            r#"{{"error":"the body is {over} bytes, over the limit of {} (--body-limit)"}}"#,
            quick().body_limit
        )),
        "{answer}"
    );

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let check = r#"{"checks":[{"subject":"u1","permission":"EXPORT"}]}"#;
    let body = check.to_owned() + &" ".repeat(over - 1 - check.len());
    let request = head(body.len()) + &body;
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("write");
    let answer = wire::read_answer(&mut stream).await;
    assert!(
        answer.ends_with(r#"{"results":[true],"revision":"0"}"#),
        "{answer}"
    );
}

/// HTTPS with an encrypted key (`--tls-key-password-file`): read with the password its
/// file holds (its first line), and again on a reload, when the key and its
/// password are rotated together; refused with the reason when the password is missing
/// or wrong, and a failed reload keeps the settings in use.
#[test]
fn https_reads_an_encrypted_key_with_the_password_file() {
    let certified = common::SelfSigned::new("https-encrypted");
    let dir = certified
        .cert
        .parent()
        .expect("the certificate's directory");
    let plain = std::fs::read_to_string(&certified.key).expect("the key");
    let key = dir.join("encrypted.pem");
    let password = dir.join("password");
    std::fs::write(&key, common::encrypted_key(&plain, "first pw")).expect("write the key");
    std::fs::write(&password, "first pw\r\nnot the password\n").expect("write the password");
    let load = |password: Option<&std::path::Path>| {
        permd::http::ServerCerts::load(&certified.cert, &key, password, None)
    };
    let tls = load(Some(&password)).expect("the encrypted key is read");

    // Rotated together: the reload reads both.
    std::fs::write(&key, common::encrypted_key(&plain, "second pw")).expect("write the key");
    std::fs::write(&password, "second pw").expect("write the password");
    tls.reload().expect("the rotated key is read");
    let in_use = tls.server_config();
    std::fs::write(&password, "wrong").expect("write the password");
    let why = format!("{:#}", tls.reload().expect_err("a wrong password"));
    assert!(
        why.contains("could not decrypt the key with --tls-key-password-file"),
        "{why}"
    );
    assert!(std::sync::Arc::ptr_eq(&in_use, &tls.server_config()));
    let why = format!("{:#}", load(None).expect_err("no password"));
    assert!(
        why.contains("the key is encrypted: give its password as --tls-key-password-file"),
        "{why}"
    );
    assert!(why.contains("encrypted.pem"), "{why}");
}

/// HTTPS (`--tls-cert`, `--tls-key`): the API over TLS on one connection, plain checks by
/// the server's own loop and another route by hyper in between; a request in plain text
/// gets no answer; a client that starts no handshake is cut off after the header timeout,
/// as one that sends no request head is.
#[tokio::test]
async fn https_serves_the_api_and_nothing_in_plain_text() {
    use tokio::io::AsyncWriteExt as _;

    let certified = common::SelfSigned::new("https");
    let tls = permd::http::ServerCerts::load(&certified.cert, &certified.key, None, None)
        .expect("the certificate and key are read");
    let limits = permd::http::ServerLimits {
        header_timeout: Duration::from_millis(300),
        ..permd::http::ServerLimits::default()
    };
    let (addr, _shutdown, _served) = wire::permd_with(app_state(quick()), limits, Some(tls)).await;

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut stream = common::tls_client(&[&certified.der])
        .connect(name, tcp)
        .await
        .expect("the handshake completes");
    let check = "GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n";
    for request in [
        check,
        "GET /v1/status HTTP/1.1\r\nhost: permd\r\n\r\n",
        check,
    ] {
        stream.write_all(request.as_bytes()).await.expect("write");
        let answer = wire::read_answer(&mut stream).await;
        assert!(answer.contains(" 200 OK\r\n"), "{request}: {answer}");
    }

    let answer = wire::exchange(addr, b"GET /livez HTTP/1.1\r\nhost: permd\r\n\r\n").await;
    // A TLS alert at most (rustls answers a ClientHello it cannot read with one).
    assert!(
        !answer.contains("HTTP/"),
        "a plain-text request is answered: {answer:?}"
    );
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let rest = wire::read_to_close(&mut idle).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// HTTPS with `--tls-client-ca`: a client showing a certificate signed by that CA is
/// served; one without a certificate, or with one of another CA, gets no HTTP answer. The
/// CA file read again (SIGHUP) changes which clients are served, unless it holds no CA.
#[tokio::test]
async fn https_with_client_cas_serves_only_clients_they_signed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let server = common::SelfSigned::new("mtls");
    let clients = common::TestCa::new("permd clients");
    let stranger = common::TestCa::new("someone else");
    let ca_file = server.cert.with_file_name("clients.pem");
    std::fs::write(&ca_file, clients.pem()).expect("write the client CA");
    let tls = permd::http::ServerCerts::load(&server.cert, &server.key, None, Some(&ca_file))
        .expect("the certificates are read");
    let (addr, _shutdown, _served) = wire::permd_with(
        app_state(quick()),
        permd::http::ServerLimits::default(),
        Some(std::sync::Arc::clone(&tls)),
    )
    .await;
    let request = b"GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n";
    // What a client with `identity` gets back: the answer, or what it read before the
    // connection failed.
    let server_der = &server.der;
    let ask = |identity: Option<common::Identity>| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let Ok(mut stream) = common::tls_client_as(&[server_der], identity)
            .connect(name, tcp)
            .await
        else {
            return String::new();
        };
        if stream.write_all(request).await.is_err() {
            return String::new();
        }
        let mut received = vec![0u8; 4096];
        match tokio::time::timeout(DEADLINE, stream.read(&mut received)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&received[..n]).into_owned(),
            Ok(Err(_)) => String::new(),
            Err(_) => panic!("neither answered nor refused within the deadline"),
        }
    };
    let answer = ask(Some(clients.identity("app-server"))).await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    for (who, identity) in [
        ("no certificate", None),
        ("another CA's", Some(stranger.identity("app-server"))),
    ] {
        let answer = ask(identity).await;
        assert!(!answer.contains("HTTP/"), "{who}: {answer}");
    }

    // The CA file replaced and read again (SIGHUP): the new CA's clients are served from
    // the next handshake on, the old one's refused.
    std::fs::write(&ca_file, stranger.pem()).expect("write the new client CA");
    tls.reload().expect("the new client CA is read");
    let answer = ask(Some(stranger.identity("app-server"))).await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
    let answer = ask(Some(clients.identity("app-server"))).await;
    assert!(!answer.contains("HTTP/"), "the old CA's client: {answer}");
    // A file that holds no CA is refused, and the CAs in use stay.
    std::fs::write(&ca_file, "not a certificate").expect("break the client CA file");
    let error = tls.reload().expect_err("a file without a CA is refused");
    assert!(
        format!("{error:#}").contains("holds no certificate"),
        "{error:#}"
    );
    let answer = ask(Some(stranger.identity("app-server"))).await;
    assert!(answer.contains(" 200 OK\r\n"), "{answer}");
}

/// At shutdown, connections in the server's own loop, connections back in it from hyper
/// and connections that stay with hyper are closed once idle, and `serve` returns.
#[tokio::test]
async fn shutdown_closes_idle_connections_of_every_kind() {
    let (addr, shutdown, served) =
        wire::permd(app_state(quick()), permd::http::ServerLimits::default()).await;
    let mut connections = Vec::new();
    for request in [
        &b"GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n"[..],
        // Not plain: hyper serves it, and the connection comes back.
        &b"GET /v1/status HTTP/1.1\r\nhost: permd\r\n\r\n"[..],
        // HTTP/1.0 kept alive: from here on this connection is hyper's.
        &b"GET /v1/status HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"[..],
    ] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut stream, request)
            .await
            .expect("write");
        let answer = wire::read_answer(&mut stream).await;
        assert!(answer.contains(" 200 OK\r\n"), "{answer}");
        connections.push(stream);
    }
    shutdown.cancel();
    for mut stream in connections {
        let rest = wire::read_to_close(&mut stream).await;
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("serve returns")
        .expect("serve did not panic");
}

/// A head hyper refuses with an empty answer is answered with hyper's status and a JSON
/// error that says what is wrong, after the answers of the requests before it on the
/// connection, and the connection is closed, as hyper closes it; each is counted as a client
/// error. The heads: `common::raw::refused_heads`.
#[tokio::test]
async fn a_head_hyper_refuses_is_answered_with_its_status_and_a_json_error() {
    let (addr, _shutdown, _served) =
        wire::permd(app_state(quick()), permd::http::ServerLimits::default()).await;
    let check = "GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n";
    let client_errors = || wire::counter(addr, "permd_client_errors_total");
    common::raw::assert_heads_refused(addr, check, client_errors).await;
}

/// A plain check with a large head (here 40 headers and 20 KB of them) is answered by the
/// server's own loop, as a small one is, and so is one whose head arrives a few bytes at a
/// time: hyper serves none of them.
#[tokio::test]
async fn large_heads_and_heads_in_pieces_stay_in_the_own_loop() {
    use tokio::io::AsyncWriteExt as _;

    let (addr, _shutdown, _served) =
        wire::permd(app_state(quick()), permd::http::ServerLimits::default()).await;
    let hyper_requests = || wire::counter(addr, "permd_http_hyper_requests_total");
    let before = hyper_requests().await;
    let pad: String = (0..40)
        .map(|i| format!("x-{i}: {}\r\n", "p".repeat(500)))
        .collect();
    let large =
        format!("GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n{pad}\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    // In pieces of 7 bytes, then of 4 KiB.
    for size in [7, 4096] {
        for piece in large.as_bytes().chunks(size) {
            stream.write_all(piece).await.expect("write");
        }
        let answer = wire::read_answer(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && answer.contains("\"allowed\":true"),
            "in pieces of {size}: {answer}"
        );
    }
    // Only the reading of the count itself was hyper's.
    assert_eq!(hyper_requests().await, before + 1);
}

/// A connection hyper served a request on (another route, a check or a batch the loop
/// declined) comes back to the server's own loop: only those requests reach hyper, however
/// many plain checks and batches follow on the same connection, pipelined or not.
#[tokio::test]
async fn a_connection_comes_back_to_the_own_loop_after_hyper_serves_a_request() {
    let (addr, _shutdown, _served) =
        wire::permd(app_state(quick()), permd::http::ServerLimits::default()).await;
    let check = "GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n";
    let body = r#"{"checks":[{"subject":"u1","permission":"EXPORT"}]}"#;
    let batch = format!(
        "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    // The loop leaves a batch with any other content type to the router.
    let declined_batch = format!(
        "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let declined = "GET /v1/check?subject=u1 HTTP/1.1\r\nhost: permd\r\n\r\n";
    let hyper_requests = || wire::counter(addr, "permd_http_hyper_requests_total");
    let before = hyper_requests().await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // One at a time, then the same pipelined in one write.
    let sequence = [
        check,
        &batch,
        check,
        &declined_batch,
        declined,
        check,
        check,
    ];
    for request in sequence {
        // A body may come after its head: the server waits for it (two writes, which the
        // server may read as one).
        let (head, body) = request.split_at(request.find("\r\n\r\n").expect("head") + 4);
        for part in [head, body] {
            tokio::io::AsyncWriteExt::write_all(&mut stream, part.as_bytes())
                .await
                .expect("write");
        }
        let answer = wire::read_answer(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
    }
    tokio::io::AsyncWriteExt::write_all(&mut stream, sequence.concat().as_bytes())
        .await
        .expect("write");
    let mut answers = String::new();
    while answers.matches("HTTP/1.1 ").count() < sequence.len() {
        answers += &wire::read_answer(&mut stream).await;
    }
    assert_eq!(answers.matches("\"allowed\":true").count(), 4, "{answers}");
    assert_eq!(
        answers.matches("\"results\":[true]").count(),
        2,
        "{answers}"
    );
    // Two of each seven went to hyper (the declined batch and check), and so did the second
    // scrape (the first counted itself).
    assert_eq!(hyper_requests().await - before, 2 * 2 + 1);
}

/// A body the handler leaves unread (a 405 here) that arrives in two parts is still
/// drained and the connection kept: the server's loop gathers the whole request before
/// hyper answers it, where hyper alone, answering before the second part arrives, would
/// close the connection.
#[tokio::test]
async fn a_body_the_handler_leaves_unread_keeps_the_connection_when_it_arrives_in_parts() {
    use tokio::io::AsyncWriteExt as _;

    let (addr, _shutdown, _served) =
        wire::permd(app_state(quick()), permd::http::ServerLimits::default()).await;
    let body = r#"{"checks":[{"subject":"u1","permission":"read"}]}"#;
    let unread = format!(
        "PUT /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let check = "GET /v1/check?subject=u1&permission=EXPORT HTTP/1.1\r\nhost: permd\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    // The head and half the body, read by the server before the rest is sent.
    let (first, rest) = unread.split_at(unread.len() - body.len() / 2);
    stream.write_all(first.as_bytes()).await.expect("write");
    wire::read_by_server(&stream).await;
    stream.write_all(rest.as_bytes()).await.expect("write");
    stream.write_all(check.as_bytes()).await.expect("write");
    let mut answers = String::new();
    while answers.matches("HTTP/1.1 ").count() < 2 {
        answers += &wire::read_answer(&mut stream).await;
    }
    assert!(
        answers.starts_with("HTTP/1.1 405 Method Not Allowed\r\n")
            && answers.contains("HTTP/1.1 200 OK\r\n")
            && answers.contains("{\"allowed\":true,"),
        "{answers}"
    );
}
