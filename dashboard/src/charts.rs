//! Charts drawn on the server as SVG (no chart library, no script): line charts of samples over time, and
//! the small in-memory store of samples the dashboard takes when pages poll (the root keeps no history of
//! clusters or workers). The store is bounded: [`CAPACITY`] samples per series, at most [`MAX_SERIES`]
//! series, and a series nobody looked at for [`EVICT_AFTER`] is dropped.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use maud::{html, Markup};
use parking_lot::Mutex;

/// One sample: `t` in seconds (since the Unix epoch), `v` in the series' unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t: f64,
    pub v: f64,
}

/// Samples kept per series (at one every 2 s, four minutes).
pub const CAPACITY: usize = 120;
/// A series not recorded or read for this long is dropped.
pub const EVICT_AFTER: Duration = Duration::from_secs(600);
/// At most this many series (the least recently seen goes first).
pub const MAX_SERIES: usize = 1024;
/// Samples closer than this to the last one are not kept (two browsers polling the same page).
pub const MIN_GAP_S: f64 = 1.0;

struct Ring {
    points: VecDeque<Point>,
    seen: Instant,
}

/// Series of samples by key (`cluster/<id>/cpu`, `worker/<id>/bytes.ebpf`, ...).
#[derive(Default)]
pub struct Samples {
    series: Mutex<HashMap<String, Ring>>,
}

impl Samples {
    /// Records `v` at `t` into `key` and answers the series.
    pub fn record(&self, key: &str, t: f64, v: f64) -> Vec<Point> {
        self.record_at(key, Point { t, v }, Instant::now())
    }

    /// [`Self::record`] at `now` (for the tests).
    pub fn record_at(&self, key: &str, p: Point, now: Instant) -> Vec<Point> {
        let mut m = self.series.lock();
        m.retain(|_, r| now.saturating_duration_since(r.seen) < EVICT_AFTER);
        if !m.contains_key(key) && m.len() >= MAX_SERIES {
            if let Some(oldest) = m.iter().min_by_key(|(_, r)| r.seen).map(|(k, _)| k.clone()) {
                m.remove(&oldest);
            }
        }
        let r = m.entry(key.to_string()).or_insert_with(|| Ring { points: VecDeque::new(), seen: now });
        r.seen = now;
        let keep = p.t.is_finite() && p.v.is_finite() && r.points.back().is_none_or(|last| p.t - last.t >= MIN_GAP_S);
        if keep {
            if r.points.len() == CAPACITY {
                r.points.pop_front();
            }
            r.points.push_back(p);
        }
        r.points.iter().copied().collect()
    }

    /// How many series are kept.
    pub fn len(&self) -> usize {
        self.series.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-second rates from the samples of a counter that only grows: one point per interval, at its end. A
/// counter that went down (its NetManager restarted) gives no point for that interval.
pub fn rates(counter: &[Point]) -> Vec<Point> {
    counter
        .windows(2)
        .filter_map(|w| {
            let (dt, dv) = (w[1].t - w[0].t, w[1].v - w[0].v);
            (dt > 0.0 && dv >= 0.0).then(|| Point { t: w[1].t, v: dv / dt })
        })
        .collect()
}

/// Where a chart draws its lines, and the ranges it maps onto that box: time `t0..t1` left to right,
/// values `0..vmax` bottom to top.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    pub t0: f64,
    pub t1: f64,
    pub vmax: f64,
}

impl Frame {
    fn x_of(&self, t: f64) -> f64 {
        if self.t1 > self.t0 {
            self.x + (t - self.t0) / (self.t1 - self.t0) * self.w
        } else {
            self.x + self.w
        }
    }

