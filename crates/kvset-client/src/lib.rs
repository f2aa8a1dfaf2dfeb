//! An async client for kvset.
//!
//! [`Client`] talks gRPC to a list of endpoints (any members, or a Kubernetes Service). It
//! learns the leader from `Status` and from `UNAVAILABLE` answers and goes to it directly when
//! it can reach it; any member would forward anyway. Every call has a deadline
//! ([`ClientOptions::timeout`]).
//!
//! # What is retried
//!
//! * **Reads** are retried on any transient failure until the deadline.
//! * **Writes** are retried only when they certainly were not applied: the server said so
//!   (`UNAVAILABLE` carrying `kvset-not-applied`), or the connection could not be opened at
//!   all. A write whose outcome is unknown (connection lost mid-call, `UNKNOWN`, deadline) is
//!   returned as [`Error::Indeterminate`] / [`Error::DeadlineExceeded`] and never silently
//!   re-sent: a retry could apply it twice.
//!
//! # Watches and leases
//!
//! [`Client::watch`] returns a [`Watch`] that survives member failures: when its stream breaks
//! (a member stops, loses its leader, or is cut off) it reopens on another member from the
//! revision after the last one it delivered, so no event is dropped or repeated; only a
//! compaction past that revision ends it ([`Error::OutOfRange`]). [`Client::keep_alive`]
//! renews a lease in the background, over any member, until dropped.
//!
//! The client depends on neither sled nor openraft: only on the wire contract (`kvset-proto`).

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod lease;
mod watch;

pub use lease::KeepAlive;
pub use lease::KeepAliveStream;
pub use watch::Watch;
pub use watch::WatchEvent;
pub use watch::WatchOptions;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use kvset_proto::is_connect_error;
use kvset_proto::metadata;
pub use kvset_proto::tls::client_tls_from_files;
use kvset_proto::tls::ChannelOptions;
pub use kvset_proto::tls::ClientTls;
pub use kvset_proto::tls::TlsError;
pub use kvset_proto::v1 as pb;
use kvset_proto::v1::cluster_client::ClusterClient;
use kvset_proto::v1::kv_client::KvClient;
use tonic::transport::Channel;
use tonic::transport::Endpoint;
use tonic::Code;
use tonic::Status;

/// Largest response the client accepts, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of each call, retries included.
    pub timeout: Duration,
    /// Time allowed to open a connection to one endpoint.
    pub connect_timeout: Duration,
    /// Follow leader hints and send requests straight to the leader.
    pub prefer_leader: bool,
    /// Dial every endpoint through TLS with this configuration (see
    /// [`kvset_proto::tls::client_tls_from_files`]); the server's certificate must name the
    /// endpoint's host, or `tls_server_name` when set.
    pub tls: Option<Arc<ClientTls>>,
    /// The name the servers' certificates are checked against instead of each endpoint's host.
    pub tls_server_name: Option<String>,
    /// Log in as this user with this password (access control): the client exchanges them
    /// for a token with `Authenticate` and sends it with every call, logging in again when it
    /// expires.
    pub user: Option<(String, String)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            prefer_leader: true,
            tls: None,
            tls_server_name: None,
            user: None,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or breaks a limit; nothing was applied.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No member could serve the request before the deadline; nothing was applied.
    #[error("unavailable: {message}")]
    Unavailable { message: String, leader: Option<String> },
    /// A write's outcome is unknown: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The deadline passed; a write may or may not have been applied.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The server does not serve this call.
    #[error("not implemented: {0}")]
    Unimplemented(String),
    /// The cluster refused the request in its current state.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// What the request names (a lease) does not exist; nothing was applied.
    #[error("not found: {0}")]
    NotFound(String),
    /// The revision asked for was compacted or is in the future; nothing was read or applied.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// An endpoint is not a valid host:port.
    #[error("bad endpoint {0:?}")]
    BadEndpoint(String),
    /// A local file could not be written, or a stream ended early.
    #[error("{0}")]
    Io(String),
    /// Any other status from the server.
    #[error("{code:?}: {message}")]
    Server { code: Code, message: String },
}

