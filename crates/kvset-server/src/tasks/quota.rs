//! The space quota (etcd's `quota-backend-bytes` and NOSPACE alarm): every few seconds each
//! member compares its volume's size with `quota_bytes`; the leader also asks every other
//! member for its size (`Cluster.Status`). The alarms found ([`SpaceAlarms`]) are what the write
//! path refuses growing writes on; since every write is proposed by the leader, the leader's view
//! makes the alarm cluster-wide. Alarms clear by themselves once the volumes are back under the
//! quota (after deletes, compaction and a defragmentation), where etcd needs `alarm disarm`.
//!
//! A member that cannot be asked keeps the alarm state it had, so a member that is both full
//! and unreachable does not silently re-enable writes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvset_proto::v1 as pb;
use kvset_storage::RaftMetricsRx;
use kvset_storage::WatchReceiver;
use tokio::sync::watch;

use crate::channels::PeerChannels;
use crate::member::SpaceAlarm;
use crate::member::SpaceAlarms;
use crate::metrics::Metrics;

/// How often the quota is checked (the volume size itself is measured every few seconds by
/// the Raft metrics task).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bound of one member's Status call.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the quota task uses.
#[allow(missing_debug_implementations)]
pub struct Inputs {
    /// This member's Raft view: its node id, whether it leads, the membership.
    pub raft: RaftMetricsRx,
    /// This member's name.
    pub name: String,
    /// `quota_bytes`.
    pub quota: u64,
    /// To ask the other members their size.
    pub channels: Arc<PeerChannels>,
    /// Where the alarms found go.
    pub alarms: Arc<SpaceAlarms>,
    /// This member's volume size (measured by the Raft metrics task).
    pub metrics: Arc<Metrics>,
}

/// Runs until `stop` turns true. Does nothing when `quota_bytes` is 0.
pub async fn run(inputs: Inputs, mut stop: watch::Receiver<bool>) {
    let Inputs { raft, name, quota, channels, alarms, metrics } = inputs;
    if quota == 0 {
        return;
    }
    let mut known: BTreeMap<u64, SpaceAlarm> = BTreeMap::new();
    loop {
        let m = raft.borrow_watched().clone();
        let own = metrics.volume_bytes.get().max(0) as u64;
        set(&mut known, SpaceAlarm { node_id: m.id, name: name.clone(), bytes: own, quota }, own >= quota);
        if m.current_leader == Some(m.id) {
            let nodes: Vec<(u64, String, String)> = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, n)| (*id, n.name.clone(), n.client_addr.clone()))
                .collect();
            known.retain(|id, _| *id == m.id || nodes.iter().any(|(n, _, _)| n == id));
            for (node_id, name, addr) in nodes {
                if let Some(bytes) = ask(&channels, &name, &addr).await {
                    set(&mut known, SpaceAlarm { node_id, name, bytes, quota }, bytes >= quota);
                }
            }
        } else {
            known.retain(|id, _| *id == m.id);
        }
        alarms.set(known.values().cloned().collect());
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn set(known: &mut BTreeMap<u64, SpaceAlarm>, alarm: SpaceAlarm, raised: bool) {
    if raised {
        known.insert(alarm.node_id, alarm);
    } else {
        known.remove(&alarm.node_id);
    }
}

/// The volume size another member reports, if it answers in time.
async fn ask(channels: &PeerChannels, name: &str, addr: &str) -> Option<u64> {
    let mut client = channels.status_client(name, addr).ok()?;
    let reply = tokio::time::timeout(ASK_TIMEOUT, client.status(pb::StatusRequest { digest: false })).await;
    Some(reply.ok()?.ok()?.into_inner().db_size_bytes)
}
