//! meshid's pure identity core, shared by the CA, the injector and the sidecar: the SPIFFE ID type,
//! reading a workload's identity out of its certificate, chain and identity verification for rustls,
//! renewal timing, durations, the allow-list model, revocations and the pod-annotations contract.
//!
//! No runtime, no sockets: every function here is a decision or a parse, tested with certificates
//! made in the test. `scripts/check-layers.sh` fails the build if tokio or hyper ever enter this
//! crate's dependency tree.

pub mod annotations;
pub mod duration;
pub mod identity;
pub mod jwt_svid;
pub mod peer;
pub mod pem;
pub mod policy;
pub mod revocation;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod timing;
pub mod verify;

pub use duration::{format_duration, parse_duration, parse_duration_at_least};
pub use identity::{
    APP_SVID_ARCS, APP_SVID_OID, APP_SVID_VALUE, ATTESTED_AT_ARCS, ATTESTED_AT_OID, CertIdentity,
    IdentityError, LINEAGE_ARCS, LINEAGE_OID, attested_at_from_der, cert_identity_from_der,
    spiffe_id_from_der,
};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
