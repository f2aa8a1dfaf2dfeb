//! Prometheus metrics of one member, served as text on the ops port at `/metrics`.
//!
//! Families (all prefixed `kvset_`):
//!
//! * Raft: `raft_term`, `raft_is_leader`, `raft_state{state}`, `raft_last_log_index`,
//!   `raft_applied_index`, `raft_commit_index` (leader only: the quorum-matched index),
//!   `raft_snapshot_index`, `raft_purged_index`, `raft_voters`, `raft_learners`,
//!   `raft_leader_changes_total`, `raft_elections_total` (times this member became candidate),
//!   `raft_leader_transfers_total` (leadership this member handed over, on request or at shutdown),
//!   `raft_has_leader` (1 while this member knows a leader; etcd's `etcd_server_has_leader`),
//!   `membership_changes_total` (changes made by this member's reconciler).
//! * The leader's view of the others (leader only, cleared elsewhere):
//!   `member_lag_entries{member}` (the leader's last log index minus the member's matched index),
//!   `member_last_ack_seconds{member}` (since the member last acknowledged a heartbeat or an
//!   append).
//! * Membership reconciler (leader only): `membership_reconciler_state{state}` (1 for the current
//!   one of `in_sync`, `changing`, `waiting`, `no_quorum`; 0 on other members),
//!   `membership_out_of_sync_seconds` (how long the reconciler has not been in sync; 0 in sync).
//! * Client gRPC: `grpc_requests_total{method,code}`, `grpc_request_duration_seconds{method}`.
//! * Peer RPCs sent: `peer_rpcs_total{rpc,result}`, `peer_rpc_duration_seconds{rpc}`.
//! * Write path: `batch_commands` (commands per Raft entry), `batch_bytes`,
//!   `proposals_failed_total` (Raft entries this member proposed as leader that were not
//!   committed: leadership lost, Raft stopped; etcd's `etcd_server_proposals_failed_total`),
//!   `commands_applied_total` (client writes applied to this member's state machine: the
//!   cluster's write rate, the same on every member),
//!   `log_flush_seconds`, `log_flush_appends` (appends covered by one fsync: openraft issues the
//!   next append without waiting for the previous one's flush),
//!   `vote_flush_seconds`, `apply_seconds`.
//! * Read path: `read_index_reads` (linearizable reads served per ReadIndex round).
//! * Snapshots: `snapshots_total{kind="built"|"installed"|"rejected"}`, `snapshot_bytes`.
//! * Watch and leases: `watches` (open on this member), `watch_events_total`, `leases` (in the
//!   applied state), `leases_expired_total`, `compactions_total` (automatic, proposed by this
//!   member).
//! * Volume: `volume_bytes` (every file under the data directory; refreshed every few seconds
//!   by a background task, and the figure `Cluster.Status` reports); `quota_bytes` (the
//!   configured `quota_bytes`, 0 for none); `space_alarms` (NOSPACE alarms this member knows
//!   of, see `tasks::quota`).
//! * Lifecycle: `ready` (1 while `/readyz` answers 200).
//! * TLS: `tls_connections_refused_total{port,reason}`,
//!   `tls_certificate_expiry_timestamp_seconds{cert="member"|"ca"}` (when the member's
//!   certificate, and the earliest-expiring CA it trusts, stop being valid; Unix seconds;
//!   absent without TLS).
//!
//! Besides the registry, [`Traffic`] keeps the client requests of this member by kind (writes,
//! reads) with latency buckets of its own: the ops page's charts are drawn from it
//! (the `timeline` module), as prometheus-client does not let its histograms be read back.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set of client requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Label set naming a method or RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// Label set of peer RPCs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub rpc: &'static str,
    pub result: &'static str,
}

/// Label set of refused TLS connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub port: &'static str,
    pub reason: &'static str,
}

/// Label set of a Raft server state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Label set naming another member (`<set>-<N>`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabel {
    pub member: String,
}

/// Label set of a certificate (`member` or `ca`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub cert: &'static str,
}

