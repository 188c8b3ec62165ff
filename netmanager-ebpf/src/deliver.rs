//! The last hop of both programs: a packet for an instance here goes straight into its namespace, one for
//! a remote worker's subnet is encapsulated and sent out of the uplink.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use aya_log_ebpf::error;
use netmanager_ebpf_common::{
    Config, Counter, Route, ENCAP_LEN, TUNNEL_HDR_LEN, TUNNEL_MAGIC, TUNNEL_TYPE_DATA, TUNNEL_VERSION,
};

use crate::packet::{ip_checksum, Pkt, ETH_LEN, PROTO_UDP};
use crate::{add, count, Exit, Verdict, LOCAL, ROUTES};

const AF_INET: u8 = 2;
/// BPF_F_ADJ_ROOM_ENCAP_L2(len): our 8-byte header sits between UDP and the inner IPv4 header, so GSO
/// repeats it for every segment.
const ENCAP_L2_TUNNEL_HDR: u64 = (TUNNEL_HDR_LEN as u64) << 56;

/// Hands a packet (Ethernet + IPv4, destination `dst`) to a local instance or the worker hosting it.
/// Destinations it knows no way to are left to the kernel (e.g. the gateway itself).
#[inline(always)]
pub fn deliver(ctx: &mut TcContext, cfg: &Config, p: &Pkt, dst: u32) -> Verdict {
    if dst & cfg.subnet_mask == cfg.subnet {
        let Some(ep) = (unsafe { LOCAL.get(&dst) }) else {
            return Ok(TC_ACT_OK as i32);
        };
        let (ifindex, mac) = (ep.ifindex, ep.mac);
        ctx.store(0, &mac, 0).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
        ctx.store(6, &cfg.gw_mac, 0).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
        let r = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
        count(Counter::LocalDeliver);
        add(Counter::FastBytes, ctx.len() as u64);
        return Ok(r);
    }
    match unsafe { ROUTES.get(&(dst & cfg.route_mask)) } {
        Some(r) => {
            let r = *r;
            encap(ctx, cfg, p, &r)
        }
        None => Ok(TC_ACT_OK as i32),
    }
}

/// Wraps the IPv4 packet in outer IPv4 + UDP + tunnel header to `r` and sends it out of the uplink.
#[inline(always)]
fn encap(ctx: &mut TcContext, cfg: &Config, p: &Pkt, r: &Route) -> Verdict {
    let inner_len = ctx.len() as usize - ETH_LEN;
    // FIXED_GSO: keep the segment size; instances have an MTU that leaves room for the 36 bytes
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_FIXED_GSO) as u64
        | ENCAP_L2_TUNNEL_HDR;
    if let Err(e) = ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags) {
        error!(ctx, "encapsulation: bpf_skb_adjust_room failed ({}), packet dropped", e);
        return Err(Exit::Drop(Counter::ErrAdjustRoom));
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
    ctx.store(ETH_LEN, &h, 0).map_err(|_| Exit::Drop(Counter::ErrAdjustRoom))?;
    count(Counter::Encap);
    add(Counter::FastBytes, ctx.len() as u64);
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
        count(Counter::RedirectFib);
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) as i32 });
    }
    count(Counter::RedirectNeigh);
    Ok(unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}
