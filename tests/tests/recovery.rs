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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_damaged_in_transit_is_refused_and_sent_again_and_the_member_keeps_running() {
    let mut c = Cluster::start_with(3, |c| {
        c.raft.snapshot_every_entries = 20;
        c.raft.keep_entries_after_snapshot = 5;
        // Many chunks per transfer: a damaged chunk in the middle is caught at the end and
        // the whole transfer starts over.
        c.raft.snapshot_chunk_bytes = 1024;
    })
    .await;
    let client = c.client();
    for i in 0..200 {
        client.put(format!("k{i:03}"), format!("v{i}")).await.unwrap();
    }
    // kvset-2 loses its volume: its replacement can only catch up from a snapshot, and the
    // first transfers arrive damaged.
    c.stop(2).await;
    c.wipe(2);
    c.partition.corrupt_snapshot_chunks.store(3, std::sync::atomic::Ordering::Release);
    c.start_node(2).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    let member = c.client_for(2);
    kvset_tests::eventually("kvset-2 serves the data", Duration::from_secs(30), || {
        let member = member.clone();
        async move { kvset_tests::member_get(&member, "k199").await.ok()?.filter(|kv| kv.value == b"v199") }
    })
    .await;
    assert_eq!(c.partition.corrupt_snapshot_chunks.load(std::sync::atomic::Ordering::Acquire), 0);
    let metrics = kvset_tests::http_get(&c.ops_endpoint(2), "/metrics").await.unwrap();
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("kvset_snapshots_total{kind=\"rejected\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(rejected >= 1.0, "no rejected snapshot counted:\n{metrics}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_cut_short_after_the_cluster_id_changed_is_finished_at_the_next_start_even_without_the_setting(
) {
    let mut c = Cluster::start(3).await;
    for i in 0..20 {
        c.client().put(format!("k{i}"), "v").await.unwrap();
    }
    let old = c.client().status_of(&c.endpoint(0)).await.unwrap().cluster_id;
    c.stop_many(&[0, 1, 2]).await;
    // The state a crash right after step 2 leaves: a new cluster id and a recovery under way,
    // no seed yet. The operator has removed the setting meanwhile.
    let meta_path = c.data_dir(0).join("kvset-volume.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let new = kvset_storage::ClusterId::random().to_string();
    meta["cluster_id"] = serde_json::Value::String(new.clone());
    meta["forced_new_cluster"] = serde_json::json!({ "from_cluster": old, "unix_ms": 1, "done": false });
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    c.start_node(0).await;
    c.wait_voters(1, Duration::from_secs(30)).await;
    let status = c.client_for(0).status_of(&c.endpoint(0)).await.unwrap();
    assert_eq!(status.cluster_id, new, "the recovery was finished under the new id");
    assert!(c.client_for(0).get("k19").await.unwrap().is_some(), "with the member's data");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    assert_eq!(meta["forced_new_cluster"]["done"], true);
    c.shutdown().await;
}

/// Issue 24, item 5: a quorum-loss recovery reused revision numbers: writes the lost members
/// had acknowledged after the survivor's last one had revisions R+1…, and the new cluster
/// handed out the same numbers for other data. By default it now raises the revision by
/// `force_new_cluster_bump_revision` and marks everything below compacted, so a watcher
/// resuming at its last revision is told to re-list, and no number is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_new_cluster_bumps_the_revision_and_marks_what_lies_below_compacted() {
    use kvset_tests::harness::Harness;
    let mut c = Cluster::start(3).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    let client = c.client();
    for i in 0..20 {
        client.put(format!("k{i:02}"), format!("v{i}")).await.unwrap();
    }
    let before = client.put("last", "x").await.unwrap().header.unwrap().revision;
    let survivor = c.wait_leader(Duration::from_secs(30)).await;
    let lost: Vec<u32> = (0..3).filter(|o| *o != survivor).collect();
    c.stop_many(&[0, 1, 2]).await;
    for o in &lost {
        c.wipe(*o);
    }
    c.set_env("KVSET_FORCE_NEW_CLUSTER", Some(&format!("kvset-{survivor}")));
    for o in 0..3 {
        c.start_node(o).await;
    }
    c.wait_voters(3, Duration::from_secs(120)).await;
    c.set_env("KVSET_FORCE_NEW_CLUSTER", None);
    let client = c.client();
    let bumped = before + kvset_storage::seed::DEFAULT_BUMP_REVISION as i64;
    let next = client.put("after", "y").await.unwrap().header.unwrap().revision;
    assert_eq!(next, bumped + 1, "the first write after the recovery continues above the bump");
    assert_eq!(client.get("k07").await.unwrap().map(|kv| kv.value), Some(b"v7".to_vec()), "the data is kept");
    // Below the new revision everything is compacted: a read there, or a watch resuming after
    // `before`, is refused with the compact revision.
    match client.get_at("k07", before).await {
        Err(kvset_client::Error::OutOfRange(msg)) => assert!(msg.contains(&bumped.to_string()), "{msg}"),
        other => panic!("a read below the bumped revision answered {other:?}"),
    }
    let raw = kvset_tests::etcd::Raw::connect(&c.endpoint(survivor)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(kvset_proto::etcdserverpb::WatchRequest {
        request_union: Some(kvset_proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(
            kvset_proto::etcdserverpb::WatchCreateRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                start_revision: before + 1,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut watch = raw.watch.clone();
    let mut responses =
        watch.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let canceled = loop {
        let r = responses.message().await.unwrap().expect("a response");
        if r.canceled {
            break r;
        }
    };
    assert_eq!(canceled.compact_revision, bumped, "{canceled:?}");
    c.shutdown().await;
}
