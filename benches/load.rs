//! Full load speed and memory: `cargo bench --bench load` fills permd.tuples of a throwaway
//! Postgres with 1M and 10M tuples (`BENCH_LOAD_SIZES`, comma-separated), starts permd as
//! its own process for each, and reports the time to ready, rows per second, resident
//! memory (and how much of it is in transparent huge pages) and bytes per tuple, permd's
//! CPU seconds until ready (less noisy than the time when comparing two builds), the share
//! of the machine's time the hypervisor stole meanwhile (`host steal %`), and the
//! peak resident memory during a forced reload (the new generation is built beside the
//! old one, then swapped in), the reload's time and how long checks made while it runs take
//! (one at a time on one connection, or on each of `BENCH_RELOAD_CHECKERS` connections, of
//! tuples sampled from the table: the median, the 99th percentile, the largest, and how
//! many; under the row, the three slowest and when each was sent, how many took over 1
//! and over 5 ms, when the load was done, and how long writes made while the reload runs
//! take to be answered by checks without a token, one write at a time: the median, the
//! 99th percentile, the largest, and how many); then the time of a compaction (the generation rebuilt from
//! memory), set off by 1,000 names churned with `--compaction-pct 1`, beside the load's,
//! its peak resident memory (both generations, and what the rebuild holds aside), and how
//! long writes made while it runs take to be visible (one at a time, each read back with
//! its write token: the median, the 99th percentile, the largest, and how many); with
//! `BENCH_COMPACTION_CHECKERS` connections checking meanwhile too, under the row, their
//! checks as the reload's are given.
//!
//! Shape: one subject per 10 tuples, 50,000 objects, 40 permission names. Names are short
//! (`user:N`, `doc:N`) unless `BENCH_NAMES=uuid`: then subjects and objects are named by
//! UUIDs (`user:` and a UUID, 41 bytes; `doc:` and a UUID, 40), as many products name their
//! users and documents, which is what sizing for them needs.
//!
//! The table holds each subject's rows together, as a fill in subject order writes them,
//! unless `BENCH_ORDER=scattered`: then the rows go in in ten passes over the subjects,
//! one row of each subject a pass, so that a subject's rows lie a tenth of the table apart,
//! as rows written over months by triggers do; or `BENCH_ORDER=grown`: each subject's
//! first five rows together (its grants at sign-up), then its other five in five passes
//! (those added over time).
//!
//! `BENCH_LOAD_TLS=1` serves TLS from the cluster and loads each size twice, side by side:
//! over plain TCP (`sslmode=disable`) and over TLS (`sslmode=require`), for what TLS costs a
//! load.
//!
//! `BENCH_SHARDS` (comma-separated, e.g. `0/1,0/4`) loads each size once per shard
//! given, side by side: the whole set, and the quarter of it one daemon of `--shard 0/4`
//! holds. The rate and bytes per tuple are then of the rows that shard loaded.
//!
//! `BENCH_RELOAD=crash` calls for the reload by a crash rather than by
//! `permd.request_reload()`: a checkpoint, then one of Postgres's backends killed, so that
//! the postmaster restarts every process and recovers (its WAL since the checkpoint
//! replayed), and permd reloads as after any crash. The writes during it begin once permd
//! has logged the reload's start (one committed between the recovery and the reload's
//! snapshot is the reload's to bring, and waits for its swap in every build), and the
//! times from the crash to the recovery and to that start are printed.
//!
//! `BENCH_STANDBY=1` has permd follow a hot standby of the cluster (started by
//! `pg_basebackup` once the table is filled, streaming), where it polls, every 100 ms
//! (`--poll-interval-ms`: a standby allows no LISTEN): the reload, the writes and the
//! sample are the primary's, the writes with `synchronous_commit = on` (the throwaway
//! cluster's WAL writer would otherwise send them to the standby every 200 ms only). Not
//! with `BENCH_RELOAD=crash` or `BENCH_LOAD_TLS`.
//!
//! `BENCH_PERMD` (comma-separated paths) runs other permd binaries instead of this build's,
//! each on the same filled table: e.g. one built from an earlier commit and this one, to
//! compare two versions side by side in one run.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{
    cluster, cluster_with_tls, env_list, env_or, free_port, read_response, runtime, HostCpu,
};
use tokio::io::{AsyncWriteExt as _, BufStream};
use tokio::net::TcpStream;

