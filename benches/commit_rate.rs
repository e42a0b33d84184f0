//! What permd's changelog costs the writers, and whether permd keeps up with them.
//!
//! `cargo bench --bench commit_rate` starts a throwaway Postgres and permd (in this process,
//! as `freshness` does, polling every `BENCH_POLL_MS`, default 100 ms), then has `W`
//! writers (`BENCH_WRITERS`, default `1,4,16`; one connection each) commit transactions of
//! one `INSERT` of `BENCH_ROWS` tuples (default 1) as fast as they can (a closed loop of
//! autocommitted statements) for `BENCH_SECONDS` (default 5) a row, into:
//! - `bare`: a table made `LIKE permd.tuples INCLUDING ALL` (its columns, checks and
//!   primary key), without permd's triggers: what the same writes cost without permd;
//! - `permd.tuples` with `permd.notify` `off` (the changelog's rows alone: permd polls),
//!   `doorbell` (a notification of the transaction's id), `on` (the default: the
//!   notification carries the rows) and `auto` (migration 0010: as `on` while permd
//!   listens; when the notifications come faster than 500 a second permd polls every
//!   `--busy-poll-ms` instead, `PERMD_BUSY_POLL_MS`, default 2, and they send nothing).
//!   `BENCH_NOTIFY` picks some (default `off,doorbell,on,auto`); `bare` always runs.
//!
//! Each on two servers in turn (`BENCH_DURABILITY`, default `durable,throwaway`): `durable`,
//! a cluster with Postgres's defaults (`fsync`, `synchronous_commit` and
//! `full_page_writes` on: a commit returns once its WAL is on disk), and `throwaway`, the
//! other suites' (all three off). A transaction that notifies holds a cluster-wide lock from
//! its commit's start until the commit is done (Postgres's `PreCommit_Notify`: so that
//! notifications queue in commit order), so notifying commits cannot share a WAL flush, as
//! concurrent commits otherwise do (group commit); the `durable` rows show what that costs.
//!
//! For each row: the commits made, how many a second in all (and tuples a second) and
//! against `bare` with as many writers, the commit's round trip (p50, p99), how long after its COMMIT returned
//! permd answered a write (every 64th of each writer's, and its last: p50, p99), how long
//! after the row's last commit permd held every write (`caught up`), how many writes
//! permd applied from their notifications (the others came by a poll), and the share of
//! the machine the hypervisor stole. The thread that watches the store for the writes
//! (`common::Watcher`, as `freshness`'s) runs in every row, the bare one's too, and
//! sleeps while no write waits to be seen.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_list, env_or, runtime, HostCpu, Watcher};
use permd::embedded::{Cluster, ClusterOptions};
use permd::store::Store;

/// Where a row's writers write, and how.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// A copy of `permd.tuples` without permd's triggers.
    Bare,
    /// `permd.tuples`, with `permd.notify` set to this.
    Tuples(&'static str),
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Tuples(notify) => notify,
        }
    }
}

/// What every row of a server does.
#[derive(Clone, Copy)]
struct Each {
    /// How long its writers write.
    seconds: f64,
    /// Whether its commits wait for their WAL's flush (`synchronous_commit`).
    durable: bool,
    /// Tuples a transaction.
    rows: usize,
}

/// What a row measured.
struct Row {
    commits: usize,
    seconds: f64,
    /// Each commit's round trip, sorted.
    round_trips: Vec<Duration>,
    /// From a sampled write's COMMIT returning until permd answered it, sorted.
    visible: Vec<Duration>,
    /// From the row's last COMMIT returning until permd held every sampled write.
    caught_up: Option<Duration>,
}

/// Which of a writer's writes are followed into permd (and its last).
const SAMPLE_EVERY: u64 = 64;

