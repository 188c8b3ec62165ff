//! `oak_inst_ingress`, attached at the TC ingress of the host side of every instance's veth (what the
//! instance sends): service IP -> instance translation per flow, reverse translation of a local
//! instance's replies, then delivery.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use netmanager_ebpf_common::{
    Counter, FlowVal, Service, CT_FORWARD, CT_HAIRPIN, CT_PASSTHROUGH, CT_REVERSE, KIND_CLOSEST, KIND_TUN, MAX_BACKENDS,
};

use crate::deliver::deliver;
use crate::packet::{ipv4_frame, parse, rewrite_addr, Addr, Pkt, ETH_LEN, PROTO_TCP};
use crate::{config, count, Exit, Verdict, CT, RR, SERVICES};

pub fn try_inst_ingress(ctx: &mut TcContext) -> Verdict {
    let cfg = config()?;
    ipv4_frame(ctx)?;
    let p = parse(ctx, ETH_LEN).ok_or(Exit::Pass(Counter::PassOther))?;
    let key = p.key();
    let mut dst = p.dst;
    if p.dst & cfg.service_mask == cfg.service_net {
        let backend = match unsafe { CT.get(&key) } {
            Some(v) if v.dir == CT_FORWARD || v.dir == CT_HAIRPIN => v.addr,
            _ => new_flow(ctx, &p)?,
        };
        rewrite_addr(ctx, &p, backend, Addr::Dst).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
        if backend == p.src {
            // to itself: from the service IP, so it is taken in and answered through here
            rewrite_addr(ctx, &p, p.dst, Addr::Src).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
            count(Counter::Hairpin);
        } else {
            count(Counter::FwdNat);
        }
        dst = backend;
    } else if let Some(v) = unsafe { CT.get(&key) } {
        // a local instance answering a flow translated on this worker
        if v.dir == CT_REVERSE {
            let svc = v.addr;
            rewrite_addr(ctx, &p, svc, Addr::Src).map_err(|_| Exit::Drop(Counter::ErrRedirect))?;
            count(Counter::RevNat);
        }
    } else if p.dst & cfg.subnet_mask != cfg.subnet && p.opens_flow() {
        // a flow to a remote instance IP: its replies may be decapsulated here (every UDP datagram "opens"
        // its flow: a lookup first, so a stream does not rewrite its LRU entry per datagram)
        let rev = p.reply_key(p.dst);
        if unsafe { CT.get(&rev) }.is_none() {
            let _ = CT.insert(&rev, &FlowVal::new(0, CT_PASSTHROUGH), 0);
        }
    }
    deliver(ctx, cfg, &p, dst)
}

/// A packet to service IP `p.dst` without a conversion: picks its instance and records both directions.
/// What the fast path leaves to the tun path passes on, counted by reason.
#[inline(always)]
fn new_flow(ctx: &TcContext, p: &Pkt) -> Result<u32, Exit> {
    // an unknown service IP: the tun path resolves it
    let svc = unsafe { SERVICES.get(&p.dst) }.ok_or(Exit::Pass(Counter::PassUnknownService))?;
    if svc.kind == KIND_TUN {
        return Err(Exit::Pass(Counter::PassTunService));
    }
    if p.proto == PROTO_TCP && !p.is_syn() {
        return Err(Exit::Pass(Counter::PassTcpMidflow)); // a flow the tun path started
    }
    let b = choose(p.dst, svc).ok_or(Exit::Pass(Counter::PassNoBackend))?;
    if b == p.src {
        // both directions leave the instance towards the service IP and get the same translation
        let mut reply = p.reply_key(b);
        reply.dst = p.dst;
        let _ = CT.insert(&p.key(), &FlowVal::new(b, CT_HAIRPIN), 0);
        let _ = CT.insert(&reply, &FlowVal::new(b, CT_HAIRPIN), 0);
    } else {
        let _ = CT.insert(&p.key(), &FlowVal::new(b, CT_FORWARD), 0);
        let _ = CT.insert(&p.reply_key(b), &FlowVal::new(p.dst, CT_REVERSE), 0);
    }
    count(Counter::NewFlow);
    debug!(ctx, "new flow to service {:i}: instance {:i}", u32::from_be(p.dst), u32::from_be(b));
    Ok(b)
}

/// Picks the instance for a new flow to service IP `svc_ip`, by the rule of the NetManager's
/// `select` module: the next backend in round-robin order, or the one userspace found closest.
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
