//! A single-member Raft over the sled store, for tests that need openraft to drive the storage
//! exactly as a real member does (appends with flush callbacks, applies, snapshots, purges).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kvset_storage::Batch;
use kvset_storage::Command;
use kvset_storage::Member;
use kvset_storage::Put;
use kvset_storage::SmReader;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::TypeConfig;
use openraft::error::InstallSnapshotError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetwork;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::Raft;

/// A network with no peers: a single member never sends anything.
pub struct NoNetwork;

fn unreachable<E: std::error::Error>() -> RPCError<u64, Member, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("single-member test cluster")))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &Member) -> Self::Network {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>>
    {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        Err(unreachable())
    }
}

/// Node id of the single member.
pub const NODE_ID: u64 = 1;

/// Starts a single-member Raft on the store in `dir`, initialising it if new, and waits until
/// it is leader. `snapshot_every` is the snapshot policy (entries since the last snapshot).
pub async fn start_single(dir: &Path, snapshot_every: u64) -> (Raft<TypeConfig>, SmReader) {
    let store = Store::open_dir(dir, StoreOptions::default()).expect("open store");
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    }
    .validate()
    .expect("valid config");
    let reader = store.reader.clone();
    let raft =
        Raft::new(NODE_ID, config.into(), NoNetwork, store.log, store.state_machine).await.expect("raft");
    let mut members = BTreeMap::new();
    members.insert(NODE_ID, Member::default());
    // Already initialised on a reused volume: that is fine.
    let _ = raft.initialize(members).await;
    raft.wait(Some(Duration::from_secs(30)))
        .state(openraft::ServerState::Leader, "single member becomes leader")
        .await
        .expect("leader");
    (raft, reader)
}

/// A put command.
pub fn put(key: &str, value: &[u8]) -> Batch {
    Batch { commands: vec![Command::Put(Put::new(key, value.to_vec()))] }
}
