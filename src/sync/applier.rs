//! The applier: the one task that owns the changelog cursor and every write to the store.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{Fuse, FusedFuture as _};
use futures_util::{FutureExt as _, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Row, Statement};
use tokio_util::sync::CancellationToken;

use super::busy::{self, Busy, SlotWaiter};
use super::connect;
use super::follow::{Follower, Heard, Key, NotifyKey, Refused, Verdict};
use super::loader::{self, Begun, Loaded};
use super::server::Server;
use super::standby::{Look, Standby};
use super::status::Upstream;
use super::subscription::{self, Subscribed};
use super::tap::Tap;
use super::{error_chain, parse_snapshot, parse_xid, Cursor, Error, Position, Status, SyncConfig};
use crate::shard::Shard;
use crate::store::{now_micros, Snapshot, State, Store, TupleRow};

/// How often a standby is looked at: whether it has been promoted, and how current it is
/// with its primary (`LOOK`).
const RECOVERY_CHECK: Duration = Duration::from_secs(1);
/// How often a primary is looked at, for its clock alone.
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// The server's clock (µs since the epoch), whether it is a standby and the changelog's
/// size on disk (the first three columns of both looks); then, on a standby, what it can
/// tell of its delay behind its primary (`sync::standby`): the WAL received (or, to
/// `pg_read_all_stats`, the end its primary last reported, when further), the WAL
/// replayed, the WAL receiver's process id (shown to every role) and whether it streams
/// (`NULL` to a role that may not see it).
const LOOK: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
        pg_is_in_recovery(), \
        pg_total_relation_size(to_regclass('permd.changelog')), \
        pg_wal_lsn_diff(greatest(pg_last_wal_receive_lsn(), r.latest_end_lsn), '0/0')::int8, \
        pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8, \
        r.pid, r.status = 'streaming', pg_backend_pid() AS backend \
    FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true";
/// The look of a server that refuses `LOOK`.
const BLIND_LOOK: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
        pg_is_in_recovery(), \
        pg_total_relation_size(to_regclass('permd.changelog')), pg_backend_pid() AS backend";

/// The doorbell channel rung by the changelog triggers.
const CHANNEL: &str = "permd_changes";
/// While committed changes wait behind an open transaction, polls start this fast...
const BEHIND_FIRST: Duration = Duration::from_millis(2);
/// ...and back off to this, so a long transaction costs a few polls a second.
const BEHIND_MAX: Duration = Duration::from_millis(100);
/// A notification that does not verify may mean the key was rotated: it is read again
/// before the next poll, at most this often.
const KEY_REREAD: Duration = Duration::from_secs(1);
/// A warning that can repeat with every notification is logged at most this often.
const QUIET: Duration = Duration::from_secs(60);

/// What the connection's driver passes on to the applier, in the order it arrived.
enum Message {
    /// A notification's payload.
    Heard(String),
    /// Notifications were dropped here: the applier was this far behind.
    Lost,
}

/// Drives the connection, passing each notification's payload on to the applier until
/// the connection ends, and returns why it ended. Past the channel's capacity,
/// notifications are dropped (and counted), and the applier is told with a `Lost` as soon
/// as the channel has room again, before anything heard after them: it then follows
/// again only once the polls have read what they carried. (Told at the next notification
/// instead, a burst's last dropped commits waited for the idle poll.)
async fn forward(
    messages: impl futures_util::Stream<Item = Result<String, Error>>,
    heard: mpsc::Sender<Message>,
    status: Status,
) -> Error {
    tokio::pin!(messages);
    // Whether notifications were dropped since the last `Lost` was sent.
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            room = heard.reserve(), if lost => match room {
                Ok(room) => {
                    room.send(Message::Lost);
                    lost = false;
                }
                // The applier is gone, and the connection with it.
                Err(_) => return Error::Closed,
            },
            message = messages.next() => match message {
                Some(Ok(payload)) => {
                    if lost || heard.try_send(Message::Heard(payload)).is_err() {
                        lost = true;
                        status.dropped();
                    }
                }
                Some(Err(error)) => return error,
                None => return Error::Closed,
            },
        }
    }
}

/// The error of a session that ended with its connection closed: the server's reason
/// where it sent one (a FATAL error: the session ended by a timeout, by an administrator,
/// by a shutdown), else `error`. A request that finds the connection gone says only
/// "connection closed". What the server said went to the connection's driver (`closed`)
/// when it came while no request was queued for an answer; the driver ends as soon as it
/// has read the close, so it is waited for briefly. When a request was queued, the error
/// went to it, and if that was one no one waits for (tokio-postgres's `Close` of a
/// dropped statement, sent without waiting), it was dropped there: the tap on the socket
/// kept it (`Tap::ended`).
async fn why_closed<F: Future<Output = Error>>(
    error: Error,
    closed: Pin<&mut Fuse<F>>,
    tap: &Tap,
) -> Error {
    if !closed.is_terminated() {
        if let Ok(Error::Postgres(server)) =
            tokio::time::timeout(Duration::from_millis(100), closed).await
        {
            if server.as_db_error().is_some() {
                return Error::Postgres(server);
            }
        }
    }
    tap.ended().map_or(error, Error::Ended)
}

/// The sync connection's planner settings, for the poll's sake: it is a small statement run
/// hundreds of times a second, whose plan must be cheap to run at any table size.
///
/// - JIT off: once the changelog is large, the poll's cost estimate crosses
///   `jit_above_cost`, and every poll spent hundreds of milliseconds compiling itself.
/// - No sequential scans, and the one generic plan always: Postgres plans a prepared
///   statement once its custom plans look no cheaper than a generic one, with the tables'
///   sizes of that moment. A plan made while the changelog was empty (a fresh database, or
///   just pruned and vacuumed) read it whole at every poll as it grew, until autovacuum's
///   next ANALYZE replaced it: 1.2 ms a poll at 10,000 rows, 6.3 ms at 20,000 (session 24,
///   `pg_stat_statements`). With sequential scans priced out every table is read by its
///   index whatever its size, so the generic plan stays right (0.06 to 0.09 ms a poll) and
///   nothing is planned again (custom plans cost 0.5 ms of planning a poll).
/// - No bitmap scans either: a bitmap scan reads its whole range before the poll's LIMIT
///   takes a batch of it. A plan made while the changelog had pages and no rows (emptied,
///   and vacuumed while an older snapshot kept the pages) chose one for the rows of
///   transactions begun since, and every poll read the whole backlog: 390 ms a poll at a
///   million rows waiting against 99 ms by its index (session 62), the backlog read in
///   time growing with its square.
///
/// A full load reads whole tables, where a sequential scan is the right plan: it turns
/// them back on for its transaction. Public so that a test can check the poll's plan.
pub const SESSION: &str = "SET jit = off; SET enable_seqscan = off; SET enable_bitmapscan = off; \
     SET plan_cache_mode = force_generic_plan";

/// One poll of the changelog, in one statement so the snapshot, the retention mark, the
/// changed keys and their current rows come from one snapshot. Public so that a test can
/// check its plan (`EXPLAIN`): a poll runs many times a second, and a plan that reads a
/// table whole is the slowest part of freshness long before anyone sees it.
///
/// It reads the rows of the transactions the last poll's snapshot did not see
/// (`Position`): $1 = its transactions in progress (text of `xid8`s), $2 = its xmax,
/// $3 = the batch's size, $4 and $5 = the place of the last row applied of a transaction
/// read in part (`0` and 0 for none), $6 = the id of the last row applied of transaction
/// $2 (that place's when it is one of $2's, else the least `int8`), $7 = read only below
/// the snapshot's xmin (on a standby: `Applier::horizon_only`). The statement's snapshot
/// sees exactly the committed ones; none at or above its xmax was written here (a row
/// that is was restored from another cluster's dump, migration 0007).
///
/// Rows are tagged; the columns mean, by tag:
/// - `h` (one row): a = the poll's snapshot (`xmin:xmax:xip,...`), b = pruned xid,
///   n = pruned id, c = with $7, when committed rows first began waiting at or above the
///   snapshot's xmin (an older transaction is still open), in µs since the epoch, else
///   NULL
/// - `e` (at most one): a = xid of the batch's last row, n = its id, b = rows in the batch
/// - `k`: a changed key: a = kind (t, l, r), b = subject, c = object (for a reload
///   marker, r, its transaction's xid: one row for each), n = the position of its last
///   change in the batch
/// - `t`: a current tuple of a changed key: a = subject, b = object, c = permission,
///   n = expires_at (µs since the epoch, NULL = never)
/// - `l`: a current limit of a changed subject: a = subject, c = name, n = value
/// - `p` (one row): n = the server process of the session (`Applier::same_backend`),
///   a = permd's tables as they are now (`permd_tables_sql`)
pub const POLL: &str = concat!(
    "
WITH h AS MATERIALIZED (
    SELECT r.pruned_xid, r.pruned_id
    FROM permd.retention r
    LIMIT 1 -- a singleton; the planner, without statistics, guessed 1,810 rows
), b AS MATERIALIZED (
    SELECT u.xid, u.id, u.kind, u.subject, u.object
    FROM ((
        -- The last snapshot's transactions in progress: index look-ups.
        SELECT c.xid, c.id, c.kind, c.subject, c.object
        FROM permd.changelog c
        WHERE c.xid = ANY($1::text[]::xid8[])
            AND NOT (c.xid = $4::text::xid8 AND c.id <= $5::int8)
        ORDER BY c.xid, c.id
        LIMIT $3
    ) UNION ALL (
        -- Those begun since: a range of the primary key.
        SELECT c.xid, c.id, c.kind, c.subject, c.object
        FROM permd.changelog c
        WHERE (c.xid, c.id) > ($2::text::xid8, $6::int8)
            AND c.xid < CASE WHEN $7::bool THEN pg_snapshot_xmin(pg_current_snapshot())
                ELSE pg_snapshot_xmax(pg_current_snapshot()) END
        ORDER BY c.xid, c.id
        LIMIT $3
    )) u
    ORDER BY u.xid, u.id
    LIMIT $3
), k AS MATERIALIZED (
    -- Each changed key, with the position of its last change in the changelog's order:
    -- keys are applied in that order (see `poll`).
    SELECT kind, subject, object, max(pos) AS pos
    FROM (
        SELECT kind, subject, CASE WHEN kind = 'r' THEN xid::text ELSE object END AS object,
            row_number() OVER (ORDER BY xid, id) AS pos
        FROM b
    ) p
    /* shard */
    GROUP BY kind, subject, object
)
SELECT 'h' AS tag, pg_current_snapshot()::text AS a, h.pruned_xid::text AS b,
       -- On a standby, read below the xmin only: when committed rows began waiting
       -- above it. FILTER keeps the planner from answering min() by walking the
       -- created_at index from its start (which reads the whole retained changelog):
       -- this reads only the rows at or above the xmin, by the primary key. The xmin is
       -- written out rather than taken from another part of the query, whose condition
       -- the planner estimates as a third of the table (it then read the whole
       -- changelog: 0.6 ms a poll at 9,000 rows).
       CASE WHEN $7::bool THEN
           (SELECT permd.epoch_micros(min(created_at) FILTER (WHERE true))
            FROM permd.changelog WHERE xid >= pg_snapshot_xmin(pg_current_snapshot())
                AND xid < pg_snapshot_xmax(pg_current_snapshot()))::text
       END AS c,
       h.pruned_id AS n
FROM h
UNION ALL
SELECT 'e', l.xid::text, (SELECT count(*) FROM b)::text,
       (SELECT count(DISTINCT xid) FROM b)::text, l.id
FROM (SELECT xid, id FROM b ORDER BY xid DESC, id DESC LIMIT 1) l
UNION ALL
SELECT 'k', k.kind::text, k.subject, k.object, k.pos FROM k
UNION ALL
SELECT 't', t.subject, t.object, t.permission, permd.epoch_micros(t.expires_at)
FROM k JOIN permd.tuples t ON k.kind = 't' AND t.subject = k.subject AND t.object = k.object
UNION ALL
SELECT 'l', l.subject, NULL, l.name, l.value
FROM (SELECT DISTINCT subject FROM k WHERE kind = 'l') s
JOIN permd.limits l ON l.subject = s.subject
UNION ALL
SELECT 'p', ",
    crate::permd_tables_sql!(),
    ", NULL, NULL, pg_backend_pid()::int8
"
);

/// [`POLL`] for the daemon of `shard`: the changed keys of other shards' subjects are
/// passed over (their rows never read), reload markers kept.
pub fn poll_statement(shard: Shard) -> String {
    match shard.sql_condition("subject") {
        None => POLL.to_owned(),
        Some(owned) => POLL.replace("/* shard */", &format!("WHERE kind = 'r' OR {owned}")),
    }
}

