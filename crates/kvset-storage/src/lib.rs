//! Durable storage for one kvset member: its volume identity, the Raft log, the key-value state
//! machine and its snapshots, all in one sled database per volume.
//!
//! # How a write flows through this crate
//!
//! 1. The server batches client writes into one [`Batch`] and proposes it to openraft.
//! 2. openraft calls [`LogStore`]'s `append`: the entry is written to the `raft` tree and its
//!    callback handed to the flusher thread, which acknowledges it only after `Db::flush`
//!    returned. openraft 0.10 replicates the entry meanwhile and issues further appends without
//!    waiting, so one fsync covers every append that arrived while the previous one ran.
//! 3. Once a quorum has the entry, openraft calls [`StateMachine`]'s `apply`: every command of
//!    the batch is evaluated through an in-memory overlay and written, with the new
//!    `last_applied`, in one atomic `sled::Batch`: one record per changed key, keyed by
//!    revision (a put is one sled write), leases; the in-memory key index takes the same
//!    changes. The results ([`BatchResult`]) go back to the waiting clients; the events go to
//!    the in-memory [`EventLog`] and watchers are told of the new revision.
//! 4. Reads go through [`SmReader`]: every read is a read at a revision (the current one by
//!    default): the index says where each key's version then is, sled holds the record;
//!    watchers read events from memory or, when they lag, from the records in revision order.
//! 5. `Compact(revision)` makes older history unreachable at once; a background thread then
//!    walks the index and deletes it in small chunks.
//! 6. Now and then openraft asks for a snapshot: the builder copies the records up to the
//!    captured revision without blocking applies, and openraft purges the log up to it.
//!
//! # Layout of a volume
//!
//! ```text
//! <data dir>/kvset-volume.json   identity: node id, ordinal, cluster id (volume.rs)
//! <data dir>/db/                 sled: trees `raft` (log + vote), `sm0`/`sm1` (state: one record
//!                                per revision, leases, applied state; see `keys`), `sm_slot`
//! <data dir>/snapshots/          snap-<term>-<index>-<id>.snap (snapshot.rs)
//! <data dir>/restore.snap         only while a restore or a recovery is seeding the volume (seed.rs)
//! <data dir>/defrag.requested     only while a defragmentation is pending (defrag.rs)
//! ```
//!
//! # What it leaves out
//!
//! * Lease expiry times live in the leader's memory (the server's lessor), not here: the state
//!   machine records which leases exist, their TTL and their keys.
//! * Volumes of format 1 (kvset 0.1, no history) are refused with a clear error, not converted;
//!   volumes of format 2 (kvset 0.2) are upgraded in place at first open.
//! * sled never shrinks its files by itself; space after deletes is reused, and returned to the
//!   filesystem only by a defragmentation (`defrag`), which runs while the database is closed.
//! * A snapshot received from a leader that fails verification stops the node (openraft treats
//!   every storage error as fatal); it is reported, never half-applied.
//!
//! Every type keeps its invariants and flush points in its own docs: [`LogStore`],
//! [`StateMachine`], [`Volume`].

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod apply;
pub mod auth;
pub mod codec;
pub mod defrag;
mod entry_cache;
pub mod events;
mod history;
mod index;
mod keys;
mod log_store;
mod observer;
pub mod seed;
pub mod snapshot;
mod state_machine;
pub mod types;
pub mod volume;

use std::path::Path;
use std::sync::Arc;

pub use apply::ReadError;
pub use events::EventLog;
pub use events::EventLogLimits;
pub use log_store::LogReader;
pub use log_store::LogStore;
pub use observer::DiskFault;
pub use observer::NoopObserver;
pub use observer::StorageObserver;
pub use snapshot::SnapshotFile;
pub use state_machine::AppliedState;
pub use state_machine::LeaseKeys;
pub use state_machine::LeaseTable;
pub use state_machine::SmOpenError;
pub use state_machine::SmReader;
pub use state_machine::SnapshotBuilder;
pub use state_machine::StateDigest;
pub use state_machine::StateMachine;
pub use state_machine::COMPACTION_CHUNK;
pub use state_machine::INITIAL_REVISION;
pub use state_machine::NEVER_COMPACTED;
pub use types::*;
pub use volume::ClusterId;
pub use volume::Volume;
pub use volume::VolumeError;
pub use volume::VolumeMeta;

