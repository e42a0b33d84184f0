//! Names inline in a hash table's bucket: the key of the subject maps.
//!
//! A look-up that finds its bucket compares the key there; a key in the heap is one more
//! dependent miss, and a page walk, before the look-up is done. Names come in two sizes:
//! most ids are short (`user:` and a number), and many products name their users by UUIDs
//! (`user:` and a UUID is 41 bytes). One key size for both either puts UUIDs in the heap
//! (a 24-byte key) or doubles every short name's key (a 48-byte key, a bucket of 80 bytes
//! instead of 56 in the subject map), and a cold check slower either way
//! (benches/README.md, `store`). So the subjects live in two maps, and a name's length
//! picks its map: up to `SHORT` bytes in keys of 24 bytes, longer ones in keys of 48
//! (`LONG` inline, longer still in the heap).
//!
//! The interners' tables keep `CompactString` keys (24 bytes, 24 inline): the same split
//! of the object interner measured no faster with objects named `doc:` and a UUID, whose
//! look-up overlaps the subject's bucket and grants rather than adding to them.

use std::borrow::Borrow;
use std::hash::Hash;

/// Names up to this long go to the short map.
pub(super) const SHORT: usize = 22;
/// Bytes a key of the long map holds inline.
pub(super) const LONG: usize = 46;

/// Whether `name` belongs in the short map.
#[inline]
pub(super) fn is_short(name: &str) -> bool {
    name.len() <= SHORT
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

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use super::super::Hasher;
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
}
