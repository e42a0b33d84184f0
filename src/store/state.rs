//! One immutable-by-swap generation of the mirrored permission set: its subjects, a
//! check, a batch and the applier's writes here; a subject's objects listed in `listing`,
//! its rows and the digest read back in `rows`, a generation built (the full load's
//! `StateBuilder`, a compaction's rebuild) in `build`. A subject's grants, in their four
//! forms, are `store::grants`'.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::arena::Arena;
use super::grants::{Grant, Grants, Held, Merged, Slot, Thin, CHUNKED_OVER};
use super::interner::Interner;
use super::key;
use super::subjects::{Ref, Subjects};

mod build;
mod listing;
mod rows;

pub(crate) use build::StateBuilder;
pub use listing::Listing;
pub(crate) use listing::QUICK_LISTING;
pub use rows::{Digest, StoredRows};

/// `expires_at` of a tuple that never expires.
pub(crate) const NEVER: i64 = i64::MAX;
/// The wildcard subject and object.
pub(crate) const WILDCARD: &str = "*";
// `check` looks `*` up in the short names' map.
const _: () = assert!(WILDCARD.len() <= key::SHORT);
/// A batch holds every shard's read lock for at most this many checks at a time (~20 us
/// on a cold cache), so that the applier, which waits for a shard's readers to leave
/// before it writes there, waits at most that long for a batch of any size.
const HELD_CHECKS: usize = 256;

/// The object id of the global object `''` in every generation (see `fixed_object_id`).
const GLOBAL_ID: u32 = 0;
/// The object id of the wildcard object `*` in every generation.
const WILDCARD_ID: u32 = 1;

/// One stored tuple, as the loader and applier hand it to the store. Ordered by
/// permission, then expiry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TupleRow {
    /// The permission name.
    pub permission: String,
    /// Microseconds since the Unix epoch, or `None` for never.
    pub expires_at: Option<i64>,
}

/// Everything stored for one subject: grants by object, sorted by object id so a check is
/// a binary search and listing is a scan of exactly this subject's objects; and limits.
/// 32 bytes, so that a map bucket (key and entry) is 56 instead of 80: a quarter less
/// memory at 10M tuples (benches/README.md; checks measured no faster or slower).
#[derive(Debug, Default, Clone)]
struct SubjectEntry {
    grants: Grants,
    // Behind one pointer: most subjects have no limits. Slices, not `Vec`s (no capacity):
    // a subject's rows change only through the single writer, which can reallocate.
    limits: Thin<(u32, i64)>,
}

const _: () = assert!(std::mem::size_of::<SubjectEntry>() == 32);

impl SubjectEntry {
    fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The bytes of the heap the entry holds: its grants' (`Grants::heap_bytes`) and its
    /// limits'.
    fn heap_bytes(&self) -> usize {
        self.grants.heap_bytes() + self.limits.heap_bytes()
    }

    fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.limits.is_empty()
    }
}

/// The ids of the global object `''` (0) and the wildcard `*` (1), interned first in every
/// generation (`State::with_capacity`), so that checks and loads need no look-up for them.
#[inline]
fn fixed_object_id(object: &(impl AsRef<[u8]> + ?Sized)) -> Option<u32> {
    match object.as_ref() {
        b"" => Some(GLOBAL_ID),
        name if name == WILDCARD.as_bytes() => Some(WILDCARD_ID),
        _ => None,
    }
}

/// The object ids a check on an object looks for: the object's own (if it was ever
/// interned) and the wildcard's (unless the object is the global object or `*` itself),
/// resolved on first use.
enum Candidates<'a> {
    Unresolved(&'a str),
    Resolved([u32; 2], usize),
}

impl Candidates<'_> {
    #[inline]
    fn ids(&mut self, objects: &Interner) -> &[u32] {
        if let Self::Unresolved(object) = *self {
            let (exact, wildcard) = match fixed_object_id(object) {
                Some(id) => (Some(id), false),
                None => (objects.get(object), true),
            };
            let mut ids = [0u32; 2];
            let mut n = 0;
            if let Some(id) = exact {
                ids[n] = id;
                n += 1;
            }
            if wildcard {
                ids[n] = WILDCARD_ID;
                n += 1;
            }
            *self = Self::Resolved(ids, n);
        }
        match self {
            Self::Resolved(ids, n) => &ids[..*n],
            Self::Unresolved(_) => &[],
        }
    }
}

/// The wall clock, read at most once per check and only when an expiring tuple is met.
pub(crate) struct Now(Option<i64>);

impl Now {
    pub(crate) fn lazy() -> Self {
        Self(None)
    }

    #[cfg(test)]
    pub(crate) fn fixed(micros: i64) -> Self {
        Self(Some(micros))
    }

    pub(super) fn get(&mut self) -> i64 {
        *self.0.get_or_insert_with(now_micros)
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// One generation of the mirror. The applier mutates it in place for incremental changes;
/// a full reload builds a new one aside and swaps it in.
pub(crate) struct State {
    /// Subject string to its entry: the full load's subjects in a table read without a
    /// lock, those the applier wrote since in a `DashMap` whose shards it writes one at a
    /// time (`subjects`). A name of up to 46 bytes sits in the bucket itself, so a look-up
    /// reads no second cache line.
    subjects: Subjects<SubjectEntry>,
    /// The grant lists the full load packed (`Grants::Packed`); read-only once shared.
    packed: Arena,
    objects: Interner,
    permissions: Interner,
    /// Whether subject `*` holds anything: most sets have no public tuples, and a denied
    /// check then skips a second map look-up. Kept by the single writer.
    has_public: AtomicBool,
    /// How many of `*`'s grants on objects hold each permission (by id), expired ones
    /// included, the global object's left out (as listings leave it out): a listing of a
    /// permission `*` holds none of leaves `*` alone (a pass over a million public grants
    /// of another permission took 2.7 ms). Kept by the single writer.
    public_held: Mutex<Vec<u64>>,
    limit_names: Interner,
    /// Stored tuple rows (expired ones included), kept by the single writer.
    tuples: AtomicU64,
    /// Stored limit rows.
    limits: AtomicU64,
    /// Bytes of packed grant lists left unused since the load (their subjects' grants
    /// moved to the heap when written), kept by the single writer.
    abandoned: AtomicU64,
    /// Bytes of the heap the load's entries hold (`SubjectEntry::heap_bytes`).
    heap_loaded: usize,
    /// Of them, those left behind in the loaded tier by subjects written since, kept by
    /// the single writer.
    left_behind: AtomicU64,
    /// The ids of the objects named when the generation was built, the global object's
    /// excepted, sorted by name (`object_order`). A `OnceLock`: sorted once, by the first
    /// listing that walks them (others wait for it), and never if no listing does, as in
    /// most generations; read without a lock after.
    object_order: OnceLock<Box<[u32]>>,
}

/// What a generation holds that only a new generation reclaims (a full load, or a
/// compaction: `State::rebuilt`), against what its build made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Growth {
    /// Object, permission and limit names the load interned.
    pub(crate) names_loaded: usize,
    /// Names interned since: never removed, whether still used or not.
    pub(crate) names_since: usize,
    /// Bytes of the grant lists the load packed.
    pub(crate) packed: usize,
    /// Of them, the bytes left unused since.
    pub(crate) abandoned: usize,
    /// Subjects the load put in the subject map's lock-free tier.
    pub(crate) subjects_loaded: usize,
    /// Of them, those written since (read through the `DashMap` now, after a look-up in
    /// the tier that finds them moved: `subjects.rs`).
    pub(crate) subjects_moved: usize,
    /// Bytes of the heap the load's entries hold: the grant lists that do not pack, the
    /// expiring grants' slots and the limits.
    pub(crate) heap: usize,
    /// Of them, the bytes left behind, unread, by subjects written since.
    pub(crate) left_behind: usize,
}

/// Names interned since a load that call for a compaction at the least, however few the
/// load interned: a small set is not loaded again for every few new names.
const MIN_NAMES: usize = 1_000;
/// Packed bytes left unused that call for a compaction at the least.
const MIN_ABANDONED: usize = 1 << 20;
/// Loaded subjects written since that call for a compaction at the least.
const MIN_MOVED: usize = 10_000;
/// Heap grant lists left behind that call for a compaction at the least.
const MIN_LEFT_BEHIND: usize = 1 << 20;

impl Growth {
    /// Why a compaction is due to reclaim what the generation grew by, if it is: the names
    /// interned since the load reached `pct` % of those it interned (and `MIN_NAMES`),
    /// the packed grant lists left unused reached `pct` % of those it packed (and
    /// `MIN_ABANDONED`), the loaded subjects written since reached `pct` % of those it
    /// loaded (and `MIN_MOVED`), or the heap grant lists those left behind reached `pct`
    /// % of those it built in the heap (and `MIN_LEFT_BEHIND`: a few large subjects
    /// written, each a list of millions of bytes). Never with `pct` 0.
    pub(crate) fn compaction_due(&self, pct: u32) -> Option<String> {
        if pct == 0 {
            return None;
        }
        let share = |of: usize| of.saturating_mul(pct as usize) / 100;
        if self.names_since >= share(self.names_loaded).max(MIN_NAMES) {
            return Some(format!(
                "compaction: {} names interned since this generation was built, which interned {}",
                self.names_since, self.names_loaded
            ));
        }
        if self.abandoned >= share(self.packed).max(MIN_ABANDONED) {
            return Some(format!(
                "compaction: {:.1} MiB of the {:.1} MiB of grant lists this generation \
                 packed are no longer used",
                self.abandoned as f64 / f64::from(1 << 20),
                self.packed as f64 / f64::from(1 << 20)
            ));
        }
        if self.subjects_moved >= share(self.subjects_loaded).max(MIN_MOVED) {
            return Some(format!(
                "compaction: {} of the {} subjects this generation put in the lock-free \
                 map have been written since",
                self.subjects_moved, self.subjects_loaded
            ));
        }
        if self.left_behind >= share(self.heap).max(MIN_LEFT_BEHIND) {
            return Some(format!(
                "compaction: {:.1} MiB of the {:.1} MiB of grant lists this generation \
                 built in the heap are left behind by subjects written since",
                self.left_behind as f64 / f64::from(1 << 20),
                self.heap as f64 / f64::from(1 << 20)
            ));
        }
        None
    }
}

/// What a write reads before it takes its subject's shard lock (`State::before_write`).
#[derive(Default)]
struct BeforeWrite {
    unpacked: Option<Grants>,
    left_behind: usize,
    /// A run's changes merged with the subject's chunks (`Chunks::merged`).
    merged: Option<Merged>,
}

impl State {
    pub(crate) fn with_capacity(subjects: usize, objects: usize) -> Self {
        let mut state = Self {
            subjects: Subjects::with_capacity(subjects),
            packed: Arena::default(),
            objects: Interner::with_capacity(objects),
            permissions: Interner::with_capacity(64),
            has_public: AtomicBool::new(false),
            public_held: Mutex::default(),
            limit_names: Interner::with_capacity(16),
            tuples: AtomicU64::new(0),
            limits: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            heap_loaded: 0,
            left_behind: AtomicU64::new(0),
            object_order: OnceLock::new(),
        };
        // The global object gets id 0 and the wildcard id 1 (`fixed_object_id`), so neither
        // is ever missing.
        for name in ["", WILDCARD] {
            let id = state.objects.intern_mut(name);
            debug_assert_eq!(Some(id), fixed_object_id(name));
        }
        state
    }

