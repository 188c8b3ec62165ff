//! Instance wiring over netlink (rtnetlink): the worker bridge (gateway = first address of the subnet),
//! a veth pair per instance (host side in the bridge, peer moved into the instance's netns and renamed
//! eth0, with an address from the subnet, a default route via the gateway and lo up), MASQUERADE for
//! egress leaving the overlay, DNAT for the SLA port mappings (iptables, idempotent, removed on undeploy),
//! ip_forward on. Address allocations are persisted so a restart never hands out an address in use.

mod inside;
pub mod nat;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use oak_proto::instance_key;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use nat::{PortMapping, PortMappingError};

/// Why an instance could not be wired: the request's fault (its port mappings, its process) or the
/// host's.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    PortMapping(#[from] PortMappingError),
    #[error("process {pid} does not exist (no {ns_path})")]
    NoProcess { pid: u32, ns_path: String },
    /// Netlink, iptables or the state file refused.
    #[error("{0:#}")]
    Host(#[from] anyhow::Error),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    pub service_id: String,
    pub job_name: String,
    pub instance_number: u32,
    pub host_veth: String,
    pub pid: u32,
    pub ports: Vec<PortMapping>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Persisted {
    subnet: Option<Ipv4Net>,
    /// [`instance_key`] (`service_id/instance_number`) -> attachment
    attachments: BTreeMap<String, Attachment>,
    /// The GSO segment limit every wired instance's eth0 has (None: not known to be the same for all).
    #[serde(default)]
    instance_gso_max_segs: Option<u32>,
}

/// MTU inside instances: a 1500-byte underlay minus the overlay's 36 bytes of encapsulation, rounded
/// down as Oakestra does (the tun device uses the same).
pub const INSTANCE_MTU: u32 = 1450;

/// The MAC of an instance's interface, derived from its overlay address (locally administered), so the
/// fast path knows it without asking inside the instance.
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x4f, o[0], o[1], o[2], o[3]]
}

/// The worker's bridge and its instances.
pub struct Wiring {
    handle: rtnetlink::Handle,
    bridge: String,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    file: PathBuf,
    state: Mutex<Persisted>,
    /// GSO segment limit set on every instance's eth0 (see [`Wiring::set_instance_gso_max_segs`]).
    gso_max_segs: std::sync::atomic::AtomicU32,
    /// Host ports this worker's own services use (its tunnel and API), besides [`nat::SYSTEM_PORTS`].
    reserved_ports: Vec<(u16, String)>,
}

/// The kernel's default (and largest) per-device GSO segment limit.
pub const GSO_MAX_SEGS_DEFAULT: u32 = 65535;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn link_by_name(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<netlink_packet_route::link::LinkMessage>> {
    let mut links = handle.clone().link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(anyhow!("looking up link {name}: {e}")),
    }
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_by_name(handle, name).await?.map(|m| m.header.index))
}

/// Sets the link's GSO segment limit (`gso_max_segs`).
async fn set_gso_max_segs(handle: &rtnetlink::Handle, index: u32, segs: u32) -> Result<(), rtnetlink::Error> {
    let mut req = handle.link().set(index);
    req.message_mut().attributes.push(netlink_packet_route::link::LinkAttribute::GsoMaxSegs(segs));
    req.execute().await
}

