//! Self-managing membership (docs/architecture.md, "Membership"): bootstrap, join, promotion,
//! replacement and ordered scale-down, with no person running `member add`.
//!
//! One task per member runs `step` about once a second:
//!
//! * **Not yet in a cluster** (no Raft membership): probe the ordinals `0..max(initial
//!   replicas, own ordinal + 1)`.
//!   - If any answers with a cluster id, adopt it (refusing a cluster other than the one the
//!     volume names) and ask that member to add us (`Join`, forwarded to the leader, which adds
//!     us as a learner).
//!   - Else, only ordinal 0 with an empty volume may bootstrap, and only once every ordinal in
//!     `0..initial_replicas` answered that it is empty and has no cluster id. It mints the
//!     cluster id and initialises Raft with all of them as voters. Anything else: wait, and
//!     say what is awaited. Never guess.
//! * **Leader**: reconcile. The membership converges to "the voters are the node ids of the
//!   pods at ordinals `0..desired`". The pod at each ordinal is asked who it is (`Probe`), and
//!   the pure function [`plan::plan`] decides at most one change per step (stale learners,
//!   replacement, promotion lowest ordinal first, scale-down highest first without losing a
//!   safe quorum; its module docs give the rules).
//! * **Voter that hears no leader**: probe the peers; if they lead a cluster whose voters no
//!   longer include us, say so loudly (this volume's member was replaced or removed) and never
//!   try to rejoin under the old id.
//!
//! A SIGTERM never removes a member: only the desired replica count does.
//!
//! The leader's reconciler reports its state in `/metrics` (`membership_reconciler_state`, and
//! `membership_out_of_sync_seconds`, which an alert watches for a reconciler stuck out of sync)
//! and records each change it makes, and its outcome, in the ops page's journal.

pub mod plan;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::v1 as pb;
use kvset_proto::v1::raft_client::RaftClient;
use kvset_storage::ClusterId;
use kvset_storage::Member;
use kvset_storage::RaftMetrics;
use openraft::ServerState;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::member::LocalMember;
use crate::timeline::Timeline;
use plan::Answer;
use plan::Observation;
use plan::Plan;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one membership change may take.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Steps without a leader before a voter checks whether it was removed.
const LEADERLESS_STEPS: u32 = 5;

/// State the membership loop keeps between steps.
#[derive(Default)]
struct Loop {
    leaderless_steps: u32,
    /// Since when the leader's reconciler has not been in sync.
    out_of_sync_since: Option<Instant>,
    /// Where the changes made are recorded.
    journal: Arc<Timeline>,
}

impl Loop {
    /// Reports the reconciler's state (`None`: this member does not reconcile, not leading).
    fn report(&mut self, shared: &LocalMember, state: Option<&'static str>) {
        let out_of_sync = match state {
            None | Some("in_sync") => {
                self.out_of_sync_since = None;
                Duration::ZERO
            }
            Some(_) => self.out_of_sync_since.get_or_insert_with(Instant::now).elapsed(),
        };
        shared.metrics().reconciler(state, out_of_sync);
    }
}

/// A peer-service client for `addr`, over the member's shared channels.
fn client(shared: &LocalMember, name: &str, addr: &str) -> Result<RaftClient<Channel>, String> {
    shared.channels().get(name, addr).map(RaftClient::new).map_err(|e| e.to_string())
}

impl Loop {
    /// Probes several ordinals at once.
    async fn probe_all(
        &mut self,
        shared: &LocalMember,
        ordinals: impl IntoIterator<Item = u32>,
    ) -> BTreeMap<u32, Result<pb::ProbeReply, String>> {
        let mut calls = Vec::new();
        for ordinal in ordinals {
            let addr = shared.book().peer_addr(ordinal);
            let client = client(shared, &shared.identity().sibling(ordinal), &addr);
            let req = pb::ProbeRequest {
                from_name: shared.identity().name.clone(),
                cluster_id: shared.cluster().to_wire(),
            };
            let name = shared.identity().sibling(ordinal);
            calls.push(async move {
                let result = match client {
                    Err(e) => Err(e),
                    Ok(mut c) => {
                        let mut req = tonic::Request::new(req);
                        req.set_timeout(PROBE_TIMEOUT);
                        match tokio::time::timeout(PROBE_TIMEOUT, c.probe(req)).await {
                            Ok(Ok(r)) => Ok(r.into_inner()),
                            Ok(Err(status)) => Err(format!("{name} ({addr}): {}", short(&status))),
                            Err(_) => Err(format!("{name} ({addr}): timed out")),
                        }
                    }
                };
                (ordinal, result)
            });
        }
        futures::future::join_all(calls).await.into_iter().collect()
    }
}

