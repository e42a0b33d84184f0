//! Freshness: how long from a writer's COMMIT returning until permd answers the write.
//!
//! `cargo bench --bench freshness` starts a throwaway Postgres and permd (in this process,
//! so that visibility is observed on the store itself, every 20 µs), then commits
//! single-tuple transactions at a fixed rate (100 and 1,000 writes/s, over `BENCH_WRITERS`
//! connections, default 4) with NOTIFY on (the notification carries the rows), with
//! `permd.notify = doorbell` (the transaction id alone: permd polls for it at once), with
//! `permd.notify = auto` (migration 0010: as on while permd listens; past 500
//! notifications a second permd polls every `--busy-poll-ms` instead, default 2, and the
//! writers send nothing) and with NOTIFY off (changes then arrive by polling, here every
//! 100 ms).
//!
//! The rows with NOTIFY on are run again while `BENCH_READERS` (default 32, 0 to skip)
//! HTTP connections send checks to permd at `BENCH_READ_RATE` checks/s in all (default
//! 20,000, well below the 100,000 and more permd answers in `compare` on 2 cores), from a
//! thread of their own: freshness under read traffic with headroom, as a deployment runs.
//! (A closed loop would fill both cores, and then every wake-up waits for a core: p99s of
//! tens to hundreds of ms that measure the saturated host, not permd.) With
//! `BENCH_READ_BATCH=N` each of their requests is a batch of N checks (`POST /v1/check`),
//! and `BENCH_READ_RATE` counts batches: `BENCH_READERS=4 BENCH_READ_RATE=100
//! BENCH_READ_BATCH=10000` is a million checks/s in batches of the most `--max-batch`
//! allows by default.
//!
//! `BENCH_STANDBY=1` has permd follow a hot standby of the cluster instead (started by
//! `pg_basebackup`, streaming), where it polls, a standby allowing no LISTEN: the writers
//! commit on the primary, and the rows measure replication, replay and the poll (NOTIFY on
//! at 100 and 1,000 writes/s; the notifications go to the primary's listeners only).
//!
//! `BENCH_HELD=1` keeps a writing transaction open (a tuple inserted, not committed) from
//! before the first row to after the last: each write commits while an older one is still
//! open, which until session 61 held every later commit back from the poll until it
//! ended (with the doorbell or NOTIFY off, nothing arrived at all).
//!
//! `BENCH_CHANGELOG=N` first fills the changelog with N rows of transactions long applied,
//! as a day's retention keeps them (default 0, a fresh database): the poll must read the
//! changelog by its key whatever its size.
//!
//! Prints a Markdown table of p50/p99/max, with how many of the row's writes permd applied
//! from their notifications (`notified_changes` of `/v1/status`; the others came by the
//! poll) and the share of the machine's time the hypervisor stole during each row
//! (`common::HostCpu`).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, env_or, read_response, runtime, HostCpu, Watcher};
use permd::store::Store;
use tokio::io::{AsyncWriteExt as _, BufStream};
use tokio::net::TcpStream;

/// Keeps `connections` keep-alive connections to permd at `addr` checking, `rate` requests/s
/// in all (each connection its share, on a fixed schedule), until `stop`; each request a
/// single check, or with `batch` above 0 a batch of that many; from a thread and runtime of
/// their own, so that the writers' and the observer's timing is not queued behind them.
/// Returns the checks answered.
fn read_load(
    addr: SocketAddr,
    connections: u32,
    rate: f64,
    batch: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut readers = Vec::new();
            for c in 0..connections {
                let stop = Arc::clone(&stop);
                readers.push(tokio::spawn(async move {
                    let stream = TcpStream::connect(addr).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    let mut stream = BufStream::new(stream);
                    let mut body = Vec::new();
                    let mut answered = 0;
                    let every = Duration::from_secs_f64(f64::from(connections) / rate);
                    // Spread the connections' schedules over one interval.
                    let mut due = tokio::time::Instant::now() + every * c / connections;
                    let checks: Vec<String> = (0..batch)
                        .map(|i| format!(r#"{{"subject":"reader:{c}:{i}","permission":"fresh"}}"#))
                        .collect();
                    let batch_body = format!(r#"{{"checks":[{}]}}"#, checks.join(","));
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep_until(due).await;
                        due += every;
                        let request = if batch > 0 {
                            format!(
                                "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{batch_body}",
                                batch_body.len()
                            )
                        } else {
                            format!(
                                "GET /v1/check?subject=reader:{c}:{}&permission=fresh HTTP/1.1\r\nhost: permd\r\n\r\n",
                                answered % 1000
                            )
                        };
                        stream.write_all(request.as_bytes()).await.unwrap();
                        stream.flush().await.unwrap();
                        let status = read_response(&mut stream, &mut body).await;
                        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                        answered += batch.max(1);
                    }
                    answered
                }));
            }
            let mut answered = 0;
            for r in readers {
                answered += r.await.unwrap();
            }
            answered
        })
    })
}

