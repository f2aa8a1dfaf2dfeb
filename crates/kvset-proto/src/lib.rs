//! The kvset wire contracts, generated from `proto/` at build time.
//!
//! kvset's own contract, package `kvset.v1`:
//!
//! * [`v1::kv_server::Kv`] — the client API (put, get, delete, range, txn, compact, watch,
//!   leases);
//! * [`v1::cluster_server::Cluster`] — status and membership administration;
//! * [`v1::raft_server::Raft`] — peer-to-peer Raft traffic, bootstrap probes, join requests and
//!   the requests a member sends its leader.
//!
//! etcd's v3 API, vendored from etcd v3.5.21 (`proto/etcd`, Apache-2.0, options stripped):
//! [`etcdserverpb`] (KV, Watch, Lease, Cluster, Maintenance, Auth), [`mvccpb`] and [`authpb`].
//!
//! The `.proto` files are compiled by `protox` (pure Rust), so building this crate needs no
//! `protoc`. [`FILE_DESCRIPTOR_SET`] and [`CLIENT_DESCRIPTOR_SET`] hold encoded descriptors for
//! gRPC server reflection.
//!
//! This crate holds generated code only; conversions between these messages and kvset's domain
//! types live next to the code that needs them (`kvset-server`'s `pb` module).

/// Generated messages and services of package `kvset.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kvset.v1");
}

/// etcd's package `etcdserverpb`: the v3 client services and their messages.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// etcd's package `mvccpb`: `KeyValue` and `Event`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's package `authpb`: users, roles and permissions.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// Encoded `FileDescriptorSet` of every `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvset_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the services the client port serves (kvset.v1 `Kv` and
/// `Cluster`, etcd's six), for reflection on that port: tools list what they can call.
pub const CLIENT_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/client_descriptor.bin"));

/// Fully qualified gRPC service names, as they appear on the wire and in health checks.
pub mod service_names {
    /// The client key-value service.
    pub const KV: &str = "kvset.v1.Kv";
    /// The cluster administration service.
    pub const CLUSTER: &str = "kvset.v1.Cluster";
    /// The peer Raft service.
    pub const RAFT: &str = "kvset.v1.Raft";
}

pub mod tls;

/// gRPC metadata keys that are part of the wire contract.
pub mod metadata {
    /// On `UNAVAILABLE`: client address (host:port) of the leader, when one is known.
    pub const LEADER: &str = "kvset-leader";
    /// On `UNAVAILABLE`: node id of the leader, when one is known.
    pub const LEADER_ID: &str = "kvset-leader-id";
    /// On `UNAVAILABLE`: present ("true") when the server guarantees the request was not
    /// applied, so a write may be retried safely. Transport errors never carry it.
    pub const NOT_APPLIED: &str = "kvset-not-applied";
    /// On requests: set by a member forwarding a client request to the leader; a member that
    /// receives a forwarded request it cannot serve answers `UNAVAILABLE` instead of forwarding
    /// again.
    pub const FORWARDED: &str = "kvset-forwarded";
}

/// Whether a status reports a failure to connect at all (connection refused, unreachable
/// host, DNS failure): nothing was sent, so even a write may be retried elsewhere. Shared by
/// the client and by members forwarding to the leader.
pub fn is_connect_error(status: &tonic::Status) -> bool {
    use std::error::Error;
    // kvset's own connector (TLS) says so explicitly, whatever code tonic gave the failure.
    let mut source = status.source();
    while let Some(e) = source {
        if e.downcast_ref::<tls::ConnectError>().is_some() {
            return true;
        }
        source = e.source();
    }
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            ) {
                return true;
            }
        }
        source = e.source();
    }
    // tonic reports connect failures (including DNS) with this wording.
    let text = format!("{:?}", status.source());
    text.contains("ConnectError") || text.contains("tcp connect error") || text.contains("dns error")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_sets_name_the_services() {
        let (files, all) = decode(FILE_DESCRIPTOR_SET);
        assert_eq!(files, 6, "kv, cluster, raft, rpc and its two imports");
        for name in [service_names::KV, service_names::CLUSTER, service_names::RAFT, "etcdserverpb"] {
            let short = name.rsplit('.').next().unwrap_or(name);
            assert!(all.contains(short), "descriptor set lacks {name}");
        }
        let (files, client) = decode(CLIENT_DESCRIPTOR_SET);
        assert_eq!(files, 5, "kv, cluster, rpc and its two imports");
        assert!(!client.contains("raft.proto"), "the client set must not list the peer service");
        for service in ["Maintenance", "Watch", "Lease", "Auth"] {
            assert!(client.contains(service), "client set lacks etcd's {service}");
        }
    }

    /// Decodes a descriptor set just far enough to count its files (it must be well-formed
    /// protobuf), and returns its bytes as lossy text for name lookups (avoids a prost-types
    /// dependency).
    fn decode(bytes: &[u8]) -> (usize, String) {
        // A FileDescriptorSet is `repeated FileDescriptorProto file = 1;`.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Set {
            #[prost(bytes = "vec", repeated, tag = "1")]
            file: Vec<Vec<u8>>,
        }
        let set = Set::decode(bytes).expect("descriptor set decodes");
        (set.file.len(), String::from_utf8_lossy(bytes).into_owned())
    }

    #[test]
    fn generated_messages_round_trip() {
        let req = v1::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 0, prev_kv: true };
        let back = v1::PutRequest::decode(req.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(req, back);
    }
}
