//! `kvset bench compare`: kvset and etcd side by side, same machine, same layout (3 members on
//! loopback, data directories on the same filesystem, fsync on for both), same workload code.
//!
//! For every workload and client count the two systems run back to back, in alternating order,
//! so machine noise hits both. The results file gives the raw numbers, the kvset/etcd ratio of
//! every cell, CPU seconds and peak RSS of every server process, bytes on disk, and the floor
//! of a single-client write on this machine (one fsync + one loopback round trip). A PNG chart
//! shows throughput and p99 latency against clients for both systems.
//!
//! The put and get workloads also run through etcd's JSON gateway (`POST /v3/kv/put`,
//! `/v3/kv/range`) of both systems, with the same HTTP/1.1 client: the gateway column.

use std::collections::BTreeMap;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use kvset_client::Client;
use kvset_client::ClientOptions;

use crate::BenchConfig;
use crate::Report;
use crate::Target;
use crate::Workload;

/// Parameters of a comparison.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Where results go (`<date>-<host>.md`, `.png`, `.json`).
    pub out: PathBuf,
    /// Scratch directory for both clusters' data (one filesystem).
    pub work: PathBuf,
    /// The `etcd` binary.
    pub etcd: PathBuf,
    /// The `kvset` binary.
    pub kvset: PathBuf,
    pub workloads: Vec<Workload>,
    pub clients: Vec<usize>,
    pub duration: Duration,
    pub key_space: u64,
    pub value_size: usize,
}

/// A server process of either system.
struct Server {
    name: String,
    child: Child,
    data: PathBuf,
}

fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Child, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err)).stdin(Stdio::null());
    cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))
}

/// CPU seconds (user + system) and peak RSS in bytes of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let ticks = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(") ").map(|(_, a)| a).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let cpu = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    (cpu / ticks, hwm)
}

/// Median latency of `write 4 KiB + fdatasync` on a file in `dir`, in microseconds.
fn fsync_floor(dir: &Path) -> Result<u64, String> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = vec![7u8; 4096];
    let mut samples = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(&path);
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

/// Median loopback TCP round trip of 64 bytes, in microseconds.
fn loopback_rtt() -> Result<u64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = [1u8; 64];
    let mut samples = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        s.write_all(&buf).map_err(|e| e.to_string())?;
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    drop(s);
    let _ = echo.join();
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

struct Clusters {
    etcd: Vec<Server>,
    kvset: Vec<Server>,
    etcd_endpoints: Vec<String>,
    kvset_endpoints: Vec<String>,
}

impl Drop for Clusters {
    fn drop(&mut self) {
        for s in self.etcd.iter_mut().chain(self.kvset.iter_mut()) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

fn start_clusters(cfg: &CompareConfig) -> Result<Clusters, String> {
    let _ = std::fs::remove_dir_all(&cfg.work);
    std::fs::create_dir_all(&cfg.work).map_err(|e| e.to_string())?;
    let mut etcd = Vec::new();
    let port = |base: u16, i: u16| base + 10 * i;
    let initial: Vec<String> = (0..3).map(|i| format!("e{i}=http://127.0.0.1:{}", port(32380, i))).collect();
    for i in 0..3u16 {
        let data = cfg.work.join(format!("etcd-{i}"));
        let mut cmd = Command::new(&cfg.etcd);
        cmd.arg("--name")
            .arg(format!("e{i}"))
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", port(32379, i)))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", port(32379, i)))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", port(32380, i)))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", port(32380, i)))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("kvset-bench")
            .arg("--log-level")
            .arg("warn");
        let child = spawn("etcd", &mut cmd, &cfg.work.join(format!("etcd-{i}.log")))?;
        etcd.push(Server { name: format!("etcd-{i}"), child, data });
    }
    let mut kvset = Vec::new();
    for i in 0..3u16 {
        let data = cfg.work.join(format!("kvset-{i}"));
        let mut cmd = Command::new(&cfg.kvset);
        cmd.arg("serve")
            .args(["--name", &format!("kvset-{i}")])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-host", "127.0.0.1", "--advertise-host", "127.0.0.1", "--port-stride", "10"])
            .args(["--client-port", "42379", "--peer-port", "42380", "--ops-port", "42381"])
            .args(["--initial-replicas", "3", "--log-level", "warn", "--log-format", "text"]);
        let child = spawn("kvset", &mut cmd, &cfg.work.join(format!("kvset-{i}.log")))?;
        kvset.push(Server { name: format!("kvset-{i}"), child, data });
    }
    Ok(Clusters {
        etcd,
        kvset,
        etcd_endpoints: (0..3).map(|i| format!("127.0.0.1:{}", port(32379, i))).collect(),
        kvset_endpoints: (0..3).map(|i| format!("127.0.0.1:{}", port(42379, i))).collect(),
    })
}

