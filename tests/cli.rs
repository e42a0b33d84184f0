//! The `permd` binary end to end: `migrate`, `serve` over a real socket, SIGTERM, and the
//! refusal to listen beyond loopback without a token.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bouncer::{Bouncer, PoolMode};
use common::{database, wait_until, DEADLINE};
use permd::shard::Shard;

fn permd() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_permd"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("PERMD_TOKEN")
        .env("PERMD_LOG", "info");
    command
}

/// Runs `command` to its end and returns its output; fails the test (and kills it) if it
/// is still running after `DEADLINE`.
fn output_within_deadline(mut command: Command) -> std::process::Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run permd");
    let pid = child.id();
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match output.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("permd's output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("permd still running after {DEADLINE:?}");
        }
    }
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, "")
}

/// A GET with extra header lines (each ending in CRLF).
fn http_get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String)> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    exchange(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"),
    )
}

/// Sends `request` (which asks to close the connection) and reads the answer: (status,
/// body).
fn exchange(mut stream: impl Read + Write, request: &str) -> Option<(u16, String)> {
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Some((status, body))
}

/// The TCP port process `pid` listens on (IPv4), if it listens yet: its socket's inode
/// found among its open files and in the kernel's table of sockets.
fn listening_port(pid: u32) -> Option<u16> {
    let sockets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|row| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        // local address, state (0A: listening), inode
        let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
        if *state != "0A" || !sockets.iter().any(|s| s == inode) {
            return None;
        }
        u16::from_str_radix(local.split(':').nth(1)?, 16).ok()
    })
}

/// Waits until `running` listens, and returns its port. Ports are the kernel's choice
/// (`--listen 127.0.0.1:0`): a port a test picked and let go could be taken by another
/// test's connection before permd binds it.
fn listening(running: &mut Running) -> u16 {
    let started = Instant::now();
    loop {
        if let Some(port) = listening_port(running.0.id()) {
            return port;
        }
        assert!(
            running.0.try_wait().expect("wait").is_none(),
            "permd exited before it listened"
        );
        assert!(started.elapsed() < DEADLINE, "permd never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_serve_and_stop_on_sigterm() {
    let db = database().await;
    // migrate is idempotent: the harness already applied it.
    let migrated = permd()
        .args(["migrate", "--database-url", &db.url])
        .output()
        .expect("run permd migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    // The reference model goes on top of the core, beside rows the model does not own.
    let migrated = permd()
        .args(["migrate", "--reference-model", "--database-url", &db.url])
        .output()
        .expect("run permd migrate --reference-model");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    db.exec(
        "INSERT INTO app.users (id, email) VALUES (7, 'u7@example.com'); \
         INSERT INTO app.resources VALUES (1, 'folder', 'home', NULL, 7);",
    )
    .await;

    let (mut running, port) = serve(&db.url, &[], &[]).await;
    let (status, body) =
        http_get(port, "/v1/check?subject=u1&permission=read&object=doc:1").expect("check");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");
    let (status, body) = http_get(
        port,
        "/v1/check?subject=user:7&permission=delete&object=resource:1",
    )
    .expect("check");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");

    let (exit, _, log) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
}

/// Transaction ids restored from another cluster (a changelog row and a pruning mark above
/// this cluster's ids, as a dump restored elsewhere brings them) are warned of once, at the
/// first session's start, and not again at each reconnect's while they stay as they were.
/// Before session 62 every session's start warned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_transaction_ids_are_warned_of_once() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.changelog (xid, kind, subject, object, created_at)
             VALUES ((pg_current_xact_id()::text::int8 + 5000000)::text::xid8, 't',
                     'user:1', 'doc:1', now() - interval '1 hour');
         UPDATE permd.retention
         SET pruned_xid = (pg_current_xact_id()::text::int8 + 4000000)::text::xid8,
             pruned_id = 7;",
    )
    .await;
    let (mut running, port) = serve(&db.url, &[], &[]).await;
    for reconnects in 1..=2 {
        db.terminate_sync_sessions().await;
        wait_until("the reconnect", || {
            std::future::ready(http_get(port, "/v1/status").is_some_and(|(_, body)| {
                body.contains(&format!("\"reconnects\":{reconnects},"))
                    && body.contains("\"connected\":true")
            }))
        })
        .await;
        // A write's token answered: the session is past its start's look.
        let token = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('user:{reconnects}', 'doc:1', 'read', NULL)"
            ))
            .await;
        let (status, body) = http_get(
            port,
            &format!(
                "/v1/check?subject=user:{reconnects}&permission=read&object=doc:1&at_least={token}"
            ),
        )
        .expect("check");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"allowed\":true"), "{body}");
    }
    let (exit, _, log) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
    assert_eq!(log.matches("permd passes over them").count(), 1, "{log}");
}

