//! etcd's concurrency recipe (`client/v3/concurrency`: sessions, `Mutex`, `Election`), run
//! inside the member for the Lock and Election services — as etcd's `v3lock` and `v3election`
//! servers run it over an in-process client — on the same ranges, transactions, watches and
//! lease grants as the KV, Watch and Lease services, with the caller's credentials.
//!
//! The recipe, in etcd's words and kvset's terms:
//!
//! * **A session** is a lease: the caller's (`lease` ≠ 0) or a new one with etcd's default
//!   session TTL, 60 s. The servers do not keep it alive (etcd's orphan their sessions at
//!   once), so a holder whose lease ends loses what it holds: its key goes with the lease.
//! * **A waiter** puts `<name>/<lease id in hex>` (unless that key exists: the same lease is
//!   one waiter) and owns the lock or the leadership once no key of the prefix with a smaller
//!   create revision is left: it repeatedly reads the newest such key and watches for its
//!   deletion from the read's revision (`waitDeletes`).
//! * **Cancellation**: a waiter whose call ends before it owns (the client went away or its
//!   deadline passed) deletes its key again, as etcd's `Unlock` / `Resign` after a failed
//!   wait: here from a task spawned when the call is dropped, so the next waiter is not held up
//!   by a key nobody waits behind.
//!
//! Each step has a deadline of its own ([`STEP_DEADLINE`]); a wait has none but the client's
//! (`grpc-timeout`), as in etcd, where it lasts as long as the call's context.

use std::future::Future;
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use kvset_proto::etcdserverpb as epb;
use kvset_proto::mvccpb;
use kvset_storage::KeyRange;
use tokio::sync::mpsc;
use tonic::Status;

use super::EtcdService;
use crate::errors::KvError;
use crate::forward::CallContext;
use crate::pb::etcd::errors;
use crate::watch_types::CancelCause;
use crate::watch_types::StreamRequest;
use crate::watch_types::StreamResponse;
use crate::watch_types::WatchSpec;

/// etcd's `concurrency.DefaultSessionTTL`: the TTL of the lease a call without one gets, in
/// seconds.
pub const DEFAULT_SESSION_TTL: i64 = 60;

/// How long one step (a read, a transaction, a grant) may take.
pub const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// The recipe for one call: the service, the caller's context and its own deadline, if any.
#[derive(Debug, Clone)]
pub(super) struct Recipe {
    svc: EtcdService,
    ctx: CallContext,
    /// The client's deadline (`grpc-timeout`); `None`: the call lasts until the client leaves.
    client_deadline: Option<Instant>,
}

impl Recipe {
    /// The recipe for `request`, on behalf of its caller.
    pub(super) fn of<T>(svc: &EtcdService, request: &tonic::Request<T>) -> Self {
        let ctx = CallContext::of(request);
        let client_deadline = request.metadata().get("grpc-timeout").is_some().then_some(ctx.deadline);
        Self { svc: svc.clone(), ctx, client_deadline }
    }

    /// The caller's context (for the per-call span and metrics).
    pub(super) fn ctx(&self) -> &CallContext {
        &self.ctx
    }

    /// The context of one step: the caller's credentials, a fresh deadline within the client's.
    fn step(&self) -> CallContext {
        let mut ctx = self.ctx.clone();
        let step = Instant::now() + STEP_DEADLINE;
        ctx.deadline = self.client_deadline.map_or(step, |d| d.min(step));
        ctx
    }

