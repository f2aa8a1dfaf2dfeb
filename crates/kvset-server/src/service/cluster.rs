//! The `Cluster` gRPC service: status and membership administration.
//!
//! `Status`, `Snapshot`, `Backup` and `Defragment` act on the receiving member. Everything else
//! needs the leader and reaches it the way commands do, through its peer port
//! (`LocalMember::administer`). Membership normally manages itself (see `membership`); the
//! manual calls exist for disaster recovery and are refused when they would break the cluster
//! (removing the last voter, promoting an unknown node).

use std::sync::Arc;
use std::time::Duration;

use kvset_proto::v1 as pb;
use kvset_storage::WatchReceiver;
use openraft::ServerState;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::auth::Needs;
use crate::config::ReplicasSource;
use crate::errors;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::member::commit_index;
use crate::member::AdminCall;
use crate::member::AdminResult;
use crate::member::LocalMember;
use crate::member::Phase;
use crate::service::observe;

/// Largest replica count accepted (a consensus group beyond 9 voters only gets slower).
pub const MAX_REPLICAS: u32 = 9;

/// The cluster administration service.
#[derive(Debug, Clone)]
pub struct ClusterService {
    member: Arc<LocalMember>,
}

type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

/// Bytes per backup chunk.
const BACKUP_CHUNK: usize = 64 * 1024;

/// Sends the `total` bytes of a backup file in chunks; stops when the client goes away.
fn stream_backup(
    mut file: std::fs::File,
    total: u64,
    revision: i64,
    tx: &tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
) {
    use std::io::Read;
    let mut sent = 0u64;
    while sent < total {
        let mut data = vec![0u8; (total - sent).min(BACKUP_CHUNK as u64) as usize];
        if let Err(e) = file.read_exact(&mut data) {
            let _ = tx.blocking_send(Err(Status::internal(format!("kvset: reading the backup failed: {e}"))));
            return;
        }
        sent += data.len() as u64;
        if tx.blocking_send(Ok(pb::BackupChunk { data, total_bytes: total, revision })).is_err() {
            return; // the client went away
        }
    }
}