impl Error {
    /// Whether the request certainly had no effect.
    pub fn not_applied(&self) -> bool {
        matches!(
            self,
            Error::InvalidArgument(_)
                | Error::Unavailable { .. }
                | Error::Unimplemented(_)
                | Error::FailedPrecondition(_)
                | Error::NotFound(_)
                | Error::OutOfRange(_)
                | Error::BadEndpoint(_)
        )
    }
}

/// One RPC attempt against one member's channel; a plain function pointer keeps client futures
/// `Send` and `'static`, so calls can be spawned.
type Call<Req, Resp> = fn(
    Channel,
    tonic::Request<Req>,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::Response<Resp>, Status>> + Send>,
>;

pub(crate) fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

fn cluster(channel: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Whether a call may change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
}

struct Inner {
    /// The token of `options.user`, once logged in.
    token: Mutex<Option<String>>,
    /// Held while logging in: concurrent calls wait for one login instead of each running one
    /// (a password check is slow on purpose).
    login: tokio::sync::Mutex<()>,
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
    next: AtomicUsize,
    options: ClientOptions,
}

/// A kvset client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.inner.endpoints).finish_non_exhaustive()
    }
}

fn header(status: &Status, key: &str) -> Option<String> {
    status.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The status's message followed by its chain of causes (a transport error's TLS or
/// connection failure is only there).
fn describe(status: &Status) -> String {
    use std::error::Error as _;
    let mut message = status.message().to_string();
    let mut source = status.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = e.source();
    }
    message
}

pub(crate) fn final_error(status: &Status, kind: Kind) -> Error {
    let message = describe(status);
    match status.code() {
        Code::InvalidArgument => Error::InvalidArgument(message),
        Code::NotFound => Error::NotFound(message),
        Code::OutOfRange => Error::OutOfRange(message),
        Code::Unimplemented => Error::Unimplemented(message),
        Code::FailedPrecondition => Error::FailedPrecondition(message),
        Code::DeadlineExceeded | Code::Cancelled => Error::DeadlineExceeded(message),
        Code::Unavailable if header(status, metadata::NOT_APPLIED).is_some() || kind == Kind::Read => {
            Error::Unavailable { message, leader: header(status, metadata::LEADER) }
        }
        // The member was overloaded and applied nothing.
        Code::ResourceExhausted if header(status, metadata::NOT_APPLIED).is_some() => {
            Error::Unavailable { message, leader: None }
        }
        Code::Unavailable | Code::Unknown if kind == Kind::Write => Error::Indeterminate(message),
        code => Error::Server { code, message },
    }
}

