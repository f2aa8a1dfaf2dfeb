//! The replicated state machine: the key-value data, its metadata, and snapshots.
//!
//! The data lives in one of two sled trees, `sm0` or `sm1` (the *slot*); a one-key tree
//! `sm_slot` says which is active. Each slot tree holds user keys under `0x01` and the state
//! machine metadata under `0x00` (last applied log id, last membership, store revision).
//!
//! Invariants kept by [`StateMachine`]:
//!
//! * **Apply is atomic with `last_applied`**: every call to `apply` evaluates its entries into
//!   an in-memory overlay and writes the changes, the new `last_applied`, the membership and the
//!   revision as one `sled::Batch`. A crash leaves all of it or none of it. Apply does not flush:
//!   the log is the durable record, and sled recovers a prefix of its operations, so after a
//!   crash `last_applied` can only be behind, never ahead; openraft re-applies the rest
//!   from the log (entries are only purged after a snapshot covering them is durable, and the
//!   builder flushes the state it captured before publishing the snapshot).
//! * **Building a snapshot does not block writes**: the builder captures the metadata and
//!   registers an *undo log* under a short read lock, then iterates the live tree without any
//!   lock. While it runs, `apply` saves the pre-image of every key it changes that the builder
//!   has not passed yet. The builder prefers a saved pre-image over what it reads, and adds the
//!   pre-images of keys deleted before it reached them, so the file is exactly the state at
//!   capture time. Cost: memory for the keys changed during a build.
//! * **Installing a snapshot replaces the state atomically**: the file is verified and loaded
//!   into the inactive slot, flushed, and only then does the `sm_slot` pointer flip (flushed).
//!   A crash before the flip leaves the old state; after it, the new one. Installs wait for
//!   running builds to finish (the `build_gate`), since builds read the slot an install reuses.
//! * **Reads see whole batches**: readers hold the state read lock while they scan, and apply
//!   holds the write lock only while it writes its finished batch (an in-memory sled batch);
//!   evaluating the commands takes no lock, since apply is the tree's only writer.
//!
//! Snapshot files are described in [`crate::snapshot`].

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::storage::Snapshot;
use openraft::AnyError;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::StorageError;
use openraft::StorageIOError;

use crate::apply::apply_command;
use crate::apply::data_key;
use crate::apply::Overlay;
use crate::apply::ReadError;
use crate::apply::DATA_PREFIX;
use crate::codec;
use crate::observer::StorageObserver;
use crate::snapshot;
use crate::snapshot::SnapshotFile;
use crate::snapshot::SnapshotHeader;
use crate::snapshot::SnapshotReader;
use crate::snapshot::SnapshotWriter;
use crate::types::*;
use crate::volume::sync_dir;
use crate::Entry;
use crate::LogId;
use crate::SnapshotMeta;
use crate::StoredMembership;
use crate::TypeConfig;

const META_APPLIED: &[u8] = b"\x00applied";
const META_MEMBERSHIP: &[u8] = b"\x00membership";
const META_REVISION: &[u8] = b"\x00revision";
const META_REPLICAS: &[u8] = b"\x00replicas";
const SLOT_KEY: &[u8] = b"active";
const SLOT_NAMES: [&str; 2] = ["sm0", "sm1"];
/// Applies of at most this many single-key commands run inline on the state machine task.
const INLINE_APPLY_COMMANDS: usize = 16;
/// Records per sled batch when loading a snapshot.
const LOAD_BATCH: usize = 10_000;
/// Revision of an empty store (as in etcd: the first write gets revision 2).
pub const INITIAL_REVISION: Revision = 1;

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageError::IO { source: StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)) }
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageError::IO { source: StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::new(&e)) }
}

/// Error opening the state machine.
#[derive(Debug, thiserror::Error)]
pub enum SmOpenError {
    #[error("state machine: {0}")]
    Sled(#[from] sled::Error),
    #[error("state machine metadata: {0}")]
    Codec(#[from] codec::CodecError),
    #[error("snapshot directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The applied state, as readers see it.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub revision: Revision,
    /// Desired voter count last set with `Command::SetReplicas`, if ever.
    pub replicas: Option<u32>,
}

/// A summary of the whole key-value state, equal on members that applied the same log prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    pub revision: Revision,
    pub keys: u64,
    /// CRC-32 over every key and stored record in key order.
    pub crc: u32,
}

struct SmState {
    tree: sled::Tree,
    slot: usize,
    applied: AppliedState,
}

#[derive(Debug, Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    path: PathBuf,
}

