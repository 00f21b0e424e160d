//! Compiles `proto/sockscope/v1/*.proto` with protox (no protoc needed) and
//! writes the file descriptor set (with the imported google/protobuf files)
//! that server reflection serves; and the client of the container runtime's
//! CRI subset, `proto/cri/runtime.proto`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_dir.join("sockscope/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("sockscope_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    // The generated server side serves the relay; the daemon's own service
    // is hand-written (flows go out pre-encoded).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The container runtime's CRI subset: a client only, not served by
    // reflection.
    let cri = protox::compile([proto_dir.join("cri/runtime.proto")], [&proto_dir])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(cri)?;
    Ok(())
}
