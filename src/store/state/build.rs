//! Building a generation: from a full load's rows (`StateBuilder`), and from another
//! generation (a compaction's rebuild, `State::rebuilt`).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;

use super::super::arena::{Arena, Packed};
use super::super::grants::{Grant, Grants, Held, Slot, Thin};
use super::super::Hasher;
use super::{fixed_object_id, State, SubjectEntry, GRANTS_RUN, NEVER, WILDCARD};

impl State {
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
                .map(|(object, bits)| (object, Held::of_bits(bits)));
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
                fixed_object_id(&*name).unwrap_or_else(|| builder.state.objects.intern_mut(&name))
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

/// Builds a `State` from a full snapshot, off the async runtime, while the rows stream in.
///
/// Rows come in the table's physical order. Where a subject's rows sit together (they
/// were written a user at a time), each such run becomes the subject's entry as soon as
/// the next subject's rows begin, so the build keeps pace with the COPY, nothing is left
/// to sort at the end, and no more than one subject's rows are held aside. A subject met
/// again after its first run (its rows are scattered over the table) has its later rows
/// set aside (`Aside`) and merged into its entry once, at the end.
///
/// A table whose rows were written over time, a grant at a time, holds most subjects'
/// rows scattered: a run is a row, and each one's look-up in a subject map of millions
/// is a cache miss (a scattered table of 10M rows loaded at a third of the speed of one
/// in subject order, 84 % of the time in those look-ups; benches/README.md, `load`).
/// So once a window of runs shows that many of them are subjects met before
/// (`SCATTERED`), every later run goes aside with no look-up: at the end the rows set
/// aside are sorted by where their subject's entry lies in the subject map, and each
/// subject's are read side by side and looked up once, the look-ups sweeping the map
/// (`merge_aside`).
pub(crate) struct StateBuilder {
    state: State,
    /// The subject of the current run (when `run` is not empty); reused from run to run.
    subject: String,
    /// The current run's rows as (object id, slot); reused from run to run.
    run: Vec<(u32, Slot)>,
    /// The rows of subjects met again after their first run (all rows, once
    /// `aside_all`), merged into their entries in `finish`.
    pub(super) aside: Aside,
    /// Set once the runs are seen to be scattered: every later run goes aside with no
    /// look-up in the subject map.
    pub(super) aside_all: bool,
    /// Runs ended and runs of subjects met before, in the current window of runs.
    window: (u32, u32),
    /// How many runs a window counts; `WINDOW` but in tests.
    pub(super) window_size: u32,
    limits: HashMap<Box<str>, Vec<(u32, i64)>, Hasher>,
    /// Tuple rows stored so far.
    tuples: u64,
    /// Bytes of the heap the entries built so far hold (`SubjectEntry::heap_bytes`).
    heap: usize,
    /// Tests: mapping a chunk for the lists packed again fails once this many are mapped.
    #[cfg(test)]
    repack_chunk_limit: Option<usize>,
}

impl StateBuilder {
    pub(crate) fn new() -> Self {
        // The subject map and the object interner start small and grow. A table
        // pre-sized from a guess is touched all over by random inserts and stays
        // resident at its full size; grown, it ends at the size an exact guess would
        // have given (tables grow by powers of two). An oversized object table also
        // slows the load: it was sized from the row count (rows / 64), 256k buckets
        // (8 MiB) for 50,000 objects at 10M rows, and every row's object look-up
        // missed the cache; grown, 64k buckets (2 MiB): about 10 % less CPU for the
        // load (benches/README.md, `load`).
        Self {
            state: State::with_capacity(16, 16),
            subject: String::new(),
            run: Vec::new(),
            aside: Aside::default(),
            aside_all: false,
            window: (0, 0),
            window_size: WINDOW,
            limits: HashMap::with_hasher(Hasher::default()),
            tuples: 0,
            heap: 0,
            #[cfg(test)]
            repack_chunk_limit: None,
        }
    }

