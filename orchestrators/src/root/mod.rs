//! Root orchestrator: REST API (axum), cluster registry (tonic), redb store, root scheduler.

pub mod api;
pub mod auth;
pub mod grpc;
pub mod netsvc;
pub mod openapi;
pub mod scheduler;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use oak_proto::v1 as pb;
use oak_proto::InstanceState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::model::Microservice;
use auth::Auth;
use scheduler::{ClusterView, Unplaced};
use store::{Store, Tx, CLUSTERS, SERVICES};

/// Root orchestrator settings (see the binary's `--help`).
#[derive(Debug, Clone)]
pub struct Config {
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Service manager (overlay address management for clusters), Oakestra's port 10099.
    pub netsvc_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_password: Option<String>,
    pub cluster_stale: Duration,
    pub retry_interval: Duration,
    /// Aggregate report interval told to clusters in ClusterWelcome.
    pub report_interval_ms: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ApplicationRecord {
    #[serde(rename = "applicationID")]
    pub application_id: String,
    pub application_name: String,
    pub application_namespace: String,
    #[serde(default)]
    pub application_desc: String,
    #[serde(rename = "userId")]
    pub user_id: String,
    pub microservices: Vec<String>,
}

impl ApplicationRecord {
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["_id"] = json!({"$oid": self.application_id});
        v
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_number: u32,
    pub status: InstanceState,
    pub status_detail: String,
    pub cluster_id: String,
    pub cluster_name: String,
    pub worker_id: String,
    pub node_name: String,
    pub publicip: String,
    pub logs: String,
    pub cpu_history: Vec<Value>,
    pub memory_history: Vec<Value>,
    pub exit_code: Option<i32>,
    pub ns_address: String,
    pub ns_address_v6: String,
    /// Clusters that answered "no capacity" for this placement round.
    #[serde(default)]
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

const HISTORY: usize = 100;

/// The part of a detail that records what clusters reported ("cluster 'x' reported ..."), kept across
/// capacity-change retries so the user still sees why earlier clusters refused.
fn previous_refusals(detail: &str) -> String {
    let Some(r) = detail.find(" reported ") else { return String::new() };
    detail[..r].rfind("cluster '").map(|p| detail[p..].to_string()).unwrap_or_default()
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

    /// The JSON document the API answers (Oakestra's job document shape).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.sla).unwrap_or_default();
        let (status, detail) = service_status(&self.instance_list);
        let insts: Vec<Value> = self
            .instance_list
            .iter()
            .map(|i| {
                let mut iv = serde_json::to_value(i).unwrap_or_default();
                if let Some(o) = iv.as_object_mut() {
                    o.remove("tried_clusters");
                }
                iv
            })
            .collect();
        let o = v.as_object_mut().expect("object");
        o.insert("_id".into(), json!({"$oid": self.microservice_id}));
        o.insert("microserviceID".into(), json!(self.microservice_id));
        o.insert("applicationID".into(), json!(self.application_id));
        o.insert("app_name".into(), json!(self.app_name));
        o.insert("app_ns".into(), json!(self.app_ns));
        o.insert("job_name".into(), json!(self.job_name));
        o.insert("image".into(), json!(self.sla.code));
        o.insert("status".into(), json!(status));
        o.insert("status_detail".into(), json!(detail));
        o.insert("instance_list".into(), Value::Array(insts));
        v
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
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
}

type Outbox = mpsc::UnboundedSender<Result<pb::RootMessage, tonic::Status>>;

struct Session {
    conn: u64,
    tx: Outbox,
    last_seen: Instant,
}

/// Shared state of a running root orchestrator.
pub struct Root {
    pub store: Store,
    /// Overlay address management: worker blocks for clusters, service IPs, cross-cluster resolution.
    pub net: netsvc::RootNetSvc,
    pub auth: Auth,
    pub cfg: Config,
    sessions: Mutex<HashMap<String, Session>>,
    next_conn: std::sync::atomic::AtomicU64,
    /// Woken when a cluster registers or reports more capacity: retries unplaced instances.
    pub capacity_changed: Notify,
    /// Clusters that registered or grew since the last retry: they are tried again even by instances
    /// they already refused.
    grown: Mutex<HashSet<String>>,
    /// Set once both listeners are bound (readiness for /api/health).
    pub ready: std::sync::atomic::AtomicBool,
    /// Becomes true when shutdown begins; session tasks end on it.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// A message for a cluster, sent after the write transaction committed.
pub type Outgoing = Vec<(String, pb::RootMessage)>;

fn deploy_msg(svc: &ServiceRecord, n: u32) -> pb::RootMessage {
    pb::RootMessage {
        msg: Some(pb::root_message::Msg::Deploy(pb::DeployInstance { service: Some(svc.spec()), instance_number: n })),
    }
}

fn undeploy_msg(service_id: &str, n: u32) -> pb::RootMessage {
    pb::RootMessage {
        msg: Some(pb::root_message::Msg::Undeploy(pb::UndeployInstance {
            service_id: service_id.to_string(),
            instance_number: n,
        })),
    }
}

impl Root {
    pub fn open(cfg: Config) -> Result<Arc<Self>> {
        let store = Store::open(&cfg.data_dir)?;
        let auth = Auth::init(&store, &cfg.data_dir, cfg.admin_password.as_deref())?;
        let net = netsvc::RootNetSvc::open(&cfg.data_dir)?;
        Ok(Arc::new(Self {
            store,
            net,
            auth,
            cfg,
            sessions: Mutex::new(HashMap::new()),
            next_conn: 1.into(),
            capacity_changed: Notify::new(),
            grown: Mutex::new(HashSet::new()),
            ready: false.into(),
            stopping: tokio::sync::watch::channel(false).0,
        }))
    }

