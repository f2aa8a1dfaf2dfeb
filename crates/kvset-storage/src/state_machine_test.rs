use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::Store;
use crate::StoreOptions;

fn log_id(index: u64) -> LogId {
    crate::log_id(1, 0, index)
}

fn put(key: &str, value: &str) -> Command {
    Command::Put(Put::new(key, value))
}

fn del(key: &str) -> Command {
    Command::Delete(Delete { range: KeyRange::single(key), prev_kv: false })
}

fn entry(index: u64, commands: Vec<Command>) -> Entry {
    Entry { log_id: log_id(index), payload: EntryPayload::Normal(Batch { commands }) }
}

/// Every key and value at `revision` (0: now).
fn everything_at(reader: &SmReader, revision: Revision) -> BTreeMap<String, String> {
    let q = RangeQuery { revision, ..RangeQuery::new(KeyRange::all()) };
    let (r, _) = reader.range(&q).unwrap();
    r.kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect()
}

/// Every record on disk (key, where), in revision order.
fn records(reader: &SmReader) -> Vec<(Vec<u8>, Rev)> {
    let tree = reader.shared.read_state().data.tree.clone();
    tree.range(vec![keys::RECORD]..vec![keys::RECORD + 1])
        .map(|item| {
            let (k, v) = item.unwrap();
            (record::decode(&v).unwrap().key.to_vec(), keys::parse_record_key(&k).unwrap())
        })
        .collect()
}

