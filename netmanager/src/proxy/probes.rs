//! Worker RTT probes over the tunnel socket: a request to every other worker each probe interval; the
//! replies' RTTs go into the tables (`InstanceEndpoint::rtt_us`, which "closest" reads) and the counters.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use tokio::net::UdpSocket;

use super::counters::{Counters, Event};
use super::packet;
use crate::tables::{InstanceEndpoint, Snapshot, Tables};

/// The RTT of a probe stamped `stamp` answered at `now_ns` (both since the proxy's start), at least 1 µs.
pub fn rtt_us(stamp: u64, now_ns: u64) -> Option<u64> {
    (stamp <= now_ns).then(|| ((now_ns - stamp) / 1000).max(1))
}

/// One probe request to every worker the tables name except `public` (this one), ids from `seq`.
pub async fn send(udp: &UdpSocket, snap: &Snapshot, public: SocketAddr, seq: &mut u32, stamp: u64, c: &Counters) {
    let mut peers: BTreeSet<SocketAddr> = snap.routes.values().copied().collect();
    for s in snap.services.values() {
        peers.extend(s.instances.iter().map(|i| i.worker));
    }
    peers.remove(&public);
    for p in peers {
        *seq = seq.wrapping_add(1);
        if udp.send_to(&packet::probe(packet::TYPE_PROBE_REQUEST, *seq, stamp), p).await.is_ok() {
            c.event(Event::ProbesSent);
        }
    }
}

/// Publishes the measured RTTs in the counters and, where they changed, in the tables (an instance on
/// this worker: 0; a worker without a measurement: none).
pub fn publish(tables: &Tables, snap: &Snapshot, rtt: &HashMap<SocketAddr, u64>, c: &Counters) {
    c.set_rtts(rtt.iter().map(|(a, us)| (a.to_string(), *us)));
    let want = |i: &InstanceEndpoint| {
        if snap.is_local(i.ns_ip) {
            Some(0)
        } else {
            rtt.get(&i.worker).copied()
        }
    };
    let stale = snap.services.values().flat_map(|s| &s.instances).any(|i| i.rtt_us != want(i));
    if stale {
        tables.update(|s| {
            for i in s.services.values_mut().flat_map(|svc| &mut svc.instances) {
                i.rtt_us = want(i);
            }
        });
    }
}
