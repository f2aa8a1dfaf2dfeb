//! `GET /status.json`: the cluster as one member sees it, for the ops page and for scripts.
//!
//! The member serving it knows its own state exactly; it asks every other member of its Raft
//! membership for its `Cluster.Status` (concurrently, each bounded by [`ASK_TIMEOUT`], at most
//! once per [`REFRESH_AFTER`] however many pages poll) and remembers when each last answered.
//! What it could not learn it says, in `notes` and in each member's `error`: a member that
//! does not answer is `down` "since" its last answer to this member, a member whose ordinal now
//! answers as another node id is `replaced`, and a member that reaches none of the others says
//! that the page is its own view only. On the leader, lag and the time since each member last
//! acknowledged come from Raft's replication state (`lag_from: "leader"`); elsewhere lag is the
//! leader's last log index (from its answer) minus the member's applied index.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;
use std::time::Instant;

use futures::future::BoxFuture;
use kvset_proto::v1 as pb;
use serde::Serialize;

use crate::metrics::MemberLabel;
use crate::metrics::Metrics;
use crate::timeline::unix_ms;
use crate::timeline::Event;
use crate::timeline::Sample;
use crate::timeline::Timeline;
use crate::timeline::SAMPLE_EVERY;

/// How long one member's `Cluster.Status` may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Answers younger than this are reused.
pub const REFRESH_AFTER: Duration = Duration::from_secs(1);
/// A member this many entries behind the leader gets a note (the replication-lag alert's
/// threshold, `deploy/prometheus/kvset-rules.yaml`).
pub const LAG_NOTE_ENTRIES: u64 = 1000;

/// A member of the Raft membership, as this member knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub node_id: u64,
    pub name: String,
    pub ordinal: u32,
    /// Its client address (`Cluster.Status` is served there).
    pub client_addr: String,
    pub voter: bool,
}

/// Asks a member for its status; the closure bounds the call itself too.
pub type Ask = Box<dyn Fn(&Node) -> BoxFuture<'static, Result<pb::StatusResponse, String>> + Send + Sync>;

/// Where the status comes from: closures over the member, built by `node.rs`.
#[allow(missing_debug_implementations)]
pub struct StatusSource {
    /// This member's own `Cluster.Status` answer.
    pub local: Box<dyn Fn() -> pb::StatusResponse + Send + Sync>,
    /// The Raft membership as this member knows it (empty before it joined a cluster).
    pub membership: Box<dyn Fn() -> Vec<Node> + Send + Sync>,
    /// Asks another member for its `Cluster.Status`.
    pub ask: Ask,
}

/// What this member has heard from the others, and when.
#[derive(Debug, Default)]
pub struct PeerView {
    inner: tokio::sync::Mutex<Heard>,
}

#[derive(Debug, Default)]
struct Heard {
    /// When the answers were gathered.
    at: Option<Instant>,
    /// The last round's answers by node id.
    answers: BTreeMap<u64, Result<pb::StatusResponse, String>>,
    /// When each node last answered.
    last_ok: HashMap<u64, Instant>,
    /// When this member first asked each node (for "not answered since").
    first_asked: HashMap<u64, Instant>,
}