/// Pre-images saved for one running snapshot build. See the module docs.
#[derive(Default)]
struct UndoLog {
    /// The last user key the builder has written; `None` before the first. Changes to keys at
    /// or before it need no pre-image.
    position: Option<Vec<u8>>,
    /// The builder has passed every key: record nothing more.
    finished: bool,
    /// Pre-images (encoded `StoredValue`, `None` = absent at capture) and whether the builder
    /// already wrote the key.
    entries: HashMap<Vec<u8>, (Option<sled::IVec>, bool)>,
}

impl UndoLog {
    fn wants(&self, key: &[u8]) -> bool {
        !self.finished && self.position.as_deref().is_none_or(|p| key > p)
    }
}

struct Shared {
    db: sled::Db,
    slots: sled::Tree,
    snapshot_dir: PathBuf,
    state: RwLock<SmState>,
    undo_logs: Mutex<Vec<Arc<Mutex<UndoLog>>>>,
    build_gate: Arc<tokio::sync::RwLock<()>>,
    current: Mutex<Option<CurrentSnapshot>>,
    observer: Arc<dyn StorageObserver>,
    seq: AtomicU64,
    #[cfg(test)]
    build_pause: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug elsewhere; the data they guard stays
    // consistent (every update is a single assignment), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, SmState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, SmState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn apply_blocking(&self, entries: Vec<Entry>) -> Result<Vec<BatchResult>, StorageError<u64>> {
        let started = Instant::now();
        let n_entries = entries.len();
        let mut n_commands = 0;
        // Evaluate without holding the state lock: apply is the only writer of the tree (and
        // openraft never runs an install concurrently with an apply), so what the overlay reads
        // cannot change under it. Readers wait only for the final batch write below.
        let (tree, mut applied) = {
            let st = self.read_state();
            (st.tree.clone(), st.applied.clone())
        };
        let mut overlay = Overlay::new(&tree);
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(BatchResult::default()),
                EntryPayload::Normal(batch) => {
                    n_commands += batch.commands.len();
                    let mut out = Vec::with_capacity(batch.commands.len());
                    for command in &batch.commands {
                        if let Command::SetReplicas(n) = command {
                            applied.replicas = Some(*n);
                        }
                        out.push(
                            apply_command(&mut overlay, &mut applied.revision, command)
                                .map_err(|e| sm_err(ErrorVerb::Read, e))?,
                        );
                    }
                    results.push(BatchResult { results: out });
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    results.push(BatchResult::default());
                }
            }
        }

        // Save pre-images for running snapshot builds before anything changes.
        {
            let logs = lock(&self.undo_logs);
            if !logs.is_empty() {
                for key in overlay.changes.keys() {
                    let mut old: Option<Option<sled::IVec>> = None;
                    for log in logs.iter() {
                        let mut log = lock(log);
                        if log.wants(key) && !log.entries.contains_key(key) {
                            if old.is_none() {
                                old = Some(tree.get(data_key(key)).map_err(|e| sm_err(ErrorVerb::Read, e))?);
                            }
                            log.entries.insert(key.clone(), (old.clone().flatten(), false));
                        }
                    }
                }
            }
        }

        let mut batch = sled::Batch::default();
        for (key, change) in &overlay.changes {
            match change {
                Some(value) => batch.insert(
                    data_key(key),
                    codec::encode("stored value", value).map_err(|e| sm_err(ErrorVerb::Write, e))?,
                ),
                None => batch.remove(data_key(key)),
            }
        }
        write_meta(&mut batch, &applied).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        // Readers see the whole batch with its revision or none of it.
        let mut st = self.write_state();
        tree.apply_batch(batch).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        st.applied = applied;
        drop(st);
        self.observer.applied(n_entries, n_commands, started.elapsed());
        Ok(results)
    }

    /// Writes the snapshot file for `header` from `tree`, using `undo` for consistency.
    /// Returns the final path and size.
    fn write_snapshot(
        &self,
        tree: &sled::Tree,
        header: &SnapshotHeader,
        undo: &Arc<Mutex<UndoLog>>,
    ) -> io::Result<(PathBuf, u64)> {
        let tmp = self.snapshot_dir.join(format!("build-{}.tmp", self.next_seq()));
        let result = (|| {
            let mut w = SnapshotWriter::create(&tmp, header)?;
            let data = tree.range(vec![DATA_PREFIX]..vec![DATA_PREFIX + 1]);
            for (i, item) in data.enumerate() {
                #[cfg(test)]
                if i == 1 {
                    if let Some(pause) = lock(&self.build_pause).take() {
                        let _ = pause.recv();
                    }
                }
                let _ = i;
                let (k, v) = item.map_err(io::Error::other)?;
                let key = &k[1..];
                let mut log = lock(undo);
                match log.entries.get_mut(key) {
                    Some((pre, written)) => {
                        *written = true;
                        if let Some(pre) = pre.clone() {
                            w.record(key, &pre)?;
                        }
                    }
                    None => w.record(key, &v)?,
                }
                log.position = Some(key.to_vec());
            }
            // Keys that existed at capture but were deleted before the builder reached them.
            let mut log = lock(undo);
            log.finished = true;
            let mut rest: Vec<_> = log
                .entries
                .iter()
                .filter_map(
                    |(k, (pre, written))| if *written { None } else { pre.clone().map(|p| (k.clone(), p)) },
                )
                .collect();
            drop(log);
            rest.sort();
            for (k, v) in rest {
                w.record(&k, &v)?;
            }
            let bytes = w.finish()?;
            // The captured state must be durable before a snapshot of it exists, or openraft
            // could purge log entries the state machine would need after a crash.
            self.db.flush().map_err(io::Error::other)?;
            Ok(bytes)
        })();
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let path = self.snapshot_dir.join(snapshot_file_name(&header.meta));
        fs::rename(&tmp, &path)?;
        sync_dir(&self.snapshot_dir)?;
        Ok((path, bytes))
    }

    /// Makes `path` the current snapshot when it is newer than the current one, and removes
    /// the older file. Returns whether it became current.
    fn publish(&self, meta: &SnapshotMeta, path: &Path) -> bool {
        let new = CurrentSnapshot { meta: meta.clone(), path: path.to_path_buf() };
        let mut current = lock(&self.current);
        let newer = current.as_ref().is_none_or(|c| meta.last_log_id > c.meta.last_log_id);
        let obsolete = if newer {
            current.replace(new).map(|c| c.path).filter(|p| p != path)
        } else if current.as_ref().is_some_and(|c| c.path == path) {
            None
        } else {
            Some(new.path)
        };
        drop(current);
        if let Some(obsolete) = obsolete {
            if let Err(e) = fs::remove_file(&obsolete) {
                tracing::warn!(path = %obsolete.display(), error = %e, "could not remove an old snapshot");
            }
        }
        newer
    }

    /// Verifies the snapshot at `path` against `meta`, loads it into the inactive slot and
    /// flips the slot pointer. See the module docs.
    fn install_blocking(&self, meta: &SnapshotMeta, path: &Path) -> io::Result<u64> {
        let mut reader = SnapshotReader::open(path)?;
        let header = reader.header().clone();
        if header.meta.last_log_id != meta.last_log_id || header.meta.last_membership != meta.last_membership
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot file {} is for {:?}, openraft installs {:?}",
                    path.display(),
                    header.meta.last_log_id,
                    meta.last_log_id
                ),
            ));
        }
        let target = 1 - self.read_state().slot;
        let name = SLOT_NAMES[target];
        self.db.drop_tree(name).map_err(io::Error::other)?;
        let tree = self.db.open_tree(name).map_err(io::Error::other)?;
        let load = (|| {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            let mut keys = 0u64;
            while let Some((key, value)) = reader.next_record()? {
                codec::decode::<StoredValue>("snapshot record", &value).map_err(io::Error::other)?;
                batch.insert(data_key(&key), value);
                in_batch += 1;
                keys += 1;
                if in_batch == LOAD_BATCH {
                    tree.apply_batch(std::mem::take(&mut batch)).map_err(io::Error::other)?;
                    in_batch = 0;
                }
            }
            let applied = AppliedState {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                revision: header.revision,
                replicas: header.replicas,
            };
            write_meta(&mut batch, &applied).map_err(io::Error::other)?;
            tree.apply_batch(batch).map_err(io::Error::other)?;
            self.db.flush().map_err(io::Error::other)?;
            Ok::<_, io::Error>((applied, keys))
        })();
        let (applied, keys) = match load {
            Ok(v) => v,
            Err(e) => {
                drop(tree);
                let _ = self.db.drop_tree(name);
                return Err(e);
            }
        };

        // The flip: from here on the new state is the state.
        let mut st = self.write_state();
        self.slots.insert(SLOT_KEY, &[target as u8]).map_err(io::Error::other)?;
        self.db.flush().map_err(io::Error::other)?;
        let old_slot = st.slot;
        *st = SmState { tree, slot: target, applied };
        drop(st);
        if let Err(e) = self.db.drop_tree(SLOT_NAMES[old_slot]) {
            tracing::warn!(error = %e, "could not drop the previous state machine tree; it is dropped at next start");
        }
        Ok(keys)
    }
}

