//! The in-memory mirror: no I/O, no `.await` on the read path, nothing that can fail.
//!
//! Readers (HTTP handlers) call the query methods; only the applier calls the write
//! methods (`set_grant`, `set_limits`, `replace`, `advance`).

mod interner;
mod state;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

pub(crate) use state::{now_micros, State, StateBuilder};
pub use state::{StoredRows, TupleRow};

use state::Now;

/// The hasher of every map in the store: fast on short strings, seeded per process.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// The key type of the store's string maps: up to 24 bytes are stored inline (no heap
/// allocation, and a look-up compares the key without following a pointer to another
/// cache line); longer strings go to the heap.
pub(crate) type Key = compact_str::CompactString;

/// A transaction id (`xid8`): what `permd.write_token()` returns and what the watermark is
/// measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Xid(pub u64);

impl std::fmt::Display for Xid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A cheap-clone handle to the mirror: cloning copies one `Arc`, and every clone sees the
/// same state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Shared>,
}

struct Shared {
    /// The current generation. `ArcSwap` so a full reload replaces it atomically while
    /// readers keep the generation they loaded, without a lock on the read path.
    state: ArcSwap<State>,
    /// Every transaction with an xid below this is applied. An atomic for the check path;
    /// the `watch` below is only for the few requests that wait.
    watermark: AtomicU64,
    /// Wakes `at_least` waiters when the watermark moves.
    watermark_tx: watch::Sender<u64>,
    /// A waiter asks the applier to poll now instead of at its next tick, so a
    /// read-your-writes check does not wait for the idle interval when NOTIFY is off.
    wanted: Notify,
}

/// Why a wait for a write token gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// The watermark when the wait ended.
    pub watermark: Xid,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store with watermark 0 (nothing loaded yet).
    pub fn new() -> Self {
        let (watermark_tx, _) = watch::channel(0);
        Self {
            inner: Arc::new(Shared {
                state: ArcSwap::from_pointee(State::with_capacity(0, 0)),
                watermark: AtomicU64::new(0),
                watermark_tx,
                wanted: Notify::new(),
            }),
        }
    }

    /// A store holding exactly `tuples` (subject, object, permission, expires_at in µs
    /// since the epoch), built the way a full load builds it. For benchmarks and tools;
    /// the daemon's store is filled by the applier only.
    ///
    /// ```
    /// use permd::store::Store;
    ///
    /// let store = Store::from_tuples([
    ///     ("user:1", "doc:1", "read", None),
    ///     ("user:1", "", "ADMIN_ACCESS", None),
    ///     ("*", "doc:handbook", "read", None),
    ///     ("user:2", "", "TRIAL", Some(0)), // expired in 1970
    /// ]);
    /// assert!(store.check("user:1", "read", "doc:1"));
    /// assert!(!store.check("user:1", "read", "doc:2"));
    /// assert!(store.check("user:1", "ADMIN_ACCESS", ""));
    /// assert!(store.check("anyone", "read", "doc:handbook"));
    /// assert!(!store.check("user:2", "TRIAL", ""));
    /// assert_eq!(store.counts().tuples, 4);
    /// ```
    pub fn from_tuples<'a>(
        tuples: impl IntoIterator<Item = (&'a str, &'a str, &'a str, Option<i64>)>,
    ) -> Self {
        let mut builder = StateBuilder::new();
        for (subject, object, permission, expires_at) in tuples {
            builder.tuple(subject, object, permission, expires_at);
        }
        let store = Self::new();
        store.replace(builder.finish());
        store
    }

    /// Every transaction with an xid below the watermark is applied.
    pub fn watermark(&self) -> Xid {
        Xid(self.inner.watermark.load(Ordering::Acquire))
    }

    /// Waits until the watermark is above `token` (the writer's transaction is applied),
    /// at most `timeout`.
    pub async fn wait_past(&self, token: Xid, timeout: Duration) -> Result<Xid, Stale> {
        let now = self.watermark();
        if now > token {
            return Ok(now);
        }
        self.inner.wanted.notify_one();
        let mut rx = self.inner.watermark_tx.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|w| *w > token.0)).await;
        match waited {
            Ok(Ok(w)) => Ok(Xid(*w)),
            _ => Err(Stale {
                watermark: self.watermark(),
            }),
        }
    }

    /// Resolves when a reader has asked for a poll (see `wait_past`). For the applier.
    pub(crate) async fn wanted(&self) {
        self.inner.wanted.notified().await;
    }

    /// Whether `subject` holds `permission` on `object` ('' for a global permission).
    pub fn check(&self, subject: &str, permission: &str, object: &str) -> bool {
        self.inner
            .state
            .load()
            .check(subject, permission, object, &mut Now::lazy())
    }

    /// Runs several checks against one generation of the state.
    pub fn check_many<'a>(
        &self,
        checks: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Vec<bool> {
        let state = self.inner.state.load();
        let mut now = Now::lazy();
        checks
            .into_iter()
            .map(|(s, p, o)| state.check(s, p, o, &mut now))
            .collect()
    }

    /// The permissions `subject` holds on `object` ('' for global ones), sorted.
    pub fn permissions_of(&self, subject: &str, object: &str) -> Vec<Arc<str>> {
        self.inner
            .state
            .load()
            .permissions_of(subject, object, &mut Now::lazy())
    }

    /// The objects on which `subject` holds `permission`, sorted (`*` means every object).
    pub fn objects_of(&self, subject: &str, permission: &str) -> Vec<Arc<str>> {
        self.inner
            .state
            .load()
            .objects_of(subject, permission, &mut Now::lazy())
    }

    /// The limits of `subject` (its own over those of `*`).
    pub fn limits_of(&self, subject: &str) -> BTreeMap<Arc<str>, i64> {
        self.inner.state.load().limits_of(subject)
    }

    /// One limit of `subject`, if set.
    pub fn limit(&self, subject: &str, name: &str) -> Option<i64> {
        self.inner.state.load().limit(subject, name)
    }

    /// Stored tuple rows, subjects and limit rows of the current generation.
    pub fn counts(&self) -> Counts {
        let state = self.inner.state.load();
        Counts {
            tuples: state.tuple_count(),
            subjects: state.subject_count() as u64,
            limits: state.limit_count(),
        }
    }

    /// The digest of the mirrored set (equals `permd.digest()` at the same watermark).
    /// Walks every row: call it off the async runtime for large sets.
    pub fn digest(&self) -> String {
        self.inner.state.load_full().digest()
    }

    /// The digest of each subject's rows (equals `permd.subject_digests()`).
    pub fn subject_digests(&self) -> Vec<(String, String)> {
        self.inner.state.load_full().subject_digests()
    }

    /// Every stored row of `subject`, expired ones included.
    pub fn rows_of(&self, subject: &str) -> StoredRows {
        self.inner.state.load().rows_of(subject)
    }

    /// Replaces `subject`'s grants on `object`. Applier only.
    pub(crate) fn set_grant(&self, subject: &str, object: &str, rows: &[TupleRow]) {
        self.inner.state.load().set_grant(subject, object, rows);
    }

    /// Replaces `subject`'s limits. Applier only.
    pub(crate) fn set_limits(&self, subject: &str, rows: &[(String, i64)]) {
        self.inner.state.load().set_limits(subject, rows);
    }

    /// Swaps in a freshly loaded generation and returns the old one (for the caller to
    /// drop off the async runtime). Applier only.
    pub(crate) fn replace(&self, state: State) -> Arc<State> {
        self.inner.state.swap(Arc::new(state))
    }

    /// Sets the watermark even if lower: after Postgres recovered from a crash, xids
    /// above the recovered counter are handed out again, so the old watermark no longer
    /// proves anything. Applier only, right after a full load.
    pub(crate) fn rewind(&self, watermark: Xid) {
        self.inner.watermark.store(watermark.0, Ordering::Release);
        self.inner.watermark_tx.send_replace(watermark.0);
    }

    /// Raises the watermark (it never goes down except by `rewind`). Applier only.
    pub(crate) fn advance(&self, watermark: Xid) {
        let previous = self
            .inner
            .watermark
            .fetch_max(watermark.0, Ordering::AcqRel);
        if watermark.0 > previous {
            self.inner.watermark_tx.send_replace(watermark.0);
        }
    }
}