/// The fewest changelog rows waiting that are loaded in full rather than read
/// (`Applier::backlog`): below it, reading them takes a second or so here, whatever the
/// set.
const BACKLOG_RELOAD_MIN: f64 = 100_000.0;

/// The rate a full load is assumed to read tuples at (per second) until one of at least
/// `LOAD_RATE_SAMPLE` rows has been measured: the slowest measured here, a set whose
/// subjects' rows lie scattered through the table (benches/README.md, "load").
const LOAD_RATE_ASSUMED: f64 = 700_000.0;

/// The fewest rows of a full load whose rate is taken as measured: below it, the load's
/// fixed costs weigh.
const LOAD_RATE_SAMPLE: u64 = 1_000_000;

/// The changelog's committed rows that a snapshot does not see (of the transactions in
/// progress in it, `$1`, and of those from its xmax on, `$2`), counted up to a limit each:
/// the limit bounds the count's cost by what it decides.
const BACKLOG: &str = "SELECT count(*) FROM (\
    (SELECT 1 FROM permd.changelog WHERE xid = ANY($1::text[]::xid8[]) LIMIT $3) \
    UNION ALL (SELECT 1 FROM permd.changelog WHERE xid >= $2::text::xid8 LIMIT $3)) backlog";

/// What one poll found.
enum Polled {
    /// Every transaction the poll's snapshot sees is applied. `pending` (on a standby,
    /// read below its snapshots' xmin): committed changes wait above it for an older
    /// transaction to end, which rings no doorbell, so poll again soon.
    CaughtUp {
        /// Committed changes wait above the xmin.
        pending: bool,
        /// The transactions whose changes it read.
        transactions: usize,
    },
    /// A full batch was applied; more rows are waiting.
    More,
    /// The changelog cannot bring us up to date (TRUNCATE, or pruned past our cursor).
    Reload(&'static str),
}

/// Why a session reloads that found a pruning mark restored from another cluster
/// (`Applier::restored`).
const RESTORED_MARK: &str =
    "a pruning mark restored from another cluster, which says nothing of what was pruned here";

/// The sync task. Owns the cursor; the only writer of the store.
pub struct Applier {
    store: Store,
    status: Status,
    config: SyncConfig,
    /// How far the changelog is applied. `None` until the first full load, and again
    /// when a reload is needed.
    cursor: Option<Position>,
    /// This session's server is a standby, whose snapshots cannot be taken at their word
    /// above their xmin: `pg_current_snapshot()` there lists no transaction in progress
    /// (recovery keeps them where it does not look), so its snapshots are cut to their
    /// xmin (`Snapshot::horizon`) and the changelog is read only below it, as DESIGN.md's
    /// horizon cursor does.
    horizon_only: bool,
    /// The server of the last session that caught up, or loaded, from it.
    server: Option<Server>,
    /// The changelog's pruning mark as the last full load's snapshot saw it: what it
    /// records was deleted before that load, which holds those changes, so only a mark
    /// moved since says a change may have been missed.
    mark_at_load: Cursor,
    /// permd's tables as the last full load found them (`permd_tables_sql`).
    tables_at_load: String,
    /// The server process of this session, as its first look found it (`same_backend`).
    backend: Option<i32>,
    /// The task that drives the current session's connection.
    driver: Option<AbortHandle>,
    /// Which notifications' changes may be applied as they arrive.
    follower: Follower,
    /// The key that verifies notifications, and when to read it again.
    signing: Signing,
    /// Refused notifications not yet logged, and when they last were.
    refused_quiet: (u64, Option<Instant>),
    /// The restored transaction ids last warned of (`restored`: the pruning mark and the
    /// changelog's highest id), so that each session's look warns of them once.
    restored_said: Option<(String, Option<String>)>,
    /// When the last full load or compaction ended, and how long it took.
    last_load: Option<(Instant, Duration)>,
    /// The compaction running, if one is.
    compacting: Option<Compacting>,
    /// Rung when a compaction's rebuild is done, so that the wait between polls ends and
    /// it is swapped in at once.
    rebuilt: Arc<Notify>,
    /// The server's clock was last found off this host's by more than `CLOCK_TOLERANCE`.
    clock_off: bool,
    /// The server refused the look at its subscriptions (a role denied the catalogs):
    /// not asked again.
    subscriptions_unknown: bool,
    /// Why the next session must load in full before it reads the changelog on, if it
    /// must: logical replication wrote permd's tables past the changelog meanwhile, or a
    /// reload beside the polls did not swap in (its polls may have passed what called for
    /// it; a backlog's moved the cursor past rows never applied). That load goes beside
    /// the next session's polls too (`begin_reload`).
    reload_due: Option<Cow<'static, str>>,
    /// That load must rewind the watermark: it follows a crash or another server, whose
    /// reload beside the polls did not swap in (the server is then known, and would not
    /// call for it again).
    rewind_due: bool,
    /// The changelog's backlog was counted since the last caught-up poll (`backlog`).
    backlog_counted: bool,
    /// Tuples a second of the last full load of at least `LOAD_RATE_SAMPLE` rows.
    load_rate: Option<f64>,
    /// The reload running beside the polls, if one is.
    reloading: Option<Reloading>,
    /// Rung when that reload's load has ended, so that the wait between polls ends and it
    /// is swapped in at once.
    load_ended: Arc<Notify>,
    /// Whether this session listens for writers with `permd.notify = 'auto'`, or polls
    /// for them (`sync::busy`); `None` on a standby, which allows no LISTEN.
    busy: Option<Busy>,
    /// Their notifications came fast enough to poll instead: let the slot go before the
    /// next poll.
    busy_wanted: bool,
    /// The connection that waits for a slot, or holds the one it took (`sync::busy`).
    slot_waiter: Option<SlotWaiter>,
    /// When the last such connection failed: another waits [`busy::WAITER_RETRY`].
    waiter_failed: Option<Instant>,
}

/// A reload beside the polls (`Applier::begin_reload`): the load runs on a connection of
/// its own, and the polls and notifications go on applying changes to the current
/// generation, noting whether each is past the load's snapshot (`Store::writes_newer`);
/// `Applier::finish_reload` keeps those in the loaded generation as it swaps it in.
struct Reloading {
    /// The load's outcome, sent as it ends.
    loaded: oneshot::Receiver<Result<Loaded, Error>>,
    /// The load's snapshot (on a standby, cut to its horizon: `Applier::as_read`): the
    /// changes it sees are in the generation it builds.
    snapshot: Snapshot,
    /// The changelog's pruning mark in that snapshot.
    mark: Cursor,
    /// permd's tables as the load found them.
    tables: String,
    /// The watermark is rewound at the swap, and confirmed only then: the reload follows
    /// a crash or another server, whose transaction ids say nothing of the mirror's
    /// (`reload`), so a write token waits for the swap (`Store::unconfirm`).
    rewind: bool,
    why: Cow<'static, str>,
    started: Instant,
    /// Stops the load's thread if the reload is dropped unfinished (the session ended).
    stop: CancellationToken,
}

impl Drop for Reloading {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A compaction under way: the generation it rebuilds, the thread rebuilding it, and why.
struct Compacting {
    old: Arc<State>,
    rebuild: JoinHandle<State>,
    why: String,
    started: Instant,
}

/// How far the server's clock may be from this host's before the log says so.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// The server's clock against this host's, as one round trip measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Skew {
    /// The server's clock minus this host's at the middle of the round trip (µs):
    /// positive when the server's is ahead.
    micros: i64,
    /// Half the round trip (µs): how far off the middle the server may have read it.
    uncertainty: i64,
}

impl Skew {
    /// The skew of a server that read `server` while this host's clock went from `sent`
    /// to `received` (all µs since the epoch).
    fn measure(sent: i64, server: i64, received: i64) -> Self {
        let half = received.saturating_sub(sent).max(0) / 2;
        Self {
            micros: server.saturating_sub(sent.saturating_add(half)),
            uncertainty: half,
        }
    }

    /// Whether the clocks are certainly further apart than `tolerance`.
    fn beyond(self, tolerance: Duration) -> bool {
        let tolerance = i64::try_from(tolerance.as_micros()).unwrap_or(i64::MAX);
        self.micros.saturating_abs() > tolerance.saturating_add(self.uncertainty)
    }
}

/// A compaction starts no sooner after the last full load or compaction than this many
/// times as long as that took, so that however fast names churn, compactions take at most
/// about a tenth of the applier's time.
const COMPACTION_SPACING: u32 = 10;

/// The key that signs the notifications that carry rows, and when to read it again.
#[derive(Default)]
struct Signing {
    /// `None` when it cannot be read (a schema older than migration 0006, or no privilege
    /// on `permd.notify_key`): rows are then never applied, and every commit is polled.
    key: Option<NotifyKey>,
    /// When it was last read.
    read_at: Option<Instant>,
    /// A notification did not verify (or there is no key): read it again before the next
    /// poll.
    stale: bool,
    /// A notification verified under it since it was read: the first one that does not is
    /// most likely a rotation, so the key is read again at once; otherwise (a flood of
    /// forgeries, perhaps, or no key at all) at most every `KEY_REREAD`.
    proven: bool,
}

impl Signing {
    /// Whether to read the key before the next poll.
    fn due(&self) -> bool {
        self.stale && (self.proven || self.read_at.is_none_or(|at| at.elapsed() >= KEY_REREAD))
    }
}

impl Applier {
    /// An applier that will fill `store` and report into `status`.
    pub fn new(store: Store, status: Status, config: SyncConfig) -> Self {
        Self {
            store,
            follower: Follower::new(status.clone(), true),
            status,
            config,
            cursor: None,
            horizon_only: false,
            server: None,
            mark_at_load: Cursor::default(),
            tables_at_load: String::new(),
            backend: None,
            driver: None,
            signing: Signing::default(),
            refused_quiet: (0, None),
            restored_said: None,
            last_load: None,
            compacting: None,
            rebuilt: Arc::new(Notify::new()),
            clock_off: false,
            subscriptions_unknown: false,
            reload_due: None,
            rewind_due: false,
            backlog_counted: false,
            load_rate: None,
            reloading: None,
            load_ended: Arc::new(Notify::new()),
            busy: None,
            busy_wanted: false,
            slot_waiter: None,
            waiter_failed: None,
        }
    }

