//! Configuration: one struct, one defaults table, four layers.
//!
//! Values are taken, each layer overriding the one before, from:
//!
//! 1. the defaults ([`Config::default`]);
//! 2. an optional TOML file (`--config FILE` or `KVSET_CONFIG`);
//! 3. environment variables `KVSET_<KEY>`, the key upper-cased with `.` → `_`
//!    (`raft.heartbeat_interval_ms` → `KVSET_RAFT_HEARTBEAT_INTERVAL_MS`);
//! 4. command-line flags `--<key>` with `.`/`_` → `-` (`--raft-heartbeat-interval-ms`);
//!
//! then [`Config::validate`]d, with errors naming the key. Every key, its unit and its default
//! are documented once, in [`KEYS`]; the reference file `deploy/k8s/base/kvset.toml` is rendered from it
//! and a test keeps the two equal.
//!
//! Identity keys have Kubernetes fallbacks: an empty `name` is taken from `POD_NAME` or
//! `HOSTNAME`, an empty `namespace` from `POD_NAMESPACE` (see [`Config::resolve`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

/// The whole configuration of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub namespace: String,
    pub service: String,
    pub advertise_host: String,
    pub listen_host: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub ops_port: u16,
    pub port_stride: u16,
    pub peer_addrs: Vec<String>,
    pub client_addrs: Vec<String>,
    pub initial_replicas: u32,
    pub replicas_source: ReplicasSource,
    pub kubernetes_api_url: String,
    pub cluster_id: String,
    pub force_new_cluster: String,
    pub force_new_cluster_bump_revision: u64,
    pub quota_bytes: u64,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout_ms: u64,
    pub leave_timeout_ms: u64,
    pub cache_bytes: u64,
    pub raft: RaftConfig,
    pub limits: Limits,
    pub batch: BatchConfig,
    pub watch: WatchConfig,
    pub lease: LeaseConfig,
    pub compaction: CompactionConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
}

/// Where the desired replica count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicasSource {
    /// `Cluster.SetReplicas`, recorded in the replicated state (tests, bare metal, laptops).
    Static,
    /// The StatefulSet's `spec.replicas`, read through the Kubernetes API.
    Kubernetes,
}

impl ReplicasSource {
    /// The config value, as written in files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicasSource::Static => "static",
            ReplicasSource::Kubernetes => "kubernetes",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Raft timing and log management.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub rpc_timeout_ms: u64,
    pub snapshot_every_entries: u64,
    pub keep_entries_after_snapshot: u64,
    pub snapshot_chunk_bytes: u64,
    pub max_payload_entries: u64,
    pub catchup_lag_entries: u64,
}

/// Request limits; every one is enforced with `INVALID_ARGUMENT` naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub key_max_bytes: u64,
    pub value_max_bytes: u64,
    pub request_max_bytes: u64,
    pub txn_max_ops: u64,
    pub range_max_keys: u64,
    pub response_max_bytes: u64,
    pub pending_reads_max: u64,
    pub forward_response_max_bytes: u64,
}

/// Watches: limits and timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchConfig {
    pub max_per_stream: u64,
    pub max_per_member: u64,
    pub progress_interval_ms: u64,
    pub event_cache_revisions: u64,
    pub event_cache_bytes: u64,
    pub response_max_bytes: u64,
    pub send_queue: u64,
}

/// Leases: limits and timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    pub min_ttl_seconds: u64,
    pub max_ttl_seconds: u64,
    pub max_leases: u64,
    pub check_interval_ms: u64,
    pub revoke_per_check: u64,
}

/// Automatic compaction of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompactionConfig {
    pub retain_revisions: u64,
    pub retain_ms: u64,
    pub check_interval_ms: u64,
}

/// The write batcher: client writes gathered into one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    pub max_commands: u64,
    pub max_bytes: u64,
    pub in_flight: u64,
    pub queue: u64,
}

/// Access control (`[auth]`): users and roles themselves are replicated data, managed through
/// etcd's Auth API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub token_ttl_seconds: u64,
    pub bcrypt_cost: u64,
    pub token_key_file: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { token_ttl_seconds: 300, bcrypt_cost: 10, token_key_file: String::new() }
    }
}

