//! The replicated state machine: keys with their history (MVCC), leases, metadata, snapshots,
//! and the events watchers read.
//!
//! The state lives in one of two sled trees, `sm0` or `sm1` (the *slot*); a one-key tree
//! `sm_slot` says which is active. The layout of a slot tree is in [`crate::keys`]: live
//! records, every version of every key (the history), the change log in revision order, leases
//! and their keys, and the metadata (last applied log id, membership, revision, compact
//! revision, desired replicas).
//!
//! Invariants kept by [`StateMachine`]:
//!
//! * **Apply is atomic with `last_applied`**: every call to `apply` evaluates its entries into
//!   an in-memory overlay and writes the changes (live records, history versions, change log,
//!   leases), the new `last_applied`, the membership and the revision as one `sled::Batch`. A
//!   crash leaves all of it or none of it. Apply does not flush: the log is the durable
//!   record, and sled recovers a prefix of its operations, so after a crash `last_applied` can
//!   only be behind, never ahead; openraft re-applies the rest from the log (entries are only
//!   purged after a snapshot covering them is durable, and the builder flushes the state it
//!   captured before publishing the snapshot).
//! * **History below the applied revision is immutable** except for compaction, which removes
//!   only versions superseded at or before the compact revision (and tombstones there), and
//!   the change-log entries below it. Reads at a past revision therefore take no lock; they
//!   check afterwards that the compact revision did not pass them.
//! * **Compaction is logical, then physical**: `Compact(rev)` sets the compact revision when
//!   applied (the same on every member: reads and watches below it are refused from then on);
//!   a background thread then deletes what it made unreachable, in chunks of
//!   [`COMPACTION_CHUNK`] change-log entries, each its own sled batch, so applies never wait
//!   for more than one chunk of sled work. Its progress is the `compacted_to` metadata key.
//! * **Building a snapshot does not block writes**: the builder captures the metadata and the
//!   lease table under a short read lock, then copies the history up to the captured revision
//!   with no lock (later versions are skipped). Physical compaction pauses while a build runs
//!   (the compaction gate), so the copied history is exactly the captured state.
//! * **Installing a snapshot replaces the state atomically**: the file is verified and loaded
//!   into the inactive slot (the live records, change log and lease attachments rebuilt from
//!   the history), flushed, and only then does the `sm_slot` pointer flip (flushed). A crash
//!   before the flip leaves the old state; after it, the new one.
//! * **Reads see whole batches**: current-revision readers hold the state read lock while they
//!   read the live records, and apply holds the write lock only while it writes its finished
//!   batch. Watchers are told of a revision only after its events are readable.
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
use crate::apply::range_at;
use crate::apply::Overlay;
use crate::apply::ReadError;
use crate::apply::Scalars;
use crate::auth::AuthState;
use crate::codec;
use crate::events::EventLog;
use crate::events::EventLogLimits;
use crate::history;
use crate::keys;
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