impl Client {
    /// A client for `endpoints` (host:port each). Connections open on first use.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(Error::BadEndpoint(String::new()));
        }
        for e in &endpoints {
            Endpoint::from_shared(format!("http://{e}")).map_err(|_| Error::BadEndpoint(e.clone()))?;
        }
        let start = rand::random::<usize>() % endpoints.len();
        Ok(Self {
            inner: Arc::new(Inner {
                token: Mutex::default(),
                login: tokio::sync::Mutex::new(()),
                endpoints,
                channels: Mutex::default(),
                leader: Mutex::default(),
                next: AtomicUsize::new(start),
                options,
            }),
        })
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let options = &self.inner.options;
        let channel_options = ChannelOptions { connect_timeout: options.connect_timeout, keep_alive: None };
        let server_name =
            options.tls_server_name.clone().unwrap_or_else(|| kvset_proto::tls::host_of(addr).to_string());
        let tls = options.tls.as_ref().map(|t| (t, server_name.as_str()));
        let c = kvset_proto::tls::lazy_channel(addr, tls, channel_options)
            .map_err(|_| Error::BadEndpoint(addr.to_string()))?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn cluster_client(&self, addr: &str) -> Result<ClusterClient<Channel>, Error> {
        Ok(cluster(self.channel(addr)?))
    }

    fn leader_hint(&self) -> Option<String> {
        self.inner.leader.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_leader(&self, leader: Option<String>) {
        *self.inner.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }

    /// The endpoint for the next attempt: the known leader, else the next endpoint in turn.
    pub(crate) fn pick(&self) -> String {
        if self.inner.options.prefer_leader {
            if let Some(leader) = self.leader_hint() {
                return leader;
            }
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.endpoints[i % self.inner.endpoints.len()].clone()
    }

    /// The token to send, logging in first when a user is configured and none is held.
    pub(crate) async fn token(&self) -> Result<Option<String>, Error> {
        let Some((user, password)) = &self.inner.options.user else { return Ok(None) };
        let cached = || self.inner.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(t) = cached() {
            return Ok(Some(t));
        }
        let _login = self.inner.login.lock().await;
        if let Some(t) = cached() {
            return Ok(Some(t));
        }
        let addr = self.pick();
        let mut auth = kvset_proto::etcdserverpb::auth_client::AuthClient::new(self.channel(&addr)?);
        let mut request = tonic::Request::new(kvset_proto::etcdserverpb::AuthenticateRequest {
            name: user.clone(),
            password: password.clone(),
        });
        request.set_timeout(self.inner.options.timeout);
        let token =
            auth.authenticate(request).await.map_err(|s| final_error(&s, Kind::Read))?.into_inner().token;
        *self.inner.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(Some(token))
    }

    /// Forgets the token (it expired or the password changed): the next call logs in again.
    pub(crate) fn forget_token(&self) {
        *self.inner.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Adds the token, if any, to a request's metadata.
    pub(crate) async fn authorize<T>(&self, request: &mut tonic::Request<T>) -> Result<(), Error> {
        if let Some(token) = self.token().await? {
            let value = tonic::metadata::MetadataValue::try_from(token.as_str())
                .map_err(|_| Error::Io("the server sent a token that is not valid metadata".into()))?;
            request.metadata_mut().insert("token", value);
        }
        Ok(())
    }

    /// Runs `call` with the retry rules of the module docs.
    async fn run<Req: Clone, Resp>(
        &self,
        kind: Kind,
        req: Req,
        call: Call<Req, Resp>,
    ) -> Result<Resp, Error> {
        let deadline = Instant::now() + self.inner.options.timeout;
        let mut backoff = Duration::from_millis(25);
        let mut last: Option<Status> = None;
        let mut relogged = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(match last {
                    Some(status) => match final_error(&status, kind) {
                        Error::Unavailable { message, leader } => Error::Unavailable {
                            message: format!("gave up at the deadline: {message}"),
                            leader,
                        },
                        other => other,
                    },
                    None => Error::DeadlineExceeded("no attempt completed".into()),
                });
            }
            let addr = self.pick();
            let channel = self.channel(&addr)?;
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(left);
            self.authorize(&mut request).await?;
            let status = match tokio::time::timeout(left, call(channel, request)).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("client deadline"),
            };
            let not_applied = header(&status, metadata::NOT_APPLIED).is_some();
            let connect = is_connect_error(&status);
            if status.code() == Code::Unauthenticated && self.inner.options.user.is_some() && !relogged {
                // The token expired or was revoked: log in again, once.
                self.forget_token();
                relogged = true;
                continue;
            }
            let retry = match status.code() {
                Code::Unavailable if not_applied || connect => true,
                Code::ResourceExhausted => not_applied,
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled => kind == Kind::Read,
                _ => false,
            };
            if !retry {
                return Err(final_error(&status, kind));
            }
            // Follow the hint; forget a leader we could not reach.
            match header(&status, metadata::LEADER) {
                Some(leader) if leader != addr => self.set_leader(Some(leader)),
                _ => {
                    if self.leader_hint().as_deref() == Some(addr.as_str()) {
                        self.set_leader(None);
                    }
                }
            }
            tracing::debug!(endpoint = %addr, code = ?status.code(), message = status.message(), "retrying");
            last = Some(status);
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Sets `key` to `value`.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<pb::PutResponse, Error> {
        self.put_request(pb::PutRequest { key: key.into(), value: value.into(), ..Default::default() }).await
    }

    /// Sends a full Put request.
    pub async fn put_request(&self, req: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        self.run(Kind::Write, req, |ch, r| Box::pin(async move { kv(ch).put(r).await })).await
    }

    /// Reads `key` linearizably; `None` when absent.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<pb::KeyValue>, Error> {
        Ok(self.get_request(pb::GetRequest { key: key.into(), ..Default::default() }).await?.kv)
    }

    /// Sends a full Get request (choose the consistency there).
    pub async fn get_request(&self, req: pb::GetRequest) -> Result<pb::GetResponse, Error> {
        self.run(Kind::Read, req, |ch, r| Box::pin(async move { kv(ch).get(r).await })).await
    }

    /// Reads one page of a range.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, Error> {
        self.run(Kind::Read, req, |ch, r| Box::pin(async move { kv(ch).range(r).await })).await
    }

    /// Deletes a key or range.
    pub async fn delete(&self, req: pb::DeleteRequest) -> Result<pb::DeleteResponse, Error> {
        self.run(Kind::Write, req, |ch, r| Box::pin(async move { kv(ch).delete(r).await })).await
    }

    /// Runs a transaction.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        self.run(Kind::Write, req, |ch, r| Box::pin(async move { kv(ch).txn(r).await })).await
    }

    /// Sets `key` to `new` if its value is `expected` (`None`: if the key does not exist).
    /// Returns whether the swap happened and the response.
    pub async fn compare_and_swap(
        &self,
        key: impl Into<Vec<u8>>,
        expected: Option<&[u8]>,
        new: impl Into<Vec<u8>>,
    ) -> Result<pb::TxnResponse, Error> {
        self.txn(cas_request(key.into(), expected, new.into())).await
    }

    /// The Status of the member at `endpoint` (no retries, no leader following).
    pub async fn status_of(&self, endpoint: &str) -> Result<pb::StatusResponse, Error> {
        self.status_request(endpoint, false).await
    }

    /// The Status of the member at `endpoint`, with a digest of its whole state when `digest`.
    pub async fn status_request(&self, endpoint: &str, digest: bool) -> Result<pb::StatusResponse, Error> {
        let mut c = self.cluster_client(endpoint)?;
        let mut r = tonic::Request::new(pb::StatusRequest { digest });
        r.set_timeout(self.inner.options.timeout);
        if digest {
            // A digest reads every key: with access control on it is an administrator's call.
            self.authorize(&mut r).await?;
        }
        match tokio::time::timeout(self.inner.options.timeout, c.status(r)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(final_error(&status, Kind::Read)),
            Err(_) => Err(Error::DeadlineExceeded(format!("status of {endpoint}"))),
        }
    }

    /// The members of the cluster, from the leader.
    pub async fn member_list(&self) -> Result<pb::MemberListResponse, Error> {
        self.run(Kind::Read, pb::MemberListRequest {}, |ch, r| {
            Box::pin(async move { cluster(ch).member_list(r).await })
        })
        .await
    }

    /// Sets the desired number of voters.
    pub async fn set_replicas(&self, replicas: u32) -> Result<pb::SetReplicasResponse, Error> {
        self.run(Kind::Write, pb::SetReplicasRequest { replicas }, |ch, r| {
            Box::pin(async move { cluster(ch).set_replicas(r).await })
        })
        .await
    }

    /// Adds a learner (manual override).
    pub async fn add_learner(&self, req: pb::AddLearnerRequest) -> Result<pb::AddLearnerResponse, Error> {
        self.run(Kind::Write, req, |ch, r| Box::pin(async move { cluster(ch).add_learner(r).await })).await
    }

    /// Promotes a learner to voter (manual override).
    pub async fn promote(&self, node_id: u64) -> Result<pb::PromoteResponse, Error> {
        self.run(Kind::Write, pb::PromoteRequest { node_id }, |ch, r| {
            Box::pin(async move { cluster(ch).promote(r).await })
        })
        .await
    }

    /// Removes a member (manual override).
    pub async fn remove(&self, node_id: u64) -> Result<pb::RemoveResponse, Error> {
        self.run(Kind::Write, pb::RemoveRequest { node_id }, |ch, r| {
            Box::pin(async move { cluster(ch).remove(r).await })
        })
        .await
    }

    /// Asks the leader to hand leadership to voter `node_id` (0: the most up-to-date voter) and
    /// waits until another member leads. Returns the new leader's node id.
    pub async fn transfer_leader(&self, node_id: u64) -> Result<pb::TransferLeaderResponse, Error> {
        self.run(Kind::Write, pb::TransferLeaderRequest { node_id }, |ch, r| {
            Box::pin(async move { cluster(ch).transfer_leader(r).await })
        })
        .await
    }

    /// Reads `key` as it was at `revision` (linearizably: the leader answers).
    pub async fn get_at(&self, key: impl Into<Vec<u8>>, revision: i64) -> Result<pb::GetResponse, Error> {
        self.get_request(pb::GetRequest { key: key.into(), revision, ..Default::default() }).await
    }

    /// Forgets history before `revision`.
    pub async fn compact(&self, revision: i64) -> Result<pb::CompactResponse, Error> {
        self.run(Kind::Write, pb::CompactRequest { revision }, |ch, r| {
            Box::pin(async move { kv(ch).compact(r).await })
        })
        .await
    }

    /// Grants a lease of `ttl_seconds`; `id` 0 lets the leader choose it.
    pub async fn lease_grant(&self, ttl_seconds: i64, id: i64) -> Result<pb::LeaseGrantResponse, Error> {
        self.run(Kind::Write, pb::LeaseGrantRequest { ttl_seconds, id }, |ch, r| {
            Box::pin(async move { kv(ch).lease_grant(r).await })
        })
        .await
    }

    /// Revokes a lease, deleting its keys.
    pub async fn lease_revoke(&self, id: i64) -> Result<pb::LeaseRevokeResponse, Error> {
        self.run(Kind::Write, pb::LeaseRevokeRequest { id }, |ch, r| {
            Box::pin(async move { kv(ch).lease_revoke(r).await })
        })
        .await
    }

    /// A lease's remaining and granted TTL (ttl_seconds -1: no such lease), with its keys.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        self.run(Kind::Read, pb::LeaseTimeToLiveRequest { id, keys }, |ch, r| {
            Box::pin(async move { kv(ch).lease_time_to_live(r).await })
        })
        .await
    }

    /// Every lease.
    pub async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, Error> {
        self.run(Kind::Read, pb::LeaseLeasesRequest {}, |ch, r| {
            Box::pin(async move { kv(ch).lease_leases(r).await })
        })
        .await
    }

    /// Options of this client.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// Streams a backup of the member at `endpoint` (a consistent copy of its applied state:
    /// history, leases, compact revision) into `out`; `progress` sees (bytes so far, total)
    /// after each chunk. Returns (revision, bytes). The copy is not checked here: check it with
    /// `kvset_storage::snapshot::inspect` once written.
    pub async fn backup(
        &self,
        endpoint: &str,
        out: &mut (impl std::io::Write + Send),
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<(i64, u64), Error> {
        let mut c = self.cluster_client(endpoint)?;
        // No deadline on the stream: a large backup takes as long as it takes; the client
        // timeout bounds the call's start.
        let mut r = tonic::Request::new(pb::BackupRequest {});
        self.authorize(&mut r).await?;
        let mut stream = tokio::time::timeout(self.inner.options.timeout, c.backup(r))
            .await
            .map_err(|_| Error::DeadlineExceeded(format!("{endpoint}: the backup did not start in time")))?
            .map_err(|s| final_error(&s, Kind::Read))?
            .into_inner();
        let (mut revision, mut written, mut total) = (0, 0u64, None);
        while let Some(chunk) = stream.message().await.map_err(|s| final_error(&s, Kind::Read))? {
            out.write_all(&chunk.data).map_err(|e| Error::Io(format!("writing the backup: {e}")))?;
            written += chunk.data.len() as u64;
            revision = chunk.revision;
            total = Some(chunk.total_bytes);
            progress(written, chunk.total_bytes);
        }
        match total {
            Some(t) if t == written => Ok((revision, written)),
            _ => Err(Error::Io(format!(
                "{endpoint}: the backup stream ended after {written} of {} bytes",
                total.map_or("?".to_string(), |t| t.to_string())
            ))),
        }
    }

    /// Asks the member at `endpoint` to defragment: it stops, rewrites its database and
    /// serves again. Returns its volume size when asked.
    pub async fn defragment(&self, endpoint: &str) -> Result<pb::DefragmentResponse, Error> {
        let mut c = self.cluster_client(endpoint)?;
        let mut r = tonic::Request::new(pb::DefragmentRequest {});
        self.authorize(&mut r).await?;
        r.set_timeout(self.inner.options.timeout);
        c.defragment(r).await.map(tonic::Response::into_inner).map_err(|s| final_error(&s, Kind::Read))
    }

    /// Makes the member at `endpoint` build a snapshot now.
    pub async fn snapshot(&self, endpoint: &str) -> Result<pb::SnapshotResponse, Error> {
        let mut c = self.cluster_client(endpoint)?;
        let mut r = tonic::Request::new(pb::SnapshotRequest {});
        self.authorize(&mut r).await?;
        r.set_timeout(self.inner.options.timeout);
        c.snapshot(r).await.map(tonic::Response::into_inner).map_err(|s| final_error(&s, Kind::Read))
    }
}

