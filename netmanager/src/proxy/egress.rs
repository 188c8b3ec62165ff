//! The tun-to-world direction of the userspace datapath: packets the kernel routed into the tun are
//! translated ([`super::engine`]), written back into the tun for a local instance or encapsulated to the
//! hosting worker (runs of datagrams with one UDP_SEGMENT send), and GSO super-packets read from the tun
//! are translated once and cut. The same task does the periodic work (probes, eviction, saving the table).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::counters::{Counters, Event, Reason};
use super::engine::Verdict;
use super::offload::{
    gso_header_fixup, send_gso, MAX_SEGMENTS, UDP_GSO_MAX_PAYLOAD, VHL, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
};
use super::packet::{self, HDR_LEN};
use super::resolver::{Answer, Resolver};
use super::tun_out::TunOut;
use super::{probes, reassemble, SharedEngine, View, BATCH};

/// A worker that has not answered a probe for this long loses its RTT.
const SILENT_WORKER: Duration = Duration::from_secs(10);

/// The tun-to-world direction (reads from the tun: translation, encapsulation, resolution of unknown
/// service IPs) and the periodic work (probes, eviction, saving the table). The other direction runs in
/// [`super::ingress::Ingress`], on its own task, so a worker's replies (TCP ACKs) are not queued behind its bulk data.
pub struct Egress {
    pub(super) tun: Arc<tun_rs::AsyncDevice>,
    pub(super) udp: Arc<UdpSocket>,
    pub(super) engine: SharedEngine,
    pub(super) flows_file: Option<PathBuf>,
    /// `engine.changes()` when the table was last saved.
    pub(super) saved: u64,
    pub(super) view: View,
    /// Packets to unknown service IPs, held while the cluster is asked.
    pub(super) resolver: Resolver,
    pub(super) counters: Arc<Counters>,
    pub(super) public: SocketAddr,
    /// When the proxy started (probe stamps count from it).
    pub(super) base: Instant,
    /// Id of the last probe sent.
    pub(super) seq: u32,
    /// Hairpinned packets for local instances.
    pub(super) out: TunOut,
    /// A run of encapsulated datagrams for one worker, sent with one UDP_SEGMENT sendmsg by `flush_enc`.
    pub(super) enc: Vec<u8>,
    pub(super) enc_ep: Option<SocketAddrV4>,
    pub(super) enc_seg: usize,
    pub(super) enc_n: usize,
    pub(super) enc_short: bool,
    /// UDP GSO/GRO on the tunnel socket (off after the kernel refused once).
    pub(super) gso_ok: bool,
    /// Per-segment header buffers for cutting TCP super-packets without copying payloads (made on first use).
    pub(super) seg_hdrs: Vec<[u8; reassemble::SEG_HDR_MAX]>,
    pub(super) seg_payloads: Vec<std::ops::Range<usize>>,
    /// The tun was opened with IFF_VNET_HDR (reads start with a virtio header).
    pub(super) vnet: bool,
}

impl Egress {
    pub async fn run(mut self, mut res_rx: mpsc::Receiver<Answer>, interval: Duration, seg_len: usize) {
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
            if raw.get(HDR_LEN).is_some_and(|b| b >> 4 == 4) {
                self.counters.add(Event::TunRxBytes, (raw.len() - HDR_LEN) as u64);
            }
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
        // the IPv4 packet's bytes (a GSO super-packet's as read, before it is cut)
        self.counters.add(Event::TunRxBytes, (raw.len() - VHL) as u64);
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
        let v = self.engine.lock().outbound(&mut raw[VHL..], &self.view.snap, now);
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
                    self.resolver.hold(ip, &segs[i][..HDR_LEN + sizes[i]], now);
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
        let v = self.engine.lock().outbound(&mut frame[HDR_LEN..], &self.view.snap, now);
        if let Verdict::Resolve(ip) = v {
            self.counters.drop_packet(Reason::UnknownService);
            self.resolver.hold(ip, frame, now);
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

    /// The cluster answered about service IP `ip`: the packets held for it are translated now, or dropped.
    async fn on_resolved(&mut self, ip: Ipv4Addr, found: bool) {
        let held = self.resolver.answered(ip);
        self.view.reload();
        if !found || self.view.snap.service_by_ip(ip).is_none() {
            self.resolver.unresolvable(ip);
            return;
        }
        for mut frame in held {
            let v = self.engine.lock().outbound(&mut frame[HDR_LEN..], &self.view.snap, Instant::now());
            if matches!(v, Verdict::ToTun | Verdict::Encap(_)) {
                self.counters.event(Event::HeldReplayed);
            }
            self.emit(&mut frame, v).await;
        }
        self.flush_enc().await;
        self.flush().await;
    }

    /// The periodic work: idle conversions evicted and the table saved, probes sent, silent workers' RTTs
    /// forgotten, the RTT estimates settled and published.
    async fn on_tick(&mut self) {
        let now = Instant::now();
        let (changes, export) = {
            let mut e = self.engine.lock();
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
        self.resolver.expire(now);
        self.view.refresh();
        let stamp = self.base.elapsed().as_nanos() as u64;
        probes::send(&self.udp, &self.view.snap, self.public, &mut self.seq, stamp, &self.counters).await;
        // this worker's coordinate moved since the last round: every peer's estimate is settled again
        let own = self.counters.coord();
        let peers = {
            let mut e = self.engine.lock();
            e.peers.forget_silent(now, SILENT_WORKER);
            e.peers.settle(&own);
            e.peers.clone()
        };
        probes::publish(&self.view.tables, &self.view.snap, &peers, &own, &self.counters);
    }
}
