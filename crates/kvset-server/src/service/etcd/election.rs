//! etcd's `v3electionpb.Election` service, as etcd's `v3election` server runs it — the
//! `concurrency.Election` recipe ([`super::recipe`]) over this member's KV, Watch and Lease.
//!
//! * **Campaign(name, lease, value)** puts `<name>/<lease in hex>` = value with the lease (a
//!   lease of 0 gets a new 60 s one) unless that key exists (then proclaims the value if it
//!   differs), and waits until every key of `<name>/` created before it is deleted: the
//!   campaigner leads, and the answer's `LeaderKey` (name, key, create revision, lease) proves
//!   it. Leadership ends with Resign or with the lease.
//! * **Proclaim(leader, value)** puts the new value if the leader's key still has its create
//!   revision ("election: not leader" otherwise).
//! * **Leader(name)** is the key of `<name>/` created first ("election: no leader" if none).
//! * **Observe(name)** streams the leader's key and every value it proclaims, then the next
//!   leader's, as long as the client listens.
//! * **Resign(leader)** deletes the leader's key if it still has its create revision.

use std::pin::Pin;

use futures::Stream;
use kvset_proto::etcdserverpb as epb;
use kvset_proto::mvccpb;
use kvset_proto::v3electionpb as vpb;
use kvset_storage::KeyRange;
use kvset_storage::RangeEnd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::recipe;
use super::recipe::Recipe;
use super::EtcdService;
use crate::service::observe;

/// etcd's `concurrency.ErrElectionNotLeader`.
fn not_leader() -> Status {
    Status::unknown("election: not leader")
}

/// etcd's `concurrency.ErrElectionNoLeader`.
fn no_leader() -> Status {
    Status::unknown("election: no leader")
}

/// etcd's `v3election.ErrMissingLeaderKey`.
fn missing_leader_key() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<vpb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl vpb::election_server::Election for EtcdService {
    async fn campaign(
        &self,
        req: Request<vpb::CampaignRequest>,
    ) -> Result<Response<vpb::CampaignResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Campaign", recipe.ctx(), recipe.bounded(campaign(&recipe, r)))
            .await
    }

    async fn proclaim(
        &self,
        req: Request<vpb::ProclaimRequest>,
    ) -> Result<Response<vpb::ProclaimResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Proclaim", recipe.ctx(), async {
            let leader = r.leader.ok_or_else(missing_leader_key)?;
            let header = recipe.bounded(proclaim(&recipe, &leader, &r.value)).await?;
            Ok::<_, Status>(vpb::ProclaimResponse { header })
        })
        .await
    }

    async fn leader(
        &self,
        req: Request<vpb::LeaderRequest>,
    ) -> Result<Response<vpb::LeaderResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Leader", recipe.ctx(), async {
            let prefix = recipe::prefix_of(&r.name);
            let first = recipe.bounded(recipe.get(&first_created(&prefix))).await?;
            let kv = first.kvs.into_iter().next().ok_or_else(no_leader)?;
            Ok::<_, Status>(vpb::LeaderResponse { header: first.header, kv: Some(kv) })
        })
        .await
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<vpb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                // Within the client's deadline, if it set one; the stream then ends.
                _ = recipe.bounded(async {
                    observe_leaders(&recipe, &recipe::prefix_of(&r.name), &tx).await;
                    Ok::<_, Status>(())
                }) => {}
            }
        });
        self.member.metrics().grpc("etcd.Observe", tonic::Code::Ok, std::time::Duration::ZERO);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<vpb::ResignRequest>,
    ) -> Result<Response<vpb::ResignResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Resign", recipe.ctx(), async {
            let leader = r.leader.ok_or_else(missing_leader_key)?;
            recipe
                .bounded(async {
                    // etcd resumes the election on a session of the leader's lease (a new one
                    // for lease 0), which Resign does not use.
                    recipe.session(leader.lease).await?;
                    let resign = resign_txn(&leader.key, leader.rev);
                    let resp = recipe.txn(&resign).await?;
                    Ok(vpb::ResignResponse { header: resp.header })
                })
                .await
        })
        .await
    }
}

fn first_created(prefix: &[u8]) -> epb::RangeRequest {
    recipe::by_create(prefix, epb::range_request::SortOrder::Ascend)
}

/// Deletes the leader's key if it still has the leader's create revision.
fn resign_txn(key: &[u8], rev: i64) -> epb::TxnRequest {
    epb::TxnRequest {
        compare: vec![recipe::created_at(key, rev)],
        success: vec![recipe::op_delete(key)],
        failure: Vec::new(),
    }
}

