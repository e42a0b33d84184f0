//! One immutable-by-swap generation of the mirrored permission set.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use md5::{Digest as _, Md5};

use super::arena::{Arena, Packed};
use super::interner::{Interner, Names};
use super::key;
use super::subjects::{Ref, Subjects};
use super::Hasher;

/// `expires_at` of a tuple that never expires.
pub(crate) const NEVER: i64 = i64::MAX;
/// Permission ids below this live in the inline bitset.
const INLINE_BITS: u32 = 64;
/// The wildcard subject and object.
pub(crate) const WILDCARD: &str = "*";
// `check` looks `*` up in the short names' map.
const _: () = assert!(WILDCARD.len() <= key::SHORT);
/// Up to this many grants, a check scans a subject's grants instead of searching them.
const SCAN_GRANTS: usize = 16;
/// A listing's page of fewer objects than this is picked with a heap as the names go by
/// (`State::objects_of`); a longer one from all of them at once.
const PAGE_BY_HEAP: usize = 1_024;
/// Over this many grants in the heap, a subject's list is kept in chunks (`Chunks`); back
/// in one list under half of it.
const CHUNKED_OVER: usize = 4_096;
/// The length of a chunk as built or split: a chunk is split when it reaches twice this.
const CHUNK: usize = 512;
/// A full chunk grows by this many grants at a time, and one with twice this unused
/// shrinks back to this, so that a chunk's memory stays within a quarter of `CHUNK` of
/// its grants'.
const CHUNK_SLACK: usize = CHUNK / 8;

/// The index of `object` among `len` object ids sorted ascending, `id_at(i)` the i-th; for
/// a subject's grants, in the heap or packed. A short list is scanned: the scan's loads are
/// independent and its branch is predicted, where a binary search chains one load on the
/// last (10 grants: -10 % on a check, benches/README.md; 16 ids are one cache line).
#[inline]
pub(super) fn find_object(len: usize, object: u32, id_at: impl Fn(usize) -> u32) -> Option<usize> {
    let i = if len <= SCAN_GRANTS {
        (0..len).find(|&i| id_at(i) >= object)?
    } else {
        first_from(len, object, &id_at)
    };
    (i < len && id_at(i) == object).then_some(i)
}

/// The index of the first of `len` object ids sorted ascending (`id_at(i)` the i-th) that
/// is not below `object`; `len` when all are. A binary search.
#[inline]
pub(super) fn first_from(len: usize, object: u32, id_at: impl Fn(usize) -> u32) -> usize {
    let (mut low, mut high) = (0, len);
    while low < high {
        let middle = (low + high) / 2;
        if id_at(middle) < object {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

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

/// A permission held past the inline bitset, or one that expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    permission: u32,
    expires_at: i64,
}

/// A boxed slice behind one pointer, and no allocation when empty: 8 bytes where a boxed
/// slice takes 16. For what most entries lack (a grant's extra slots, a subject's limits),
/// so the common entry stays small; the rare reader follows one more pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Thin<T>(Option<Box<Box<[T]>>>);

impl<T> Thin<T> {
    /// The bytes it takes in the heap: the slice's pointer and length, and its items.
    fn heap_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |items| {
            std::mem::size_of::<Box<[T]>>() + std::mem::size_of_val::<[T]>(items)
        })
    }
}

impl<T> Default for Thin<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> From<Vec<T>> for Thin<T> {
    fn from(items: Vec<T>) -> Self {
        Self((!items.is_empty()).then(|| Box::new(items.into_boxed_slice())))
    }
}

impl<T> std::ops::Deref for Thin<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], |items| items)
    }
}

/// The permissions a subject holds on one object: 16 bytes, and nothing on the heap in
/// the common case (no expiry, fewer than 64 permission names in the whole set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Grant {
    /// Permanent permissions with id < 64.
    bits: u64,
    /// Everything else: expiring permissions and ids >= 64, sorted. Usually empty.
    extra: Thin<Slot>,
}

impl Grant {
    /// The grant holding `slots`. Allocates only for slots past the inline bitset, so the
    /// loader builds the common grant (a few permanent permissions) without touching the
    /// heap.
    fn from_slots(slots: impl IntoIterator<Item = Slot>) -> Self {
        let mut bits = 0u64;
        let mut extra = Vec::new();
        for slot in slots {
            if slot.expires_at == NEVER && slot.permission < INLINE_BITS {
                bits |= 1 << slot.permission;
            } else {
                extra.push(slot);
            }
        }
        extra.sort_unstable_by_key(|s| s.permission);
        Self {
            bits,
            extra: extra.into(),
        }
    }

    fn is_empty(&self) -> bool {
        self.bits == 0 && self.extra.is_empty()
    }

    fn held(&self) -> Held<'_> {
        Held {
            bits: self.bits,
            extra: &self.extra,
        }
    }
}

/// A grant as a check reads it, wherever it is stored (in the heap, or packed).
#[derive(Clone, Copy)]
struct Held<'a> {
    bits: u64,
    extra: &'a [Slot],
}

impl<'a> Held<'a> {
    #[inline]
    fn allows(self, permission: u32, now: &mut Now) -> bool {
        if permission < INLINE_BITS && self.bits & (1 << permission) != 0 {
            return true;
        }
        self.extra
            .iter()
            .any(|s| s.permission == permission && s.expires_at > now.get())
    }

    /// Every stored (permission, expires_at) pair, expired ones included.
    fn rows(self) -> impl Iterator<Item = (u32, i64)> + 'a {
        // Set bits only, lowest first: a scan of all 64 positions was a quarter of a
        // compaction's time.
        let mut bits = self.bits;
        std::iter::from_fn(move || {
            let permission = bits.trailing_zeros();
            bits &= bits.wrapping_sub(1);
            (permission < INLINE_BITS).then_some((permission, NEVER))
        })
        .chain(self.extra.iter().map(|s| (s.permission, s.expires_at)))
    }

    fn row_count(self) -> u64 {
        u64::from(self.bits.count_ones()) + self.extra.len() as u64
    }
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

/// A subject's grants, sorted by object id. Many subjects hold grants on one object only
/// (their global permissions, say): that one is stored inline, so a check on it reads no
/// further cache line and the subject costs no heap allocation. `One`'s fields are
/// separate (not a pair) so that the enum's tag fits beside the object id: 24 bytes.
/// Several grants are packed in the generation's `Arena` when the full load builds them
/// (`Packed`), and in the heap (`Many`) when the applier writes them or they do not pack;
/// over `CHUNKED_OVER` in the heap, in chunks (`Chunked`), so that a write moves one chunk
/// rather than the rest of the list.
#[derive(Debug, Clone)]
enum Grants {
    One { object: u32, grant: Grant },
    Many(Box<[(u32, Grant)]>),
    Packed(Packed),
    Chunked(Box<Chunks>),
}

impl Default for Grants {
    fn default() -> Self {
        Self::Many(Box::default())
    }
}

impl Grants {
    fn from_vec(mut grants: Vec<(u32, Grant)>) -> Self {
        if grants.len() > CHUNKED_OVER {
            return Self::Chunked(Box::new(Chunks::new(grants)));
        }
        match grants.pop() {
            Some((object, grant)) if grants.is_empty() => Self::One { object, grant },
            Some(last) => {
                grants.push(last);
                Self::Many(grants.into_boxed_slice())
            }
            None => Self::default(),
        }
    }

    /// Puts each of `changes` (sorted by object, each object once; an empty grant removes
    /// the object's) in one pass over the list, and returns how many rows the grants it
    /// replaced held. `set` one change at a time moves the rest of the list each time.
    fn set_many(&mut self, changes: Vec<(u32, Grant)>, arena: &Arena) -> u64 {
        if let Self::Chunked(chunks) = self {
            let removed = chunks.set_many(&changes);
            self.unchunk_if_small();
            return removed;
        }
        let (merged, removed) = merge(&std::mem::take(self).into_vec(arena), changes);
        *self = Self::from_vec(merged);
        removed
    }

    /// Chunked grants back in one slice once under half of `CHUNKED_OVER`.
    fn unchunk_if_small(&mut self) {
        if let Self::Chunked(chunks) = self {
            if chunks.len < CHUNKED_OVER / 2 {
                *self = Self::Many(chunks.chunks.concat().into_boxed_slice());
            }
        }
    }

    /// The grants in the heap, read from `arena` if they are packed there.
    fn into_vec(self, arena: &Arena) -> Vec<(u32, Grant)> {
        match self {
            Self::One { object, grant } => vec![(object, grant)],
            Self::Many(many) => many.into_vec(),
            Self::Chunked(chunks) => chunks.chunks.concat(),
            Self::Packed(list) => arena
                .iter(list)
                .map(|(object, bits)| {
                    let extra = Thin::default();
                    (object, Grant { bits, extra })
                })
                .collect(),
        }
    }

    /// The grant on `object`; `arena` is the generation's, where packed grants are.
    #[inline]
    fn get<'a>(&'a self, object: u32, arena: &'a Arena) -> Option<Held<'a>> {
        match self {
            Self::One { object: o, grant } => (*o == object).then(|| grant.held()),
            Self::Packed(list) => arena
                .get(*list, object)
                .map(|bits| Held { bits, extra: &[] }),
            Self::Many(many) => {
                find_object(many.len(), object, |i| many[i].0).map(|i| many[i].1.held())
            }
            Self::Chunked(chunks) => chunks.get(object).map(Grant::held),
        }
    }

