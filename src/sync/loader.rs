//! The full load: one REPEATABLE READ snapshot, binary COPY of tuples and limits, taken off
//! the socket by the connection's tap (`tap.rs`), and a new `State` built on a thread of
//! its own while the rows stream in (at a lower priority when it is a reload beside
//! checks: `RELOAD_NICENESS`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{pin_mut, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, IsolationLevel};

use super::copy::{bytes, int8, not_utf8, text, timestamptz, CopyParser};
use super::tap::Tap;
use super::{parse_snapshot, parse_xid, Cursor, Error};
use crate::shard::Shard;
use crate::store::{Snapshot, State, StateBuilder};

/// Postgres's estimate of `permd.tuples`'s rows, for the load's progress: of the tables
/// that inherit from it too, a partitioned table's partitions or a table's children. A
/// parent table's own estimate counts its own rows; a partitioned table holds none, and
/// its estimate, none until it is analyzed by hand, then counts its partitions' rows.
macro_rules! rows_estimate_sql {
    () => {
        "(WITH RECURSIVE tree AS (\
            SELECT 'permd.tuples'::regclass::oid AS oid \
            UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid) \
         SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_class c JOIN tree USING (oid) \
         WHERE c.relkind <> 'p')"
    };
}

/// The bare columns: `expires_at` travels as Postgres' own binary timestamp (microseconds
/// since 2000-01-01) and is converted here, which costs Postgres less than any expression.
/// A query rather than the table, as the poll and `permd.digest()` read it: `COPY
/// permd.tuples TO` copies the table's own rows alone, without those of a table that
/// inherits from it, and refuses a partitioned one (tried: the same time for a million
/// rows within the spread of ten alternations, benches/README.md, "Full load").
const TUPLES: &str = "COPY (SELECT subject, object, permission, expires_at FROM permd.tuples) \
                      TO STDOUT (FORMAT binary)";
const LIMITS: &str =
    "COPY (SELECT subject, name, value FROM permd.limits) TO STDOUT (FORMAT binary)";

/// A progress line every this many rows.
const PROGRESS_EVERY: u64 = 1_000_000;

/// What a load knows as soon as its snapshot is taken, before its rows: what a reload
/// beside the polls needs to tell the changes it holds from those it does not.
#[derive(Debug, Clone)]
pub(crate) struct Begun {
    pub(crate) snapshot: Snapshot,
    /// The changelog's pruning mark in the snapshot (`Loaded::mark`).
    pub(crate) mark: Cursor,
    /// permd's tables as the load found them (`Loaded::tables`).
    pub(crate) tables: String,
}

/// A freshly loaded generation and the snapshot it reflects.
pub(crate) struct Loaded {
    pub(crate) state: State,
    /// The load's snapshot: exactly the transactions in `state` (every one below its
    /// xmin, and some later ones).
    pub(crate) snapshot: Snapshot,
    pub(crate) rows: u64,
    /// The changelog's pruning mark in the load's snapshot: what it records was deleted
    /// before the load, whose state holds those changes.
    pub(crate) mark: Cursor,
    /// permd's tables as the load found them (`permd_tables_sql`).
    pub(crate) tables: String,
}