/// The document `/status.json` answers. Indexes are Raft log indexes; times are milliseconds
/// (`_unix_ms`: since the Unix epoch, `_ms_ago`: before `generated_unix_ms`). Node ids are
/// decimal strings: they are 64-bit, beyond what a JavaScript number holds exactly (as etcd's
/// JSON gateway writes its 64-bit ids).
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Version of this document's shape.
    pub format: u32,
    pub generated_unix_ms: u64,
    /// The member that answered (its view is what follows).
    pub served_by: String,
    pub cluster_id: String,
    /// The serving member's term.
    pub term: u64,
    /// The leader this member knows of (name), if any, and its node id ("0": none).
    pub leader: Option<String>,
    pub leader_id: String,
    /// Voters the reconciler works towards.
    pub desired_replicas: u32,
    /// The leader's membership reconciler.
    pub reconciler: Reconciler,
    /// `quota_bytes` (0: none).
    pub quota_bytes: u64,
    /// Raised NOSPACE alarms (the leader knows every member's).
    pub alarms: Vec<String>,
    /// One row per member of the membership (and this member, if it is not in it yet).
    pub members: Vec<MemberRow>,
    /// Watches open on this member and leases in its applied state.
    pub watches: i64,
    pub leases: i64,
    /// Membership events this member saw, oldest first.
    pub events: Vec<Event>,
    /// Chart samples, oldest first, one every `sample_interval_ms`.
    pub sample_interval_ms: u64,
    pub samples: Vec<Sample>,
    /// What an operator should know first: missing leader, unreachable members, alarms.
    pub notes: Vec<String>,
}

/// The leader's reconciler, as the serving member learnt it.
#[derive(Debug, Clone, Serialize)]
pub struct Reconciler {
    /// `in_sync`, `changing`, `waiting`, or `unknown` (no leader's answer).
    pub state: &'static str,
    /// Its last decision in words ("in sync: 3 voters …", "replacing kvset-1: waiting …").
    pub text: String,
    /// The member it was read from (the leader, when reachable).
    pub from: String,
}

/// One member.
#[derive(Debug, Clone, Serialize)]
pub struct MemberRow {
    pub name: String,
    pub node_id: String,
    pub ordinal: u32,
    pub voter: bool,
    /// Whether this is the serving member.
    pub is_self: bool,
    /// `up` (answered), `down` (no answer), `replaced` (its ordinal answers as another node),
    /// `stopping` (shutting down).
    pub state: &'static str,
    /// `leader`, `follower`, `candidate`, `learner`, `joining`, `shutdown` or `unknown`.
    pub role: &'static str,
    pub term: Option<u64>,
    /// The leader it knows of ("0": none).
    pub leader_id: Option<String>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Entries behind the leader's last log index.
    pub lag: Option<u64>,
    /// `leader` (Raft's replication state, on the leader) or `status` (answers compared).
    pub lag_from: &'static str,
    pub volume_bytes: Option<u64>,
    pub alarms: Vec<String>,
    pub version: Option<String>,
    pub started_unix_ms: Option<u64>,
    /// Since this member last heard from it (0 for itself).
    pub last_answer_ms_ago: Option<u64>,
    /// On the leader: since the member last acknowledged a heartbeat or an append.
    pub last_ack_ms_ago: Option<u64>,
    /// Why it is not `up`.
    pub error: Option<String>,
}

/// The name of a wire role.
pub fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role).unwrap_or(pb::Role::Unknown) {
        pb::Role::Leader => "leader",
        pb::Role::Follower => "follower",
        pb::Role::Candidate => "candidate",
        pb::Role::Learner => "learner",
        pb::Role::Joining => "joining",
        pb::Role::Shutdown => "shutdown",
        pb::Role::Unknown => "unknown",
    }
}

/// The class of a reconciler decision (the words of `tasks::membership::plan`).
pub fn reconciler_state(text: &str) -> &'static str {
    if text.starts_with("in sync") {
        "in_sync"
    } else if text.ends_with(": in progress") {
        "changing"
    } else if text.is_empty() {
        "unknown"
    } else {
        "waiting"
    }
}

/// "12 s", "3 min 5 s", "2 h 4 min".
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

