//! The receiving side of peer traffic: the `Raft` gRPC service on the peer port.
//!
//! Every Raft message is checked before openraft sees it:
//!
//! * `to` must be this member's node id: after a replacement the new incarnation answers at
//!   the old address, and must never act on messages meant for the one it replaced.
//! * the cluster id must be ours. A member with no cluster id yet (fresh volume) adopts the
//!   cluster of the first message addressed to its own, randomly minted, node id: only a
//!   cluster that probed this very member can know that id.
//! * with TLS, the sender must be the member its certificate names: a certificate lets a
//!   member speak for itself only (the peer port already refused certificates naming no
//!   member of this set);
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
use kvset_storage::LogId;
use kvset_storage::Member;
use kvset_storage::SnapshotFile;
use kvset_storage::TypeConfig;
use kvset_storage::Vote;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use openraft::ServerState;
use openraft::Snapshot;
use tonic::metadata::MetadataValue;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::member::Phase;
use crate::network::SnapshotChunk;
use crate::network::SnapshotChunkReply;

/// The peer gRPC service.
#[derive(Debug, Clone)]
pub struct PeerService {
    member: Arc<LocalMember>,
    /// The snapshot being received, checked as it arrives (see `install_snapshot`).
    receiving: Arc<tokio::sync::Mutex<Option<Receiving>>>,
}

/// A snapshot transfer in progress: the file it is written to, and the CRC-32 of its bytes so
/// far except the last four, which are the file's own checksum of everything before them
/// (`kvset_storage::snapshot`).
#[derive(Debug)]
struct Receiving {
    transfer: u64,
    file: SnapshotFile,
    next_offset: u64,
    crc: crc32fast::Hasher,
    tail: Vec<u8>,
}

impl Receiving {
    fn new(transfer: u64, file: SnapshotFile) -> Self {
        Self { transfer, file, next_offset: 0, crc: crc32fast::Hasher::new(), tail: Vec::with_capacity(4) }
    }

    /// Appends the next chunk to the file and to the running checksum.
    async fn take(&mut self, data: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.write_all(data).await?;
        self.next_offset += data.len() as u64;
        self.tail.extend_from_slice(data);
        let keep = self.tail.len().saturating_sub(4);
        self.crc.update(&self.tail[..keep]);
        self.tail.drain(..keep);
        Ok(())
    }

    /// Whether the whole file's trailing checksum matches its bytes.
    fn intact(&self) -> bool {
        self.tail.len() == 4 && self.tail[..] == self.crc.clone().finalize().to_le_bytes()[..]
    }

    /// Drops the transfer and its file.
    fn discard(self) {
        let path = self.file.path().to_path_buf();
        drop(self.file);
        let _ = std::fs::remove_file(path);
    }
}

/// Decodes a (pre-)vote request. A member of the previous release (openraft 0.9) sends one
/// without the trailing `leadership_transfer` flag, which postcard cannot default: that form is
/// read as a plain vote, so a rolling upgrade keeps elections working across versions.
fn decode_vote(bytes: &[u8]) -> Result<VoteRequest<TypeConfig>, KvError> {
    match codec::decode::<VoteRequest<TypeConfig>>("vote", bytes) {
        Ok(rpc) => Ok(rpc),
        Err(e) => match codec::decode::<(Vote, Option<LogId>)>("vote", bytes) {
            Ok((vote, last_log_id)) => Ok(VoteRequest::new(vote, last_log_id)),
            Err(_) => Err(KvError::InvalidArgument(e.to_string())),
        },
    }
}

/// AppendEntries requests of one `StreamAppend` call received but not yet taken by openraft.
const STREAM_APPEND_QUEUE: usize = 64;

