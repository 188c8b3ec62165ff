//! The instance-selection rule both datapaths follow for a new flow to a service IP: the tun path's
//! [`crate::proxy::engine::Engine`] applies it per flow, the eBPF fast path's map plan
//! ([`crate::ebpf`]) precomputes it for the kernel (the backends in [`in_order`], the closest index).
//!
//! * Order: instances by instance number, then by overlay address.
//! * Round-robin: the next position of a per-service counter in that order.
//! * Closest: the lowest round-trip time to the instance's worker as [`rtt_estimate_us`] gives it (the
//!   Vivaldi coordinates' prediction, the ones placement uses, falling back to the last measured sample),
//!   an instance on this worker counting as 0 and an unmeasured one last. Ties go to an instance on this
//!   worker (no tunnel to cross), then to the earlier one in the order.

use oak_proto::vivaldi::Coord;

use crate::tables::{InstanceEndpoint, Snapshot};

/// Below this error estimate a coordinate is trusted to predict RTTs: the bound placement uses too
/// ([`oak_proto::vivaldi::SETTLED_ERROR`]), so "closest" and latency constraints agree on what is known.
/// A prediction of that quality ranks workers that are clearly apart right, which a single noisy sample
/// (a queue, a scheduling delay) may not; above it, the measured sample is the better guess.
pub const CONFIDENT_ERROR: f64 = oak_proto::vivaldi::SETTLED_ERROR;

/// The RTT estimate (µs) to a peer worker that "closest" ranks by: the distance between this worker's
/// coordinate (`own`) and the peer's when both are confident ([`CONFIDENT_ERROR`]), rounded, at least 1;
/// otherwise the last measured sample; None when neither is known. (An instance on this worker counts 0
/// whatever this says: see [`closest`].)
pub fn rtt_estimate_us(own: &Coord, peer: Option<&Coord>, measured: Option<u64>) -> Option<u64> {
    let confident = |c: &Coord| c.is_sane() && c.is_settled();
    match peer {
        Some(p) if confident(own) && confident(p) => Some(own.distance(p).round().max(1.0) as u64),
        _ => measured,
    }
}

/// An unmeasured RTT: behind every measured one, and still summable without overflow.
const UNMEASURED_US: u64 = u64::MAX / 2;

/// The instances in balancing order.
pub fn in_order(instances: &[InstanceEndpoint]) -> Vec<&InstanceEndpoint> {
    let mut sorted: Vec<&InstanceEndpoint> = instances.iter().collect();
    sorted.sort_by_key(|i| (i.instance_number, u32::from(i.ns_ip)));
    sorted
}

/// Round-robin: the index in `len` ordered instances for counter position `pos` (None without instances).
pub fn round_robin(len: usize, pos: u64) -> Option<usize> {
    (len > 0).then(|| (pos % len as u64) as usize)
}

/// Closest: the index in `ordered` of the instance to pick, with `rtt_us` the RTT estimate to an
/// instance's worker ([`rtt_estimate_us`]; None: unmeasured). None without instances.
pub fn closest(
    snap: &Snapshot,
    ordered: &[&InstanceEndpoint],
    rtt_us: impl Fn(&InstanceEndpoint) -> Option<u64>,
) -> Option<usize> {
    ordered
        .iter()
        .enumerate()
        .min_by_key(|(k, i)| {
            let local = snap.is_local(i.ns_ip);
            let rtt = if local { 0 } else { rtt_us(i).unwrap_or(UNMEASURED_US) };
            (rtt, !local, *k)
        })
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(n: u32, ip: &str, rtt: Option<u64>) -> InstanceEndpoint {
        InstanceEndpoint {
            service_id: "s".into(),
            job_name: "a.b.c.d".into(),
            instance_number: n,
            ns_ip: ip.parse().unwrap(),
            worker: "192.0.2.2:50103".parse().unwrap(),
            rtt_us: rtt,
        }
    }

    #[test]
    fn order_round_robin_and_closest_with_its_tie_breaks() {
        let snap = Snapshot { local_subnet: Some("10.18.0.0/26".parse().unwrap()), ..Default::default() };
        // out of order on purpose: instance number first, then address
        let all = vec![
            inst(2, "10.18.0.70", Some(500)),
            inst(1, "10.18.0.66", Some(500)),
            inst(1, "10.18.0.65", None),
            inst(3, "10.18.0.71", Some(900)),
        ];
        let ordered = in_order(&all);
        let ips: Vec<String> = ordered.iter().map(|i| i.ns_ip.to_string()).collect();
        assert_eq!(ips, ["10.18.0.65", "10.18.0.66", "10.18.0.70", "10.18.0.71"]);
        let rr: Vec<Option<usize>> = (0..5).map(|pos| round_robin(ordered.len(), pos)).collect();
        assert_eq!(rr, [Some(0), Some(1), Some(2), Some(3), Some(0)]);
        assert_eq!(round_robin(0, 7), None);
        // equal RTTs: the earlier in the order; unmeasured loses
        let rtt = |i: &InstanceEndpoint| i.rtt_us;
        assert_eq!(closest(&snap, &ordered, rtt), Some(1));
        // an instance on this worker is RTT 0 and wins a tie with a remote one measured at 0
        let mut all = all;
        all.push(inst(4, "10.18.0.9", None));
        all[0].rtt_us = Some(0);
        let ordered = in_order(&all);
        assert_eq!(ordered[closest(&snap, &ordered, rtt).unwrap()].ns_ip.to_string(), "10.18.0.9");
        assert_eq!(closest(&snap, &[], rtt), None);
    }

    fn coord(x: f64, error: f64) -> Coord {
        Coord { pos: [x, 0.0], height: 10.0, error }
    }

    #[test]
    fn estimate_is_the_prediction_when_both_are_confident_else_the_sample() {
        let own = coord(0.0, 0.2);
        // both confident: the distance (plus both heights), whatever the sample said
        assert_eq!(rtt_estimate_us(&own, Some(&coord(980.4, 0.3)), Some(5000)), Some(1000));
        assert_eq!(rtt_estimate_us(&own, Some(&coord(980.4, 0.3)), None), Some(1000));
        // either unsure, or no coordinate from the peer: the measured sample
        assert_eq!(rtt_estimate_us(&own, Some(&coord(980.0, CONFIDENT_ERROR)), Some(5000)), Some(5000));
        assert_eq!(rtt_estimate_us(&coord(0.0, 0.9), Some(&coord(980.0, 0.3)), Some(5000)), Some(5000));
        assert_eq!(rtt_estimate_us(&own, None, Some(5000)), Some(5000));
        assert_eq!(rtt_estimate_us(&Coord::default(), Some(&Coord::default()), Some(7)), Some(7));
        // nothing known: unmeasured
        assert_eq!(rtt_estimate_us(&own, None, None), None);
        assert_eq!(rtt_estimate_us(&own, Some(&coord(980.0, 0.9)), None), None);
        // a prediction is never 0 (that is an instance on this worker)
        let tiny = Coord { pos: [0.0, 0.0], height: 0.1, error: 0.1 };
        assert_eq!(rtt_estimate_us(&tiny, Some(&tiny), None), Some(1));
    }
}