/// The states of the membership reconciler, as `membership_reconciler_state` labels them.
pub const RECONCILER_STATES: &[&str] = &["in_sync", "changing", "waiting", "no_quorum"];

/// Label set of snapshot events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

fn count_histogram() -> Histogram {
    // 1 .. 4096
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Every metric of a member.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub grpc_requests: Family<GrpcLabels, Counter>,
    pub grpc_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    pub peer_rpcs: Family<PeerLabels, Counter>,
    pub peer_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    pub batch_commands: Histogram,
    pub batch_bytes: Histogram,
    pub log_flush_seconds: Histogram,
    pub log_flush_appends: Histogram,
    pub vote_flush_seconds: Histogram,
    pub apply_seconds: Histogram,
    pub read_index_reads: Histogram,
    pub snapshots: Family<KindLabel, Counter>,
    pub snapshot_bytes: Gauge,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub state: Family<StateLabel, Gauge>,
    pub last_log_index: Gauge,
    pub applied_index: Gauge,
    pub commit_index: Gauge,
    pub snapshot_index: Gauge,
    pub purged_index: Gauge,
    pub voters: Gauge,
    pub learners: Gauge,
    pub leader_changes: Counter,
    pub elections: Counter,
    pub leader_transfers: Counter,
    pub has_leader: Gauge,
    pub membership_changes: Counter,
    pub member_lag: Family<MemberLabel, Gauge>,
    pub member_last_ack: Family<MemberLabel, Gauge<f64, AtomicU64>>,
    pub reconciler_state: Family<StateLabel, Gauge>,
    pub out_of_sync_seconds: Gauge<f64, AtomicU64>,
    pub proposals_failed: Counter,
    pub commands_applied: Counter,
    pub volume_bytes: Gauge,
    pub quota_bytes: Gauge,
    pub space_alarms: Gauge,
    pub watches: Gauge,
    pub watch_events: Counter,
    pub leases: Gauge,
    pub leases_expired: Counter,
    pub compactions: Counter,
    pub ready: Gauge,
    pub tls_refused: Family<RefusedLabels, Counter>,
    pub cert_expiry: Family<CertLabel, Gauge>,
    /// Client requests by kind, for the ops page's charts (not exported).
    pub traffic: Traffic,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("kvset");
        let m = Self {
            grpc_requests: Family::default(),
            grpc_duration: Family::new_with_constructor(seconds_histogram),
            peer_rpcs: Family::default(),
            peer_duration: Family::new_with_constructor(seconds_histogram),
            batch_commands: count_histogram(),
            batch_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 10)),
            log_flush_seconds: seconds_histogram(),
            log_flush_appends: count_histogram(),
            vote_flush_seconds: seconds_histogram(),
            apply_seconds: seconds_histogram(),
            read_index_reads: count_histogram(),
            snapshots: Family::default(),
            snapshot_bytes: Gauge::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            state: Family::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            commit_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            purged_index: Gauge::default(),
            voters: Gauge::default(),
            learners: Gauge::default(),
            leader_changes: Counter::default(),
            elections: Counter::default(),
            leader_transfers: Counter::default(),
            has_leader: Gauge::default(),
            membership_changes: Counter::default(),
            member_lag: Family::default(),
            member_last_ack: Family::default(),
            reconciler_state: Family::default(),
            out_of_sync_seconds: Gauge::default(),
            proposals_failed: Counter::default(),
            commands_applied: Counter::default(),
            volume_bytes: Gauge::default(),
            quota_bytes: Gauge::default(),
            space_alarms: Gauge::default(),
            watches: Gauge::default(),
            watch_events: Counter::default(),
            leases: Gauge::default(),
            leases_expired: Counter::default(),
            compactions: Counter::default(),
            ready: Gauge::default(),
            tls_refused: Family::default(),
            cert_expiry: Family::default(),
            traffic: Traffic::default(),
            registry: Registry::default(),
        };
        r.register(
            "grpc_requests",
            "Client gRPC requests by method and status code",
            m.grpc_requests.clone(),
        );
        r.register("grpc_request_duration_seconds", "Client gRPC request latency", m.grpc_duration.clone());
        r.register("peer_rpcs", "Peer Raft RPCs sent, by RPC and result", m.peer_rpcs.clone());
        r.register(
            "tls_connections_refused",
            "Connections closed before any request: not TLS, a certificate refused, or no handshake in time",
            m.tls_refused.clone(),
        );
        r.register("peer_rpc_duration_seconds", "Peer Raft RPC latency", m.peer_duration.clone());
        r.register("batch_commands", "Client commands per Raft entry", m.batch_commands.clone());
        r.register("batch_bytes", "Bytes of client commands per Raft entry", m.batch_bytes.clone());
        r.register("log_flush_seconds", "Duration of Raft log flushes (fsync)", m.log_flush_seconds.clone());
        r.register("log_flush_appends", "Appends acknowledged per log flush", m.log_flush_appends.clone());
        r.register("vote_flush_seconds", "Duration of vote flushes", m.vote_flush_seconds.clone());
        r.register("apply_seconds", "Duration of state machine applies", m.apply_seconds.clone());
        r.register(
            "read_index_reads",
            "Linearizable reads served per ReadIndex round (leadership confirmation)",
            m.read_index_reads.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots built, installed, or refused in transit (rejected)",
            m.snapshots.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Size of the last snapshot built or installed",
            m.snapshot_bytes.clone(),
        );
        r.register("raft_term", "Current Raft term", m.term.clone());
        r.register("raft_is_leader", "1 when this member is the leader", m.is_leader.clone());
        r.register("raft_state", "1 for the current Raft server state", m.state.clone());
        r.register("raft_last_log_index", "Index of the last log entry", m.last_log_index.clone());
        r.register("raft_applied_index", "Index of the last applied entry", m.applied_index.clone());
        r.register("raft_commit_index", "Quorum-matched index (leader only)", m.commit_index.clone());
        r.register(
            "raft_snapshot_index",
            "Last log index covered by the current snapshot",
            m.snapshot_index.clone(),
        );
        r.register("raft_purged_index", "Last purged log index", m.purged_index.clone());
        r.register("raft_voters", "Voters in the membership config", m.voters.clone());
        r.register("raft_learners", "Learners in the membership config", m.learners.clone());
        r.register(
            "raft_leader_changes",
            "Changes of the leader this member knows of",
            m.leader_changes.clone(),
        );
        r.register("raft_elections", "Times this member started an election", m.elections.clone());
        r.register(
            "raft_leader_transfers",
            "Times this member handed leadership over (on request or at shutdown)",
            m.leader_transfers.clone(),
        );
        r.register("raft_has_leader", "1 while this member knows a leader", m.has_leader.clone());
        r.register(
            "membership_changes",
            "Membership changes made by this member's reconciler",
            m.membership_changes.clone(),
        );
        r.register(
            "member_lag_entries",
            "Leader only: the leader's last log index minus the member's matched index",
            m.member_lag.clone(),
        );
        r.register(
            "member_last_ack_seconds",
            "Leader only: seconds since the member last acknowledged a heartbeat or an append",
            m.member_last_ack.clone(),
        );
        r.register(
            "membership_reconciler_state",
            "Leader only: 1 for the membership reconciler's current state (in_sync, changing, waiting, no_quorum)",
            m.reconciler_state.clone(),
        );
        r.register(
            "membership_out_of_sync_seconds",
            "Leader only: seconds since the membership reconciler was last in sync (0 while in sync)",
            m.out_of_sync_seconds.clone(),
        );
        r.register(
            "proposals_failed",
            "Raft entries proposed by this member as leader that were not committed",
            m.proposals_failed.clone(),
        );
        r.register(
            "commands_applied",
            "Client writes applied to this member's state machine",
            m.commands_applied.clone(),
        );
        r.register("quota_bytes", "The configured space quota (quota_bytes; 0: none)", m.quota_bytes.clone());
        r.register("leases", "Leases in this member's applied state", m.leases.clone());
        r.register("ready", "1 while this member reports ready (/readyz)", m.ready.clone());
        r.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the member's certificate (cert=member) and the earliest CA it trusts (cert=ca) expire, Unix seconds",
            m.cert_expiry.clone(),
        );
        r.register(
            "volume_bytes",
            "Bytes of every file under the data directory, refreshed every few seconds",
            m.volume_bytes.clone(),
        );
        r.register(
            "space_alarms",
            "Raised NOSPACE alarms (members past quota_bytes) this member knows of; writes that add data are refused while above 0",
            m.space_alarms.clone(),
        );
        r.register("watches", "Watches open on this member", m.watches.clone());
        r.register("watch_events", "Events read for watchers (before filtering)", m.watch_events.clone());
        r.register(
            "leases_expired",
            "Leases this member revoked because they expired (as leader)",
            m.leases_expired.clone(),
        );
        r.register(
            "compactions",
            "Automatic compactions this member proposed (as leader)",
            m.compactions.clone(),
        );
        Arc::new(Self { registry: r, ..m })
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Records one client request.
    pub fn grpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.grpc_requests.get_or_create(&GrpcLabels { method, code: code_name(code) }).inc();
        self.grpc_duration.get_or_create(&MethodLabel { method }).observe(elapsed.as_secs_f64());
        match request_kind(method) {
            Some(RequestKind::Write) => self.traffic.writes.observe(elapsed),
            Some(RequestKind::Read) => self.traffic.reads.observe(elapsed),
            None => {}
        }
    }

    /// Sets the one-hot reconciler state (`None`: this member does not reconcile) and how long
    /// it has been out of sync.
    pub fn reconciler(&self, state: Option<&'static str>, out_of_sync: Duration) {
        for s in RECONCILER_STATES {
            self.reconciler_state.get_or_create(&StateLabel { state: s }).set(i64::from(Some(*s) == state));
        }
        self.out_of_sync_seconds.set(out_of_sync.as_secs_f64());
    }

    /// Records one connection refused at the TLS handshake.
    pub fn tls_refused(&self, port: &'static str, reason: &'static str) {
        self.tls_refused.get_or_create(&RefusedLabels { port, reason }).inc();
    }

    /// Records one peer RPC sent.
    pub fn peer(&self, rpc: &'static str, result: &'static str, elapsed: Duration) {
        self.peer_rpcs.get_or_create(&PeerLabels { rpc, result }).inc();
        self.peer_duration.get_or_create(&MethodLabel { method: rpc }).observe(elapsed.as_secs_f64());
    }
}

