//! The sending side of peer traffic: openraft's `RaftNetworkFactory` / `RaftNetworkV2` over tonic.
//!
//! * One lazily connected HTTP/2 channel per peer address, from the member's shared
//!   [`PeerChannels`]; tonic reconnects (and re-resolves DNS) by itself, so a rescheduled pod
//!   with a new IP is found again.
//! * Each RPC is bounded on the client side by the smaller of openraft's hard TTL and
//!   `raft.rpc_timeout_ms` (a gRPC deadline header alone would not stop us waiting).
//! * Every request carries the cluster id, the sender's and the intended receiver's node ids;
//!   the receiver refuses mismatches (see `service::raft`).
//! * Errors map to what openraft needs: a peer that cannot be reached (connection refused,
//!   `UNAVAILABLE`, or a receiver that refuses us) is `Unreachable`, so openraft backs off;
//!   a timeout is `Timeout`; anything else is `Network`.
//! * A snapshot goes as a sequence of chunks of `raft.snapshot_chunk_bytes` over the
//!   `InstallSnapshot` RPC ([`SnapshotChunk`]); the receiver assembles and checks the file
//!   before openraft sees it (`service::raft`).
//! * A [`PeerFault`] hook lets tests cut links (partitions) without touching sockets.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::v1::raft_client::RaftClient;
use kvset_proto::v1::RaftReply;
use kvset_proto::v1::RaftRequest;
use kvset_storage::codec;
use kvset_storage::Member;
use kvset_storage::SnapshotFile;
use kvset_storage::SnapshotMeta;
use kvset_storage::TypeConfig;
use kvset_storage::Vote;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::network::RaftNetworkFactory;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::OptionalSend;
use openraft::Snapshot;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncSeekExt;
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
    snapshot_chunk_bytes: usize,
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
        snapshot_chunk_bytes: usize,
        channels: Arc<PeerChannels>,
        fault: Option<Arc<dyn PeerFault>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let snapshot_chunk_bytes = snapshot_chunk_bytes.max(1);
        Self {
            inner: Arc::new(Inner {
                my_id,
                cluster,
                rpc_timeout,
                snapshot_chunk_bytes,
                channels,
                fault,
                metrics,
            }),
        }
    }

    fn channel(&self, name: &str, addr: &str) -> Option<Channel> {
        match self.inner.channels.get(name, addr) {
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
        let client = self.channel(&node.name, &node.peer_addr).map(|c| {
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

/// The Raft RPCs of the peer service, for dispatch and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    AppendEntries,
    Vote,
    PreVote,
    InstallSnapshot,
    TransferLeader,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append_entries",
            Rpc::Vote => "vote",
            Rpc::PreVote => "pre_vote",
            Rpc::InstallSnapshot => "install_snapshot",
            Rpc::TransferLeader => "transfer_leader",
        }
    }

    /// openraft's name for it, in timeouts.
    fn openraft(self) -> RPCTypes {
        match self {
            Rpc::AppendEntries => RPCTypes::AppendEntries,
            Rpc::Vote | Rpc::PreVote => RPCTypes::Vote,
            Rpc::InstallSnapshot => RPCTypes::InstallSnapshot,
            Rpc::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// One chunk of a snapshot file on its way to a member (the `InstallSnapshot` RPC's payload).
/// Chunks of one transfer share `transfer` and come in order; the last has `done` set.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The leader's vote: the receiver refuses a snapshot from a stale leader.
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// Identifies one transfer; a new transfer (offset 0) replaces an unfinished one.
    pub transfer: u64,
    pub offset: u64,
    pub data: Vec<u8>,
    pub done: bool,
}

/// The receiver's answer to a [`SnapshotChunk`]: `Ok(None)` for a chunk taken, `Ok(Some(_))`
/// once the last one was installed, `Err(reason)` when the transfer must start over (a chunk out
/// of order, a file damaged in transit) or cannot succeed (the receiver's Raft stopped).
pub type SnapshotChunkReply = Result<Option<SnapshotResponse<TypeConfig>>, String>;

fn unreachable(msg: String) -> Unreachable<TypeConfig> {
    Unreachable::new(&std::io::Error::other(msg))
}

fn network(msg: String) -> NetworkError<TypeConfig> {
    NetworkError::new(&std::io::Error::other(msg))
}

/// Why a peer RPC failed on our side of the wire.
enum SendError {
    Unreachable(Unreachable<TypeConfig>),
    Timeout(Timeout<TypeConfig>),
    Network(NetworkError<TypeConfig>),
}

impl SendError {
    /// The `result` label of `kvset_peer_rpcs_total`.
    fn label(&self) -> &'static str {
        match self {
            SendError::Unreachable(_) => "unreachable",
            SendError::Timeout(_) => "timeout",
            SendError::Network(_) => "network_error",
        }
    }
}

impl From<SendError> for RPCError<TypeConfig> {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Unreachable(e) => RPCError::Unreachable(e),
            SendError::Timeout(e) => RPCError::Timeout(e),
            SendError::Network(e) => RPCError::Network(e),
        }
    }
}