impl PeerView {
    /// The others' answers, asked again when older than [`REFRESH_AFTER`]; one round at a time.
    async fn refresh(&self, source: &StatusSource, me: u64, nodes: &[Node]) -> Snapshot {
        let mut heard = self.inner.lock().await;
        let now = Instant::now();
        if heard.at.is_none_or(|t| now.duration_since(t) >= REFRESH_AFTER) {
            let others: Vec<&Node> = nodes.iter().filter(|n| n.node_id != me).collect();
            let calls = others.iter().map(|n| {
                let call = (source.ask)(n);
                async move {
                    match tokio::time::timeout(ASK_TIMEOUT, call).await {
                        Ok(answer) => answer,
                        Err(_) => Err(format!("no answer within {} ms", ASK_TIMEOUT.as_millis())),
                    }
                }
            });
            let answers = futures::future::join_all(calls).await;
            let at = Instant::now();
            heard.answers.clear();
            for (node, answer) in others.iter().zip(answers) {
                heard.first_asked.entry(node.node_id).or_insert(now);
                if answer.is_ok() {
                    heard.last_ok.insert(node.node_id, at);
                }
                heard.answers.insert(node.node_id, answer);
            }
            heard.at = Some(at);
        }
        Snapshot {
            answers: heard.answers.clone(),
            last_ok: heard.last_ok.clone(),
            first_asked: heard.first_asked.clone(),
        }
    }
}

/// A copy of what was heard, for one document.
struct Snapshot {
    answers: BTreeMap<u64, Result<pb::StatusResponse, String>>,
    last_ok: HashMap<u64, Instant>,
    first_asked: HashMap<u64, Instant>,
}

/// Builds the document: this member's status, the others' answers, the leader's view of
/// replication (from `metrics`), the timeline.
pub async fn gather(
    source: &StatusSource,
    peers: &PeerView,
    metrics: &Metrics,
    timeline: &Timeline,
) -> ClusterStatus {
    let local = (source.local)();
    let mut nodes = (source.membership)();
    if !nodes.iter().any(|n| n.node_id == local.node_id) {
        nodes.push(Node {
            node_id: local.node_id,
            name: local.name.clone(),
            ordinal: local.ordinal,
            client_addr: String::new(),
            voter: false,
        });
    }
    nodes.sort_by_key(|n| (n.ordinal, n.node_id));
    let heard = peers.refresh(source, local.node_id, &nodes).await;
    assemble(&local, &nodes, &heard, metrics, timeline, Instant::now())
}