    pub fn is_active(&self, cluster_id: &str) -> bool {
        let s = self.sessions.lock().expect("sessions");
        s.get(cluster_id).is_some_and(|s| s.last_seen.elapsed() <= self.cfg.cluster_stale)
    }

    fn has_session(&self, cluster_id: &str) -> bool {
        self.sessions.lock().expect("sessions").contains_key(cluster_id)
    }

    pub fn send(&self, out: Outgoing) {
        let s = self.sessions.lock().expect("sessions");
        for (cid, m) in out {
            match s.get(&cid) {
                Some(sess) => {
                    if sess.tx.send(Ok(m)).is_err() {
                        tracing::warn!(cluster_id = %cid, "cluster session closed; message dropped");
                    }
                }
                None => tracing::warn!(cluster_id = %cid, "no session for cluster; message dropped"),
            }
        }
    }

    fn views(&self, tx: &Tx) -> Result<Vec<ClusterView>> {
        let cls: Vec<ClusterRecord> = tx.list(CLUSTERS)?;
        Ok(cls
            .into_iter()
            .map(|c| ClusterView {
                active: self.is_active(&c.cluster_id),
                id: c.cluster_id,
                name: c.cluster_name,
                aggregate: c.aggregate.to_pb(),
                location: c.cluster_location,
            })
            .collect())
    }

    /// Places instance `idx` of `svc`; on success queues the Deploy in `out`.
    fn place_instance(
        &self,
        tx: &Tx,
        svc: &mut ServiceRecord,
        idx: usize,
        out: &mut Outgoing,
        prior: &str,
    ) -> Result<bool> {
        let views = self.views(tx)?;
        let spec = svc.spec();
        let inst = &mut svc.instance_list[idx];
        inst.last_modified_ms = oak_proto::now_ms();
        match scheduler::place(&spec, &views, &inst.tried_clusters) {
            Ok(cid) => {
                let name = views.iter().find(|v| v.id == cid).map(|v| v.name.clone()).unwrap_or_default();
                inst.status = InstanceState::ClusterScheduled;
                inst.status_detail = format!("scheduled on cluster '{name}'");
                inst.cluster_id = cid.clone();
                inst.cluster_name = name;
                inst.worker_id.clear();
                inst.node_name.clear();
                inst.publicip.clear();
                let n = inst.instance_number;
                out.push((cid, deploy_msg(svc, n)));
                Ok(true)
            }
            Err(Unplaced { status, detail }) => {
                inst.status = status;
                inst.status_detail = if prior.is_empty() { detail } else { format!("{detail}; {prior}") };
                inst.cluster_id.clear();
                inst.cluster_name.clear();
                Ok(false)
            }
        }
    }

