//! `kvset bench`: a closed-loop load generator.
//!
//! `clients` tasks each issue one request, wait for its answer, and issue the next, for a fixed
//! duration or op count. Keys are 16 bytes (`key` + 13 digits) drawn uniformly or by a Zipf
//! law from a key space; values are `value_size` bytes. Latencies of successful requests go to
//! an HDR histogram (1 µs .. 60 s, 3 significant digits); failures are counted by kind.
//!
//! The same workload code drives every [`Target`]: kvset through its own client, or etcd
//! through `etcd-client` (feature `etcd`), or either through etcd's JSON gateway (feature
//! `etcd`, put and get only), so the server is the only difference.
//!
//! A benchmark is not a test: nothing here asserts a speed.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "etcd")]
mod chart;
#[cfg(feature = "etcd")]
pub mod compare;
#[cfg(feature = "etcd")]
mod gateway;
mod target;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;
pub use target::Renewer;
pub use target::Target;

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Workload {
    /// Put a random key.
    Put,
    /// Linearizable get of a random (prefilled) key.
    Get,
    /// Serializable get (any member answers from its own state).
    GetSerializable,
    /// Gets with probability `read_percent`%, puts otherwise.
    Mixed { read_percent: u8 },
    /// Compare-and-swap transaction: if version(key) > -1 (always true) then put.
    Txn,
    /// `watchers` watches on one prefix while a writer puts `rate` keys per second under it;
    /// measures events delivered per second and the delay from a put's acknowledgement to
    /// each delivery.
    Watch { watchers: usize, rate: u64 },
    /// Each client renews its own lease over its own keep-alive stream, closed loop.
    LeaseKeepAlive,
}

impl Workload {
    /// Parses `put`, `get`, `get-serializable`, `mixed`, `txn` (`read_percent` for `mixed`).
    pub fn parse(name: &str, read_percent: u8) -> Result<Self, String> {
        Ok(match name {
            "put" => Workload::Put,
            "get" => Workload::Get,
            "get-serializable" | "serializable" => Workload::GetSerializable,
            "mixed" => {
                if read_percent > 100 {
                    return Err("--read-percent must be 0..=100".into());
                }
                Workload::Mixed { read_percent }
            }
            "txn" | "cas" => Workload::Txn,
            "lease-keepalive" | "keepalive" => Workload::LeaseKeepAlive,
            other => {
                return Err(format!(
                "unknown workload {other:?}: put, get, get-serializable, mixed, txn, watch, lease-keepalive"
            ))
            }
        })
    }

    /// A short name, for tables.
    pub fn name(&self) -> String {
        match self {
            Workload::Put => "put".into(),
            Workload::Get => "get".into(),
            Workload::GetSerializable => "get-serializable".into(),
            Workload::Mixed { read_percent } => format!("mixed-{read_percent}r"),
            Workload::Txn => "txn".into(),
            Workload::Watch { watchers, rate } => format!("watch-{watchers}w-{rate}/s"),
            Workload::LeaseKeepAlive => "lease-keepalive".into(),
        }
    }

    /// Whether the workload reads keys (which are written first).
    pub fn reads(&self) -> bool {
        matches!(self, Workload::Get | Workload::GetSerializable | Workload::Mixed { .. })
    }
}

/// Parameters of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub workload: Workload,
    /// Concurrent closed-loop clients.
    pub clients: usize,
    /// Stop after this long (unless `ops` is set).
    pub duration: Duration,
    /// Stop after this many requests in all, when set.
    pub ops: Option<u64>,
    /// Keys are drawn from `0..key_space`.
    pub key_space: u64,
    /// Bytes per value.
    pub value_size: usize,
    /// Zipf exponent; `None` draws keys uniformly.
    pub zipf: Option<f64>,
    /// Write every key once before a read workload starts, so reads hit existing keys.
    pub prefill: bool,
    /// Seed of the key choice.
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            workload: Workload::Put,
            clients: 16,
            duration: Duration::from_secs(10),
            ops: None,
            key_space: 100_000,
            value_size: 256,
            zipf: None,
            prefill: true,
            seed: 1,
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub workload: String,
    pub clients: usize,
    pub value_size: usize,
    pub key_space: u64,
    /// Successful requests.
    pub ops: u64,
    /// Failed requests, by error kind.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_secs: f64,
    pub ops_per_sec: f64,
    pub latency: Latency,
}

impl Report {
    /// One human-readable line.
    pub fn line(&self) -> String {
        let errors: u64 = self.errors.values().sum();
        format!(
            "{:<7} {:<18} c={:<4} {:>9.0} ops/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>8.2} ms  ops {}  errors {}",
            self.target,
            self.workload,
            self.clients,
            self.ops_per_sec,
            self.latency.p50_us as f64 / 1000.0,
            self.latency.p90_us as f64 / 1000.0,
            self.latency.p99_us as f64 / 1000.0,
            self.latency.p999_us as f64 / 1000.0,
            self.latency.max_us as f64 / 1000.0,
            self.ops,
            errors
        )
    }
}

/// Why a run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid benchmark parameters: {0}")]
    Invalid(String),
    #[error("prefill failed: {0}")]
    Prefill(String),
}

