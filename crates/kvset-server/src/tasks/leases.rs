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
use tokio::sync::watch;

use crate::member::LocalMember;

/// How long one revoke may take.
const REVOKE_DEADLINE: Duration = Duration::from_secs(5);

/// Runs until `stop`.
pub async fn run(member: Arc<LocalMember>, mut stop: watch::Receiver<bool>) {
    let config = member.config().lease.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(config.check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // Primary only once this member leads and has applied its predecessors' log: until
        // then its lease table may lack leases they granted.
        let leading = member.leading_term();
        let now = Instant::now();
        member.lessor().sync(leading, &member.reader().leases(), now);
        if leading.is_none() {
            continue;
        }
        let expired = member.lessor().take_expired(now, config.revoke_per_check as usize);
        let revokes = expired.into_iter().map(|id| {
            let member = member.clone();
            async move {
                match member.submit(Command::LeaseRevoke(id), Instant::now() + REVOKE_DEADLINE).await {
                    Ok(CommandResult::LeaseRevoke { revision, deleted }) => {
                        member.metrics().leases_expired.inc();
                        tracing::info!(lease = id, deleted, revision, "lease expired: revoked");
                    }
                    Ok(CommandResult::Rejected { error: ApplyError::LeaseNotFound(_), .. }) => {}
                    Ok(other) => tracing::warn!(lease = id, result = ?other, "unexpected result revoking an expired lease"),
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; retrying");
                        member.lessor().revoke_failed(id);
                    }
                }
            }
        });
        futures::future::join_all(revokes).await;
    }
}
