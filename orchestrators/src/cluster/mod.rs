//! Cluster orchestrator: registers with the root (dialling out, so it works behind NAT), accepts worker
//! sessions, schedules each instance the root hands it onto the best matching worker, watches worker
//! liveness (a worker that misses heartbeats is marked down and its instances move), and reports
//! aggregated resources and instance states up. The cluster network service (subnet leases for the
//! NetManagers) runs beside it on its own port.
//!
//! One mutex guards the state; every handler computes the messages to send while holding it and sends
//! them after releasing it. Placements are persisted in `<data-dir>/cluster.redb`.

pub mod netsvc;
pub mod root_link;
pub mod scheduler;
pub mod store;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use oak_proto::v1 as pb;
use oak_proto::{instance_key, InstanceState};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use crate::latency;
use scheduler::WorkerView;
use store::ClusterStore;

/// The name of a cluster's certificate authority (of its workers).
pub const CA_NAME: &str = "oakestra-rs cluster CA";

/// The root orchestrator's replicas as this cluster knows them (`--root-address a,b,c`): for each, its
/// registration (gRPC) and network service URLs, and which one is in use. The session with the root tries
/// them in turn until one answers (only the leader of a replicated root accepts clusters); the network
/// service's calls go to the replica the session is with. Clones share the choice.
#[derive(Debug, Clone)]
pub struct RootReplicas {
    grpc: Vec<String>,
    netsvc: Vec<String>,
    current: Arc<tokio::sync::watch::Sender<usize>>,
}

impl RootReplicas {
    /// `(registration URL, network service URL)` per replica; an empty network service URL: none (tests).
    pub fn new(replicas: impl IntoIterator<Item = (String, String)>) -> Self {
        let (grpc, netsvc) = replicas.into_iter().unzip();
        Self { grpc, netsvc, current: Arc::new(tokio::sync::watch::channel(0).0) }
    }

    /// One root.
    pub fn one(grpc: &str, netsvc: &str) -> Self {
        Self::new([(grpc.to_string(), netsvc.to_string())])
    }

    fn index(&self) -> usize {
        *self.current.borrow() % self.grpc.len().max(1)
    }

    /// The registration URL of the replica in use.
    pub fn grpc(&self) -> &str {
        self.grpc.get(self.index()).map(String::as_str).unwrap_or_default()
    }

    /// Every replica's network service URL, in order.
    pub fn netsvc_urls(&self) -> &[String] {
        &self.netsvc
    }

    /// Which replica is in use (an index into [`RootReplicas::netsvc_urls`]).
    pub fn current(&self) -> usize {
        self.index()
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.grpc.len()
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.grpc.is_empty()
    }

    /// Moves on to the next replica (after the one in use failed).
    pub fn advance(&self) {
        self.current.send_modify(|c| *c = c.wrapping_add(1));
    }

    /// Changes whenever the replica in use does (what follows the session's replica moves with it).
    pub fn switched(&self) -> tokio::sync::watch::Receiver<usize> {
        self.current.subscribe()
    }
}

/// Cluster orchestrator settings (see the binary's `--help`).
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_name: String,
    pub cluster_location: String,
    /// The root's replicas: registration and network service addresses, and the one in use.
    pub root: RootReplicas,
    /// Worker registration (WorkerRegistry gRPC) listen address.
    pub worker_addr: SocketAddr,
    /// Cluster network service listen address (NetManagers lease subnets here).
    pub netsvc_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Heartbeat interval told to workers.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is down; its instances are rescheduled.
    pub worker_stale: Duration,
    /// A worker down for this long is removed: forgotten, and its overlay subnet released.
    pub worker_remove_after: Duration,
    /// An instance that FAILED or is DEAD (not a one-shot's) is placed again this long after (doubling
    /// with each failure in a row, up to 16 times); zero: never.
    pub redeploy_after: Duration,
    /// The root's join token: used once, to join the root (the certificate it gives is kept in
    /// `<data-dir>/identity`).
    pub token: String,
    /// A join token workers may join with (added at start; empty: one is made at first start). The first
    /// token is written whole to `<data-dir>/worker-join-token`.
    pub worker_token: String,
}

type WorkerOutbox = mpsc::UnboundedSender<Result<pb::ClusterToWorker, tonic::Status>>;

struct WorkerSession {
    conn: u64,
    tx: WorkerOutbox,
}

struct Worker {
    name: String,
    resources: pb::NodeResources,
    last_seen: Instant,
    alive: bool,
    address: String,
    session: Option<WorkerSession>,
}

#[derive(Clone, Debug)]
struct Instance {
    deploy: pb::DeployInstance,
    status: pb::InstanceStatus,
    undeploying: bool,
    /// Failures in a row (reset once it ran for [`STABLE_AFTER`]); not kept across restarts.
    failures: u32,
    /// When it ended unexpectedly and is to be placed again.
    redeploy_at: Option<Instant>,
    /// Since when it runs.
    running_since: Option<Instant>,
    /// Since when it runs on a worker that misses one of its latency constraints.
    latency_miss_since: Option<Instant>,
}

/// An instance that ran this long before it failed starts its redeploy back-off anew.
const STABLE_AFTER: Duration = Duration::from_secs(600);

impl Instance {
    fn new(deploy: pb::DeployInstance, status: pb::InstanceStatus, undeploying: bool) -> Self {
        Self {
            deploy,
            status,
            undeploying,
            failures: 0,
            redeploy_at: None,
            running_since: None,
            latency_miss_since: None,
        }
    }
}

