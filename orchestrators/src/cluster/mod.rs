//! Cluster orchestrator.
pub mod netsvc;
