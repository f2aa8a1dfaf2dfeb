//! `kvset serve`: one flag per configuration key, generated from the documented key table, so
//! `kvset serve --help` lists every key with its unit and nothing can drift.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Arg;
use clap::ArgAction;
use clap::ArgMatches;
use kvset_server::config::flag;
use kvset_server::Config;
use kvset_server::Listeners;
use kvset_server::Node;
use kvset_server::NodeOptions;

/// Arguments of `kvset serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    config: Option<PathBuf>,
    print_config: bool,
    sets: Vec<(String, String)>,
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let sets = Config::keys()
            .iter()
            .filter_map(|k| m.get_one::<String>(k.key).map(|v| (k.key.to_string(), v.clone())))
            .collect();
        Ok(Self {
            config: m.get_one::<PathBuf>("config").cloned(),
            print_config: m.get_flag("print_config"),
            sets,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd
            .arg(
                Arg::new("config")
                    .long("config")
                    .env("KVSET_CONFIG")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML configuration file (reference: deploy/k8s/base/kvset.toml)"),
            )
            .arg(
                Arg::new("print_config")
                    .long("print-config")
                    .action(ArgAction::SetTrue)
                    .help("Print the effective configuration as TOML and exit"),
            );
        for k in Config::keys() {
            cmd = cmd.arg(Arg::new(k.key).long(flag(k.key)).value_name("VALUE").help(k.doc()));
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Environment variable naming the pid of a supervising parent (`kvset cluster up`): the
/// member shuts down when that parent is gone, so no member outlives its supervisor.
pub const PARENT_PID_ENV: &str = "KVSET_SUPERVISOR_PID";

/// Completes when the supervising parent named by [`PARENT_PID_ENV`] has exited.
async fn parent_gone() {
    #[cfg(unix)]
    if let Some(pid) = std::env::var(PARENT_PID_ENV).ok().and_then(|p| p.parse::<u32>().ok()) {
        loop {
            if std::os::unix::process::parent_id() != pid {
                tracing::warn!(parent = pid, "the supervising process is gone; shutting down");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    std::future::pending::<()>().await
}

/// Waits for SIGTERM, Ctrl-C, or the end of a supervising parent.
pub async fn termination() {
    tokio::select! {
        _ = signals() => {}
        _ = parent_gone() => {}
    }
}

async fn signals() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this member");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a member until SIGTERM / Ctrl-C.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let mut config = Config::load(args.config.as_deref(), &env, &args.sets)?;
    config.resolve(&env);
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    kvset_server::logging::init(config.log_format, &config.log_level);
    loop {
        let listeners = Listeners::bind(&config).await?;
        let node = Node::start(config.clone(), listeners, termination(), NodeOptions::default())
            .await
            .context("cannot start the member")?;
        let defrag = node.member().defrag_flag();
        node.wait().await.map_err(|e| anyhow::anyhow!("member stopped with an error: {e}"))?;
        // A member that stopped to be defragmented starts again at once; the start rewrites
        // the database first. Any other stop (SIGTERM) ends the process.
        if !defrag.load(std::sync::atomic::Ordering::Acquire)
            || !kvset_storage::defrag::requested(&config.data_dir)
        {
            return Ok(());
        }
        tracing::info!("starting again to defragment the database");
    }
}
