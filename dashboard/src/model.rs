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
    /// CPU use, percent of one core's time over all cores, as the worker reported it.
    pub cpu_history: Vec<Sample>,
    /// Memory use in bytes.
    pub memory_history: Vec<Sample>,
}

/// A live worker of a cluster (`GET /api/cluster/{id}/workers`, Admin only).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Worker {
    pub node_id: String,
    pub node_name: String,
    pub address: String,
    pub cpu_cores: u32,
    pub cpu_percent: f64,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
    pub disk_free_mb: u64,
    pub gpus: u32,
    pub arch: String,
    pub virtualization: Vec<String>,
    pub location: String,
    pub reserved_cpu: f64,
    pub reserved_memory_mb: u64,
    /// None without a NetManager.
    pub network: Option<WorkerNetwork>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkerNetwork {
    /// `ebpf`, `tun` or `none`.
    pub datapath: String,
    pub subnet: String,
    pub tunnel_endpoint: String,
    /// The non-zero counters: `tun.<event>`, `tun.drop.<reason>`, `ebpf.<counter>`.
    pub counters: std::collections::BTreeMap<String, u64>,
}

impl WorkerNetwork {
    /// Bytes carried so far by the eBPF fast path.
    pub fn ebpf_bytes(&self) -> u64 {
        self.counters.get("ebpf.fast_bytes").copied().unwrap_or(0)
    }

    /// Bytes carried so far through the tun path's tunnel (sent and received).
    pub fn tun_bytes(&self) -> u64 {
        ["tun.tunnel_rx_bytes", "tun.tunnel_tx_bytes"].iter().filter_map(|k| self.counters.get(*k)).sum()
    }
}

/// A piece of an instance's log (`GET /api/service/{id}/instance/{n}/logs`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Logs {
    pub offset: u64,
    pub next_offset: u64,
    pub size: u64,
    pub text: String,
}

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
