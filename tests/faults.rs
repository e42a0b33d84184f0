//! Faults: Postgres restarted or killed under load, long transactions, NOTIFY off, forced
//! reloads under concurrent writes, Postgres unreachable at start, overload. Each test
//! keeps checks running while the fault happens, proves with the digest that nothing was
//! lost, and prints its figures (`cargo test --test faults -- --nocapture`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::proxy::Proxy;
use common::{
    database, database_named_on, database_on, own_cluster, patient, send, wait_until, Rng,
    TestDaemon, TestDb, DEADLINE,
};
use permd::embedded::{Cluster, ClusterOptions, StopMode};
use permd::http::HttpConfig;
use permd::sync::SyncConfig;

/// Checks sent through the API in a loop until stopped, counting non-200 answers.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(daemon: &TestDaemon, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|w| {
                let (stop, ok, errors, api) =
                    (stop.clone(), ok.clone(), errors.clone(), daemon.api.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let uri =
                            format!("/v1/check?subject=s{}&permission=read&object=doc", i % 50);
                        let (status, _) = send(
                            &api,
                            Request::get(uri).body(Body::empty()).expect("request"),
                        )
                        .await;
                        let counter = if status == StatusCode::OK {
                            &ok
                        } else {
                            &errors
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            errors,
            tasks,
        }
    }

    /// Stops the load and returns (answered 200, anything else).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

async fn readyz(daemon: &TestDaemon) -> StatusCode {
    daemon.get("/readyz").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_and_kills_under_load_lose_nothing() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| own_cluster(None))
            .await
            .expect("cluster task"),
    );
    let db = database_on(&cluster).await;
    let http = HttpConfig {
        ready_max_lag: Duration::from_millis(500),
        ..patient()
    };
    let daemon = TestDaemon::start_with(SyncConfig::new(&db.url), http).await;
    // The same mirror behind a fail-closed API (`--answer-max-lag-ms 500`).
    let fail_closed = permd::http::Api::new(permd::http::App::new(
        daemon.store.clone(),
        daemon.status.clone(),
        HttpConfig {
            answer_max_lag: Some(Duration::from_millis(500)),
            ..patient()
        },
    ));
    let check = "/v1/check?subject=before0&permission=read&object=doc";

    for (round, mode) in [StopMode::Fast, StopMode::Immediate, StopMode::Kill]
        .into_iter()
        .enumerate()
    {
        let before = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('before{round}', 'doc', 'read', NULL)"
            ))
            .await;
        assert!(
            daemon
                .check(&format!("before{round}"), "read", "doc", &before)
                .await
        );
        let load = Load::start(&daemon, 2);
        let reconnects = daemon.status.report().reconnects;

        let down = Instant::now();
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.stop_server(mode))
            .await
            .expect("task")
            .expect("stop postgres");
        daemon
            .wait_for("the disconnection to show", || {
                !daemon.status.report().connected
            })
            .await;
        wait_until("readyz 503 once lag exceeds the bound", || async {
            readyz(&daemon).await == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        let (_, status) = daemon.get("/v1/status").await;
        let lag_during = status["lag_seconds"].as_f64().expect("lag");
        assert!(lag_during > 0.5, "lag grows while disconnected: {status}");
        assert_eq!(status["connected"], false);
        let (status, body) = common::send(
            &fail_closed,
            Request::get(check).body(Body::empty()).expect("a request"),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "behind", "{body}");
        assert!(
            body["lag_seconds"].as_f64().is_some_and(|lag| lag > 0.5),
            "{body}"
        );

        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.start_server())
            .await
            .expect("task")
            .expect("restart postgres");
        let up = Instant::now();
        let outage = up - down;
        if mode == StopMode::Fast {
            // A clean shutdown loses nothing: permd reconnects and catches up from the
            // changelog, without a reload.
            daemon
                .wait_for("the reconnect after the restart", || {
                    let report = daemon.status.report();
                    report.connected && report.reconnects > reconnects
                })
                .await;
        } else {
            // A server recovered from a crash may hand out again xids it had issued but
            // not made durable, so permd reloads once; wait for it, because a token issued
            // before it reconnects could be one of those reissued xids.
            let reloads = u64::try_from(round).expect("small") + 1;
            daemon
                .wait_for("the reload after the restart", || {
                    daemon.status.report().reloads >= reloads
                })
                .await;
        }
        // The pool's old connections died with the server; sqlx replaces them.
        let after = insert_once_up(&db, &format!("after{round}")).await;
        assert!(
            daemon
                .check(&format!("after{round}"), "read", "doc", &after)
                .await
        );
        let recovered = up.elapsed();
        wait_until("readyz 200 again", || async {
            readyz(&daemon).await == StatusCode::OK
        })
        .await;
        wait_until("the fail-closed API to answer again", || async {
            common::send(
                &fail_closed,
                Request::get(check).body(Body::empty()).expect("a request"),
            )
            .await
            .1["allowed"]
                == true
        })
        .await;

        let (ok, errors) = load.finish().await;
        assert_eq!(errors, 0, "checks must keep answering from memory");
        assert!(ok > 0);
        assert_eq!(daemon.digest_at(&after).await, db.digest().await);
        println!(
            "restart {mode:?}: outage {:.2}s, lag seen {lag_during:.2}s, caught up {:.2}s after restart, \
             {ok} checks answered, {errors} errors, reconnects {}, reloads {}, changes lost 0",
            outage.as_secs_f64(),
            recovered.as_secs_f64(),
            daemon.status.report().reconnects,
            daemon.status.report().reloads,
        );
    }
    assert_eq!(
        daemon.status.report().reloads,
        3,
        "the load at start, and one full reload per crash; none for the clean restart"
    );
    daemon.stop().await;
}

/// A cluster of the test's own (to be stopped and crashed), a database on it and a
/// patient daemon over that database, its sync configured by `configure`.
async fn daemon_on_own_cluster(
    configure: impl FnOnce(&mut SyncConfig),
) -> (Arc<permd::embedded::Cluster>, TestDb, TestDaemon) {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| own_cluster(None))
            .await
            .expect("cluster task"),
    );
    let db = database_on(&cluster).await;
    let mut sync = SyncConfig::new(&db.url);
    configure(&mut sync);
    let daemon = TestDaemon::start_with(sync, patient()).await;
    (cluster, db, daemon)
}

/// Inserts `subject`'s row on `doc` as soon as the restarted server takes writes (the
/// pool's old connections died with it; sqlx replaces them), and returns a token past it.
async fn insert_once_up(db: &TestDb, subject: &str) -> String {
    let since = Instant::now();
    loop {
        let attempt = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO permd.tuples VALUES ('{subject}', 'doc', 'read', NULL)"
        )))
        .execute(&db.pool)
        .await;
        if attempt.is_ok() {
            return db.write("SELECT 1").await;
        }
        assert!(
            since.elapsed() < DEADLINE,
            "cannot write after the restart: {attempt:?}"
        );
    }
}

/// Twenty commits that permd applies, then Postgres stopped at once (`-m immediate`: the
/// throwaway cluster does not wait for its WAL to be flushed, so the last commits are
/// lost and their xids handed out again), and started again once permd has failed
/// `attempts` times to reconnect.
async fn crash_losing_commits(
    cluster: &Arc<permd::embedded::Cluster>,
    db: &TestDb,
    daemon: &TestDaemon,
    attempts: u64,
) {
    let mut last = String::new();
    for n in 0..20 {
        last = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('lost{n}', 'doc', 'read', NULL)"
            ))
            .await;
    }
    assert!(daemon.check("lost19", "read", "doc", &last).await);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_server(StopMode::Immediate))
        .await
        .expect("task")
        .expect("stop postgres");
    let before = daemon.status.report().reconnects;
    daemon
        .wait_for("attempts to reconnect", || {
            daemon.status.report().reconnects >= before + attempts
        })
        .await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start_server())
        .await
        .expect("task")
        .expect("restart postgres");
}

/// A token from a server that recovered from a crash, asked before permd has reconnected:
/// the crash lost the last commits (the throwaway cluster does not wait for its WAL to be
/// flushed), so the new server hands out their xids again, below permd's watermark. The
/// check waits for the reconnect and the reload rather than answer from the state the
/// crash undid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_a_crashed_server_waits_for_the_reload() {
    let (cluster, db, daemon) = daemon_on_own_cluster(|_| ()).await;
    // A few failed attempts, so that the next one is most of a second away.
    crash_losing_commits(&cluster, &db, &daemon, 3).await;
    let after = insert_once_up(&db, "after").await;
    assert!(
        daemon.check("after", "read", "doc", &after).await,
        "token {after} answered before the reload (watermark {})",
        daemon.store.watermark()
    );
    assert_eq!(daemon.digest_at(&after).await, db.digest().await);
    daemon.stop().await;
}

/// The reload after a crash fails (the table locked past the session's lock timeout): the
/// next session must still reload, not take the server as known and catch up from a
/// cursor the crash may have passed (it lost commits whose xids it hands out again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_a_crash_that_fails_is_tried_again() {
    // Locks are waited for half of the query timeout.
    let (cluster, db, daemon) =
        daemon_on_own_cluster(|sync| sync.query_timeout = Duration::from_millis(1_000)).await;
    // Five failed attempts: the next one is over a second away, time to take the lock.
    crash_losing_commits(&cluster, &db, &daemon, 5).await;
    // A write that holds the table until it commits: the reload's COPY waits for it.
    let since = Instant::now();
    let (tx, after) = loop {
        let attempt = async {
            let mut tx = db.pool.begin().await?;
            sqlx::raw_sql(
                "LOCK TABLE permd.tuples IN ACCESS EXCLUSIVE MODE;
                 INSERT INTO permd.tuples VALUES ('after', 'doc', 'read', NULL)",
            )
            .execute(&mut *tx)
            .await?;
            let token: String = sqlx::query_scalar("SELECT permd.write_token()::text")
                .fetch_one(&mut *tx)
                .await?;
            Ok::<_, sqlx::Error>((tx, token))
        }
        .await;
        match attempt {
            Ok(locked) => break locked,
            Err(error) => assert!(since.elapsed() < DEADLINE, "cannot write: {error}"),
        }
    };
    let reloads = daemon.status.report().reloads;
    daemon
        .wait_for("the reload to fail on the lock", || {
            daemon
                .status
                .report()
                .last_error
                .is_some_and(|e| e.contains("lock"))
        })
        .await;
    assert_eq!(
        daemon.status.report().reloads,
        reloads,
        "no reload went through"
    );
    tx.commit().await.expect("commit");
    assert!(
        daemon.check("after", "read", "doc", &after).await,
        "token {after}: caught up without the reload (watermark {})",
        daemon.store.watermark()
    );
    assert_eq!(daemon.status.report().reloads, reloads + 1);
    assert_eq!(daemon.digest_at(&after).await, db.digest().await);
    daemon.stop().await;
}

