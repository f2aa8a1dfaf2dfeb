//! The `Kv` gRPC service: the kvset.v1 client API.
//!
//! A request flows: limits checked and converted to a domain command or [`Query`]
//! (`pb::request`) → run by the member ([`LocalMember::execute`], [`LocalMember::read`]),
//! which serves it on the leader or sends it there → the result converted back
//! (`pb::response`). Each call gets a tracing span and is counted in the metrics.
//!
//! Watch streams are served by this member from its own state (the [`WatchHub`]); lease
//! keep-alives are renewed on the leader (through its peer port when this member follows).
//!
//! [`WatchHub`]: crate::watch_hub::WatchHub

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use kvset_proto::v1 as pb;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::errors;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::pb::request;
use crate::pb::response;
use crate::pb::response::HeaderInfo;
use crate::query::Answer;
use crate::query::Consistency;
use crate::query::Query;
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

/// The consistency a kvset.v1 read asks for.
fn consistency(value: i32) -> Result<Consistency, KvError> {
    match pb::ReadConsistency::try_from(value) {
        Ok(pb::ReadConsistency::Serializable) => Ok(Consistency::Serializable),
        Ok(_) => Ok(Consistency::Linearizable),
        Err(_) => Err(KvError::InvalidArgument(format!("consistency {value} is not a known value"))),
    }
}

impl KvService {
    /// The service of `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self { member }
    }

    /// Runs a write and converts its result.
    async fn write<T>(
        &self,
        ctx: &CallContext,
        command: Command,
        to_response: impl FnOnce(CommandResult, &HeaderInfo) -> T,
    ) -> Result<T, KvError> {
        let result = accepted(self.member.execute(command, ctx).await?)?;
        Ok(to_response(result, &self.member.header_info()))
    }

    /// Runs a read and converts its answer.
    async fn read<T>(
        &self,
        ctx: &CallContext,
        consistency: Consistency,
        query: Query,
        to_response: impl FnOnce(Answer, &HeaderInfo) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        let answer = self.member.read(query, consistency, ctx).await??;
        to_response(answer, &self.member.header_info())
    }
}

/// An answer of another kind than the query asked for.
fn mismatched(answer: &Answer) -> KvError {
    KvError::Internal(format!("unexpected answer {answer:?}"))
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Put", &ctx, async {
            let command = request::put_command(msg, &self.member.config().limits)?;
            self.write(&ctx, command, response::put).await
        })
        .await
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Get", &ctx, async {
            let (key, revision) = request::get(&msg, &self.member.config().limits)?;
            self.read(&ctx, consistency(msg.consistency)?, Query::Get { key, revision }, |answer, info| {
                match answer {
                    Answer::Get { kv, revision } => {
                        Ok(pb::GetResponse { header: info.at(revision), kv: kv.map(response::kv) })
                    }
                    other => Err(mismatched(&other)),
                }
            })
            .await
        })
        .await
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Delete", &ctx, async {
            let command = request::delete_command(&msg, &self.member.config().limits)?;
            self.write(&ctx, command, response::delete).await
        })
        .await
    }

    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Range", &ctx, async {
            request::check_size(&msg, &self.member.config().limits)?;
            let query = request::range(&msg, &self.member.config().limits)?;
            self.read(&ctx, consistency(msg.consistency)?, Query::Range(query), |answer, info| match answer {
                Answer::Range { result, revision } => Ok(response::range(result, info.at(revision))),
                other => Err(mismatched(&other)),
            })
            .await
        })
        .await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let ctx = CallContext::of(&req);
        let msg = req.into_inner();
        observe(self.member.metrics(), "Txn", &ctx, async {
            let command = request::txn_command(&msg, &self.member.config().limits)?;
            self.write(&ctx, command, response::txn).await
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
            self.write(&ctx, command, |r, info| pb::CompactResponse { header: info.at(r.revision()) }).await
        })
        .await
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<tonic::Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = requires_leader(req.metadata());
        let ctx = CallContext::of(&req);
        let limits = self.member.config().limits.clone();
        let guard = self.member.clone();
        let requests = req.into_inner().map(move |r| match r {
            Ok(msg) => request::watch(msg, &limits).map(|w| guard.guard_watch(&ctx, w)),
            Err(status) => Err(KvError::request_stream(&status)),
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
            let ttl = request::lease_ttl(msg.ttl_seconds, &self.member.config().lease)?;
            if msg.id < 0 {
                return Err(KvError::InvalidArgument(format!(
                    "id is {}; lease ids are positive (0: any)",
                    msg.id
                )));
            }
            // Id 0: the leader picks one.
            self.write(&ctx, Command::LeaseGrant { id: msg.id, ttl }, |r, info| match r {
                CommandResult::LeaseGrant { revision, id, ttl } => {
                    pb::LeaseGrantResponse { header: info.at(revision), id, ttl_seconds: ttl }
                }
                other => pb::LeaseGrantResponse { header: info.at(other.revision()), ..Default::default() },
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
            self.write(&ctx, Command::LeaseRevoke(id), |r, info| pb::LeaseRevokeResponse {
                header: info.at(r.revision()),
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
        self.member.authorize(&CallContext::of(&req), &crate::auth::Needs::default(), "keep leases alive")?;
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
            let (id, keys) = (msg.id, msg.keys);
            let query = Query::Lease { id, keys };
            self.read(&ctx, Consistency::Linearizable, query, |answer, info| match answer {
                Answer::Lease { status: Some(s), revision } => Ok(pb::LeaseTimeToLiveResponse {
                    header: info.at(revision),
                    id,
                    ttl_seconds: (s.remaining_ms / 1000) as i64,
                    granted_ttl_seconds: s.lease.ttl,
                    keys: s.keys,
                }),
                Answer::Lease { status: None, revision } => Ok(pb::LeaseTimeToLiveResponse {
                    header: info.at(revision),
                    id,
                    ttl_seconds: -1,
                    ..Default::default()
                }),
                other => Err(mismatched(&other)),
            })
            .await
        })
        .await
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let ctx = CallContext::of(&req);
        observe(self.member.metrics(), "LeaseLeases", &ctx, async {
            self.read(&ctx, Consistency::Linearizable, Query::Leases, |answer, info| match answer {
                Answer::Leases { leases, revision } => Ok(pb::LeaseLeasesResponse {
                    header: info.at(revision),
                    leases: leases
                        .into_iter()
                        .map(|l| pb::LeaseStatus { id: l.id, granted_ttl_seconds: l.ttl })
                        .collect(),
                }),
                other => Err(mismatched(&other)),
            })
            .await
        })
        .await
    }
}