    /// Runs until `shutdown`: connects (with backoff), listens, loads, then applies the
    /// changelog on every doorbell, reader request and tick. Connection loss is logged and
    /// retried; the cursor survives it, so no change is lost or skipped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            if !first {
                self.status.reconnected();
            }
            first = false;
            // The shutdown ends a session wherever it waits: a full load of a large set,
            // or one whose rows stopped arriving, would otherwise hold it for as long as
            // it takes, past the daemon's shutdown timeout.
            let session = tokio::select! {
                result = self.session(&shutdown) => result,
                () = shutdown.cancelled() => return,
            };
            match session {
                Ok(()) => return,
                Err(error) => {
                    // Until the next session has seen whether the server recovered from a
                    // crash, `at_least` tokens wait (a crash hands out xids again).
                    self.store.unconfirm();
                    // A connection presumed dead is closed now: left to itself, its task
                    // would wait for the answer to the abandoned statement until TCP
                    // keepalives gave up, holding the socket (and, in a full load, the
                    // builder's thread). One that answered with an error closes itself.
                    if matches!(error, Error::Timeout(..) | Error::Stalled(_)) {
                        if let Some(driver) = self.driver.take() {
                            driver.abort();
                        }
                    }
                    let mut message = error_chain(&error);
                    if let Some(hint) = hint(&error) {
                        message.push_str(" (");
                        message.push_str(hint);
                        message.push(')');
                    }
                    tracing::warn!(error = %message, retry_in_ms = backoff.as_millis() as u64, "sync connection failed");
                    self.status.failed(&message);
                }
            }
            if !self.back_off(backoff, &shutdown).await {
                return;
            }
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// Waits `backoff` before the next connection attempt (false: shut down meanwhile).
    /// A compaction's rebuild needs no connection: one that has ended, or ends meanwhile,
    /// is swapped in now rather than at the first poll after the reconnect, so the
    /// generation it replaces is not held for as long as Postgres is out of reach.
    async fn back_off(&mut self, backoff: Duration, shutdown: &CancellationToken) -> bool {
        let retry_at = tokio::time::Instant::now() + backoff;
        let mut rebuilt = self.rebuild_ended();
        loop {
            if std::mem::take(&mut rebuilt) {
                if let Err(error) = self.finish_compaction().await {
                    tracing::warn!(error = %error_chain(&error), "compaction failed");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(retry_at) => return true,
                // The rebuild returns right after it notifies.
                () = self.rebuilt.notified(), if self.compacting.is_some() => rebuilt = true,
            }
        }
    }

    /// Whether a compaction runs whose rebuild has ended.
    fn rebuild_ended(&self) -> bool {
        self.compacting
            .as_ref()
            .is_some_and(|c| c.rebuild.is_finished())
    }

    /// Swaps in the compaction's rebuilt generation if its rebuild has ended
    /// (`finish_compaction`).
    async fn finish_rebuilt_compaction(&mut self) -> Result<(), Error> {
        if self.rebuild_ended() {
            self.finish_compaction().await?;
        }
        Ok(())
    }

    /// One connection's life: connect, LISTEN, (re)load if needed, then poll until an
    /// error or shutdown (the only `Ok`).
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        let (client, tap, heard, closed) = self.connect().await?;
        let closed = closed.fuse();
        tokio::pin!(closed);
        let followed = self
            .follow(client, tap.clone(), heard, closed.as_mut(), shutdown)
            .await;
        // A slot held on a connection of its own goes with the session (`sync::busy`).
        self.slot_waiter = None;
        // A reload the session left unfinished is stopped, and the next session loads
        // again before it reads on: its polls may have passed the change that called for
        // it.
        if let Some(reloading) = self.reloading.take() {
            self.store.abandon_journal();
            self.load_again(&reloading);
        }
        match followed {
            Err(error) if error.is_closed() => Err(why_closed(error, closed, &tap).await),
            // permd never deallocates a statement it prepared: one unknown to the server
            // was prepared in another server session.
            Err(Error::Postgres(error))
                if error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME) =>
            {
                Err(Error::Pooled(format!(
                    "the sync connection's statements ran in two server sessions (a \
                     statement prepared in one was unknown in the other: {})",
                    error_chain(&error)
                )))
            }
            ended => ended,
        }
    }

    /// [`Self::session`] once connected: `closed` ends with the connection, with its error.
    async fn follow(
        &mut self,
        mut client: Client,
        tap: Tap,
        mut heard: mpsc::Receiver<Message>,
        mut closed: Pin<&mut Fuse<impl Future<Output = Error>>>,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        // LISTEN before loading: a change committed after it rings, one committed before
        // it is in the snapshot or the changelog.
        // A standby (a read replica) allows no LISTEN: it is followed by the poll alone. Its
        // snapshots keep the invariant the changelog's horizon rests on (a transaction below
        // a snapshot's xmin has ended), as they must for MVCC, so nothing is skipped; a
        // commit is seen once the standby has replayed it, at the next poll, and `at_least`
        // still waits for exactly that commit. How current the standby is with its primary
        // bounds how current the mirror is (`sync::standby`).
        let mut looks = Standby::default();
        let standby = self.look(&client, &mut looks).await?;
        self.follower = Follower::new(self.status.clone(), !standby);
        self.horizon_only = standby;
        self.busy = (!standby).then(|| Busy::new(self.config.busy_poll));
        self.busy_wanted = false;
        self.slot_waiter = None;
        self.status.set_busy_polling(false);
        if !standby {
            self.timed("LISTEN", client.batch_execute(&format!("LISTEN {CHANNEL}")))
                .await?;
        }
        self.status.set_connected(true);
        self.status.set_standby(standby);
        if standby {
            tracing::info!(
                poll_interval_ms = self.config.poll_interval.as_millis() as u64,
                "connected to a standby, which allows no LISTEN: following it by polling; a \
                 commit is seen once the standby has replayed it, at the next poll"
            );
        } else {
            tracing::info!("connected to postgres, listening on {CHANNEL}");
        }
        self.read_key(&client, true).await?;
        self.check_subscriptions(&client).await?;

        // A server that recovered from a crash since the last session, or another one,
        // cannot be caught up from the changelog (`Server::reload_since`).
        let server = Server::read(&client, self.config.query_timeout).await?;
        let recovered = self
            .server
            .as_ref()
            .and_then(|last| server.reload_since(last));
        let restarted = |last: &Server| last.started != server.started;
        if recovered.is_none() && self.server.as_ref().is_some_and(restarted) {
            tracing::info!(
                started_epoch_seconds = server.started,
                "postgres restarted after a clean shutdown: catching up from the changelog"
            );
        }
        let restored_mark = self
            .restored(&client)
            .await?
            .is_some_and(|mark| mark != self.mark_at_load);
        let due = match recovered {
            Some(why) => Some((Cow::Owned(why), true)),
            None => self
                .reload_due
                .clone()
                .map(|why| (why, self.rewind_due))
                .or_else(|| restored_mark.then_some((Cow::Borrowed(RESTORED_MARK), false))),
        };
        if self.cursor.is_none() {
            self.reload(&mut client, &tap, "start", false).await?;
        } else if let Some((why, rewind)) = due {
            // There is a generation to answer from meanwhile: the load goes beside the
            // polls, which go on from its snapshot where the cursor says nothing of this
            // server's transactions (`rewind`), and from the cursor otherwise (a restored
            // mark the load sees is passed over, `Reloading::mark`).
            if !self
                .begin_reload(why.clone(), Some(server.clone()), rewind)
                .await?
            {
                self.reload(&mut client, &tap, &why, rewind).await?;
            }
        }
        self.reload_due = None;
        self.rewind_due = false;
        // Taken as known only now: a load that failed is tried again at the next session,
        // which would otherwise find the server known and catch up from a cursor the
        // crash may have passed. (A reload beside the polls that fails leaves its rewind
        // due: `load_again`.)
        self.server = Some(server);
        // The watermark holds: the server did not recover from a crash since the last
        // session, or the load has rewound it. A reload beside the polls that rewinds
        // confirms it at its swap.
        if !self
            .reloading
            .as_ref()
            .is_some_and(|reloading| reloading.rewind)
        {
            self.store.confirm();
        }
        // Prepared once per connection: the poll is one large statement, and planning it
        // on every poll cost about as much as running it.
        let poll = self
            .timed(
                "the poll's PREPARE",
                client.prepare(&poll_statement(self.config.shard)),
            )
            .await?;
        self.backlog_counted = false;
        // Listening for 'auto' writers from before the first poll, which then reads every
        // silent commit that ended before (`sync::busy`).
        self.try_slot(&client).await?;
        let mut behind = BEHIND_FIRST;
        // A standby promoted under the connection would be polled without LISTEN until the
        // next reconnect: it is asked every `RECOVERY_CHECK`, apart from the polls. A
        // primary is looked at for its clock every `CLOCK_CHECK`.
        let look_every = if standby { RECOVERY_CHECK } else { CLOCK_CHECK };
        let mut next_look = tokio::time::Instant::now() + look_every;
        loop {
            if self.signing.due() {
                self.read_key(&client, false).await?;
            }
            if std::mem::take(&mut self.busy_wanted) {
                self.leave_slot(&client).await?;
            }
            self.slot_waited();
            let started = Instant::now();
            let polled = tokio::select! {
                polled = self.poll(&client, &poll) => polled?,
                result = &mut closed => return Err(result),
                () = shutdown.cancelled() => return Ok(()),
            };
            self.finish_rebuilt_compaction().await?;
            if let Some(reloading) = self.reloading.as_mut() {
                if let Ok(loaded) = reloading.loaded.try_recv() {
                    self.finish_reload(loaded).await?;
                }
            }
            let idle = self.compacting.is_none() && self.reloading.is_none();
            if matches!(polled, Polled::CaughtUp { .. }) && idle {
                if let Some(why) = self.compaction_due() {
                    self.begin_compaction(why);
                }
            }
            if matches!(polled, Polled::More) && self.reloading.is_none() {
                if let Some(why) = self.backlog(&client, started.elapsed()).await? {
                    if self
                        .begin_reload(why.clone().into(), self.server.clone(), false)
                        .await?
                    {
                        self.polls_past_the_load();
                    } else {
                        self.reload(&mut client, &tap, &why, false).await?;
                    }
                }
            } else {
                self.backlog_counted = false;
            }
            let read = match polled {
                Polled::CaughtUp { transactions, .. } => transactions,
                _ => 0,
            };
            let wait = match polled {
                Polled::More => {
                    self.fell_behind(&client).await?;
                    continue;
                }
                // A change the load under way does not cover: nothing past it can be
                // applied, so the polls wait for the load, and the next one calls for a
                // reload again.
                Polled::Reload(why) if self.reloading.is_some() => {
                    tracing::info!(
                        reason = why,
                        "the changelog calls for a reload past the one under way: waiting \
                         for it, then loading again"
                    );
                    let loaded = tokio::select! {
                        loaded = self.load_outcome() => loaded,
                        result = &mut closed => return Err(result),
                        () = shutdown.cancelled() => return Ok(()),
                    };
                    self.finish_reload(loaded).await?;
                    continue;
                }
                Polled::Reload(why) => {
                    if !self
                        .begin_reload(why.into(), self.server.clone(), false)
                        .await?
                    {
                        self.reload(&mut client, &tap, why, false).await?;
                    }
                    continue;
                }
                // Changes wait on a standby behind an open transaction, or a reader waits
                // for a token the poll did not see (a standby that has not replayed it,
                // or has but below an open transaction; a token handed on before its
                // transaction committed): nothing else may ring when it is there.
                Polled::CaughtUp { pending, .. } if pending || self.store.readers_waiting() => {
                    let wait = behind;
                    behind = (behind * 2).min(BEHIND_MAX).min(self.config.poll_interval);
                    wait
                }
                Polled::CaughtUp { .. } => {
                    behind = BEHIND_FIRST;
                    // Idle polls keep a fixed cadence, start to start: a change committed
                    // just after a poll's snapshot waits one interval plus one poll, not
                    // plus two.
                    self.config.poll_interval.saturating_sub(started.elapsed())
                }
            };
            if self.take_slot(&client, read).await? {
                // Listening again: every silent commit has ended, and this poll reads
                // those that ended after the last one's snapshot.
                continue;
            }
            let wait = match &self.busy {
                Some(busy) => busy.wait(wait, Instant::now()),
                None => wait,
            };
            // Until the next poll: notifications are applied as they arrive while
            // following, and ring for a poll (as a plain doorbell) while not.
            let next = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    message = heard.recv() => {
                        let Some(message) = message else {
                            return Err((&mut closed).await);
                        };
                        if self.hear(message) {
                            // Take in whatever else arrived, then one poll for all.
                            while let Ok(message) = heard.try_recv() {
                                self.hear(message);
                            }
                            tracing::trace!("woken by NOTIFY");
                            break;
                        }
                    }
                    () = self.store.wanted() => {
                        tracing::trace!("woken by a reader");
                        break;
                    }
                    () = self.rebuilt.notified(), if self.compacting.is_some() => {
                        tracing::trace!("woken by a compaction's rebuild");
                        break;
                    }
                    () = self.load_ended.notified(), if self.reloading.is_some() => {
                        tracing::trace!("woken by a reload's load");
                        break;
                    }
                    // Polled at once: it reads the silent commits that ended before.
                    () = taking(&mut self.slot_waiter) => {
                        tracing::trace!("woken by a busy slot taken");
                        break;
                    }
                    () = tokio::time::sleep_until(next) => {
                        tracing::trace!("woken by the timer");
                        break;
                    }
                    () = tokio::time::sleep_until(next_look) => {
                        next_look = tokio::time::Instant::now() + look_every;
                        let known = looks.known();
                        let in_recovery = self.look(&client, &mut looks).await?;
                        if standby && !in_recovery {
                            return Err(Error::Promoted);
                        }
                        self.check_subscriptions(&client).await?;
                        if !known && looks.known() {
                            // The mirror can be known current now, not a poll interval
                            // later.
                            break;
                        }
                    }
                    result = &mut closed => return Err(result),
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }

    /// Refuses a database whose tables logical replication writes in a way the changelog
    /// cannot follow (`subscription::refusal`), and marks a full load due, since what
    /// was replicated meanwhile may have passed the changelog by. A server whose role may
    /// not read the catalogs is not asked again.
    async fn check_subscriptions(&mut self, client: &Client) -> Result<(), Error> {
        if self.subscriptions_unknown {
            return Ok(());
        }
        let rows = match self
            .timed(
                "which subscriptions write permd's tables",
                client.query(subscription::SUBSCRIBED, &[]),
            )
            .await
        {
            Ok(rows) => rows,
            // Only a refusal: a schema not migrated yet is the load's to report, and the
            // next session asks again.
            Err(Error::Postgres(error))
                if error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                tracing::warn!(
                    error = %error_chain(&error),
                    "cannot tell whether logical replication writes permd's tables; if it \
                     does, permd's triggers on them must be ENABLE ALWAYS"
                );
                self.subscriptions_unknown = true;
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let subscribed = rows
            .iter()
            .map(|row| {
                Ok(Subscribed {
                    subscription: row.try_get(0)?,
                    table: row.try_get(1)?,
                    not_always: row.try_get(2)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        match subscription::refusal(&subscribed) {
            None => Ok(()),
            Some(why) => {
                self.reload_due =
                    Some("logical replication wrote permd's tables past the changelog".into());
                Err(Error::Subscribed(why))
            }
        }
    }

    /// Whether the server is a standby (in recovery). On one, takes in how current it is
    /// with its primary, into `looks` and the status, and says in the log when its WAL
    /// receiver goes or comes back; on a primary, the status says there is nothing to be
    /// current with beyond it. A server that refuses the look is asked only whether it is
    /// a standby from then on, which gives no bound.
    async fn look(&mut self, client: &Client, looks: &mut Standby) -> Result<bool, Error> {
        const WHAT: &str = "whether the server is a standby";
        if !looks.blind {
            let at = now_micros();
            match self.timed(WHAT, client.query_one(LOOK, &[])).await {
                Ok(row) => {
                    self.same_backend(row.try_get("backend")?)?;
                    self.status.set_changelog_bytes(row.try_get(2)?);
                    self.clock(at, row.try_get(0)?);
                    return self.take_in(&row, at, looks);
                }
                // A server that refuses the look's functions (a role denied them, a managed
                // service that does not offer them) is followed as before they were asked.
                Err(Error::Postgres(error)) if error.as_db_error().is_some() => {
                    tracing::warn!(
                        error = %error_chain(&error),
                        "cannot tell how current the server is with its primary, if it is a \
                         standby: lag_seconds is measured against the server alone"
                    );
                    looks.blind = true;
                    self.status.set_upstream(Upstream::Unbounded);
                }
                Err(error) => return Err(error),
            }
        }
        let at = now_micros();
        let row = self.timed(WHAT, client.query_one(BLIND_LOOK, &[])).await?;
        self.same_backend(row.try_get("backend")?)?;
        self.status.set_changelog_bytes(row.try_get(2)?);
        self.clock(at, row.try_get(0)?);
        Ok(row.try_get(1)?)
    }

    /// Holds the session to one server process (`pg_backend_pid()`, which every look and
    /// every poll read), the first this connection's looks found. A pooler in transaction
    /// or statement mode (PgBouncer's `pool_mode = transaction`) runs each of a client's
    /// transactions in whichever server session is free: LISTEN hears nothing for permd
    /// there (PgBouncer drops what comes to a session no client holds), and permd's session
    /// settings stay behind for the application's transactions. It shows once a statement
    /// lands in another session than the first look's, or, most often, once a statement
    /// prepared in one session (the poll, each look) is run in another that does not know
    /// it (`session`); this catches a pooler that prepares them again in each session.
    fn same_backend(&mut self, now: i32) -> Result<(), Error> {
        match self.backend {
            Some(was) if was != now => Err(Error::Pooled(format!(
                "the sync connection's statements ran in two server sessions (process {was}, \
                 then {now})"
            ))),
            _ => {
                self.backend = Some(now);
                Ok(())
            }
        }
    }

    /// Takes in the server's clock (`server`, µs since the epoch) as a look asked for at
    /// `sent` read it, and says in the log when it drifts from this host's by more than
    /// `CLOCK_TOLERANCE`, or comes back within it: expiry is judged by this host's clock.
    fn clock(&mut self, sent: i64, server: i64) {
        let skew = Skew::measure(sent, server, now_micros());
        self.status.set_clock_skew(skew.micros);
        let off = skew.beyond(CLOCK_TOLERANCE);
        if off && !self.clock_off {
            tracing::warn!(
                skew_seconds = skew.micros as f64 / 1e6,
                "this host's clock and postgres's differ: expires_at is compared with this \
                 host's clock, so an expiring row ends that much {} here than in postgres; \
                 synchronize the clocks (NTP)",
                if skew.micros > 0 { "later" } else { "earlier" }
            );
        } else if !off && self.clock_off {
            tracing::info!(
                skew_seconds = skew.micros as f64 / 1e6,
                "this host's clock agrees with postgres's again"
            );
        }
        self.clock_off = off;
    }

    /// Takes in a look's `row`, asked for at `at`: whether the server is a standby, the
    /// return value, and on one how current it is.
    fn take_in(&self, row: &Row, at: i64, looks: &mut Standby) -> Result<bool, Error> {
        if !row.try_get::<_, bool>(1)? {
            self.status.set_upstream(Upstream::Unbounded);
            return Ok(false);
        }
        let receiving = looks.receiving();
        let upstream = looks.look(Look {
            at,
            received: row.try_get(3)?,
            replayed: row.try_get(4)?,
            receiver: row.try_get(5)?,
            streaming: row.try_get(6)?,
        });
        self.status.set_upstream(upstream);
        match (receiving, looks.receiving()) {
            _ if upstream == Upstream::Unbounded => {}
            (None | Some(true), Some(false)) => tracing::warn!(
                "the standby has no WAL receiver streaming from its primary: permd is as \
                 stale as the standby, and lag_seconds grows until it streams again"
            ),
            (Some(false), Some(true)) => {
                tracing::info!("the standby streams from its primary again");
            }
            _ => {}
        }
        Ok(true)
    }

    /// Takes in one message from the connection; true when it calls for a poll.
    fn hear(&mut self, message: Message) -> bool {
        let mut xid = None;
        let mut busy = false;
        let verdict = match message {
            Message::Heard(payload) => match Heard::parse(&payload, self.signing.key.as_ref()) {
                Ok(heard) => {
                    self.signing.proven |= heard.has_rows();
                    xid = Some(heard.xid());
                    if heard.auto() {
                        busy = self
                            .busy
                            .as_mut()
                            .is_some_and(|busy| busy.heard(heard.xid(), Instant::now()));
                        self.busy_wanted |= busy;
                    }
                    self.follower.heard(Some(heard))
                }
                // Without a key (said once at connect) every notification is a doorbell.
                Err(Refused::Unsigned) if self.signing.key.is_none() => {
                    self.signing.stale = true;
                    self.follower.heard(None)
                }
                Err(Refused::Unsigned) => {
                    self.refused(
                        "its signature does not verify (forged, sent by triggers older than \
                         migration 0006, or signed under a key rotated since permd read it)",
                    );
                    // The key may have been rotated.
                    self.signing.stale = true;
                    self.follower.heard(None)
                }
                Err(Refused::Unreadable) => self.follower.heard(None),
            },
            Message::Lost => {
                tracing::warn!(
                    capacity = self.config.notification_capacity,
                    "notifications waited for the applier in numbers: those after them were \
                     dropped, and the changelog is read instead until the polls catch up"
                );
                self.follower.lost();
                Verdict::Poll
            }
        };
        let poll = match verdict {
            Verdict::Apply(change) => {
                // Beside a reload, the journal notes whether the commit is past its
                // snapshot.
                if let Some(reloading) = &self.reloading {
                    let past = xid.is_none_or(|xid| !reloading.snapshot.sees(xid));
                    self.store.writes_newer(past);
                }
                change.of_shard(self.config.shard).apply(&self.store);
                self.status.followed();
                false
            }
            Verdict::Skip => false,
            Verdict::Poll => true,
            Verdict::Replayed => {
                self.refused("its transaction's notifications were already heard (a replay)");
                true
            }
        };
        poll || busy
    }

    /// Stops listening for 'auto' writers (`sync::busy`): they send nothing from now on,
    /// and the polls, every `--busy-poll-ms`, read their commits.
    async fn leave_slot(&mut self, client: &Client) -> Result<(), Error> {
        let Some(busy) = self.busy.as_mut() else {
            return Ok(());
        };
        let waited = busy.waiting();
        let slot = busy.leave(Instant::now());
        // Dropped, the connection that waits for a slot or holds it lets it go; a wait
        // is cancelled too, which a pooler between would keep (`busy::CANCEL_WAIT`).
        let waiter = self.slot_waiter.take();
        let waiting = waiter.as_ref().and_then(SlotWaiter::waiting_process);
        let had_waiter = waiter.is_some();
        drop(waiter);
        if let Some(process) = waiting {
            self.timed(
                "cancelling the wait for a busy slot",
                client.query_one(busy::CANCEL_WAIT, &[&process]),
            )
            .await?;
        }
        match slot {
            Some(slot) if !had_waiter => {
                self.timed(
                    "letting the busy slot go",
                    client.query_one(busy::LEAVE_SLOT, &[&slot]),
                )
                .await?;
            }
            None if !waited => return Ok(()),
            _ => {}
        }
        self.status.busy_polling_started();
        tracing::debug!(
            slot,
            "writers with permd.notify = auto commit more than 500 transactions a second: \
             polling for their commits instead"
        );
        Ok(())
    }

    /// Takes the slot the waiting connection took, or notes that its connection ended
    /// (`sync::busy`). A slot taken is listened on from the next poll on, which reads
    /// every silent commit.
    fn slot_waited(&mut self) {
        let Some(waiter) = self.slot_waiter.as_mut() else {
            return;
        };
        let now = Instant::now();
        if let Some(slot) = waiter.took() {
            if let Some(busy) = self.busy.as_mut() {
                busy.took(Some(slot), now);
                self.status.set_busy_polling(busy.polling());
            }
            tracing::debug!(
                slot,
                "listening for writers with permd.notify = auto (the slot waited for)"
            );
        } else if waiter.ended() {
            let held = waiter.held();
            self.slot_waiter = None;
            self.waiter_failed = Some(now);
            if let Some(busy) = self.busy.as_mut() {
                if held || busy.waiting() {
                    busy.took(None, now);
                    self.status.set_busy_polling(busy.polling());
                }
            }
        }
    }

    /// After a poll that read the changes of `read` transactions: takes a slot if it is
    /// time to listen again (`sync::busy`). True when one was taken where none was held.
    async fn take_slot(&mut self, client: &Client, read: usize) -> Result<bool, Error> {
        let time = self
            .busy
            .as_mut()
            .is_some_and(|busy| busy.after_poll(read, Instant::now()));
        Ok(time && self.slot_waiter.is_none() && self.try_slot(client).await?)
    }

    /// A poll read a full batch: a daemon polling for 'auto' writers listens again, its
    /// polls having fallen behind them (`sync::busy::BEHIND_HOLD`).
    async fn fell_behind(&mut self, client: &Client) -> Result<(), Error> {
        let try_for_one = self
            .busy
            .as_mut()
            .is_some_and(|busy| busy.behind(Instant::now()));
        if try_for_one && self.slot_waiter.is_none() {
            tracing::debug!(
                "the polls for writers with permd.notify = auto fell behind them by a full \
                 batch: listening again, for ten seconds at least"
            );
            self.try_slot(client).await?;
        }
        Ok(())
    }

    /// Tries for a slot (`sync::busy`): true when one was taken.
    async fn try_slot(&mut self, client: &Client) -> Result<bool, Error> {
        if self.busy.is_none() {
            return Ok(false);
        }
        let row = self
            .timed("taking a busy slot", client.query_opt(busy::TAKE_SLOT, &[]))
            .await?;
        let slot: Option<i32> = row.map(|row| row.try_get(0)).transpose()?;
        if let Some(busy) = self.busy.as_mut() {
            busy.took(slot, Instant::now());
            self.status.set_busy_polling(busy.polling());
        }
        if slot.is_some() {
            tracing::debug!(slot, "listening for writers with permd.notify = auto");
        } else {
            self.wait_for_slot();
        }
        Ok(slot.is_some())
    }

    /// No slot was free: waits for one on a connection of its own, unless the last such
    /// connection failed less than [`busy::WAITER_RETRY`] ago (`sync::busy`).
    fn wait_for_slot(&mut self) {
        let Some(busy) = self.busy.as_mut() else {
            return;
        };
        let retry = self
            .waiter_failed
            .is_some_and(|failed| failed.elapsed() < busy::WAITER_RETRY);
        if self.slot_waiter.is_some() || retry {
            return;
        }
        busy.queued();
        tracing::debug!(
            "no busy slot free (a silent transaction of writers with permd.notify = auto is \
             open, or eight daemons listen): waiting for one on a connection of its own"
        );
        let say = self
            .waiter_failed
            .is_none_or(|failed| failed.elapsed() >= busy::WAITER_QUIET);
        self.slot_waiter = Some(SlotWaiter::spawn(
            self.config.clone(),
            self.own_settings(),
            self.server.clone(),
            say,
        ));
    }

    /// Counts a notification whose rows were not applied, and logs it (a flood of them
    /// once a minute, with its count).
    fn refused(&mut self, why: &str) {
        self.status.refused();
        let (unlogged, logged_at) = &mut self.refused_quiet;
        *unlogged += 1;
        if logged_at.is_none_or(|at| at.elapsed() >= QUIET) {
            tracing::warn!(
                notifications = *unlogged,
                "a notification's rows were not applied: {why}; the changelog is read instead"
            );
            *unlogged = 0;
            *logged_at = Some(Instant::now());
        }
    }

    /// Reads the key that signs notifications. A key that cannot be read is logged (at
    /// warning level once a session, `first`), not fatal: permd then polls for every
    /// commit, as with notifications off.
    async fn read_key(&mut self, client: &Client, first: bool) -> Result<(), Error> {
        self.signing = Signing {
            read_at: Some(Instant::now()),
            ..Signing::default()
        };
        let read = self
            .timed(
                "the read of the notification key",
                client.query_opt("SELECT inner_pad FROM permd.notify_key", &[]),
            )
            .await;
        let why = match read {
            Ok(row) => {
                let pad: Option<Vec<u8>> = row.map(|row| row.try_get(0)).transpose()?;
                self.signing.key = pad.as_deref().and_then(NotifyKey::from_inner_pad);
                if self.signing.key.is_some() {
                    return Ok(());
                }
                "permd.notify_key holds no key (SELECT permd.rotate_notify_key() makes one)"
                    .to_owned()
            }
            Err(Error::Postgres(e)) if e.as_db_error().is_some() => {
                format!(
                    "{} (run `permd migrate`; permd's role needs SELECT on permd.notify_key)",
                    error_chain(&e)
                )
            }
            Err(e) => return Err(e),
        };
        if first {
            tracing::warn!(
                "cannot read the key that signs notifications: {why}; every commit is read \
                 from the changelog instead"
            );
        } else {
            tracing::debug!(%why, "cannot read the key that signs notifications");
        }
        Ok(())
    }

    /// Opens the connection, with the COPY tap on its socket, and spawns the task that
    /// drives it, forwarding notifications to the returned channel; then sets the
    /// session's settings, permd's own and its overrides of the database's
    /// (`connect::first_statements`).
    /// The returned future resolves when the connection ends.
    async fn connect(
        &mut self,
    ) -> Result<
        (
            Client,
            Tap,
            mpsc::Receiver<Message>,
            impl Future<Output = Error>,
        ),
        Error,
    > {
        self.backend = None;
        let (mut config, settings) = connect::config(&self.config.database_url)?;
        connect::daemon_defaults(&mut config);
        let tap = Tap::default();
        let (client, mut connection) = self
            .timed("the connection", connect::connect(&config, &settings, &tap))
            .await?;
        let (heard, heard_rx) = mpsc::channel(self.config.notification_capacity.max(1));
        let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx))
            .filter_map(|message| {
                std::future::ready(match message {
                    Ok(AsyncMessage::Notification(n)) => Some(Ok(n.payload().to_owned())),
                    Ok(AsyncMessage::Notice(notice)) => {
                        tracing::debug!(notice = %notice.message(), "postgres notice");
                        None
                    }
                    Ok(_) => None,
                    Err(error) => Some(Err(Error::Postgres(error))),
                })
            });
        let driver = tokio::spawn(forward(messages, heard, self.status.clone()));
        self.driver = Some(driver.abort_handle());
        let closed = async move { driver.await.unwrap_or(Error::Closed) };
        // A statement kept waiting for a lock (another session's LOCK TABLE, a migration's
        // ALTER TABLE, VACUUM FULL on a table permd reads) is cancelled by Postgres itself
        // after half the query timeout, with its reason, before our own deadlines (the
        // query timeout, a full load's stall) would take it for a dead connection: a poll
        // would be abandoned with its backend still queued for the lock, and a full load
        // would be reported as stalled.
        let own = self.own_settings();
        // Before the settings, which a pooler in transaction mode would leave behind in a
        // server session the application then gets. The second connection is waited for
        // half the query timeout at most, so that the first's statement has the rest.
        let wait = self.config.query_timeout / 2;
        let process = self
            .timed(
                "the session's process",
                connect::alone_in_its_session(
                    &client,
                    tap.announced_process(),
                    &config,
                    &settings,
                    wait,
                ),
            )
            .await?;
        self.backend = Some(process);
        // First, so that every statement of the session runs with them.
        for statements in connect::first_statements(&config, &own) {
            self.timed("the session's settings", client.batch_execute(&statements))
                .await?;
        }
        Ok((client, tap, heard_rx, closed))
    }

    /// The settings of permd's own that a session of the sync connection, or of a reload's,
    /// starts with: `SESSION` and `lock_timeout` (`connect`).
    fn own_settings(&self) -> String {
        let lock_timeout = (self.config.query_timeout.as_millis() / 2).max(1);
        format!("{SESSION}; SET lock_timeout = {lock_timeout}")
    }

    /// Whether permd's tables hold transaction ids restored from another cluster (a dump
    /// of the database restored elsewhere: migration 0007), which no transaction of this
    /// server wrote: changelog rows (passed over by the lag, and read as ordinary changes
    /// once this server's ids pass theirs), and a pruning mark, which says nothing about
    /// what was pruned here. Such a mark is returned: the session loads unless its last
    /// load saw it (its cursor then past anything pruned before), and its polls pass over
    /// it (`mark_at_load`); the warning says how to remove both. Where the schema lacks
    /// `permd.forget_restored_xids()`, its prune could have deleted rows here without
    /// moving the mark: an error, which names the fix. The warning is given once for the
    /// same restored ids, and again only when they change.
    async fn restored(&mut self, client: &Client) -> Result<Option<Cursor>, Error> {
        let row = self
            .timed(
                "the look for restored transaction ids",
                client.query_opt(
                    "SELECT r.pruned_xid::text, r.pruned_id, \
                        pg_snapshot_xmax(pg_current_snapshot())::text, \
                        (SELECT max(xid) FROM permd.changelog)::text, \
                        to_regprocedure('permd.forget_restored_xids()') IS NOT NULL \
                     FROM permd.retention r LIMIT 1",
                    &[],
                ),
            )
            .await?
            .ok_or(Error::NoRetentionRow)?;
        let (mark, mark_id, next, newest): (String, i64, String, Option<String>) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        let forgets: bool = row.try_get(4)?;
        let next = parse_xid(&next)?;
        let pruned = Cursor {
            xid: parse_xid(&mark)?,
            id: mark_id,
        };
        let restored_mark = pruned.xid >= next;
        let newest = newest.as_deref().map(parse_xid).transpose()?;
        let restored_rows = newest.is_some_and(|newest| newest >= next);
        if !(restored_mark || restored_rows) {
            self.restored_said = None;
            return Ok(None);
        }
        let what = match (restored_mark, restored_rows) {
            (true, true) => format!(
                "permd.changelog and permd.retention's pruning mark hold transaction ids \
                 this server has not reached (up to {}, and the mark {mark}; the server is \
                 at {next})",
                newest.unwrap_or_default()
            ),
            (true, false) => format!(
                "permd.retention's pruning mark ({mark}) is a transaction id this server \
                 has not reached (it is at {next})"
            ),
            _ => format!(
                "permd.changelog holds transaction ids this server has not reached (up to \
                 {}; it is at {next})",
                newest.unwrap_or_default()
            ),
        };
        let restored = "written in another cluster and restored here (a dump of the \
                        database restored into another server)";
        if restored_mark && !forgets {
            return Err(Error::Restored(format!(
                "{what}: {restored}; run `permd migrate`, then `SELECT \
                 permd.prune_changelog()` as the owner of schema permd"
            )));
        }
        let said = Some((mark, newest.map(|newest| newest.to_string())));
        if self.restored_said != said {
            tracing::warn!(
                "{what}: {restored}; permd passes over them, and `SELECT \
                 permd.forget_restored_xids()` (or the next `permd.prune_changelog()`) as \
                 the owner of schema permd removes them"
            );
            self.restored_said = said;
        }
        Ok(restored_mark.then_some(pruned))
    }

    /// Loads a full snapshot, swaps it in and reads the changelog from it on.
    /// `rewind`: the watermark may go down (after a crash, xids below it were reissued).
    async fn reload(
        &mut self,
        client: &mut Client,
        tap: &Tap,
        why: &str,
        rewind: bool,
    ) -> Result<(), Error> {
        tracing::info!(reason = why, "full load starting");
        self.status.full_load_started(why, false);
        let started = Instant::now();
        let Loaded {
            state,
            snapshot,
            rows,
            mark,
            tables,
        } = loader::load(
            client,
            tap,
            self.config.shard,
            self.config.query_timeout,
            self.store.loaded(),
            None,
        )
        .await?;
        let snapshot = self.as_read(&snapshot);
        let old = self.store.replace(state);
        self.follower.loaded(snapshot.clone());
        // The old generation may be large: free it off the async runtime.
        tokio::task::spawn_blocking(move || drop(old));
        self.cursor = Some(Position::at(snapshot.clone()));
        self.note_load(mark, tables, rows, started.elapsed(), why, None);
        if rewind {
            self.store.rewind(&snapshot);
        } else {
            self.store.advance(&snapshot);
        }
        Ok(())
    }

    /// Notes a full load swapped in (`swap`: a reload beside the polls, whose swap, with
    /// the changes applied meanwhile copied into the loaded generation, took that long):
    /// its pruning mark and tables, when it ended, how long it took and at what rate;
    /// counts it and logs it. Before the watermark moves, so that whoever sees the new
    /// watermark also sees the load counted.
    fn note_load(
        &mut self,
        mark: Cursor,
        tables: String,
        rows: u64,
        took: Duration,
        why: &str,
        swap: Option<Duration>,
    ) {
        self.mark_at_load = mark;
        self.tables_at_load = tables;
        self.last_load = Some((Instant::now(), took));
        if rows >= LOAD_RATE_SAMPLE {
            self.load_rate = Some(rows as f64 / took.as_secs_f64().max(1e-6));
        }
        self.status.full_load_done(took.as_millis() as u64, why);
        tracing::info!(
            reason = why,
            rows,
            took_ms = took.as_millis() as u64,
            beside_polls = swap.is_some(),
            // Changes wait for it: the applier writes nothing else meanwhile.
            swap_ms = swap.map(|swap| swap.as_millis() as u64),
            "full load swapped in"
        );
    }

    /// Begins a reload beside the polls, for `why` (a reason a poll gave): the load runs on
    /// a connection and a thread of its own (`spawn_reload_thread`), while the polls
    /// and notifications go on applying changes to the current generation, so that a
    /// change committed during the reload is answered as soon as it would be without one,
    /// rather than once the reload has swapped in. Returns once the load's snapshot is
    /// taken (the writes from then on are told apart by it); `false` where no such
    /// connection could be opened to the same server (the caller then loads on the sync
    /// connection, which holds changes back until the load ends). `server`: the sync
    /// connection's, which the load's must reach. `rewind`: after a crash or on another
    /// server, the polls go on from the load's snapshot (`polls_past_the_load`), and the
    /// watermark is rewound and confirmed at the swap (`Reloading::rewind`). On a standby
    /// too (since session 75), its snapshot cut to its horizon as the polls' are
    /// (`as_read`). A compaction under way is dropped: the load reclaims what it would.
    async fn begin_reload(
        &mut self,
        why: Cow<'static, str>,
        server: Option<Server>,
        rewind: bool,
    ) -> Result<bool, Error> {
        // Waited for no longer than the pooler check's second connection is: a session
        // pooler with one server session for permd queues it until the first's is free,
        // which it never is, and the polls wait meanwhile.
        let wait = (self.config.query_timeout / 2).min(connect::SECOND_SESSION_WAIT);
        let spawned = spawn_reload_thread(self.config.clone(), self.own_settings(), server, wait)
            .map_err(|error| {
                Error::Builder(format!("could not start the reload's thread: {error}"))
            });
        let open = match spawned {
            Ok(mut thread) => (&mut thread.opened)
                .await
                .unwrap_or_else(|_| Err(Error::Builder("the reload's thread ended".into())))
                .map(|()| thread),
            Err(error) => Err(error),
        };
        let ReloadThread {
            begun,
            loaded,
            ended,
            stop,
            ..
        } = match open {
            Ok(thread) => thread,
            Err(error) => {
                tracing::warn!(
                    reason = &*why,
                    error = %error_chain(&error),
                    "could not open a connection to reload beside the polls: loading on \
                     the sync connection, which holds every change back until the load \
                     ends"
                );
                return Ok(false);
            }
        };
        if self.compacting.take().is_some() {
            tracing::info!("compaction dropped: a reload begins, which reclaims as much");
        }
        tracing::info!(reason = &*why, "full load starting, beside the polls");
        self.status.full_load_started(&why, true);
        let started = Instant::now();
        self.store.begin_reload();
        self.load_ended = ended;
        let Ok(Begun {
            snapshot,
            mark,
            tables,
        }) = begun.await
        else {
            // The load ended before its snapshot: its error.
            self.store.abandon_journal();
            stop.cancel();
            self.reload_due.get_or_insert(why);
            self.rewind_due |= rewind;
            return Err(match loaded.await {
                Ok(Err(error)) => error,
                _ => Error::Builder("the reload's thread ended before its snapshot".into()),
            });
        };
        self.reloading = Some(Reloading {
            loaded,
            snapshot: self.as_read(&snapshot),
            mark,
            tables,
            rewind,
            why,
            started,
            stop,
        });
        if rewind {
            self.polls_past_the_load();
        }
        Ok(true)
    }

    /// Marks a reload beside the polls that did not swap in as due at the next session,
    /// with its rewind.
    fn load_again(&mut self, reloading: &Reloading) {
        self.reload_due.get_or_insert(reloading.why.clone());
        self.rewind_due |= reloading.rewind;
    }

    /// Moves the polls' place to the snapshot of the reload just begun, over its tables,
    /// for a backlog loaded in full, or where the cursor says nothing of the server's
    /// transactions (a crash, another server): the rows it sees are the load's to bring
    /// (the current generation lacks them until the swap, as it lacked them while they
    /// waited), and the polls beside it read only those past it, applying what is
    /// committed meanwhile. The watermark stays where it was until the swap (`advance`).
    /// Should the load not swap in, the next session loads first (`reload_due`).
    fn polls_past_the_load(&mut self) {
        if let Some(reloading) = &self.reloading {
            self.follower.loaded(reloading.snapshot.clone());
            self.cursor = Some(Position::at(reloading.snapshot.clone()));
            self.tables_at_load.clone_from(&reloading.tables);
        }
    }

    /// The outcome of the reload under way's load, once it has one.
    async fn load_outcome(&mut self) -> Result<Loaded, Error> {
        let Some(reloading) = self.reloading.as_mut() else {
            return Err(Error::Builder("no reload under way".into()));
        };
        (&mut reloading.loaded)
            .await
            .unwrap_or_else(|_| Err(Error::Builder("the reload's task ended unanswered".into())))
    }

    /// Swaps in the generation a reload beside the polls loaded, with every key written
    /// since past the load's snapshot copied into it from the current one (on a blocking
    /// thread: this task, the only writer, waits, so no write runs meanwhile). The keys it
    /// copies hold every change up to where the polls are, and the others are as new in
    /// the loaded generation, so no key goes back, and the mirror holds what the polls'
    /// place says: the changelog is read on from there when that place covers the load's
    /// snapshot (as it does unless the polls stopped early, at a change the load does not
    /// cover), and from the load's snapshot otherwise (reading again, whole, the keys
    /// applied past it). The watermark, held where it was when the reload began
    /// (`advance`), moves to that place, or is rewound to it and confirmed
    /// (`Reloading::rewind`). A load that failed ends the session, and the next one loads
    /// first.
    async fn finish_reload(&mut self, loaded: Result<Loaded, Error>) -> Result<(), Error> {
        let Some(reloading) = self.reloading.take() else {
            return Ok(());
        };
        let Loaded {
            state,
            snapshot,
            rows,
            mark,
            tables,
        } = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                self.store.abandon_journal();
                self.load_again(&reloading);
                return Err(error);
            }
        };
        let snapshot = self.as_read(&snapshot);
        let store = self.store.clone();
        let swapping = Instant::now();
        let old = match tokio::task::spawn_blocking(move || store.finish_reload(state)).await {
            Ok(old) => old,
            Err(error) => {
                self.load_again(&reloading);
                return Err(Error::Builder(error.to_string()));
            }
        };
        let swap = swapping.elapsed();
        // The old generation may be large: free it off the async runtime.
        tokio::task::spawn_blocking(move || drop(old));
        // From the polls' place, the keys applied beside the load are not read again (a
        // busy reload's thousands, in one poll that holds the notifications back).
        let place = match self.cursor.take() {
            Some(place) if place.seen.covers(&snapshot) => place,
            _ => {
                self.follower.loaded(snapshot.clone());
                Position::at(snapshot.clone())
            }
        };
        let seen = place.seen.clone();
        self.cursor = Some(place);
        let took = reloading.started.elapsed();
        self.note_load(mark, tables, rows, took, &reloading.why, Some(swap));
        if reloading.rewind {
            self.store.rewind(&seen);
            self.store.confirm();
        } else {
            self.store.advance(&seen);
        }
        Ok(())
    }

    /// Begins a compaction: the current generation rebuilt from memory on a blocking
    /// thread (`State::rebuilt`), which reclaims what a full load would (names no row
    /// uses, lists moved to the heap, subjects moved out of the loaded tier) without
    /// reading the set from Postgres again. Changes go on being applied meanwhile; the
    /// store notes the keys they touch, and `finish_compaction` copies them into the
    /// rebuilt generation before swapping it in.
    fn begin_compaction(&mut self, why: String) {
        self.begin_compaction_after(why, || ());
    }

    /// `begin_compaction`, its rebuild begun once `first` has run on the rebuild's
    /// thread (tests hold it there).
    fn begin_compaction_after(&mut self, why: String, first: impl FnOnce() + Send + 'static) {
        tracing::info!(reason = why, "compaction starting");
        let old = self.store.begin_compaction();
        // A notification of its own: one that a compaction before left unheard would end
        // a wait for this one's rebuild too early.
        self.rebuilt = Arc::new(Notify::new());
        let rebuild = tokio::task::spawn_blocking({
            let (old, rebuilt) = (Arc::clone(&old), Arc::clone(&self.rebuilt));
            move || {
                first();
                let state = old.rebuilt();
                rebuilt.notify_one();
                state
            }
        });
        self.compacting = Some(Compacting {
            old,
            rebuild,
            why,
            started: Instant::now(),
        });
    }

    /// Swaps in the rebuilt generation, with the keys written since the compaction began
    /// copied into it (on a blocking thread: this task, the only writer, waits, so no
    /// write runs meanwhile). A generation a full load replaced meanwhile is dropped.
    async fn finish_compaction(&mut self) -> Result<(), Error> {
        let Some(Compacting {
            old,
            rebuild,
            why,
            started,
        }) = self.compacting.take()
        else {
            return Ok(());
        };
        let state = match rebuild.await {
            Ok(state) => state,
            Err(error) => {
                self.store.abandon_journal();
                return Err(Error::Builder(error.to_string()));
            }
        };
        let subjects = state.subject_count();
        let store = self.store.clone();
        let (replaced, old) = tokio::task::spawn_blocking(move || {
            let replaced = store.finish_compaction(&old, state);
            (replaced, old)
        })
        .await
        .map_err(|e| Error::Builder(e.to_string()))?;
        let swapped = replaced.is_some();
        // The replaced generation may be large: its last handles here are let go of off
        // the async runtime, as a full load's are, and without the applier waiting.
        tokio::task::spawn_blocking(move || drop((replaced, old)));
        if !swapped {
            tracing::info!(
                reason = why,
                "compaction dropped: a full load replaced the generation it rebuilt"
            );
            return Ok(());
        }
        let took = started.elapsed();
        self.last_load = Some((Instant::now(), took));
        self.status.compaction_done(took.as_millis() as u64);
        tracing::info!(
            reason = why,
            subjects,
            took_ms = took.as_millis() as u64,
            "compaction swapped in"
        );
        Ok(())
    }

    /// Reads and applies one batch of the changelog.
    async fn poll(&mut self, client: &Client, poll: &Statement) -> Result<Polled, Error> {
        let Some(position) = self.cursor.clone() else {
            return Ok(Polled::Reload("nothing loaded"));
        };
        let in_progress: Vec<String> = position.seen.xip().iter().map(u64::to_string).collect();
        let xmax = position.seen.xmax();
        let part = position.part.unwrap_or_default();
        let part_of_xmax = match position.part {
            Some(part) if part.xid == xmax => part.id,
            _ => i64::MIN,
        };
        let rows = self
            .timed(
                "a poll",
                client.query(
                    poll,
                    &[
                        &in_progress,
                        &xmax.to_string(),
                        &self.config.batch_rows,
                        &part.xid.to_string(),
                        &part.id,
                        &part_of_xmax,
                        &self.horizon_only,
                    ],
                ),
            )
            .await?;
        self.status.polled();

        let mut snapshot = None;
        let mut pruned = Cursor::default();
        let mut last: Option<(Cursor, i64)> = None;
        // The transactions whose rows it read (`sync::busy`).
        let mut transactions = 0;
        let mut keys: Vec<(i64, Key)> = Vec::new();
        let mut tuples: HashMap<(String, String), Vec<TupleRow>> = HashMap::new();
        let mut limits: HashMap<String, Vec<(String, i64)>> = HashMap::new();
        // The reload markers' transactions (a TRUNCATE's, `request_reload()`'s).
        let mut markers: Vec<Option<u64>> = Vec::new();
        let mut pending_since: Option<i64> = None;
        let mut backend = None;
        let mut tables = String::new();
        for row in &rows {
            let tag: &str = row.try_get(0)?;
            let a: Option<String> = row.try_get(1)?;
            let b: Option<String> = row.try_get(2)?;
            let c: Option<String> = row.try_get(3)?;
            let n: Option<i64> = row.try_get(4)?;
            let a = a.unwrap_or_default();
            match tag {
                "h" => {
                    snapshot = Some(parse_snapshot(&a)?);
                    pruned = Cursor {
                        xid: parse_xid(b.as_deref().unwrap_or("0"))?,
                        id: n.unwrap_or(0),
                    };
                    pending_since = c.and_then(|c| c.parse().ok());
                }
                "e" => {
                    let count = b.as_deref().unwrap_or("0").parse::<i64>().unwrap_or(0);
                    transactions = c.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
                    last = Some((
                        Cursor {
                            xid: parse_xid(&a)?,
                            id: n.unwrap_or(0),
                        },
                        count,
                    ));
                }
                "k" => match a.as_str() {
                    "t" => keys.push((
                        n.unwrap_or(0),
                        Key::Grant(b.unwrap_or_default(), c.unwrap_or_default()),
                    )),
                    "l" => keys.push((n.unwrap_or(0), Key::Limits(b.unwrap_or_default()))),
                    _ => markers.push(c.as_deref().and_then(|xid| parse_xid(xid).ok())),
                },
                "t" => tuples
                    .entry((a, b.unwrap_or_default()))
                    .or_default()
                    .push(TupleRow {
                        permission: c.unwrap_or_default(),
                        expires_at: n,
                    }),
                "l" => limits
                    .entry(a)
                    .or_default()
                    .push((c.unwrap_or_default(), n.unwrap_or(0))),
                "p" => {
                    backend = n;
                    tables = a;
                }
                other => return Err(Error::Protocol(format!("unknown poll row tag {other:?}"))),
            }
        }
        let backend = backend.ok_or_else(|| Error::Protocol("poll returned no process".into()))?;
        self.same_backend(i32::try_from(backend).unwrap_or_default())?;
        // The snapshot comes with the pruning mark, from permd.retention's one row.
        let taken: Snapshot = snapshot.ok_or(Error::NoRetentionRow)?;
        let snapshot = self.as_read(&taken);
        tracing::debug!(
            from = %position.seen,
            part = ?position.part,
            snapshot = %snapshot,
            keys = keys.len(),
            pending = pending_since.is_some(),
            "polled the changelog"
        );

        // Tables dropped and created again (a schema restored over them, `DROP SCHEMA
        // permd` and `permd migrate` again) hold another set, and their changelog starts
        // anew: nothing of them follows from the cursor.
        if tables != self.tables_at_load {
            // As at a session's start: restored from another cluster, they may hold its
            // transaction ids.
            self.restored(client).await?;
            return Ok(Polled::Reload(
                "permd's tables were created again since the last full load",
            ));
        }
        // A mark the last load saw records deletions that load holds the changes of
        // (rows deleted above its horizon by hand included: reloading for them would load
        // again at every poll while an older transaction stays open). A mark no
        // transaction of this server could have made was restored from another cluster
        // (`restored`); one that became so since the load ends the session, whose next one
        // looks at it first.
        // A reload under way holds what its snapshot saw: the rows pruned before it, and
        // the changes a reload marker it sees asked for. The polls beside it pass over
        // those, and apply the rest.
        let loading = self.reloading.as_ref();
        let pruned_for_load = loading.is_some_and(|r| r.mark == pruned);
        if position.first_unapplied() < pruned && pruned != self.mark_at_load && !pruned_for_load {
            if pruned.xid < taken.xmax() {
                return Ok(Polled::Reload("changelog pruned past the cursor"));
            }
            return Err(Error::Protocol(format!(
                "permd.retention's pruning mark became {} since the last full load, above \
                 every transaction id of this server: reconnecting to look at it",
                pruned.xid
            )));
        }
        let loaded = |marker: &Option<u64>| {
            loading.is_some_and(|r| marker.is_some_and(|xid| r.snapshot.sees(xid)))
        };
        if !markers.iter().all(loaded) {
            return Ok(Polled::Reload(
                "TRUNCATE or permd.request_reload() in the changelog",
            ));
        }
        // Beside a reload, the journal notes whether these rows are past its snapshot: a
        // poll's snapshot taken after the load's sees everything it does.
        if let Some(reloading) = loading {
            self.store.writes_newer(taken.covers(&reloading.snapshot));
        }
        // Each key is rewritten whole, in the order of its last change: a reader sees a
        // transaction's keys change in the order it wrote them, and the keys of
        // transactions that did not overlap in the order they committed (for overlapping
        // ones, the changelog does not know the commit order). Consecutive keys of one
        // subject change at once, in one pass over its list: one at a time, a large
        // subject's list moved once a key.
        keys.sort_unstable_by_key(|(position, _)| *position);
        let mut next = keys.iter().peekable();
        while let Some((_, key)) = next.next() {
            match key {
                Key::Grant(subject, object) => {
                    let mut rows_of = |object: &String| {
                        tuples
                            .remove(&(subject.clone(), object.clone()))
                            .unwrap_or_default()
                    };
                    let mut run = vec![(object, rows_of(object))];
                    while let Some((_, Key::Grant(_, object))) =
                        next.next_if(|(_, key)| matches!(key, Key::Grant(s, _) if s == subject))
                    {
                        run.push((object, rows_of(object)));
                    }
                    let changes: Vec<(&str, &[TupleRow])> = run
                        .iter()
                        .map(|(object, rows)| (object.as_str(), rows.as_slice()))
                        .collect();
                    self.store.set_grants(subject, &changes);
                }
                Key::Limits(subject) => {
                    let rows = limits.remove(subject).unwrap_or_default();
                    self.store.set_limits(subject, &rows);
                }
            }
        }
        let reread: HashSet<Key> = keys.into_iter().map(|(_, key)| key).collect();

        match last {
            Some((last, count)) if count >= self.config.batch_rows => {
                // Rows of `last.xid` may remain; those of every transaction before it in
                // the changelog's order that the snapshot sees are applied.
                let seen = position.seen.extended(&snapshot, last.xid);
                self.advance(&seen);
                self.cursor = Some(Position {
                    seen,
                    part: Some(last),
                });
                self.follower.polled(snapshot, reread, false);
                Ok(Polled::More)
            }
            _ => {
                // The mirror is the database at the snapshot.
                self.advance(&snapshot);
                self.cursor = Some(Position::at(snapshot.clone()));
                // With changes waiting (on a standby), the mirror is as old as the oldest.
                self.status.caught_up(pending_since);
                self.follower.polled(snapshot, reread, true);
                Ok(Polled::CaughtUp {
                    pending: pending_since.is_some(),
                    transactions,
                })
            }
        }
    }

    /// A snapshot as the applier takes it: on a standby, only what it sees below its xmin
    /// (`Snapshot::horizon`, `horizon_only`), a poll's, a load's on the sync connection
    /// or beside the polls alike.
    fn as_read(&self, snapshot: &Snapshot) -> Snapshot {
        if self.horizon_only {
            snapshot.horizon()
        } else {
            snapshot.clone()
        }
    }

    /// Moves the watermark to what a poll applied, but not while a reload runs beside the
    /// polls: the current generation then lacks whatever called for the reload (a bulk
    /// write made with the triggers off before `permd.request_reload()`, changelog rows
    /// pruned unread), so a write token past it, `request_reload()`'s own included, waits
    /// for the reload's swap, as it did when a reload held every change back. Checks
    /// without a token see the changes applied meanwhile.
    fn advance(&self, seen: &Snapshot) {
        if self.reloading.is_none() {
            self.store.advance(seen);
        }
    }

    /// Why a compaction is due to reclaim what incremental changes left behind, if one is
    /// (`store::Growth`) and the last one, or full load, ended long enough ago
    /// (`COMPACTION_SPACING`).
    fn compaction_due(&self) -> Option<String> {
        let spaced = self
            .last_load
            .is_none_or(|(ended, took)| ended.elapsed() >= took * COMPACTION_SPACING);
        if !spaced {
            return None;
        }
        self.store
            .growth()
            .compaction_due(self.config.compaction_pct)
    }

    /// Why the changelog's rows still waiting after a full batch, read in `batch_took`,
    /// should be loaded in full rather than read, if they should: a bulk write (a plan
    /// edited for every subscriber, an import) or a long outage's writes. A poll reads a
    /// change much slower than a full load reads a tuple (each changed key looked up in
    /// `permd.tuples`: 80,000 changes a second here, against 0.7 to 4 million tuples), so
    /// past some backlog the load, of the whole set and the backlog's rows, is quicker.
    /// Loaded when estimated at least twice as fast, by this batch's rate and the last
    /// full load's (`LOAD_RATE_ASSUMED` until one was measured), and at least
    /// `BACKLOG_RELOAD_MIN` rows wait. Counted once until the applier has caught up again,
    /// and only past a full batch, so small polls never pay for it; the rows counted are
    /// those of the transactions the mirror's snapshot does not see (in progress in it, or
    /// begun since), up to the number that decides. A shard's daemon reads every shard's rows but keeps its own: its set is
    /// scaled to the whole.
    async fn backlog(
        &mut self,
        client: &Client,
        batch_took: Duration,
    ) -> Result<Option<String>, Error> {
        let Some(position) = self
            .cursor
            .as_ref()
            .filter(|_| self.config.backlog_reload && !self.backlog_counted)
        else {
            return Ok(None);
        };
        self.backlog_counted = true;
        let read_rate = self.config.batch_rows as f64 / batch_took.as_secs_f64().max(1e-6);
        let load_rate = self.load_rate.unwrap_or(LOAD_RATE_ASSUMED);
        let tuples = self.store.counts().tuples;
        let set = tuples as f64 * f64::from(self.config.shard.count());
        // Reading `n` rows takes n / read_rate; loading, (set + n) / load_rate. Twice as
        // fast: n / read_rate >= 2 (set + n) / load_rate.
        if load_rate <= 2.0 * read_rate {
            return Ok(None);
        }
        let threshold = (2.0 * set * read_rate / (load_rate - 2.0 * read_rate))
            .max(BACKLOG_RELOAD_MIN)
            .ceil();
        let limit = if threshold >= i64::MAX as f64 {
            return Ok(None);
        } else {
            threshold as i64
        };
        let row = self
            .timed(
                "the count of the changelog's backlog",
                client.query_one(
                    BACKLOG,
                    &[
                        &position
                            .seen
                            .xip()
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>(),
                        &position.seen.xmax().to_string(),
                        &limit,
                    ],
                ),
            )
            .await?;
        let waiting: i64 = row.try_get(0)?;
        let measured = if self.load_rate.is_some() {
            "the last load read"
        } else {
            "a load is taken to read"
        };
        Ok((waiting >= limit).then(|| {
            format!(
                "{waiting} changelog rows or more waiting, which a full load of the {tuples} \
                 tuples loaded and them reads at least twice as fast ({measured} \
                 {load_rate:.0} tuples a second, the changelog {read_rate:.0} rows)"
            )
        }))
    }

    /// Bounds one round trip, `what` (named in the error), so a silently dead server is
    /// noticed.
    async fn timed<T, E>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Error>
    where
        Error: From<E>,
    {
        timed(self.config.query_timeout, what, fut).await
    }
}

/// Until the slot the waiting connection waits for is taken (`sync::busy`); never where
/// there is none.
async fn taking(waiter: &mut Option<SlotWaiter>) {
    match waiter {
        Some(waiter) => waiter.taking().await,
        None => std::future::pending().await,
    }
}

/// A connection permd opens beside the sync connection: what it is for names it in the
/// log, in errors and in its `application_name`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Second {
    /// The connection a reload beside the polls loads on.
    Reload,
    /// The connection that waits for a busy slot, and holds it once taken (`sync::busy`).
    Slot,
}

