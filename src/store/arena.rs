//! Packed grant lists, in memory the kernel is asked to back with huge pages.
//!
//! A subject with grants on several objects is the common shape of resource permissions
//! (a user's documents, folders, projects), and an object check reads that subject's list
//! after its map bucket. With the lists in the heap, the list is one more small allocation
//! among millions: at a few million grants its cache line is rarely cached, and its 4 KiB
//! page is rarely in the TLB either, so a check pays a page walk before the load (under a
//! hypervisor, a walk of both the guest's and the host's tables). The full load packs
//! every such list here instead: object ids side by side (one cache line holds 16),
//! their bitsets after them, 12 bytes a grant against 24 (plus the allocator's header) in
//! the heap, in 2 MiB chunks advised `MADV_HUGEPAGE`, so that one TLB entry covers 2 MiB
//! of lists (benches/README.md, `store`: the cold object check).
//!
//! A chunk is written only while the generation is built (`pack` takes `&mut self`, as the
//! interner's frozen tier does) and read-only once it is shared: the applier never writes
//! here. A subject the applier changes moves its list to the heap, and the bytes it had
//! here stay unused until the next full load or compaction builds a new generation. (A
//! subject whose rows the load met in two places has its first list merged into a new one
//! at the load's end, and the first left unused: a chunk left with no list in use is
//! unmapped at once (`Arena::abandon`), and when such lists leave a fifth of the chunks
//! still mapped unused, the load packs every list again in a new arena:
//! `StateBuilder::repack`.) Lists with expiring permissions or
//! permission ids past the inline bitset, and lists longer than a chunk, stay in the heap.
//!
//! While a full load builds a generation, a thread of its own maps chunks ahead of the
//! lists and touches them (`Arena::map_ahead`): the first touch of memory is the kernel's
//! work of zeroing it, and on a virtual machine whose host backs its memory lazily (and
//! takes back what the guest frees) the host's work as well, 2.4 s of a load of 50M tuples
//! on the machine of benches/README.md (`load`, session 66). The thread does it on the
//! other core, which the load leaves idle once Postgres has sent the rows. A compaction's
//! rebuild does without it: it runs beside the applier and the checks, whose core the
//! thread took (`StateBuilder::for_full_load`).

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use memmap2::{MmapMut, MmapOptions};

use super::grants::{find_object, first_from};

/// The size of a huge page on x86-64 and arm64 with 4 KiB base pages, and of a chunk.
const HUGE_PAGE: usize = 2 << 20;

/// The smallest page size of the platforms permd runs on: `Chunk::touch` writes once in
/// each.
const PAGE: usize = 4 << 10;

/// How many chunks the thread of `Arena::map_ahead` holds ready, besides the one it is
/// touching: 4 MiB, a few milliseconds of a load's lists.
const AHEAD: usize = 2;

/// Where one subject's list is: 12 bytes, inside `Grants`. Ordered as the lists lie in
/// the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Packed {
    chunk: u32,
    /// Byte offset in the chunk; a multiple of 8.
    at: u32,
    /// Grants in the list; at least 2 (a single grant is stored inline).
    len: u32,
}

impl Packed {
    /// Grants in the list.
    pub(super) fn len(self) -> usize {
        self.len as usize
    }

    /// The bytes the list takes in its chunk.
    pub(super) fn bytes(self) -> usize {
        list_bytes(self.len())
    }
}

/// The bytes of `len` object ids, padded so that the bitsets after them are 8-aligned.
fn objects_bytes(len: usize) -> usize {
    (4 * len).next_multiple_of(8)
}

/// One list's bytes: its object ids, then its bitsets.
fn list_bytes(len: usize) -> usize {
    objects_bytes(len) + 8 * len
}

#[inline]
fn u32_at(bytes: &[u8], i: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[4 * i..4 * i + 4]);
    u32::from_le_bytes(word)
}

#[inline]
fn u64_at(bytes: &[u8], i: usize) -> u64 {
    super::word(bytes, 8 * i)
}

