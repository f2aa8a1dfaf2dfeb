//! The space quota (`quota_bytes`, like etcd's quota-backend-bytes): past it, writes that add
//! data are refused with RESOURCE_EXHAUSTED naming the quota and a NOSPACE alarm shows in
//! Status, `/metrics` and etcd's Alarm API (checked with the real etcdctl); reads, deletes,
//! revokes and compaction still work; nothing is lost; with room again (here: a higher quota
//! after a rolling restart) writes are taken again.

use std::time::Duration;

use kvset_client::pb;
use kvset_client::Error;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::harness::Harness;
use kvset_tests::poll_until;

const QUOTA: u64 = 24 << 20;

/// Whether `e` is the quota refusal.
fn is_no_space(e: &Error) -> bool {
    matches!(e, Error::Server { code, message }
        if *code == tonic::Code::ResourceExhausted && message.contains("database space exceeded"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_quota_growing_writes_are_refused_the_rest_works_and_room_lifts_the_alarm() {
    let mut c = Cluster::start_with(3, |c| c.quota_bytes = QUOTA).await;
    let client = c.client();
    let lease = client.lease_grant(600, 0).await.unwrap().id;
    client.put("first", "1").await.unwrap();

    // Fill with 100 KB values until the quota refuses one (the volume size is measured every
    // few seconds, so a few writes pass the line before the alarm).
    let value = vec![b'v'; 100 * 1024];
    let mut acked = Vec::new();
    let refusal = poll_until("a write refused by the quota", Duration::from_secs(120), || {
        let (client, value) = (client.clone(), value.clone());
        let key = format!("fill-{:04}", acked.len());
        acked.push(key.clone());
        async move { client.put(key, value).await.err() }
    })
    .await
    .unwrap();
    acked.pop(); // the refused one
    assert!(is_no_space(&refusal), "{refusal:?}");
    let message = refusal.to_string();
    assert!(message.contains("NOSPACE") && message.contains(&QUOTA.to_string()), "{message}");

    // Every growing write is refused, through any member and in any form; nothing was applied.
    let before = client.get("first").await.unwrap().unwrap().mod_revision;
    for o in 0..3 {
        let e = c.client_for(o).put("first", "2").await.unwrap_err();
        assert!(is_no_space(&e), "kvset-{o}: {e:?}");
    }
    let e = client.lease_grant(60, 0).await.unwrap_err();
    assert!(is_no_space(&e), "{e:?}");
    let txn = kvset_client::cas_request(b"first".to_vec(), Some(b"1"), b"3".to_vec());
    assert!(is_no_space(&client.txn(txn).await.unwrap_err()));
    let first = client.get("first").await.unwrap().unwrap();
    assert_eq!((first.value.as_slice(), first.mod_revision), (&b"1"[..], before));

    // The alarm shows in Status, /metrics and etcd's API (the real etcdctl).
    let leader = c.wait_leader(Duration::from_secs(10)).await;
    let status = client.status_of(&c.endpoint(leader)).await.unwrap();
    assert_eq!(status.quota_bytes, QUOTA);
    assert!(
        !status.alarms.is_empty() && status.alarms[0].starts_with("NOSPACE kvset-"),
        "{:?}",
        status.alarms
    );
    let metrics = kvset_tests::http_get(&c.ops_endpoint(leader), "/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("kvset_space_alarms ") && !l.ends_with(" 0")),
        "no raised alarm in /metrics"
    );
    let endpoint = c.endpoint(leader);
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || etcd::run_etcdctl(&endpoint, &["alarm", "list"], None))
            .await
            .unwrap();
    assert!(ok && out.contains("alarm:NOSPACE"), "etcdctl alarm list: {out} {err}");
    let endpoint = c.endpoint(leader);
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || etcd::run_etcdctl(&endpoint, &["put", "k", "v"], None))
            .await
            .unwrap();
    assert!(!ok && err.contains("database space exceeded"), "etcdctl put: {err}");

    // Reads, deletes, revokes and compaction still work; every acknowledged write is there.
    for key in &acked {
        assert_eq!(
            client.get(key.clone()).await.unwrap().map(|kv| kv.value.len()),
            Some(value.len()),
            "{key}"
        );
    }
    let deleted = client
        .delete(pb::DeleteRequest { key: b"fill-".to_vec(), prefix: true, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(deleted.deleted as usize, acked.len());
    client.lease_revoke(lease).await.unwrap();
    let rev = client.get("first").await.unwrap().unwrap().mod_revision;
    client.compact(rev).await.unwrap();

    // sled does not hand freed space back to the filesystem, so here room comes from a higher
    // quota, rolled out member by member (as a StatefulSet update would).
    c.set_env("KVSET_QUOTA_BYTES", Some(&(QUOTA * 100).to_string()));
    for o in 0..3 {
        c.stop(o).await;
        c.start_node(o).await;
        c.wait_voters(3, Duration::from_secs(60)).await;
    }
    let client = c.client();
    poll_until("writes are taken again", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.put("after", "room").await.ok() }
    })
    .await
    .unwrap();
    assert!(client.status_of(&c.endpoint(0)).await.unwrap().alarms.is_empty());
    c.shutdown().await;
}
