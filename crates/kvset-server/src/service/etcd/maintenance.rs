//! etcd's `Maintenance` service: Status, Alarm, Defragment, Hash, HashKV, Snapshot, MoveLeader
//! and Downgrade, on this member.

use std::io::Read;

use kvset_proto::etcdserverpb as epb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::EtcdService;
use crate::auth::Needs;
use crate::forward::CallContext;
use crate::pb::etcd::errors;
use crate::pb::etcd::response;
use crate::service::observe;

/// The etcd version kvset's API corresponds to, reported by `Status`: clients such as the
/// Kubernetes apiserver enable features by it (watch progress requests from 3.5.13 on).
pub const ETCD_VERSION: &str = "3.5.21";

/// Bytes per `Snapshot` message (etcd's chunk size).
const SNAPSHOT_CHUNK: usize = 32 * 1024;
/// A streamed snapshot is padded to a multiple of this.
const SNAPSHOT_SECTOR: u64 = 512;

type SnapshotStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<epb::SnapshotResponse, Status>> + Send>>;

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("kvset: {e}")))
}

/// Sends `total` bytes of `file` in etcd's framing: chunks of 32 KiB, each with the bytes
/// remaining after it, zero bytes up to a multiple of 512 (etcd's files are whole pages, and
/// etcdctl checks that the size less the checksum is a multiple of 512), then the SHA-256 of
/// everything sent as the last message.
fn stream_snapshot(
    mut file: std::fs::File,
    total: u64,
    header: Option<epb::ResponseHeader>,
    tx: &tokio::sync::mpsc::Sender<Result<epb::SnapshotResponse, Status>>,
) {
    let padded = total.div_ceil(SNAPSHOT_SECTOR) * SNAPSHOT_SECTOR;
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut sent = 0u64;
    let mut buf = vec![0u8; SNAPSHOT_CHUNK];
    while sent < padded {
        let want = (padded - sent).min(SNAPSHOT_CHUNK as u64) as usize;
        let from_file = (total.saturating_sub(sent) as usize).min(want);
        if let Err(e) = file.read_exact(&mut buf[..from_file]) {
            let _ =
                tx.blocking_send(Err(Status::internal(format!("kvset: reading the snapshot failed: {e}"))));
            return;
        }
        buf[from_file..want].fill(0);
        sha.update(&buf[..want]);
        sent += want as u64;
        let chunk =
            epb::SnapshotResponse { header, remaining_bytes: padded - sent, blob: buf[..want].to_vec() };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return; // the client went away
        }
    }
    let digest = sha.finish();
    let _ = tx.blocking_send(Ok(epb::SnapshotResponse {
        header,
        remaining_bytes: 0,
        blob: digest.as_ref().to_vec(),
    }));
}

