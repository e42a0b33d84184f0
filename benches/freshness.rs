//! Freshness: how long from a writer's COMMIT returning until permd answers the write.
//!
//! `cargo bench --bench freshness` starts a throwaway Postgres and permd (in this process,
//! so that visibility is observed on the store itself, every 20 µs), then commits
//! single-tuple transactions at a fixed rate (100 and 1,000 writes/s, over 4 connections)
//! with NOTIFY on, and with NOTIFY off (changes then arrive by polling, here every 100 ms).
//! Prints a Markdown table of p50/p99/max.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser as _;
use common::{cluster, env_or, runtime};
use permd::store::Store;
use tokio_util::sync::CancellationToken;

/// Writes `rate` single-row transactions per second for `seconds`, and returns the
/// commit-to-visible latencies.
async fn run(
    url: &str,
    store: &Store,
    rate: f64,
    seconds: f64,
    notify: bool,
    tag: &str,
) -> Vec<Duration> {
    let pending: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let pending = Arc::clone(&pending);
        let done = Arc::clone(&done);
        let store = store.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Relaxed);
                {
                    let mut list = pending.lock().unwrap();
                    list.retain(|(subject, committed)| {
                        if store.check(subject, "fresh", "") {
                            latencies.push(committed.elapsed());
                            false
                        } else {
                            true
                        }
                    });
                    if finished && list.is_empty() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            latencies
        })
    };
    let writers = 4;
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
            if !notify {
                client
                    .batch_execute("SET permd.notify = off")
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
                pending.lock().unwrap().push((subject, Instant::now()));
                n += writers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = watcher.join().unwrap();
    latencies.sort();
    latencies
}

fn main() {
    let cluster = cluster();
    let url = cluster.url("postgres");
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let runtime = runtime();
    runtime.block_on(async {
        let pool = permd::db::pool(&url).await.unwrap();
        permd::db::migrate(&pool).await.unwrap();
        pool.close().await;
        let cli = permd::config::Cli::parse_from([
            "permd",
            "serve",
            "--database-url",
            &url,
            "--listen",
            "127.0.0.1:0",
            "--poll-interval-ms",
            "100",
        ]);
        let permd::config::Command::Serve(args) = cli.command else {
            unreachable!()
        };
        let settings = args.server.settings(&args.database_url).unwrap();
        let shutdown = CancellationToken::new();
        let daemon = permd::Daemon::start(settings, shutdown.clone())
            .await
            .unwrap();
        assert!(daemon.wait_ready(Duration::from_secs(60)).await);
        let store = daemon.store().clone();

        println!();
        println!("Commit to visible in permd, {seconds} s per row, poll interval 100 ms:");
        println!();
        println!("| NOTIFY | writes/s | writes | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (notify, rate) in [
            (true, 100.0),
            (true, 1000.0),
            (false, 100.0),
            (false, 1000.0),
        ] {
            let tag = format!("{}{}", if notify { "on" } else { "off" }, rate);
            let l = run(&url, &store, rate, seconds, notify, &tag).await;
            let q = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
            println!(
                "| {} | {rate:.0} | {} | {:.2} | {:.2} | {:.2} |",
                if notify { "on" } else { "off" },
                l.len(),
                q(0.5),
                q(0.99),
                q(1.0)
            );
        }
        shutdown.cancel();
        daemon.wait().await;
    });
    cluster.stop();
}
