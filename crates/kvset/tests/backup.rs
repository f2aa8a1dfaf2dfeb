//! Backups as a user takes them: `kvset snapshot save` from a running member, `status` on the
//! file, `restore` into the volume of a new cluster, and the new cluster holds every key,
//! version, revision, lease and the compaction point. Damaged files are refused and change
//! nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::json;
use common::kvset;
use common::path;
use kvset_client::pb;
use kvset_client::Client;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use kvset_tests::member_get;
use serde_json::Value;

/// Every key with its metadata, read linearizably at the current revision, plus that revision.
async fn everything(client: &Client) -> (i64, Vec<pb::KeyValue>) {
    let resp = client
        .range(pb::RangeRequest { key: vec![0], range_end: vec![0], limit: 10_000, ..Default::default() })
        .await
        .unwrap();
    assert!(resp.next_key.is_empty(), "more than one page");
    (resp.header.unwrap().revision, resp.kvs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restored_into_a_new_cluster_holds_every_key_revision_lease_and_the_compaction_point() {
    let old = Cluster::start(3).await;
    let client = old.client();
    for i in 0..300 {
        client.put(format!("key-{i:03}"), format!("v1-{i}")).await.unwrap();
    }
    for i in 0..100 {
        client.put(format!("key-{i:03}"), format!("v2-{i}")).await.unwrap();
    }
    let before_deletes = client.put("marker", "x").await.unwrap().header.unwrap().revision;
    client.delete(pb::DeleteRequest { key: b"key-299".to_vec(), ..Default::default() }).await.unwrap();
    let lease = client.lease_grant(3600, 0).await.unwrap().id;
    client
        .put_request(pb::PutRequest {
            key: b"leased".to_vec(),
            value: b"l".to_vec(),
            lease,
            ..Default::default()
        })
        .await
        .unwrap();
    client.compact(150).await.unwrap();
    let (revision, kvs) = everything(&client).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let saved = json(&old.endpoint(1), &["snapshot", "save", path(&file)]).await;
    assert_eq!(saved["revision"], revision, "{saved}");
    assert_eq!(saved["keys"], kvs.len() as i64, "{saved}");
    assert!(!Path::new(&format!("{}.part", file.display())).exists());
    // A backup is never overwritten.
    let (ok, _, err) = kvset(&old.endpoint(1), &["snapshot", "save", path(&file)]).await;
    assert!(!ok && err.contains("already exists"), "{err}");

    let status = json("unused", &["snapshot", "status", path(&file)]).await;
    assert_eq!(status["revision"], revision, "{status}");
    assert_eq!(status["compact_revision"], 150, "{status}");
    assert_eq!(status["keys"], kvs.len() as i64, "{status}");
    assert_eq!(status["leases"], 1, "{status}");
    assert_eq!(status["checksum"], "ok", "{status}");
    let old_cluster = old.client().status_of(&old.endpoint(0)).await.unwrap().cluster_id;
    old.shutdown().await;

    // Restore into ordinal 0's volume of a brand-new cluster; 1 and 2 start empty and join.
    let mut new = Cluster::new(3, |_| {}).await;
    // With the revisions kept as they were (the default bumps them: tested below).
    let restored = json(
        "unused",
        &["snapshot", "restore", path(&file), "--data-dir", path(&new.data_dir(0)), "--bump-revision", "0"],
    )
    .await;
    assert_eq!(restored["revision"], revision, "{restored}");
    for o in 0..3 {
        new.start_node(o).await;
    }
    new.wait_voters(3, Duration::from_secs(60)).await;
    let client = new.client();
    let status = client.status_of(&new.endpoint(2)).await.unwrap();
    assert_ne!(status.cluster_id, old_cluster, "a restore makes a new cluster");
    assert_eq!(status.cluster_id, restored["cluster_id"].as_str().unwrap());

    let (now, restored_kvs) = everything(&client).await;
    assert_eq!(now, revision, "the store revision carries over");
    assert_eq!(restored_kvs, kvs, "every key with its versions, revisions and lease");
    // History: an old version is still readable above the compaction point, not below it.
    let old_value = client.get_at("key-000", before_deletes - 1).await.unwrap();
    assert_eq!(old_value.kv.unwrap().value, b"v2-0");
    let at_201 = client.get_at("key-050", 201).await.unwrap().kv.unwrap();
    assert_eq!(at_201.value, b"v1-50", "a version overwritten after the compaction point survives");
    let compacted = client.get_at("key-000", 100).await.unwrap_err();
    assert!(matches!(compacted, kvset_client::Error::OutOfRange(_)), "{compacted:?}");
    // The lease exists with its keys and still ends them.
    let ttl = client.lease_time_to_live(lease, true).await.unwrap();
    assert_eq!(ttl.granted_ttl_seconds, 3600);
    assert_eq!(ttl.keys, vec![b"leased".to_vec()]);
    client.lease_revoke(lease).await.unwrap();
    assert!(client.get("leased").await.unwrap().is_none());
    // Members that joined received the data, and new writes continue the revisions.
    let next = client.put("after", "restore").await.unwrap().header.unwrap().revision;
    assert!(next > revision);
    for o in 1..3 {
        let c = new.client_for(o);
        eventually(&format!("kvset-{o} serves the restored data"), Duration::from_secs(20), || {
            let c = c.clone();
            async move { member_get(&c, "key-123").await.ok()?.filter(|kv| kv.value == b"v1-123") }
        })
        .await;
    }
    new.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_backup_is_refused_by_status_and_restore_and_changes_nothing() {
    let c = Cluster::start(1).await;
    for i in 0..50 {
        c.client().put(format!("k{i}"), "v").await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.snap");
    json(&c.endpoint(0), &["snapshot", "save", path(&good)]).await;
    c.shutdown().await;
    let bytes = std::fs::read(&good).unwrap();

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    let cases = [("flipped", flipped), ("truncated", bytes[..bytes.len() - 7].to_vec()), ("empty", vec![])];
    for (name, content) in cases {
        let bad = dir.path().join(format!("{name}.snap"));
        std::fs::write(&bad, content).unwrap();
        let (ok, _, err) = kvset("unused", &["snapshot", "status", path(&bad)]).await;
        assert!(!ok, "status accepted a {name} file");
        assert!(err.contains("check failed"), "{name}: {err}");
        let target = dir.path().join(format!("volume-{name}"));
        let (ok, _, err) =
            kvset("unused", &["snapshot", "restore", path(&bad), "--data-dir", path(&target)]).await;
        assert!(!ok, "restore accepted a {name} file");
        assert!(err.contains("not a usable backup") && err.contains("nothing was changed"), "{name}: {err}");
        assert!(!target.exists(), "{name}: restore touched the target directory");
    }
    // A good file is refused into a volume that is in use, which stays as it was.
    let used = dir.path().join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("kvset-volume.json"), "{}").unwrap();
    let (ok, _, err) =
        kvset("unused", &["snapshot", "restore", path(&good), "--data-dir", path(&used)]).await;
    assert!(!ok && err.contains("needs an empty or absent data directory"), "{err}");
    assert_eq!(std::fs::read_to_string(used.join("kvset-volume.json")).unwrap(), "{}");
    assert_eq!(std::fs::read_dir(&used).unwrap().count(), 1);
    // A name that is not a member's.
    let (ok, _, err) = kvset(
        "unused",
        &["snapshot", "restore", path(&good), "--data-dir", path(&dir.path().join("x")), "--name", "nope"],
    )
    .await;
    assert!(!ok && err.contains("--name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_backup_cronjobs_command_line_saves_checked_backups_and_keeps_the_newest() {
    let rendered =
        kvset_tests::manifests::render("deploy/k8s/overlays/backups").unwrap_or_else(|e| panic!("{e}"));
    let cron: Value = rendered.one("CronJob");
    let container = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> =
        container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let at = args.iter().position(|a| a == "--dir").unwrap() + 1;
    args[at] = dir.path().to_str().unwrap().to_string();
    let keep: usize = args[args.iter().position(|a| a == "--keep").unwrap() + 1].parse().unwrap();

    let c = Cluster::start(1).await;
    for round in 0..keep + 2 {
        c.client().put("round", round.to_string()).await.unwrap();
        let run = args.clone();
        let endpoint = c.endpoint(0);
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_kvset")).env("KVSET_ENDPOINTS", endpoint).args(&run).output()
        })
        .await
        .unwrap()
        .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), keep, "{files:?}");
    // The newest holds the last round, and every kept file checks out.
    for f in &files {
        json("unused", &["snapshot", "status", path(f)]).await;
    }
    let newest = json("unused", &["snapshot", "status", path(files.last().unwrap())]).await;
    let rev = c.client().get("round").await.unwrap().unwrap().mod_revision;
    assert_eq!(newest["revision"], rev);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_saved_by_etcdctl_is_checked_and_restored_and_a_damaged_one_refused() {
    let c = Cluster::start(1).await;
    for i in 0..100 {
        c.client().put(format!("k{i:02}"), format!("v{i}")).await.unwrap();
    }
    let revision = c.client().get("k99").await.unwrap().unwrap().mod_revision;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcdctl.db");
    let (endpoint, target) = (c.endpoint(0), file.clone());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        kvset_tests::etcd::run_etcdctl(&endpoint, &["snapshot", "save", target.to_str().unwrap()], None)
    })
    .await
    .unwrap();
    assert!(ok, "etcdctl snapshot save: {out}{err}");
    c.shutdown().await;

    let status = json("unused", &["snapshot", "status", path(&file)]).await;
    assert_eq!(status["revision"], revision, "{status}");
    assert_eq!(status["keys"], 100, "{status}");
    assert_eq!(status["etcd_framing"], true, "{status}");

    let mut new = Cluster::new(1, |_| {}).await;
    json("unused", &["snapshot", "restore", path(&file), "--data-dir", path(&new.data_dir(0))]).await;
    new.start_node(0).await;
    new.wait_voters(1, Duration::from_secs(30)).await;
    assert_eq!(new.client().get("k42").await.unwrap().unwrap().value, b"v42");
    new.shutdown().await;

    // A flipped bit anywhere (the snapshot, its padding or the digest) is refused.
    let good = std::fs::read(&file).unwrap();
    for at in [good.len() / 3, good.len() - 40, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let damaged = dir.path().join(format!("bad-{at}.db"));
        std::fs::write(&damaged, bad).unwrap();
        let (ok, _, err) = kvset("unused", &["snapshot", "status", path(&damaged)]).await;
        assert!(!ok && err.contains("check failed"), "flip at {at}: {err}");
        let target = dir.path().join(format!("volume-{at}"));
        let (ok, _, err) =
            kvset("unused", &["snapshot", "restore", path(&damaged), "--data-dir", path(&target)]).await;
        assert!(!ok && err.contains("nothing was changed"), "flip at {at}: {err}");
        assert!(!target.exists());
    }
}

/// etcdctl against `endpoints`, which must succeed; returns its standard output.
async fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    let (endpoints, args) = (endpoints.to_string(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kvset_tests::etcd::run_etcdctl(&endpoints, &args, None)
    })
    .await
    .unwrap();
    assert!(ok, "etcdctl failed:\n{out}\n{err}");
    out
}

