//! `permd route` in front of three daemons of `--shard i/3`, each served over a socket
//! (one over HTTPS), against a real Postgres: every request reaches its subject's daemon, a batch is split
//! and put back in order, errors stay the daemons', and a daemon that is down, or serves
//! another shard than its place in the list, shows.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{database, patient, SelfSigned, TestDaemon, TestDb};
use permd::http::{HttpConfig, ServerCerts, ServerLimits, Token};
use permd::route::{RouteConfig, Router};
use permd::shard::Shard;
use permd::sync::SyncConfig;
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "route-test-token";

/// One shard's daemon, served over a socket as `permd serve` serves it.
struct Served {
    daemon: TestDaemon,
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Serves HTTPS with `tls`, at `https://localhost:PORT`.
    async fn start(db: &TestDb, shard: Shard, tls: Option<&SelfSigned>) -> Self {
        Self::start_with(db, shard, tls, patient()).await
    }

    /// `start`, with `http` for what the daemon serves but its shard and token.
    async fn start_with(
        db: &TestDb,
        shard: Shard,
        tls: Option<&SelfSigned>,
        http: HttpConfig,
    ) -> Self {
        let mut sync = SyncConfig::new(&db.url);
        sync.shard = shard;
        let http = HttpConfig {
            shard,
            token: Token::new(TOKEN),
            ..http
        };
        let daemon = TestDaemon::start_with(sync, http).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("an address").port();
        let (url, certs) = match tls {
            None => (format!("http://127.0.0.1:{port}"), None),
            Some(tls) => (
                format!("https://localhost:{port}"),
                Some(ServerCerts::load(&tls.cert, &tls.key, None, None).expect("the certificate")),
            ),
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn(permd::http::serve(
            listener,
            daemon.api.clone(),
            ServerLimits::default(),
            certs,
            stop.clone(),
        ));
        Self {
            daemon,
            url,
            stop,
            server,
        }
    }

    /// Where it serves plain HTTP.
    fn address(&self) -> std::net::SocketAddr {
        self.url
            .strip_prefix("http://")
            .expect("plain HTTP")
            .parse()
            .expect("an address")
    }

    /// Waits until the daemon has applied the write `token` was returned for: asks a check
    /// with it until one is answered (each such wait is the daemon's `max_wait`).
    async fn wait_applied(&self, token: u64) {
        let address = self.address();
        let check = format!(
            "GET /v1/check?subject=*&permission=read&at_least={token} HTTP/1.1\r\n\
             host: permd\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        common::wait_until("the write applied", || async {
            common::raw::exchange(address, check.as_bytes())
                .await
                .starts_with("HTTP/1.1 200 OK")
        })
        .await;
    }

    /// Stops serving (the daemon's socket closes; its applier runs on).
    async fn stop_serving(&mut self) {
        self.stop.cancel();
        (&mut self.server).await.expect("the server stops");
    }

    /// Stops serving, if it still does, and stops the daemon.
    async fn finish(mut self) {
        if !self.stop.is_cancelled() {
            self.stop_serving().await;
        }
        self.daemon.stop().await;
    }
}

/// A database where users 1 to `count` may read doc:1, and a daemon of the whole set
/// serving it.
async fn readers_served(count: u32) -> (TestDb, Served) {
    let db = database().await;
    db.exec(&format!(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:1', 'read', NULL
         FROM generate_series(1, {count}) i"
    ))
    .await;
    let served = Served::start(&db, Shard::WHOLE, None).await;
    (db, served)
}

/// Daemons of `db`'s set, one a shard of `count`, served over plain HTTP, and a router
/// over them (`name` names its certificate's files).
async fn shards_routed(db: &TestDb, count: u32, name: &str) -> (Vec<Served>, Routing) {
    let mut served = Vec::new();
    for index in 0..count {
        let shard = Shard::new(index, count).expect("a shard");
        served.push(Served::start(db, shard, None).await);
    }
    let tls = SelfSigned::new(name);
    let urls: Vec<&str> = served.iter().map(|s| s.url.as_str()).collect();
    let routing = serve_router(router(&urls, &tls), None).await;
    (served, routing)
}

/// A router over `urls`, trusting `tls`'s certificate for the `https://` ones.
fn router(urls: &[&str], tls: &SelfSigned) -> Router {
    Router::new(RouteConfig {
        shards: urls.iter().map(|u| (*u).to_owned()).collect(),
        shards_file: None,
        token: Token::new(TOKEN),
        request_timeout: Duration::from_secs(10),
        body_limit: 1 << 20,
        max_batch: 10_000,
        ca: Some(tls.cert.clone()),
    })
    .expect("a router")
}

/// A router served over a socket, as `permd route` serves it.
struct Routing {
    address: std::net::SocketAddr,
    stop: CancellationToken,
    serving: tokio::task::JoinHandle<()>,
}

impl Routing {
    /// Stops serving and waits until the router has.
    async fn finish(self) {
        self.stop.cancel();
        self.serving.await.expect("the router stops");
    }

    /// [`Routing::finish`], then stops the daemons it routed to.
    async fn finish_with(self, daemons: impl IntoIterator<Item = Served>) {
        self.finish().await;
        for daemon in daemons {
            daemon.finish().await;
        }
    }
}

/// Serves `router` over a socket (HTTPS with `certs`), as `permd route` does.
async fn serve_router(router: Router, certs: Option<std::sync::Arc<ServerCerts>>) -> Routing {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("an address");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(permd::route::serve(
        listener,
        None,
        router,
        ServerLimits::default(),
        certs,
        stop.clone(),
    ));
    Routing {
        address,
        stop,
        serving,
    }
}

/// Sends one request through the router (with the token unless `anonymous`).
async fn ask(
    router: &Router,
    method: &str,
    uri: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    request = request.header("authorization", format!("Bearer {TOKEN}"));
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .expect("a request");
    answer(router.handle(request).await).await
}

