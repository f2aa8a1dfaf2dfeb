//! Configuration: one struct whose fields carry their own docs and defaults, four layers.
//!
//! Values are taken, each layer overriding the one before, from:
//!
//! 1. the defaults ([`Config::default`]);
//! 2. an optional TOML file (`--config FILE` or `KVSET_CONFIG`);
//! 3. environment variables `KVSET_<KEY>`, the key upper-cased with `.` → `_`
//!    (`raft.heartbeat_interval_ms` → `KVSET_RAFT_HEARTBEAT_INTERVAL_MS`);
//! 4. command-line flags `--<key>` with `.`/`_` → `-` (`--raft-heartbeat-interval-ms`);
//!
//! then [`Config::validate`]d, with errors naming the key. Every key is declared once, with
//! its doc (and unit), its type and its default next to each other (the `settings!` sections
//! below); [`Config::keys`] lists them, the type gives the value check (an integer's width, an
//! enum's words), and the reference file `deploy/k8s/base/kvset.toml` and `kvset serve --help`
//! are generated from it (a test keeps the file equal).
//!
//! Identity keys have Kubernetes fallbacks: an empty `name` is taken from `POD_NAME` or
//! `HOSTNAME`, an empty `namespace` from `POD_NAMESPACE` (see [`Config::resolve`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

/// One configuration key: its dotted name, what it means (with its unit), and the check its
/// value's type makes (an integer's width, an enum's words).
#[derive(Debug, Clone, Copy)]
pub struct KeyDoc {
    pub key: &'static str,
    doc: &'static str,
    check: fn(&toml::Value) -> Result<(), String>,
}

impl KeyDoc {
    /// What the key means, with its unit.
    pub fn doc(&self) -> &'static str {
        self.doc.trim()
    }

    /// Checks that `value` fits the key's field.
    pub fn check(&self, value: &toml::Value) -> Result<(), String> {
        (self.check)(value)
    }
}

/// A type a configuration key can have, and what a value of it must be.
pub trait Setting {
    /// Checks a parsed value against the type (type mismatches are serde's to report).
    fn check(value: &toml::Value) -> Result<(), String>;
}

/// Integers are unsigned and as wide as their field.
fn check_integer(value: &toml::Value, max: i64) -> Result<(), String> {
    match value {
        toml::Value::Integer(v) if *v < 0 || *v > max => Err(format!("must be between 0 and {max}")),
        _ => Ok(()),
    }
}

impl Setting for u16 {
    fn check(value: &toml::Value) -> Result<(), String> {
        check_integer(value, u16::MAX as i64)
    }
}

impl Setting for u32 {
    fn check(value: &toml::Value) -> Result<(), String> {
        check_integer(value, u32::MAX as i64)
    }
}

impl Setting for u64 {
    fn check(value: &toml::Value) -> Result<(), String> {
        check_integer(value, i64::MAX)
    }
}

macro_rules! unchecked_setting {
    ($($t:ty),*) => {
        $(impl Setting for $t {
            fn check(_: &toml::Value) -> Result<(), String> {
                Ok(())
            }
        })*
    };
}
unchecked_setting!(bool, String, PathBuf, Vec<String>);

/// Enums are one of their words.
fn check_word(value: &toml::Value, words: &[&str]) -> Result<(), String> {
    match value {
        toml::Value::String(s) if !words.contains(&s.as_str()) => {
            let list: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
            Err(format!("must be one of {}", list.join(", ")))
        }
        _ => Ok(()),
    }
}

