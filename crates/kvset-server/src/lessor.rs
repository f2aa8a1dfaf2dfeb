//! Lease expiry, decided by the leader alone.
//!
//! The state machine records which leases exist, their granted TTL and their keys; *when* a
//! lease expires is kept here, in the leader's memory (as etcd does): a keep-alive moves the
//! lease's deadline to now + TTL, and the leader's lease task revokes leases whose deadline
//! passed by proposing `LeaseRevoke` through Raft, so every member deletes their keys at the
//! same revision.
//!
//! * **Only the primary decides, and only for its term.** The lessor is primary for the term in
//!   which its member leads; a follower keeps no deadlines and revokes nothing. Its state is
//!   keyed by that term: a member that lost leadership and won it back between two looks
//!   starts over, as a new leader must.
//! * **A failover never punishes a client that kept renewing.** When a member becomes primary
//!   it gives every lease a full TTL plus `extend` (the election timeout) from that moment: a
//!   client that renewed on the old leader at time t had a deadline t + TTL, which is before the
//!   new one.
//! * **A lease is one grant, not one id.** Deadlines are kept per grant (the id and the grant
//!   number the state machine gives each grant), so a lease revoked and granted again under the
//!   same id between two looks starts with its own TTL and its own expiry, never the old one's.
//!   A lease granted while primary expires its TTL after its grant applied here, however late
//!   the lessor looks.
//! * **An expired lease is not renewed.** From the moment its deadline passes the lease is
//!   being revoked; a renewal then is refused ([`Renewal::Expired`]) — the caller waits for the
//!   revoke and answers "not found", as etcd's `Renew` waits for the revoke — never a TTL for a
//!   lease whose keys are about to go.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_storage::LeaseId;
use kvset_storage::LeaseTable;

/// What the lessor tracks of one lease grant.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// The grant number of the lease this is about.
    grant: u64,
    deadline: Instant,
    /// Picked as expired; its revoke is in flight (or failed and waits to be taken again).
    revoking: bool,
}

#[derive(Debug, Default)]
struct State {
    /// The term this lessor is primary in; `None` while its member does not lead.
    term: Option<u64>,
    tracked: HashMap<LeaseId, Tracked>,
    /// The lease table `tracked` was last matched with.
    synced: Option<LeaseTable>,
}

/// A term in which the lessor's member leads, and since when (as its member saw it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    pub since: Instant,
}