    /// Number of stored tuple rows, expired ones included.
    pub(crate) fn tuple_count(&self) -> u64 {
        self.tuples.load(Ordering::Relaxed)
    }

    /// Number of stored limit rows.
    pub(crate) fn limit_count(&self) -> u64 {
        self.limits.load(Ordering::Relaxed)
    }

    /// Number of subjects with at least one tuple or limit.
    pub(crate) fn subject_count(&self) -> usize {
        self.subjects.len()
    }

    /// Bytes mapped for the grant lists the full load packed (in huge pages where the
    /// kernel grants them).
    pub(crate) fn packed_bytes(&self) -> usize {
        self.packed.mapped_bytes()
    }

    /// What the generation has grown by since its load, that only a full load reclaims.
    pub(crate) fn growth(&self) -> Growth {
        let (subjects_loaded, subjects_moved) = self.subjects.loaded_and_moved();
        let mut growth = Growth {
            subjects_loaded,
            subjects_moved,
            packed: self.packed.used_bytes(),
            abandoned: usize::try_from(self.abandoned.load(Ordering::Relaxed))
                .unwrap_or(usize::MAX),
            heap: self.heap_loaded,
            left_behind: usize::try_from(self.left_behind.load(Ordering::Relaxed))
                .unwrap_or(usize::MAX),
            ..Growth::default()
        };
        for interner in [&self.objects, &self.permissions, &self.limit_names] {
            let (loaded, since) = interner.sizes();
            growth.names_loaded += loaded;
            growth.names_since += since;
        }
        growth
    }

    /// Whether the subject whose `entry` this is holds `permission` on one of the objects
    /// `candidates` names. The object ids are resolved only once the subject's entry is
    /// found (and then once for both the subject and `*`): an unknown subject costs no
    /// object look-up, and the object's look-up comes after the shard lock (for a subject
    /// written since the load), where its cache miss may overlap the fetch of the
    /// subject's grants (before the lock, the locked instruction waits for it; no gain
    /// beyond noise measured on resource checks, benches/README.md). `entry` is taken by value: a shard guard is let go here, before
    /// `*` is looked up (a second read lock on a shard held by this thread could wait
    /// behind a queued writer for ever).
    #[inline]
    fn entry_allows<E: Deref<Target = SubjectEntry>>(
        &self,
        entry: Option<E>,
        candidates: &mut Candidates<'_>,
        permission: u32,
        now: &mut Now,
    ) -> bool {
        entry.is_some_and(|entry| {
            candidates.ids(&self.objects).iter().any(|&o| {
                entry
                    .grants
                    .get(o, &self.packed)
                    .is_some_and(|g| g.allows(permission, now))
            })
        })
    }

    /// Whether `subject` (or `*`) holds `permission` on `object` (or on `*` when `object`
    /// is not the global object ''), counting only unexpired tuples.
    pub(crate) fn check(
        &self,
        subject: &str,
        permission: &str,
        object: &str,
        now: &mut Now,
    ) -> bool {
        // A short name and `*` are both in the short map: read it without going through
        // `Subjects`, whose entry may be of either map.
        if key::is_short(subject) {
            self.check_entry(subject, permission, object, now, |s| {
                self.subjects.short.get(s)
            })
        } else {
            self.check_entry(subject, permission, object, now, |s| self.subjects.get(s))
        }
    }

    /// `check` for many checks at once, in order, with the subject map read as a batch:
    /// each shard's read lock is taken once per `HELD_CHECKS` checks, and every subject of
    /// those is looked up before any of them is answered. A look-up usually misses the
    /// cache on the subject's bucket; with no locked instruction between them (each waits
    /// for all the loads before it) the CPU overlaps several of those misses. Up to one
    /// check per shard the checks go one by one, as `check` does.
    pub(crate) fn check_many<'c>(
        &self,
        checks: impl ExactSizeIterator<Item = (&'c str, &'c str, &'c str)> + Clone,
        now: &mut Now,
    ) -> Vec<bool> {
        let mut answers = Vec::with_capacity(checks.len());
        let mut rest = checks;
        while rest.len() > 0 {
            let n = rest.len().min(HELD_CHECKS);
            self.check_held(rest.clone().take(n), now, &mut answers);
            rest.nth(n - 1);
        }
        answers
    }

    /// The checks of `check_many`, at most `HELD_CHECKS`, under one taking of the locks.
    fn check_held<'c>(
        &self,
        checks: impl ExactSizeIterator<Item = (&'c str, &'c str, &'c str)> + Clone,
        now: &mut Now,
        answers: &mut Vec<bool>,
    ) {
        if checks.len() <= self.subjects.shard_count() {
            answers.extend(checks.map(|(s, p, o)| self.check(s, p, o, now)));
            return;
        }
        let subjects = checks.clone().map(|(s, _, _)| s);
        self.subjects.read_all(subjects, |entries, entry_of| {
            answers.extend(checks.zip(entries).map(|((s, p, o), entry)| {
                // `check_entry` asks for the subject first: that one is already found.
                let mut found = Some(entry);
                self.check_entry(s, p, o, now, |subject| {
                    found.take().unwrap_or_else(|| entry_of(subject))
                })
            }));
        });
    }

    /// The body of `check`, with the subject map read through `entry_of` (called for
    /// `subject` first, then for `*` when needed).
    #[inline]
    fn check_entry<E: Deref<Target = SubjectEntry>>(
        &self,
        subject: &str,
        permission: &str,
        object: &str,
        now: &mut Now,
        mut entry_of: impl FnMut(&str) -> Option<E>,
    ) -> bool {
        let Some(permission) = self.permissions.get(permission) else {
            return false;
        };
        let mut candidates = Candidates::Unresolved(object);
        self.entry_allows(entry_of(subject), &mut candidates, permission, now)
            || (subject != WILDCARD
                && self.has_public.load(Ordering::Relaxed)
                && self.entry_allows(entry_of(WILDCARD), &mut candidates, permission, now))
    }

    /// The permissions `subject` holds on `object` ('' for global ones), wildcards and
    /// expiry applied, sorted.
    pub(crate) fn permissions_of(
        &self,
        subject: &str,
        object: &str,
        now: &mut Now,
    ) -> Vec<Arc<str>> {
        let mut candidates = Candidates::Unresolved(object);
        let objects = candidates.ids(&self.objects);
        let mut held = BTreeSet::new();
        for s in [subject, WILDCARD] {
            if let Some(entry) = self.subjects.get(s) {
                for &o in objects {
                    if let Some(g) = entry.grants.get(o, &self.packed) {
                        for (p, expires_at) in g.rows() {
                            if expires_at > now.get() {
                                held.insert(p);
                            }
                        }
                    }
                }
            }
            if subject == WILDCARD {
                break;
            }
        }
        let mut names: Vec<Arc<str>> = held.into_iter().map(|p| self.permissions.name(p)).collect();
        names.sort_unstable();
        names
    }

    /// Calls `f` with each of `subject`'s grants on objects from id `from` on, in id
    /// order, read `GRANTS_RUN` at a time under the subject's shard lock, let go between
    /// runs: the writer waits for one run at most behind a reader of a large subject,
    /// where a reader of a million grants held it for milliseconds (a listing's pass) to
    /// a quarter of a second (a digest). Each run reads the subject as it is then, each
    /// object once.
    fn grants_in_runs(&self, subject: &str, from: u32, mut f: impl FnMut(u32, Held<'_>)) {
        let mut next = Some(from);
        while let Some(from) = next {
            next = self.run_of_grants(subject, from, &mut f);
        }
    }

    /// `subject`'s rows, (object, permission, expires_at) in object order, to `f` a run of
    /// `grants_in_runs` at a time: each run is copied under the lock and handed over once
    /// it is let go, so that what `f` does with a row (a digest's hash, a `String`, the
    /// growth of a long list) does not hold the writer.
    fn rows_in_runs(&self, subject: &str, mut f: impl FnMut(&[(u32, u32, i64)])) {
        let mut run = Vec::new();
        let mut next = Some(0);
        while let Some(from) = next {
            run.clear();
            next = self.run_of_grants(subject, from, &mut |o, held: Held<'_>| {
                run.extend(held.rows().map(|(p, expires_at)| (o, p, expires_at)));
            });
            f(&run);
        }
    }

