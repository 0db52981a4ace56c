//! The meshid contract: the CA's gRPC API (`meshid/ca/v1/ca.proto`) and the SPIFFE Workload API the
//! sidecar serves to apps (`spiffe/workload/workload.proto`), compiled at build time with
//! protox (no `protoc` needed). Generated code only, and the codec it uses: the types that give its
//! strings meaning (SPIFFE IDs, certificate identities) live in `meshid-identity`.

/// Generated gRPC code for `meshid/ca/v1/ca.proto`.
pub mod ca {
    pub mod v1 {
        #![allow(unreachable_pub, clippy::all, clippy::pedantic)]
        tonic::include_proto!("meshid.ca.v1");
    }
}

/// Generated gRPC code for `spiffe/workload/workload.proto`: the SPIFFE Workload API (no protobuf
/// package, as the specification has it).
pub mod workload {
    #![allow(unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("_");
}

pub mod codec;

/// The protobuf well-known types the Workload API uses (`google.protobuf.Struct` for JWT claims).
pub use prost_types;
