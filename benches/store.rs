//! In-process check latency: `cargo bench --bench store`.
//!
//! Builds a store of 100,000 subjects with 10 tuples each (1,000,000 tuples, 40
//! permission names) through the same code the loader uses, then times:
//! - global checks on a store where every subject holds its permissions on the global
//!   object only (plan permissions), rotating over 1,024 subjects (a working set larger
//!   than this machine's per-core L2 cache);
//! - batches of 100 checks over random subjects, global and on objects, `check_many`
//!   against the same checks one by one;
//! - object checks that hit and miss, rotating over 1,024 subjects, and hits on 16
//!   subjects (all in cache);
//! - object checks that hit, rotating over all 100,000 subjects (`check_allowed_cold`: a
//!   working set of ~40 MB, past any cache of this machine, where 1,024 subjects may now fit
//!   in a larger L2), and the same with subjects and objects named by UUIDs
//!   (`check_allowed_cold_uuid`: `user:` and `doc:` and a UUID, names of 40 and 41 bytes,
//!   as many products give their users and documents);
//! - global checks from two threads at once (`check_global_two_threads`), as a daemon's two
//!   workers make them, over 1,024 subjects and over all 100,000;
//! - `memory_latency`: one load that misses every cache (a pointer chase over 64 MiB), the
//!   unit in which `check_allowed_cold` is counted;
//! - `list_objects`: the objects of one subject holding 100,000 (an owner of a large
//!   tree), whole and a page of 100 from the middle (`limit`, `after`);
//! - `check_large_subject`: object checks, half of them hits, on one subject holding
//!   1,000,000 objects (too many to pack: its grants are in the heap, in chunks), another
//!   subject holding the million objects between them; `list_large_subject`: a
//!   page of 100 of its objects, from the middle, and the whole list;
//! - `list_public`: pages of a subject's objects when `*` holds a million grants, of a
//!   permission `*` holds and of one it does not.

use criterion::{criterion_main, Criterion, Throughput};
use permd::store::Store;
use std::hint::black_box;

const SUBJECTS: u32 = 100_000;
const PER_SUBJECT: u32 = 10;
const PERMISSIONS: u32 = 40;

/// A UUID made from `n` (distinct for distinct `n`), as many products name their users
/// and documents.
fn uuid(n: u32) -> String {
    let h = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let tail = u64::from(n) * 0x1_0001;
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{tail:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 12) & 0xfff
    )
}

/// Subject `s`'s name: `user:N`, or with `uuid` `user:` and a UUID (41 bytes).
fn subject(s: u32, uuid: bool) -> String {
    if uuid {
        format!("user:{}", self::uuid(s))
    } else {
        format!("user:{s}")
    }
}

/// Object `o`'s name: `doc:N`, or with `uuid` `doc:` and a UUID (40 bytes).
fn object(o: u32, uuid: bool) -> String {
    if uuid {
        format!("doc:{}", self::uuid(o))
    } else {
        format!("doc:{o}")
    }
}

fn store(uuid: bool) -> Store {
    let mut rows = Vec::with_capacity((SUBJECTS * PER_SUBJECT) as usize);
    for s in 0..SUBJECTS {
        for t in 0..PER_SUBJECT {
            rows.push((
                subject(s, uuid),
                object((s * 7 + t) % 50_000, uuid),
                format!("perm{}", (s + t) % PERMISSIONS),
            ));
        }
    }
    Store::from_tuples(
        rows.iter()
            .map(|(s, o, p)| (s.as_str(), o.as_str(), p.as_str(), None)),
    )
}

/// The shape of plan permissions (and of the `compare` suite): every subject holds its 10
/// permissions globally, on the one object ''.
fn global_store() -> Store {
    let mut rows = Vec::with_capacity((SUBJECTS * PER_SUBJECT) as usize);
    for s in 0..SUBJECTS {
        for t in 0..PER_SUBJECT {
            rows.push((
                format!("user:{s}"),
                format!("perm{}", (s + 4 * t) % PERMISSIONS),
            ));
        }
    }
    Store::from_tuples(rows.iter().map(|(s, p)| (s.as_str(), "", p.as_str(), None)))
}

