//! What a member does with its volume before Raft starts: finish a restore (a pending seed
//! left by `kvset snapshot restore`) and, when `force_new_cluster` names this member, recover
//! from quorum loss by becoming a new cluster of one with the data it has.
//!
//! Quorum-loss recovery, in order (each step repeatable after a crash, see `kvset_storage::seed`):
//! 1. apply every entry of its log; refuse an empty volume (nothing to recover);
//! 2. move the volume to a new cluster id, recording that a recovery is under way (from here
//!    on the recovery is finished at every start, whatever the setting says);
//! 3. write a backup of the applied state and place it as the volume's pending seed, with the
//!    store revision bumped by `force_new_cluster_bump_revision` and everything below marked
//!    compacted;
//! 4. seed: the membership becomes this member alone, the data stays, the log is purged; the
//!    record says the recovery is done.
//!
//! The other ordinals, started with empty volumes, then find this member's cluster and join it
//! like any replacement; old volumes of the lost cluster are refused (foreign cluster id), so
//! they can never merge back. The record of step 3 makes the setting inert: a member that has
//! recovered ignores `force_new_cluster` until it has started once without it.

use std::path::Path;

use kvset_storage::seed;
use kvset_storage::ClusterId;
use kvset_storage::Member;
use kvset_storage::Store;
use kvset_storage::Volume;

/// Log entries read and applied at a time when a recovery replays the log.
const REPLAY_SLICE: u64 = 1000;

/// Why a member refused to start from its volume.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "force_new_cluster names this member ({name}), but its volume {dir} holds no applied data: there is \
         nothing to recover from. Set force_new_cluster to the name of a member whose volume survived, or \
         remove it (empty volumes join or bootstrap by themselves)"
    )]
    EmptyVolume { name: String, dir: String },
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error(transparent)]
    Volume(#[from] kvset_storage::VolumeError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> RecoveryError {
    move |source| RecoveryError::Io { what, source }
}

/// Applies `force_new_cluster` (the configured member name, empty when unset) and any pending
/// seed to the freshly opened `volume` and `store` of member `me`.
pub async fn prepare(
    force_new_cluster: &str,
    bump_revision: u64,
    me: &Member,
    volume: &mut Volume,
    store: &mut Store,
) -> Result<(), RecoveryError> {
    let dir = volume.dir().to_path_buf();
    let marker = volume.meta().forced_new_cluster.clone();
    if marker.as_ref().is_some_and(|m| !m.done) {
        // A recovery began and was cut short: the volume already has its new cluster id, so it
        // is finished whatever the setting says now.
        tracing::warn!("force_new_cluster: finishing a recovery that was interrupted");
        save_seed(store, &dir, bump_revision).await?;
    } else if force_new_cluster.is_empty() {
        if marker.is_some() {
            volume.rearm_force_new_cluster()?;
            tracing::info!("force_new_cluster is unset: a later setting naming this member will act again");
        }
    } else if force_new_cluster != me.name {
        tracing::info!(
            force_new_cluster,
            "force_new_cluster names another member; this member ignores it and joins that member's cluster"
        );
    } else if let Some(done) = marker {
        tracing::error!(
            from_cluster = ?done.from_cluster, unix_ms = done.unix_ms, cluster_id = ?volume.cluster_id(),
            "force_new_cluster={force_new_cluster} already made this member a new cluster and is IGNORED now \
             (acting again could split the cluster). Remove it from the configuration; after one start without \
             it, setting it again will act again"
        );
    } else {
        begin(me, volume, store, &dir).await?;
        save_seed(store, &dir, bump_revision).await?;
    }
    if let Some(path) = seed::pending(&dir) {
        let seeded =
            store.seed(&path, volume.node_id(), me.clone()).await.map_err(io("seeding the volume failed"))?;
        seed::finish(&dir).map_err(io("removing the consumed seed failed"))?;
        if volume.meta().forced_new_cluster.as_ref().is_some_and(|m| !m.done) {
            volume.finish_force_new_cluster()?;
        }
        tracing::warn!(
            cluster_id = ?volume.cluster_id(), revision = seeded.header.revision, versions = seeded.records,
            leases = seeded.header.leases.len(),
            "this member is now the only voter of its cluster; the other ordinals join it as new members"
        );
    }
    Ok(())
}

