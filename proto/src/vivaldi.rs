//! Vivaldi network coordinates (Dabek et al., SIGCOMM 2004): each worker places itself in a small
//! Euclidean space plus a "height" (its access link), so that the distance between two workers'
//! coordinates predicts the round-trip time between them. Every RTT a worker measures to a peer, with the
//! peer's coordinate and error, moves its own coordinate a little; the step shrinks as both become
//! confident. Units are microseconds.

use serde::{Deserialize, Serialize};

/// Dimensions of the Euclidean part.
pub const DIMS: usize = 2;
/// How fast a node's error estimate follows new samples.
const CE: f64 = 0.25;
/// How far one sample moves a node (scaled by relative confidence).
const CC: f64 = 0.25;
/// The lowest height: a node is never "at" the core.
const MIN_HEIGHT: f64 = 10.0;
/// The error estimate a new node starts with (1.0 = 100 %).
const START_ERROR: f64 = 1.0;
/// Error estimates stay above this, so a settled node still follows a changed network.
const MIN_ERROR: f64 = 0.01;

/// A node's coordinate: its position, height and how wrong it believes its predictions are.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    pub pos: [f64; DIMS],
    pub height: f64,
    /// Relative error of its predictions, 0..=1 (1: knows nothing yet).
    pub error: f64,
}

impl Default for Coord {
    fn default() -> Self {
        Self { pos: [0.0; DIMS], height: MIN_HEIGHT, error: START_ERROR }
    }
}

impl Coord {
    /// The RTT (µs) this coordinate predicts to `other`.
    pub fn distance(&self, other: &Coord) -> f64 {
        let d: f64 = self.pos.iter().zip(other.pos).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        d + self.height + other.height
    }

    /// Takes one measurement into account: `rtt_us` to a node at `remote`. `jitter` breaks the tie of two
    /// nodes at the same place (a direction to move apart in); any value in 0..1 works.
    pub fn update(&mut self, remote: &Coord, rtt_us: f64, jitter: f64) {
        if !(rtt_us.is_finite() && rtt_us > 0.0 && remote.is_sane()) {
            return;
        }
        let predicted = self.distance(remote);
        let w = self.error / (self.error + remote.error).max(f64::MIN_POSITIVE);
        let sample_error = (predicted - rtt_us).abs() / rtt_us;
        self.error = (sample_error * CE * w + self.error * (1.0 - CE * w)).clamp(MIN_ERROR, START_ERROR);
        let step = CC * w * (rtt_us - predicted);
        // move along the unit vector from the remote to this node, over position and height; nodes at the
        // same place part in a pseudo-random direction (`jitter`)
        let diff: Vec<f64> = self.pos.iter().zip(remote.pos).map(|(a, b)| a - b).collect();
        let planar = diff.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mag = planar + self.height + remote.height;
        if planar < 1e-6 {
            let angle = jitter * std::f64::consts::TAU;
            self.pos[0] += step * angle.cos();
            self.pos[1] += step * angle.sin();
        } else {
            for (p, d) in self.pos.iter_mut().zip(&diff) {
                *p += step * d / mag;
            }
        }
        self.height = (self.height + step * (self.height + remote.height) / mag).max(MIN_HEIGHT);
        if !self.is_sane() {
            *self = Coord::default();
        }
    }

    /// Every field finite and in range (what arrives from a peer is checked with this).
    pub fn is_sane(&self) -> bool {
        self.pos.iter().all(|p| p.is_finite() && p.abs() < 1e9)
            && self.height.is_finite()
            && (0.0..1e9).contains(&self.height)
            && (0.0..=START_ERROR).contains(&self.error)
    }

    /// The coordinate as four numbers (position, height, error), for the wire.
    pub fn to_array(&self) -> [f64; DIMS + 2] {
        [self.pos[0], self.pos[1], self.height, self.error]
    }

    /// From [`Coord::to_array`]'s numbers; `None` when they are not a sane coordinate.
    pub fn from_array(a: [f64; DIMS + 2]) -> Option<Self> {
        let c = Coord { pos: [a[0], a[1]], height: a[2], error: a[3] };
        c.is_sane().then_some(c)
    }
}

/// A coordinate this settled or better predicts well enough to place instances by (a relative error
/// estimate under a half: a fresh node starts at 1 and gets there within a few probe rounds).
pub const SETTLED_ERROR: f64 = 0.5;

impl Coord {
    /// Settled enough to place instances by ([`SETTLED_ERROR`]).
    pub fn is_settled(&self) -> bool {
        self.error < SETTLED_ERROR
    }

    /// The wire form (`oak.v1.NetCoordinate`).
    pub fn to_pb(&self) -> crate::v1::NetCoordinate {
        crate::v1::NetCoordinate { position: self.pos.to_vec(), height: self.height, error: self.error }
    }

    /// From the wire form; `None` when it is not a sane coordinate of [`DIMS`] dimensions.
    pub fn from_pb(c: &crate::v1::NetCoordinate) -> Option<Self> {
        let pos: [f64; DIMS] = c.position.as_slice().try_into().ok()?;
        Self::from_array([pos[0], pos[1], c.height, c.error])
    }
}