/// The storage layer's events, counted.
#[derive(Debug)]
pub struct StorageMetrics(pub Arc<Metrics>);

impl kvset_storage::StorageObserver for StorageMetrics {
    fn log_flushed(&self, appends: usize, elapsed: Duration) {
        self.0.log_flush_seconds.observe(elapsed.as_secs_f64());
        self.0.log_flush_appends.observe(appends as f64);
        if elapsed > Duration::from_millis(500) {
            tracing::warn!(elapsed_ms = elapsed.as_millis() as u64, "slow log flush: the disk stalled");
        }
    }

    fn vote_flushed(&self, elapsed: Duration) {
        self.0.vote_flush_seconds.observe(elapsed.as_secs_f64());
    }

    fn applied(&self, _entries: usize, commands: usize, elapsed: Duration) {
        self.0.apply_seconds.observe(elapsed.as_secs_f64());
        self.0.commands_applied.inc_by(commands as u64);
    }

    fn snapshot(&self, installed: bool, bytes: u64, _elapsed: Duration) {
        let kind = if installed { "installed" } else { "built" };
        self.0.snapshots.get_or_create(&KindLabel { kind }).inc();
        self.0.snapshot_bytes.set(bytes as i64);
    }
}

/// Whether a client method writes or reads keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Write,
    Read,
}

