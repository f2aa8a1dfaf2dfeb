//! The replicated state machine: keys with their history (MVCC), leases, metadata, snapshots,
//! and the events watchers read.
//!
//! The state lives in one of two sled trees, `sm0` or `sm1` (the *slot*); a one-key tree
//! `sm_slot` says which is active. A slot holds one record per change of a key, keyed by
//! revision, the leases, and the applied state (last applied log id, membership, revision,
//! compact revision, desired replicas) and access control ([`crate::keys`]); the in-memory
//! [`Index`] finds each key's versions and is rebuilt from the records at open.
//!
//! Invariants kept by [`StateMachine`]:
//!
//! * **Apply is atomic with `last_applied`**: every call to `apply` evaluates its entries into
//!   an in-memory overlay and writes the changes (one record per changed key, the leases) and
//!   the applied state as one `sled::Batch`; the index takes the same changes under the state
//!   lock. A crash leaves all of it or none of it. Apply does not flush: the log is the durable
//!   record, and sled recovers a prefix of its operations, so after a crash `last_applied` can
//!   only be behind, never ahead; openraft re-applies the rest from the log (entries are only
//!   purged after a snapshot covering them is durable, and the builder flushes the state it
//!   captured before publishing the snapshot).
//! * **Records are never changed once written**; compaction alone removes them, and only the
//!   ones no read at or above the compact revision can see ([`Index::compact`]). Reads at a
//!   revision therefore take the index lock only to find records; they check afterwards that
//!   the compact revision did not pass them.
//! * **Compaction is logical, then physical**: `Compact(rev)` sets the compact revision when
//!   applied (the same on every member: reads and watches below it are refused from then on);
//!   a background thread then walks the index key by key, [`COMPACTION_CHUNK`] keys per step,
//!   removing from the index and from sled (one batch per step) what it made unreachable, so
//!   applies never wait for more than one step. A key's tombstone and the versions before it
//!   go in the same batch, so a crash never brings a deleted key back; a restart rebuilds the
//!   index from what is left and the walk starts again.
//! * **Building a snapshot does not block writes**: the builder captures the applied state and
//!   the lease table under a short read lock, then copies the records up to the captured
//!   revision, in revision order, with no lock. Physical compaction pauses while a build runs
//!   (the compaction gate), so the copy is exactly the captured state.
//! * **Installing a snapshot replaces the state atomically**: the file is verified and loaded
//!   into the inactive slot (its index built as it loads), flushed, and only then does the
//!   `sm_slot` pointer flip (flushed). A crash before the flip leaves the old state; after it,
//!   the new one. Upgrading a volume of format 2 takes the same path (see [`upgrade_slot`]).
//! * **Reads see whole batches**: a reader captures the applied revision under the state read
//!   lock and reads at it; apply publishes a revision only after its records and index entries
//!   are in place. Watchers are told of a revision only after its events are readable.
//!
//! Snapshot files are described in [`crate::snapshot`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::Weak;
use std::time::Instant;

use futures::Stream;
use futures::TryStreamExt;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::storage::Snapshot;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use tokio::sync::watch;

use crate::apply::apply_command;
use crate::apply::Overlay;
use crate::apply::ReadError;
use crate::apply::Scalars;
use crate::auth::AuthState;
use crate::codec;
use crate::events::EventLog;
use crate::events::EventLogLimits;
use crate::history::Slot;
use crate::index::Index;
use crate::index::Rev;
use crate::keys;
use crate::keys::legacy;
use crate::keys::record;
use crate::keys::Version;
use crate::observer::DiskFault;
use crate::observer::StorageObserver;
use crate::snapshot;
use crate::snapshot::SnapshotFile;
use crate::snapshot::SnapshotHeader;
use crate::snapshot::SnapshotReader;
use crate::snapshot::SnapshotWriter;
use crate::types::*;
use crate::volume::sync_dir;
use crate::Entry;
use crate::EntryPayload;
use crate::LeaderId;
use crate::LogId;
use crate::SnapshotMeta;
use crate::StoredMembership;
use crate::TypeConfig;

/// The applied state ([`StoredState`]), one record rewritten by every apply.
const META_STATE: &str = "state";
const META_AUTH: &str = "auth";
/// The layout of the slot: [`LAYOUT`]. Absent in a slot of volume format 2.
const META_LAYOUT: &str = "layout";
/// The slot layout this build writes: one record per revision.
const LAYOUT: u32 = 3;
/// Volume format 2 kept each scalar under its own name.
const LEGACY_META: [&str; 6] = ["applied", "membership", "revision", "compact", "compacted_to", "replicas"];
const SLOT_KEY: &[u8] = b"active";
const SLOT_NAMES: [&str; 2] = ["sm0", "sm1"];
/// Applies of at most this many single-key commands run inline on the state machine task.
const INLINE_APPLY_COMMANDS: usize = 16;
/// Records per sled batch when loading a snapshot.
const LOAD_BATCH: usize = 10_000;
/// Keys physical compaction handles per step (one sled batch), and the most versions a step
/// removes before it ends at the key it is on.
pub const COMPACTION_CHUNK: usize = 1_000;
/// Revision of an empty store (as in etcd: the first write gets revision 2).
pub const INITIAL_REVISION: Revision = 1;
/// The compact revision of a store never compacted (etcd's too: a first `Compact(0)` is
/// accepted, a second one is refused, and HashKV reports −1 until then).
pub const NEVER_COMPACTED: Revision = -1;

/// An I/O error naming what failed (openraft 0.10 storage reports `std::io::Error`).
fn sm_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("state machine: {what}: {e}"))
}

fn snap_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("snapshot: {what}: {e}"))
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
    #[error("cannot start the compaction thread: {0}")]
    Thread(io::Error),
    #[error("state machine is corrupt: {0}")]
    Corrupt(String),
    #[error("state machine layout {0} is newer than this kvset understands ({LAYOUT})")]
    NewerLayout(u32),
}