/// How long a join forwarded to the leader may take.
const JOIN_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl PeerService {
    /// A service for `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self { member, receiving: Arc::default() }
    }

    /// Takes one chunk of a snapshot transfer; on the last one, checks the whole file and has
    /// openraft install it. A damaged file never reaches openraft (whose install would stop
    /// the member): it is refused, and the leader sends the snapshot again.
    async fn receive_chunk(&self, chunk: SnapshotChunk) -> SnapshotChunkReply {
        let mut slot = self.receiving.lock().await;
        if chunk.offset == 0 {
            if let Some(old) = slot.take() {
                old.discard();
            }
            let dir = kvset_storage::snapshot_dir(&self.member.config().data_dir);
            let file = SnapshotFile::create_receiving(&dir)
                .await
                .map_err(|e| format!("cannot create a file for the snapshot in {}: {e}", dir.display()))?;
            *slot = Some(Receiving::new(chunk.transfer, file));
        }
        let mut receiving = match slot.take() {
            Some(r) if r.transfer == chunk.transfer && r.next_offset == chunk.offset => r,
            other => {
                if let Some(stale) = other {
                    stale.discard();
                }
                return Err(format!(
                    "snapshot chunk at offset {} is not the one expected; start over",
                    chunk.offset
                ));
            }
        };
        if let Err(e) = receiving.take(&chunk.data).await {
            receiving.discard();
            return Err(format!("cannot write the snapshot: {e}"));
        }
        if !chunk.done {
            *slot = Some(receiving);
            return Ok(None);
        }
        if !receiving.intact() {
            receiving.discard();
            self.member
                .metrics()
                .snapshots
                .get_or_create(&crate::metrics::KindLabel { kind: "rejected" })
                .inc();
            tracing::warn!(
                last_log_id = ?chunk.meta.last_log_id,
                "a snapshot failed its checksum in transit; refused, the leader sends it again"
            );
            return Err("the snapshot failed its checksum in transit".into());
        }
        let path = receiving.file.path().to_path_buf();
        let snapshot = Snapshot { meta: chunk.meta, snapshot: receiving.file };
        let installed = self.member.raft().install_full_snapshot(chunk.vote, snapshot).await;
        // Installed, the file was renamed; refused (a stale leader), it is left over.
        let _ = std::fs::remove_file(&path);
        installed.map(Some).map_err(|fatal| format!("raft stopped: {fatal}"))
    }

    /// The ordinal the caller's TLS certificate proves (`None` without TLS).
    fn certified<T>(&self, request: &Request<T>) -> Option<u32> {
        request.extensions().get::<crate::tls::ConnInfo>().and_then(|c| c.member)
    }

    /// Refuses a message whose claimed sender is a member other than the one its TLS
    /// certificate names: a member's certificate lets it speak for itself only. A sender not
    /// in our membership (yet) is left to the other checks.
    fn check_sender(&self, certified: Option<u32>, from: u64) -> Result<(), KvError> {
        let Some(ordinal) = certified else { return Ok(()) };
        let proven = self.member.identity().sibling(ordinal);
        let Some(name) = self.member.member_name(from) else {
            // Raft messages come from members; a member with no membership yet (a new one)
            // cannot tell, and the other checks apply.
            if self.member.raft_metrics().membership_config.membership().nodes().next().is_none() {
                return Ok(());
            }
            tracing::warn!(from, certificate = %proven, "refusing a peer message from a node outside the membership");
            return Err(KvError::PermissionDenied(format!(
                "node {from} is not a member; the connection's certificate names {proven}"
            )));
        };
        if name == proven {
            return Ok(());
        }
        tracing::warn!(from, claimed = %name, certificate = %proven, "refusing a peer message: its certificate names another member");
        Err(KvError::PermissionDenied(format!(
            "the message claims to come from {name} (node {from}) but the connection's certificate names {proven}"
        )))
    }

    /// Refuses a message whose inner vote (the leader or candidate it speaks for) is another
    /// node's than its envelope's sender, when TLS tells who sent it.
    fn check_vote_sender(certified: Option<u32>, from: u64, vote: &Vote) -> Result<(), KvError> {
        let voter = vote.leader_id().node_id;
        if certified.is_some() && voter != from {
            tracing::warn!(from, voter, "refusing a peer message that speaks for another node");
            return Err(KvError::PermissionDenied(format!(
                "the message from node {from} carries the vote of node {voter}"
            )));
        }
        Ok(())
    }

    /// Refuses a Raft message meant for another node id or another cluster, or sent by a
    /// member other than the one its certificate names (see the module docs); a member with no
    /// cluster yet adopts the sender's.
    async fn check(&self, req: &pb::RaftRequest, certified: Option<u32>) -> Result<(), KvError> {
        let s = &self.member;
        self.check_sender(certified, req.from)?;
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

    /// [`Self::check`], and refuses a (pre-)vote request from a node outside our membership.
    async fn check_voter(&self, req: &pb::RaftRequest, certified: Option<u32>) -> Result<(), KvError> {
        self.check(req, certified).await?;
        let known = {
            let metrics = self.member.raft_metrics();
            let membership = metrics.membership_config.membership();
            membership.nodes().next().is_none() || membership.get_node(&req.from).is_some()
        };
        if !known {
            tracing::warn!(
                from = req.from,
                "refusing a vote request from node {} which is not a member (removed or replaced)",
                req.from
            );
            return Err(KvError::FailedPrecondition(format!(
                "node {} is not a member of this cluster",
                req.from
            )));
        }
        Ok(())
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

    /// Admits a joiner (on the leader) or passes the join on to the leader. The outer error is
    /// this member's refusal; the inner result is the answer, which for a join passed on is the
    /// leader's reply or its status unchanged (a joiner reads it as if it came from here).
    async fn join_inner(
        &self,
        forwarded: bool,
        req: pb::JoinRequest,
    ) -> Result<Result<pb::JoinReply, Status>, KvError> {
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
            let (name, addr) = m
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| (n.name.clone(), n.peer_addr.clone()))
                .ok_or_else(|| KvError::Unavailable("the leader's address is unknown".into()))?;
            let channel =
                s.channels().get(&name, &addr).map_err(|e| KvError::Unavailable(format!("leader {e}")))?;
            let mut forward = Request::new(req);
            forward.metadata_mut().insert(metadata::FORWARDED, MetadataValue::from_static("true"));
            forward.set_timeout(JOIN_FORWARD_TIMEOUT);
            return Ok(RaftClient::new(channel).join(forward).await.map(Response::into_inner));
        }
        if m.membership_config.membership().get_node(&req.node_id).is_some() {
            return Ok(Ok(pb::JoinReply { leader_id: s.node_id(), already_member: true }));
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
        Ok(Ok(pb::JoinReply { leader_id: s.node_id(), already_member: false }))
    }
}

