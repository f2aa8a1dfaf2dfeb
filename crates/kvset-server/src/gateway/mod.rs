//! etcd's JSON gateway on the client port: `POST /v3/kv/range`, `/v3/watch`,
//! `/v3/lease/grant`, … as etcd 3.5 serves them, plus `GET /version` and `GET /health`, beside
//! gRPC on the same port.
//!
//! # How a request flows
//!
//! ```text
//! client port (tonic server, HTTP/1.1 and HTTP/2, plain or TLS)
//!   └─ Split: HTTP/2 with content-type application/grpc* ──▶ the gRPC services (unchanged)
//!             anything else ──▶ Gateway::handle
//!                 path ─▶ routes::resolve ─▶ body ─▶ json (serde impls generated from the protos)
//!                 ─▶ the same etcd service handler gRPC calls (a tonic::Request with the
//!                    caller's Authorization, Grpc-Metadata-* and Grpc-Timeout as metadata,
//!                    and the connection's TLS identity)
//!                 ─▶ reply: the message's JSON, or the status as etcd's error body and HTTP code
//! ```
//!
//! The gateway holds no logic of the API: it is generic over the eight etcd services
//! ([`EtcdApi`]) and calls their tonic handlers, as etcd's grpc-gateway calls its own gRPC
//! server. Streams are the handlers' streams: a request body becomes the handler's request
//! stream (each JSON value one message, encoded as a gRPC frame), its answers become lines
//! `{"result":…}\n`.
//!
//! # Differences from etcd's gateway (on purpose)
//!
//! * HTTP/1.1 streams are full duplex: answers flow while the request body is still open
//!   (etcd 3.4's Go HTTP server sends nothing until the body ends, and may drop what comes
//!   after the first answer).
//! * Decode errors carry serde's wording, not Go's (`code` and HTTP status are etcd's); an enum
//!   given as a number must be one of the enum's values.
//! * Errors are sent with a Content-Length, without grpc-gateway's `Grpc-Trailer-Content-Type`
//!   trailer.
//! * A request body is read up to a bound (four times the largest message the gRPC port
//!   decodes); beyond it the answer is 429 with gRPC's "received message larger than max".

mod health;
pub mod json;
pub mod reply;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::StreamExt;
use http::Method;
use http::StatusCode;
use kvset_proto::etcdserverpb as epb;
use kvset_proto::v3electionpb as vpb;
use kvset_proto::v3lockpb as lpb;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::body::Body;
use tonic::metadata::MetadataKey;
use tonic::metadata::MetadataMap;
use tonic::metadata::MetadataValue;
use tonic::Status;

use self::json::ReadError;
use self::reply::Reply;
use self::routes::Path;
use self::routes::Rpc;

/// etcd's services as the gateway calls them: the tonic handlers of the eight services.
pub trait EtcdApi:
    epb::kv_server::Kv
    + epb::watch_server::Watch
    + epb::lease_server::Lease
    + epb::cluster_server::Cluster
    + epb::maintenance_server::Maintenance
    + epb::auth_server::Auth
    + lpb::lock_server::Lock
    + vpb::election_server::Election
    + Clone
{
}

impl<T> EtcdApi for T where
    T: epb::kv_server::Kv
        + epb::watch_server::Watch
        + epb::lease_server::Lease
        + epb::cluster_server::Cluster
        + epb::maintenance_server::Maintenance
        + epb::auth_server::Auth
        + lpb::lock_server::Lock
        + vpb::election_server::Election
        + Clone
{
}

/// The gateway over `api`.
#[derive(Debug, Clone)]
pub struct Gateway<A> {
    api: A,
    /// The largest message a call takes (the gRPC port's decoding limit).
    message_max_bytes: usize,
}

/// What a stream's input does once the request body has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterBody {
    /// The call's input ends too (a keep-alive stream then ends, as etcd's does).
    End,
    /// The call's input stays open until the client goes (a watch stream goes on, as etcd's
    /// does after the gateway's CloseSend).
    StayOpen,
}