#[tonic::async_trait]
impl epb::maintenance_server::Maintenance for EtcdService {
    async fn alarm(&self, req: Request<epb::AlarmRequest>) -> Result<Response<epb::AlarmResponse>, Status> {
        self.member
            .authorize(&CallContext::of(&req), &Needs::admin(), "Maintenance.Alarm")
            .map_err(errors::from_kv)?;
        use epb::alarm_request::AlarmAction;
        let r = req.into_inner();
        // kvset raises NOSPACE alarms by itself (the quota task) and clears them once the
        // volumes are under quota_bytes again: a disarm cannot clear one early, and none is
        // raised by hand.
        let alarms = || {
            self.member
                .alarms()
                .iter()
                .map(|a| epb::AlarmMember { member_id: a.node_id, alarm: epb::AlarmType::Nospace as i32 })
                .collect()
        };
        match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) | Ok(AlarmAction::Deactivate) => {
                Ok(Response::new(epb::AlarmResponse { header: self.header_now(), alarms: alarms() }))
            }
            Ok(AlarmAction::Activate) => Err(errors::unimplemented(
                "Alarm ACTIVATE: kvset raises its NOSPACE alarms itself from quota_bytes; none is set by hand",
            )),
            Err(_) => Err(Status::invalid_argument(format!("kvset: alarm action {} is not a known value", r.action))),
        }
    }

    async fn status(
        &self,
        req: Request<epb::StatusRequest>,
    ) -> Result<Response<epb::StatusResponse>, Status> {
        let ctx = CallContext::of(&req);
        observe(self.member.metrics(), "etcd.Status", &ctx, async {
            let m = self.member.raft_metrics();
            let voter = m.membership_config.membership().voter_ids().any(|id| id == self.member.node_id());
            // The volume size the metrics task measures off the runtime's workers (a walk of
            // the data directory), as kvset.v1's Cluster.Status reports it.
            let db_size = self.member.metrics().volume_bytes.get().max(0);
            Ok::<_, Status>(epb::StatusResponse {
                header: self.header_now(),
                version: ETCD_VERSION.to_string(),
                db_size,
                leader: self.member.leader().0.unwrap_or(0),
                raft_index: m.last_log_index.unwrap_or(0),
                raft_term: m.current_term,
                raft_applied_index: m.last_applied.map_or(0, |l| l.index),
                // etcd lists each alarm as its AlarmMember's text form.
                errors: self
                    .member
                    .alarms()
                    .iter()
                    .map(|a| format!("memberID:{} alarm:NOSPACE ", a.node_id))
                    .collect(),
                // sled does not report the share of its files in use.
                db_size_in_use: db_size,
                is_learner: !voter,
            })
        })
        .await
    }

    async fn defragment(
        &self,
        req: Request<epb::DefragmentRequest>,
    ) -> Result<Response<epb::DefragmentResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Maintenance.Defragment").map_err(errors::from_kv)?;
        observe(self.member.metrics(), "etcd.Defragment", &ctx, async {
            // Unlike etcd, which answers after its rewrite, the member answers, then stops,
            // rewrites its database and serves again (see kvset.v1 Cluster.Defragment).
            self.member.request_defrag(ctx.remaining()).await.map_err(errors::from_kv)?;
            Ok::<_, Status>(epb::DefragmentResponse { header: self.header_now() })
        })
        .await
    }

    async fn hash(&self, req: Request<epb::HashRequest>) -> Result<Response<epb::HashResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Maintenance.Hash").map_err(errors::from_kv)?;
        observe(self.member.metrics(), "etcd.Hash", &ctx, async {
            // The whole logical state (live keys, leases, compact revision) of this member.
            let reader = self.member.reader().clone();
            let digest = blocking(move || reader.digest()).await?.map_err(|e| errors::read(&e))?;
            Ok::<_, Status>(epb::HashResponse {
                header: response::header(&self.info(), digest.revision),
                hash: digest.crc,
            })
        })
        .await
    }

    async fn hash_kv(
        &self,
        req: Request<epb::HashKvRequest>,
    ) -> Result<Response<epb::HashKvResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Maintenance.HashKV").map_err(errors::from_kv)?;
        let revision = req.get_ref().revision.max(0);
        observe(self.member.metrics(), "etcd.HashKV", &ctx, async {
            let reader = self.member.reader().clone();
            let (hash, compact_revision, _) =
                blocking(move || reader.hash_kv(revision)).await?.map_err(|e| errors::read(&e))?;
            Ok::<_, Status>(epb::HashKvResponse { header: self.header_now(), hash, compact_revision })
        })
        .await
    }

    type SnapshotStream = SnapshotStream;

    /// Streams a consistent snapshot of this member's applied state in etcd's framing (see
    /// `stream_snapshot`). The contents are kvset's snapshot format (history and leases),
    /// not a bbolt file.
    async fn snapshot(
        &self,
        req: Request<epb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Maintenance.Snapshot").map_err(errors::from_kv)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<epb::SnapshotResponse, Status>>(4);
        let member = self.member.clone();
        let header = self.header_now();
        observe(self.member.metrics(), "etcd.Snapshot", &ctx, async {
            let reader = member.reader().clone();
            let (_, path, total) = blocking(move || reader.write_backup())
                .await?
                .map_err(|e| Status::internal(format!("kvset: writing the snapshot failed: {e}")))?;
            let file = std::fs::File::open(&path);
            let _ = std::fs::remove_file(&path); // the open handle stays readable
            let file =
                file.map_err(|e| Status::internal(format!("kvset: opening the snapshot failed: {e}")))?;
            tokio::task::spawn_blocking(move || stream_snapshot(file, total, header, &tx));
            Ok::<_, Status>(Box::pin(ReceiverStream::new(rx)) as SnapshotStream)
        })
        .await
    }

    /// As etcd: only the leader moves leadership (etcdctl sends the call to it), to a voter.
    async fn move_leader(
        &self,
        req: Request<epb::MoveLeaderRequest>,
    ) -> Result<Response<epb::MoveLeaderResponse>, Status> {
        let ctx = CallContext::of(&req);
        self.member.authorize(&ctx, &Needs::admin(), "Maintenance.MoveLeader").map_err(errors::from_kv)?;
        let target = req.get_ref().target_id;
        observe(self.member.metrics(), "etcd.MoveLeader", &ctx, async {
            let m = self.member.raft_metrics();
            if m.current_leader != Some(self.member.node_id()) {
                return Err(errors::not_leader());
            }
            if !m.membership_config.membership().voter_ids().any(|v| v == target) {
                return Err(errors::bad_leader_transferee());
            }
            let budget = ctx.remaining().min(std::time::Duration::from_secs(5));
            self.member.transfer_leadership(Some(target), budget).await.map_err(errors::from_kv)?;
            Ok::<_, Status>(epb::MoveLeaderResponse { header: self.header_now() })
        })
        .await
    }

    async fn downgrade(
        &self,
        _: Request<epb::DowngradeRequest>,
    ) -> Result<Response<epb::DowngradeResponse>, Status> {
        Err(errors::unimplemented("Downgrade: kvset has no cluster version to downgrade"))
    }
}