fn assemble(
    local: &pb::StatusResponse,
    nodes: &[Node],
    heard: &Snapshot,
    metrics: &Metrics,
    timeline: &Timeline,
    now: Instant,
) -> ClusterStatus {
    let me = local.node_id;
    let answer = |id: u64| -> Option<&pb::StatusResponse> {
        if id == me {
            Some(local)
        } else {
            heard.answers.get(&id).and_then(|a| a.as_ref().ok())
        }
    };
    let name_of = |id: u64| nodes.iter().find(|n| n.node_id == id).map(|n| n.name.clone());
    let leader_id = local.leader_id;
    let i_lead = leader_id == me && local.role == pb::Role::Leader as i32;
    let leader_answer = (leader_id != 0).then(|| answer(leader_id)).flatten();
    // The leader's last log index: its own answer, else the furthest any answer reached.
    let leader_last = leader_answer
        .map(|a| a.last_log_index)
        .or_else(|| nodes.iter().filter_map(|n| answer(n.node_id)).map(|a| a.last_log_index).max());

    let mut notes = Vec::new();
    let mut rows = Vec::new();
    let mut unreachable = 0;
    for node in nodes {
        let label = MemberLabel { member: node.name.clone() };
        let leader_lag =
            i_lead.then(|| metrics.member_lag.get(&label).map(|g| g.get().max(0) as u64)).flatten();
        let last_ack_ms =
            i_lead.then(|| metrics.member_last_ack.get(&label).map(|g| (g.get() * 1000.0) as u64)).flatten();
        let mut row = MemberRow {
            name: node.name.clone(),
            node_id: node.node_id.to_string(),
            ordinal: node.ordinal,
            voter: node.voter,
            is_self: node.node_id == me,
            state: "up",
            role: "unknown",
            term: None,
            leader_id: None,
            last_log_index: None,
            applied_index: None,
            lag: None,
            lag_from: "status",
            volume_bytes: None,
            alarms: Vec::new(),
            version: None,
            started_unix_ms: None,
            last_answer_ms_ago: None,
            last_ack_ms_ago: last_ack_ms,
            error: None,
        };
        let last_ok = if node.node_id == me { Some(now) } else { heard.last_ok.get(&node.node_id).copied() };
        row.last_answer_ms_ago = last_ok.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        match (answer(node.node_id), heard.answers.get(&node.node_id)) {
            (Some(a), _) if a.node_id != node.node_id => {
                row.state = "replaced";
                row.error = Some(format!(
                    "{} now answers as node {}: its volume was replaced; the new node joins as a learner and takes \
                     node {}'s place once caught up",
                    node.name, a.node_id, node.node_id
                ));
                notes.push(row.error.clone().unwrap_or_default());
            }
            (Some(a), _) => {
                row.role = role_name(a.role);
                row.state = if a.role == pb::Role::Shutdown as i32 { "stopping" } else { "up" };
                row.term = Some(a.term);
                row.leader_id = Some(a.leader_id.to_string());
                row.last_log_index = Some(a.last_log_index);
                row.applied_index = Some(a.applied_index);
                row.volume_bytes = Some(a.db_size_bytes);
                row.alarms = a.alarms.clone();
                row.version = Some(a.version.clone());
                row.started_unix_ms = Some(a.started_unix_ms);
                row.lag = leader_last.map(|last| last.saturating_sub(a.applied_index));
            }
            (None, error) => {
                unreachable += 1;
                row.state = "down";
                let why = match error {
                    Some(Err(e)) => e.clone(),
                    _ => "not asked yet".into(),
                };
                let since = match last_ok {
                    Some(t) => format!("since {} (its last answer)", ago(now.saturating_duration_since(t))),
                    None => match heard.first_asked.get(&node.node_id) {
                        Some(t) => format!(
                            "since this member started asking {} ago (never answered it)",
                            ago(now.saturating_duration_since(*t))
                        ),
                        None => "not asked yet".into(),
                    },
                };
                row.error = Some(why.clone());
                notes.push(format!("{} unreachable from {} {since}: {why}", node.name, local.name));
            }
        }
        if let Some(lag) = leader_lag {
            row.lag = Some(lag);
            row.lag_from = "leader";
        }
        if let Some(lag) = row.lag.filter(|l| *l > LAG_NOTE_ENTRIES && row.state == "up") {
            notes.push(format!("{} is {lag} entries behind the leader", node.name));
        }
        rows.push(row);
    }
    let others = nodes.iter().filter(|n| n.node_id != me).count();
    if others > 0 && unreachable == others {
        notes.insert(
            0,
            format!(
                "{} reaches none of the other members: this page is its own view only (its leader, indexes and \
                 lag may be stale)",
                local.name
            ),
        );
    }
    if local.leader_id == 0 {
        notes.insert(
            0,
            format!(
                "{} knows no leader (term {}): writes and linearizable reads fail until one is elected",
                local.name, local.term
            ),
        );
    }
    let alarms = leader_answer.map_or_else(|| local.alarms.clone(), |a| a.alarms.clone());
    notes.extend(alarms.iter().map(|a| format!("space alarm: {a}; writes that add data are refused")));
    let (text, from) = match leader_answer {
        Some(a) => (a.reconciler.clone(), a.name.clone()),
        None => (String::new(), local.name.clone()),
    };
    if leader_answer.is_some() && matches!(reconciler_state(&text), "waiting" | "changing") {
        notes.push(format!("membership: {text}"));
    }
    let reconciler = Reconciler {
        state: if leader_answer.is_some() { reconciler_state(&text) } else { "unknown" },
        text: if leader_answer.is_some() {
            text
        } else {
            format!("unknown: no answer from a leader ({} says: {})", local.name, local.reconciler)
        },
        from,
    };
    ClusterStatus {
        format: 1,
        generated_unix_ms: unix_ms(),
        served_by: local.name.clone(),
        cluster_id: local.cluster_id.clone(),
        term: local.term,
        leader: (leader_id != 0).then(|| name_of(leader_id).unwrap_or_else(|| format!("node {leader_id}"))),
        leader_id: leader_id.to_string(),
        desired_replicas: leader_answer.map_or(local.desired_replicas, |a| a.desired_replicas),
        reconciler,
        quota_bytes: local.quota_bytes,
        alarms,
        members: rows,
        watches: metrics.watches.get(),
        leases: metrics.leases.get(),
        events: timeline.events(),
        sample_interval_ms: SAMPLE_EVERY.as_millis() as u64,
        samples: timeline.samples(),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, ordinal: u32) -> Node {
        Node {
            node_id: id,
            name: format!("kvset-{ordinal}"),
            ordinal,
            client_addr: format!("127.0.0.1:{}", 2379 + 10 * ordinal),
            voter: true,
        }
    }

    fn status(
        id: u64,
        ordinal: u32,
        role: pb::Role,
        leader: u64,
        last: u64,
        applied: u64,
    ) -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: id,
            ordinal,
            name: format!("kvset-{ordinal}"),
            role: role as i32,
            term: 3,
            leader_id: leader,
            last_log_index: last,
            applied_index: applied,
            reconciler: if role == pb::Role::Leader {
                "in sync: 3 voters".into()
            } else {
                format!("voter; leader is node {leader}")
            },
            ..Default::default()
        }
    }

    fn snapshot(answers: Vec<(u64, Result<pb::StatusResponse, String>)>, now: Instant) -> Snapshot {
        let last_ok =
            answers.iter().filter(|(_, a)| a.is_ok()).map(|(id, _)| (*id, now)).collect::<HashMap<_, _>>();
        let mut s = Snapshot { answers: answers.into_iter().collect(), last_ok, first_asked: HashMap::new() };
        for id in s.answers.keys() {
            s.first_asked.insert(*id, now - Duration::from_secs(30));
        }
        s
    }

    #[test]
    fn a_follower_shows_the_leader_the_lag_and_an_unreachable_member_with_its_last_answer() {
        let now = Instant::now();
        let local = status(1, 0, pb::Role::Follower, 2, 100, 95);
        let nodes = [node(1, 0), node(2, 1), node(3, 2)];
        let mut heard = snapshot(
            vec![(2, Ok(status(2, 1, pb::Role::Leader, 2, 120, 120))), (3, Err("connection refused".into()))],
            now,
        );
        heard.last_ok.insert(3, now - Duration::from_secs(12));
        let doc = assemble(&local, &nodes, &heard, &Metrics::new(), &Timeline::default(), now);
        assert_eq!(doc.leader.as_deref(), Some("kvset-1"));
        assert_eq!(doc.reconciler.state, "in_sync");
        assert_eq!(doc.reconciler.from, "kvset-1");
        let rows: Vec<(&str, &str, Option<u64>)> =
            doc.members.iter().map(|m| (m.name.as_str(), m.state, m.lag)).collect();
        let far = assemble(
            &status(1, 0, pb::Role::Follower, 2, 100, 95),
            &nodes,
            &snapshot(vec![(2, Ok(status(2, 1, pb::Role::Leader, 2, 5000, 5000)))], now),
            &Metrics::new(),
            &Timeline::default(),
            now,
        );
        assert!(
            far.notes.contains(&"kvset-0 is 4905 entries behind the leader".to_string()),
            "{:?}",
            far.notes
        );
        assert_eq!(
            rows,
            [("kvset-0", "up", Some(25)), ("kvset-1", "up", Some(0)), ("kvset-2", "down", None)]
        );
        assert!(doc.members[0].is_self);
        assert_eq!(doc.members[1].role, "leader");
        assert_eq!(
            doc.notes,
            ["kvset-2 unreachable from kvset-0 since 12 s (its last answer): connection refused"]
        );
    }

    #[test]
    fn a_cut_off_member_says_it_knows_no_leader_and_that_the_page_is_its_own_view() {
        let now = Instant::now();
        let local = status(1, 0, pb::Role::Candidate, 0, 100, 100);
        let nodes = [node(1, 0), node(2, 1), node(3, 2)];
        let heard = snapshot(vec![(2, Err("timed out".into())), (3, Err("timed out".into()))], now);
        let doc = assemble(&local, &nodes, &heard, &Metrics::new(), &Timeline::default(), now);
        assert_eq!(doc.leader, None);
        assert_eq!(doc.reconciler.state, "unknown");
        assert!(doc.notes[0].starts_with("kvset-0 knows no leader (term 3)"), "{:?}", doc.notes);
        assert!(doc.notes[1].starts_with("kvset-0 reaches none of the other members"), "{:?}", doc.notes);
        assert!(
            doc.notes[2].contains("since this member started asking 30 s ago (never answered it)"),
            "{:?}",
            doc.notes
        );
    }

    #[test]
    fn the_leader_takes_lag_from_replication_and_names_a_replaced_member() {
        let now = Instant::now();
        let local = status(1, 0, pb::Role::Leader, 1, 200, 200);
        let metrics = Metrics::new();
        metrics.member_lag.get_or_create(&MemberLabel { member: "kvset-1".into() }).set(7);
        metrics.member_last_ack.get_or_create(&MemberLabel { member: "kvset-1".into() }).set(0.25);
        let nodes = [node(1, 0), node(2, 1), node(3, 2)];
        let heard = snapshot(
            vec![
                (2, Ok(status(2, 1, pb::Role::Follower, 1, 195, 190))),
                (3, Ok(status(9, 2, pb::Role::Learner, 1, 10, 10))),
            ],
            now,
        );
        let mut local = local;
        local.reconciler =
            "replacing kvset-2 (node 3): waiting for node 9 to catch up (applied 10 of 200)".into();
        metrics.member_lag.get_or_create(&MemberLabel { member: "kvset-2".into() }).set(5000);
        let doc = assemble(&local, &nodes, &heard, &metrics, &Timeline::default(), now);
        let one = &doc.members[1];
        assert_eq!((one.lag, one.lag_from, one.last_ack_ms_ago), (Some(7), "leader", Some(250)));
        assert_eq!(doc.members[2].state, "replaced");
        assert!(doc.notes[0].starts_with("kvset-2 now answers as node 9"), "{:?}", doc.notes);
        assert_eq!(
            doc.notes[1],
            "membership: replacing kvset-2 (node 3): waiting for node 9 to catch up (applied 10 of 200)"
        );
        assert_eq!(doc.notes.len(), 2, "no lag note for a member that is not up: {:?}", doc.notes);
        let json = serde_json::to_value(&doc).expect("serializes");
        assert_eq!(json["members"][1]["lag_from"], "leader");
        assert_eq!(json["sample_interval_ms"], 2000);
        assert_eq!(json["members"][2]["node_id"], "3", "ids are strings: JavaScript numbers lose 64-bit ids");
    }

    #[test]
    fn reconciler_words_are_classified() {
        assert_eq!(reconciler_state("in sync: 3 voters [..], desired 3"), "in_sync");
        assert_eq!(
            reconciler_state("replace kvset-1 (node 4) with node 9 (its volume was lost): in progress"),
            "changing"
        );
        assert_eq!(reconciler_state("replacing kvset-1 (node 4): waiting for node 9 to catch up"), "waiting");
        assert_eq!(ago(Duration::from_secs(12)), "12 s");
        assert_eq!(ago(Duration::from_secs(185)), "3 min 5 s");
    }
}