/// A compare-and-swap transaction: `key` = `new` if its value is `expected` (or it is absent
/// when `expected` is `None`); on failure the current key is returned.
pub fn cas_request(key: Vec<u8>, expected: Option<&[u8]>, new: Vec<u8>) -> pb::TxnRequest {
    use pb::compare::Result as R;
    use pb::compare::Target as T;
    use pb::compare::TargetUnion as U;
    let compare = match expected {
        Some(v) => pb::Compare {
            result: R::Equal as i32,
            target: T::Value as i32,
            key: key.clone(),
            target_union: Some(U::Value(v.to_vec())),
        },
        None => pb::Compare {
            result: R::Equal as i32,
            target: T::Version as i32,
            key: key.clone(),
            target_union: Some(U::Version(0)),
        },
    };
    pb::TxnRequest {
        compare: vec![compare],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.clone(),
                value: new,
                ..Default::default()
            })),
        }],
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_outcomes_are_classified_conservatively() {
        let mut not_applied = Status::unavailable("no leader");
        not_applied.metadata_mut().insert(metadata::NOT_APPLIED, "true".parse().unwrap());
        assert!(matches!(final_error(&not_applied, Kind::Write), Error::Unavailable { .. }));
        assert!(final_error(&not_applied, Kind::Write).not_applied());
        let lost = Status::unavailable("connection reset");
        assert!(matches!(final_error(&lost, Kind::Write), Error::Indeterminate(_)));
        assert!(!final_error(&lost, Kind::Write).not_applied());
        assert!(matches!(
            final_error(&Status::unknown("raft stopped"), Kind::Write),
            Error::Indeterminate(_)
        ));
        assert!(matches!(final_error(&lost, Kind::Read), Error::Unavailable { .. }));
        assert!(matches!(
            final_error(&Status::invalid_argument("x"), Kind::Write),
            Error::InvalidArgument(_)
        ));
        assert!(matches!(
            final_error(&Status::deadline_exceeded("x"), Kind::Write),
            Error::DeadlineExceeded(_)
        ));
    }

    #[test]
    fn endpoints_are_validated() {
        assert!(Client::new(Vec::<String>::new(), ClientOptions::default()).is_err());
        assert!(Client::new(["bad host:1"], ClientOptions::default()).is_err());
        assert!(Client::new(["127.0.0.1:2379"], ClientOptions::default()).is_ok());
    }

    #[test]
    fn cas_on_absent_key_compares_version_zero() {
        let req = cas_request(b"k".to_vec(), None, b"v".to_vec());
        assert_eq!(req.compare[0].target, pb::compare::Target::Version as i32);
        assert_eq!(req.compare[0].target_union, Some(pb::compare::TargetUnion::Version(0)));
    }
}