/// etcd's `Election.Campaign` on a session of `r.lease`.
async fn campaign(recipe: &Recipe, r: vpb::CampaignRequest) -> Result<vpb::CampaignResponse, Status> {
    let lease = recipe.session(r.lease).await?;
    let prefix = recipe::prefix_of(&r.name);
    let key = recipe::waiter_key(&prefix, lease);
    let join = epb::TxnRequest {
        compare: vec![recipe::created_at(&key, 0)],
        success: vec![recipe::op_put(&key, &r.value, lease)],
        failure: vec![recipe::op_get(recipe::single(&key))],
    };
    let resp = recipe.txn(&join).await?;
    let mut rev = resp.header.as_ref().map_or(0, |h| h.revision);
    if !resp.succeeded {
        let Some(kv) = recipe::range_kvs(&resp, 0)?.first() else {
            // The key went (with its lease) between the compare and the read: etcd would fail
            // reading it too.
            return Err(Status::unknown("election: campaign key vanished"));
        };
        rev = kv.create_revision;
        if kv.value != r.value {
            let leader = vpb::LeaderKey { name: r.name.clone(), key: key.clone(), rev, lease };
            if let Err(e) = proclaim_on(recipe, &leader, lease, &r.value).await {
                let _ = recipe.txn(&resign_txn(&key, rev)).await;
                return Err(e);
            }
        }
    }
    // Wait for the campaigners before this one; resign if the call ends first.
    let resign = recipe.undo(resign_txn(&key, rev));
    if let Err(e) = recipe.wait_deletes(&prefix, rev - 1).await {
        // etcd resigns only when the call's context ended (handled by the undo on drop);
        // another failure leaves the key.
        resign.disarm();
        return Err(e);
    }
    resign.disarm();
    Ok(vpb::CampaignResponse {
        header: resp.header,
        leader: Some(vpb::LeaderKey { name: r.name, key, rev, lease }),
    })
}

/// etcd's `Election.Proclaim` on a session of the leader's lease (a new one for lease 0).
async fn proclaim(
    recipe: &Recipe,
    leader: &vpb::LeaderKey,
    value: &[u8],
) -> Result<Option<epb::ResponseHeader>, Status> {
    let lease = recipe.session(leader.lease).await?;
    proclaim_on(recipe, leader, lease, value).await
}

async fn proclaim_on(
    recipe: &Recipe,
    leader: &vpb::LeaderKey,
    lease: i64,
    value: &[u8],
) -> Result<Option<epb::ResponseHeader>, Status> {
    let put = epb::TxnRequest {
        compare: vec![recipe::created_at(&leader.key, leader.rev)],
        success: vec![recipe::op_put(&leader.key, value, lease)],
        failure: Vec::new(),
    };
    let resp = recipe.txn(&put).await?;
    if !resp.succeeded {
        return Err(not_leader());
    }
    Ok(resp.header)
}

/// etcd's `Election.observe`: sends the current leader's key, each value it proclaims, and
/// then the next leader's, until the client goes or a read fails (the stream then ends).
async fn observe_leaders(
    recipe: &Recipe,
    prefix: &[u8],
    tx: &mpsc::Sender<Result<vpb::LeaderResponse, Status>>,
) {
    loop {
        let Ok(resp) = recipe.get(&first_created(prefix)).await else { return };
        let (header, kv) = match resp.kvs.into_iter().next() {
            Some(kv) => (resp.header, kv),
            None => {
                // No leader: wait for the first put under the prefix.
                let from = resp.header.as_ref().map_or(0, |h| h.revision);
                let range = KeyRange { start: prefix.to_vec(), end: end_of(prefix) };
                let mut watch = recipe.watch(range, from);
                loop {
                    let Ok(Some((header, events))) = watch.next_with_header().await else { return };
                    let put = events.into_iter().find(|e| e.r#type == mvccpb::event::EventType::Put as i32);
                    if let Some(kv) = put.and_then(|e| e.kv) {
                        // The header's revision is the put's, as etcd sets it.
                        let header = header.map(|h| epb::ResponseHeader { revision: kv.mod_revision, ..h });
                        break (header, kv);
                    }
                }
            }
        };
        let key = kv.key.clone();
        let next = header.as_ref().map_or(0, |h| h.revision) + 1;
        if tx.send(Ok(vpb::LeaderResponse { header, kv: Some(kv) })).await.is_err() {
            return;
        }
        // Follow the leader's key until it is deleted.
        let mut watch = recipe.watch(KeyRange::single(key), next);
        'leader: loop {
            let Ok(Some((header, events))) = watch.next_with_header().await else { return };
            for event in events {
                if event.r#type == mvccpb::event::EventType::Delete as i32 {
                    break 'leader;
                }
                let update = vpb::LeaderResponse { header, kv: event.kv };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn end_of(prefix: &[u8]) -> RangeEnd {
    match recipe::prefix_end(prefix).as_slice() {
        [0] => RangeEnd::Unbounded,
        end => RangeEnd::Before(end.to_vec()),
    }
}
