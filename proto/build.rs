//! Compiles `meshid/ca/v1/ca.proto` and `spiffe/workload/workload.proto` with protox (a pure-Rust
//! protobuf compiler: no `protoc` needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["meshid/ca/v1/ca.proto", "spiffe/workload/workload.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small initial buffers for every call (see src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
