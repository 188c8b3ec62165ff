//! NetManager library: configuration, local API, control-plane client, instance wiring and datapaths.

pub mod tables;