/// The kind of a client method as [`Metrics::grpc`] names it (both APIs); `None` for
/// everything else (leases' reads, maintenance, membership).
pub fn request_kind(method: &str) -> Option<RequestKind> {
    match method.strip_prefix("etcd.").unwrap_or(method) {
        "Put" | "Delete" | "DeleteRange" | "Txn" | "LeaseGrant" | "LeaseRevoke" | "Compact" => {
            Some(RequestKind::Write)
        }
        "Get" | "Range" => Some(RequestKind::Read),
        _ => None,
    }
}

/// Upper bounds of [`Latency`]'s buckets, seconds: 100 µs doubling to about 52 s (the last
/// bucket takes everything above).
pub const LATENCY_BUCKETS: [f64; 20] = {
    let mut b = [0.0; 20];
    let mut i = 0;
    let mut v = 0.0001;
    while i < 20 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

/// A request counter with latency buckets that can be read back (cumulative since start).
#[derive(Debug, Default)]
pub struct Latency {
    count: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
}

impl Latency {
    /// Counts one request that took `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far: total and per bucket (not cumulative).
    pub fn read(&self) -> (u64, [u64; LATENCY_BUCKETS.len()]) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        (self.count.load(Ordering::Relaxed), buckets)
    }
}

/// Client requests of this member by kind.
#[derive(Debug, Default)]
pub struct Traffic {
    pub writes: Latency,
    pub reads: Latency,
}