    /// Every (object id, grant), by object id.
    fn iter<'a>(&'a self, arena: &'a Arena) -> impl Iterator<Item = (u32, Held<'a>)> {
        self.iter_from(0, arena)
    }

    /// The grants from `object` on, by object id: `iter`'s, those before `object` found by
    /// a binary search rather than read.
    fn iter_from<'a>(
        &'a self,
        object: u32,
        arena: &'a Arena,
    ) -> impl Iterator<Item = (u32, Held<'a>)> {
        let (one, many, chunks, packed) = match self {
            Self::One { object: o, grant } => (
                (*o >= object).then(|| (*o, grant.held())),
                &[][..],
                &[][..],
                None,
            ),
            Self::Many(many) => {
                let from = first_from(many.len(), object, |i| many[i].0);
                (None, &many[from..], &[][..], None)
            }
            // From the chunk `object` is in: its grants before `object` are skipped below.
            Self::Chunked(chunks) => (
                None,
                &[][..],
                &chunks.chunks[chunks.chunk_of(object)..],
                None,
            ),
            Self::Packed(list) => (None, &[][..], &[][..], Some(arena.iter_from(*list, object))),
        };
        one.into_iter()
            .chain(
                many.iter()
                    .chain(chunks.iter().flatten())
                    .map(|(object, grant)| (*object, grant.held())),
            )
            .chain(
                packed
                    .into_iter()
                    .flatten()
                    .map(|(object, bits)| (object, Held { bits, extra: &[] })),
            )
            .skip_while(move |(o, _)| *o < object)
    }

    /// How many objects the subject holds grants on.
    fn len(&self) -> usize {
        match self {
            Self::One { .. } => 1,
            Self::Many(many) => many.len(),
            Self::Packed(list) => list.len(),
            Self::Chunked(chunks) => chunks.len,
        }
    }

    /// Puts `grant` on `object` (an empty grant removes it) and returns how many rows the
    /// grant it replaced held. Packed grants move to the heap.
    fn set(&mut self, object: u32, grant: Grant, arena: &Arena) -> u64 {
        if let Self::One {
            object: o,
            grant: g,
        } = self
        {
            if *o == object && !grant.is_empty() {
                return std::mem::replace(g, grant).held().row_count();
            }
        }
        if let Self::Chunked(chunks) = self {
            let old = chunks.set(object, grant);
            self.unchunk_if_small();
            return old.map_or(0, |old| old.held().row_count());
        }
        let mut grants = std::mem::take(self).into_vec(arena);
        let old = match grants.binary_search_by_key(&object, |(o, _)| *o) {
            Ok(i) if grant.is_empty() => Some(grants.remove(i).1),
            Ok(i) => Some(std::mem::replace(&mut grants[i].1, grant)),
            Err(_) if grant.is_empty() => None,
            Err(i) => {
                grants.insert(i, (object, grant));
                None
            }
        };
        *self = Self::from_vec(grants);
        old.map_or(0, |old| old.held().row_count())
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Many(many) if many.is_empty())
    }

    /// The bytes of the heap these grants take, their list and each grant's expiring
    /// slots: what a loaded entry leaves behind, unread, once its subject moves to the
    /// written tier.
    fn heap_bytes(&self) -> usize {
        const GRANT: usize = std::mem::size_of::<(u32, Grant)>();
        let slots = |grants: &[(u32, Grant)]| -> usize {
            grants.iter().map(|(_, g)| g.extra.heap_bytes()).sum()
        };
        match self {
            Self::Many(many) => many.len() * GRANT + slots(many),
            Self::Chunked(chunks) => chunks
                .chunks
                .iter()
                .map(|c| c.capacity() * GRANT + slots(c))
                .sum(),
            Self::One { grant, .. } => grant.extra.heap_bytes(),
            Self::Packed(_) => 0,
        }
    }

    /// The bytes of the generation's arena these grants take: what a `set` leaves unused
    /// there (packed grants move to the heap).
    fn packed_bytes(&self) -> usize {
        match self {
            Self::Packed(list) => list.bytes(),
            Self::One { .. } | Self::Many(_) | Self::Chunked(_) => 0,
        }
    }
}

/// `grants` (sorted by object) with each of `changes` (sorted by object, each object once;
/// an empty grant removes the object's) put in, in one pass, into a new list (the runs
/// between changes copied whole, ~2 ns a grant: an element at a time through a peekable
/// iterator took 8 ns); and how many rows the grants replaced held.
fn merge(
    grants: &[(u32, Grant)],
    changes: impl IntoIterator<Item = (u32, Grant)>,
) -> (Vec<(u32, Grant)>, u64) {
    let changes = changes.into_iter();
    let mut merged = Vec::with_capacity(grants.len() + changes.size_hint().0);
    let mut removed = 0;
    let mut at = 0;
    for (object, grant) in changes {
        let before = at + grants[at..].partition_point(|(o, _)| *o < object);
        merged.extend_from_slice(&grants[at..before]);
        at = before;
        if let Some((_, replaced)) = grants.get(at).filter(|(o, _)| *o == object) {
            removed += replaced.held().row_count();
            at += 1;
        }
        if !grant.is_empty() {
            merged.push((object, grant));
        }
    }
    merged.extend_from_slice(&grants[at..]);
    (merged, removed)
}