fn write_meta(batch: &mut sled::Batch, applied: &AppliedState) -> Result<(), codec::CodecError> {
    batch.insert(META_APPLIED, codec::encode("last applied", &applied.last_applied)?);
    batch.insert(META_MEMBERSHIP, codec::encode("membership", &applied.membership)?);
    batch.insert(META_REVISION, codec::encode("revision", &applied.revision)?);
    batch.insert(META_REPLICAS, codec::encode("replicas", &applied.replicas)?);
    Ok(())
}

fn read_applied(tree: &sled::Tree) -> Result<AppliedState, SmOpenError> {
    let get = |k: &[u8]| tree.get(k);
    let last_applied = match get(META_APPLIED)? {
        Some(v) => codec::decode("last applied", &v)?,
        None => None,
    };
    let membership = match get(META_MEMBERSHIP)? {
        Some(v) => codec::decode("membership", &v)?,
        None => StoredMembership::default(),
    };
    let revision = match get(META_REVISION)? {
        Some(v) => codec::decode("revision", &v)?,
        None => INITIAL_REVISION,
    };
    let replicas = match get(META_REPLICAS)? {
        Some(v) => codec::decode("replicas", &v)?,
        None => None,
    };
    Ok(AppliedState { last_applied, membership, revision, replicas })
}

