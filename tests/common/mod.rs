//! The test harness: one throwaway Postgres cluster per test binary (started from the
//! machine's initdb/postgres as an unprivileged user, on a free port), one database per
//! test, and an in-process daemon driven through its API service without a socket.

#![allow(dead_code, missing_docs)]

pub mod bouncer;
pub mod proxy;
pub mod raw;
#[path = "../../src/scratch.rs"]
pub mod scratch;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt as _;
use permd::embedded::{Cluster, ClusterOptions};
use permd::http::{Api, App, HttpConfig};
use permd::store::Store;
use permd::sync::{Applier, Status, StatusReport, SyncConfig};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Generous bound for anything the tests wait for; a healthy run takes milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The daemon's logs, shown with a failing test's output: `info` by default, so that a
/// failure's output stays readable (`PERMD_TEST_LOG=permd=debug` adds every poll).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("PERMD_TEST_LOG").unwrap_or_else(|_| "permd=info".into()),
        ))
        .with_test_writer()
        .try_init();
}

/// A self-signed certificate for `localhost` and its key, written as PEM files to a
/// directory of their own, removed when this is dropped.
pub struct SelfSigned {
    dir: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The certificate, for a client to trust.
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl SelfSigned {
    /// Makes one; `tag` names its directory, which is its own even when another test of
    /// the binary makes one with the same tag at the same time.
    pub fn new(tag: &str) -> Self {
        static MADE: AtomicU32 = AtomicU32::new(0);
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("permd-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
        Self {
            dir,
            cert,
            key,
            der: certified.cert.der().clone(),
        }
    }
}

/// A TLS client that trusts these certificates alone.
pub fn tls_client(
    trusted: &[&rustls::pki_types::CertificateDer<'static>],
) -> tokio_rustls::TlsConnector {
    tls_client_as(trusted, None)
}

/// A client's certificate and its key.
pub type Identity = (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// As [`tls_client`], showing `identity` when the server asks for a certificate.
pub fn tls_client_as(
    trusted: &[&rustls::pki_types::CertificateDer<'static>],
    identity: Option<Identity>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots.add((*der).clone()).expect("a trust anchor");
    }
    let builder = rustls::ClientConfig::builder_with_provider(permd::http::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(vec![cert], key)
            .expect("a client certificate"),
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A certificate authority of a test's own.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a CA key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (its subject alternative names) and common name `cn`,
    /// and its key, both PEM.
    pub fn sign(&self, names: &[&str], cn: &str) -> (String, String) {
        let (cert, key) = self.signed(names, cn);
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate with common name `cn`, and its key.
    pub fn identity(&self, cn: &str) -> Identity {
        let (cert, key) = self.signed(&[], cn);
        (
            cert.der().clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    /// [`TestCa::sign`], with serial number `serial` (for a revocation list to name).
    pub fn sign_numbered(&self, names: &[&str], cn: &str, serial: u64) -> (String, String) {
        let (cert, key) = self.signed_with(names, cn, Some(serial));
        (cert.pem(), key.serialize_pem())
    }

    /// A revocation list of this CA's that revokes the certificates numbered `serials`, PEM.
    pub fn crl(&self, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from(1_u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(serial),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("sign a revocation list")
            .pem()
            .expect("a revocation list as PEM")
    }

    fn signed(&self, names: &[&str], cn: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        self.signed_with(names, cn, None)
    }

    fn signed_with(
        &self,
        names: &[&str],
        cn: &str,
        serial: Option<u64>,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert, key)
    }

    /// Writes the CA's certificate to a file of `dir`, for `sslrootcert`.
    pub fn file(&self, dir: &std::path::Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("write the CA's certificate");
        path.display().to_string()
    }
}

/// `key` (PEM, PKCS#8) encrypted with `password` as `openssl pkcs8 -topk8 -v2
/// aes-256-cbc` writes it (PBES2: PBKDF2-SHA256, AES-256-CBC).
pub fn encrypted_key(key: &str, password: &str) -> String {
    let (_, plain) = pkcs8::SecretDocument::from_pem(key).expect("the key's PEM");
    let info = pkcs8::PrivateKeyInfoRef::try_from(plain.as_bytes()).expect("a PKCS#8 key");
    let params =
        pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(2048, &[7; 16], [9; 16])
            .expect("PBES2 parameters");
    info.encrypt_with_params(params, password)
        .expect("encrypt the key")
        .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
        .expect("the encrypted key's PEM")
        .to_string()
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of this test's own (for tests that stop and restart it).
pub fn own_cluster(port: Option<u16>) -> Cluster {
    init_logs();
    Cluster::start(&ClusterOptions {
        unsafe_fast: true,
        port,
        ..ClusterOptions::default()
    })
    .expect("start a throwaway Postgres")
}

/// The cluster shared by the tests of one test binary.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| own_cluster(None))
}

/// One fresh, migrated database.
pub struct TestDb {
    pub url: String,
    /// The same database over the cluster's Unix socket (key=value form).
    pub unix_url: String,
    pub pool: PgPool,
}

/// Creates a database on the shared cluster and applies the migrations.
pub async fn database() -> TestDb {
    database_on(cluster()).await
}

/// One fresh, migrated database on the shared cluster in the server encoding `encoding`
/// (`SQL_ASCII` stores text of any bytes, as it came).
pub async fn database_in_encoding(encoding: &str) -> TestDb {
    let db = unmigrated_named_on(
        cluster(),
        &next_database_name(),
        &format!("ENCODING '{encoding}' TEMPLATE template0"),
    )
    .await;
    permd::db::migrate(&db.pool).await.expect("migrate");
    db
}

/// Creates a database on `cluster` and applies the migrations.
pub async fn database_on(cluster: &Cluster) -> TestDb {
    let db = unmigrated_on(cluster).await;
    permd::db::migrate(&db.pool).await.expect("migrate");
    db
}

/// A fresh database on the shared cluster without permd's schema.
pub async fn unmigrated_database() -> TestDb {
    unmigrated_on(cluster()).await
}

async fn unmigrated_on(cluster: &Cluster) -> TestDb {
    unmigrated_named_on(cluster, &next_database_name(), "").await
}

/// A database name no other test of this process uses.
fn next_database_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates the database `name` on `cluster` and applies the migrations: for a test that
/// needs the same name on a second cluster.
pub async fn database_named_on(cluster: &Cluster, name: &str) -> TestDb {
    let db = unmigrated_named_on(cluster, name, "").await;
    permd::db::migrate(&db.pool).await.expect("migrate");
    db
}

/// Creates the database `name` on `cluster`, with `options` to `CREATE DATABASE`.
async fn unmigrated_named_on(cluster: &Cluster, name: &str, options: &str) -> TestDb {
    let admin = permd::db::pool(&cluster.url("postgres"))
        .await
        .expect("connect as admin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} {options}"
    )))
    .execute(&admin)
    .await
    .expect("create database");
    admin.close().await;
    let url = cluster.url(name);
    let pool = permd::db::pool(&url)
        .await
        .expect("connect to the test database");
    let unix_url = format!(
        "host='{}' port={} user=postgres dbname={name}",
        cluster.dir().display(),
        cluster.port()
    );
    TestDb {
        url,
        unix_url,
        pool,
    }
}

/// Why a daemon of `url` cannot connect: the error its first failed attempt reports
/// (it is then stopped).
pub async fn daemon_refused(url: &str) -> String {
    let daemon = TestDaemon::spawn(SyncConfig::new(url), patient());
    let error = daemon.failed_attempts(1).await;
    daemon.stop().await;
    error
}

/// Why the one-off commands' pool refuses `url` (the error and its causes); fails the
/// test if it connects.
pub async fn pool_refused(url: &str) -> String {
    match permd::db::pool(url).await {
        Ok(_) => panic!("{url}: connected"),
        Err(error) => format!("{error:#}"),
    }
}

/// Creates a database on the shared cluster with the core and the reference model.
pub async fn model_database() -> TestDb {
    let db = database().await;
    permd::db::migrate_reference_model(&db.pool)
        .await
        .expect("migrate the reference model");
    db
}

impl TestDb {
    /// Runs a batch of statements (simple protocol, one implicit transaction).
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Sets `setting` to `value` (SQL, a literal or `DEFAULT`) for this database's new
    /// sessions (`ALTER DATABASE … SET`): what a DBA sets for the application's sake.
    pub async fn set_for_new_sessions(&self, setting: &str, value: &str) {
        let value = value.replace('\'', "''");
        self.exec(&format!(
            "DO $$ BEGIN
               EXECUTE format('ALTER DATABASE %I SET {setting} = {value}', current_database());
             END $$"
        ))
        .await;
    }

    /// Terminates the backend of the sync connection of every daemon on this database
    /// (its session named `permd`), which a daemon answers with a new session; asserts
    /// there was one.
    pub async fn terminate_sync_sessions(&self) {
        let terminated: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'permd'",
        )
        .fetch_one(&self.pool)
        .await
        .expect("terminate the sync connection's backend");
        assert!(terminated, "no session of permd's to terminate");
    }

    /// Whether a session of this database named `permd` (a daemon's sync connection)
    /// matches `condition`, on `pg_stat_activity`'s columns.
    pub async fn a_sync_session(&self, condition: &str) -> bool {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) > 0 FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'permd'
               AND {condition}"
        )))
        .fetch_one(&self.pool)
        .await
        .expect("pg_stat_activity")
    }

    /// How many sessions of this database are named `application_name`.
    pub async fn sessions_named(&self, application_name: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(application_name)
        .fetch_one(&self.pool)
        .await
        .expect("pg_stat_activity")
    }

    /// How many sessions of this database wait for a lock (a row's, an advisory one).
    pub async fn lock_waiters(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&self.pool)
        .await
        .expect("pg_stat_activity")
    }

