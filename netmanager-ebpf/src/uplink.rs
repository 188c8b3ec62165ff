//! `oak_uplink_ingress`, attached at the TC ingress of the worker's uplink: decapsulation of tunnel
//! datagrams, reverse translation of replies to flows this worker translated, delivery into the local
//! instance.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO},
    programs::TcContext,
};
use aya_log_ebpf::error;
use netmanager_ebpf_common::{
    Config, Counter, FlowVal, CT_PASSTHROUGH, CT_REVERSE, ENCAP_LEN, TUNNEL_MAGIC, TUNNEL_TYPE_DATA, TUNNEL_VERSION,
};

use crate::deliver::deliver;
use crate::packet::{ipv4_frame, ne16, parse, rewrite_addr, Addr, Pkt, ETH_LEN, PROTO_UDP};
use crate::{config, count, Exit, Verdict, CT, ROUTES};

pub fn try_uplink_ingress(ctx: &mut TcContext) -> Verdict {
    let cfg = config()?;
    ipv4_frame(ctx)?;
    let from = tunnel_data(ctx, cfg)?;
    // ICMP, fragments, malformed: the tun path handles (and counts) those
    let p = parse(ctx, ETH_LEN + ENCAP_LEN).ok_or(Exit::Pass(Counter::PassOther))?;
    // only the worker whose subnet holds the inner source sends its packets; anything this cannot verify
    // goes on to the tun path, which drops and counts it by reason (or knows the sender: a route this
    // map leaves out)
    match unsafe { ROUTES.get(&(p.src & cfg.route_mask)) } {
        Some(r) if r.worker_ip == from || r.src_ip == from => {}
        _ => return Err(Exit::Pass(Counter::PassUnverifiedPeer)),
    }
    if p.dst & cfg.subnet_mask != cfg.subnet {
        return Err(Exit::Drop(Counter::DropNotForNode));
    }
    let rev = known_flow(&p)?;
    let flags = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64;
    if let Err(e) = ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, flags) {
        error!(ctx, "decapsulation: bpf_skb_adjust_room failed ({}), packet dropped", e);
        return Err(Exit::Drop(Counter::ErrAdjustRoom));
    }
    count(Counter::Decap);
    let p = Pkt { l3: ETH_LEN, l4: p.l4 - ENCAP_LEN, ..p };
    if let Some(svc) = rev {
        rewrite_addr(ctx, &p, svc, Addr::Src).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
        count(Counter::RevNat);
    }
    deliver(ctx, cfg, &p, p.dst)
}

/// Continues only for a tunnel data datagram to this worker's tunnel port that the fast path may take
/// whole (its inner packet follows at `ETH_LEN + ENCAP_LEN`); gives its outer source address.
#[inline(always)]
fn tunnel_data(ctx: &TcContext, cfg: &Config) -> Result<u32, Exit> {
    // outer: plain 20-byte IPv4 header + UDP to our tunnel port (one load for both)
    let outer = ctx.load::<[u8; 24]>(ETH_LEN).map_err(|_| Exit::Ignore)?;
    if outer[0] != 0x45 || outer[9] != PROTO_UDP || ne16(&outer, 22) != cfg.tunnel_port {
        return Err(Exit::Ignore);
    }
    // A GSO packet is either one encapsulated super-packet (from a fast-path peer over a link that kept
    // it whole: decapsulate it like any other) or several datagrams glued by UDP GRO for the userspace
    // socket (leave those to the tun path): the inner header's length tells them apart.
    if unsafe { (*ctx.skb.skb).gso_segs } > 1 {
        let inner_len = ctx.load::<u16>(ETH_LEN + ENCAP_LEN + 2).map(u16::from_be).unwrap_or(0) as usize;
        if inner_len + ENCAP_LEN + ETH_LEN != ctx.len() as usize {
            return Err(Exit::Pass(Counter::PassOther));
        }
    }
    let [magic, version, ty] = ctx.load::<[u8; 3]>(ETH_LEN + 28).map_err(|_| Exit::Pass(Counter::PassBadTunnel))?;
    if magic != TUNNEL_MAGIC || version != TUNNEL_VERSION {
        return Err(Exit::Pass(Counter::PassBadTunnel));
    }
    if ty != TUNNEL_TYPE_DATA {
        return Err(Exit::Ignore); // probes: the NetManager answers them
    }
    Ok(u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]))
}

/// Only flows the fast path knows are taken here: replies to flows it translated (they get their service
/// IP back: returned), flows it carries untranslated, and new flows to a local instance. Anything else
/// (e.g. replies to a flow the tun path translated) goes on to the tun path's socket.
#[inline(always)]
fn known_flow(p: &Pkt) -> Result<Option<u32>, Exit> {
    let key = p.key();
    match unsafe { CT.get(&key) } {
        Some(v) if v.dir == CT_REVERSE => Ok(Some(v.addr)),
        Some(v) if v.dir == CT_PASSTHROUGH => Ok(None),
        // (UDP has no handshake: a datagram without state is taken as the start of a flow; only the
        // replies to the first datagrams of a flow the tun path translated can be mistaken for that)
        _ if p.opens_flow() => {
            let _ = CT.insert(&key, &FlowVal::new(0, CT_PASSTHROUGH), 0);
            Ok(None)
        }
        _ => Err(Exit::Pass(Counter::PassUnknownFlow)),
    }
}
