//! Control-plane client: leases this worker's /26 from the cluster network service, keeps a push
//! subscription alive (re-subscribing after reconnects) and fills the [`Tables`]; registers instances.

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use ipnet::Ipv4Net;
use oak_proto::net::v1 as pb;
use parking_lot::Mutex;
use pb::cluster_net_service_client::ClusterNetServiceClient;
use tonic::transport::Channel;

use crate::tables::{InstanceEndpoint, ServiceEntry, Snapshot, Tables};

/// Worker subnets live here (Oakestra's plan).
pub const WORKER_SPACE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 18, 0, 0), 16);
/// Service IPs live here.
pub const SERVICE_SPACE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 30, 0, 0), 16);
/// How long the NetManager waits for the cluster network service on start.
pub const LEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Check a subnet received from the cluster: a /26 on its own boundary inside the worker space, not
/// overlapping the service space nor any other worker's subnet we route to.
pub fn validate_subnet(text: &str, tables: &Snapshot) -> Result<Ipv4Net, String> {
    let net = worker_net(text)?;
    if let Some((other, ep)) =
        tables.routes.iter().find(|(r, _)| r.contains(&net.network()) || net.contains(&r.network()))
    {
        return Err(format!("{net} overlaps {other}, the subnet of worker {ep}"));
    }
    Ok(net)
}

/// A route the cluster sent (another worker's subnet and tunnel endpoint), checked before it reaches the
/// tables and so the kernel: a /26 of the worker space that is not this worker's, and a unicast endpoint
/// outside the overlay.
pub fn validate_route(
    subnet: &str,
    ip: &str,
    port: u32,
    local: Option<Ipv4Net>,
) -> Result<(Ipv4Net, SocketAddr), String> {
    let net = worker_net(subnet)?;
    if Some(net) == local {
        return Err(format!("{net} is this worker's own subnet"));
    }
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("endpoint {ip:?} is not an IPv4 address"))?;
    if ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || WORKER_SPACE.contains(&ip)
        || SERVICE_SPACE.contains(&ip)
    {
        return Err(format!("endpoint {ip} of {net} is not a worker's address"));
    }
    let port = u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(|| format!("endpoint port {port} of {net}"))?;
    Ok((net, SocketAddr::new(ip.into(), port)))
}

/// What the NetManager says after its lease about its advertised tunnel endpoint `public` and the address
/// the cluster saw the lease come from (`observed`, empty from older clusters): a warning when they are
/// two different IPv4 addresses, Oakestra's "Wrong Node IP" case (other workers send tunnel traffic to
/// the advertised one, which may not be this worker's).
pub fn endpoint_report(public: SocketAddr, observed: &str, config_path: &str) -> (tracing::Level, String) {
    let advertised = public.ip();
    let Ok(seen) = observed.trim().parse::<std::net::IpAddr>().map(oak_proto::endpoint::observed) else {
        return (
            tracing::Level::INFO,
            format!(
                "tunnel endpoint {public} advertised (NodePublicAddress in {config_path}); the cluster does not \
                 report the address it sees this worker at"
            ),
        );
    };
    match seen {
        _ if seen == advertised => (
            tracing::Level::INFO,
            format!("tunnel endpoint {public} advertised; the cluster sees this worker at {seen}, the same address"),
        ),
        std::net::IpAddr::V6(_) => (
            tracing::Level::INFO,
            format!(
                "tunnel endpoint {public} advertised; the cluster sees this worker at {seen} (the control plane runs \
                 over IPv6, the tunnel over IPv4): other workers send tunnel traffic to {public}; if {advertised} is \
                 not this worker's IPv4 address, set NodePublicAddress in {config_path}"
            ),
        ),
        std::net::IpAddr::V4(_) => (
            tracing::Level::WARN,
            format!(
                "Wrong Node IP? this worker advertises tunnel endpoint {advertised} (port {port}) but the cluster \
                 sees it at {seen}: other workers will send tunnel traffic to {advertised}. If {advertised} is wrong, \
                 set NodePublicAddress in {config_path} to the address the other workers reach this worker at (e.g. \
                 {seen}) and restart the NetManager; if {advertised} is right (a NAT or port forward in front of this \
                 worker), nothing needs to change",
                port = public.port()
            ),
        ),
    }
}

