//! Userspace side of the eBPF fast path: loads `netmanager-ebpf.o` (built by `cargo xtask build-ebpf`),
//! attaches `oak_uplink_ingress` to the worker's uplink and `oak_inst_ingress` to the host side of every
//! instance's veth (TC clsact ingress), and keeps the kernel maps in step with the [`Tables`] the tun
//! path reads: service IPs -> instances, remote worker subnets -> tunnel endpoints, local instances ->
//! veth + MAC. Counters per path and per drop reason are read back for the API.
//!
//! Everything here acts on the network namespace of the calling thread.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::Ebpf;
use ipnet::Ipv4Net;
use netmanager_ebpf_common::{counter, Config, LocalEndpoint, Route, Service, KIND_CLOSEST, KIND_ROUND_ROBIN, MAX_BACKENDS};


use crate::tables::Snapshot;

/// Where the fast path's object is looked for when no path is given: beside the binary's target dir
/// (`target/<profile>/../bpf/`), then the install location.
pub fn default_object() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(4) {
        candidates.push(dir.join("bpf/netmanager-ebpf.o"));
    }
    candidates.push(PathBuf::from("/usr/lib/oakestra-rs/netmanager-ebpf.o"));
    candidates.into_iter().find(|p| p.exists())
}

/// An address as the programs read it from packet bytes.
fn raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn raw_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// Static facts about this worker the programs need.
#[derive(Clone, Debug)]
pub struct FastPathConfig {
    /// Interface tunnel traffic arrives on and leaves by.
    pub uplink: String,
    /// NodePublicAddress: source of encapsulated packets.
    pub public_ip: Ipv4Addr,
    pub tunnel_port: u16,
    /// This worker's subnet (first address = bridge).
    pub subnet: Ipv4Net,
    /// Prefix of every worker subnet (ROUTES keys).
    pub worker_prefix: u8,
    /// Service IP space.
    pub service_net: Ipv4Net,
    /// MAC of the bridge: the source MAC of packets delivered into instances.
    pub gateway_mac: [u8; 6],
}

/// The loaded and attached fast path.
pub struct FastPath {
    ebpf: Ebpf,
    cfg: FastPathConfig,
    services: HashMap<MapData, u32, Service>,
    routes: HashMap<MapData, u32, Route>,
    local: HashMap<MapData, u32, LocalEndpoint>,
    counters: PerCpuArray<MapData, u64>,
    /// host veth name -> instance ip
    attached: StdHashMap<String, Ipv4Addr>,
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("interface {name} does not exist");
    }
    Ok(i)
}

/// The clsact qdisc for kernels without tcx (before 6.6); with tcx, or when it exists already, the error
/// is irrelevant and the attach that follows reports what matters.
fn add_clsact(iface: &str) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        tracing::debug!(iface, "clsact qdisc not added: {e}");
    }
    Ok(())
}

impl FastPath {
    /// Loads the object and attaches the uplink program. The programs pass everything until
    /// [`FastPath::enable`] (after the first [`FastPath::sync`]).
    pub fn load(object: &Path, cfg: FastPathConfig) -> Result<Self> {
        let bytes = std::fs::read(object).with_context(|| format!("reading the eBPF object {}", object.display()))?;
        let mut ebpf = Ebpf::load(&bytes).context("loading the eBPF object into the kernel")?;
        for name in ["oak_inst_ingress", "oak_uplink_ingress"] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from {}", object.display()))?
                .try_into()?;
            p.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let services = HashMap::try_from(take(&mut ebpf, "SERVICES")?)?;
        let routes = HashMap::try_from(take(&mut ebpf, "ROUTES")?)?;
        let local = HashMap::try_from(take(&mut ebpf, "LOCAL")?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?;
        let mut fp = Self { ebpf, cfg, services, routes, local, counters, attached: StdHashMap::new() };
        fp.write_config(false)?;
        add_clsact(&fp.cfg.uplink)?;
        let uplink = fp.cfg.uplink.clone();
        let p: &mut SchedClassifier = fp.ebpf.program_mut("oak_uplink_ingress").expect("checked").try_into()?;
        p.attach(&uplink, TcAttachType::Ingress).with_context(|| format!("attaching to {uplink}"))?;
        tracing::info!(uplink = %uplink, object = %object.display(), "eBPF fast path loaded");
        Ok(fp)
    }

    fn write_config(&mut self, enabled: bool) -> Result<()> {
        let c = &self.cfg;
        let mask = |p: u8| raw(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, p).expect("prefix").netmask());
        let conf = Config {
            subnet: raw(c.subnet.network()),
            subnet_mask: raw(c.subnet.netmask()),
            route_mask: mask(c.worker_prefix),
            service_net: raw(c.service_net.network()),
            service_mask: raw(c.service_net.netmask()),
            public_ip: raw(c.public_ip),
            uplink_ifindex: ifindex(&c.uplink)?,
            tunnel_port: raw_port(c.tunnel_port),
            gw_mac: c.gateway_mac,
            enabled: u32::from(enabled),
        };
        let mut a: Array<_, Config> = Array::try_from(self.ebpf.map_mut("CONFIG").context("map CONFIG missing")?)?;
        a.set(0, conf, 0)?;
        Ok(())
    }

