//! Access control, driven the way operators drive etcd's: the real `etcdctl` adds users and
//! roles, grants permissions and enables authentication; then every API refuses what a caller
//! may not do, with etcd's errors, and applies nothing of it. Identity comes from a password
//! (a token valid on every member) or from a client certificate's common name.

use std::time::Duration;

use kvset_client::pb;
use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_proto::etcdserverpb as epb;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd::run_etcdctl;
use kvset_tests::pki::client_with;
use kvset_tests::pki::Pki;

/// Runs etcdctl against `endpoint`; panics with its output unless it succeeds.
fn ok(endpoint: &str, args: &[&str]) -> String {
    let (success, out, err) = run_etcdctl(endpoint, args, None);
    assert!(success, "etcdctl {args:?} failed: {out} {err}");
    out
}

/// Runs etcdctl against `endpoint`; panics unless it fails; returns its error output.
fn refused(endpoint: &str, args: &[&str]) -> String {
    let (success, out, err) = run_etcdctl(endpoint, args, None);
    assert!(!success, "etcdctl {args:?} should have been refused, printed: {out}");
    err
}

/// root (role root), role `app` with read-write on the prefix /app/, user alice with it;
/// then authentication on.
fn set_up_users(endpoint: &str) {
    for args in [
        &["user", "add", "root", "--new-user-password=rootpw", "--interactive=false"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "app"],
        &["role", "grant-permission", "app", "readwrite", "/app/", "--prefix"],
        &["user", "add", "alice", "--new-user-password=alicepw", "--interactive=false"],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        ok(endpoint, args);
    }
}

