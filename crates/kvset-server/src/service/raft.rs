//! The receiving side of peer traffic: the `Raft` gRPC service on the peer port.
//!
//! Every Raft message is checked before openraft sees it:
//!
//! * `to` must be this member's node id: after a replacement the new incarnation answers at
//!   the old address, and must never act on messages meant for the one it replaced.
//! * the cluster id must be ours. A member with no cluster id yet (fresh volume) adopts the
//!   cluster of the first message addressed to its own, randomly minted, node id: only a
//!   cluster that probed this very member can know that id.
//! * a vote request from a node outside our membership is refused: a removed or replaced
//!   member must not disrupt the cluster with ever higher terms (the classic removed-server
//!   problem, Raft §6).
//!
//! `Probe` answers who we are and what our volume holds (bootstrap rule, joins, catch-up
//! checks); `Join` adds the caller as a learner on the leader (forwarded there if need be).

use std::sync::Arc;

use kvset_proto::metadata;
use kvset_proto::v1 as pb;
use kvset_proto::v1::raft_client::RaftClient;
use kvset_storage::codec;
use kvset_storage::ClusterId;
use kvset_storage::Member;
use kvset_storage::TypeConfig;
use openraft::error::InstallSnapshotError;
use openraft::error::RaftError;
use openraft::error::SnapshotMismatch;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::ServerState;
use openraft::SnapshotSegmentId;
use tonic::metadata::MetadataValue;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::member::LocalMember;

/// The peer gRPC service.
#[derive(Debug, Clone)]
pub struct PeerService {
    member: Arc<LocalMember>,
    /// The snapshot being received, checked chunk by chunk (see `install_snapshot`).
    receiving: Arc<std::sync::Mutex<Transfers>>,
}

/// Snapshot transfers refused for a damaged checksum before one is let through to openraft's
/// own check (which stops the member): a leader whose snapshot file itself is damaged must not
/// resend it forever.
const SNAPSHOT_REJECTIONS_MAX: u32 = 5;

/// The snapshot transfer being followed, and how often transfers of that snapshot were refused.
#[derive(Debug, Default)]
struct Transfers {
    current: Option<Receiving>,
    rejected: Option<(String, u32)>,
}

/// A snapshot transfer in progress: the CRC-32 of its bytes so far, except the last four,
/// which are the file's own checksum of everything before them (`kvset_storage::snapshot`).
#[derive(Debug, Clone)]
struct Receiving {
    id: String,
    next_offset: u64,
    crc: crc32fast::Hasher,
    tail: Vec<u8>,
    /// The state before the last chunk, so that a resent last chunk is taken again.
    before_last: Option<(u64, crc32fast::Hasher, Vec<u8>)>,
}

impl Receiving {
    fn new(id: String) -> Self {
        Self {
            id,
            next_offset: 0,
            crc: crc32fast::Hasher::new(),
            tail: Vec::with_capacity(4),
            before_last: None,
        }
    }

    /// Takes the chunk at `offset`: the next one, or the last one again (a resend). Returns
    /// false for any other offset.
    fn feed(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset != self.next_offset {
            match self.before_last.clone() {
                Some((last_offset, crc, tail)) if last_offset == offset => {
                    (self.next_offset, self.crc, self.tail) = (last_offset, crc, tail);
                }
                _ => return false,
            }
        }
        self.before_last = Some((self.next_offset, self.crc.clone(), self.tail.clone()));
        self.next_offset += data.len() as u64;
        self.tail.extend_from_slice(data);
        let keep = self.tail.len().saturating_sub(4);
        self.crc.update(&self.tail[..keep]);
        self.tail.drain(..keep);
        true
    }

    /// Whether the whole file's trailing checksum matches its bytes.
    fn intact(self) -> bool {
        self.tail.len() == 4 && self.tail[..] == self.crc.finalize().to_le_bytes()[..]
    }
}

