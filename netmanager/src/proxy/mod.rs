//! The portable userspace datapath: a tun device catches traffic for service IPs (10.30.0.0/16) and remote
//! worker subnets; the [`engine::Engine`] translates service IPs to instances and routes; remote traffic is
//! encapsulated in UDP (header in [`packet`], format in DESIGN.md) to the hosting worker's tunnel endpoint.
//! A UDP socket on the tunnel port decapsulates into the tun. Worker RTT is probed over the same socket.

pub mod counters;
pub mod engine;
pub mod packet;
pub mod reassemble;
pub mod udpio;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::counters::{Counters, Event, Reason};
use self::engine::{Engine, Verdict, SERVICE_SPACE};
use self::packet::HDR_LEN;
use crate::control::Control;
use crate::tables::{Snapshot, Tables};

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

fn route_msg(handle: &rtnetlink::Handle, net: Ipv4Net, idx: u32) -> rtnetlink::RouteAddRequest<Ipv4Addr> {
    handle
        .route()
        .add()
        .v4()
        .destination_prefix(net.network(), net.prefix_len())
        .output_interface(idx)
        .scope(netlink_packet_route::route::RouteScope::Link)
}

/// Make the kernel routes into the tun match `desired` (adds replace; removals ignore missing routes).
async fn sync_routes(
    handle: &rtnetlink::Handle,
    idx: u32,
    desired: &BTreeSet<Ipv4Net>,
    installed: &mut BTreeSet<Ipv4Net>,
) {
    for net in desired.difference(&installed.clone()) {
        match route_msg(handle, *net, idx).replace().execute().await {
            Ok(()) => {
                installed.insert(*net);
                tracing::debug!(%net, "route into the tun added");
            }
            Err(e) => tracing::warn!(%net, error = %e, "adding route into the tun failed"),
        }
    }
    for net in installed.difference(desired).copied().collect::<Vec<_>>() {
        let mut req = route_msg(handle, net, idx);
        let msg = req.message_mut().clone();
        if let Err(e) = handle.route().del(msg).execute().await {
            tracing::debug!(%net, error = %e, "removing route from the tun");
        }
        installed.remove(&net);
    }
}

fn desired_routes(s: &Snapshot) -> BTreeSet<Ipv4Net> {
    let mut d: BTreeSet<Ipv4Net> = s.routes.keys().filter(|n| Some(**n) != s.local_subnet).copied().collect();
    d.insert(SERVICE_SPACE);
    d
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
    socket_buffers(&udp, 8 << 20);
    let udp_offload = offload && udpio::enable_gro(udp.as_raw_fd());

    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let conn_task = tokio::spawn(conn);
    let mut installed = BTreeSet::new();
    let mut rx = tables.subscribe();
    sync_routes(&handle, idx, &desired_routes(&tables.snapshot()), &mut installed).await;
    anyhow::ensure!(installed.contains(&SERVICE_SPACE), "could not route {SERVICE_SPACE} into {}", opts.tun_name);
    let t2 = tables.clone();
    let route_task = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let d = desired_routes(&t2.snapshot());
            sync_routes(&handle, idx, &d, &mut installed).await;
        }
    });

    let counters = Arc::new(Counters::new());
    let (res_tx, res_rx) = mpsc::channel(64);
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
    };
    let dp = Datapath {
        tun,
        udp,
        engine,
        flows_file: opts.flows_file.clone(),
        saved,
        view: View::new(&tables),
        control,
        counters: counters.clone(),
        public,
        held: HashMap::new(),
        resolving: HashSet::new(),
        negative: HashMap::new(),
        res_tx,
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
    let dp_task = tokio::spawn(dp.run(res_rx, interval, seg_len));
    let in_task = tokio::spawn(ingress.run());
    tracing::info!(tun = %opts.tun_name, port = public.port(), offload, udp_offload, "userspace proxy running");
    Ok(Proxy { counters, tun_name: opts.tun_name.clone(), tasks: vec![dp_task, in_task, route_task, conn_task] })
}

/// Big socket buffers for the tunnel socket: a burst of a fast sender must not overflow the (default
/// ~200 KiB) receive buffer while the datapath is busy writing into the tun. `*BUFFORCE` (root) first.
fn socket_buffers(udp: &UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    let fd = udp.as_raw_fd();
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let set = |opt| {
            // SAFETY: fd is a live socket, the value is a c_int of the size passed
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &bytes as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            let _ = set(plain);
        }
    }
}