    /// Adds one instance to a service and tries to place it. Returns the new instance.
    pub fn deploy_instance(&self, service_id: &str) -> Result<Option<InstanceRecord>> {
        let mut out = Outgoing::new();
        let r = self.store.update(|tx| {
            let Some(mut svc) = tx.get::<ServiceRecord>(SERVICES, service_id)? else { return Ok(None) };
            if svc.sla.addresses.rr_ip.is_empty() {
                // a service stored before service IPs were allocated at creation
                let (rr, cl) = self.net.allocate_service_ips(&svc.microservice_id, &svc.job_name)?;
                svc.sla.addresses.rr_ip = rr.to_string();
                svc.sla.addresses.closest_ip = cl.to_string();
            }
            let n = svc.next_instance;
            svc.next_instance += 1;
            svc.instance_list.push(InstanceRecord::new(n, InstanceState::Requested));
            let idx = svc.instance_list.len() - 1;
            self.place_instance(tx, &mut svc, idx, &mut out, "")?;
            let inst = svc.instance_list[idx].clone();
            tx.put(SERVICES, service_id, &svc)?;
            Ok(Some(inst))
        })?;
        self.send(out);
        if let Some(i) = &r {
            tracing::info!(service_id, instance = i.instance_number, status = %i.status, detail = %i.status_detail, "deploy requested");
        }
        Ok(r)
    }

    /// Undeploys instance `n`. Returns false if unknown.
    pub fn undeploy_instance(&self, service_id: &str, n: u32) -> Result<bool> {
        let mut out = Outgoing::new();
        let found = self.store.update(|tx| {
            let Some(mut svc) = tx.get::<ServiceRecord>(SERVICES, service_id)? else { return Ok(false) };
            let Some(pos) = svc.instance_list.iter().position(|i| i.instance_number == n) else { return Ok(false) };
            let inst = &mut svc.instance_list[pos];
            if !inst.cluster_id.is_empty() && self.has_session(&inst.cluster_id) {
                inst.undeploying = true;
                inst.status_detail = "undeploy requested".into();
                out.push((inst.cluster_id.clone(), undeploy_msg(service_id, n)));
            } else {
                svc.instance_list.remove(pos);
            }
            tx.put(SERVICES, service_id, &svc)?;
            Ok(true)
        })?;
        self.send(out);
        Ok(found)
    }

    /// Queues undeploys for every instance of a deleted service (the caller deletes the record).
    pub fn undeploy_all(&self, svc: &ServiceRecord, out: &mut Outgoing) {
        for i in &svc.instance_list {
            if !i.cluster_id.is_empty() {
                out.push((i.cluster_id.clone(), undeploy_msg(&svc.microservice_id, i.instance_number)));
            }
        }
    }

    /// Applies one InstanceStatus reported by cluster `cluster_id`.
    pub fn on_instance_status(&self, cluster_id: &str, st: &pb::InstanceStatus) -> Result<()> {
        let mut out = Outgoing::new();
        self.store.update(|tx| self.apply_status(tx, cluster_id, st, &mut out))?;
        self.send(out);
        Ok(())
    }