/// The applied state, as readers see it.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub revision: Revision,
    /// Reads and watches below this revision are refused; [`NEVER_COMPACTED`] before any
    /// compaction.
    pub compact_revision: Revision,
    /// Desired voter count last set with `Command::SetReplicas`, if ever.
    pub replicas: Option<u32>,
    /// Users, roles and permissions (`Command::Auth`).
    pub auth: Arc<AuthState>,
}

impl AppliedState {
    fn scalars(&self) -> Scalars {
        Scalars { revision: self.revision, compact_revision: self.compact_revision, replicas: self.replicas }
    }
}

/// The applied state as one metadata record (access control is kept apart: it is larger and
/// rarely changes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    revision: Revision,
    compact_revision: Revision,
    replicas: Option<u32>,
}

/// A summary of the whole state, equal on members that applied the same log prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    pub revision: Revision,
    pub keys: u64,
    /// CRC-32 over every live key and record in key order, the compact revision and the leases.
    pub crc: u32,
}

/// A lease and the keys attached to it, in key order.
pub type LeaseKeys = (Lease, Vec<Vec<u8>>);

/// The lease table, shared with readers; replaced (not changed) when leases change.
pub type LeaseTable = Arc<BTreeMap<LeaseId, Lease>>;

/// A new [`Lease::grant`] number, unique in this process.
fn next_grant() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct SmState {
    data: Slot,
    slot: usize,
    /// Counts installs: a reader that sees it change read a state that was replaced.
    generation: u64,
    applied: AppliedState,
    leases: LeaseTable,
}

/// Where physical compaction has got to.
#[derive(Debug, Default)]
struct CompactionProgress {
    /// The compact revision of the walk in progress.
    target: Revision,
    /// The last key the walk handled.
    after: Option<Vec<u8>>,
    /// Every revision at or below this is compacted.
    done_to: Revision,
}

#[derive(Debug, Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    path: PathBuf,
}