const META_APPLIED: &str = "applied";
const META_MEMBERSHIP: &str = "membership";
const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact";
const META_COMPACTED_TO: &str = "compacted_to";
const META_REPLICAS: &str = "replicas";
const META_AUTH: &str = "auth";
const SLOT_KEY: &[u8] = b"active";
const SLOT_NAMES: [&str; 2] = ["sm0", "sm1"];
/// Applies of at most this many single-key commands run inline on the state machine task.
const INLINE_APPLY_COMMANDS: usize = 16;
/// Records per sled batch when loading a snapshot.
const LOAD_BATCH: usize = 10_000;
/// Change-log entries physical compaction handles per sled batch.
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
    tree: sled::Tree,
    slot: usize,
    applied: AppliedState,
    leases: LeaseTable,
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
    /// Tests: a build parks after its first record until this receives.
    #[cfg(test)]
    build_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
    /// Tests: a digest parks after its first key until this receives.
    #[cfg(test)]
    digest_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
    /// Tests: a read of events from the history parks after its first change-log entry until
    /// this receives.
    #[cfg(test)]
    events_pause: Mutex<Option<(mpsc::SyncSender<()>, mpsc::Receiver<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug elsewhere; the data they guard stays
    // consistent (every update is a single assignment), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds the writes of `overlay` to `batch`.
fn write_overlay(batch: &mut sled::Batch, overlay: &Overlay<'_>) -> Result<(), codec::CodecError> {
    for (key, change) in &overlay.live {
        match change {
            Some(value) => batch.insert(keys::live(key), codec::encode("stored value", value)?),
            None => batch.remove(keys::live(key)),
        }
    }
    for (key, revision, sub, version) in &overlay.history {
        batch.insert(keys::history(key, *revision, *sub), codec::encode("key version", version)?);
        batch.insert(&keys::change(*revision, *sub), key.as_slice());
    }
    for (id, lease) in &overlay.leases {
        match lease {
            Some(l) => batch.insert(&keys::lease(*id), codec::encode("lease", l)?),
            None => batch.remove(&keys::lease(*id)),
        }
    }
    for ((id, key), present) in &overlay.attachments {
        if *present {
            batch.insert(keys::lease_key(*id, key), &[] as &[u8]);
        } else {
            batch.remove(keys::lease_key(*id, key));
        }
    }
    Ok(())
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
        // (live records, leases; physical compaction deletes only versions superseded before
        // the compact revision, never a live record), and openraft never runs an install
        // concurrently with an apply, so what the overlay reads cannot change under it.
        // Readers wait only for the final batch write below.
        let (tree, mut applied, leases) = {
            let st = self.read_state();
            (st.tree.clone(), st.applied.clone(), st.leases.clone())
        };
        let compact_before = applied.compact_revision;
        let mut scalars = applied.scalars();
        let auth_before = applied.auth.clone();
        let mut overlay = Overlay::new(&tree, applied.revision, &leases).with_auth(&auth_before);
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
        write_overlay(&mut batch, &overlay).map_err(|e| sm_err("writing", e))?;
        if let Some(auth) = overlay.auth.take() {
            applied.auth = Arc::new(auth);
            write_auth(&mut batch, &applied.auth).map_err(|e| sm_err("writing", e))?;
        }
        write_meta(&mut batch, &applied).map_err(|e| sm_err("writing", e))?;
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
        drop(overlay);
        {
            // Readers see the whole batch with its revision or none of it.
            let mut st = self.write_state();
            tree.apply_batch(batch).map_err(|e| sm_err("writing", e))?;
            st.applied = applied.clone();
            if let Some(table) = new_leases {
                st.leases = table;
            }
        }
        self.events.publish(events, applied.revision);
        if applied.compact_revision > compact_before {
            self.wake_compactor();
        }
        self.observer.applied(n_entries, n_commands, started.elapsed());
        Ok(results)
    }

    /// Handles up to `max` change-log entries below the compact revision. Returns whether more
    /// remain. See the module docs.
    fn compact_chunk(&self, max: usize) -> Result<bool, ReadError> {
        let _gate = self.compaction_gate.write().unwrap_or_else(|e| e.into_inner());
        let (tree, compact) = {
            let st = self.read_state();
            (st.tree.clone(), st.applied.compact_revision)
        };
        let done: Revision = match tree.get(keys::meta(META_COMPACTED_TO))? {
            Some(v) => codec::decode("compacted to", &v)?,
            None => 0,
        };
        // Every revision below `compact` is handled once `done` reaches compact - 1.
        let last = compact - 1;
        if done >= last {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        let mut stopped_at = None;
        for (handled, item) in
            tree.range(keys::change(done + 1, 0)..=keys::change(last, u32::MAX)).enumerate()
        {
            let (k, key) = item?;
            let (revision, sub) =
                keys::parse_change(&k).ok_or_else(|| ReadError::Corrupt(format!("bad change key {k:?}")))?;
            if handled >= max {
                stopped_at = Some(revision);
                break;
            }
            let superseded = tree
                .range(
                    keys::history(&key, revision, sub.saturating_add(1))
                        ..=keys::history(&key, compact, u32::MAX),
                )
                .next()
                .transpose()?
                .is_some();
            let this = keys::history(&key, revision, sub);
            let tombstone = match tree.get(&this)? {
                Some(v) => codec::decode::<Version>("key version", &v)?.deleted,
                None => false,
            };
            if superseded || tombstone {
                batch.remove(this);
            }
            // Every older version of the key is superseded by this one, which is below the
            // compact revision. Most were removed when their own change-log entry was handled;
            // the one that was the key's visible version at an earlier compaction was kept
            // then, and its change-log entry is gone: it must go now, or it would become the
            // key's newest version once this one (a tombstone) is removed.
            for older in tree.range(keys::history(&key, 0, 0)..keys::history(&key, revision, sub)) {
                batch.remove(older?.0);
            }
            batch.remove(k);
        }
        // A chunk may stop inside a revision: its handled entries are gone from the change log,
        // so starting that revision again is safe.
        let progress = stopped_at.map_or(last, |r| r - 1);
        batch.insert(keys::meta(META_COMPACTED_TO), codec::encode("compacted to", &progress)?);
        tree.apply_batch(batch)?;
        Ok(stopped_at.is_some())
    }

    /// Writes the snapshot file of the current state. Returns its header, path and size.
    fn write_snapshot(&self) -> io::Result<(SnapshotHeader, PathBuf, u64)> {
        // No compaction chunk runs from the capture to the end of the copy.
        let _gate = self.compaction_gate.read().unwrap_or_else(|e| e.into_inner());
        let (tree, header) = self.capture();
        let tmp = self.snapshot_dir.join(format!("build-{}.tmp", self.next_seq()));
        let result = (|| {
            let bytes = self.write_history(&tree, &header, &tmp, true)?;
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

    /// The tree and the snapshot header of the applied state, captured together.
    fn capture(&self) -> (sled::Tree, SnapshotHeader) {
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
        (st.tree.clone(), header)
    }

    /// Writes `header` and the history up to its revision to a new snapshot file at `path`,
    /// fsynced when `sync`. The caller holds the compaction gate. Returns the file's size.
    fn write_history(
        &self,
        tree: &sled::Tree,
        header: &SnapshotHeader,
        path: &Path,
        sync: bool,
    ) -> io::Result<u64> {
        let mut w = SnapshotWriter::create(path, header)?;
        for (i, item) in tree.range(vec![keys::HISTORY]..vec![keys::HISTORY + 1]).enumerate() {
            #[cfg(test)]
            if i == 1 {
                if let Some((parked, resume)) = lock(&self.build_pause).take() {
                    let _ = parked.send(());
                    let _ = resume.recv();
                }
            }
            let _ = i;
            let (k, v) = item.map_err(io::Error::other)?;
            let (_, revision, _) = keys::parse_history(&k)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad history key"))?;
            if revision <= header.revision {
                w.record(&k[1..], &v)?;
            }
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
            // The last version of the key being loaded: it becomes the live record unless it is
            // a tombstone.
            let mut last: Option<(Vec<u8>, Revision, Version)> = None;
            let finish_key = |batch: &mut sled::Batch, last: Option<(Vec<u8>, Revision, Version)>| {
                if let Some((key, revision, v)) = last {
                    if !v.deleted {
                        let live = StoredValue {
                            value: v.value,
                            create_revision: v.create_revision,
                            mod_revision: revision,
                            version: v.version,
                            lease: v.lease,
                        };
                        batch.insert(
                            keys::live(&key),
                            codec::encode("stored value", &live).map_err(io::Error::other)?,
                        );
                        if v.lease != 0 {
                            batch.insert(keys::lease_key(v.lease, &key), &[] as &[u8]);
                        }
                    }
                }
                Ok::<_, io::Error>(())
            };
            while let Some((k, value)) = reader.next_record()? {
                let mut full = Vec::with_capacity(k.len() + 1);
                full.push(keys::HISTORY);
                full.extend_from_slice(&k);
                let (key, revision, sub, version) = history::decode_entry(&full, &value)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if revision > header.revision {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "snapshot holds revision {revision}, beyond its revision {}",
                            header.revision
                        ),
                    ));
                }
                if last.as_ref().is_some_and(|(lk, _, _)| *lk != key) {
                    finish_key(&mut batch, last.take())?;
                }
                batch.insert(full, value);
                batch.insert(&keys::change(revision, sub), key.as_slice());
                last = Some((key, revision, version));
                in_batch += 1;
                versions += 1;
                if in_batch >= LOAD_BATCH {
                    tree.apply_batch(std::mem::take(&mut batch)).map_err(io::Error::other)?;
                    in_batch = 0;
                }
            }
            finish_key(&mut batch, last.take())?;
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
            tree.apply_batch(batch).map_err(io::Error::other)?;
            self.db.flush().map_err(io::Error::other)?;
            Ok::<_, io::Error>((applied, versions))
        })();
        let (applied, versions) = match load {
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
        self.slots.insert(SLOT_KEY, &[target as u8]).map_err(io::Error::other)?;
        self.db.flush().map_err(io::Error::other)?;
        let old_slot = st.slot;
        let revision = applied.revision;
        *st = SmState { tree, slot: target, applied, leases };
        drop(st);
        self.events.reset(revision);
        if let Err(e) = self.db.drop_tree(SLOT_NAMES[old_slot]) {
            tracing::warn!(error = %e, "could not drop the previous state machine tree; it is dropped at next start");
        }
        self.wake_compactor();
        Ok(versions)
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
    batch.insert(keys::meta(META_APPLIED), codec::encode("last applied", &applied.last_applied)?);
    batch.insert(keys::meta(META_MEMBERSHIP), codec::encode("membership", &applied.membership)?);
    batch.insert(keys::meta(META_REVISION), codec::encode("revision", &applied.revision)?);
    batch.insert(keys::meta(META_COMPACT), codec::encode("compact revision", &applied.compact_revision)?);
    batch.insert(keys::meta(META_REPLICAS), codec::encode("replicas", &applied.replicas)?);
    Ok(())
}

/// The access control state is written only when it changes (it can be a few kilobytes, and
/// most batches do not touch it).
fn write_auth(batch: &mut sled::Batch, auth: &AuthState) -> Result<(), codec::CodecError> {
    batch.insert(keys::meta(META_AUTH), codec::encode("auth", auth)?);
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
    Ok(AppliedState {
        last_applied: read_meta(tree, META_APPLIED, None)?,
        membership: read_meta(tree, META_MEMBERSHIP, StoredMembership::default())?,
        revision: read_meta(tree, META_REVISION, INITIAL_REVISION)?,
        compact_revision: read_meta(tree, META_COMPACT, NEVER_COMPACTED)?,
        replicas: read_meta(tree, META_REPLICAS, None)?,
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
        let tree = db.open_tree(SLOT_NAMES[slot])?;
        let applied = read_applied(&tree)?;
        let leases = read_leases(&tree)?;

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
            state: RwLock::new(SmState { tree, slot, applied, leases }),
            events: EventLog::new(revision, event_limits),
            compaction_gate: RwLock::new(()),
            compactor: Mutex::new(Some(wake)),
            compactor_thread: Mutex::new(None),
            build_gate: Arc::new(tokio::sync::RwLock::new(())),
            current: Mutex::new(best.clone()),
            observer,
            disk_fault,
            seq: AtomicU64::new(0),
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

    /// Reads one key at `revision` (0: the current one). Returns it (if present then) and the
    /// current store revision.
    pub fn get(&self, key: &[u8], revision: Revision) -> Result<(Option<KeyValue>, Revision), ReadError> {
        let st = self.shared.read_state();
        let current = st.applied.revision;
        if revision == 0 || revision == current {
            let value = match st.tree.get(keys::live(key))? {
                Some(bytes) => {
                    Some(codec::decode::<StoredValue>("stored value", &bytes)?.to_key_value(key, false))
                }
                None => None,
            };
            return Ok((value, current));
        }
        Self::check_revision(&st.applied, revision)?;
        let tree = st.tree.clone();
        drop(st);
        let kv = history::get_at(&tree, key, revision)?;
        self.still_readable(revision)?;
        Ok((kv, current))
    }

    /// Reads one page of a range at its revision. Returns it and the current store revision.
    pub fn range(&self, query: &RangeQuery) -> Result<(RangeResult, Revision), ReadError> {
        let st = self.shared.read_state();
        let current = st.applied.revision;
        if query.revision == 0 || query.revision == current {
            let leases = st.leases.clone();
            let result = Overlay::new(&st.tree, current, &leases).range_current(query)?;
            return Ok((result, current));
        }
        Self::check_revision(&st.applied, query.revision)?;
        let tree = st.tree.clone();
        drop(st);
        let result = range_at(&tree, query, query.revision)?;
        self.still_readable(query.revision)?;
        Ok((result, current))
    }

    /// The events of revisions `from..=to` (whole revisions, at most about `max_events` events
    /// but at least one revision), from memory when recent, else from the history. Fails with
    /// [`ReadError::Compacted`] when `from` is below the compact revision.
    pub fn events(
        &self,
        from: Revision,
        to: Revision,
        max_events: usize,
    ) -> Result<Vec<Arc<RevisionEvents>>, ReadError> {
        let (tree, applied) = {
            let st = self.shared.read_state();
            (st.tree.clone(), st.applied.clone())
        };
        if from < applied.compact_revision {
            return Err(ReadError::Compacted { requested: from, compact_revision: applied.compact_revision });
        }
        let events = match self.shared.events.get(from, to, max_events) {
            Some(recent) => Ok(recent),
            None => {
                // Tests: park between reading a change-log entry and its version.
                let mut hook = || {
                    #[cfg(test)]
                    if let Some((parked, resume)) = lock(&self.shared.events_pause).take() {
                        let _ = parked.send(());
                        let _ = resume.recv();
                    }
                };
                history::events_between(&tree, from, to.min(applied.revision), max_events, &mut hook)
            }
        };
        // Compaction may have passed `from` during the read and removed what it was reading
        // (the change log naming a version already gone): that is "compacted", not corrupt.
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
        let prefix = keys::lease_keys_prefix(id);
        let mut attached = Vec::new();
        for item in st.tree.scan_prefix(prefix) {
            let (k, _) = item?;
            attached.push(k[prefix.len()..].to_vec());
        }
        Ok(Some((lease, attached)))
    }

    /// The applied state: last applied log id, membership, revisions.
    pub fn applied(&self) -> AppliedState {
        self.shared.read_state().applied.clone()
    }

    /// Where physical compaction has got to: every revision at or below it is compacted.
    pub fn compacted_to(&self) -> Result<Revision, ReadError> {
        let tree = self.shared.read_state().tree.clone();
        Ok(match tree.get(keys::meta(META_COMPACTED_TO))? {
            Some(v) => codec::decode("compacted to", &v)?,
            None => 0,
        })
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
        let (tree, applied, leases) = {
            let st = self.shared.read_state();
            (st.tree.clone(), st.applied.clone(), st.leases.clone())
        };
        let mut crc = crc32fast::Hasher::new();
        let mut keys = 0;
        let mut visited = 0u64;
        history::scan_at(&tree, &KeyRange::all(), applied.revision, |kv| {
            #[cfg(test)]
            if visited == 1 {
                if let Some((parked, resume)) = lock(&self.shared.digest_pause).take() {
                    let _ = parked.send(());
                    let _ = resume.recv();
                }
            }
            visited += 1;
            for field in [&kv.key[..], &kv.value[..]] {
                crc.update(&(field.len() as u64).to_le_bytes());
                crc.update(field);
            }
            for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                crc.update(&n.to_le_bytes());
            }
            keys += 1;
            true
        })?;
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

    /// Tests: the next read of events from the history parks after it read its first change-log
    /// entry, before it reads that version and says so on the returned receiver; it goes on when the
    /// returned sender sends.
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
        let (tree, mut header) = shared.capture();
        // The token signing key stays in the cluster: whoever holds a backup must not be able to
        // sign tokens for it (a restored cluster makes a key of its own).
        header.auth.token_key = Vec::new();
        // Not fsynced: the file is read back at once and deleted, and a 100 MB fsync would
        // queue the Raft log's own flushes behind it on the same disk (writes stalled for
        // 0.6 s during backups before).
        match shared.write_history(&tree, &header, &path, false) {
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
        let (tree, applied) = {
            let st = self.shared.read_state();
            (st.tree.clone(), st.applied.clone())
        };
        let revision = if revision == 0 { applied.revision } else { revision };
        Self::check_revision(&applied, revision)?;
        let hash = history::hash_kv(&tree, revision, applied.compact_revision)?;
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
