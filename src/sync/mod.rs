//! Keeping the store equal to Postgres: the loader (snapshot COPY), the applier (the
//! changelog cursor, the only writer of the store) and the doorbell (LISTEN/NOTIFY).
//!
//! Invariant: nothing committed is skipped. Each poll reads the changelog rows of the
//! transactions its snapshot sees and the last one did not (those in progress then, and
//! those begun since: `Position`), in (xid, id) order, and re-reads the current rows of
//! each changed key, so replay is idempotent and the mirror is the database at the
//! poll's snapshot.

mod applier;
mod busy;
mod connect;
mod conninfo;
mod copy;
mod environment;
mod follow;
mod loader;
mod relay;
mod server;
mod standby;
mod status;
mod subscription;
mod tap;
mod tls;

use std::time::Duration;

pub(crate) use crate::error_chain;
use crate::shard::Shard;
use crate::store::Snapshot;
pub use applier::{poll_statement, Applier, POLL, SESSION};
pub(crate) use connect::{
    one_session, second_name, second_session, two_sessions, Settings, SECOND_SESSION_WAIT,
    WHICH_SESSION,
};
pub use relay::Relay;
pub use status::{RunningLoad, Status, StatusReport};
pub(crate) use tls::private_key;
pub use tls::{split as split_tls_options, TlsOptions};

/// What can go wrong talking to Postgres. Every error ends the current connection; the
/// applier reconnects with backoff and never loses its place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or dropped us, or a query failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A COPY stream was not what we asked for.
    #[error("binary COPY: {0}")]
    Copy(String),
    /// The database answered something we cannot interpret.
    #[error("unexpected answer from postgres: {0}")]
    Protocol(String),
    /// A query did not answer in time; the connection is presumed dead. Says which.
    #[error("postgres did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
    /// A full load received nothing for this long; the connection is presumed dead.
    #[error("a full load received nothing from postgres for {0:?}")]
    Stalled(Duration),
    /// The blocking state builder died.
    #[error("state builder failed: {0}")]
    Builder(String),
    /// The connection ended.
    #[error("connection to postgres closed")]
    Closed,
    /// The server ended the session, for this reason ("FATAL: …"), as the socket's tap
    /// read it where tokio-postgres did not pass it on (`applier::why_closed`).
    #[error("postgres ended the session: {0}")]
    Ended(String),
    /// No socket to Postgres could be opened.
    #[error("connect to postgres: {0}")]
    Connect(#[source] std::io::Error),
    /// The database URL is one the sync connection can never connect with.
    #[error("the database URL: {0}")]
    Url(String),
    /// The standby the connection followed was promoted: a new connection listens on it.
    #[error(
        "the standby permd followed was promoted to a primary; reconnecting, to listen for \
         its notifications"
    )]
    Promoted,
    /// TLS with the server failed, or the server refused it where the URL requires it.
    #[error("TLS with postgres: {0}")]
    Tls(String),
    /// A pooler in transaction or statement mode stands between permd and Postgres, as
    /// the evidence says (`connect::two_sessions`, `connect::one_session`,
    /// `Applier::same_backend`).
    #[error(
        "{0}: a pooler in transaction or statement mode stands between permd and postgres \
         (PgBouncer's pool_mode = transaction?), where LISTEN hears nothing for permd and \
         its session settings reach the application's transactions; give permd a pool in \
         session mode (pool_mode=session on a database entry of its own) or connect it to \
         postgres directly"
    )]
    Pooled(String),
    /// permd's changelog holds a pruning mark restored from another cluster, and the
    /// schema lacks the function that removes it (`Applier::restored`); says what to do.
    #[error("{0}; permd retries")]
    Restored(String),
    /// `permd.retention` holds no row (deleted by hand): what was pruned from the changelog
    /// cannot be told; says how to put it back.
    #[error(
        "permd.retention holds no row (deleted by hand?), so permd cannot tell what was \
         pruned from the changelog; as the owner of schema permd, `INSERT INTO \
         permd.retention (pruned_xid) SELECT pg_snapshot_xmin(pg_current_snapshot())` puts \
         it back (a daemon behind that mark then loads in full once); permd retries"
    )]
    NoRetentionRow,
    /// Logical replication writes permd's tables in a way the changelog cannot follow
    /// (`subscription`); says what to do.
    #[error("logical replication: {0}; permd retries")]
    Subscribed(String),
}

impl Error {
    /// The connection was found closed, with no more said.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Postgres(error) => error.is_closed(),
            _ => false,
        }
    }
}

/// Refuses a database URL that the sync connection could never connect with (one it
/// cannot read, or whose TLS files are missing or unreadable), so that a daemon fails at
/// start with the reason rather than retrying it for ever.
pub fn check_database_url(url: &str) -> Result<(), Error> {
    connect::config(url).map(drop)
}

/// The database URL as `serve` reads it, for the one-off commands: libpq's environment
/// filled in (`PGHOST`, `PGUSER`, …), its TLS options read (their files too), and
/// libpq's settings tokio-postgres does not hold.
pub(crate) fn read_url(url: &str) -> Result<(tokio_postgres::Config, Settings), Error> {
    connect::config(url)
}

