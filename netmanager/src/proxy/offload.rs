//! The tun's and the tunnel socket's offloads: virtio-net headers of GSO super-packets read from the tun,
//! UDP_SEGMENT sends of runs of datagrams, and the GSO segment limit the tun path wants on instances.

use std::net::SocketAddrV4;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::packet::HDR_LEN;
use super::udpio;

/// Segments of one GSO super-packet read from the tun (65535 / 88-byte minimum MSS = 745).
pub const MAX_SEGMENTS: usize = 1024;
/// Length of the virtio-net header in front of every packet on a tun with offloads.
pub const VHL: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Bytes of UDP payload one UDP_SEGMENT send may carry (65535 - IPv4 and UDP headers, rounded down).
pub const UDP_GSO_MAX_PAYLOAD: usize = 65000;

/// The GSO segment limit the tun path wants on instances' interfaces: as many full-MTU segments as fit one
/// UDP_SEGMENT send once each carries the tunnel header (44 at MTU 1450). With the kernel's default the
/// instance's TCP builds larger super-packets, and each crosses as two sends, two reads and two tun
/// writes.
pub fn instance_gso_max_segs(mtu: u16) -> u32 {
    (UDP_GSO_MAX_PAYLOAD / (HDR_LEN + mtu as usize)).max(1) as u32
}
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// One UDP_SEGMENT send of `parts` (gathered by the kernel; every part but the last `seg` bytes) to `ep`,
/// waiting while the socket buffer is full.
pub async fn send_gso(udp: &UdpSocket, parts: &[&[u8]], seg: usize, ep: SocketAddrV4) -> std::io::Result<usize> {
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