async fn has_address(handle: &rtnetlink::Handle, index: u32, ip: Ipv4Addr) -> Result<bool> {
    let mut addrs = handle.address().get().set_link_index_filter(index).execute();
    while let Some(m) = addrs.try_next().await.context("listing addresses")? {
        if m.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Write `1` to /proc/sys/net/ipv4/ip_forward.
pub fn enable_ip_forward() -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")
}

impl Wiring {
    /// Create (or adopt) the bridge with the gateway address, enable forwarding and masquerading.
    /// `reserved`: host ports this worker's own services use (refused to instances, as the system's are).
    pub async fn setup(bridge: &str, subnet: Ipv4Net, data_dir: &Path, reserved: &[(u16, &str)]) -> Result<Self> {
        if bridge.is_empty() || bridge.len() > 12 {
            bail!("bridge name {bridge:?} must be 1..12 characters (veth names are derived from it)");
        }
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        let gateway = subnet.hosts().next().context("subnet has no hosts")?;
        let index = match link_index(&handle, bridge).await? {
            Some(i) => i,
            None => {
                handle
                    .link()
                    .add()
                    .bridge(bridge.to_string())
                    .execute()
                    .await
                    .or_else(|e| if errno(&e) == Some(libc::EEXIST) { Ok(()) } else { Err(e) })
                    .with_context(|| format!("creating bridge {bridge}"))?;
                link_index(&handle, bridge).await?.with_context(|| format!("bridge {bridge} vanished"))?
            }
        };
        if !has_address(&handle, index, gateway).await? {
            handle
                .address()
                .add(index, gateway.into(), subnet.prefix_len())
                .execute()
                .await
                .with_context(|| format!("adding {gateway}/{} to {bridge}", subnet.prefix_len()))?;
        }
        handle.link().set(index).up().execute().await.with_context(|| format!("setting {bridge} up"))?;
        enable_ip_forward()?;
        nat::ensure_bridge_rules(bridge, subnet)?;

        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let file = data_dir.join(format!("wiring-{bridge}.json"));
        let mut state: Persisted = match std::fs::read_to_string(&file) {
            Ok(t) => serde_json::from_str(&t).with_context(|| format!("decoding {}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        if state.subnet.is_some() && state.subnet != Some(subnet) {
            tracing::warn!(old = ?state.subnet, new = %subnet, "worker subnet changed; forgetting old instance addresses");
            state.attachments.clear();
        }
        state.subnet = Some(subnet);
        let w = Self {
            handle,
            bridge: bridge.to_string(),
            subnet,
            gateway,
            file,
            state: Mutex::new(state),
            gso_max_segs: GSO_MAX_SEGS_DEFAULT.into(),
            reserved_ports: reserved.iter().map(|(p, what)| (*p, what.to_string())).collect(),
        };
        w.save(&*w.state.lock().await)?;
        tracing::info!(bridge, %subnet, %gateway, "worker bridge ready");
        Ok(w)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    fn save(&self, s: &Persisted) -> Result<()> {
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.file).with_context(|| format!("replacing {}", self.file.display()))?;
        Ok(())
    }

    /// The most segments an instance's TCP may put in one GSO super-packet (its eth0's `gso_max_segs`),
    /// for instances wired from now on and, best effort, for those already wired (a NetManager that
    /// restarts on another datapath resets them). The tun path asks for as many as fit one UDP_SEGMENT send
    /// once split and encapsulated, so a super-packet crosses as one send, one read and one tun write
    /// instead of two of each. Nothing is entered when every wired instance has it already (recorded).
    pub async fn set_instance_gso_max_segs(&self, segs: u32) {
        self.gso_max_segs.store(segs, std::sync::atomic::Ordering::Relaxed);
        if self.state.lock().await.instance_gso_max_segs == Some(segs) {
            return;
        }
        let mut all = true;
        for att in self.attachments().await {
            let ns_path = format!("/proc/{}/ns/net", att.pid);
            let res = match std::fs::File::open(&ns_path) {
                Ok(ns) => tokio::task::spawn_blocking(move || inside::set_gso_inside(ns, att.ip, segs))
                    .await
                    .map_err(|e| anyhow!("netns thread: {e}"))
                    .and_then(|r| r),
                Err(e) => Err(anyhow!("opening {ns_path}: {e}")),
            };
            match res {
                Ok(()) => tracing::debug!(ip = %att.ip, segs, "instance GSO segment limit set"),
                Err(e) => {
                    tracing::debug!(ip = %att.ip, "instance GSO segment limit not set: {e:#}");
                    all = false;
                }
            }
        }
        let mut st = self.state.lock().await;
        st.instance_gso_max_segs = all.then_some(segs);
        if let Err(e) = self.save(&st) {
            tracing::warn!("recording the instances' GSO segment limit: {e:#}");
        }
    }

    pub async fn attachments(&self) -> Vec<Attachment> {
        self.state.lock().await.attachments.values().cloned().collect()
    }

    /// Wire the netns of `pid`. Re-deploying the same instance re-wires it with the same address.
    pub async fn attach(
        &self,
        pid: u32,
        service_id: &str,
        job_name: &str,
        instance_number: u32,
        port_mappings: &str,
    ) -> Result<Ipv4Addr, WireError> {
        let ports = nat::parse_port_mappings(port_mappings)?;
        let ns_path = format!("/proc/{pid}/ns/net");
        if !Path::new(&ns_path).exists() {
            return Err(WireError::NoProcess { pid, ns_path });
        }
        let k = instance_key(service_id, instance_number);
        let mut st = self.state.lock().await;
        // host ports: not the system's, not this worker's own, not another instance's (re-wiring the same
        // instance keeps its own)
        let others = st.attachments.iter().filter(|(key, _)| **key != k);
        let taken = others.flat_map(|(key, a)| a.ports.iter().map(move |p| (p, key.as_str())));
        let reserved: Vec<(u16, &str)> = self.reserved_ports.iter().map(|(p, w)| (*p, w.as_str())).collect();
        nat::check_port_mappings(&ports, &reserved, taken)?;
        // address: the instance's old one, or the lowest free host address after the gateway
        let ip = match st.attachments.get(&k) {
            Some(a) => a.ip,
            None => {
                let used: Vec<Ipv4Addr> = st.attachments.values().map(|a| a.ip).collect();
                self.subnet
                    .hosts()
                    .skip(1)
                    .find(|ip| !used.contains(ip))
                    .with_context(|| format!("worker subnet {} has no free address", self.subnet))?
            }
        };
        if let Some(old) = st.attachments.remove(&k) {
            self.teardown(&old).await?;
        }
        let host_index = u32::from(ip) - u32::from(self.subnet.network());
        let host_veth = format!("{}v{host_index}", self.bridge);
        let peer_tmp = format!("{}p{host_index}", self.bridge);
        let att = Attachment {
            ip,
            service_id: service_id.into(),
            job_name: job_name.into(),
            instance_number,
            host_veth: host_veth.clone(),
            pid,
            ports,
        };
        // remember first (so a crash half-way never hands the address to someone else), then wire
        st.attachments.insert(k.clone(), att.clone());
        self.save(&st)?;
        if let Err(e) = self.wire(&att, &peer_tmp, &ns_path).await {
            let _ = self.teardown(&att).await;
            st.attachments.remove(&k);
            self.save(&st)?;
            return Err(e.into());
        }
        tracing::info!(pid, %ip, veth = %host_veth, job = job_name, instance = instance_number, "instance wired");
        Ok(ip)
    }

    async fn wire(&self, att: &Attachment, peer_tmp: &str, ns_path: &str) -> Result<()> {
        let h = &self.handle;
        // stale leftovers of an earlier run
        for name in [att.host_veth.as_str(), peer_tmp] {
            if let Some(i) = link_index(h, name).await? {
                h.clone().link().del(i).execute().await.with_context(|| format!("removing stale {name}"))?;
            }
        }
        h.link()
            .add()
            .veth(att.host_veth.clone(), peer_tmp.to_string())
            .execute()
            .await
            .with_context(|| format!("creating veth pair {}/{peer_tmp}", att.host_veth))?;
        let bridge = link_index(h, &self.bridge).await?.with_context(|| format!("bridge {} is gone", self.bridge))?;
        let host = link_index(h, &att.host_veth).await?.context("host veth vanished")?;
        let peer = link_index(h, peer_tmp).await?.context("peer veth vanished")?;
        h.link().set(host).controller(bridge).execute().await.context("attaching veth to the bridge")?;
        h.link().set(host).up().execute().await.context("setting host veth up")?;
        let ns = std::fs::File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
        use std::os::fd::AsRawFd;
        h.link()
            .set(peer)
            .setns_by_fd(ns.as_fd().as_raw_fd())
            .execute()
            .await
            .with_context(|| format!("moving {peer_tmp} into the netns of pid {}", att.pid))?;
        let (ip, prefix, gw, peer_tmp) = (att.ip, self.subnet.prefix_len(), self.gateway, peer_tmp.to_string());
        let segs = self.gso_max_segs.load(std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || inside::configure_inside(ns, &peer_tmp, ip, prefix, gw, segs))
            .await
            .map_err(|e| anyhow!("netns configuration thread: {e}"))??;
        nat::add_port_mappings(&self.bridge, &att.service_id, att.instance_number, ip, &att.ports)?;
        Ok(())
    }

    async fn teardown(&self, att: &Attachment) -> Result<()> {
        nat::remove_port_mappings(&self.bridge, &att.service_id, att.instance_number)?;
        if let Some(i) = link_index(&self.handle, &att.host_veth).await? {
            match self.handle.clone().link().del(i).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                Err(e) => return Err(anyhow!("removing {}: {e}", att.host_veth)),
            }
        }
        Ok(())
    }

    /// Unwire an instance (idempotent): remove its veth and DNAT rules and free its address.
    pub async fn detach(&self, service_id: &str, instance_number: u32) -> Result<Option<Attachment>> {
        let k = instance_key(service_id, instance_number);
        let mut st = self.state.lock().await;
        let Some(att) = st.attachments.get(&k).cloned() else {
            nat::remove_port_mappings(&self.bridge, service_id, instance_number)?;
            return Ok(None);
        };
        self.teardown(&att).await?;
        st.attachments.remove(&k);
        self.save(&st)?;
        tracing::info!(ip = %att.ip, veth = %att.host_veth, "instance unwired");
        Ok(Some(att))
    }

    /// Remove the bridge and the masquerade rule (tests; a worker keeps its bridge across restarts).
    pub async fn destroy(&self) -> Result<()> {
        for att in self.attachments().await {
            let _ = self.teardown(&att).await;
        }
        nat::remove_bridge_rules(&self.bridge)?;
        if let Some(i) = link_index(&self.handle, &self.bridge).await? {
            self.handle.clone().link().del(i).execute().await.with_context(|| format!("removing {}", self.bridge))?;
        }
        let _ = std::fs::remove_file(&self.file);
        Ok(())
    }
}
