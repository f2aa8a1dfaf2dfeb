//! Differential tests of etcd's JSON gateway: the same HTTP requests, byte for byte, sent to a
//! real etcd (Debian's `etcd-server` 3.4, started by each test) and to a 3-member kvset through
//! a follower, both empty; every answer's HTTP status, content type and JSON are compared field
//! by field, revisions included (the member-specific header fields aside, and per request what
//! moves with the clock or the build: remaining TTLs, server-chosen ids, versions, tokens).
//! Unary calls go through `curl`; streams through a raw HTTP/1.1 client that reads them line
//! by line. Then etcd's lock and election services, compared the same way through their gRPC
//! stubs.
//!
//! Requests whose answers differ on purpose are not sent here; the README's table lists them.
//! Every mismatch of a test is collected and reported together.

use std::time::Duration;

use kvset_proto::v3electionpb as vpb;
use kvset_proto::v3lockpb as lpb;
use kvset_tests::cluster::Cluster;
use kvset_tests::etcd;
use kvset_tests::etcd::EtcdServer;
use kvset_tests::etcd::Raw;
use kvset_tests::etcd::SideBySide;
use kvset_tests::http;
use kvset_tests::http::Answer;
use serde_json::Value;

/// What of an answer is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Norm {
    /// Everything but the member-specific header fields.
    Exact,
    /// A decode error of the gateway: status, content type and `code` (the wording is Go's or
    /// serde's).
    Decode,
    /// Only the JSON's shape (member names, sizes, hashes and versions differ by nature).
    Shape,
}

/// Fields that move with the clock or name things each server picks.
const SCRUBBED: [&str; 4] = ["cluster_id", "member_id", "raft_term", "token"];

/// One etcd and one kvset, and the mismatches found so far.
struct Both {
    etcd: String,
    kvset: String,
    compared: usize,
    mismatches: Vec<String>,
    _server: EtcdServer,
    cluster: Cluster,
}

impl Both {
    async fn start() -> Self {
        let both = SideBySide::start().await;
        Self {
            etcd: both.etcd.endpoint.clone(),
            kvset: both.kvset_endpoint(),
            compared: 0,
            mismatches: Vec::new(),
            _server: both.etcd,
            cluster: both.cluster,
        }
    }

    fn compare(&mut self, what: &str, etcd: String, kvset: String) {
        self.compared += 1;
        if etcd != kvset {
            self.mismatches.push(format!("{what}:\n    etcd:  {etcd}\n    kvset: {kvset}"));
        }
    }

    /// curl `args` (after the URL) against both; returns both answers.
    fn fetch(&self, what: &str, path: &str, args: &[&str]) -> (Answer, Answer) {
        let run = |endpoint: &str| {
            let url = format!("http://{endpoint}{path}");
            let mut all = vec![url.as_str()];
            all.extend_from_slice(args);
            let (answer, code) = http::curl(&all);
            assert_eq!(code, 0, "{what}: curl failed on {endpoint}");
            answer
        };
        (run(&self.etcd), run(&self.kvset))
    }

    /// curl `args` (after the URL) against both, compared under `norm`.
    fn curl(&mut self, what: &str, norm: Norm, path: &str, args: &[&str]) -> (Answer, Answer) {
        let (e, k) = self.fetch(what, path, args);
        self.compare(what, render(&e, norm), render(&k, norm));
        (e, k)
    }

    /// POSTs `body` to `path` on both.
    fn post(&mut self, what: &str, path: &str, body: &str) -> (Answer, Answer) {
        self.curl(what, Norm::Exact, path, &["-X", "POST", "-d", body])
    }

    fn post_as(&mut self, what: &str, norm: Norm, path: &str, body: &str) -> (Answer, Answer) {
        self.curl(what, norm, path, &["-X", "POST", "-d", body])
    }