/// TLS on the client and peer ports (`[tls]`); off while `cert_file` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: String,
    pub key_file: String,
    pub ca_file: String,
    pub client_cert_auth: bool,
    pub client_ca_file: String,
    pub member_dns_name: String,
    pub reload_interval_ms: u64,
    pub ops: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            client_cert_auth: false,
            client_ca_file: String::new(),
            member_dns_name: "{set}-{ordinal}.{service}.{namespace}.svc.cluster.local".into(),
            reload_interval_ms: 5_000,
            ops: false,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: String::new(),
            data_dir: PathBuf::from("/data"),
            namespace: String::new(),
            service: "kvset-peers".into(),
            advertise_host: "{set}-{ordinal}.{service}.{namespace}.svc.cluster.local".into(),
            listen_host: "0.0.0.0".into(),
            client_port: 2379,
            peer_port: 2380,
            ops_port: 2381,
            port_stride: 0,
            peer_addrs: Vec::new(),
            client_addrs: Vec::new(),
            initial_replicas: 3,
            replicas_source: ReplicasSource::Static,
            kubernetes_api_url: String::new(),
            cluster_id: String::new(),
            force_new_cluster: String::new(),
            force_new_cluster_bump_revision: kvset_storage::seed::DEFAULT_BUMP_REVISION,
            quota_bytes: 8 << 30,
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            shutdown_timeout_ms: 10_000,
            leave_timeout_ms: 30_000,
            cache_bytes: 16 << 20,
            raft: RaftConfig::default(),
            limits: Limits::default(),
            batch: BatchConfig::default(),
            watch: WatchConfig::default(),
            lease: LeaseConfig::default(),
            compaction: CompactionConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            max_per_stream: 1_000,
            max_per_member: 10_000,
            progress_interval_ms: 600_000,
            event_cache_revisions: 100_000,
            event_cache_bytes: 8 << 20,
            response_max_bytes: 1 << 20,
            send_queue: 64,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            min_ttl_seconds: 5,
            max_ttl_seconds: 9_000_000_000,
            max_leases: 100_000,
            check_interval_ms: 500,
            revoke_per_check: 1_000,
        }
    }
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self { retain_revisions: 100_000, retain_ms: 0, check_interval_ms: 60_000 }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            rpc_timeout_ms: 2000,
            snapshot_every_entries: 10_000,
            keep_entries_after_snapshot: 1000,
            snapshot_chunk_bytes: 1 << 20,
            max_payload_entries: 64,
            catchup_lag_entries: 100,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            key_max_bytes: 4096,
            value_max_bytes: 1 << 20,
            request_max_bytes: 2 << 20,
            txn_max_ops: 128,
            range_max_keys: 10_000,
            response_max_bytes: 4 << 20,
            pending_reads_max: 10_000,
            forward_response_max_bytes: i32::MAX as u64,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_commands: 512, max_bytes: 2 << 20, in_flight: 2, queue: 10_000 }
    }
}

/// One documented key: its dotted name and what it means (with its unit).
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    pub key: &'static str,
    pub doc: &'static str,
}