fn checks(c: &mut Criterion) {
    {
        let store = global_store();
        let queries: Vec<(String, String)> = (0..1024u32)
            .map(|i| {
                let s = (i * 97) % SUBJECTS;
                (format!("user:{s}"), format!("perm{}", s % PERMISSIONS))
            })
            .collect();
        let mut i = 0usize;
        c.bench_function("check_global", |b| {
            b.iter(|| {
                i = (i + 1) & 1023;
                let (s, p) = &queries[i];
                let allowed = store.check(black_box(s), black_box(p), black_box(""));
                assert!(allowed);
                allowed
            });
        });
    }
    batches(c);
    let store = store(false);
    // (subject, held permission, not-held permission, object) for 1,024 subjects.
    let queries: Vec<(String, String, String, String)> = (0..1024u32)
        .map(|i| {
            let s = (i * 97) % SUBJECTS;
            (
                format!("user:{s}"),
                format!("perm{}", s % PERMISSIONS),
                format!("perm{}", (s + 1) % PERMISSIONS),
                format!("doc:{}", (s * 7) % 50_000),
            )
        })
        .collect();
    let mut i = 0usize;
    c.bench_function("check_allowed", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (s, p, _, o) = &queries[i];
            let allowed = store.check(black_box(s), black_box(p), black_box(o));
            assert!(allowed);
            allowed
        });
    });
    // The same check on 16 subjects only, so that everything it touches stays in the
    // CPU's caches: the cost of the check's own work, without waiting on memory.
    let mut i = 0usize;
    c.bench_function("check_allowed_hot", |b| {
        b.iter(|| {
            i = (i + 1) & 15;
            let (s, p, _, o) = &queries[i];
            let allowed = store.check(black_box(s), black_box(p), black_box(o));
            assert!(allowed);
            allowed
        });
    });
    cold(c, "check_allowed_cold", &store, false);
    let mut i = 0usize;
    c.bench_function("check_denied", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let (s, _, p, o) = &queries[i];
            let allowed = store.check(black_box(s), black_box(p), black_box(o));
            assert!(!allowed);
            allowed
        });
    });
}

/// Batches of 100 checks, subjects uniform at random over all 100,000 and half the checks
/// allowed: `check_many` side by side with the same checks one by one through `check`. On
/// the global store (`batch_100`: the `compare` suite's batch workload, without HTTP and
/// JSON), and as permissions on objects (`batch_100_objects`: a subject's grants are a
/// slice of their own, a second miss per check).
fn batches(c: &mut Criterion) {
    let mut random = xorshift(SEED);
    let mut draw = move || {
        let r = random();
        ((r >> 32) as u32 % SUBJECTS, r & 1 == 0)
    };
    let global: Vec<_> = (0..1024 * BATCH)
        .map(|_| {
            let (s, allowed) = draw();
            // Subject s holds exactly the names congruent to s modulo 4.
            let p = (if allowed { s + 4 } else { s + 1 }) % PERMISSIONS;
            (
                format!("user:{s}"),
                format!("perm{p}"),
                String::new(),
                allowed,
            )
        })
        .collect();
    batch_group(c, "batch_100", &global_store(), &global);
    let objects: Vec<_> = (0..1024 * BATCH)
        .map(|_| {
            let (s, allowed) = draw();
            // Subject s holds perm{s + t} on doc:{7s + t} for t < 10 (modulo 40 and 50,000).
            let p = (if allowed { s } else { s + 1 }) % PERMISSIONS;
            let o = (s * 7) % 50_000;
            (
                format!("user:{s}"),
                format!("perm{p}"),
                format!("doc:{o}"),
                allowed,
            )
        })
        .collect();
    batch_group(c, "batch_100_objects", &store(false), &objects);
}

/// The seed of `xorshift` that most draws use.
const SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// A xorshift generator from `seed`: the same draws in every run.
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Object checks that hit, every subject once in an order that jumps across the map: no
/// look-up finds its lines in any cache.
fn cold(c: &mut Criterion, name: &str, store: &Store, uuid: bool) {
    let checks: Vec<(String, String, String)> = (0..SUBJECTS)
        .map(|i| {
            let s = (i * 7_919) % SUBJECTS;
            (
                subject(s, uuid),
                format!("perm{}", s % PERMISSIONS),
                object((s * 7) % 50_000, uuid),
            )
        })
        .collect();
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter(|| {
            i = if i + 1 == checks.len() { 0 } else { i + 1 };
            let (s, p, o) = &checks[i];
            let allowed = store.check(black_box(s), black_box(p), black_box(o));
            assert!(allowed);
            allowed
        });
    });
}

