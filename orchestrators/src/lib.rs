//! Root and cluster orchestrators. The binaries in `src/bin/` only parse flags and call into here.

pub mod cluster;
pub mod latency;
pub mod model;
mod persisted;
pub mod root;
pub mod session;
pub mod simworker;
pub mod task;
pub mod telemetry;
pub mod testing;
pub mod tokens_cli;