    fn y_of(&self, v: f64) -> f64 {
        let vmax = if self.vmax > 0.0 { self.vmax } else { 1.0 };
        self.y + self.h - (v.clamp(0.0, vmax) / vmax) * self.h
    }
}

/// The `d` attribute of a line through `points` in `frame`; none without points. A single point is drawn
/// as a level line across the whole width (its value, as far as is known). Values outside `0..vmax` are
/// drawn at the edge.
pub fn path_d(points: &[Point], frame: &Frame) -> Option<String> {
    let r = |v: f64| (v * 10.0).round() / 10.0;
    match points {
        [] => None,
        [p] => {
            let y = r(frame.y_of(p.v));
            Some(format!("M{} {y} L{} {y}", r(frame.x), r(frame.x + frame.w)))
        }
        _ => {
            let mut d = String::new();
            for (i, p) in points.iter().enumerate() {
                d.push_str(if i == 0 { "M" } else { " L" });
                d.push_str(&format!("{} {}", r(frame.x_of(p.t)), r(frame.y_of(p.v))));
            }
            Some(d)
        }
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (the top of a chart's scale); 1 for
/// nothing above zero.
pub fn nice_max(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 || v.is_infinite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * p * (1.0 + 1e-9) {
            return m * p;
        }
    }
    10.0 * p
}

/// [`nice_max`] in the unit (B, KiB, MiB, GiB) `v` bytes are written in, so the scale reads round.
pub fn nice_bytes_max(v: f64) -> f64 {
    let mut scale = 1.0;
    while v >= scale * 1024.0 && scale < 1024f64.powi(3) {
        scale *= 1024.0;
    }
    nice_max(v / scale) * scale
}

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// How a chart writes its values.
#[derive(Clone, Copy)]
pub enum Unit {
    Percent,
    Bytes,
    BytesPerSecond,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Percent => format!("{v:.0} %"),
            Unit::Bytes => bytes(v),
            Unit::BytesPerSecond => format!("{}/s", bytes(v)),
        }
    }
}

/// `v` bytes in B, KiB, MiB or GiB.
pub fn bytes(v: f64) -> String {
    let mut v = v.max(0.0);
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 || unit == "GiB" {
            return if unit == "B" { format!("{v:.0} {unit}") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    unreachable!()
}

const CHART_W: f64 = 600.0;
const CHART_H: f64 = 170.0;
const PLOT: Frame = Frame { x: 76.0, y: 10.0, w: 512.0, h: 130.0, t0: 0.0, t1: 0.0, vmax: 1.0 };
/// How many series get a colour of their own (`s0`..`s5` in the stylesheet); more repeat them.
const COLOURS: usize = 6;

/// A line chart: a scale from 0 (to 100 for percent, or more, else to a round maximum), the time span the samples
/// cover, and a line and legend entry per series. A chart without samples says so.
pub fn line_chart(id: &str, title: &str, unit: Unit, series: &[Series]) -> Markup {
    line_chart_or(id, title, unit, series, "no samples yet (the page takes one every 2 s)")
}

/// [`line_chart`] saying `empty` when there are no samples.
pub fn line_chart_or(id: &str, title: &str, unit: Unit, series: &[Series], empty: &str) -> Markup {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let t0 = all().map(|p| p.t).fold(f64::INFINITY, f64::min);
    let t1 = all().map(|p| p.t).fold(f64::NEG_INFINITY, f64::max);
    let top = all().map(|p| p.v).fold(0.0, f64::max);
    let vmax = match unit {
        // several cores' worth can exceed 100 %
        Unit::Percent => nice_max(top).max(100.0),
        // a scale of at least 1 KiB: below that, a round maximum reads as "0 B"
        Unit::Bytes | Unit::BytesPerSecond => nice_bytes_max(top.max(1024.0)),
    };
    let frame = Frame { t0, t1, vmax, ..PLOT };
    let no_samples = all().next().is_none();
    let span = if no_samples { 0.0 } else { (t1 - t0).max(0.0) };
    html! {
        figure.chart id=(id) {
            figcaption { (title) }
            svg viewBox={ "0 0 " (CHART_W) " " (CHART_H) } role="img" aria-label=(title)
                xmlns="http://www.w3.org/2000/svg" {
                rect.plot x=(PLOT.x) y=(PLOT.y) width=(PLOT.w) height=(PLOT.h) {}
                line.grid x1=(PLOT.x) y1=(PLOT.y + PLOT.h / 2.0) x2=(PLOT.x + PLOT.w) y2=(PLOT.y + PLOT.h / 2.0) {}
                text.axis x=(PLOT.x - 4.0) y=(PLOT.y + 4.0) text-anchor="end" { (unit.format(vmax)) }
                text.axis x=(PLOT.x - 4.0) y=(PLOT.y + PLOT.h / 2.0 + 4.0) text-anchor="end" { (unit.format(vmax / 2.0)) }
                text.axis x=(PLOT.x - 4.0) y=(PLOT.y + PLOT.h + 4.0) text-anchor="end" { (unit.format(0.0)) }
                text.axis x=(PLOT.x) y=(CHART_H - 12.0) { "−" (format!("{span:.0}")) " s" }
                text.axis x=(PLOT.x + PLOT.w) y=(CHART_H - 12.0) text-anchor="end" { "latest" }
                @if no_samples {
                    text.empty x=(PLOT.x + PLOT.w / 2.0) y=(PLOT.y + PLOT.h / 2.0 - 6.0) text-anchor="middle" {
                        (empty)
                    }
                }
                @for (i, s) in series.iter().enumerate() {
                    @if let Some(d) = path_d(&s.points, &frame) {
                        @let peak = s.points.iter().map(|p| p.v).fold(0.0, f64::max);
                        path class={ "line s" (i % COLOURS) } d=(d) data-label=(s.label) data-peak=(peak) {
                            title { (s.label) }
                        }
                    }
                }
            }
            ul.legend {
                @for (i, s) in series.iter().enumerate() {
                    li class={ "s" (i % COLOURS) } {
                        (s.label) ": "
                        @match s.points.last() {
                            Some(p) => { (unit.format(p.v)) }
                            None => { "—" }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: f64, v: f64) -> Point {
        Point { t, v }
    }

    const BOX: Frame = Frame { x: 10.0, y: 0.0, w: 100.0, h: 50.0, t0: 100.0, t1: 200.0, vmax: 10.0 };

    #[test]
    fn paths_scale_time_to_width_and_values_to_height() {
        let d = path_d(&[p(100.0, 0.0), p(150.0, 5.0), p(200.0, 10.0)], &BOX).unwrap();
        // t0 at the left edge, bottom for 0; t1 at the right edge, top for vmax
        assert_eq!(d, "M10 50 L60 25 L110 0");
        // out of range values are drawn at the edges, not outside the box
        let d = path_d(&[p(100.0, -3.0), p(200.0, 99.0)], &BOX).unwrap();
        assert_eq!(d, "M10 50 L110 0");
        // no scale (all zero): the line lies on the bottom
        let flat = Frame { vmax: 0.0, ..BOX };
        assert_eq!(path_d(&[p(100.0, 0.0), p(200.0, 0.0)], &flat).unwrap(), "M10 50 L110 50");
    }

    #[test]
    fn an_empty_series_has_no_path_and_one_point_a_level_line() {
        assert_eq!(path_d(&[], &BOX), None);
        let one = Frame { t0: 150.0, t1: 150.0, ..BOX };
        assert_eq!(path_d(&[p(150.0, 2.5)], &one).unwrap(), "M10 37.5 L110 37.5");
    }

    #[test]
    fn round_maxima() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(nice_max(0.3), 0.5);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(1234.0), 2000.0);
        assert_eq!(nice_max(4500.0), 5000.0);
        assert_eq!(nice_bytes_max(1024.0), 1024.0);
        assert_eq!(nice_bytes_max(1500.0), 2048.0);
        assert_eq!(nice_bytes_max(3.0 * 1024.0 * 1024.0), 5.0 * 1024.0 * 1024.0);
        assert_eq!(nice_bytes_max(700.0), 1000.0);
    }

    #[test]
    fn rates_from_a_growing_counter_skip_resets() {
        let r = rates(&[p(0.0, 0.0), p(2.0, 2048.0), p(4.0, 2048.0), p(6.0, 100.0), p(8.0, 300.0)]);
        assert_eq!(r, vec![p(2.0, 1024.0), p(4.0, 0.0), p(8.0, 100.0)]);
        assert!(rates(&[p(1.0, 5.0)]).is_empty());
    }

    #[test]
    fn the_store_is_bounded_and_forgets_unseen_series() {
        let s = Samples::default();
        let t0 = Instant::now();
        for i in 0..(CAPACITY + 30) {
            s.record_at("a", p(i as f64 * 2.0, i as f64), t0);
        }
        let a = s.record_at("a", p(0.5, 0.0), t0);
        assert_eq!(a.len(), CAPACITY, "at most CAPACITY samples");
        assert_eq!(a[0].v, 30.0, "the oldest went first");
        // a second poll within MIN_GAP_S of the last sample adds nothing
        let before = s.record_at("a", p(1000.0, 1.0), t0).len();
        assert_eq!(s.record_at("a", p(1000.4, 2.0), t0).len(), before);
        // b is seen later; a, unseen for EVICT_AFTER, goes
        s.record_at("b", p(0.0, 1.0), t0 + EVICT_AFTER / 2);
        assert_eq!(s.len(), 2);
        s.record_at("b", p(10.0, 1.0), t0 + EVICT_AFTER + Duration::from_secs(1));
        assert_eq!(s.len(), 1);
        // never more than MAX_SERIES
        for i in 0..(MAX_SERIES + 5) {
            s.record_at(&format!("k{i}"), p(0.0, 0.0), t0 + EVICT_AFTER + Duration::from_secs(2));
        }
        assert_eq!(s.len(), MAX_SERIES);
    }

    #[test]
    fn charts_draw_each_series_escaped_and_say_when_empty() {
        let svg = line_chart(
            "c",
            "CPU",
            Unit::Percent,
            &[
                Series { label: "<cpu>".into(), points: vec![p(0.0, 10.0), p(2.0, 20.0)] },
                Series { label: "mem".into(), points: vec![] },
            ],
        )
        .into_string();
        assert_eq!(svg.matches("<path").count(), 1, "one line for the one series with samples: {svg}");
        assert!(svg.contains("&lt;cpu&gt;") && !svg.contains("<cpu>"), "labels are escaped: {svg}");
        assert!(svg.contains("100 %") && svg.contains("−2 s"), "scale and span: {svg}");
        assert!(!svg.contains("no samples yet"));
        let empty = line_chart("e", "Throughput", Unit::BytesPerSecond, &[]).into_string();
        assert!(empty.contains("no samples yet") && !empty.contains("<path"), "{empty}");
        // byte scales start at 1 KiB, so their labels never read "0 B/s" at the top
        assert!(empty.contains("1.0 KiB/s") && empty.contains("512 B/s"), "{empty}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "3.0 MiB");
    }
}
