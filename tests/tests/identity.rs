//! StatefulSet identity and self-managing membership: bootstrap, restarts, volume loss,
//! ordered scaling, foreign volumes, and the Kubernetes replicas source. Each member's volume
//! is a directory; the test plays the StatefulSet controller (it starts and stops ordinals).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::WatchReceiver;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use kvset_tests::k8s_stub::K8sStub;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tracing::info;

const T: Duration = Duration::from_secs(40);

/// Voter node ids in the leader's membership.
fn voters(c: &Cluster) -> Option<BTreeSet<u64>> {
    let leader = c.leader()?;
    Some(c.node(leader).member().raft_metrics().membership_config.membership().voter_ids().collect())
}

/// Every node id (voters and learners) in the leader's membership.
fn members(c: &Cluster) -> Option<BTreeSet<u64>> {
    let leader = c.leader()?;
    Some(
        c.node(leader)
            .member()
            .raft_metrics()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect(),
    )
}

fn cluster_ids(c: &Cluster) -> BTreeSet<String> {
    c.running()
        .iter()
        .map(|o| c.node(*o).member().cluster_id().map(|c| c.to_string()).unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_cluster_bootstraps_itself_whatever_the_start_order() {
    let seed: u64 = rand::random();
    println!("start order seed {seed}");
    let mut order = vec![0u32, 1, 2];
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut c = Cluster::new(3, |_| {}).await;
    info!("--- start ordinals in order {order:?}, no explicit initialisation");
    for o in &order {
        c.start_node(*o).await;
    }
    c.wait_voters(3, T).await;
    let ids = cluster_ids(&c);
    assert_eq!(ids.len(), 1, "one cluster: {ids:?}");
    assert_eq!(ids.iter().next().unwrap().len(), 32);
    let voter_ids = voters(&c).unwrap();
    let node_ids: BTreeSet<u64> = c.node_ids().into_iter().collect();
    assert_eq!(voter_ids, node_ids, "the voters are exactly the three volumes' node ids");
    c.client().put("k", "v").await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_keep_node_ids_and_the_cluster() {
    let mut c = Cluster::start(3).await;
    let before: Vec<u64> = (0..3).map(|o| c.node(o).node_id()).collect();
    let cluster = cluster_ids(&c);
    for o in 0..3 {
        info!("--- restart kvset-{o} with its volume");
        c.stop(o).await;
        c.start_node(o).await;
        c.wait_voters(3, T).await;
    }
    let after: Vec<u64> = (0..3).map(|o| c.node(o).node_id()).collect();
    assert_eq!(before, after, "same volume, same node id");
    assert_eq!(cluster_ids(&c), cluster);
    assert_eq!(voters(&c).unwrap(), before.iter().copied().collect::<BTreeSet<_>>());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_its_volume_is_replaced_under_a_new_id() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    for i in 0..20 {
        client.put(format!("before/{i}"), "x").await.unwrap();
    }
    let old = c.node(0).node_id();
    let cluster = cluster_ids(&c);
    let old_volume = tempfile::tempdir().unwrap();
    info!("--- kvset-0 loses its volume while 1 and 2 live");
    c.stop(0).await;
    copy_dir(&c.data_dir(0), old_volume.path());
    c.wipe(0);
    c.start_node(0).await;
    let new = c.node(0).node_id();
    assert_ne!(new, old, "an empty volume mints a new node id");
    let expected: BTreeSet<u64> = [new, c.node(1).node_id(), c.node(2).node_id()].into();
    eventually("the new id replaced the old one among the voters", T, || async {
        (voters(&c)? == expected && members(&c)? == expected).then_some(())
    })
    .await;
    assert_eq!(cluster_ids(&c), cluster, "it joined the existing cluster: no second cluster");
    c.wait_converged(T).await;
    let kv = c.client_for(0).get("before/19").await.unwrap().unwrap();
    assert_eq!(kv.value, b"x");

    info!("--- the old incarnation comes back with its old volume: refused, with a clear message");
    c.stop(0).await;
    let new_volume = tempfile::tempdir().unwrap();
    copy_dir(&c.data_dir(0), new_volume.path());
    c.wipe(0);
    copy_dir(old_volume.path(), &c.data_dir(0));
    c.start_node(0).await;
    assert_eq!(c.node(0).node_id(), old);
    let message = eventually("the old incarnation says it was replaced", T, || async {
        let status = kvset_server::service::cluster::status(c.node(0).member()).reconciler;
        status.contains("no longer a member").then_some(status)
    })
    .await;
    println!("old incarnation: {message}");
    assert!(!members(&c).unwrap().contains(&old), "the old id never comes back");
    c.client().put("after", "1").await.unwrap();
    assert!(c.leader() != Some(0), "the old incarnation cannot lead");

    info!("--- put the replacement back");
    c.stop(0).await;
    c.wipe(0);
    copy_dir(new_volume.path(), &c.data_dir(0));
    c.start_node(0).await;
    c.wait_voters(3, T).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_from_a_non_member_holding_raft_state_is_refused_and_changes_nothing() {
    use kvset_proto::v1::raft_client::RaftClient;
    use kvset_proto::v1::JoinRequest;

    let c = Cluster::start(3).await;
    c.wait_voters(3, T).await;
    let before = members(&c).unwrap();
    let cluster = cluster_ids(&c).into_iter().next().unwrap();
    for ordinal in 0..3 {
        info!("--- a removed incarnation (log up to 12) asks kvset-{ordinal} to join: refused");
        let peer = format!("http://{}", c.node(ordinal).member().me().peer_addr);
        let channel = tonic::transport::Endpoint::from_shared(peer).unwrap().connect().await.unwrap();
        let err = RaftClient::new(channel)
            .join(JoinRequest {
                cluster_id: cluster.clone(),
                node_id: 42,
                ordinal: 0,
                name: "kvset-0".into(),
                peer_addr: "127.0.0.1:1".into(),
                client_addr: "127.0.0.1:1".into(),
                last_log_index: 12,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("cannot rejoin under this id"), "{}", err.message());
    }
    assert_eq!(members(&c).unwrap(), before, "the configuration is unchanged");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_ordinal_zero_with_its_peers_down_waits_instead_of_bootstrapping() {
    let mut c = Cluster::start(3).await;
    let cluster = cluster_ids(&c);
    let old = c.node(0).node_id();
    info!("--- everyone down; kvset-0 loses its volume and starts alone");
    for o in 0..3 {
        c.stop(o).await;
    }
    c.wipe(0);
    c.start_node(0).await;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let s = c.node(0).member();
        assert!(s.cluster_id().is_none(), "kvset-0 must not mint a cluster while its peers are unreachable");
        assert!(s.raft_metrics().membership_config.membership().nodes().next().is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = kvset_server::service::cluster::status(c.node(0).member()).reconciler;
    assert!(status.contains("waiting to bootstrap"), "it says what it waits for: {status}");
    println!("kvset-0 alone: {status}");

    info!("--- the peers come back: kvset-0 joins their cluster as a new member");
    c.start_node(1).await;
    c.start_node(2).await;
    let new = c.node(0).node_id();
    assert_ne!(new, old);
    let expected: BTreeSet<u64> = [new, c.node(1).node_id(), c.node(2).node_id()].into();
    eventually("kvset-0 replaced its old incarnation", T, || async {
        (voters(&c)? == expected).then_some(())
    })
    .await;
    assert_eq!(cluster_ids(&c), cluster);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_three_to_five_and_back_keeps_every_write_and_follows_ordinal_order() {
    let mut c = Cluster::start(3).await;
    let ordinal_of = {
        let ids: Vec<(u64, u32)> = (0..3).map(|o| (c.node(o).node_id(), o)).collect();
        Arc::new(Mutex::new(ids))
    };

    info!("--- a writer runs throughout");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let seq = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, acked, seq) = (c.client(), stop.clone(), acked.clone(), seq.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = seq.fetch_add(1, Ordering::Relaxed);
                if client.put(format!("w/{i}"), format!("{i}")).await.is_ok() {
                    acked.lock().unwrap().push(i);
                }
            }
        })
    };

    info!("--- observe the order of membership changes");
    let events = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let observing = Arc::new(AtomicBool::new(true));
    let observer = {
        let (events, observing) = (events.clone(), observing.clone());
        let snapshot = c_membership_probe(&c);
        tokio::spawn(async move {
            let mut last: BTreeSet<u64> = BTreeSet::new();
            while observing.load(Ordering::Relaxed) {
                if let Some(now) = snapshot() {
                    for added in now.difference(&last) {
                        events.lock().unwrap().push(("add".into(), *added));
                    }
                    for removed in last.difference(&now) {
                        events.lock().unwrap().push(("remove".into(), *removed));
                    }
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    info!("--- scale to 5: the test starts kvset-3 and kvset-4 like a StatefulSet would");
    c.client().set_replicas(5).await.unwrap();
    c.start_node(3).await;
    c.start_node(4).await;
    ordinal_of.lock().unwrap().extend([(c.node(3).node_id(), 3), (c.node(4).node_id(), 4)]);
    c.wait_voters(5, T).await;

    info!("--- scale to 3: kvset-4 then kvset-3 leave, then their pods stop");
    c.client().set_replicas(3).await.unwrap();
    c.wait_voters(3, T).await;
    c.stop(4).await;
    c.stop(3).await;
    observing.store(false, Ordering::Relaxed);
    observer.await.unwrap();

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "the writer made progress during scaling ({} writes)", acked.len());
    info!("--- every acknowledged write is there");
    let client = c.client();
    for i in &acked {
        let kv = client.get(format!("w/{i}")).await.unwrap();
        assert_eq!(kv.map(|kv| kv.value), Some(i.to_string().into_bytes()), "acknowledged write w/{i} lost");
    }

    let ords = ordinal_of.lock().unwrap().clone();
    let ord = |id: u64| ords.iter().find(|(n, _)| *n == id).map(|(_, o)| *o).unwrap_or(99);
    let changes: Vec<(String, u32)> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, id)| ord(*id) >= 3)
        .map(|(k, id)| (k.clone(), ord(*id)))
        .collect();
    println!("voter changes: {changes:?}");
    assert_eq!(
        changes,
        vec![("add".into(), 3), ("add".into(), 4), ("remove".into(), 4), ("remove".into(), 3)],
        "promotions lowest ordinal first, removals highest first, one at a time"
    );
    c.shutdown().await;
}

/// Returns a closure reading the leader's voter set (through the cluster's shared handles).
fn c_membership_probe(c: &Cluster) -> impl Fn() -> Option<BTreeSet<u64>> + Send + 'static {
    let handles: Vec<_> = c.running().iter().map(|o| c.node(*o).member().clone()).collect();
    let extra = Arc::new(Mutex::new(handles));
    move || {
        let handles = extra.lock().unwrap();
        let leader = handles
            .iter()
            .find(|h| h.raft().metrics().borrow_watched().state == openraft::ServerState::Leader)?;
        Some(leader.raft_metrics().membership_config.membership().voter_ids().collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_of_another_cluster_is_refused() {
    info!("--- two independent single-member clusters");
    let mut a = Cluster::start(1).await;
    let mut b = Cluster::start(1).await;
    let a_id = a.node(0).member().cluster_id().unwrap();
    let b_id = b.node(0).member().cluster_id().unwrap();
    assert_ne!(a_id, b_id);
    a.stop(0).await;
    b.stop(0).await;

    info!("--- a member configured for cluster B refuses A's volume at start, naming the file");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&a.data_dir(0), dir.path());
    let mut config = b.config(0);
    config.data_dir = dir.path().to_path_buf();
    config.cluster_id = b_id.to_string();
    let listeners = kvset_server::Listeners {
        client: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        peer: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ops: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    };
    let err = kvset_server::Node::start(config, listeners, std::future::pending(), Default::default())
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    println!("foreign volume: {err}");
    assert!(
        err.contains("kvset-volume.json")
            && err.contains(&a_id.to_string())
            && err.contains(&b_id.to_string()),
        "{err}"
    );

    info!("--- a volume of another ordinal is refused too");
    b.wipe(0);
    copy_dir(&a.data_dir(0), &b.data_dir(0));
    let mut c = Cluster::new(2, |_| {}).await;
    copy_dir(&a.data_dir(0), &c.data_dir(1));
    let err = c.try_start_node(1).await.map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("ordinal 0") && err.contains("ordinal 1"), "{err}");
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_of_another_cluster_does_not_join_and_is_not_listened_to() {
    let mut c = Cluster::start(3).await;
    let mine = c.node(0).member().cluster_id().unwrap();
    info!("--- kvset-2's volume is replaced by the volume of a member of another cluster");
    let mut other = Cluster::new(3, |_| {}).await;
    other.start_node(0).await;
    other.start_node(1).await;
    other.start_node(2).await;
    other.wait_voters(3, T).await;
    let theirs = other.node(2).member().cluster_id().unwrap();
    other.stop(2).await;
    c.stop(2).await;
    c.wipe(2);
    copy_dir(&other.data_dir(2), &c.data_dir(2));
    c.start_node(2).await;
    let foreign_id = c.node(2).node_id();
    info!("--- it keeps its cluster id, and our cluster keeps going without it");
    // Through kvset-0 and kvset-1 only: kvset-2 now answers for the other cluster. The first
    // write may wait for an election (kvset-2 may have led), so it is retried until it lands.
    let ours = kvset_client::Client::new([c.endpoint(0), c.endpoint(1)], Default::default()).unwrap();
    eventually("a write to our cluster after the swap", T, || async {
        ours.put("still", "works").await.ok()
    })
    .await;
    assert_eq!(c.node(2).member().cluster_id(), Some(theirs));
    assert_ne!(theirs, mine);
    assert!(!members(&c).unwrap().contains(&foreign_id));
    info!("--- the leader keeps being refused by the foreign member: its refusals keep growing");
    let leader = c.wait_leader(T).await;
    assert_ne!(leader, 2, "the foreign member cannot lead our cluster");
    let refusals = |c: &Cluster| unreachable_appends(&c.node(leader).member().metrics().render());
    let before = refusals(&c);
    eventually("more refused appends to the foreign member", T, || async {
        (refusals(&c) > before).then_some(())
    })
    .await;
    assert_eq!(c.node(2).member().cluster_id(), Some(theirs), "it never adopted our cluster");
    assert!(!members(&c).unwrap().contains(&foreign_id));
    c.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kubernetes_replicas_source_drives_scaling() {
    let stub = K8sStub::start("test", "kvset", 3).await;
    let url = stub.url.clone();
    let mut c = Cluster::start_with(3, move |cfg| {
        cfg.replicas_source = kvset_server::config::ReplicasSource::Kubernetes;
        cfg.kubernetes_api_url = url.clone();
        cfg.leave_timeout_ms = 20_000;
    })
    .await;
    eventually("every member read spec.replicas = 3", T, || async {
        c.running()
            .iter()
            .all(|o| kvset_server::service::cluster::status(c.node(*o).member()).desired_replicas == 3)
            .then_some(())
    })
    .await;

    info!("--- SetReplicas is refused: the StatefulSet is the source of truth");
    let err = c.client().set_replicas(4).await.unwrap_err();
    assert!(matches!(err, kvset_client::Error::FailedPrecondition(_)), "{err:?}");

    info!("--- kubectl scale --replicas=4: the watch delivers it, kvset-3 starts and is promoted");
    stub.scale(4);
    eventually("the members saw spec.replicas = 4", T, || async {
        (kvset_server::service::cluster::status(c.node(0).member()).desired_replicas == 4).then_some(())
    })
    .await;
    c.start_node(3).await;
    c.wait_voters(4, T).await;

    info!("--- kubectl scale --replicas=3: kvset-3 gets SIGTERM and stays until it is removed");
    stub.scale(3);
    c.stop(3).await; // returns once kvset-3 has shut down, i.e. after its removal
    let v = voters(&c).unwrap();
    assert_eq!(v.len(), 3, "kvset-3 was removed before it stopped: {v:?}");
    c.client().put("after-scale-down", "1").await.unwrap();

    info!(
        "--- the API calls are exactly the ones the Role allows: get, and list and watch of one StatefulSet"
    );
    let requests = stub.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        let ok = r.starts_with("GET /apis/apps/v1/namespaces/test/statefulsets/kvset")
            || (r.starts_with("GET /apis/apps/v1/namespaces/test/statefulsets?")
                && r.contains("fieldSelector=metadata.name%3Dkvset"));
        assert!(ok, "unexpected API request {r}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_five_to_one_at_once_never_loses_the_quorum() {
    let stub = K8sStub::start("test", "kvset", 5).await;
    let url = stub.url.clone();
    let mut c = Cluster::start_with(5, move |cfg| {
        cfg.replicas_source = kvset_server::config::ReplicasSource::Kubernetes;
        cfg.kubernetes_api_url = url.clone();
    })
    .await;
    for i in 0..10 {
        c.client().put(format!("k{i}"), "v").await.unwrap();
    }
    info!("--- kubectl scale --replicas=1: four pods get SIGTERM at the same moment");
    stub.scale(1);
    let started = Instant::now();
    c.stop_many(&[1, 2, 3, 4]).await;
    println!("four members left one at a time in {:?}", started.elapsed());
    let v = voters(&c).expect("kvset-0 leads alone");
    assert_eq!(v, BTreeSet::from([c.node(0).node_id()]), "each departing member waited for its removal");
    let client = c.client();
    client.put("after", "1").await.unwrap();
    for i in 0..10 {
        assert!(client.get(format!("k{i}")).await.unwrap().is_some());
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigterm_alone_never_removes_a_member() {
    let mut c = Cluster::start(3).await;
    let before = voters(&c).unwrap();
    c.stop(2).await;
    c.client().put("x", "1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // an observation window
    assert_eq!(voters(&c).unwrap(), before, "kvset-2 is down but still a voter");
    c.start_node(2).await;
    c.wait_voters(3, T).await;
    c.shutdown().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_peers_are_awaited_with_a_message_naming_them() {
    // Pods start before their peers (and their DNS records) exist: kvset-0 keeps probing and
    // says what it waits for. (Closed loopback ports here; the Docker chaos suite sees real
    // not-yet-resolvable names.)
    let mut c = Cluster::new(3, |cfg| {
        cfg.peer_addrs = vec![cfg.peer_addrs[0].clone(), "127.0.0.1:1".into(), "127.0.0.1:2".into()];
    })
    .await;
    c.start_node(0).await;
    let status = eventually("kvset-0 names the peers it waits for", T, || async {
        let s = kvset_server::service::cluster::status(c.node(0).member()).reconciler;
        (s.contains("kvset-1 (127.0.0.1:1)") && s.contains("waiting to bootstrap")).then_some(s)
    })
    .await;
    println!("{status}");
    assert!(c.node(0).member().cluster_id().is_none());
    c.shutdown().await;
}

/// The count of AppendEntries RPCs a member sent that were refused or unreachable.
/// Appends refused as unreachable, sent alone (heartbeats) or in a replication stream.
fn unreachable_appends(metrics: &str) -> u64 {
    ["append_entries", "stream_append"]
        .iter()
        .filter_map(|rpc| {
            let series = format!("kvset_peer_rpcs_total{{rpc=\"{rpc}\",result=\"unreachable\"}}");
            metrics.lines().find(|l| l.starts_with(&series))?.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}