    /// A builder for a full load from Postgres: its arena's chunks after the first are
    /// mapped and touched ahead by a thread of their own (`Arena::map_ahead`). Not for a
    /// compaction's rebuild, which runs beside the applier and the checks: there the
    /// thread took the second core from them, and writes made during a compaction of 10M
    /// tuples took 3.0 to 4.5 ms to be visible at the 99th percentile against 0.4 to 0.9
    /// without it (in four of six runs), for a compaction about as long; at 50M, 1.6 s
    /// longer and 1.6 ms against 4.3 (benches/README.md, `load`, session 67; in session
    /// 70, 1.5 to 1.9 s longer and 1.3 to 1.5 ms against 3.5 to 4.0). A reload
    /// (a full load while a generation is served) keeps it: the checks made during one
    /// took the same at the 99th percentile without it, and a reload of 10M tuples
    /// took 0.7 s longer without it (session 68).
    pub(crate) fn for_full_load() -> Self {
        let mut builder = Self::new();
        builder.state.packed.map_ahead();
        builder
    }

    /// Adds one tuple row; `expires_at` in microseconds since the Unix epoch.
    pub(crate) fn tuple(
        &mut self,
        subject: &str,
        object: &str,
        permission: &str,
        expires_at: Option<i64>,
    ) {
        let permission = self.state.permissions.intern_mut(permission);
        // Plan permissions are all on '': no look-up for them.
        let object =
            fixed_object_id(object).unwrap_or_else(|| self.state.objects.intern_mut(object));
        self.tuple_of_ids(subject, object, permission, expires_at);
    }

    /// `tuple` of a COPY row's object and permission as they came: their bytes are
    /// checked to be UTF-8 only when the name is new (`Interner::intern_mut_bytes`). The
    /// error names the field that is not.
    pub(crate) fn copied_tuple(
        &mut self,
        subject: &str,
        object: &[u8],
        permission: &[u8],
        expires_at: Option<i64>,
    ) -> Result<(), &'static str> {
        let permission = (self.state.permissions)
            .intern_mut_bytes(permission)
            .ok_or("permission")?;
        let object = match fixed_object_id(object) {
            Some(id) => id,
            None => self
                .state
                .objects
                .intern_mut_bytes(object)
                .ok_or("object")?,
        };
        self.tuple_of_ids(subject, object, permission, expires_at);
        Ok(())
    }

    /// Adds one tuple row whose object and permission are interned.
    fn tuple_of_ids(
        &mut self,
        subject: &str,
        object: u32,
        permission: u32,
        expires_at: Option<i64>,
    ) {
        let slot = Slot {
            permission,
            expires_at: expires_at.unwrap_or(NEVER),
        };
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
    /// aside for `finish` when the subject already has one, and aside with no look-up once
    /// runs are seen to be scattered.
    fn end_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        if !self.aside_all {
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
            self.count_run(new);
            if new {
                self.run.clear();
                return;
            }
        }
        if self.aside.expiring.len() + self.run.len() >= self.aside.expiring_limit {
            self.merge_aside();
        }
        let place = self.state.subjects.place(&self.subject);
        self.aside.push(&self.subject, place, &self.run);
        self.run.clear();
    }

    /// Counts a run stored (`new`: under a subject met for the first time) in the window,
    /// and sets `aside_all` at the end of a window in which `SCATTERED` or more of the
    /// runs were of subjects met before.
    fn count_run(&mut self, new: bool) {
        let (runs, again) = &mut self.window;
        *runs += 1;
        *again += u32::from(!new);
        if *runs < self.window_size {
            return;
        }
        if f64::from(*again) >= SCATTERED * f64::from(*runs) {
            self.aside_all = true;
            tracing::info!(
                runs = *runs,
                of_subjects_met_before = *again,
                "the subjects' rows lie scattered over the table: the rest are set aside and \
                 grouped by subject at the end"
            );
        }
        self.window = (0, 0);
    }

