//! The sync protocol against a real Postgres: load, freshness, the out-of-order commit
//! trap, read-your-writes, reconnects, retention and a randomized concurrent workload
//! checked against `permd.digest()`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::bouncer::{Bouncer, PoolMode};
use common::proxy::{Link, Proxy};
use common::{
    database, database_in_encoding, patient, wait_until, Rng, TestDaemon, TestDb, DEADLINE,
};
use permd::http::HttpConfig;
use permd::shard::Shard;
use permd::sync::{StatusReport, SyncConfig};
use serde_json::{json, Value};

/// A sync config with polling far slower than any test deadline, so a test passes only
/// if NOTIFY or a reader's request wakes the applier.
fn doorbell_only(url: &str) -> SyncConfig {
    polling_every(url, Duration::from_secs(3600))
}

/// A sync config whose idle poll runs every `interval`.
fn polling_every(url: &str, interval: Duration) -> SyncConfig {
    let mut config = SyncConfig::new(url);
    config.poll_interval = interval;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefilled_database_is_mirrored_exactly() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples (subject, object, permission, expires_at)
         SELECT 'user:' || (i % 500), CASE WHEN i % 7 = 0 THEN '' ELSE 'doc:' || (i % 300) END,
                'perm' || (i % 90),
                CASE WHEN i % 11 = 0 THEN now() + (i - 2500) * interval '1 minute' END
         FROM generate_series(1, 5000) i
         ON CONFLICT DO NOTHING;
         INSERT INTO permd.tuples VALUES ('*', 'doc:1', 'read', NULL), ('user:1', '*', 'admin', NULL);
         INSERT INTO permd.limits SELECT 'user:' || i, 'projects', i FROM generate_series(1, 100) i;",
    )
    .await;
    let daemon = TestDaemon::start(&db.url).await;
    assert_eq!(daemon.digest_at("0").await, db.digest().await);
    let (_, status) = daemon.get("/v1/status").await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(status["tuples"].as_i64(), Some(rows), "{status}");
    assert_eq!(status["limits"].as_i64(), Some(100));
    assert_eq!(status["reloads"].as_i64(), Some(1));
    assert!(status["full_load_running"].is_null(), "{status}");
    // Postgres runs on this host: one clock, measured to within half a round trip (a
    // busy machine's round trip included).
    let skew = status["clock_skew_seconds"]
        .as_f64()
        .expect("the clock measured");
    assert!(skew.abs() < 2.0, "{status}");
    // The prefill's changelog rows, with the table's index: more than the empty pages.
    let changelog = status["changelog_bytes"]
        .as_u64()
        .expect("the changelog measured");
    assert!(changelog > 64 * 1024, "{status}");
    daemon.stop().await;
}

/// A load many times larger than the builder's queue of COPY blocks (the socket's tap then
/// waits for the builder), over the Unix socket (the sync connection opens its socket
/// itself, TCP or Unix).
/// A daemon started on a database not migrated yet says what to run, retries, and loads
/// the set once the migrations are applied.
/// A daemon (polling only when rung) reloading on a request made after rows were written
/// with the triggers off, as a bulk import does, its load held in a proxy in the middle
/// of its COPY (the load's rows are some 1.5 MiB: past 256 KiB, its connection is held);
/// changes committed after the load's snapshot are answered meanwhile: a grant, a
/// revoke, a limit, and the revoke of a row only the load holds. A write token past the
/// request waits for the reload: the generation answering lacks the bulk rows. Returns
/// the daemon, the proxy's held connection and the changes' token.
async fn a_reload_held_beside_changes(db: &TestDb) -> (TestDaemon, Arc<Link>, Proxy, String) {
    db.exec(
        "INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL);
         INSERT INTO permd.limits VALUES ('u1', 'projects', 1);",
    )
    .await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 256 << 10).await;
    let daemon = TestDaemon::start_with(doorbell_only(&url), patient()).await;
    db.exec(
        "SET session_replication_role = replica;
         INSERT INTO permd.tuples SELECT 'bulk:' || i, 'doc:' || (i % 100), 'read', NULL
         FROM generate_series(1, 30000) i;
         RESET session_replication_role;",
    )
    .await;
    db.exec("SELECT permd.request_reload()").await;
    let held = proxy
        .held("the reload's connection to be held in its COPY")
        .await;
    let token = db
        .write(
            "INSERT INTO permd.tuples VALUES ('u2', 'doc:2', 'read', NULL);
             DELETE FROM permd.tuples WHERE subject = 'u1';
             UPDATE permd.limits SET value = 5 WHERE subject = 'u1';
             DELETE FROM permd.tuples WHERE subject = 'bulk:7';",
        )
        .await;
    wait_until("the changes to be answered during the reload", || {
        std::future::ready(
            daemon.store.check("u2", "read", "doc:2")
                && !daemon.store.check("u1", "read", "doc:1")
                && daemon.store.limit("u1", "projects") == Some(5),
        )
    })
    .await;
    // Answered from the generation being replaced: the bulk rows are not there yet, and
    // the token waits.
    assert!(!daemon.store.check("bulk:1", "read", "doc:1"));
    assert!(
        !daemon.token_passed(&token),
        "the token waits for the reload"
    );
    assert_eq!(
        daemon.status.report().reloads,
        1,
        "only the first load swapped in"
    );
    assert!(!held.closed.is_cancelled(), "the load is still held");
    (daemon, held, proxy, token)
}

/// `GET /v1/subjects/S/limits`'s value of `name`.
async fn limit_of(daemon: &TestDaemon, subject: &str, name: &str) -> Option<i64> {
    let (status, body) = daemon.get(&format!("/v1/subjects/{subject}/limits")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["limits"][name].as_i64()
}

/// A reload beside the polls (`a_reload_held_beside_changes`) swaps in with the changes
/// made beside it already in its generation: read right after the swap, before any poll
/// from the load's snapshot (none is rung), no key has gone back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_during_a_reload_are_answered_before_it_ends_and_kept_after() {
    let db = database().await;
    let (daemon, held, _proxy, token) = a_reload_held_beside_changes(&db).await;
    daemon.assert_loading_beside_the_polls("TRUNCATE or permd.request_reload() in the changelog");
    let (_, status) = daemon.get("/v1/status").await;
    assert_eq!(
        status["full_load_running"]["beside_polls"], true,
        "{status}"
    );
    assert!(status["full_load_running"]["seconds"].as_f64() >= Some(0.0));
    held.resumed.cancel();
    daemon
        .wait_for_report("the reload swapped in", |report| report.reloads >= 2)
        .await;
    assert_eq!(daemon.status.report().full_load_running, None);
    // No token above the watermark: nothing wakes the applier.
    assert!(daemon.check("bulk:1", "read", "doc:1", "0").await);
    assert!(!daemon.check("bulk:7", "read", "doc:7", "0").await);
    assert!(daemon.check("u2", "read", "doc:2", "0").await);
    assert!(!daemon.check("u1", "read", "doc:1", "0").await);
    assert_eq!(limit_of(&daemon, "u1", "projects").await, Some(5));
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!((report.reloads, report.reconnects), (2, 0), "{report:?}");
    assert_eq!(
        report.last_full_load_reason.as_deref(),
        Some("TRUNCATE or permd.request_reload() in the changelog")
    );
    daemon.stop().await;
}

/// The sync connection lost while a reload beside the polls is held in the middle of its
/// COPY (`a_reload_held_beside_changes`): the reload is dropped with its own connection,
/// and the next session loads again before it reads on (its polls had passed the
/// request), beside its own polls: its load, held too, a write is answered meanwhile.
/// Once it swaps in, the bulk rows are there and the mirror is exact. (Until session 73
/// that session's load ran on the sync connection and held every change back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_during_a_reload_beside_the_polls_loads_again_beside_the_next_ones() {
    let db = database().await;
    let (daemon, held, proxy, _) = a_reload_held_beside_changes(&db).await;
    proxy.freeze_next();
    db.terminate_sync_sessions().await;
    wait_until("the reload's own connection to be dropped", || {
        std::future::ready(held.closed.is_cancelled())
    })
    .await;
    wait_until("the next session's load to be held in its COPY", || {
        std::future::ready(
            proxy
                .frozen()
                .is_some_and(|link| !Arc::ptr_eq(&link, &held)),
        )
    })
    .await;
    let again = proxy.frozen().expect("the next load held");
    daemon.assert_loading_beside_the_polls("TRUNCATE or permd.request_reload() in the changelog");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('u3', 'doc:3', 'read', NULL)")
        .await;
    wait_until(
        "a write to be answered during the next session's load",
        || std::future::ready(daemon.store.check("u3", "read", "doc:3")),
    )
    .await;
    assert_eq!(daemon.status.report().reloads, 1);
    again.resumed.cancel();
    daemon
        .wait_for_report("a full load in the next session", |report| {
            report.reconnects >= 1 && report.reloads >= 2
        })
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert!(daemon.store.check("bulk:1", "read", "doc:1"));
    assert!(daemon.store.check("u3", "read", "doc:3"));
    assert_eq!(daemon.status.report().reloads, 2);
    assert_eq!(db.sessions_named("permd (reload)").await, 0);
    daemon.stop().await;
}

/// A reload asked for again while one loads beside the polls (`a_reload_held_beside_changes`):
/// the polls stop at the second request, the first load swaps in when it ends, and a
/// second load follows, which holds the changes made after the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_asked_for_during_a_reload_loads_again_after_it() {
    let db = database().await;
    let (daemon, held, _proxy, _) = a_reload_held_beside_changes(&db).await;
    db.exec("SELECT permd.request_reload()").await;
    let last = db
        .write("INSERT INTO permd.tuples VALUES ('u3', 'doc:3', 'read', NULL)")
        .await;
    held.resumed.cancel();
    daemon
        .wait_for_report("the second reload swapped in", |report| report.reloads >= 3)
        .await;
    assert_eq!(daemon.digest_at(&last).await, db.digest().await);
    assert!(daemon.check("bulk:1", "read", "doc:1", &last).await);
    assert!(daemon.check("u3", "read", "doc:3", &last).await);
    let report = daemon.status.report();
    assert_eq!((report.reloads, report.reconnects), (3, 0), "{report:?}");
    daemon.stop().await;
}

/// A change heard during a reload beside the polls (a notification's rows), to a key that
/// a bulk write made with the triggers off changed too, and that no poll read again before
/// the swap: the polls stopped at a second `request_reload()`, committed after it, while
/// the first load was held in its COPY, and the sync connection is held right after the
/// swap. The swap makes the change again over the loaded rows, so the key holds both, and
/// a token past the bulk write is answered right. Until session 75 the swap copied the key
/// as the generation replaced held it, without the bulk write: that token was answered
/// "denied" until a poll read the key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_heard_during_a_reload_is_made_again_over_the_loaded_rows() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('k', 'doc:k', 'read', NULL)")
        .await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 256 << 10).await;
    let daemon = TestDaemon::start_with(doorbell_only(&url), patient()).await;
    let bulk = db
        .write(
            "SET LOCAL session_replication_role = replica;
             INSERT INTO permd.tuples VALUES ('k', 'doc:k', 'write', NULL);
             INSERT INTO permd.tuples SELECT 'bulk:' || i, 'doc:' || (i % 100), 'read', NULL
             FROM generate_series(1, 30000) i;",
        )
        .await;
    db.exec("SELECT permd.request_reload()").await;
    let held = proxy
        .held("the reload's connection to be held in its COPY")
        .await;
    // Following again once a poll beside the load has read the request: the change below
    // is applied from its notification, not read whole by a poll.
    daemon
        .wait_for("following the notifications beside the load", || {
            daemon.status.report().following
        })
        .await;
    let change = db
        .write("INSERT INTO permd.tuples VALUES ('k', 'doc:k', 'admin', NULL)")
        .await;
    daemon
        .wait_for("the change to be heard", || {
            daemon.store.check("k", "admin", "doc:k")
        })
        .await;
    assert!(
        !daemon.store.check("k", "write", "doc:k"),
        "the bulk write is the load's"
    );
    let polls = daemon.status.report().polls;
    db.exec("SELECT permd.request_reload()").await;
    daemon
        .wait_for_report("the poll that stops at the second request", |report| {
            report.polls > polls
        })
        .await;
    let sync = proxy
        .open_links()
        .into_iter()
        .filter(|link| !Arc::ptr_eq(link, &held))
        .collect::<Vec<_>>();
    let [sync] = sync.as_slice() else {
        panic!("one connection besides the load's: {}", sync.len());
    };
    sync.frozen.cancel();
    held.resumed.cancel();
    daemon
        .wait_for_report("the reload swapped in", |report| report.reloads >= 2)
        .await;
    assert!(
        daemon.token_passed(&bulk),
        "the swap moved the watermark past it"
    );
    assert!(daemon.check("k", "write", "doc:k", &bulk).await);
    assert!(daemon.check("k", "admin", "doc:k", "0").await);
    assert!(daemon.check("k", "read", "doc:k", "0").await);
    assert_eq!(daemon.status.report().reloads, 2, "the next poll is held");
    sync.resumed.cancel();
    daemon
        .wait_for_report("the second reload swapped in", |report| report.reloads >= 3)
        .await;
    assert_eq!(daemon.digest_at(&change).await, db.digest().await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_after_the_daemon_started_is_loaded_then() {
    let db = common::unmigrated_database().await;
    let mut sync = SyncConfig::new(&db.url);
    sync.max_backoff = Duration::from_millis(400);
    let daemon = TestDaemon::spawn(sync, patient());
    let error = daemon.failed_attempts(2).await;
    assert!(error.contains("permd migrate"), "{error}");
    permd::db::migrate(&db.pool).await.expect("migrate");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    daemon
        .wait_for("loaded", || daemon.status.is_ready(60.0))
        .await;
    assert!(daemon.check("u1", "read", "doc:1", &token).await);
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_set_is_mirrored_exactly_over_a_unix_socket() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples (subject, object, permission, expires_at)
         SELECT 'user:' || (i / 7), 'doc:' || (i % 1000), 'perm' || (i % 70),
                CASE WHEN i % 13 = 0 THEN now() + interval '1 day' END
         FROM generate_series(1, 120000) i;
         INSERT INTO permd.limits SELECT 'user:' || i, 'projects', i FROM generate_series(1, 5000) i;",
    )
    .await;
    let daemon = TestDaemon::start(&db.unix_url).await;
    assert_eq!(daemon.digest_at("0").await, db.digest().await);
    let (_, status) = daemon.get("/v1/status").await;
    assert_eq!(status["tuples"].as_i64(), Some(120_000), "{status}");
    assert_eq!(status["limits"].as_i64(), Some(5_000), "{status}");
    daemon.stop().await;
}

/// A table whose subjects' rows lie scattered, as rows written a grant at a time over
/// months do: 15,000 subjects' rows in ten passes, one row of each a pass, so that every
/// row is a run of its own. The first 65,536 runs (the builder's window) are three
/// quarters of subjects met before, so the rest go aside with no look-up and are merged at
/// the end; names of every kind the rows set aside hold (inline, apart, in the long map),
/// and expiring rows among them. The mirror equals the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_set_whose_subjects_rows_lie_scattered_is_mirrored_exactly() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples (subject, object, permission, expires_at)
         SELECT CASE s % 3 WHEN 0 THEN 'user:' || s
                           WHEN 1 THEN 'group:' || s || '#members'
                           ELSE 'service-account-with-a-long-name:' || s END,
                'doc:' || ((7 * s + 13 * pass) % 2000), 'perm' || ((s + pass) % 40),
                CASE WHEN (s + pass) % 11 = 0 THEN now() + interval '1 day' END
         FROM generate_series(0, 9) pass, generate_series(0, 14999) s
         ORDER BY pass, s",
    )
    .await;
    let daemon = TestDaemon::start(&db.url).await;
    assert_eq!(daemon.digest_at("0").await, db.digest().await);
    let (_, status) = daemon.get("/v1/status").await;
    assert_eq!(status["tuples"].as_i64(), Some(150_000), "{status}");
    assert_eq!(status["subjects"].as_i64(), Some(15_000), "{status}");
    daemon.stop().await;
}

