//! The proxy's translation engine: pure packet-in, verdict-out logic (no I/O), so it can be tested and
//! fuzzed without a tun device.
//!
//! * Outbound (a packet the kernel routed into the tun): a packet to a service IP is translated to one of
//!   the service's instances (dst = instance ns_ip; src stays the client, except for a *local* instance,
//!   where src becomes the service IP so the reply comes back through the tun instead of straight over the
//!   bridge). The flow is remembered in the conversion table. A reply of a local instance to a service IP
//!   is translated back. Then the packet is routed: local subnet → back into the tun (the kernel delivers
//!   it over the bridge), remote worker subnet → encapsulated to that worker.
//! * Inbound (the inner packet of a tunnel datagram): a reply of a remote instance to a flow this worker
//!   translated gets src = service IP back; the packet must be for the local subnet.

use std::collections::HashMap;

/// The per-packet maps hash with foldhash (randomly seeded, several times faster than SipHash on these
/// 13-byte keys; SipHash was ~2 % of the proxy's CPU under a bulk transfer).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::counters::{Counters, Event, Reason};
use super::packet::{self, Parsed};
use crate::tables::{AddressKind, InstanceEndpoint, Snapshot};

/// Service IPs live here.
pub const SERVICE_SPACE: Ipv4Net = crate::control::SERVICE_SPACE;
/// Conversion-table entries idle this long are evicted.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Bound on the conversion table (new flows beyond it are dropped until entries idle out).
pub const MAX_FLOWS: usize = 1 << 18;

