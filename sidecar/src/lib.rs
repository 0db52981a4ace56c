//! meshid sidecar: holds a workload's identity and enforces who may talk to it.
//!
//! Settings are typed once at the edge ([`cli`] → [`settings`]). Credentials enter through one seam,
//! [`creds::CredentialStore`], fed by PEM files or the CA. Inbound listeners terminate mTLS, take
//! the peer identity the verifier established, and ask the one authorization point
//! ([`inbound::authz`]) before anything reaches the app on localhost. Outbound listeners take the
//! app's plaintext calls on 127.0.0.1 and originate mTLS to a peer whose identity must be the
//! expected one. Both directions run TLS through [`tls`] (rustls's unbuffered API: an idle
//! connection holds no TLS buffer). The policy model itself is pure and lives in
//! `meshid-identity`; [`policy`] keeps it in step with the file on disk. The app can also ask for
//! an identity of its own on the SPIFFE Workload API ([`workload_api`]).

pub mod admin;
mod bare;
pub mod check;
pub mod cli;
pub mod conn;
pub mod creds;
pub mod decisions;
pub mod form;
pub mod http;
pub mod idle;
pub mod inbound;
pub mod metrics;
pub mod observed;
pub mod outbound;
pub mod policy;
pub mod run;
pub mod settings;
pub mod streams;
pub mod tls;
pub mod trace;
pub mod watch;
pub mod workload_api;