/// Hosts are tried in turn, as libpq and tokio-postgres do, and `target_session_attrs`
/// holds (permd opens its socket itself): the first host is down, the second is taken once
/// it shows it allows writes; asking for a read-only server finds none.
/// A name that is not UTF-8 (a `SQL_ASCII` database stores text of any bytes, written
/// with the triggers off: they refuse it) stops the load with Postgres's own error, which
/// checks what it sends a UTF-8 client; the daemon retries, and once the row is gone loads
/// names that are UTF-8 but not ASCII (the load checks an object's or permission's bytes
/// only when it first meets the name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_not_utf8_stops_the_load_with_postgres_error() {
    let db = database_in_encoding("SQL_ASCII").await;
    db.exec(
        "INSERT INTO permd.tuples (subject, object, permission)
         SELECT 'user:' || i, 'doc:café', 'lire' FROM generate_series(1, 50) i;
         SET session_replication_role = replica;
         INSERT INTO permd.tuples (subject, object, permission)
         VALUES ('user:1', E'doc:\\xe9', 'read')",
    )
    .await;
    let daemon = TestDaemon::spawn(SyncConfig::new(&db.url), patient());
    let error = daemon.failed_attempts(2).await;
    assert!(
        error.contains("invalid byte sequence for encoding \"UTF8\""),
        "{error}"
    );
    // Not loaded yet: the next attempt loads the table as it is.
    db.exec(
        "SET session_replication_role = replica;
         DELETE FROM permd.tuples WHERE object <> 'doc:café'",
    )
    .await;
    daemon
        .wait_for("loaded", || daemon.status.is_ready(60.0))
        .await;
    let (status, body) = daemon
        .get("/v1/check?subject=user:7&permission=lire&object=doc:caf%C3%A9")
        .await;
    assert_eq!(
        (status, body["allowed"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{body}"
    );
    assert_eq!(daemon.digest_at("0").await, db.digest().await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_tried_in_turn_and_target_session_attrs_holds() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // postgres://postgres@127.0.0.1:PORT/NAME
    let (authority, name) = db
        .url
        .trim_start_matches("postgres://postgres@")
        .split_once('/')
        .expect("the test URL's shape");
    let hosts = format!("postgres://postgres@127.0.0.1:{dead},{authority}/{name}");

    let daemon = TestDaemon::start(&format!("{hosts}?target_session_attrs=read-write")).await;
    assert!(daemon.store.check("u1", "read", "doc:1"));
    daemon.stop().await;

    let daemon = TestDaemon::spawn(
        SyncConfig::new(format!("{hosts}?target_session_attrs=read-only")),
        patient(),
    );
    let error = daemon.failed_attempts(2).await;
    assert!(error.contains("target_session_attrs=read-only"), "{error}");
    daemon.stop().await;
}

/// `load_balance_hosts=random` spreads the sync connection over the hosts named: here the
/// same cluster over TCP and over its Unix socket, told apart by the backend's client
/// address. Without it, the first host that answers is always the one used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balance_hosts_random_spreads_the_sync_connection() {
    let db = database().await;
    let both = db.unix_url.replacen("host='", "host='127.0.0.1,", 1);
    let over_unix = |n: u32, balance: &'static str| {
        let url = format!("{both} application_name=lb{n} load_balance_hosts={balance}");
        let pool = db.pool.clone();
        async move {
            let daemon = TestDaemon::start(&url).await;
            let unix: bool = sqlx::query_scalar(
                "SELECT client_addr IS NULL FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(format!("lb{n}"))
            .fetch_one(&pool)
            .await
            .expect("the sync connection's backend");
            daemon.stop().await;
            unix
        }
    };
    for n in 0..4 {
        assert!(!over_unix(n, "disable").await, "the first host is TCP");
    }
    let (mut tcp, mut unix) = (0, 0);
    for n in 4..40 {
        if over_unix(n, "random").await {
            unix += 1;
        } else {
            tcp += 1;
        }
        if tcp > 0 && unix > 0 {
            return;
        }
    }
    panic!("36 connects with load_balance_hosts=random: {tcp} over TCP, {unix} over Unix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_and_truncate_become_visible() {
    let db = database().await;
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;

    let t = db
        .write("INSERT INTO permd.tuples VALUES ('alice', 'doc:1', 'read', NULL)")
        .await;
    assert!(daemon.check("alice", "read", "doc:1", &t).await);

    let t = db
        .write("UPDATE permd.tuples SET object = 'doc:2' WHERE subject = 'alice'")
        .await;
    assert!(!daemon.check("alice", "read", "doc:1", &t).await);
    assert!(daemon.check("alice", "read", "doc:2", &t).await);

    let t = db
        .write("UPDATE permd.tuples SET permission = 'write' WHERE subject = 'alice'")
        .await;
    assert!(!daemon.check("alice", "read", "doc:2", &t).await);
    assert!(daemon.check("alice", "write", "doc:2", &t).await);

    let t = db
        .write("DELETE FROM permd.tuples WHERE subject = 'alice'")
        .await;
    assert!(!daemon.check("alice", "write", "doc:2", &t).await);

    let t = db
        .write("INSERT INTO permd.tuples VALUES ('bob', '', 'ADMIN', NULL); INSERT INTO permd.limits VALUES ('bob', 'seats', 3)")
        .await;
    assert!(daemon.check("bob", "ADMIN", "", &t).await);
    let t = db.write("UPDATE permd.limits SET value = 4").await;
    let (_, limits) = daemon
        .get(&format!("/v1/subjects/bob/limits?at_least={t}"))
        .await;
    assert_eq!(limits["limits"]["seats"], 4);

    truncate_reloads_once(&db, &daemon, ("bob", "ADMIN", "")).await;
    let t = db.write("TRUNCATE permd.limits").await;
    let (_, limits) = daemon
        .get(&format!("/v1/subjects/bob/limits?at_least={t}"))
        .await;
    assert_eq!(limits["limits"], serde_json::json!({}));
    assert_eq!(daemon.digest_at(&t).await, db.digest().await);
    daemon.stop().await;
}

/// `TRUNCATE permd.tuples` and a row written after it in the same transaction: the daemon
/// reloads once, holds the new row and no longer `gone` (subject, permission, object).
/// Returns the write's token.
async fn truncate_reloads_once(
    db: &TestDb,
    daemon: &TestDaemon,
    gone: (&str, &str, &str),
) -> String {
    let reloads = daemon.status.report().reloads;
    let t = db
        .write("TRUNCATE permd.tuples; INSERT INTO permd.tuples VALUES ('carol', 'doc:9', 'read', NULL)")
        .await;
    assert!(daemon.check("carol", "read", "doc:9", &t).await);
    assert!(!daemon.check(gone.0, gone.1, gone.2, &t).await);
    assert_eq!(
        daemon.status.report().reloads,
        reloads + 1,
        "TRUNCATE forces one full reload"
    );
    t
}

/// Four writers whose transactions overlap (each held open 0 to 29 ms before its
/// commit), each commit's notification carrying its rows, its xid alone or nothing at
/// random, while the daemon polls every 20 ms in batches of 3 rows: the polls' snapshots
/// have transactions in progress, and batches end inside the rows of transactions read
/// by the range and of those read by look-ups. Each writer checks its write with its
/// token right after its commit (a grant, and the revocation of its grant of two rounds
/// before), and the digest at the end equals the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writers_read_in_small_batches_skip_nothing() {
    let db = database().await;
    let mut sync = polling_every(&db.url, Duration::from_millis(20));
    sync.batch_rows = 3;
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let writer = |w: u64| {
        let (db, daemon) = (&db, &daemon);
        async move {
            let mut rng = Rng(w);
            let subject = format!("writer{w}");
            let mut token = String::new();
            for round in 0..15u64 {
                let notify = ["on", "doorbell", "off"][rng.below(3) as usize];
                let mut tx = db.pool.begin().await.expect("begin");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET LOCAL permd.notify = {notify};
                     INSERT INTO permd.tuples VALUES ('{subject}', 'doc:{round}', 'read', NULL),
                         ('{subject}', 'doc:{round}', 'write', NULL);
                     DELETE FROM permd.tuples WHERE subject = '{subject}'
                         AND object = 'doc:{}'",
                    round.wrapping_sub(2)
                )))
                .execute(&mut *tx)
                .await
                .expect("write");
                token = sqlx::query_scalar("SELECT permd.write_token()")
                    .fetch_one(&mut *tx)
                    .await
                    .expect("token");
                // Held open while the other writers commit: this is the scenario, not a
                // wait for a condition.
                tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
                tx.commit().await.expect("commit");
                let object = format!("doc:{round}");
                assert!(
                    daemon.check(&subject, "write", &object, &token).await,
                    "{subject} {object}"
                );
                if round >= 2 {
                    let revoked = format!("doc:{}", round - 2);
                    assert!(
                        !daemon.check(&subject, "read", &revoked, &token).await,
                        "{subject} {revoked}"
                    );
                }
            }
            token
        }
    };
    let tokens = futures_util::future::join_all((0..4).map(writer)).await;
    for token in &tokens {
        assert_eq!(daemon.digest_at(token).await, db.digest().await);
    }
    daemon.stop().await;
}

/// Rows of a table that inherits from `permd.tuples`: the poll and `permd.digest()` read
/// them (a query of a table reads its children), and so does the full load since session
/// 61, whose `COPY permd.tuples TO` read the parent's own rows alone (the child's row
/// denied, and `verify` would have found the digests apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_table_inheriting_from_tuples_are_loaded() {
    let db = database().await;
    db.exec(
        "CREATE TABLE public.more_tuples () INHERITS (permd.tuples);
         INSERT INTO public.more_tuples VALUES ('child', 'doc', 'read', NULL);
         INSERT INTO permd.tuples VALUES ('parent', 'doc', 'read', NULL)",
    )
    .await;
    let daemon = TestDaemon::start(&db.url).await;
    let token = db.write("SELECT 1").await;
    assert!(daemon.check("child", "read", "doc", &token).await);
    assert!(daemon.check("parent", "read", "doc", &token).await);
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

/// `permd.tuples` made a partitioned table (by hash of the subject, four partitions, the
/// triggers made again on it as `pg_get_triggerdef` gives them), as a large set's owner
/// may: its rows
/// are loaded from every partition, and its changes followed, an update that moves a row
/// to another partition among them, a TRUNCATE of it reloading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_tuples_table_is_loaded_and_followed() {
    let db = database().await;
    db.exec(
        "ALTER TABLE permd.tuples RENAME TO tuples_before;
         CREATE TABLE permd.tuples (LIKE permd.tuples_before INCLUDING ALL)
             PARTITION BY HASH (subject);
         CREATE TABLE permd.tuples_0 PARTITION OF permd.tuples FOR VALUES WITH (MODULUS 4, REMAINDER 0);
         CREATE TABLE permd.tuples_1 PARTITION OF permd.tuples FOR VALUES WITH (MODULUS 4, REMAINDER 1);
         CREATE TABLE permd.tuples_2 PARTITION OF permd.tuples FOR VALUES WITH (MODULUS 4, REMAINDER 2);
         CREATE TABLE permd.tuples_3 PARTITION OF permd.tuples FOR VALUES WITH (MODULUS 4, REMAINDER 3);
         DO $$
         DECLARE
             made text;
         BEGIN
             FOR made IN SELECT pg_get_triggerdef(oid) FROM pg_trigger
                 WHERE tgrelid = 'permd.tuples_before'::regclass AND NOT tgisinternal
             LOOP
                 EXECUTE replace(made, 'permd.tuples_before', 'permd.tuples');
             END LOOP;
         END $$;
         DROP TABLE permd.tuples_before;
         INSERT INTO permd.tuples
             SELECT 'user:' || i, 'doc:' || i, 'read', NULL FROM generate_series(1, 40) i",
    )
    .await;
    let spread: i64 = sqlx::query_scalar("SELECT count(DISTINCT tableoid) FROM permd.tuples")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(spread, 4, "the rows lie in every partition");
    let daemon = TestDaemon::start(&db.url).await;
    let token = db.write("SELECT 1").await;
    for i in [1, 17, 40] {
        let subject = format!("user:{i}");
        assert!(
            daemon
                .check(&subject, "read", &format!("doc:{i}"), &token)
                .await
        );
    }
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);

    let t = db
        .write("INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:0', 'write', NULL FROM generate_series(1, 40) i")
        .await;
    assert!(daemon.check("user:23", "write", "doc:0", &t).await);
    let t = db
        .write("UPDATE permd.tuples SET subject = subject || ':moved' WHERE object = 'doc:0'")
        .await;
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM permd.tuples a JOIN permd.tuples b ON b.subject = a.subject || ':moved'
         WHERE a.object <> 'doc:0' AND b.object = 'doc:0' AND a.tableoid <> b.tableoid",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count");
    assert!(moved > 0, "no row moved to another partition");
    assert!(!daemon.check("user:23", "write", "doc:0", &t).await);
    assert!(daemon.check("user:23:moved", "write", "doc:0", &t).await);
    let t = db
        .write("DELETE FROM permd.tuples WHERE subject = 'user:5'")
        .await;
    assert!(!daemon.check("user:5", "read", "doc:5", &t).await);
    assert_eq!(daemon.digest_at(&t).await, db.digest().await);

    let t = truncate_reloads_once(&db, &daemon, ("user:1", "read", "doc:1")).await;
    assert_eq!(daemon.digest_at(&t).await, db.digest().await);
    daemon.stop().await;
}

/// Polls whose batch (`batch_rows`, 2 here) ends inside a transaction's rows: in the rows
/// of one begun after the last snapshot (read by the range from its xmax), and in the
/// rows of one that was in progress then (read by look-ups of its xid). Each batch
/// leaves the mirror's snapshot without the transaction it ended in, and the next reads
/// on from its last row. Writes ring no doorbell, the daemon polls once an hour: only
/// the readers' tokens make it poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_that_end_inside_a_transaction_skip_nothing() {
    let db = database().await;
    let mut sync = doorbell_only(&db.url);
    sync.batch_rows = 2;
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let quiet = |subject: &str, objects: u32| {
        format!(
            "SET LOCAL permd.notify = off;
             INSERT INTO permd.tuples
             SELECT '{subject}', 'doc:' || i, 'read', NULL FROM generate_series(1, {objects}) i"
        )
    };
    let (open, open_xid) = db.open_write(&quiet("open", 3)).await;
    let later = db.write(&quiet("later", 5)).await;
    assert!(daemon.check("later", "read", "doc:5", &later).await);
    assert!(!daemon.store.check("open", "read", "doc:1"));
    let polls = daemon.status.report().polls;
    open.commit().await.expect("commit");
    let last = db.write(&quiet("last", 3)).await;
    assert!(daemon.check("open", "read", "doc:3", &open_xid).await);
    assert!(daemon.check("last", "read", "doc:3", &last).await);
    assert!(
        daemon.status.report().polls >= polls + 3,
        "the rows read over several batches"
    );
    assert_eq!(daemon.digest_at(&last).await, db.digest().await);
    daemon.stop().await;
}

/// A database holding 1,000 tuples, one for each of 1,000 users: the set the backlog
/// tests write their bulk beside.
async fn a_thousand_users() -> TestDb {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples
         SELECT 'user:' || i, 'doc:1', 'read', NULL FROM generate_series(1, 1000) i",
    )
    .await;
    db
}

/// A backlog of changelog rows that a full load reads at least twice as fast as the polls
/// (a bulk write: here 120,000 rows in one transaction over a set of 1,000 tuples, where
/// at least 100,000 must wait) is loaded in full rather than read a batch of 10,000 at a
/// time, its transaction in progress at the polls before its commit; a smaller one
/// (30,000 rows) is read from the changelog. Before session 62 every
/// backlog was read: a million rows in one transaction became visible 15 s after their
/// commit, against 1.1 s now ("Bulk writes" in benches/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_a_full_load_reads_faster_is_loaded_in_full() {
    let db = a_thousand_users().await;
    let daemon = TestDaemon::start_with(SyncConfig::new(&db.url), patient()).await;
    let bulk = |objects: u32| {
        format!(
            "INSERT INTO permd.tuples
             SELECT 'bulk:' || i, 'doc:{objects}', 'read', NULL
             FROM generate_series(1, {objects}) i"
        )
    };
    let token = db.write(&bulk(30_000)).await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!(report.reloads, 1, "read from the changelog: {report:?}");
    // Held open until the mirror's snapshot has it in progress (as a long bulk write is
    // when it commits, beside other writes), then committed.
    let (open, token) = db.open_write(&bulk(120_000)).await;
    // A later transaction committed: the open one is then below the snapshots' xmax, in
    // their list in progress (until then, above it, it is merely not begun for them).
    db.write("INSERT INTO permd.tuples VALUES ('later', 'doc:1', 'read', NULL)")
        .await;
    wait_until(
        "the bulk write in progress in the mirror's snapshot",
        || async {
            let (_, status) = daemon.get("/v1/status").await;
            let snapshot = status["snapshot"].as_str().unwrap_or_default().to_owned();
            let in_progress = snapshot.rsplit(':').next().unwrap_or_default().to_owned();
            in_progress.split(',').any(|xid| xid == token)
        },
    )
    .await;
    open.commit().await.expect("commit");
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!(report.reloads, 2, "loaded in full: {report:?}");
    let reason = report.last_full_load_reason.unwrap_or_default();
    assert!(reason.contains("reads at least twice as fast"), "{reason}");
    daemon.stop().await;
}

/// A backlog loaded in full (as in `a_backlog_a_full_load_reads_faster_is_loaded_in_full`)
/// loads beside the polls, which go on from the load's snapshot: its load held in a proxy
/// in the middle of its COPY (its 121,000 rows are some 5 MiB: past 2 MiB, its connection
/// is held), a write committed meanwhile is answered without a token, its token waiting
/// for the swap; once swapped in, the bulk rows and the write are there and the mirror is
/// exact. (Until session 73 that load ran on the sync connection and held every change
/// back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_loaded_in_full_loads_beside_the_polls() {
    let db = a_thousand_users().await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 2 << 20).await;
    let daemon = TestDaemon::start_with(SyncConfig::new(&url), patient()).await;
    db.exec(
        "INSERT INTO permd.tuples
         SELECT 'bulk:' || i, 'doc:bulk', 'read', NULL FROM generate_series(1, 120000) i",
    )
    .await;
    let held = proxy
        .held("the backlog's load to be held in its COPY")
        .await;
    daemon.assert_loading_beside_the_polls("reads at least twice as fast");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('u', 'doc:2', 'read', NULL)")
        .await;
    wait_until("a write to be answered during the backlog's load", || {
        std::future::ready(daemon.store.check("u", "read", "doc:2"))
    })
    .await;
    // The last bulk rows are the load's to bring; the token waits for its swap.
    assert!(!daemon.store.check("bulk:120000", "read", "doc:bulk"));
    assert!(!daemon.token_passed(&token), "the token waits");
    assert_eq!(daemon.status.report().reloads, 1);
    held.resumed.cancel();
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert!(daemon.store.check("bulk:120000", "read", "doc:bulk"));
    let report = daemon.status.report();
    assert_eq!((report.reloads, report.reconnects), (2, 0), "{report:?}");
    assert_eq!(db.sessions_named("permd (reload)").await, 0);
    daemon.stop().await;
}

/// Transaction A writes first but commits last; B writes later and commits first. A
/// reader of `id > last_seen` would skip A's row forever. While A is open, B is applied
/// and its token answered, A's is not; once A commits, both are there. (Until session 61
/// the feed waited below A, and B's token too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_commits_are_both_applied() {
    let db = database().await;
    let mut config = patient();
    config.max_wait = Duration::from_millis(300);
    let daemon = TestDaemon::start_with(SyncConfig::new(&db.url), config).await;

    let (a, token_a) = db
        .open_write("INSERT INTO permd.tuples VALUES ('a', 'doc', 'read', NULL)")
        .await;

    let token_b = db
        .write("INSERT INTO permd.tuples VALUES ('b', 'doc', 'read', NULL)")
        .await;
    assert!(token_b.parse::<u64>().expect("xid") > token_a.parse::<u64>().expect("xid"));

    assert!(daemon.check("b", "read", "doc", &token_b).await);
    assert!(!daemon.check("a", "read", "doc", &token_b).await);
    let (status, body) = daemon
        .get(&format!(
            "/v1/check?subject=a&permission=read&object=doc&at_least={token_a}"
        ))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "stale");

    a.commit().await.expect("commit A");
    assert!(daemon.check("a", "read", "doc", &token_a).await);
    assert!(daemon.check("b", "read", "doc", &token_a).await);
    assert_eq!(daemon.digest_at(&token_a).await, db.digest().await);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_token_makes_the_next_check_see_the_write_even_without_notify() {
    let db = database().await;
    db.set_for_new_sessions("permd.notify", "off").await;
    let db = TestDb {
        pool: permd::db::pool(&db.url).await.expect("reconnect"),
        url: db.url,
        unix_url: db.unix_url,
    };
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;
    for i in 0..20 {
        let t = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('u{i}', 'doc', 'read', NULL)"
            ))
            .await;
        assert!(
            daemon.check(&format!("u{i}"), "read", "doc", &t).await,
            "write {i}"
        );
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_alone_keeps_the_mirror_fresh() {
    let db = database().await;
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;
    granted_by_notify(&db, &daemon, "n").await;
    daemon.stop().await;
}

/// Grants `subject` read on `doc` and waits until the daemon holds it, with no `at_least`:
/// where the poll is hourly ([`doorbell_only`]), only the doorbell can wake the applier.
async fn granted_by_notify(db: &TestDb, daemon: &TestDaemon, subject: &str) {
    db.write(&format!(
        "INSERT INTO permd.tuples VALUES ('{subject}', 'doc', 'read', NULL)"
    ))
    .await;
    daemon
        .wait_for(&format!("{subject}'s grant, by NOTIFY"), || {
            daemon.store.check(subject, "read", "doc")
        })
        .await;
}

/// Through PgBouncer in session mode, with its defaults otherwise (it refuses a startup
/// parameter it neither tracks nor was told to ignore): the daemon loads, follows by
/// NOTIFY alone (an hourly poll), and after PgBouncer restarts (its connections cut)
/// loses nothing written meanwhile and follows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_in_session_mode_the_daemon_loads_follows_and_reconnects() {
    let db = database().await;
    let (mut bouncer, url) = Bouncer::in_front_of(&db.url, PoolMode::Session);
    let daemon = loads_and_follows(&db, doorbell_only(&url)).await;

    bouncer.restart();
    // Written while the daemon's connection is cut or coming back: no NOTIFY reaches it.
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('meanwhile', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("meanwhile", "read", "doc", &token).await);
    daemon
        .wait_for("following again", || {
            let report = daemon.status.report();
            report.following && report.reconnects >= 1
        })
        .await;
    granted_by_notify(&db, &daemon, "after").await;
    assert_eq!(daemon.store.digest(), db.digest().await);
    assert_eq!(daemon.status.report().reloads, 1, "no second full load");
    assert!(
        !bouncer.log().contains("unsupported startup parameter"),
        "{}",
        bouncer.log()
    );
    daemon.stop().await;
}