    /// One run of `grants_in_runs`: `f` with up to `GRANTS_RUN` of `subject`'s grants from
    /// object id `from` on, under its shard lock, taken once any write under way is done
    /// (`Subjects::give_way`); the object the next run starts from, if any is left.
    fn run_of_grants(
        &self,
        subject: &str,
        from: u32,
        f: &mut impl FnMut(u32, Held<'_>),
    ) -> Option<u32> {
        #[cfg(test)]
        tests::RUNS.with(|runs| runs.set(runs.get() + 1));
        self.subjects.give_way();
        let entry = self.subjects.get(subject)?;
        for (i, (o, held)) in entry.grants.iter_from(from, &self.packed).enumerate() {
            if i == GRANTS_RUN {
                return Some(o);
            }
            f(o, held);
        }
        None
    }

    /// The limits of `subject`: its own values, over those of `*`.
    pub(crate) fn limits_of(&self, subject: &str) -> BTreeMap<Arc<str>, i64> {
        let mut limits = BTreeMap::new();
        for s in [WILDCARD, subject] {
            if let Some(entry) = self.subjects.get(s) {
                for &(name, value) in entry.limits.iter() {
                    limits.insert(self.limit_names.name(name), value);
                }
            }
        }
        limits
    }

    /// The value of one limit of `subject` (its own, else that of `*`).
    pub(crate) fn limit(&self, subject: &str, name: &str) -> Option<i64> {
        let name = self.limit_names.get(name)?;
        let find = |s: &str| {
            let entry = self.subjects.get(s)?;
            entry
                .limits
                .binary_search_by_key(&name, |(n, _)| *n)
                .ok()
                .map(|i| entry.limits[i].1)
        };
        find(subject).or_else(|| find(WILDCARD))
    }

    /// Replaces everything `subject` holds on `object` with `rows` (empty: removes it).
    pub(crate) fn set_grant(&self, subject: &str, object: &str, rows: &[TupleRow]) {
        let grant = self.grant_of(rows);
        let added = grant.held().row_count();
        let removed = if grant.is_empty() {
            let Some(object) = self.objects.get(object) else {
                return;
            };
            self.count_public_write(subject, [(object, &grant)]);
            let before = self.before_write(subject, true, &[]);
            let Some(mut entry) = self.subjects.get_mut(subject) else {
                return;
            };
            self.unpack(&mut entry.grants, before);
            let gone = entry.grants.set(object, grant, &self.packed);
            let empty = entry.is_empty();
            drop(entry);
            if empty {
                self.subjects.remove_if(subject, SubjectEntry::is_empty);
            }
            gone
        } else {
            let object = self.objects.intern(object);
            self.count_public_write(subject, [(object, &grant)]);
            let before = self.before_write(subject, true, &[]);
            let mut entry = self.subjects.entry_or_default(subject);
            self.unpack(&mut entry.grants, before);
            entry.grants.set(object, grant, &self.packed)
        };
        self.adjust(&self.tuples, added, removed);
        self.note_public(subject);
    }

    /// What a write to `subject` reads before it takes the subject's shard lock (the single
    /// writer calls it, so the entry is the same once the lock is taken): the bytes of
    /// the heap list its loaded entry leaves behind if the write moves it out of the
    /// loaded tier; and, with `unpack`, its grants in the heap if they are packed and
    /// more than `CHUNKED_OVER`, as reading them takes milliseconds at a million objects,
    /// which every reader of the shard would wait out.
    ///
    /// And a run of changes (`run`, sorted by object, each once) to a subject whose grants
    /// are in chunks is merged with them here, under its shard's read lock, which checks
    /// share (`Chunks::merged`): the write lock is then held only to put the touched
    /// chunks in. Merged under the write lock, 10,000 revokes at a million grants held
    /// every check of the shard for 3 to 4 ms.
    fn before_write(&self, subject: &str, unpack: bool, run: &[(u32, Grant)]) -> BeforeWrite {
        let Some(entry) = self.subjects.get(subject) else {
            return BeforeWrite::default();
        };
        let left_behind = match &entry {
            Ref::Loaded(loaded) => loaded.heap_bytes(),
            Ref::Short(_) | Ref::Long(_) => 0,
        };
        let (list, merged) = match &entry.grants {
            Grants::Packed(list) if unpack && list.len() > CHUNKED_OVER => (Some(*list), None),
            Grants::Chunked(chunks) if !run.is_empty() => (None, Some(chunks.merged(run))),
            _ => (None, None),
        };
        drop(entry);
        let unpacked =
            list.map(|list| Grants::from_vec(Grants::Packed(list).into_vec(&self.packed)));
        BeforeWrite {
            unpacked,
            left_behind,
            merged,
        }
    }

    /// Readies `grants` for a write: counts their packed bytes as left unused and what
    /// their loaded entry leaves behind (`before`), and puts in their unpacked copy if
    /// there is one.
    fn unpack(&self, grants: &mut Grants, before: BeforeWrite) {
        let bytes = grants.packed_bytes() as u64;
        if bytes > 0 {
            self.abandoned.fetch_add(bytes, Ordering::Relaxed);
        }
        self.leave_behind(before.left_behind);
        if let Some(unpacked) = before.unpacked {
            *grants = unpacked;
        }
    }

    /// Counts `bytes` of a loaded entry's heap list as left behind.
    fn leave_behind(&self, bytes: usize) {
        if bytes > 0 {
            self.left_behind.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// The grant `rows` make, their permissions interned.
    fn grant_of(&self, rows: &[TupleRow]) -> Grant {
        Grant::from_slots(rows.iter().map(|r| Slot {
            permission: self.permissions.intern(&r.permission),
            expires_at: r.expires_at.unwrap_or(NEVER),
        }))
    }

    /// Replaces `subject`'s grants on each object of `changes`, in one pass over its
    /// list: what `set_grant` does for each in turn, with the subject's list moved once
    /// rather than once a change (a transaction that grants or revokes many objects of
    /// one large subject). A reader sees the subject's changes all at once.
    pub(crate) fn set_grants(&self, subject: &str, changes: &[(&str, &[TupleRow])]) {
        if let [(object, rows)] = changes {
            return self.set_grant(subject, object, rows);
        }
        let mut grants: Vec<(u32, Grant)> = Vec::with_capacity(changes.len());
        let mut added = 0;
        for (object, rows) in changes {
            let grant = self.grant_of(rows);
            let object = if grant.is_empty() {
                match self.objects.get(object) {
                    Some(object) => object,
                    None => continue, // never interned: nothing to remove
                }
            } else {
                self.objects.intern(object)
            };
            grants.push((object, grant));
        }
        // The last change of each object wins: a stable sort keeps them in order.
        grants.sort_by_key(|(object, _)| *object);
        grants.reverse();
        grants.dedup_by_key(|(object, _)| *object);
        grants.reverse();
        if grants.is_empty() {
            return;
        }
        for (_, grant) in &grants {
            added += grant.held().row_count();
        }
        self.count_public_write(subject, grants.iter().map(|(o, g)| (*o, g)));
        let mut before = self.before_write(subject, true, &grants);
        let aside = before.merged.take();
        // A packed list read into the heap is the writer's own until it is put in: the
        // run goes into it before the lock too.
        let merged_unpacked = before
            .unpacked
            .as_mut()
            .map(|unpacked| unpacked.set_many(std::mem::take(&mut grants), &self.packed));
        let entry = if added == 0 {
            self.subjects.get_mut(subject)
        } else {
            Some(self.subjects.entry_or_default(subject))
        };
        let Some(mut entry) = entry else {
            return;
        };
        self.unpack(&mut entry.grants, before);
        let put = aside.and_then(|merged| match &mut entry.grants {
            Grants::Chunked(chunks) => {
                let removed = merged.removed;
                chunks.put(merged).ok().map(|replaced| (removed, replaced))
            }
            _ => None,
        });
        let (removed, replaced) = match (merged_unpacked, put) {
            (Some(removed), _) => (removed, Vec::new()),
            (None, Some((removed, replaced))) => {
                entry.grants.unchunk_if_small();
                (removed, replaced)
            }
            (None, None) => (entry.grants.set_many(grants, &self.packed), Vec::new()),
        };
        let empty = entry.is_empty();
        drop(entry);
        drop(replaced);
        if empty {
            self.subjects.remove_if(subject, SubjectEntry::is_empty);
        }
        self.adjust(&self.tuples, added, removed);
        self.note_public(subject);
    }

    /// Replaces every limit of `subject` with `rows` (empty: removes them).
    pub(crate) fn set_limits(&self, subject: &str, rows: &[(String, i64)]) {
        let mut limits: Vec<(u32, i64)> = rows
            .iter()
            .map(|(name, value)| (self.limit_names.intern(name), *value))
            .collect();
        limits.sort_unstable();
        let added = limits.len() as u64;
        let removed;
        let left_behind = self.before_write(subject, false, &[]).left_behind;
        if limits.is_empty() {
            let Some(mut entry) = self.subjects.get_mut(subject) else {
                return;
            };
            removed = std::mem::take(&mut entry.limits).len() as u64;
            let empty = entry.is_empty();
            drop(entry);
            if empty {
                self.subjects.remove_if(subject, SubjectEntry::is_empty);
            }
        } else {
            let mut entry = self.subjects.entry_or_default(subject);
            removed = std::mem::replace(&mut entry.limits, limits.into()).len() as u64;
        }
        self.leave_behind(left_behind);
        self.adjust(&self.limits, added, removed);
        self.note_public(subject);
    }

    /// Counts `*`'s grants by permission (`public_held`) afresh.
    fn count_public(&self) {
        let mut counts = Vec::new();
        if let Some(entry) = self.subjects.get(WILDCARD) {
            for (object, grant) in entry.grants.iter(&self.packed) {
                if object != GLOBAL_ID {
                    count_rows(&mut counts, grant, 1);
                }
            }
        }
        *self
            .public_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counts;
    }

    /// Keeps `public_held` for a write to `subject` that sets each object's grant to the
    /// one given: for `*`, its grants' rows are counted out and the new ones in. Before
    /// the write, which nothing else can change in between (the single writer).
    fn count_public_write<'g>(
        &self,
        subject: &str,
        changes: impl IntoIterator<Item = (u32, &'g Grant)>,
    ) {
        if subject != WILDCARD {
            return;
        }
        // Listings leave the global object out, and so does the count.
        let changes = changes
            .into_iter()
            .filter(|&(object, _)| object != GLOBAL_ID);
        let mut counts = self
            .public_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = self.subjects.get(WILDCARD);
        for (object, grant) in changes {
            if let Some(old) = entry
                .as_ref()
                .and_then(|e| e.grants.get(object, &self.packed))
            {
                count_rows(&mut counts, old, -1);
            }
            count_rows(&mut counts, grant.held(), 1);
        }
    }

    /// How many of `*`'s grants on objects hold `permission` (`public_held`).
    fn public_holding(&self, permission: u32) -> u64 {
        let counts = self
            .public_held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.get(permission as usize).copied().unwrap_or(0)
    }

    /// Re-reads whether subject `*` exists after a write to `subject`.
    fn note_public(&self, subject: &str) {
        if subject == WILDCARD {
            self.has_public
                .store(self.subjects.contains(WILDCARD), Ordering::Relaxed);
        }
    }

    fn adjust(&self, counter: &AtomicU64, added: u64, removed: u64) {
        // Only the single writer updates the counters, so load-then-store cannot lose one.
        let value = counter.load(Ordering::Relaxed);
        counter.store(
            value.saturating_add(added).saturating_sub(removed),
            Ordering::Relaxed,
        );
    }
}

/// Grants a reader of a whole subject reads under its shard lock at once
/// (`State::grants_in_runs`): some microseconds of the writer's wait for a listing's pass,
/// ~0.3 ms for a digest's hashes; the run's look-up of the subject costs a few hundred
/// nanoseconds of it.
const GRANTS_RUN: usize = 1_024;

/// Adds `by` to the count of each permission `grant` holds.
fn count_rows(counts: &mut Vec<u64>, grant: Held<'_>, by: i64) {
    for (permission, _) in grant.rows() {
        let at = permission as usize;
        if counts.len() <= at {
            counts.resize(at + 1, 0);
        }
        counts[at] = counts[at].saturating_add_signed(by);
    }
}

#[cfg(test)]
mod tests {
    use super::super::grants::{CHUNK, SCAN_GRANTS};
    use super::listing::Listed;
    use super::*;
    use std::ops::Bound::{Excluded, Included};

    pub(super) fn row(permission: &str, expires_at: Option<i64>) -> TupleRow {
        TupleRow {
            permission: permission.into(),
            expires_at,
        }
    }

    #[test]
    fn set_grant_replaces_and_removes() {
        let state = State::with_capacity(4, 4);
        state.set_grant("u1", "doc:1", &[row("read", None), row("write", None)]);
        assert!(state.check("u1", "read", "doc:1", &mut Now::lazy()));
        assert!(state.check("u1", "write", "doc:1", &mut Now::lazy()));
        assert!(!state.check("u1", "read", "doc:2", &mut Now::lazy()));
        assert_eq!(state.tuple_count(), 2);
        state.set_grant("u1", "doc:1", &[row("read", None)]);
        assert!(!state.check("u1", "write", "doc:1", &mut Now::lazy()));
        assert_eq!(state.tuple_count(), 1);
        state.set_grant("u1", "doc:1", &[]);
        assert!(!state.check("u1", "read", "doc:1", &mut Now::lazy()));
        assert_eq!(state.tuple_count(), 0);
        assert_eq!(state.subject_count(), 0);
    }

    #[test]
    fn set_grants_does_what_set_grant_does_for_each_in_turn() {
        let loaded = || {
            let mut builder = StateBuilder::new();
            for o in 0..40 {
                builder.tuple("big", &format!("doc:{o}"), "read", None);
            }
            builder.tuple("small", "doc:1", "read", None);
            builder.finish()
        };
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        for round in 0..200 {
            let (one_by_one, at_once) = (loaded(), loaded());
            let subject = ["big", "small", "new"][round % 3];
            let changes: Vec<(String, Vec<TupleRow>)> = (0..next(12))
                .map(|_| {
                    let object = format!("doc:{}", next(50));
                    let rows = match next(4) {
                        0 => vec![],
                        1 => vec![row("write", None), row("read", Some(1_000))],
                        _ => vec![row(&format!("p{}", next(3)), None)],
                    };
                    (object, rows)
                })
                .collect();
            for (object, rows) in &changes {
                one_by_one.set_grant(subject, object, rows);
            }
            let changes: Vec<(&str, &[TupleRow])> = changes
                .iter()
                .map(|(object, rows)| (object.as_str(), rows.as_slice()))
                .collect();
            at_once.set_grants(subject, &changes);
            assert_eq!(at_once.digest(), one_by_one.digest(), "{changes:?}");
            assert_eq!(at_once.tuple_count(), one_by_one.tuple_count());
            assert_eq!(at_once.subject_count(), one_by_one.subject_count());
            assert_eq!(
                at_once.subjects.get(subject).is_some(),
                one_by_one.subjects.get(subject).is_some()
            );
        }
        // Every grant of a subject revoked at once removes the subject.
        let state = loaded();
        let revoked: Vec<String> = (0..40).map(|o| format!("doc:{o}")).collect();
        let changes: Vec<(&str, &[TupleRow])> = revoked
            .iter()
            .map(|object| (object.as_str(), &[][..]))
            .collect();
        state.set_grants("big", &changes);
        assert_eq!((state.subject_count(), state.tuple_count()), (1, 1));
    }

    #[test]
    fn a_grant_reads_back_every_row_in_order() {
        let slot = |permission, expires_at| Slot {
            permission,
            expires_at,
        };
        let grant = Grant::from_slots([
            slot(63, NEVER),
            slot(70, NEVER),
            slot(0, NEVER),
            slot(5, 1_000),
            slot(1, NEVER),
        ]);
        let rows: Vec<_> = grant.held().rows().collect();
        assert_eq!(
            rows,
            [(0, NEVER), (1, NEVER), (63, NEVER), (5, 1_000), (70, NEVER)]
        );
        assert_eq!(grant.held().row_count(), 5);
        assert_eq!(Grant::from_slots([]).held().rows().count(), 0);
    }

    /// A packed subject's first write a run: merged into its copy in the heap before the
    /// lock, it holds what the same rows built at once hold, and the counts follow.
    #[test]
    fn a_first_run_on_a_packed_subject_is_merged_into_its_copy() {
        let build = |extra: bool| {
            let mut builder = StateBuilder::new();
            for o in 0..5_000 {
                if extra && o == 7 {
                    continue; // revoked by the run
                }
                let permission = if extra && o == 8 { "write" } else { "read" };
                builder.tuple("big", &format!("doc:{o}"), permission, None);
            }
            if extra {
                builder.tuple("big", "doc:new", "read", None);
            }
            builder.finish()
        };
        let live = build(false);
        assert!(matches!(
            live.subjects.get("big").as_deref().map(|e| &e.grants),
            Some(Grants::Packed(_))
        ));
        let (read, write) = ([row("read", None)], [row("write", None)]);
        live.set_grants(
            "big",
            &[("doc:7", &[]), ("doc:8", &write), ("doc:new", &read)],
        );
        assert!(matches!(
            live.subjects.get("big").as_deref().map(|e| &e.grants),
            Some(Grants::Chunked(_))
        ));
        let model = build(true);
        assert_eq!(live.digest(), model.digest());
        assert_eq!(live.tuple_count(), model.tuple_count());
    }

    /// A run of changes to a subject in chunks, merged aside, is seen whole or not at all:
    /// a batch (which reads under held locks) asks for an object of its first chunk and
    /// one of its last while the writer grants and revokes both in one run, over and over.
    #[test]
    fn a_run_merged_aside_is_seen_whole() {
        let mut builder = StateBuilder::new();
        for o in 0..6_000 {
            builder.tuple("big", &format!("doc:{o:05}"), "read", None);
        }
        let state = Arc::new(builder.finish());
        state.set_grant("big", "doc:00001", &[row("write", None)]);
        let writing = Arc::new(AtomicBool::new(true));
        let batches = Arc::new(AtomicU64::new(0));
        let reader = {
            let (state, writing, batches) = (state.clone(), writing.clone(), batches.clone());
            std::thread::spawn(move || {
                let mut seen = [0_u64; 2];
                // More checks than shards: a batch of a few goes check by check.
                let pair = [("big", "write", "doc:00000"), ("big", "write", "doc:05999")];
                let checks: Vec<_> = pair.iter().cycle().take(64).copied().collect();
                assert!(checks.len() > state.subjects.shard_count());
                while writing.load(Ordering::Acquire) {
                    let answers = state.check_many(checks.iter().copied(), &mut Now::lazy());
                    assert!(
                        answers.iter().all(|&a| a == answers[0]),
                        "a run seen in part"
                    );
                    seen[usize::from(answers[0])] += 1;
                    batches.fetch_add(1, Ordering::Release);
                }
                seen
            })
        };
        // At least 3,000 runs, and on until the reader has read 200 batches beside them
        // (a release build wrote the 3,000 before the reader's thread had started, once in
        // a hundred runs), or has stopped (its panic is reported below).
        let write = [row("write", None)];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut k = 0;
        while (k < 3_000 || batches.load(Ordering::Acquire) < 200) && !reader.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader read no batch"
            );
            let rows: &[TupleRow] = if k % 2 == 0 { &write } else { &[] };
            state.set_grants("big", &[("doc:00000", rows), ("doc:05999", rows)]);
            k += 1;
        }
        writing.store(false, Ordering::Release);
        let seen = reader.join().expect("the reader saw every run whole");
        assert!(seen.iter().sum::<u64>() > 0);
        let entry = state.subjects.get("big").expect("big");
        assert!(
            matches!(entry.grants, Grants::Chunked(_)),
            "in chunks throughout"
        );
    }

    /// A subject's heap grants go into chunks past `CHUNKED_OVER` and back into one list
    /// under half of it; through single writes and runs of them, it holds what a map
    /// written the same way holds, and its chunks stay in shape.
    #[test]
    fn a_large_subject_keeps_its_grants_through_chunks() {
        const OBJECTS: u64 = 12_000;
        let mut builder = StateBuilder::new();
        let mut model: BTreeMap<u64, &str> = BTreeMap::new();
        // Every object interned up front, in order, so that writes land all over the list;
        // `big` loaded with 5,000 of them, packed, so that its first write unpacks it.
        for o in 0..OBJECTS {
            builder.tuple("other", &format!("doc:{o}"), "read", None);
            if o % 2 == 0 && o < 10_000 {
                builder.tuple("big", &format!("doc:{o}"), "p0", None);
                model.insert(o, "p0");
            }
        }
        let state = builder.finish();
        let permissions = ["p0", "p1", "p2"];
        let write = |model: &mut BTreeMap<u64, &'static str>, o: u64, p: Option<&'static str>| {
            match p {
                Some(p) => model.insert(o, p),
                None => model.remove(&o),
            };
            (
                format!("doc:{o}"),
                p.map_or_else(Vec::new, |p| vec![row(p, None)]),
            )
        };
        // Whether the subject is chunked; its chunks' shape checked when it is.
        let chunked = |model: &BTreeMap<u64, &str>| {
            let entry = state.subjects.get("big").expect("big");
            let Grants::Chunked(chunks) = &entry.grants else {
                assert!(model.len() <= CHUNKED_OVER, "{}", model.len());
                assert!(!matches!(entry.grants, Grants::Packed(_)), "written");
                return false;
            };
            let len = chunks.assert_shape();
            assert!(len >= CHUNKED_OVER / 2 && len == model.len());
            true
        };
        let matches = |model: &BTreeMap<u64, &str>| {
            let entry = state.subjects.get("big").expect("big");
            let held: Vec<u32> = entry.grants.iter(&state.packed).map(|(o, _)| o).collect();
            drop(entry);
            assert!(held.windows(2).all(|w| w[0] < w[1]), "sorted, once each");
            assert_eq!(held.len(), model.len());
            for o in 0..OBJECTS {
                let object = format!("doc:{o}");
                for p in permissions {
                    let expected = model.get(&o) == Some(&p);
                    let checked = state.check("big", p, &object, &mut Now::lazy());
                    assert_eq!(checked, expected, "{object} {p}");
                }
            }
            assert_eq!(state.tuple_count(), (model.len() as u64) + OBJECTS);
        };
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        let (mut was_chunked, mut back_in_one) = (false, false);
        // Grow past the chunks' threshold with single writes and runs of 30, shrink under
        // half of it with single writes only (so that `set` alone puts it back in one
        // slice: a run would too), grow again.
        for (phase, grant_in_10, until) in [(0, 9, 6_000), (1, 1, 1_500), (2, 9, 5_000)] {
            let mut op = 0;
            while (phase == 1) == (model.len() > until) {
                op += 1;
                let mut change = |model: &mut BTreeMap<u64, &'static str>| {
                    let o = next(OBJECTS);
                    let granted = next(10) < grant_in_10;
                    let p = granted.then(|| permissions[next(3) as usize]);
                    write(model, o, p)
                };
                if phase != 1 && op % 50 == 0 {
                    let run: Vec<_> = (0..30).map(|_| change(&mut model)).collect();
                    let run: Vec<(&str, &[TupleRow])> = run
                        .iter()
                        .map(|(o, rows)| (o.as_str(), &rows[..]))
                        .collect();
                    state.set_grants("big", &run);
                } else {
                    let (object, rows) = change(&mut model);
                    state.set_grant("big", &object, &rows);
                }
                let now_chunked = chunked(&model);
                back_in_one |= was_chunked && !now_chunked;
                was_chunked |= now_chunked;
                if op % 500 == 0 {
                    matches(&model);
                }
            }
        }
        assert!(was_chunked && back_in_one);
        // The first grant of the first chunk and of another, revoked and granted again.
        let first = *model.keys().next().expect("held");
        let second_chunk = *model.keys().nth(CHUNK).expect("held");
        for (o, p) in [(first, None), (first, Some("p0")), (second_chunk, None)] {
            let (object, rows) = write(&mut model, o, p);
            state.set_grant("big", &object, &rows);
            assert!(chunked(&model));
        }
        matches(&model);
    }