/// Declares a configuration section: the struct with each key's doc, type and default next to
/// its field, its `Default`, and its documented keys ([`KeyDoc`], in field order, named with
/// `prefix`). Fields marked `#[section]` are nested sections, whose keys follow.
macro_rules! settings {
    (
        prefix = $prefix:literal;
        $(#[doc = $sdoc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])+
                pub $field:ident: $ty:ty = $default:expr,
            )*
            $(#[section] pub $sfield:ident: $sty:ty,)*
        }
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $($(#[doc = $doc])+ pub $field: $ty,)*
            $(#[doc = concat!("The `[", stringify!($sfield), "]` section.")] pub $sfield: $sty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default,)* $($sfield: <$sty>::default(),)* }
            }
        }

        impl $name {
            /// The keys of this section and of the sections it holds, documented, in order.
            pub fn keys() -> Vec<KeyDoc> {
                #[allow(unused_mut)]
                let mut keys = vec![$(KeyDoc {
                    key: concat!($prefix, stringify!($field)),
                    doc: concat!($($doc),+),
                    check: <$ty as Setting>::check,
                },)*];
                $(keys.extend(<$sty>::keys());)*
                keys
            }
        }
    };
}

settings! {
    prefix = "";
    /// The whole configuration of a member.
    pub struct Config {
        /// Member name `<set>-<ordinal>`, e.g. `kvset-2`. Empty: taken from POD_NAME, then
        /// HOSTNAME.
        pub name: String = String::new(),
        /// Directory of this member's volume (Raft log, state, snapshots, identity).
        pub data_dir: PathBuf = PathBuf::from("/data"),
        /// Kubernetes namespace, for addresses. Empty: taken from POD_NAMESPACE, else `default`.
        pub namespace: String = String::new(),
        /// Name of the headless Service that gives members their DNS names.
        pub service: String = "kvset-peers".into(),
        /// Host other members and clients use to reach member N. Placeholders: {set} {ordinal}
        /// {service} {namespace}.
        pub advertise_host: String = "{set}-{ordinal}.{service}.{namespace}.svc.cluster.local".into(),
        /// Address the client, peer and ops listeners bind to.
        pub listen_host: String = "0.0.0.0".into(),
        /// Client gRPC port (Kv, Cluster, health, reflection) of ordinal 0.
        pub client_port: u16 = 2379,
        /// Peer gRPC port (Raft) of ordinal 0.
        pub peer_port: u16 = 2380,
        /// HTTP port of ordinal 0 for /metrics, /healthz and /readyz.
        pub ops_port: u16 = 2381,
        /// Ports of ordinal N are the ports above + N * port_stride. 0 in Kubernetes; 10 for a
        /// cluster on one host.
        pub port_stride: u16 = 0,
        /// Explicit host:port of each ordinal's peer endpoint (index = ordinal); overrides
        /// advertise_host when set.
        pub peer_addrs: Vec<String> = Vec::new(),
        /// Explicit host:port of each ordinal's client endpoint (index = ordinal); overrides
        /// advertise_host when set.
        pub client_addrs: Vec<String> = Vec::new(),
        /// Members of a brand-new cluster: ordinal 0 bootstraps only once ordinals
        /// 0..initial_replicas all answer empty.
        pub initial_replicas: u32 = 3,
        /// Where the desired replica count comes from: `static` (Cluster.SetReplicas) or
        /// `kubernetes` (the StatefulSet).
        pub replicas_source: ReplicasSource = ReplicasSource::Static,
        /// Kubernetes API server for the `kubernetes` replicas source. Empty: the in-cluster API
        /// and service account.
        pub kubernetes_api_url: String = String::new(),
        /// If set (32 hex chars), refuse to start on a volume of any other cluster.
        pub cluster_id: String = String::new(),
        /// DISASTER RECOVERY ONLY (quorum loss). The name of the one member, e.g. `kvset-0`, that
        /// rewrites the membership to itself alone, keeps its data and serves as a new cluster
        /// (new cluster id) that the other ordinals join with empty volumes. Other members ignore
        /// it; a member with an empty volume refuses to start; it acts once and is ignored until
        /// the member has started once without it.
        pub force_new_cluster: String = String::new(),
        /// How far a force_new_cluster recovery raises the store revision; everything below the new
        /// revision is marked compacted (etcd's --bump-revision --mark-compacted), so no revision
        /// number the lost cluster handed out is reused and watchers resuming below it are told
        /// to re-list. 0: keep the revisions (not recommended).
        pub force_new_cluster_bump_revision: u64 = kvset_storage::seed::DEFAULT_BUMP_REVISION,
        /// Space quota of the volume (like etcd's quota-backend-bytes): past it, writes that add
        /// data are refused with RESOURCE_EXHAUSTED and a NOSPACE alarm is raised; reads,
        /// deletes, compaction and defragmentation still work. 0: no quota.
        pub quota_bytes: u64 = 8 << 30,
        /// `text`, `json`, or `auto` (text on a terminal, json otherwise).
        pub log_format: LogFormat = LogFormat::Auto,
        /// tracing filter, e.g. `info` or `kvset_server=debug,info`; RUST_LOG wins when set.
        pub log_level: String = "info".into(),
        /// Milliseconds a graceful shutdown may take to drain requests and stop Raft before it is
        /// cut short.
        pub shutdown_timeout_ms: u64 = 10_000,
        /// On SIGTERM, a member whose ordinal is beyond the desired replicas waits up to this many
        /// milliseconds for the cluster to remove it before it stops (a scale-down never takes
        /// voters away faster than the cluster removes them). Other shutdowns do not wait.
        pub leave_timeout_ms: u64 = 30_000,
        /// Bytes of sled page cache: hot keys and history pages. sled counts pages by their size on
        /// disk; its real memory use is about 3x this (measured: 64 MiB cost 215 MiB more RSS than
        /// 8 MiB under writes).
        pub cache_bytes: u64 = 16 << 20,
        #[section] pub raft: RaftConfig,
        #[section] pub limits: Limits,
        #[section] pub batch: BatchConfig,
        #[section] pub watch: WatchConfig,
        #[section] pub lease: LeaseConfig,
        #[section] pub compaction: CompactionConfig,
        #[section] pub auth: AuthConfig,
        #[section] pub tls: TlsConfig,
    }
}

settings! {
    prefix = "raft.";
    /// Raft timing and log management.
    pub struct RaftConfig {
        /// Milliseconds between leader heartbeats.
        pub heartbeat_interval_ms: u64 = 100,
        /// Lower bound, in milliseconds, of the randomised election timeout (etcd's default).
        /// fsyncs run off the Raft core, so a disk stall longer than this causes no election; CPU
        /// starvation of the member for this long does.
        pub election_timeout_min_ms: u64 = 1000,
        /// Upper bound, in milliseconds, of the election timeout.
        pub election_timeout_max_ms: u64 = 2000,
        /// Milliseconds a peer RPC (append, vote, snapshot chunk) may take.
        pub rpc_timeout_ms: u64 = 2000,
        /// Build a snapshot after this many log entries since the last one.
        pub snapshot_every_entries: u64 = 10_000,
        /// Log entries kept behind a snapshot, so briefly lagging members catch up without one.
        pub keep_entries_after_snapshot: u64 = 1000,
        /// Bytes per snapshot chunk sent to a member.
        pub snapshot_chunk_bytes: u64 = 1 << 20,
        /// Most log entries in one AppendEntries RPC.
        pub max_payload_entries: u64 = 64,
        /// A learner is promoted to voter once its applied index is within this many entries of the
        /// leader's.
        pub catchup_lag_entries: u64 = 100,
    }
}

settings! {
    prefix = "limits.";
    /// Request limits; every one is enforced with `INVALID_ARGUMENT` naming it.
    pub struct Limits {
        /// Largest key, in bytes. Keys must also be non-empty.
        pub key_max_bytes: u64 = 4096,
        /// Largest value, in bytes.
        pub value_max_bytes: u64 = 1 << 20,
        /// Largest encoded client request, in bytes.
        pub request_max_bytes: u64 = 2 << 20,
        /// Most compares + ops in one Txn.
        pub txn_max_ops: u64 = 128,
        /// Most keys in one Range page.
        pub range_max_keys: u64 = 10_000,
        /// A Range page ends once its keys and values would pass this many bytes (at least one key
        /// is returned).
        pub response_max_bytes: u64 = 4 << 20,
        /// Largest answer, in bytes, a member reads back from the leader for a request it forwarded
        /// (gRPC's own ceiling, 2 GiB, by default). A write whose answer is larger still applies
        /// and its client is told UNKNOWN (the outcome cannot be read), never that it failed.
        pub forward_response_max_bytes: u64 = i32::MAX as u64,
        /// Most keys an etcd-API Range without a limit answers; 0: no bound, as etcd. A range
        /// with more is refused with RESOURCE_EXHAUSTED naming this key (page with `limit`).
        pub unpaged_range_max_keys: u64 = 0,
        /// Most bytes of keys and values an etcd-API Range without a limit answers: by default
        /// gRPC's largest message (2 GiB − 1), what etcd's server can send. Lower it to bound what
        /// one request may make a member hold; a larger range is refused with RESOURCE_EXHAUSTED
        /// naming this key (page with `limit`).
        pub unpaged_range_max_bytes: u64 = i32::MAX as u64,
        /// Linearizable reads that may wait for a ReadIndex round at once on one member; past it,
        /// reads get RESOURCE_EXHAUSTED (nothing is read or changed).
        pub pending_reads_max: u64 = 10_000,
    }
}

settings! {
    prefix = "batch.";
    /// The write batcher: client writes gathered into one Raft entry.
    pub struct BatchConfig {
        /// Most client commands gathered into one Raft entry.
        pub max_commands: u64 = 512,
        /// Most bytes of client commands gathered into one Raft entry.
        pub max_bytes: u64 = 2 << 20,
        /// Raft entries proposed and not yet applied at once; writes arriving meanwhile wait and
        /// form the next batch.
        pub in_flight: u64 = 2,
        /// Writes that may wait for a batch before new ones get RESOURCE_EXHAUSTED (backpressure).
        pub queue: u64 = 10_000,
    }
}

settings! {
    prefix = "watch.";
    /// Watches: limits and timing.
    pub struct WatchConfig {
        /// Most watches one Watch stream may hold; more are refused (canceled at creation).
        pub max_per_stream: u64 = 1_000,
        /// Most watches one member serves over all its streams.
        pub max_per_member: u64 = 10_000,
        /// A watch created with progress_notify gets a progress response after this many
        /// milliseconds without events.
        pub progress_interval_ms: u64 = 600_000,
        /// Revisions of recent events kept in memory for watchers; older ones are read back from
        /// the history.
        pub event_cache_revisions: u64 = 100_000,
        /// Bytes of recent events kept in memory for watchers.
        pub event_cache_bytes: u64 = 8 << 20,
        /// A watch response holds whole revisions up to about this many bytes (one revision is
        /// never split).
        pub response_max_bytes: u64 = 1 << 20,
        /// Responses queued per Watch stream for a slow client; past it the stream waits (and lags,
        /// then catches up from the history) without holding up anything else.
        pub send_queue: u64 = 64,
    }
}

settings! {
    prefix = "lease.";
    /// Leases: limits and timing.
    pub struct LeaseConfig {
        /// Shortest lease TTL, in seconds (kvset.v1 refuses shorter; the etcd API raises shorter
        /// ones to it, as etcd does).
        pub min_ttl_seconds: u64 = 5,
        /// Longest lease TTL, in seconds.
        pub max_ttl_seconds: u64 = 9_000_000_000,
        /// Most leases the cluster holds; grants past it get RESOURCE_EXHAUSTED.
        pub max_leases: u64 = 100_000,
        /// Milliseconds between the leader's checks for expired leases.
        pub check_interval_ms: u64 = 500,
        /// Most expired leases the leader revokes per check.
        pub revoke_per_check: u64 = 1_000,
    }
}

settings! {
    prefix = "compaction.";
    /// Automatic compaction of the history.
    pub struct CompactionConfig {
        /// Automatic compaction keeps at least this many revisions of history (0: no limit by
        /// count).
        pub retain_revisions: u64 = 100_000,
        /// Automatic compaction keeps at least this many milliseconds of history (0: no limit by
        /// age). With both set, history is kept while either asks for it; with both 0, nothing is
        /// compacted automatically.
        pub retain_ms: u64 = 0,
        /// Milliseconds between the leader's automatic compaction checks.
        pub check_interval_ms: u64 = 60_000,
    }
}

settings! {
    prefix = "auth.";
    /// Access control (`[auth]`): users and roles themselves are replicated data, managed through
    /// etcd's Auth API.
    pub struct AuthConfig {
        /// Seconds a token from Authenticate stays valid (etcd's --auth-token-ttl). Tokens work on
        /// every member; a password change or the user's deletion ends them at once.
        pub token_ttl_seconds: u64 = 300,
        /// bcrypt cost of password hashes (etcd's --bcrypt-cost): 4..31; each step doubles the time
        /// to hash and to check a password.
        pub bcrypt_cost: u64 = 10,
        /// A file (e.g. a mounted Kubernetes Secret) holding at least 32 bytes of secret, the same
        /// on every member, that token signatures also depend on: whoever holds a volume (which
        /// keeps the per-enable key of the replicated state) cannot sign tokens without it. Read
        /// at start. Empty: tokens are signed with the replicated key alone. Backups never hold
        /// either.
        pub token_key_file: String = String::new(),
    }
}

settings! {
    prefix = "tls.";
    /// TLS on the client and peer ports (`[tls]`); off while `cert_file` is empty.
    pub struct TlsConfig {
        /// PEM certificate (chain, leaf first) of this member. Empty: no TLS on any port. When set,
        /// the client and peer ports speak only TLS (no plaintext fallback), the certificate is
        /// served on both and presented to the members this one dials; it must name this member's
        /// tls.member_dns_name (and the names clients dial). `{name}` is replaced by the member
        /// name, so one Secret per pod can be mounted side by side.
        pub cert_file: String = String::new(),
        /// PEM private key of tls.cert_file (PKCS#8, PKCS#1 or SEC1); `{name}` as there.
        pub key_file: String = String::new(),
        /// PEM CA bundle of the members' certificates: a member accepts a peer, and trusts a member
        /// it dials, only if its certificate chains to this bundle and names that member's
        /// tls.member_dns_name. `{name}` as in tls.cert_file.
        pub ca_file: String = String::new(),
        /// Require a client certificate on the client port that chains to tls.client_ca_file
        /// (etcd's --client-cert-auth). false: any client that completes the TLS handshake may
        /// call.
        pub client_cert_auth: bool = false,
        /// PEM CA bundle for client certificates (with tls.client_cert_auth). Empty: tls.ca_file.
        /// Members' own certificates are accepted on the client port too (members call each
        /// other's client port).
        pub client_ca_file: String = String::new(),
        /// The DNS name the certificate of member N must carry as a subject alternative name;
        /// placeholders as in advertise_host. Members are verified by this name whatever address
        /// they are dialled at.
        pub member_dns_name: String = "{set}-{ordinal}.{service}.{namespace}.svc.cluster.local".into(),
        /// Serve the ops port (/metrics, /healthz, /readyz) over TLS too, with the member's
        /// certificate and no client certificate (probes then need `scheme: HTTPS`). false: plain
        /// HTTP, as etcd's --listen-metrics-urls.
        pub ops: bool = false,
        /// Milliseconds between checks of the certificate, key and CA files for changes
        /// (cert-manager renewals, updated Secrets). A change applies to new connections without
        /// a restart; files that fail to load are logged and the previous material stays in use.
        pub reload_interval_ms: u64 = 5_000,
    }
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

impl Setting for ReplicasSource {
    fn check(value: &toml::Value) -> Result<(), String> {
        check_word(value, &["static", "kubernetes"])
    }
}

impl Setting for LogFormat {
    fn check(value: &toml::Value) -> Result<(), String> {
        check_word(value, &["auto", "text", "json"])
    }
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

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

/// Checks a value fits its key's field (integers their width, words their enum); unknown keys
/// are reported elsewhere.
fn check_range(key: &str, value: &toml::Value) -> Result<(), String> {
    Config::keys().iter().find(|k| k.key == key).map_or(Ok(()), |k| k.check(value))
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
            ("limits.unpaged_range_max_bytes", l.unpaged_range_max_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if l.unpaged_range_max_bytes > i32::MAX as u64 {
            return bad(
                "limits.unpaged_range_max_bytes",
                format!("must be at most {} (gRPC's largest message)", i32::MAX),
            );
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
        for doc in Self::keys() {
            let (sec, leaf) = doc.key.rsplit_once('.').unwrap_or(("", doc.key));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            out.push('\n');
            for line in wrap(doc.doc(), 92) {
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
        let keys = Config::keys();
        let documented: Vec<&str> = keys.iter().map(|k| k.key).collect();
        for key in defaults.keys() {
            assert_eq!(
                documented.iter().filter(|d| **d == key).count(),
                1,
                "key {key} must be documented once"
            );
        }
        assert_eq!(documented.len(), defaults.len(), "a documented key does not exist");
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
        let err = Config::load(None, &env(&[("KVSET_INITIAL_REPLICAS", "5000000000")]), &[]).unwrap_err();
        assert!(err.to_string().contains("4294967295"), "a u32 field's width: {err}");
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