/// Through PgBouncer in transaction mode that hands out its idle server sessions in turn
/// (`server_round_robin = 1`, four idle), the first connection, asked its session again
/// once the second connection is up, lands in another: the daemon says so before its
/// first setting (`connect::one_session`), at each attempt, and no server session keeps a
/// setting of its. Before (session 58), it said so only once a statement it prepared in
/// one session ran in another, its settings already left in the sessions its attempts
/// went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_round_robin_transaction_pooler_the_daemon_says_so_at_connect() {
    round_robin_refused_at_connect(4, &[("server_round_robin", "1")]).await;
}

/// As the test above, with two idle server sessions. Before (session 77) the first
/// connection was asked again after the second's question, and handed its own session
/// back, so the daemon could not tell at its connect (its settings then went to the other
/// session) and said so only once a statement it prepared in one server session was run
/// in the other (SQLSTATE 26000, `Applier::session`) or a look found another process
/// (`Applier::same_backend`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_round_robin_transaction_pooler_of_two_sessions_the_daemon_says_so_at_connect() {
    round_robin_refused_at_connect(
        2,
        &[("server_round_robin", "1"), ("default_pool_size", "2")],
    )
    .await;
}

/// A daemon started through PgBouncer in transaction mode with `settings`, `idle` server
/// sessions idle, is refused at each connect, and none of those sessions (each held at
/// once afterwards) keeps a setting of its.
async fn round_robin_refused_at_connect(idle: usize, settings: &[(&str, &str)]) {
    let db = database().await;
    let (bouncer, url) = Bouncer::with_settings(&db.url, PoolMode::Transaction, settings);
    common::bouncer::idle_sessions(&url, idle).await;
    let daemon = TestDaemon::spawn(doorbell_only(&url), patient());
    let error = daemon.failed_attempts(2).await;
    assert!(
        error.contains("one of permd's connections ran its statements in two server sessions")
            && error.contains("pool_mode=session"),
        "{error}\n{}",
        bouncer.log()
    );
    daemon.stop().await;
    for mut client in common::bouncer::clients_in_sessions(&url, idle).await {
        assert_eq!(
            common::bouncer::settings_of(&mut client, &["enable_seqscan", "lock_timeout", "jit"])
                .await,
            ["on", "0", "on"],
            "no setting of the daemon's stays in PgBouncer's server sessions"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_with_one_server_session_the_daemon_loads_and_follows() {
    let db = database().await;
    let (_bouncer, url) =
        Bouncer::with_settings(&db.url, PoolMode::Session, &[("default_pool_size", "1")]);
    // With a query timeout under the 2 s the second connection is waited for otherwise:
    // it is waited for half of it, and the first connection's statement is not cut.
    let mut config = doorbell_only(&url);
    config.query_timeout = Duration::from_secs(1);
    let daemon = loads_and_follows(&db, config).await;
    // A reload's own connection waits in the pool the same way: it is given up, and the
    // reload made on the sync connection.
    db.exec("SELECT permd.request_reload()").await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('after', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("after", "read", "doc", &token).await);
    let report = daemon.status.report();
    assert_eq!((report.reconnects, report.last_error), (0, None));
    assert_eq!(report.reloads, 2);
    daemon.stop().await;
}

/// A role that may read permd's tables and hold two connections, one of them held by
/// the returned pool: a daemon as this role (the URL) may open one more.
async fn role_with_one_connection_to_spare(db: &TestDb) -> (sqlx::PgPool, String) {
    let (pool, url) = db
        .role(
            "one",
            "GRANT USAGE ON SCHEMA permd TO {role};
             GRANT SELECT ON permd.tuples, permd.limits, permd.changelog, permd.retention,
                 permd.notify_key TO {role};
             ALTER ROLE {role} CONNECTION LIMIT 2;",
        )
        .await;
    assert_eq!(pool.size(), 1);
    (pool, url)
}

/// A daemon whose role may hold one connection more (`CONNECTION LIMIT`) loads and
/// follows. Speaking to Postgres itself, it opens no second connection to ask which
/// server session the first has (`connect::alone_in_its_session`; the next test); before
/// (session 58) it opened one, which was refused ("too many connections for role"), and
/// the question was left open. Where a pooler stands between, a second connection that
/// is refused or waits leaves it open the same way
/// (`through_pgbouncer_with_one_server_session_the_daemon_loads_and_follows`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_role_may_open_no_second_connection_loads_and_follows() {
    let db = database().await;
    let (pool, url) = role_with_one_connection_to_spare(&db).await;
    let daemon = loads_and_follows(&db, doorbell_only(&url)).await;
    let report = daemon.status.report();
    assert_eq!((report.reconnects, report.last_error), (0, None));
    // A third is refused, as the daemon's second was.
    let third = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await;
    let refused = third.expect_err("two connections for the role").to_string();
    assert!(
        refused.contains("too many connections for role"),
        "{refused}"
    );
    daemon.stop().await;
    drop(pool);
}

/// Row-level security on permd's tables that would hide rows from permd's role (here a
/// policy that shows it `user:1`'s alone) stops the daemon's load, and `verify`'s digest,
/// with the reason, rather than mirroring part of the set: permd reads with
/// `row_security = off`, as `pg_dump` does, so Postgres refuses the read instead of
/// filtering it; `row_security=on` in the URL's options, the operator's choice, is kept.
/// Given `BYPASSRLS`, the role loads the whole set at the next attempt.
/// Before (session 60), the daemon loaded `user:1`'s rows alone and denied every other
/// grant, and `verify`, whose digest the policy filtered alike, found the two equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_that_would_hide_rows_stops_the_load_saying_so() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL),
             ('user:2', 'doc:1', 'read', NULL);
         ALTER TABLE permd.tuples ENABLE ROW LEVEL SECURITY;
         CREATE POLICY only_user_1 ON permd.tuples FOR SELECT USING (subject = 'user:1');",
    )
    .await;
    let (pool, url) = db
        .role(
            "filtered",
            "GRANT USAGE ON SCHEMA permd TO {role};
             GRANT SELECT ON permd.tuples, permd.limits, permd.changelog, permd.retention,
                 permd.notify_key TO {role};",
        )
        .await;
    // What the role sees without the setting: one row of two.
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
        .fetch_one(&pool)
        .await
        .expect("count as the role");
    assert_eq!(seen, 1);
    pool.close().await;

    let daemon = TestDaemon::spawn(SyncConfig::new(&url), patient());
    let error = daemon.failed_attempts(1).await;
    assert!(
        error.contains("row-level security") && error.contains("BYPASSRLS"),
        "{error}"
    );
    let one_off = permd::db::pool(&url).await.expect("connect as the role");
    let refused = sqlx::query_scalar::<_, String>("SELECT permd.digest()")
        .fetch_one(&one_off)
        .await
        .expect_err("a digest the policy would filter");
    assert!(
        refused.to_string().contains("row-level security"),
        "{refused}"
    );
    one_off.close().await;
    // The operator's own choice in the URL is kept: policies applied, the rows they show.
    let kept = TestDaemon::start(&format!("{url}?options=-c%20row_security%3Don")).await;
    assert!(kept.store.check("user:1", "read", "doc:1"));
    assert!(!kept.store.check("user:2", "read", "doc:1"));
    kept.stop().await;

    db.exec(&format!(
        "ALTER ROLE {} BYPASSRLS",
        url.split('@')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .expect("the role")
    ))
    .await;
    daemon
        .wait_for_report("the load once the role bypasses the policy", |report| {
            report.loaded
        })
        .await;
    assert_eq!(daemon.digest_at("0").await, db.digest().await);
    assert!(daemon.store.check("user:2", "read", "doc:1"));
    daemon.stop().await;
}

/// A daemon that speaks to Postgres itself (here through a proxy that passes the bytes on
/// and counts the connections) opens one connection: its server session's process is the
/// one its start named (BackendKeyData), which no pooler in transaction mode can promise,
/// so the pooler check's second connection is not needed. Before, every connect opened
/// a second one (two connections counted here, tried on the code before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_speaking_to_postgres_itself_opens_one_connection() {
    let db = database().await;
    let (proxy, url) = Proxy::passing(&db.url).await;
    let daemon = loads_and_follows(&db, doorbell_only(&url)).await;
    let report = daemon.status.report();
    assert_eq!((report.reconnects, report.last_error), (0, None));
    assert_eq!(proxy.accepted(), 1);
    daemon.stop().await;
}

/// A daemon started with `config` (whose URL reaches `db`, through a pooler), once it has
/// loaded a tuple written before it, follows the notifications, and has applied one's
/// write.
async fn loads_and_follows(db: &TestDb, config: SyncConfig) -> TestDaemon {
    db.write("INSERT INTO permd.tuples VALUES ('loaded', 'doc', 'read', NULL)")
        .await;
    let daemon = TestDaemon::start_with(config, patient()).await;
    assert!(daemon.store.check("loaded", "read", "doc"));
    daemon
        .wait_for("following the notifications", || {
            daemon.status.report().following
        })
        .await;
    granted_by_notify(db, &daemon, "notified").await;
    daemon
}

/// Through PgBouncer in transaction mode (or statement mode) a client's transactions run
/// in whichever server session is free: the daemon, which needs one session (LISTEN, its settings), says so
/// before its first setting, and names the remedy; no server session is left with its
/// settings. Before (session 57), it said so only once a statement landed in another
/// session than its first look's, its settings (`enable_seqscan = off`, …) already
/// handed to whoever got that session next; and before that, it went on, called itself
/// following while PgBouncer dropped its notifications (README, "Through PgBouncer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_in_transaction_mode_the_daemon_says_it_needs_a_session() {
    let db = database().await;
    for mode in [PoolMode::Transaction, PoolMode::Statement] {
        let (bouncer, url) = Bouncer::in_front_of(&db.url, mode);
        let daemon = TestDaemon::spawn(doorbell_only(&url), patient());
        // Refused at each attempt (and so never loaded: `failed_attempts`).
        let error = daemon.failed_attempts(2).await;
        assert!(
            error.contains("two of permd's connections, open at once, ran in one server session")
                && error.contains("pool_mode=session"),
            "{mode:?}: {error}"
        );
        // Stopped first: the daemon retries meanwhile, and a client of the pool's own that
        // holds the session a retry's first connection just freed makes PgBouncer hand
        // the pooler check another, which it cannot tell from session pooling (README,
        // "Through PgBouncer": "under other clients' load"). It did so once in a full run.
        daemon.stop().await;
        assert_eq!(
            common::bouncer::settings_through(&url, &["enable_seqscan", "lock_timeout", "jit"])
                .await,
            ["on", "0", "on"],
            "{mode:?}: no setting of the daemon's stays in PgBouncer's server sessions\n{}",
            bouncer.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_wildcards_global_objects_and_limits() {
    let db = database().await;
    let t = db
        .write(
            "INSERT INTO permd.tuples VALUES
               ('u1', '', 'EXPORT', now() + interval '1 hour'),
               ('u1', '', 'LAPSED', now() - interval '1 second'),
               ('u1', 'doc:1', 'read', NULL),
               ('*', 'doc:pub', 'read', NULL),
               ('admin', '*', 'delete', NULL),
               ('*', '*', 'ping', NULL);
             INSERT INTO permd.limits VALUES ('u1', 'projects', 3), ('*', 'projects', 1), ('*', 'seats', 2);",
        )
        .await;
    let daemon = TestDaemon::start(&db.url).await;
    assert!(daemon.check("u1", "EXPORT", "", &t).await);
    assert!(!daemon.check("u1", "LAPSED", "", &t).await);
    assert!(
        !daemon.check("u1", "EXPORT", "doc:1", &t).await,
        "global permissions are not object permissions"
    );
    assert!(
        !daemon.check("u1", "read", "", &t).await,
        "object permissions are not global"
    );
    assert!(daemon.check("u1", "read", "doc:1", &t).await);
    assert!(daemon.check("stranger", "read", "doc:pub", &t).await);
    assert!(!daemon.check("stranger", "read", "doc:1", &t).await);
    assert!(daemon.check("admin", "delete", "doc:anything", &t).await);
    assert!(
        !daemon.check("admin", "delete", "", &t).await,
        "object '*' does not cover global"
    );
    assert!(daemon.check("anyone", "ping", "doc:x", &t).await);

    let (_, p) = daemon.get("/v1/subjects/u1/permissions").await;
    assert_eq!(p["permissions"], serde_json::json!(["EXPORT"]));
    let (_, p) = daemon.get("/v1/subjects/u1/permissions?object=doc:1").await;
    assert_eq!(p["permissions"], serde_json::json!(["ping", "read"]));
    let (_, o) = daemon.get("/v1/subjects/u1/objects?permission=read").await;
    assert_eq!(o["objects"], serde_json::json!(["doc:1", "doc:pub"]));
    let (_, o) = daemon
        .get("/v1/subjects/admin/objects?permission=delete")
        .await;
    assert_eq!(o["objects"], serde_json::json!(["*"]));

    let (_, l) = daemon.get("/v1/subjects/u1/limits").await;
    assert_eq!(l["limits"], serde_json::json!({"projects": 3, "seats": 2}));
    let (_, c) = daemon
        .get("/v1/check-limit?subject=u1&limit=projects&usage=2")
        .await;
    assert_eq!(
        (c["allowed"].clone(), c["limit"].clone()),
        (true.into(), 3.into())
    );
    let (_, c) = daemon
        .get("/v1/check-limit?subject=u1&limit=projects&usage=3")
        .await;
    assert_eq!(c["allowed"], false);
    let (_, c) = daemon
        .get("/v1/check-limit?subject=u2&limit=projects&usage=0")
        .await;
    assert_eq!(
        (c["allowed"].clone(), c["limit"].clone()),
        (true.into(), 1.into())
    );
    let (_, c) = daemon
        .get("/v1/check-limit?subject=u1&limit=storage&usage=0")
        .await;
    assert_eq!(
        (c["allowed"].clone(), c["limit"].clone()),
        (false.into(), serde_json::Value::Null)
    );

    let (status, batch) = daemon
        .post(
            "/v1/check",
            &serde_json::json!({"checks": [
                {"subject": "u1", "permission": "EXPORT"},
                {"subject": "u1", "permission": "read", "object": "doc:1"},
                {"subject": "u1", "permission": "write", "object": "doc:1"},
            ], "at_least": t}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["results"], serde_json::json!([true, true, false]));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_backend_loses_no_change() {
    let db = database().await;
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;
    for round in 0..3 {
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'permd' AND datname = current_database()) k",
        )
        .fetch_one(&db.pool)
        .await
        .expect("terminate");
        assert_eq!(killed, 1, "round {round}: one sync connection to kill");
        // Written while the daemon is disconnected or reconnecting: no NOTIFY reaches it.
        let t = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('k{round}', 'doc', 'read', NULL)"
            ))
            .await;
        assert!(daemon.check(&format!("k{round}"), "read", "doc", &t).await);
        assert_eq!(daemon.digest_at(&t).await, db.digest().await);
    }
    let report = daemon.status.report();
    assert!(report.reconnects >= 3, "{report:?}");
    assert_eq!(
        report.reloads, 1,
        "the changelog covered the cursor: no full reload"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_pruned_past_the_cursor_forces_one_reload() {
    let db = database().await;
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;
    // Without NOTIFY and with an hourly poll, the daemon does not read this write...
    let t = db
        .write("SET LOCAL permd.notify = off; INSERT INTO permd.tuples VALUES ('q', 'doc', 'read', NULL)")
        .await;
    // ...before its changelog row is pruned away. (A prune keeps the rows of
    // transactions at or above the cluster's oldest running one: another test's open
    // transaction holds it back for a moment.)
    wait_until("the write's changelog row to be pruned", || {
        let pool = db.pool.clone();
        async move {
            let pruned: i64 = sqlx::query_scalar("SELECT permd.prune_changelog('0 seconds')")
                .fetch_one(&pool)
                .await
                .expect("prune");
            pruned >= 1
        }
    })
    .await;
    assert!(
        !daemon.store.check("q", "read", "doc"),
        "not seen before the prune"
    );
    // The token wakes the applier, which finds its cursor below the pruned mark.
    assert!(daemon.check("q", "read", "doc", &t).await);
    assert_eq!(
        daemon.status.report().reloads,
        2,
        "exactly one extra full load"
    );
    assert_eq!(daemon.digest_at(&t).await, db.digest().await);
    // Pruning what the daemon already holds costs nothing.
    let t = db
        .write("INSERT INTO permd.tuples VALUES ('r', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("r", "read", "doc", &t).await);
    sqlx::query("SELECT permd.prune_changelog('0 seconds')")
        .execute(&db.pool)
        .await
        .expect("prune");
    let t = db
        .write("INSERT INTO permd.tuples VALUES ('s', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("s", "read", "doc", &t).await);
    assert_eq!(
        daemon.status.report().reloads,
        2,
        "no reload for rows already applied"
    );
    daemon.stop().await;
}

/// Object names churned through (written, then deleted) stay interned until a new
/// generation is built: with `--compaction-pct` (50 by default) a compaction rebuilds it
/// from memory, without a full load, once they reach that share of the names the last
/// load interned (and at least 1,000), and never with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churned_names_are_reclaimed_by_a_compaction() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples \
         SELECT 'user:' || n, 'doc:' || n, 'read', NULL FROM generate_series(1, 1000) n",
    )
    .await;
    let mut never = SyncConfig::new(&db.url);
    never.compaction_pct = 0;
    let kept = TestDaemon::start_with(never, patient()).await;
    let compacting = TestDaemon::start_with(SyncConfig::new(&db.url), patient()).await;
    // Both daemons apply the new rows (and intern their names) before they are deleted: a
    // poll that read both commits at once would find the rows gone and intern nothing.
    let token = db
        .write(
            "INSERT INTO permd.tuples \
             SELECT 'user:1', 'tmp:' || n, 'read', NULL FROM generate_series(1, 1500) n",
        )
        .await;
    for daemon in [&kept, &compacting] {
        assert!(daemon.check("user:1", "read", "tmp:1500", &token).await);
    }
    let token = db
        .write("DELETE FROM permd.tuples WHERE object LIKE 'tmp:%'")
        .await;
    assert_eq!(kept.digest_at(&token).await, db.digest().await);
    compacting
        .wait_for_report("the compaction", |report| report.compactions >= 1)
        .await;
    assert_eq!(compacting.digest_at(&token).await, db.digest().await);
    assert_eq!(compacting.status.report().reloads, 1);
    assert_eq!(compacting.status.report().compactions, 1);
    assert_eq!(compacting.store.counts().names_since_load, 0);
    assert_eq!(kept.status.report().reloads, 1);
    assert_eq!(kept.status.report().compactions, 0);
    assert_eq!(kept.store.counts().names_since_load, 1500);
    kept.stop().await;
    compacting.stop().await;
}

/// Subjects the full load read and the applier wrote since are checked through the
/// `DashMap` after a look-up in the lock-free tier: once they reach `--compaction-pct` of
/// the loaded ones (and at least 10,000), a compaction puts them back in that tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_written_since_the_load_are_compacted_back() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples \
         SELECT 'user:' || n, 'doc:' || n, 'read', NULL FROM generate_series(1, 20000) n",
    )
    .await;
    let daemon = TestDaemon::start_with(SyncConfig::new(&db.url), patient()).await;
    let written = |n: u32| {
        format!(
            "INSERT INTO permd.tuples \
             SELECT 'user:' || n, '', 'edit', NULL FROM generate_series(1, {n}) n \
             ON CONFLICT DO NOTHING"
        )
    };
    let token = db.write(&written(9_999)).await;
    assert!(daemon.check("user:9999", "edit", "", &token).await);
    assert_eq!(daemon.store.counts().subjects_written_since_load, 9_999);
    assert_eq!(daemon.status.report().compactions, 0);
    db.write(&written(10_000)).await;
    // Written while the compaction may be rebuilding: applied meanwhile, and kept.
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:1', 'doc:during', 'read', NULL)")
        .await;
    daemon
        .wait_for_report("the compaction", |report| report.compactions >= 1)
        .await;
    assert!(daemon.check("user:1", "read", "doc:during", &token).await);
    assert!(daemon.check("user:10000", "edit", "", &token).await);
    assert!(
        daemon
            .check("user:20000", "read", "doc:20000", &token)
            .await
    );
    assert_eq!(daemon.store.counts().subjects_written_since_load, 0);
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.status.report().reloads, 1);
    // Changes after the compaction are applied to the rebuilt generation.
    let token = db
        .write("DELETE FROM permd.tuples WHERE subject = 'user:1'")
        .await;
    assert!(!daemon.check("user:1", "read", "doc:1", &token).await);
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

