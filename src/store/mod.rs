//! The in-memory mirror: no I/O, no `.await` on the read path, nothing that can fail.
//!
//! Readers (HTTP handlers) call the query methods; only the applier calls the write
//! methods (`set_grants`, `edit_grant`, `set_limits`, `replace`, `advance`).

mod arena;
mod grants;
mod interner;
mod journal;
mod key;
mod snapshot;
mod state;
mod subjects;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

pub(crate) use journal::Edit;
use journal::Journal;
pub use snapshot::Snapshot;
pub(crate) use state::{now_micros, Growth, State, StateBuilder};
pub use state::{Digest, Listing, StoredRows, TupleRow};

use state::Now;

/// The hasher of every map in the store: fast on short strings, seeded per process.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// The key of short names (up to 24 bytes, all inline) in the subject map and the
/// interners: no heap allocation, and a look-up compares the key without following a
/// pointer to another cache line. Longer names go to tables keyed by `key::LongKey`
/// (but in an interner's small tier of names added after the load, where any name is a
/// `Name`).
pub(crate) type Name = compact_str::CompactString;

/// The 8 bytes of `s` from `at`, little-endian (`s` is at least `at + 8` long).
#[inline]
fn word(s: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Whether two short byte strings are equal, compared inline: names in the store are a
/// few bytes long, and `==` on slices calls `memcmp`, which costs more than the compare.
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        // Two overlapping words cover the string.
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        0..=7 => a.iter().zip(b).all(|(x, y)| x == y),
        _ => a == b,
    }
}

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
    /// readers keep the generation they loaded, without a lock on the read path. Checks
    /// read it through their thread's `View`, other readers through a guard.
    state: ArcSwap<State>,
    /// Counts the swaps of `state`, raised after each: a thread's `View` of the generation
    /// is current while this has not moved.
    generation: AtomicU64,
    /// Every transaction with an xid below this is applied: `seen`'s xmin, as an atomic
    /// for the check path and the revision every answer carries.
    watermark: AtomicU64,
    /// The transactions applied: exactly those this snapshot sees. Read only by a token
    /// at or above the watermark (a write committed while an older transaction is still
    /// open); the `watch` below is only for the few requests that wait.
    seen: ArcSwap<Snapshot>,
    /// Wakes `at_least` waiters when `seen` moves, or is confirmed.
    watermark_tx: watch::Sender<u64>,
    /// Set while the watermark is not known to hold: from the loss of the connection to
    /// Postgres until the next one has checked that the server did not recover from a
    /// crash meanwhile (or reloaded if it did). A crashed server hands out again xids
    /// below the watermark, so a token must not be taken as applied on the watermark's
    /// word meanwhile. An atomic that `at_least` waiters read in the `watch`'s predicate.
    unconfirmed: AtomicBool,
    /// A waiter asks the applier to poll now instead of at its next tick, so a
    /// read-your-writes check does not wait for the idle interval when NOTIFY is off.
    wanted: Notify,
    /// The keys written while another generation is built beside the current one (a
    /// compaction's or a reload's). A `Mutex`: only the single writer takes it, once a
    /// write, so it is never contended.
    journal: Mutex<Option<Journal>>,
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
                generation: AtomicU64::new(0),
                watermark: AtomicU64::new(0),
                seen: ArcSwap::from_pointee(Snapshot::default()),
                watermark_tx,
                unconfirmed: AtomicBool::new(false),
                wanted: Notify::new(),
                journal: Mutex::new(None),
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

    /// Whether a generation was ever swapped in (the first full load is done): an empty
    /// store's every answer would be a denial.
    pub fn loaded(&self) -> bool {
        self.inner.generation.load(Ordering::Acquire) > 0
    }

    /// Every transaction with an xid below the watermark is applied.
    pub fn watermark(&self) -> Xid {
        Xid(self.inner.watermark.load(Ordering::Acquire))
    }

    /// Waits until the writer's transaction of `token` is applied, and the watermark
    /// confirmed (`unconfirm`), at most `timeout`; returns the watermark.
    pub async fn wait_past(&self, token: Xid, timeout: Duration) -> Result<Xid, Stale> {
        let past = |watermark: u64| self.is_past(Xid(watermark), token);
        if let Some(now) = self.passed(token) {
            return Ok(now);
        }
        // Subscribed before the applier is woken: while a waiter is subscribed, the
        // applier keeps polling (see `readers_waiting`).
        let mut rx = self.inner.watermark_tx.subscribe();
        self.inner.wanted.notify_one();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|w| past(*w))).await;
        match waited {
            Ok(Ok(_)) => Ok(self.watermark()),
            _ => Err(Stale {
                watermark: self.watermark(),
            }),
        }
    }

    /// The watermark, when `token`'s write is applied and the watermark confirmed: what
    /// [`Store::wait_past`] returns at once. A check whose write is applied is answered
    /// at it without waiting.
    pub fn passed(&self, token: Xid) -> Option<Xid> {
        let now = self.watermark();
        self.is_past(now, token).then_some(now)
    }

    /// Whether `token`'s write is applied (below `watermark`, or seen by the snapshot
    /// the mirror holds: a write committed while an older transaction is still open), and
    /// the watermark confirmed.
    fn is_past(&self, watermark: Xid, token: Xid) -> bool {
        (watermark.0 > token.0 || self.inner.seen.load().sees(token.0))
            && !self.inner.unconfirmed.load(Ordering::Acquire)
    }

    /// The snapshot whose transactions the mirror holds.
    pub fn seen(&self) -> Snapshot {
        Snapshot::clone(&self.inner.seen.load())
    }

    /// Whether a read-your-writes check is waiting for its token's write to be applied.
    /// The applier keeps polling while one is: the poll its request woke may not have
    /// seen that write yet (a standby that has not replayed it, a token handed on before
    /// its transaction committed).
    pub fn readers_waiting(&self) -> bool {
        self.inner.watermark_tx.receiver_count() > 0
    }

    /// Resolves when a reader has asked for a poll (see `wait_past`). For the applier.
    pub(crate) async fn wanted(&self) {
        self.inner.wanted.notified().await;
    }

    /// Whether `subject` holds `permission` on `object` ('' for a global permission).
    pub fn check(&self, subject: &str, permission: &str, object: &str) -> bool {
        self.with_state(|state| state.check(subject, permission, object, &mut Now::lazy()))
    }

    /// Runs several checks against one generation of the state, the answers in order.
    pub fn check_many<'a, I>(&self, checks: I) -> Vec<bool>
    where
        I: IntoIterator<Item = (&'a str, &'a str, &'a str)>,
        I::IntoIter: ExactSizeIterator + Clone,
    {
        let checks = checks.into_iter();
        self.with_state(|state| state.check_many(checks.clone(), &mut Now::lazy()))
    }

    /// Runs `f` once on the current generation: through this thread's `View` of it when
    /// the view is current (no atomic read-modify-write at all), else through a fresh view
    /// (or, while the thread exits, an `ArcSwap` guard).
    #[inline]
    fn with_state<R>(&self, mut f: impl FnMut(&State) -> R) -> R {
        VIEW.try_with(|view| match view.try_borrow_mut() {
            Ok(mut view) => f(&self.current_view(&mut view).state),
            Err(_) => f(&self.inner.state.load()),
        })
        .unwrap_or_else(|_| f(&self.inner.state.load()))
    }

    /// `view`, made a view of this store's current generation.
    #[inline]
    fn current_view<'v>(&self, view: &'v mut Option<View>) -> &'v View {
        let generation = self.inner.generation.load(Ordering::Acquire);
        let current = view.as_ref().is_some_and(|v| {
            v.generation == generation && v.store.as_ptr() == Arc::as_ptr(&self.inner)
        });
        if !current {
            if let Some(stale) = view.take() {
                dispose(stale.state);
            }
        }
        view.get_or_insert_with(|| View {
            store: Arc::downgrade(&self.inner),
            generation,
            state: self.inner.state.load_full(),
        })
    }

    /// The permissions `subject` holds on `object` ('' for global ones), sorted.
    pub fn permissions_of(&self, subject: &str, object: &str) -> Vec<Arc<str>> {
        self.inner
            .state
            .load()
            .permissions_of(subject, object, &mut Now::lazy())
    }

    /// The objects on which `subject` holds `permission`, sorted by name (`*` means every
    /// object): the first `limit` of those named after `after` (from the first when it is
    /// empty).
    pub fn objects_of(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
    ) -> Listing {
        self.inner
            .state
            .load()
            .objects_of(subject, permission, after, limit, &mut Now::lazy())
    }

    /// `objects_of`, if it takes some tens of microseconds at most; else `None`, found at
    /// once or after about that much work: such a listing is better made off a thread
    /// that answers checks.
    pub fn quick_objects_of(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
    ) -> Option<Listing> {
        let quick = Some(state::QUICK_LISTING);
        let state = self.inner.state.load();
        state.objects_within(subject, permission, after, limit, &mut Now::lazy(), quick)
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
        let growth = state.growth();
        Counts {
            tuples: state.tuple_count(),
            subjects: state.subject_count() as u64,
            limits: state.limit_count(),
            packed_bytes: state.packed_bytes() as u64,
            names_since_load: growth.names_since as u64,
            unused_packed_bytes: growth.abandoned as u64,
            unused_heap_list_bytes: growth.left_behind as u64,
            subjects_written_since_load: growth.subjects_moved as u64,
        }
    }

    /// What the current generation has grown by since its load, that only a full load
    /// reclaims. Applier only.
    pub(crate) fn growth(&self) -> Growth {
        self.inner.state.load().growth()
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

    /// Replaces `subject`'s grants on `object`, rows read whole (as a poll's
    /// `set_grants`). The tests' single write.
    #[cfg(test)]
    pub(crate) fn set_grant(&self, subject: &str, object: &str, rows: &[TupleRow]) {
        self.note(|journal| journal.grant(subject, object, None));
        self.inner.state.load().set_grant(subject, object, rows);
    }

    /// Makes one statement's change (a notification's) to `subject`'s grants on
    /// `object`. Applier only.
    pub(crate) fn edit_grant(&self, subject: &str, object: &str, edit: &Edit<TupleRow>) {
        self.note(|journal| journal.grant(subject, object, Some(edit)));
        let state = self.inner.state.load();
        let mut rows = state.grant_rows(subject, object);
        edit.apply(&mut rows);
        state.set_grant(subject, object, &rows);
    }

    /// Replaces `subject`'s grants on each object of `changes` at once
    /// (`State::set_grants`). Applier only.
    pub(crate) fn set_grants(&self, subject: &str, changes: &[(&str, &[TupleRow])]) {
        self.note(|journal| {
            for (object, _) in changes {
                journal.grant(subject, object, None);
            }
        });
        self.inner.state.load().set_grants(subject, changes);
    }

    /// Replaces `subject`'s limits. Applier only.
    pub(crate) fn set_limits(&self, subject: &str, rows: &[(String, i64)]) {
        self.note(|journal| journal.limits(subject, None));
        self.inner.state.load().set_limits(subject, rows);
    }

    /// Makes one statement's change (a notification's) to `subject`'s limits. Applier
    /// only.
    pub(crate) fn edit_limits(&self, subject: &str, edit: &Edit<(String, i64)>) {
        self.note(|journal| journal.limits(subject, Some(edit)));
        let state = self.inner.state.load();
        let mut rows = state.limit_rows(subject);
        edit.apply(&mut rows);
        state.set_limits(subject, &rows);
    }

    /// Notes a write in the journal, while one is kept.
    fn note(&self, f: impl FnOnce(&mut Journal)) {
        if let Some(journal) = self.journal().as_mut() {
            f(journal);
        }
    }

    /// The journal, while a compaction or a reload runs (`None` otherwise).
    fn journal(&self) -> std::sync::MutexGuard<'_, Option<Journal>> {
        self.inner.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Begins a compaction: from now on every write is noted, and the generation to
    /// rebuild (`State::rebuilt`, on a thread of the caller's) is returned. The writer may
    /// go on writing; `finish_compaction` ends it. Applier only.
    pub(crate) fn begin_compaction(&self) -> Arc<State> {
        *self.journal() = Some(Journal::compaction());
        self.inner.state.load_full()
    }

    /// Begins a reload beside the current generation: from now on every write is noted,
    /// with whether it is past the load's snapshot (`writes_newer`, which the writer
    /// says before each batch of writes: until it does, none is). The writer may go on
    /// writing; `finish_reload` ends it. Applier only.
    pub(crate) fn begin_reload(&self) {
        *self.journal() = Some(Journal::reload());
    }

    /// Says whether the writes made from now on are newer than what the generation being
    /// loaded holds, while a reload runs (`begin_reload`). Applier only.
    pub(crate) fn writes_newer(&self, newer: bool) {
        if let Some(journal) = self.journal().as_mut() {
            journal.newer = newer;
        }
    }

    /// Ends a compaction whose rebuild failed, or a reload whose load did: writes are no
    /// longer noted. Applier only.
    pub(crate) fn abandon_journal(&self) {
        *self.journal() = None;
    }

    /// Ends a compaction: every key written since `begin_compaction` is copied from
    /// `old`, the generation it began from, into `rebuilt`, which is then swapped in; the
    /// generation replaced is returned (for the caller to drop off the async runtime).
    /// `None`, and `rebuilt` dropped, if `old` is no longer current (a full load replaced
    /// it). Applier only, with no write running meanwhile.
    pub(crate) fn finish_compaction(&self, old: &Arc<State>, rebuilt: State) -> Option<Arc<State>> {
        let journal = self.journal().take();
        if !Arc::ptr_eq(&self.inner.state.load(), old) {
            return None;
        }
        if let Some(journal) = journal {
            journal.copy(old, &rebuilt);
        }
        Some(self.replace(rebuilt))
    }

    /// Ends a reload: every key whose last write since `begin_reload` was newer than the
    /// load's snapshot is copied from the current generation into `loaded`, which is then
    /// swapped in; the generation replaced is returned (for the caller to drop off the
    /// async runtime). Every other key is as new in `loaded`: its last change was one the
    /// load's snapshot sees. Applier only, with no write running meanwhile.
    pub(crate) fn finish_reload(&self, loaded: State) -> Arc<State> {
        if let Some(journal) = self.journal().take() {
            journal.copy(&self.inner.state.load(), &loaded);
        }
        self.replace(loaded)
    }

    /// Swaps in a freshly loaded generation and returns the old one (for the caller to
    /// drop off the async runtime). Applier only.
    pub(crate) fn replace(&self, state: State) -> Arc<State> {
        let old = self.inner.state.swap(Arc::new(state));
        // After the swap: a thread that sees the new count loads the new generation.
        self.inner.generation.fetch_add(1, Ordering::Release);
        old
    }

    /// Marks the watermark as not known to hold (`Shared::unconfirmed`): the connection
    /// to Postgres is lost. Applier only.
    pub(crate) fn unconfirm(&self) {
        self.inner.unconfirmed.store(true, Ordering::Release);
    }

    /// The watermark holds again: a new connection found the server as it was, or a
    /// full load has rewound it. Wakes the `at_least` waiters. Applier only.
    pub(crate) fn confirm(&self) {
        if self.inner.unconfirmed.swap(false, Ordering::AcqRel) {
            self.inner.watermark_tx.send_modify(|_| {});
        }
    }

    /// Sets the transactions applied even if fewer: after Postgres recovered from a
    /// crash, xids above the recovered counter are handed out again, so the old snapshot
    /// no longer proves anything. Applier only, right after a full load.
    pub(crate) fn rewind(&self, seen: &Snapshot) {
        self.inner.seen.store(Arc::new(seen.clone()));
        self.inner.watermark.store(seen.xmin(), Ordering::Release);
        self.inner.watermark_tx.send_replace(seen.xmin());
    }

    /// The mirror holds the transactions `seen` sees. Each snapshot the applier gives
    /// covers the last one; one that does not is passed over, so that neither the
    /// snapshot nor the watermark ever goes back but by `rewind`. Applier only.
    pub(crate) fn advance(&self, seen: &Snapshot) {
        let current = self.inner.seen.load();
        if **current == *seen || !seen.covers(&current) {
            return;
        }
        self.inner.seen.store(Arc::new(seen.clone()));
        let previous = self
            .inner
            .watermark
            .fetch_max(seen.xmin(), Ordering::AcqRel);
        self.inner
            .watermark_tx
            .send_replace(previous.max(seen.xmin()));
    }
}

