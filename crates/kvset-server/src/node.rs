//! One running member: [`Node::start`] wires storage, Raft, the three listeners and the
//! background tasks together and returns a [`NodeHandle`]. This is the assembly: it is the only
//! module that knows every other one, and nothing imports it.
//!
//! Start:
//! 1. the member name gives the ordinal; the volume gives the node id and cluster id;
//! 2. the sled store opens and openraft starts on it;
//! 3. the peer, client and ops servers start on the given listeners — the member is *ready*
//!    (`/readyz`, gRPC health) as soon as they serve, leader or not;
//! 4. the background tasks start: membership (bootstrap, join, reconcile), lease expiry and
//!    automatic compaction (acting on the leader only), Raft metrics, and the Kubernetes
//!    replicas watch when that is the source.
//!
//! Shutdown (SIGTERM, Ctrl-C, or [`NodeHandle::shutdown`]), bounded by `shutdown_timeout_ms`:
//! a member leaving in a scale-down first waits to be removed; a leader hands leadership over;
//! then health turns NOT_SERVING
//! and `/readyz` 503; the servers stop accepting connections and drain the calls in flight;
//! the background tasks stop; Raft shuts down; physical compaction stops (it resumes at the next
//! start) and the database is flushed (on the blocking pool).
//! A leader first hands leadership to the most up-to-date voter (openraft's `transfer_leader`),
//! so its shutdown costs the cluster a round trip of write unavailability, not an election
//! timeout.

use std::future::Future;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::Raft;
use kvset_storage::RaftMetrics;
use kvset_storage::Store;
use kvset_storage::StoreOptions;
use kvset_storage::Volume;
use kvset_storage::WatchReceiver;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::channels::DialTls;
use crate::channels::PeerChannels;
use crate::cluster_id::ClusterIdCell;
use crate::config::Config;
use crate::config::ReplicasSource;
use crate::identity::AddressBook;
use crate::identity::Identity;
use crate::member::LeaderClock;
use crate::member::LocalMember;
use crate::member::MemberParts;
use crate::member::Phase;
use crate::member::Proposer;
use crate::metrics::Metrics;
use crate::metrics::StorageMetrics;
use crate::network::PeerFault;
use crate::network::PeerNetwork;
pub use crate::server::ListenError;
pub use crate::server::Listeners;
use crate::service::ops::status::Node as OpsNode;
use crate::service::ops::status::StatusSource;
use crate::service::ops::status::ASK_TIMEOUT;
use crate::service::ops::OpsSource;
use crate::tasks::replicas::StatefulSetRef;
use crate::timeline::Timeline;
use crate::tls::MemberTls;