/// Waits until every running member's physical compaction has handled every revision below
/// `compact`.
async fn compacted_everywhere(c: &Cluster, compact: i64) {
    for o in c.running() {
        let reader = c.node(o).member().reader().clone();
        eventually(&format!("kvset-{o} compacted below {compact}"), Duration::from_secs(20), || {
            let reader = reader.clone();
            async move { (reader.compacted_to().ok()? >= compact - 1).then_some(()) }
        })
        .await;
    }
}

/// Issue 23: a key deleted between two compactions came back — in reads at a revision, and as a
/// live key on every member that installed a snapshot and in every restored backup. The
/// sequence a user ran with etcdctl, on a 3-member cluster, then a member replaced from a
/// snapshot and a backup restored into a new cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_deleted_between_two_compactions_stays_deleted_in_history_snapshots_and_restores() {
    let mut c = Cluster::start_with(3, |c| {
        c.raft.snapshot_every_entries = 20;
        c.raft.keep_entries_after_snapshot = 5;
    })
    .await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    let all = (0..3).map(|o| c.endpoint(o)).collect::<Vec<_>>().join(",");
    etcdctl(&all, &["put", "k", "a"]).await;
    etcdctl(&all, &["put", "x", "1"]).await;
    etcdctl(&all, &["compaction", "3"]).await;
    compacted_everywhere(&c, 3).await;
    etcdctl(&all, &["del", "k"]).await;
    etcdctl(&all, &["put", "x", "2"]).await;
    etcdctl(&all, &["compaction", "5"]).await;
    compacted_everywhere(&c, 5).await;
    etcdctl(&all, &["put", "y", "1"]).await;

    let keys = |out: String| out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect::<Vec<_>>();
    for o in 0..3 {
        let one = c.endpoint(o);
        let at_5 = etcdctl(&one, &["get", "k", "--rev", "5", "--consistency=s"]).await;
        assert_eq!(at_5, "", "kvset-{o}: k was deleted at revision 4");
        let live = keys(etcdctl(&one, &["get", "", "--from-key", "--keys-only", "--consistency=s"]).await);
        assert_eq!(live, ["x", "y"], "kvset-{o}");
    }

    // kvset-2 loses its volume; the others have purged their logs behind a snapshot, so its
    // replacement is built from one.
    let client = c.client();
    for i in 0..40 {
        client.put(format!("fill-{i:02}"), "f").await.unwrap();
    }
    c.stop(2).await;
    c.wipe(2);
    c.start_node(2).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    let replaced = c.client_for(2);
    eventually("the replacement of kvset-2 caught up", Duration::from_secs(30), || {
        let replaced = replaced.clone();
        async move { member_get(&replaced, "fill-39").await.ok()?.map(|_| ()) }
    })
    .await;
    let two = c.endpoint(2);
    assert_eq!(etcdctl(&two, &["get", "k", "--consistency=s"]).await, "");
    assert_eq!(etcdctl(&two, &["get", "k", "--rev", "5", "--consistency=s"]).await, "");
    let live = keys(etcdctl(&two, &["get", "", "--from-key", "--keys-only", "--consistency=s"]).await);
    assert!(!live.contains(&"k".to_string()), "the replaced member serves the deleted key: {live:?}");

    // A backup restored into a new cluster.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    assert!(etcdctl(&c.endpoint(0), &["snapshot", "save", path(&file)]).await.contains("Snapshot saved"));
    c.shutdown().await;
    let mut new = Cluster::new(1, |_| {}).await;
    json("unused", &["snapshot", "restore", path(&file), "--data-dir", path(&new.data_dir(0))]).await;
    new.start_node(0).await;
    new.wait_leader(Duration::from_secs(30)).await;
    let restored = new.endpoint(0);
    assert_eq!(etcdctl(&restored, &["get", "k"]).await, "");
    let live = keys(etcdctl(&restored, &["get", "", "--from-key", "--keys-only"]).await);
    assert!(!live.contains(&"k".to_string()), "the restored cluster serves the deleted key: {live:?}");
    assert_eq!(live.len(), 42, "x, y and the 40 fill keys: {live:?}");
    new.shutdown().await;
}

