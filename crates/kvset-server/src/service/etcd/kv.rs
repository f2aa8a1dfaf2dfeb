//! etcd's `KV` service: Range, Put, DeleteRange, Txn (nested too) and Compact.
//!
//! Range, DeleteRange and Txn are also what the lock and election services run (as etcd's run
//! them over an in-process client): [`EtcdService::range_now`] and its siblings are the
//! handlers without the per-call span and metrics.

use kvset_proto::etcdserverpb as epb;
use kvset_storage::Command;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::mismatched;
use super::EtcdService;
use crate::forward::CallContext;
use crate::pb::etcd::request;
use crate::pb::etcd::response;
use crate::query::Answer;
use crate::query::Query;
use crate::service::observe;

impl EtcdService {
    /// Answers a Range as the KV service does.
    pub(super) async fn range_now(
        &self,
        r: &epb::RangeRequest,
        ctx: &CallContext,
    ) -> Result<epb::RangeResponse, Status> {
        let limits = &self.member.config().limits;
        request::check_size(r, limits)?;
        let (query, consistency) = request::range(r, limits)?;
        match self.read(Query::Range(query), consistency, ctx).await? {
            Answer::Range { result, revision } => {
                request::complete(r, result.more, limits)?;
                Ok(response::range(result, response::header(&self.info(), revision)))
            }
            other => Err(mismatched(&other)),
        }
    }

    /// Runs a DeleteRange as the KV service does.
    pub(super) async fn delete_now(
        &self,
        r: &epb::DeleteRangeRequest,
        ctx: &CallContext,
    ) -> Result<epb::DeleteRangeResponse, Status> {
        let limits = &self.member.config().limits;
        request::check_size(r, limits)?;
        let command = Command::Delete(request::delete(r, limits)?);
        Ok(response::delete(self.execute(command, ctx).await?, &self.info()))
    }

    /// Runs a Txn as the KV service does.
    pub(super) async fn txn_now(
        &self,
        r: &epb::TxnRequest,
        ctx: &CallContext,
    ) -> Result<epb::TxnResponse, Status> {
        let limits = &self.member.config().limits;
        request::check_size(r, limits)?;
        let command = Command::Txn(request::txn(r, limits)?);
        Ok(response::txn(self.execute(command, ctx).await?, &self.info()))
    }
}

#[tonic::async_trait]
impl epb::kv_server::Kv for EtcdService {
    async fn range(&self, req: Request<epb::RangeRequest>) -> Result<Response<epb::RangeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Range", &ctx, self.range_now(&r, &ctx)).await
    }

    async fn put(&self, req: Request<epb::PutRequest>) -> Result<Response<epb::PutResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Put", &ctx, async {
            let limits = &self.member.config().limits;
            request::check_size(&r, limits)?;
            let command = Command::Put(request::put(r, limits)?);
            Ok::<_, Status>(response::put(self.execute(command, &ctx).await?, &self.info()))
        })
        .await
    }

    async fn delete_range(
        &self,
        req: Request<epb::DeleteRangeRequest>,
    ) -> Result<Response<epb::DeleteRangeResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.DeleteRange", &ctx, self.delete_now(&r, &ctx)).await
    }

    async fn txn(&self, req: Request<epb::TxnRequest>) -> Result<Response<epb::TxnResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Txn", &ctx, self.txn_now(&r, &ctx)).await
    }

    async fn compact(
        &self,
        req: Request<epb::CompactionRequest>,
    ) -> Result<Response<epb::CompactionResponse>, Status> {
        let ctx = CallContext::of(&req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Compact", &ctx, async {
            let result = self.execute(request::compact(&r), &ctx).await?;
            Ok::<_, Status>(epb::CompactionResponse {
                header: response::header(&self.info(), result.revision()),
            })
        })
        .await
    }
}
