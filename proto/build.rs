//! Compiles `sightline/**/*.proto` with protox (no system protoc) and writes the descriptor set that
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "sightline/common/v1/common.proto",
    "sightline/audit/v1/audit.proto",
    "sightline/linker/v1/linker.proto",
    "sightline/consent/v1/consent.proto",
    "sightline/collector/v1/collector.proto",
    "sightline/insights/v1/insights.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("sightline_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
