//! Latency constraints, as both schedulers check them: the SLA's `latency` constraints (an `area` where
//! the users are, Oakestra's S2U form) and `connectivity` latency constraints (a target service, the S2S
//! form) become [`pb::LatencyTarget`]s, each a set of workers' network coordinates
//! ([`oak_proto::vivaldi`]) and a round-trip threshold in ms.
//!
//! * A worker meets an area target when its coordinate predicts an RTT within the threshold to every
//!   worker of the area (users may sit at any of them), and a service target when it does so to at least
//!   one worker running the target (traffic to a closest service IP goes there).
//! * A cluster may meet a target when the lower bound its coordinate summary gives is within the
//!   threshold (the root's filter; the cluster then checks its workers one by one).
//!
//! Pure functions, no I/O. A failure says which constraint failed and by how much.

use oak_proto::v1 as pb;
use oak_proto::vivaldi::{self, Coord};

/// The target's kind for an area of users.
pub const AREA: &str = "area";
/// The target's kind for a service this one talks to.
pub const SERVICE: &str = "service";

/// When a placed instance misses a target without a `convergence_time`: this long before it moves.
pub const DEFAULT_CONVERGENCE_S: u64 = 30;

fn describe(t: &pb::LatencyTarget) -> String {
    if t.kind == SERVICE {
        format!("service '{}'", t.name)
    } else {
        format!("area '{}'", t.name)
    }
}

fn points(t: &pb::LatencyTarget) -> Vec<Coord> {
    t.points.iter().filter_map(|p| p.coordinate.as_ref().and_then(Coord::from_pb)).filter(Coord::is_settled).collect()
}

/// The RTT (µs) that counts from a worker at `from` to target `t`: the farthest point of an area, the
/// nearest of a service. None when no point of the target has a settled coordinate.
pub fn rtt_us(from: &Coord, t: &pb::LatencyTarget) -> Option<f64> {
    rtt_by(t, |p| from.distance(p))
}

fn rtt_by(t: &pb::LatencyTarget, f: impl Fn(&Coord) -> f64) -> Option<f64> {
    let d = points(t).iter().map(f).collect::<Vec<_>>();
    if t.kind == SERVICE {
        d.into_iter().reduce(f64::min)
    } else {
        d.into_iter().reduce(f64::max)
    }
}

fn over(rtt_us: f64, t: &pb::LatencyTarget, lead: &str) -> Option<String> {
    let ms = rtt_us / 1000.0;
    (ms > t.threshold_ms).then(|| {
        format!(
            "{lead} {ms:.1} ms from {}, latency threshold {} ms ({:.1} ms over)",
            describe(t),
            t.threshold_ms,
            ms - t.threshold_ms
        )
    })
}

fn unmeasured(t: &pb::LatencyTarget) -> String {
    if t.points.is_empty() {
        let what = if t.kind == SERVICE { "known service with a running instance" } else { "live worker or cluster" };
        return format!("cannot be checked against {}: it names no {what}", describe(t));
    }
    let named: Vec<&str> = t.points.iter().map(|p| p.node_name.as_str()).collect();
    format!("cannot be checked against {}: no settled network coordinate for its workers {named:?} yet", describe(t))
}

/// How a worker stands against a set of latency targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Within every threshold.
    Meets,
    /// Measured beyond a threshold: which one, and by how much.
    Over(String),
    /// Cannot be told yet (no settled coordinate here or at the target): why.
    Unknown(String),
}

/// How a worker with coordinate `coord` stands against `targets`.
pub fn check(coord: Option<&pb::NetCoordinate>, targets: &[pb::LatencyTarget]) -> Check {
    let here = coord.and_then(Coord::from_pb).filter(Coord::is_settled);
    for t in targets {
        let Some(here) = here else {
            return Check::Unknown(format!(
                "has no settled network coordinate yet for the latency constraint on {}",
                describe(t)
            ));
        };
        match rtt_us(&here, t) {
            None => return Check::Unknown(unmeasured(t)),
            Some(rtt) => {
                if let Some(why) = over(rtt, t, "is") {
                    return Check::Over(why);
                }
            }
        }
    }
    Check::Meets
}

/// Why a worker with coordinate `coord` cannot take an instance with `targets` (None: it meets them all).
pub fn worker_misfit(coord: Option<&pb::NetCoordinate>, targets: &[pb::LatencyTarget]) -> Option<String> {
    match check(coord, targets) {
        Check::Meets => None,
        Check::Over(why) | Check::Unknown(why) => Some(why),
    }
}

/// Why no worker of a cluster with this aggregate can meet one of `targets` (None: some may).
pub fn cluster_misfit(a: &pb::ClusterAggregate, targets: &[pb::LatencyTarget]) -> Option<String> {
    if targets.is_empty() {
        return None;
    }
    let Some(centre) = a.coordinate.as_ref().and_then(Coord::from_pb) else {
        return Some("has no worker with a settled network coordinate for the latency constraints".into());
    };
    for t in targets {
        match rtt_by(t, |p| vivaldi::lower_bound_us(&centre, a.coordinate_radius_us, p)) {
            None => return Some(unmeasured(t)),
            Some(rtt) => {
                if let Some(why) = over(rtt, t, "is at least") {
                    return Some(why);
                }
            }
        }
    }
    None
}