/// A field of `/proc/PID/FILE` given in KiB.
fn kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// User and system CPU seconds the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux this runs on.
    ticks as f64 / 100.0
}

/// The `took_ms` a log line of permd's gives.
fn took_ms(line: &str) -> f64 {
    line.split(" took_ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The three slowest of `times` (each how long it took and when it began, since a
/// start), slowest first, as `"12.3 ms at 1.45 s, …"`; sorts `times`.
fn three_slowest(times: &mut [(Duration, Duration)]) -> String {
    times.sort_unstable_by_key(|&(took, _)| std::cmp::Reverse(took));
    times
        .iter()
        .take(3)
        .map(|(took, at)| format!("{:.1} ms at {:.2} s", ms(*took), at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `d` in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "p50 / p99 / largest ms, count" of `times`, or "-" for none.
fn percentiles(mut times: Vec<Duration>) -> String {
    times.sort_unstable();
    let Some(largest) = times.last() else {
        return "-".to_owned();
    };
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    format!(
        "{:.2} / {:.2} / {:.2} ms, {}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(*largest),
        times.len()
    )
}

/// Grants `user:1` `perm0` on `object` and asks permd on `stream` until it answers
/// allowed: with the write's token (`at_least`; a 503 `stale` after the server's wait of
/// 1 s is asked again), or without one, again and again. Returns how long that took from
/// the commit, and when the commit was. A write Postgres refuses (recovering from a
/// crash: `BENCH_RELOAD=crash`) is made again every 10 ms, for a minute at most.
async fn write_until_visible(
    pool: &sqlx::PgPool,
    stream: &mut BufStream<TcpStream>,
    body: &mut Vec<u8>,
    object: &str,
    with_token: bool,
) -> (Duration, Instant) {
    let since = Instant::now();
    let token: String = loop {
        let written = sqlx::query_scalar(
            "INSERT INTO permd.tuples VALUES ('user:1', $1, 'perm0', NULL)
             RETURNING permd.write_token()::text",
        )
        .bind(object)
        .fetch_one(pool)
        .await;
        match written {
            Ok(token) => break token,
            Err(error) if since.elapsed() < Duration::from_secs(60) => {
                eprintln!("a write refused, made again: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("a write refused for a minute: {error}"),
        }
    };
    let committed = Instant::now();
    let at_least = if with_token {
        format!("&at_least={token}")
    } else {
        String::new()
    };
    let request = format!(
        "GET /v1/check?subject=user:1&permission=perm0&object={object}{at_least} HTTP/1.1\r\nhost: permd\r\n\r\n"
    );
    loop {
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        match read_response(stream, body).await {
            200 if common::find(body, b"\"allowed\":true").is_some() => break,
            200 => assert!(!with_token, "denied at its own token"),
            503 if with_token => {}
            other => panic!("{other}: {}", String::from_utf8_lossy(body)),
        }
    }
    (committed.elapsed(), committed)
}

/// Connections checking tuples of `sample` (allowed, each a walk of its subject's grants),
/// each one check at a time, until stopped.
struct Checkers {
    stop: Arc<AtomicBool>,
    running: Vec<tokio::task::JoinHandle<Vec<(Duration, Duration)>>>,
}

impl Checkers {
    /// `connections` of them, from `since` on (each check's send is noted against it).
    fn start(
        runtime: &tokio::runtime::Runtime,
        listen: &str,
        sample: &Arc<Vec<(String, String, String)>>,
        connections: usize,
        since: Instant,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let running = (0..connections)
            .map(|n| {
                let (listen, stop, sample) = (listen.to_owned(), Arc::clone(&stop), Arc::clone(sample));
                runtime.spawn(async move {
                    let mut stream = BufStream::new(TcpStream::connect(&listen).await.unwrap());
                    let (mut times, mut body) = (Vec::new(), Vec::new());
                    let start = n * sample.len() / connections;
                    for (subject, object, permission) in sample.iter().cycle().skip(start) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let request = format!(
                            "GET /v1/check?subject={subject}&permission={permission}&object={object} HTTP/1.1\r\nhost: permd\r\n\r\n"
                        );
                        let sent = Instant::now();
                        stream.write_all(request.as_bytes()).await.unwrap();
                        stream.flush().await.unwrap();
                        let status = read_response(&mut stream, &mut body).await;
                        times.push((sent.elapsed(), sent - since));
                        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                        assert!(common::find(&body, b"\"allowed\":true").is_some());
                    }
                    times
                })
            })
            .collect();
        Self { stop, running }
    }

    /// Stops them: the checks' percentiles and count, and a line of the three slowest
    /// (each with when it was sent) and of how many took over 1 and over 5 ms.
    fn stop(self, runtime: &tokio::runtime::Runtime) -> (String, String) {
        self.stop.store(true, Ordering::Relaxed);
        let mut checks: Vec<_> = runtime.block_on(async {
            let mut all = Vec::new();
            for checker in self.running {
                all.extend(checker.await.unwrap());
            }
            all
        });
        let slowest = three_slowest(&mut checks);
        // How many waited past a scheduler's slice or more: steadier than the largest.
        let over = |ms: u64| {
            let limit = Duration::from_millis(ms);
            checks.iter().take_while(|&&(took, _)| took > limit).count()
        };
        let slowest = format!(
            "slowest checks {}; over 1 ms {}, over 5 ms {}",
            slowest,
            over(1),
            over(5)
        );
        let checked = percentiles(checks.into_iter().map(|(took, _)| took).collect());
        (checked, slowest)
    }
}

fn main() {
    let sizes: Vec<u64> = env_list("BENCH_LOAD_SIZES", "1000000,10000000");
    let names = std::env::var("BENCH_NAMES").unwrap_or_else(|_| "short".to_owned());
    // Each id as SQL text: a number, or a UUID made from it (distinct for distinct ids).
    let id = |n: &str| match names.as_str() {
        "short" => n.to_owned(),
        "uuid" => format!("md5(({n})::text)::uuid::text"),
        other => panic!("BENCH_NAMES is short or uuid, not {other:?}"),
    };
    let (subject, object) = (id("i / 10"), id("(i * 7919) % 50000"));
    let order = std::env::var("BENCH_ORDER").unwrap_or_else(|_| "subject".to_owned());
    // The row number `i` of the `j`th row written, for a table of `size` rows.
    let row_of = |size: u64| match order.as_str() {
        "subject" => "j".to_owned(),
        "scattered" => format!("(j % ({size} / 10)) * 10 + j / ({size} / 10)"),
        // The first half of the rows: each subject's first five together; the second
        // half: its other five in five passes.
        "grown" => {
            let (half, tenth) = (size / 2, size / 10);
            format!(
                "CASE WHEN j < {half} THEN (j / 5) * 10 + j % 5 \
                 ELSE ((j - {half}) % {tenth}) * 10 + 5 + (j - {half}) / {tenth} END"
            )
        }
        other => panic!("BENCH_ORDER is subject, scattered or grown, not {other:?}"),
    };
    let tls = env_or("BENCH_LOAD_TLS", 0u8) == 1;
    let crash = match std::env::var("BENCH_RELOAD").as_deref() {
        Err(_) | Ok("request") => false,
        Ok("crash") => true,
        Ok(other) => panic!("BENCH_RELOAD is request or crash, not {other:?}"),
    };
    // Connections checking during the reload, each one check at a time.
    let checkers = env_or("BENCH_RELOAD_CHECKERS", 1usize).max(1);
    // Connections checking during the compaction too, beside its writes (none unless asked).
    let compaction_checkers = env_or("BENCH_COMPACTION_CHECKERS", 0usize);
    let standby = env_or("BENCH_STANDBY", 0u8) == 1;
    assert!(
        !(standby && (crash || tls)),
        "BENCH_STANDBY goes with neither BENCH_RELOAD=crash nor BENCH_LOAD_TLS"
    );
    let cluster = if tls { cluster_with_tls() } else { cluster() };
    let url = cluster.url("postgres");
    // Each run's URL: the cluster's, or plain and TLS side by side.
    let connections: Vec<(String, &str)> = if tls {
        vec![
            (format!("{url}?sslmode=disable"), "plain TCP"),
            (format!("{url}?sslmode=require"), "TLS"),
        ]
    } else {
        vec![(url.clone(), "")]
    };
    let shards: Vec<String> = env_list("BENCH_SHARDS", "0/1");
    let runtime = runtime();
    println!();
    let called = if crash {
        "a crash (a backend killed)"
    } else {
        "permd.request_reload()"
    };
    println!("Names: {names}. Order: {order}. The reload called for by {called}.");
    if standby {
        println!(
            "permd follows a standby of the primary the writes commit on (polling every 100 ms)."
        );
    }
    // The writes' sessions: on a standby's primary, each commit flushed and sent at once.
    let write_url = if standby {
        format!("{url}?options=-c%20synchronous_commit%3Don")
    } else {
        url.clone()
    };
    println!();
    println!("| tuples | fill Postgres | permd ready after | load (snapshot, COPY, build) | load rate | permd CPU | host steal % | resident | of it in huge pages | bytes/tuple | peak during a reload | reload | check during it (p50 / p99 / largest, checks) | compaction | peak during it | write to visible during it (p50 / p99 / largest, writes) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let binaries: Vec<String> = std::env::var("BENCH_PERMD")
        .map(|list| list.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|_| vec![env!("CARGO_BIN_EXE_permd").to_owned()]);
    for size in sizes {
        let row = row_of(size);
        let filled = runtime.block_on(async {
            let pool = permd::db::pool(&url).await.unwrap();
            permd::db::migrate(&pool).await.unwrap();
            let started = Instant::now();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET session_replication_role = replica; -- no changelog rows for the fill
                 SET maintenance_work_mem = '1GB';
                 TRUNCATE permd.tuples; TRUNCATE permd.changelog;
                 -- The key is built once at the end, from sorted rows, instead of row by
                 -- row (the rows are distinct: a subject's 10 permissions differ).
                 ALTER TABLE permd.tuples DROP CONSTRAINT tuples_pkey;
                 INSERT INTO permd.tuples (subject, object, permission)
                 SELECT 'user:' || {subject}, 'doc:' || {object}, 'perm' || (i % 40)
                 FROM (SELECT {row} AS i FROM generate_series(0::bigint, {size} - 1) j) r;
                 ALTER TABLE permd.tuples ADD CONSTRAINT tuples_pkey
                     PRIMARY KEY (subject, object, permission);
                 TRUNCATE permd.changelog;"
            )))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::raw_sql("VACUUM ANALYZE permd.tuples")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            started.elapsed()
        });
        // Started once the table is filled: its base backup holds it.
        let replica = standby.then(|| {
            permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
                unsafe_fast: true,
                standby_of: Some(cluster.port()),
                ..permd::embedded::ClusterOptions::default()
            })
            .expect("start a standby")
        });
        let mut runs = Vec::new();
        for permd in &binaries {
            for connection in &connections {
                runs.extend(shards.iter().map(|shard| (permd, connection, shard)));
            }
        }
        for (permd, (serve_url, connection), shard) in runs {
            let serve_url = match &replica {
                Some(replica) => {
                    // What the runs before deleted, replayed.
                    runtime.block_on(replayed(&url, &replica.url("postgres")));
                    replica.url("postgres")
                }
                None => serve_url.clone(),
            };
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let host = HostCpu::now();
            let started = Instant::now();
            let mut args = vec![
                "serve",
                "--database-url",
                &serve_url,
                "--listen",
                &listen,
                "--shard",
                shard,
                // A compaction as soon as 1,000 names are churned (the floor).
                "--compaction-pct",
                "1",
            ];
            if standby {
                args.extend(["--poll-interval-ms", "100"]);
            }
            let mut child = Command::new(permd)
                .args(args)
                .env("PERMD_LOG", "info")
                .env("NO_COLOR", "1")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let pid = child.id();
            let (tx, rx) = mpsc::channel();
            let stderr = child.stderr.take().unwrap();
            // Full loads begun so far (the first, then the reload's).
            let loads_begun = Arc::new(AtomicUsize::new(0));
            let begun = Arc::clone(&loads_begun);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("full load starting") {
                        begun.fetch_add(1, Ordering::SeqCst);
                    }
                    // What the load did besides: rows seen scattered, then merged, lists
                    // packed again.
                    let besides = [
                        "scattered over the table",
                        "set aside merged",
                        "packed again",
                    ];
                    if besides.iter().any(|said| line.contains(said)) {
                        eprintln!("{line}");
                    }
                    let wanted = line.contains("full load done")
                        || line.contains("full load swapped in")
                        || line.contains("compaction swapped in")
                        || line.contains("starting") && line.contains("compaction");
                    if wanted && tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
            // The next line wanted, and when it was logged.
            let wait = || rx.recv_timeout(Duration::from_secs(1800)).expect("load").1;
            let first = wait();
            assert!(wait().contains("swapped in"));
            let ready = started.elapsed();
            let cpu = cpu_seconds(pid);
            // The share of the machine the hypervisor took while permd loaded: the load's
            // time moves with it.
            let steal = HostCpu::steal_since(host);
            // The loader's own time: snapshot, COPY and build, without process start-up.
            let field = |name: &str| -> f64 {
                first
                    .split(&format!(" {name}="))
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap()
            };
            let load_ms = field("took_ms");
            // The rows this daemon holds: all of them, or its shard's.
            let rows = field("rows");
            std::thread::sleep(Duration::from_millis(500));
            let rss = kib(pid, "status", "VmRSS:") * 1024;
            // Of which in transparent huge pages (the packed grant lists, where the kernel
            // grants them).
            let huge = kib(pid, "smaps_rollup", "AnonHugePages:") * 1024;
            // Checks while the reload runs, of tuples the table holds (allowed, each a walk
            // of its subject's grants), until the new generation is swapped in.
            let sample: Vec<(String, String, String)> = runtime.block_on(async {
                let pool = permd::db::pool(&url).await.unwrap();
                let sample = sqlx::query_as(
                    "SELECT subject, object, permission FROM permd.tuples
                     TABLESAMPLE SYSTEM (1) LIMIT 1000",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                pool.close().await;
                sample
            });
            let requested = Instant::now();
            // On the monotonic clock (`Instant`'s `Debug` on Linux), to find the writes
            // and checks below in a `perf sched record -k CLOCK_MONOTONIC` trace.
            eprintln!("reload requested at {requested:?}");
            let sample = Arc::new(sample);
            let checking = Checkers::start(&runtime, &listen, &sample, checkers, requested);
            // While it runs, one write at a time, each checked without a token until it
            // is answered (a token waits for the reload's swap by design: the generation
            // answering lacks what called for the reload).
            let (reload, built, visible_reload, swapped) = runtime.block_on(async {
                let pool = permd::db::pool(&write_url).await.unwrap();
                if crash {
                    // Reset when Postgres starts after a crash, as permd tells one.
                    let reset = "SELECT coalesce(stats_reset::text, '') FROM pg_stat_archiver";
                    let before: String = sqlx::query_scalar(reset).fetch_one(&pool).await.unwrap();
                    // The WAL to replay is short: recovery is not what is measured.
                    sqlx::raw_sql("CHECKPOINT").execute(&pool).await.unwrap();
                    // The killing backend goes with the rest: its error is expected.
                    let _ = sqlx::raw_sql(
                        "DO $$ BEGIN EXECUTE format('COPY (SELECT 1) TO PROGRAM %L',
                             'kill -9 ' || (SELECT pid FROM pg_stat_activity
                                            WHERE backend_type = 'client backend'
                                              AND pid <> pg_backend_pid() LIMIT 1));
                         END $$",
                    )
                    .execute(&pool)
                    .await;
                    // The writes begin once the server has recovered: one made before the
                    // postmaster stopped every backend could commit and be lost with them.
                    let since = Instant::now();
                    loop {
                        let now = sqlx::query_scalar::<_, String>(reset)
                            .fetch_one(&pool)
                            .await;
                        if now.is_ok_and(|now| now != before) {
                            break;
                        }
                        assert!(since.elapsed() < Duration::from_secs(60), "no recovery");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let recovered = requested.elapsed();
                    // A write committed before permd's reload takes its snapshot waits for
                    // the swap whatever the build (the reload's to bring): the writes begin
                    // once it has begun, and the time before is printed.
                    while loads_begun.load(Ordering::SeqCst) < 2 {
                        assert!(since.elapsed() < Duration::from_secs(60), "no reload");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    eprintln!(
                        "recovered {:.2} s and the reload begun {:.2} s after the crash",
                        recovered.as_secs_f64(),
                        requested.elapsed().as_secs_f64()
                    );
                } else {
                    sqlx::raw_sql("SELECT permd.request_reload()")
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                let mut stream = BufStream::new(TcpStream::connect(&listen).await.unwrap());
                let (mut visible, mut body, mut done) = (Vec::new(), Vec::new(), None);
                for n in 0.. {
                    while let Ok((at, line)) = rx.try_recv() {
                        if line.contains("full load done") {
                            done = Some((line, at.duration_since(requested)));
                        } else if line.contains("swapped in") {
                            pool.close().await;
                            let (reload, built) = done.expect("the load done before its swap");
                            return (reload, built, visible, line);
                        }
                    }
                    let object = format!("during:{n}");
                    let (took, committed) =
                        write_until_visible(&pool, &mut stream, &mut body, &object, false).await;
                    visible.push((took, committed.duration_since(requested)));
                }
                unreachable!()
            });
            // The three slowest writes, each with when it was committed.
            let slowest_writes = three_slowest(&mut visible_reload.clone());
            let visible_reload = format!(
                "{}; slowest {}",
                percentiles(visible_reload.into_iter().map(|(took, _)| took).collect()),
                slowest_writes
            );
            let (checked, slowest) = checking.stop(&runtime);
            // The swap's own time (the writes made beside the load copied into its
            // generation), which the writes then wait for; absent where the reload
            // could not go beside the polls.
            let swap = swapped
                .split(" swap_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("-");
            let slowest = format!(
                "{slowest}; the load done at {:.2} s, its swap {swap} ms",
                built.as_secs_f64()
            );
            let reload_ms = took_ms(&reload);
            let peak = kib(pid, "status", "VmHWM:") * 1024;
            // The peak from here on is the compaction's: the kernel resets it to the
            // resident size now.
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
            // 1,000 names interned since the load: the floor of a compaction, which starts
            // at the first poll that finds the mirror caught up, ten times the reload's
            // time after it. (Kept, not deleted: a poll that read the insert and a delete
            // at once would intern nothing.)
            runtime.block_on(async {
                let pool = permd::db::pool(&url).await.unwrap();
                sqlx::raw_sql(
                    "INSERT INTO permd.tuples SELECT 'user:0', 'tmp:' || n, 'perm0', NULL
                     FROM generate_series(1, 1000) n",
                )
                .execute(&pool)
                .await
                .unwrap();
                pool.close().await;
            });
            // A build that compacts by a full load logs its compaction as one.
            let is_compaction =
                |line: &str, what: &str| line.contains(what) && line.contains("compaction");
            std::iter::repeat_with(wait)
                .find(|line| is_compaction(line, "starting"))
                .unwrap();
            let checking_compaction = (compaction_checkers > 0).then(|| {
                Checkers::start(
                    &runtime,
                    &listen,
                    &sample,
                    compaction_checkers,
                    Instant::now(),
                )
            });
            // While it runs, one write at a time, each read back with its token (a 503
            // `stale` after the server's wait of 1 s is asked again).
            let (compaction, visible) = runtime.block_on(async {
                let pool = permd::db::pool(&write_url).await.unwrap();
                let mut stream = BufStream::new(TcpStream::connect(&listen).await.unwrap());
                let (mut visible, mut body) = (Vec::new(), Vec::new());
                for n in 0.. {
                    if let Ok((_, line)) = rx.try_recv() {
                        if is_compaction(&line, "swapped in") {
                            pool.close().await;
                            return (line, visible);
                        }
                    }
                    let object = format!("fresh:{n}");
                    let (took, _) =
                        write_until_visible(&pool, &mut stream, &mut body, &object, true).await;
                    visible.push(took);
                }
                unreachable!()
            });
            let checked_compaction = checking_compaction.map(|c| c.stop(&runtime));
            let compaction_ms = took_ms(&compaction);
            let visible = percentiles(visible);
            let compaction_peak = kib(pid, "status", "VmHWM:") * 1024;
            let _ = child.kill();
            let _ = child.wait();
            // The next binary or shard starts from the filled table again.
            runtime.block_on(async {
                let pool = permd::db::pool(&url).await.unwrap();
                sqlx::raw_sql(
                    "DELETE FROM permd.tuples WHERE subject IN ('user:0', 'user:1')
                       AND (object LIKE 'tmp:%' OR object LIKE 'fresh:%'
                            OR object LIKE 'during:%')",
                )
                .execute(&pool)
                .await
                .unwrap();
                pool.close().await;
            });
            println!(
            "| {size} | {:.1} s | {:.2} s | {:.2} s | {:.2} M tuples/s | {cpu:.2} s | {steal} | {:.0} MiB | {:.0} MiB | {:.0} | {:.0} MiB | {:.2} s | {checked} | {:.2} s | {:.0} MiB | {visible} |",
            filled.as_secs_f64(),
            ready.as_secs_f64(),
            load_ms / 1e3,
            rows / (load_ms / 1e3) / 1e6,
            rss as f64 / 1048576.0,
            huge as f64 / 1048576.0,
            rss as f64 / rows,
            peak as f64 / 1048576.0,
            reload_ms / 1e3,
            compaction_ms / 1e3,
            compaction_peak as f64 / 1048576.0,
        );
            if binaries.len() > 1 {
                println!("|  | ({permd}) |");
            }
            println!("|  | (during the reload: {slowest}; a write to visible without a token, p50 / p99 / largest, writes: {visible_reload}) |");
            if let Some((checked, slowest)) = checked_compaction {
                println!("|  | (during the compaction, {compaction_checkers} connections checking: {checked}; {slowest}) |");
            }
            if !connection.is_empty() {
                println!("|  | ({connection}) |");
            }
            if shards.len() > 1 {
                println!("|  | (shard {shard}: {rows} rows) |");
            }
        }
        if let Some(replica) = replica {
            replica.stop();
        }
    }
    cluster.stop();
}

/// Waits until the standby at `standby` has replayed everything the primary at `primary`
/// has written so far.
async fn replayed(primary: &str, standby: &str) {
    let pool = permd::db::pool(primary).await.unwrap();
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    let pool = permd::db::pool(standby).await.unwrap();
    let since = Instant::now();
    while !sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
        .bind(&written)
        .fetch_one(&pool)
        .await
        .unwrap()
    {
        assert!(
            since.elapsed() < Duration::from_secs(600),
            "the standby replays nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pool.close().await;
}