    /// Turns translation and delivery on.
    pub fn enable(&mut self) -> Result<()> {
        self.write_config(true)
    }

    /// Attaches the instance program to an instance's host-side veth and records where the instance lives.
    pub fn attach_instance(&mut self, host_veth: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        let idx = ifindex(host_veth)?;
        add_clsact(host_veth)?;
        let p: &mut SchedClassifier = self.ebpf.program_mut("oak_inst_ingress").expect("loaded").try_into()?;
        p.attach(host_veth, TcAttachType::Ingress).with_context(|| format!("attaching to {host_veth}"))?;
        self.local.insert(raw(ip), LocalEndpoint { ifindex: idx, mac, _pad: [0; 2] }, 0)?;
        self.attached.insert(host_veth.to_string(), ip);
        Ok(())
    }

    /// Forgets an instance (its veth goes away with it, and the attachment with the veth).
    pub fn detach_instance(&mut self, host_veth: &str) -> Result<()> {
        if let Some(ip) = self.attached.remove(host_veth) {
            let _ = self.local.remove(&raw(ip));
        }
        Ok(())
    }

    /// Makes SERVICES and ROUTES equal to the tables.
    pub fn sync(&mut self, snap: &Snapshot) -> Result<()> {
        let mut want_svc: StdHashMap<u32, Service> = StdHashMap::new();
        for s in snap.services.values() {
            let mut insts: Vec<_> = s.instances.iter().collect();
            insts.sort_by_key(|i| i.instance_number);
            insts.truncate(MAX_BACKENDS);
            let mut backends = [0u32; MAX_BACKENDS];
            for (k, i) in insts.iter().enumerate() {
                backends[k] = raw(i.ns_ip);
            }
            let local = |w: &SocketAddr| w.ip() == std::net::IpAddr::V4(self.cfg.public_ip);
            let closest = insts
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| if local(&i.worker) { 0 } else { i.rtt_us.unwrap_or(u64::MAX / 2) })
                .map(|(k, _)| k as u8)
                .unwrap_or(0);
            let base = Service { kind: KIND_ROUND_ROBIN, count: insts.len() as u8, closest, _pad: 0, backends };
            if let Some(ip) = s.rr_ip {
                want_svc.insert(raw(ip), base);
            }
            if let Some(ip) = s.closest_ip {
                want_svc.insert(raw(ip), Service { kind: KIND_CLOSEST, ..base });
            }
        }
        let have: HashSet<u32> = self.services.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !want_svc.contains_key(k)) {
            let _ = self.services.remove(k);
        }
        for (k, v) in &want_svc {
            self.services.insert(*k, *v, 0)?;
        }
        let mut want_routes: StdHashMap<u32, Route> = StdHashMap::new();
        for (net, ep) in &snap.routes {
            if let SocketAddr::V4(v4) = ep {
                want_routes.insert(raw(net.network()), Route { worker_ip: raw(*v4.ip()), port: raw_port(v4.port()), _pad: 0 });
            }
        }
        let have: HashSet<u32> = self.routes.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !want_routes.contains_key(k)) {
            let _ = self.routes.remove(k);
        }
        for (k, v) in &want_routes {
            self.routes.insert(*k, *v, 0)?;
        }
        Ok(())
    }

    /// Counters summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut m = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = self.counters.get(&(i as u32), 0)?;
            m.insert(*name, v.iter().sum());
        }
        Ok(m)
    }
}