impl<A: EtcdApi> Gateway<A> {
    /// A gateway calling `api`, taking messages up to `message_max_bytes` (encoded).
    pub fn new(api: A, message_max_bytes: usize) -> Self {
        Self { api, message_max_bytes }
    }

    /// The largest body the gateway reads (JSON is larger than the protobuf it carries: base64
    /// and names).
    fn body_max_bytes(&self) -> usize {
        self.message_max_bytes.saturating_mul(4)
    }

    /// Answers one HTTP request that is not gRPC.
    pub async fn handle(&self, req: http::Request<Body>) -> Reply {
        let mut reply = self.answer(req).await;
        reply::cors(&mut reply);
        reply
    }

    async fn answer(&self, req: http::Request<Body>) -> Reply {
        if req.method() == Method::OPTIONS {
            return reply::empty(StatusCode::OK);
        }
        let path = req.uri().path();
        if let Some(clean) = cleaned(path) {
            let location = match req.uri().query() {
                Some(q) => format!("{clean}?{q}"),
                None => clean,
            };
            return reply::moved(&location);
        }
        match path {
            "/version" | "/health" if req.method() != Method::GET => {
                let mut refused = reply::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
                refused.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
                return refused;
            }
            "/version" => return health::version(&self.api).await,
            "/health" => return health::health(&self.api, req.uri().query()).await,
            _ => {}
        }
        match routes::resolve(path) {
            Path::Elsewhere => reply::text(StatusCode::NOT_FOUND, "404 page not found\n"),
            Path::UnknownCall => reply::text(StatusCode::NOT_FOUND, "Not Found\n"),
            Path::Call(_) if req.method() != Method::POST => {
                reply::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n")
            }
            Path::Call(rpc) => self.call(rpc, req).await,
        }
    }

    /// Runs `rpc` on the service.
    async fn call(&self, rpc: Rpc, req: http::Request<Body>) -> Reply {
        use epb::auth_server::Auth;
        use epb::cluster_server::Cluster;
        use epb::kv_server::Kv;
        use epb::lease_server::Lease;
        use epb::maintenance_server::Maintenance;
        use epb::watch_server::Watch;
        use lpb::lock_server::Lock;
        use vpb::election_server::Election;
        let api = self.api.clone();
        macro_rules! unary {
            ($service:ident :: $method:ident) => {
                self.unary(req, move |r| async move { <A as $service>::$method(&api, r).await }).await
            };
        }
        match rpc {
            Rpc::Range => unary!(Kv::range),
            Rpc::Put => unary!(Kv::put),
            Rpc::DeleteRange => unary!(Kv::delete_range),
            Rpc::Txn => unary!(Kv::txn),
            Rpc::Compact => unary!(Kv::compact),
            Rpc::Watch => {
                self.bidi(
                    req,
                    AfterBody::StayOpen,
                    move |r| async move { <A as Watch>::watch(&api, r).await },
                )
                .await
            }
            Rpc::LeaseGrant => unary!(Lease::lease_grant),
            Rpc::LeaseRevoke => unary!(Lease::lease_revoke),
            Rpc::LeaseKeepAlive => {
                self.bidi(req, AfterBody::End, move |r| async move {
                    <A as Lease>::lease_keep_alive(&api, r).await
                })
                .await
            }
            Rpc::LeaseTimeToLive => unary!(Lease::lease_time_to_live),
            Rpc::LeaseLeases => unary!(Lease::lease_leases),
            Rpc::MemberAdd => unary!(Cluster::member_add),
            Rpc::MemberRemove => unary!(Cluster::member_remove),
            Rpc::MemberUpdate => unary!(Cluster::member_update),
            Rpc::MemberList => unary!(Cluster::member_list),
            Rpc::MemberPromote => unary!(Cluster::member_promote),
            Rpc::Alarm => unary!(Maintenance::alarm),
            Rpc::Status => unary!(Maintenance::status),
            Rpc::Defragment => unary!(Maintenance::defragment),
            Rpc::Hash => unary!(Maintenance::hash),
            Rpc::Snapshot => {
                self.server_stream(req, move |r| async move { <A as Maintenance>::snapshot(&api, r).await })
                    .await
            }
            Rpc::MoveLeader => unary!(Maintenance::move_leader),
            Rpc::AuthEnable => unary!(Auth::auth_enable),
            Rpc::AuthDisable => unary!(Auth::auth_disable),
            Rpc::Authenticate => unary!(Auth::authenticate),
            Rpc::UserAdd => unary!(Auth::user_add),
            Rpc::UserGet => unary!(Auth::user_get),
            Rpc::UserList => unary!(Auth::user_list),
            Rpc::UserDelete => unary!(Auth::user_delete),
            Rpc::UserChangePassword => unary!(Auth::user_change_password),
            Rpc::UserGrantRole => unary!(Auth::user_grant_role),
            Rpc::UserRevokeRole => unary!(Auth::user_revoke_role),
            Rpc::RoleAdd => unary!(Auth::role_add),
            Rpc::RoleGet => unary!(Auth::role_get),
            Rpc::RoleList => unary!(Auth::role_list),
            Rpc::RoleDelete => unary!(Auth::role_delete),
            Rpc::RoleGrantPermission => unary!(Auth::role_grant_permission),
            Rpc::RoleRevokePermission => unary!(Auth::role_revoke_permission),
            Rpc::Lock => unary!(Lock::lock),
            Rpc::Unlock => unary!(Lock::unlock),
            Rpc::Campaign => unary!(Election::campaign),
            Rpc::Proclaim => unary!(Election::proclaim),
            Rpc::Leader => unary!(Election::leader),
            Rpc::Observe => {
                self.server_stream(req, move |r| async move { <A as Election>::observe(&api, r).await }).await
            }
            Rpc::Resign => unary!(Election::resign),
        }
    }