/// Every configuration key, documented. The order is the order of the reference file.
pub const KEYS: &[KeyDoc] = &[
    KeyDoc { key: "name", doc: "Member name `<set>-<ordinal>`, e.g. `kvset-2`. Empty: taken from POD_NAME, then HOSTNAME." },
    KeyDoc { key: "data_dir", doc: "Directory of this member's volume (Raft log, state, snapshots, identity)." },
    KeyDoc { key: "namespace", doc: "Kubernetes namespace, for addresses. Empty: taken from POD_NAMESPACE, else `default`." },
    KeyDoc { key: "service", doc: "Name of the headless Service that gives members their DNS names." },
    KeyDoc {
        key: "advertise_host",
        doc: "Host other members and clients use to reach member N. Placeholders: {set} {ordinal} {service} {namespace}.",
    },
    KeyDoc { key: "listen_host", doc: "Address the client, peer and ops listeners bind to." },
    KeyDoc { key: "client_port", doc: "Client gRPC port (Kv, Cluster, health, reflection) of ordinal 0." },
    KeyDoc { key: "peer_port", doc: "Peer gRPC port (Raft) of ordinal 0." },
    KeyDoc { key: "ops_port", doc: "HTTP port of ordinal 0 for /metrics, /healthz and /readyz." },
    KeyDoc {
        key: "port_stride",
        doc: "Ports of ordinal N are the ports above + N * port_stride. 0 in Kubernetes; 10 for a cluster on one host.",
    },
    KeyDoc {
        key: "peer_addrs",
        doc: "Explicit host:port of each ordinal's peer endpoint (index = ordinal); overrides advertise_host when set.",
    },
    KeyDoc {
        key: "client_addrs",
        doc: "Explicit host:port of each ordinal's client endpoint (index = ordinal); overrides advertise_host when set.",
    },
    KeyDoc {
        key: "initial_replicas",
        doc: "Members of a brand-new cluster: ordinal 0 bootstraps only once ordinals 0..initial_replicas all answer empty.",
    },
    KeyDoc {
        key: "replicas_source",
        doc: "Where the desired replica count comes from: `static` (Cluster.SetReplicas) or `kubernetes` (the StatefulSet).",
    },
    KeyDoc {
        key: "kubernetes_api_url",
        doc: "Kubernetes API server for the `kubernetes` replicas source. Empty: the in-cluster API and service account.",
    },
    KeyDoc { key: "cluster_id", doc: "If set (32 hex chars), refuse to start on a volume of any other cluster." },
    KeyDoc {
        key: "force_new_cluster",
        doc: "DISASTER RECOVERY ONLY (quorum loss). The name of the one member, e.g. `kvset-0`, that rewrites the \
              membership to itself alone, keeps its data and serves as a new cluster (new cluster id) that the \
              other ordinals join with empty volumes. Other members ignore it; a member with an empty volume \
              refuses to start; it acts once and is ignored until the member has started once without it.",
    },
    KeyDoc {
        key: "force_new_cluster_bump_revision",
        doc: "How far a force_new_cluster recovery raises the store revision; everything below the new revision \
              is marked compacted (etcd's --bump-revision --mark-compacted), so no revision number the lost \
              cluster handed out is reused and watchers resuming below it are told to re-list. 0: keep the \
              revisions (not recommended).",
    },
    KeyDoc {
        key: "quota_bytes",
        doc: "Space quota of the volume (like etcd's quota-backend-bytes): past it, writes that add data are \
              refused with RESOURCE_EXHAUSTED and a NOSPACE alarm is raised; reads, deletes, compaction and \
              defragmentation still work. 0: no quota.",
    },
    KeyDoc { key: "log_format", doc: "`text`, `json`, or `auto` (text on a terminal, json otherwise)." },
    KeyDoc { key: "log_level", doc: "tracing filter, e.g. `info` or `kvset_server=debug,info`; RUST_LOG wins when set." },
    KeyDoc {
        key: "shutdown_timeout_ms",
        doc: "Milliseconds a graceful shutdown may take to drain requests and stop Raft before it is cut short.",
    },
    KeyDoc {
        key: "leave_timeout_ms",
        doc: "On SIGTERM, a member whose ordinal is beyond the desired replicas waits up to this many milliseconds \
              for the cluster to remove it before it stops (a scale-down never takes voters away faster than \
              the cluster removes them). Other shutdowns do not wait.",
    },
    KeyDoc {
        key: "cache_bytes",
        doc: "Bytes of sled page cache: hot keys and history pages. sled counts pages by their size on disk; its real memory use is about 3x this (measured: 64 MiB cost 215 MiB more RSS than 8 MiB under writes).",
    },
    KeyDoc {
        key: "raft.heartbeat_interval_ms",
        doc: "Milliseconds between leader heartbeats.",
    },
    KeyDoc {
        key: "raft.election_timeout_min_ms",
        doc: "Lower bound, in milliseconds, of the randomised election timeout (etcd's default). fsyncs run off the Raft core, so a disk stall longer than this causes no election; CPU starvation of the member for this long does.",
    },
    KeyDoc { key: "raft.election_timeout_max_ms", doc: "Upper bound, in milliseconds, of the election timeout." },
    KeyDoc { key: "raft.rpc_timeout_ms", doc: "Milliseconds a peer RPC (append, vote, snapshot chunk) may take." },
    KeyDoc { key: "raft.snapshot_every_entries", doc: "Build a snapshot after this many log entries since the last one." },
    KeyDoc {
        key: "raft.keep_entries_after_snapshot",
        doc: "Log entries kept behind a snapshot, so briefly lagging members catch up without one.",
    },
    KeyDoc { key: "raft.snapshot_chunk_bytes", doc: "Bytes per snapshot chunk sent to a member." },
    KeyDoc { key: "raft.max_payload_entries", doc: "Most log entries in one AppendEntries RPC." },
    KeyDoc {
        key: "raft.catchup_lag_entries",
        doc: "A learner is promoted to voter once its applied index is within this many entries of the leader's.",
    },
    KeyDoc { key: "limits.key_max_bytes", doc: "Largest key, in bytes. Keys must also be non-empty." },
    KeyDoc { key: "limits.value_max_bytes", doc: "Largest value, in bytes." },
    KeyDoc { key: "limits.request_max_bytes", doc: "Largest encoded client request, in bytes." },
    KeyDoc { key: "limits.txn_max_ops", doc: "Most compares + ops in one Txn." },
    KeyDoc { key: "limits.range_max_keys", doc: "Most keys in one Range page." },
    KeyDoc {
        key: "limits.response_max_bytes",
        doc: "A Range page ends once its keys and values would pass this many bytes (at least one key is returned).",
    },
    KeyDoc {
        key: "limits.forward_response_max_bytes",
        doc: "Largest answer, in bytes, a member reads back from the leader for a request it forwarded (gRPC's \
              own ceiling, 2 GiB, by default). A write whose answer is larger still applies and its client is \
              told UNKNOWN (the outcome cannot be read), never that it failed.",
    },
    KeyDoc {
        key: "limits.pending_reads_max",
        doc: "Linearizable reads that may wait for a ReadIndex round at once on one member; past it, reads get \
              RESOURCE_EXHAUSTED (nothing is read or changed).",
    },
    KeyDoc { key: "batch.max_commands", doc: "Most client commands gathered into one Raft entry." },
    KeyDoc { key: "batch.max_bytes", doc: "Most bytes of client commands gathered into one Raft entry." },
    KeyDoc {
        key: "batch.in_flight",
        doc: "Raft entries proposed and not yet applied at once; writes arriving meanwhile wait and form the next batch.",
    },
    KeyDoc {
        key: "batch.queue",
        doc: "Writes that may wait for a batch before new ones get RESOURCE_EXHAUSTED (backpressure).",
    },
    KeyDoc { key: "watch.max_per_stream", doc: "Most watches one Watch stream may hold; more are refused (canceled at creation)." },
    KeyDoc { key: "watch.max_per_member", doc: "Most watches one member serves over all its streams." },
    KeyDoc {
        key: "watch.progress_interval_ms",
        doc: "A watch created with progress_notify gets a progress response after this many milliseconds without events.",
    },
    KeyDoc {
        key: "watch.event_cache_revisions",
        doc: "Revisions of recent events kept in memory for watchers; older ones are read back from the history.",
    },
    KeyDoc { key: "watch.event_cache_bytes", doc: "Bytes of recent events kept in memory for watchers." },
    KeyDoc {
        key: "watch.response_max_bytes",
        doc: "A watch response holds whole revisions up to about this many bytes (one revision is never split).",
    },
    KeyDoc {
        key: "watch.send_queue",
        doc: "Responses queued per Watch stream for a slow client; past it the stream waits (and lags, then \
              catches up from the history) without holding up anything else.",
    },
    KeyDoc {
        key: "lease.min_ttl_seconds",
        doc: "Shortest lease TTL, in seconds (kvset.v1 refuses shorter; the etcd API raises shorter ones to it, as etcd does).",
    },
    KeyDoc { key: "lease.max_ttl_seconds", doc: "Longest lease TTL, in seconds." },
    KeyDoc { key: "lease.max_leases", doc: "Most leases the cluster holds; grants past it get RESOURCE_EXHAUSTED." },
    KeyDoc { key: "lease.check_interval_ms", doc: "Milliseconds between the leader's checks for expired leases." },
    KeyDoc { key: "lease.revoke_per_check", doc: "Most expired leases the leader revokes per check." },
    KeyDoc {
        key: "compaction.retain_revisions",
        doc: "Automatic compaction keeps at least this many revisions of history (0: no limit by count).",
    },
    KeyDoc {
        key: "compaction.retain_ms",
        doc: "Automatic compaction keeps at least this many milliseconds of history (0: no limit by age). With both \
              set, history is kept while either asks for it; with both 0, nothing is compacted automatically.",
    },
    KeyDoc { key: "compaction.check_interval_ms", doc: "Milliseconds between the leader's automatic compaction checks." },
    KeyDoc {
        key: "auth.token_ttl_seconds",
        doc: "Seconds a token from Authenticate stays valid (etcd's --auth-token-ttl). Tokens work on every member; \
              a password change or the user's deletion ends them at once.",
    },
    KeyDoc {
        key: "auth.bcrypt_cost",
        doc: "bcrypt cost of password hashes (etcd's --bcrypt-cost): 4..31; each step doubles the time to hash \
              and to check a password.",
    },
    KeyDoc {
        key: "auth.token_key_file",
        doc: "A file (e.g. a mounted Kubernetes Secret) holding at least 32 bytes of secret, the same on every \
              member, that token signatures also depend on: whoever holds a volume (which keeps the per-enable \
              key of the replicated state) cannot sign tokens without it. Read at start. Empty: tokens are signed \
              with the replicated key alone. Backups never hold either.",
    },
    KeyDoc {
        key: "tls.cert_file",
        doc: "PEM certificate (chain, leaf first) of this member. Empty: no TLS on any port. When set, the client \
              and peer ports speak only TLS (no plaintext fallback), the certificate is served on both and \
              presented to the members this one dials; it must name this member's tls.member_dns_name (and the \
              names clients dial). `{name}` is replaced by the member name, so one Secret per pod can be mounted \
              side by side.",
    },
    KeyDoc { key: "tls.key_file", doc: "PEM private key of tls.cert_file (PKCS#8, PKCS#1 or SEC1); `{name}` as there." },
    KeyDoc {
        key: "tls.ca_file",
        doc: "PEM CA bundle of the members' certificates: a member accepts a peer, and trusts a member it dials, \
              only if its certificate chains to this bundle and names that member's tls.member_dns_name. \
              `{name}` as in tls.cert_file.",
    },
    KeyDoc {
        key: "tls.client_cert_auth",
        doc: "Require a client certificate on the client port that chains to tls.client_ca_file (etcd's \
              --client-cert-auth). false: any client that completes the TLS handshake may call.",
    },
    KeyDoc {
        key: "tls.client_ca_file",
        doc: "PEM CA bundle for client certificates (with tls.client_cert_auth). Empty: tls.ca_file. Members' own \
              certificates are accepted on the client port too (members call each other's client port).",
    },
    KeyDoc {
        key: "tls.member_dns_name",
        doc: "The DNS name the certificate of member N must carry as a subject alternative name; placeholders as \
              in advertise_host. Members are verified by this name whatever address they are dialled at.",
    },
    KeyDoc {
        key: "tls.ops",
        doc: "Serve the ops port (/metrics, /healthz, /readyz) over TLS too, with the member's certificate and no \
              client certificate (probes then need `scheme: HTTPS`). false: plain HTTP, as etcd's \
              --listen-metrics-urls.",
    },
    KeyDoc {
        key: "tls.reload_interval_ms",
        doc: "Milliseconds between checks of the certificate, key and CA files for changes (cert-manager renewals, \
              updated Secrets). A change applies to new connections without a restart; files that fail to load \
              are logged and the previous material stays in use.",
    },
];

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{source_name}: unknown config key `{key}`")]
    UnknownKey { source_name: String, key: String },
    #[error("{source_name}: `{key}` = {value:?}: {reason}")]
    BadValue { source_name: String, key: String, value: String, reason: String },
    #[error("invalid config: `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The environment variable of a key.
