//! etcd's v3 API with the real clients, unchanged, against a 3-member in-process cluster:
//! Debian's `etcdctl`, python `etcd3` and `grpcio-reflection` from PyPI, and the Rust
//! `etcd-client` crate. Behaviour compared field by field with a real etcd is in
//! `etcd_differential.rs`.

use std::time::Duration;
use std::time::Instant;

use kvset_proto::etcdserverpb as epb;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::etcd::Raw;
use tonic::Code;
use tracing::info;

const T: Duration = Duration::from_secs(30);

/// Client endpoints of every member, comma-separated.
fn endpoints(c: &Cluster) -> String {
    (0..3).map(|o| c.endpoint(o)).collect::<Vec<_>>().join(",")
}

/// Runs etcdctl, which must succeed; returns its standard output.
async fn ctl(endpoints: &str, args: &[&str]) -> String {
    ctl_in(endpoints, args, None).await
}

async fn ctl_in(endpoints: &str, args: &[&str], stdin: Option<&str>) -> String {
    let (ok, out, err) = try_ctl(endpoints, args, stdin).await;
    assert!(ok, "etcdctl {args:?} failed:\n{out}\n{err}");
    out
}

async fn try_ctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let (endpoints, stdin) = (endpoints.to_string(), stdin.map(str::to_string));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        etcd::run_etcdctl(&endpoints, &args, stdin.as_deref())
    })
    .await
    .expect("etcdctl task")
}

