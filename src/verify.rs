//! `permd verify`: proves a running daemon equals the database, or names what differs.
//!
//! Compares `permd.digest()` with the daemon's `/v1/digest`, asking the daemon to first
//! apply everything the database's snapshot holds (`at_least`). When they differ, it
//! narrows down by per-subject digests and prints the rows each side has that the other
//! lacks. A daemon of one shard (`--shard`, reported in its `/v1/status`) is compared
//! with the database's subjects of that shard: the sum of their digests. A router (`permd
//! route`) holds no rows: every daemon behind it is verified, all at once, against the
//! shard the router sends it; one that cannot be verified is reported as such, and the
//! others still get their verdicts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::either::Either;

use crate::shard::Shard;
use crate::store::{Digest, StoredRows};

/// Where the daemon is and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port` or `https://host:port` of the daemon.
    pub permd: String,
    /// For `https://`: a PEM file of the CAs to trust, instead of the system's.
    pub ca: Option<std::path::PathBuf>,
    /// Its bearer token, if it requires one.
    pub token: Option<String>,
    /// Print at most this many differing subjects.
    pub max_subjects: usize,
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The daemon equals the database, or for a daemon of one shard, the database's rows
    /// of that shard's subjects.
    InSync {
        /// The digest both have; `None` when they were found equal subject by subject
        /// (writes went on while verify compared).
        digest: Option<String>,
        /// The shard the daemon mirrors.
        shard: Shard,
        /// Subjects written while verify compared them, which never held still long
        /// enough to be compared: not judged.
        changing: Vec<String>,
    },
    /// These subjects differ; the report says how.
    Differs {
        /// Number of subjects whose rows differ.
        subjects: usize,
        /// Human-readable report of the first few.
        report: String,
        /// As for `InSync`.
        changing: Vec<String>,
    },
    /// Verified through a router: the verdict on each daemon behind it, by its URL, in
    /// shard order.
    Set(Vec<(String, Verdict)>),
    /// A daemon behind a router that could not be verified: unreachable, or not placed as
    /// the router says. The error, with its causes.
    Unverified(String),
}

impl Verdict {
    /// How many subjects differ (on every daemon, for a set): 0 when in sync.
    pub fn differing(&self) -> usize {
        match self {
            Self::InSync { .. } | Self::Unverified(_) => 0,
            Self::Differs { subjects, .. } => *subjects,
            Self::Set(daemons) => daemons.iter().map(|(_, v)| v.differing()).sum(),
        }
    }

    /// How many daemons could not be verified (behind a router).
    pub fn unverified(&self) -> usize {
        match self {
            Self::InSync { .. } | Self::Differs { .. } => 0,
            Self::Unverified(_) => 1,
            Self::Set(daemons) => daemons.iter().map(|(_, v)| v.unverified()).sum(),
        }
    }