pub fn env_var(key: &str) -> String {
    format!("KVSET_{}", key.replace('.', "_").to_uppercase())
}

/// The command-line flag of a key (without `--`).
pub fn flag(key: &str) -> String {
    key.replace(['.', '_'], "-")
}

/// Flattens a TOML table into dotted keys.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut t = table;
    for p in parts {
        t = match t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
            toml::Value::Table(inner) => inner,
            _ => return,
        };
    }
    t.insert(last.to_string(), value);
}

/// Parses a string from the environment or a flag as the type of the key's default.
fn parse_like(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    match default {
        toml::Value::Integer(_) => {
            raw.trim().parse::<i64>().map(toml::Value::Integer).map_err(|e| format!("not an integer: {e}"))
        }
        toml::Value::Boolean(_) => match raw.trim() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err("not a boolean (true/false)".into()),
        },
        toml::Value::Array(_) => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        )),
        _ => Ok(toml::Value::String(raw.to_string())),
    }
}

fn same_kind(a: &toml::Value, b: &toml::Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Sets every key that has a `KVSET_*` variable in `env`.
fn apply_env(
    table: &mut toml::Table,
    defaults: &BTreeMap<String, toml::Value>,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (key, default) in defaults {
        if let Some(raw) = env.get(&env_var(key)) {
            let value = parse_checked(key, default, raw, || format!("environment {}", env_var(key)))?;
            set_path(table, key, value);
        }
    }
    Ok(())
}

/// `raw` as a value of `key`'s type and range (the type of its `default`); errors name
/// `source_name`.
fn parse_checked(
    key: &str,
    default: &toml::Value,
    raw: &str,
    source_name: impl FnOnce() -> String,
) -> Result<toml::Value, ConfigError> {
    parse_like(default, raw).and_then(|v| check_range(key, &v).map(|_| v)).map_err(|reason| {
        ConfigError::BadValue {
            source_name: source_name(),
            key: key.to_string(),
            value: raw.to_string(),
            reason,
        }
    })
}

/// The configuration a table of every key describes, validated.
fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
    let config: Config = table.try_into().map_err(|e: toml::de::Error| ConfigError::BadValue {
        source_name: "configuration".into(),
        key: String::new(),
        value: String::new(),
        reason: e.to_string(),
    })?;
    config.validate()?;
    Ok(config)
}