const HOLD_PER_IP: usize = 8;
const HOLD_IPS: usize = 256;
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// Room in front of packets queued for the tun (the virtio-net header goes there with offloads).
const VOFF: usize = 16;
/// Packets handled per wake-up (tunnel datagrams read in one go; GSO segments per super-packet).
const BATCH: usize = 64;
/// Segments of one GSO super-packet read from the tun (65535 / 88-byte minimum MSS = 745).
const MAX_SEGMENTS: usize = 1024;
const VHL: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Bytes of UDP payload one UDP_SEGMENT send may carry (65535 - IPv4 and UDP headers, rounded down).
const UDP_GSO_MAX_PAYLOAD: usize = 65000;

/// The GSO segment limit the tun path wants on instances' interfaces: as many full-MTU segments as fit one
/// UDP_SEGMENT send once each carries the tunnel header (44 at MTU 1450). With the kernel's default the
/// instance's TCP builds 46-segment super-packets, and each crossed as two sends, two reads and two tun
/// writes; measured here (single stream, tun path on both workers) 6.7-7.3 against 7.8-8.3 Gbit/s.
pub fn instance_gso_max_segs(mtu: u16) -> u32 {
    (UDP_GSO_MAX_PAYLOAD / (HDR_LEN + mtu as usize)).max(1) as u32
}
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// One UDP_SEGMENT send of `parts` (gathered by the kernel; every part but the last `seg` bytes) to `ep`,
/// waiting while the socket buffer is full.
async fn send_gso(udp: &UdpSocket, parts: &[&[u8]], seg: usize, ep: SocketAddrV4) -> std::io::Result<usize> {
    let fd = udp.as_raw_fd();
    loop {
        match udp.try_io(Interest::WRITABLE, || udpio::send_segments(fd, parts, seg as u16, ep)) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => udp.writable().await?,
            r => return r,
        }
    }
}

/// The kernel's `hdr_len` is not trusted (on a forwarded packet it can span the whole first segment): it is
/// recomputed from the transport header, as tun-rs does before its own split. False when the header is
/// inconsistent with the packet.
pub(crate) fn gso_header_fixup(hdr: &mut tun_rs::VirtioNetHdr, pkt: &[u8]) -> bool {
    let start = hdr.csum_start as usize;
    let l4_len = match hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        tun_rs::VIRTIO_NET_HDR_GSO_TCPV4 => match pkt.get(start + 12) {
            Some(b) => usize::from(b >> 4) * 4,
            None => return false,
        },
        tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 => 8,
        _ => return false,
    };
    if !(8..=60).contains(&l4_len) || hdr.gso_size == 0 || start + l4_len > pkt.len() {
        return false;
    }
    hdr.hdr_len = (start + l4_len) as u16;
    true
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

fn lock(e: &SharedEngine) -> MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

/// Packets queued for the tun (VOFF bytes of room + packet), written GRO-coalesced by `flush`. Each
/// direction has its own.
struct TunOut {
    gro: tun_rs::GROTable,
    out: Vec<Vec<u8>>,
    nout: usize,
}

impl TunOut {
    fn new() -> Self {
        Self { gro: tun_rs::GROTable::new(), out: Vec::new(), nout: 0 }
    }

    /// Queue a packet; true when the queue is full and should be flushed.
    fn push(&mut self, pkt: &[u8]) -> bool {
        if self.nout == self.out.len() {
            // GRO appends coalesced payloads in place: room for a 64 KiB super-packet
            self.out.push(Vec::with_capacity(VOFF + 65536));
        }
        let b = &mut self.out[self.nout];
        b.clear();
        b.resize(VOFF, 0);
        b.extend_from_slice(pkt);
        self.nout += 1;
        self.nout >= BATCH
    }

    /// Write the queued packets into the tun (coalesced into super-packets when offloads are on).
    async fn flush(&mut self, tun: &tun_rs::AsyncDevice, counters: &Counters) {
        if self.nout == 0 {
            return;
        }
        let n = self.nout;
        self.nout = 0;
        match tun.send_multiple(&mut self.gro, &mut self.out[..n], VOFF).await {
            Ok(_) => counters.add(Event::TunTx, n as u64),
            Err(e) => {
                tracing::debug!(error = %e, "writing into the tun");
                for _ in 0..n {
                    counters.drop_packet(Reason::TunWriteError);
                }
            }
        }
    }
}

