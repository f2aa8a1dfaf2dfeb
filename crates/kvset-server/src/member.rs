//! This member's shared state: who it is, its Raft handle, and the entry points every service
//! and task goes through to route, write and read.
//!
//! [`LocalMember`] sits above the transport and pipeline modules (network, forward, batcher,
//! read index) and below the services and tasks, which each hold an `Arc<LocalMember>` (or only
//! the parts they need). Its fields are private; what the layers above may do with them is the
//! methods below:
//!
//! * **routing** — [`LocalMember::route`]: serve here (this member leads and has heard from a
//!   quorum), forward to the leader, or refuse with `UNAVAILABLE`;
//! * **commands and reads, routed** — [`LocalMember::execute`] and [`LocalMember::read`]: the
//!   one entry point both client APIs use. On the leader a command goes through the write
//!   batcher into Raft and a linearizable read waits for a shared ReadIndex round; on a
//!   follower the command or query itself goes to the leader's peer port (`Propose`, `Read`),
//!   so no API has forwarding code of its own;
//! * **watches** — the [`WatchHub`] serving this member's watch streams;
//! * **leases** — renewals and remaining time, on the leader (the [`Lessor`]) or through it;
//! * **identity and cluster** — node id, ordinal, addresses, the cluster id cell;
//! * **lifecycle** — the [`Phase`] readiness reports and whether requests are still taken;
//! * **membership bookkeeping** — the desired replica count and the reconciler's last status.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::v1 as pb;
use kvset_proto::v1::raft_client::RaftClient;
use kvset_storage::ClusterId;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use kvset_storage::LeaseId;
use kvset_storage::Member;
use kvset_storage::Raft;
use kvset_storage::RaftMetrics;
use kvset_storage::RaftMetricsRx;
use kvset_storage::SmReader;
use kvset_storage::WatchReceiver;
use openraft::ChangeMembers;
use tokio::sync::watch;

use crate::auth::Needs;
use crate::auth::TokenSecret;
use crate::batcher::Batcher;
use crate::channels::PeerChannels;
use crate::cluster_id::AdoptError;
use crate::cluster_id::ClusterIdCell;
use crate::config::Config;
use crate::config::ReplicasSource;
use crate::errors::KvError;
use crate::forward::peer_call_error;
use crate::forward::CallContext;
use crate::identity::AddressBook;
use crate::identity::Identity;
use crate::lessor::Leadership;
use crate::lessor::Lessor;
use crate::lessor::Renewal;
use crate::metrics::Metrics;
use crate::pb::response::HeaderInfo;
use crate::query::Answer;
use crate::query::Consistency;
use crate::query::Query;
use crate::query::QueryError;
use crate::read_index::ReadIndex;
use crate::watch_hub::WatchHub;
use crate::watch_types::StreamRequest;

/// A cluster administration call ([`LocalMember::administer`]).
pub type AdminCall = pb::admin_request::Call;
/// The answer to an [`AdminCall`].
pub type AdminResult = pb::admin_reply::Result;

/// Longest a leader transfer waits for another member to lead.
pub const TRANSFER_LEADER_BUDGET: Duration = Duration::from_secs(5);

/// The name of an administration call, for access-control refusals.
fn admin_call_name(call: &AdminCall) -> &'static str {
    match call {
        AdminCall::MemberList(_) => "Cluster.MemberList",
        AdminCall::SetReplicas(_) => "Cluster.SetReplicas",
        AdminCall::AddLearner(_) => "Cluster.AddLearner",
        AdminCall::Promote(_) => "Cluster.Promote",
        AdminCall::Remove(_) => "Cluster.Remove",
        AdminCall::TransferLeader(_) => "Cluster.TransferLeader",
    }
}

/// Lifecycle of a member, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Serving,
    ShuttingDown,
    Stopped,
}

/// Where a request that needs the leader goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This member is the leader.
    Local,
    /// Pass the request on to the leader, through its peer port.
    Forward { leader_id: u64 },
}

/// A member whose volume is past the space quota (etcd's NOSPACE alarm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceAlarm {
    pub node_id: u64,
    pub name: String,
    /// Bytes its volume held when last measured.
    pub bytes: u64,
    pub quota: u64,
}

impl std::fmt::Display for SpaceAlarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NOSPACE {}: its volume holds {} bytes, quota_bytes is {}",
            self.name, self.bytes, self.quota
        )
    }
}

/// When this member last became leader; kept by the Raft metrics task.
#[derive(Debug, Default)]
pub struct LeaderClock(Mutex<Option<Instant>>);

impl LeaderClock {
    /// Records whether this member leads now (starting the clock when it became leader).
    pub fn set_leader(&self, leader: bool) {
        let mut since = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match (leader, since.is_some()) {
            (true, false) => *since = Some(Instant::now()),
            (false, true) => *since = None,
            _ => {}
        }
    }

    /// How long this member has led, if it leads.
    pub fn led_for(&self) -> Option<Duration> {
        self.since().map(|t| t.elapsed())
    }

    /// Since when this member leads, if it leads.
    pub fn since(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the desired replica count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicasOrigin {
    /// The StatefulSet's `spec.replicas`.
    Kubernetes,
    /// The last `Cluster.SetReplicas`, from the replicated state.
    SetReplicas,
    /// Nothing set yet: `initial_replicas`.
    Initial,
}

impl std::fmt::Display for ReplicasOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicasOrigin::Kubernetes => "kubernetes",
            ReplicasOrigin::SetReplicas => "SetReplicas",
            ReplicasOrigin::Initial => "initial_replicas",
        })
    }
}

/// Everything [`LocalMember::new`] takes, built by `node.rs`.
#[allow(missing_debug_implementations)]
pub struct MemberParts {
    pub config: Config,
    pub identity: Identity,
    pub book: AddressBook,
    pub node_id: u64,
    pub cluster: ClusterIdCell,
    pub raft: Raft,
    pub reader: SmReader,
    pub metrics: Arc<Metrics>,
    pub channels: Arc<PeerChannels>,
    pub k8s_replicas: Arc<AtomicU32>,
    pub leadership: Arc<LeaderClock>,
    pub token_secret: TokenSecret,
}

