//! Differential tests: the same etcd v3 requests, byte for byte, sent to a real etcd (Debian's
//! `etcd-server`, started by each test) and to a 3-member kvset, both empty; every response is
//! compared field by field, revisions included (the member-specific header fields, cluster id,
//! member id and Raft term, aside). Then the call shapes the Kubernetes apiserver's storage
//! layer uses (as k3s-io/kine documents them), one test each, compared the same way.
//!
//! Every mismatch of a test is collected and reported together.

use std::time::Duration;
use std::time::Instant;

use kvset_proto::etcdserverpb as epb;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::etcd::EtcdServer;
use kvset_tests::etcd::Raw;
use kvset_tests::etcd::SideBySide;
use tokio::sync::mpsc;
use tonic::Streaming;

/// One etcd and one kvset, and the mismatches found so far.
struct Both {
    etcd: Raw,
    kvset: Raw,
    compared: usize,
    mismatches: Vec<String>,
    _etcd: EtcdServer,
    cluster: Cluster,
}

impl Both {
    async fn start() -> Self {
        let both = SideBySide::start().await;
        Self {
            etcd: Raw::connect(&both.etcd.endpoint).await,
            kvset: Raw::connect(&both.kvset_endpoint()).await,
            compared: 0,
            mismatches: Vec::new(),
            _etcd: both.etcd,
            cluster: both.cluster,
        }
    }

    fn compare(&mut self, what: &str, etcd: String, kvset: String) {
        self.compared += 1;
        if etcd != kvset {
            self.mismatches.push(format!("{what}:\n    etcd:  {etcd}\n    kvset: {kvset}"));
        }
    }

