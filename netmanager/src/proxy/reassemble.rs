//! Runs of segments on the tun path, without copying payloads: [`split_tcp`] cuts a TCP super-packet
//! read from the tun into per-segment headers (the payloads stay where they are and are gathered by the
//! send), and [`check_run`] / [`write_header`] turn a coalesced run of tunnel datagrams back into one TCP
//! super-packet on the receiving side.
//!
//! A tun-path sender cuts each TCP super-packet it reads from its tun into segments and sends them with
//! one UDP_SEGMENT `sendmsg`; the receiving socket (UDP_GRO) hands the run back in one read: `seg`-byte
//! datagrams, each a tunnel header + an inner IPv4/TCP segment, the last maybe shorter. When the run is
//! exactly what such a split produces — one flow, consecutive sequence numbers, equal headers, only the
//! last segment carrying PSH/FIN — the super-packet is rebuilt as a gather write: a virtio header
//! (GSO TCPv4, checksum left to the kernel) and the first segment's headers from a small buffer, then
//! every segment's payload straight from the receive buffer. Anything else (one datagram, probes, other
//! protocols, IP options, SYN/RST/URG/CWR, gaps) returns `None` and takes the general path, which
//! translates and coalesces packet by packet.

use super::packet::{fix_ip_checksum, get16, HDR_LEN, MAGIC, PROTO_TCP, TYPE_DATA, VERSION};

const IP_HDR: usize = 20;
/// Longest run written as one super-packet (well under the kernel's 1,024 iovecs per write).
const MAX_RUN: usize = 512;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// A run of tunnel datagrams that are the consecutive segments of one TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Datagrams in the run.
    pub count: usize,
    /// Bytes of each datagram but the last (the read's GRO segment size).
    pub seg: usize,
    /// Bytes of the read.
    pub len: usize,
    /// Inner IPv4 + TCP header bytes (equal in every segment).
    pub hdr_len: usize,
    /// Payload bytes of every segment but the last (the TCP MSS the sender used).
    pub mss: usize,
    /// Payload bytes of all segments.
    pub payload: usize,
    /// PSH/FIN of the last segment (the others carry neither).
    pub last_flags: u8,
}

impl Run {
    /// The inner packet of datagram `i` (without the tunnel header).
    pub fn inner(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * self.seg;
        start + HDR_LEN..(start + self.seg).min(self.len)
    }