    #[test]
    fn a_subject_moves_between_one_inline_grant_and_many() {
        let state = State::with_capacity(4, 4);
        let holds = |objects: &[&str]| {
            for o in ["", "a", "b", "c"] {
                let expected = objects.contains(&o);
                assert_eq!(
                    state.check("u", "read", o, &mut Now::lazy()),
                    expected,
                    "{o:?}"
                );
            }
        };
        state.set_grant("u", "b", &[row("read", None)]);
        holds(&["b"]);
        state.set_grant("u", "", &[row("read", None)]);
        holds(&["", "b"]);
        state.set_grant("u", "c", &[row("read", None)]);
        holds(&["", "b", "c"]);
        state.set_grant("u", "b", &[]);
        state.set_grant("u", "", &[]);
        holds(&["c"]);
        state.set_grant("u", "a", &[]); // not held: nothing changes
        holds(&["c"]);
        assert_eq!(state.tuple_count(), 1);
        state.set_grant("u", "c", &[row("write", None)]);
        holds(&[]);
        assert_eq!(state.tuple_count(), 1);
        state.set_grant("u", "c", &[]);
        assert_eq!(state.subject_count(), 0);
    }

    #[test]
    fn grants_are_found_by_scan_and_by_search_alike() {
        let state = State::with_capacity(4, 64);
        // Every other object of 0..2n, so that each miss falls between two held objects
        // (all are interned, in order, by another subject first).
        for i in 0..=6 * SCAN_GRANTS {
            state.set_grant("other", &format!("doc:{i}"), &[row("read", None)]);
        }
        for n in [2, SCAN_GRANTS, SCAN_GRANTS + 1, 3 * SCAN_GRANTS] {
            let subject = format!("u{n}");
            for i in (0..2 * n).step_by(2) {
                state.set_grant(&subject, &format!("doc:{i}"), &[row("read", None)]);
            }
            for i in 0..=2 * n {
                let object = format!("doc:{i}");
                let held = i % 2 == 0 && i < 2 * n;
                assert_eq!(
                    state.check(&subject, "read", &object, &mut Now::lazy()),
                    held,
                    "{n} {i}"
                );
            }
        }
    }

