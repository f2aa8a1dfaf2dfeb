//! Compiles `proto/kvset/v1/*.proto` in pure Rust (protox), so no `protoc` is needed on any
//! machine, writes the encoded descriptor set for gRPC server reflection, and generates the
//! tonic client and server code.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["kvset/v1/kv.proto", "kvset/v1/cluster.proto", "kvset/v1/raft.proto"];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let fds = protox::compile(files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kvset_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