    /// Runs `sql` in its own transaction and returns its write token.
    pub async fn write(&self, sql: &str) -> String {
        let (tx, token) = self.open_write(sql).await;
        tx.commit().await.expect("commit");
        token
    }

    /// Runs `sql` in a transaction left open, for the caller to commit (or drop), and
    /// returns it with its write token.
    pub async fn open_write(
        &self,
        sql: &str,
    ) -> (sqlx::Transaction<'static, sqlx::Postgres>, String) {
        let mut tx = self.pool.begin().await.expect("begin");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let token: String = sqlx::query_scalar("SELECT permd.write_token()")
            .fetch_one(&mut *tx)
            .await
            .expect("write token");
        (tx, token)
    }

    /// A new login role, named `name` within this test's database (roles belong to the
    /// cluster, which tests share), given `grants` (`{role}` stands for its name): a pool
    /// connected as it, and its URL.
    pub async fn role(&self, name: &str, grants: &str) -> (PgPool, String) {
        let database: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&self.pool)
            .await
            .expect("current database");
        let role = format!("{database}_{name}");
        self.exec(&format!(
            "CREATE ROLE {role} LOGIN; {}",
            grants.replace("{role}", &role)
        ))
        .await;
        let url = self.url.replacen("postgres@", &format!("{role}@"), 1);
        assert_ne!(url, self.url, "the test URL names its user");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect as the new role");
        (pool, url)
    }

    /// `permd.digest()`.
    pub async fn digest(&self) -> String {
        sqlx::query_scalar("SELECT permd.digest()")
            .fetch_one(&self.pool)
            .await
            .expect("digest")
    }
}