/// The space alarms raised (this member's own, and on the leader every member's), shared by
/// the quota task, which sets them, and the write path, which refuses writes that add data
/// while one is raised.
#[derive(Debug)]
pub struct SpaceAlarms {
    raised: Mutex<Vec<SpaceAlarm>>,
    metrics: Arc<Metrics>,
}

impl SpaceAlarms {
    /// No alarm raised; the count is published in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { raised: Mutex::new(Vec::new()), metrics }
    }

    /// The raised alarms.
    pub fn get(&self) -> Vec<SpaceAlarm> {
        self.raised.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the raised alarms, logging changes.
    pub fn set(&self, alarms: Vec<SpaceAlarm>) {
        let mut current = self.raised.lock().unwrap_or_else(|e| e.into_inner());
        let names = |a: &[SpaceAlarm]| a.iter().map(|a| a.node_id).collect::<Vec<_>>();
        if names(&current) != names(&alarms) {
            if alarms.is_empty() {
                tracing::info!("space alarms cleared; writes are taken again");
            } else {
                let list: Vec<String> = alarms.iter().map(|a| a.to_string()).collect();
                tracing::warn!(alarms = ?list, "space alarm raised: writes that add data are refused");
            }
        }
        self.metrics.space_alarms.set(alarms.len() as i64);
        *current = alarms;
    }
}

/// What a background task that proposes commands holds (the compactor, the lease expirer):
/// whether, and in which term, this member leads, and proposing on it — nothing else of the
/// member (etcd's `RaftKV`, narrowed to what a task uses).
#[derive(Clone)]
pub struct Proposer(Arc<LocalMember>);

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").field("node_id", &self.0.node_id).finish()
    }
}

impl Proposer {
    /// The proposer of `member`.
    pub fn new(member: Arc<LocalMember>) -> Self {
        Self(member)
    }

    /// Whether this member leads with a quorum behind it (see [`LocalMember::route`]).
    pub fn leads(&self) -> bool {
        self.0.leads()
    }

    /// The term this member leads in, once it has applied its predecessors' log (see
    /// [`LocalMember::leading_term`]).
    pub fn leading_term(&self) -> Option<Leadership> {
        self.0.leading_term()
    }

    /// Proposes `command` on this member and waits for its result (see
    /// [`LocalMember::submit`]).
    pub async fn submit(&self, command: Command, deadline: Instant) -> Result<CommandResult, KvError> {
        self.0.submit(command, deadline).await
    }
}

/// This member: identity, Raft, the write and read pipelines, lifecycle. See the module docs.
pub struct LocalMember {
    /// The validated configuration it started with.
    config: Config,
    /// Pod name, StatefulSet name and ordinal.
    identity: Identity,
    /// Peer and client addresses of every ordinal.
    book: AddressBook,
    /// The Raft node id minted for this member's volume.
    node_id: u64,
    /// This member as the Raft membership records it.
    me: Member,
    /// The cluster id, recorded in the volume.
    cluster: ClusterIdCell,
    raft: Raft,
    /// Reads of the applied state machine.
    reader: SmReader,
    /// Client writes → Raft entries.
    batcher: Batcher,
    /// Shared ReadIndex rounds for linearizable reads.
    read_index: Arc<ReadIndex>,
    /// This member's watch streams.
    watch_hub: Arc<WatchHub>,
    /// Lease deadlines (meaningful while this member leads).
    lessor: Arc<Lessor>,
    metrics: Arc<Metrics>,
    /// Channels to other members (peer and client ports).
    channels: Arc<PeerChannels>,
    /// Clients for forwarding requests to the leader.
    /// What readiness reports.
    phase: watch::Sender<Phase>,
    /// What the membership task did last, for Status and logs.
    reconciler: Mutex<String>,
    /// Space alarms raised by the quota task (this member's own, and on the leader every
    /// member's): while any is raised, writes that add data are refused.
    alarms: Arc<SpaceAlarms>,
    /// Woken when a defragmentation was requested: the member stops so that its next start
    /// rewrites the database.
    defrag: tokio::sync::Notify,
    /// Set from the moment a defragmentation is being decided (see `request_defrag`).
    defrag_pending: Arc<AtomicBool>,
    /// When this member was created (its start), milliseconds since the Unix epoch.
    started_unix_ms: u64,
    /// Desired voter count from the Kubernetes API (when that is the source); 0 = unknown.
    k8s_replicas: Arc<AtomicU32>,
    /// Since when this member leads.
    leadership: Arc<LeaderClock>,
    /// Whether new client requests are taken (false once shutdown has drained the servers).
    accepting: AtomicBool,
    /// What token signatures depend on besides the replicated key (`auth.token_key_file`).
    token_secret: TokenSecret,
}

