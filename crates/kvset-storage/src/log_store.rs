//! The Raft log and Raft metadata, in one sled tree (`raft`).
//!
//! Layout of the tree:
//!
//! | key                      | value                                   |
//! |--------------------------|-----------------------------------------|
//! | `0x00 "vote"`            | the last vote (§5.2: term + voted-for)  |
//! | `0x00 "committed"`       | last known committed log id (a hint)    |
//! | `0x00 "purged"`          | last purged log id                      |
//! | `0x01` + index (8 B, BE) | the log entry at `index`                |
//!
//! Big-endian index keys make sled's byte order the log order, so ranges are range scans.
//!
//! Invariants kept by [`LogStore`]:
//!
//! * **Entries are contiguous**: indexes `purged+1 ..= last` are all present. `append` only
//!   extends the log (openraft truncates conflicts first), `truncate` removes a suffix, `purge`
//!   a prefix, each in one atomic sled batch.
//! * **An append is acknowledged only after it is durable**: `append` writes the entries, then
//!   hands openraft's callback to the flusher thread, which calls it only after `Db::flush` has
//!   returned. The flusher drains every pending callback before each flush, so one fsync
//!   covers every append that arrived meanwhile (openraft 0.10 does not wait for an append's
//!   flush before it replicates the entries or issues the next append; it counts the leader's
//!   own copy towards the quorum only once flushed). `kvset_log_flush_appends` shows how many
//!   appends each fsync covered.
//! * **A vote is durable before `save_vote` returns** (§5.1: a server must not vote twice in a
//!   term, even across a crash).
//! * **Purge never leaves a hole**: the new `purged` marker and the removal of the entries up to
//!   it are one atomic batch, so after any crash `purged+1` is the first entry present.
//! * Committed entries are never removed by `truncate`: openraft only truncates uncommitted
//!   conflicting entries (§5.3).
//!
//! The `committed` marker is not flushed on its own; losing it only means openraft re-applies
//! fewer entries at start and learns the commit index from the leader again.

use std::fmt::Debug;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use std::thread::JoinHandle;

use crate::codec;
use crate::entry_cache::EntryCache;
use crate::observer::DiskFault;
use crate::observer::StorageObserver;
use crate::Entry;
use crate::LogId;
use crate::TypeConfig;
use crate::Vote;

