//! The kvset wire contract, generated from `proto/kvset/v1` at build time.
//!
//! Three services make up the contract:
//!
//! * [`v1::kv_server::Kv`] — the client API (put, get, delete, range, txn; watch and leases are
//!   specified but not yet served);
//! * [`v1::cluster_server::Cluster`] — status and membership administration;
//! * [`v1::raft_server::Raft`] — peer-to-peer Raft traffic, bootstrap probes and join requests.
//!
//! The `.proto` files are compiled by `protox` (pure Rust), so building this crate needs no
//! `protoc`. [`FILE_DESCRIPTOR_SET`] holds the encoded descriptors for gRPC server reflection.
//!
//! This crate holds generated code only; conversions between these messages and kvset's domain
//! types live next to the code that needs them (`kvset-server`'s `pb` module).

/// Generated messages and services of package `kvset.v1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kvset.v1");
}

/// Encoded `FileDescriptorSet` of every kvset `.proto` file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvset_descriptor.bin"));

/// Fully qualified gRPC service names, as they appear on the wire and in health checks.
pub mod service_names {
    /// The client key-value service.
    pub const KV: &str = "kvset.v1.Kv";
    /// The cluster administration service.
    pub const CLUSTER: &str = "kvset.v1.Cluster";
    /// The peer Raft service.
    pub const RAFT: &str = "kvset.v1.Raft";
}

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
    fn descriptor_set_names_every_service() {
        let fds = prost_types_free_decode(FILE_DESCRIPTOR_SET);
        for name in [service_names::KV, service_names::CLUSTER, service_names::RAFT] {
            let short = name.rsplit('.').next().unwrap_or(name);
            assert!(fds.contains(short), "descriptor set lacks service {name}");
        }
    }

    /// Decodes the descriptor set just far enough to see it is well-formed protobuf, and
    /// returns its bytes as lossy text for name lookups (avoids a prost-types dependency).
    fn prost_types_free_decode(bytes: &[u8]) -> String {
        // A FileDescriptorSet is `repeated FileDescriptorProto file = 1;`: decoding it as a
        // message with unknown fields must succeed.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Set {
            #[prost(bytes = "vec", repeated, tag = "1")]
            file: Vec<Vec<u8>>,
        }
        let set = Set::decode(bytes).expect("descriptor set decodes");
        assert_eq!(set.file.len(), 3, "one descriptor per .proto file");
        String::from_utf8_lossy(bytes).into_owned()
    }

    #[test]
    fn generated_messages_round_trip() {
        let req = v1::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), lease: 0, prev_kv: true };
        let back = v1::PutRequest::decode(req.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(req, back);
    }
}
