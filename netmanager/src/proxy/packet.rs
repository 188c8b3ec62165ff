//! Wire format of the worker tunnel (see DESIGN.md) and IPv4/TCP/UDP/ICMP parsing and in-place rewriting
//! with incremental checksum updates (RFC 1624).

use std::net::Ipv4Addr;

use super::counters::Reason;

// The format's constants come from the crate the eBPF programs share, so both paths speak one format.
/// First byte of every tunnel datagram (0x4F, 'O').
pub const MAGIC: u8 = netmanager_ebpf_common::TUNNEL_MAGIC;
/// Header version.
pub const VERSION: u8 = netmanager_ebpf_common::TUNNEL_VERSION;
/// Fixed header length.
pub const HDR_LEN: usize = netmanager_ebpf_common::TUNNEL_HDR_LEN;
/// Probe datagrams: header + 8-byte timestamp.
pub const PROBE_LEN: usize = HDR_LEN + 8;
/// A probe reply that carries the replying worker's Vivaldi coordinate (four big-endian f64: position,
/// height, error) after the stamp. Plain [`PROBE_LEN`] replies (without it) are accepted too.
pub const PROBE_COORD_LEN: usize = PROBE_LEN + 32;

pub const TYPE_DATA: u8 = netmanager_ebpf_common::TUNNEL_TYPE_DATA;
pub const TYPE_PROBE_REQUEST: u8 = 1;
pub const TYPE_PROBE_REPLY: u8 = 2;

/// Data flag: the inner packet's TCP/UDP checksum is complete (the tun path computes it when it splits a
/// GSO super-packet); the receiver need not complete it. Fast-path senders leave it clear: their packets
/// may carry only the pseudo-header part (checksum offload).
pub const FLAG_CSUM_COMPLETE: u8 = 0x01;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Write the 8-byte tunnel header: magic, version, type, flags (0), id (big endian; 0 for data).
pub fn write_header(buf: &mut [u8], msg_type: u8, id: u32) {
    write_header_flags(buf, msg_type, 0, id);
}

/// [`write_header`] with flags (`FLAG_*`).
pub fn write_header_flags(buf: &mut [u8], msg_type: u8, flags: u8, id: u32) {
    buf[0] = MAGIC;
    buf[1] = VERSION;
    buf[2] = msg_type;
    buf[3] = flags;
    buf[4..8].copy_from_slice(&id.to_be_bytes());
}

/// A validated tunnel datagram.
#[derive(Debug, PartialEq)]
pub enum Tunnel<'a> {
    /// The inner IPv4 packet (not validated yet).
    Data(&'a [u8]),
    ProbeRequest {
        id: u32,
        stamp: u64,
    },
    ProbeReply {
        id: u32,
        stamp: u64,
        /// The replying worker's coordinate, when it sent one.
        coord: Option<[f64; 4]>,
    },
}

/// Validate the outer header of a datagram received on the tunnel port.
pub fn decode_tunnel(buf: &[u8]) -> Result<Tunnel<'_>, Reason> {
    if buf.len() < HDR_LEN {
        return Err(Reason::TunnelShort);
    }
    if buf[0] != MAGIC {
        return Err(Reason::TunnelBadMagic);
    }
    if buf[1] != VERSION {
        return Err(Reason::TunnelBadVersion);
    }
    let id = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match buf[2] {
        TYPE_DATA => {
            if buf.len() == HDR_LEN {
                return Err(Reason::TunnelMalformedInner);
            }
            Ok(Tunnel::Data(&buf[HDR_LEN..]))
        }
        t @ (TYPE_PROBE_REQUEST | TYPE_PROBE_REPLY) => {
            let with_coord = t == TYPE_PROBE_REPLY && buf.len() == PROBE_COORD_LEN;
            if buf.len() != PROBE_LEN && !with_coord {
                return Err(Reason::TunnelBadProbe);
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&buf[HDR_LEN..PROBE_LEN]);
            let stamp = u64::from_be_bytes(s);
            Ok(if t == TYPE_PROBE_REQUEST {
                Tunnel::ProbeRequest { id, stamp }
            } else {
                let coord = with_coord.then(|| {
                    let mut c = [0f64; 4];
                    for (k, v) in c.iter_mut().enumerate() {
                        let at = PROBE_LEN + 8 * k;
                        *v = f64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
                    }
                    c
                });
                Tunnel::ProbeReply { id, stamp, coord }
            })
        }
        _ => Err(Reason::TunnelBadType),
    }
}

