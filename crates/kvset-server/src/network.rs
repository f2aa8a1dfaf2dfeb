//! The sending side of peer traffic: openraft's `RaftNetworkFactory` / `RaftNetwork` over tonic.
//!
//! * One lazily connected HTTP/2 channel per peer address, from the member's shared
//!   [`PeerChannels`]; tonic reconnects (and re-resolves DNS) by itself, so a rescheduled pod
//!   with a new IP is found again.
//! * Each RPC is bounded on the client side by the smaller of openraft's hard TTL and
//!   `raft.rpc_timeout_ms` (a gRPC deadline header alone would not stop us waiting).
//! * Every request carries the cluster id, the sender's and the intended receiver's node ids;
//!   the receiver refuses mismatches (see `raft_service`).
//! * Errors map to what openraft needs: a peer that cannot be reached (connection refused,
//!   `UNAVAILABLE`, or a receiver that refuses us) is `Unreachable`, so openraft backs off;
//!   a timeout is `Timeout`; anything else is `Network`.
//! * A [`PeerFault`] hook lets tests cut links (partitions) without touching sockets.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::v1::raft_client::RaftClient;
use kvset_proto::v1::RaftReply;
use kvset_proto::v1::RaftRequest;
use kvset_storage::codec;
use kvset_storage::Member;
use kvset_storage::TypeConfig;
use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::network::RaftNetwork;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::channels::PeerChannels;
use crate::cluster_id::ClusterIdCell;
use crate::metrics::Metrics;

/// Largest peer message, in bytes (AppendEntries of `max_payload_entries` large entries).
pub const PEER_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Decides whether the link `from → to` is cut. For tests; production runs without one.
pub trait PeerFault: Send + Sync + 'static {
    /// Returns true to drop the message `from → to` as if the network lost it.
    fn blocked(&self, from: u64, to: u64) -> bool;

    /// Returns true to damage the snapshot chunk about to go `from → to` (one flipped bit),
    /// as a faulty link or disk would.
    fn corrupt_snapshot(&self, _from: u64, _to: u64) -> bool {
        false
    }
}

struct Inner {
    my_id: u64,
    cluster: ClusterIdCell,
    rpc_timeout: Duration,
    channels: Arc<PeerChannels>,
    fault: Option<Arc<dyn PeerFault>>,
    metrics: Arc<Metrics>,
}

/// openraft's network factory: hands out one [`PeerClient`] per target.
#[derive(Clone)]
pub struct PeerNetwork {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork").field("my_id", &self.inner.my_id).finish_non_exhaustive()
    }
}

impl PeerNetwork {
    /// A network for member `my_id`.
    pub fn new(
        my_id: u64,
        cluster: ClusterIdCell,
        rpc_timeout: Duration,
        channels: Arc<PeerChannels>,
        fault: Option<Arc<dyn PeerFault>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { inner: Arc::new(Inner { my_id, cluster, rpc_timeout, channels, fault, metrics }) }
    }

    fn channel(&self, addr: &str) -> Option<Channel> {
        match self.inner.channels.get(addr) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "invalid peer address");
                None
            }
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Member) -> PeerClient {
        let client = self.channel(&node.peer_addr).map(|c| {
            RaftClient::new(c)
                .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES)
        });
        PeerClient { target, addr: node.peer_addr.clone(), client, inner: self.inner.clone() }
    }
}

/// Sends Raft RPCs to one target member.
pub struct PeerClient {
    target: u64,
    addr: String,
    client: Option<RaftClient<Channel>>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("target", &self.target)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn unreachable<E: std::error::Error>(msg: String) -> RPCError<u64, Member, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg)))
}

fn network<E: std::error::Error>(msg: String) -> RPCError<u64, Member, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(msg)))
}

fn rpc_name(rpc: RPCTypes) -> &'static str {
    match rpc {
        RPCTypes::AppendEntries => "append_entries",
        RPCTypes::Vote => "vote",
        RPCTypes::InstallSnapshot => "install_snapshot",
    }
}

/// Largest AppendEntries payload sent at once when it holds more than one entry (see
/// `append_entries`).
pub const APPEND_MAX_BYTES: usize = 1 << 20;

/// Approximate encoded size of a log entry.
fn entry_bytes(e: &kvset_storage::Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(b) => 32 + b.commands.iter().map(|c| c.approx_bytes()).sum::<usize>(),
        _ => 256,
    }
}