/// Keys stored in 16-bit and 32-bit fields; every other integer is a u64.
const U16_KEYS: &[&str] = &["client_port", "peer_port", "ops_port", "port_stride"];
const U32_KEYS: &[&str] = &["initial_replicas"];

/// Keys whose value is one of a few words (the enums of [`Config`]).
const ENUM_KEYS: &[(&str, &[&str])] =
    &[("replicas_source", &["static", "kubernetes"]), ("log_format", &["auto", "text", "json"])];

/// Checks a value fits its key's field: integers their width (all are unsigned), words their
/// enum.
fn check_range(key: &str, value: &toml::Value) -> Result<(), String> {
    if let (Some((_, words)), toml::Value::String(s)) = (ENUM_KEYS.iter().find(|(k, _)| *k == key), value) {
        if !words.contains(&s.as_str()) {
            let list: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
            return Err(format!("must be one of {}", list.join(", ")));
        }
        return Ok(());
    }
    let toml::Value::Integer(v) = value else { return Ok(()) };
    let max = if U16_KEYS.contains(&key) {
        u16::MAX as i64
    } else if U32_KEYS.contains(&key) {
        u32::MAX as i64
    } else {
        i64::MAX
    };
    if *v < 0 || *v > max {
        return Err(format!("must be between 0 and {max}"));
    }
    Ok(())
}

