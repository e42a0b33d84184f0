//! What the sync side reports about itself: connection, load, lag, counters.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

use crate::store::now_micros;

/// A cheap-clone handle (one `Arc`) to the sync status. The applier writes it; HTTP and
/// metrics read it.
#[derive(Clone, Default)]
pub struct Status {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    connected: AtomicBool,
    loaded: AtomicBool,
    /// When a poll last reached the changelog horizon (µs since the epoch; 0 = never).
    caught_up_at: AtomicI64,
    /// When the last full load finished (µs since the epoch; 0 = never).
    last_full_load_at: AtomicI64,
    last_full_load_ms: AtomicU64,
    reloads: AtomicU64,
    last_compaction_ms: AtomicU64,
    compactions: AtomicU64,
    reconnects: AtomicU64,
    /// Polls of the changelog.
    polls: AtomicU64,
    /// Changes are being applied from the notifications as they arrive.
    following: AtomicBool,
    /// 'auto' writers' commits are read by polls every `--busy-poll-ms`, no daemon slot
    /// held (`sync::busy`).
    busy_polling: AtomicBool,
    /// Times it began to (`busy_polling_started`).
    busy_polling_started: AtomicU64,
    /// The server is a standby (in recovery).
    standby: AtomicBool,
    /// How current the server is with its primary: [`Upstream`] as µs since the epoch,
    /// [`UNBOUNDED`] or [`UNKNOWN`].
    upstream_at: AtomicI64,
    /// The server's clock minus this host's (µs), as last measured...
    clock_skew: AtomicI64,
    /// ...once it has been.
    clock_measured: AtomicBool,
    /// The changelog's size on disk (bytes), as last measured; -1 before, or without it.
    changelog_bytes: AtomicI64,
    /// Statements applied from their notifications.
    notified: AtomicU64,
    /// Notifications whose rows were refused (unsigned, not verifying, replayed).
    refused: AtomicU64,
    /// Notifications dropped because too many waited for the applier.
    dropped: AtomicU64,
    /// The last error, for operators. A `Mutex` because it is written rarely and read by
    /// the status route only.
    last_error: Mutex<Option<String>>,
    /// Why the last full load ran. A `Mutex` for the same reason as `last_error`.
    last_full_load_reason: Mutex<Option<String>>,
    /// The full load under way, if one is. A `Mutex` for the same reason.
    running_load: Mutex<Option<RunningLoad>>,
    /// Woken at each catch-up and full load: the events that can make the mirror ready.
    progressed: Notify,
}

/// `upstream_at` when the server's own state is all there is to be current with (the
/// default).
const UNBOUNDED: i64 = 0;
/// `upstream_at` while a standby's currency is not known.
const UNKNOWN: i64 = -1;

/// How current the server permd reads is with the primary it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// Nothing to follow, or nothing known to bound it by: a primary; a standby that has
    /// not streamed since it started (fed from a WAL archive, or its primary down since),
    /// which cannot tell how far behind it is; or a server that refuses to be looked at.
    Unbounded,
    /// A streaming standby whose currency is not known (yet, or since a reconnect).
    Unknown,
    /// A standby that had replayed everything its primary had written by then (µs since
    /// the epoch).
    CurrentAt(i64),
}

/// A full load under way, as `/v1/status` shows it (`full_load_running`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunningLoad {
    /// Why it runs, as the log's `full load starting` says (and, once it has swapped in,
    /// `last_full_load_reason`).
    pub reason: String,
    /// Seconds since it began.
    pub seconds: f64,
    /// It loads beside the polls, which go on applying changes meanwhile; else on the
    /// sync connection, which applies none until it swaps in.
    pub beside_polls: bool,
    /// When it began (µs since the epoch).
    #[serde(skip)]
    started_at: i64,
}

