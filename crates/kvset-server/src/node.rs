//! One running member: [`Node::start`] wires storage, Raft, the three listeners and the
//! background tasks together and returns a [`NodeHandle`].
//!
//! Start:
//! 1. the member name gives the ordinal; the volume gives the node id and cluster id;
//! 2. the sled store opens and openraft starts on it;
//! 3. the peer, client and ops servers start on the given listeners — the member is *ready*
//!    (`/readyz`, gRPC health) as soon as they serve, leader or not;
//! 4. the membership task bootstraps, joins, or (on the leader) reconciles membership.
//!
//! Shutdown (SIGTERM, Ctrl-C, or [`NodeHandle::shutdown`]), bounded by `shutdown_timeout_ms`:
//! health turns NOT_SERVING and `/readyz` 503; the servers stop accepting connections and
//! drain the calls in flight; the background tasks stop; Raft shuts down; the database is
//! flushed. openraft 0.9 has no leadership transfer, so a leader's shutdown costs the cluster
//! about one election timeout of write unavailability.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::v1 as pb;
use kvset_storage::ClusterId;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use kvset_storage::Member;
use kvset_storage::SmReader;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::TypeConfig;
use kvset_storage::Volume;
use openraft::Raft;
use openraft::RaftMetrics;
use openraft::ServerState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::batcher::Batcher;
use crate::batcher::WriteError;
use crate::config::Config;
use crate::errors::KvError;
use crate::forward::Forwarder;
use crate::identity::AddressBook;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::metrics::StateLabel;
use crate::metrics::StorageMetrics;
use crate::network::PeerFault;
use crate::network::PeerNetwork;
use crate::pb::response::HeaderInfo;
use crate::read_index::ReadIndex;
use crate::read_index::ReadIndexError;

/// The cluster id this member belongs to, shared by everything that stamps or checks it.
pub type ClusterIdCell = Arc<RwLock<Option<ClusterId>>>;

/// Reads a [`ClusterIdCell`].
pub fn read_cluster(cell: &ClusterIdCell) -> Option<ClusterId> {
    *cell.read().unwrap_or_else(|e| e.into_inner())
}

/// The three listeners a member serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds the listeners of `config`'s member on `listen_host`.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let identity = Identity::from_name(&config.name)?;
        let book = AddressBook::new(config, &identity.set);
        let bind = |port: u16| {
            let addr = format!("{}:{}", config.listen_host, port);
            async move { TcpListener::bind(&addr).await.map_err(|e| StartError::Bind { addr, source: e }) }
        };
        Ok(Self {
            client: bind(book.client_listen_port(identity.ordinal)).await?,
            peer: bind(book.peer_listen_port(identity.ordinal)).await?,
            ops: bind(book.ops_listen_port(identity.ordinal)).await?,
        })
    }
}

/// Extra knobs for tests; production uses the default.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// Cuts peer links on the sending side (partitions).
    pub fault: Option<Arc<dyn PeerFault>>,
    /// Bootstrap without waiting for the other initial ordinals (`--force-new-cluster`).
    pub force_new_cluster: bool,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("force_new_cluster", &self.force_new_cluster)
            .finish_non_exhaustive()
    }
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Storage(#[from] kvset_storage::OpenError),
    #[error(transparent)]
    Volume(#[from] kvset_storage::VolumeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(String),
}

/// Lifecycle of a member, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Serving,
    ShuttingDown,
    Stopped,
}

/// Everything the services and tasks of one member share.
pub struct NodeShared {
    pub config: Config,
    pub identity: Identity,
    pub book: AddressBook,
    pub node_id: u64,
    pub me: Member,
    pub volume: Mutex<Volume>,
    pub cluster: ClusterIdCell,
    pub raft: Raft<TypeConfig>,
    pub reader: SmReader,
    pub batcher: Batcher,
    pub read_index: Arc<ReadIndex>,
    pub metrics: Arc<Metrics>,
    pub forwarder: Forwarder,
    pub phase: watch::Sender<Phase>,
    pub options: NodeOptions,
    /// What the membership task did last, for Status and logs.
    pub reconciler: Mutex<String>,
    /// Desired voter count from the Kubernetes API (when that is the source); 0 = unknown.
    pub k8s_replicas: std::sync::atomic::AtomicU32,
    /// When this member last became leader; `None` while it is not the leader.
    leader_since: Mutex<Option<Instant>>,
    accepting: AtomicBool,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("name", &self.identity.name)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Where a request that needs the leader goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This member is the leader.
    Local,
    /// Forward to the leader's client endpoint.
    Forward { leader_id: u64, addr: String },
}