impl Config {
    /// Loads the configuration: defaults, then `file`, then `env` (`KVSET_*` entries), then
    /// `flags` (key, value) pairs; then validates it.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let defaults = Self::defaults_flat();
        let mut table = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid { key: "defaults", reason: e.to_string() })?;

        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::File { path: path.to_path_buf(), reason: e.to_string() })?;
            let parsed: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::File {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            let mut flat = BTreeMap::new();
            flatten("", &parsed, &mut flat);
            let source_name = format!("config file {}", path.display());
            for (key, value) in flat {
                let Some(default) = defaults.get(&key) else {
                    return Err(ConfigError::UnknownKey { source_name, key });
                };
                let checked = if same_kind(default, &value) {
                    check_range(&key, &value)
                } else {
                    Err(format!("expected {}", default.type_str()))
                };
                if let Err(reason) = checked {
                    return Err(ConfigError::BadValue { source_name, key, value: value.to_string(), reason });
                }
                set_path(&mut table, &key, value);
            }
        }

        apply_env(&mut table, &defaults, env)?;

        for (key, raw) in flags {
            let Some(default) = defaults.get(key) else {
                return Err(ConfigError::UnknownKey { source_name: "command line".into(), key: key.clone() });
            };
            let value = parse_checked(key, default, raw, || format!("flag --{}", flag(key)))?;
            set_path(&mut table, key, value);
        }

        from_table(table)
    }

    /// This configuration with the `KVSET_*` entries of `env` applied on top (as the
    /// environment layer of [`Config::load`] applies them), then validated.
    pub fn with_env(self, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut table = toml::Table::try_from(self)
            .map_err(|e| ConfigError::Invalid { key: "configuration", reason: e.to_string() })?;
        apply_env(&mut table, &Self::defaults_flat(), env)?;
        from_table(table)
    }

    /// Every key with its default value, flattened.
    pub fn defaults_flat() -> BTreeMap<String, toml::Value> {
        let mut flat = BTreeMap::new();
        if let Ok(table) = toml::Table::try_from(Config::default()) {
            flatten("", &table, &mut flat);
        }
        flat
    }

    /// Checks relations between values, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return bad("raft.heartbeat_interval_ms", "must be at least 1".into());
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms * 2 {
            return bad(
                "raft.election_timeout_min_ms",
                format!("must exceed twice raft.heartbeat_interval_ms ({} ms)", r.heartbeat_interval_ms),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("raft.election_timeout_max_ms", "must exceed raft.election_timeout_min_ms".into());
        }
        if r.rpc_timeout_ms == 0 {
            return bad("raft.rpc_timeout_ms", "must be at least 1".into());
        }
        if r.snapshot_every_entries == 0 {
            return bad("raft.snapshot_every_entries", "must be at least 1".into());
        }
        if r.snapshot_chunk_bytes < 1024 || r.snapshot_chunk_bytes > 64 << 20 {
            return bad("raft.snapshot_chunk_bytes", "must be between 1 KiB and 64 MiB".into());
        }
        if r.max_payload_entries == 0 {
            return bad("raft.max_payload_entries", "must be at least 1".into());
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.key_max_bytes", l.key_max_bytes),
            ("limits.request_max_bytes", l.request_max_bytes),
            ("limits.txn_max_ops", l.txn_max_ops),
            ("limits.range_max_keys", l.range_max_keys),
            ("limits.response_max_bytes", l.response_max_bytes),
            ("limits.pending_reads_max", l.pending_reads_max),
            ("limits.forward_response_max_bytes", l.forward_response_max_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if l.request_max_bytes > 64 << 20 {
            return bad("limits.request_max_bytes", "must be at most 64 MiB".into());
        }
        if l.key_max_bytes + l.value_max_bytes > l.request_max_bytes {
            return bad(
                "limits.request_max_bytes",
                format!(
                    "must hold the largest key plus the largest value ({} + {} bytes)",
                    l.key_max_bytes, l.value_max_bytes
                ),
            );
        }
        let b = &self.batch;
        if b.max_commands == 0 || b.in_flight == 0 || b.queue == 0 {
            return bad(
                "batch",
                "batch.max_commands, batch.in_flight and batch.queue must be at least 1".into(),
            );
        }
        if b.max_bytes < l.request_max_bytes {
            return bad("batch.max_bytes", "must be at least limits.request_max_bytes".into());
        }
        let w = &self.watch;
        for (key, v) in [
            ("watch.max_per_stream", w.max_per_stream),
            ("watch.max_per_member", w.max_per_member),
            ("watch.progress_interval_ms", w.progress_interval_ms),
            ("watch.event_cache_revisions", w.event_cache_revisions),
            ("watch.response_max_bytes", w.response_max_bytes),
            ("watch.send_queue", w.send_queue),
            ("lease.min_ttl_seconds", self.lease.min_ttl_seconds),
            ("lease.max_leases", self.lease.max_leases),
            ("lease.check_interval_ms", self.lease.check_interval_ms),
            ("lease.revoke_per_check", self.lease.revoke_per_check),
            ("compaction.check_interval_ms", self.compaction.check_interval_ms),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.lease.max_ttl_seconds < self.lease.min_ttl_seconds
            || self.lease.max_ttl_seconds > 9_000_000_000
        {
            return bad(
                "lease.max_ttl_seconds",
                "must be between lease.min_ttl_seconds and 9000000000 (etcd's maximum)".into(),
            );
        }
        if self.initial_replicas == 0 || self.initial_replicas > 9 {
            return bad("initial_replicas", "must be between 1 and 9".into());
        }
        if !self.cluster_id.is_empty() && self.cluster_id.parse::<kvset_storage::ClusterId>().is_err() {
            return bad("cluster_id", "must be empty or 32 hex characters".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty".into());
        }
        if self.shutdown_timeout_ms == 0 {
            return bad("shutdown_timeout_ms", "must be at least 1".into());
        }
        if !(4..=31).contains(&self.auth.bcrypt_cost) {
            return bad("auth.bcrypt_cost", "must be between 4 and 31".into());
        }
        if self.auth.token_ttl_seconds == 0 {
            return bad("auth.token_ttl_seconds", "must be at least 1".into());
        }
        self.validate_tls()
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        let t = &self.tls;
        if !t.enabled() {
            for (key, set) in [
                ("tls.key_file", !t.key_file.is_empty()),
                ("tls.ca_file", !t.ca_file.is_empty()),
                ("tls.client_ca_file", !t.client_ca_file.is_empty()),
                ("tls.client_cert_auth", t.client_cert_auth),
                ("tls.ops", t.ops),
            ] {
                if set {
                    return bad(key, "needs tls.cert_file (TLS is off while tls.cert_file is empty)");
                }
            }
            return Ok(());
        }
        if t.key_file.is_empty() {
            return bad("tls.key_file", "must be set with tls.cert_file");
        }
        if t.ca_file.is_empty() {
            return bad(
                "tls.ca_file",
                "must be set with tls.cert_file (members verify each other against it)",
            );
        }
        if !t.member_dns_name.contains("{ordinal}") {
            return bad("tls.member_dns_name", "must contain {ordinal}: every member has its own name");
        }
        if t.reload_interval_ms < 100 {
            return bad("tls.reload_interval_ms", "must be at least 100");
        }
        Ok(())
    }

    /// Fills identity keys from the Kubernetes environment: `name` from `POD_NAME` or
    /// `HOSTNAME`, `namespace` from `POD_NAMESPACE` (else `default`).
    pub fn resolve(&mut self, env: &BTreeMap<String, String>) {
        if self.name.is_empty() {
            for var in ["POD_NAME", "HOSTNAME"] {
                if let Some(v) = env.get(var).filter(|v| !v.is_empty()) {
                    self.name = v.clone();
                    break;
                }
            }
        }
        if self.namespace.is_empty() {
            self.namespace = env
                .get("POD_NAMESPACE")
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| "default".into());
        }
    }

    /// The reference configuration file: every key, documented, at its default.
    pub fn reference_toml() -> String {
        let defaults = Self::defaults_flat();
        let mut out = String::from(
            "# kvset reference configuration: every key at its default value.\n\
             #\n\
             # Load with `kvset serve --config FILE`. Each key can also be set with an environment\n\
             # variable KVSET_<KEY> (dots become underscores, upper case: KVSET_RAFT_HEARTBEAT_INTERVAL_MS)\n\
             # or a flag --<key> (dots and underscores become dashes: --raft-heartbeat-interval-ms).\n\
             # Precedence: defaults < this file < environment < flags.\n\
             #\n\
             # This file is generated from crates/kvset-server/src/config.rs and checked by a test.\n",
        );
        let mut section = "";
        for doc in KEYS {
            let (sec, leaf) = doc.key.rsplit_once('.').unwrap_or(("", doc.key));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            out.push('\n');
            for line in wrap(doc.doc, 92) {
                out.push_str(&format!("# {line}\n"));
            }
            let value = defaults.get(doc.key).map(|v| v.to_string()).unwrap_or_default();
            out.push_str(&format!("{leaf} = {value}\n"));
        }
        out
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.raft.heartbeat_interval_ms)
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_key_is_documented_exactly_once() {
        let defaults = Config::defaults_flat();
        let documented: Vec<&str> = KEYS.iter().map(|k| k.key).collect();
        for key in defaults.keys() {
            assert_eq!(
                documented.iter().filter(|d| **d == key).count(),
                1,
                "key {key} must be documented once"
            );
        }
        assert_eq!(documented.len(), defaults.len(), "KEYS documents a key that does not exist");
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn reference_config_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/base/kvset.toml");
        let rendered = Config::reference_toml();
        if std::env::var("KVSET_UPDATE_REFERENCE").is_ok() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).expect("deploy/k8s/base/kvset.toml exists");
        assert_eq!(
            on_disk, rendered,
            "deploy/k8s/base/kvset.toml drifted; regenerate with KVSET_UPDATE_REFERENCE=1 cargo test"
        );
        let loaded = Config::load(Some(&path), &BTreeMap::new(), &[]).unwrap();
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "client_port = 1000\npeer_port = 1001\n[raft]\nheartbeat_interval_ms = 100\n")
            .unwrap();
        let env =
            env(&[("KVSET_PEER_PORT", "2001"), ("KVSET_OPS_PORT", "2002"), ("KVSET_PEER_ADDRS", "a:1, b:2")]);
        let flags = vec![("ops_port".to_string(), "3002".to_string())];
        let c = Config::load(Some(&file), &env, &flags).unwrap();
        assert_eq!((c.client_port, c.peer_port, c.ops_port), (1000, 2001, 3002));
        assert_eq!(c.raft.heartbeat_interval_ms, 100);
        assert_eq!(c.peer_addrs, vec!["a:1".to_string(), "b:2".to_string()]);
    }

    #[test]
    fn errors_name_the_key_and_the_source() {
        let err = Config::load(None, &env(&[("KVSET_RAFT_HEARTBEAT_INTERVAL_MS", "fast")]), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("KVSET_RAFT_HEARTBEAT_INTERVAL_MS") && msg.contains("not an integer"), "{msg}");

        let err = Config::load(None, &BTreeMap::new(), &[("nope".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("unknown config key `nope`"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[raft]\nheartbeat_interval_ms = \"x\"\n").unwrap();
        let err = Config::load(Some(&file), &BTreeMap::new(), &[]).unwrap_err();
        assert!(
            err.to_string().contains("raft.heartbeat_interval_ms") && err.to_string().contains("integer"),
            "{err}"
        );
        std::fs::write(&file, "[raft]\nbogus = 1\n").unwrap();
        assert!(Config::load(Some(&file), &BTreeMap::new(), &[])
            .unwrap_err()
            .to_string()
            .contains("raft.bogus"));
        std::fs::write(&file, "this is not toml").unwrap();
        assert!(matches!(Config::load(Some(&file), &BTreeMap::new(), &[]), Err(ConfigError::File { .. })));

        let err =
            Config::load(None, &BTreeMap::new(), &[("raft.election_timeout_max_ms".into(), "10".into())])
                .unwrap_err();
        assert!(err.to_string().contains("raft.election_timeout_max_ms"), "{err}");
        let err =
            Config::load(None, &BTreeMap::new(), &[("limits.value_max_bytes".into(), "3000000".into())])
                .unwrap_err();
        assert!(err.to_string().contains("limits.request_max_bytes"), "{err}");
        let err =
            Config::load(None, &BTreeMap::new(), &[("client_port".into(), "70000".into())]).unwrap_err();
        assert!(err.to_string().contains("client_port") && err.to_string().contains("65535"), "{err}");
        let err = Config::load(None, &env(&[("KVSET_REPLICAS_SOURCE", "k8s")]), &[]).unwrap_err();
        assert!(
            err.to_string().contains("KVSET_REPLICAS_SOURCE") && err.to_string().contains("`kubernetes`"),
            "{err}"
        );
        std::fs::write(&file, "log_format = \"xml\"\n").unwrap();
        let err = Config::load(Some(&file), &BTreeMap::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("log_format") && err.to_string().contains("`json`"), "{err}");
        let err = Config::load(None, &env(&[("KVSET_CACHE_BYTES", "-1")]), &[]).unwrap_err();
        assert!(err.to_string().contains("KVSET_CACHE_BYTES"), "{err}");
    }

    #[test]
    fn tls_keys_are_checked_together() {
        let load = |pairs: &[(&str, &str)]| {
            let flags: Vec<(String, String)> =
                pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Config::load(None, &BTreeMap::new(), &flags)
        };
        let full = [("tls.cert_file", "c.pem"), ("tls.key_file", "k.pem"), ("tls.ca_file", "ca.pem")];
        let c = load(&full).unwrap();
        assert!(c.tls.enabled());
        assert!(!Config::default().tls.enabled());
        for (pairs, key) in [
            (vec![("tls.cert_file", "c.pem"), ("tls.ca_file", "ca.pem")], "tls.key_file"),
            (vec![("tls.cert_file", "c.pem"), ("tls.key_file", "k.pem")], "tls.ca_file"),
            (vec![("tls.key_file", "k.pem")], "tls.key_file"),
            (vec![("tls.ca_file", "ca.pem")], "tls.ca_file"),
            (vec![("tls.client_cert_auth", "true")], "tls.client_cert_auth"),
            (vec![("tls.client_ca_file", "x.pem")], "tls.client_ca_file"),
            (vec![("tls.ops", "true")], "tls.ops"),
            ([&full[..], &[("tls.member_dns_name", "kvset.example.com")]].concat(), "tls.member_dns_name"),
            ([&full[..], &[("tls.reload_interval_ms", "10")]].concat(), "tls.reload_interval_ms"),
        ] {
            let err = load(&pairs).unwrap_err().to_string();
            assert!(err.contains(key), "{pairs:?}: the error should name {key}: {err}");
        }
        let err = load(&[("tls.client_cert_auth", "maybe")]).unwrap_err().to_string();
        assert!(err.contains("boolean"), "{err}");
    }

    #[test]
    fn identity_falls_back_to_kubernetes_env() {
        let mut c = Config::default();
        c.resolve(&env(&[("HOSTNAME", "kvset-1"), ("POD_NAME", "kvset-2"), ("POD_NAMESPACE", "prod")]));
        assert_eq!((c.name.as_str(), c.namespace.as_str()), ("kvset-2", "prod"));
        let mut c = Config::default();
        c.resolve(&env(&[("HOSTNAME", "kvset-1")]));
        assert_eq!((c.name.as_str(), c.namespace.as_str()), ("kvset-1", "default"));
    }

    #[test]
    fn with_env_layers_the_environment_over_a_config_and_refuses_bad_values() {
        let base = Config { name: "kvset-1".into(), quota_bytes: 5, ..Config::default() };
        let c =
            base.clone().with_env(&env(&[("KVSET_FORCE_NEW_CLUSTER", "kvset-1"), ("OTHER", "x")])).unwrap();
        assert_eq!((c.force_new_cluster.as_str(), c.quota_bytes, c.name.as_str()), ("kvset-1", 5, "kvset-1"));
        let e = base.with_env(&env(&[("KVSET_QUOTA_BYTES", "-1")])).unwrap_err().to_string();
        assert!(e.contains("KVSET_QUOTA_BYTES") && e.contains("quota_bytes"), "{e}");
    }
}
