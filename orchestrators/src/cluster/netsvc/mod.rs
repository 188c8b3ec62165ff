//! Cluster network service, gRPC `oak.net.v1.ClusterNetService`, port 10110.
//!
//! Leases a /26 worker subnet to each NetManager out of the /22 blocks the root leased to this cluster
//! (more blocks on demand), persists the leases in `<data-dir>/net.redb` (the same node gets its subnet
//! back; released when the worker is removed), registers instance addresses (and forwards them to the
//! root), resolves services (local instances first, then the root), and pushes route and service changes
//! to subscribed NetManagers over a server stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use oak_proto::instance_key;
use oak_proto::net::v1 as pb;
use parking_lot::Mutex;
use pb::cluster_net_service_server::{ClusterNetService, ClusterNetServiceServer};
use pb::root_net_service_client::RootNetServiceClient;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::persisted::Persisted;
use crate::root::netsvc::InstanceRec;

/// Prefix of a worker subnet.
pub const WORKER_PREFIX: u8 = 26;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Lease {
    subnet: Ipv4Net,
    public_ip: String,
    tunnel_port: u32,
    /// The NetManager that leased it (its id, from its certificate): only it may use or release it.
    #[serde(default)]
    owner: String,
    /// The address its lease came from (see `Route.source_ip`).
    #[serde(default)]
    source_ip: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct ClusterState {
    blocks: Vec<Ipv4Net>,
    leases: BTreeMap<String, Lease>,
    instances: BTreeMap<String, InstanceRec>,
}

struct Subscriber {
    node: String,
    tx: mpsc::Sender<Result<pb::NetUpdate, Status>>,
    /// service_id -> job_name
    interests: HashMap<String, String>,
}

struct Inner {
    state: Persisted<ClusterState>,
    cluster_id: String,
    /// A client per root replica (none: no root, tests only), used as `replicas` says.
    roots: Vec<RootNetServiceClient<Channel>>,
    replicas: super::RootReplicas,
    subs: Mutex<HashMap<u64, Subscriber>>,
    /// Worker routes of other clusters (from the root; refreshed on every watch connection).
    foreign: Mutex<BTreeMap<String, pb::Route>>,
    next_sub: Mutex<u64>,
    /// serialises lease allocation (which may await the root)
    lease_lock: tokio::sync::Mutex<()>,
}

/// Handle to the cluster network service; cheap to clone. The cluster orchestrator calls
/// [`ClusterNetSvc::release_worker`] when it removes a worker.
#[derive(Clone)]
pub struct ClusterNetSvc {
    inner: Arc<Inner>,
}

fn route_of(lease: &Lease) -> pb::Route {
    pb::Route {
        subnet: lease.subnet.to_string(),
        worker_ip: lease.public_ip.clone(),
        worker_port: lease.tunnel_port,
        source_ip: lease.source_ip.clone(),
    }
}

/// The `source_ip` a lease records from the address its request came from: an IPv4 source (also one
/// IPv4-mapped by a `[::]` listener) is a second address the worker's tunnel datagrams may come from; an
/// IPv6 source is not (the tunnel is IPv4: a worker that reached its cluster over IPv6 is known by its
/// advertised endpoint only), so it is left out.
fn tunnel_source(source: Option<std::net::IpAddr>) -> String {
    match source.map(oak_proto::endpoint::observed) {
        Some(std::net::IpAddr::V4(a)) => a.to_string(),
        Some(std::net::IpAddr::V6(_)) | None => String::new(),
    }
}

fn update(u: pb::net_update::Update) -> pb::NetUpdate {
    pb::NetUpdate { update: Some(u) }
}

impl ClusterNetSvc {
    /// Open `<data_dir>/net.redb`; the root's network service at the replicas' URLs (like
    /// "http://root:10099"), called as `member` (the cluster, joined); an empty URL: no root (tests only:
    /// then no block can be leased).
    pub fn open(
        data_dir: &Path,
        member: &oak_trust::Member,
        replicas: &super::RootReplicas,
        cluster_id: &str,
    ) -> Result<Self> {
        let state = Persisted::open(&data_dir.join("net.redb"))?;
        let mut roots = Vec::new();
        // one client per replica, in the replicas' order (an empty URL: no root at all, tests only)
        for u in replicas.netsvc_urls().iter().filter(|u| !u.is_empty()) {
            let url = if u.contains("://") { u.to_string() } else { format!("http://{u}") };
            let ch = member
                .lazy_channel(&url, |ep| ep.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(10)))
                .with_context(|| format!("the root network service {url}"))?;
            roots.push(RootNetServiceClient::new(ch));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                cluster_id: cluster_id.to_string(),
                roots,
                replicas: replicas.clone(),
                subs: Mutex::new(HashMap::new()),
                foreign: Mutex::new(BTreeMap::new()),
                next_sub: Mutex::new(0),
                lease_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The root network service of the replica the cluster's session is with (None: no root).
    fn root(&self) -> Option<RootNetServiceClient<Channel>> {
        // (without an empty URL among them, the clients line up with the replicas)
        let n = self.inner.roots.len();
        (n > 0).then(|| self.inner.roots[self.inner.replicas.current() % n].clone())
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut ClusterState) -> Result<R>) -> Result<R> {
        self.inner.state.mutate(f)
    }

    fn broadcast(&self, u: pb::NetUpdate, service_id: Option<&str>) {
        let mut subs = self.inner.subs.lock();
        subs.retain(|_, s| {
            if let Some(id) = service_id {
                if !s.interests.contains_key(id) {
                    return true;
                }
            }
            match s.tx.try_send(Ok(u.clone())) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(node = %s.node, "subscriber too slow; dropping its subscription (it resubscribes)");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn free_subnet(s: &ClusterState) -> Option<Ipv4Net> {
        let used: HashSet<Ipv4Net> = s.leases.values().map(|l| l.subnet).collect();
        s.blocks.iter().flat_map(|b| b.subnets(WORKER_PREFIX).expect("prefix")).find(|n| !used.contains(n))
    }

    /// Lease (or return the existing) /26 of `node` to NetManager `owner`: a node's subnet stays with the
    /// NetManager that leased it first, and a NetManager holds one subnet (one worker).
    pub async fn lease_subnet(
        &self,
        owner: &str,
        node: &str,
        public_ip: &str,
        tunnel_port: u32,
        source: Option<std::net::IpAddr>,
    ) -> Result<Ipv4Net, Status> {
        if node.is_empty() || node.len() > 128 {
            return Err(Status::invalid_argument("node must be 1..128 characters"));
        }
        // checked and leased under one lock: two leases of one NetManager cannot both pass the checks
        let _g = self.inner.lease_lock.lock().await;
        {
            let s = self.inner.state.lock();
            if let Some(l) = s.leases.get(node).filter(|l| !l.owner.is_empty() && l.owner != owner) {
                return Err(Status::permission_denied(format!(
                    "the subnet of node {node} is held by netmanager/{}, not netmanager/{owner}",
                    l.owner
                )));
            }
            if let Some((other, _)) = s.leases.iter().find(|(n, l)| l.owner == owner && n.as_str() != node) {
                return Err(Status::resource_exhausted(format!(
                    "netmanager/{owner} already holds the subnet of node {other}: one worker subnet per NetManager"
                )));
            }
        }
        let source = tunnel_source(source);
        self.lease_for(owner, node, public_ip, tunnel_port, source)
            .await
            .map_err(|e| Status::resource_exhausted(format!("{e:#}")))
    }

    /// (The caller holds `lease_lock`.)
    async fn lease_for(
        &self,
        owner: &str,
        node: &str,
        public_ip: &str,
        tunnel_port: u32,
        source_ip: String,
    ) -> Result<Ipv4Net> {
        let lease = Lease {
            subnet: "0.0.0.0/26".parse()?,
            public_ip: public_ip.to_string(),
            tunnel_port,
            owner: owner.to_string(),
            source_ip,
        };
        let existing = {
            let s = self.inner.state.lock();
            s.leases.get(node).map(|l| l.subnet).or_else(|| Self::free_subnet(&s).map(|_| Ipv4Net::default()))
        };
        if existing.is_none() {
            // need another block from the root
            let Some(root) = self.root() else {
                bail!("no free worker subnet and no root network service configured");
            };
            let reply = root
                .clone()
                .lease_block(pb::LeaseBlockRequest { cluster_id: self.inner.cluster_id.clone() })
                .await
                .map_err(|e| anyhow::anyhow!("root network service: {}", e.message()))?
                .into_inner();
            let block: Ipv4Net =
                reply.block.parse().with_context(|| format!("root sent a malformed block {:?}", reply.block))?;
            tracing::info!(%block, "got worker subnet block from root");
            self.mutate(|s| {
                if !s.blocks.contains(&block) {
                    s.blocks.push(block);
                }
                Ok(())
            })?;
        }
        let (subnet, changed) = self.mutate(|s| {
            let subnet = match s.leases.get(node) {
                Some(l) => l.subnet,
                None => Self::free_subnet(s).with_context(|| {
                    format!("worker subnet pool of this cluster exhausted ({} blocks)", s.blocks.len())
                })?,
            };
            let new = Lease { subnet, ..lease };
            let changed = s.leases.get(node) != Some(&new);
            s.leases.insert(node.to_string(), new);
            Ok((subnet, changed))
        })?;
        if changed {
            let l = self.inner.state.lock().leases[node].clone();
            self.broadcast(update(pb::net_update::Update::RouteAdded(route_of(&l))), None);
            self.report_route(route_of(&l), false);
        }
        tracing::info!(%node, %subnet, "leased worker subnet");
        Ok(subnet)
    }

    /// Release the subnet of a removed worker (idempotent). Its instances are dropped too.
    pub fn release_worker(&self, node: &str) -> Result<()> {
        let removed = self.mutate(|s| {
            let l = s.leases.remove(node);
            if let Some(l) = &l {
                let net = l.subnet.to_string();
                s.instances.retain(|_, i| i.worker_subnet != net);
            }
            Ok(l)
        })?;
        if let Some(l) = removed {
            self.broadcast(update(pb::net_update::Update::RouteRemoved(l.subnet.to_string())), None);
            self.report_route(route_of(&l), true);
        }
        Ok(())
    }

    /// Tells the root about a worker route (best effort: every watch connection reports all of them again).
    fn report_route(&self, route: pb::Route, removed: bool) {
        let Some(root) = self.root() else { return };
        let cluster_id = self.inner.cluster_id.clone();
        tokio::spawn(async move {
            let r = pb::RouteReport { cluster_id, route: Some(route), removed };
            if let Err(e) = root.clone().report_route(r).await {
                tracing::warn!(error = %e.message(), "could not report a worker route to the root (reported again on reconnect)");
            }
        });
    }

    /// Replaces the other clusters' routes with the root's list and pushes the difference.
    fn set_foreign_routes(&self, routes: Vec<pb::ClusterRoute>) {
        let own = self.inner.cluster_id.clone();
        let new: BTreeMap<String, pb::Route> = routes
            .into_iter()
            .filter(|r| r.cluster_id != own)
            .filter_map(|r| r.route)
            .map(|r| (r.subnet.clone(), r))
            .collect();
        let old = std::mem::replace(&mut *self.inner.foreign.lock(), new.clone());
        for (net, r) in &new {
            if old.get(net) != Some(r) {
                self.broadcast(update(pb::net_update::Update::RouteAdded(r.clone())), None);
            }
        }
        for net in old.keys().filter(|n| !new.contains_key(*n)) {
            self.broadcast(update(pb::net_update::Update::RouteRemoved(net.clone())), None);
        }
    }

    fn foreign_route_changed(&self, route: pb::Route, removed: bool) {
        let mut f = self.inner.foreign.lock();
        if removed {
            if f.remove(&route.subnet).is_some() {
                drop(f);
                self.broadcast(update(pb::net_update::Update::RouteRemoved(route.subnet)), None);
            }
        } else if f.get(&route.subnet) != Some(&route) {
            f.insert(route.subnet.clone(), route.clone());
            drop(f);
            self.broadcast(update(pb::net_update::Update::RouteAdded(route)), None);
        }
    }

    /// The subnet currently leased to `node`.
    pub fn subnet_of(&self, node: &str) -> Option<Ipv4Net> {
        self.inner.state.lock().leases.get(node).map(|l| l.subnet)
    }

    fn local_service(&self, job_name: &str, service_id: &str) -> Option<pb::ServiceAddresses> {
        let s = self.inner.state.lock();
        let inst: Vec<_> = s
            .instances
            .values()
            .filter(|i| {
                (!job_name.is_empty() && i.job_name == job_name)
                    || (!service_id.is_empty() && i.service_id == service_id)
            })
            .map(InstanceRec::to_pb)
            .collect();
        let first = inst.first()?;
        Some(pb::ServiceAddresses {
            service_id: first.service_id.clone(),
            job_name: first.job_name.clone(),
            rr_ip: String::new(),
            closest_ip: String::new(),
            instances: inst,
        })
    }

    /// Local instances first; the root adds service IPs and instances of other clusters.
    pub async fn resolve(&self, job_name: &str, service_ip: &str) -> Result<Option<pb::ServiceAddresses>> {
        let local = if job_name.is_empty() { None } else { self.local_service(job_name, "") };
        let Some(root) = self.root() else { return Ok(local) };
        let req =
            pb::ResolveRequest { job_name: job_name.into(), service_ip: service_ip.into(), subscriber: String::new() };
        match root.clone().resolve(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let Some(mut svc) = r.service else { return Ok(local) };
                // local records are authoritative for this cluster's instances
                let local = self.local_service("", &svc.service_id);
                if let Some(local) = local {
                    svc.instances.retain(|i| i.cluster_id != self.inner.cluster_id);
                    svc.instances.extend(local.instances);
                }
                Ok(Some(svc))
            }
            Err(e) if local.is_some() => {
                tracing::warn!(error = %e.message(), "root network service unreachable; answering from local instances");
                Ok(local)
            }
            Err(e) => bail!("root network service: {}", e.message()),
        }
    }

    async fn push_service(&self, service_id: &str, job_name: &str) {
        let interested = self.inner.subs.lock().values().any(|s| s.interests.contains_key(service_id));
        if !interested {
            return;
        }
        match self.resolve(job_name, "").await {
            Ok(Some(svc)) => self.broadcast(update(pb::net_update::Update::Service(svc)), Some(service_id)),
            Ok(None) => {
                self.broadcast(update(pb::net_update::Update::ServiceRemoved(service_id.to_string())), Some(service_id))
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot refresh service for subscribers"),
        }
    }

    /// The subnet NetManager `owner` holds.
    fn subnet_owned_by(&self, owner: &str) -> Option<Ipv4Net> {
        self.inner.state.lock().leases.values().find(|l| l.owner == owner).map(|l| l.subnet)
    }

    /// Records an instance of NetManager `owner`'s worker: its address must be in that worker's subnet.
    pub async fn register_instance(&self, owner: &str, mut inst: pb::InstanceAddress) -> Result<()> {
        if inst.service_id.is_empty() || inst.job_name.is_empty() {
            bail!("service_id and job_name are required");
        }
        let ip: Ipv4Addr =
            inst.ns_ip.parse().with_context(|| format!("ns_ip {:?} is not an IPv4 address", inst.ns_ip))?;
        let subnet =
            self.subnet_owned_by(owner).with_context(|| format!("netmanager/{owner} holds no worker subnet"))?;
        if !subnet.contains(&ip) {
            bail!("ns_ip {ip} is not in {subnet}, the subnet of netmanager/{owner}");
        }
        let k = instance_key(&inst.service_id, inst.instance_number);
        if let Some(other) = self.inner.state.lock().instances.get(&k).filter(|o| o.worker_subnet != subnet.to_string())
        {
            bail!("instance {k} is registered in {}, another worker's subnet", other.worker_subnet);
        }
        inst.worker_subnet = subnet.to_string();
        inst.cluster_id = self.inner.cluster_id.clone();
        let rec = InstanceRec::from_pb(&inst);
        self.mutate(|s| {
            s.instances.insert(rec.key(), rec.clone());
            Ok(())
        })?;
        if let Some(root) = self.root() {
            if let Err(e) = root.clone().register_instance(inst.clone()).await {
                tracing::warn!(error = %e.message(), "could not forward instance address to root");
            }
        }
        self.push_service(&inst.service_id, &inst.job_name).await;
        Ok(())
    }

    /// Forgets an instance of NetManager `owner`'s worker (another worker's stays).
    pub async fn deregister_instance(&self, owner: &str, key: pb::InstanceKey) -> Result<()> {
        let subnet = self.subnet_owned_by(owner).map(|s| s.to_string()).unwrap_or_default();
        let k = instance_key(&key.service_id, key.instance_number);
        let removed = self.mutate(|s| {
            if let Some(other) = s.instances.get(&k).filter(|o| o.worker_subnet != subnet) {
                bail!("instance {k} is registered in {}, not in the subnet of netmanager/{owner}", other.worker_subnet);
            }
            Ok(s.instances.remove(&k))
        })?;
        if let Some(root) = self.root() {
            if let Err(e) = root.clone().deregister_instance(key.clone()).await {
                tracing::warn!(error = %e.message(), "could not forward instance removal to root");
            }
        }
        let job = removed.map(|r| r.job_name).unwrap_or(key.job_name);
        self.push_service(&key.service_id, &job).await;
        Ok(())
    }

    /// Follow the root's change notifications and push fresh resolutions of services some subscriber is
    /// interested in (changes in other clusters, service IPs allocated later). Reconnects forever.
    pub fn spawn_root_watch(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.root()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            use futures::StreamExt;
            let mut backoff = Duration::from_millis(200);
            loop {
                // the replica the cluster's session is with now
                let Some(root) = this.root() else { return };
                match root.clone().watch(pb::WatchRequest { cluster_id: this.inner.cluster_id.clone() }).await {
                    Ok(stream) => {
                        backoff = Duration::from_millis(200);
                        let mut stream = stream.into_inner();
                        // our routes to the root, the others' routes from it
                        let own: Vec<pb::Route> = this.inner.state.lock().leases.values().map(route_of).collect();
                        for r in own {
                            this.report_route(r, false);
                        }
                        match root.clone().routes(pb::RoutesRequest {}).await {
                            Ok(r) => this.set_foreign_routes(r.into_inner().routes),
                            Err(e) => {
                                tracing::warn!(error = %e.message(), "cannot fetch other clusters' routes from the root")
                            }
                        }
                        // catch up on whatever changed while we were not watching
                        let interests: HashMap<String, String> =
                            this.inner.subs.lock().values().flat_map(|s| s.interests.clone()).collect();
                        for (id, job) in interests {
                            this.push_service(&id, &job).await;
                        }
                        let mut switched = this.inner.replicas.switched();
                        switched.borrow_and_update();
                        loop {
                            let change = tokio::select! {
                                m = stream.next() => match m {
                                    Some(Ok(c)) => c,
                                    _ => break,
                                },
                                // the session moved to another replica (this one may not lead any more)
                                _ = switched.changed() => break,
                            };
                            if change.origin_cluster_id == this.inner.cluster_id {
                                continue; // already pushed when it happened here
                            }
                            if let Some(route) = change.route {
                                this.foreign_route_changed(route, change.route_removed);
                                continue;
                            }
                            this.push_service(&change.service_id, &change.job_name).await;
                        }
                        tracing::warn!("root network service watch ended; reconnecting");
                    }
                    Err(e) => tracing::debug!(error = %e.message(), "cannot watch the root network service; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }))
    }

    pub fn grpc(&self) -> ClusterNetServiceServer<ClusterNetSvc> {
        ClusterNetServiceServer::new(self.clone())
    }
}

type UpdateStream = Pin<Box<dyn futures::Stream<Item = Result<pb::NetUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterNetService for ClusterNetSvc {
    async fn lease_subnet(
        &self,
        req: Request<pb::LeaseSubnetRequest>,
    ) -> Result<Response<pb::LeaseSubnetReply>, Status> {
        let owner = oak_trust::require(&req, "netmanager")?;
        // where the request came from, as this cluster sees it: told back, so a NetManager can see when it
        // advertises another address ("Wrong Node IP")
        let source = req.remote_addr().map(|a| oak_proto::endpoint::observed(a.ip()));
        let r = req.into_inner();
        let subnet = self.lease_subnet(&owner, &r.node, &r.public_ip, r.tunnel_port, source).await?;
        let observed_ip = source.map(|a| a.to_string()).unwrap_or_default();
        if !observed_ip.is_empty() && observed_ip != r.public_ip {
            tracing::info!(node = %r.node, advertised = %r.public_ip, observed = %observed_ip, "a NetManager advertises another tunnel endpoint than the address its lease came from");
        }
        Ok(Response::new(pb::LeaseSubnetReply {
            subnet: subnet.to_string(),
            cluster_id: self.inner.cluster_id.clone(),
            observed_ip,
        }))
    }
    async fn release_subnet(&self, req: Request<pb::ReleaseSubnetRequest>) -> Result<Response<pb::Ack>, Status> {
        let owner = oak_trust::require(&req, "netmanager")?;
        let node = req.into_inner().node;
        if let Some(l) = self.inner.state.lock().leases.get(&node).filter(|l| l.owner != owner) {
            return Err(Status::permission_denied(format!(
                "the subnet of node {node} is held by netmanager/{}, not netmanager/{owner}",
                l.owner
            )));
        }
        self.release_worker(&node).map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn register_instance(&self, req: Request<pb::InstanceAddress>) -> Result<Response<pb::Ack>, Status> {
        let owner = oak_trust::require(&req, "netmanager")?;
        self.register_instance(&owner, req.into_inner())
            .await
            .map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn deregister_instance(&self, req: Request<pb::InstanceKey>) -> Result<Response<pb::Ack>, Status> {
        let owner = oak_trust::require(&req, "netmanager")?;
        self.deregister_instance(&owner, req.into_inner())
            .await
            .map_err(|e| Status::permission_denied(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveReply>, Status> {
        let caller = oak_trust::require(&req, "netmanager")?;
        let r = req.into_inner();
        if r.job_name.is_empty() && r.service_ip.is_empty() {
            return Err(Status::invalid_argument("resolve needs job_name or service_ip"));
        }
        let service =
            self.resolve(&r.job_name, &r.service_ip).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        if let (Some(svc), false) = (&service, r.subscriber.is_empty()) {
            // the caller's own subscription (the subscriber field only says it wants pushes)
            for s in self.inner.subs.lock().values_mut() {
                if s.node == caller {
                    s.interests.insert(svc.service_id.clone(), svc.job_name.clone());
                }
            }
        }
        Ok(Response::new(pb::ResolveReply { found: service.is_some(), service }))
    }

    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<UpdateStream>, Status> {
        // subscriptions are keyed by the caller's identity, not by a name it sends
        let node = oak_trust::require(&req, "netmanager")?;
        let initial = self.inner.state.lock().leases.len() + self.inner.foreign.lock().len();
        let (tx, rx) = mpsc::channel(1024 + initial);
        for l in self.inner.state.lock().leases.values() {
            let _ = tx.try_send(Ok(update(pb::net_update::Update::RouteAdded(route_of(l)))));
        }
        for r in self.inner.foreign.lock().values() {
            let _ = tx.try_send(Ok(update(pb::net_update::Update::RouteAdded(r.clone()))));
        }
        let id = {
            let mut n = self.inner.next_sub.lock();
            *n += 1;
            *n
        };
        // a node re-subscribing replaces its old subscription
        let mut subs = self.inner.subs.lock();
        subs.retain(|_, s| s.node != node);
        subs.insert(id, Subscriber { node, tx, interests: HashMap::new() });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Serves on a bound listener until the process ends (tests bind port 0 first), following the root's
/// changes meanwhile.
pub async fn serve_listener(
    svc: ClusterNetSvc,
    listener: tokio::net::TcpListener,
    trust: tonic::transport::server::Router,
) -> Result<()> {
    let _watch = svc.spawn_root_watch().map(crate::task::AbortOnDrop);
    let router = trust.add_service(svc.grpc());
    crate::task::serve_grpc("cluster network service", router, listener).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::netsvc::RootNetSvc;
    use crate::testing::Admit;
    use oak_trust::{Authority, Member};

    struct Root {
        url: String,
        authority: Arc<Authority>,
    }

    async fn setup() -> (tempfile::TempDir, RootNetSvc, Root) {
        let dir = tempfile::tempdir().unwrap();
        let authority =
            Arc::new(Authority::open(&dir.path().join("root/ca"), "root CA", oak_trust::ROOT_SERVER).unwrap());
        let svc = RootNetSvc::open(&dir.path().join("root")).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let trust = crate::task::trusted(&authority, Arc::new(Admit(&["cluster"]))).unwrap();
        tokio::spawn(crate::root::netsvc::serve_listener(svc.clone(), l, trust));
        (dir, svc, Root { url, authority })
    }

    /// A cluster that joined `root` (its certificate in `<dir>/identity`): its member and id.
    async fn join(dir: &Path, root: &Root) -> (Member, String) {
        let (token, _) = root.authority.tokens.create(&root.authority.pin(), 0, "").unwrap();
        let m = Member::new(&root.url, oak_trust::ROOT_SERVER, "cluster", "c", &token, dir.join("identity"));
        let id = m.ensure_joined().await.unwrap().identity.id;
        (m, id)
    }

    async fn open_cluster(dir: &Path, root: &Root) -> (ClusterNetSvc, String) {
        let (m, id) = join(dir, root).await;
        (ClusterNetSvc::open(dir, &m, &crate::cluster::RootReplicas::one("", &root.url), &id).unwrap(), id)
    }

    /// Serves `c` with its own CA; a NetManager of it (joined) as a gRPC client, and its id.
    async fn serve_cluster(dir: &Path, c: &ClusterNetSvc) -> (Arc<Authority>, String) {
        let a = Arc::new(Authority::open(&dir.join("ca"), "cluster CA", oak_trust::CLUSTER_SERVER).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let trust = crate::task::trusted(&a, Arc::new(Admit(&["node", "netmanager"]))).unwrap();
        tokio::spawn(serve_listener(c.clone(), l, trust));
        (a, url)
    }

    async fn netmanager(
        a: &Authority,
        url: &str,
        kind: &'static str,
    ) -> (pb::cluster_net_service_client::ClusterNetServiceClient<Channel>, String) {
        let (token, _) = a.tokens.create(&a.pin(), 0, "").unwrap();
        let m = Member::in_memory(url, oak_trust::CLUSTER_SERVER, kind, "w", &token);
        let (ch, c) = m.channel(url, |e| e).await.unwrap();
        (pb::cluster_net_service_client::ClusterNetServiceClient::new(ch), c.identity.id)
    }

    #[tokio::test]
    async fn worker_leases_no_overlap_persist_and_release() {
        let (dir, _root, root) = setup().await;
        let cdir = dir.path().join("cluster");
        let (c, id) = open_cluster(&cdir, &root).await;
        let mut seen = HashSet::new();
        for i in 0..20 {
            let n = c.lease_subnet(&format!("o{i}"), &format!("w{i}"), "192.0.2.1", 50103, None).await.unwrap();
            assert_eq!(n.prefix_len(), 26);
            assert!(seen.insert(n), "subnet {n} handed out twice");
        }
        // 20 workers need two /22 blocks
        assert!(seen.contains(&"10.18.4.0/26".parse().unwrap()));
        let w3 = c.subnet_of("w3").unwrap();
        drop(c);
        let m = Member::new(&root.url, oak_trust::ROOT_SERVER, "cluster", "c", "", cdir.join("identity"));
        let c = ClusterNetSvc::open(&cdir, &m, &crate::cluster::RootReplicas::one("", &root.url), &id).unwrap();
        assert_eq!(c.lease_subnet("o3", "w3", "192.0.2.1", 50103, None).await.unwrap(), w3);
        // another NetManager cannot take w3's subnet, nor hold a second one
        let e = c.lease_subnet("o4", "w3", "192.0.2.1", 50103, None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("held by netmanager/o3"), "{}", e.message());
        let e = c.lease_subnet("o3", "w99", "192.0.2.1", 50103, None).await.unwrap_err();
        assert!(e.message().contains("one worker subnet per NetManager"), "{}", e.message());
        c.release_worker("w3").unwrap();
        assert!(c.subnet_of("w3").is_none());
        let again = c.lease_subnet("onew", "new", "192.0.2.9", 50103, None).await.unwrap();
        assert_eq!(again, w3, "released subnet is reused");
    }

    /// A root and two clusters under it; cluster 1 served (its root watch running) and one of its
    /// NetManagers joined (a client, and its id); the clusters' ids.
    struct TwoClusters {
        _dir: tempfile::TempDir,
        root: RootNetSvc,
        c1: ClusterNetSvc,
        c2: ClusterNetSvc,
        ids: (String, String),
        client: pb::cluster_net_service_client::ClusterNetServiceClient<Channel>,
        nm: String,
        c1_authority: Arc<Authority>,
        c1_url: String,
    }

    async fn two_clusters() -> TwoClusters {
        let (dir, svc, root) = setup().await;
        let (c1, id1) = open_cluster(&dir.path().join("c1"), &root).await;
        let (c2, id2) = open_cluster(&dir.path().join("c2"), &root).await;
        let (c1_authority, c1_url) = serve_cluster(&dir.path().join("c1"), &c1).await;
        let (client, nm) = netmanager(&c1_authority, &c1_url, "netmanager").await;
        TwoClusters { _dir: dir, root: svc, c1, c2, ids: (id1, id2), client, nm, c1_authority, c1_url }
    }

    #[tokio::test]
    async fn changes_in_another_cluster_are_pushed_to_interested_subscribers() {
        use futures::StreamExt;
        let TwoClusters { _dir, root, c1, c2, ids, mut client, nm, .. } = two_clusters().await;
        let (rr, _) = root.allocate_service_ips("s1", "app.ns.web.ns").unwrap();
        let n1 = c1.lease_subnet(&nm, "n1", "192.0.2.1", 50103, None).await.unwrap();
        let n2 = c2.lease_subnet("o2", "n2", "192.0.2.2", 50103, None).await.unwrap();
        assert_ne!(n1, n2, "clusters get disjoint blocks");

        let mut updates = client.subscribe(pb::SubscribeRequest { node: "n1".into() }).await.unwrap().into_inner();
        let first = updates.next().await.unwrap().unwrap();
        assert!(matches!(first.update, Some(pb::net_update::Update::RouteAdded(ref r)) if r.subnet == n1.to_string()));
        let r = client
            .resolve(pb::ResolveRequest {
                job_name: String::new(),
                service_ip: rr.to_string(),
                subscriber: "n1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.found);
        assert!(r.service.unwrap().instances.is_empty());

        c2.register_instance(
            "o2",
            pb::InstanceAddress {
                service_id: "s1".into(),
                job_name: "app.ns.web.ns".into(),
                instance_number: 3,
                ns_ip: n2.hosts().nth(1).unwrap().to_string(),
                worker_ip: "192.0.2.2".into(),
                worker_port: 50103,
                cluster_id: String::new(),
                worker_subnet: n2.to_string(),
            },
        )
        .await
        .unwrap();
        let pushed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let u = updates.next().await.unwrap().unwrap();
                if let Some(pb::net_update::Update::Service(s)) = u.update {
                    return s;
                }
            }
        })
        .await
        .expect("change in cluster c2 pushed to the subscriber of c1");
        assert_eq!(pushed.rr_ip, rr.to_string());
        assert_eq!(pushed.instances.len(), 1);
        assert_eq!(pushed.instances[0].cluster_id, ids.1);
        assert_eq!(pushed.instances[0].worker_subnet, n2.to_string());
    }

    #[tokio::test]
    async fn worker_routes_cross_clusters_through_the_root() {
        use futures::StreamExt;
        let TwoClusters { _dir, root, c1, c2, ids, mut client, nm, c1_authority, c1_url, .. } = two_clusters().await;
        let n1 = c1.lease_subnet(&nm, "n1", "192.0.2.1", 50103, None).await.unwrap();
        let mut updates = client.subscribe(pb::SubscribeRequest { node: "n1".into() }).await.unwrap().into_inner();
        // a worker of cluster 2 appears: cluster 1's subscriber learns its route (for replies)
        let n2 = c2.lease_subnet("o2", "n2", "192.0.2.2", 50104, None).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(pb::net_update::Update::RouteAdded(r)) = updates.next().await.unwrap().unwrap().update {
                    if r.subnet == n2.to_string() {
                        return r;
                    }
                }
            }
        })
        .await
        .expect("route of the other cluster pushed");
        assert_eq!((got.worker_ip.as_str(), got.worker_port), ("192.0.2.2", 50104));
        assert!(root
            .routes()
            .iter()
            .any(|r| r.cluster_id == ids.0 && r.route.as_ref().unwrap().subnet == n1.to_string()));
        // a cluster cannot claim a subnet outside its blocks
        let bad =
            pb::Route { subnet: n2.to_string(), worker_ip: "192.0.2.9".into(), worker_port: 1, ..Default::default() };
        let e = root.report_route(&ids.0, &bad, false).unwrap_err().to_string();
        assert!(e.contains(&format!("not in a block leased to cluster {}", ids.0)), "{e}");
        // a new subscriber gets it in its initial dump; released, it is withdrawn
        let (mut other, _) = netmanager(&c1_authority, &c1_url, "netmanager").await;
        let mut fresh = other.subscribe(pb::SubscribeRequest { node: "n1b".into() }).await.unwrap().into_inner();
        let mut initial = Vec::new();
        for _ in 0..2 {
            if let Some(pb::net_update::Update::RouteAdded(r)) = fresh.next().await.unwrap().unwrap().update {
                initial.push(r.subnet);
            }
        }
        assert!(initial.contains(&n2.to_string()), "{initial:?}");
        c2.release_worker("n2").unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(pb::net_update::Update::RouteRemoved(net)) = fresh.next().await.unwrap().unwrap().update {
                    if net == n2.to_string() {
                        return;
                    }
                }
            }
        })
        .await
        .expect("released route withdrawn");
    }

    #[tokio::test]
    async fn exhaustion_without_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let m = Member::in_memory("", oak_trust::CLUSTER_SERVER, "cluster", "c", "");
        let c = ClusterNetSvc::open(dir.path(), &m, &crate::cluster::RootReplicas::one("", ""), "c1").unwrap();
        let err = c.lease_subnet("o", "w", "192.0.2.1", 50103, None).await.unwrap_err();
        assert!(err.message().contains("no free worker subnet"), "{err:?}");
    }

    /// On a dual-stack `[::]` port: the lease reply tells each NetManager the address it came from, an IPv4
    /// one as IPv4 (not `::ffff:…`); only an IPv4 source is recorded as the route's second tunnel source.
    #[tokio::test]
    async fn lease_reply_tells_the_observed_address() {
        assert_eq!(tunnel_source(Some("::ffff:192.0.2.7".parse().unwrap())), "192.0.2.7");
        assert_eq!(tunnel_source(Some("192.0.2.7".parse().unwrap())), "192.0.2.7");
        assert_eq!(tunnel_source(Some("fd00::7".parse().unwrap())), "");
        assert_eq!(tunnel_source(None), "");
        let (dir, _root, root) = setup().await;
        let cdir = dir.path().join("cluster");
        let (c, _) = open_cluster(&cdir, &root).await;
        let a = Arc::new(Authority::open(&cdir.join("ca"), "cluster CA", oak_trust::CLUSTER_SERVER).unwrap());
        let l = tokio::net::TcpListener::bind("[::]:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let trust = crate::task::trusted(&a, Arc::new(Admit(&["node", "netmanager"]))).unwrap();
        tokio::spawn(serve_listener(c.clone(), l, trust));
        let lease = |node: &str| pb::LeaseSubnetRequest {
            node: node.into(),
            public_ip: "192.0.2.66".into(),
            tunnel_port: 50103,
        };
        let (mut v4, _) = netmanager(&a, &format!("http://127.0.0.1:{port}"), "netmanager").await;
        let r = v4.lease_subnet(lease("w4")).await.unwrap().into_inner();
        assert_eq!(r.observed_ip, "127.0.0.1", "an IPv4 client of a [::] listener is seen as IPv4");
        let (mut v6, _) = netmanager(&a, &format!("http://[::1]:{port}"), "netmanager").await;
        let r = v6.lease_subnet(lease("w6")).await.unwrap().into_inner();
        assert_eq!(r.observed_ip, "::1");
        let s = c.inner.state.lock();
        assert_eq!(s.leases["w4"].source_ip, "127.0.0.1");
        assert_eq!(s.leases["w6"].source_ip, "", "an IPv6 source is no tunnel source");
        assert_eq!(s.leases["w6"].public_ip, "192.0.2.66", "the advertised endpoint stays the tunnel's");
    }

    /// Over the real port: a caller without a certificate, or with a NodeEngine's, is refused; a NetManager
    /// cannot lease, release or register in another worker's subnet; nothing of the victim's is lost.
    #[tokio::test]
    async fn netmanagers_act_only_as_themselves() {
        let TwoClusters { _dir, c1, mut client, nm, c1_authority, c1_url, .. } = two_clusters().await;
        let mine = c1.lease_subnet(&nm, "victim", "192.0.2.1", 50103, None).await.unwrap();
        c1.register_instance(
            &nm,
            pb::InstanceAddress {
                service_id: "s".into(),
                job_name: "a.b.c.d".into(),
                instance_number: 0,
                ns_ip: mine.hosts().nth(2).unwrap().to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // no certificate: TLS without one (the member has not joined, so use a bare TLS-less channel)
        let plain = tonic::transport::Endpoint::from_shared(c1_url.clone()).unwrap().connect().await;
        if let Ok(ch) = plain {
            let r = pb::cluster_net_service_client::ClusterNetServiceClient::new(ch)
                .lease_subnet(pb::LeaseSubnetRequest { node: "victim".into(), ..Default::default() })
                .await;
            assert!(r.is_err(), "plaintext lease answered");
        }
        // a NodeEngine's certificate is not a NetManager's
        let (mut node, _) = netmanager(&c1_authority, &c1_url, "node").await;
        let e = node.lease_subnet(pb::LeaseSubnetRequest { node: "x".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // another NetManager: not the victim's subnet, not its release, not instances in it
        let (mut thief, thief_id) = netmanager(&c1_authority, &c1_url, "netmanager").await;
        let lease =
            |node: &str| pb::LeaseSubnetRequest { node: node.into(), public_ip: "192.0.2.66".into(), tunnel_port: 1 };
        let e = thief.lease_subnet(lease("victim")).await.unwrap_err();
        assert!(e.message().contains(&format!("held by netmanager/{nm}")), "{}", e.message());
        let e = thief.release_subnet(pb::ReleaseSubnetRequest { node: "victim".into() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let own = thief.lease_subnet(lease("thief")).await.unwrap().into_inner().subnet;
        assert_ne!(own, mine.to_string());
        let inst = pb::InstanceAddress {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            instance_number: 1,
            ns_ip: mine.hosts().nth(3).unwrap().to_string(),
            ..Default::default()
        };
        let e = thief.register_instance(inst).await.unwrap_err();
        assert!(e.message().contains(&format!("not in {own}, the subnet of netmanager/{thief_id}")), "{}", e.message());
        let e = thief
            .deregister_instance(pb::InstanceKey {
                service_id: "s".into(),
                instance_number: 0,
                job_name: "a.b.c.d".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // the victim keeps its subnet, its route and its instance
        assert_eq!(c1.subnet_of("victim"), Some(mine));
        let r = client
            .resolve(pb::ResolveRequest { job_name: "a.b.c.d".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.service.unwrap().instances.len(), 1);
    }
}
