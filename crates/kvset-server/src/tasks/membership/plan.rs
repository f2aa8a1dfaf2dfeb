//! The leader's membership decisions, as a pure function of what it observes.
//!
//! [`plan`] takes the current membership, the desired replica count and who answers at each
//! ordinal, and returns at most one change (or why none is made). The reconcile loop gathers
//! the observation (Raft metrics, probes) and carries the change out; everything that decides
//! lives here, table-tested below. The rules, in order:
//!
//! 1. **A membership change was left half done** (a joint configuration, whose leader lost
//!    leadership between openraft's two steps): finish it, to the configuration it was going to.
//!    openraft does not finish it by itself, and every other change waits for it. (The leader
//!    that is carrying a change out is inside that change, not planning.)
//! 2. **Stale or surplus learners** are removed: another incarnation answers at their ordinal,
//!    or their ordinal is beyond the desired count.
//! 3. **Replacement**: a voter whose ordinal now answers with another node id (its volume was
//!    lost) is swapped for that node in one change, once the new node is a caught-up learner.
//! 4. **Promotion, lowest ordinal first**: a caught-up learner becomes a voter, but only once
//!    every lower ordinal has a voter.
//! 5. **Scale-down, highest ordinal first**: a voter whose ordinal is beyond the desired count
//!    is removed, one at a time, never leaving fewer voters than desired and never leaving a
//!    configuration whose answering voters are not a majority (removing a healthy voter while
//!    others are down could otherwise cost the quorum).
//!
//! "Caught up" means the learner's own applied index (from its probe answer) is within
//! `catchup_lag` entries of the leader's last log index.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use kvset_storage::Member;
use openraft::ChangeMembers;

/// Who answered a probe at an ordinal (only members of this cluster, or fresh volumes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub node_id: u64,
    pub applied_index: u64,
}

/// What the leader sees when it reconciles.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Desired number of voters, and where that number came from (for messages).
    pub desired: u32,
    pub desired_source: String,
    /// The leader's node id and ordinal.
    pub leader_id: u64,
    pub leader_ordinal: u32,
    /// The membership: voters and every node (voters and learners) with its ordinal.
    pub voters: BTreeSet<u64>,
    pub nodes: BTreeMap<u64, Member>,
    /// A joint configuration is in effect: the voters it is going to (its last configuration).
    pub joint: Option<BTreeSet<u64>>,
    /// The leader's last log index.
    pub leader_last_log: u64,
    /// How far behind a learner may be and still count as caught up.
    pub catchup_lag: u64,
    /// Who answered at each other ordinal.
    pub answers: BTreeMap<u32, Answer>,
}

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    RemoveLearner(u64),
    /// Swap voter `old` for the caught-up learner `new`, in one joint-consensus change.
    Replace {
        old: u64,
        new: u64,
    },
    Promote(u64),
    RemoveVoter(u64),
    /// Leave a joint configuration for its last configuration, these voters.
    Finish(BTreeSet<u64>),
}

/// What the reconciler does this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Make this change; `what` describes it for logs and Status.
    Change { change: Change, what: String },
    /// Nothing can be done until something else happens; says what.
    Wait(String),
    /// The membership is what it should be.
    InSync(String),
}

impl Change {
    /// The openraft form of this change, given the current voters.
    pub fn to_openraft(&self, voters: &BTreeSet<u64>) -> ChangeMembers<u64, Member> {
        match self {
            Change::RemoveLearner(id) => ChangeMembers::RemoveNodes(BTreeSet::from([*id])),
            Change::Replace { old, new } => {
                let mut next = voters.clone();
                next.remove(old);
                next.insert(*new);
                ChangeMembers::ReplaceAllVoters(next)
            }
            Change::Promote(id) => ChangeMembers::AddVoterIds(BTreeSet::from([*id])),
            Change::RemoveVoter(id) => ChangeMembers::RemoveVoters(BTreeSet::from([*id])),
            Change::Finish(target) => ChangeMembers::ReplaceAllVoters(target.clone()),
        }
    }
}

