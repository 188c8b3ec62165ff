//! Cluster orchestrator.