/// The tun-to-world direction (reads from the tun: translation, encapsulation, resolution of unknown
/// service IPs) and the periodic work (probes, eviction, saving the table). The other direction runs in
/// [`Ingress`], on its own task, so a worker's replies (TCP ACKs) are not queued behind its bulk data.
struct Datapath {
    tun: Arc<tun_rs::AsyncDevice>,
    udp: Arc<UdpSocket>,
    engine: SharedEngine,
    flows_file: Option<std::path::PathBuf>,
    /// `engine.changes()` when the table was last saved.
    saved: u64,
    view: View,
    control: Option<Control>,
    counters: Arc<Counters>,
    public: SocketAddr,
    /// Packets to unknown service IPs waiting for the resolution (header room included).
    held: HashMap<Ipv4Addr, Vec<Vec<u8>>>,
    resolving: HashSet<Ipv4Addr>,
    negative: HashMap<Ipv4Addr, Instant>,
    res_tx: mpsc::Sender<(Ipv4Addr, bool)>,
    base: Instant,
    seq: u32,
    /// Hairpinned packets for local instances.
    out: TunOut,
    /// A run of encapsulated datagrams for one worker, sent with one UDP_SEGMENT sendmsg by `flush_enc`.
    enc: Vec<u8>,
    enc_ep: Option<SocketAddrV4>,
    enc_seg: usize,
    enc_n: usize,
    enc_short: bool,
    /// UDP GSO/GRO on the tunnel socket (off after the kernel refused once).
    gso_ok: bool,
    /// Per-segment header buffers for cutting TCP super-packets without copying payloads (made on first use).
    seg_hdrs: Vec<[u8; reassemble::SEG_HDR_MAX]>,
    seg_payloads: Vec<std::ops::Range<usize>>,
    /// The tun was opened with IFF_VNET_HDR (reads start with a virtio header).
    vnet: bool,
}

