//! `kvset bench`: see `kvset-bench`.

use std::time::Duration;

use anyhow::bail;
use kvset_bench::BenchConfig;
use kvset_bench::Target;
use kvset_bench::Workload;
use kvset_client::Client;
use kvset_client::ClientOptions;

use crate::output::Format;

/// Arguments of `kvset bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The system under load: `kvset`, or `etcd` (binary built with --features etcd).
    #[arg(long, default_value = "kvset")]
    target: String,
    /// put, get, get-serializable, mixed, txn, watch, lease-keepalive.
    #[arg(long, default_value = "put")]
    workload: String,
    /// Watches on the watched prefix (the `watch` workload).
    #[arg(long, default_value_t = 10)]
    watchers: usize,
    /// Puts per second under the watched prefix (the `watch` workload).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Percent of gets in the `mixed` workload.
    #[arg(long, default_value_t = 90)]
    read_percent: u8,
    /// Concurrent closed-loop clients.
    #[arg(long, short = 'c', default_value_t = 16)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests instead of after --duration.
    #[arg(long)]
    ops: Option<u64>,
    /// Keys are drawn from this many.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Draw keys by a Zipf law with this exponent (e.g. 1.1) instead of uniformly.
    #[arg(long)]
    zipf: Option<f64>,
    /// Do not write the key space before read workloads.
    #[arg(long)]
    no_prefill: bool,
    /// Seed of the key choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Runs `kvset bench`.
pub async fn run(
    args: BenchArgs,
    endpoints: &[String],
    format: Format,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let workload = if args.workload == "watch" {
        Workload::Watch { watchers: args.watchers, rate: args.rate }
    } else {
        Workload::parse(&args.workload, args.read_percent).map_err(anyhow::Error::msg)?
    };
    if args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    let config = BenchConfig {
        workload,
        clients: args.clients,
        duration: Duration::from_secs_f64(args.duration),
        ops: args.ops,
        key_space: args.key_space,
        value_size: args.value_size,
        zipf: args.zipf,
        prefill: !args.no_prefill,
        seed: args.seed,
    };
    let target = match args.target.as_str() {
        "kvset" => Target::Kvset(Client::new(endpoints.iter().cloned(), options.clone())?),
        #[cfg(feature = "etcd")]
        "etcd" => Target::etcd(endpoints).await.map_err(anyhow::Error::msg)?,
        #[cfg(not(feature = "etcd"))]
        "etcd" => {
            bail!("this kvset was built without the etcd target: cargo build --release --features etcd")
        }
        other => bail!("unknown target {other:?}: kvset or etcd"),
    };
    let progress = format == Format::Human && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = kvset_bench::run(target, &config, progress).await?;
    match format {
        Format::Json => println!("{}", serde_json::to_string(&report)?),
        Format::Human => {
            println!("{}", report.line());
            if !report.errors.is_empty() {
                println!("errors: {:?}", report.errors);
            }
        }
    }
    Ok(())
}

/// Arguments of `kvset bench-compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Directory for the results (`<date>-<host>.md`, `.png`, `.json`).
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
    /// Scratch directory for both clusters' data (wiped first).
    #[arg(long, default_value = "/tmp/kvset-compare")]
    work: std::path::PathBuf,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    etcd: std::path::PathBuf,
    /// Seconds per measured cell.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Workloads (`watch`: the client count is the number of watchers, writes at --watch-rate).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "put,get,get-serializable,mixed,watch,lease-keepalive"
    )]
    workloads: Vec<String>,
    /// Puts per second in the watch workload.
    #[arg(long, default_value_t = 500)]
    watch_rate: u64,
    /// Keys drawn from this many (read workloads write them all first).
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
}

/// Runs `kvset bench-compare`.
pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    #[cfg(not(feature = "etcd"))]
    {
        let _ = args;
        bail!("this kvset was built without the etcd target: bench/compare.sh builds it with --features etcd")
    }
    #[cfg(feature = "etcd")]
    {
        let workloads = args
            .workloads
            .iter()
            .map(|w| match w.as_str() {
                // Watchers = the cell's client count; a fixed write rate.
                "watch" => Ok(Workload::Watch { watchers: 1, rate: args.watch_rate }),
                other => Workload::parse(other, 90),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let etcd =
            which(&args.etcd).ok_or_else(|| anyhow::anyhow!("etcd binary {:?} not found", args.etcd))?;
        let cfg = kvset_bench::compare::CompareConfig {
            out: args.out,
            work: args.work,
            etcd,
            kvset: std::env::current_exe()?,
            workloads,
            clients: args.clients,
            duration: Duration::from_secs_f64(args.duration),
            key_space: args.key_space,
            value_size: args.value_size,
        };
        let md = kvset_bench::compare::run(&cfg).await.map_err(anyhow::Error::msg)?;
        println!("results: {}", md.display());
        Ok(())
    }
}

#[cfg(feature = "etcd")]
fn which(name: &std::path::Path) -> Option<std::path::PathBuf> {
    if name.components().count() > 1 {
        return name.exists().then(|| name.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}