    async fn finish(self) {
        let Both { compared, mismatches, cluster, .. } = self;
        cluster.shutdown().await;
        assert!(
            mismatches.is_empty(),
            "{} of {compared} responses differ from etcd's:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }
}

/// Sends the same request to both servers and compares the outcomes; `$call` is evaluated
/// once per server with `$c` bound to its clients.
macro_rules! same {
    ($both:expr, $what:expr, |$c:ident| $call:expr) => {
        same!($both, $what, |s: String| s, |$c| $call)
    };
    ($both:expr, $what:expr, $normalize:expr, |$c:ident| $call:expr) => {{
        let normalize = $normalize;
        let mut $c = $both.etcd.clone();
        let e = normalize(etcd::outcome($call.await));
        let mut $c = $both.kvset.clone();
        let k = normalize(etcd::outcome($call.await));
        $both.compare($what, e, k);
    }};
}

fn put(key: &str, value: &str) -> epb::PutRequest {
    epb::PutRequest { key: key.into(), value: value.into(), ..Default::default() }
}

fn range(key: &str, end: &str) -> epb::RangeRequest {
    epb::RangeRequest { key: key.into(), range_end: end.into(), ..Default::default() }
}

fn all() -> epb::RangeRequest {
    epb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }
}

fn op_put(key: &str, value: &str) -> epb::RequestOp {
    epb::RequestOp { request: Some(epb::request_op::Request::RequestPut(put(key, value))) }
}

fn op_range(r: epb::RangeRequest) -> epb::RequestOp {
    epb::RequestOp { request: Some(epb::request_op::Request::RequestRange(r)) }
}

fn op_delete(key: &str, end: &str, prev_kv: bool) -> epb::RequestOp {
    epb::RequestOp {
        request: Some(epb::request_op::Request::RequestDeleteRange(epb::DeleteRangeRequest {
            key: key.into(),
            range_end: end.into(),
            prev_kv,
        })),
    }
}

fn op_txn(t: epb::TxnRequest) -> epb::RequestOp {
    epb::RequestOp { request: Some(epb::request_op::Request::RequestTxn(t)) }
}

fn cmp(key: &str, result: epb::compare::CompareResult, target: epb::compare::TargetUnion) -> epb::Compare {
    use epb::compare::CompareTarget as T;
    use epb::compare::TargetUnion as U;
    let t = match target {
        U::Version(_) => T::Version,
        U::CreateRevision(_) => T::Create,
        U::ModRevision(_) => T::Mod,
        U::Value(_) => T::Value,
        U::Lease(_) => T::Lease,
    };
    epb::Compare {
        result: result as i32,
        target: t as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(target),
    }
}

fn txn(
    compare: Vec<epb::Compare>,
    success: Vec<epb::RequestOp>,
    failure: Vec<epb::RequestOp>,
) -> epb::TxnRequest {
    epb::TxnRequest { compare, success, failure }
}

/// Replaces the remaining TTL (which moves with the clock) of a LeaseTimeToLive answer.
fn remaining_ttl_elided(s: String) -> String {
    match s.find(", ttl: ") {
        Some(at) => {
            let rest = &s[at + 7..];
            let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(rest.len());
            let ttl: i64 = rest[..end].parse().unwrap_or(i64::MIN);
            let shown = if ttl >= 0 { "<remaining>".to_string() } else { ttl.to_string() };
            format!("{}, ttl: {shown}{}", &s[..at], &rest[end..])
        }
        None => s,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_txn_lease_and_compaction_answers_match_etcds() {
    use epb::compare::CompareResult as R;
    use epb::compare::TargetUnion as U;
    use epb::range_request::SortOrder as O;
    use epb::range_request::SortTarget as ST;
    let mut b = Both::start().await;

    // Puts, with their options and errors.
    same!(b, "range on the empty store (revision 1)", |c| c.kv.range(range("a", "")));
    same!(b, "put a", |c| c.kv.put(put("a", "1")));
    same!(b, "put b prev_kv (none)", |c| c.kv.put(epb::PutRequest { prev_kv: true, ..put("b", "2") }));
    same!(b, "put a prev_kv", |c| c.kv.put(epb::PutRequest { prev_kv: true, ..put("a", "3") }));
    same!(b, "put c empty value", |c| c.kv.put(put("c", "")));
    same!(b, "put empty key", |c| c.kv.put(put("", "x")));
    same!(b, "put ignore_value on a missing key", |c| c
        .kv
        .put(epb::PutRequest { ignore_value: true, ..put("zz", "") }));
    same!(b, "put ignore_value with a value", |c| c
        .kv
        .put(epb::PutRequest { ignore_value: true, ..put("a", "x") }));
    same!(b, "put ignore_value", |c| c.kv.put(epb::PutRequest {
        ignore_value: true,
        prev_kv: true,
        ..put("a", "")
    }));
    same!(b, "put ignore_lease with a lease", |c| c.kv.put(epb::PutRequest {
        ignore_lease: true,
        lease: 7,
        ..put("a", "y")
    }));
    same!(b, "put with an unknown lease", |c| c.kv.put(epb::PutRequest { lease: 12345, ..put("a", "y") }));
    for i in 0..4 {
        same!(b, "put d/*", |c| c.kv.put(put(&format!("d/{i}"), &format!("v{}", 3 - i))));
    }

    // Ranges: the key conventions, options and filters.
    same!(b, "range a", |c| c.kv.range(range("a", "")));
    same!(b, "range all (\\0, \\0)", |c| c.kv.range(all()));
    same!(b, "range from b (range_end \\0)", |c| c.kv.range(range("b", "\0")));
    same!(b, "range [a, c)", |c| c.kv.range(range("a", "c")));
    same!(b, "range with range_end below key (empty)", |c| c.kv.range(range("c", "a")));
    same!(b, "range with an empty key", |c| c.kv.range(range("", "")));
    same!(b, "range limit 1", |c| c.kv.range(epb::RangeRequest { limit: 1, ..all() }));
    same!(b, "range limit 3 count", |c| c.kv.range(epb::RangeRequest { limit: 3, ..range("d/", "d0") }));
    same!(b, "range count_only", |c| c.kv.range(epb::RangeRequest { count_only: true, ..all() }));
    same!(b, "range count_only with limit", |c| c.kv.range(epb::RangeRequest {
        count_only: true,
        limit: 1,
        ..all()
    }));
    same!(b, "range keys_only", |c| c.kv.range(epb::RangeRequest { keys_only: true, ..all() }));
    same!(b, "range sort value descend", |c| c.kv.range(epb::RangeRequest {
        sort_target: ST::Value as i32,
        sort_order: O::Descend as i32,
        ..range("d/", "d0")
    }));
    same!(b, "range sort mod, no order (ascending)", |c| c
        .kv
        .range(epb::RangeRequest { sort_target: ST::Mod as i32, ..all() }));
    // Found by the random differential: with no order and a limit, etcd sorts only the first
    // limit + 1 keys in key order.
    same!(b, "range sort version, no order, limit 1", |c| c.kv.range(epb::RangeRequest {
        sort_target: ST::Version as i32,
        limit: 1,
        ..all()
    }));
    same!(b, "range sort create descend limit 2", |c| c.kv.range(epb::RangeRequest {
        sort_target: ST::Create as i32,
        sort_order: O::Descend as i32,
        limit: 2,
        ..all()
    }));
    same!(b, "range sort key descend", |c| c
        .kv
        .range(epb::RangeRequest { sort_order: O::Descend as i32, ..all() }));
    // Found by the random differential: keys that tie on the target stay in key order when
    // sorted descending (kvset reversed them).
    same!(b, "range sort version descend, ties", |c| c.kv.range(epb::RangeRequest {
        sort_target: ST::Version as i32,
        sort_order: O::Descend as i32,
        ..all()
    }));
    same!(b, "range sort version ascend", |c| c.kv.range(epb::RangeRequest {
        sort_target: ST::Version as i32,
        sort_order: O::Ascend as i32,
        ..all()
    }));
    same!(b, "range min_mod_revision", |c| c.kv.range(epb::RangeRequest { min_mod_revision: 6, ..all() }));
    same!(b, "range max_mod_revision with limit", |c| c.kv.range(epb::RangeRequest {
        max_mod_revision: 7,
        limit: 2,
        ..all()
    }));
    same!(b, "range min/max create revision", |c| c.kv.range(epb::RangeRequest {
        min_create_revision: 3,
        max_create_revision: 7,
        ..all()
    }));
    same!(b, "range at revision 2", |c| c.kv.range(epb::RangeRequest { revision: 2, ..all() }));
    same!(b, "range at revision 3, serializable", |c| c.kv.range(epb::RangeRequest {
        revision: 3,
        serializable: true,
        ..all()
    }));
    same!(b, "range at a future revision", |c| c.kv.range(epb::RangeRequest { revision: 1000, ..all() }));
    same!(b, "range at a negative revision (now)", |c| c
        .kv
        .range(epb::RangeRequest { revision: -1, ..range("a", "") }));

    // Deletes.
    same!(b, "delete a missing key", |c| c
        .kv
        .delete_range(epb::DeleteRangeRequest { key: b"zz".to_vec(), ..Default::default() }));
    same!(b, "delete [b, c) prev_kv", |c| c.kv.delete_range(epb::DeleteRangeRequest {
        key: b"b".to_vec(),
        range_end: b"c".to_vec(),
        prev_kv: true
    }));
    same!(b, "delete with an empty key", |c| c.kv.delete_range(epb::DeleteRangeRequest::default()));
    same!(b, "range all after the delete", |c| c.kv.range(all()));

    // Transactions.
    same!(b, "txn value compare, puts, a range that sees them, a delete", |c| c.kv.txn(txn(
        vec![cmp("a", R::Equal, U::Value(b"3".to_vec()))],
        vec![op_put("e", "4"), op_range(range("e", "")), op_delete("c", "", true), op_range(all())],
        vec![op_put("f", "5")],
    )));
    same!(b, "txn version of a missing key = 0", |c| c.kv.txn(txn(
        vec![cmp("missing", R::Equal, U::Version(0))],
        vec![op_range(epb::RangeRequest { count_only: true, ..all() })],
        vec![],
    )));
    same!(b, "txn value compare on a missing key fails", |c| c.kv.txn(txn(
        vec![cmp("missing", R::Equal, U::Value(vec![]))],
        vec![],
        vec![op_range(range("a", ""))],
    )));
    same!(b, "txn compare over a range", |c| c.kv.txn(txn(
        vec![epb::Compare { range_end: b"e".to_vec(), ..cmp("a", R::Greater, U::CreateRevision(0)) }],
        vec![op_put("g", "6")],
        vec![op_put("h", "7")],
    )));
    same!(b, "txn nested", |c| c.kv.txn(txn(
        vec![cmp("a", R::Less, U::ModRevision(1000))],
        vec![
            op_txn(txn(
                vec![cmp("e", R::Equal, U::Value(b"4".to_vec()))],
                vec![op_put("n1", "x"), op_range(range("n1", ""))],
                vec![op_put("n2", "x")],
            )),
            op_range(range("n", "o"))
        ],
        vec![],
    )));
    same!(b, "txn lease compare", |c| c.kv.txn(txn(
        vec![cmp("a", R::Equal, U::Lease(0))],
        vec![op_put("l0", "x")],
        vec![],
    )));
    same!(b, "txn mismatched operand compares as zero", |c| c.kv.txn(epb::TxnRequest {
        compare: vec![epb::Compare {
            target: epb::compare::CompareTarget::Version as i32,
            ..cmp("a", R::Greater, U::Value(b"x".to_vec()))
        }],
        success: vec![op_range(range("a", ""))],
        failure: vec![],
    }));
    same!(b, "txn read-only", |c| c.kv.txn(txn(
        vec![cmp("a", R::Greater, U::Version(0))],
        vec![op_range(range("a", ""))],
        vec![]
    )));
    same!(b, "txn duplicate put", |c| c.kv.txn(txn(
        vec![],
        vec![op_put("x", "1"), op_put("x", "2")],
        vec![]
    )));
    same!(b, "txn put inside a deleted range", |c| c.kv.txn(txn(
        vec![],
        vec![op_delete("a", "z", false), op_put("b", "1")],
        vec![]
    )));
    same!(b, "txn put in a nested txn under a delete", |c| c.kv.txn(txn(
        vec![],
        vec![op_delete("q", "", false), op_txn(txn(vec![], vec![op_put("q", "1")], vec![]))],
        vec![],
    )));
    same!(b, "txn too many ops", |c| c.kv.txn(txn(
        vec![],
        (0..129).map(|i| op_put(&format!("t{i}"), "x")).collect(),
        vec![]
    )));
    same!(b, "txn empty op", |c| c.kv.txn(txn(vec![], vec![epb::RequestOp { request: None }], vec![])));
    same!(b, "txn compare with an empty key", |c| c.kv.txn(txn(
        vec![cmp("", R::Equal, U::Version(0))],
        vec![],
        vec![]
    )));
    same!(b, "txn put with an unknown lease", |c| c.kv.txn(txn(
        vec![],
        vec![
            op_put("ok", "1"),
            epb::RequestOp {
                request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
                    lease: 999,
                    ..put("bad", "1")
                })),
            }
        ],
        vec![],
    )));
    // Found by the random differential: with an unknown lease *and* ignore_value on a missing
    // key, etcd names the key inside a transaction and the lease outside one.
    let unknown_lease_missing_key =
        || epb::PutRequest { lease: 999, ignore_value: true, ..put("absent", "") };
    same!(b, "put with an unknown lease and ignore_value on a missing key", |c| c
        .kv
        .put(unknown_lease_missing_key()));
    same!(b, "txn put with an unknown lease and ignore_value on a missing key", |c| c.kv.txn(txn(
        vec![],
        vec![epb::RequestOp {
            request: Some(epb::request_op::Request::RequestPut(unknown_lease_missing_key())),
        }],
        vec![],
    )));
    same!(b, "range all after the transactions", |c| c.kv.range(all()));

