//! The instance vocabulary every tier shares: an instance's key and its lifecycle state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One instance of a service: `service_id/instance_number`, the key root, cluster, NodeEngine and
/// NetManager all file it under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    pub service_id: String,
    pub instance_number: u32,
}

impl InstanceKey {
    pub fn new(service_id: impl Into<String>, instance_number: u32) -> Self {
        Self { service_id: service_id.into(), instance_number }
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service_id, self.instance_number)
    }
}

/// A text that is not `service_id/instance_number`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance key {0:?}: expected service_id/instance_number")]
pub struct BadInstanceKey(pub String);

impl FromStr for InstanceKey {
    type Err = BadInstanceKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadInstanceKey(s.to_string());
        let (sid, n) = s.rsplit_once('/').ok_or_else(bad)?;
        if sid.is_empty() {
            return Err(bad());
        }
        Ok(Self::new(sid, n.parse().map_err(|_| bad())?))
    }
}

/// The key of instance `instance_number` of `service_id` as text (`service_id/instance_number`).
pub fn instance_key(service_id: &str, instance_number: u32) -> String {
    InstanceKey::new(service_id, instance_number).to_string()
}

macro_rules! states {
    ($($(#[$doc:meta])* $v:ident = $wire:literal,)*) => {
        /// An instance's lifecycle state, written on the wire (gRPC `status` fields, the REST API's
        /// `status`) with Oakestra's exact names, which Oakestra's CLI parses.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum InstanceState {
            $($(#[$doc])* #[serde(rename = $wire)] $v,)*
        }

        impl InstanceState {
            /// Every state, in declaration order.
            pub const ALL: &'static [InstanceState] = &[$(InstanceState::$v,)*];

            /// Oakestra's name for the state.
            pub const fn as_str(self) -> &'static str {
                match self { $(InstanceState::$v => $wire,)* }
            }
        }

        impl FromStr for InstanceState {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s { $($wire => Ok(InstanceState::$v),)* _ => Err(UnknownState(s.to_string())) }
            }
        }
    };
}

states! {
    /// Accepted by the root, not yet placed on a cluster.
    Requested = "REQUESTED",
    /// Placed on a cluster, waiting for its scheduler.
    ClusterScheduled = "CLUSTER_SCHEDULED",
    /// Placed on a worker, waiting for its NodeEngine.
    NodeScheduled = "NODE_SCHEDULED",
    /// The NodeEngine is fetching the image and creating the instance.
    Creating = "CREATING",
    /// Created, not yet started.
    Created = "CREATED",
    /// Running.
    Running = "RUNNING",
    /// A one-shot instance that exited 0.
    Completed = "COMPLETED",
    /// Could not be created or exited with an error; the detail says why.
    Failed = "FAILED",
    /// Its worker or its process is gone.
    Dead = "DEAD",
    /// Removed on request.
    Undeployed = "UNDEPLOYED",
    /// No worker of the chosen cluster has the capacity (the guide's `NoResourcesAvailable`).
    NoWorkerCapacity = "NO_WORKER_CAPACITY",
    /// No worker of the chosen cluster matches the SLA (the guide's `NoResourcesAvailable`).
    NoQualifiedWorkerFound = "NO_QUALIFIED_WORKER_FOUND",
    /// The SLA names a cluster the root does not know (the guide's `NoTargetCluster`).
    TargetClusterNotFound = "TargetClusterNotFound",
    /// The SLA names a cluster that is not connected (the guide's `NoTargetCluster`).
    TargetClusterNotActive = "TargetClusterNotActive",
    /// No connected cluster has the capacity (the guide's `NoResourcesAvailable`).
    NoActiveClusterWithCapacity = "NoActiveClusterWithCapacity",
}

/// A state name that is none of Oakestra's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown instance state {0:?}")]
pub struct UnknownState(pub String);

impl InstanceState {
    /// The instance no longer runs and will not by itself: it needs a new deploy to run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Dead | Self::Undeployed)
    }

    /// Placement failed: the root or the cluster found nowhere to run it.
    pub fn is_unplaced(self) -> bool {
        matches!(
            self,
            Self::NoWorkerCapacity
                | Self::NoQualifiedWorkerFound
                | Self::TargetClusterNotFound
                | Self::TargetClusterNotActive
                | Self::NoActiveClusterWithCapacity
        )
    }

    /// Placed on a worker and on its way to running (or running).
    pub fn is_placed(self) -> bool {
        matches!(self, Self::NodeScheduled | Self::Creating | Self::Created | Self::Running)
    }

    /// Parses a wire name, `None` for anything that is not one of Oakestra's states.
    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for InstanceState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for InstanceState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for InstanceState {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_rejects_garbage() {
        let k = InstanceKey::new("65f0c0ffee", 3);
        assert_eq!(k.to_string(), "65f0c0ffee/3");
        assert_eq!("65f0c0ffee/3".parse::<InstanceKey>().unwrap(), k);
        assert_eq!(instance_key("a", 0), "a/0");
        for bad in ["", "a", "/3", "a/", "a/x", "a/-1"] {
            assert!(bad.parse::<InstanceKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn states_use_oakestras_names_on_the_wire() {
        for s in InstanceState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
            assert_eq!(s.as_str().parse::<InstanceState>().unwrap(), *s);
        }
        assert_eq!(InstanceState::NodeScheduled.as_str(), "NODE_SCHEDULED");
        assert_eq!(InstanceState::TargetClusterNotFound.to_string(), "TargetClusterNotFound");
        assert!("running".parse::<InstanceState>().is_err());
        assert!(InstanceState::Failed.is_terminal() && !InstanceState::Running.is_terminal());
        assert!(InstanceState::NoWorkerCapacity.is_unplaced() && !InstanceState::Requested.is_unplaced());
    }
}