    /// The payload of datagram `i`.
    pub fn payload_of(&self, i: usize) -> std::ops::Range<usize> {
        let r = self.inner(i);
        r.start + self.hdr_len..r.end
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The IPv4 + TCP header length of one tunnel datagram's inner packet, if it is a plain data segment:
/// tunnel data message, IPv4 without options, not a fragment, TCP, total length equal to what arrived.
fn segment_header(d: &[u8]) -> Option<usize> {
    if d.len() < HDR_LEN + IP_HDR + 20 || d[0] != MAGIC || d[1] != VERSION || d[2] != TYPE_DATA {
        return None;
    }
    let p = &d[HDR_LEN..];
    if p[0] != 0x45 || p[9] != PROTO_TCP || get16(p, 6) & 0x3fff != 0 || usize::from(get16(p, 2)) != p.len() {
        return None;
    }
    let doff = usize::from(p[IP_HDR + 12] >> 4) * 4;
    let hl = IP_HDR + doff;
    (doff >= 20 && hl <= p.len()).then_some(hl)
}

/// Whether `d` is one whole tunnel data datagram (tunnel header + an IPv4 packet whose total length is
/// the rest). A UDP GRO read that is one datagram larger than its reported segment size is not a run but
/// an eBPF sender's super-packet: over a veth underlay its GSO packet reaches the socket uncut.
pub fn whole_datagram(d: &[u8]) -> bool {
    d.len() >= HDR_LEN + IP_HDR
        && d[0] == MAGIC
        && d[1] == VERSION
        && d[2] == TYPE_DATA
        && d[HDR_LEN] >> 4 == 4
        && HDR_LEN + usize::from(get16(d, HDR_LEN + 2)) == d.len()
}

/// A single inner TCP packet larger than the instances' MTU (an eBPF sender's GSO super-packet, see
/// [`whole_datagram`]) as a run of one: `mss` is the segment size to cut it into (the sender's, when the
/// socket reported it and it fits the MTU, else the largest the MTU allows).
pub fn super_packet(d: &[u8], mss_hint: Option<usize>, mtu: usize) -> Option<Run> {
    let hl = segment_header(d)?;
    let p = &d[HDR_LEN..];
    let flags = p[IP_HDR + 13];
    if p.len() <= mtu || hl >= mtu || flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
        return None;
    }
    let payload = p.len() - hl;
    let mss = mss_hint.filter(|&m| m > 0 && hl + m <= mtu).unwrap_or(mtu - hl);
    Some(Run {
        count: 1,
        seg: d.len(),
        len: d.len(),
        hdr_len: hl,
        mss,
        payload,
        last_flags: flags & (TCP_PSH | TCP_FIN),
    })
}

/// Whether the `len` bytes of one read, cut every `seg` bytes, are one TCP super-packet's segments.
pub fn check_run(buf: &[u8], len: usize, seg: usize) -> Option<Run> {
    if seg == 0 || len <= seg || len > buf.len() {
        return None;
    }
    let count = len.div_ceil(seg);
    // one iovec per segment in the write (the kernel's GRO makes runs of at most 64 datagrams)
    if count > MAX_RUN {
        return None;
    }
    let first = &buf[..seg];
    let hdr_len = segment_header(first)?;
    let p0 = &first[HDR_LEN..];
    let mss = p0.len() - hdr_len;
    if mss == 0 {
        return None;
    }
    let seq0 = be32(p0, IP_HDR + 4);
    let mut payload = 0usize;
    let mut last_flags = 0u8;
    for i in 0..count {
        let d = &buf[i * seg..((i + 1) * seg).min(len)];
        if segment_header(d)? != hdr_len {
            return None;
        }
        let p = &d[HDR_LEN..];
        let plen = p.len() - hdr_len;
        let last = i + 1 == count;
        // every segment but the last is a full one; the last is not empty
        if plen == 0 || (!last && plen != mss) {
            return None;
        }
        // same TOS, DF, TTL, addresses; same ports, ack, window, options (timestamps included)
        if p[1] != p0[1]
            || p[6] & 0x40 != p0[6] & 0x40
            || p[8] != p0[8]
            || p[12..20] != p0[12..20]
            || p[IP_HDR..IP_HDR + 4] != p0[IP_HDR..IP_HDR + 4]
            || p[IP_HDR + 8..IP_HDR + 12] != p0[IP_HDR + 8..IP_HDR + 12]
            || p[IP_HDR + 14..IP_HDR + 16] != p0[IP_HDR + 14..IP_HDR + 16]
            || p[IP_HDR + 20..hdr_len] != p0[IP_HDR + 20..hdr_len]
        {
            return None;
        }
        if be32(p, IP_HDR + 4) != seq0.wrapping_add((i * mss) as u32) {
            return None;
        }
        let flags = p[IP_HDR + 13];
        let allowed = if last { TCP_ACK | TCP_ECE | TCP_PSH | TCP_FIN } else { TCP_ACK | TCP_ECE };
        if flags & TCP_ACK == 0 || flags & !allowed != 0 || flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
            return None;
        }
        if last {
            last_flags = flags & (TCP_PSH | TCP_FIN);
        }
        payload += plen;
    }
    if hdr_len + payload > usize::from(u16::MAX) {
        return None;
    }
    Some(Run { count, seg, len, hdr_len, mss, payload, last_flags })
}

/// Bytes of tunnel header + IPv4 + TCP header one segment header buffer must hold.
pub const SEG_HDR_MAX: usize = HDR_LEN + 60 + 60;

