//! The `permd` binary end to end: `migrate`, `serve` over a real socket, SIGTERM, and the
//! refusal to listen beyond loopback without a token.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{database, wait_until, DEADLINE};

fn permd() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_permd"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("PERMD_TOKEN")
        .env("PERMD_LOG", "info");
    command
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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

    let port = free_port();
    let child = permd()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start permd serve");
    let mut running = Running(child);
    wait_until("readyz 200", || {
        std::future::ready(http_get(port, "/readyz").is_some_and(|(s, _)| s == 200))
    })
    .await;
    let (status, body) =
        http_get(port, "/v1/check?subject=u1&permission=read&object=doc:1").expect("check");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"allowed\":true"), "{body}");

    let pid = running.0.id().to_string();
    let signalled = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("send SIGTERM");
    assert!(signalled.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = running.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "permd did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    let mut log = String::new();
    running
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .expect("read log");
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
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