/// `--unix-socket`: the daemon answers on a Unix socket too (checks, batches, the token
/// asked as over TCP), replaces a socket file left by a process that is gone, refuses a
/// path a live process listens on or that is not a socket, and removes its file at exit;
/// with `--listen none` it serves there only (its file of the mode asked), and `permd
/// verify --permd unix:PATH` proves it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_on_a_unix_socket_too() {
    let db = database().await;
    readers(&db, 2).await;
    let scratch = common::scratch::Scratch::new("unix");
    let path = scratch.join("permd.sock");
    // What a killed daemon leaves: the file, with nothing listening.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("a socket to leave"));
    let path_arg = path.to_str().expect("a UTF-8 path");
    let token = [("PERMD_TOKEN", "sesame")];
    let (mut running, port) = serve(&db.url, &["--unix-socket", path_arg], &token).await;

    let over_unix = |request: &str| {
        let stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a timeout");
        exchange(stream, request).expect("an answer")
    };
    let auth = "Authorization: Bearer sesame\r\n";
    let check = |headers: &str| {
        over_unix(&format!(
            "GET /v1/check?subject=user:2&permission=read&object=doc:1 HTTP/1.1\r\n\
             Host: permd\r\n{headers}Connection: close\r\n\r\n"
        ))
    };
    let (status, body) = check(auth);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");
    let (status, body) = check("");
    assert_eq!(status, 401, "{body}");
    let batch = r#"{"checks":[{"subject":"user:1","permission":"read","object":"doc:1"},{"subject":"user:3","permission":"read","object":"doc:1"}]}"#;
    let (status, body) = over_unix(&format!(
        "POST /v1/check HTTP/1.1\r\nHost: permd\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{batch}",
        batch.len()
    ));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[true,false]"), "{body}");
    // TCP still serves.
    let (status, body) = http_get_with(
        port,
        "/v1/check?subject=user:1&permission=read&object=doc:1",
        auth,
    )
    .expect("an answer over TCP");
    assert_eq!(status, 200, "{body}");

    // A second daemon on the same path is refused at start, and leaves the file alone.
    let refused = |path: &str| {
        let mut command = permd();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--unix-socket", path])
            .env("DATABASE_URL", &db.url);
        let output = output_within_deadline(command);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let error = refused(path_arg);
    assert!(
        error.contains("another process is listening on it") && error.contains(path_arg),
        "{error}"
    );
    assert_eq!(check(auth).0, 200, "the first daemon still answers");
    let file = scratch.join("not-a-socket");
    std::fs::write(&file, "data").expect("a file");
    let error = refused(file.to_str().expect("a UTF-8 path"));
    assert!(error.contains("is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).expect("the file"), "data");

    let (exit, _, log) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}: {log}");
    assert!(!path.exists(), "the socket file is removed at exit");

    // `--listen none`: the socket only, no TCP port.
    let mut running = Running(
        permd()
            .args(["serve", "--listen", "none", "--unix-socket", path_arg])
            .args(["--unix-socket-mode", "660"])
            .env("DATABASE_URL", &db.url)
            .env("PERMD_TOKEN", "sesame")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start permd serve"),
    );
    wait_until("readyz 200 over the socket", || {
        let ready = std::os::unix::net::UnixStream::connect(&path)
            .ok()
            .and_then(|stream| {
                exchange(
                    stream,
                    "GET /readyz HTTP/1.1\r\nHost: permd\r\nConnection: close\r\n\r\n",
                )
            });
        std::future::ready(ready.is_some_and(|(status, _)| status == 200))
    })
    .await;
    let (status, body) = check(auth);
    assert_eq!(status, 200, "{body}");
    assert_eq!(listening_port(running.0.id()), None, "no TCP port");
    let mode = std::fs::metadata(&path)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "--unix-socket-mode");
    // `permd verify` reaches it there.
    let mut verifying = verify(&db.url, &format!("unix:{path_arg}"));
    verifying.env("PERMD_TOKEN", "sesame");
    let output = output_within_deadline(verifying);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("in sync"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (exit, _, log) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}: {log}");
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[test]
fn listening_beyond_loopback_without_a_token_is_refused() {
    let output = permd()
        .args([
            "serve",
            "--database-url",
            "postgres://nowhere/db",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .expect("run permd serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without a token"),
        "{stderr}"
    );
}

/// A database URL the daemon could never connect with stops it at start with the reason,
/// where it was retried for ever (a CA file that is not there, an unknown option); so do
/// `migrate` and the other one-off commands.
#[test]
fn a_database_url_that_can_never_connect_is_refused_at_start() {
    for (url, reason) in [
        (
            "postgres://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert=/nonexistent/ca.pem: I/O error: No such file",
        ),
        (
            "postgres://u@127.0.0.1:1/db?sslmode=verify-fully",
            "sslmode=verify-fully is not one of",
        ),
        (
            "host=127.0.0.1 dbname=db frobnicate=1",
            "unknown option `frobnicate`",
        ),
    ] {
        let mut serve = permd();
        serve.args(["serve", "--database-url", url, "--listen", "127.0.0.1:0"]);
        let mut migrate = permd();
        migrate.args(["migrate", "--database-url", url]);
        for command in [serve, migrate] {
            let output = output_within_deadline(command);
            assert!(!output.status.success(), "{url}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains(reason), "{url}: {stderr}");
        }
    }
}

/// The one-off commands read libpq's key=value form too, as `serve` does (sqlx, under them,
/// reads URLs only, and said "relative URL without a base"), over TCP and the Unix socket;
/// several servers, which they would not try in turn, are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_takes_the_key_value_form_too() {
    let db = database().await;
    let (host, port) = db
        .url
        .rsplit_once('@')
        .and_then(|(_, at)| at.split_once('/'))
        .and_then(|(address, _)| address.split_once(':'))
        .expect("host:port in the test URL");
    let name = db.url.rsplit('/').next().expect("a database name");
    let tcp = format!("host={host} port = '{port}' user=postgres dbname={name}");
    for pairs in [&tcp, &db.unix_url] {
        let mut migrate = permd();
        migrate.args(["migrate", "--database-url", pairs]);
        let output = output_within_deadline(migrate);
        assert!(
            output.status.success(),
            "{pairs}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stderr = migrate_fails(&format!(
        "host=127.0.0.2,{host} port={port} user=postgres dbname={name}"
    ));
    assert!(stderr.contains("name the primary alone"), "{stderr}");
}

/// `statement_timeout` on a connection of the one-off commands' pool for `url`.
async fn one_off_statement_timeout(url: &str) -> String {
    let pool = permd::db::pool(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e:#}"));
    let timeout = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("SHOW statement_timeout");
    pool.close().await;
    timeout
}

/// The one-off commands hand sqlx the server options alone, from either form of the URL,
/// and tell it the rest: given the whole URL, sqlx warned of each parameter it does not
/// know (which permd reads), and it could not read the key=value form's `options=`. The
/// daemon reads libpq's parameters that tokio-postgres does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_parameters_are_read_and_the_one_off_commands_warn_of_none() {
    let db = database().await;
    let pairs = format!("{} options='-c statement_timeout=4321'", db.unix_url);
    assert_eq!(one_off_statement_timeout(&pairs).await, "4321ms");
    let url = format!(
        "{}?connect_timeout=5&target_session_attrs=any&keepalives_idle=30\
         &options=-c%20statement_timeout%3D4322",
        db.url
    );
    assert_eq!(one_off_statement_timeout(&url).await, "4322ms");
    let output = Command::new(env!("CARGO_BIN_EXE_permd"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("run permd migrate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("unrecognized"), "{stderr}");

    // libpq's parameters that tokio-postgres does not know, read by the daemon too.
    let libpq = format!(
        "{}?client_encoding=UTF8&fallback_application_name=permd-libpq&keepalives_count=3\
         &krbsrvname=postgres&gssencmode=disable",
        db.url
    );
    let daemon = common::TestDaemon::start(&libpq).await;
    assert_eq!(db.sessions_named("permd-libpq").await, 1);
    daemon.stop().await;
}

/// The one-off commands lift a `statement_timeout` set for the database (sized for the
/// application's queries, it would cancel a migration or `verify`'s digest of a large
/// set), as the daemon does; one the URL names is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_off_commands_lift_the_database_statement_timeout() {
    let db = database().await;
    db.set_for_new_sessions("statement_timeout", "'7s'").await;
    assert_eq!(one_off_statement_timeout(&db.url).await, "0");
    let own = format!("{}?options=-c%20statement_timeout%3D4323", db.url);
    assert_eq!(one_off_statement_timeout(&own).await, "4323ms");
    // A new session of the test's own, which the database's setting reaches.
    let fresh = sqlx::PgPool::connect(&db.url).await.expect("connect");
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&fresh)
        .await
        .expect("SHOW statement_timeout");
    assert_eq!(timeout, "7s");
    fresh.close().await;
}

/// libpq's environment, read by `serve` and the one-off commands alike (sqlx read it for
/// the one-off commands only, and `serve` did not): a URL that names nothing but the
/// scheme, the server, user and database from `PG*` variables, the password from the
/// password file. A password rotated in the file is used at the next reconnect, without a
/// restart; a file that others may read is not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_and_the_password_file_are_read_as_libpq_reads_them() {
    let cluster = common::own_cluster(None);
    let db = common::database_on(&cluster).await;
    let name = db
        .url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_owned();
    db.exec(
        "CREATE ROLE permd_pw LOGIN PASSWORD 'first-7f3a';
         GRANT USAGE ON SCHEMA permd TO permd_pw;
         GRANT SELECT ON ALL TABLES IN SCHEMA permd TO permd_pw;
         INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL);",
    )
    .await;
    std::fs::write(
        cluster.dir().join("data/pg_hba.conf"),
        "host all permd_pw 127.0.0.1/32 scram-sha-256\n\
         local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
    )
    .expect("write pg_hba.conf");
    db.exec("SELECT pg_reload_conf()").await;
    let bare = format!("postgres://permd_pw@127.0.0.1:{}/{name}", cluster.port());
    wait_until("the server to ask permd_pw for its password", || {
        let url = bare.clone();
        async move { permd::db::pool(&url).await.is_err() }
    })
    .await;
    let passfile = cluster.dir().join("pgpass");
    let write_passfile = |password: &str| {
        std::fs::write(
            &passfile,
            format!(
                "# host:port:database:user:password\n127.0.0.1:{}:{name}:permd_pw:{password}\n",
                cluster.port()
            ),
        )
        .expect("write the password file");
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 0600");
    };
    write_passfile("first-7f3a");
    let port = cluster.port().to_string();
    let passfile_text = passfile.display().to_string();
    let env = [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGDATABASE", name.as_str()),
        ("PGUSER", "permd_pw"),
        ("PGPASSFILE", passfile_text.as_str()),
    ];

    let (mut running, http) = serve("postgres://", &[], &env).await;
    let (status, body) =
        http_get(http, "/v1/check?subject=u1&permission=read&object=doc:1").expect("check");
    assert_eq!(
        (status, body.contains("\"allowed\":true")),
        (200, true),
        "{body}"
    );
    let verify_with = |env: &[(&str, &str)]| {
        let mut command = verify("postgres://", &format!("http://127.0.0.1:{http}"));
        command.envs(env.iter().copied());
        output_within_deadline(command)
    };
    let output = verify_with(&env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The URL's `passfile` names the file too (before session 34 it was refused).
    let mut command = verify(
        &format!("postgres://?passfile={passfile_text}"),
        &format!("http://127.0.0.1:{http}"),
    );
    command.envs(
        env.iter()
            .copied()
            .filter(|(name, _)| *name != "PGPASSFILE"),
    );
    let output = output_within_deadline(command);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Rotated: the new password in the database and the file, the old connection cut.
    db.exec("ALTER ROLE permd_pw PASSWORD 'second-9c1d'").await;
    write_passfile("second-9c1d");
    db.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'permd_pw'")
        .await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('u2', 'doc:1', 'read', NULL)")
        .await;
    wait_until("permd to reconnect with the rotated password", || {
        let answer = http_get(
            http,
            &format!("/v1/check?subject=u2&permission=read&object=doc:1&at_least={token}"),
        );
        std::future::ready(
            answer.is_some_and(|(status, body)| status == 200 && body.contains("\"allowed\":true")),
        )
    })
    .await;

    // Readable by its group: not read, with the reason, and the password is missing.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o640))
        .expect("chmod 0640");
    let output = verify_with(&env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("group or world access"), "{stderr}");
    let (exit, _, _) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
}

/// A service of the service file names the database for `serve` and the one-off commands
/// alike, by `service=` or `PGSERVICE`, with what the URL leaves out; one found nowhere is
/// refused with its name (before session 35 every `service` was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_of_the_service_file_names_the_database() {
    let db = database().await;
    readers(&db, 1).await;
    // The test database over the cluster's Unix socket, as a service file writes it.
    let parameters = service_parameters(&db);
    let scratch = common::scratch::Scratch::new("services");
    let file = scratch.join("services");
    let write_service = |application_name: &str| {
        std::fs::write(
            &file,
            format!("[permd_it]\n{parameters}\napplication_name={application_name}\n"),
        )
        .expect("write the service file");
    };
    write_service("permd-service");
    let file_text = file.display().to_string();
    let env = [("PGSERVICEFILE", file_text.as_str())];

    let (mut running, http) = serve("service=permd_it", &[], &env).await;
    reads(http, 1);
    assert_eq!(db.sessions_named("permd-service").await, 1);
    // Changed, and the connection cut: the reconnect reads the file again.
    write_service("permd-service-2");
    db.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'permd-service'",
    )
    .await;
    wait_until("permd to reconnect as the changed service says", || async {
        db.sessions_named("permd-service-2").await == 1
    })
    .await;

    verified_through_the_service(&env, http);
    let permd_url = format!("http://127.0.0.1:{http}");
    let mut command = verify("postgres://?service=elsewhere", &permd_url);
    command.envs(env);
    let output = output_within_deadline(command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("definition of service \"elsewhere\" not found"),
        "{stderr}"
    );
    let (exit, _, _) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
}