/// The answer to a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: the lease's TTL in seconds.
    Renewed(i64),
    /// No such lease.
    NotFound,
    /// Its deadline passed: it is being revoked.
    Expired,
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

    /// Matches the lessor with its member's leadership (`Some` while it leads) and the lease
    /// table.
    pub fn sync(&self, leading: Option<Leadership>, table: &LeaseTable, now: Instant) {
        let mut st = self.state();
        Self::sync_locked(&mut st, self.extend, leading, table, now);
    }

    fn sync_locked(
        st: &mut State,
        extend: Duration,
        leading: Option<Leadership>,
        table: &LeaseTable,
        now: Instant,
    ) {
        let Some(Leadership { term, since }) = leading else {
            if st.term.is_some() {
                tracing::info!("no longer the leader: lease deadlines dropped");
            }
            *st = State::default();
            return;
        };
        if st.term != Some(term) {
            // Promoted: leases from before the leadership get a full TTL plus the extension
            // from when it began; one granted since then runs from its grant.
            let since = since.min(now);
            let deadline = |l: &kvset_storage::Lease| match l.applied_at {
                Some(at) if at > since => at + ttl(l.ttl),
                _ => since + ttl(l.ttl) + extend,
            };
            st.term = Some(term);
            st.tracked = table
                .values()
                .map(|l| (l.id, Tracked { grant: l.grant, deadline: deadline(l), revoking: false }))
                .collect();
            st.synced = Some(table.clone());
            tracing::info!(
                term,
                leases = table.len(),
                extend_ms = extend.as_millis() as u64,
                "leading: every lease extended"
            );
            return;
        }
        if st.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, table)) {
            return;
        }
        // A grant gone from the table was revoked; an id granted again is a new grant, whose
        // TTL runs from when this member applied it.
        st.tracked.retain(|id, t| table.get(id).is_some_and(|l| l.grant == t.grant));
        for lease in table.values() {
            st.tracked.entry(lease.id).or_insert(Tracked {
                grant: lease.grant,
                deadline: lease.applied_at.unwrap_or(now) + ttl(lease.ttl),
                revoking: false,
            });
        }
        st.synced = Some(table.clone());
    }

    /// Leases whose deadline passed (at most `max`, earliest first), now marked as being
    /// revoked. Empty unless primary.
    pub fn take_expired(&self, now: Instant, max: usize) -> Vec<LeaseId> {
        let mut st = self.state();
        let mut expired: Vec<(Instant, LeaseId)> = st
            .tracked
            .iter()
            .filter(|(_, t)| t.deadline <= now && !t.revoking)
            .map(|(id, t)| (t.deadline, *id))
            .collect();
        expired.sort_unstable();
        expired.truncate(max);
        let ids: Vec<LeaseId> = expired.into_iter().map(|(_, id)| id).collect();
        for id in &ids {
            if let Some(t) = st.tracked.get_mut(id) {
                t.revoking = true;
            }
        }
        ids
    }

    /// A revoke that failed: the lease may be taken again (it is still expired, so renewals
    /// stay refused).
    pub fn revoke_failed(&self, id: LeaseId) {
        if let Some(t) = self.state().tracked.get_mut(&id) {
            t.revoking = false;
        }
    }

    /// Renews lease `id` on the leader (becoming primary first if the lease task has not yet):
    /// its deadline becomes now + TTL, unless it has expired. `table` must be the lease table of
    /// a state machine that has applied everything committed before the leader's term.
    pub fn renew(&self, id: LeaseId, leading: Leadership, table: &LeaseTable, now: Instant) -> Renewal {
        let mut st = self.state();
        Self::sync_locked(&mut st, self.extend, Some(leading), table, now);
        let Some(lease) = table.get(&id) else { return Renewal::NotFound };
        let Some(tracked) = st.tracked.get_mut(&id) else { return Renewal::NotFound };
        if tracked.revoking || tracked.deadline <= now {
            return Renewal::Expired;
        }
        tracked.deadline = now + ttl(lease.ttl);
        Renewal::Renewed(lease.ttl)
    }

    /// How long lease `id` has left, when this lessor is primary and tracks it.
    pub fn remaining(&self, id: LeaseId, now: Instant) -> Option<Duration> {
        let st = self.state();
        st.term?;
        st.tracked.get(&id).map(|t| t.deadline.saturating_duration_since(now))
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

    /// A lease table of (id, ttl, grant).
    fn table(leases: &[(LeaseId, i64, u64)]) -> LeaseTable {
        Arc::new(
            leases
                .iter()
                .map(|(id, ttl, grant)| (*id, Lease { id: *id, ttl: *ttl, grant: *grant, applied_at: None }))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    const S: Duration = Duration::from_secs(1);

    /// Leading in `term` since `since`.
    fn leading(term: u64, since: Instant) -> Option<Leadership> {
        Some(Leadership { term, since })
    }

    #[test]
    fn only_the_leader_expires_and_a_new_leader_extends_every_lease() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        let leases = table(&[(1, 10, 1), (2, 20, 2)]);
        l.sync(None, &leases, t0);
        assert!(l.take_expired(t0 + 100 * S, 10).is_empty(), "a follower expires nothing");
        l.sync(leading(3, t0), &leases, t0);
        assert_eq!(l.remaining(1, t0), Some(15 * S), "TTL + the election timeout");
        assert!(l.take_expired(t0 + 14 * S, 10).is_empty());
        assert_eq!(l.take_expired(t0 + 15 * S, 10), vec![1]);
        assert!(l.take_expired(t0 + 15 * S, 10).is_empty(), "in flight: not taken twice");
        l.revoke_failed(1);
        assert_eq!(l.take_expired(t0 + 26 * S, 10), vec![1, 2], "earliest first");
        l.sync(None, &leases, t0);
        assert_eq!(l.remaining(1, t0), None);
    }

    #[test]
    fn renewals_push_the_deadline_and_unknown_leases_are_not_found() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        let leases = table(&[(1, 10, 1)]);
        l.sync(leading(3, t0), &leases, t0);
        let later = t0 + 12 * S;
        assert_eq!(l.renew(1, Leadership { term: 3, since: t0 }, &leases, later), Renewal::Renewed(10));
        assert_eq!(l.remaining(1, later), Some(10 * S));
        assert!(l.take_expired(later + 9 * S, 10).is_empty());
        assert_eq!(l.renew(2, Leadership { term: 3, since: t0 }, &leases, later), Renewal::NotFound);
    }

    #[test]
    fn deadlines_follow_the_lease_table() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        l.sync(leading(3, t0), &table(&[(1, 10, 1)]), t0);
        let t1 = t0 + S;
        l.sync(leading(3, t1), &table(&[(2, 3, 2)]), t1);
        assert_eq!(l.remaining(1, t1), None, "revoked: forgotten");
        assert_eq!(l.remaining(2, t1), Some(3 * S), "granted while leading: a plain TTL");
    }

    /// Issue 24, item 2: after the lessor picked a lease as expired and before its revoke
    /// applied, a renewal answered a TTL; moments later the lease and its keys were gone.
    #[test]
    fn an_expired_lease_is_not_renewed_while_its_revoke_is_in_flight_or_after_it_failed() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        let leases = table(&[(1, 10, 1)]);
        l.sync(leading(3, t0), &leases, t0);
        let expired_at = t0 + 15 * S;
        assert_eq!(l.take_expired(expired_at, 10), vec![1]);
        assert_eq!(
            l.renew(1, Leadership { term: 3, since: t0 }, &leases, expired_at),
            Renewal::Expired,
            "the revoke is in flight"
        );
        l.revoke_failed(1);
        assert_eq!(
            l.renew(1, Leadership { term: 3, since: t0 }, &leases, expired_at + S),
            Renewal::Expired,
            "still expired"
        );
        assert_eq!(l.take_expired(expired_at + S, 10), vec![1], "taken again");
        // Past its deadline but not yet picked by the lease task: expired all the same.
        let l = Lessor::new(5 * S);
        l.sync(leading(3, t0), &leases, t0);
        assert_eq!(l.renew(1, Leadership { term: 3, since: t0 }, &leases, t0 + 16 * S), Renewal::Expired);
    }

    /// Issue 24, item 3: a lease revoked and granted again under the same id between two looks
    /// kept the old grant's state: stuck as "being revoked" (never expiring), or with the old
    /// deadline (expiring early).
    #[test]
    fn a_lease_granted_again_under_the_same_id_starts_over() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        l.sync(leading(3, t0), &table(&[(1, 10, 1)]), t0);
        assert_eq!(l.take_expired(t0 + 15 * S, 10), vec![1]);
        // Revoked and granted again (grant 2) before the lessor looked.
        let t1 = t0 + 16 * S;
        let regranted = table(&[(1, 30, 2)]);
        l.sync(leading(3, t1), &regranted, t1);
        assert_eq!(l.remaining(1, t1), Some(30 * S), "the new grant's own TTL");
        assert_eq!(
            l.renew(1, Leadership { term: 3, since: t0 }, &regranted, t1),
            Renewal::Renewed(30),
            "not stuck as revoking"
        );
        assert_eq!(l.take_expired(t1 + 30 * S, 10), vec![1], "and it expires again");

        // The other way round: an old deadline must not carry over to the new grant.
        let l = Lessor::new(5 * S);
        l.sync(leading(3, t0), &table(&[(7, 10, 1)]), t0);
        let t2 = t0 + 14 * S;
        l.sync(leading(3, t2), &table(&[(7, 10, 9)]), t2);
        assert!(l.take_expired(t0 + 15 * S, 10).is_empty(), "the new grant does not expire early");
        assert_eq!(l.remaining(7, t2), Some(10 * S));
    }

    /// Issue 24, item 4: leadership lost and won back between two looks kept the old
    /// deadlines, without the extension a new leader gives.
    #[test]
    fn leadership_regained_in_a_new_term_extends_every_lease_again() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        let leases = table(&[(1, 10, 1)]);
        l.sync(leading(3, t0), &leases, t0);
        // Term 4 went to another member, term 5 back to this one: the lessor only sees term 5.
        let t1 = t0 + 8 * S;
        l.sync(leading(5, t1), &leases, t1);
        assert_eq!(l.remaining(1, t1), Some(15 * S), "a full TTL and the extension from now");
        assert!(l.take_expired(t0 + 15 * S, 10).is_empty(), "not the old term's deadline");
        // A renewal names the term it is served in, and becomes primary in it.
        let l = Lessor::new(5 * S);
        l.sync(leading(3, t0), &leases, t0);
        assert_eq!(l.take_expired(t0 + 15 * S, 10), vec![1]);
        let term6 = Leadership { term: 6, since: t0 + 15 * S };
        assert_eq!(l.renew(1, term6, &leases, t0 + 15 * S), Renewal::Renewed(10), "term 6 starts over");
    }

    /// Found by `lease_safety.rs`: a lessor that looked only at its next tick counted a lease's
    /// TTL from that look (and, becoming primary late, gave leases granted under its own
    /// leadership the new-leader extension), so a lease outlived its TTL and was renewed after
    /// its deadline.
    #[test]
    fn ttls_run_from_the_grant_and_from_the_leadership_however_late_the_lessor_looks() {
        let l = Lessor::new(5 * S);
        let t0 = Instant::now();
        let granted_at = t0 + 2 * S;
        let leases = Arc::new(
            [
                (1, Lease { id: 1, ttl: 10, grant: 1, applied_at: None }),
                (2, Lease { id: 2, ttl: 10, grant: 2, applied_at: Some(granted_at) }),
            ]
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        );
        // Leading since t0; the lessor first looks at t0 + 4 s.
        l.sync(leading(3, t0), &leases, t0 + 4 * S);
        assert_eq!(l.remaining(1, t0), Some(15 * S), "from the leadership, with the extension");
        assert_eq!(l.remaining(2, t0), Some(12 * S), "from its grant, no extension");
        // A grant seen at a later look of the same term.
        let l = Lessor::new(5 * S);
        l.sync(leading(3, t0), &table(&[]), t0);
        l.sync(leading(3, t0), &leases, t0 + 4 * S);
        assert_eq!(l.remaining(2, t0), Some(12 * S));
        assert_eq!(l.renew(2, Leadership { term: 3, since: t0 }, &leases, t0 + 12 * S), Renewal::Expired);
    }
}