/// `grants` cut into chunks of `CHUNK` (the last may be shorter), pushed onto `chunks`.
fn cut(grants: Vec<(u32, Grant)>, chunks: &mut Vec<Vec<(u32, Grant)>>) {
    let mut grants = grants.into_iter();
    loop {
        let chunk: Vec<_> = grants.by_ref().take(CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
}

/// A large subject's grants in the heap (over `CHUNKED_OVER`), sorted by object id, in
/// chunks of up to `2 * CHUNK - 1`, none empty. In one list, a write moved the rest of it:
/// ~0.5 ms a write at a million objects, against 4 to 5 us in chunks (benches/README.md,
/// "Writes to one large subject").
#[derive(Debug, Clone)]
struct Chunks {
    /// Each chunk's first object id: a look-up searches these, then one chunk.
    firsts: Vec<u32>,
    chunks: Vec<Vec<(u32, Grant)>>,
    /// Grants in all chunks.
    len: usize,
    /// Changed by every change: `Merged` made from one version is put only into it.
    version: u64,
}

/// One chunk of `Chunks`: grants sorted by object id.
type Chunk = Vec<(u32, Grant)>;

/// The chunks a run of changes touches, merged with them from a read of `Chunks`
/// (`Chunks::merged`), to be put in later (`Chunks::put`).
#[derive(Debug)]
struct Merged {
    /// The version of `Chunks` they were made from.
    version: u64,
    /// Each touched chunk's index and what replaces it (none, one, or more when it grew
    /// to `2 * CHUNK`), in order.
    replacements: Vec<(usize, Vec<Chunk>)>,
    /// Rows the replaced grants held.
    removed: u64,
}

impl Chunks {
    /// `grants` (sorted by object id) in chunks of `CHUNK`.
    fn new(grants: Vec<(u32, Grant)>) -> Self {
        let mut chunks = Vec::with_capacity(grants.len().div_ceil(CHUNK));
        cut(grants, &mut chunks);
        Self::of(chunks)
    }

    fn of(chunks: Vec<Vec<(u32, Grant)>>) -> Self {
        Self {
            firsts: chunks.iter().map(|chunk| chunk[0].0).collect(),
            len: chunks.iter().map(Vec::len).sum(),
            chunks,
            version: 0,
        }
    }

    /// `Grants::set_many`: each chunk with changes merged with them (and cut again if it
    /// grew to `2 * CHUNK`), the others left as they are.
    fn set_many(&mut self, changes: &[(u32, Grant)]) -> u64 {
        let merged = self.merged(changes);
        let removed = merged.removed;
        drop(self.put(merged));
        removed
    }

    /// The chunks `changes` (sorted by object, each object once) touch, merged with them,
    /// made from `&self`: the writer makes them under the subject's read lock, which
    /// checks share, and takes the write lock only to put them in.
    fn merged(&self, changes: &[(u32, Grant)]) -> Merged {
        let mut changes = changes.iter().cloned().peekable();
        let mut removed = 0;
        let mut replacements = Vec::new();
        for (c, chunk) in self.chunks.iter().enumerate() {
            // This chunk's changes: those before the next chunk's first object.
            let next = self.firsts.get(c + 1).copied();
            let mine = |(o, _): &(u32, Grant)| next.is_none_or(|next| *o < next);
            if !changes.peek().is_some_and(mine) {
                continue;
            }
            let changed = std::iter::from_fn(|| changes.next_if(mine));
            let (mut merged, gone) = merge(chunk, changed);
            removed += gone;
            let mut pieces = Vec::new();
            if merged.len() >= 2 * CHUNK {
                cut(merged, &mut pieces);
            } else if !merged.is_empty() {
                merged.shrink_to(merged.len() + CHUNK_SLACK);
                pieces.push(merged);
            }
            replacements.push((c, pieces));
        }
        Merged {
            version: self.version,
            replacements,
            removed,
        }
    }

    /// Puts in the chunks `merged` made, if they were made from this version (else
    /// gives them back); returns the chunks they replace, for the caller to drop once it
    /// has let go of the lock.
    fn put(&mut self, merged: Merged) -> Result<Vec<Chunk>, Merged> {
        if merged.version != self.version {
            return Err(merged);
        }
        let mut replaced = Vec::with_capacity(merged.replacements.len());
        let mut replacements = merged.replacements.into_iter().peekable();
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (c, chunk) in std::mem::take(&mut self.chunks).into_iter().enumerate() {
            match replacements.next_if(|(r, _)| *r == c) {
                Some((_, pieces)) => {
                    replaced.push(chunk);
                    chunks.extend(pieces);
                }
                None => chunks.push(chunk),
            }
        }
        let version = self.version.wrapping_add(1);
        *self = Self::of(chunks);
        self.version = version;
        Ok(replaced)
    }

    /// The chunk `object` is in, or goes in: the last whose first object is not after
    /// it (the first chunk for an object before every other).
    fn chunk_of(&self, object: u32) -> usize {
        self.firsts
            .partition_point(|&first| first <= object)
            .saturating_sub(1)
    }

    #[inline]
    fn get(&self, object: u32) -> Option<&Grant> {
        let chunk = self.chunks.get(self.chunk_of(object))?;
        find_object(chunk.len(), object, |i| chunk[i].0).map(|i| &chunk[i].1)
    }

    /// Puts `grant` on `object` (an empty grant removes it); returns the grant replaced.
    fn set(&mut self, object: u32, grant: Grant) -> Option<Grant> {
        self.version = self.version.wrapping_add(1);
        let c = self.chunk_of(object);
        let chunk = &mut self.chunks[c];
        match chunk.binary_search_by_key(&object, |(o, _)| *o) {
            Ok(i) if grant.is_empty() => {
                let (_, old) = chunk.remove(i);
                self.len -= 1;
                if chunk.capacity() - chunk.len() > 2 * CHUNK_SLACK {
                    chunk.shrink_to(chunk.len() + CHUNK_SLACK);
                }
                if chunk.is_empty() {
                    self.chunks.remove(c);
                    self.firsts.remove(c);
                } else if i == 0 {
                    self.firsts[c] = chunk[0].0;
                }
                Some(old)
            }
            Ok(i) => Some(std::mem::replace(&mut chunk[i].1, grant)),
            Err(_) if grant.is_empty() => None,
            Err(i) => {
                if chunk.len() == chunk.capacity() {
                    // Not the doubling `insert` would do: a chunk written once would hold
                    // twice its grants' memory.
                    chunk.reserve_exact(CHUNK_SLACK);
                }
                chunk.insert(i, (object, grant));
                self.len += 1;
                if i == 0 {
                    self.firsts[c] = object;
                }
                if chunk.len() >= 2 * CHUNK {
                    let tail = chunk.split_off(CHUNK);
                    chunk.shrink_to(CHUNK + CHUNK_SLACK);
                    self.firsts.insert(c + 1, tail[0].0);
                    self.chunks.insert(c + 1, tail);
                }
                None
            }
        }
    }
}

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
fn fixed_object_id(object: &str) -> Option<u32> {
    match object {
        "" => Some(GLOBAL_ID),
        WILDCARD => Some(WILDCARD_ID),
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

    fn get(&mut self) -> i64 {
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

    /// The objects on which `subject` holds `permission` (never the global object; `*`
    /// when it is held on every object), wildcards and expiry applied, sorted by name: of
    /// those named after `after` (all of them when it is empty), the first `limit`.
    ///
    /// A page is found one of three ways (`Plan`). A subject that holds a good share of
    /// all objects is listed by walking every object's name in order from `after`
    /// (`object_order`) and keeping those it or `*` holds, until the page is full: the
    /// page costs its length over that share, whatever the subject's size. Whether it
    /// holds each is looked up in its grants and `*`'s (`page_by_look_up`), or, when the
    /// walk is long (the whole listing), in a bitset of them made first
    /// (`page_by_bits`). Others are listed by a pass over their grants and `*`'s
    /// (`page_by_pass`), which picks the page among the names after `after` (only those
    /// are cloned, and only the page's sorted). The cheapest is taken, as `Plan::of`
    /// expects them to cost; a walk that looks up more than the pass would cost is given
    /// up for the pass.
    pub(crate) fn objects_of(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
        now: &mut Now,
    ) -> Listing {
        self.objects_within(subject, permission, after, limit, now, None)
            .unwrap_or_default()
    }

    /// `objects_of`, within `bound` if there is one (in `Plan::of`'s tenths of a step);
    /// `None`, found at once or after about that much work, when it is not. With
    /// `QUICK_LISTING`, a quick listing: one that takes some tens of microseconds at most;
    /// what is not quick is better done off a thread that answers checks. Within a bound
    /// is a plan expected to cost no more for the subject's grant count, `*`'s and the
    /// names' (a step a name listed included, for its copy and its JSON), and that needs
    /// no sort of the names first; a walk that looks up more is given up, not sent to the
    /// pass.
    pub(crate) fn objects_within(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
        now: &mut Now,
        bound: Option<usize>,
    ) -> Option<Listing> {
        let Some(permission) = self.permissions.get(permission) else {
            return Some(Listing::default());
        };
        // `*`'s grants that hold the permission, which the plans expect to list.
        let public = match subject {
            WILDCARD => 0,
            _ => self.public_holding(permission) as usize,
        };
        let held = self.subjects.get(subject).map_or(0, |e| e.grants.len()) + public;
        let lists = if public == 0 { 1 } else { 2 };
        let built = self.objects.built() as usize;
        let (mut plan, cost) = Plan::of(held, lists, built, limit);
        if let Some(bound) = bound {
            let cost = cost.saturating_add(10 * limit.min(held));
            let sorted = plan == Plan::Pass || self.object_order.get().is_some();
            if cost > bound || !sorted {
                return None;
            }
            if let Plan::LookUp { budget } = &mut plan {
                *budget = (*budget).min(bound / (20 * lists));
            }
        }
        let listed = Listed {
            subject,
            public: public > 0,
            permission,
            after,
            limit,
        };
        let walked = match plan {
            Plan::Pass => return Some(self.page_by_pass(listed, now)),
            Plan::LookUp { budget } => self.page_by_look_up(listed, budget, now),
            Plan::Bits => Some(self.page_by_bits(listed, now)),
        };
        #[cfg(test)]
        tests::LISTED.with(|listed| listed.borrow_mut().push((plan, walked.is_some())));
        match walked {
            None if bound.is_none() => Some(self.page_by_pass(listed, now)),
            walked => walked,
        }
    }

    /// A page by a walk of the names in order from `after`, each looked up in the
    /// subject's grants and `*`'s; `None` when the walk is given up (`walk`: at `budget`
    /// names, or sooner at a pace that would pass it).
    fn page_by_look_up(&self, listed: Listed<'_>, budget: usize, now: &mut Now) -> Option<Listing> {
        // Sorted once a generation, by the first listing that walks it.
        let order = self.object_order();
        let holds = |grants: Option<&Grants>, o: u32, now: &mut Now| {
            grants
                .and_then(|g| g.get(o, &self.packed))
                .is_some_and(|g| g.allows(listed.permission, now))
        };
        let all = self.objects.names();
        let mut walk = Walk::new(listed.limit.saturating_add(1), budget);
        // The locks are let go and taken again every `WALK_CHUNK` names, so that the
        // writer waits at most that long; the walk goes on where it stopped.
        for chunk in from_after(order, all, listed.after).chunks(WALK_CHUNK) {
            let full = self.with_grants(listed, |own, public| {
                walk.go(chunk, |o| holds(own, o, now) || holds(public, o, now))
            })?;
            if full {
                break;
            }
        }
        let since = self.allowed_since(listed, now);
        Some(page_of_walk(
            all,
            walk.found,
            since,
            listed.after,
            listed.limit,
        ))
    }

    /// Calls `f` with the subject's grants and, when `*` may hold the permission, `*`'s:
    /// under the subject's shard lock, or with `*`'s under every shard's, as a batch
    /// reads them (a second read lock on a shard this thread holds could wait behind a
    /// queued writer for ever). A write under way goes first (`Subjects::give_way`): a
    /// walk takes the locks again every chunk.
    fn with_grants<R>(
        &self,
        listed: Listed<'_>,
        f: impl FnOnce(Option<&Grants>, Option<&Grants>) -> R,
    ) -> R {
        let subject = std::iter::once(listed.subject);
        if listed.public {
            return self.subjects.read_all(subject, |entries, entry_of| {
                let public = entry_of(WILDCARD).map(SubjectEntry::grants);
                f(entries[0].map(SubjectEntry::grants), public)
            });
        }
        self.subjects.give_way();
        let entry = self.subjects.get(listed.subject);
        f(entry.as_deref().map(SubjectEntry::grants), None)
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

    /// The objects `subject` holds `permission` on from id `from` on, the global object
    /// left out, sorted by id (`grants_in_runs`).
    fn allowed_from(&self, subject: &str, from: u32, permission: u32, now: &mut Now) -> Vec<u32> {
        let mut ids = Vec::new();
        self.grants_in_runs(subject, from, |o, held| {
            if o != GLOBAL_ID && held.allows(permission, now) {
                ids.push(o);
            }
        });
        ids
    }

    /// The objects named since the generation was built that the subject or `*` holds the
    /// permission on, which the order of names does not have.
    fn allowed_since(&self, listed: Listed<'_>, now: &mut Now) -> Vec<u32> {
        let built = self.objects.built();
        let own = self.allowed_from(listed.subject, built, listed.permission, now);
        match listed.public {
            true => merge_sorted(
                own,
                &self.allowed_from(WILDCARD, built, listed.permission, now),
            ),
            false => own,
        }
    }

    /// A page by a walk of the names in order from `after`, each looked up in a bitset of
    /// the subject's grants and `*`'s made first.
    fn page_by_bits(&self, listed: Listed<'_>, now: &mut Now) -> Listing {
        let order = self.object_order();
        let built = self.objects.built();
        let mut bits = vec![0_u64; (built as usize).div_ceil(64)];
        let subjects = if listed.public {
            &[listed.subject, WILDCARD][..]
        } else {
            &[listed.subject][..]
        };
        for s in subjects {
            self.grants_in_runs(s, 0, |o, held| {
                if o < built && o != GLOBAL_ID && held.allows(listed.permission, now) {
                    bits[o as usize / 64] |= 1 << (o % 64);
                }
            });
        }
        let since = self.allowed_since(listed, now);
        let all = self.objects.names();
        let holds = |o: u32| bits[o as usize / 64] & (1 << (o % 64)) != 0;
        let walked = walk(
            from_after(order, all, listed.after),
            listed.limit.saturating_add(1),
            usize::MAX,
            holds,
        );
        page_of_walk(
            all,
            walked.unwrap_or_default(),
            since,
            listed.after,
            listed.limit,
        )
    }

    /// A page by a pass over the subject's grants and `*`'s.
    fn page_by_pass(&self, listed: Listed<'_>, now: &mut Now) -> Listing {
        let public = match listed.public {
            true => self.allowed_from(WILDCARD, 0, listed.permission, now),
            false => Vec::new(),
        };
        let own = self.allowed_from(listed.subject, 0, listed.permission, now);
        let all = self.objects.names();
        let ids = merge_sorted(own, &public);
        let named = ids
            .into_iter()
            .map(|o| (all.name(o), o))
            .filter(|&(name, _)| name > listed.after);
        if listed.limit < PAGE_BY_HEAP {
            let (mut names, more) = page_by_heap(named, listed.limit);
            names.sort_unstable();
            return listing(all, names, more);
        }
        let mut names: Vec<(&str, u32)> = named.collect();
        let more = names.len() > listed.limit;
        if more {
            // The `limit` first names, in no order, then sorted: a page of a long
            // listing sorts only itself.
            names.select_nth_unstable(listed.limit);
            names.truncate(listed.limit);
        }
        names.sort_unstable();
        listing(all, names, more)
    }

    /// The ids of the objects named when the generation was built, the global object's
    /// excepted, sorted by name: sorted at the first call, which every other waits for.
    fn object_order(&self) -> &[u32] {
        self.object_order
            .get_or_init(|| self.objects.built_by_name(GLOBAL_ID + 1))
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

    /// Every row `subject` holds on `object`, expired ones included: what `set_grant`
    /// was last given for the key, in permission order.
    pub(crate) fn grant_rows(&self, subject: &str, object: &str) -> Vec<TupleRow> {
        let Some(object) = self.objects.get(object) else {
            return Vec::new();
        };
        let Some(entry) = self.subjects.get(subject) else {
            return Vec::new();
        };
        let Some(held) = entry.grants.get(object, &self.packed) else {
            return Vec::new();
        };
        held.rows()
            .map(|(p, expires_at)| TupleRow {
                permission: self.permissions.name(p).to_string(),
                expires_at: (expires_at != NEVER).then_some(expires_at),
            })
            .collect()
    }

    /// `subject`'s own limits (not those of `*`), as `set_limits` was last given them.
    pub(crate) fn limit_rows(&self, subject: &str) -> Vec<(String, i64)> {
        self.subjects.get(subject).map_or_else(Vec::new, |entry| {
            entry
                .limits
                .iter()
                .map(|&(n, value)| (self.limit_names.name(n).to_string(), value))
                .collect()
        })
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

    /// The order-independent digest of every stored row, the same value as the SQL
    /// function `permd.digest()`: `<tuples>:<limits>:<sum of row hashes, 16 hex digits>`.
    pub(crate) fn digest(&self) -> String {
        let mut total = Digest::default();
        self.for_each_subject_digest(|_, digest| total.add(digest));
        total.to_string()
    }

    /// The digest of each subject's rows, as `permd.subject_digests()` computes them.
    pub(crate) fn subject_digests(&self) -> Vec<(String, String)> {
        let mut digests = Vec::with_capacity(self.subjects.len());
        self.for_each_subject_digest(|subject, digest| {
            digests.push((subject.to_owned(), digest.to_string()));
        });
        digests
    }

    /// Calls `f` with each subject and the digest of its rows. A subject of more grants
    /// than `GRANTS_RUN` is put aside, and its rows read later in runs and hashed outside
    /// the lock (`rows_in_runs`): hashing a million rows under its shard lock held the
    /// writer for a quarter of a second.
    fn for_each_subject_digest(&self, mut f: impl FnMut(&str, Digest)) {
        let mut line = Vec::with_capacity(256);
        let objects = self.objects.names();
        let permissions = self.permissions.names();
        let limit_names = self.limit_names.names();
        let add_row = |line: &mut Vec<u8>,
                       digest: &mut Digest,
                       subject: &str,
                       (o, p, expires_at): (u32, u32, i64)| {
            line.clear();
            push_fields(line, &["t", subject, objects.name(o), permissions.name(p)]);
            line.push(0x1f);
            if expires_at != NEVER {
                line.extend_from_slice(expires_at.to_string().as_bytes());
            }
            digest.sum = digest.sum.wrapping_add(row_hash(line));
            digest.tuples += 1;
        };
        let add_limits =
            |line: &mut Vec<u8>, digest: &mut Digest, subject: &str, limits: &[(u32, i64)]| {
                for &(n, value) in limits {
                    line.clear();
                    push_fields(line, &["l", subject, limit_names.name(n)]);
                    line.push(0x1f);
                    line.extend_from_slice(value.to_string().as_bytes());
                    digest.sum = digest.sum.wrapping_add(row_hash(line));
                    digest.limits += 1;
                }
            };
        let mut large = Vec::new();
        self.subjects.for_each(|subject, entry| {
            if entry.grants.len() > GRANTS_RUN {
                large.push(subject.to_owned());
                return;
            }
            let mut digest = Digest::default();
            for (o, held) in entry.grants.iter(&self.packed) {
                for (p, expires_at) in held.rows() {
                    add_row(&mut line, &mut digest, subject, (o, p, expires_at));
                }
            }
            add_limits(&mut line, &mut digest, subject, &entry.limits);
            f(subject, digest);
        });
        for subject in large {
            let mut digest = Digest::default();
            self.rows_in_runs(&subject, |run| {
                for &row in run {
                    add_row(&mut line, &mut digest, &subject, row);
                }
            });
            if let Some(entry) = self.subjects.get(&subject) {
                add_limits(&mut line, &mut digest, &subject, &entry.limits);
            }
            if digest.tuples > 0 || digest.limits > 0 {
                f(&subject, digest);
            }
        }
    }

    /// A new generation holding the same rows, built as a full load builds one, from
    /// memory: the names no row uses any more are gone, every subject is in the loaded
    /// tier and every list packed that can be. What a compaction swaps in
    /// (`Store::finish_compaction`). The writer may go on meanwhile: each subject is read
    /// as it is at its turn (`Subjects::for_each`, which holds a shard's lock for one
    /// subject's turn at most; a subject of more than `GRANTS_RUN` grants in the heap is
    /// read after the walk, in runs), and each name is looked up once, through a map of
    /// old ids to new.
    ///
    /// The walk goes in hash order, and each packed list read there would be a miss in
    /// a random place of the arena. So a packed subject's turn only notes where its list
    /// is (the arena is read-only: the list stays as the turn saw it) and copies its
    /// name; those lists are read later, `REBUILD_BATCH` at a time, each batch in the
    /// order its lists lie in the arena. A batch bounds what is held aside.
    pub(crate) fn rebuilt(&self) -> State {
        self.rebuilt_by(REBUILD_BATCH)
    }

    /// `rebuilt`, with the packed lists read `batch` at a time.
    fn rebuilt_by(&self, batch: usize) -> State {
        let mut rebuild = Rebuild {
            state: self,
            builder: StateBuilder::new(),
            objects_now: Vec::new(),
            permissions_now: Vec::new(),
            rows: Vec::new(),
            packed: Vec::new(),
            names: String::new(),
        };
        // Subjects of more grants than one run, read after the walk, in runs.
        let mut large = Vec::new();
        self.subjects.for_each(|subject, entry| {
            match entry.grants {
                ref grants if grants.len() > GRANTS_RUN && !matches!(grants, Grants::Packed(_)) => {
                    large.push(subject.to_owned());
                }
                Grants::Packed(list) => {
                    let names = &mut rebuild.names;
                    rebuild
                        .packed
                        .push((list, names.len()..names.len() + subject.len()));
                    names.push_str(subject);
                    if rebuild.packed.len() >= batch {
                        rebuild.packed_subjects();
                    }
                }
                ref grants => rebuild.subject(subject, grants.iter(&self.packed)),
            }
            for &(n, value) in entry.limits.iter() {
                rebuild
                    .builder
                    .limit(subject, &self.limit_names.name(n), value);
            }
        });
        rebuild.packed_subjects();
        let mut rows = Vec::new();
        for subject in large {
            self.rows_in_runs(&subject, |run| rows.extend_from_slice(run));
            rebuild.subject_rows(&subject, rows.drain(..));
        }
        rebuild.builder.finish()
    }

    /// Every stored row of `subject`, expired ones included: (object, permission,
    /// expires_at) sorted, and limits. For `permd verify`.
    pub(crate) fn rows_of(&self, subject: &str) -> StoredRows {
        let mut rows = StoredRows::default();
        let (objects, permissions) = (self.objects.names(), self.permissions.names());
        self.rows_in_runs(subject, |run| {
            for &(o, p, expires_at) in run {
                let expires_at = (expires_at != NEVER).then_some(expires_at);
                let (object, permission) = (objects.name(o), permissions.name(p));
                rows.tuples
                    .push((object.to_owned(), permission.to_owned(), expires_at));
            }
        });
        if let Some(entry) = self.subjects.get(subject) {
            for (n, value) in entry.limits.iter() {
                rows.limits
                    .push((self.limit_names.name(*n).to_string(), *value));
            }
        }
        rows.tuples.sort();
        rows.limits.sort();
        rows
    }
}

/// How many packed subjects a rebuild holds aside before it reads their lists
/// (`State::rebuilt`): 32 bytes each and their names, ~11 MB with short names. As fast as
/// four times as many at 10M and 50M tuples, whose ~40 MB raised a compaction's peak
/// above a reload's (benches/README.md, `load`).
const REBUILD_BATCH: usize = 1 << 18;

/// A generation being rebuilt from `state` (`State::rebuilt`): the builder, and the old
/// generation's object and permission ids mapped to the new one's as they are met.
struct Rebuild<'s> {
    state: &'s State,
    builder: StateBuilder,
    objects_now: Vec<u32>,
    permissions_now: Vec<u32>,
    /// One subject's rows, reused from subject to subject.
    rows: Vec<(u32, Slot)>,
    /// Packed subjects met and not read yet: each one's list, and where its name is in
    /// `names`.
    packed: Vec<(Packed, Range<usize>)>,
    names: String,
}

impl Rebuild<'_> {
    /// Adds the packed subjects met so far, their lists read in arena order.
    fn packed_subjects(&mut self) {
        let state = self.state;
        let mut packed = std::mem::take(&mut self.packed);
        let mut names = std::mem::take(&mut self.names);
        packed.sort_unstable_by_key(|(list, _)| *list);
        for (list, name) in packed.drain(..) {
            let grants = state
                .packed
                .iter(list)
                .map(|(object, bits)| (object, Held { bits, extra: &[] }));
            self.subject(&names[name], grants);
        }
        names.clear();
        // Kept for the next batch, at their size.
        (self.packed, self.names) = (packed, names);
    }

    /// Adds `subject`'s `grants` (old ids) as one run.
    fn subject<'g>(&mut self, subject: &str, grants: impl Iterator<Item = (u32, Held<'g>)>) {
        let rows = grants.flat_map(|(o, grant)| grant.rows().map(move |(p, e)| (o, p, e)));
        self.subject_rows(subject, rows);
    }

    /// `subject`'s rows, (object, permission, expires_at) in the old generation's ids, in
    /// object order, as one run of the builder.
    fn subject_rows(&mut self, subject: &str, rows: impl Iterator<Item = (u32, u32, i64)>) {
        fn now_id(ids: &mut Vec<u32>, old: u32, intern: impl FnOnce() -> u32) -> u32 {
            let at = old as usize;
            if ids.len() <= at {
                ids.resize(at + 1, u32::MAX);
            }
            if ids[at] == u32::MAX {
                ids[at] = intern();
            }
            ids[at]
        }
        let (old, builder) = (self.state, &mut self.builder);
        for (o, p, expires_at) in rows {
            let object = now_id(&mut self.objects_now, o, || {
                let name = old.objects.name(o);
                fixed_object_id(&name).unwrap_or_else(|| builder.state.objects.intern_mut(&name))
            });
            let permission = now_id(&mut self.permissions_now, p, || {
                builder
                    .state
                    .permissions
                    .intern_mut(&old.permissions.name(p))
            });
            let slot = Slot {
                permission,
                expires_at,
            };
            self.rows.push((object, slot));
        }
        if !self.rows.is_empty() {
            builder.push_run(subject, &mut self.rows);
        }
    }
}

/// The first `limit` of `named` (in no order), and whether there were more: the first
/// `limit` kept in a heap as the others go by, most of them turned away by one comparison
/// with its largest, where a selection among all of them compared each several times (a
/// page of 100 of 100,000 objects: 0.80 against 1.19 ms, benches/README.md).
fn page_by_heap<'n>(
    named: impl Iterator<Item = (&'n str, u32)>,
    limit: usize,
) -> (Vec<(&'n str, u32)>, bool) {
    let mut page: BinaryHeap<(&str, u32)> = BinaryHeap::with_capacity(limit);
    let mut more = false;
    for named in named {
        if page.len() < limit {
            page.push(named);
        } else {
            more = true;
            if let Some(mut largest) = page.peek_mut() {
                if named < *largest {
                    *largest = named;
                }
            }
        }
    }
    (page.into_vec(), more)
}

/// What a listing asks (`State::objects_of`), for the way it is found.
#[derive(Clone, Copy)]
struct Listed<'a> {
    subject: &'a str,
    /// Whether `*`'s grants may hold the permission (`State::public_held`); never for `*`.
    public: bool,
    permission: u32,
    after: &'a str,
    limit: usize,
}

/// How a listing finds its page (`State::objects_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// A pass over the subject's grants.
    Pass,
    /// A walk of the names in order, each looked up among the subject's grants; given up
    /// for the pass after `budget` look-ups.
    LookUp { budget: usize },
    /// A walk of the names in order, each looked up in a bitset of the subject's grants.
    Bits,
}

impl Plan {
    /// The plan expected to cost least for a subject that holds grants on `held` of the
    /// `objects` names, for a page of `limit`. Costs in tenths of a step of the pass (a
    /// grant read and its name compared with the cursor): the pass takes `held` steps and
    /// sorts its page; a walk is expected to look at `objects / held` names for each one
    /// it keeps, and stops at `limit` and one more; a name's look-up costs two steps in
    /// each of `lists` lists of grants (the subject's, and `*`'s when it holds any), a
    /// bit set or read a tenth of one. A look-up walk's budget is the pass's cost: a
    /// subject that holds many objects but few with the permission asked sends it back
    /// to the pass, at most doubling the pass's time. With the plan, its expected cost.
    fn of(held: usize, lists: usize, objects: usize, limit: usize) -> (Self, usize) {
        if held == 0 {
            return (Self::Pass, 0);
        }
        let page = limit.min(held);
        let pass = 10 * held.saturating_add(page.saturating_mul(page.max(1).ilog2() as usize));
        let walked = (limit.saturating_add(1).saturating_mul(objects) / held).min(objects);
        let look_up = walked.saturating_mul(20 * lists);
        let bits = held.saturating_add(walked);
        if look_up <= bits && look_up < pass {
            (
                Self::LookUp {
                    budget: pass / (20 * lists),
                },
                look_up,
            )
        } else if bits < pass {
            (Self::Bits, bits)
        } else {
            (Self::Pass, pass)
        }
    }
}

/// The bound of a quick listing (`Store::quick_objects_of`), in `Plan::of`'s
/// tenths of a step: 2,000 steps of the pass, some tens of microseconds.
pub(crate) const QUICK_LISTING: usize = 20_000;

/// Names a walk probes before it judges its pace (`walk`).
const WALK_PATIENCE: usize = 1_024;

/// The first `want` of `order` (ids in name order) that `holds` keeps, or all of them if
/// fewer; `None` once `budget` have been probed without either, or sooner: past
/// `WALK_PATIENCE` probes, once at the pace so far the page would take more than
/// `budget`. The plan's estimate takes every grant of the subject to hold the permission
/// asked: a subject of many grants, few of them with it, walks in vain. Where `*` held a
/// million grants of another permission (before they were counted by permission), a
/// walk for a subject of ten went through its whole budget (250,000 names, 16 ms) before
/// the pass, against 2.7 ms with this rule (benches/README.md, "Listing a subject's
/// objects").
fn walk(
    order: &[u32],
    want: usize,
    budget: usize,
    holds: impl FnMut(u32) -> bool,
) -> Option<Vec<u32>> {
    let mut walk = Walk::new(want, budget);
    walk.go(order, holds)?;
    Some(walk.found)
}

/// Names a look-up walk probes under one taking of every shard's lock
/// (`State::page_by_look_up`): some hundreds of microseconds.
const WALK_CHUNK: usize = 4_096;

/// Grants a reader of a whole subject reads under its shard lock at once
/// (`State::grants_in_runs`): some microseconds of the writer's wait for a listing's pass,
/// ~0.3 ms for a digest's hashes; the run's look-up of the subject costs a few hundred
/// nanoseconds of it.
const GRANTS_RUN: usize = 1_024;

/// A walk under way (`walk`), which may go on over the order a slice at a time.
struct Walk {
    want: usize,
    budget: usize,
    /// The ids kept so far.
    found: Vec<u32>,
    /// The names probed so far.
    probed: usize,
}

impl Walk {
    fn new(want: usize, budget: usize) -> Self {
        Self {
            want,
            budget,
            found: Vec::new(),
            probed: 0,
        }
    }

    /// Goes on over `order`, the names after those probed so far: whether it has found
    /// `want` (else `order` ended first); `None` once given up (`walk`).
    fn go(&mut self, order: &[u32], mut holds: impl FnMut(u32) -> bool) -> Option<bool> {
        for &o in order {
            if self.found.len() == self.want {
                return Some(true);
            }
            let slow = self.probed >= WALK_PATIENCE
                && self.probed.saturating_mul(self.want)
                    > self.budget.saturating_mul(self.found.len() + 1);
            if self.probed == self.budget || slow {
                return None;
            }
            self.probed += 1;
            if holds(o) {
                self.found.push(o);
            }
        }
        Some(self.found.len() == self.want)
    }
}

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

/// The ids of `order` (ids in name order) named after `after`.
fn from_after<'o>(order: &'o [u32], all: Names<'_>, after: &str) -> &'o [u32] {
    &order[order.partition_point(|&o| all.name(o) <= after)..]
}

/// A page from a walk of the names in order (`walked`, the ids it kept, the page's and
/// one more if there are) and the objects named since the generation was built
/// (`since`, ids, which the order does not have), merged by name, with whether more
/// follow.
fn page_of_walk(
    all: Names<'_>,
    walked: Vec<u32>,
    since: Vec<u32>,
    after: &str,
    limit: usize,
) -> Listing {
    let named = |o: u32| (all.name(o), o);
    let mut since: Vec<(&str, u32)> = since
        .into_iter()
        .map(named)
        .filter(|&(name, _)| name > after)
        .collect();
    since.sort_unstable();
    let more = walked.len() + since.len() > limit;
    let walked = walked.into_iter().map(named);
    listing(all, merge_by_name(walked, since, limit), more)
}

/// The listing of `names`, (name, id) pairs of `all`: only the page's `Arc`s are cloned.
fn listing(all: Names<'_>, names: Vec<(&str, u32)>, more: bool) -> Listing {
    Listing {
        objects: names
            .into_iter()
            .filter_map(|(_, o)| all.get(o).cloned())
            .collect(),
        more,
    }
}

/// The first `limit` of two lists of (name, id) sorted by name, merged.
fn merge_by_name<'n>(
    a: impl Iterator<Item = (&'n str, u32)>,
    b: Vec<(&'n str, u32)>,
    limit: usize,
) -> Vec<(&'n str, u32)> {
    let (mut a, mut b) = (a.peekable(), b.into_iter().peekable());
    let mut merged = Vec::new();
    while merged.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(named) => merged.push(named),
            None => break,
        }
    }
    merged
}

/// The union of two sorted lists of ids, sorted, each id once.
fn merge_sorted(a: Vec<u32>, b: &[u32]) -> Vec<u32> {
    debug_assert!(a.is_sorted() && b.is_sorted());
    if b.is_empty() {
        return a;
    }
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                merged.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                merged.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    merged.extend_from_slice(&a[i..]);
    merged.extend_from_slice(&b[j..]);
    merged
}

/// A page of a listing: names in order, and whether more follow the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The page's names, sorted.
    pub objects: Vec<Arc<str>>,
    /// Whether names after the page's last one were left out by its limit.
    pub more: bool,
}

