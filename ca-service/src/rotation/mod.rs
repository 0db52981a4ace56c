//! Restart-free CA rotation for platform teams: prepare (new root joins the bundle), activate (the CA
//! signs with it), retire (the old root leaves the bundle), each step refusing until the previous one
//! has measurably converged. The state lives in the CA directory ([`crate::authorities`]); running
//! CAs follow it.
//!
//! [`fleet`] measures (sidecars, acknowledgements, issuance), [`view`] turns that into a
//! [`report`], [`gates`] decides on a report, and [`commands`] are the steps an operator runs.

pub mod commands;
pub mod fleet;
pub mod gates;
pub mod report;
pub mod view;

pub use commands::{
    RotateError, activate, fetch_reports, intermediate, nothing_to_activate, nothing_to_retire,
    prepare, prepare_above, prepare_measured, retire, status,
};
pub use fleet::{Fleet, IssuedView};
pub use gates::{activate_blockers, retire_blockers, unknown_sidecars};
pub use report::{AuthorityView, CaProcess, RotationReport, SidecarReport};
pub use view::report;
