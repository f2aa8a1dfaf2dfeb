//! Lease expiry, decided by the leader alone.
//!
//! The state machine records which leases exist, their granted TTL and their keys; *when* a
//! lease expires is kept here, in the leader's memory (as etcd does): a keep-alive moves the
//! lease's deadline to now + TTL, and the leader's lease task revokes leases whose deadline
//! passed by proposing `LeaseRevoke` through Raft, so every member deletes their keys at the
//! same revision.
//!
//! * **Only the primary decides.** The lessor is primary while its member leads; a follower
//!   keeps no deadlines and revokes nothing.
//! * **A failover never punishes a client that kept renewing.** When a member becomes primary
//!   it gives every lease a full TTL plus `extend` (the election timeout) from that moment: a
//!   client that renewed on the old leader at time t had a deadline t + TTL, which is before the
//!   new one.
//! * Deadlines follow the lease table: a lease granted while primary gets now + TTL; a revoked
//!   one is forgotten.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::LeaseId;
use kvset_storage::LeaseTable;

#[derive(Debug, Default)]
struct State {
    primary: bool,
    deadlines: HashMap<LeaseId, Instant>,
    /// The lease table the deadlines were last matched with.
    synced: Option<LeaseTable>,
    /// Expired leases whose revoke is in flight.
    revoking: HashSet<LeaseId>,
}

/// The leader's lease deadlines. See the module docs.
#[derive(Debug)]
pub struct Lessor {
    extend: Duration,
    state: Mutex<State>,
}

impl Lessor {
    /// A lessor that extends every lease by `extend` when its member becomes leader.
    pub fn new(extend: Duration) -> Self {
        Self { extend, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Matches the lessor with its member's leadership and the lease table.
    pub fn sync(&self, leader: bool, table: &LeaseTable, now: Instant) {
        let mut st = self.state();
        Self::sync_locked(&mut st, self.extend, leader, table, now);
    }

    fn sync_locked(st: &mut State, extend: Duration, leader: bool, table: &LeaseTable, now: Instant) {
        if !leader {
            if st.primary {
                tracing::info!("no longer the leader: lease deadlines dropped");
            }
            *st = State::default();
            return;
        }
        if !st.primary {
            st.primary = true;
            st.deadlines = table.values().map(|l| (l.id, now + ttl(l.ttl) + extend)).collect();
            st.synced = Some(table.clone());
            tracing::info!(
                leases = table.len(),
                extend_ms = extend.as_millis() as u64,
                "leading: every lease extended"
            );
            return;
        }
        if st.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, table)) {
            return;
        }
        st.deadlines.retain(|id, _| table.contains_key(id));
        st.revoking.retain(|id| table.contains_key(id));
        for lease in table.values() {
            st.deadlines.entry(lease.id).or_insert(now + ttl(lease.ttl));
        }
        st.synced = Some(table.clone());
    }

    /// Leases whose deadline passed (at most `max`, earliest first), now marked as being
    /// revoked. Empty unless primary.
    pub fn take_expired(&self, now: Instant, max: usize) -> Vec<LeaseId> {
        let mut st = self.state();
        let mut expired: Vec<(Instant, LeaseId)> = st
            .deadlines
            .iter()
            .filter(|(id, deadline)| **deadline <= now && !st.revoking.contains(id))
            .map(|(id, deadline)| (*deadline, *id))
            .collect();
        expired.sort_unstable();
        expired.truncate(max);
        let ids: Vec<LeaseId> = expired.into_iter().map(|(_, id)| id).collect();
        st.revoking.extend(ids.iter().copied());
        ids
    }

    /// A revoke that failed: the lease may be taken again.
    pub fn revoke_failed(&self, id: LeaseId) {
        self.state().revoking.remove(&id);
    }

    /// Renews lease `id` on the leader (becoming primary first if the lease task has not yet):
    /// its deadline becomes now + TTL. Returns the TTL, or `None` when the lease does not exist.
    pub fn renew(&self, id: LeaseId, table: &LeaseTable, now: Instant) -> Option<i64> {
        let mut st = self.state();
        Self::sync_locked(&mut st, self.extend, true, table, now);
        let lease = table.get(&id)?;
        st.deadlines.insert(id, now + ttl(lease.ttl));
        Some(lease.ttl)
    }

    /// How long lease `id` has left, when this lessor is primary and tracks it.
    pub fn remaining(&self, id: LeaseId, now: Instant) -> Option<Duration> {
        let st = self.state();
        if !st.primary {
            return None;
        }
        st.deadlines.get(&id).map(|d| d.saturating_duration_since(now))
    }
}

fn ttl(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kvset_storage::Lease;

    use super::*;

    fn table(leases: &[(LeaseId, i64)]) -> LeaseTable {
        Arc::new(
            leases.iter().map(|(id, ttl)| (*id, Lease { id: *id, ttl: *ttl })).collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn only_the_leader_expires_and_a_new_leader_extends_every_lease() {
        let l = Lessor::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let leases = table(&[(1, 10), (2, 20)]);
        l.sync(false, &leases, t0);
        assert!(l.take_expired(t0 + Duration::from_secs(100), 10).is_empty(), "a follower expires nothing");
        l.sync(true, &leases, t0);
        assert_eq!(l.remaining(1, t0), Some(Duration::from_secs(15)), "TTL + the election timeout");
        assert!(l.take_expired(t0 + Duration::from_secs(14), 10).is_empty());
        assert_eq!(l.take_expired(t0 + Duration::from_secs(15), 10), vec![1]);
        assert!(l.take_expired(t0 + Duration::from_secs(15), 10).is_empty(), "in flight: not taken twice");
        l.revoke_failed(1);
        assert_eq!(l.take_expired(t0 + Duration::from_secs(26), 10), vec![1, 2], "earliest first");
        l.sync(false, &leases, t0);
        assert_eq!(l.remaining(1, t0), None);
    }

    #[test]
    fn renewals_push_the_deadline_and_unknown_leases_are_none() {
        let l = Lessor::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let leases = table(&[(1, 10)]);
        l.sync(true, &leases, t0);
        let later = t0 + Duration::from_secs(12);
        assert_eq!(l.renew(1, &leases, later), Some(10));
        assert_eq!(l.remaining(1, later), Some(Duration::from_secs(10)));
        assert!(l.take_expired(later + Duration::from_secs(9), 10).is_empty());
        assert_eq!(l.renew(2, &leases, later), None);
    }

    #[test]
    fn deadlines_follow_the_lease_table() {
        let l = Lessor::new(Duration::from_secs(5));
        let t0 = Instant::now();
        l.sync(true, &table(&[(1, 10)]), t0);
        let t1 = t0 + Duration::from_secs(1);
        l.sync(true, &table(&[(2, 3)]), t1);
        assert_eq!(l.remaining(1, t1), None, "revoked: forgotten");
        assert_eq!(l.remaining(2, t1), Some(Duration::from_secs(3)), "granted while leading: a plain TTL");
    }
}