/// A point-in-time copy of the status, as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The connection to Postgres is up and listening.
    pub connected: bool,
    /// A full snapshot has been loaded at least once.
    pub loaded: bool,
    /// Seconds since the mirror was last known to be caught up (`null` before the first
    /// catch-up). Grows while Postgres is unreachable.
    pub lag_seconds: Option<f64>,
    /// Unix time (seconds) of the end of the last full load.
    pub last_full_load_at: Option<f64>,
    /// How long the last full load took, in milliseconds.
    pub last_full_load_ms: u64,
    /// Why the last full load ran (`start`, `postgres recovered from a crash`, `another
    /// server than the last session's …`, …), as the log's `full load starting` says.
    pub last_full_load_reason: Option<String>,
    /// Full loads since start, the first included.
    pub reloads: u64,
    /// The full load under way (`null` when none is): why, for how long, and whether
    /// changes are applied meanwhile. Counted in `reloads` once it swaps in.
    pub full_load_running: Option<RunningLoad>,
    /// Compactions since start: generations rebuilt from memory to reclaim what writes
    /// left behind (`store::State::rebuilt`).
    pub compactions: u64,
    /// How long the last compaction took, in milliseconds (0 before the first).
    pub last_compaction_ms: u64,
    /// Connections lost and re-established since start.
    pub reconnects: u64,
    /// Polls of the changelog since start.
    pub polls: u64,
    /// Committed changes are applied as their notifications arrive, before the poll
    /// reads them from the changelog (false with NOTIFY off, and for a moment after a
    /// reconnect or a statement too large for a notification).
    pub following: bool,
    /// Writers with `permd.notify = 'auto'` committed more than 500 transactions a
    /// second, so permd stopped listening for theirs: it polls every `--busy-poll-ms`
    /// instead, and they send none (migration 0010). False while it listens.
    pub busy_polling: bool,
    /// Times permd stopped listening for `permd.notify = 'auto'` writers (or waiting for
    /// a slot to) and began polling for them, since start.
    pub busy_polling_started: u64,
    /// The server the sync connection reads is a standby (a read replica): it allows no
    /// LISTEN, so changes arrive by the poll, once the standby has replayed them.
    pub standby: bool,
    /// Seconds since the standby last had everything its primary had written, as far as
    /// it can tell (its WAL receiver streaming, and replay up to what it received); part
    /// of `lag_seconds`. `null` on a primary, while not yet known, and on a standby that
    /// has not streamed since it started, which cannot tell.
    pub standby_lag_seconds: Option<f64>,
    /// Postgres's clock minus this host's, in seconds, as last measured (at each connection,
    /// then every minute): `expires_at` is compared with this host's clock, so a row expires
    /// that much later here when positive. `null` before the first connection.
    pub clock_skew_seconds: Option<f64>,
    /// `permd.changelog`'s size on disk, indexes included, as last measured (with the
    /// clock): it grows until someone runs `permd.prune_changelog()`. `null` before.
    pub changelog_bytes: Option<u64>,
    /// Statements applied from their notifications since start.
    pub notified_changes: u64,
    /// Notifications whose rows were not applied since start: unsigned, a signature that
    /// does not verify, or a replay (forged; or triggers older than migration 0006, or a
    /// key rotated since permd read it). Their commits are read from the changelog.
    pub refused_notifications: u64,
    /// Notifications dropped since start because too many waited for the applier; their
    /// commits are read from the changelog.
    pub dropped_notifications: u64,
    /// The most recent sync error, if any since the last successful catch-up.
    pub last_error: Option<String>,
}

