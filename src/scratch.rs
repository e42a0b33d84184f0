//! A test's scratch directory. Shared by the unit tests and, through `#[path]`, by the
//! integration tests (`tests/common`), without making it part of the library.

use std::path::{Path, PathBuf};

/// A directory of a test's own under the temp dir (`permd-{tag}-{pid}`), made empty, and
/// removed when dropped: also when the test fails, which left them behind before.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Makes the directory for `tag`, emptied if a run before left it.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("permd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