/// The stored rows of one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredRows {
    /// (object, permission, expires_at in µs since the epoch or `None`), sorted.
    pub tuples: Vec<(String, String, Option<i64>)>,
    /// (name, value), sorted.
    pub limits: Vec<(String, i64)>,
}

/// A digest of rows: their counts and the wrapping sum of their row hashes, written
/// `tuples:limits:sum` (16 hex digits), as `permd.digest()` writes it. The digest of two
/// sets of rows is the [`Digest::add`] of theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    tuples: u64,
    limits: u64,
    sum: u64,
}

impl Digest {
    /// Adds the rows of `other`.
    pub fn add(&mut self, other: Digest) {
        self.tuples += other.tuples;
        self.limits += other.limits;
        self.sum = self.sum.wrapping_add(other.sum);
    }
}

impl std::str::FromStr for Digest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("not a digest: {text:?}");
        let parts: Vec<&str> = text.split(':').collect();
        let [tuples, limits, sum] = parts[..] else {
            return Err(bad());
        };
        let bad = |_| bad();
        Ok(Self {
            tuples: tuples.parse().map_err(bad)?,
            limits: limits.parse().map_err(bad)?,
            sum: u64::from_str_radix(sum, 16).map_err(bad)?,
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{:016x}", self.tuples, self.limits, self.sum)
    }
}

