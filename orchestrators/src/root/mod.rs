//! Root orchestrator.