/// A service changed to name another database of the same server, the daemon's
/// connection then cut: the next session, which reads the file again, reaches the other
/// database, and loads it in full ("another database than the last session's"), so
/// `verify` finds the daemon equal to it. Before (session 60), the server and its
/// incarnation unchanged, the daemon caught up from the first database's cursor on the
/// second's changelog and kept the first's rows: `verify` found them differing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_moved_to_another_database_is_loaded_from_it() {
    let first = database().await;
    let second = database().await;
    readers(&first, 3).await;
    second
        .exec("INSERT INTO permd.tuples VALUES ('user:9', 'doc:1', 'read', NULL)")
        .await;
    let scratch = common::scratch::Scratch::new("moved-service");
    let file = scratch.join("services");
    let write_service = |db: &common::TestDb| {
        let parameters = service_parameters(db);
        std::fs::write(&file, format!("[permd_it]\n{parameters}\n"))
            .expect("write the service file");
    };
    write_service(&first);
    let file_text = file.display().to_string();
    let env = [("PGSERVICEFILE", file_text.as_str())];
    let (mut running, http) = serve("service=permd_it", &[], &env).await;
    reads(http, 1);

    write_service(&second);
    first
        .exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'permd'",
        )
        .await;
    wait_until("permd to reconnect to the second database", || async {
        second.sessions_named("permd").await == 1
    })
    .await;
    verified_through_the_service(&env, http);
    let (status, body) = http_get(http, "/v1/status").expect("the status");
    assert_eq!(status, 200);
    assert!(
        body.contains("another database than the last session's"),
        "{body}"
    );
    let (exit, _, _) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
}

/// `permd verify` of the daemon listening on `http` against the service `permd_it` of the
/// service file `env` names (`PGSERVICEFILE`), which must find the two equal.
fn verified_through_the_service(env: &[(&str, &str)], http: u16) {
    let mut command = verify("postgres://", &format!("http://127.0.0.1:{http}"));
    command
        .envs(env.iter().copied())
        .env("PGSERVICE", "permd_it");
    let output = output_within_deadline(command);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The lines of a service file's entry for `db` over the cluster's Unix socket.
fn service_parameters(db: &common::TestDb) -> String {
    let parameters: Vec<String> = db
        .unix_url
        .split_whitespace()
        .map(|pair| pair.replace('\'', ""))
        .collect();
    parameters.join("\n")
}

/// `permd serve` of `url` over HTTPS with `cert` and `key`, its log to `stderr`, once it
/// listens (it may not have loaded yet).
fn serve_https(
    url: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
    stderr: Stdio,
) -> (Running, u16) {
    let mut command = permd();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut running = Running(command.spawn().expect("start permd serve"));
    let port = listening(&mut running);
    (running, port)
}

/// Checks that `permd verify` exited 1 saying that `subjects` subjects differ, and
/// returns its report (stdout).
fn differs(output: &std::process::Output, subjects: usize) -> String {
    verify_failed(
        output,
        &format!("differs from the database in {subjects} subject(s)"),
    )
}

/// What `permd verify` printed, having said that `daemons` daemons behind a router could
/// not be verified (exit 1).
fn unverified(output: &std::process::Output, daemons: usize) -> String {
    verify_failed(
        output,
        &format!("{daemons} daemon(s) could not be verified"),
    )
}

/// Checks that `permd verify` exited 1 with `said` in its error, and returns its stdout.
fn verify_failed(output: &std::process::Output, said: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains(said), "{stderr}");
    stdout
}

/// `permd verify` of the daemon at `permd_url` against `database_url`.
fn verify(database_url: &str, permd_url: &str) -> Command {
    let mut verify = permd();
    verify.args([
        "verify",
        "--database-url",
        database_url,
        "--permd",
        permd_url,
    ]);
    verify
}

/// Runs `permd migrate` against `url`, checks that it fails, and returns what it said.
fn migrate_fails(url: &str) -> String {
    let mut migrate = permd();
    migrate.args(["migrate", "--database-url", url]);
    let output = output_within_deadline(migrate);
    assert!(!output.status.success(), "{url}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `migrate` (and every other one-off command) says why it cannot connect, where sqlx's
/// pool said only, after 30 s, that it had timed out.
#[test]
fn migrate_says_why_it_cannot_connect() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let stderr = migrate_fails(&format!("postgres://u@127.0.0.1:{port}/db"));
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

/// A one-off command interrupted (Ctrl-C, SIGINT) ends at once with an error, and takes
/// down what it set up: the relay's directory is removed, where the signal's default left
/// it behind in the temporary directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_one_off_command_cleans_up() {
    let db = database().await;
    // A daemon that takes the connection and never answers: verify waits on it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    silent.set_nonblocking(true).expect("nonblocking");
    let port = silent.local_addr().expect("address").port();
    let tmp = std::env::temp_dir().join(format!("permd-interrupted-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("create the command's TMPDIR");
    let mut command = verify(&db.url, &format!("http://127.0.0.1:{port}"));
    command
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut running = Running(command.spawn().expect("start permd verify"));
    let mut accepted = Vec::new();
    wait_until("verify to wait on the daemon, its relay up", || {
        accepted.extend(silent.accept().ok());
        let relays = std::fs::read_dir(&tmp).map_or(0, Iterator::count);
        std::future::ready(!accepted.is_empty() && relays == 1)
    })
    .await;
    let (exit, _, log) = signal_and_wait(&mut running, "INT").await;
    assert_eq!(exit.code(), Some(1), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    assert_left_nothing(&tmp, "the interrupted verify");
}

/// Checks that a command's `TMPDIR` holds nothing after it ended, and removes it.
fn assert_left_nothing(tmp: &std::path::Path, who: &str) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("read the TMPDIR")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(left.is_empty(), "{who} left {left:?} behind");
    let _ = std::fs::remove_dir(tmp);
}

/// The demo binds its addresses (TCP, and a Unix socket if asked) before it starts
/// Postgres and seeds (a minute at the default size): one in use fails at once.
#[test]
fn the_demo_fails_at_once_when_its_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let scratch = common::scratch::Scratch::new("demo-unix");
    let socket = scratch.join("taken.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&socket).expect("a socket");
    let socket = socket.to_str().expect("a UTF-8 path");
    for (args, said) in [
        (vec!["--listen", &address], "Address already in use"),
        (
            vec!["--listen", "127.0.0.1:0", "--unix-socket", socket],
            "another process is listening on it",
        ),
        (
            vec!["--shards", "2", "--unix-socket", socket],
            "the sharded demo (--shards) serves over TCP only",
        ),
        (
            vec!["--listen", "none", "--unix-socket", socket],
            "the demo prints its checks over TCP",
        ),
    ] {
        let mut demo = permd();
        demo.args(["demo", "--users", "100"]).args(&args);
        let output = output_within_deadline(demo);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(said), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("Postgres is up"),
            "started Postgres first: {stderr}"
        );
    }
}

#[test]
fn help_names_every_flag_and_variable() {
    let output = permd()
        .args(["serve", "--help"])
        .output()
        .expect("run permd serve --help");
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--database-url",
        "DATABASE_URL",
        "--listen",
        "PERMD_LISTEN",
        "--token",
        "PERMD_TOKEN",
        "127.0.0.1:7700",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
}

/// Starts `permd serve` on a port of the kernel's choosing with `args` and `env`, and waits
/// until ready.
async fn serve(url: &str, args: &[&str], env: &[(&str, &str)]) -> (Running, u16) {
    let mut command = permd();
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut running = Running(command.spawn().expect("start permd serve"));
    let port = listening(&mut running);
    wait_until("readyz 200", || {
        std::future::ready(http_get(port, "/readyz").is_some_and(|(s, _)| s == 200))
    })
    .await;
    (running, port)
}

/// Users 1 to `count` may read doc:1.
async fn readers(db: &common::TestDb, count: u32) {
    db.exec(&format!(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:1', 'read', NULL
         FROM generate_series(1, {count}) i"
    ))
    .await;
}

/// Checks, through what listens on `port`, that `user:{user}` may read doc:1 (as
/// `readers` wrote).
fn reads(port: u16, user: u32) {
    let (status, body) = http_get(
        port,
        &format!("/v1/check?subject=user:{user}&permission=read&object=doc:1"),
    )
    .expect("an answer");
    assert_eq!(status, 200, "user:{user}: {body}");
    assert!(body.contains("\"allowed\":true"), "user:{user}: {body}");
}

/// Sends SIGHUP (read the files again).
fn hangup(running: &Running) {
    assert!(Command::new("kill")
        .args(["-HUP", &running.0.id().to_string()])
        .status()
        .expect("kill")
        .success());
}

/// Sends SIGTERM and waits for the exit: (status, time to exit, the log).
async fn sigterm_and_wait(running: &mut Running) -> (std::process::ExitStatus, Duration, String) {
    signal_and_wait(running, "TERM").await
}

/// Sends `signal` (`TERM`, `INT`) and waits for the exit: (status, time to exit, the log).
async fn signal_and_wait(
    running: &mut Running,
    signal: &str,
) -> (std::process::ExitStatus, Duration, String) {
    let pid = running.0.id().to_string();
    assert!(Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill")
        .success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = running.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "permd did not exit after SIG{signal}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut log = String::new();
    if let Some(mut stderr) = running.0.stderr.take() {
        stderr.read_to_string(&mut log).expect("read log");
    }
    (exit, started.elapsed(), log)
}

/// `--log-format json` writes every log line as one JSON object, from start to exit, an
/// error included; a `--log` filter that cannot be read is refused, where it silently
/// became `info` before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_a_line() {
    let db = database().await;
    let (mut running, _port) = serve(&db.url, &["--log-format", "json"], &[]).await;
    let (exit, _, log) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "no {key}: {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "full load done" && line["rows"].is_number()),
        "{log}"
    );

    let mut migrate = permd();
    migrate.args([
        "--log-format",
        "json",
        "migrate",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/none",
    ]);
    let output = output_within_deadline(migrate);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error: serde_json::Value = serde_json::from_str(stderr.trim()).expect("one JSON line");
    assert_eq!(error["level"], "ERROR", "{stderr}");

    let mut bad_filter = permd();
    bad_filter.args(["--log", "permd=loud", "migrate", "--database-url", &db.url]);
    let output = output_within_deadline(bad_filter);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"permd=loud\" is not a log filter"),
        "{stderr}"
    );
}