    /// Reads and decodes a unary call's body (grpc-gateway: 400, code 3, on a decode error).
    async fn read_one<Req>(&self, body: Body) -> Result<Req, Reply>
    where
        Req: DeserializeOwned + prost::Message + Default,
    {
        let bytes = json::read_body(body, self.body_max_bytes()).await.map_err(|e| self.refused(e, false))?;
        let message: Req = json::decode_unary(&bytes).map_err(|e| self.refused(e, false))?;
        self.check_size(&message)?;
        Ok(message)
    }

    /// A message over the gRPC port's limit gets gRPC's answer to it.
    fn check_size(&self, message: &impl prost::Message) -> Result<(), Reply> {
        let len = message.encoded_len();
        if len > self.message_max_bytes {
            return Err(self.refused(ReadError::TooLarge { got: len, max: self.message_max_bytes }, false));
        }
        Ok(())
    }

    /// The answer to a body the gateway could not read: a decode error is 400 (code 3) for a
    /// unary call and 500 (code 2) for a stream's first message, as grpc-gateway answers; too
    /// large is 429 (code 8).
    fn refused(&self, e: ReadError, stream: bool) -> Reply {
        match e {
            ReadError::TooLarge { .. } => {
                reply::error(StatusCode::TOO_MANY_REQUESTS, tonic::Code::ResourceExhausted, &e.to_string())
            }
            ReadError::Decode(m) if stream => {
                reply::error(StatusCode::INTERNAL_SERVER_ERROR, tonic::Code::Unknown, &m)
            }
            ReadError::Decode(m) => reply::error(StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument, &m),
        }
    }

