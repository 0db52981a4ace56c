//! meshid sidecar: holds a workload's identity and enforces who may talk to it.
//!
//! This release has the CA client; the data plane (mTLS in and out, allow-lists) and the identity
//! lifecycle (renewal, bundle following) come next.

pub mod ca_client;
