//! A volume of format 2, written by the release before the revision-keyed store (kvset 0.2), is
//! upgraded in place at first open and serves its keys, history, leases and users; a backup
//! that release wrote (snapshot format 3, in etcd's framing) is still read and restored.
//!
//! The fixture `fixtures/volume-format-2.tar.gz` was made by `fixtures/make-volume-format-2.sh`
//! with the kvset binary of commit 74cd219: a one-member `kvset cluster up`, etcdctl writes
//! (history, deletes, a compaction at 5, two leases, users, roles, auth enabled), then a clean
//! stop; the expectations below are what that script wrote.

use std::path::Path;
use std::process::Command as Process;

use kvset_storage::Member;
use kvset_storage::ReadError;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::Volume;

const LEASE: i64 = 0x4f94_af38_15ad_2dc9;
const EMPTIED_LEASE: i64 = 0x6ef3_931d_04e2_a61b;

fn unpack(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/volume-format-2.tar.gz");
    let status = Process::new("tar").arg("-C").arg(dir).arg("-xzf").arg(&fixture).status().expect("tar");
    assert!(status.success(), "unpacking {}", fixture.display());
}

fn value(store: &Store, key: &str, revision: i64) -> Option<(String, i64, i64, i64)> {
    let (kv, _) = store.reader.get(key.as_bytes(), revision).expect("get");
    kv.map(|kv| (String::from_utf8(kv.value).unwrap(), kv.create_revision, kv.mod_revision, kv.version))
}

/// What the fixture script wrote, read back through a store.
fn check(store: &Store) {
    let applied = store.reader.applied();
    assert_eq!((applied.revision, applied.compact_revision), (36, 5));
    assert_eq!(value(store, "k/a", 0), Some(("a4".into(), 2, 31, 4)));
    assert_eq!(value(store, "k/a", 5), Some(("a3".into(), 2, 4, 3)), "history at the compact revision");
    assert_eq!(value(store, "k/a", 30), Some(("a3".into(), 2, 4, 3)));
    assert!(matches!(store.reader.get(b"k/a", 4), Err(ReadError::Compacted { compact_revision: 5, .. })));
    assert_eq!(value(store, "k/b", 0), None, "deleted at 6");
    assert_eq!(value(store, "k/b", 5), Some(("b1".into(), 5, 5, 1)));
    assert_eq!(value(store, "k/c", 0), Some(("c2".into(), 9, 9, 1)), "deleted and put again");
    assert_eq!(value(store, "k/c", 8), None);
    assert_eq!(value(store, "k/n20", 0), Some(("v20".into(), 30, 30, 1)));
    let (all, _) =
        store.reader.range(&kvset_storage::RangeQuery::new(kvset_storage::KeyRange::prefix("k/"))).unwrap();
    assert_eq!(all.count, 26, "a, c, bin, n1..n20, leased1, leased2, after-auth");

    let (lease, keys) = store.reader.lease(LEASE).expect("lease").expect("lease exists");
    assert_eq!(lease.ttl, 100_000);
    assert_eq!(keys, vec![b"k/leased1".to_vec(), b"k/leased2".to_vec()]);
    let (_, keys) = store.reader.lease(EMPTIED_LEASE).expect("lease").expect("lease exists");
    assert!(keys.is_empty(), "its only key was deleted");

    let auth = store.reader.auth();
    assert!(auth.enabled);
    assert_eq!(auth.users.keys().collect::<Vec<_>>(), vec!["alice", "root"]);
    assert!(auth.roles.contains_key("reader"));

    // Every event since the compact revision, with previous values.
    let events = store.reader.events(5, 36, 1000).expect("events");
    assert_eq!(events.len(), 32);
    let delete_b = &events[1].events[0];
    assert_eq!(
        (delete_b.kv.key.as_slice(), delete_b.prev.as_ref().map(|p| p.value.as_slice())),
        (&b"k/b"[..], Some(&b"b1"[..]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_of_format_2_is_upgraded_in_place_and_serves_its_keys_history_leases_and_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    unpack(dir.path());
    let data = dir.path().join("kvset-0");
    let volume = Volume::open(&data, 0, None).expect("a format 2 volume opens");
    assert_eq!(volume.meta().format_version, 2);
    let hash = {
        let store = Store::open(&volume, StoreOptions::default()).expect("upgraded as it opens");
        check(&store);
        let hash = store.reader.hash_kv(0).expect("hash");
        store.reader.close().expect("close");
        hash
    };
    // Opened again: the volume says format 3 now, nothing is upgraded twice, all is the same.
    let volume = Volume::open(&data, 0, None).expect("opens");
    assert_eq!(volume.meta().format_version, kvset_storage::volume::FORMAT_VERSION);
    // sled lets go of its file lock shortly after the last handle is dropped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let store = loop {
        match Store::open(&volume, StoreOptions::default()) {
            Ok(store) => break store,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("opens again: {e}"),
        }
    };
    check(&store);
    assert_eq!(store.reader.hash_kv(0).expect("hash"), hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_written_by_the_previous_release_is_restored() {
    let dir = tempfile::tempdir().expect("tempdir");
    unpack(dir.path());
    // etcdctl's file: kvset's snapshot (format 3), zero padding, a SHA-256.
    let unframed = dir.path().join("backup.snap");
    kvset_storage::snapshot::unframe_etcd(&dir.path().join("kvset-0-backup.snap"), &unframed, 32)
        .expect("etcd framing");
    let summary = kvset_storage::seed::summarize(&unframed).expect("summary");
    assert_eq!((summary.header.revision, summary.keys), (36, 26));

    let fresh = dir.path().join("fresh");
    let volume = Volume::open(&fresh, 0, None).expect("fresh volume");
    let mut store = Store::open(&volume, StoreOptions::default()).expect("store");
    let me = Member {
        ordinal: 0,
        name: "kvset-0".into(),
        peer_addr: "127.0.0.1:1".into(),
        client_addr: "127.0.0.1:2".into(),
    };
    store.seed(&unframed, volume.meta().node_id, me).await.expect("seeded from the old backup");
    check(&store);
}