impl Second {
    /// The connection, as the log and errors name it.
    fn what(self) -> &'static str {
        match self {
            Self::Reload => "the reload's connection",
            Self::Slot => "the busy slot's connection",
        }
    }

    /// Its settings' round trip, as the log and errors name it.
    fn settings(self) -> &'static str {
        match self {
            Self::Reload => "the reload's settings",
            Self::Slot => "the busy slot's settings",
        }
    }

    /// Its `application_name`, from the sync connection's (`name`).
    fn name(self, name: Option<&str>) -> String {
        match self {
            Self::Reload => connect::reload_name(name),
            Self::Slot => connect::slot_name(name),
        }
    }
}

/// Opens a connection beside the sync connection (`second`: a reload's, which loads
/// beside the polls, or the busy slot's), and checks that it reached `last`, the sync
/// connection's server as it was when its session began (a load's snapshot must be of
/// the same transactions as the polls', and a slot held elsewhere would quiet writers
/// no daemon hears). Its notices and its end are left to a task of its own (of the
/// caller's runtime), returned.
pub(super) async fn second_connection(
    config: &SyncConfig,
    own: &str,
    last: Option<&Server>,
    second: Second,
) -> Result<(Client, Tap, JoinHandle<()>), Error> {
    let (mut pg, settings) = connect::config(&config.database_url)?;
    connect::daemon_defaults(&mut pg);
    pg.application_name(second.name(pg.get_application_name()));
    let tap = Tap::default();
    let (client, connection) = timed(
        config.query_timeout,
        second.what(),
        connect::connect(&pg, &settings, &tap),
    )
    .await?;
    let driver = tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error_chain(&error), "{} ended", second.what());
        }
    });
    let opened = async {
        for statements in connect::first_statements(&pg, own) {
            timed(
                config.query_timeout,
                second.settings(),
                client.batch_execute(&statements),
            )
            .await?;
        }
        let server = Server::read(&client, config.query_timeout).await?;
        match last.map(|last| server.reload_since(last)) {
            Some(None) => Ok(()),
            Some(Some(why)) => Err(Error::Protocol(format!(
                "{} reached another server than the sync connection's ({why})",
                second.what()
            ))),
            None => Err(Error::Protocol("no server known to the session".into())),
        }
    };
    match opened.await {
        Ok(()) => Ok((client, tap, driver)),
        Err(error) => {
            driver.abort();
            Err(error)
        }
    }
}