/// Applies every entry of the log after the last applied one, committed or not as far as
/// this member knows: the state machine's own writes are flushed lazily and the committed
/// marker is only a hint, so the log is the durable record of what this member acknowledged.
/// An entry whose commit it never learned was a real client write whose outcome its client did
/// not see; applying it keeps every acknowledged write and adds at most such writes, which
/// linearizability allows. Returns how many entries were applied.
async fn apply_whole_log(store: &mut Store) -> Result<u64, RecoveryError> {
    use openraft::storage::RaftLogStorage;
    use openraft::storage::RaftStateMachine;
    use openraft::RaftLogReader;
    let state = store
        .log
        .get_log_state()
        .await
        .map_err(|e| RecoveryError::Io { what: "reading the log state", source: std::io::Error::other(e) })?;
    let (applied, _) = store.state_machine.applied_state().await.map_err(|e| RecoveryError::Io {
        what: "reading the applied state",
        source: std::io::Error::other(e),
    })?;
    let Some(last) = state.last_log_id else { return Ok(0) };
    let first = applied.map_or(0, |l| l.index + 1).max(state.last_purged_log_id.map_or(0, |l| l.index + 1));
    if first > last.index {
        return Ok(0);
    }
    let mut reader = store.log.get_log_reader().await;
    let mut n = 0;
    // In slices, so a long unapplied log is never all in memory at once.
    for start in (first..=last.index).step_by(REPLAY_SLICE as usize) {
        let end = (start + REPLAY_SLICE - 1).min(last.index);
        let entries = reader
            .try_get_log_entries(start..=end)
            .await
            .map_err(|e| RecoveryError::Io { what: "reading the log", source: std::io::Error::other(e) })?;
        n += entries.len() as u64;
        let entries = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
        store
            .state_machine
            .apply(entries)
            .await
            .map_err(|e| RecoveryError::Io { what: "applying the log", source: std::io::Error::other(e) })?;
    }
    Ok(n)
}

/// Steps 1 and 2 of the recovery (see the module docs): refuse an empty volume, then move it
/// to a new cluster id with the record that a recovery is under way. Written before any seed
/// exists, so a seed is only ever consumed by a volume that already left its old cluster.
async fn begin(me: &Member, volume: &mut Volume, store: &mut Store, dir: &Path) -> Result<(), RecoveryError> {
    apply_whole_log(store).await?;
    if store.reader.applied().last_applied.is_none() {
        return Err(RecoveryError::EmptyVolume { name: me.name.clone(), dir: dir.display().to_string() });
    }
    let old = volume.cluster_id();
    let new = ClusterId::random();
    volume.begin_force_new_cluster(new)?;
    tracing::error!(
        member = %me.name, from_cluster = ?old, cluster_id = %new,
        "FORCE NEW CLUSTER: this member leaves cluster {old:?} and becomes cluster {new} of one voter with its \
         data. Members of the old cluster are refused from now on; the other ordinals must start with empty \
         volumes to join. Remove force_new_cluster from the configuration once the cluster has its members back"
    );
    Ok(())
}

/// Step 3: applies the whole log and places a backup of the result as the volume's pending
/// seed (unless one is already placed), its revisions bumped by `bump_revision` (see
/// `seed::restored_header`: a survivor may lack writes the lost majority acknowledged, whose
/// revision numbers must not be handed out again). Repeatable: until the seed is consumed the store holds
/// this member's own data, and after it, the seeded data, whose backup seeds the same state.
async fn save_seed(store: &mut Store, dir: &Path, bump_revision: u64) -> Result<(), RecoveryError> {
    if seed::pending(dir).is_some() {
        return Ok(());
    }
    let replayed = apply_whole_log(store).await?;
    let reader = store.reader.clone();
    let (header, backup, bytes) = tokio::task::spawn_blocking(move || reader.write_backup())
        .await
        .map_err(|e| RecoveryError::Io { what: "backing up the state", source: std::io::Error::other(e) })?
        .map_err(io("backing up the state failed"))?;
    if let Err(e) = seed::adopt(&backup, dir, bump_revision) {
        let _ = std::fs::remove_file(&backup);
        return Err(RecoveryError::Io { what: "placing the seed failed", source: e });
    }
    tracing::warn!(
        revision = header.revision, bytes, replayed, last_applied = ?store.reader.applied().last_applied,
        "force_new_cluster: applied this member's whole log and saved its state as the new cluster's seed"
    );
    Ok(())
}