/// Sizes of the current generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Stored tuple rows, expired ones included.
    pub tuples: u64,
    /// Subjects holding at least one tuple or limit.
    pub subjects: u64,
    /// Stored limit rows.
    pub limits: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_the_watermark_passes_their_token() {
        let store = Store::new();
        store.advance(Xid(10));
        assert_eq!(store.wait_past(Xid(9), Duration::ZERO).await, Ok(Xid(10)));
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_past(Xid(10), Duration::from_secs(30)).await })
        };
        store.wanted().await; // the waiter asked for a poll
        store.advance(Xid(11));
        assert_eq!(waiter.await.ok(), Some(Ok(Xid(11))));
    }

    #[tokio::test]
    async fn a_wait_that_times_out_reports_the_watermark() {
        let store = Store::new();
        store.advance(Xid(5));
        let result = store.wait_past(Xid(7), Duration::from_millis(1)).await;
        assert_eq!(result, Err(Stale { watermark: Xid(5) }));
    }

    #[test]
    fn the_watermark_never_goes_down() {
        let store = Store::new();
        store.advance(Xid(8));
        store.advance(Xid(3));
        assert_eq!(store.watermark(), Xid(8));
    }

    #[test]
    fn replace_swaps_the_generation() {
        let store = Store::new();
        store.set_grant(
            "u",
            "o",
            &[TupleRow {
                permission: "read".into(),
                expires_at: None,
            }],
        );
        assert!(store.check("u", "read", "o"));
        let mut builder = StateBuilder::new();
        builder.tuple("v", "o", "read", None);
        let old = store.replace(builder.finish());
        assert_eq!(old.tuple_count(), 1);
        assert!(!store.check("u", "read", "o"));
        assert!(store.check("v", "read", "o"));
    }
}
