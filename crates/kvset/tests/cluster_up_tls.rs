//! `kvset cluster up --tls`, as the README tells a new user to run it: the cluster starts with
//! mutual TLS, and the certificates it prints work for `kvset` and for etcd's own `etcdctl`;
//! without them nothing gets in.

mod common;

use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::kvset;
use common::path;
use common::Killed;

/// A base port whose 3 members' ports (base .. base+22) are free right now.
fn free_base_port() -> u16 {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for attempt in 0..50u32 {
        let base = 20_000 + ((seed ^ std::process::id()).wrapping_add(attempt * 7919) % 30_000) as u16;
        let free = (0..23).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free range of ports for a local cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_tls_serves_kvset_and_etcdctl_with_the_generated_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let _up = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvset"))
            .args(["cluster", "up", "--tls", "--base-port", &base.to_string(), "--dir"])
            .arg(dir.path().join("cluster"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start kvset cluster up"),
    );
    let tls = dir.path().join("cluster/tls");
    let (ca, cert, key) = (tls.join("ca.pem"), tls.join("client.pem"), tls.join("client-key.pem"));
    let endpoint = format!("127.0.0.1:{base}");
    let with_certs = ["--cacert", path(&ca), "--cert", path(&cert), "--key", path(&key), "--timeout", "3"];

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, err) = kvset(&endpoint, &[&with_certs[..], &["put", "hello", "tls"]].concat()).await;
        if ok {
            break;
        }
        let up_log = std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "the TLS cluster never accepted a write: {out} {err}\n{up_log}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = kvset(&endpoint, &[&with_certs[..], &["get", "hello"]].concat()).await;
    assert!(ok && out.contains("tls"), "kvset get over TLS: {out} {err}");

    let (ok, out, err) = kvset_tests::etcd::run_etcdctl(
        &format!("127.0.0.1:{}", base + 10),
        &[
            "--cacert",
            path(&ca),
            "--cert",
            path(&cert),
            "--key",
            path(&key),
            "get",
            "hello",
            "--print-value-only",
        ],
        None,
    );
    assert!(ok && out.trim() == "tls", "etcdctl with the generated certificates: {out} {err}");

    // In plain text, or without a client certificate: refused, with the cause named.
    let (ok, _, err) = kvset(&endpoint, &["--timeout", "2", "put", "plain", "x"]).await;
    assert!(!ok, "a plaintext client is refused: {err}");
    let (ok, _, err) =
        kvset(&endpoint, &["--cacert", path(&ca), "--timeout", "2", "put", "anonymous", "x"]).await;
    assert!(!ok, "a client without a certificate is refused: {err}");
    let (ok, _, err) = kvset(&endpoint, &["--cert", path(&cert), "--key", path(&key), "get", "hello"]).await;
    assert!(!ok && err.contains("--cacert"), "a client certificate without a CA is a usage error: {err}");
    let (ok, out, _) = kvset(&endpoint, &[&with_certs[..], &["get", "plain"]].concat()).await;
    assert!(ok && !out.contains("\"x\""), "nothing was written in plain text: {out}");
}