/// `writers` connections committing transactions of `each.rows` tuples into `target` as
/// fast as they can for `each.seconds`, each tuple's subject tagged `tag`; permd's `store`
/// watched for the sampled ones.
async fn run(
    url: &str,
    store: &Store,
    target: Target,
    writers: u64,
    each: &Each,
    tag: &str,
) -> Row {
    let Each {
        seconds,
        durable,
        rows,
    } = *each;
    // In every row, the bare one's too, so that each row's writers share the cores with
    // it alike (it sleeps while no write waits to be seen).
    let watcher = Watcher::start(store);
    let pending = watcher.pending();
    let (table, notify) = match target {
        Target::Bare => ("bench.bare", "off"),
        Target::Tuples(notify) => ("permd.tuples", notify),
    };
    let synchronous = if durable { "on" } else { "off" };
    // Every writer connected and prepared before the clock starts.
    let mut clients = Vec::new();
    for _ in 0..writers {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "SET permd.notify = {notify}; SET synchronous_commit = {synchronous}"
            ))
            .await
            .unwrap();
        // One tuple as a plain `VALUES`, the statement the first tables in benches/README
        // were measured with; more as one `unnest` of an array.
        let insert = client
            .prepare(&if rows == 1 {
                format!("INSERT INTO {table} VALUES ($1, '', 'fresh', NULL)")
            } else {
                format!("INSERT INTO {table} SELECT s, '', 'fresh', NULL FROM unnest($1::text[]) s")
            })
            .await
            .unwrap();
        clients.push((client, insert));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    // permd never sees the bare table's writes.
    let sampled = target != Target::Bare;
    let mut tasks = Vec::new();
    for (w, (client, insert)) in clients.into_iter().enumerate() {
        let pending = Arc::clone(&pending);
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut round_trips = Vec::new();
            let mut n = 0u64;
            let mut last = Instant::now();
            while last < deadline {
                // The first subject stands for the statement's: permd applies a statement's
                // rows at once.
                let subjects: Vec<String> =
                    (0..rows).map(|r| format!("{tag}:{w}:{n}:{r}")).collect();
                let sent = Instant::now();
                if rows == 1 {
                    client.execute(&insert, &[&subjects[0]]).await.unwrap();
                } else {
                    client.execute(&insert, &[&subjects]).await.unwrap();
                }
                let subject = subjects.into_iter().next().expect("a row at least");
                last = Instant::now();
                round_trips.push(last - sent);
                if sampled && (n.is_multiple_of(SAMPLE_EVERY) || last >= deadline) {
                    pending.push(subject, last);
                }
                n += 1;
            }
            (round_trips, last)
        }));
    }
    let mut round_trips = Vec::new();
    let mut last_commit = started;
    for task in tasks {
        let (trips, last) = task.await.unwrap();
        round_trips.extend(trips);
        last_commit = last_commit.max(last);
    }
    let seconds = last_commit.duration_since(started).as_secs_f64();
    let (visible, last_seen) = watcher.finish();
    let caught_up = sampled.then(|| last_seen.saturating_duration_since(last_commit));
    round_trips.sort_unstable();
    Row {
        commits: round_trips.len(),
        seconds,
        round_trips,
        visible,
        caught_up,
    }
}

/// The `p`-quantile of sorted `values`, in milliseconds, as a table cell.
fn ms(values: &[Duration], p: f64) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let i = ((values.len() - 1) as f64 * p).round() as usize;
    format!("{:.2}", values[i].as_secs_f64() * 1e3)
}