struct Shared {
    db: sled::Db,
    slots: sled::Tree,
    snapshot_dir: PathBuf,
    state: RwLock<SmState>,
    events: EventLog,
    /// Held (shared) by snapshot builds and (exclusive) by installs and by each compaction
    /// chunk: compaction never removes history a build is copying.
    compaction_gate: RwLock<()>,
    compaction: Mutex<CompactionProgress>,
    /// Wakes the compaction thread.
    compactor: Mutex<Option<mpsc::Sender<()>>>,
    /// The compaction thread, joined by [`Shared::stop_compactor`].
    compactor_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    build_gate: Arc<tokio::sync::RwLock<()>>,
    current: Mutex<Option<CurrentSnapshot>>,
    observer: Arc<dyn StorageObserver>,
    /// Tests: stalls applies.
    disk_fault: Option<Arc<dyn DiskFault>>,
    seq: AtomicU64,
    /// Tests: sled writes made by applies.
    #[cfg(test)]
    writes: AtomicU64,
    /// Tests: a build parks after its first record until this receives.
    #[cfg(test)]
    build_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
    /// Tests: a digest parks after its first key until this receives.
    #[cfg(test)]
    digest_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
    /// Tests: a read of events from the history parks after it read the records, before the
    /// previous values, until this receives.
    #[cfg(test)]
    events_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug elsewhere; the data they guard stays
    // consistent (every update is a single assignment), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds the writes of `overlay` to `batch`: one record per change, and the lease changes.
/// Returns the number of writes.
fn write_overlay(batch: &mut sled::Batch, overlay: &Overlay<'_>) -> Result<usize, codec::CodecError> {
    let mut writes = 0;
    for (rev, key, version) in &overlay.records {
        batch.insert(&keys::record_key(*rev), record::encode(key, version));
        writes += 1;
    }
    for (id, lease) in &overlay.leases {
        match lease {
            Some(l) => batch.insert(&keys::lease(*id), codec::encode("lease", l)?),
            None => batch.remove(&keys::lease(*id)),
        }
        writes += 1;
    }
    Ok(writes)
}

/// Takes the records and lease attachments of an applied overlay into the index.
fn index_overlay(index: &mut Index, overlay: &Overlay<'_>) {
    for (rev, key, version) in &overlay.records {
        index.push(key, *rev, version.deleted);
    }
    for ((id, key), present) in &overlay.attachments {
        if *present {
            index.attach(*id, key);
        } else {
            index.detach(*id, key);
        }
    }
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

    /// Stops the physical compaction thread after the chunk it is in (chunks are short) and
    /// waits for it: while it works it writes to the database, which must be quiet before a
    /// final flush, and closed before a store is reopened in the same process. Compaction
    /// resumes where it stopped when the store is opened again.
    fn stop_compactor(&self) {
        drop(lock(&self.compactor).take());
        let thread = lock(&self.compactor_thread).take();
        if let Some(thread) = thread {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }

    fn wake_compactor(&self) {
        if let Some(tx) = lock(&self.compactor).as_ref() {
            let _ = tx.send(());
        }
    }

    fn apply_blocking(&self, entries: Vec<Entry>) -> Result<Vec<BatchResult>, io::Error> {
        let started = Instant::now();
        let n_entries = entries.len();
        let mut n_commands = 0;
        // Evaluate without holding the state lock: apply is the only writer of what it reads
        // (current versions, leases; physical compaction deletes only versions no read at or
        // above the compact revision sees, never a key's current one), and openraft never runs an install
        // concurrently with an apply, so what the overlay reads cannot change under it.
        // Readers wait only for the final batch write below.
        let (data, mut applied, leases) = {
            let st = self.read_state();
            (st.data.clone(), st.applied.clone(), st.leases.clone())
        };
        let compact_before = applied.compact_revision;
        let mut scalars = applied.scalars();
        let auth_before = applied.auth.clone();
        let mut overlay = Overlay::new(&data, applied.revision, &leases).with_auth(&auth_before);
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(BatchResult::default()),
                EntryPayload::Normal(batch) => {
                    n_commands += batch.commands.len();
                    let mut out = Vec::with_capacity(batch.commands.len());
                    for command in &batch.commands {
                        out.push(
                            apply_command(&mut overlay, &mut scalars, command)
                                .map_err(|e| sm_err("reading", e))?,
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
        applied.revision = scalars.revision;
        applied.compact_revision = scalars.compact_revision;
        applied.replicas = scalars.replicas;

        let mut batch = sled::Batch::default();
        let mut writes = write_overlay(&mut batch, &overlay).map_err(|e| sm_err("writing", e))?;
        if let Some(auth) = overlay.auth.take() {
            applied.auth = Arc::new(auth);
            write_auth(&mut batch, &applied.auth).map_err(|e| sm_err("writing", e))?;
            writes += 1;
        }
        write_meta(&mut batch, &applied).map_err(|e| sm_err("writing", e))?;
        writes += 1;
        #[cfg(test)]
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        let _ = writes;
        let applied_at = Instant::now();
        let new_leases = (!overlay.leases.is_empty()).then(|| {
            let mut table = (*leases).clone();
            for (id, lease) in &overlay.leases {
                match lease {
                    Some(l) => {
                        table.insert(*id, Lease { grant: next_grant(), applied_at: Some(applied_at), ..*l })
                    }
                    None => table.remove(id),
                };
            }
            Arc::new(table)
        });
        let events = std::mem::take(&mut overlay.events);
        {
            // Readers see the whole batch with its revision or none of it.
            let mut st = self.write_state();
            data.tree.apply_batch(batch).map_err(|e| sm_err("writing", e))?;
            index_overlay(&mut data.index_mut(), &overlay);
            st.applied = applied.clone();
            if let Some(table) = new_leases {
                st.leases = table;
            }
        }
        drop(overlay);
        self.events.publish(events, applied.revision);
        if applied.compact_revision > compact_before {
            self.wake_compactor();
        }
        self.observer.applied(n_entries, n_commands, started.elapsed());
        Ok(results)
    }

    /// Compacts up to `max` keys of the index at the compact revision, and removes their
    /// unreachable records. Returns whether more remain. See the module docs.
    fn compact_chunk(&self, max: usize) -> Result<bool, ReadError> {
        let _gate = self.compaction_gate.write().unwrap_or_else(|e| e.into_inner());
        let (data, compact) = {
            let st = self.read_state();
            (st.data.clone(), st.applied.compact_revision)
        };
        let mut progress = lock(&self.compaction);
        if progress.done_to >= compact - 1 {
            return Ok(false);
        }
        if progress.target != compact {
            // A new compaction: the walk starts again from the first key.
            *progress = CompactionProgress { target: compact, after: None, done_to: progress.done_to };
        }
        let mut removed = Vec::new();
        let next = data.index_mut().compact(compact, progress.after.as_deref(), max, &mut removed);
        let mut batch = sled::Batch::default();
        for rev in removed {
            batch.remove(&keys::record_key(rev));
        }
        data.tree.apply_batch(batch)?;
        match next {
            Some(last) => {
                progress.after = Some(last);
                Ok(true)
            }
            None => {
                progress.after = None;
                progress.done_to = compact - 1;
                Ok(false)
            }
        }
    }

    /// Writes the snapshot file of the current state. Returns its header, path and size.
    fn write_snapshot(&self) -> io::Result<(SnapshotHeader, PathBuf, u64)> {
        // No compaction chunk runs from the capture to the end of the copy.
        let _gate = self.compaction_gate.read().unwrap_or_else(|e| e.into_inner());
        let (data, header) = self.capture();
        let tmp = self.snapshot_dir.join(format!("build-{}.tmp", self.next_seq()));
        let result = (|| {
            let bytes = self.write_history(&data.tree, &header, &tmp, true)?;
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
        let path = self.snapshot_dir.join(snapshot_file_name(&header.meta, self.next_seq()));
        fs::rename(&tmp, &path)?;
        sync_dir(&self.snapshot_dir)?;
        Ok((header, path, bytes))
    }

    /// The slot and the snapshot header of the applied state, captured together.
    fn capture(&self) -> (Slot, SnapshotHeader) {
        let st = self.read_state();
        let applied = &st.applied;
        let meta =
            SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership.clone() };
        let header = SnapshotHeader {
            meta,
            revision: applied.revision,
            compact_revision: applied.compact_revision,
            replicas: applied.replicas,
            leases: st.leases.values().copied().collect(),
            auth: (*applied.auth).clone(),
        };
        (st.data.clone(), header)
    }

    /// Writes `header` and the records up to its revision, in revision order, to a new snapshot
    /// file at `path`, fsynced when `sync`. The caller holds the compaction gate. Returns the
    /// file's size.
    fn write_history(
        &self,
        tree: &sled::Tree,
        header: &SnapshotHeader,
        path: &Path,
        sync: bool,
    ) -> io::Result<u64> {
        let mut w = SnapshotWriter::create(path, header)?;
        let last = keys::record_key(Rev::new(header.revision, u32::MAX));
        for (i, item) in tree.range(vec![keys::RECORD]..=last.to_vec()).enumerate() {
            #[cfg(test)]
            if i == 1 {
                if let Some((parked, resume)) = lock(&self.build_pause).take() {
                    let _ = parked.send(());
                    let _ = resume.recv();
                }
            }
            let _ = i;
            let (k, v) = item.map_err(io::Error::other)?;
            w.record(&k[1..], &v)?;
        }
        if sync {
            w.finish()
        } else {
            w.finish_unsynced()
        }
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
    /// flips the slot pointer. Returns the number of versions loaded. See the module docs.
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
        let _gate = self.compaction_gate.write().unwrap_or_else(|e| e.into_inner());
        let target = 1 - self.read_state().slot;
        let name = SLOT_NAMES[target];
        self.db.drop_tree(name).map_err(io::Error::other)?;
        let tree = self.db.open_tree(name).map_err(io::Error::other)?;
        let load = (|| {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            let mut versions = 0u64;
            let mut index = IndexBuilder::default();
            let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
            while let Some((rev, bytes)) = reader.next_change()? {
                if rev.main > header.revision {
                    return Err(invalid(format!(
                        "snapshot holds revision {}, beyond its revision {}",
                        rev.main, header.revision
                    )));
                }
                let r = record::decode(&bytes)
                    .ok_or_else(|| invalid(format!("undecodable record at {}", rev.main)))?;
                index.add(rev, &r).map_err(invalid)?;
                batch.insert(&keys::record_key(rev), bytes);
                in_batch += 1;
                versions += 1;
                if in_batch >= LOAD_BATCH {
                    tree.apply_batch(std::mem::take(&mut batch)).map_err(io::Error::other)?;
                    in_batch = 0;
                }
            }
            for lease in &header.leases {
                batch
                    .insert(&keys::lease(lease.id), codec::encode("lease", lease).map_err(io::Error::other)?);
            }
            let applied = AppliedState {
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                revision: header.revision,
                compact_revision: header.compact_revision,
                replicas: header.replicas,
                auth: Arc::new(header.auth.clone()),
            };
            write_meta(&mut batch, &applied).map_err(io::Error::other)?;
            write_auth(&mut batch, &applied.auth).map_err(io::Error::other)?;
            write_layout(&mut batch).map_err(io::Error::other)?;
            tree.apply_batch(batch).map_err(io::Error::other)?;
            self.db.flush().map_err(io::Error::other)?;
            Ok::<_, io::Error>((applied, versions, index.finish()))
        })();
        let (applied, versions, index) = match load {
            Ok(v) => v,
            Err(e) => {
                drop(tree);
                let _ = self.db.drop_tree(name);
                return Err(e);
            }
        };
        let leases: LeaseTable =
            Arc::new(header.leases.iter().map(|l| (l.id, Lease { grant: next_grant(), ..*l })).collect());

        // The flip: from here on the new state is the state.
        let mut st = self.write_state();
        point_at(&self.db, &self.slots, target).map_err(io::Error::other)?;
        let old_slot = st.slot;
        let revision = applied.revision;
        let generation = st.generation + 1;
        *st = SmState { data: Slot::new(tree, index), slot: target, generation, applied, leases };
        drop(st);
        *lock(&self.compaction) = CompactionProgress::default();
        self.events.reset(revision);
        drop_slot(&self.db, old_slot);
        self.wake_compactor();
        Ok(versions)
    }
}

/// Makes `target` the active slot, durably: the flip of an install or an upgrade.
fn point_at(db: &sled::Db, slots: &sled::Tree, target: usize) -> Result<(), sled::Error> {
    slots.insert(SLOT_KEY, &[target as u8])?;
    db.flush()?;
    Ok(())
}

/// Drops the slot a flip left behind; if that fails, the next open drops it.
fn drop_slot(db: &sled::Db, slot: usize) {
    if let Err(e) = db.drop_tree(SLOT_NAMES[slot]) {
        tracing::warn!(error = %e, "could not drop the previous state machine tree; it is dropped at next start");
    }
}

/// The physical compaction thread: waits to be woken, then compacts chunk by chunk until done.
/// Holds only a weak reference, so it ends when the state machine is gone.
fn compactor(shared: Weak<Shared>, wake: mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        while wake.try_recv().is_ok() {}
        loop {
            let Some(shared) = shared.upgrade() else { return };
            if lock(&shared.compactor).is_none() {
                return; // the state machine is being dropped
            }
            match shared.compact_chunk(COMPACTION_CHUNK) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::error!(error = %e, "compaction failed; it resumes at the next compaction");
                    break;
                }
            }
        }
    }
}

fn write_meta(batch: &mut sled::Batch, applied: &AppliedState) -> Result<(), codec::CodecError> {
    let state = StoredState {
        last_applied: applied.last_applied,
        membership: applied.membership.clone(),
        revision: applied.revision,
        compact_revision: applied.compact_revision,
        replicas: applied.replicas,
    };
    batch.insert(keys::meta(META_STATE), codec::encode("applied state", &state)?);
    Ok(())
}

/// The access control state is written only when it changes (it can be a few kilobytes, and
/// most batches do not touch it).
fn write_auth(batch: &mut sled::Batch, auth: &AuthState) -> Result<(), codec::CodecError> {
    batch.insert(keys::meta(META_AUTH), codec::encode("auth", auth)?);
    Ok(())
}

fn write_layout(batch: &mut sled::Batch) -> Result<(), codec::CodecError> {
    batch.insert(keys::meta(META_LAYOUT), codec::encode("layout", &LAYOUT)?);
    Ok(())
}

fn read_meta<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    default: T,
) -> Result<T, SmOpenError> {
    match tree.get(keys::meta(name))? {
        Some(v) => Ok(codec::decode(name, &v)?),
        None => Ok(default),
    }
}

fn read_applied(tree: &sled::Tree) -> Result<AppliedState, SmOpenError> {
    let state: Option<StoredState> = match tree.get(keys::meta(META_STATE))? {
        Some(v) => Some(codec::decode(META_STATE, &v)?),
        None => None,
    };
    let auth = Arc::new(read_meta(tree, META_AUTH, AuthState::default())?);
    Ok(match state {
        Some(s) => AppliedState {
            last_applied: s.last_applied,
            membership: s.membership,
            revision: s.revision,
            compact_revision: s.compact_revision,
            replicas: s.replicas,
            auth,
        },
        None => AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
            revision: INITIAL_REVISION,
            compact_revision: NEVER_COMPACTED,
            replicas: None,
            auth,
        },
    })
}

/// The applied state of a slot of volume format 2, where each scalar had its own key.
fn read_legacy_applied(tree: &sled::Tree) -> Result<AppliedState, SmOpenError> {
    let [applied, membership, revision, compact, _, replicas] = LEGACY_META;
    Ok(AppliedState {
        last_applied: read_meta(tree, applied, None)?,
        membership: read_meta(tree, membership, StoredMembership::default())?,
        revision: read_meta(tree, revision, INITIAL_REVISION)?,
        compact_revision: read_meta(tree, compact, NEVER_COMPACTED)?,
        replicas: read_meta(tree, replicas, None)?,
        auth: Arc::new(read_meta(tree, META_AUTH, AuthState::default())?),
    })
}

fn read_leases(tree: &sled::Tree) -> Result<LeaseTable, SmOpenError> {
    let mut table = BTreeMap::new();
    for item in tree.scan_prefix([keys::LEASE]) {
        let (_, v) = item?;
        let lease: Lease = codec::decode("lease", &v)?;
        table.insert(lease.id, Lease { grant: next_grant(), ..lease });
    }
    Ok(Arc::new(table))
}

/// Builds an index from records, checking that each key's changes come in revision order, and
/// which lease each key's current version carries.
#[derive(Default)]
struct IndexBuilder {
    index: Index,
    leased: std::collections::HashMap<Vec<u8>, LeaseId>,
}

impl IndexBuilder {
    fn add(&mut self, rev: Rev, r: &record::RecordRef<'_>) -> Result<(), String> {
        if !self.index.try_push(r.key, rev, r.deleted) {
            return Err(format!("record at {}.{} is out of revision order for its key", rev.main, rev.sub));
        }
        if !r.deleted && r.lease != 0 {
            self.leased.insert(r.key.to_vec(), r.lease);
        } else if !self.leased.is_empty() {
            self.leased.remove(r.key);
        }
        Ok(())
    }

