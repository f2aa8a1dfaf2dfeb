//! What a client is told about a request a follower forwarded to the leader: the leader's
//! errors arrive as data (the same error through a follower as from the leader), and a write
//! whose answer is lost or cannot be read is UNKNOWN — never a definite failure, since the
//! leader may have applied it.

use std::time::Duration;

use kvset_proto::etcdserverpb as epb;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd::Raw;

/// Issue 24, item 6: a DeleteRange with `prev_kv` whose answer exceeded the follower's decode
/// limit was applied on the leader, yet the follower answered OUT_OF_RANGE and the etcd API
/// called it "required revision has been compacted".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_write_whose_answer_cannot_be_read_is_unknown_not_failed() {
    let c = Cluster::start_with(3, |cfg| cfg.limits.forward_response_max_bytes = 64 << 10).await;
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let mut at_leader = Raw::connect(&c.endpoint(leader)).await;
    let mut at_follower = Raw::connect(&c.endpoint(follower)).await;
    for i in 0..20 {
        let put = epb::PutRequest {
            key: format!("big/{i:02}").into(),
            value: vec![b'x'; 8 << 10],
            ..Default::default()
        };
        at_leader.kv.put(put).await.unwrap();
    }
    // 160 KiB of previous values: more than the follower reads back from the leader.
    let delete =
        epb::DeleteRangeRequest { key: b"big/".to_vec(), range_end: b"big0".to_vec(), prev_kv: true };
    let outcome = at_follower.kv.delete_range(delete).await;
    let status = outcome.expect_err("the answer is over the follower's limit");
    // etcd's word for an outcome it cannot tell (ErrTimeoutDueToConnectionLost): its clients
    // treat it as unknown, not as a failure.
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "etcdserver: request timed out, possibly due to connection lost");
    // It did apply.
    let left = at_leader
        .kv
        .range(epb::RangeRequest {
            key: b"big/".to_vec(),
            range_end: b"big0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(left.count, 0, "the delete applied");
    // The same delete without prev_kv answers normally through the follower.
    let small =
        epb::DeleteRangeRequest { key: b"big/".to_vec(), range_end: b"big0".to_vec(), prev_kv: false };
    assert_eq!(at_follower.kv.delete_range(small).await.unwrap().into_inner().deleted, 0);
    c.shutdown().await;
}

/// Errors travel as data across the hop: each kind the leader answers reaches the client the
/// same through a follower as from the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leaders_errors_arrive_the_same_through_a_follower() {
    let c = Cluster::start(3).await;
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let mut at_leader = Raw::connect(&c.endpoint(leader)).await;
    let mut at_follower = Raw::connect(&c.endpoint(follower)).await;
    at_leader
        .kv
        .put(epb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    at_leader.kv.compact(epb::CompactionRequest { revision: 2, physical: true }).await.unwrap();
    let outcome = |r: Result<tonic::Response<()>, tonic::Status>| match r {
        Ok(_) => "ok".to_string(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    };
    macro_rules! both {
        ($what:expr, |$c:ident| $call:expr) => {{
            let $c = &mut at_leader;
            let l = outcome($call.await.map(|_| tonic::Response::new(())));
            let $c = &mut at_follower;
            let f = outcome($call.await.map(|_| tonic::Response::new(())));
            assert_eq!(l, f, "{}", $what);
            assert_ne!(l, "ok", "{}", $what);
        }};
    }
    both!("lease not found (NotFound)", |c| c.lease.lease_revoke(epb::LeaseRevokeRequest { id: 4242 }));
    both!("a put with an unknown lease (NotFound)", |c| c.kv.put(epb::PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        lease: 4242,
        ..Default::default()
    }));
    both!("ignore_value on a missing key (InvalidArgument)", |c| c.kv.put(epb::PutRequest {
        key: b"missing".to_vec(),
        ignore_value: true,
        ..Default::default()
    }));
    both!("compacted (OutOfRange)", |c| c
        .kv
        .compact(epb::CompactionRequest { revision: 1, physical: false }));
    both!("a future revision (OutOfRange)", |c| c
        .kv
        .compact(epb::CompactionRequest { revision: 99, physical: false }));
    both!("lease exists (FailedPrecondition)", |c| async {
        let _ = c.lease.lease_grant(epb::LeaseGrantRequest { ttl: 60, id: 77 }).await;
        c.lease.lease_grant(epb::LeaseGrantRequest { ttl: 60, id: 77 }).await
    });
    both!("a range below the compact revision (OutOfRange)", |c| c.kv.range(epb::RangeRequest {
        key: b"k".to_vec(),
        revision: 1,
        ..Default::default()
    }));
    c.shutdown().await;
}

/// Issue 27, item 3: cluster administration reaches the leader the one way commands and reads
/// do, its peer port, with its errors as data: the same answers through a follower as from the
/// leader, and the leader's client port never sees the calls a follower passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_administration_reaches_the_leader_through_its_peer_port() {
    use kvset_proto::v1 as pb;
    use kvset_proto::v1::cluster_client::ClusterClient;
    let c = Cluster::start(3).await;
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let connect = |o: u32| ClusterClient::connect(format!("http://{}", c.endpoint(o)));
    let mut at_leader = connect(leader).await.unwrap();
    let mut at_follower = connect(follower).await.unwrap();
    let leader_id = c.node_ids()[leader as usize];

    let view = |r: pb::MemberListResponse| {
        (
            r.cluster_id,
            r.leader_id,
            r.members.into_iter().map(|m| (m.node_id, m.name, m.voter)).collect::<Vec<_>>(),
        )
    };
    let from_leader = view(at_leader.member_list(pb::MemberListRequest {}).await.unwrap().into_inner());
    let through = view(at_follower.member_list(pb::MemberListRequest {}).await.unwrap().into_inner());
    assert_eq!(from_leader, through);
    assert_eq!(through.1, leader_id, "the member list is the leader's");

    let outcome = |r: Result<tonic::Response<pb::PromoteResponse>, tonic::Status>| match r {
        Ok(_) => "ok".to_string(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    };
    let promote = || pb::PromoteRequest { node_id: 4242 };
    let l = outcome(at_leader.promote(promote()).await);
    let f = outcome(at_follower.promote(promote()).await);
    assert_eq!(l, f);
    assert!(l.starts_with("FailedPrecondition: node 4242 is not a learner"), "{l}");
    let remove = |r: Result<tonic::Response<pb::RemoveResponse>, tonic::Status>| {
        r.map(|_| ()).map_err(|s| (s.code(), s.message().to_string()))
    };
    assert_eq!(
        remove(at_leader.remove(pb::RemoveRequest { node_id: 4242 }).await),
        remove(at_follower.remove(pb::RemoveRequest { node_id: 4242 }).await),
    );

    // Passed on through the follower, the calls reach the leader's peer port, not its client
    // port: the leader counted exactly the ones sent to it directly.
    let scrape = kvset_tests::http_get(&c.ops_endpoint(leader), "/metrics").await.unwrap();
    let count = |method: &str| {
        scrape
            .lines()
            .filter(|l| {
                l.starts_with("kvset_grpc_requests_total{") && l.contains(&format!("method=\"{method}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!((count("MemberList"), count("Promote"), count("Remove")), (1.0, 1.0, 1.0), "{scrape}");

    // A leader transfer asked of a follower hands leadership to the voter it names.
    let target = (0..3).find(|o| *o != leader && *o != follower).unwrap();
    let target_id = c.node_ids()[target as usize];
    let moved = at_follower
        .transfer_leader(pb::TransferLeaderRequest { node_id: target_id })
        .await
        .expect("the transfer through a follower")
        .into_inner();
    assert_eq!(moved.leader_id, target_id);
    assert_eq!(c.wait_leader(Duration::from_secs(30)).await, target);
    c.shutdown().await;
}
