//! The subject map: subject name to entry, in two `DashMap`s chosen by the name's length
//! (`key.rs`), so that a name of up to 46 bytes sits inline in its bucket without making
//! a short name's bucket larger. A name's length picks its map, so a subject is only ever
//! in one of them, and no write moves it. A single check on a short name (and `*`) reads
//! the short map directly (`State::check`), as it did when it was the only map.
//!
//! With `user:` and a UUID (41 bytes) in the heap, a cold object check took 154 to 183 ns
//! against 98 to 113 for `user:N`; in one map with 48-byte keys, UUID-named subjects were
//! as fast but short names ~8 % slower; in two maps, UUID-named subjects take 125 to 142
//! ns and short names are unchanged (benches/README.md, `store`).

use std::hash::Hash;
use std::ops::{Deref, DerefMut};

use dashmap::mapref::entry::Entry;
use dashmap::mapref::one;
use dashmap::DashMap;

use super::key::{is_short, LongKey};
use super::{Hasher, Name};

/// Subject name to `V`, in the map its length picks.
pub(super) struct Subjects<V> {
    pub(super) short: DashMap<Name, V, Hasher>,
    pub(super) long: DashMap<LongKey, V, Hasher>,
}

/// A read-locked entry of either map.
pub(super) enum Ref<'a, V> {
    Short(one::Ref<'a, Name, V>),
    Long(one::Ref<'a, LongKey, V>),
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

impl<V: Default> Subjects<V> {
    /// Room for `capacity` short names; the long names' map starts empty and grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            short: DashMap::with_capacity_and_hasher(capacity, Hasher::default()),
            long: DashMap::with_hasher(Hasher::default()),
        }
    }

    #[inline]
    pub(super) fn get(&self, subject: &str) -> Option<Ref<'_, V>> {
        if is_short(subject) {
            self.short.get(subject).map(Ref::Short)
        } else {
            self.long.get(subject.as_bytes()).map(Ref::Long)
        }
    }

    pub(super) fn get_mut(&self, subject: &str) -> Option<RefMut<'_, V>> {
        if is_short(subject) {
            self.short.get_mut(subject).map(RefMut::Short)
        } else {
            self.long.get_mut(subject.as_bytes()).map(RefMut::Long)
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
        if is_short(subject) {
            self.short.remove_if(subject, |_, v| remove(v));
        } else {
            self.long.remove_if(subject.as_bytes(), |_, v| remove(v));
        }
    }

    pub(super) fn contains(&self, subject: &str) -> bool {
        if is_short(subject) {
            self.short.contains_key(subject)
        } else {
            self.long.contains_key(subject.as_bytes())
        }
    }

    pub(super) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Shards of the short names' map: a reader that holds every shard (`read_all`) only
    /// pays for it past this many look-ups.
    pub(super) fn shard_count(&self) -> usize {
        self.short.shards().len()
    }

    /// Looks every one of `subjects` up under the shards' read locks, each taken once for
    /// them all, and calls `f` with their entries, in order, and with a look-up under the
    /// same locks for any other name (`*`). With no locked instruction between the
    /// look-ups, the CPU overlaps their cache misses. The locks are taken in shard order,
    /// the short map's first, as every multi-shard reader must take them: with the single
    /// writer holding one shard at a time, no two threads can wait on each other. `f` must
    /// not take a shard's lock again (a second read lock could wait behind a queued
    /// writer). The look-ups of `subjects` are done here, not through `f`'s look-up, so
    /// that they inline into one loop (through the `dyn` look-up a batch measured 10 to 15
    /// % slower).
    pub(super) fn read_all<'s, R>(
        &self,
        subjects: impl Iterator<Item = &'s str>,
        f: impl for<'g> FnOnce(Vec<Option<&'g V>>, &'g dyn Fn(&str) -> Option<&'g V>) -> R,
    ) -> R {
        let (short, long) = (&self.short, &self.long);
        let short_guards: Vec<_> = short.shards().iter().map(|shard| shard.read()).collect();
        let long_guards: Vec<_> = long.shards().iter().map(|shard| shard.read()).collect();
        let get = |subject: &str| {
            if is_short(subject) {
                let hash = short.hash_usize(&subject);
                short_guards[short.determine_shard(hash)]
                    .get(hash as u64, |(key, _)| key.as_str() == subject)
                    .map(|(_, entry)| entry.get())
            } else {
                let name = subject.as_bytes();
                let hash = long.hash_usize(&name);
                long_guards[long.determine_shard(hash)]
                    .get(hash as u64, |(key, _)| key.as_bytes() == name)
                    .map(|(_, entry)| entry.get())
            }
        };
        f(subjects.map(get).collect(), &get)
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
}

#[cfg(test)]
mod tests {
    use super::super::key::{LONG, SHORT};
    use super::*;

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
    }
}