/// Many coordinates in one (a cluster's workers, for the root): the centroid of the positions with the
/// lowest height and the highest error, and the radius (µs) of the smallest circle around the centroid
/// that holds every position. From any of them to a point `p`, the RTT is at least
/// `summary.distance(p) - radius` ([`lower_bound_us`]). `None` without coordinates.
pub fn summarize(coords: &[Coord]) -> Option<(Coord, f64)> {
    if coords.is_empty() {
        return None;
    }
    let n = coords.len() as f64;
    let mut pos = [0.0; DIMS];
    for c in coords {
        for (p, x) in pos.iter_mut().zip(c.pos) {
            *p += x / n;
        }
    }
    let height = coords.iter().map(|c| c.height).fold(f64::INFINITY, f64::min);
    let error = coords.iter().map(|c| c.error).fold(0.0, f64::max);
    let centre = Coord { pos, height, error };
    let planar = |c: &Coord| c.pos.iter().zip(pos).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let radius = coords.iter().map(planar).fold(0.0, f64::max);
    Some((centre, radius))
}

/// The least RTT (µs) any coordinate of a [`summarize`]d set can predict to `p`.
pub fn lower_bound_us(summary: &Coord, radius_us: f64, p: &Coord) -> f64 {
    let heights = summary.height + p.height;
    (summary.distance(p) - radius_us).max(heights)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound a summary gives is never above the RTT any member predicts, and is tight for the member
    /// nearest the point.
    #[test]
    fn a_summary_bounds_its_members_from_below() {
        let members = [
            Coord { pos: [0.0, 0.0], height: 50.0, error: 0.1 },
            Coord { pos: [400.0, 300.0], height: 20.0, error: 0.2 },
            Coord { pos: [-100.0, 900.0], height: 80.0, error: 0.3 },
        ];
        let (s, r) = summarize(&members).unwrap();
        assert_eq!((s.height, s.error), (20.0, 0.3));
        for p in [Coord { pos: [5000.0, 0.0], height: 10.0, error: 0.1 }, Coord { pos: [100.0, 100.0], ..members[0] }] {
            let lb = lower_bound_us(&s, r, &p);
            let best = members.iter().map(|m| m.distance(&p)).fold(f64::INFINITY, f64::min);
            assert!(lb <= best + 1e-9, "bound {lb} above the nearest member's {best}");
        }
        assert!(summarize(&[]).is_none());
        let back = Coord::from_pb(&members[1].to_pb()).unwrap();
        assert_eq!(back, members[1]);
        assert!(Coord::from_pb(&crate::v1::NetCoordinate { position: vec![1.0], height: 10.0, error: 0.1 }).is_none());
    }

    /// Four nodes whose RTTs come from points in a plane plus access links: after some rounds of samples
    /// every predicted RTT is within 25 % of the true one, most within 10 %.
    #[test]
    fn coordinates_converge_on_a_metric_space() {
        let truth: [(f64, f64, f64); 4] =
            [(0.0, 0.0, 100.0), (3000.0, 0.0, 200.0), (0.0, 4000.0, 50.0), (3000.0, 4000.0, 400.0)];
        let rtt = |i: usize, j: usize| {
            let (a, b) = (truth[i], truth[j]);
            ((a.0 - b.0) * (a.0 - b.0) + (a.1 - b.1) * (a.1 - b.1)).sqrt() + a.2 + b.2
        };
        let mut c = [Coord::default(); 4];
        let mut jitter = 0.1;
        for round in 0..400 {
            for i in 0..4 {
                let j = (i + 1 + round % 3) % 4;
                let remote = c[j];
                jitter = (jitter * 7.31 + 0.17) % 1.0;
                c[i].update(&remote, rtt(i, j), jitter);
            }
        }
        let mut errors = Vec::new();
        for i in 0..4 {
            for j in 0..4 {
                if i != j {
                    let (p, t) = (c[i].distance(&c[j]), rtt(i, j));
                    errors.push((p - t).abs() / t);
                    assert!((p - t).abs() / t < 0.25, "{i}->{j}: predicted {p:.0} µs, true {t:.0} µs; {c:?}");
                }
            }
            assert!(c[i].error < 0.2, "node {i} still unsure: {:?}", c[i]);
        }
        // Vivaldi settles near, not at, the truth: most predictions within 10 %
        errors.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!(errors[errors.len() / 2] < 0.10, "median relative error {:.3}; {c:?}", errors[errors.len() / 2]);
    }

    /// Two nodes that start at the same place move apart to the measured RTT.
    #[test]
    fn two_nodes_settle_at_their_rtt() {
        let (mut a, mut b) = (Coord::default(), Coord::default());
        for k in 0..60 {
            let rb = b;
            a.update(&rb, 800.0, 0.3 + k as f64 * 1e-3);
            let ra = a;
            b.update(&ra, 800.0, 0.7);
        }
        assert!((a.distance(&b) - 800.0).abs() < 80.0, "{a:?} {b:?}");
    }

    #[test]
    fn nonsense_is_ignored() {
        let mut a = Coord::default();
        let before = a;
        a.update(&Coord::default(), f64::NAN, 0.5);
        a.update(&Coord::default(), -5.0, 0.5);
        a.update(&Coord { pos: [f64::INFINITY, 0.0], ..Default::default() }, 100.0, 0.5);
        assert_eq!(a, before);
        assert_eq!(Coord::from_array([1.0, 2.0, 30.0, 0.5]), Some(Coord { pos: [1.0, 2.0], height: 30.0, error: 0.5 }));
        assert_eq!(Coord::from_array([1.0, 2.0, 30.0, 7.0]), None);
        assert_eq!(Coord::from_array(a.to_array()), Some(a));
    }
}