impl NodeShared {
    /// The cluster id, if this member has one.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        read_cluster(&self.cluster)
    }

    /// Records the cluster this member belongs to, in the volume first.
    pub fn adopt_cluster(&self, id: ClusterId) -> Result<(), kvset_storage::VolumeError> {
        let mut volume = self.volume.lock().unwrap_or_else(|e| e.into_inner());
        volume.set_cluster_id(id)?;
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = Some(id);
        Ok(())
    }

    /// A snapshot of openraft's metrics.
    pub fn raft_metrics(&self) -> RaftMetrics<u64, Member> {
        self.raft.metrics().borrow().clone()
    }

    /// Header fields for responses produced here.
    pub fn header_info(&self) -> HeaderInfo {
        HeaderInfo {
            cluster_id: self.cluster_id().map(|c| c.to_string()).unwrap_or_default(),
            member_id: self.node_id,
            raft_term: self.raft.metrics().borrow().current_term,
        }
    }

    /// Whether new client requests are taken.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// The leader this member knows of, with its client address.
    pub fn leader(&self) -> (Option<u64>, Option<String>) {
        let m = self.raft.metrics();
        let m = m.borrow();
        let addr = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.client_addr.clone()));
        (m.current_leader, addr)
    }

    /// For a leader: how long it has gone without hearing from a quorum, if that is longer than
    /// the minimum election timeout (the rest of the cluster may have elected another leader
    /// meanwhile). openraft 0.9 leaders never step down on their own, so this is the one rule
    /// that stops such a leader serving requests and proposing membership changes. openraft's
    /// `millis_since_quorum_ack` stays `None` until a quorum acknowledged something (e.g. a
    /// leadership restored from the volume at startup): then the time since it became leader
    /// counts.
    pub fn quorum_lost_ms(&self, millis_since_quorum_ack: Option<u64>) -> Option<u64> {
        let ms = millis_since_quorum_ack.or_else(|| {
            let since = *self.leader_since.lock().unwrap_or_else(|e| e.into_inner());
            since.map(|t| t.elapsed().as_millis() as u64)
        })?;
        (ms > self.config.raft.election_timeout_min_ms).then_some(ms)
    }

    /// Decides where a leader-only request goes. A forwarded request is never forwarded again.
    pub fn route(&self, forwarded: bool) -> Result<Route, KvError> {
        if !self.accepting() {
            return Err(KvError::Unavailable("member is shutting down".into()));
        }
        match self.leader() {
            (Some(id), _) if id == self.node_id => {
                // Without this check, writes to a cut-off leader would wait for their deadline.
                match self.quorum_lost_ms(self.raft.metrics().borrow().millis_since_quorum_ack) {
                    Some(ms) => Err(KvError::NoLeader {
                        leader_id: None,
                        leader_addr: None,
                        reason: format!(
                            "member {} leads but has heard from no quorum for {ms} ms",
                            self.identity.name
                        ),
                    }),
                    None => Ok(Route::Local),
                }
            }
            (Some(id), Some(addr)) if !forwarded => Ok(Route::Forward { leader_id: id, addr }),
            (id, addr) => Err(KvError::NoLeader {
                leader_id: id,
                leader_addr: addr,
                reason: if forwarded {
                    format!(
                        "member {} received a forwarded request but is not the leader",
                        self.identity.name
                    )
                } else {
                    "no leader is known right now".into()
                },
            }),
        }
    }

    /// Proposes a write on this member (which believes it is the leader) and waits for its
    /// result until `deadline`.
    pub async fn submit(&self, command: Command, deadline: Instant) -> Result<CommandResult, KvError> {
        if !self.accepting() {
            return Err(KvError::Unavailable("member is shutting down".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.batcher.submit(command)).await {
            Err(_) => Err(KvError::DeadlineExceeded(
                "the write did not complete in time; it may still apply".into(),
            )),
            Ok(Ok(result)) => Ok(result),
            Ok(Err(WriteError::NotLeader { leader_id, leader })) => Err(KvError::NoLeader {
                leader_id,
                leader_addr: leader.map(|m| m.client_addr),
                reason: "leadership moved before the write was appended".into(),
            }),
            Ok(Err(WriteError::Unavailable(m))) => Err(KvError::Unavailable(m)),
            Ok(Err(WriteError::Indeterminate(m))) => Err(KvError::Indeterminate(m)),
        }
    }

    /// Waits until a linearizable read may be served from the local state machine (ReadIndex
    /// on the leader), bounded by `deadline`.
    /// Concurrent reads share ReadIndex rounds (see `read_index`).
    pub async fn read_barrier(&self, deadline: Instant) -> Result<(), KvError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.read_index.wait()).await {
            Err(_) => Err(KvError::DeadlineExceeded("could not confirm leadership in time".into())),
            Ok(Ok(())) => Ok(()),
            Ok(Err(ReadIndexError::NotLeader { leader_id, leader })) => Err(KvError::NoLeader {
                leader_id,
                leader_addr: leader.map(|n| n.client_addr),
                reason: "this member is no longer the leader".into(),
            }),
            Ok(Err(ReadIndexError::NoQuorum(q))) => {
                Err(KvError::Unavailable(format!("cannot confirm leadership with a quorum: {q}")))
            }
            Ok(Err(ReadIndexError::Stopped(f))) => Err(KvError::Unavailable(format!("raft stopped: {f}"))),
        }
    }

    /// The desired number of voters and where it came from.
    pub fn desired_replicas(&self) -> (u32, &'static str) {
        if self.config.replicas_source == "kubernetes" {
            let n = self.k8s_replicas.load(Ordering::Acquire);
            if n > 0 {
                return (n, "kubernetes");
            }
        }
        match self.reader.applied().replicas {
            Some(n) => (n, "SetReplicas"),
            None => (self.config.initial_replicas, "initial_replicas"),
        }
    }

    /// Records what the membership task did, logging it when it changed.
    pub fn set_reconciler_status(&self, status: String) {
        let mut current = self.reconciler.lock().unwrap_or_else(|e| e.into_inner());
        if *current != status {
            tracing::info!(reconciler = %status, "membership");
            *current = status;
        }
    }

    /// The Status of this member.
    pub fn status(&self) -> pb::StatusResponse {
        let m = self.raft_metrics();
        let applied = self.reader.applied();
        let phase = *self.phase.borrow();
        let role = if matches!(phase, Phase::ShuttingDown | Phase::Stopped) {
            pb::Role::Shutdown
        } else if m.membership_config.membership().get_node(&self.node_id).is_none() {
            pb::Role::Joining
        } else {
            match m.state {
                ServerState::Leader => pb::Role::Leader,
                ServerState::Follower => pb::Role::Follower,
                ServerState::Candidate => pb::Role::Candidate,
                ServerState::Learner => pb::Role::Learner,
                ServerState::Shutdown => pb::Role::Shutdown,
            }
        };
        let (leader_id, leader_addr) = self.leader();
        pb::StatusResponse {
            cluster_id: self.cluster_id().map(|c| c.to_string()).unwrap_or_default(),
            node_id: self.node_id,
            ordinal: self.identity.ordinal,
            name: self.identity.name.clone(),
            role: role as i32,
            term: m.current_term,
            leader_id: leader_id.unwrap_or(0),
            leader_addr: leader_addr.unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            commit_index: commit_index(&m).unwrap_or(0),
            revision: applied.revision,
            desired_replicas: self.desired_replicas().0,
            reconciler: self.reconciler.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            db_size_bytes: kvset_storage::dir_size(&self.config.data_dir),
            state_digest: 0,
            state_keys: 0,
        }
    }
}

