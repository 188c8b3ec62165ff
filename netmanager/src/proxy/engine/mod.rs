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
use super::probes::Peers;
use crate::select;
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
    /// The workers' probe replies and the RTT estimates "closest" ranks by (the ones the tables get too).
    pub peers: Peers,
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
            peers: Peers::default(),
            counters,
            idle: FLOW_IDLE,
            next_port: 0,
            changes: 0,
        }
    }

    /// Conversions in the table.
    #[cfg(test)]
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

    /// Pick an instance for a new flow, by the rule in [`crate::select`]. Closest ranks by the published
    /// estimates in [`Peers`], the values [`super::probes::publish`] copies into the tables for the eBPF
    /// plan; read here directly, they also hold for an entry the control plane just (re)wrote, before the
    /// next probe round fills its RTTs in.
    fn pick<'a>(
        &mut self,
        snap: &Snapshot,
        service_id: &str,
        kind: AddressKind,
        instances: &'a [InstanceEndpoint],
    ) -> Option<&'a InstanceEndpoint> {
        let ordered = select::in_order(instances);
        let k = match kind {
            AddressKind::RoundRobin => {
                let c = self.rr.entry(service_id.to_string()).or_insert(0);
                let k = select::round_robin(ordered.len(), *c)?;
                *c = c.wrapping_add(1);
                k
            }
            AddressKind::Closest => select::closest(snap, &ordered, |i| self.peers.rtt_us(&i.worker))?,
        };
        Some(ordered[k])
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

    /// The inner packet of a tunnel datagram. Counts drops itself. `csum_complete`: the sender flagged the
    /// inner checksum as complete (`FLAG_CSUM_COMPLETE`), so it is not summed again here.
    pub fn inbound(&mut self, pkt: &mut [u8], snap: &Snapshot, now: Instant, csum_complete: bool) -> Verdict {
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
mod tests;
