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
use kvset_storage::SnapshotFile;
use kvset_storage::StateMachine;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::TypeConfig;
use kvset_storage::Vote;
use openraft::error::RPCError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::OptionalSend;
use openraft::Raft;
use openraft::Snapshot;

/// The Raft of these tests.
pub type TestRaft = Raft<TypeConfig, StateMachine>;

/// A network with no peers: a single member never sends anything.
pub struct NoNetwork;

fn unreachable() -> Unreachable<TypeConfig> {
    Unreachable::new(&std::io::Error::other("single-member test cluster"))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &Member) -> Self::Network {
        NoNetwork
    }
}

impl RaftNetworkV2<TypeConfig> for NoNetwork {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot<kvset_storage::LeaderId, u64, Member, SnapshotFile>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(unreachable()))
    }
}

/// Node id of the single member.
pub const NODE_ID: u64 = 1;

/// Starts a single-member Raft on the store in `dir`, initialising it if new, and waits until
/// it is leader. `snapshot_every` is the snapshot policy (entries since the last snapshot).
pub async fn start_single(dir: &Path, snapshot_every: u64) -> (TestRaft, SmReader) {
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