    #[test]
    fn expiry_is_applied_at_read_time() {
        let state = State::with_capacity(4, 4);
        state.set_grant("u1", "", &[row("EXPORT", Some(1_000)), row("VIEW", None)]);
        assert!(state.check("u1", "EXPORT", "", &mut Now::fixed(999)));
        assert!(!state.check("u1", "EXPORT", "", &mut Now::fixed(1_000)));
        assert!(state.check("u1", "VIEW", "", &mut Now::fixed(5_000)));
        let held = state.permissions_of("u1", "", &mut Now::fixed(2_000));
        assert_eq!(held, vec![Arc::from("VIEW")]);
        // Expired rows are still stored, and counted in the digest.
        assert_eq!(state.tuple_count(), 2);
    }

    #[test]
    fn wildcards_cover_subjects_and_objects_but_not_global() {
        let state = State::with_capacity(4, 4);
        state.set_grant("*", "doc:public", &[row("read", None)]);
        state.set_grant("admin", "*", &[row("delete", None)]);
        assert!(state.check("anyone", "read", "doc:public", &mut Now::lazy()));
        // A known subject without the grant falls back to `*` too.
        state.set_grant("carol", "doc:mine", &[row("read", None)]);
        assert!(state.check("carol", "read", "doc:public", &mut Now::lazy()));
        assert!(state.check("carol", "read", "doc:mine", &mut Now::lazy()));
        assert!(!state.check("carol", "read", "doc:other", &mut Now::lazy()));
        assert!(!state.check("anyone", "read", "doc:other", &mut Now::lazy()));
        assert!(state.check("admin", "delete", "doc:never-seen", &mut Now::lazy()));
        assert!(!state.check("admin", "delete", "", &mut Now::lazy()));
        assert_eq!(
            state
                .objects_of("admin", "delete", "", usize::MAX, &mut Now::lazy())
                .objects,
            vec![Arc::from("*")]
        );
        assert_eq!(
            state
                .objects_of("bob", "read", "", usize::MAX, &mut Now::lazy())
                .objects,
            vec![Arc::from("doc:public")]
        );
        state.set_grant("*", "doc:public", &[]);
        assert!(!state.check("anyone", "read", "doc:public", &mut Now::lazy()));
        state.set_grant("*", "doc:again", &[row("read", None)]);
        assert!(state.check("anyone", "read", "doc:again", &mut Now::lazy()));
    }

    #[test]
    fn many_permission_names_spill_past_the_bitset() {
        let state = State::with_capacity(4, 4);
        let rows: Vec<TupleRow> = (0..100).map(|i| row(&format!("p{i}"), None)).collect();
        state.set_grant("u", "o", &rows);
        for i in 0..100 {
            assert!(
                state.check("u", &format!("p{i}"), "o", &mut Now::lazy()),
                "p{i}"
            );
        }
        assert_eq!(state.permissions_of("u", "o", &mut Now::lazy()).len(), 100);
        assert_eq!(state.tuple_count(), 100);
    }

    #[test]
    fn limits_prefer_the_subject_over_the_wildcard() {
        let state = State::with_capacity(4, 4);
        state.set_limits("*", &[("projects".into(), 1), ("seats".into(), 2)]);
        state.set_limits("u1", &[("projects".into(), 10)]);
        assert_eq!(state.limit("u1", "projects"), Some(10));
        assert_eq!(state.limit("u1", "seats"), Some(2));
        assert_eq!(state.limit("u1", "storage"), None);
        assert_eq!(state.limits_of("u1").get("projects"), Some(&10));
        state.set_limits("u1", &[]);
        assert_eq!(state.limit("u1", "projects"), Some(1));
        assert_eq!(state.limit_count(), 2);
    }

    /// Subject `s`'s name, of a length that puts it in the short map, inline in the long
    /// one, or in the heap from the long one.
    pub(super) fn subject_name(s: u64) -> String {
        match s % 3 {
            0 => format!("u{s}"),
            1 => format!("user:6f1c2a9e-3b7d-4e58-a0c4-{s:012}"),
            _ => format!("organization:{s:048}"),
        }
    }

    /// A state with per-object, global, wildcard-subject, wildcard-object and expiring
    /// grants over `subjects` subjects (names of every length, `subject_name`), and checks
    /// over them (and unknown names) drawn by a fixed generator.
    pub(super) fn mixed_state(subjects: u64) -> (State, Vec<(String, String, String)>) {
        let state = State::with_capacity(4, 64);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        for s in 0..subjects {
            for _ in 0..4 {
                let object = ["", "*", "doc:1", "doc:2", "doc:3"][next(5) as usize];
                let expires_at = (next(4) == 0).then_some(1_000);
                state.set_grant(
                    &subject_name(s),
                    object,
                    &[row(&format!("p{}", next(6)), expires_at)],
                );
            }
        }
        state.set_grant(
            "*",
            "doc:public",
            &[row("p0", None), row("p1", Some(1_000))],
        );
        let checks = (0..2_000)
            .map(|_| {
                let subject = subject_name(next(subjects + subjects / 4));
                let permission = format!("p{}", next(7));
                let object =
                    ["", "*", "doc:1", "doc:2", "doc:3", "doc:public", "doc:9"][next(7) as usize];
                (subject, permission, object.to_string())
            })
            .collect();
        (state, checks)
    }