/// A result with its response dropped (the error is what is checked).
fn unit<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<tonic::Response<()>, tonic::Status> {
    r.map(|_| tonic::Response::new(()))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// etcdctl prints keys and values base64-encoded in JSON.
fn b64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_runs_every_command() {
    let mut c = Cluster::start(3).await;
    c.wait_leader(T).await;
    let all = endpoints(&c);
    let one = c.endpoint(1);

    info!("--- put, get, del");
    assert_eq!(ctl(&all, &["put", "foo", "bar"]).await, "OK\n");
    ctl(&all, &["put", "foo2", "bar2"]).await;
    ctl(&one, &["put", "zoo", "1"]).await;
    assert_eq!(ctl(&all, &["get", "foo"]).await, "foo\nbar\n");
    let got = json(&ctl(&all, &["get", "foo", "--prefix", "-w", "json"]).await);
    assert_eq!(got["count"], 2);
    assert_eq!(got["kvs"][0]["key"], b64("foo"));
    assert_eq!(got["kvs"][1]["value"], b64("bar2"));
    assert_eq!(got["header"]["revision"], 4, "revision 1 is the empty store, as in etcd");
    ctl(&all, &["put", "foo", "baz"]).await;
    assert_eq!(ctl(&all, &["get", "foo", "--rev", "2"]).await, "foo\nbar\n", "the key as it was");
    assert_eq!(ctl(&all, &["get", "", "--prefix", "--keys-only"]).await, "foo\n\nfoo2\n\nzoo\n\n");
    assert_eq!(ctl(&all, &["get", "", "--from-key", "--keys-only"]).await, "foo\n\nfoo2\n\nzoo\n\n");
    let limited = json(&ctl(&all, &["get", "foo", "--prefix", "--limit", "1", "-w", "json"]).await);
    assert_eq!(
        (limited["kvs"].as_array().unwrap().len(), &limited["more"], &limited["count"]),
        (1, &true.into(), &2.into())
    );
    assert_eq!(
        ctl(&all, &["get", "", "--prefix", "--sort-by=MODIFY", "--order=DESCEND", "--keys-only"]).await,
        "foo\n\nzoo\n\nfoo2\n\n"
    );
    assert_eq!(
        ctl(&all, &["get", "", "--prefix", "--sort-by=VALUE", "--print-value-only"]).await,
        "1\nbar2\nbaz\n"
    );
    assert_eq!(ctl(&all, &["del", "foo2"]).await, "1\n");
    assert_eq!(ctl(&all, &["del", "foo2"]).await, "0\n");

    info!("--- txn (interactive input: compares, success ops, failure ops)");
    let out =
        ctl_in(&all, &["txn"], Some("value(\"foo\") = \"baz\"\n\nput foo qux\nput txn yes\n\nget foo\n\n"))
            .await;
    assert_eq!(out, "SUCCESS\n\nOK\n\nOK\n");
    let out = ctl_in(&all, &["txn"], Some("value(\"foo\") = \"baz\"\n\nput foo never\n\nget foo\n\n")).await;
    assert_eq!(out, "FAILURE\n\nfoo\nqux\n");
    let out = ctl_in(&all, &["txn"], Some("mod(\"absent\") = \"0\"\n\nput absent created\n\n\n")).await;
    assert!(out.starts_with("SUCCESS"), "{out}");

    info!("--- watch --rev --prefix --prev-kv replays the history, then follows");
    let revision =
        json(&ctl(&all, &["get", "foo", "-w", "json"]).await)["header"]["revision"].as_i64().unwrap();
    let endpoints_for_watch = all.clone();
    let watcher = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut child = std::process::Command::new(etcd::etcdctl())
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints={endpoints_for_watch}"),
                "watch",
                "--rev",
                "1",
                "--prefix",
                "foo",
                "--prev-kv",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcdctl watch");
        let stdout = child.stdout.take().expect("stdout");
        let deadline = Instant::now() + T;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("line");
            lines.push(line);
            if lines.ends_with(&["PUT".into(), "foo".into(), "qux".into(), "foo".into(), "last".into()])
                || Instant::now() > deadline
            {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        lines
    });
    // Wait for the replay to reach the current revision, then write once more.
    tokio::time::sleep(Duration::from_millis(300)).await; // etcdctl start-up; the check below does not depend on it
    ctl(&all, &["put", "foo", "last"]).await;
    let lines = watcher.await.unwrap();
    let text = lines.join("\n");
    assert!(
        text.starts_with("PUT\nfoo\nbar\nPUT\nfoo2\nbar2\nPUT\nfoo\nbar\nfoo\nbaz\nDELETE\nfoo2\nbar2\nfoo2\n\nPUT\nfoo\nbaz\nfoo\nqux"),
        "events from revision 1 with their previous values, in order:\n{text}"
    );
    assert!(text.ends_with("PUT\nfoo\nqux\nfoo\nlast"), "then the new write:\n{text}");
    assert!(revision > 1);

    info!("--- leases");
    let granted = ctl(&all, &["lease", "grant", "30"]).await;
    let id = granted.split_whitespace().nth(1).expect("lease id").to_string();
    assert_eq!(granted, format!("lease {id} granted with TTL(30s)\n"));
    ctl(&all, &["put", "leased", "v", &format!("--lease={id}")]).await;
    assert_eq!(
        ctl(&one, &["lease", "keep-alive", "--once", &id]).await,
        format!("lease {id} keepalived with TTL(30)\n")
    );
    let ttl = ctl(&all, &["lease", "timetolive", &id, "--keys"]).await;
    assert!(ttl.starts_with(&format!("lease {id} granted with TTL(30s), remaining(")), "{ttl}");
    assert!(ttl.ends_with("attached keys([leased])\n"), "{ttl}");
    assert_eq!(ctl(&all, &["lease", "list"]).await, format!("found 1 leases\n{id}\n"));
    assert_eq!(ctl(&all, &["lease", "revoke", &id]).await, format!("lease {id} revoked\n"));
    assert_eq!(ctl(&all, &["get", "leased"]).await, "");
    assert_eq!(ctl(&all, &["lease", "timetolive", &id]).await, format!("lease {id} already expired\n"));
    let (ok, _, err) = try_ctl(&all, &["lease", "revoke", &id], None).await;
    assert!(!ok && err.contains("etcdserver: requested lease not found"), "{err}");

    info!("--- member list, endpoint status and health, with --cluster");
    let members = json(&ctl(&all, &["member", "list", "-w", "json"]).await);
    let mut names: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["kvset-0", "kvset-1", "kvset-2"]);
    let client_urls: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["clientURLs"][0].as_str().unwrap().to_string())
        .collect();
    assert!(client_urls.iter().all(|u| u.starts_with("http://127.0.0.1:")), "{client_urls:?}");
    for target in
        [all.clone(), (0..3).map(|o| format!("http://{}", c.endpoint(o))).collect::<Vec<_>>().join(",")]
    {
        // With http:// endpoints etcdctl 3.4 sends the URL as :authority (see vendor/README.md).
        let status = ctl(&target, &["endpoint", "status", "-w", "json"]).await;
        let status = json(&status);
        let leaders: Vec<u64> =
            status.as_array().unwrap().iter().map(|s| s["Status"]["leader"].as_u64().unwrap()).collect();
        assert!(leaders.iter().all(|l| *l != 0 && *l == leaders[0]), "{leaders:?}");
        assert!(status.as_array().unwrap().iter().all(|s| s["Status"]["version"] == "3.5.21"));
    }
    let cluster_status = json(&ctl(&c.endpoint(0), &["endpoint", "status", "--cluster", "-w", "json"]).await);
    assert_eq!(cluster_status.as_array().unwrap().len(), 3, "--cluster found every member from member list");
    // etcdctl 3.4 reports health on standard error.
    for target in [all.clone(), c.endpoint(2)] {
        let args: &[&str] =
            if target == all { &["endpoint", "health"] } else { &["endpoint", "health", "--cluster"] };
        let (ok, out, err) = try_ctl(&target, args, None).await;
        assert!(ok, "{out}{err}");
        assert_eq!(format!("{out}{err}").matches("is healthy").count(), 3, "{out}{err}");
    }
    let hashes = ctl(&c.endpoint(0), &["endpoint", "hashkv", "--cluster"]).await;
    let values: Vec<&str> = hashes.lines().map(|l| l.rsplit(", ").next().unwrap()).collect();
    assert!(values.len() == 3 && values.iter().all(|h| *h == values[0]), "{hashes}");

    info!("--- compaction, defrag, snapshot save");
    let current =
        json(&ctl(&all, &["get", "foo", "-w", "json"]).await)["header"]["revision"].as_i64().unwrap();
    assert_eq!(
        ctl(&all, &["compaction", &current.to_string()]).await,
        format!("compacted revision {current}\n")
    );
    let (ok, _, err) = try_ctl(&all, &["get", "foo", "--rev", "2"], None).await;
    assert!(!ok && err.contains("etcdserver: mvcc: required revision has been compacted"), "{err}");
    // A kvset member answers Defragment, then stops, rewrites its database and starts again
    // (`kvset serve` restarts it; here the harness does). One member at a time: while it is
    // away, the others refuse, so `defrag --cluster` defragments one and names the refusal.
    assert_eq!(ctl(&one, &["defrag"]).await, format!("Finished defragmenting etcd member[{one}]\n"));
    let (ok, out, err) = try_ctl(&c.endpoint(0), &["defrag"], None).await;
    assert!(!ok && err.contains("defragment one member at a time: kvset-1"), "{out}{err}");
    c.stop(1).await;
    c.start_node(1).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    kvset_tests::eventually("kvset-1 knows the leader again", Duration::from_secs(30), || {
        let (client, one) = (c.client(), one.clone());
        async move { client.status_of(&one).await.ok().filter(|s| s.leader_id != 0) }
    })
    .await;
    assert_eq!(
        json(&ctl(&one, &["get", "foo", "-w", "json"]).await)["header"]["revision"].as_i64(),
        Some(current)
    );
    let (ok, out, err) = try_ctl(&c.endpoint(0), &["defrag", "--cluster"], None).await;
    assert!(!ok && out.matches("Finished defragmenting").count() == 1, "{out}{err}");
    assert!(err.contains("defragment one member at a time"), "{out}{err}");
    let done =
        (0..3).find(|o| out.contains(&format!("{}]", c.endpoint(*o)))).expect("the member defragmented");
    c.stop(done).await;
    c.start_node(done).await;
    c.wait_voters(3, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.db");
    let out = ctl(&one, &["snapshot", "save", file.to_str().unwrap()]).await;
    assert!(out.contains("Snapshot saved at"), "{out}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(size % 512, 32, "etcd's framing: whole sectors and a SHA-256");

    info!("--- what kvset does not do is refused, naming why");
    let (ok, _, err) =
        try_ctl(&all, &["member", "add", "extra", "--peer-urls=http://127.0.0.1:1"], None).await;
    assert!(!ok && err.contains("membership follows the StatefulSet"), "{err}");
    let (ok, _, err) = try_ctl(&all, &["move-leader", "1"], None).await;
    assert!(!ok && err.contains("etcdserver: bad leader transferee"), "{err}");
    assert_eq!(ctl(&all, &["alarm", "list"]).await, "");
    // Access control works (tests/tests/auth.rs); enabling it first needs a root user.
    let (ok, _, err) = try_ctl(&all, &["auth", "enable"], None).await;
    assert!(!ok && err.contains("etcdserver: root user does not exist"), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_etcd3_kv_watch_leases_and_lock() {
    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    let args: Vec<String> = (0..3).map(|o| c.endpoint(o)).collect();
    let script = etcd::python_scripts().join("etcd3_client.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(etcd::python()).arg(script).args(args).output().expect("run python")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "etcd3 client failed:\n{stdout}\n{stderr}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_only_the_client_services_in_both_versions() {
    let c = Cluster::start(1).await;
    let endpoint = c.endpoint(0);
    let script = etcd::python_scripts().join("reflection_v1alpha.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(etcd::python()).arg(script).arg(endpoint).output().expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio-reflection (v1alpha) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<&str> = stdout.lines().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "etcdserverpb.Auth",
            "etcdserverpb.Cluster",
            "etcdserverpb.KV",
            "etcdserverpb.Lease",
            "etcdserverpb.Maintenance",
            "etcdserverpb.Watch",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "kvset.v1.Cluster",
            "kvset.v1.Kv",
            "v3electionpb.Election",
            "v3lockpb.Lock",
        ],
        "every served service, and not the peer port's kvset.v1.Raft"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_etcd_client_crate_works_unchanged() {
    use etcd_client::Compare;
    use etcd_client::CompareOp;
    use etcd_client::GetOptions;
    use etcd_client::PutOptions;
    use etcd_client::SortOrder;
    use etcd_client::SortTarget;
    use etcd_client::Txn;
    use etcd_client::TxnOp;
    use etcd_client::WatchOptions;

    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    let urls: Vec<String> = (0..3).map(|o| format!("http://{}", c.endpoint(o))).collect();
    let mut client = etcd_client::Client::connect(urls, None).await.expect("connect");

    info!("--- KV");
    client.put("a", "1", None).await.unwrap();
    let prev = client.put("a", "2", Some(PutOptions::new().with_prev_key())).await.unwrap();
    assert_eq!(prev.prev_key().map(|kv| kv.value()), Some(&b"1"[..]));
    client.put("b", "3", None).await.unwrap();
    let all = client
        .get("", Some(GetOptions::new().with_all_keys().with_sort(SortTarget::Value, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(all.kvs().iter().map(|kv| kv.key()).collect::<Vec<_>>(), [&b"b"[..], &b"a"[..]]);
    let counted = client.get("", Some(GetOptions::new().with_all_keys().with_count_only())).await.unwrap();
    assert_eq!((counted.count(), counted.kvs().len()), (2, 0));
    let page = client.get("a", Some(GetOptions::new().with_from_key().with_limit(1))).await.unwrap();
    assert!(page.more() && page.kvs().len() == 1);
    let old = client.get("a", Some(GetOptions::new().with_revision(2))).await.unwrap();
    assert_eq!(old.kvs()[0].value(), b"1");

    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2")])
        .and_then([TxnOp::put("a", "3", None), TxnOp::get("a", None)])
        .or_else([TxnOp::get("a", None)]);
    let r = client.txn(txn).await.unwrap();
    assert!(r.succeeded());
    match &r.op_responses()[1] {
        etcd_client::TxnOpResponse::Get(g) => {
            assert_eq!(g.kvs()[0].value(), b"3", "a txn reads its own writes")
        }
        other => panic!("unexpected {other:?}"),
    }

    info!("--- watch with prev_kv and a progress request");
    let revision = client.get("a", None).await.unwrap().header().unwrap().revision();
    let mut stream = client
        .watch("a", Some(WatchOptions::new().with_prev_key().with_start_revision(revision + 1)))
        .await
        .unwrap();
    client.put("a", "4", None).await.unwrap();
    let deadline = Instant::now() + T;
    let (event, event_watch_id) = loop {
        let msg = tokio::time::timeout_at(deadline.into(), stream.message()).await.unwrap().unwrap().unwrap();
        if let Some(e) = msg.events().first() {
            break (e.clone(), msg.watch_id());
        }
    };
    assert_eq!(event.kv().unwrap().value(), b"4");
    assert_eq!(event.prev_kv().unwrap().value(), b"3");
    stream.request_progress().await.unwrap();
    let progress =
        tokio::time::timeout_at(deadline.into(), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(progress.events().is_empty() && progress.header().unwrap().revision() > revision);
    assert_eq!(progress.watch_id(), -1, "progress of the whole stream");
    let id = event_watch_id;
    stream.cancel(id).await.unwrap();

    info!("--- leases");
    let lease = client.lease_grant(30, None).await.unwrap();
    client.put("leased", "x", Some(PutOptions::new().with_lease(lease.id()))).await.unwrap();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease.id()).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let renewed = responses.message().await.unwrap().unwrap();
    assert_eq!((renewed.id(), renewed.ttl()), (lease.id(), 30));
    let ttl = client
        .lease_time_to_live(lease.id(), Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!((ttl.granted_ttl(), ttl.keys()), (30, &[b"leased".to_vec()][..]));
    assert_eq!(client.leases().await.unwrap().leases().len(), 1);
    client.lease_revoke(lease.id()).await.unwrap();
    assert!(client.get("leased", None).await.unwrap().kvs().is_empty());
    let unknown = client.lease_time_to_live(lease.id(), None).await.unwrap();
    assert_eq!(unknown.ttl(), -1);

    info!("--- cluster and maintenance");
    assert_eq!(client.member_list().await.unwrap().members().len(), 3);
    let status = client.status().await.unwrap();
    assert_eq!(status.version(), "3.5.21");
    let hash = client.hash_kv(0).await.unwrap();
    assert!(hash.hash() != 0);
    let current = client.get("a", None).await.unwrap().header().unwrap().revision();
    client.compact(current, None).await.unwrap();
    let err = client.get("a", Some(GetOptions::new().with_revision(2))).await.unwrap_err();
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    let mut snapshot = client.snapshot().await.unwrap();
    let mut bytes = 0usize;
    while let Some(chunk) = snapshot.message().await.unwrap() {
        bytes += chunk.blob().len();
    }
    assert_eq!(bytes % 512, 32, "whole sectors and a SHA-256");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_unsupported_requests_get_clear_errors_and_change_nothing() {
    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    let mut raw = Raw::connect(&c.endpoint(1)).await;
    raw.kv
        .put(epb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let revision = |r: &mut Raw| {
        let mut kv = r.kv.clone();
        async move {
            let all = epb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
            kv.range(all).await.unwrap().into_inner().header.unwrap().revision
        }
    };
    let before = revision(&mut raw).await;
    let check = |result: Result<tonic::Response<()>, tonic::Status>, code: Code, text: &str| {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(text), "{:?} lacks {text:?}", status.message());
    };

    info!("--- a request over limits.request_max_bytes: etcd's error");
    let big = epb::PutRequest { key: b"big".to_vec(), value: vec![0; 2 << 20], ..Default::default() };
    check(unit(raw.kv.put(big).await), Code::InvalidArgument, "etcdserver: request is too large");
    info!("--- a key over limits.key_max_bytes names the limit");
    let long = epb::PutRequest { key: vec![b'k'; 5000], ..Default::default() };
    check(unit(raw.kv.put(long).await), Code::InvalidArgument, "limits.key_max_bytes");
    info!(
        "--- a range with no limit over the opt-in limits.unpaged_range_max_keys is refused, not cut short"
    );
    let small = Cluster::start_with(1, |cfg| {
        cfg.limits.range_max_keys = 3;
        cfg.limits.unpaged_range_max_keys = 3;
    })
    .await;
    let mut s = Raw::connect(&small.endpoint(0)).await;
    for i in 0..5 {
        s.kv.put(epb::PutRequest { key: format!("p{i}").into_bytes(), ..Default::default() }).await.unwrap();
    }
    let everything = epb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
    check(
        unit(s.kv.range(everything.clone()).await),
        Code::ResourceExhausted,
        "limits.unpaged_range_max_keys = 3",
    );
    let paged = s.kv.range(epb::RangeRequest { limit: 10, ..everything.clone() }).await.unwrap().into_inner();
    assert_eq!((paged.kvs.len(), paged.more, paged.count), (3, true, 5), "a client that pages gets pages");
    let counted =
        s.kv.range(epb::RangeRequest { count_only: true, ..everything }).await.unwrap().into_inner();
    assert_eq!(counted.count, 5, "counting needs no page");
    small.shutdown().await;
    info!("--- unknown enum values name the field");
    let sorted = epb::RangeRequest { key: b"k".to_vec(), sort_target: 42, ..Default::default() };
    check(unit(raw.kv.range(sorted).await), Code::InvalidArgument, "sort_target 42");
    info!("--- membership changes, MoveLeader to a stranger, Downgrade, auth, alarms");
    check(
        unit(raw.cluster.member_add(epb::MemberAddRequest::default()).await),
        Code::FailedPrecondition,
        "scale the StatefulSet",
    );
    check(
        unit(raw.cluster.member_remove(epb::MemberRemoveRequest { id: 1 }).await),
        Code::FailedPrecondition,
        "membership follows",
    );
    check(
        unit(raw.cluster.member_promote(epb::MemberPromoteRequest { id: 1 }).await),
        Code::FailedPrecondition,
        "membership follows",
    );
    check(
        unit(raw.cluster.member_update(epb::MemberUpdateRequest::default()).await),
        Code::FailedPrecondition,
        "membership follows",
    );
    // etcd's refusals: "not leader" from a follower, "bad leader transferee" from the leader.
    check(
        unit(raw.maintenance.move_leader(epb::MoveLeaderRequest { target_id: 1 }).await),
        Code::FailedPrecondition,
        "etcdserver: ",
    );
    check(
        unit(raw.maintenance.downgrade(epb::DowngradeRequest::default()).await),
        Code::Unimplemented,
        "Downgrade",
    );
    let activate =
        epb::AlarmRequest { action: epb::alarm_request::AlarmAction::Activate as i32, ..Default::default() };
    check(unit(raw.maintenance.alarm(activate).await), Code::Unimplemented, "Alarm ACTIVATE");
    let status = raw.auth.auth_status(epb::AuthStatusRequest {}).await.unwrap().into_inner();
    assert!(!status.enabled);
    let login = epb::AuthenticateRequest { name: "root".into(), password: "x".into() };
    check(
        unit(raw.auth.authenticate(login).await),
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
    );
    check(
        unit(raw.auth.user_add(epb::AuthUserAddRequest::default()).await),
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    assert_eq!(revision(&mut raw).await, before, "nothing was written");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_revisions_come_in_fragments_when_asked_and_unknown_leases_renew_to_zero() {
    use epb::watch_request::RequestUnion as U;
    // A small watch response budget, so one revision of ten 1 KiB values exceeds it.
    let c = Cluster::start_with(1, |cfg| cfg.watch.response_max_bytes = 4096).await;
    let mut raw = Raw::connect(&c.endpoint(0)).await;
    let watch = |fragment: bool| {
        U::CreateRequest(epb::WatchCreateRequest {
            key: b"f/".to_vec(),
            range_end: b"f0".to_vec(),
            fragment,
            ..Default::default()
        })
    };
    let mut streams = Vec::new();
    for fragment in [true, false] {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(epb::WatchRequest { request_union: Some(watch(fragment)) }).await.unwrap();
        let mut responses =
            raw.watch.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        assert!(responses.message().await.unwrap().unwrap().created);
        streams.push((tx, responses));
    }
    let puts = (0..10)
        .map(|i| epb::RequestOp {
            request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
                key: format!("f/{i}").into_bytes(),
                value: vec![b'v'; 1024],
                ..Default::default()
            })),
        })
        .collect();
    raw.kv.txn(epb::TxnRequest { compare: vec![], success: puts, failure: vec![] }).await.unwrap();
    let deadline = Instant::now() + T;
    for (i, (_tx, responses)) in streams.iter_mut().enumerate() {
        let mut parts = Vec::new();
        let mut events = 0;
        while events < 10 {
            let r = tokio::time::timeout_at(deadline.into(), responses.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            events += r.events.len();
            parts.push(r.fragment);
        }
        if i == 0 {
            assert!(parts.len() > 1, "the revision was split: {parts:?}");
            assert!(parts[..parts.len() - 1].iter().all(|f| *f) && !parts[parts.len() - 1], "{parts:?}");
        } else {
            assert_eq!(parts, [false], "without fragment, one revision is one response");
        }
    }

    info!("--- a keep-alive of an unknown lease answers TTL 0, as etcd's");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(epb::LeaseKeepAliveRequest { id: 987_654 }).await.unwrap();
    let mut renewals = raw
        .lease
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = renewals.message().await.unwrap().unwrap();
    assert_eq!((r.id, r.ttl), (987_654, 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_answers_a_write_has_applied_it() {
    // As in etcd: a write acknowledged by a follower (which sent it to the leader) is already
    // in that follower's own state, so a serializable read or a watch there sees it at once.
    let c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    c.wait_voters(3, T).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let mut raw = Raw::connect(&c.endpoint(follower)).await;
    let serializable = |key: &str| epb::RangeRequest {
        key: key.as_bytes().to_vec(),
        serializable: true,
        ..Default::default()
    };
    for i in 0..100 {
        let key = format!("ryw/{i}");
        let put =
            epb::PutRequest { key: key.clone().into_bytes(), value: b"v".to_vec(), ..Default::default() };
        let written = raw.kv.put(put).await.unwrap().into_inner().header.unwrap().revision;
        let read = raw.kv.range(serializable(&key)).await.unwrap().into_inner();
        assert_eq!(
            read.kvs.len(),
            1,
            "write {i} (revision {written}) not yet visible on the follower that acked it"
        );
        assert!(read.header.unwrap().revision >= written);
    }
    let now = raw.kv.range(serializable("ryw/0")).await.unwrap().into_inner().header.unwrap().revision;
    raw.kv.compact(epb::CompactionRequest { revision: now, physical: false }).await.unwrap();
    let past = epb::RangeRequest { revision: now - 1, ..serializable("ryw/0") };
    let refused = raw.kv.range(past).await.expect_err("compacted on the follower that acked it");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    c.shutdown().await;
}

/// Issue 28, item 5: a Range without a limit is answered whole, as etcd answers it: 50,000
/// keys and 6 MB (past the page bounds, 10,000 keys and 4 MiB) through a follower, the same
/// field by field as Debian's etcd loaded with the same transactions, and `etcdctl get
/// --prefix` lists every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_of_50000_keys_without_a_limit_is_answered_whole_as_etcd_does() {
    const KEYS: usize = 50_000;
    let real = etcd::EtcdServer::start().await;
    let c = Cluster::start(3).await;
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let follower = (0..3).find(|o| *o != leader).unwrap();
    let mut kvset = Raw::connect(&c.endpoint(leader)).await;
    let mut etcd_raw = Raw::connect(&real.endpoint).await;
    let put = |i: usize| epb::RequestOp {
        request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
            key: format!("big/{i:05}").into_bytes(),
            value: vec![b'a' + (i % 26) as u8; 100],
            ..Default::default()
        })),
    };
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(128) {
        let txn = epb::TxnRequest { success: chunk.iter().map(|i| put(*i)).collect(), ..Default::default() };
        kvset.kv.txn(txn.clone()).await.expect("kvset txn");
        etcd_raw.kv.txn(txn).await.expect("etcd txn");
    }
    let everything =
        epb::RangeRequest { key: b"big/".to_vec(), range_end: b"big0".to_vec(), ..Default::default() };
    // As clientv3 does, the clients take answers up to gRPC's largest message (tonic's default
    // is 4 MiB).
    let big_reader = |endpoint: String| async move {
        epb::kv_client::KvClient::new(etcd::connect(&endpoint).await.expect("connect"))
            .max_decoding_message_size(i32::MAX as usize)
    };
    let mut through_follower = big_reader(c.endpoint(follower)).await;
    let ours = through_follower.range(everything.clone()).await.expect("kvset answers").into_inner();
    let theirs = big_reader(real.endpoint.clone())
        .await
        .range(everything.clone())
        .await
        .expect("etcd answers")
        .into_inner();
    assert_eq!((ours.kvs.len(), ours.count, ours.more), (KEYS, KEYS as i64, false));
    assert_eq!(ours.kvs, theirs.kvs, "every key, field by field");
    assert_eq!((ours.count, ours.more), (theirs.count, theirs.more));
    let serializable = epb::RangeRequest { serializable: true, keys_only: true, ..everything };
    let keys = through_follower.range(serializable).await.expect("serializable").into_inner();
    assert_eq!(keys.kvs.len(), KEYS);

    for endpoints in [endpoints(&c), real.endpoint.clone()] {
        let listed = ctl(&endpoints, &["get", "big/", "--prefix", "--keys-only"]).await;
        assert_eq!(listed.lines().filter(|l| l.starts_with("big/")).count(), KEYS, "etcdctl at {endpoints}");
    }
    c.shutdown().await;
}