    async fn unary<Req, Resp, F, Fut>(&self, req: http::Request<Body>, call: F) -> Reply
    where
        Req: DeserializeOwned + prost::Message + Default,
        Resp: Serialize,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let (parts, body) = req.into_parts();
        let message = match self.read_one::<Req>(body).await {
            Ok(m) => m,
            Err(refused) => return refused,
        };
        let timeout = grpc_timeout(&parts.headers);
        let outcome = within(timeout, call(grpc_request(parts, message))).await;
        match outcome {
            Ok(response) => reply::message(response.get_ref()),
            Err(status) => reply::status(&status),
        }
    }

    async fn server_stream<Req, Resp, F, Fut, S>(&self, req: http::Request<Body>, call: F) -> Reply
    where
        Req: DeserializeOwned + prost::Message + Default,
        Resp: Serialize + Send + 'static,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<S>, Status>>,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    {
        let (parts, body) = req.into_parts();
        let message = match self.read_one::<Req>(body).await {
            Ok(m) => m,
            Err(refused) => return refused,
        };
        match call(grpc_request(parts, message)).await {
            Ok(response) => reply::stream(response.into_inner()).await,
            Err(status) => reply::stream(futures::stream::once(async move { Err::<Resp, _>(status) })).await,
        }
    }

    async fn bidi<Req, Resp, F, Fut, S>(&self, req: http::Request<Body>, after: AfterBody, call: F) -> Reply
    where
        Req: DeserializeOwned + prost::Message + Default + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: FnOnce(tonic::Request<tonic::Streaming<Req>>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<S>, Status>>,
        S: Stream<Item = Result<Resp, Status>> + Send + 'static,
    {
        let (parts, body) = req.into_parts();
        let max = self.message_max_bytes;
        let mut messages = json::Messages::new(body, self.body_max_bytes());
        // The first message is read before the call: one that does not decode is a plain
        // error (grpc-gateway: 500, code 2).
        let first = match messages.next::<Req>().await {
            Ok(first) => first,
            Err(e) => return self.refused(e, true),
        };
        if let Some(Err(refused)) = first.as_ref().map(|m| self.check_size(m)) {
            return refused;
        }
        // Later ones as they come; one that does not decode (or is too large) ends the input,
        // as grpc-gateway stops reading there.
        let rest = futures::stream::unfold(messages, |mut messages| async move {
            match messages.next::<Req>().await {
                Ok(Some(m)) => Some((m, messages)),
                _ => None,
            }
        });
        let input = futures::stream::iter(first)
            .chain(rest)
            .take_while(move |m| std::future::ready(m.encoded_len() <= max));
        let input = match after {
            AfterBody::End => input.boxed(),
            AfterBody::StayOpen => input.chain(futures::stream::pending()).boxed(),
        };
        let frames = input.map(|m| Ok::<_, Status>(http_body::Frame::data(grpc_frame(&m))));
        let streaming = tonic::Streaming::new_request(
            tonic_prost::ProstDecoder::<Req>::new(tonic::codec::BufferSettings::default()),
            http_body_util::StreamBody::new(frames),
            None,
            Some(max),
        );
        match call(grpc_request(parts, streaming)).await {
            Ok(response) => reply::stream(response.into_inner()).await,
            Err(status) => reply::stream(futures::stream::once(async move { Err::<Resp, _>(status) })).await,
        }
    }
}

/// A message as one gRPC frame (uncompressed): what a gRPC client would have sent.
fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut buf).unwrap_or_default();
    buf.into()
}

/// The gRPC request grpc-gateway would send for an HTTP request: `Authorization` as
/// `authorization` (etcd's clients' token), `Grpc-Metadata-<name>` as `<name>`, `Grpc-Timeout`
/// as the deadline, and the connection's extensions (its TLS identity).
fn grpc_request<T>(parts: http::request::Parts, message: T) -> tonic::Request<T> {
    let mut metadata = MetadataMap::new();
    for (name, value) in &parts.headers {
        let key = match name.as_str() {
            "authorization" | "grpc-timeout" => name.as_str(),
            other => match other.strip_prefix("grpc-metadata-") {
                Some(rest) if !rest.is_empty() => rest,
                _ => continue,
            },
        };
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_bytes()))
        {
            metadata.append(key, value);
        }
    }
    tonic::Request::from_parts(metadata, parts.extensions, message)
}

/// The `Grpc-Timeout` of a request.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    headers.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(crate::forward::parse_grpc_timeout)
}

/// How much earlier than the client's `Grpc-Timeout` the gateway answers (see [`within`]).
const DEADLINE_MARGIN: Duration = Duration::from_millis(1);