    fn apply_status(&self, tx: &Tx, cluster_id: &str, st: &pb::InstanceStatus, out: &mut Outgoing) -> Result<()> {
        let n = st.instance_number;
        let svc = tx.get::<ServiceRecord>(SERVICES, &st.service_id)?;
        let pos = svc.as_ref().and_then(|s| s.instance_list.iter().position(|i| i.instance_number == n));
        let (Some(mut svc), Some(pos)) = (svc, pos) else {
            if st.status != InstanceState::Undeployed.as_str() {
                tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, status = %st.status, "status for an instance the root does not have; telling the cluster to undeploy it");
                out.push((cluster_id.to_string(), undeploy_msg(&st.service_id, n)));
            }
            return Ok(());
        };
        if svc.instance_list[pos].cluster_id != cluster_id {
            if st.status != InstanceState::Undeployed.as_str() {
                tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, "instance is assigned to another cluster; telling this one to undeploy it");
                out.push((cluster_id.to_string(), undeploy_msg(&st.service_id, n)));
            }
            return Ok(());
        }
        let Some(state) = InstanceState::parse(&st.status) else {
            tracing::warn!(cluster_id, service_id = %st.service_id, instance = n, status = %st.status, "status outside Oakestra's vocabulary ignored");
            return Ok(());
        };
        let inst = &mut svc.instance_list[pos];
        inst.last_modified_ms = oak_proto::now_ms();
        match state {
            InstanceState::Undeployed if inst.undeploying => {
                svc.instance_list.remove(pos);
            }
            InstanceState::NoWorkerCapacity | InstanceState::NoQualifiedWorkerFound if !inst.undeploying => {
                let cname = inst.cluster_name.clone();
                if !inst.tried_clusters.iter().any(|c| c == cluster_id) {
                    inst.tried_clusters.push(cluster_id.to_string());
                }
                let prior = format!("cluster '{cname}' reported {}: {}", st.status, st.detail);
                tracing::info!(service_id = %st.service_id, instance = n, %prior, "trying another cluster");
                self.place_instance(tx, &mut svc, pos, out, &prior)?;
            }
            _ => {
                inst.status = state;
                inst.status_detail = st.detail.clone();
                if !st.node_id.is_empty() {
                    inst.worker_id = st.node_id.clone();
                }
                if !st.node_name.is_empty() {
                    inst.node_name = st.node_name.clone();
                }
                if !st.public_ip.is_empty() {
                    inst.publicip = st.public_ip.clone();
                }
                if st.exit_code.is_some() {
                    inst.exit_code = st.exit_code;
                }
                if !st.ns_address.is_empty() {
                    inst.ns_address = st.ns_address.clone();
                }
                if !st.ns_address_v6.is_empty() {
                    inst.ns_address_v6 = st.ns_address_v6.clone();
                }
                if !st.logs.is_empty() {
                    inst.logs = st.logs.clone();
                }
                let ts = if st.timestamp_ms > 0 { st.timestamp_ms } else { oak_proto::now_ms() };
                if st.cpu_percent > 0.0 || st.memory_bytes > 0 {
                    inst.cpu_history.push(json!({"timestamp": ts / 1000, "value": st.cpu_percent}));
                    inst.memory_history.push(json!({"timestamp": ts / 1000, "value": st.memory_bytes}));
                    for h in [&mut inst.cpu_history, &mut inst.memory_history] {
                        if h.len() > HISTORY {
                            h.drain(..h.len() - HISTORY);
                        }
                    }
                }
                if state == InstanceState::Running {
                    inst.tried_clusters.clear();
                }
            }
        }
        tx.put(SERVICES, &svc.microservice_id, &svc)?;
        Ok(())
    }

    /// Registers a cluster session; returns (cluster id, connection number, receiver of root messages).
    pub fn on_hello(&self, hello: &pb::ClusterHello, tx_out: Outbox) -> Result<(String, u64)> {
        if hello.cluster_name.is_empty() || hello.cluster_name.len() > 128 {
            return Err(anyhow!("cluster_name must be 1..128 characters"));
        }
        let conn = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Outgoing::new();
        let cid = self.store.update(|tx| {
            let known: Vec<ClusterRecord> = tx.list(CLUSTERS)?;
            let valid_id = hello.cluster_id.len() == 24 && hello.cluster_id.bytes().all(|b| b.is_ascii_hexdigit());
            let existing = known.iter().find(|c| c.cluster_id == hello.cluster_id && !hello.cluster_id.is_empty());
            let cid = match existing {
                Some(c) if c.cluster_name == hello.cluster_name => c.cluster_id.clone(),
                None if valid_id => hello.cluster_id.clone(),
                _ => store::new_id(),
            };
            let now = oak_proto::now_ms();
            let prev = known.iter().find(|c| c.cluster_id == cid);
            let rec = ClusterRecord {
                cluster_id: cid.clone(),
                cluster_name: hello.cluster_name.clone(),
                cluster_location: hello.cluster_location.clone(),
                version: hello.version.clone(),
                aggregate: hello.aggregate.as_ref().map(AggregateRecord::from).unwrap_or_default(),
                registered_ms: prev.map(|p| p.registered_ms).unwrap_or(now),
                last_seen_ms: now,
            };
            tx.put(CLUSTERS, &cid, &rec)?;
            Ok(cid)
        })?;
        // Welcome goes first on the new session.
        let _ = tx_out.send(Ok(pb::RootMessage {
            msg: Some(pb::root_message::Msg::Welcome(pb::ClusterWelcome {
                cluster_id: cid.clone(),
                report_interval_ms: self.cfg.report_interval_ms,
            })),
        }));
        self.sessions
            .lock()
            .expect("sessions")
            .insert(cid.clone(), Session { conn, tx: tx_out, last_seen: Instant::now() });
        // Reconcile: apply what the cluster holds, re-send what it lacks.
        self.store.update(|tx| {
            for st in &hello.instances {
                self.apply_status(tx, &cid, st, &mut out)?;
            }
            let services: Vec<ServiceRecord> = tx.list(SERVICES)?;
            for mut svc in services {
                let mut changed = false;
                let mut i = 0;
                while i < svc.instance_list.len() {
                    let inst = &svc.instance_list[i];
                    let reported = hello
                        .instances
                        .iter()
                        .any(|s| s.service_id == svc.microservice_id && s.instance_number == inst.instance_number);
                    if inst.cluster_id == cid && !reported {
                        if inst.undeploying {
                            svc.instance_list.remove(i);
                            changed = true;
                            continue;
                        }
                        out.push((cid.clone(), deploy_msg(&svc, inst.instance_number)));
                    }
                    i += 1;
                }
                if changed {
                    tx.put(SERVICES, &svc.microservice_id, &svc)?;
                }
            }
            Ok(())
        })?;
        self.send(out);
        tracing::info!(cluster_id = %cid, cluster_name = %hello.cluster_name, location = %hello.cluster_location, instances = hello.instances.len(), "cluster registered");
        self.grown.lock().expect("grown").insert(cid.clone());
        self.capacity_changed.notify_one();
        Ok((cid, conn))
    }