    /// Merges the rows set aside into their subjects' entries (a subject's first entry
    /// when it has none yet), and empties the aside. The rows are sorted by where their
    /// subject's entry lies in the subject map (`Subjects::place_order`), then by its
    /// place, so that each subject's rows lie side by side, its entry is looked up once,
    /// and the look-ups sweep the map in order. Rows whose place is the same are checked
    /// for the same name: those of two names of one place are sorted by name, so that
    /// each name's too are merged at once (and were they not, each group of one name would
    /// still go to its own subject).
    fn merge_aside(&mut self) {
        let mut rows = std::mem::take(&mut self.aside.rows);
        let names = std::mem::take(&mut self.aside.names);
        let expiring = std::mem::take(&mut self.aside.expiring);
        if rows.is_empty() {
            return;
        }
        let (count, started) = (rows.len(), std::time::Instant::now());
        let order = self.state.subjects.place_order();
        sort_on_two_threads(&mut rows, |row| (order(row.place), row.place));
        let sorted = started.elapsed();
        let mut slots = Vec::new();
        // From the end, letting go of the rows merged as the entries they make grow, so
        // that a reload's peak holds the larger of the two, not both (a scattered table
        // of 50M rows sets 1.6 GB aside).
        while let Some(last) = rows.last() {
            let place = last.place;
            let start = rows
                .iter()
                .rposition(|row| row.place != place)
                .map_or(0, |i| i + 1);
            let same_place = &mut rows[start..];
            let first = name_of(&same_place[0], &names);
            if !same_place.iter().all(|row| name_of(row, &names) == first) {
                same_place.sort_unstable_by(|a, b| name_of(a, &names).cmp(name_of(b, &names)));
            }
            for subject in same_place.chunk_by(|a, b| name_of(a, &names) == name_of(b, &names)) {
                slots.extend(subject.iter().map(|row| {
                    let expires_at = match row.expires {
                        NO_EXPIRY => NEVER,
                        at => expiring[at as usize],
                    };
                    let slot = Slot {
                        permission: row.permission,
                        expires_at,
                    };
                    (row.object, slot)
                }));
                let name = std::str::from_utf8(name_of(&subject[0], &names))
                    .expect("a name set aside is a whole str's bytes");
                self.merge(name, &mut slots);
            }
            rows.truncate(start);
            if rows.capacity() - rows.len() >= RELEASE_ROWS {
                // A large vector is a mapping of its own, which glibc shrinks in place.
                rows.shrink_to_fit();
            }
        }
        tracing::info!(
            rows = count,
            sort_ms = sorted.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            chunks_unmapped = self.state.packed.unmapped_chunks(),
            "the rows set aside merged into their subjects' entries"
        );
    }

    /// Merges `rows` into `subject`'s entry, or makes them its first; leaves `rows` empty.
    fn merge(&mut self, subject: &str, rows: &mut Vec<(u32, Slot)>) {
        let state = &mut self.state;
        let entry = state.subjects.loaded_or_default(subject);
        let grants = std::mem::take(&mut entry.grants);
        self.heap -= grants.heap_bytes();
        let packed = match grants {
            Grants::Packed(list) => Some(list),
            _ => None,
        };
        for (object, grant) in grants.into_vec(&state.packed) {
            let grant = grant.held();
            self.tuples -= grant.row_count();
            rows.extend(grant.rows().map(|(permission, expires_at)| {
                let slot = Slot {
                    permission,
                    expires_at,
                };
                (object, slot)
            }));
        }
        if let Some(list) = packed {
            state.packed.abandon(list);
        }
        entry.grants = grants_of(rows, &mut self.tuples, &mut state.packed);
        self.heap += entry.grants.heap_bytes();
        rows.clear();
    }