/// Starts `writers` tasks that each commit `transactions` random transactions of one to
/// five small statements (tuples inserted, upserted, moved to another object and deleted;
/// limits upserted and deleted; 29 rows at most a statement, so each fits in its
/// notification) over 30 subjects, 20 objects, 8 permissions and 3 limits, some held
/// open a little so that commits interleave. The seed is printed, `PERMD_TEST_SEED`
/// replays it.
fn random_writers(
    db: &TestDb,
    writers: u64,
    transactions: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let seed = std::env::var("PERMD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("seed {seed} (replay with PERMD_TEST_SEED={seed})");
    (0..writers)
        .map(|w| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
                for _ in 0..transactions {
                    let mut sql = String::new();
                    for _ in 0..=rng.below(4) {
                        let s = format!("s{}", rng.below(30));
                        let o = if rng.below(5) == 0 { String::new() } else { format!("o{}", rng.below(20)) };
                        let p = format!("p{}", rng.below(8));
                        let exp = match rng.below(4) {
                            0 => "now() + interval '1 day'",
                            1 => "now() - interval '1 day'",
                            _ => "NULL",
                        };
                        sql.push_str(&match rng.below(10) {
                            0..=3 => format!(
                                "INSERT INTO permd.tuples VALUES ('{s}', '{o}', '{p}', {exp}) \
                                 ON CONFLICT (subject, object, permission) DO UPDATE SET expires_at = excluded.expires_at;"
                            ),
                            4 => format!("UPDATE permd.tuples SET object = '{o}' WHERE subject = '{s}' AND permission = '{p}' AND NOT EXISTS (SELECT 1 FROM permd.tuples x WHERE x.subject = '{s}' AND x.object = '{o}' AND x.permission = '{p}');"),
                            5 | 6 => format!("DELETE FROM permd.tuples WHERE subject = '{s}' AND (object = '{o}' OR permission = '{p}');"),
                            7 => format!(
                                "INSERT INTO permd.limits VALUES ('{s}', 'l{}', {}) ON CONFLICT (subject, name) DO UPDATE SET value = excluded.value;",
                                rng.below(3),
                                rng.below(100)
                            ),
                            8 => format!("DELETE FROM permd.limits WHERE subject = '{s}';"),
                            _ => format!("INSERT INTO permd.tuples SELECT '{s}', 'o' || g, '{p}', NULL FROM generate_series(1, 5) g ON CONFLICT DO NOTHING;"),
                        });
                    }
                    if rng.below(3) == 0 {
                        // Hold the transaction open a little so commits interleave.
                        sql.push_str(&format!("SELECT pg_sleep({});", rng.below(20) as f64 / 1000.0));
                    }
                    // A multi-statement simple query is one implicit transaction. Concurrent
                    // writers may deadlock on the same keys; a failed transaction is rolled
                    // back whole, as an application's would be.
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&pool).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_writers_end_equal_to_the_database() {
    let db = database().await;
    let daemon = TestDaemon::start(&db.url).await;
    let writers = random_writers(&db, 4, 60);
    let mut observed = 0u64;
    // Read while writing: every answer must come back (no 5xx, no panic).
    wait_until("the writers", || {
        let done = writers.iter().all(|w| w.is_finished());
        let store = daemon.store.clone();
        observed += u64::from(store.check("s1", "p1", "o1"));
        std::future::ready(done)
    })
    .await;
    for w in writers {
        w.await.expect("writer task");
    }
    let t = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&t).await, db.digest().await);

    // Every individual answer agrees with SQL too (expiry applied at read time).
    for s in 0..30 {
        for o in ["", "o1", "o7"] {
            for p in 0..8 {
                let (s, p) = (format!("s{s}"), format!("p{p}"));
                let expected: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM permd.tuples WHERE subject = $1 AND object = $2
                     AND permission = $3 AND (expires_at IS NULL OR expires_at > now()))",
                )
                .bind(&s)
                .bind(o)
                .bind(&p)
                .fetch_one(&db.pool)
                .await
                .expect("oracle");
                assert_eq!(daemon.store.check(&s, &p, o), expected, "{s} {p} {o:?}");
            }
        }
    }
    println!("observed {observed} allowed reads during the run");
    daemon.stop().await;
}

/// A daemon polling hourly (`doorbell_only`), once it applies changes from the
/// notifications.
async fn following(db: &TestDb) -> TestDaemon {
    let daemon = TestDaemon::start_with(doorbell_only(&db.url), patient()).await;
    daemon
        .wait_for("following the notifications", || {
            daemon.status.report().following
        })
        .await;
    daemon
}

/// Committed changes reach the mirror from their notifications alone: with an hourly
/// poll and no reader asking for a token, the watermark never moves, yet after a random
/// concurrent workload (every statement small enough for its notification) the mirror
/// equals the database. Applying the rows of concurrent transactions in any order but
/// their commit order, or a statement's gone rows after its new ones, ends elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_alone_carry_every_committed_change() {
    let db = database().await;
    let daemon = following(&db).await;
    let watermark = daemon.store.watermark();
    for w in random_writers(&db, 4, 40) {
        w.await.expect("writer task");
    }
    // Within one transaction: the same row inserted, deleted and inserted again (three
    // notifications, the first and the last with the same rows, none folded into
    // another), a row's expiry changed in place, 150 rows in one statement (carried
    // whole: 4 KB of the notification's 8), and names beyond ASCII, with quotes (signed
    // over the JSON's UTF-8 as Postgres escapes it).
    db.write(
        "INSERT INTO permd.tuples VALUES ('again', 'doc', 'read', NULL);
         DELETE FROM permd.tuples WHERE subject = 'again';
         INSERT INTO permd.tuples VALUES ('again', 'doc', 'read', NULL);
         INSERT INTO permd.tuples VALUES ('expiring', 'doc', 'read', NULL);
         UPDATE permd.tuples SET expires_at = now() + interval '1 day' WHERE subject = 'expiring';
         INSERT INTO permd.tuples SELECT 'wide', 'doc:' || i, 'read', NULL FROM generate_series(1, 150) i;
         INSERT INTO permd.tuples VALUES ('ünïcødé \"quoted\"', 'dôc', 'réad', NULL);",
    )
    .await;
    mirrors_the_database(&db, &daemon).await;
    let report = daemon.status.report();
    assert_eq!(
        daemon.store.watermark(),
        watermark,
        "no poll ran: {report:?}"
    );
    assert!(report.following, "{report:?}");
    assert!(report.notified_changes > 100, "{report:?}");
    daemon.stop().await;
}

/// A subject with thousands of objects (whose grants the store keeps in chunks once
/// written) stays exact through both paths: statements too large to notify, which a poll
/// applies a subject's run of keys at a time, and single-row transactions applied from
/// their notifications; over the threshold and back under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_with_thousands_of_objects_stays_exact() {
    let db = database().await;
    // `other` holds the odd objects, so that those `big` gains sit all over its list.
    db.exec(
        "INSERT INTO permd.tuples
         SELECT CASE WHEN i % 2 = 0 THEN 'big' ELSE 'other' END, 'doc:' || i, 'read', NULL
         FROM generate_series(0, 11999) i",
    )
    .await;
    let daemon = following(&db).await;
    let mut rng = Rng(40);
    // Equal to the database row for row, and every check of `big` answered as it says.
    let exact = async |what: &str| {
        let expected = db.digest().await;
        wait_until(what, || {
            std::future::ready(daemon.store.digest() == expected)
        })
        .await;
        let held: Vec<(String, String)> =
            sqlx::query_as("SELECT object, permission FROM permd.tuples WHERE subject = 'big'")
                .fetch_all(&db.pool)
                .await
                .expect("big's rows");
        let held: std::collections::HashSet<(String, String)> = held.into_iter().collect();
        for o in 0..12_000 {
            let object = format!("doc:{o}");
            for permission in ["read", "edit", "write", "admin"] {
                let expected = held.contains(&(object.clone(), permission.to_owned()));
                let checked = daemon.store.check("big", permission, &object);
                assert_eq!(checked, expected, "{what}: {object} {permission}");
            }
        }
    };
    // 6,000 objects loaded; 300 more in one statement, then single grants and revokes.
    db.write(
        "INSERT INTO permd.tuples SELECT 'big', 'doc:' || (i * 40 + 1), 'edit', NULL
         FROM generate_series(0, 299) i",
    )
    .await;
    for _ in 0..150 {
        let object = rng.below(12_000);
        db.write(&if rng.below(2) == 0 {
            format!("INSERT INTO permd.tuples VALUES ('big', 'doc:{object}', 'write', NULL) ON CONFLICT DO NOTHING")
        } else {
            format!("DELETE FROM permd.tuples WHERE subject = 'big' AND object = 'doc:{object}'")
        })
        .await;
    }
    exact("the mirror to take in the grants").await;
    // Most of it revoked in one statement, and a few singles after.
    db.write("DELETE FROM permd.tuples WHERE subject = 'big' AND object::text > 'doc:2'")
        .await;
    for object in [0, 2, 10, 11_998] {
        db.write(&format!(
            "INSERT INTO permd.tuples VALUES ('big', 'doc:{object}', 'admin', NULL) ON CONFLICT DO NOTHING"
        ))
        .await;
    }
    exact("the mirror to take in the revokes").await;
    assert!(daemon.store.check("big", "admin", "doc:11998"));
    assert!(!daemon.store.check("big", "read", "doc:4000"));
    // Many of the statements applied from their notifications, not all: a transaction
    // open in another test holds the cluster-wide horizon, and the polls the applier
    // makes meanwhile read some commits from the changelog first (81 once under the
    // whole suite, where 124 come by notification when the test runs alone).
    let report = daemon.status.report();
    assert!(report.notified_changes > 20, "{report:?}");
    daemon.stop().await;
}

/// A key never goes back in time while notifications and polls both rewrite it: one
/// writer moves a single permission from version to version (each an UPDATE, whose
/// notification carries the old row gone and the new one there) while the applier polls
/// every millisecond, so that notifications often arrive after a poll that already read
/// their commit. An observer reading the key all along must see one permission at a time,
/// its version never lower than the last. Applying such a late notification to a key the
/// poll re-read puts an older version back (or two at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_goes_back_in_time() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('mono', 'doc', 'v000000', NULL)")
        .await;
    let sync = polling_every(&db.url, Duration::from_millis(1));
    let daemon = TestDaemon::start_with(sync, patient()).await;
    const VERSIONS: u32 = 1500;
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for n in 1..=VERSIONS {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "UPDATE permd.tuples SET permission = 'v{n:06}' WHERE subject = 'mono'"
                )))
                .execute(&pool)
                .await
                .expect("update");
            }
        })
    };
    let mut last = String::from("v000000");
    let mut looks = 0u64;
    let last_version = format!("v{VERSIONS:06}");
    let started = std::time::Instant::now();
    while last != last_version {
        assert!(started.elapsed() < DEADLINE, "stuck at {last}");
        let seen = daemon.store.permissions_of("mono", "doc");
        assert_eq!(seen.len(), 1, "after {last}: {seen:?}");
        assert!(*seen[0] >= *last, "{} after {last}", seen[0]);
        last = seen[0].to_string();
        looks += 1;
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    let report = daemon.status.report();
    assert!(report.notified_changes > 0, "{report:?}");
    println!(
        "{looks} looks, {} of {VERSIONS} versions applied from notifications",
        report.notified_changes
    );
    daemon.stop().await;
}

/// Each of `statements`, run as the role behind `pool`, is refused for want of a privilege.
async fn denied(pool: &sqlx::PgPool, statements: &[&str]) {
    for statement in statements {
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(*statement))
            .execute(pool)
            .await
            .err();
        assert!(
            error.is_some_and(|e| e.to_string().contains("permission denied")),
            "{statement}"
        );
    }
}

/// Anyone who can connect may LISTEN and NOTIFY on any channel (Postgres has no privilege
/// for either), so a role with no privilege on permd's tables, or a SQL injection in a
/// read-only query, can send permd notifications. Here one hears a grant's notification,
/// replays it after the grant was revoked, and forges others: rows without a signature,
/// under a wrong one, and the grant's signed rows changed to name itself. None changes
/// an answer; each is counted, and the changelog is read instead. It can neither read
/// the key nor call the function that signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_notifications_change_no_answer() {
    let db = database().await;
    let daemon = following(&db).await;
    let (mallory, _) = db.role("mallory", "").await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&mallory)
        .await
        .expect("connect");
    listener.listen("permd_changes").await.expect("listen");
    let notified = daemon.status.report().notified_changes;
    db.write("INSERT INTO permd.tuples VALUES ('bob', 'doc', 'read', NULL)")
        .await;
    let grant = listener.recv().await.expect("notification");
    let grant = grant.payload().to_owned();
    db.write("DELETE FROM permd.tuples WHERE subject = 'bob'")
        .await;
    daemon
        .wait_for("both applied from their notifications", || {
            daemon.status.report().notified_changes == notified + 2
        })
        .await;
    assert!(!daemon.store.check("bob", "read", "doc"));

    // The replay: no poll has read either commit yet, so applied it would grant again.
    sqlx::query("SELECT pg_notify('permd_changes', $1)")
        .bind(&grant)
        .execute(&mallory)
        .await
        .expect("replay");
    daemon
        .wait_for_report("the replay refused", |r| r.refused_notifications == 1)
        .await;
    assert!(!daemon.store.check("bob", "read", "doc"));

    // Forgeries, each under a transaction id no poll has seen.
    let rows = "json_build_object('x', pg_current_xact_id()::text, 'n', 1, 'k', 't', 'd', NULL, \
                'u', json_build_array(json_build_array('mallory', '', 'admin', NULL)))::text";
    let grant_xid = serde_json::from_str::<serde_json::Value>(&grant[64..]).expect("JSON")["x"]
        .as_str()
        .expect("the xid")
        .to_owned();
    for forged in [
        format!("SELECT pg_notify('permd_changes', {rows})"),
        format!("SELECT pg_notify('permd_changes', repeat('0', 64) || {rows})"),
        format!(
            "SELECT pg_notify('permd_changes', replace(replace($1, '\"bob\"', '\"mallory\"'), \
             '\"{grant_xid}\"', '\"' || pg_current_xact_id()::text || '\"'))"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(forged.clone()))
            .bind(&grant)
            .execute(&mallory)
            .await
            .unwrap_or_else(|e| panic!("{forged}: {e}"));
    }
    daemon
        .wait_for_report("the forgeries refused", |r| r.refused_notifications == 4)
        .await;
    assert!(!daemon.store.check("mallory", "admin", ""));
    assert!(!daemon.store.check("mallory", "read", "doc"));
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);

    denied(
        &mallory,
        &[
            "SELECT inner_pad FROM permd.notify_key",
            "SELECT permd.ring_changes('t', NULL, '[]')",
        ],
    )
    .await;
    daemon.stop().await;
}

/// Asserts that the daemon applied nothing from notifications' rows and refused none: what
/// it holds came by polls.
fn polled_alone(daemon: &TestDaemon) {
    let report = daemon.status.report();
    assert_eq!(
        (report.notified_changes, report.refused_notifications),
        (0, 0),
        "{report:?}"
    );
}

/// With `permd.notify = doorbell` a writer's notifications carry its transaction id alone,
/// so that a role that may LISTEN does not see which rows change; permd then reads each
/// commit from the changelog at once (an hourly poll here: the doorbell alone brings it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doorbell_only_writer_shows_no_rows_to_listeners() {
    let db = database().await;
    let daemon = following(&db).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("connect");
    listener.listen("permd_changes").await.expect("listen");
    db.write(
        "SET LOCAL permd.notify = doorbell;
         INSERT INTO permd.tuples VALUES ('secret', 'doc', 'read', NULL);",
    )
    .await;
    let heard = listener.recv().await.expect("notification");
    assert!(heard.payload().starts_with("{\"x\""), "{}", heard.payload());
    assert!(!heard.payload().contains("secret"), "{}", heard.payload());
    daemon
        .wait_for("the write", || daemon.store.check("secret", "read", "doc"))
        .await;
    polled_alone(&daemon);
    daemon.stop().await;
}

/// How many daemons listen for `permd.notify = auto` writers in `db`: the exclusive
/// advisory locks (1886547300, slot) held there (migration 0010).
async fn listening_daemons(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND classid = 1886547300 AND objsubid = 2
             AND mode = 'ExclusiveLock' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .expect("pg_locks")
}

/// Until `daemon`'s mirror equals the database.
async fn mirrors_the_database(db: &TestDb, daemon: &TestDaemon) {
    let expected = db.digest().await;
    wait_until("the mirror to equal the database", || {
        std::future::ready(daemon.store.digest() == expected)
    })
    .await;
}

/// Writers with `permd.notify = auto` until `stop`: one transaction of one tuple each, as
/// fast as they go, each writer on subjects of its own.
fn auto_writers(
    db: &TestDb,
    writers: usize,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..writers)
        .map(|w| {
            let (pool, stop) = (db.pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut written = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // One round trip a transaction, so that four writers ring well past
                    // the rate on a slow machine too (the names are numbers').
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "BEGIN; SET LOCAL permd.notify = auto;
                         INSERT INTO permd.tuples VALUES ('busy{w}', 'doc{written}', 'read', NULL);
                         COMMIT;"
                    )))
                    .execute(&pool)
                    .await
                    .expect("an auto write");
                    written += 1;
                }
                written
            })
        })
        .collect()
}

/// Stops the [`auto_writers`] and waits for them: the transactions they wrote.
async fn stop_writers(
    stop: &std::sync::atomic::AtomicBool,
    writers: Vec<tokio::task::JoinHandle<usize>>,
) -> usize {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    written
}