/// One mapping: `HUGE_PAGE` usable bytes from `start`, the first huge-page boundary in it.
struct Chunk {
    map: MmapMut,
    start: usize,
    used: usize,
    /// Bytes of lists no entry holds any more (`Arena::abandon`).
    abandoned: usize,
}

impl Chunk {
    fn new() -> std::io::Result<Self> {
        // Recent kernels (Linux 6.7 on) place an anonymous mapping whose length is a
        // multiple of the huge page size on a huge-page boundary. Elsewhere, map twice the
        // size, so that a whole aligned huge page lies inside it; the rest is never
        // touched and costs address space only.
        let mut map = MmapOptions::new().len(HUGE_PAGE).map_anon()?;
        if !(map.as_ptr() as usize).is_multiple_of(HUGE_PAGE) {
            map = MmapOptions::new().len(2 * HUGE_PAGE).map_anon()?;
        }
        #[cfg(target_os = "linux")]
        if let Err(error) = map.advise(memmap2::Advice::HugePage) {
            // Without transparent huge pages the chunk works as well, with 4 KiB pages.
            tracing::debug!(%error, "madvise(MADV_HUGEPAGE) refused");
        }
        let address = map.as_ptr() as usize;
        Ok(Self {
            start: address.next_multiple_of(HUGE_PAGE) - address,
            map,
            used: 0,
            abandoned: 0,
        })
    }

    /// Unmaps the chunk, keeping its place among the chunks (the lists' handles number
    /// them): an empty mapping, which no list reads, stands in. Whether it could.
    fn unmap(&mut self) -> bool {
        match MmapOptions::new().len(0).map_anon() {
            Ok(empty) => {
                *self = Self {
                    map: empty,
                    start: 0,
                    used: 0,
                    abandoned: 0,
                };
                true
            }
            Err(error) => {
                tracing::debug!(%error, "could not replace an unused chunk");
                false
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + HUGE_PAGE]
    }

    /// Writes a zero in each page of the chunk, so that the kernel backs it now: a huge
    /// page at the first write where it grants one.
    fn touch(&mut self) {
        for at in (self.start..self.start + HUGE_PAGE).step_by(PAGE) {
            self.map[at] = 0;
        }
    }
}

/// Chunks mapped and touched ahead of the lists by a thread of their own
/// (`Arena::map_ahead`).
#[derive(Default)]
enum Ahead {
    #[default]
    Off,
    /// The thread starts at the arena's second chunk, so that a small generation (most
    /// tests') never starts one.
    Wanted,
    /// The thread, and the chunks it has ready. (A `Receiver` is not `Sync`, and a
    /// generation is shared once built: the lock is never taken, `Mutex::get_mut`.)
    Running(Mutex<Receiver<Chunk>>, JoinHandle<()>),
}

impl Ahead {
    /// Starts the thread; `Off` when it cannot be.
    fn start() -> Self {
        let (ready, chunks) = std::sync::mpsc::sync_channel(AHEAD);
        let spawned = std::thread::Builder::new()
            .name("permd-arena".to_owned())
            .spawn(move || Self::map_and_touch(&ready));
        match spawned {
            Ok(thread) => Self::Running(Mutex::new(chunks), thread),
            Err(error) => {
                tracing::debug!(%error, "could not start a thread to map chunks ahead");
                Self::Off
            }
        }
    }