/// Extra knobs for tests; production uses the default.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// Cuts peer links on the sending side (partitions).
    pub fault: Option<Arc<dyn PeerFault>>,
    /// Stalls the log's fsyncs (slow disks).
    pub disk_fault: Option<Arc<dyn kvset_storage::DiskFault>>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions").finish_non_exhaustive()
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
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("TLS: {0}")]
    Tls(#[from] kvset_proto::tls::TlsError),
    #[error("a listener has no local address: {0}")]
    Listener(std::io::Error),
    #[error("raft config: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("raft: {0}")]
    Raft(#[from] openraft::error::Fatal<kvset_storage::TypeConfig>),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Recovery(#[from] crate::recovery::RecoveryError),
    #[error("a failed defragmentation could not be cleaned up: {0}")]
    Defrag(std::io::Error),
    #[error("{0}")]
    TokenKey(String),
}

/// How long a defragmentation at start waits for the previous incarnation of this member (in
/// the same process) to release the database.
const DEFRAG_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Why a member stopped other than by request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StopError {
    #[error("raft stopped with a fatal error: {0}")]
    Fatal(String),
    #[error("raft shutdown: {0}")]
    RaftShutdown(String),
    #[error("raft did not shut down in time")]
    RaftShutdownTimeout,
    #[error("the member's supervisor task vanished")]
    Vanished,
}

/// A running member.
#[derive(Debug)]
pub struct NodeHandle {
    member: Arc<LocalMember>,
    /// Asks the member to shut down (the member decides when its servers stop).
    request: watch::Sender<bool>,
    done: watch::Receiver<Option<Result<(), StopError>>>,
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
        let tls = MemberTls::from_config(&config, book.clone())?;
        let token_secret =
            crate::auth::TokenSecret::load(&config.auth.token_key_file).map_err(StartError::TokenKey)?;
        let expected = if config.cluster_id.is_empty() {
            None
        } else {
            Some(config.cluster_id.parse().map_err(|_| crate::config::ConfigError::Invalid {
                key: "cluster_id",
                reason: "must be 32 hex characters".into(),
            })?)
        };
        let mut volume = Volume::open(&config.data_dir, identity.ordinal, expected)?;
        if kvset_storage::defrag::requested(volume.dir()) {
            let dir = volume.dir().to_path_buf();
            tracing::info!("defragmenting the database before opening it (requested by Defragment)");
            let outcome =
                tokio::task::spawn_blocking(move || kvset_storage::defrag::run(&dir, DEFRAG_LOCK_WAIT))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            if let Err(e) = outcome {
                // Not a reason to stay down (a crash loop on a nearly full disk): the copy is
                // dropped, the request forgotten, and the member starts on its database as it was.
                tracing::error!(error = %e, "defragmentation failed; starting without it");
                kvset_storage::defrag::abandon(volume.dir()).map_err(StartError::Defrag)?;
            }
        }
        let node_id = volume.node_id();
        let metrics = Metrics::new();
        let mut store = Store::open(
            &volume,
            StoreOptions {
                cache_bytes: config.cache_bytes,
                observer: Arc::new(StorageMetrics(metrics.clone())),
                events: kvset_storage::EventLogLimits {
                    max_revisions: config.watch.event_cache_revisions as usize,
                    max_bytes: config.watch.event_cache_bytes as usize,
                },
                disk_fault: options.disk_fault.clone(),
            },
        )?;
        tracing::info!(
            name = %identity.name, node_id, cluster_id = ?volume.cluster_id(), fresh = volume.is_fresh(),
            data_dir = %config.data_dir.display(), "opened volume"
        );
        crate::recovery::prepare(
            &config.force_new_cluster,
            config.force_new_cluster_bump_revision,
            &book.member(identity.ordinal),
            &mut volume,
            &mut store,
        )
        .await?;
        let cluster = ClusterIdCell::new(volume);

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
            // No pre-vote: a follower that lost its leader must become a candidate (and report
            // no leader) within an election timeout, which is how members, watches with
            // `hasleader` and clients learn there is none; with pre-vote it would keep naming
            // the dead leader. A member back from a partition cannot depose a healthy leader
            // anyway: openraft's leader lease makes the others refuse its votes.
            enable_pre_vote: Some(false),
            // The state machine flushes lazily and the committed marker is a hint, so a leader
            // that restarts must win an election like any member (see openraft's log pointers
            // docs): it must not resume leadership on a state it may have lost part of.
            enable_leader_restore: Some(false),
            // Replicate entries as soon as the leader has them in its page cache, while its own
            // fsync runs: the leader's copy is counted only once flushed (Raft thesis §10.2.1).
            broadcast_submitted_on_append: Some(true),
            ..Default::default()
        }
        .validate()?;
        let dial = tls.as_ref().map(|t| DialTls { config: t.dial().clone(), book: book.clone() });
        let channels = Arc::new(PeerChannels::new(Duration::from_millis(config.raft.rpc_timeout_ms), dial));
        let network = PeerNetwork::new(
            node_id,
            cluster.clone(),
            Duration::from_millis(config.raft.rpc_timeout_ms),
            config.raft.snapshot_chunk_bytes as usize,
            channels.clone(),
            options.fault.clone(),
            metrics.clone(),
        );
        let reader = store.reader.clone();
        let raft = Raft::new(node_id, Arc::new(raft_config), network, store.log, store.state_machine).await?;
        let k8s_replicas = Arc::new(AtomicU32::new(0));
        let leadership = Arc::new(LeaderClock::default());
        let member = Arc::new(LocalMember::new(MemberParts {
            config,
            identity,
            book,
            node_id,
            cluster,
            raft,
            reader,
            metrics,
            channels,
            k8s_replicas: k8s_replicas.clone(),
            leadership: leadership.clone(),
            token_secret,
        }));

        let client_addr = listeners.client.local_addr().map_err(StartError::Listener)?;
        let peer_addr = listeners.peer.local_addr().map_err(StartError::Listener)?;
        let ops_addr = listeners.ops.local_addr().map_err(StartError::Listener)?;

        // `stop` is what the servers and tasks obey; only the shutdown sequence sets it, after a
        // departing member has been removed. `request` is what a caller (or a signal) sets.
        let (stop, stop_rx) = watch::channel(false);
        let (request, mut request_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(None);
        let timeline = Arc::new(Timeline::default());
        member.metrics().quota_bytes.set(member.config().quota_bytes as i64);
        let ops = crate::service::ops::router(ops_source(&member, timeline.clone()));
        let servers =
            crate::server::spawn_servers(member.clone(), listeners, tls.clone(), ops, stop_rx.clone())
                .await?;
        let config = member.config();
        let leases_reader = member.reader().clone();
        let mut tasks = vec![
            tokio::spawn(crate::tasks::membership::run(member.clone(), timeline.clone(), stop_rx.clone())),
            tokio::spawn(crate::tasks::leases::run(
                crate::tasks::leases::Inputs {
                    proposer: Proposer::new(member.clone()),
                    lessor: member.lessor().clone(),
                    reader: member.reader().clone(),
                    config: config.lease.clone(),
                    metrics: member.metrics().clone(),
                },
                stop_rx.clone(),
            )),
            tokio::spawn(crate::tasks::compactor::run(
                crate::tasks::compactor::Inputs {
                    proposer: Proposer::new(member.clone()),
                    reader: member.reader().clone(),
                    config: config.compaction.clone(),
                    metrics: member.metrics().clone(),
                },
                stop_rx.clone(),
            )),
            tokio::spawn(crate::tasks::quota::run(
                crate::tasks::quota::Inputs {
                    raft: member.raft().metrics(),
                    name: member.identity().name.clone(),
                    quota: config.quota_bytes,
                    channels: member.channels().clone(),
                    alarms: member.alarm_cell().clone(),
                    metrics: member.metrics().clone(),
                },
                stop_rx.clone(),
            )),
            tokio::spawn(crate::tasks::raft_metrics::run(
                crate::tasks::raft_metrics::Inputs {
                    rx: member.raft().metrics(),
                    metrics: member.metrics().clone(),
                    leadership,
                    data_dir: config.data_dir.clone(),
                    timeline,
                    leases: Box::new(move || leases_reader.leases().len()),
                },
                stop_rx.clone(),
            )),
        ];
        if let Some(tls) = tls {
            let interval = Duration::from_millis(config.tls.reload_interval_ms);
            let metrics = member.metrics().clone();
            tasks.push(tokio::spawn(crate::tls::watch_files(tls, metrics, interval, stop_rx.clone())));
        }
        if config.replicas_source == ReplicasSource::Kubernetes {
            tasks.push(tokio::spawn(crate::tasks::replicas::run(
                statefulset(&member),
                k8s_replicas.clone(),
                stop_rx.clone(),
            )));
        }
        member.set_phase(Phase::Serving);
        member.metrics().ready.set(1);
        tracing::info!(
            name = %member.identity().name, node_id, client = %client_addr, peer = %peer_addr, ops = %ops_addr,
            advertise_peer = %member.me().peer_addr, advertise_client = %member.me().client_addr,
            "member serving"
        );

        let sup = member.clone();
        tokio::spawn(async move {
            let mut raft_metrics = sup.raft().metrics();
            let fatal = async {
                loop {
                    if let Err(e) = &raft_metrics.borrow_watched().running_state {
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
                _ = sup.defrag_requested() => Ok(()),
                e = fatal => Err(StopError::Fatal(e)),
            };
            match &outcome {
                Err(e) => tracing::error!(error = %e, "shutting the member down"),
                Ok(()) => wait_for_removal_if_leaving(&sup, &k8s_replicas).await,
            }
            let result = shutdown_sequence(&sup, &stop, servers, tasks).await;
            // Release this task's share of the storage before announcing the stop.
            drop(sup);
            let _ = done_tx.send(Some(outcome.and(result)));
        });

        Ok(NodeHandle { member, request, done, client_addr, peer_addr, ops_addr })
    }
}

/// What the ops page and `/status.json` read (`service::ops`): the one place that knows how
/// they reach into the member. The closures hold the member weakly, so the ops server never
/// keeps a stopped member's storage alive.
fn ops_source(member: &Arc<LocalMember>, timeline: Arc<Timeline>) -> OpsSource {
    let weak = Arc::downgrade(member);
    let (local, listed, asker) = (weak.clone(), weak.clone(), weak);
    OpsSource {
        phase: member.subscribe_phase(),
        metrics: member.metrics().clone(),
        timeline,
        status: StatusSource {
            local: Box::new(move || {
                local.upgrade().map(|m| crate::service::cluster::status(&m)).unwrap_or_default()
            }),
            membership: Box::new(move || {
                let Some(member) = listed.upgrade() else { return Vec::new() };
                let m = member.raft_metrics();
                let membership = m.membership_config.membership();
                let voters: Vec<u64> = membership.voter_ids().collect();
                membership
                    .nodes()
                    .map(|(id, n)| OpsNode {
                        node_id: *id,
                        name: n.name.clone(),
                        ordinal: n.ordinal,
                        client_addr: n.client_addr.clone(),
                        voter: voters.contains(id),
                    })
                    .collect()
            }),
            ask: Box::new(move |node| {
                // Status is served to anyone (no access control), over the member's own TLS
                // identity when the client port requires a certificate.
                let client = match asker.upgrade() {
                    Some(m) => {
                        m.channels().status_client(&node.name, &node.client_addr).map_err(|e| e.to_string())
                    }
                    None => Err("this member is stopping".to_string()),
                };
                Box::pin(async move {
                    let mut client = client?;
                    let mut request = tonic::Request::new(kvset_proto::v1::StatusRequest { digest: false });
                    request.set_timeout(ASK_TIMEOUT);
                    match tokio::time::timeout(ASK_TIMEOUT, client.status(request)).await {
                        Ok(Ok(reply)) => Ok(reply.into_inner()),
                        Ok(Err(status)) => Err(innermost(&status)),
                        Err(_) => Err(format!("no answer within {} ms", ASK_TIMEOUT.as_millis())),
                    }
                })
            }),
        },
    }
}

/// A status's message with the innermost cause of its error chain ("transport error:
/// Connection refused (os error 111)").
fn innermost(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut cause: Option<&dyn Error> = status.source();
    let mut last = None;
    while let Some(e) = cause {
        last = Some(e.to_string());
        cause = e.source();
    }
    match last {
        Some(detail) if !detail.is_empty() && detail != status.message() => {
            format!("{}: {detail}", status.message())
        }
        _ => status.message().to_string(),
    }
}

/// The StatefulSet this member belongs to.
fn statefulset(member: &LocalMember) -> StatefulSetRef {
    StatefulSetRef {
        api_url: member.config().kubernetes_api_url.clone(),
        namespace: member.config().namespace.clone(),
        name: member.identity().set.clone(),
    }
}

/// A member stopped because the desired replica count no longer includes its ordinal (a
/// scale-down) stays a working voter until the leader has removed it, so a StatefulSet
/// scale-down can never take voters away faster than the cluster removes them. Bounded by
/// `leave_timeout_ms`. Any other stop (rolling update, node drain) does not wait: SIGTERM alone
/// never removes a member.
async fn wait_for_removal_if_leaving(member: &Arc<LocalMember>, k8s_replicas: &AtomicU32) {
    let desired = if member.config().replicas_source == ReplicasSource::Kubernetes {
        match crate::tasks::replicas::fetch_once(&statefulset(member), k8s_replicas).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the StatefulSet at shutdown; using the last known replicas");
                member.desired_replicas().0
            }
        }
    } else {
        member.desired_replicas().0
    };
    let ordinal = member.identity().ordinal;
    let is_voter =
        |m: &RaftMetrics| m.membership_config.membership().voter_ids().any(|v| v == member.node_id());
    if ordinal < desired || !is_voter(&member.raft_metrics()) {
        return;
    }
    let limit = Duration::from_millis(member.config().leave_timeout_ms);
    tracing::info!(
        ordinal,
        desired,
        timeout_ms = limit.as_millis() as u64,
        "scale-down: staying a voter until the cluster removes this member"
    );
    // Raft never tells a removed member of its removal: ask the others.
    let removed = tokio::time::timeout(limit, async {
        while crate::tasks::membership::still_a_voter(member).await != Some(false) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    match removed {
        Ok(()) => tracing::info!("removed from the voters; stopping"),
        Err(_) => tracing::warn!("still a voter after {limit:?}; stopping anyway"),
    }
}

/// A leader that stops first hands leadership to the most up-to-date voter, so the cluster
/// goes on writing after a pause of one round trip instead of an election timeout. Bounded
/// by `budget` (and by `HAND_OVER_MAX`); a failed handover only means an ordinary election.
async fn hand_over_leadership(member: &Arc<LocalMember>, budget: Duration) {
    let m = member.raft_metrics();
    let others = m.membership_config.membership().voter_ids().filter(|v| *v != member.node_id()).count();
    if m.current_leader != Some(member.node_id()) || others == 0 {
        return;
    }
    match member.transfer_leadership(None, budget.min(HAND_OVER_MAX)).await {
        Ok(leader) => tracing::info!(leader, "handed leadership over before stopping"),
        Err(e) => tracing::warn!(error = %e, "could not hand leadership over before stopping"),
    }
}

/// Longest a stopping leader waits for another member to take over.
const HAND_OVER_MAX: Duration = Duration::from_secs(3);

/// The graceful shutdown: hand over leadership, stop taking requests, drain, stop tasks, stop
/// Raft, flush.
async fn shutdown_sequence(
    member: &Arc<LocalMember>,
    stop: &watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
) -> Result<(), StopError> {
    let started = Instant::now();
    let limit = Duration::from_millis(member.config().shutdown_timeout_ms);
    hand_over_leadership(member, limit / 4).await;
    tracing::info!(name = %member.identity().name, "shutting down: draining requests");
    member.set_phase(Phase::ShuttingDown);
    member.metrics().ready.set(0);
    // Long-lived streams (watches, keep-alives) end now; their clients resume elsewhere.
    member.watch_hub().close();
    let _ = stop.send(true);
    // Servers stop accepting and drain the calls in flight (tonic/axum graceful shutdown).
    let aborts: Vec<_> = servers.iter().map(|s| s.abort_handle()).collect();
    let drain = async {
        for s in servers {
            let _ = s.await;
        }
    };
    if tokio::time::timeout(limit / 2, drain).await.is_err() {
        tracing::warn!("requests still in flight after {:?}; cutting them off", limit / 2);
        for a in aborts {
            a.abort();
        }
    }
    member.stop_accepting();
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await; // an aborted task is dropped (with its handles) once awaited
    }
    let left = limit.saturating_sub(started.elapsed()).max(Duration::from_millis(500));
    let result = match tokio::time::timeout(left, member.raft().shutdown()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StopError::RaftShutdown(e.to_string())),
        Err(_) => Err(StopError::RaftShutdownTimeout),
    };
    // A failing disk (full, or gone read-only) can make sled's flush block or retry forever:
    // bounded like the rest, so a member with a fatal storage error always stops.
    let reader = member.reader().clone();
    let left = limit.saturating_sub(started.elapsed()).max(Duration::from_millis(500));
    match tokio::time::timeout(left, tokio::task::spawn_blocking(move || reader.close())).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "final flush failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "final flush did not run"),
        Err(_) => tracing::error!("final flush did not finish within {left:?}; stopping without it"),
    }
    member.set_phase(Phase::Stopped);
    tracing::info!(name = %member.identity().name, elapsed_ms = started.elapsed().as_millis() as u64, "member stopped");
    result
}

impl NodeHandle {
    /// Waits until the member serves (it does right after `start` returns).
    pub async fn ready(&self) {
        let mut rx = self.member.subscribe_phase();
        let _ = rx.wait_for(|p| *p != Phase::Starting).await;
    }

    /// The member's shared state (for tests and the binary).
    pub fn member(&self) -> &Arc<LocalMember> {
        &self.member
    }

    /// The Raft node id.
    pub fn node_id(&self) -> u64 {
        self.member.node_id()
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
    pub async fn shutdown(self) -> Result<(), StopError> {
        let _ = self.request.send(true);
        self.wait().await
    }

    /// Waits until the member has stopped (after a signal or a fatal error).
    pub async fn wait(mut self) -> Result<(), StopError> {
        match self.done.wait_for(|d| d.is_some()).await {
            Ok(d) => d.clone().unwrap_or(Ok(())),
            Err(_) => Err(StopError::Vanished),
        }
    }
}
