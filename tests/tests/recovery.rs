//! Guards of `force_new_cluster` (quorum-loss recovery) that the chaos scenario does not reach:
//! an empty volume is refused, and a member the setting does not name ignores it. The recovery
//! itself, and its one-shot guard, are the `quorum-loss` scenario (in-process and Docker).

use std::time::Duration;

use kvset_tests::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_new_cluster_on_an_empty_volume_refuses_to_start_and_leaves_the_volume_empty() {
    let mut c = Cluster::new(1, |c| c.force_new_cluster = "kvset-0".into()).await;
    let err = c.try_start_node(0).await.expect_err("an empty volume has nothing to recover");
    let msg = err.to_string();
    assert!(msg.contains("holds no applied data") && msg.contains("kvset-0"), "{msg}");
    // Nothing was bootstrapped: without the setting the member waits for its peers as usual
    // and bootstraps a cluster of one (initial_replicas 1).
    let mut plain = Cluster::new(1, |_| {}).await;
    drop(c);
    plain.start_node(0).await;
    plain.wait_voters(1, Duration::from_secs(30)).await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_new_cluster_naming_another_member_is_ignored() {
    let mut c = Cluster::new(3, |c| c.force_new_cluster = "kvset-7".into()).await;
    for o in 0..3 {
        c.start_node(o).await;
    }
    c.wait_voters(3, Duration::from_secs(60)).await;
    let first = c.client().status_of(&c.endpoint(1)).await.unwrap().cluster_id;
    c.stop(1).await;
    c.start_node(1).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    assert_eq!(c.client().status_of(&c.endpoint(1)).await.unwrap().cluster_id, first);
    c.shutdown().await;
}