/// Cuts a TCP/IPv4 GSO super-packet `pkt` (`hdr_len` bytes of IPv4 + TCP header, then the payload) into
/// segments of `mss` payload bytes without copying a payload: `hdrs[i][HDR_LEN..HDR_LEN + hdr_len]`
/// receives segment i's headers (IP ID + i, total length, IP checksum, sequence number, CWR only on the
/// first, PSH/FIN only on the last, the complete TCP checksum over its payload) and `payloads[i]` the range
/// of `pkt` that follows them. The same bytes as `tun_rs::gso_split`. Returns the segment count, None when
/// the packet is not such a super-packet or there are too few buffers.
pub fn split_tcp(
    pkt: &[u8],
    hdr_len: usize,
    mss: usize,
    hdrs: &mut [[u8; SEG_HDR_MAX]],
    payloads: &mut [std::ops::Range<usize>],
) -> Option<usize> {
    if mss == 0 || pkt.len() <= hdr_len || hdr_len < IP_HDR + 20 || HDR_LEN + hdr_len > SEG_HDR_MAX {
        return None;
    }
    if pkt[0] != 0x45 || pkt[9] != PROTO_TCP || usize::from(pkt[IP_HDR + 12] >> 4) * 4 != hdr_len - IP_HDR {
        return None;
    }
    let count = (pkt.len() - hdr_len).div_ceil(mss);
    if count > hdrs.len() || count > payloads.len() {
        return None;
    }
    let (id0, seq0) = (get16(pkt, 4), be32(pkt, IP_HDR + 4));
    let pseudo = tun_rs::checksum_no_fold(&pkt[12..20], 6);
    for i in 0..count {
        let start = hdr_len + i * mss;
        let end = (start + mss).min(pkt.len());
        let plen = end - start;
        let h = &mut hdrs[i][HDR_LEN..HDR_LEN + hdr_len];
        h.copy_from_slice(&pkt[..hdr_len]);
        h[2..4].copy_from_slice(&((hdr_len + plen) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        fix_ip_checksum(h, IP_HDR);
        h[IP_HDR + 4..IP_HDR + 8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
        if i > 0 {
            h[IP_HDR + 13] &= !TCP_CWR;
        }
        if i + 1 < count {
            h[IP_HDR + 13] &= !(TCP_PSH | TCP_FIN);
        }
        h[IP_HDR + 16..IP_HDR + 18].fill(0);
        // the TCP header is a multiple of 4 bytes long, so its sum and the payload's add up as one
        let sum = tun_rs::checksum_no_fold(&h[IP_HDR..], pseudo + (hdr_len - IP_HDR + plen) as u64);
        let tcp_csum = !tun_rs::checksum(&pkt[start..end], sum);
        h[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&tcp_csum.to_be_bytes());
        payloads[i] = start..end;
    }
    Some(count)
}

/// Writes into `out` the virtio header and the super-packet's IPv4 + TCP header, made from `first` (the
/// first segment's inner headers, already translated): total length, IP checksum, the last segment's
/// PSH/FIN, and in the TCP checksum field the pseudo-header sum the kernel completes (NEEDS_CSUM).
/// Returns the bytes written; the payloads follow in the gather write.
pub fn write_header(first: &[u8], run: &Run, out: &mut [u8]) -> usize {
    let vhl = tun_rs::VIRTIO_NET_HDR_LEN;
    let hl = run.hdr_len;
    gso_header(first, run).encode(&mut out[..vhl]).expect("room for the virtio header");
    let h = &mut out[vhl..vhl + hl];
    h.copy_from_slice(&first[..hl]);
    let total = (hl + run.payload) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ip_checksum(h, IP_HDR);
    h[IP_HDR + 13] = (h[IP_HDR + 13] & !(TCP_PSH | TCP_FIN)) | run.last_flags;
    let tcp_len = (hl - IP_HDR + run.payload) as u64;
    let pseudo = tun_rs::checksum(&h[12..20], 6 + tcp_len);
    h[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&pseudo.to_be_bytes());
    vhl + hl
}

/// The virtio header of `run` as one TCP/IPv4 GSO packet (`first`: its first segment's headers): cut
/// every `mss` bytes, checksum left to the kernel; a congestion-window-reduced mark (only ever on the
/// first segment) needs the ECN variant.
pub fn gso_header(first: &[u8], run: &Run) -> tun_rs::VirtioNetHdr {
    let ecn = if first[IP_HDR + 13] & TCP_CWR != 0 { super::offload::VIRTIO_NET_HDR_GSO_ECN } else { 0 };
    tun_rs::VirtioNetHdr {
        flags: super::offload::VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4 | ecn,
        hdr_len: run.hdr_len as u16,
        gso_size: run.mss as u16,
        csum_start: IP_HDR as u16,
        csum_offset: 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::packet::write_header_flags;
    use etherparse::PacketBuilder;

    const MSS: usize = 1000;

    /// A seeded pseudo-random sequence (xorshift64), for reproducible random tests.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// A TCP super-packet with `n` bytes of payload (seq 1000, timestamps option), cut like the sender
    /// cuts it, as one read: tunnel header + segment, each.
    fn run_of(n: usize, last_flags: u8) -> (Vec<u8>, usize, Vec<u8>) {
        run_mss(n, MSS, last_flags)
    }

    fn run_mss(n: usize, mss: usize, last_flags: u8) -> (Vec<u8>, usize, Vec<u8>) {
        let payload: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        let mut read = Vec::new();
        let mut seg = 0;
        for (i, chunk) in payload.chunks(mss).enumerate() {
            let last = (i + 1) * mss >= n;
            let mut b = PacketBuilder::ipv4([10, 18, 0, 2], [10, 18, 0, 66], 63)
                .tcp(40000, 5201, 1000 + (i * mss) as u32, 502)
                .ack(77)
                .options(&[etherparse::TcpOptionElement::Timestamp(5, 6)])
                .unwrap();
            if last && last_flags & TCP_PSH != 0 {
                b = b.psh();
            }
            if last && last_flags & TCP_FIN != 0 {
                b = b.fin();
            }
            let mut d = vec![0u8; HDR_LEN];
            write_header_flags(&mut d, TYPE_DATA, 1, 0);
            b.write(&mut d, chunk).unwrap();
            if i == 0 {
                seg = d.len();
            }
            read.extend_from_slice(&d);
        }
        (read, seg, payload)
    }

    #[test]
    fn a_split_super_packet_is_rebuilt() {
        let (read, seg, payload) = run_of(10 * MSS + 321, TCP_PSH);
        let run = check_run(&read, read.len(), seg).expect("a run");
        assert_eq!((run.count, run.mss, run.payload, run.last_flags), (11, MSS, payload.len(), TCP_PSH));
        let mut hdr = [0u8; 128];
        let n = write_header(&read[run.inner(0)], &run, &mut hdr);
        let mut pkt = hdr[tun_rs::VIRTIO_NET_HDR_LEN..n].to_vec();
        for i in 0..run.count {
            pkt.extend_from_slice(&read[run.payload_of(i)]);
        }
        let vh = tun_rs::VirtioNetHdr::decode(&hdr[..tun_rs::VIRTIO_NET_HDR_LEN]).unwrap();
        assert_eq!((vh.gso_type, vh.gso_size, vh.hdr_len, vh.csum_start, vh.csum_offset), (1, MSS as u16, 52, 20, 16));
        let p = etherparse::SlicedPacket::from_ip(&pkt).expect("a valid packet");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("IPv4") };
        assert_eq!(usize::from(ip.header().total_len()), pkt.len());
        assert_eq!(ip.header().to_header().calc_header_checksum(), ip.header().header_checksum());
        let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else { panic!("TCP") };
        assert_eq!((t.sequence_number(), t.acknowledgment_number(), t.psh(), t.fin()), (1000, 77, true, false));
        assert_eq!(t.payload(), &payload[..], "the payloads in order, nothing lost or repeated");
        // the checksum field holds the pseudo-header sum: completing it over the segment gives a valid sum
        let mut whole = pkt.clone();
        assert!(crate::proxy::packet::complete_partial(&mut whole, 20, 16), "completed");
        assert!(crate::proxy::packet::tests::checksums_ok(&whole), "checksums valid once completed");
    }

    #[test]
    fn anything_else_takes_the_general_path() {
        let (read, seg, _) = run_of(4 * MSS, TCP_FIN);
        assert_eq!(check_run(&read, read.len(), seg).map(|r| r.last_flags), Some(TCP_FIN));
        // one datagram is not a run
        assert_eq!(check_run(&read, seg, seg), None);
        // a gap in the sequence numbers
        let mut gap = read.clone();
        gap[2 * seg + HDR_LEN + IP_HDR + 7] ^= 1;
        assert_eq!(check_run(&gap, gap.len(), seg), None);
        // another flow in the middle (destination port)
        let mut other = read.clone();
        other[seg + HDR_LEN + IP_HDR + 3] ^= 1;
        assert_eq!(check_run(&other, other.len(), seg), None);
        // PSH on a segment that is not the last
        let mut psh = read.clone();
        psh[HDR_LEN + IP_HDR + 13] |= TCP_PSH;
        assert_eq!(check_run(&psh, psh.len(), seg), None);
        // SYN, RST, URG anywhere
        for f in [TCP_SYN, TCP_RST, TCP_URG] {
            let mut x = read.clone();
            x[3 * seg + HDR_LEN + IP_HDR + 13] |= f;
            assert_eq!(check_run(&x, x.len(), seg), None, "flag {f:#x}");
        }
        // a probe (not a data message), a fragment, a wrong total length
        let mut probe = read.clone();
        probe[seg + 2] = 1;
        assert_eq!(check_run(&probe, probe.len(), seg), None);
        let mut frag = read.clone();
        frag[HDR_LEN + 6] |= 0x20;
        assert_eq!(check_run(&frag, frag.len(), seg), None);
        let mut tl = read.clone();
        tl[HDR_LEN + 3] ^= 1;
        assert_eq!(check_run(&tl, tl.len(), seg), None);
        // different timestamps in one segment
        let mut ts = read.clone();
        ts[seg + HDR_LEN + IP_HDR + 20 + 5] ^= 1;
        assert_eq!(check_run(&ts, ts.len(), seg), None);
        // a short segment before the last
        assert_eq!(check_run(&read, read.len(), seg + 1), None);
        // longer than MAX_RUN segments
        let (long, seg, _) = run_mss((MAX_RUN + 1) * 8, 8, 0);
        assert_eq!(check_run(&long, long.len(), seg), None);
        let (ok, seg, _) = run_mss(MAX_RUN * 8, 8, 0);
        assert_eq!(check_run(&ok, ok.len(), seg).map(|r| r.count), Some(MAX_RUN));
    }

    #[test]
    fn an_uncut_super_packet_is_written_as_one() {
        // one datagram carrying a 5,000-byte TCP packet, as an eBPF sender's GSO packet arrives on a veth
        let payload: Vec<u8> = (0..5000).map(|i| i as u8).collect();
        let mut d = vec![0u8; HDR_LEN];
        write_header_flags(&mut d, TYPE_DATA, 0, 0);
        PacketBuilder::ipv4([10, 18, 0, 2], [10, 18, 0, 66], 63)
            .tcp(40000, 5201, 1000, 502)
            .ack(77)
            .psh()
            .write(&mut d, &payload)
            .unwrap();
        assert!(whole_datagram(&d));
        let run = super_packet(&d, Some(1398), 1450).expect("a super-packet");
        assert_eq!((run.count, run.hdr_len, run.mss, run.payload, run.last_flags), (1, 40, 1398, 5000, TCP_PSH));
        // an implausible hint gives way to the MTU
        assert_eq!(super_packet(&d, Some(9000), 1450).unwrap().mss, 1410);
        assert_eq!(super_packet(&d, None, 1450).unwrap().mss, 1410);
        // what fits the MTU, or is a SYN, is not one
        assert_eq!(super_packet(&d, None, 6000), None);
        let mut syn = d.clone();
        syn[HDR_LEN + IP_HDR + 13] |= TCP_SYN;
        assert_eq!(super_packet(&syn, None, 1450), None);
        // a run's first datagram is not a whole read
        let (read, _, _) = run_of(3 * MSS, 0);
        assert!(!whole_datagram(&read));
        let mut hdr = [0u8; 128];
        let n = write_header(&d[run.inner(0)], &run, &mut hdr);
        let mut pkt = hdr[tun_rs::VIRTIO_NET_HDR_LEN..n].to_vec();
        pkt.extend_from_slice(&d[run.payload_of(0)]);
        assert_eq!(&pkt[..20], &d[HDR_LEN..HDR_LEN + 20], "IP header kept (same length, same checksum)");
        assert!(crate::proxy::packet::complete_partial(&mut pkt, 20, 16));
        assert!(crate::proxy::packet::tests::checksums_ok(&pkt));
    }

    #[test]
    fn split_tcp_matches_tun_rs() {
        let mut next = xorshift(0x1234_5678_9abc_def1);
        let mut hdrs = vec![[0u8; SEG_HDR_MAX]; 128];
        let mut payloads = vec![0..0; 128];
        let mut segs: Vec<Vec<u8>> = (0..128).map(|_| vec![0u8; 2000]).collect();
        let mut sizes = vec![0usize; 128];
        for round in 0..200 {
            let n = 1 + (next() as usize) % 40_000;
            let mss = 500 + (next() as usize) % 1000;
            let payload: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let mut b =
                PacketBuilder::ipv4([10, 18, 0, 2], [10, 18, 0, 66], 63).tcp(40000, 5201, next() as u32, 502).ack(7);
            if round % 3 == 0 {
                b = b.options(&[etherparse::TcpOptionElement::Timestamp(next() as u32, 6)]).unwrap();
            }
            if round % 2 == 0 {
                b = b.psh();
            }
            if round % 5 == 0 {
                b = b.fin().cwr();
            }
            let mut pkt = Vec::new();
            b.write(&mut pkt, &payload).unwrap();
            let hl = 20 + usize::from(pkt[32] >> 4) * 4;
            let count = split_tcp(&pkt, hl, mss, &mut hdrs, &mut payloads).expect("split");
            let vh = tun_rs::VirtioNetHdr {
                flags: super::super::offload::VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len: hl as u16,
                gso_size: mss as u16,
                csum_start: 20,
                csum_offset: 16,
            };
            let mut input = pkt.clone();
            let want = tun_rs::gso_split(&mut input, vh, &mut segs, &mut sizes, 0, false).unwrap();
            assert_eq!(count, want, "round {round}");
            for i in 0..count {
                let mut got = hdrs[i][HDR_LEN..HDR_LEN + hl].to_vec();
                got.extend_from_slice(&pkt[payloads[i].clone()]);
                assert_eq!(got, segs[i][..sizes[i]], "round {round} segment {i}");
                assert!(crate::proxy::packet::tests::checksums_ok(&got));
            }
        }
        // not a TCP/IPv4 super-packet, or too few buffers
        let (read, _, _) = run_of(3 * MSS, 0);
        let pkt = &read[HDR_LEN..];
        assert_eq!(split_tcp(pkt, 52, 0, &mut hdrs, &mut payloads), None);
        assert_eq!(split_tcp(pkt, 40, 100, &mut hdrs, &mut payloads), None, "header length must match");
        assert_eq!(split_tcp(pkt, 52, 1, &mut hdrs[..2], &mut payloads), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut next = xorshift(0x9e3779b97f4a7c15);
        let (read, seg, _) = run_of(6 * MSS, 0);
        for _ in 0..20_000 {
            let mut b = read.clone();
            for _ in 0..(next() % 8) {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            let seg_try = if next().is_multiple_of(4) { (next() as usize) % (2 * seg) } else { seg };
            if whole_datagram(&b) {
                let _ = super_packet(&b, Some(seg_try), 1450);
            }
            if let Some(run) = check_run(&b, b.len(), seg_try) {
                let mut hdr = [0u8; 128];
                let _ = write_header(&b[run.inner(0)], &run, &mut hdr);
                for i in 0..run.count {
                    let _ = &b[run.payload_of(i)];
                }
            }
        }
    }
}