/// What a reload's thread (`spawn_reload_thread`) tells the applier, and how it is
/// stopped.
struct ReloadThread {
    /// Whether its connection opened within the wait.
    opened: oneshot::Receiver<Result<(), Error>>,
    /// The load's snapshot, pruning mark and tables, as soon as it has them
    /// (`loader::load`).
    begun: oneshot::Receiver<Begun>,
    /// The load's outcome.
    loaded: oneshot::Receiver<Result<Loaded, Error>>,
    /// Rung once `loaded` is sent.
    ended: Arc<Notify>,
    /// Cancelled to drop the load and its connection.
    stop: CancellationToken,
}

/// A reload's load on a thread of its own (`permd-reload`), with a runtime of its own:
/// its connection (`second_connection`, given `wait` to open), the COPY's rows read off its
/// socket, and the load (`loader::load`, whose builder has a thread of its own too), so
/// that none of it takes the daemon's workers from checks and the applier.
fn spawn_reload_thread(
    config: SyncConfig,
    own: String,
    last: Option<Server>,
    wait: Duration,
) -> std::io::Result<ReloadThread> {
    let (opened, is_open) = oneshot::channel();
    let (begun, snapshot) = oneshot::channel();
    let (outcome, loaded) = oneshot::channel();
    let (ended, stop) = (Arc::new(Notify::new()), CancellationToken::new());
    let thread = ReloadThread {
        opened: is_open,
        begun: snapshot,
        loaded,
        ended: Arc::clone(&ended),
        stop: stop.clone(),
    };
    std::thread::Builder::new()
        .name("permd-reload".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = opened.send(Err(Error::Builder(format!(
                        "could not start the reload's runtime: {error}"
                    ))));
                    return;
                }
            };
            runtime.block_on(async move {
                let connection = tokio::time::timeout(
                    wait,
                    second_connection(&config, &own, last.as_ref(), Second::Reload),
                )
                .await
                .unwrap_or(Err(Error::Timeout("the reload's connection", wait)));
                let (mut client, tap, driver) = match connection {
                    Ok(connection) => connection,
                    Err(error) => {
                        let _ = opened.send(Err(error));
                        return;
                    }
                };
                if opened.send(Ok(())).is_err() {
                    return;
                }
                let load = loader::load(
                    &mut client,
                    &tap,
                    config.shard,
                    config.query_timeout,
                    true,
                    Some(begun),
                );
                let result = tokio::select! {
                    result = load => result,
                    () = stop.cancelled() => return,
                };
                let _ = outcome.send(result);
                ended.notify_one();
                // The connection ends once its client is gone: let it say goodbye.
                drop(client);
                let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
            });
        })
        .map(|_| thread)
}

