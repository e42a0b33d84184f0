//! The subject map: subject name to entry, in two maps chosen by the name's length
//! (`key.rs`), so that a name of up to 46 bytes sits inline in its bucket without making
//! a short name's bucket larger. A name's length picks its map, so a subject is only ever
//! in one of them, and no write moves it. A single check on a short name (and `*`) reads
//! the short map directly (`State::check`).
//!
//! With `user:` and a UUID (41 bytes) in the heap, a cold object check took 154 to 183 ns
//! against 98 to 113 for `user:N`; in one map with 48-byte keys, UUID-named subjects were
//! as fast but short names ~8 % slower; in two maps, UUID-named subjects take 125 to 142
//! ns and short names are unchanged (benches/README.md, `store`).
//!
//! Each map is in two tiers. What the full load built is in plain hashbrown tables (as
//! many shards as the `DashMap`'s) that no one changes once the generation is shared
//! (`loaded`), read with no lock: no locked
//! instruction on a check's path, so the CPU overlaps one check's cache misses with the
//! next one's, and a check in cache saves the shard lock's ~5 ns. What the applier writes
//! goes to a `DashMap` (`written`): before its first write to a loaded subject, the
//! applier copies the entry there, under the shard's write lock, and marks the loaded
//! entry moved (one bit per bucket of the loaded table, apart from it, so that a bucket
//! stays as small as the `DashMap`'s, and one in a filter its name's hash picks, which a
//! reader reads before any look-up: `Tier::get`); a reader that finds it moved reads the
//! written tier, behind that lock, so it sees the entry before the write or after it,
//! never a part of it. A subject the load did not have is only ever in the written tier. The
//! loaded entries of moved subjects stay, unread, until the next full load.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::mapref::one;
use dashmap::DashMap;

use super::key::{is_short, LongKey};
use super::{same_bytes, Hasher, Name};

/// Subject name to `V`, in the map its length picks.
pub(super) struct Subjects<V> {
    pub(super) short: Tier<Name, V>,
    pub(super) long: Tier<LongKey, V>,
    /// Writes under way (the low 32 bits) and writes ended (the rest): the writer counts
    /// one in before it asks for a shard's write lock and out once it has let go of it.
    /// Readers of many entries wait, between two reads, for the write under way to end
    /// (`give_way`).
    writing: AtomicU64,
}

/// `Subjects::writing`'s count of writes under way.
const UNDER_WAY: u64 = u32::MAX as u64;

/// Added to `Subjects::writing` when a write ends: one under way less, one ended more.
const ENDED: u64 = UNDER_WAY;

/// A written entry, write-locked, with its write counted in `Subjects::writing` until it
/// is let go.
pub(super) struct Writing<'a, V> {
    // Dropped first: the lock is let go, then the write counted out.
    entry: RefMut<'a, V>,
    _counted: Counted<'a>,
}

impl<V> Deref for Writing<'_, V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.entry
    }
}

impl<V> DerefMut for Writing<'_, V> {
    fn deref_mut(&mut self) -> &mut V {
        &mut self.entry
    }
}

/// Whether a reader that saw `seen` in `Subjects::writing` may go on at `now`: no write
/// is under way, or one has ended since (the one it saw).
fn may_go_on(seen: u64, now: u64) -> bool {
    now & UNDER_WAY == 0 || now >> 32 != seen >> 32
}

/// One write counted in `Subjects::writing` while it lives.
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn new(writing: &'a AtomicU64) -> Self {
        writing.fetch_add(1, Ordering::AcqRel);
        Self(writing)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        // One add: the count under way and the count ended change at once (the ended
        // count wraps, harmlessly, after 2^32 writes).
        self.0.fetch_add(ENDED, Ordering::AcqRel);
    }
}

/// One map's two tiers (see the module's comment).
pub(super) struct Tier<K, V> {
    /// The loaded tier, in as many shards as `written` has (picked by the same bits of
    /// the hash as dashmap's): each table grows on its own during the load, so that no
    /// resize holds two copies of the whole tier (one table measured 1 to 2 MiB more
    /// resident for a 1M-tuple set, and 4 MiB more at its peak).
    loaded: Box<[Loaded<K, V>]>,
    hasher: Hasher,
    /// Loaded entries moved, for `len`; kept by the single writer.
    moved_count: AtomicUsize,
    /// Subjects written since the load, and subjects the load did not have.
    written: DashMap<K, V, Hasher>,
}

