//! The key of names past 24 bytes in the store's tables: up to 46 bytes inline in the
//! bucket.
//!
//! A look-up that finds its bucket compares the key there; a key in the heap is one more
//! dependent miss, and a page walk, before the look-up is done. Names come in two sizes:
//! most ids are short (`user:` and a number), and many products name their users and
//! documents by UUIDs (`user:` and a UUID is 41 bytes). One key size for both either puts
//! UUIDs in the heap (a 24-byte `CompactString`, 24 bytes inline) or doubles every short
//! name's key (a 48-byte key: a bucket of 80 bytes instead of 56 in the subject map), and a
//! cold check slower either way (benches/README.md, `store`). So the subject map and the
//! interners' frozen tables are split in two, and a name's length picks its table: up to
//! `SHORT` bytes in the `CompactString` keys they always had, hashed as before, longer
//! ones in `LongKey`s of 48 bytes (`LONG` inline, longer still in the heap), hashed as
//! bytes.

use std::borrow::Borrow;
use std::hash::Hash;

/// Names up to this long go to the short table: what a `CompactString` holds inline.
pub(super) const SHORT: usize = 24;
/// Bytes a `LongKey` holds inline.
pub(super) const LONG: usize = 46;

/// Whether `name` (a `str` or its bytes) belongs in the short table.
#[inline]
pub(super) fn is_short(name: &(impl AsRef<[u8]> + ?Sized)) -> bool {
    name.as_ref().len() <= SHORT
}

/// A name, inline up to `LONG` bytes, else in the heap. Compared, hashed and borrowed as
/// bytes (`[u8]`): a look-up never checks again that an inline key is UTF-8 (it was, as a
/// `&str`, when the key was made).
#[derive(Clone)]
pub(super) enum LongKey {
    Inline { len: u8, bytes: [u8; LONG] },
    Heap(Box<str>),
}

const _: () = assert!(std::mem::size_of::<LongKey>() == 48);

impl LongKey {
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

impl From<&str> for LongKey {
    fn from(name: &str) -> Self {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= LONG => {
                let mut bytes = [0; LONG];
                bytes[..name.len()].copy_from_slice(name.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Heap(name.into()),
        }
    }
}

impl PartialEq for LongKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for LongKey {}

/// As `[u8]` hashes, so that a look-up by `name.as_bytes()` finds the key.
impl Hash for LongKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Borrow<[u8]> for LongKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for LongKey {
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
            let key = LongKey::from(name.as_str());
            assert_eq!(
                matches!(key, LongKey::Inline { .. }),
                name.len() <= LONG,
                "{name}"
            );
            assert_eq!(key.as_str(), name);
            assert_eq!(key, LongKey::from(name.as_str()));
            assert_eq!(
                hasher.hash_one(&key),
                hasher.hash_one(name.as_bytes()),
                "a look-up by bytes must find {name:?}"
            );
        }
        assert_ne!(LongKey::from("u1"), LongKey::from("u12"));
    }
}
