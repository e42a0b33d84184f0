//! String interning: object, permission and limit names become small integer ids, so the
//! per-tuple memory is a few integers and no `String`.

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use hashbrown::HashTable;

use super::key::{is_short, LongKey};
use super::{same_bytes, Hasher, Name};

/// A two-way map between strings and dense `u32` ids.
///
/// Ids are handed out in order from 0 and never reused; strings are never removed (a full
/// reload builds a fresh interner, which is when churned names are reclaimed).
///
/// Two tiers, because every check looks up two names here: the names known when the
/// generation was built sit in a plain map that is never written once the generation is
/// shared (the borrow checker sees to it: only `&mut self` inserts there), so the common
/// look-up takes no lock at all; names the applier adds later go to a sharded map, which
/// a look-up consults only when the plain map misses and something was added.
pub(crate) struct Interner {
    /// Names interned while the generation was being built, up to `SHORT` bytes long.
    /// Read without a lock. A `HashTable` rather than a `HashMap` for its key compare:
    /// `same_bytes`, inline, where a map's `==` on `str` calls `memcmp` (a tenth of a
    /// check).
    frozen: HashTable<(Name, u32)>,
    /// The names of the frozen tier past `SHORT` bytes (`doc:` and a UUID), in keys that
    /// hold them inline (`key.rs`), hashed as bytes.
    frozen_long: HashTable<(LongKey, u32)>,
    /// The hasher of the frozen tables.
    hasher: Hasher,
    /// Names interned since the generation was shared. Sharded so that concurrent readers
    /// of different names do not contend; only the applier inserts.
    recent: DashMap<Name, u32, Hasher>,
    /// Whether `recent` holds anything: most look-ups that miss `frozen` (an unknown name)
    /// then skip the sharded map and its lock.
    has_recent: AtomicBool,
    /// How many names `recent` holds (counted by the single writer; `DashMap::len` locks
    /// every shard).
    recent_count: AtomicUsize,
    /// Id to name of the names interned while the generation was built (`0..built`):
    /// appended to only through `&mut`, then read without a lock.
    built_names: Vec<Arc<str>>,
    /// Id to name of the names interned since (`built..`), offset by `built`. The single
    /// writer appends while readers read, neither waiting on the other: an append-only
    /// vector whose elements never move. Until session 43 every name was in one
    /// `RwLock<Vec>`, and a reader held its read lock for a whole digest or listing,
    /// while the writer waited to name a new object (a digest of 3M rows: ~1 s).
    recent_names: boxcar::Vec<Arc<str>>,
}

/// Every name an interner has handed an id out for, read without a lock: those interned
/// after the view was taken too.
#[derive(Clone, Copy)]
pub(crate) struct Names<'a> {
    built: &'a [Arc<str>],
    recent: &'a boxcar::Vec<Arc<str>>,
}

impl<'a> Names<'a> {
    /// The name of `id`; empty for an id the interner never handed out.
    pub(crate) fn name(self, id: u32) -> &'a str {
        self.get(id).map_or("", |name| name)
    }

    pub(crate) fn get(self, id: u32) -> Option<&'a Arc<str>> {
        let id = id as usize;
        match self.built.get(id) {
            Some(name) => Some(name),
            None => self.recent.get(id - self.built.len()),
        }
    }
}