/// One shard of the loaded tier.
struct Loaded<K, V> {
    /// Filled by the full load through `&mut` and never changed once shared.
    table: hashbrown::HashTable<(K, V)>,
    /// One bit per bucket of `table`: set once its entry has moved to `written`.
    moved: Box<[AtomicU64]>,
    /// Eight bits per bucket of `table`, picked by a name's hash: set for every moved
    /// subject (and so for the few others whose hash picks the same bit). A clear bit
    /// says the subject has not moved without a look at its bucket; a set one sends a
    /// reader to `written` first, so that a written subject costs no look-up in `table`.
    /// A power of two of words, at least one.
    maybe_moved: Box<[AtomicU64]>,
}

impl<K: Key, V> Loaded<K, V> {
    fn new() -> Self {
        Self {
            table: hashbrown::HashTable::new(),
            moved: Box::default(),
            maybe_moved: Box::new([AtomicU64::new(0)]),
        }
    }

    /// The bucket of `name`'s entry, if it has one (moved or not).
    #[inline]
    fn bucket(&self, hash: u64, name: &str) -> Option<usize> {
        self.table.find_bucket_index(hash, |(key, _)| key.is(name))
    }

    #[inline]
    fn is_moved(&self, bucket: usize) -> bool {
        self.moved[bucket / 64].load(Ordering::Acquire) & (1 << (bucket % 64)) != 0
    }

    /// The word and bit of `maybe_moved` that `hash` picks.
    #[inline]
    fn maybe_bit(&self, hash: u64) -> (&AtomicU64, u64) {
        let bit = hash as usize & (self.maybe_moved.len() * 64 - 1);
        (&self.maybe_moved[bit / 64], 1 << (bit % 64))
    }

    #[inline]
    fn may_have_moved(&self, hash: u64) -> bool {
        let (word, bit) = self.maybe_bit(hash);
        word.load(Ordering::Acquire) & bit != 0
    }

    #[inline]
    fn value_at(&self, bucket: usize) -> Option<&V> {
        self.table.get_bucket(bucket).map(|(_, value)| value)
    }

    /// The entry in `bucket`, if it has not moved.
    #[inline]
    fn unmoved(&self, bucket: usize) -> Option<&V> {
        if self.is_moved(bucket) {
            None
        } else {
            self.value_at(bucket)
        }
    }

    /// Marks the entry in `bucket`, whose name hashes to `hash`, moved: its bucket's bit,
    /// then the bit its hash picks.
    fn mark_moved(&self, bucket: usize, hash: u64) {
        self.moved[bucket / 64].fetch_or(1 << (bucket % 64), Ordering::Release);
        let (word, bit) = self.maybe_bit(hash);
        word.fetch_or(bit, Ordering::Release);
    }
}