/// An in-process daemon: a real applier against the test database and the real API service.
pub struct TestDaemon {
    pub store: Store,
    pub status: Status,
    pub api: Api,
    shutdown: CancellationToken,
    applier: tokio::task::JoinHandle<()>,
}

impl TestDaemon {
    /// Starts with default settings (but `at_least` waits up to the test deadline) and
    /// waits until loaded and caught up.
    pub async fn start(url: &str) -> Self {
        Self::start_with(SyncConfig::new(url), patient()).await
    }

    pub async fn start_with(sync: SyncConfig, http: HttpConfig) -> Self {
        let daemon = Self::spawn(sync, http);
        daemon
            .wait_for("ready", || daemon.status.is_ready(60.0))
            .await;
        daemon
    }

    /// Starts without waiting for anything: for a daemon that cannot connect yet.
    pub fn spawn(sync: SyncConfig, http: HttpConfig) -> Self {
        let store = Store::new();
        let status = Status::default();
        let shutdown = CancellationToken::new();
        let applier =
            tokio::spawn(Applier::new(store.clone(), status.clone(), sync).run(shutdown.clone()));
        let api = Api::new(App::new(store.clone(), status.clone(), http));
        Self {
            store,
            status,
            api,
            shutdown,
            applier,
        }
    }