impl Interner {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            frozen: HashTable::with_capacity(capacity),
            frozen_long: HashTable::new(),
            hasher: Hasher::default(),
            recent: DashMap::with_hasher(Hasher::default()),
            has_recent: AtomicBool::new(false),
            recent_count: AtomicUsize::new(0),
            built_names: Vec::with_capacity(capacity),
            recent_names: boxcar::Vec::new(),
        }
    }

    /// The id of `name`, if it was ever interned.
    #[inline]
    pub(crate) fn get(&self, name: &str) -> Option<u32> {
        match self.frozen_id(name.as_bytes()) {
            Some(id) => Some(id),
            None if self.has_recent.load(Ordering::Acquire) => self.recent.get(name).map(|id| *id),
            None => None,
        }
    }

    /// The id of the name of `bytes` in the frozen tier, if it is there. Both tables hash
    /// a name as bytes, so that the full load can look up a COPY field's bytes before it
    /// knows they are UTF-8 (`intern_mut_bytes`).
    #[inline]
    fn frozen_id(&self, bytes: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(bytes);
        let found = if is_short(bytes) {
            self.frozen
                .find(hash, |(key, _)| same_bytes(key.as_bytes(), bytes))
                .map(|(_, id)| id)
        } else {
            self.frozen_long
                .find(hash, |(key, _)| same_bytes(key.as_bytes(), bytes))
                .map(|(_, id)| id)
        };
        found.copied()
    }

    /// The id of `name`, interning it if new, while the interner is still exclusively the
    /// builder's: the name goes to the lock-free tier.
    pub(crate) fn intern_mut(&mut self, name: &str) -> u32 {
        if let Some(id) = self.get(name) {
            return id;
        }
        self.insert_frozen(name)
    }

    /// `intern_mut` of a name given as bytes, which are checked to be UTF-8 only when the
    /// name is new: a full load names the same objects and permissions again and again,
    /// and a check of every COPY field was 9 % of its CPU (benches/README.md, `load`).
    /// `None` if the bytes are not UTF-8 (which Postgres checks too before it sends text
    /// to a UTF-8 client, even from a `SQL_ASCII` database).
    pub(crate) fn intern_mut_bytes(&mut self, bytes: &[u8]) -> Option<u32> {
        match self.frozen_id(bytes) {
            Some(id) => Some(id),
            None => Some(self.insert_frozen(std::str::from_utf8(bytes).ok()?)),
        }
    }

    /// Interns `name`, which is not interned yet, in the frozen tier.
    fn insert_frozen(&mut self, name: &str) -> u32 {
        // The frozen tier's ids are `0..built()`: nothing may have been interned since.
        debug_assert!(!self.has_recent.load(Ordering::Relaxed));
        let id = u32::try_from(self.built_names.len()).unwrap_or(u32::MAX);
        self.built_names.push(Arc::from(name));
        let hasher = &self.hasher;
        let bytes = name.as_bytes();
        if is_short(name) {
            self.frozen
                .insert_unique(hasher.hash_one(bytes), (name.into(), id), |(key, _)| {
                    hasher.hash_one(key.as_bytes())
                });
        } else {
            self.frozen_long.insert_unique(
                hasher.hash_one(bytes),
                (name.into(), id),
                |(key, _)| hasher.hash_one(key.as_bytes()),
            );
        }
        id
    }

    /// The id of `name`, interning it if new. Only the single writer (applier) calls this,
    /// so the look-up-then-insert below cannot race with another insert.
    pub(crate) fn intern(&self, name: &str) -> u32 {
        if let Some(id) = self.get(name) {
            return id;
        }
        let id = self.built_names.len() + self.recent_names.push(Arc::from(name));
        let id = u32::try_from(id).unwrap_or(u32::MAX);
        self.recent.insert(Name::from(name), id);
        // Release: a reader that sees the flag also sees the insert.
        self.has_recent.store(true, Ordering::Release);
        self.recent_count.fetch_add(1, Ordering::Relaxed);
        id
    }

    /// Names interned while the generation was built, and since it was shared.
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (
            self.frozen.len() + self.frozen_long.len(),
            self.recent_count.load(Ordering::Relaxed),
        )
    }

    /// How many names were interned while the generation was built: their ids are
    /// `0..built`, those interned since come after them.
    pub(crate) fn built(&self) -> u32 {
        u32::try_from(self.frozen.len() + self.frozen_long.len()).unwrap_or(u32::MAX)
    }

    /// The ids `from..built()`, sorted by their names, byte by byte (as Postgres's C
    /// collation sorts). Sorted as (the name's next 8 bytes as a number, id) pairs, a run
    /// of ties sorted again on the 8 bytes after: most comparisons compare two numbers,
    /// where comparing the names reads each from memory (`doc:` and 50,000 numbers: ~2 ms).
    pub(crate) fn built_by_name(&self, from: u32) -> Box<[u32]> {
        let mut keyed: Vec<(u64, u32)> = (from..self.built()).map(|id| (0, id)).collect();
        sort_by_name(&mut keyed, &self.built_names, 0);
        keyed.into_iter().map(|(_, id)| id).collect()
    }

    /// The name of an id handed out by this interner.
    pub(crate) fn name(&self, id: u32) -> Arc<str> {
        self.names()
            .get(id)
            .map_or_else(|| Arc::from(""), Arc::clone)
    }

    /// The id-to-name table, for readers of many names (listings, the digest).
    pub(crate) fn names(&self) -> Names<'_> {
        Names {
            built: &self.built_names,
            recent: &self.recent_names,
        }
    }
}