/// A time zone or date style set for the database between two of permd's sessions (an
/// operator's `ALTER DATABASE … SET timezone`) changes how the server writes its times as
/// text, and not the server: permd reconnects and catches up, without a reload. Before
/// session 60 it compared the reset time of the statistics as text, took the new zone for
/// a crash and loaded the whole set again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_zone_set_between_two_sessions_is_no_crash() {
    let db = database().await;
    let daemon = TestDaemon::start(&db.url).await;
    db.set_for_new_sessions("timezone", "'Pacific/Kiritimati'")
        .await;
    db.set_for_new_sessions("datestyle", "'SQL, DMY'").await;
    db.terminate_sync_sessions().await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon
        .wait_for_report("the reconnect", |report| {
            report.connected && report.reconnects == 1
        })
        .await;
    let report = daemon.status.report();
    assert_eq!(report.reloads, 1, "no reload: {report:?}");
    daemon.stop().await;
}

/// Another cluster answering at the last session's Unix socket (the server stopped and
/// another one started in its place, with a database of the same name: a host rebuilt, a
/// test rig) is loaded from in full, and named as another server by its cluster's system
/// identifier. Before session 62 the reload's reason said "postgres recovered from a
/// crash": a Unix socket gives no address to tell the two by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_at_the_same_unix_socket_is_named_as_another_server() {
    let first = tokio::task::spawn_blocking(|| own_cluster(None))
        .await
        .expect("cluster task");
    let db = database_on(&first).await;
    let daemon = TestDaemon::start(&db.unix_url).await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    db.pool.close().await;
    first
        .stop_server(StopMode::Fast)
        .expect("stop the first cluster");

    let (port, socket) = (first.port(), first.dir().display().to_string());
    let second = tokio::task::spawn_blocking(move || {
        Cluster::start(&ClusterOptions {
            unsafe_fast: true,
            port: Some(port),
            settings: vec![format!("unix_socket_directories='{socket}'")],
            ..ClusterOptions::default()
        })
        .expect("start another cluster at the first one's socket")
    })
    .await
    .expect("cluster task");
    let name = db.url.rsplit('/').next().expect("a database name");
    let other = database_named_on(&second, name).await;
    // The daemon may load from the new cluster before this write commits (it connects
    // once the database is migrated) and apply it from the changelog after: the digest
    // is asked at the write's token, not at once.
    let token = other
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;

    daemon
        .wait_for_report("the reload from the other cluster", |report| {
            report.connected && report.reloads == 2
        })
        .await;
    let report = daemon.status.report();
    let reason = report.last_full_load_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("another server than the last session's (a Unix socket, cluster "),
        "{report:?}"
    );
    assert_eq!(daemon.digest_at(&token).await, other.digest().await);
    other.pool.close().await;
    daemon.stop().await;
}

/// A reset of one kind of shared statistics between two of permd's sessions (a monitoring
/// job's `pg_stat_reset_shared('bgwriter')`, then `'archiver'` before the next) is no
/// crash: permd reconnects and catches up each time, without a reload. Before session 62
/// it told a crash by the background writer's reset time alone, and loaded the whole set
/// again after the first reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_shared_statistics_between_two_sessions_is_no_crash() {
    let db = database().await;
    let daemon = TestDaemon::start(&db.url).await;
    for (kind, reconnects) in [("bgwriter", 1), ("archiver", 2)] {
        sqlx::query("SELECT pg_stat_reset_shared($1)")
            .bind(kind)
            .execute(&db.pool)
            .await
            .expect("reset the shared statistics");
        db.terminate_sync_sessions().await;
        let token = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('user:{reconnects}', 'doc:1', 'read', NULL)"
            ))
            .await;
        assert_eq!(daemon.digest_at(&token).await, db.digest().await);
        daemon
            .wait_for_report("the reconnect", |report| {
                report.connected && report.reconnects == reconnects
            })
            .await;
        let report = daemon.status.report();
        assert_eq!(
            report.reloads, 1,
            "no reload after {kind}'s reset: {report:?}"
        );
    }
    daemon.stop().await;
}

/// A backend killed: Postgres restarts every process and recovers from a crash, its
/// postmaster still the same. permd reloads once, as after any crash, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_makes_postgres_recover_and_permd_reload() {
    let (_cluster, db, daemon) = daemon_on_own_cluster(|_| ()).await;
    let before = db
        .write("INSERT INTO permd.tuples VALUES ('before', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("before", "read", "doc", &before).await);
    assert_eq!(daemon.status.report().reloads, 1);
    crash_by_killing_a_backend(&db).await;
    daemon
        .wait_for("the reload after the crash", || {
            daemon.status.report().reloads >= 2
        })
        .await;
    let after = insert_once_up(&db, "after").await;
    assert!(daemon.check("after", "read", "doc", &after).await);
    // The throwaway cluster commits without waiting for its WAL to be flushed, so the
    // crash may have lost `before`: whatever the database kept, permd holds.
    assert_eq!(daemon.digest_at(&after).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!(report.reloads, 2, "one reload for the crash");
    assert_eq!(
        report.last_full_load_reason.as_deref(),
        Some("postgres recovered from a crash")
    );
    daemon.stop().await;
}

/// Kills one of the cluster's backends as its superuser (`COPY … TO PROGRAM`, run as the
/// server's user): the postmaster answers by restarting every process and recovering
/// from a crash, the killing backend's statement failing with the rest.
async fn crash_by_killing_a_backend(db: &TestDb) {
    let victim: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("another backend");
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "COPY (SELECT 1) TO PROGRAM 'kill -9 {victim}'"
    )))
    .execute(&db.pool)
    .await;
}

/// 30,000 rows written with the triggers off (`session_replication_role = replica`): no
/// changelog row or notification tells permd of them, so only a full load brings them,
/// and its COPY carries more of them than a `Proxy` freezing at 256 KiB lets through.
/// Committed to the WAL at once, so that a crash keeps them (the throwaway cluster commits
/// without waiting for it otherwise).
const UNSEEN_BULK: &str = "SET synchronous_commit = on;
    SET session_replication_role = replica;
    INSERT INTO permd.tuples SELECT 'bulk:' || i, 'doc:' || (i % 100), 'read', NULL
    FROM generate_series(1, 30000) i;
    RESET session_replication_role;";

/// With a reload beside the polls held in its COPY by `proxy`, and `UNSEEN_BULK` written
/// before it: the write of `token` (a `read` grant to `subject` on `object`) is answered
/// without a token meanwhile, from the generation being replaced (the bulk rows not in it
/// yet), while its token waits for the swap; released, the load swaps in, the token is
/// answered and the bulk rows are there.
async fn answered_beside_the_held_load(
    daemon: &TestDaemon,
    proxy: &Proxy,
    (subject, object): (&str, &str),
    token: &str,
) {
    wait_until("a write to be answered during the reload", || {
        std::future::ready(daemon.store.check(subject, "read", object))
    })
    .await;
    assert!(!daemon.store.check("bulk:1", "read", "doc:1"));
    assert!(
        !daemon.token_passed(token),
        "the token waits for the reload"
    );
    assert_eq!(daemon.status.report().reloads, 1, "only the first load");
    proxy.frozen().expect("the held load").resumed.cancel();
    assert!(daemon.check(subject, "read", object, token).await);
    assert!(daemon.store.check("bulk:1", "read", "doc:1"));
}

/// The reload after a crash goes beside the polls (since session 74), the polls reading
/// on from its snapshot: held in its COPY by a proxy, a write committed meanwhile is
/// answered without a token, while the write's token waits for the swap (the crash may
/// hand out again xids below the watermark, so none of the old generation's answers
/// proves a token). Once it swaps in, the rows written with the triggers off before the
/// crash are there, the token is answered and the mirror is exact. Until session 74 the
/// reload ran on the sync connection, and no change was applied until it swapped in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_a_crash_goes_beside_the_polls() {
    let cluster = tokio::task::spawn_blocking(|| own_cluster(None))
        .await
        .expect("cluster task");
    let db = database_on(&cluster).await;
    db.exec("INSERT INTO permd.tuples VALUES ('before', 'doc', 'read', NULL)")
        .await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 256 << 10).await;
    let daemon = TestDaemon::start_with(SyncConfig::new(&url), patient()).await;
    db.exec(UNSEEN_BULK).await;
    crash_by_killing_a_backend(&db).await;
    proxy
        .held("the reload's connection to be held in its COPY")
        .await;
    daemon.assert_loading_beside_the_polls("postgres recovered from a crash");
    let token = insert_once_up(&db, "after").await;
    answered_beside_the_held_load(&daemon, &proxy, ("after", "doc"), &token).await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.status.report().reloads, 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_notify_off_polling_delivers_within_the_interval() {
    let db = database().await;
    db.set_for_new_sessions("permd.notify", "off").await;
    let pool = permd::db::pool(&db.url).await.expect("reconnect");
    let mut sync = SyncConfig::new(&db.url);
    sync.poll_interval = Duration::from_millis(200);
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO permd.tuples VALUES ('quiet{i}', 'doc', 'read', NULL)"
        )))
        .execute(&pool)
        .await
        .expect("write");
        let committed = Instant::now();
        // No at_least: nothing but the poll timer can bring this change in.
        daemon
            .wait_for("the polled change", || {
                daemon.store.check(&format!("quiet{i}"), "read", "doc")
            })
            .await;
        worst = worst.max(committed.elapsed());
    }
    println!(
        "notify off, poll interval 200 ms: worst commit-to-visible {:.0} ms",
        worst.as_secs_f64() * 1000.0
    );
    daemon.stop().await;
}