    /// What `permd verify` prints: the verdict, or the report of what differs; and the
    /// subjects not judged. For a set, each daemon's, under its URL.
    pub fn text(&self) -> String {
        let (mut text, changing) = match self {
            Self::Set(daemons) => {
                let mut text = String::new();
                for (url, verdict) in daemons {
                    text.push_str(&format!("{url}:\n"));
                    for line in verdict.text().lines() {
                        text.push_str(&format!("  {line}\n"));
                    }
                }
                return text;
            }
            Self::Unverified(error) => return format!("not verified: {error}\n"),
            Self::InSync {
                digest,
                shard,
                changing,
            } => {
                let what = if shard.is_whole() {
                    "permd equals the database".to_owned()
                } else {
                    format!(
                        "permd (shard {shard}) equals the database's rows of the shard's subjects"
                    )
                };
                let how = match digest {
                    Some(digest) => format!("digest {digest}"),
                    None => "subject by subject, as writes went on".to_owned(),
                };
                (format!("in sync: {what} ({how})\n"), changing)
            }
            Self::Differs {
                report, changing, ..
            } => (report.clone(), changing),
        };
        if !changing.is_empty() {
            let named: Vec<&str> = changing.iter().take(20).map(String::as_str).collect();
            text.push_str(&format!(
                "not judged: {} subject(s) written again each time verify compared them \
                 ({}{})\n",
                changing.len(),
                named.join(", "),
                if changing.len() > named.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        text
    }
}

/// How often a subject written during verification is compared again by itself.
const RECHECKS: u32 = 5;

/// How long connecting to a daemon may take (a host that drops packets would otherwise
/// hold verify for the kernel's two minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read of the daemon at the database's snapshot is asked again while the
/// daemon answers 503 `stale` (`get_json_applied`): one reconnecting to Postgres, or
/// following a standby that has not replayed the snapshot yet.
const APPLIED_WAIT: Duration = Duration::from_secs(30);

/// A 503 `stale` from the daemon: it has not applied the snapshot asked for yet.
#[derive(Debug, thiserror::Error)]
#[error("permd answered 503 to {path}: {body}")]
struct NotApplied {
    path: String,
    body: String,
}

/// Compares the daemon with the database at `database_url`; through a router, every
/// daemon behind it, at once.
pub async fn verify(database_url: &str, target: &Target) -> anyhow::Result<Verdict> {
    let pool = crate::db::pool(database_url).await?;
    // Each daemon's comparison keeps to one connection of the pool (sqlx gives one back
    // by a task of its own, so that a step right after another may open a second).
    let mut connection = pool.acquire().await.context("connect to the database")?;
    let since: Since = sqlx::query_as(
        "SELECT pg_current_snapshot()::text AS snapshot, pg_is_in_recovery() AS standby",
    )
    .fetch_one(&mut *connection)
    .await
    .context("read the database's snapshot")?;
    let daemons = match placement(target).await? {
        Placement::Daemon(shard) => {
            return verify_daemon(&mut connection, &since, target, shard, None).await
        }
        Placement::Router(daemons) => daemons,
    };
    // One pass over the database's subjects for every daemon's first comparison, rather
    // than one for each.
    let (token, everyone) = subject_digests(&mut connection, Shard::WHOLE).await?;
    drop(connection);
    let verdicts = daemons.into_iter().map(|(url, placed)| {
        let daemon = Target {
            permd: url.clone(),
            ..target.clone()
        };
        let (pool, since, everyone) = (&pool, &since, &everyone);
        async move {
            let verdict = async {
                match placement(&daemon).await? {
                    Placement::Daemon(shard) if shard == placed => {
                        let first = everyone
                            .iter()
                            .filter(|(subject, _)| shard.owns(subject))
                            .map(|(subject, digest)| (subject.clone(), digest.clone()))
                            .collect();
                        let mut connection =
                            pool.acquire().await.context("connect to the database")?;
                        verify_daemon(&mut connection, since, &daemon, shard, Some((token, first)))
                            .await
                    }
                    Placement::Daemon(shard) => bail!(
                        "it mirrors shard {shard}, but the router sends it the subjects of \
                         shard {placed}"
                    ),
                    Placement::Router(_) => bail!("it is a router too"),
                }
            }
            .await
            .unwrap_or_else(|e| Verdict::Unverified(format!("{e:#}")));
            (url, verdict)
        }
    });
    Ok(Verdict::Set(futures_util::future::join_all(verdicts).await))
}

/// Compares one daemon, which mirrors `shard`, with the database. `first`, when given, is
/// the database's side of the first comparison: the digests of the shard's subjects and
/// the token of their snapshot.
async fn verify_daemon(
    db: &mut sqlx::PgConnection,
    since: &Since,
    target: &Target,
    shard: Shard,
    mut first: Option<(u64, BTreeMap<String, String>)>,
) -> anyhow::Result<Verdict> {
    const ATTEMPTS: u32 = 3;
    // Writes may land between our two reads; a difference that vanishes on a retry was
    // only in flight.
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        // The database first, in one snapshot: `permd.digest()`, or for a shard's daemon
        // the sum of its subjects' digests (`permd.digest()`'s, by subject: 1.5x its time).
        // Then the daemon's, once it has applied all of that snapshot (`at_least`).
        let (token, db_digest, db_subjects) = match first.take() {
            Some((token, subjects)) => (token, sum(&subjects)?, Some(subjects)),
            None if shard.is_whole() => {
                let (token, rows) = in_snapshot(db, "SELECT '', permd.digest()").await?;
                let digest = rows.into_iter().next().map(|(_, d)| d).unwrap_or_default();
                (token, digest, None)
            }
            None => {
                let (token, subjects) = subject_digests(db, shard).await?;
                (token, sum(&subjects)?, Some(subjects))
            }
        };
        let answer = get_json_applied(target, &format!("/v1/digest?at_least={token}")).await?;
        let daemon_digest = answer["digest"]
            .as_str()
            .context("the daemon's digest answer has no digest")?;
        if daemon_digest == db_digest {
            return Ok(Verdict::InSync {
                digest: Some(db_digest),
                shard,
                changing: Vec::new(),
            });
        }
        tracing::debug!(attempt, %db_digest, %daemon_digest, "digests differ");
        last = Some((token, db_subjects));
        if attempt < ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Narrowed down to the subjects whose digests differ.
    let (token, db_subjects) = match last {
        Some((token, Some(subjects))) => (token, subjects),
        _ => subject_digests(db, shard).await?,
    };
    let answer =
        get_json_applied(target, &format!("/v1/digest?by=subject&at_least={token}")).await?;
    let daemon_subjects: BTreeMap<String, String> = answer["subjects"]
        .as_object()
        .context("the daemon's answer has no subjects")?
        .iter()
        .map(|(s, d)| (s.clone(), d.as_str().unwrap_or_default().to_owned()))
        .collect();
    let differing: Vec<String> = db_subjects
        .keys()
        .chain(daemon_subjects.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|s| db_subjects.get(*s) != daemon_subjects.get(*s))
        .cloned()
        .collect();
    // A subject no transaction wrote since verify began differs for good. One written
    // since may differ only in flight (the daemon read past the database's snapshot): it
    // is compared again by itself, and one that never holds still is reported as not
    // judged, not as differing (a real difference of such a subject is then missed).
    let written: BTreeSet<String> = sqlx::query_scalar(
        "SELECT DISTINCT subject FROM permd.changelog
         WHERE xid >= pg_snapshot_xmin($1::text::pg_snapshot)
           AND ($2 OR NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot))
           AND subject = ANY($3)",
    )
    .bind(&since.snapshot)
    .bind(since.standby)
    .bind(&differing)
    .fetch_all(&mut *db)
    .await
    .context("read the changelog")?
    .into_iter()
    .collect();
    let mut report = String::new();
    let mut differs = 0;
    let mut changing = Vec::new();
    for subject in differing {
        let rows = if written.contains(&subject) {
            match recheck(db, target, &subject).await? {
                None => continue,
                Some(_) => {
                    changing.push(subject);
                    continue;
                }
            }
        } else {
            let db_rows = db_rows(&mut *db, &subject).await?;
            (db_rows, daemon_rows(target, &subject, None).await?)
        };
        differs += 1;
        if differs <= target.max_subjects {
            let (db_rows, daemon_rows) = rows;
            report.push_str(&format!("subject {subject:?}:\n"));
            describe(&mut report, "tuple", &db_rows.tuples, &daemon_rows.tuples);
            describe(&mut report, "limit", &db_rows.limits, &daemon_rows.limits);
        }
    }
    if differs > target.max_subjects {
        report.push_str(&format!(
            "... and {} more subjects\n",
            differs - target.max_subjects
        ));
    }
    if differs == 0 {
        return Ok(Verdict::InSync {
            digest: None,
            shard,
            changing,
        });
    }
    Ok(Verdict::Differs {
        subjects: differs,
        report,
        changing,
    })
}

/// The database's snapshot when verify began: the transactions it does not see (in
/// progress then, or begun since) wrote the only subjects that can differ in flight, which
/// the changelog names. On a standby, whose snapshot lists no transaction in progress,
/// every transaction at or above its xmin is taken as such. (Until session 76 that was so
/// on a primary too: a transaction left open anywhere in the cluster then made every
/// subject written after it began, however long ago, look in flight, and a real
/// difference of one was reported as not judged.)
#[derive(sqlx::FromRow)]
struct Since {
    snapshot: String,
    standby: bool,
}

/// The digest of the rows of all of these subjects, from theirs.
fn sum(subjects: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut digest = Digest::default();
    for subject in subjects.values() {
        digest.add(subject.parse().map_err(anyhow::Error::msg)?);
    }
    Ok(digest.to_string())
}

/// Compares `subject` alone, up to [`RECHECKS`] times, each in a fresh snapshot with the
/// daemon caught up to it: `None` once equal, else the last rows of both.
async fn recheck(
    db: &mut sqlx::PgConnection,
    target: &Target,
    subject: &str,
) -> anyhow::Result<Option<(StoredRows, StoredRows)>> {
    let mut last = None;
    for _ in 0..RECHECKS {
        let mut tx = sqlx::Connection::begin(&mut *db).await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let xmax: String =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
                .fetch_one(&mut *tx)
                .await?;
        let mut stored = db_rows(&mut *tx, subject).await?;
        tx.commit().await?;
        let token = token_after(db, &xmax).await?;
        let mut daemon = daemon_rows(target, subject, Some(token)).await?;
        for rows in [&mut stored, &mut daemon] {
            rows.tuples.sort();
            rows.limits.sort();
        }
        if stored == daemon {
            return Ok(None);
        }
        last = Some((stored, daemon));
    }
    Ok(last)
}

/// The daemon's rows of `subject`, once it has applied `token`'s transaction.
async fn daemon_rows(
    target: &Target,
    subject: &str,
    token: Option<u64>,
) -> anyhow::Result<StoredRows> {
    let at_least = token.map_or_else(String::new, |t| format!("?at_least={t}"));
    let path = format!("/v1/subjects/{}/rows{at_least}", encode(subject));
    serde_json::from_value(get_json_applied(target, &path).await?)
        .context("read the daemon's rows of a subject")
}

/// The database's digest of each of `shard`'s subjects (verify picks them out as the
/// daemon does), in one snapshot, with the token of that snapshot.
async fn subject_digests(
    db: &mut sqlx::PgConnection,
    shard: Shard,
) -> anyhow::Result<(u64, BTreeMap<String, String>)> {
    let (token, rows) =
        in_snapshot(db, "SELECT subject, digest FROM permd.subject_digests()").await?;
    Ok((
        token,
        rows.into_iter().filter(|(s, _)| shard.owns(s)).collect(),
    ))
}

/// What answers at a URL: a daemon, and the shard it mirrors; or a router, and the
/// daemons behind it.
enum Placement {
    /// A daemon of this shard (one from before shards reports none: it mirrors everything).
    Daemon(Shard),
    /// A router: each daemon's URL and the shard the router sends it, in shard order.
    Router(Vec<(String, Shard)>),
}

/// Asks the status of what answers at `target`.
async fn placement(target: &Target) -> anyhow::Result<Placement> {
    let status = get_json(target, "/v1/status").await?;
    if status["router"] == Value::Bool(true) {
        let shards = status["shards"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let count = u32::try_from(shards.len()).unwrap_or(u32::MAX);
        let mut daemons = Vec::new();
        for (index, shard) in (0..).zip(shards) {
            let placed = Shard::new(index, count).context("the router's status lists no shard")?;
            for daemon in shard["daemons"].as_array().into_iter().flatten() {
                let url = daemon["url"]
                    .as_str()
                    .context("the router's status names a daemon without its URL")?;
                daemons.push((url.to_owned(), placed));
            }
        }
        if daemons.is_empty() {
            bail!("{} is a router with no daemon behind it", target.permd);
        }
        return Ok(Placement::Router(daemons));
    }
    match status["shard"].as_str() {
        None => Ok(Placement::Daemon(Shard::WHOLE)),
        Some(text) => Shard::parse(text)
            .map(Placement::Daemon)
            .map_err(|e| anyhow::anyhow!("the daemon reports the shard {text:?}: {e}")),
    }
}

fn describe<T: Ord + std::fmt::Debug>(report: &mut String, what: &str, db: &[T], daemon: &[T]) {
    let db: BTreeSet<&T> = db.iter().collect();
    let daemon: BTreeSet<&T> = daemon.iter().collect();
    for row in db.difference(&daemon) {
        report.push_str(&format!("  missing in permd: {what} {row:?}\n"));
    }
    for row in daemon.difference(&db) {
        report.push_str(&format!("  extra in permd:   {what} {row:?}\n"));
    }
}

/// Runs `query` (two text columns) in one snapshot and returns its rows with the token
/// that makes the daemon catch up to that snapshot.
async fn in_snapshot(
    db: &mut sqlx::PgConnection,
    query: &'static str,
) -> anyhow::Result<(u64, Vec<(String, String)>)> {
    let mut tx = sqlx::Connection::begin(db).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let xmax: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(&mut *tx)
        .await?;
    let rows: Vec<(String, String)> = sqlx::query_as(query)
        .fetch_all(&mut *tx)
        .await
        .context("compute the database's digests")?;
    tx.commit().await?;
    Ok((token_after(db, &xmax).await?, rows))
}

/// A token the daemon is past only once it holds every transaction a snapshot just taken
/// sees: that of a transaction committed after it, since a snapshot that sees it was
/// taken later. (The daemon holds what a snapshot of its own sees: `xmax - 1`, the last
/// transaction begun before this snapshot, can be seen by one that lacks an older
/// transaction, open then and ended since.) Where no transaction id can be had (a
/// standby), `xmax - 1` all the same: the daemon may then answer at a snapshot that lacks
/// a transaction this one has, and the comparison is tried again.
async fn token_after(db: &mut sqlx::PgConnection, xmax: &str) -> anyhow::Result<u64> {
    let after: Result<String, _> = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *db)
        .await;
    if let Ok(after) = after {
        return after.parse().context("read a transaction id");
    }
    let xmax: u64 = xmax.parse().context("read the snapshot's xmax")?;
    Ok(xmax.saturating_sub(1))
}

async fn db_rows(
    db: impl sqlx::Acquire<'_, Database = sqlx::Postgres>,
    subject: &str,
) -> anyhow::Result<StoredRows> {
    let mut db = db.acquire().await?;
    let tuples: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT object, permission, permd.epoch_micros(expires_at) FROM permd.tuples WHERE subject = $1 ORDER BY 1, 2",
    )
    .bind(subject)
    .fetch_all(&mut *db)
    .await?;
    let limits: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, value FROM permd.limits WHERE subject = $1 ORDER BY 1")
            .bind(subject)
            .fetch_all(&mut *db)
            .await?;
    Ok(StoredRows { tuples, limits })
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~:*".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// [`get_json`] of a route asked `at_least` the database's snapshot, asked again while
/// the daemon answers 503 `stale`, for `APPLIED_WAIT` at most; the first such answer is
/// logged.
async fn get_json_applied(target: &Target, path: &str) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + APPLIED_WAIT;
    let mut said = false;
    loop {
        match get_json(target, path).await {
            Err(error)
                if error.downcast_ref::<NotApplied>().is_some()
                    && tokio::time::Instant::now() < deadline =>
            {
                if !said {
                    said = true;
                    tracing::warn!(
                        "{error}; asking again for up to {} s",
                        APPLIED_WAIT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answered => return answered,
        }
    }
}

/// An HTTP/1.1 GET to the daemon (over TLS for `https://`, over a Unix socket for
/// `unix:PATH`), parsed as JSON; a non-200 is an error.
async fn get_json(target: &Target, path: &str) -> anyhow::Result<Value> {
    if let Some(socket) = target.permd.strip_prefix("unix:") {
        let unix = within_connect_timeout(tokio::net::UnixStream::connect(socket))
            .await
            .with_context(|| format!("connect to permd's Unix socket {socket}"))?;
        return exchange_json(target, unix, "permd", path).await;
    }
    let (https, authority) = match target.permd.split_once("://") {
        Some(("http", rest)) => (false, rest),
        Some(("https", rest)) => (true, rest),
        _ => bail!(
            "--permd must be an http:// or https:// URL, or unix: and a socket's path, not {}",
            target.permd
        ),
    };
    let authority = authority.trim_end_matches('/');
    let tcp = within_connect_timeout(tokio::net::TcpStream::connect(authority))
        .await
        .with_context(|| format!("connect to permd at {authority}"))?;
    let stream = if https {
        Either::Right(tls(target, authority, tcp).await?)
    } else {
        Either::Left(tcp)
    };
    exchange_json(target, stream, authority, path).await
}

/// `connecting`, failed after `CONNECT_TIMEOUT`.
async fn within_connect_timeout<T>(
    connecting: impl std::future::Future<Output = std::io::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|connected| connected.map_err(anyhow::Error::from))
}

/// [`get_json`] over a connection made: `host` is the `Host` header's value.
async fn exchange_json(
    target: &Target,
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    host: &str,
    path: &str,
) -> anyhow::Result<Value> {
    let auth = target
        .token
        .as_ref()
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut response))
        .await
        .context("permd did not answer within 120 s")??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP answer from permd")?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    let status = head.split(' ').nth(1).unwrap_or_default().to_owned();
    if status == "503" {
        let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
        if answer["error"] == "stale" {
            return Err(NotApplied {
                path: path.to_owned(),
                body: String::from_utf8_lossy(&body).into_owned(),
            }
            .into());
        }
    }
    if status != "200" {
        let hint = match (status.as_str(), &target.token) {
            ("401", None) => {
                " (the daemon wants its token: give it as PERMD_TOKEN or --token-file)"
            }
            ("401", Some(_)) => " (the token given is not the daemon's)",
            _ => "",
        };
        bail!(
            "permd answered {status} to {path}: {}{hint}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("parse permd's JSON answer")
}

/// TLS to the daemon at `authority` (`host:port`), trusting `target.ca` or the system's CAs.
async fn tls(
    target: &Target,
    authority: &str,
    tcp: tokio::net::TcpStream,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::ServerName;
    let config = crate::http::client_config(target.ca.as_deref(), "--permd-ca")?;
    // `host:port`, or `[v6]:port`.
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host} is not a host name TLS can check"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with permd at {authority} (--permd-ca names its CA)"))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).context("truncated chunk")?);
        body = body.get(size + 2..).context("truncated chunk")?;
    }
}
