//! etcd's `Lease` service: Grant, Revoke, KeepAlive, TimeToLive, Leases — the same commands,
//! renewals and queries as kvset.v1's lease calls.

use futures::StreamExt;
use kvset_proto::etcdserverpb as epb;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::mismatched;
use super::EtcdService;
use crate::forward::CallContext;
use crate::member::Phase;
use crate::pb::etcd::errors;
use crate::pb::etcd::request;
use crate::pb::etcd::response;
use crate::query::Answer;
use crate::query::Consistency;
use crate::query::Query;
use crate::service::observe;

/// How long one keep-alive renewal may take.
const RENEW_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

type KeepAliveStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<epb::LeaseKeepAliveResponse, Status>> + Send>>;

impl EtcdService {
    /// Grants a lease as the Lease service does (also the sessions of the lock and election
    /// services).
    pub(super) async fn grant_now(
        &self,
        r: &epb::LeaseGrantRequest,
        ctx: &CallContext,
    ) -> Result<epb::LeaseGrantResponse, Status> {
        let ttl = request::lease_ttl(r.ttl, &self.member.config().lease)?;
        if r.id < 0 {
            return Err(Status::invalid_argument(format!(
                "kvset: lease ID {} is negative; IDs are positive (0: any)",
                r.id
            )));
        }
        // ID 0: the leader picks one.
        match self.execute(Command::LeaseGrant { id: r.id, ttl }, ctx).await? {
            CommandResult::LeaseGrant { revision, id, ttl } => Ok(epb::LeaseGrantResponse {
                header: response::header(&self.info(), revision),
                id,
                ttl,
                error: String::new(),
            }),
            other => Err(Status::internal(format!("kvset: unexpected result {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl epb::lease_server::Lease for EtcdService {
    async fn lease_grant(
        &self,
        req: Request<epb::LeaseGrantRequest>,
    ) -> Result<Response<epb::LeaseGrantResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.LeaseGrant", &ctx, self.grant_now(&r, &ctx)).await
    }

    async fn lease_revoke(
        &self,
        req: Request<epb::LeaseRevokeRequest>,
    ) -> Result<Response<epb::LeaseRevokeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.LeaseRevoke", &ctx, async {
            let result = self.execute(Command::LeaseRevoke(r.id), &ctx).await?;
            Ok::<_, Status>(epb::LeaseRevokeResponse {
                header: response::header(&self.info(), result.revision()),
            })
        })
        .await
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<tonic::Streaming<epb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let ctx = crate::forward::CallContext::of(&req);
        self.member
            .authorize(&ctx, &crate::auth::Needs::default(), "keep leases alive")
            .map_err(errors::from_kv)?;
        let member = self.member.clone();
        // The stream lives as long as its lease: it ends when the member shuts down, or it
        // would hold up the drain.
        let mut phase = self.member.subscribe_phase();
        let stopping = async move {
            let _ = phase.wait_for(|p| *p != Phase::Serving).await;
        };
        let out = req.into_inner().take_until(stopping).then(move |r| {
            let member = member.clone();
            async move {
                let msg = r?;
                // Each renewal has its own deadline. An unknown lease answers TTL 0, as in etcd.
                let deadline = std::time::Instant::now() + RENEW_DEADLINE;
                let ttl = member.renew_lease(msg.id, deadline).await.map_err(errors::from_kv)?;
                Ok(epb::LeaseKeepAliveResponse {
                    header: response::header(&member.header_info(), member.reader().applied().revision),
                    id: msg.id,
                    ttl,
                })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<epb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<epb::LeaseTimeToLiveResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.LeaseTimeToLive", &ctx, async {
            let query = Query::Lease { id: r.id, keys: r.keys };
            match self.read(query, Consistency::Linearizable, &ctx).await? {
                Answer::Lease { status: Some(s), revision } => Ok(epb::LeaseTimeToLiveResponse {
                    header: response::header(&self.info(), revision),
                    id: r.id,
                    ttl: (s.remaining_ms / 1000) as i64,
                    granted_ttl: s.lease.ttl,
                    keys: s.keys,
                }),
                // As etcd: an unknown lease has TTL -1.
                Answer::Lease { status: None, revision } => Ok(epb::LeaseTimeToLiveResponse {
                    header: response::header(&self.info(), revision),
                    id: r.id,
                    ttl: -1,
                    ..Default::default()
                }),
                other => Err(mismatched(&other)),
            }
        })
        .await
    }

    async fn lease_leases(
        &self,
        req: Request<epb::LeaseLeasesRequest>,
    ) -> Result<Response<epb::LeaseLeasesResponse>, Status> {
        let ctx = CallContext::of(&req);
        observe(self.member.metrics(), "etcd.LeaseLeases", &ctx, async {
            match self.read(Query::Leases, Consistency::Linearizable, &ctx).await? {
                Answer::Leases { leases, revision } => Ok(epb::LeaseLeasesResponse {
                    header: response::header(&self.info(), revision),
                    leases: leases.into_iter().map(|l| epb::LeaseStatus { id: l.id }).collect(),
                }),
                other => Err(mismatched(&other)),
            }
        })
        .await
    }
}