/// A transaction left open with a write of its own, while later ones commit without a
/// notification (`permd.notify = off`) and one with: every later commit is read while it
/// stays open (their tokens answered, the lag that of the polls), its own write is not
/// seen, and once it commits nothing is skipped. Until session 61 the changelog was read
/// below the oldest open transaction: the later commits without a notification waited
/// for it, and the lag counted from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_open_writing_transaction_holds_back_nothing_but_itself() {
    let db = database().await;
    let daemon = TestDaemon::start(&db.url).await;
    let (long, long_xid) = db
        .open_write("INSERT INTO permd.tuples VALUES ('long', 'doc', 'read', NULL)")
        .await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        tokens.push(
            db.write(&format!(
                "SET LOCAL permd.notify = off;
                 INSERT INTO permd.tuples VALUES ('later{i}', 'doc', 'read', NULL)"
            ))
            .await,
        );
    }
    db.write("INSERT INTO permd.tuples VALUES ('notified', 'doc', 'read', NULL)")
        .await;
    daemon
        .wait_for("the commit seen from its notification", || {
            daemon.store.check("notified", "read", "doc")
        })
        .await;
    for (i, token) in tokens.iter().enumerate() {
        assert!(
            daemon
                .check(&format!("later{i}"), "read", "doc", token)
                .await
        );
    }
    assert!(!daemon.store.check("long", "read", "doc"), "not committed");
    let lag = daemon.status.lag_seconds().unwrap_or(f64::NAN);
    long.commit().await.expect("commit the long transaction");
    assert!(daemon.check("long", "read", "doc", &long_xid).await);
    assert_eq!(daemon.digest_at(&long_xid).await, db.digest().await);
    println!("long transaction: lag {lag:.3}s while it was open; nothing skipped");
    daemon.stop().await;
}

/// A daemon of `url` whose idle poll comes once an hour: only notifications, and readers
/// waiting for a token, make it poll.
async fn hourly_daemon(url: &str) -> TestDaemon {
    let mut sync = SyncConfig::new(url);
    sync.poll_interval = Duration::from_secs(3600);
    TestDaemon::start_with(sync, patient()).await
}

/// A read-your-writes check whose write committed while an older transaction is still
/// open is answered at the poll its reader asks for (here the daemon polls once an hour
/// and the write rings no doorbell): the poll's snapshot sees the write. Before session
/// 61 the changelog was read only below the oldest open transaction, and the check waited
/// for it to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_answered_at_the_poll_its_reader_asks_for_while_an_older_transaction_is_open() {
    let db = database().await;
    let daemon = hourly_daemon(&db.url).await;
    let (older, _) = db.open_write("SELECT 1").await;
    let token = db
        .write("SET LOCAL permd.notify = off; INSERT INTO permd.tuples VALUES ('u', '', 'p', NULL)")
        .await;
    assert!(daemon.check("u", "p", "", &token).await);
    older.commit().await.expect("commit");
    daemon.stop().await;
}

/// Two-phase commit. Postgres refuses to `PREPARE TRANSACTION` a transaction that sent a
/// NOTIFY, which the triggers do: a writer that prepares sets `permd.notify = off` first,
/// and its change arrives by the poll. A prepared transaction is still running: it holds
/// back nothing but itself, as an open one does (a read-your-writes check of a later write
/// is answered while its own write is not seen), and it arrives at `COMMIT PREPARED`.
/// `ROLLBACK PREPARED` leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_arrive_when_committed() {
    let cluster = permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
        unsafe_fast: true,
        settings: vec!["max_prepared_transactions=4".to_owned()],
        ..permd::embedded::ClusterOptions::default()
    })
    .expect("start a cluster that allows prepared transactions");
    let db = common::database_on(&cluster).await;
    let daemon = TestDaemon::start(&db.url).await;
    // Runs `sql` in a transaction and prepares it as `name`: whether it could, and the
    // transaction's write token. (sqlx's transaction, dropped, then rolls back nothing.)
    let db = &db;
    let prepare = |name: &'static str, sql: &'static str| async move {
        let (mut tx, token) = db.open_write(sql).await;
        let prepared = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{name}'")))
            .execute(&mut *tx)
            .await;
        (prepared, token)
    };

    let (refused, _) = prepare(
        "notified",
        "INSERT INTO permd.tuples VALUES ('granted', 'doc', 'read', NULL)",
    )
    .await;
    let error = refused.expect_err("a transaction that notified cannot be prepared");
    assert!(error.to_string().contains("NOTIFY"), "{error}");

    let (prepared, token) = prepare(
        "granted",
        "SET LOCAL permd.notify = off;
         INSERT INTO permd.tuples VALUES ('granted', 'doc', 'read', NULL)",
    )
    .await;
    prepared.expect("prepared without a NOTIFY");
    let later = db
        .write("INSERT INTO permd.tuples VALUES ('later', 'doc', 'read', NULL)")
        .await;
    // A later write is seen while the prepared one is not.
    assert!(daemon.check("later", "read", "doc", &later).await);
    assert!(
        !daemon.store.check("granted", "read", "doc"),
        "not committed yet"
    );
    db.exec("COMMIT PREPARED 'granted'").await;
    assert!(daemon.check("granted", "read", "doc", &token).await);

    let (prepared, _) = prepare(
        "revoked",
        "SET LOCAL permd.notify = off; DELETE FROM permd.tuples WHERE subject = 'granted'",
    )
    .await;
    prepared.expect("prepared");
    db.exec("ROLLBACK PREPARED 'revoked'").await;
    let after = db
        .write("INSERT INTO permd.tuples VALUES ('after', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("granted", "read", "doc", &after).await);
    assert_eq!(daemon.digest_at(&after).await, db.digest().await);
    daemon.stop().await;
}

/// A dump of the database restored into another cluster brings the changelog's rows and
/// its pruning mark with the transaction ids of the cluster that wrote them; where those
/// are above this cluster's, no transaction here wrote them. Written here as a restore
/// writes them (ids 5,000,000 above this cluster's, a row an hour old, a mark between).
/// permd loads, is ready and follows writes, with one full load: the restored row waits
/// for nothing, and the mark, found at the session's start, is passed over once loaded.
/// `permd.prune_changelog()` (migration 0007) removes both, the mark replaced with the
/// horizon (a daemon whose cursor is below it loads once more; this one, caught up, is
/// not), and the daemon goes on in sync. Where the schema lacks
/// migration 0007, whose prune could delete rows without moving such a mark, the daemon
/// says so and what to run. Before (session 60), the restored row made permd's lag grow
/// for ever (never ready), and the mark reloaded the whole set at every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_restored_from_another_cluster_are_passed_over() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    let restore = "INSERT INTO permd.changelog (xid, kind, subject, object, created_at)
             VALUES ((pg_current_xact_id()::text::int8 + 5000000)::text::xid8, 't',
                     'user:1', 'doc:1', now() - interval '1 hour');
         UPDATE permd.retention
         SET pruned_xid = (pg_current_xact_id()::text::int8 + 4000000)::text::xid8,
             pruned_id = 7;";
    db.exec(restore).await;
    let daemon = TestDaemon::start(&db.url).await;
    daemon
        .wait_for("ready", || daemon.status.is_ready(1.0))
        .await;
    for subject in ["user:2", "user:3"] {
        let token = db
            .write(&format!(
                "INSERT INTO permd.tuples VALUES ('{subject}', 'doc:1', 'read', NULL)"
            ))
            .await;
        assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    }
    let report = daemon.status.report();
    assert_eq!(report.reloads, 1, "{report:?}");
    assert!(
        report.lag_seconds.is_some_and(|lag| lag < 60.0),
        "{report:?}"
    );

    let removed: i64 = sqlx::query_scalar("SELECT permd.prune_changelog()")
        .fetch_one(&db.pool)
        .await
        .expect("prune");
    assert_eq!(removed, 1, "the restored row");
    let left: (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM permd.changelog
                 WHERE xid >= pg_snapshot_xmax(pg_current_snapshot())),
                pruned_xid < pg_snapshot_xmax(pg_current_snapshot())
         FROM permd.retention",
    )
    .fetch_one(&db.pool)
    .await
    .expect("what is left");
    assert_eq!(left, (0, true));
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:4', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    // Caught up, its cursor already at the horizon the mark now names: no load more.
    let report = daemon.status.report();
    assert_eq!(report.reloads, 1, "{report:?}");
    daemon.stop().await;

    // A schema without migration 0007, restored the same way.
    db.exec(&format!(
        "DROP FUNCTION permd.forget_restored_xids() CASCADE; {restore}"
    ))
    .await;
    let refused = TestDaemon::spawn(SyncConfig::new(&db.url), patient());
    let error = refused.failed_attempts(1).await;
    assert!(
        error.contains("has not reached")
            && error.contains("restored")
            && error.contains("permd migrate"),
        "{error}"
    );
    refused.stop().await;
}

/// A pruning mark restored from another cluster while a daemon follows (a retention row
/// written as a restore writes it, its transaction id 4,000,000 above this cluster's):
/// the next poll ends the session to look at it, and the next session loads in full, as
/// the mark says nothing of what was pruned here; beside its polls since session 74.
/// Held in its COPY by a proxy, the load lacks 30,000 rows written with the triggers off,
/// while a write committed meanwhile is answered without a token and its token waits for
/// the swap; then the mirror is exact, and the mark passed over. (Untested until session
/// 74, when that load ran on the sync connection and held every change back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruning_mark_restored_while_following_is_loaded_beside_the_polls() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 256 << 10).await;
    let mut sync = SyncConfig::new(&url);
    sync.poll_interval = Duration::from_millis(100);
    let daemon = TestDaemon::start_with(sync, patient()).await;
    db.exec(&format!(
        "{UNSEEN_BULK}
         UPDATE permd.retention
         SET pruned_xid = (pg_current_xact_id()::text::int8 + 4000000)::text::xid8,
             pruned_id = 7;"
    ))
    .await;
    proxy
        .held("the reload's connection to be held in its COPY")
        .await;
    daemon.assert_loading_beside_the_polls("a pruning mark restored from another cluster");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    answered_beside_the_held_load(&daemon, &proxy, ("user:2", "doc:1"), &token).await;
    let last = db
        .write("INSERT INTO permd.tuples VALUES ('user:3', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&last).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!((report.reloads, report.reconnects), (2, 1), "{report:?}");
    daemon.stop().await;
}