openraft::declare_raft_types!(
    /// kvset's openraft type configuration.
    pub TypeConfig:
        D = Batch,
        R = BatchResult,
        NodeId = u64,
        Node = Member,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// The payload of a log entry.
pub type EntryPayload = openraft::EntryPayload<Batch, u64, Member>;
/// The leader of a term, as recorded in log ids (term, node id).
pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, u64>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote (term, candidate, committed).
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A membership config with the log id it was stored at.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// A membership config.
pub type Membership = openraft::Membership<u64, Member>;

/// A member's Raft: openraft over this crate's log and state machine.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// openraft's metrics of a member.
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;

/// The watch of openraft's metrics.
pub type RaftMetricsRx = openraft::type_config::alias::WatchReceiverOf<TypeConfig, RaftMetrics>;
pub use openraft::async_runtime::WatchReceiver;

/// A log id from its parts.
pub fn log_id(term: u64, node_id: u64, index: u64) -> LogId {
    LogId::new(LeaderId { term, node_id }, index)
}

/// Error opening a member's storage.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{path}: cannot open the database: {source}")]
    Sled { path: std::path::PathBuf, source: sled::Error },
    #[error(transparent)]
    StateMachine(#[from] SmOpenError),
    #[error(
        "{path}: No space left on device: {free} bytes free, and opening the database needs at least {needed} \
         (sled writes as it opens, and a write that fails half-way there damages it); expand the volume or \
         free space, then start again"
    )]
    NoSpace { path: std::path::PathBuf, free: u64, needed: u64 },
}

/// Free space a volume must have before its database is opened.
pub const MIN_FREE_BYTES: u64 = 16 << 20;

/// The snapshot directory of the volume at `data_dir`.
pub fn snapshot_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("snapshots")
}

/// Bytes available to this process on the filesystem of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Tuning of the sled database.
#[derive(Clone)]
pub struct StoreOptions {
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
    /// Receives flush, apply and snapshot events (metrics).
    pub observer: Arc<dyn StorageObserver>,
    /// Bounds of the in-memory ring of recent events watchers read from.
    pub events: EventLogLimits,
    /// Slows the disk down (tests only).
    pub disk_fault: Option<Arc<dyn DiskFault>>,
    /// Tests: no compaction thread; physical compaction runs only when a test asks.
    #[cfg(test)]
    pub(crate) manual_compaction: bool,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions").field("cache_bytes", &self.cache_bytes).finish_non_exhaustive()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 256 << 20,
            observer: Arc::new(NoopObserver),
            events: EventLogLimits::default(),
            disk_fault: None,
            #[cfg(test)]
            manual_compaction: false,
        }
    }
}

/// An opened member store: the log and the state machine over one sled database.
#[derive(Debug)]
pub struct Store {
    pub log: LogStore,
    pub state_machine: StateMachine,
    pub reader: SmReader,
    db: sled::Db,
}

impl Store {
    /// Opens (creating if needed) the database of an opened [`Volume`]. Needs a Tokio runtime:
    /// (kept for symmetry with the server; the flusher is a thread of its own).
    pub fn open(volume: &Volume, options: StoreOptions) -> Result<Self, OpenError> {
        let store = Self::open_dir(volume.dir(), options)?;
        // The store is of the current format now (an older one was upgraded as it opened).
        volume::record_current_format(volume)?;
        Ok(store)
    }

    /// Opens the database under `dir` without looking at volume metadata (for tools and tests
    /// that manage identity themselves).
    pub fn open_dir(dir: &Path, options: StoreOptions) -> Result<Self, OpenError> {
        let db_path = dir.join("db");
        defrag::finish_interrupted(dir)
            .map_err(|e| OpenError::Sled { path: db_path.clone(), source: e.into() })?;
        // A full disk is refused before sled writes anything (see `OpenError::NoSpace`).
        if let Ok(free) = free_bytes(dir) {
            if free < MIN_FREE_BYTES {
                return Err(OpenError::NoSpace { path: dir.to_path_buf(), free, needed: MIN_FREE_BYTES });
            }
        }
        let db = sled::Config::new()
            .path(&db_path)
            .cache_capacity(options.cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| OpenError::Sled { path: db_path.clone(), source })?;
        let log = LogStore::open(db.clone(), dir, options.observer.clone(), options.disk_fault.clone())
            .map_err(|source| OpenError::Sled { path: db_path.clone(), source })?;
        #[cfg(test)]
        let background_compaction = !options.manual_compaction;
        #[cfg(not(test))]
        let background_compaction = true;
        let state_machine = StateMachine::open(
            db.clone(),
            snapshot_dir(dir),
            options.observer,
            options.events,
            background_compaction,
            options.disk_fault,
        )?;
        let reader = state_machine.reader();
        Ok(Self { log, state_machine, reader, db })
    }

    /// Flushes everything to disk.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(|_| ())
    }

    /// Bytes sled reports for its files (includes space not yet reused).
    pub fn db_size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Bytes used by every file under `dir`, recursively (what a volume costs on disk).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += dir_size(&entry.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

#[cfg(test)]
mod fuzz_test;

#[cfg(test)]
mod model_test;

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;
    use std::time::Instant;

    use crate::Revision;
    use crate::SmReader;

    /// Waits (polling, with a deadline) until physical compaction has handled every revision up
    /// to `target`.
    pub(crate) async fn wait_compacted(reader: &SmReader, target: Revision) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.compacted_to().unwrap() < target {
            assert!(Instant::now() < deadline, "compaction did not reach {target}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