    // Leases.
    let grant = |id: i64, ttl: i64| epb::LeaseGrantRequest { id, ttl };
    same!(b, "lease grant 1000", |c| c.lease.lease_grant(grant(1000, 60)));
    same!(b, "lease grant 1000 again", |c| c.lease.lease_grant(grant(1000, 60)));
    same!(b, "lease grant below the minimum TTL", |c| c.lease.lease_grant(grant(1001, 1)));
    same!(b, "lease grant a too large TTL", |c| c.lease.lease_grant(grant(1002, 9_000_000_001)));
    same!(b, "put l1 with lease", |c| c.kv.put(epb::PutRequest { lease: 1000, ..put("l1", "x") }));
    same!(b, "put l2 with lease", |c| c.kv.put(epb::PutRequest { lease: 1000, ..put("l2", "x") }));
    same!(b, "put l1 ignore_lease", |c| c.kv.put(epb::PutRequest { ignore_lease: true, ..put("l1", "y") }));
    same!(b, "range the leased keys", |c| c.kv.range(range("l", "m")));
    // etcd lists a lease's keys in its map's (random) order: compared sorted.
    same!(b, "lease time to live with keys", remaining_ttl_elided, |c| async {
        c.lease.lease_time_to_live(epb::LeaseTimeToLiveRequest { id: 1000, keys: true }).await.map(|r| {
            let mut r = r.into_inner();
            r.keys.sort();
            tonic::Response::new(r)
        })
    });
    same!(b, "lease time to live of an unknown lease", |c| c
        .lease
        .lease_time_to_live(epb::LeaseTimeToLiveRequest { id: 4242, keys: true }));
    let leases = |r: Result<tonic::Response<epb::LeaseLeasesResponse>, tonic::Status>| {
        let mut ids: Vec<i64> = r.expect("leases").into_inner().leases.iter().map(|l| l.id).collect();
        ids.sort();
        format!("{ids:?}")
    };
    let (e, k) = (
        leases(b.etcd.lease.lease_leases(epb::LeaseLeasesRequest {}).await),
        leases(b.kvset.lease.lease_leases(epb::LeaseLeasesRequest {}).await),
    );
    b.compare("lease list", e, k);
    same!(b, "lease revoke 1000", |c| c.lease.lease_revoke(epb::LeaseRevokeRequest { id: 1000 }));
    same!(b, "lease revoke 1000 again", |c| c.lease.lease_revoke(epb::LeaseRevokeRequest { id: 1000 }));
    same!(b, "the leased keys are gone", |c| c.kv.range(range("l", "m")));
    same!(b, "lease revoke 1001", |c| c.lease.lease_revoke(epb::LeaseRevokeRequest { id: 1001 }));

