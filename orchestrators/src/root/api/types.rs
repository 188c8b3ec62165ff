//! The JSON documents the REST API reads and answers (Oakestra's shapes, `_id: {"$oid": ...}` included);
//! the OpenAPI document's schemas are derived from these types.

use oak_proto::InstanceState;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::model::Microservice;
use crate::root::records::{AggregateRecord, ApplicationRecord, ClusterRecord, InstanceRecord, ServiceRecord};
use crate::root::service_status;

/// Mongo's id shape, which Oakestra's clients read.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Oid {
    #[serde(rename = "$oid")]
    pub oid: String,
}

impl Oid {
    fn of(id: &str) -> Self {
        Self { oid: id.to_string() }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Login {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Tokens {
    pub token: String,
    pub refresh_token: String,
    pub message: String,
}

/// Every error answer (and some plain answers): what happened, and for a bad request the field at fault.
#[derive(Debug, Serialize, ToSchema)]
pub struct Message {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Message {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), field: None }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// A replicated root (on etcd): "leader" or "follower".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// A replicated root: the leading replica's API, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// The answer to a deploy: a message and the new instance as it stands (the same document as in the
/// service's `instance_list`).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeployAnswer {
    pub message: String,
    #[serde(flatten)]
    pub instance: InstanceRecord,
}

/// An application as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Application)]
pub struct ApplicationDoc {
    #[serde(rename = "_id")]
    pub id: Oid,
    #[serde(flatten)]
    pub record: ApplicationRecord,
}

impl From<&ApplicationRecord> for ApplicationDoc {
    fn from(a: &ApplicationRecord) -> Self {
        Self { id: Oid::of(&a.application_id), record: a.clone() }
    }
}

/// A service as the API shows it: its SLA, where it belongs, its derived status and its instances
/// (Oakestra's job document).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Service)]
pub struct ServiceDoc {
    #[serde(flatten)]
    pub sla: Microservice,
    #[serde(rename = "_id")]
    pub id: Oid,
    #[serde(rename = "microserviceID")]
    pub microservice_id: String,
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub app_name: String,
    pub app_ns: String,
    pub job_name: String,
    pub image: String,
    /// The state of the instance furthest along.
    #[schema(value_type = String)]
    pub status: InstanceState,
    pub status_detail: String,
    #[schema(value_type = Vec<InstanceRecord>)]
    pub instance_list: Vec<Value>,
}

impl ServiceDoc {
    /// As JSON: the service's own `microserviceID` wins over the SLA's copy of the field.
    pub fn json(svc: &ServiceRecord) -> Value {
        let (status, status_detail) = service_status(&svc.instance_list);
        let instance_list = svc
            .instance_list
            .iter()
            .map(|i| {
                let mut v = serde_json::to_value(i).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.remove("tried_clusters");
                }
                v
            })
            .collect();
        let doc = Self {
            sla: svc.sla.clone(),
            id: Oid::of(&svc.microservice_id),
            microservice_id: svc.microservice_id.clone(),
            application_id: svc.application_id.clone(),
            app_name: svc.app_name.clone(),
            app_ns: svc.app_ns.clone(),
            job_name: svc.job_name.clone(),
            image: svc.sla.code.clone(),
            status,
            status_detail,
            instance_list,
        };
        serde_json::to_value(doc).unwrap_or_default()
    }
}

/// Shared with the dashboard, which reads them (one definition: `oak_proto::root_api`).
pub use oak_proto::root_api::{InstanceLogs as LogsDoc, Worker as WorkerDoc};

/// A cluster as the API shows it: its last aggregate and whether its session is live.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Cluster)]
pub struct ClusterDoc {
    #[serde(flatten)]
    pub aggregate: AggregateRecord,
    #[serde(rename = "_id")]
    pub id: Oid,
    pub cluster_id: String,
    pub cluster_name: String,
    pub cluster_location: String,
    pub version: String,
    /// The address the cluster's session comes from, as the root sees it (IPv4 or IPv6; an IPv4 cluster
    /// reaching a `[::]` listener is shown as IPv4).
    pub ip: String,
    pub active: bool,
    pub registered_ms: u64,
    /// Seconds since the Unix epoch.
    pub last_modified_timestamp: f64,
}

impl ClusterDoc {
    pub fn new(c: ClusterRecord, active: bool) -> Self {
        Self {
            aggregate: c.aggregate,
            id: Oid::of(&c.cluster_id),
            cluster_id: c.cluster_id,
            cluster_name: c.cluster_name,
            cluster_location: c.cluster_location,
            version: c.version,
            ip: c.ip,
            active,
            registered_ms: c.registered_ms,
            last_modified_timestamp: c.last_seen_ms as f64 / 1000.0,
        }
    }
}
