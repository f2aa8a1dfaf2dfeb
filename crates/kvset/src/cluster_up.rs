//! `kvset cluster up`: a local cluster on loopback, supervised the way a StatefulSet
//! controller would run it.
//!
//! Members `kvset-0..N` run as child processes of this binary (`kvset serve`), each with its
//! own data directory under `--dir` and ports `base + 10·ordinal` (client), `+1` (peer), `+2`
//! (ops). They bootstrap by themselves (no explicit initialisation). The supervisor then
//! follows the cluster's desired replica count (`kvset member scale N`): it starts missing
//! ordinals in order and stops members once the cluster has removed them, highest first. A
//! member that exits unexpectedly is restarted with its volume, like a pod by its kubelet.
//! Ctrl-C (or SIGTERM) sends SIGTERM to every member and waits for them; members also stop by
//! themselves if the supervisor disappears.

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::bail;
use anyhow::Context;
use kvset_client::Client;
use kvset_client::ClientOptions;
use tokio::process::Child;

/// Arguments of `kvset cluster up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Members to start (the initial replicas), 1..9.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Directory holding each member's data directory and log file.
    #[arg(long, default_value = ".kvset")]
    dir: PathBuf,
    /// Client port of kvset-0; its peer port is +1 and ops port +2; member N adds 10·N.
    #[arg(long, default_value_t = 2379)]
    base_port: u16,
    /// TLS everywhere: mutual TLS between members and for clients, with a throwaway CA and
    /// certificates generated under `<dir>/tls` (kept across runs; delete the directory for new
    /// ones).
    #[arg(long)]
    tls: bool,
}

/// The most members `cluster up` runs (and issues certificates for).
const MAX_NODES: u32 = 9;

/// The DNS name members' certificates carry locally (`tls.member_dns_name`).
const LOCAL_DNS_NAME: &str = "{set}-{ordinal}.kvset.local";

/// Where `cluster up --tls` keeps its certificates.
fn tls_dir(args: &UpArgs) -> PathBuf {
    args.dir.join("tls")
}