    // Compaction.
    same!(b, "compact 5", |c| c.kv.compact(epb::CompactionRequest { revision: 5, physical: true }));
    same!(b, "range below the compact revision", |c| c.kv.range(epb::RangeRequest { revision: 4, ..all() }));
    same!(b, "range at the compact revision", |c| c.kv.range(epb::RangeRequest { revision: 5, ..all() }));
    same!(b, "compact 5 again", |c| c.kv.compact(epb::CompactionRequest { revision: 5, physical: false }));
    same!(b, "compact below", |c| c.kv.compact(epb::CompactionRequest { revision: 3, physical: false }));
    same!(b, "compact a future revision", |c| c
        .kv
        .compact(epb::CompactionRequest { revision: 100_000, physical: false }));
    same!(b, "hash kv below the compact revision", |c| async {
        c.maintenance
            .hash_kv(epb::HashKvRequest { revision: 2 })
            .await
            .map(|r| tonic::Response::new(r.into_inner().compact_revision))
    });
    b.finish().await;
}

/// One side's watch stream: requests in, responses out.
struct WatchSide {
    requests: mpsc::Sender<epb::WatchRequest>,
    responses: Streaming<epb::WatchResponse>,
    transcript: Vec<String>,
}

impl WatchSide {
    /// Opens a stream with its first request (etcd answers the stream's headers with its first
    /// response, so the opening call waits for one).
    async fn open(raw: &mut Raw, first: epb::watch_request::RequestUnion) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(epb::WatchRequest { request_union: Some(first) }).await.expect("send");
        let responses = raw
            .watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch stream")
            .into_inner();
        Self { requests: tx, responses, transcript: Vec::new() }
    }

    async fn send(&mut self, request: epb::watch_request::RequestUnion) {
        self.requests.send(epb::WatchRequest { request_union: Some(request) }).await.expect("send");
    }

    /// Reads responses until `done` says the step is complete; records them, merging the event
    /// responses of each watch (etcd and kvset may batch revisions differently) and sorting
    /// the step's entries (watches answer in either order).
    async fn step(&mut self, what: &str, done: impl Fn(&[epb::WatchResponse]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut got: Vec<epb::WatchResponse> = Vec::new();
        while !done(&got) {
            let next = tokio::time::timeout_at(deadline.into(), self.responses.message()).await;
            match next {
                Ok(Ok(Some(r))) => got.push(r),
                other => panic!("{what}: the stream ended or stalled ({other:?}) after {got:?}"),
            }
        }
        let mut merged: Vec<epb::WatchResponse> = Vec::new();
        for r in got {
            let events_only = !r.events.is_empty() && !r.created && !r.canceled;
            // Events of one watch, in their order; the order across watches is not specified.
            let same_watch = merged.iter_mut().rev().find(|m| m.watch_id == r.watch_id);
            match same_watch {
                Some(last) if events_only && !last.events.is_empty() && !last.canceled => {
                    last.events.extend(r.events);
                    last.header = r.header;
                }
                _ => merged.push(r),
            }
        }
        let mut entries: Vec<String> = merged.iter().map(|r| etcd::scrub(&format!("{r:?}"))).collect();
        entries.sort();
        self.transcript.push(format!("{what}: {entries:?}"));
    }
}