/// Global checks from two threads at once, each on subjects of its own draw, over 1,024
/// subjects (`check_global_two_threads`: every line in cache, so what is left is what the
/// threads share) and over all 100,000 (`…_all_subjects`). The time is each thread's per
/// check, comparable with `check_global` and `batch_100/one_by_one`: as a daemon's two
/// workers check, every check takes its shard's read lock, a write to a line the other
/// thread wrote last more often than not.
fn two_threads(c: &mut Criterion) {
    let store = global_store();
    let mut group = c.benchmark_group("check_global_two_threads");
    for (name, span) in [("1024_subjects", 1024), ("all_subjects", SUBJECTS)] {
        let draw = |seed: u64| -> Vec<(String, String)> {
            let mut random = xorshift(seed);
            (0..1 << 16)
                .map(|_| {
                    let s = (random() % u64::from(span)) as u32;
                    // Subject s holds exactly the names congruent to s modulo 4.
                    (
                        format!("user:{s}"),
                        format!("perm{}", (s + 4) % PERMISSIONS),
                    )
                })
                .collect()
        };
        let queries = [draw(SEED), draw(!SEED)];
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = std::sync::Barrier::new(2);
                std::thread::scope(|scope| {
                    let threads: Vec<_> = queries
                        .iter()
                        .map(|queries| {
                            let (store, start) = (&store, &start);
                            scope.spawn(move || {
                                start.wait();
                                let started = std::time::Instant::now();
                                for i in 0..iters as usize {
                                    let (s, p) = &queries[i & 0xffff];
                                    assert!(store.check(black_box(s), black_box(p), ""));
                                }
                                started.elapsed()
                            })
                        })
                        .collect();
                    threads
                        .into_iter()
                        .map(|thread| thread.join().expect("a checking thread panicked"))
                        .max()
                        .unwrap_or_default()
                })
            });
        });
    }
    group.finish();
}

/// `check_allowed_cold` with subjects and objects named by UUIDs.
fn cold_uuid(c: &mut Criterion) {
    cold(c, "check_allowed_cold_uuid", &store(true), true);
}

/// The floor under `check_allowed_cold`: one load that misses every cache of this
/// machine. A chase through 1,048,576 cache lines (64 MiB, twice the L3) linked in one
/// random cycle, each load's address read by the load before it, as a look-up's loads are.
fn memory_latency(c: &mut Criterion) {
    const LINES: usize = 1 << 20;
    #[derive(Clone, Copy)]
    #[repr(align(64))]
    struct Line {
        next: u32,
    }
    let mut order: Vec<u32> = (0..LINES as u32).collect();
    let mut random = xorshift(SEED);
    for i in (1..LINES).rev() {
        order.swap(i, (random() % (i as u64 + 1)) as usize);
    }
    let mut lines = vec![Line { next: 0 }; LINES];
    for (i, &line) in order.iter().enumerate() {
        lines[line as usize].next = order[(i + 1) % LINES];
    }
    let mut at = 0u32;
    c.bench_function("memory_latency", |b| {
        b.iter(|| {
            at = lines[black_box(at) as usize].next;
            at
        });
    });
}

