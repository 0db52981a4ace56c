//! Credentials: the one store every listener reads ([`CredentialStore`]), and the sources that feed
//! it through [`CredentialStore::set_certificate`]: PEM files ([`files`]) or the meshid CA ([`ca`],
//! over [`ca_client`]).

pub mod ca;
pub mod ca_client;
pub mod files;
mod store;

pub use store::*;