    /// The thread: maps chunks and touches them until the arena wants no more (or a
    /// mapping fails: the arena then maps its own, as without the thread).
    fn map_and_touch(ready: &SyncSender<Chunk>) {
        while let Ok(mut chunk) = Chunk::new() {
            chunk.touch();
            if ready.send(chunk).is_err() {
                return;
            }
        }
    }
}

/// The packed lists of one generation.
#[derive(Default)]
pub(super) struct Arena {
    chunks: Vec<Chunk>,
    /// Chunks unmapped since they were made (`abandon`).
    unmapped: usize,
    /// Set once mapping a chunk failed: lists then stay in the heap.
    unavailable: bool,
    ahead: Ahead,
    /// Tests: chunks that came from the thread of `map_ahead`.
    #[cfg(test)]
    mapped_ahead: usize,
    /// Tests: mapping a chunk fails once this many are mapped.
    #[cfg(test)]
    pub(super) chunk_limit: Option<usize>,
}

impl Arena {
    /// Packs `grants` (object id, bitset), sorted by object id, at least 2 of them. `None`
    /// when they do not fit in a chunk or no memory could be mapped; the caller keeps
    /// them in the heap then.
    pub(super) fn pack(
        &mut self,
        grants: impl ExactSizeIterator<Item = (u32, u64)>,
    ) -> Option<Packed> {
        let len = grants.len();
        let size = list_bytes(len);
        if len < 2 || size > HUGE_PAGE || self.unavailable {
            return None;
        }
        if self.chunks.last().is_none_or(|c| c.used + size > HUGE_PAGE) {
            match self.map_chunk() {
                Ok(chunk) => self.chunks.push(chunk),
                Err(error) => {
                    tracing::warn!(%error, "could not map memory for packed grants; keeping them in the heap");
                    self.unavailable = true;
                    return None;
                }
            }
        }
        let chunk_id = u32::try_from(self.chunks.len() - 1).ok()?;
        let chunk = self.chunks.last_mut()?;
        let at = chunk.used;
        let from = chunk.start + at;
        let (objects, bits) = chunk.map[from..from + size].split_at_mut(objects_bytes(len));
        for (i, (object, set)) in grants.enumerate() {
            objects[4 * i..4 * i + 4].copy_from_slice(&object.to_le_bytes());
            bits[8 * i..8 * i + 8].copy_from_slice(&set.to_le_bytes());
        }
        chunk.used += size;
        Some(Packed {
            chunk: chunk_id,
            at: u32::try_from(at).ok()?,
            len: u32::try_from(len).ok()?,
        })
    }

