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

/// The revision amount a restore or a quorum-loss recovery bumps by default (as the Kubernetes
/// documentation advises for `etcdutl snapshot restore --bump-revision`): far more than any
/// writes a lost member or a backup can have missed.
pub const DEFAULT_BUMP_REVISION: u64 = 1_000_000_000;

/// The header a seed installs: the snapshot's, with the store revision raised by `bump` and
/// everything below the new revision marked compacted (etcd's `--bump-revision N
/// --mark-compacted`), and a new token signing key.
///
/// Writes the lost cluster made after the backup (or that the surviving member never received)
/// had revisions above the snapshot's; a new cluster that handed out the same numbers for other
/// data would let a compare on `mod_revision` succeed against the wrong object and a watcher
/// resuming at its last revision silently skip history. Bumped, no number is reused, and a
/// watcher resuming below the new revision is told the history is compacted and re-lists.
/// `bump` 0 keeps the revisions and the compact revision as they were.
pub fn restored_header(header: &SnapshotHeader, bump: u64) -> io::Result<SnapshotHeader> {
    let mut out = header.clone();
    if bump > 0 {
        let revision =
            i64::try_from(bump).ok().and_then(|b| header.revision.checked_add(b)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("revision {} bumped by {bump} does not fit a revision", header.revision),
                )
            })?;
        out.revision = revision;
        out.compact_revision = revision;
    }
    // Tokens of the source cluster die: a restored cluster signs with a key of its own.
    out.auth.token_key = if out.auth.enabled { rand::random::<[u8; 32]>().to_vec() } else { Vec::new() };
    Ok(out)
}

/// Writes the snapshot `src` as `dir/restore.snap` with its header made [`restored_header`]
/// (`bump`), through a temporary file, fsyncing the file and the directory, so the seed is
/// either wholly there or absent. The source is checked on the way; a damaged one is refused.
pub fn place(src: &Path, dir: &Path, bump: u64) -> io::Result<PathBuf> {
    let tmp = dir.join(format!("{SEED_FILE}.tmp"));
    let dst = dir.join(SEED_FILE);
    let _ = fs::remove_file(&tmp);
    if let Err(e) = snapshot::rewrite(src, &tmp, |h| restored_header(h, bump)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &dst)?;
    sync_dir(dir)?;
    Ok(dst)
}

/// Makes `file`, a snapshot on the volume in `dir` (a member's own backup), the pending seed
/// (see [`place`]) and removes `file`.
pub fn adopt(file: &Path, dir: &Path, bump: u64) -> io::Result<PathBuf> {
    let dst = place(file, dir, bump)?;
    fs::remove_file(file)?;
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
    let mut versions = 0u64;
    // Whether each key's last change so far deleted it (records come in revision order).
    let mut deleted: std::collections::HashMap<Vec<u8>, bool> = std::collections::HashMap::new();
    while let Some((rev, bytes)) = reader.next_change()? {
        if rev.main > header.revision {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot holds revision {}, beyond its revision {}", rev.main, header.revision),
            ));
        }
        let r = crate::keys::record::decode(&bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "undecodable record"))?;
        versions += 1;
        deleted.insert(r.key.to_vec(), r.deleted);
    }
    let keys = deleted.values().filter(|d| !**d).count() as u64;
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
            snapshot::rewrite(&src, &dst, |h| Ok(SnapshotHeader { meta: new_meta, ..h.clone() }))
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