/// A process whose open-file limit is low (systemd gives services a soft limit of 1,024):
/// permd raises the soft limit to the hard one, serves as many clients at once as that
/// allows (saying so), and lets the others wait to be accepted, where accepting past the
/// limit failed (`EMFILE`) and was retried every 50 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_raised_and_bounds_the_connections() {
    let db = database().await;
    let scratch = common::scratch::Scratch::new("nofile");
    let log = scratch.join("permd.log");
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            "ulimit -Sn 50 && ulimit -Hn 200 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_permd"),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", &db.url)
        .env("PERMD_LOG", "info")
        .env_remove("PERMD_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"));
    let mut running = Running(command.spawn().expect("start permd serve"));
    let port = listening(&mut running);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", running.0.id()))
        .expect("the process's limits");
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("an open-file limit");
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["200", "200"],
        "{open_files}"
    );
    // More clients than the 200 open files allow, each with a request
    // waiting; answers read in order, each connection closed once answered.
    let clients: Vec<TcpStream> = (0..250)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream
                .write_all(b"GET /livez HTTP/1.1\r\nhost: permd\r\n\r\n")
                .expect("write");
            stream
        })
        .collect();
    for (n, mut stream) in clients.into_iter().enumerate() {
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let mut answer = [0u8; 256];
        let read = stream.read(&mut answer).expect("an answer");
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 200"), "client {n}: {answer}");
    }
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(text.contains("raised the open-file limit"), "{text}");
    assert!(
        text.contains("at most 136 clients are served at once"),
        "{text}"
    );
    assert!(!text.contains("accept failed"), "{text}");
}

/// A daemon whose log reader went away (its stderr a pipe closed at the other end) goes on
/// syncing and still stops on SIGTERM: a failed log write must not take down the task that
/// wrote it (the applier, or the signal handler).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_neither_stops_sync_nor_sigterm() {
    let db = database().await;
    let (mut running, port) = serve(&db.url, &[], &[]).await;
    drop(running.0.stderr.take());
    // A reload logs at info: writes that now fail.
    db.exec("SELECT permd.request_reload()").await;
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    // The write may be answered before the reload (beside the polls) swaps in.
    wait_until("the write to be visible and the reload swapped in", || {
        std::future::ready(
            http_get(port, "/v1/check?subject=u1&permission=read&object=doc:1")
                .is_some_and(|(_, body)| body.contains("\"allowed\":true"))
                && http_get(port, "/v1/status")
                    .is_some_and(|(_, status)| status.contains("\"reloads\":2")),
        )
    })
    .await;
    let (exit, _, _) = sigterm_and_wait(&mut running).await;
    assert!(exit.success(), "exit status {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let db = database().await;
    let (mut running, port) = serve(
        &db.url,
        &["--max-wait-ms", "4000", "--shutdown-timeout-ms", "10000"],
        &[],
    )
    .await;
    // Requests in flight when SIGTERM arrives: each waits 4 s for a token that never
    // comes, then answers 503 stale. They must get that answer, not a reset.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                http_get(
                    port,
                    "/v1/check?subject=a&permission=b&at_least=99999999999",
                )
            })
        })
        .collect();
    // All four are in flight when the signal comes (the gauge counts the scrape too).
    wait_until("four requests in flight", || async {
        http_get(port, "/metrics").is_some_and(|(_, m)| m.contains("permd_in_flight 5"))
    })
    .await;
    let (exit, took, log) = sigterm_and_wait(&mut running).await;
    for request in in_flight {
        let (status, body) = request
            .join()
            .expect("client thread")
            .expect("an answer, not a reset");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("stale"), "{body}");
    }
    assert!(exit.success(), "exit status {exit}: {log}");
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
    println!(
        "SIGTERM with 4 requests in flight: all answered, exit after {:.2}s (deadline 10s)",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_others_served() {
    let db = database().await;
    let (_running, port) = serve(
        &db.url,
        &["--header-timeout-ms", "300", "--max-connections", "4"],
        &[],
    )
    .await;
    // Four slowloris clients take every connection slot, sending headers a byte at a time.
    // The well-behaved client connects once they all have: the kernel's accept queue is
    // first in, first out, so permd gives them the slots first.
    let connected = std::sync::Arc::new(std::sync::Barrier::new(5));
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let connected = std::sync::Arc::clone(&connected);
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let started = Instant::now();
                let _ = stream.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n");
                connected.wait();
                stream
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                for _ in 0..200 {
                    if stream.write_all(b"X").is_err() {
                        break;
                    }
                    let mut probe = [0u8; 64];
                    match stream.read(&mut probe) {
                        Ok(0) => break,
                        Ok(_) => break,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                started.elapsed()
            })
        })
        .collect();
    connected.wait();
    // A well-behaved client still gets in once the slow ones are cut off.
    let started = Instant::now();
    let (status, _) = http_get(port, "/livez").expect("served");
    assert_eq!(status, 200);
    let waited = started.elapsed();
    let mut cut = Vec::new();
    for s in slow {
        let held = s.join().expect("slow client");
        assert!(
            held < Duration::from_secs(9),
            "a slow client was cut off (held {held:?})"
        );
        cut.push(held.as_secs_f64());
    }
    println!(
        "slowloris x4 against 4 connection slots, header timeout 0.3s: cut off after {cut:.2?}s; \
         a normal client waited {:.2}s",
        waited.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_leaks() {
    let db = database().await;
    let secret = "tok-3f9a1c7e5b";
    let scratch = common::scratch::Scratch::new("token");
    let file = scratch.join("token");
    std::fs::write(&file, format!("{secret}\n")).expect("write token file");
    let file_arg = file.to_str().expect("utf-8 path").to_owned();
    for (args, env) in [
        (vec!["--log", "debug"], vec![("PERMD_TOKEN", secret)]),
        (
            vec!["--log", "debug", "--token-file", file_arg.as_str()],
            vec![],
        ),
    ] {
        let (mut running, port) = serve(&db.url, &args, &env).await;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", running.0.id())).expect("cmdline");
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(secret),
            "token in ps output"
        );
        let (status, body) = http_get(port, "/v1/status").expect("answer");
        assert_eq!(status, 401);
        let (wrong, wrong_body) =
            http_get_with(port, "/metrics", "Authorization: Bearer tok-3f9a1c7e5\r\n")
                .expect("answer");
        assert_eq!(wrong, 401);
        let auth = format!("Authorization: Bearer {secret}\r\n");
        let (ok, metrics) = http_get_with(port, "/metrics", &auth).expect("answer");
        assert_eq!(ok, 200);
        let (_, status_body) = http_get_with(port, "/v1/status", &auth).expect("answer");
        let (_, _, log) = sigterm_and_wait(&mut running).await;
        for (what, text) in [
            ("401 body", &body),
            ("wrong-token body", &wrong_body),
            ("metrics", &metrics),
            ("status", &status_body),
            ("log", &log),
        ] {
            assert!(!text.contains(secret), "token found in {what}");
        }
    }
}

