//! One harness for every cluster a scenario can drive: the in-process [`crate::cluster::Cluster`]
//! and the Docker StatefulSet [`crate::statefulset::Emulator`] both implement [`Harness`], so a
//! scenario (a fault, the workload, the checks) is written once and runs both ways.
//!
//! The trait covers what a StatefulSet controller and an operator can do to members: start
//! (or reschedule with the same volume), stop gracefully, kill, wipe a volume, cut a member off
//! its peers, scale. Everything observed goes through the client API (`Cluster.Status`,
//! `MemberList`), the same way for both harnesses: see the free functions below. Every wait
//! polls with a deadline ([`crate::poll_until`]).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use kvset_client::pb;
use kvset_client::Client;
use kvset_client::ClientOptions;

use crate::poll_until;

/// The members' client endpoints as the harness sees them, versioned so that workload clients
/// notice a rescheduled member's new address.
#[derive(Debug, Default)]
pub struct Endpoints {
    pub version: u64,
    pub client: BTreeMap<u32, String>,
    /// How clients reach the members when they serve TLS: this configuration, verifying the
    /// name every member's certificate carries for clients (like a client of the Service).
    pub tls: Option<(Arc<kvset_client::ClientTls>, String)>,
}

impl Endpoints {
    /// Client options for these members: `timeout`, leader following as given, TLS if on.
    pub fn options(&self, timeout: Duration, prefer_leader: bool) -> ClientOptions {
        ClientOptions {
            timeout,
            prefer_leader,
            tls: self.tls.as_ref().map(|(t, _)| t.clone()),
            tls_server_name: self.tls.as_ref().map(|(_, n)| n.clone()),
            ..Default::default()
        }
    }

    /// A gRPC channel to `endpoint` (one of these members), through TLS if on; it connects on
    /// first use.
    pub fn channel(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> Result<tonic::transport::Channel, String> {
        let tls = self.tls.as_ref().map(|(t, n)| (t, n.as_str()));
        let options = kvset_proto::tls::ChannelOptions { connect_timeout, keep_alive: None };
        kvset_proto::tls::lazy_channel(endpoint, tls, options).map_err(|e| e.to_string())
    }

    /// Records that `ordinal` now answers at `addr` (or no longer answers).
    pub fn set(&mut self, ordinal: u32, addr: Option<String>) {
        match addr {
            Some(a) => self.client.insert(ordinal, a),
            None => self.client.remove(&ordinal),
        };
        self.version += 1;
    }
}

/// A cluster of kvset members that a scenario can drive.
#[allow(async_fn_in_trait)]
pub trait Harness {
    /// A short name for logs ("in-process", "docker").
    fn kind(&self) -> &'static str;

    /// The configuration the members run with (timings, limits).
    fn member_config(&self) -> kvset_server::Config;

    /// Ordinals whose member runs now.
    fn running(&self) -> Vec<u32>;

    /// The desired replica count (what the StatefulSet's `spec.replicas` says).
    fn replicas(&self) -> u32;

    /// The client endpoints of the running members, kept up to date.
    fn endpoints(&self) -> Arc<RwLock<Endpoints>>;

    /// Starts members `0..n` together (a new cluster, or every pod after a full stop).
    async fn start_all(&mut self, n: u32) -> Result<(), String>;

    /// Starts (or reschedules) one member with its volume and waits until it is ready.
    async fn start(&mut self, ordinal: u32) -> Result<(), String>;

    /// Stops one member gracefully (SIGTERM and its grace period).
    async fn stop(&mut self, ordinal: u32) -> Result<(), String>;

    /// Kills members at once, with no chance to shut down (kill -9).
    async fn kill(&mut self, ordinals: &[u32]) -> Result<(), String>;

    /// Deletes a stopped member's volume: its next start is a replacement.
    async fn wipe(&mut self, ordinal: u32) -> Result<(), String>;

    /// Cuts a member off from its peers (client traffic still reaches it).
    async fn partition(&mut self, ordinal: u32) -> Result<(), String>;