    #[test]
    fn a_batch_answers_as_its_checks_do_one_by_one() {
        let (state, checks) = mixed_state(500);
        let allowed = |checks: &[(String, String, String)], now: i64| {
            let one_by_one: Vec<bool> = checks
                .iter()
                .map(|(s, p, o)| state.check(s, p, o, &mut Now::fixed(now)))
                .collect();
            let as_str = checks
                .iter()
                .map(|(s, p, o)| (s.as_str(), p.as_str(), o.as_str()));
            assert_eq!(state.check_many(as_str, &mut Now::fixed(now)), one_by_one);
            one_by_one
        };
        // Below, at and above one check per shard, within one holding of the locks and
        // over several (the last one short or of a single check), before and after the
        // expiry.
        let shards = state.subjects.shard_count();
        let sizes = [0, 1, shards, shards + 1, 100, HELD_CHECKS, HELD_CHECKS + 1];
        for size in sizes
            .into_iter()
            .chain([HELD_CHECKS + shards, checks.len()])
        {
            for now in [999, 1_000] {
                let answers = allowed(&checks[..size], now);
                if size == checks.len() {
                    let yes = answers.iter().filter(|a| **a).count();
                    // Both answers are common, so that the comparison means something.
                    assert!(yes > size / 20 && yes < size * 19 / 20, "{yes} of {size}");
                }
            }
        }
    }

    #[test]
    fn batches_and_writes_on_many_threads_do_not_wait_on_each_other() {
        let (state, checks) = mixed_state(200);
        let (state, checks) = (Arc::new(state), Arc::new(checks));
        let (done, finished) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for t in 0..4 {
            let (state, checks, done) = (state.clone(), checks.clone(), done.clone());
            threads.push(std::thread::spawn(move || {
                for round in 0..200 {
                    if t == 0 {
                        let subject = format!("u{}", round % 250);
                        state.set_grant(&subject, "doc:1", &[row("p1", None)]);
                        state.set_grant("*", "doc:1", &[row("p2", None)][..round % 2]);
                    } else {
                        let batch = checks[round % 100 * 10..][..100]
                            .iter()
                            .map(|(s, p, o)| (s.as_str(), p.as_str(), o.as_str()));
                        assert_eq!(state.check_many(batch, &mut Now::lazy()).len(), 100);
                    }
                }
                done.send(()).ok();
            }));
        }
        for _ in 0..threads.len() {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a thread is stuck: batch readers and the writer wait on each other");
        }
        threads
            .into_iter()
            .for_each(|t| t.join().expect("no thread panics"));
    }

    /// Listings on two threads while the writer writes the subject and `*` (moving both
    /// to the written tier, naming new objects, granting and revoking others): no
    /// listing waits for ever on the locks it takes with the writer's (a look-up walk
    /// takes every shard's when `*` holds the permission), and every one is sorted,
    /// without repeats, and holds every object held throughout.
    #[test]
    fn listings_go_on_while_the_writer_writes_the_subject_and_star() {
        const STABLE: usize = 2_000;
        let mut builder = StateBuilder::new();
        for o in 0..STABLE {
            let holder = if o % 2 == 0 { "*" } else { "u" };
            builder.tuple(holder, &format!("doc:{o}"), "read", None);
        }
        for o in 0..STABLE / 2 {
            builder.tuple("u", &format!("doc:{o}"), "write", None);
        }
        let state = Arc::new(builder.finish());
        let stable: BTreeSet<String> = (0..STABLE).map(|o| format!("doc:{o}")).collect();
        let stable = Arc::new(stable);
        let writing = Arc::new(AtomicBool::new(true));
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..2_u64 {
            let (state, stable, writing, done) =
                (state.clone(), stable.clone(), writing.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rounds = 0_u64;
                while writing.load(Ordering::Acquire) || rounds < 3 {
                    let whole = state.objects_of("u", "read", "", usize::MAX, &mut Now::lazy());
                    let names: Vec<&str> = whole.objects.iter().map(|o| &**o).collect();
                    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, once each");
                    let listed: BTreeSet<&str> = names.iter().copied().collect();
                    assert!(stable.iter().all(|o| listed.contains(o.as_str())));
                    // Pages from cursors spread over the names, quick or not.
                    let after = format!("doc:{}", (rounds * 7 + t) % STABLE as u64);
                    for bound in [None, Some(QUICK_LISTING)] {
                        let now = &mut Now::lazy();
                        if let Some(page) =
                            state.objects_within("u", "read", &after, 100, now, bound)
                        {
                            let names: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
                            assert!(names.windows(2).all(|w| w[0] < w[1]), "a sorted page");
                            assert!(names.iter().all(|&o| o > after.as_str()), "after {after}");
                            let last = names.last().copied().unwrap_or("~");
                            let expected =
                                stable.range::<str, _>((Excluded(after.as_str()), Included(last)));
                            assert!(expected.into_iter().all(|o| names.contains(&o.as_str())));
                        }
                    }
                    rounds += 1;
                }
                done.send(rounds).expect("the test waits");
            });
        }
        // A listing thread that panics lets go of its sender: the wait below ends then.
        drop(done);
        for k in 0..3_000 {
            let new = format!("new:{k}");
            let churn = format!("doc:c{}", k % 50);
            let grant = [row("read", None)];
            let rows: &[TupleRow] = if k % 3 == 0 { &[] } else { &grant };
            state.set_grant("*", &new, &grant);
            state.set_grants("u", &[(churn.as_str(), rows), (new.as_str(), &grant)]);
            state.set_grants("*", &[(churn.as_str(), rows)]);
        }
        writing.store(false, Ordering::Release);
        for _ in 0..2 {
            let rounds = finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("a listing thread ended: none waits for ever");
            assert!(rounds >= 3);
        }
    }

    /// A subject of `BIG` grants on `doc:{o}` (`read` on all, `write` on every third,
    /// expiring ones among them) and limits, moved to the written tier by a write, with
    /// `*` and a small subject beside it; and the same rows built at once.
    fn a_large_written_subject() -> (State, State) {
        const BIG: usize = 5 * GRANTS_RUN + 5;
        let mut builder = StateBuilder::new();
        let mut rows = Vec::new();
        for o in 0..BIG {
            let expires_at = (o % 7 == 6).then_some(4_000_000_000_000_000);
            rows.push((format!("doc:{o}"), "read", expires_at));
            if o % 3 == 0 {
                rows.push((format!("doc:{o}"), "write", None));
            }
        }
        for (object, permission, expires_at) in &rows {
            builder.tuple("big", object, permission, *expires_at);
        }
        builder.tuple("*", "doc:1", "read", None);
        builder.tuple("small", "doc:2", "read", None);
        builder.limit("big", "seats", 9);
        let live = builder.finish();
        live.set_grant("big", "doc:new", &[row("read", None)]);
        let mut builder = StateBuilder::new();
        for (object, permission, expires_at) in &rows {
            builder.tuple("big", object, permission, *expires_at);
        }
        builder.tuple("big", "doc:new", "read", None);
        builder.tuple("*", "doc:1", "read", None);
        builder.tuple("small", "doc:2", "read", None);
        builder.limit("big", "seats", 9);
        (live, builder.finish())
    }

    /// The digest, the rows and listings by the pass and the bitset read a large subject's
    /// grants in runs of `GRANTS_RUN`, its shard lock let go between them, and find what
    /// one reading finds.
    #[test]
    fn readers_of_a_large_subject_read_it_in_runs() {
        let (live, built) = a_large_written_subject();
        assert!(matches!(
            live.subjects.get("big").as_deref().map(|e| &e.grants),
            Some(Grants::Chunked(_))
        ));
        let runs = |f: &dyn Fn()| {
            RUNS.with(|runs| runs.set(0));
            f();
            RUNS.with(|runs| runs.get())
        };
        // 5 * GRANTS_RUN + 6 grants.
        let whole = 6;
        let digest = built.digest();
        assert_eq!(runs(&|| assert_eq!(live.digest(), digest)), whole);
        let sorted = |mut d: Vec<(String, String)>| {
            d.sort_unstable();
            d
        };
        let digests = sorted(built.subject_digests());
        assert_eq!(
            runs(&|| assert_eq!(sorted(live.subject_digests()), digests)),
            whole
        );
        let rows = built.rows_of("big");
        assert_eq!(runs(&|| assert_eq!(live.rows_of("big"), rows)), whole);
        // A compaction's rebuild too, into a generation of the same rows.
        let rebuilt = std::cell::RefCell::new(None);
        assert_eq!(
            runs(&|| *rebuilt.borrow_mut() = Some(live.rebuilt())),
            whole
        );
        let rebuilt = rebuilt.into_inner().expect("rebuilt");
        assert_eq!(runs(&|| assert_eq!(rebuilt.digest(), digest)), whole);
        let listed = |public| Listed {
            subject: "big",
            public,
            permission: live.permissions.get("read").expect("named"),
            after: "doc:4",
            limit: 700,
        };
        let expected = built.objects_of("big", "read", "doc:4", 700, &mut Now::lazy());
        assert!(expected.more && expected.objects.len() == 700);
        // With `*`, one run of its grants more; the bitset reads the names since the build
        // apart, a run for the subject and one for `*`.
        for (public, pass, bits) in [(false, whole, whole + 1), (true, whole + 1, whole + 3)] {
            let pass_page = || live.page_by_pass(listed(public), &mut Now::lazy());
            let bits_page = || live.page_by_bits(listed(public), &mut Now::lazy());
            let by_pass = runs(&|| assert_eq!(pass_page(), expected));
            let by_bits = runs(&|| assert_eq!(bits_page(), expected));
            assert_eq!((by_pass, by_bits), (pass, bits), "with *: {public}");
        }
    }