/// A status without its (long) source chain, for one-line logs.
fn short(status: &tonic::Status) -> String {
    use std::error::Error;
    let msg = status.message();
    let detail = status.source().map(|s| {
        let mut e: &dyn Error = s;
        while let Some(inner) = e.source() {
            e = inner;
        }
        e.to_string()
    });
    match detail {
        Some(d) if !d.is_empty() && d != msg => format!("{msg}: {d}"),
        _ => msg.to_string(),
    }
}

/// Runs the membership loop until `stop`; records the changes it makes in `journal`.
pub async fn run(shared: Arc<LocalMember>, journal: Arc<Timeline>, mut stop: watch::Receiver<bool>) {
    let mut state = Loop { journal, ..Loop::default() };
    let base = Duration::from_millis(500);
    let mut delay = base;
    loop {
        let progressed = step(&shared, &mut state).await;
        delay = if progressed { base } else { (delay * 2).min(Duration::from_secs(4)) };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One step of the loop. Returns whether it changed something or is in steady state (short
/// delay), as opposed to waiting on others (back off).
async fn step(shared: &Arc<LocalMember>, state: &mut Loop) -> bool {
    let m = shared.raft_metrics();
    let membership = m.membership_config.membership();
    if membership.nodes().next().is_none() {
        // The metrics start empty and catch up once the Raft core has loaded the volume: only
        // the core itself can say that this member really has no cluster. Acting on the empty
        // metrics of a restarted member made a removed incarnation ask to join again.
        match loaded_state(shared).await {
            Ok(Loaded { has_membership: false, last_log_index: 0 }) => {
                return find_cluster(shared, state).await
            }
            Ok(Loaded { has_membership: true, .. }) => return false,
            Ok(Loaded { last_log_index, .. }) => {
                shared.set_reconciler_status(format!(
                    "this volume holds Raft log up to index {last_log_index} but no membership: not joining"
                ));
                return false;
            }
            Err(e) => {
                shared.set_reconciler_status(format!("cannot read the Raft state: {e}"));
                return false;
            }
        }
    }
    if m.state == ServerState::Leader {
        // A leader proposes changes only while a quorum answers it. One that has heard from no
        // quorum may have been replaced or removed while it was away (openraft 0.9 restores a
        // leadership it had committed for itself at startup): it asks its peers, like a
        // leaderless voter, instead of believing it leads forever.
        let Some(ms) = shared.quorum_lost_ms(crate::member::millis_since_quorum_ack(&m)) else {
            state.leaderless_steps = 0;
            return reconcile(shared, state, &m).await;
        };
        state.report(shared, Some("no_quorum"));
        state.leaderless_steps += 1;
        if state.leaderless_steps < LEADERLESS_STEPS || !check_removed(shared, state).await {
            shared.set_reconciler_status(format!(
                "leader of term {} but no quorum has answered for {ms} ms: no membership changes until one does",
                m.current_term
            ));
        }
        return false;
    }
    state.report(shared, None);
    if m.current_leader.is_some() {
        state.leaderless_steps = 0;
        let role = if membership.voter_ids().any(|v| v == shared.node_id()) { "voter" } else { "learner" };
        shared.set_reconciler_status(format!("{role}; leader is node {}", m.current_leader.unwrap_or(0)));
        return true;
    }
    state.leaderless_steps += 1;
    if state.leaderless_steps < LEADERLESS_STEPS || !check_removed(shared, state).await {
        shared.set_reconciler_status("no leader known; waiting for an election".into());
    }
    false
}

/// Asks the other members whether the cluster's current voters still include this member.
/// `Some(false)` once a member that knows a leader lists voters without us; `None` if no
/// member of our cluster answered with a leader. (A removed member is never told of its own
/// removal by Raft, so it has to ask.)
pub async fn still_a_voter(shared: &LocalMember) -> Option<bool> {
    let mut state = Loop::default();
    let me = shared.identity().ordinal;
    let mut ordinals: BTreeSet<u32> =
        shared.raft_metrics().membership_config.membership().nodes().map(|(_, n)| n.ordinal).collect();
    ordinals.remove(&me);
    let replies = state.probe_all(shared, ordinals).await;
    let ours = shared.cluster().to_wire();
    let mut answer = None;
    for reply in replies.values().flatten() {
        if reply.cluster_id == ours && reply.leader_id != 0 && reply.leader_id != shared.node_id() {
            if !reply.voters.contains(&shared.node_id()) {
                return Some(false);
            }
            answer = Some(true);
        }
    }
    answer
}

/// A member with Raft state but no working leadership: find out whether the cluster moved on
/// without us. Returns whether it did (the reconciler status then says so).
async fn check_removed(shared: &LocalMember, state: &mut Loop) -> bool {
    let me = shared.identity().ordinal;
    let known: BTreeSet<u32> =
        shared.raft_metrics().membership_config.membership().nodes().map(|(_, n)| n.ordinal).collect();
    let ordinals: Vec<u32> = known.into_iter().filter(|o| *o != me).collect();
    let replies = state.probe_all(shared, ordinals).await;
    let mine = shared.cluster().to_wire();
    for reply in replies.values().flatten() {
        if reply.cluster_id == mine && reply.leader_id != 0 && !reply.voters.contains(&shared.node_id()) {
            let status = format!(
                "node {} is no longer a member of cluster {mine}: this volume's member was replaced or removed \
                 (the cluster's voters are {:?}, leader {}). It will not rejoin under this id; delete the volume \
                 to rejoin as a new member",
                shared.node_id(), reply.voters, reply.leader_id
            );
            let changed = shared.reconciler_status() != status;
            if changed {
                tracing::error!("{status}");
            }
            shared.set_reconciler_status(status);
            return true;
        }
    }
    false
}

/// Not in any membership yet: join a cluster, or bootstrap one, or wait.
async fn find_cluster(shared: &Arc<LocalMember>, state: &mut Loop) -> bool {
    let me = shared.identity().ordinal;
    let initial = shared.config().initial_replicas;
    let upper = initial.max(me + 1);
    let replies = state.probe_all(shared, (0..upper).filter(|o| *o != me)).await;

    // Prefer a member that knows a leader.
    let clustered = replies
        .iter()
        .filter_map(|(o, r)| r.as_ref().ok().map(|r| (*o, r)))
        .filter(|(_, r)| !r.cluster_id.is_empty())
        .max_by_key(|(_, r)| (r.member && r.leader_id != 0, r.member));
    if let Some((ordinal, reply)) = clustered {
        return join(shared, ordinal, reply).await;
    }

    if let Some(cluster) = shared.cluster_id() {
        shared.set_reconciler_status(format!(
            "volume belongs to cluster {cluster}; waiting for its leader to reach us (no other ordinal answered with it)"
        ));
        return false;
    }
    let unreachable: Vec<String> = replies.values().filter_map(|r| r.as_ref().err().cloned()).collect();
    if me != 0 {
        shared.set_reconciler_status(format!(
            "waiting for ordinal 0 to bootstrap the cluster, or for a cluster to join{}",
            if unreachable.is_empty() {
                String::new()
            } else {
                format!(" (unreachable: {})", unreachable.join("; "))
            }
        ));
        return false;
    }

    // Bootstrap rule: ordinal 0, empty volume, and every initial ordinal answered empty.
    let raft_empty = shared.raft_metrics().last_log_index.is_none();
    if !raft_empty {
        shared.set_reconciler_status(
            "volume has Raft state but no cluster id and no membership: refusing to bootstrap over it".into(),
        );
        return false;
    }
    let mut members: BTreeMap<u64, Member> = BTreeMap::from([(shared.node_id(), shared.me().clone())]);
    let mut waiting = Vec::new();
    for ordinal in 1..initial {
        match replies.get(&ordinal) {
            Some(Ok(r)) if r.empty && r.cluster_id.is_empty() => {
                members.insert(r.node_id, shared.book().member(ordinal));
            }
            Some(Ok(r)) => waiting.push(format!(
                "{} is not empty (node {}, member: {}) but has no cluster id",
                shared.identity().sibling(ordinal),
                r.node_id,
                r.member
            )),
            Some(Err(e)) => waiting.push(e.clone()),
            None => waiting.push(format!("{} was not probed", shared.identity().sibling(ordinal))),
        }
    }
    if !waiting.is_empty() {
        shared.set_reconciler_status(format!(
            "waiting to bootstrap: every ordinal in 0..{initial} must answer empty; waiting for: {}",
            waiting.join("; ")
        ));
        return false;
    }

    let cluster = ClusterId::random();
    if let Err(e) = shared.adopt_cluster(cluster).await {
        shared.set_reconciler_status(format!("cannot record the new cluster id: {e}"));
        return false;
    }
    let names: Vec<String> = members.values().map(|m| m.name.clone()).collect();
    match shared.raft().initialize(members).await {
        Ok(()) => {
            tracing::info!(cluster_id = %cluster, voters = ?names, "bootstrapped a new cluster");
            shared.set_reconciler_status(format!("bootstrapped cluster {cluster} with voters {names:?}"));
            true
        }
        Err(e) => {
            shared.set_reconciler_status(format!("bootstrap of cluster {cluster} failed: {e}"));
            false
        }
    }
}

/// What the Raft core holds, as opposed to what its metrics have published so far.
struct Loaded {
    has_membership: bool,
    /// Highest log index known: the membership's, the committed one or the snapshot's.
    last_log_index: u64,
}

async fn loaded_state(shared: &LocalMember) -> Result<Loaded, String> {
    shared
        .raft()
        .with_raft_state(|st| {
            let effective = st.membership_state.effective();
            let last_log_index =
                [*effective.log_id(), st.local_committed().cloned(), st.snapshot_meta.last_log_id]
                    .into_iter()
                    .flatten()
                    .map(|l| l.index)
                    .max()
                    .unwrap_or(0);
            Loaded { has_membership: effective.membership().nodes().next().is_some(), last_log_index }
        })
        .await
        .map_err(|e| e.to_string())
}

/// Adopts the cluster `reply` belongs to and asks its member to add us.
async fn join(shared: &Arc<LocalMember>, ordinal: u32, reply: &pb::ProbeReply) -> bool {
    let theirs: ClusterId = match reply.cluster_id.parse() {
        Ok(c) => c,
        Err(_) => {
            shared.set_reconciler_status(format!("ordinal {ordinal} reports an invalid cluster id"));
            return false;
        }
    };
    if let Some(mine) = shared.cluster_id() {
        if mine != theirs {
            let status = format!(
                "this volume belongs to cluster {mine} but {} reports cluster {theirs}: refusing to join another cluster",
                shared.identity().sibling(ordinal)
            );
            tracing::error!("{status}");
            shared.set_reconciler_status(status);
            return false;
        }
    }
    if let Err(e) = shared.adopt_cluster(theirs).await {
        shared.set_reconciler_status(format!("cannot record cluster id {theirs}: {e}"));
        return false;
    }
    let addr = shared.book().peer_addr(ordinal);
    let mut client = match client(shared, &shared.identity().sibling(ordinal), &addr) {
        Ok(c) => c,
        Err(e) => {
            shared.set_reconciler_status(e);
            return false;
        }
    };
    let last_log_index = match loaded_state(shared).await {
        Ok(l) => l.last_log_index,
        Err(e) => {
            shared.set_reconciler_status(format!("cannot read the Raft state: {e}"));
            return false;
        }
    };
    let me = shared.me();
    let mut req = tonic::Request::new(pb::JoinRequest {
        last_log_index,
        cluster_id: theirs.to_string(),
        node_id: shared.node_id(),
        ordinal: me.ordinal,
        name: me.name.clone(),
        peer_addr: me.peer_addr.clone(),
        client_addr: me.client_addr.clone(),
    });
    req.set_timeout(Duration::from_secs(10));
    match client.join(req).await {
        Ok(r) => {
            let r = r.into_inner();
            shared.set_reconciler_status(format!(
                "joining cluster {theirs} as node {} (leader {}, already a member: {}); waiting for replication",
                shared.node_id(), r.leader_id, r.already_member
            ));
            true
        }
        Err(status) => {
            shared.set_reconciler_status(format!(
                "asked {} to join cluster {theirs}: {}; retrying",
                shared.identity().sibling(ordinal),
                short(&status)
            ));
            false
        }
    }
}

/// Runs one membership change with a deadline; the outcome goes into the journal too.
async fn change(
    shared: &LocalMember,
    journal: &Timeline,
    what: String,
    change: plan::Change,
    voters: &BTreeSet<u64>,
) -> bool {
    tracing::info!(change = %what, "membership change");
    shared.set_reconciler_status(format!("{what}: in progress"));
    journal.record(format!("reconciler: {what}: started"));
    let change = change.to_openraft(voters);
    let (done, outcome) =
        match tokio::time::timeout(CHANGE_TIMEOUT, shared.raft().change_membership(change, false)).await {
            Ok(Ok(_)) => {
                shared.metrics().membership_changes.inc();
                (true, format!("{what}: done"))
            }
            Ok(Err(e)) => (false, format!("{what}: failed: {e}")),
            Err(_) => (false, format!("{what}: timed out")),
        };
    journal.record(format!("reconciler: {outcome}"));
    shared.set_reconciler_status(outcome);
    done
}

/// The leader's reconciliation step: observe, [`plan::plan`], act.
async fn reconcile(shared: &Arc<LocalMember>, state: &mut Loop, m: &RaftMetrics) -> bool {
    let (desired, source) = shared.desired_replicas();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let nodes: BTreeMap<u64, Member> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();

    // Who answers at each relevant ordinal now; only members of this cluster (or fresh members
    // about to join it) count.
    let mut ordinals: BTreeSet<u32> = nodes.values().map(|n| n.ordinal).collect();
    ordinals.extend(0..desired);
    ordinals.remove(&shared.identity().ordinal);
    let replies = state.probe_all(shared, ordinals).await;
    let ours = shared.cluster().to_wire();
    let answers = replies
        .into_iter()
        .filter_map(|(o, r)| r.ok().map(|r| (o, r)))
        .filter(|(_, r)| r.cluster_id.is_empty() || r.cluster_id == ours)
        .map(|(o, r)| (o, Answer { node_id: r.node_id, applied_index: r.applied_index }))
        .collect();
    let observation = Observation {
        desired,
        desired_source: source.to_string(),
        leader_id: shared.node_id(),
        leader_ordinal: shared.identity().ordinal,
        joint: (membership.get_joint_config().len() > 1)
            .then(|| membership.get_joint_config().last().cloned().unwrap_or_default()),
        voters,
        nodes,
        leader_last_log: m.last_log_index.unwrap_or(0),
        catchup_lag: shared.config().raft.catchup_lag_entries,
        answers,
    };
    match plan::plan(&observation) {
        Plan::Change { change: c, what } => {
            state.report(shared, Some("changing"));
            let journal = state.journal.clone();
            change(shared, &journal, what, c, &observation.voters).await
        }
        Plan::Wait(why) => {
            state.report(shared, Some("waiting"));
            shared.set_reconciler_status(why);
            true
        }
        Plan::InSync(why) => {
            state.report(shared, Some("in_sync"));
            shared.set_reconciler_status(why);
            true
        }
    }
}