fn user_client(endpoints: &[String], user: &str, password: &str) -> Client {
    Client::new(
        endpoints.to_vec(),
        ClientOptions {
            timeout: Duration::from_secs(5),
            prefer_leader: false,
            user: Some((user.to_string(), password.to_string())),
            ..Default::default()
        },
    )
    .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_sets_up_access_control_and_every_api_enforces_it() {
    let c = Cluster::start_with(3, |config| config.auth.bcrypt_cost = 4).await;
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let follower = c.running().into_iter().find(|o| *o != leader).expect("follower");
    let e = c.endpoint(follower);
    set_up_users(&e);
    let as_alice = ["--user", "alice:alicepw"];
    let as_root = ["--user", "root:rootpw"];
    let with = |who: &[&'static str], args: &[&'static str]| -> Vec<&'static str> { [who, args].concat() };

    // Without credentials, nothing; with a wrong password, nothing.
    assert!(refused(&e, &["put", "/app/anon", "x"]).contains("user name is empty"));
    assert!(refused(&e, &["--user", "alice:wrong", "put", "/app/k", "x"]).contains("authentication failed"));
    // alice: her prefix, read and write, and nothing else.
    ok(&e, &with(&as_alice, &["put", "/app/k", "v1"]));
    assert_eq!(ok(&e, &with(&as_alice, &["get", "/app/k", "--print-value-only"])).trim(), "v1");
    for args in [
        &["put", "/other", "x"][..],
        &["get", "/other"],
        &["del", "/app/", "/b"],
        &["get", "/app/", "/b"],
        &["user", "list"],
        &["role", "add", "intruders"],
        &["auth", "disable"],
        &["compaction", "1"],
        &["defrag"],
    ] {
        let err = refused(&e, &with(&as_alice, args));
        assert!(err.contains("permission denied"), "{args:?}: {err}");
    }
    // A transaction that touches a key outside the grant in either branch is refused whole.
    let txn = "mod(\"/app/k\") > \"0\"\n\nput /app/k v2\n\nput /other x\n\n";
    let (success, out, err) = run_etcdctl(&e, &with(&as_alice, &["txn", "--interactive=false"]), Some(txn));
    assert!(!success && err.contains("permission denied"), "{out} {err}");
    // root may do everything; nothing any refusal touched was applied.
    assert_eq!(ok(&e, &with(&as_root, &["get", "/app/k", "--print-value-only"])).trim(), "v1");
    assert!(ok(&e, &with(&as_root, &["get", "/other"])).trim().is_empty());
    assert!(ok(&e, &with(&as_root, &["get", "/app/anon"])).trim().is_empty());
    assert!(ok(&e, &with(&as_root, &["user", "list"])).contains("alice"));
    assert!(ok(&e, &with(&as_root, &["role", "get", "app"])).contains("[/app/, /app0)"));

    // The kvset API enforces the same rules, with a token from any member valid on all.
    let endpoints: Vec<String> = c.running().into_iter().map(|o| c.endpoint(o)).collect();
    let alice = user_client(&endpoints, "alice", "alicepw");
    alice.put("/app/kvset", "yes").await.expect("alice writes her prefix through kvset.v1");
    let err = alice.put("/etc/passwd", "no").await.expect_err("outside her prefix").to_string();
    assert!(err.contains("permission denied"), "{err}");
    let anonymous = client_with(&endpoints, None);
    let err = anonymous.get("/app/kvset").await.expect_err("no credentials").to_string();
    assert!(err.contains("user name is empty"), "{err}");
    // A client that marks its own request as forwarded by a member is still checked.
    let mut kv = kvset_proto::v1::kv_client::KvClient::connect(format!("http://{}", c.endpoint(leader)))
        .await
        .unwrap();
    let mut forged = tonic::Request::new(pb::PutRequest {
        key: b"/forged".to_vec(),
        value: b"x".to_vec(),
        ..Default::default()
    });
    forged.metadata_mut().insert(kvset_proto::metadata::FORWARDED, "true".parse().unwrap());
    let status = kv.put(forged).await.expect_err("a forged forwarding marker");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // Watches: a range alice may not read is canceled with etcd's reason.
    let mut watch = alice.watch(b"/other".to_vec(), Default::default()).await.expect("watch stream");
    let refusal = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("an answer");
    assert!(format!("{refusal:?}").contains("permission denied"), "{refusal:?}");

    // A token dies with its password: the old one is refused at once, on every member.
    let mut auth = epb::auth_client::AuthClient::connect(format!("http://{}", endpoints[0])).await.unwrap();
    let token = auth
        .authenticate(epb::AuthenticateRequest { name: "alice".into(), password: "alicepw".into() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let get_with = |token: &str, endpoint: &str| {
        let token = token.to_string();
        let endpoint = endpoint.to_string();
        async move {
            let mut kv =
                kvset_proto::v1::kv_client::KvClient::connect(format!("http://{endpoint}")).await.unwrap();
            let mut r = tonic::Request::new(pb::GetRequest { key: b"/app/k".to_vec(), ..Default::default() });
            r.metadata_mut().insert("token", token.parse().unwrap());
            kv.get(r).await
        }
    };
    for endpoint in &endpoints {
        get_with(&token, endpoint).await.expect("a token from one member works on every member");
    }
    let (success, out, err) = run_etcdctl(
        &e,
        &with(&as_root, &["user", "passwd", "alice", "--interactive=false"]),
        Some("changed\n"),
    );
    assert!(success, "etcdctl user passwd: {out} {err}");
    kvset_tests::eventually("every member refuses the old token", Duration::from_secs(10), || async {
        let mut all = true;
        for endpoint in &endpoints {
            all &= get_with(&token, endpoint).await.is_err_and(|s| s.code() == tonic::Code::Unauthenticated);
        }
        all.then_some(())
    })
    .await;
    assert!(refused(&e, &["--user", "alice:alicepw", "get", "/app/k"]).contains("authentication failed"));
    ok(&e, &["--user", "alice:changed", "get", "/app/k"]);

    // While enabled, root stays root; then root turns authentication off for everyone.
    assert!(refused(&e, &with(&as_root, &["user", "revoke-role", "root", "root"]))
        .contains("invalid auth management"));
    assert!(refused(&e, &with(&as_root, &["user", "delete", "root"])).contains("invalid auth management"));
    ok(&e, &with(&as_root, &["auth", "disable"]));
    ok(&e, &["put", "/anyone", "again"]);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_and_roles_survive_restarts_and_reach_new_members_by_snapshot() {
    let mut c = Cluster::start_with(3, |config| {
        config.auth.bcrypt_cost = 4;
        config.raft.snapshot_every_entries = 20;
        config.raft.keep_entries_after_snapshot = 5;
    })
    .await;
    let e = c.endpoint(0);
    set_up_users(&e);
    let root = user_client(std::slice::from_ref(&e), "root", "rootpw");
    for i in 0..60 {
        root.put(format!("/fill/{i}"), "x").await.expect("put");
    }
    // A member whose volume is lost comes back as a new member: it gets everything, users
    // included, from a snapshot (the log before it is purged).
    let victim = c.running().into_iter().find(|o| *o != 0).expect("a member");
    c.stop(victim).await;
    c.wipe(victim);
    c.start_node(victim).await;
    // The replacement is complete once the voters are exactly the running members.
    kvset_tests::eventually("the replacement completes", Duration::from_secs(60), || async {
        let leader = c.leader()?;
        let voters: std::collections::BTreeSet<u64> =
            c.node(leader).member().raft_metrics().membership_config.membership().voter_ids().collect();
        (voters == c.node_ids().into_iter().collect()).then_some(())
    })
    .await;
    c.wait_converged(Duration::from_secs(30)).await;
    let state = c.node(victim).member().reader().auth();
    assert!(
        state.enabled && state.users.contains_key("alice") && state.roles.contains_key("app"),
        "{state:?}"
    );
    // And every member restarted with its volume (one at a time, as a StatefulSet rolls) still
    // enforces them.
    for o in c.running() {
        c.stop(o).await;
        c.start_node(o).await;
        c.wait_voters(3, Duration::from_secs(60)).await;
    }
    let victim_endpoint = c.endpoint(victim);
    assert!(refused(&victim_endpoint, &["put", "/app/x", "y"]).contains("user name is empty"));
    ok(&victim_endpoint, &["--user", "alice:alicepw", "put", "/app/x", "y"]);
    assert!(refused(&victim_endpoint, &["--user", "alice:alicepw", "put", "/fill/0", "y"])
        .contains("permission denied"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_names_the_user() {
    let pki = Pki::new();
    let tweak = pki.tweak();
    let c = Cluster::start_with(1, move |config| {
        tweak(config);
        config.auth.bcrypt_cost = 4;
    })
    .await;
    let at = [c.endpoint(0)];
    // Set up as root with root's certificate (auth is still off), then enable.
    let root = client_with(&at, Some(pki.client_tls(&[&pki.ca], Some(&pki.user("root")))));
    let channel = || {
        kvset_proto::tls::lazy_channel(
            &at[0],
            Some((&pki.client_tls(&[&pki.ca], Some(&pki.user("root"))), "127.0.0.1")),
            kvset_proto::tls::ChannelOptions { connect_timeout: Duration::from_secs(2), keep_alive: None },
        )
        .unwrap()
    };
    let mut auth = epb::auth_client::AuthClient::new(channel());
    for name in ["root", "alice"] {
        auth.user_add(epb::AuthUserAddRequest {
            name: name.into(),
            options: Some(kvset_proto::authpb::UserAddOptions { no_password: true }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    auth.user_grant_role(epb::AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() })
        .await
        .unwrap();
    auth.role_add(epb::AuthRoleAddRequest { name: "app".into() }).await.unwrap();
    auth.role_grant_permission(epb::AuthRoleGrantPermissionRequest {
        name: "app".into(),
        perm: Some(kvset_proto::authpb::Permission {
            perm_type: 2,
            key: b"/app/".to_vec(),
            range_end: b"/app0".to_vec(),
        }),
    })
    .await
    .unwrap();
    auth.user_grant_role(epb::AuthUserGrantRoleRequest { user: "alice".into(), role: "app".into() })
        .await
        .unwrap();
    auth.auth_enable(epb::AuthEnableRequest {}).await.unwrap();

    let alice = client_with(&at, Some(pki.client_tls(&[&pki.ca], Some(&pki.user("alice")))));
    alice.put("/app/by-cert", "yes").await.expect("alice by her certificate");
    let err = alice.put("/other", "no").await.expect_err("outside her grant").to_string();
    assert!(err.contains("permission denied"), "{err}");
    let stranger = client_with(&at, Some(pki.client_tls(&[&pki.ca], Some(&pki.user("mallory")))));
    let err = stranger.get("/app/by-cert").await.expect_err("a certificate of no user").to_string();
    assert!(err.contains("permission denied"), "{err}");
    // A user with no password cannot log in with one.
    let status = auth
        .authenticate(epb::AuthenticateRequest { name: "alice".into(), password: "".into() })
        .await
        .expect_err("no password login for a certificate-only user");
    assert!(status.message().contains("authentication failed"), "{status:?}");
    assert!(root.get("/other").await.expect("root reads everything").is_none());
    c.shutdown().await;
}

/// The same etcdctl session against a real etcd and against kvset: user and role management,
/// enabling auth, allowed and refused calls, etcd's refusals of bad management. Every step
/// must succeed or fail alike and print the same (etcdctl's output, or its error line).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_etcdctl_auth_session_matches_a_real_etcd_step_by_step() {
    let etcd = kvset_tests::etcd::EtcdServer::start().await;
    let c = Cluster::start_with(1, |config| config.auth.bcrypt_cost = 4).await;
    let kvset = c.endpoint(0);
    let root = "--user=root:rootpw";
    let alice = "--user=alice:alicepw";
    let session: Vec<Vec<&str>> = vec![
        vec!["auth", "enable"],
        vec!["user", "add", "root", "--new-user-password=rootpw", "--interactive=false"],
        vec!["user", "add", "root", "--new-user-password=again", "--interactive=false"],
        vec!["user", "grant-role", "root", "root"],
        vec!["role", "add", "app"],
        vec!["role", "add", "app"],
        vec!["role", "grant-permission", "app", "readwrite", "/app/", "--prefix"],
        vec!["role", "grant-permission", "app", "read", "/shared"],
        vec!["role", "grant-permission", "nope", "read", "/x"],
        vec!["role", "add", "writer"],
        vec!["role", "grant-permission", "writer", "write", "/wo/", "--prefix"],
        vec!["user", "add", "bob", "--new-user-password=bobpw", "--interactive=false"],
        vec!["user", "grant-role", "bob", "writer"],
        vec!["user", "add", "alice", "--new-user-password=alicepw", "--interactive=false"],
        vec!["user", "grant-role", "alice", "app"],
        vec!["user", "grant-role", "alice", "nope"],
        vec!["user", "grant-role", "bob", "app"],
        vec!["role", "get", "app"],
        vec!["user", "get", "alice"],
        vec!["user", "list"],
        vec!["role", "list"],
        vec!["auth", "enable"],
        vec!["put", "/app/a", "1"],
        vec![alice, "put", "/app/a", "1"],
        vec![alice, "get", "/app/a"],
        vec![alice, "put", "/shared", "x"],
        vec![alice, "get", "/shared"],
        vec![alice, "put", "/etc/x", "x"],
        vec![alice, "get", "", "--prefix"],
        vec![alice, "del", "/app/a"],
        vec!["--user=alice:wrong", "get", "/app/a"],
        vec!["--user=bob:bobpw", "put", "/wo/x", "1"],
        vec!["--user=bob:bobpw", "put", "/wo/x", "2", "--prev-kv"],
        vec!["--user=bob:bobpw", "get", "/wo/x"],
        vec!["--user=bob:bobpw", "del", "/wo/x", "--prev-kv"],
        vec!["--user=bob:bobpw", "del", "/wo/x"],
        vec![alice, "user", "list"],
        vec![alice, "role", "add", "mine"],
        vec![root, "user", "revoke-role", "root", "root"],
        vec![root, "user", "delete", "root"],
        vec![root, "role", "delete", "root"],
        vec![root, "user", "revoke-role", "alice", "nope"],
        vec![root, "role", "revoke-permission", "app", "/nothing"],
        vec![root, "role", "revoke-permission", "app", "/shared"],
        vec![alice, "get", "/shared"],
        vec![root, "user", "revoke-role", "alice", "app"],
        vec![alice, "get", "/app/a"],
        vec![root, "user", "delete", "alice"],
        vec![alice, "get", "/app/a"],
        vec![root, "auth", "disable"],
        vec!["put", "/open", "again"],
        vec!["get", "/app/a"],
    ];
    // The last line etcdctl prints on stderr ("Error: …"), or its stdout.
    let outcome = |endpoint: &str, args: &[&str]| {
        let (success, out, err) = run_etcdctl(endpoint, args, None);
        let err_line = err.lines().rev().find(|l| l.starts_with("Error:")).unwrap_or("").to_string();
        (success, if success { out } else { err_line })
    };
    let mut differences = Vec::new();
    for args in &session {
        let theirs = outcome(&etcd.endpoint, args);
        let ours = outcome(&kvset, args);
        if theirs != ours {
            differences.push(format!("etcdctl {args:?}\n  etcd:  {theirs:?}\n  kvset: {ours:?}"));
        }
    }
    assert!(differences.is_empty(), "kvset differs from etcd:\n{}", differences.join("\n"));
    c.shutdown().await;
}

/// Stalls every apply of a member until a moment a test sets.
#[derive(Default)]
struct ApplyGate {
    until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl kvset_storage::DiskFault for ApplyGate {
    fn apply_stall(&self) -> Duration {
        self.until
            .lock()
            .unwrap()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(std::time::Instant::now()))
    }
}

/// A request with alice's token.
fn as_user<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("token", token.parse().unwrap());
    r
}

/// Issue 24, item 7: a lease revoke (which deletes the lease's keys) and a lease's time-to-live
/// with its keys (which names them) were checked only against the receiving member's view. A
/// member lagging behind a key attached to the lease let a user who may write only /app/
/// revoke it — deleting /etc/secret — and read its name. Now the revoke is checked again when it
/// applies, and the read on the leader, each against the keys of that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_revoke_and_lease_keys_are_checked_where_they_take_effect() {
    let mut c = Cluster::new(3, |config| config.auth.bcrypt_cost = 4).await;
    let gates: Vec<std::sync::Arc<ApplyGate>> = (0..3).map(|_| Default::default()).collect();
    for o in 0..3 {
        let options =
            kvset_server::NodeOptions { disk_fault: Some(gates[o as usize].clone()), ..Default::default() };
        c.start_node_with(o, options).await;
    }
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let lagging = (0..3).find(|o| *o != leader).unwrap();
    let e = c.endpoint(leader);
    tokio::task::spawn_blocking(move || set_up_users(&e)).await.unwrap();
    let mut at_leader = kvset_tests::etcd::Raw::connect(&c.endpoint(leader)).await;
    let mut at_lagging = kvset_tests::etcd::Raw::connect(&c.endpoint(lagging)).await;
    let login = |name: &str, password: &str| epb::AuthenticateRequest {
        name: name.into(),
        password: password.into(),
    };
    let alice = at_leader.auth.authenticate(login("alice", "alicepw")).await.unwrap().into_inner().token;
    let root = at_leader.auth.authenticate(login("root", "rootpw")).await.unwrap().into_inner().token;

    // Alice's lease with her key; the lagging member applied both.
    let lease = at_leader
        .lease
        .lease_grant(as_user(&alice, epb::LeaseGrantRequest { ttl: 600, id: 0 }))
        .await
        .unwrap()
        .into_inner()
        .id;
    let put = |key: &str, lease| epb::PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        lease,
        ..Default::default()
    };
    at_leader.kv.put(as_user(&alice, put("/app/a", lease))).await.unwrap();
    let lagging_member = c.node(lagging).member().clone();
    kvset_tests::eventually("the lagging member has alice's key", Duration::from_secs(10), || {
        let m = lagging_member.clone();
        async move { m.reader().lease(lease).ok().flatten().filter(|(_, keys)| keys.len() == 1) }
    })
    .await;

    // The lagging member stops applying; root attaches /etc/secret to the lease.
    *gates[lagging as usize].until.lock().unwrap() = Some(std::time::Instant::now() + Duration::from_secs(6));
    at_leader.kv.put(as_user(&root, put("/etc/secret", lease))).await.unwrap();

    // Through the lagging member, alice may neither read the lease's key names…
    let ttl = at_lagging
        .lease
        .lease_time_to_live(as_user(&alice, epb::LeaseTimeToLiveRequest { id: lease, keys: true }))
        .await;
    let refused = ttl.expect_err("the lease's keys were named to a user who may not read /etc/secret");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // …nor revoke it (which would delete /etc/secret).
    let revoke = at_lagging.lease.lease_revoke(as_user(&alice, epb::LeaseRevokeRequest { id: lease })).await;
    let refused = revoke.expect_err("a revoke deleting /etc/secret was allowed");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(refused.message(), "etcdserver: permission denied");
    let secret = at_leader
        .kv
        .range(as_user(&root, epb::RangeRequest { key: b"/etc/secret".to_vec(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secret.count, 1, "/etc/secret was deleted");
    // Root may.
    *gates[lagging as usize].until.lock().unwrap() = None;
    at_leader.lease.lease_revoke(as_user(&root, epb::LeaseRevokeRequest { id: lease })).await.unwrap();
    c.shutdown().await;
}

/// Issue 24, item 9: Cluster.Status with the digest option read every key for anyone. With
/// access control on it needs an administrator; the plain status (probes, `kvset status`)
/// does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_digest_needs_an_administrator() {
    let c = Cluster::start_with(3, |config| config.auth.bcrypt_cost = 4).await;
    let leader = c.wait_voters(3, Duration::from_secs(60)).await;
    let e = c.endpoint(leader);
    tokio::task::spawn_blocking(move || set_up_users(&e)).await.unwrap();
    let endpoints: Vec<String> = (0..3).map(|o| c.endpoint(o)).collect();
    let alice = user_client(&endpoints, "alice", "alicepw");
    let root = user_client(&endpoints, "root", "rootpw");
    let anyone = Client::new(endpoints.clone(), ClientOptions::default()).unwrap();
    let one = c.endpoint(1);
    assert!(anyone.status_request(&one, false).await.is_ok(), "the plain status needs no credentials");
    match alice.status_request(&one, true).await {
        Err(kvset_client::Error::Server { code: tonic::Code::PermissionDenied, message }) => {
            assert!(message.contains("permission denied"), "{message}")
        }
        other => panic!("a digest for a non-administrator: {other:?}"),
    }
    assert!(anyone.status_request(&one, true).await.is_err(), "a digest without credentials");
    let digest = root.status_request(&one, true).await.unwrap();
    assert!(digest.state_keys > 0 || digest.state_digest != 0);
    c.shutdown().await;
}
