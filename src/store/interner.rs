//! String interning: object, permission and limit names become small integer ids, so the
//! per-tuple memory is a few integers and no `String`.

use std::sync::{Arc, RwLock};

use dashmap::DashMap;

use super::Hasher;

/// A two-way map between strings and dense `u32` ids.
///
/// Ids are handed out in order from 0 and never reused; strings are never removed (a full
/// reload builds a fresh interner, which is when churned names are reclaimed).
pub(crate) struct Interner {
    /// Sharded so that concurrent readers of different names do not contend; only the
    /// applier inserts.
    ids: DashMap<Arc<str>, u32, Hasher>,
    /// Id to name, for listing and the digest. A `RwLock` because reads are rare (listing)
    /// and the single writer only appends.
    names: RwLock<Vec<Arc<str>>>,
}

impl Interner {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            ids: DashMap::with_capacity_and_hasher(capacity, Hasher::default()),
            names: RwLock::new(Vec::with_capacity(capacity)),
        }
    }

    /// The id of `name`, if it was ever interned.
    #[inline]
    pub(crate) fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).map(|id| *id)
    }

    /// The id of `name`, interning it if new. Only the single writer (applier or loader)
    /// calls this, so the look-up-then-insert below cannot race with another insert.
    pub(crate) fn intern(&self, name: &str) -> u32 {
        if let Some(id) = self.get(name) {
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        let id = u32::try_from(names.len()).unwrap_or(u32::MAX);
        names.push(Arc::clone(&name));
        drop(names);
        self.ids.insert(name, id);
        id
    }

    /// The name of an id handed out by this interner.
    pub(crate) fn name(&self, id: u32) -> Arc<str> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        names
            .get(id as usize)
            .map_or_else(|| Arc::from(""), Arc::clone)
    }

    /// Runs `f` with the whole id-to-name table, for bulk readers (digest) that would
    /// otherwise take the lock once per row.
    pub(crate) fn with_names<R>(&self, f: impl FnOnce(&[Arc<str>]) -> R) -> R {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        f(&names)
    }
}

#[cfg(test)]
mod tests {
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
}
