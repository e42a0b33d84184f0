//! In-process check latency: `cargo bench --bench store`.
//!
//! Builds a store of 100,000 subjects with 10 tuples each (1,000,000 tuples, 40
//! permission names) through the same code the loader uses, then times single checks
//! that hit and miss, rotating over 1,024 subjects; and global checks on a store where every
//! subject holds its permissions on the global object only (plan permissions), (a working set larger than this
//! machine's per-core L2 cache), and hits on 16 subjects (all in cache).

use criterion::{criterion_main, Criterion};
use permd::store::Store;
use std::hint::black_box;

const SUBJECTS: u32 = 100_000;
const PER_SUBJECT: u32 = 10;
const PERMISSIONS: u32 = 40;

fn store() -> Store {
    let mut rows = Vec::with_capacity((SUBJECTS * PER_SUBJECT) as usize);
    for s in 0..SUBJECTS {
        for t in 0..PER_SUBJECT {
            rows.push((
                format!("user:{s}"),
                format!("doc:{}", (s * 7 + t) % 50_000),
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
    let store = store();
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

// The macro defines an undocumented function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::checks);
}
criterion_main!(group::benches);
