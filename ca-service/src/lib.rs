//! meshid certificate authority: authenticates workloads and issues short-lived SPIFFE X.509
//! certificates over gRPC.
//!
//! The binary `meshid-ca` is a thin shell over [`cli`] and [`server`].

pub mod admin;
pub mod admin_token;
pub mod arrivals;
pub mod audit;
pub mod auth;
pub mod authorities;
pub mod authority;
pub mod ca_dir;
pub mod check;
pub mod cli;
pub mod csr;
pub mod issued;
pub mod k8s_secret;
pub mod metrics;
pub mod ratelimit;
pub mod revocations;
pub mod rotation;
pub mod serial;
pub mod server;
pub mod service;
pub mod signer;
pub mod tls;
pub mod webhook_cert;

pub use server::{RunningCa, ServeConfig, start};