/// The canonical upper-snake name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.grpc("Put", tonic::Code::Ok, Duration::from_millis(3));
        m.term.set(4);
        let text = m.render();
        assert!(text.contains("kvset_grpc_requests_total{method=\"Put\",code=\"OK\"} 1"), "{text}");
        assert!(text.contains("kvset_raft_term 4"), "{text}");
        assert!(text.contains("kvset_log_flush_seconds_bucket"), "{text}");
    }

    #[test]
    fn every_family_is_rendered_and_named_in_the_module_docs() {
        let m = Metrics::new();
        // Families with labels appear once a series exists.
        m.grpc("Put", tonic::Code::Ok, Duration::from_millis(3));
        m.peer("append", "ok", Duration::from_millis(1));
        m.tls_refused("client", "no_tls");
        m.snapshots.get_or_create(&KindLabel { kind: "built" }).inc();
        m.state.get_or_create(&StateLabel { state: "leader" }).set(1);
        m.member_lag.get_or_create(&MemberLabel { member: "kvset-1".into() }).set(3);
        m.member_last_ack.get_or_create(&MemberLabel { member: "kvset-1".into() }).set(0.1);
        m.cert_expiry.get_or_create(&CertLabel { cert: "member" }).set(1);
        m.reconciler(Some("in_sync"), Duration::ZERO);
        let text = m.render();
        let docs = include_str!("metrics.rs").split("\nuse ").next().unwrap_or_default().to_string();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE kvset_"))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.len() >= 40, "{families:?}");
        for family in families {
            let documented =
                docs.contains(&format!("`{family}")) || docs.contains(&format!("`{family}_total"));
            assert!(documented, "kvset_{family} is not named in the module docs");
        }
    }

    #[test]
    fn traffic_counts_writes_and_reads_of_both_apis_into_buckets() {
        let m = Metrics::new();
        m.grpc("Put", tonic::Code::Ok, Duration::from_micros(150));
        m.grpc("etcd.Txn", tonic::Code::Ok, Duration::from_secs(100));
        m.grpc("etcd.Range", tonic::Code::Ok, Duration::from_millis(1));
        m.grpc("Status", tonic::Code::Ok, Duration::from_millis(1));
        let (writes, wb) = m.traffic.writes.read();
        let (reads, _) = m.traffic.reads.read();
        assert_eq!((writes, reads), (2, 1));
        assert_eq!(wb[1], 1, "150 µs falls in the (100 µs, 200 µs] bucket");
        assert_eq!(wb[LATENCY_BUCKETS.len() - 1], 1, "anything slower lands in the last bucket");
    }
}
