use std::collections::BTreeMap;
use std::time::Duration;

use openraft::CommittedLeaderId;

use super::*;
use crate::Store;
use crate::StoreOptions;

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 0), index)
}

fn put(key: &str, value: &str) -> Command {
    Command::Put(Put { key: key.into(), value: value.into(), lease: 0, prev_kv: false })
}

fn del(key: &str) -> Command {
    Command::Delete(Delete { range: KeyRange::single(key), prev_kv: false })
}

fn entry(index: u64, commands: Vec<Command>) -> Entry {
    Entry { log_id: log_id(index), payload: EntryPayload::Normal(Batch { commands }) }
}

fn everything(reader: &SmReader) -> BTreeMap<String, String> {
    let q = RangeQuery {
        range: KeyRange { start: Vec::new(), end: RangeEnd::Unbounded },
        limit: usize::MAX,
        max_bytes: usize::MAX,
        keys_only: false,
        count_only: false,
    };
    let (r, _) = reader.range(&q).unwrap();
    r.kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect()
}

fn snapshot_contents(path: &Path) -> BTreeMap<String, String> {
    let mut r = SnapshotReader::open(path).unwrap();
    let mut out = BTreeMap::new();
    while let Some((k, v)) = r.next_record().unwrap() {
        let v: StoredValue = codec::decode("v", &v).unwrap();
        let prev = out.insert(String::from_utf8(k).unwrap(), String::from_utf8(v.value).unwrap());
        assert!(prev.is_none(), "a key appears twice in the snapshot");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_build_does_not_block_applies_and_captures_one_instant() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    let mut sm = store.state_machine;
    let reader = store.reader;

    let initial: Vec<Command> = (0..10).map(|i| put(&format!("k{i}"), "v0")).collect();
    sm.apply([entry(1, initial)]).await.unwrap();
    let at_capture = everything(&reader);

    // Pause the builder after it has written its first key (k0), then change keys it has
    // passed, keys ahead of it, and keys it will never see.
    let resume = sm.pause_next_build_after_first_key();
    let mut builder = sm.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    // The builder is parked inside the iteration once the capture is registered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock(&sm.shared.undo_logs).is_empty() {
        assert!(Instant::now() < deadline, "builder never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let changes =
        vec![put("k0", "v1"), put("k5", "v1"), del("k7"), put("k3a", "new"), del("k1"), put("k1", "again")];
    let applied = tokio::time::timeout(Duration::from_secs(10), sm.apply([entry(2, changes)])).await;
    assert!(applied.is_ok(), "apply was blocked by a running snapshot build");

    resume.send(()).unwrap();
    let snapshot = build.await.unwrap().unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1)));
    let path = reader.current_snapshot().unwrap().1;
    assert_eq!(snapshot_contents(&path), at_capture, "the snapshot is the state at capture time");
    assert_eq!(everything(&reader).get("k5").map(String::as_str), Some("v1"), "the live state moved on");
    assert!(lock(&sm.shared.undo_logs).is_empty(), "the undo log is unregistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_replaces_the_state_and_survives_restart() {
    // Build a snapshot on a "leader" store.
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = Store::open_dir(leader_dir.path(), StoreOptions::default()).unwrap();
    let mut leader_sm = leader.state_machine;
    leader_sm
        .apply([entry(1, vec![put("a", "1"), put("b", "2")]), entry(2, vec![del("a"), put("c", "3")])])
        .await
        .unwrap();
    let snap = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let want = everything(&leader.reader);
    let want_digest = leader.reader.digest().unwrap();

    // A "follower" with other, older state receives it through openraft's chunk interface.
    let follower_dir = tempfile::tempdir().unwrap();
    {
        let follower = Store::open_dir(follower_dir.path(), StoreOptions::default()).unwrap();
        let mut sm = follower.state_machine;
        sm.apply([entry(1, vec![put("stale", "x"), put("a", "old")])]).await.unwrap();
        let mut recv = sm.begin_receiving_snapshot().await.unwrap();
        let mut src = tokio::fs::File::open(leader.reader.current_snapshot().unwrap().1).await.unwrap();
        tokio::io::copy(&mut src, &mut *recv).await.unwrap();
        sm.install_snapshot(&snap.meta, recv).await.unwrap();
        assert_eq!(everything(&follower.reader), want, "the old state is gone, the new one complete");
        assert_eq!(follower.reader.applied().last_applied, Some(log_id(2)));
        assert_eq!(follower.reader.digest().unwrap(), want_digest);
    }
    // Restart: same state, same snapshot.
    let follower = Store::open_dir(follower_dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(everything(&follower.reader), want);
    assert_eq!(follower.reader.digest().unwrap(), want_digest);
    let mut sm = follower.state_machine;
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(2)));
    let leftovers: Vec<_> = fs::read_dir(follower_dir.path().join("snapshots")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "only the installed snapshot remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_refused_and_changes_nothing() {
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = Store::open_dir(leader_dir.path(), StoreOptions::default()).unwrap();
    let mut leader_sm = leader.state_machine;
    leader_sm.apply([entry(1, (0..100).map(|i| put(&format!("k{i}"), "v")).collect())]).await.unwrap();
    let snap = leader_sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut bytes = fs::read(leader.reader.current_snapshot().unwrap().1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;

    let dir = tempfile::tempdir().unwrap();
    let follower = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    let mut sm = follower.state_machine;
    sm.apply([entry(1, vec![put("mine", "1")])]).await.unwrap();
    let before = follower.reader.digest().unwrap();
    let mut recv = sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &bytes).await.unwrap();
    assert!(sm.install_snapshot(&snap.meta, recv).await.is_err());
    assert_eq!(follower.reader.digest().unwrap(), before);
    assert_eq!(follower.reader.applied().last_applied, Some(log_id(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
        let mut sm = store.state_machine;
        let results =
            sm.apply([entry(1, vec![put("a", "1"), put("a", "2")]), entry(2, vec![del("a")])]).await.unwrap();
        assert_eq!(results[0].results[1].revision(), 3);
        assert_eq!(results[1].results[0], CommandResult::Delete { revision: 4, deleted: 1, prev: vec![] });
        store.reader.shared.db.flush().unwrap();
    }
    let store = Store::open_dir(dir.path(), StoreOptions::default()).unwrap();
    let applied = store.reader.applied();
    assert_eq!(applied.last_applied, Some(log_id(2)));
    assert_eq!(applied.revision, 4);
    assert_eq!(store.reader.get(b"a").unwrap(), (None, 4));
}
