//! The `Kv` gRPC service: the client API.
//!
//! A request flows: limits checked and converted to a domain command (`pb::request`) → routed
//! (this member leads: serve; a follower: forward to the leader; no leader: `UNAVAILABLE`) →
//! writes go through the batcher into Raft, linearizable reads wait for a ReadIndex barrier,
//! serializable reads are served from the local state machine → the result is converted back
//! (`pb::response`). Each call gets a tracing span and is counted in the metrics.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kvset_proto::v1 as pb;
use kvset_proto::v1::kv_client::KvClient;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use tonic::transport::Channel;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors::KvError;
use crate::forward::forwarded_error;
use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::member::Route;
use crate::pb::request;
use crate::pb::response;
use crate::pb::response::HeaderInfo;
use crate::service::observe;

/// The client key-value service.
#[derive(Debug, Clone)]
pub struct KvService {
    member: Arc<LocalMember>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl KvService {
    /// The service of `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self { member }
    }

    /// Runs a write: locally when this member leads, else on the leader.
    async fn write<T>(
        &self,
        ctx: CallContext,
        command: Command,
        to_response: impl FnOnce(CommandResult, &HeaderInfo) -> T,
        forward: impl AsyncFnOnce(KvClient<Channel>) -> Result<Response<T>, Status>,
    ) -> Result<T, KvError> {
        let mut route = self.member.route(ctx.forwarded)?;
        if route == Route::Local {
            match self.member.submit(command, ctx.deadline).await {
                Ok(result) => return Ok(to_response(result, &self.member.header_info())),
                // Leadership moved before the entry was appended: nothing was applied, so the
                // new leader may take it.
                Err(KvError::NoLeader { leader_id: Some(id), leader_addr: Some(addr), .. })
                    if !ctx.forwarded && id != self.member.node_id() =>
                {
                    route = Route::Forward { leader_id: id, addr };
                }
                Err(e) => return Err(e),
            }
        }
        let Route::Forward { addr, .. } = route else {
            return Err(KvError::Internal("routing".into()));
        };
        let client = self.member.forwarder().kv(&addr)?;
        forward(client).await.map(Response::into_inner).map_err(|s| forwarded_error(s, &addr, true))
    }

    /// Runs a read at the requested consistency.
    async fn read<T>(
        &self,
        ctx: CallContext,
        consistency: i32,
        local: impl AsyncFnOnce() -> Result<T, KvError>,
        forward: impl AsyncFnOnce(KvClient<Channel>) -> Result<Response<T>, Status>,
    ) -> Result<T, KvError> {
        if consistency == pb::ReadConsistency::Serializable as i32 {
            return local().await;
        }
        if pb::ReadConsistency::try_from(consistency).is_err() {
            return Err(KvError::InvalidArgument(format!("consistency {consistency} is not a known value")));
        }
        match self.member.route(ctx.forwarded)? {
            Route::Local => {
                self.member.read_barrier(ctx.deadline).await?;
                local().await
            }
            Route::Forward { addr, .. } => {
                let client = self.member.forwarder().kv(&addr)?;
                forward(client).await.map(Response::into_inner).map_err(|s| forwarded_error(s, &addr, false))
            }
        }
    }
}

fn read_err(e: kvset_storage::ReadError) -> KvError {
    KvError::Internal(e.to_string())
}

/// Serves one range page from the local state machine.
fn local_range(
    member: &LocalMember,
    query: &kvset_storage::RangeQuery,
) -> Result<pb::RangeResponse, KvError> {
    let (result, revision) = member.reader().range(query).map_err(read_err)?;
    Ok(response::range(result, member.header_info().at(revision)))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Put", &ctx, async {
            let command = request::put_command(&msg, &self.member.config().limits)?;
            self.write(ctx, command, response::put, async move |mut c| c.put(ctx.forward(msg)).await).await
        })
        .await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Get", &ctx, async {
            let key = request::get(&msg, &self.member.config().limits)?;
            let consistency = msg.consistency;
            self.read(
                ctx,
                consistency,
                async || {
                    // One key: a sled lookup, normally from cache; cheap enough inline.
                    let s = &self.member;
                    let (kv, revision) = s.reader().get(&key).map_err(read_err)?;
                    Ok(pb::GetResponse { header: s.header_info().at(revision), kv: kv.map(response::kv) })
                },
                async move |mut c| c.get(ctx.forward(msg)).await,
            )
            .await
        })
        .await
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Delete", &ctx, async {
            let command = request::delete_command(&msg, &self.member.config().limits)?;
            self.write(ctx, command, response::delete, async move |mut c| c.delete(ctx.forward(msg)).await)
                .await
        })
        .await
    }

    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Range", &ctx, async {
            request::check_size(&msg, &self.member.config().limits)?;
            let query = request::range(&msg, &self.member.config().limits)?;
            let consistency = msg.consistency;
            let member = self.member.clone();
            let local = async move || {
                // Up to range_max_keys keys: keep the scan off the async workers.
                tokio::task::spawn_blocking(move || local_range(&member, &query))
                    .await
                    .map_err(|e| KvError::Internal(e.to_string()))?
            };
            self.read(ctx, consistency, local, async move |mut c| c.range(ctx.forward(msg)).await).await
        })
        .await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Txn", &ctx, async {
            let command = request::txn_command(&msg, &self.member.config().limits)?;
            self.write(ctx, command, response::txn, async move |mut c| c.txn(ctx.forward(msg)).await).await
        })
        .await
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(&self, _req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(KvError::Unimplemented("Watch is specified but not served by this version".into()).into())
    }

    async fn lease_grant(
        &self,
        _req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        Err(KvError::Unimplemented("leases are specified but not served by this version".into()).into())
    }

    async fn lease_revoke(
        &self,
        _req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        Err(KvError::Unimplemented("leases are specified but not served by this version".into()).into())
    }

    type LeaseKeepAliveStream = BoxStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        _req: Request<tonic::Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Err(KvError::Unimplemented("leases are specified but not served by this version".into()).into())
    }
}