/// A /26 of the worker space, on its boundary.
fn worker_net(text: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = text.trim().parse().map_err(|_| format!("{text:?} is not an IPv4 subnet"))?;
    if net.prefix_len() != 26 {
        return Err(format!("{net} is a /{}, expected a /26", net.prefix_len()));
    }
    if net.trunc() != net {
        return Err(format!("{net} is not on a /26 boundary"));
    }
    if !WORKER_SPACE.contains(&net) {
        return Err(format!("{net} is outside the overlay worker space {WORKER_SPACE}"));
    }
    if SERVICE_SPACE.contains(&net.network()) || net.contains(&SERVICE_SPACE.network()) {
        return Err(format!("{net} overlaps the service space {SERVICE_SPACE}"));
    }
    Ok(net)
}

/// Control client handle (cheap to clone).
#[derive(Clone)]
pub struct Control {
    /// This NetManager as a member of its cluster (joins once with the worker join token).
    member: oak_trust::Member,
    /// Made once the member has joined.
    client: Arc<tokio::sync::OnceCell<ClusterNetServiceClient<Channel>>>,
    url: String,
    node: String,
    tables: Tables,
    /// Tunnel endpoint of this worker.
    pub public: SocketAddr,
    subnet: Arc<Mutex<Option<Ipv4Net>>>,
    /// Job names this worker resolved; re-resolved after a reconnect.
    interests: Arc<Mutex<BTreeSet<String>>>,
}

fn apply_service(tables: &Tables, local: Option<Ipv4Net>, svc: &pb::ServiceAddresses) {
    let mut instances = Vec::new();
    let mut routes = Vec::new();
    for i in &svc.instances {
        let (Ok(ns_ip), Ok(wip)) = (i.ns_ip.parse::<Ipv4Addr>(), i.worker_ip.parse::<Ipv4Addr>()) else {
            tracing::warn!(instance = ?i, "ignoring malformed instance address");
            continue;
        };
        let worker = SocketAddr::new(wip.into(), i.worker_port as u16);
        let own = i.worker_subnet.parse::<Ipv4Net>().ok() == local && local.is_some();
        if !own && !i.worker_subnet.is_empty() {
            match validate_route(&i.worker_subnet, &i.worker_ip, i.worker_port, local) {
                Ok(r) => routes.push(r),
                Err(e) => tracing::warn!(instance = ?i, "ignoring the route of an instance: {e}"),
            }
        }
        instances.push(InstanceEndpoint {
            service_id: i.service_id.clone(),
            job_name: i.job_name.clone(),
            instance_number: i.instance_number,
            ns_ip,
            worker,
            rtt_us: None,
        });
    }
    let entry = ServiceEntry {
        service_id: svc.service_id.clone(),
        job_name: svc.job_name.clone(),
        rr_ip: svc.rr_ip.parse().ok(),
        closest_ip: svc.closest_ip.parse().ok(),
        instances,
    };
    tables.update(|s| {
        for (net, ep) in routes {
            s.routes.insert(net, ep);
        }
        s.services.insert(entry.service_id.clone(), entry);
    });
}

