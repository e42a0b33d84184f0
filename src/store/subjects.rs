//! The subject map: subject name to entry, in two `DashMap`s chosen by the name's length,
//! so that every name up to 46 bytes sits inline in its bucket without making a short
//! name's bucket larger.
//!
//! A cold check reads the subject's bucket, compares the key, then reads the subject's
//! grants. A key in the heap puts a third dependent miss (and a page walk) between the
//! two: with `user:` and a UUID (41 bytes), as many products name their users, a cold
//! object check took 154 to 174 ns against 97 to 125 ns for `user:N` (benches/README.md,
//! `store`). One map with 46 bytes of key in every bucket made long names as fast, but
//! every short name's bucket 80 bytes instead of 56, and its cold check ~8 % slower. So a
//! name of up to `SHORT` bytes (`user:` and a number, most ids) lives in a map whose key
//! is 24 bytes, a longer one in a map whose key is 48 (46 inline, longer still in the
//! heap); a name's length picks its map, so a subject is only ever in one of them.

use std::borrow::Borrow;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};

use dashmap::mapref::entry::Entry;
use dashmap::mapref::one;
use dashmap::DashMap;

use super::Hasher;

/// Names up to this long go to the short map.
pub(super) const SHORT: usize = 22;
/// Bytes a key of the long map holds inline.
const LONG: usize = 46;

/// Whether `subject` belongs in the short map.
#[inline]
pub(super) fn is_short(subject: &str) -> bool {
    subject.len() <= SHORT
}

/// A name, inline up to `N` bytes (`N` < 256), else in the heap. Compared, hashed and
/// borrowed as bytes (`[u8]`): a look-up never checks again that an inline key is UTF-8
/// (it was, as a `&str`, when the key was made).
#[derive(Clone)]
pub(super) enum InlineKey<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Box<str>),
}

const _: () = assert!(std::mem::size_of::<InlineKey<SHORT>>() == 24);
const _: () = assert!(std::mem::size_of::<InlineKey<LONG>>() == 48);

impl<const N: usize> InlineKey<N> {
    #[inline]
    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(name) => name.as_bytes(),
        }
    }

    /// The name. Validates an inline key again: for listing and the digest, not a check.
    pub(super) fn as_str(&self) -> &str {
        match self {
            // Made from a `&str`, so always UTF-8.
            Self::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Self::Heap(name) => name,
        }
    }
}

impl<const N: usize> From<&str> for InlineKey<N> {
    fn from(name: &str) -> Self {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= N => {
                let mut bytes = [0; N];
                bytes[..name.len()].copy_from_slice(name.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(name.into()),
        }
    }
}

impl<const N: usize> PartialEq for InlineKey<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<const N: usize> Eq for InlineKey<N> {}

/// As `[u8]` hashes, so that a look-up by `name.as_bytes()` finds the key.
impl<const N: usize> Hash for InlineKey<N> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl<const N: usize> Borrow<[u8]> for InlineKey<N> {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> std::fmt::Debug for InlineKey<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Subject name to `V`, in the map its length picks.
pub(super) struct Subjects<V> {
    pub(super) short: DashMap<InlineKey<SHORT>, V, Hasher>,
    pub(super) long: DashMap<InlineKey<LONG>, V, Hasher>,
}

/// A read-locked entry of either map.
pub(super) enum Ref<'a, V> {
    Short(one::Ref<'a, InlineKey<SHORT>, V>),
    Long(one::Ref<'a, InlineKey<LONG>, V>),
}

impl<V> Deref for Ref<'_, V> {
    type Target = V;

    #[inline]
    fn deref(&self) -> &V {
        match self {
            Self::Short(entry) => entry.value(),
            Self::Long(entry) => entry.value(),
        }
    }
}

/// A write-locked entry of either map.
pub(super) enum RefMut<'a, V> {
    Short(one::RefMut<'a, InlineKey<SHORT>, V>),
    Long(one::RefMut<'a, InlineKey<LONG>, V>),
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

impl<V: Default> Subjects<V> {
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            short: DashMap::with_capacity_and_hasher(capacity, Hasher::default()),
            long: DashMap::with_hasher(Hasher::default()),
        }
    }

    #[inline]
    pub(super) fn get(&self, subject: &str) -> Option<Ref<'_, V>> {
        let name = subject.as_bytes();
        if is_short(subject) {
            self.short.get(name).map(Ref::Short)
        } else {
            self.long.get(name).map(Ref::Long)
        }
    }

    pub(super) fn get_mut(&self, subject: &str) -> Option<RefMut<'_, V>> {
        let name = subject.as_bytes();
        if is_short(subject) {
            self.short.get_mut(name).map(RefMut::Short)
        } else {
            self.long.get_mut(name).map(RefMut::Long)
        }
    }

