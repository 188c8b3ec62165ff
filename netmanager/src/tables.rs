//! The NetManager's tables: the one owner of "which service IP maps to which instances, and where each
//! overlay subnet lives". The control plane (lease/resolution client) writes them; the datapaths (tun proxy
//! now, eBPF maps later) read them. Readers take cheap snapshots; writers notify subscribers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use parking_lot::RwLock;
use tokio::sync::watch;

/// One running instance of a service, as the overlay sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceEndpoint {
    pub service_id: String,
    pub job_name: String,
    pub instance_number: u32,
    /// Overlay (namespace) address of the instance.
    pub ns_ip: Ipv4Addr,
    /// Tunnel endpoint (public ip, UDP port) of the worker hosting it.
    pub worker: SocketAddr,
    /// Round-trip time estimate to that worker in microseconds, if known (drives "closest"): the probes'
    /// published estimate (`crate::select::rtt_estimate_us`), 0 for an instance on this worker.
    pub rtt_us: Option<u64>,
}

/// A service and the addresses that reach it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ServiceEntry {
    pub service_id: String,
    pub job_name: String,
    /// Round-robin service IP.
    pub rr_ip: Option<Ipv4Addr>,
    /// Closest service IP.
    pub closest_ip: Option<Ipv4Addr>,
    pub instances: Vec<InstanceEndpoint>,
}

/// Everything the datapath needs, as one consistent snapshot.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// This worker's leased overlay subnet (first address = bridge gateway).
    pub local_subnet: Option<Ipv4Net>,
    /// Services keyed by service_id.
    pub services: HashMap<String, ServiceEntry>,
    /// Remote worker subnets -> that worker's tunnel endpoint.
    pub routes: HashMap<Ipv4Net, SocketAddr>,
    /// Remote worker subnets -> the address that worker's connection to its cluster came from, when it
    /// is not the endpoint's (a worker behind a relay or a port forward sends from there).
    pub sources: HashMap<Ipv4Net, Ipv4Addr>,
    /// Bumped on every change.
    pub generation: u64,
}

impl Snapshot {
    /// The service that owns `ip` as its round-robin or closest IP.
    pub fn service_by_ip(&self, ip: Ipv4Addr) -> Option<(&ServiceEntry, AddressKind)> {
        self.services.values().find_map(|s| {
            if s.rr_ip == Some(ip) {
                Some((s, AddressKind::RoundRobin))
            } else if s.closest_ip == Some(ip) {
                Some((s, AddressKind::Closest))
            } else {
                None
            }
        })
    }

    /// Whether `ip` is in this worker's own subnet (an instance here, whatever endpoint other workers share
    /// an address with).
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        self.local_subnet.is_some_and(|n| n.contains(&ip))
    }

    /// Whether a tunnel datagram from `from` may carry a packet from `inner_src`: only the worker whose
    /// subnet holds `inner_src` sends those, from its endpoint's address or the one its cluster saw. A
    /// worker whose own advertised endpoint is a relay in front of it (`front`, an address not of this
    /// host) also takes what that relay hands on for any known worker.
    pub fn check_peer(
        &self,
        from: std::net::IpAddr,
        inner_src: Ipv4Addr,
        front: Option<Ipv4Addr>,
    ) -> Result<(), PeerRefused> {
        let from = match from {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped().ok_or(PeerRefused::UnknownPeer)?,
        };
        let net = Ipv4Net::new(inner_src, WORKER_PREFIX).map(|n| n.trunc()).map_err(|_| PeerRefused::UnknownPeer)?;
        if let Some(ep) = self.routes.get(&net) {
            if ep.ip() == std::net::IpAddr::V4(from) || self.sources.get(&net) == Some(&from) || front == Some(from) {
                return Ok(());
            }
        }
        let known = self.routes.values().any(|ep| ep.ip() == std::net::IpAddr::V4(from))
            || self.sources.values().any(|s| *s == from);
        Err(if known { PeerRefused::SpoofedInner } else { PeerRefused::UnknownPeer })
    }

    /// The tunnel endpoint of the worker whose subnet holds `ip`.
    pub fn route_for(&self, ip: Ipv4Addr) -> Option<SocketAddr> {
        self.routes.iter().find(|(net, _)| net.contains(&ip)).map(|(_, ep)| *ep)
    }
}

/// The prefix of a worker subnet.
pub const WORKER_PREFIX: u8 = 26;

/// Why a tunnel datagram was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRefused {
    /// Its outer source is no known worker's.
    UnknownPeer,
    /// Its outer source is a known worker, but its inner source is not in that worker's subnet.
    SpoofedInner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressKind {
    RoundRobin,
    Closest,
}

/// Shared handle to the tables.
#[derive(Clone)]
pub struct Tables {
    inner: Arc<RwLock<Snapshot>>,
    changed: watch::Sender<u64>,
}

impl Default for Tables {
    fn default() -> Self {
        Self::new()
    }
}

