//! Compiles the `.proto` files in pure Rust (protox), so no `protoc` is needed on any machine:
//! kvset's own contract (`proto/kvset/v1`) and etcd's v3 API as vendored under `proto/etcd`
//! (packages `etcdserverpb`, `mvccpb`, `authpb`). Writes two encoded descriptor sets for gRPC
//! server reflection — everything, and only what the client port serves — and generates the
//! tonic client and server code.

use std::path::PathBuf;

use prost::Message;

/// The files the client port serves (their imports come along).
const CLIENT_FILES: [&str; 3] =
    ["kvset/v1/kv.proto", "kvset/v1/cluster.proto", "etcd/api/etcdserverpb/rpc.proto"];
/// Every file.
const ALL_FILES: [&str; 4] =
    ["kvset/v1/kv.proto", "kvset/v1/cluster.proto", "kvset/v1/raft.proto", "etcd/api/etcdserverpb/rpc.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let client = protox::compile(CLIENT_FILES, [&root])?;
    std::fs::write(out_dir.join("client_descriptor.bin"), client.encode_to_vec())?;
    let all = protox::compile(ALL_FILES, [&root])?;
    std::fs::write(out_dir.join("kvset_descriptor.bin"), all.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(all)?;
    Ok(())
}