    async fn finish(self) {
        let Both { compared, mismatches, cluster, .. } = self;
        cluster.shutdown().await;
        assert!(
            mismatches.is_empty(),
            "{} of {compared} answers differ from etcd's:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }
}

/// An answer as compared: status, content type, whether grpc-gateway's metadata header is
/// there, and the body (JSON normalized; text as is).
fn render(a: &Answer, norm: Norm) -> String {
    let content_type = a.header("content-type").unwrap_or("-");
    let grpc = if a.header("grpc-metadata-content-type").is_some() { " +grpc-metadata" } else { "" };
    let location = a.header("location").map(|l| format!(" location={l}")).unwrap_or_default();
    let allow = a.header("allow").map(|l| format!(" allow={l}")).unwrap_or_default();
    let body = match serde_json::from_slice::<Value>(&a.body) {
        Ok(mut json) => {
            scrub(&mut json);
            match norm {
                Norm::Exact => {}
                Norm::Decode => json = json.get("code").cloned().unwrap_or(Value::Null),
                Norm::Shape => shape(&mut json),
            }
            json.to_string()
        }
        // A stream's answer: one JSON value per line, each scrubbed.
        Err(_)
            if !a.body.is_empty() && a.text().lines().all(|l| serde_json::from_str::<Value>(l).is_ok()) =>
        {
            a.text()
                .lines()
                .map(|l| {
                    let mut json: Value = serde_json::from_str(l).unwrap_or(Value::Null);
                    scrub(&mut json);
                    json.to_string()
                })
                .collect::<Vec<_>>()
                .join("\n      ")
        }
        Err(_) => format!("{:?}", a.text()),
    };
    format!("{} {content_type}{grpc}{location}{allow} {body}", a.status)
}

/// Replaces the member-specific fields at every depth.
fn scrub(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if SCRUBBED.contains(&k.as_str()) {
                    *v = Value::String("_".into());
                } else {
                    scrub(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// Keeps the keys and types of a value (the first element of arrays).
fn shape(v: &mut Value) {
    match v {
        Value::Object(m) => m.values_mut().for_each(shape),
        Value::Array(a) => {
            a.truncate(1);
            a.iter_mut().for_each(shape);
        }
        Value::String(_) => *v = Value::String("<string>".into()),
        Value::Number(_) => *v = Value::String("<number>".into()),
        Value::Bool(_) => {}
        Value::Null => {}
    }
}

/// Replaces `field` (a remaining TTL) by whether it is positive, and sorts the lease's `keys`
/// (etcd lists them in Go's map order, which changes from call to call).
fn ttl_elided(mut a: Answer, field: &str) -> Answer {
    if let Ok(mut json) = serde_json::from_slice::<Value>(&a.body) {
        if let Some(Value::Array(keys)) = json.get_mut("keys") {
            keys.sort_by(|x, y| x.as_str().cmp(&y.as_str()));
        }
        if let Some(ttl) = json.get_mut(field) {
            let n: i64 = ttl.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
            *ttl = Value::String(if n > 0 { "<remaining>".into() } else { n.to_string() });
        }
        a.body = json.to_string().into_bytes();
    }
    a
}

/// The `leases` of a LeaseLeases answer in id order.
fn leases_sorted(mut a: Answer) -> Answer {
    if let Ok(mut json) = serde_json::from_slice::<Value>(&a.body) {
        if let Some(Value::Array(leases)) = json.get_mut("leases") {
            leases.sort_by_key(|l| l["ID"].as_str().and_then(|id| id.parse::<i64>().ok()));
        }
        a.body = json.to_string().into_bytes();
    }
    a
}

fn b64(s: &str) -> String {
    use std::fmt::Write;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                let _ = write!(out, "=");
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_answers_match_etcds() {
    let mut b = Both::start().await;
    let (foo, bar, fop) = (b64("foo"), b64("bar"), b64("fop"));

    // Routing: methods, unknown paths, prefixes, cleaning, preflight.
    b.curl("GET on a call", Norm::Exact, "/v3/kv/range", &[]);
    b.curl("PUT on a call", Norm::Exact, "/v3/kv/range", &["-X", "PUT", "-d", "{}"]);
    b.curl("DELETE on a call", Norm::Exact, "/v3/kv/range", &["-X", "DELETE"]);
    b.curl("OPTIONS preflight", Norm::Exact, "/v3/kv/range", &["-X", "OPTIONS", "-H", "Origin: http://x"]);
    b.post("unknown call", "/v3/nonexistent", "{}");
    b.post("unknown call under kv", "/v3/kv/nonexistent", "{}");
    b.post("trailing slash", "/v3/kv/range/", r#"{"key":"Zm9v"}"#);
    b.post("v3alpha", "/v3alpha/kv/range", r#"{"key":"Zm9v"}"#);
    b.post("upper case", "/V3/kv/range", r#"{"key":"Zm9v"}"#);
    b.post("double slash", "/v3//kv/range", r#"{"key":"Zm9v"}"#);
    b.curl("root", Norm::Exact, "/", &[]);
    b.curl("POST /health", Norm::Exact, "/health", &["-X", "POST"]);
    b.curl("GET /version", Norm::Shape, "/version", &[]);
    b.post("v3beta range on the empty store", "/v3beta/kv/range", r#"{"key":"Zm9v"}"#);
    b.post("range on the empty store", "/v3/kv/range", r#"{"key":"Zm9v"}"#);

    // Puts.
    b.post("put foo", "/v3/kv/put", &format!(r#"{{"key":"{foo}","value":"{bar}"}}"#));
    b.post("put prev_kv", "/v3/kv/put", &format!(r#"{{"key":"{foo}","value":"YmF6","prev_kv":true}}"#));
    b.post("put new key prev_kv", "/v3/kv/put", r#"{"key":"Zm9vMQ==","value":"YmFy","prev_kv":true}"#);
    b.post("put foo2", "/v3/kv/put", r#"{"key":"Zm9vMg==","value":"djI="}"#);
    b.post("grant 7777", "/v3/lease/grant", r#"{"ID":7777,"TTL":600}"#);
    b.post("put with lease", "/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"dg==","lease":7777}"#);
    b.post("range a leased key", "/v3/kv/range", r#"{"key":"bGVhc2Vk"}"#);
    b.post("put unknown lease", "/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"dg==","lease":"424242"}"#);
    b.post("put ignore_value missing", "/v3/kv/put", r#"{"key":"bm9uZQ==","ignore_value":true}"#);
    b.post(
        "put ignore_value",
        "/v3/kv/put",
        &format!(r#"{{"key":"{foo}","ignore_value":true,"prev_kv":true}}"#),
    );
    b.post(
        "put ignore_value and value",
        "/v3/kv/put",
        &format!(r#"{{"key":"{foo}","value":"eA==","ignore_value":true}}"#),
    );
    b.post("put ignore_lease", "/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"dzI=","ignore_lease":true}"#);
    b.post(
        "put ignore_lease missing",
        "/v3/kv/put",
        r#"{"key":"bm9uZQ==","value":"eA==","ignore_lease":true}"#,
    );
    b.post(
        "put ignore_lease and lease",
        "/v3/kv/put",
        r#"{"key":"bGVhc2Vk","ignore_lease":true,"lease":7777}"#,
    );
    b.post("put without key", "/v3/kv/put", r#"{"value":"eA=="}"#);
    b.post("put empty value", "/v3/kv/put", r#"{"key":"ZW1wdHk="}"#);
    b.post("range empty value", "/v3/kv/range", r#"{"key":"ZW1wdHk="}"#);

    // Ranges.
    let prefix = |extra: &str| format!(r#"{{"key":"{foo}","range_end":"{fop}"{extra}}}"#);
    b.post("range foo", "/v3/kv/range", &format!(r#"{{"key":"{foo}"}}"#));
    b.post("range prefix", "/v3/kv/range", &prefix(""));
    b.post("range all", "/v3/kv/range", r#"{"key":"AA==","range_end":"AA=="}"#);
    b.post("range limit 1", "/v3/kv/range", &prefix(r#","limit":1"#));
    b.post("range limit string", "/v3/kv/range", &prefix(r#","limit":"2""#));
    b.post("range count_only", "/v3/kv/range", &prefix(r#","count_only":true"#));
    b.post("range keys_only", "/v3/kv/range", &prefix(r#","keys_only":true"#));
    b.post("range sort names", "/v3/kv/range", &prefix(r#","sort_order":"DESCEND","sort_target":"KEY""#));
    b.post("range sort numbers", "/v3/kv/range", &prefix(r#","sort_order":2,"sort_target":0"#));
    b.post("range sort by value", "/v3/kv/range", &prefix(r#","sort_order":"ASCEND","sort_target":"VALUE""#));
    b.post(
        "range sort by mod limit",
        "/v3/kv/range",
        &prefix(r#","sort_order":"DESCEND","sort_target":"MOD","limit":2"#),
    );
    b.post_as("range sort_order \"2\"", Norm::Decode, "/v3/kv/range", &prefix(r#","sort_order":"2""#));
    b.post_as(
        "range sort_order lowercase",
        Norm::Decode,
        "/v3/kv/range",
        &prefix(r#","sort_order":"descend""#),
    );
    b.post("range at revision 2", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":2}}"#));
    b.post("range at revision 1", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":1}}"#));
    b.post("range future revision", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":1000}}"#));
    b.post("range revision -1", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":-1}}"#));
    b.post("range missing key", "/v3/kv/range", r#"{"key":"bm9uZQ=="}"#);
    b.post("range serializable", "/v3/kv/range", &format!(r#"{{"key":"{foo}","serializable":true}}"#));
    b.post("range min_mod_revision", "/v3/kv/range", &prefix(r#","min_mod_revision":4"#));
    b.post("range max_create_revision", "/v3/kv/range", &prefix(r#","max_create_revision":2"#));
    b.post("range negative limit", "/v3/kv/range", &prefix(r#","limit":-1"#));

    // Decoding: what the gateway reads, what it refuses.
    b.curl(
        "no content type",
        Norm::Exact,
        "/v3/kv/range",
        &["-H", "Content-Type:", "-d", r#"{"key":"Zm9vMQ=="}"#],
    );
    b.curl(
        "text/plain",
        Norm::Exact,
        "/v3/kv/range",
        &["-H", "Content-Type: text/plain", "-d", r#"{"key":"Zm9vMQ=="}"#],
    );
    b.curl(
        "application/grpc over HTTP/1.1",
        Norm::Exact,
        "/v3/kv/range",
        &["-H", "Content-Type: application/grpc", "-d", r#"{"key":"Zm9vMQ=="}"#],
    );
    b.curl(
        "Grpc-Metadata passthrough",
        Norm::Exact,
        "/v3/kv/range",
        &["-H", "Grpc-Metadata-Foo: bar", "-d", r#"{"key":"Zm9vMQ=="}"#],
    );
    b.curl(
        "Grpc-Timeout 1n",
        Norm::Exact,
        "/v3/kv/range",
        &["-H", "Grpc-Timeout: 1n", "-d", r#"{"key":"Zm9vMQ=="}"#],
    );
    b.post("null body", "/v3/kv/range", "null");
    b.curl("empty body", Norm::Exact, "/v3/kv/range", &["-X", "POST"]);
    b.curl("empty body status", Norm::Shape, "/v3/maintenance/status", &["-X", "POST"]);
    b.post("whitespace body", "/v3/kv/range", "   ");
    b.post("trailing garbage", "/v3/kv/range", r#"{"key":"Zm9vMQ=="} garbage"#);
    b.post("two objects", "/v3/kv/range", r#"{"key":"Zm9vMQ=="}{"key":"Zm9v"}"#);
    b.post("unknown field", "/v3/kv/range", r#"{"key":"Zm9vMQ==","bogus":123}"#);
    b.post(
        "unknown nested field",
        "/v3/kv/txn",
        r#"{"success":[{"request_range":{"key":"Zm9vMQ==","nope":{}}}]}"#,
    );
    b.post("lowerCamel names", "/v3/kv/range", r#"{"key":"Zm9v","rangeEnd":"Zm9w","countOnly":true}"#);
    b.post("duplicate member", "/v3/kv/range", r#"{"key":"bm9wZQ==","key":"Zm9vMQ=="}"#);
    b.post("null members", "/v3/kv/range", r#"{"key":"Zm9vMQ==","range_end":null,"limit":null}"#);
    b.post("base64 with an escaped newline", "/v3/kv/range", r#"{"key":"Zm9v\nMQ=="}"#);
    b.post("empty key", "/v3/kv/range", r#"{"key":""}"#);
    for (what, body) in [
        ("truncated JSON", r#"{"key":"#),
        ("unquoted key", r#"{key:"Zm9v"}"#),
        ("not JSON", "hello"),
        ("array body", "[]"),
        ("string body", r#""Zm9v""#),
        ("string for bool", r#"{"key":"Zm9v","count_only":"true"}"#),
        ("number for bool", r#"{"key":"Zm9v","count_only":1}"#),
        ("number for bytes", r#"{"key":123}"#),
        ("bool for int64", r#"{"key":"Zm9v","limit":true}"#),
        ("float for int64", r#"{"key":"Zm9v","limit":1.5}"#),
        ("exponent for int64", r#"{"key":"Zm9v","limit":1e2}"#),
        ("text for int64", r#"{"key":"Zm9v","limit":"abc"}"#),
        ("int64 overflow", r#"{"key":"Zm9v","limit":9223372036854775808}"#),
        ("unknown enum name", r#"{"key":"Zm9v","sort_target":"SIZE"}"#),
        ("invalid base64", r#"{"key":"!!!"}"#),
        ("base64 with a space", r#"{"key":"Zm9v MQ=="}"#),
    ] {
        b.post_as(what, Norm::Decode, "/v3/kv/range", body);
    }
    b.post_as("object for a list", Norm::Decode, "/v3/kv/txn", r#"{"success":{}}"#);

    // Deletes.
    for key in ["ZDE=", "ZDI=", "ZDM="] {
        b.post("put d*", "/v3/kv/put", &format!(r#"{{"key":"{key}","value":"eA=="}}"#));
    }
    b.post("delete prev_kv", "/v3/kv/deleterange", r#"{"key":"ZDE=","prev_kv":true}"#);
    b.post("delete a range", "/v3/kv/deleterange", r#"{"key":"ZDI=","range_end":"ZDQ="}"#);
    b.post("delete missing", "/v3/kv/deleterange", r#"{"key":"bm9uZQ=="}"#);
    b.post("delete without key", "/v3/kv/deleterange", "{}");

    // Transactions.
    b.post("put t1", "/v3/kv/put", r#"{"key":"dDE=","value":"djE="}"#);
    let txn = |compare: &str| {
        format!(
            r#"{{"compare":[{compare}],"success":[{{"request_put":{{"key":"dDE=","value":"djI="}}}},{{"request_range":{{"key":"dDE="}}}}],"failure":[{{"request_range":{{"key":"dDE="}}}}]}}"#
        )
    };
    for (what, compare) in [
        ("value equal", r#"{"key":"dDE=","result":"EQUAL","target":"VALUE","value":"djE="}"#),
        ("value equal again (fails)", r#"{"key":"dDE=","result":"EQUAL","target":"VALUE","value":"djE="}"#),
        ("value not equal", r#"{"key":"dDE=","result":"NOT_EQUAL","target":"VALUE","value":"djE="}"#),
        ("value greater", r#"{"key":"dDE=","result":"GREATER","target":"VALUE","value":"dg=="}"#),
        ("version greater 0", r#"{"key":"dDE=","result":"GREATER","target":"VERSION","version":0}"#),
        ("version equal as a string", r#"{"key":"dDE=","result":"EQUAL","target":"VERSION","version":"2"}"#),
        (
            "version 0 of a missing key",
            r#"{"key":"bm9uZQ==","result":"EQUAL","target":"VERSION","version":0}"#,
        ),
        ("create less", r#"{"key":"dDE=","result":"LESS","target":"CREATE","create_revision":100}"#),
        ("mod not equal", r#"{"key":"dDE=","result":"NOT_EQUAL","target":"MOD","mod_revision":1}"#),
        ("mod greater (fails)", r#"{"key":"dDE=","result":"GREATER","target":"MOD","mod_revision":1000}"#),
        ("lease equal", r#"{"key":"bGVhc2Vk","result":"EQUAL","target":"LEASE","lease":7777}"#),
        ("lease 0", r#"{"key":"dDE=","result":"EQUAL","target":"LEASE","lease":0}"#),
        ("enums as numbers", r#"{"key":"dDE=","result":0,"target":3,"value":"djE="}"#),
        ("defaults omitted", r#"{"key":"dDE=","version":3}"#),
        (
            "compare over a range",
            r#"{"key":"Zm9v","range_end":"Zm9w","result":"GREATER","target":"VERSION","version":0}"#,
        ),
        ("target mismatch", r#"{"key":"dDE=","result":"EQUAL","target":"VALUE","version":3}"#),
    ] {
        b.post(&format!("txn {what}"), "/v3/kv/txn", &txn(compare));
    }
    b.post_as("txn invalid result", Norm::Decode, "/v3/kv/txn", &txn(r#"{"key":"dDE=","result":"SAME"}"#));
    b.post(
        "txn delete prev_kv",
        "/v3/kv/txn",
        r#"{"success":[{"request_delete_range":{"key":"dDE=","prev_kv":true}}]}"#,
    );
    b.post(
        "txn nested",
        "/v3/kv/txn",
        r#"{"success":[{"request_txn":{"success":[{"request_put":{"key":"bjE=","value":"eA=="}},{"request_range":{"key":"bjE="}}]}},{"request_range":{"key":"bjE="}}]}"#,
    );
    b.post(
        "txn duplicate key",
        "/v3/kv/txn",
        r#"{"success":[{"request_put":{"key":"eA==","value":"eA=="}},{"request_put":{"key":"eA==","value":"eQ=="}}]}"#,
    );
    b.post(
        "txn put and delete",
        "/v3/kv/txn",
        r#"{"success":[{"request_put":{"key":"eA==","value":"eA=="}},{"request_delete_range":{"key":"eA=="}}]}"#,
    );
    b.post("txn empty", "/v3/kv/txn", "{}");
    b.post("txn op without request", "/v3/kv/txn", r#"{"success":[{}]}"#);
    let many: Vec<String> =
        (0..129).map(|i| format!(r#"{{"request_range":{{"key":"{}"}}}}"#, b64(&format!("k{i}")))).collect();
    b.post("txn 129 ops", "/v3/kv/txn", &format!(r#"{{"success":[{}]}}"#, many.join(",")));

    // Compaction.
    b.post("compact 5", "/v3/kv/compaction", r#"{"revision":5}"#);
    b.post("compact 5 again", "/v3/kv/compaction", r#"{"revision":5}"#);
    b.post("compact 3", "/v3/kv/compaction", r#"{"revision":3}"#);
    b.post("compact future", "/v3/kv/compaction", r#"{"revision":100000}"#);
    b.post("compact physical", "/v3/kv/compaction", r#"{"revision":6,"physical":true}"#);
    b.post("compact empty body", "/v3/kv/compaction", "{}");
    b.post("range compacted", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":3}}"#));
    b.post("range at the compact revision", "/v3/kv/range", &format!(r#"{{"key":"{foo}","revision":6}}"#));

    // Leases.
    b.post("grant 1000", "/v3/lease/grant", r#"{"TTL":60,"ID":1000}"#);
    b.post("grant as strings", "/v3/lease/grant", r#"{"TTL":"60","ID":"1001"}"#);
    b.post("grant duplicate", "/v3/lease/grant", r#"{"TTL":60,"ID":1000}"#);
    b.post("grant TTL 0", "/v3/lease/grant", r#"{"TTL":0,"ID":1002}"#);
    b.post("grant TTL 1", "/v3/lease/grant", r#"{"TTL":1,"ID":1003}"#);
    b.post("grant the largest TTL", "/v3/lease/grant", r#"{"TTL":9000000000,"ID":1004}"#);
    b.post("grant too large a TTL", "/v3/lease/grant", r#"{"TTL":9000000001,"ID":1005}"#);
    b.post("put k1 on 1000", "/v3/kv/put", r#"{"key":"azE=","value":"eA==","lease":1000}"#);
    b.post("put k2 on 1000", "/v3/kv/put", r#"{"key":"azI=","value":"eA==","lease":1000}"#);
    for (what, path, body) in [
        ("timetolive keys", "/v3/lease/timetolive", r#"{"ID":1000,"keys":true}"#),
        ("timetolive", "/v3/lease/timetolive", r#"{"ID":1000}"#),
        ("timetolive no keys", "/v3/lease/timetolive", r#"{"ID":1001,"keys":true}"#),
        ("timetolive unknown", "/v3/lease/timetolive", r#"{"ID":424242}"#),
        ("timetolive 0", "/v3/lease/timetolive", r#"{"ID":0}"#),
        ("kv/lease/timetolive", "/v3/kv/lease/timetolive", r#"{"ID":1000}"#),
    ] {
        let (e, k) = b.fetch(what, path, &["-X", "POST", "-d", body]);
        let (e, k) = (ttl_elided(e, "TTL"), ttl_elided(k, "TTL"));
        b.compare(
            &format!("{what} (remaining TTL elided)"),
            render(&e, Norm::Exact),
            render(&k, Norm::Exact),
        );
    }
    b.post("revoke 1001", "/v3/lease/revoke", r#"{"ID":1001}"#);
    b.post("revoke unknown", "/v3/lease/revoke", r#"{"ID":424242}"#);
    b.post("revoke 0", "/v3/lease/revoke", r#"{"ID":0}"#);
    b.post("kv/lease/revoke unknown", "/v3/kv/lease/revoke", r#"{"ID":424242}"#);
    b.post("kv/lease/grant is no path", "/v3/kv/lease/grant", r#"{"TTL":60}"#);
    // etcd lists leases by expiry, kvset by id: compared as sets.
    for (what, path) in [("leases", "/v3/lease/leases"), ("kv/lease/leases", "/v3/kv/lease/leases")] {
        let (e, k) = b.fetch(what, path, &["-X", "POST", "-d", "{}"]);
        let (e, k) = (leases_sorted(e), leases_sorted(k));
        b.compare(&format!("{what} (as a set)"), render(&e, Norm::Exact), render(&k, Norm::Exact));
    }

    // Cluster and maintenance: the shapes (members and sizes differ by nature).
    b.post_as("member list", Norm::Shape, "/v3/cluster/member/list", "{}");
    b.post_as("status", Norm::Shape, "/v3/maintenance/status", "{}");
    b.post_as("hash", Norm::Shape, "/v3/maintenance/hash", "{}");
    b.post("hashkv is no path", "/v3/maintenance/hashkv", "{}");
    b.post_as("alarm action name", Norm::Decode, "/v3/maintenance/alarm", r#"{"action":"LIST"}"#);

    b.finish().await;
}

/// The lines of a stream on both, the first `n` each, compared; `after` runs once both
/// streams are open (to make events).
async fn streams(b: &mut Both, what: &str, path: &str, body: &str, n: usize) -> (http::Stream, http::Stream) {
    let mut out = Vec::new();
    for endpoint in [b.etcd.clone(), b.kvset.clone()] {
        let mut s =
            http::Stream::open(&endpoint, "POST", path, &[], body.as_bytes()).await.expect("open a stream");
        let lines = s.lines(n, Duration::from_secs(10)).await;
        let text = match lines {
            Ok(lines) => lines
                .into_iter()
                .map(|mut l| {
                    scrub(&mut l);
                    l.to_string()
                })
                .collect::<Vec<_>>()
                .join("\n      "),
            Err(e) => format!("stream failed: {e}"),
        };
        out.push((format!("{} {}", s.status, text), s));
    }
    let (k, e) = (out.pop().expect("kvset"), out.pop().expect("etcd"));
    b.compare(what, e.0, k.0);
    (e.1, k.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_answers_match_etcds() {
    let mut b = Both::start().await;
    let foo = b64("foo");
    for (key, value) in [("foo", "bar"), ("foo", "baz"), ("foo1", "bar"), ("foo", "w1")] {
        b.post("setup put", "/v3/kv/put", &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(key), b64(value)));
    }
    b.post("setup lease", "/v3/lease/grant", r#"{"ID":7777,"TTL":600}"#);

    // A watch of a key with prev_kv: created, then the events of a put, a delete and a put.
    let (mut e, mut k) = streams(
        &mut b,
        "watch created",
        "/v3/watch",
        &format!(r#"{{"create_request":{{"key":"{foo}","prev_kv":true}}}}"#),
        1,
    )
    .await;
    b.post("put during the watch", "/v3/kv/put", &format!(r#"{{"key":"{foo}","value":"dzI="}}"#));
    b.post("delete during the watch", "/v3/kv/deleterange", &format!(r#"{{"key":"{foo}"}}"#));
    b.post(
        "put with a lease during the watch",
        "/v3/kv/put",
        &format!(r#"{{"key":"{foo}","value":"dzM=","lease":7777}}"#),
    );
    let mut lines = Vec::new();
    for s in [&mut e, &mut k] {
        let got = s.lines(3, Duration::from_secs(10)).await.map(|ls| {
            ls.into_iter()
                .map(|mut l| {
                    scrub(&mut l);
                    l.to_string()
                })
                .collect::<Vec<_>>()
        });
        lines.push(format!("{got:?}"));
    }
    let (kl, el) = (lines.pop().expect("kvset"), lines.pop().expect("etcd"));
    b.compare("watch events", el, kl);
    drop((e, k));

    // History from a revision, in one message after created.
    streams(
        &mut b,
        "watch history",
        "/v3/watch",
        &format!(r#"{{"create_request":{{"key":"{foo}","range_end":"Zm9w","start_revision":2}}}}"#),
        2,
    )
    .await;
    // Ids: explicit, automatic, duplicate, cancel, cancel unknown; a progress request.
    streams(
        &mut b,
        "watch ids and cancel",
        "/v3/watch",
        r#"{"create_request":{"key":"YQ==","watch_id":5}}{"create_request":{"key":"Yg=="}}{"create_request":{"key":"Yw==","watch_id":5}}{"cancel_request":{"watch_id":5}}{"cancel_request":{"watch_id":77}}"#,
        4,
    )
    .await;
    streams(
        &mut b,
        "watch progress request",
        "/v3/watch",
        "{\"create_request\":{\"key\":\"eA==\"}}\n{\"progress_request\":{}}",
        2,
    )
    .await;
    streams(&mut b, "watch without a key", "/v3/watch", r#"{"create_request":{}}"#, 1).await;
    streams(
        &mut b,
        "watch filters and int64 strings",
        "/v3/watch",
        r#"{"create_request":{"key":"Zm9v","filters":["NOPUT"],"start_revision":"3","watch_id":"3"}}"#,
        2,
    )
    .await;
    streams(
        &mut b,
        "watch future revision",
        "/v3/watch",
        r#"{"create_request":{"key":"Zm9v","start_revision":100000}}"#,
        1,
    )
    .await;
    streams(
        &mut b,
        "watch, then a malformed message",
        "/v3/watch",
        r#"{"create_request":{"key":"Zm9v"}}{"create_request":"#,
        1,
    )
    .await;
    streams(&mut b, "v3beta watch", "/v3beta/watch", r#"{"create_request":{"key":"Zm9v"}}"#, 1).await;

    // A compacted watch: created, then canceled with the compact revision.
    b.post("compact", "/v3/kv/compaction", r#"{"revision":6}"#);
    streams(
        &mut b,
        "watch compacted",
        "/v3/watch",
        &format!(r#"{{"create_request":{{"key":"{foo}","start_revision":3}}}}"#),
        2,
    )
    .await;

    // Errors before a stream: a malformed first message.
    // (Status and code compared; the wording is Go's or serde's, see the README's table.)
    b.post_as("watch malformed first message", Norm::Decode, "/v3/watch", r#"{"create_request":"#);
    b.post_as("keepalive malformed first message", Norm::Decode, "/v3/lease/keepalive", r#"{"ID":"#);

    // Keep-alives end with the body.
    for (what, body) in [
        ("keepalive one", r#"{"ID":7777}"#),
        ("keepalive three", "{\"ID\":7777}{\"ID\":\"7777\"}\n{\"ID\":424242}"),
        ("keepalive empty body", ""),
        ("keepalive then malformed", r#"{"ID":7777}{"ID":"#),
        ("keepalive unknown field", r#"{"ID":7777,"bogus":1}"#),
    ] {
        let (e, k) = b.curl(what, Norm::Exact, "/v3/lease/keepalive", &["-N", "-d", body]);
        assert_eq!(e.status, k.status);
    }
    b.curl("v3beta keepalive", Norm::Exact, "/v3beta/lease/keepalive", &["-N", "-d", r#"{"ID":7777}"#]);

    // A watch the client cuts: the server forgets it (etcd's watcher gauge, kvset's).
    let mut cut = Vec::new();
    for endpoint in [b.etcd.clone(), b.kvset.clone()] {
        let mut s =
            http::Stream::open(&endpoint, "POST", "/v3/watch", &[], br#"{"create_request":{"key":"Y3V0"}}"#)
                .await
                .expect("open");
        s.lines(1, Duration::from_secs(10)).await.expect("created");
        cut.push(s);
    }
    let watching = |endpoint: String, metric: &'static str| async move {
        let text = kvset_tests::http_get(&endpoint, "/metrics").await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(metric))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let etcd_gauge = "etcd_debugging_mvcc_watcher_total ";
    let kvset_ops =
        b.cluster.ops_endpoint((0..3).find(|o| b.kvset == b.cluster.endpoint(*o)).expect("kvset member"));
    assert_eq!(watching(b.etcd.clone(), etcd_gauge).await, Some(1.0), "etcd counts the open watch");
    assert_eq!(watching(kvset_ops.clone(), "kvset_watches ").await, Some(1.0), "kvset counts the open watch");
    drop(cut);
    for (endpoint, metric) in [(b.etcd.clone(), etcd_gauge), (kvset_ops, "kvset_watches ")] {
        kvset_tests::eventually(
            &format!("{metric} back to 0 after the client cut the stream"),
            Duration::from_secs(10),
            || {
                let endpoint = endpoint.clone();
                async move { (watching(endpoint, metric).await == Some(0.0)).then_some(()) }
            },
        )
        .await;
    }

    b.finish().await;
}

/// Sends the same lock/election call to both servers and compares the outcomes (scrubbing the
/// leases' ids, which each server picks, from keys).
macro_rules! same {
    ($both:expr, $what:expr, |$c:ident| $call:expr) => {{
        let mut $c = $both.0.clone();
        let e = etcd::outcome($call.await);
        let mut $c = $both.1.clone();
        let k = etcd::outcome($call.await);
        $both.2.push(($what.to_string(), e, k));
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_and_election_answers_match_etcds_over_grpc() {
    let both = SideBySide::start().await;
    let mut b =
        (Raw::connect(&both.etcd.endpoint).await, Raw::connect(&both.kvset_endpoint()).await, Vec::new());
    use kvset_proto::etcdserverpb as epb;
    for id in [0x11, 0x22, 0x33] {
        same!(b, format!("grant {id:x}"), |c| c.lease.lease_grant(epb::LeaseGrantRequest { ttl: 60, id }));
    }

    // Lock: the first holder at once; a second waits until the first unlocks.
    same!(b, "lock by 0x11", |c| c.lock.lock(lpb::LockRequest { name: b"lk".to_vec(), lease: 0x11 }));
    same!(b, "lock again by the same lease", |c| c
        .lock
        .lock(lpb::LockRequest { name: b"lk".to_vec(), lease: 0x11 }));
    for (name, endpoint) in [("etcd", both.etcd.endpoint.clone()), ("kvset", both.kvset_endpoint())] {
        let mut raw = Raw::connect(&endpoint).await;
        let waiter = tokio::spawn(async move {
            raw.lock.lock(lpb::LockRequest { name: b"lk".to_vec(), lease: 0x22 }).await
        });
        // Wait until the waiter's key is there, so it is queued behind 0x11.
        let kv = Raw::connect(&endpoint).await.kv;
        kvset_tests::eventually(
            &format!("{name}: the second waiter is queued"),
            Duration::from_secs(10),
            || {
                let mut kv = kv.clone();
                async move {
                    let r = kv
                        .range(epb::RangeRequest { key: b"lk/22".to_vec(), ..Default::default() })
                        .await
                        .ok()?;
                    (!r.into_inner().kvs.is_empty()).then_some(())
                }
            },
        )
        .await;
        assert!(!waiter.is_finished(), "{name}: the second lock waits for the first");
        let mut lock = Raw::connect(&endpoint).await.lock;
        let unlocked = lock.unlock(lpb::UnlockRequest { key: b"lk/11".to_vec() }).await;
        let unlocked_at = match &unlocked {
            Ok(r) => r.get_ref().header.as_ref().map_or(0, |h| h.revision),
            Err(e) => panic!("{name}: unlock {e:?}"),
        };
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter gets the lock")
            .expect("join");
        // Mutual exclusion, without timing: the waiter was granted the lock at a revision at or
        // after the holder's unlock (its answer's header is the read that saw it owned).
        let granted_at =
            got.as_ref().ok().and_then(|r| r.get_ref().header.as_ref()).map_or(0, |h| h.revision);
        assert!(
            granted_at >= unlocked_at,
            "{name}: the second waiter got the lock at revision {granted_at}, before the first unlocked it at {unlocked_at}"
        );
        let got = got.map(|r| {
            let mut r = r.into_inner();
            r.header = None;
            tonic::Response::new(r)
        });
        b.2.push((format!("{name}: the waiter's lock"), etcd::outcome(got), String::new()));
    }
    // The two "waiter's lock" entries are compared with each other below.
    same!(b, "range of the lock's keys", |c| c.kv.range(epb::RangeRequest {
        key: b"lk/".to_vec(),
        range_end: b"lk0".to_vec(),
        ..Default::default()
    }));
    // A holder whose lease ends loses the lock: the next waiter gets it.
    same!(b, "lock by 0x33 on another name", |c| c
        .lock
        .lock(lpb::LockRequest { name: b"lk2".to_vec(), lease: 0x33 }));
    same!(b, "revoke 0x33", |c| c.lease.lease_revoke(epb::LeaseRevokeRequest { id: 0x33 }));
    same!(b, "lock lk2 by 0x22 after the revoke", |c| c
        .lock
        .lock(lpb::LockRequest { name: b"lk2".to_vec(), lease: 0x22 }));
    same!(b, "lock with an unknown lease", |c| c
        .lock
        .lock(lpb::LockRequest { name: b"lk3".to_vec(), lease: 0x4242 }));
    same!(b, "unlock a key never locked", |c| c.lock.unlock(lpb::UnlockRequest { key: b"nothing".to_vec() }));

    // Election.
    same!(b, "leader of an election without one", |c| c
        .election
        .leader(vpb::LeaderRequest { name: b"el".to_vec() }));
    same!(b, "campaign by 0x11", |c| c.election.campaign(vpb::CampaignRequest {
        name: b"el".to_vec(),
        lease: 0x11,
        value: b"v1".to_vec()
    }));
    same!(b, "leader", |c| c.election.leader(vpb::LeaderRequest { name: b"el".to_vec() }));
    let leader = |rev: i64| vpb::LeaderKey { name: b"el".to_vec(), key: b"el/11".to_vec(), rev, lease: 0x11 };
    let rev = {
        let mut c = b.1.clone();
        c.election
            .leader(vpb::LeaderRequest { name: b"el".to_vec() })
            .await
            .expect("leader")
            .into_inner()
            .kv
            .expect("kv")
            .create_revision
    };
    same!(b, "proclaim", |c| c
        .election
        .proclaim(vpb::ProclaimRequest { leader: Some(leader(rev)), value: b"v2".to_vec() }));
    same!(b, "proclaim with a wrong revision", |c| c
        .election
        .proclaim(vpb::ProclaimRequest { leader: Some(leader(rev + 100)), value: b"v3".to_vec() }));
    same!(b, "proclaim without a leader", |c| c
        .election
        .proclaim(vpb::ProclaimRequest { leader: None, value: b"v3".to_vec() }));
    same!(b, "campaign again by 0x11 (same value)", |c| c.election.campaign(vpb::CampaignRequest {
        name: b"el".to_vec(),
        lease: 0x11,
        value: b"v2".to_vec()
    }));
    // Observe: the leader's key now, then each proclamation.
    let mut observed = Vec::new();
    for (i, endpoint) in [both.etcd.endpoint.clone(), both.kvset_endpoint()].into_iter().enumerate() {
        let mut raw = Raw::connect(&endpoint).await;
        let mut stream = raw
            .election
            .observe(vpb::LeaderRequest { name: b"el".to_vec() })
            .await
            .expect("observe")
            .into_inner();
        let first =
            tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("first observed");
        let mut c = if i == 0 { b.0.clone() } else { b.1.clone() };
        let _ = c
            .election
            .proclaim(vpb::ProclaimRequest { leader: Some(leader(rev)), value: b"v4".to_vec() })
            .await;
        let second =
            tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("second observed");
        observed.push(format!(
            "{} / {}",
            etcd::scrub(&format!("{first:?}")),
            etcd::scrub(&format!("{second:?}"))
        ));
    }
    b.2.push(("observe".into(), observed[0].clone(), observed[1].clone()));
    same!(b, "resign", |c| c.election.resign(vpb::ResignRequest { leader: Some(leader(rev)) }));
    same!(b, "resign without a leader", |c| c.election.resign(vpb::ResignRequest { leader: None }));
    same!(b, "leader after the resignation", |c| c
        .election
        .leader(vpb::LeaderRequest { name: b"el".to_vec() }));

    let mut mismatches = Vec::new();
    let (mut waited_e, mut waited_k) = (None, None);
    for (what, e, k) in &b.2 {
        if what == "etcd: the waiter's lock" {
            waited_e = Some(e.clone());
        } else if what == "kvset: the waiter's lock" {
            waited_k = Some(e.clone());
        } else if e != k {
            mismatches.push(format!("{what}:\n    etcd:  {e}\n    kvset: {k}"));
        }
    }
    if waited_e != waited_k {
        mismatches.push(format!("the waiter's lock:\n    etcd:  {waited_e:?}\n    kvset: {waited_k:?}"));
    }
    both.cluster.shutdown().await;
    assert!(
        mismatches.is_empty(),
        "{} of {} answers differ from etcd's:\n{}",
        mismatches.len(),
        b.2.len(),
        mismatches.join("\n")
    );
}