/// Rows deleted from the changelog by hand (`DELETE`, `TRUNCATE`: an operator reclaiming
/// its space without `permd.prune_changelog()`) before a daemon read them: migration
/// 0008's trigger moves the pruning mark past them, so the daemon loads in full rather than
/// skip their changes. Here the daemon polls once an hour and the writes ring no doorbell,
/// so it has read none of them when they go; a read-your-writes check then wakes it. (A
/// poll the last check woke can still be under way when the next write commits, and read
/// it before its rows go: since session 72 a reload's polls go on beside it and make that
/// likelier, so a write a poll read first, which needs no load, is made again under
/// another name, up to five times: `deleted_unread`.)
/// Before (session 60), that check was answered from a mirror without the write: denied,
/// for good. Then rows deleted by hand above an older transaction still open: the daemon
/// loads once, not at every poll (the mark its load saw is passed over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_rows_deleted_by_hand_are_not_skipped() {
    let db = database().await;
    let daemon = hourly_daemon(&db.url).await;
    let quiet = |subject: &str| {
        format!(
            "SET LOCAL permd.notify = off;
             INSERT INTO permd.tuples VALUES ('{subject}', 'doc', 'read', NULL)"
        )
    };
    // Writes `subject` quietly, deletes the changelog's rows by `delete` and checks the
    // write with its token (answered allowed whatever happened); again under another name
    // until the check took a full load: until no poll read the write before its rows went.
    let deleted_unread = |subject: String, delete: &'static str| {
        let (db, daemon) = (&db, &daemon);
        async move {
            for attempt in 0..5 {
                let reloads = daemon.status.report().reloads;
                let subject = format!("{subject}{attempt}");
                let token = db.write(&quiet(&subject)).await;
                db.exec(delete).await;
                assert!(
                    daemon.check(&subject, "read", "doc", &token).await,
                    "{delete}"
                );
                if daemon.status.report().reloads > reloads {
                    return;
                }
            }
            panic!("{delete}: no full load in five attempts");
        }
    };
    for (round, delete) in [
        "DELETE FROM permd.changelog WHERE created_at <= now()",
        "TRUNCATE permd.changelog",
    ]
    .into_iter()
    .enumerate()
    {
        deleted_unread(format!("hand{round}_"), delete).await;
        assert_eq!(daemon.status.report().reloads, round as u64 + 2, "{delete}");
    }

    let (held, _) = db.open_write("SELECT pg_current_xact_id()").await;
    // A read-your-writes check of it wakes the applier: its poll finds the mark moved and
    // loads, which brings the write in. The polls that checks of later writes wake find
    // the mark that load saw.
    deleted_unread("above".to_owned(), "DELETE FROM permd.changelog").await;
    for later in 0..5 {
        let subject = format!("later{later}");
        let token = db.write(&quiet(&subject)).await;
        assert!(daemon.check(&subject, "read", "doc", &token).await);
    }
    assert_eq!(
        daemon.status.report().reloads,
        4,
        "one load, not one a poll"
    );
    held.commit().await.expect("commit");
    daemon.stop().await;
}

/// A transaction that writes and then deletes its own changelog rows (by hand, by
/// TRUNCATE, or by `permd.forget_restored_xids()`, which `prune_changelog()` calls):
/// the write is answered at its token, by a full load. Until migration 0009 the
/// deletion triggers and `forget_restored_xids()` took rows at or above the statement's
/// snapshot xmax for rows restored from another cluster, and the writing transaction's
/// own id is there (always under REPEATABLE READ, whose snapshot is taken before the id
/// is given; under READ COMMITTED unless a later transaction ended first): the mark did
/// not move, or `forget_restored_xids()` deleted the rows and put the mark below them,
/// and the write was skipped for good (denied at its own token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_deleting_its_own_changelog_rows_is_not_skipped() {
    let db = database().await;
    let daemon = hourly_daemon(&db.url).await;
    // Each way of deleting, and the full loads it takes: rows deleted move the mark past
    // the cursor; `forget_restored_xids()` alone now leaves them, and a poll reads them.
    let cases = [
        ("DELETE FROM permd.changelog", 1),
        ("TRUNCATE permd.changelog", 1),
        ("SELECT permd.forget_restored_xids()", 0),
        // The mark the DELETE moved to the transaction's own rows is not taken for one
        // restored from another cluster and put back below them.
        (
            "DELETE FROM permd.changelog; SELECT permd.forget_restored_xids()",
            1,
        ),
    ];
    for (round, (delete, loads)) in cases.into_iter().enumerate() {
        for (level, isolation) in ["READ COMMITTED", "REPEATABLE READ"]
            .into_iter()
            .enumerate()
        {
            let reloads = daemon.status.report().reloads;
            let subject = format!("own{round}_{level}");
            let token = db
                .write(&format!(
                    "SET TRANSACTION ISOLATION LEVEL {isolation};
                     SET LOCAL permd.notify = off;
                     INSERT INTO permd.tuples VALUES ('{subject}', 'doc', 'read', NULL);
                     {delete}"
                ))
                .await;
            assert!(
                daemon.check(&subject, "read", "doc", &token).await,
                "{delete} under {isolation}"
            );
            assert_eq!(
                daemon.status.report().reloads,
                reloads + loads,
                "{delete} under {isolation}"
            );
        }
    }
    daemon.stop().await;
}

/// `permd.retention`'s one row deleted by hand under a running daemon: its polls, and a
/// new session's start, say what is wrong and how to put the row back (until session 61:
/// "poll returned no horizon", and at a session's start "query returned an unexpected
/// number of rows"). Put back as it says, the daemon goes on: loaded in full once, since
/// the new mark is above its place, and in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_row_deleted_by_hand_is_named_with_its_fix() {
    let db = database().await;
    let daemon = TestDaemon::start(&db.url).await;
    db.exec("DELETE FROM permd.retention").await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('u', 'doc', 'read', NULL)")
        .await;
    daemon
        .wait_for_report("the poll to name the missing row", |report| {
            report.last_error.as_deref().is_some_and(|error| {
                error.contains("permd.retention holds no row")
                    && error.contains("INSERT INTO permd.retention")
            })
        })
        .await;
    let reloads = daemon.status.report().reloads;
    db.exec(
        "INSERT INTO permd.retention (pruned_xid) SELECT pg_snapshot_xmin(pg_current_snapshot())",
    )
    .await;
    assert!(daemon.check("u", "read", "doc", &token).await);
    let later = db
        .write("INSERT INTO permd.tuples VALUES ('v', 'doc', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&later).await, db.digest().await);
    assert_eq!(daemon.status.report().reloads, reloads + 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_forced_reloads_during_concurrent_writes() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples SELECT 's' || (i % 50), 'o' || i, 'read', NULL FROM generate_series(1, 20000) i").await;
    let daemon = TestDaemon::start(&db.url).await;
    let load = Load::start(&daemon, 1);
    let mut rng = Rng(7);
    let started = Instant::now();
    for round in 0..20u64 {
        let reloads = daemon.status.report().reloads;
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let pool = db.pool.clone();
                let seed = rng.next();
                tokio::spawn(async move {
                    let mut rng = Rng(seed ^ w);
                    for _ in 0..15 {
                        let (s, o) = (rng.below(50), rng.below(20_000));
                        let sql = if rng.below(2) == 0 {
                            format!("INSERT INTO permd.tuples VALUES ('s{s}', 'o{o}', 'write', NULL) ON CONFLICT DO NOTHING")
                        } else {
                            format!("DELETE FROM permd.tuples WHERE subject = 's{s}' AND object = 'o{o}'")
                        };
                        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&pool).await.expect("write");
                    }
                })
            })
            .collect();
        sqlx::query("SELECT permd.request_reload()")
            .execute(&db.pool)
            .await
            .expect("request a reload");
        for w in writers {
            w.await.expect("writer");
        }
        let token = db.write("SELECT 1").await;
        assert_eq!(
            daemon.digest_at(&token).await,
            db.digest().await,
            "round {round}"
        );
        assert!(
            daemon.status.report().reloads > reloads,
            "round {round} reloaded"
        );
    }
    let (ok, errors) = load.finish().await;
    assert_eq!(errors, 0);
    println!(
        "20 forced reloads of 20,000+ tuples under concurrent writes in {:.1}s: digest equal each time, \
         {ok} checks answered, {errors} errors, reloads {}",
        started.elapsed().as_secs_f64(),
        daemon.status.report().reloads
    );
    daemon.stop().await;
}

/// 300,000 tuples, enough that a full load's COPY lasts long enough to be caught: the tap
/// holds Postgres back to the pace of the (debug build's) state builder. Filled without
/// changelog rows.
async fn fill_a_long_copy(db: &TestDb) {
    db.exec(LONG_COPY).await;
}

/// [`fill_a_long_copy`]'s statements.
const LONG_COPY: &str = "BEGIN;
     SET LOCAL session_replication_role = replica;
     INSERT INTO permd.tuples
     SELECT 'user:' || (i / 10), 'doc:' || (i % 5000), 'perm' || (i % 40), NULL
     FROM generate_series(1, 300000) i;
     COMMIT;";

/// After a full load of [`fill_a_long_copy`]'s rows that failed and was done again: the
/// daemon reconnected, holds every tuple, and equals the database.
async fn loaded_again_exactly(daemon: &TestDaemon, db: &TestDb) -> permd::sync::StatusReport {
    let report = daemon.status.report();
    assert!(report.reconnects >= 1, "{report:?}");
    assert_eq!(daemon.store.counts().tuples, 300_000);
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    report
}

/// The sync connection ends in the middle of a full load's COPY (its backend terminated
/// while the rows stream through the socket's tap): the load fails, the applier reconnects
/// and loads again, and the mirror is exact. The connection is held in a proxy 1 MiB into
/// the COPY while the backend is terminated, so the COPY is surely under way (on a fast
/// host a COPY looked for in `pg_stat_activity` could end before it was found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_in_the_middle_of_a_full_load_loses_nothing() {
    let db = database().await;
    fill_a_long_copy(&db).await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 1 << 20).await;
    let started = Instant::now();
    let daemon = tokio::spawn(async move { TestDaemon::start(&url).await });
    proxy
        .held("the full load's connection to be held in its COPY")
        .await;
    let terminated: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false)
         FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'permd'
           AND state = 'active' AND query LIKE 'COPY (SELECT % FROM permd.tuples)%'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("terminate the COPY's backend");
    assert!(terminated, "no COPY under way to terminate");
    proxy
        .frozen()
        .expect("the held connection")
        .resumed
        .cancel();
    let terminated = started.elapsed();
    let daemon = daemon.await.expect("the daemon starts");
    let report = loaded_again_exactly(&daemon, &db).await;
    println!(
        "connection lost mid-COPY {:.2}s after start; loaded again, ready {:.2}s after start, \
         {} reconnect(s)",
        terminated.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        report.reconnects,
    );
    daemon.stop().await;
}

/// Another session's transaction holding `permd.tuples` locked until it is rolled back.
async fn lock_tuples(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut locker = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE permd.tuples IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock permd.tuples");
    locker
}

/// Sync settings that give up on a statement after 0.3 s (a lock after 0.15 s) and
/// retry within 0.4 s.
fn impatient(url: &str) -> SyncConfig {
    let mut sync = SyncConfig::new(url);
    sync.query_timeout = Duration::from_millis(300);
    sync.max_backoff = Duration::from_millis(400);
    sync
}

