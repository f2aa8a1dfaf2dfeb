//! The leader's lease expiry: every `lease.check_interval_ms` the lessor is matched with the
//! member's leadership and the lease table, and leases whose deadline passed are revoked
//! through Raft (`LeaseRevoke`, at most `lease.revoke_per_check` per check), so every member
//! deletes their keys at the same revision. A follower expires nothing.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::ApplyError;
use kvset_storage::Command;
use kvset_storage::CommandResult;
use kvset_storage::SmReader;
use tokio::sync::watch;

use crate::config::LeaseConfig;
use crate::lessor::Lessor;
use crate::member::Proposer;
use crate::metrics::Metrics;

/// How long one revoke may take.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

/// What the lease expirer uses.
#[derive(Debug)]
pub struct Inputs {
    /// In which term this member leads, and proposing the revokes.
    pub proposer: Proposer,
    /// The deadlines.
    pub lessor: Arc<Lessor>,
    /// The lease table.
    pub reader: SmReader,
    pub config: LeaseConfig,
    pub metrics: Arc<Metrics>,
}

/// Runs until `stop`.
pub async fn run(inputs: Inputs, mut stop: watch::Receiver<bool>) {
    let Inputs { proposer, lessor, reader, config, metrics } = inputs;
    let mut tick = tokio::time::interval(Duration::from_millis(config.check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Primary only once this member leads and has applied its predecessors' log: until
        // then its lease table may lack leases they granted.
        let leading = proposer.leading_term();
        let now = Instant::now();
        lessor.sync(leading, &reader.leases(), now);
        if leading.is_none() {
            continue;
        }
        let expired = lessor.take_expired(now, config.revoke_per_check as usize);
        let revokes = expired.into_iter().map(|id| {
            let (proposer, lessor, metrics) = (&proposer, &lessor, &metrics);
            async move {
                match proposer.submit(Command::LeaseRevoke(id), Instant::now() + REVOKE_DEADLINE).await {
                    Ok(CommandResult::LeaseRevoke { revision, deleted }) => {
                        metrics.leases_expired.inc();
                        tracing::info!(lease = id, deleted, revision, "lease expired: revoked");
                    }
                    Ok(CommandResult::Rejected { error: ApplyError::LeaseNotFound(_), .. }) => {}
                    Ok(other) => tracing::warn!(lease = id, result = ?other, "unexpected result revoking an expired lease"),
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; retrying");
                        lessor.revoke_failed(id);
                    }
                }
            }
        });
        futures::future::join_all(revokes).await;
    }
}