impl Tables {
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self { inner: Arc::new(RwLock::new(Snapshot::default())), changed }
    }

    /// A consistent copy of the current tables.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.read().clone()
    }

    /// Subscribe to changes (the value is the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Apply a change and notify subscribers.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let generation = {
            let mut s = self.inner.write();
            f(&mut s);
            s.generation += 1;
            s.generation
        };
        self.changed.send_replace(generation);
    }

    pub fn set_local_subnet(&self, net: Ipv4Net) {
        self.update(|s| s.local_subnet = Some(net));
    }

    pub fn upsert_service(&self, entry: ServiceEntry) {
        self.update(|s| {
            s.services.insert(entry.service_id.clone(), entry);
        });
    }

    pub fn remove_service(&self, service_id: &str) {
        self.update(|s| {
            s.services.remove(service_id);
        });
    }

    /// A remote worker's subnet, its tunnel endpoint and, when it is another address, the one its
    /// datagrams may also come from.
    pub fn set_route(&self, subnet: Ipv4Net, worker: SocketAddr, source: Option<Ipv4Addr>) {
        self.update(|s| {
            s.routes.insert(subnet, worker);
            match source.filter(|a| std::net::IpAddr::V4(*a) != worker.ip()) {
                Some(a) => s.sources.insert(subnet, a),
                None => s.sources.remove(&subnet),
            };
        });
    }

    pub fn remove_route(&self, subnet: Ipv4Net) {
        self.update(|s| {
            s.routes.remove(&subnet);
            s.sources.remove(&subnet);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_generation() {
        let t = Tables::new();
        let mut rx = t.subscribe();
        let ep: SocketAddr = "192.0.2.7:50103".parse().unwrap();
        t.set_route("10.18.0.64/26".parse().unwrap(), ep, None);
        t.upsert_service(ServiceEntry {
            service_id: "a".into(),
            job_name: "app.ns.svc.ns".into(),
            rr_ip: Some("10.30.0.2".parse().unwrap()),
            closest_ip: Some("10.30.0.3".parse().unwrap()),
            instances: vec![],
        });
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 2);
        let s = t.snapshot();
        assert_eq!(s.route_for("10.18.0.70".parse().unwrap()), Some(ep));
        assert_eq!(s.route_for("10.18.0.10".parse().unwrap()), None);
        let (svc, kind) = s.service_by_ip("10.30.0.3".parse().unwrap()).unwrap();
        assert_eq!((svc.service_id.as_str(), kind), ("a", AddressKind::Closest));
        assert!(s.service_by_ip("10.30.0.9".parse().unwrap()).is_none());
    }

    #[test]
    fn tunnel_peers_are_the_workers_of_their_inner_sources() {
        let t = Tables::new();
        let b: Ipv4Net = "10.18.0.64/26".parse().unwrap();
        let c: Ipv4Net = "10.18.0.128/26".parse().unwrap();
        t.set_route(b, "192.0.2.2:50103".parse().unwrap(), None);
        // C advertises a relay (.4) and sends from its own address (.3), as its cluster saw
        t.set_route(c, "192.0.2.4:50200".parse().unwrap(), Some("192.0.2.3".parse().unwrap()));
        let s = t.snapshot();
        let ip = |a: &str| -> std::net::IpAddr { a.parse().unwrap() };
        let inner = |a: &str| -> Ipv4Addr { a.parse().unwrap() };
        assert_eq!(s.check_peer(ip("192.0.2.2"), inner("10.18.0.70"), None), Ok(()));
        assert_eq!(s.check_peer(ip("192.0.2.3"), inner("10.18.0.130"), None), Ok(()));
        assert_eq!(s.check_peer(ip("192.0.2.4"), inner("10.18.0.130"), None), Ok(()));
        assert_eq!(s.check_peer(ip("::ffff:192.0.2.2"), inner("10.18.0.70"), None), Ok(()));
        // a stranger; a known worker with another's (or no one's) inner source
        assert_eq!(s.check_peer(ip("192.0.2.66"), inner("10.18.0.70"), None), Err(PeerRefused::UnknownPeer));
        assert_eq!(s.check_peer(ip("192.0.2.2"), inner("10.18.0.130"), None), Err(PeerRefused::SpoofedInner));
        assert_eq!(s.check_peer(ip("192.0.2.3"), inner("10.18.1.5"), None), Err(PeerRefused::SpoofedInner));
        // behind a relay (.9 in front of this worker): what it hands on is taken for known workers only
        let front = Some("192.0.2.9".parse().unwrap());
        assert_eq!(s.check_peer(ip("192.0.2.9"), inner("10.18.0.70"), front), Ok(()));
        assert_eq!(s.check_peer(ip("192.0.2.9"), inner("10.18.1.5"), front), Err(PeerRefused::UnknownPeer));
        // a route removed takes its second address with it
        t.remove_route(c);
        assert_eq!(t.snapshot().check_peer(ip("192.0.2.3"), inner("10.18.0.130"), None), Err(PeerRefused::UnknownPeer));
    }
}