    fn finish(mut self) -> Index {
        for (key, lease) in self.leased {
            self.index.attach(lease, &key);
        }
        self.index
    }
}

/// The index of the records of `tree`, read in revision order.
fn build_index(tree: &sled::Tree) -> Result<Index, SmOpenError> {
    let mut builder = IndexBuilder::default();
    for item in tree.range(vec![keys::RECORD]..vec![keys::RECORD + 1]) {
        let (k, v) = item?;
        let corrupt = |what: String| SmOpenError::Corrupt(what);
        let rev = keys::parse_record_key(&k).ok_or_else(|| corrupt(format!("bad record key {k:?}")))?;
        let r = record::decode(&v)
            .ok_or_else(|| corrupt(format!("undecodable record at {}.{}", rev.main, rev.sub)))?;
        builder.add(rev, &r).map_err(corrupt)?;
    }
    Ok(builder.finish())
}

/// Upgrades the slot `old` (number `old_slot`) of volume format 2 — live records, a history
/// keyed by user key, a change log — to one record per revision, in the other slot, and flips
/// the slot pointer to it: the same steps as a snapshot install, so a crash at any point leaves
/// either the old slot, upgraded again at the next open, or the new one. Returns the new slot.
fn upgrade_slot(
    db: &sled::Db,
    slots: &sled::Tree,
    old: &sled::Tree,
    old_slot: usize,
) -> Result<(sled::Tree, usize), SmOpenError> {
    let started = Instant::now();
    let target = 1 - old_slot;
    db.drop_tree(SLOT_NAMES[target])?;
    let tree = db.open_tree(SLOT_NAMES[target])?;
    let mut batch = sled::Batch::default();
    let mut records = 0u64;
    for item in old.range(vec![legacy::HISTORY]..vec![legacy::HISTORY + 1]) {
        let (k, v) = item?;
        let (key, revision, sub) = legacy::parse_history(&k, true)
            .ok_or_else(|| SmOpenError::Corrupt(format!("bad history key {k:?}")))?;
        let version: Version = codec::decode("key version", &v)?;
        batch.insert(&keys::record_key(Rev::new(revision, sub)), record::encode(&key, &version));
        records += 1;
        if records.is_multiple_of(LOAD_BATCH as u64) {
            tree.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    for item in old.scan_prefix([keys::LEASE]) {
        let (k, v) = item?;
        batch.insert(k, v);
    }
    let applied = read_legacy_applied(old)?;
    write_meta(&mut batch, &applied)?;
    write_auth(&mut batch, &applied.auth)?;
    write_layout(&mut batch)?;
    tree.apply_batch(batch)?;
    db.flush()?;
    point_at(db, slots, target)?;
    drop_slot(db, old_slot);
    tracing::warn!(
        records,
        revision = applied.revision,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "upgraded the state machine from volume format 2 to one record per revision"
    );
    Ok((tree, target))
}

/// A file name for a snapshot: `snap-<term>-<index>-<seq>-<unix ms>.snap`, unique even for
/// two snapshots of one log position (the sequence number counts this process's snapshots,
/// the time tells processes apart).
fn snapshot_file_name(meta: &SnapshotMeta, seq: u64) -> String {
    let (term, index) = meta.last_log_id.map_or((0, 0), |l| (l.leader_id.term, l.index));
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    format!("snap-{term}-{index}-{seq}-{ms}.snap")
}

/// The state machine (openraft `RaftStateMachine`). See the module docs for its invariants.
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl Drop for StateMachine {
    fn drop(&mut self) {
        self.shared.stop_compactor();
    }
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").finish_non_exhaustive()
    }
}

/// Read access to the applied state for serving client reads and watches; cheap to clone.
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
        event_limits: EventLogLimits,
        background_compaction: bool,
        disk_fault: Option<Arc<dyn DiskFault>>,
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
        let mut tree = db.open_tree(SLOT_NAMES[slot])?;
        let mut slot = slot;
        match tree.get(keys::meta(META_LAYOUT))? {
            Some(v) => {
                let layout: u32 = codec::decode("layout", &v)?;
                if layout > LAYOUT {
                    return Err(SmOpenError::NewerLayout(layout));
                }
            }
            None if tree.is_empty() => {
                let mut batch = sled::Batch::default();
                write_layout(&mut batch)?;
                tree.apply_batch(batch)?;
            }
            None => (tree, slot) = upgrade_slot(&db, &slots, &tree, slot)?,
        }
        let applied = read_applied(&tree)?;
        let leases = read_leases(&tree)?;
        let index_started = Instant::now();
        let index = build_index(&tree)?;
        tracing::info!(
            keys = index.keys(),
            versions = index.versions(),
            elapsed_ms = index_started.elapsed().as_millis() as u64,
            "rebuilt the key index"
        );

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

        let revision = applied.revision;
        let (wake, woken) = mpsc::channel();
        let shared = Arc::new(Shared {
            db,
            slots,
            snapshot_dir,
            state: RwLock::new(SmState {
                data: Slot::new(tree, index),
                slot,
                generation: 0,
                applied,
                leases,
            }),
            events: EventLog::new(revision, event_limits),
            compaction_gate: RwLock::new(()),
            compaction: Mutex::new(CompactionProgress::default()),
            compactor: Mutex::new(Some(wake)),
            compactor_thread: Mutex::new(None),
            build_gate: Arc::new(tokio::sync::RwLock::new(())),
            current: Mutex::new(best.clone()),
            observer,
            disk_fault,
            seq: AtomicU64::new(0),
            #[cfg(test)]
            writes: AtomicU64::new(0),
            #[cfg(test)]
            build_pause: Mutex::new(None),
            #[cfg(test)]
            digest_pause: Mutex::new(None),
            #[cfg(test)]
            events_pause: Mutex::new(None),
        });
        if background_compaction {
            let weak = Arc::downgrade(&shared);
            let compactor_thread = std::thread::Builder::new()
                .name("kvset-compact".into())
                .spawn(move || compactor(weak, woken))
                .map_err(SmOpenError::Thread)?;
            *lock(&shared.compactor_thread) = Some(compactor_thread);
        } else {
            drop(lock(&shared.compactor).take());
        }
        let state_machine = Self { shared: shared.clone() };

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
        // Finish a physical compaction a restart interrupted.
        shared.wake_compactor();
        drop(shared);
        Ok(state_machine)
    }

