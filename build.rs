//! Generates the gRPC code and the descriptor set (for server reflection) from `proto/`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/portcullis/v1/common.proto",
    "proto/portcullis/v1/auth.proto",
    "proto/portcullis/v1/session.proto",
    "proto/portcullis/v1/password.proto",
    "proto/portcullis/v1/account.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A fresh machine needs no system protoc.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("portcullis_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;

    // tonic-prost-build does not emit these itself.
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