    /// Restores the links of a partitioned member.
    async fn heal(&mut self, ordinal: u32) -> Result<(), String>;

    /// `kubectl scale --replicas=n`: the desired count changes, then the missing members start
    /// or the surplus ones stop (and lose their volumes).
    async fn scale(&mut self, n: u32) -> Result<(), String>;

    /// `kubectl set env statefulset/kvset NAME=VALUE` (or `NAME-` for `None`) without a
    /// rollout: members started from now on see it.
    fn set_env(&mut self, name: &str, value: Option<&str>);
}

/// A client over the running members' endpoints (no leader preference: like a user's).
pub fn client<H: Harness>(h: &H, timeout: Duration) -> Client {
    let endpoints = h.endpoints();
    let e = endpoints.read().unwrap_or_else(|e| e.into_inner());
    Client::new(e.client.values().cloned(), e.options(timeout, false))
        .expect("a client for the running members")
}

/// Status of every running member that answers.
pub async fn statuses<H: Harness>(h: &H, digest: bool) -> BTreeMap<u32, pb::StatusResponse> {
    let c = client(h, Duration::from_secs(3));
    let endpoints: Vec<(u32, String)> = h
        .endpoints()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .client
        .iter()
        .map(|(o, e)| (*o, e.clone()))
        .collect();
    let mut out = BTreeMap::new();
    for (o, ep) in endpoints {
        if let Ok(s) = c.status_request(&ep, digest).await {
            out.insert(o, s);
        }
    }
    out
}

/// The ordinal of the leader, once every running member agrees on one.
pub async fn leader<H: Harness>(h: &H, timeout: Duration) -> Result<u32, String> {
    poll_until("an agreed leader", timeout, || async {
        let s = statuses(h, false).await;
        let leaders: BTreeSet<u64> = s.values().map(|s| s.leader_id).collect();
        if s.len() == h.running().len() && leaders.len() == 1 && !leaders.contains(&0) {
            return s.iter().find(|(_, s)| s.role == pb::Role::Leader as i32).map(|(o, _)| *o);
        }
        None
    })
    .await
}

/// A running member that is not the leader.
pub async fn follower<H: Harness>(h: &H) -> Result<u32, String> {
    let l = leader(h, Duration::from_secs(60)).await?;
    h.running().into_iter().find(|o| *o != l).ok_or_else(|| "no follower".into())
}

/// Waits until the cluster has `n` voters, every one of them a running member, and one agreed
/// leader.
pub async fn wait_voters<H: Harness>(h: &H, n: usize, timeout: Duration) -> Result<(), String> {
    poll_until(&format!("{n} running voters and an agreed leader"), timeout, || async {
        let list = client(h, Duration::from_secs(3)).member_list().await.ok()?;
        let voters: Vec<_> = list.members.iter().filter(|m| m.voter).collect();
        let running: BTreeSet<u64> = statuses(h, false).await.values().map(|s| s.node_id).collect();
        let all_running = voters.iter().all(|v| running.contains(&v.node_id));
        (voters.len() == n && all_running && leader(h, Duration::from_secs(1)).await.is_ok()).then_some(())
    })
    .await
}

/// Waits until every running member applied the same index and holds the same state digest,
/// in one cluster.
pub async fn wait_converged<H: Harness>(h: &H, timeout: Duration) -> Result<(), String> {
    poll_until("every member at the same applied index and state digest", timeout, || async {
        let s = statuses(h, true).await;
        let applied: BTreeSet<u64> = s.values().map(|s| s.applied_index).collect();
        let digests: BTreeSet<(u32, u64)> = s.values().map(|s| (s.state_digest, s.state_keys)).collect();
        let clusters: BTreeSet<&str> = s.values().map(|s| s.cluster_id.as_str()).collect();
        (s.len() == h.running().len() && applied.len() == 1 && digests.len() == 1 && clusters.len() == 1)
            .then_some(())
    })
    .await
}
