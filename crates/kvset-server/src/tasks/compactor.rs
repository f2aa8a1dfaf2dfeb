//! Automatic compaction (the retention of the `compaction.*` config keys), on the leader.
//!
//! Every `compaction.check_interval_ms` the leader proposes `Compact(r)` for the oldest
//! revision the retention no longer needs, when that is above the current compact revision:
//!
//! * `retain_revisions = N`: the last N revisions stay readable (r = revision − N + 1);
//! * `retain_ms = T`: revisions of the last T stay readable; the leader samples the revision
//!   at every check and compacts to the newest sample older than T. A new leader starts
//!   sampling afresh, so it compacts by age only after T (it keeps more, never less).
//!
//! With both set, history is kept while either asks for it (the older bound wins); with both
//! 0, nothing is compacted automatically. The compaction itself is replicated, so every member
//! forgets the same history.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::Command;
use kvset_storage::CommandResult;
use kvset_storage::Revision;
use tokio::sync::watch;

use kvset_storage::SmReader;

use crate::config::CompactionConfig;
use crate::member::Proposer;
use crate::metrics::Metrics;

/// How long one compaction proposal may take.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);

/// The revision retention allows compacting to, given the current revision and the samples
/// (oldest first) of (time, revision); `None` when nothing may be compacted.
pub fn target(
    config: &CompactionConfig,
    revision: Revision,
    samples: &VecDeque<(Instant, Revision)>,
    now: Instant,
) -> Option<Revision> {
    let by_count = (config.retain_revisions > 0).then(|| revision - config.retain_revisions as Revision + 1);
    let by_age = if config.retain_ms > 0 {
        let cutoff = now.checked_sub(Duration::from_millis(config.retain_ms))?;
        samples.iter().take_while(|(t, _)| *t <= cutoff).last().map(|(_, r)| *r)
    } else {
        None
    };
    let target = match (by_count, by_age, config.retain_ms > 0) {
        (Some(a), Some(b), _) => a.min(b),
        (Some(a), None, false) => a,
        (Some(_), None, true) => return None, // no sample old enough yet: keep everything
        (None, Some(b), _) => b,
        (None, None, _) => return None,
    };
    (target > 1).then_some(target)
}

/// What the compactor uses.
#[derive(Debug)]
pub struct Inputs {
    /// Whether this member leads, and proposing the compaction.
    pub proposer: Proposer,
    /// The applied revision and compact revision.
    pub reader: SmReader,
    pub config: CompactionConfig,
    pub metrics: Arc<Metrics>,
}

/// Runs until `stop`.
pub async fn run(inputs: Inputs, mut stop: watch::Receiver<bool>) {
    let Inputs { proposer, reader, config, metrics } = inputs;
    if config.retain_revisions == 0 && config.retain_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(config.check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples: VecDeque<(Instant, Revision)> = VecDeque::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !proposer.leads() {
            samples.clear();
            continue;
        }
        let applied = reader.applied();
        let now = Instant::now();
        samples.push_back((now, applied.revision));
        if config.retain_ms > 0 {
            // Keep the newest sample older than the window, and every sample inside it.
            let cutoff = now.checked_sub(Duration::from_millis(config.retain_ms));
            while samples.len() > 1 && cutoff.is_some_and(|c| samples[1].0 <= c) {
                samples.pop_front();
            }
        } else {
            samples.clear();
        }
        let Some(to) = target(&config, applied.revision, &samples, now) else { continue };
        if to <= applied.compact_revision {
            continue;
        }
        match proposer.submit(Command::Compact(to), Instant::now() + PROPOSE_DEADLINE).await {
            Ok(CommandResult::Compact { .. }) => {
                metrics.compactions.inc();
                tracing::info!(compact_revision = to, revision = applied.revision, "automatic compaction");
            }
            Ok(other) => tracing::debug!(result = ?other, "automatic compaction not applied"),
            Err(e) => tracing::warn!(error = %e, "automatic compaction failed; retrying at the next check"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(retain_revisions: u64, retain_ms: u64) -> CompactionConfig {
        CompactionConfig { retain_revisions, retain_ms, check_interval_ms: 1000 }
    }

    #[test]
    fn retention_by_count_by_age_and_both() {
        let now = Instant::now();
        let samples: VecDeque<(Instant, Revision)> =
            [(now - Duration::from_secs(30), 500), (now - Duration::from_secs(5), 900)].into();
        assert_eq!(target(&config(100, 0), 1000, &samples, now), Some(901));
        assert_eq!(target(&config(0, 10_000), 1000, &samples, now), Some(500));
        assert_eq!(target(&config(100, 10_000), 1000, &samples, now), Some(500), "the older bound wins");
        assert_eq!(target(&config(0, 60_000), 1000, &samples, now), None, "no sample that old yet");
        assert_eq!(target(&config(100, 60_000), 1000, &samples, now), None);
        assert_eq!(target(&config(0, 0), 1000, &samples, now), None);
        assert_eq!(target(&config(5000, 0), 1000, &samples, now), None, "not enough history yet");
    }
}
