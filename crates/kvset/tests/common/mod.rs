//! What the `kvset` binary's tests share: running the built binary as a user runs it, and
//! running one ordinal of an in-process test cluster as a `kvset serve` process.
// Each test file uses part of this.
#![allow(dead_code)]

use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;

use kvset_tests::cluster::Cluster;
use serde_json::Value;

/// Runs `kvset --endpoints E --output json ARGS…`: (success, stdout, stderr).
pub async fn kvset(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvset"));
    command.args(["--endpoints", endpoint, "--output", "json"]).args(args);
    let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("run kvset");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs a command that must succeed and print one JSON document.
pub async fn json(endpoint: &str, args: &[&str]) -> Value {
    let (ok, out, err) = kvset(endpoint, args).await;
    assert!(ok, "kvset {args:?} failed:\n{out}\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kvset {args:?}: not JSON ({e}): {out}"))
}

/// Runs a command that must fail; returns its standard error.
pub async fn refused(endpoint: &str, args: &[&str]) -> String {
    let (ok, out, err) = kvset(endpoint, args).await;
    assert!(!ok, "kvset {args:?} should fail, printed:\n{out}");
    err
}

/// A path as a command-line argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Takes `ordinal` of `cluster` out of the in-process harness and writes its configuration,
/// with an ops port of its own (the harness reserves only client and peer ports), to
/// `dir/kvset-N.toml` for a `kvset serve` process; returns that file.
pub fn released_config(cluster: &mut Cluster, ordinal: u32, dir: &Path) -> PathBuf {
    let mut config = cluster.release(ordinal);
    config.ops_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let file = dir.join(format!("kvset-{ordinal}.toml"));
    std::fs::write(&file, config.to_toml()).unwrap();
    file
}

/// `kvset serve --config FILE`, its output in `log`.
pub fn serve(config: &Path, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_kvset"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start kvset serve")
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