    /// Packs every list again, in a new arena, when the lists merged left `REPACK_SHARE`
    /// or more of the arena's mapped chunks unused: a subject whose first rows came
    /// together had them packed, and its rows met later were merged into a new list (a
    /// table whose users got their first grants at once and more over time: half again
    /// the arena, unused until a compaction; benches/README.md, `load`). A chunk all of
    /// whose lists were merged is unmapped as the merge goes (`Arena::abandon`): where
    /// every subject got rows later, nothing is left to pack again. One walk of the
    /// subject map copies each list as its entry comes (a read at random in the old
    /// arena, as many as a sort by place would spare, where that sort's lists of places
    /// stayed with malloc), and the old arena is dropped after. A list the new arena has
    /// no memory mapped for goes to the heap, as at the load.
    fn repack(&mut self) {
        let state = &mut self.state;
        let (used, abandoned) = (state.packed.used_bytes(), state.packed.abandoned_bytes());
        if abandoned == 0 || (abandoned as f64) < REPACK_SHARE * used as f64 {
            return;
        }
        let started = std::time::Instant::now();
        let ahead = state.packed.maps_ahead();
        state.packed.stop_mapping_ahead();
        let mut arena = Arena::default();
        if ahead {
            arena.map_ahead();
        }
        #[cfg(test)]
        {
            arena.chunk_limit = self.repack_chunk_limit;
        }
        let (old, heap) = (&state.packed, &mut self.heap);
        state.subjects.for_each_loaded_mut(|entry| {
            let Grants::Packed(list) = entry.grants else {
                return;
            };
            entry.grants = match arena.pack(old.iter(list)) {
                Some(packed) => Grants::Packed(packed),
                None => {
                    let grants = Grants::from_vec(std::mem::take(&mut entry.grants).into_vec(old));
                    *heap += grants.heap_bytes();
                    grants
                }
            };
        });
        tracing::info!(
            unused_mib = abandoned >> 20,
            of_mib = used >> 20,
            now_mib = arena.used_bytes() >> 20,
            took_ms = started.elapsed().as_millis() as u64,
            "the lists merged during the load left part of the arena unused: packed again"
        );
        state.packed = arena;
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
        self.merge_aside();
        self.repack();
        self.state.packed.stop_mapping_ahead();
        let Self {
            mut state,
            limits,
            tuples,
            mut heap,
            ..
        } = self;
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

/// Runs a window of `StateBuilder::count_run` counts: 65,536 runs, a few milliseconds of
/// a load.
const WINDOW: u32 = 1 << 16;

/// The share of a window's runs that are of subjects met before at and past which the
/// table's rows are taken to be scattered (`StateBuilder::aside_all`). A table in subject
/// order has next to none; one whose subjects' rows lie apart has most of its runs so
/// once each subject was met.
const SCATTERED: f64 = 0.25;

/// Rows set aside by the full load (`StateBuilder::end_run`), each with its subject's
/// name and place, until they are merged into their subjects' entries (`merge_aside`):
/// 32 bytes a row, and a name of more than `INLINE` bytes once a run.
pub(super) struct Aside {
    rows: Vec<AsideRow>,
    /// The runs' subject names not held in their rows (`AsideRow::name`), one after
    /// another.
    names: String,
    /// The `expires_at` of the rows that have one.
    expiring: Vec<i64>,
    /// What is kept of a subject's place: all of it, but in a test of names of one place.
    pub(super) place_mask: u32,
    /// How many expiring rows may be set aside before the rows are merged, whatever the
    /// COPY has left (`StateBuilder::end_run`): as many as `AsideRow::expires` can count,
    /// but in a test of merges during the load.
    pub(super) expiring_limit: usize,
}

impl Default for Aside {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            names: String::new(),
            expiring: Vec::new(),
            place_mask: u32::MAX,
            expiring_limit: NO_EXPIRY as usize,
        }
    }
}

/// The longest name a row set aside holds itself: the merge compares each row's name
/// with its neighbour's, and one read from the arena of names, in COPY order, was a cache
/// miss a row once the rows were sorted (17 % of a scattered table's load).
const INLINE: usize = 16;

/// The share of the arena that lists merged during the load may leave unused before the
/// lists are packed again (`StateBuilder::repack`).
const REPACK_SHARE: f64 = 0.2;

