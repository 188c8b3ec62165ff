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
    root: Option<RootNetServiceClient<Channel>>,
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
    pb::Route { subnet: lease.subnet.to_string(), worker_ip: lease.public_ip.clone(), worker_port: lease.tunnel_port }
}

fn update(u: pb::net_update::Update) -> pb::NetUpdate {
    pb::NetUpdate { update: Some(u) }
}

impl ClusterNetSvc {
    /// Open `<data_dir>/net.redb`; `root_netsvc_url` like "http://root:10099" (empty = no root, tests only:
    /// then no block can be leased).
    pub fn open(data_dir: &Path, root_netsvc_url: &str, cluster_id: &str) -> Result<Self> {
        let state = Persisted::open(&data_dir.join("net.redb"))?;
        let root = if root_netsvc_url.is_empty() {
            None
        } else {
            let url = if root_netsvc_url.contains("://") {
                root_netsvc_url.to_string()
            } else {
                format!("http://{root_netsvc_url}")
            };
            let ep = tonic::transport::Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad root network service url {url:?}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10));
            Some(RootNetServiceClient::new(ep.connect_lazy()))
        };
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                cluster_id: cluster_id.to_string(),
                root,
                subs: Mutex::new(HashMap::new()),
                foreign: Mutex::new(BTreeMap::new()),
                next_sub: Mutex::new(0),
                lease_lock: tokio::sync::Mutex::new(()),
            }),
        })
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

    /// Lease (or return the existing) /26 of `node`.
    pub async fn lease_subnet(&self, node: &str, public_ip: &str, tunnel_port: u32) -> Result<Ipv4Net> {
        if node.is_empty() {
            bail!("node is empty");
        }
        let _g = self.inner.lease_lock.lock().await;
        let lease = Lease { subnet: "0.0.0.0/26".parse()?, public_ip: public_ip.to_string(), tunnel_port };
        let existing = {
            let s = self.inner.state.lock();
            s.leases.get(node).map(|l| l.subnet).or_else(|| Self::free_subnet(&s).map(|_| Ipv4Net::default()))
        };
        if existing.is_none() {
            // need another block from the root
            let Some(root) = self.inner.root.clone() else {
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
                None => Self::free_subnet(s).context("no free worker subnet")?,
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
        let Some(root) = self.inner.root.clone() else { return };
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
        let Some(root) = self.inner.root.clone() else { return Ok(local) };
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

    pub async fn register_instance(&self, mut inst: pb::InstanceAddress) -> Result<()> {
        if inst.service_id.is_empty() || inst.job_name.is_empty() {
            bail!("service_id and job_name are required");
        }
        inst.ns_ip.parse::<Ipv4Addr>().with_context(|| format!("ns_ip {:?} is not an IPv4 address", inst.ns_ip))?;
        inst.cluster_id = self.inner.cluster_id.clone();
        let rec = InstanceRec::from_pb(&inst);
        self.mutate(|s| {
            s.instances.insert(rec.key(), rec.clone());
            Ok(())
        })?;
        if let Some(root) = self.inner.root.clone() {
            if let Err(e) = root.clone().register_instance(inst.clone()).await {
                tracing::warn!(error = %e.message(), "could not forward instance address to root");
            }
        }
        self.push_service(&inst.service_id, &inst.job_name).await;
        Ok(())
    }

    pub async fn deregister_instance(&self, key: pb::InstanceKey) -> Result<()> {
        let removed = self.mutate(|s| Ok(s.instances.remove(&instance_key(&key.service_id, key.instance_number))))?;
        if let Some(root) = self.inner.root.clone() {
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
        let root = self.inner.root.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            use futures::StreamExt;
            let mut backoff = Duration::from_millis(200);
            loop {
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
                        while let Some(Ok(change)) = stream.next().await {
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
        let r = req.into_inner();
        let subnet = self
            .lease_subnet(&r.node, &r.public_ip, r.tunnel_port)
            .await
            .map_err(|e| Status::resource_exhausted(format!("{e:#}")))?;
        Ok(Response::new(pb::LeaseSubnetReply {
            subnet: subnet.to_string(),
            cluster_id: self.inner.cluster_id.clone(),
        }))
    }
    async fn release_subnet(&self, req: Request<pb::ReleaseSubnetRequest>) -> Result<Response<pb::Ack>, Status> {
        self.release_worker(&req.into_inner().node).map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn register_instance(&self, req: Request<pb::InstanceAddress>) -> Result<Response<pb::Ack>, Status> {
        self.register_instance(req.into_inner()).await.map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn deregister_instance(&self, req: Request<pb::InstanceKey>) -> Result<Response<pb::Ack>, Status> {
        self.deregister_instance(req.into_inner()).await.map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(pb::Ack {}))
    }
    async fn resolve(&self, req: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveReply>, Status> {
        let r = req.into_inner();
        if r.job_name.is_empty() && r.service_ip.is_empty() {
            return Err(Status::invalid_argument("resolve needs job_name or service_ip"));
        }
        let service =
            self.resolve(&r.job_name, &r.service_ip).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        if let (Some(svc), false) = (&service, r.subscriber.is_empty()) {
            for s in self.inner.subs.lock().values_mut() {
                if s.node == r.subscriber {
                    s.interests.insert(svc.service_id.clone(), svc.job_name.clone());
                }
            }
        }
        Ok(Response::new(pb::ResolveReply { found: service.is_some(), service }))
    }

    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<UpdateStream>, Status> {
        let node = req.into_inner().node;
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
pub async fn serve_listener(svc: ClusterNetSvc, listener: tokio::net::TcpListener) -> Result<()> {
    let _watch = svc.spawn_root_watch().map(crate::task::AbortOnDrop);
    let router = tonic::transport::Server::builder().add_service(svc.grpc());
    crate::task::serve_grpc("cluster network service", router, listener).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::netsvc::RootNetSvc;

    async fn setup() -> (tempfile::TempDir, RootNetSvc, String) {
        let dir = tempfile::tempdir().unwrap();
        let root = RootNetSvc::open(&dir.path().join("root")).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(crate::root::netsvc::serve_listener(root.clone(), l));
        (dir, root, url)
    }

    #[tokio::test]
    async fn worker_leases_no_overlap_persist_and_release() {
        let (dir, _root, url) = setup().await;
        let cdir = dir.path().join("cluster");
        let c = ClusterNetSvc::open(&cdir, &url, "c1").unwrap();
        let mut seen = HashSet::new();
        for i in 0..20 {
            let n = c.lease_subnet(&format!("w{i}"), "192.0.2.1", 50103).await.unwrap();
            assert_eq!(n.prefix_len(), 26);
            assert!(seen.insert(n), "subnet {n} handed out twice");
        }
        // 20 workers need two /22 blocks
        assert!(seen.contains(&"10.18.4.0/26".parse().unwrap()));
        let w3 = c.subnet_of("w3").unwrap();
        drop(c);
        let c = ClusterNetSvc::open(&cdir, &url, "c1").unwrap();
        assert_eq!(c.lease_subnet("w3", "192.0.2.1", 50103).await.unwrap(), w3);
        c.release_worker("w3").unwrap();
        assert!(c.subnet_of("w3").is_none());
        let again = c.lease_subnet("new", "192.0.2.9", 50103).await.unwrap();
        assert_eq!(again, w3, "released subnet is reused");
    }

    /// A root and two clusters under it; cluster 1 served (its URL returned, its root watch running).
    async fn two_clusters() -> (tempfile::TempDir, RootNetSvc, ClusterNetSvc, ClusterNetSvc, String) {
        let (dir, root, url) = setup().await;
        let c1 = ClusterNetSvc::open(&dir.path().join("c1"), &url, "c1").unwrap();
        let c2 = ClusterNetSvc::open(&dir.path().join("c2"), &url, "c2").unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c1_url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(serve_listener(c1.clone(), l));
        (dir, root, c1, c2, c1_url)
    }

    #[tokio::test]
    async fn changes_in_another_cluster_are_pushed_to_interested_subscribers() {
        use futures::StreamExt;
        let (_dir, root, c1, c2, c1_url) = two_clusters().await;
        let (rr, _) = root.allocate_service_ips("s1", "app.ns.web.ns").unwrap();
        let n1 = c1.lease_subnet("n1", "192.0.2.1", 50103).await.unwrap();
        let n2 = c2.lease_subnet("n2", "192.0.2.2", 50103).await.unwrap();
        assert_ne!(n1, n2, "clusters get disjoint blocks");

        let mut client = pb::cluster_net_service_client::ClusterNetServiceClient::connect(c1_url).await.unwrap();
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

        c2.register_instance(pb::InstanceAddress {
            service_id: "s1".into(),
            job_name: "app.ns.web.ns".into(),
            instance_number: 3,
            ns_ip: n2.hosts().nth(1).unwrap().to_string(),
            worker_ip: "192.0.2.2".into(),
            worker_port: 50103,
            cluster_id: String::new(),
            worker_subnet: n2.to_string(),
        })
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
        assert_eq!(pushed.instances[0].cluster_id, "c2");
        assert_eq!(pushed.instances[0].worker_subnet, n2.to_string());
    }

    #[tokio::test]
    async fn worker_routes_cross_clusters_through_the_root() {
        use futures::StreamExt;
        let (_dir, root, c1, c2, c1_url) = two_clusters().await;
        let n1 = c1.lease_subnet("n1", "192.0.2.1", 50103).await.unwrap();
        let mut client = pb::cluster_net_service_client::ClusterNetServiceClient::connect(c1_url).await.unwrap();
        let mut updates = client.subscribe(pb::SubscribeRequest { node: "n1".into() }).await.unwrap().into_inner();
        // a worker of cluster 2 appears: cluster 1's subscriber learns its route (for replies)
        let n2 = c2.lease_subnet("n2", "192.0.2.2", 50104).await.unwrap();
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
            .any(|r| r.cluster_id == "c1" && r.route.as_ref().unwrap().subnet == n1.to_string()));
        // a cluster cannot claim a subnet outside its blocks
        let bad = pb::Route { subnet: n2.to_string(), worker_ip: "192.0.2.9".into(), worker_port: 1 };
        assert!(root
            .report_route("c1", &bad, false)
            .unwrap_err()
            .to_string()
            .contains("not in a block leased to cluster c1"));
        // a new subscriber gets it in its initial dump; released, it is withdrawn
        let mut fresh = client.subscribe(pb::SubscribeRequest { node: "n1b".into() }).await.unwrap().into_inner();
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
        let c = ClusterNetSvc::open(dir.path(), "", "c1").unwrap();
        let err = c.lease_subnet("w", "192.0.2.1", 50103).await.unwrap_err().to_string();
        assert!(err.contains("no free worker subnet"), "{err}");
    }
}
