//! Real etcd tooling for the etcd-API tests: a real etcd server (Debian's `etcd-server`) to
//! compare against, the real clients (`etcdctl`, python `etcd3` in the project's tool venv),
//! and raw `etcdserverpb` clients generated from etcd's own `rpc.proto` that send the very same
//! request bytes to etcd and to kvset, so the differential tests compare servers, not client
//! libraries.
//!
//! The tools are required: a missing one fails the test with the package that provides it
//! (`.ci/run` installs them; `scripts/check.sh` says how).

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use kvset_proto::etcdserverpb as epb;
use tonic::transport::Channel;

/// Finds a program on `PATH` (or at `$env`), failing with what to install.
pub fn tool(name: &str, env: &str, package: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed: install Debian's `{package}` (.ci/run does), or set {env}")
    })
}

/// `etcdctl` (Debian's `etcd-client`).
pub fn etcdctl() -> PathBuf {
    tool("etcdctl", "KVSET_TEST_ETCDCTL", "etcd-client")
}

/// The Python with the etcd clients (`scripts/check.sh` installs them into
/// `target/tools/venv`; `KVSET_TEST_PYTHON` overrides).
pub fn python() -> PathBuf {
    if let Ok(path) = std::env::var("KVSET_TEST_PYTHON") {
        return PathBuf::from(path);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run scripts/check.sh once (it installs the Python etcd clients), or set KVSET_TEST_PYTHON",
        venv.display()
    );
    venv
}

/// The directory of the Python test scripts.
pub fn python_scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `etcdctl` with `args` against `endpoints`; returns (success, stdout, stderr).
pub fn run_etcdctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(etcdctl());
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run etcdctl");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write etcdctl stdin");
    }
    let out = child.wait_with_output().expect("etcdctl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A single-member etcd, started for one test on free loopback ports, stopped on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    _dir: tempfile::TempDir,
    /// `host:port` of its client URL.
    pub endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

impl EtcdServer {
    /// Starts `etcd` (Debian's `etcd-server`) and waits until it answers.
    pub async fn start() -> Self {
        let etcd = tool("etcd", "KVSET_TEST_ETCD", "etcd-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(etcd)
            .args([
                "--name=e0",
                &format!("--data-dir={}", dir.path().join("data").display()),
                &format!("--listen-client-urls={client_url}"),
                &format!("--advertise-client-urls={client_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=e0={peer_url}"),
                "--logger=zap",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let server = Self { child, _dir: dir, endpoint: format!("127.0.0.1:{client}") };
        let endpoint = server.endpoint.clone();
        crate::eventually("etcd answers Status", Duration::from_secs(20), || {
            let endpoint = endpoint.clone();
            async move {
                let channel = connect(&endpoint).await.ok()?;
                let mut m = epb::maintenance_client::MaintenanceClient::new(channel);
                let status = m.status(epb::StatusRequest {}).await.ok()?.into_inner();
                (status.leader != 0).then_some(())
            }
        })
        .await;
        server
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A channel to `endpoint` (`host:port`).
pub async fn connect(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
}

/// The etcd v3 services of one server, generated from etcd's `rpc.proto`.
#[derive(Debug, Clone)]
pub struct Raw {
    pub kv: epb::kv_client::KvClient<Channel>,
    pub watch: epb::watch_client::WatchClient<Channel>,
    pub lease: epb::lease_client::LeaseClient<Channel>,
    pub cluster: epb::cluster_client::ClusterClient<Channel>,
    pub maintenance: epb::maintenance_client::MaintenanceClient<Channel>,
    pub auth: epb::auth_client::AuthClient<Channel>,
    /// etcd's lock service (`v3lockpb.Lock`).
    pub lock: kvset_proto::v3lockpb::lock_client::LockClient<Channel>,
    /// etcd's election service (`v3electionpb.Election`).
    pub election: kvset_proto::v3electionpb::election_client::ElectionClient<Channel>,
}

impl Raw {
    /// Connects to `endpoint` (`host:port`).
    pub async fn connect(endpoint: &str) -> Self {
        let channel = connect(endpoint).await.expect("connect");
        Self {
            kv: epb::kv_client::KvClient::new(channel.clone()),
            watch: epb::watch_client::WatchClient::new(channel.clone()),
            lease: epb::lease_client::LeaseClient::new(channel.clone()),
            cluster: epb::cluster_client::ClusterClient::new(channel.clone()),
            maintenance: epb::maintenance_client::MaintenanceClient::new(channel.clone()),
            auth: epb::auth_client::AuthClient::new(channel.clone()),
            lock: kvset_proto::v3lockpb::lock_client::LockClient::new(channel.clone()),
            election: kvset_proto::v3electionpb::election_client::ElectionClient::new(channel),
        }
    }
}

/// An outcome as the differential tests compare it: the response with the member-specific
/// header fields (cluster id, member id, Raft term) cleared, or the status code and message.
pub fn outcome<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> String {
    match result {
        Ok(response) => scrub(&format!("{:?}", response.into_inner())),
        Err(status) => format!("error {:?}: {}", status.code(), status.message()),
    }
}

/// Clears `cluster_id`, `member_id` and `raft_term` in the Debug text of a response.
pub fn scrub(debug: &str) -> String {
    let mut out = String::with_capacity(debug.len());
    let mut rest = debug;
    while !rest.is_empty() {
        let next = ["cluster_id: ", "member_id: ", "raft_term: "]
            .iter()
            .filter_map(|field| rest.find(field).map(|at| (at, field.len())))
            .min();
        let Some((at, len)) = next else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..at + len]);
        rest = &rest[at + len..];
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        out.push('_');
        rest = &rest[digits..];
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn scrub_clears_member_specific_fields_only() {
        let text = "ResponseHeader { cluster_id: 14841639068965178418, member_id: 10276657743932975437, revision: 5, raft_term: 2 }";
        assert_eq!(
            super::scrub(text),
            "ResponseHeader { cluster_id: _, member_id: _, revision: 5, raft_term: _ }"
        );
    }
}

/// etcd's minimum lease TTL with its default timing (1.5 × the 1 s election timeout, rounded
/// up); the differential tests give kvset the same (`lease.min_ttl_seconds`, default 5).
pub const ETCD_MIN_TTL: u64 = 2;

/// A real etcd beside a 3-member kvset with etcd's lease minimum, for differential tests.
#[derive(Debug)]
pub struct SideBySide {
    pub etcd: EtcdServer,
    pub cluster: crate::cluster::Cluster,
    /// The kvset member the tests talk to: a follower, whose answers must be the leader's.
    pub follower: u32,
}

impl SideBySide {
    /// Starts both and waits for kvset's leader.
    pub async fn start() -> Self {
        let etcd = EtcdServer::start().await;
        let cluster =
            crate::cluster::Cluster::start_with(3, |cfg| cfg.lease.min_ttl_seconds = ETCD_MIN_TTL).await;
        cluster.wait_leader(Duration::from_secs(30)).await;
        let follower = (0..3).find(|o| Some(*o) != cluster.leader()).expect("a follower");
        Self { etcd, cluster, follower }
    }

    /// The endpoint of the kvset follower.
    pub fn kvset_endpoint(&self) -> String {
        self.cluster.endpoint(self.follower)
    }
}
