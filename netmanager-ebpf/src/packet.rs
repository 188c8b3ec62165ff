//! Reading and rewriting the packets the programs see: Ethernet + IPv4 + TCP/UDP headers, with addresses
//! and ports kept in network byte order as the maps hold them.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use netmanager_ebpf_common::FlowKey;

use crate::Exit;

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Parsed headers of an IPv4 packet behind an Ethernet header at `l3`.
#[derive(Clone, Copy)]
pub struct Pkt {
    pub l3: usize,
    pub l4: usize,
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

impl Pkt {
    /// The CT key of this packet's direction.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey { src: self.src, dst: self.dst, sport: self.sport, dport: self.dport, proto: self.proto, _pad: [0; 3] }
    }

    /// The CT key of the other direction, with `src` as the answering address.
    #[inline(always)]
    pub fn reply_key(&self, src: u32) -> FlowKey {
        FlowKey { src, dst: self.src, sport: self.dport, dport: self.sport, proto: self.proto, _pad: [0; 3] }
    }

    /// The first packet of a flow: a TCP SYN, or any UDP datagram.
    #[inline(always)]
    pub fn opens_flow(&self) -> bool {
        self.proto == PROTO_UDP || self.is_syn()
    }

    /// A TCP SYN without ACK (a TCP packet that is not one is mid-flow).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0 && self.tcp_flags & TCP_ACK == 0
    }
}

/// `b[i..i + 2]` as a u16 in memory order (network order kept, as the maps hold ports and addresses).
#[inline(always)]
pub fn ne16(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

#[inline(always)]
fn ne32(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Continues only for an Ethernet frame carrying IPv4.
#[inline(always)]
pub fn ipv4_frame(ctx: &TcContext) -> Result<(), Exit> {
    match ctx.load::<u16>(12) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => Ok(()),
        _ => Err(Exit::Ignore),
    }
}

/// Reads the IPv4 header and the transport ports with one `bpf_skb_load_bytes` each (a helper call per
/// field would be several calls a packet). None for what the fast path does not handle: not IPv4, a
/// non-first fragment, neither TCP nor UDP, too short.
#[inline(always)]
pub fn parse(ctx: &TcContext, l3: usize) -> Option<Pkt> {
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

#[inline(always)]
fn l4_csum_off(p: &Pkt) -> (usize, u64) {
    if p.proto == PROTO_TCP {
        (p.l4 + 16, 0)
    } else {
        (p.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// Which address of a packet [`rewrite_addr`] replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Addr {
    Src,
    Dst,
}

/// Rewrites the destination (or source) address, fixing the IPv4 and TCP/UDP checksums.
#[inline(always)]
pub fn rewrite_addr(ctx: &mut TcContext, p: &Pkt, new: u32, which: Addr) -> Result<(), i64> {
    let (off, old) = match which {
        Addr::Dst => (p.l3 + 16, p.dst),
        Addr::Src => (p.l3 + 12, p.src),
    };
    let (csum_off, extra) = l4_csum_off(p);
    ctx.l4_csum_replace(csum_off, old as u64, new as u64, (BPF_F_PSEUDO_HDR as u64) | extra | 4)?;
    ctx.l3_csum_replace(p.l3 + 10, old as u64, new as u64, 4)?;
    ctx.store(off, &new, 0)?;
    Ok(())
}

/// The IPv4 header checksum of `h` (its checksum field zero).
#[inline(always)]
pub fn ip_checksum(h: &[u8; 20]) -> u16 {
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