/// A one-off command's error names each cause once: sqlx's errors repeat their cause in
/// their own message, and the chain printed them twice or three times (a migration's
/// error: `…: error returned from database: permission denied for …: permission denied
/// for …`).
#[tokio::test]
async fn an_error_names_each_cause_once() {
    let db = database().await;
    let (_pool, url) = db.role("weak", "").await;
    let output = output_within_deadline({
        let mut migrate = permd();
        migrate.args(["migrate", "--database-url", &url]);
        migrate
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let said = stderr
        .lines()
        .find(|line| line.starts_with("permd: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    assert_eq!(said.matches("permission denied").count(), 1, "{said}");
}

/// `verify` while a writing transaction stays open in the cluster, with a write of its
/// own, and a later one committed: verify's snapshot and the daemon's both lack the open
/// one's write and hold the later one, and verify passes at once, the transaction still
/// open (its token is a transaction committed after its snapshot, which the daemon's
/// next poll sees). Until session 61 the daemon read the changelog only below the oldest
/// open transaction: it answered verify 503 `stale` until that transaction ended, and
/// verify asked again for up to 30 s. On a cluster of its own, where no other test's
/// transaction is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_while_a_writing_transaction_stays_open() {
    let cluster = common::own_cluster(None);
    let db = common::database_on(&cluster).await;
    readers(&db, 3).await;
    let (_running, port) = serve(&db.url, &["--max-wait-ms", "200"], &[]).await;
    reads(port, 1);
    let (held, _) = db
        .open_write("INSERT INTO permd.tuples VALUES ('user:8', 'doc:1', 'read', NULL)")
        .await;
    db.write("INSERT INTO permd.tuples VALUES ('user:9', 'doc:1', 'read', NULL)")
        .await;
    let output = tokio::task::spawn_blocking({
        let command = verify(&db.url, &format!("http://127.0.0.1:{port}"));
        move || output_within_deadline(command)
    })
    .await
    .expect("verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("asking again"), "{stderr}");
    let stale = http_get(port, "/metrics")
        .map(|(_, metrics)| metrics.lines().any(|line| line == "permd_stale_total 0"));
    assert_eq!(stale, Some(true), "no answer was stale");
    held.commit().await.expect("commit");
}

/// `verify` against a daemon that wants a token says what is missing or wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_says_when_the_daemon_wants_its_token() {
    let db = database().await;
    let (_running, port) = serve(&db.url, &[], &[("PERMD_TOKEN", "tok-7c1e9d2a")]).await;
    let permd_url = format!("http://127.0.0.1:{port}");
    for (token, says) in [
        (None, "the daemon wants its token"),
        (Some("tok-wrong"), "the token given is not the daemon's"),
    ] {
        let mut verify = verify(&db.url, &permd_url);
        if let Some(token) = token {
            verify.env("PERMD_TOKEN", token);
        }
        let output = tokio::task::spawn_blocking(move || output_within_deadline(verify))
            .await
            .expect("verify");
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("401") && stderr.contains(says), "{stderr}");
    }
}

/// `serve --tls-cert --tls-key` serves HTTPS, and `verify --permd https://… --permd-ca`
/// proves it equal to the database over it; without the CA, the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_a_daemon_serving_https() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    let certified = common::SelfSigned::new("cli-https");
    let (cert, key) = (&certified.cert, &certified.key);
    let (_running, port) = serve_https(&db.url, cert, key, Stdio::null());
    let verify = |ca: Option<&std::path::Path>| {
        let mut verify = verify(&db.url, &format!("https://localhost:{port}"));
        if let Some(ca) = ca {
            verify.arg("--permd-ca").arg(ca);
        }
        tokio::task::spawn_blocking(move || output_within_deadline(verify))
    };
    // The daemon answers 503 until it has loaded; then verify proves it equal.
    wait_until("verify over https", || async {
        verify(Some(cert)).await.expect("verify").status.success()
    })
    .await;
    let output = verify(None).await.expect("verify");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TLS with permd") && stderr.contains("--permd-ca"),
        "{stderr}"
    );
}

/// SIGHUP reads the HTTPS certificate again: new connections get the renewed one, without
/// a restart. Files that cannot be read keep the one in use, and the daemon serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_renewed_certificate() {
    let db = database().await;
    let first = common::SelfSigned::new("sighup-first");
    let renewed = common::SelfSigned::new("sighup-renewed");
    let scratch = common::scratch::Scratch::new("sighup");
    let log = scratch.join("permd.log");
    let (mut running, port) = serve_https(
        &db.url,
        &first.cert,
        &first.key,
        std::fs::File::create(&log).expect("a log file").into(),
    );
    let client = common::tls_client(&[&first.der, &renewed.der]);
    // The certificate a new connection is shown.
    let shown = || {
        let client = client.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let tls = client
                .connect(name, tcp)
                .await
                .expect("the handshake completes");
            tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
        }
    };
    assert!(shown().await == first.der);
    std::fs::copy(&renewed.cert, &first.cert).expect("renew the certificate");
    std::fs::copy(&renewed.key, &first.key).expect("renew the key");
    hangup(&running);
    wait_until("the renewed certificate", || async {
        shown().await == renewed.der
    })
    .await;
    std::fs::write(&first.key, "not a key\n").expect("break the key");
    hangup(&running);
    wait_until("the log to say the certificate is kept", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        std::future::ready(
            text.contains("SIGHUP: the HTTPS certificate and client CAs in use are kept"),
        )
    })
    .await;
    assert!(shown().await == renewed.der);
    assert!(
        running.0.try_wait().expect("wait").is_none(),
        "permd exited"
    );
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(
        text.contains("SIGHUP: the HTTPS certificate and client CAs read again"),
        "{text}"
    );
}

/// `permd verify` says in sync, then names the subjects that differ after a write with the
/// triggers off, with what differs, and in sync again after a reload. Throughout, a
/// transaction older than every write is held open, as another test's (the cluster is
/// shared) or an application's may be: a subject written after it began but before
/// verify did is not in flight, and differs for good. (Before session 76 verify took
/// every subject written since the oldest open transaction as in flight, and reported
/// two of these three as not judged: this test failed once so in a full run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_equality_and_names_what_differs() {
    let db = database().await;
    let (held, _) = db.open_write("SELECT pg_current_xact_id()").await;
    db.exec(
        "INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL), ('u2', '', 'EXPORT', now() + interval '1 day');
         INSERT INTO permd.limits VALUES ('u2', 'projects', 3);",
    )
    .await;
    let (_running, port) = serve(&db.url, &[], &[]).await;
    let verify_command = || verify(&db.url, &format!("http://127.0.0.1:{port}"));
    let verify = || verify_command().output().expect("run permd verify");
    let output = verify();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("in sync"));

    // Changes made with the triggers off never reach the changelog: permd cannot know.
    db.exec(
        "BEGIN; SET LOCAL session_replication_role = replica;
         INSERT INTO permd.tuples VALUES ('ghost', 'doc:9', 'read', NULL);
         DELETE FROM permd.tuples WHERE subject = 'u1';
         UPDATE permd.limits SET value = 4;
         COMMIT;",
    )
    .await;
    let stdout = differs(&verify(), 3);
    for needle in [
        "subject \"ghost\"",
        "missing in permd: tuple (\"doc:9\", \"read\", None)",
        "subject \"u1\"",
        "extra in permd:   tuple (\"doc:1\", \"read\", None)",
        "missing in permd: limit (\"projects\", 4)",
        "extra in permd:   limit (\"projects\", 3)",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }

    // With its stdout gone (`permd verify | head -1` once head has exited) the verdict is
    // still the exit status, not a panic.
    let mut closed = verify_command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run permd verify");
    drop(closed.stdout.take());
    let output = closed.wait_with_output().expect("wait for permd verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The remedy: ask every daemon to reload.
    db.exec("SELECT permd.request_reload()").await;
    held.rollback().await.expect("rollback");
    wait_until("verify to pass after the reload", || {
        std::future::ready(verify().status.success())
    })
    .await;
}

/// Every command through PgBouncer in session mode, with its defaults otherwise: it
/// refuses a startup parameter it neither tracks nor was told to ignore (sqlx's
/// `extra_float_digits`, and `options`, which the one-off commands once used for their
/// settings), so `migrate` and `verify` failed there before. `migrate` of a new
/// database, `serve`, and `verify` proving the daemon in sync after a write; the one-off
/// commands' settings are still theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_serve_and_verify_through_pgbouncer() {
    let db = common::unmigrated_database().await;
    let (bouncer, url) = Bouncer::in_front_of(&db.url, PoolMode::Session);
    migrate_through(&bouncer, &url, &[]);
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    let (_running, port) = serve(&url, &[], &[]).await;
    let (status, body) =
        http_get(port, "/v1/check?subject=u1&permission=read&object=doc:1").expect("check");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");
    db.exec("INSERT INTO permd.tuples VALUES ('u2', 'doc:2', 'read', NULL)")
        .await;
    verify_through(&bouncer, &url, port);
    db.set_for_new_sessions("statement_timeout", "'1ms'").await;
    assert_eq!(one_off_statement_timeout(&url).await, "0");
    assert!(
        !bouncer.log().contains("unsupported startup parameter"),
        "{}",
        bouncer.log()
    );
}

