//! The recent past of one member, for the ops page (`service::ops`): a ring of samples of its
//! traffic taken every [`SAMPLE_EVERY`] for the last [`KEEP_SAMPLES`] × that (ten minutes), and
//! a journal of the last [`KEEP_EVENTS`] membership events (leader changes, membership changes,
//! the reconciler's own changes).
//!
//! Everything is in memory and starts empty at each start: the page shows what this member saw
//! since it started. Prometheus keeps the long history (`deploy/prometheus/`).
//!
//! A sample turns the cumulative counters of [`Metrics`] into rates and p99 latencies over the
//! interval since the previous sample, the way Prometheus's `rate` and `histogram_quantile`
//! would over the same window.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::metrics::Metrics;
use crate::metrics::LATENCY_BUCKETS;

/// How often the Raft metrics task samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes at [`SAMPLE_EVERY`].
pub const KEEP_SAMPLES: usize = 300;
/// Membership events kept.
pub const KEEP_EVENTS: usize = 50;

/// One point of the charts: rates and latencies over the interval before `unix_ms`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Client writes applied to this member's state machine per second: the cluster's write
    /// rate (every member applies every write).
    pub applied_per_s: f64,
    /// Client writes (puts, deletes, transactions, lease grants and revokes, compactions) this
    /// member answered, per second.
    pub writes_per_s: f64,
    /// Client reads (gets, ranges) this member answered, per second.
    pub reads_per_s: f64,
    /// p99 latency of those writes, milliseconds; `None` when there were none.
    pub write_p99_ms: Option<f64>,
    /// p99 latency of those reads, milliseconds; `None` when there were none.
    pub read_p99_ms: Option<f64>,
}

/// A membership event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// When this member saw it, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What happened, in words ("leader is now kvset-1 (node 42), term 3").
    pub text: String,
}

/// The cumulative counters at one sample.
#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    applied: u64,
    writes: (u64, [u64; LATENCY_BUCKETS.len()]),
    reads: (u64, [u64; LATENCY_BUCKETS.len()]),
}

impl Reading {
    fn of(metrics: &Metrics, at: Instant) -> Self {
        Self {
            at,
            applied: metrics.commands_applied.get(),
            writes: metrics.traffic.writes.read(),
            reads: metrics.traffic.reads.read(),
        }
    }
}

/// Samples and events of one member. See the module docs.
#[derive(Debug, Default)]
pub struct Timeline {
    samples: Mutex<VecDeque<Sample>>,
    events: Mutex<VecDeque<Event>>,
    last: Mutex<Option<Reading>>,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Timeline {
    /// Takes a sample of `metrics` (the first call only records the counters).
    pub fn sample(&self, metrics: &Metrics) {
        let now = Reading::of(metrics, Instant::now());
        let previous = self.last.lock().unwrap_or_else(|e| e.into_inner()).replace(now.clone());
        if let Some(before) = previous {
            self.push(sample_between(&before, &now, unix_ms()));
        }
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == KEEP_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Records a membership event (also logged by whoever saw it).
    pub fn record(&self, text: impl Into<String>) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == KEEP_EVENTS {
            events.pop_front();
        }
        events.push_back(Event { unix_ms: unix_ms(), text: text.into() });
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// The events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

fn sample_between(before: &Reading, now: &Reading, unix_ms: u64) -> Sample {
    let secs = now.at.duration_since(before.at).as_secs_f64().max(0.001);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let p99 = |a: &(u64, [u64; LATENCY_BUCKETS.len()]), b: &(u64, [u64; LATENCY_BUCKETS.len()])| {
        let delta: Vec<u64> = b.1.iter().zip(a.1.iter()).map(|(b, a)| b.saturating_sub(*a)).collect();
        quantile(&delta, 0.99).map(|s| s * 1000.0)
    };
    Sample {
        unix_ms,
        applied_per_s: rate(before.applied, now.applied),
        writes_per_s: rate(before.writes.0, now.writes.0),
        reads_per_s: rate(before.reads.0, now.reads.0),
        write_p99_ms: p99(&before.writes, &now.writes),
        read_p99_ms: p99(&before.reads, &now.reads),
    }
}

/// The `q` quantile of observations counted in [`LATENCY_BUCKETS`] (`counts[i]` in bucket `i`,
/// not cumulative), in seconds, interpolated linearly inside the bucket as Prometheus's
/// `histogram_quantile` does; `None` without observations.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in counts.iter().enumerate() {
        let upper = below + count;
        if *count > 0 && upper as f64 >= rank {
            let lower_bound = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let upper_bound = LATENCY_BUCKETS[i.min(LATENCY_BUCKETS.len() - 1)];
            let within = (rank - below as f64) / *count as f64;
            return Some(lower_bound + (upper_bound - lower_bound) * within.clamp(0.0, 1.0));
        }
        below = upper;
    }
    LATENCY_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let mut counts = [0u64; LATENCY_BUCKETS.len()];
        assert_eq!(quantile(&counts, 0.99), None);
        // 100 requests in (0.4 ms, 0.8 ms]: p99 at 99% of the way through that bucket.
        counts[3] = 100;
        let p99 = quantile(&counts, 0.99).expect("some");
        assert!((p99 - (0.0004 + 0.0004 * 0.99)).abs() < 1e-9, "{p99}");
        // One slow request among 1000 fast ones does not move p99; ten more do.
        counts[3] = 1000;
        counts[12] = 1;
        assert!(quantile(&counts, 0.99).expect("some") <= 0.0008);
        counts[12] = 20;
        assert!(quantile(&counts, 0.99).expect("some") > LATENCY_BUCKETS[11]);
    }

    #[test]
    fn samples_are_rates_over_the_interval_and_the_ring_is_bounded() {
        let metrics = Metrics::new();
        let t = Timeline::default();
        t.sample(&metrics);
        assert!(t.samples().is_empty(), "the first call only records the counters");
        for _ in 0..10 {
            metrics.grpc("Put", tonic::Code::Ok, Duration::from_millis(2));
        }
        metrics.grpc("Range", tonic::Code::Ok, Duration::from_millis(1));
        metrics.commands_applied.inc_by(10);
        let before = t.last.lock().unwrap().clone().unwrap();
        let now = Reading { at: before.at + Duration::from_secs(2), ..Reading::of(&metrics, Instant::now()) };
        let s = sample_between(&before, &now, 7);
        assert_eq!((s.applied_per_s, s.writes_per_s, s.reads_per_s), (5.0, 5.0, 0.5));
        let p99 = s.write_p99_ms.expect("writes");
        assert!(p99 > 1.6 && p99 <= 3.2, "2 ms lands in the (1.6 ms, 3.2 ms] bucket: {p99}");
        for i in 0..(KEEP_SAMPLES + 5) {
            t.push(Sample { unix_ms: i as u64, ..s.clone() });
        }
        let kept = t.samples();
        assert_eq!(kept.len(), KEEP_SAMPLES);
        assert_eq!(kept[0].unix_ms, 5, "the oldest are dropped first");
        for i in 0..(KEEP_EVENTS + 1) {
            t.record(format!("event {i}"));
        }
        assert_eq!(t.events().len(), KEEP_EVENTS);
        assert_eq!(t.events()[0].text, "event 1");
    }
}