/// The next notification's payload that mentions `marker`, and whether any before it did
/// not.
async fn heard_until(listener: &mut sqlx::postgres::PgListener, marker: &str) -> Vec<String> {
    let mut heard = Vec::new();
    loop {
        let payload = tokio::time::timeout(DEADLINE, listener.recv())
            .await
            .expect("a notification within the deadline")
            .expect("notification")
            .payload()
            .to_owned();
        let done = payload.contains(marker);
        heard.push(payload);
        if done {
            return heard;
        }
    }
}

/// A transaction, left open, that writes `subject` with `permd.notify = auto`, and
/// whether it rings (`permd.rings`: `yes` or `no`).
async fn auto_write(
    db: &TestDb,
    subject: &str,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, String) {
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL permd.notify = auto")
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query("INSERT INTO permd.tuples VALUES ($1, 'doc', 'read', NULL)")
        .bind(subject)
        .execute(&mut *tx)
        .await
        .expect("write");
    let rings: String = sqlx::query_scalar("SELECT current_setting('permd.rings')")
        .fetch_one(&mut *tx)
        .await
        .expect("permd.rings");
    (tx, rings)
}

/// Once `daemon` polls for the busy writers, a transaction that writes `subject` with
/// `permd.notify = auto` and decides to stay silent (a daemon that stalled long enough
/// for its polls to look calm may have listened again meanwhile: then tried again), left
/// open.
async fn silent_write(
    daemon: &TestDaemon,
    db: &TestDb,
    subject: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        daemon
            .wait_for_report("busy polling", |r| r.busy_polling)
            .await;
        let (tx, rings) = auto_write(db, subject).await;
        if rings == "no" {
            assert_eq!(listening_daemons(db).await, 0);
            return tx;
        }
        assert!(std::time::Instant::now() < deadline, "never silent");
    }
}

/// `permd.notify = auto` (migration 0010): writers ring, with their rows, while permd
/// listens; when they ring faster than 500 a second it lets its slot go and polls every
/// `--busy-poll-ms` instead (an hourly idle poll here: only those polls bring a silent
/// commit), and they send nothing; once the writes stop it listens again, and they ring.
/// Fails if a writer rings whatever permd does (the silent write's notification comes
/// before the marker's), if permd never stops listening, or never listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_writers_ring_while_permd_listens_and_are_polled_for_while_they_come_fast() {
    let db = database().await;
    let daemon = following(&db).await;
    wait_until("permd listens", || async {
        listening_daemons(&db).await == 1
    })
    .await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("connect");
    listener.listen("permd_changes").await.expect("listen");
    let before = daemon.status.report();
    db.write(
        "SET LOCAL permd.notify = auto;
         INSERT INTO permd.tuples VALUES ('rung', 'doc', 'read', NULL);",
    )
    .await;
    let heard = heard_until(&mut listener, "rung").await;
    assert!(heard[0].contains(r#""a" : true"#), "{heard:?}");
    daemon
        .wait_for_report("the write applied from its notification", |r| {
            r.notified_changes == before.notified_changes + 1
        })
        .await;
    assert!(daemon.store.check("rung", "read", "doc"));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = auto_writers(&db, 4, &stop);
    // While the others write, one more writes silently: a marker written with
    // notifications on, heard after it, is the first thing heard of either.
    while listener.next_buffered().is_some() {}
    let silent = silent_write(&daemon, &db, "silent").await;
    silent.commit().await.expect("commit");
    db.write("INSERT INTO permd.tuples VALUES ('marker', 'doc', 'read', NULL);")
        .await;
    let heard = heard_until(&mut listener, "marker").await;
    assert!(
        heard.iter().all(|payload| !payload.contains("silent")),
        "{heard:?}"
    );
    daemon
        .wait_for("the silent write, by a busy poll", || {
            daemon.store.check("silent", "read", "doc")
        })
        .await;

    let written = stop_writers(&stop, writers).await;
    daemon
        .wait_for_report("listening again", |r| !r.busy_polling)
        .await;
    assert_eq!(listening_daemons(&db).await, 1);
    assert!(written >= 50, "{written} written");
    // Every commit is in the mirror, whether rung or polled for.
    mirrors_the_database(&db, &daemon).await;
    db.write(
        "SET LOCAL permd.notify = auto;
         INSERT INTO permd.tuples VALUES ('rung again', 'doc', 'read', NULL);",
    )
    .await;
    let heard = heard_until(&mut listener, "rung again").await;
    assert!(
        heard.last().is_some_and(|p| p.contains(r#""a" : true"#)),
        "{heard:?}"
    );
    daemon.stop().await;
}

/// A silent `permd.notify = auto` transaction left open holds every slot in share mode,
/// so that a daemon that wants to listen again cannot take one: it waits for one on a
/// connection of its own, and writers ring meanwhile (their tries fail behind its wait),
/// their rows applied from notifications while the open transaction stays open. Once it
/// ends, the slot is the daemon's, and the poll right after reads its commit (a daemon
/// that listened while it was open would have left that commit to the idle poll). Then
/// the slot's connection is ended: permd notices, and listens again on a slot taken
/// anew. Fails if a daemon only tries for a slot (writers stay silent while the
/// transaction is open), if a silent transaction holds no slot, or if a slot lost with
/// its connection goes unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_auto_transaction_left_open_makes_permd_wait_for_a_slot_while_writers_ring() {
    let db = database().await;
    let daemon = TestDaemon::start_with(
        polling_every(&db.url, Duration::from_millis(200)),
        patient(),
    )
    .await;
    wait_until("permd listens", || async {
        listening_daemons(&db).await == 1
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = auto_writers(&db, 4, &stop);
    let open = silent_write(&daemon, &db, "open").await;
    stop_writers(&stop, writers).await;
    // Calm, it tries for a slot, finds none free, and waits for one.
    wait_until("permd waits for a slot", || async {
        db.lock_waiters().await == 1
    })
    .await;
    let report = daemon.status.report();
    assert!(report.busy_polling, "{report:?}");
    assert_eq!(listening_daemons(&db).await, 0);
    assert_eq!(db.sessions_named("permd (busy slot)").await, 1);

    let (rung, rings) = auto_write(&db, "rung").await;
    assert_eq!(rings, "yes");
    rung.commit().await.expect("commit");
    daemon
        .wait_for_report("the write applied from its notification", |r| {
            r.notified_changes == report.notified_changes + 1
        })
        .await;
    assert!(daemon.store.check("rung", "read", "doc"));
    assert!(!daemon.store.check("open", "read", "doc"));

    open.commit().await.expect("commit");
    daemon
        .wait_for("the open write, and listening again", || {
            daemon.store.check("open", "read", "doc") && !daemon.status.report().busy_polling
        })
        .await;
    assert_eq!(listening_daemons(&db).await, 1);

    // The slot's connection ended under it: taken anew, on the sync connection.
    db.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'permd (busy slot)'",
    )
    .await;
    wait_until(
        "permd listens again on a slot of the sync connection",
        || async {
            listening_daemons(&db).await == 1 && db.sessions_named("permd (busy slot)").await == 0
        },
    )
    .await;
    mirrors_the_database(&db, &daemon).await;
    daemon.stop().await;
}

/// A daemon that may open no connection to wait for a slot on (its role's `CONNECTION
/// LIMIT`), starting while a silent `permd.notify = auto` transaction is open, polls for
/// `auto` writers as it did before it could wait: it loads and follows, and once the
/// transaction ends, reads its commit and takes a slot on the sync connection. Fails if
/// a waiting connection that failed kept the daemon from trying again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_cannot_open_a_connection_to_wait_for_a_slot_polls_until_one_is_free() {
    let db = database().await;
    let (pool, url) = role_with_one_connection_to_spare(&db).await;
    let (open, rings) = auto_write(&db, "open").await;
    assert_eq!(rings, "no");
    let daemon = loads_and_follows(&db, polling_every(&url, Duration::from_millis(200))).await;
    let report = daemon.status.report();
    assert!(report.busy_polling, "{report:?}");
    assert_eq!((report.reconnects, report.last_error), (0, None));
    assert_eq!(listening_daemons(&db).await, 0);
    assert_eq!(db.sessions_named("permd (busy slot)").await, 0);
    open.commit().await.expect("commit");
    daemon
        .wait_for("the open write, and listening", || {
            daemon.store.check("open", "read", "doc") && !daemon.status.report().busy_polling
        })
        .await;
    assert_eq!(listening_daemons(&db).await, 1);
    assert_eq!(db.sessions_named("permd (busy slot)").await, 0);
    daemon.stop().await;
    drop(pool);
}

/// Through PgBouncer in session mode, a daemon that starts while a silent
/// `permd.notify = auto` transaction is open waits for a slot on a connection of its own
/// through the pooler, and writers ring meanwhile. When they ring fast enough for it to
/// poll instead, it lets the wait go, and cancels it: PgBouncer keeps the server
/// connection of a client gone mid-query, wait and all. Once the writers stop, it waits
/// again, and takes the slot when the transaction ends. Fails if a wait let go through
/// the pooler stays queued (writers would ring on for no daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_a_wait_for_a_slot_let_go_is_cancelled() {
    let db = database().await;
    let (_bouncer, url) = Bouncer::in_front_of(&db.url, PoolMode::Session);
    let (open, rings) = auto_write(&db, "open").await;
    assert_eq!(rings, "no");
    let daemon = loads_and_follows(&db, doorbell_only(&url)).await;
    wait_until("permd waits for a slot", || async {
        db.lock_waiters().await == 1
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = auto_writers(&db, 4, &stop);
    daemon
        .wait_for_report("the wait let go, to poll", |r| r.busy_polling_started > 0)
        .await;
    wait_until("the wait gone from the lock's queue", || async {
        db.lock_waiters().await == 0
    })
    .await;
    let (silent, rings) = auto_write(&db, "silent").await;
    assert_eq!(rings, "no");
    silent.commit().await.expect("commit");
    stop_writers(&stop, writers).await;
    wait_until("permd waits again", || async {
        db.lock_waiters().await == 1
    })
    .await;
    open.commit().await.expect("commit");
    daemon
        .wait_for("the open write, and listening", || {
            daemon.store.check("open", "read", "doc") && !daemon.status.report().busy_polling
        })
        .await;
    assert_eq!(listening_daemons(&db).await, 1);
    mirrors_the_database(&db, &daemon).await;
    daemon.stop().await;
}

/// A daemon whose polls fall behind `auto` writers (a poll reads a full batch) listens
/// again, however fast they ring, where one that keeps up polls: the writers ring for
/// the one that listens, with their rows, which it applies as they come. Two daemons on
/// one database, the same writers: one reads 10,000 rows a poll and polls, the other,
/// reading 5, listens. Fails if a daemon behind its writers goes on polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_polls_fall_behind_auto_writers_listens_however_fast_they_ring() {
    let db = database().await;
    let keeping_up = following(&db).await;
    let mut config = doorbell_only(&db.url);
    config.batch_rows = 5;
    let behind = TestDaemon::start_with(config, patient()).await;
    behind
        .wait_for("following the notifications", || {
            behind.status.report().following
        })
        .await;
    wait_until("both listen", || async {
        listening_daemons(&db).await == 2
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = auto_writers(&db, 4, &stop);
    // The one behind polled too, once, before its polls fell behind.
    wait_until(
        "one polls, the other listens again, the writers writing",
        || async {
            let report = behind.status.report();
            keeping_up.status.report().busy_polling
                && report.busy_polling_started > 0
                && !report.busy_polling
                && listening_daemons(&db).await == 1
        },
    )
    .await;
    // Rings that would have made it poll (more than 50 in 100 ms) do not, now.
    let listening = behind.status.report();
    behind
        .wait_for_report("writes applied from their notifications", |r| {
            r.notified_changes >= listening.notified_changes + 200
        })
        .await;
    let report = behind.status.report();
    assert_eq!(
        report.busy_polling_started, listening.busy_polling_started,
        "{report:?}"
    );
    assert!(!report.busy_polling, "{report:?}");
    stop_writers(&stop, writers).await;
    for daemon in [&keeping_up, &behind] {
        mirrors_the_database(&db, daemon).await;
    }
    keeping_up.stop().await;
    behind.stop().await;
}

/// Two daemons on one database each hold a slot of their own while they listen (writers
/// ring while either does), both poll while `auto` writers come fast, and both listen
/// again once they stop, every commit in both mirrors. Fails if a daemon could hold no
/// slot beside another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_each_listen_on_a_slot_of_their_own_and_both_poll_while_writes_come_fast() {
    let db = database().await;
    let first = following(&db).await;
    let second = following(&db).await;
    wait_until("both listen", || async {
        listening_daemons(&db).await == 2
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = auto_writers(&db, 4, &stop);
    for daemon in [&first, &second] {
        daemon
            .wait_for_report("busy polling", |r| r.busy_polling)
            .await;
    }
    stop_writers(&stop, writers).await;
    for daemon in [&first, &second] {
        daemon
            .wait_for_report("listening again", |r| !r.busy_polling)
            .await;
    }
    assert_eq!(listening_daemons(&db).await, 2);
    for daemon in [&first, &second] {
        mirrors_the_database(&db, daemon).await;
    }
    first.stop().await;
    second.stop().await;
}

/// A writer needs no privilege on the key: the trigger functions run as the owner of
/// permd's schema. A role that may write permd.tuples and permd.limits, and nothing else
/// of permd's, writes; its rows arrive signed and are applied from their notifications,
/// and its TRUNCATE makes permd reload. It can neither read the key nor attach the trigger functions to a table of its own (a
/// temporary table's trigger would otherwise sign whatever rows it liked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_without_privilege_on_the_key_sends_signed_rows() {
    let db = database().await;
    let daemon = following(&db).await;
    let (writer, _) = db
        .role(
            "writer",
            "GRANT USAGE ON SCHEMA permd TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON permd.tuples, permd.limits
                 TO {role};",
        )
        .await;
    let before = daemon.status.report();
    sqlx::raw_sql(
        "INSERT INTO permd.tuples VALUES ('w', 'doc', 'read', NULL);
         INSERT INTO permd.limits VALUES ('w', 'projects', 3);",
    )
    .execute(&writer)
    .await
    .expect("the writer writes");
    daemon
        .wait_for_report("both statements applied", |r| {
            r.notified_changes == before.notified_changes + 2
        })
        .await;
    assert!(daemon.store.check("w", "read", "doc"));
    assert_eq!(daemon.store.limit("w", "projects"), Some(3));
    assert_eq!(daemon.status.report().refused_notifications, 0);
    // TRUNCATE too needs nothing of the changelog's: it asks every daemon to reload.
    sqlx::raw_sql("TRUNCATE permd.limits")
        .execute(&writer)
        .await
        .expect("the writer truncates");
    daemon
        .wait_for_report("the reload", |r| r.reloads == before.reloads + 1)
        .await;
    assert_eq!(daemon.store.limit("w", "projects"), None);
    denied(
        &writer,
        &[
            "SELECT inner_pad FROM permd.notify_key",
            "SELECT permd.rotate_notify_key()",
            "CREATE TEMP TABLE mine (subject text, object text, permission text, expires_at timestamptz);
             CREATE TRIGGER mine AFTER INSERT ON mine REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION permd.log_tuples_new();",
        ],
    )
    .await;
    daemon.stop().await;
}

/// A daemon whose role may not read the key (granted only what README lists for it, less
/// `permd.notify_key`) says so and reads every commit from the changelog: each
/// notification rings a poll, none is applied, and none is counted as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_cannot_read_the_key_polls_for_every_commit() {
    let db = database().await;
    let (_, url) = db
        .role(
            "daemon",
            "GRANT USAGE ON SCHEMA permd TO {role};
             GRANT SELECT ON permd.tuples, permd.limits, permd.changelog, permd.retention
                 TO {role};",
        )
        .await;
    let daemon = TestDaemon::start_with(doorbell_only(&url), patient()).await;
    for n in 0..3 {
        let subject = format!("s{n}");
        db.write(&format!(
            "INSERT INTO permd.tuples VALUES ('{subject}', 'doc', 'read', NULL)"
        ))
        .await;
        // The doorbell alone (an hourly poll, no token asked for) brings it.
        wait_until("the write", || {
            std::future::ready(daemon.store.check(&subject, "read", "doc"))
        })
        .await;
    }
    polled_alone(&daemon);
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

/// A rotated key (`permd.rotate_notify_key()`) is read again as soon as a notification
/// stops verifying under the key that verified the ones before: the first write after the
/// rotation is refused and read from the changelog, the next is applied from its
/// notification again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_read_again() {
    let db = database().await;
    let daemon = following(&db).await;
    db.write("INSERT INTO permd.tuples VALUES ('before', 'doc', 'read', NULL)")
        .await;
    daemon
        .wait_for_report("applied from its notification", |r| r.notified_changes == 1)
        .await;
    db.exec("SELECT permd.rotate_notify_key()").await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('first', 'doc', 'read', NULL)")
        .await;
    daemon
        .wait_for("the first write refused", || {
            daemon.status.report().refused_notifications == 1
        })
        .await;
    assert!(daemon.check("first", "read", "doc", &token).await);
    db.write("INSERT INTO permd.tuples VALUES ('next', 'doc', 'read', NULL)")
        .await;
    daemon
        .wait_for_report("applied from its notification", |r| r.notified_changes == 2)
        .await;
    assert!(daemon.store.check("next", "read", "doc"));
    assert_eq!(daemon.status.report().refused_notifications, 1);
    daemon.stop().await;
}

/// One writer moves key `a` and then key `b` to the next version in each transaction (two
/// statements), `VERSIONS` times, while the applier polls every millisecond; an observer
/// reading `b` and then `a` must never see `b` ahead of `a`: a reader sees a commit's keys
/// change in the order they were written, and never a later commit's before an earlier
/// one's. Returns the daemon's report once `b` reached the last version.
async fn b_never_ahead_of_a(sync: SyncConfig, db: &TestDb, notify: bool) -> StatusReport {
    const VERSIONS: u32 = 1500;
    db.exec(
        "INSERT INTO permd.tuples VALUES ('a', 'doc', 'v000000', NULL), ('b', 'doc', 'v000000', NULL)",
    )
    .await;
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let writer = {
        let pool = db.pool.clone();
        let notify = if notify { "on" } else { "off" };
        tokio::spawn(async move {
            for n in 1..=VERSIONS {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET LOCAL permd.notify = {notify};
                     UPDATE permd.tuples SET permission = 'v{n:06}' WHERE subject = 'a';
                     UPDATE permd.tuples SET permission = 'v{n:06}' WHERE subject = 'b';"
                )))
                .execute(&pool)
                .await
                .expect("update");
            }
        })
    };
    let version = |subject: &str| -> String {
        let seen = daemon.store.permissions_of(subject, "doc");
        assert_eq!(seen.len(), 1, "{subject}: {seen:?}");
        seen[0].to_string()
    };
    let last = format!("v{VERSIONS:06}");
    let started = std::time::Instant::now();
    let mut looks = 0u64;
    loop {
        assert!(started.elapsed() < DEADLINE, "stuck at {}", version("b"));
        let b = version("b");
        let a = version("a");
        assert!(a >= b, "b at {b} while a is at {a}");
        looks += 1;
        if b == last {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    let report = daemon.status.report();
    println!(
        "{looks} looks; {} notifications applied, {} dropped",
        report.notified_changes, report.dropped_notifications
    );
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
    report
}

/// A poll applies the keys it re-read one at a time, in the order of their last change
/// in the changelog (NOTIFY off: polls alone). Applied in any other order (they came in
/// the order of their names' hashes until session 26), `b` shows ahead of `a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_applies_keys_in_the_order_they_were_written() {
    let db = database().await;
    let report =
        b_never_ahead_of_a(polling_every(&db.url, Duration::from_millis(1)), &db, false).await;
    assert_eq!(report.notified_changes, 0, "{report:?}");
}

/// Notifications dropped because too many waited for the applier (here at most two may
/// wait, so thousands are dropped) never let a later commit be seen without an earlier
/// one. Applying the notifications after a gap as if nothing had been dropped (following
/// not suspended) shows `b` ahead of `a`, or two versions of `a` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_notifications_never_let_a_later_commit_jump_ahead() {
    let db = database().await;
    let mut sync = polling_every(&db.url, Duration::from_millis(1));
    sync.notification_capacity = 2;
    let report = b_never_ahead_of_a(sync, &db, true).await;
    assert!(report.dropped_notifications > 0, "{report:?}");
    assert!(report.notified_changes > 0, "{report:?}");
}