/// One subject's objects listed whole and a page at a time.
fn list_objects(c: &mut Criterion) {
    const OBJECTS: u32 = 100_000;
    let names: Vec<String> = (0..OBJECTS)
        .map(|o| format!("doc:{:x}", u64::from(o).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect();
    let store = Store::from_tuples(names.iter().map(|o| ("user:1", o.as_str(), "read", None)));
    let mut group = c.benchmark_group("list_objects");
    group.sample_size(20);
    group.bench_function("whole_100000", |b| {
        b.iter(|| {
            let listing = store.objects_of("user:1", "read", "", usize::MAX);
            assert_eq!(listing.objects.len(), OBJECTS as usize);
            listing
        });
    });
    // Names are spread evenly over hex digits: about half sort after `doc:8`.
    group.bench_function("page_of_100", |b| {
        b.iter(|| {
            let page = store.objects_of("user:1", "read", black_box("doc:8"), 100);
            assert!(page.more && page.objects.len() == 100);
            page
        });
    });
    group.finish();
}

/// Object checks on one subject of a million objects, at random: half of the objects are
/// its, and each check's lines are most likely in no cache.
fn check_large_subject(c: &mut Criterion) {
    const OBJECTS: u64 = 1_000_000;
    let names: Vec<String> = (0..2 * OBJECTS).map(|o| format!("doc:{o}")).collect();
    let store = Store::from_tuples(names.iter().enumerate().map(|(o, name)| {
        let subject = if o % 2 == 0 { "user:big" } else { "user:other" };
        (subject, name.as_str(), "read", None)
    }));
    let mut draw = xorshift(SEED);
    let checks: Vec<&str> = (0..100_000)
        .map(|_| names[(draw() % (2 * OBJECTS)) as usize].as_str())
        .collect();
    let mut i = 0usize;
    c.bench_function("check_large_subject", |b| {
        b.iter(|| {
            i = if i + 1 == checks.len() { 0 } else { i + 1 };
            store.check("user:big", "read", black_box(checks[i]))
        });
    });
    let mut group = c.benchmark_group("list_large_subject");
    group.sample_size(10);
    // A page from the middle of its million: `doc:5` sorts after `doc:4999999`.
    group.bench_function("page_of_100", |b| {
        b.iter(|| {
            let page = store.objects_of("user:big", "read", black_box("doc:5"), 100);
            assert!(page.more && page.objects.len() == 100);
            page
        });
    });
    group.bench_function("whole", |b| {
        b.iter(|| {
            let listing = store.objects_of("user:big", "read", "", usize::MAX);
            assert_eq!(listing.objects.len(), OBJECTS as usize);
            listing
        });
    });
    group.finish();
}

const BATCH: usize = 100;

/// `checks` (subject, permission, object, expected answer) in batches of `BATCH`, through
/// `check_many` and one by one.
fn batch_group(
    c: &mut Criterion,
    name: &str,
    store: &Store,
    checks: &[(String, String, String, bool)],
) {
    let batches: Vec<Vec<(&str, &str, &str)>> = checks
        .chunks(BATCH)
        .map(|chunk| {
            chunk
                .iter()
                .map(|(s, p, o, _)| (s.as_str(), p.as_str(), o.as_str()))
                .collect()
        })
        .collect();
    let expected: Vec<Vec<bool>> = checks
        .chunks(BATCH)
        .map(|chunk| chunk.iter().map(|c| c.3).collect())
        .collect();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(BATCH as u64));
    let mut i = 0usize;
    group.bench_function("check_many", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let answers = store.check_many(black_box(batches[i].iter().copied()));
            assert_eq!(answers, expected[i]);
            answers
        });
    });
    let mut i = 0usize;
    group.bench_function("one_by_one", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let answers: Vec<bool> = black_box(&batches[i])
                .iter()
                .map(|&(s, p, o)| store.check(s, p, o))
                .collect();
            assert_eq!(answers, expected[i]);
            answers
        });
    });
    group.finish();
}

/// Pages of a subject's objects when `*` holds a million grants (public documents):
/// `user:1` holds `read` and `write` on ten objects each, `*` `read` on a million. A page
/// of its `read` objects is mostly `*`'s; `*` holds no `write`, so a page of its `write`
/// objects walks the names in vain before the pass.
fn list_public(c: &mut Criterion) {
    const OBJECTS: u32 = 1_000_000;
    let names: Vec<String> = (0..OBJECTS).map(|o| format!("doc:{o}")).collect();
    let public = names.iter().map(|o| ("*", o.as_str(), "read", None));
    let own = names[..10].iter().flat_map(|o| {
        [
            ("user:1", o.as_str(), "read", None),
            ("user:1", o.as_str(), "write", None),
        ]
    });
    let store = Store::from_tuples(public.chain(own));
    let mut group = c.benchmark_group("list_public");
    group.sample_size(10);
    // `doc:5` sorts after `doc:499999`: a page from the middle.
    group.bench_function("page_of_100", |b| {
        b.iter(|| {
            let page = store.objects_of("user:1", "read", black_box("doc:5"), 100);
            assert!(page.more && page.objects.len() == 100);
            page
        });
    });
    group.bench_function("page_of_100_none_public", |b| {
        b.iter(|| {
            let page = store.objects_of("user:1", "write", black_box("doc:5"), 100);
            assert_eq!(page.objects.len(), 4, "doc:6 to doc:9");
            page
        });
    });
    group.finish();
}

// The macro defines an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(
        benches,
        super::checks,
        super::cold_uuid,
        super::two_threads,
        super::memory_latency,
        super::list_objects,
        super::check_large_subject,
        super::list_public
    );
}
criterion_main!(group::benches);
