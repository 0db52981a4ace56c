//! The live allow-list: the policy model is [`meshid_identity::policy`] (pure parsing and
//! deciding); here a watcher keeps a [`PolicyStore`] in step with the file on disk.

mod reload;
pub mod watch;

pub use meshid_identity::policy::*;
pub use watch::{PolicyStore, PolicyWatcher, ReloadOutcome, watch_policy_file};