/// A full load that has to wait for a lock (another session's `LOCK TABLE`, a migration's
/// `ALTER TABLE`, `VACUUM FULL`) gives up after the query timeout with Postgres's own
/// reason and a hint, is retried with backoff, and loads once the lock is released. Before,
/// the load (exempt from the query timeout) waited in silence for as long as the lock was
/// held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_load_kept_waiting_by_a_lock_says_so_and_loads_once_it_is_released() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    let locker = lock_tuples(&db).await;
    let sync = impatient(&db.url);
    let daemon = TestDaemon::spawn(sync, patient());
    let error = daemon.failed_attempts(2).await;
    assert!(error.contains("lock timeout"), "{error}");
    assert!(error.contains("pg_locks"), "{error}");
    locker.rollback().await.expect("release the lock");
    let released = Instant::now();
    daemon
        .wait_for("ready", || daemon.status.is_ready(60.0))
        .await;
    assert_eq!(daemon.store.counts().tuples, 1);
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    println!(
        "full load kept waiting by a lock: \"{error}\"; ready {:.2}s after the lock was released",
        released.elapsed().as_secs_f64()
    );
    daemon.stop().await;
}

/// A `statement_timeout` set for the database (`ALTER DATABASE … SET`, sized for the
/// application's queries) does not reach the sync connection: a full load kept waiting
/// well past it, here by a lock, is not cancelled, and loads on its first connection
/// once the lock is released. Before, a load that took longer than the database's
/// timeout (a large set's COPY) was cancelled at every try and never finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_set_for_the_database_does_not_cancel_a_full_load() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    db.set_for_new_sessions("statement_timeout", "'200ms'")
        .await;
    let locker = lock_tuples(&db).await;
    // The query timeout's default (30 s) puts the sync connection's lock_timeout at 15 s.
    let daemon = TestDaemon::spawn(SyncConfig::new(&db.url), patient());
    wait_until(
        "the full load to wait for the lock for a second, or to fail",
        || async {
            let waited = db
                .a_sync_session(
                    "state = 'active' AND wait_event_type = 'Lock'
                     AND clock_timestamp() - query_start > interval '1 s'",
                )
                .await;
            waited || daemon.status.report().last_error.is_some()
        },
    )
    .await;
    let report = daemon.status.report();
    assert!(report.last_error.is_none(), "{report:?}");
    locker.rollback().await.expect("release the lock");
    daemon
        .wait_for("ready", || daemon.status.is_ready(60.0))
        .await;
    let report = daemon.status.report();
    assert_eq!(report.reconnects, 0, "{report:?}");
    assert_eq!(daemon.store.counts().tuples, 1);
    daemon.stop().await;
}

/// An `idle_session_timeout` set for the database (Postgres 14; for the application's
/// idle connections) does not end the sync connection while it waits for notifications
/// between polls (an hour apart here). Before, the connection was ended once idle for
/// that long, and permd reconnected each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_timeout_set_for_the_database_does_not_end_the_sync_connection() {
    let db = database().await;
    db.set_for_new_sessions("idle_session_timeout", "'300ms'")
        .await;
    let daemon = hourly_daemon(&db.url).await;
    // Only the daemon's session had the setting: the test's own new sessions stay.
    db.set_for_new_sessions("idle_session_timeout", "DEFAULT")
        .await;
    wait_until(
        "the sync connection to stay idle for a second, or to be ended",
        || async {
            let idle = db
                .a_sync_session(
                    "state = 'idle' AND clock_timestamp() - state_change > interval '1 s'",
                )
                .await;
            let report = daemon.status.report();
            idle || report.reconnects > 0 || report.last_error.is_some()
        },
    )
    .await;
    let report = daemon.status.report();
    assert_eq!(report.reconnects, 0, "{report:?}");
    assert!(report.last_error.is_none(), "{report:?}");
    daemon.stop().await;
}

/// An `idle_in_transaction_session_timeout` set for the database (for the application's
/// forgotten transactions) does not end a full load, whose transaction waits between its
/// statements while permd takes the rows in (here 1 ms, which a debug build's load of
/// 300,000 rows passes at every gap). Before, the load's session was ended each time, and
/// permd reconnected and loaded again for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_in_transaction_timeout_set_for_the_database_does_not_end_a_full_load() {
    let db = database().await;
    fill_a_long_copy(&db).await;
    db.set_for_new_sessions("idle_in_transaction_session_timeout", "'1ms'")
        .await;
    let daemon = TestDaemon::start(&db.url).await;
    // Only the daemon's sessions had the setting: the test's own new sessions stay.
    db.set_for_new_sessions("idle_in_transaction_session_timeout", "DEFAULT")
        .await;
    let report = daemon.status.report();
    assert_eq!(report.reconnects, 0, "{report:?}");
    assert_eq!(report.reloads, 1, "{report:?}");
    assert_eq!(daemon.store.counts().tuples, 300_000);
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

/// A session the server ends between two of permd's statements is reported with the
/// server's reason, not as a connection closed: here the URL's own
/// `idle_in_transaction_session_timeout` (the operator's choice, kept) of 1 ms, which ends
/// every full load of 300,000 rows (a debug build's) before its commit. Before, the
/// request that found the connection gone said only "connection closed", and the reason
/// Postgres had sent was dropped with the connection's driver; and then, now and again
/// (once in CI, session 68), where the error met a statement's unawaited `Close` in
/// tokio-postgres's queue (the tap keeps it now: `Tap::ended`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_server_ends_is_reported_with_its_reason() {
    let db = database().await;
    fill_a_long_copy(&db).await;
    let url = format!(
        "{}?options=-c%20idle_in_transaction_session_timeout%3D1ms",
        db.url
    );
    let daemon = TestDaemon::spawn(SyncConfig::new(&url), patient());
    let error = daemon.failed_attempts(2).await;
    assert!(error.contains("idle-in-transaction timeout"), "{error}");
    daemon.stop().await;
}

/// A database that logical replication writes (a subscriber) is refused while the
/// subscription's writes to `permd.tuples` would fire none of permd's triggers (they fire
/// only triggers that are `ENABLE ALWAYS` there), with the statements that fix it, and
/// followed once they have run; a subscription to the changelog, whose transaction ids
/// would be the publisher's, is refused too, and once it is gone permd loads in full,
/// since what was replicated meanwhile may have passed the changelog by. Before, such a
/// subscriber was followed, and every replicated write was silently missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_is_followed_only_when_its_writes_reach_the_changelog() {
    let publisher = database().await;
    let db = database().await;
    let (server, publisher_name) = publisher.url.rsplit_once('/').expect("a database");
    let port = server.rsplit_once(':').expect("a port").1;
    let subscribe = |table: &str| {
        format!(
            "CREATE SUBSCRIPTION permd_{table}
               CONNECTION 'host=127.0.0.1 port={port} dbname={publisher_name} user=postgres'
               PUBLICATION permd_{table}
               WITH (enabled = false, create_slot = false, slot_name = NONE, copy_data = false)"
        )
    };
    publisher
        .exec("CREATE PUBLICATION permd_tuples FOR TABLE permd.tuples")
        .await;
    db.exec(&subscribe("tuples")).await;
    let daemon = TestDaemon::spawn(SyncConfig::new(&db.url), patient());
    let error = daemon.failed_attempts(1).await;
    assert!(
        error.contains("subscription permd_tuples writes permd.tuples"),
        "{error}"
    );
    for trigger in [
        "tuples_delete",
        "tuples_insert",
        "tuples_truncate",
        "tuples_update",
    ] {
        let fix = format!("ALTER TABLE permd.tuples ENABLE ALWAYS TRIGGER {trigger};");
        assert!(error.contains(&fix), "{error}");
        db.exec(&fix).await;
    }
    daemon
        .wait_for("ready", || daemon.status.is_ready(60.0))
        .await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.status.report().reloads, 1);

    publisher
        .exec("CREATE PUBLICATION permd_changelog FOR TABLE permd.changelog")
        .await;
    db.exec(&subscribe("changelog")).await;
    // A new connection looks at the subscriptions at once.
    db.exec(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'permd'",
    )
    .await;
    daemon
        .wait_for_report("the changelog's subscription refused", |report| {
            report.last_error.as_deref().is_some_and(|error| {
                error.contains("subscription permd_changelog writes permd.changelog")
            })
        })
        .await;
    db.exec("DROP SUBSCRIPTION permd_changelog").await;
    daemon
        .wait_for_report("loaded in full again, and caught up", |report| {
            report.reloads == 2 && report.last_error.is_none()
        })
        .await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
    db.exec("DROP SUBSCRIPTION permd_tuples").await;
}

/// A daemon started on a database that lacks permd's schema (its migrations not applied
/// yet, or applied to another database) says so with the remedy, retries, and loads once
/// `permd migrate` has run; one whose role lacks its privileges is told which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_schema_or_privileges_says_what_to_do() {
    let db = database().await;
    db.exec("DROP SCHEMA permd CASCADE; DROP TABLE _sqlx_migrations")
        .await;
    let daemon = TestDaemon::spawn(impatient(&db.url), patient());
    let error = daemon.failed_attempts(2).await;
    assert!(error.contains("schema \"permd\" does not exist"), "{error}");
    assert!(error.contains("run `permd migrate`"), "{error}");
    // Nothing loaded: a check is not answered "denied" from the empty store.
    let check = "/v1/check?subject=user:1&permission=read&object=doc:1";
    let (status, body) = daemon.get(check).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "loading", "{body}");
    permd::db::migrate(&db.pool).await.expect("migrate");
    // A role without its privileges is told which it lacks.
    let (stranger, url) = db.role("stranger", "").await;
    let denied = TestDaemon::spawn(impatient(&url), patient());
    let error = denied.failed_attempts(2).await;
    assert!(error.contains("permission denied"), "{error}");
    assert!(
        error.contains("USAGE on schema permd and SELECT"),
        "{error}"
    );
    denied.stop().await;
    stranger.close().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)")
        .await;
    daemon
        .wait_for("ready", || daemon.status.is_ready(60.0))
        .await;
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.store.counts().tuples, 1);
    let (status, body) = daemon.get(check).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["allowed"], true, "{body}");
    daemon.stop().await;
}