impl Datapath {
    async fn run(mut self, mut res_rx: mpsc::Receiver<(Ipv4Addr, bool)>, interval: Duration, seg_len: usize) {
        let tun = self.tun.clone();
        // a read from the tun: with offloads the virtio header + possibly a GSO super-packet (split into
        // `segs`, each with HDR_LEN bytes of room for the tunnel header); without, HDR_LEN bytes of room +
        // the packet
        let rd_off = if self.vnet { 0 } else { HDR_LEN };
        let mut raw = vec![0u8; HDR_LEN + VHL + 65536];
        // enough segment buffers for a 64 KiB super-packet cut at the smallest TCP MSS (88 bytes)
        let mut segs: Vec<Vec<u8>> = (0..MAX_SEGMENTS).map(|_| vec![0u8; seg_len.max(HDR_LEN + 1600)]).collect();
        let mut sizes = vec![0usize; MAX_SEGMENTS];
        let mut errors = 0u32;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = tun.recv(&mut raw[rd_off..]) => match r {
                    Ok(n) => {
                        errors = 0;
                        self.counters.event(Event::TunReads);
                        self.on_tun_read(&mut raw[..rd_off + n], &mut segs, &mut sizes).await;
                        self.flush_enc().await;
                        self.flush().await;
                    }
                    Err(e) => {
                        errors += 1;
                        if errors == 1 || errors.is_multiple_of(100) {
                            tracing::warn!(error = %e, "reading the tun");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some((ip, found)) = res_rx.recv() => self.on_resolved(ip, found).await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    /// One read from the tun (`raw`: the virtio header and the packet with offloads, else HDR_LEN bytes of
    /// room and the packet). A GSO super-packet is translated once, on its header, and then cut into
    /// segments (tun-rs computes their checksums from scratch), instead of translating every segment.
    async fn on_tun_read(&mut self, raw: &mut [u8], segs: &mut [Vec<u8>], sizes: &mut [usize]) {
        if !self.vnet {
            self.counters.event(Event::TunRx);
            self.on_tun(raw).await;
            return;
        }
        // a virtio header and at least one byte of packet
        let Some(mut hdr) =
            raw.get(..VHL).filter(|_| raw.len() > VHL).and_then(|h| tun_rs::VirtioNetHdr::decode(h).ok())
        else {
            self.counters.drop_packet(Reason::TunMalformed);
            return;
        };
        if raw[VHL] >> 4 != 4 {
            // IPv6 (the kernel's own router solicitations on the tun; the overlay is IPv4)
            self.counters.drop_packet(Reason::NotIpv4);
            return;
        }
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
            if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                && !packet::complete_partial(&mut raw[VHL..], hdr.csum_start, hdr.csum_offset)
            {
                self.counters.drop_packet(Reason::TunMalformed);
                return;
            }
            self.counters.event(Event::TunRx);
            // the virtio header is 10 bytes: its last HDR_LEN bytes become the tunnel header's room
            self.on_tun(&mut raw[VHL - HDR_LEN..]).await;
            return;
        }
        if !gso_header_fixup(&mut hdr, &raw[VHL..]) {
            self.counters.drop_packet(Reason::TunMalformed);
            return;
        }
        self.view.refresh();
        let now = Instant::now();
        let v = lock(&self.engine).outbound(&mut raw[VHL..], &self.view.snap, now);
        if matches!(v, Verdict::Drop(_)) {
            return; // counted by the engine
        }
        // TCP to another worker: cut without copying payloads (headers per segment, payloads gathered)
        if let Verdict::Encap(SocketAddr::V4(ep)) = v {
            if self.gso_ok && hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN == tun_rs::VIRTIO_NET_HDR_GSO_TCPV4 {
                if self.seg_hdrs.is_empty() {
                    self.seg_hdrs = vec![[0u8; reassemble::SEG_HDR_MAX]; MAX_SEGMENTS];
                    self.seg_payloads = vec![0..0; MAX_SEGMENTS];
                }
                let (hl, mss) = (usize::from(hdr.hdr_len), usize::from(hdr.gso_size));
                let pkt = &raw[VHL..];
                if let Some(n) = reassemble::split_tcp(pkt, hl, mss, &mut self.seg_hdrs, &mut self.seg_payloads) {
                    if n > 1 {
                        self.counters.add(Event::TunRx, n as u64);
                        self.flush_enc().await;
                        let mut hdrs = std::mem::take(&mut self.seg_hdrs);
                        let payloads = std::mem::take(&mut self.seg_payloads);
                        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * n);
                        for (h, r) in hdrs[..n].iter_mut().zip(&payloads[..n]) {
                            packet::write_header_flags(h, packet::TYPE_DATA, packet::FLAG_CSUM_COMPLETE, 0);
                            let h: &[u8] = h;
                            parts.push(&h[..HDR_LEN + hl]);
                            parts.push(&pkt[r.clone()]);
                        }
                        self.send_parts(&parts, 2, HDR_LEN + hl + mss, ep).await;
                        drop(parts);
                        self.seg_hdrs = hdrs;
                        self.seg_payloads = payloads;
                        return;
                    }
                }
            }
        }
        let n = match tun_rs::gso_split(&mut raw[VHL..], hdr, segs, sizes, HDR_LEN, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "a GSO super-packet from the tun could not be split");
                self.counters.drop_packet(Reason::TunMalformed);
                return;
            }
        };
        self.counters.add(Event::TunRx, n as u64);
        match v {
            Verdict::Resolve(ip) => {
                for i in 0..n {
                    self.counters.drop_packet(Reason::UnknownService);
                    self.hold(ip, &segs[i][..HDR_LEN + sizes[i]], now);
                }
            }
            Verdict::Encap(SocketAddr::V4(ep)) if self.gso_ok && n > 1 => {
                self.flush_enc().await;
                self.send_split(&mut segs[..n], &sizes[..n], ep).await;
            }
            v => {
                for i in 0..n {
                    self.emit(&mut segs[i][..HDR_LEN + sizes[i]], v).await;
                }
            }
        }
    }

    /// The segments of one super-packet to one worker: the tunnel header is written into each segment's
    /// room and the kernel gathers them (one iovec each) into one UDP_SEGMENT send, with no copy here.
    async fn send_split(&mut self, segs: &mut [Vec<u8>], sizes: &[usize], ep: SocketAddrV4) {
        for (s, len) in segs.iter_mut().zip(sizes) {
            packet::write_header_flags(&mut s[..HDR_LEN], packet::TYPE_DATA, packet::FLAG_CSUM_COMPLETE, 0);
            debug_assert!(HDR_LEN + len <= s.len());
        }
        let parts: Vec<&[u8]> = segs.iter().zip(sizes).map(|(s, len)| &s[..HDR_LEN + len]).collect();
        let seg = parts[0].len();
        self.send_parts(&parts, 1, seg, ep).await;
    }