fn everything(reader: &SmReader) -> BTreeMap<String, String> {
    everything_at(reader, 0)
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_past_revision_stays_readable_until_compacted() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    // Revisions: 2 a=1, 3 b=1, 4 a=2, 5 del a, 6 a=3 (a new life).
    sm.apply_entries(vec![
        entry(1, vec![put("a", "1"), put("b", "1"), put("a", "2")]),
        entry(2, vec![del("a"), put("a", "3")]),
    ])
    .await
    .unwrap();
    let at = |rev| everything_at(&reader, rev);
    let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(at(1), BTreeMap::new());
    assert_eq!(at(2), map(&[("a", "1")]));
    assert_eq!(at(4), map(&[("a", "2"), ("b", "1")]));
    assert_eq!(at(5), map(&[("b", "1")]));
    assert_eq!(at(6), map(&[("a", "3"), ("b", "1")]));
    let (a4, current) = reader.get(b"a", 4).unwrap();
    let a4 = a4.unwrap();
    assert_eq!(
        (a4.value.as_slice(), a4.version, a4.create_revision, a4.mod_revision, current),
        (&b"2"[..], 2, 2, 4, 6)
    );
    let (a6, _) = reader.get(b"a", 0).unwrap();
    assert_eq!(a6.map(|kv| (kv.version, kv.create_revision)), Some((1, 6)), "re-created after the tombstone");
    assert!(reader.get(b"a", 5).unwrap().0.is_none());
    assert!(matches!(reader.get(b"a", 7), Err(ReadError::FutureRevision { requested: 7, current: 6 })));

    // Compact at 4: revision 4 and later stay readable, 3 and earlier are refused.
    sm.apply_entries(vec![entry(3, vec![Command::Compact(4)])]).await.unwrap();
    assert!(matches!(reader.get(b"a", 3), Err(ReadError::Compacted { requested: 3, compact_revision: 4 })));
    let q = RangeQuery { revision: 2, ..RangeQuery::new(KeyRange::all()) };
    assert!(matches!(reader.range(&q), Err(ReadError::Compacted { .. })));
    crate::tests_support::wait_compacted(&reader, 3).await;
    assert_eq!(at(4), map(&[("a", "2"), ("b", "1")]));
    assert_eq!(at(5), map(&[("b", "1")]));
    assert_eq!(at(6), map(&[("a", "3"), ("b", "1")]));
    // The events from the compact revision on are all there; before it, refused.
    let events = reader.events(4, 6, 100).unwrap();
    assert_eq!(events.iter().map(|r| r.revision).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert!(matches!(reader.events(3, 6, 100), Err(ReadError::Compacted { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physical_compaction_keeps_exactly_what_reads_at_the_compact_revision_need() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    // k: 5 versions; gone: put then deleted; kept: written once.
    let mut commands = vec![put("kept", "x"), put("gone", "1"), del("gone")];
    for i in 0..5 {
        commands.push(put("k", &i.to_string()));
    }
    sm.apply_entries(vec![entry(1, commands)]).await.unwrap();
    let revision = reader.applied().revision;
    assert_eq!(revision, 9);
    let versions = |reader: &SmReader| records(reader).len();
    assert_eq!(versions(&reader), 8);
    sm.apply_entries(vec![entry(2, vec![Command::Compact(revision)])]).await.unwrap();
    crate::tests_support::wait_compacted(&reader, revision - 1).await;
    // Left: kept@2 and k@9 (the version at the compact revision). The tombstone of "gone" and
    // every superseded version are gone.
    assert_eq!(versions(&reader), 2);
    assert_eq!(everything_at(&reader, revision), everything(&reader));
    let revs: Vec<_> = records(&reader).into_iter().map(|(key, rev)| (key, rev.main)).collect();
    assert_eq!(revs, vec![(b"kept".to_vec(), 2), (b"k".to_vec(), 9)], "one record per version left");
    // History goes on after compaction.
    sm.apply_entries(vec![entry(3, vec![put("k", "after")])]).await.unwrap();
    let events = reader.events(9, 10, 100).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].events[0].prev.as_ref().map(|p| p.value.clone()), Some(b"4".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_memory_and_from_the_change_log_are_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = StoreOptions {
        events: EventLogLimits { max_revisions: 2, max_bytes: usize::MAX },
        ..Default::default()
    };
    let store = Store::open_dir(dir.path(), tiny).unwrap();
    let mut sm = store.state_machine;
    let reader = store.reader;
    let txn = Command::Txn(Txn {
        compares: vec![],
        success: vec![TxnOp::Put(Put::new("t2", "b")), TxnOp::Put(Put::new("t1", "a"))],
        failure: vec![],
    });
    sm.apply_entries(vec![entry(1, vec![put("a", "1"), put("a", "2"), txn, del("a")])]).await.unwrap();
    // The ring holds revisions 4 and 5 only; 2 and 3 come from the records on disk.
    let from_log = reader.events(2, 5, 100).unwrap();
    assert_eq!(from_log.iter().map(|r| r.revision).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    let recent = reader.shared.events.get(4, 5, 100).expect("in memory");
    assert_eq!(*recent[0], *from_log[2], "a txn's events, in op order, from either source");
    assert_eq!(*recent[1], *from_log[3]);
    let txn_keys: Vec<&[u8]> = from_log[2].events.iter().map(|e| e.kv.key.as_slice()).collect();
    assert_eq!(txn_keys, vec![&b"t2"[..], b"t1"], "op order, not key order");
    let delete = &from_log[3].events[0];
    assert_eq!(delete.kind, EventKind::Delete);
    assert_eq!(delete.prev.as_ref().map(|p| p.value.clone()), Some(b"2".to_vec()));
    // Whole revisions, at least one, within the event budget.
    assert_eq!(reader.events(2, 5, 1).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_told_of_a_revision_only_once_its_events_are_readable() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    let mut announced = reader.subscribe();
    let r2 = reader.clone();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            announced.changed().await.unwrap();
            let rev = *announced.borrow_and_update();
            let from = seen.last().map_or(2, |r: &Revision| r + 1);
            for r in r2.events(from, rev, 1000).unwrap() {
                seen.push(r.revision);
            }
        }
        seen
    });
    for i in 0..3 {
        sm.apply_entries(vec![entry(i + 1, vec![put("k", &i.to_string())])]).await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher).await.unwrap().unwrap();
    assert_eq!(seen, vec![2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_build_does_not_block_applies_and_captures_one_instant() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    sm.apply_entries(vec![entry(1, (0..10).map(|i| put(&format!("k{i}"), "v0")).collect())]).await.unwrap();
    sm.apply_entries(vec![entry(2, vec![Command::LeaseGrant { id: 9, ttl: 30 }])]).await.unwrap();
    let at_capture = everything(&reader);
    let digest_at_capture = reader.digest().unwrap();

    let (parked, resume) = sm.pause_next_build();
    let mut builder = sm.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    tokio::task::spawn_blocking(move || parked.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the build captured its state and parked");
    // Applies, a compaction and a new lease land while the build is parked mid-copy.
    let changes = vec![
        put("k0", "v1"),
        put("k5", "v1"),
        del("k7"),
        put("k3a", "new"),
        Command::LeaseGrant { id: 10, ttl: 5 },
    ];
    let applied = tokio::time::timeout(
        Duration::from_secs(10),
        sm.apply_entries(vec![entry(3, changes), entry(4, vec![Command::Compact(12)])]),
    )
    .await;
    assert!(applied.is_ok(), "apply was blocked by a running snapshot build");
    resume.send(()).unwrap();
    let snapshot = build.await.unwrap().unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(2)));

    // Installed elsewhere, the snapshot is exactly the state at capture.
    let (_d2, other) = new_store();
    let mut osm = other.state_machine;
    let path = reader.current_snapshot().unwrap().1;
    let mut recv = SnapshotFile::create_receiving(osm.snapshot_dir()).await.unwrap();
    tokio::io::copy(&mut tokio::fs::File::open(&path).await.unwrap(), &mut recv).await.unwrap();
    osm.install_snapshot(&snapshot.meta, recv).await.unwrap();
    assert_eq!(everything(&other.reader), at_capture);
    assert_eq!(other.reader.digest().unwrap(), digest_at_capture);
    assert_eq!(other.reader.leases().keys().copied().collect::<Vec<_>>(), vec![9]);
    assert_eq!(everything(&reader).get("k5").map(String::as_str), Some("v1"), "the live state moved on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_replaces_the_state_keeps_the_history_and_survives_restart() {
    let (_leader_dir, leader) = new_store();
    let mut leader_sm = leader.state_machine;
    leader_sm
        .apply_entries(vec![
            entry(1, vec![put("a", "1"), put("b", "2"), Command::LeaseGrant { id: 5, ttl: 60 }]),
            entry(
                2,
                vec![del("a"), put("c", "3"), Command::Put(Put { lease: 5, ..Put::new("leased", "x") })],
            ),
        ])
        .await
        .unwrap();
    let snap = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let want = everything(&leader.reader);
    let want_at_3 = everything_at(&leader.reader, 3);
    let want_digest = leader.reader.digest().unwrap();

    let follower_dir = tempfile::tempdir().unwrap();
    {
        let follower = Store::open_dir(follower_dir.path(), StoreOptions::default()).unwrap();
        let mut sm = follower.state_machine;
        sm.apply_entries(vec![entry(1, vec![put("stale", "x"), put("a", "old")])]).await.unwrap();
        let mut recv = SnapshotFile::create_receiving(sm.snapshot_dir()).await.unwrap();
        let mut src = tokio::fs::File::open(leader.reader.current_snapshot().unwrap().1).await.unwrap();
        tokio::io::copy(&mut src, &mut recv).await.unwrap();
        sm.install_snapshot(&snap.meta, recv).await.unwrap();
        assert_eq!(everything(&follower.reader), want, "the old state is gone, the new one complete");
        assert_eq!(everything_at(&follower.reader, 3), want_at_3, "the history came along");
        assert_eq!(follower.reader.applied().last_applied, Some(log_id(2)));
        assert_eq!(follower.reader.digest().unwrap(), want_digest);
        let (lease, keys) = follower.reader.lease(5).unwrap().unwrap();
        assert_eq!((lease.ttl, keys), (60, vec![b"leased".to_vec()]));
        // Revoking the lease on the follower deletes its key: attachments were rebuilt.
        sm.apply_entries(vec![entry(3, vec![Command::LeaseRevoke(5)])]).await.unwrap();
        assert!(!everything(&follower.reader).contains_key("leased"));
    }
    // Restart: the state and the snapshot are there.
    let follower = Store::open_dir(follower_dir.path(), StoreOptions::default()).unwrap();
    assert!(!everything(&follower.reader).contains_key("leased"));
    assert_eq!(everything_at(&follower.reader, 3), want_at_3);
    let mut sm = follower.state_machine;
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(2)));
    let leftovers: Vec<_> = fs::read_dir(follower_dir.path().join("snapshots")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "only the installed snapshot remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_refused_and_changes_nothing() {
    let (_leader_dir, leader) = new_store();
    let mut leader_sm = leader.state_machine;
    leader_sm
        .apply_entries(vec![entry(1, (0..100).map(|i| put(&format!("k{i}"), "v")).collect())])
        .await
        .unwrap();
    let snap = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut bytes = fs::read(leader.reader.current_snapshot().unwrap().1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;

    let (_dir, follower) = new_store();
    let mut sm = follower.state_machine;
    sm.apply_entries(vec![entry(1, vec![put("mine", "1")])]).await.unwrap();
    let before = follower.reader.digest().unwrap();
    let mut recv = SnapshotFile::create_receiving(sm.snapshot_dir()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut recv, &bytes).await.unwrap();
    assert!(sm.install_snapshot(&snap.meta, recv).await.is_err());
    assert_eq!(follower.reader.digest().unwrap(), before);
    assert_eq!(follower.reader.applied().last_applied, Some(log_id(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_state_leases_and_compaction_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
        let mut sm = store.state_machine;
        let results = sm
            .apply_entries(vec![
                entry(1, vec![put("a", "1"), put("a", "2"), Command::LeaseGrant { id: 3, ttl: 9 }]),
                entry(2, vec![del("a"), Command::Compact(3)]),
            ])
            .await
            .unwrap();
        assert_eq!(results[0].results[1].revision(), 3);
        assert_eq!(results[1].results[0], CommandResult::Delete { revision: 4, deleted: 1, prev: vec![] });
        store.reader.shared.db.flush().unwrap();
    }
    let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    let applied = store.reader.applied();
    assert_eq!(applied.last_applied, Some(log_id(2)));
    assert_eq!((applied.revision, applied.compact_revision), (4, 3));
    assert_eq!(store.reader.get(b"a", 0).unwrap(), (None, 4));
    assert_eq!(store.reader.get(b"a", 3).unwrap().0.map(|kv| kv.value), Some(b"2".to_vec()));
    assert_eq!(store.reader.leases().get(&3).map(|l| l.ttl), Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_kv_agrees_across_physical_compaction_and_sees_every_change() {
    let commands = vec![put("a", "1"), put("b", "1"), put("a", "2"), del("b"), put("c", "1")];
    // Two members apply the same commands; the first also compacts at 4 and finishes the
    // physical compaction, the second has not compacted at all.
    let (_d1, one) = new_store();
    let (_d2, two) = new_store();
    let mut sm1 = one.state_machine;
    let mut sm2 = two.state_machine;
    sm1.apply_entries(vec![entry(1, commands.clone())]).await.unwrap();
    sm2.apply_entries(vec![entry(1, commands)]).await.unwrap();
    let (before, compact, revision) = one.reader.hash_kv(0).unwrap();
    assert_eq!((compact, revision), (NEVER_COMPACTED, 6));
    assert_eq!(two.reader.hash_kv(0).unwrap().0, before);

    sm1.apply_entries(vec![entry(2, vec![Command::Compact(4)])]).await.unwrap();
    crate::tests_support::wait_compacted(&one.reader, 3).await;
    let history = |reader: &SmReader| records(reader).len();
    assert!(history(&one.reader) < 5, "physical compaction removed versions");
    assert_eq!(history(&two.reader), 5);
    let (h1, c1, r1) = one.reader.hash_kv(6).unwrap();
    assert_eq!((c1, r1), (4, 6));
    // The second member's history read as if compacted at 4: the same hash, though it still
    // holds every version (a member whose compaction is under way sits between the two).
    let data2 = two.reader.shared.read_state().data.clone();
    assert_eq!(data2.hash_kv(6, 4).unwrap(), h1, "same state, same hash");
    assert!(matches!(one.reader.hash_kv(3), Err(ReadError::Compacted { .. })));
    assert!(matches!(one.reader.hash_kv(7), Err(ReadError::FutureRevision { .. })));

    // Any change changes it; a hash at an earlier revision ignores later changes.
    sm1.apply_entries(vec![entry(3, vec![put("c", "2")])]).await.unwrap();
    assert_ne!(one.reader.hash_kv(0).unwrap().0, h1);
    assert_eq!(one.reader.hash_kv(6).unwrap().0, h1);
    // The same commands and compaction on the second member give the same hash.
    sm2.apply_entries(vec![entry(2, vec![Command::Compact(4)]), entry(3, vec![put("c", "2")])])
        .await
        .unwrap();
    assert_eq!(two.reader.hash_kv(0).unwrap(), one.reader.hash_kv(0).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_a_snapshot_another_volume_installs() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
        let mut sm = store.state_machine;
        sm.apply_entries(vec![entry(
            1,
            vec![put("a", "1"), Command::LeaseGrant { id: 9, ttl: 30 }, put("b", "2")],
        )])
        .await
        .unwrap();
        let (header, path, bytes) = store.reader.write_backup().unwrap();
        assert_eq!((header.revision, header.leases.len()), (3, 1));
        assert_eq!(fs::metadata(&path).unwrap().len(), bytes);
        assert!(store.reader.current_snapshot().is_none(), "a backup is not the Raft snapshot");

        let (_other_dir, other) = new_store();
        let mut other_sm = other.state_machine;
        let mut recv = SnapshotFile::create_receiving(other_sm.snapshot_dir()).await.unwrap();
        let mut src = tokio::fs::File::open(&path).await.unwrap();
        tokio::io::copy(&mut src, &mut recv).await.unwrap();
        other_sm.install_snapshot(&header.meta, recv).await.unwrap();
        assert_eq!(everything(&other.reader), everything(&store.reader));
        assert_eq!(other.reader.digest().unwrap(), store.reader.digest().unwrap());
        path
    };
    // A backup left behind by a crash is removed when the volume opens again.
    assert!(path.exists());
    let _again = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    assert!(!path.exists(), "the stray backup file was removed at open");
}

/// Installs `reader`'s current Raft snapshot into a fresh store and returns that store.
async fn installed_copy(reader: &SmReader, meta: &SnapshotMeta) -> (tempfile::TempDir, Store) {
    let (dir, other) = new_store();
    let mut sm = other.state_machine;
    let mut recv = SnapshotFile::create_receiving(sm.snapshot_dir()).await.unwrap();
    let path = reader.current_snapshot().unwrap().1;
    tokio::io::copy(&mut tokio::fs::File::open(&path).await.unwrap(), &mut recv).await.unwrap();
    sm.install_snapshot(meta, recv).await.unwrap();
    let reader = other.reader.clone();
    (dir, Store { state_machine: sm, reader, ..other })
}

/// The resurrection of issue 23: a version live at one compaction lost its change-log entry,
/// so when the key was deleted and a second compaction removed the tombstone, the old version
/// became the key's newest again — in reads at a revision, and as a live key in every
/// snapshot built from the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_key_stays_deleted_through_two_compactions_and_a_snapshot() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    // put k a (2); put x 1 (3); compact 3; del k (4); put x 2 (5); compact 5; put y 1 (6).
    sm.apply_entries(vec![entry(1, vec![put("k", "a"), put("x", "1")]), entry(2, vec![Command::Compact(3)])])
        .await
        .unwrap();
    crate::tests_support::wait_compacted(&reader, 2).await;
    sm.apply_entries(vec![entry(3, vec![del("k"), put("x", "2")]), entry(4, vec![Command::Compact(5)])])
        .await
        .unwrap();
    crate::tests_support::wait_compacted(&reader, 4).await;
    sm.apply_entries(vec![entry(5, vec![put("y", "1")])]).await.unwrap();

    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert_eq!(reader.get(b"k", 5).unwrap().0, None, "k was deleted at revision 4");
    assert_eq!(everything_at(&reader, 5), map(&[("x", "2")]));
    assert_eq!(everything_at(&reader, 6), map(&[("x", "2"), ("y", "1")]));
    assert_eq!(everything(&reader), map(&[("x", "2"), ("y", "1")]));
    let versions_of_k = records(&reader).iter().filter(|(key, _)| key == b"k").count();
    assert_eq!(versions_of_k, 0, "nothing of k is reachable at or after the compact revision");

    // A snapshot built now and installed into a fresh store: k stays deleted there too.
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let (_d2, copy) = installed_copy(&reader, &snapshot.meta).await;
    assert_eq!(everything(&copy.reader), map(&[("x", "2"), ("y", "1")]));
    assert_eq!(copy.reader.get(b"k", 5).unwrap().0, None);
    assert_eq!(everything_at(&copy.reader, 5), map(&[("x", "2")]));
    assert_eq!(copy.reader.digest().unwrap(), reader.digest().unwrap());
}

/// Found by the model test: an event's previous value came from memory (recent events) or
/// from the history, whichever answered, so after a compaction the event at the compact
/// revision had one or not depending on timing. As etcd, the previous value is the key at the
/// revision before the event, and none when that revision is compacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_at_the_compact_revision_has_no_previous_value_wherever_it_is_read_from() {
    // A ring of 100 revisions answers from memory; a ring of 1 sends the read to the history.
    for ring in [100, 1] {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            events: EventLogLimits { max_revisions: ring, max_bytes: usize::MAX },
            ..Default::default()
        };
        let store = Store::open_dir(dir.path(), options).unwrap();
        let mut sm = store.state_machine;
        let reader = store.reader;
        // 2: c=1; 3: c=2 (its previous value is at 2); 4: c=3.
        sm.apply_entries(vec![entry(1, vec![put("c", "1"), put("c", "2"), put("c", "3")])]).await.unwrap();
        let prevs = |reader: &SmReader| {
            let events = reader.events(3, 4, 100).unwrap();
            events.iter().map(|r| r.events[0].prev.as_ref().map(|p| p.mod_revision)).collect::<Vec<_>>()
        };
        assert_eq!(prevs(&reader), vec![Some(2), Some(3)], "ring {ring}");
        sm.apply_entries(vec![entry(2, vec![Command::Compact(3)])]).await.unwrap();
        assert_eq!(prevs(&reader), vec![None, Some(3)], "ring {ring}, before physical compaction");
        crate::tests_support::wait_compacted(&reader, 2).await;
        assert_eq!(prevs(&reader), vec![None, Some(3)], "ring {ring}, after it");
    }
}

/// Issue 24, item 9: a state digest (Cluster.Status with the digest option, etcd's Hash) held
/// the state lock while it scanned every key, stalling apply for as long. Parked half-way, it
/// now lets applies through, and answers for the revision it started at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_does_not_hold_up_apply_and_digests_one_revision() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let reader = store.reader;
    sm.apply_entries(vec![entry(1, (0..10).map(|i| put(&format!("k{i}"), "v0")).collect())]).await.unwrap();
    let before = reader.digest().unwrap();
    let (parked, resume) = reader.pause_next_digest();
    let r2 = reader.clone();
    let digest = tokio::task::spawn_blocking(move || r2.digest());
    tokio::task::spawn_blocking(move || parked.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the digest started and parked");
    let applied = tokio::time::timeout(
        Duration::from_secs(10),
        sm.apply_entries(vec![entry(2, vec![put("k3", "v1")])]),
    )
    .await;
    assert!(applied.is_ok(), "apply was blocked by a digest in progress");
    resume.send(()).unwrap();
    let during = digest.await.unwrap().unwrap();
    assert_eq!(during, before, "the digest is of the revision it started at");
    assert_ne!(reader.digest().unwrap().crc, before.crc, "and a later one sees the change");
}

/// Issue 24, item 10: a watcher catching up from the history while physical compaction ran
/// could find the change log naming a version compaction had just removed, and was canceled as
/// "corrupt" (cause Failed) instead of compacted, with the compact revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_while_compaction_passes_them_are_compacted_not_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        events: EventLogLimits { max_revisions: 1, max_bytes: usize::MAX },
        manual_compaction: true,
        ..Default::default()
    };
    let store = Store::open_dir(dir.path(), options).unwrap();
    let mut sm = store.state_machine;
    let reader = store.reader;
    // 2..=11: k=0..9 (each superseded by the next).
    sm.apply_entries(vec![entry(1, (0..10).map(|i| put("k", &i.to_string())).collect())]).await.unwrap();
    let (parked, resume) = reader.pause_next_history_events();
    let r2 = reader.clone();
    let read = tokio::task::spawn_blocking(move || r2.events(3, 11, 100));
    tokio::task::spawn_blocking(move || parked.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the read checked the compact revision and parked");
    // Compaction passes the read's start, and physical compaction removes what it reads.
    sm.apply_entries(vec![entry(2, vec![Command::Compact(8)])]).await.unwrap();
    while reader.compact_chunk_now(1000).unwrap() {}
    resume.send(()).unwrap();
    match read.await.unwrap() {
        Err(ReadError::Compacted { requested: 3, compact_revision: 8 }) => {}
        other => panic!("a read passed by compaction answered {other:?}"),
    }
}

/// Issue 25: a put is one sled write (its record); each apply adds one for the applied state,
/// however many entries it applies. Counted at the sled batch the apply writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_one_sled_write_and_each_apply_adds_one_for_the_applied_state() {
    let (_dir, store) = new_store();
    let mut sm = store.state_machine;
    let writes = || sm_writes(&store.reader);
    let before = writes();
    sm.apply_entries(vec![entry(1, vec![put("a", "1")])]).await.unwrap();
    assert_eq!(writes() - before, 2, "the record and the applied state");
    let before = writes();
    let entries: Vec<_> = (2..102).map(|i| entry(i, vec![put(&format!("k{i:03}"), "v")])).collect();
    sm.apply_entries(entries).await.unwrap();
    assert_eq!(writes() - before, 101, "100 puts in 100 entries, applied together");
    let before = writes();
    let range = KeyRange::between("k002", "k012");
    sm.apply_entries(vec![entry(102, vec![Command::Delete(Delete { range, prev_kv: false })])])
        .await
        .unwrap();
    assert_eq!(writes() - before, 11, "a tombstone per deleted key");
    assert_eq!(records(&store.reader).len(), 1 + 100 + 10, "one record per change");
}

fn sm_writes(reader: &SmReader) -> u64 {
    reader.shared.writes.load(Ordering::Relaxed)
}

/// An upgrade from format 2 that a crash interrupted before its slot flip leaves the old slot
/// active and a half-written other slot: the next open drops that and upgrades again, from the
/// old slot, which was never changed. (The volume is the one the previous release wrote, see
/// `tests/upgrade.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_interrupted_before_its_flip_is_done_again_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/volume-format-2.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xzf")
        .arg(&fixture)
        .status()
        .unwrap();
    assert!(status.success());
    let data = dir.path().join("kvset-0");
    {
        let db = sled::open(data.join("db")).unwrap();
        let slots = db.open_tree("sm_slot").unwrap();
        let active = usize::from(slots.get(SLOT_KEY).unwrap().is_some_and(|v| v.as_ref() == [1]));
        let old = db.open_tree(SLOT_NAMES[active]).unwrap();
        assert!(old.get(keys::meta(META_LAYOUT)).unwrap().is_none(), "the fixture is of format 2");
        // What the crashed upgrade wrote: part of the records, a wrong one among them, no flip.
        let half = db.open_tree(SLOT_NAMES[1 - active]).unwrap();
        let wrong = Version {
            value: b"not what the history says".to_vec(),
            create_revision: 2,
            version: 1,
            ..Default::default()
        };
        half.insert(keys::record_key(Rev::new(2, 0)), record::encode(b"k/a", &wrong)).unwrap();
        half.insert(keys::record_key(Rev::new(99, 0)), record::encode(b"k/ghost", &wrong)).unwrap();
        db.flush().unwrap();
    }
    // sled releases its file lock shortly after the last handle is dropped.
    let db = crate::defrag::open_waiting(&data.join("db"), Duration::from_secs(10)).unwrap();
    let sm = StateMachine::open(
        db,
        data.join("snapshots"),
        Arc::new(crate::NoopObserver),
        EventLogLimits::default(),
        false,
        None,
    )
    .unwrap();
    let reader = sm.reader();
    assert_eq!((reader.applied().revision, reader.applied().compact_revision), (36, 5));
    let (a, _) = reader.get(b"k/a", 5).unwrap();
    assert_eq!(a.map(|kv| (kv.value, kv.mod_revision)), Some((b"a3".to_vec(), 4)));
    assert_eq!(reader.get(b"k/ghost", 0).unwrap().0, None, "nothing of the half-written slot survives");
    assert_eq!(everything(&reader).get("k/a").map(String::as_str), Some("a4"));
    assert_eq!(records(&reader).iter().filter(|(_, rev)| rev.main == 99).count(), 0);
}

/// A slot of a newer layout, or with a record that does not decode, is refused at open with an
/// error saying which: never indexed into a wrong state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_layout_or_a_damaged_record_is_refused_at_open() {
    let refused = |damage: &dyn Fn(&sled::Tree)| -> String {
        let (dir, store) = new_store();
        let tree = store.reader.shared.read_state().data.tree.clone();
        damage(&tree);
        store.reader.close().unwrap();
        drop((store, tree));
        let db = crate::defrag::open_waiting(&dir.path().join("db"), Duration::from_secs(10)).unwrap();
        let opened = StateMachine::open(
            db,
            dir.path().join("snapshots"),
            Arc::new(crate::NoopObserver),
            EventLogLimits::default(),
            false,
            None,
        );
        opened.expect_err("a damaged slot is refused").to_string()
    };
    let newer = refused(&|t| {
        t.insert(keys::meta(META_LAYOUT), codec::encode("layout", &(LAYOUT + 1)).unwrap()).unwrap();
    });
    assert!(newer.contains("layout 4 is newer"), "{newer}");
    let garbage = refused(&|t| {
        t.insert(keys::record_key(Rev::new(2, 0)), &[0xffu8, 1, 2][..]).unwrap();
    });
    assert!(garbage.contains("undecodable record at 2.0"), "{garbage}");
}