/// Issue 24, items 5 and 8: a restore reused revision numbers (writes made after the backup had
/// revisions R+1…, and the restored cluster handed the same out again), and the token signing
/// key travelled in every backup (whoever held one could sign tokens for the live cluster, and
/// the restored cluster accepted the old cluster's tokens). By default a restore now raises the
/// revision by a billion and marks everything below compacted; backups hold no signing key, and
/// a restored cluster makes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_bumps_the_revision_and_old_tokens_are_refused() {
    use kvset_proto::etcdserverpb as epb;
    let old = Cluster::start(1).await;
    old.wait_leader(Duration::from_secs(30)).await;
    let ep = old.endpoint(0);
    for args in [
        vec!["user", "add", "root", "--new-user-password=rootpw", "--interactive=false"],
        vec!["user", "grant-role", "root", "root"],
        vec!["auth", "enable"],
        vec!["--user", "root:rootpw", "put", "k", "v"],
    ] {
        etcdctl(&ep, &args).await;
    }
    let mut raw = kvset_tests::etcd::Raw::connect(&ep).await;
    let login = epb::AuthenticateRequest { name: "root".into(), password: "rootpw".into() };
    let token = raw.auth.authenticate(login.clone()).await.unwrap().into_inner().token;
    let with_token = |token: &str| {
        let mut r = tonic::Request::new(epb::RangeRequest { key: b"k".to_vec(), ..Default::default() });
        r.metadata_mut().insert("token", token.parse().unwrap());
        r
    };
    let revision = raw.kv.range(with_token(&token)).await.unwrap().into_inner().header.unwrap().revision;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    assert!(etcdctl(&ep, &["--user", "root:rootpw", "snapshot", "save", path(&file)])
        .await
        .contains("saved"));
    old.shutdown().await;

    // etcdctl frames it as etcd's snapshots: the kvset snapshot inside, then a SHA-256.
    let unframed = dir.path().join("backup.snap");
    kvset_storage::snapshot::unframe_etcd(&file, &unframed, 32).expect("etcd's framing");
    let header = kvset_storage::snapshot::verify(&unframed).expect("a readable backup");
    assert!(header.auth.enabled, "the backup carries users and roles");
    assert!(header.auth.token_key.is_empty(), "the backup holds the token signing key");

    let mut new = Cluster::new(1, |_| {}).await;
    let restored =
        json("unused", &["snapshot", "restore", path(&file), "--data-dir", path(&new.data_dir(0))]).await;
    let bumped = revision + kvset_storage::seed::DEFAULT_BUMP_REVISION as i64;
    assert_eq!(restored["revision"], bumped, "{restored}");
    assert_eq!(restored["backup_revision"], revision, "{restored}");
    new.start_node(0).await;
    new.wait_leader(Duration::from_secs(30)).await;
    let mut raw = kvset_tests::etcd::Raw::connect(&new.endpoint(0)).await;
    let refused = raw.kv.range(with_token(&token)).await.expect_err("the old cluster's token was accepted");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let token = raw.auth.authenticate(login).await.unwrap().into_inner().token;
    let now = raw.kv.range(with_token(&token)).await.unwrap().into_inner();
    assert_eq!(now.header.unwrap().revision, bumped);
    assert_eq!(now.kvs[0].value, b"v");
    let mut at_old = with_token(&token);
    at_old.get_mut().revision = revision;
    let compacted = raw.kv.range(at_old).await.expect_err("a read below the bumped revision");
    assert!(compacted.message().contains("compacted"), "{compacted:?}");
    new.shutdown().await;
}
