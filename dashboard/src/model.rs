//! The root's documents as the dashboard reads them (the root's OpenAPI schemas `Cluster`, `Application`,
//! `Service`, `Instance`): only the fields shown, each with a default, so a field the root adds or leaves
//! out does not break a page.

use serde::Deserialize;
use serde_json::Value;

use crate::root_api::ApiFailure;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Cluster {
    pub cluster_id: String,
    pub cluster_name: String,
    pub cluster_location: String,
    pub active: bool,
    pub active_nodes: u64,
    pub total_cpu_cores: u64,
    /// Mean CPU use of the cluster's workers, percent.
    pub aggregated_cpu_percent: f64,
    pub memory_in_mb: u64,
    pub free_memory_in_mb: u64,
    pub arch: Vec<String>,
    pub virtualization: Vec<String>,
    pub ip: String,
    /// Seconds since the Unix epoch.
    pub last_modified_timestamp: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Application {
    #[serde(rename = "applicationID")]
    pub id: String,
    pub application_name: String,
    pub application_namespace: String,
    pub application_desc: String,
    pub microservices: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Service {
    #[serde(rename = "microserviceID")]
    pub id: String,
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub microservice_name: String,
    pub microservice_namespace: String,
    pub app_name: String,
    pub image: String,
    pub virtualization: String,
    pub memory: Value,
    pub vcpus: Value,
    pub cmd: Vec<String>,
    pub status: String,
    pub status_detail: String,
    /// The service IPs (round-robin and closest), given at creation.
    pub addresses: Addresses,
    pub instance_list: Vec<Instance>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Addresses {
    pub rr_ip: String,
    pub closest_ip: String,
}

/// One sample of an instance's use, as its worker reported it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub timestamp: f64,
    pub value: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub instance_number: u32,
    pub status: String,
    pub status_detail: String,
    pub cluster_name: String,
    pub node_name: String,
    pub ns_address: String,
    pub publicip: String,
    pub exit_code: Option<i32>,
    /// The tail of the instance's output as of its last state change (the NodeEngine sends it then).
    pub logs: String,
    pub undeploying: bool,
    /// CPU use in percent of one core (more than 100 on several cores), as the worker sampled it.
    pub cpu_history: Vec<Sample>,
    /// Memory use in bytes.
    pub memory_history: Vec<Sample>,
}

/// The root's worker and log documents: one definition, shared with the root.
pub use oak_proto::root_api::{InstanceLogs as Logs, Worker, WorkerNetwork};

/// `v` as `T`, or a failure saying the root's answer was not understood.
pub fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, ApiFailure> {
    serde_json::from_value(v).map_err(|e| ApiFailure::Answer {
        status: 502,
        message: format!("the root's {what} answer is not understood: {e}"),
        field: None,
    })
}

/// The lifecycle states (Oakestra's names, as the root writes them), as CSS classes: done (green), failed (red), going (amber).
pub fn state_class(status: &str) -> &'static str {
    match status {
        "RUNNING" => "ok",
        "FAILED"
        | "DEAD"
        | "NO_WORKER_CAPACITY"
        | "NO_QUALIFIED_WORKER_FOUND"
        | "TargetClusterNotFound"
        | "TargetClusterNotActive"
        | "NoActiveClusterWithCapacity" => "bad",
        "COMPLETED" | "UNDEPLOYED" => "done",
        _ => "going",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_document_with_instances() {
        let v = serde_json::json!({"microserviceID": "s1", "applicationID": "a1", "microservice_name": "web",
            "memory": 64, "cmd": ["httpd"], "status": "RUNNING", "unknown_field": 1,
            "instance_list": [{"instance_number": 0, "status": "FAILED", "status_detail": "image not found",
                "exit_code": null, "logs": "boom"}]});
        let s: Service = parse(v, "service").unwrap();
        assert_eq!((s.id.as_str(), s.application_id.as_str(), s.microservice_name.as_str()), ("s1", "a1", "web"));
        assert_eq!(s.instance_list[0].status_detail, "image not found");
        assert_eq!(s.instance_list[0].logs, "boom");
        let bad = parse::<Vec<Cluster>>(serde_json::json!({"not": "a list"}), "clusters").unwrap_err();
        assert!(bad.to_string().contains("clusters answer is not understood"), "{bad}");
    }

    #[test]
    fn states_by_outcome() {
        assert_eq!(state_class("RUNNING"), "ok");
        assert_eq!(state_class("FAILED"), "bad");
        assert_eq!(state_class("CLUSTER_SCHEDULED"), "going");
    }
}
