//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds `migrations/` at
//! build time, and cargo does not watch files a macro reads.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
