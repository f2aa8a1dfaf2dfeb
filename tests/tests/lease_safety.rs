//! Leases that can't be fooled by leadership changes (issue 24): a new leader whose applied
//! state still lags its log must not answer a keep-alive with TTL 0 (its client would stop
//! renewing and the lease would really expire), and renewal answers stay truthful around an
//! expiry. The lessor's own races (a renewal during the expiry revoke, a lease granted again
//! under the same id, leadership regained in a new term) are unit tests in `lessor.rs`.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::etcdserverpb as epb;
use kvset_server::NodeOptions;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd::Raw;
use tokio::sync::mpsc;

const SETTLE: Duration = Duration::from_secs(60);

/// Stalls every apply of a member until a moment a test sets.
#[derive(Default)]
struct ApplyGate {
    until: Mutex<Option<Instant>>,
}

impl ApplyGate {
    fn stall_for(&self, d: Duration) {
        *self.until.lock().unwrap() = Some(Instant::now() + d);
    }
}

impl kvset_storage::DiskFault for ApplyGate {
    fn apply_stall(&self) -> Duration {
        self.until.lock().unwrap().map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
    }
}

/// One keep-alive of `id` through `raw`, as etcd's clients send it: the TTL answered.
async fn keep_alive_once(raw: &Raw, id: i64) -> Result<i64, tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(epb::LeaseKeepAliveRequest { id }).await.unwrap();
    let mut lease = raw.lease.clone();
    let mut answers =
        lease.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let answer = answers.message().await?.ok_or_else(|| tonic::Status::unavailable("stream ended"))?;
    Ok(answer.ttl)
}

/// Issue 24, item 1: `route()` treated a member as leader as soon as its vote committed; if its
/// applied state still lagged (here: it had not applied the grant the old leader committed),
/// `renew` did not find the lease and answered TTL 0, and clients stop renewing on 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_that_has_not_applied_a_grant_yet_does_not_answer_ttl_0() {
    let mut c = Cluster::new(3, |_| {}).await;
    let gates: Vec<Arc<ApplyGate>> = (0..3).map(|_| Arc::new(ApplyGate::default())).collect();
    for o in 0..3 {
        let options = NodeOptions { disk_fault: Some(gates[o as usize].clone()), ..Default::default() };
        c.start_node_with(o, options).await;
    }
    let leader = c.wait_voters(3, SETTLE).await;
    let next = (0..3).find(|o| *o != leader).unwrap();
    let client = c.client_for(leader);

    // The next leader stops applying; the grant commits on the other two.
    gates[next as usize].stall_for(Duration::from_secs(3));
    let id = client.lease_grant(60, 0).await.unwrap().id;
    let next_id = c.node(next).node_id();
    assert_eq!(client.transfer_leader(next_id).await.unwrap().leader_id, next_id);
    let applied = c.node(next).member().reader().leases().contains_key(&id);
    assert!(!applied, "the test needs the new leader to lag: it applied the grant already");

    // A keep-alive to the new leader: a TTL once it has applied its predecessor's log, never 0.
    let raw = Raw::connect(&c.endpoint(next)).await;
    let started = Instant::now();
    let ttl = keep_alive_once(&raw, id).await.expect("keep-alive");
    assert!(ttl > 0, "the new leader answered TTL {ttl} for a live lease after {:?}", started.elapsed());
    assert!(c.node(next).member().reader().leases().contains_key(&id));
    c.shutdown().await;
}

/// Issue 24, item 2, through the API: once a lease's deadline has passed it is being revoked;
/// a keep-alive then waits for the revoke and answers 0 with the lease's keys already gone —
/// never a TTL for a lease whose keys are about to be deleted (two lock holders).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_alive_after_the_deadline_answers_0_once_the_keys_are_gone() {
    let c = Cluster::start_with(3, |cfg| {
        cfg.lease.min_ttl_seconds = 1;
        // The lease task looks rarely, so the renewal arrives before it picks the lease.
        cfg.lease.check_interval_ms = 2_000;
    })
    .await;
    let leader = c.wait_voters(3, SETTLE).await;
    let client = c.client_for(leader);
    let id = client.lease_grant(1, 0).await.unwrap().id;
    // The leader's deadline for the lease is at most 1 s after its grant applied, which is
    // before this answer arrived.
    let expired_by = Instant::now() + Duration::from_millis(1_100);
    client
        .put_request(kvset_client::pb::PutRequest {
            key: b"held".to_vec(),
            value: b"x".to_vec(),
            lease: id,
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep_until(expired_by.into()).await; // the lease's time passing is what is tested
    let raw = Raw::connect(&c.endpoint(leader)).await;
    let ttl = keep_alive_once(&raw, id).await.expect("keep-alive");
    assert_eq!(ttl, 0, "an expired lease was renewed");
    assert!(client.get("held").await.unwrap().is_none(), "0 was answered before the lease's key was deleted");
    c.shutdown().await;
}
