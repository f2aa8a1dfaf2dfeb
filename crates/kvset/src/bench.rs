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
    /// put, get, get-serializable, mixed, txn.
    #[arg(long, default_value = "put")]
    workload: String,
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
    timeout: Duration,
) -> anyhow::Result<()> {
    let workload = Workload::parse(&args.workload, args.read_percent).map_err(anyhow::Error::msg)?;
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
        "kvset" => Target::Kvset(Client::new(
            endpoints.iter().cloned(),
            ClientOptions { timeout, ..Default::default() },
        )?),
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
