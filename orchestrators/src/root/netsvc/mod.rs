//! Root service manager (overlay address space owner), gRPC `oak.net.v1.RootNetService`, port 10099.
//!
//! Address plan (Oakestra's): worker /26 subnets from 10.18.0.0 upward, leased to clusters in /22 blocks
//! (16 workers per block, more blocks on demand); service IPs (round-robin + closest) from 10.30.0.0/16.
//! State lives in `<data-dir>/net.redb` (one redb table, one JSON document, rewritten per change inside a
//! write transaction, so a crash never leaves half an update), or, for a root whose store is on etcd, as
//! that document under the store's `net/state` key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use oak_proto::instance_key;
use oak_proto::net::v1 as pb;
use pb::root_net_service_server::{RootNetService, RootNetServiceServer};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::persisted::Persisted;

/// First worker subnet address.
pub const WORKER_SPACE: &str = "10.18.0.0/16";
/// Service IP space.
pub const SERVICE_SPACE: &str = "10.30.0.0/16";
/// Prefix of a cluster block (a /22 holds 16 worker /26 subnets).
pub const BLOCK_PREFIX: u8 = 22;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct ServiceRec {
    pub job_name: String,
    pub rr_ip: Option<Ipv4Addr>,
    pub closest_ip: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct InstanceRec {
    pub service_id: String,
    pub job_name: String,
    pub instance_number: u32,
    pub ns_ip: String,
    pub worker_ip: String,
    pub worker_port: u32,
    pub cluster_id: String,
    pub worker_subnet: String,
}

impl InstanceRec {
    pub(crate) fn from_pb(i: &pb::InstanceAddress) -> Self {
        Self {
            service_id: i.service_id.clone(),
            job_name: i.job_name.clone(),
            instance_number: i.instance_number,
            ns_ip: i.ns_ip.clone(),
            worker_ip: i.worker_ip.clone(),
            worker_port: i.worker_port,
            cluster_id: i.cluster_id.clone(),
            worker_subnet: i.worker_subnet.clone(),
        }
    }
    pub(crate) fn to_pb(&self) -> pb::InstanceAddress {
        pb::InstanceAddress {
            service_id: self.service_id.clone(),
            job_name: self.job_name.clone(),
            instance_number: self.instance_number,
            ns_ip: self.ns_ip.clone(),
            worker_ip: self.worker_ip.clone(),
            worker_port: self.worker_port,
            cluster_id: self.cluster_id.clone(),
            worker_subnet: self.worker_subnet.clone(),
        }
    }
    /// The key the instance is filed under (`service_id/instance_number`).
    pub(crate) fn key(&self) -> String {
        instance_key(&self.service_id, self.instance_number)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct RootState {
    /// block index (0 = 10.18.0.0/22) -> cluster id
    blocks: BTreeMap<u32, String>,
    /// service id -> addresses
    services: BTreeMap<String, ServiceRec>,
    /// instance key (`service_id/instance_number`) -> instance
    instances: BTreeMap<String, InstanceRec>,
    /// worker subnet -> its route, as the cluster that leased it reported
    #[serde(default)]
    routes: BTreeMap<String, RouteRec>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct RouteRec {
    cluster_id: String,
    worker_ip: String,
    worker_port: u32,
    #[serde(default)]
    source_ip: String,
}

/// Why service IPs could not be allocated. [`ServiceIpError::field`] names the SLA field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ServiceIpError {
    #[error("service_id is empty")]
    NoServiceId,
    #[error("addresses.{field} {ip} is outside the service address space {SERVICE_SPACE}")]
    OutsideSpace { field: &'static str, ip: Ipv4Addr },
    #[error("addresses.rr_ip and addresses.closest_ip must differ")]
    Same,
    #[error("addresses.{field} {ip} is already the address of service {job_name} ({service_id})")]
    Taken { field: &'static str, ip: Ipv4Addr, job_name: String, service_id: String },
    #[error("service address space {SERVICE_SPACE} exhausted")]
    Exhausted,
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl ServiceIpError {
    /// The `addresses` field the error is reported at (the round-robin address unless it is about the
    /// closest one); `None` when it is not the SLA's fault.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::OutsideSpace { field, .. } | Self::Taken { field, .. } => Some(field),
            Self::Same => Some("closest_ip"),
            Self::Exhausted => Some("rr_ip"),
            Self::NoServiceId | Self::Store(_) => None,
        }
    }
}

struct Inner {
    state: Persisted<RootState>,
    changes: tokio::sync::broadcast::Sender<pb::ServiceChanged>,
    /// Who may lease worker blocks, and how many (unset: anyone, any number; unit tests).
    policy: std::sync::OnceLock<LeasePolicy>,
}

/// Which clusters may lease worker blocks and how many each may hold.
pub struct LeasePolicy {
    /// Blocks (of 16 worker subnets each) one cluster may hold.
    pub max_blocks_per_cluster: u32,
    /// Whether a cluster id is one the root registered.
    pub is_registered: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

/// Handle to the root network service; cheap to clone. The root API calls
/// [`RootNetSvc::allocate_service_ips`] / [`RootNetSvc::release_service_ips`].
#[derive(Clone)]
pub struct RootNetSvc {
    inner: Arc<Inner>,
}

fn block_net(idx: u32) -> Ipv4Net {
    let base = u32::from(Ipv4Addr::new(10, 18, 0, 0));
    Ipv4Net::new(Ipv4Addr::from(base + (idx << (32 - BLOCK_PREFIX))), BLOCK_PREFIX).expect("valid block")
}

fn blocks_in_space() -> u32 {
    1 << (BLOCK_PREFIX - 16)
}

impl RootNetSvc {
    /// Open (or create) `<data_dir>/net.redb`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        Ok(Self::with_state(Persisted::open(&data_dir.join("net.redb"))?))
    }

    /// Open the plan kept in the root's store (`net/state`): a root on etcd keeps all its state there.
    pub fn open_in(store: &crate::root::store::Store) -> Result<Self> {
        use crate::root::store::{NET, NET_STATE};
        Ok(Self::with_state(Persisted::open_in(Box::new(store.document(NET, NET_STATE)))?))
    }

    /// Where the plan lives for a root with `store`: `<data_dir>/net.redb` beside the embedded store (where
    /// it always was), the store itself when that is etcd.
    pub fn open_for(store: &crate::root::store::Store, data_dir: &Path) -> Result<Self> {
        match store.location() {
            crate::root::store::Location::Embedded(_) => Self::open(data_dir),
            crate::root::store::Location::Etcd { .. } => Self::open_in(store),
        }
    }

    /// Loads the plan again from where it is kept (a replica taking over the leadership).
    pub fn reload(&self) -> Result<()> {
        self.inner.state.reload()
    }

    fn with_state(state: Persisted<RootState>) -> Self {
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        Self { inner: Arc::new(Inner { state, changes, policy: std::sync::OnceLock::new() }) }
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut RootState) -> Result<R>) -> Result<R> {
        self.try_mutate(f)
    }

    /// Applies `f` to a copy of the state and stores it; an error leaves the state untouched.
    fn try_mutate<R, E: From<anyhow::Error>>(&self, f: impl FnOnce(&mut RootState) -> Result<R, E>) -> Result<R, E> {
        self.inner.state.mutate(f)
    }

    fn notify(&self, service_id: &str, job_name: &str, origin: &str) {
        let _ = self.inner.changes.send(pb::ServiceChanged {
            service_id: service_id.into(),
            job_name: job_name.into(),
            origin_cluster_id: origin.into(),
            ..Default::default()
        });
    }

    /// Sets who may lease blocks and how many (once; the root does it at start).
    pub fn set_policy(&self, p: LeasePolicy) {
        let _ = self.inner.policy.set(p);
    }

    /// Lease a new /22 block of worker subnets to `cluster_id`. Returns (new block, all blocks of the cluster).
    pub fn lease_block(&self, cluster_id: &str) -> Result<(Ipv4Net, Vec<Ipv4Net>)> {
        if cluster_id.is_empty() {
            bail!("cluster_id is empty");
        }
        let policy = self.inner.policy.get();
        if let Some(p) = policy {
            if !(p.is_registered)(cluster_id) {
                bail!("cluster {cluster_id} is not registered with this root: only registered clusters lease worker subnets");
            }
        }
        self.mutate(|s| {
            let held = s.blocks.values().filter(|c| *c == cluster_id).count() as u32;
            if let Some(p) = policy.filter(|p| held >= p.max_blocks_per_cluster) {
                bail!(
                    "cluster {cluster_id} holds {held} worker subnet blocks, its quota (--max-blocks-per-cluster {}): \
                     no more worker subnets for it",
                    p.max_blocks_per_cluster
                );
            }
            let idx = (0..blocks_in_space()).find(|i| !s.blocks.contains_key(i)).with_context(|| {
                format!("worker address space {WORKER_SPACE} exhausted: all {} blocks leased", blocks_in_space())
            })?;
            s.blocks.insert(idx, cluster_id.to_string());
            let all = s.blocks.iter().filter(|(_, c)| *c == cluster_id).map(|(i, _)| block_net(*i)).collect();
            Ok((block_net(idx), all))
        })
    }

    /// Give back every block of a cluster (when the cluster is removed).
    pub fn release_cluster(&self, cluster_id: &str) -> Result<()> {
        let gone = self.mutate(|s| {
            s.blocks.retain(|_, c| c != cluster_id);
            s.instances.retain(|_, i| i.cluster_id != cluster_id);
            let gone: Vec<String> =
                s.routes.iter().filter(|(_, r)| r.cluster_id == cluster_id).map(|(n, _)| n.clone()).collect();
            s.routes.retain(|_, r| r.cluster_id != cluster_id);
            Ok(gone)
        })?;
        for subnet in gone {
            self.notify_route(cluster_id, pb::Route { subnet, ..Default::default() }, true);
        }
        Ok(())
    }

    fn notify_route(&self, origin: &str, route: pb::Route, removed: bool) {
        let _ = self.inner.changes.send(pb::ServiceChanged {
            origin_cluster_id: origin.into(),
            route: Some(route),
            route_removed: removed,
            ..Default::default()
        });
    }

    /// A cluster leased (or released) a worker subnet: it must lie in one of that cluster's blocks.
    pub fn report_route(&self, cluster_id: &str, route: &pb::Route, removed: bool) -> Result<()> {
        let net: Ipv4Net =
            route.subnet.parse().with_context(|| format!("route subnet {:?} is not a network", route.subnet))?;
        if !removed {
            route
                .worker_ip
                .parse::<Ipv4Addr>()
                .with_context(|| format!("worker_ip {:?} is not an IPv4 address", route.worker_ip))?;
        }
        let changed = self.mutate(|s| {
            let owner = s.blocks.iter().find(|(i, _)| block_net(**i).contains(&net)).map(|(_, c)| c.as_str());
            if owner != Some(cluster_id) {
                bail!("{net} is not in a block leased to cluster {cluster_id}");
            }
            let key = net.to_string();
            if removed {
                return Ok(s.routes.remove(&key).is_some());
            }
            let rec = RouteRec {
                cluster_id: cluster_id.into(),
                worker_ip: route.worker_ip.clone(),
                worker_port: route.worker_port,
                source_ip: route.source_ip.clone(),
            };
            Ok(s.routes.insert(key, rec.clone()) != Some(rec))
        })?;
        if changed {
            self.notify_route(cluster_id, pb::Route { subnet: net.to_string(), ..route.clone() }, removed);
        }
        Ok(())
    }

    /// Every worker route of every cluster.
    pub fn routes(&self) -> Vec<pb::ClusterRoute> {
        let s = self.inner.state.lock();
        s.routes
            .iter()
            .map(|(n, r)| pb::ClusterRoute {
                cluster_id: r.cluster_id.clone(),
                route: Some(pb::Route {
                    subnet: n.clone(),
                    worker_ip: r.worker_ip.clone(),
                    worker_port: r.worker_port,
                    source_ip: r.source_ip.clone(),
                }),
            })
            .collect()
    }

    /// Allocate the round-robin and closest service IPs of a service from 10.30.0.0/16. Idempotent: a
    /// service that already has addresses gets the same ones back. Never hands out an address in use.
    pub fn allocate_service_ips(
        &self,
        service_id: &str,
        job_name: &str,
    ) -> Result<(Ipv4Addr, Ipv4Addr), ServiceIpError> {
        self.allocate_service_ips_as(service_id, job_name, None, None)
    }

    /// Like [`Self::allocate_service_ips`], honouring addresses the SLA asks for (`addresses.rr_ip`,
    /// `addresses.closest_ip`): they must lie in 10.30.0.0/16 and not belong to another service.
    pub fn allocate_service_ips_as(
        &self,
        service_id: &str,
        job_name: &str,
        want_rr: Option<Ipv4Addr>,
        want_closest: Option<Ipv4Addr>,
    ) -> Result<(Ipv4Addr, Ipv4Addr), ServiceIpError> {
        if service_id.is_empty() {
            return Err(ServiceIpError::NoServiceId);
        }
        let space: Ipv4Net = SERVICE_SPACE.parse().expect("space");
        for (field, ip) in [("rr_ip", want_rr), ("closest_ip", want_closest)] {
            if let Some(ip) = ip {
                if !space.contains(&ip) || ip == space.network() || ip == space.broadcast() {
                    return Err(ServiceIpError::OutsideSpace { field, ip });
                }
            }
        }
        if want_rr.is_some() && want_rr == want_closest {
            return Err(ServiceIpError::Same);
        }
        self.try_mutate(|s| {
            for (field, ip) in [("rr_ip", want_rr), ("closest_ip", want_closest)] {
                let Some(ip) = ip else { continue };
                if let Some((other, r)) = s
                    .services
                    .iter()
                    .find(|(id, r)| id.as_str() != service_id && (r.rr_ip == Some(ip) || r.closest_ip == Some(ip)))
                {
                    return Err(ServiceIpError::Taken {
                        field,
                        ip,
                        job_name: r.job_name.clone(),
                        service_id: other.clone(),
                    });
                }
            }
            if let (Some(rr), Some(cl)) = (want_rr, want_closest) {
                let rec = s.services.entry(service_id.to_string()).or_default();
                rec.job_name = job_name.to_string();
                rec.rr_ip = Some(rr);
                rec.closest_ip = Some(cl);
                return Ok((rr, cl));
            }
            if let Some(rec) = s.services.get_mut(service_id) {
                if let (Some(rr), Some(cl)) = (rec.rr_ip, rec.closest_ip) {
                    if !job_name.is_empty() {
                        rec.job_name = job_name.to_string();
                    }
                    return Ok((rr, cl));
                }
            }
            let mut used: BTreeSet<Ipv4Addr> =
                s.services.values().flat_map(|r| [r.rr_ip, r.closest_ip]).flatten().collect();
            used.extend(want_rr.iter().chain(want_closest.iter()));
            // skip network address, .0.1 (reserved) and the broadcast address
            let mut free = space.hosts().skip(1).filter(|ip| !used.contains(ip));
            let rr = match want_rr {
                Some(ip) => ip,
                None => free.next().ok_or(ServiceIpError::Exhausted)?,
            };
            let cl = match want_closest {
                Some(ip) => ip,
                None => free.next().ok_or(ServiceIpError::Exhausted)?,
            };
            let rec = s.services.entry(service_id.to_string()).or_default();
            rec.job_name = job_name.to_string();
            rec.rr_ip = Some(rr);
            rec.closest_ip = Some(cl);
            Ok((rr, cl))
        })
        .inspect(|_| self.notify(service_id, job_name, ""))
    }

    /// Makes the service IPs agree with the services the root has stored (`stored`: id, job name, and the
    /// round-robin and closest IPs its record holds). Applications and service IPs are written in two
    /// stores, so a crash between the two writes leaves one without the other: the addresses of a service
    /// that is not stored are released, and a stored service whose addresses are missing gets them back.
    /// Answers the ids released and restored.
    pub fn reconcile_services(
        &self,
        stored: &[(String, String, Option<Ipv4Addr>, Option<Ipv4Addr>)],
    ) -> Result<(Vec<String>, Vec<String>)> {
        let live: BTreeSet<&str> = stored.iter().map(|(id, ..)| id.as_str()).collect();
        let released = self.mutate(|s| {
            let gone: Vec<(String, String)> = s
                .services
                .iter()
                .filter(|(id, _)| !live.contains(id.as_str()))
                .map(|(id, r)| (id.clone(), r.job_name.clone()))
                .collect();
            for (id, _) in &gone {
                s.services.remove(id);
                s.instances.retain(|_, i| &i.service_id != id);
            }
            Ok(gone)
        })?;
        for (id, job) in &released {
            self.notify(id, job, "");
        }
        let missing: Vec<_> = {
            let s = self.inner.state.lock();
            stored.iter().filter(|(id, ..)| !s.services.contains_key(id)).cloned().collect()
        };
        let mut restored = Vec::new();
        for (id, job, rr, cl) in missing {
            match self.allocate_service_ips_as(&id, &job, rr, cl) {
                Ok(_) => restored.push(id),
                Err(e) => tracing::error!(service_id = %id, job = %job, "restoring its service IPs: {e}"),
            }
        }
        Ok((released.into_iter().map(|(id, _)| id).collect(), restored))
    }

    /// Release the service IPs (and instance records) of a deleted service. Idempotent.
    pub fn release_service_ips(&self, service_id: &str) -> Result<()> {
        let removed = self.mutate(|s| {
            s.instances.retain(|_, i| i.service_id != service_id);
            Ok(s.services.remove(service_id))
        })?;
        if let Some(rec) = removed {
            self.notify(service_id, &rec.job_name, "");
        }
        Ok(())
    }

    /// Records an instance of cluster `cluster_id`: its address must lie in a block leased to it, and an
    /// instance another cluster registered stays that cluster's.
    pub fn register_instance(&self, cluster_id: &str, inst: &pb::InstanceAddress) -> Result<()> {
        if inst.service_id.is_empty() {
            bail!("service_id is empty");
        }
        let ip: Ipv4Addr =
            inst.ns_ip.parse().with_context(|| format!("ns_ip {:?} is not an IPv4 address", inst.ns_ip))?;
        let inst = &pb::InstanceAddress { cluster_id: cluster_id.to_string(), ..inst.clone() };
        let rec = InstanceRec::from_pb(inst);
        self.mutate(|s| {
            if !s.blocks.iter().any(|(i, c)| c == cluster_id && block_net(*i).contains(&ip)) {
                bail!("ns_ip {ip} is not in a worker subnet block leased to cluster {cluster_id}");
            }
            if let Some(other) = s.instances.get(&rec.key()).filter(|o| o.cluster_id != cluster_id) {
                bail!("instance {} is registered by cluster {}, not {cluster_id}", rec.key(), other.cluster_id);
            }
            let svc = s.services.entry(rec.service_id.clone()).or_default();
            if svc.job_name.is_empty() {
                svc.job_name = rec.job_name.clone();
            }
            s.instances.insert(rec.key(), rec);
            Ok(())
        })?;
        self.notify(&inst.service_id, &inst.job_name, &inst.cluster_id);
        Ok(())
    }

    /// Forgets an instance cluster `cluster_id` registered (another cluster's stays).
    pub fn deregister_instance(&self, cluster_id: &str, key: &pb::InstanceKey) -> Result<()> {
        let k = instance_key(&key.service_id, key.instance_number);
        let removed = self.mutate(|s| {
            if let Some(other) = s.instances.get(&k).filter(|o| o.cluster_id != cluster_id) {
                bail!("instance {k} is registered by cluster {}, not {cluster_id}", other.cluster_id);
            }
            Ok(s.instances.remove(&k))
        })?;
        if let Some(r) = removed {
            self.notify(&r.service_id, &r.job_name, &r.cluster_id);
        }
        Ok(())
    }

    /// Change notifications (what the Watch RPC streams).
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<pb::ServiceChanged> {
        self.inner.changes.subscribe()
    }

    /// Resolve a service by job name or service IP to its addresses and instances across clusters.
    pub fn resolve(&self, job_name: &str, service_ip: &str) -> Option<pb::ServiceAddresses> {
        let s = self.inner.state.lock();
        let ip: Option<Ipv4Addr> = service_ip.parse().ok();
        let (id, rec) = s.services.iter().find(|(_, r)| {
            (!job_name.is_empty() && r.job_name == job_name) || (ip.is_some() && (r.rr_ip == ip || r.closest_ip == ip))
        })?;
        Some(pb::ServiceAddresses {
            service_id: id.clone(),
            job_name: rec.job_name.clone(),
            rr_ip: rec.rr_ip.map(|i| i.to_string()).unwrap_or_default(),
            closest_ip: rec.closest_ip.map(|i| i.to_string()).unwrap_or_default(),
            instances: s.instances.values().filter(|i| &i.service_id == id).map(InstanceRec::to_pb).collect(),
        })
    }

    /// The tonic service, for mounting on a server.
    pub fn grpc(&self) -> RootNetServiceServer<RootNetSvc> {
        RootNetServiceServer::new(self.clone())
    }
}

/// The calling cluster (from its certificate); a request naming another cluster is refused.
fn caller<T>(req: &Request<T>, named: &str) -> Result<String, Status> {
    let cid = oak_trust::require(req, "cluster")?;
    if !named.is_empty() && named != cid {
        return Err(Status::permission_denied(format!("cluster {cid} asked on behalf of cluster {named}")));
    }
    Ok(cid)
}

#[tonic::async_trait]
impl RootNetService for RootNetSvc {
    async fn lease_block(&self, req: Request<pb::LeaseBlockRequest>) -> Result<Response<pb::LeaseBlockReply>, Status> {
        let cid = caller(&req, &req.get_ref().cluster_id)?;
        let (block, all) = self.lease_block(&cid).map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        tracing::info!(cluster = %cid, %block, "leased worker subnet block");
        Ok(Response::new(pb::LeaseBlockReply {
            block: block.to_string(),
            all_blocks: all.iter().map(|b| b.to_string()).collect(),
        }))
    }
    async fn report_route(&self, req: Request<pb::RouteReport>) -> Result<Response<pb::Ack>, Status> {
        let cid = caller(&req, &req.get_ref().cluster_id)?;
        let r = req.into_inner();
        let route = r.route.ok_or_else(|| Status::invalid_argument("route missing"))?;
        self.report_route(&cid, &route, r.removed).map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn routes(&self, req: Request<pb::RoutesRequest>) -> Result<Response<pb::RoutesReply>, Status> {
        oak_trust::require(&req, "cluster")?;
        Ok(Response::new(pb::RoutesReply { routes: self.routes() }))
    }
    type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ServiceChanged, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        caller(&req, &req.get_ref().cluster_id)?;
        use futures::StreamExt;
        let rx = self.watch();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| async move {
            match r {
                Ok(c) => Some(Ok(c)),
                Err(e) => {
                    tracing::warn!(error = %e, "a watcher lagged behind; some change notifications were dropped");
                    None
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_instance(&self, req: Request<pb::InstanceAddress>) -> Result<Response<pb::Ack>, Status> {
        let cid = oak_trust::require(&req, "cluster")?;
        self.register_instance(&cid, &req.into_inner()).map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn deregister_instance(&self, req: Request<pb::InstanceKey>) -> Result<Response<pb::Ack>, Status> {
        let cid = oak_trust::require(&req, "cluster")?;
        self.deregister_instance(&cid, &req.into_inner()).map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveReply>, Status> {
        oak_trust::require(&req, "cluster")?;
        let r = req.into_inner();
        if r.job_name.is_empty() && r.service_ip.is_empty() {
            return Err(Status::invalid_argument("resolve needs job_name or service_ip"));
        }
        let service = self.resolve(&r.job_name, &r.service_ip);
        Ok(Response::new(pb::ResolveReply { found: service.is_some(), service }))
    }
}

/// Serves on a bound listener until the process ends (tests bind port 0 first): TLS with the root's
/// certificate; clusters call with theirs, and may join here too.
pub async fn serve_listener(
    svc: RootNetSvc,
    listener: tokio::net::TcpListener,
    trust: tonic::transport::server::Router,
) -> Result<()> {
    let router = trust.add_service(svc.grpc());
    crate::task::serve_grpc("root network service", router, listener).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_do_not_overlap_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let svc = RootNetSvc::open(dir.path()).unwrap();
        let (a, _) = svc.lease_block("c1").unwrap();
        let (b, all) = svc.lease_block("c1").unwrap();
        let (c, _) = svc.lease_block("c2").unwrap();
        assert_eq!(a.to_string(), "10.18.0.0/22");
        assert_eq!(b.to_string(), "10.18.4.0/22");
        assert_eq!(all.len(), 2);
        assert_eq!(c.to_string(), "10.18.8.0/22");
        drop(svc);
        let svc = RootNetSvc::open(dir.path()).unwrap();
        let (d, _) = svc.lease_block("c3").unwrap();
        assert_eq!(d.to_string(), "10.18.12.0/22");
        svc.release_cluster("c1").unwrap();
        let (e, _) = svc.lease_block("c4").unwrap();
        assert_eq!(e.to_string(), "10.18.0.0/22");
    }

    #[test]
    fn block_exhaustion_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let svc = RootNetSvc::open(dir.path()).unwrap();
        for _ in 0..blocks_in_space() {
            svc.lease_block("c").unwrap();
        }
        let err = svc.lease_block("c").unwrap_err().to_string();
        assert!(err.contains("exhausted"), "{err}");
    }

    #[test]
    fn service_ips_unique_idempotent_released() {
        let dir = tempfile::tempdir().unwrap();
        let svc = RootNetSvc::open(dir.path()).unwrap();
        let (rr1, cl1) = svc.allocate_service_ips("s1", "a.b.c.d").unwrap();
        let (rr2, cl2) = svc.allocate_service_ips("s2", "a.b.e.f").unwrap();
        let all: BTreeSet<_> = [rr1, cl1, rr2, cl2].into_iter().collect();
        assert_eq!(all.len(), 4);
        let space: Ipv4Net = SERVICE_SPACE.parse().unwrap();
        assert!(all.iter().all(|ip| space.contains(ip)));
        assert_eq!(svc.allocate_service_ips("s1", "a.b.c.d").unwrap(), (rr1, cl1));
        svc.release_service_ips("s1").unwrap();
        drop(svc);
        let svc = RootNetSvc::open(dir.path()).unwrap();
        assert_eq!(svc.allocate_service_ips("s2", "a.b.e.f").unwrap(), (rr2, cl2));
        let (rr3, cl3) = svc.allocate_service_ips("s3", "x.y.z.w").unwrap();
        assert!(![rr3, cl3].contains(&rr2) && ![rr3, cl3].contains(&cl2));
        // resolve by name and by ip
        svc.lease_block("c").unwrap();
        svc.register_instance(
            "c",
            &pb::InstanceAddress {
                service_id: "s2".into(),
                job_name: "a.b.e.f".into(),
                instance_number: 0,
                ns_ip: "10.18.0.2".into(),
                worker_ip: "192.0.2.1".into(),
                worker_port: 50103,
                cluster_id: "c".into(),
                worker_subnet: "10.18.0.0/26".into(),
            },
        )
        .unwrap();
        let r = svc.resolve("", &cl2.to_string()).unwrap();
        assert_eq!(r.job_name, "a.b.e.f");
        assert_eq!(r.instances.len(), 1);
        assert!(svc.resolve("nope", "").is_none());
    }
}