impl Observation {
    fn name(&self, id: u64) -> String {
        self.nodes.get(&id).map_or_else(|| format!("node {id}"), |n| format!("{} (node {id})", n.name))
    }

    fn ordinal_of(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).map(|n| n.ordinal)
    }

    fn answer(&self, ordinal: u32) -> Option<&Answer> {
        if ordinal == self.leader_ordinal {
            None
        } else {
            self.answers.get(&ordinal)
        }
    }

    fn caught_up(&self, id: u64, ordinal: u32) -> bool {
        self.answer(ordinal)
            .is_some_and(|a| a.node_id == id && a.applied_index + self.catchup_lag >= self.leader_last_log)
    }

    /// Whether voter `id` answers as itself (the leader always does).
    fn healthy(&self, id: u64) -> bool {
        id == self.leader_id
            || self.ordinal_of(id).and_then(|o| self.answer(o)).is_some_and(|a| a.node_id == id)
    }

    fn learners(&self) -> impl Iterator<Item = (u64, &Member)> {
        self.nodes.iter().filter(|(id, _)| !self.voters.contains(id)).map(|(id, n)| (*id, n))
    }
}

/// Decides the next step. See the module docs for the rules.
pub fn plan(o: &Observation) -> Plan {
    if let Some(target) = &o.joint {
        let names: Vec<String> = target.iter().map(|id| o.name(*id)).collect();
        return Plan::Change {
            change: Change::Finish(target.clone()),
            what: format!("finish an interrupted membership change: voters {names:?}"),
        };
    }
    let desired = o.desired;

    // 1. Stale or surplus learners.
    for (id, node) in o.learners() {
        let stale = o.answer(node.ordinal).is_some_and(|a| a.node_id != id);
        if stale || node.ordinal >= desired {
            let why = if stale {
                "another incarnation now answers at its ordinal"
            } else {
                "beyond the desired replicas"
            };
            return Plan::Change {
                change: Change::RemoveLearner(id),
                what: format!("remove learner {} ({why})", o.name(id)),
            };
        }
    }

    // 2. Replacement of a voter whose ordinal now answers with another, caught-up, node id.
    for voter in &o.voters {
        let Some(ordinal) = o.ordinal_of(*voter) else { continue };
        let Some(answer) = o.answer(ordinal) else { continue };
        let is_learner = o.nodes.contains_key(&answer.node_id) && !o.voters.contains(&answer.node_id);
        if answer.node_id == *voter || !is_learner {
            continue;
        }
        if !o.caught_up(answer.node_id, ordinal) {
            return Plan::Wait(format!(
                "replacing {}: waiting for node {} to catch up (applied {} of {})",
                o.name(*voter),
                answer.node_id,
                answer.applied_index,
                o.leader_last_log
            ));
        }
        return Plan::Change {
            change: Change::Replace { old: *voter, new: answer.node_id },
            what: format!("replace {} with node {} (its volume was lost)", o.name(*voter), answer.node_id),
        };
    }

    // 3. Promotion, lowest ordinal first.
    let voter_ordinals: BTreeSet<u32> = o.voters.iter().filter_map(|v| o.ordinal_of(*v)).collect();
    let candidate = o
        .learners()
        .filter(|(_, n)| n.ordinal < desired && !voter_ordinals.contains(&n.ordinal))
        .map(|(id, n)| (n.ordinal, id))
        .min();
    if let Some((ordinal, id)) = candidate {
        if let Some(missing) = (0..ordinal).find(|x| !voter_ordinals.contains(x)) {
            return Plan::Wait(format!(
                "promoting {} waits: ordinal {missing} must join and be promoted first (lowest ordinal first)",
                o.name(id)
            ));
        }
        if !o.caught_up(id, ordinal) {
            return Plan::Wait(format!(
                "promoting {}: waiting for it to catch up (applied {} of {})",
                o.name(id),
                o.answer(ordinal).map_or(0, |a| a.applied_index),
                o.leader_last_log
            ));
        }
        return Plan::Change {
            change: Change::Promote(id),
            what: format!("promote {} to voter", o.name(id)),
        };
    }

    // 4. Scale down, highest ordinal first, never below the desired count or a safe quorum.
    let surplus = o
        .voters
        .iter()
        .filter_map(|v| o.ordinal_of(*v).map(|ord| (ord, *v)))
        .filter(|(ord, _)| *ord >= desired)
        .max();
    if let Some((_, id)) = surplus {
        if o.voters.len() as u32 <= desired {
            return Plan::Wait(format!(
                "scale down to {desired} waits: {} voters, removing {} would leave fewer than desired",
                o.voters.len(),
                o.name(id)
            ));
        }
        let remaining: Vec<u64> = o.voters.iter().copied().filter(|v| *v != id).collect();
        let healthy = remaining.iter().filter(|v| o.healthy(**v)).count();
        let quorum = remaining.len() / 2 + 1;
        if healthy < quorum {
            return Plan::Wait(format!(
                "scale down to {desired} waits: removing {} would leave {healthy} of {} voters answering, \
                 fewer than a quorum of {quorum}",
                o.name(id),
                remaining.len()
            ));
        }
        return Plan::Change {
            change: Change::RemoveVoter(id),
            what: format!("remove voter {} (scale down to {desired})", o.name(id)),
        };
    }

    let names: Vec<String> = o.voters.iter().map(|v| o.name(*v)).collect();
    Plan::InSync(format!(
        "in sync: {} voters {names:?}, desired {desired} ({})",
        o.voters.len(),
        o.desired_source
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node ids are 100 + ordinal for the first incarnation, 200 + ordinal for a replacement.
    fn member(ordinal: u32) -> Member {
        Member {
            ordinal,
            name: format!("kvset-{ordinal}"),
            peer_addr: format!("p{ordinal}"),
            client_addr: format!("c{ordinal}"),
        }
    }

    /// A leader (ordinal 0, node 100) with `voters` and `learners` given as (node id, ordinal),
    /// every other ordinal answering with the node id given in `answers` (fully caught up).
    fn obs(
        desired: u32,
        voters: &[(u64, u32)],
        learners: &[(u64, u32)],
        answers: &[(u32, u64)],
    ) -> Observation {
        let mut nodes = BTreeMap::new();
        for (id, ord) in voters.iter().chain(learners) {
            nodes.insert(*id, member(*ord));
        }
        Observation {
            desired,
            desired_source: "test".into(),
            leader_id: 100,
            leader_ordinal: 0,
            voters: voters.iter().map(|(id, _)| *id).collect(),
            nodes,
            joint: None,
            leader_last_log: 1000,
            catchup_lag: 100,
            answers: answers
                .iter()
                .map(|(o, id)| (*o, Answer { node_id: *id, applied_index: 1000 }))
                .collect(),
        }
    }

    fn change(p: Plan) -> Change {
        match p {
            Plan::Change { change, .. } => change,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn waits(p: &Plan, why: &str) -> bool {
        matches!(p, Plan::Wait(m) if m.contains(why))
    }

    const THREE: &[(u64, u32)] = &[(100, 0), (101, 1), (102, 2)];

    #[test]
    fn a_full_healthy_membership_is_in_sync() {
        let p = plan(&obs(3, THREE, &[], &[(1, 101), (2, 102)]));
        assert!(matches!(p, Plan::InSync(_)), "{p:?}");
    }

    #[test]
    fn a_joint_change_left_half_done_is_finished_first() {
        // A replacement of 101 by 103 whose leader died after the joint step: nothing else
        // happens until the configuration is {100, 102, 103}.
        let mut o = obs(5, THREE, &[(103, 3)], &[(1, 101), (2, 102), (3, 103)]);
        let target = BTreeSet::from([100, 102, 103]);
        o.joint = Some(target.clone());
        assert_eq!(change(plan(&o)), Change::Finish(target.clone()));
        assert_eq!(
            Change::Finish(target.clone()).to_openraft(&o.voters),
            ChangeMembers::ReplaceAllVoters(target)
        );
    }

    #[test]
    fn promotion_is_lowest_ordinal_first() {
        let learners = [(104, 4), (103, 3)];
        let answers = [(1, 101), (2, 102), (3, 103), (4, 104)];
        assert_eq!(change(plan(&obs(5, THREE, &learners, &answers))), Change::Promote(103));
        // Ordinal 4 may not go before a missing ordinal 3.
        let p = plan(&obs(5, THREE, &[(104, 4)], &[(1, 101), (2, 102), (4, 104)]));
        assert!(waits(&p, "ordinal 3 must join"), "{p:?}");
    }

    #[test]
    fn a_learner_that_has_not_caught_up_is_not_promoted() {
        let mut o = obs(4, THREE, &[(103, 3)], &[(1, 101), (2, 102), (3, 103)]);
        o.answers.insert(3, Answer { node_id: 103, applied_index: 10 });
        assert!(waits(&plan(&o), "catch up"));
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_first_one_at_a_time() {
        let five = [(100, 0), (101, 1), (102, 2), (103, 3), (104, 4)];
        let answers = [(1, 101), (2, 102), (3, 103), (4, 104)];
        assert_eq!(change(plan(&obs(3, &five, &[], &answers))), Change::RemoveVoter(104));
        let four = &five[..4];
        assert_eq!(change(plan(&obs(3, four, &[], &answers))), Change::RemoveVoter(103));
        assert!(matches!(plan(&obs(3, THREE, &[], &answers)), Plan::InSync(_)));
    }

    #[test]
    fn scale_down_never_leaves_a_configuration_without_an_answering_majority() {
        // 5 voters, ordinals 1 and 2 down: removing live ordinal 4 would leave {0,1,2,3}, of
        // which only 0 and 3 answer — no majority of 4. Wait instead.
        let five = [(100, 0), (101, 1), (102, 2), (103, 3), (104, 4)];
        let p = plan(&obs(3, &five, &[], &[(3, 103), (4, 104)]));
        assert!(waits(&p, "fewer than a quorum"), "{p:?}");
        // With ordinal 1 back, {0,1,2,3} has 3 answering of 4: safe.
        assert_eq!(
            change(plan(&obs(3, &five, &[], &[(1, 101), (3, 103), (4, 104)]))),
            Change::RemoveVoter(104)
        );
    }

    #[test]
    fn a_lost_volume_is_replaced_in_one_swap_once_the_new_node_caught_up() {
        let answers = [(1, 101), (2, 202)];
        assert_eq!(
            change(plan(&obs(3, THREE, &[(202, 2)], &answers))),
            Change::Replace { old: 102, new: 202 }
        );
        let mut o = obs(3, THREE, &[(202, 2)], &answers);
        o.answers.insert(2, Answer { node_id: 202, applied_index: 5 });
        assert!(waits(&plan(&o), "replacing kvset-2"));
        let swapped = Change::Replace { old: 102, new: 202 }.to_openraft(&o.voters);
        assert_eq!(swapped, ChangeMembers::ReplaceAllVoters(BTreeSet::from([100, 101, 202])));
    }

    #[test]
    fn stale_and_surplus_learners_are_removed_first() {
        // A learner whose ordinal now answers with another id (it was wiped again).
        let p = plan(&obs(3, THREE, &[(202, 2)], &[(1, 101), (2, 302)]));
        assert_eq!(change(p), Change::RemoveLearner(202));
        // A learner beyond the desired count.
        let p = plan(&obs(3, THREE, &[(105, 5)], &[(1, 101), (2, 102), (5, 105)]));
        assert_eq!(change(p), Change::RemoveLearner(105));
    }

    #[test]
    fn never_fewer_voters_than_desired() {
        // Desired 3 but only 3 voters, one of them beyond the count (ordinal 3 with 1 missing):
        // a learner at ordinal 1 is promoted first; the surplus waits.
        let voters = [(100, 0), (102, 2), (103, 3)];
        let answers = [(1, 101), (2, 102), (3, 103)];
        assert_eq!(change(plan(&obs(3, &voters, &[(101, 1)], &answers))), Change::Promote(101));
        let p = plan(&obs(3, &voters, &[], &[(2, 102), (3, 103)]));
        assert!(waits(&p, "fewer than desired"), "{p:?}");
    }
}