/// A statement too large for its notification (300 rows) is read from the
/// changelog, and a commit after it is never seen without it. (Here the window in which
/// a wrong order would show is one poll; the `Follower`'s unit tests pin the order
/// itself: after a notification without rows, later ones are dropped until a poll has
/// read it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_to_notify_is_polled_and_nothing_after_it_jumps_ahead() {
    let db = database().await;
    let daemon = following(&db).await;
    for round in 0..5 {
        db.write(&format!(
            "INSERT INTO permd.tuples SELECT 'big{round}', 'doc:' || i, 'read', NULL
             FROM generate_series(1, 300) i"
        ))
        .await;
        db.write(&format!(
            "INSERT INTO permd.tuples VALUES ('small{round}', 'doc', 'read', NULL)"
        ))
        .await;
        let (small, big) = (format!("small{round}"), format!("big{round}"));
        wait_until("the small write", || {
            let store = &daemon.store;
            if store.check(&small, "read", "doc") {
                // Seen: the large statement, committed first, is seen whole.
                for i in 1..=300 {
                    assert!(store.check(&big, "read", &format!("doc:{i}")), "doc:{i}");
                }
                return std::future::ready(true);
            }
            std::future::ready(false)
        })
        .await;
    }
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon
        .wait_for("following again", || daemon.status.report().following)
        .await;
    daemon.stop().await;
}

/// The poll reads the changelog by its primary key, never whole, whatever the table's size
/// when its plan was made. In a session with the sync connection's settings the poll runs
/// on 9,000 changelog rows until Postgres settles on its generic plan; the changelog is
/// then emptied and vacuumed (as a prune does), the poll runs again (its plan made anew
/// for an empty table), and 9,000 rows arrive. Its plan must still reach the changelog
/// only through its primary key, before autovacuum has analyzed the new rows and after.
/// Until session 24 such a plan read the whole changelog at every poll (1.2 ms a poll at
/// 10,000 rows, 6.3 at 20,000), and a plan made with statistics estimated the oldest
/// waiting change's condition as a third of the table (0.6 ms a poll at 9,000 rows).
/// Since session 62 the changelog is first filled with 300,000 rows, and emptied while an
/// older snapshot keeps its pages from the vacuum: the plan then made, for pages and no
/// rows, read the rows begun since by a bitmap scan, which reads its whole range before
/// the LIMIT takes a batch (the session turns bitmap scans off since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poll_reads_the_changelog_by_its_key_at_any_size() {
    const FILL: &str = "INSERT INTO permd.changelog (xid, kind, subject, object)
                        SELECT '3', 't', 'user:' || i, 'doc:1' FROM generate_series(1, 9000) i";
    let db = database().await;
    db.exec(&FILL.replace("9000", "300000")).await;
    db.exec("ANALYZE permd.changelog").await;
    let mut conn = db.pool.acquire().await.expect("a connection");
    sqlx::raw_sql(permd::sync::SESSION)
        .execute(&mut *conn)
        .await
        .expect("the sync connection's settings");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE poll(text[], text, bigint, text, bigint, bigint, bool) AS {}",
        permd::sync::POLL
    )))
    .execute(&mut *conn)
    .await
    .expect("prepare the poll");
    let cursor: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *conn)
        .await
        .expect("an xid above the rows");
    let execute = format!(
        "EXECUTE poll('{{}}', '{cursor}', 10000, '0', 0, {}, false)",
        i64::MIN
    );
    let mut holder = None;
    for times in [8, 2] {
        if times == 2 {
            // A snapshot older than the delete keeps its rows from being removed, so the
            // vacuum leaves the table's pages (as a long transaction or a replication slot
            // does): a plan made now sees pages and no rows.
            let mut old = db.pool.begin().await.expect("a transaction");
            sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM permd.changelog LIMIT 1")
                .execute(&mut *old)
                .await
                .expect("a snapshot");
            holder = Some(old);
            db.exec("DELETE FROM permd.changelog").await;
            db.exec("VACUUM ANALYZE permd.changelog").await;
        }
        for _ in 0..times {
            sqlx::raw_sql(sqlx::AssertSqlSafe(execute.clone()))
                .execute(&mut *conn)
                .await
                .expect("poll");
        }
    }
    if let Some(old) = holder {
        old.commit().await.expect("commit");
    }
    db.exec(FILL).await;
    for analyzed in [false, true] {
        if analyzed {
            db.exec("ANALYZE permd.changelog").await;
        }
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {execute}")))
                .fetch_all(&mut *conn)
                .await
                .expect("explain the poll");
        let plan = plan.join("\n");
        assert!(
            plan.contains("changelog_pkey"),
            "analyzed: {analyzed}\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan on changelog"),
            "analyzed: {analyzed}\n{plan}"
        );
        assert!(
            !plan.contains("Bitmap Heap Scan on changelog"),
            "analyzed: {analyzed}\n{plan}"
        );
    }
}

/// Whether every connection of `application_name` to `db`'s database is encrypted, and the
/// client certificate's name each showed (empty when none).
async fn encrypted(db: &TestDb, application_name: &str) -> (bool, Vec<String>) {
    let rows: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = $1 AND a.datname = current_database()",
    )
    .bind(application_name)
    .fetch_all(&db.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(!rows.is_empty(), "no connection of {application_name}");
    (
        rows.iter().all(|(ssl, _)| *ssl),
        rows.into_iter()
            .map(|(_, dn)| dn.unwrap_or_default())
            .collect(),
    )
}

/// The sync connection speaks TLS as the URL's `sslmode`, `sslrootcert`, `sslcert` and
/// `sslkey` ask, as libpq reads them: the load's COPY and the changelog arrive over it (the
/// tap reads under the encryption), a certificate that is not trusted or does not name the
/// host is refused with the remedy, and a server without TLS is refused where TLS is
/// required. The CLI's connection (sqlx) reads the same options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_connection_speaks_tls_as_the_url_asks() {
    let ca = common::TestCa::new("permd test CA");
    let impostor = common::TestCa::new("someone else's CA");
    let cluster = tls_cluster(&ca, 1, true);
    let mut db = common::database_on(&cluster).await;
    let trusted = ca.file(cluster.dir(), "ca.pem");
    let untrusted = impostor.file(cluster.dir(), "impostor.pem");
    let (client_cert, client_key) = ca.sign(&[], "permd");
    let cert_file = cluster.dir().join("client.crt");
    let key_file = cluster.dir().join("client.key");
    std::fs::write(&cert_file, client_cert).expect("write the client's certificate");
    std::fs::write(&key_file, client_key).expect("write the client's key");
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = |host: &str, options: &str| {
        format!(
            "postgres://postgres@{host}:{}/{name}?{options}",
            cluster.port()
        )
    };

    // verify-full, a client certificate too: a large load and a write arrive encrypted.
    db.exec(
        "INSERT INTO permd.tuples (subject, object, permission, expires_at)
         SELECT 'user:' || (i / 7), 'doc:' || (i % 1000), 'perm' || (i % 70), NULL
         FROM generate_series(1, 60000) i",
    )
    .await;
    let full = url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={trusted}&sslcert={}&sslkey={}",
            cert_file.display(),
            key_file.display()
        ),
    );
    let daemon = TestDaemon::start(&full).await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:tls', 'doc:1', 'read', NULL)")
        .await;
    assert!(daemon.check("user:tls", "read", "doc:1", &token).await);
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(
        encrypted(&db, "permd").await,
        (true, vec!["/CN=permd".to_owned()])
    );
    daemon.stop().await;

    // Refused, with the remedy, and retried.
    for (url, expected) in [
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={untrusted}"),
            ),
            "give that CA's PEM file as sslrootcert",
        ),
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={trusted}"),
            ),
            "does not name the host",
        ),
        // libpq's rule: `require` with a root certificate checks the CA.
        (
            url(
                "127.0.0.1",
                &format!("sslmode=require&sslrootcert={untrusted}"),
            ),
            "give that CA's PEM file as sslrootcert",
        ),
    ] {
        let error = common::daemon_refused(&url).await;
        assert!(error.contains(expected), "{url}: {error}");
    }

    // verify-ca checks the CA only; require and prefer (the default) check nothing.
    for options in [
        format!("sslmode=verify-ca&sslrootcert={trusted}&application_name=permd-ca"),
        "sslmode=require&application_name=permd-require".to_owned(),
        "application_name=permd-prefer".to_owned(),
    ] {
        let url = url("127.0.0.1", &options);
        let daemon = TestDaemon::start(&url).await;
        let app = options.rsplit('=').next().expect("an application name");
        assert_eq!(
            encrypted(&db, app).await,
            (true, vec![String::new()]),
            "{url}"
        );
        daemon.stop().await;
    }
    // SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS): with channel_binding=require,
    // the server checks permd's hash of its certificate against its own, or refuses it.
    scram_over_tls(&db, &cluster).await;
    let scram = |password: &str, options: &str| {
        format!(
            "postgres://permd_scram{password}@localhost:{}/{name}?sslmode=verify-full&sslrootcert={trusted}{options}",
            cluster.port()
        )
    };
    wait_until("the server to ask permd_scram for its password", || {
        let url = scram("", "");
        async move { permd::db::pool(&url).await.is_err() }
    })
    .await;
    // The one-off commands too: their relay runs SCRAM-SHA-256-PLUS for sqlx (before
    // session 35 they refused channel_binding=require). A wrong password is refused by
    // the server, whose error sqlx reports; a server that does not offer the binding
    // (no TLS: a Unix socket) is refused by the relay.
    daemon_and_commands_connect(
        &db,
        &scram(
            ":pw-7f3a",
            "&channel_binding=require&application_name=permd-scram",
        ),
        "permd-scram",
        &scram(
            ":pw-7f3a",
            "&channel_binding=require&application_name=permd-cli-scram",
        ),
    )
    .await;
    let wrong = common::pool_refused(&scram(":wrong", "&channel_binding=require")).await;
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    let unix = format!("{} channel_binding=require password=pw", db.unix_url);
    let unbound = common::pool_refused(&unix).await;
    assert!(
        unbound.contains("channel_binding=require, and the connection has no TLS to bind"),
        "{unbound}"
    );

    // The CLI's pool reads the same options, through the relay: encrypted, with the
    // client's certificate.
    cli_shows_the_client_certificate(&db, &full, "permd-cli-tls").await;
    // It trusts the `sslrootcert` file alone, as the daemon does, even where the system's
    // store holds the server's CA (rustls-native-certs reads `SSL_CERT_FILE` as the
    // store); sqlx's TLS trusted both. `sslrootcert=system` is the system's store.
    let migrate = |options: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_permd"))
            .args(["migrate", "--database-url", &url("localhost", options)])
            .env("SSL_CERT_FILE", &trusted)
            .output()
            .expect("run permd migrate")
    };
    let output = migrate(&format!("sslmode=verify-full&sslrootcert={untrusted}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("give that CA's PEM file as sslrootcert"),
        "{stderr}"
    );
    let output = migrate("sslmode=verify-full&sslrootcert=system");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let error = permd::db::pool(&url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={untrusted}"),
    ))
    .await
    .expect_err("an untrusted certificate is refused");
    assert!(format!("{error:#}").contains("certificate"), "{error:#}");
    // `verify-ca` checks the chain, not the name: 127.0.0.1 is not among the certificate's
    // names. (sqlx 0.8 checked the name too, and refused this.)
    let pool = permd::db::pool(&url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={trusted}"),
    ))
    .await
    .expect("verify-ca connects by an address the certificate does not name");
    pool.close().await;

    // A server whose TLS rustls cannot speak (TLS 1.1 at most): `prefer` connects in plain
    // text, as libpq does, the CLI's pool too; `require` says why. (The test's own pool goes
    // by the Unix socket from here: it did when the CLI's pool was sqlx's TLS, whose
    // `prefer` did not fall back.)
    db.pool = permd::db::pool(&db.unix_url)
        .await
        .expect("connect by the Unix socket");
    for setting in [
        "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1'",
        "ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.1'",
        "SELECT pg_reload_conf()",
    ] {
        db.exec(setting).await;
    }
    wait_until("the server reloads its TLS settings", || async {
        let max: String = sqlx::query_scalar("SHOW ssl_max_protocol_version")
            .fetch_one(&db.pool)
            .await
            .expect("SHOW");
        max == "TLSv1.1"
    })
    .await;
    let fallback = TestDaemon::start(&url("127.0.0.1", "application_name=permd-fallback")).await;
    assert_eq!(
        encrypted(&db, "permd-fallback").await,
        (false, vec![String::new()])
    );
    fallback.stop().await;
    let pool = permd::db::pool(&url("127.0.0.1", "application_name=permd-cli-plain"))
        .await
        .expect("the CLI's pool falls back to plain text");
    // The pool's first connection, closed, can still be listed for a moment.
    wait_until("the CLI's one session, in plain text", || async {
        encrypted(&db, "permd-cli-plain").await == (false, vec![String::new()])
    })
    .await;
    pool.close().await;
    let error = permd::db::pool(&url("127.0.0.1", "sslmode=require"))
        .await
        .expect_err("TLS 1.1 is refused where TLS is required");
    assert!(
        format!("{error:#}").contains("TLS with postgres"),
        "{error:#}"
    );
    let required = TestDaemon::spawn(
        SyncConfig::new(url("127.0.0.1", "sslmode=require")),
        patient(),
    );
    let error = required.failed_attempts(1).await;
    assert!(error.starts_with("TLS with postgres"), "{error}");
    required.stop().await;

    // A server without TLS: refused where the URL requires it, plain where it prefers.
    let plain = database().await;
    let required = TestDaemon::spawn(
        SyncConfig::new(format!("{}?sslmode=require", plain.url)),
        patient(),
    );
    let error = required.failed_attempts(1).await;
    assert!(error.contains("does not accept TLS"), "{error}");
    required.stop().await;
    let preferred = TestDaemon::start(&plain.url).await;
    preferred.stop().await;
}

/// The CLI's pool connects with `url` (as `application_name` `app`) over TLS, presenting
/// the client certificate `/CN=permd`. (The pool's first connection, which says at once
/// why it cannot connect, is closed before the pool opens its own; its backend can still
/// be listed for a moment, so this waits for the one session left.)
async fn cli_shows_the_client_certificate(db: &TestDb, url: &str, app: &str) {
    let pool = permd::db::pool(&format!("{url}&application_name={app}"))
        .await
        .unwrap_or_else(|e| panic!("the CLI connects with {url}: {e:#}"));
    wait_until(
        "the CLI's one session, over TLS with the client certificate",
        || async { encrypted(db, app).await == (true, vec!["/CN=permd".to_owned()]) },
    )
    .await;
    pool.close().await;
}

/// A cluster of the test's own with TLS: a certificate for `localhost` numbered `serial`,
/// signed by `ca`, which also signs the client certificates it accepts (and asks for)
/// when `clients` holds.
fn tls_cluster(ca: &common::TestCa, serial: u64, clients: bool) -> permd::embedded::Cluster {
    let (cert_pem, key_pem) = ca.sign_numbered(&["localhost"], "localhost", serial);
    permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
        unsafe_fast: true,
        tls: Some(permd::embedded::ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: clients.then(|| ca.pem()),
        }),
        ..permd::embedded::ClusterOptions::default()
    })
    .expect("start a cluster with TLS")
}

/// libpq's `ssl_min_protocol_version`, `ssl_max_protocol_version` and `sslcertmode`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_and_the_certificate_mode_are_read_as_libpq_reads_them() {
    let ca = common::TestCa::new("permd test CA");
    let cluster = tls_cluster(&ca, 2, true);
    let db = common::database_on(&cluster).await;
    let dir = cluster.dir();
    let (client_cert, client_key) = ca.sign(&[], "permd");
    let cert_file = dir.join("client.crt");
    let key_file = dir.join("client.key");
    std::fs::write(&cert_file, client_cert).expect("write the client's certificate");
    std::fs::write(&key_file, client_key).expect("write the client's key");
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = |options: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=require&sslcert={}&sslkey={}\
             {options}",
            cluster.port(),
            cert_file.display(),
            key_file.display()
        )
    };
    let session = |app: &'static str| {
        let db = &db;
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT s.version, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a \
                 USING (pid) WHERE a.application_name = $1",
            )
            .bind(app)
            .fetch_one(&db.pool)
            .await
            .expect("the daemon's session")
        }
    };
    let client = Some("/CN=permd".to_owned());
    for (options, app, expected) in [
        (
            "&ssl_max_protocol_version=TLSv1.2",
            "permd-tls12",
            ("TLSv1.2", &client),
        ),
        (
            "&ssl_min_protocol_version=TLSv1.3",
            "permd-tls13",
            ("TLSv1.3", &client),
        ),
        // The server asks for a certificate (it has a CA for them): `require` is content.
        (
            "&sslcertmode=require",
            "permd-cert-required",
            ("TLSv1.3", &client),
        ),
        (
            "&sslcertmode=disable",
            "permd-cert-disabled",
            ("TLSv1.3", &None),
        ),
    ] {
        let daemon = TestDaemon::start(&url(&format!("{options}&application_name={app}"))).await;
        let (version, dn) = session(app).await;
        assert_eq!((version.as_str(), &dn), expected, "{options}");
        daemon.stop().await;
    }
    // A server that asks for no client certificate: `require` refuses it, `allow` connects.
    let other = tls_cluster(&ca, 3, false);
    let unasked = common::database_on(&other).await;
    let unasked_name = unasked.url.rsplit('/').next().expect("a database name");
    let url = |options: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/{unasked_name}?sslmode=require&sslcert={}\
             &sslkey={}{options}",
            other.port(),
            cert_file.display(),
            key_file.display()
        )
    };
    let required = TestDaemon::spawn(SyncConfig::new(url("&sslcertmode=require")), patient());
    let error = required.failed_attempts(2).await;
    assert!(
        error.contains("the server did not ask for a client certificate"),
        "{error}"
    );
    required.stop().await;
    let allowed = TestDaemon::start(&url("&sslcertmode=allow")).await;
    allowed.stop().await;
}