/// permd pointed at a standby (a read replica: Postgres allows no LISTEN there) follows it
/// by polling: it loads from the standby, and each commit on the primary is applied once
/// the standby has replayed it, `at_least` waiting for exactly that commit. A URL that lists
/// the standby first and the primary with `target_session_attrs=read-write` follows the
/// primary, listening; `primary`, `standby` and `prefer-standby` pick by recovery, as in
/// libpq (since session 34; tokio-postgres refused them). Before session 28 a standby was refused (`cannot execute LISTEN
/// during recovery`), and retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_followed_by_polling() {
    let Replica {
        primary,
        standby,
        db,
        url: replica,
    } = replica().await;
    let name = db.url.rsplit('/').next().expect("a database name");

    // An hourly idle poll: readers' `at_least` wakes the applier, and NOTIFY once promoted.
    let daemon = hourly_daemon(&replica).await;
    let (_, status) = daemon.get("/v1/status").await;
    assert_eq!(status["standby"], true, "{status}");
    assert_eq!(status["reconnects"], 0, "{status}");
    for write in [
        "INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)",
        "DELETE FROM permd.tuples WHERE subject = 'user:1'",
        "INSERT INTO permd.limits VALUES ('user:2', 'projects', 3)",
    ] {
        let token = db.write(write).await;
        assert_eq!(daemon.digest_at(&token).await, db.digest().await, "{write}");
    }
    assert!(daemon.check("user:2", "read", "doc:1", "0").await);
    assert!(!daemon.check("user:1", "read", "doc:1", "0").await);
    let (_, status) = daemon.get("/v1/status").await;
    assert_eq!(status["reloads"], 1, "{status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");

    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{name}?target_session_attrs=read-write",
        standby.port(),
        primary.port()
    );
    let follower = TestDaemon::start(&both).await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:3', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(follower.digest_at(&token).await, db.digest().await);
    assert!(!follower.status.report().standby);
    follower.stop().await;

    // libpq's values that tokio-postgres does not know, by the servers' recovery:
    // `prefer-standby` takes the standby though the primary comes first, and the primary
    // when the standby is not listed; `primary` and `standby` skip the other.
    let listed = |ports: &[u16], attrs: &str| {
        let hosts: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!(
            "postgres://postgres@{}/{name}?target_session_attrs={attrs}",
            hosts.join(",")
        )
    };
    let (on_primary, on_standby) = (primary.port(), standby.port());
    for (ports, attrs, standby_followed) in [
        (&[on_primary, on_standby][..], "prefer-standby", true),
        (&[on_primary][..], "prefer-standby", false),
        (&[on_standby, on_primary][..], "primary", false),
        (&[on_primary, on_standby][..], "standby", true),
    ] {
        let url = listed(ports, attrs);
        let follower = TestDaemon::start(&url).await;
        assert_eq!(follower.status.report().standby, standby_followed, "{url}");
        follower.stop().await;
    }
    let refused = TestDaemon::spawn(SyncConfig::new(listed(&[on_primary], "standby")), patient());
    let error = refused.failed_attempts(1).await;
    assert!(
        error.contains("target_session_attrs=standby, and the server is a primary"),
        "{error}"
    );
    refused.stop().await;

    // Promoted (a failover), the standby is followed as a primary: listening, its
    // notifications applied as they arrive.
    let promoted = permd::db::pool(&replica)
        .await
        .expect("connect to the standby");
    sqlx::query("SELECT pg_promote()")
        .execute(&promoted)
        .await
        .expect("promote the standby");
    daemon
        .wait_for_report("the promotion noticed, and caught up since", |report| {
            report.connected
                && !report.standby
                && report.reconnects == 1
                && report.last_error.is_none()
        })
        .await;
    // No poll is due for an hour, and nothing waits on a token: only the notification
    // brings this write.
    let notified = daemon.status.report().notified_changes;
    sqlx::query("INSERT INTO permd.tuples VALUES ('user:4', 'doc:1', 'read', NULL)")
        .execute(&promoted)
        .await
        .expect("write on the promoted server");
    daemon
        .wait_for("the write's notification", || {
            daemon.status.report().notified_changes > notified
        })
        .await;
    assert!(daemon.check("user:4", "read", "doc:1", "0").await);
    promoted.close().await;
    daemon.stop().await;

    db.pool.close().await;
}

/// A daemon that reconnects to another server than its last (here a URL naming a primary
/// and its standby, the primary stopped) reloads from it, as after a crash: the new server
/// need not hold all the last one held (a standby is behind; a standby promoted after an
/// asynchronous failover may lack the last commits), nor continue its transaction ids. It
/// says so, naming both servers, where before it said "postgres recovered from a crash"; a
/// crash is still named as one (`a_killed_backend_makes_postgres_recover_and_permd_reload`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_moves_to_another_server_reloads_and_says_so() {
    let Replica {
        primary,
        standby,
        db,
        url: on_standby,
    } = replica().await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let (on_primary, on_replica) = (primary.port(), standby.port());
    let both = format!("postgres://postgres@127.0.0.1:{on_primary},127.0.0.1:{on_replica}/{name}");
    let daemon = TestDaemon::start(&both).await;
    let report = daemon.status.report();
    assert!(!report.standby, "the first host, the primary: {report:?}");
    assert_eq!(report.last_full_load_reason.as_deref(), Some("start"));
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);

    primary
        .stop_server(StopMode::Fast)
        .expect("stop the primary");
    daemon
        .wait_for_report("the reload from the standby", |report| {
            report.connected && report.standby && report.reloads == 2
        })
        .await;
    let report = daemon.status.report();
    assert_eq!(
        report.last_full_load_reason.as_deref(),
        Some(
            format!(
                "another server than the last session's (127.0.0.1:{on_primary}, now \
                 127.0.0.1:{on_replica}), which need not hold all the last one held"
            )
            .as_str()
        ),
        "{report:?}"
    );
    let replayed = permd::db::pool(&on_standby)
        .await
        .expect("connect to the standby");
    let digest: String = sqlx::query_scalar("SELECT permd.digest()")
        .fetch_one(&replayed)
        .await
        .expect("the standby's digest");
    assert_eq!(daemon.digest_at("0").await, digest);
    replayed.close().await;

    // The primary back, the daemon stays on the standby and follows its replay.
    primary.start_server().expect("start the primary again");
    let token = insert_once_up(&db, "user:3").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.status.report().reloads, 2, "no reload since");
    daemon.stop().await;
    db.pool.close().await;
}

/// A database whose default isolation is SERIALIZABLE (`ALTER DATABASE … SET
/// default_transaction_isolation`, for the application's writes), followed on a standby,
/// which runs no SERIALIZABLE transaction ("cannot use serializable mode in a hot
/// standby"): the sync connection reads in READ COMMITTED (a load in REPEATABLE READ), so
/// it loads and follows, and the one-off commands read there too. Before, every
/// statement of either was refused, and the daemon retried for ever. (On a primary, the same setting made every poll a SERIALIZABLE transaction, its
/// predicate locks a chance to fail the application's SERIALIZABLE writers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_default_isolation_does_not_reach_the_sync_connection() {
    let Replica {
        primary: _primary,
        standby: _standby,
        db,
        url,
    } = replica().await;
    db.set_for_new_sessions("default_transaction_isolation", "'serializable'")
        .await;
    wait_until("the standby to refuse a new session's statements", || {
        let url = url.clone();
        async move {
            let Ok(mut session) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await
            else {
                return false;
            };
            let refused = sqlx::query("SELECT 1").execute(&mut session).await;
            refused.is_err_and(|e| e.to_string().contains("serializable mode in a hot standby"))
        }
    })
    .await;
    let daemon = TestDaemon::spawn(SyncConfig::new(&url), patient());
    daemon
        .wait_for("ready, or failed", || {
            daemon.status.is_ready(60.0) || daemon.status.report().last_error.is_some()
        })
        .await;
    let report = daemon.status.report();
    assert!(report.last_error.is_none(), "{report:?}");
    assert!(report.standby, "{report:?}");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert_eq!(daemon.status.report().reconnects, 0);
    daemon.stop().await;
    // The one-off commands' connections too (`permd verify` against the standby).
    let one_off = permd::db::pool(&url).await.expect("connect to the standby");
    let tuples: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
        .fetch_one(&one_off)
        .await
        .expect("read on the standby");
    assert_eq!(tuples, 2);
    one_off.close().await;
    db.pool.close().await;
}

/// A transaction open on the primary while permd follows a standby: the standby's
/// `pg_current_snapshot()` lists no transaction in progress (recovery keeps them apart),
/// so taken at its word, a poll's snapshot would claim to see the open one, and its rows,
/// once committed, would never be read (tried: its token answered at once, `allowed`
/// false). permd reads a standby's changelog only below its snapshots' xmin
/// (`Applier::horizon_only`), as before session 61: the lag counts from the later write,
/// which waits, and the open one's write is read once it commits, the later one's with
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_on_the_primary_is_read_from_a_standby_once_committed() {
    let Replica {
        primary: _primary,
        standby: _standby,
        db,
        url: replica,
    } = replica().await;
    let sync = SyncConfig {
        poll_interval: Duration::from_millis(50),
        ..SyncConfig::new(&replica)
    };
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let (held, held_xid) = db
        .open_write("INSERT INTO permd.tuples VALUES ('held', 'doc', 'read', NULL)")
        .await;
    let later = db
        .write("INSERT INTO permd.tuples VALUES ('later', 'doc', 'read', NULL)")
        .await;
    let on_standby = permd::db::pool(&replica).await.expect("the standby");
    wait_until("the standby to replay the later write", || async {
        let xmax: Result<String, _> =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                .fetch_one(&on_standby)
                .await;
        xmax.is_ok_and(|xmax| xmax.parse::<u64>().ok() > later.parse::<u64>().ok())
    })
    .await;
    on_standby.close().await;
    let polls = daemon.status.report().polls;
    daemon
        .wait_for("polls while the transaction is open", || {
            daemon.status.report().polls >= polls + 3
        })
        .await;
    // The mirror is as old as the later write, which waits (polls run every 50 ms).
    daemon
        .wait_for("the lag to count from the waiting write", || {
            daemon.status.lag_seconds().is_some_and(|lag| lag > 0.3)
        })
        .await;
    held.commit().await.expect("commit");
    assert!(daemon.check("held", "read", "doc", &held_xid).await);
    assert!(daemon.check("later", "read", "doc", &later).await);
    assert_eq!(daemon.digest_at(&held_xid).await, db.digest().await);
    daemon.stop().await;
}

/// A standby read in batches of 2 rows (below its snapshots' xmin, `horizon_only`): the
/// batches end inside transactions' rows, and each transaction's token is answered once
/// its last row is read; the digest equals the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_read_in_small_batches_skips_nothing() {
    let Replica {
        primary: _primary,
        standby: _standby,
        db,
        url: replica,
    } = replica().await;
    let mut sync = SyncConfig::new(&replica);
    sync.batch_rows = 2;
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let mut last = String::new();
    for round in 0..3 {
        last = db
            .write(&format!(
                "INSERT INTO permd.tuples
                 SELECT 'standby{round}', 'doc:' || i, 'read', NULL FROM generate_series(1, 5) i"
            ))
            .await;
        assert!(
            daemon
                .check(&format!("standby{round}"), "read", "doc:5", &last)
                .await
        );
    }
    assert_eq!(daemon.digest_at(&last).await, db.digest().await);
    daemon.stop().await;
}