impl Instance {
    fn key(&self) -> String {
        instance_key(&self.status.service_id, self.status.instance_number)
    }
    fn spec(&self) -> &pb::ServiceSpec {
        self.deploy.service.as_ref().expect("stored instances carry their spec")
    }
    fn record(&self) -> pb::ClusterInstanceRecord {
        pb::ClusterInstanceRecord {
            deploy: Some(self.deploy.clone()),
            status: Some(self.status.clone()),
            undeploying: self.undeploying,
        }
    }
}

#[derive(Default)]
struct State {
    cluster_id: String,
    workers: HashMap<String, Worker>,
    instances: BTreeMap<String, Instance>,
}

/// Messages to send once the state lock is released.
#[derive(Default)]
struct Out {
    to_workers: Vec<(String, pb::ClusterToWorker)>,
    to_root: Vec<pb::InstanceStatus>,
    capacity_changed: bool,
}

/// Shared state of a running cluster orchestrator.
pub struct Cluster {
    pub cfg: Config,
    store: ClusterStore,
    /// The workers' certificate authority and join tokens (`<data-dir>/ca`).
    pub authority: Arc<oak_trust::Authority>,
    /// This cluster as a member of the root (its certificate in `<data-dir>/identity`).
    pub root_member: oak_trust::Member,
    state: Mutex<State>,
    next_conn: std::sync::atomic::AtomicU64,
    /// The live root session's outbox, when connected.
    root_tx: Mutex<Option<mpsc::UnboundedSender<pb::ClusterMessage>>>,
    /// Woken when worker capacity changed (registration, loss): the root link reports at once.
    pub capacity_changed: Notify,
    /// The cluster id, once known (persisted, or from the root's first welcome).
    pub cluster_id: tokio::sync::watch::Sender<String>,
    /// Becomes true when shutdown begins; worker session tasks end on it.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The cluster network service, once it runs (removing a worker releases its subnet there).
    pub netsvc: std::sync::OnceLock<netsvc::ClusterNetSvc>,
}

/// An instance that has ended on its worker and no longer holds the resources it asked for.
fn has_ended(st: &pb::InstanceStatus) -> bool {
    use InstanceState::{Completed, Dead, Failed};
    matches!(InstanceState::parse(&st.status), Some(Failed | Dead | Completed))
}

fn worker_msg(m: pb::cluster_to_worker::Msg) -> pb::ClusterToWorker {
    pb::ClusterToWorker { msg: Some(m) }
}

fn now_ms() -> u64 {
    oak_proto::now_ms()
}