/// Build a probe reply carrying the replying worker's coordinate (see [`PROBE_COORD_LEN`]).
pub fn probe_reply(id: u32, stamp: u64, coord: [f64; 4]) -> [u8; PROBE_COORD_LEN] {
    let mut b = [0u8; PROBE_COORD_LEN];
    b[..PROBE_LEN].copy_from_slice(&probe(TYPE_PROBE_REPLY, id, stamp));
    for (k, v) in coord.iter().enumerate() {
        b[PROBE_LEN + 8 * k..PROBE_LEN + 8 * k + 8].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// Build a probe datagram.
pub fn probe(msg_type: u8, id: u32, stamp: u64) -> [u8; PROBE_LEN] {
    let mut b = [0u8; PROBE_LEN];
    write_header(&mut b, msg_type, id);
    b[HDR_LEN..].copy_from_slice(&stamp.to_be_bytes());
    b
}

/// Transport part of a parsed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4 {
    /// Source port (ICMP echo: the identifier).
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier).
    pub dport: u16,
    /// Offset of the transport checksum in the packet; None for UDP without checksum.
    pub csum: Option<usize>,
    /// Whether the addresses are part of the transport checksum (TCP/UDP pseudo header; not ICMP).
    pub pseudo: bool,
    /// ICMP echo: sport and dport are the same field.
    pub icmp: bool,
}

/// A parsed IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub ihl: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Non-first fragment: no transport header.
    pub later_fragment: bool,
    /// TCP, UDP and ICMP echo request/reply with a complete header; None otherwise.
    pub l4: Option<L4>,
}

/// Parse and validate an IPv4 packet (etherparse checks the header; the transport header is checked for
/// length). `bad` is the reason to report for malformed input.
pub fn parse(pkt: &[u8], bad: Reason) -> Result<Parsed, Reason> {
    if pkt.is_empty() {
        return Err(bad);
    }
    if pkt[0] >> 4 != 4 {
        return Err(if pkt[0] >> 4 == 6 && bad == Reason::TunMalformed { Reason::NotIpv4 } else { bad });
    }
    let h = etherparse::Ipv4HeaderSlice::from_slice(pkt).map_err(|_| bad)?;
    let ihl = h.slice().len();
    let total = h.total_len() as usize;
    if total < ihl || total != pkt.len() {
        return Err(bad);
    }
    let later_fragment = h.fragments_offset().value() != 0;
    let proto = h.protocol().0;
    let l4bytes = &pkt[ihl..];
    let l4 = if later_fragment {
        None
    } else {
        match proto {
            PROTO_TCP => {
                let t = etherparse::TcpHeaderSlice::from_slice(l4bytes).map_err(|_| bad)?;
                Some(L4 {
                    sport: t.source_port(),
                    dport: t.destination_port(),
                    csum: Some(ihl + 16),
                    pseudo: true,
                    icmp: false,
                })
            }
            PROTO_UDP => {
                let u = etherparse::UdpHeaderSlice::from_slice(l4bytes).map_err(|_| bad)?;
                let csum = if u.checksum() == 0 { None } else { Some(ihl + 6) };
                Some(L4 { sport: u.source_port(), dport: u.destination_port(), csum, pseudo: true, icmp: false })
            }
            PROTO_ICMP => {
                if l4bytes.len() < 8 {
                    return Err(bad);
                }
                // echo reply (0) / echo request (8)
                if (l4bytes[0] == 0 || l4bytes[0] == 8) && l4bytes[1] == 0 {
                    let id = u16::from_be_bytes([l4bytes[4], l4bytes[5]]);
                    Some(L4 { sport: id, dport: id, csum: Some(ihl + 2), pseudo: false, icmp: true })
                } else {
                    None
                }
            }
            _ => None,
        }
    };
    Ok(Parsed { ihl, proto, src: Ipv4Addr::from(h.source()), dst: Ipv4Addr::from(h.destination()), later_fragment, l4 })
}