/// A reload on a standby goes beside the polls (since session 75; until then it loaded on
/// the sync connection, and nothing the standby replayed was applied until it swapped
/// in): the rows of `UNSEEN_BULK` written on the primary, then `permd.request_reload()`,
/// the reload's COPY held by a proxy in front of the standby. A write made on the primary
/// meanwhile is answered once the standby has replayed it, its token waiting for the swap;
/// after it, the bulk rows are there and the mirror equals the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_on_a_standby_goes_beside_the_polls() {
    let Replica {
        primary: _primary,
        standby: _standby,
        db,
        url: replica,
    } = replica().await;
    let (proxy, url) = Proxy::in_front_of(&replica, 256 << 10).await;
    // Polls are a standby's only doorbell.
    let mut sync = SyncConfig::new(&url);
    sync.poll_interval = Duration::from_millis(50);
    let daemon = TestDaemon::start_with(sync, patient()).await;
    assert!(daemon.status.report().standby);
    db.exec(UNSEEN_BULK).await;
    db.exec("SELECT permd.request_reload()").await;
    proxy.held("the reload's COPY to be held").await;
    daemon.assert_loading_beside_the_polls("TRUNCATE or permd.request_reload() in the changelog");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:2', 'read', NULL)")
        .await;
    answered_beside_the_held_load(&daemon, &proxy, ("user:2", "doc:2"), &token).await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!((report.reloads, report.reconnects), (2, 0), "{report:?}");
    daemon.stop().await;
}

/// A primary with a test database (one tuple in it), and a streaming standby of it that
/// has replayed the database.
struct Replica {
    primary: permd::embedded::Cluster,
    standby: permd::embedded::Cluster,
    /// The database, on the primary.
    db: TestDb,
    /// The database's URL on the standby.
    url: String,
}

async fn replica() -> Replica {
    replica_with(
        &[],
        "INSERT INTO permd.tuples VALUES ('user:1', 'doc:1', 'read', NULL)",
        1,
    )
    .await
}

/// [`replica`], the standby started with `settings` (`name=value`), the database seeded
/// with `seed`, which writes `rows` tuples, and the standby waited for until it has them.
async fn replica_with(settings: &[&str], seed: &str, rows: i64) -> Replica {
    let primary = own_cluster(None);
    let standby = permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
        unsafe_fast: true,
        standby_of: Some(primary.port()),
        settings: settings.iter().map(|&setting| setting.to_owned()).collect(),
        ..Default::default()
    })
    .expect("start a standby");
    let db = database_on(&primary).await;
    db.exec(seed).await;
    let name = db.url.rsplit('/').next().expect("a database name");
    let url = standby.url(name);
    wait_until("the standby to replay the seeded database", || {
        let url = url.clone();
        async move {
            let Ok(pool) = permd::db::pool(&url).await else {
                return false;
            };
            let replayed: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
                .fetch_one(&pool)
                .await;
            pool.close().await;
            replayed.is_ok_and(|n| n == rows)
        }
    })
    .await;
    Replica {
        primary,
        standby,
        db,
        url,
    }
}

/// permd's tables dropped and created again under a running daemon (`DROP SCHEMA permd
/// CASCADE`, `permd migrate` again, the set written anew: what restoring the schema from a
/// dump with `pg_restore --clean` does): the daemon loads the new tables in full. Before
/// (session 60), its poll, which names the tables, read the new changelog from the old
/// one's cursor, and the daemon kept the old set's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permd_tables_created_again_are_loaded_in_full() {
    let db = database().await;
    db.exec("INSERT INTO permd.tuples VALUES ('user:old', 'doc', 'read', NULL)")
        .await;
    let daemon = TestDaemon::start(&db.url).await;
    assert!(daemon.store.check("user:old", "read", "doc"));
    db.exec("DROP SCHEMA permd CASCADE; DROP TABLE _sqlx_migrations")
        .await;
    permd::db::migrate(&db.pool).await.expect("migrate again");
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:new', 'doc', 'read', NULL)")
        .await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    assert!(!daemon.store.check("user:old", "read", "doc"));
    let report = daemon.status.report();
    assert_eq!(
        report.last_full_load_reason.as_deref(),
        Some("permd's tables were created again since the last full load"),
        "{report:?}"
    );

    // Created again as a restore from another cluster leaves them, by a schema without
    // migration 0007: looked at as at a session's start, and refused with the fix.
    db.exec(
        "BEGIN;
         DROP SCHEMA permd CASCADE; DROP TABLE _sqlx_migrations;
         COMMIT;",
    )
    .await;
    permd::db::migrate(&db.pool).await.expect("migrate again");
    db.exec(
        "DROP FUNCTION permd.forget_restored_xids() CASCADE;
         UPDATE permd.retention
         SET pruned_xid = (pg_current_xact_id()::text::int8 + 4000000)::text::xid8;",
    )
    .await;
    daemon
        .wait_for_report("the restored ids refused", |report| {
            report
                .last_error
                .as_deref()
                .is_some_and(|error| error.contains("run `permd migrate`"))
        })
        .await;
    daemon.stop().await;
}

/// A writing transaction left open in the cluster holds back nothing but itself. Each
/// poll reads the rows of every transaction its snapshot sees that the last one did not,
/// so a read-your-writes check of a write committed after the open transaction began is
/// answered at once, the open one's own write is not seen until it commits, and the
/// mirror is as current as its last poll: `/readyz` stays ready past its lag bound. Until
/// session 61 the changelog was read only below the oldest open transaction: the check
/// waited for it to end (503 `stale` past `--max-wait-ms`), and `/readyz` turned 503. On
/// a cluster of its own, where no other test's transaction is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_holds_back_nothing_but_itself() {
    let cluster = own_cluster(None);
    let db = database_on(&cluster).await;
    let http = HttpConfig {
        max_wait: Duration::from_secs(5),
        ready_max_lag: Duration::from_secs(1),
        ..HttpConfig::default()
    };
    let sync = SyncConfig {
        poll_interval: Duration::from_millis(100),
        ..SyncConfig::new(&db.url)
    };
    let daemon = TestDaemon::start_with(sync, http).await;
    let (held, held_xid) = db
        .open_write("INSERT INTO permd.tuples VALUES ('held', 'doc', 'read', NULL)")
        .await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('late', 'doc', 'read', NULL)")
        .await;
    assert!(daemon.check("late", "read", "doc", &token).await);
    assert!(!daemon.check("held", "read", "doc", "").await);
    let (_, body) = daemon.get("/v1/status").await;
    assert!(
        body["snapshot"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{held_xid}:"))),
        "the open transaction is the oldest the mirror lacks: {body}"
    );
    // Past the lag bound since the late write, the mirror is as current as its polls.
    let polls = daemon.status.report().polls;
    daemon
        .wait_for_report("polls for longer than the lag bound", |report| {
            report.polls >= polls + 15
        })
        .await;
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    held.commit().await.expect("commit");
    assert!(daemon.check("held", "read", "doc", &held_xid).await);
    daemon.stop().await;
}

/// A full load on a standby cancelled by a conflict with replay: the standby's primary
/// vacuumed away rows the load's snapshot still reads, and the standby, set not to wait
/// (`max_standby_streaming_delay = 0`, no `hot_standby_feedback`), cancelled the load to
/// replay on (a large load on a standby whose primary is busy meets the same once it takes
/// longer than the 30 s default). The load is held by a proxy in the middle of its COPY
/// while the primary deletes and vacuums. The error says what to set, and permd loads at
/// its next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_cancelled_by_replay_on_a_standby_says_what_to_set() {
    let Replica {
        primary: _primary,
        standby: _standby,
        db,
        url: on_standby,
    } = replica_with(
        &["max_standby_streaming_delay=0", "hot_standby_feedback=off"],
        LONG_COPY,
        300_000,
    )
    .await;
    let (proxy, url) = Proxy::in_front_of(&on_standby, 1 << 20).await;
    let daemon = TestDaemon::spawn(SyncConfig::new(&url), patient());
    proxy.held("the load's COPY to be held").await;
    db.exec("DELETE FROM permd.tuples WHERE subject = 'user:1'")
        .await;
    db.exec("VACUUM permd.tuples").await;
    proxy
        .frozen()
        .expect("the held connection")
        .resumed
        .cancel();
    let error = daemon.failed_attempts(1).await;
    assert!(
        error.contains("conflict with recovery") && error.contains("hot_standby_feedback"),
        "{error}"
    );
    daemon
        .wait_for_report("the load at the next attempt", |report| report.loaded)
        .await;
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    daemon.stop().await;
}