/// `permd migrate --reference-model` and `permd verify` through PgBouncer in session mode
/// with one server session (`default_pool_size = 1`; the daemon connects directly): each
/// keeps to one connection, so both succeed (after the second connection's question,
/// given up at 2 s). Before, migrate's reference model step opened a second connection
/// while the first was still being given back, which waited for PgBouncer's only session
/// for ever (`query_wait_timeout`, 120 s); verify passed here before too, its database
/// steps parted by requests to the daemon, which gave sqlx time to take the connection
/// back; it now holds one connection for each daemon's comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_verify_through_a_one_session_pgbouncer() {
    let db = common::unmigrated_database().await;
    let (bouncer, url) =
        Bouncer::with_settings(&db.url, PoolMode::Session, &[("default_pool_size", "1")]);
    migrate_through(&bouncer, &url, &["--reference-model"]);
    let tables: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT to_regclass(name)::text FROM unnest(ARRAY['permd.tuples', 'app.users']) name",
    )
    .fetch_all(&db.pool)
    .await
    .expect("look");
    assert!(tables.iter().all(Option::is_some), "{tables:?}");
    readers(&db, 20).await;
    let (_running, port) = serve(&db.url, &[], &[]).await;
    verify_through(&bouncer, &url, port);
}

/// Runs `permd migrate` with `args` on `url`, through `bouncer`, and checks that it
/// succeeds.
fn migrate_through(bouncer: &Bouncer, url: &str, args: &[&str]) {
    let migrated = output_within_deadline({
        let mut migrate = permd();
        migrate.args(["migrate", "--database-url", url]).args(args);
        migrate
    });
    assert!(
        migrated.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&migrated.stderr),
        bouncer.log()
    );
}

/// Runs `permd verify` on `url`, through `bouncer`, against the daemon on `port`, and
/// checks that it finds them in sync.
fn verify_through(bouncer: &Bouncer, url: &str, port: u16) {
    let output = output_within_deadline(verify(url, &format!("http://127.0.0.1:{port}")));
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("in sync"),
        "{}{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        bouncer.log()
    );
}

/// Through PgBouncer in transaction mode (and statement mode) the one-off commands say,
/// before any statement of theirs, that they need a session, as the daemon does; nothing of theirs stays in
/// PgBouncer's server sessions. Before, `migrate --reference-model` applied the core,
/// then failed with sqlx's `prepared statement "sqlx_s_1" already exists`, and every
/// command through that PgBouncer after it failed so, on the statement the first had left
/// prepared in the server session; their settings stayed behind too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_off_commands_through_pgbouncer_in_transaction_mode_say_they_need_a_session() {
    let db = common::unmigrated_database().await;
    // Which the one-off commands lift in their sessions (to 0).
    db.set_for_new_sessions("statement_timeout", "'1min'").await;
    for mode in [PoolMode::Transaction, PoolMode::Statement] {
        let (bouncer, url) = Bouncer::in_front_of(&db.url, mode);
        let refused = |args: &[&str]| {
            let mut command = permd();
            command.args(args);
            let output = output_within_deadline(command);
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert!(
                !output.status.success()
                    && stderr.contains(
                        "two of permd's connections, open at once, ran in one server session"
                    )
                    && stderr.contains("pool_mode=session"),
                "{mode:?} {args:?}: {stderr}\n{}",
                bouncer.log()
            );
        };
        // Twice: the first leaves nothing behind that fails the second otherwise.
        for _ in 0..2 {
            refused(&["migrate", "--reference-model", "--database-url", &url]);
        }
        refused(&[
            "verify",
            "--database-url",
            &url,
            "--permd",
            "http://127.0.0.1:9",
        ]);
        refused(&["demo", "--database-url", &url, "--listen", "127.0.0.1:0"]);
        assert_eq!(
            common::bouncer::settings_through(&url, &["client_min_messages", "statement_timeout"])
                .await,
            ["notice", "1min"],
            "{mode:?}: no setting of theirs stays in PgBouncer's server sessions"
        );
    }
    let migrated: Option<String> = sqlx::query_scalar("SELECT to_regclass('permd.tuples')::text")
        .fetch_one(&db.pool)
        .await
        .expect("look");
    assert_eq!(migrated, None, "nothing migrated through either");
}

/// Through PgBouncer in transaction mode that hands out its four idle server sessions in
/// turn (`server_round_robin = 1`), where the second connection lands in another session
/// than the first's, the one-off commands still say they need a session: their first
/// connection, asked again, is in a third (`sync::one_session`). Before (session 58),
/// `migrate` went on through it, its settings reaching a server session, and failed in
/// its migrations with sqlx's `prepared statement "sqlx_s_2" does not exist` (tried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_off_commands_through_a_round_robin_transaction_pooler_say_they_need_a_session() {
    let db = common::unmigrated_database().await;
    let (bouncer, url) = Bouncer::with_settings(
        &db.url,
        PoolMode::Transaction,
        &[("server_round_robin", "1")],
    );
    common::bouncer::idle_sessions(&url, 4).await;
    let mut command = permd();
    command.args(["migrate", "--database-url", &url]);
    let output = output_within_deadline(command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && stderr
                .contains("one of permd's connections ran its statements in two server sessions")
            && stderr.contains("pool_mode=session"),
        "{stderr}\n{}",
        bouncer.log()
    );
    let migrated: Option<String> = sqlx::query_scalar("SELECT to_regclass('permd.tuples')::text")
        .fetch_one(&db.pool)
        .await
        .expect("look");
    assert_eq!(migrated, None, "nothing migrated");
}

/// `permd verify` while writes go on to the subjects it compares: a subject written
/// between its read of the database and its read of the daemon differs only in flight,
/// and is compared again by itself rather than reported (before, every run here reported
/// the written subjects as differing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_under_continuous_writes_reports_no_false_difference() {
    let db = database().await;
    readers(&db, 200).await;
    let (_running, port) = serve(&db.url, &[], &[]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), std::sync::Arc::clone(&stop));
        async move {
            let mut writes = 0_i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writes += 1;
                sqlx::query(
                    "INSERT INTO permd.tuples VALUES ('hot:' || ($1 % 3), 'doc:' || $1, 'read', NULL)",
                )
                .bind(writes)
                .execute(&pool)
                .await
                .expect("a write");
            }
            writes
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..3 {
        let verify = verify(&db.url, &url);
        let output = tokio::task::spawn_blocking(move || output_within_deadline(verify))
            .await
            .expect("verify");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}{stderr}");
        assert!(
            stdout.starts_with("in sync: permd equals the database ("),
            "{stdout}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.expect("the writer");
    assert!(writes > 0);
}

/// `permd verify` of a daemon of one shard compares it with the database's subjects of
/// that shard only, and names those of them that differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_a_shard() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:1', 'read', NULL
         FROM generate_series(1, 50) i;
         INSERT INTO permd.tuples VALUES ('*', 'doc:public', 'read', NULL);",
    )
    .await;
    let shard = Shard::new(1, 2).expect("a shard");
    let (_running, port) = serve(&db.url, &["--shard", "1/2"], &[]).await;
    let verify = || {
        verify(&db.url, &format!("http://127.0.0.1:{port}"))
            .output()
            .expect("run permd verify")
    };
    let output = verify();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("in sync: permd (shard 1/2)"), "{stdout}");

    // Rows written with the triggers off: one subject of each shard. Only this shard's
    // is this daemon's difference.
    let (mine, theirs) = (
        (1..).map(|i| format!("ghost:{i}")).find(|s| shard.owns(s)),
        (1..).map(|i| format!("ghost:{i}")).find(|s| !shard.owns(s)),
    );
    let (mine, theirs) = (mine.expect("a subject"), theirs.expect("a subject"));
    db.exec(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         INSERT INTO permd.tuples VALUES ('{mine}', 'doc:9', 'read', NULL),
                                         ('{theirs}', 'doc:9', 'read', NULL);
         COMMIT;"
    ))
    .await;
    let stdout = differs(&verify(), 1);
    assert!(stdout.contains(&format!("subject {mine:?}")), "{stdout}");
    assert!(!stdout.contains(&theirs), "{stdout}");
}

/// `permd route` on a port of the kernel's choosing, in front of the daemons on `ports`
/// (one a shard, in shard order): the process and its port.
fn route(ports: &[u16], args: &[&str]) -> (Running, u16) {
    let shards: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    route_to(&shards, args)
}