fn push_fields(line: &mut Vec<u8>, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            line.push(0x1f);
        }
        line.extend_from_slice(f.as_bytes());
    }
}

/// The first 8 bytes of md5, big-endian: `permd.row_hash()` in SQL.
fn row_hash(line: &[u8]) -> u64 {
    let hash = Md5::digest(line);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

/// Builds a `State` from a full snapshot, off the async runtime, while the rows stream in.
///
/// Rows come in the table's physical order, in which a subject's rows usually sit together
/// (they are written a user at a time). Each such run becomes the subject's entry as soon
/// as the next subject's rows begin, so the build keeps pace with the COPY, nothing is
/// left to sort at the end, and no more than one subject's rows are held aside. A subject
/// met again after its first run (its rows are scattered over the table) has its later
/// rows kept aside and merged into its entry once, at the end: correct for rows in any
/// order, and as cheap as the grouped case where they are grouped.
pub(crate) struct StateBuilder {
    state: State,
    /// The subject of the current run (when `run` is not empty); reused from run to run.
    subject: String,
    /// The current run's rows as (object id, slot); reused from run to run.
    run: Vec<(u32, Slot)>,
    /// The rows of subjects met again after their first run, merged in `finish`.
    scattered: HashMap<Box<str>, Vec<(u32, Slot)>, Hasher>,
    limits: HashMap<Box<str>, Vec<(u32, i64)>, Hasher>,
    /// Tuple rows stored so far.
    tuples: u64,
    /// Bytes of the heap the entries built so far hold (`SubjectEntry::heap_bytes`).
    heap: usize,
}

impl StateBuilder {
    pub(crate) fn new() -> Self {
        Self {
            // The subject map and the object interner start small and grow. A table
            // pre-sized from a guess is touched all over by random inserts and stays
            // resident at its full size; grown, it ends at the size an exact guess would
            // have given (tables grow by powers of two). An oversized object table also
            // slows the load: it was sized from the row count (rows / 64), 256k buckets
            // (8 MiB) for 50,000 objects at 10M rows, and every row's object look-up
            // missed the cache; grown, 64k buckets (2 MiB): about 10 % less CPU for the
            // load (benches/README.md, `load`).
            state: State::with_capacity(16, 16),
            subject: String::new(),
            run: Vec::new(),
            scattered: HashMap::with_hasher(Hasher::default()),
            limits: HashMap::with_hasher(Hasher::default()),
            tuples: 0,
            heap: 0,
        }
    }

    /// Adds one tuple row; `expires_at` in microseconds since the Unix epoch.
    pub(crate) fn tuple(
        &mut self,
        subject: &str,
        object: &str,
        permission: &str,
        expires_at: Option<i64>,
    ) {
        let slot = Slot {
            permission: self.state.permissions.intern_mut(permission),
            expires_at: expires_at.unwrap_or(NEVER),
        };
        // Plan permissions are all on '': no look-up for them.
        let object =
            fixed_object_id(object).unwrap_or_else(|| self.state.objects.intern_mut(object));
        if self.run.is_empty() || self.subject != subject {
            self.start_run(subject);
        }
        self.run.push((object, slot));
    }

    /// Adds all of one subject's rows, whose names are interned already, as one run;
    /// leaves `rows` empty. Compared with a row at a time, spares a comparison of the
    /// subject's name for every row.
    fn push_run(&mut self, subject: &str, rows: &mut Vec<(u32, Slot)>) {
        self.start_run(subject);
        std::mem::swap(&mut self.run, rows);
        self.end_run();
        std::mem::swap(&mut self.run, rows);
    }

    /// Ends the current run and starts `subject`'s.
    fn start_run(&mut self, subject: &str) {
        self.end_run();
        self.subject.clear();
        self.subject.push_str(subject);
    }

    /// Stores the current run under its subject: as the subject's entry when it is new,
    /// aside for `finish` when the subject already has one.
    fn end_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let (run, tuples, packed) = (&mut self.run, &mut self.tuples, &mut self.state.packed);
        let heap = &mut self.heap;
        let new = self.state.subjects.load_new(&self.subject, || {
            let grants = grants_of(run, tuples, packed);
            *heap += grants.heap_bytes();
            SubjectEntry {
                grants,
                limits: Thin::default(),
            }
        });
        if !new {
            self.scattered
                .entry(self.subject.as_str().into())
                .or_default()
                .extend_from_slice(&self.run);
        }
        self.run.clear();
    }

    /// Adds one limit row.
    pub(crate) fn limit(&mut self, subject: &str, name: &str, value: i64) {
        let name = self.state.limit_names.intern_mut(name);
        match self.limits.get_mut(subject) {
            Some(rows) => rows.push((name, value)),
            None => {
                self.limits.insert(subject.into(), vec![(name, value)]);
            }
        }
    }

    /// Merges the scattered rows and the limits and returns the finished state.
    pub(crate) fn finish(mut self) -> State {
        self.end_run();
        let Self {
            mut state,
            scattered,
            limits,
            mut tuples,
            mut heap,
            ..
        } = self;
        for (subject, mut rows) in scattered {
            let Some(entry) = state.subjects.loaded_mut(&subject) else {
                continue; // never: a subject is scattered only once it has an entry
            };
            let grants = std::mem::take(&mut entry.grants);
            heap -= grants.heap_bytes();
            for (object, grant) in grants.into_vec(&state.packed) {
                let grant = grant.held();
                tuples -= grant.row_count();
                rows.extend(grant.rows().map(|(permission, expires_at)| {
                    (
                        object,
                        Slot {
                            permission,
                            expires_at,
                        },
                    )
                }));
            }
            entry.grants = grants_of(&mut rows, &mut tuples, &mut state.packed);
            heap += entry.grants.heap_bytes();
        }
        let mut limit_rows = 0;
        for (subject, mut rows) in limits {
            rows.sort_unstable();
            limit_rows += rows.len() as u64;
            let entry = state.subjects.loaded_or_default(&subject);
            entry.limits = rows.into();
            heap += entry.limits.heap_bytes();
        }
        state.note_public(WILDCARD);
        state.count_public();
        state.heap_loaded = heap;
        state.tuples.store(tuples, Ordering::Relaxed);
        state.limits.store(limit_rows, Ordering::Relaxed);
        state
    }
}