/// Rows merged from the end of the rows set aside past which their memory is let go of
/// (`StateBuilder::merge_aside`): 32 MiB.
const RELEASE_ROWS: usize = 1 << 20;

/// `AsideRow::expires` of a row that never expires.
const NO_EXPIRY: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct AsideRow {
    /// Where the subject's entry lies (`Subjects::place`).
    place: u32,
    /// The subject's name, zero-padded, if it has 1 to `INLINE` bytes and no zero byte
    /// (a Postgres text never has one); else a zero byte, then at 4 the name's length
    /// (u32) and at 8 where it starts in `Aside::names` (u64), little-endian.
    name: [u8; INLINE],
    object: u32,
    permission: u32,
    /// Where the row's `expires_at` is in `Aside::expiring`, or `NO_EXPIRY`.
    expires: u32,
}

const _: () = assert!(std::mem::size_of::<AsideRow>() == 32);

/// The bytes of `row`'s subject name; `names` is `Aside::names`.
fn name_of<'a>(row: &'a AsideRow, names: &'a str) -> &'a [u8] {
    let name = &row.name;
    if name[0] != 0 {
        // Zero-padded: the zero bytes at the end are the most significant.
        let padding = u128::from_le_bytes(*name).leading_zeros() / 8;
        return &name[..INLINE - padding as usize];
    }
    let len = u32::from_le_bytes([name[4], name[5], name[6], name[7]]);
    let mut at = [0; 8];
    at.copy_from_slice(&name[8..]);
    &names.as_bytes()[u64::from_le_bytes(at) as usize..][..len as usize]
}

impl Aside {
    /// Sets `run`, `subject`'s rows, aside; `place` is where its entry lies
    /// (`Subjects::place`). `expiring` must have room for `run`'s rows below `NO_EXPIRY`.
    fn push(&mut self, subject: &str, place: u32, run: &[(u32, Slot)]) {
        let place = place & self.place_mask;
        let mut name = [0; INLINE];
        let bytes = subject.as_bytes();
        if (1..=INLINE).contains(&bytes.len()) && !bytes.contains(&0) {
            name[..bytes.len()].copy_from_slice(bytes);
        } else {
            // A COPY field's length is an i32: a name's fits.
            name[4..8].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            name[8..].copy_from_slice(&(self.names.len() as u64).to_le_bytes());
            self.names.push_str(subject);
        }
        for &(object, slot) in run {
            let expires = if slot.expires_at == NEVER {
                NO_EXPIRY
            } else {
                self.expiring.push(slot.expires_at);
                (self.expiring.len() - 1) as u32
            };
            self.rows.push(AsideRow {
                place,
                name,
                object,
                permission: slot.permission,
                expires,
            });
        }
    }
}

/// Rows past which `sort_on_two_threads` sorts on two threads: a sort of fewer is over
/// within a few milliseconds.
const SORT_ON_TWO: usize = 1 << 16;

