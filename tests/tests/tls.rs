//! TLS on a running cluster: members talk mutual TLS and must prove their own ordinal; clients
//! need a certificate; every other connection is refused, logged and counted, and changes
//! nothing; certificates rotate under writes with no restart and no lost quorum, after which
//! the old ones are refused.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_client::pb;
use kvset_client::Client;
use kvset_server::devcerts::Authority;
use kvset_server::devcerts::Request;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use kvset_tests::pki::client_with;
use kvset_tests::pki::member_cert;
use kvset_tests::pki::member_dns_name;
use kvset_tests::pki::Pki;

/// `kvset_tls_connections_refused_total` of one member, by (port, reason).
async fn refusals(c: &Cluster, ordinal: u32) -> BTreeMap<(String, String), u64> {
    let text = kvset_tests::http_get(&c.ops_endpoint(ordinal), "/metrics").await.expect("metrics");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("kvset_tls_connections_refused_total{")) {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\"")).map(|i| i + name.len() + 2)?;
            Some(line[start..].split('"').next()?.to_string())
        };
        let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
        if let (Some(port), Some(reason)) = (label("port"), label("reason")) {
            out.insert((port, reason), value);
        }
    }
    out
}

/// Keys under `prefix`, as `client` reads them (linearizable).
async fn keys(client: &Client, prefix: &str) -> Vec<String> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    let r = client
        .range(pb::RangeRequest { key: prefix.into(), range_end: end, ..Default::default() })
        .await
        .expect("range");
    r.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
}