    /// Runs `call` within the client's deadline: past it, etcd's "context deadline exceeded"
    /// (and `call` is dropped, which undoes what it left armed).
    pub(super) async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        match self.client_deadline {
            None => call.await,
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("context deadline exceeded"))),
        }
    }

    /// The session's lease: `lease`, or a new one with the default session TTL when it is 0.
    pub(super) async fn session(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let grant = epb::LeaseGrantRequest { ttl: DEFAULT_SESSION_TTL, id: 0 };
        Ok(self.svc.grant_now(&grant, &self.step()).await.map_err(as_client_error)?.id)
    }

    pub(super) async fn txn(&self, t: &epb::TxnRequest) -> Result<epb::TxnResponse, Status> {
        self.svc.txn_now(t, &self.step()).await.map_err(as_client_error)
    }

    pub(super) async fn get(&self, r: &epb::RangeRequest) -> Result<epb::RangeResponse, Status> {
        self.svc.range_now(r, &self.step()).await.map_err(as_client_error)
    }

    pub(super) async fn delete(&self, key: Vec<u8>) -> Result<epb::DeleteRangeResponse, Status> {
        self.svc
            .delete_now(&epb::DeleteRangeRequest { key, ..Default::default() }, &self.step())
            .await
            .map_err(as_client_error)
    }

    /// A transaction run if this call is dropped before [`Undo::disarm`], or at once by
    /// [`Undo::run`].
    pub(super) fn undo(&self, txn: epb::TxnRequest) -> Undo {
        Undo { recipe: Some(self.clone()), txn }
    }

    /// etcd's `waitDeletes`: returns once no key under `prefix` with a create revision at or
    /// below `max_create_revision` is left.
    pub(super) async fn wait_deletes(&self, prefix: &[u8], max_create_revision: i64) -> Result<(), Status> {
        loop {
            let newest = epb::RangeRequest {
                max_create_revision,
                ..by_create(prefix, epb::range_request::SortOrder::Descend)
            };
            let resp = self.get(&newest).await?;
            let Some(last) = resp.kvs.first() else { return Ok(()) };
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            self.wait_delete(&last.key, revision).await?;
        }
    }

    /// etcd's `waitDelete`: returns once `key` is deleted at or after `revision`.
    async fn wait_delete(&self, key: &[u8], revision: i64) -> Result<(), Status> {
        let mut watch = self.watch(KeyRange::single(key.to_vec()), revision);
        while let Some(events) = watch.next().await? {
            if events.iter().any(|e| e.r#type == mvccpb::event::EventType::Delete as i32) {
                return Ok(());
            }
        }
        Err(Status::unknown("lost watcher waiting for delete"))
    }

    /// A watch of `range` from `start_revision`, through this member's watch hub with the
    /// caller's permissions.
    pub(super) fn watch(&self, range: KeyRange, start_revision: i64) -> Watch {
        let spec = WatchSpec {
            range,
            start_revision,
            prev_kv: false,
            progress_notify: false,
            no_put: false,
            no_delete: false,
            watch_id: None,
            fragment: false,
        };
        let create = self.svc.member.guard_watch(&self.ctx, StreamRequest::Create(spec));
        // The request stream stays open: the hub ends a stream whose client half-closed.
        let requests =
            futures::stream::once(async move { Ok::<_, KvError>(create) }).chain(futures::stream::pending());
        Watch { rx: self.svc.member.watch_hub().open(Box::pin(requests), false), svc: self.svc.clone() }
    }
}

/// One watch of the recipe.
#[derive(Debug)]
pub(super) struct Watch {
    rx: mpsc::Receiver<Result<StreamResponse, KvError>>,
    svc: EtcdService,
}

impl Watch {
    /// The next events (with their response's header), `None` when the stream ended; a
    /// canceled watch is the error its cancellation means.
    pub(super) async fn next_with_header(
        &mut self,
    ) -> Result<Option<(Option<epb::ResponseHeader>, Vec<mvccpb::Event>)>, Status> {
        while let Some(message) = self.rx.recv().await {
            match message.map_err(errors::from_kv)? {
                StreamResponse::Events { revision, events, .. } => {
                    let header = crate::pb::etcd::response::header(&self.svc.info(), revision);
                    let events = events.into_iter().map(crate::pb::etcd::response::event).collect();
                    return Ok(Some((header, events)));
                }
                StreamResponse::Canceled { cause: CancelCause::Compacted, .. } => {
                    return Err(errors::compacted())
                }
                StreamResponse::Canceled { reason, .. } if reason.contains("permission denied") => {
                    return Err(errors::permission_denied())
                }
                StreamResponse::Canceled { reason, .. } => return Err(Status::unknown(reason)),
                StreamResponse::Created { .. } | StreamResponse::Progress { .. } => {}
            }
        }
        Ok(None)
    }

    /// [`Self::next_with_header`] without the header.
    pub(super) async fn next(&mut self) -> Result<Option<Vec<mvccpb::Event>>, Status> {
        Ok(self.next_with_header().await?.map(|(_, events)| events))
    }
}

/// A transaction that runs when dropped armed: a waiter's key deleted when its call ends
/// before it owns (see the module's "Cancellation").
#[derive(Debug)]
pub(super) struct Undo {
    recipe: Option<Recipe>,
    txn: epb::TxnRequest,
}

impl Undo {
    /// Forgets the transaction.
    pub(super) fn disarm(mut self) {
        self.recipe = None;
    }