    pub fn touch(&self, cluster_id: &str) {
        if let Some(s) = self.sessions.lock().expect("sessions").get_mut(cluster_id) {
            s.last_seen = Instant::now();
        }
    }

    pub fn on_aggregate(&self, cluster_id: &str, agg: &pb::ClusterAggregate) -> Result<()> {
        let grew = self.store.update(|tx| {
            let Some(mut c) = tx.get::<ClusterRecord>(CLUSTERS, cluster_id)? else { return Ok(false) };
            let old = &c.aggregate;
            let grew = agg.active_nodes > old.active_nodes
                || agg.max_free_cpu_cores > old.max_free_cpu_cores + 1e-9
                || agg.max_free_memory_mb > old.max_free_memory_mb
                || agg.max_free_gpus > old.max_free_gpus
                || agg.virtualization.iter().any(|v| !old.virtualization.contains(v))
                || agg.arch.iter().any(|v| !old.arch.contains(v));
            c.aggregate = AggregateRecord::from(agg);
            c.last_seen_ms = oak_proto::now_ms();
            tx.put(CLUSTERS, cluster_id, &c)?;
            Ok(grew)
        })?;
        if grew {
            tracing::debug!(cluster_id, "cluster capacity grew; retrying unplaced instances");
            self.grown.lock().expect("grown").insert(cluster_id.to_string());
            self.capacity_changed.notify_one();
        }
        Ok(())
    }

    pub fn on_disconnect(&self, cluster_id: &str, conn: u64) {
        let mut s = self.sessions.lock().expect("sessions");
        if s.get(cluster_id).is_some_and(|x| x.conn == conn) {
            s.remove(cluster_id);
            tracing::warn!(cluster_id, "cluster session ended; cluster is inactive");
        }
    }

    /// Retries every unplaced instance once. With `full`, clusters an instance already tried are
    /// eligible again (the periodic retry); otherwise only clusters that registered or grew since the last
    /// retry are (the capacity-change retry), so a cluster that keeps refusing is not hammered.
    /// Returns how many got placed.
    pub fn retry_unplaced(&self, full: bool) -> Result<usize> {
        let grown: HashSet<String> = std::mem::take(&mut *self.grown.lock().expect("grown"));
        let mut out = Outgoing::new();
        let placed = self.store.update(|tx| {
            let mut placed = 0;
            let services: Vec<ServiceRecord> = tx.list(SERVICES)?;
            for mut svc in services {
                let mut changed = false;
                for idx in 0..svc.instance_list.len() {
                    let i = &mut svc.instance_list[idx];
                    if i.undeploying || !i.status.is_unplaced() {
                        continue;
                    }
                    if full {
                        i.tried_clusters.clear();
                    } else {
                        i.tried_clusters.retain(|c| !grown.contains(c));
                    }
                    let before = (i.status, i.status_detail.clone());
                    let prior = if full { String::new() } else { previous_refusals(&i.status_detail) };
                    if self.place_instance(tx, &mut svc, idx, &mut out, &prior)? {
                        placed += 1;
                        changed = true;
                    } else {
                        let i = &svc.instance_list[idx];
                        changed |= (i.status, i.status_detail.clone()) != before;
                    }
                }
                if changed {
                    tx.put(SERVICES, &svc.microservice_id, &svc)?;
                }
            }
            Ok(placed)
        })?;
        self.send(out);
        if placed > 0 {
            tracing::info!(placed, full, "retry placed instances");
        }
        Ok(placed)
    }

