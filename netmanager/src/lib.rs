//! NetManager library: configuration, local API, control-plane client, instance wiring and datapaths.

pub mod api;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod proxy;
pub mod select;
pub mod tables;
pub mod wiring;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::api::{ApiState, Ready};
use crate::config::NetConfig;
use crate::control::Control;
use crate::tables::Tables;
use crate::wiring::Wiring;

/// How to run a NetManager.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    /// Local API address (127.0.0.1:6000 by default).
    pub listen: SocketAddr,
    /// Where instance address allocations are persisted, and the local API's credential (`api-token`).
    pub data_dir: PathBuf,
    /// Worker bridge name (default `oak0`; tests use unique names).
    pub bridge: String,
    /// The userspace tun proxy (None: disabled, e.g. when another datapath is used or in tests that only
    /// wire instances).
    pub proxy: Option<proxy::ProxyOptions>,
    /// The eBPF fast path (None: tun path only).
    pub ebpf: Option<EbpfOptions>,
    /// The cluster's worker join token: used once, to join the cluster (the certificate it gives is kept
    /// in `<data-dir>/identity`).
    pub token: String,
}

/// Where the fast path's object is and which interface is the uplink (detected when not given).
#[derive(Clone, Debug, Default)]
pub struct EbpfOptions {
    pub object: Option<PathBuf>,
    pub uplink: Option<String>,
    /// bpffs mount for the pins (default /sys/fs/bpf).
    pub pin_root: Option<PathBuf>,
}

/// A started NetManager.
pub struct Running {
    pub api_addr: SocketAddr,
    pub tables: Tables,
    pub control: Control,
    pub wiring: Arc<Wiring>,
    pub config: NetConfig,
    /// true while the push subscription to the cluster is connected
    pub connected: tokio::sync::watch::Receiver<bool>,
    /// The userspace proxy, when enabled.
    pub proxy: Option<proxy::Proxy>,
    /// The eBPF fast path, when it loaded.
    pub fastpath: Option<Arc<parking_lot::Mutex<ebpf::FastPath>>>,
    /// The local API's credential (the NodeEngine reads it from its file).
    pub credential: api::Credential,
    api_task: tokio::task::JoinHandle<std::io::Result<()>>,
    sub_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Wait until the API server stops (it does not, unless it fails).
    pub async fn wait(self) -> Result<()> {
        let r = self.api_task.await;
        self.sub_task.abort();
        r.context("API task")?.context("API server")
    }

    /// Stop the API server and the subscription (the bridge stays; see [`Wiring::destroy`]).
    pub fn stop(&self) {
        self.api_task.abort();
        self.sub_task.abort();
        if let Some(p) = &self.proxy {
            p.stop();
        }
    }
}