impl PeerClient {
    async fn send<Resp, E>(
        &mut self,
        rpc: RPCTypes,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Resp, RPCError<u64, Member, RaftError<u64, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let started = Instant::now();
        let name = rpc_name(rpc);
        let result = self.send_inner(rpc, payload, ttl).await;
        let label = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "remote_error",
            Err(RPCError::Unreachable(_)) => "unreachable",
            Err(RPCError::Timeout(_)) => "timeout",
            Err(_) => "network_error",
        };
        self.inner.metrics.peer(name, label, started.elapsed());
        match result? {
            Ok(resp) => Ok(resp),
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
        }
    }

    async fn send_inner<Resp, E>(
        &mut self,
        rpc: RPCTypes,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Result<Resp, RaftError<u64, E>>, RPCError<u64, Member, RaftError<u64, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let (my_id, target) = (self.inner.my_id, self.target);
        if let Some(fault) = &self.inner.fault {
            if fault.blocked(my_id, target) {
                return Err(unreachable(format!("link {my_id} -> {target} is cut (fault injection)")));
            }
        }
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable(format!("invalid peer address {:?}", self.addr)));
        };
        let cluster_id = self.inner.cluster.to_wire();
        let request = RaftRequest { cluster_id, from: my_id, to: target, payload };
        let ttl = ttl.min(self.inner.rpc_timeout);
        let mut request = tonic::Request::new(request);
        request.set_timeout(ttl);
        let call = async {
            match rpc {
                RPCTypes::AppendEntries => client.append_entries(request).await,
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let reply: RaftReply = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout { action: rpc, id: my_id, target, timeout: ttl }))
            }
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable => {
                        unreachable(format!("{} unavailable: {}", self.addr, status.message()))
                    }
                    tonic::Code::FailedPrecondition => {
                        tracing::warn!(target, addr = %self.addr, reason = status.message(), "peer refused our message");
                        unreachable(format!("{} refused: {}", self.addr, status.message()))
                    }
                    tonic::Code::DeadlineExceeded => {
                        RPCError::Timeout(Timeout { action: rpc, id: my_id, target, timeout: ttl })
                    }
                    _ => network(format!("{}: {}", self.addr, status)),
                })
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        codec::decode::<Result<Resp, RaftError<u64, E>>>("raft reply", &reply.payload)
            .map_err(|e| network(format!("undecodable reply from {}: {e}", self.addr)))
    }
}

fn encode<T: serde::Serialize, E: std::error::Error>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, RPCError<u64, Member, E>> {
    codec::encode(what, value).map_err(|e| network(e.to_string()))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        let mut rpc = rpc;
        // openraft 0.9 gives every AppendEntries one heartbeat interval to complete, encoding
        // included. A follower that is far behind would be sent `max_payload_entries` entries
        // of up to a batch each (megabytes of large values), which cannot be encoded, sent and
        // written in that time: it would time out again and again and never catch up. Send
        // the prefix that fits APPEND_MAX_BYTES (always at least one entry) and report how far
        // it got.
        let mut sent_up_to = None;
        let mut total = 0;
        let keep = rpc.entries.iter().position(|e| {
            total += entry_bytes(e);
            total > APPEND_MAX_BYTES
        });
        if let Some(keep) = keep.map(|k| k.max(1)).filter(|k| *k < rpc.entries.len()) {
            rpc.entries.truncate(keep);
            sent_up_to = rpc.entries.last().map(|e| e.log_id);
        }
        let payload = encode("append entries", &rpc)?;
        let reply = self.send(RPCTypes::AppendEntries, payload, option.hard_ttl()).await?;
        Ok(match (reply, sent_up_to) {
            // The follower matches the leader up to the last entry sent (it commits no further
            // than that either: openraft commits up to what the request carried).
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (reply, _) => reply,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, Member, RaftError<u64, InstallSnapshotError>>>
    {
        let mut rpc = rpc;
        if let Some(fault) = &self.inner.fault {
            if !rpc.data.is_empty() && fault.corrupt_snapshot(self.inner.my_id, self.target) {
                let middle = rpc.data.len() / 2;
                rpc.data[middle] ^= 0x01;
            }
        }
        let payload = encode("install snapshot", &rpc)?;
        self.send(RPCTypes::InstallSnapshot, payload, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Member, RaftError<u64>>> {
        let payload = encode("vote", &rpc)?;
        self.send(RPCTypes::Vote, payload, option.hard_ttl()).await
    }

    /// Unreachable peers are retried every 200 ms at first, backing off to 2 s.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0..).map(|i: u32| Duration::from_millis(200u64.saturating_mul(1 << i.min(3)).min(2000))),
        )
    }
}