/// Sorts `keyed`, (key, id) pairs whose names are equal up to byte `at`, by the names
/// from there: keyed by the 8 bytes from `at` (zeros past a name's end), runs of the same
/// key sorted again from `at + 8` while a name in them goes on past it.
fn sort_by_name(keyed: &mut [(u64, u32)], names: &[Arc<str>], at: usize) {
    /// Runs this short are sorted by their names at once.
    const COMPARE_UNDER: usize = 16;
    let name = |id: u32| names.get(id as usize).map_or(&b""[..], |n| n.as_bytes());
    for (key, id) in keyed.iter_mut() {
        let rest = name(*id).get(at..).unwrap_or_default();
        let mut word = [0; 8];
        let len = rest.len().min(8);
        word[..len].copy_from_slice(&rest[..len]);
        *key = u64::from_be_bytes(word);
    }
    keyed.sort_unstable();
    for run in keyed.chunk_by_mut(|a, b| a.0 == b.0) {
        if run.len() < 2 {
            continue;
        }
        if run.len() >= COMPARE_UNDER && run.iter().any(|&(_, id)| name(id).len() > at + 8) {
            sort_by_name(run, names, at + 8);
        } else {
            run.sort_unstable_by(|a, b| name(a.1).cmp(name(b.1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::key::{LONG, SHORT};
    use super::*;

    #[test]
    fn ids_are_dense_and_stable() {
        let interner = Interner::with_capacity(4);
        assert_eq!(interner.intern("a"), 0);
        assert_eq!(interner.intern("b"), 1);
        assert_eq!(interner.intern("a"), 0);
        assert_eq!(interner.get("b"), Some(1));
        assert_eq!(interner.get("c"), None);
        assert_eq!(&*interner.name(1), "b");
    }

    #[test]
    fn names_of_every_length_are_found_in_either_tier() {
        let names = [
            "d".to_owned(),
            "x".repeat(SHORT),
            "x".repeat(SHORT + 1),
            "doc:6f1c2a9e-3b7d-4e58-a0c4-9d2e7f1b3c5a".to_owned(),
            "x".repeat(LONG),
            "x".repeat(LONG + 1),
        ];
        let mut interner = Interner::with_capacity(4);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(interner.intern_mut(name), i as u32);
        }
        assert_eq!((interner.frozen.len(), interner.frozen_long.len()), (2, 4));
        for (i, name) in names.iter().enumerate() {
            assert_eq!(interner.get(name), Some(i as u32));
            let later = format!("{name}!");
            assert_eq!(interner.get(&later), None);
            let id = interner.intern(&later);
            assert_eq!(interner.get(&later), Some(id));
            assert_eq!(interner.intern_mut(name), i as u32);
        }
        assert_eq!(interner.get(&"x".repeat(SHORT - 1)), None);
    }

    /// Names given as bytes are the same names given as `str`, in both tables; bytes that
    /// are not UTF-8 are refused and not interned.
    #[test]
    fn names_given_as_bytes_are_the_names_given_as_str() {
        let mut interner = Interner::with_capacity(4);
        let (short, long) = ("perm".to_owned(), "x".repeat(SHORT + 1));
        assert_eq!(interner.intern_mut(&short), 0);
        assert_eq!(interner.intern_mut_bytes(short.as_bytes()), Some(0));
        assert_eq!(interner.intern_mut_bytes(long.as_bytes()), Some(1));
        assert_eq!(interner.intern_mut(&long), 1);
        assert_eq!(interner.get(&long), Some(1));
        let mut bad_long = long.clone().into_bytes();
        bad_long.push(0xff);
        assert_eq!(interner.intern_mut_bytes(b"caf\xe9"), None);
        assert_eq!(interner.intern_mut_bytes(&bad_long), None);
        assert_eq!(interner.built(), 2);
        assert_eq!(interner.intern_mut_bytes("café".as_bytes()), Some(2));
        assert_eq!(interner.get("café"), Some(2));
        assert_eq!(&*interner.name(2), "café");
    }

    #[test]
    fn both_tiers_share_one_id_space() {
        let mut interner = Interner::with_capacity(4);
        assert_eq!(interner.intern_mut("built"), 0);
        assert_eq!(interner.get("later"), None);
        assert_eq!(interner.intern("later"), 1);
        assert_eq!(interner.intern("built"), 0);
        assert_eq!(interner.intern_mut("later"), 1);
        assert_eq!(interner.get("built"), Some(0));
        assert_eq!(interner.get("later"), Some(1));
        assert_eq!(&*interner.name(0), "built");
        assert_eq!(&*interner.name(1), "later");
    }

    /// A reader holds the names while the writer interns thousands more: the writer does
    /// not wait for it (a digest or a listing holds them for its whole length), and the
    /// reader finds those names by their ids.
    #[test]
    fn the_writer_interns_while_a_reader_holds_the_names() {
        let mut interner = Interner::with_capacity(4);
        interner.intern_mut("built");
        let (done, interned) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // Here, so that a failed wait lets go of them before the scope joins the writer.
            let names = interner.names();
            s.spawn(|| {
                let ids: Vec<u32> = (0..10_000)
                    .map(|k| interner.intern(&format!("later-{k}")))
                    .collect();
                done.send(ids).expect("the reader waits");
            });
            let ids = interned
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the writer does not wait for the reader");
            for (k, id) in ids.into_iter().enumerate() {
                assert_eq!(names.name(id), format!("later-{k}"));
            }
            assert_eq!((names.name(0), names.name(10_001)), ("built", ""));
        });
    }

    /// The built names sorted by their bytes, whatever their lengths and shared prefixes:
    /// long runs of the same first 8 bytes (sorted again on the next 8, and the next),
    /// names that end inside a word or at its end, the empty name; those interned since
    /// left out, and those before `from`.
    #[test]
    fn built_names_sort_by_their_bytes() {
        let mut names: Vec<String> = ["", "*", "a", "resource", "resource:", "é", "~", "zz"]
            .map(String::from)
            .into();
        for n in 0..3_000 {
            names.push(format!("resource{}{n}", ["-", ":", "A"][n % 3]));
            // Runs of 5 that end alike after 16 bytes: sorted by their names.
            for k in 0..5 {
                names.push(format!("resource:{n}/a-child-with-a-long-path-{k}"));
            }
        }
        // One run of 40 over many words.
        names.extend((0..40).map(|k| format!("{}{k}", "a-long-shared-prefix/".repeat(4))));
        names.extend((0..300).map(|n| format!("{n:x}")));
        let mut interner = Interner::with_capacity(4);
        // In an order unrelated to theirs (7,919 is prime, so every index comes once).
        for i in 0..names.len() {
            let name = &names[i * 7_919 % names.len()];
            interner.intern_mut(name);
        }
        interner.intern("later");
        let by_name = |from: u32| -> Vec<Arc<str>> {
            let ids = interner.built_by_name(from);
            ids.iter().map(|&id| interner.name(id)).collect()
        };
        let sorted = by_name(0);
        let mut expected: Vec<&str> = names.iter().map(String::as_str).collect();
        expected.sort_unstable();
        expected.dedup(); // "a" is also 10 in hex
        assert_eq!(sorted.len(), expected.len());
        for (got, want) in sorted.iter().zip(&expected) {
            assert_eq!(&**got, *want);
        }
        let first = interner.name(0);
        let rest = by_name(1);
        assert!(!rest.contains(&first));
        assert_eq!(rest.len(), expected.len() - 1);
        assert!(rest.is_sorted());
    }
}