/// The 16-byte key of index `i`.
pub fn key(i: u64) -> Vec<u8> {
    format!("key{:013}", i % 10_000_000_000_000).into_bytes()
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

enum KeyChooser {
    Uniform(u64),
    Zipf(rand_distr::Zipf<f64>),
}

impl KeyChooser {
    fn new(config: &BenchConfig) -> Result<Self, BenchError> {
        if config.key_space == 0 {
            return Err(BenchError::Invalid("key space must be at least 1".into()));
        }
        Ok(match config.zipf {
            None => KeyChooser::Uniform(config.key_space),
            Some(s) => KeyChooser::Zipf(
                rand_distr::Zipf::new(config.key_space, s)
                    .map_err(|e| BenchError::Invalid(format!("zipf: {e}")))?,
            ),
        })
    }

    fn pick(&self, rng: &mut StdRng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.gen_range(0..*n),
            KeyChooser::Zipf(z) => (z.sample(rng) as u64).saturating_sub(1),
        }
    }
}

/// Writes every key of the key space once (64 writers).
pub async fn prefill(target: &Target, config: &BenchConfig) -> Result<(), BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    let value = vec![b'v'; config.value_size];
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (target, next, value, n) = (target.clone(), next.clone(), value.clone(), config.key_space);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(());
                }
                let mut tries = 0;
                while let Err(e) = target.put(key(i), value.clone()).await {
                    tries += 1;
                    if tries > 5 {
                        return Err(e);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| BenchError::Prefill(e.to_string()))?.map_err(BenchError::Prefill)?;
    }
    Ok(())
}

/// Runs one benchmark. `progress` draws a progress bar on stderr.
pub async fn run(target: Target, config: &BenchConfig, progress: bool) -> Result<Report, BenchError> {
    if config.clients == 0 {
        return Err(BenchError::Invalid("clients must be at least 1".into()));
    }
    if let Workload::Watch { watchers, rate } = config.workload {
        return watch::run(target, config, watchers, rate).await;
    }
    let chooser = Arc::new(KeyChooser::new(config)?);
    if config.prefill && config.workload.reads() {
        prefill(&target, config).await?;
    }

    let bar = if progress {
        let bar = match config.ops {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new(config.duration.as_millis() as u64),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:40}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + config.duration;
    let value = Arc::new(vec![b'x'; config.value_size]);
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        let (target, chooser, issued, done, value) =
            (target.clone(), chooser.clone(), issued.clone(), done.clone(), value.clone());
        let (workload, ops, seed) = (config.workload, config.ops, config.seed);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(c as u64));
            let mut hist = new_histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut renewer = match workload {
                Workload::LeaseKeepAlive => match target.lease_renewer(60).await {
                    Ok(r) => Some(r),
                    Err(kind) => {
                        errors.insert(format!("lease-setup-{kind}"), 1);
                        return (hist, errors);
                    }
                },
                _ => None,
            };
            loop {
                match ops {
                    Some(n) if issued.fetch_add(1, Ordering::Relaxed) >= n => break,
                    None if Instant::now() >= deadline => break,
                    _ => {}
                }
                let k = key(chooser.pick(&mut rng));
                let t0 = Instant::now();
                let result = match workload {
                    Workload::Put => target.put(k, value.to_vec()).await,
                    Workload::Get => target.get(k, false).await,
                    Workload::GetSerializable => target.get(k, true).await,
                    Workload::Mixed { read_percent } => {
                        if rng.gen_range(0..100) < read_percent {
                            target.get(k, false).await
                        } else {
                            target.put(k, value.to_vec()).await
                        }
                    }
                    Workload::Txn => target.txn(k, value.to_vec()).await,
                    Workload::LeaseKeepAlive => match renewer.as_mut() {
                        Some(r) => r.renew().await,
                        None => Err("no-lease".into()),
                    },
                    Workload::Watch { .. } => Err("watch-runs-elsewhere".into()),
                };
                match result {
                    Ok(()) => {
                        let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(kind) => *errors.entry(kind).or_default() += 1,
                }
            }
            (hist, errors)
        }));
    }

    // Progress while the clients run.
    let ticker = {
        let (bar, done, ops) = (bar.clone(), done.clone(), config.ops);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(0.001);
                match ops {
                    Some(_) => bar.set_position(n),
                    None => bar.set_position(started.elapsed().as_millis() as u64),
                }
                bar.set_message(format!("{n} ops, {:.0} ops/s", n as f64 / secs));
            }
        })
    };

    let mut hist = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        if let Ok((h, e)) = t.await {
            let _ = hist.add(&h);
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();

    let ops = hist.len();
    Ok(Report {
        target: target.name().to_string(),
        workload: config.workload.name(),
        clients: config.clients,
        value_size: config.value_size,
        key_space: config.key_space,
        ops,
        errors,
        elapsed_secs: elapsed.as_secs_f64(),
        ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: Latency {
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            mean_us: hist.mean(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sixteen_bytes() {
        assert_eq!(key(0).len(), 16);
        assert_eq!(key(99_999).len(), 16);
        assert_eq!(key(u64::MAX).len(), 16);
    }

    #[test]
    fn workloads_parse() {
        assert_eq!(Workload::parse("mixed", 90).unwrap(), Workload::Mixed { read_percent: 90 });
        assert!(Workload::parse("mixed", 101).is_err());
        assert!(Workload::parse("nope", 0).is_err());
        assert_eq!(Workload::parse("get-serializable", 0).unwrap().name(), "get-serializable");
    }

    #[test]
    fn zipf_keys_stay_in_the_key_space() {
        let cfg = BenchConfig { zipf: Some(1.1), key_space: 1000, ..Default::default() };
        let chooser = KeyChooser::new(&cfg).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut hot = 0;
        for _ in 0..10_000 {
            let k = chooser.pick(&mut rng);
            assert!(k < 1000);
            hot += u64::from(k < 10);
        }
        assert!(hot > 3000, "a Zipf law favours the first keys ({hot} of 10000 in the first 1%)");
    }
}