    /// Datagrams of `seg` bytes (the last may be shorter), each made of `per_seg` consecutive `parts`, to
    /// `ep` with UDP_SEGMENT sends (one datagram per `send_to` if the kernel refuses).
    async fn send_parts(&mut self, parts: &[&[u8]], per_seg: usize, seg: usize, ep: SocketAddrV4) {
        // one send carries at most 64 KiB of UDP payload: a 64 KiB TCP super-packet plus the per-segment
        // headers is more, so it goes out in two or more sends
        let per_send = (UDP_GSO_MAX_PAYLOAD / seg).clamp(1, BATCH);
        for run in parts.chunks(per_send * per_seg) {
            let datagrams = run.len() / per_seg;
            match send_gso(&self.udp, run, seg, ep).await {
                Ok(b) => {
                    self.counters.event(Event::TunnelSends);
                    self.counters.add(Event::TunnelTx, datagrams as u64);
                    self.counters.add(Event::TunnelTxBytes, b as u64);
                }
                Err(e) => {
                    if self.gso_ok {
                        tracing::warn!(error = %e, segments = datagrams, seg, "UDP segmentation offload refused; sending datagrams one by one from now on");
                        self.gso_ok = false;
                    }
                    let whole: Vec<Vec<u8>> = run.chunks(per_seg).map(|d| d.concat()).collect();
                    self.send_each(whole.iter().map(|d| d.as_slice()), ep).await;
                }
            }
        }
    }