/// Writes `rate` single-row transactions per second for `seconds`, and returns the
/// commit-to-visible latencies.
async fn run(
    url: &str,
    store: &Store,
    rate: f64,
    seconds: f64,
    notify: &'static str,
    tag: &str,
    synchronous: bool,
) -> Vec<Duration> {
    let watcher = Watcher::start(store);
    let pending = watcher.pending();
    let writers: u64 = env_or("BENCH_WRITERS", 4);
    let total = (rate * seconds) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_owned();
        let pending = Arc::clone(&pending);
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            if notify != "on" {
                client
                    .batch_execute(&format!("SET permd.notify = {notify}"))
                    .await
                    .unwrap();
            }
            // The cluster runs with synchronous_commit off (throwaway speed), where the WAL
            // writer flushes commits every 200 ms, and a standby receives only flushed WAL:
            // a standby's rows would measure that delay, not a production primary's.
            if synchronous {
                client
                    .batch_execute("SET synchronous_commit = on")
                    .await
                    .unwrap();
            }
            let insert = client
                .prepare("INSERT INTO permd.tuples VALUES ($1, '', 'fresh', NULL)")
                .await
                .unwrap();
            let mut n = w;
            while n < total {
                let due = started + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let subject = format!("{tag}:{n}");
                client.execute(&insert, &[&subject]).await.unwrap();
                pending.push(subject, Instant::now());
                n += writers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    watcher.finish().0
}

fn main() {
    let readers: u32 = env_or("BENCH_READERS", 32);
    let read_rate: f64 = env_or("BENCH_READ_RATE", 20_000.0);
    let read_batch: u64 = env_or("BENCH_READ_BATCH", 0);
    assert!(
        readers == 0 || read_rate > 0.0,
        "BENCH_READ_RATE must be above 0 while BENCH_READERS is"
    );
    let cluster = cluster();
    let url = cluster.url("postgres");
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let retained: u64 = env_or("BENCH_CHANGELOG", 0);
    let runtime = runtime();
    runtime.block_on(async {
        let pool = permd::db::pool(&url).await.unwrap();
        permd::db::migrate(&pool).await.unwrap();
        if retained > 0 {
            // A day's changelog, as `permd.prune_changelog('1 day')` keeps it: rows of
            // transactions long applied (xid 3, below every cursor), analyzed.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO permd.changelog (xid, kind, subject, object)
                 SELECT '3', 't', 'user:' || i, 'doc:' || (i % 1000)
                 FROM generate_series(1, {retained}) i;
                 ANALYZE permd.changelog;"
            )))
            .execute(&pool)
            .await
            .unwrap();
        }
        pool.close().await;
        // Started after the migration, which its base backup then holds.
        let standby = (env_or("BENCH_STANDBY", 0u8) == 1).then(|| {
            permd::embedded::Cluster::start(&permd::embedded::ClusterOptions {
                unsafe_fast: true,
                standby_of: Some(cluster.port()),
                ..permd::embedded::ClusterOptions::default()
            })
            .expect("start a standby")
        });
        let serve_url = standby
            .as_ref()
            .map_or_else(|| url.clone(), |standby| standby.url("postgres"));
        let (daemon, shutdown) = common::daemon_in_process(&serve_url, 100).await;
        let store = daemon.store().clone();
        // A writing transaction left open for the whole run (`BENCH_HELD=1`).
        let held_pool = permd::db::pool(&url).await.unwrap();
        let held = if env_or("BENCH_HELD", 0u8) == 1 {
            let mut tx = held_pool.begin().await.unwrap();
            sqlx::query("INSERT INTO permd.tuples VALUES ('held', 'doc', 'read', NULL)")
                .execute(&mut *tx)
                .await
                .unwrap();
            println!();
            println!("A writing transaction is held open for the whole run.");
            Some(tx)
        } else {
            None
        };

        // NOTIFY on (the notification carries the rows), doorbell (the transaction id
        // alone: permd polls for it at once), auto (as on below 500 writes/s; busy polls
        // above) and off (the poll interval).
        let mut rows = vec![
            ("on", 100.0, 0),
            ("on", 1000.0, 0),
            ("doorbell", 100.0, 0),
            ("doorbell", 1000.0, 0),
            ("auto", 100.0, 0),
            ("auto", 1000.0, 0),
            ("off", 100.0, 0),
            ("off", 1000.0, 0),
        ];
        if standby.is_some() {
            rows.truncate(2);
            println!();
            println!("permd follows a standby of the primary the writers commit on (by polling).");
        } else if readers > 0 {
            rows.extend([("on", 100.0, readers), ("on", 1000.0, readers)]);
        }

        println!();
        let requests = match read_batch {
            0 => "single checks".to_owned(),
            n => format!("batches of {n} checks"),
        };
        println!(
            "Commit to visible in permd, {seconds} s per row, poll interval 100 ms, \
             {retained} changelog rows retained from before; HTTP readers send {requests}:"
        );
        println!();
        println!(
            "| NOTIFY | writes/s | HTTP readers | checks/s | writes | from notifications | p50 ms | p99 ms | max ms | host steal % |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (notify, rate, readers) in rows {
            let tag = format!("{notify}{rate}r{readers}");
            let stop = Arc::new(AtomicBool::new(false));
            let load = (readers > 0)
                .then(|| {
                    let stop = Arc::clone(&stop);
                    read_load(daemon.local_addr().expect("a TCP address"), readers, read_rate, read_batch, stop)
                });
            let started = Instant::now();
            let host = HostCpu::now();
            let notified = daemon.status().report().notified_changes;
            let l = run(&url, &store, rate, seconds, notify, &tag, standby.is_some()).await;
            let steal = HostCpu::steal_since(host);
            let notified = daemon.status().report().notified_changes - notified;
            stop.store(true, Ordering::Relaxed);
            let answered = load.map_or(0, |load| load.join().unwrap());
            let checks = answered as f64 / started.elapsed().as_secs_f64();
            let q = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
            println!(
                "| {notify} | {rate:.0} | {readers} | {checks:.0} | {} | {notified} | {:.2} | {:.2} | {:.2} | {steal} |",
                l.len(),
                q(0.5),
                q(0.99),
                q(1.0)
            );
        }
        if let Some(held) = held {
            held.rollback().await.unwrap();
        }
        held_pool.close().await;
        shutdown.cancel();
        daemon.wait().await.expect("the daemon ran to its shutdown");
        if let Some(standby) = standby {
            standby.stop();
        }
    });
    cluster.stop();
}