fn main() {
    let writer_counts: Vec<u64> = env_list("BENCH_WRITERS", "1,4,16");
    let durabilities: Vec<String> = env_list("BENCH_DURABILITY", "durable,throwaway");
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let poll_ms: u64 = env_or("BENCH_POLL_MS", 100);
    let rows: usize = env_or("BENCH_ROWS", 1);
    assert!(rows > 0, "BENCH_ROWS must be 1 or more");
    let mut targets = vec![Target::Bare];
    for notify in env_list::<String>("BENCH_NOTIFY", "off,doorbell,on,auto") {
        targets.push(Target::Tuples(match notify.as_str() {
            "off" => "off",
            "doorbell" => "doorbell",
            "on" => "on",
            "auto" => "auto",
            other => panic!("BENCH_NOTIFY: {other:?} is not off, doorbell, on or auto"),
        }));
    }
    let busy_ms = std::env::var("PERMD_BUSY_POLL_MS").unwrap_or_else(|_| "2".into());
    let runtime = runtime();
    for durability in &durabilities {
        let durable = match durability.as_str() {
            "durable" => true,
            "throwaway" => false,
            other => panic!("BENCH_DURABILITY: {other:?} is neither durable nor throwaway"),
        };
        let cluster = Cluster::start(&ClusterOptions {
            unsafe_fast: !durable,
            ..ClusterOptions::default()
        })
        .expect("start a throwaway Postgres");
        let url = cluster.url("postgres");
        let each = Each {
            seconds,
            durable,
            rows,
        };
        runtime.block_on(async {
            let pool = permd::db::pool(&url).await.unwrap();
            permd::db::migrate(&pool).await.unwrap();
            sqlx::raw_sql(
                "CREATE SCHEMA bench;
                 CREATE TABLE bench.bare (LIKE permd.tuples INCLUDING ALL);",
            )
            .execute(&pool)
            .await
            .unwrap();
            let server: (String, String, String) = sqlx::query_as(
                "SELECT current_setting('server_version'), current_setting('fsync'),
                        current_setting('full_page_writes')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            pool.close().await;
            let (daemon, shutdown) = common::daemon_in_process(&url, poll_ms).await;
            let store = daemon.store().clone();

            println!();
            println!(
                "Commits of {rows} tuple(s) each as fast as the writers go, {durability} \
                 server (Postgres {}, fsync {}, full_page_writes {}, synchronous_commit {}), \
                 {seconds} s a row, permd polling every {poll_ms} ms (busy: every {busy_ms} \
                 ms):",
                server.0,
                server.1,
                server.2,
                if durable { "on" } else { "off" }
            );
            println!();
            println!(
                "| writers | table, NOTIFY | commits | commits/s | tuples/s | against bare | commit p50 ms | commit p99 ms | visible p50 ms | visible p99 ms | caught up ms | from notifications | host steal % |"
            );
            println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for &writers in &writer_counts {
                let mut bare_rate = None;
                for &target in &targets {
                    let tag = format!("{durability}{writers}{}", target.name());
                    let host = HostCpu::now();
                    let notified = daemon.status().report().notified_changes;
                    let row = run(&url, &store, target, writers, &each, &tag).await;
                    let steal = HostCpu::steal_since(host);
                    let notified = daemon.status().report().notified_changes - notified;
                    let rate = row.commits as f64 / row.seconds;
                    let against = match bare_rate {
                        None => {
                            bare_rate = Some(rate);
                            "1.00x".to_owned()
                        }
                        Some(bare) => format!("{:.2}x", rate / bare),
                    };
                    let table = match target {
                        Target::Bare => "bare (no triggers)".to_owned(),
                        Target::Tuples(notify) => format!("permd.tuples, {notify}"),
                    };
                    let caught_up = row.caught_up.map_or("-".to_owned(), |d| {
                        format!("{:.1}", d.as_secs_f64() * 1e3)
                    });
                    let notified = if target == Target::Bare {
                        "-".to_owned()
                    } else {
                        notified.to_string()
                    };
                    println!(
                        "| {writers} | {table} | {} | {rate:.0} | {:.0} | {against} | {} | {} | {} | {} | {caught_up} | {notified} | {steal} |",
                        row.commits,
                        rate * rows as f64,
                        ms(&row.round_trips, 0.5),
                        ms(&row.round_trips, 0.99),
                        ms(&row.visible, 0.5),
                        ms(&row.visible, 0.99),
                    );
                }
            }
            shutdown.cancel();
            daemon.wait().await.expect("the daemon ran to its shutdown");
        });
        cluster.stop();
    }
}