/// Creates the CA, a certificate per ordinal and a client certificate for `root`, unless they
/// exist. The CA's key is not kept: more certificates mean a new directory.
fn ensure_certificates(dir: &Path) -> anyhow::Result<()> {
    use kvset_server::devcerts::Authority;
    use kvset_server::devcerts::Request;
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    let staging = dir.with_extension("new");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let ca = Authority::new("kvset local CA")?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = staging.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        if name.ends_with("-key.pem") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    for ordinal in 0..MAX_NODES {
        let name = format!("kvset-{ordinal}");
        let dns = LOCAL_DNS_NAME.replace("{set}", "kvset").replace("{ordinal}", &ordinal.to_string());
        let issued = ca.issue(&Request::member(&name, &dns))?;
        write(&format!("{name}.pem"), &issued.cert_pem)?;
        write(&format!("{name}-key.pem"), &issued.key_pem)?;
    }
    let client = ca.issue(&Request::client("root"))?;
    write("client.pem", &client.cert_pem)?;
    write("client-key.pem", &client.key_pem)?;
    write("ca.pem", &ca.cert_pem())?;
    std::fs::rename(&staging, dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(())
}

struct Pod {
    child: Child,
    started: Instant,
    restarts: u32,
}

struct Supervisor {
    args: UpArgs,
    exe: PathBuf,
    pods: BTreeMap<u32, Pod>,
}

impl Supervisor {
    fn port(&self, ordinal: u32, offset: u16) -> u16 {
        self.args.base_port + offset + 10 * ordinal as u16
    }

    fn client_addr(&self, ordinal: u32) -> String {
        format!("127.0.0.1:{}", self.port(ordinal, 0))
    }

    fn start(&mut self, ordinal: u32, restarts: u32) -> anyhow::Result<()> {
        let name = format!("kvset-{ordinal}");
        let data = self.args.dir.join(&name);
        let log_path = self.args.dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("serve")
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-host", "127.0.0.1", "--advertise-host", "127.0.0.1", "--port-stride", "10"])
            .args(["--client-port", &self.port(0, 0).to_string()])
            .args(["--peer-port", &self.port(0, 1).to_string()])
            .args(["--ops-port", &self.port(0, 2).to_string()])
            .args(["--initial-replicas", &self.args.nodes.to_string(), "--log-format", "text"]);
        if self.args.tls {
            let tls = tls_dir(&self.args);
            cmd.arg("--tls-cert-file")
                .arg(tls.join("{name}.pem"))
                .arg("--tls-key-file")
                .arg(tls.join("{name}-key.pem"))
                .arg("--tls-ca-file")
                .arg(tls.join("ca.pem"))
                .args(["--tls-client-cert-auth", "true", "--tls-member-dns-name", LOCAL_DNS_NAME]);
        }
        cmd.env(crate::config_flags::PARENT_PID_ENV, std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // Its own process group: a terminal Ctrl-C reaches the supervisor only, which then
        // stops the members in order.
        #[cfg(unix)]
        cmd.process_group(0);
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        self.pods.insert(ordinal, Pod { child, started: Instant::now(), restarts });
        Ok(())
    }

    fn running(&self) -> Vec<u32> {
        self.pods.keys().copied().collect()
    }
}

/// Sends SIGTERM to a child.
fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
}

async fn stop(pod: &mut Pod, grace: Duration) {
    terminate(&pod.child);
    if tokio::time::timeout(grace, pod.child.wait()).await.is_err() {
        let _ = pod.child.kill().await;
    }
}

/// Runs the local cluster until Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    if args.base_port as u32 + 10 * 9 + 2 > u16::MAX as u32 {
        bail!("--base-port is too high");
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let client_tls = if args.tls {
        let dir = tls_dir(&args);
        ensure_certificates(&dir)?;
        let (ca, cert, key) = (dir.join("ca.pem"), dir.join("client.pem"), dir.join("client-key.pem"));
        Some(kvset_client::client_tls_from_files(&ca, Some((&cert, &key)))?)
    } else {
        None
    };
    let exe = std::env::current_exe().context("cannot find the kvset binary")?;
    let mut sup = Supervisor { args, exe, pods: BTreeMap::new() };
    for ordinal in 0..sup.args.nodes {
        sup.start(ordinal, 0)?;
    }
    let endpoints: Vec<String> = (0..sup.args.nodes).map(|o| sup.client_addr(o)).collect();
    println!(
        "kvset: local cluster of {} members, data and logs under {}",
        sup.args.nodes,
        sup.args.dir.display()
    );
    println!("{:<9} {:<17} {:<17} {:<17} LOG", "MEMBER", "CLIENT", "PEER", "OPS (HTTP)");
    for o in 0..sup.args.nodes {
        println!(
            "kvset-{o:<3} 127.0.0.1:{:<7} 127.0.0.1:{:<7} 127.0.0.1:{:<7} {}",
            sup.port(o, 0),
            sup.port(o, 1),
            sup.port(o, 2),
            sup.args.dir.join(format!("kvset-{o}.log")).display()
        );
    }
    println!("\nTry, from another terminal:");
    println!("  export KVSET_ENDPOINTS={}", endpoints.join(","));
    if sup.args.tls {
        let dir = tls_dir(&sup.args);
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let (ca, cert, key) = (dir.join("ca.pem"), dir.join("client.pem"), dir.join("client-key.pem"));
        println!(
            "  export KVSET_CACERT={} KVSET_CERT={} KVSET_KEY={}",
            ca.display(),
            cert.display(),
            key.display()
        );
        println!(
            "  # etcdctl: etcdctl --endpoints {} --cacert {} --cert {} --key {} get --prefix ''",
            endpoints.join(","),
            ca.display(),
            cert.display(),
            key.display()
        );
    }
    println!("  kvset put greeting hello && kvset get greeting && kvset status");
    println!(
        "  open http://127.0.0.1:{}/    # the cluster page (every member's ops port serves it)",
        sup.port(0, 2)
    );
    println!("  kvset member scale 5      # ordinals 3 and 4 start, join and are promoted in order");
    println!("Ctrl-C stops every member.\n");

    let mut desired = sup.args.nodes;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let term = crate::config_flags::termination();
    tokio::pin!(term);
    loop {
        tokio::select! {
            biased;
            _ = &mut term => break,
            _ = ticker.tick() => {}
        }
        // Restart members that died, like a kubelet.
        let mut died = Vec::new();
        for (o, pod) in sup.pods.iter_mut() {
            if let Ok(Some(status)) = pod.child.try_wait() {
                died.push((*o, status, pod.restarts, pod.started.elapsed()));
            }
        }
        for (o, status, restarts, uptime) in died {
            sup.pods.remove(&o);
            if o < desired {
                println!("kvset-{o} exited ({status}) after {uptime:?}; restarting it with its volume");
                if uptime < Duration::from_secs(5) {
                    tokio::time::sleep(Duration::from_secs(2u64.pow(restarts.min(4)))).await;
                }
                sup.start(o, restarts + 1)?;
            }
        }

        // Follow the desired replica count.
        let addrs: Vec<String> = sup.running().iter().map(|o| sup.client_addr(*o)).collect();
        let client = Client::new(
            addrs.clone(),
            ClientOptions { timeout: Duration::from_secs(2), tls: client_tls.clone(), ..Default::default() },
        )?;
        let mut seen = None;
        for addr in &addrs {
            if let Ok(s) = client.status_of(addr).await {
                if s.desired_replicas > 0 && !s.cluster_id.is_empty() {
                    seen = Some(s.desired_replicas);
                    break;
                }
            }
        }
        if let Some(n) = seen {
            if n != desired {
                println!("desired replicas: {desired} -> {n}");
                desired = n;
            }
        }
        for o in 0..desired {
            if !sup.pods.contains_key(&o) {
                println!("starting kvset-{o} (client 127.0.0.1:{})", sup.port(o, 0));
                sup.start(o, 0)?;
            }
        }
        // Stop members beyond the desired count once the cluster removed them, highest first.
        if let Some(&highest) = sup.pods.keys().next_back() {
            if highest >= desired {
                let still_member = match client.member_list().await {
                    Ok(list) => list.members.iter().any(|m| m.ordinal == highest),
                    Err(_) => true,
                };
                if !still_member {
                    println!("stopping kvset-{highest}: the cluster removed it");
                    if let Some(mut pod) = sup.pods.remove(&highest) {
                        stop(&mut pod, Duration::from_secs(15)).await;
                    }
                }
            }
        }
    }

    println!("\nstopping every member");
    for (o, pod) in sup.pods.iter_mut().rev() {
        stop(pod, Duration::from_secs(15)).await;
        println!("kvset-{o} stopped");
    }
    Ok(())
}