impl From<SendError> for StreamingError<TypeConfig> {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Unreachable(e) => StreamingError::Unreachable(e),
            SendError::Timeout(e) => StreamingError::Timeout(e),
            SendError::Network(e) => StreamingError::Network(e),
        }
    }
}

/// What a gRPC status from a peer means to openraft: a peer that is down or refuses us is
/// unreachable (openraft backs off), a deadline is a timeout, anything else a network error.
fn status_error(
    status: &tonic::Status,
    addr: &str,
    target: u64,
    timeout: impl Fn() -> SendError,
) -> SendError {
    match status.code() {
        tonic::Code::Unavailable => {
            SendError::Unreachable(unreachable(format!("{addr} unavailable: {}", status.message())))
        }
        tonic::Code::FailedPrecondition => {
            tracing::warn!(target, %addr, reason = status.message(), "peer refused our message");
            SendError::Unreachable(unreachable(format!("{addr} refused: {}", status.message())))
        }
        tonic::Code::DeadlineExceeded => timeout(),
        _ => SendError::Network(network(format!("{addr}: {status}"))),
    }
}

/// How long the last chunk of a snapshot may wait for the receiver's install.
const SNAPSHOT_INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest AppendEntries payload sent at once when it holds more than one entry (see
/// `append_entries`).
pub const APPEND_MAX_BYTES: usize = 1 << 20;

/// A follower that is far behind would be sent `max_payload_entries` entries of up to a batch
/// each (megabytes of large values), which cannot be encoded, sent and written within one RPC
/// timeout: it would time out again and again and never catch up. Keeps the prefix that fits
/// APPEND_MAX_BYTES (always at least one entry); returns the last log id kept when it cut.
fn cap_entries(rpc: &mut AppendEntriesRequest<TypeConfig>) -> Option<kvset_storage::LogId> {
    let mut total = 0;
    let keep = rpc.entries.iter().position(|e| {
        total += entry_bytes(e);
        total > APPEND_MAX_BYTES
    });
    let keep = keep.map(|k| k.max(1)).filter(|k| *k < rpc.entries.len())?;
    rpc.entries.truncate(keep);
    rpc.entries.last().map(|e| e.log_id)
}

/// Approximate encoded size of a log entry.
fn entry_bytes(e: &kvset_storage::Entry) -> usize {
    match &e.payload {
        kvset_storage::EntryPayload::Normal(b) => {
            32 + b.commands.iter().map(|c| c.approx_bytes()).sum::<usize>()
        }
        _ => 256,
    }
}

impl PeerClient {
    /// Sends one request and decodes the reply as `Resp`, recording the outcome in metrics.
    async fn send<Resp>(&mut self, rpc: Rpc, payload: Vec<u8>, ttl: Duration) -> Result<Resp, SendError>
    where
        Resp: DeserializeOwned,
    {
        let started = Instant::now();
        let result = self.send_inner(rpc, payload, ttl).await;
        let label = result.as_ref().map_or_else(SendError::label, |_| "ok");
        self.inner.metrics.peer(rpc.name(), label, started.elapsed());
        result
    }

    /// Sends a request whose reply is openraft's `Result<Resp, RaftError>`. The receiver's
    /// Raft having stopped (its only error) makes it unreachable to us.
    async fn call<Resp>(
        &mut self,
        rpc: Rpc,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Resp: DeserializeOwned,
    {
        let ttl = ttl.min(self.inner.rpc_timeout);
        match self.send::<Result<Resp, RaftError<TypeConfig>>>(rpc, payload, ttl).await? {
            Ok(resp) => Ok(resp),
            Err(e) => Err(RPCError::Unreachable(unreachable(format!("{}: {e}", self.addr)))),
        }
    }

    async fn send_inner<Resp>(&mut self, rpc: Rpc, payload: Vec<u8>, ttl: Duration) -> Result<Resp, SendError>
    where
        Resp: DeserializeOwned,
    {
        let (my_id, target) = (self.inner.my_id, self.target);
        if let Some(fault) = &self.inner.fault {
            if fault.blocked(my_id, target) {
                return Err(SendError::Unreachable(unreachable(format!(
                    "link {my_id} -> {target} is cut (fault injection)"
                ))));
            }
        }
        let Some(client) = self.client.as_mut() else {
            return Err(SendError::Unreachable(unreachable(format!("invalid peer address {:?}", self.addr))));
        };
        let cluster_id = self.inner.cluster.to_wire();
        let request = RaftRequest { cluster_id, from: my_id, to: target, payload };
        let mut request = tonic::Request::new(request);
        request.set_timeout(ttl);
        let call = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::PreVote => client.pre_vote(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
                Rpc::TransferLeader => client.transfer_leader(request).await,
            }
        };
        let timeout =
            || SendError::Timeout(Timeout { action: rpc.openraft(), id: my_id, target, timeout: ttl });
        let reply: RaftReply = match tokio::time::timeout(ttl, call).await {
            Err(_) => return Err(timeout()),
            Ok(Err(status)) => return Err(status_error(&status, &self.addr, target, timeout)),
            Ok(Ok(response)) => response.into_inner(),
        };
        codec::decode::<Resp>("raft reply", &reply.payload)
            .map_err(|e| SendError::Network(network(format!("undecodable reply from {}: {e}", self.addr))))
    }

    /// Sends the snapshot file in chunks; the last chunk's reply is the receiver's install.
    async fn send_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<kvset_storage::LeaderId, u64, Member, SnapshotFile>,
        option: &RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let Snapshot { meta, snapshot: mut file } = snapshot;
        let io =
            |e: std::io::Error| StreamingError::Network(network(format!("reading the snapshot file: {e}")));
        let size = file.seek(std::io::SeekFrom::End(0)).await.map_err(io)?;
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
        let transfer = rand::random::<u64>();
        let chunk_bytes = self.inner.snapshot_chunk_bytes;
        let mut offset = 0u64;
        loop {
            let len = chunk_bytes.min((size - offset) as usize);
            let mut data = vec![0u8; len];
            file.read_exact(&mut data).await.map_err(io)?;
            if let Some(fault) = &self.inner.fault {
                if !data.is_empty() && fault.corrupt_snapshot(self.inner.my_id, self.target) {
                    let middle = data.len() / 2;
                    data[middle] ^= 0x01;
                }
            }
            let done = offset + len as u64 >= size;
            let chunk = SnapshotChunk { vote, meta: meta.clone(), transfer, offset, data, done };
            let payload = codec::encode("snapshot chunk", &chunk)
                .map_err(|e| StreamingError::Network(network(e.to_string())))?;
            // The last chunk's answer waits for the install, which takes longer than a chunk.
            let ttl =
                if done { SNAPSHOT_INSTALL_TIMEOUT } else { option.hard_ttl().min(self.inner.rpc_timeout) };
            let reply: SnapshotChunkReply = self.send(Rpc::InstallSnapshot, payload, ttl).await?;
            match reply {
                Ok(Some(resp)) if done => return Ok(resp),
                Ok(None) if !done => offset += len as u64,
                Ok(_) => {
                    return Err(StreamingError::Network(network(format!(
                        "{}: snapshot transfer out of step at offset {offset}",
                        self.addr
                    ))))
                }
                Err(reason) => {
                    return Err(StreamingError::Network(network(format!(
                        "{} refused the snapshot: {reason}",
                        self.addr
                    ))))
                }
            }
        }
    }
}

