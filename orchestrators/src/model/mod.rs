//! Oakestra SLA v2.0: the serde types are the one schema (the REST API parses with them and the OpenAPI
//! document is derived from them), plus the conversion to the wire spec. Parsing and the semantic checks
//! live in [`parse`]. Pure types and functions, so the cluster orchestrator can use them too.

mod parse;

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::ToSchema;

pub use parse::{is_name, parse_sla, validate, validate_service, SlaError, MAX_ARRAY, MAX_STRING, NAME_RULE};

/// The SLA versions accepted.
pub const SLA_VERSIONS: [&str; 1] = ["v2.0"];
/// The virtualizations a microservice may ask for.
pub const VIRTUALIZATIONS: [&str; 3] = ["container", "unikernel", "microvm"];
/// The constraint types an SLA may use.
pub const CONSTRAINT_TYPES: [&str; 5] = ["direct", "latency", "geo", "clusters", "addons"];

fn one_of(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values.iter().copied()))
}
fn sla_version_schema() -> ObjectBuilder {
    one_of(&SLA_VERSIONS)
}
fn virtualization_schema() -> ObjectBuilder {
    one_of(&VIRTUALIZATIONS)
}
fn constraint_type_schema() -> ObjectBuilder {
    one_of(&CONSTRAINT_TYPES)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
pub struct Sla {
    #[schema(schema_with = sla_version_schema)]
    pub sla_version: String,
    #[serde(rename = "customerID", default)]
    pub customer_id: String,
    pub applications: Vec<Application>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
#[schema(as = SlaApplication)]
pub struct Application {
    #[serde(rename = "applicationID", default)]
    pub application_id: String,
    #[schema(pattern = "^[a-zA-Z0-9]{1,30}$")]
    pub application_name: String,
    #[schema(pattern = "^[a-zA-Z0-9]{1,30}$")]
    pub application_namespace: String,
    #[serde(default)]
    pub application_desc: String,
    #[serde(default)]
    pub microservices: Vec<Microservice>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
pub struct Microservice {
    #[serde(rename = "microserviceID", default)]
    pub microservice_id: String,
    #[schema(pattern = "^[a-zA-Z0-9]{1,30}$")]
    pub microservice_name: String,
    #[schema(pattern = "^[a-zA-Z0-9]{1,30}$")]
    pub microservice_namespace: String,
    #[schema(schema_with = virtualization_schema)]
    pub virtualization: String,
    /// image reference or unikernel .tar.gz
    pub code: String,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// KEY=VALUE
    #[serde(default)]
    pub environment: Vec<String>,
    #[serde(default)]
    pub arch: Vec<String>,
    /// MB
    #[serde(default, deserialize_with = "parse::uint")]
    pub memory: u64,
    #[serde(default)]
    pub vcpus: f64,
    #[serde(default, deserialize_with = "parse::uint")]
    pub vgpus: u32,
    #[serde(default, deserialize_with = "parse::uint")]
    pub vtpus: u32,
    #[serde(default, deserialize_with = "parse::uint")]
    pub storage: u64,
    #[serde(default, deserialize_with = "parse::uint")]
    pub bandwidth_in: u64,
    #[serde(default, deserialize_with = "parse::uint")]
    pub bandwidth_out: u64,
    /// host:container[/tcp|udp];...
    #[serde(default)]
    pub port: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub added_files: Vec<String>,
    #[serde(default)]
    pub one_shot: bool,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub addresses: Addresses,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Oakestra's service-to-service constraints: latency to the service this one talks to.
    #[serde(default)]
    pub connectivity: Vec<Connectivity>,
}

/// A constraint on the network between this service and a target service (Oakestra's `connectivity`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
pub struct Connectivity {
    /// The target: its microservice id, or its `microservice_name` within the same application.
    #[serde(default)]
    pub target_microservice_id: String,
    /// `latency` constraints (threshold: the RTT in ms to the target's nearest instance).
    #[serde(default)]
    pub con_constraints: Vec<Constraint>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
pub struct Addresses {
    #[serde(default)]
    pub rr_ip: String,
    #[serde(default)]
    pub rr_ip_v6: String,
    #[serde(default)]
    pub closest_ip: String,
    #[serde(default)]
    pub closest_ip_v6: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, ToSchema)]
pub struct Constraint {
    #[serde(rename = "type")]
    #[schema(schema_with = constraint_type_schema)]
    pub kind: String,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub area: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub threshold: f64,
    #[serde(default)]
    pub rigidness: f64,
    #[serde(default, deserialize_with = "parse::uint")]
    pub convergence_time: u64,
    #[serde(default)]
    pub allowed: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
}

impl Microservice {
    /// `app.appns.svc.svcns`
    pub fn job_name(&self, app: &str, app_ns: &str) -> String {
        format!("{app}.{app_ns}.{}.{}", self.microservice_name, self.microservice_namespace)
    }

    /// Wire form handed to clusters and workers.
    pub fn to_spec(&self, service_id: &str, application_id: &str, job_name: &str) -> oak_proto::v1::ServiceSpec {
        use oak_proto::v1 as pb;
        pb::ServiceSpec {
            service_id: service_id.to_string(),
            job_name: job_name.to_string(),
            application_id: application_id.to_string(),
            virtualization: self.virtualization.clone(),
            code: self.code.clone(),
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            environment: self.environment.clone(),
            arch: self.arch.clone(),
            memory_mb: self.memory,
            vcpus: self.vcpus,
            vgpus: self.vgpus,
            storage_mb: self.storage,
            port: self.port.clone(),
            one_shot: self.one_shot,
            privileged: self.privileged,
            constraints: self
                .constraints
                .iter()
                .map(|c| pb::Constraint {
                    r#type: c.kind.clone(),
                    cluster: c.cluster.clone(),
                    node: c.node.clone(),
                    area: c.area.clone(),
                    location: c.location.clone(),
                    threshold: c.threshold,
                    rigidness: c.rigidness,
                    convergence_time: c.convergence_time,
                    allowed: c.allowed.clone(),
                    needs: c.needs.clone(),
                })
                .collect(),
            addresses: Some(pb::ServiceAddresses {
                rr_ip: self.addresses.rr_ip.clone(),
                rr_ip_v6: self.addresses.rr_ip_v6.clone(),
                closest_ip: self.addresses.closest_ip.clone(),
                closest_ip_v6: self.addresses.closest_ip_v6.clone(),
            }),
            latency: Vec::new(),
            bandwidth_in_kbps: self.bandwidth_in,
            bandwidth_out_kbps: self.bandwidth_out,
            added_files: self.added_files.clone(),
        }
    }
}
