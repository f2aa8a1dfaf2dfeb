//! History, watches and leases on an in-process cluster: what kvset.v1 promises, and every
//! limit and bad input refused with nothing changed.

use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;
use kvset_client::pb;
use kvset_client::Error;
use kvset_client::WatchEvent;
use kvset_client::WatchOptions;
use kvset_proto::v1::kv_client::KvClient;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::info;

const T: Duration = Duration::from_secs(30);

async fn kv(c: &Cluster, ordinal: u32) -> KvClient<Channel> {
    KvClient::connect(format!("http://{}", c.endpoint(ordinal))).await.unwrap()
}

/// A raw watch stream: its request sender and response stream.
struct RawWatch {
    tx: mpsc::Sender<pb::WatchRequest>,
    rx: tonic::Streaming<pb::WatchResponse>,
}

impl RawWatch {
    async fn open(c: &Cluster, ordinal: u32) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = kv(c, ordinal).await.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: pb::watch_request::Request) {
        self.tx.send(pb::WatchRequest { request: Some(r) }).await.unwrap();
    }

    async fn create(&self, c: pb::WatchCreateRequest) {
        self.send(pb::watch_request::Request::Create(c)).await;
    }

    async fn next(&mut self) -> pb::WatchResponse {
        tokio::time::timeout(T, self.rx.next()).await.expect("a watch response in time").unwrap().unwrap()
    }

    /// Events until `n` have arrived.
    async fn events(&mut self, n: usize) -> Vec<pb::Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let r = self.next().await;
            assert!(!r.canceled, "{r:?}");
            out.extend(r.events);
        }
        out
    }
}

fn prefix(p: &str, start: i64) -> pb::WatchCreateRequest {
    pb::WatchCreateRequest {
        key: p.into(),
        prefix: true,
        start_revision: start,
        prev_kv: true,
        ..Default::default()
    }
}

/// An event as (key, mod revision, value — none for a delete, previous value).
type Ev = (String, i64, Option<String>, Option<String>);