    /// A reader over the applied state.
    pub fn reader(&self) -> SmReader {
        SmReader { shared: self.shared.clone() }
    }

    /// Where snapshot files live.
    pub(crate) fn snapshot_dir(&self) -> &Path {
        &self.shared.snapshot_dir
    }

    /// Tests: the next snapshot build parks after its first record (it has captured its state
    /// by then) and says so on the returned receiver; it goes on when the returned sender sends
    /// (or is dropped).
    #[cfg(test)]
    pub(crate) fn pause_next_build(&self) -> (mpsc::Receiver<()>, mpsc::SyncSender<()>) {
        let (parked_tx, parked_rx) = mpsc::sync_channel(1);
        let (resume_tx, resume_rx) = mpsc::sync_channel(0);
        *lock(&self.shared.build_pause) = Some((parked_tx, resume_rx));
        (parked_rx, resume_tx)
    }
}

impl SmReader {
    /// Checks that `revision` may be read at `applied`.
    fn check_revision(applied: &AppliedState, revision: Revision) -> Result<(), ReadError> {
        if revision > applied.revision {
            return Err(ReadError::FutureRevision { requested: revision, current: applied.revision });
        }
        if revision < applied.compact_revision {
            return Err(ReadError::Compacted {
                requested: revision,
                compact_revision: applied.compact_revision,
            });
        }
        Ok(())
    }