/// Bounds one round trip, `what` (named in the error), by `limit`.
pub(super) async fn timed<T, E>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, Error>
where
    Error: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result.map_err(Error::from),
        Err(_) => Err(Error::Timeout(what, limit)),
    }
}

/// The hint for a standby's read cancelled by its replay, for rows removed (or a reason
/// not said).
const HINT_CONFLICT: &str =
    "the standby cancelled permd's read to replay its primary's changes, which removed rows \
     the read still needed (a full load on a standby whose primary vacuums meanwhile): set \
     hot_standby_feedback = on on the standby, or raise its max_standby_streaming_delay (30 s \
     by default) above a full load's time; permd retries";

/// The hint for a standby's read cancelled by its replay of a lock (or of a buffer the
/// read had pinned), which `hot_standby_feedback` does not prevent.
const HINT_LOCK_CONFLICT: &str =
    "the standby cancelled permd's read to replay an exclusive lock its primary took on a \
     table the read was using (most often VACUUM cutting off the empty end of permd.tuples, \
     which ALTER TABLE permd.tuples SET (vacuum_truncate = false) on the primary stops; or \
     an ALTER TABLE, a LOCK TABLE): raise the standby's max_standby_streaming_delay (30 s by \
     default) above a full load's time; hot_standby_feedback does not prevent this one; \
     permd retries";