fn ev(e: &pb::Event) -> Ev {
    let kv = e.kv.clone().unwrap_or_default();
    let value = (e.r#type == pb::event::EventType::Put as i32)
        .then(|| String::from_utf8_lossy(&kv.value).into_owned());
    let prev = e.prev_kv.as_ref().map(|p| String::from_utf8_lossy(&p.value).into_owned());
    (String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision, value, prev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_at_past_revisions_and_compaction() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let r1 = client.put("h", "1").await.unwrap().header.unwrap().revision;
    let r2 = client.put("h", "2").await.unwrap().header.unwrap().revision;
    client.delete(pb::DeleteRequest { key: b"h".to_vec(), ..Default::default() }).await.unwrap();
    info!("--- every member serves the history");
    for o in 0..3 {
        let member = c.client_for(o);
        let at = |rev| {
            let member = member.clone();
            async move {
                let r = member
                    .get_request(pb::GetRequest {
                        key: b"h".to_vec(),
                        revision: rev,
                        consistency: pb::ReadConsistency::Serializable as i32,
                    })
                    .await
                    .unwrap();
                r.kv.map(|kv| (String::from_utf8(kv.value).unwrap(), kv.version, kv.mod_revision))
            }
        };
        eventually("the member applied the delete", T, || async { at(0).await.is_none().then_some(()) })
            .await;
        assert_eq!(at(r1).await, Some(("1".into(), 1, r1)));
        assert_eq!(at(r2).await, Some(("2".into(), 2, r2)));
    }
    let range = client
        .range(pb::RangeRequest { key: b"h".to_vec(), prefix: true, revision: r2, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(range.kvs.len(), 1);
    assert!(range.header.unwrap().revision > r2, "the header carries the current revision");

    info!("--- a future revision, then a compaction: OUT_OF_RANGE naming the revisions");
    let future = client.get_at("h", r2 + 100).await.unwrap_err();
    assert!(matches!(&future, Error::OutOfRange(m) if m.contains("future")), "{future:?}");
    client.compact(r2).await.unwrap();
    let compacted = client.get_at("h", r1).await.unwrap_err();
    assert!(
        matches!(&compacted, Error::OutOfRange(m) if m.contains("compacted") && m.contains(&r2.to_string())),
        "{compacted:?}"
    );
    assert!(client.get_at("h", r2).await.unwrap().kv.is_some(), "the compact revision itself stays readable");
    for bad in [r2, r1] {
        let e = client.compact(bad).await.unwrap_err();
        assert!(matches!(&e, Error::OutOfRange(m) if m.contains("compacted")), "{e:?}");
    }
    let e = client.compact(r2 + 1000).await.unwrap_err();
    assert!(matches!(&e, Error::OutOfRange(m) if m.contains("future")), "{e:?}");
    assert!(matches!(client.compact(0).await.unwrap_err(), Error::InvalidArgument(_)));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn automatic_retention_compacts_the_old_history() {
    let c = Cluster::start_with(3, |cfg| {
        cfg.compaction.retain_revisions = 10;
        cfg.compaction.check_interval_ms = 200;
    })
    .await;
    let client = c.client();
    let first = client.put("r", "0").await.unwrap().header.unwrap().revision;
    for i in 1..30 {
        client.put("r", i.to_string()).await.unwrap();
    }
    eventually("the old history is compacted", T, || async {
        matches!(client.get_at("r", first).await, Err(Error::OutOfRange(_))).then_some(())
    })
    .await;
    let now = client.get_request(pb::GetRequest { key: b"r".to_vec(), ..Default::default() }).await.unwrap();
    let current = now.header.unwrap().revision;
    assert!(client.get_at("r", current - 9).await.is_ok(), "the last 10 revisions stay readable");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_replays_history_streams_changes_filters_and_cancels() {
    let c = Cluster::start(3).await;
    let client = c.client();
    let start = client.put("w/a", "1").await.unwrap().header.unwrap().revision;
    client.put("w/b", "1").await.unwrap();
    client.put("other", "x").await.unwrap();
    let follower = (0..3).find(|o| Some(*o) != c.leader()).unwrap();
    let mut w = RawWatch::open(&c, follower).await;
    info!("--- a prefix watch from a past revision replays, then follows, on a follower");
    w.create(prefix("w/", start)).await;
    let created = w.next().await;
    assert!(created.created && created.watch_id == 0, "{created:?}");
    client.put("w/a", "2").await.unwrap();
    client.delete(pb::DeleteRequest { key: b"w/b".to_vec(), ..Default::default() }).await.unwrap();
    let events: Vec<_> = w.events(4).await.iter().map(ev).collect();
    assert_eq!(events[0], ("w/a".into(), start, Some("1".into()), None));
    assert_eq!(events[1].0, "w/b");
    assert_eq!(
        (events[2].0.as_str(), events[2].2.as_deref(), events[2].3.as_deref()),
        ("w/a", Some("2"), Some("1"))
    );
    assert_eq!(
        (events[3].0.as_str(), events[3].2.as_deref(), events[3].3.as_deref()),
        ("w/b", None, Some("1"))
    );

    info!("--- a second watch on the stream: puts only, id chosen by the client; then a progress request");
    w.create(pb::WatchCreateRequest { no_delete: true, watch_id: 7, ..prefix("w/", 0) }).await;
    assert!(w.next().await.created);
    client.delete(pb::DeleteRequest { key: b"w/a".to_vec(), ..Default::default() }).await.unwrap();
    let last = client.put("w/c", "1").await.unwrap().header.unwrap().revision;
    let mut seen = Vec::new();
    while !seen.iter().any(|(id, e): &(i64, Ev)| *id == 7 && e.0 == "w/c") {
        let r = w.next().await;
        seen.extend(r.events.iter().map(|e| (r.watch_id, ev(e))));
    }
    assert!(!seen.iter().any(|(id, e)| *id == 7 && e.2.is_none()), "watch 7 asked for no deletes: {seen:?}");
    w.send(pb::watch_request::Request::Progress(pb::WatchProgressRequest {})).await;
    let progress = loop {
        let r = w.next().await;
        if r.progress {
            break r;
        }
    };
    assert_eq!(progress.watch_id, -1);
    assert!(progress.header.unwrap().revision >= last);

    info!("--- cancel: the watch ends with a canceled response, the other goes on");
    w.send(pb::watch_request::Request::Cancel(pb::WatchCancelRequest { watch_id: 7 })).await;
    let canceled = loop {
        let r = w.next().await;
        if r.canceled {
            break r;
        }
    };
    assert_eq!(canceled.watch_id, 7);
    client.put("w/d", "1").await.unwrap();
    let r = w.next().await;
    assert_eq!((r.watch_id, r.events.len()), (0, 1));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_limits_and_bad_requests_are_refused_in_the_stream() {
    let c = Cluster::start_with(1, |cfg| {
        cfg.watch.max_per_stream = 2;
        cfg.watch.max_per_member = 3;
    })
    .await;
    let client = c.client();
    let r = client.put("x", "1").await.unwrap().header.unwrap().revision;
    client.put("x", "2").await.unwrap();
    client.compact(r + 1).await.unwrap();
    let mut w = RawWatch::open(&c, 0).await;
    info!("--- a compacted start revision: created, then canceled with the compact revision");
    w.create(prefix("x", r)).await;
    assert!(w.next().await.created);
    let gone = w.next().await;
    assert!(gone.canceled && gone.compact_revision == r + 1, "{gone:?}");
    info!("--- an empty key, an inverted range, a duplicate id: refused with a reason");
    w.create(pb::WatchCreateRequest::default()).await;
    let refused = w.next().await;
    assert!(
        refused.canceled && !refused.created && refused.cancel_reason.contains("key is empty"),
        "{refused:?}"
    );
    w.create(pb::WatchCreateRequest { key: b"b".to_vec(), range_end: b"a".to_vec(), ..Default::default() })
        .await;
    assert!(w.next().await.cancel_reason.contains("range_end"));
    w.create(pb::WatchCreateRequest { watch_id: 5, ..prefix("a", 0) }).await;
    assert!(w.next().await.created);
    w.create(pb::WatchCreateRequest { watch_id: 5, ..prefix("a", 0) }).await;
    assert!(w.next().await.cancel_reason.contains("duplicate watch ID"));
    info!("--- watch.max_per_stream and watch.max_per_member");
    w.create(prefix("b", 0)).await;
    assert!(w.next().await.created);
    w.create(prefix("c", 0)).await;
    assert!(w.next().await.cancel_reason.contains("watch.max_per_stream = 2"));
    let mut other = RawWatch::open(&c, 0).await;
    other.create(prefix("d", 0)).await;
    assert!(other.next().await.created);
    other.create(prefix("e", 0)).await;
    assert!(other.next().await.cancel_reason.contains("watch.max_per_member = 3"));
    info!("--- a closed stream frees its watches");
    drop(w);
    eventually("the closed stream's watches are released", T, || async {
        let mut again = RawWatch::open(&c, 0).await;
        again.create(prefix("f", 0)).await;
        again.next().await.created.then_some(())
    })
    .await;
    c.shutdown().await;
}

/// A cluster of `n` whose members keep only 10 revisions of events in memory and queue one
/// response per stream, and a watch of prefix "s/" on kvset-0 that the caller reads slowly;
/// with the watch's `created` response.
async fn stalled_watcher(n: u32) -> (Cluster, RawWatch, pb::WatchResponse) {
    let c = Cluster::start_with(n, |cfg| {
        cfg.watch.event_cache_revisions = 10;
        cfg.watch.send_queue = 1;
    })
    .await;
    let mut watch = RawWatch::open(&c, 0).await;
    watch.create(prefix("s/", 0)).await;
    let created = watch.next().await;
    assert!(created.created, "{created:?}");
    (c, watch, created)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_watcher_holds_up_nothing_and_catches_up_from_the_history() {
    let (c, mut slow, _) = stalled_watcher(3).await;
    let client = c.client();
    info!("--- 300 writes while the watcher reads nothing: writes are not slowed down");
    let started = Instant::now();
    for i in 0..300 {
        client.put(format!("s/{}", i % 7), i.to_string()).await.unwrap();
    }
    let writes_took = started.elapsed();
    info!("--- it then receives every event, in order, once (most from the history)");
    let events = slow.events(300).await;
    let values: Vec<String> = events.iter().map(|e| ev(e).2.unwrap()).collect();
    assert_eq!(values, (0..300).map(|i| i.to_string()).collect::<Vec<_>>());
    println!("300 writes with a stalled watcher took {writes_took:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_watcher_whose_position_is_compacted_is_canceled_with_the_compact_revision() {
    let (c, mut slow, created) = stalled_watcher(1).await;
    let client = c.client();
    let first = created.header.unwrap().revision + 1;
    info!("--- 400 writes of 4 KiB (more than HTTP/2 windows and send buffers hold) while it reads nothing");
    for i in 0..400 {
        client.put(format!("s/{}", i % 7), format!("{i:04096}")).await.unwrap();
    }
    let now =
        client.get_request(pb::GetRequest { key: b"s/0".to_vec(), ..Default::default() }).await.unwrap();
    let compacted = now.header.unwrap().revision;
    client.compact(compacted).await.unwrap();
    info!("--- it gets what was already on its way, in order, then a cancel naming the compact revision");
    let mut next = first;
    let canceled = loop {
        let r = slow.next().await;
        if r.canceled {
            break r;
        }
        for e in &r.events {
            assert_eq!(e.kv.as_ref().unwrap().mod_revision, next, "events in order, none skipped");
            next += 1;
        }
    };
    assert!(next < compacted, "the watcher was behind when the history was compacted (next {next})");
    assert_eq!(canceled.compact_revision, compacted, "{canceled:?}");
    assert!(canceled.cancel_reason.contains(&format!("next revision {next} was compacted")), "{canceled:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_watch_resumes_on_another_member_without_gaps_or_repeats() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    let options = WatchOptions { prefix: true, ..Default::default() };
    let mut watch = client.watch("r/", options).await.unwrap();
    let writer = c.client();
    let writes = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..150 {
            if writer.put(format!("r/{}", i % 5), i.to_string()).await.is_ok() {
                acked.push(i);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acked
    });
    let mut got: Vec<(String, i64)> = Vec::new();
    let mut stopped = Vec::new();
    while got.len() < 150 {
        let delivery =
            tokio::time::timeout(T, watch.next()).await.expect("events keep coming").unwrap().unwrap();
        if let WatchEvent::Events { events, .. } = delivery {
            got.extend(events.iter().map(ev).map(|(k, r, _, _)| (k, r)));
        }
        // Stop members one after the other under the watch (it is on one of them).
        if got.len() > 30 && stopped.is_empty() {
            for o in 0..3 {
                c.stop(o).await;
                stopped.push(o);
                c.start_node(o).await;
                c.wait_voters(3, T).await;
            }
        }
    }
    let acked = writes.await.unwrap();
    assert_eq!(acked.len(), 150, "every write was acknowledged");
    let revisions: Vec<i64> = got.iter().map(|(_, r)| *r).collect();
    let mut sorted = revisions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(revisions, sorted, "in order, each once");
    assert_eq!(revisions.len(), 150, "nothing dropped");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_that_requires_a_leader_ends_when_its_member_has_none() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    let lone = (0..3).find(|o| *o != leader).unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WatchRequest { request: Some(pb::watch_request::Request::Create(prefix("z", 0))) })
        .await
        .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert("hasleader", "true".parse().unwrap());
    let mut stream = kv(&c, lone).await.watch(req).await.unwrap().into_inner();
    assert!(stream.next().await.unwrap().unwrap().created);
    info!("--- the other two stop: the member loses its leader and ends the stream");
    for o in (0..3).filter(|o| *o != lone) {
        c.stop(o).await;
    }
    let ended = tokio::time::timeout(T, stream.next()).await.expect("the stream ends").unwrap();
    let status = ended.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_grant_attach_renew_report_revoke_and_refuse_bad_input() {
    let c = Cluster::start(3).await;
    let client = c.client();
    info!("--- TTL bounds, negative ids: INVALID_ARGUMENT");
    for bad in [0, 4, 9_000_000_001] {
        assert!(
            matches!(client.lease_grant(bad, 0).await, Err(Error::InvalidArgument(m)) if m.contains("lease."))
        );
    }
    assert!(matches!(client.lease_grant(10, -3).await, Err(Error::InvalidArgument(_))));
    info!("--- a key on an unknown lease: NOT_FOUND, nothing written");
    let before =
        client.get_request(pb::GetRequest { key: b"l/x".to_vec(), ..Default::default() }).await.unwrap();
    let e = client
        .put_request(pb::PutRequest {
            key: b"l/x".to_vec(),
            value: b"v".to_vec(),
            lease: 12345,
            prev_kv: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::NotFound(m) if m.contains("12345")), "{e:?}");
    let after =
        client.get_request(pb::GetRequest { key: b"l/x".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(after.kv, None);
    assert_eq!(after.header.unwrap().revision, before.header.unwrap().revision, "the revision did not move");

    info!("--- grant with a chosen id, attach two keys, time to live, list");
    let lease = client.lease_grant(30, 777).await.unwrap();
    assert_eq!((lease.id, lease.ttl_seconds), (777, 30));
    assert!(
        matches!(client.lease_grant(30, 777).await, Err(Error::FailedPrecondition(m)) if m.contains("exists"))
    );
    for k in ["l/a", "l/b"] {
        client
            .put_request(pb::PutRequest { key: k.into(), value: b"v".to_vec(), lease: 777, prev_kv: false })
            .await
            .unwrap();
    }
    let ttl = client.lease_time_to_live(777, true).await.unwrap();
    assert_eq!(ttl.granted_ttl_seconds, 30);
    // A leader that took over lately gives every lease an election timeout more (2 s here).
    assert!(ttl.ttl_seconds > 0 && ttl.ttl_seconds <= 32, "{ttl:?}");
    assert_eq!(ttl.keys, vec![b"l/a".to_vec(), b"l/b".to_vec()]);
    assert!(client.lease_leases().await.unwrap().leases.iter().any(|l| l.id == 777));
    info!("--- renewals through a follower; unknown leases renew to TTL 0 and report TTL -1");
    let follower = (0..3).find(|o| Some(*o) != c.leader()).unwrap();
    assert_eq!(c.client_for(follower).lease_renew(777).await.unwrap(), 30);
    assert_eq!(c.client_for(follower).lease_renew(4242).await.unwrap(), 0);
    assert_eq!(client.lease_time_to_live(4242, false).await.unwrap().ttl_seconds, -1);
    info!("--- revoke: both keys go at one revision; revoking again is NOT_FOUND");
    let mut w = RawWatch::open(&c, follower).await;
    w.create(prefix("l/", 0)).await;
    assert!(w.next().await.created);
    client.lease_revoke(777).await.unwrap();
    let r = w.next().await;
    assert_eq!(r.events.len(), 2, "one response, one revision: {r:?}");
    assert!(r.events.iter().all(|e| e.r#type == pb::event::EventType::Delete as i32));
    assert!(client.get("l/a").await.unwrap().is_none() && client.get("l/b").await.unwrap().is_none());
    assert!(matches!(client.lease_revoke(777).await, Err(Error::NotFound(_))));
    assert!(matches!(client.lease_revoke(0).await, Err(Error::InvalidArgument(_))));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unrenewed_lease_expires_on_time_and_a_renewed_one_survives_a_leader_change() {
    let mut c = Cluster::start(3).await;
    let client = c.client();
    let kept = client.lease_grant(5, 0).await.unwrap().id;
    let dropped = client.lease_grant(5, 0).await.unwrap().id;
    for (k, l) in [("e/kept", kept), ("e/dropped", dropped)] {
        client
            .put_request(pb::PutRequest { key: k.into(), value: b"v".to_vec(), lease: l, prev_kv: false })
            .await
            .unwrap();
    }
    let granted = Instant::now();
    let _keep = client.keep_alive(kept, 5);
    info!("--- the leader stops: the renewed lease lives on, the other expires");
    let leader = c.wait_leader(T).await;
    c.stop(leader).await;
    let config = c.config(0);
    let bound = Duration::from_secs(5)
        + Duration::from_millis(config.raft.election_timeout_max_ms) * 2
        + Duration::from_secs(3);
    let survivors = c.client();
    eventually("the unrenewed lease's key is gone", bound, || async {
        survivors.get("e/dropped").await.ok().filter(|kv| kv.is_none()).map(|_| ())
    })
    .await;
    println!("the unrenewed lease expired {:?} after it was granted", granted.elapsed());
    assert!(granted.elapsed() >= Duration::from_secs(5), "never before its TTL");
    assert!(
        survivors.get("e/kept").await.unwrap().is_some(),
        "the renewed lease's key survived the failover"
    );
    c.start_node(leader).await;
    c.wait_voters(3, T).await;
    info!("--- leases survive a full restart");
    for o in 0..3 {
        c.stop(o).await;
    }
    for o in 0..3 {
        c.start_node(o).await;
    }
    c.wait_voters(3, T).await;
    let ttl = c.client().lease_time_to_live(kept, false).await.unwrap();
    assert_eq!(ttl.granted_ttl_seconds, 5);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lease_table_is_bounded() {
    let c = Cluster::start_with(1, |cfg| cfg.lease.max_leases = 2).await;
    let client = c.client();
    client.lease_grant(10, 0).await.unwrap();
    client.lease_grant(10, 0).await.unwrap();
    let e = client.lease_grant(10, 0).await.unwrap_err();
    assert!(e.to_string().contains("lease.max_leases"), "{e:?}");
    c.shutdown().await;
}
