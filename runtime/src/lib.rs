//! What every meshid process shares around its real work: connection admission at the listeners'
//! caps, process setup (logs, signals, the usage
//! exit code), the one admin HTTP server (probes, `/metrics`, JSON endpoints), one small HTTP client
//! on hyper, HTTP/1.1 response framing without I/O ([`h1`]), the accept loop, write coalescing under TLS streams, wall-clock helpers, and futures
//! polled only when they were woken ([`wake::WhenWoken`]).
//!
//! Holds no identity or policy logic: that is `meshid-identity`'s.

pub mod admin;
pub mod admission;
pub mod body;
pub mod cli;
pub mod exposition;
pub mod file;
pub mod h1;
pub mod heap;
pub mod http_client;
pub mod io;
pub mod log_limit;
pub mod math;
pub mod net;
pub mod process;
pub mod time;
pub mod volume;
pub mod wake;

pub use process::EXIT_USAGE;