/// The hint for a standby's read cancelled by its replay, by what the standby said of
/// why: its DETAIL, when it came with the error, or the reason a session ended with as
/// the tap kept it (DETAIL included).
fn conflict_hint(detail: Option<&str>) -> &'static str {
    let held = ["relation lock", "buffer pin"];
    if detail.is_some_and(|detail| held.iter().any(|what| detail.contains(what))) {
        HINT_LOCK_CONFLICT
    } else {
        HINT_CONFLICT
    }
}

/// What an operator can do about `error`, where Postgres's own message does not say.
fn hint(error: &Error) -> Option<&'static str> {
    let says = |e: &tokio_postgres::Error, what: &str| {
        e.as_db_error().is_some_and(|e| e.message().contains(what))
    };
    // A standby's conflict can end the session (FATAL), whose reason may then come
    // through the tap.
    let conflict = "conflict with recovery";
    match error {
        Error::Postgres(e) if says(e, conflict) => Some(conflict_hint(
            e.as_db_error()
                .and_then(tokio_postgres::error::DbError::detail),
        )),
        Error::Ended(reason) if reason.contains(conflict) => Some(conflict_hint(Some(reason))),
        Error::Postgres(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Some(
            "another session holds a lock on a table permd reads, e.g. LOCK TABLE, ALTER TABLE \
             or VACUUM FULL on permd.tuples; pg_locks shows which; permd retries",
        ),
        Error::Postgres(e)
            if [
                SqlState::INVALID_SCHEMA_NAME,
                SqlState::UNDEFINED_TABLE,
                SqlState::UNDEFINED_FUNCTION,
                SqlState::UNDEFINED_COLUMN,
            ]
            .iter()
            .any(|code| e.code() == Some(code)) =>
        {
            Some(
                "this database lacks schema permd or one of its migrations: run `permd \
                 migrate` against it; permd retries",
            )
        }
        Error::Postgres(e)
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                && says(e, "row-level security") =>
        {
            Some(
                "row-level security on permd's tables would hide rows from permd's role, \
                 which reads them with row_security = off so as never to mirror part of the \
                 set: give the role BYPASSRLS (ALTER ROLE … BYPASSRLS), or disable \
                 row-level security on permd's tables (or, where its policies show the \
                 role every row, add options=-c row_security=on to the URL); permd \
                 retries",
            )
        }
        Error::Postgres(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Some(
            "permd's role lacks a privilege it needs: USAGE on schema permd and SELECT on \
             its tables, as README's \"Running it against your database\" lists; permd \
             retries",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_is_measured_from_the_middle_of_the_round_trip_and_judged_beyond_it() {
        // Sent at 10.0 s, answered at 10.2 s: the server read its clock at about 10.1 s.
        let skew = Skew::measure(10_000_000, 12_100_000, 10_200_000);
        assert_eq!(
            skew,
            Skew {
                micros: 2_000_000,
                uncertainty: 100_000
            }
        );
        assert!(skew.beyond(Duration::from_secs(1)));
        assert!(!skew.beyond(Duration::from_millis(1_950)));
        let behind = Skew::measure(10_000_000, 8_000_000, 10_000_000);
        assert_eq!(behind.micros, -2_000_000);
        assert!(behind.beyond(Duration::from_secs(1)));
        // A slow round trip makes a small skew uncertain, not beyond.
        let slow = Skew::measure(0, 2_600_000, 4_000_000);
        assert_eq!(
            slow,
            Skew {
                micros: 600_000,
                uncertainty: 2_000_000
            }
        );
        assert!(!slow.beyond(Duration::from_secs(1)));
    }

    fn payload(message: Option<Message>) -> Option<String> {
        match message {
            Some(Message::Heard(payload)) => Some(payload),
            Some(Message::Lost) => Some("lost".into()),
            None => None,
        }
    }

    /// Notifications dropped at the end of a burst are told as soon as the applier takes
    /// one message, not at the next notification (none may come for as long as the idle
    /// poll's interval), and before whatever is heard after them.
    #[tokio::test(start_paused = true)]
    async fn dropped_notifications_are_told_as_soon_as_there_is_room() {
        let (connection, mut from_connection) = mpsc::unbounded_channel::<Result<String, Error>>();
        let messages = futures_util::stream::poll_fn(move |cx| from_connection.poll_recv(cx));
        let (heard, mut applier) = mpsc::channel(1);
        let status = Status::default();
        let driver = tokio::spawn(forward(messages, heard, status.clone()));
        for n in ["a", "b", "c"] {
            connection.send(Ok(n.into())).expect("driver running");
        }
        // On the paused clock this returns once every task is idle: the driver has taken
        // all three in.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(status.report().dropped_notifications, 2);
        assert_eq!(payload(applier.recv().await).as_deref(), Some("a"));
        let told = tokio::time::timeout(Duration::from_secs(60), applier.recv()).await;
        assert_eq!(
            payload(told.expect("told without another notification")).as_deref(),
            Some("lost")
        );
        connection.send(Ok("d".into())).expect("driver running");
        assert_eq!(payload(applier.recv().await).as_deref(), Some("d"));
        drop(connection);
        assert!(matches!(driver.await.expect("driver"), Error::Closed));
    }

    /// A compaction whose rebuild ends while Postgres is out of reach is swapped in then,
    /// not at the first poll after a reconnect: the generation it replaces is not held for
    /// the whole outage.
    /// A connection's statements are held to the server process its first look found:
    /// another process is a pooler's doing, and the error says what to do.
    #[test]
    fn statements_in_another_server_session_are_refused() {
        let mut applier = Applier::new(Store::new(), Status::default(), SyncConfig::new(""));
        applier.same_backend(41).expect("the first look's process");
        applier.same_backend(41).expect("the same process");
        let error = applier
            .same_backend(42)
            .expect_err("another process")
            .to_string();
        assert!(error.contains("process 41, then 42"), "{error}");
        assert!(error.contains("pool_mode=session"), "{error}");
    }

    #[tokio::test]
    async fn a_compaction_is_swapped_in_while_postgres_is_out_of_reach() {
        let nothing_listens = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let url = format!("postgres://permd@127.0.0.1:{nothing_listens}/permd");
        let store = Store::from_tuples([("u", "o", "read", None)]);
        let status = Status::default();
        let mut applier = Applier::new(store.clone(), status.clone(), SyncConfig::new(url));
        applier.begin_compaction("a test".into());
        let old = Arc::downgrade(&applier.compacting.as_ref().expect("compacting").old);
        store.set_grant("u", "p", &[row("write")]);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(applier.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while status.report().compactions == 0 || old.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "not swapped in while disconnected"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = status.report();
        assert!(!report.connected && report.last_error.is_some());
        // The write made while it rebuilt is in the generation swapped in.
        assert!(store.check("u", "write", "p") && store.check("u", "read", "o"));
        shutdown.cancel();
        run.await.expect("the applier stops");
    }

    /// A rebuild that ends while the applier waits out a reconnect's backoff is swapped
    /// in then, not when the wait ends.
    #[tokio::test]
    async fn a_rebuild_that_ends_during_the_backoff_is_swapped_in_at_once() {
        let store = Store::from_tuples([("u", "o", "read", None)]);
        let status = Status::default();
        let url = "postgres://permd@127.0.0.1:1/permd".to_owned();
        let mut applier = Applier::new(store.clone(), status.clone(), SyncConfig::new(url));
        let (go, gate) = std::sync::mpsc::channel::<()>();
        applier.begin_compaction_after("a test".into(), move || {
            let _ = gate.recv();
        });
        let shutdown = CancellationToken::new();
        // `join!` polls the wait first, so it has begun (the rebuild held, nothing to swap
        // in) when the rebuild is let go.
        let (waited, ()) = tokio::join!(
            applier.back_off(Duration::from_secs(600), &shutdown),
            async {
                assert_eq!(status.report().compactions, 0);
                go.send(()).expect("the rebuild waits");
                let deadline = Instant::now() + Duration::from_secs(30);
                while status.report().compactions == 0 {
                    assert!(Instant::now() < deadline, "not swapped in during the wait");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                shutdown.cancel();
            }
        );
        assert!(!waited, "the wait went on until shut down");
    }

    /// A standby's conflict that ended the session, as the tap kept it, gets the
    /// conflict's hint; another reason gets none.
    #[test]
    fn a_session_ended_by_a_standby_s_conflict_is_hinted() {
        let ended = |reason: &str| hint(&Error::Ended(reason.to_owned()));
        assert_eq!(
            ended("FATAL: terminating connection due to conflict with recovery (SQLSTATE 40001)"),
            Some(HINT_CONFLICT)
        );
        assert_eq!(
            ended(
                "FATAL: terminating connection due to conflict with recovery (SQLSTATE 40001) \
                 DETAIL: User was holding a relation lock for too long."
            ),
            Some(HINT_LOCK_CONFLICT)
        );
        assert_eq!(
            ended("FATAL: terminating connection due to administrator command (SQLSTATE 57P01)"),
            None
        );
    }

    /// A standby's conflict is hinted by the reason its DETAIL gives: a lock (or a buffer
    /// pin) replayed asks for a longer delay and says that `hot_standby_feedback` does not
    /// help; rows removed, or no reason given, ask for either.
    #[test]
    fn a_standby_s_conflict_is_hinted_by_its_reason() {
        for (detail, hint) in [
            (
                Some("User was holding a relation lock for too long."),
                HINT_LOCK_CONFLICT,
            ),
            (
                Some("User was holding shared buffer pin for too long."),
                HINT_LOCK_CONFLICT,
            ),
            (
                Some("User query might have needed to see row versions that must be removed."),
                HINT_CONFLICT,
            ),
            (None, HINT_CONFLICT),
        ] {
            assert_eq!(conflict_hint(detail), hint, "{detail:?}");
        }
    }

    fn row(permission: &str) -> TupleRow {
        TupleRow {
            permission: permission.into(),
            expires_at: None,
        }
    }

    #[test]
    fn the_key_is_read_again_at_once_after_it_verified_and_otherwise_at_most_each_second() {
        let just_read = Signing {
            read_at: Some(Instant::now()),
            ..Signing::default()
        };
        assert!(!just_read.due(), "nothing failed");
        let failed = Signing {
            stale: true,
            ..just_read
        };
        assert!(
            !failed.due(),
            "a failure without a verified one before: a second apart"
        );
        let rotated = Signing {
            proven: true,
            ..failed
        };
        assert!(rotated.due(), "a failure after a verified one: at once");
        let long_ago = Signing {
            stale: true,
            read_at: Instant::now().checked_sub(KEY_REREAD),
            ..Signing::default()
        };
        assert!(long_ago.due());
        assert!(Signing {
            stale: true,
            ..Signing::default()
        }
        .due());
    }
}