/// The server options the URL itself (or its service) gives (`options=`, in either form),
/// without libpq's environment (`PGOPTIONS`).
pub(crate) fn own_options(url: &str) -> Option<String> {
    connect::own_options(url)
}

/// The statements a session runs first, `own` and then permd's overrides of what the
/// database or the role set for every session (`connect::first_statements`): the sync
/// connection's, and the one-off commands' pool's.
pub(crate) fn first_statements(config: &tokio_postgres::Config, own: &str) -> Vec<String> {
    connect::first_statements(config, own)
}

/// The password for `config`'s first server: the URL's or `PGPASSWORD`'s, else the
/// password file's (the URL's `passfile`, else `PGPASSFILE`, else `~/.pgpass`), read now.
pub(crate) fn password(config: &tokio_postgres::Config, settings: &Settings) -> Option<Vec<u8>> {
    let passfile = settings.libpq.passfile.as_deref();
    environment::password(config, passfile, 0, &environment::process)
}

/// How the applier talks to Postgres.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// libpq-style URL or key=value string of the source database.
    pub database_url: String,
    /// How often to poll the changelog when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// How often to poll instead while writers with `permd.notify = 'auto'` come too fast
    /// to listen for (`sync::busy`); `None`: always listen.
    pub busy_poll: Option<Duration>,
    /// The longest any one statement may take before the connection is presumed dead.
    /// A full load is exempt (it scales with the data), but must receive something from
    /// Postgres at least this often. Half of it is the session's `lock_timeout`: no
    /// statement, a full load's included, waits longer for a lock.
    pub query_timeout: Duration,
    /// Changelog rows read per poll; a full batch is followed by another poll at once.
    pub batch_rows: i64,
    /// Backoff between reconnect attempts grows to this.
    pub max_backoff: Duration,
    /// Notifications that may wait for the applier (4,096). Past that they are dropped,
    /// and their commits read from the changelog. Small only in tests, to drop some.
    pub notification_capacity: usize,
    /// A full load reclaims what incremental changes leave behind (names interned since
    /// the last one, packed grant lists no longer used) once that reaches this share of
    /// what the last one made, in percent (`store::Growth`); 0: never.
    pub compaction_pct: u32,
    /// A backlog of changelog rows past a full batch is loaded in full instead of read
    /// from the changelog when that is estimated at least twice as fast (`--backlog-reload`;
    /// `Applier::backlog`).
    pub backlog_reload: bool,
    /// The subjects to mirror: `--shard`; the whole set by default.
    pub shard: Shard,
}

impl SyncConfig {
    /// Defaults for everything but the database.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            poll_interval: Duration::from_secs(1),
            busy_poll: Some(Duration::from_millis(2)),
            query_timeout: Duration::from_secs(30),
            batch_rows: 10_000,
            max_backoff: Duration::from_secs(5),
            notification_capacity: 4096,
            compaction_pct: 50,
            backlog_reload: true,
            shard: Shard::WHOLE,
        }
    }
}

/// The SQL that names permd's tables as they are now (their oids, by name at each run, so
/// that a statement prepared before they were dropped and created again, or a schema
/// restored over them, sees the new ones): what a full load and each poll compare.
#[macro_export]
#[doc(hidden)]
macro_rules! permd_tables_sql {
    () => {
        "concat_ws(',', to_regclass('permd.tuples')::oid, to_regclass('permd.limits')::oid, \
         to_regclass('permd.changelog')::oid, to_regclass('permd.retention')::oid)"
    };
}

/// A row of the changelog, by its place in the changelog's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Cursor {
    pub(crate) xid: u64,
    pub(crate) id: i64,
}

/// How far the changelog is applied: every row of the transactions `seen` sees, and of
/// transaction `part.xid` (which it does not see: a poll's batch ended in its rows) the
/// rows up to `part`. The next poll reads the rest: the rows of `seen`'s transactions in
/// progress and of those at or above its xmax (index look-ups and a range), so an open
/// transaction holds back nothing but itself, and the rows of its era are read once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) seen: Snapshot,
    pub(crate) part: Option<Cursor>,
}

impl Position {
    /// Where a full load at `snapshot` leaves it: exactly the transactions it sees.
    pub(crate) fn at(snapshot: Snapshot) -> Self {
        Self {
            seen: snapshot,
            part: None,
        }
    }

    /// The place of the first row that may not be applied: a row of an earlier place
    /// deleted from the changelog is one applied.
    pub(crate) fn first_unapplied(&self) -> Cursor {
        let xid = self.seen.xmin();
        let id = match self.part {
            Some(part) if part.xid == xid => part.id,
            _ => 0,
        };
        Cursor { xid, id }
    }
}

/// Parses a snapshot from `pg_current_snapshot()::text`.
pub(crate) fn parse_snapshot(text: &str) -> Result<Snapshot, Error> {
    Snapshot::parse(text).ok_or_else(|| Error::Protocol(format!("not a snapshot: {text:?}")))
}

/// Parses an `xid8` from its text form.
pub(crate) fn parse_xid(text: &str) -> Result<u64, Error> {
    text.parse()
        .map_err(|_| Error::Protocol(format!("not an xid8: {text:?}")))
}
