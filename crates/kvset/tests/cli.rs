//! The `kvset` binary's history, watch, lease and compaction commands, run as a user runs them
//! (`--output json`) against an in-process member on loopback; bad input exits non-zero with
//! a message and changes nothing.

mod common;

use std::io::BufRead;
use std::io::BufReader;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::json;
use common::refused;
use kvset_tests::cluster::Cluster;
use serde_json::Value;

/// Runs `kvset watch ARGS…` until it has printed `n` events (within 30 s), then stops it.
async fn watch(endpoint: &str, args: &[&str], n: usize) -> Vec<Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvset"))
        .args(["--endpoints", endpoint, "--output", "json", "watch"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kvset watch");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).take(n).collect::<Vec<String>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let lines = reader.join().unwrap();
    assert_eq!(lines.len(), n, "kvset watch {args:?} printed {lines:?}");
    lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_watch_leases_and_compaction_from_the_command_line() {
    let c = Cluster::start(1).await;
    let ep = c.endpoint(0);
    let first = json(&ep, &["put", "cfg/a", "1"]).await["header"]["revision"].as_i64().unwrap();
    json(&ep, &["put", "cfg/a", "2"]).await;
    json(&ep, &["del", "cfg/a"]).await;

    // A key as it was at a past revision.
    let then = json(&ep, &["get", "cfg/a", "--rev", &first.to_string()]).await;
    assert_eq!(then["kv"]["value"], "1", "{then}");
    assert!(json(&ep, &["get", "cfg/a"]).await["kv"].is_null(), "deleted now");

    // The history of a prefix, replayed, with previous values.
    let events = watch(&ep, &["cfg/", "--prefix", "--rev", &first.to_string(), "--prev-kv"], 3).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["PUT", "PUT", "DELETE"], "{events:?}");
    assert_eq!(events[1]["prev_kv"]["value"], "1");
    assert_eq!(events[2]["kv"]["mod_revision"].as_i64(), Some(first + 2));

    // Leases: a key on a lease, its TTL and keys, then revoked with it.
    let lease = json(&ep, &["lease", "grant", "30"]).await;
    let id = lease["id"].as_i64().unwrap().to_string();
    assert_eq!(lease["ttl"], 30);
    json(&ep, &["put", "session", "alive", "--lease", &id]).await;
    let ttl = json(&ep, &["lease", "ttl", &id, "--keys"]).await;
    assert_eq!(ttl["keys"], serde_json::json!(["session"]), "{ttl}");
    let renewed = json(&ep, &["lease", "keep-alive", &id, "--once"]).await;
    assert_eq!(renewed["ttl"], 30, "{renewed}");
    json(&ep, &["lease", "revoke", &id]).await;
    assert!(json(&ep, &["get", "session"]).await["kv"].is_null(), "revoking the lease deleted its key");

    // Compaction: the past is refused afterwards, with the compact revision named.
    let now = json(&ep, &["put", "cfg/b", "x"]).await["header"]["revision"].as_i64().unwrap();
    json(&ep, &["compact", &now.to_string()]).await;
    let err = refused(&ep, &["get", "cfg/a", "--rev", &first.to_string()]).await;
    assert!(err.contains("compacted") && err.contains(&now.to_string()), "{err}");

    // Bad input: a clear message, a failing exit, nothing changed.
    let before = json(&ep, &["get", "cfg/b"]).await["header"]["revision"].as_i64().unwrap();
    let err = refused(&ep, &["compact", &(now + 1000).to_string()]).await;
    assert!(err.contains("future"), "{err}");
    let err = refused(&ep, &["get", "cfg/b", "--rev", &(now + 1000).to_string()]).await;
    assert!(err.contains("future"), "{err}");
    let unknown = json(&ep, &["lease", "ttl", "123456789", "--keys"]).await;
    assert_eq!(unknown["ttl"], -1, "an unknown lease has TTL -1: {unknown}");
    let err = refused(&ep, &["lease", "keep-alive", "123456789", "--once"]).await;
    assert!(err.contains("lease 123456789 not found"), "{err}");
    let err = refused(&ep, &["put", "", "v"]).await;
    assert!(err.contains("key"), "{err}");
    let after = json(&ep, &["get", "cfg/b"]).await["header"]["revision"].as_i64().unwrap();
    assert_eq!(before, after, "refused commands changed nothing");
    c.shutdown().await;
}
