//! Leadership transfer: on request (`Cluster.TransferLeader`, etcd's `MoveLeader` through the
//! real etcdctl) and by a leader that stops. The rolling-restart chaos scenario measures what
//! the handover saves under load; these tests pin the behaviour.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_client::Error;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::eventually;

const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_leader_moves_leadership_on_request_and_refuses_bad_targets() {
    let c = Cluster::start(3).await;
    let leader = c.wait_voters(3, SETTLE).await;
    let client = c.client();
    client.put("before", "1").await.unwrap();

    // No target: the most up-to-date other voter takes over, and the call says which.
    let moved = client.transfer_leader(0).await.unwrap().leader_id;
    assert_ne!(moved, c.node(leader).node_id());
    let now = c.wait_voters(3, SETTLE).await;
    assert_eq!(c.node(now).node_id(), moved, "the answer names the new leader");

    // A named target, asked through a member that does not lead (forwarded to the leader).
    let target = (0..3).find(|o| *o != now).unwrap();
    let follower = (0..3).find(|o| *o != now && *o != target).unwrap();
    let target_id = c.node(target).node_id();
    assert_eq!(c.client_for(follower).transfer_leader(target_id).await.unwrap().leader_id, target_id);
    assert_eq!(c.wait_voters(3, SETTLE).await, target);

    // Handing it to the leader itself is a no-op; to a stranger, refused, nothing moves.
    assert_eq!(client.transfer_leader(target_id).await.unwrap().leader_id, target_id);
    match client.transfer_leader(12345).await {
        Err(Error::FailedPrecondition(msg)) => assert!(msg.contains("not a voter"), "{msg}"),
        other => panic!("a transfer to a non-member must be refused, got {other:?}"),
    }
    assert_eq!(c.wait_voters(3, SETTLE).await, target);

    // Writes go on under the new leader, and nothing was lost on the way.
    client.put("after", "2").await.unwrap();
    assert_eq!(client.get("before").await.unwrap().unwrap().value, b"1");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_move_leader_moves_leadership() {
    let c = Cluster::start(3).await;
    let leader = c.wait_voters(3, SETTLE).await;
    let endpoints = (0..3).map(|o| c.endpoint(o)).collect::<Vec<_>>().join(",");
    let target = (leader + 1) % 3;
    let target_hex = format!("{:x}", c.node(target).node_id());
    let (ok, out, err) = tokio::task::spawn_blocking({
        let (endpoints, target_hex) = (endpoints.clone(), target_hex.clone());
        move || etcd::run_etcdctl(&endpoints, &["move-leader", &target_hex], None)
    })
    .await
    .unwrap();
    assert!(ok, "etcdctl move-leader failed:\n{out}\n{err}");
    assert!(out.contains("Leadership transferred"), "{out}");
    assert_eq!(c.wait_voters(3, SETTLE).await, target);

    // A target that is not a member: etcd's own error.
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || etcd::run_etcdctl(&endpoints, &["move-leader", "3039"], None))
            .await
            .unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("bad leader transferee"), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_stops_hands_over_before_an_election_timeout() {
    // Elections take at least election_timeout_min (2.5 s by default); a handover takes a round
    // trip and the new leader's first commit.
    let mut c = Cluster::start(3).await;
    let leader = c.wait_voters(3, SETTLE).await;
    let min_election = Duration::from_millis(c.config(0).raft.election_timeout_min_ms);

    // A writer that records the longest time between two acknowledged writes.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, acked) = (c.client(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                if client.put(format!("k{}", i % 50), i.to_string()).await.is_ok() {
                    longest = longest.max(last.elapsed());
                    acked.fetch_add(1, Ordering::Release);
                    last = Instant::now();
                }
            }
            longest
        })
    };
    // Writes flow before the stop.
    eventually("the writer's first acknowledged writes", SETTLE, || async {
        (acked.load(Ordering::Acquire) >= 20).then_some(())
    })
    .await;
    c.stop(leader).await;
    let new_leader = c.wait_leader(SETTLE).await;
    assert_ne!(new_leader, leader);
    // Some writes under the new leader, then the longest gap is known.
    let client = c.client();
    for i in 0..5 {
        client.put(format!("after-{i}"), "x").await.unwrap();
    }
    stop.store(true, Ordering::Release);
    let longest = writer.await.unwrap();
    println!("longest gap between acknowledged writes across the leader's stop: {longest:?}");
    assert!(
        longest < min_election,
        "the leader's stop cost {longest:?} of writes: no handover (an election takes at least {min_election:?})"
    );
    c.shutdown().await;
}