    /// The entry of `subject`, a default one inserted if it has none.
    pub(super) fn entry_or_default(&self, subject: &str) -> RefMut<'_, V> {
        if is_short(subject) {
            RefMut::Short(self.short.entry(subject.into()).or_default())
        } else {
            RefMut::Long(self.long.entry(subject.into()).or_default())
        }
    }

    /// Inserts `value()` for `subject` if it has no entry yet; whether it did.
    pub(super) fn insert_new(&self, subject: &str, value: impl FnOnce() -> V) -> bool {
        fn insert<K: Eq + Hash, V>(entry: Entry<'_, K, V>, value: impl FnOnce() -> V) -> bool {
            match entry {
                Entry::Vacant(vacant) => {
                    vacant.insert(value());
                    true
                }
                Entry::Occupied(_) => false,
            }
        }
        if is_short(subject) {
            insert(self.short.entry(subject.into()), value)
        } else {
            insert(self.long.entry(subject.into()), value)
        }
    }

    /// Removes `subject` if `remove` says so of its entry.
    pub(super) fn remove_if(&self, subject: &str, remove: impl FnOnce(&V) -> bool) {
        let name = subject.as_bytes();
        if is_short(subject) {
            self.short.remove_if(name, |_, v| remove(v));
        } else {
            self.long.remove_if(name, |_, v| remove(v));
        }
    }

    pub(super) fn contains(&self, subject: &str) -> bool {
        let name = subject.as_bytes();
        if is_short(subject) {
            self.short.contains_key(name)
        } else {
            self.long.contains_key(name)
        }
    }

    pub(super) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Calls `f` with every subject and its entry, one shard locked at a time.
    pub(super) fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        for entry in &self.short {
            f(entry.key().as_str(), entry.value());
        }
        for entry in &self.long {
            f(entry.key().as_str(), entry.value());
        }
    }

    /// The hash `subject` has in its map, for look-ups in its shards (`check_held`).
    #[inline]
    pub(super) fn hash(&self, subject: &str) -> usize {
        let name = subject.as_bytes();
        if is_short(subject) {
            self.short.hash_usize(&name)
        } else {
            self.long.hash_usize(&name)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use super::*;

    #[test]
    fn keys_read_back_inline_up_to_their_size_and_from_the_heap_past_it() {
        let uuid = "user:6f1c2a9e-3b7d-4e58-a0c4-9d2e7f1b3c5a";
        let names = [
            String::new(),
            "u1".to_owned(),
            uuid.to_owned(),
            "x".repeat(LONG),
            "x".repeat(LONG + 1),
            "é".repeat(20),
            "é".repeat(30),
        ];
        let hasher = Hasher::default();
        for name in &names {
            let key = InlineKey::<LONG>::from(name.as_str());
            assert_eq!(
                matches!(key, InlineKey::Inline { .. }),
                name.len() <= LONG,
                "{name}"
            );
            assert_eq!(key.as_str(), name);
            assert_eq!(key, InlineKey::from(name.as_str()));
            assert_eq!(
                hasher.hash_one(&key),
                hasher.hash_one(name.as_bytes()),
                "a look-up by bytes must find {name:?}"
            );
            let short = InlineKey::<SHORT>::from(name.as_str());
            assert_eq!(short.as_str(), name);
            assert_eq!(hasher.hash_one(&short), hasher.hash_one(name.as_bytes()));
        }
        assert_ne!(InlineKey::<LONG>::from("u1"), InlineKey::from("u12"));
    }

    #[test]
    fn each_name_lives_in_the_map_its_length_picks() {
        let subjects = Subjects::<u32>::with_capacity(4);
        let short = "s".repeat(SHORT);
        let long = "l".repeat(SHORT + 1);
        let longer = "h".repeat(LONG + 10);
        for (i, name) in [&short, &long, &longer].into_iter().enumerate() {
            assert!(subjects.insert_new(name, || i as u32));
            assert!(!subjects.insert_new(name, || 99));
        }
        assert_eq!((subjects.short.len(), subjects.long.len()), (1, 2));
        assert_eq!(subjects.len(), 3);
        assert_eq!(subjects.get(&long).map(|v| *v), Some(1));
        *subjects.entry_or_default(&longer) += 10;
        assert_eq!(subjects.get(&longer).map(|v| *v), Some(12));
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
        assert_eq!(all, [(longer, 12), ("new".to_owned(), 5), (short, 7)]);
        assert_eq!(
            subjects.hash(&long),
            subjects.long.hash_usize(&long.as_bytes())
        );
    }
}