    /// A new chunk: from the thread of `map_ahead` when it runs (in tests, a failure past
    /// `chunk_limit`, as when the kernel refuses).
    fn map_chunk(&mut self) -> std::io::Result<Chunk> {
        #[cfg(test)]
        if self
            .chunk_limit
            .is_some_and(|limit| self.chunks.len() >= limit)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "the test's chunk limit",
            ));
        }
        if matches!(self.ahead, Ahead::Wanted) && !self.chunks.is_empty() {
            self.ahead = Ahead::start();
        }
        if let Ahead::Running(chunks, _) = &mut self.ahead {
            // Waits for the chunk being touched when none is ready: the wait is shorter
            // than touching one here. None comes once the thread could map no more.
            let chunks = chunks.get_mut().unwrap_or_else(PoisonError::into_inner);
            if let Ok(chunk) = chunks.recv() {
                #[cfg(test)]
                {
                    self.mapped_ahead += 1;
                }
                return Ok(chunk);
            }
        }
        Chunk::new()
    }

    /// For a full load's builder (`StateBuilder::for_full_load`): from the arena's second
    /// chunk on, a thread maps chunks ahead of the lists and touches them (see the module's
    /// comment), until `stop_mapping_ahead`.
    pub(super) fn map_ahead(&mut self) {
        if matches!(self.ahead, Ahead::Off) {
            self.ahead = Ahead::Wanted;
        }
    }

    /// Whether `map_ahead` was asked for and not stopped since.
    pub(super) fn maps_ahead(&self) -> bool {
        !matches!(self.ahead, Ahead::Off)
    }

    /// Stops the thread of `map_ahead`, if it runs, and waits for it to end; the chunks
    /// it had ready are unmapped.
    pub(super) fn stop_mapping_ahead(&mut self) {
        if let Ahead::Running(chunks, thread) = std::mem::take(&mut self.ahead) {
            // The thread's next send fails once the receiver is gone, and it ends.
            drop(chunks);
            if thread.join().is_err() {
                tracing::warn!("the thread that mapped chunks ahead panicked");
            }
        }
    }

    /// Tests: how many chunks came from the thread of `map_ahead`, and whether it runs.
    #[cfg(test)]
    pub(super) fn mapped_ahead(&self) -> (usize, bool) {
        (self.mapped_ahead, matches!(self.ahead, Ahead::Running(..)))
    }

    /// The list's object ids and bitsets.
    #[inline]
    fn parts(&self, list: Packed) -> (&[u8], &[u8]) {
        let len = list.len();
        let at = list.at as usize;
        self.chunks[list.chunk as usize].bytes()[at..at + list_bytes(len)]
            .split_at(objects_bytes(len))
    }

    /// The bitset the list holds for `object`.
    #[inline]
    pub(super) fn get(&self, list: Packed, object: u32) -> Option<u64> {
        let (objects, bits) = self.parts(list);
        find_object(list.len(), object, |i| u32_at(objects, i)).map(|i| u64_at(bits, i))
    }

    /// Every (object id, bitset) of the list, by object id.
    pub(super) fn iter(&self, list: Packed) -> impl ExactSizeIterator<Item = (u32, u64)> + '_ {
        self.iter_at(list, 0)
    }

    /// The list's (object id, bitset) from `object` on, by object id.
    pub(super) fn iter_from(
        &self,
        list: Packed,
        object: u32,
    ) -> impl Iterator<Item = (u32, u64)> + '_ {
        let (objects, _) = self.parts(list);
        self.iter_at(list, first_from(list.len(), object, |i| u32_at(objects, i)))
    }

    /// The list's (object id, bitset) from its `from`-th on.
    fn iter_at(&self, list: Packed, from: usize) -> impl ExactSizeIterator<Item = (u32, u64)> + '_ {
        let (objects, bits) = self.parts(list);
        (from..list.len()).map(move |i| (u32_at(objects, i), u64_at(bits, i)))
    }

    /// For the generation's builder: `list`, which no entry holds any more, leaves its
    /// bytes unused. A chunk whose every list is so is unmapped at once (but the one being
    /// filled): a full load that merges a subject's rows met later into a new list leaves
    /// its first one behind, and where every subject got more rows later (a table grown
    /// over time) the first lists' chunks are all unused by the end (benches/README.md,
    /// `load`, session 65).
    pub(super) fn abandon(&mut self, list: Packed) {
        let filling = self.chunks.len() - 1;
        let at = list.chunk as usize;
        let chunk = &mut self.chunks[at];
        chunk.abandoned += list.bytes();
        if chunk.abandoned == chunk.used && at != filling && chunk.unmap() {
            self.unmapped += 1;
        }
    }

    /// Bytes mapped for the lists (what they can hold, used or not).
    pub(super) fn mapped_bytes(&self) -> usize {
        (self.chunks.len() - self.unmapped) * HUGE_PAGE
    }

    /// Bytes the lists take in the chunks still mapped, those left unused (`abandon`)
    /// among them.
    pub(super) fn used_bytes(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.used).sum()
    }

    /// Bytes of lists left unused (`abandon`) in chunks still mapped.
    pub(super) fn abandoned_bytes(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.abandoned).sum()
    }

    /// How many chunks `abandon` unmapped.
    pub(super) fn unmapped_chunks(&self) -> usize {
        self.unmapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_back_as_packed_across_chunks() {
        let mut arena = Arena::default();
        // Lists of every length up to past the scan, and two long ones (1.2 MB each), the
        // second of which no longer fits in the first chunk.
        let long = |step: u32| {
            (0..100_000u32)
                .map(|i| (step * i + 1, u64::from(i)))
                .collect()
        };
        let lists: Vec<Vec<(u32, u64)>> = (2..40)
            .map(|len| {
                (0..len)
                    .map(|i| (3 * i + 1, u64::from(i) << 7 | 1))
                    .collect()
            })
            .chain([long(2), long(5)])
            .collect();
        let packed: Vec<Packed> = lists
            .iter()
            .map(|list| arena.pack(list.iter().copied()).expect("fits"))
            .collect();
        assert_eq!(arena.mapped_bytes(), 2 * HUGE_PAGE);
        for chunk in &arena.chunks {
            assert_eq!(chunk.bytes().as_ptr() as usize % HUGE_PAGE, 0);
        }
        for (list, &p) in lists.iter().zip(&packed) {
            assert_eq!(arena.iter(p).collect::<Vec<_>>(), *list);
            for &(object, bits) in list {
                assert_eq!(arena.get(p, object), Some(bits));
                assert_eq!(arena.get(p, object + 1), None);
            }
            assert_eq!(arena.get(p, 0), None);
            assert_eq!(arena.get(p, u32::MAX), None);
        }
    }

    /// A chunk whose every list is abandoned is unmapped, but for the one being filled;
    /// one with a list still held stays, and the lists of the others read as packed.
    #[test]
    fn a_chunk_whose_lists_are_all_abandoned_is_unmapped() {
        let mut arena = Arena::default();
        // Lists of 1,000 grants (12,000 bytes): 174 to a chunk.
        let list = |i: u32| (0..1_000u32).map(move |o| (o * 3 + i, u64::from(i) | 1));
        let packed: Vec<Packed> = (0..400)
            .map(|i| arena.pack(list(i)).expect("fits"))
            .collect();
        let in_chunk = |c: u32| packed.iter().filter(move |p| p.chunk == c).copied();
        assert_eq!(arena.mapped_bytes(), 3 * HUGE_PAGE);
        // The first chunk wholly, the second but for one list, the third (being filled)
        // wholly.
        for p in in_chunk(0).chain(in_chunk(1).skip(1)).chain(in_chunk(2)) {
            arena.abandon(p);
        }
        assert_eq!(arena.unmapped_chunks(), 1);
        assert_eq!(arena.mapped_bytes(), 2 * HUGE_PAGE);
        assert!(arena.chunks[0].map.is_empty());
        let kept = in_chunk(1).next().expect("a list");
        let i = packed.iter().position(|&p| p == kept).expect("packed") as u32;
        assert_eq!(
            arena.iter(kept).collect::<Vec<_>>(),
            list(i).collect::<Vec<_>>()
        );
        assert_eq!(
            arena.used_bytes() - arena.abandoned_bytes(),
            kept.bytes(),
            "what is still held"
        );
        // The chunk being filled takes more lists.
        let more = arena.pack(list(7)).expect("fits");
        assert_eq!(more.chunk, 2);
        assert_eq!(
            arena.iter(more).collect::<Vec<_>>(),
            list(7).collect::<Vec<_>>()
        );
    }

    /// Once asked to, the arena takes the chunks after its first from a thread that maps
    /// them ahead, until the thread is stopped; the lists read back as packed.
    #[test]
    fn chunks_after_the_first_come_from_the_thread_that_maps_ahead() {
        let mut arena = Arena::default();
        arena.map_ahead();
        // Lists of 1,000 grants (12,000 bytes): 174 to a chunk, so 5 chunks.
        let list = |i: u32| (0..1_000u32).map(move |o| (o * 3 + i, u64::from(i) | 1));
        let packed: Vec<Packed> = (0..800)
            .map(|i| arena.pack(list(i)).expect("fits"))
            .collect();
        assert_eq!(arena.mapped_bytes(), 5 * HUGE_PAGE);
        assert_eq!(arena.mapped_ahead(), (4, true), "chunks from the thread");
        arena.stop_mapping_ahead();
        assert_eq!(arena.mapped_ahead(), (4, false));
        // Chunks mapped after it stopped are mapped here.
        let more: Vec<Packed> = (800..1_000)
            .map(|i| arena.pack(list(i)).expect("fits"))
            .collect();
        assert_eq!(arena.mapped_bytes(), 6 * HUGE_PAGE);
        assert_eq!(arena.mapped_ahead(), (4, false));
        for chunk in &arena.chunks {
            assert_eq!(chunk.bytes().as_ptr() as usize % HUGE_PAGE, 0);
        }
        for (i, &p) in (0..).zip(packed.iter().chain(&more)) {
            assert_eq!(
                arena.iter(p).collect::<Vec<_>>(),
                list(i).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn what_does_not_fit_is_refused() {
        let mut arena = Arena::default();
        assert_eq!(arena.pack([(1, 1)].into_iter()), None);
        assert_eq!(arena.pack((0..200_000).map(|i| (i, 1))), None);
        assert_eq!(arena.mapped_bytes(), 0);
    }
}