/// permd on a standby is as current as the standby: when the standby's replay is held
/// while its primary writes, or it loses its primary, permd's lag grows past the limit
/// (not ready), and it is current again once the standby is. Both for a role that may see
/// the WAL receiver's status and for one that sees only its process id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_behind_its_primary_makes_permd_late() {
    let Replica {
        primary,
        standby: _standby,
        db,
        url,
    } = replica().await;
    // `permd_blind` may not read how far its standby has replayed (hardened, or a
    // managed service without the function): it is followed as before permd asked.
    db.exec(
        "CREATE ROLE permd_reader LOGIN; CREATE ROLE permd_blind LOGIN; \
         GRANT USAGE ON SCHEMA permd TO permd_reader, permd_blind; \
         GRANT SELECT ON ALL TABLES IN SCHEMA permd TO permd_reader, permd_blind; \
         REVOKE EXECUTE ON FUNCTION pg_last_wal_replay_lsn() FROM PUBLIC; \
         GRANT EXECUTE ON FUNCTION pg_last_wal_replay_lsn() TO permd_reader",
    )
    .await;
    let reader = url.replacen("postgres@", "permd_reader@", 1);
    assert_ne!(reader, url);
    wait_until("the standby to replay the role", || {
        let reader = reader.clone();
        async move {
            let Ok(pool) = permd::db::pool(&reader).await else {
                return false;
            };
            pool.close().await;
            true
        }
    })
    .await;
    let admin = permd::db::pool(&url).await.expect("connect to the standby");
    let mut daemons = Vec::new();
    for url in [&url, &reader] {
        let mut sync = SyncConfig::new(url);
        sync.poll_interval = Duration::from_millis(50);
        daemons.push(TestDaemon::start_with(sync, patient()).await);
    }
    // The limit `/readyz` would be given; the lags this test makes pass it.
    const MAX_LAG: f64 = 1.0;
    let current = |daemon: &TestDaemon, report: &permd::sync::StatusReport| {
        report.standby
            && !report.following
            && report.standby_lag_seconds.is_some()
            && daemon.status.is_ready(MAX_LAG)
    };
    let late = |daemon: &TestDaemon, report: &permd::sync::StatusReport| {
        report.standby_lag_seconds.is_some_and(|lag| lag > MAX_LAG)
            && !daemon.status.is_ready(MAX_LAG)
    };
    let all = |what: &'static str, state: fn(&TestDaemon, &permd::sync::StatusReport) -> bool| {
        let daemons = &daemons;
        async move {
            for daemon in daemons {
                daemon
                    .wait_for_report(what, |report| state(daemon, report))
                    .await;
            }
        }
    };
    all("both daemons current", current).await;

    // Replay paused: an idle primary keeps its standby current...
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&admin)
        .await
        .expect("pause replay");
    // ...but not one that writes.
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:2', 'doc:1', 'read', NULL)")
        .await;
    all("the held replay seen", late).await;
    for daemon in &daemons {
        assert!(!daemon.check("user:2", "read", "doc:1", "0").await);
    }
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&admin)
        .await
        .expect("resume replay");
    all("both current once replay resumed", current).await;
    for daemon in &daemons {
        assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    }

    // The primary stopped: the standby's receiver is gone.
    primary
        .stop_server(StopMode::Fast)
        .expect("stop the primary");
    all("the lost primary seen", late).await;
    primary.start_server().expect("start the primary again");
    all("both current once the standby streams again", current).await;
    let token = db
        .write("INSERT INTO permd.tuples VALUES ('user:3', 'doc:1', 'read', NULL)")
        .await;
    let mut sync = SyncConfig::new(url.replacen("postgres@", "permd_blind@", 1));
    sync.poll_interval = Duration::from_millis(50);
    daemons.push(TestDaemon::start_with(sync, patient()).await);
    let blind = daemons.len() - 1;
    for (n, daemon) in daemons.into_iter().enumerate() {
        assert_eq!(daemon.digest_at(&token).await, db.digest().await);
        let report = daemon.status.report();
        assert_eq!(report.reconnects, 0, "{report:?}");
        assert!(
            report.standby && daemon.status.is_ready(MAX_LAG),
            "{report:?}"
        );
        assert_eq!(
            report.standby_lag_seconds.is_none(),
            n == blind,
            "{report:?}"
        );
        daemon.stop().await;
    }
    admin.close().await;
    db.pool.close().await;
}

/// A poll kept waiting by a lock on `permd.tuples` (a poll locks every table it names,
/// changes or not) is cancelled by Postgres after half the query timeout, with the hint;
/// the applier reconnects and keeps its cursor (no reload), and a write made meanwhile is
/// applied once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_kept_waiting_by_a_lock_says_so_and_resumes_without_a_reload() {
    let db = database().await;
    let mut sync = impatient(&db.url);
    sync.poll_interval = Duration::from_millis(50);
    let daemon = TestDaemon::start_with(sync, patient()).await;
    let locker = lock_tuples(&db).await;
    daemon
        .wait_for("a poll cancelled by the lock timeout", || {
            let report = daemon.status.report();
            report.reconnects >= 1
                && report.last_error.is_some_and(|error| {
                    error.contains("lock timeout") && error.contains("pg_locks")
                })
        })
        .await;
    // A write to permd.limits goes through meanwhile (its changelog rows too).
    db.exec("INSERT INTO permd.limits VALUES ('user:1', 'projects', 3)")
        .await;
    locker.rollback().await.expect("release the lock");
    let token = db.write("SELECT 1").await;
    assert_eq!(daemon.digest_at(&token).await, db.digest().await);
    let report = daemon.status.report();
    assert_eq!(report.reloads, 1, "{report:?}");
    assert_eq!(daemon.store.counts().limits, 1);
    daemon.stop().await;
}

/// The full load's rows stop arriving in the middle of its COPY (its connection frozen
/// in a proxy: what a hung server or a network that drops every packet looks like from
/// permd's side). The load gives up once nothing arrived for the query timeout, the
/// connection is dropped, and a new one loads everything. Before, the load waited until
/// TCP keepalives gave up on the connection, minutes with the kernel's defaults. The
/// connection presumed dead is closed on permd's side (left to itself, its task would
/// hold the socket open for that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_load_whose_rows_stop_arriving_gives_up_and_loads_again() {
    let db = database().await;
    fill_a_long_copy(&db).await;
    // 1 MiB from Postgres is well into the COPY of 300,000 rows (~12 MB).
    let (proxy, url) = Proxy::in_front_of(&db.url, 1 << 20).await;
    let mut sync = SyncConfig::new(&url);
    sync.query_timeout = Duration::from_millis(1000);
    sync.max_backoff = Duration::from_millis(400);
    let started = Instant::now();
    let daemon = TestDaemon::spawn(sync, patient());
    let link = proxy
        .held("the full load's connection to be frozen in its COPY")
        .await;
    let stalled = started.elapsed();
    daemon
        .wait_for("ready", || daemon.status.is_ready(60.0))
        .await;
    let ready = started.elapsed();
    tokio::time::timeout(DEADLINE, link.closed.cancelled())
        .await
        .expect("the stalled connection closed by permd");
    let report = loaded_again_exactly(&daemon, &db).await;
    println!(
        "full load's connection frozen {:.2}s after start; loaded again on a new connection, \
         ready {:.2}s after start, {} reconnect(s)",
        stalled.as_secs_f64(),
        ready.as_secs_f64(),
        report.reconnects,
    );
    daemon.stop().await;
}

/// A daemon stopped in the middle of a full load stops at once, the load abandoned: here
/// its rows frozen in the COPY (a load of a large set still streaming), the query timeout
/// two minutes. Before session 62 the applier looked at the shutdown only between its
/// polls: a SIGTERM waited for the load to end (here, for the query timeout), and the
/// daemon exited at `--shutdown-timeout-ms` with work in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_in_the_middle_of_a_full_load_stops_at_once() {
    let db = database().await;
    fill_a_long_copy(&db).await;
    let (proxy, url) = Proxy::in_front_of(&db.url, 1 << 20).await;
    let mut sync = SyncConfig::new(&url);
    sync.query_timeout = Duration::from_secs(120);
    let daemon = TestDaemon::spawn(sync, patient());
    proxy
        .held("the full load's connection to be frozen in its COPY")
        .await;
    assert!(!daemon.status.report().loaded, "the load under way");
    // Fails past the test deadline (30 s) if the load holds the applier.
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_at_start_is_retried_until_it_appears() {
    let port = permd::embedded::free_port().expect("port");
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut sync = SyncConfig::new(&url);
    sync.max_backoff = Duration::from_millis(400);
    let daemon = TestDaemon::spawn(sync, patient());
    let error = daemon.failed_attempts(3).await;
    assert!(error.contains("postgres"), "{error}");
    let (code, _) = send(
        &daemon.api,
        Request::get("/readyz")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let (code, _) = send(
        &daemon.api,
        Request::get("/livez").body(Body::empty()).expect("request"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);

    // Postgres appears on that port; permd finds it on its next attempt.
    let cluster = tokio::task::spawn_blocking(move || own_cluster(Some(port)))
        .await
        .expect("cluster task");
    let admin = permd::db::pool(&url).await.expect("connect");
    permd::db::migrate(&admin).await.expect("migrate");
    sqlx::query("INSERT INTO permd.tuples VALUES ('late', 'doc', 'read', NULL)")
        .execute(&admin)
        .await
        .expect("write");
    let appeared = Instant::now();
    // permd may have connected between the migration and the write: it is ready either way,
    // and the write arrives through the changelog.
    wait_until("ready with the write made after Postgres appeared", || {
        std::future::ready(
            daemon.status.is_ready(60.0) && daemon.store.check("late", "read", "doc"),
        )
    })
    .await;
    println!(
        "unreachable at start: {} attempts failed (last error: {error}); ready {:.2}s after Postgres appeared",
        daemon.status.report().reconnects,
        appeared.elapsed().as_secs_f64()
    );
    daemon.stop().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_fast_and_probes_stay_up() {
    let db = database().await;
    let http = HttpConfig {
        max_in_flight: 8,
        ..patient()
    };
    let daemon = TestDaemon::start_with(SyncConfig::new(&db.url), http).await;
    // Eight requests wait for a write whose transaction is still open: capacity is used up
    // until it commits (no timing involved, so a slow machine cannot release them early).
    let (open, token) = db
        .open_write("INSERT INTO permd.tuples VALUES ('a', '', 'b', NULL)")
        .await;
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let api = daemon.api.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let uri = format!("/v1/check?subject=a&permission=b&at_least={token}");
                loop {
                    let request = Request::get(&uri).body(Body::empty()).expect("request");
                    let (status, body) = send(&api, request).await;
                    // A waiter that arrives while the probe below holds the last in-flight place
                    // is shed itself: it tries again, so that all eight end up waiting
                    // (else the probe would find a place free for ever).
                    if status != StatusCode::SERVICE_UNAVAILABLE || body["error"] != "overloaded" {
                        return (status, body);
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    wait_until("capacity used up", || async {
        daemon.get("/v1/check?subject=a&permission=b").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let started = Instant::now();
    let mut shed = 0;
    for _ in 0..200 {
        let (status, body) = daemon.get("/v1/check?subject=a&permission=b").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"], "overloaded");
        shed += 1;
    }
    let per_shed = started.elapsed() / shed;
    assert_eq!(
        daemon.get("/livez").await.0,
        StatusCode::OK,
        "liveness is never shed"
    );
    open.commit().await.expect("commit");
    for w in waiting {
        let (status, body) = w.await.expect("waiter");
        assert_eq!(
            (status, &body["allowed"]),
            (StatusCode::OK, &serde_json::Value::Bool(true)),
            "{body}"
        );
    }
    let (status, _) = daemon.get("/v1/check?subject=a&permission=b").await;
    assert_eq!(status, StatusCode::OK, "full recovery once capacity frees");
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(metrics
        .as_str()
        .is_some_and(|m| m.contains("permd_shed_total")));
    println!(
        "overload: {shed} requests shed with 503 in {:.1} µs each; /livez 200 throughout",
        per_shed.as_secs_f64() * 1e6
    );
    daemon.stop().await;
}
