//! Defragmentation: rewriting a volume's sled database into a fresh one, so that the space of
//! deleted and compacted data goes back to the filesystem (sled reuses it but never shrinks
//! its files).
//!
//! It runs while the database is closed — before a member opens its store, when the volume has
//! a pending request (`<data dir>/defrag.requested`, written by `Maintenance.Defragment` or
//! `kvset defrag`), or from `kvset defrag --data-dir` on a stopped member. Every tree is copied
//! key by key into `db.defrag`, which is flushed; then the directories are swapped:
//!
//! 1. `db` → `db.old` (rename), 2. `db.defrag` → `db` (rename), directory fsynced,
//! 3. `db.old` removed.
//!
//! A crash at any point is finished by [`finish_interrupted`] at the next open: a `db.defrag`
//! next to a `db` is an unfinished copy and is removed; a `db.defrag` without a `db` is a
//! finished copy and takes its place; a leftover `db.old` is removed. The request is cleared
//! only after the swap, so an interrupted defragmentation runs again.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use crate::volume::remove_durably;
use crate::volume::sync_dir;

/// The file that asks for a defragmentation at the next open.
pub const REQUEST_FILE: &str = "defrag.requested";
const DB: &str = "db";
const NEW: &str = "db.defrag";
const OLD: &str = "db.old";
/// Keys per batch when copying.
const BATCH: usize = 4096;

/// What a defragmentation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Bytes of the database directory before and after.
    pub before: u64,
    pub after: u64,
    /// Keys copied, over every tree.
    pub keys: u64,
    pub elapsed: Duration,
}

/// Records a request to defragment the volume in `dir` at its next open (fsynced).
pub fn request(dir: &Path) -> io::Result<()> {
    let path = dir.join(REQUEST_FILE);
    fs::File::create(&path)?.sync_all()?;
    sync_dir(dir)
}

/// Whether a defragmentation of the volume in `dir` is pending.
pub fn requested(dir: &Path) -> bool {
    dir.join(REQUEST_FILE).is_file()
}

/// Gives up a defragmentation that failed: the unfinished copy is removed (or a finished swap
/// completed) and the request forgotten.
pub fn abandon(dir: &Path) -> io::Result<()> {
    finish_interrupted(dir)?;
    remove_durably(dir, REQUEST_FILE)
}

/// Finishes or undoes a defragmentation that a crash interrupted (see the module docs).
pub fn finish_interrupted(dir: &Path) -> io::Result<()> {
    let (db, new, old) = (dir.join(DB), dir.join(NEW), dir.join(OLD));
    if new.exists() {
        if db.exists() {
            fs::remove_dir_all(&new)?;
        } else {
            fs::rename(&new, &db)?;
            sync_dir(dir)?;
        }
    }
    if old.exists() && db.exists() {
        fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Rewrites the database of the volume in `dir` (which no process may have open) into a fresh
/// one and clears a pending request. Needs free space for a copy of the live data. Waits up to
/// `lock_wait` for the previous user of the database to let go of it (a member stopping in the
/// same process).
pub fn run(dir: &Path, lock_wait: Duration) -> io::Result<Report> {
    let started = Instant::now();
    finish_interrupted(dir)?;
    let (db_path, new_path, old_path) = (dir.join(DB), dir.join(NEW), dir.join(OLD));
    let before = crate::dir_size(&db_path);
    let keys = {
        let old = open_waiting(&db_path, lock_wait)?;
        let new = sled::Config::new()
            .path(&new_path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(io::Error::other)?;
        let mut keys = 0u64;
        for name in old.tree_names() {
            let (from, to) = (
                old.open_tree(&name).map_err(io::Error::other)?,
                new.open_tree(&name).map_err(io::Error::other)?,
            );
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in from.iter() {
                let (k, v) = item.map_err(io::Error::other)?;
                batch.insert(k, v);
                n += 1;
                keys += 1;
                if n == BATCH {
                    to.apply_batch(std::mem::take(&mut batch)).map_err(io::Error::other)?;
                    n = 0;
                }
            }
            to.apply_batch(batch).map_err(io::Error::other)?;
        }
        new.flush().map_err(io::Error::other)?;
        keys
    };
    // sled fsyncs its files' contents, not the directory entries of new files: make the copy
    // durable as a tree before it replaces the original.
    sync_tree(&new_path)?;
    fs::rename(&db_path, &old_path)?;
    fs::rename(&new_path, &db_path)?;
    sync_dir(dir)?;
    fs::remove_dir_all(&old_path)?;
    remove_durably(dir, REQUEST_FILE)?;
    let report = Report { before, after: crate::dir_size(&db_path), keys, elapsed: started.elapsed() };
    tracing::info!(
        before = report.before,
        after = report.after,
        keys,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "defragmented the database"
    );
    Ok(report)
}

/// Fsyncs every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path)?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Opens the database at `path`, retrying while another handle in this process still holds
/// its lock (up to `wait`).
pub(crate) fn open_waiting(path: &Path, wait: Duration) -> io::Result<sled::Db> {
    let deadline = Instant::now() + wait;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io::Error::other(format!("{}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled lets go of its file lock shortly after its last handle is dropped (its flusher
    /// thread ends on its own): every open here after another one waits for that.
    fn open(path: &Path) -> sled::Db {
        open_waiting(path, Duration::from_secs(10)).unwrap()
    }

    fn fill(path: &Path, rounds: usize) {
        let db = open(path);
        let t = db.open_tree("t").unwrap();
        for r in 0..rounds {
            for i in 0..500u32 {
                t.insert(i.to_be_bytes(), vec![r as u8; 1024]).unwrap();
            }
        }
        db.insert("default-key", "v").unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn a_defragmented_database_holds_the_same_data_in_less_space() {
        let dir = tempfile::tempdir().unwrap();
        fill(&dir.path().join(DB), 40);
        request(dir.path()).unwrap();
        assert!(requested(dir.path()));
        let report = run(dir.path(), Duration::from_secs(1)).unwrap();
        assert!(report.after < report.before, "{report:?}");
        assert!(!requested(dir.path()), "the request is cleared");
        let db = open(&dir.path().join(DB));
        let t = db.open_tree("t").unwrap();
        assert_eq!(t.len(), 500);
        assert_eq!(t.get(7u32.to_be_bytes()).unwrap().unwrap().as_ref(), &[39u8; 1024][..]);
        assert_eq!(db.get("default-key").unwrap().unwrap().as_ref(), b"v");
        assert!(!dir.path().join(OLD).exists() && !dir.path().join(NEW).exists());
    }

    #[test]
    fn an_interrupted_defragmentation_is_finished_or_undone() {
        // A copy cut short: the original stays.
        let dir = tempfile::tempdir().unwrap();
        fill(&dir.path().join(DB), 1);
        fs::create_dir_all(dir.path().join(NEW)).unwrap();
        finish_interrupted(dir.path()).unwrap();
        assert!(!dir.path().join(NEW).exists());
        assert_eq!(open(&dir.path().join(DB)).open_tree("t").unwrap().len(), 500);

        // Cut between the two renames: the finished copy takes the original's place.
        let dir = tempfile::tempdir().unwrap();
        fill(&dir.path().join(NEW), 2);
        fill(&dir.path().join(OLD), 1);
        finish_interrupted(dir.path()).unwrap();
        assert!(!dir.path().join(NEW).exists() && !dir.path().join(OLD).exists());
        let t = open(&dir.path().join(DB)).open_tree("t").unwrap();
        assert_eq!(t.get(1u32.to_be_bytes()).unwrap().unwrap().as_ref(), &[1u8; 1024][..]);
    }
}