fn follower_of(c: &Cluster, leader: u32) -> u32 {
    c.running().into_iter().find(|o| *o != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_need_a_certificate_and_every_other_connection_is_refused() {
    let pki = Pki::new();
    let c = Cluster::start_with(3, pki.tweak()).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let follower = follower_of(&c, leader);
    let at = [c.endpoint(follower)];

    // A client with a certificate writes through a follower: forwarded over the peer port's
    // mutual TLS to the leader.
    let good = pki.client(&at);
    good.put("greeting", "hello").await.expect("put over TLS");
    assert_eq!(good.get("greeting").await.expect("get").expect("present").value, b"hello");

    let other = Authority::new("another CA").expect("CA");
    let root = pki.user("root");
    let cases = [
        ("plaintext", None, None),
        ("no client certificate", Some(pki.client_tls(&[&pki.ca], None)), None),
        (
            "client certificate from another CA",
            Some(pki.client_tls(&[&pki.ca], Some(&other.issue(&Request::client("root")).expect("issue")))),
            None,
        ),
        (
            "expired client certificate",
            Some(pki.client_tls(
                &[&pki.ca],
                Some(&pki.ca.issue(&Request::client("root").expired()).expect("issue")),
            )),
            None,
        ),
        ("server from an untrusted CA", Some(pki.client_tls(&[&other], Some(&root))), Some("UnknownIssuer")),
    ];
    for (case, tls, client_sees) in cases {
        let bad = client_with(&at, tls);
        let err = bad.put(format!("bad/{case}"), "x").await.expect_err(case).to_string();
        if let Some(text) = client_sees {
            assert!(err.contains(text), "{case}: the client's error should say {text}: {err}");
        }
    }
    // A member's address answering with a certificate that does not name what was dialled.
    let mut options = kvset_client::ClientOptions {
        timeout: Duration::from_secs(2),
        prefer_leader: false,
        tls: Some(pki.client_tls(&[&pki.ca], Some(&root))),
        ..Default::default()
    };
    options.tls_server_name = Some(member_dns_name(4));
    let misnamed = Client::new(at.to_vec(), options).expect("client");
    let err = misnamed.put("bad/misnamed", "x").await.expect_err("misnamed server").to_string();
    assert!(err.contains("not valid for name"), "a certificate for another name is refused: {err}");

    // Nothing any of them sent was applied, on any member.
    assert_eq!(keys(&good, "bad/").await, Vec::<String>::new());
    // The member saw, refused and counted each.
    let counted = refusals(&c, follower).await;
    let get = |reason: &str| counted.get(&("client".to_string(), reason.to_string())).copied().unwrap_or(0);
    assert!(get("plaintext") >= 1, "plaintext refusals counted: {counted:?}");
    assert!(get("certificate") >= 3, "no, foreign and expired client certificates counted: {counted:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_must_prove_its_own_ordinal_and_rejoins_when_its_certificate_is_fixed() {
    let pki = Pki::new();
    let mut c = Cluster::start_with(3, pki.tweak()).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let victim = follower_of(&c, leader);
    let other = c.running().into_iter().find(|o| *o != leader && *o != victim).expect("third member");
    let client = pki.client(&[c.endpoint(leader)]);
    fn term(c: &Cluster, o: u32) -> u64 {
        c.node(o).member().raft_metrics().current_term
    }
    fn applied(c: &Cluster, o: u32) -> u64 {
        c.node(o).member().raft_metrics().last_applied.map_or(0, |l| l.index)
    }

    // Not caught up while refused: write, then watch the victim for a while (an absence, so
    // it is observed for a bounded time).
    async fn stays_behind(c: &Cluster, client: &Client, victim: u32, leader: u32, phase: &str) {
        for i in 0..20 {
            client.put(format!("{phase}/{i}"), "v").await.expect("put");
        }
        let target = c.node(leader).member().raft_metrics().last_applied.map_or(0, |l| l.index);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let at = c.node(victim).member().raft_metrics().last_applied.map_or(0, |l| l.index);
            assert!(at < target, "{phase}: kvset-{victim} caught up ({at} >= {target}) although refused");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 1. An impostor: a certificate from another CA (and that CA as its trust).
    let rogue = Authority::new("rogue CA").expect("CA");
    c.stop(victim).await;
    pki.install_member(victim, &member_cert(&rogue, victim));
    pki.install_ca(victim, &[&rogue]);
    c.start_node(victim).await;
    let term_before = term(&c, leader);
    stays_behind(&c, &client, victim, leader, "rogue-ca").await;
    let counted = refusals(&c, leader).await;
    assert!(
        counted.iter().any(|((port, _), n)| port == "peer" && *n >= 1),
        "the leader refused the impostor's connections: {counted:?}"
    );

    // 2. The right CA, but a certificate naming the third member, used to speak as the victim:
    //    the certificate gets the connection in (it names a member), the messages are refused.
    let cluster_id = c.node(leader).member().cluster().to_wire();
    let (victim_id, other_id, leader_id) =
        (c.node(victim).node_id(), c.node(other).node_id(), c.node(leader).node_id());
    let mut as_other =
        peer_client(&c, leader, pki.client_tls(&[&pki.ca], Some(&member_cert(&pki.ca, other))));
    let vote = |from: u64| pb::RaftRequest {
        cluster_id: cluster_id.clone(),
        from,
        to: leader_id,
        payload: vec![0xff],
    };
    let refused = as_other.vote(vote(victim_id)).await.expect_err("a vote for another member");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains(&format!("kvset-{other}")), "{refused:?}");
    let join = kvset_proto::v1::JoinRequest {
        cluster_id: cluster_id.clone(),
        node_id: 42,
        ordinal: victim,
        name: format!("kvset-{victim}"),
        ..Default::default()
    };
    let refused = as_other.join(join).await.expect_err("a join as another member");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // Speaking as itself, the same connection gets past the identity check (and fails on the
    // garbage payload).
    let own = as_other.vote(vote(other_id)).await.expect_err("garbage payload");
    assert_eq!(own.code(), tonic::Code::InvalidArgument, "{own:?}");
    // Nor may it carry another node's vote inside a message sent under its own name.
    let leader_vote = kvset_storage::Vote::new_committed(term(&c, leader), leader_id);
    let append = openraft::raft::AppendEntriesRequest::<kvset_storage::TypeConfig> {
        vote: leader_vote,
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let payload = kvset_storage::codec::encode("append", &append).unwrap();
    let smuggled = pb::RaftRequest { cluster_id: cluster_id.clone(), from: other_id, to: leader_id, payload };
    let refused =
        as_other_to(&c, &pki, other, leader).append_entries(smuggled).await.expect_err("another node's vote");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("carries the vote of node"), "{refused:?}");
    // A join whose name is not its ordinal's is malformed.
    let bad_join = kvset_proto::v1::JoinRequest {
        cluster_id: cluster_id.clone(),
        node_id: 43,
        ordinal: other,
        name: format!("kvset-{victim}"),
        ..Default::default()
    };
    let refused = as_other.join(bad_join).await.expect_err("a join naming another ordinal");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // A certificate of the right CA that names no member (a client's) does not get in at all.
    let before = refusals(&c, leader).await;
    let mut as_client = peer_client(&c, leader, pki.client_tls(&[&pki.ca], Some(&pki.user("root"))));
    as_client
        .probe(kvset_proto::v1::ProbeRequest::default())
        .await
        .expect_err("a client certificate on the peer port");
    let after = refusals(&c, leader).await;
    let not_member = |m: &BTreeMap<(String, String), u64>| {
        m.get(&("peer".into(), "not_a_member".into())).copied().unwrap_or(0)
    };
    assert_eq!(not_member(&after), not_member(&before) + 1, "refused as naming no member: {after:?}");

    // The same certificate as the victim's own: the member refuses to start, saying why.
    c.stop(victim).await;
    pki.install_member(victim, &member_cert(&pki.ca, other));
    pki.install_ca(victim, &[&pki.ca]);
    let err =
        c.try_start_node(victim).await.expect_err("a member with another member's certificate").to_string();
    assert!(err.contains(&member_dns_name(victim)) && err.contains("not valid for name"), "{err}");

    // While refused, nothing the impostor sent reached Raft: no election, same leader.
    assert_eq!(term(&c, leader), term_before, "the refused member never disrupted the leader");
    assert_eq!(c.leader(), Some(leader));

    // 3. A certificate naming the victim, from the right CA, installed while it is down, then
    //    swapped for a wrong one while it runs: the swap is refused on reload, the good one
    //    stays in use. (Its return may cost one election: it campaigned while cut off, and
    //    pre-vote is off, as after any partition.)
    pki.install_member(victim, &member_cert(&pki.ca, victim));
    c.start_node(victim).await;
    eventually("the victim catches up", Duration::from_secs(30), || async {
        (applied(&c, victim) >= applied(&c, leader)).then_some(())
    })
    .await;
    pki.install_member(victim, &member_cert(&pki.ca, other));
    tokio::time::sleep(Duration::from_millis(600)).await; // three reload intervals
    for i in 0..5 {
        client.put(format!("after-bad-reload/{i}"), "v").await.expect("put");
    }
    eventually("the victim keeps up with its good certificate", Duration::from_secs(20), || async {
        (applied(&c, victim) >= applied(&c, leader)).then_some(())
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_to_a_new_ca_under_writes_and_the_old_ones_are_refused() {
    let pki = Pki::new();
    let mut c = Cluster::start_with(3, pki.tweak()).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let term = c.node(leader).member().raft_metrics().current_term;
    let endpoints: Vec<String> = c.running().into_iter().map(|o| c.endpoint(o)).collect();
    let new_ca = Authority::new("kvset test CA 2").expect("CA");

    // Writers present a certificate of the old CA and trust both during the rotation (their
    // configuration is replaced in place, as a client re-reading its files would).
    let old_user = pki.user("root");
    let writer_tls = pki.client_tls(&[&pki.ca, &new_ca], Some(&old_user));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client_with(&endpoints, Some(writer_tls.clone()));
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.put(format!("w{w}/{i}"), "v").await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
                i += 1;
            }
        }));
    }
    let progress = || {
        let acked = acked.clone();
        async move {
            let from = acked.load(Ordering::Relaxed);
            eventually("writes continue", Duration::from_secs(10), || async {
                (acked.load(Ordering::Relaxed) >= from + 20).then_some(())
            })
            .await;
        }
    };
    progress().await;

    // 1. Every member trusts both CAs.
    for o in c.running() {
        pki.install_ca(o, &[&pki.ca, &new_ca]);
    }
    progress().await;
    // 2. Every member gets a certificate from the new CA; a client trusting only the new CA
    //    can then reach each of them, with the new client certificate.
    for o in c.running() {
        pki.install_member(o, &member_cert(&new_ca, o));
    }
    let new_user = new_ca.issue(&Request::client("root")).expect("issue");
    let new_only = pki.client_tls(&[&new_ca], Some(&new_user));
    for o in c.running() {
        let client = client_with(&[c.endpoint(o)], Some(new_only.clone()));
        eventually(&format!("kvset-{o} serves its new certificate"), Duration::from_secs(10), || async {
            client.status_of(&c.endpoint(o)).await.ok()
        })
        .await;
    }
    writer_tls.replace(
        kvset_proto::tls::client_config(roots(&[&pki.ca, &new_ca]), Some(identity(&new_user)))
            .expect("config"),
    );
    progress().await;
    // 3. The old CA is dropped everywhere.
    for o in c.running() {
        pki.install_ca(o, &[&new_ca]);
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // three reload intervals
    progress().await;

    // A member restarted now must handshake with the new certificates both ways.
    let restarted = follower_of(&c, leader);
    c.stop(restarted).await;
    c.start_node(restarted).await;
    progress().await;
    eventually("the restarted member catches up", Duration::from_secs(30), || async {
        let target = c.node(leader).member().raft_metrics().last_applied?.index;
        (c.node(restarted).member().raft_metrics().last_applied?.index >= target).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    // No lost quorum: the same leader and term throughout, and no write failed.
    assert_eq!(c.leader(), Some(leader));
    assert_eq!(c.node(leader).member().raft_metrics().current_term, term, "no election during the rotation");
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "writes failed during the rotation: {failed:?}");
    assert!(acked.load(Ordering::Relaxed) >= 100, "writes went on");

    // The old certificates are refused now: a client with the old CA's certificate, and a
    // member presenting one.
    let old_client = client_with(&[c.endpoint(leader)], Some(pki.client_tls(&[&new_ca], Some(&old_user))));
    old_client.put("old/client", "x").await.expect_err("an old client certificate");
    let before = refusals(&c, leader).await;
    let impostor = pki.client_tls(&[&new_ca], Some(&member_cert(&pki.ca, restarted)));
    let mut peer = peer_client(&c, leader, impostor);
    peer.probe(kvset_proto::v1::ProbeRequest::default()).await.expect_err("an old member certificate");
    let after = refusals(&c, leader).await;
    let peer_refused = |m: &BTreeMap<(String, String), u64>| {
        m.get(&("peer".into(), "certificate".into())).copied().unwrap_or(0)
    };
    assert!(
        peer_refused(&after) > peer_refused(&before),
        "the old member certificate was refused: {after:?}"
    );
    let check = pki.client_tls(&[&new_ca], Some(&new_user));
    assert_eq!(keys(&client_with(&[c.endpoint(leader)], Some(check)), "old/").await, Vec::<String>::new());
    c.shutdown().await;
}

/// A raw peer-service client of `to`'s peer port presenting member `as_ordinal`'s certificate.
fn as_other_to(
    c: &Cluster,
    pki: &Pki,
    as_ordinal: u32,
    to: u32,
) -> kvset_proto::v1::raft_client::RaftClient<tonic::transport::Channel> {
    peer_client(c, to, pki.client_tls(&[&pki.ca], Some(&member_cert(&pki.ca, as_ordinal))))
}

/// A raw peer-service client of `ordinal`'s peer port, through `tls`.
fn peer_client(
    c: &Cluster,
    ordinal: u32,
    tls: Arc<kvset_client::ClientTls>,
) -> kvset_proto::v1::raft_client::RaftClient<tonic::transport::Channel> {
    let channel = kvset_proto::tls::lazy_channel(
        &c.node(ordinal).peer_addr().to_string(),
        Some((&tls, &member_dns_name(ordinal))),
        kvset_proto::tls::ChannelOptions { connect_timeout: Duration::from_secs(2), keep_alive: None },
    )
    .expect("channel");
    kvset_proto::v1::raft_client::RaftClient::new(channel)
}

fn roots(cas: &[&Authority]) -> kvset_proto::tls::rustls::RootCertStore {
    let pem: String = cas.iter().map(|ca| ca.cert_pem()).collect();
    kvset_proto::tls::parse_roots(std::path::Path::new("test CAs"), pem.as_bytes()).expect("roots")
}

fn identity(
    issued: &kvset_server::devcerts::Issued,
) -> (
    Vec<kvset_proto::tls::rustls::pki_types::CertificateDer<'static>>,
    kvset_proto::tls::rustls::pki_types::PrivateKeyDer<'static>,
) {
    let path = std::path::Path::new("test identity");
    kvset_proto::tls::parse_identity((path, issued.cert_pem.as_bytes()), (path, issued.key_pem.as_bytes()))
        .expect("identity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_speaks_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let c = Cluster::start_with(1, pki.tweak()).await;
    let dir = pki.dir();
    let user = pki.user("root");
    std::fs::write(dir.join("etcdctl.pem"), &user.cert_pem).unwrap();
    std::fs::write(dir.join("etcdctl-key.pem"), &user.key_pem).unwrap();
    let ca = dir.join("kvset-0-ca.pem").display().to_string();
    let cert = dir.join("etcdctl.pem").display().to_string();
    let key = dir.join("etcdctl-key.pem").display().to_string();
    let endpoint = c.endpoint(0);
    let tls = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let run = |args: &[&str]| kvset_tests::etcd::run_etcdctl(&endpoint, args, None);

    let (ok, out, err) = run(&[&tls[..], &["put", "from-etcdctl", "over tls"]].concat());
    assert!(ok, "etcdctl put over TLS: {out} {err}");
    let (ok, out, err) = run(&[&tls[..], &["get", "from-etcdctl", "--print-value-only"]].concat());
    assert!(ok && out.trim() == "over tls", "etcdctl get over TLS: {out} {err}");

    // Without a client certificate, and in plain text, it is refused and writes nothing.
    let (ok, _, err) =
        run(&["--cacert", &ca, "--dial-timeout=2s", "--command-timeout=3s", "put", "refused", "x"]);
    assert!(!ok, "etcdctl without a client certificate must fail: {err}");
    let (ok, _, err) = run(&["--dial-timeout=2s", "--command-timeout=3s", "put", "refused", "x"]);
    assert!(!ok, "etcdctl in plain text must fail: {err}");
    let (ok, out, err) = run(&[&tls[..], &["get", "refused", "--print-value-only"]].concat());
    assert!(ok && out.trim().is_empty(), "nothing written by the refused calls: {out} {err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_a_member_at_start_with_the_file_named() {
    let pki = Pki::new();
    let dir = pki.dir().to_path_buf();
    let rogue = Authority::new("rogue CA").expect("CA");
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "missing certificate",
            Box::new(|| std::fs::remove_file(dir.join("kvset-0.pem")).unwrap()),
            "kvset-0.pem",
        ),
        (
            "garbage certificate",
            Box::new(|| std::fs::write(dir.join("kvset-0.pem"), "not pem").unwrap()),
            "no PEM certificate",
        ),
        (
            "key of another certificate",
            Box::new(|| {
                std::fs::write(dir.join("kvset-0-key.pem"), member_cert(&pki.ca, 1).key_pem).unwrap()
            }),
            "do not belong together",
        ),
        (
            "certificate from another CA",
            Box::new(|| pki.install_member(0, &member_cert(&rogue, 0))),
            "UnknownIssuer",
        ),
        (
            "expired certificate",
            Box::new(|| {
                let expired =
                    pki.ca.issue(&Request::member("kvset-0", &member_dns_name(0)).expired()).unwrap();
                pki.install_member(0, &expired);
            }),
            "certificate expired",
        ),
        (
            "empty CA bundle",
            Box::new(|| std::fs::write(dir.join("kvset-0-ca.pem"), "").unwrap()),
            "kvset-0-ca.pem",
        ),
    ];
    for (case, break_it, expected) in cases {
        pki.install_member(0, &member_cert(&pki.ca, 0));
        pki.install_ca(0, &[&pki.ca]);
        break_it();
        let mut c = Cluster::new(1, pki.tweak()).await;
        let err = c.try_start_node(0).await.expect_err(case).to_string();
        assert!(err.contains(expected), "{case}: the error should name {expected:?}: {err}");
        assert!(!c.data_dir(0).exists(), "{case}: no volume was created");
        c.shutdown().await;
    }
}

/// A GET over TLS trusting `ca` (PEM): the response's text.
async fn https_get(addr: &str, ca: &str, path: &str) -> std::io::Result<String> {
    use kvset_proto::tls::rustls;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let roots = kvset_proto::tls::parse_roots(std::path::Path::new("CA"), ca.as_bytes())
        .map_err(std::io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(kvset_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let mut tls =
        kvset_proto::tls::tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// (Plain by default: the other tests read the ops port of TLS members in plain HTTP.)
async fn the_ops_port_serves_tls_when_asked() {
    let pki = Pki::new();
    let tweak = pki.tweak();
    let c = Cluster::start_with(1, move |config| {
        tweak(config);
        config.tls.ops = true;
    })
    .await;
    let ops = c.ops_endpoint(0);
    let ready = https_get(&ops, &pki.ca.cert_pem(), "/readyz").await.expect("/readyz over TLS");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = https_get(&ops, &pki.ca.cert_pem(), "/metrics").await.expect("/metrics over TLS");
    assert!(metrics.contains("kvset_"), "{metrics}");
    let plain = kvset_tests::http_get(&ops, "/readyz").await;
    assert!(!plain.as_deref().unwrap_or("").starts_with("HTTP/1.1 200"), "plain HTTP is refused: {plain:?}");
    let counted = refusals_over_tls(&ops, &pki).await;
    assert!(counted.contains("port=\"ops\",reason=\"plaintext\""), "{counted}");
    c.shutdown().await;
}

async fn refusals_over_tls(ops: &str, pki: &Pki) -> String {
    let text = https_get(ops, &pki.ca.cert_pem(), "/metrics").await.expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("kvset_tls_connections_refused_total"))
        .collect::<Vec<_>>()
        .join("\n")
}
