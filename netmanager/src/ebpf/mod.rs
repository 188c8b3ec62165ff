//! Userspace side of the eBPF fast path: loads `netmanager-ebpf.o` (built by `cargo xtask build-ebpf`),
//! attaches `oak_uplink_ingress` to the worker's uplink and `oak_inst_ingress` to the host side of every
//! instance's veth (TC clsact ingress), and keeps the kernel maps in step with the [`Tables`] the tun
//! path reads: service IPs -> instances, remote worker subnets -> tunnel endpoints, local instances ->
//! veth + MAC. Counters per path and per drop reason are read back for the API.
//!
//! Everything here acts on the network namespace of the calling thread.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use ipnet::Ipv4Net;
use netmanager_ebpf_common::{map_name, Config, Counter, LocalEndpoint, Route, Service};

use self::plan::{plan_maps, raw, raw_port};
use crate::tables::Snapshot;

mod plan;

/// Where the fast path's object is looked for when no path is given: beside the binary's target dir
/// (`target/<profile>/../bpf/`), then the install location.
pub fn default_object() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(4) {
        candidates.push(dir.join("bpf/netmanager-ebpf.o"));
        // installed from a bundle: <prefix>/bin/NetManager, <prefix>/lib/oakestra-rs/netmanager-ebpf.o
        candidates.push(dir.join("lib/oakestra-rs/netmanager-ebpf.o"));
    }
    candidates.push(PathBuf::from("/usr/lib/oakestra-rs/netmanager-ebpf.o"));
    candidates.into_iter().find(|p| p.exists())
}

/// Static facts about this worker the programs need.
#[derive(Clone, Debug)]
pub struct FastPathConfig {
    /// Interface tunnel traffic arrives on and leaves by.
    pub uplink: String,
    /// Source of encapsulated packets: the uplink's own address (NodePublicAddress when the uplink holds
    /// it; behind NAT or a relay the advertised address belongs to another host).
    pub source_ip: Ipv4Addr,
    pub tunnel_port: u16,
    /// This worker's subnet (first address = bridge).
    pub subnet: Ipv4Net,
    /// Prefix of every worker subnet (ROUTES keys).
    pub worker_prefix: u8,
    /// Service IP space.
    pub service_net: Ipv4Net,
    /// MAC of the bridge: the source MAC of packets delivered into instances.
    pub gateway_mac: [u8; 6],
    /// (bpffs mount, directory below it) where maps and links are pinned, so traffic keeps flowing while
    /// the NetManager restarts and a restart re-adopts the state; None: nothing outlives the process.
    pub pin_dir: Option<(PathBuf, PathBuf)>,
}

/// Mounts bpffs at `root` (normally /sys/fs/bpf) when nothing is mounted there yet.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let r = root.to_string_lossy();
    if mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == r && f[2] == "bpf"
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(root).ok();
    nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting bpffs on {}", root.display()))?;
    tracing::info!(root = %root.display(), "mounted bpffs");
    Ok(())
}

