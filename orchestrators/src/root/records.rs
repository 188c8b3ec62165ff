//! What the root stores: applications, services with their instances, clusters (JSON documents in
//! the redb store), and a service's status derived from its instances.

use oak_proto::v1 as pb;
use oak_proto::InstanceState;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::model::Microservice;

/// An application of a user: its names and the ids of its services.
#[derive(Debug, Clone, Serialize, Deserialize, Default, ToSchema)]
pub struct ApplicationRecord {
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub application_name: String,
    pub application_namespace: String,
    #[serde(default)]
    pub application_desc: String,
    #[serde(rename = "userId")]
    pub user_id: String,
    /// service ids
    pub microservices: Vec<String>,
}

/// One instance of a service: its state and where it runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = Instance)]
pub struct InstanceRecord {
    pub instance_number: u32,
    /// Oakestra status vocabulary
    #[schema(value_type = String)]
    pub status: InstanceState,
    pub status_detail: String,
    pub cluster_id: String,
    pub cluster_name: String,
    pub worker_id: String,
    pub node_name: String,
    pub publicip: String,
    pub logs: String,
    #[schema(value_type = Vec<Object>)]
    pub cpu_history: Vec<Value>,
    #[schema(value_type = Vec<Object>)]
    pub memory_history: Vec<Value>,
    pub exit_code: Option<i32>,
    pub ns_address: String,
    pub ns_address_v6: String,
    /// Clusters that answered "no capacity" for this placement round.
    #[serde(default)]
    #[schema(ignore)]
    pub tried_clusters: Vec<String>,
    #[serde(default)]
    pub undeploying: bool,
    #[serde(default)]
    pub last_modified_ms: u64,
}

impl InstanceRecord {
    /// Instance `instance_number` in `status`, placed nowhere yet.
    pub fn new(instance_number: u32, status: InstanceState) -> Self {
        Self {
            instance_number,
            status,
            status_detail: String::new(),
            cluster_id: String::new(),
            cluster_name: String::new(),
            worker_id: String::new(),
            node_name: String::new(),
            publicip: String::new(),
            logs: String::new(),
            cpu_history: Vec::new(),
            memory_history: Vec::new(),
            exit_code: None,
            ns_address: String::new(),
            ns_address_v6: String::new(),
            tried_clusters: Vec::new(),
            undeploying: false,
            last_modified_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ServiceRecord {
    pub microservice_id: String,
    pub application_id: String,
    pub app_name: String,
    pub app_ns: String,
    pub job_name: String,
    pub user_id: String,
    pub sla: Microservice,
    pub instance_list: Vec<InstanceRecord>,
    pub next_instance: u32,
}

/// A service's status derived from its instances: the state of the instance furthest along, in this order.
pub fn service_status(insts: &[InstanceRecord]) -> (InstanceState, String) {
    use InstanceState::*;
    const ORDER: &[InstanceState] = &[
        Running,
        Created,
        Creating,
        NodeScheduled,
        ClusterScheduled,
        Requested,
        Completed,
        NoWorkerCapacity,
        NoQualifiedWorkerFound,
        TargetClusterNotFound,
        TargetClusterNotActive,
        NoActiveClusterWithCapacity,
        Failed,
        Dead,
        Undeployed,
    ];
    if insts.is_empty() {
        return (Undeployed, "no instance deployed".into());
    }
    let rank = |s: InstanceState| ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len());
    let best = insts.iter().min_by_key(|i| rank(i.status)).expect("non-empty");
    let n_running = insts.iter().filter(|i| i.status == Running).count();
    let detail = if best.status_detail.is_empty() {
        format!("{n_running}/{} instances running", insts.len())
    } else {
        format!(
            "{n_running}/{} instances running; instance {}: {}",
            insts.len(),
            best.instance_number,
            best.status_detail
        )
    };
    (best.status, detail)
}

impl ServiceRecord {
    pub fn spec(&self) -> pb::ServiceSpec {
        self.sla.to_spec(&self.microservice_id, &self.application_id, &self.job_name)
    }
}

/// What a cluster last reported about its workers, summed up.
#[derive(Debug, Clone, Serialize, Deserialize, Default, ToSchema)]
pub struct AggregateRecord {
    pub active_nodes: u32,
    pub total_cpu_cores: u32,
    pub aggregated_cpu_percent: f64,
    pub memory_in_mb: u64,
    pub free_memory_in_mb: u64,
    pub total_gpu_cores: u32,
    pub max_free_cpu_cores: f64,
    pub max_free_memory_mb: u64,
    pub max_free_gpus: u32,
    pub virtualization: Vec<String>,
    pub arch: Vec<String>,
    pub disk_free_mb: u64,
    /// The live workers' network coordinates in one (`oak_proto::vivaldi::summarize`), µs.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub coordinate: Option<oak_proto::vivaldi::Coord>,
    #[serde(default)]
    pub coordinate_radius_us: f64,
}

impl From<&pb::ClusterAggregate> for AggregateRecord {
    fn from(a: &pb::ClusterAggregate) -> Self {
        Self {
            active_nodes: a.active_nodes,
            total_cpu_cores: a.total_cpu_cores,
            aggregated_cpu_percent: a.aggregated_cpu_percent,
            memory_in_mb: a.memory_in_mb,
            free_memory_in_mb: a.free_memory_in_mb,
            total_gpu_cores: a.total_gpu_cores,
            max_free_cpu_cores: a.max_free_cpu_cores,
            max_free_memory_mb: a.max_free_memory_mb,
            max_free_gpus: a.max_free_gpus,
            virtualization: a.virtualization.clone(),
            arch: a.arch.clone(),
            disk_free_mb: a.disk_free_mb,
            coordinate: a.coordinate.as_ref().and_then(oak_proto::vivaldi::Coord::from_pb),
            coordinate_radius_us: a.coordinate_radius_us,
        }
    }
}

impl AggregateRecord {
    pub fn to_pb(&self) -> pb::ClusterAggregate {
        pb::ClusterAggregate {
            active_nodes: self.active_nodes,
            total_cpu_cores: self.total_cpu_cores,
            aggregated_cpu_percent: self.aggregated_cpu_percent,
            memory_in_mb: self.memory_in_mb,
            free_memory_in_mb: self.free_memory_in_mb,
            total_gpu_cores: self.total_gpu_cores,
            max_free_cpu_cores: self.max_free_cpu_cores,
            max_free_memory_mb: self.max_free_memory_mb,
            max_free_gpus: self.max_free_gpus,
            virtualization: self.virtualization.clone(),
            arch: self.arch.clone(),
            disk_free_mb: self.disk_free_mb,
            workers: Vec::new(),
            coordinate: self.coordinate.map(|c| c.to_pb()),
            coordinate_radius_us: self.coordinate_radius_us,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterRecord {
    pub cluster_id: String,
    pub cluster_name: String,
    pub cluster_location: String,
    pub version: String,
    pub aggregate: AggregateRecord,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    /// The join token it joined with (its id).
    #[serde(default)]
    pub joined_with: String,
    /// The address its last session came from, as the root sees it (IPv4 or IPv6).
    #[serde(default)]
    pub ip: String,
}
