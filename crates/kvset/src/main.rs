//! The `kvset` binary: a thin wrapper over `kvset-server` (serve), `kvset-client` (every
//! client command) and a local cluster supervisor (`cluster up`).

mod backup;
mod bench;
mod cluster_up;
mod commands;
mod config_flags;
mod output;

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::Subcommand;

use kvset_client::ClientOptions;

use crate::output::Format;

/// mimalloc: the write path allocates per request and per entry (protobuf, postcard, sled
/// nodes); glibc malloc took about 12% of the cluster's CPU under load (perf, `kvset bench`
/// put at 256 clients).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kvset: a Raft-replicated key-value store for Kubernetes StatefulSets.
#[derive(Debug, Parser)]
#[command(name = "kvset", version, about, propagate_version = true)]
struct Cli {
    /// Client endpoints (host:port, comma-separated).
    #[arg(
        long,
        global = true,
        env = "KVSET_ENDPOINTS",
        default_value = "127.0.0.1:2379",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    output: Format,
    /// Deadline of each client call, in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    /// Speak TLS to the endpoints, trusting this PEM CA bundle (etcdctl's --cacert).
    #[arg(long, global = true, env = "KVSET_CACERT")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present, with --key; needs --cacert.
    #[arg(long = "cert", id = "tls_cert", global = true, env = "KVSET_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Log in as USER:PASSWORD when access control is on (etcdctl's --user).
    #[arg(long, global = true, env = "KVSET_USER", value_name = "USER:PASSWORD")]
    user: Option<String>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", id = "tls_key", global = true, env = "KVSET_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a member (configuration: defaults < --config file < KVSET_* env < flags).
    Serve(config_flags::ServeArgs),
    /// Read a key.
    Get {
        key: String,
        /// Serve from the contacted member's own state (may be stale) instead of the leader.
        #[arg(long)]
        serializable: bool,
        /// Read the key as it was at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
    /// Set a key.
    Put {
        key: String,
        value: String,
        /// Print the previous value.
        #[arg(long)]
        prev: bool,
        /// Attach the key to this lease (it is deleted when the lease ends).
        #[arg(long, default_value_t = 0)]
        lease: i64,
    },
    /// Delete a key, a prefix or a range.
    Del {
        key: String,
        /// Delete every key with this prefix.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
        /// Delete keys in [key, range_end).
        #[arg(long)]
        range_end: Option<String>,
    },
    /// List keys of a prefix or range, following pages.
    #[command(alias = "ls")]
    Range {
        /// Start key or prefix (default: everything).
        #[arg(default_value = "")]
        key: String,
        /// Treat the key as a prefix (the default when no --range-end is given).
        #[arg(long)]
        prefix: bool,
        /// Read keys in [key, range_end).
        #[arg(long, conflicts_with = "prefix")]
        range_end: Option<String>,
        /// Stop after this many keys (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// Print the number of keys only.
        #[arg(long)]
        count: bool,
        /// Serve from the contacted member's own state.
        #[arg(long)]
        serializable: bool,
        /// Read the range as it was at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
    /// Print the changes of a key, a prefix or a range as they happen (Ctrl-C stops).
    Watch {
        key: String,
        /// Watch every key with this prefix.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
        /// Watch the keys in [key, range_end).
        #[arg(long)]
        range_end: Option<String>,
        /// Start at this revision (replaying history); 0 for changes after now.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Print each key's previous value too.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Leases: keys that vanish when their lease is not kept alive.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Forget the history before a revision (reads and watches below it are refused).
    Compact { revision: i64 },
    /// Transactions.
    #[command(subcommand)]
    Txn(TxnCommand),
    /// Status of each endpoint's member.
    Status,
    /// Membership (it manages itself; these are overrides and views).
    #[command(subcommand)]
    Member(MemberCommand),
    /// Backups: save one from a member, check one, restore one into a new cluster's volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Defragment: return the space of deleted and compacted data to the filesystem. Online:
    /// each endpoint's member in turn stops, rewrites its database and serves again (the next
    /// one only once it is back). Offline (--data-dir): rewrite a stopped member's volume.
    Defrag {
        /// The data directory of a stopped member, to defragment offline.
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Local clusters.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Closed-loop load generator against kvset (or etcd, built with --features etcd).
    Bench(bench::BenchArgs),
    /// kvset and etcd side by side on this machine (built with --features etcd; see
    /// bench/compare.sh).
    BenchCompare(bench::CompareArgs),
}

#[derive(Debug, Subcommand)]
enum TxnCommand {
    /// Compare-and-swap: set KEY to NEW if its value is EXPECTED (or if absent, with
    /// --expect-absent).
    Cas {
        key: String,
        /// The value the key must have.
        #[arg(long, required_unless_present = "expect_absent")]
        expect: Option<String>,
        /// Require the key not to exist.
        #[arg(long, conflicts_with = "expect")]
        expect_absent: bool,
        /// The new value.
        #[arg(long = "set")]
        new: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Stream a consistent backup (keys, history, leases, compact revision) from the first
    /// endpoint's member into FILE (or a new timestamped file in --dir); it is checked before
    /// it gets its final name.
    Save {
        #[arg(required_unless_present = "dir", conflicts_with = "dir")]
        file: Option<std::path::PathBuf>,
        /// Write `kvset-backup-<unix milliseconds>.snap` into this directory instead.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// With --dir: after a successful backup, delete the oldest `kvset-backup-*.snap`
        /// files there until this many remain.
        #[arg(long, requires = "dir", value_parser = clap::value_parser!(u32).range(1..))]
        keep: Option<u32>,
    },
    /// Check a backup file and print its revision, keys, versions, leases and size.
    Status { file: std::path::PathBuf },
    /// Prepare the volume of one member (offline) so that it starts a NEW cluster (new cluster
    /// id) holding the backup's data; the other ordinals join it with empty volumes.
    Restore {
        file: std::path::PathBuf,
        /// The member's data directory (absent or empty).
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// The member that will start on it (its ordinal is recorded in the volume).
        #[arg(long, default_value = "kvset-0")]
        name: String,
        /// Raise the store revision by this much and mark everything below the new revision
        /// compacted (etcd's --bump-revision --mark-compacted): no revision the old cluster
        /// handed out after the backup is reused, and watchers resuming below it re-list.
        /// 0 keeps the backup's revisions.
        #[arg(long, default_value_t = kvset_storage::seed::DEFAULT_BUMP_REVISION)]
        bump_revision: u64,
    },
    /// Make the first endpoint's member build a Raft snapshot now (compacts its log).
    Trigger,
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Grant a lease of TTL seconds.
    Grant {
        ttl: i64,
        /// The id to give it (default: the leader chooses).
        #[arg(long, default_value_t = 0)]
        id: i64,
    },
    /// Revoke a lease, deleting its keys.
    Revoke { id: i64 },
    /// Keep a lease alive until Ctrl-C, printing each renewal.
    KeepAlive {
        id: i64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// A lease's remaining and granted TTL.
    Ttl {
        id: i64,
        /// List the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// Every lease.
    List,
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// List members (from the leader).
    List,
    /// Set the desired number of voters; members join or leave in ordinal order.
    Scale { replicas: u32 },
    /// Add a learner by hand.
    Add {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        ordinal: u32,
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        client_addr: String,
    },
    /// Promote a learner to voter by hand.
    Promote { node_id: u64 },
    /// Remove a member by hand.
    Remove { node_id: u64 },
    /// Hand leadership to another voter (the leader also does this by itself when it stops).
    TransferLeader {
        /// The voter to hand it to, by name (`kvset-1`) or node id; default: the most
        /// up-to-date voter.
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start a local cluster on loopback; Ctrl-C stops it.
    Up(cluster_up::UpArgs),
}

/// The client settings of the global flags.
fn client_options(
    timeout: Duration,
    cacert: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<ClientOptions> {
    let tls = match (cacert, cert.zip(key)) {
        (Some(ca), identity) => Some(kvset_client::client_tls_from_files(ca, identity)?),
        (None, Some(_)) => {
            anyhow::bail!("--cert and --key need --cacert (the CA the servers' certificates chain to)")
        }
        (None, None) => None,
    };
    Ok(ClientOptions { timeout, tls, ..Default::default() })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_secs_f64(cli.timeout.max(0.001));
    let serving = matches!(cli.command, Command::Serve(_));
    let result = runtime.block_on(async move {
        let options = || {
            let mut options = client_options(
                timeout,
                cli.cacert.as_deref(),
                cli.tls_cert.as_deref(),
                cli.tls_key.as_deref(),
            )?;
            if let Some(user) = &cli.user {
                let (name, password) =
                    user.split_once(':').ok_or_else(|| anyhow::anyhow!("--user takes USER:PASSWORD"))?;
                options.user = Some((name.to_string(), password.to_string()));
            }
            Ok::<_, anyhow::Error>(options)
        };
        match cli.command {
            Command::Serve(args) => config_flags::serve(args).await,
            Command::Cluster(ClusterCommand::Up(args)) => cluster_up::run(args).await,
            Command::Bench(args) => bench::run(args, &cli.endpoints, cli.output, &options()?).await,
            Command::BenchCompare(args) => bench::compare(args).await,
            Command::Snapshot(c) => backup::run(c, &cli.endpoints, cli.output, &options()?).await,
            Command::Defrag { data_dir } => {
                backup::defrag(data_dir, &cli.endpoints, cli.output, &options()?).await
            }
            other => commands::run(other, &cli.endpoints, cli.output, &options()?).await,
        }
    });
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    if serving {
        // The member has flushed and stopped (or given up within shutdown_timeout_ms). A storage
        // thread stuck on a failing disk must not keep the process alive: dropping the runtime
        // would wait for it, and so would sled's own flush on drop. Exit now.
        std::process::exit(code);
    }
    if code == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
