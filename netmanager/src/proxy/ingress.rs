//! The world-to-tun direction of the userspace datapath: tunnel datagrams read from the socket (runs
//! coalesced by UDP GRO, or one uncut super-packet of an eBPF sender) are decapsulated, reverse-translated
//! and written into the tun, runs of one flow as one GSO super-packet; probes are answered and their
//! replies give the RTTs and the peers' coordinates.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::counters::{Counters, Event, Reason};
use super::engine::Verdict;
use super::offload::VHL;
use super::packet::{self, HDR_LEN};
use super::tun_out::TunOut;
use super::{probes, reassemble, udpio, SharedEngine, View, BATCH};

/// The world-to-tun direction: tunnel datagrams (decapsulation, reverse translation, into the tun) and
/// probes (answered; replies give the RTTs).
pub struct Ingress {
    pub(super) tun: Arc<tun_rs::AsyncDevice>,
    pub(super) udp: Arc<UdpSocket>,
    pub(super) engine: SharedEngine,
    pub(super) view: View,
    pub(super) counters: Arc<Counters>,
    pub(super) base: Instant,
    pub(super) out: TunOut,
    /// The tun takes virtio headers (offloads on): a run of segments can be written as one super-packet.
    pub(super) vnet: bool,
    /// The instances' MTU: a larger inner TCP packet is a super-packet to be written as such (or cut).
    pub(super) mtu: usize,
    /// Segment buffers for cutting super-packets when the tun takes no virtio headers (made on first use).
    pub(super) split: Vec<Vec<u8>>,
    /// This worker's advertised endpoint address when it is not one of this host's (a relay or port
    /// forward in front of it): datagrams it hands on are taken for any known worker.
    pub(super) front: Option<std::net::Ipv4Addr>,
}

impl Ingress {
    pub async fn run(mut self) {
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
                                if self.peer_ok(&ubuf[..seg], from, run.count as u64) {
                                    self.write_run(&mut ubuf, run, now).await;
                                }
                                continue;
                            }
                        }
                        let mut off = 0;
                        while off < n {
                            let end = (off + seg).min(n);
                            self.counters.event(Event::TunnelRx);
                            if end - off > HDR_LEN + self.mtu {
                                if let Some(run) = reassemble::super_packet(&ubuf[off..end], mss_hint, self.mtu) {
                                    if self.peer_ok(&ubuf[off..end], from, 1) {
                                        self.write_super(&mut ubuf[off..end], run, now).await;
                                    }
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
            let v = self.engine.lock().inbound(&mut seg[..*len], &self.view.snap, now, true);
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
        let v = self.engine.lock().inbound_run(&mut buf[first.clone()], &self.view.snap, now, run.count as u64);
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

    /// A data datagram (`n` of them, one flow, coalesced) is taken only from the worker whose subnet holds
    /// its inner source, by that worker's endpoint address or the address its cluster saw; anything else
    /// is dropped and counted (`tunnel_unknown_peer`, `tunnel_spoofed_inner`). Refreshes the view.
    fn peer_ok(&mut self, dgram: &[u8], from: SocketAddr, n: u64) -> bool {
        let Some(src) = dgram.get(HDR_LEN + 12..HDR_LEN + 16) else {
            self.counters.drop_packets(Reason::TunnelMalformedInner, n);
            return false;
        };
        let src = std::net::Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        self.view.refresh();
        match self.view.snap.check_peer(from.ip(), src, self.front) {
            Ok(()) => true,
            Err(why) => {
                let reason = match why {
                    crate::tables::PeerRefused::UnknownPeer => Reason::TunnelUnknownPeer,
                    crate::tables::PeerRefused::SpoofedInner => Reason::TunnelSpoofedInner,
                };
                tracing::debug!(%from, %src, reason = reason.name(), "tunnel datagram refused");
                self.counters.drop_packets(reason, n);
                false
            }
        }
    }

    async fn on_udp(&mut self, dgram: &mut [u8], from: SocketAddr, now: Instant) {
        match packet::decode_tunnel(dgram) {
            Err(r) => self.counters.drop_packet(r),
            Ok(packet::Tunnel::ProbeRequest { id, stamp }) => {
                self.counters.event(Event::ProbeRequests);
                // the reply carries this worker's coordinate: the asker moves its own by it
                let reply = packet::probe_reply(id, stamp, self.counters.coord().to_array());
                let _ = self.udp.send_to(&reply, from).await;
            }
            Ok(packet::Tunnel::ProbeReply { stamp, coord, .. }) => {
                self.counters.event(Event::ProbeReplies);
                if let Some(rtt_us) = probes::rtt_us(stamp, self.base.elapsed().as_nanos() as u64) {
                    // a sane coordinate moves this worker's own; the peer's estimate follows both
                    let coord = coord.and_then(oak_proto::vivaldi::Coord::from_array);
                    let own = match &coord {
                        Some(c) => self.counters.observe_peer(c, rtt_us),
                        None => self.counters.coord(),
                    };
                    self.engine.lock().peers.record(from, rtt_us, coord, &own, Instant::now());
                    self.counters.set_rtt(from.to_string(), rtt_us);
                }
            }
            Ok(packet::Tunnel::Data(_)) => {
                if !self.peer_ok(dgram, from, 1) {
                    return;
                }
                let complete = dgram[3] & packet::FLAG_CSUM_COMPLETE != 0;
                let v = self.engine.lock().inbound(&mut dgram[HDR_LEN..], &self.view.snap, now, complete);
                // inbound verdicts are ToTun or a (counted) drop
                if v == Verdict::ToTun && self.out.push(&dgram[HDR_LEN..]) {
                    self.out.flush(&self.tun, &self.counters).await;
                }
            }
        }
    }
}
