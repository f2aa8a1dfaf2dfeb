//! Defragmentation as an operator runs it, against a `kvset serve` process: a member past its
//! space quota refuses writes; after deletes and a compaction the space is still held (sled
//! never shrinks its files); `kvset defrag` makes the member stop, rewrite its database and
//! serve again by itself, the volume shrinks, the alarm clears and writes are taken again,
//! with every key intact. And the offline form on a stopped member's data directory.

mod common;

use std::time::Duration;

use common::kvset;
use common::path;
use common::released_config;
use common::serve;
use common::Killed;
use kvset_client::pb;
use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_tests::cluster::Cluster;
use kvset_tests::poll_until;
use serde_json::Value;

const QUOTA: u64 = 24 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn defragmenting_a_member_past_its_quota_returns_the_space_and_lifts_the_alarm() {
    let mut c = Cluster::new(1, |c| c.quota_bytes = QUOTA).await;
    let tmp = tempfile::tempdir().unwrap();
    let config_file = released_config(&mut c, 0, tmp.path());
    let log = tmp.path().join("kvset-0.log");
    let _member = Killed(serve(&config_file, &log));
    let endpoint = c.endpoint(0);
    let client = Client::new([endpoint.clone()], ClientOptions::default()).unwrap();
    poll_until("the member serves", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.put("kept", "yes").await.ok() }
    })
    .await
    .unwrap();

    // Overwrite a few keys with 100 KB values until the quota refuses.
    let value = vec![b'v'; 100 * 1024];
    let mut i = 0;
    let refused = poll_until("a write refused by the quota", Duration::from_secs(120), || {
        i += 1;
        let (client, value, key) = (client.clone(), value.clone(), format!("big-{}", i % 20));
        async move { client.put(key, value).await.err() }
    })
    .await
    .unwrap();
    assert!(refused.to_string().contains("database space exceeded"), "{refused}");

    // Deleting and compacting frees space inside sled, not on the filesystem.
    client
        .delete(pb::DeleteRequest { key: b"big-".to_vec(), prefix: true, ..Default::default() })
        .await
        .unwrap();
    let revision = client.get("kept").await.unwrap().unwrap().mod_revision;
    let head = client.status_of(&endpoint).await.unwrap().revision;
    client.compact(head).await.unwrap();
    let (ok, out, err) = kvset(&endpoint, &["defrag"]).await;
    assert!(ok, "kvset defrag failed:\n{out}\n{err}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    let (before, after) = (report["before_bytes"].as_u64().unwrap(), report["after_bytes"].as_u64().unwrap());
    assert!(before >= QUOTA && after < QUOTA / 2, "before {before}, after {after}: {report}");
    println!("defrag: {before} -> {after} bytes in {} s", report["seconds"]);

    // The member is back by itself, with its data, and takes writes again.
    let kept = client.get("kept").await.unwrap().unwrap();
    assert_eq!((kept.value.as_slice(), kept.mod_revision), (&b"yes"[..], revision));
    assert!(client.get("big-1").await.unwrap().is_none());
    poll_until("writes are taken again", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.put("after", "defrag").await.ok() }
    })
    .await
    .unwrap();
    assert!(client.status_of(&endpoint).await.unwrap().alarms.is_empty());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("defragmented the database"), "{log_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_defrag_refuses_what_is_not_a_volume_and_a_running_member() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = kvset("unused", &["defrag", "--data-dir", path(dir.path())]).await;
    assert!(!ok && err.contains("not a kvset data directory"), "{err}");

    // A member that runs holds its database: the offline form must not touch it.
    let c = Cluster::start(1).await;
    c.client().put("k", "v").await.unwrap();
    let (ok, _, err) = kvset("unused", &["defrag", "--data-dir", path(&c.data_dir(0))]).await;
    assert!(!ok && err.contains("still running"), "{err}");
    assert_eq!(c.client().get("k").await.unwrap().unwrap().value, b"v");
    c.shutdown().await;
}
