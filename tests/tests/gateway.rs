//! etcd's JSON gateway on kvset's client port, with real clients: curl on every path (HTTP/1.1,
//! HTTP/2 without TLS, and both over TLS), python etcd3gw (Debian's python3-etcd3gw release) unchanged against three
//! members (and the same script against a real etcd, transcripts compared), tokens in the
//! `Authorization` header, bad input, streams a client abandons (tasks and memory come back),
//! and streams ending when a member stops. The differential tests against a real etcd are in
//! `gateway_differential.rs`.

use std::time::Duration;
use std::time::Instant;

use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::http;
use kvset_tests::http::Answer;
use serde_json::json;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// The leak test measures the process's resident memory, which every in-process cluster of this
/// binary shares: it runs alone (write), the other tests side by side (read).
static MEMORY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn b64(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// curl `POST url -d body` (plus `extra` arguments).
fn curl_post(endpoint: &str, path: &str, body: &str, extra: &[&str]) -> Answer {
    let url = format!("http://{endpoint}{path}");
    let mut args = vec![url.as_str(), "-X", "POST", "-d", body];
    args.extend_from_slice(extra);
    let (answer, code) = http::curl(&args);
    assert_eq!(code, 0, "curl {path} {body}: exit {code}");
    answer
}

fn revision(a: &Answer) -> i64 {
    a.json()["header"]["revision"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// What each path is called with, and what must come back (status, and a check of the JSON).
type Check = fn(&Value) -> bool;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_path_answers_through_curl_on_a_follower() {
    let _shared = MEMORY.read().await;
    let mut c = Cluster::start(3).await;
    let leader = c.wait_leader(T).await;
    let follower = (0..3).find(|o| *o != leader).expect("a follower");
    let ep = c.endpoint(follower);
    let (foo, bar) = (b64("foo"), b64("bar"));
    // In the order they run; each path of the gateway's table at least once.
    let cases: Vec<(&str, String, u16, Check)> = vec![
        ("kv/put", format!(r#"{{"key":"{foo}","value":"{bar}"}}"#), 200, |v| v["header"]["revision"] == "2"),
        ("kv/range", format!(r#"{{"key":"{foo}"}}"#), 200, |v| {
            v["kvs"][0]["value"] == "YmFy" && v["count"] == "1"
        }),
        (
            "kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{foo}","target":"VALUE","value":"{bar}"}}],"success":[{{"request_put":{{"key":"{foo}","value":"Mg=="}}}}]}}"#
            ),
            200,
            |v| v["succeeded"] == true,
        ),
        ("kv/deleterange", format!(r#"{{"key":"{foo}","prev_kv":true}}"#), 200, |v| {
            v["deleted"] == "1" && v["prev_kvs"][0]["value"] == "Mg=="
        }),
        ("kv/compaction", r#"{"revision":3}"#.into(), 200, |v| v["header"]["revision"].is_string()),
        ("lease/grant", r#"{"ID":1000,"TTL":60}"#.into(), 200, |v| v["ID"] == "1000" && v["TTL"] == "60"),
        ("lease/timetolive", r#"{"ID":1000,"keys":true}"#.into(), 200, |v| v["grantedTTL"] == "60"),
        ("kv/lease/timetolive", r#"{"ID":1000}"#.into(), 200, |v| v["ID"] == "1000"),
        ("lease/leases", "{}".into(), 200, |v| v["leases"][0]["ID"] == "1000"),
        ("kv/lease/leases", "{}".into(), 200, |v| v["leases"][0]["ID"] == "1000"),
        ("lease/keepalive", r#"{"ID":1000}"#.into(), 200, |v| v["result"]["TTL"] == "60"),
        ("lease/revoke", r#"{"ID":1000}"#.into(), 200, |v| v["header"].is_object()),
        ("kv/lease/revoke", r#"{"ID":1000}"#.into(), 404, |v| {
            v["message"] == "etcdserver: requested lease not found"
        }),
        ("watch", r#"{"create_request":{"key":"Zm9v"}}"#.into(), 200, |v| v["result"]["created"] == true),
        ("cluster/member/list", "{}".into(), 200, |v| v["members"].as_array().is_some_and(|m| m.len() == 3)),
        ("cluster/member/add", r#"{"peerURLs":["http://10.0.0.9:2380"]}"#.into(), 412, |v| v["code"] == 9),
        ("cluster/member/remove", r#"{"ID":1}"#.into(), 412, |v| v["code"] == 9),
        ("cluster/member/update", r#"{"ID":1}"#.into(), 412, |v| v["code"] == 9),
        ("cluster/member/promote", r#"{"ID":1}"#.into(), 412, |v| v["code"] == 9),
        ("maintenance/status", "{}".into(), 200, |v| v["version"] == "3.5.21" && v["leader"].is_string()),
        ("maintenance/alarm", "{}".into(), 200, |v| v["header"].is_object()),
        ("maintenance/hash", "{}".into(), 200, |v| v["hash"].is_number()),
        ("maintenance/snapshot", "{}".into(), 200, |v| v["result"]["blob"].is_string()),
        // Through a follower: etcd's "not leader" (a leader would say "bad leader transferee").
        ("maintenance/transfer-leadership", r#"{"targetID":12345}"#.into(), 412, |v| v["code"] == 9),
        ("auth/authenticate", r#"{"name":"root","password":"x"}"#.into(), 412, |v| {
            v["message"] == "etcdserver: authentication is not enabled"
        }),
        ("auth/user/add", r#"{"name":"alice","password":"pw"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/user/get", r#"{"name":"alice"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/user/list", "{}".into(), 200, |v| v["users"][0] == "alice"),
        ("auth/user/changepw", r#"{"name":"alice","password":"pw2"}"#.into(), 200, |v| {
            v["header"].is_object()
        }),
        ("auth/role/add", r#"{"name":"app"}"#.into(), 200, |v| v["header"].is_object()),
        (
            "auth/role/grant",
            r#"{"name":"app","perm":{"permType":"READWRITE","key":"YXBw","range_end":"YXBx"}}"#.into(),
            200,
            |v| v["header"].is_object(),
        ),
        ("auth/role/get", r#"{"role":"app"}"#.into(), 200, |v| v["perm"][0]["permType"] == "READWRITE"),
        ("auth/role/list", "{}".into(), 200, |v| v["roles"][0] == "app"),
        ("auth/user/grant", r#"{"user":"alice","role":"app"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/user/revoke", r#"{"name":"alice","role":"app"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/role/revoke", r#"{"role":"app","key":"YXBw","range_end":"YXBx"}"#.into(), 200, |v| {
            v["header"].is_object()
        }),
        ("auth/role/delete", r#"{"role":"app"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/user/delete", r#"{"name":"alice"}"#.into(), 200, |v| v["header"].is_object()),
        ("auth/enable", "{}".into(), 412, |v| v["message"] == "etcdserver: root user does not exist"),
        ("auth/disable", "{}".into(), 200, |v| v.is_object()),
        ("lock/lock", r#"{"name":"bGs="}"#.into(), 200, |v| {
            v["key"].as_str().is_some_and(|k| k.starts_with("bGsv"))
        }),
        ("lock/unlock", r#"{"key":"bGsvMA=="}"#.into(), 200, |v| v["header"].is_object()),
        ("election/campaign", r#"{"name":"ZWw=","value":"djE="}"#.into(), 200, |v| {
            v["leader"]["name"] == "ZWw="
        }),
        ("election/leader", r#"{"name":"ZWw="}"#.into(), 200, |v| v["kv"]["value"] == "djE="),
        ("election/observe", r#"{"name":"ZWw="}"#.into(), 200, |v| v["result"]["kv"]["value"] == "djE="),
        (
            "election/proclaim",
            r#"{"leader":{"name":"ZWw=","key":"ZWwvMA==","rev":"1"},"value":"djI="}"#.into(),
            500,
            |v| v["message"] == "election: not leader",
        ),
        ("election/resign", "{}".into(), 500, |v| v["message"] == "\"leader\" field must be provided"),
        // Last: the member restarts in-process to rewrite its database.
        ("maintenance/defragment", "{}".into(), 200, |v| v.is_object()),
    ];
    let mut failures = Vec::new();
    for (path, body, status, check) in &cases {
        let url = format!("http://{ep}/v3/{path}");
        let streaming = ["watch", "election/observe"].contains(path);
        let mut args = vec![url.as_str(), "-d", body.as_str()];
        if streaming {
            // Streams stay open: take the first line.
            args.extend(["-N", "--max-time", "3"]);
        }
        let (answer, code) = http::curl(&args);
        let first_line = answer.body.split(|b| *b == b'\n').next().unwrap_or_default().to_vec();
        let json: Value = serde_json::from_slice(&first_line).unwrap_or(Value::Null);
        let ok = answer.status == *status
            && (code == 0 || (streaming && code == 28))
            && answer.header("content-type") == Some("application/json")
            && answer.header("access-control-allow-origin") == Some("*")
            && check(&json);
        if !ok {
            failures.push(format!("{path} {body}: HTTP {} (curl {code}) {}", answer.status, answer.text()));
        }
    }
    // Every path of the table was called.
    for (path, _, _) in kvset_server::gateway::routes::ROUTES {
        if !cases.iter().any(|(p, ..)| p == path) {
            failures.push(format!("{path}: not called"));
        }
    }
    // The defragmented member serves again (`kvset serve` restarts it; here the harness does).
    c.stop(follower).await;
    c.start_node(follower).await;
    c.wait_voters(3, T).await;
    c.wait_leader(T).await;
    // /version, /health and the plain-text refusals.
    let (version, _) = http::curl(&[&format!("http://{ep}/version")]);
    if version.json() != json!({"etcdserver": "3.5.21", "etcdcluster": "3.5.0"}) {
        failures.push(format!("/version: {}", version.text()));
    }
    let (health, _) = http::curl(&[&format!("http://{ep}/health")]);
    if (health.status, health.text().as_str()) != (200, r#"{"health":"true","reason":""}"#) {
        failures.push(format!("/health: {} {}", health.status, health.text()));
    }
    let (serializable, _) = http::curl(&[&format!("http://{ep}/health?serializable=true")]);
    if serializable.status != 200 {
        failures.push(format!("/health?serializable=true: {}", serializable.status));
    }
    for (method, path, status, body) in [
        ("GET", "/v3/kv/range", 405, "Method Not Allowed\n"),
        ("POST", "/v3/nonexistent", 404, "Not Found\n"),
        ("POST", "/v3alpha/kv/range", 404, "404 page not found\n"),
        ("POST", "/health", 405, "Method Not Allowed\n"),
        ("OPTIONS", "/v3/kv/range", 200, ""),
    ] {
        let (a, _) = http::curl(&[&format!("http://{ep}{path}"), "-X", method]);
        if (a.status, a.text().as_str()) != (status, body) {
            failures.push(format!("{method} {path}: {} {:?}", a.status, a.text()));
        }
    }
    c.shutdown().await;
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_without_tls_reaches_the_gateway_and_grpc_still_works() {
    let _shared = MEMORY.read().await;
    let c = Cluster::start(1).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(0);
    // curl speaking HTTP/2 with prior knowledge (etcd 3.4 sends that to gRPC and fails it).
    let put = curl_post(&ep, "/v3/kv/put", r#"{"key":"aDI=","value":"eWVz"}"#, &["--http2-prior-knowledge"]);
    assert_eq!(put.status, 200, "{}", put.text());
    let got = curl_post(&ep, "/v3/kv/range", r#"{"key":"aDI="}"#, &["--http2-prior-knowledge"]);
    assert_eq!(got.json()["kvs"][0]["value"], "eWVz", "{}", got.text());
    let (version, _) = http::curl(&[&format!("http://{ep}/version"), "--http2-prior-knowledge"]);
    assert_eq!(version.json()["etcdserver"], "3.5.21");
    // HTTP/1.0 and an h2c upgrade offer (served as HTTP/1.1).
    assert_eq!(curl_post(&ep, "/v3/kv/range", r#"{"key":"aDI="}"#, &["--http1.0"]).status, 200);
    assert_eq!(curl_post(&ep, "/v3/kv/range", r#"{"key":"aDI="}"#, &["--http2"]).status, 200);
    // gRPC on the same port, same connection type.
    let mut raw = etcd::Raw::connect(&ep).await;
    let r = raw
        .kv
        .range(kvset_proto::etcdserverpb::RangeRequest { key: b"h2".to_vec(), ..Default::default() })
        .await
        .expect("gRPC range");
    assert_eq!(r.into_inner().kvs[0].value, b"yes");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_speaks_tls_over_http1_and_http2() {
    let _shared = MEMORY.read().await;
    let pki = kvset_tests::pki::Pki::new();
    let c = Cluster::start_with(1, pki.tweak()).await;
    c.wait_leader(T).await;
    let dir = pki.dir();
    let user = pki.user("root");
    std::fs::write(dir.join("curl.pem"), &user.cert_pem).unwrap();
    std::fs::write(dir.join("curl-key.pem"), &user.key_pem).unwrap();
    let ca = dir.join("kvset-0-ca.pem").display().to_string();
    let cert = dir.join("curl.pem").display().to_string();
    let key = dir.join("curl-key.pem").display().to_string();
    let port = c.endpoint(0).rsplit(':').next().unwrap().to_string();
    let name = kvset_tests::pki::member_dns_name(0);
    let url = format!("https://{name}:{port}/v3/kv/put");
    let resolve = format!("{name}:{port}:127.0.0.1");
    let tls = ["--cacert", &ca, "--cert", &cert, "--key", &key, "--resolve", &resolve];
    for version in ["--http1.1", "--http2"] {
        let mut args = vec![url.as_str(), "-d", r#"{"key":"dGxz","value":"b2s="}"#, version];
        args.extend_from_slice(&tls);
        let (a, code) = http::curl(&args);
        assert_eq!((code, a.status), (0, 200), "{version}: {}", a.text());
        assert!(revision(&a) > 1, "{version}: {}", a.text());
    }
    // Without a client certificate the handshake is refused, as for gRPC.
    let (_, code) = http::curl(&[url.as_str(), "-d", "{}", "--cacert", &ca, "--resolve", &resolve]);
    assert_ne!(code, 0, "no client certificate, no answer");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_from_authenticate_go_in_the_authorization_header() {
    let _shared = MEMORY.read().await;
    let c = Cluster::start(1).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(0);
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"root","password":"rootpw"}"#),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/user/add", r#"{"name":"alice","password":"alicepw"}"#),
        ("/v3/auth/role/add", r#"{"name":"app"}"#),
        (
            "/v3/auth/role/grant",
            r#"{"name":"app","perm":{"permType":"READWRITE","key":"YXBw","range_end":"YXBx"}}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"alice","role":"app"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let a = curl_post(&ep, path, body, &[]);
        assert_eq!(a.status, 200, "{path}: {}", a.text());
    }
    let login = curl_post(&ep, "/v3/auth/authenticate", r#"{"name":"alice","password":"alicepw"}"#, &[]);
    let token = login.json()["token"].as_str().expect("a token").to_string();
    let auth = format!("Authorization: {token}");
    let put = curl_post(&ep, "/v3/kv/put", r#"{"key":"YXBw","value":"eA=="}"#, &["-H", &auth]);
    assert_eq!(put.status, 200, "{}", put.text());
    let lower = format!("authorization: {token}");
    assert_eq!(curl_post(&ep, "/v3/kv/range", r#"{"key":"YXBw"}"#, &["-H", &lower]).status, 200);
    let md = format!("Grpc-Metadata-Token: {token}");
    assert_eq!(curl_post(&ep, "/v3/kv/range", r#"{"key":"YXBw"}"#, &["-H", &md]).status, 200);
    // etcd's refusals, with its statuses.
    let none = curl_post(&ep, "/v3/kv/range", r#"{"key":"YXBw"}"#, &[]);
    assert_eq!((none.status, none.json()["message"].clone()), (400, json!("etcdserver: user name is empty")));
    let bad = curl_post(&ep, "/v3/kv/range", r#"{"key":"YXBw"}"#, &["-H", "Authorization: nope"]);
    assert_eq!((bad.status, bad.json()["code"].clone()), (401, json!(16)), "{}", bad.text());
    let denied = curl_post(&ep, "/v3/kv/range", r#"{"key":"b3RoZXI="}"#, &["-H", &auth]);
    assert_eq!(
        (denied.status, denied.json()["message"].clone()),
        (403, json!("etcdserver: permission denied"))
    );
    let admin = curl_post(&ep, "/v3/auth/user/list", "{}", &["-H", &auth]);
    assert_eq!(admin.status, 403, "{}", admin.text());
    // A watch is refused in the stream, as etcd does.
    let mut watch =
        http::Stream::open(&ep, "POST", "/v3/watch", &[], br#"{"create_request":{"key":"YXBw"}}"#)
            .await
            .unwrap();
    let lines = watch.lines(1, Duration::from_secs(10)).await.expect("a refusal");
    assert_eq!(lines[0]["result"]["canceled"], true, "{lines:?}");
    // The root's token disables auth again.
    let root = curl_post(&ep, "/v3/auth/authenticate", r#"{"name":"root","password":"rootpw"}"#, &[]);
    let root_auth = format!("Authorization: {}", root.json()["token"].as_str().unwrap());
    assert_eq!(curl_post(&ep, "/v3/auth/disable", "{}", &["-H", &root_auth]).status, 200);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_send_one_line_per_chunk_while_the_body_is_open() {
    let _shared = MEMORY.read().await;
    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(2);
    // A watch with prev_kv; events made through another member.
    let mut w = http::Stream::open(
        &ep,
        "POST",
        "/v3/watch",
        &[],
        br#"{"create_request":{"key":"dw==","prev_kv":true}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        (w.status, w.headers.iter().any(|(n, v)| n == "transfer-encoding" && v == "chunked")),
        (200, true)
    );
    let created = w.lines(1, T).await.unwrap();
    assert_eq!(created[0]["result"]["created"], true);
    let other = c.endpoint(0);
    curl_post(&other, "/v3/kv/put", r#"{"key":"dw==","value":"MQ=="}"#, &[]);
    curl_post(&other, "/v3/kv/put", r#"{"key":"dw==","value":"Mg=="}"#, &[]);
    curl_post(&other, "/v3/kv/deleterange", r#"{"key":"dw=="}"#, &[]);
    let events = w.lines(3, T).await.unwrap();
    let e = |i: usize| &events[i]["result"]["events"][0];
    assert_eq!((e(0)["kv"]["value"].clone(), e(0).get("type").cloned()), (json!("MQ=="), None));
    assert_eq!(e(1)["prev_kv"]["value"], "MQ==");
    assert_eq!((e(2)["type"].clone(), e(2)["kv"]["mod_revision"].clone()), (json!("DELETE"), json!("4")));
    drop(w);

    // A keep-alive stream ends with its body; three messages, three answers.
    let grant = curl_post(&ep, "/v3/lease/grant", r#"{"TTL":60}"#, &[]);
    let id = grant.json()["ID"].as_str().unwrap().to_string();
    let body = format!("{{\"ID\":\"{id}\"}}\n{{\"ID\":{id}}} {{\"ID\":424242}}");
    let ka = http::Stream::open(&ep, "POST", "/v3/lease/keepalive", &[], body.as_bytes()).await.unwrap();
    let answer = ka.finish().await.unwrap();
    let lines: Vec<Value> = answer.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", answer.text());
    assert_eq!(
        (lines[0]["result"]["TTL"].clone(), lines[2]["result"].get("TTL").cloned()),
        (json!("60"), None)
    );

    // Full duplex over HTTP/1.1: a watch created by a body still being sent is answered at once.
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(&ep).await.unwrap();
    let create = br#"{"create_request":{"key":"ZA=="}}"#;
    s.write_all(
        format!(
            "POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            create.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(create).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while !String::from_utf8_lossy(&got).contains("\"created\":true") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), s.read(&mut buf))
            .await
            .expect("created before the body ends")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_etcds_answer_and_changes_nothing() {
    let _shared = MEMORY.read().await;
    let c = Cluster::start(1).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(0);
    let before = revision(&curl_post(&ep, "/v3/kv/put", r#"{"key":"YQ==","value":"MQ=="}"#, &[]));
    let big_value = "A".repeat(6 << 20);
    let huge_body = format!(r#"{{"key":"YQ==","value":"{}"}}"#, "A".repeat(20 << 20));
    let cases: Vec<(&str, String, u16, i64)> = vec![
        ("malformed JSON", r#"{"key":"#.into(), 400, 3),
        ("not JSON", "hello".into(), 400, 3),
        ("an array", "[]".into(), 400, 3),
        ("a string for a bool", r#"{"key":"YQ==","value":"Mg==","prev_kv":"yes"}"#.into(), 400, 3),
        ("a float for an int64", r#"{"key":"YQ==","value":"Mg==","lease":1.5}"#.into(), 400, 3),
        ("bad base64", r#"{"key":"!!!","value":"Mg=="}"#.into(), 400, 3),
        ("an unknown enum", r#"{"compare":[{"key":"YQ==","result":"ABOUT"}]}"#.into(), 400, 3),
        ("no key", r#"{"value":"Mg=="}"#.into(), 400, 3),
        (
            "a message over the request limit",
            format!(r#"{{"key":"YQ==","value":"{}"}}"#, "A".repeat(3 << 20)),
            400,
            3,
        ),
        ("a message over the gRPC limit", format!(r#"{{"key":"YQ==","value":"{big_value}"}}"#), 429, 8),
        ("a body over the gateway's limit", huge_body, 429, 8),
    ];
    for (what, body, status, code) in &cases {
        let path = if what.contains("enum") { "/v3/kv/txn" } else { "/v3/kv/put" };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("body.json");
        std::fs::write(&file, body).unwrap();
        let at = format!("@{}", file.display());
        let url = format!("http://{ep}{path}");
        let (a, exit) = http::curl(&[url.as_str(), "--data-binary", &at]);
        assert_eq!(exit, 0, "{what}");
        assert_eq!((a.status, a.json()["code"].as_i64()), (*status, Some(*code)), "{what}: {}", a.text());
        assert_eq!(a.json()["error"], a.json()["message"], "{what}");
    }
    // Malformed stream bodies: a plain 500 before the stream, nothing open after.
    for path in ["/v3/watch", "/v3/lease/keepalive"] {
        let a = curl_post(&ep, path, r#"{"create_request":"#, &[]);
        assert_eq!((a.status, a.json()["code"].as_i64()), (500, Some(2)), "{path}: {}", a.text());
    }
    let after = revision(&curl_post(&ep, "/v3/kv/range", r#"{"key":"YQ=="}"#, &[]));
    assert_eq!(after, before, "nothing was written");
    let kept = curl_post(&ep, "/v3/kv/range", r#"{"key":"YQ=="}"#, &[]);
    assert_eq!(kept.json()["kvs"][0]["value"], "MQ==");
    c.shutdown().await;
}

/// The member's process: live tasks of the test's runtime and resident memory.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_abandoned_watch_streams_leak_no_task_or_memory() {
    let _alone = MEMORY.write().await;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start(1).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(0);
    let ops = c.ops_endpoint(0);
    let runtime = tokio::runtime::Handle::current();
    let watches = |ops: String| async move {
        let text = kvset_tests::http_get(&ops, "/metrics").await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("kvset_watches "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Warm up (allocator arenas, connection pools), then measure.
    let open_and_abandon = |n: usize, ep: String| async move {
        for round in 0..n / 100 {
            let mut streams = Vec::new();
            for i in 0..100 {
                let mut s = tokio::net::TcpStream::connect(&ep).await.unwrap();
                let body = format!(
                    r#"{{"create_request":{{"key":"{}","prev_kv":true}}}}"#,
                    b64(&format!("w{round}-{i}"))
                );
                s.write_all(
                    format!(
                        "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
                streams.push(s);
            }
            // Each is created (so the member holds it) before the client goes away.
            for s in &mut streams {
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("created") {
                    let mut buf = [0u8; 1024];
                    let n =
                        tokio::time::timeout(T, s.read(&mut buf)).await.expect("created in time").unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
            }
            drop(streams);
        }
    };
    let tasks_idle = runtime.metrics().num_alive_tasks();
    open_and_abandon(200, ep.clone()).await;
    kvset_tests::eventually("warm-up watches gone", T, || {
        let ops = ops.clone();
        async move { (watches(ops).await == Some(0.0)).then_some(()) }
    })
    .await;
    // The warm-up's connection tasks are gone before the measurement starts.
    kvset_tests::eventually("warm-up tasks gone", T, || {
        let runtime = runtime.clone();
        async move { (runtime.metrics().num_alive_tasks() <= tasks_idle + 5).then_some(()) }
    })
    .await;
    let (tasks_before, rss_before) = (runtime.metrics().num_alive_tasks(), rss_kib());

    open_and_abandon(1000, ep.clone()).await;
    kvset_tests::eventually("every abandoned watch is gone from the member", T, || {
        let ops = ops.clone();
        async move { (watches(ops).await == Some(0.0)).then_some(()) }
    })
    .await;
    let settled = kvset_tests::poll_until("tasks back to where they were", T, || {
        let runtime = runtime.clone();
        async move {
            let now = runtime.metrics().num_alive_tasks();
            (now <= tasks_before + 5).then_some(now)
        }
    })
    .await;
    let tasks_after = runtime.metrics().num_alive_tasks();
    let rss_after = rss_kib();
    tracing::info!(tasks_before, tasks_after, rss_before, rss_after, "after 1,000 abandoned watch streams");
    println!("tasks {tasks_before} -> {tasks_after}, RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(settled.is_ok(), "tasks {tasks_before} -> {tasks_after}: {settled:?}");
    // Memory: a leak of the streams' state (queues, buffers) would cost several KiB each.
    assert!(rss_after < rss_before + 8 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
    // The member still serves.
    assert_eq!(curl_post(&ep, "/v3/kv/put", r#"{"key":"YQ==","value":"MQ=="}"#, &[]).status, 200);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_member_ends_its_gateway_streams() {
    let _shared = MEMORY.read().await;
    let mut c = Cluster::start(1).await;
    c.wait_leader(T).await;
    let ep = c.endpoint(0);
    let mut watch =
        http::Stream::open(&ep, "POST", "/v3/watch", &[], br#"{"create_request":{"key":"YQ=="}}"#)
            .await
            .unwrap();
    watch.lines(1, T).await.expect("created");
    assert_eq!(curl_post(&ep, "/v3/election/campaign", r#"{"name":"ZQ==","value":"dg=="}"#, &[]).status, 200);
    let mut observe =
        http::Stream::open(&ep, "POST", "/v3/election/observe", &[], br#"{"name":"ZQ=="}"#).await.unwrap();
    observe.lines(1, T).await.expect("the leader");
    let started = Instant::now();
    c.stop(0).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stop waited {:?} for the streams",
        started.elapsed()
    );
    // The streams ended (with an error line or not), they did not hang.
    for stream in [watch, observe] {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.finish()).await;
        assert!(ended.is_ok(), "a stream outlived its member");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_etcd3gw_works_unchanged_against_three_members_as_against_etcd() {
    let _shared = MEMORY.read().await;
    let python = etcd::python();
    let script = etcd::python_scripts().join("etcd3gw_client.py");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import etcd3gw"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "etcd3gw is not installed in {} (scripts/check.sh installs it)", python.display());
    let run = |endpoints: Vec<String>| {
        let (python, script) = (python.clone(), script.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(python).arg(script).args(endpoints).output()
        })
    };
    let etcd_server = etcd::EtcdServer::start().await;
    let c = Cluster::start(3).await;
    c.wait_leader(T).await;
    // The same three clients, all of etcd's on its one member.
    let on_etcd = run(vec![etcd_server.endpoint.clone(); 3]).await.unwrap().expect("run python");
    let on_kvset = run((0..3).map(|o| c.endpoint(o)).collect()).await.unwrap().expect("run python");
    let text = |o: &std::process::Output| {
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let ((etcd_out, etcd_err), (kvset_out, kvset_err)) = (text(&on_etcd), text(&on_kvset));
    assert!(on_etcd.status.success() && etcd_out.ends_with("ok\n"), "against etcd:\n{etcd_out}\n{etcd_err}");
    assert!(
        on_kvset.status.success() && kvset_out.ends_with("ok\n"),
        "against kvset:\n{kvset_out}\n{kvset_err}"
    );
    let differing: Vec<String> = etcd_out
        .lines()
        .zip(kvset_out.lines())
        .filter(|(e, k)| e != k)
        .map(|(e, k)| format!("    etcd:  {e}\n    kvset: {k}"))
        .collect();
    assert!(differing.is_empty(), "transcripts differ:\n{}", differing.join("\n"));
    c.shutdown().await;
}