    /// Fails when compaction passed `revision` while it was being read.
    fn still_readable(&self, revision: Revision) -> Result<(), ReadError> {
        let compact = self.shared.read_state().applied.compact_revision;
        if revision < compact {
            return Err(ReadError::Compacted { requested: revision, compact_revision: compact });
        }
        Ok(())
    }

    /// Runs `read` at `revision` (0: the current one) on the slot, and returns its answer and
    /// the current revision. A read passed by compaction fails as compacted — unless it was a
    /// read of the current revision, which is read again at the new one (as it is when a
    /// snapshot install replaced the state during the read).
    fn read_at<T>(
        &self,
        revision: Revision,
        read: impl Fn(&Slot, Revision) -> Result<T, ReadError>,
    ) -> Result<(T, Revision), ReadError> {
        loop {
            let (data, current, generation) = {
                let st = self.shared.read_state();
                if revision != 0 {
                    Self::check_revision(&st.applied, revision)?;
                }
                (st.data.clone(), st.applied.revision, st.generation)
            };
            let at = if revision == 0 { current } else { revision };
            let result = read(&data, at);
            let (compact, replaced) = {
                let st = self.shared.read_state();
                (st.applied.compact_revision, st.generation != generation)
            };
            if replaced || (at < compact && revision == 0) {
                continue;
            }
            if at < compact {
                return Err(ReadError::Compacted { requested: at, compact_revision: compact });
            }
            return result.map(|r| (r, current));
        }
    }

    /// Reads one key at `revision` (0: the current one). Returns it (if present then) and the
    /// current store revision.
    pub fn get(&self, key: &[u8], revision: Revision) -> Result<(Option<KeyValue>, Revision), ReadError> {
        self.read_at(revision, |data, at| data.get_at(key, at))
    }

    /// Reads one page of a range at its revision. Returns it and the current store revision.
    pub fn range(&self, query: &RangeQuery) -> Result<(RangeResult, Revision), ReadError> {
        self.read_at(query.revision, |data, at| data.range_at(query, at))
    }