/// Loads everything in one snapshot, which is where the changelog's reading starts
/// (`Position::at`). `begun`, if any, is sent the snapshot, the pruning mark and the
/// tables as soon as the snapshot is taken (a reload beside the applier's polls: `applier::Reloading`).
///
/// A load takes as long as the data does, so no statement of it has a deadline; instead
/// it fails with [`Error::Stalled`] once nothing arrived from Postgres for `stall` (a hung
/// server, a network that drops every packet), where it would otherwise wait for TCP
/// keepalives to give up, minutes with the kernel's defaults. The builder's own work after
/// the last row is not watched: that is CPU, not Postgres.
pub(crate) async fn load(
    client: &mut Client,
    tap: &Tap,
    shard: Shard,
    stall: Duration,
    beside_checks: bool,
    begun: Option<oneshot::Sender<Begun>>,
) -> Result<Loaded, Error> {
    let started = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let begin = async move {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The first statement fixes the snapshot of the whole transaction.
        let row = tx
            .query_one(
                concat!(
                    "SELECT pg_current_snapshot()::text, ",
                    rows_estimate_sql!(),
                    ", coalesce(r.pruned_xid::text, '0'), coalesce(r.pruned_id, 0), ",
                    crate::permd_tables_sql!(),
                    " FROM (SELECT) one LEFT JOIN permd.retention r ON true LIMIT 1"
                ),
                &[],
            )
            .await?;
        // The sync connection keeps the planner off sequential scans (the poll's plan must
        // not depend on how small a table was when it was made); a full load reads whole
        // tables, where they are the right plan.
        tx.batch_execute("SET LOCAL enable_seqscan = on").await?;
        Ok::<_, tokio_postgres::Error>((tx, row))
    };
    let (tx, row) = watched(begin, &progress, stall).await?;
    let snapshot = parse_snapshot(row.get::<_, &str>(0))?;
    let mark = Cursor {
        xid: parse_xid(row.get::<_, &str>(2))?,
        id: row.get(3),
    };
    let tables: String = row.get(4);
    if let Some(begun) = begun {
        let _ = begun.send(Begun {
            snapshot: snapshot.clone(),
            mark,
            tables: tables.clone(),
        });
    }
    let estimate = usize::try_from(row.get::<_, i64>(1) / i64::from(shard.count())).unwrap_or(0);

    // The tap on the connection's socket takes each COPY's rows off the wire and sends
    // them here in blocks; eight blocks (2 MiB) in flight let Postgres run ahead.
    let (tuples, tuple_blocks) = mpsc::channel(8);
    let (limits, limit_blocks) = mpsc::channel(8);
    let (built, builder) = oneshot::channel();
    std::thread::Builder::new()
        .name("permd-load".to_owned())
        .spawn({
            let progress = Arc::clone(&progress);
            move || {
                if beside_checks {
                    lower_priority();
                }
                let _ = built.send(build(
                    tuple_blocks,
                    limit_blocks,
                    shard,
                    estimate,
                    &progress,
                ));
            }
        })
        .map_err(|e| Error::Builder(format!("could not start the load's thread: {e}")))?;
    // A failed COPY explains more than the builder's truncated stream: return it first.
    // The builder then ends on its own, when the tap has dropped the senders.
    let copies = async {
        copy(&tx, tap, TUPLES, tuples).await?;
        copy(&tx, tap, LIMITS, limits).await
    };
    watched(copies, &progress, stall).await?;
    let (state, rows) = builder
        .await
        .map_err(|_| Error::Builder("the load's thread panicked".into()))??;
    watched(tx.commit(), &progress, stall).await?;
    tracing::info!(
        rows,
        subjects = state.subject_count(),
        packed_grants_mib = state.packed_bytes() >> 20,
        snapshot_xmin = snapshot.xmin(),
        shard = %shard,
        took_ms = started.elapsed().as_millis() as u64,
        "full load done"
    );
    Ok(Loaded {
        state,
        snapshot,
        rows,
        mark,
        tables,
    })
}

/// Runs `work`, one step of a load, until it ends or `progress` (blocks of rows received)
/// has not moved for `stall`: four looks, a quarter of it apart, that all found it still.
/// Counted in looks, not by the clock alone: a process frozen as a whole for longer than
/// `stall` (a paused VM, SIGSTOP, heavy swapping) would otherwise take the time it lost
/// for a silent Postgres at its first look after it thawed, and load again from nothing.
async fn watched<T, E>(
    work: impl Future<Output = Result<T, E>>,
    progress: &AtomicU64,
    stall: Duration,
) -> Result<T, Error>
where
    Error: From<E>,
{
    let watchdog = async {
        let mut seen = progress.load(Ordering::Relaxed);
        let mut still = 0;
        loop {
            tokio::time::sleep(stall / 4).await;
            let now = progress.load(Ordering::Relaxed);
            if now != seen {
                (seen, still) = (now, 0);
            } else {
                still += 1;
                if still >= 4 {
                    return;
                }
            }
        }
    };
    tokio::select! {
        result = work => result.map_err(Error::from),
        () = watchdog => Err(Error::Stalled(stall)),
    }
}

/// Runs one COPY with the tap armed: its data goes to `sink`, and tokio-postgres, which
/// still runs the statement, sees none.
async fn copy(
    tx: &tokio_postgres::Transaction<'_>,
    tap: &Tap,
    query: &str,
    sink: mpsc::Sender<Vec<u8>>,
) -> Result<(), Error> {
    tap.arm(sink);
    let copied = async {
        let stream = tx.copy_out(query).await?;
        pin_mut!(stream);
        match stream.next().await {
            None => Ok(()),
            Some(Err(e)) => Err(Error::Postgres(e)),
            Some(Ok(_)) => Err(Error::Protocol("COPY data went past the tap".into())),
        }
    }
    .await;
    // Only a COPY that failed before it started leaves the sink in the tap.
    tap.disarm();
    copied
}

/// How much lower a reload's builder runs than the threads answering checks beside it:
/// this much is added to its thread's nice value (the arena's thread it starts inherits
/// it). At the same priority a runtime worker woken for a check could wait runnable for 7
/// to 17 ms while the builder and a local Postgres's backend held both cores; at +5 a
/// reload of 10M tuples beside one connection checking made a quarter as many checks
/// over 1 ms and took 14 % longer, beside 32 connections it made two fifths as many over
/// 5 ms and took 9 % longer (+10 made it 1.8x as long there; benches/README.md, "Full
/// load"). A reload holds changes back until its swap, so its length is freshness.
/// The first load, with no checks to answer, runs at the process's priority.
const RELOAD_NICENESS: i32 = 5;

