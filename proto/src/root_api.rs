//! Documents of the root's REST API that more than one crate reads: the root writes them, the dashboard
//! reads them. One definition each, so the two cannot drift (the OpenAPI schema comes from the same types,
//! with the `openapi` feature).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A worker of a cluster, as its cluster last reported it (`GET /api/cluster/{id}/workers`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Worker {
    pub node_id: String,
    pub node_name: String,
    /// The worker's address as its cluster sees it.
    pub address: String,
    pub cpu_cores: u32,
    /// Used now, 0..100 over all cores.
    pub cpu_percent: f64,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
    pub disk_free_mb: u64,
    pub gpus: u32,
    pub arch: String,
    pub virtualization: Vec<String>,
    pub location: String,
    /// vcpus and memory asked for by the instances placed there.
    pub reserved_cpu: f64,
    pub reserved_memory_mb: u64,
    /// The overlay as the worker's NetManager reports it; null without a NetManager.
    pub network: Option<WorkerNetwork>,
    /// `live`, or `lost`: silent past its cluster's heartbeat timeout and not yet removed (its resources
    /// are what it reported last).
    pub state: String,
    /// When its last heartbeat came (ms since the epoch).
    pub last_report_ms: u64,
}

/// A worker's overlay as its NetManager reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct WorkerNetwork {
    /// `ebpf` (the fast path; the tun path for the rest), `tun`, or `none`.
    pub datapath: String,
    pub subnet: String,
    pub tunnel_endpoint: String,
    /// Non-zero counters: `tun.<event>`, `tun.drop.<reason>`, `ebpf.<counter>`.
    pub counters: BTreeMap<String, u64>,
    /// The worker's Vivaldi coordinate (µs; see `oak_proto::vivaldi`), from its probes to other workers;
    /// null until its NetManager reports one.
    pub coordinate: Option<Coordinate>,
}

/// A Vivaldi network coordinate: the distance between two workers' predicts the RTT between them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Coordinate {
    pub position: Vec<f64>,
    pub height: f64,
    /// Relative error of its predictions, 0..1 (1: no measurement yet).
    pub error: f64,
}

impl WorkerNetwork {
    /// Bytes carried so far by the eBPF fast path (each packet once: delivered here or sent to a worker).
    pub fn ebpf_bytes(&self) -> u64 {
        self.counters.get("ebpf.fast_bytes").copied().unwrap_or(0)
    }

    /// Bytes carried so far by the tun path, each packet once, where it entered: from local instances (read
    /// from the tun) or from other workers (received through the tunnel).
    pub fn tun_bytes(&self) -> u64 {
        ["tun.tun_rx_bytes", "tun.tunnel_rx_bytes"].iter().filter_map(|k| self.counters.get(*k)).sum()
    }
}

impl From<crate::v1::WorkerSummary> for Worker {
    fn from(w: crate::v1::WorkerSummary) -> Self {
        let r = w.resources.unwrap_or_default();
        Self {
            node_id: w.node_id,
            node_name: w.node_name,
            address: w.address,
            cpu_cores: r.cpu_cores,
            cpu_percent: r.cpu_percent,
            memory_total_mb: r.memory_total_mb,
            memory_free_mb: r.memory_free_mb,
            disk_free_mb: r.disk_free_mb,
            gpus: r.gpus.len() as u32,
            arch: crate::arch::normalize(&r.arch),
            virtualization: r.virtualization,
            location: r.location,
            reserved_cpu: w.reserved_cpu,
            reserved_memory_mb: w.reserved_memory_mb,
            network: r.network.map(|n| WorkerNetwork {
                datapath: n.datapath,
                subnet: n.subnet,
                tunnel_endpoint: n.tunnel_endpoint,
                counters: n.counters.into_iter().collect(),
                coordinate: n.coordinate.map(|c| Coordinate { position: c.position, height: c.height, error: c.error }),
            }),
            state: w.state,
            last_report_ms: w.last_report_ms,
        }
    }
}

/// A piece of an instance's log (`GET /api/service/{id}/instance/{n}/logs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct InstanceLogs {
    pub service_id: String,
    pub instance_number: u32,
    /// Where `text` starts in the log.
    pub offset: u64,
    /// Where to ask from next to follow the log (`offset` + the bytes returned).
    pub next_offset: u64,
    /// The log's size now.
    pub size: u64,
    /// The bytes, decoded as UTF-8 (invalid sequences replaced).
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_summary_becomes_the_api_document_and_reads_back() {
        let s = crate::v1::WorkerSummary {
            node_name: "w1".into(),
            resources: Some(crate::v1::NodeResources {
                arch: "x86_64".into(),
                network: Some(crate::v1::WorkerNetwork {
                    datapath: "ebpf".into(),
                    counters: [
                        ("ebpf.fast_bytes", 10),
                        ("tun.tun_rx_bytes", 5),
                        ("tun.tunnel_rx_bytes", 2),
                        // sent on: counted where it entered
                        ("tun.tunnel_tx_bytes", 7),
                    ]
                    .map(|(k, v)| (k.to_string(), v))
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let w = Worker::from(s);
        assert_eq!(w.arch, "amd64");
        let n = w.network.as_ref().unwrap();
        assert_eq!((n.ebpf_bytes(), n.tun_bytes()), (10, 7));
        let back: Worker = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back.network.unwrap().counters.len(), 4);
        // a document from an older root, without the overlay: read with defaults
        let old: Worker = serde_json::from_str(r#"{"node_name": "w0"}"#).unwrap();
        assert!(old.network.is_none() && old.cpu_cores == 0);
    }
}
