//! Credentials: the one store every listener reads ([`CredentialStore`]), and the sources that feed
//! it through [`CredentialStore::set_certificate`]: PEM files ([`files`]) or the meshid CA ([`ca`],
//! over [`ca_client`]); and the app's own SVID for the Workload API ([`app_svid`]).

pub mod app_svid;
pub mod bundle_cache;
pub mod ca;
pub mod ca_client;
pub mod files;
pub mod jwt_svid;
mod store;

pub use app_svid::AppSvid;
pub use store::*;
