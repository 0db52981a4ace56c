//! The meshid contract: the CA's gRPC API, the SPIFFE ID type, and reading a workload's identity out
//! of its certificate, shared by the CA and the sidecar; plus the one I/O adapter both put under their TLS
//! streams ([`io::Coalesce`]). No sockets, no runtime.

pub mod duration;
pub mod identity;
pub mod io;
pub mod process;
pub mod spiffe;

pub use duration::parse_duration;
pub use identity::{CertIdentity, IdentityError, cert_identity_from_der, spiffe_id_from_der};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// Generated gRPC code for `meshid/ca/v1/ca.proto`.
pub mod ca {
    pub mod v1 {
        #![allow(unreachable_pub, clippy::all, clippy::pedantic)]
        tonic::include_proto!("meshid.ca.v1");
    }
}
