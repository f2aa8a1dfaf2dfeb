//! Prometheus metrics of one member, served as text on the ops port at `/metrics`.
//!
//! Families (all prefixed `kvset_`):
//!
//! * Raft: `raft_term`, `raft_is_leader`, `raft_state{state}`, `raft_last_log_index`,
//!   `raft_applied_index`, `raft_commit_index` (leader only: the quorum-matched index),
//!   `raft_snapshot_index`, `raft_purged_index`, `raft_voters`, `raft_learners`,
//!   `raft_leader_changes_total`, `raft_elections_total` (times this member became candidate),
//!   `raft_leader_transfers_total` (leadership this member handed over, on request or at shutdown),
//!   `membership_changes_total` (changes made by this member's reconciler).
//! * Client gRPC: `grpc_requests_total{method,code}`, `grpc_request_duration_seconds{method}`.
//! * Peer RPCs sent: `peer_rpcs_total{rpc,result}`, `peer_rpc_duration_seconds{rpc}`.
//! * Write path: `batch_commands` (commands per Raft entry), `batch_bytes`,
//!   `log_flush_seconds`, `log_flush_appends` (appends covered by one fsync: openraft issues the
//!   next append without waiting for the previous one's flush),
//!   `vote_flush_seconds`, `apply_seconds`.
//! * Read path: `read_index_reads` (linearizable reads served per ReadIndex round).
//! * Snapshots: `snapshots_total{kind="built"|"installed"|"rejected"}`, `snapshot_bytes`.
//! * Watch and leases: `watches` (open on this member), `watch_events_total`,
//!   `leases_expired_total`, `compactions_total` (automatic, proposed by this member).
//! * Volume: `volume_bytes` (every file under the data directory; refreshed every few seconds
//!   by a background task, and the figure `Cluster.Status` reports); `space_alarms` (NOSPACE
//!   alarms this member knows of, see `tasks::quota`).

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
    pub membership_changes: Counter,
    pub volume_bytes: Gauge,
    pub space_alarms: Gauge,
    pub watches: Gauge,
    pub watch_events: Counter,
    pub leases_expired: Counter,
    pub compactions: Counter,
    pub tls_refused: Family<RefusedLabels, Counter>,
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
            membership_changes: Counter::default(),
            volume_bytes: Gauge::default(),
            space_alarms: Gauge::default(),
            watches: Gauge::default(),
            watch_events: Counter::default(),
            leases_expired: Counter::default(),
            compactions: Counter::default(),
            tls_refused: Family::default(),
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
        r.register(
            "membership_changes",
            "Membership changes made by this member's reconciler",
            m.membership_changes.clone(),
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

    fn applied(&self, _entries: usize, _commands: usize, elapsed: Duration) {
        self.0.apply_seconds.observe(elapsed.as_secs_f64());
    }

    fn snapshot(&self, installed: bool, bytes: u64, _elapsed: Duration) {
        let kind = if installed { "installed" } else { "built" };
        self.0.snapshots.get_or_create(&KindLabel { kind }).inc();
        self.0.snapshot_bytes.set(bytes as i64);
    }
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
}
