//! The full load: one REPEATABLE READ snapshot, binary COPY of tuples and limits, and a
//! new `State` built on a blocking thread while the rows stream in.

use std::time::Instant;

use futures_util::{pin_mut, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{Client, IsolationLevel};

use super::copy::{int8, text, timestamptz, CopyParser};
use super::{parse_xid, Error};
use crate::store::{State, StateBuilder, Xid};

/// The bare columns: `expires_at` travels as Postgres' own binary timestamp (microseconds
/// since 2000-01-01) and is converted here, which costs Postgres less than any expression.
const TUPLES: &str = "COPY permd.tuples (subject, object, permission, expires_at) \
                      TO STDOUT (FORMAT binary)";
const LIMITS: &str =
    "COPY (SELECT subject, name, value FROM permd.limits) TO STDOUT (FORMAT binary)";

/// COPY data travels to the builder in blocks of about this many bytes. The chunks are
/// copied into the block, not kept: a kept chunk pins the connection's read buffer, which
/// then has to be reallocated and copied for the next read.
const BLOCK_BYTES: usize = 256 * 1024;
/// A progress line every this many rows.
const PROGRESS_EVERY: u64 = 1_000_000;

#[derive(Clone, Copy)]
enum Table {
    Tuples,
    Limits,
}

/// A freshly loaded generation and the snapshot it reflects.
pub(crate) struct Loaded {
    pub(crate) state: State,
    /// Every transaction below this xid is in `state`; later ones may be too.
    pub(crate) xmin: Xid,
    pub(crate) rows: u64,
}

/// Loads everything in one snapshot. The returned `xmin` is where the changelog cursor
/// starts: replaying from there re-applies some changes already in the snapshot, which
/// is harmless because replay re-reads current rows.
pub(crate) async fn load(client: &mut Client) -> Result<Loaded, Error> {
    let started = Instant::now();
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // The first statement fixes the snapshot of the whole transaction.
    let row = tx
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, \
                    (SELECT greatest(reltuples, 0)::bigint FROM pg_class \
                     WHERE oid = 'permd.tuples'::regclass)",
            &[],
        )
        .await?;
    let xmin = Xid(parse_xid(row.get::<_, &str>(0))?);
    let estimate = usize::try_from(row.get::<_, i64>(1)).unwrap_or(0);

    let (sender, receiver) = mpsc::channel::<(Table, Vec<u8>)>(8);
    let builder = tokio::task::spawn_blocking(move || build(receiver, estimate));
    let streamed = async {
        stream(&tx, TUPLES, Table::Tuples, &sender).await?;
        stream(&tx, LIMITS, Table::Limits, &sender).await
    }
    .await;
    drop(sender);
    let built = builder.await.map_err(|e| Error::Builder(e.to_string()));
    // A builder error explains a failed send better than the send error does.
    let (state, rows) = match (streamed, built) {
        (_, Err(e)) | (_, Ok(Err(e))) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok(()), Ok(Ok(built))) => built,
    };
    tx.commit().await?;
    tracing::info!(
        rows,
        subjects = state.subject_count(),
        snapshot_xmin = %xmin,
        took_ms = started.elapsed().as_millis() as u64,
        "full load done"
    );
    Ok(Loaded { state, xmin, rows })
}

async fn stream(
    tx: &tokio_postgres::Transaction<'_>,
    query: &str,
    table: Table,
    sender: &mpsc::Sender<(Table, Vec<u8>)>,
) -> Result<(), Error> {
    let stream = tx.copy_out(query).await?;
    pin_mut!(stream);
    let mut block = Vec::with_capacity(BLOCK_BYTES);
    while let Some(chunk) = stream.next().await {
        block.extend_from_slice(&chunk?);
        if block.len() >= BLOCK_BYTES {
            let full = std::mem::replace(&mut block, Vec::with_capacity(BLOCK_BYTES));
            send(sender, table, full).await?;
        }
    }
    send(sender, table, block).await
}

async fn send(
    sender: &mpsc::Sender<(Table, Vec<u8>)>,
    table: Table,
    block: Vec<u8>,
) -> Result<(), Error> {
    sender
        .send((table, block))
        .await
        .map_err(|_| Error::Builder("builder stopped early".into()))
}

/// Runs on a blocking thread: parses the COPY chunks and fills a `StateBuilder`.
fn build(
    mut receiver: mpsc::Receiver<(Table, Vec<u8>)>,
    estimate: usize,
) -> Result<(State, u64), Error> {
    let mut builder = StateBuilder::new();
    let mut tuples = CopyParser::new();
    let mut limits = CopyParser::new();
    let mut rows = 0u64;
    let mut next_progress = PROGRESS_EVERY;
    while let Some((table, block)) = receiver.blocking_recv() {
        match table {
            Table::Tuples => tuples.feed(&block, |f| {
                builder.tuple(
                    text(f[0], "subject")?,
                    text(f[1], "object")?,
                    text(f[2], "permission")?,
                    timestamptz(f[3], "expires_at")?,
                );
                rows += 1;
                Ok(())
            })?,
            Table::Limits => limits.feed(&block, |f| {
                let value = int8(f[2], "value")?
                    .ok_or_else(|| Error::Copy("limit value is NULL".into()))?;
                builder.limit(text(f[0], "subject")?, text(f[1], "name")?, value);
                rows += 1;
                Ok(())
            })?,
        }
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
    tuples.finish()?;
    limits.finish()?;
    Ok((builder.finish(), rows))
}