    /// A digest, the rows and whole listings of a large subject, read on two threads while
    /// the writer adds objects to it (new names), takes some away and puts them back: each
    /// reading goes on through the writes, sees every object the subject held throughout
    /// once, and, once the writes end, the digest is that of the rows built at once.
    #[test]
    fn readers_of_a_large_subject_go_on_while_the_writer_writes_it() {
        let (live, _) = a_large_written_subject();
        let live = Arc::new(live);
        let writing = Arc::new(AtomicBool::new(true));
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..2 {
            let (live, writing, done) = (live.clone(), writing.clone(), done.clone());
            std::thread::spawn(move || {
                let mut rounds = 0_u64;
                while writing.load(Ordering::Acquire) || rounds < 2 {
                    let rows = live.rows_of("big");
                    let objects: BTreeSet<&str> =
                        rows.tuples.iter().map(|(o, _, _)| o.as_str()).collect();
                    assert!((0..5 * GRANTS_RUN).all(|o| objects.contains(&*format!("doc:{o}"))));
                    let whole = live.objects_of("big", "write", "", usize::MAX, &mut Now::lazy());
                    assert!(
                        whole.objects.windows(2).all(|w| w[0] < w[1]),
                        "sorted, once each"
                    );
                    assert!(whole.objects.len() >= (5 * GRANTS_RUN).div_ceil(3));
                    let digests = match t {
                        0 => vec![live.digest()],
                        _ => live.subject_digests().into_iter().map(|(_, d)| d).collect(),
                    };
                    assert!(digests.iter().all(|d| d.contains(':')));
                    rounds += 1;
                }
                done.send(rounds).expect("the test waits");
            });
        }
        drop(done);
        // The k-th write to one of the last five objects: all its rows away, or `read`.
        let churn = |k: usize| {
            let object = format!("doc:{}", 5 * GRANTS_RUN + k % 5);
            (
                object,
                if k.is_multiple_of(2) {
                    vec![]
                } else {
                    vec![row("read", None)]
                },
            )
        };
        for k in 0..2_000 {
            live.set_grant("big", &format!("doc:new{k}"), &[row("write", None)]);
            let (object, rows) = churn(k);
            live.set_grant("big", &object, &rows);
        }
        writing.store(false, Ordering::Release);
        for _ in 0..2 {
            let rounds = finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("a reading thread ended: none waits for ever");
            assert!(rounds >= 2);
        }
        let (_, model) = a_large_written_subject();
        for k in 0..2_000 {
            model.set_grant("big", &format!("doc:new{k}"), &[row("write", None)]);
        }
        for k in 1_995..2_000 {
            let (object, rows) = churn(k);
            model.set_grant("big", &object, &rows);
        }
        assert_eq!(live.digest(), model.digest());
    }