fn node_name(cfg: &NetConfig) -> String {
    if let Some(n) = &cfg.node_name {
        return n.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// Load the config, bind the API (answering `ready:false` until done), lease the worker subnet (fatal on
/// timeout or a bad network), set up the bridge, start the push subscription. Returns once ready.
pub async fn start(opts: Options) -> Result<Running> {
    let cfg = NetConfig::load(&opts.config_path)?;
    let public_ip = cfg.public_address()?;
    let public = SocketAddr::new(public_ip.into(), cfg.node_public_port);
    let tables = Tables::new();
    let url = cfg.cluster_net_url();
    let node = node_name(&cfg);
    tracing::info!(%url, %node, %public, "starting NetManager");

    let credential = api::Credential::load_or_create(&opts.data_dir.join("api-token"))?;
    let state = Arc::new(ApiState {
        ready: tokio::sync::OnceCell::new(),
        public,
        counters: std::sync::OnceLock::new(),
        fastpath: std::sync::OnceLock::new(),
        credential: credential.clone(),
    });
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding the local API on {}", opts.listen))?;
    let api_addr = listener.local_addr()?;
    let app = api::router(state.clone());
    let api_task = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!(%api_addr, "local API listening");

    let member = oak_trust::Member::new(
        &url,
        oak_trust::CLUSTER_SERVER,
        "netmanager",
        &node,
        &opts.token,
        opts.data_dir.join("identity"),
    );
    let control = Control::new(&url, member, &node, public, tables.clone())?;
    let subnet = match control.lease(&opts.config_path.display().to_string()).await {
        Ok(s) => s,
        Err(e) => {
            api_task.abort();
            return Err(e);
        }
    };
    let reserved =
        [(cfg.node_public_port, "this worker's overlay tunnel"), (api_addr.port(), "this NetManager's local API")];
    let wiring = match Wiring::setup(&opts.bridge, subnet, &opts.data_dir, &reserved).await {
        Ok(w) => Arc::new(w),
        Err(e) => {
            api_task.abort();
            return Err(e);
        }
    };
    let (tx, connected) = tokio::sync::watch::channel(false);
    let sub_task = control.spawn_subscription(tx);
    let proxy = match &opts.proxy {
        None => None,
        Some(p) => match proxy::start(
            &proxy::ProxyOptions {
                flows_file: p.flows_file.clone().or_else(|| Some(opts.data_dir.join("proxy-flows"))),
                ..p.clone()
            },
            tables.clone(),
            Some(control.clone()),
            public,
        )
        .await
        {
            Ok(px) => {
                let _ = state.counters.set(px.counters.clone());
                wiring::nat::ensure_tunnel_untracked(&opts.bridge, cfg.node_public_port);
                Some(px)
            }
            Err(e) => {
                api_task.abort();
                sub_task.abort();
                return Err(e.context("starting the userspace proxy"));
            }
        },
    };
    let pin_root = opts.ebpf.as_ref().and_then(|o| o.pin_root.clone()).unwrap_or_else(|| PathBuf::from("/sys/fs/bpf"));
    let pin_dir = pin_root.join(pin_dir(&node, &opts.bridge));
    let fastpath = match &opts.ebpf {
        None => {
            // a previous incarnation's programs must not keep running beside the tun path
            ebpf::remove_pins(&pin_dir);
            None
        }
        Some(o) => {
            match start_fastpath(o, &cfg, public_ip, subnet, &opts.bridge, &tables, &wiring, (pin_root, pin_dir)).await
            {
                Ok(fp) => {
                    let _ = state.fastpath.set(fp.clone());
                    Some(fp)
                }
                Err(e) => {
                    tracing::warn!("eBPF fast path unavailable, running on the tun path only: {e:#}");
                    None
                }
            }
        }
    };
    // the tun path carries remote traffic: instances' super-packets sized to cross as one UDP send
    let segs = match (&opts.proxy, &fastpath) {
        (Some(p), None) if p.offload => proxy::instance_gso_max_segs(p.mtu),
        _ => wiring::GSO_MAX_SEGS_DEFAULT,
    };
    wiring.set_instance_gso_max_segs(segs).await;
    let _ = state.ready.set(Ready { control: control.clone(), wiring: wiring.clone() });
    tracing::info!(%subnet, bridge = %opts.bridge, fast_path = fastpath.is_some(), "NetManager ready");
    Ok(Running {
        api_addr,
        tables,
        control,
        wiring,
        config: cfg,
        connected,
        proxy,
        fastpath,
        credential,
        api_task,
        sub_task,
    })
}

/// Undoes what a NetManager with these options set up on this host: the fast path's pins (its programs
/// detach), the bridge with its NAT/forward rules and its instances' port mappings. Instances' own veths
/// go with their namespaces.
pub fn teardown(opts: &Options) -> Result<()> {
    let node = match NetConfig::load(&opts.config_path) {
        Ok(c) => node_name(&c),
        Err(_) => {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
        }
    };
    let root = opts.ebpf.as_ref().and_then(|o| o.pin_root.clone()).unwrap_or_else(|| PathBuf::from("/sys/fs/bpf"));
    let pins = root.join(pin_dir(&node, &opts.bridge));
    ebpf::remove_pins(&pins);
    wiring::nat::remove_all_rules(&opts.bridge)?;
    let out = std::process::Command::new("ip").args(["link", "del", &opts.bridge]).output();
    if let Ok(o) = out {
        if !o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("Cannot find device") {
            anyhow::bail!("removing bridge {}: {}", opts.bridge, String::from_utf8_lossy(&o.stderr).trim());
        }
    }
    tracing::info!(bridge = %opts.bridge, pins = %pins.display(), "NetManager state on this host removed");
    Ok(())
}

/// Where this NetManager pins its fast path (bpffs is shared by all network namespaces: the node name
/// and bridge keep several NetManagers on one machine apart).
fn pin_dir(node: &str, bridge: &str) -> PathBuf {
    let clean: String = format!("{node}-{bridge}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    PathBuf::from("oakestra-rs").join(clean)
}

/// `prefer` when interface `iface` holds it, else the interface's first IPv4 address.
fn uplink_ipv4(iface: &str, prefer: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr> {
    let addrs: Vec<std::net::Ipv4Addr> =
        ebpf::host_addresses().into_iter().filter(|(name, _)| name == iface).map(|(_, a)| a).collect();
    if addrs.contains(&prefer) {
        Some(prefer)
    } else {
        addrs.first().copied()
    }
}

/// The interface holding `ip`, else the one the default route leaves by.
fn uplink_for(ip: std::net::Ipv4Addr) -> Result<String> {
    if let Some((name, _)) = ebpf::host_addresses().into_iter().find(|(_, a)| *a == ip) {
        return Ok(name);
    }
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    routes
        .lines()
        .skip(1)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
        })
        .with_context(|| {
            format!("no interface holds {ip} and there is no default route: set DefaultInterface in netcfg.json")
        })
}

/// Loads the fast path, fills its maps, adopts the instances already wired and follows table changes.
// each argument is a separate fact of this NetManager's start, passed once from `start`
#[allow(clippy::too_many_arguments)]
async fn start_fastpath(
    o: &EbpfOptions,
    cfg: &NetConfig,
    public_ip: std::net::Ipv4Addr,
    subnet: ipnet::Ipv4Net,
    bridge: &str,
    tables: &Tables,
    wiring: &Wiring,
    pin_dir: (PathBuf, PathBuf),
) -> Result<Arc<parking_lot::Mutex<ebpf::FastPath>>> {
    let object = o
        .object
        .clone()
        .or_else(ebpf::default_object)
        .context("no eBPF object found (build it with `cargo xtask build-ebpf`, or pass --ebpf-object)")?;
    let uplink = match o.uplink.clone().or_else(|| cfg.default_interface.clone()) {
        Some(u) => u,
        None => uplink_for(public_ip)?,
    };
    // the outer source: the uplink's own address (the advertised one may be a NAT's or a relay's)
    let source_ip = uplink_ipv4(&uplink, public_ip).unwrap_or(public_ip);
    if source_ip != public_ip {
        tracing::info!(%uplink, %source_ip, advertised = %public_ip, "tunnel packets leave with the uplink's own address");
    }
    let mac = std::fs::read_to_string(format!("/sys/class/net/{bridge}/address"))
        .with_context(|| format!("reading the MAC of bridge {bridge}"))?;
    let mut gateway_mac = [0u8; 6];
    for (i, p) in mac.trim().split(':').enumerate().take(6) {
        gateway_mac[i] = u8::from_str_radix(p, 16).context("bridge MAC")?;
    }
    let mut fp = ebpf::FastPath::load(
        &object,
        ebpf::FastPathConfig {
            uplink,
            source_ip,
            tunnel_port: cfg.node_public_port,
            subnet,
            worker_prefix: subnet.prefix_len(),
            service_net: control::SERVICE_SPACE,
            gateway_mac,
            pin_dir: Some(pin_dir),
        },
    )?;
    for a in wiring.attachments().await {
        if let Err(e) = fp.attach_instance(&a.host_veth, a.ip, wiring::instance_mac(a.ip)) {
            tracing::warn!(veth = %a.host_veth, "instance stays on the kernel path: {e:#}");
        }
    }
    fp.sync(&tables.snapshot())?;
    fp.enable()?;
    let fp = Arc::new(parking_lot::Mutex::new(fp));
    let (f2, t2) = (fp.clone(), tables.clone());
    let mut changed = tables.subscribe();
    tokio::spawn(async move {
        while changed.changed().await.is_ok() {
            let snap = t2.snapshot();
            if let Err(e) = f2.lock().sync(&snap) {
                tracing::warn!("updating the fast path's maps: {e:#}");
            }
        }
    });
    Ok(fp)
}