/// What to do with a packet after [`Engine::outbound`] / [`Engine::inbound`] (the packet may have been
/// rewritten in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop(Reason),
    /// Write it into the tun (the kernel delivers it to the local instance).
    ToTun,
    /// Encapsulate it to this worker's tunnel endpoint.
    Encap(SocketAddr),
    /// Unknown service IP: resolve it, hold or drop the packet.
    Resolve(Ipv4Addr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

#[derive(Clone, Debug)]
struct Forward {
    service_id: String,
    inst: Ipv4Addr,
    nat: (Ipv4Addr, u16),
    rev: FlowKey,
    last: Instant,
}

#[derive(Clone, Debug)]
struct Reverse {
    client: (Ipv4Addr, u16),
    svc_ip: Ipv4Addr,
    fwd: FlowKey,
    last: Instant,
}

/// The conversion table and the selection state.
pub struct Engine {
    fwd: FastMap<FlowKey, Forward>,
    rev: FastMap<FlowKey, Reverse>,
    rr: HashMap<String, u64>,
    /// Measured RTT to worker tunnel endpoints (µs).
    pub rtt: HashMap<SocketAddr, u64>,
    /// When each worker last answered a probe.
    replied: HashMap<SocketAddr, Instant>,
    pub counters: Arc<Counters>,
    pub idle: Duration,
    next_port: u16,
    /// Bumped whenever a conversion is added or removed (the proxy saves the table when it moved).
    changes: u64,
}

impl Engine {
    pub fn new(counters: Arc<Counters>) -> Self {
        Self {
            fwd: FastMap::default(),
            rev: FastMap::default(),
            rr: HashMap::new(),
            rtt: HashMap::new(),
            replied: HashMap::new(),
            counters,
            idle: FLOW_IDLE,
            next_port: 0,
            changes: 0,
        }
    }

    pub fn flows(&self) -> usize {
        self.fwd.len()
    }

    /// Evict idle conversions.
    pub fn evict(&mut self, now: Instant) {
        let idle = self.idle;
        let rev = &self.rev;
        let dead: Vec<FlowKey> = self
            .fwd
            .iter()
            .filter(|(_, f)| {
                let last = rev.get(&f.rev).map_or(f.last, |r| r.last.max(f.last));
                now.saturating_duration_since(last) > idle
            })
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            if let Some(f) = self.fwd.remove(&k) {
                self.rev.remove(&f.rev);
                self.counters.event(Event::FlowsEvicted);
                self.changes += 1;
            }
        }
        // orphans (should not happen)
        let fwd = &self.fwd;
        self.rev.retain(|_, r| fwd.contains_key(&r.fwd));
    }

    /// A probe reply from `from`: its round-trip time.
    pub fn record_rtt(&mut self, from: SocketAddr, rtt_us: u64, now: Instant) {
        self.rtt.insert(from, rtt_us);
        self.replied.insert(from, now);
    }

    /// Forget the RTTs of workers whose last probe reply is older than `max_age`.
    pub fn forget_silent(&mut self, now: Instant, max_age: Duration) {
        let stale: Vec<SocketAddr> =
            self.replied.iter().filter(|(_, t)| now.duration_since(**t) > max_age).map(|(a, _)| *a).collect();
        for a in stale {
            self.replied.remove(&a);
            self.rtt.remove(&a);
        }
    }

    /// Pick an instance for a new flow.
    fn pick<'a>(
        &mut self,
        snap: &Snapshot,
        service_id: &str,
        kind: AddressKind,
        instances: &'a [InstanceEndpoint],
    ) -> Option<&'a InstanceEndpoint> {
        let mut sorted: Vec<&InstanceEndpoint> = instances.iter().collect();
        sorted.sort_by_key(|i| (i.instance_number, u32::from(i.ns_ip)));
        if sorted.is_empty() {
            return None;
        }
        match kind {
            AddressKind::RoundRobin => {
                let c = self.rr.entry(service_id.to_string()).or_insert(0);
                let i = sorted[(*c % sorted.len() as u64) as usize];
                *c = c.wrapping_add(1);
                Some(i)
            }
            AddressKind::Closest => sorted.into_iter().min_by_key(|i| {
                let local = snap.is_local(i.ns_ip);
                let rtt = if local { 0 } else { self.rtt.get(&i.worker).copied().or(i.rtt_us).unwrap_or(u64::MAX / 2) };
                (rtt, !local, i.instance_number)
            }),
        }
    }

    fn still_valid(snap: &Snapshot, f: &Forward) -> bool {
        snap.services.get(&f.service_id).is_some_and(|s| s.instances.iter().any(|i| i.ns_ip == f.inst))
    }

    /// Drop a conversion (and its reverse entry).
    fn forget(&mut self, k: &FlowKey) {
        if let Some(f) = self.fwd.remove(k) {
            self.rev.remove(&f.rev);
            self.changes += 1;
        }
    }

    /// How many times the conversion table changed.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The conversions, one per line (`proto client cport svc_ip sport service_id instance nat_ip nat_port`),
    /// saved so a restarted proxy keeps translating the flows it had.
    pub fn export(&self) -> String {
        let mut out = String::new();
        for (k, f) in &self.fwd {
            out.push_str(&format!(
                "{} {} {} {} {} {} {} {} {}\n",
                k.proto, k.src, k.sport, k.dst, k.dport, f.service_id, f.inst, f.nat.0, f.nat.1
            ));
        }
        out
    }

    /// Loads conversions saved by [`Engine::export`] (malformed lines are skipped); returns how many.
    pub fn import(&mut self, text: &str, now: Instant) -> usize {
        let mut n = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = (|| -> Option<(FlowKey, String, Ipv4Addr, (Ipv4Addr, u16))> {
                if f.len() != 9 {
                    return None;
                }
                let k = FlowKey {
                    proto: f[0].parse().ok()?,
                    src: f[1].parse().ok()?,
                    sport: f[2].parse().ok()?,
                    dst: f[3].parse().ok()?,
                    dport: f[4].parse().ok()?,
                };
                Some((k, f[5].to_string(), f[6].parse().ok()?, (f[7].parse().ok()?, f[8].parse().ok()?)))
            })();
            let Some((k, service_id, inst, nat)) = parsed else {
                continue;
            };
            if self.fwd.len() >= MAX_FLOWS {
                break;
            }
            let rk = FlowKey { proto: k.proto, src: inst, sport: k.dport, dst: nat.0, dport: nat.1 };
            self.fwd.insert(k, Forward { service_id, inst, nat, rev: rk, last: now });
            self.rev.insert(rk, Reverse { client: (k.src, k.sport), svc_ip: k.dst, fwd: k, last: now });
            n += 1;
        }
        n
    }

    /// A source port for a hairpinned (local-instance) flow that does not collide with another client's.
    fn free_port(
        &mut self,
        proto: u8,
        inst: Ipv4Addr,
        dport: u16,
        svc: Ipv4Addr,
        want: u16,
        client: (Ipv4Addr, u16),
    ) -> Option<u16> {
        let taken = |rev: &FastMap<FlowKey, Reverse>, p: u16| {
            rev.get(&FlowKey { proto, src: inst, sport: dport, dst: svc, dport: p }).is_some_and(|r| r.client != client)
        };
        if !taken(&self.rev, want) {
            return Some(want);
        }
        for _ in 0..4096 {
            self.next_port = self.next_port.wrapping_add(1);
            let p = 20000 + self.next_port % 40000;
            if !taken(&self.rev, p) {
                return Some(p);
            }
        }
        None
    }

    fn route(snap: &Snapshot, dst: Ipv4Addr) -> Verdict {
        if snap.local_subnet.is_some_and(|n| n.contains(&dst)) {
            Verdict::ToTun
        } else if let Some(ep) = snap.route_for(dst) {
            Verdict::Encap(ep)
        } else {
            Verdict::Drop(Reason::NoRoute)
        }
    }

    /// A packet read from the tun. Counts drops itself, except for `Resolve` (the caller decides).
    pub fn outbound(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant) -> Verdict {
        let v = self.outbound_inner(pkt, snap, now);
        if let Verdict::Drop(r) = v {
            self.counters.drop_packet(r);
        }
        v
    }

    /// Translates a reply of a flow this proxy translated back (source = the service IP, destination = the
    /// client); returns the client's address, or None when the packet belongs to no such flow.
    /// `n`: how many packets `pkt` stands for (a reassembled run shares its first segment's headers).
    fn reverse(&mut self, pkt: &mut [u8], p: &Parsed, now: Instant, n: u64) -> Option<Ipv4Addr> {
        let l4 = p.l4?;
        let k = FlowKey { proto: p.proto, src: p.src, sport: l4.sport, dst: p.dst, dport: l4.dport };
        let r = self.rev.get_mut(&k)?;
        r.last = now;
        let (svc, client) = (r.svc_ip, r.client);
        packet::rewrite(pkt, p, Some((svc, l4.sport)), Some(client));
        self.counters.add(Event::ReverseTranslated, n);
        Some(client.0)
    }

    fn outbound_inner(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant) -> Verdict {
        let p = match packet::parse(pkt, Reason::TunMalformed) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        // reply of a local instance to a hairpinned flow (its dst is the service IP)
        if let Some(client) = self.reverse(pkt, &p, now, 1) {
            return Self::route(snap, client);
        }
        if !SERVICE_SPACE.contains(&p.dst) {
            return Self::route(snap, p.dst);
        }
        if p.later_fragment {
            return Verdict::Drop(Reason::Fragment);
        }
        let Some(l4) = p.l4 else {
            return Verdict::Drop(Reason::UnsupportedProtocol);
        };
        let k = FlowKey { proto: p.proto, src: p.src, sport: l4.sport, dst: p.dst, dport: l4.dport };
        let existing = match self.fwd.get(&k) {
            Some(f) if Self::still_valid(snap, f) => Some((f.inst, f.nat)),
            // a conversion restored after a restart, its service not in the tables yet: resolve first
            // (the packet is held and replayed), then it is checked again
            Some(f) if !snap.services.contains_key(&f.service_id) => return Verdict::Resolve(p.dst),
            Some(_) => {
                self.forget(&k);
                None
            }
            None => None,
        };
        let (inst, nat) = match existing {
            Some(x) => x,
            None => {
                let Some((svc, kind)) = snap.service_by_ip(p.dst) else {
                    return Verdict::Resolve(p.dst);
                };
                if self.fwd.len() >= MAX_FLOWS {
                    self.evict(now);
                    if self.fwd.len() >= MAX_FLOWS {
                        return Verdict::Drop(Reason::FlowTableFull);
                    }
                }
                let (sid, instances) = (svc.service_id.clone(), svc.instances.clone());
                let Some(i) = self.pick(snap, &sid, kind, &instances) else {
                    return Verdict::Drop(Reason::NoInstance);
                };
                let local = snap.is_local(i.ns_ip);
                let inst = i.ns_ip;
                let nat = if local && !l4.icmp {
                    match self.free_port(p.proto, inst, l4.dport, p.dst, l4.sport, (p.src, l4.sport)) {
                        Some(port) => (p.dst, port),
                        None => return Verdict::Drop(Reason::NoInstance),
                    }
                } else if local {
                    (p.dst, l4.sport)
                } else {
                    (p.src, l4.sport)
                };
                let rk = FlowKey { proto: p.proto, src: inst, sport: l4.dport, dst: nat.0, dport: nat.1 };
                if let Some(old) = self.rev.get(&rk).map(|r| r.fwd) {
                    self.forget(&old);
                }
                self.fwd.insert(k, Forward { service_id: sid, inst, nat, rev: rk, last: now });
                self.rev.insert(rk, Reverse { client: (p.src, l4.sport), svc_ip: p.dst, fwd: k, last: now });
                self.counters.event(Event::FlowsCreated);
                self.changes += 1;
                (inst, nat)
            }
        };
        if let Some(f) = self.fwd.get_mut(&k) {
            f.last = now;
        }
        packet::rewrite(pkt, &p, Some(nat), Some((inst, l4.dport)));
        self.counters.event(Event::ForwardTranslated);
        match Self::route(snap, inst) {
            Verdict::Drop(r) => {
                self.forget(&k);
                Verdict::Drop(r)
            }
            v => v,
        }
    }

    /// The inner packet of a tunnel datagram. Counts drops itself.
    pub fn inbound(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant) -> Verdict {
        self.inbound_with(pkt, snap, now, false)
    }

    /// [`Engine::inbound`]; `csum_complete`: the sender flagged the inner checksum as complete
    /// (`FLAG_CSUM_COMPLETE`), so it is not summed again here.
    pub fn inbound_with(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant, csum_complete: bool) -> Verdict {
        let v = self.inbound_inner(pkt, snap, now, csum_complete, 1);
        if let Verdict::Drop(r) = v {
            self.counters.drop_packet(r);
        }
        v
    }

    /// The headers of a run of `n` segments of one flow (the first segment's inner packet, its checksum
    /// left alone: the caller writes a new one): translated once, counted `n` times.
    pub fn inbound_run(&mut self, first: &mut [u8], snap: &Snapshot, now: Instant, n: u64) -> Verdict {
        let v = self.inbound_inner(first, snap, now, true, n);
        if let Verdict::Drop(r) = v {
            self.counters.drop_packets(r, n);
        }
        v
    }

    fn inbound_inner(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant, csum_complete: bool, n: u64) -> Verdict {
        let p: Parsed = match packet::parse(pkt, Reason::TunnelMalformedInner) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        if !csum_complete && packet::complete_transport_checksum(pkt, &p) {
            self.counters.event(Event::ChecksumsCompleted);
        }
        let dst = self.reverse(pkt, &p, now, n).unwrap_or(p.dst);
        if snap.local_subnet.is_some_and(|n| n.contains(&dst)) {
            Verdict::ToTun
        } else {
            Verdict::Drop(Reason::NotForThisNode)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::packet::tests::checksums_ok;
    use crate::tables::ServiceEntry;
    use etherparse::PacketBuilder;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn snap() -> Snapshot {
        let mut s = Snapshot { local_subnet: Some("10.18.0.0/26".parse().unwrap()), ..Default::default() };
        let remote: SocketAddr = "192.0.2.2:50103".parse().unwrap();
        let me: SocketAddr = "192.0.2.1:50103".parse().unwrap();
        s.routes.insert("10.18.0.64/26".parse().unwrap(), remote);
        let inst = |n, a: &str, w| InstanceEndpoint {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            instance_number: n,
            ns_ip: ip(a),
            worker: w,
            rtt_us: None,
        };
        s.services.insert(
            "s".into(),
            ServiceEntry {
                service_id: "s".into(),
                job_name: "a.b.c.d".into(),
                rr_ip: Some(ip("10.30.0.5")),
                closest_ip: Some(ip("10.30.0.6")),
                instances: vec![inst(0, "10.18.0.3", me), inst(1, "10.18.0.66", remote)],
            },
        );
        s
    }

    fn udp(src: &str, dst: &str, sp: u16, dp: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(ip(src).octets(), ip(dst).octets(), 64).udp(sp, dp).write(&mut v, b"payload").unwrap();
        v
    }

    fn addrs(pkt: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
        let p = packet::parse(pkt, Reason::TunMalformed).unwrap();
        let l = p.l4.unwrap();
        (p.src, l.sport, p.dst, l.dport)
    }

    /// The tun path translates a GSO super-packet once, on its header, then cuts it: every segment carries
    /// the translation, its own sequence number and right checksums, and the payload arrives in order.
    #[test]
    fn super_packet_translated_once_then_split() {
        let s = snap();
        let mut e = Engine::new(Arc::new(Counters::new()));
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut pkt = Vec::new();
        PacketBuilder::ipv4(ip("10.18.0.2").octets(), ip("10.30.0.5").octets(), 64)
            .tcp(41000, 80, 5000, 4000)
            .ack(1)
            .write(&mut pkt, &payload)
            .unwrap();
        // what the kernel hands over with offloads: the TCP checksum field holds only the pseudo-header sum
        pkt[36..38].copy_from_slice(&[0x12, 0x34]);
        let mut hdr = tun_rs::VirtioNetHdr {
            flags: 1,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 1400, // not trusted
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        assert!(crate::proxy::gso_header_fixup(&mut hdr, &pkt));
        assert_eq!(hdr.hdr_len, 40);
        let v = e.outbound(&mut pkt, &s, Instant::now());
        assert!(matches!(v, Verdict::ToTun | Verdict::Encap(_)), "{v:?}");
        let mut segs = vec![vec![0u8; 1600]; 8];
        let mut sizes = vec![0usize; 8];
        let n = tun_rs::gso_split(&mut pkt, hdr, &mut segs, &mut sizes, 8, false).unwrap();
        assert_eq!(n, 3);
        let mut got = Vec::new();
        let first = addrs(&segs[0][8..8 + sizes[0]]);
        assert!([ip("10.18.0.3"), ip("10.18.0.66")].contains(&first.2) && first.3 == 80, "{first:?}");
        for (i, (seg, len)) in segs.iter().zip(&sizes).take(n).enumerate() {
            let p = &seg[8..8 + len];
            assert!(checksums_ok(p), "segment {i}");
            assert_eq!(addrs(p), first, "segment {i}");
            let seq = u32::from_be_bytes([p[24], p[25], p[26], p[27]]);
            assert_eq!(seq, 5000 + 1000 * i as u32);
            got.extend_from_slice(&p[40..]);
        }
        assert_eq!(got, payload);
        // a header that does not fit the packet is refused
        let mut bad = hdr;
        bad.csum_start = 4000;
        assert!(!crate::proxy::gso_header_fixup(&mut bad, &pkt));
    }

    /// RTTs of workers that stopped answering probes are forgotten; others are kept.
    #[test]
    fn silent_workers_lose_their_rtt() {
        let mut e = Engine::new(Arc::new(Counters::new()));
        let (quiet, busy): (SocketAddr, SocketAddr) =
            ("192.0.2.2:50103".parse().unwrap(), "192.0.2.3:50103".parse().unwrap());
        let t0 = Instant::now();
        e.record_rtt(quiet, 300, t0);
        e.record_rtt(busy, 500, t0 + Duration::from_secs(8));
        e.forget_silent(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(e.rtt.get(&quiet), None);
        assert_eq!(e.rtt.get(&busy), Some(&500));
    }

    #[test]
    fn round_robin_per_flow_both_directions() {
        let s = snap();
        let mut e = Engine::new(Arc::new(Counters::new()));
        let now = Instant::now();
        let mut seen = Vec::new();
        for sport in [1000u16, 1001, 1002, 1003] {
            let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
            let v = e.outbound(&mut pkt, &s, now);
            assert!(checksums_ok(&pkt));
            let (src, sp, dst, dp) = addrs(&pkt);
            assert_eq!(dp, 53);
            seen.push(dst);
            // the same flow sticks to the same instance
            let mut again = udp("10.18.0.2", "10.30.0.5", sport, 53);
            assert_eq!(e.outbound(&mut again, &s, now), v);
            assert_eq!(addrs(&again).2, dst);
            if dst == ip("10.18.0.66") {
                // remote: src unchanged, encapsulated; the reply comes back through the tunnel
                assert_eq!((src, sp), (ip("10.18.0.2"), sport));
                assert_eq!(v, Verdict::Encap("192.0.2.2:50103".parse().unwrap()));
                let mut reply = udp("10.18.0.66", "10.18.0.2", 53, sport);
                assert_eq!(e.inbound(&mut reply, &s, now), Verdict::ToTun);
                assert_eq!(addrs(&reply), (ip("10.30.0.5"), 53, ip("10.18.0.2"), sport));
                assert!(checksums_ok(&reply));
            } else {
                // local: hairpin through the service IP
                assert_eq!(dst, ip("10.18.0.3"));
                assert_eq!(src, ip("10.30.0.5"));
                assert_eq!(v, Verdict::ToTun);
                let mut reply = udp("10.18.0.3", "10.30.0.5", 53, sp);
                assert_eq!(e.outbound(&mut reply, &s, now), Verdict::ToTun);
                assert_eq!(addrs(&reply), (ip("10.30.0.5"), 53, ip("10.18.0.2"), sport));
                assert!(checksums_ok(&reply));
            }
        }
        assert_eq!(seen, vec![ip("10.18.0.3"), ip("10.18.0.66"), ip("10.18.0.3"), ip("10.18.0.66")]);
        assert_eq!(e.flows(), 4);
        e.evict(now + Duration::from_secs(61));
        assert_eq!(e.flows(), 0);
        assert_eq!(e.counters.count(Event::FlowsEvicted), 4);
    }

    #[test]
    fn conversions_survive_export_and_import() {
        let s = snap();
        let mut e = Engine::new(Arc::new(Counters::new()));
        let now = Instant::now();
        let mut chosen = Vec::new();
        for sport in [2000u16, 2001] {
            let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
            e.outbound(&mut pkt, &s, now);
            chosen.push(addrs(&pkt));
        }
        assert_ne!(chosen[0].2, chosen[1].2, "one local, one remote instance");
        let saved = e.export();
        let changes = e.changes();
        // a restarted proxy: its round-robin position is new, but the flows keep their instances
        let mut e2 = Engine::new(Arc::new(Counters::new()));
        assert_eq!(e2.import(&format!("{saved}garbage line\n1 2 3\n"), now), 2);
        for (sport, before) in [2000u16, 2001].into_iter().zip(&chosen) {
            let mut pkt = udp("10.18.0.2", "10.30.0.5", sport, 53);
            e2.outbound(&mut pkt, &s, now);
            assert_eq!(&addrs(&pkt), before, "flow {sport} keeps its instance and translation");
        }
        // replies are translated back as before
        let remote = chosen.iter().find(|c| c.2 == ip("10.18.0.66")).unwrap();
        let mut reply = udp("10.18.0.66", "10.18.0.2", 53, remote.1);
        assert_eq!(e2.inbound(&mut reply, &s, now), Verdict::ToTun);
        assert_eq!(addrs(&reply).0, ip("10.30.0.5"));
        assert!(e.changes() == changes && changes >= 2);
    }

    #[test]
    fn closest_and_unknown_and_removal() {
        let mut s = snap();
        let mut e = Engine::new(Arc::new(Counters::new()));
        let now = Instant::now();
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
        e.outbound(&mut pkt, &s, now);
        assert_eq!(addrs(&pkt).2, ip("10.18.0.3"), "closest = local");
        let mut pkt = udp("10.18.0.2", "10.30.0.9", 5, 53);
        assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Resolve(ip("10.30.0.9")));
        // the local instance goes away: the flow moves
        s.services.get_mut("s").unwrap().instances.remove(0);
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
        e.outbound(&mut pkt, &s, now);
        assert_eq!(addrs(&pkt).2, ip("10.18.0.66"));
        s.services.get_mut("s").unwrap().instances.clear();
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
        assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Drop(Reason::NoInstance));
        assert_eq!(e.counters.dropped(Reason::NoInstance), 1);
        // not for us
        let mut pkt = udp("10.18.0.66", "10.18.0.100", 5, 53);
        assert_eq!(e.inbound(&mut pkt, &s, now), Verdict::Drop(Reason::NotForThisNode));
        let mut pkt = udp("10.18.0.2", "172.16.0.1", 5, 53);
        assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Drop(Reason::NoRoute));
    }

    #[test]
    fn closest_by_measured_rtt() {
        let mut s = snap();
        let far: SocketAddr = "192.0.2.3:50103".parse().unwrap();
        s.routes.insert("10.18.0.128/26".parse().unwrap(), far);
        let svc = s.services.get_mut("s").unwrap();
        svc.instances.remove(0); // no local instance
        let mut far_inst = svc.instances[0].clone();
        far_inst.instance_number = 0;
        far_inst.ns_ip = ip("10.18.0.130");
        far_inst.worker = far;
        svc.instances.push(far_inst);
        let mut e = Engine::new(Arc::new(Counters::new()));
        let now = Instant::now();
        e.rtt.insert("192.0.2.2:50103".parse().unwrap(), 900);
        e.rtt.insert(far, 300);
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
        assert_eq!(e.outbound(&mut pkt, &s, now), Verdict::Encap(far));
        assert_eq!(addrs(&pkt).2, ip("10.18.0.130"));
        // the RTTs change: new flows follow, the existing one sticks
        e.rtt.insert(far, 5000);
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 6, 53);
        e.outbound(&mut pkt, &s, now);
        assert_eq!(addrs(&pkt).2, ip("10.18.0.66"));
        let mut pkt = udp("10.18.0.2", "10.30.0.6", 5, 53);
        e.outbound(&mut pkt, &s, now);
        assert_eq!(addrs(&pkt).2, ip("10.18.0.130"));
    }

    #[test]
    fn hairpin_port_collision() {
        let mut s = snap();
        s.services.get_mut("s").unwrap().instances.truncate(1);
        let mut e = Engine::new(Arc::new(Counters::new()));
        let now = Instant::now();
        let mut a = udp("10.18.0.2", "10.30.0.5", 7000, 53);
        let mut b = udp("10.18.0.4", "10.30.0.5", 7000, 53);
        e.outbound(&mut a, &s, now);
        e.outbound(&mut b, &s, now);
        let (pa, pb) = (addrs(&a).1, addrs(&b).1);
        assert_ne!(pa, pb);
        let mut rb = udp("10.18.0.3", "10.30.0.5", 53, pb);
        e.outbound(&mut rb, &s, now);
        assert_eq!(addrs(&rb), (ip("10.30.0.5"), 53, ip("10.18.0.4"), 7000));
    }

    /// Seeded fuzz: random and mutated packets never panic, and every dropped packet is counted once.
    #[test]
    fn fuzz_no_panic_and_counted() {
        let s = snap();
        let counters = Arc::new(Counters::new());
        let mut e = Engine::new(counters.clone());
        let now = Instant::now();
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let templates = [udp("10.18.0.2", "10.30.0.5", 1, 53), udp("10.18.0.66", "10.18.0.2", 53, 1), {
            let mut v = Vec::new();
            PacketBuilder::ipv4([10, 18, 0, 2], [10, 30, 0, 5], 64).tcp(5, 80, 1, 100).write(&mut v, b"abc").unwrap();
            v
        }];
        let (mut drops, mut resolves) = (0u64, 0u64);
        let mut gro = tun_rs::GROTable::new();
        let mut to_tun: Vec<Vec<u8>> = Vec::new();
        for round in 0..200_000u32 {
            let mut pkt: Vec<u8> = if round % 2 == 0 {
                let n = (rnd() % 80) as usize;
                (0..n).map(|_| rnd() as u8).collect()
            } else {
                let mut t = templates[(rnd() % 3) as usize].clone();
                for _ in 0..(rnd() % 4) {
                    let i = (rnd() as usize) % t.len();
                    t[i] = rnd() as u8;
                }
                if rnd() % 8 == 0 {
                    t.truncate((rnd() as usize) % t.len());
                }
                t
            };
            let v = if round % 3 == 0 {
                // a whole tunnel datagram
                let mut d = vec![packet::MAGIC, packet::VERSION, packet::TYPE_DATA, 0, 0, 0, 0, 0];
                if rnd() % 4 == 0 {
                    d[(rnd() % 8) as usize] = rnd() as u8;
                }
                d.extend_from_slice(&pkt);
                match packet::decode_tunnel(&d) {
                    Ok(packet::Tunnel::Data(inner)) => {
                        let mut inner = inner.to_vec();
                        e.inbound(&mut inner, &s, now)
                    }
                    Ok(_) => Verdict::ToTun,
                    Err(r) => {
                        counters.drop_packet(r);
                        Verdict::Drop(r)
                    }
                }
            } else {
                e.outbound(&mut pkt, &s, now)
            };
            if v == Verdict::ToTun && round % 3 != 0 {
                // what the datapath would queue for the tun: GRO coalescing must survive it too
                let mut b = vec![0u8; 16];
                b.extend_from_slice(&pkt);
                to_tun.push(b);
                if to_tun.len() == 16 {
                    let _ = gro.apply_gro(&mut to_tun, 16, rnd() % 2 == 0);
                    to_tun.clear();
                }
            }
            match v {
                Verdict::Drop(_) => drops += 1,
                Verdict::Resolve(_) => resolves += 1,
                _ => {}
            }
        }
        assert_eq!(counters.total_dropped(), drops, "every drop counted exactly once");
        assert!(drops > 100_000, "most random input is dropped: {drops}");
        let _ = resolves;
    }
}
