//! Worker RTT probes over the tunnel socket: a request to every other worker each probe interval. Each
//! reply gives an RTT sample and the replier's Vivaldi coordinate, kept per peer in [`Peers`], which turns
//! them into the RTT estimates "closest" ranks by ([`crate::select::rtt_estimate_us`]). Both datapaths read
//! the same estimates: the tun engine from [`Peers`] directly, the eBPF map plan from the tables
//! (`InstanceEndpoint::rtt_us`), which [`publish`] keeps equal to them.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use oak_proto::vivaldi::Coord;
use tokio::net::UdpSocket;

use super::counters::{Counters, Event};
use super::packet;
use crate::select;
use crate::tables::{InstanceEndpoint, Snapshot, Tables};

/// A published estimate gives way to a new one only when they differ by more than this divisor's share of
/// the published one ...
const CHANGE_SHARE_DIVISOR: u64 = 10;
/// ... and by more than this many µs (below it, jitter on a LAN). See [`moved`].
const CHANGE_FLOOR_US: u64 = 100;

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

/// What one peer endpoint's probe replies said.
#[derive(Clone, Debug)]
struct Peer {
    /// The last measured RTT (µs).
    sample_us: u64,
    /// The latest sane coordinate it sent (kept when a reply carries none or a broken one).
    coord: Option<Coord>,
    /// When it last answered.
    replied: Instant,
}

/// The probe replies per peer endpoint and the RTT estimates published from them: "closest" reads
/// [`Peers::rtt_us`], in the tun engine directly and in the eBPF plan through the tables.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    peers: HashMap<SocketAddr, Peer>,
    /// The published estimate per endpoint: [`select::rtt_estimate_us`], replaced only when it [`moved`].
    published: HashMap<SocketAddr, u64>,
}

/// Whether the published estimate `old` gives way to `new`. Predictions move a little with every sample
/// (this worker's own coordinate moves on each reply), and each change rewrites the tables and reloads the
/// eBPF maps; a change within a small share of the estimate (or within LAN jitter) cannot tell two workers
/// apart that are meaningfully apart, so it is not published: a "closest" pick is then off by at most that
/// margin, and it does not flap between two workers that are about equally near. Appearing and vanishing
/// always count.
fn moved(old: Option<u64>, new: Option<u64>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => o.abs_diff(n) > (o / CHANGE_SHARE_DIVISOR).max(CHANGE_FLOOR_US),
        (o, n) => o != n,
    }
}

impl Peers {
    /// A probe reply from `from`: its RTT and, when it sent a sane one, its coordinate. `own` is this
    /// worker's coordinate after taking the reply into account; this peer's estimate is published at once
    /// (when it moved), so the tun path uses a new worker's first sample without waiting for a probe round.
    pub fn record(&mut self, from: SocketAddr, sample_us: u64, coord: Option<Coord>, own: &Coord, now: Instant) {
        let coord = coord.filter(Coord::is_sane).or_else(|| self.peers.get(&from).and_then(|p| p.coord));
        self.peers.insert(from, Peer { sample_us, coord, replied: now });
        self.settle_one(from, own);
    }

    /// Forgets the peers whose last reply is older than `max_age` (their estimates go with them).
    pub fn forget_silent(&mut self, now: Instant, max_age: Duration) {
        self.peers.retain(|_, p| now.duration_since(p.replied) <= max_age);
        let peers = &self.peers;
        self.published.retain(|a, _| peers.contains_key(a));
    }

    /// Publishes every peer's estimate that [`moved`] (this worker's coordinate `own` moved since).
    pub fn settle(&mut self, own: &Coord) {
        let endpoints: Vec<SocketAddr> = self.peers.keys().copied().collect();
        for a in endpoints {
            self.settle_one(a, own);
        }
    }

    fn settle_one(&mut self, a: SocketAddr, own: &Coord) {
        let new = self.estimate(a, own);
        if moved(self.published.get(&a).copied(), new) {
            match new {
                Some(us) => self.published.insert(a, us),
                None => self.published.remove(&a),
            };
        }
    }