/// A file name for a snapshot: `snap-<term>-<index>-<sanitised id>.snap`.
fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    let (term, index) = meta.last_log_id.map_or((0, 0), |l| (l.leader_id.term, l.index));
    let id: String = meta
        .snapshot_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    format!("snap-{term}-{index}-{id}.snap")
}

/// The state machine (openraft `RaftStateMachine`). See the module docs for its invariants.
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").finish_non_exhaustive()
    }
}

/// Read access to the applied state for serving client reads; cheap to clone.
#[derive(Clone)]
pub struct SmReader {
    shared: Arc<Shared>,
}

impl Debug for SmReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmReader").finish_non_exhaustive()
    }
}

/// Builds one snapshot; created by openraft through `get_snapshot_builder`.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder").finish_non_exhaustive()
    }
}

impl StateMachine {
    /// Opens the state machine in `db`, with snapshots under `snapshot_dir`.
    pub(crate) fn open(
        db: sled::Db,
        snapshot_dir: PathBuf,
        observer: Arc<dyn StorageObserver>,
    ) -> Result<Self, SmOpenError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SmOpenError::Io { path, source }
        };
        let slots = db.open_tree("sm_slot")?;
        let slot = match slots.get(SLOT_KEY)? {
            Some(v) if v.as_ref() == [1] => 1,
            _ => 0,
        };
        let other = SLOT_NAMES[1 - slot];
        if db.tree_names().iter().any(|n| n.as_ref() == other.as_bytes()) {
            // Left over from an install interrupted before its flip, or not yet dropped after it.
            db.drop_tree(other)?;
        }
        let tree = db.open_tree(SLOT_NAMES[slot])?;
        let applied = read_applied(&tree)?;

        fs::create_dir_all(&snapshot_dir).map_err(io(&snapshot_dir))?;
        let mut best: Option<CurrentSnapshot> = None;
        let mut stale = Vec::new();
        for entry in fs::read_dir(&snapshot_dir).map_err(io(&snapshot_dir))? {
            let path = entry.map_err(io(&snapshot_dir))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !name.ends_with(".snap") {
                stale.push(path);
                continue;
            }
            match snapshot::read_header(&path) {
                Ok(header) => {
                    let candidate = CurrentSnapshot { meta: header.meta, path };
                    match &best {
                        Some(b) if b.meta.last_log_id >= candidate.meta.last_log_id => {
                            stale.push(candidate.path)
                        }
                        _ => {
                            if let Some(b) = best.replace(candidate) {
                                stale.push(b.path);
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable snapshot file");
                    stale.push(path);
                }
            }
        }
        for path in stale {
            let _ = fs::remove_file(&path);
        }

        let shared = Arc::new(Shared {
            db,
            slots,
            snapshot_dir,
            state: RwLock::new(SmState { tree, slot, applied }),
            undo_logs: Mutex::new(Vec::new()),
            build_gate: Arc::new(tokio::sync::RwLock::new(())),
            current: Mutex::new(best.clone()),
            observer,
            seq: AtomicU64::new(0),
            #[cfg(test)]
            build_pause: Mutex::new(None),
        });

        // A snapshot is only published after the state it captured was flushed, so it can be
        // ahead of the state machine only if the disk lied; restore from it rather than let
        // openraft purge entries the state machine never applied.
        if let Some(best) = best {
            let applied = shared.read_state().applied.last_applied;
            if best.meta.last_log_id > applied {
                tracing::error!(
                    snapshot = ?best.meta.last_log_id, applied = ?applied,
                    "state machine is behind its own snapshot; restoring it from the snapshot"
                );
                shared.install_blocking(&best.meta, &best.path).map_err(io(&best.path))?;
            }
        }
        Ok(Self { shared })
    }

    /// A reader over the applied state.
    pub fn reader(&self) -> SmReader {
        SmReader { shared: self.shared.clone() }
    }

    #[cfg(test)]
    pub(crate) fn pause_next_build_after_first_key(&self) -> std::sync::mpsc::SyncSender<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        *lock(&self.shared.build_pause) = Some(rx);
        tx
    }
}