impl Cluster {
    pub fn open(cfg: Config) -> Result<Arc<Self>> {
        let store = ClusterStore::open(&cfg.data_dir)?;
        let cluster_id = store.cluster_id()?;
        let mut state = State { cluster_id: cluster_id.clone(), ..Default::default() };
        for rec in store.instances()? {
            let (Some(deploy), Some(status)) = (rec.deploy, rec.status) else { continue };
            let i = Instance::new(deploy, status, rec.undeploying);
            state.instances.insert(i.key(), i);
        }
        if !state.instances.is_empty() {
            tracing::info!(
                instances = state.instances.len(),
                "restored placements; waiting for their workers to reconnect"
            );
        }
        let authority =
            Arc::new(oak_trust::Authority::open(&cfg.data_dir.join("ca"), CA_NAME, oak_trust::CLUSTER_SERVER)?);
        let wt = (!cfg.worker_token.is_empty()).then_some(cfg.worker_token.as_str());
        authority
            .init_tokens(wt, &cfg.data_dir.join("worker-join-token"), "workers")
            .map_err(|e| anyhow::anyhow!("--worker-token: {e:#}"))?;
        let root_member = oak_trust::Member::new(
            // joining happens once (the certificate is kept), with the first replica
            cfg.root.grpc.first().map(String::as_str).unwrap_or_default(),
            oak_trust::ROOT_SERVER,
            "cluster",
            &cfg.cluster_name,
            &cfg.token,
            cfg.data_dir.join("identity"),
        );
        let cluster = Arc::new(Self {
            cfg,
            store,
            authority,
            root_member,
            state: Mutex::new(state),
            next_conn: 1.into(),
            root_tx: Mutex::new(None),
            capacity_changed: Notify::new(),
            cluster_id: tokio::sync::watch::channel(cluster_id).0,
            stopping: tokio::sync::watch::channel(false).0,
            netsvc: std::sync::OnceLock::new(),
        });
        Ok(cluster)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Sends what a handler produced.
    fn flush(&self, out: Out) {
        if !out.to_workers.is_empty() {
            let s = self.lock();
            for (node, m) in out.to_workers {
                match s.workers.get(&node).and_then(|w| w.session.as_ref()) {
                    Some(sess) => {
                        if sess.tx.send(Ok(m)).is_err() {
                            tracing::warn!(node_id = %node, "worker session closed; message dropped");
                        }
                    }
                    None => {
                        tracing::warn!(node_id = %node, "worker has no session; message dropped (sent again when it reconnects)")
                    }
                }
            }
        }
        for st in out.to_root {
            self.send_root(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Instance(st)) });
        }
        if out.capacity_changed {
            self.capacity_changed.notify_one();
        }
    }

    fn send_root(&self, m: pb::ClusterMessage) {
        if let Some(tx) = self.root_tx.lock().as_ref() {
            let _ = tx.send(m);
        }
        // not connected: the next ClusterHello carries every instance's state
    }

    fn persist(&self, i: &Instance) {
        if let Err(e) = self.store.put_instance(&i.key(), &i.record()) {
            tracing::error!("storing instance {}: {e:#}", i.key());
        }
    }

    fn forget(&self, k: &str) {
        if let Err(e) = self.store.delete_instance(k) {
            tracing::error!("deleting stored instance {k}: {e:#}");
        }
    }

    fn stamp(&self, st: &mut pb::InstanceStatus, s: &State) {
        st.cluster_id = s.cluster_id.clone();
        if st.timestamp_ms == 0 {
            st.timestamp_ms = now_ms();
        }
    }

    /// Queues UNDEPLOYED for the root.
    fn report_undeployed(&self, s: &State, service_id: &str, n: u32, detail: String, out: &mut Out) {
        let mut st = pb::InstanceStatus {
            service_id: service_id.into(),
            instance_number: n,
            status: InstanceState::Undeployed.as_str().into(),
            detail,
            ..Default::default()
        };
        self.stamp(&mut st, s);
        out.to_root.push(st);
    }

    fn views(s: &State, exclude: Option<&str>) -> Vec<WorkerView> {
        let mut reserved: HashMap<&str, (f64, u64, u32)> = HashMap::new();
        for i in s.instances.values() {
            if i.undeploying || i.status.node_id.is_empty() || has_ended(&i.status) {
                continue;
            }
            let spec = i.spec();
            let e = reserved.entry(i.status.node_id.as_str()).or_default();
            // a running instance shows in the worker's metrics already, but only as what it uses now:
            // keep its full request reserved so a burst of deploys cannot oversubscribe a worker
            e.0 += spec.vcpus;
            e.1 += spec.memory_mb;
            e.2 += spec.vgpus;
        }
        s.workers
            .iter()
            .filter(|(id, w)| w.alive && Some(id.as_str()) != exclude)
            .map(|(id, w)| {
                let r = reserved.get(id.as_str()).copied().unwrap_or_default();
                WorkerView {
                    id: id.clone(),
                    name: w.name.clone(),
                    resources: w.resources.clone(),
                    reserved_cpu: r.0,
                    reserved_memory_mb: r.1,
                    reserved_gpus: r.2,
                }
            })
            .collect()
    }

    /// `spec` with its latency targets brought up to date from this cluster: the coordinates its own workers
    /// report now, and for a target service the workers its instances here run on.
    fn fresh_spec(s: &State, spec: &pb::ServiceSpec) -> pb::ServiceSpec {
        let mut spec = spec.clone();
        if spec.latency.is_empty() {
            return spec;
        }
        let coordinate = |node_id: &str| {
            let w = s.workers.get(node_id).filter(|w| w.alive)?;
            w.resources.network.as_ref()?.coordinate.clone()
        };
        for t in spec.latency.iter_mut().filter(|t| t.kind == latency::SERVICE) {
            // where the target runs in this cluster now: the root's list may name workers it left since
            let here: Vec<&Instance> = s
                .instances
                .values()
                .filter(|i| {
                    let target = i.spec();
                    let running = InstanceState::parse(&i.status.status) == Some(InstanceState::Running);
                    running && (target.job_name == t.name || target.service_id == t.name)
                })
                .collect();
            let ours = |name: &str| s.workers.values().any(|w| w.name == name);
            t.points.retain(|p| !ours(&p.node_name) || here.iter().any(|i| i.status.node_name == p.node_name));
            for i in here {
                if !t.points.iter().any(|p| p.node_name == i.status.node_name) {
                    t.points.push(pb::LatencyPoint {
                        node_name: i.status.node_name.clone(),
                        coordinate: coordinate(&i.status.node_id),
                    });
                }
            }
        }
        latency::refresh(&mut spec.latency, |name| {
            let (id, _) = s.workers.iter().find(|(_, w)| w.alive && w.name == name)?;
            coordinate(id)
        });
        spec
    }

    /// Places instance `k` (already in the table) on a worker other than `exclude`. On success the worker
    /// gets the deploy and the root hears NODE_SCHEDULED; otherwise the instance leaves the table and the
    /// root hears why (it then tries another cluster or retries later).
    fn schedule(&self, s: &mut State, k: &str, exclude: Option<&str>, why: &str, out: &mut Out) {
        let views = Self::views(s, exclude);
        let Some(inst) = s.instances.get(k) else { return };
        match scheduler::place(&Self::fresh_spec(s, inst.spec()), &views) {
            Ok(node) => {
                let wname = s.workers.get(&node).map(|w| w.name.clone()).unwrap_or_default();
                let address = s.workers.get(&node).map(|w| w.address.clone()).unwrap_or_default();
                let inst = s.instances.get_mut(k).expect("present");
                inst.status.node_id = node.clone();
                inst.status.node_name = wname.clone();
                inst.status.public_ip = address;
                inst.status.status = InstanceState::NodeScheduled.as_str().into();
                inst.status.detail = format!("{why}scheduled on worker '{wname}'");
                inst.status.ns_address.clear();
                inst.status.exit_code = None;
                inst.status.timestamp_ms = 0;
                inst.latency_miss_since = None;
                let mut st = inst.status.clone();
                let deploy = inst.deploy.clone();
                let snapshot = inst.clone();
                self.persist(&snapshot);
                self.stamp(&mut st, s);
                tracing::info!(instance = %k, worker = %wname, "instance scheduled");
                out.to_workers.push((node, worker_msg(pb::cluster_to_worker::Msg::Deploy(deploy))));
                out.to_root.push(st);
            }
            Err(nofit) => {
                let inst = s.instances.remove(k).expect("present");
                self.forget(k);
                tracing::warn!(instance = %k, status = %nofit.status, detail = %nofit.detail, "cannot place instance");
                let mut st = pb::InstanceStatus {
                    service_id: inst.status.service_id.clone(),
                    instance_number: inst.status.instance_number,
                    status: nofit.status.as_str().into(),
                    detail: format!("{why}{}", nofit.detail),
                    ..Default::default()
                };
                self.stamp(&mut st, s);
                out.to_root.push(st);
            }
        }
    }

    // ------------------------------------------------------------------ from the root

    /// The root asks for an instance.
    pub fn on_deploy(&self, d: pb::DeployInstance) {
        let Some(spec) = d.service.as_ref() else {
            tracing::warn!("DeployInstance without a service spec ignored");
            return;
        };
        let k = instance_key(&spec.service_id, d.instance_number);
        let mut out = Out::default();
        {
            let mut s = self.lock();
            if let Some(existing) = s.instances.get_mut(&k) {
                // the root re-sent it (reconnect): keep the placement, refresh the spec, re-report
                existing.deploy = d.clone();
                existing.undeploying = false;
                let node = existing.status.node_id.clone();
                let alive = s.workers.get(&node).is_some_and(|w| w.alive);
                if alive {
                    let mut st = s.instances[&k].status.clone();
                    self.stamp(&mut st, &s);
                    out.to_root.push(st);
                    drop(s);
                    self.flush(out);
                    return;
                }
            } else {
                s.instances.insert(
                    k.clone(),
                    Instance::new(
                        d.clone(),
                        pb::InstanceStatus {
                            service_id: spec.service_id.clone(),
                            instance_number: d.instance_number,
                            status: InstanceState::ClusterScheduled.as_str().into(),
                            ..Default::default()
                        },
                        false,
                    ),
                );
            }
            self.schedule(&mut s, &k, None, "", &mut out);
        }
        self.flush(out);
    }

    /// The root asks to remove an instance.
    pub fn on_undeploy(&self, u: pb::UndeployInstance) {
        let k = instance_key(&u.service_id, u.instance_number);
        let mut out = Out::default();
        {
            let mut s = self.lock();
            let has_session =
                |s: &State, node: &str| s.workers.get(node).is_some_and(|w| w.alive && w.session.is_some());
            match s.instances.get(&k).map(|i| i.status.node_id.clone()) {
                Some(node) if has_session(&s, &node) => {
                    let inst = s.instances.get_mut(&k).expect("present");
                    inst.undeploying = true;
                    let snapshot = inst.clone();
                    self.persist(&snapshot);
                    out.to_workers.push((node, worker_msg(pb::cluster_to_worker::Msg::Undeploy(u.clone()))));
                }
                found => {
                    // nowhere to ask (unknown, or its worker is down): it is gone as far as we know
                    if found.is_some() {
                        s.instances.remove(&k);
                        self.forget(&k);
                    }
                    self.report_undeployed(&s, &u.service_id, u.instance_number, "undeployed".into(), &mut out);
                }
            }
        }
        self.flush(out);
    }

    /// The root asks for a piece of an instance's log: passed on to the worker that runs it, or answered
    /// with the reason there is no one to ask.
    pub fn on_logs_request(&self, r: pb::LogsRequest) {
        let k = instance_key(&r.service_id, r.instance_number);
        let sent = {
            let s = self.lock();
            match s.instances.get(&k).map(|i| (i.status.node_id.clone(), i.status.node_name.clone())) {
                None => Err(format!("instance {k} is not in this cluster")),
                Some((node, name)) => match s.workers.get(&node).filter(|w| w.alive).and_then(|w| w.session.as_ref()) {
                    None => Err(format!("the worker of instance {k} ({name}) is not connected")),
                    Some(sess) => sess
                        .tx
                        .send(Ok(worker_msg(pb::cluster_to_worker::Msg::Logs(r.clone()))))
                        .map_err(|_| format!("the session of the worker of instance {k} ({name}) closed")),
                },
            }
        };
        if let Err(error) = sent {
            self.on_logs(pb::LogsChunk { request_id: r.request_id, error, ..Default::default() });
        }
    }

    /// A worker's answer to a logs request goes up to the root as it is.
    pub fn on_logs(&self, c: pb::LogsChunk) {
        self.send_root(pb::ClusterMessage { msg: Some(pb::cluster_message::Msg::Logs(c)) });
    }

    // ------------------------------------------------------------------ from workers

    /// A worker opened a session. Returns (node id, connection number).
    /// `identity` is what the worker's certificate names: its node id.
    pub fn on_worker_hello(
        &self,
        hello: &pb::WorkerHello,
        identity: Option<oak_trust::PeerId>,
        peer: Option<SocketAddr>,
        tx: WorkerOutbox,
    ) -> Result<(String, u64)> {
        if hello.node_name.is_empty() || hello.node_name.len() > 128 {
            anyhow::bail!("node_name must be 1..128 characters, got {} characters", hello.node_name.len());
        }
        let conn = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let node_id = match identity {
            Some(p) if p.kind == "node" => p.id,
            Some(p) => anyhow::bail!("registration refused: {p} is not a worker's NodeEngine"),
            None => anyhow::bail!(
                "registration refused: no worker certificate (a NodeEngine joins with the cluster's worker join token \
                 first)"
            ),
        };
        if !self.store.is_member(&format!("node/{node_id}"))? {
            anyhow::bail!(
                "node {node_id} did not join this cluster (or was forgotten): remove the NodeEngine's \
                 <data-dir>/identity and join again with a worker join token"
            );
        }
        let known = self.store.nodes()?;
        if known.get(&node_id) != Some(&hello.node_name) {
            self.store.put_node(&node_id, &hello.node_name)?;
        }
        // the address the worker's session comes from (an IPv4 worker of a `[::]` listener as IPv4)
        let address = peer.map(|p| oak_proto::endpoint::observed(p.ip()).to_string()).unwrap_or_default();
        let mut out = Out { capacity_changed: true, ..Default::default() };
        let cluster_id;
        {
            let mut s = self.lock();
            cluster_id = s.cluster_id.clone();
            let was_alive = s.workers.get(&node_id).is_some_and(|w| w.alive);
            s.workers.insert(
                node_id.clone(),
                Worker {
                    name: hello.node_name.clone(),
                    resources: hello.resources.clone().unwrap_or_default(),
                    last_seen: Instant::now(),
                    alive: true,
                    address: address.clone(),
                    session: Some(WorkerSession { conn, tx: tx.clone() }),
                },
            );
            // Reconcile what the worker runs with what we placed on it.
            for st in &hello.instances {
                let k = instance_key(&st.service_id, st.instance_number);
                let ours = s.instances.get(&k).is_some_and(|i| i.status.node_id == node_id);
                if ours {
                    self.apply_worker_status(&mut s, &node_id, st, &mut out);
                } else if st.status != InstanceState::Undeployed.as_str() {
                    tracing::info!(instance = %k, worker = %hello.node_name, "worker runs an instance not placed there (moved while it was away, or removed); undeploying it");
                    out.to_workers.push((
                        node_id.clone(),
                        worker_msg(pb::cluster_to_worker::Msg::Undeploy(pb::UndeployInstance {
                            service_id: st.service_id.clone(),
                            instance_number: st.instance_number,
                        })),
                    ));
                }
            }
            let missing: Vec<String> = s
                .instances
                .iter()
                .filter(|(k, i)| {
                    i.status.node_id == node_id
                        && !hello.instances.iter().any(|st| &instance_key(&st.service_id, st.instance_number) == *k)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in missing {
                let inst = s.instances.get(&k).expect("present").clone();
                if inst.undeploying {
                    s.instances.remove(&k);
                    self.forget(&k);
                    let (sid, n) = (&inst.status.service_id, inst.status.instance_number);
                    self.report_undeployed(&s, sid, n, "undeployed".into(), &mut out);
                } else {
                    out.to_workers
                        .push((node_id.clone(), worker_msg(pb::cluster_to_worker::Msg::Deploy(inst.deploy.clone()))));
                }
            }
            tracing::info!(node_id = %node_id, worker = %hello.node_name, %address, instances = hello.instances.len(), rejoined = was_alive, "worker registered");
        }
        // Welcome first, then whatever reconciliation produced.
        let _ = tx.send(Ok(worker_msg(pb::cluster_to_worker::Msg::Welcome(pb::WorkerWelcome {
            node_id: node_id.clone(),
            cluster_id,
            cluster_name: self.cfg.cluster_name.clone(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u32,
            observed_address: address,
        }))));
        self.flush(out);
        Ok((node_id, conn))
    }

    pub fn on_metrics(&self, node_id: &str, r: pb::NodeResources) {
        let mut s = self.lock();
        if let Some(w) = s.workers.get_mut(node_id) {
            w.resources = r;
            w.last_seen = Instant::now();
        }
    }

    /// Any message from a worker counts as a heartbeat.
    pub fn touch(&self, node_id: &str) -> bool {
        let mut s = self.lock();
        match s.workers.get_mut(node_id) {
            Some(w) => {
                w.last_seen = Instant::now();
                w.alive
            }
            None => false,
        }
    }

    pub fn on_worker_status(&self, node_id: &str, st: &pb::InstanceStatus) {
        let mut out = Out::default();
        {
            let mut s = self.lock();
            let k = instance_key(&st.service_id, st.instance_number);
            let ours = s.instances.get(&k).is_some_and(|i| i.status.node_id == node_id);
            if ours {
                self.apply_worker_status(&mut s, node_id, st, &mut out);
            } else if st.status != InstanceState::Undeployed.as_str() {
                tracing::warn!(instance = %k, node_id, status = %st.status, "status for an instance not placed on this worker; undeploying it there");
                out.to_workers.push((
                    node_id.to_string(),
                    worker_msg(pb::cluster_to_worker::Msg::Undeploy(pb::UndeployInstance {
                        service_id: st.service_id.clone(),
                        instance_number: st.instance_number,
                    })),
                ));
            }
        }
        self.flush(out);
    }

    fn apply_worker_status(&self, s: &mut State, node_id: &str, st: &pb::InstanceStatus, out: &mut Out) {
        let k = instance_key(&st.service_id, st.instance_number);
        let Some(inst) = s.instances.get_mut(&k) else { return };
        if st.status == InstanceState::Undeployed.as_str() && inst.undeploying {
            s.instances.remove(&k);
            self.forget(&k);
        } else {
            let prev = std::mem::take(&mut inst.status);
            inst.status = st.clone();
            inst.status.node_id = node_id.to_string();
            if inst.status.node_name.is_empty() {
                inst.status.node_name = prev.node_name;
            }
            if inst.status.public_ip.is_empty() {
                inst.status.public_ip = prev.public_ip;
            }
            if inst.status.ns_address.is_empty() {
                inst.status.ns_address = prev.ns_address;
            }
            let changed = inst.status.status != prev.status || inst.status.detail != prev.detail;
            let snapshot = inst.clone();
            if changed {
                self.persist(&snapshot);
            }
        }
        let mut up = st.clone();
        if let Some(delay) = self.plan_redeploy(s, &k, st) {
            up.detail = format!("{}; the cluster places it again in {:.1} s", up.detail, delay.as_secs_f64());
        }
        if let Some(w) = s.workers.get(node_id) {
            up.node_id = node_id.to_string();
            if up.node_name.is_empty() {
                up.node_name = w.name.clone();
            }
            if up.public_ip.is_empty() {
                up.public_ip = w.address.clone();
            }
        }
        self.stamp(&mut up, s);
        out.to_root.push(up);
    }

    /// Notes a running instance, or plans to place again one that ended unexpectedly (FAILED or DEAD, not
    /// a one-shot's); answers the delay then.
    fn plan_redeploy(&self, s: &mut State, k: &str, st: &pb::InstanceStatus) -> Option<Duration> {
        let inst = s.instances.get_mut(k)?;
        let state = InstanceState::parse(&st.status)?;
        if state == InstanceState::Running {
            inst.running_since.get_or_insert_with(Instant::now);
            return None;
        }
        if !matches!(state, InstanceState::Failed | InstanceState::Dead)
            || inst.undeploying
            || inst.spec().one_shot
            || self.cfg.redeploy_after.is_zero()
        {
            return None;
        }
        if inst.running_since.take().is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
            inst.failures = 0;
        }
        inst.failures += 1;
        let delay = self.cfg.redeploy_after * 2u32.pow((inst.failures - 1).min(4));
        inst.redeploy_at = Some(Instant::now() + delay);
        tracing::warn!(instance = %k, status = %st.status, failures = inst.failures, ?delay, "instance ended unexpectedly; it is placed again after the delay");
        Some(delay)
    }

    /// Places instance `k` again (on a worker other than `exclude`); when it lands on another worker than
    /// before, the worker that had it (if live) removes what is left of it. Returns whether it moved.
    fn place_again(&self, s: &mut State, k: &str, exclude: Option<&str>, why: &str, out: &mut Out) -> bool {
        let Some(inst) = s.instances.get(k) else { return false };
        let (old, service_id, instance_number) =
            (inst.status.node_id.clone(), inst.status.service_id.clone(), inst.status.instance_number);
        self.schedule(s, k, exclude, why, out);
        let moved = s.instances.get(k).is_none_or(|i| i.status.node_id != old);
        if moved && s.workers.get(&old).is_some_and(|w| w.alive) {
            let undeploy = pb::UndeployInstance { service_id, instance_number };
            out.to_workers.push((old, worker_msg(pb::cluster_to_worker::Msg::Undeploy(undeploy))));
        }
        moved && s.instances.contains_key(k)
    }

    /// Places again the instances whose redeploy is due (on any qualified worker, the same one included);
    /// the worker that had one, when another gets it, removes what is left of it.
    pub fn redeploy_due(&self) {
        let mut out = Out::default();
        {
            let mut s = self.lock();
            let now = Instant::now();
            let due: Vec<String> = s
                .instances
                .iter()
                .filter(|(_, i)| i.redeploy_at.is_some_and(|t| t <= now) && !i.undeploying && has_ended(&i.status))
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                let inst = s.instances.get_mut(&k).expect("present");
                inst.redeploy_at = None;
                let why = format!(
                    "{} on worker '{}' ({}); placed again (failure {}): ",
                    inst.status.status, inst.status.node_name, inst.status.detail, inst.failures
                );
                self.place_again(&mut s, &k, None, &why, &mut out);
            }
        }
        self.flush(out);
    }

    /// Moves running instances whose worker has missed one of their latency constraints (measured by its
    /// network coordinate) for longer than the constraint's convergence time, when another worker meets
    /// them all; the worker that had one removes it. Returns the instances moved.
    pub fn check_latency(&self) -> Vec<String> {
        let mut out = Out::default();
        let mut moved = Vec::new();
        {
            let mut s = self.lock();
            let now = Instant::now();
            let running: Vec<String> = s
                .instances
                .iter()
                .filter(|(_, i)| {
                    !i.undeploying
                        && !i.spec().latency.is_empty()
                        && InstanceState::parse(&i.status.status) == Some(InstanceState::Running)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in running {
                let inst = s.instances.get(&k).expect("present");
                let spec = Self::fresh_spec(&s, inst.spec());
                let (node, node_name) = (inst.status.node_id.clone(), inst.status.node_name.clone());
                let coord = s.workers.get(&node).and_then(|w| w.resources.network.as_ref()?.coordinate.clone());
                // only a measured miss moves an instance; not knowing (a restarted NetManager) does not
                let latency::Check::Over(why) = latency::check(coord.as_ref(), &spec.latency) else {
                    s.instances.get_mut(&k).expect("present").latency_miss_since = None;
                    continue;
                };
                let since = *s.instances.get_mut(&k).expect("present").latency_miss_since.get_or_insert(now);
                let grace = latency::convergence(&spec.latency);
                if now.duration_since(since) < grace {
                    continue;
                }
                let views = Self::views(&s, Some(&node));
                if let Err(e) = scheduler::place(&spec, &views) {
                    tracing::debug!(instance = %k, worker = %node_name, "misses its latency constraint ({why}); no other worker meets it: {}", e.detail);
                    continue;
                }
                let why = format!(
                    "worker '{node_name}' {why} for more than {} s (convergence time); moved: ",
                    grace.as_secs()
                );
                tracing::warn!(instance = %k, "{why}");
                if self.place_again(&mut s, &k, Some(&node), &why, &mut out) {
                    moved.push(k.clone());
                }
            }
        }
        self.flush(out);
        moved
    }

    pub fn on_worker_disconnect(&self, node_id: &str, conn: u64) {
        let mut s = self.lock();
        if let Some(w) = s.workers.get_mut(node_id) {
            if w.session.as_ref().is_some_and(|x| x.conn == conn) {
                w.session = None;
                tracing::warn!(node_id, worker = %w.name, "worker session ended; it has {:?} to come back before its instances move", self.cfg.worker_stale);
            }
        }
    }

    /// Marks workers silent for longer than `worker_stale` as down and moves their instances.
    /// Returns the names of the workers marked down.
    pub fn check_liveness(&self) -> Vec<String> {
        let mut out = Out::default();
        let mut down = Vec::new();
        {
            let mut s = self.lock();
            let stale: Vec<String> = s
                .workers
                .iter()
                .filter(|(_, w)| w.alive && w.last_seen.elapsed() > self.cfg.worker_stale)
                .map(|(id, _)| id.clone())
                .collect();
            for node in stale {
                let w = s.workers.get_mut(&node).expect("present");
                w.alive = false;
                w.session = None; // dropping the outbox ends the stream if it is still open
                let name = w.name.clone();
                let silent = w.last_seen.elapsed();
                tracing::warn!(node_id = %node, worker = %name, "worker missed heartbeats for {silent:.1?}; marked down, moving its instances");
                down.push(name.clone());
                out.capacity_changed = true;
                let on_it: Vec<String> =
                    s.instances.iter().filter(|(_, i)| i.status.node_id == node).map(|(k, _)| k.clone()).collect();
                for k in on_it {
                    let inst = s.instances.get(&k).expect("present").clone();
                    if inst.undeploying {
                        s.instances.remove(&k);
                        self.forget(&k);
                        let (sid, n) = (&inst.status.service_id, inst.status.instance_number);
                        self.report_undeployed(&s, sid, n, format!("undeployed (worker '{name}' is down)"), &mut out);
                        continue;
                    }
                    let why =
                        format!("worker '{name}' missed heartbeats for {:.0} s; rescheduled: ", silent.as_secs_f64());
                    self.schedule(&mut s, &k, Some(&node), &why, &mut out);
                }
            }
        }
        self.flush(out);
        self.remove_long_gone();
        down
    }

    /// Forgets workers down for longer than `worker_remove_after` and releases their overlay subnets.
    /// Returns the names removed.
    pub fn remove_long_gone(&self) -> Vec<String> {
        let gone: Vec<(String, String)> = {
            let mut s = self.lock();
            let ids: Vec<String> = s
                .workers
                .iter()
                .filter(|(_, w)| !w.alive && w.last_seen.elapsed() > self.cfg.worker_remove_after)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter().filter_map(|id| s.workers.remove(&id).map(|w| (id, w.name))).collect()
        };
        for (id, name) in &gone {
            tracing::warn!(node_id = %id, worker = %name, "worker down for more than {:?}: removed, its overlay subnet released", self.cfg.worker_remove_after);
            if let Err(e) = self.store.remove_node(id) {
                tracing::error!("forgetting worker {id}: {e:#}");
            }
            if let Some(n) = self.netsvc.get() {
                if let Err(e) = n.release_worker(name) {
                    tracing::error!(worker = %name, "releasing its subnet: {e:#}");
                }
            }
        }
        gone.into_iter().map(|(_, n)| n).collect()
    }

    // ------------------------------------------------------------------ up to the root

    /// Aggregated resources of the live workers.
    pub fn aggregate(&self) -> pb::ClusterAggregate {
        let s = self.lock();
        let views = Self::views(&s, None);
        let mut a = pb::ClusterAggregate { active_nodes: views.len() as u32, ..Default::default() };
        let mut busy = 0.0;
        for v in &views {
            let r = &v.resources;
            a.total_cpu_cores += r.cpu_cores;
            busy += f64::from(r.cpu_cores) * r.cpu_percent;
            a.memory_in_mb += r.memory_total_mb;
            a.free_memory_in_mb += v.free_memory_mb();
            a.total_gpu_cores += r.gpus.len() as u32;
            a.max_free_cpu_cores = a.max_free_cpu_cores.max(v.free_cpu());
            a.max_free_memory_mb = a.max_free_memory_mb.max(v.free_memory_mb());
            a.max_free_gpus = a.max_free_gpus.max(v.free_gpus());
            a.disk_free_mb += r.disk_free_mb;
            for x in &r.virtualization {
                if !a.virtualization.contains(x) {
                    a.virtualization.push(x.clone());
                }
            }
            let arch = oak_proto::arch::normalize(&r.arch);
            if !arch.is_empty() && !a.arch.contains(&arch) {
                a.arch.push(arch);
            }
        }
        // every worker for people to see, the lost ones too (with what they reported last)
        let now = now_ms();
        let reserved: HashMap<&str, (f64, u64)> =
            views.iter().map(|v| (v.id.as_str(), (v.reserved_cpu, v.reserved_memory_mb))).collect();
        for (id, w) in &s.workers {
            let reserved = reserved.get(id.as_str()).copied();
            a.workers.push(pb::WorkerSummary {
                node_id: id.clone(),
                node_name: w.name.clone(),
                resources: Some(w.resources.clone()),
                address: w.address.clone(),
                reserved_cpu: reserved.map(|r| r.0).unwrap_or_default(),
                reserved_memory_mb: reserved.map(|r| r.1).unwrap_or_default(),
                state: if w.alive { "live" } else { "lost" }.into(),
                last_report_ms: now.saturating_sub(w.last_seen.elapsed().as_millis() as u64),
            });
        }
        a.workers.sort_by(|x, y| x.node_name.cmp(&y.node_name));
        (a.coordinate, a.coordinate_radius_us) = latency::summary(views.iter().map(|v| &v.resources));
        if a.total_cpu_cores > 0 {
            a.aggregated_cpu_percent = busy / f64::from(a.total_cpu_cores);
        }
        a
    }

    /// What the root gets on (re-)registration.
    pub fn hello(&self) -> pb::ClusterHello {
        let aggregate = self.aggregate();
        let s = self.lock();
        let instances = s
            .instances
            .values()
            .map(|i| {
                let mut st = i.status.clone();
                self.stamp(&mut st, &s);
                st
            })
            .collect();
        pb::ClusterHello {
            cluster_name: self.cfg.cluster_name.clone(),
            cluster_location: self.cfg.cluster_location.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            instances,
            aggregate: Some(aggregate),
        }
    }

    /// The root's welcome: remember the id it gave us.
    pub fn on_welcome(&self, w: &pb::ClusterWelcome) -> Result<()> {
        let mut s = self.lock();
        if s.cluster_id != w.cluster_id {
            if !s.cluster_id.is_empty() {
                tracing::warn!(old = %s.cluster_id, new = %w.cluster_id, "the root gave this cluster a new id");
            }
            self.store.set_cluster_id(&w.cluster_id)?;
            s.cluster_id = w.cluster_id.clone();
            self.cluster_id.send_replace(w.cluster_id.clone());
        }
        Ok(())
    }

    fn set_root_tx(&self, tx: Option<mpsc::UnboundedSender<pb::ClusterMessage>>) {
        *self.root_tx.lock() = tx;
    }

    fn end_worker_sessions(&self) {
        for w in self.lock().workers.values_mut() {
            w.session = None;
        }
    }

    /// Live workers as (node id, name), for tests and status.
    pub fn live_workers(&self) -> Vec<(String, String)> {
        let s = self.lock();
        let mut v: Vec<_> =
            s.workers.iter().filter(|(_, w)| w.alive).map(|(id, w)| (id.clone(), w.name.clone())).collect();
        v.sort();
        v
    }

    /// Where instance `service_id/n` is placed and its last status, if this cluster has it.
    pub fn instance(&self, service_id: &str, n: u32) -> Option<pb::InstanceStatus> {
        self.lock().instances.get(&instance_key(service_id, n)).map(|i| i.status.clone())
    }
}

/// Runs the cluster orchestrator until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let cluster = Cluster::open(cfg.clone())?;
    let workers_l = crate::task::listen(cfg.worker_addr, "the worker registry (--worker-addr)").await?;
    let netsvc_l = crate::task::listen(cfg.netsvc_addr, "the cluster network service (--netsvc-addr)").await?;
    serve(cluster, workers_l, netsvc_l, shutdown).await
}

/// Serves on already-bound listeners (tests bind port 0).
pub async fn serve(
    cluster: Arc<Cluster>,
    workers_l: tokio::net::TcpListener,
    netsvc_l: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let cfg = cluster.cfg.clone();
    tracing::info!(
        cluster_name = %cfg.cluster_name,
        workers = %workers_l.local_addr()?,
        netsvc = %netsvc_l.local_addr()?,
        root = ?cfg.root.grpc,
        data_dir = %cfg.data_dir.display(),
        "cluster orchestrator starting"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(root_link::run(cluster.clone()));
    // liveness
    let c = cluster.clone();
    tasks.spawn(async move {
        let period = (c.cfg.worker_stale / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            c.check_liveness();
            c.redeploy_due();
            c.check_latency();
        }
    });
    // network service: needs the cluster id (persisted, or from the root's first welcome)
    let c = cluster.clone();
    tasks.spawn(async move {
        let mut rx = c.cluster_id.subscribe();
        let id = match rx.wait_for(|id| !id.is_empty()).await {
            Ok(id) => id.clone(),
            Err(_) => return,
        };
        let svc = match netsvc::ClusterNetSvc::open(&c.cfg.data_dir, &c.root_member, &c.cfg.root, &id) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot open the cluster network service: {e:#}");
                return;
            }
        };
        let _ = c.netsvc.set(svc.clone());
        let router = match crate::task::trusted(&c.authority, c.clone()) {
            Ok(r) => r,
            Err(e) => return tracing::error!("cluster network service TLS: {e:#}"),
        };
        if let Err(e) = netsvc::serve_listener(svc, netsvc_l, router).await {
            tracing::error!("cluster network service stopped: {e:#}");
        }
    });
    // Shutdown: stop accepting, end every worker session (they reconnect to the next incarnation).
    let stop_rx = cluster.stopping.subscribe();
    let c = cluster.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        c.stopping.send_replace(true);
        c.end_worker_sessions();
    });
    let mut stop_wait = stop_rx.clone();
    let grpc = crate::task::trusted(&cluster.authority, cluster.clone())?
        .add_service(pb::worker_registry_server::WorkerRegistryServer::new(workers::Registry {
            cluster: cluster.clone(),
        }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(workers_l), async move {
            let _ = stop_wait.wait_for(|v| *v).await;
        });
    let mut grace_wait = stop_rx.clone();
    let grace = async move {
        let _ = grace_wait.wait_for(|v| *v).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let r = tokio::select! {
        r = grpc => r.context("worker registry server"),
        _ = grace => {
            tracing::warn!("worker connections still open 5 s after shutdown began; stopping anyway");
            Ok(())
        }
    };
    tasks.abort_all();
    tracing::info!("cluster orchestrator stopped");
    r
}

#[cfg(test)]
mod tests;