/// The Status of `member`.
pub fn status(member: &LocalMember) -> pb::StatusResponse {
    let m = member.raft_metrics();
    let applied = member.reader().applied();
    let stopping = member.defrag_flag().load(std::sync::atomic::Ordering::Acquire);
    let role = if stopping || matches!(member.phase(), Phase::ShuttingDown | Phase::Stopped) {
        pb::Role::Shutdown
    } else if m.membership_config.membership().get_node(&member.node_id()).is_none() {
        pb::Role::Joining
    } else {
        match m.state {
            ServerState::Leader => pb::Role::Leader,
            ServerState::Follower => pb::Role::Follower,
            ServerState::Candidate => pb::Role::Candidate,
            ServerState::Learner => pb::Role::Learner,
            ServerState::Shutdown => pb::Role::Shutdown,
        }
    };
    let (leader_id, leader_addr) = member.leader();
    pb::StatusResponse {
        cluster_id: member.cluster().to_wire(),
        node_id: member.node_id(),
        ordinal: member.identity().ordinal,
        name: member.identity().name.clone(),
        role: role as i32,
        term: m.current_term,
        leader_id: leader_id.unwrap_or(0),
        leader_addr: leader_addr.unwrap_or_default(),
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
        commit_index: commit_index(&m).unwrap_or(0),
        revision: applied.revision,
        desired_replicas: member.desired_replicas().0,
        reconciler: member.reconciler_status(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        // Measured by the metrics task every few seconds: a directory walk per Status call
        // would be blocking I/O on the request path.
        db_size_bytes: member.metrics().volume_bytes.get().max(0) as u64,
        state_digest: 0,
        state_keys: 0,
        alarms: member.alarms().iter().map(ToString::to_string).collect(),
        quota_bytes: member.config().quota_bytes,
        started_unix_ms: member.started_unix_ms(),
    }
}

impl ClusterService {
    /// The service of `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self { member }
    }

    /// Runs `call` on the leader (`LocalMember::administer`) and takes its answer apart with
    /// `pick`.
    async fn administer<T>(
        &self,
        ctx: &CallContext,
        call: AdminCall,
        pick: impl FnOnce(AdminResult) -> Option<T>,
    ) -> Result<T, KvError> {
        let result = self.member.administer(call, ctx).await?;
        pick(result).ok_or_else(|| KvError::Internal("the leader answered another call".into()))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let ctx = CallContext::of(&req);
        let digest = req.get_ref().digest;
        observe(self.member.metrics(), "Status", &ctx, async {
            let mut status = status(&self.member);
            if digest {
                // A digest reads every key: with access control on, an administrator's call
                // (as etcd's Hash); the status itself is not (probes and `kvset status`).
                self.member.authorize(&ctx, &crate::auth::Needs::admin(), "compute the state digest")?;
                let reader = self.member.reader().clone();
                let d = tokio::task::spawn_blocking(move || reader.digest())
                    .await
                    .map_err(|e| KvError::Internal(e.to_string()))?
                    .map_err(|e| KvError::Internal(e.to_string()))?;
                status.state_digest = d.crc;
                status.state_keys = d.keys;
            }
            Ok::<_, KvError>(status)
        })
        .await
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "MemberList", &ctx, async {
            self.administer(&ctx, AdminCall::MemberList(msg), |r| match r {
                AdminResult::MemberList(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn set_replicas(
        &self,
        req: Request<pb::SetReplicasRequest>,
    ) -> Result<Response<pb::SetReplicasResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.SetReplicas")?;
        let msg = req.into_inner();
        observe(self.member.metrics(), "SetReplicas", &ctx, async {
            if msg.replicas == 0 || msg.replicas > MAX_REPLICAS {
                return Err(KvError::InvalidArgument(format!(
                    "replicas is {}, must be between 1 and {MAX_REPLICAS}",
                    msg.replicas
                )));
            }
            if self.member.config().replicas_source == ReplicasSource::Kubernetes {
                return Err(KvError::FailedPrecondition(
                    "replicas come from the StatefulSet (replicas_source = kubernetes): use `kubectl scale`"
                        .into(),
                ));
            }
            self.administer(&ctx, AdminCall::SetReplicas(msg), |r| match r {
                AdminResult::SetReplicas(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.AddLearner")?;
        let msg = req.into_inner();
        observe(self.member.metrics(), "AddLearner", &ctx, async {
            if msg.node_id == 0 || msg.peer_addr.is_empty() || msg.client_addr.is_empty() {
                return Err(KvError::InvalidArgument(
                    "node_id, peer_addr and client_addr are required".into(),
                ));
            }
            self.administer(&ctx, AdminCall::AddLearner(msg), |r| match r {
                AdminResult::AddLearner(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.Promote")?;
        let msg = req.into_inner();
        observe(self.member.metrics(), "Promote", &ctx, async {
            self.administer(&ctx, AdminCall::Promote(msg), |r| match r {
                AdminResult::Promote(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn remove(&self, req: Request<pb::RemoveRequest>) -> Result<Response<pb::RemoveResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.Remove")?;
        let msg = req.into_inner();
        observe(self.member.metrics(), "Remove", &ctx, async {
            self.administer(&ctx, AdminCall::Remove(msg), |r| match r {
                AdminResult::Remove(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.TransferLeader")?;
        let msg = req.into_inner();
        observe(self.member.metrics(), "TransferLeader", &ctx, async {
            self.administer(&ctx, AdminCall::TransferLeader(msg), |r| match r {
                AdminResult::TransferLeader(r) => Some(r),
                _ => None,
            })
            .await
        })
        .await
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.Snapshot")?;
        observe(self.member.metrics(), "Snapshot", &ctx, async {
            let raft = self.member.raft();
            let target = raft.metrics().borrow_watched().last_applied;
            raft.trigger().snapshot().await.map_err(|e| errors::stopped(&e))?;
            let Some(target) = target else {
                return Ok(pb::SnapshotResponse { last_log_index: 0 });
            };
            let left = ctx.remaining().max(Duration::from_millis(1));
            let mut rx = raft.metrics();
            let done = tokio::time::timeout(
                left,
                crate::member::metrics_until(&mut rx, |m| {
                    m.snapshot.is_some_and(|s| s.index >= target.index)
                }),
            )
            .await;
            match done {
                Ok(true) => Ok(pb::SnapshotResponse {
                    last_log_index: rx.borrow_watched().snapshot.map_or(0, |s| s.index),
                }),
                Ok(false) => Err(KvError::Stopping("raft stopped".into())),
                Err(_) => Err(KvError::DeadlineExceeded("the snapshot was not built in time".into())),
            }
        })
        .await
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.Defragment")?;
        observe(self.member.metrics(), "Defragment", &ctx, async {
            self.member.request_defrag(ctx.remaining()).await?;
            Ok::<_, KvError>(pb::DefragmentResponse {
                db_size_bytes: self.member.metrics().volume_bytes.get().max(0) as u64,
            })
        })
        .await
    }

    type BackupStream = BackupStream;

    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Cluster.Backup")?;
        observe(self.member.metrics(), "Backup", &ctx, async {
            let reader = self.member.reader().clone();
            let (header, path, total) = tokio::task::spawn_blocking(move || reader.write_backup())
                .await
                .map_err(|e| KvError::Internal(e.to_string()))?
                .map_err(|e| KvError::Internal(format!("writing the backup failed: {e}")))?;
            let file = std::fs::File::open(&path);
            let _ = std::fs::remove_file(&path); // the open handle stays readable
            let file = file.map_err(|e| KvError::Internal(format!("opening the backup failed: {e}")))?;
            tracing::info!(revision = header.revision, bytes = total, "streaming a backup");
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::task::spawn_blocking(move || stream_backup(file, total, header.revision, &tx));
            Ok::<_, KvError>(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as BackupStream)
        })
        .await
    }
}