fn events_of(id: i64, n: usize) -> impl Fn(&[epb::WatchResponse]) -> bool {
    move |got| got.iter().filter(|r| r.watch_id == id).map(|r| r.events.len()).sum::<usize>() >= n
}

fn created(n: usize) -> impl Fn(&[epb::WatchResponse]) -> bool {
    move |got| got.iter().filter(|r| r.created).count() >= n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_answers_match_etcds() {
    use epb::watch_request::RequestUnion as U;
    let mut b = Both::start().await;
    for raw in [&mut b.etcd, &mut b.kvset] {
        raw.kv.put(put("w/a", "1")).await.unwrap();
        raw.kv.put(put("w/b", "2")).await.unwrap();
        raw.kv
            .delete_range(epb::DeleteRangeRequest { key: b"w/a".to_vec(), ..Default::default() })
            .await
            .unwrap();
        raw.kv.put(put("w/a", "3")).await.unwrap();
    }
    let create = |key: &str, end: &str, start: i64, prev_kv: bool, id: i64| {
        U::CreateRequest(epb::WatchCreateRequest {
            key: key.into(),
            range_end: end.into(),
            start_revision: start,
            prev_kv,
            watch_id: id,
            ..Default::default()
        })
    };
    let mut transcripts = Vec::new();
    for side in 0..2 {
        let raw = if side == 0 { &mut b.etcd } else { &mut b.kvset };
        let mut kv = raw.kv.clone();
        let mut w = WatchSide::open(raw, create("w/", "w0", 2, true, 0)).await;
        w.step("a prefix from revision 2 with prev_kv: created, then the history", events_of(0, 4)).await;
        w.send(create("w/a", "", 0, false, 0)).await;
        w.step("one key from now", created(1)).await;
        kv.put(put("w/a", "4")).await.unwrap();
        w.step("a put reaches both watches", |got: &[epb::WatchResponse]| {
            events_of(0, 1)(got) && events_of(1, 1)(got)
        })
        .await;
        w.send(U::ProgressRequest(epb::WatchProgressRequest {})).await;
        w.step("a progress request", |got: &[epb::WatchResponse]| got.iter().any(|r| r.watch_id == -1)).await;
        w.send(U::CancelRequest(epb::WatchCancelRequest { watch_id: 1 })).await;
        w.step("cancel", |got: &[epb::WatchResponse]| got.iter().any(|r| r.canceled)).await;
        w.send(create("w/b", "w/a", 0, false, 0)).await;
        w.step("range_end below key", |got: &[epb::WatchResponse]| got.iter().any(|r| r.canceled)).await;
        w.send(U::CreateRequest(epb::WatchCreateRequest {
            key: b"w/".to_vec(),
            range_end: b"w0".to_vec(),
            filters: vec![epb::watch_create_request::FilterType::Noput as i32],
            ..Default::default()
        }))
        .await;
        w.step("a watch without puts, new id (ids are not reused)", created(1)).await;
        kv.put(put("w/a", "5")).await.unwrap();
        kv.delete_range(epb::DeleteRangeRequest { key: b"w/b".to_vec(), ..Default::default() })
            .await
            .unwrap();
        w.step("only the delete reaches the filtered watch", |got: &[epb::WatchResponse]| {
            events_of(0, 2)(got) && events_of(2, 1)(got)
        })
        .await;
        w.send(create("w/a", "", 0, false, 100)).await;
        w.step("an explicit watch id", created(1)).await;
        w.send(create("w/a", "", 0, false, 100)).await;
        w.step("a duplicate watch id", created(1)).await;
        let now = kv.range(range("w/a", "")).await.unwrap().into_inner().header.unwrap().revision;
        kv.compact(epb::CompactionRequest { revision: now, physical: true }).await.unwrap();
        w.send(create("w/", "w0", 2, false, 0)).await;
        w.step(
            "a watch from a compacted revision: created, then canceled with the compact revision",
            |got: &[epb::WatchResponse]| got.iter().any(|r| r.canceled),
        )
        .await;
        w.send(U::CreateRequest(epb::WatchCreateRequest::default())).await;
        w.step("an empty key watches \"\\0\"", created(1)).await;
        transcripts.push(w.transcript);
    }
    let kvset = transcripts.pop().unwrap();
    let etcd = transcripts.pop().unwrap();
    assert_eq!(etcd.len(), kvset.len());
    for (e, k) in etcd.into_iter().zip(kvset) {
        let what = e.split(": ").next().unwrap_or_default().to_string();
        b.compare(&what, e, k);
    }
    b.finish().await;
}

// --- The Kubernetes apiserver's call shapes (k3s-io/kine's list of what it needed) ---------

/// Writes the same objects to both stores: `n` keys under `prefix`.
async fn seed(b: &mut Both, prefix: &str, n: usize) {
    for i in 0..n {
        let key = format!("{prefix}{i:03}");
        same!(b, "seed", |c| c.kv.put(put(&key, &format!("object {i}"))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_get_is_a_range_with_limit_one() {
    let mut b = Both::start().await;
    seed(&mut b, "/registry/pods/default/p", 3).await;
    same!(b, "get an object", |c| c
        .kv
        .range(epb::RangeRequest { limit: 1, ..range("/registry/pods/default/p001", "") }));
    same!(b, "get a missing object", |c| c
        .kv
        .range(epb::RangeRequest { limit: 1, ..range("/registry/pods/default/zz", "") }));
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_lists_page_by_continuation_at_one_revision() {
    let mut b = Both::start().await;
    seed(&mut b, "/registry/pods/default/p", 10).await;
    let (start, end) = ("/registry/pods/", "/registry/pods0");
    // The first page fixes the revision; later pages read at it while writes go on.
    let first =
        b.kvset.kv.range(epb::RangeRequest { limit: 4, ..range(start, end) }).await.unwrap().into_inner();
    let revision = first.header.unwrap().revision;
    same!(b, "first page", |c| c.kv.range(epb::RangeRequest { limit: 4, ..range(start, end) }));
    same!(b, "a write between pages", |c| c.kv.put(put("/registry/pods/default/p002", "changed")));
    let mut from = first.kvs.last().unwrap().key.clone();
    loop {
        from.push(0); // continue after the last key
        let key = String::from_utf8(from.clone()).unwrap();
        same!(b, "next page at the list's revision", |c| c.kv.range(epb::RangeRequest {
            limit: 4,
            revision,
            ..range(&key, end)
        }));
        let page = b
            .kvset
            .kv
            .range(epb::RangeRequest { limit: 4, revision, ..range(&key, end) })
            .await
            .unwrap()
            .into_inner();
        if !page.more {
            break;
        }
        from = page.kvs.last().unwrap().key.clone();
    }
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_counts_with_count_only() {
    let mut b = Both::start().await;
    seed(&mut b, "/registry/pods/default/p", 7).await;
    seed(&mut b, "/registry/services/default/s", 2).await;
    same!(b, "count pods", |c| c
        .kv
        .range(epb::RangeRequest { count_only: true, ..range("/registry/pods/", "/registry/pods0") }));
    same!(b, "count everything", |c| c
        .kv
        .range(epb::RangeRequest { count_only: true, ..range("/registry/", "/registry0") }));
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_creates_updates_and_deletes_with_optimistic_txns() {
    use epb::compare::CompareResult as R;
    use epb::compare::TargetUnion as U;
    let mut b = Both::start().await;
    let key = "/registry/configmaps/default/cm";
    // Create: only if absent (mod revision 0), else read what is there.
    let create = |value: &str| {
        txn(
            vec![cmp(key, R::Equal, U::ModRevision(0))],
            vec![op_put(key, value)],
            vec![op_range(range(key, ""))],
        )
    };
    same!(b, "create", |c| c.kv.txn(create("v1")));
    same!(b, "create again: the existing object comes back", |c| c.kv.txn(create("v1 again")));
    // Update at the revision read; a stale one fails and returns the current object.
    let rev = b.kvset.kv.range(range(key, "")).await.unwrap().into_inner().kvs[0].mod_revision;
    let update = |at: i64, value: &str| {
        txn(
            vec![cmp(key, R::Equal, U::ModRevision(at))],
            vec![op_put(key, value)],
            vec![op_range(range(key, ""))],
        )
    };
    same!(b, "update", |c| c.kv.txn(update(rev, "v2")));
    same!(b, "update from a stale read", |c| c.kv.txn(update(rev, "v3")));
    // Delete at the revision read.
    let rev = b.kvset.kv.range(range(key, "")).await.unwrap().into_inner().kvs[0].mod_revision;
    let delete = |at: i64| {
        txn(
            vec![cmp(key, R::Equal, U::ModRevision(at))],
            vec![op_delete(key, "", true)],
            vec![op_range(range(key, ""))],
        )
    };
    same!(b, "delete from a stale read", |c| c.kv.txn(delete(rev - 1)));
    same!(b, "delete", |c| c.kv.txn(delete(rev)));
    same!(b, "gone", |c| c.kv.range(range(key, "")));
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_compacts_through_the_compact_rev_key_txn() {
    use epb::compare::CompareResult as R;
    use epb::compare::TargetUnion as U;
    let mut b = Both::start().await;
    seed(&mut b, "/registry/events/default/e", 5).await;
    // The apiserver's compactor: advance "compact_rev_key" if its version is still the one it
    // saw, then compact at the revision it chose.
    let key = "compact_rev_key";
    let step = |version: i64, rev: i64| {
        txn(
            vec![cmp(key, R::Equal, U::Version(version))],
            vec![op_put(key, &rev.to_string())],
            vec![op_range(range(key, ""))],
        )
    };
    same!(b, "first compaction claims the key", |c| c.kv.txn(step(0, 4)));
    same!(b, "compact", |c| c.kv.compact(epb::CompactionRequest { revision: 4, physical: false }));
    same!(b, "a second compactor with a stale version loses", |c| c.kv.txn(step(0, 5)));
    same!(b, "the next round", |c| c.kv.txn(step(1, 6)));
    same!(b, "compact again", |c| c.kv.compact(epb::CompactionRequest { revision: 6, physical: false }));
    same!(b, "old revisions are gone", |c| c
        .kv
        .range(epb::RangeRequest { revision: 5, ..range("/registry/", "/registry0") }));
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_gives_events_a_lease() {
    let mut b = Both::start().await;
    // The apiserver grants leases itself only with an id of 0 (etcd picks): compare what does
    // not depend on the id, then use an explicit id for the rest.
    let granted = |r: Result<tonic::Response<epb::LeaseGrantResponse>, tonic::Status>| {
        let r = r.expect("granted").into_inner();
        format!("ttl {} error {:?} id set {}", r.ttl, r.error, r.id > 0)
    };
    let (e, k) = (
        granted(b.etcd.lease.lease_grant(epb::LeaseGrantRequest { ttl: 3660, id: 0 }).await),
        granted(b.kvset.lease.lease_grant(epb::LeaseGrantRequest { ttl: 3660, id: 0 }).await),
    );
    b.compare("grant with id 0", e, k);
    same!(b, "grant the event lease", |c| c.lease.lease_grant(epb::LeaseGrantRequest { ttl: 3660, id: 77 }));
    same!(b, "an event with the lease", |c| c
        .kv
        .put(epb::PutRequest { lease: 77, ..put("/registry/events/default/e1", "x") }));
    same!(b, "the event", |c| c.kv.range(range("/registry/events/default/e1", "")));
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_watches_with_prev_kv_and_progress_requests() {
    use epb::watch_request::RequestUnion as U;
    let mut b = Both::start().await;
    seed(&mut b, "/registry/pods/default/p", 2).await;
    let mut transcripts = Vec::new();
    for side in 0..2 {
        let raw = if side == 0 { &mut b.etcd } else { &mut b.kvset };
        let mut kv = raw.kv.clone();
        let first = U::CreateRequest(epb::WatchCreateRequest {
            key: b"/registry/pods/".to_vec(),
            range_end: b"/registry/pods0".to_vec(),
            start_revision: 3,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        });
        let mut w = WatchSide::open(raw, first).await;
        w.step("watch from the list's revision + 1", events_of(0, 1)).await;
        kv.put(put("/registry/pods/default/p000", "updated")).await.unwrap();
        w.step("an update with the previous object", events_of(0, 1)).await;
        w.send(U::ProgressRequest(epb::WatchProgressRequest {})).await;
        w.step("a progress request answers the current revision", |got: &[epb::WatchResponse]| {
            got.iter().any(|r| r.watch_id == -1)
        })
        .await;
        transcripts.push(w.transcript);
    }
    let (kvset, etcd) = (transcripts.pop().unwrap(), transcripts.pop().unwrap());
    for (e, k) in etcd.into_iter().zip(kvset) {
        let what = e.split(": ").next().unwrap_or_default().to_string();
        b.compare(&what, e, k);
    }
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_reads_a_version_that_enables_progress_requests() {
    // The apiserver enables watch progress requests (and consistent reads from its cache) for
    // etcd 3.5.13 and later, by Maintenance.Status's version. (Compared with kvset only: the
    // Debian etcd is 3.4.)
    let c = Cluster::start(1).await;
    let mut raw = Raw::connect(&c.endpoint(0)).await;
    let status = raw.maintenance.status(epb::StatusRequest {}).await.unwrap().into_inner();
    let parts: Vec<u64> = status.version.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(parts.as_slice() >= [3, 5, 13].as_slice(), "version {}", status.version);
    assert_eq!(status.leader, c.node(0).node_id());
    assert!(status.db_size > 0 && status.raft_index > 0 && status.raft_applied_index > 0);
    c.shutdown().await;
}
