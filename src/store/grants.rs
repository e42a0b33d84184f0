//! A subject's grants: the permissions it holds on each object, sorted by object id, in
//! one of four forms (one inline, packed in the generation's arena, a slice in the heap,
//! chunks), and how a write merges changes into them. No locks here: `State` decides
//! under which lock each of these is read or written.

use super::arena::{Arena, Packed};
use super::state::{Now, NEVER};

/// Permission ids below this live in the inline bitset.
const INLINE_BITS: u32 = 64;

/// Up to this many grants, a check scans a subject's grants instead of searching them.
pub(super) const SCAN_GRANTS: usize = 16;

/// Over this many grants in the heap, a subject's list is kept in chunks (`Chunks`); back
/// in one list under half of it.
pub(super) const CHUNKED_OVER: usize = 4_096;
/// The length of a chunk as built or split: a chunk is split when it reaches twice this.
pub(super) const CHUNK: usize = 512;
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

/// A permission held past the inline bitset, or one that expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) permission: u32,
    pub(super) expires_at: i64,
}

/// A boxed slice behind one pointer, and no allocation when empty: 8 bytes where a boxed
/// slice takes 16. For what most entries lack (a grant's extra slots, a subject's limits),
/// so the common entry stays small; the rare reader follows one more pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Thin<T>(Option<Box<Box<[T]>>>);

impl<T> Thin<T> {
    /// The bytes it takes in the heap: the slice's pointer and length, and its items.
    pub(super) fn heap_bytes(&self) -> usize {
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
pub(super) struct Grant {
    /// Permanent permissions with id < 64.
    pub(super) bits: u64,
    /// Everything else: expiring permissions and ids >= 64, sorted. Usually empty.
    pub(super) extra: Thin<Slot>,
}

impl Grant {
    /// The grant holding `slots`. Allocates only for slots past the inline bitset, so the
    /// loader builds the common grant (a few permanent permissions) without touching the
    /// heap.
    pub(super) fn from_slots(slots: impl IntoIterator<Item = Slot>) -> Self {
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

    pub(super) fn is_empty(&self) -> bool {
        self.bits == 0 && self.extra.is_empty()
    }

    pub(super) fn held(&self) -> Held<'_> {
        Held {
            bits: self.bits,
            extra: &self.extra,
        }
    }
}

/// A grant as a check reads it, wherever it is stored (in the heap, or packed).
#[derive(Clone, Copy)]
pub(super) struct Held<'a> {
    bits: u64,
    extra: &'a [Slot],
}

impl<'a> Held<'a> {
    /// A grant of permanent permissions with ids below `INLINE_BITS` only, as the arena
    /// packs them.
    #[inline]
    pub(super) fn of_bits(bits: u64) -> Self {
        Self { bits, extra: &[] }
    }

    #[inline]
    pub(super) fn allows(self, permission: u32, now: &mut Now) -> bool {
        if permission < INLINE_BITS && self.bits & (1 << permission) != 0 {
            return true;
        }
        self.extra
            .iter()
            .any(|s| s.permission == permission && s.expires_at > now.get())
    }

    /// Every stored (permission, expires_at) pair, expired ones included.
    pub(super) fn rows(self) -> impl Iterator<Item = (u32, i64)> + 'a {
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