/// Lowers the calling thread's priority by `RELOAD_NICENESS` (on Linux a nice value is a
/// thread's own), to 19 at most. It cannot be raised again without privileges, so the
/// thread must be one of the load's own. A failure costs only checks' latency during the
/// reload: logged.
fn lower_priority() {
    let thread = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(thread)).and_then(|nice| {
        rustix::process::setpriority_process(Some(thread), (nice + RELOAD_NICENESS).min(19))
    });
    if let Err(error) = lowered {
        tracing::warn!(%error, "could not lower the reload's priority; it competes with checks");
    }
}

/// Runs on a thread of its own: parses the COPY blocks, tuples then limits, and fills a
/// `StateBuilder` with the rows of `shard`'s subjects, counting each block in `progress`.
///
/// A shard's rows are picked out here, not by Postgres: its `md5()` took 0.4 us a row of
/// its CPU, which made the load of one shard of four (2.5M of 10M rows) take 1.8x as long
/// as the load of them all, where here a subject is hashed once per run of its rows
/// (benches/README.md, "load"). The whole tables cross the network to every shard.
fn build(
    mut tuple_blocks: mpsc::Receiver<Vec<u8>>,
    mut limit_blocks: mpsc::Receiver<Vec<u8>>,
    shard: Shard,
    estimate: usize,
    progress: &AtomicU64,
) -> Result<(State, u64), Error> {
    let mut builder = StateBuilder::for_full_load();
    let mut owned = shard.runs();
    let mut parser = CopyParser::new();
    let mut rows = 0u64;
    let mut next_progress = PROGRESS_EVERY;
    while let Some(block) = tuple_blocks.blocking_recv() {
        progress.fetch_add(1, Ordering::Relaxed);
        parser.feed(&block, |f| {
            let subject = text(f[0], "subject")?;
            if !owned.owns(subject) {
                return Ok(());
            }
            builder
                .copied_tuple(
                    subject,
                    bytes(f[1], "object")?,
                    bytes(f[2], "permission")?,
                    timestamptz(f[3], "expires_at")?,
                )
                .map_err(not_utf8)?;
            rows += 1;
            Ok(())
        })?;
        if rows >= next_progress {
            // Postgres's row estimate is 0 until the table was first analyzed: then say
            // nothing rather than "of 0".
            if estimate > 0 {
                tracing::info!(rows, of_about = estimate, "loading");
            } else {
                tracing::info!(rows, "loading");
            }
            next_progress = rows + PROGRESS_EVERY;
        }
    }
    parser.finish()?;
    let mut parser = CopyParser::new();
    while let Some(block) = limit_blocks.blocking_recv() {
        progress.fetch_add(1, Ordering::Relaxed);
        parser.feed(&block, |f| {
            let value =
                int8(f[2], "value")?.ok_or_else(|| Error::Copy("limit value is NULL".into()))?;
            let subject = text(f[0], "subject")?;
            if owned.owns(subject) {
                builder.limit(subject, text(f[1], "name")?, value);
            }
            rows += 1;
            Ok(())
        })?;
    }
    parser.finish()?;
    Ok((builder.finish(), rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(8);

    /// A thread's nice value, as the kernel holds it.
    fn nice_of(thread: rustix::process::Pid) -> i32 {
        rustix::process::getpriority_process(Some(thread)).expect("getpriority")
    }

    #[test]
    fn a_reload_lowers_its_own_thread_alone_and_never_past_19() {
        let caller = nice_of(rustix::thread::gettid());
        let (before, after) = std::thread::spawn(|| {
            let thread = rustix::thread::gettid();
            let before = nice_of(thread);
            lower_priority();
            (before, nice_of(thread))
        })
        .join()
        .expect("the thread");
        assert_eq!(after, (before + RELOAD_NICENESS).min(19));
        assert!(after > before || before == 19, "{before} -> {after}");
        assert_eq!(nice_of(rustix::thread::gettid()), caller);
        let lowest = std::thread::spawn(|| {
            let thread = rustix::thread::gettid();
            rustix::process::setpriority_process(Some(thread), 17).expect("setpriority");
            lower_priority();
            nice_of(thread)
        })
        .join()
        .expect("the thread");
        assert_eq!(lowest, 19);
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_that_receives_nothing_for_the_stall_time_is_stalled() {
        let progress = AtomicU64::new(0);
        let started = tokio::time::Instant::now();
        let work = std::future::pending::<Result<(), Error>>();
        let result = watched(work, &progress, STALL).await;
        assert!(matches!(result, Err(Error::Stalled(_))), "{result:?}");
        assert!(started.elapsed() >= STALL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_frozen_with_its_process_goes_on_once_thawed() {
        let progress = AtomicU64::new(0);
        let work = async {
            // Let the watchdog start, then lose twice the stall time at once, as a
            // process stopped as a whole does; then rows arrive again.
            tokio::task::yield_now().await;
            tokio::time::advance(2 * STALL).await;
            for _ in 0..8 {
                tokio::time::sleep(STALL / 8).await;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Error>(())
        };
        let result = watched(work, &progress, STALL).await;
        assert!(result.is_ok(), "{result:?}");
    }
}