    /// Datagrams one `send_to` each (the fallback when the kernel refuses UDP GSO).
    async fn send_each<'a>(&self, datagrams: impl Iterator<Item = &'a [u8]>, ep: SocketAddrV4) {
        for d in datagrams {
            self.counters.event(Event::TunnelSends);
            match self.udp.send_to(d, SocketAddr::V4(ep)).await {
                Ok(b) => {
                    self.counters.event(Event::TunnelTx);
                    self.counters.add(Event::TunnelTxBytes, b as u64);
                }
                Err(_) => self.counters.drop_packet(Reason::SendError),
            }
        }
    }

    /// `frame` = HDR_LEN bytes of room + the packet read from the tun.
    async fn on_tun(&mut self, frame: &mut [u8]) {
        self.view.refresh();
        let now = Instant::now();
        let v = lock(&self.engine).outbound(&mut frame[HDR_LEN..], &self.view.snap, now);
        if let Verdict::Resolve(ip) = v {
            self.counters.drop_packet(Reason::UnknownService);
            self.hold(ip, frame, now);
            return;
        }
        self.emit(frame, v).await;
    }

    async fn emit(&mut self, frame: &mut [u8], v: Verdict) {
        match v {
            Verdict::ToTun => {
                if self.out.push(&frame[HDR_LEN..]) {
                    self.flush().await;
                }
            }
            Verdict::Encap(ep) => {
                // every packet the tun path sends has a complete checksum: the kernel's (no offload), or
                // completed on the read, or computed by the GSO split
                packet::write_header_flags(&mut frame[..HDR_LEN], packet::TYPE_DATA, packet::FLAG_CSUM_COMPLETE, 0);
                if let (true, SocketAddr::V4(ep4)) = (self.gso_ok, ep) {
                    let l = frame.len();
                    if self.enc_n > 0
                        && (self.enc_ep != Some(ep4)
                            || l > self.enc_seg
                            || self.enc_short
                            || self.enc_n >= BATCH
                            || self.enc.len() + l > UDP_GSO_MAX_PAYLOAD)
                    {
                        self.flush_enc().await;
                    }
                    if self.enc_n == 0 {
                        self.enc.clear();
                        self.enc_ep = Some(ep4);
                        self.enc_seg = l;
                        self.enc_short = false;
                    } else if l < self.enc_seg {
                        self.enc_short = true;
                    }
                    self.enc.extend_from_slice(frame);
                    self.enc_n += 1;
                    return;
                }
                self.counters.event(Event::TunnelSends);
                match self.udp.send_to(frame, ep).await {
                    Ok(b) => {
                        self.counters.event(Event::TunnelTx);
                        self.counters.add(Event::TunnelTxBytes, b as u64);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %ep, "sending to a worker");
                        self.counters.drop_packet(Reason::SendError);
                    }
                }
            }
            Verdict::Drop(_) | Verdict::Resolve(_) => {}
        }
    }

    /// Send the queued run of encapsulated datagrams (one UDP_SEGMENT sendmsg; one by one as a fallback).
    async fn flush_enc(&mut self) {
        if self.enc_n == 0 {
            return;
        }
        let (n, seg) = (self.enc_n, self.enc_seg);
        let Some(ep) = self.enc_ep else { return };
        self.enc_n = 0;
        let r = if n == 1 {
            self.udp.send_to(&self.enc, SocketAddr::V4(ep)).await
        } else {
            send_gso(&self.udp, &[&self.enc], seg, ep).await
        };
        match r {
            Ok(b) => {
                self.counters.event(Event::TunnelSends);
                self.counters.add(Event::TunnelTx, n as u64);
                self.counters.add(Event::TunnelTxBytes, b as u64);
            }
            Err(e) if n > 1 => {
                tracing::warn!(error = %e, "UDP segmentation offload refused; sending datagrams one by one from now on");
                self.gso_ok = false;
                let enc = std::mem::take(&mut self.enc);
                self.send_each(enc.chunks(seg), ep).await;
                self.enc = enc;
            }
            Err(e) => {
                tracing::debug!(error = %e, %ep, "sending to a worker");
                self.counters.drop_packet(Reason::SendError);
            }
        }
    }

    async fn flush(&mut self) {
        self.out.flush(&self.tun, &self.counters).await;
    }

    fn hold(&mut self, ip: Ipv4Addr, frame: &[u8], now: Instant) {
        if self.negative.get(&ip).is_some_and(|t| now.duration_since(*t) < NEGATIVE_TTL) {
            return;
        }
        if self.held.len() < HOLD_IPS || self.held.contains_key(&ip) {
            let q = self.held.entry(ip).or_default();
            if q.len() < HOLD_PER_IP {
                q.push(frame.to_vec());
            }
        }
        if let Some(control) = self.control.clone() {
            if self.resolving.insert(ip) {
                self.counters.event(Event::Resolves);
                let tx = self.res_tx.clone();
                tokio::spawn(async move {
                    let found = match tokio::time::timeout(Duration::from_secs(5), control.resolve_ip(ip)).await {
                        Ok(Ok(Some(s))) => !s.instances.is_empty(),
                        Ok(Ok(None)) => false,
                        Ok(Err(e)) => {
                            tracing::debug!(%ip, error = %format!("{e:#}"), "resolving a service IP");
                            false
                        }
                        Err(_) => false,
                    };
                    let _ = tx.send((ip, found)).await;
                });
            }
        }
    }

    async fn on_resolved(&mut self, ip: Ipv4Addr, found: bool) {
        self.resolving.remove(&ip);
        self.view.reload();
        let held = self.held.remove(&ip).unwrap_or_default();
        if !found || self.view.snap.service_by_ip(ip).is_none() {
            tracing::debug!(%ip, "service IP not resolvable");
            self.negative.insert(ip, Instant::now());
            return;
        }
        for mut frame in held {
            let v = lock(&self.engine).outbound(&mut frame[HDR_LEN..], &self.view.snap, Instant::now());
            if matches!(v, Verdict::ToTun | Verdict::Encap(_)) {
                self.counters.event(Event::HeldReplayed);
            }
            self.emit(&mut frame, v).await;
        }
        self.flush_enc().await;
        self.flush().await;
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let (changes, export) = {
            let mut e = lock(&self.engine);
            e.evict(now);
            let c = e.changes();
            (c, (self.flows_file.is_some() && c != self.saved).then(|| e.export()))
        };
        if let (Some(f), Some(export)) = (&self.flows_file, export) {
            let tmp = f.with_extension("tmp");
            match std::fs::write(&tmp, export).and_then(|()| std::fs::rename(&tmp, f)) {
                Ok(()) => self.saved = changes,
                Err(e) => tracing::warn!(file = %f.display(), "saving the conversion table: {e}"),
            }
        }
        self.negative.retain(|_, t| now.duration_since(*t) < NEGATIVE_TTL);
        // forget RTTs of workers that stopped answering
        lock(&self.engine).forget_silent(now, Duration::from_secs(10));
        self.view.refresh();
        let mut peers: BTreeSet<SocketAddr> = self.view.snap.routes.values().copied().collect();
        for s in self.view.snap.services.values() {
            peers.extend(s.instances.iter().map(|i| i.worker));
        }
        peers.remove(&self.public);
        let stamp = self.base.elapsed().as_nanos() as u64;
        for p in peers {
            self.seq = self.seq.wrapping_add(1);
            if self.udp.send_to(&packet::probe(packet::TYPE_PROBE_REQUEST, self.seq, stamp), p).await.is_ok() {
                self.counters.event(Event::ProbesSent);
            }
        }
        // publish the measured RTTs in the tables (InstanceEndpoint.rtt_us) and the counters
        let rtt = lock(&self.engine).rtt.clone();
        self.counters.set_rtts(rtt.iter().map(|(a, us)| (a.to_string(), *us)));
        let local = self.view.snap.local_subnet;
        let stale = self.view.snap.services.values().flat_map(|s| &s.instances).any(|i| {
            let want = if local.is_some_and(|n| n.contains(&i.ns_ip)) { Some(0) } else { rtt.get(&i.worker).copied() };
            i.rtt_us != want
        });
        if stale {
            self.view.tables.update(|s| {
                for svc in s.services.values_mut() {
                    for i in &mut svc.instances {
                        i.rtt_us = if local.is_some_and(|n| n.contains(&i.ns_ip)) {
                            Some(0)
                        } else {
                            rtt.get(&i.worker).copied()
                        };
                    }
                }
            });
        }
    }
}