impl Status {
    /// A snapshot of the status.
    pub fn report(&self) -> StatusReport {
        let i = &self.inner;
        let micros_to_secs = |m: i64| (m != 0).then(|| m as f64 / 1e6);
        StatusReport {
            connected: i.connected.load(Ordering::Relaxed),
            loaded: i.loaded.load(Ordering::Relaxed),
            lag_seconds: self.lag_seconds(),
            last_full_load_at: micros_to_secs(i.last_full_load_at.load(Ordering::Relaxed)),
            last_full_load_ms: i.last_full_load_ms.load(Ordering::Relaxed),
            last_full_load_reason: i
                .last_full_load_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            reloads: i.reloads.load(Ordering::Relaxed),
            full_load_running: i
                .running_load
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map(|load| RunningLoad {
                    seconds: micros_to_secs_since(load.started_at),
                    ..load
                }),
            compactions: i.compactions.load(Ordering::Relaxed),
            last_compaction_ms: i.last_compaction_ms.load(Ordering::Relaxed),
            reconnects: i.reconnects.load(Ordering::Relaxed),
            polls: i.polls.load(Ordering::Relaxed),
            following: i.following.load(Ordering::Relaxed),
            busy_polling: i.busy_polling.load(Ordering::Relaxed),
            busy_polling_started: i.busy_polling_started.load(Ordering::Relaxed),
            standby: i.standby.load(Ordering::Relaxed),
            standby_lag_seconds: match i.upstream_at.load(Ordering::Relaxed) {
                UNBOUNDED | UNKNOWN => None,
                at => Some(micros_to_secs_since(at)),
            },
            clock_skew_seconds: i
                .clock_measured
                .load(Ordering::Relaxed)
                .then(|| i.clock_skew.load(Ordering::Relaxed) as f64 / 1e6),
            changelog_bytes: u64::try_from(i.changelog_bytes.load(Ordering::Relaxed))
                .ok()
                .filter(|_| i.clock_measured.load(Ordering::Relaxed)),
            notified_changes: i.notified.load(Ordering::Relaxed),
            refused_notifications: i.refused.load(Ordering::Relaxed),
            dropped_notifications: i.dropped.load(Ordering::Relaxed),
            last_error: i
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Seconds since the mirror was last caught up (with the primary, when permd reads a
    /// standby), `None` before the first catch-up.
    pub fn lag_seconds(&self) -> Option<f64> {
        let at = self.inner.caught_up_at.load(Ordering::Relaxed);
        (at != 0).then(|| micros_to_secs_since(at))
    }

    /// Loaded, and caught up within `max_lag_seconds`.
    pub fn is_ready(&self, max_lag_seconds: f64) -> bool {
        self.inner.loaded.load(Ordering::Relaxed)
            && self.lag_seconds().is_some_and(|lag| lag <= max_lag_seconds)
    }

    /// Resolves when `is_ready(max_lag_seconds)` holds: at once if it does, else at the
    /// catch-up or full load that makes it so (readiness only ever begins at one of those).
    pub async fn ready(&self, max_lag_seconds: f64) {
        loop {
            let progressed = self.inner.progressed.notified();
            tokio::pin!(progressed);
            // Registered before the test, so that an event between the two is not missed.
            progressed.as_mut().enable();
            if self.is_ready(max_lag_seconds) {
                return;
            }
            progressed.await;
        }
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.inner.connected.store(connected, Ordering::Relaxed);
    }

    /// The mirror is the database at the poll's snapshot (on a standby, below its
    /// xmin). `waiting_since`: on a standby, committed changes have been waiting behind
    /// an open transaction since then (by the server's clock, which wrote it: taken to
    /// this host's by the skew last measured, so that a server whose clock is behind
    /// does not make the mirror look that much older), so the mirror is that old. On a
    /// standby the mirror is also as old as the standby (as the last look at it found:
    /// the standby is at least that current now); while that is not known, the mirror is
    /// not known to be any more current than before.
    pub(crate) fn caught_up(&self, waiting_since: Option<i64>) {
        let now = now_micros();
        let upstream = match self.inner.upstream_at.load(Ordering::Relaxed) {
            UNKNOWN => None,
            UNBOUNDED => Some(now),
            at => Some(at.min(now)),
        };
        let skew = if self.inner.clock_measured.load(Ordering::Relaxed) {
            self.inner.clock_skew.load(Ordering::Relaxed)
        } else {
            0
        };
        if let Some(upstream) = upstream {
            let at = waiting_since.map_or(upstream, |since| (since - skew).min(upstream));
            self.inner.caught_up_at.store(at, Ordering::Relaxed);
        }
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.inner.progressed.notify_waiters();
    }

    /// A full load begins, for `reason` (`beside_polls`: changes are applied meanwhile).
    pub(crate) fn full_load_started(&self, reason: &str, beside_polls: bool) {
        self.set_running_load(Some(RunningLoad {
            reason: reason.to_owned(),
            seconds: 0.0,
            beside_polls,
            started_at: now_micros(),
        }));
    }

    fn set_running_load(&self, load: Option<RunningLoad>) {
        *self
            .inner
            .running_load
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = load;
    }

    /// The full load under way swapped in, `took_ms` after it began.
    pub(crate) fn full_load_done(&self, took_ms: u64, reason: &str) {
        self.set_running_load(None);
        let i = &self.inner;
        *i.last_full_load_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        i.loaded.store(true, Ordering::Relaxed);
        i.last_full_load_at.store(now_micros(), Ordering::Relaxed);
        i.last_full_load_ms.store(took_ms, Ordering::Relaxed);
        i.reloads.fetch_add(1, Ordering::Relaxed);
        i.progressed.notify_waiters();
    }

    pub(crate) fn compaction_done(&self, took_ms: u64) {
        let i = &self.inner;
        i.last_compaction_ms.store(took_ms, Ordering::Relaxed);
        i.compactions.fetch_add(1, Ordering::Relaxed);
        i.progressed.notify_waiters();
    }

    /// Whether the server is a standby.
    pub(crate) fn set_standby(&self, standby: bool) {
        self.inner.standby.store(standby, Ordering::Relaxed);
    }

    /// The server's clock minus this host's (µs), as just measured.
    pub(crate) fn set_clock_skew(&self, micros: i64) {
        self.inner.clock_skew.store(micros, Ordering::Relaxed);
        self.inner.clock_measured.store(true, Ordering::Relaxed);
    }

    /// The changelog's size on disk, as just measured (`None`: it does not exist).
    pub(crate) fn set_changelog_bytes(&self, bytes: Option<i64>) {
        self.inner
            .changelog_bytes
            .store(bytes.unwrap_or(-1), Ordering::Relaxed);
    }

    /// How current the server is with its primary, by the latest look.
    pub(crate) fn set_upstream(&self, upstream: Upstream) {
        let at = match upstream {
            Upstream::Unbounded => UNBOUNDED,
            Upstream::Unknown => UNKNOWN,
            Upstream::CurrentAt(at) => at,
        };
        self.inner.upstream_at.store(at, Ordering::Relaxed);
    }

    pub(crate) fn set_following(&self, following: bool) {
        self.inner.following.store(following, Ordering::Relaxed);
    }

    pub(crate) fn set_busy_polling(&self, busy: bool) {
        self.inner.busy_polling.store(busy, Ordering::Relaxed);
    }

    /// permd let its slot, or its wait for one, go, to poll for 'auto' writers.
    pub(crate) fn busy_polling_started(&self) {
        self.inner
            .busy_polling_started
            .fetch_add(1, Ordering::Relaxed);
        self.set_busy_polling(true);
    }

    /// A statement was applied from its notification.
    pub(crate) fn followed(&self) {
        self.inner.notified.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification's rows were refused.
    pub(crate) fn refused(&self) {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A notification was dropped: too many waited for the applier.
    pub(crate) fn dropped(&self) {
        self.inner.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A poll of the changelog was answered.
    pub(crate) fn polled(&self) {
        self.inner.polls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reconnected(&self) {
        self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// The session ended with `error`: the full load under way, if any, with it (the
    /// next session begins its own).
    pub(crate) fn failed(&self, error: &str) {
        self.set_connected(false);
        self.set_following(false);
        self.set_busy_polling(false);
        self.set_running_load(None);
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }
}

/// Seconds from `at` (µs since the epoch) to now; 0 for a time ahead of the clock.
fn micros_to_secs_since(at: i64) -> f64 {
    (now_micros().saturating_sub(at)).max(0) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    #[tokio::test]
    async fn ready_resolves_at_the_event_that_makes_the_mirror_ready() {
        let status = Status::default();
        let mut ready = Box::pin(status.ready(5.0));
        assert!(
            (&mut ready).now_or_never().is_none(),
            "ready before any load"
        );
        status.full_load_done(10, "start");
        assert!(
            (&mut ready).now_or_never().is_none(),
            "ready before the first catch-up"
        );
        status.caught_up(None);
        // A notified waiter is ready at its next poll: no waiting.
        assert!(
            (&mut ready).now_or_never().is_some(),
            "not ready after both"
        );
        assert!(
            status.ready(5.0).now_or_never().is_some(),
            "not ready at once"
        );
    }

    #[tokio::test]
    async fn a_lag_past_the_limit_is_not_ready() {
        let status = Status::default();
        status.full_load_done(10, "start");
        // Changes have waited on a standby behind an open transaction for a minute.
        status.caught_up(Some(now_micros() - 60_000_000));
        assert!(status.ready(5.0).now_or_never().is_none());
        assert!(status.ready(120.0).now_or_never().is_some());
    }

    #[test]
    fn changes_waiting_are_aged_by_this_hosts_clock() {
        let lag_after = |skew_seconds: Option<i64>, waited_seconds: i64| {
            let status = Status::default();
            status.full_load_done(10, "start");
            if let Some(skew) = skew_seconds {
                status.set_clock_skew(skew * 1_000_000);
            }
            // The server wrote the time by its own clock, `skew` from this host's.
            let server_now = now_micros() + skew_seconds.unwrap_or(0) * 1_000_000;
            status.caught_up(Some(server_now - waited_seconds * 1_000_000));
            status.lag_seconds().expect("caught up")
        };
        // A server 30 s behind: changes that waited 2 s are 2 s old, not 32.
        assert!((2.0..3.0).contains(&lag_after(Some(-30), 2)));
        // 30 s ahead: 2 s, not none.
        assert!((2.0..3.0).contains(&lag_after(Some(30), 2)));
        // Before the first measurement, the server's clock is taken as this host's.
        assert!((2.0..3.0).contains(&lag_after(None, 2)));
    }

    #[test]
    fn on_a_standby_the_mirror_is_as_old_as_the_standby() {
        let status = Status::default();
        status.full_load_done(10, "start");
        status.set_upstream(Upstream::Unknown);
        status.caught_up(None);
        assert_eq!(
            status.lag_seconds(),
            None,
            "current before the standby is known"
        );
        let minute_ago = now_micros() - 60_000_000;
        status.set_upstream(Upstream::CurrentAt(minute_ago));
        status.caught_up(None);
        let report = status.report();
        assert!(
            report.lag_seconds.is_some_and(|lag| lag >= 60.0),
            "{report:?}"
        );
        assert!(
            report.standby_lag_seconds.is_some_and(|lag| lag >= 60.0),
            "{report:?}"
        );
        // Not known again (a reconnect): the mirror is no more current than it was.
        status.set_upstream(Upstream::Unknown);
        status.caught_up(None);
        assert!(status.lag_seconds().is_some_and(|lag| lag >= 60.0));
        assert_eq!(status.report().standby_lag_seconds, None);
        status.set_upstream(Upstream::Unbounded);
        status.caught_up(None);
        assert!(status.lag_seconds().is_some_and(|lag| lag < 60.0));
    }
}