/// The quorum-matched log index, computed on the leader from replication progress.
pub fn commit_index(m: &RaftMetrics<u64, Member>) -> Option<u64> {
    let replication = m.replication.as_ref()?;
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|id| {
            if *id == m.id {
                m.last_log_index.unwrap_or(0)
            } else {
                replication.get(id).and_then(|l| l.map(|l| l.index)).unwrap_or(0)
            }
        })
        .collect();
    if matched.is_empty() {
        return None;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    Some(matched[voters.len() / 2])
}

/// A running member.
#[derive(Debug)]
pub struct NodeHandle {
    shared: Arc<NodeShared>,
    /// Asks the member to shut down (the member decides when its servers stop).
    request: watch::Sender<bool>,
    done: watch::Receiver<Option<Result<(), String>>>,
    client_addr: std::net::SocketAddr,
    peer_addr: std::net::SocketAddr,
    ops_addr: std::net::SocketAddr,
}

/// Starts and runs members.
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Starts a member with `config` on `listeners`; it shuts down gracefully when `shutdown`
    /// completes or [`NodeHandle::shutdown`] is called.
    pub async fn start(
        config: Config,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
        options: NodeOptions,
    ) -> Result<NodeHandle, StartError> {
        config.validate()?;
        let identity = Identity::from_name(&config.name)?;
        let book = AddressBook::new(&config, &identity.set);
        let expected = if config.cluster_id.is_empty() {
            None
        } else {
            Some(config.cluster_id.parse().map_err(|_| crate::config::ConfigError::Invalid {
                key: "cluster_id",
                reason: "must be 32 hex characters".into(),
            })?)
        };
        let volume = Volume::open(&config.data_dir, identity.ordinal, expected)?;
        let node_id = volume.node_id();
        let cluster: ClusterIdCell = Arc::new(RwLock::new(volume.cluster_id()));
        let metrics = Metrics::new();
        let store = Store::open(
            &volume,
            StoreOptions {
                cache_bytes: config.cache_bytes,
                observer: Arc::new(StorageMetrics(metrics.clone())),
            },
        )?;
        tracing::info!(
            name = %identity.name, node_id, cluster_id = ?volume.cluster_id(), fresh = volume.is_fresh(),
            data_dir = %config.data_dir.display(), "opened volume"
        );

        let raft_config = openraft::Config {
            cluster_name: "kvset".into(),
            heartbeat_interval: config.raft.heartbeat_interval_ms,
            election_timeout_min: config.raft.election_timeout_min_ms,
            election_timeout_max: config.raft.election_timeout_max_ms,
            install_snapshot_timeout: config.raft.rpc_timeout_ms,
            max_payload_entries: config.raft.max_payload_entries,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every_entries),
            snapshot_max_chunk_size: config.raft.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: config.raft.keep_entries_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let network = PeerNetwork::new(
            node_id,
            cluster.clone(),
            Duration::from_millis(config.raft.rpc_timeout_ms),
            options.fault.clone(),
            metrics.clone(),
        );
        let reader = store.reader.clone();
        let raft = Raft::new(node_id, Arc::new(raft_config), network, store.log, store.state_machine)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let batcher = Batcher::start(raft.clone(), &config.batch, metrics.clone());
        let read_index = ReadIndex::new(raft.clone(), metrics.clone());
        let me = book.member(identity.ordinal);
        let (phase, _) = watch::channel(Phase::Starting);
        let shared = Arc::new(NodeShared {
            config,
            identity,
            book,
            node_id,
            me,
            volume: Mutex::new(volume),
            cluster,
            raft,
            reader,
            batcher,
            read_index,
            metrics,
            forwarder: Forwarder::default(),
            leader_since: Mutex::new(None),
            phase,
            options,
            reconciler: Mutex::new(String::new()),
            k8s_replicas: std::sync::atomic::AtomicU32::new(0),
            accepting: AtomicBool::new(true),
        });

        let client_addr = listeners.client.local_addr().map_err(|e| StartError::Raft(e.to_string()))?;
        let peer_addr = listeners.peer.local_addr().map_err(|e| StartError::Raft(e.to_string()))?;
        let ops_addr = listeners.ops.local_addr().map_err(|e| StartError::Raft(e.to_string()))?;

        // `stop` is what the servers and tasks obey; only the shutdown sequence sets it, after a
        // departing member has been removed. `request` is what a caller (or a signal) sets.
        let (stop, stop_rx) = watch::channel(false);
        let (request, mut request_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(None);
        let servers = crate::server::spawn_servers(shared.clone(), listeners, stop_rx.clone())
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let mut tasks = vec![
            tokio::spawn(crate::membership::run(shared.clone(), stop_rx.clone())),
            tokio::spawn(watch_raft_metrics(shared.clone(), stop_rx.clone())),
        ];
        if shared.config.replicas_source == "kubernetes" {
            tasks.push(tokio::spawn(crate::replicas::run(shared.clone(), stop_rx.clone())));
        }
        shared.phase.send_replace(Phase::Serving);
        tracing::info!(
            name = %shared.identity.name, node_id, client = %client_addr, peer = %peer_addr, ops = %ops_addr,
            advertise_peer = %shared.me.peer_addr, advertise_client = %shared.me.client_addr,
            "member serving"
        );

        let sup = shared.clone();
        let stop_tx = stop;
        tokio::spawn(async move {
            let mut raft_metrics = sup.raft.metrics();
            let fatal = async {
                loop {
                    if let Err(e) = &raft_metrics.borrow().running_state {
                        return e.to_string();
                    }
                    if raft_metrics.changed().await.is_err() {
                        return "raft metrics closed".to_string();
                    }
                }
            };
            let outcome = tokio::select! {
                _ = shutdown => Ok(()),
                _ = request_rx.wait_for(|s| *s) => Ok(()),
                e = fatal => Err(e),
            };
            match &outcome {
                Err(e) => {
                    tracing::error!(error = %e, "raft stopped with a fatal error; shutting the member down")
                }
                Ok(()) => wait_for_removal_if_leaving(&sup).await,
            }
            let result = shutdown_sequence(&sup, &stop_tx, servers, tasks).await;
            // Release this task's share of the storage before announcing the stop.
            drop(sup);
            let _ = done_tx.send(Some(outcome.and(result)));
        });

        Ok(NodeHandle { shared, request, done, client_addr, peer_addr, ops_addr })
    }
}

