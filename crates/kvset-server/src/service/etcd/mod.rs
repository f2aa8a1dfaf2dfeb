//! etcd's v3 API (`etcdserverpb`) on the client port: KV, Watch, Lease, Cluster, Maintenance
//! and Auth, one file each, all over the same [`LocalMember`] as kvset.v1; and etcd's Lock
//! (`v3lockpb`) and Election (`v3electionpb`) services, which run etcd's concurrency recipe
//! ([`recipe`]) over the same KV, Watch and Lease handlers.
//!
//! Each handler converts the request (`pb::etcd::request`, etcd's checks and error texts), runs
//! it as a domain command, query, watch or renewal — exactly what the kvset.v1 handler of the
//! same operation runs — and converts the outcome back (`pb::etcd::response`,
//! `pb::etcd::errors`). No behaviour lives here that kvset.v1 does not share.

mod auth;
mod cluster;
mod election;
mod kv;
mod lease;
mod lock;
mod maintenance;
pub mod recipe;
mod watch;

use std::sync::Arc;

use kvset_proto::etcdserverpb as epb;
use kvset_proto::v3electionpb;
use kvset_proto::v3lockpb;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use tonic::Status;

use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::pb::etcd::errors;
use crate::pb::response::HeaderInfo;
use crate::query::Answer;
use crate::query::Consistency;
use crate::query::Query;

/// etcd's v3 services on one member.
#[derive(Debug, Clone)]
pub struct EtcdService {
    member: Arc<LocalMember>,
}

/// The gRPC servers of etcd's eight services, ready for the client port's router, and the
/// service itself (which etcd's JSON gateway calls).
#[derive(Debug)]
pub struct EtcdServers {
    pub service: EtcdService,
    pub kv: epb::kv_server::KvServer<EtcdService>,
    pub watch: epb::watch_server::WatchServer<EtcdService>,
    pub lease: epb::lease_server::LeaseServer<EtcdService>,
    pub cluster: epb::cluster_server::ClusterServer<EtcdService>,
    pub maintenance: epb::maintenance_server::MaintenanceServer<EtcdService>,
    pub auth: epb::auth_server::AuthServer<EtcdService>,
    pub lock: v3lockpb::lock_server::LockServer<EtcdService>,
    pub election: v3electionpb::election_server::ElectionServer<EtcdService>,
}

/// etcd's gRPC service names, as registered for health and reflection.
pub const SERVICE_NAMES: [&str; 8] = [
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Cluster",
    "etcdserverpb.Maintenance",
    "etcdserverpb.Auth",
    "v3lockpb.Lock",
    "v3electionpb.Election",
];

impl EtcdService {
    /// The services of `member`, with message size limits: requests decode up to
    /// `decode_limit` (so an oversized one gets etcd's "request is too large", not a transport
    /// error), responses encode up to `encode_limit`.
    pub fn servers(member: Arc<LocalMember>, decode_limit: usize, encode_limit: usize) -> EtcdServers {
        let s = EtcdService { member };
        macro_rules! server {
            ($path:path) => {
                <$path>::new(s.clone())
                    .max_decoding_message_size(decode_limit)
                    .max_encoding_message_size(encode_limit)
            };
        }
        EtcdServers {
            kv: server!(epb::kv_server::KvServer<EtcdService>),
            watch: server!(epb::watch_server::WatchServer<EtcdService>),
            lease: server!(epb::lease_server::LeaseServer<EtcdService>),
            cluster: server!(epb::cluster_server::ClusterServer<EtcdService>),
            maintenance: server!(epb::maintenance_server::MaintenanceServer<EtcdService>),
            auth: server!(epb::auth_server::AuthServer<EtcdService>),
            lock: server!(v3lockpb::lock_server::LockServer<EtcdService>),
            election: server!(v3electionpb::election_server::ElectionServer<EtcdService>),
            service: s,
        }
    }

    fn info(&self) -> HeaderInfo {
        self.member.header_info()
    }

    /// A header at the member's applied revision.
    fn header_now(&self) -> Option<epb::ResponseHeader> {
        crate::pb::etcd::response::header(&self.info(), self.member.reader().applied().revision)
    }

    /// Runs a command on the leader; a refusal of the state machine is etcd's error for it.
    async fn execute(&self, command: Command, ctx: &CallContext) -> Result<CommandResult, Status> {
        match self.member.execute(command, ctx).await.map_err(errors::from_kv)? {
            CommandResult::Rejected { error, .. } => Err(errors::rejected(&error)),
            ok => Ok(ok),
        }
    }

    /// Answers a query; a refusal of the state is etcd's error for it.
    async fn read(
        &self,
        query: Query,
        consistency: Consistency,
        ctx: &CallContext,
    ) -> Result<Answer, Status> {
        self.member
            .read(query, consistency, ctx)
            .await
            .map_err(errors::from_kv)?
            .map_err(|e| errors::query(&e))
    }
}

/// An answer of another kind than the query asked for.
fn mismatched(answer: &Answer) -> Status {
    Status::internal(format!("kvset: unexpected answer {answer:?}"))
}