impl std::fmt::Debug for LocalMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMember")
            .field("name", &self.identity.name)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl LocalMember {
    /// Assembles the member from its parts and starts its write batcher.
    pub fn new(parts: MemberParts) -> Self {
        let MemberParts {
            config,
            identity,
            book,
            node_id,
            cluster,
            raft,
            reader,
            metrics,
            channels,
            k8s_replicas,
            leadership,
            token_secret,
        } = parts;
        let batcher = Batcher::start(raft.clone(), &config.batch, metrics.clone());
        let read_index =
            ReadIndex::new(raft.clone(), metrics.clone(), config.limits.pending_reads_max as usize);
        let me = book.member(identity.ordinal);
        let (phase, _) = watch::channel(Phase::Starting);
        let raft_metrics = raft.metrics();
        let (clock, min_election) = (leadership.clone(), config.raft.election_timeout_min_ms);
        // A leader cut off from every quorum counts as no leader, like a follower that lost its.
        let watch_hub = WatchHub::new(reader.clone(), config.watch.clone(), metrics.clone(), move || {
            let m = raft_metrics.borrow_watched();
            match m.current_leader {
                None => false,
                Some(id) if id == m.id => {
                    quorum_lost(millis_since_quorum_ack(&m), &clock, min_election).is_none()
                }
                Some(_) => true,
            }
        });
        let lessor = Lessor::new(Duration::from_millis(config.raft.election_timeout_max_ms));
        Self {
            watch_hub,
            lessor: Arc::new(lessor),
            config,
            identity,
            book,
            node_id,
            me,
            cluster,
            raft,
            reader,
            batcher,
            read_index,
            alarms: Arc::new(SpaceAlarms::new(Arc::clone(&metrics))),
            metrics,
            channels,
            phase,
            reconciler: Mutex::new(String::new()),
            defrag: tokio::sync::Notify::new(),
            defrag_pending: Arc::default(),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            k8s_replicas,
            leadership,
            accepting: AtomicBool::new(true),
            token_secret,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Pod name, set name and ordinal.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Addresses of every ordinal.
    pub fn book(&self) -> &AddressBook {
        &self.book
    }

    /// The Raft node id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// This member as the Raft membership records it.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Reads of the applied state machine.
    pub fn reader(&self) -> &SmReader {
        &self.reader
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Channels to other members.
    pub fn channels(&self) -> &Arc<PeerChannels> {
        &self.channels
    }

    /// What token signatures depend on besides the replicated key.
    pub fn token_secret(&self) -> &TokenSecret {
        &self.token_secret
    }

    /// The cluster id cell (shared with the peer network).
    pub fn cluster(&self) -> &ClusterIdCell {
        &self.cluster
    }

    /// The cluster id, if this member has one.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.cluster.get()
    }

    /// Records the cluster this member belongs to, in the volume first.
    pub async fn adopt_cluster(&self, id: ClusterId) -> Result<(), AdoptError> {
        self.cluster.adopt(id).await
    }

    /// A snapshot of openraft's metrics.
    pub fn raft_metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Header fields for responses produced here.
    pub fn header_info(&self) -> HeaderInfo {
        HeaderInfo {
            cluster_id: self.cluster.to_wire(),
            member_id: self.node_id,
            raft_term: self.raft.metrics().borrow_watched().current_term,
        }
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Follows the lifecycle phase (readiness).
    pub fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Moves to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Whether new client requests are taken.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Refuses every new request from now on (shutdown, after the servers drained).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// The leader this member knows of, with its client address.
    pub fn leader(&self) -> (Option<u64>, Option<String>) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
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
        quorum_lost(millis_since_quorum_ack, &self.leadership, self.config.raft.election_timeout_min_ms)
    }

    /// Decides where a leader-only request goes. A forwarded request is never forwarded again.
    pub fn route(&self, forwarded: bool) -> Result<Route, KvError> {
        if !self.accepting() {
            return Err(KvError::Stopping("member is shutting down".into()));
        }
        match self.leader() {
            (Some(id), _) if id == self.node_id => {
                // Without this check, writes to a cut-off leader would wait for their deadline.
                match self.quorum_lost_ms(millis_since_quorum_ack(&self.raft.metrics().borrow_watched())) {
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
            (Some(id), Some(_)) if !forwarded => Ok(Route::Forward { leader_id: id }),
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

    /// Whether this member leads and may serve leader-only requests now (see [`Self::route`]).
    pub fn leads(&self) -> bool {
        matches!(self.route(false), Ok(Route::Local))
    }

    /// The term this member leads in (and since when), once it has also applied everything
    /// committed before that term (the entry openraft appends when a leader takes over): only
    /// then is its lease table the cluster's. `None` otherwise.
    pub fn leading_term(&self) -> Option<Leadership> {
        if !self.leads() {
            return None;
        }
        let (term, applied_own_term) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.current_term, m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term))
        };
        applied_own_term
            .then(|| Leadership { term, since: self.leadership.since().unwrap_or_else(Instant::now) })
    }

    /// Proposes a write on this member (which believes it is the leader) and waits for its
    /// result until `deadline`. While a space alarm is raised, a write that adds data is
    /// refused (etcd's NOSPACE alarm); deletes, compaction and revokes still go through.
    pub async fn submit(&self, command: Command, deadline: Instant) -> Result<CommandResult, KvError> {
        if !self.accepting() {
            return Err(KvError::Stopping("member is shutting down".into()));
        }
        if command.adds_data() {
            if let Some(alarm) = self.alarms().first() {
                return Err(KvError::NoSpace(format!(
                    "{alarm}; delete keys, compact and defragment (or raise quota_bytes); reads, deletes and \
                     compaction still work"
                )));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.batcher.submit(command)).await {
            Err(_) => Err(KvError::DeadlineExceeded(
                "the write did not complete in time; it may still apply".into(),
            )),
            Ok(result) => result,
        }
    }

    /// Waits until a linearizable read may be served from the local state machine (ReadIndex
    /// on the leader), bounded by `deadline`. Concurrent reads share ReadIndex rounds.
    pub async fn read_barrier(&self, deadline: Instant) -> Result<(), KvError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.read_index.wait()).await {
            Err(_) => Err(KvError::DeadlineExceeded("could not confirm leadership in time".into())),
            Ok(result) => result,
        }
    }

    /// The desired number of voters and where it came from.
    pub fn desired_replicas(&self) -> (u32, ReplicasOrigin) {
        if self.config.replicas_source == ReplicasSource::Kubernetes {
            let n = self.k8s_replicas.load(Ordering::Acquire);
            if n > 0 {
                return (n, ReplicasOrigin::Kubernetes);
            }
        }
        match self.reader.applied().replicas {
            Some(n) => (n, ReplicasOrigin::SetReplicas),
            None => (self.config.initial_replicas, ReplicasOrigin::Initial),
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

    /// Records a defragmentation request on the volume (durably) and asks the member to stop;
    /// the next start rewrites the database before opening it. `budget` bounds the wait for
    /// the snapshot and log purge that come first (the caller's deadline).
    ///
    /// Runs on a task of its own, so a caller that goes away cannot leave a request recorded
    /// but the member running. From the moment it is decided the member reports itself as
    /// shutting down, so another member asked next refuses (one at a time).
    pub async fn request_defrag(self: &Arc<Self>, budget: Duration) -> Result<(), KvError> {
        if !self.accepting() {
            return Err(KvError::Stopping("member is shutting down".into()));
        }
        if self.defrag_pending.swap(true, Ordering::AcqRel) {
            return Err(KvError::FailedPrecondition(
                "a defragmentation of this member is already under way".into(),
            ));
        }
        let member = self.clone();
        let task = tokio::spawn(async move {
            let decided = async {
                member.others_serving().await?;
                member.compact_raft_log(budget.saturating_sub(Duration::from_secs(1))).await?;
                // Asked at the same time as another member, which may have passed its check
                // meanwhile: check again, now that this member reports itself as stopping.
                member.others_serving().await
            };
            if let Err(e) = decided.await {
                member.defrag_pending.store(false, Ordering::Release);
                return Err(e);
            }
            let dir = member.config.data_dir.clone();
            tokio::task::spawn_blocking(move || kvset_storage::defrag::request(&dir))
                .await
                .map_err(|e| KvError::Internal(e.to_string()))?
                .map_err(|e| {
                    KvError::Internal(format!("recording the defragmentation request failed: {e}"))
                })?;
            tracing::warn!("defragmentation requested: this member stops, defragments and starts again");
            member.defrag.notify_one();
            Ok(())
        });
        task.await.map_err(|e| KvError::Internal(e.to_string()))?
    }

    /// Whether this member is stopping to be defragmented (it then reports itself as shutting
    /// down); shared so a supervisor can tell after the member stopped.
    pub fn defrag_flag(&self) -> Arc<AtomicBool> {
        self.defrag_pending.clone()
    }

    /// When this member started, milliseconds since the Unix epoch.
    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }

    /// Refuses a defragmentation while another voter is not serving (stopped, shutting down,
    /// itself defragmenting, unreachable): members are defragmented one at a time, so the
    /// cluster keeps its quorum (etcd's `defrag --cluster` asks every member within
    /// milliseconds, and a kvset member answers before it stops).
    async fn others_serving(&self) -> Result<(), KvError> {
        let others: Vec<(String, String)> = {
            let metrics = self.raft_metrics();
            let membership = metrics.membership_config.membership();
            membership
                .voter_ids()
                .filter(|id| *id != self.node_id())
                .filter_map(|id| membership.get_node(&id).map(|n| (n.name.clone(), n.client_addr.clone())))
                .collect()
        };
        for (name, addr) in others {
            let serving = match self.channels.status_client(&name, &addr) {
                Ok(mut client) => {
                    let reply = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.status(kvset_proto::v1::StatusRequest { digest: false }),
                    )
                    .await;
                    match reply {
                        Ok(Ok(r)) => {
                            let r = r.into_inner();
                            r.role != kvset_proto::v1::Role::Shutdown as i32 && r.leader_id != 0
                        }
                        _ => false,
                    }
                }
                Err(_) => false,
            };
            if !serving {
                return Err(KvError::FailedPrecondition(format!(
                    "defragment one member at a time: {name} is not serving now (stopped, shutting down, \
                     defragmenting or unreachable); try again once it is back"
                )));
            }
        }
        Ok(())
    }

    /// For a leader: hands leadership to voter `to`, or for `None` to the most up-to-date other
    /// voter, and waits (up to `budget`) until another member leads. Returns the new leader's
    /// node id. From the moment the transfer starts this member proposes nothing (writes get
    /// `UNAVAILABLE` with the new leader's hint); if the target does not take over, the
    /// followers' election timers elect a leader as after a crash, so a failed transfer costs no
    /// more than a stop without one.
    pub async fn transfer_leadership(&self, to: Option<u64>, budget: Duration) -> Result<u64, KvError> {
        let started = Instant::now();
        let m = self.raft_metrics();
        if m.current_leader != Some(self.node_id) {
            return Err(KvError::NoLeader {
                leader_id: m.current_leader,
                leader_addr: None,
                reason: "only the leader can hand over leadership".into(),
            });
        }
        let others: Vec<u64> =
            m.membership_config.membership().voter_ids().filter(|v| *v != self.node_id).collect();
        let target = match to {
            Some(id) if id == self.node_id => return Ok(id),
            Some(id) if others.contains(&id) => id,
            Some(id) => {
                return Err(KvError::FailedPrecondition(format!("node {id} is not a voter of this cluster")))
            }
            None => most_up_to_date(&m, &others)
                .ok_or_else(|| KvError::FailedPrecondition("no other voter to hand leadership to".into()))?,
        };
        // The target campaigns only if its log holds all of the leader's: give it a moment to
        // catch up (under load it is within a batch or two), then hand over anyway.
        let mut rx = self.raft.metrics();
        let catch_up = budget.min(Duration::from_millis(self.config.raft.election_timeout_min_ms));
        let _ = tokio::time::timeout(
            catch_up,
            metrics_until(&mut rx, |m| matched_index(m, target) >= m.last_log_index.unwrap_or(0)),
        )
        .await;
        tracing::info!(to = target, "handing leadership over");
        self.raft.trigger().transfer_leader(target).await.map_err(|e| crate::errors::stopped(&e))?;
        let me = self.node_id;
        let left = budget.saturating_sub(started.elapsed());
        let moved =
            tokio::time::timeout(left, metrics_until(&mut rx, |m| m.current_leader.is_some_and(|l| l != me)))
                .await;
        match moved {
            Ok(true) => {
                let leader = rx.borrow_watched().current_leader.unwrap_or(target);
                self.metrics.leader_transfers.inc();
                tracing::info!(leader, elapsed_ms = started.elapsed().as_millis() as u64, "leadership handed over");
                Ok(leader)
            }
            Ok(false) => Err(KvError::Stopping("raft stopped".into())),
            Err(_) => Err(KvError::Unavailable(format!(
                "leadership did not move to node {target} within {} ms; the members elect a leader by themselves",
                budget.as_millis()
            ))),
        }
    }

    /// Builds a snapshot of the applied state and purges this member's Raft log up to it, so
    /// that a defragmentation keeps only what is still needed (the log of large writes would
    /// otherwise stay). Bounded: a purge that waits on a replication in progress is left to
    /// happen later.
    async fn compact_raft_log(&self, budget: Duration) -> Result<(), KvError> {
        let raft = self.raft();
        let applied = raft.metrics().borrow_watched().last_applied;
        let Some(target) = applied else { return Ok(()) };
        raft.trigger().snapshot().await.map_err(|e| crate::errors::stopped(&e))?;
        let mut rx = raft.metrics();
        let built = tokio::time::timeout(budget, async {
            metrics_until(&mut rx, |m| m.snapshot.is_some_and(|s| s.index >= target.index)).await
        })
        .await
        .unwrap_or(false);
        if !built {
            // Not fatal: the defragmentation still returns the space of compacted history; the
            // log is purged at a later snapshot.
            tracing::warn!("the snapshot before the defragmentation was not built in time; defragmenting without a log purge");
            return Ok(());
        }
        raft.trigger().purge_log(target.index).await.map_err(|e| crate::errors::stopped(&e))?;
        let purged = tokio::time::timeout(budget.min(Duration::from_secs(10)), async {
            metrics_until(&mut rx, |m| m.purged.is_some_and(|p| p.index >= target.index)).await
        })
        .await
        .unwrap_or(false);
        if !purged {
            tracing::warn!(
                "the Raft log was not purged within 10 s (a replication in progress); defragmenting anyway"
            );
        }
        Ok(())
    }

    /// Completes once a defragmentation was requested.
    pub async fn defrag_requested(&self) {
        self.defrag.notified().await
    }

    /// The raised space alarms.
    pub fn alarms(&self) -> Vec<SpaceAlarm> {
        self.alarms.get()
    }

    /// The cell of raised space alarms (the quota task sets it).
    pub fn alarm_cell(&self) -> &Arc<SpaceAlarms> {
        &self.alarms
    }

    /// What the membership task did last.
    pub fn reconciler_status(&self) -> String {
        self.reconciler.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// This member's watch streams.
    pub fn watch_hub(&self) -> &Arc<WatchHub> {
        &self.watch_hub
    }

    /// The lease deadlines (meaningful while this member leads).
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.lessor
    }

    /// The caller of a request, by this member's applied users and roles: `None` while
    /// authentication is disabled.
    pub fn caller(&self, ctx: &CallContext) -> Result<Option<String>, KvError> {
        crate::auth::caller(&self.reader.auth(), &self.token_secret, &ctx.credentials)
    }

    /// Refuses the request unless its caller has what `needs` asks (`crate::auth`); requests a
    /// member vouches for were checked there. `what` names the request.
    pub fn authorize(&self, ctx: &CallContext, needs: &Needs, what: &str) -> Result<(), KvError> {
        self.authorize_with(ctx, what, || needs.clone()).map(|_| ())
    }

    /// Whether another member checked this request's caller: it came over the peer port, from a
    /// current member when TLS says who (without TLS on the peer port there is nothing to
    /// tell). Nothing that arrives on the client port is vouched for.
    fn vouched(&self, ctx: &CallContext) -> bool {
        match (ctx.from_peer_port, ctx.member) {
            (true, None) => true,
            (true, Some(ordinal)) => self.is_current_ordinal(ordinal),
            (false, _) => false,
        }
    }

    /// Whether ordinal `ordinal` is in the membership now (a retired ordinal's certificate
    /// vouches for nothing).
    pub fn is_current_ordinal(&self, ordinal: u32) -> bool {
        let name = self.identity.sibling(ordinal);
        self.raft_metrics().membership_config.membership().nodes().any(|(_, n)| n.name == name)
    }

    /// [`Self::authorize`] with the needs computed only when access control is on. Returns the
    /// caller it checked: `None` while access control is off, or for a request another member
    /// checked and that names no caller.
    fn authorize_with(
        &self,
        ctx: &CallContext,
        what: &str,
        needs: impl FnOnce() -> Needs,
    ) -> Result<Option<String>, KvError> {
        let state = self.reader.auth();
        if !state.enabled {
            return Ok(None);
        }
        let user = if self.vouched(ctx) {
            // Checked by the member that received it; checked again here when it names its
            // caller (forwarded reads: this member's users, roles and lease keys are the newest).
            match &ctx.user {
                Some(user) => Some(user.clone()),
                None => return Ok(None),
            }
        } else {
            crate::auth::caller(&state, &self.token_secret, &ctx.credentials)?
        };
        crate::auth::check(&state, user.as_deref(), &needs(), what)?;
        Ok(user)
    }

    /// A watch request as the caller may make it: a create on a range it may not read is
    /// answered canceled ("permission denied"), as etcd does.
    pub fn guard_watch(&self, ctx: &CallContext, request: StreamRequest) -> StreamRequest {
        match request {
            StreamRequest::Create(spec) => {
                match self.authorize(ctx, &Needs::read(&spec.range), "watch this range") {
                    Ok(()) => StreamRequest::Create(spec),
                    Err(e) => StreamRequest::Refuse {
                        watch_id: spec.watch_id.unwrap_or(-1),
                        reason: match e {
                            KvError::PermissionDenied(_) => "etcdserver: permission denied".into(),
                            other => other.to_string(),
                        },
                    },
                }
            }
            other => other,
        }
    }

    /// The name (`<set>-<N>`) of the member with Raft id `node_id`, if it is in the membership.
    pub fn member_name(&self, node_id: u64) -> Option<String> {
        self.raft_metrics().membership_config.membership().get_node(&node_id).map(|n| n.name.clone())
    }

    /// A peer-service client for the leader `leader_id`, with its peer address.
    fn leader_peer(
        &self,
        leader_id: u64,
    ) -> Result<(String, RaftClient<tonic::transport::Channel>), KvError> {
        let (name, peer) = self
            .raft_metrics()
            .membership_config
            .membership()
            .get_node(&leader_id)
            .map(|n| (n.name.clone(), n.peer_addr.clone()))
            .ok_or_else(|| {
                KvError::Unavailable(format!("the peer address of leader {leader_id} is unknown"))
            })?;
        let channel =
            self.channels.get(&name, &peer).map_err(|e| KvError::Unavailable(format!("leader {e}")))?;
        let limit = usize::try_from(self.config.limits.forward_response_max_bytes).unwrap_or(usize::MAX);
        Ok((peer, RaftClient::new(channel).max_decoding_message_size(limit)))
    }

    /// Calls the leader's peer port with the caller's deadline and maps what comes back: the
    /// leader's answer, or its error (carried as data in the reply, see [`PeerReply`]). A gRPC
    /// status is never the leader's answer: nothing was sent (a connection that could not be
    /// made: retry elsewhere), or the answer was lost or could not be read — for a write, whose
    /// command the leader may have applied, the outcome is unknown.
    async fn on_leader_peer<T: PeerReply>(
        &self,
        leader_id: u64,
        deadline: Instant,
        write: bool,
        call: impl AsyncFnOnce(
            RaftClient<tonic::transport::Channel>,
            Duration,
        ) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, KvError> {
        let (peer, client) = self.leader_peer(leader_id)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, call(client, left)).await {
            Err(_) if write => Err(KvError::DeadlineExceeded(
                "the leader did not answer in time; the write may still apply".into(),
            )),
            Err(_) => Err(KvError::DeadlineExceeded("the leader did not answer in time".into())),
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                match KvError::from_wire(reply.error()) {
                    None => Ok(reply),
                    Some(Ok(error)) => Err(error),
                    Some(Err(e)) if write => Err(KvError::Indeterminate(format!(
                        "the leader's error from {peer} is unreadable: {e}"
                    ))),
                    Some(Err(e)) => Err(KvError::Unavailable(format!(
                        "the leader's error from {peer} is unreadable: {e}"
                    ))),
                }
            }
            Ok(Err(status)) => Err(peer_call_error(status, &peer, write)),
        }
    }

    /// Runs a command on the leader (here, or sent to its peer port) and waits for its result
    /// until `ctx.deadline`. A command refused by the state machine is an `Ok` result
    /// ([`CommandResult::Rejected`]), for each API to word.
    pub async fn execute(&self, command: Command, ctx: &CallContext) -> Result<CommandResult, KvError> {
        let user = self.authorize_with(ctx, command_name(&command), || {
            Needs::of_command(&command, |id| {
                self.reader.lease(id).ok().flatten().map(|(_, keys)| keys).unwrap_or_default()
            })
        })?;
        // Checked here on this member's view; checked again when it applies, against the users,
        // roles and lease keys of that moment (a lagging member's view, or a key attached to a
        // lease meanwhile, must not let it through).
        let command = match user {
            Some(user) if !matches!(command, Command::AsUser { .. }) => {
                Command::AsUser { user, command: Box::new(command) }
            }
            _ => command,
        };
        let leader_id = match self.route(ctx.from_peer_port)? {
            Route::Local => {
                let prepared = self.on_leader(command.clone())?;
                match self.submit(prepared, ctx.deadline).await {
                    // Leadership moved before the entry was appended: nothing was applied, so
                    // the new leader may take it (once).
                    Err(KvError::NoLeader { leader_id: Some(id), .. })
                        if !ctx.from_peer_port && id != self.node_id =>
                    {
                        id
                    }
                    done => return done,
                }
            }
            Route::Forward { leader_id } => leader_id,
        };
        let bytes = kvset_storage::codec::encode("command", &command)
            .map_err(|e| KvError::Internal(e.to_string()))?;
        let cluster_id = self.cluster.to_wire();
        let reply = self
            .on_leader_peer(leader_id, ctx.deadline, true, async move |mut c, left| {
                let mut req = tonic::Request::new(pb::ProposeRequest { cluster_id, command: bytes });
                req.set_timeout(left);
                c.propose(req).await
            })
            .await?;
        let result = kvset_storage::codec::decode("command result", &reply.result)
            .map_err(|e| KvError::Indeterminate(format!("undecodable result from the leader: {e}")))?;
        self.catch_up_to(reply.applied_index, ctx.deadline).await;
        Ok(result)
    }

    /// Runs a cluster administration call (membership, leader transfer, replicas) on the
    /// leader: here when this member leads, else through the leader's peer port
    /// (`Raft.Admin`), the same way as commands and reads, with the leader's error as data.
    /// Every call but the member list needs an administrator: checked here, and again on the
    /// leader against its own users and roles. A change whose answer is lost is UNKNOWN.
    pub async fn administer(&self, call: AdminCall, ctx: &CallContext) -> Result<AdminResult, KvError> {
        let write = !matches!(call, AdminCall::MemberList(_));
        let user = if write { self.authorize_with(ctx, admin_call_name(&call), Needs::admin)? } else { None };
        match self.route(ctx.from_peer_port)? {
            Route::Local => self.administer_here(call, ctx.deadline).await,
            Route::Forward { leader_id } => {
                let cluster_id = self.cluster.to_wire();
                let reply = self
                    .on_leader_peer(leader_id, ctx.deadline, write, async move |mut c, left| {
                        let user = user.unwrap_or_default();
                        let mut req =
                            tonic::Request::new(pb::AdminRequest { cluster_id, call: Some(call), user });
                        req.set_timeout(left);
                        c.admin(req).await
                    })
                    .await?;
                reply.result.ok_or_else(|| {
                    let what = "the leader answered neither a result nor an error";
                    if write {
                        KvError::Indeterminate(what.into())
                    } else {
                        KvError::Internal(what.into())
                    }
                })
            }
        }
    }

    /// [`Self::administer`] on this member, the leader.
    async fn administer_here(&self, call: AdminCall, deadline: Instant) -> Result<AdminResult, KvError> {
        match call {
            AdminCall::MemberList(_) => {
                self.read_barrier(deadline).await?;
                Ok(AdminResult::MemberList(pb::MemberListResponse {
                    cluster_id: self.cluster.to_wire(),
                    leader_id: self.node_id,
                    members: self.member_list(),
                }))
            }
            AdminCall::SetReplicas(r) => match self.submit(Command::SetReplicas(r.replicas), deadline).await?
            {
                CommandResult::SetReplicas { replicas, .. } => {
                    Ok(AdminResult::SetReplicas(pb::SetReplicasResponse { replicas }))
                }
                other => Err(KvError::Internal(format!("unexpected result {other:?}"))),
            },
            AdminCall::AddLearner(r) => {
                let node = Member {
                    ordinal: r.ordinal,
                    name: self.identity.sibling(r.ordinal),
                    peer_addr: r.peer_addr,
                    client_addr: r.client_addr,
                };
                self.raft
                    .add_learner(r.node_id, node, false)
                    .await
                    .map_err(|e| crate::errors::membership_change(&e))?;
                Ok(AdminResult::AddLearner(pb::AddLearnerResponse { members: self.member_list() }))
            }
            AdminCall::Promote(r) => {
                let id = r.node_id;
                let m = self.raft_metrics();
                let membership = m.membership_config.membership();
                if membership.get_node(&id).is_none() {
                    return Err(KvError::FailedPrecondition(format!(
                        "node {id} is not a learner of this cluster"
                    )));
                }
                if !membership.voter_ids().any(|v| v == id) {
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                        .map_err(|e| crate::errors::membership_change(&e))?;
                }
                Ok(AdminResult::Promote(pb::PromoteResponse { members: self.member_list() }))
            }
            AdminCall::Remove(r) => {
                let id = r.node_id;
                let m = self.raft_metrics();
                let membership = m.membership_config.membership();
                if membership.get_node(&id).is_none() {
                    return Err(KvError::FailedPrecondition(format!(
                        "node {id} is not a member of this cluster"
                    )));
                }
                let voters: BTreeSet<u64> = membership.voter_ids().collect();
                let change = if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(KvError::FailedPrecondition("refusing to remove the last voter".into()));
                    }
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(|e| crate::errors::membership_change(&e))?;
                Ok(AdminResult::Remove(pb::RemoveResponse { members: self.member_list() }))
            }
            AdminCall::TransferLeader(r) => {
                let to = (r.node_id != 0).then_some(r.node_id);
                let budget = deadline.saturating_duration_since(Instant::now()).min(TRANSFER_LEADER_BUDGET);
                let leader_id = self.transfer_leadership(to, budget).await?;
                Ok(AdminResult::TransferLeader(pb::TransferLeaderResponse { leader_id }))
            }
        }
    }

    /// The members of the current configuration, as this member sees them (ordinal order),
    /// with how far the leader knows each has replicated.
    pub fn member_list(&self) -> Vec<pb::Member> {
        let m = self.raft_metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let mut out: Vec<pb::Member> = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                node_id: *id,
                ordinal: node.ordinal,
                name: node.name.clone(),
                peer_addr: node.peer_addr.clone(),
                client_addr: node.client_addr.clone(),
                voter: voters.contains(id),
                matched_index: if *id == self.node_id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    m.replication.as_ref().and_then(|r| r.get(id).copied().flatten()).map_or(0, |l| l.index)
                },
            })
            .collect();
        out.sort_by_key(|m| (m.ordinal, m.node_id));
        out
    }

    /// Waits for this member to apply the log up to `index`, so that a client that wrote
    /// through it reads its own write from it, as etcd's member that answers a write has
    /// applied it. A member that cannot catch up in time (cut off from the leader's
    /// replication) still answers, leaving the answer time to reach the client before its
    /// deadline: the write is committed, and losing its answer would be worse than a stale
    /// local read.
    async fn catch_up_to(&self, index: u64, deadline: Instant) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let left = remaining.saturating_sub((remaining / 2).min(Duration::from_millis(500)));
        if let Err(e) =
            self.raft.wait(Some(left)).applied_index_at_least(Some(index), "forwarded write").await
        {
            tracing::debug!(index, error = %e, "answering a forwarded write before applying it here");
        }
    }

    /// What only the leader decides about a command before proposing it: the id of a new lease
    /// (0: the leader picks one) and the lease-count limit.
    fn on_leader(&self, command: Command) -> Result<Command, KvError> {
        match command {
            Command::LeaseGrant { id, ttl } => {
                let max = self.config.lease.max_leases;
                let held = self.reader.leases().len() as u64;
                if held >= max {
                    return Err(KvError::LimitReached(format!(
                        "the cluster holds {held} leases, the limit lease.max_leases = {max}"
                    )));
                }
                let id = if id == 0 { self.new_lease_id() } else { id };
                Ok(Command::LeaseGrant { id, ttl })
            }
            Command::AsUser { user, command } => {
                Ok(Command::AsUser { user, command: Box::new(self.on_leader(*command)?) })
            }
            other => Ok(other),
        }
    }

    /// Answers a query at the requested consistency: serializable from this member's own
    /// state; linearizable on the leader after a ReadIndex round (here, or sent to its peer
    /// port). Queries that need the leader's memory (lease TTLs) always go to the leader.
    pub async fn read(
        &self,
        query: Query,
        consistency: Consistency,
        ctx: &CallContext,
    ) -> Result<Result<Answer, QueryError>, KvError> {
        let user = self.authorize_with(ctx, "read", || {
            crate::auth::needs_of_query(&query, |id| {
                self.reader.lease(id).ok().flatten().map(|(_, keys)| keys).unwrap_or_default()
            })
        })?;
        if consistency == Consistency::Serializable && !query.needs_leader() {
            return self.answer_here(query).await;
        }
        match self.route(ctx.from_peer_port)? {
            Route::Local => {
                self.read_barrier(ctx.deadline).await?;
                self.answer_here(query).await
            }
            Route::Forward { leader_id } => {
                let bytes = kvset_storage::codec::encode("query", &query)
                    .map_err(|e| KvError::Internal(e.to_string()))?;
                let cluster_id = self.cluster.to_wire();
                let reply = self
                    .on_leader_peer(leader_id, ctx.deadline, false, async move |mut c, left| {
                        let user = user.unwrap_or_default();
                        let mut req = tonic::Request::new(pb::ReadRequest { cluster_id, query: bytes, user });
                        req.set_timeout(left);
                        c.read(req).await
                    })
                    .await?;
                kvset_storage::codec::decode("answer", &reply.answer)
                    .map_err(|e| KvError::Internal(format!("undecodable answer from the leader: {e}")))
            }
        }
    }

    /// Answers a query from this member's state (scans on the blocking pool).
    async fn answer_here(&self, query: Query) -> Result<Result<Answer, QueryError>, KvError> {
        if !query.is_scan() {
            return Ok(query.answer(&self.reader, |id| self.lessor.remaining(id, Instant::now())));
        }
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || query.answer(&reader, |_| None))
            .await
            .map_err(|e| KvError::Internal(e.to_string()))
    }

    /// Renews lease `id`: here when this member leads (see [`Self::renew_lease_here`]),
    /// else on the leader through its peer port. Returns the lease's TTL, 0 when it does not
    /// exist.
    pub async fn renew_lease(&self, id: LeaseId, deadline: Instant) -> Result<i64, KvError> {
        match self.route(false)? {
            Route::Local => self.renew_lease_here(id, deadline).await,
            Route::Forward { leader_id } => {
                let cluster_id = self.cluster.to_wire();
                let reply = self
                    .on_leader_peer(leader_id, deadline, false, async move |mut c, left| {
                        let mut req = tonic::Request::new(pb::LeaseRenewRequest { cluster_id, id });
                        req.set_timeout(left);
                        c.lease_renew(req).await
                    })
                    .await?;
                Ok(reply.ttl_seconds)
            }
        }
    }

    /// Renews lease `id` on this member, which must lead and have heard from a quorum within
    /// the minimum election timeout (the rule of [`Self::route`]). No ReadIndex round: as in
    /// etcd, a renewal changes no replicated state, and a leader deposed without knowing it is
    /// covered by the extension every new leader gives every lease. Waits, until `deadline`:
    ///
    /// * for a new leader to have applied what was committed before its term (etcd waits for
    ///   its applied index): before that its lease table may lack a lease the old leader
    ///   granted, and "not found" would end a lease whose holder keeps renewing;
    /// * for an expired lease's revoke to apply, then answers 0 ("not found"), as etcd's
    ///   `Renew` does: never a TTL for a lease whose keys are about to be deleted.
    ///
    /// Out of time, or no longer leading, it answers `UNAVAILABLE` (clients retry).
    pub async fn renew_lease_here(&self, id: LeaseId, deadline: Instant) -> Result<i64, KvError> {
        let retry =
            |why: &str| KvError::Unavailable(format!("lease {id} cannot be renewed here now: {why}; retry"));
        loop {
            if let Route::Forward { .. } = self.route(true)? {
                return Err(KvError::Unavailable("not the leader".into()));
            }
            let Some(leading) = self.leading_term() else {
                self.wait_metrics_until(deadline, |m| {
                    m.current_leader != Some(m.id)
                        || m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term)
                })
                .await
                .map_err(|()| retry("this new leader is still applying the log it inherited"))?;
                continue;
            };
            let table = self.reader.leases();
            let grant = table.get(&id).map(|l| l.grant);
            match self.lessor.renew(id, leading, &table, Instant::now()) {
                Renewal::Renewed(ttl) => return Ok(ttl),
                Renewal::NotFound => return Ok(0),
                Renewal::Expired => {
                    // Wait for this grant of the lease to leave the table (its revoke applied).
                    let reader = self.reader.clone();
                    let gone = move || reader.leases().get(&id).map(|l| l.grant) != grant;
                    self.wait_metrics_until(deadline, |m| m.current_leader != Some(m.id) || gone())
                        .await
                        .map_err(|()| retry("it expired and its revoke has not applied yet"))?;
                    if self.reader.leases().get(&id).map(|l| l.grant) != grant {
                        return Ok(0);
                    }
                    return Err(retry("its leader changed while it expired"));
                }
            }
        }
    }

    /// Waits until `done` holds for openraft's metrics (checked at each change of them), or
    /// `deadline`.
    async fn wait_metrics_until(
        &self,
        deadline: Instant,
        done: impl Fn(&RaftMetrics) -> bool,
    ) -> Result<(), ()> {
        let mut rx = self.raft.metrics();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, metrics_until(&mut rx, done)).await {
            Ok(true) => Ok(()),
            _ => Err(()),
        }
    }

    /// A lease id for a new lease: random, positive, not in use.
    pub fn new_lease_id(&self) -> LeaseId {
        let table = self.reader.leases();
        loop {
            let id = (rand::random::<u64>() >> 1) as LeaseId;
            if id != 0 && !table.contains_key(&id) {
                return id;
            }
        }
    }
}