/// The value of `series` (a metric's name and labels) in the router's `/metrics`.
async fn counter(router: &Router, series: &str) -> u64 {
    let (_, metrics) = ask(router, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().expect("text");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
}

async fn answer(response: axum::http::Response<Body>) -> (StatusCode, Value) {
    let (status, _, bytes) = common::parts(response).await;
    (status, common::json_or_text(&bytes))
}

fn check(subject: &str, object: &str) -> Value {
    json!({ "subject": subject, "permission": "read", "object": object })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_sends_each_request_to_its_shard() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:' || (i % 5), 'read', NULL
         FROM generate_series(1, 60) i;
         INSERT INTO permd.tuples VALUES ('*', 'doc:public', 'read', NULL);
         INSERT INTO permd.limits SELECT 'user:' || i, 'projects', i FROM generate_series(1, 60) i;",
    )
    .await;
    // The daemon of shard 1 serves HTTPS, the others plain HTTP; shard 2 has two
    // daemons (the fourth served is the second of shard 2).
    let tls = SelfSigned::new("route");
    let mut served = Vec::new();
    for index in [0, 1, 2, 2] {
        let shard = Shard::new(index, 3).expect("a shard");
        served.push(Served::start(&db, shard, (index == 1).then_some(&tls)).await);
    }
    let shard_2 = format!("{}|{}", served[2].url, served[3].url);
    let urls: Vec<&str> = vec![&served[0].url, &served[1].url, &shard_2];
    assert!(urls[1].starts_with("https://"));
    let router = router(&urls, &tls);

    let (status, ready) = ask(&router, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let (status, report) = ask(&router, "GET", "/v1/status", None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let shard_2 = &report["shards"][2]["daemons"];
    assert_eq!(shard_2[1]["status"]["shard"], "2/3", "{report}");
    assert_eq!(shard_2[1]["url"], served[3].url, "{report}");

    // Every subject's check reaches the daemon that holds it (another would answer 421).
    for i in 1..=60 {
        for (object, allowed) in [(i % 5, true), ((i + 1) % 5, false)] {
            let uri = format!("/v1/check?subject=user:{i}&permission=read&object=doc:{object}");
            let (status, body) = ask(&router, "GET", &uri, None).await;
            assert_eq!(status, StatusCode::OK, "{uri}: {body}");
            assert_eq!(body["allowed"], allowed, "{uri}: {body}");
        }
    }
    let (status, body) = ask(&router, "GET", "/v1/subjects/user%3A7/limits", None).await;
    assert_eq!(
        (status, &body["limits"]),
        (StatusCode::OK, &json!({"projects": 7}))
    );

    // A batch over every shard, after a write, with its token: split, each part waits
    // for the write, and the results come back in the batch's order.
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:61', 'doc:1', 'read', NULL)")
        .await;
    let mut checks = Vec::new();
    let mut expected = Vec::new();
    for i in 1..=61 {
        checks.push(check(&format!("user:{i}"), &format!("doc:{}", i % 5)));
        expected.push(i != 61 || 61 % 5 == 1);
        checks.push(check(&format!("user:{i}"), "doc:public"));
        expected.push(true);
        checks.push(check(&format!("user:{i}"), "doc:nothing"));
        expected.push(false);
    }
    checks.push(check("*", "doc:public"));
    expected.push(true);
    let batch = json!({ "checks": checks, "at_least": token });
    let (status, body) = ask(&router, "POST", "/v1/check", Some(&batch)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"], json!(expected));
    let revision: u64 = body["revision"]
        .as_str()
        .expect("a revision")
        .parse()
        .expect("a number");
    // The lowest of the daemons' revisions: no newer than what shards 0 and 1 hold now.
    // Older than the token only where a mirror's snapshot sees the write past a
    // transaction still open below it (another test's: the cluster is shared), as README's
    // "The HTTP API" says a revision may be.
    let token: u64 = token.parse().expect("a token");
    for daemon in [&served[0].daemon, &served[1].daemon] {
        assert!(revision <= daemon.store.watermark().0, "{body}");
        assert!(
            revision > token || daemon.store.seen().sees(token),
            "{body}"
        );
    }

    // Errors are the daemons' own: a request without its subject goes to shard 0.
    let (status, body) = ask(&router, "GET", "/v1/check?permission=read", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("an error")
            .contains("subject"),
        "{body}"
    );
    let (status, body) = ask(&router, "POST", "/v1/check", Some(&json!({"checks": 3}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // A field no daemon knows is not dropped on the way: a daemon refuses it.
    let checks: Vec<Value> = (1..=8)
        .map(|u| json!({"subject": format!("user:{u}"), "permission": "read"}))
        .collect();
    let misspelled = json!({"checks": checks, "at_leats": "5"});
    let (status, body) = ask(&router, "POST", "/v1/check", Some(&misspelled)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"].to_string().contains("at_leats"), "{body}");
    let (status, _) = ask(&router, "GET", "/v1/digest", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let huge = json!({ "checks": [], "pad": "x".repeat(1 << 20) });
    let (status, body) = ask(&router, "POST", "/v1/check", Some(&huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let anonymous = Request::get("/v1/check?subject=user:1&permission=read")
        .body(Body::empty())
        .expect("a request");
    let (status, _) = answer(router.handle(anonymous).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Over a socket, as `permd route --tls-cert --tls-key` serves it.
    let certs = ServerCerts::load(&tls.cert, &tls.key, None, None).expect("the certificate");
    let routing = serve_router(router.clone(), Some(certs)).await;
    let address = routing.address;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut stream = common::tls_client(&[&tls.der])
        .connect(name, tcp)
        .await
        .expect("TLS with the router");
    stream
        .write_all(
            format!(
                "GET /v1/check?subject=user:3&permission=read&object=doc:3 HTTP/1.1\r\n\
                 Host: router\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"allowed\":true"), "{text}");
    routing.finish().await;

    // Daemons listed out of their shards' order: not ready, and says which.
    let swapped = self::router(&[urls[1], urls[0], urls[2]], &tls);
    let (status, body) = ask(&swapped, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["shards"][0]["daemons"][0]["error"]
        .as_str()
        .expect("an error");
    assert!(error.contains("mirrors shard 1/3"), "{error}");

    // A daemon whose certificate the router does not trust (the system's CAs alone) is
    // one it cannot reach, and says why.
    let untrusting = Router::new(RouteConfig {
        shards: urls.iter().map(|u| (*u).to_owned()).collect(),
        shards_file: None,
        token: Token::new(TOKEN),
        request_timeout: Duration::from_secs(10),
        body_limit: 1 << 20,
        max_batch: 10_000,
        ca: None,
    })
    .expect("a router");
    let of_shard_1 = (1..)
        .map(|i| format!("user:{i}"))
        .find(|s| Shard::new(1, 3).expect("a shard").owns(s))
        .expect("a subject");
    let uri = format!("/v1/check?subject={of_shard_1}&permission=read");
    let (status, body) = ask(&untrusting, "GET", &uri, None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["message"].as_str().expect("a message");
    assert!(message.contains("certificate"), "{message}");

    // One daemon of shard 2 down: the other answers its subjects, every time.
    let down = (1..).map(|i| format!("user:{i}"));
    let (down, up): (Vec<String>, Vec<String>) = down
        .take(60)
        .partition(|s| Shard::new(2, 3).expect("a shard").owns(s));
    served[2].stop_serving().await;
    for subject in &down {
        let uri = format!("/v1/check?subject={subject}&permission=read&object=doc:public");
        let (status, body) = ask(&router, "GET", &uri, None).await;
        assert_eq!(
            (status, &body["allowed"]),
            (StatusCode::OK, &json!(true)),
            "{body}"
        );
    }
    let (status, body) = ask(&router, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Both down: its subjects answer 502, the others' go on.
    served[3].stop_serving().await;
    let (status, body) = ask(
        &router,
        "GET",
        &format!("/v1/check?subject={}&permission=read", down[0]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "shard unavailable", "{body}");
    let message = body["message"].as_str().expect("a message");
    assert!(
        message.starts_with("no daemon of shard 2/3 answered: "),
        "{message}"
    );
    for daemon in &served[2..] {
        assert!(message.contains(&format!("{}: ", daemon.url)), "{message}");
    }
    let (status, body) = ask(
        &router,
        "GET",
        &format!(
            "/v1/check?subject={}&permission=read&object=doc:public",
            up[0]
        ),
        None,
    )
    .await;
    assert_eq!(
        (status, &body["allowed"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    let batch = json!({ "checks": [check(&up[0], "doc:public"), check(&down[0], "doc:public")] });
    let (status, _) = ask(&router, "POST", "/v1/check", Some(&batch)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    // `/readyz` answers from a survey up to 0.1 s old: not ready within that.
    common::wait_until("the router not ready", || async {
        ask(&router, "GET", "/readyz", None).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (_, metrics) = ask(&router, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().expect("text");
    for daemon in &served[2..] {
        let failed = format!(
            "permd_route_failed_total{{shard=\"2/3\",url=\"{}\"}} ",
            daemon.url
        );
        assert!(metrics.contains(&failed), "{metrics}");
        assert!(!metrics.contains(&format!("{failed}0\n")), "{metrics}");
    }
    // Without --shards-file a SIGHUP changes no set: nothing to count.
    assert!(!metrics.contains("permd_route_reshards_total"), "{metrics}");

    for daemon in served {
        daemon.finish().await;
    }
}

/// A daemon of a shard that has not loaded yet (it just started, or restarted) answers
/// 503 `loading`: the router asks the shard's next daemon instead, so a shard with one
/// daemon restarting answers every request. With no other daemon, its 503 is the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_not_loaded_yet_is_passed_over() {
    let (_db, loaded) = readers_served(10).await;
    // A daemon whose store was never loaded, served as `permd serve` serves one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let starting = format!("http://{}", listener.local_addr().expect("an address"));
    let app = permd::http::App::new(
        permd::store::Store::new(),
        permd::sync::Status::default(),
        HttpConfig {
            token: Token::new(TOKEN),
            ..patient()
        },
    );
    let stop = CancellationToken::new();
    let server = tokio::spawn(permd::http::serve(
        listener,
        permd::http::Api::new(app),
        ServerLimits::default(),
        None,
        stop.clone(),
    ));
    let tls = SelfSigned::new("route-loading");
    let both = router(&[&format!("{starting}|{}", loaded.url)], &tls);
    // Each daemon in turn comes first: every answer is the loaded one's.
    for i in 1..=10 {
        let uri = format!("/v1/check?subject=user:{i}&permission=read&object=doc:1");
        let (status, body) = ask(&both, "GET", &uri, None).await;
        assert_eq!(
            (status, &body["allowed"]),
            (StatusCode::OK, &json!(true)),
            "{body}"
        );
        let batch = json!({ "checks": [check(&format!("user:{i}"), "doc:1")] });
        let (status, body) = ask(&both, "POST", "/v1/check", Some(&batch)).await;
        assert_eq!(
            (status, &body["results"]),
            (StatusCode::OK, &json!([true])),
            "{body}"
        );
    }
    let alone = router(&[&starting], &tls);
    let (status, body) = ask(
        &alone,
        "GET",
        "/v1/check?subject=user:1&permission=read",
        None,
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("loading"))
    );
    // Checks pipelined to it wait and go together: the batch's 503 is each one's, as
    // each alone was answered.
    let routing = serve_router(alone.clone(), None).await;
    let address = routing.address;
    let pipeline = plain_checks(
        (1..=10).map(|i| (format!("user:{i}"), "read".to_owned(), "doc:1".to_owned())),
    );
    let ours = common::raw::exchange(address, pipeline.as_bytes()).await;
    let theirs = common::raw::exchange(hyper_alone(alone).await, pipeline.as_bytes()).await;
    assert_eq!(
        common::raw::without_revisions(&ours),
        common::raw::without_revisions(&theirs)
    );
    assert_eq!(ours.matches("HTTP/1.1 503 ").count(), 10, "{ours}");
    routing.finish().await;
    stop.cancel();
    server.await.expect("the server stops");
    loaded.finish().await;
}

/// Single checks pipelined on one connection, each `(subject, permission, object)`, the
/// last closing it.
fn plain_checks(checks: impl Iterator<Item = (String, String, String)>) -> String {
    let mut checks = checks.peekable();
    let mut pipeline = String::new();
    while let Some((subject, permission, object)) = checks.next() {
        let last = if checks.peek().is_none() {
            "connection: close\r\n"
        } else {
            ""
        };
        pipeline.push_str(&format!(
            "GET /v1/check?subject={subject}&permission={permission}&object={object} HTTP/1.1\r\n\
             host: router\r\nauthorization: Bearer {TOKEN}\r\n{last}\r\n"
        ));
    }
    pipeline
}

/// A daemon that takes connections but never answers (hung, or its host dropping
/// packets) costs a request the whole request timeout. After one such failure it rests:
/// the shard's other daemon is tried first, so that only a few of many requests wait on
/// it (in turn, half of them would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_fails_rests() {
    let (_db, good) = readers_served(40).await;
    // Listening, so the kernel completes each connection, but never accepting.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_url = format!("http://{}", hung.local_addr().expect("an address"));
    let tls = SelfSigned::new("route-rest");
    let router = Router::new(RouteConfig {
        shards: vec![format!("{hung_url}|{}", good.url)],
        shards_file: None,
        token: Token::new(TOKEN),
        request_timeout: Duration::from_millis(300),
        body_limit: 1 << 20,
        max_batch: 10_000,
        ca: Some(tls.cert.clone()),
    })
    .expect("a router");
    for i in 1..=40 {
        let uri = format!("/v1/check?subject=user:{i}&permission=read&object=doc:1");
        let (status, body) = ask(&router, "GET", &uri, None).await;
        assert_eq!(
            (status, &body["allowed"]),
            (StatusCode::OK, &json!(true)),
            "{body}"
        );
    }
    let labels = format!("{{shard=\"0/1\",url=\"{hung_url}\"}}");
    let tried = counter(&router, &format!("permd_route_forwarded_total{labels}")).await;
    assert!(
        (1..10).contains(&tried),
        "{tried} of 40 requests waited on it"
    );
    counter(&router, &format!("permd_route_resting{labels}")).await;
    // Every answer of the good daemon is timed, none of the hung one's, which gave none.
    let good_labels = format!("{{shard=\"0/1\",url=\"{}\"}}", good.url);
    let answered = |labels: &str| format!("permd_route_answer_duration_seconds_count{labels}");
    let to_good = counter(
        &router,
        &format!("permd_route_forwarded_total{good_labels}"),
    )
    .await;
    assert_eq!(counter(&router, &answered(&good_labels)).await, to_good);
    assert_eq!(counter(&router, &answered(&labels)).await, 0);
    let every = format!(
        "permd_route_answer_duration_seconds_bucket{{shard=\"0/1\",url=\"{}\",le=\"+Inf\"}}",
        good.url
    );
    assert_eq!(counter(&router, &every).await, to_good);
    drop(hung);
    good.finish().await;
}

/// Probes that come together share one survey of the daemons, and a survey answers
/// probes for a tenth of a second after it: a flood of `/readyz`, which needs no token,
/// does not become one request to every daemon each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_share_a_survey_of_the_daemons() {
    let (_db, served) = readers_served(3).await;
    let tls = SelfSigned::new("route-probes");
    let router = router(&[&served.url], &tls);
    let series = format!(
        "permd_route_forwarded_total{{shard=\"0/1\",url=\"{}\"}}",
        served.url
    );
    let before = counter(&router, &series).await;
    let probes = (0..40).map(|_| ask(&router, "GET", "/readyz", None));
    for (status, body) in futures_util::future::join_all(probes).await {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["shards"][0]["daemons"][0]["url"], json!(served.url));
    }
    let asked = counter(&router, &series).await - before;
    assert!(
        (1..5).contains(&asked),
        "40 probes asked the daemon {asked} times"
    );
    // The authenticated status asks every daemon each time.
    ask(&router, "GET", "/v1/status", None).await;
    assert_eq!(counter(&router, &series).await - before, asked + 1);
    served.finish().await;
}

/// A head the router cannot read, or one too large, is refused as a daemon refuses it
/// (hyper alone answered it with an empty 400, 414 or 431): the same status, a JSON error
/// that says what is wrong, after the answers to the requests before it on the
/// connection, and the connection closed; `/metrics` counts it. The heads:
/// `common::raw::refused_heads`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_refuses_a_head_it_cannot_read_as_a_daemon_does() {
    let (_db, served) = readers_served(3).await;
    let tls = SelfSigned::new("route-refused");
    let router = router(&[&served.url], &tls);
    let routing = serve_router(router, None).await;
    let address = routing.address;
    let check = format!(
        "GET /v1/check?subject=user:2&permission=read&object=doc:1 HTTP/1.1\r\n\
         host: router\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
    );
    let refused = || async move {
        let metrics = format!(
            "GET /metrics HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {TOKEN}\r\n\
             connection: close\r\n\r\n"
        );
        let text = common::raw::exchange(address, metrics.as_bytes()).await;
        text.lines()
            .find_map(|line| line.strip_prefix("permd_route_refused_total "))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no permd_route_refused_total in {text}"))
    };
    common::raw::assert_heads_refused(address, &check, refused).await;
    routing.finish().await;
    served.finish().await;
}

/// Requests pipelined on a connection to the router are answered in order; the `GET`s
/// without a body and the JSON batches, which the router's loop forwards itself (hyper
/// serves the rest), are answered byte for byte as hyper alone answered them (dates
/// aside), errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_pipelined_requests_as_hyper_alone() {
    let (_db, served) = readers_served(3).await;
    let tls = SelfSigned::new("route-pipelined");
    let router = router(&[&served.url], &tls);
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    let check = format!(
        "GET /v1/check?subject=user:2&permission=read&object=doc:1 HTTP/1.1\r\n\
         host: router\r\nauthorization: Bearer {TOKEN}\r\n\r\n"
    );

    // Requests pipelined on one connection are answered in order, a batch's body and an
    // error among them (the check and the batch by the loop, the others by hyper in turn);
    // the last closes it.
    let batch = r#"{"checks":[{"subject":"user:3","permission":"read","object":"doc:1"},{"subject":"user:9","permission":"read","object":"doc:1"}]}"#;
    let pipeline = format!(
        "{check}GET /v1/subjects/user:1/limits HTTP/1.1\r\nhost: router\r\n\r\n\
         POST /v1/check HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{batch}\
         GET /v1/check?subject=user:9&permission=read&object=doc:1 HTTP/1.1\r\n\
         host: router\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n",
        batch.len()
    );
    let text = common::raw::exchange(address, pipeline.as_bytes()).await;
    let answers: Vec<(&str, &str)> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| {
            let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
            (head.lines().next().expect("a status line"), body)
        })
        .collect();
    let statuses: Vec<&str> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(
        statuses,
        ["200 OK", "401 Unauthorized", "200 OK", "200 OK"],
        "{text}"
    );
    assert!(answers[0].1.starts_with(r#"{"allowed":true"#), "{text}");
    assert!(answers[1].1.contains("unauthorized"), "{text}");
    assert!(
        answers[2].1.starts_with(r#"{"results":[true,false]"#),
        "{text}"
    );
    assert!(answers[3].1.starts_with(r#"{"allowed":false"#), "{text}");

    // Plain checks, batches and the other GETs alone, each forwarded by the loop, the last
    // request hyper's.
    let alone = hyper_alone(router.clone()).await;
    let auth = format!("authorization: Bearer {TOKEN}\r\n");
    let checks = [
        ("subject=user:3&permission=read&object=doc:1", auth.as_str()),
        ("subject=user:3&permission=read&object=doc:2", &auth),
        ("subject=user%3A3&permission=read&object=doc%3A1", &auth),
        ("subject=user:3&permission=read&object=doc:1", ""),
        (
            "subject=user:3&permission=read&object=doc:1",
            "authorization: Bearer nope\r\n",
        ),
        ("subject=user:3&permission=read&bogus=1", &auth),
        ("permission=read&object=doc:1", &auth),
        (
            "subject=user:3&permission=read&object=doc:1&at_least=1",
            &auth,
        ),
    ]
    .map(|(query, auth)| format!("GET /v1/check?{query} HTTP/1.1\r\nhost: router\r\n{auth}\r\n"));
    let batches = [
        (batch, auth.as_str()),
        (batch, ""),
        (r#"{"checks":[]}"#, &auth),
        (r#"{"checks":[{"subject":"user:3"}]}"#, &auth),
        (r#"{"checks":[],"at_leats":"1"}"#, &auth),
        ("not json", &auth),
    ]
    .map(|(body, auth)| {
        format!(
            "POST /v1/check HTTP/1.1\r\nhost: router\r\n{auth}content-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
    });
    let gets = [
        (
            "/v1/subjects/user:3/permissions?object=doc:1",
            auth.as_str(),
        ),
        ("/v1/subjects/user:3/permissions", ""),
        ("/v1/subjects/user:3/objects?permission=read", &auth),
        ("/v1/subjects/user:3/objects?permission=read&limit=1", &auth),
        ("/v1/subjects/user:3/objects", &auth),
        ("/v1/subjects/user:1/limits", &auth),
        (
            "/v1/check-limit?subject=user:1&limit=projects&usage=1",
            &auth,
        ),
        ("/v1/check", &auth),
        ("/v1/digest", &auth),
        ("/nowhere", &auth),
        ("/livez", ""),
    ]
    .map(|(target, auth)| format!("GET {target} HTTP/1.1\r\nhost: router\r\n{auth}\r\n"));
    let pipeline: String = checks
        .into_iter()
        .chain(batches)
        .chain(gets)
        .chain(["GET /livez HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n".to_owned()])
        .collect();
    let ours = common::raw::exchange(address, pipeline.as_bytes()).await;
    let theirs = common::raw::exchange(alone, pipeline.as_bytes()).await;
    assert_eq!(
        common::raw::without_revisions(&ours),
        common::raw::without_revisions(&theirs)
    );
    for status in [
        "200 OK",
        "400 Bad Request",
        "401 Unauthorized",
        "404 Not Found",
        "422 Unprocessable Entity",
    ] {
        assert!(ours.contains(&format!("HTTP/1.1 {status}\r\n")), "{ours}");
    }
    routing.finish().await;
    served.finish().await;
}

/// Requests pipelined on a connection to the router are forwarded at once: a check for a
/// shard whose daemon does not answer does not hold back the next one, for another shard,
/// which reaches its daemon before the first is answered; and the answers still come in
/// the requests' order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_forwarded_at_once() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:1', 'read', NULL
         FROM generate_series(1, 20) i",
    )
    .await;
    let answering = Served::start(&db, Shard::new(1, 2).expect("a shard"), None).await;
    // Shard 0's daemon: listening, so the kernel completes each connection, but never
    // accepting.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_url = format!("http://{}", hung.local_addr().expect("an address"));
    let tls = SelfSigned::new("route-at-once");
    let router = router(&[&hung_url, &answering.url], &tls);
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    let subject_in = |shard: u32| {
        (1..=20)
            .map(|i| format!("user:{i}"))
            .find(|subject| Shard::of(subject, 2) == shard)
            .expect("a subject of the shard")
    };
    let check = |subject: &str, last: &str| {
        format!(
            "GET /v1/check?subject={subject}&permission=read&object=doc:1 HTTP/1.1\r\n\
             host: router\r\nauthorization: Bearer {TOKEN}\r\n{last}\r\n"
        )
    };
    let (held, free) = (subject_in(0), subject_in(1));
    let pipeline = format!(
        "{}{}{}",
        check(&held, ""),
        check(&free, ""),
        check(&free, "connection: close\r\n")
    );
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(pipeline.as_bytes())
        .await
        .expect("send the pipeline");

    let series = format!(
        "permd_route_forwarded_total{{shard=\"1/2\",url=\"{}\"}}",
        answering.url
    );
    let forwarded_to_answering = || async { counter(&router, &series).await >= 1 };
    common::wait_until("the second request forwarded", forwarded_to_answering).await;
    let mut nothing = [0u8; 1];
    assert!(
        matches!(stream.try_read(&mut nothing), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "an answer came before the first request's"
    );

    // Shard 0's daemon goes: its connection is reset, the first request fails, and the
    // three answers come in order.
    drop(hung);
    let received = common::raw::read_to_close(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{text}");
    assert!(answers[0].starts_with("502 "), "{text}");
    assert!(answers[0].contains("shard unavailable"), "{text}");
    for answer in &answers[1..] {
        assert!(answer.starts_with("200 OK"), "{text}");
        assert!(answer.contains(r#"{"allowed":true"#), "{text}");
    }

    // More than are forwarded at once (32): the rest are sent as the first are
    // answered, all in order.
    let objects: Vec<u32> = (0..80).map(|i| 1 + i % 3 / 2).collect();
    let pipeline: String = objects
        .iter()
        .enumerate()
        .map(|(i, object)| {
            let last = if i + 1 == objects.len() {
                "connection: close\r\n"
            } else {
                ""
            };
            format!(
                "GET /v1/check?subject={free}&permission=read&object=doc:{object} HTTP/1.1\r\n\
                 host: router\r\nauthorization: Bearer {TOKEN}\r\n{last}\r\n"
            )
        })
        .collect();
    let text = common::raw::exchange(address, pipeline.as_bytes()).await;
    let allowed: Vec<bool> = text
        .split("HTTP/1.1 200 OK")
        .skip(1)
        .map(|answer| answer.contains(r#"{"allowed":true"#))
        .collect();
    let expected: Vec<bool> = objects.iter().map(|object| *object == 1).collect();
    assert_eq!(allowed, expected, "{text}");
    routing.finish().await;
    answering.finish().await;
}

/// Single checks that come while their shard's daemon has two requests of checks in
/// flight wait, and go together as one batch: each is answered as the daemon answers it alone
/// (byte for byte, dates aside), in the requests' order; a batch the daemon refuses (a
/// check in it has no permission) has each of its checks sent again alone, for its own
/// answer; and `/metrics` counts the checks answered from a shared batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_checks_that_wait_for_their_shard_go_together() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:' || (i % 3), 'read', NULL
         FROM generate_series(1, 40) i;
         INSERT INTO permd.tuples SELECT 'user:' || i, '', 'export', NULL
         FROM generate_series(1, 40, 2) i;",
    )
    .await;
    let served = [
        Served::start(&db, Shard::new(0, 2).expect("a shard"), None).await,
        Served::start(&db, Shard::new(1, 2).expect("a shard"), None).await,
    ];
    let tls = SelfSigned::new("route-together");
    let router = router(&[&served[0].url, &served[1].url], &tls);
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    // 120 checks over both shards, allowed and not, global ones among them, and in the
    // first 30 two of shard 0 with no permission (the daemon refuses a batch with one),
    // after the two that go at once (the shard's two turns for its one daemon).
    let empty: Vec<u32> = (1..=40)
        .filter(|i| Shard::of(&format!("user:{i}"), 2) == 0)
        .skip(2)
        .take(2)
        .collect();
    assert!(empty.iter().all(|i| *i <= 30), "{empty:?}");
    let checks = (0..120u32).map(|n| {
        let i = 1 + n % 40;
        let subject = format!("user:{i}");
        let (permission, object) = match n % 4 {
            _ if n < 30 && empty.contains(&i) => ("", format!("doc:{}", i % 3)),
            0 => ("export", String::new()),
            1 => ("read", format!("doc:{}", (i + 1) % 3)),
            _ => ("read", format!("doc:{}", i % 3)),
        };
        (subject, permission.to_owned(), object)
    });
    let pipeline = plain_checks(checks);
    let ours = common::raw::exchange(address, pipeline.as_bytes()).await;
    let theirs =
        common::raw::exchange(hyper_alone(router.clone()).await, pipeline.as_bytes()).await;
    assert_eq!(
        common::raw::without_revisions(&ours),
        common::raw::without_revisions(&theirs)
    );
    let count = |status: &str| ours.matches(&format!("HTTP/1.1 {status}")).count();
    assert_eq!(
        (count("200 OK"), count("400 Bad Request")),
        (118, 2),
        "{ours}"
    );
    assert!(ours.contains(r#"{"allowed":true,"#), "{ours}");
    assert!(ours.contains(r#"{"allowed":false,"#), "{ours}");
    let coalesced = counter(&router, "permd_route_coalesced_total").await;
    assert!(
        (30..=118).contains(&coalesced),
        "{coalesced} of 120 checks coalesced"
    );
    routing.finish_with(served).await;
}

/// Checks with an `at_least` token go together too once the shard's answers have reached
/// it (each answered as hyper alone answers it, revisions aside), with the batch carrying
/// the highest token; a token past what the shard has answered goes alone, sent once,
/// and is answered 503 stale after the daemon's wait without holding any other check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_with_a_token_the_shard_has_reached_go_together() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:' || (i % 3), 'read', NULL
         FROM generate_series(1, 40) i",
    )
    .await;
    let quick = HttpConfig {
        max_wait: Duration::from_millis(300),
        ..patient()
    };
    let served = [
        Served::start_with(&db, Shard::new(0, 2).expect("a shard"), None, quick.clone()).await,
        Served::start_with(&db, Shard::new(1, 2).expect("a shard"), None, quick).await,
    ];
    let token: u64 = db
        .write("INSERT INTO permd.tuples VALUES ('user:41', 'doc:2', 'read', NULL)")
        .await
        .parse()
        .expect("a token");
    // Both daemons have applied the write before the pipelines (each wait is 300 ms), and
    // their watermarks, which their answers carry, have passed it: only then does the
    // router see the shard past the token. (Another test's transaction open in the shared
    // cluster holds the watermarks below it meanwhile, and held them through the
    // pipelines once in a full run: nothing went together.)
    for served in &served {
        served.wait_applied(token).await;
    }
    common::wait_until("the watermarks past the write", || {
        let passed = served
            .iter()
            .all(|served| served.daemon.store.watermark().0 > token);
        std::future::ready(passed)
    })
    .await;
    let tls = SelfSigned::new("route-tokens");
    let router = router(&[&served[0].url, &served[1].url], &tls);
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    let pipeline = |token: u64, count: u32| {
        let mut pipeline = String::new();
        for n in 0..count {
            let i = 1 + n % 41;
            let last = if n + 1 == count {
                "connection: close\r\n"
            } else {
                ""
            };
            pipeline.push_str(&format!(
                "GET /v1/check?subject=user:{i}&permission=read&object=doc:{}&at_least={token} \
                 HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {TOKEN}\r\n{last}\r\n",
                (i + n) % 3
            ));
        }
        pipeline
    };

    // Every check carries the write's token: the first go alone, and once their answers
    // have shown the shard past it, those that wait go together.
    let reached = pipeline(token, 120);
    let ours = common::raw::exchange(address, reached.as_bytes()).await;
    let theirs = common::raw::exchange(hyper_alone(router.clone()).await, reached.as_bytes()).await;
    assert_eq!(
        common::raw::without_revisions(&ours),
        common::raw::without_revisions(&theirs)
    );
    assert_eq!(ours.matches("HTTP/1.1 200 OK").count(), 120, "{ours}");
    assert!(ours.contains(r#"{"allowed":true,"#), "{ours}");
    assert!(ours.contains(r#"{"allowed":false,"#), "{ours}");
    let coalesced = counter(&router, "permd_route_coalesced_total").await;
    assert!(coalesced > 0, "no check with a token reached went together");

    // A token no write has returned yet: never sent in a batch (a batch of it would be
    // sent, refused 503 and each of its checks sent again), so each check is sent once.
    let forwarded = || async {
        let mut sum = 0;
        for (shard, served) in served.iter().enumerate() {
            let series = format!(
                "permd_route_forwarded_total{{shard=\"{shard}/2\",url=\"{}\"}}",
                served.url
            );
            sum += counter(&router, &series).await;
        }
        sum
    };
    let before = forwarded().await;
    let ahead = pipeline(token + 1_000_000, 40);
    let ours = common::raw::exchange(address, ahead.as_bytes()).await;
    assert_eq!(ours.matches("HTTP/1.1 503").count(), 40, "{ours}");
    assert!(ours.contains(r#""error":"stale""#), "{ours}");
    assert_eq!(forwarded().await - before, 40);
    assert_eq!(
        counter(&router, "permd_route_coalesced_total").await,
        coalesced
    );
    routing.finish_with(served).await;
}

/// A daemon answers a check or a batch whose `at_least` token it has passed (the write
/// applied) in its own loop at once, as one without a token, also where the token is
/// passed through the mirror's snapshot past a transaction held open below it (the
/// revision then older than the token); a token not passed goes to the router's handler,
/// which waits for it (here past `max_wait`: 503 stale). Not the router's: the daemon's,
/// served as `permd serve` serves it. (Until session 76 it took every revision to be
/// newer than the token, which another test's open transaction in the shared cluster
/// made false once in a full run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_answers_a_token_it_has_passed_in_its_own_loop() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    let quick = HttpConfig {
        max_wait: Duration::from_millis(50),
        ..patient()
    };
    let served = Served::start_with(&db, Shard::WHOLE, None, quick).await;
    let token: u64 = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await
        .parse()
        .expect("a token");
    let address = served.address();
    // Kept alive (a `Connection` header sends a request to hyper), each pipeline ends
    // with a scrape of hyper's count, which closes the connection and counts itself.
    let head = format!("host: permd\r\nauthorization: Bearer {TOKEN}");
    let check = |token: &str| {
        format!("GET /v1/check?subject=user:2&permission=read&object=doc:1&at_least={token} HTTP/1.1\r\n{head}\r\n\r\n")
    };
    let batch = |token: &str| {
        let body = format!(
            r#"{{"checks":[{{"subject":"user:2","permission":"read","object":"doc:1"}}],"at_least":"{token}"}}"#
        );
        format!(
            "POST /v1/check HTTP/1.1\r\n{head}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let scrape = format!("GET /metrics HTTP/1.1\r\n{head}\r\nconnection: close\r\n\r\n");
    let ask = |requests: Vec<String>| {
        let pipeline = requests.concat() + &scrape;
        async move {
            let answers = common::raw::exchange(address, pipeline.as_bytes()).await;
            let count = answers
                .lines()
                .find_map(|line| line.strip_prefix("permd_http_hyper_requests_total "))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no count in {answers}"));
            (answers, count)
        }
    };
    // A token passed: applied (waited for by the router's handler, until it is), then
    // each check answered in the daemon's loop (only the scrape is hyper's). The
    // revisions they were answered at.
    let in_own_loop = |token: u64| {
        let (served, ask) = (&served, &ask);
        let passed = [
            check(&token.to_string()),
            check(&format!("%20{token}")),
            batch(&token.to_string()),
        ];
        async move {
            served.wait_applied(token).await;
            let (_, before) = ask(Vec::new()).await;
            let (answers, count) = ask(passed.to_vec()).await;
            assert_eq!(count, before + 1, "{answers}");
            assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 4, "{answers}");
            assert_eq!(answers.matches(r#""allowed":true"#).count(), 2, "{answers}");
            assert!(answers.contains(r#""results":[true]"#), "{answers}");
            let revisions: Vec<u64> = answers
                .split("\"revision\":\"")
                .skip(1)
                .filter_map(|rest| rest.split('"').next()?.parse().ok())
                .collect();
            assert_eq!(revisions.len(), 3, "{answers}");
            (revisions, count)
        }
    };
    // Each revision is the watermark, older than the token only where the mirror's
    // snapshot sees the write past a transaction still open below it (another test's:
    // the cluster is shared), as README's "The HTTP API" says a revision may be.
    let (revisions, _) = in_own_loop(token).await;
    let seen = served.daemon.store.seen();
    assert!(
        revisions.iter().all(|r| *r > token || seen.sees(token)),
        "{revisions:?}, token {token}, {seen}"
    );
    // So with a transaction of this test held open below the write: the token is passed
    // through the snapshot, answered in the loop as well, at a revision older than it.
    let (held, _) = db.open_write("SELECT pg_current_xact_id()").await;
    let below: u64 = db
        .write("INSERT INTO permd.tuples VALUES ('user:3', 'doc:1', 'read', NULL)")
        .await
        .parse()
        .expect("a token");
    let (revisions, before) = in_own_loop(below).await;
    let seen = served.daemon.store.seen();
    assert!(
        revisions.iter().all(|r| *r <= below) && seen.sees(below),
        "{revisions:?}, token {below}, {seen}"
    );
    held.rollback().await.expect("rollback");
    // A token no transaction of the cluster has reached, or will within the wait.
    let ahead = (seen.xmax().max(below) + 1_000_000).to_string();
    let (answers, count) = ask(vec![check(&ahead), batch(&ahead)]).await;
    assert_eq!(answers.matches("HTTP/1.1 503").count(), 2, "{answers}");
    assert_eq!(
        answers.matches(r#""error":"stale""#).count(),
        2,
        "{answers}"
    );
    assert_eq!(count, before + 3, "{answers}");
    served.finish().await;
}

/// A check dropped while its request to the daemon is in flight (its client gone) gives
/// the shard's turn back: the checks after it do not wait for an answer that will never
/// come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_dropped_in_flight_gives_its_turn_back() {
    let (_db, served) = readers_served(3).await;
    let tls = SelfSigned::new("route-dropped");
    let router = router(&[&served.url], &tls);
    let request = || {
        Request::get("/v1/check?subject=user:2&permission=read&object=doc:1")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .expect("a request")
    };
    // Three checks (more than the shard's two turns for its one daemon) each polled once,
    // its request out, then dropped; one answered at its first poll (which a loaded test
    // machine has seen) held no turn when dropped, and does not count.
    let mut dropped = 0;
    for _ in 0..100 {
        let mut check = Box::pin(router.handle(request()));
        let in_flight = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(check.as_mut(), cx).is_pending())
        })
        .await;
        drop(check);
        dropped += usize::from(in_flight);
        if dropped == 3 {
            break;
        }
    }
    assert_eq!(dropped, 3, "checks dropped in flight");
    let answered = tokio::time::timeout(Duration::from_secs(10), router.handle(request()))
        .await
        .expect("the check after the dropped ones is answered");
    let (status, body) = answer(answered).await;
    assert_eq!(
        (status, &body["allowed"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    served.finish().await;
}

/// When no daemon of a shard answers a request of checks, the checks that waited for the
/// shard meanwhile get the same 504 at once, rather than being sent to wait out the same
/// daemon again: of the first four checks of a pipeline, the first two go at once (the
/// shard's two turns for its one daemon) and the next two wait and fail with the first;
/// the fifth, which closes the connection, is hyper's, sent after them: three requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_waiting_for_a_shard_that_does_not_answer_fail_with_it() {
    // Listening, so the kernel completes each connection, but never accepting.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_url = format!("http://{}", hung.local_addr().expect("an address"));
    let tls = SelfSigned::new("route-hung");
    let router = Router::new(RouteConfig {
        shards: vec![hung_url.clone()],
        shards_file: None,
        token: Token::new(TOKEN),
        request_timeout: Duration::from_millis(300),
        body_limit: 1 << 20,
        max_batch: 10_000,
        ca: Some(tls.cert.clone()),
    })
    .expect("a router");
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    let pipeline =
        plain_checks((1..=5).map(|i| (format!("user:{i}"), "read".to_owned(), "doc:1".to_owned())));
    let text = common::raw::exchange(address, pipeline.as_bytes()).await;
    assert_eq!(text.matches("HTTP/1.1 504 ").count(), 5, "{text}");
    let series = format!("permd_route_forwarded_total{{shard=\"0/1\",url=\"{hung_url}\"}}");
    assert_eq!(counter(&router, &series).await, 3);
    routing.finish().await;
    drop(hung);
}

/// A stand-in for a daemon whose watermark is at 1000 for single checks but that answers
/// every batch 503 `stale` (as a daemon behind a batch's highest token would): its URL,
/// and the batches it was sent, as JSON. Keeps its connections alive, as a daemon does.
async fn behind_on_batches() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("an address"));
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&batches);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = std::sync::Arc::clone(&seen);
            tokio::spawn(async move {
                let mut read = Vec::new();
                loop {
                    let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut more = [0; 4096];
                        match stream.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&more[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&read[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .map_or(0, |n| n.trim().parse().expect("a length"));
                    while read.len() < end + 4 + length {
                        let mut more = [0; 4096];
                        match stream.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&more[..n]),
                        }
                    }
                    let body: Vec<u8> = read.drain(..end + 4 + length).skip(end + 4).collect();
                    let (status, answer) = if head.starts_with("post ") {
                        let batch: Value = serde_json::from_slice(&body).expect("a batch");
                        seen.lock().expect("the batches").push(batch);
                        (
                            "503 Service Unavailable",
                            r#"{"error":"stale","message":"not yet","revision":"1000"}"#,
                        )
                    } else {
                        ("200 OK", r#"{"allowed":true,"revision":"1000"}"#)
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, batches)
}

/// Checks with tokens that wait together go in a batch carrying the highest of their
/// tokens; when the shard answers that batch 503 (a daemon behind the highest token, which
/// need not be behind each check's own), each check is sent again alone and gets its own
/// answer, not the batch's 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_tokens_refused_503_is_sent_again_check_by_check() {
    let (url, batches) = behind_on_batches().await;
    let tls = SelfSigned::new("route-behind");
    let router = router(&[&url], &tls);
    let routing = serve_router(router.clone(), None).await;
    let address = routing.address;
    let check = |i: u32| {
        format!(
            "GET /v1/check?subject=user:{i}&permission=read&object=doc:1&at_least={} HTTP/1.1\r\n\
             host: router\r\nauthorization: Bearer {TOKEN}\r\n",
            100 + i
        )
    };
    // One answer first, so that the shard is known to be past every token below 1000.
    let first = common::raw::exchange(
        address,
        format!("{}connection: close\r\n\r\n", check(0)).as_bytes(),
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
    let mut pipeline: String = (1..40).map(|i| check(i) + "\r\n").collect();
    pipeline.push_str(&check(40));
    pipeline.push_str("connection: close\r\n\r\n");
    let answers = common::raw::exchange(address, pipeline.as_bytes()).await;
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 40, "{answers}");
    let batches = batches.lock().expect("the batches").clone();
    assert!(!batches.is_empty(), "no check waited with others");
    for batch in &batches {
        let highest = batch["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .map(|check| {
                let subject = check["subject"].as_str().expect("a subject");
                100 + subject["user:".len()..].parse::<u64>().expect("a number")
            })
            .max()
            .expect("a check");
        assert_eq!(batch["at_least"], json!(highest.to_string()), "{batch}");
    }
    assert_eq!(counter(&router, "permd_route_coalesced_total").await, 0);
    routing.finish().await;
}

/// `router` served by hyper alone, as `permd route` served it until session 48: its
/// address. Stops with the runtime.
async fn hyper_alone(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let router = router.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            router.handle(request.map(Body::new)).await,
                        )
                    }
                });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    });
    address
}

/// A batch a daemon refuses is refused through the router as one daemon of the whole set
/// refuses it: the same status and error, naming the check by its place in the batch the
/// client sent, not in the part of it a shard's daemon got (a check that does not read,
/// an invalid name, an `at_least` that does not read, too many checks; the router found
/// by a differential fuzz of the two answered these with a part's error). A token that
/// reads but is no number is each part's error as it is the whole's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_through_the_router_is_refused_as_by_one_daemon() {
    let (db, whole) = readers_served(9).await;
    let (served, routing) = shards_routed(&db, 3, "route-refused-batch").await;
    let router = routing.address;
    let whole_address = whole.address();

    // Nine users over the three shards, then the one wrong thing.
    let checks = |wrong: Value, at: usize| {
        let mut checks: Vec<Value> = (1..=9)
            .map(|u| check(&format!("user:{u}"), "doc:1"))
            .collect();
        checks.insert(at, wrong);
        checks
    };
    let long = "x".repeat(1025);
    let many: Vec<Value> = (0..10_001)
        .map(|u| check(&format!("user:{}", u % 9 + 1), "doc:1"))
        .collect();
    let refused = [
        json!({ "checks": checks(json!({"subject": "user:5", "permission": 5}), 6) }),
        json!({ "checks": checks(json!({"subject": "user:2", "permission": "read", "object": null}), 4) }),
        json!({ "checks": checks(json!({"subject": "user:7"}), 3) }),
        json!({ "checks": checks(json!({"subject": "user:8", "permission": "read", "extra": 1}), 7) }),
        json!({ "checks": checks(check(&long, "doc:1"), 6) }),
        json!({ "checks": checks(json!({"subject": "user:3", "permission": ""}), 8) }),
        json!({ "checks": checks(check("user:4", "doc:1"), 0), "at_least": true }),
        json!({ "checks": checks(check("user:4", "doc:1"), 0), "at_least": "abc" }),
        json!({ "checks": many }),
    ];
    for batch in refused {
        let body = batch.to_string();
        let request = format!(
            "POST /v1/check HTTP/1.1\r\nhost: permd\r\nauthorization: Bearer {TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let status_and_body = |answer: String| {
            let (head, body) = answer.split_once("\r\n\r\n").expect("an answer");
            let status = head.lines().next().expect("a status line").to_owned();
            (status, body.to_owned())
        };
        let direct =
            status_and_body(common::raw::exchange(whole_address, request.as_bytes()).await);
        let routed = status_and_body(common::raw::exchange(router, request.as_bytes()).await);
        assert!(!direct.0.contains(" 200 "), "{direct:?}");
        assert_eq!(routed, direct, "{}", &body[..body.len().min(400)]);
    }
    routing.finish_with(served).await;
    whole.finish().await;
}

/// A request for the differential test below: a batch's body, a `GET` target, or a
/// method and a path of any route (the API's, the probes', none) without a body.
#[derive(Debug, Clone)]
enum Asked {
    Batch(String),
    Get(String),
    Other(&'static str, &'static str),
}

impl Asked {
    /// The request on the wire, with `auth` (an `Authorization` line, or nothing); the
    /// `last` on its connection closes it.
    fn request(&self, auth: &str, last: bool) -> String {
        let close = if last { "connection: close\r\n" } else { "" };
        match self {
            Asked::Batch(body) => format!(
                "POST /v1/check HTTP/1.1\r\nhost: permd\r\n{auth}\
                 content-type: application/json\r\ncontent-length: {}\r\n{close}\r\n{body}",
                body.len()
            ),
            Asked::Get(target) => {
                format!("GET {target} HTTP/1.1\r\nhost: permd\r\n{auth}{close}\r\n")
            }
            Asked::Other(method, path) => {
                format!("{method} {path} HTTP/1.1\r\nhost: permd\r\n{auth}{close}\r\n")
            }
        }
    }
}

/// Each answer's status line and body in `answers` (as [`common::raw::without_revisions`]
/// gives them: an answer's body ends where the next one's status line starts).
fn statuses_and_bodies(answers: &str) -> Vec<(String, String)> {
    answers
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| {
            let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
            let status = head.lines().next().expect("a status line").to_owned();
            (status, body.to_owned())
        })
        .collect()
}

/// The `Authorization` lines the differential test sends: the token, none, a wrong one.
fn auth_lines() -> [String; 3] {
    [
        format!("authorization: Bearer {TOKEN}\r\n"),
        String::new(),
        "authorization: Bearer nope\r\n".to_owned(),
    ]
}

/// Every method to every path of a few, but those whose answers differ by design between
/// the router and a daemon when `auth` presents the token: its own `/readyz`, `/metrics`,
/// `/v1/status` and `/v1/digest` (a shard's, which the router refuses).
fn others(auth: &str) -> Vec<Asked> {
    let authorized = auth.contains(TOKEN);
    let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"];
    let paths = [
        "/",
        "/nope",
        "/v1/checks",
        "/v1/subjects/user:1",
        "/v1/subjects/user:1/limits",
        "/v1/check",
        "/livez",
        "/readyz",
        "/metrics",
        "/v1/status",
        "/v1/digest",
    ];
    let own = |method: &str, path: &str| match path {
        "/readyz" => method == "GET",
        "/metrics" | "/v1/status" => method == "GET" && authorized,
        "/v1/digest" => authorized,
        _ => false,
    };
    methods
        .iter()
        .flat_map(|method| paths.iter().map(move |path| (*method, *path)))
        .filter(|(method, path)| !own(method, path))
        .map(|(method, path)| Asked::Other(method, path))
        .collect()
}

/// Names as clients send them, good and bad: subjects of every shard, the public `*`,
/// empty, over-long, not ASCII.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (1..=12u32).prop_map(|u| format!("user:{u}")),
        1 => Just("*".to_owned()),
        1 => Just(String::new()),
        1 => Just("x".repeat(1025)),
        1 => Just("ü/é".to_owned()),
        1 => Just("doc:1".to_owned()),
        1 => Just("read".to_owned()),
    ]
}

/// A JSON value where a batch wants a string: mostly a name, now and then something else.
fn field() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => name().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!(5)),
    ]
}

fn batch() -> impl Strategy<Value = String> {
    let check = (
        prop::option::weighted(0.95, field()),
        prop::option::weighted(0.95, field()),
        prop::option::of(field()),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(subject, permission, object, extra)| {
            let mut check = serde_json::Map::new();
            for (key, value) in [
                ("subject", subject),
                ("permission", permission),
                ("object", object),
            ] {
                if let Some(value) = value {
                    check.insert(key.to_owned(), value);
                }
            }
            if extra {
                check.insert("extra".to_owned(), json!(1));
            }
            Value::Object(check)
        });
    let at_least = prop_oneof![
        6 => Just(None),
        1 => Just(Some(json!("1"))),
        1 => Just(Some(json!(1))),
        1 => Just(Some(json!("abc"))),
        1 => Just(Some(json!(true))),
        1 => Just(Some(json!(""))),
    ];
    let whole = (prop::collection::vec(check, 0..10), at_least).prop_map(|(checks, at_least)| {
        let mut body = json!({ "checks": checks });
        if let Some(at_least) = at_least {
            body["at_least"] = at_least;
        }
        body.to_string()
    });
    prop_oneof![
        12 => whole,
        1 => Just("{".to_owned()),
        1 => Just("[]".to_owned()),
        1 => Just(r#"{"checks":[],"other":1}"#.to_owned()),
    ]
}

fn get() -> impl Strategy<Value = String> {
    let parameter = (
        prop_oneof![
            Just("subject"),
            Just("permission"),
            Just("object"),
            Just("at_least"),
            Just("limit"),
            Just("usage"),
            Just("after"),
        ],
        prop_oneof![3 => name(), 1 => Just("7".to_owned()), 1 => Just("-1".to_owned())],
    );
    let query = prop::collection::vec(parameter, 0..5).prop_map(|parameters| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in parameters {
            query.append_pair(key, &value);
        }
        query.finish()
    });
    let path = prop_oneof![
        3 => Just("/v1/check".to_owned()),
        1 => Just("/v1/check-limit".to_owned()),
        3 => (name(), prop_oneof![Just("permissions"), Just("objects"), Just("limits"), Just("rows")])
            .prop_map(|(subject, what)| {
                let subject: String =
                    form_urlencoded::byte_serialize(subject.as_bytes()).collect();
                format!("/v1/subjects/{subject}/{what}")
            }),
    ];
    (path, query).prop_map(|(path, query)| format!("{path}?{query}"))
}

/// Any request through the router is answered as one daemon of the whole set answers it:
/// the same status and body (revisions aside), whatever shards a batch's checks are of
/// and whatever is wrong with it, with the token, without it or with a wrong one, alone
/// or pipelined with others. Random batches and `GET`s of the API, up to four on a
/// connection, and requests of any method to a few paths, each sent to both.
#[test]
fn the_router_answers_any_request_as_one_daemon_of_the_whole_set() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_db, whole, served, routing) = runtime.block_on(async {
        let (db, whole) = readers_served(9).await;
        db.exec(
            "INSERT INTO permd.tuples VALUES ('*', 'doc:2', 'read', NULL);
             INSERT INTO permd.limits SELECT 'user:' || i, 'projects', i FROM generate_series(1, 6) i;",
        )
        .await;
        let (served, routing) = shards_routed(&db, 3, "route-differential").await;
        // Every daemon has loaded the rows above before the first comparison.
        let token: u64 = db
            .write("INSERT INTO permd.tuples VALUES ('user:12', 'doc:3', 'read', NULL)")
            .await
            .parse()
            .expect("a token");
        for served in std::iter::once(&whole).chain(&served) {
            served.wait_applied(token).await;
        }
        (db, whole, served, routing)
    });
    let (router, whole_address) = (routing.address, whole.address());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    // The same answers from both to requests pipelined on one connection (statuses and
    // bodies, revisions aside), or the requests and the two answers.
    let compare = |requests: &[(String, Asked)]| {
        let pipeline: String = requests
            .iter()
            .enumerate()
            .map(|(n, (auth, asked))| asked.request(auth, n + 1 == requests.len()))
            .collect();
        // An answer to `HEAD` has a length and no body: nothing to blank (sent alone).
        let head_only = matches!(requests, [(_, Asked::Other("HEAD", _))]);
        let answers = |text: String| {
            if head_only {
                statuses_and_bodies(&text)
            } else {
                statuses_and_bodies(&common::raw::without_revisions(&text))
            }
        };
        let (direct, routed) = runtime.block_on(async {
            (
                answers(common::raw::exchange(whole_address, pipeline.as_bytes()).await),
                answers(common::raw::exchange(router, pipeline.as_bytes()).await),
            )
        });
        if routed == direct && direct.len() == requests.len() {
            Ok(())
        } else {
            Err(format!(
                "{pipeline}\nrouted: {routed:?}\ndirect: {direct:?}"
            ))
        }
    };
    // Every method to a few paths, with each of the three credentials: the same 401
    // from both without the token, the probes answered without it.
    let mut result = auth_lines()
        .into_iter()
        .flat_map(|auth| {
            others(&auth)
                .into_iter()
                .map(move |asked| (auth.clone(), asked))
        })
        .try_for_each(|request| compare(&[request]));
    if result.is_ok() {
        // Batches and GETs of the API at random, each with a credential (now and then
        // none, or a wrong one), one to four pipelined on a connection.
        let [token, none, wrong] = auth_lines();
        let request = (
            prop_oneof![8 => Just(token), 1 => Just(none), 1 => Just(wrong)],
            prop_oneof![
                1 => batch().prop_map(Asked::Batch),
                1 => get().prop_map(Asked::Get),
            ],
        );
        result = runner
            .run(&prop::collection::vec(request, 1..=4), |requests| {
                compare(&requests).map_err(TestCaseError::fail)
            })
            .map_err(|error| error.to_string());
    }
    runtime.block_on(async {
        routing.finish_with(served).await;
        whole.finish().await;
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}