    /// The current (unpublished) estimate to `a`.
    fn estimate(&self, a: SocketAddr, own: &Coord) -> Option<u64> {
        let p = self.peers.get(&a);
        select::rtt_estimate_us(own, p.and_then(|p| p.coord.as_ref()), p.map(|p| p.sample_us))
    }

    /// The published RTT estimate to the worker at `endpoint` (µs; None: unmeasured): what "closest" ranks by.
    pub fn rtt_us(&self, endpoint: &SocketAddr) -> Option<u64> {
        self.published.get(endpoint).copied()
    }

    /// The last measured RTT to `endpoint` (µs).
    #[cfg(test)]
    fn sample_us(&self, endpoint: &SocketAddr) -> Option<u64> {
        self.peers.get(endpoint).map(|p| p.sample_us)
    }

    /// The RTT the coordinates predict to every peer that sent one, however confident (µs, at least 1).
    pub fn predicted(&self, own: &Coord) -> impl Iterator<Item = (SocketAddr, u64)> + '_ {
        let own = *own;
        self.peers.iter().filter_map(move |(a, p)| p.coord.map(|c| (*a, own.distance(&c).round().max(1.0) as u64)))
    }
}

/// Publishes the peers' RTTs in the counters (measured, predicted, the estimates) and the estimates in the
/// tables where they differ (an instance on this worker: 0; a worker without one: none). Since estimates
/// are only republished when they [`moved`], the tables are rewritten only then (or after the control plane
/// rewrote an entry without them).
pub fn publish(tables: &Tables, snap: &Snapshot, peers: &Peers, own: &Coord, c: &Counters) {
    c.set_peer_rtts(
        peers.peers.iter().map(|(a, p)| (a.to_string(), p.sample_us)),
        peers.predicted(own).map(|(a, us)| (a.to_string(), us)),
        peers.published.iter().map(|(a, us)| (a.to_string(), *us)),
    );
    let want = |i: &InstanceEndpoint| if snap.is_local(i.ns_ip) { Some(0) } else { peers.rtt_us(&i.worker) };
    let stale = snap.services.values().flat_map(|s| &s.instances).any(|i| i.rtt_us != want(i));
    if stale {
        tables.update(|s| {
            for i in s.services.values_mut().flat_map(|svc| &mut svc.instances) {
                i.rtt_us = want(i);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::ServiceEntry;

    const NEAR: &str = "192.0.2.2:50103";
    const FAR: &str = "192.0.2.3:50103";

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn coord(x: f64, error: f64) -> Coord {
        Coord { pos: [x, 0.0], height: 10.0, error }
    }

    /// A service with one instance on worker NEAR and one on FAR, the FAR one first in instance order.
    fn tables() -> Tables {
        let t = Tables::new();
        t.set_local_subnet("10.18.0.0/26".parse().unwrap());
        let inst = |n, ip: &str, w: &str| InstanceEndpoint {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            instance_number: n,
            ns_ip: ip.parse().unwrap(),
            worker: ep(w),
            rtt_us: None,
        };
        t.upsert_service(ServiceEntry {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            rr_ip: None,
            closest_ip: Some("10.30.0.6".parse().unwrap()),
            instances: vec![inst(0, "10.18.0.130", FAR), inst(1, "10.18.0.66", NEAR)],
        });
        t
    }

    /// The instance the tables' estimates make closest (what the eBPF plan computes).
    fn closest_in(t: &Tables) -> String {
        let snap = t.snapshot();
        let ordered = select::in_order(&snap.services["s"].instances);
        let k = select::closest(&snap, &ordered, |i| i.rtt_us).unwrap();
        ordered[k].ns_ip.to_string()
    }

    fn rtts(t: &Tables) -> Vec<Option<u64>> {
        t.snapshot().services["s"].instances.iter().map(|i| i.rtt_us).collect()
    }

    /// The coordinates put NEAR nearer; the last raw sample of NEAR is a noisy outlier that says otherwise.
    /// Closest follows the coordinates, in the tables (eBPF plan) and in what the tun engine reads.
    #[test]
    fn a_noisy_sample_does_not_flip_closest_when_the_coordinates_are_confident() {
        let t = tables();
        let own = coord(0.0, 0.1);
        let now = Instant::now();
        let mut peers = Peers::default();
        peers.record(ep(NEAR), 900, Some(coord(1000.0, 0.1)), &own, now);
        peers.record(ep(FAR), 3100, Some(coord(3000.0, 0.1)), &own, now);
        // one sample to NEAR caught a queue
        peers.record(ep(NEAR), 8000, Some(coord(1000.0, 0.1)), &own, now);
        publish(&t, &t.snapshot(), &peers, &own, &Counters::new());
        assert_eq!(rtts(&t), [Some(3020), Some(1020)]);
        assert_eq!(closest_in(&t), "10.18.0.66");
        assert_eq!((peers.rtt_us(&ep(NEAR)), peers.sample_us(&ep(NEAR))), (Some(1020), Some(8000)));
        // without confident coordinates the sample decides (and a reply without a coordinate keeps the last)
        let unsure = coord(0.0, 0.9);
        peers.record(ep(NEAR), 8000, None, &unsure, now);
        peers.settle(&unsure);
        publish(&t, &t.snapshot(), &peers, &unsure, &Counters::new());
        // (FAR's sample is within the margin of its published prediction: kept)
        assert_eq!(rtts(&t), [Some(3020), Some(8000)]);
        assert_eq!(closest_in(&t), "10.18.0.130");
        // the counters show the samples, the predictions (from the kept coordinates) and the estimates
        let c = Counters::new();
        publish(&t, &t.snapshot(), &peers, &own, &c);
        let j = c.to_json();
        assert_eq!(j["rtt_us"][NEAR], 8000);
        assert_eq!(j["rtt_predicted_us"][NEAR], 1020);
        assert_eq!(j["rtt_predicted_us"][FAR], 3020);
        assert_eq!(j["rtt_closest_us"][NEAR], 8000);
    }

    /// Small moves of an estimate are not published (no table rewrite, no eBPF reload); larger ones are,
    /// and so are a worker's first estimate and its loss.
    #[test]
    fn tiny_changes_do_not_rewrite_the_tables() {
        let t = tables();
        let own = Coord::default(); // unsure: the samples are the estimates
        let t0 = Instant::now();
        let mut peers = Peers::default();
        let c = Counters::new();
        let generation = |t: &Tables| t.snapshot().generation;
        peers.record(ep(NEAR), 2000, None, &own, t0);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!(rtts(&t), [None, Some(2000)]);
        let g = generation(&t);
        // within both the share and the floor, then within the share only: kept
        peers.record(ep(NEAR), 2090, None, &own, t0);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        peers.record(ep(NEAR), 1850, None, &own, t0);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!((generation(&t), rtts(&t)), (g, vec![None, Some(2000)]));
        // beyond both: published
        peers.record(ep(NEAR), 2300, None, &own, t0);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!(rtts(&t), [None, Some(2300)]);
        assert_eq!(generation(&t), g + 1);
        // small RTTs: the floor keeps LAN jitter out, even when it is a large share
        peers.record(ep(FAR), 150, None, &own, t0);
        peers.record(ep(FAR), 240, None, &own, t0);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!(rtts(&t), [Some(150), Some(2300)]);
        // a silent worker loses its estimate
        peers.record(ep(FAR), 160, None, &own, t0 + Duration::from_secs(8));
        peers.forget_silent(t0 + Duration::from_secs(11), Duration::from_secs(10));
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!(rtts(&t), [Some(150), None]);
        assert_eq!(peers.sample_us(&ep(NEAR)), None);
        // nothing moved: no rewrite
        let g = generation(&t);
        publish(&t, &t.snapshot(), &peers, &own, &c);
        assert_eq!(generation(&t), g);
    }

    #[test]
    fn moved_rule() {
        assert!(!moved(Some(2000), Some(2100)));
        assert!(!moved(Some(2000), Some(1800)));
        assert!(moved(Some(2000), Some(2201)));
        assert!(!moved(Some(50), Some(140)));
        assert!(moved(Some(50), Some(151)));
        assert!(moved(None, Some(5)) && moved(Some(5), None) && !moved(None, None));
    }
}
