//! meshid sidecar: holds a workload's identity and enforces who may talk to it.
//!
//! Inbound listeners terminate mTLS, verify the peer's chain against the trust bundle, extract its
//! SPIFFE ID, apply the allow-list, and only then forward to the app on localhost. Outbound listeners
//! take the app's plaintext calls on 127.0.0.1 and originate mTLS to a peer whose identity must be the
//! expected one. Credentials enter through one seam, [`creds::CredentialStore`].

pub mod admin;
pub mod annotations;
pub mod ca_client;
pub mod check;
pub mod config;
pub mod conn;
pub mod creds;
pub mod files;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod run;
pub mod timing;
pub mod upstream;
pub mod verify;
pub mod watch;