/// The answers of one `StreamAppend` call.
type AppendStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftReply, Status>> + Send>>;

#[tonic::async_trait]
impl pb::raft_server::Raft for PeerService {
    type StreamAppendStream = AppendStream;

    /// Pipelined replication: every request is checked like a unary one and handed to openraft
    /// in order; openraft answers each in order. The first message that fails a check ends the
    /// stream with that check's status, after the answers to the ones before it.
    async fn stream_append(
        &self,
        request: Request<tonic::Streaming<pb::RaftRequest>>,
    ) -> Result<Response<AppendStream>, Status> {
        use futures::StreamExt;
        // The stream lasts as long as the leader's replication session, so it must end when
        // this member stops: it holds openraft's handle, and with it the volume's database,
        // which an in-process restart (defragmentation) must be able to open again.
        let stopping = || {
            let mut phase = self.member.subscribe_phase();
            async move {
                let _ = phase.wait_for(|p| matches!(p, Phase::ShuttingDown | Phase::Stopped)).await;
            }
        };
        let certified = self.certified(&request);
        let mut incoming = Box::pin(request.into_inner().take_until(stopping()));
        let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::channel::<AppendEntriesRequest<TypeConfig>>(STREAM_APPEND_QUEUE);
        {
            let (this, refused) = (self.clone(), refused.clone());
            tokio::spawn(async move {
                loop {
                    // Ends when the leader ends the stream, or once openraft dropped the answers.
                    let msg = tokio::select! {
                        msg = incoming.next() => msg,
                        _ = tx.closed() => None,
                    };
                    let Some(msg) = msg else { return };
                    let checked = match msg {
                        Ok(req) => match this.check(&req, certified).await {
                            Ok(()) => Self::decode::<AppendEntriesRequest<TypeConfig>>(
                                "append entries",
                                &req.payload,
                            )
                            .and_then(|rpc| {
                                Self::check_vote_sender(certified, req.from, &rpc.vote).map(|_| rpc)
                            })
                            .map_err(Status::from),
                            Err(e) => Err(Status::from(e)),
                        },
                        Err(status) => Err(status),
                    };
                    match checked {
                        Ok(rpc) => {
                            if tx.send(rpc).await.is_err() {
                                return;
                            }
                        }
                        Err(status) => {
                            *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                            return;
                        }
                    }
                }
            });
        }
        let answers = self.member.raft().stream_append(tokio_stream::wrappers::ReceiverStream::new(rx));
        let answers = Box::pin(answers)
            .take_until(stopping())
            .map(|answer| match answer {
                Ok(result) => codec::encode("stream append result", &result)
                    .map(|payload| pb::RaftReply { payload })
                    .map_err(|e| Status::internal(e.to_string())),
                Err(fatal) => Err(Status::unavailable(format!("raft stopped: {fatal}"))),
            })
            .chain(
                futures::stream::once(
                    async move { refused.lock().unwrap_or_else(|e| e.into_inner()).take() },
                )
                .filter_map(|refusal| async move { refusal.map(Err) }),
            );
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let certified = self.certified(&request);
        let req = request.into_inner();
        self.check(&req, certified).await?;
        let rpc: AppendEntriesRequest<TypeConfig> = Self::decode("append entries", &req.payload)?;
        Self::check_vote_sender(certified, req.from, &rpc.vote)?;
        Ok(Self::reply(&self.member.raft().append_entries(rpc).await)?)
    }

