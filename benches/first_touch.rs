//! What the first touch of memory costs on this machine: `cargo bench --bench first_touch`
//! maps 1 GiB anonymously, advised `MADV_HUGEPAGE` as the arena's chunks are, writes a
//! byte in each 4 KiB page, unmaps it, waits, and does it again, for waits of 0, 1, 3 and
//! 10 s; then two threads at once, 1 GiB each.
//!
//! On a virtual machine whose host backs the guest's memory only when it is first touched,
//! and takes back what the guest frees (a balloon's free page reporting), memory never
//! touched, or freed long enough ago, costs the host's work besides the kernel's zeroing;
//! memory freed a moment ago is the guest's still. Every load, reload and compaction
//! touches its new generation's memory first (benches/README.md, `load`, session 66).

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use memmap2::{Advice, MmapOptions};

const GIB: usize = 1 << 30;

/// Maps 1 GiB, writes a byte in each page, and returns the seconds the writes took; the
/// mapping is gone when it returns.
fn touch_one_gib() -> f64 {
    let mut map = MmapOptions::new().len(GIB).map_anon().unwrap();
    // Refused without transparent huge pages: the writes then fault 4 KiB pages.
    let _ = map.advise(Advice::HugePage);
    let started = Instant::now();
    for at in (0..GIB).step_by(4096) {
        map[at] = 1;
    }
    std::hint::black_box(&map);
    started.elapsed().as_secs_f64()
}

fn main() {
    println!("| touched | after a wait of | first touch | again at once |");
    println!("|---|---:|---:|---:|");
    for wait in [0u64, 1, 3, 10] {
        // The memory the previous round freed is the host's again after a long wait.
        std::thread::sleep(Duration::from_secs(wait));
        let first = touch_one_gib();
        let again = touch_one_gib();
        println!("| 1 GiB | {wait} s | {first:.3} s | {again:.3} s |");
    }
    std::thread::sleep(Duration::from_secs(10));
    let started = Instant::now();
    let threads: Vec<_> = (0..2).map(|_| std::thread::spawn(touch_one_gib)).collect();
    let each: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    println!(
        "| 2 GiB, two threads at once | 10 s | {:.3} s ({:.3} / {:.3} s each) | |",
        started.elapsed().as_secs_f64(),
        each[0],
        each[1]
    );
}
