//! Test support for meshid: a fake cluster token issuer and API server, certificate fixtures, an
//! in-process CA, and helpers to run the real binaries and outside tools.

pub mod ca;
pub mod fake_apiserver;
pub mod fake_cluster;
pub mod kubelet;
pub mod mesh;
pub mod pki;
pub mod process;
pub mod rotation_cli;
pub mod tools;