/// libpq's `require_auth`: the daemon and the one-off commands connect when the server
/// authenticates them by a method the URL allows, and otherwise stop before answering it,
/// saying what the server asked for (before session 35 `require_auth` was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_holds_the_server_to_the_methods_it_names() {
    let cluster = common::own_cluster(None);
    let db = common::database_on(&cluster).await;
    db.exec(
        "CREATE ROLE permd_scram LOGIN PASSWORD 'scram-5e1b';
         CREATE ROLE permd_clear LOGIN PASSWORD 'clear-8a2c';
         GRANT USAGE ON SCHEMA permd TO permd_scram, permd_clear;
         GRANT SELECT ON ALL TABLES IN SCHEMA permd TO permd_scram, permd_clear;",
    )
    .await;
    std::fs::write(
        cluster.dir().join("data/pg_hba.conf"),
        "host all permd_scram 127.0.0.1/32 scram-sha-256\n\
         host all permd_clear 127.0.0.1/32 password\n\
         local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
    )
    .expect("write pg_hba.conf");
    db.exec("SELECT pg_reload_conf()").await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let port = cluster.port();
    let url = |user: &str, require_auth: &str| {
        format!("postgres://{user}@127.0.0.1:{port}/{name}?require_auth={require_auth}")
    };
    let scram = |require_auth| url("permd_scram:scram-5e1b", require_auth);
    let clear = |require_auth| url("permd_clear:clear-8a2c", require_auth);
    let trusted = |require_auth| url("postgres", require_auth);
    wait_until("pg_hba.conf to be read", || {
        let url = trusted("!none");
        async move { permd::db::pool(&url).await.is_err() }
    })
    .await;

    // Allowed: the daemon loads and the one-off commands connect.
    for allowed in [
        scram("scram-sha-256"),
        scram("!password,!md5"),
        clear("password,scram-sha-256"),
        trusted("none"),
    ] {
        let daemon = TestDaemon::start(&allowed).await;
        daemon.stop().await;
        let pool = permd::db::pool(&allowed)
            .await
            .unwrap_or_else(|e| panic!("{allowed}: {e:#}"));
        pool.close().await;
    }
    // Refused, with what the server asked for: the daemon retries, the one-off commands
    // stop, over TCP and over the Unix socket alike.
    let unix = |require_auth: &str| format!("{} require_auth={require_auth}", db.unix_url);
    for (refused, asked) in [
        (scram("password"), "SCRAM authentication"),
        (clear("!password"), "a cleartext password"),
        (trusted("scram-sha-256"), "no authentication"),
        (unix("!none"), "no authentication"),
    ] {
        let said = common::pool_refused(&refused).await;
        assert!(
            said.contains(&format!("and the server asked for {asked}")),
            "{refused}: {said}"
        );
        let error = common::daemon_refused(&refused).await;
        assert!(
            error.contains(&format!("and the server asked for {asked}")),
            "{refused}: {error}"
        );
    }
    let unix_allowed = unix("none");
    let pool = permd::db::pool(&unix_allowed)
        .await
        .unwrap_or_else(|e| panic!("{unix_allowed}: {e:#}"));
    pool.close().await;
}

/// libpq's `requirepeer`: over a Unix socket the daemon and the one-off commands connect
/// only to a server that runs as the user it names; over TCP it has nothing to check, as
/// in libpq (before session 35 it was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirepeer_holds_a_unix_socket_server_to_its_user() {
    use std::os::unix::fs::MetadataExt as _;
    let cluster = common::own_cluster(None);
    let db = common::database_on(&cluster).await;
    // Postgres runs as its data directory's owner.
    let uid = std::fs::metadata(cluster.dir().join("data"))
        .expect("the data directory")
        .uid();
    let output = std::process::Command::new("id")
        .args(["-nu", &uid.to_string()])
        .output()
        .expect("id -nu");
    let owner = String::from_utf8(output.stdout).expect("a user name");
    let owner = owner.trim();
    assert!(!owner.is_empty() && owner != "root", "{owner}");
    let unix = |user: &str| format!("{} requirepeer={user}", db.unix_url);

    let daemon = TestDaemon::start(&unix(owner)).await;
    daemon.stop().await;
    let pool = permd::db::pool(&unix(owner))
        .await
        .unwrap_or_else(|e| panic!("{owner}: {e:#}"));
    pool.close().await;
    let tcp = format!("{}?requirepeer=root", db.url);
    let daemon = TestDaemon::start(&tcp).await;
    daemon.stop().await;

    let expected = format!("requirepeer=root, and the server runs as {owner}");
    let said = common::pool_refused(&unix("root")).await;
    assert!(said.contains(&expected), "{said}");
    let error = common::daemon_refused(&unix("root")).await;
    assert!(error.contains(&expected), "{error}");
}

/// A TLS server's side of a handshake with `cert_pem`/`key_pem`, agreeing to ALPN
/// `postgresql` if `alpn`.
fn tls_acceptor(cert_pem: &str, key_pem: &str, alpn: bool) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject as _;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the certificate");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let provider = permd::http::crypto_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS settings")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the certificate and key");
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// A TLS-terminating proxy in front of the plain Postgres at `port`, as a Postgres 17
/// server taking `sslnegotiation=direct` looks from outside: a TLS handshake at once,
/// with `cert_pem`/`key_pem`, agreeing to ALPN `postgresql` if `alpn`. Its port.
async fn direct_tls_proxy(port: u16, cert_pem: &str, key_pem: &str, alpn: bool) -> u16 {
    let acceptor = tls_acceptor(cert_pem, key_pem, alpn);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let proxy = listener.local_addr().expect("the proxy's address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                }
            });
        }
    });
    proxy
}

/// Role `permd_scram` (password `pw-7f3a`), which may read the set, authenticated by
/// SCRAM over TLS only (`hostssl`), everyone else trusted; the server's configuration
/// reloaded.
async fn scram_over_tls(db: &TestDb, cluster: &permd::embedded::Cluster) {
    db.exec(
        "CREATE ROLE permd_scram LOGIN PASSWORD 'pw-7f3a';
         GRANT USAGE ON SCHEMA permd TO permd_scram;
         GRANT SELECT ON ALL TABLES IN SCHEMA permd TO permd_scram;",
    )
    .await;
    std::fs::write(
        cluster.dir().join("data/pg_hba.conf"),
        "hostssl all permd_scram 127.0.0.1/32 scram-sha-256\n\
         hostssl all permd_scram ::1/128 scram-sha-256\n\
         local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
    )
    .expect("write pg_hba.conf");
    db.exec("SELECT pg_reload_conf()").await;
}

/// A man in the middle of a TLS connection to Postgres: it answers the SSLRequest, takes
/// the client's handshake with a certificate of its own CA, and relays everything, over
/// TLS of its own, to the server at `port` (whose CA, `server_ca`, it trusts). Its port.
async fn man_in_the_middle(port: u16, server_ca: &common::TestCa) -> u16 {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let impostor = common::TestCa::new("an impostor's CA");
    let (cert_pem, key_pem) = impostor.sign(&["localhost"], "localhost");
    let acceptor = tls_acceptor(&cert_pem, &key_pem, false);
    let server_ca = rustls::pki_types::CertificateDer::from_pem_slice(server_ca.pem().as_bytes())
        .expect("the server's CA");
    let connector = common::tls_client(&[&server_ca]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let proxy = listener.local_addr().expect("the proxy's address").port();
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let mut request = [0; 8];
                client.read_exact(&mut request).await.ok()?;
                client.write_all(b"S").await.ok()?;
                let mut client = acceptor.accept(client).await.ok()?;
                let mut server = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?;
                server.write_all(&SSL_REQUEST).await.ok()?;
                (server.read_u8().await.ok()? == b'S').then_some(())?;
                let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
                let mut server = connector.connect(name, server).await.ok()?;
                tokio::io::copy_bidirectional(&mut client, &mut server)
                    .await
                    .ok()
            });
        }
    });
    proxy
}

/// SCRAM bound to the TLS session defeats a man in the middle where the certificate is
/// not checked (`sslmode=require`): the server compares the hash of the certificate the
/// client saw (the impostor's) with its own and refuses, for the daemon (which binds by
/// default, `channel_binding=prefer`) and for the one-off commands (whose relay binds
/// for sqlx under `channel_binding=require`). Without the binding the same man in the
/// middle gets through, which is what the binding is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_defeats_a_man_in_the_middle() {
    let ca = common::TestCa::new("permd test CA");
    let cluster = tls_cluster(&ca, 9, false);
    let db = common::database_on(&cluster).await;
    scram_over_tls(&db, &cluster).await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let proxy = man_in_the_middle(cluster.port(), &ca).await;
    let url = |options: &str| {
        format!("postgres://permd_scram:pw-7f3a@localhost:{proxy}/{name}?sslmode=require{options}")
    };
    wait_until("the server to ask permd_scram for its password", || {
        let url = url("&channel_binding=disable&password=wrong");
        async move { permd::db::pool(&url).await.is_err() }
    })
    .await;

    // Unbound, the man in the middle relays the whole session.
    let unbound = TestDaemon::start(&url("&channel_binding=disable")).await;
    unbound.stop().await;
    let pool = permd::db::pool(&url("")).await.expect("sqlx, unbound");
    pool.close().await;
    // Bound, the server refuses.
    for options in ["", "&channel_binding=require"] {
        let error = common::daemon_refused(&url(options)).await;
        assert!(
            error.contains("SCRAM channel binding check failed"),
            "{options}: {error}"
        );
    }
    let said = common::pool_refused(&url("&channel_binding=require")).await;
    assert!(
        said.contains("SCRAM channel binding check failed"),
        "{said}"
    );
}

/// SCRAM bound to TLS where the server's certificate is signed with RSASSA-PSS (SHA-384):
/// the binding hashes the certificate with the hash the signature's parameters name, as
/// Postgres and libpq do (`psql` with `channel_binding=require` connects to such a
/// server). Before (session 58), permd knew no hash for PSS: under
/// `channel_binding=require` the daemon was refused ("server did not use channel
/// binding") and the one-off commands said "the connection has no TLS to bind" (tried).
/// The certificates are made by the machine's `openssl`: rcgen cannot sign with PSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_with_a_certificate_signed_with_rsa_pss() {
    let dir = common::scratch::Scratch::new("pss");
    let (ca, cert_pem, key_pem) = openssl_certificate(
        &dir,
        "rsa:2048",
        "-sha384 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:-1",
        "subjectAltName=DNS:localhost\n",
    );
    let (cluster, db) = scram_cluster(cert_pem, key_pem).await;
    let url = scram_url(&cluster, &db, &ca);
    daemon_and_commands_connect(
        &db,
        &url(":pw-7f3a", "permd-pss", "&channel_binding=require"),
        "permd-pss",
        &url(":pw-7f3a", "permd-cli-pss", "&channel_binding=require"),
    )
    .await;
}

/// A daemon started with the URL `daemon`, its `application_name` `app`, reaches `db` over
/// TLS, and the one-off commands' pool with the URL `cli` runs a query as `permd_scram`.
async fn daemon_and_commands_connect(db: &TestDb, daemon: &str, app: &str, cli: &str) {
    let started = TestDaemon::start(daemon).await;
    assert_eq!(encrypted(db, app).await, (true, vec![String::new()]));
    started.stop().await;
    let pool = permd::db::pool(cli)
        .await
        .expect("the one-off commands connect");
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .expect("a query through the relay");
    assert_eq!(user, "permd_scram");
    pool.close().await;
}

/// A server certificate signed with Ed25519 has no hash to bind SCRAM by, for Postgres as
/// for permd: under `channel_binding=prefer` (the default) the daemon and the one-off
/// commands connect unbound, and under `require` both refuse, saying why. Before (session
/// 58), `require` said "server did not use channel binding" (the daemon) and "the
/// connection has no TLS to bind" (the one-off commands), over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_with_a_certificate_signed_with_ed25519() {
    let dir = common::scratch::Scratch::new("ed25519");
    let (ca, cert_pem, key_pem) =
        openssl_certificate(&dir, "ed25519", "", "subjectAltName=DNS:localhost\n");
    let (cluster, db) = scram_cluster(cert_pem, key_pem).await;
    let url = scram_url(&cluster, &db, &ca);
    daemon_and_commands_connect(
        &db,
        &url(":pw-7f3a", "permd-ed25519", ""),
        "permd-ed25519",
        &url(":pw-7f3a", "permd-cli-ed25519", ""),
    )
    .await;
    let why = "channel_binding=require, and the server's certificate is signed with no hash to \
               bind by (Ed25519";
    let required = url(":pw-7f3a", "permd-required", "&channel_binding=require");
    let refused = common::daemon_refused(&required).await;
    assert!(refused.contains(why), "{refused}");
    let refused = common::pool_refused(&required).await;
    assert!(refused.contains(why), "{refused}");
}

/// A server whose key is of type RSASSA-PSS (OpenSSL's `-newkey rsa-pss`) signs its
/// handshake only by schemes rustls does not offer, so it ends the handshake, which `psql`
/// completes: the daemon and the one-off commands say what the server's alert may mean.
/// Before (session 58) they said only "received fatal alert: HandshakeFailure".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_key_of_type_rsa_pss_is_named_when_the_handshake_fails() {
    let dir = common::scratch::Scratch::new("pss-key");
    let (ca, cert_pem, key_pem) = openssl_certificate(
        &dir,
        "rsa-pss -pkeyopt rsa_keygen_bits:2048",
        "",
        "subjectAltName=DNS:localhost\n",
    );
    let (cluster, db) = scram_cluster(cert_pem, key_pem).await;
    let url = scram_url(&cluster, &db, &ca)(":pw-7f3a", "permd-pss-key", "");
    let why = "received fatal alert: HandshakeFailure (the server found no way to finish the \
               handshake that permd offers: one is a server key of type RSASSA-PSS";
    let refused = common::daemon_refused(&url).await;
    assert!(refused.contains(why), "{refused}");
    let refused = common::pool_refused(&url).await;
    assert!(refused.contains(why), "{refused}");
}

/// The URL of `db` on `cluster` (`scram_cluster`) as `permd_scram` (`password`: `:pw-7f3a`
/// or none) trusting the CA in the PEM file `ca`, named `app`, with `options`.
fn scram_url<'a>(
    cluster: &'a permd::embedded::Cluster,
    db: &'a TestDb,
    ca: &'a str,
) -> impl Fn(&str, &str, &str) -> String + 'a {
    let name = db.url.rsplit('/').next().expect("a database name");
    move |password: &str, app: &str, options: &str| {
        format!(
            "postgres://permd_scram{password}@localhost:{}/{name}?sslmode=verify-full\
             &sslrootcert={ca}&application_name={app}{options}",
            cluster.port()
        )
    }
}

/// A CA and a certificate for `localhost` it signs, made in `dir` by `openssl`, their
/// keys of `key` (`openssl req -newkey`'s), signed with `sign`'s options, the
/// certificate's extensions `extensions` (lines of `openssl x509 -extfile`): the CA's PEM
/// file, and the certificate's and its key's PEM.
fn openssl_certificate(
    dir: &std::path::Path,
    key: &str,
    sign: &str,
    extensions: &str,
) -> (String, String, String) {
    let openssl = |args: &str| openssl(dir, args);
    openssl(&format!(
        "req -x509 -newkey {key} -nodes -days 3650 -keyout ca.key -out ca.pem -subj /CN=permd-CA"
    ));
    openssl(&format!(
        "req -newkey {key} -nodes -keyout server.key -out server.csr -subj /CN=localhost"
    ));
    std::fs::write(dir.join("ext"), extensions).expect("write ext");
    openssl(&format!(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial 1 -days 3650 \
         -extfile ext -out server.crt {sign}"
    ));
    let read =
        |name: &str| std::fs::read_to_string(dir.join(name)).expect("read what openssl wrote");
    (
        dir.join("ca.pem").display().to_string(),
        read("server.crt"),
        read("server.key"),
    )
}

/// Runs the machine's `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    let output = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian: apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The self-signed certificate Postgres's documentation makes ("Creating Certificates":
/// `openssl req -new -x509 -days 365 -nodes -text -out server.crt -keyout server.key -subj
/// "/CN=dbhost.yourdomain.com"`), given as `sslrootcert`, passes `verify-ca` and
/// `verify-full` for the name it holds, as with `psql`: trusted as it is, though it says
/// `CA:TRUE`, and its host named by its common name, as it has no subjectAltName. So does
/// a CA's certificate that names its host by the common name alone. Another host's name
/// is refused. Before (session 58) the first was refused in both modes with
/// "CaUsedAsEndEntity" and the second under `verify-full` with "NotValidForName".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_made_as_postgres_documents_them_are_checked_as_libpq_checks_them() {
    let dir = common::scratch::Scratch::new("documented");
    openssl(
        &dir,
        "req -new -x509 -days 365 -nodes -text -out server.crt -keyout server.key \
         -subj /CN=localhost",
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect("read it");
    let (cluster, db) = scram_cluster(read("server.crt"), read("server.key")).await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let root = dir.join("server.crt");
    let url = |host: &str, mode: &str, app: &str| {
        format!(
            "postgres://postgres@{host}:{}/{name}?sslmode={mode}&sslrootcert={}\
             &application_name={app}",
            cluster.port(),
            root.display()
        )
    };
    let daemon = TestDaemon::start(&url("localhost", "verify-full", "permd-documented")).await;
    assert_eq!(
        encrypted(&db, "permd-documented").await,
        (true, vec![String::new()])
    );
    daemon.stop().await;
    for mode in ["verify-full", "verify-ca"] {
        let pool = permd::db::pool(&url("localhost", mode, "permd-cli-documented"))
            .await
            .expect("the one-off commands trust it too");
        pool.close().await;
    }
    let pool = permd::db::pool(&url("127.0.0.1", "verify-ca", "permd-cli-ca"))
        .await
        .expect("verify-ca does not read the name");
    pool.close().await;
    let other = url("127.0.0.1", "verify-full", "permd-other");
    let refused = common::daemon_refused(&other).await;
    assert!(refused.contains("does not name the host"), "{refused}");
    // Trusting another CA, the certificate is named for what it is.
    let another = common::TestCa::new("another CA").file(&dir, "another.pem");
    let elsewhere = url("localhost", "verify-ca", "permd-elsewhere").replace(
        &format!("sslrootcert={}", root.display()),
        &format!("sslrootcert={another}"),
    );
    let refused = common::daemon_refused(&elsewhere).await;
    assert!(
        refused.contains("the server's certificate is a CA's, CA:TRUE"),
        "{refused}"
    );

    let dir = common::scratch::Scratch::new("common-name");
    let (ca, cert_pem, key_pem) =
        openssl_certificate(&dir, "rsa:2048", "", "basicConstraints=CA:FALSE\n");
    let (cluster, db) = scram_cluster(cert_pem, key_pem).await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = |host: &str| {
        format!(
            "postgres://postgres@{host}:{}/{name}?sslmode=verify-full&sslrootcert={ca}\
             &application_name=permd-common-name",
            cluster.port()
        )
    };
    let daemon = TestDaemon::start(&url("localhost")).await;
    assert_eq!(
        encrypted(&db, "permd-common-name").await,
        (true, vec![String::new()])
    );
    daemon.stop().await;
    let refused = common::daemon_refused(&url("127.0.0.1")).await;
    assert!(refused.contains("does not name the host"), "{refused}");
}

/// A cluster of the test's own serving `cert_pem` (and its key) over TLS, and a database on
/// it with role `permd_scram`, which authenticates by SCRAM (`scram_over_tls`); once the
/// server asks that role for its password.
async fn scram_cluster(cert_pem: String, key_pem: String) -> (permd::embedded::Cluster, TestDb) {
    let cluster = permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
        unsafe_fast: true,
        tls: Some(permd::embedded::ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: None,
        }),
        ..permd::embedded::ClusterOptions::default()
    })
    .expect("start a cluster with TLS");
    let db = common::database_on(&cluster).await;
    scram_over_tls(&db, &cluster).await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = format!(
        "postgres://permd_scram@localhost:{}/{name}?sslmode=require",
        cluster.port()
    );
    wait_until("the server to ask permd_scram for its password", || {
        let url = url.clone();
        async move { permd::db::pool(&url).await.is_err() }
    })
    .await;
    (cluster, db)
}