    /// The events of revisions `from..=to` (whole revisions, at most about `max_events` events
    /// but at least one revision), from memory when recent, else from the records. Fails with
    /// [`ReadError::Compacted`] when `from` is below the compact revision.
    pub fn events(
        &self,
        from: Revision,
        to: Revision,
        max_events: usize,
    ) -> Result<Vec<Arc<RevisionEvents>>, ReadError> {
        let (data, current, compact) = {
            let st = self.shared.read_state();
            (st.data.clone(), st.applied.revision, st.applied.compact_revision)
        };
        if from < compact {
            return Err(ReadError::Compacted { requested: from, compact_revision: compact });
        }
        let events = match self.shared.events.get(from, to, max_events) {
            Some(recent) => Ok(recent),
            None => {
                // Tests: park between reading the records and their previous values.
                let mut hook = || {
                    #[cfg(test)]
                    if let Some((parked, resume)) = lock(&self.shared.events_pause).take() {
                        let _ = parked.send(());
                        let _ = resume.recv();
                    }
                };
                data.events_between(from, to.min(current), max_events, &mut hook)
            }
        };
        // Compaction may have passed `from` during the read and removed what it was reading
        // (a previous value already gone): that is "compacted", not corrupt.
        let compact = self.shared.read_state().applied.compact_revision;
        if from < compact {
            return Err(ReadError::Compacted { requested: from, compact_revision: compact });
        }
        let events = events?;
        // As etcd, a previous value is the key at the revision before the event: none when that
        // revision is compacted (whether or not physical compaction has removed it yet).
        Ok(events
            .into_iter()
            .map(|r| {
                if r.revision > compact || r.events.iter().all(|e| e.prev.is_none()) {
                    return r;
                }
                let events = r.events.iter().map(|e| Event { prev: None, ..e.clone() }).collect();
                Arc::new(RevisionEvents { revision: r.revision, events })
            })
            .collect())
    }

