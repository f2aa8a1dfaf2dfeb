//! Mirrors openraft's metrics into Prometheus gauges, counts elections and leader changes,
//! keeps the leadership clock, and measures the volume's size.
//!
//! The volume size (`kvset_volume_bytes`, also what `Cluster.Status` reports) is a walk of the
//! data directory: blocking I/O, done here on the blocking pool every
//! [`VOLUME_REFRESH`], never on a request path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvset_storage::RaftMetricsRx;
use kvset_storage::WatchReceiver;
use openraft::ServerState;
use tokio::sync::watch;

use crate::member::commit_index;
use crate::member::LeaderClock;
use crate::metrics::Metrics;
use crate::metrics::StateLabel;

/// How often the volume's size is measured.
pub const VOLUME_REFRESH: Duration = Duration::from_secs(5);

/// Runs until `stop` (or until Raft's metrics channel closes).
pub async fn run(
    mut rx: RaftMetricsRx,
    metrics: Arc<Metrics>,
    leadership: Arc<LeaderClock>,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_leader: Option<u64> = None;
    let mut last_state = ServerState::Learner;
    let mut volume = tokio::time::interval(VOLUME_REFRESH);
    volume.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let m = rx.borrow_and_update().clone();
        let mx = &metrics;
        mx.term.set(m.current_term as i64);
        mx.is_leader.set(i64::from(m.state == ServerState::Leader));
        for (state, name) in [
            (ServerState::Leader, "leader"),
            (ServerState::Follower, "follower"),
            (ServerState::Candidate, "candidate"),
            (ServerState::Learner, "learner"),
            (ServerState::Shutdown, "shutdown"),
        ] {
            mx.state.get_or_create(&StateLabel { state: name }).set(i64::from(m.state == state));
        }
        mx.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        mx.applied_index.set(m.last_applied.map_or(0, |l| l.index) as i64);
        mx.commit_index.set(commit_index(&m).unwrap_or(0) as i64);
        mx.snapshot_index.set(m.snapshot.map_or(0, |l| l.index) as i64);
        mx.purged_index.set(m.purged.map_or(0, |l| l.index) as i64);
        let membership = m.membership_config.membership();
        mx.voters.set(membership.voter_ids().count() as i64);
        mx.learners.set(membership.learner_ids().count() as i64);
        if m.current_leader != last_leader {
            if m.current_leader.is_some() {
                mx.leader_changes.inc();
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "leader changed");
            }
            last_leader = m.current_leader;
        }
        leadership.set_leader(m.state == ServerState::Leader);
        if m.state == ServerState::Candidate && last_state != ServerState::Candidate {
            mx.elections.inc();
        }
        last_state = m.state;
        loop {
            let measure = tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    false
                }
                _ = volume.tick() => true,
                _ = stop.wait_for(|s| *s) => return,
            };
            if !measure {
                break;
            }
            let dir = data_dir.clone();
            if let Ok(bytes) = tokio::task::spawn_blocking(move || kvset_storage::dir_size(&dir)).await {
                metrics.volume_bytes.set(bytes as i64);
            }
        }
    }
}
