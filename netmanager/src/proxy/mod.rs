//! The portable userspace datapath: a tun device catches traffic for service IPs (10.30.0.0/16) and remote
//! worker subnets; the [`engine::Engine`] translates service IPs to instances and routes; remote traffic is
//! encapsulated in UDP (header in [`packet`], format in DESIGN.md) to the hosting worker's tunnel endpoint.
//! A UDP socket on the tunnel port decapsulates into the tun. Worker RTT is probed over the same socket.
//!
//! By concern: [`egress`] (tun to world) and [`ingress`] (world to tun), each on its own task;
//! [`resolver`] (unknown service IPs), [`probes`] (worker RTTs), [`routes`] (kernel routes into the tun),
//! [`offload`] and [`udpio`] (GSO/GRO on the tun and the socket), [`reassemble`] (super-packets from
//! datagram runs), [`tun_out`] (batched tun writes), [`counters`]. This file starts them.

pub mod counters;
pub mod egress;
pub mod engine;
pub mod ingress;
pub mod offload;
pub mod packet;
pub mod probes;
pub mod reassemble;
pub mod resolver;
pub mod routes;
pub mod tun_out;
pub mod udpio;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::offload::instance_gso_max_segs;

use self::counters::Counters;
use self::egress::Egress;
use self::engine::Engine;
use self::ingress::Ingress;
use self::packet::HDR_LEN;
use self::resolver::Resolver;
use self::tun_out::TunOut;
use crate::control::Control;
use crate::tables::{Snapshot, Tables};

/// Packets handled per wake-up (tunnel datagrams read in one go; GSO segments per super-packet).
const BATCH: usize = 64;
/// Socket buffers of the tunnel socket: a burst of a fast sender must not overflow the (default ~200 KiB)
/// receive buffer while the datapath is busy writing into the tun.
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Tun device name (default `oaktun0`).
    pub tun_name: String,
    /// Tun MTU (Oakestra: 1450, leaves room for outer IPv4 + UDP + our 8-byte header under 1500).
    pub mtu: u16,
    /// How often worker RTTs are probed and idle flows evicted.
    pub probe_interval: Duration,
    /// IFF_VNET_HDR + TUNSETOFFLOAD: the kernel hands GSO super-packets to the proxy (split in userspace
    /// before translation) and takes GRO-coalesced batches from it.
    pub offload: bool,
    /// Where the conversion table is saved (every probe interval, when it changed) and loaded from at
    /// start, so flows the proxy translated carry on after a restart. None: not saved.
    pub flows_file: Option<std::path::PathBuf>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            tun_name: "oaktun0".into(),
            mtu: 1450,
            probe_interval: Duration::from_secs(2),
            offload: true,
            flows_file: None,
        }
    }
}

/// A running proxy (stopping it closes the tun, which removes the device and its routes).
pub struct Proxy {
    pub counters: Arc<Counters>,
    pub tun_name: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Create the tun (re-created on every start: it is not persistent, so a restart starts clean), add the
/// routes, bind the tunnel port and run the datapath.
pub async fn start(opts: &ProxyOptions, tables: Tables, control: Option<Control>, public: SocketAddr) -> Result<Proxy> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(opts.tun_name.clone())
            .mtu(opts.mtu)
            .enable(true)
            .offload(offload)
            .build_async()
    };
    let (tun, offload) = match build(opts.offload) {
        Ok(t) => (t, opts.offload),
        Err(e) if opts.offload => {
            tracing::warn!(error = %e, tun = %opts.tun_name, "tun offloads unavailable; using plain packets");
            (build(false).with_context(|| format!("creating tun device {}", opts.tun_name))?, false)
        }
        Err(e) => return Err(e).with_context(|| format!("creating tun device {}", opts.tun_name)),
    };
    let idx = tun.if_index().context("tun ifindex")?;
    // the tun carries packets whose source is a service IP or a remote instance: loose reverse-path checks
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{}/rp_filter", opts.tun_name), "0");
    let udp = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, public.port())))
        .await
        .with_context(|| format!("binding the tunnel port udp/{}", public.port()))?;
    udpio::socket_buffers(udp.as_raw_fd(), SOCKET_BUFFER);
    let udp_offload = offload && udpio::enable_gro(udp.as_raw_fd());

    let [conn_task, route_task] = routes::follow(&tables, idx, &opts.tun_name).await?;

    let counters = Arc::new(Counters::new());
    let (resolver, answers) = Resolver::new(control, counters.clone());
    let mut engine = Engine::new(counters.clone());
    if let Some(f) = &opts.flows_file {
        if let Ok(text) = std::fs::read_to_string(f) {
            let n = engine.import(&text, Instant::now());
            tracing::info!(flows = n, file = %f.display(), "restored the conversions of the previous run");
        }
    }
    let saved = engine.changes();
    let engine: SharedEngine = Arc::new(Mutex::new(engine));
    let (tun, udp) = (Arc::new(tun), Arc::new(udp));
    let base = Instant::now();
    let ingress = Ingress {
        tun: tun.clone(),
        udp: udp.clone(),
        engine: engine.clone(),
        view: View::new(&tables),
        counters: counters.clone(),
        base,
        out: TunOut::new(),
        vnet: offload,
        mtu: opts.mtu as usize,
        split: Vec::new(),
        front: match public.ip() {
            std::net::IpAddr::V4(a) if !crate::ebpf::host_addresses().iter().any(|(_, h)| *h == a) => {
                tracing::info!(endpoint = %public, "the advertised tunnel endpoint is not an address of this host (a relay or port forward): tunnel datagrams from it are taken for every known worker");
                Some(a)
            }
            _ => None,
        },
    };
    let dp = Egress {
        tun,
        udp,
        engine,
        flows_file: opts.flows_file.clone(),
        saved,
        view: View::new(&tables),
        resolver,
        counters: counters.clone(),
        public,
        base,
        seq: 0,
        out: TunOut::new(),
        enc: Vec::with_capacity(65536),
        enc_ep: None,
        enc_seg: 0,
        enc_n: 0,
        enc_short: false,
        gso_ok: udp_offload,
        seg_hdrs: Vec::new(),
        seg_payloads: Vec::new(),
        vnet: offload,
    };
    let interval = opts.probe_interval;
    let seg_len = HDR_LEN + opts.mtu as usize + 64;
    let dp_task = tokio::spawn(dp.run(answers, interval, seg_len));
    let in_task = tokio::spawn(ingress.run());
    tracing::info!(tun = %opts.tun_name, port = public.port(), offload, udp_offload, "userspace proxy running");
    Ok(Proxy { counters, tun_name: opts.tun_name.clone(), tasks: vec![dp_task, in_task, route_task, conn_task] })
}

/// The tables' current snapshot, taken again when they changed.
struct View {
    tables: Tables,
    rx: watch::Receiver<u64>,
    snap: Snapshot,
}

impl View {
    fn new(tables: &Tables) -> Self {
        Self { tables: tables.clone(), rx: tables.subscribe(), snap: tables.snapshot() }
    }

    fn refresh(&mut self) {
        if self.rx.has_changed().unwrap_or(false) {
            self.reload();
        }
    }

    fn reload(&mut self) {
        self.rx.borrow_and_update();
        self.snap = self.tables.snapshot();
    }
}

/// The engine, shared by the two directions (each locks it once per packet or super-packet).
type SharedEngine = Arc<Mutex<Engine>>;