    /// Clusters as the API shows them.
    pub fn clusters_json(&self, only_active: bool) -> Result<Vec<Value>> {
        let cls: Vec<ClusterRecord> = self.store.list(CLUSTERS)?;
        Ok(cls
            .into_iter()
            .filter_map(|c| {
                let active = self.is_active(&c.cluster_id);
                if only_active && !active {
                    return None;
                }
                let mut v = serde_json::to_value(&c.aggregate).unwrap_or_default();
                let o = v.as_object_mut()?;
                o.insert("_id".into(), json!({"$oid": c.cluster_id}));
                o.insert("cluster_id".into(), json!(c.cluster_id));
                o.insert("cluster_name".into(), json!(c.cluster_name));
                o.insert("cluster_location".into(), json!(c.cluster_location));
                o.insert("version".into(), json!(c.version));
                o.insert("active".into(), json!(active));
                o.insert("registered_ms".into(), json!(c.registered_ms));
                o.insert("last_modified_timestamp".into(), json!(c.last_seen_ms as f64 / 1000.0));
                Some(v)
            })
            .collect())
    }
}

/// Runs the root orchestrator until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let root = Root::open(cfg.clone())?;
    let api_l = tokio::net::TcpListener::bind(cfg.api_addr)
        .await
        .map_err(|e| anyhow!("binding --api-addr {}: {e}", cfg.api_addr))?;
    let grpc_l = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|e| anyhow!("binding --grpc-addr {}: {e}", cfg.grpc_addr))?;
    let net_l = tokio::net::TcpListener::bind(cfg.netsvc_addr)
        .await
        .map_err(|e| anyhow!("binding --netsvc-addr {}: {e}", cfg.netsvc_addr))?;
    serve(root, api_l, grpc_l, net_l, shutdown).await
}

/// Serves on already-bound listeners (tests bind port 0).
pub async fn serve(
    root: Arc<Root>,
    api_l: tokio::net::TcpListener,
    grpc_l: tokio::net::TcpListener,
    net_l: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let net_task = tokio::spawn(netsvc::serve_listener(root.net.clone(), net_l));
    tracing::info!(api = %api_l.local_addr()?, grpc = %grpc_l.local_addr()?, data_dir = %root.cfg.data_dir.display(), "root orchestrator listening");
    let stop_rx = root.stopping.subscribe();
    let r1 = root.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        r1.stopping.send_replace(true);
        // dropping the senders ends the cluster streams so the gRPC server can finish
        r1.sessions.lock().expect("sessions").clear();
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    // retry loop
    let r2 = root.clone();
    let mut stop_retry = stop_rx.clone();
    let retry = tokio::spawn(async move {
        let mut tick = tokio::time::interval(r2.cfg.retry_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick completes immediately
        loop {
            let full = tokio::select! {
                _ = tick.tick() => true,
                _ = r2.capacity_changed.notified() => false,
                _ = stop_retry.wait_for(|v| *v) => break,
            };
            if let Err(e) = r2.retry_unplaced(full) {
                tracing::error!("retrying placements: {e:#}");
            }
        }
    });
    let app = api::router(root.clone());
    let api = axum::serve(api_l, app).with_graceful_shutdown(wait(stop_rx.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_l);
    let grpc = tonic::transport::Server::builder()
        .add_service(pb::cluster_registry_server::ClusterRegistryServer::new(grpc::Registry { root: root.clone() }))
        .serve_with_incoming_shutdown(incoming, wait(stop_rx.clone()));
    root.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let both = async { tokio::join!(api, grpc) };
    tokio::pin!(both);
    let mut stop_wait = stop_rx.clone();
    let grace = async move {
        let _ = stop_wait.wait_for(|v| *v).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    tokio::select! {
        (a, g) = &mut both => {
            retry.abort();
            net_task.abort();
            a?;
            g?;
        }
        _ = grace => {
            retry.abort();
            net_task.abort();
            tracing::warn!("connections still open 5 s after shutdown began; stopping anyway");
        }
    }
    tracing::info!("root orchestrator stopped");
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