/// `permd route` over the daemons at `shards` (URLs, or `unix:PATH`), in shard order.
fn route_to(shards: &[String], args: &[&str]) -> (Running, u16) {
    let mut route = permd();
    route
        .args(["route", "--listen", "127.0.0.1:0", "--shards"])
        .arg(shards.join(","))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut running = Running(route.spawn().expect("start permd route"));
    let port = listening(&mut running);
    (running, port)
}

/// Every flag of every command is in README's table of flags (as `--flag`, or `command
/// --flag` for one command's own), so that none is known only to `--help`.
#[test]
fn every_flag_is_in_the_readme() {
    let readme = include_str!("../README.md");
    let mut missing = Vec::new();
    for command in ["serve", "route", "verify", "demo", "migrate"] {
        let output = permd()
            .args([command, "--help"])
            .output()
            .expect("permd --help");
        let help = String::from_utf8_lossy(&output.stdout);
        let flags = help.lines().filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-").map_or(line, |_| {
                line.split_once(", ").map_or(line, |(_, long)| long)
            });
            let flag = line.strip_prefix("--")?.split([' ', '=']).next()?;
            (!["help", "version"].contains(&flag)).then(|| format!("--{flag}"))
        });
        for flag in flags {
            let documented = [
                format!("`{flag}`"),
                format!("`{command} {flag}`"),
                format!("`{flag} "),
            ]
            .iter()
            .any(|form| readme.contains(form.as_str()));
            if !documented {
                missing.push(format!("{command} {flag}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in README.md: {missing:?}");
}

/// `permd route` in front of two `permd serve --shard i/2`: README's sharded set, as
/// processes, answering on its Unix socket too. It refuses what it cannot route to, and
/// stops on SIGTERM (its socket removed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_serves_a_sharded_set() {
    let refused = |args: &[&str]| {
        let output = output_within_deadline({
            let mut route = permd();
            route.arg("route").args(args);
            route
        });
        assert!(!output.status.success(), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = refused(&["--shards", "127.0.0.1:1"]);
    assert!(stderr.contains("give http://HOST:PORT"), "{stderr}");
    let stderr = refused(&["--shards", "http://127.0.0.1:1", "--listen", "0.0.0.0:0"]);
    assert!(stderr.contains("without a token"), "{stderr}");

    let db = database().await;
    readers(&db, 20).await;
    let scratch = common::scratch::Scratch::new("route-unix");
    // The second daemon serves on a Unix socket too, for a router on its host.
    let daemon_socket = scratch.join("daemon.sock");
    let daemon_socket = daemon_socket.to_str().expect("a UTF-8 path");
    let (_first, first) = serve(&db.url, &["--shard", "0/2"], &[]).await;
    let (second_daemon, second) = serve(
        &db.url,
        &["--shard", "1/2", "--unix-socket", daemon_socket],
        &[],
    )
    .await;
    // The router serves on a Unix socket too.
    let socket = scratch.join("route.sock");
    let socket_arg = socket.to_str().expect("a UTF-8 path");
    let (mut running, port) = route(&[first, second], &["--unix-socket", socket_arg]);
    wait_until("the router's readyz 200", || {
        std::future::ready(http_get(port, "/readyz").is_some_and(|(s, _)| s == 200))
    })
    .await;
    for user in 1..=20 {
        reads(port, user);
    }
    for user in [1, 2, 19, 20] {
        let stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        let (status, body) = exchange(
            stream,
            &format!(
                "GET /v1/check?subject=user:{user}&permission=read&object=doc:1 HTTP/1.1\r\n\
                 Host: permd\r\nConnection: close\r\n\r\n"
            ),
        )
        .expect("an answer over the router's socket");
        assert!(
            status == 200 && body.contains("\"allowed\":true"),
            "user:{user}: {status} {body}"
        );
    }
    // verify through the router verifies each daemon behind it, against its shard...
    let router = format!("http://127.0.0.1:{port}");
    let output = verify(&db.url, &router).output().expect("run permd verify");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (daemon, shard) in [(first, "0/2"), (second, "1/2")] {
        let said = format!(
            "http://127.0.0.1:{daemon}:\n  in sync: permd (shard {shard}) equals the database's"
        );
        assert!(stdout.contains(&said), "{stdout}");
    }
    // ...and names the daemon of a subject that differs, written with the triggers off.
    let ghost = (1..)
        .map(|i| format!("ghost:{i}"))
        .find(|s| !Shard::new(0, 2).expect("a shard").owns(s))
        .expect("a subject of shard 1/2");
    db.exec(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         INSERT INTO permd.tuples VALUES ('{ghost}', 'doc:9', 'read', NULL);
         COMMIT;"
    ))
    .await;
    let stdout = differs(&verify(&db.url, &router).output().expect("run verify"), 1);
    let (in_sync, differing) = stdout
        .split_once(&format!("http://127.0.0.1:{second}:\n"))
        .expect("the second daemon's verdict");
    assert!(in_sync.contains("in sync"), "{stdout}");
    assert!(
        differing.contains(&format!("subject {ghost:?}")),
        "{stdout}"
    );
    // A router that reaches the second daemon over its Unix socket answers as the other,
    // and verify through it reaches that daemon there too.
    let over_socket = format!("unix:{daemon_socket}");
    let (_local, local) = route_to(
        &[format!("http://127.0.0.1:{first}"), over_socket.clone()],
        &[],
    );
    wait_until("the router's readyz 200", || {
        std::future::ready(http_get(local, "/readyz").is_some_and(|(s, _)| s == 200))
    })
    .await;
    for user in 1..=20 {
        reads(local, user);
    }
    let stdout = differs(
        &verify(&db.url, &format!("http://127.0.0.1:{local}"))
            .output()
            .expect("run verify"),
        1,
    );
    let (_, differing) = stdout
        .split_once(&format!("{over_socket}:\n"))
        .expect("the daemon on the socket's verdict");
    assert!(
        differing.contains(&format!("subject {ghost:?}")),
        "{stdout}"
    );
    // A router that lists the daemons in the wrong order: neither is verified, and each
    // says why under its URL.
    let (_swapped, swapped_port) = route(&[second, first], &[]);
    let stdout = unverified(
        &verify(&db.url, &format!("http://127.0.0.1:{swapped_port}"))
            .output()
            .expect("run permd verify"),
        2,
    );
    assert!(
        stdout.contains(&format!(
            "http://127.0.0.1:{second}:\n  not verified: it mirrors shard 1/2, but the \
             router sends it the subjects of shard 0/2"
        )),
        "{stdout}"
    );
    // A daemon that is down does not keep the others from their verdicts.
    drop(second_daemon);
    let stdout = unverified(&verify(&db.url, &router).output().expect("run verify"), 1);
    let (in_sync, down) = stdout
        .split_once(&format!("http://127.0.0.1:{second}:\n"))
        .expect("the second daemon's verdict");
    assert!(in_sync.contains("in sync: permd (shard 0/2)"), "{stdout}");
    assert!(
        down.contains(&format!(
            "not verified: connect to permd at 127.0.0.1:{second}"
        )),
        "{stdout}"
    );
    // Through the router on its socket, the shard's error names the socket.
    let user = (1..=20)
        .find(|i| {
            !Shard::new(0, 2)
                .expect("a shard")
                .owns(&format!("user:{i}"))
        })
        .expect("a user of shard 1/2");
    let (status, body) = http_get(
        local,
        &format!("/v1/check?subject=user:{user}&permission=read&object=doc:1"),
    )
    .expect("an answer");
    assert!(
        status == 502 && body.contains(&format!("{over_socket}: ")),
        "{status} {body}"
    );
    let (status, log) = {
        let (status, _, log) = sigterm_and_wait(&mut running).await;
        (status, log)
    };
    assert!(status.success(), "{log}");
    assert!(log.contains("routing"), "{log}");
    assert!(!socket.exists(), "the router's socket is removed at exit");
}

/// `permd route --shards-file`: SIGHUP reads the file again, and the router switches to
/// the set it lists once every shard of it has a ready daemon, while checks go on through
/// it without one failing. A set with a shard not ready, or a file that cannot be read,
/// keeps the set before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_reshards_on_sighup() {
    let db = database().await;
    readers(&db, 20).await;
    let (_whole, whole) = serve(&db.url, &[], &[]).await;
    let scratch = common::scratch::Scratch::new("reshard");
    let (file, log) = (scratch.join("shards"), scratch.join("route.log"));
    let list = |ports: &[u16]| {
        let lines: Vec<String> = ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}\n"))
            .collect();
        std::fs::write(
            &file,
            format!("# the set, one shard a line\n\n{}", lines.concat()),
        )
        .expect("write the shards file");
    };
    list(&[whole]);
    let mut route = permd();
    route
        .args(["route", "--listen", "127.0.0.1:0", "--shards-file"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"));
    let mut running = Running(route.spawn().expect("start permd route"));
    let port = listening(&mut running);
    let shards = move || {
        let (_, body) = http_get(port, "/v1/status").expect("the router's status");
        let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        status["shards"].as_array().expect("shards").len()
    };
    let logged = |what: &'static str, times: usize| {
        let log = log.clone();
        wait_until(what, move || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            std::future::ready(text.matches(what).count() >= times)
        })
    };
    // Checks through the router all along, each on a new connection.
    let stop = Arc::new(AtomicBool::new(false));
    let checking = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                reads(port, answered % 20 + 1);
                answered += 1;
            }
            answered
        }
    });
    assert_eq!(shards(), 1);

    // Two shards, the second's daemon not there: kept, and the log says why.
    let (_first, first) = serve(&db.url, &["--shard", "0/2"], &[]).await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    list(&[first, nobody]);
    hangup(&running);
    logged("SIGHUP: the shards in use are kept", 1).await;
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(
        text.contains("is not ready, so the router keeps the set before"),
        "{text}"
    );
    assert!(text.contains("shard 1/2: "), "{text}");
    assert_eq!(shards(), 1);

    // Both daemons ready: switched.
    let (_second, second) = serve(&db.url, &["--shard", "1/2"], &[]).await;
    list(&[first, second]);
    hangup(&running);
    logged("SIGHUP: routing to the set", 1).await;
    assert_eq!(shards(), 2);
    let (_, metrics) = http_get(port, "/metrics").expect("the router's metrics");
    for said in [
        format!("shard=\"1/2\",url=\"http://127.0.0.1:{second}\""),
        "permd_route_shards 2\n".to_owned(),
        "permd_route_reshards_total{outcome=\"switched\"} 1\n".to_owned(),
        "permd_route_reshards_total{outcome=\"kept\"} 1\n".to_owned(),
    ] {
        assert!(metrics.contains(&said), "{said}: {metrics}");
    }

    // A file that cannot be read as shards: kept.
    std::fs::write(&file, "ftp://nowhere\n").expect("write the shards file");
    hangup(&running);
    logged("SIGHUP: the shards in use are kept", 2).await;
    assert_eq!(shards(), 2);

    stop.store(true, Ordering::Relaxed);
    let answered = checking.join().expect("every check answered");
    assert!(answered > 0);
    let (status, _, _) = sigterm_and_wait(&mut running).await;
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(status.success(), "{text}");
}

