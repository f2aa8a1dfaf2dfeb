//! Seeding a volume from a snapshot file: how a backup is restored into a new cluster, and how
//! a survivor of quorum loss becomes a cluster of one.
//!
//! A *seed* is a kvset snapshot file (a backup, see `SmReader::write_backup`) placed at
//! `<data dir>/restore.snap`. While that file exists the volume is mid-seed: the server, before
//! Raft starts, calls [`Store::seed`], which replaces the whole Raft state with a one-member
//! cluster that holds the snapshot's data, and only then removes the file. Every step is
//! repeatable, so a crash at any point ends in a retry of the seed, never in a half-seeded
//! volume that Raft could use:
//!
//! 1. the snapshot is checked (structure, count, checksum) before anything changes;
//! 2. it is rewritten with new Raft metadata — last log id `L` in a term above every term the
//!    volume has seen and at an index above its last entry, and a membership of this member
//!    alone — and installed into the state machine (history, leases and compact revision come
//!    from the file unchanged);
//! 3. the log is purged up to `L` (no entry survives), the committed marker set to `L` and the
//!    vote set to this member in `L`'s term; the database is flushed.
//!
//! The member then starts as the only voter of its cluster and elects itself; a member that
//! joins later receives the data as a Raft snapshot, since no log entry before `L` exists.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;

use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;

use crate::snapshot;
use crate::snapshot::SnapshotFile;
use crate::snapshot::SnapshotHeader;
use crate::volume::remove_durably;
use crate::volume::sync_dir;
use crate::Member;
use crate::Membership;
use crate::SnapshotMeta;
use crate::Store;
use crate::StoredMembership;

/// Name of the pending seed under the data directory.
pub const SEED_FILE: &str = "restore.snap";

/// The pending seed of the volume in `dir`, if one is waiting.
pub fn pending(dir: &Path) -> Option<PathBuf> {
    let path = dir.join(SEED_FILE);
    path.is_file().then_some(path)
}

/// Copies the snapshot `src` to `dir/restore.snap` through a temporary file, fsyncing the
/// file and the directory, so the seed is either wholly there or absent.
pub fn place(src: &Path, dir: &Path) -> io::Result<PathBuf> {
    let tmp = dir.join(format!("{SEED_FILE}.tmp"));
    let dst = dir.join(SEED_FILE);
    fs::copy(src, &tmp)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, &dst)?;
    sync_dir(dir)?;
    Ok(dst)
}

/// Makes `file`, a snapshot on the volume in `dir` (a member's own backup), the pending seed
/// by renaming it, after fsyncing it: no second copy of the data on a volume that may be
/// short of space.
pub fn adopt(file: &Path, dir: &Path) -> io::Result<PathBuf> {
    let dst = dir.join(SEED_FILE);
    fs::File::open(file)?.sync_all()?;
    fs::rename(file, &dst)?;
    sync_dir(dir)?;
    Ok(dst)
}

/// Removes a consumed seed (and fsyncs the directory): the volume is a normal one again.
pub fn finish(dir: &Path) -> io::Result<()> {
    remove_durably(dir, SEED_FILE)
}

/// What a snapshot file holds (`kvset snapshot status`).
#[derive(Debug, Clone)]
pub struct Summary {
    pub header: SnapshotHeader,
    /// Versions of keys (history records), tombstones included.
    pub versions: u64,
    /// Keys alive at the snapshot's revision.
    pub keys: u64,
    /// Size of the file.
    pub bytes: u64,
}

/// Reads and checks a whole snapshot file (structure, count, checksum, every record decodes
/// and none lies beyond the snapshot's revision) and summarises it.
pub fn summarize(path: &Path) -> io::Result<Summary> {
    let bytes = fs::metadata(path)?.len();
    let mut reader = snapshot::SnapshotReader::open(path)?;
    let header = reader.header().clone();
    let (mut versions, mut keys) = (0u64, 0u64);
    let mut last: Option<(Vec<u8>, bool)> = None;
    while let Some((k, v)) = reader.next_record()? {
        let mut full = Vec::with_capacity(k.len() + 1);
        full.push(crate::keys::HISTORY);
        full.extend_from_slice(&k);
        let (key, revision, _, version) = crate::history::decode_entry(&full, &v)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if revision > header.revision {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot holds revision {revision}, beyond its revision {}", header.revision),
            ));
        }
        versions += 1;
        if let Some((prev, deleted)) = last.take() {
            if prev != key && !deleted {
                keys += 1;
            }
        }
        last = Some((key, version.deleted));
    }
    if let Some((_, false)) = last {
        keys += 1;
    }
    Ok(Summary { header, versions, keys, bytes })
}

/// What a seed installed.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// The snapshot's header as installed (with the new Raft metadata).
    pub header: SnapshotHeader,
    /// Records (versions) the snapshot held.
    pub records: u64,
}

impl Store {
    /// Replaces this store's Raft state with a one-member cluster of `node_id` (`me`) holding
    /// the data of the snapshot file `seed` (see the module docs). Checks the file first and
    /// changes nothing if it is damaged. Must run before Raft starts on the store.
    pub async fn seed(&mut self, seed: &Path, node_id: u64, me: Member) -> io::Result<Seeded> {
        let log_state = self.log.get_log_state().await.map_err(io::Error::other)?;
        let vote = self.log.read_vote().await.map_err(io::Error::other)?;
        let (applied, _) = self.state_machine.applied_state().await.map_err(io::Error::other)?;

        let seen = [log_state.last_log_id, log_state.last_purged_log_id, applied];
        let term = seen
            .iter()
            .flatten()
            .map(|l| l.leader_id.term)
            .chain(vote.map(|v| v.leader_id().term))
            .max()
            .unwrap_or(0)
            + 1;
        let index = seen.iter().flatten().map(|l| l.index).max().map_or(1, |i| i + 1);
        let last = crate::log_id(term, node_id, index);
        let membership =
            Membership::new(vec![BTreeSet::from([node_id])], BTreeMap::from([(node_id, me.clone())]))
                .map_err(io::Error::other)?;
        let meta = SnapshotMeta {
            last_log_id: Some(last),
            last_membership: StoredMembership::new(Some(last), membership),
        };
        let partial = self.state_machine.snapshot_dir().join(format!("seed-{term}-{index}.partial"));
        let _ = fs::remove_file(&partial);
        // One pass over the seed, off the runtime's threads: it is checked as it is copied
        // under the new header, and a damaged seed fails here, before anything changed.
        let (src, dst, new_meta) = (seed.to_path_buf(), partial.clone(), meta.clone());
        let copied = tokio::task::spawn_blocking(move || {
            snapshot::rewrite(&src, &dst, |h| SnapshotHeader { meta: new_meta, ..h.clone() })
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        let (header, records) = match copied {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_file(&partial);
                return Err(e);
            }
        };
        let file = SnapshotFile::open(partial).await?;
        self.state_machine.install_snapshot(&meta, file).await.map_err(io::Error::other)?;
        self.log.purge(last).await.map_err(io::Error::other)?;
        self.log.save_committed(Some(last)).await.map_err(io::Error::other)?;
        // save_vote flushes the whole database: everything above is durable after it.
        self.log.save_vote(&crate::Vote::new(term, node_id)).await.map_err(io::Error::other)?;
        tracing::warn!(
            node_id, member = %me.name, revision = header.revision, records, last_log_id = %last,
            "seeded this volume as a one-member cluster from a snapshot file"
        );
        Ok(Seeded { header: SnapshotHeader { meta, ..header }, records })
    }
}