/// libpq's `sslnegotiation=direct` (Postgres 17): the TLS handshake at once, without an
/// SSLRequest, with ALPN `postgresql`, for the daemon and the one-off commands alike; a
/// server that does not agree to the ALPN name is refused, and so is a weaker `sslmode`
/// (before session 35 `direct` was refused). The server here is a Postgres 15 behind a
/// proxy that takes the handshake as a Postgres 17 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslnegotiation_direct_starts_tls_at_once() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('u1', 'doc:1', 'read', NULL)")
        .await;
    let port: u16 = db
        .url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .expect("the cluster's port");
    let name = db.url.rsplit('/').next().expect("a database name");
    let ca = common::TestCa::new("permd direct CA");
    let dir = common::scratch::Scratch::new("direct");
    let trusted = ca.file(&dir, "ca.pem");
    let (cert_pem, key_pem) = ca.sign(&["localhost"], "localhost");
    let url = |proxy: u16, options: &str| {
        format!(
            "postgres://postgres@localhost:{proxy}/{name}?sslmode=verify-full\
             &sslrootcert={trusted}{options}"
        )
    };

    let proxy = direct_tls_proxy(port, &cert_pem, &key_pem, true).await;
    let direct = url(proxy, "&sslnegotiation=direct");
    let daemon = TestDaemon::start(&direct).await;
    let (status, body) = daemon
        .get("/v1/check?subject=u1&permission=read&object=doc:1")
        .await;
    assert_eq!(
        (status, body["allowed"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    daemon.stop().await;
    let pool = permd::db::pool(&direct)
        .await
        .unwrap_or_else(|e| panic!("{direct}: {e:#}"));
    pool.close().await;
    // The proxy takes no SSLRequest: without `direct` nothing connects.
    assert!(permd::db::pool(&url(proxy, "")).await.is_err());

    // A server that takes the handshake but not the ALPN name.
    let no_alpn = direct_tls_proxy(port, &cert_pem, &key_pem, false).await;
    let refused = url(no_alpn, "&sslnegotiation=direct");
    let said = common::pool_refused(&refused).await;
    assert!(
        said.contains("without agreeing to ALPN postgresql"),
        "{said}"
    );
    let error = common::daemon_refused(&refused).await;
    assert!(
        error.contains("without agreeing to ALPN postgresql"),
        "{error}"
    );

    let weak = format!("{}?sslnegotiation=direct&sslmode=prefer", db.url);
    let why = permd::sync::check_database_url(&weak)
        .expect_err("refused")
        .to_string();
    assert!(why.contains("needs sslmode=require"), "{why}");
}

/// libpq's `sslpassword` (a client key encrypted as PKCS#8) and `sslcrl`/`sslcrldir` (the
/// server's certificate checked against revocation lists), read by the daemon and the
/// one-off commands alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_keys_and_revocation_lists_are_read_as_libpq_reads_them() {
    const SERVER_SERIAL: u64 = 7001;
    let ca = common::TestCa::new("permd test CA");
    let cluster = tls_cluster(&ca, SERVER_SERIAL, true);
    let db = common::database_on(&cluster).await;
    let dir = cluster.dir();
    let trusted = ca.file(dir, "ca.pem");
    let (client_cert, client_key) = ca.sign(&[], "permd");
    let cert_file = dir.join("client.crt");
    std::fs::write(&cert_file, client_cert).expect("write the client's certificate");
    // The key encrypted as `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes it.
    let sealed = common::encrypted_key(&client_key, "key pw 3f");
    let key_file = dir.join("client.key");
    std::fs::write(&key_file, sealed.as_bytes()).expect("write the client's key");
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = |options: &str| {
        format!(
            "postgres://postgres@localhost:{}/{name}?sslmode=verify-full&sslrootcert={trusted}\
             &sslcert={}&sslkey={}{options}",
            cluster.port(),
            cert_file.display(),
            key_file.display()
        )
    };

    // The right password: the daemon and the CLI's pool present the client certificate.
    let daemon = TestDaemon::start(&url(
        "&sslpassword=key%20pw%203f&application_name=permd-encrypted-key",
    ))
    .await;
    assert_eq!(
        encrypted(&db, "permd-encrypted-key").await,
        (true, vec!["/CN=permd".to_owned()])
    );
    daemon.stop().await;
    cli_shows_the_client_certificate(
        &db,
        &url("&sslpassword=key%20pw%203f"),
        "permd-cli-encrypted-key",
    )
    .await;
    // No password, or a wrong one: refused at start, with the reason.
    for (options, expected) in [
        ("", "the key is encrypted: give its password as sslpassword"),
        (
            "&sslpassword=wrong",
            "could not decrypt the key with sslpassword",
        ),
    ] {
        let why = permd::sync::check_database_url(&url(options))
            .expect_err("refused")
            .to_string();
        assert!(why.contains(expected), "{options}: {why}");
        assert!(why.contains("sslkey="), "{why}");
    }

    // Revocation lists, the key's password given from here on.
    let with_key = |options: &str| url(&format!("&sslpassword=key%20pw%203f{options}"));
    let revoked = dir.join("revoked.crl");
    std::fs::write(&revoked, ca.crl(&[SERVER_SERIAL])).expect("write a revocation list");
    let other = dir.join("other.crl");
    std::fs::write(&other, ca.crl(&[SERVER_SERIAL + 1])).expect("write a revocation list");
    let crls = dir.join("crls");
    std::fs::create_dir(&crls).expect("create a directory of revocation lists");
    std::fs::copy(&revoked, crls.join("1a2b3c4d.r0")).expect("copy a revocation list");
    let stranger = common::TestCa::new("a CA that signed none of the server's chain");
    let unrelated = dir.join("unrelated.crl");
    std::fs::write(&unrelated, stranger.crl(&[])).expect("write a revocation list");
    // A list that revokes another certificate: connects.
    let daemon = TestDaemon::start(&with_key(&format!(
        "&sslcrl={}&application_name=permd-crl",
        other.display()
    )))
    .await;
    assert_eq!(
        encrypted(&db, "permd-crl").await,
        (true, vec!["/CN=permd".to_owned()])
    );
    daemon.stop().await;
    // One that revokes the server's, in a file or a directory, or none from its CA: refused
    // at the handshake with the reason, and retried; the CLI says so too.
    for (options, expected) in [
        (format!("&sslcrl={}", revoked.display()), "revocation list"),
        (format!("&sslcrldir={}", crls.display()), "revocation list"),
        (
            format!("&sslcrl={}", unrelated.display()),
            "no revocation list of sslcrl or sslcrldir is from the CA",
        ),
    ] {
        let daemon = TestDaemon::spawn(SyncConfig::new(with_key(&options)), patient());
        let error = daemon.failed_attempts(2).await;
        assert!(error.starts_with("TLS with postgres"), "{options}: {error}");
        assert!(error.contains(expected), "{options}: {error}");
        daemon.stop().await;
        let error = permd::db::pool(&with_key(&options))
            .await
            .expect_err("refused by the CLI too");
        assert!(format!("{error:#}").contains(expected), "{error:#}");
    }
    // `require` checks no chain, so no list either, as in libpq.
    let daemon = TestDaemon::start(&format!(
        "postgres://postgres@127.0.0.1:{}/{name}?sslmode=require&sslcrl={}&application_name=permd-crl-require",
        cluster.port(),
        revoked.display()
    ))
    .await;
    daemon.stop().await;
    // A file that holds no list is refused at start: an empty set would check nothing.
    let why = permd::sync::check_database_url(&with_key(&format!("&sslcrl={trusted}")))
        .expect_err("refused")
        .to_string();
    assert!(
        why.contains("holds no certificate revocation list"),
        "{why}"
    );
    let why = permd::sync::check_database_url(&with_key("&sslcrl=/nonexistent/root.crl"))
        .expect_err("refused")
        .to_string();
    assert!(why.contains("sslcrl=/nonexistent/root.crl"), "{why}");

    // The files of `~/.postgresql/` fill what the URL leaves out, as libpq reads them: its
    // `root.crt` makes `require` check the CA, and its `root.crl` revokes.
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".postgresql")).expect("create ~/.postgresql");
    let impostor = common::TestCa::new("someone else's CA");
    let migrate = |root: &common::TestCa, crl: Option<&std::path::Path>| {
        std::fs::write(home.join(".postgresql/root.crt"), root.pem()).expect("write root.crt");
        let _ = std::fs::remove_file(home.join(".postgresql/root.crl"));
        if let Some(crl) = crl {
            std::fs::copy(crl, home.join(".postgresql/root.crl")).expect("copy root.crl");
        }
        std::process::Command::new(env!("CARGO_BIN_EXE_permd"))
            .args([
                "migrate",
                "--database-url",
                &format!(
                    "postgres://postgres@127.0.0.1:{}/{name}?sslmode=require",
                    cluster.port()
                ),
            ])
            .env("HOME", &home)
            .output()
            .expect("run permd migrate")
    };
    let output = migrate(&impostor, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    let output = migrate(&ca, Some(&revoked));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("Revoked"), "{stderr}");
    let output = migrate(&ca, Some(&other));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The database's digest of each subject of `shard`, hashed here as the daemon hashes
/// them (Postgres picks a shard's changed keys out of the changelog with its own MD5:
/// where the two disagreed, a daemon would hold subjects of another shard or miss its
/// own).
async fn shard_digests(db: &TestDb, shard: Shard) -> BTreeMap<String, String> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT subject, digest FROM permd.subject_digests()")
            .fetch_all(&db.pool)
            .await
            .expect("subject digests");
    rows.into_iter().filter(|(s, _)| shard.owns(s)).collect()
}

/// A daemon's digest of each subject, once it has applied `token`.
async fn daemon_shard_digests(daemon: &TestDaemon, token: &str) -> BTreeMap<String, String> {
    let (status, body) = daemon
        .get(&format!("/v1/digest?by=subject&at_least={token}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["subjects"]
        .as_object()
        .expect("subjects")
        .iter()
        .map(|(s, d)| (s.clone(), d.as_str().expect("a digest").to_owned()))
        .collect()
}

/// Three daemons of `--shard i/3` over one database: each loads, follows and reloads the
/// rows of its own subjects and of the public `*` only, answers 421 with the owner for
/// the others, and together they hold every row once (but `*`'s, in each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_split_the_subjects_between_daemons() {
    let db = database().await;
    db.exec(
        "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:' || (i % 7), 'read', NULL
         FROM generate_series(1, 300) i;
         INSERT INTO permd.tuples VALUES ('*', 'doc:public', 'read', NULL),
                                         ('usér:ü', '', 'ADMIN', NULL);
         INSERT INTO permd.limits SELECT 'user:' || i, 'projects', i FROM generate_series(1, 300) i;",
    )
    .await;
    let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).expect("a shard")).collect();
    let mut daemons = Vec::new();
    for &shard in &shards {
        let mut sync = SyncConfig::new(&db.url);
        sync.shard = shard;
        let http = HttpConfig { shard, ..patient() };
        daemons.push(TestDaemon::start_with(sync, http).await);
    }
    let holds_its_subjects = |token: String| {
        let (db, shards, daemons) = (&db, &shards, &daemons);
        async move {
            let mut held = 0;
            for (&shard, daemon) in shards.iter().zip(daemons) {
                let expected = shard_digests(db, shard).await;
                assert!(expected.contains_key("*"), "{shard}");
                assert_eq!(
                    daemon_shard_digests(daemon, &token).await,
                    expected,
                    "{shard}"
                );
                held += expected.len() - 1;
            }
            let all: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM permd.subject_digests() WHERE subject <> '*'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("count");
            assert_eq!(held as i64, all, "every subject in one shard");
        }
    };
    holds_its_subjects("0".to_owned()).await;

    // Changes reach the owner's daemon only: new subjects, deletes, limits, `*`.
    let token = db
        .write(
            "INSERT INTO permd.tuples SELECT 'user:' || i, 'doc:9', 'write', NULL
             FROM generate_series(290, 330) i;
             DELETE FROM permd.tuples WHERE subject IN ('user:5', 'user:6', 'user:7');
             UPDATE permd.limits SET value = value + 1 WHERE subject LIKE 'user:1%';
             INSERT INTO permd.tuples VALUES ('*', 'doc:news', 'read', NULL);",
        )
        .await;
    holds_its_subjects(token).await;
    // And so does a full load asked for by the database.
    let reloads: Vec<u64> = daemons.iter().map(|d| d.status.report().reloads).collect();
    let token = db.write("SELECT permd.request_reload()").await;
    holds_its_subjects(token.clone()).await;
    for (daemon, before) in daemons.iter().zip(reloads) {
        assert_eq!(daemon.status.report().reloads, before + 1);
    }

    // Asked about another shard's subject, a daemon names its owner.
    let owner = shards[0].owner_of("user:1");
    let other = shards[(owner.index() as usize + 1) % 3];
    let (home, elsewhere) = (
        &daemons[owner.index() as usize],
        &daemons[other.index() as usize],
    );
    assert!(home.check("user:1", "read", "doc:1", &token).await);
    assert!(
        home.check("user:1", "read", "doc:public", &token).await,
        "through *"
    );
    for uri in [
        "/v1/check?subject=user:1&permission=read&object=doc:1".to_owned(),
        format!("/v1/check?subject=user:1&permission=read&at_least={token}"),
        "/v1/subjects/user:1/permissions?object=doc:1".to_owned(),
        "/v1/subjects/user:1/objects?permission=read".to_owned(),
        "/v1/subjects/user:1/limits".to_owned(),
        "/v1/check-limit?subject=user:1&limit=projects&usage=1".to_owned(),
    ] {
        let (status, body) = elsewhere.get(&uri).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{uri}: {body}");
        assert_eq!(body["error"], "misdirected", "{uri}: {body}");
        assert_eq!(body["owner"], owner.to_string(), "{uri}: {body}");
        assert_eq!(body["shard"], other.to_string(), "{uri}: {body}");
    }
    // A batch is answered only when every check is the shard's own: a router splits it.
    let own = (1..)
        .map(|i| format!("user:{i}"))
        .find(|s| other.owns(s))
        .expect("a subject of the other shard");
    let batch = |subjects: &[&str]| {
        let checks: Vec<Value> = subjects
            .iter()
            .map(|s| json!({"subject": s, "permission": "read", "object": "doc:public"}))
            .collect();
        json!({ "checks": checks })
    };
    let (status, body) = elsewhere.post("/v1/check", &batch(&[&own, "*"])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["results"], json!([true, true]), "{body}");
    let (status, body) = elsewhere.post("/v1/check", &batch(&[&own, "user:1"])).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{body}");
    let message = body["message"].as_str().expect("a message");
    assert!(
        message.starts_with(&format!("the checks[1].subject belongs to shard {owner}")),
        "{message}"
    );
    let (_, metrics) = elsewhere.get("/metrics").await;
    let metrics = metrics.as_str().expect("the metrics' text");
    assert!(metrics.contains("permd_misdirected_total 7"), "{metrics}");
    assert!(
        metrics.contains(&format!("permd_shard_info{{shard=\"{other}\"}} 1")),
        "{metrics}"
    );
    let (_, status) = elsewhere.get("/v1/status").await;
    assert_eq!(status["shard"], other.to_string());
    for daemon in daemons {
        daemon.stop().await;
    }
}

/// README's "Your own model" block, run as it stands: every write path of its two tables
/// keeps `permd.tuples` exact, the daemon follows, and a transfer of ownership that
/// commits just after a new share to the old owner keeps the share's permissions (the
/// share's trigger's lock makes the transfer wait and recompute after it; without the lock
/// the transfer's snapshot misses the share and takes them away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readmes_own_model_keeps_the_set_exact() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```sql\n-- Your schema:")
        .expect("README's own-model block")
        + "```sql\n".len();
    let block = &readme[start..];
    let block = &block[..block.find("```").expect("the block's end")];
    let db = database().await;
    db.exec(block).await;
    let daemon = TestDaemon::start(&db.url).await;
    let may = |user: u32, permission: &'static str, doc: u32, token: String| {
        let daemon = &daemon;
        async move {
            daemon
                .check(
                    &format!("user:{user}"),
                    permission,
                    &format!("doc:{doc}"),
                    &token,
                )
                .await
        }
    };
    let everything = ["read", "write", "share"];

    let t = db.write("INSERT INTO docs VALUES (1, 10)").await;
    for p in everything {
        assert!(may(10, p, 1, t.clone()).await, "the owner may {p}");
    }
    let t = db
        .write("INSERT INTO doc_shares VALUES (1, 20, 'read')")
        .await;
    assert!(may(20, "read", 1, t.clone()).await);
    assert!(!may(20, "write", 1, t).await);
    let t = db
        .write("UPDATE doc_shares SET access = 'write' WHERE user_id = 20")
        .await;
    assert!(may(20, "write", 1, t.clone()).await);
    assert!(!may(20, "share", 1, t).await);
    let t = db.write("UPDATE docs SET owner_id = 20 WHERE id = 1").await;
    assert!(
        !may(10, "read", 1, t.clone()).await,
        "the old owner lost it"
    );
    assert!(may(20, "share", 1, t).await);
    // The share goes; ownership still gives what the share gave.
    let t = db.write("DELETE FROM doc_shares WHERE user_id = 20").await;
    for p in everything {
        assert!(may(20, p, 1, t.clone()).await, "the owner may still {p}");
    }
    let t = db
        .write("INSERT INTO doc_shares VALUES (1, 30, 'read'); DELETE FROM docs WHERE id = 1")
        .await;
    assert!(!may(20, "read", 1, t.clone()).await);
    assert!(
        !may(30, "read", 1, t).await,
        "the share went with the document"
    );

    // A new share to the owner, uncommitted, then a transfer of ownership.
    db.write("INSERT INTO docs VALUES (2, 5)").await;
    let (share, _) = db
        .open_write("INSERT INTO doc_shares VALUES (2, 5, 'write')")
        .await;
    let writer = TestDb {
        url: db.url.clone(),
        unix_url: db.unix_url.clone(),
        pool: db.pool.clone(),
    };
    let transfer = tokio::spawn(async move {
        writer
            .write("UPDATE docs SET owner_id = 7 WHERE id = 2")
            .await
    });
    wait_until("the transfer waits for the share's lock", || async {
        db.lock_waiters().await > 0
    })
    .await;
    share.commit().await.expect("commit the share");
    let t = transfer.await.expect("the transfer");
    assert!(
        may(5, "write", 2, t.clone()).await,
        "the share's write kept"
    );
    assert!(
        !may(5, "share", 2, t.clone()).await,
        "ownership's share gone"
    );
    assert!(may(7, "share", 2, t.clone()).await);
    assert_eq!(db.digest().await, daemon.digest_at(&t).await);

    // Anything but READ COMMITTED is refused.
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .expect("repeatable read");
    let refused = sqlx::query("INSERT INTO docs VALUES (3, 5)")
        .execute(&mut *tx)
        .await
        .expect_err("a REPEATABLE READ write");
    drop(tx);
    assert!(refused.to_string().contains("READ COMMITTED"), "{refused}");
    daemon.stop().await;
}
