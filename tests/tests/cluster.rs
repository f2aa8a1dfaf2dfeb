//! Cluster behaviour, in-process on loopback: bring-up, routing, linearizable reads, leader
//! loss, partitions, snapshots to lagging members, full restarts, limits.

use std::time::Duration;
use std::time::Instant;

use kvset_client::pb;
use kvset_client::Error;
use kvset_storage::WatchReceiver;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use tracing::info;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_come_up_and_agree() {
    let c = Cluster::start(3).await;
    info!("--- every member reports the same cluster, leader and three voters");
    let client = c.client();
    let mut cluster_ids = Vec::new();
    let mut leaders = Vec::new();
    for o in 0..3 {
        let s = client.status_of(&c.endpoint(o)).await.unwrap();
        assert_eq!(s.ordinal, o);
        assert_eq!(s.name, format!("kvset-{o}"));
        assert_eq!(s.desired_replicas, 3);
        cluster_ids.push(s.cluster_id);
        leaders.push(s.leader_id);
    }
    assert!(cluster_ids.iter().all(|id| id.len() == 32 && *id == cluster_ids[0]), "{cluster_ids:?}");
    assert!(leaders.iter().all(|l| *l != 0 && *l == leaders[0]), "{leaders:?}");
    let members = client.member_list().await.unwrap();
    assert_eq!(members.members.len(), 3);
    assert!(members.members.iter().all(|m| m.voter));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_any_member_are_read_linearizably_from_every_member() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    info!("--- a write sent to each member, leader and followers alike");
    for writer in 0..3 {
        let key = format!("via-{writer}");
        let resp = c.client_for(writer).put(key.clone(), format!("value-{writer}")).await.unwrap();
        let header = resp.header.unwrap();
        assert!(header.revision > 1);
        // As in etcd, the header names the member that answered; a follower had the leader
        // run the write.
        assert_eq!(header.member_id, c.node(writer).node_id(), "the member asked answers");
        info!("--- read back linearizably from every member, right after the write");
        for reader in 0..3 {
            let kv = c.client_for(reader).get(key.clone()).await.unwrap().expect("present");
            assert_eq!(kv.value, format!("value-{writer}").into_bytes(), "read via kvset-{reader}");
        }
    }

    info!("--- compare-and-swap through a follower");
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let f = c.client_for(follower);
    assert!(f.compare_and_swap("cas", None, "one").await.unwrap().succeeded);
    assert!(!f.compare_and_swap("cas", None, "two").await.unwrap().succeeded);
    assert!(f.compare_and_swap("cas", Some(b"one".as_slice()), "two").await.unwrap().succeeded);
    assert_eq!(f.get("cas").await.unwrap().unwrap().value, b"two");

    info!("--- range with pagination and delete by prefix through a follower");
    for i in 0..25 {
        f.put(format!("page/{i:02}"), "x").await.unwrap();
    }
    let mut seen = Vec::new();
    let mut next = Vec::new();
    loop {
        let r = f
            .range(pb::RangeRequest {
                key: b"page/".to_vec(),
                prefix: true,
                limit: 10,
                page_key: next.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.count, 25 - seen.len() as i64, "count covers the rest of the range");
        seen.extend(r.kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        if !r.more {
            break;
        }
        next = r.next_key;
    }
    assert_eq!(seen, (0..25).map(|i| format!("page/{i:02}")).collect::<Vec<_>>());
    let d = f
        .delete(pb::DeleteRequest { key: b"page/".to_vec(), prefix: true, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(d.deleted, 25);

    info!("--- a serializable read on a follower eventually sees the write");
    c.client().put("late", "1").await.unwrap();
    eventually("the follower applied the write", T, || async {
        let r = f
            .get_request(pb::GetRequest {
                key: b"late".to_vec(),
                consistency: pb::ReadConsistency::Serializable as i32,
                revision: 0,
            })
            .await
            .ok()?;
        r.kv.map(|_| ())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_leader_elects_another_and_writes_resume() {
    let mut c = Cluster::start(3).await;
    let old = c.wait_leader(T).await;
    c.client().put("before", "1").await.unwrap();
    info!("--- stop the leader kvset-{old}");
    let stopped = Instant::now();
    c.stop(old).await;
    let survivors: Vec<u32> = c.running();
    let client = kvset_client::Client::new(
        survivors.iter().map(|o| c.endpoint(*o)),
        kvset_client::ClientOptions { timeout: Duration::from_secs(30), ..Default::default() },
    )
    .unwrap();
    client.put("after", "2").await.unwrap();
    let outage = stopped.elapsed();
    let new = c.wait_leader(T).await;
    assert_ne!(new, old);
    println!("leader loss: writes resumed {outage:?} after the leader stopped (election timeout 1-2 s)");
    assert_eq!(client.get("before").await.unwrap().unwrap().value, b"1");
    assert_eq!(client.get("after").await.unwrap().unwrap().value, b"2");

    info!("--- the old leader comes back as a follower and catches up");
    c.start_node(old).await;
    c.wait_converged(T).await;
    let r = c
        .client_for(old)
        .get_request(pb::GetRequest {
            key: b"after".to_vec(),
            consistency: pb::ReadConsistency::Serializable as i32,
            revision: 0,
        })
        .await
        .unwrap();
    assert_eq!(r.kv.unwrap().value, b"2");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_follower_does_not_stop_the_majority_and_catches_up() {
    let c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    info!("--- cut kvset-{follower} off");
    c.isolate(follower);
    let majority = kvset_client::Client::new(
        (0..3).filter(|o| *o != follower).map(|o| c.endpoint(o)),
        Default::default(),
    )
    .unwrap();
    for i in 0..50 {
        majority.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    info!("--- the isolated member did not get them (its own state is stale)");
    let serializable = |key: &str| pb::GetRequest {
        key: key.as_bytes().to_vec(),
        consistency: pb::ReadConsistency::Serializable as i32,
        revision: 0,
    };
    let isolated = c.client_for(follower);
    assert!(isolated.get_request(serializable("k49")).await.unwrap().kv.is_none());
    // Linearizable reads through it are still correct: it forwards them to the leader over the
    // client port, which this fault injection (peer links only) leaves intact.
    assert_eq!(isolated.get("k49").await.unwrap().unwrap().value, b"v49");

    info!("--- heal; it catches up");
    c.heal();
    c.wait_converged(T).await;
    for i in [0, 25, 49] {
        let kv = c.client_for(follower).get(format!("k{i}")).await.unwrap().unwrap();
        assert_eq!(kv.value, format!("v{i}").into_bytes());
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_member_catches_up_from_a_snapshot_after_the_log_was_purged() {
    let mut c = Cluster::start_with(3, |cfg| {
        cfg.raft.snapshot_every_entries = 40;
        cfg.raft.keep_entries_after_snapshot = 0;
        cfg.raft.snapshot_chunk_bytes = 4096;
    })
    .await;
    let leader = c.wait_leader(T).await;
    let lagging = (0..3).find(|o| *o != leader).unwrap();
    info!("--- stop kvset-{lagging}, write past several snapshots");
    c.stop(lagging).await;
    let client = c.client();
    for i in 0..200 {
        client.put(format!("snap/{i:03}"), vec![b'x'; 100]).await.unwrap();
    }
    // The purge follows the snapshot build, in the background.
    eventually("the leader purges its log behind a snapshot", T, || async {
        let purged = c.node(leader).member().raft_metrics().purged.map_or(0, |p| p.index);
        (purged > 100).then_some(())
    })
    .await;

    info!("--- restart it: the entries it lacks are gone, so it must install a snapshot");
    c.start_node(lagging).await;
    c.wait_converged(T).await;
    let installed = eventually("a snapshot installed on the lagging member", T, || async {
        let text = c.node(lagging).member().metrics().render();
        text.lines()
            .find(|l| l.starts_with("kvset_snapshots_total{kind=\"installed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert!(installed >= 1.0);
    let f = c.client_for(lagging);
    let r = f
        .range(pb::RangeRequest {
            key: b"snap/".to_vec(),
            prefix: true,
            count_only: true,
            consistency: pb::ReadConsistency::Serializable as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.count, 200);
    let digests: Vec<_> =
        c.running().iter().map(|o| c.node(*o).member().reader().digest().unwrap()).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "identical state everywhere: {digests:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_restart_keeps_every_acknowledged_write_and_identity() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    let mut acknowledged = Vec::new();
    for i in 0..100 {
        client.put(format!("durable/{i}"), format!("v{i}")).await.unwrap();
        acknowledged.push(i);
    }
    let ids: Vec<u64> = (0..3).map(|o| c.node(o).node_id()).collect();
    let cluster_id = c.node(0).member().cluster_id();
    info!("--- stop all three, then start all three with their volumes");
    for o in 0..3 {
        c.stop(o).await;
    }
    for o in [2, 0, 1] {
        c.start_node(o).await;
    }
    c.wait_voters(3, T).await;
    let after: Vec<u64> = (0..3).map(|o| c.node(o).node_id()).collect();
    assert_eq!(ids, after, "same volumes, same node ids");
    assert_eq!(c.node(1).member().cluster_id(), cluster_id);
    let client = c.client();
    for i in acknowledged {
        assert_eq!(
            client.get(format!("durable/{i}")).await.unwrap().unwrap().value,
            format!("v{i}").into_bytes()
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_a_limit_are_invalid_and_change_nothing() {
    let c = Cluster::start_with(3, |cfg| {
        cfg.limits.txn_max_ops = 4;
        cfg.limits.range_max_keys = 100;
    })
    .await;
    let leader = c.wait_leader(T).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let client = c.client_for(follower);
    client.put("exists", "1").await.unwrap();
    let revision = |c: &Cluster| c.node(leader).member().reader().applied().revision;
    let before = revision(&c);

    let invalid = |e: Error, needle: &str| match e {
        Error::InvalidArgument(m) => assert!(m.contains(needle), "{m:?} should name {needle}"),
        other => panic!("expected INVALID_ARGUMENT naming {needle}, got {other:?}"),
    };
    invalid(client.put("", "v").await.unwrap_err(), "key is empty");
    invalid(client.put(vec![b'k'; 4097], "v").await.unwrap_err(), "limits.key_max_bytes");
    invalid(client.put("big", vec![0u8; (1 << 20) + 1]).await.unwrap_err(), "limits.value_max_bytes");
    invalid(client.get(vec![b'k'; 5000]).await.unwrap_err(), "limits.key_max_bytes");
    invalid(
        client
            .put_request(pb::PutRequest { key: b"leased".to_vec(), value: vec![], lease: -7, prev_kv: false })
            .await
            .unwrap_err(),
        "lease ids are positive",
    );
    invalid(
        client
            .range(pb::RangeRequest { key: b"a".to_vec(), prefix: true, limit: 101, ..Default::default() })
            .await
            .unwrap_err(),
        "limits.range_max_keys",
    );
    let mut txn = kvset_client::cas_request(b"exists".to_vec(), Some(b"1"), b"2".to_vec());
    for i in 0..3 {
        txn.success.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: format!("t{i}").into_bytes(),
                ..Default::default()
            })),
        });
    }
    invalid(client.txn(txn).await.unwrap_err(), "limits.txn_max_ops");

    info!("--- nothing changed");
    assert_eq!(revision(&c), before);
    assert_eq!(client.get("exists").await.unwrap().unwrap().value, b"1");
    for key in ["", "big", "leased", "t0"] {
        if !key.is_empty() {
            assert!(client.get(key).await.unwrap().is_none(), "{key} must not exist");
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_larger_than_the_request_limit_is_invalid() {
    let c = Cluster::start_with(1, |cfg| {
        cfg.limits.value_max_bytes = 1000;
        cfg.limits.key_max_bytes = 100;
        cfg.limits.request_max_bytes = 1200;
        cfg.batch.max_bytes = 1200;
    })
    .await;
    let client = c.client();
    let mut txn = pb::TxnRequest::default();
    for i in 0..3 {
        txn.success.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: format!("k{i}").into_bytes(),
                value: vec![0; 900],
                ..Default::default()
            })),
        });
    }
    match client.txn(txn).await.unwrap_err() {
        Error::InvalidArgument(m) => assert!(m.contains("limits.request_max_bytes"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(client.get("k0").await.unwrap().is_none());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_leader_is_unavailable_with_the_not_applied_marker() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    let others: Vec<u32> = (0..3).filter(|o| *o != leader).collect();
    info!("--- stop both followers: the lone leader loses its quorum");
    for o in &others {
        c.stop(*o).await;
    }
    let client = kvset_client::Client::new(
        [c.endpoint(leader)],
        kvset_client::ClientOptions { timeout: Duration::from_secs(4), ..Default::default() },
    )
    .unwrap();
    // A write cannot commit: never "ok". While the leader's last quorum contact is recent the
    // write waits for its deadline; after an election timeout it is refused at once.
    let err = client.put("stuck", "1").await.unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_) | Error::Unavailable { .. }), "{err:?}");
    // Once the leader has heard from no quorum for an election timeout, it refuses writes with
    // a clean UNAVAILABLE carrying the not-applied marker.
    let raw = eventually("the lone member answers UNAVAILABLE", T, || async {
        let mut kv = kvset_proto::v1::kv_client::KvClient::connect(format!("http://{}", c.endpoint(leader)))
            .await
            .ok()?;
        let status = kv
            .put(pb::PutRequest { key: b"x".to_vec(), value: b"1".to_vec(), ..Default::default() })
            .await
            .err()?;
        (status.code() == tonic::Code::Unavailable).then_some(status)
    })
    .await;
    assert_eq!(raw.metadata().get(kvset_proto::metadata::NOT_APPLIED).unwrap(), "true");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reflection_metrics_and_readiness_answer() {
    let c = Cluster::start(1).await;
    let endpoint = format!("http://{}", c.endpoint(0));
    info!("--- gRPC health: SERVING");
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "kvset.v1.Kv", "kvset.v1.Cluster"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    info!("--- reflection lists the services");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::once(req)).await.unwrap().into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
        list,
    )) = reply.message_response
    else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["kvset.v1.Kv", "kvset.v1.Cluster", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    info!("--- ops endpoints");
    c.client().put("m", "1").await.unwrap();
    let metrics = http_get(&c.ops_endpoint(0), "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for family in [
        "kvset_raft_term",
        "kvset_grpc_requests_total",
        "kvset_log_flush_seconds_bucket",
        "kvset_batch_commands",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    assert!(http_get(&c.ops_endpoint(0), "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(&c.ops_endpoint(0), "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(&c.ops_endpoint(0), "/nope").await.starts_with("HTTP/1.1 404"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_does_not_need_a_leader() {
    // One member of a three-member cluster, alone: it cannot bootstrap (it is waiting for its
    // peers) and has no leader, yet it is ready: a StatefulSet must be able to start it.
    let mut c = Cluster::new(3, |_| {}).await;
    c.start_node(1).await;
    assert!(c.leader().is_none());
    assert!(http_get(&c.ops_endpoint(1), "/readyz").await.starts_with("HTTP/1.1 200"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_and_finishes_quickly() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = acked.clone();
    let writer = tokio::spawn(async move {
        for i in 0..200 {
            if client.put(format!("d{i}"), format!("v{i}")).await.is_ok() {
                record.lock().unwrap().push(i);
            }
        }
    });
    eventually("writes are flowing", T, || async { (acked.lock().unwrap().len() >= 5).then_some(()) }).await;
    info!("--- stop the leader while writes flow: the shutdown drains and is quick");
    let started = Instant::now();
    let leader = c.wait_leader(T).await;
    c.stop(leader).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "graceful shutdown took {took:?}");
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 5);
    info!("--- every write acknowledged before, during and after the stop is readable");
    let client = c.client();
    for i in acked {
        let kv = client.get(format!("d{i}")).await.unwrap();
        assert_eq!(kv.map(|kv| kv.value), Some(format!("v{i}").into_bytes()), "acknowledged write d{i} lost");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_linearizable_reads_share_rounds_and_see_every_acknowledged_write() {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    const READERS: usize = 48;
    const READS_EACH: usize = 25;
    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    c.client().put("ctr", "0").await.unwrap();
    let before = read_index_totals(&c).await;

    info!("--- one writer counts up; {READERS} readers on every member check each read sees the last ack");
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, acked, stop) = (c.client(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                client.put("ctr", i.to_string()).await.unwrap();
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let mut readers = Vec::new();
    for r in 0..READERS {
        let (client, acked) = (c.client_for(r as u32 % 3), acked.clone());
        readers.push(tokio::spawn(async move {
            for _ in 0..READS_EACH {
                let floor = acked.load(Ordering::SeqCst);
                let kv = client.get("ctr").await.unwrap().expect("ctr exists");
                let seen: u64 = String::from_utf8(kv.value).unwrap().parse().unwrap();
                assert!(seen >= floor, "read {seen} after the write of {floor} was acknowledged");
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    let after = read_index_totals(&c).await;
    let (rounds, reads) = (after.0 - before.0, after.1 - before.1);
    info!("--- {reads} linearizable reads took {rounds} ReadIndex rounds");
    assert!(reads >= (READERS * READS_EACH) as f64, "every read went through a round: {reads}");
    assert!(rounds * 2.0 < reads, "concurrent reads share rounds: {rounds} rounds for {reads} reads");
    c.shutdown().await;
}

/// ReadIndex rounds and the reads they served, summed over every member (`/metrics`).
async fn read_index_totals(c: &Cluster) -> (f64, f64) {
    let mut totals = (0.0, 0.0);
    for o in 0..3 {
        let text = http_get(&c.ops_endpoint(o), "/metrics").await;
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        };
        totals.0 += value("kvset_read_index_reads_count");
        totals.1 += value("kvset_read_index_reads_sum");
    }
    totals
}

/// A minimal HTTP/1.1 GET over a raw socket (keeps an HTTP client out of the dependencies).
async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_membership_change_cut_short_by_a_fatal_raft_error_reports_an_unknown_outcome() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    info!("--- cut the leader off, then ask it to add a learner: the change is proposed, cannot commit");
    c.isolate(leader);
    let endpoint = format!("http://{}", c.endpoint(leader));
    let call = tokio::spawn(async move {
        let mut admin = kvset_proto::v1::cluster_client::ClusterClient::connect(endpoint).await.unwrap();
        admin
            .add_learner(pb::AddLearnerRequest {
                node_id: 4242,
                ordinal: 5,
                peer_addr: "127.0.0.1:1".into(),
                client_addr: "127.0.0.1:2".into(),
            })
            .await
    });
    let raft = c.node(leader).member().raft().clone();
    eventually("the change is in the leader's log", T, || async {
        let m = raft.metrics().borrow_watched().clone();
        m.membership_config.membership().get_node(&4242).is_some().then_some(())
    })
    .await;
    info!("--- Raft stops under the pending change (a fatal error): its outcome is unknown");
    raft.shutdown().await.unwrap();
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unknown, "{status:?}");
    assert!(status.metadata().get(kvset_proto::metadata::NOT_APPLIED).is_none(), "{status:?}");
    c.heal();
    c.abandon(leader).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_reads_past_the_waiting_limit_are_refused_at_once() {
    // One read may wait at a time: a read that arrives while another's ReadIndex round is in
    // flight is refused at once, with the limit named and marked not applied (retry).
    let c = Cluster::start_with(3, |cfg| cfg.limits.pending_reads_max = 1).await;
    let leader = c.wait_leader(T).await;
    c.wait_voters(3, T).await;
    c.client().put("k", "v").await.unwrap();
    let endpoint = format!("http://{}", c.endpoint(leader));
    let kv = kvset_proto::v1::kv_client::KvClient::connect(endpoint).await.unwrap();
    let get = pb::GetRequest {
        key: b"k".to_vec(),
        consistency: pb::ReadConsistency::Linearizable as i32,
        revision: 0,
    };
    let (mut served, mut refused) = (0, 0);
    for _ in 0..20 {
        let reads: Vec<_> = (0..24)
            .map(|_| {
                let (mut kv, get) = (kv.clone(), get.clone());
                tokio::spawn(async move { kv.get(get).await })
            })
            .collect();
        for read in reads {
            match read.await.unwrap() {
                Ok(r) => {
                    assert_eq!(r.into_inner().kv.unwrap().value, b"v");
                    served += 1;
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("limits.pending_reads_max = 1"), "{status:?}");
                    assert!(
                        status.metadata().get(kvset_proto::metadata::NOT_APPLIED).is_some(),
                        "{status:?}"
                    );
                    refused += 1;
                }
            }
        }
        if served > 0 && refused > 0 {
            break;
        }
    }
    info!(served, refused, "--- reads served and refused");
    assert!(served > 0 && refused > 0, "{served} served, {refused} refused: the bound never acted");
    c.shutdown().await;
}