/// The kvset leader's client endpoint, once there is one.
async fn kvset_leader(endpoints: &[String]) -> Result<String, String> {
    let client = Client::new(endpoints.to_vec(), ClientOptions::default()).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for ep in endpoints {
            if let Ok(s) = client.status_of(ep).await {
                if s.role == kvset_client::pb::Role::Leader as i32 {
                    return Ok(ep.clone());
                }
            }
        }
        if Instant::now() > deadline {
            return Err("kvset elected no leader".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The etcd leader's client endpoint, once there is one.
async fn etcd_leader(endpoints: &[String]) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for ep in endpoints {
            if let Ok(mut c) = etcd_client::Client::connect([format!("http://{ep}")], None).await {
                if let Ok(s) = c.status().await {
                    if s.leader() != 0 && s.leader() == s.header().map_or(0, |h| h.member_id()) {
                        return Ok(ep.clone());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err("etcd elected no leader".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One measured cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub workload: String,
    pub clients: usize,
    /// kvset through its etcd API, driven by the same etcd client code as etcd.
    pub kvset: Report,
    pub etcd: Report,
    /// kvset through its own API and client (kvset.v1).
    pub kvset_v1: Report,
    /// Put and get only: etcd's and kvset's JSON gateways, same HTTP client.
    pub gateway: Option<GatewayCell>,
}

/// The gateway column of a cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayCell {
    pub etcd: Report,
    pub kvset: Report,
}

/// Runs the whole comparison and writes the results; returns the markdown path.
pub async fn run(cfg: &CompareConfig) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| e.to_string())?;
    let fsync_us = fsync_floor(cfg.work.parent().unwrap_or(Path::new("/tmp")))?;
    let rtt_us = loopback_rtt()?;
    eprintln!("compare: fsync p50 {fsync_us} µs, loopback round trip p50 {rtt_us} µs");
    let clusters = start_clusters(cfg)?;
    let kvset_ep = kvset_leader(&clusters.kvset_endpoints).await?;
    let etcd_ep = etcd_leader(&clusters.etcd_endpoints).await?;
    eprintln!("compare: kvset leader {kvset_ep}, etcd leader {etcd_ep}");
    // kvset and etcd through the same client code over the same API; kvset's own client and
    // API as an extra column.
    let kvset = Target::etcd_api(std::slice::from_ref(&kvset_ep), "kvset").await?;
    let etcd = Target::etcd(std::slice::from_ref(&etcd_ep)).await?;
    let kvset_v1 =
        Target::Kvset(Client::new([kvset_ep.clone()], ClientOptions::default()).map_err(|e| e.to_string())?);
    let etcd_gw = Target::gateway(&etcd_ep, "etcd-gateway");
    let kvset_gw = Target::gateway(&kvset_ep, "kvset-gateway");

    let mut cells = Vec::new();
    let mut prefilled = false;
    let mut turn = 0;
    for workload in &cfg.workloads {
        for &clients in &cfg.clients {
            // The watch workload's client count is its number of watchers.
            let workload = match *workload {
                Workload::Watch { rate, .. } => Workload::Watch { watchers: clients, rate },
                w => w,
            };
            let bc = BenchConfig {
                workload,
                clients,
                duration: cfg.duration,
                ops: None,
                key_space: cfg.key_space,
                value_size: cfg.value_size,
                zipf: None,
                prefill: false,
                seed: clients as u64,
            };
            if bc.workload.reads() && !prefilled {
                eprintln!("compare: writing {} keys into both systems", cfg.key_space);
                crate::prefill(&kvset, &bc).await.map_err(|e| e.to_string())?;
                crate::prefill(&etcd, &bc).await.map_err(|e| e.to_string())?;
                prefilled = true;
            }
            turn = (turn + 1) % 3;
            let mut order = [&etcd, &kvset, &kvset_v1];
            order.rotate_left(turn);
            let mut reports = BTreeMap::new();
            for target in order {
                let report = crate::run(target.clone(), &bc, false).await.map_err(|e| e.to_string())?;
                eprintln!("{}", report.line());
                reports.insert(target.name(), report);
            }
            let gateway = if matches!(workload, Workload::Put | Workload::Get) {
                let mut order = [&etcd_gw, &kvset_gw];
                order.rotate_left(turn % 2);
                for target in order {
                    let report = crate::run(target.clone(), &bc, false).await.map_err(|e| e.to_string())?;
                    eprintln!("{}", report.line());
                    reports.insert(target.name(), report);
                }
                Some(GatewayCell {
                    etcd: reports.remove("etcd-gateway").ok_or("no etcd-gateway report")?,
                    kvset: reports.remove("kvset-gateway").ok_or("no kvset-gateway report")?,
                })
            } else {
                None
            };
            cells.push(Cell {
                workload: workload.name(),
                clients,
                kvset: reports.remove("kvset").ok_or("no kvset report")?,
                etcd: reports.remove("etcd").ok_or("no etcd report")?,
                kvset_v1: reports.remove("kvset.v1").ok_or("no kvset.v1 report")?,
                gateway,
            });
        }
    }

    let resources: Vec<(String, f64, u64, u64)> = clusters
        .etcd
        .iter()
        .chain(clusters.kvset.iter())
        .map(|s| {
            let (cpu, rss) = usage(s.child.id());
            (s.name.clone(), cpu, rss, kvset_storage::dir_size(&s.data))
        })
        .collect();
    drop(clusters);

    let stamp = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "host".into())
        .trim()
        .to_string();
    let base = cfg.out.join(format!("{stamp}-{host}"));
    let md = base.with_extension("md");
    let png = base.with_extension("png");
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_vec_pretty(&cells).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    crate::chart::draw(&cells, &png)?;
    let text = report_markdown(
        cfg,
        &cells,
        &resources,
        fsync_us,
        rtt_us,
        png.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    );
    std::fs::write(&md, text).map_err(|e| e.to_string())?;
    Ok(md)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} cores ({cpu}), {mem} GiB")
}

fn report_markdown(
    cfg: &CompareConfig,
    cells: &[Cell],
    resources: &[(String, f64, u64, u64)],
    fsync_us: u64,
    rtt_us: u64,
    chart: String,
) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut s = String::new();
    s.push_str("# kvset vs etcd\n\n");
    s.push_str(&format!(
        "Machine: {}. Both systems: 3 members on 127.0.0.1, data under `{}` (one filesystem), fsync on, \
         clients talking to the leader. {} s per cell, {} B values, 16 B keys uniform over {} keys. \
         etcd and kvset are driven by the same client code (the `etcd-client` crate) over etcd's v3 API; \
         `kvset.v1` is kvset through its own API and client. The three ran back to back for every cell, \
         in rotating order. Produced by `bench/compare.sh`.\n\n",
        machine(),
        cfg.work.display(),
        cfg.duration.as_secs(),
        cfg.value_size,
        cfg.key_space
    ));
    s.push_str(&format!(
        "Floor of a single-client write here: one fsync (p50 {:.2} ms) + one loopback round trip (p50 {:.3} ms) = {:.2} ms.\n\n",
        ms(fsync_us),
        ms(rtt_us),
        ms(fsync_us + rtt_us)
    ));
    s.push_str(&format!("![throughput and p99 latency]({chart})\n\n"));
    s.push_str("## Ratios (kvset / etcd, both through etcd's API and client)\n\n| workload | clients | throughput | p50 latency | p99 latency | kvset.v1 throughput |\n|---|---|---|---|---|---|\n");
    for c in cells {
        let r = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            c.workload,
            c.clients,
            r(c.kvset.ops_per_sec, c.etcd.ops_per_sec),
            r(c.kvset.latency.p50_us as f64, c.etcd.latency.p50_us as f64),
            r(c.kvset.latency.p99_us as f64, c.etcd.latency.p99_us as f64),
            r(c.kvset_v1.ops_per_sec, c.etcd.ops_per_sec),
        ));
    }
    if cells.iter().any(|c| c.gateway.is_some()) {
        s.push_str(
            "\n## etcd's JSON gateway (kvset / etcd, same HTTP/1.1 client, `POST /v3/kv/put` and `/v3/kv/range`)\n\n\
             | workload | clients | etcd ops/s | kvset ops/s | throughput | p50 latency | p99 latency |\n|---|---|---|---|---|---|---|\n",
        );
        for c in cells {
            let Some(g) = &c.gateway else { continue };
            let r = |a: f64, b: f64| if b > 0.0 { format!("{:.2}×", a / b) } else { "–".into() };
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
                c.workload,
                c.clients,
                g.etcd.ops_per_sec,
                g.kvset.ops_per_sec,
                r(g.kvset.ops_per_sec, g.etcd.ops_per_sec),
                r(g.kvset.latency.p50_us as f64, g.etcd.latency.p50_us as f64),
                r(g.kvset.latency.p99_us as f64, g.etcd.latency.p99_us as f64),
            ));
        }
    }
    s.push_str("\n## Raw results\n\n| workload | clients | system | ops/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for c in cells {
        let gateway = c.gateway.iter().flat_map(|g| [&g.etcd, &g.kvset]);
        for r in [&c.etcd, &c.kvset, &c.kvset_v1].into_iter().chain(gateway) {
            s.push_str(&format!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                c.workload,
                c.clients,
                r.target,
                r.ops_per_sec,
                ms(r.latency.p50_us),
                ms(r.latency.p90_us),
                ms(r.latency.p99_us),
                ms(r.latency.p999_us),
                ms(r.latency.max_us),
                r.errors.values().sum::<u64>()
            ));
        }
    }
    s.push_str("\n## Server resources over the whole run\n\n| process | CPU seconds | peak RSS MiB | on disk MiB |\n|---|---|---|---|\n");
    for (name, cpu, rss, disk) in resources {
        s.push_str(&format!(
            "| {name} | {cpu:.1} | {:.1} | {:.1} |\n",
            *rss as f64 / 1048576.0,
            *disk as f64 / 1048576.0
        ));
    }
    s
}
