//! NodeEngine: the Oakestra worker agent. It registers with a cluster orchestrator over the
//! `oak.v1.WorkerRegistry/Session` gRPC stream, reports node resources, and runs service instances
//! as containers on containerd.

pub mod config;
pub mod metrics;
pub mod netmanager;
pub mod runtime;
pub mod session;
pub mod testguest;
pub mod testimage;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