/// How long a join forwarded to the leader may take.
const JOIN_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl PeerService {
    /// A service for `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self { member, receiving: Arc::default() }
    }

    /// Follows a snapshot transfer chunk by chunk and, on its last chunk, whether the file's
    /// checksum holds. Chunks that cannot be followed (a transfer that started before this
    /// member did, an offset out of order) are let through: openraft deals with those. After
    /// [`SNAPSHOT_REJECTIONS_MAX`] refusals of one snapshot, it is let through as well.
    fn arrived_intact(&self, rpc: &InstallSnapshotRequest<TypeConfig>) -> bool {
        let mut transfers = self.receiving.lock().unwrap_or_else(|e| e.into_inner());
        let id = &rpc.meta.snapshot_id;
        if rpc.offset == 0 {
            transfers.current = Some(Receiving::new(id.clone()));
        }
        let followed = match transfers.current.as_mut() {
            Some(r) if r.id == *id => r.feed(rpc.offset, &rpc.data),
            _ => false,
        };
        if !followed {
            transfers.current = None;
            return true;
        }
        if !rpc.done {
            return true;
        }
        let intact = transfers.current.take().is_none_or(Receiving::intact);
        if intact {
            return true;
        }
        let refusals = match transfers.rejected.as_mut() {
            Some((rejected_id, n)) if rejected_id == id => {
                *n += 1;
                *n
            }
            _ => {
                transfers.rejected = Some((id.clone(), 1));
                1
            }
        };
        if refusals > SNAPSHOT_REJECTIONS_MAX {
            tracing::error!(
                snapshot_id = %id, refusals,
                "snapshot failed its checksum on every transfer; letting openraft's install refuse it"
            );
            return true;
        }
        false
    }

    /// Refuses a Raft message meant for another node id or another cluster (see the module
    /// docs); a member with no cluster yet adopts the sender's.
    async fn check(&self, req: &pb::RaftRequest) -> Result<(), KvError> {
        let s = &self.member;
        if req.to != s.node_id() {
            return Err(KvError::FailedPrecondition(format!(
                "message for node {} reached node {} ({}): the member at this address was replaced",
                req.to,
                s.node_id(),
                s.identity().name
            )));
        }
        let theirs: ClusterId = req
            .cluster_id
            .parse()
            .map_err(|_| KvError::FailedPrecondition(format!("bad cluster id {:?}", req.cluster_id)))?;
        match s.cluster_id() {
            Some(mine) if mine == theirs => Ok(()),
            Some(mine) => Err(KvError::FailedPrecondition(format!(
                "cluster id mismatch: member {} belongs to cluster {mine}, the message comes from cluster {theirs}",
                s.identity().name
            ))),
            None => {
                tracing::info!(cluster_id = %theirs, from = req.from, "adopting the cluster id of the first message addressed to us");
                s.adopt_cluster(theirs).await.map_err(|e| KvError::FailedPrecondition(e.to_string()))
            }
        }
    }

    /// Refuses a request that another cluster's member sent.
    fn check_cluster(&self, theirs: &str) -> Result<(), KvError> {
        let mine = self.member.cluster().to_wire();
        if mine.is_empty() || theirs != mine {
            return Err(KvError::FailedPrecondition(format!(
                "cluster id mismatch: this is cluster {mine:?}, the request comes from cluster {theirs:?}"
            )));
        }
        Ok(())
    }

    fn reply<T: serde::Serialize>(value: &T) -> Result<Response<pb::RaftReply>, KvError> {
        let payload = codec::encode("raft reply", value).map_err(|e| KvError::Internal(e.to_string()))?;
        Ok(Response::new(pb::RaftReply { payload }))
    }

    fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, KvError> {
        codec::decode(what, bytes).map_err(|e| KvError::InvalidArgument(e.to_string()))
    }

    async fn join_inner(&self, forwarded: bool, req: pb::JoinRequest) -> Result<pb::JoinReply, KvError> {
        let s = &self.member;
        let mine =
            s.cluster_id().ok_or_else(|| KvError::Unavailable("this member has no cluster yet".into()))?;
        if req.cluster_id != mine.to_string() {
            return Err(KvError::FailedPrecondition(format!(
                "cluster id mismatch: this is cluster {mine}, the join asks for {:?}",
                req.cluster_id
            )));
        }
        if req.node_id == 0 {
            return Err(KvError::InvalidArgument("node id 0 is reserved".into()));
        }
        let m = s.raft_metrics();
        if m.state != ServerState::Leader {
            let Some(leader) = m.current_leader else {
                return Err(KvError::NoLeader {
                    leader_id: None,
                    leader_addr: None,
                    reason: "no leader is known right now".into(),
                });
            };
            if forwarded {
                return Err(KvError::NoLeader {
                    leader_id: Some(leader),
                    leader_addr: None,
                    reason: "forwarded join reached a member that is not the leader".into(),
                });
            }
            let addr = m
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.peer_addr.clone())
                .ok_or_else(|| KvError::Unavailable("the leader's address is unknown".into()))?;
            let channel = s.channels().get(&addr).map_err(|e| KvError::Unavailable(format!("leader {e}")))?;
            let mut forward = Request::new(req);
            forward.metadata_mut().insert(metadata::FORWARDED, MetadataValue::from_static("true"));
            forward.set_timeout(JOIN_FORWARD_TIMEOUT);
            return RaftClient::new(channel)
                .join(forward)
                .await
                .map(Response::into_inner)
                .map_err(KvError::Remote);
        }
        if m.membership_config.membership().get_node(&req.node_id).is_some() {
            return Ok(pb::JoinReply { leader_id: s.node_id(), already_member: true });
        }
        if req.last_log_index > 0 {
            let why = format!(
                "node {} ({}) holds Raft log up to index {} but is not a member of cluster {mine}: it was \
                 removed or replaced and cannot rejoin under this id; delete its volume to rejoin as a new member",
                req.node_id, req.name, req.last_log_index
            );
            tracing::warn!("refusing a join: {why}");
            return Err(KvError::FailedPrecondition(why));
        }
        let member = Member {
            ordinal: req.ordinal,
            name: req.name,
            peer_addr: req.peer_addr,
            client_addr: req.client_addr,
        };
        tracing::info!(node_id = req.node_id, member = %member, "adding a joining member as learner");
        s.raft().add_learner(req.node_id, member, false).await.map_err(|e| errors::membership_change(&e))?;
        Ok(pb::JoinReply { leader_id: s.node_id(), already_member: false })
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for PeerService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let req = request.into_inner();
        self.check(&req).await?;
        let rpc: AppendEntriesRequest<TypeConfig> = Self::decode("append entries", &req.payload)?;
        Ok(Self::reply(&self.member.raft().append_entries(rpc).await)?)
    }

    async fn vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let req = request.into_inner();
        self.check(&req).await?;
        let membership = self.member.raft().metrics().borrow().membership_config.clone();
        let membership = membership.membership();
        if membership.nodes().next().is_some() && membership.get_node(&req.from).is_none() {
            tracing::warn!(
                from = req.from,
                "refusing a vote request from node {} which is not a member (removed or replaced)",
                req.from
            );
            return Err(KvError::FailedPrecondition(format!(
                "node {} is not a member of this cluster",
                req.from
            ))
            .into());
        }
        let rpc: VoteRequest<u64> = Self::decode("vote", &req.payload)?;
        Ok(Self::reply(&self.member.raft().vote(rpc).await)?)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let req = request.into_inner();
        self.check(&req).await?;
        let rpc: InstallSnapshotRequest<TypeConfig> = Self::decode("install snapshot", &req.payload)?;
        if !self.arrived_intact(&rpc) {
            // Handing it to openraft would fail its install, which openraft treats as fatal
            // and stops the member. Refused, the leader sends the snapshot again.
            self.member
                .metrics()
                .snapshots
                .get_or_create(&crate::metrics::KindLabel { kind: "rejected" })
                .inc();
            tracing::warn!(
                from = req.from, snapshot_id = %rpc.meta.snapshot_id,
                "a snapshot failed its checksum in transit; refused, the leader sends it again"
            );
            // A mismatch makes the leader start the transfer over at offset 0.
            let mismatch = SnapshotMismatch {
                expect: SnapshotSegmentId { id: rpc.meta.snapshot_id.clone(), offset: 0 },
                got: SnapshotSegmentId { id: rpc.meta.snapshot_id.clone(), offset: rpc.offset },
            };
            let refused: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> =
                Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)));
            return Ok(Self::reply(&refused)?);
        }
        Ok(Self::reply(&self.member.raft().install_snapshot(rpc).await)?)
    }

    async fn probe(&self, _request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeReply>, Status> {
        let s = &self.member;
        let m = s.raft_metrics();
        let membership = m.membership_config.membership();
        let initialized = membership.nodes().next().is_some();
        let cluster_id = s.cluster_id();
        let (leader_id, leader_peer_addr) = match m.current_leader {
            Some(id) => (id, membership.get_node(&id).map(|n| n.peer_addr.clone()).unwrap_or_default()),
            None => (0, String::new()),
        };
        Ok(Response::new(pb::ProbeReply {
            cluster_id: cluster_id.map(|c| c.to_string()).unwrap_or_default(),
            node_id: s.node_id(),
            ordinal: s.identity().ordinal,
            empty: cluster_id.is_none() && !initialized && m.last_log_index.is_none(),
            member: membership.get_node(&s.node_id()).is_some(),
            leader_id,
            leader_peer_addr,
            voters: membership.voter_ids().collect(),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            name: s.identity().name.clone(),
        }))
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let ctx = CallContext::of(&request).forwarded();
        let req = request.into_inner();
        self.check_cluster(&req.cluster_id)?;
        let command: kvset_storage::Command = Self::decode("command", &req.command)?;
        let result = self.member.execute(command, &ctx).await?;
        let applied_index = self.member.reader().applied().last_applied.map_or(0, |id| id.index);
        let result =
            codec::encode("command result", &result).map_err(|e| KvError::Internal(e.to_string()))?;
        Ok(Response::new(pb::ProposeReply { result, applied_index }))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let ctx = CallContext::of(&request).forwarded();
        let req = request.into_inner();
        self.check_cluster(&req.cluster_id)?;
        let query: crate::query::Query = Self::decode("query", &req.query)?;
        let answer = self.member.read(query, crate::query::Consistency::Linearizable, &ctx).await?;
        let answer = codec::encode("answer", &answer).map_err(|e| KvError::Internal(e.to_string()))?;
        Ok(Response::new(pb::ReadReply { answer }))
    }

    async fn lease_renew(
        &self,
        request: Request<pb::LeaseRenewRequest>,
    ) -> Result<Response<pb::LeaseRenewReply>, Status> {
        let req = request.into_inner();
        self.check_cluster(&req.cluster_id)?;
        let ttl = self.member.renew_lease_here(req.id)?;
        Ok(Response::new(pb::LeaseRenewReply { ttl_seconds: ttl }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let forwarded = request.metadata().get(metadata::FORWARDED).is_some();
        Ok(Response::new(self.join_inner(forwarded, request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::Receiving;

    fn file(payload: &[u8]) -> Vec<u8> {
        let mut f = payload.to_vec();
        f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        f
    }

    fn receive(f: &[u8], chunk: usize, resend_each: bool) -> bool {
        let mut r = Receiving::new("s".into());
        let mut offset = 0;
        for c in f.chunks(chunk) {
            assert!(r.feed(offset as u64, c));
            if resend_each {
                assert!(r.feed(offset as u64, c), "a resent last chunk is taken again");
            }
            offset += c.len();
        }
        r.intact()
    }

    #[test]
    fn the_trailing_checksum_is_checked_across_any_chunking_and_resends() {
        let f = file(&(0..1000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>());
        for chunk in [1, 3, 4, 5, 7, 1000, 4003, 4004, 10_000] {
            assert!(receive(&f, chunk, false), "chunk {chunk}");
            assert!(receive(&f, chunk, true), "chunk {chunk}, resent");
        }
        for i in [0, 500, f.len() - 5, f.len() - 1] {
            let mut bad = f.clone();
            bad[i] ^= 0x10;
            for chunk in [1, 7, 4004] {
                assert!(!receive(&bad, chunk, false), "flip at {i}, chunk {chunk}");
            }
        }
        let mut r = Receiving::new("s".into());
        assert!(r.feed(0, &f[..10]));
        assert!(!r.feed(20, &f[20..30]), "a gap is not followed");
        assert!(!Receiving::new("s".into()).intact(), "an empty transfer is not intact");
    }
}
