//! Compiles the `.proto` files in pure Rust (protox), so no `protoc` is needed on any machine:
//! kvset's own contract (`proto/kvset/v1`) and etcd's v3 API as vendored under `proto/etcd`
//! (packages `etcdserverpb`, `mvccpb`, `authpb`, and the lock and election services `v3lockpb`,
//! `v3electionpb`). Writes two encoded descriptor sets for gRPC server reflection — everything,
//! and only what the client port serves — and generates the tonic client and server code.
//!
//! For etcd's packages it also generates serde `Serialize`/`Deserialize` impls (pbjson-build,
//! from the same descriptors) with etcd's JSON gateway mapping: the proto's own field names on
//! output (grpc-gateway's `OrigName`), either spelling on input, int64 as strings, bytes as
//! base64, enums by name, default values omitted, unknown fields ignored. A field added to a
//! proto is in its JSON at the next build.

use std::path::PathBuf;

use prost::Message;

/// The files the client port serves (their imports come along).
const CLIENT_FILES: [&str; 5] = [
    "kvset/v1/kv.proto",
    "kvset/v1/cluster.proto",
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
];
/// Every file.
const ALL_FILES: [&str; 6] = [
    "kvset/v1/kv.proto",
    "kvset/v1/cluster.proto",
    "kvset/v1/raft.proto",
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
];
/// The packages that get JSON (etcd's gateway).
const JSON_PACKAGES: [&str; 5] = [".etcdserverpb", ".mvccpb", ".authpb", ".v3lockpb", ".v3electionpb"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let client = protox::compile(CLIENT_FILES, [&root])?;
    std::fs::write(out_dir.join("client_descriptor.bin"), client.encode_to_vec())?;
    let all = protox::compile(ALL_FILES, [&root])?;
    std::fs::write(out_dir.join("kvset_descriptor.bin"), all.encode_to_vec())?;

    let encoded = all.encode_to_vec();
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(all)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&JSON_PACKAGES)?;
    for package in JSON_PACKAGES {
        let path = out_dir.join(format!("{}.serde.rs", package.trim_start_matches('.')));
        std::fs::write(&path, as_jsonpb_reads(&std::fs::read_to_string(&path)?))?;
    }
    Ok(())
}

/// Two reading rules of golang/protobuf's jsonpb (etcd's gateway) that pbjson does not share:
///
/// * bytes are Go's `[]byte`: standard base64 with padding, `\r` and `\n` skipped, or an array
///   of numbers (`crate::json::GoBytes` instead of pbjson's reader, which also takes URL-safe
///   and unpadded text);
/// * a field given twice is not an error: the last value counts.
fn as_jsonpb_reads(generated: &str) -> String {
    let generated = generated.replace("::pbjson::private::BytesDeserialize", "crate::json::GoBytes");
    let mut out = String::with_capacity(generated.len());
    let mut lines = generated.lines().peekable();
    while let Some(line) = lines.next() {
        let guard = line.trim_start().starts_with("if ") && line.trim_end().ends_with(".is_some() {");
        if guard && lines.peek().is_some_and(|next| next.contains("serde::de::Error::duplicate_field")) {
            lines.next();
            lines.next(); // the closing brace
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
