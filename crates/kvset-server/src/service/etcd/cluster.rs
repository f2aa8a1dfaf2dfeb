//! etcd's `Cluster` service: MemberList from the Raft membership; the calls that change
//! membership are refused, because a kvset cluster's membership follows the StatefulSet's
//! replicas by itself.

use std::collections::BTreeSet;

use kvset_proto::etcdserverpb as epb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::EtcdService;
use crate::forward::CallContext;
use crate::member::LocalMember;
use crate::pb::etcd::errors;
use crate::service::observe;

/// The members of the current configuration, as etcd lists them (URLs with `http://`).
pub(super) fn members(member: &LocalMember) -> Vec<epb::Member> {
    let metrics = member.raft_metrics();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, node)| epb::Member {
            id: *id,
            name: node.name.clone(),
            peer_ur_ls: vec![format!("http://{}", node.peer_addr)],
            client_ur_ls: vec![format!("http://{}", node.client_addr)],
            is_learner: !voters.contains(id),
        })
        .collect()
}

#[tonic::async_trait]
impl epb::cluster_server::Cluster for EtcdService {
    async fn member_list(
        &self,
        req: Request<epb::MemberListRequest>,
    ) -> Result<Response<epb::MemberListResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.MemberList", &ctx, async {
            if r.linearizable && self.member.leads() {
                self.member.read_barrier(ctx.deadline).await.map_err(errors::from_kv)?;
            }
            Ok::<_, Status>(epb::MemberListResponse {
                // As etcd's cluster server: no revision in the header.
                header: self.header_now().map(|h| epb::ResponseHeader { revision: 0, ..h }),
                members: members(&self.member),
            })
        })
        .await
    }

    async fn member_add(
        &self,
        _: Request<epb::MemberAddRequest>,
    ) -> Result<Response<epb::MemberAddResponse>, Status> {
        Err(errors::membership_follows_the_statefulset("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<epb::MemberRemoveRequest>,
    ) -> Result<Response<epb::MemberRemoveResponse>, Status> {
        Err(errors::membership_follows_the_statefulset("MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<epb::MemberUpdateRequest>,
    ) -> Result<Response<epb::MemberUpdateResponse>, Status> {
        Err(errors::membership_follows_the_statefulset("MemberUpdate"))
    }

    async fn member_promote(
        &self,
        _: Request<epb::MemberPromoteRequest>,
    ) -> Result<Response<epb::MemberPromoteResponse>, Status> {
        Err(errors::membership_follows_the_statefulset("MemberPromote"))
    }
}