/// Runs `call` within `timeout`: past it, grpc-gateway's 504 "context deadline exceeded" (also
/// when the call failed because its deadline passed, as a gRPC client reports it). The gateway
/// answers a millisecond early: tonic's server keeps the same deadline around the whole request
/// and would otherwise answer it with a gRPC status (HTTP 200) instead.
async fn within<T>(
    timeout: Option<Duration>,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let Some(timeout) = timeout else { return call.await };
    let exceeded = || Status::deadline_exceeded("context deadline exceeded");
    // A deadline within the margin has passed already: answered without a poll, so the
    // answer is ready before tonic's own timer fires.
    if timeout <= DEADLINE_MARGIN {
        return Err(exceeded());
    }
    let deadline = tokio::time::Instant::now() + (timeout - DEADLINE_MARGIN);
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(exceeded()),
        Ok(Err(_)) if tokio::time::Instant::now() >= deadline => Err(exceeded()),
        Ok(outcome) => outcome,
    }
}

/// The cleaned form of `path` if it is not clean (Go's `ServeMux` redirects there): no empty,
/// `.` or `..` segments.
fn cleaned(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/').skip(1) {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut clean = format!("/{}", out.join("/"));
    if path.ends_with('/') && clean != "/" {
        clean.push('/');
    }
    (clean != path).then_some(clean)
}

/// Whether a request is gRPC: HTTP/2 with a gRPC content type (etcd 3.5's rule for its shared
/// port); everything else is the gateway's.
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"))
}

/// A tower layer for the client port's tonic server: gRPC requests go to the gRPC services,
/// the rest to the gateway.
#[derive(Debug, Clone)]
pub struct GatewayLayer<A> {
    gateway: Gateway<A>,
}

impl<A> GatewayLayer<A> {
    /// The layer putting `gateway` beside the gRPC services.
    pub fn new(gateway: Gateway<A>) -> Self {
        Self { gateway }
    }
}

impl<A: Clone, S> tower_layer::Layer<S> for GatewayLayer<A> {
    type Service = Split<S, A>;

    fn layer(&self, grpc: S) -> Self::Service {
        Split { grpc, gateway: self.gateway.clone() }
    }
}

/// The client port's router: gRPC or gateway, by [`is_grpc`].
#[derive(Debug, Clone)]
pub struct Split<S, A> {
    grpc: S,
    gateway: Gateway<A>,
}

impl<S, A> tower_service::Service<http::Request<Body>> for Split<S, A>
where
    S: tower_service::Service<http::Request<Body>, Response = Reply, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    A: EtcdApi,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if is_grpc(&req) {
            return Box::pin(self.grpc.call(req));
        }
        let gateway = self.gateway.clone();
        Box::pin(async move { Ok(gateway.handle(req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_as_go_cleans_them() {
        assert_eq!(cleaned("/v3//kv/range").as_deref(), Some("/v3/kv/range"));
        assert_eq!(cleaned("/v3/./kv/../kv/range").as_deref(), Some("/v3/kv/range"));
        assert_eq!(cleaned("/v3/kv/range"), None);
        assert_eq!(cleaned("/v3/kv/range/"), None);
        assert_eq!(cleaned("/"), None);
    }

    #[test]
    fn headers_become_grpc_gateways_metadata() {
        let req = http::Request::builder()
            .header("Authorization", "tok.123")
            .header("Grpc-Metadata-Hasleader", "true")
            .header("Grpc-Timeout", "5S")
            .header("Token", "not forwarded")
            .header("Content-Type", "application/json")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let r = grpc_request(parts, ());
        let md = r.metadata();
        assert_eq!(md.get("authorization").unwrap(), "tok.123");
        assert_eq!(md.get("hasleader").unwrap(), "true");
        assert_eq!(md.get("grpc-timeout").unwrap(), "5S");
        assert!(md.get("token").is_none() && md.get("content-type").is_none());
    }

    #[test]
    fn only_http2_with_a_grpc_content_type_is_grpc() {
        let req = |version, ct: &str| {
            http::Request::builder().version(version).header("content-type", ct).body(()).unwrap()
        };
        assert!(is_grpc(&req(http::Version::HTTP_2, "application/grpc")));
        assert!(is_grpc(&req(http::Version::HTTP_2, "application/grpc+proto")));
        assert!(!is_grpc(&req(http::Version::HTTP_2, "application/json")));
        assert!(!is_grpc(&req(http::Version::HTTP_11, "application/grpc")));
    }
}
