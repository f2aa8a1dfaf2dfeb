//! etcd's `v3lockpb.Lock` service: Lock and Unlock, as etcd's `v3lock` server runs them — the
//! `concurrency.Mutex` recipe ([`super::recipe`]) over this member's KV, Watch and Lease.
//!
//! * **Lock(name, lease)** puts `<name>/<lease in hex>` with the lease (a lease of 0 gets a new
//!   60 s one) unless that key exists, then waits until every key of `<name>/` created before
//!   it is deleted, and answers with the key. The holder keeps the lock while the key exists:
//!   until Unlock, or until the lease ends (expiry or revoke).
//! * **Unlock(key)** deletes the key.

use kvset_proto::etcdserverpb as epb;
use kvset_proto::v3lockpb as lpb;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::recipe;
use super::recipe::Recipe;
use super::EtcdService;
use crate::service::observe;

/// etcd's `concurrency.ErrSessionExpired`: the waiter's key was gone when it got the lock.
fn session_expired() -> Status {
    Status::unknown("session expired")
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for EtcdService {
    async fn lock(&self, req: Request<lpb::LockRequest>) -> Result<Response<lpb::LockResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Lock", recipe.ctx(), recipe.bounded(lock(&recipe, r))).await
    }

    async fn unlock(
        &self,
        req: Request<lpb::UnlockRequest>,
    ) -> Result<Response<lpb::UnlockResponse>, Status> {
        let recipe = Recipe::of(self, &req);
        let r = req.into_inner();
        observe(self.member.metrics(), "etcd.Unlock", recipe.ctx(), async {
            let deleted = recipe.bounded(recipe.delete(r.key)).await?;
            Ok::<_, Status>(lpb::UnlockResponse { header: deleted.header })
        })
        .await
    }
}

/// etcd's `Mutex.Lock` on a session of `r.lease`.
async fn lock(recipe: &Recipe, r: lpb::LockRequest) -> Result<lpb::LockResponse, Status> {
    use epb::range_request::SortOrder;
    let lease = recipe.session(r.lease).await?;
    let prefix = recipe::prefix_of(&r.name);
    let key = recipe::waiter_key(&prefix, lease);
    // Join the waiters (or find this session's key), and read the current holder.
    let owner = || recipe::op_get(recipe::by_create(&prefix, SortOrder::Ascend));
    let acquire = epb::TxnRequest {
        compare: vec![recipe::created_at(&key, 0)],
        success: vec![recipe::op_put(&key, b"", lease), owner()],
        failure: vec![recipe::op_get(recipe::single(&key)), owner()],
    };
    let resp = recipe.txn(&acquire).await?;
    let mut mine = resp.header.as_ref().map_or(0, |h| h.revision);
    if !resp.succeeded {
        mine = recipe::range_kvs(&resp, 0)?.first().map_or(0, |kv| kv.create_revision);
    }
    let holder = recipe::range_kvs(&resp, 1)?;
    if holder.first().is_none_or(|kv| kv.create_revision == mine) {
        return Ok(lpb::LockResponse { header: resp.header, key });
    }
    // Wait for the waiters before this one; leave the queue if that fails or the call ends.
    let unlock =
        recipe.undo(epb::TxnRequest { success: vec![recipe::op_delete(&key)], ..Default::default() });
    if let Err(e) = recipe.wait_deletes(&prefix, mine - 1).await {
        unlock.run().await;
        return Err(e);
    }
    // Still there? (The lease may have ended while waiting.)
    let held = match recipe.get(&recipe::single(&key)).await {
        Ok(held) => held,
        Err(e) => {
            unlock.run().await;
            return Err(e);
        }
    };
    unlock.disarm();
    if held.kvs.is_empty() {
        return Err(session_expired());
    }
    Ok(lpb::LockResponse { header: held.header, key })
}