/// A reply of the leader's peer port that carries the leader's error as data.
pub trait PeerReply {
    /// The encoded [`crate::errors::WireError`], empty when the call succeeded.
    fn error(&self) -> &[u8];
}

impl PeerReply for pb::ProposeReply {
    fn error(&self) -> &[u8] {
        &self.error
    }
}

impl PeerReply for pb::ReadReply {
    fn error(&self) -> &[u8] {
        &self.error
    }
}

impl PeerReply for pb::AdminReply {
    fn error(&self) -> &[u8] {
        &self.error
    }
}

impl PeerReply for pb::LeaseRenewReply {
    fn error(&self) -> &[u8] {
        &self.error
    }
}

/// Waits until openraft's metrics satisfy `pred`. False if Raft stopped first.
pub async fn metrics_until(rx: &mut RaftMetricsRx, pred: impl Fn(&RaftMetrics) -> bool) -> bool {
    loop {
        if pred(&rx.borrow_watched()) {
            return true;
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

/// See [`LocalMember::quorum_lost_ms`].
fn quorum_lost(
    millis_since_quorum_ack: Option<u64>,
    leadership: &LeaderClock,
    min_election_ms: u64,
) -> Option<u64> {
    let ms = millis_since_quorum_ack.or_else(|| leadership.led_for().map(|d| d.as_millis() as u64))?;
    (ms > min_election_ms).then_some(ms)
}

/// For a leader: the log index `node` is known to hold (its own last index for itself).
fn matched_index(m: &RaftMetrics, node: u64) -> u64 {
    if node == m.id {
        return m.last_log_index.unwrap_or(0);
    }
    m.replication.as_ref().and_then(|r| r.get(&node)).and_then(|l| l.as_ref()).map_or(0, |l| l.index)
}

/// Of `voters`, the one whose log the leader knows to reach furthest (the lowest id on a tie).
fn most_up_to_date(m: &RaftMetrics, voters: &[u64]) -> Option<u64> {
    voters.iter().copied().max_by_key(|v| (matched_index(m, *v), std::cmp::Reverse(*v)))
}

/// For a leader: milliseconds since a quorum last acknowledged it, `None` if none has yet. A
/// sole voter is its own quorum.
pub fn millis_since_quorum_ack(m: &RaftMetrics) -> Option<u64> {
    use openraft::async_runtime::Instant;
    let mut voters = m.membership_config.membership().voter_ids();
    if voters.next() == Some(m.id) && voters.next().is_none() {
        return Some(0);
    }
    m.last_quorum_acked.as_ref().map(|t| t.elapsed().as_millis() as u64)
}

/// The committed log index, computed on the leader from replication progress.
pub fn commit_index(m: &RaftMetrics) -> Option<u64> {
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

/// A command's name in refusals and logs.
fn command_name(command: &Command) -> &'static str {
    match command.inner() {
        Command::Put(_) => "put",
        Command::Delete(_) => "delete",
        Command::Txn(_) => "run this transaction",
        Command::SetReplicas(_) => "set replicas",
        Command::Compact(_) => "compact",
        Command::LeaseGrant { .. } => "grant a lease",
        Command::LeaseRevoke(_) => "revoke this lease",
        Command::Auth(_) => "manage users and roles",
        Command::AsUser { .. } => "run this command",
    }
}