impl Control {
    /// Create the client (no connection yet): it joins the cluster as `member` at the first lease.
    pub fn new(url: &str, member: oak_trust::Member, node: &str, public: SocketAddr, tables: Tables) -> Result<Self> {
        tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("bad cluster network service url {url:?}"))?;
        Ok(Self {
            member,
            client: Default::default(),
            url: url.to_string(),
            node: node.to_string(),
            tables,
            public,
            subnet: Arc::new(Mutex::new(None)),
            interests: Arc::new(Mutex::new(BTreeSet::new())),
        })
    }

    /// The client of the cluster network service, joining the cluster first if this NetManager has not.
    async fn client(&self) -> Result<ClusterNetServiceClient<Channel>> {
        let c = self
            .client
            .get_or_try_init(|| async {
                self.member.ensure_joined().await?;
                let ch = self.member.lazy_channel(&self.url, |ep| {
                    ep.connect_timeout(LEASE_TIMEOUT)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(10))
                        .keep_alive_while_idle(true)
                })?;
                anyhow::Ok(ClusterNetServiceClient::new(ch))
            })
            .await?;
        Ok(c.clone())
    }

    pub fn subnet(&self) -> Option<Ipv4Net> {
        *self.subnet.lock()
    }

    /// Lease this worker's subnet. Fatal errors: timeout (names the URL and the config file), and a bad
    /// network in the answer.
    pub async fn lease(&self, config_path: &str) -> Result<Ipv4Net> {
        let req = pb::LeaseSubnetRequest {
            node: self.node.clone(),
            public_ip: self.public.ip().to_string(),
            tunnel_port: self.public.port() as u32,
        };
        // Unreachable (refused, not listening yet: a cluster starting beside us) is retried until the
        // deadline; only then is it the fatal NetManager timeout.
        let deadline = tokio::time::Instant::now() + LEASE_TIMEOUT;
        let mut backoff = Duration::from_millis(100);
        let reply = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = async {
                let mut client = match self.client().await {
                    Ok(c) => c,
                    Err(e) if e.downcast_ref::<oak_trust::Unreachable>().is_some() => {
                        return Err(tonic::Status::unavailable(format!("{e:#}")))
                    }
                    Err(e) => return Err(tonic::Status::permission_denied(format!("{e:#}"))),
                };
                client.lease_subnet(req.clone()).await
            };
            let last = match tokio::time::timeout(left, attempt).await {
                Err(_) => "no answer".to_string(),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => status.message().to_string(),
                Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
                    bail!("the cluster network service at {} refused this NetManager: {}", self.url, status.message())
                }
                // the cluster answered without a subnet for us (its pool, its root's quota, no root)
                Ok(Err(status)) => bail!(
                    "bad network received: the cluster network service at {} gave this worker no subnet: {}",
                    self.url,
                    status.message()
                ),
                Ok(Ok(r)) => break r.into_inner(),
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                bail!(
                    "NetManager timeout: cannot reach the cluster network service at {} within {} s ({last}); check \
                     ClusterUrl (and ClusterNetPort) in {config_path}",
                    self.url,
                    LEASE_TIMEOUT.as_secs()
                );
            }
            tracing::debug!(url = %self.url, "cluster network service not reachable yet ({last}); retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        };
        let net = validate_subnet(&reply.subnet, &self.tables.snapshot())
            .map_err(|e| anyhow!("bad network received: {e}"))?;
        *self.subnet.lock() = Some(net);
        self.tables.set_local_subnet(net);
        tracing::info!(subnet = %net, cluster = %reply.cluster_id, "leased worker subnet");
        let (level, msg) = endpoint_report(self.public, &reply.observed_ip, config_path);
        if level == tracing::Level::WARN {
            tracing::warn!(advertised = %self.public, observed = %reply.observed_ip, "{msg}");
        } else {
            tracing::info!(advertised = %self.public, observed = %reply.observed_ip, "{msg}");
        }
        Ok(net)
    }

    fn apply(&self, u: pb::NetUpdate) {
        let local = self.subnet();
        match u.update {
            Some(pb::net_update::Update::RouteAdded(r)) => {
                if r.subnet.parse::<Ipv4Net>().ok() == local && local.is_some() {
                    return; // our own route, as every subscriber gets it
                }
                match validate_route(&r.subnet, &r.worker_ip, r.worker_port, local) {
                    Ok((net, ep)) => self.tables.set_route(net, ep, r.source_ip.parse().ok()),
                    Err(e) => tracing::warn!(route = ?r, "ignoring a route from the cluster: {e}"),
                }
            }
            Some(pb::net_update::Update::RouteRemoved(net)) => {
                if let Ok(net) = net.parse() {
                    self.tables.remove_route(net);
                }
            }
            Some(pb::net_update::Update::Service(svc)) => apply_service(&self.tables, local, &svc),
            Some(pb::net_update::Update::ServiceRemoved(id)) => self.tables.remove_service(&id),
            None => {}
        }
    }

    /// Keep the subscription alive forever: subscribe, apply updates; after a drop, reconnect with
    /// backoff, re-subscribe and re-resolve every interest. `connected` flips on every (re)subscription.
    pub fn spawn_subscription(&self, connected: tokio::sync::watch::Sender<bool>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let client = this.client().await;
                let r = match client {
                    Ok(mut c) => c.subscribe(pb::SubscribeRequest { node: this.node.clone() }).await,
                    Err(e) => Err(tonic::Status::unavailable(format!("{e:#}"))),
                };
                match r {
                    Ok(stream) => {
                        backoff = Duration::from_millis(200);
                        let mut stream = stream.into_inner();
                        // routes of workers that left while we were away are re-sent; start fresh
                        this.tables.update(|s| {
                            s.routes.clear();
                            s.sources.clear();
                        });
                        connected.send_replace(true);
                        let names: Vec<String> = this.interests.lock().iter().cloned().collect();
                        for n in names {
                            if let Err(e) = this.resolve_name(&n).await {
                                tracing::warn!(job = %n, error = %format!("{e:#}"), "re-resolve after reconnect failed");
                            }
                        }
                        while let Some(msg) = stream.next().await {
                            match msg {
                                Ok(u) => this.apply(u),
                                Err(e) => {
                                    tracing::warn!(error = %e.message(), "subscription broke");
                                    break;
                                }
                            }
                        }
                        connected.send_replace(false);
                        tracing::warn!(url = %this.url, "subscription to the cluster network service ended; reconnecting");
                    }
                    Err(e) => tracing::warn!(url = %this.url, error = %e.message(), "cannot subscribe; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn resolve(&self, req: pb::ResolveRequest) -> Result<Option<ServiceEntry>> {
        let mut client = self.client().await?;
        let r = client.resolve(req).await.map_err(|e| anyhow!("resolve: {}", e.message()))?.into_inner();
        let Some(svc) = r.service else { return Ok(None) };
        self.interests.lock().insert(svc.job_name.clone());
        apply_service(&self.tables, self.subnet(), &svc);
        Ok(self.tables.snapshot().services.get(&svc.service_id).cloned())
    }

    /// Resolve a job name (app.appns.svc.svcns), put it in the tables and get its future changes pushed.
    pub async fn resolve_name(&self, job_name: &str) -> Result<Option<ServiceEntry>> {
        self.resolve(pb::ResolveRequest {
            job_name: job_name.into(),
            service_ip: String::new(),
            subscriber: self.node.clone(),
        })
        .await
    }

    /// Resolve a service IP (10.30.x.y) the datapath saw but does not know yet.
    pub async fn resolve_ip(&self, ip: Ipv4Addr) -> Result<Option<ServiceEntry>> {
        self.resolve(pb::ResolveRequest {
            job_name: String::new(),
            service_ip: ip.to_string(),
            subscriber: self.node.clone(),
        })
        .await
    }

    /// Register an instance wired on this worker.
    pub async fn register_instance(
        &self,
        service_id: &str,
        job_name: &str,
        instance_number: u32,
        ns_ip: Ipv4Addr,
    ) -> Result<()> {
        let subnet = self.subnet().map(|n| n.to_string()).unwrap_or_default();
        let mut client = self.client().await?;
        client
            .register_instance(pb::InstanceAddress {
                service_id: service_id.into(),
                job_name: job_name.into(),
                instance_number,
                ns_ip: ns_ip.to_string(),
                worker_ip: self.public.ip().to_string(),
                worker_port: self.public.port() as u32,
                cluster_id: String::new(),
                worker_subnet: subnet,
            })
            .await
            .map_err(|e| anyhow!("registering instance with the cluster network service: {}", e.message()))?;
        Ok(())
    }

    pub async fn deregister_instance(&self, service_id: &str, job_name: &str, instance_number: u32) -> Result<()> {
        let mut client = self.client().await?;
        client
            .deregister_instance(pb::InstanceKey {
                service_id: service_id.into(),
                instance_number,
                job_name: job_name.into(),
            })
            .await
            .map_err(|e| anyhow!("deregistering instance: {}", e.message()))?;
        Ok(())
    }

    /// Node name used for the lease.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Job names this worker is interested in.
    pub fn interests(&self) -> HashSet<String> {
        self.interests.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_network_validation() {
        let mut s = Snapshot::default();
        assert_eq!(validate_subnet("10.18.0.64/26", &s).unwrap().to_string(), "10.18.0.64/26");
        assert!(validate_subnet("garbage", &s).unwrap_err().contains("not an IPv4 subnet"));
        assert!(validate_subnet("10.18.0.0/24", &s).unwrap_err().contains("expected a /26"));
        assert!(validate_subnet("10.18.0.5/26", &s).unwrap_err().contains("boundary"));
        assert!(validate_subnet("192.168.0.0/26", &s).unwrap_err().contains("outside"));
        assert!(validate_subnet("10.30.0.0/26", &s).unwrap_err().contains("outside"));
        s.routes.insert("10.18.0.64/26".parse().unwrap(), "192.0.2.1:50103".parse().unwrap());
        assert!(validate_subnet("10.18.0.64/26", &s).unwrap_err().contains("overlaps"));
    }

    #[test]
    fn routes_are_checked_before_the_tables() {
        let local = Some("10.18.0.0/26".parse().unwrap());
        let ok = validate_route("10.18.0.64/26", "192.0.2.1", 50103, local).unwrap();
        assert_eq!(ok, ("10.18.0.64/26".parse().unwrap(), "192.0.2.1:50103".parse().unwrap()));
        for (net, ip, port, why) in [
            ("0.0.0.0/0", "192.0.2.1", 50103, "expected a /26"),
            ("192.168.1.0/26", "192.0.2.1", 50103, "outside"),
            ("10.18.0.0/26", "192.0.2.1", 50103, "own subnet"),
            ("10.18.0.64/26", "10.18.0.2", 50103, "not a worker's address"),
            ("10.18.0.64/26", "10.30.0.1", 50103, "not a worker's address"),
            ("10.18.0.64/26", "224.0.0.1", 50103, "not a worker's address"),
            ("10.18.0.64/26", "nonsense", 50103, "not an IPv4 address"),
            ("10.18.0.64/26", "192.0.2.1", 0, "port 0"),
            ("10.18.0.64/26", "192.0.2.1", 70000, "port 70000"),
        ] {
            let e = validate_route(net, ip, port, local).unwrap_err();
            assert!(e.contains(why), "{net} {ip}:{port}: {e}");
        }
    }

    /// A worker that leased over IPv6 has an IPv6 `source_ip` (from a cluster that records one): its
    /// route is taken by its advertised IPv4 endpoint, and the IPv6 source is no tunnel source.
    #[test]
    fn an_ipv6_lease_source_keeps_the_advertised_endpoint() {
        let tables = Tables::new();
        let member = oak_trust::Member::in_memory("http://[fd00::2]:10110", "oak-cluster", "netmanager", "w", "");
        let c = Control::new("http://[fd00::2]:10110", member, "w", "192.0.2.1:50103".parse().unwrap(), tables.clone())
            .unwrap();
        let route = |source: &str| pb::Route {
            subnet: "10.18.0.64/26".into(),
            worker_ip: "192.0.2.2".into(),
            worker_port: 50103,
            source_ip: source.into(),
        };
        c.apply(pb::NetUpdate { update: Some(pb::net_update::Update::RouteAdded(route("fd00:99::3"))) });
        let s = tables.snapshot();
        assert_eq!(s.routes.get(&"10.18.0.64/26".parse().unwrap()), Some(&"192.0.2.2:50103".parse().unwrap()));
        let inner: Ipv4Addr = "10.18.0.70".parse().unwrap();
        assert_eq!(s.check_peer("192.0.2.2".parse().unwrap(), inner, None), Ok(()));
        assert!(s.check_peer("fd00:99::3".parse().unwrap(), inner, None).is_err());
    }

    #[test]
    fn wrong_node_ip_is_named() {
        let public: SocketAddr = "10.99.0.200:50103".parse().unwrap();
        let cfg = "/etc/netmanager/netcfg.json";
        // two IPv4 addresses: the warning names both, the consequence and the config file
        let (level, msg) = endpoint_report(public, "10.99.0.3", cfg);
        assert_eq!(level, tracing::Level::WARN);
        for part in [
            "Wrong Node IP",
            "advertises tunnel endpoint 10.99.0.200",
            "sees it at 10.99.0.3",
            "other workers will send tunnel traffic to 10.99.0.200",
            "set NodePublicAddress in /etc/netmanager/netcfg.json",
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }
        // an IPv4-mapped observation is the same IPv4 address
        assert_eq!(endpoint_report(public, "::ffff:10.99.0.3", cfg).1, msg);
        let (level, msg) = endpoint_report(public, "::ffff:10.99.0.200", cfg);
        assert_eq!(level, tracing::Level::INFO, "{msg}");
        assert!(msg.contains("the same address"), "{msg}");
        // over IPv6 the two cannot be compared: told, not warned
        let (level, msg) = endpoint_report(public, "fd00:99::3", cfg);
        assert_eq!(level, tracing::Level::INFO, "{msg}");
        assert!(msg.contains("sees this worker at fd00:99::3") && msg.contains("over IPv6"), "{msg}");
        assert!(!msg.contains("Wrong Node IP"), "{msg}");
        // an older cluster says nothing
        let (level, msg) = endpoint_report(public, "", cfg);
        assert_eq!(level, tracing::Level::INFO);
        assert!(msg.contains("does not report"), "{msg}");
    }
}