/// One's complement incremental update of `csum` for a 16-bit word changing from `old` to `new` (RFC 1624 eq. 3).
pub fn csum_update(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!csum as u32) + ((!old) as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

pub(crate) fn get16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

fn put16(p: &mut [u8], off: usize, v: u16) {
    p[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Completes the TCP/UDP checksum of a packet that arrived with only its pseudo-header part filled in:
/// a fast-path peer encapsulates checksum-offloaded packets, and a link that keeps offload state (veth, a
/// virtio NIC between VMs on one host) delivers them that way. Returns true when the field was wrong and
/// is now right. UDP without checksum (0) is left alone.
pub fn complete_transport_checksum(pkt: &mut [u8], p: &Parsed) -> bool {
    let Some(l4) = p.l4 else { return false };
    let Some(off) = l4.csum else { return false };
    if !l4.pseudo || p.later_fragment || p.ihl > pkt.len() || off + 2 > pkt.len() {
        return false;
    }
    let seg_len = pkt.len() - p.ihl;
    let Ok(len16) = u16::try_from(seg_len) else {
        return false;
    };
    let old = get16(pkt, off);
    put16(pkt, off, 0);
    let (s, d) = (p.src.octets(), p.dst.octets());
    let pseudo: u64 = [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(p.proto),
        len16,
    ]
    .iter()
    .map(|w| u64::from(*w))
    .sum();
    // tun-rs' one's-complement sum (AVX2/SSE4.1 when the CPU has them): this runs for every datagram
    // from a fast-path peer, so the scalar loop it replaces cost ~10 % of the proxy's CPU
    let mut c = !tun_rs::checksum(&pkt[p.ihl..], pseudo);
    if c == 0 && p.proto == PROTO_UDP {
        c = 0xffff;
    }
    put16(pkt, off, c);
    old != c
}

/// Completes a checksum-offloaded (CHECKSUM_PARTIAL) packet read from the tun: the field at
/// `start + offset` holds the pseudo-header sum, the sum over `start..` goes in. False when the offsets
/// are outside the packet.
pub fn complete_partial(pkt: &mut [u8], start: u16, offset: u16) -> bool {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if start >= pkt.len() || at + 2 > pkt.len() {
        return false;
    }
    let initial = get16(pkt, at);
    put16(pkt, at, 0);
    let c = !tun_rs::checksum(&pkt[start..], u64::from(initial));
    put16(pkt, at, c);
    true
}

/// Recompute the IPv4 header checksum.
pub fn fix_ip_checksum(pkt: &mut [u8], ihl: usize) {
    put16(pkt, 10, 0);
    let mut sum = 0u32;
    for i in (0..ihl).step_by(2) {
        sum += get16(pkt, i) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    put16(pkt, 10, !(sum as u16));
}

/// Rewrite source and/or destination (address, port) of a parsed packet in place, keeping every checksum
/// right. Ports are ignored for packets without a transport header.
pub fn rewrite(pkt: &mut [u8], p: &Parsed, src: Option<(Ipv4Addr, u16)>, dst: Option<(Ipv4Addr, u16)>) {
    let mut l4_delta = [(0u16, 0u16); 6];
    let mut nd = 0usize;
    let mut push = |d: (u16, u16)| {
        l4_delta[nd] = d;
        nd += 1;
    };
    let l4 = p.l4;
    for (addr_off, new, is_src) in [(12usize, src, true), (16usize, dst, false)] {
        let Some((ip, port)) = new else { continue };
        let o = ip.octets();
        for k in 0..2 {
            let old = get16(pkt, addr_off + 2 * k);
            let nw = u16::from_be_bytes([o[2 * k], o[2 * k + 1]]);
            if l4.is_some_and(|l| l.pseudo) {
                push((old, nw));
            }
            put16(pkt, addr_off + 2 * k, nw);
        }
        if let Some(l) = l4 {
            // ICMP echo: the identifier is one field, only ever rewritten through the source side
            if l.icmp && !is_src {
                continue;
            }
            let off = if l.icmp {
                p.ihl + 4
            } else if is_src {
                p.ihl
            } else {
                p.ihl + 2
            };
            let old = get16(pkt, off);
            if old != port {
                push((old, port));
                put16(pkt, off, port);
            }
        }
    }
    fix_ip_checksum(pkt, p.ihl);
    if let Some(off) = l4.and_then(|l| l.csum) {
        let mut c = get16(pkt, off);
        for &(old, new) in &l4_delta[..nd] {
            c = csum_update(c, old, new);
        }
        if p.proto == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        put16(pkt, off, c);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sp, dp);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, 1234, 4000).syn();
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    /// Checksums of the packet are what a fresh computation gives.
    pub(crate) fn checksums_ok(pkt: &[u8]) -> bool {
        let s = SlicedPacket::from_ip(pkt).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            return false;
        };
        let h = ip.header().to_header();
        if h.calc_header_checksum() != h.header_checksum {
            return false;
        }
        match s.transport {
            Some(TransportSlice::Udp(u)) => {
                u.checksum() == 0 || u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap() == u.checksum()
            }
            Some(TransportSlice::Tcp(t)) => t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap() == t.checksum(),
            Some(TransportSlice::Icmpv4(i)) => i.header().icmp_type.calc_checksum(i.payload()) == i.checksum(),
            _ => true,
        }
    }

    #[test]
    fn rewrite_keeps_checksums() {
        for mut pkt in [
            udp([10, 18, 0, 2], [10, 30, 0, 5], 40000, 53, b"hello"),
            tcp([10, 18, 0, 2], [10, 30, 0, 5], 40000, 80, b"x"),
        ] {
            let p = parse(&pkt, Reason::TunMalformed).unwrap();
            assert_eq!(p.dst, Ipv4Addr::new(10, 30, 0, 5));
            rewrite(
                &mut pkt,
                &p,
                Some((Ipv4Addr::new(10, 30, 0, 5), 41000)),
                Some((Ipv4Addr::new(10, 18, 0, 70), 8080)),
            );
            let q = parse(&pkt, Reason::TunMalformed).unwrap();
            assert_eq!((q.src, q.dst), (Ipv4Addr::new(10, 30, 0, 5), Ipv4Addr::new(10, 18, 0, 70)));
            assert_eq!(q.l4.map(|l| (l.sport, l.dport)), Some((41000, 8080)));
            assert!(checksums_ok(&pkt));
        }
        let mut v = Vec::new();
        PacketBuilder::ipv4([10, 18, 0, 2], [10, 30, 0, 5], 64)
            .icmpv4_echo_request(77, 1)
            .write(&mut v, b"ping")
            .unwrap();
        let p = parse(&v, Reason::TunMalformed).unwrap();
        assert_eq!(p.l4.unwrap().sport, 77);
        rewrite(&mut v, &p, Some((Ipv4Addr::new(10, 30, 0, 5), 99)), Some((Ipv4Addr::new(10, 18, 0, 70), 99)));
        assert!(checksums_ok(&v));
        assert_eq!(parse(&v, Reason::TunMalformed).unwrap().l4.unwrap().sport, 99);
    }

    #[test]
    fn partial_checksums_are_completed() {
        for mut pkt in [
            udp([10, 18, 0, 2], [10, 18, 0, 66], 40000, 53, b"hello world"),
            tcp([10, 18, 0, 2], [10, 18, 0, 66], 40000, 80, b"odd-length payload"),
        ] {
            assert!(checksums_ok(&pkt));
            let p = parse(&pkt, Reason::TunnelMalformedInner).unwrap();
            let off = p.l4.unwrap().csum.unwrap();
            assert!(!complete_transport_checksum(&mut pkt, &p), "a right checksum is left alone");
            // what an offloading sender leaves in the field: some partial value
            put16(&mut pkt, off, 0x1234);
            assert!(!checksums_ok(&pkt));
            assert!(complete_transport_checksum(&mut pkt, &p));
            assert!(checksums_ok(&pkt));
        }
    }

    #[test]
    fn tunnel_header() {
        assert_eq!(decode_tunnel(&[1, 2]), Err(Reason::TunnelShort));
        assert_eq!(decode_tunnel(&[0; 12]), Err(Reason::TunnelBadMagic));
        assert_eq!(decode_tunnel(&[MAGIC, 9, 0, 0, 0, 0, 0, 0, 1]), Err(Reason::TunnelBadVersion));
        assert_eq!(decode_tunnel(&[MAGIC, 1, 7, 0, 0, 0, 0, 0, 1]), Err(Reason::TunnelBadType));
        assert_eq!(decode_tunnel(&[MAGIC, 1, 1, 0, 0, 0, 0, 0, 1]), Err(Reason::TunnelBadProbe));
        let p = probe(TYPE_PROBE_REQUEST, 5, 123456789);
        assert_eq!(decode_tunnel(&p), Ok(Tunnel::ProbeRequest { id: 5, stamp: 123456789 }));
        // a reply with the replier's coordinate, and one without (an older NetManager)
        let r = probe_reply(6, 42, [1.5, -2.0, 30.0, 0.25]);
        assert_eq!(
            decode_tunnel(&r),
            Ok(Tunnel::ProbeReply { id: 6, stamp: 42, coord: Some([1.5, -2.0, 30.0, 0.25]) })
        );
        let plain = probe(TYPE_PROBE_REPLY, 7, 43);
        assert_eq!(decode_tunnel(&plain), Ok(Tunnel::ProbeReply { id: 7, stamp: 43, coord: None }));
        // a request is never that long, and a reply of another length is refused
        let mut long_req = r;
        long_req[2] = TYPE_PROBE_REQUEST;
        assert_eq!(decode_tunnel(&long_req), Err(Reason::TunnelBadProbe));
        assert_eq!(decode_tunnel(&r[..PROBE_LEN + 8]), Err(Reason::TunnelBadProbe));
        let mut d = vec![0u8; HDR_LEN];
        write_header(&mut d, TYPE_DATA, 0);
        d.extend_from_slice(&[0x45, 0]);
        assert_eq!(decode_tunnel(&d), Ok(Tunnel::Data(&[0x45, 0][..])));
        write_header_flags(&mut d, TYPE_DATA, FLAG_CSUM_COMPLETE, 0);
        assert_eq!(d[3], FLAG_CSUM_COMPLETE);
        assert_eq!(decode_tunnel(&d), Ok(Tunnel::Data(&[0x45, 0][..])));
    }

    /// A checksum-offloaded packet from the tun (field = folded pseudo-header sum) is completed.
    #[test]
    fn offloaded_tun_packet_is_completed() {
        for mut pkt in [
            udp([10, 18, 0, 2], [10, 30, 0, 5], 40000, 53, b"hello world"),
            tcp([10, 18, 0, 2], [10, 30, 0, 5], 40000, 80, b"odd-length payload"),
        ] {
            let p = parse(&pkt, Reason::TunMalformed).unwrap();
            let off = p.l4.unwrap().csum.unwrap();
            let len = (pkt.len() - p.ihl) as u64;
            let words = [get16(&pkt, 12), get16(&pkt, 14), get16(&pkt, 16), get16(&pkt, 18)];
            let mut sum: u64 = words.iter().map(|w| u64::from(*w)).sum::<u64>() + u64::from(p.proto) + len;
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            put16(&mut pkt, off, sum as u16);
            assert!(!checksums_ok(&pkt));
            assert!(complete_partial(&mut pkt, p.ihl as u16, (off - p.ihl) as u16));
            assert!(checksums_ok(&pkt));
            assert!(!complete_partial(&mut pkt, 2000, 16), "offsets outside the packet are refused");
        }
    }

    #[test]
    fn malformed_ip() {
        assert_eq!(parse(&[], Reason::TunMalformed), Err(Reason::TunMalformed));
        assert_eq!(parse(&[0x60, 0, 0, 0], Reason::TunMalformed), Err(Reason::NotIpv4));
        let mut pkt = udp([10, 18, 0, 2], [10, 30, 0, 5], 1, 2, b"abc");
        pkt.pop();
        assert_eq!(parse(&pkt, Reason::TunnelMalformedInner), Err(Reason::TunnelMalformedInner));
    }
}