/// Sorts `rows` by `key`, unstably, on two threads when there are many: they are split at
/// their median (`select_nth_unstable_by_key`, one pass or a few), and the lower half is
/// sorted on a thread of its own while this one sorts the upper. The merge of the rows set
/// aside sorts them once Postgres has sent every row, when the other core is idle (32M rows
/// of a grown table at 50M tuples: 1.6 to 2.2 s on one thread, 1.0 to 1.2 on two;
/// benches/README.md, `load`, session 66). On one thread where a second cannot be started.
fn sort_on_two_threads<T: Send, K: Ord>(rows: &mut [T], key: impl Fn(&T) -> K + Sync) {
    if rows.len() < SORT_ON_TWO {
        rows.sort_unstable_by_key(&key);
        return;
    }
    let half = rows.len() / 2;
    rows.select_nth_unstable_by_key(half, &key);
    let (low, high) = rows.split_at_mut(half);
    let key = &key;
    let on_two = std::thread::scope(|scope| {
        let low_sorted = std::thread::Builder::new()
            .name("permd-sort".to_owned())
            .spawn_scoped(scope, || low.sort_unstable_by_key(key));
        high.sort_unstable_by_key(key);
        low_sorted
            .inspect_err(|error| tracing::debug!(%error, "could not start a thread to sort on"))
            .is_ok()
    });
    if !on_two {
        low.sort_unstable_by_key(key);
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
    use super::super::tests::{mixed_state, row, subject_name};
    use super::super::Now;
    use super::*;

    /// Asserts that `a` and `b` answer each of `checks` (subject, permission, object)
    /// alike.
    fn assert_same_answers<'a>(
        a: &State,
        b: &State,
        checks: impl Iterator<Item = (String, &'a str, String)>,
    ) {
        let mut asked = 0;
        for (subject, permission, object) in checks {
            assert_eq!(
                a.check(&subject, permission, &object, &mut Now::lazy()),
                b.check(&subject, permission, &object, &mut Now::lazy()),
                "{subject} {permission} {object}"
            );
            asked += 1;
        }
        assert!(asked > 0, "no check asked");
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
        let checks = (0..1_000).step_by(7).flat_map(|s| {
            (0..200).step_by(13).flat_map(move |o| {
                ["p0", "p1", "p2"].map(|permission| (format!("s{s}"), permission, format!("o{o}")))
            })
        });
        assert_same_answers(&packed, &mixed, checks);
    }

    /// Subjects whose first rows came together (packed as their run ended) and whose
    /// later rows came apart (set aside, merged into a new list at the end): every list
    /// is packed again, so that the arena holds what a rebuild's does, not half as much
    /// again; the lists the new arena has no memory mapped for go to the heap (here all
    /// but the first chunk's). All answer as a load of the same rows in subject order.
    #[test]
    fn lists_merged_during_the_load_are_packed_again() {
        let subjects = 20_000;
        let rows = |s: u64, n: u64| {
            let object = format!("doc:{}", (s * 7 + n) % 5_000);
            let permission = if n < 5 {
                "read"
            } else {
                ["p0", "p1"][n as usize % 2]
            };
            (format!("user:{s}"), object, permission)
        };
        let load = |repack_chunk_limit| {
            let mut builder = StateBuilder::new();
            builder.repack_chunk_limit = repack_chunk_limit;
            for s in 0..subjects {
                for n in 0..5 {
                    let (subject, object, permission) = rows(s, n);
                    builder.tuple(&subject, &object, permission, None);
                }
            }
            for n in 5..10 {
                for s in 0..subjects {
                    let (subject, object, permission) = rows(s, n);
                    builder.tuple(&subject, &object, permission, None);
                }
            }
            builder.finish()
        };
        let mut in_order = StateBuilder::new();
        for s in 0..subjects {
            for n in 0..10 {
                let (subject, object, permission) = rows(s, n);
                in_order.tuple(&subject, &object, permission, None);
            }
        }
        let in_order = in_order.finish();
        let repacked = load(None);
        let partly = load(Some(1));
        let rebuilt = repacked.rebuilt();
        assert_eq!(repacked.packed.used_bytes(), rebuilt.packed.used_bytes());
        assert_eq!(repacked.packed.used_bytes(), in_order.packed.used_bytes());
        // The merged lists of 120 bytes, of which one chunk holds 17,476.
        assert_eq!(repacked.packed.used_bytes(), subjects as usize * 120);
        assert_eq!(partly.packed.used_bytes(), (2 << 20) / 120 * 120);
        assert!(partly.heap_loaded > repacked.heap_loaded);
        for state in [&repacked, &partly] {
            assert_eq!(state.digest(), in_order.digest());
            let checks = (0..subjects).step_by(97).flat_map(|s| {
                [0, 4, 5, 9, 10].into_iter().flat_map(move |n| {
                    let (subject, object, _) = rows(s, n);
                    ["read", "p0", "p1"]
                        .map(|permission| (subject.clone(), permission, object.clone()))
                })
            });
            assert_same_answers(state, &in_order, checks);
        }
    }

    /// Where every subject got a row more after its first ones (a table grown over time),
    /// the chunks that held nothing but first lists are unmapped as the merge goes, and
    /// what is left unused is too little to pack again: the state answers as one loaded
    /// in subject order.
    #[test]
    fn chunks_left_unused_by_the_merge_are_unmapped() {
        let subjects = 12_000;
        // First lists of 30 grants, 360 bytes: two chunks and a part of a third.
        let row = |s: u64, n: u64| {
            let object = format!("doc:{}", (s * 7 + n * 13) % 5_000);
            (
                format!("user:{s}"),
                object,
                ["read", "write"][n as usize % 2],
            )
        };
        let mut grown = StateBuilder::for_full_load();
        let mut in_order = StateBuilder::new();
        for s in 0..subjects {
            for n in 0..31 {
                let (subject, object, permission) = row(s, n);
                in_order.tuple(&subject, &object, permission, None);
                if n < 30 {
                    grown.tuple(&subject, &object, permission, None);
                }
            }
        }
        for s in 0..subjects {
            let (subject, object, permission) = row(s, 30);
            grown.tuple(&subject, &object, permission, None);
        }
        let (grown, in_order) = (grown.finish(), in_order.finish());
        assert_eq!(grown.packed.unmapped_chunks(), 2);
        // The chunks after the first came from the thread that maps ahead, which ended
        // with the build.
        let (ahead, running) = grown.packed.mapped_ahead();
        assert_eq!(ahead + 1, grown.packed.mapped_bytes() / (2 << 20) + 2);
        assert!(!running);
        // A compaction's rebuild, beside the applier and the checks, maps its own, and the
        // builder of a test or of `Store::from_tuples` too.
        let rebuilt = grown.rebuilt();
        assert!(
            rebuilt.packed.mapped_bytes() > 2 << 20,
            "more than one chunk"
        );
        assert_eq!(rebuilt.packed.mapped_ahead(), (0, false));
        assert_eq!(in_order.packed.mapped_ahead(), (0, false));
        // Not packed again: the first lists in the third chunk are still there, unused.
        assert!(grown.packed.abandoned_bytes() > 0);
        assert_eq!(
            grown.packed.used_bytes() - grown.packed.abandoned_bytes(),
            in_order.packed.used_bytes()
        );
        // At most the chunk that holds first lists and merged ones more than in order.
        assert!(grown.packed.mapped_bytes() <= in_order.packed.mapped_bytes() + (2 << 20));
        assert_eq!(grown.digest(), in_order.digest());
        let checks = (0..subjects).step_by(89).flat_map(|s| {
            [0, 29, 30, 31].into_iter().flat_map(move |n| {
                let (subject, object, _) = row(s, n);
                ["read", "write"].map(|permission| (subject.clone(), permission, object.clone()))
            })
        });
        assert_same_answers(&grown, &in_order, checks);
    }

    /// Rows sorted on two threads are in order and all there, on either side of the size
    /// past which a second thread sorts.
    #[test]
    fn rows_sorted_on_two_threads_are_in_order_and_all_there() {
        for len in [0, 1, 1_000, 3 * SORT_ON_TWO as u32 + 7] {
            // Keys of 1,000 values, repeated, in no order; the second field tells the rows
            // of one key apart.
            let rows: Vec<(u32, u32)> = (0..len)
                .map(|i: u32| (i.wrapping_mul(2_654_435_761) % 1_000, i))
                .collect();
            let mut sorted = rows.clone();
            sort_on_two_threads(&mut sorted, |&(key, _)| key);
            assert!(
                sorted.windows(2).all(|pair| pair[0].0 <= pair[1].0),
                "{len}"
            );
            let (mut before, mut after) = (rows, sorted);
            before.sort_unstable();
            after.sort_unstable();
            assert_eq!(before, after, "{len}");
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
}