    /// Waits until `attempts` connection attempts have failed, checks that the daemon is
    /// then neither connected nor loaded, and returns the last error it reports.
    pub async fn failed_attempts(&self, attempts: u64) -> String {
        // Not connected as well: the next attempt's connection may already be up (and
        // waiting to fail again) when the count moves.
        self.wait_for("failed connection attempts", || {
            let report = self.status.report();
            report.reconnects >= attempts && !report.connected
        })
        .await;
        let report = self.status.report();
        assert!(!report.connected && !report.loaded, "{report:?}");
        report.last_error.expect("the failure is reported")
    }

    /// Polls `condition` until it holds, failing the test after `DEADLINE`.
    pub async fn wait_for(&self, what: &str, mut condition: impl FnMut() -> bool) {
        wait_until(what, || std::future::ready(condition())).await;
    }

    /// Waits until the status report satisfies `condition`, failing the test after
    /// `DEADLINE`.
    pub async fn wait_for_report(&self, what: &str, condition: impl Fn(&StatusReport) -> bool) {
        self.wait_for(what, || condition(&self.status.report()))
            .await;
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send(Request::get(uri).body(Body::empty()).expect("request"))
            .await
    }

    pub async fn post(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        self.send(request).await
    }

    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        send(&self.api, request).await
    }

    /// Asserts that a full load is under way beside the polls (`/v1/status`
    /// `full_load_running`), for a reason that says `reason`.
    pub fn assert_loading_beside_the_polls(&self, reason: &str) {
        let running = self
            .status
            .report()
            .full_load_running
            .expect("a load under way");
        assert!(
            running.beside_polls && running.reason.contains(reason),
            "{running:?}"
        );
    }

    /// Whether a check with `token` would be answered at once: its write applied, and the
    /// watermark confirmed (`Store::passed`).
    pub fn token_passed(&self, token: &str) -> bool {
        let xid = permd::store::Xid(token.parse().expect("a token is an xid"));
        self.store.passed(xid).is_some()
    }

    /// `GET /v1/check` with `at_least`, returning `allowed`.
    pub async fn check(
        &self,
        subject: &str,
        permission: &str,
        object: &str,
        at_least: &str,
    ) -> bool {
        let uri = format!(
            "/v1/check?subject={}&permission={}&object={}&at_least={at_least}",
            enc(subject),
            enc(permission),
            enc(object)
        );
        let (status, body) = self.get(&uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        body["allowed"].as_bool().expect("allowed is a bool")
    }

    /// The daemon's digest once the write behind `token` is applied.
    pub async fn digest_at(&self, token: &str) -> String {
        let (status, body) = self.get(&format!("/v1/digest?at_least={token}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["digest"].as_str().expect("digest").to_owned()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.applier)
            .await
            .expect("applier stops")
            .expect("applier ran");
    }
}

/// Default HTTP settings, but `at_least` waits up to the test deadline: tests share one
/// cluster, and another test's open transaction holds back every database's horizon.
pub fn patient() -> HttpConfig {
    HttpConfig {
        max_wait: DEADLINE,
        ..HttpConfig::default()
    }
}

/// Sends one request through `service` (the API, or the bare router) and returns the
/// status, the content type and the body bytes of the answer.
pub async fn call<S>(service: S, request: Request<Body>) -> (StatusCode, Option<String>, Vec<u8>)
where
    S: tower::Service<Request<Body>, Response = Response, Error = std::convert::Infallible>,
{
    use tower::ServiceExt as _;
    parts(service.oneshot(request).await.expect("infallible service")).await
}

/// The status, the content type and the body bytes of `response`.
pub async fn parts(response: Response) -> (StatusCode, Option<String>, Vec<u8>) {
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, content_type, body.to_vec())
}

/// Sends one request through the API service (fast path, then router) and parses the
/// JSON answer.
pub async fn send(api: &Api, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, bytes) = call(api.clone(), request).await;
    (status, json_or_text(&bytes))
}

/// A body as JSON, or, when it is not JSON, its text as a JSON string.
pub fn json_or_text(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Waits until the async `condition` holds, failing after `DEADLINE`.
pub async fn wait_until<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Percent-encodes a query value.
pub fn enc(value: &str) -> String {
    let mut out = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A small deterministic PRNG (splitmix64), so a failing seed can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
