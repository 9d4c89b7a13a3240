//! Crash-safe file writes: every file the toolkit writes (checkpoints, metrics, pictures,
//! downloads) goes to a temporary name in the same folder, is synced, then renamed into
//! place, so a reader or a crash never sees half a file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_parent(path);
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A unique temporary name beside `path`: `.name.tmp-<pid>-<n>`, with `name` shortened
/// (at a character boundary) so the whole stays within the 255-byte name limit of common
/// file systems for any legal target name.
pub fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    const NAME_MAX: usize = 255;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(".tmp-{}-{n}", std::process::id());
    let mut name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let room = NAME_MAX - 1 - suffix.len();
    if name.len() > room {
        let mut cut = room;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    path.with_file_name(format!(".{name}{suffix}"))
}

/// Makes a rename durable by syncing the folder that holds it (best effort).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_names_the_file() {
        let e = write_atomic(Path::new("/nonexistent-dir/x.bin"), b"x").unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent-dir/x.bin:"), "{e}");
    }

    /// Regression: a 255-byte target name made a temporary name past the limit
    /// (ENAMETOOLONG), so the write failed although the target name is legal.
    #[test]
    fn the_longest_legal_names_can_be_written() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a".repeat(255), "é".repeat(127)] {
            let path = dir.path().join(&name);
            assert!(temp_path(&path).file_name().unwrap().len() <= 255);
            write_atomic(&path, b"x").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"x");
        }
    }
}