/// What the two maps' keys have in common.
pub(super) trait Key:
    Clone + Eq + Hash + for<'a> From<&'a str> + Borrow<Self::Lookup>
{
    /// What a look-up hashes: the name, or its bytes (as the key hashes itself).
    type Lookup: ?Sized + Eq + Hash;
    fn lookup(name: &str) -> &Self::Lookup;
    /// Whether this is the key of `name`, compared with `same_bytes` (no `memcmp` call).
    fn is(&self, name: &str) -> bool;
    fn name(&self) -> &str;
    fn written<V>(entry: one::Ref<'_, Self, V>) -> Ref<'_, V>;
    fn written_mut<V>(entry: one::RefMut<'_, Self, V>) -> RefMut<'_, V>;
}

impl Key for Name {
    type Lookup = str;

    #[inline]
    fn lookup(name: &str) -> &str {
        name
    }

    #[inline]
    fn is(&self, name: &str) -> bool {
        same_bytes(self.as_bytes(), name.as_bytes())
    }

    fn name(&self) -> &str {
        self.as_str()
    }

    #[inline]
    fn written<V>(entry: one::Ref<'_, Self, V>) -> Ref<'_, V> {
        Ref::Short(entry)
    }

    fn written_mut<V>(entry: one::RefMut<'_, Self, V>) -> RefMut<'_, V> {
        RefMut::Short(entry)
    }
}

impl Key for LongKey {
    type Lookup = [u8];

    #[inline]
    fn lookup(name: &str) -> &[u8] {
        name.as_bytes()
    }

    #[inline]
    fn is(&self, name: &str) -> bool {
        same_bytes(self.as_bytes(), name.as_bytes())
    }

    fn name(&self) -> &str {
        self.as_str()
    }

    #[inline]
    fn written<V>(entry: one::Ref<'_, Self, V>) -> Ref<'_, V> {
        Ref::Long(entry)
    }

    fn written_mut<V>(entry: one::RefMut<'_, Self, V>) -> RefMut<'_, V> {
        RefMut::Long(entry)
    }
}

/// An entry of either map: a loaded one, or a read-locked written one.
pub(super) enum Ref<'a, V> {
    Loaded(&'a V),
    Short(one::Ref<'a, Name, V>),
    Long(one::Ref<'a, LongKey, V>),
}

impl<V> Deref for Ref<'_, V> {
    type Target = V;

    #[inline]
    fn deref(&self) -> &V {
        match self {
            Self::Loaded(entry) => entry,
            Self::Short(entry) => entry.value(),
            Self::Long(entry) => entry.value(),
        }
    }
}

/// A write-locked entry of either map's written tier.
pub(super) enum RefMut<'a, V> {
    Short(one::RefMut<'a, Name, V>),
    Long(one::RefMut<'a, LongKey, V>),
}

impl<V> Deref for RefMut<'_, V> {
    type Target = V;

    fn deref(&self) -> &V {
        match self {
            Self::Short(entry) => entry.value(),
            Self::Long(entry) => entry.value(),
        }
    }
}

impl<V> DerefMut for RefMut<'_, V> {
    fn deref_mut(&mut self) -> &mut V {
        match self {
            Self::Short(entry) => entry.value_mut(),
            Self::Long(entry) => entry.value_mut(),
        }
    }
}

impl<K: Key, V: Default + Clone> Tier<K, V> {
    fn with_capacity(capacity: usize) -> Self {
        let written = DashMap::with_capacity_and_hasher(capacity, Hasher::default());
        let shards = written.shards().len();
        Self {
            loaded: (0..shards).map(|_| Loaded::new()).collect(),
            hasher: Hasher::default(),
            moved_count: AtomicUsize::new(0),
            written,
        }
    }

    #[inline]
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(K::lookup(name))
    }

    /// The shard of the loaded tier `hash` picks: the written tier's shard for that hash,
    /// by dashmap's own `determine_shard` (the bits below the top seven, which hashbrown
    /// keeps for its control bytes).
    #[inline]
    fn shard(&self, hash: u64) -> &Loaded<K, V> {
        &self.loaded[self.shard_index(hash)]
    }

    #[inline]
    fn shard_index(&self, hash: u64) -> usize {
        self.written.determine_shard(hash as usize)
    }

    /// The shard and bucket of `name`'s loaded entry, if it has one (moved or not).
    #[inline]
    fn loaded_bucket(&self, name: &str) -> Option<(&Loaded<K, V>, usize, u64)> {
        let hash = self.hash(name);
        let shard = self.shard(hash);
        shard.bucket(hash, name).map(|bucket| (shard, bucket, hash))
    }

    /// The entry of `name`, looked up in the tier its `maybe_moved` bit points to first.
    /// A clear bit: the subject had not moved when it was read, so its loaded entry, if
    /// it has one, is the current one (a writer sets the bit before it lets go of the
    /// copy's lock). A set bit: the written tier, and if the subject is not there (its
    /// bit is another's, or it moved and was removed), its loaded entry unless moved; if
    /// it moved between the two look-ups, the written tier again, which has it for good
    /// from then on.
    #[inline]
    pub(super) fn get(&self, name: &str) -> Option<Ref<'_, V>> {
        let hash = self.hash(name);
        let shard = self.shard(hash);
        if !shard.may_have_moved(hash) {
            return match shard.bucket(hash, name).and_then(|b| shard.value_at(b)) {
                Some(value) => Some(Ref::Loaded(value)),
                None => self.written.get(K::lookup(name)).map(K::written),
            };
        }
        if let Some(entry) = self.written.get(K::lookup(name)) {
            return Some(K::written(entry));
        }
        let bucket = shard.bucket(hash, name)?;
        if let Some(value) = shard.unmoved(bucket) {
            return Some(Ref::Loaded(value));
        }
        self.written.get(K::lookup(name)).map(K::written)
    }

    /// `get` for a reader that holds every shard's read lock of `written` (no writer is
    /// between copying an entry and letting go of it): `written` is `find`.
    #[inline]
    fn get_held<'g>(&'g self, name: &str, find: impl Fn() -> Option<&'g V>) -> Option<&'g V> {
        let hash = self.hash(name);
        let shard = self.shard(hash);
        if !shard.may_have_moved(hash) {
            return shard
                .bucket(hash, name)
                .and_then(|b| shard.value_at(b))
                .or_else(find);
        }
        find().or_else(|| shard.bucket(hash, name).and_then(|b| shard.unmoved(b)))
    }

    /// The loaded entry of `name` that has not moved, with its shard, bucket and hash.
    /// For the single writer, as are `get_mut`, `entry_or_default` and `remove_if`.
    fn unmoved(&self, name: &str) -> Option<(&Loaded<K, V>, usize, u64)> {
        self.loaded_bucket(name)
            .filter(|(shard, bucket, _)| !shard.is_moved(*bucket))
    }

    /// The written entry of `name`, a loaded one copied there first.
    fn get_mut(&self, name: &str) -> Option<RefMut<'_, V>> {
        match self.unmoved(name) {
            Some(found) => self.move_to_written(name, found),
            None => self.written.get_mut(K::lookup(name)).map(K::written_mut),
        }
    }

    fn entry_or_default(&self, name: &str) -> RefMut<'_, V> {
        match self
            .unmoved(name)
            .and_then(|found| self.move_to_written(name, found))
        {
            Some(entry) => entry,
            None => K::written_mut(self.written.entry(K::from(name)).or_default()),
        }
    }

    /// Copies `name`'s loaded entry, `found`, to the written tier and marks it moved while
    /// the copy is write-locked: a reader that sees the mark waits for the lock, so it
    /// reads the entry as the caller leaves it.
    fn move_to_written(
        &self,
        name: &str,
        (shard, bucket, hash): (&Loaded<K, V>, usize, u64),
    ) -> Option<RefMut<'_, V>> {
        let value = shard.value_at(bucket)?.clone();
        let entry = self.written.entry(K::from(name)).insert(value);
        self.mark_moved(shard, bucket, hash);
        Some(K::written_mut(entry))
    }

    fn mark_moved(&self, shard: &Loaded<K, V>, bucket: usize, hash: u64) {
        shard.mark_moved(bucket, hash);
        // Only the single writer moves entries, so load-then-store cannot lose one.
        let count = self.moved_count.load(Ordering::Relaxed);
        self.moved_count.store(count + 1, Ordering::Relaxed);
    }

    fn remove_if(&self, name: &str, remove: impl FnOnce(&V) -> bool) {
        let found = self.unmoved(name);
        match found
            .and_then(|(shard, bucket, hash)| Some((shard.value_at(bucket)?, shard, bucket, hash)))
        {
            Some((value, shard, bucket, hash)) => {
                if remove(value) {
                    self.mark_moved(shard, bucket, hash);
                }
            }
            None => {
                self.written.remove_if(K::lookup(name), |_, v| remove(v));
            }
        }
    }

    fn loaded_len(&self) -> usize {
        self.loaded.iter().map(|shard| shard.table.len()).sum()
    }

    fn len(&self) -> usize {
        self.loaded_len() - self.moved_count.load(Ordering::Relaxed) + self.written.len()
    }

    fn loaded_and_moved(&self) -> (usize, usize) {
        (self.loaded_len(), self.moved_count.load(Ordering::Relaxed))
    }

    /// Calls `f` with every entry, each subject once even while the writer moves entries:
    /// a loaded subject is read in the tier it is in when its turn comes.
    fn for_each(&self, f: &mut impl FnMut(&str, &V), give_way: &dyn Fn()) {
        let find = |key: &K| {
            let hash = self.hasher.hash_one(key.borrow());
            let shard = self.shard(hash);
            let bucket = shard.table.find_bucket_index(hash, |(k, _)| k == key);
            bucket.map(|bucket| shard.is_moved(bucket))
        };
        for shard in &self.loaded {
            for (key, value) in &shard.table {
                if find(key) == Some(true) {
                    give_way();
                    if let Some(entry) = self.written.get(key.borrow()) {
                        f(key.name(), entry.value());
                    }
                } else {
                    f(key.name(), value);
                }
            }
        }
        // The written tier's names first, each shard read-locked only while they are
        // copied, then each entry under its shard's lock for its own call only: a walk
        // that builds something for every subject (a compaction's rebuild, while the
        // writer goes on) holds a shard for one subject at a time, not for all of its.
        let names: Vec<K> = self
            .written
            .iter()
            .filter(|entry| find(entry.key()).is_none())
            .map(|entry| entry.key().clone())
            .collect();
        for key in names {
            give_way();
            if let Some(entry) = self.written.get(key.borrow()) {
                f(key.name(), entry.value());
            }
        }
    }

    /// For the full load, which owns the state: the loaded entry of `name`, inserted from
    /// `value()` if it has none yet, and whether it was.
    fn load(&mut self, name: &str, value: impl FnOnce() -> V) -> (&mut V, bool) {
        let hash = self.hash(name);
        let index = self.shard_index(hash);
        let hasher = &self.hasher;
        let shard = &mut self.loaded[index];
        let rehash = |(key, _): &(K, V)| hasher.hash_one(key.borrow());
        // Grown first, if at all, so that the insert below moves no bucket: the bits
        // again, all clear (nothing moves while the load owns the state).
        shard.table.reserve(1, rehash);
        let buckets = shard.table.num_buckets();
        if shard.moved.len() != buckets.div_ceil(64) {
            let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
            shard.moved = zeros(buckets.div_ceil(64));
            shard.maybe_moved = zeros((buckets / 8).max(1));
        }
        match shard.table.entry(hash, |(key, _)| key.is(name), rehash) {
            hashbrown::hash_table::Entry::Occupied(occupied) => (&mut occupied.into_mut().1, false),
            hashbrown::hash_table::Entry::Vacant(vacant) => (
                &mut vacant.insert((K::from(name), value())).into_mut().1,
                true,
            ),
        }
    }

    fn load_new(&mut self, name: &str, value: impl FnOnce() -> V) -> bool {
        self.load(name, value).1
    }

    fn loaded_or_default(&mut self, name: &str) -> &mut V {
        self.load(name, V::default).0
    }
}

/// The bit of a `Subjects::place` that says the long map.
const LONG_MAP: u32 = 1 << 31;

impl<V: Default + Clone> Subjects<V> {
    /// Room for `capacity` short names written after the load; the rest start empty.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            short: Tier::with_capacity(capacity),
            long: Tier::with_capacity(0),
            writing: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(super) fn get(&self, subject: &str) -> Option<Ref<'_, V>> {
        if is_short(subject) {
            self.short.get(subject)
        } else {
            self.long.get(subject)
        }
    }

    /// The written entry of `subject` (copied from the loaded tier first if it is there).
    /// For the single writer, as are `entry_or_default` and `remove_if`.
    pub(super) fn get_mut(&self, subject: &str) -> Option<Writing<'_, V>> {
        let counted = Counted::new(&self.writing);
        let entry = if is_short(subject) {
            self.short.get_mut(subject)
        } else {
            self.long.get_mut(subject)
        };
        entry.map(|entry| Writing {
            entry,
            _counted: counted,
        })
    }

    /// The entry of `subject`, a default one inserted if it has none.
    pub(super) fn entry_or_default(&self, subject: &str) -> Writing<'_, V> {
        let counted = Counted::new(&self.writing);
        let entry = if is_short(subject) {
            self.short.entry_or_default(subject)
        } else {
            self.long.entry_or_default(subject)
        };
        Writing {
            entry,
            _counted: counted,
        }
    }

    /// Removes `subject` if `remove` says so of its entry.
    pub(super) fn remove_if(&self, subject: &str, remove: impl FnOnce(&V) -> bool) {
        let _counted = Counted::new(&self.writing);
        if is_short(subject) {
            self.short.remove_if(subject, remove);
        } else {
            self.long.remove_if(subject, remove);
        }
    }

    pub(super) fn contains(&self, subject: &str) -> bool {
        self.get(subject).is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Subjects the full load put in the loaded tiers, and of them those moved since.
    pub(super) fn loaded_and_moved(&self) -> (usize, usize) {
        let (short, long) = (self.short.loaded_and_moved(), self.long.loaded_and_moved());
        (short.0 + long.0, short.1 + long.1)
    }

    /// For the full load, which owns the state: inserts `value()` for `subject` if it has
    /// no entry yet; whether it did. The full load's entries go to the loaded tier, as do
    /// those of `loaded_or_default`.
    pub(super) fn load_new(&mut self, subject: &str, value: impl FnOnce() -> V) -> bool {
        if is_short(subject) {
            self.short.load_new(subject, value)
        } else {
            self.long.load_new(subject, value)
        }
    }

    /// Where `subject`'s entry lies in the maps, in 32 bits, for `place_order`: the low 31
    /// bits of the hash its map places it by, the top bit set for the long map.
    pub(super) fn place(&self, subject: &str) -> u32 {
        let (map, hash) = if is_short(subject) {
            (0, self.short.hash(subject))
        } else {
            (LONG_MAP, self.long.hash(subject))
        };
        map | hash as u32 & !LONG_MAP
    }

    /// An order of names by where their loaded entries lie as the maps stand, for the
    /// full load to look many up in: the key of a name's `place`. The short map's before
    /// the long map's, and in each by first bucket (the bits of the hash below the largest
    /// shard's bucket count): in that order the look-ups sweep each shard's table from
    /// start to end, side by side, where in the hash's order each was a miss at random in
    /// a table of tens of megabytes. A table that grows meanwhile is swept in two runs or
    /// more (and one of more than 2^31 buckets would be, its bits past the place's 31
    /// unknown).
    pub(super) fn place_order(&self) -> impl Fn(u32) -> u64 {
        fn mask<K, V>(tier: &Tier<K, V>) -> u64 {
            let buckets = tier.loaded.iter().map(|s| s.table.num_buckets()).max();
            buckets.unwrap_or(1).max(1) as u64 - 1
        }
        let (short, long) = (mask(&self.short), mask(&self.long));
        move |place| {
            let hash = u64::from(place & !LONG_MAP);
            if place & LONG_MAP == 0 {
                hash & short
            } else {
                1 << 63 | hash & long
            }
        }
    }

    pub(super) fn loaded_or_default(&mut self, subject: &str) -> &mut V {
        if is_short(subject) {
            self.short.loaded_or_default(subject)
        } else {
            self.long.loaded_or_default(subject)
        }
    }

    /// Shards of the short names' written tier: a reader that holds every shard
    /// (`read_all`) only pays for it past this many look-ups.
    pub(super) fn shard_count(&self) -> usize {
        self.short.written.shards().len()
    }

    /// Looks every one of `subjects` up, with the written tiers' shards read-locked each
    /// once for them all, and calls `f` with their entries, in order, and with a look-up
    /// under the same locks for any other name (`*`). With no locked instruction between
    /// the look-ups, the CPU overlaps their cache misses. The locks are taken in shard
    /// order, the short map's first, as every multi-shard reader must take them: with the
    /// single writer holding one shard at a time, no two threads can wait on each other.
    /// `f` must not take a shard's lock again (a second read lock could wait behind a
    /// queued writer). A write under way goes first (`give_way`): a batch takes the locks
    /// again and again, some checks at a time. The look-ups of `subjects` are done here, not through `f`'s
    /// look-up, so that they inline into one loop (through the `dyn` look-up a batch
    /// measured 10 to 15 % slower).
    pub(super) fn read_all<'s, R>(
        &self,
        subjects: impl Iterator<Item = &'s str>,
        f: impl for<'g> FnOnce(Vec<Option<&'g V>>, &'g dyn Fn(&str) -> Option<&'g V>) -> R,
    ) -> R {
        self.give_way();
        let (short, long) = (&self.short, &self.long);
        let short_guards: Vec<_> = short.written.shards().iter().map(|s| s.read()).collect();
        let long_guards: Vec<_> = long.written.shards().iter().map(|s| s.read()).collect();
        let get = |subject: &str| {
            if is_short(subject) {
                short.get_held(subject, || {
                    let hash = short.written.hash_usize(&subject);
                    short_guards[short.written.determine_shard(hash)]
                        .get(hash as u64, |(key, _)| key.as_str() == subject)
                        .map(|(_, entry)| entry.get())
                })
            } else {
                long.get_held(subject, || {
                    let name = subject.as_bytes();
                    let hash = long.written.hash_usize(&name);
                    long_guards[long.written.determine_shard(hash)]
                        .get(hash as u64, |(key, _)| key.as_bytes() == name)
                        .map(|(_, entry)| entry.get())
                })
            }
        };
        f(subjects.map(get).collect(), &get)
    }

    /// Calls `f` with every entry of the loaded tiers, to change it: for the full load,
    /// before the generation is shared (nothing is in the written tiers then).
    pub(super) fn for_each_loaded_mut(&mut self, mut f: impl FnMut(&mut V)) {
        for shard in self.short.loaded.iter_mut() {
            shard.table.iter_mut().for_each(|(_, value)| f(value));
        }
        for shard in self.long.loaded.iter_mut() {
            shard.table.iter_mut().for_each(|(_, value)| f(value));
        }
    }

    /// Calls `f` with every subject and its entry, each once (one shard of a written tier
    /// locked at a time, each written entry giving way to the writer first).
    pub(super) fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        let give_way = || self.give_way();
        self.short.for_each(&mut f, &give_way);
        self.long.for_each(&mut f, &give_way);
    }

    /// Waits for the write under way, if there is one, to end: for a reader about to
    /// read-lock a shard again soon after it let go of one, and holding none. Dashmap's
    /// lock lets a reader in while a writer waits for it, and the writer, woken when the
    /// last reader lets go, takes tens of microseconds to try again: a reader that reads
    /// shards over and over (a digest, a large subject's grants in runs, a listing's walk,
    /// a batch) took them again first each time and kept the writer out for its whole
    /// length (seconds beside digests one after another; benches/README.md, "A write
    /// beside a long reader"). One write, not every write: a reader is not held for a
    /// whole run of writes (a poll's thousands of keys).
    pub(super) fn give_way(&self) {
        let seen = self.writing.load(Ordering::Acquire);
        if seen & UNDER_WAY == 0 {
            return;
        }
        let mut spins = 0_u32;
        while !may_go_on(seen, self.writing.load(Ordering::Acquire)) {
            if spins < 64 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::{LONG, SHORT};
    use super::*;

    /// Names sorted by `place_order` are met in each shard's table in bucket order, but
    /// for steps back within a group of 16 buckets (hashbrown places an entry in the
    /// first free bucket of the group its hash picks) and a few more: the full load's
    /// merge sweeps the tables rather than jump about in them.
    #[test]
    fn the_place_order_sweeps_each_table_in_bucket_order() {
        let mut subjects = Subjects::<u32>::with_capacity(4);
        let names: Vec<String> = (0..20_000)
            .map(|i| match i % 2 {
                0 => format!("user:{i}"),
                _ => format!("a-name-longer-than-a-short-one:{i}"),
            })
            .collect();
        for name in &names {
            subjects.load_new(name, || 0);
        }
        let order = subjects.place_order();
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort_by_key(|name| order(subjects.place(name)));
        // Where each name's entry is: its map, its shard, its bucket.
        let mut last = std::collections::HashMap::new();
        let mut backwards = 0;
        for name in sorted {
            let bucket = if is_short(name) {
                let (shard, bucket, _) = subjects.short.loaded_bucket(name).expect("loaded");
                (0, std::ptr::from_ref(shard) as usize, bucket)
            } else {
                let (shard, bucket, _) = subjects.long.loaded_bucket(name).expect("loaded");
                (1, std::ptr::from_ref(shard) as usize, bucket)
            };
            let shard = (bucket.0, bucket.1);
            if last
                .insert(shard, bucket.2)
                .is_some_and(|before| before > bucket.2 + 16)
            {
                backwards += 1;
            }
        }
        // In the hash's order about half step back (9,820 of 20,000).
        assert!(backwards < names.len() / 50, "{backwards} steps back");
    }

    #[test]
    fn each_name_lives_in_the_map_its_length_picks() {
        let mut subjects = Subjects::<u32>::with_capacity(4);
        let short = "s".repeat(SHORT);
        let long = "l".repeat(SHORT + 1);
        let longer = "h".repeat(LONG + 10);
        for (i, name) in [&short, &long, &longer].into_iter().enumerate() {
            assert!(subjects.load_new(name, || i as u32));
            assert!(!subjects.load_new(name, || 99));
        }
        assert_eq!((subjects.short.len(), subjects.long.len()), (1, 2));
        assert_eq!(subjects.len(), 3);
        assert_eq!(subjects.get(&long).map(|v| *v), Some(1));
        *subjects.loaded_or_default(&longer) += 10;
        assert_eq!(subjects.get(&longer).map(|v| *v), Some(12));
        *subjects.entry_or_default(&longer) += 10;
        assert_eq!(subjects.get(&longer).map(|v| *v), Some(22));
        *subjects.entry_or_default("new") += 5;
        assert_eq!(subjects.get("new").map(|v| *v), Some(5));
        if let Some(mut v) = subjects.get_mut(&short) {
            *v = 7;
        }
        subjects.remove_if(&long, |v| *v == 1);
        assert!(!subjects.contains(&long));
        assert!(subjects.contains(&short));
        let mut all = Vec::new();
        subjects.for_each(|name, v| all.push((name.to_owned(), *v)));
        all.sort();
        assert_eq!(all, [(longer, 22), ("new".to_owned(), 5), (short, 7)]);
    }

    /// Every write is counted in `writing` from before it asks for a lock to after it lets
    /// go, found or not, so that readers give way to it; and none is left counted.
    #[test]
    fn writes_are_counted_while_they_last() {
        let mut subjects = Subjects::<u32>::with_capacity(4);
        let long = "l".repeat(SHORT + 1);
        assert!(subjects.load_new("loaded", || 1));
        let writing =
            |subjects: &Subjects<u32>| subjects.writing.load(Ordering::Acquire) & UNDER_WAY;
        for name in ["loaded", "new", long.as_str()] {
            let entry = subjects.entry_or_default(name);
            assert_eq!(writing(&subjects), 1);
            drop(entry);
            assert_eq!(writing(&subjects), 0);
            let entry = subjects.get_mut(name).expect("written");
            assert_eq!(writing(&subjects), 1);
            drop(entry);
            subjects.remove_if(name, |_| {
                assert_eq!(writing(&subjects), 1);
                true
            });
            assert!(subjects.get_mut(name).is_none());
            assert_eq!(writing(&subjects), 0);
        }
        // Nothing under way: a reader does not wait.
        subjects.give_way();
        assert_eq!(
            subjects.writing.load(Ordering::Acquire) >> 32,
            12,
            "writes ended"
        );
    }

    /// A reader waits for the write it saw under way, not for the next one.
    #[test]
    fn a_reader_waits_for_one_write() {
        let writing = AtomicU64::new(0);
        let now = || writing.load(Ordering::Acquire);
        assert!(may_go_on(now(), now()));
        let first = Counted::new(&writing);
        let seen = now();
        assert!(!may_go_on(seen, now()));
        let second = Counted::new(&writing);
        assert!(!may_go_on(seen, now()));
        drop(first);
        assert!(may_go_on(seen, now()), "the write it saw ended");
        assert!(!may_go_on(now(), now()), "the second is under way");
        drop(second);
        assert!(may_go_on(now(), now()));
        // The ended count wraps without a carry into nothing.
        let writing = AtomicU64::new((u64::from(u32::MAX)) << 32);
        let seen = writing.load(Ordering::Acquire);
        drop(Counted::new(&writing));
        let after = writing.load(Ordering::Acquire);
        assert_eq!((after & UNDER_WAY, after >> 32), (0, 0));
        assert!(may_go_on(seen, after));
    }

    /// A loaded subject is read from the loaded tier until its first write, then from the
    /// written one: removed, written again, removed while still loaded; counted once
    /// throughout.
    #[test]
    fn a_loaded_subject_moves_to_the_written_tier_on_its_first_write() {
        let mut subjects = Subjects::<u32>::with_capacity(4);
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            assert!(subjects.load_new(name, || i as u32 + 1));
        }
        let tier = |name: &str| match subjects.get(name) {
            Some(Ref::Loaded(v)) => format!("loaded {v}"),
            Some(entry) => format!("written {}", *entry),
            None => "none".to_owned(),
        };
        assert_eq!(tier("a"), "loaded 1");
        assert_eq!(subjects.get_mut("zz").map(|v| *v), None);
        *subjects.get_mut("a").expect("loaded") += 10;
        assert_eq!(tier("a"), "written 11");
        assert_eq!(subjects.len(), 3);
        // A write after the move starts from the written entry, not the loaded one.
        *subjects.entry_or_default("a") += 10;
        assert_eq!(tier("a"), "written 21");
        subjects.remove_if("a", |v| *v == 21);
        assert_eq!((tier("a"), subjects.len()), ("none".to_owned(), 2));
        *subjects.entry_or_default("a") += 3;
        assert_eq!((tier("a"), subjects.len()), ("written 3".to_owned(), 3));
        // Removed without a write: marked moved, nothing copied.
        subjects.remove_if("b", |v| *v == 99);
        assert_eq!(tier("b"), "loaded 2");
        subjects.remove_if("b", |v| *v == 2);
        assert_eq!((tier("b"), subjects.len()), ("none".to_owned(), 2));
        let mut all = Vec::new();
        subjects.for_each(|name, v| all.push((name.to_owned(), *v)));
        all.sort();
        assert_eq!(all, [("a".to_owned(), 3), ("c".to_owned(), 3)]);
        let seen = subjects.read_all(["c", "a", "b"].into_iter(), |entries, get| {
            let mut seen: Vec<_> = entries.into_iter().map(|e| e.copied()).collect();
            seen.push(get("a").copied());
            seen
        });
        assert_eq!(seen, [Some(3), Some(3), None, Some(3)]);
    }
}
