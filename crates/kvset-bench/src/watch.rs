//! The watch workload: `watchers` watches on one prefix while keys are put under it at a fixed
//! rate (up to 64 puts in flight, so the rate holds whatever one put's latency). Reported: events delivered per second (over every watcher) and the delay
//! from a put's acknowledgement to each watcher receiving its event (0 when the event came
//! first). Both systems are driven through the same code; only the [`Target`] differs.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::new_histogram;
use crate::BenchConfig;
use crate::BenchError;
use crate::Latency;
use crate::Report;
use crate::Target;

/// The prefix written and watched.
pub const PREFIX: &str = "bench/watch/";
/// Puts in flight at most, so the write rate does not depend on one put's latency.
const WRITERS: usize = 64;

/// Runs the watch workload.
pub async fn run(
    target: Target,
    config: &BenchConfig,
    watchers: usize,
    rate: u64,
) -> Result<Report, BenchError> {
    if watchers == 0 || rate == 0 {
        return Err(BenchError::Invalid("the watch workload needs at least one watcher and a rate".into()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Each watcher reports (revision, arrival) of every event it receives.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut events =
            target.watch_prefix(PREFIX.as_bytes().to_vec()).await.map_err(BenchError::Prefill)?;
        let (seen, stop) = (seen_tx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                    Ok(Some(revision)) => {
                        let _ = seen.send((revision, Instant::now()));
                    }
                    Ok(None) => return,
                    Err(_) => {}
                }
            }
        }));
    }
    drop(seen_tx);

    let value = vec![b'w'; config.value_size];
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    // Puts are issued at the rate whatever their latency: up to WRITERS in flight.
    let acked: Arc<std::sync::Mutex<HashMap<i64, Instant>>> = Arc::default();
    let errors: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(WRITERS));
    let started = Instant::now();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0u64;
    let mut puts = Vec::new();
    while started.elapsed() < config.duration {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let key = format!("{PREFIX}{:08}", i % config.key_space.max(1)).into_bytes();
        i += 1;
        let (target, value, acked, errors) = (target.clone(), value.clone(), acked.clone(), errors.clone());
        puts.push(tokio::spawn(async move {
            match target.put_revision(key, value).await {
                Ok(revision) => {
                    acked.lock().unwrap_or_else(|e| e.into_inner()).insert(revision, Instant::now());
                }
                Err(kind) => {
                    *errors.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_insert(0u64) += 1
                }
            }
            drop(permit);
        }));
    }
    for p in puts {
        let _ = p.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|e| e.into_inner()));
    let mut errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    let write_elapsed = started.elapsed();
    // Let the watchers drain what was written (bounded).
    let expected = acked.len() * watchers;
    let mut arrivals: Vec<(i64, Instant)> = Vec::with_capacity(expected);
    let drain_until = Instant::now() + Duration::from_secs(10);
    while arrivals.len() < expected && Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await {
            Ok(Some(a)) => arrivals.push(a),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    while let Ok(a) = seen_rx.try_recv() {
        arrivals.push(a);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut hist = new_histogram();
    let mut delivered = 0u64;
    for (revision, at) in &arrivals {
        if let Some(ack) = acked.get(revision) {
            delivered += 1;
            let _ = hist.record((at.saturating_duration_since(*ack).as_micros() as u64).max(1));
        }
    }
    let missing = expected as u64 - delivered.min(expected as u64);
    if missing > 0 {
        errors.insert("events-not-delivered".into(), missing);
    }
    Ok(Report {
        target: target.name().to_string(),
        workload: format!("watch-{watchers}w-{rate}/s"),
        clients: watchers,
        value_size: config.value_size,
        key_space: config.key_space,
        ops: delivered,
        errors,
        elapsed_secs: write_elapsed.as_secs_f64(),
        ops_per_sec: delivered as f64 / write_elapsed.as_secs_f64().max(1e-9),
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