/// A member stopped because the desired replica count no longer includes its ordinal (a
/// scale-down) stays a working voter until the leader has removed it, so a StatefulSet
/// scale-down can never take voters away faster than the cluster removes them. Bounded by
/// `leave_timeout_ms`. Any other stop (rolling update, node drain) does not wait: SIGTERM alone
/// never removes a member.
async fn wait_for_removal_if_leaving(shared: &Arc<NodeShared>) {
    let desired = if shared.config.replicas_source == "kubernetes" {
        match crate::replicas::fetch_once(shared).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the StatefulSet at shutdown; using the last known replicas");
                shared.desired_replicas().0
            }
        }
    } else {
        shared.desired_replicas().0
    };
    let ordinal = shared.identity.ordinal;
    let is_voter = |m: &RaftMetrics<u64, Member>| {
        m.membership_config.membership().voter_ids().any(|v| v == shared.node_id)
    };
    if ordinal < desired || !is_voter(&shared.raft_metrics()) {
        return;
    }
    let limit = Duration::from_millis(shared.config.leave_timeout_ms);
    tracing::info!(
        ordinal,
        desired,
        timeout_ms = limit.as_millis() as u64,
        "scale-down: staying a voter until the cluster removes this member"
    );
    // Raft never tells a removed member of its removal: ask the others.
    let removed = tokio::time::timeout(limit, async {
        while crate::membership::still_a_voter(shared).await != Some(false) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    match removed {
        Ok(()) => tracing::info!("removed from the voters; stopping"),
        Err(_) => tracing::warn!("still a voter after {limit:?}; stopping anyway"),
    }
}

/// The graceful shutdown: stop taking requests, drain, stop tasks, stop Raft, flush.
async fn shutdown_sequence(
    shared: &Arc<NodeShared>,
    stop: &watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
) -> Result<(), String> {
    let started = Instant::now();
    let limit = Duration::from_millis(shared.config.shutdown_timeout_ms);
    tracing::info!(name = %shared.identity.name, "shutting down: draining requests");
    shared.phase.send_replace(Phase::ShuttingDown);
    let _ = stop.send(true);
    // Servers stop accepting and drain the calls in flight (tonic/axum graceful shutdown).
    let drain = async {
        for s in servers {
            let _ = s.await;
        }
    };
    if tokio::time::timeout(limit / 2, drain).await.is_err() {
        tracing::warn!("requests still in flight after {:?}; cutting them off", limit / 2);
    }
    shared.accepting.store(false, Ordering::Release);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await; // an aborted task is dropped (with its handles) once awaited
    }
    let left = limit.saturating_sub(started.elapsed()).max(Duration::from_millis(500));
    let result = match tokio::time::timeout(left, shared.raft.shutdown()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("raft shutdown: {e}")),
        Err(_) => Err("raft did not shut down in time".to_string()),
    };
    if let Err(e) = shared.reader.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
    shared.phase.send_replace(Phase::Stopped);
    tracing::info!(name = %shared.identity.name, elapsed_ms = started.elapsed().as_millis() as u64, "member stopped");
    result
}

