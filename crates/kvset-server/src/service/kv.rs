//! The `Kv` gRPC service: the kvset.v1 client API.
//!
//! A request flows: limits checked and converted to a domain command (`pb::request`) → routed
//! (this member leads: serve; a follower: forward to the leader; no leader: `UNAVAILABLE`) →
//! writes go through the batcher into Raft, linearizable reads wait for a ReadIndex barrier,
//! serializable reads are served from the local state machine → the result is converted back
//! (`pb::response`). Each call gets a tracing span and is counted in the metrics.
//!
//! Watch streams are served by this member from its own state (the [`WatchHub`]); lease
//! keep-alives are renewed on the leader (forwarded through its peer port when this member
//! follows).
//!
//! [`WatchHub`]: crate::watch_hub::WatchHub

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use kvset_proto::v1 as pb;
use kvset_proto::v1::kv_client::KvClient;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::errors::KvError;
use crate::forward::forwarded_error;
use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::member::Route;
use crate::pb::request;
use crate::pb::response;
use crate::pb::response::HeaderInfo;
use crate::service::observe;
use crate::service::requires_leader;

/// The client key-value service.
#[derive(Debug, Clone)]
pub struct KvService {
    member: Arc<LocalMember>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long one keep-alive renewal may take.
const RENEW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A command's result, or the error a refused command means.
fn accepted(result: CommandResult) -> Result<CommandResult, KvError> {
    match result {
        CommandResult::Rejected { error, .. } => Err(errors::rejected(&error)),
        ok => Ok(ok),
    }
}

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
                Ok(result) => return Ok(to_response(accepted(result)?, &self.member.header_info())),
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
        self.on_leader(ctx, local, forward).await
    }

    /// Runs `local` on the leader after a ReadIndex barrier, or forwards the call there.
    async fn on_leader<T>(
        &self,
        ctx: CallContext,
        local: impl AsyncFnOnce() -> Result<T, KvError>,
        forward: impl AsyncFnOnce(KvClient<Channel>) -> Result<Response<T>, Status>,
    ) -> Result<T, KvError> {
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

/// Serves one range page from the local state machine.
fn local_range(
    member: &LocalMember,
    query: &kvset_storage::RangeQuery,
) -> Result<pb::RangeResponse, KvError> {
    let (result, revision) = member.reader().range(query).map_err(errors::read)?;
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
            let (key, revision) = request::get(&msg, &self.member.config().limits)?;
            let consistency = msg.consistency;
            self.read(
                ctx,
                consistency,
                async || {
                    // One key: a sled lookup (a seek in the history for a past revision),
                    // normally from cache; cheap enough inline.
                    let s = &self.member;
                    let (kv, current) = s.reader().get(&key, revision).map_err(errors::read)?;
                    Ok(pb::GetResponse { header: s.header_info().at(current), kv: kv.map(response::kv) })
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

    async fn compact(
        &self,
        req: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Compact", &ctx, async {
            let command = request::compact(&msg)?;
            let to_response =
                |r: CommandResult, info: &HeaderInfo| pb::CompactResponse { header: info.at(r.revision()) };
            self.write(ctx, command, to_response, async move |mut c| c.compact(ctx.forward(msg)).await).await
        })
        .await
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<tonic::Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = requires_leader(req.metadata());
        let limits = self.member.config().limits.clone();
        let requests = req.into_inner().map(move |r| match r {
            Ok(msg) => request::watch(msg, &limits),
            Err(status) => Err(KvError::Remote(status)),
        });
        let responses = self.member.watch_hub().open(requests, require_leader);
        let member = self.member.clone();
        let out = ReceiverStream::new(responses)
            .map(move |r| r.map(|r| response::watch(r, &member.header_info())).map_err(Status::from));
        self.member.metrics().grpc("Watch", tonic::Code::Ok, std::time::Duration::ZERO);
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "LeaseGrant", &ctx, async {
            let config = &self.member.config().lease;
            let ttl = request::lease_ttl(msg.ttl_seconds, config)?;
            if msg.id < 0 {
                return Err(KvError::InvalidArgument(format!(
                    "id is {}; lease ids are positive (0: any)",
                    msg.id
                )));
            }
            let leading = self.member.route(ctx.forwarded)? == Route::Local;
            if leading && self.member.reader().leases().len() as u64 >= config.max_leases {
                return Err(KvError::LimitReached(format!(
                    "the cluster holds {} leases, the limit lease.max_leases = {}",
                    config.max_leases, config.max_leases
                )));
            }
            // The leader chooses the id (a forwarded request still carries 0).
            let id = if msg.id == 0 { self.member.new_lease_id() } else { msg.id };
            let to_response = |r: CommandResult, info: &HeaderInfo| match r {
                CommandResult::LeaseGrant { revision, id, ttl } => {
                    pb::LeaseGrantResponse { header: info.at(revision), id, ttl_seconds: ttl }
                }
                other => pb::LeaseGrantResponse { header: info.at(other.revision()), ..Default::default() },
            };
            self.write(ctx, Command::LeaseGrant { id, ttl }, to_response, async move |mut c| {
                c.lease_grant(ctx.forward(msg)).await
            })
            .await
        })
        .await
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "LeaseRevoke", &ctx, async {
            let id = request::lease_id(msg.id)?;
            let to_response = |r: CommandResult, info: &HeaderInfo| pb::LeaseRevokeResponse {
                header: info.at(r.revision()),
            };
            self.write(ctx, Command::LeaseRevoke(id), to_response, async move |mut c| {
                c.lease_revoke(ctx.forward(msg)).await
            })
            .await
        })
        .await
    }

    type LeaseKeepAliveStream = BoxStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<tonic::Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let member = self.member.clone();
        // The stream lives as long as its lease: it must end when the member shuts down, or
        // it would hold up the drain.
        let mut phase = self.member.subscribe_phase();
        let stopping = async move {
            let _ = phase.wait_for(|p| *p != crate::member::Phase::Serving).await;
        };
        let out = req.into_inner().take_until(stopping).then(move |r| {
            let member = member.clone();
            async move {
                let msg = r?;
                // Each renewal has its own deadline (a stream lives for as long as its lease).
                let deadline = std::time::Instant::now() + RENEW_DEADLINE;
                let ttl = member.renew_lease(msg.id, deadline).await.map_err(Status::from)?;
                Ok(pb::LeaseKeepAliveResponse {
                    header: member.header_info().at(member.reader().applied().revision),
                    id: msg.id,
                    ttl_seconds: ttl,
                })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "LeaseTimeToLive", &ctx, async {
            let (id, with_keys) = (msg.id, msg.keys);
            self.on_leader(
                ctx,
                async || {
                    let s = &self.member;
                    let header = s.header_info().at(s.reader().applied().revision);
                    Ok(match s.lease_here(id, ctx.deadline).await? {
                        Some((lease, left, keys)) => pb::LeaseTimeToLiveResponse {
                            header,
                            id,
                            ttl_seconds: left.as_secs() as i64,
                            granted_ttl_seconds: lease.ttl,
                            keys: if with_keys { keys } else { Vec::new() },
                        },
                        None => {
                            pb::LeaseTimeToLiveResponse { header, id, ttl_seconds: -1, ..Default::default() }
                        }
                    })
                },
                async move |mut c| c.lease_time_to_live(ctx.forward(msg)).await,
            )
            .await
        })
        .await
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "LeaseLeases", &ctx, async {
            self.on_leader(
                ctx,
                async || {
                    let s = &self.member;
                    let leases = s
                        .reader()
                        .leases()
                        .values()
                        .map(|l| pb::LeaseStatus { id: l.id, granted_ttl_seconds: l.ttl })
                        .collect();
                    Ok(pb::LeaseLeasesResponse {
                        header: s.header_info().at(s.reader().applied().revision),
                        leases,
                    })
                },
                async move |mut c| c.lease_leases(ctx.forward(msg)).await,
            )
            .await
        })
        .await
    }
}