    async fn vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let certified = self.certified(&request);
        let req = request.into_inner();
        self.check_voter(&req, certified).await?;
        let rpc = decode_vote(&req.payload)?;
        Self::check_vote_sender(certified, req.from, &rpc.vote)?;
        Ok(Self::reply(&self.member.raft().vote(rpc).await)?)
    }

    async fn pre_vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let certified = self.certified(&request);
        let req = request.into_inner();
        self.check_voter(&req, certified).await?;
        let rpc = decode_vote(&req.payload)?;
        Self::check_vote_sender(certified, req.from, &rpc.vote)?;
        Ok(Self::reply(&self.member.raft().pre_vote(rpc).await)?)
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let certified = self.certified(&request);
        let req = request.into_inner();
        self.check(&req, certified).await?;
        let rpc: TransferLeaderRequest<TypeConfig> = Self::decode("transfer leader", &req.payload)?;
        Self::check_vote_sender(certified, req.from, rpc.from_leader())?;
        if *rpc.to_node_id() == self.member.node_id() {
            // The new leader must hold all of the old one's log, or it ignores the handover.
            // The last entries may still be on their way (the handover and the replication
            // travel separately): wait for them briefly.
            let needed = rpc.last_log_id().map_or(0, |l| l.index);
            let wait =
                std::time::Duration::from_millis(self.member.config().raft.election_timeout_min_ms / 2);
            let mut rx = self.member.raft().metrics();
            let _ = tokio::time::timeout(
                wait,
                crate::member::metrics_until(&mut rx, |m| m.last_log_index.unwrap_or(0) >= needed),
            )
            .await;
        }
        let reply = self.member.raft().handle_transfer_leader(rpc).await;
        let reply: Result<_, openraft::error::RaftError<TypeConfig>> =
            reply.map_err(openraft::error::RaftError::Fatal);
        Ok(Self::reply(&reply)?)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let certified = self.certified(&request);
        let req = request.into_inner();
        self.check(&req, certified).await?;
        let chunk: SnapshotChunk = Self::decode("snapshot chunk", &req.payload)?;
        Self::check_vote_sender(certified, req.from, &chunk.vote)?;
        Ok(Self::reply(&self.receive_chunk(chunk).await)?)
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

    /// Runs a command another member received, answering its result or this member's error as
    /// data (see `ProposeReply.error`).
    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let ctx = CallContext::of(&request).forwarded();
        let req = request.into_inner();
        let outcome = async {
            self.check_cluster(&req.cluster_id)?;
            let command: kvset_storage::Command = Self::decode("command", &req.command)?;
            let result = self.member.execute(command, &ctx).await?;
            let applied_index = self.member.reader().applied().last_applied.map_or(0, |id| id.index);
            let result =
                codec::encode("command result", &result).map_err(|e| KvError::Internal(e.to_string()))?;
            Ok::<_, KvError>(pb::ProposeReply { result, applied_index, error: Vec::new() })
        };
        Ok(Response::new(
            outcome.await.unwrap_or_else(|e| pb::ProposeReply { error: e.to_wire(), ..Default::default() }),
        ))
    }

    /// Answers a query another member received (checked again here, with the caller it names,
    /// against this member's own users, roles and lease keys), or this member's error as data.
    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let mut ctx = CallContext::of(&request).forwarded();
        let req = request.into_inner();
        ctx.user = (!req.user.is_empty()).then(|| req.user.clone());
        let outcome = async {
            self.check_cluster(&req.cluster_id)?;
            let query: crate::query::Query = Self::decode("query", &req.query)?;
            let answer = self.member.read(query, crate::query::Consistency::Linearizable, &ctx).await?;
            let answer = codec::encode("answer", &answer).map_err(|e| KvError::Internal(e.to_string()))?;
            Ok::<_, KvError>(pb::ReadReply { answer, error: Vec::new() })
        };
        Ok(Response::new(
            outcome.await.unwrap_or_else(|e| pb::ReadReply { error: e.to_wire(), ..Default::default() }),
        ))
    }

    /// Runs a cluster administration call another member received (checked again here, with
    /// the caller it names), answering its result or this member's error as data.
    async fn admin(&self, request: Request<pb::AdminRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let mut ctx = CallContext::of(&request).forwarded();
        let req = request.into_inner();
        ctx.user = (!req.user.is_empty()).then(|| req.user.clone());
        let outcome = async {
            self.check_cluster(&req.cluster_id)?;
            let call =
                req.call.ok_or_else(|| KvError::InvalidArgument("the admin request names no call".into()))?;
            self.member.administer(call, &ctx).await
        };
        Ok(Response::new(match outcome.await {
            Ok(result) => pb::AdminReply { result: Some(result), error: Vec::new() },
            Err(e) => pb::AdminReply { result: None, error: e.to_wire() },
        }))
    }

    /// Renews a lease for another member, answering its TTL or this member's error as data.
    async fn lease_renew(
        &self,
        request: Request<pb::LeaseRenewRequest>,
    ) -> Result<Response<pb::LeaseRenewReply>, Status> {
        let deadline = CallContext::of(&request).deadline;
        let req = request.into_inner();
        let outcome = async {
            self.check_cluster(&req.cluster_id)?;
            self.member.renew_lease_here(req.id, deadline).await
        };
        Ok(Response::new(match outcome.await {
            Ok(ttl_seconds) => pb::LeaseRenewReply { ttl_seconds, error: Vec::new() },
            Err(e) => pb::LeaseRenewReply { ttl_seconds: 0, error: e.to_wire() },
        }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let forwarded = request.metadata().get(metadata::FORWARDED).is_some();
        // A member joins as itself: the first hop checks the joiner's certificate (a forwarded
        // join arrives over the forwarding member's connection).
        let claimed = request.get_ref();
        if claimed.name != self.member.identity().sibling(claimed.ordinal) {
            return Err(KvError::InvalidArgument(format!(
                "the join names {} but ordinal {}",
                claimed.name, claimed.ordinal
            ))
            .into());
        }
        if let (Some(ordinal), true) = (self.certified(&request), forwarded) {
            // Only a current member forwards joins.
            if !self.member.is_current_ordinal(ordinal) {
                return Err(KvError::PermissionDenied(format!(
                    "a forwarded join from {}, which is not a member",
                    self.member.identity().sibling(ordinal)
                ))
                .into());
            }
        }
        if let (Some(ordinal), false) = (self.certified(&request), forwarded) {
            if request.get_ref().ordinal != ordinal {
                let claimed = request.get_ref().name.clone();
                tracing::warn!(%claimed, certificate = ordinal, "refusing a join: its certificate names another member");
                return Err(KvError::PermissionDenied(format!(
                    "the join claims to come from {claimed} but the connection's certificate names {}",
                    self.member.identity().sibling(ordinal)
                ))
                .into());
            }
        }
        self.join_inner(forwarded, request.into_inner()).await?.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use kvset_storage::SnapshotFile;

    use super::Receiving;

    fn file(payload: &[u8]) -> Vec<u8> {
        let mut f = payload.to_vec();
        f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        f
    }

    async fn receive(dir: &std::path::Path, f: &[u8], chunk: usize) -> bool {
        let mut r = Receiving::new(1, SnapshotFile::create_receiving(dir).await.unwrap());
        for c in f.chunks(chunk) {
            r.take(c).await.unwrap();
        }
        assert_eq!(r.next_offset, f.len() as u64);
        let intact = r.intact();
        r.discard();
        intact
    }

    #[tokio::test]
    async fn the_trailing_checksum_is_checked_across_any_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&(0..1000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>());
        for chunk in [1, 3, 4, 5, 7, 1000, 4003, 4004, 10_000] {
            assert!(receive(dir.path(), &f, chunk).await, "chunk {chunk}");
        }
        for i in [0, 500, f.len() - 5, f.len() - 1] {
            let mut bad = f.clone();
            bad[i] ^= 0x10;
            for chunk in [1, 7, 4004] {
                assert!(!receive(dir.path(), &bad, chunk).await, "flip at {i}, chunk {chunk}");
            }
        }
        let empty = Receiving::new(1, SnapshotFile::create_receiving(dir.path()).await.unwrap());
        assert!(!empty.intact(), "an empty transfer is not intact");
        empty.discard();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "discarded transfers leave no file");
    }
}