/// Mirrors openraft's metrics into Prometheus gauges; counts elections and leader changes.
async fn watch_raft_metrics(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let mut rx = shared.raft.metrics();
    let mut last_leader: Option<u64> = None;
    let mut last_state = ServerState::Learner;
    loop {
        let m = rx.borrow_and_update().clone();
        let mx = &shared.metrics;
        mx.term.set(m.current_term as i64);
        mx.is_leader.set(i64::from(m.state == ServerState::Leader));
        for (state, name) in [
            (ServerState::Leader, "leader"),
            (ServerState::Follower, "follower"),
            (ServerState::Candidate, "candidate"),
            (ServerState::Learner, "learner"),
            (ServerState::Shutdown, "shutdown"),
        ] {
            mx.state.get_or_create(&StateLabel { state: name }).set(i64::from(m.state == state));
        }
        mx.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        mx.applied_index.set(m.last_applied.map_or(0, |l| l.index) as i64);
        mx.commit_index.set(commit_index(&m).unwrap_or(0) as i64);
        mx.snapshot_index.set(m.snapshot.map_or(0, |l| l.index) as i64);
        mx.purged_index.set(m.purged.map_or(0, |l| l.index) as i64);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        mx.voters.set(voters.len() as i64);
        mx.learners.set(membership.learner_ids().count() as i64);
        if m.current_leader != last_leader {
            if m.current_leader.is_some() {
                mx.leader_changes.inc();
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "leader changed");
            }
            last_leader = m.current_leader;
        }
        if (m.state == ServerState::Leader) != (last_state == ServerState::Leader) {
            let now_leader = (m.state == ServerState::Leader).then(Instant::now);
            *shared.leader_since.lock().unwrap_or_else(|e| e.into_inner()) = now_leader;
        }
        if m.state == ServerState::Candidate && last_state != ServerState::Candidate {
            mx.elections.inc();
        }
        last_state = m.state;
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

impl NodeHandle {
    /// Waits until the member serves (it does right after `start` returns).
    pub async fn ready(&self) {
        let mut rx = self.shared.phase.subscribe();
        let _ = rx.wait_for(|p| *p != Phase::Starting).await;
    }

    /// The member's shared state (for tests and the binary).
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// The Raft node id.
    pub fn node_id(&self) -> u64 {
        self.shared.node_id
    }

    /// The bound client address.
    pub fn client_addr(&self) -> std::net::SocketAddr {
        self.client_addr
    }

    /// The bound peer address.
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        self.peer_addr
    }

    /// The bound ops address.
    pub fn ops_addr(&self) -> std::net::SocketAddr {
        self.ops_addr
    }

    /// Shuts the member down gracefully and waits for it.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.request.send(true);
        self.wait().await
    }

    /// Waits until the member has stopped (after a signal or a fatal error).
    pub async fn wait(mut self) -> Result<(), String> {
        match self.done.wait_for(|d| d.is_some()).await {
            Ok(d) => d.clone().unwrap_or(Ok(())),
            Err(_) => Err("member task vanished".into()),
        }
    }
}
