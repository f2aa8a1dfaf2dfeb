//! The three servers of a member, each with graceful shutdown on the node's stop signal.
//!
//! * peer port: the `Raft` service only (so a NetworkPolicy can keep it pod-to-pod);
//! * client port: kvset.v1 `Kv` and `Cluster`, etcd's v3 services (`etcdserverpb`, `v3lockpb`,
//!   `v3electionpb`), gRPC health (`grpc.health.v1`) and server reflection (`v1` and
//!   `v1alpha`, listing only these services) over HTTP/2; everything else on the port (HTTP/1.x,
//!   HTTP/2 without a gRPC content type) goes to etcd's JSON gateway (`crate::gateway`);
//! * ops port: HTTP `/`, `/status.json`, `/metrics`, `/healthz`, `/readyz` (the router built by
//!   `node.rs`; plain HTTP, as etcd's `--listen-metrics-urls`: probes and scrapers need no
//!   certificate).
//!
//! With TLS configured (`crate::tls`), the client and peer ports accept only TLS connections,
//! and the ops port too when `tls.ops` is set.

use std::sync::Arc;

use kvset_proto::v1::cluster_server::ClusterServer;
use kvset_proto::v1::kv_server::KvServer;
use kvset_proto::v1::raft_server::RaftServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::forward::CLIENT_MAX_MESSAGE_BYTES;
use crate::gateway::Gateway;
use crate::gateway::GatewayLayer;
use crate::identity::AddressBook;
use crate::identity::Identity;
use crate::member::LocalMember;
use crate::network::PEER_MAX_MESSAGE_BYTES;
use crate::service::cluster::ClusterService;
use crate::service::etcd::EtcdService;
use crate::service::kv::KvService;
use crate::service::raft::PeerService;
use crate::tls::incoming;
use crate::tls::MemberTls;
use crate::tls::OpsListener;
use crate::tls::Port;

/// The three listeners a member serves on, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    pub ops: TcpListener,
}

/// Why the listeners could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

impl Listeners {
    /// Binds the listeners of `config`'s member on `listen_host`.
    pub async fn bind(config: &Config) -> Result<Self, ListenError> {
        let identity = Identity::from_name(&config.name)?;
        let book = AddressBook::new(config, &identity.set);
        let bind = |port: u16| {
            let addr = format!("{}:{}", config.listen_host, port);
            async move { TcpListener::bind(&addr).await.map_err(|e| ListenError::Bind { addr, source: e }) }
        };
        Ok(Self {
            client: bind(book.client_listen_port(identity.ordinal)).await?,
            peer: bind(book.peer_listen_port(identity.ordinal)).await?,
            ops: bind(book.ops_listen_port(identity.ordinal)).await?,
        })
    }
}

/// Why the servers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Starts the servers (`ops` is the ops port's router); each task ends once it has drained
/// after the stop signal.
pub async fn spawn_servers(
    member: Arc<LocalMember>,
    listeners: Listeners,
    tls: Option<Arc<MemberTls>>,
    ops: axum::Router,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let mut tasks = Vec::new();

    // Peer server.
    let peer = RaftServer::new(PeerService::new(member.clone()))
        .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
        // The answers of reads passed on to this leader are bounded by what the asking member
        // reads back (`limits.forward_response_max_bytes`), not here.
        .max_encoding_message_size(i32::MAX as usize);
    let incoming_peer = incoming(listeners.peer, tls.clone(), Port::Peer, member.metrics().clone());
    let stop_peer = stop.clone();
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(peer)
            .serve_with_incoming_shutdown(incoming_peer, stopped(stop_peer))
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "peer server failed");
        }
    }));

    // Client server: kvset.v1, etcd's v3 API, health, reflection.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let served: Vec<&'static str> = ["", kvset_proto::service_names::KV, kvset_proto::service_names::CLUSTER]
        .into_iter()
        .chain(crate::service::etcd::SERVICE_NAMES)
        .collect();
    for name in &served {
        health_reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    // Both reflection versions: grpcurl and grpc-java use v1, python's grpcio-reflection,
    // older grpcurl, Postman and Evans v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kvset_proto::CLIENT_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Requests up to twice the request limit decode, so an oversized one is answered with
    // INVALID_ARGUMENT naming the limit rather than a transport error.
    let decode_limit = (member.config().limits.request_max_bytes as usize).saturating_mul(2).max(4 << 20);
    let kv = KvServer::new(KvService::new(member.clone()))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
    let cluster = ClusterServer::new(ClusterService::new(member.clone()))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
    let etcd = EtcdService::servers(member.clone(), decode_limit, CLIENT_MAX_MESSAGE_BYTES);
    let gateway = GatewayLayer::new(Gateway::new(etcd.service.clone(), decode_limit));
    let incoming_client = incoming(listeners.client, tls.clone(), Port::Client, member.metrics().clone());
    let stop_client = stop.clone();
    let reporter = health_reporter.clone();
    tasks.push(tokio::spawn(async move {
        let mut stop_health = stop_client.clone();
        let health_down = async move {
            let _ = stop_health.wait_for(|s| *s).await;
            for name in served {
                reporter.set_service_status(name, ServingStatus::NotServing).await;
            }
        };
        tokio::spawn(health_down);
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // HTTP/1.x too: the gateway's (gRPC needs HTTP/2 and goes to the services).
            .accept_http1(true)
            .layer(gateway)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(kv)
            .add_service(cluster)
            .add_service(etcd.kv)
            .add_service(etcd.watch)
            .add_service(etcd.lease)
            .add_service(etcd.cluster)
            .add_service(etcd.maintenance)
            .add_service(etcd.auth)
            .add_service(etcd.lock)
            .add_service(etcd.election)
            .serve_with_incoming_shutdown(incoming_client, stopped(stop_client))
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "client server failed");
        }
    }));

    // Ops server.
    let app = ops;
    let metrics = member.metrics().clone();
    let ops_listener = listeners.ops;
    let stop_ops = stop.clone();
    let ops_tls = tls.filter(|_| member.config().tls.ops);
    tasks.push(tokio::spawn(async move {
        let served = match ops_tls {
            None => axum::serve(ops_listener, app).with_graceful_shutdown(stopped(stop_ops)).await,
            Some(tls) => match OpsListener::new(ops_listener, tls, metrics) {
                Ok(listener) => axum::serve(listener, app).with_graceful_shutdown(stopped(stop_ops)).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "ops server failed");
        }
    }));

    Ok(tasks)
}