/// One subject's grants from its rows (object id, slot) in any order; adds the rows stored
/// to `tuples`. Sorts `rows`. Several grants are packed in `arena` when they can be.
fn grants_of(rows: &mut [(u32, Slot)], tuples: &mut u64, arena: &mut Arena) -> Grants {
    rows.sort_unstable_by_key(|(object, _)| *object);
    let objects = rows.chunk_by(|a, b| a.0 == b.0);
    let count = objects.clone().count();
    let mut grants = objects.map(|same| {
        let grant = Grant::from_slots(same.iter().map(|(_, slot)| *slot));
        *tuples += grant.held().row_count();
        (same[0].0, grant)
    });
    if count == 1 {
        if let Some((object, grant)) = grants.next() {
            return Grants::One { object, grant };
        }
    }
    let mut many = Vec::with_capacity(count);
    many.extend(grants);
    if many.iter().all(|(_, grant)| grant.extra.is_empty()) {
        if let Some(list) = arena.pack(many.iter().map(|(object, grant)| (*object, grant.bits))) {
            return Grants::Packed(list);
        }
    }
    Grants::from_vec(many)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Bound::{Excluded, Included, Unbounded};

    fn row(permission: &str, expires_at: Option<i64>) -> TupleRow {
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

    /// Chunks merged aside are put in only into the version they were made from; put in,
    /// they hold what merging in place holds, and the chunks they replace are handed back.
    #[test]
    fn chunks_merged_aside_go_only_into_their_version() {
        let grant = |p: u32| {
            Grant::from_slots([Slot {
                permission: p,
                expires_at: NEVER,
            }])
        };
        let all: Vec<(u32, Grant)> = (0..5_000).map(|o| (o * 2, grant(0))).collect();
        let mut chunks = Chunks::new(all);
        // A grant changed, one removed, and new ones in the first and the last chunk.
        let changes = [
            (0, grant(1)),
            (7, grant(0)),
            (5_000, Grant::default()),
            (20_001, grant(2)),
        ];
        let mut in_place = chunks.clone();
        let removed = in_place.set_many(&changes);
        let merged = chunks.merged(&changes);
        assert_eq!((merged.removed, removed), (2, 2));
        let touched: Vec<usize> = merged.replacements.iter().map(|(c, _)| *c).collect();
        let mut stale = chunks.clone();
        stale.set(3, grant(0));
        let merged = stale.put(merged).expect_err("made from another version");
        let replaced = chunks.put(merged).expect("made from this version");
        assert_eq!(replaced.len(), touched.len());
        let listed = |c: &Chunks| -> Vec<(u32, Grant)> { c.chunks.concat() };
        assert_eq!(listed(&chunks), listed(&in_place));
        assert_eq!(
            (chunks.firsts.clone(), chunks.len),
            (in_place.firsts.clone(), in_place.len)
        );
        // Another merge, from the version the put made, goes in too.
        let next = chunks.merged(&[(9, grant(0))]);
        assert!(chunks.put(next).is_ok());
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
        let reader = {
            let (state, writing) = (state.clone(), writing.clone());
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
                }
                seen
            })
        };
        let write = [row("write", None)];
        for k in 0..3_000 {
            let rows: &[TupleRow] = if k % 2 == 0 { &write } else { &[] };
            state.set_grants("big", &[("doc:00000", rows), ("doc:05999", rows)]);
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
            assert!(chunks.len >= CHUNKED_OVER / 2 && chunks.len == model.len());
            assert_eq!(
                chunks.chunks.iter().map(Vec::len).sum::<usize>(),
                chunks.len
            );
            assert_eq!(chunks.firsts.len(), chunks.chunks.len());
            for (first, chunk) in chunks.firsts.iter().zip(&chunks.chunks) {
                assert!(!chunk.is_empty() && chunk.len() < 2 * CHUNK);
                assert!(chunk.capacity() <= chunk.len() + 2 * CHUNK_SLACK);
                assert_eq!(*first, chunk[0].0);
            }
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
    fn subject_name(s: u64) -> String {
        match s % 3 {
            0 => format!("u{s}"),
            1 => format!("user:6f1c2a9e-3b7d-4e58-a0c4-{s:012}"),
            _ => format!("organization:{s:048}"),
        }
    }

    /// A state with per-object, global, wildcard-subject, wildcard-object and expiring
    /// grants over `subjects` subjects (names of every length, `subject_name`), and checks
    /// over them (and unknown names) drawn by a fixed generator.
    fn mixed_state(subjects: u64) -> (State, Vec<(String, String, String)>) {
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
        // Rows first grouped by subject (runs of 7), then scattered over the same subjects
        // (each row's subject differs from the previous one's), with expiring rows, limits
        // on some subjects and on others that hold no tuple; subjects' names of every length
        // (`subject_name`).
        let live = State::with_capacity(4, 4);
        let mut builder = StateBuilder::new();
        let mut by_key: BTreeMap<(String, String), Vec<TupleRow>> = BTreeMap::new();
        for i in 0..42_000u64 {
            let subject = if i < 21_000 {
                subject_name(i / 7)
            } else {
                subject_name((i * 7_919) % 3_001)
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
            builder.limit(&subject_name(i as u64 * 29), "projects", i);
            live.set_limits(&subject_name(i as u64 * 29), &[("projects".into(), i)]);
        }
        for i in 0..10 {
            builder.limit(&format!("limits-only-{i}"), "seats", i);
            live.set_limits(&format!("limits-only-{i}"), &[("seats".into(), i)]);
        }
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
            let subject = subject_name(n);
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

    /// A page of a listing is the first `limit` names after `after`, whichever way it is
    /// picked (a heap under `PAGE_BY_HEAP`, a selection from there), with object ids in
    /// an order unrelated to the names'.
    #[test]
    fn a_page_is_the_first_names_after_the_cursor() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        let mut builder = StateBuilder::new();
        let mut names: Vec<String> = (0..3_000)
            .map(|_| format!("doc:{}", next(1 << 40)))
            .collect();
        for name in &names {
            builder.tuple("u", name, "read", None);
        }
        let state = builder.finish();
        names.sort_unstable();
        names.dedup();
        for limit in [1, 2, 7, 100, PAGE_BY_HEAP - 1, PAGE_BY_HEAP, 2_999, 5_000] {
            for after in ["", "doc:", "doc:5", names[1_000].as_str(), "doc:~"] {
                let expected: Vec<&String> = names.iter().filter(|n| n.as_str() > after).collect();
                let page = state.objects_of("u", "read", after, limit, &mut Now::lazy());
                let listed: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
                let want: Vec<&str> = expected.iter().take(limit).map(|n| n.as_str()).collect();
                assert_eq!(listed, want, "limit {limit} after {after:?}");
                assert_eq!(
                    page.more,
                    expected.len() > limit,
                    "limit {limit} after {after:?}"
                );
            }
        }
    }

    thread_local! {
        /// Each listing's walk on this thread: its plan, and whether it gave a page (else
        /// it was given up for the pass). A listing by the pass alone adds nothing.
        pub(super) static LISTED: std::cell::RefCell<Vec<(Plan, bool)>> = const {
            std::cell::RefCell::new(Vec::new())
        };
        /// The runs `grants_in_runs` read on this thread: each one a look-up of the
        /// subject, under its shard lock while the run lasts.
        pub(super) static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Listings found by walking the names in order, by a pass over the grants, and by a
    /// walk given up for the pass, all against the rows they come from: subjects that hold
    /// most objects, half, a few, all but with the permission asked on few, thousands (in
    /// chunks), expiring grants and `*`'s, before and after writes that name new objects
    /// (not in the order) and revoke others.
    #[test]
    fn listings_agree_with_the_rows_whichever_way_they_are_found() {
        const OBJECTS: u64 = 6_000;
        const NOW: i64 = 1_000_000;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        // (subject, object) to its rows: (permission, expires_at).
        type Model = BTreeMap<(String, String), Vec<(String, Option<i64>)>>;
        let mut model = Model::new();
        let names: Vec<String> = (0..OBJECTS)
            .map(|_| format!("doc:{}", next(1 << 40)))
            .collect();
        let mut builder = StateBuilder::new();
        for (i, name) in names.iter().enumerate() {
            let mut rows = Vec::new();
            let i = i as u64;
            // Most of them; a few expiring, before and after `NOW`.
            if next(10) != 0 {
                let expires_at = match next(20) {
                    0 => Some(NOW - 1),
                    1 => Some(NOW + 1),
                    _ => None,
                };
                rows.push(("dense", "read", expires_at));
            }
            if i.is_multiple_of(2) {
                rows.push(("half", "read", None));
            }
            if next(300) == 0 {
                rows.push(("sparse", "read", None));
            }
            rows.push(("mixed", if next(50) == 0 { "read" } else { "write" }, None));
            if next(200) == 0 {
                rows.push(("*", "read", None));
            }
            for (subject, permission, expires_at) in rows {
                builder.tuple(subject, name, permission, expires_at);
                model
                    .entry((subject.to_owned(), name.clone()))
                    .or_default()
                    .push((permission.to_owned(), expires_at));
            }
        }
        // `*` as an object: first in the order, as '*' sorts before letters.
        builder.tuple("sparse", "*", "read", None);
        model.insert(("sparse".into(), "*".into()), vec![("read".into(), None)]);
        let state = builder.finish();
        let subjects = ["dense", "half", "sparse", "mixed", "*", "nobody"];
        let check_all = |model: &Model, next: &mut dyn FnMut(u64) -> u64| {
            let mut afters = vec![String::new(), "doc:".into(), "doc:5".into(), "doc:~".into()];
            for _ in 0..4 {
                let name = &names[next(OBJECTS) as usize];
                afters.push(name.clone());
                afters.push(format!("{name}0"));
            }
            for subject in subjects {
                for permission in ["read", "write", "none"] {
                    let holds = |s: &str, o: &str| {
                        model
                            .get(&(s.to_owned(), o.to_owned()))
                            .is_some_and(|rows| {
                                rows.iter()
                                    .any(|(p, e)| p == permission && e.is_none_or(|e| e > NOW))
                            })
                    };
                    let all: BTreeSet<&str> = model
                        .keys()
                        .map(|(_, o)| o.as_str())
                        .filter(|o| holds(subject, o) || holds("*", o))
                        .collect();
                    for after in &afters {
                        for limit in [1, 3, 100, PAGE_BY_HEAP + 1, usize::MAX] {
                            let expected: Vec<&str> = all
                                .range::<str, _>((Excluded(after.as_str()), Unbounded))
                                .copied()
                                .collect();
                            let page = state.objects_of(
                                subject,
                                permission,
                                after,
                                limit,
                                &mut Now::fixed(NOW),
                            );
                            let listed: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
                            let what =
                                format!("{subject} {permission} after {after:?} limit {limit}");
                            assert_eq!(listed, expected[..expected.len().min(limit)], "{what}");
                            assert_eq!(page.more, expected.len() > limit, "{what}");
                            let mut now = Now::fixed(NOW);
                            if let Some(quick) = state.objects_within(
                                subject,
                                permission,
                                after,
                                limit,
                                &mut now,
                                Some(QUICK_LISTING),
                            ) {
                                assert_eq!(quick, page, "{what}, quick");
                            }
                        }
                    }
                }
            }
        };
        // One listing's walks, for `subject` and `read`, `limit` from the start.
        let walks = |subject: &str, limit: usize| {
            LISTED.with(|listed| listed.borrow_mut().clear());
            state.objects_of(subject, "read", "", limit, &mut Now::fixed(NOW));
            LISTED.with(|listed| listed.borrow().clone())
        };
        let look_up = |listed: Vec<(Plan, bool)>| match listed[..] {
            [(Plan::LookUp { .. }, found)] => Some(found),
            _ => None,
        };
        check_all(&model, &mut next);
        assert_eq!(look_up(walks("dense", 100)), Some(true));
        assert_eq!(walks("dense", usize::MAX), [(Plan::Bits, true)]);
        assert_eq!(walks("half", 100), [(Plan::Bits, true)]);
        assert_eq!(walks("sparse", 100), []);
        assert_eq!(
            look_up(walks("mixed", 100)),
            Some(false),
            "few `read`: the walk is given up"
        );

        // New names (after the order), and revokes, through the writer; `*` too.
        for k in 0..300 {
            let (subject, name) = match k % 3 {
                0 => ("dense", format!("doc:{}", next(1 << 40))),
                1 => ("sparse", names[next(OBJECTS) as usize].clone()),
                _ => ("*", format!("new:{k}")),
            };
            let rows = if next(4) == 0 {
                vec![]
            } else {
                vec![row("read", None)]
            };
            state.set_grant(subject, &name, &rows);
            let key = (subject.to_owned(), name);
            if rows.is_empty() {
                model.remove(&key);
            } else {
                model.insert(key, vec![("read".to_owned(), None)]);
            }
        }
        for name in names.iter().take(1_000) {
            state.set_grant("dense", name, &[]);
            model.remove(&("dense".to_owned(), name.clone()));
        }
        check_all(&model, &mut next);
        // Fewer of them, and `*` holds more: a look-up walk pays off for a shorter page.
        assert_eq!(look_up(walks("dense", 10)), Some(true));
        assert_eq!(walks("dense", usize::MAX), [(Plan::Bits, true)]);
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

    /// A look-up walk that probes more names than `WALK_CHUNK` (here ~5,000: one name in
    /// 50 held with the permission) goes on where it stopped each time it takes the
    /// locks again, with `*` (holding `read` on ten more, every shard locked) and without
    /// (`view`, the subject's shard): the page is the one a pass finds.
    #[test]
    fn a_long_look_up_walk_goes_on_across_chunks() {
        const OBJECTS: usize = 40_000;
        let mut builder = StateBuilder::new();
        for o in 0..OBJECTS {
            let name = format!("doc:{o:05}");
            if o % 50 == 0 {
                builder.tuple("u", &name, "read", None);
                builder.tuple("u", &name, "view", None);
            } else {
                builder.tuple("u", &name, "write", None);
            }
        }
        for o in 1..=10 {
            builder.tuple("*", &format!("doc:{o:05}"), "read", None);
        }
        let state = builder.finish();
        for (permission, public) in [("read", 1..11), ("view", 0..0)] {
            LISTED.with(|listed| listed.borrow_mut().clear());
            let page = state.objects_of("u", permission, "", 100, &mut Now::lazy());
            let listed = LISTED.with(|listed| listed.take());
            assert!(
                matches!(listed[..], [(Plan::LookUp { budget }, true)] if budget > WALK_CHUNK),
                "{permission}: {listed:?}"
            );
            let expected: Vec<String> = (0..OBJECTS)
                .filter(|o| o % 50 == 0 || public.contains(o))
                .map(|o| format!("doc:{o:05}"))
                .take(100)
                .collect();
            let names: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
            assert_eq!(names, expected, "{permission}");
            assert!(page.more, "{permission}");
        }
    }

    /// A walk stops at `want`, gives up at its budget, and past its patience as soon as
    /// its pace says the page would take more than the budget; one without a budget
    /// walks to the end.
    #[test]
    fn a_walk_gives_up_when_its_pace_says_it_would_pass_its_budget() {
        let order: Vec<u32> = (0..100_000).collect();
        assert_eq!(walk(&order, 10, 50, |_| true), Some((0..10).collect()));
        assert_eq!(walk(&order, 10, 50, |o| o >= 60), None, "the budget");
        // One name in 100: 101 of them in 10,001 names, within a budget of 20,000.
        let found = walk(&order, 101, 20_000, |o| o % 100 == 0);
        assert_eq!(found.map(|f| f.len()), Some(101));
        // One in 1,000 would take 100,001: given up once its patience is spent.
        let mut probed = 0;
        let found = walk(&order, 101, 20_000, |o| {
            probed += 1;
            o % 1_000 == 0
        });
        assert_eq!((found, probed), (None, WALK_PATIENCE));
        let found = walk(&order, 101, usize::MAX, |o| o % 1_000 == 0);
        assert_eq!(found.map(|f| f.len()), Some(100));
    }

    /// A listing is quick when it is small for its plan and needs no sort of the names: a
    /// page of a subject of few grants at once, a page of a large subject once the names
    /// are sorted, a whole list of thousands never; and when its walk finds the page
    /// within the bound: a walk that does not is given up, not sent to the pass.
    #[test]
    fn quick_listings_are_small_and_need_no_sort() {
        let mut builder = StateBuilder::new();
        for o in 0..20_000 {
            let name = format!("doc:{o}");
            builder.tuple("large", &name, "read", None);
            if o % 1_000 == 0 {
                builder.tuple("few", &name, "read", None);
            }
            // Reads on one name in 500: a walk finds 100 of them in 50,000 names.
            let mixed = if o % 500 == 0 { "read" } else { "write" };
            builder.tuple("mixed", &name, mixed, None);
        }
        let state = builder.finish();
        let quick = |subject: &str, limit: usize| {
            let quick = state.objects_within(
                subject,
                "read",
                "",
                limit,
                &mut Now::lazy(),
                Some(QUICK_LISTING),
            );
            if let Some(page) = &quick {
                let all = state.objects_of(subject, "read", "", limit, &mut Now::lazy());
                assert_eq!((&page.objects, page.more), (&all.objects, all.more));
            }
            quick.is_some()
        };
        assert!(quick("few", 100));
        assert!(quick("few", usize::MAX));
        assert!(quick("nobody", usize::MAX));
        assert!(!quick("large", 100), "the names are not sorted yet");
        state.objects_of("large", "read", "", 100, &mut Now::lazy());
        assert!(quick("large", 100));
        assert!(!quick("large", 5_000));
        assert!(!quick("large", usize::MAX));
        LISTED.with(|listed| listed.borrow_mut().clear());
        assert!(!quick("mixed", 100), "the walk is given up");
        let listed = LISTED.with(|listed| listed.take());
        assert!(
            matches!(listed[..], [(Plan::LookUp { budget }, false)] if budget == QUICK_LISTING / 20),
            "{listed:?}"
        );
        // Cheap to find, but 1,900 names to copy and write.
        let mut builder = StateBuilder::new();
        for o in 0..2_000 {
            if o < 1_900 {
                builder.tuple("most", &format!("doc:{o}"), "read", None);
            } else {
                builder.tuple("other", &format!("doc:{o}"), "read", None);
            }
        }
        let state = builder.finish();
        state.objects_of("most", "read", "", 1, &mut Now::lazy());
        let quick = |limit| {
            state
                .objects_within(
                    "most",
                    "read",
                    "",
                    limit,
                    &mut Now::lazy(),
                    Some(QUICK_LISTING),
                )
                .is_some()
        };
        assert!(quick(100));
        assert!(!quick(usize::MAX));
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

    #[test]
    fn a_load_that_cannot_map_more_memory_keeps_the_rest_in_the_heap() {
        // The same rows loaded twice: once with every list packed, once with mapping
        // refused after the first chunk (about 870 lists of 200 grants fit in it), so that
        // the lists loaded after it stay in the heap. Both answer alike.
        let load = |chunk_limit: Option<usize>| {
            let mut builder = StateBuilder::new();
            builder.state.packed.chunk_limit = chunk_limit;
            for s in 0..1_000 {
                for o in 0..200 {
                    let permission = format!("p{}", (s + o) % 3);
                    builder.tuple(&format!("s{s}"), &format!("o{o}"), &permission, None);
                }
            }
            builder.finish()
        };
        let packed = load(None);
        let mixed = load(Some(1));
        let kinds = |state: &State| {
            let (mut packed, mut heap) = (0, 0);
            state.subjects.for_each(|_, entry| match entry.grants {
                Grants::Packed(_) => packed += 1,
                Grants::Many(_) => heap += 1,
                _ => {}
            });
            (packed, heap)
        };
        assert_eq!(kinds(&packed), (1_000, 0));
        let (in_chunk, in_heap) = kinds(&mixed);
        assert!(
            in_chunk > 0 && in_heap > 0,
            "{in_chunk} packed, {in_heap} in the heap"
        );
        assert!(0 < mixed.packed_bytes() && mixed.packed_bytes() < packed.packed_bytes());
        assert_eq!(packed.digest(), mixed.digest());
        for s in (0..1_000).step_by(7) {
            let subject = format!("s{s}");
            for o in (0..200).step_by(13) {
                let object = format!("o{o}");
                for permission in ["p0", "p1", "p2"] {
                    assert_eq!(
                        packed.check(&subject, permission, &object, &mut Now::lazy()),
                        mixed.check(&subject, permission, &object, &mut Now::lazy()),
                        "{subject} {permission} {object}"
                    );
                }
            }
        }
    }

    /// A rebuilt generation holds the same rows and answers every check alike, with the
    /// names no row uses gone and every subject back in the loaded tier.
    #[test]
    fn a_rebuilt_generation_keeps_every_row_and_drops_what_churn_left() {
        let (state, checks) = mixed_state(300);
        for s in 0..50 {
            let subject = subject_name(s);
            state.set_grant(&subject, &format!("tmp:{s}"), &[row("gone", None)]);
            state.set_grant(&subject, &format!("tmp:{s}"), &[]);
            state.set_limits(&subject, &[(format!("max{}", s % 3), s as i64)]);
        }
        state.set_limits("*", &[("max0".to_owned(), 7)]);
        let rebuilt = state.rebuilt();
        assert_eq!(rebuilt.digest(), state.digest());
        assert_eq!(rebuilt.subject_digests().len(), state.subject_count());
        assert_eq!(rebuilt.tuple_count(), state.tuple_count());
        assert_eq!(rebuilt.limit_count(), state.limit_count());
        for (subject, permission, object) in &checks {
            for at in [500, 2_000] {
                assert_eq!(
                    rebuilt.check(subject, permission, object, &mut Now::fixed(at)),
                    state.check(subject, permission, object, &mut Now::fixed(at)),
                    "{subject} {permission} {object} at {at}"
                );
            }
        }
        assert_eq!(rebuilt.limits_of("user:1"), state.limits_of("user:1"));
        let (before, after) = (state.growth(), rebuilt.growth());
        // The 50 `tmp:` objects and the `gone` permission are no row's.
        assert_eq!(
            after.names_loaded,
            before.names_loaded + before.names_since - 51
        );
        assert_eq!((after.names_since, after.subjects_moved), (0, 0));
        assert_eq!(after.subjects_loaded, state.subject_count());
        assert!(after.packed > 0, "{after:?}");
        // Rebuilt again, from packed lists this time (the first had only the heap's),
        // some of them subjects' with limits, and in batches of 7 lists.
        let again = rebuilt.rebuilt_by(7);
        assert_eq!(again.digest(), state.digest());
        assert_eq!(again.growth().packed, after.packed);
        for (subject, permission, object) in &checks {
            assert_eq!(
                again.check(subject, permission, object, &mut Now::fixed(500)),
                state.check(subject, permission, object, &mut Now::fixed(500)),
                "{subject} {permission} {object}"
            );
        }
        assert_eq!(again.limits_of("user:1"), state.limits_of("user:1"));
    }

    #[test]
    fn digests_read_back_and_add_up() {
        let mut total: Digest = "3:1:ffffffffffffffff".parse().expect("a digest");
        assert_eq!(total.to_string(), "3:1:ffffffffffffffff");
        total.add("1:0:0000000000000002".parse().expect("a digest"));
        assert_eq!(total.to_string(), "4:1:0000000000000001", "the sum wraps");
        for wrong in ["", "1:2", "1:2:3:4", "x:0:00", "1:1:zz"] {
            assert!(wrong.parse::<Digest>().is_err(), "{wrong}");
        }
    }

    #[test]
    fn digest_matches_the_sql_definition() {
        // The SQL digest of ('u1','','ADMIN', 1700000000000000) alone, computed by
        // permd.digest() on Postgres: the row hash of its canonical line.
        let line = b"t\x1fu1\x1f\x1fADMIN\x1f1700000000000000";
        let state = State::with_capacity(1, 1);
        state.set_grant("u1", "", &[row("ADMIN", Some(1_700_000_000_000_000))]);
        assert_eq!(state.digest(), format!("1:0:{:016x}", row_hash(line)));
    }
}
