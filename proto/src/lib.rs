//! Wire contracts and the vocabulary every tier shares: generated gRPC types (one module per protobuf
//! package), the NodeEngine ↔ NetManager JSON contract, instance keys and states, architecture names, control-plane addresses.

pub mod arch;
pub mod endpoint;
pub mod instance;
pub mod netmanager_api;
pub mod ports;
pub mod root_api;
pub mod vivaldi;

pub use instance::{instance_key, InstanceKey, InstanceState};

/// Control plane: root <-> cluster <-> worker sessions.
#[allow(clippy::large_enum_variant)] // generated: the session oneofs carry whole specs by value
pub mod v1 {
    tonic::include_proto!("oak.v1");
}

/// Overlay address management: root service manager and cluster network service.
pub mod net {
    #[allow(clippy::large_enum_variant)] // generated
    pub mod v1 {
        tonic::include_proto!("oak.net.v1");
    }
}

/// Joining the control plane: join tokens for client certificates.
pub mod trust {
    pub mod v1 {
        tonic::include_proto!("oak.trust.v1");
    }
}

/// Milliseconds since the Unix epoch, the timestamp unit used on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