impl SmReader {
    /// Reads one key. Returns it (if present) and the store revision.
    pub fn get(&self, key: &[u8]) -> Result<(Option<KeyValue>, Revision), ReadError> {
        let st = self.shared.read_state();
        let value = match st.tree.get(data_key(key))? {
            Some(bytes) => {
                Some(codec::decode::<StoredValue>("stored value", &bytes)?.to_key_value(key, false))
            }
            None => None,
        };
        Ok((value, st.applied.revision))
    }

    /// Reads one page of a range. Returns it and the store revision.
    pub fn range(&self, query: &RangeQuery) -> Result<(RangeResult, Revision), ReadError> {
        let st = self.shared.read_state();
        let result = Overlay::new(&st.tree).range(query)?;
        Ok((result, st.applied.revision))
    }

    /// The applied state: last applied log id, membership and revision.
    pub fn applied(&self) -> AppliedState {
        self.shared.read_state().applied.clone()
    }

    /// A digest of the whole key-value state (scans every key).
    pub fn digest(&self) -> Result<StateDigest, ReadError> {
        let st = self.shared.read_state();
        let mut crc = crc32fast::Hasher::new();
        let mut keys = 0;
        for item in st.tree.range(vec![DATA_PREFIX]..vec![DATA_PREFIX + 1]) {
            let (k, v) = item?;
            crc.update(&(k.len() as u32).to_le_bytes());
            crc.update(&k);
            crc.update(&(v.len() as u32).to_le_bytes());
            crc.update(&v);
            keys += 1;
        }
        Ok(StateDigest { revision: st.applied.revision, keys, crc: crc.finalize() })
    }

    /// Flushes the whole database to disk.
    pub fn flush(&self) -> Result<(), ReadError> {
        self.shared.db.flush()?;
        Ok(())
    }

    /// Bytes sled reports for its files.
    pub fn db_size_on_disk(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }

