//! Compiles `sightline/**/*.proto` with protox (no system protoc) and writes the descriptor set that
//! reflection serves, custom options included.

use std::path::PathBuf;

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
    let mut compiler = protox::Compiler::new(["."])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded through reflection so the custom field options (data classes) are kept: reflection
    // clients and `sightline_proto::classes` read them.
    std::fs::write(
        out_dir.join("sightline_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
