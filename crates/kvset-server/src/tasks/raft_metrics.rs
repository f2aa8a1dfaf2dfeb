//! Mirrors openraft's metrics into Prometheus gauges, counts elections and leader changes,
//! keeps the leadership clock, measures the volume's size, and every [`SAMPLE_EVERY`] samples
//! the ops page's timeline, the lease count and (on the leader) each member's lag and the time
//! since it last acknowledged the leader. Leader changes and membership changes go into the
//! timeline's journal.
//!
//! The volume size (`kvset_volume_bytes`, also what `Cluster.Status` reports) is a walk of the
//! data directory: blocking I/O, done here on the blocking pool every
//! [`VOLUME_REFRESH`], never on a request path.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvset_storage::RaftMetrics;
use kvset_storage::RaftMetricsRx;
use kvset_storage::WatchReceiver;
use openraft::ServerState;
use tokio::sync::watch;

use crate::member::commit_index;
use crate::member::LeaderClock;
use crate::metrics::MemberLabel;
use crate::metrics::Metrics;
use crate::metrics::StateLabel;
use crate::timeline::Timeline;
use crate::timeline::SAMPLE_EVERY;

/// How often the volume's size is measured.
pub const VOLUME_REFRESH: Duration = Duration::from_secs(5);

/// The periodic work between Raft metrics changes.
enum Tick {
    Volume,
    Sample,
}

/// What the task reads and writes.
#[allow(missing_debug_implementations)]
pub struct Inputs {
    /// openraft's metrics.
    pub rx: RaftMetricsRx,
    pub metrics: Arc<Metrics>,
    /// Since when this member leads (kept here).
    pub leadership: Arc<LeaderClock>,
    /// The volume, measured every [`VOLUME_REFRESH`].
    pub data_dir: PathBuf,
    /// The ops page's samples and membership events.
    pub timeline: Arc<Timeline>,
    /// The number of leases in the applied state.
    pub leases: Box<dyn Fn() -> usize + Send + Sync>,
}

/// Runs until `stop` (or until Raft's metrics channel closes).
pub async fn run(inputs: Inputs, mut stop: watch::Receiver<bool>) {
    let Inputs { mut rx, metrics, leadership, data_dir, timeline, leases } = inputs;
    let mut last_leader: Option<u64> = None;
    let mut last_membership = None;
    let mut last_state = ServerState::Learner;
    let mut shown = BTreeSet::new();
    let mut volume = tokio::time::interval(VOLUME_REFRESH);
    volume.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sample = tokio::time::interval(SAMPLE_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        mx.has_leader.set(i64::from(m.current_leader.is_some()));
        if m.current_leader != last_leader {
            if m.current_leader.is_some() {
                mx.leader_changes.inc();
                tracing::info!(leader = ?m.current_leader, term = m.current_term, "leader changed");
            }
            timeline.record(match m.current_leader {
                Some(id) => format!("{} leads (term {})", name_of(&m, id), m.current_term),
                None => format!("no leader known (term {})", m.current_term),
            });
            last_leader = m.current_leader;
        }
        let config_id = *m.membership_config.log_id();
        if membership.nodes().next().is_some() && last_membership.as_ref() != Some(&config_id) {
            timeline.record(describe_membership(&m, last_membership.is_none()));
            last_membership = Some(config_id);
        }
        leadership.set_leader(m.state == ServerState::Leader);
        if m.state == ServerState::Candidate && last_state != ServerState::Candidate {
            mx.elections.inc();
        }
        last_state = m.state;
        loop {
            // Decided inside the select, done outside it: the stop signal's guard is not `Send`.
            let tick = tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
                _ = volume.tick() => Tick::Volume,
                _ = sample.tick() => Tick::Sample,
                _ = stop.wait_for(|s| *s) => return,
            };
            match tick {
                Tick::Volume => {
                    let dir = data_dir.clone();
                    if let Ok(bytes) =
                        tokio::task::spawn_blocking(move || kvset_storage::dir_size(&dir)).await
                    {
                        metrics.volume_bytes.set(bytes as i64);
                    }
                }
                Tick::Sample => {
                    replication(&metrics, &rx.borrow_watched(), leadership.led_for(), &mut shown);
                    metrics.leases.set(leases() as i64);
                    timeline.sample(&metrics);
                }
            }
        }
    }
}

/// `kvset-N (node ID)`, or `node ID` when the membership does not name it.
fn name_of(m: &RaftMetrics, id: u64) -> String {
    match m.membership_config.membership().get_node(&id) {
        Some(n) => format!("{} (node {id})", n.name),
        None => format!("node {id}"),
    }
}

/// The membership in words, for the journal.
fn describe_membership(m: &RaftMetrics, at_start: bool) -> String {
    let membership = m.membership_config.membership();
    let list = |ids: Vec<u64>| ids.into_iter().map(|id| name_of(m, id)).collect::<Vec<_>>().join(", ");
    let voters = list(membership.voter_ids().collect());
    let learners: Vec<u64> = membership.learner_ids().collect();
    let joint = if membership.get_joint_config().len() > 1 { " (joint: a change in progress)" } else { "" };
    let learners = if learners.is_empty() { String::new() } else { format!("; learners {}", list(learners)) };
    let when = if at_start { "membership at start" } else { "membership changed" };
    format!("{when}: voters {voters}{learners}{joint}")
}

/// On the leader: each other member's lag and the time since it last acknowledged the leader.
/// Elsewhere the families are empty (only the leader knows). `shown` is the members that have
/// series now; series of members no longer shown are removed one by one (clearing the family
/// would let a scrape in between see none, and restart the alerts' `for` clocks).
fn replication(metrics: &Metrics, m: &RaftMetrics, led_for: Option<Duration>, shown: &mut BTreeSet<String>) {
    use openraft::async_runtime::Instant;
    let mut now = BTreeSet::new();
    if let (Some(replication), ServerState::Leader) = (m.replication.as_ref(), m.state) {
        let last = m.last_log_index.unwrap_or(0);
        for (id, node) in m.membership_config.membership().nodes() {
            if *id == m.id {
                continue;
            }
            let label = MemberLabel { member: node.name.clone() };
            let matched = replication.get(id).and_then(|l| l.as_ref()).map_or(0, |l| l.index);
            metrics.member_lag.get_or_create(&label).set(last.saturating_sub(matched) as i64);
            let ack = m.heartbeat.as_ref().and_then(|h| h.get(id)).and_then(|t| t.as_ref());
            // Never acknowledged since this member leads: as old as the leadership.
            let age = ack.map(|t| t.elapsed().as_secs_f64()).or_else(|| led_for.map(|d| d.as_secs_f64()));
            if let Some(age) = age {
                metrics.member_last_ack.get_or_create(&label).set(age);
            }
            now.insert(node.name.clone());
        }
    }
    for gone in shown.difference(&now) {
        let label = MemberLabel { member: gone.clone() };
        metrics.member_lag.remove(&label);
        metrics.member_last_ack.remove(&label);
    }
    *shown = now;
}