/// A thread's view of the generation it last read in one store: the checks of a thread
/// that reads one store (a tokio worker in the daemon) take no `ArcSwap` guard, whose two
/// locked instructions were a fifth of an in-process check (benches/README.md).
///
/// A view holds its generation alive, so a replaced generation lives on until every thread
/// that viewed it checks again or lets go of it with `release_thread_view`: the daemon's
/// workers call that whenever they go idle, so a reload's old generation is not kept by a
/// worker with nothing to do.
struct View {
    /// The store viewed; `Weak` so that a view neither keeps a dropped store alive nor
    /// mistakes a later store at the same address for it.
    store: Weak<Shared>,
    generation: u64,
    state: Arc<State>,
}

thread_local! {
    static VIEW: RefCell<Option<View>> = const { RefCell::new(None) };
}

/// Lets go of this thread's view of the store it last read. The daemon's runtime calls it
/// on each worker before the worker parks (`on_thread_park`); the next check on the
/// thread loads the current generation again.
pub fn release_thread_view() {
    let released = VIEW.try_with(|view| view.try_borrow_mut().ok().and_then(|mut v| v.take()));
    if let Ok(Some(view)) = released {
        dispose(view.state);
    }
}

/// Drops a generation a view held. If it was the last reference (the reload that replaced
/// it has already dropped its own), the whole old set is freed here, which can take
/// seconds: off the async runtime when there is one, as the applier does.
fn dispose(state: Arc<State>) {
    if let Some(state) = Arc::into_inner(state) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(state))),
            Err(_) => drop(state),
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
    /// Bytes mapped for the grant lists the last full load or compaction packed (in huge
    /// pages where the kernel grants them), used or not.
    pub packed_bytes: u64,
    /// Object, permission and limit names interned since the last full load or
    /// compaction, which only the next one reclaims.
    pub names_since_load: u64,
    /// Bytes of the grant lists the last full load or compaction packed that are no
    /// longer used (their subjects written since), which only the next one reclaims.
    pub unused_packed_bytes: u64,
    /// Bytes of the heap that entries of the last full load or compaction held (grant
    /// lists that do not pack, expiring grants' slots, limits) and that their subjects
    /// left behind, unread, when written since, which only the next one reclaims.
    pub unused_heap_list_bytes: u64,
    /// Subjects the last full load or compaction put in the lock-free tier that have been
    /// written since: a check on one of them takes its shard's lock, as on a subject the
    /// load did not have.
    pub subjects_written_since_load: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_is_equality_at_every_length() {
        let text: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..text.len() {
            let a = &text[..n];
            assert!(same_bytes(a, a));
            assert!(!same_bytes(a, &text[..n + 1]), "lengths {n} and {}", n + 1);
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 1;
                assert!(!same_bytes(a, &b), "length {n}, differing at {at}");
            }
        }
    }

    /// A snapshot that sees every transaction below `xid`.
    fn at(xid: u64) -> Snapshot {
        Snapshot::parse(&format!("{xid}:{xid}:")).expect("a snapshot")
    }

    #[tokio::test]
    async fn a_token_above_the_watermark_is_past_once_the_snapshot_sees_it() {
        let store = Store::new();
        // 10 is still open; 11 and 13 committed, 12 is open too.
        store.advance(&Snapshot::parse("10:14:10,12").expect("a snapshot"));
        assert_eq!(store.watermark(), Xid(10));
        assert_eq!(store.passed(Xid(9)), Some(Xid(10)));
        assert_eq!(store.passed(Xid(11)), Some(Xid(10)));
        assert_eq!(store.passed(Xid(13)), Some(Xid(10)));
        assert_eq!(store.passed(Xid(10)), None);
        assert_eq!(store.passed(Xid(12)), None);
        assert_eq!(store.passed(Xid(14)), None);
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_past(Xid(12), Duration::from_secs(30)).await })
        };
        store.wanted().await;
        store.advance(&Snapshot::parse("10:14:10").expect("a snapshot"));
        assert_eq!(waiter.await.ok(), Some(Ok(Xid(10))));
    }

    #[tokio::test]
    async fn waiters_wake_when_the_watermark_passes_their_token() {
        let store = Store::new();
        store.advance(&at(10));
        assert_eq!(store.wait_past(Xid(9), Duration::ZERO).await, Ok(Xid(10)));
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move { store.wait_past(Xid(10), Duration::from_secs(30)).await })
        };
        store.wanted().await; // the waiter asked for a poll
        store.advance(&at(11));
        assert_eq!(waiter.await.ok(), Some(Ok(Xid(11))));
    }

    /// While the watermark is unconfirmed (the connection lost), a token below it waits
    /// too; the confirmation wakes it, and a token past it still waits for the watermark.
    #[tokio::test]
    async fn an_unconfirmed_watermark_answers_no_token_until_confirmed() {
        let store = Store::new();
        store.advance(&at(10));
        store.unconfirm();
        let stale = store.wait_past(Xid(5), Duration::from_millis(1)).await;
        assert_eq!(stale, Err(Stale { watermark: Xid(10) }));
        let (below, above) = {
            let (a, b) = (store.clone(), store.clone());
            (
                tokio::spawn(async move { a.wait_past(Xid(5), Duration::from_secs(30)).await }),
                tokio::spawn(async move { b.wait_past(Xid(12), Duration::from_secs(30)).await }),
            )
        };
        store.wanted().await;
        store.confirm();
        assert_eq!(below.await.ok(), Some(Ok(Xid(10))));
        assert!(!above.is_finished());
        store.advance(&at(13));
        assert_eq!(above.await.ok(), Some(Ok(Xid(13))));
        store.confirm(); // confirmed already: nothing happens
        assert_eq!(store.wait_past(Xid(12), Duration::ZERO).await, Ok(Xid(13)));
    }

    #[tokio::test]
    async fn a_wait_that_times_out_reports_the_watermark() {
        let store = Store::new();
        store.advance(&at(5));
        let result = store.wait_past(Xid(7), Duration::from_millis(1)).await;
        assert_eq!(result, Err(Stale { watermark: Xid(5) }));
    }

    #[test]
    fn the_watermark_never_goes_down() {
        let store = Store::new();
        store.advance(&at(8));
        store.advance(&at(3));
        assert_eq!(store.watermark(), Xid(8));
        assert_eq!(store.seen(), at(8));
        store.rewind(&at(3));
        assert_eq!(store.watermark(), Xid(3));
    }

    /// A store holding one tuple of `subject`, and a `Weak` to its generation.
    fn one_tuple(subject: &str) -> (Store, Weak<State>) {
        let store = Store::from_tuples([(subject, "o", "read", None)]);
        let generation = Arc::downgrade(&store.inner.state.load_full());
        (store, generation)
    }

    #[test]
    fn a_view_follows_reloads_and_lets_go_of_the_old_generation() {
        let (store, first) = one_tuple("u");
        assert!(store.check("u", "read", "o")); // this thread now views the first generation
        let mut builder = StateBuilder::new();
        builder.tuple("v", "o", "read", None);
        drop(store.replace(builder.finish()));
        assert!(first.upgrade().is_some(), "the view still holds it");
        release_thread_view();
        assert!(
            first.upgrade().is_none(),
            "released, and nobody else held it"
        );

        // A check after a reload sees the new generation and lets go of the old one too.
        assert!(store.check("v", "read", "o"));
        let second = Arc::downgrade(&store.inner.state.load_full());
        let mut builder = StateBuilder::new();
        builder.tuple("w", "o", "read", None);
        drop(store.replace(builder.finish()));
        assert!(!store.check("v", "read", "o"));
        assert!(store.check("w", "read", "o"));
        assert!(second.upgrade().is_none());
    }

    #[test]
    fn one_thread_checking_two_stores_answers_each_from_its_own() {
        let (a, _) = one_tuple("a");
        let (b, _) = one_tuple("b");
        for _ in 0..3 {
            assert!(a.check("a", "read", "o") && !a.check("b", "read", "o"));
            assert!(b.check("b", "read", "o") && !b.check("a", "read", "o"));
            assert_eq!(
                a.check_many([("a", "read", "o"), ("b", "read", "o")]),
                [true, false]
            );
        }
        // A dropped store is not mistaken for a new one that happens to take its place.
        drop(a);
        let (c, _) = one_tuple("c");
        assert!(c.check("c", "read", "o") && !c.check("a", "read", "o"));
    }

    #[test]
    fn views_on_other_threads_see_writes_and_reloads() {
        let (store, _) = one_tuple("u");
        let reader = |subject: &'static str| {
            let store = store.clone();
            std::thread::spawn(move || store.check(subject, "read", "o"))
        };
        assert!(!reader("x").join().unwrap_or(true));
        store.set_grant(
            "x",
            "o",
            &[TupleRow {
                permission: "read".into(),
                expires_at: None,
            }],
        );
        assert!(reader("x").join().unwrap_or(false));
        let mut builder = StateBuilder::new();
        builder.tuple("y", "o", "read", None);
        drop(store.replace(builder.finish()));
        assert!(!reader("x").join().unwrap_or(true));
        assert!(reader("y").join().unwrap_or(false));
    }

    #[test]
    fn an_idle_worker_of_the_daemons_runtime_lets_go_of_a_replaced_generation() {
        let runtime = crate::runtime().unwrap_or_else(|e| panic!("runtime: {e}"));
        let (store, first) = one_tuple("u");
        let viewer = store.clone();
        let viewed = runtime.block_on(async move {
            tokio::spawn(async move { viewer.check("u", "read", "o") }).await
        });
        assert!(viewed.unwrap_or(false));
        // No check follows the reload: only parking lets go of the view.
        drop(store.replace(StateBuilder::new().finish()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        runtime.block_on(async {
            while first.upgrade().is_some() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a worker still holds it"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn on_the_runtime_a_view_lets_go_of_a_replaced_generation() {
        let (store, first) = one_tuple("u");
        let viewer = store.clone();
        // A worker views the first generation, then the reload replaces it.
        assert!(tokio::spawn(async move { viewer.check("u", "read", "o") })
            .await
            .unwrap_or(false));
        drop(store.replace(StateBuilder::new().finish()));
        // The worker's next check lets go of the first generation (a blocking task frees it).
        let viewer = store.clone();
        assert!(!tokio::spawn(async move { viewer.check("u", "read", "o") })
            .await
            .unwrap_or(true));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while first.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the first generation was never freed"
            );
            tokio::task::yield_now().await;
        }
    }

    fn read(permission: &str) -> Vec<TupleRow> {
        vec![TupleRow {
            permission: permission.into(),
            expires_at: None,
        }]
    }

    /// A store of 2,000 subjects with two grants each, and a limit on every tenth.
    fn churned_store() -> Store {
        let rows: Vec<(String, String)> = (0..2_000)
            .flat_map(|s| {
                [
                    (format!("u{s}"), format!("o{s}")),
                    (format!("u{s}"), String::new()),
                ]
            })
            .collect();
        let store = Store::from_tuples(
            rows.iter()
                .map(|(s, o)| (s.as_str(), o.as_str(), "read", None)),
        );
        for s in (0..2_000).step_by(10) {
            store.set_limits(&format!("u{s}"), &[("max".to_owned(), s)]);
        }
        store
    }

    /// A compaction swaps in a rebuilt generation with every row, those written while
    /// it was rebuilt included: before the rebuild read them, after, or both.
    #[test]
    fn a_compaction_keeps_the_writes_made_while_it_rebuilt() {
        let store = churned_store();
        store.set_grant("u1", "tmp", &read("write"));
        store.set_grant("u1", "tmp", &[]);
        let old = store.begin_compaction();
        store.set_grant("u2", "o2", &read("write")); // before the rebuild reads it
        store.set_grant("u5", "o5", &read("write")); // the same, and left so
        let rebuilt = old.rebuilt();
        store.set_grant("u2", "o2", &read("admin")); // and changed again after
        store.set_grant("u3", "o3", &[]);
        store.set_grant("new", "o1", &read("read"));
        store.set_limits("u10", &[]);
        store.set_limits("u11", &[("max".to_owned(), 1)]);
        let digest = store.digest();
        let counts = store.counts();
        let replaced = store
            .finish_compaction(&old, rebuilt)
            .expect("still current");
        assert!(Arc::ptr_eq(&replaced, &old));
        assert_eq!(store.digest(), digest);
        assert_eq!(
            (store.counts().tuples, store.counts().limits),
            (counts.tuples, counts.limits)
        );
        assert!(store.check("u2", "admin", "o2") && !store.check("u2", "write", "o2"));
        assert!(!store.check("u3", "read", "o3") && store.check("new", "read", "o1"));
        assert_eq!(store.limit("u10", "max"), None);
        assert_eq!(store.limit("u11", "max"), Some(1));
        // `tmp` and `write` are no row's now; `admin` came with a write after the rebuild.
        assert!(counts.names_since_load >= 2);
        assert_eq!(store.counts().names_since_load, 1);
        // What changed after the rebuild read it was copied, so u2, u3, u10 and u11 left
        // the rebuilt generation's loaded tier; u5, which the rebuild read as it is, was
        // not copied and stays there.
        assert_eq!(store.counts().subjects_written_since_load, 4);
        assert!(store.check("u5", "write", "o5"));
        // The journal is off again: a later write is not noted.
        store.set_grant("u4", "o4", &[]);
        assert!(store.journal().is_none());
    }

    /// The rebuild reads the generation while the writer goes on, on another thread.
    #[test]
    fn a_compaction_rebuilds_while_the_writer_writes() {
        let store = churned_store();
        // A subject written in the heap, read by the rebuild in runs while it is written.
        let objects: Vec<String> = (0..5_000).map(|o| format!("b{o}")).collect();
        let rows = read("read");
        let grants: Vec<(&str, &[TupleRow])> =
            objects.iter().map(|o| (o.as_str(), &rows[..])).collect();
        store.set_grants("big", &grants);
        let old = store.begin_compaction();
        let rebuild = std::thread::spawn({
            let old = Arc::clone(&old);
            move || old.rebuilt()
        });
        for s in 0..2_000 {
            let (subject, object) = (format!("u{s}"), format!("o{s}"));
            match s % 3 {
                0 => store.set_grant(&subject, &object, &[]),
                1 => store.set_grant(&subject, &format!("x{s}"), &read("read")),
                _ => store.set_limits(&subject, &[("max".to_owned(), 7)]),
            }
            store.set_grant("big", &format!("b{}", s * 2), &[]);
            store.set_grant("big", &format!("new{s}"), &read("write"));
        }
        let digest = store.digest();
        let rebuilt = rebuild.join().expect("rebuilt");
        assert!(store.finish_compaction(&old, rebuilt).is_some());
        assert_eq!(store.digest(), digest);
    }

    /// A compaction whose rebuild failed leaves nothing noted behind.
    #[test]
    fn an_abandoned_compaction_notes_no_more_writes() {
        let store = churned_store();
        drop(store.begin_compaction());
        store.set_grant("u1", "o1", &[]);
        store.abandon_journal();
        store.set_grant("u2", "o2", &[]);
        assert!(store.journal().is_none());
    }

    /// A reload keeps the writes made beside its load that are newer than its snapshot,
    /// and takes the load's rows for every other key, the last write deciding.
    #[test]
    fn a_reload_keeps_the_writes_past_its_snapshot_and_loads_the_rest() {
        let store = churned_store();
        store.begin_reload();
        // Changes the load's snapshot saw: the load holds them (and here, one more that
        // the writer had not applied yet).
        store.set_grant("u1", "o1", &read("write"));
        store.set_limits("u10", &[]);
        // Past the load's snapshot.
        store.writes_newer(true);
        store.set_grant("u2", "o2", &[]);
        store.set_grants("u3", &[("o3", &read("admin")), ("x3", &read("read"))]);
        store.set_limits("u20", &[("max".to_owned(), 9)]);
        store.set_grant("u4", "o4", &read("write"));
        // A key written past the snapshot, then by a change the snapshot saw: the load
        // holds it as new (the writer read it out of order), and is not overwritten.
        store.writes_newer(false);
        store.set_grant("u4", "o4", &read("admin"));

        let mut builder = StateBuilder::new();
        for s in 1..=4 {
            builder.tuple(&format!("u{s}"), &format!("o{s}"), "read", None);
        }
        builder.tuple("u1", "o1", "admin", None);
        builder.tuple("u4", "o4", "owner", None);
        builder.tuple("bulk", "o", "read", None);
        builder.limit("u10", "max", 1);
        builder.limit("u20", "max", 2);
        drop(store.finish_reload(builder.finish()));

        // The load's rows where nothing newer was written.
        assert!(store.check("u1", "admin", "o1") && !store.check("u1", "write", "o1"));
        assert_eq!(store.limit("u10", "max"), Some(1));
        assert!(store.check("u4", "owner", "o4") && !store.check("u4", "write", "o4"));
        assert!(store.check("bulk", "read", "o"));
        // The newer writes over them.
        assert!(!store.check("u2", "read", "o2"));
        assert!(store.check("u3", "admin", "o3") && !store.check("u3", "read", "o3"));
        assert!(store.check("u3", "read", "x3"));
        assert_eq!(store.limit("u20", "max"), Some(9));
        // The journal is off again.
        store.set_grant("u5", "o5", &[]);
        assert!(store.journal().is_none());
    }

    /// A notification's edit made beside a reload, past its snapshot, over rows the load
    /// brings newer (a bulk write made with the triggers off, which the current
    /// generation lacks) is made again over the loaded rows at the swap: the key holds
    /// both, not the edit over the old rows alone (the bulk write lost until the key is
    /// read again), nor the loaded rows alone (the edit gone back).
    #[test]
    fn a_reload_makes_the_edits_past_its_snapshot_again_over_the_loaded_rows() {
        let store = Store::from_tuples([("k", "doc", "read", None)]);
        store.begin_reload();
        store.writes_newer(true);
        let edit = Edit {
            gone: vec!["read".to_owned()],
            came: read("admin"),
        };
        store.edit_grant("k", "doc", &edit);
        let seats = Edit {
            gone: Vec::new(),
            came: vec![("seats".to_owned(), 3)],
        };
        store.edit_limits("k", &seats);
        assert!(store.check("k", "admin", "doc") && !store.check("k", "read", "doc"));

        let mut builder = StateBuilder::new();
        builder.tuple("k", "doc", "read", None);
        builder.tuple("k", "doc", "write", None);
        builder.limit("k", "projects", 1);
        drop(store.finish_reload(builder.finish()));

        assert!(store.check("k", "admin", "doc") && store.check("k", "write", "doc"));
        assert!(!store.check("k", "read", "doc"));
        assert_eq!(store.limit("k", "projects"), Some(1));
        assert_eq!(store.limit("k", "seats"), Some(3));
    }

    /// A full load that replaced the generation while it was rebuilt wins.
    #[test]
    fn a_compaction_of_a_replaced_generation_is_dropped() {
        let store = churned_store();
        let old = store.begin_compaction();
        let rebuilt = old.rebuilt();
        let mut builder = StateBuilder::new();
        builder.tuple("v", "o", "read", None);
        drop(store.replace(builder.finish()));
        assert!(store.finish_compaction(&old, rebuilt).is_none());
        assert!(store.check("v", "read", "o"));
        assert_eq!(store.counts().tuples, 1);
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
