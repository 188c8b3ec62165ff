//! NetManager fast path: TC programs doing in the kernel what the tun proxy does in userspace.
//!
//! * `oak_inst_ingress` (TC ingress of the host side of every instance's veth, i.e. packets the instance
//!   sends): service IP -> instance translation with per-flow state (round-robin per new flow, or the
//!   closest instance), reverse translation of replies, then delivery straight into a local instance
//!   (`bpf_redirect_peer`) or encapsulation to the hosting worker (`bpf_skb_adjust_room` + `bpf_redirect_neigh`
//!   out of the uplink).
//! * `oak_uplink_ingress` (TC ingress of the worker's uplink): decapsulation of tunnel datagrams, reverse
//!   translation of replies to flows this worker translated, delivery into the local instance.
//!
//! The tunnel format is the tun path's (netmanager/DESIGN.md): outer IPv4 + UDP to the tunnel port, an
//! 8-byte header (0x4F, version 1, type 0, flags 0, id 0), the raw inner IPv4 packet. Anything the fast
//! path does not know (unknown service IPs, mid-flow TCP it did not start, probes, fragments, IPv6)
//! passes on unchanged to the kernel and so to the tun path.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::{debug, error};
use netmanager_ebpf_common::{
    counter, Config, FlowKey, FlowVal, LocalEndpoint, Route, Service, CT_FORWARD, CT_PASSTHROUGH, CT_REVERSE,
    ENCAP_LEN, KIND_CLOSEST, KIND_TUN, MAX_BACKENDS, TUNNEL_HDR_LEN, TUNNEL_MAGIC, TUNNEL_TYPE_DATA, TUNNEL_VERSION,
};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const AF_INET: u8 = 2;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// BPF_F_ADJ_ROOM_ENCAP_L2(len): our 8-byte header sits between UDP and the inner IPv4 header, so GSO
/// repeats it for every segment.
const ENCAP_L2_TUNNEL_HDR: u64 = (TUNNEL_HDR_LEN as u64) << 56;

#[map]
static SERVICES: HashMap<u32, Service> = HashMap::with_max_entries(4096, 0);
/// Round-robin position per service IP.
#[map]
static RR: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);
#[map]
static CT: LruHashMap<FlowKey, FlowVal> = LruHashMap::with_max_entries(65536, 0);
#[map]
static LOCAL: HashMap<u32, LocalEndpoint> = HashMap::with_max_entries(1024, 0);
#[map]
static ROUTES: HashMap<u32, Route> = HashMap::with_max_entries(4096, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn add(slot: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *p += n };
    }
}

#[inline(always)]
fn count(slot: u32) {
    add(slot, 1);
}