/// The world-to-tun direction: tunnel datagrams (decapsulation, reverse translation, into the tun) and
/// probes (answered; replies give the RTTs).
struct Ingress {
    tun: Arc<tun_rs::AsyncDevice>,
    udp: Arc<UdpSocket>,
    engine: SharedEngine,
    view: View,
    counters: Arc<Counters>,
    base: Instant,
    out: TunOut,
    /// The tun takes virtio headers (offloads on): a run of segments can be written as one super-packet.
    vnet: bool,
    /// The instances' MTU: a larger inner TCP packet is a super-packet to be written as such (or cut).
    mtu: usize,
    /// Segment buffers for cutting super-packets when the tun takes no virtio headers (made on first use).
    split: Vec<Vec<u8>>,
}

impl Ingress {
    async fn run(mut self) {
        let udp = self.udp.clone();
        let fd = udp.as_raw_fd();
        let mut ubuf = vec![0u8; HDR_LEN + 65536];
        loop {
            // wait for the first datagram, then take what else is queued (at most BATCH reads) before the
            // coalesced write into the tun; a read is only made when its datagram will be handled
            let mut next = udp.async_io(Interest::READABLE, || udpio::recv_segments(fd, &mut ubuf)).await;
            for i in 0..BATCH {
                if i > 0 {
                    next = udp.try_io(Interest::READABLE, || udpio::recv_segments(fd, &mut ubuf));
                }
                match next {
                    Ok((n, from, gso)) => {
                        // a coalesced run (UDP GRO) holds datagrams of gso bytes, the last maybe shorter
                        // (or one uncut datagram larger than the segment size: an eBPF sender's super-packet)
                        let (seg, mss_hint) = match gso {
                            Some(g) if g < n && reassemble::whole_datagram(&ubuf[..n]) => (n, Some(g)),
                            Some(g) => (g.max(1), None),
                            None => (n.max(1), None),
                        };
                        self.counters.add(Event::TunnelRxBytes, n as u64);
                        let now = Instant::now();
                        if self.vnet && n > seg {
                            if let Some(run) = reassemble::check_run(&ubuf, n, seg) {
                                self.write_run(&mut ubuf, run, now).await;
                                continue;
                            }
                        }
                        let mut off = 0;
                        while off < n {
                            let end = (off + seg).min(n);
                            self.counters.event(Event::TunnelRx);
                            if end - off > HDR_LEN + self.mtu {
                                if let Some(run) = reassemble::super_packet(&ubuf[off..end], mss_hint, self.mtu) {
                                    self.write_super(&mut ubuf[off..end], run, now).await;
                                    off = end;
                                    continue;
                                }
                            }
                            self.on_udp(&mut ubuf[off..end], from, now).await;
                            off = end;
                        }
                    }
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::debug!(error = %e, "tunnel socket");
                        }
                        break;
                    }
                }
            }
            self.out.flush(&self.tun, &self.counters).await;
        }
    }

    /// A run of one flow's consecutive segments (see [`reassemble`]), written as one super-packet.
    async fn write_run(&mut self, ubuf: &mut [u8], run: reassemble::Run, now: Instant) {
        self.counters.add(Event::TunnelRx, run.count as u64);
        if self.write_gso(ubuf, run, now).await {
            self.counters.event(Event::RunsReassembled);
        }
    }

    /// One datagram carrying a TCP super-packet (see [`reassemble::super_packet`]): written as one GSO
    /// packet, or cut into MTU-sized segments when the tun takes no virtio headers.
    async fn write_super(&mut self, dgram: &mut [u8], run: reassemble::Run, now: Instant) {
        self.counters.event(Event::SuperPacketsReceived);
        if self.vnet {
            self.write_gso(dgram, run, now).await;
            return;
        }
        // no virtio headers: cut it here (tun-rs computes each segment's checksums), translate each
        let inner = run.inner(0);
        let hdr = reassemble::gso_header(&dgram[inner.clone()], &run);
        let need = run.payload.div_ceil(run.mss);
        while self.split.len() < need {
            self.split.push(vec![0u8; self.mtu + 64]);
        }
        let mut sizes = vec![0usize; need];
        self.view.refresh();
        let n = match tun_rs::gso_split(&mut dgram[inner], hdr, &mut self.split[..need], &mut sizes, 0, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "a super-packet from the tunnel could not be cut");
                self.counters.drop_packet(Reason::TunnelMalformedInner);
                return;
            }
        };
        let mut split = std::mem::take(&mut self.split);
        for (seg, len) in split.iter_mut().zip(&sizes[..n.min(need)]) {
            let v = lock(&self.engine).inbound_with(&mut seg[..*len], &self.view.snap, now, true);
            if v == Verdict::ToTun && self.out.push(&seg[..*len]) {
                self.out.flush(&self.tun, &self.counters).await;
            }
        }
        self.split = split;
    }

    /// Translates `run` once, on its first segment's headers (counted once per segment), and writes it into
    /// the tun as one GSO packet: virtio header and rebuilt IPv4/TCP header from a small buffer, payloads
    /// gathered from `buf` (no copy here, no checksum: the kernel completes it). True when written.
    async fn write_gso(&mut self, buf: &mut [u8], run: reassemble::Run, now: Instant) -> bool {
        self.view.refresh();
        let first = run.inner(0);
        let v = lock(&self.engine).inbound_run(&mut buf[first.clone()], &self.view.snap, now, run.count as u64);
        if v != Verdict::ToTun {
            return false; // counted by the engine, once per segment
        }
        // what is queued goes first, so the flow's order is kept
        self.out.flush(&self.tun, &self.counters).await;
        let mut hdr = [0u8; VHL + 60 + 60];
        let hl = reassemble::write_header(&buf[first], &run, &mut hdr);
        let mut iov = Vec::with_capacity(run.count + 1);
        iov.push(std::io::IoSlice::new(&hdr[..hl]));
        for i in 0..run.count {
            iov.push(std::io::IoSlice::new(&buf[run.payload_of(i)]));
        }
        match self.tun.send_vectored(&iov).await {
            Ok(_) => {
                self.counters.add(Event::TunTx, run.count as u64);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing a super-packet into the tun");
                self.counters.drop_packets(Reason::TunWriteError, run.count as u64);
                false
            }
        }
    }

    async fn on_udp(&mut self, dgram: &mut [u8], from: SocketAddr, now: Instant) {
        match packet::decode_tunnel(dgram) {
            Err(r) => self.counters.drop_packet(r),
            Ok(packet::Tunnel::ProbeRequest { id, stamp }) => {
                self.counters.event(Event::ProbeRequests);
                let _ = self.udp.send_to(&packet::probe(packet::TYPE_PROBE_REPLY, id, stamp), from).await;
            }
            Ok(packet::Tunnel::ProbeReply { stamp, .. }) => {
                self.counters.event(Event::ProbeReplies);
                let now_ns = self.base.elapsed().as_nanos() as u64;
                if stamp <= now_ns {
                    let rtt_us = ((now_ns - stamp) / 1000).max(1);
                    lock(&self.engine).record_rtt(from, rtt_us, Instant::now());
                    self.counters.set_rtt(from.to_string(), rtt_us);
                }
            }
            Ok(packet::Tunnel::Data(_)) => {
                self.view.refresh();
                let complete = dgram[3] & packet::FLAG_CSUM_COMPLETE != 0;
                let v = lock(&self.engine).inbound_with(&mut dgram[HDR_LEN..], &self.view.snap, now, complete);
                // inbound verdicts are ToTun or a (counted) drop
                if v == Verdict::ToTun && self.out.push(&dgram[HDR_LEN..]) {
                    self.out.flush(&self.tun, &self.counters).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_super_packets_fit_one_udp_send() {
        for mtu in [576u16, 1280, 1450, 1500, 8950] {
            let n = instance_gso_max_segs(mtu) as usize;
            let per_datagram = HDR_LEN + mtu as usize;
            assert!(n * per_datagram <= UDP_GSO_MAX_PAYLOAD, "mtu {mtu}: {n} segments");
            assert!(n == 1 || (n + 1) * per_datagram > UDP_GSO_MAX_PAYLOAD, "mtu {mtu}: {n} is the most");
        }
        assert_eq!(instance_gso_max_segs(1450), 44);
        assert_eq!(instance_gso_max_segs(u16::MAX), 1);
    }
}
