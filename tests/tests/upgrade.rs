//! A volume written by an older release opens unchanged and serves its data.
//!
//! `tests/fixtures/volume-0.1.tar.gz` is the volume of a one-member cluster written by the
//! last release on openraft 0.9 (`tests/fixtures/make-volume-0.1.sh`): 60 keys, 10 of them
//! overwritten, one deleted, a compaction at revision 20, a leased key, a snapshot at log index
//! 75 and five more writes in the log after it. Today's code must read the identity, the log,
//! the snapshot and the history as they are: same node and cluster ids, same keys, versions
//! and revisions, the compaction and the lease; and it must go on writing.

use std::time::Duration;

use kvset_client::Error;
use kvset_tests::cluster::Cluster;

const NODE_ID: u64 = 5707025419865895467;
const CLUSTER_ID: &str = "86a99c6c3b90ab0a53a963c354662c89";
const LEASE_ID: i64 = 1357194556683566474;
/// The store revision when the fixture was written: the initial revision 1, then one revision
/// per write (60 puts, 10 overwrites, 1 delete, the leased put, 5 puts after the snapshot = 77;
/// the compaction and the lease grant take none).
const REVISION: i64 = 78;

fn unpack_fixture(into: &std::path::Path) {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/volume-0.1.tar.gz");
    std::fs::create_dir_all(into).unwrap();
    let status = std::process::Command::new("tar")
        .args(["-xzf"])
        .arg(&fixture)
        .arg("-C")
        .arg(into)
        .arg("--strip-components=1")
        .status()
        .expect("tar runs");
    assert!(status.success(), "unpacking {}", fixture.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_written_by_the_openraft_0_9_release_opens_and_serves_its_data() {
    let mut c = Cluster::new(1, |_| {}).await;
    unpack_fixture(&c.data_dir(0));
    c.start_node(0).await;
    c.wait_voters(1, Duration::from_secs(30)).await;

    let status = c.client().status_of(&c.endpoint(0)).await.unwrap();
    assert_eq!(status.node_id, NODE_ID);
    assert_eq!(status.cluster_id, CLUSTER_ID);
    assert_eq!(status.revision, REVISION);

    let client = c.client();
    for i in 1..=60 {
        let key = format!("fx/key-{i:02}");
        let kv = client.get(key.clone()).await.unwrap();
        match i {
            1..=10 => {
                let kv = kv.unwrap_or_else(|| panic!("{key} is missing"));
                assert_eq!(kv.value, format!("v2-{i:02}").into_bytes(), "{key}");
                assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 1 + i, 61 + i), "{key}");
            }
            11..=59 => {
                let kv = kv.unwrap_or_else(|| panic!("{key} is missing"));
                assert_eq!(kv.value, format!("v1-{i:02}").into_bytes(), "{key}");
                assert_eq!((kv.version, kv.mod_revision), (1, 1 + i), "{key}");
            }
            _ => assert!(kv.is_none(), "{key} was deleted"),
        }
    }
    for i in 1..=5 {
        let kv = client.get(format!("fx/after-{i}")).await.unwrap().expect("written after the snapshot");
        assert_eq!(kv.value, format!("a-{i}").into_bytes());
    }
    let leased = client.get("fx/leased").await.unwrap().expect("the leased key");
    assert_eq!(leased.lease, LEASE_ID);
    let ttl = client.lease_time_to_live(LEASE_ID, true).await.unwrap();
    assert_eq!(ttl.granted_ttl_seconds, 86400);
    assert_eq!(ttl.keys, vec![b"fx/leased".to_vec()]);

    // History: fx/key-01 read as it was before its overwrite; below the compaction, refused.
    let old = client.get_at("fx/key-01", 30).await.unwrap().kv.expect("fx/key-01 at revision 30");
    assert_eq!(old.value, b"v1-01");
    match client.get_at("fx/key-01", 19).await {
        Err(Error::OutOfRange(msg)) => assert!(msg.contains("compacted"), "{msg}"),
        other => panic!("a read below the compaction must be refused, got {other:?}"),
    }

    // And it goes on: a write gets the next revision.
    let put = client.put("fx/new", "after the upgrade").await.unwrap();
    assert_eq!(put.header.unwrap().revision, REVISION + 1);
    c.shutdown().await;
}