/// Parsed headers of an IPv4 packet behind an Ethernet header at `l3`.
#[derive(Clone, Copy)]
struct Pkt {
    l3: usize,
    l4: usize,
    proto: u8,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

/// `b[i..i + 2]` as a u16 in memory order (network order kept, as the maps hold ports and addresses).
#[inline(always)]
fn ne16(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

#[inline(always)]
fn ne32(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Reads the IPv4 header and the transport ports with one `bpf_skb_load_bytes` each (a helper call per
/// field cost ~8 calls a packet).
#[inline(always)]
fn parse(ctx: &TcContext, l3: usize) -> Option<Pkt> {
    let h: [u8; 20] = ctx.load(l3).ok()?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return None; // non-first fragment: no ports
    }
    let (proto, src, dst) = (h[9], ne32(&h, 12), ne32(&h, 16));
    let l4 = l3 + (ihl & 0x3c);
    let (sport, dport, tcp_flags) = match proto {
        PROTO_TCP => {
            let t: [u8; 14] = ctx.load(l4).ok()?;
            (ne16(&t, 0), ne16(&t, 2), t[13])
        }
        PROTO_UDP => {
            let u: [u8; 4] = ctx.load(l4).ok()?;
            (ne16(&u, 0), ne16(&u, 2), 0u8)
        }
        _ => return None,
    };
    Some(Pkt { l3, l4, proto, src, dst, sport, dport, tcp_flags })
}

/// The first packet of a flow: a TCP SYN, or any UDP datagram.
#[inline(always)]
fn opens_flow(p: &Pkt) -> bool {
    p.proto == PROTO_UDP || (p.tcp_flags & TCP_SYN != 0 && p.tcp_flags & TCP_ACK == 0)
}

#[inline(always)]
fn l4_csum_off(p: &Pkt) -> (usize, u64) {
    if p.proto == PROTO_TCP {
        (p.l4 + 16, 0)
    } else {
        (p.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// Rewrites the destination (or source) address, fixing the IPv4 and TCP/UDP checksums.
#[inline(always)]
fn rewrite_addr(ctx: &mut TcContext, p: &Pkt, new: u32, dst: bool) -> Result<(), i64> {
    let (off, old) = if dst { (p.l3 + 16, p.dst) } else { (p.l3 + 12, p.src) };
    let (csum_off, extra) = l4_csum_off(p);
    ctx.l4_csum_replace(csum_off, old as u64, new as u64, (BPF_F_PSEUDO_HDR as u64) | extra | 4)?;
    ctx.l3_csum_replace(p.l3 + 10, old as u64, new as u64, 4)?;
    ctx.store(off, &new, 0)?;
    Ok(())
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    let c = CONFIG.get(0)?;
    (c.enabled == 1).then_some(c)
}

/// Picks the instance for a new flow to service IP `svc`.
#[inline(always)]
fn choose(svc_ip: u32, svc: &Service) -> Option<u32> {
    let n = svc.count as u32;
    if n == 0 || n > MAX_BACKENDS as u32 {
        return None;
    }
    let idx = if svc.kind == KIND_CLOSEST {
        svc.closest as u32
    } else {
        let pos = match RR.get_ptr_mut(&svc_ip) {
            Some(p) => unsafe {
                let v = *p;
                *p = v.wrapping_add(1);
                v
            },
            None => {
                let _ = RR.insert(&svc_ip, &1, 0);
                0
            }
        };
        pos % n
    };
    let idx = (idx as usize) & (MAX_BACKENDS - 1);
    let ip = svc.backends[idx];
    (ip != 0).then_some(ip)
}

/// Hands a packet (Ethernet + IPv4, destination `dst`) to a local instance or the worker hosting it.
#[inline(always)]
fn deliver(ctx: &mut TcContext, cfg: &Config, p: &Pkt, dst: u32) -> i32 {
    if dst & cfg.subnet_mask == cfg.subnet {
        return match unsafe { LOCAL.get(&dst) } {
            Some(ep) => {
                let (ifindex, mac) = (ep.ifindex, ep.mac);
                if ctx.store(0, &mac, 0).is_err() || ctx.store(6, &cfg.gw_mac, 0).is_err() {
                    count(counter::ERR_REDIRECT);
                    return TC_ACT_SHOT as i32;
                }
                let r = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
                count(counter::LOCAL_DELIVER);
                add(counter::FAST_BYTES, ctx.len() as u64);
                r
            }
            None => TC_ACT_OK as i32, // the bridge knows it (e.g. the gateway itself)
        };
    }
    match unsafe { ROUTES.get(&(dst & cfg.route_mask)) } {
        Some(r) => {
            let r = *r;
            encap(ctx, cfg, p, &r)
        }
        None => TC_ACT_OK as i32,
    }
}

#[inline(always)]
fn ip_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += ((h[i] as u32) << 8) | h[i + 1] as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Wraps the IPv4 packet in outer IPv4 + UDP + tunnel header to `r` and sends it out of the uplink.
#[inline(always)]
fn encap(ctx: &mut TcContext, cfg: &Config, p: &Pkt, r: &Route) -> i32 {
    let inner_len = ctx.len() as usize - ETH_LEN;
    // FIXED_GSO: keep the segment size; instances have an MTU that leaves room for the 36 bytes
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | ENCAP_L2_TUNNEL_HDR;
    if let Err(e) = ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags) {
        error!(ctx, "encapsulation: bpf_skb_adjust_room failed ({}), packet dropped", e);
        count(counter::ERR_ADJUST_ROOM);
        return TC_ACT_SHOT as i32;
    }
    let total = (inner_len + ENCAP_LEN) as u16;
    let mut h = [0u8; ENCAP_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[8] = 64;
    h[9] = PROTO_UDP;
    h[12..16].copy_from_slice(&cfg.public_ip.to_ne_bytes());
    h[16..20].copy_from_slice(&r.worker_ip.to_ne_bytes());
    let mut ip = [0u8; 20];
    ip.copy_from_slice(&h[..20]);
    let c = ip_checksum(&ip);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    // source port from the inner flow, so multipath underlays spread flows
    let entropy = (p.src ^ p.dst ^ ((p.sport as u32) << 16 | p.dport as u32)) as u16;
    h[20..22].copy_from_slice(&(0xc000u16 | (entropy & 0x3fff)).to_be_bytes());
    h[22..24].copy_from_slice(&r.port.to_ne_bytes());
    h[24..26].copy_from_slice(&(total - 20).to_be_bytes());
    h[28] = TUNNEL_MAGIC;
    h[29] = TUNNEL_VERSION;
    h[30] = TUNNEL_TYPE_DATA;
    if ctx.store(ETH_LEN, &h, 0).is_err() {
        count(counter::ERR_ADJUST_ROOM);
        return TC_ACT_SHOT as i32;
    }
    count(counter::ENCAP);
    add(counter::FAST_BYTES, ctx.len() as u64);
    // The next hop from the FIB and its resolved neighbour: MACs written here and a plain redirect, which
    // costs less than `bpf_redirect_neigh`'s route and neighbour output per packet. No resolved neighbour
    // (first packets, or an entry the kernel dropped): `bpf_redirect_neigh` resolves it. The NetManager's
    // own datagrams to the worker (probes every 2 s) keep the kernel revalidating the entry.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = cfg.uplink_ifindex;
    fib.__bindgen_anon_3.ipv4_src = cfg.public_ip;
    fib.__bindgen_anon_4.ipv4_dst = r.worker_ip;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && ctx.store(0, &fib.dmac, 0).is_ok() && ctx.store(6, &fib.smac, 0).is_ok()
    {
        count(counter::REDIRECT_FIB);
        return unsafe { bpf_redirect(fib.ifindex, 0) as i32 };
    }
    count(counter::REDIRECT_NEIGH);
    unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[classifier]
pub fn oak_inst_ingress(mut ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return TC_ACT_OK as i32 };
    match ctx.load::<u16>(12) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => {}
        _ => return TC_ACT_OK as i32,
    }
    let Some(p) = parse(&ctx, ETH_LEN) else {
        count(counter::PASS_OTHER);
        return TC_ACT_OK as i32;
    };
    let key = FlowKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto, _pad: [0; 3] };
    let mut dst = p.dst;
    if p.dst & cfg.service_mask == cfg.service_net {
        let backend = match unsafe { CT.get(&key) } {
            Some(v) if v.dir == CT_FORWARD => v.addr,
            _ => {
                let Some(svc) = (unsafe { SERVICES.get(&p.dst) }) else {
                    count(counter::PASS_UNKNOWN_SERVICE);
                    return TC_ACT_OK as i32; // the tun path resolves it
                };
                if svc.kind == KIND_TUN {
                    count(counter::PASS_TUN_SERVICE);
                    return TC_ACT_OK as i32;
                }
                if p.proto == PROTO_TCP && (p.tcp_flags & TCP_SYN == 0 || p.tcp_flags & TCP_ACK != 0) {
                    count(counter::PASS_TCP_MIDFLOW);
                    return TC_ACT_OK as i32; // a flow the tun path started
                }
                let Some(b) = choose(p.dst, svc) else {
                    count(counter::PASS_NO_BACKEND);
                    return TC_ACT_OK as i32;
                };
                let rev = FlowKey { src: b, dst: p.src, sport: p.dport, dport: p.sport, proto: p.proto, _pad: [0; 3] };
                let _ = CT.insert(&key, &FlowVal { addr: b, dir: CT_FORWARD, _pad: [0; 3] }, 0);
                let _ = CT.insert(&rev, &FlowVal { addr: p.dst, dir: CT_REVERSE, _pad: [0; 3] }, 0);
                count(counter::NEW_FLOW);
                debug!(&ctx, "new flow to service {:i}: instance {:i}", u32::from_be(p.dst), u32::from_be(b));
                b
            }
        };
        if rewrite_addr(&mut ctx, &p, backend, true).is_err() {
            count(counter::ERR_REDIRECT);
            return TC_ACT_SHOT as i32;
        }
        count(counter::FWD_NAT);
        dst = backend;
    } else if let Some(v) = unsafe { CT.get(&key) } {
        // a local instance answering a flow translated on this worker
        if v.dir == CT_REVERSE {
            let svc = v.addr;
            if rewrite_addr(&mut ctx, &p, svc, false).is_err() {
                count(counter::ERR_REDIRECT);
                return TC_ACT_SHOT as i32;
            }
            count(counter::REV_NAT);
        }
    } else if p.dst & cfg.subnet_mask != cfg.subnet && opens_flow(&p) {
        // a flow to a remote instance IP: its replies may be decapsulated here (every UDP datagram "opens"
        // its flow: a lookup first, so a stream does not rewrite its LRU entry per datagram)
        let rev = FlowKey { src: p.dst, dst: p.src, sport: p.dport, dport: p.sport, proto: p.proto, _pad: [0; 3] };
        if unsafe { CT.get(&rev) }.is_none() {
            let _ = CT.insert(&rev, &FlowVal { addr: 0, dir: CT_PASSTHROUGH, _pad: [0; 3] }, 0);
        }
    }
    deliver(&mut ctx, cfg, &p, dst)
}

#[classifier]
pub fn oak_uplink_ingress(mut ctx: TcContext) -> i32 {
    let Some(cfg) = config() else { return TC_ACT_OK as i32 };
    match ctx.load::<u16>(12) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => {}
        _ => return TC_ACT_OK as i32,
    }
    // outer: plain 20-byte IPv4 header + UDP to our tunnel port (one load for both)
    let Ok(outer) = ctx.load::<[u8; 24]>(ETH_LEN) else { return TC_ACT_OK as i32 };
    if outer[0] != 0x45 || outer[9] != PROTO_UDP || ne16(&outer, 22) != cfg.tunnel_port {
        return TC_ACT_OK as i32;
    }
    // A GSO packet is either one encapsulated super-packet (from a fast-path peer over a link that kept
    // it whole: decapsulate it like any other) or several datagrams glued by UDP GRO for the userspace
    // socket (leave those to the tun path): the inner header's length tells them apart.
    if unsafe { (*ctx.skb.skb).gso_segs } > 1 {
        let inner_len = ctx.load::<u16>(ETH_LEN + ENCAP_LEN + 2).map(u16::from_be).unwrap_or(0) as usize;
        if inner_len + ENCAP_LEN + ETH_LEN != ctx.len() as usize {
            count(counter::PASS_OTHER);
            return TC_ACT_OK as i32;
        }
    }
    let Ok([magic, version, ty]) = ctx.load::<[u8; 3]>(ETH_LEN + 28) else {
        count(counter::PASS_BAD_TUNNEL);
        return TC_ACT_OK as i32;
    };
    if magic != TUNNEL_MAGIC || version != TUNNEL_VERSION {
        count(counter::PASS_BAD_TUNNEL);
        return TC_ACT_OK as i32;
    }
    if ty != TUNNEL_TYPE_DATA {
        return TC_ACT_OK as i32; // probes: the NetManager answers them
    }
    let inner = ETH_LEN + ENCAP_LEN;
    let Some(p) = parse(&ctx, inner) else {
        // ICMP, fragments, malformed: the tun path handles (and counts) those
        count(counter::PASS_OTHER);
        return TC_ACT_OK as i32;
    };
    if p.dst & cfg.subnet_mask != cfg.subnet {
        count(counter::DROP_NOT_FOR_NODE);
        return TC_ACT_SHOT as i32;
    }
    // Only flows the fast path knows are taken here: replies to flows it translated (they get their
    // service IP back), flows it carries untranslated, and new flows to a local instance.
    // Anything else (e.g. replies to a flow the tun path translated) goes on to the tun path's socket.
    let key = FlowKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto, _pad: [0; 3] };
    let mut rev = None;
    match unsafe { CT.get(&key) } {
        Some(v) if v.dir == CT_REVERSE => rev = Some(v.addr),
        Some(v) if v.dir == CT_PASSTHROUGH => {}
        // (UDP has no handshake: a datagram without state is taken as the start of a flow; only the
        // replies to the first datagrams of a flow the tun path translated can be mistaken for that)
        _ if opens_flow(&p) => {
            let _ = CT.insert(&key, &FlowVal { addr: 0, dir: CT_PASSTHROUGH, _pad: [0; 3] }, 0);
        }
        _ => {
            count(counter::PASS_UNKNOWN_FLOW);
            return TC_ACT_OK as i32;
        }
    }
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64;
    if let Err(e) = ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, flags) {
        error!(&ctx, "decapsulation: bpf_skb_adjust_room failed ({}), packet dropped", e);
        count(counter::ERR_ADJUST_ROOM);
        return TC_ACT_SHOT as i32;
    }
    count(counter::DECAP);
    let p = Pkt { l3: ETH_LEN, l4: p.l4 - ENCAP_LEN, ..p };
    if let Some(svc) = rev {
        if rewrite_addr(&mut ctx, &p, svc, false).is_err() {
            count(counter::ERR_REDIRECT);
            return TC_ACT_SHOT as i32;
        }
        count(counter::REV_NAT);
    }
    deliver(&mut ctx, cfg, &p, p.dst)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