const META_VOTE: &[u8] = b"\x00vote";
const META_COMMITTED: &[u8] = b"\x00committed";
const META_PURGED: &[u8] = b"\x00purged";
const ENTRY_PREFIX: u8 = 0x01;

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ENTRY_PREFIX;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn index_of(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// An I/O error naming what failed (openraft 0.10 storage reports `std::io::Error`).
fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Runs storage work that scans or may block on the blocking pool, off the Raft core task.
async fn blocking(work: impl FnOnce() -> Result<(), io::Error> + Send + 'static) -> Result<(), io::Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| io_err("Raft log task", e))?
}

/// Reads log entries; cloned for openraft's replication streams and its apply task. Recent
/// entries come from the shared entry cache (`entry_cache.rs`), older ones from sled.
#[derive(Clone)]
pub struct LogReader {
    tree: sled::Tree,
    cache: Arc<EntryCache>,
}

impl Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

impl LogReader {
    fn read_range(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(entry_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(entry_key(*i)),
            Bound::Unbounded => Bound::Included(entry_key(0)),
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(entry_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(entry_key(*i)),
            Bound::Unbounded => Bound::Excluded([ENTRY_PREFIX + 1, 0, 0, 0, 0, 0, 0, 0, 0]),
        };
        let mut out = Vec::new();
        for item in self.tree.range((start, end)) {
            let (k, v) = item.map_err(|e| io_err("reading the Raft log", e))?;
            let index = index_of(&k).unwrap_or_default();
            let entry: Entry = codec::decode("log entry", &v)
                .map_err(|e| io_err(format_args!("reading log entry {index}"), e))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        let what = || String::from_utf8_lossy(&key[1..]).into_owned();
        match self.tree.get(key).map_err(|e| io_err(format_args!("reading {}", what()), e))? {
            Some(v) => Ok(Some(
                codec::decode("raft meta", &v).map_err(|e| io_err(format_args!("reading {}", what()), e))?,
            )),
            None => Ok(None),
        }
    }

    fn last_entry(&self) -> Result<Option<Entry>, io::Error> {
        let last = self
            .tree
            .range(entry_key(0)..=entry_key(u64::MAX))
            .next_back()
            .transpose()
            .map_err(|e| io_err("reading the Raft log", e))?;
        match last {
            Some((_, v)) => {
                Ok(Some(codec::decode("log entry", &v).map_err(|e| io_err("reading the Raft log", e))?))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        let first = match start {
            Bound::Included(i) => Some(i),
            Bound::Excluded(i) => i.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let last = match end {
            Bound::Included(i) => i.checked_add(1).map(Some),
            Bound::Excluded(i) => Some(Some(i)),
            Bound::Unbounded => Some(None),
        };
        if let (Some(first), Some(last)) = (first, last) {
            if let Some(entries) = self.cache.get(first, last) {
                return Ok(entries);
            }
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_range((start, end)))
            .await
            .map_err(|e| io_err("reading the Raft log", e))?
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(META_VOTE)
    }
}

/// The Raft log store (openraft `RaftLogStorage`). See the module docs for its invariants.
pub struct LogStore {
    db: sled::Db,
    reader: LogReader,
    /// Feeds the flusher thread; dropped first in `Drop` so the thread ends.
    flusher: Option<mpsc::Sender<IOFlushed<TypeConfig>>>,
    /// The flusher thread, and a channel that closes when it ends.
    flusher_thread: Option<(JoinHandle<()>, std::sync::Mutex<mpsc::Receiver<()>>)>,
    observer: Arc<dyn StorageObserver>,
}

/// Longest a dropped `LogStore` waits for its flusher thread to end.
const FLUSHER_STOP_WAIT: Duration = Duration::from_secs(5);

impl Drop for LogStore {
    /// Stops the flusher thread and waits for it, so that once a `LogStore` is gone its
    /// database handle is too (an in-process restart can reopen the volume at once). Bounded:
    /// a flush stuck on a failing disk must not hold up the member's exit (it may run on one of
    /// the runtime's threads); the thread is then left behind with its handle, and the process
    /// is about to exit anyway.
    fn drop(&mut self) {
        self.flusher.take();
        if let Some((thread, ended)) = self.flusher_thread.take() {
            let ended = ended.into_inner().unwrap_or_else(|e| e.into_inner());
            match ended.recv_timeout(FLUSHER_STOP_WAIT) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = thread.join();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::error!(
                        "the log flusher is stuck in a flush (a failing disk?); leaving it behind"
                    );
                }
            }
        }
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log in `db` and starts its flusher thread, and the watchdog of that thread
    /// for the volume at `dir` (see [`watch_flushes`]).
    pub(crate) fn open(
        db: sled::Db,
        dir: &Path,
        observer: Arc<dyn StorageObserver>,
        disk_fault: Option<Arc<dyn DiskFault>>,
    ) -> Result<Self, sled::Error> {
        let tree = db.open_tree("raft")?;
        let reader = LogReader { tree, cache: Arc::new(EntryCache::new()) };
        let (tx, rx) = mpsc::channel();
        let (ended_tx, ended) = mpsc::channel::<()>();
        let flushing = Arc::new(AtomicU64::new(0));
        let (watch_stop, watch_rx) = mpsc::channel::<()>();
        {
            let (flushing, dir) = (flushing.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name("kvset-flush-watch".into())
                .spawn(move || watch_flushes(&flushing, &dir, &watch_rx))
                .map_err(sled::Error::Io)?;
        }
        let thread = {
            let (db, observer) = (db.clone(), observer.clone());
            std::thread::Builder::new()
                .name("kvset-log-flush".into())
                .spawn(move || {
                    flusher(db, rx, observer, disk_fault, &flushing);
                    drop(watch_stop);
                    drop(ended_tx);
                })
                .map_err(sled::Error::Io)?
        };
        let store = Self {
            db,
            reader,
            flusher: Some(tx),
            flusher_thread: Some((thread, std::sync::Mutex::new(ended))),
            observer,
        };
        store.remove_purged_leftovers()?;
        Ok(store)
    }

    /// Removes entries at or below the purge marker. They can only exist in data written by an
    /// older layout; kept for robustness, it costs one range scan at start.
    fn remove_purged_leftovers(&self) -> Result<(), sled::Error> {
        if let Some(purged) = self.read_meta::<LogId>(META_PURGED).ok().flatten() {
            let mut batch = sled::Batch::default();
            for item in self.reader.tree.range(entry_key(0)..=entry_key(purged.index)) {
                batch.remove(item?.0);
            }
            self.reader.tree.apply_batch(batch)?;
        }
        Ok(())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        self.reader.read_meta(key)
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), io::Error> {
        let bytes = codec::encode("raft meta", value).map_err(|e| io_err("writing Raft metadata", e))?;
        self.reader.tree.insert(key, bytes).map_err(|e| io_err("writing Raft metadata", e))?;
        Ok(())
    }
}

/// How long a log flush may run on a full disk before the watchdog ends the process.
const STUCK_FLUSH: Duration = Duration::from_secs(5);

/// Milliseconds on a monotonic clock (from the first call), for the flush watchdog.
fn mono_ms() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The flusher's watchdog. When the disk fills up, sled's flush can wait forever for a write
/// that failed, and its page cache then blocks every later write, the appends and applies that
/// run on the runtime's threads included: the member wedges, serving nothing and never
/// stopping. A flush that has run for [`STUCK_FLUSH`] while the volume has less than
/// [`crate::MIN_FREE_BYTES`] free is such a wedge (a slow disk with room is left alone):
/// nothing in the process can stop it any more, so the watchdog logs why and exits the
/// process non-zero. Nothing acknowledged is lost (the flush never completed, so nothing it
/// covered was acknowledged); the member starts again once the disk has room. Ends with the
/// flusher.
fn watch_flushes(flushing: &AtomicU64, dir: &Path, stop: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(Duration::from_secs(1)) {
        let started = flushing.load(Ordering::Acquire);
        if started == 0 || mono_ms().saturating_sub(started) < STUCK_FLUSH.as_millis() as u64 {
            continue;
        }
        let free = crate::free_bytes(dir).unwrap_or(u64::MAX);
        if free < crate::MIN_FREE_BYTES {
            tracing::error!(
                dir = %dir.display(), free,
                "No space left on device: a log flush has been stuck for {} s on a full volume and blocks every write; exiting (expand the volume or free space, then start again)",
                STUCK_FLUSH.as_secs()
            );
            std::process::exit(75);
        }
    }
}

/// The flusher thread: waits for append callbacks, flushes once for all that are pending, then
/// completes them in order. A thread rather than a task because `flush` is blocking I/O that
/// can stall for seconds on a slow disk. Ends when the `LogStore` is dropped.
fn flusher(
    db: sled::Db,
    rx: mpsc::Receiver<IOFlushed<TypeConfig>>,
    observer: Arc<dyn StorageObserver>,
    disk_fault: Option<Arc<dyn DiskFault>>,
    flushing: &AtomicU64,
) {
    let mut pending = Vec::new();
    while let Ok(first) = rx.recv() {
        pending.push(first);
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let started = Instant::now();
        if let Some(stall) = disk_fault.as_ref().map(|f| f.flush_stall()).filter(|d| !d.is_zero()) {
            std::thread::sleep(stall);
        }
        flushing.store(mono_ms().max(1), Ordering::Release);
        let result = db.flush();
        flushing.store(0, Ordering::Release);
        observer.log_flushed(pending.len(), started.elapsed());
        match result {
            Ok(_) => {
                for cb in pending.drain(..) {
                    cb.io_completed(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the Raft log failed; the node will stop");
                for cb in pending.drain(..) {
                    cb.io_completed(Err(io::Error::other(e.to_string())));
                }
            }
        }
    }
}

impl LogStore {
    /// Reads entries in `range` (for tools and recovery; openraft reads through [`LogReader`]).
    pub async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.reader.try_get_log_entries(range).await
    }

    /// The last vote saved.
    pub async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.reader.read_vote().await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.read_meta::<LogId>(META_PURGED)?;
        let last_log_id = match self.reader.last_entry()? {
            Some(entry) => Some(entry.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    /// Stores the vote and flushes before returning.
    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let bytes = codec::encode("vote", vote).map_err(|e| io_err("saving the vote", e))?;
        self.reader.tree.insert(META_VOTE, bytes).map_err(|e| io_err("saving the vote", e))?;
        let started = Instant::now();
        self.db.flush_async().await.map_err(|e| io_err("saving the vote", e))?;
        self.observer.vote_flushed(started.elapsed());
        Ok(())
    }

    /// Stores the committed log id without flushing (see the module docs).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.write_meta(META_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(META_COMMITTED)?.flatten())
    }

    /// Writes the entries, then queues the callback for the flusher: openraft learns the entries
    /// are durable only after `Db::flush` covered them. The entries are readable on return.
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut decoded = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            let bytes = codec::encode("log entry", &entry)
                .map_err(|e| io_err(format_args!("encoding log entry {}", log_id.index), e))?;
            decoded.push((entry, bytes.len()));
            batch.insert(&entry_key(log_id.index), bytes);
        }
        // An in-memory insert into sled's page cache (the disk is touched by the flush): cheap
        // enough to do inline, which saves a thread hop on every append.
        self.reader.tree.apply_batch(batch).map_err(|e| io_err("writing the Raft log", e))?;
        // Cached only once in sled, so the cache never holds an entry sled does not.
        self.reader.cache.extend(decoded);
        let stopped = || io_err("writing the Raft log", "the log flusher stopped");
        let flusher = self.flusher.as_ref().ok_or_else(stopped)?;
        // Never blocks: the queue is unbounded, as a blocked send would stall the Raft core.
        // What waits in it is small (a callback per append, whose entries are already in
        // sled's cache), and appends stop arriving once the writes waiting on them fill the
        // batcher's in-flight permits.
        flusher.send(callback).map_err(|_| stopped())?;
        Ok(())
    }

    /// Removes entries after `last_log_id` (every entry for `None`) in one atomic batch, on the
    /// blocking pool (it scans the suffix).
    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let tree = self.reader.tree.clone();
        let first = last_log_id.map_or(0, |l| l.index + 1);
        // Out of the cache first: a reader must not be served a removed entry from memory.
        self.reader.cache.truncate_from(first);
        blocking(move || {
            let mut batch = sled::Batch::default();
            for item in tree.range(entry_key(first)..=entry_key(u64::MAX)) {
                let (k, _) = item.map_err(|e| io_err("removing Raft log entries", e))?;
                batch.remove(k);
            }
            tree.apply_batch(batch).map_err(|e| io_err("removing Raft log entries", e))
        })
        .await
    }

    /// Records the new purge marker and removes entries `<= log_id.index` in one atomic batch,
    /// on the blocking pool (it scans the prefix).
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let tree = self.reader.tree.clone();
        self.reader.cache.purge_upto(log_id.index);
        blocking(move || {
            let mut batch = sled::Batch::default();
            let marker =
                codec::encode("purged", &log_id).map_err(|e| io_err("removing Raft log entries", e))?;
            batch.insert(META_PURGED, marker);
            for item in tree.range(entry_key(0)..=entry_key(log_id.index)) {
                let (k, _) = item.map_err(|e| io_err("removing Raft log entries", e))?;
                batch.remove(k);
            }
            tree.apply_batch(batch).map_err(|e| io_err("removing Raft log entries", e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;

    use super::*;
    use crate::log_id;
    use crate::NoopObserver;

    fn entries(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
        indexes.map(|i| Entry::new_blank(log_id(term, 0, i))).collect()
    }

    fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
    }

    #[tokio::test]
    async fn recent_entries_come_from_memory_and_match_sled_after_truncate_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path().join("db")).open().unwrap();
        let mut log = LogStore::open(db, dir.path(), Arc::new(NoopObserver), None).unwrap();
        let mut reader = log.get_log_reader().await;

        // A conflicting suffix replaced, then a prefix purged: what the reader answers is what
        // sled holds, entry for entry.
        log.append(entries(1, 1..=10), IOFlushed::noop()).await.unwrap();
        log.truncate_after(Some(log_id(1, 0, 5))).await.unwrap();
        assert_eq!(ids(&reader.try_get_log_entries(4..).await.unwrap()), [(1, 4), (1, 5)], "truncated");
        log.append(entries(2, 6..=8), IOFlushed::noop()).await.unwrap();
        log.purge(log_id(1, 0, 3)).await.unwrap();
        let want = [(1, 4), (1, 5), (2, 6), (2, 7), (2, 8)];
        assert_eq!(ids(&reader.read_range(0..).unwrap()), want);
        assert_eq!(ids(&reader.try_get_log_entries(4..=8).await.unwrap()), want);
        assert_eq!(ids(&reader.try_get_log_entries(..).await.unwrap()), want, "from before the cache: sled");
        assert_eq!(ids(&reader.try_get_log_entries(7..100).await.unwrap()), [(2, 7), (2, 8)]);

        // Served from memory: with sled's copies removed behind the cache's back, the recent
        // range is still answered, and only a range the cache does not cover goes to sled.
        for i in 4..=8 {
            reader.tree.remove(entry_key(i)).unwrap();
        }
        assert_eq!(ids(&reader.try_get_log_entries(4..=8).await.unwrap()), want);
        assert!(reader.try_get_log_entries(0..=8).await.unwrap().is_empty(), "read from sled");
    }
}
