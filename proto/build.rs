//! Compiles the protobuf definitions with a vendored `protoc`, so a bare `cargo build` works.

#![allow(unsafe_code)]

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts run single threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=nightshift/v1");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("nightshift_descriptor.bin"))
        .compile_protos(
            &["nightshift/v1/task.proto", "nightshift/v1/jobs.proto"],
            &["."],
        )?;
    Ok(())
}