impl PeerClient {
    /// See `stream_append`.
    async fn open_append_stream<'s, S>(
        &'s mut self,
        input: S,
    ) -> Result<
        BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
        RPCError<TypeConfig>,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        use futures::StreamExt;
        let mut input = input;
        // openraft applies its backoff (after errors) while it produces the next request: take
        // the first one before connecting, or a peer that is down would be retried in a hot
        // loop.
        let Some(first) = input.next().await else {
            return Ok(Box::pin(futures::stream::empty()));
        };
        let input = futures::stream::iter([first]).chain(input);
        let (my_id, target) = (self.inner.my_id, self.target);
        let inner = self.inner.clone();
        let cut = move || inner.fault.as_ref().is_some_and(|f| f.blocked(my_id, target));
        let cut_off = move || {
            SendError::Unreachable(unreachable(format!("link {my_id} -> {target} is cut (fault injection)")))
        };
        if cut() {
            return Err(cut_off().into());
        }
        let Some(mut client) = self.client.clone() else {
            return Err(RPCError::Unreachable(unreachable(format!("invalid peer address {:?}", self.addr))));
        };
        let rpc_timeout = self.inner.rpc_timeout;
        let timeout = move || {
            SendError::Timeout(Timeout {
                action: RPCTypes::AppendEntries,
                id: my_id,
                target,
                timeout: rpc_timeout,
            })
        };
        // When each unanswered request went out: answers come in order, so the front is the
        // oldest, and an answer's latency is the time since its front entry.
        let sent: Arc<std::sync::Mutex<std::collections::VecDeque<Instant>>> = Arc::default();
        // The requests end with the answers: hyper sends them from a task of its own, which
        // would otherwise keep taking openraft's requests after openraft gave up on this
        // session (and take the next session's).
        let (alive, answers_gone) = tokio::sync::oneshot::channel::<()>();
        let requests = {
            let (sent, cut, cluster_id) = (sent.clone(), cut.clone(), self.inner.cluster.to_wire());
            futures::stream::unfold((input, false), move |(mut input, last)| {
                let (sent, cut, cluster_id) = (sent.clone(), cut.clone(), cluster_id.clone());
                async move {
                    if last || cut() {
                        return None;
                    }
                    let mut rpc = input.next().await?;
                    // A request cut to APPEND_MAX_BYTES is the session's last: the follower
                    // answers up to its last entry and openraft continues from there.
                    let capped = cap_entries(&mut rpc).is_some();
                    let payload = match codec::encode("append entries", &rpc) {
                        Ok(payload) => payload,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode an AppendEntries request; ending the stream");
                            return None;
                        }
                    };
                    sent.lock().unwrap_or_else(|e| e.into_inner()).push_back(Instant::now());
                    Some((RaftRequest { cluster_id, from: my_id, to: target, payload }, (input, capped)))
                }
            })
            .take_until(answers_gone)
        };
        let addr = self.addr.clone();
        let metrics = self.inner.metrics.clone();
        let opened = Instant::now();
        let replies = match tokio::time::timeout(rpc_timeout, client.stream_append(requests)).await {
            Ok(Ok(response)) => response.into_inner(),
            Err(_) => {
                metrics.peer("stream_append", "timeout", opened.elapsed());
                return Err(timeout().into());
            }
            Ok(Err(status)) => {
                let e = status_error(&status, &addr, target, timeout);
                metrics.peer("stream_append", e.label(), opened.elapsed());
                return Err(e.into());
            }
        };
        let answers = futures::stream::unfold(Some((replies, alive)), move |state| {
            let (sent, cut, addr, metrics) = (sent.clone(), cut.clone(), addr.clone(), metrics.clone());
            async move {
                let (mut replies, alive) = state?;
                let outcome = loop {
                    match tokio::time::timeout(rpc_timeout, replies.message()).await {
                        Err(_) => {
                            // An idle stream may wait as long as it likes; one whose oldest
                            // request has gone unanswered for rpc_timeout has stalled.
                            if cut() {
                                break Err(cut_off());
                            }
                            let oldest = sent.lock().unwrap_or_else(|e| e.into_inner()).front().copied();
                            if oldest.is_some_and(|t| t.elapsed() >= rpc_timeout) {
                                break Err(timeout());
                            }
                        }
                        Ok(Ok(None)) if cut() => break Err(cut_off()),
                        Ok(Ok(None)) => return None,
                        Ok(Err(status)) => break Err(status_error(&status, &addr, target, timeout)),
                        Ok(Ok(Some(reply))) => {
                            if cut() {
                                break Err(cut_off());
                            }
                            let asked = sent.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                            metrics.peer(
                                "stream_append",
                                "ok",
                                asked.map_or(Duration::ZERO, |t| t.elapsed()),
                            );
                            break codec::decode::<StreamAppendResult<TypeConfig>>(
                                "stream append result",
                                &reply.payload,
                            )
                            .map_err(|e| {
                                SendError::Network(network(format!("undecodable answer from {addr}: {e}")))
                            });
                        }
                    }
                };
                match outcome {
                    Ok(result) => Some((Ok(result), Some((replies, alive)))),
                    Err(e) => {
                        metrics.peer("stream_append", e.label(), Duration::ZERO);
                        Some((Err(e.into()), None))
                    }
                }
            }
        });
        Ok(Box::pin(answers))
    }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, RPCError<TypeConfig>> {
    codec::encode(what, value).map_err(|e| RPCError::Network(network(e.to_string())))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut rpc = rpc;
        let sent_up_to = cap_entries(&mut rpc);
        // openraft gives every AppendEntries one heartbeat interval. That suits a heartbeat, but
        // entries wait for the follower's fsync, which stalls for a second or more on busy disks:
        // cancelling and resending them would not make the follower faster, only add traffic.
        // Entries get `raft.rpc_timeout_ms` (openraft leaves the timeout to the transport).
        let ttl = if rpc.entries.is_empty() { option.soft_ttl() } else { self.inner.rpc_timeout };
        let payload = encode("append entries", &rpc)?;
        let reply = self.call(Rpc::AppendEntries, payload, ttl).await?;
        Ok(match (reply, sent_up_to) {
            // The follower matches the leader up to the last entry sent (it commits no further
            // than that either: openraft commits up to what the request carried).
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(Some(last)),
            (reply, _) => reply,
        })
    }

    /// Pipelined replication over one `StreamAppend` call: requests go out as openraft produces
    /// them, without waiting for answers; answers come back in order. The stream fails with a
    /// timeout when the oldest unanswered request has waited `raft.rpc_timeout_ms`, and as
    /// unreachable as soon as the link is cut (fault injection).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(self.open_append_stream(input))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode("vote", &rpc)?;
        self.call(Rpc::Vote, payload, option.soft_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode("pre-vote", &rpc)?;
        self.call(Rpc::PreVote, payload, option.soft_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<kvset_storage::LeaderId, u64, Member, SnapshotFile>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot, &option) => sent,
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let payload = encode("transfer leader", &req)?;
        self.call(Rpc::TransferLeader, payload, option.soft_ttl()).await
    }

    /// Unreachable peers are retried every 200 ms at first, backing off to 2 s.
    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(
            (0..).map(|i: u32| Duration::from_millis(200u64.saturating_mul(1 << i.min(3)).min(2000))),
        ))
    }
}