    /// Checks on many threads while the writer makes each loaded subject's first write
    /// (which moves its entry to the written tier), then a second, and removes others: a
    /// check never misses what a subject held all along, and sees each write once the
    /// writer has published it (one by one or in a batch).
    #[test]
    fn checks_see_every_loaded_subject_while_the_writer_moves_it() {
        const SUBJECTS: usize = 3_000;
        let mut builder = StateBuilder::new();
        for s in 0..SUBJECTS {
            for o in 0..4 {
                builder.tuple(&subject_name(s as u64), &format!("doc:{o}"), "p0", None);
            }
            builder.tuple(&format!("gone:{s}"), "doc:0", "p0", None);
        }
        let state = Arc::new(builder.finish());
        let names: Arc<Vec<String>> = Arc::new((0..SUBJECTS as u64).map(subject_name).collect());
        // How many subjects each pass of the writer has done: a reader that reads n must
        // see the pass's write to the first n.
        let done: Arc<[std::sync::atomic::AtomicUsize; 3]> = Arc::new(Default::default());
        let readers: Vec<_> = (0..3)
            .map(|t| {
                let (state, names, done) = (state.clone(), names.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut rounds = 0;
                    loop {
                        let [first, second, gone] =
                            [0, 1, 2].map(|pass| done[pass].load(Ordering::Acquire));
                        for (i, name) in names.iter().enumerate().skip(t) {
                            let now = &mut Now::lazy();
                            let object = ["doc:0", "doc:3"][i % 2];
                            assert!(state.check(name, "p0", object, now), "{name}");
                            if i < first {
                                assert!(state.check(name, "p1", "doc:9", now), "{name} p1");
                            }
                            if i < second {
                                assert!(state.check(name, "p2", "doc:8", now), "{name} p2");
                            }
                            let gone_name = format!("gone:{i}");
                            let held = state.check(&gone_name, "p0", "doc:0", now);
                            assert!(i >= gone || !held, "{gone_name} is still there");
                        }
                        let batch = names[..first].iter().map(|n| (n.as_str(), "p1", "doc:9"));
                        let answers = state.check_many(batch, &mut Now::lazy());
                        assert!(answers.iter().all(|a| *a), "a batch missed a write");
                        rounds += 1;
                        if gone == SUBJECTS {
                            return rounds;
                        }
                    }
                })
            })
            .collect();
        let publish = |pass: usize, i: usize| done[pass].store(i + 1, Ordering::Release);
        for (i, name) in names.iter().enumerate() {
            state.set_grant(name, "doc:9", &[row("p1", None)]);
            publish(0, i);
        }
        for (i, name) in names.iter().enumerate() {
            state.set_grant(name, "doc:8", &[row("p2", None)]);
            publish(1, i);
        }
        for i in 0..SUBJECTS {
            state.set_grant(&format!("gone:{i}"), "doc:0", &[]);
            publish(2, i);
        }
        for reader in readers {
            assert!(reader.join().expect("no reader panics") > 0);
        }
        assert_eq!(state.subject_count(), SUBJECTS);
        assert_eq!(state.tuple_count(), 6 * SUBJECTS as u64);
        assert_eq!(state.growth().subjects_moved, 2 * SUBJECTS);
    }

    #[test]
    fn builder_and_incremental_writes_agree() {
        let mut builder = StateBuilder::new();
        builder.tuple("u1", "o1", "read", None);
        builder.tuple("u2", "o1", "read", Some(5));
        builder.tuple("u1", "o1", "write", None);
        builder.tuple("u1", "", "ADMIN", None);
        builder.limit("u3", "projects", 3);
        let built = builder.finish();

        let live = State::with_capacity(4, 4);
        live.set_grant("u1", "", &[row("ADMIN", None)]);
        live.set_grant("u1", "o1", &[row("write", None), row("read", None)]);
        live.set_grant("u2", "o1", &[row("read", Some(5))]);
        live.set_limits("u3", &[("projects".into(), 3)]);

        assert_eq!(built.digest(), live.digest());
        assert_eq!(built.tuple_count(), 4);
        assert_eq!(built.limit_count(), 1);
        assert!(built.digest().starts_with("4:1:"));
    }

    #[test]
    fn a_load_in_any_order_equals_incremental_writes() {
        load_in_any_order(false, |_| {});
    }

    /// The same load with windows of 1,000 runs, so that the scattered runs are seen to
    /// be (the first window of them tells), and all the rest go aside with no look-up.
    #[test]
    fn a_load_that_finds_its_rows_scattered_sets_them_all_aside() {
        load_in_any_order(true, |builder| builder.window_size = 1_000);
    }

    /// The same load with the places of subjects' names cut to 3 bits: the rows set aside
    /// for eight places, each shared by hundreds of names, still go to their own subjects.
    #[test]
    fn rows_set_aside_go_to_their_own_subjects_when_names_share_a_hash() {
        load_in_any_order(true, |builder| {
            builder.window_size = 1_000;
            builder.aside.place_mask = 0b111;
        });
    }

    /// The same load merging the rows set aside each 100 expiring rows, as one does when
    /// `AsideRow::expires` could count no more: later rows are merged into the entries
    /// those merges made.
    #[test]
    fn rows_set_aside_are_merged_alike_during_the_load() {
        load_in_any_order(true, |builder| {
            builder.window_size = 1_000;
            builder.aside.expiring_limit = 100;
        });
    }

    /// Rows first grouped by subject (runs of 7), then scattered over the same subjects
    /// (each row's subject differs from the previous one's), with expiring rows, limits on
    /// some subjects and on others that hold no tuple; subjects' names of every length
    /// (`load_name`); loaded by a builder `configure` sets up, which sets all the
    /// scattered rows aside with no look-up if `aside_all`, and written one by one.
    fn load_in_any_order(aside_all: bool, configure: impl FnOnce(&mut StateBuilder)) {
        let live = State::with_capacity(4, 4);
        let mut builder = StateBuilder::new();
        configure(&mut builder);
        let mut by_key: BTreeMap<(String, String), Vec<TupleRow>> = BTreeMap::new();
        for i in 0..42_000u64 {
            let subject = if i < 21_000 {
                load_name(i / 7)
            } else {
                load_name((i * 7_919) % 3_001)
            };
            let object = format!("o{}", i % 97);
            let permission = format!("p{}", i % 70);
            let expires_at = (i % 13 == 0).then_some(i as i64);
            let rows = by_key.entry((subject.clone(), object.clone())).or_default();
            if rows.iter().any(|r| r.permission == permission) {
                continue; // (subject, object, permission) is the table's primary key
            }
            rows.push(row(&permission, expires_at));
            builder.tuple(&subject, &object, &permission, expires_at);
        }
        for ((subject, object), rows) in &by_key {
            live.set_grant(subject, object, rows);
        }
        for i in 0..100 {
            builder.limit(&load_name(i as u64 * 29), "projects", i);
            live.set_limits(&load_name(i as u64 * 29), &[("projects".into(), i)]);
        }
        for i in 0..10 {
            builder.limit(&format!("limits-only-{i}"), "seats", i);
            live.set_limits(&format!("limits-only-{i}"), &[("seats".into(), i)]);
        }
        assert_eq!(builder.aside_all, aside_all);
        let built = builder.finish();
        assert_eq!(built.subject_count(), live.subject_count());
        assert_eq!(built.tuple_count(), live.tuple_count());
        assert_eq!(built.limit_count(), 110);
        assert_eq!(built.digest(), live.digest());
        let sorted = |mut digests: Vec<(String, String)>| {
            digests.sort();
            digests
        };
        assert!(sorted(built.subject_digests()) == sorted(live.subject_digests()));
        // Removing every row of a subject removes it, whichever map its name is in.
        let before = live.subject_count();
        for n in 0..30 {
            let subject = load_name(n);
            for state in [&built, &live] {
                for o in 0..97 {
                    state.set_grant(&subject, &format!("o{o}"), &[]);
                }
                state.set_limits(&subject, &[]);
            }
            assert_eq!(built.rows_of(&subject), StoredRows::default());
        }
        assert_eq!(live.subject_count(), before - 30);
        assert_eq!(built.subject_count(), live.subject_count());
        assert_eq!(built.digest(), live.digest());
    }

    /// Names of every length `subject_name` gives, and about the most a row set aside
    /// holds itself (`AsideRow::name`): 16 bytes, 17, and short with a zero byte at the end.
    fn load_name(s: u64) -> String {
        match s % 6 {
            3 => format!("n{s:015}"),
            4 => format!("n{s:016}"),
            5 => format!("z{s}\0"),
            _ => subject_name(s),
        }
    }

    #[test]
    fn packed_grants_read_and_change_as_heap_grants_do() {
        // Two subjects the load packs (5 grants, scanned; 40, searched) and the same rows
        // written one by one, which stay in the heap; then the same writes to both.
        let mut builder = StateBuilder::new();
        let live = State::with_capacity(4, 64);
        for (subject, objects) in [("short", 5), ("long", 40)] {
            for o in 0..objects {
                let object = format!("o{}", 2 * o);
                let permission = format!("p{}", o % 3);
                builder.tuple(subject, &object, &permission, None);
                live.set_grant(subject, &object, &[row(&permission, None)]);
            }
        }
        let built = builder.finish();
        for subject in ["short", "long"] {
            let entry = built.subjects.get(subject).expect("loaded");
            assert!(matches!(entry.grants, Grants::Packed(_)), "{subject}");
        }
        assert!(built.packed_bytes() > 0);
        let agree = |when: &str| {
            assert_eq!(built.digest(), live.digest(), "{when}");
            for subject in ["short", "long", "nobody"] {
                for o in 0..82 {
                    let object = format!("o{o}");
                    for permission in ["p0", "p1", "p2", "p3"] {
                        assert_eq!(
                            built.check(subject, permission, &object, &mut Now::lazy()),
                            live.check(subject, permission, &object, &mut Now::lazy()),
                            "{when}: {subject} {permission} {object}"
                        );
                    }
                    assert_eq!(
                        built.permissions_of(subject, &object, &mut Now::lazy()),
                        live.permissions_of(subject, &object, &mut Now::lazy())
                    );
                }
                assert_eq!(
                    built.objects_of(subject, "p1", "", usize::MAX, &mut Now::lazy()),
                    live.objects_of(subject, "p1", "", usize::MAX, &mut Now::lazy())
                );
                assert_eq!(built.rows_of(subject), live.rows_of(subject), "{when}");
            }
        };
        agree("loaded");
        assert!(built.check("long", "p1", "o2", &mut Now::lazy()));
        for state in [&built, &live] {
            state.set_grant("short", "o2", &[row("p3", Some(i64::MAX - 1))]);
            state.set_grant("short", "o4", &[]);
            state.set_grant("short", "o5", &[row("p0", None)]);
            state.set_grant("long", "o78", &[]);
        }
        agree("after writes");
        assert_eq!(built.tuple_count(), live.tuple_count());
        let entry = built.subjects.get("short").expect("still there");
        assert!(matches!(entry.grants, Grants::Many(_)));
    }

    #[test]
    fn growth_counts_new_names_and_packed_lists_left_unused() {
        let mut builder = StateBuilder::new();
        for o in 0..40 {
            builder.tuple("packed", &format!("o{o}"), "read", None);
        }
        let built = builder.finish();
        let loaded = built.growth();
        // "", "*", 40 objects and one permission.
        assert_eq!(loaded.names_loaded, 43, "{loaded:?}");
        assert_eq!((loaded.names_since, loaded.abandoned), (0, 0));
        assert!(loaded.packed >= 40 * 12, "{loaded:?}");
        // Known names intern nothing; a write to the packed subject leaves its list unused.
        assert_eq!((loaded.subjects_loaded, loaded.subjects_moved), (1, 0));
        built.set_grant("packed", "o1", &[]);
        let written = built.growth();
        assert_eq!((written.subjects_loaded, written.subjects_moved), (1, 1));
        assert_eq!(written.names_since, 0);
        assert_eq!(written.abandoned, loaded.packed, "{written:?}");
        // The list is in the heap now: writing it again leaves nothing more unused.
        built.set_grant("packed", "o2", &[]);
        built.set_grant("other", "new-object", &[row("new-permission", None)]);
        let grown = built.growth();
        assert_eq!(grown.abandoned, written.abandoned);
        assert_eq!(grown.names_since, 2, "{grown:?}");
    }

    thread_local! {
        /// The runs `grants_in_runs` read on this thread: each one a look-up of the
        /// subject, under its shard lock while the run lasts.
        pub(super) static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// `*`'s grants are counted by permission at the build, through every kind of write
    /// to `*` (one object, several with one named twice, removals, expiring rows), not
    /// through writes to others, and afresh by a rebuild.
    #[test]
    fn grants_of_star_are_counted_by_permission_through_every_write() {
        const PERMISSIONS: [&str; 4] = ["read", "write", "share", "view"];
        let mut builder = StateBuilder::new();
        for o in 0..50 {
            let permission = PERMISSIONS[o % 2];
            builder.tuple("*", &format!("doc:{o}"), permission, None);
        }
        builder.tuple("*", "doc:0", "share", Some(5));
        // On the global object: not counted, as listings leave it out.
        builder.tuple("*", "", "view", None);
        builder.tuple("u", "doc:1", "view", None);
        let state = builder.finish();
        let counted = |state: &State| -> Vec<u64> {
            let count = |name| {
                state
                    .permissions
                    .get(name)
                    .map_or(0, |p| state.public_holding(p))
            };
            PERMISSIONS.map(count).into()
        };
        let scanned = |state: &State| -> Vec<u64> {
            let mut counts = BTreeMap::new();
            if let Some(entry) = state.subjects.get(WILDCARD) {
                for (o, grant) in entry.grants.iter(&state.packed) {
                    for (p, _) in grant.rows().filter(|_| o != GLOBAL_ID) {
                        *counts.entry(p).or_insert(0) += 1;
                    }
                }
            }
            let count = |name| {
                state
                    .permissions
                    .get(name)
                    .and_then(|p| counts.get(&p).copied())
            };
            PERMISSIONS.map(|name| count(name).unwrap_or(0)).into()
        };
        assert_eq!(counted(&state), [25, 25, 1, 0]);
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for k in 0..600 {
            let mut rows = || -> Vec<TupleRow> {
                let mut expiring = |p: &str| match next(3) {
                    0 => Some(row(p, Some(5))),
                    1 => Some(row(p, None)),
                    _ => None,
                };
                PERMISSIONS.iter().filter_map(|p| expiring(p)).collect()
            };
            let (first, second, third) = (rows(), rows(), rows());
            // One in 80 the global object.
            let object = |o| {
                if o == 0 {
                    String::new()
                } else {
                    format!("doc:{o}")
                }
            };
            let objects: Vec<String> = (0..2).map(|_| object(next(80))).collect();
            if k % 3 == 0 {
                let changes = [
                    (objects[0].as_str(), &first[..]),
                    (objects[1].as_str(), &second[..]),
                    (objects[0].as_str(), &third[..]),
                ];
                state.set_grants("*", &changes);
            } else {
                state.set_grant("*", &objects[0], &first);
            }
            state.set_grant("u", &objects[1], &first);
            assert_eq!(counted(&state), scanned(&state), "after write {k}");
        }
        assert_eq!(counted(&state.rebuilt()), scanned(&state));
    }

    /// A loaded subject whose grants are in the heap (expiring ones do not pack) leaves its
    /// list behind when first written, whatever it writes, with its expiring slots and
    /// its limits; so does one with one expiring grant, inline, its slot in the heap. The
    /// build counts what it put in the heap, a subject met again (scattered) once.
    #[test]
    fn growth_counts_heap_lists_left_behind() {
        let mut builder = StateBuilder::new();
        let mut rows = |subject: &str, objects: std::ops::Range<u32>, expires_at| {
            for o in objects {
                builder.tuple(subject, &format!("o{o}"), "read", expires_at);
            }
        };
        rows("heap", 0..5, Some(1_000));
        rows("limited", 0..10, Some(1_000));
        rows("packed", 0..10, None);
        // One grant, inline in the entry, its expiring slot in the heap.
        rows("one", 0..1, Some(1_000));
        // Met again: its list is built again in `finish`, counted once.
        rows("heap", 5..11, Some(1_000));
        builder.limit("limited", "max", 1);
        let built = builder.finish();
        // A grant in a heap list, and its one expiring slot behind a pointer to a slice.
        let grant = std::mem::size_of::<(u32, Grant)>();
        let slot = std::mem::size_of::<Box<[Slot]>>() + std::mem::size_of::<Slot>();
        let limit = std::mem::size_of::<Box<[(u32, i64)]>>() + std::mem::size_of::<(u32, i64)>();
        let loaded = built.growth();
        assert_eq!(
            (loaded.heap, loaded.left_behind),
            (21 * (grant + slot) + limit + slot, 0),
            "{loaded:?}"
        );
        built.set_grant("heap", "o1", &[]);
        assert_eq!(built.growth().left_behind, 11 * (grant + slot));
        // Written again, it is in the written tier: nothing more left behind.
        built.set_grant("heap", "o2", &[]);
        built.set_grant("packed", "o2", &[]);
        assert_eq!(built.growth().left_behind, 11 * (grant + slot));
        built.set_grant("one", "o0", &[]);
        assert_eq!(built.growth().left_behind, 11 * (grant + slot) + slot);
        built.set_limits("limited", &[]);
        let written = built.growth();
        assert_eq!(written.left_behind, loaded.heap, "{written:?}");
        assert_eq!(written.heap, loaded.heap);
    }

    #[test]
    fn compaction_is_due_at_the_share_asked_and_never_below_the_floors() {
        let growth = |names_loaded, names_since, packed, abandoned| Growth {
            names_loaded,
            names_since,
            packed,
            abandoned,
            ..Growth::default()
        };
        let moved = |subjects_loaded, subjects_moved| Growth {
            subjects_loaded,
            subjects_moved,
            ..Growth::default()
        };
        let left = |heap, left_behind| Growth {
            heap,
            left_behind,
            ..Growth::default()
        };
        let mib = 1 << 20;
        for (case, due) in [
            (growth(10_000, 4_999, 100 * mib, 49 * mib), false),
            (growth(10_000, 5_000, 0, 0), true),
            (growth(0, 0, 100 * mib, 50 * mib), true),
            // Small sets: the floors, not the share, decide.
            (growth(10, 999, 0, 0), false),
            (growth(10, 1_000, 0, 0), true),
            (growth(0, 0, mib / 2, mib - 1), false),
            (growth(0, 0, mib / 2, mib), true),
            (moved(100_000, 49_999), false),
            (moved(100_000, 50_000), true),
            (moved(1_000, 9_999), false),
            (moved(1_000, 10_000), true),
            (left(100 * mib, 49 * mib), false),
            (left(100 * mib, 50 * mib), true),
            (left(mib / 2, mib - 1), false),
            (left(mib / 2, mib), true),
        ] {
            assert_eq!(case.compaction_due(50).is_some(), due, "{case:?}");
            assert_eq!(case.compaction_due(0), None, "{case:?}");
        }
        let why = growth(10_000, 5_000, 0, 0).compaction_due(50).expect("due");
        assert!(
            why.contains("5000 names interned since this generation was built"),
            "{why}"
        );
    }
}