/// The settled coordinates among `workers` in one, for the cluster's aggregate.
pub fn summary<'a>(workers: impl Iterator<Item = &'a pb::NodeResources>) -> (Option<pb::NetCoordinate>, f64) {
    let coords: Vec<Coord> = workers
        .filter_map(|r| r.network.as_ref()?.coordinate.as_ref().and_then(Coord::from_pb))
        .filter(Coord::is_settled)
        .collect();
    match vivaldi::summarize(&coords) {
        Some((c, radius)) => (Some(c.to_pb()), radius),
        None => (None, 0.0),
    }
}

/// How long an instance may miss `targets` before it moves: the longest `convergence_time` among them.
pub fn convergence(targets: &[pb::LatencyTarget]) -> std::time::Duration {
    let s = targets.iter().map(|t| t.convergence_time_s).max().unwrap_or(0);
    std::time::Duration::from_secs(if s == 0 { DEFAULT_CONVERGENCE_S } else { s })
}

/// Replaces the coordinates of `targets`' points with fresher ones where `fresh` knows the worker by name.
pub fn refresh(targets: &mut [pb::LatencyTarget], fresh: impl Fn(&str) -> Option<pb::NetCoordinate>) {
    for p in targets.iter_mut().flat_map(|t| t.points.iter_mut()) {
        if let Some(c) = fresh(&p.node_name) {
            p.coordinate = Some(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f64, y: f64) -> pb::NetCoordinate {
        pb::NetCoordinate { position: vec![x, y], height: 50.0, error: 0.1 }
    }
    fn target(kind: &str, threshold_ms: f64, pts: &[(f64, f64)]) -> pb::LatencyTarget {
        pb::LatencyTarget {
            kind: kind.into(),
            name: "u".into(),
            threshold_ms,
            points: pts
                .iter()
                .enumerate()
                .map(|(i, (x, y))| pb::LatencyPoint { node_name: format!("w{i}"), coordinate: Some(at(*x, *y)) })
                .collect(),
            convergence_time_s: 0,
        }
    }

    #[test]
    fn an_area_counts_its_farthest_worker_a_service_its_nearest() {
        // points 1 ms and 20 ms away (plus 0.1 ms of heights)
        let pts = [(900.0, 0.0), (19_900.0, 0.0)];
        let here = Some(at(0.0, 0.0));
        let why = worker_misfit(here.as_ref(), &[target(AREA, 10.0, &pts)]).unwrap();
        assert!(why.contains("20.0 ms from area 'u', latency threshold 10 ms (10.0 ms over)"), "{why}");
        assert_eq!(worker_misfit(here.as_ref(), &[target(SERVICE, 10.0, &pts)]), None);
        assert_eq!(worker_misfit(here.as_ref(), &[]), None);
    }

    #[test]
    fn unsettled_or_missing_coordinates_are_named() {
        let t = target(AREA, 10.0, &[(0.0, 0.0)]);
        let fresh = pb::NetCoordinate { error: 1.0, ..at(0.0, 0.0) };
        assert!(worker_misfit(Some(&fresh), std::slice::from_ref(&t))
            .unwrap()
            .contains("no settled network coordinate yet"));
        assert!(matches!(check(None, std::slice::from_ref(&t)), Check::Unknown(_)));
        let mut t2 = t.clone();
        t2.points[0].coordinate = None;
        let why = worker_misfit(Some(&at(0.0, 0.0)), &[t2]).unwrap();
        assert!(why.contains("no settled network coordinate for its workers [\"w0\"]"), "{why}");
        let nowhere = pb::LatencyTarget { points: vec![], ..t };
        let why = worker_misfit(Some(&at(0.0, 0.0)), &[nowhere]).unwrap();
        assert!(why.contains("area 'u': it names no live worker or cluster"), "{why}");
    }

    #[test]
    fn clusters_are_filtered_by_their_summary_without_excluding_a_member_that_fits() {
        let members: Vec<pb::NodeResources> = [(0.0, 0.0), (30_000.0, 0.0)]
            .iter()
            .map(|(x, y)| pb::NodeResources {
                network: Some(pb::WorkerNetwork { coordinate: Some(at(*x, *y)), ..Default::default() }),
                ..Default::default()
            })
            .collect();
        let (coordinate, coordinate_radius_us) = summary(members.iter());
        let a = pb::ClusterAggregate { coordinate, coordinate_radius_us, ..Default::default() };
        // a user next to the second member: the cluster may meet 5 ms
        assert_eq!(cluster_misfit(&a, &[target(AREA, 5.0, &[(30_500.0, 0.0)])]), None);
        // a user 100 ms from both: it cannot
        let why = cluster_misfit(&a, &[target(AREA, 5.0, &[(15_000.0, 100_000.0)])]).unwrap();
        assert!(why.starts_with("is at least ") && why.contains("ms over"), "{why}");
        let none = pb::ClusterAggregate::default();
        assert!(cluster_misfit(&none, &[target(AREA, 5.0, &[(0.0, 0.0)])]).is_some());
    }

    #[test]
    fn refresh_takes_fresher_coordinates_by_name_and_convergence_defaults() {
        let mut ts = vec![target(AREA, 10.0, &[(0.0, 0.0), (1.0, 1.0)])];
        refresh(&mut ts, |n| (n == "w1").then(|| at(7.0, 7.0)));
        assert_eq!(ts[0].points[0].coordinate, Some(at(0.0, 0.0)));
        assert_eq!(ts[0].points[1].coordinate, Some(at(7.0, 7.0)));
        assert_eq!(convergence(&ts).as_secs(), DEFAULT_CONVERGENCE_S);
        ts[0].convergence_time_s = 4;
        assert_eq!(convergence(&ts).as_secs(), 4);
    }
}