/// `permd demo --shards 2`: the same checks answered by `permd route` in front of two
/// daemons of `--shard i/2`.
#[test]
fn the_demo_serves_a_sharded_set() {
    let instructions = demo(false, &["--shards", "2"]);
    assert!(instructions.contains("in 2 shards"), "{instructions}");
}

/// `permd demo --database-url`, through PgBouncer in session mode: it migrates and seeds
/// the given database, serves its checks, verifies in sync and leaves it as it is at
/// SIGTERM; run again, it serves the database as it is, seeding nothing more.
#[test]
fn the_demo_seeds_a_given_database_through_pgbouncer() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(common::unmigrated_database());
    let (bouncer, url) = Bouncer::in_front_of(&db.url, PoolMode::Session);
    // The demo's tests set `PGSSLMODE=verify-full`; PgBouncer here has no TLS.
    let url = format!("{url}?sslmode=disable");
    let users = || {
        runtime.block_on(
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM app.users").fetch_one(&db.pool),
        )
    };
    for _ in 0..2 {
        demo(false, &["--database-url", &url]);
        assert_eq!(users().expect("the demo's users"), 100, "{}", bouncer.log());
    }
}

/// `permd demo`, the README's first command: a throwaway Postgres seeded with the demo
/// enterprise, a daemon answering the checks the demo prints, and on SIGTERM everything it
/// started stopped and its directory removed. With its stdout and stderr gone (`permd demo |
/// head`, then a closed terminal) it must serve all the same. The demo listens on a port of
/// the kernel's choosing (so that no other process can take it between a test's choice and
/// the demo's bind, seconds later), which the test reads from the printed checks, or with
/// the pipes closed, from the demo's listening socket.
fn demo(closed_pipes: bool, args: &[&str]) -> String {
    let given_url = args
        .iter()
        .position(|arg| *arg == "--database-url")
        .map(|at| args[at + 1]);
    // A directory of each call's own: tests run at once, and each checks that its demo
    // left nothing in it.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "permd-demo-test-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&tmp).expect("create the demo's TMPDIR");
    let mut running = Running(
        permd()
            .args(["demo", "--users", "100", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("TMPDIR", &tmp)
            // As a shell set up for a managed database has it: the demo's own cluster has
            // no TLS, and its URL says so.
            .env("PGSSLMODE", "verify-full")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start permd demo"),
    );
    let mut instructions = String::new();
    let mut printed = None;
    let port = if closed_pipes {
        drop(running.0.stdout.take());
        drop(running.0.stderr.take());
        listening(&mut running)
    } else {
        // The printed instructions, read on a thread so that a silent demo fails the test
        // at the deadline rather than hanging it.
        let stdout = running.0.stdout.take().expect("stdout");
        let (lines, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = lines.send(line);
            }
        });
        let printed = printed.insert(receiver);
        loop {
            let line = printed
                .recv_timeout(DEADLINE)
                .expect("the demo's first printed check");
            instructions += &line;
            instructions += "\n";
            if let Some(port) = line
                .split("127.0.0.1:")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .and_then(|port| port.parse::<u16>().ok())
            {
                break port;
            }
        }
    };
    let check = |query: &str| {
        http_get(port, &format!("/v1/check?{query}"))
            .is_some_and(|(status, body)| status == 200 && body.contains("\"allowed\":true"))
    };
    let allowed = "subject=user:2&permission=write&object=resource:10000";
    let denied = "subject=user:9&permission=read&object=resource:10000";
    if closed_pipes {
        let started = Instant::now();
        while !check(allowed) {
            assert!(
                running.0.try_wait().expect("wait").is_none(),
                "the demo exited"
            );
            assert!(started.elapsed() < DEADLINE, "the demo never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        let printed = printed.expect("the printed lines");
        while !instructions.contains("Press Ctrl-C to stop.") {
            let line = printed
                .recv_timeout(DEADLINE)
                .expect("the demo's instructions");
            instructions += &line;
            instructions += "\n";
        }
        for query in [allowed, denied] {
            assert!(
                instructions.contains(&format!("127.0.0.1:{port}/v1/check?{query}'")),
                "{query} not among the printed checks:\n{instructions}"
            );
        }
        assert!(check(allowed), "{allowed}");
        // The printed verify, run: in sync (for a sharded demo, every daemon).
        let verify_line = instructions
            .lines()
            .find(|line| line.contains(" verify --database-url \""))
            .unwrap_or_else(|| panic!("no printed verify:\n{instructions}"));
        let database_url = match verify_line.split('"').nth(1) {
            // A URL given to the demo is not printed (it may hold a password).
            Some("$DATABASE_URL") => given_url.expect("the demo was given a URL"),
            printed => printed.expect("the quoted database URL"),
        };
        let base = verify_line
            .rsplit(' ')
            .next()
            .expect("the daemon's URL last");
        let output = verify(database_url, base)
            .output()
            .expect("run permd verify");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("in sync"),
            "{verify_line}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // With --unix-socket, the printed check over it, made.
        if let Some(line) = instructions.lines().find(|l| l.contains("--unix-socket ")) {
            let (socket, url) = line
                .split_once("--unix-socket ")
                .and_then(|(_, rest)| rest.split_once(" '"))
                .unwrap_or_else(|| panic!("a socket and a URL in {line}"));
            let target = url
                .trim_end_matches('\'')
                .strip_prefix("http://permd")
                .expect("the URL");
            let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
            let (status, body) = exchange(
                stream,
                &format!("GET {target} HTTP/1.1\r\nHost: permd\r\nConnection: close\r\n\r\n"),
            )
            .expect("an answer over the Unix socket");
            assert!(
                status == 200 && body.contains("\"allowed\":true"),
                "{line}: {status} {body}"
            );
        }
    }
    assert!(!check(denied), "{denied}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (exit, _, log) = runtime.block_on(sigterm_and_wait(&mut running));
    assert!(exit.success(), "exit status {exit}; log:\n{log}");
    if !closed_pipes && given_url.is_none() {
        assert!(
            log.contains("stopping Postgres and removing its data"),
            "{log}"
        );
    }
    assert_left_nothing(&tmp, "the demo");
    instructions
}

#[test]
fn the_demo_answers_what_it_prints_and_cleans_up() {
    demo(false, &[]);
}

#[test]
fn the_demo_serves_with_its_stdout_and_stderr_gone() {
    demo(true, &[]);
}

/// `permd demo --unix-socket PATH`: the check it prints over the socket answers, and the
/// socket is gone once the demo stops.
#[test]
fn the_demo_serves_over_a_unix_socket_too() {
    let scratch = common::scratch::Scratch::new("demo-socket");
    let socket = scratch.join("demo.sock");
    let instructions = demo(false, &["--unix-socket", socket.to_str().expect("UTF-8")]);
    assert!(
        instructions.contains("Every route over its Unix socket too:"),
        "{instructions}"
    );
    assert!(!socket.exists(), "the socket is removed at exit");
}