    /// The current snapshot's metadata and file, if any.
    pub fn current_snapshot(&self) -> Option<(SnapshotMeta, PathBuf)> {
        lock(&self.shared.current).as_ref().map(|c| (c.meta.clone(), c.path.clone()))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let started = Instant::now();
        let gate = self.shared.build_gate.clone().read_owned().await;

        // Capture under the read lock: no apply can run between reading the metadata and
        // registering the undo log.
        let undo = Arc::new(Mutex::new(UndoLog::default()));
        let (tree, header) = {
            let st = self.shared.read_state();
            lock(&self.shared.undo_logs).push(undo.clone());
            let applied = &st.applied;
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id: format!(
                    "{}-{}-{}",
                    applied.last_applied.map_or(0, |l| l.index),
                    self.shared.next_seq(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0)
                ),
            };
            (st.tree.clone(), SnapshotHeader { meta, revision: applied.revision, replicas: applied.replicas })
        };

        let shared = self.shared.clone();
        let undo2 = undo.clone();
        let header2 = header.clone();
        let written =
            tokio::task::spawn_blocking(move || shared.write_snapshot(&tree, &header2, &undo2)).await;
        lock(&self.shared.undo_logs).retain(|u| !Arc::ptr_eq(u, &undo));
        drop(gate);
        let (path, bytes) =
            written.map_err(|e| snap_err(ErrorVerb::Write, e))?.map_err(|e| snap_err(ErrorVerb::Write, e))?;

        // Open before publishing: publishing may remove the file if a newer snapshot was
        // installed meanwhile, and an open handle stays readable.
        let file = SnapshotFile::open(path.clone()).await.map_err(|e| snap_err(ErrorVerb::Read, e))?;
        self.shared.publish(&header.meta, &path);
        self.shared.observer.snapshot(false, bytes, started.elapsed());
        tracing::info!(
            last_log_id = ?header.meta.last_log_id, bytes, elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot { meta: header.meta, snapshot: Box::new(file) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError<u64>> {
        let applied = self.shared.read_state().applied.clone();
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Small applies of single-key commands are in-memory sled batches: inline saves a
        // thread hop on every write. Anything that may touch many keys (range deletes, Txn)
        // or many commands goes to the blocking pool, off the runtime's threads.
        let mut commands = 0;
        let bounded = entries.iter().all(|e| match &e.payload {
            EntryPayload::Normal(b) => {
                commands += b.commands.len();
                b.commands.iter().all(Command::is_single_key)
            }
            _ => true,
        });
        if bounded && commands <= INLINE_APPLY_COMMANDS {
            return self.shared.apply_blocking(entries);
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.apply_blocking(entries))
            .await
            .map_err(|e| sm_err(ErrorVerb::Write, e))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError<u64>> {
        let path = self.shared.snapshot_dir.join(format!(
            "recv-{}-{:x}.partial",
            self.shared.next_seq(),
            rand::random::<u32>()
        ));
        let file = SnapshotFile::create(path).await.map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError<u64>> {
        let started = Instant::now();
        let _gate = self.shared.build_gate.write().await;
        let partial = snapshot.finish().await.map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let shared = self.shared.clone();
        let meta2 = meta.clone();
        let result = tokio::task::spawn_blocking(move || -> io::Result<(PathBuf, u64)> {
            let keys = shared.install_blocking(&meta2, &partial)?;
            let path = shared.snapshot_dir.join(snapshot_file_name(&meta2));
            fs::rename(&partial, &path)?;
            sync_dir(&shared.snapshot_dir)?;
            Ok((path, keys))
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let (path, keys) = result.map_err(|e| {
            tracing::error!(error = %e, "installing a snapshot failed");
            snap_err(ErrorVerb::Write, e)
        })?;
        self.shared.publish(meta, &path);
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.shared.observer.snapshot(true, bytes, started.elapsed());
        tracing::info!(last_log_id = ?meta.last_log_id, keys, bytes, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let current = lock(&self.shared.current).clone();
        match current {
            Some(c) => {
                let file = SnapshotFile::open(c.path).await.map_err(|e| snap_err(ErrorVerb::Read, e))?;
                Ok(Some(Snapshot { meta: c.meta, snapshot: Box::new(file) }))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
#[path = "state_machine_test.rs"]
mod tests;
