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
    reconnects: AtomicU64,
    /// Changes are being applied from the notifications as they arrive.
    following: AtomicBool,
    /// The server is a standby (in recovery).
    standby: AtomicBool,
    /// Statements applied from their notifications.
    notified: AtomicU64,
    /// Notifications whose rows were refused (unsigned, not verifying, replayed).
    refused: AtomicU64,
    /// Notifications dropped because too many waited for the applier.
    dropped: AtomicU64,
    /// The last error, for operators. A `Mutex` because it is written rarely and read by
    /// the status route only.
    last_error: Mutex<Option<String>>,
    /// Woken at each catch-up and full load: the events that can make the mirror ready.
    progressed: Notify,
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
    /// Full loads since start, the first included.
    pub reloads: u64,
    /// Connections lost and re-established since start.
    pub reconnects: u64,
    /// Committed changes are applied as their notifications arrive, before the poll
    /// reads them from the changelog (false with NOTIFY off, and for a moment after a
    /// reconnect or a statement too large for a notification).
    pub following: bool,
    /// The server the sync connection reads is a standby (a read replica): it allows no
    /// LISTEN, so changes arrive by the poll, once the standby has replayed them.
    pub standby: bool,
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
            reloads: i.reloads.load(Ordering::Relaxed),
            reconnects: i.reconnects.load(Ordering::Relaxed),
            following: i.following.load(Ordering::Relaxed),
            standby: i.standby.load(Ordering::Relaxed),
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

    /// Seconds since the mirror was last caught up, `None` before the first catch-up.
    pub fn lag_seconds(&self) -> Option<f64> {
        let at = self.inner.caught_up_at.load(Ordering::Relaxed);
        (at != 0).then(|| ((now_micros() - at).max(0)) as f64 / 1e6)
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

    /// Everything below the horizon is applied. `waiting_since`: committed changes have
    /// been waiting behind an open transaction since then, so the mirror is that old.
    pub(crate) fn caught_up(&self, waiting_since: Option<i64>) {
        let now = now_micros();
        let at = waiting_since.map_or(now, |since| since.min(now));
        self.inner.caught_up_at.store(at, Ordering::Relaxed);
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.inner.progressed.notify_waiters();
    }

    pub(crate) fn full_load_done(&self, took_ms: u64) {
        let i = &self.inner;
        i.loaded.store(true, Ordering::Relaxed);
        i.last_full_load_at.store(now_micros(), Ordering::Relaxed);
        i.last_full_load_ms.store(took_ms, Ordering::Relaxed);
        i.reloads.fetch_add(1, Ordering::Relaxed);
        i.progressed.notify_waiters();
    }

    /// Whether changes are applied from the notifications.
    pub(crate) fn set_standby(&self, standby: bool) {
        self.inner.standby.store(standby, Ordering::Relaxed);
    }

    pub(crate) fn set_following(&self, following: bool) {
        self.inner.following.store(following, Ordering::Relaxed);
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

    pub(crate) fn reconnected(&self) {
        self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, error: &str) {
        self.set_connected(false);
        self.set_following(false);
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }
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
        status.full_load_done(10);
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
        status.full_load_done(10);
        // Changes have waited behind an open transaction for a minute.
        status.caught_up(Some(now_micros() - 60_000_000));
        assert!(status.ready(5.0).now_or_never().is_none());
        assert!(status.ready(120.0).now_or_never().is_some());
    }
}