    /// Runs the transaction now (its outcome does not matter to the caller, as in etcd).
    pub(super) async fn run(mut self) {
        if let Some(recipe) = self.recipe.take() {
            let _ = recipe.txn(&self.txn).await;
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let Some(recipe) = self.recipe.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let txn = std::mem::take(&mut self.txn);
        // The client is gone or out of time; the undo has a deadline of its own.
        let recipe = Recipe { client_deadline: None, ..recipe };
        runtime.spawn(async move {
            if let Err(status) = recipe.txn(&txn).await {
                tracing::debug!(error = %status.message(), "undoing an abandoned lock or campaign failed");
            }
        });
    }
}

/// An error of a step as etcd's lock and election servers return it: they run the recipe
/// over clientv3, which turns etcd's own errors (`etcdserver: …`) into plain Go errors, so gRPC
/// sends them as `UNKNOWN` with the same text; other statuses (unavailable, deadline) keep
/// their code.
fn as_client_error(status: Status) -> Status {
    if status.code() != tonic::Code::Unknown && status.message().starts_with("etcdserver: ") {
        return Status::unknown(status.message().to_string());
    }
    status
}

/// The key of a session's lease under `prefix` (etcd: `fmt.Sprintf("%s%x", pfx, lease)`).
pub(super) fn waiter_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    // Go's %x of an int64 prints a sign and the magnitude.
    let hex = if lease < 0 { format!("-{:x}", lease.unsigned_abs()) } else { format!("{lease:x}") };
    key.extend_from_slice(hex.as_bytes());
    key
}

/// `name` + "/".
pub(super) fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// The end of the range of keys starting with `prefix` (clientv3's `GetPrefixRangeEnd`).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The key of `prefix` created first (`WithFirstCreate`), or last with `Descend`
/// (`WithLastCreate`).
pub(super) fn by_create(prefix: &[u8], order: epb::range_request::SortOrder) -> epb::RangeRequest {
    epb::RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: epb::range_request::SortTarget::Create as i32,
        ..Default::default()
    }
}

/// One key.
pub(super) fn single(key: &[u8]) -> epb::RangeRequest {
    epb::RangeRequest { key: key.to_vec(), ..Default::default() }
}

/// A compare of `key`'s create revision with `revision`.
pub(super) fn created_at(key: &[u8], revision: i64) -> epb::Compare {
    epb::Compare {
        result: epb::compare::CompareResult::Equal as i32,
        target: epb::compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: Vec::new(),
        target_union: Some(epb::compare::TargetUnion::CreateRevision(revision)),
    }
}

pub(super) fn op_put(key: &[u8], value: &[u8], lease: i64) -> epb::RequestOp {
    epb::RequestOp {
        request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

pub(super) fn op_get(r: epb::RangeRequest) -> epb::RequestOp {
    epb::RequestOp { request: Some(epb::request_op::Request::RequestRange(r)) }
}

pub(super) fn op_delete(key: &[u8]) -> epb::RequestOp {
    epb::RequestOp {
        request: Some(epb::request_op::Request::RequestDeleteRange(epb::DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

/// The keys of the `index`th response of a transaction, which the recipe built as a range.
pub(super) fn range_kvs(resp: &epb::TxnResponse, index: usize) -> Result<&[mvccpb::KeyValue], Status> {
    match resp.responses.get(index).and_then(|r| r.response.as_ref()) {
        Some(epb::response_op::Response::ResponseRange(r)) => Ok(&r.kvs),
        other => Err(Status::internal(format!("kvset: the recipe's transaction answered {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcds_errors_become_unknown_as_through_clientv3() {
        let e = as_client_error(Status::not_found("etcdserver: requested lease not found"));
        assert_eq!((e.code(), e.message()), (tonic::Code::Unknown, "etcdserver: requested lease not found"));
        let e = as_client_error(Status::unavailable("kvset: no leader"));
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn keys_and_ranges_are_etcds() {
        assert_eq!(waiter_key(b"lk/", 0x694d_7f3a), b"lk/694d7f3a");
        assert_eq!(waiter_key(b"lk/", -31), b"lk/-1f");
        assert_eq!(prefix_of(b"lk"), b"lk/");
        assert_eq!(prefix_end(b"lk/"), b"lk0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        let first = by_create(b"e/", epb::range_request::SortOrder::Ascend);
        assert_eq!((first.limit, first.range_end.as_slice()), (1, &b"e0"[..]));
    }
}
