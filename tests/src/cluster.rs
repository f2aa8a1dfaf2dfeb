//! An in-process kvset cluster on loopback.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;

use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_server::network::PeerFault;
use kvset_server::Config;
use kvset_server::Listeners;
use kvset_server::Node;
use kvset_server::NodeHandle;
use kvset_server::NodeOptions;
use kvset_storage::WatchReceiver;
use openraft::ServerState;
use tokio::net::TcpListener;

use crate::eventually;
use crate::harness::Endpoints;
use crate::harness::Harness;

/// Ordinals a test cluster can grow to.
pub const MAX_ORDINALS: u32 = 6;

/// Cut links, checked by every member's sending side.
#[derive(Debug, Default)]
pub struct Partition {
    cut: Mutex<HashSet<(u64, u64)>>,
    /// Snapshot chunks still to damage in transit (one flipped bit each).
    pub corrupt_snapshot_chunks: std::sync::atomic::AtomicU32,
}

impl Partition {
    /// Cuts every link to and from `node` among `all`.
    pub fn isolate(&self, node: u64, all: &[u64]) {
        let mut cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        for other in all {
            if *other != node {
                cut.insert((node, *other));
                cut.insert((*other, node));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl PeerFault for Partition {
    fn blocked(&self, from: u64, to: u64) -> bool {
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).contains(&(from, to))
    }

    fn corrupt_snapshot(&self, _from: u64, _to: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.corrupt_snapshot_chunks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The three ports of one ordinal.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    peer: u16,
    ops: u16,
}

/// A cluster of in-process members.
pub struct Cluster {
    dir: tempfile::TempDir,
    ports: Vec<Ports>,
    /// Listeners reserved for ordinals not started yet.
    reserved: BTreeMap<u32, Listeners>,
    /// The running members.
    nodes: BTreeMap<u32, NodeHandle>,
    /// The links cut by the test, checked by every member's sending side.
    pub partition: Arc<Partition>,
    /// `initial_replicas` of every member.
    initial: u32,
    /// The desired replica count, as `scale` last set it.
    replicas: u32,
    /// Client endpoints of the running members (for workloads).
    endpoints: Arc<RwLock<Endpoints>>,
    tweak: Arc<dyn Fn(&mut Config) + Send + Sync>,
    /// `KVSET_*` variables set with [`Harness::set_env`], applied over the tweaked config.
    env: BTreeMap<String, String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("dir", &self.dir.path()).field("running", &self.nodes.keys()).finish()
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port")
}

impl Cluster {
    /// Starts `n` members (ordinals `0..n`, `initial_replicas = n`) and waits for a leader with
    /// all of them as voters.
    pub async fn start(n: u32) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Like [`Cluster::start`], with a change to every member's configuration.
    pub async fn start_with(n: u32, tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        let mut c = Self::new(n, tweak).await;
        for o in 0..n {
            c.start_node(o).await;
        }
        c.wait_voters(n as usize, Duration::from_secs(30)).await;
        c
    }

    /// Reserves ports for every ordinal but starts nothing.
    pub async fn new(initial: u32, tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        crate::init_logging();
        let mut ports = Vec::new();
        let mut reserved = BTreeMap::new();
        for o in 0..MAX_ORDINALS {
            let (client, peer, ops) = (bind().await, bind().await, bind().await);
            let p = |l: &TcpListener| l.local_addr().expect("local addr").port();
            ports.push(Ports { client: p(&client), peer: p(&peer), ops: p(&ops) });
            reserved.insert(o, Listeners { client, peer, ops });
        }
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ports,
            reserved,
            nodes: BTreeMap::new(),
            partition: Arc::new(Partition::default()),
            initial,
            replicas: initial,
            endpoints: Arc::default(),
            tweak: Arc::new(tweak),
            env: BTreeMap::new(),
        }
    }

    /// The data directory ("volume") of an ordinal.
    pub fn data_dir(&self, ordinal: u32) -> PathBuf {
        self.dir.path().join(format!("kvset-{ordinal}"))
    }

    /// The configuration of an ordinal.
    pub fn config(&self, ordinal: u32) -> Config {
        let mut c = Config {
            name: format!("kvset-{ordinal}"),
            data_dir: self.data_dir(ordinal),
            namespace: "test".into(),
            listen_host: "127.0.0.1".into(),
            peer_addrs: self.ports.iter().map(|p| format!("127.0.0.1:{}", p.peer)).collect(),
            client_addrs: self.ports.iter().map(|p| format!("127.0.0.1:{}", p.client)).collect(),
            initial_replicas: self.initial,
            log_format: kvset_server::config::LogFormat::Text,
            shutdown_timeout_ms: 5000,
            ..Default::default()
        };
        // Quicker than production, still well above loaded-CI scheduling noise.
        c.raft.heartbeat_interval_ms = 100;
        c.raft.election_timeout_min_ms = 1000;
        c.raft.election_timeout_max_ms = 2000;
        c.raft.rpc_timeout_ms = 1000;
        (self.tweak)(&mut c);
        if self.env.is_empty() {
            return c;
        }
        c.with_env(&self.env).unwrap_or_else(|e| panic!("bad test environment {:?}: {e}", self.env))
    }

    /// Gives up the ports reserved for an ordinal that has not started, so that a `kvset serve`
    /// process can bind them; returns that ordinal's configuration.
    pub fn release(&mut self, ordinal: u32) -> Config {
        self.reserved.remove(&ordinal);
        self.config(ordinal)
    }

    /// Starts (or restarts, with its volume) an ordinal.
    pub async fn start_node(&mut self, ordinal: u32) {
        self.start_node_with(ordinal, NodeOptions::default()).await;
    }

    /// Starts an ordinal with explicit options (the partition hook is always added).
    pub async fn start_node_with(&mut self, ordinal: u32, mut options: NodeOptions) {
        assert!(!self.nodes.contains_key(&ordinal), "kvset-{ordinal} is already running");
        let listeners = match self.reserved.remove(&ordinal) {
            Some(l) => l,
            None => {
                let p = self.ports[ordinal as usize];
                let bind = |port: u16| async move {
                    crate::eventually(
                        &format!("port {port} free again"),
                        Duration::from_secs(10),
                        || async move { TcpListener::bind(("127.0.0.1", port)).await.ok() },
                    )
                    .await
                };
                Listeners { client: bind(p.client).await, peer: bind(p.peer).await, ops: bind(p.ops).await }
            }
        };
        options.fault = Some(self.partition.clone());
        // In one process, the previous incarnation's last storage handles (a connection task
        // finishing, a blocking read) can outlive its shutdown by a moment; sled then refuses
        // the second open of the directory. A real restart is a new process and never sees this.
        let mut listeners = Some(listeners);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let node = loop {
            let l = listeners.take().expect("listeners");
            let (client, peer, ops) = (l.client.local_addr(), l.peer.local_addr(), l.ops.local_addr());
            match Node::start(self.config(ordinal), l, std::future::pending(), options.clone()).await {
                Ok(node) => break node,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let rebind = |a: std::io::Result<std::net::SocketAddr>| async move {
                        TcpListener::bind(a.expect("addr")).await.expect("rebind")
                    };
                    listeners = Some(Listeners {
                        client: rebind(client).await,
                        peer: rebind(peer).await,
                        ops: rebind(ops).await,
                    });
                }
                Err(e) => panic!("kvset-{ordinal} failed to start: {e}"),
            }
        };
        node.ready().await;
        self.nodes.insert(ordinal, node);
        self.publish(ordinal);
    }

    /// Records whether `ordinal` runs in the endpoints workloads use.
    fn publish(&self, ordinal: u32) {
        let addr = self.nodes.contains_key(&ordinal).then(|| self.endpoint(ordinal));
        self.endpoints.write().unwrap_or_else(|e| e.into_inner()).set(ordinal, addr);
    }

    /// Starts an ordinal and returns the start error instead of panicking.
    pub async fn try_start_node(&mut self, ordinal: u32) -> Result<(), kvset_server::StartError> {
        let p = self.ports[ordinal as usize];
        let listeners = match self.reserved.remove(&ordinal) {
            Some(l) => l,
            None => Listeners {
                client: TcpListener::bind(("127.0.0.1", p.client)).await.expect("rebind"),
                peer: TcpListener::bind(("127.0.0.1", p.peer)).await.expect("rebind"),
                ops: TcpListener::bind(("127.0.0.1", p.ops)).await.expect("rebind"),
            },
        };
        let options = NodeOptions { fault: Some(self.partition.clone()), ..Default::default() };
        let node = Node::start(self.config(ordinal), listeners, std::future::pending(), options).await?;
        self.nodes.insert(ordinal, node);
        self.publish(ordinal);
        Ok(())
    }

    /// Stops an ordinal gracefully and waits until it is gone.
    pub async fn stop(&mut self, ordinal: u32) {
        self.try_stop(ordinal).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops an ordinal gracefully; a failed shutdown is an error.
    pub async fn try_stop(&mut self, ordinal: u32) -> Result<(), String> {
        let Some(node) = self.nodes.remove(&ordinal) else { return Ok(()) };
        self.publish(ordinal);
        node.shutdown().await.map_err(|e| format!("kvset-{ordinal} shutdown: {e}"))
    }

    /// Stops several ordinals at once (as a StatefulSet with `Parallel` pod management does on a
    /// scale-down) and waits for all of them.
    pub async fn stop_many(&mut self, ordinals: &[u32]) {
        self.try_stop_many(ordinals).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops several ordinals at once; the first failed shutdown is an error.
    pub async fn try_stop_many(&mut self, ordinals: &[u32]) -> Result<(), String> {
        let handles: Vec<(u32, NodeHandle)> =
            ordinals.iter().filter_map(|o| self.nodes.remove(o).map(|n| (*o, n))).collect();
        for (o, _) in &handles {
            self.publish(*o);
        }
        let stops = handles
            .into_iter()
            .map(|(o, n)| async move { n.shutdown().await.map_err(|e| format!("kvset-{o} shutdown: {e}")) });
        futures::future::join_all(stops).await.into_iter().collect()
    }

    /// Forgets a member whose Raft was stopped by the test itself: it is shut down, and its
    /// (expected) shutdown error is ignored.
    pub async fn abandon(&mut self, ordinal: u32) {
        if let Some(node) = self.nodes.remove(&ordinal) {
            self.publish(ordinal);
            let _ = node.shutdown().await;
        }
    }

    /// Deletes an ordinal's volume (it must be stopped): the next start is a replacement.
    pub fn wipe(&mut self, ordinal: u32) {
        assert!(!self.nodes.contains_key(&ordinal), "stop kvset-{ordinal} before wiping its volume");
        let _ = std::fs::remove_dir_all(self.data_dir(ordinal));
    }

    /// The running member at an ordinal.
    pub fn node(&self, ordinal: u32) -> &NodeHandle {
        self.nodes.get(&ordinal).unwrap_or_else(|| panic!("kvset-{ordinal} is not running"))
    }

    /// Ordinals running now.
    pub fn running(&self) -> Vec<u32> {
        self.nodes.keys().copied().collect()
    }

    /// Client endpoint of an ordinal.
    pub fn endpoint(&self, ordinal: u32) -> String {
        format!("127.0.0.1:{}", self.ports[ordinal as usize].client)
    }

    /// Ops (HTTP) endpoint of an ordinal.
    pub fn ops_endpoint(&self, ordinal: u32) -> String {
        format!("127.0.0.1:{}", self.ports[ordinal as usize].ops)
    }

    /// A client for every running member.
    pub fn client(&self) -> Client {
        Client::new(self.running().into_iter().map(|o| self.endpoint(o)), ClientOptions::default())
            .expect("client")
    }

    /// A client that only talks to one member (no leader following).
    pub fn client_for(&self, ordinal: u32) -> Client {
        Client::new([self.endpoint(ordinal)], ClientOptions { prefer_leader: false, ..Default::default() })
            .expect("client")
    }

    /// The running ordinal that is leader, if exactly one running member says it leads.
    pub fn leader(&self) -> Option<u32> {
        let leaders: Vec<u32> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.member().raft().metrics().borrow_watched().state == ServerState::Leader)
            .map(|(o, _)| *o)
            .collect();
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Waits for a leader among the running members; returns its ordinal.
    pub async fn wait_leader(&self, timeout: Duration) -> u32 {
        eventually("a leader", timeout, || async { self.leader() }).await
    }

    /// Waits until the leader's membership has `n` voters and every running member agrees on
    /// the leader.
    pub async fn wait_voters(&self, n: usize, timeout: Duration) -> u32 {
        eventually(&format!("{n} voters and one agreed leader"), timeout, || async {
            let leader = self.leader()?;
            let lm = self.node(leader).member().raft_metrics();
            let voters = lm.membership_config.membership().voter_ids().count();
            let lid = self.node(leader).node_id();
            let agreed = self
                .nodes
                .values()
                .all(|n| n.member().raft().metrics().borrow_watched().current_leader == Some(lid));
            (voters == n && agreed).then_some(leader)
        })
        .await
    }

    /// Waits until every running member has applied at least the leader's last log index.
    pub async fn wait_converged(&self, timeout: Duration) {
        eventually("every member applied the leader's log", timeout, || async {
            let leader = self.leader()?;
            let last = self.node(leader).member().raft_metrics().last_log_index?;
            self.nodes
                .values()
                .all(|n| n.member().raft_metrics().last_applied.is_some_and(|l| l.index >= last))
                .then_some(())
        })
        .await
    }

    /// Node ids of the running members.
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.values().map(|n| n.node_id()).collect()
    }

    /// Cuts an ordinal off from every other member.
    pub fn isolate(&self, ordinal: u32) {
        let mut all = self.node_ids();
        // Include stopped/removed incarnations too: harmless, and keeps the cut total.
        all.sort();
        self.partition.isolate(self.node(ordinal).node_id(), &all);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.partition.heal();
    }

    /// Stops every member.
    pub async fn shutdown(mut self) {
        for o in self.running() {
            self.stop(o).await;
        }
    }
}

impl Harness for Cluster {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    fn member_config(&self) -> Config {
        self.config(0)
    }

    fn running(&self) -> Vec<u32> {
        Cluster::running(self)
    }

    fn replicas(&self) -> u32 {
        self.replicas
    }

    fn endpoints(&self) -> Arc<RwLock<Endpoints>> {
        self.endpoints.clone()
    }

    async fn start_all(&mut self, n: u32) -> Result<(), String> {
        self.replicas = self.replicas.max(n);
        for o in 0..n {
            if !self.nodes.contains_key(&o) {
                self.start_node(o).await;
            }
        }
        Ok(())
    }

    async fn start(&mut self, ordinal: u32) -> Result<(), String> {
        self.start_node(ordinal).await;
        Ok(())
    }

    async fn stop(&mut self, ordinal: u32) -> Result<(), String> {
        self.try_stop(ordinal).await
    }

    /// In one process there is no kill -9: the members stop at once, gracefully. (What a
    /// real kill loses is covered by the storage crash test and the Docker suite.)
    async fn kill(&mut self, ordinals: &[u32]) -> Result<(), String> {
        self.try_stop_many(ordinals).await
    }

    async fn wipe(&mut self, ordinal: u32) -> Result<(), String> {
        Cluster::wipe(self, ordinal);
        Ok(())
    }

    async fn partition(&mut self, ordinal: u32) -> Result<(), String> {
        self.isolate(ordinal);
        Ok(())
    }

    async fn heal(&mut self, _ordinal: u32) -> Result<(), String> {
        Cluster::heal(self);
        Ok(())
    }

    /// `Cluster.SetReplicas` (the static replicas source), then new members start, or the
    /// surplus ones stop together once they know the new count (so each waits for its removal,
    /// as a pod does on a StatefulSet scale-down) and lose their volumes.
    async fn scale(&mut self, n: u32) -> Result<(), String> {
        self.client().set_replicas(n).await.map_err(|e| format!("set replicas {n}: {e}"))?;
        let before = self.replicas;
        self.replicas = n;
        if n > before {
            return self.start_all(n).await;
        }
        let surplus: Vec<u32> = (n..before).filter(|o| self.nodes.contains_key(o)).collect();
        let members: Vec<_> = surplus.iter().map(|o| self.node(*o).member().clone()).collect();
        crate::poll_until(
            "the departing members know the new replica count",
            Duration::from_secs(30),
            || async { members.iter().all(|m| m.desired_replicas().0 == n).then_some(()) },
        )
        .await?;
        self.try_stop_many(&surplus).await?;
        for o in surplus {
            Cluster::wipe(self, o);
        }
        Ok(())
    }

    fn set_env(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.env.insert(name.to_string(), v.to_string()),
            None => self.env.remove(name),
        };
    }
}