    /// Announcements of the applied revision, sent once its events are readable.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.shared.events.subscribe()
    }

    /// Users, roles and permissions as applied.
    pub fn auth(&self) -> Arc<AuthState> {
        self.shared.read_state().applied.auth.clone()
    }

    /// The lease table.
    pub fn leases(&self) -> LeaseTable {
        self.shared.read_state().leases.clone()
    }

    /// Lease `id` and the keys attached to it (in key order), if it exists.
    pub fn lease(&self, id: LeaseId) -> Result<Option<LeaseKeys>, ReadError> {
        let st = self.shared.read_state();
        let Some(lease) = st.leases.get(&id).copied() else { return Ok(None) };
        let attached = st.data.index().lease_keys(id);
        Ok(Some((lease, attached)))
    }

    /// The applied state: last applied log id, membership, revisions.
    pub fn applied(&self) -> AppliedState {
        self.shared.read_state().applied.clone()
    }

    /// Where physical compaction has got to: every revision at or below it is compacted.
    pub fn compacted_to(&self) -> Result<Revision, ReadError> {
        Ok(lock(&self.shared.compaction).done_to)
    }

    /// Keys and versions (tombstones included) in the index.
    pub fn index_size(&self) -> (usize, usize) {
        let data = self.shared.read_state().data.clone();
        let index = data.index();
        (index.keys(), index.versions())
    }

    /// Tests: runs one chunk of physical compaction of at most `max` changes now; returns
    /// whether more remain.
    #[cfg(test)]
    pub(crate) fn compact_chunk_now(&self, max: usize) -> Result<bool, ReadError> {
        self.shared.compact_chunk(max)
    }

    /// A digest of the whole logical state at the applied revision: every key there with its
    /// record, the compact revision, the leases and the users and roles. The revision, leases
    /// and access control state are captured under a short read lock; the keys are then read
    /// from the history at that revision with no lock held (history below the applied revision
    /// only changes by compaction, checked afterwards), so a digest of a large store never holds
    /// up apply.
    pub fn digest(&self) -> Result<StateDigest, ReadError> {
        let (data, applied, leases) = {
            let st = self.shared.read_state();
            (st.data.clone(), st.applied.clone(), st.leases.clone())
        };
        let mut crc = crc32fast::Hasher::new();
        let mut keys = 0;
        let mut visited = 0u64;
        data.scan_at(&KeyRange::all(), applied.revision, |key, rev| {
            #[cfg(test)]
            if visited == 1 {
                if let Some((parked, resume)) = lock(&self.shared.digest_pause).take() {
                    let _ = parked.send(());
                    let _ = resume.recv();
                }
            }
            visited += 1;
            let (_, v) = data.fetch(rev)?;
            for field in [&key[..], &v.value[..]] {
                crc.update(&(field.len() as u64).to_le_bytes());
                crc.update(field);
            }
            for n in [v.create_revision, rev.main, v.version, v.lease] {
                crc.update(&n.to_le_bytes());
            }
            keys += 1;
            Ok(true)
        })
        .or_else(|e| self.still_readable(applied.revision).and(Err(e)))?;
        let _ = visited;
        self.still_readable(applied.revision)?;
        crc.update(&applied.compact_revision.to_le_bytes());
        for lease in leases.values() {
            crc.update(&lease.id.to_le_bytes());
            crc.update(&lease.ttl.to_le_bytes());
        }
        crc.update(&codec::encode("auth", &*applied.auth).map_err(|e| ReadError::Corrupt(e.to_string()))?);
        Ok(StateDigest { revision: applied.revision, keys, crc: crc.finalize() })
    }

    /// Tests: the next read of events from the records parks after it read them, before their
    /// previous values; it says so on the returned receiver and goes on when the returned sender
    /// sends.
    #[cfg(test)]
    pub(crate) fn pause_next_history_events(&self) -> (mpsc::Receiver<()>, mpsc::SyncSender<()>) {
        let (parked_tx, parked_rx) = mpsc::sync_channel(1);
        let (resume_tx, resume_rx) = mpsc::sync_channel(0);
        *lock(&self.shared.events_pause) = Some((parked_tx, resume_rx));
        (parked_rx, resume_tx)
    }

    /// Tests: the next digest parks after its first key (it has captured its revision by then)
    /// and says so on the returned receiver; it goes on when the returned sender sends.
    #[cfg(test)]
    pub(crate) fn pause_next_digest(&self) -> (mpsc::Receiver<()>, mpsc::SyncSender<()>) {
        let (parked_tx, parked_rx) = mpsc::sync_channel(1);
        let (resume_tx, resume_rx) = mpsc::sync_channel(0);
        *lock(&self.shared.digest_pause) = Some((parked_tx, resume_rx));
        (parked_rx, resume_tx)
    }

    /// Writes a snapshot file of the applied state (the format Raft ships between members,
    /// which a volume can be restored from, without the token signing key) and returns its
    /// header, path and size. The file
    /// lies in the snapshot directory but is not the Raft snapshot: the caller owns it and
    /// removes it when done (a restart removes a forgotten one).
    pub fn write_backup(&self) -> io::Result<(SnapshotHeader, PathBuf, u64)> {
        let shared = &self.shared;
        let path = shared.snapshot_dir.join(format!("backup-{}.tmp", shared.next_seq()));
        let _gate = shared.compaction_gate.read().unwrap_or_else(|e| e.into_inner());
        let (data, mut header) = shared.capture();
        // The token signing key stays in the cluster: whoever holds a backup must not be able to
        // sign tokens for it (a restored cluster makes a key of its own).
        header.auth.token_key = Vec::new();
        // Not fsynced: the file is read back at once and deleted, and a 100 MB fsync would
        // queue the Raft log's own flushes behind it on the same disk (writes stalled for
        // 0.6 s during backups before).
        match shared.write_history(&data.tree, &header, &path, false) {
            Ok(bytes) => Ok((header, path, bytes)),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// etcd's HashKV: a hash of the key-value history up to `revision` (0: the current one),
    /// the same on every member that applied the same commands, whatever its physical
    /// compaction progress. Returns the hash, the compact revision and the revision hashed.
    pub fn hash_kv(&self, revision: Revision) -> Result<(u32, Revision, Revision), ReadError> {
        // No compaction chunk runs during the walk.
        let _gate = self.shared.compaction_gate.read().unwrap_or_else(|e| e.into_inner());
        let (data, applied) = {
            let st = self.shared.read_state();
            (st.data.clone(), st.applied.clone())
        };
        let revision = if revision == 0 { applied.revision } else { revision };
        Self::check_revision(&applied, revision)?;
        let hash = data.hash_kv(revision, applied.compact_revision)?;
        Ok((hash, applied.compact_revision, revision))
    }

    /// Flushes the whole database to disk.
    pub fn flush(&self) -> Result<(), ReadError> {
        self.shared.db.flush()?;
        Ok(())
    }

    /// Stops background writes (physical compaction, which resumes at the next open) and
    /// flushes: the last step of a member's shutdown. Blocks.
    pub fn close(&self) -> Result<(), ReadError> {
        self.shared.stop_compactor();
        self.flush()
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

impl StateMachine {
    /// Applies entries and returns their results, one per entry. Small applies of
    /// single-key commands run inline; the rest on the blocking pool.
    pub(crate) async fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<BatchResult>, io::Error> {
        // Small applies of single-key commands are in-memory sled batches: inline saves a
        // thread hop on every write. Anything that may touch many keys (range deletes, Txn,
        // lease revokes) or many commands goes to the blocking pool, off the runtime's threads.
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
            .map_err(|e| sm_err("writing", e))?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot<LeaderId, u64, Member, SnapshotFile>, io::Error> {
        let started = Instant::now();
        let gate = self.shared.build_gate.clone().read_owned().await;
        let shared = self.shared.clone();
        let written = tokio::task::spawn_blocking(move || shared.write_snapshot()).await;
        drop(gate);
        let (header, path, bytes) =
            written.map_err(|e| snap_err("writing", e))?.map_err(|e| snap_err("writing", e))?;

        // Open before publishing: publishing may remove the file if a newer snapshot was
        // installed meanwhile, and an open handle stays readable.
        let file = SnapshotFile::open(path.clone()).await.map_err(|e| snap_err("reading", e))?;
        self.shared.publish(&header.meta, &path);
        self.shared.observer.snapshot(false, bytes, started.elapsed());
        tracing::info!(
            last_log_id = ?header.meta.last_log_id, revision = header.revision, bytes,
            elapsed_ms = started.elapsed().as_millis() as u64, "built snapshot"
        );
        Ok(Snapshot { meta: header.meta, snapshot: file })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.shared.read_state().applied.clone();
        Ok((applied.last_applied, applied.membership))
    }

    /// Applies a run of committed entries as one sled batch, then answers each entry's waiting
    /// client (when it has one) with its results.
    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let (entries, responders): (Vec<Entry>, Vec<_>) =
            entries.try_collect::<Vec<_>>().await?.into_iter().unzip();
        if let Some(stall) = self.shared.disk_fault.as_ref().map(|f| f.apply_stall()).filter(|d| !d.is_zero())
        {
            tokio::time::sleep(stall).await;
        }
        let results = self.apply_entries(entries).await?;
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(responder) = responder {
                responder.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let started = Instant::now();
        let _gate = self.shared.build_gate.write().await;
        let partial = snapshot.finish().await.map_err(|e| snap_err("writing", e))?;
        let shared = self.shared.clone();
        let meta2 = meta.clone();
        let result = tokio::task::spawn_blocking(move || -> io::Result<(PathBuf, u64)> {
            let versions = shared.install_blocking(&meta2, &partial)?;
            let path = shared.snapshot_dir.join(snapshot_file_name(&meta2, shared.next_seq()));
            fs::rename(&partial, &path)?;
            sync_dir(&shared.snapshot_dir)?;
            Ok((path, versions))
        })
        .await
        .map_err(|e| snap_err("writing", e))?;
        let (path, versions) = result.map_err(|e| {
            tracing::error!(error = %e, "installing a snapshot failed");
            snap_err("writing", e)
        })?;
        self.shared.publish(meta, &path);
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        self.shared.observer.snapshot(true, bytes, started.elapsed());
        tracing::info!(last_log_id = ?meta.last_log_id, versions, bytes, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<LeaderId, u64, Member, SnapshotFile>>, io::Error> {
        let current = lock(&self.shared.current).clone();
        match current {
            Some(c) => {
                let file = SnapshotFile::open(c.path).await.map_err(|e| snap_err("reading", e))?;
                Ok(Some(Snapshot { meta: c.meta, snapshot: file }))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
#[path = "state_machine_test.rs"]
mod tests;
