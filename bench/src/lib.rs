//! meshid benchmark harness: a load generator (`meshload`), a fixed-response app (`bench-app`) and the
//! orchestrator (`bench-run`) that runs meshid, nginx and haproxy side by side and writes the results.

pub mod benchca;
pub mod chaos;
pub mod load;
pub mod procfs;
pub mod simsidecar;
pub mod stats;
pub mod tlsconf;

pub mod harness;