/// Detaches and removes everything pinned under `dir` (the fast path was turned off).
pub fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("links")) {
        for e in entries.flatten() {
            match PinnedLink::from_pin(e.path()) {
                Ok(l) => drop(l.unpin()),
                Err(_) => drop(std::fs::remove_file(e.path())),
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
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
    /// Services left whole to the tun path, and why (logged when that changes).
    tun_only: BTreeMap<String, String>,
    /// The programs' log records (aya-log); must live as long as the programs use its map. None when a
    /// tokio task owns it and forwards the records into tracing.
    _log: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Forwards the programs' aya-log records into tracing (through the log crate) when a tokio runtime is
/// there to poll them; otherwise keeps the logger alive without reading.
fn start_logger(ebpf: &mut Ebpf) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("no eBPF log records: {e}");
            return None;
        }
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return Some(logger) };
    let _guard = rt.enter();
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same until the logger (owned
    // by the AsyncFd) is dropped.
    match unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(mut fd) => {
            rt.spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else { break };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
            None
        }
        Err(e) => {
            let (logger, e) = e.into_parts();
            tracing::debug!("eBPF log records not forwarded: {e}");
            Some(logger)
        }
    }
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
        let mut ebpf = match &cfg.pin_dir {
            None => Ebpf::load(&bytes).context("loading the eBPF object into the kernel")?,
            Some((root, dir)) => {
                ensure_bpffs(root)?;
                std::fs::create_dir_all(dir.join("maps"))?;
                std::fs::create_dir_all(dir.join("links"))?;
                let paths: Vec<(&str, PathBuf)> =
                    map_name::ALL.iter().map(|m| (*m, dir.join("maps").join(m))).collect();
                let adopting = paths.iter().any(|(_, p)| p.exists());
                let load = || {
                    let mut l = EbpfLoader::new();
                    for (m, p) in &paths {
                        l.map_pin_path(m, p.as_path());
                    }
                    l.load(&bytes)
                };
                match load() {
                    Ok(e) => {
                        if adopting {
                            tracing::info!(dir = %dir.display(), "re-adopted the pinned fast-path maps (flows carry on)");
                        }
                        e
                    }
                    Err(e) if adopting => {
                        // pins from an incompatible build: start afresh
                        tracing::warn!(dir = %dir.display(), "pinned maps do not fit this build ({e}); replacing them");
                        for (_, p) in &paths {
                            let _ = std::fs::remove_file(p);
                        }
                        load().context("loading the eBPF object into the kernel")?
                    }
                    Err(e) => return Err(e).context("loading the eBPF object into the kernel"),
                }
            }
        };
        // before the programs load: they refer to its map
        let log = start_logger(&mut ebpf);
        for name in ["oak_inst_ingress", "oak_uplink_ingress"] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from {}", object.display()))?
                .try_into()?;
            p.load().with_context(|| format!("the kernel refused program {name}"))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let services = HashMap::try_from(take(&mut ebpf, map_name::SERVICES)?)?;
        let routes = HashMap::try_from(take(&mut ebpf, map_name::ROUTES)?)?;
        let local = HashMap::try_from(take(&mut ebpf, map_name::LOCAL)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, map_name::COUNTERS)?)?;
        let mut fp = Self {
            ebpf,
            cfg,
            services,
            routes,
            local,
            counters,
            attached: StdHashMap::new(),
            tun_only: BTreeMap::new(),
            _log: log,
        };
        // adopted maps keep the previous incarnation's config (enabled) until the new one rewrites it
        if fp.cfg.pin_dir.is_none() {
            fp.write_config(false)?;
        }
        let uplink = fp.cfg.uplink.clone();
        fp.attach("oak_uplink_ingress", &uplink)?;
        tracing::info!(uplink = %uplink, object = %object.display(), pinned = fp.cfg.pin_dir.is_some(), "eBPF fast path loaded");
        Ok(fp)
    }

    /// Attaches program `prog` at the ingress of `iface`. With a pin directory the link is pinned there,
    /// replacing (after the new one is in place) a link a previous incarnation left.
    fn attach(&mut self, prog: &str, iface: &str) -> Result<()> {
        add_clsact(iface)?;
        let p: &mut SchedClassifier = self.ebpf.program_mut(prog).expect("loaded").try_into()?;
        let id = p.attach(iface, TcAttachType::Ingress).with_context(|| format!("attaching {prog} to {iface}"))?;
        let Some((_, dir)) = &self.cfg.pin_dir else { return Ok(()) };
        let link: FdLink = p.take_link(id)?.try_into().context("a tcx link (kernel 6.6+) is needed for pinning")?;
        let path = dir.join("links").join(iface);
        if path.exists() {
            match PinnedLink::from_pin(&path) {
                Ok(old) => drop(old.unpin()), // dropping the last reference detaches the old program
                Err(_) => drop(std::fs::remove_file(&path)),
            }
        }
        link.pin(&path).with_context(|| format!("pinning the link of {iface} at {}", path.display()))?;
        Ok(())
    }

    fn unpin_link(&self, iface: &str) {
        if let Some((_, dir)) = &self.cfg.pin_dir {
            let path = dir.join("links").join(iface);
            if let Ok(l) = PinnedLink::from_pin(&path) {
                drop(l.unpin());
            }
        }
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
            public_ip: raw(c.source_ip),
            uplink_ifindex: ifindex(&c.uplink)?,
            tunnel_port: raw_port(c.tunnel_port),
            gw_mac: c.gateway_mac,
            enabled: u32::from(enabled),
        };
        let config =
            self.ebpf.map_mut(map_name::CONFIG).with_context(|| format!("map {} missing", map_name::CONFIG))?;
        let mut a: Array<_, Config> = Array::try_from(config)?;
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
        self.attach("oak_inst_ingress", host_veth)?;
        self.local.insert(raw(ip), LocalEndpoint { ifindex: idx, mac, _pad: [0; 2] }, 0)?;
        self.attached.insert(host_veth.to_string(), ip);
        Ok(())
    }

    /// Forgets an instance (its veth goes away with it, and the attachment with the veth).
    pub fn detach_instance(&mut self, host_veth: &str) -> Result<()> {
        if let Some(ip) = self.attached.remove(host_veth) {
            let _ = self.local.remove(&raw(ip));
        }
        self.unpin_link(host_veth);
        Ok(())
    }

    /// Makes SERVICES and ROUTES equal to the tables. Routes go in before the services that use them and
    /// out after, so the programs never pick an instance they have no way to.
    pub fn sync(&mut self, snap: &Snapshot) -> Result<()> {
        let own: HashSet<Ipv4Addr> = host_addresses().into_iter().map(|(_, a)| a).collect();
        let plan = plan_maps(snap, self.cfg.worker_prefix, &own);
        if plan.tun_only != self.tun_only {
            for (svc, why) in plan.tun_only.iter().filter(|(k, _)| !self.tun_only.contains_key(*k)) {
                tracing::info!(service = %svc, "service left to the tun path: {why}");
            }
            self.tun_only = plan.tun_only.clone();
        }
        for (k, v) in &plan.routes {
            self.routes.insert(*k, *v, 0)?;
        }
        let have: HashSet<u32> = self.services.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !plan.services.contains_key(k)) {
            let _ = self.services.remove(k);
        }
        for (k, v) in &plan.services {
            self.services.insert(*k, *v, 0)?;
        }
        let have: HashSet<u32> = self.routes.keys().filter_map(|k| k.ok()).collect();
        for k in have.iter().filter(|k| !plan.routes.contains_key(k)) {
            let _ = self.routes.remove(k);
        }
        Ok(())
    }

    /// Counters summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut m = BTreeMap::new();
        for c in Counter::ALL {
            let v = self.counters.get(&c.slot(), 0)?;
            m.insert(c.name(), v.iter().sum());
        }
        Ok(m)
    }
}

/// This host's IPv4 addresses with their interfaces (the calling thread's network namespace).
pub fn host_addresses() -> Vec<(String, Ipv4Addr)> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs.filter_map(|a| Some((a.interface_name.clone(), a.address?.as_sockaddr_in()?.ip()))).collect()
        })
        .unwrap_or_default()
}