    pub(super) fn row_count(self) -> u64 {
        u64::from(self.bits.count_ones()) + self.extra.len() as u64
    }
}

/// A subject's grants, sorted by object id. Many subjects hold grants on one object only
/// (their global permissions, say): that one is stored inline, so a check on it reads no
/// further cache line and the subject costs no heap allocation. `One`'s fields are
/// separate (not a pair) so that the enum's tag fits beside the object id: 24 bytes.
/// Several grants are packed in the generation's `Arena` when the full load builds them
/// (`Packed`), and in the heap (`Many`) when the applier writes them or they do not pack;
/// over `CHUNKED_OVER` in the heap, in chunks (`Chunked`), so that a write moves one chunk
/// rather than the rest of the list.
#[derive(Debug, Clone)]
pub(super) enum Grants {
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
    pub(super) fn from_vec(mut grants: Vec<(u32, Grant)>) -> Self {
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
    pub(super) fn set_many(&mut self, changes: Vec<(u32, Grant)>, arena: &Arena) -> u64 {
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
    pub(super) fn unchunk_if_small(&mut self) {
        if let Self::Chunked(chunks) = self {
            if chunks.len < CHUNKED_OVER / 2 {
                *self = Self::Many(chunks.chunks.concat().into_boxed_slice());
            }
        }
    }

    /// The grants in the heap, read from `arena` if they are packed there.
    pub(super) fn into_vec(self, arena: &Arena) -> Vec<(u32, Grant)> {
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
    pub(super) fn get<'a>(&'a self, object: u32, arena: &'a Arena) -> Option<Held<'a>> {
        match self {
            Self::One { object: o, grant } => (*o == object).then(|| grant.held()),
            Self::Packed(list) => arena.get(*list, object).map(Held::of_bits),
            Self::Many(many) => {
                find_object(many.len(), object, |i| many[i].0).map(|i| many[i].1.held())
            }
            Self::Chunked(chunks) => chunks.get(object).map(Grant::held),
        }
    }

    /// Every (object id, grant), by object id.
    pub(super) fn iter<'a>(&'a self, arena: &'a Arena) -> impl Iterator<Item = (u32, Held<'a>)> {
        self.iter_from(0, arena)
    }

    /// The grants from `object` on, by object id: `iter`'s, those before `object` found by
    /// a binary search rather than read.
    pub(super) fn iter_from<'a>(
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
                    .map(|(object, bits)| (object, Held::of_bits(bits))),
            )
            .skip_while(move |(o, _)| *o < object)
    }

    /// How many objects the subject holds grants on.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::One { .. } => 1,
            Self::Many(many) => many.len(),
            Self::Packed(list) => list.len(),
            Self::Chunked(chunks) => chunks.len,
        }
    }

    /// Puts `grant` on `object` (an empty grant removes it) and returns how many rows the
    /// grant it replaced held. Packed grants move to the heap.
    pub(super) fn set(&mut self, object: u32, grant: Grant, arena: &Arena) -> u64 {
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

    pub(super) fn is_empty(&self) -> bool {
        matches!(self, Self::Many(many) if many.is_empty())
    }

    /// The bytes of the heap these grants take, their list and each grant's expiring
    /// slots: what a loaded entry leaves behind, unread, once its subject moves to the
    /// written tier.
    pub(super) fn heap_bytes(&self) -> usize {
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
    pub(super) fn packed_bytes(&self) -> usize {
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
pub(super) struct Chunks {
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
pub(super) struct Merged {
    /// The version of `Chunks` they were made from.
    version: u64,
    /// Each touched chunk's index and what replaces it (none, one, or more when it grew
    /// to `2 * CHUNK`), in order.
    replacements: Vec<(usize, Vec<Chunk>)>,
    /// Rows the replaced grants held.
    pub(super) removed: u64,
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
    pub(super) fn merged(&self, changes: &[(u32, Grant)]) -> Merged {
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
    pub(super) fn put(&mut self, merged: Merged) -> Result<Vec<Chunk>, Merged> {
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

#[cfg(test)]
impl Chunks {
    /// Asserts what every `Chunks` keeps (each chunk's first object id in `firsts`, no
    /// chunk empty or of `2 * CHUNK`, at most `2 * CHUNK_SLACK` unused, `len` their
    /// grants), and returns `len`.
    pub(super) fn assert_shape(&self) -> usize {
        assert_eq!(self.chunks.iter().map(Vec::len).sum::<usize>(), self.len);
        assert_eq!(self.firsts.len(), self.chunks.len());
        for (first, chunk) in self.firsts.iter().zip(&self.chunks) {
            assert!(!chunk.is_empty() && chunk.len() < 2 * CHUNK);
            assert!(chunk.capacity() <= chunk.len() + 2 * CHUNK_SLACK);
            assert_eq!(*first, chunk[0].0);
        }
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
